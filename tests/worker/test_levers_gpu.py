"""The GPU levers' equalities on CUDA (`pytest -m gpu`; skipped without a GPU): Liger's
kernels, flex attention and flash-attention 2 on packed rows, and a whole run with every
lever on "auto", each against the plain path within float tolerance.

Self-contained (its own tiny model fixture), so it runs under `--confcutdir=tests/gpu`
beside tests/gpu without the Postgres and S3 fixtures of tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.training.data import make_collator, tokenize_chat
from worker.training.levers import apply_liger, transformers_globals_kept
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.run import run_training
from worker.training.spec import LoraSpec, QuantSpec, TrainingHooks, TrainingOptions, TrainingSpec
from worker.training.tiny_model import ensure_tiny_random_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QUESTIONS = [
    ("Say hi.", "Hi!"),
    ("What colour is the sky?", "Blue, on a clear day."),
    ("What is 2 + 2?", "4."),
    ("Name a fruit.", "Apple."),
    ("Tell me a joke.", "Why did the byte bite? Hunger."),
    ("Translate 'cat' to French.", "Chat."),
]
# (compute dtype, relative tolerance of the loss, absolute tolerance of the LoRA gradients)
PRECISIONS = [("float32", 1e-4, 1e-4), ("bfloat16", 2e-2, 2e-2)]


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


def step(tiny_model: Path, inputs: dict, *, attention: str, dtype: str, liger: bool = False):
    """One forward and backward of the 4-bit base + LoRA (non-zero adapters, no dropout):
    the loss, the logits (None when never materialised) and the LoRA gradients."""
    with transformers_globals_kept():
        torch.manual_seed(0)
        base = load_quantized_base(
            tiny_model, QuantSpec(compute_dtype=dtype), "cuda", attention=attention
        )
        if liger:
            apply_liger(base)
        model = add_lora(base, LoraSpec(dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        model.train()
        batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            out = model(**batch)
        out.loss.backward()
        grads = {
            n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
        }
    logits = None if out.logits is None else out.logits.detach().float()
    return out.loss.item(), logits, grads


def assert_same_step(one, other, rel: float, atol: float) -> None:
    assert one[0] == pytest.approx(other[0], rel=rel)
    assert one[2].keys() == other[2].keys() and one[2]
    for name, grad in one[2].items():
        torch.testing.assert_close(grad, other[2][name], atol=atol, rtol=rel, msg=name)


def batches(tokenizer: ByT5Tokenizer, *, flash: bool = False) -> tuple[dict, dict]:
    examples = [tokenize_chat(chat(q, a), tokenizer) for q, a in QUESTIONS]
    padded = make_collator(tokenizer, packing=False, classification=False, flash=False)(examples)
    packed = make_collator(tokenizer, packing=True, classification=False, flash=flash)(examples)
    return padded, packed


@pytest.mark.parametrize(("dtype", "rel", "atol"), PRECISIONS)
def test_liger_kernels_give_the_plain_loss_and_gradients(
    tiny_model: Path, tokenizer: ByT5Tokenizer, dtype: str, rel: float, atol: float
) -> None:
    _, packed = batches(tokenizer)
    plain = step(tiny_model, packed, attention="sdpa", dtype=dtype)
    liger = step(tiny_model, packed, attention="sdpa", dtype=dtype, liger=True)

    assert_same_step(liger, plain, rel, atol)
    assert plain[1] is not None
    assert liger[1] is None, "the fused loss never materialises the vocabulary's logits"


@pytest.mark.parametrize(("dtype", "rel", "atol"), PRECISIONS)
def test_flex_attention_on_packed_rows_trains_as_padded_sdpa(
    tiny_model: Path, tokenizer: ByT5Tokenizer, dtype: str, rel: float, atol: float
) -> None:
    padded, packed = batches(tokenizer)
    sdpa = step(tiny_model, padded, attention="sdpa", dtype=dtype)
    flex = step(tiny_model, packed, attention="flex_attention", dtype=dtype)
    assert_same_step(flex, sdpa, rel, atol)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="no flash-attn")
def test_flash_attention_on_packed_rows_trains_as_padded_sdpa(
    tiny_model: Path, tokenizer: ByT5Tokenizer
) -> None:
    padded, packed = batches(tokenizer, flash=True)
    sdpa = step(tiny_model, padded, attention="sdpa", dtype="bfloat16")
    flash = step(tiny_model, packed, attention="flash_attention_2", dtype="bfloat16")
    assert_same_step(flash, sdpa, 2e-2, 2e-2)


def test_a_run_with_every_lever_on_auto_trains_as_the_plain_path(
    tiny_model: Path, tmp_path: Path
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(chat(q, a)) + "\n" for q, a in QUESTIONS * 4))

    def run(name: str, options: TrainingOptions):
        spec = TrainingSpec(
            base_model_path=tiny_model,
            chat_template=None,
            data_format="chat",
            train_file=train,
            valid_file=None,
            output_dir=tmp_path / name,
            n_epochs=1,
            batch_size=8,
            learning_rate=1e-3,
            max_seq_length=256,
            seed=0,
            lora=LoraSpec(dropout=0.0),
            device="cuda",
            options=options,
        )
        return run_training(spec, TrainingHooks())

    plain = run(
        "plain",
        TrainingOptions(
            attention="sdpa", liger=False, micro_batch_tokens=100_000, sample_max_new_tokens=0
        ),
    )
    auto = run("auto", TrainingOptions(sample_max_new_tokens=0))

    levers = auto.reports["throughput"]
    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    assert levers["attention"] == expected and levers["liger"] is True
    # auto: about max_seq_length tokens a micro-batch (the GPU holds far more), so the auto
    # run accumulates where the plain run takes each batch whole.
    assert levers["micro_batch_tokens"] == 256 and levers["micro_batch"] < 8
    assert plain.reports["throughput"]["micro_batch"] == 8
    # bf16, paged 8-bit AdamW: the same steps within bf16's tolerance.
    plain_losses = [row["train_loss"] for row in plain.metrics]
    auto_losses = [row["train_loss"] for row in auto.metrics]
    assert len(auto_losses) == len(plain_losses) == 3
    assert auto_losses == pytest.approx(plain_losses, rel=3e-2)
