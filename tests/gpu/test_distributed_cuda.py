"""Multi-GPU training (worker.training.distributed) on CUDA: torch's launcher starts the ranks,
NCCL joins them, and the Trainer's own FSDP or DDP trains 4-bit QLoRA on the tiny model.

On one GPU (the lent machine has one H200) every run is one rank, and the spec says
`world_size=2` while one rank is launched: Lathe gives the Trainer its parallelism only for a
spec of several ranks (trainer_setup.distributed_arguments returns nothing for one, and a
job of gpus=1 never starts the launcher), so this is how one device reaches the FSDP path.
Each step then trains the spec's per-rank share (batch_size / 2). What a world of one runs,
read in the installed sources:

- accelerate takes it: under torchrun (LOCAL_RANK set) on CUDA its distributed type is
  MULTI_GPU, and a FullyShardedDataParallelPlugin makes it FSDP whatever the world size;
- torch's FSDP1 clamps FULL_SHARD to NO_SHARD when the world size is 1 (_init_core_state):
  nothing is sharded or all-gathered, but the wrapping (decoder layers, peft's LoRA layers
  apart), the flattening of each unit into one FlatParameter (which demands one dtype: the
  reason for bnb_4bit_quant_storage), the mixed precision, the full state dict gathered for
  the adapter and FSDP's optimizer checkpoint (optimizer.bin, pytorch_model_fsdp.bin) all run;
- DDP is not wrapped at all with one process (accelerate wraps when num_processes > 1), and
  Lathe's per-step broadcast and barriers are no-ops: the DDP run checks the launcher, the
  NCCL process group and start_rank's device on CUDA, and that nothing of it changes a loss.

With two GPUs or more visible, two real ranks train DDP and FSDP (FULL_SHARD); skipped on one.

The ranks run this module (`python -m tests.gpu.test_distributed_cuda WORKDIR MODE`, at the
bottom): rank 0 with hooks that pause when told and copy each checkpoint, the others
silent, and every rank records what its Trainer trains at its first step (probe-RANK.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu import GPU
from tests.worker.test_distributed import make_spec as cpu_spec
from tests.worker.test_distributed import train_as_rank, write_chat_jsonl
from worker.training.distributed import (
    RESULT_FILE,
    SPEC_FILE,
    rank,
    read_result,
    run_ranks,
    start_rank,
    write_spec,
)
from worker.training.spec import DDP, FSDP, TrainingResult, TrainingSpec

pytestmark = GPU

REPO = Path(__file__).resolve().parents[2]
RANK_PROGRAM = "tests.gpu.test_distributed_cuda"
# Runs of the same steps on the same GPU: the same kernels on the same data, equal in
# principle (the CPU tests see 0.0); the tolerance leaves room for CUDA's nondeterministic
# reductions (atomics in attention's backward) in bf16, a few steps deep.
LOSS_TOLERANCE = 1e-3
# FSDP against a single process, on two GPUs: FSDP's mixed precision runs the LoRA weights
# and the reduced gradients in bf16, the single process keeps them in float32 under autocast,
# so only the first step's loss (before any update: the base alone) is compared.
FIRST_LOSS_REL = 2e-2
# One rank of the tiny model takes seconds; a rank stuck in a collective would wait for
# NCCL's own timeout (10 minutes), far past the check's budget.
RUN_TIMEOUT = 180
PAUSE_STEP = 3  # mid-epoch: the resume skips the epoch's first 3 batches
FSDP_CHECKPOINT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",  # the adapter, gathered (FULL_STATE_DICT)
    "optimizer.bin",  # FSDP's optimizer state, gathered
    "pytorch_model_fsdp.bin",  # the adapter as FSDP loads it back
    "scheduler.pt",
    "trainer_state.json",
}


def two_gpus() -> pytest.MarkDecorator:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(count < 2, reason=f"needs 2 CUDA GPUs, {count} visible")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_chat_jsonl(root / "train.jsonl", 4), write_chat_jsonl(root / "valid.jsonl", 1)


def make_spec(tiny_model: Path, data: tuple[Path, Path], workdir: Path, **changes) -> TrainingSpec:
    """The CPU tests' spec on the GPU over 2 ranks: 16 examples here, a global batch of 8
    (4 a rank), 2 epochs, a validation loss every step, no dropout. The job's GPU defaults
    otherwise: bf16, paged 8-bit AdamW, gradient checkpointing, Liger."""
    spec = cpu_spec(tiny_model, data, workdir, device="cuda", world_size=2)
    return dataclasses.replace(spec, **changes)


def rank_env() -> dict[str, str]:
    # The carried wheels' folder (gpu_check.sh's PYTHONPATH) stays behind the repository.
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


@dataclasses.dataclass
class RankRun:
    result: TrainingResult
    workdir: Path
    probes: list[dict]  # what each rank's Trainer trained, at its first step
    steps: list[int]  # the last step of each rank


def train_on_ranks(spec: TrainingSpec, workdir: Path, nproc: int, mode: str = "train") -> RankRun:
    write_spec(spec, workdir / SPEC_FILE)
    run_ranks(
        nproc, RANK_PROGRAM, [str(workdir), mode], workdir, env=rank_env(), timeout_s=RUN_TIMEOUT
    )
    probes = [json.loads((workdir / f"probe-{r}.json").read_text()) for r in range(nproc)]
    steps = [json.loads((workdir / f"rank-{r}.json").read_text())["step"] for r in range(nproc)]
    return RankRun(read_result(workdir / RESULT_FILE), workdir, probes, steps)


def train_alone(spec: TrainingSpec) -> TrainingResult:
    """The plain single process (no launcher, no process group), in this process."""
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks

    return run_training(dataclasses.replace(spec, world_size=1), TrainingHooks())


def losses(rows: list[dict]) -> list[float]:
    return [row[key] for row in rows for key in ("train_loss", "valid_loss")]


def assert_trains(result: TrainingResult, steps: int) -> None:
    rows = result.metrics
    assert not result.stopped and result.step == steps
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses(rows)), losses(rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"], [r["valid_loss"] for r in rows]


def assert_fsdp(probe: dict, world: int) -> None:
    assert probe["fsdp_enabled"] and probe["distributed_type"] == "FSDP", probe
    assert probe["wrapper"] == "FullyShardedDataParallel", probe
    assert probe["backend"].endswith("nccl") and probe["world_size"] == world, probe
    assert probe["device"] == f"cuda:{probe['rank']}", probe
    # torch's FSDP1 runs NO_SHARD in a world of one; two ranks shard in full.
    assert probe["sharding"] == ("NO_SHARD" if world == 1 else "FULL_SHARD"), probe
    # The 4-bit weights are stored in the compute dtype, so each decoder layer (its 4-bit
    # weights and its norms) flattens into one bf16 FlatParameter; the LoRA layers are
    # wrapped apart (peft's policy), and FSDP computes in the storage dtype.
    assert probe["quant_storage"] == "torch.bfloat16", probe
    assert probe["linear4bit_dtypes"] == ["torch.bfloat16"], probe
    assert probe["flat_dtypes"]["LlamaDecoderLayer"] == ["torch.bfloat16"], probe
    assert "Linear" in probe["flat_dtypes"], "the LoRA layers wrapped apart"
    assert probe["wrapped_decoder_layers"] == probe["decoder_layers"] > 0, probe
    assert probe["param_dtype"] == "torch.bfloat16", probe
    if world > 1:
        assert 0 < probe["local_numel"] < probe["full_numel"], "each rank holds a shard"


def assert_loads_with_peft(tiny_model: Path, data: tuple[Path, Path], adapter: Path) -> None:
    """The saved adapter is whole (the FSDP-gathered state dict, not a shard) and trained:
    loaded with peft onto the 4-bit base, it has the file's weights and lowers the loss of
    a training example below the base's."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from worker.training.data import load_examples, load_tokenizer
    from worker.training.qlora_model import load_quantized_base
    from worker.training.spec import QuantSpec

    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in saved.items()), "B trained from 0"
    base = load_quantized_base(tiny_model, QuantSpec(), "cuda")
    tuned = PeftModel.from_pretrained(base, adapter)
    loaded = {k: v for k, v in tuned.named_parameters() if "lora_" in k}
    assert len(loaded) == len(saved), (len(loaded), len(saved))

    tokenizer = load_tokenizer(tiny_model, chat_template=None)
    example = load_examples(data[0], "chat", tokenizer, 256).examples[0]
    ids = torch.tensor([example["input_ids"]], device="cuda")
    labels = torch.tensor([example["labels"]], device="cuda")
    with torch.no_grad():
        trained = tuned(input_ids=ids, labels=labels).loss.item()
        with tuned.disable_adapter():
            untrained = tuned(input_ids=ids, labels=labels).loss.item()
    assert trained < untrained, (trained, untrained)


# --- One GPU: FSDP + QLoRA through the Trainer -----------------------------------------------


@pytest.fixture(scope="module")
def fsdp_one_rank(
    tiny_model: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> RankRun:
    workdir = tmp_path_factory.mktemp("fsdp-uninterrupted")
    return train_on_ranks(make_spec(tiny_model, data, workdir, parallelism=FSDP), workdir, 1)


@pytest.mark.slow
def test_one_rank_trains_fsdp_qlora_with_bf16_storage_and_its_adapter_loads_with_peft(
    tiny_model: Path, data: tuple[Path, Path], fsdp_one_rank: RankRun
) -> None:
    (probe,) = fsdp_one_rank.probes
    assert_fsdp(probe, world=1)
    result = fsdp_one_rank.result
    assert_trains(result, steps=8)  # 16 examples, 4 a step, 2 epochs
    # Each epoch's end was checkpointed the FSDP way (rank 0's hooks copied them).
    for step in (4, 8):
        held = {
            p.name for p in (fsdp_one_rank.workdir / "checkpoints" / f"checkpoint-{step}").iterdir()
        }
        assert FSDP_CHECKPOINT_FILES <= held, sorted(held)
    assert_loads_with_peft(tiny_model, data, result.adapter_dir)


@pytest.mark.slow
def test_one_rank_fsdp_paused_resumes_from_its_checkpoint_to_the_uninterrupted_losses(
    tiny_model: Path, data: tuple[Path, Path], tmp_path: Path, fsdp_one_rank: RankRun
) -> None:
    paused_dir = tmp_path / "paused"
    spec = make_spec(tiny_model, data, paused_dir, parallelism=FSDP)
    paused = train_on_ranks(spec, paused_dir, 1, f"pause-{PAUSE_STEP}")
    assert paused.result.stopped and paused.result.step == PAUSE_STEP
    checkpoint = paused_dir / "checkpoints" / f"checkpoint-{PAUSE_STEP}"
    assert FSDP_CHECKPOINT_FILES <= {p.name for p in checkpoint.iterdir()}

    resumed_dir = tmp_path / "resumed"
    resumed = train_on_ranks(
        make_spec(tiny_model, data, resumed_dir, parallelism=FSDP, resume_from=checkpoint),
        resumed_dir,
        1,
    )
    assert_fsdp(resumed.probes[0], world=1)
    assert not resumed.result.stopped and resumed.result.step == 8
    assert [r["step"] for r in resumed.result.metrics] == [4, 5, 6, 7, 8]
    full = fsdp_one_rank.result
    assert losses(paused.result.metrics + resumed.result.metrics) == pytest.approx(
        losses(full.metrics), abs=LOSS_TOLERANCE
    )
    assert resumed.result.trained_tokens == full.trained_tokens


# --- One GPU: DDP's launcher path ------------------------------------------------------------


@pytest.mark.slow
def test_one_rank_through_the_launcher_trains_as_the_plain_process(
    tiny_model: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = make_spec(tiny_model, data, tmp_path / "rank", parallelism=DDP)
    ranked = train_on_ranks(spec, tmp_path / "rank", 1)
    # The plain process trains the same 4 examples a step (the rank's share).
    alone = train_alone(make_spec(tiny_model, data, tmp_path / "alone", batch_size=4))

    (probe,) = ranked.probes
    assert not probe["fsdp_enabled"] and probe["distributed_type"] == "MULTI_GPU", probe
    assert probe["backend"] == "nccl" and probe["world_size"] == 1, probe
    assert probe["device"] == "cuda:0", probe
    assert probe["linear4bit_dtypes"] == ["torch.uint8"], "unsharded runs keep uint8 storage"
    assert_trains(ranked.result, steps=8)
    assert [r["step"] for r in ranked.result.metrics] == [r["step"] for r in alone.metrics]
    assert losses(ranked.result.metrics) == pytest.approx(losses(alone.metrics), abs=LOSS_TOLERANCE)
    assert ranked.result.trained_tokens == alone.trained_tokens
    assert (
        ranked.result.reports["throughput"]["micro_batch"]
        == alone.reports["throughput"]["micro_batch"]
    )


# --- Two GPUs or more --------------------------------------------------------------------------


@two_gpus()
@pytest.mark.slow
def test_two_ranks_train_ddp_as_one_process_on_the_same_global_batch(
    tiny_model: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    ranked = train_on_ranks(make_spec(tiny_model, data, tmp_path / "ranks"), tmp_path / "ranks", 2)
    alone = train_alone(make_spec(tiny_model, data, tmp_path / "alone"))

    for probe in ranked.probes:
        assert probe["wrapper"] == "DistributedDataParallel", probe
        assert probe["backend"] == "nccl" and probe["world_size"] == 2, probe
        assert probe["device"] == f"cuda:{probe['rank']}", "each rank on its own device"
    assert ranked.steps == [4, 4]  # 16 examples, 8 a step, 2 epochs
    assert_trains(ranked.result, steps=4)
    assert losses(ranked.result.metrics) == pytest.approx(losses(alone.metrics), abs=LOSS_TOLERANCE)
    assert ranked.result.trained_tokens == alone.trained_tokens


@two_gpus()
@pytest.mark.slow
def test_two_ranks_shard_fsdp_qlora_and_resume_a_pause_to_the_uninterrupted_losses(
    tiny_model: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    full = train_on_ranks(
        make_spec(tiny_model, data, tmp_path / "full", parallelism=FSDP), tmp_path / "full", 2
    )
    for probe in full.probes:
        assert_fsdp(probe, world=2)
    assert full.steps == [4, 4]
    assert_trains(full.result, steps=4)
    alone = train_alone(make_spec(tiny_model, data, tmp_path / "alone"))
    assert full.result.metrics[0]["train_loss"] == pytest.approx(
        alone.metrics[0]["train_loss"], rel=FIRST_LOSS_REL
    )
    assert full.result.trained_tokens == alone.trained_tokens
    assert_loads_with_peft(tiny_model, data, full.result.adapter_dir)

    paused_dir = tmp_path / "paused"
    paused = train_on_ranks(
        make_spec(tiny_model, data, paused_dir, parallelism=FSDP), paused_dir, 2, "pause-1"
    )
    assert paused.steps == [1, 1], "every rank stopped at rank 0's step"
    checkpoint = paused_dir / "checkpoints" / "checkpoint-1"
    held = {p.name for p in checkpoint.iterdir()}
    assert FSDP_CHECKPOINT_FILES | {"rng_state_0.pth", "rng_state_1.pth"} <= held, sorted(held)
    resumed_dir = tmp_path / "resumed"
    resumed = train_on_ranks(
        make_spec(tiny_model, data, resumed_dir, parallelism=FSDP, resume_from=checkpoint),
        resumed_dir,
        2,
    )
    assert [r["step"] for r in resumed.result.metrics] == [2, 3, 4]
    assert losses(paused.result.metrics + resumed.result.metrics) == pytest.approx(
        losses(full.result.metrics), abs=LOSS_TOLERANCE
    )


# --- The rank program ----------------------------------------------------------------------


def rank_main(workdir: Path, mode: str) -> None:
    start_rank()  # first: die with the launcher; this rank's device
    probe_first_step(workdir)
    train_as_rank(workdir, mode)


def probe_first_step(workdir: Path) -> None:
    """Record, at this rank's first training step, what its Trainer trains: the model as
    accelerate prepared it (FSDP, DDP or bare) and the 4-bit weights' storage."""
    from transformers import Trainer

    training_step = Trainer.training_step
    probed = False

    def probe(self, model, *args, **kwargs):
        nonlocal probed
        if not probed:
            probed = True
            path = workdir / f"probe-{rank()}.json"
            path.write_text(json.dumps(describe_prepared(self, model)))
        return training_step(self, model, *args, **kwargs)

    Trainer.training_step = probe


def describe_prepared(trainer, model: torch.nn.Module) -> dict:
    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    peft_model = trainer.model
    quantizer = getattr(peft_model.get_base_model(), "hf_quantizer", None)
    storage = getattr(
        getattr(quantizer, "quantization_config", None), "bnb_4bit_quant_storage", None
    )
    decoder_layers = sum(1 for m in peft_model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    info = {
        "rank": rank(),
        "fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "distributed_type": trainer.accelerator.distributed_type.value,
        "wrapper": type(model).__name__,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "device": str(next(model.parameters()).device),  # where the prepared model sits
        "quant_storage": str(storage),
        "linear4bit_dtypes": sorted(
            {str(m.weight.dtype) for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        ),
        "decoder_layers": decoder_layers,
        "optimizer": type(trainer.optimizer).__name__,
    }
    if isinstance(model, FSDP):
        units = [m for m in FSDP.fsdp_modules(model) if m._has_params]
        flat: dict[str, set[str]] = {}
        for unit in units:
            flat.setdefault(type(unit.module).__name__, set()).add(str(unit._flat_param.dtype))
        info.update(
            sharding=model.sharding_strategy.name,
            param_dtype=str(model.mixed_precision.param_dtype),
            flat_dtypes={name: sorted(dtypes) for name, dtypes in flat.items()},
            wrapped_decoder_layers=sum(
                1
                for u in FSDP.fsdp_modules(model)
                if type(u.module).__name__ == "LlamaDecoderLayer"
            ),
            local_numel=sum(u._flat_param.numel() for u in units),
            full_numel=sum(u._flat_param._unpadded_unsharded_size.numel() for u in units),
        )
    return info


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(rank_main)(Path(sys.argv[1]), sys.argv[2])  # the error reaches RankFailed
