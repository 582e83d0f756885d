"""The 4-bit quantization a job trained against, and the base weights it really computed with.

QLoRA trains the adapter on top of the base's weights quantized to 4 bits: every forward
pass saw dequantize(quantize(W)), never W. A merge that means "the model that was trained"
adds the adapter to that round trip, made with bitsandbytes' own functions and the
settings transformers loaded the base with (its Linear4bit: blocks of 64, double
quantization of the block scales when the job asked for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes.functional as bnb_functional
import torch

from worker.training.spec import QuantSpec

# bitsandbytes' Params4bit default, which transformers' 4-bit loading keeps.
TRAINED_BLOCKSIZE = 64


@dataclass(frozen=True)
class TrainedQuantization:
    type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    blocksize: int = TRAINED_BLOCKSIZE
    # The dtype a base weight was cast to before it was quantized: the job's compute dtype
    # (transformers loads with dtype=compute_dtype, then quantizes). None: the checkpoint's
    # own dtype, which is exact for every 16-bit checkpoint (bitsandbytes scales in float32
    # either way) and for a float32 checkpoint trained on the CPU (compute dtype float32).
    dtype: torch.dtype | None = None

    @classmethod
    def from_spec(cls, quant: QuantSpec, *, blocksize: int = TRAINED_BLOCKSIZE):
        """From a job's QuantSpec; its compute dtype "auto" depended on the training device,
        so it is read as the checkpoint's own dtype (see `dtype`)."""
        dtype = None if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
        return cls(quant.type, quant.double_quant, blocksize, dtype)

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the trained 4-bit layer held it: quantized, then dequantized."""
        if self.dtype is not None:
            weight = weight.to(self.dtype)
        packed, state = bnb_functional.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.type,
        )
        return bnb_functional.dequantize_4bit(packed, state)
