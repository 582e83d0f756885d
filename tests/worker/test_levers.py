"""The GPU levers on the CPU: what "auto" resolves to, that each option reaches the run,
and the equalities the CPU can prove (micro-batch sizing; flex attention's document mask).
Their GPU equalities are in test_levers_gpu.py (`pytest -m gpu`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ByT5Tokenizer
from transformers.models.llama import modeling_llama

from app.config import DEFAULT_CHAT_TEMPLATE
from app.domain.memory import ModelShape
from worker.training import levers
from worker.training.data import make_collator, tokenize_chat, typical_length
from worker.training.levers import (
    model_shape,
    resolve_attention,
    resolve_liger,
    resolve_micro_batch_tokens,
    transformers_globals_kept,
)
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.run import run_training
from worker.training.spec import LoraSpec, QuantSpec, TrainingHooks, TrainingOptions, TrainingSpec
from worker.training.tiny_model import ensure_tiny_random_llama

QUESTIONS = [
    ("Say hi.", "Hi!"),
    ("What colour is the sky?", "Blue, on a clear day."),
    ("What is 2 + 2?", "4."),
    ("Name a fruit.", "Apple."),
    ("Tell me a joke.", "Why did the byte bite? Hunger."),
    ("Translate 'cat' to French.", "Chat."),
]


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def tokenizer() -> ByT5Tokenizer:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def spec_for(tiny_model: Path, tmp_path: Path, options: TrainingOptions) -> TrainingSpec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = tmp_path / "train.jsonl"
    # Examples of unequal lengths, so micro-batches differ in tokens and in trained tokens:
    # a wrong normalisation (a mean of micro-batch means) would show.
    train.write_text("".join(json.dumps(chat(q, a)) + "\n" for q, a in QUESTIONS * 2))
    return TrainingSpec(
        base_model_path=tiny_model,
        chat_template=None,
        data_format="chat",
        train_file=train,
        valid_file=None,
        output_dir=tmp_path / "run",
        n_epochs=1,
        batch_size=4,
        learning_rate=1e-2,
        max_seq_length=256,
        seed=0,
        lora=LoraSpec(dropout=0.0),  # dropout draws depend on the micro-batch shapes
        device="cpu",
        options=dataclasses.replace(options, sample_max_new_tokens=0),
    )


# --- "auto" on this machine and on a GPU -------------------------------------------------


def test_auto_levers_on_the_cpu_are_todays_path() -> None:
    assert resolve_attention("auto", "cpu", packed=True) == "sdpa"
    assert resolve_liger("auto", "cpu", "llama") is False
    assert (
        resolve_micro_batch_tokens("auto", "cpu", max_seq_length=512, batch_size=8, packed=True)
        == 512
    )
    assert (
        resolve_micro_batch_tokens("auto", "cpu", max_seq_length=512, batch_size=8, packed=False)
        is None
    ), "a padded batch is trained whole"
    # Chosen values are kept as given.
    assert resolve_attention("eager", "cuda", packed=True) == "eager"
    assert (
        resolve_micro_batch_tokens(3000, "cuda", max_seq_length=512, batch_size=8, packed=True)
        == 3000
    )
    assert resolve_liger(False, "cuda", "llama") is False


def test_auto_levers_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(levers, "flash_attention_installed", lambda: True)
    assert resolve_attention("auto", "cuda", packed=True) == "flash_attention_2"
    monkeypatch.setattr(levers, "flash_attention_installed", lambda: False)
    assert resolve_attention("auto", "cuda", packed=True) == "flex_attention"
    assert resolve_attention("auto", "cuda", packed=False) == "sdpa", "padded rows need no varlen"

    assert resolve_liger("auto", "cuda", "llama") is True
    assert resolve_liger("auto", "cuda", "llama", causal_lm=False) is False, "a classifier"
    assert resolve_liger("auto", "cuda", "bert") is False
    assert resolve_liger(True, "cuda", "qwen2") is True


def test_asking_for_liger_where_it_cannot_run_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_liger(True, "cpu", "llama")
    with pytest.raises(ValueError, match="classifier of type 'llama'"):
        resolve_liger(True, "cuda", "llama", causal_lm=False)
    with pytest.raises(ValueError, match="type 'bert'"):
        resolve_liger(True, "cuda", "bert")


def test_auto_micro_batch_tokens_on_a_gpu_are_bounded_by_the_memory_estimate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shape = model_shape(
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "vocab_size": 128256,
            "intermediate_size": 14336,
        }
    )
    assert isinstance(shape, ModelShape) and 7e9 < shape.parameters < 9e9

    def budget(memory_gb: float, packed: bool = True, **estimate) -> int | None:
        settings = {"lora_r": 16, "target_modules": 7, "attention": "flex_attention"}
        return resolve_micro_batch_tokens(
            "auto",
            "cuda",
            max_seq_length=2048,
            batch_size=64,
            packed=packed,
            shape=shape,
            memory_gb=memory_gb,
            **(settings | estimate),
        )

    # Packed: AUTO_PACKED_ROWS rows of max_seq_length (provisional), if the GPU holds them.
    assert budget(141) == budget(24) == levers.AUTO_PACKED_ROWS * 2048
    monkeypatch.setattr(levers, "AUTO_PACKED_ROWS", 64)
    h200, l4 = budget(141), budget(24)
    assert 2048 < l4 < h200 <= 64 * 2048, "the estimate bounds what is wanted"
    assert budget(24, fused_loss=True) > 2 * l4, "Liger's loss frees the logits' memory"
    # Padded: the whole batch where it fits, else what fits.
    assert budget(1000, packed=False) is None
    assert 2048 < budget(24, packed=False) < 64 * 2048
    # Without a shape (a config that names it otherwise) a GPU sizes as the CPU does.
    assert model_shape({"n_embd": 768}) is None
    assert (
        resolve_micro_batch_tokens("auto", "cuda", max_seq_length=2048, batch_size=64, packed=True)
        == 64 * 2048
    )


# --- micro-batches by tokens: the same training ------------------------------------------


@pytest.mark.slow  # five short training runs
def test_micro_batch_tokens_train_exactly_as_whole_batches(
    tiny_model: Path, tmp_path: Path, tokenizer: ByT5Tokenizer
) -> None:
    def run(name: str, budget: int | str, packing: bool = True):
        options = TrainingOptions(packing=packing, micro_batch_tokens=budget)
        return run_training(spec_for(tiny_model, tmp_path / name, options), TrainingHooks())

    whole = run("whole", 100_000)  # 4 examples a micro-batch: no accumulation
    single = run("single", 1)  # at least one example: 4 micro-batches a step
    typical = typical_length([tokenize_chat(chat(q, a), tokenizer) for q, a in QUESTIONS])
    pairs = run("pairs", 2 * typical)  # two examples a micro-batch

    for result, micro in ((whole, 4), (single, 1), (pairs, 2)):
        speed = result.reports["throughput"]
        assert (speed["micro_batch"], speed["gradient_accumulation_steps"]) == (micro, 4 // micro)
        assert speed["attention"] == "sdpa" and speed["liger"] is False

    # The same optimizer steps: every step's loss (the whole batch's mean over its trained
    # tokens), the tokens seen and the trained adapter agree within float tolerance.
    losses = [[row["train_loss"] for row in r.metrics] for r in (whole, single, pairs)]
    assert len(losses[0]) == 3
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-4)
    assert whole.trained_tokens == single.trained_tokens == pairs.trained_tokens
    adapters = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (whole, single)]
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, atol=1e-4, rtol=1e-3)

    # Padded batches take the budget too (batched by length, so compared with their own).
    padded = [run(f"padded-{budget}", budget, packing=False) for budget in (100_000, 1)]
    assert [r.reports["throughput"]["micro_batch"] for r in padded] == [4, 1]
    padded_losses = [[row["train_loss"] for row in r.metrics] for r in padded]
    assert padded_losses[1] == pytest.approx(padded_losses[0], rel=1e-4)


# --- Liger: the option reaches the base ---------------------------------------------------


def test_liger_on_the_cpu_fails_the_run_before_loading(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        run_training(spec_for(tiny_model, tmp_path, TrainingOptions(liger=True)), TrainingHooks())


def test_a_resolved_liger_is_applied_to_the_base_before_the_adapters(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Liger's kernels need CUDA; here the run is told they resolved on, and the patch that
    # would apply them records what it was given.
    import worker.training.run as run_module
    import worker.training.trainer_setup as setup_module

    seen: list[str] = []
    monkeypatch.setattr(run_module, "resolve_liger", lambda option, *a, **k: option is True)
    monkeypatch.setattr(
        setup_module, "apply_liger", lambda model: seen.append(type(model).__name__)
    )
    result = run_training(
        spec_for(tiny_model, tmp_path, TrainingOptions(liger=True)), TrainingHooks()
    )

    assert seen == ["LlamaForCausalLM"], "the 4-bit base itself, not the peft wrapper"
    assert result.reports["throughput"]["liger"] is True


def test_liger_module_wide_patches_end_with_the_run() -> None:
    original = modeling_llama.apply_rotary_pos_emb
    with transformers_globals_kept():
        modeling_llama.apply_rotary_pos_emb = lambda *args: args  # as Liger's RoPE patch does
        modeling_llama.LlamaMLP = object
    assert modeling_llama.apply_rotary_pos_emb is original
    assert modeling_llama.LlamaMLP is not object

    # A modeling module first imported during the run is put back too, once apply_liger
    # has said it patches it (as if it were not loaded on entry).
    with transformers_globals_kept():
        levers._kept[-1].pop(modeling_llama.__name__)
        levers.keep_module(modeling_llama.__name__)
        modeling_llama.apply_rotary_pos_emb = lambda *args: args
    assert modeling_llama.apply_rotary_pos_emb is original


# --- flex attention: the packed row's document mask ---------------------------------------


@pytest.mark.slow  # flex attention compiles its kernel (about 40 s on two cores)
def test_flex_attention_on_a_packed_row_gives_each_example_its_padded_logits(
    tiny_model: Path, tokenizer: ByT5Tokenizer
) -> None:
    # PyTorch's flex attention has no backward on the CPU (its training equality is a GPU
    # test); its forward shows the document mask built from the position ids keeps every
    # example to itself, as SDPA's padded rows do.
    batch = [tokenize_chat(chat(q, a), tokenizer) for q, a in QUESTIONS[:4]]
    lengths = [len(e["input_ids"]) for e in batch]
    padded = make_collator(tokenizer, packing=False, classification=False, flash=False)(batch)
    packed = make_collator(tokenizer, packing=True, classification=False, flash=False)(batch)

    outputs = {}
    for attention, inputs in (("sdpa", padded), ("flex_attention", packed)):
        torch.manual_seed(0)
        model = add_lora(
            load_quantized_base(tiny_model, QuantSpec(), "cpu", attention=attention),
            LoraSpec(dropout=0.0),
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        model.eval()
        with torch.no_grad():
            outputs[attention] = model(**inputs)

    assert model.config._attn_implementation == "flex_attention"
    flex, sdpa = outputs["flex_attention"], outputs["sdpa"]
    assert flex.loss.item() == pytest.approx(sdpa.loss.item(), rel=1e-5)
    start = 0
    for k, n in enumerate(lengths):
        torch.testing.assert_close(
            flex.logits[0, start : start + n], sdpa.logits[k, :n], atol=1e-4, rtol=1e-4
        )
        start += n
