"""TRL's plain DPO recipe: QLoRA DPO as the tutorials write it, straight on TRL + peft.

The 4-bit NF4 double-quantized base loaded with AutoModelForCausalLM and prepared with
peft's defaults (gradient checkpointing on), the LoRA config handed to DPOTrainer as
`peft_config` (TRL wraps the model, casts the adapter to bfloat16 and computes the
reference with the adapter switched off), TRL's own tokenization of the conversational
preference rows ({"prompt", "chosen", "rejected"} as message lists), batch 2 with 4
gradient-accumulation steps, bf16 and paged_adamw_8bit on a GPU, and every sequence padded
to max_length=512: TRL 1.16's DPOConfig has no `padding="max_length"`, so the recipe sets
`pad_to_multiple_of=max_length`, which pads every batch to exactly 512 when nothing is
longer (bench/dpo.py checks that nothing is). Only the LoRA settings are Lathe's, so that a
comparison with Lathe's DPO trainer measures the batching, not what is learned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PrinterCallback,
    set_seed,
)
from trl import DPOConfig, DPOTrainer

from bench.recipe import BATCH_SIZE, GRADIENT_ACCUMULATION, MAX_LENGTH, MarkBegin
from worker.training.data import load_tokenizer, read_jsonl
from worker.training.spec import ALL_LINEAR, LoraSpec


def conversational_rows(path: Path) -> list[dict]:
    """OpenAI's preference lines as TRL's conversational preference rows."""
    return [
        {
            "prompt": record["input"]["messages"],
            "chosen": record["preferred_output"],
            "rejected": record["non_preferred_output"],
        }
        for _, record in read_jsonl(path)
    ]


def train_dpo_recipe(
    *,
    model_path: Path,
    chat_template: str | None,
    train_file: Path,
    output_dir: Path,
    device: str,
    n_epochs: int,
    learning_rate: float,
    beta: float,
    seed: int,
    lora: LoraSpec,
    mark: Callable[[str], None] = lambda name: None,
) -> dict:
    """Train and save the adapter to output_dir/adapter; the last logged loss and the
    tokens TRL tokenized (real: without pads, padded: as computed on).

    `mark("begin")` is called when training starts, `mark("end")` once the adapter is saved.
    """
    cuda = device == "cuda"
    set_seed(seed)
    tokenizer = load_tokenizer(model_path, chat_template)
    dataset = Dataset.from_list(conversational_rows(train_file))

    # bf16 autocast is TRL's default on a GPU; on the CPU the recipe computes in float32.
    compute_dtype = torch.bfloat16 if cuda else torch.float32
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
    args = DPOConfig(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION,
        num_train_epochs=n_epochs,
        learning_rate=learning_rate,
        seed=seed,
        beta=beta,
        max_length=MAX_LENGTH,
        pad_to_multiple_of=MAX_LENGTH,  # padding to max length (see above)
        bf16=cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        gradient_checkpointing=True,  # DPOConfig's default, said out loud
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        # Lathe's LoRA settings (r, alpha, dropout, targets), as a tutorial's LoraConfig.
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=ALL_LINEAR
            if ALL_LINEAR in lora.target_modules
            else list(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        ),
        callbacks=[MarkBegin(mark)],
    )
    trainer.remove_callback(PrinterCallback)  # a line per step; the losses are kept anyway
    tokenized = trainer.train_dataset
    lengths = [
        (len(p) + len(c), len(p) + len(r))
        for p, c, r in zip(
            tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"], strict=True
        )
    ]
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # as Lathe does: the peak of training
    trainer.train()
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    mark("end")
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "adapter_dir": str(adapter_dir),
        "train_loss": losses[-1],
        "steps": trainer.state.global_step,
        "real_tokens": sum(min(a, MAX_LENGTH) + min(b, MAX_LENGTH) for a, b in lengths) * n_epochs,
        "padded_tokens": 2 * len(lengths) * MAX_LENGTH * n_epochs,
    }
