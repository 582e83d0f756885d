"""The worker's QLoRA training on CUDA: bf16 compute, paged 8-bit AdamW, the 4-bit base on
the GPU, and a paused run resumed to the uninterrupted run's losses. The CPU tests'
bodies (tests/worker/test_training.py) run again with their specs moved to the GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from tests.gpu import GPU
from tests.worker import test_training as cpu_tests
from worker.training.qlora_model import resolve_compute_dtype, resolve_optimizer

pytestmark = GPU


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> dict:
    """make_spec gives device="cuda"; what the Trainer was set up with is recorded."""
    make_spec = cpu_tests.make_spec
    monkeypatch.setattr(
        cpu_tests,
        "make_spec",
        lambda *args, **kwargs: dataclasses.replace(make_spec(*args, **kwargs), device="cuda"),
    )
    seen: dict = {}
    create_optimizer = Trainer.create_optimizer

    def spy(self):
        optimizer = create_optimizer(self)
        seen.update(
            # Trainer's paged_adamw_8bit is bitsandbytes' AdamW with is_paged and 8-bit states.
            optimizer=f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            paged=getattr(optimizer, "is_paged", False),
            optim_bits=getattr(getattr(optimizer, "args", None), "optim_bits", None),
            optim=getattr(self.args.optim, "value", str(self.args.optim)),
            bf16=self.args.bf16,
            fp16=self.args.fp16,
            devices={p.device.type for p in self.model.parameters()},
            quantized=any("4bit" in type(m).__name__ for m in self.model.modules()),
        )
        return optimizer

    monkeypatch.setattr(Trainer, "create_optimizer", spy)
    return seen


def test_auto_means_bf16_and_paged_adamw_8bit_on_this_gpu() -> None:
    assert torch.cuda.is_bf16_supported()
    assert resolve_compute_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_optimizer("auto", "cuda") == "paged_adamw_8bit"


@pytest.mark.slow
def test_training_on_cuda_lowers_loss_in_bf16_with_paged_adamw_8bit(
    tiny_model: Path, tmp_path: Path, on_cuda: dict
) -> None:
    cpu_tests.test_training_lowers_loss_and_saves_a_loadable_adapter(tiny_model, tmp_path)

    assert on_cuda["bf16"] and not on_cuda["fp16"]
    assert on_cuda["optim"] == "paged_adamw_8bit"
    assert on_cuda["optimizer"].startswith("bitsandbytes."), on_cuda
    assert on_cuda["paged"] and on_cuda["optim_bits"] == 8, on_cuda
    assert on_cuda["devices"] == {"cuda"}
    assert on_cuda["quantized"], "the base is bitsandbytes' 4-bit Linear4bit on the GPU"
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.slow
def test_a_paused_run_on_cuda_resumes_to_the_uninterrupted_losses(
    tiny_model: Path, tmp_path: Path, on_cuda: dict
) -> None:
    # The CPU test's equality (abs 1e-4): adapter, paged optimizer states, scheduler, the
    # CUDA RNG (dropout) and the data position all come back from the checkpoint.
    cpu_tests.test_a_paused_run_resumes_from_its_checkpoint_where_it_stopped(tiny_model, tmp_path)

    assert on_cuda["optim"] == "paged_adamw_8bit"
