"""Padding-free packing is exact: packed rows give the losses and logits of padded ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.training.data import IGNORE_INDEX, make_collator, micro_batch_size, tokenize_chat
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.spec import LoraSpec, QuantSpec
from worker.training.tiny_model import ensure_tiny_random_llama

CONVERSATIONS = [
    [("What is 2 + 2?", "4.")],
    [("Name three primary colours, please.", "Red, yellow and blue.")],
    [("Hi", "Hello! How can I help?"), ("Tell me a joke.", "Why did the byte bite? Hunger.")],
    [("Translate 'cat' to French.", "Chat.")],
]


def examples(tokenizer: ByT5Tokenizer) -> list[dict]:
    out = []
    for turns in CONVERSATIONS:
        messages = []
        for user, assistant in turns:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        out.append(tokenize_chat({"messages": messages}, tokenizer))
    return out


@pytest.fixture(scope="module")
def tokenizer() -> ByT5Tokenizer:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_logits(
    tiny_model: Path, tokenizer: ByT5Tokenizer, attention: str
) -> None:
    torch.manual_seed(0)
    model = add_lora(
        load_quantized_base(tiny_model, QuantSpec(), "cpu", attention=attention),
        LoraSpec(dropout=0.0),
    )
    # Non-zero adapters, so the comparison goes through them too (B starts at zero).
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    batch = examples(tokenizer)
    lengths = [len(e["input_ids"]) for e in batch]
    padded = make_collator(tokenizer, packing=False, classification=False, flash=False)(batch)
    packed = make_collator(tokenizer, packing=True, classification=False, flash=False)(batch)

    assert packed["input_ids"].shape == (1, sum(lengths)), "one row, no padding at all"
    assert "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    # The first token of every example is not predicted from the previous example.
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert all(packed["labels"][0, s] == IGNORE_INDEX for s in starts)

    with torch.no_grad():
        padded_out = model(**padded)
        packed_out = model(**packed)

    # The loss is the mean over the same trained tokens.
    assert packed_out.loss.item() == pytest.approx(padded_out.loss.item(), rel=1e-5)
    # Stronger: every example's logits are what it gets alone in a padded row, so no
    # token attended across an example boundary.
    for k, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        torch.testing.assert_close(
            packed_out.logits[0, start : start + n], padded_out.logits[k, :n], atol=1e-4, rtol=1e-4
        )


def test_without_position_ids_examples_would_leak(
    tiny_model: Path, tokenizer: ByT5Tokenizer
) -> None:
    # The control for the test above: the same packed row with plain causal attention
    # (positions 0..N-1) changes the later examples' logits, so the equality above is
    # the packing's doing, not an accident of the tiny model.
    model = load_quantized_base(tiny_model, QuantSpec(), "cpu", attention="sdpa")
    model.eval()
    batch = examples(tokenizer)
    packed = make_collator(tokenizer, packing=True, classification=False, flash=False)(batch)
    with torch.no_grad():
        isolated = model(**packed).logits
        leaky = model(input_ids=packed["input_ids"]).logits
    first = len(batch[0]["input_ids"])
    torch.testing.assert_close(isolated[0, :first], leaky[0, :first], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(isolated[0, first:], leaky[0, first:], atol=1e-3)


@pytest.mark.parametrize(
    ("batch", "mean", "budget", "micro"),
    [
        (8, 150, 1024, 4),  # 8 x 150 = 1200 > 1024: two micro-batches of 4
        (8, 100, 1024, 8),  # fits whole
        (8, 2000, 1024, 1),  # even one example is past the budget: one at a time
        (6, 300, 1024, 3),  # divisors only: 3 x 300 fits, 6 does not
        (7, 200, 1024, 1),  # 7 is prime and 7 x 200 > 1024
    ],
)
def test_micro_batches_divide_the_batch_within_the_token_budget(
    batch: int, mean: float, budget: int, micro: int
) -> None:
    assert micro_batch_size(batch, mean, budget) == micro
