"""The tutorial recipe: QLoRA as most guides write it, straight on transformers + peft.

Every example padded to max_length=512, batch 2 with 4 gradient-accumulation steps, fp16
(on a GPU), the 4-bit NF4 double-quantized base prepared with peft's defaults (gradient
checkpointing on), the plain HF Trainer. Only the loss masks are Lathe's own
(assistant tokens only, from worker.training.data.load_examples), so that a comparison
with Lathe's trainer measures the batching pipeline, not what is learned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from worker.training.data import IGNORE_INDEX, load_examples, load_tokenizer
from worker.training.qlora_model import add_lora
from worker.training.spec import LoraSpec

MAX_LENGTH = 512
BATCH_SIZE = 2
GRADIENT_ACCUMULATION = 4


def pad_to_max_length(example: dict[str, list[int]], pad_id: int) -> dict[str, list[int]]:
    """What tokenizer(..., padding="max_length", max_length=512, truncation=True) gives."""
    ids = example["input_ids"][:MAX_LENGTH]
    pad = MAX_LENGTH - len(ids)
    return {
        "input_ids": ids + [pad_id] * pad,
        "attention_mask": [1] * len(ids) + [0] * pad,
        "labels": example["labels"][:MAX_LENGTH] + [IGNORE_INDEX] * pad,
    }


class MarkBegin(TrainerCallback):
    """Marks when training proper starts (the Trainer set up), where Lathe's hooks do."""

    def __init__(self, mark: Callable[[str], None]) -> None:
        self.mark = mark

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark("begin")


def train_recipe(
    *,
    model_path: Path,
    chat_template: str | None,
    train_file: Path,
    output_dir: Path,
    device: str,
    n_epochs: int,
    learning_rate: float,
    seed: int,
    lora: LoraSpec,
    mark: Callable[[str], None] = lambda name: None,
) -> dict:
    """Train and save the adapter to output_dir/adapter; the last logged loss.

    `mark("begin")` is called when training starts, `mark("end")` once the adapter is saved.
    """
    cuda = device == "cuda"
    set_seed(seed)
    tokenizer = load_tokenizer(model_path, chat_template)
    examples = load_examples(train_file, "chat", tokenizer, MAX_LENGTH).examples
    dataset = [pad_to_max_length(e, tokenizer.pad_token_id) for e in examples]

    # fp16 autocast needs a GPU: on the CPU the recipe computes in float32, like Lathe there.
    compute_dtype = torch.float16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        ),
        device_map={"": 0} if cuda else {"": "cpu"},
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model)  # use_gradient_checkpointing=True
    # Lathe's own LoraConfig (r, alpha, dropout, target modules, no bias, CAUSAL_LM).
    model = add_lora(model, lora)
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION,
        num_train_epochs=n_epochs,
        learning_rate=learning_rate,
        seed=seed,
        fp16=cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[MarkBegin(mark)],
    )
    trainer.remove_callback(PrinterCallback)  # a line per step; the losses are kept anyway
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # as Lathe does: the peak of training
    trainer.train()
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    mark("end")
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "adapter_dir": str(adapter_dir),
        "train_loss": losses[-1],
        "steps": trainer.state.global_step,
        "real_tokens": sum(len(e["input_ids"]) for e in examples) * n_epochs,
        "padded_tokens": len(dataset) * MAX_LENGTH * n_epochs,
    }
