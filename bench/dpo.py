"""Lathe's DPO trainer against TRL's plain DPO recipe (bench/dpo_recipe.py): `make bench`.

    python -m bench.dpo --device cpu|cuda [--model PATH] [--epochs N] [--seeds 42,1,2]

Both train the same 4-bit base with the same LoRA settings, beta, learning rate, epochs and
seeds on bench/data/preference_train.jsonl at the same effective batch (Lathe's batch_size
8, the recipe's 2 x 4 accumulation), the reference being the base with the adapter off for
both, each side once per seed in a fresh child process, so its peak memory is its own.
Lathe: worker.training.run.run_training with method "dpo" (its own tokenization, batches
padded to their longest sequence, micro-batches of about max_seq_length tokens). The
recipe: TRL's DPOTrainer with its own tokenization, every sequence padded to 512.

Measured as bench/training.py measures SFT: real tokens per second (the non-pad tokens of
both sequences of every pair, prompt included, as Lathe counts them, times the epochs /
the time from the Trainer's train-begin to the saved adapter), the child's wall time to
that point, peak memory (peak RSS on the CPU, torch's peak allocation on a GPU), the last
logged train loss, and the reward accuracy and margin on bench/data/preference_valid.jsonl
from one evaluator shared by both. The table shows median times, mean losses and rewards
and the highest peak memory over the seeds; the JSON every seed's figures. Writes
bench/results/dpo-<device>.{json,md}. `--pairs N` trains and evaluates on the first N
pairs of each file only: a smoke run (tests/bench/test_dpo_bench.py), not a measurement.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.training import (
    EFFECTIVE_BATCH,
    MAX_SEQ_LENGTH,
    Marks,
    bench_arguments,
    combine,
    machine_info,
    model_under_test,
    run_child,
    train_lathe,
)

DATA = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA / "preference_train.jsonl"
VALID_FILE = DATA / "preference_valid.jsonl"
SEEDS = (42, 1, 2)
DEFAULT_EPOCHS = 2
# DPO learns at rates one or two orders of magnitude under SFT's. The SFT bench's 1e-2 on the
# tiny model drives the loss to 0.000 within an epoch (every margin saturated, nothing left
# to compare); at 1e-4 the loss ends near 0.3 after two epochs. 5e-5 is a usual LoRA DPO
# rate for a real model.
TINY_LEARNING_RATE = 1e-4
MODEL_LEARNING_RATE = 5e-5
BETA = 0.1  # DPO's usual beta: OpenAI's, TRL's and Lathe's default
MEANS = ("train_loss", "reward_accuracy", "reward_margin", "valid_loss")


# --- in the child process ---------------------------------------------------------------


def reward_metrics(config: dict, adapter_dir: Path) -> dict:
    """DPO's validation figures for an adapter, against the base as the reference.

    The same for both sides: base reloaded in 4-bit as Lathe loads it, the adapter on top,
    eval mode, no gradients, one unpadded sequence at a time (pairs tokenized as Lathe
    tokenizes them). A reply's log-probability is the sum over its tokens; its reward beta
    times the policy's minus the reference's (the adapter switched off). Reward accuracy:
    the share of pairs whose preferred reply gets the higher reward (TRL's
    rewards/accuracies); margin: the mean difference; loss: DPO's, -log sigmoid(margin),
    log 2 (0.693) where training starts (every reward 0).
    """
    import torch
    from peft import PeftModel

    from worker.training.data import load_tokenizer
    from worker.training.preference import load_preferences
    from worker.training.qlora_model import load_quantized_base
    from worker.training.spec import QuantSpec

    model_path = Path(config["model_path"])
    tokenizer = load_tokenizer(model_path, config["chat_template"])
    pairs = load_preferences(Path(config["valid_file"]), tokenizer, MAX_SEQ_LENGTH).examples
    base = load_quantized_base(model_path, QuantSpec(), config["device"])
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    def logp(prompt: list[int], reply: list[int]) -> float:
        ids = torch.tensor([prompt + reply], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        targets = ids[0, len(prompt) :]
        return logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item()

    margins = []
    with torch.no_grad():
        for p in pairs:
            policy = logp(p["prompt_ids"], p["chosen_ids"]) - logp(
                p["prompt_ids"], p["rejected_ids"]
            )
            with model.disable_adapter():
                reference = logp(p["prompt_ids"], p["chosen_ids"]) - logp(
                    p["prompt_ids"], p["rejected_ids"]
                )
            margins.append(config["beta"] * (policy - reference))
    margin = torch.tensor(margins)
    return {
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "valid_loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
    }


def run_lathe(config: dict, output_dir: Path, mark: Marks) -> dict:
    return train_lathe(
        config,
        output_dir,
        mark,
        data_format="preference",
        train_file=Path(config["train_file"]),
        method="dpo",
        beta=config["beta"],
    )


def run_recipe(config: dict, output_dir: Path, mark: Marks) -> dict:
    from bench.dpo_recipe import train_dpo_recipe
    from worker.training.spec import LoraSpec

    return train_dpo_recipe(
        model_path=Path(config["model_path"]),
        chat_template=config["chat_template"],
        train_file=Path(config["train_file"]),
        output_dir=output_dir,
        device=config["device"],
        n_epochs=config["epochs"],
        learning_rate=config["learning_rate"],
        beta=config["beta"],
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
        result.update(reward_metrics(config, Path(result.pop("adapter_dir"))))
    result_path.write_text(json.dumps(result))


# --- in the parent process --------------------------------------------------------------


def versions() -> dict:
    import datasets
    import trl

    return {"trl": trl.__version__, "datasets": datasets.__version__}


def settings(device: str) -> dict:
    """What each side trains with, beyond what they share (epochs, rate, beta, seed, LoRA)."""
    from bench import dpo_recipe, recipe

    cuda = device == "cuda"
    return {
        "lathe": {
            "batch_size": EFFECTIVE_BATCH,
            "max_seq_length": MAX_SEQ_LENGTH,
            "padding": "to each micro-batch's longest sequence",
            "reference": "the base, adapter off",
            "gradient_checkpointing": cuda,
        },
        "recipe": {
            "batch_size": recipe.BATCH_SIZE,
            "gradient_accumulation_steps": recipe.GRADIENT_ACCUMULATION,
            "padding": f"max_length={recipe.MAX_LENGTH} (pad_to_multiple_of)",
            "reference": "the base, adapter off",
            "adapter_dtype": "bfloat16 (TRL's cast for a quantized model)",
            "precision": "bf16" if cuda else "fp32",
            "optimizer": "paged_adamw_8bit" if cuda else "adamw_torch",
            "gradient_checkpointing": True,
            "module": dpo_recipe.__name__,
        },
    }


def dataset_info(config: dict) -> dict:
    """Lathe's token counts of the training pairs; refuses a set the recipe would cut."""
    from bench.recipe import MAX_LENGTH
    from worker.training.data import load_tokenizer
    from worker.training.preference import load_preferences

    tokenizer = load_tokenizer(Path(config["model_path"]), config["chat_template"])
    train = load_preferences(Path(config["train_file"]), tokenizer, MAX_SEQ_LENGTH)
    pairs = sorted(
        2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
        for p in train.examples
    )
    if train.counts.longest > MAX_LENGTH:
        raise SystemExit(
            f"a sequence has {train.counts.longest} tokens: the recipe would truncate it"
        )
    return {
        "train_pairs": len(pairs),
        "pair_tokens_min": pairs[0],
        "pair_tokens_median": pairs[len(pairs) // 2],
        "pair_tokens_max": pairs[-1],
        "longest_sequence": train.counts.longest,
        "tokens_total": train.counts.tokens,
    }


def first_pairs(source: Path, target: Path, n: int) -> str:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return str(target)


def table(report: dict) -> str:
    mem = "peak GPU memory allocated" if report["device"] == "cuda" else "peak RSS"
    lines = [
        f"| trainer | real tokens/s | train time (s) | wall time (s) | {mem}, MiB "
        "(at train begin) | final train loss | valid loss | valid reward accuracy "
        "| valid reward margin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, r in report["runs"].items():
        lines.append(
            f"| {side} | {r['tokens_per_second']:,.0f} | {r['train_seconds']:.1f} "
            f"| {r['total_seconds']:.1f} | {r['peak_memory_bytes'] / 2**20:,.0f} "
            f"({r['memory_at_train_begin_bytes'] / 2**20:,.0f}) "
            f"| {r['train_loss']:.3f} | {r['valid_loss']:.3f} | {r['reward_accuracy']:.3f} "
            f"| {r['reward_margin']:.3f} |"
        )
    ratio = report["lathe_over_recipe"]
    lines.append(
        f"| lathe / recipe | {ratio['tokens_per_second']:.2f}x | {ratio['train_seconds']:.2f}x "
        f"| {ratio['total_seconds']:.2f}x | {ratio['peak_memory_bytes']:.2f}x | | | | |"
    )
    m, d = report["machine"], report["dataset"]
    lines += [
        "",
        f"Device {report['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f"; CPU {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"trl {m['trl']}.",
        f"Model {report['model']}; {d['train_pairs']} training pairs of "
        f"{d['pair_tokens_min']}-{d['pair_tokens_max']} tokens, both sequences (median "
        f"{d['pair_tokens_median']}; longest sequence {d['longest_sequence']}), "
        f"{report['epochs']} epochs, learning rate {report['learning_rate']}, beta "
        f"{report['beta']}, {report['real_tokens']:,} real tokens per run.",
    ]
    for side, r in report["runs"].items():
        lines.append(
            f"- {side}, per seed {', '.join(map(str, report['seeds']))}: valid reward accuracy "
            + ", ".join(f"{x:.3f}" for x in r["per_seed_reward_accuracy"])
            + "; margin "
            + ", ".join(f"{x:.3f}" for x in r["per_seed_reward_margin"])
            + "; tokens/s "
            + ", ".join(f"{x:,.0f}" for x in r["per_seed_tokens_per_second"])
        )
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = bench_arguments(__doc__, DEFAULT_EPOCHS, SEEDS)
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--pairs", type=int, help="only the first N pairs of each file (smoke)")
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
        train_file, valid_file = str(TRAIN_FILE), str(VALID_FILE)
        if args.pairs:
            train_file = first_pairs(TRAIN_FILE, workdir / "train.jsonl", args.pairs)
            valid_file = first_pairs(VALID_FILE, workdir / "valid.jsonl", args.pairs)
        config = {
            "device": args.device,
            "model_path": str(model_path),
            # Lathe's default template, as bench/training.py uses it.
            "chat_template": DEFAULT_CHAT_TEMPLATE,
            "epochs": args.epochs,
            "learning_rate": learning_rate,
            "beta": args.beta,
            "train_file": train_file,
            "valid_file": valid_file,
        }
        dataset = dataset_info(config)
        runs = {
            side: combine(
                [
                    run_child(side, {**config, "seed": seed}, workdir, module="bench.dpo")
                    for seed in args.seeds
                ],
                means=MEANS,
            )
            for side in ("lathe", "recipe")
        }

    real_tokens = dataset["tokens_total"] * args.epochs
    for r in runs.values():
        r["real_tokens"] = real_tokens
        r["tokens_per_second"] = real_tokens / r["train_seconds"]
        r["per_seed_tokens_per_second"] = [real_tokens / t for t in r["per_seed_train_seconds"]]
    lathe, recipe = runs["lathe"], runs["recipe"]
    keys = ("tokens_per_second", "train_seconds", "total_seconds", "peak_memory_bytes")
    notes = [
        "real tokens: the non-pad tokens of both sequences of every pair (prompt + chosen, "
        "prompt + rejected) times the epochs, as Lathe counts them, the same for both; the "
        f"recipe also computes on {recipe['padded_tokens'] - real_tokens:,} pad tokens.",
        "train time: the Trainer's train-begin to the adapter saved (Lathe's epoch-end "
        "checkpoints included); wall time: the child process's start to the same point "
        "(imports, tokenizing, the 4-bit load); reward accuracy and margin: one shared "
        "evaluator, after, against the base as the reference.",
    ]
    if recipe["real_tokens"] != real_tokens:
        notes.append(
            f"TRL's own tokenization gives {recipe['real_tokens']:,} real tokens, not "
            f"{real_tokens:,}: the two tokenize the pairs differently."
        )
    if lathe["lathe_trained_tokens"] != real_tokens:
        notes.append(f"Lathe reported {lathe['lathe_trained_tokens']:,} trained tokens.")
    if args.device == "cpu":
        notes.append(
            "On the CPU the recipe computes in float32 (bf16 autocast is for a GPU) with "
            "adamw_torch (paged_adamw_8bit needs CUDA), as Lathe does there; its adapter "
            "weights are bfloat16 all the same (TRL casts them for a 4-bit model)."
        )
    machine = machine_info(args.device) | versions()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "model": model_name,
        "epochs": args.epochs,
        "learning_rate": learning_rate,
        "beta": args.beta,
        "effective_batch": EFFECTIVE_BATCH,
        "seeds": list(args.seeds),
        "pairs": args.pairs,
        "real_tokens": real_tokens,
        "machine": machine,
        "dataset": dataset,
        "settings": settings(args.device),
        "runs": runs,
        "lathe_over_recipe": {k: lathe[k] / recipe[k] for k in keys},
        "reward_accuracy_difference": statistics.fmean(
            a - b
            for a, b in zip(
                lathe["per_seed_reward_accuracy"], recipe["per_seed_reward_accuracy"], strict=True
            )
        ),
        "notes": notes,
        "bench_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dpo-{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table(report))
    print(table(report))
    print(f"wrote {stem}.json and {stem}.md in {report['bench_seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
