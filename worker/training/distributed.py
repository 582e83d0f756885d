"""Training on several devices of one host: torch's launcher (torchrun's elastic agent) starts
one process per device (a rank), each running the same training run; what the ranks agree
on at every step; and what passes between the launching process and its ranks (the spec
in, rank 0's result and any rank's failure out, as files in the run's work directory).

Lifetime. The launching process (the job process) starts the launcher with `child_env`;
the launcher calls `die_with_parent` before anything else and hands its own pid down, and
each rank calls `start_rank` (die_with_parent again) first thing. So a SIGKILLed job
process takes the launcher with it (the kernel's parent-death signal), and the launcher
its ranks, each of which torch starts in a session of its own, where no process-group kill
would reach them. A rank that fails makes torch's agent stop the others and exit non-zero;
the launcher then writes which rank failed and how (FAILURE_FILE) for `run_ranks` to raise.

Ranks. The Trainer's own DDP/FSDP does the training (accelerate reads torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Lathe adds one broadcast a step (`agree`):
whether to stop (rank 0 asked the database) and whether a time-based checkpoint is due
(rank 0's clock), so every rank stops, and saves, at the same step; and a barrier before
rank 0 hands a checkpoint on (every rank has written its part: its RNG state, its shard).

Nothing here imports torch at module level: the launcher must watch its parent before a
slow import, and the job process loads this module without training in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from app.lifetime import PARENT_PID_ENV, child_env, die_with_parent, stop_child
from worker.training.spec import (
    LoraSpec,
    QuantSpec,
    TrainingDataError,
    TrainingOptions,
    TrainingResult,
    TrainingSpec,
)

SPEC_FILE = "rank-spec.json"  # the TrainingSpec every rank trains
RESULT_FILE = "rank-result.json"  # rank 0's TrainingResult
FAILURE_FILE = "rank-failure.json"  # the launcher's account of failed ranks
DATA_ERROR_FILE = "rank-data-error.json"  # a TrainingDataError a rank raised (code, message)
PATH_FIELDS = (
    "base_model_path",
    "train_file",
    "valid_file",
    "output_dir",
    "resume_from",
    "parent_adapter",
)
# should_stop's answers as the one broadcast carries them.
STOP_CODES = {None: 0, "pause": 1, "cancel": 2}
STOP_REASONS = {code: reason for reason, code in STOP_CODES.items()}


class RankFailed(RuntimeError):
    """A training rank died or raised: which one, and how."""


# --- The launching process ---------------------------------------------------------------


def launcher_command(nproc: int, module: str, args: list[str], workdir: Path) -> list[str]:
    """torchrun's command line (through this module's launcher, which dies with its parent):
    one host, `nproc` ranks running `python -m module *args`, a rendezvous on a free local
    port (--standalone), no restarts (a failed rank fails the run)."""
    return [
        sys.executable,
        "-m",
        "worker.training.distributed",
        str(workdir / FAILURE_FILE),
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "-m",
        module,
        *args,
    ]


def run_ranks(
    nproc: int,
    module: str,
    args: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> None:
    """Run `python -m module *args` as `nproc` ranks and wait for them all; RankFailed
    (TrainingDataError when a rank found the data unusable) if any failed, or if they have
    not finished within `timeout_s` (tests: a rank stuck in a collective waits 30 minutes
    for gloo's own timeout). Interrupted here, or timed out, the launcher is stopped
    (SIGTERM: torch's agent stops its ranks), then killed."""
    failure = workdir / FAILURE_FILE
    failure.unlink(missing_ok=True)
    (workdir / DATA_ERROR_FILE).unlink(missing_ok=True)
    proc = subprocess.Popen(launcher_command(nproc, module, args, workdir), env=child_env(env))
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop_child(proc, signal.SIGTERM, grace_s=30)
        raise RankFailed(f"{nproc} training ranks did not finish within {timeout_s} s") from None
    finally:
        if proc.poll() is None:
            stop_child(proc, signal.SIGTERM, grace_s=30)
    if code == 0:
        return
    data_error = workdir / DATA_ERROR_FILE
    if data_error.is_file():  # the data, not the ranks: the job says what to change
        error = json.loads(data_error.read_text())
        raise TrainingDataError(error["code"], error["message"])
    raise RankFailed(describe_failure(failure, nproc, code))


def describe_failure(failure: Path, nproc: int, launcher_code: int) -> str:
    """What the launcher recorded about the failed ranks, in one sentence."""
    if not failure.is_file():
        how = f"signal {-launcher_code}" if launcher_code < 0 else f"status {launcher_code}"
        return f"the launcher of {nproc} training ranks ended with {how}"
    parts = []
    for rank in json.loads(failure.read_text()):
        if rank.get("signal"):
            how = f"was killed by signal {rank['signal']}"
        else:
            how = f"exited with status {rank['exitcode']}"
        message = rank.get("message")
        parts.append(f"rank {rank['rank']} of {nproc} {how}" + (f": {message}" if message else ""))
    return "; ".join(parts)


def _launcher_main(argv: list[str]) -> int:
    """`python -m worker.training.distributed FAILURE_FILE TORCHRUN_ARGS...`."""
    die_with_parent(signal.SIGKILL)  # consumes LATHE_PARENT_PID: the job process
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # what the ranks watch (start_rank)
    failure_file, torchrun_args = Path(argv[0]), argv[1:]

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as exc:
        failures = [
            {
                "rank": rank,
                "exitcode": failure.exitcode,
                "signal": failure.signal_name() if failure.exitcode < 0 else None,
                "message": _failure_message(failure.message),
            }
            for rank, failure in sorted(exc.failures.items())
        ]
        failure_file.write_text(json.dumps(failures))
        return 1
    return 0


def _failure_message(message: object) -> str | None:
    """The exception a rank raised (its error file, written by `record`), if it wrote one."""
    if isinstance(message, dict):
        message = message.get("message")
    if not isinstance(message, str) or message.startswith("To enable traceback"):
        return None
    return message.strip()[:500] or None


# --- A rank --------------------------------------------------------------------------------


def start_rank() -> None:
    """A rank's first call: die with the launcher, and on a GPU host train on this rank's
    device (of those CUDA_VISIBLE_DEVICES shows the job) before anything touches CUDA."""
    die_with_parent(signal.SIGKILL)
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    """Rank 0, or a run without ranks: the one process that reports, saves and publishes."""
    return rank() == 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(reason: str | None, checkpoint_due: bool) -> tuple[str | None, bool]:
    """Rank 0's answers, on every rank: whether to stop ("pause", "cancel", None) and
    whether a checkpoint is due. A collective: every rank calls it at every step."""
    if not _distributed():
        return reason, checkpoint_due
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else "cpu"
    answers = torch.tensor([STOP_CODES.get(reason, 2), int(checkpoint_due)], device=device)
    dist.broadcast(answers, src=0)
    stop, due = (int(v) for v in answers.tolist())
    return STOP_REASONS[stop], bool(due)


def barrier() -> None:
    """Wait for every rank (a no-op without ranks)."""
    if _distributed():
        import torch
        import torch.distributed as dist

        if _nccl():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _nccl() -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "nccl"


def ddp_backend(device: str) -> str:
    """NCCL between GPUs; gloo between CPU processes (tests, and CPU hosts)."""
    return "nccl" if device == "cuda" else "gloo"


def record_data_error(workdir: Path, exc: TrainingDataError) -> None:
    """Leave a rank's TrainingDataError for run_ranks to raise in the job process (every
    rank reads the same data, so they all fail alike; the first write is as good as any)."""
    (workdir / DATA_ERROR_FILE).write_text(json.dumps({"code": exc.code, "message": str(exc)}))


# --- What passes between the processes ---------------------------------------------------


def write_spec(spec: TrainingSpec, path: Path) -> None:
    data = dataclasses.asdict(spec)
    for name in PATH_FIELDS:
        if data[name] is not None:
            data[name] = str(data[name])
    path.write_text(json.dumps(data))


def read_spec(path: Path) -> TrainingSpec:
    data = json.loads(path.read_text())
    for name in PATH_FIELDS:
        if data[name] is not None:
            data[name] = Path(data[name])
    lora = data["lora"]
    data["lora"] = LoraSpec(**{**lora, "target_modules": tuple(lora["target_modules"])})
    data["quant"] = QuantSpec(**data["quant"])
    data["options"] = TrainingOptions(**data["options"])
    return TrainingSpec(**data)


def write_result(result: TrainingResult, path: Path) -> None:
    data = dataclasses.asdict(result)
    data["adapter_dir"] = str(result.adapter_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # whole or absent: a rank killed while writing leaves no half file


def read_result(path: Path) -> TrainingResult:
    data = json.loads(path.read_text())
    return TrainingResult(**{**data, "adapter_dir": Path(data["adapter_dir"])})


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))
