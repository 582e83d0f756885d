"""Packed rows give padded rows' losses and logits on the GPU too (tests/worker/test_packing.py
on the CPU), in float32 exactly and in bf16 within bf16's rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu import GPU
from tests.worker.test_packing import examples
from worker.training.data import make_collator
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.spec import LoraSpec, QuantSpec

pytestmark = GPU

# (compute dtype, loss rel, logits atol): float32 as on the CPU; bf16 carries 8 bits of
# mantissa, and packed and padded rows run different kernel shapes.
TOLERANCES = {"float32": (1e-4, 2e-3), "bfloat16": (2e-2, 8e-2)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_padded_batches_agree_on_cuda(
    tiny_model: Path, attention: str, dtype: str
) -> None:
    from transformers import ByT5Tokenizer

    from app.config import DEFAULT_CHAT_TEMPLATE

    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    base = load_quantized_base(
        tiny_model, QuantSpec(compute_dtype=dtype), "cuda", attention=attention
    )
    model = add_lora(base, LoraSpec(dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    batch = examples(tokenizer)
    lengths = [len(e["input_ids"]) for e in batch]
    padded = make_collator(tokenizer, packing=False, classification=False, flash=False)(batch)
    packed = make_collator(tokenizer, packing=True, classification=False, flash=False)(batch)
    padded = {k: v.to("cuda") for k, v in padded.items()}
    packed = {k: v.to("cuda") for k, v in packed.items()}

    with torch.no_grad():
        padded_out = model(**padded)
        packed_out = model(**packed)

    loss_rel, atol = TOLERANCES[dtype]
    assert packed_out.logits.device.type == "cuda"
    assert packed_out.loss.item() == pytest.approx(padded_out.loss.item(), rel=loss_rel)
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    for k, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        torch.testing.assert_close(
            packed_out.logits[0, start : start + n].float(),
            padded_out.logits[k, :n].float(),
            atol=atol,
            rtol=0,
        )
