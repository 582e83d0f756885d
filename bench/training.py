"""Lathe's trainer against the tutorial recipe (bench/recipe.py): `make bench`.

    python -m bench.training --device cpu|cuda [--model PATH] [--epochs N] [--seeds 42,1,2]

Both train the same 4-bit base with the same LoRA settings, learning rate, epochs and
seeds on bench/data/chat_train.jsonl at the same effective batch (Lathe's batch_size 8,
the recipe's 2 x 4 accumulation), each side once per seed in a fresh child process, so its
peak memory is its own. Measured: real (non-pad) tokens per second of training (tokens /
the time from the Trainer's train-begin to the saved adapter; model loading excluded), the
child's wall time to that point, peak memory (the child's peak RSS on the CPU, torch's
peak allocation on a GPU), the last logged train loss, and the eval loss on
bench/data/chat_valid.jsonl from one evaluator shared by both. The table shows median
times, mean losses and the highest peak memory over the seeds; the JSON every seed's
figures. Writes bench/results/training-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA / "chat_train.jsonl"
VALID_FILE = DATA / "chat_valid.jsonl"
# Each side trains once per seed; at this size a seed moves the eval loss by ~0.05, more
# than the two trainers differ, so one seed alone cannot tell which learns better: the
# table gives the mean of the per-seed differences and its standard error.
SEEDS = (42, 1, 2, 3, 4)
MAX_SEQ_LENGTH = 1024  # Lathe's; the recipe's is 512, and no example is longer
EFFECTIVE_BATCH = 8
# What Lathe's config gives each base model (app/config.py): the tiny random model needs a
# high rate for its loss to fall in a few hundred steps; real models get the usual 2e-4.
TINY_LEARNING_RATE = 1e-2
MODEL_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3


# --- in the child process ---------------------------------------------------------------


class Marks:
    """Time and memory at training's begin and end (the adapter saved), as each side marks them.

    Memory: on a GPU what torch has allocated (both sides reset the peak right before
    training, so the peak is training's); on the CPU the process's resident set, whose peak
    (ru_maxrss) covers the whole process up to the end of training.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.seen: dict[str, dict] = {}

    def __call__(self, name: str) -> None:
        import torch

        if self.device == "cuda":
            memory = {
                "memory_bytes": torch.cuda.memory_allocated(),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            }
        else:
            rss = Path("/proc/self/statm").read_text().split()[1]
            memory = {
                "memory_bytes": int(rss) * os.sysconf("SC_PAGE_SIZE"),
                "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        self.seen[name] = {"time": time.perf_counter(), **memory}

    def figures(self) -> dict:
        begin, end = self.seen["begin"], self.seen["end"]
        return {
            "train_seconds": end["time"] - begin["time"],
            "total_seconds": end["time"] - self.started,  # the child's imports, load, training
            "memory_at_train_begin_bytes": begin["memory_bytes"],
            "peak_memory_bytes": end["peak_memory_bytes"],
        }


def eval_loss(config: dict, adapter_dir: Path | None) -> float:
    """Token-weighted cross-entropy over the assistant tokens of the validation set.

    The same for both sides: base reloaded in 4-bit as Lathe loads it, the adapter on top,
    eval mode, no gradients, one unpadded conversation at a time. Without an adapter: the
    base model's loss, where training starts from.
    """
    import torch
    from peft import PeftModel

    from worker.training.data import IGNORE_INDEX, load_examples, load_tokenizer
    from worker.training.qlora_model import load_quantized_base
    from worker.training.spec import QuantSpec

    device = config["device"]
    model_path = Path(config["model_path"])
    tokenizer = load_tokenizer(model_path, config["chat_template"])
    examples = load_examples(VALID_FILE, "chat", tokenizer, MAX_SEQ_LENGTH).examples
    base = load_quantized_base(model_path, QuantSpec(), device)
    model = (base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            input_ids = torch.tensor([e["input_ids"]], device=model.device)
            labels = torch.tensor(e["labels"][1:], device=model.device)
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(
                logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def train_lathe(config: dict, output_dir: Path, mark: Marks, **fields) -> dict:
    """Lathe's trainer on `config`'s model, seed and rate, marking train begin and end: the
    required fields, batch_size and `fields` (data_format, train_file; method, beta);
    everything else Lathe's default. No validation file: neither side evaluates while
    training, the common evaluator does afterwards. Shared with bench/dpo.py."""
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks, TrainingSpec

    def on_message(message: str) -> None:
        if message.startswith("Training for"):  # the Trainer's on_train_begin
            mark("begin")
        elif message.startswith("Saved the adapter"):
            mark("end")

    spec = TrainingSpec(
        base_model_path=Path(config["model_path"]),
        chat_template=config["chat_template"],
        valid_file=None,
        output_dir=output_dir,
        n_epochs=config["epochs"],
        batch_size=EFFECTIVE_BATCH,
        learning_rate=config["learning_rate"],
        max_seq_length=config.get("max_seq_length", MAX_SEQ_LENGTH),
        seed=config["seed"],
        device=config["device"],
        **fields,
    )
    result = run_training(spec, TrainingHooks(on_message=on_message))
    losses = [row["train_loss"] for row in result.metrics if "train_loss" in row]
    return {
        "adapter_dir": str(result.adapter_dir),
        "train_loss": losses[-1],
        "steps": result.step,
        "lathe_trained_tokens": result.trained_tokens,
        "lathe_throughput_report": result.reports.get("throughput"),
    }


def run_lathe(config: dict, output_dir: Path, mark: Marks) -> dict:
    train_file = Path(config.get("train_file", TRAIN_FILE))
    return train_lathe(config, output_dir, mark, data_format="chat", train_file=train_file)


def run_recipe(config: dict, output_dir: Path, mark: Marks) -> dict:
    from bench.recipe import train_recipe
    from worker.training.spec import LoraSpec

    return train_recipe(
        model_path=Path(config["model_path"]),
        chat_template=config["chat_template"],
        train_file=Path(config.get("train_file", TRAIN_FILE)),
        output_dir=output_dir,
        device=config["device"],
        n_epochs=config["epochs"],
        learning_rate=config["learning_rate"],
        seed=config["seed"],
        lora=LoraSpec(),  # Lathe's defaults, as its run above gets them
        mark=mark,
    )


def child(side: str, config_path: Path, result_path: Path) -> None:
    config = json.loads(config_path.read_text())
    mark = Marks(config["device"])
    with tempfile.TemporaryDirectory() as tmp:
        run = run_lathe if side == "lathe" else run_recipe
        result = run(config, Path(tmp), mark)
        result.update(mark.figures())
        adapter_dir = Path(result.pop("adapter_dir"))
        if config.get("eval", True):  # bench/gpu_check.py times training alone
            result["eval_loss"] = eval_loss(config, adapter_dir)
    result_path.write_text(json.dumps(result))


# --- in the parent process --------------------------------------------------------------


def machine_info(device: str) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def settings(device: str) -> dict:
    """What each side trains with, beyond what they share (epochs, rate, seed, LoRA)."""
    import dataclasses

    from bench import recipe
    from worker.training import spec

    lathe = {"batch_size": EFFECTIVE_BATCH, "max_seq_length": MAX_SEQ_LENGTH}
    for name in ("lora", "quant", "options"):  # TrainingSpec's defaults, as they are now
        field = spec.TrainingSpec.__dataclass_fields__.get(name)
        if field is not None:
            lathe[name] = dataclasses.asdict(field.default_factory())
    return {
        "lathe": lathe,
        "recipe": {
            "batch_size": recipe.BATCH_SIZE,
            "gradient_accumulation_steps": recipe.GRADIENT_ACCUMULATION,
            "padding": f"max_length={recipe.MAX_LENGTH}",
            "precision": "fp16" if device == "cuda" else "fp32",
            "optimizer": "paged_adamw_8bit" if device == "cuda" else "adamw_torch",
            "gradient_checkpointing": True,
        },
    }


def dataset_info(model_path: Path, chat_template: str | None) -> dict:
    from bench.recipe import MAX_LENGTH
    from worker.training.data import load_examples, load_tokenizer

    tokenizer = load_tokenizer(model_path, chat_template)
    train = load_examples(TRAIN_FILE, "chat", tokenizer, MAX_SEQ_LENGTH)
    lengths = sorted(len(e["input_ids"]) for e in train.examples)
    if lengths[-1] > MAX_LENGTH:
        raise SystemExit(f"an example has {lengths[-1]} tokens: the recipe would truncate it")
    return {
        "train_examples": len(lengths),
        "tokens_min": lengths[0],
        "tokens_median": lengths[len(lengths) // 2],
        "tokens_max": lengths[-1],
        "tokens_total": sum(lengths),
    }


def run_child(side: str, config: dict, workdir: Path, module: str = "bench.training") -> dict:
    """Run one side in a fresh `python -m <module> --child` process: its figures."""
    config_path, result_path = workdir / "config.json", workdir / f"{side}.json"
    config_path.write_text(json.dumps(config))
    print(f"training: {side} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "--child",
            side,
            str(config_path),
            str(result_path),
        ],
        cwd=ROOT,
        check=True,
    )
    result = json.loads(result_path.read_text())
    result["process_seconds"] = time.perf_counter() - started  # evaluation included
    return result


def combine(results: list[dict], means: tuple[str, ...] = ("train_loss", "eval_loss")) -> dict:
    """One row from a side's runs over the seeds: the median time, the highest peak memory,
    the mean of the `means` figures (losses); each seed's figures are kept beside them."""
    combined = dict(results[0])
    for key in ("train_seconds", "total_seconds"):
        combined[key] = statistics.median(r[key] for r in results)
    for key in ("peak_memory_bytes", "memory_at_train_begin_bytes"):
        combined[key] = max(r[key] for r in results)
    for key in means:
        combined[key] = statistics.fmean(r[key] for r in results)
        combined[f"per_seed_{key}"] = [r[key] for r in results]
    combined["per_seed_train_seconds"] = [r["train_seconds"] for r in results]
    return combined


def table(report: dict) -> str:
    mem = "peak GPU memory allocated" if report["device"] == "cuda" else "peak RSS"
    lines = [
        f"| trainer | real tokens/s | train time (s) | wall time (s) | {mem}, MiB "
        "(at train begin) | final train loss | eval loss (mean) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, r in report["runs"].items():
        lines.append(
            f"| {side} | {r['tokens_per_second']:,.0f} | {r['train_seconds']:.1f} "
            f"| {r['total_seconds']:.1f} | {r['peak_memory_bytes'] / 2**20:,.0f} "
            f"({r['memory_at_train_begin_bytes'] / 2**20:,.0f}) "
            f"| {r['train_loss']:.3f} | {r['eval_loss']:.3f} |"
        )
    ratio = report["lathe_over_recipe"]
    lines.append(
        f"| lathe / recipe | {ratio['tokens_per_second']:.2f}x | {ratio['train_seconds']:.2f}x "
        f"| {ratio['total_seconds']:.2f}x | {ratio['peak_memory_bytes']:.2f}x | | |"
    )
    m, d = report["machine"], report["dataset"]
    lines += [
        "",
        f"Device {report['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; CPU {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
        f"Model {report['model']}; {d['train_examples']} training conversations of "
        f"{d['tokens_min']}-{d['tokens_max']} tokens (median {d['tokens_median']}), "
        f"{report['epochs']} epochs, learning rate {report['learning_rate']}, "
        f"{report['real_tokens']:,} real tokens per run; the base model's eval loss "
        f"{report['base_eval_loss']:.3f}.",
    ]
    for side, r in report["runs"].items():
        lines.append(
            f"- {side}, per seed {', '.join(map(str, report['seeds']))}: eval loss "
            + ", ".join(f"{x:.3f}" for x in r["per_seed_eval_loss"])
            + "; tokens/s "
            + ", ".join(f"{x:,.0f}" for x in r["per_seed_tokens_per_second"])
        )
    diff = report["eval_loss_difference"]
    lines.append(
        f"- eval loss, lathe - recipe, paired by seed: mean {diff['mean']:+.4f}, standard "
        f"error {diff['standard_error']:.4f} ({diff['lower']} of {len(report['seeds'])} seeds "
        "lower for Lathe)"
    )
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def paired_difference(lathe: dict, recipe: dict) -> dict:
    """Lathe's eval loss minus the recipe's, seed by seed: the same seed draws the same
    LoRA initialisation and data order for both, so the pairs cancel most seed noise."""
    diffs = [
        a - b
        for a, b in zip(lathe["per_seed_eval_loss"], recipe["per_seed_eval_loss"], strict=True)
    ]
    spread = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {
        "per_seed": diffs,
        "mean": statistics.fmean(diffs),
        "standard_error": spread,
        "lower": sum(d < 0 for d in diffs),
    }


def bench_arguments(doc: str, epochs: int, seeds: tuple[int, ...]) -> argparse.ArgumentParser:
    """The options every trainer benchmark takes (this one and bench/dpo.py), so that
    `make bench`'s one BENCH_ARGS reaches both alike."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", type=Path, help="a base model directory (default: tiny)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--seeds",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        default=seeds,
        help="comma-separated; each side trains once per seed "
        f"(default {','.join(map(str, seeds))})",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return parser


def model_under_test(
    args: argparse.Namespace, workdir: Path, tiny_rate: float, model_rate: float
) -> tuple[Path, str, float]:
    """(directory, name, learning rate): the --model given, else the tiny random model
    generated into workdir, with the rate each needs unless --learning-rate says."""
    from app.config import DEFAULT_CHAT_TEMPLATE
    from worker.training.tiny_model import ensure_tiny_random_llama

    if args.model is None:
        path = ensure_tiny_random_llama(workdir / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE)
        name = "tiny-random-llama"
    else:
        path, name = args.model.resolve(), str(args.model)
    rate = args.learning_rate or (tiny_rate if args.model is None else model_rate)
    return path, name, rate


def main() -> None:
    parser = bench_arguments(__doc__, DEFAULT_EPOCHS, SEEDS)
    args = parser.parse_args()
    if args.child:
        side, config_path, result_path = args.child
        child(side, Path(config_path), Path(result_path))
        return

    from app.config import DEFAULT_CHAT_TEMPLATE

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path, model_name, learning_rate = model_under_test(
            args, workdir, TINY_LEARNING_RATE, MODEL_LEARNING_RATE
        )
        config = {
            "device": args.device,
            "model_path": str(model_path),
            # Lathe's default template, whatever the model: it renders a conversation as
            # the sum of its turns, which Lathe's assistant-only loss mask needs.
            "chat_template": DEFAULT_CHAT_TEMPLATE,
            "epochs": args.epochs,
            "learning_rate": learning_rate,
        }
        dataset = dataset_info(model_path, DEFAULT_CHAT_TEMPLATE)
        runs = {
            side: combine(
                [run_child(side, {**config, "seed": seed}, workdir) for seed in args.seeds]
            )
            for side in ("lathe", "recipe")
        }
        base_eval_loss = eval_loss(config, None)

    real_tokens = dataset["tokens_total"] * args.epochs
    for r in runs.values():
        r["real_tokens"] = real_tokens
        r["tokens_per_second"] = real_tokens / r["train_seconds"]
        r["per_seed_tokens_per_second"] = [real_tokens / t for t in r["per_seed_train_seconds"]]
    lathe, recipe = runs["lathe"], runs["recipe"]
    keys = ("tokens_per_second", "train_seconds", "total_seconds", "peak_memory_bytes")
    notes = [
        "real tokens: the non-pad tokens of every training example times the epochs, the "
        "same for both; the recipe also computes on "
        f"{recipe['padded_tokens'] - real_tokens:,} pad tokens.",
        "train time: the Trainer's train-begin to the adapter saved (Lathe's epoch-end "
        "checkpoints included); wall time: the child process's start to the same point "
        "(imports, tokenizing, the 4-bit load); eval loss: one shared evaluator, after.",
    ]
    if lathe["lathe_trained_tokens"] != real_tokens:
        notes.append(f"Lathe reported {lathe['lathe_trained_tokens']:,} trained tokens.")
    if args.device == "cpu":
        notes.append(
            "On the CPU the recipe trains in float32 (fp16 needs a GPU) with adamw_torch "
            "(paged_adamw_8bit needs CUDA), as Lathe does there."
        )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "model": model_name,
        "epochs": args.epochs,
        "learning_rate": learning_rate,
        "effective_batch": EFFECTIVE_BATCH,
        "seeds": list(args.seeds),
        "real_tokens": real_tokens,
        "machine": machine_info(args.device),
        "dataset": dataset,
        "settings": settings(args.device),
        "base_eval_loss": base_eval_loss,
        "runs": runs,
        "lathe_over_recipe": {k: lathe[k] / recipe[k] for k in keys},
        "eval_loss_difference": paired_difference(lathe, recipe),
        "notes": notes,
        "bench_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"training-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table(report))
    print(table(report))
    print(f"wrote {stem}.json and {stem}.md in {report['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
