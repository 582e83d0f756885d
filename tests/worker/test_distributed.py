"""Training on several ranks (worker.training.distributed), for real: torch's launcher starts
two processes that train 4-bit QLoRA on the tiny model with the gloo backend, the CPU
standing in for two GPUs.

The ranks run this module (`python -m tests.worker.test_distributed WORKDIR MODE`, at the
bottom): rank 0 with hooks that pause when told and copy each checkpoint, the others with
silent hooks, as worker.job_rank gives a job's ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.training.distributed import (
    RESULT_FILE,
    SPEC_FILE,
    RankFailed,
    is_main_rank,
    rank,
    read_result,
    read_spec,
    run_ranks,
    start_rank,
    write_result,
    write_spec,
)
from worker.training.spec import (
    FSDP,
    LoraSpec,
    TrainingOptions,
    TrainingResult,
    TrainingSpec,
)
from worker.training.tiny_model import ensure_tiny_random_llama

REPO = Path(__file__).resolve().parents[2]
PREFERENCES = REPO / "app" / "data"
RANK_PROGRAM = "tests.worker.test_distributed"
QUESTIONS = [
    ("Say hi.", "Hi!"),
    ("What colour is the sky?", "Blue."),
    ("What is 2 + 2?", "4."),
    ("Name a fruit.", "Apple."),
]
# Two ranks against one process on the same global batch: measured equal to the last bit
# on this machine (max difference 0.0); the tolerance leaves room for another order of
# float additions in gloo's all-reduce on other CPUs.
LOSS_TOLERANCE = 1e-4
# A rank left behind in a collective (the others stopped) would wait 30 minutes for gloo.
RUN_TIMEOUT = 300


def write_chat_jsonl(path: Path, repeats: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeats):
            for question, answer in QUESTIONS:
                messages = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_chat_jsonl(root / "train.jsonl", 8), write_chat_jsonl(root / "valid.jsonl", 1)


def make_spec(tiny_model: Path, data: tuple[Path, Path], workdir: Path, **changes) -> TrainingSpec:
    """32 examples, a global batch of 8: 4 steps an epoch, 2 epochs; a validation loss on
    every row; no dropout, so that every run of the same steps is deterministic."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = TrainingSpec(
        base_model_path=tiny_model,
        chat_template=None,
        data_format="chat",
        train_file=data[0],
        valid_file=data[1],
        output_dir=workdir / "run",
        n_epochs=2,
        batch_size=8,
        learning_rate=1e-2,
        max_seq_length=256,
        seed=0,
        device="cpu",
        lora=LoraSpec(dropout=0.0),
        options=TrainingOptions(eval_steps=1, sample_max_new_tokens=0),
    )
    return dataclasses.replace(spec, **changes)


def rank_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def train_on_two_ranks(spec: TrainingSpec, workdir: Path, mode: str = "train") -> TrainingResult:
    write_spec(dataclasses.replace(spec, world_size=2), workdir / SPEC_FILE)
    run_ranks(2, RANK_PROGRAM, [str(workdir), mode], workdir, env=rank_env(), timeout_s=RUN_TIMEOUT)
    return read_result(workdir / RESULT_FILE)


def steps_of_ranks(workdir: Path) -> list[int]:
    return [json.loads((workdir / f"rank-{r}.json").read_text())["step"] for r in range(2)]


def losses(rows: list[dict]) -> list[float]:
    return [row[key] for row in rows for key in ("train_loss", "valid_loss")]


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_model: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingResult, Path]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return train_on_two_ranks(make_spec(tiny_model, data, workdir), workdir), workdir


# --- What crosses between the processes ------------------------------------------------


def test_a_spec_crosses_to_the_ranks_whole(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path / "model",
        (tmp_path / "train.jsonl", tmp_path / "valid.jsonl"),
        tmp_path,
        resume_from=tmp_path / "resume",
        world_size=2,
        parallelism=FSDP,
        lora=LoraSpec(r=4, target_modules=("q_proj", "v_proj")),
    )
    write_spec(spec, tmp_path / SPEC_FILE)
    assert read_spec(tmp_path / SPEC_FILE) == spec


def test_the_global_batch_must_split_over_the_ranks(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, (tmp_path, tmp_path), tmp_path, batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="does not split over 4"):
        _ = spec.rank_batch_size
    assert dataclasses.replace(spec, world_size=3).rank_batch_size == 2


# --- DDP ---------------------------------------------------------------------------------


def test_two_ranks_train_as_one_process_on_the_same_global_batch(
    tiny_model: Path,
    data: tuple[Path, Path],
    tmp_path: Path,
    uninterrupted: tuple[TrainingResult, Path],
) -> None:
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks

    single = run_training(make_spec(tiny_model, data, tmp_path / "single"), TrainingHooks())
    ranks, workdir = uninterrupted

    assert [r["step"] for r in ranks.metrics] == [r["step"] for r in single.metrics]
    assert ranks.step == single.step == 8
    assert ranks.trained_tokens == single.trained_tokens, "tokens of both ranks counted"
    assert losses(ranks.metrics) == pytest.approx(losses(single.metrics), abs=LOSS_TOLERANCE)
    # Each rank trained half of every batch of 8, in one micro-batch; the single process
    # trained its 8 in two of 4.
    assert single.reports["throughput"]["gradient_accumulation_steps"] == 2
    assert ranks.reports["throughput"]["micro_batch"] == 4
    assert ranks.reports["throughput"]["gradient_accumulation_steps"] == 1
    assert steps_of_ranks(workdir) == [8, 8]
    adapter = ranks.adapter_dir
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter.iterdir()
    }


def test_a_pause_on_rank_0_stops_every_rank_and_two_ranks_resume_from_its_checkpoint(
    tiny_model: Path,
    data: tuple[Path, Path],
    tmp_path: Path,
    uninterrupted: tuple[TrainingResult, Path],
) -> None:
    full, _ = uninterrupted
    # Rank 0's should_stop says "pause" at its third poll (step 3, mid-epoch); rank 1's
    # never does, and follows the broadcast.
    paused_dir = tmp_path / "paused"
    paused = train_on_two_ranks(make_spec(tiny_model, data, paused_dir), paused_dir, "pause-3")
    assert paused.stopped and paused.step == 3
    assert steps_of_ranks(paused_dir) == [3, 3], "every rank stopped at rank 0's step"
    checkpoint = paused_dir / "checkpoints" / "checkpoint-3"
    held = {p.name for p in checkpoint.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
    } <= held, "each rank's RNG state is in before rank 0 hands the checkpoint on"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3

    resumed_dir = tmp_path / "resumed"
    resumed = train_on_two_ranks(
        make_spec(tiny_model, data, resumed_dir, resume_from=checkpoint), resumed_dir
    )
    assert not resumed.stopped and resumed.step == 8
    assert [r["step"] for r in resumed.metrics] == [4, 5, 6, 7, 8]
    assert losses(paused.metrics + resumed.metrics) == pytest.approx(
        losses(full.metrics), abs=LOSS_TOLERANCE
    )
    assert resumed.trained_tokens == full.trained_tokens

    # The same checkpoint resumes in a single process too (the adapter and optimizer are
    # whole; the batches are global), with a warning for the RNG state of a rank it lacks.
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks

    alone = run_training(
        make_spec(tiny_model, data, tmp_path / "alone", resume_from=checkpoint), TrainingHooks()
    )
    assert [r["step"] for r in alone.metrics] == [4, 5, 6, 7, 8]
    assert losses(paused.metrics + alone.metrics) == pytest.approx(
        losses(full.metrics), abs=LOSS_TOLERANCE
    )


def test_two_ranks_train_dpo_as_one_process(tiny_model: Path, tmp_path: Path) -> None:
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks

    # 40 pairs, a global batch of 8: 5 steps; the reference is the adapter switched off.
    spec = make_spec(
        tiny_model,
        (PREFERENCES / "sample_preference.jsonl", PREFERENCES / "sample_preference_valid.jsonl"),
        tmp_path / "single",
        data_format="preference",
        method="dpo",
        n_epochs=1,
        options=TrainingOptions(sample_max_new_tokens=0),
    )
    single = run_training(spec, TrainingHooks())
    workdir = tmp_path / "ranks"
    workdir.mkdir()
    ranks = train_on_two_ranks(dataclasses.replace(spec, output_dir=workdir / "run"), workdir)

    assert [r["step"] for r in ranks.metrics] == [r["step"] for r in single.metrics]
    for key in ("train_loss", "train_reward_margin", "train_reward_accuracy"):
        assert [r.get(key) for r in ranks.metrics] == pytest.approx(
            [r.get(key) for r in single.metrics], abs=LOSS_TOLERANCE
        ), key
    assert ranks.trained_tokens == single.trained_tokens


def test_a_failed_rank_fails_the_run_naming_the_rank_and_its_error(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, (tmp_path, tmp_path), tmp_path)
    with pytest.raises(RankFailed, match=r"rank 1 of 2 exited with status 1: .*rank 1 gives up"):
        train_on_two_ranks(spec, tmp_path, "crash-1")
    assert not (tmp_path / RESULT_FILE).exists()


def test_killing_the_launching_process_leaves_no_rank_behind(tmp_path: Path) -> None:
    write_spec(make_spec(tmp_path, (tmp_path, tmp_path), tmp_path), tmp_path / SPEC_FILE)
    launching = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path;"
            "from worker.training.distributed import run_ranks;"
            f"run_ranks(2, {RANK_PROGRAM!r}, [sys.argv[1], 'hang'], Path(sys.argv[1]))",
            str(tmp_path),
        ],
        env=rank_env(),
        cwd=REPO,
    )
    started: list[int] = []
    try:
        pid_files = [tmp_path / f"rank-{r}.pid" for r in range(2)]
        deadline = time.monotonic() + 120
        while not all(p.is_file() for p in pid_files):
            assert launching.poll() is None, "the launching process ended early"
            assert time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.1)
        launcher = psutil.Process(launching.pid).children()
        ranks = [int(p.read_text()) for p in pid_files]
        started = [c.pid for c in launcher] + ranks
        assert len(launcher) == 1 and all(alive(pid) for pid in ranks)

        launching.send_signal(signal.SIGKILL)
        launching.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in started):
            assert time.monotonic() < deadline, [p for p in started if alive(p)]
            time.sleep(0.1)
    finally:
        if launching.poll() is None:
            launching.kill()
            launching.wait()
        for pid in started:  # only after a failed assertion: never leave them running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running: a zombie (exited, its parent gone or not yet reaping) is not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- FSDP + QLoRA ------------------------------------------------------------------------


def test_sharded_4bit_weights_are_stored_in_the_compute_dtype(tiny_model: Path) -> None:
    import bitsandbytes as bnb

    from worker.training.qlora_model import decoder_layer_classes, load_base_for_training
    from worker.training.spec import QuantSpec

    def storage(sharded: bool) -> tuple[set[torch.dtype], torch.nn.Module]:
        model = load_base_for_training(tiny_model, QuantSpec(), "cpu", sharded=sharded).model
        dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        return dtypes, model

    unsharded, _ = storage(False)
    sharded, model = storage(True)
    assert unsharded == {torch.uint8}
    assert sharded == {torch.float32}, "the CPU's compute dtype: one dtype FSDP can flatten"
    assert decoder_layer_classes(model) == ["LlamaDecoderLayer"]


def test_a_sharded_bfloat16_model_has_one_dtype_for_fsdp_to_flatten(tiny_model: Path) -> None:
    """As on a GPU: bfloat16 compute, so the 4-bit weights are stored as bfloat16, and
    what peft's preparation upcast to float32 (norms, embeddings, head) comes back to
    bfloat16; mixed, FSDP refuses the block ("Must flatten tensors with uniform dtype")."""
    import bitsandbytes as bnb

    from worker.training.qlora_model import load_base_for_training
    from worker.training.spec import QuantSpec

    bf16 = QuantSpec(compute_dtype="bfloat16")
    model = load_base_for_training(tiny_model, bf16, "cpu", sharded=True).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(
        isinstance(m.weight, bnb.nn.Params4bit)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    unsharded = load_base_for_training(tiny_model, bf16, "cpu").model
    norms = {p.dtype for name, p in unsharded.named_parameters() if "norm" in name}
    assert norms == {torch.float32}, "unsharded, peft keeps its float32 norms"


def test_fsdp_wraps_the_decoder_layers_on_gpus_only(tiny_model: Path, tmp_path: Path) -> None:
    from worker.training.qlora_model import add_lora, load_base_for_training
    from worker.training.spec import QuantSpec
    from worker.training.trainer_setup import distributed_arguments

    model = add_lora(load_base_for_training(tiny_model, QuantSpec(), "cpu").model, LoraSpec())
    spec = make_spec(tiny_model, (tmp_path, tmp_path), tmp_path, world_size=2, parallelism=FSDP)
    on_gpus = distributed_arguments(spec, "cuda", model)
    assert on_gpus["fsdp"] == "full_shard auto_wrap"
    assert on_gpus["ddp_backend"] == "nccl"
    assert on_gpus["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert on_gpus["fsdp_config"]["use_orig_params"] is True
    on_cpus = distributed_arguments(spec, "cpu", model)
    assert "fsdp" not in on_cpus and on_cpus["ddp_backend"] == "gloo"
    assert distributed_arguments(dataclasses.replace(spec, world_size=1), "cuda", model) == {}


def test_two_ranks_take_an_fsdp_step_on_the_sharded_4bit_model(tmp_path: Path, tiny_model) -> None:
    """The Trainer cannot run FSDP on the CPU (accelerate enables it on accelerator devices
    only), so this wraps the QLoRA model with torch's FSDP as the Trainer would (decoder
    layers and LoRA layers apart, use_orig_params) and takes one step on two gloo ranks:
    the 4-bit weights shard, and the loss is the unsharded model's."""
    write_spec(make_spec(tiny_model, (tmp_path, tmp_path), tmp_path), tmp_path / SPEC_FILE)
    run_ranks(
        2,
        RANK_PROGRAM,
        [str(tmp_path), "fsdp-step"],
        tmp_path,
        env=rank_env(),
        timeout_s=RUN_TIMEOUT,
    )
    steps = [json.loads((tmp_path / f"fsdp-{r}.json").read_text()) for r in range(2)]

    from worker.training.qlora_model import add_lora, load_base_for_training
    from worker.training.spec import QuantSpec

    torch.manual_seed(0)
    base = load_base_for_training(tiny_model, QuantSpec(), "cpu", sharded=True).model
    model = add_lora(base, LoraSpec(dropout=0.0))
    ids = torch.tensor([FSDP_STEP_IDS])
    loss = model(input_ids=ids, labels=ids).loss.item()
    for step in steps:
        assert step["loss"] == pytest.approx(loss, abs=1e-5)
        assert step["lora_grads"] > 0, "the adapters got gradients through the 4-bit layers"
        # Each rank holds about half of every flattened layer, 4-bit weights included.
        assert 0 < step["local_numel"] < step["full_numel"]


FSDP_STEP_IDS = [10, 20, 30, 40, 50, 60]


# --- The rank program --------------------------------------------------------------------


def rank_main(workdir: Path, mode: str) -> None:
    start_rank()
    if mode == "hang":  # a rank that runs until killed
        (workdir / f"rank-{rank()}.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(1)
    if mode == "crash-1":  # rank 1 fails; rank 0 would train on, but is stopped
        if rank() == 1:
            raise RuntimeError("rank 1 gives up")
        while True:
            time.sleep(1)
    if mode == "fsdp-step":
        return fsdp_step(workdir)
    train_as_rank(workdir, mode)


def train_as_rank(workdir: Path, mode: str) -> None:
    """This rank's part of the run the spec in `workdir` describes; rank 0 pauses at its
    N-th poll with mode "pause-N" and copies each checkpoint (tests/gpu uses it too)."""
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks

    spec = read_spec(workdir / SPEC_FILE)
    hooks = TrainingHooks()
    if is_main_rank():
        pause_at = int(mode.split("-")[1]) if mode.startswith("pause-") else None
        polls = 0

        def should_stop() -> str | None:
            nonlocal polls
            polls += 1
            return "pause" if pause_at is not None and polls >= pause_at else None

        def on_checkpoint(step: int, path: Path, metrics: dict) -> None:
            shutil.copytree(path, workdir / "checkpoints" / path.name)

        hooks = TrainingHooks(should_stop=should_stop, on_checkpoint=on_checkpoint)
    result = run_training(spec, hooks)
    (workdir / f"rank-{rank()}.json").write_text(json.dumps({"step": result.step}))
    if is_main_rank():
        write_result(result, workdir / RESULT_FILE)


def fsdp_step(workdir: Path) -> None:
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    from worker.training.qlora_model import add_lora, decoder_layer_classes, load_base_for_training
    from worker.training.spec import QuantSpec

    spec = read_spec(workdir / SPEC_FILE)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = load_base_for_training(spec.base_model_path, QuantSpec(), "cpu", sharded=True).model
    model = add_lora(base, LoraSpec(dropout=0.0))
    full_numel = sum(p.numel() for p in model.parameters())
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(decoder_layer_classes(model))
    wrapped = FullyShardedDataParallel(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )
    ids = torch.tensor([FSDP_STEP_IDS])
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_grads = sum(
        1 for name, p in wrapped.named_parameters() if "lora_" in name and p.grad is not None
    )
    local_numel = sum(p.numel() for p in wrapped.parameters())
    (workdir / f"fsdp-{rank()}.json").write_text(
        json.dumps(
            {
                "loss": loss.item(),
                "lora_grads": lora_grads,
                "local_numel": local_numel,
                "full_numel": full_numel,
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(rank_main)(Path(sys.argv[1]), sys.argv[2])  # the error reaches RankFailed
