"""The prepared GPU check: Lathe's training proven and timed on CUDA in one command.

    bash bench/gpu_check.sh [--out DIR]      # on the GPU machine (after the carried wheels)
    bash bench/gpu_check.sh --dry-run        # the same parts on the CPU, tiny shapes

Parts, each in its own process group under its own time budget (a part that fails or runs
out of time is recorded and killed with its children; the next one still runs), the whole
within TOTAL_BUDGET_SECONDS:

- env: the machine (nvidia-smi, torch, the packages), and the card's bf16 matrix rate
  (an 8192^3 bf16 product, median of ten after warm-ups), the FLOP/s the targets use;
- gpu-tests: `pytest -m gpu tests/gpu` (training on CUDA in bf16 with paged_adamw_8bit,
  packed = padded, pause/resume equality, hardware detection, the memory estimate), but
  for the multi-GPU tests, which have a part of their own (last, below);
- bench-<shape>: a random-weight model of a real shape (Llama-3.2-1B, Llama-3.1-8B; vocab
  128,256; ByT5's byte tokenizer, since throughput does not depend on the weights) is
  generated on the GPU, then bench/training.py trains Lathe's trainer (max_seq_length
  2048, packed) and the tutorial recipe (bench/recipe.py: padded to 512, batch 2 x 4) on
  bench/data/chat_train.jsonl, each in a fresh child, one seed, one epoch, no evaluation.
  Figures, each with its target and pass/fail (issue 15; the throughput and memory
  targets are for the 8B shape): real tokens/s over the recipe's, at least 3x at no higher
  peak memory; the fraction of the 4·N FLOPs-per-token bound at the card's bf16 rate, at
  least 0.4; peak memory under 7 GiB; app.domain.memory's estimate within 15% of the
  measured peak;
- gpu-distributed: `pytest -m gpu tests/gpu/test_distributed_cuda.py` (ranks through torch's
  launcher on NCCL: FSDP+QLoRA through the Trainer, its pause and resume, DDP's launcher
  path; two real ranks where two GPUs are visible). Last, in the time the others leave:
  a failure or a timeout there costs none of the figures (`--only gpu-distributed` runs it
  alone).

Writes gpu-check.json, gpu-check.md, gpu-tests.xml, gpu-distributed.xml and gpu-check.log
into --out ($OUT when set, else bench/results/gpu); --dry-run writes them into a temporary
directory unless --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_SECONDS = 480  # 8 minutes on the device, all parts together
RESERVE_SECONDS = 15  # kept back for the reports
MAX_SEQ_LENGTH = 2048
SEED = 42
LEARNING_RATE = 2e-4
GIB = 2**30

# name -> LlamaConfig fields; the published configurations' shapes (rope scaling left out:
# it changes no work per token).
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128_256,
        tie_word_embeddings=True,
        rope_theta=500_000.0,
        max_position_embeddings=131_072,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128_256,
        tie_word_embeddings=False,
        rope_theta=500_000.0,
        max_position_embeddings=131_072,
    ),
}
# --dry-run: the same code on the CPU with tiny shapes of each kind (tied and untied head).
DRY_SHAPES = {
    "tiny-tied": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=MAX_SEQ_LENGTH,
    ),
    "tiny-untied": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
        max_position_embeddings=MAX_SEQ_LENGTH,
    ),
}
# Seconds per part on the device; the 8B shape's generation (16 GB written) and two 4-bit
# loads dominate.
BUDGETS = {
    "env": 30,
    "gpu-tests": 150,
    "bench-llama-3.2-1b": 85,
    "bench-llama-3.1-8b": 200,
    # At most; in fact what the parts before it leave of TOTAL_BUDGET_SECONDS.
    "gpu-distributed": 90,
}
# The dry run's are generous: its time is process start-up (torch, transformers, TRL
# imported by each part and each training child), slow on a busy 2-core machine.
DRY_BUDGETS = {
    "env": 120,
    "gpu-tests": 240,
    "bench-tiny-tied": 360,
    "bench-tiny-untied": 360,
    "gpu-distributed": 100,
}
DRY_TOTAL_BUDGET_SECONDS = 1200
DRY_CONVERSATIONS = 8  # of chat_train.jsonl, per dry-run bench
# Conversations of chat_train.jsonl (512 in all) each side trains on, one epoch: the recipe
# pads each to 512 tokens, so at 8B its share is what fits the part's budget beside the
# model's generation and two 4-bit loads.
CONVERSATIONS = {"llama-3.2-1b": 256, "llama-3.1-8b": 128}
# Targets (issue 15, item 3).
SPEEDUP_TARGET = 3.0
FLOPS_FRACTION_TARGET = 0.40
PEAK_GIB_TARGET_8B = 7.0
ESTIMATE_TOLERANCE = 0.15


# --- parts (each runs in its own `python -m bench.gpu_check --part ...` process) ---------


def part_env(device: str, workdir: Path) -> dict:
    import importlib.metadata
    import platform

    import torch

    packages = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl"):
        packages[name] = importlib.metadata.version(name)
    for name in ("liger-kernel", "triton", "flash-attn"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info = {"python": platform.python_version(), "packages": packages, "device": device}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    if device != "cuda":
        info["bf16_flops"] = None
        return info
    info["gpu"] = torch.cuda.get_device_name(0)
    info["cuda"] = torch.version.cuda
    info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    info["bf16_flops"] = 2 * n**3 / times[len(times) // 2]
    return info


DISTRIBUTED_TESTS = "tests/gpu/test_distributed_cuda.py"
# Test parts: the pytest arguments each runs (its JUnit file is named for the part).
TEST_PARTS = {
    # tests/gpu and the levers' own GPU tests, but for the multi-GPU ones.
    "gpu-tests": ["tests/gpu", "tests/worker/test_levers_gpu.py", f"--ignore={DISTRIBUTED_TESTS}"],
    "gpu-distributed": [DISTRIBUTED_TESTS],
}


def part_tests(name: str, device: str, workdir: Path, out: Path) -> dict:
    """pytest -m gpu on the part's tests (TEST_PARTS); --confcutdir keeps
    tests/conftest.py (Postgres, S3) out.
    Its output goes straight to the log, so a part killed at its budget still shows which
    test it was in; the summary comes from the JUnit file."""
    import xml.etree.ElementTree as ET

    junit = out / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", *TEST_PARTS[name], "-v", "-rA"]
    command += ["--confcutdir=tests/gpu", "-p", "no:cacheprovider", f"--basetemp={workdir}/pt"]
    command += [f"--junitxml={junit}", "--durations=0"]
    env = {**os.environ, "GPU_CHECK_OUT": str(out)}  # memory-estimate.json goes there
    sys.stdout.flush()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=sys.stdout, stderr=sys.stdout)
    counts = {}
    if junit.exists():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no JUnit report"
    return {
        "returncode": done.returncode,
        "summary": summary,
        "counts": counts,
        "passed": done.returncode == 0,
    }


def build_model(name: str, device: str):
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    from app.config import DEFAULT_CHAT_TEMPLATE

    shapes = {**SHAPES, **DRY_SHAPES}
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    config = LlamaConfig(
        **shapes[name],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(SEED)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model, tokenizer


def free_gpu() -> None:
    """What generation left cached goes back before the children train (they measure their
    own allocations; this only keeps the card's memory free for them)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_make_model(name: str, device: str, path: Path) -> dict:
    from worker.training.tiny_model import ensure_model

    started = time.perf_counter()
    ensure_model(path, lambda: build_model(name, device))
    return {"path": str(path), "seconds": time.perf_counter() - started}


def training_subset(path: Path, conversations: int | None) -> Path:
    from bench.training import TRAIN_FILE

    if conversations is None:
        return TRAIN_FILE
    lines = TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:conversations]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def model_shape(model_path: Path):
    from app.domain.memory import ModelShape

    config = json.loads((model_path / "config.json").read_text())
    kw = dict(
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        vocab_size=config["vocab_size"],
        intermediate_size=config["intermediate_size"],
    )
    # Real parameter count: q, o (hidden²), k, v (hidden x kv heads' width), the MLP, the
    # embeddings and, untied, the output head; norms are too small to count.
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    h = config["hidden_size"]
    block = 2 * h * h + 2 * h * kv + 3 * h * config["intermediate_size"]
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    parameters = config["num_hidden_layers"] * block + embeddings
    # 4·N counts the matrices a token goes through: every block and the output head, not
    # the embedding lookup.
    matmul_parameters = config["num_hidden_layers"] * block + config["vocab_size"] * h
    return ModelShape(parameters=parameters, **kw), matmul_parameters


def target(value: float | None, op: str, bound: float, applies: bool = True) -> dict:
    if value is None:
        ok = None
    elif op == ">=":
        ok = value >= bound
    elif op == "<=":
        ok = value <= bound
    else:  # "abs<=": a relative error
        ok = abs(value) <= bound
    return {"value": value, "target": f"{op} {bound}", "applies": applies, "pass": ok}


def part_bench(name: str, device: str, workdir: Path, dry_run: bool, bf16_flops: float | None):
    from app.config import DEFAULT_CHAT_TEMPLATE
    from app.domain.memory import adapted_matrices, estimate_memory_gb
    from bench import training
    from worker.training.data import load_examples, load_tokenizer
    from worker.training.spec import LoraSpec

    model_path = workdir / name
    made = part_make_model(name, device, model_path)
    free_gpu()
    conversations = DRY_CONVERSATIONS if dry_run else CONVERSATIONS.get(name)
    train_file = training_subset(workdir / "train.jsonl", conversations)
    tokenizer = load_tokenizer(model_path, DEFAULT_CHAT_TEMPLATE)
    lengths = [
        len(e["input_ids"])
        for e in load_examples(train_file, "chat", tokenizer, MAX_SEQ_LENGTH).examples
    ]
    real_tokens = sum(lengths)
    config = {
        "device": device,
        "model_path": str(model_path),
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "epochs": 1,
        "learning_rate": training.TINY_LEARNING_RATE if dry_run else LEARNING_RATE,
        "seed": SEED,
        "max_seq_length": MAX_SEQ_LENGTH,
        "train_file": str(train_file),
        "eval": False,
    }
    runs = {}
    for side in ("lathe", "recipe"):  # each side's failure is recorded; the other still runs
        try:
            runs[side] = training.run_child(side, config, workdir, module="bench.training")
            runs[side]["tokens_per_second"] = real_tokens / runs[side]["train_seconds"]
        except subprocess.CalledProcessError as error:
            runs[side] = {"error": f"exit status {error.returncode} (gpu-check.log)"}
    shape, matmul_parameters = model_shape(model_path)
    lora = LoraSpec()
    # As app.services.jobs.job_memory_gb estimates a job (the figure that routes it): keep
    # the two alike when the service passes more (micro_batch_tokens, packed, fused_loss).
    estimate = estimate_memory_gb(
        shape,
        lora_r=lora.r,
        target_modules=adapted_matrices(list(lora.target_modules)),
        batch_size=training.EFFECTIVE_BATCH,
        seq_len=MAX_SEQ_LENGTH,
        gradient_checkpointing=True,
        attention="flash_attention_2",  # job_memory_gb's: no mask term yet
    )
    lathe, recipe = runs["lathe"], runs["recipe"]
    both = "error" not in lathe and "error" not in recipe
    peak_gib = lathe["peak_memory_bytes"] / GIB if "error" not in lathe else None
    flops_fraction = (
        lathe["tokens_per_second"] * 4 * matmul_parameters / bf16_flops
        if bf16_flops and peak_gib is not None
        else None
    )
    is_8b = name in ("llama-3.1-8b", "tiny-untied")
    measured = device == "cuda"  # on the CPU peak memory is the RSS, not what is estimated
    figures = {
        "tokens_per_second_ratio": target(
            lathe["tokens_per_second"] / recipe["tokens_per_second"] if both else None,
            ">=",
            SPEEDUP_TARGET,
            is_8b,
        ),
        "peak_memory_ratio": target(
            lathe["peak_memory_bytes"] / recipe["peak_memory_bytes"] if both else None,
            "<=",
            1.0,
            is_8b,
        ),
        "flops_fraction": target(flops_fraction, ">=", FLOPS_FRACTION_TARGET, is_8b),
        "peak_memory_gib": target(peak_gib, "<=", PEAK_GIB_TARGET_8B, is_8b),
        "memory_estimate_error": target(
            (estimate.total_gb - peak_gib) / peak_gib if peak_gib else None,
            "abs<=",
            ESTIMATE_TOLERANCE,
            measured,
        ),
    }
    return {
        "shape": name,
        "parameters": shape.parameters,
        "matmul_parameters": matmul_parameters,
        "model_seconds": made["seconds"],
        "real_tokens": real_tokens,
        "examples": len(lengths),
        "max_seq_length": MAX_SEQ_LENGTH,
        "runs": runs,
        "memory_estimate_gb": {
            "total": estimate.total_gb,
            "base_weights": estimate.base_weights_gb,
            "lora": estimate.lora_gb,
            "activations": estimate.activations_gb,
            "overhead": estimate.overhead_gb,
            "batch_size": training.EFFECTIVE_BATCH,
            "seq_len": MAX_SEQ_LENGTH,
        },
        "figures": figures,
    }


# --- the parent -------------------------------------------------------------------------


def run_group(command: list[str], timeout: float | None, log=None) -> dict:
    """Run `command` in its own process group; on timeout kill the whole group (a bench's
    training children included, which hold the GPU)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        timed_out = True
    if log is not None:
        log.write(f"\n===== {' '.join(command[2:])} =====\n{output}")
        log.flush()
    return {
        "returncode": process.returncode,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - started,
        "tail": output[-2000:],
    }


def run_part(name: str, args: list[str], budget: float, workdir: Path, log) -> dict:
    result_path = workdir / f"{name}.json"
    command = [sys.executable, "-m", "bench.gpu_check", "--part", name, str(result_path), *args]
    ran = run_group(command, timeout=budget, log=log)
    status = "timed out" if ran["timed_out"] else ("ok" if ran["returncode"] == 0 else "failed")
    record = {"status": status, "seconds": ran["seconds"], "budget_seconds": budget}
    if result_path.exists():
        record["result"] = json.loads(result_path.read_text())
    if status != "ok":
        record["error_tail"] = ran["tail"]
    if name in TEST_PARTS and status == "ok" and not record["result"]["passed"]:
        record["status"] = "failed"
    print(f"gpu-check: {name}: {record['status']} in {ran['seconds']:.0f} s", flush=True)
    return record


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["parts"].get("env", {}).get("result", {})
    lines = [
        f"# GPU check, {report['date']}" + (" (dry run, CPU)" if report["dry_run"] else ""),
        "",
        f"Device {env.get('gpu', report['device'])}; bf16 matrix rate "
        f"{fmt(env.get('bf16_flops') and env['bf16_flops'] / 1e12, '.0f')} TFLOP/s; "
        f"python {env.get('python')}; "
        + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v),
        "",
        "| part | status | seconds (budget) |",
        "| --- | --- | --- |",
    ]
    for name, part in report["parts"].items():
        lines.append(
            f"| {name} | {part['status']} | {part['seconds']:.0f} ({part['budget_seconds']:.0f}) |"
        )
    for name in TEST_PARTS:
        tests = report["parts"].get(name, {}).get("result")
        if tests:
            lines += ["", f"{name}: {tests['summary']}"]
    lines += [
        "",
        "| shape | trainer | real tokens/s | train s | peak MiB | estimate GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    benches = [
        p["result"] for n, p in report["parts"].items() if n.startswith("bench-") and "result" in p
    ]
    for b in benches:
        for side, r in b["runs"].items():
            if "error" in r:
                lines.append(f"| {b['shape']} | {side} | failed: {r['error']} | | | |")
                continue
            estimate = fmt(b["memory_estimate_gb"]["total"]) if side == "lathe" else ""
            lines.append(
                f"| {b['shape']} | {side} | {r['tokens_per_second']:,.0f} "
                f"| {r['train_seconds']:.1f} | {r['peak_memory_bytes'] / 2**20:,.0f} | {estimate} |"
            )
    lines += [
        "",
        "| shape | figure | value | target | applies | pass |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in benches:
        for figure, t in b["figures"].items():
            lines.append(
                f"| {b['shape']} | {figure} | {fmt(t['value'], '.3f')} | {t['target']} "
                f"| {'yes' if t['applies'] else 'no'} | {t['pass']} |"
            )
    lines += ["", f"Total {report['seconds']:.0f} s of {report['budget_seconds']} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few steps")
    parser.add_argument("--out", type=Path, help="results folder (default $OUT)")
    parser.add_argument("--only", help="comma-separated part names (default all)")
    parser.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.part:
        name, result_path, device, workdir, dry_run, flops = args.part[:6]
        workdir, dry = Path(workdir), dry_run == "1"
        if name == "env":
            result = part_env(device, workdir)
        elif name in TEST_PARTS:
            result = part_tests(name, device, workdir, Path(args.part[6]))
        else:
            bf16 = float(flops) if flops != "none" else None
            result = part_bench(name.removeprefix("bench-"), device, workdir, dry, bf16)
        Path(result_path).write_text(json.dumps(result, indent=2))
        return

    device = "cpu" if args.dry_run else "cuda"
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        out = (
            Path(tempfile.mkdtemp(prefix="gpu-check-"))
            if args.dry_run
            else ROOT / "bench/results/gpu"
        )
    out.mkdir(parents=True, exist_ok=True)
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    total = DRY_TOTAL_BUDGET_SECONDS if args.dry_run else TOTAL_BUDGET_SECONDS
    only = set(args.only.split(",")) if args.only else None
    started = time.perf_counter()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": args.dry_run,
        "device": device,
        "budget_seconds": total,
        "parts": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="gpu-check-work-") as tmp,
        open(out / "gpu-check.log", "w") as log,
    ):
        flops = "none"
        for name, budget in budgets.items():
            if only and name not in only:
                continue
            left = total - RESERVE_SECONDS - (time.perf_counter() - started)
            if left < 10:
                report["parts"][name] = {
                    "status": "skipped: no time left",
                    "seconds": 0,
                    "budget_seconds": 0,
                }
                continue
            workdir = Path(tmp) / name
            workdir.mkdir()
            extra = [str(out)] if name in TEST_PARTS else []
            common = [device, str(workdir), "1" if args.dry_run else "0", flops, *extra]
            record = run_part(name, common, min(budget, left), workdir, log)
            report["parts"][name] = record
            if name == "env" and record.get("result", {}).get("bf16_flops"):
                flops = str(record["result"]["bf16_flops"])
            shutil_rmtree(workdir)  # a shape's model (16 GB for 8B) goes before the next
    report["seconds"] = time.perf_counter() - started
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu-check: wrote {out}/gpu-check.json, gpu-check.md, the JUnit files, gpu-check.log")


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
