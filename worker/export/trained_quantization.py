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
    # The job's compute dtype: transformers cast each base weight to it before quantizing,
    # and every forward pass dequantized into it. None: float32, as on the CPU, and exact
    # for the quantization of any 16-bit checkpoint (bitsandbytes scales in float32); a GPU
    # job's bfloat16 dequantization differs from it by about as much as the merged weights'
    # own rounding to 16 bits.
    dtype: torch.dtype | None = None

    @classmethod
    def from_spec(cls, quant: QuantSpec, *, blocksize: int = TRAINED_BLOCKSIZE):
        """From a job's QuantSpec; its compute dtype "auto" depended on the training device,
        so it is read as float32 (see `dtype`)."""
        dtype = None if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
        return cls(quant.type, quant.double_quant, blocksize, dtype)

    def round_trip(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the trained 4-bit layer held it: quantized, then dequantized."""
        weight = weight.to(self.dtype or torch.float32)
        packed, state = bnb_functional.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.type,
        )
        return bnb_functional.dequantize_4bit(packed, state)
