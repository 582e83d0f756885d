"""Merged exports (worker.export.merge_adapter): how close each merge is to the model that
was trained, and what a merge costs in memory and time as the model grows.

    python -m bench.merge [--workdir DIR] [--large-layers 22]

1. Accuracy. The trained model is the 4-bit NF4 base with the adapter on top, as training
   ran it. Against it, on app/data/sample_chat_valid.jsonl (the demo's held-out chats), the
   merged folders: the adapter added to (a) the original weights, (b) the weights as the
   4-bit model held them (quantized and dequantized again), each written in float32 and in
   bfloat16 and loaded with plain transformers in float32, plus the bfloat16 nf4 folder
   computed in bfloat16 as a server would. Figures: the largest |logit difference| over
   every position, and the mean next-token loss against the trained model's. Two models:
   the tiny random Llama with an adapter trained by run_training (a few steps at a high
   learning rate, so it is far from zero), and a realistic-shape random Llama (hidden 2048,
   intermediate 5632, 4 layers, vocabulary 32000, initializer range 0.02, bfloat16) with a
   random non-zero adapter on every linear layer of the blocks (r 8, alpha 16; B drawn from
   N(0, 0.01): training such a model on two CPU cores would take the whole budget).
2. Memory. Two random bfloat16 Llamas of the same layer shapes, 4 and 22 layers (0.3B and
   1.1B parameters), each merged (nf4, bfloat16, 256 MiB output shards) in a child process:
   the child's peak RSS (VmHWM), the merge's growth over the RSS after imports, the wall
   time.

Writes bench/results/merge-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VALID_FILE = ROOT / "app" / "data" / "sample_chat_valid.jsonl"
TRAIN_FILE = ROOT / "app" / "data" / "sample_chat.jsonl"
SHARD_BYTES = 256 * 1024**2
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def realistic_config(layers: int, **overrides):
    """The realistic shapes (hidden 2048, intermediate 5632, vocabulary 32000); `overrides`
    replace any of LlamaConfig's settings (bench/export.py's token ids, its --quick shapes)."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, initializer_range=0.02,
        tie_word_embeddings=False, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )  # fmt: skip
    settings.update(overrides)
    return LlamaConfig(**settings)


def write_random_llama(path: Path, layers: int, *, tokenizer=None, **overrides) -> int:
    """A random bfloat16 Llama written tensor by tensor (the model is never built whole),
    with `tokenizer` (unset: the demo's byte tokenizer and chat template); `overrides` go to
    realistic_config. Returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from app.config import DEFAULT_CHAT_TEMPLATE
    from worker.training.tiny_model import ByT5Tokenizer

    config = realistic_config(layers, **overrides)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[tuple[str, dict]] = []
    total = count = 0
    for name, param in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensor = torch.randn(param.shape, generator=generator) * config.initializer_range
            tensor = tensor.to(torch.bfloat16)
        shard[name] = tensor
        count += tensor.numel()
        total += tensor.numel() * 2
        if sum(t.numel() * 2 for t in shard.values()) >= 512 * 1024**2:
            files.append((f"part-{len(files)}", shard))
            save_file(shard, path / f"part-{len(files) - 1}.safetensors", metadata={"format": "pt"})
            shard = {}
    if shard:
        files.append((f"part-{len(files)}", shard))
        save_file(shard, path / f"part-{len(files) - 1}.safetensors", metadata={"format": "pt"})
    for i, (_, tensors) in enumerate(files):
        weight_map.update(dict.fromkeys(tensors, f"part-{i}.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    if tokenizer is None:
        tokenizer = ByT5Tokenizer()
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return count


def write_random_adapter(
    path: Path, base: Path, layers: int, *, r: int = 8, alpha: int = 16, **overrides
) -> float:
    """A peft LoRA adapter with random non-zero A and B on every block linear of the model
    realistic_config(layers, **overrides) describes; returns the update's RMS relative to
    the base weights' (0.02)."""
    import torch
    from safetensors.torch import save_file

    config = realistic_config(layers, **overrides)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    updates = []
    for layer in range(config.num_hidden_layers):
        for projection, (out_features, in_features) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{projection}"
            bound = 1 / math.sqrt(in_features)  # peft's kaiming-uniform A, in effect
            a = (torch.rand(r, in_features, generator=generator) * 2 - 1) * bound
            b = torch.randn(out_features, r, generator=generator) * 0.01
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = b
            if layer == 0:
                updates.append(((b @ a) * alpha / r).pow(2).mean().sqrt().item())
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "bias": "none", "target_modules": [p.split(".")[1] for p in shapes],
        "base_model_name_or_path": str(base), "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return sum(updates) / len(updates) / 0.02


def train_tiny_adapter(base: Path, workdir: Path) -> Path:
    """The demo's chats, one epoch of 10 steps at learning rate 0.02: far from zero."""
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks, TrainingOptions, TrainingSpec

    spec = TrainingSpec(
        base_model_path=base, chat_template=None, data_format="chat", train_file=TRAIN_FILE,
        valid_file=None, output_dir=workdir / "tiny-run", n_epochs=1, batch_size=8,
        learning_rate=2e-2, max_seq_length=512, seed=0, device="cpu",
        options=TrainingOptions(sample_max_new_tokens=0),
    )  # fmt: skip
    return run_training(spec, TrainingHooks()).adapter_dir


def held_out_ids(base: Path) -> list:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in VALID_FILE.read_text().splitlines() if line.strip()]
    return [
        tokenizer.apply_chat_template(row["messages"], return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
        for row in rows
    ]


def logits_and_loss(model, ids_list: list) -> tuple[list, float]:
    import torch

    outputs, losses, tokens = [], 0.0, 0
    with torch.no_grad():
        for ids in ids_list:
            logits = model(input_ids=ids).logits.float()
            outputs.append(logits)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            losses += loss.item()
            tokens += ids.shape[1] - 1
    return outputs, losses / tokens


def compare(name: str, base: Path, adapter: Path, workdir: Path) -> dict:
    """The trained model against each merge, on the held-out chats."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.export import merge_adapter
    from worker.training.qlora_model import load_quantized_base
    from worker.training.spec import QuantSpec

    ids_list = held_out_ids(base)
    trained = PeftModel.from_pretrained(load_quantized_base(base, QuantSpec(), "cpu"), adapter)
    reference, reference_loss = logits_and_loss(trained.eval(), ids_list)
    del trained
    scale = max(r.abs().max().item() for r in reference)
    rows = []
    cases = [(w, d, "float32") for w in ("original", "nf4") for d in ("float32", "bfloat16")]
    cases.append(("nf4", "bfloat16", "bfloat16"))
    for base_weights, dtype, compute in cases:
        out = workdir / f"{name}-{base_weights}-{dtype}"
        if not out.exists():
            merge_adapter(base, adapter, out, dtype=dtype, base_weights=base_weights)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, compute)).eval()
        logits, loss = logits_and_loss(model, ids_list)
        del model
        difference = max((a - b).abs().max().item() for a, b in zip(logits, reference, strict=True))
        rows.append(
            {
                "base_weights": base_weights, "dtype": dtype, "computed_in": compute,
                "max_abs_logit_difference": difference, "mean_loss": loss,
                "loss_change": loss - reference_loss,
            }
        )  # fmt: skip
        print(name, rows[-1], flush=True)
    return {
        "trained_mean_loss": reference_loss,
        "max_abs_trained_logit": scale,
        "held_out_sequences": len(ids_list),
        "held_out_tokens": sum(int(i.shape[1]) for i in ids_list),
        "merges": rows,
    }


def child_merge(base: str, adapter: str, out: str) -> None:
    """One merge in this process: its peak memory and time, as JSON on the last line."""
    from worker.export import merge_adapter

    def rss(field: str) -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(s for s in status if s.startswith(field + ":")).split()[1]) * 1024

    # Peaks from /proc (VmHWM), not ru_maxrss: a child's ru_maxrss starts from its parent's
    # peak at the fork, here the parent that generated the model.
    whole_life = rss("VmHWM")  # imports
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
    after_imports = rss("VmRSS")
    started = time.perf_counter()
    result = merge_adapter(Path(base), Path(adapter), Path(out), max_shard_bytes=SHARD_BYTES)
    seconds = time.perf_counter() - started
    merge_peak = rss("VmHWM")
    peak = max(whole_life, merge_peak)
    print(json.dumps({
        "peak_rss_bytes": peak, "rss_after_imports_bytes": after_imports,
        "growth_bytes": merge_peak - after_imports, "seconds": seconds,
        "output_bytes": result.total_bytes, "shards": len(result.shards),
        "merged_layers": result.merged_layers, "quantized_layers": result.quantized_layers,
    }))  # fmt: skip


def measure_memory(layers: int, workdir: Path) -> dict:
    base = workdir / f"random-llama-{layers}"
    adapter = workdir / f"random-adapter-{layers}"
    started = time.perf_counter()
    parameters = write_random_llama(base, layers)
    write_random_adapter(adapter, base, layers)
    generated = time.perf_counter() - started
    out = workdir / f"merged-{layers}"
    child = subprocess.run(
        [sys.executable, "-m", "bench.merge", "--child", str(base), str(adapter), str(out)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if child.returncode != 0:
        raise RuntimeError(child.stderr[-3000:])
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest = max(
        math.prod(s) * 4 for s in ((32000, 2048), (5632, 2048))
    )  # the embedding in float32
    print(layers, figures, flush=True)
    return {
        "layers": layers, "parameters": parameters, "base_bytes": base_bytes,
        "largest_tensor_float32_bytes": largest, "shard_bytes": SHARD_BYTES,
        "generate_seconds": generated, **figures,
    }  # fmt: skip


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(report: dict) -> str:
    m = report["machine"]
    lines = ["## Accuracy: merged folders against the trained 4-bit model + adapter", ""]
    for name, figures in report["accuracy"].items():
        lines += [
            f"**{name}** ({figures['description']}); trained model's mean loss "
            f"{figures['trained_mean_loss']:.4f}, largest |logit| "
            f"{figures['max_abs_trained_logit']:.2f}, {figures['held_out_sequences']} held-out "
            f"chats, {figures['held_out_tokens']} tokens.",
            "",
            "| base weights | written in | computed in | max abs logit difference "
            "| mean loss change |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in figures["merges"]:
            lines.append(
                f"| {row['base_weights']} | {row['dtype']} | {row['computed_in']} | "
                f"{row['max_abs_logit_difference']:.2e} | {row['loss_change']:+.2e} |"
            )
        lines.append("")
    lines += [
        "## Memory: merge (nf4, bfloat16, 256 MiB shards) in a child process",
        "",
        "| model | parameters | base on disk, MiB | merged, MiB (shards) | peak RSS, MiB "
        "| growth over imports, MiB | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["memory"]:
        lines.append(
            f"| Llama 2048/5632, {row['layers']} layers | {row['parameters'] / 1e9:.2f}B | "
            f"{mib(row['base_bytes'])} | {mib(row['output_bytes'])} ({row['shards']}) | "
            f"{mib(row['peak_rss_bytes'])} | {mib(row['growth_bytes'])} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        f"CPU {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}, "
        f"bitsandbytes {report['bitsandbytes']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_merge(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--large-layers", type=int, default=22)
    args = parser.parse_args()
    import bitsandbytes

    from app.config import DEFAULT_CHAT_TEMPLATE
    from bench.training import machine_info
    from worker.training.tiny_model import ensure_tiny_random_llama

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        tiny = ensure_tiny_random_llama(workdir / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE)
        accuracy = {
            "tiny": {
                "description": "tiny random Llama, hidden 64, 2 layers, initializer range 0.1, "
                "float32; adapter trained 10 steps at learning rate 0.02 on the demo's chats",
                **compare("tiny", tiny, train_tiny_adapter(tiny, workdir), workdir),
            }
        }
        memory = [measure_memory(4, workdir)]
        realistic = workdir / "random-llama-4"
        relative = write_random_adapter(workdir / "random-adapter-4", realistic, 4)
        accuracy["realistic"] = {
            "description": "random Llama, hidden 2048, intermediate 5632, 4 layers, vocabulary "
            "32000, initializer range 0.02, bfloat16; random adapter r 8, alpha 16, update "
            f"RMS {relative:.1%} of the weights'",
            **compare("realistic", realistic, workdir / "random-adapter-4", workdir),
        }
        memory.append(measure_memory(args.large_layers, workdir))
        report = {
            "machine": machine_info("cpu"),
            "bitsandbytes": bitsandbytes.__version__,
            "accuracy": accuracy,
            "memory": memory,
            "seconds": time.perf_counter() - started,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "merge-cpu.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
