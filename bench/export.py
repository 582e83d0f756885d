"""Whole exports (merge, then GGUF): what each step costs in memory and time as the model
grows, every process of it measured.

    python -m bench.export [--workdir DIR] [--layers 4 22 40] [--out DIR] [--quick]

Random bfloat16 Llamas of bench/merge.py's realistic shapes (hidden 2048, intermediate
5632, vocabulary 32000), 4, 22 and 40 layers (0.31B, 1.10B and 1.89B parameters), written
tensor by tensor with a random non-zero adapter (bench.merge's writers). Their tokenizer is
worker/training/sentencepiece_tokenizer.py's (512 pieces and ChatML's two tokens, with its
tokenizer.model), which llama.cpp's converter reads; the configuration keeps 32000 ids,
and the converter fills ids 514 and up with unused "[PAD<n>]" tokens, so the embedding and
output layer keep a real model's size (they are the largest tensors). For each model:

1. the merge (worker.export.merge_adapter: nf4, bfloat16, 256 MiB output shards), in a
   child process (bench.merge's);
2. GGUF q8_0 of the merged folder (worker.export.gguf.export_gguf: llama.cpp's
   convert_hf_to_gguf.py in a child process of its own);
3. GGUF q4_k_m (the converter's f16, then llama.cpp's quantizer in another child).

Each step starts in a fresh process. A sampler in this process reads /proc/<pid>/status of
that process and of all its descendants every 50 ms (new descendants are looked for every
0.5 s): each process's VmHWM (its peak RSS, kept by the kernel, so a sample misses only
what a process adds in its last 50 ms), the largest RssAnon (anonymous memory: what must
fit in RAM) and RssFile (pages of mapped files, which the kernel can drop) seen, and the
largest sum of VmRSS over the tree at one instant. Not ru_maxrss: a forked child's starts
from its parent's peak. The process that calls export_gguf also reports
getrusage(RUSAGE_CHILDREN).ru_maxrss as a cross-check (its largest child, but at least its
own RSS at the fork).

Writes bench/results/export-cpu.{json,md} (or into --out). --quick: one small model
(hidden 256, 2 layers, vocabulary 1024), for the test that keeps this runnable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.merge import RESULTS, ROOT, SHARD_BYTES, mib, write_random_adapter, write_random_llama

SAMPLE_SECONDS = 0.05
# Finding new descendants reads every /proc/<pid>/stat (tens of ms on a busy machine), so it
# is done every tenth sample; a process found late loses nothing (VmHWM is its whole life's).
DISCOVER_EVERY = 10
# The SentencePiece tokenizer's ids (worker.training.sentencepiece_tokenizer): <unk> <s> </s>.
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
QUICK_SHAPES = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2,
}  # fmt: skip
GGUF_QUANTIZATIONS = ("q8_0", "q4_k_m")


# --- Every process of a step, from /proc ------------------------------------------------


@dataclass
class ProcessPeak:
    pid: int
    role: str  # "merge", "export" (the process calling export_gguf), "convert", "quantize"
    peak_rss_bytes: int = 0  # VmHWM at the last sample
    max_rss_anon_bytes: int = 0
    max_rss_file_bytes: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class TreeSampler:
    """Samples `root` and its descendants every `interval` seconds, in a thread, until stop()."""

    root: int
    interval: float = SAMPLE_SECONDS
    processes: dict[tuple[int, int], ProcessPeak] = field(default_factory=dict)
    max_tree_rss_bytes: int = 0
    samples: int = 0
    known: list[tuple[int, int]] = field(default_factory=list)
    # Every DISCOVER_EVERY-th sample: seconds since the start, the tree's VmRSS and RssAnon.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        now = time.perf_counter() - self._started
        total = anonymous = 0
        discover = self.samples % DISCOVER_EVERY == 0
        if discover:
            self.known = descendants(self.root)
        for pid, start_time in self.known:
            if start_time_of(pid) != start_time:  # gone, its pid perhaps another's by now
                continue
            status = read_status(pid)
            if not status.get("VmHWM"):  # gone, or a zombie (no memory left)
                continue
            key = (pid, start_time)
            peak = self.processes.get(key)
            if peak is None:
                peak = ProcessPeak(pid=pid, role="?", first_seen=now)
                self.processes[key] = peak
            # Read again each time: right after the fork it is still its parent's command.
            peak.role = process_role(pid)
            peak.peak_rss_bytes = max(peak.peak_rss_bytes, status["VmHWM"])
            peak.max_rss_anon_bytes = max(peak.max_rss_anon_bytes, status.get("RssAnon", 0))
            peak.max_rss_file_bytes = max(peak.max_rss_file_bytes, status.get("RssFile", 0))
            peak.last_seen = now
            total += status.get("VmRSS", 0)
            anonymous += status.get("RssAnon", 0)
        self.max_tree_rss_bytes = max(self.max_tree_rss_bytes, total)
        if discover:
            self.timeline.append((round(now, 2), total, anonymous))
        self.samples += 1

    def report(self) -> dict:
        return {
            "processes": [asdict(p) for p in self.processes.values()],
            "max_tree_rss_bytes": self.max_tree_rss_bytes,
            "samples": self.samples,
            "timeline": self.timeline,
        }


def descendants(root: int) -> list[tuple[int, int]]:
    """`root` and every process below it, as (pid, start time in clock ticks)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after the command, which may hold spaces
        # fields[1] is the parent's pid, fields[19] the start time (stat's 4th and 22nd).
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        starts[pid] = int(fields[19])
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        if pid in starts:
            found.append((pid, starts[pid]))
        queue.extend(children.get(pid, ()))
    return found


def start_time_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except OSError:
        return None


def read_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/<pid>/status, in bytes ({} once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def process_role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    for i, arg in enumerate(argv):
        if arg.endswith("gguf_child.py") and i + 1 < len(argv):
            return argv[i + 1]  # convert, quantize
        if arg in ("bench.merge", "bench.export") and i + 2 < len(argv):
            return {"bench.merge": "merge", "bench.export": "export"}[arg]
    return Path(argv[0]).name or "?"


def run_sampled(args: list) -> dict:
    """`python -m <args>` in a fresh process, sampled; its last stdout line is JSON."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sampler = TreeSampler(proc.pid).start()
    try:
        stdout, stderr = proc.communicate()
    finally:
        sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {stderr[-3000:]}")
    return {
        "figures": json.loads(stdout.strip().splitlines()[-1]),
        "process_seconds": time.perf_counter() - started,
        **sampler.report(),
    }


# --- The GGUF step's process ------------------------------------------------------------


def child_gguf(merged: str, out: str, quantization: str) -> None:
    """export_gguf in this process; its own figures as JSON on the last line."""
    import resource

    from worker.export.gguf import export_gguf

    result = export_gguf(Path(merged), Path(out), quantization=quantization, name="bench")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({
        "seconds": result.seconds, "step_seconds": result.step_seconds,
        "output_bytes": result.gguf_bytes, "tensors": result.tensors,
        "tensor_types": result.tensor_types, "warnings": result.warnings,
        "children_ru_maxrss_bytes": children,
    }))  # fmt: skip


# --- One model through every step -------------------------------------------------------


def measure_model(layers: int, workdir: Path, tokenizer, overrides: dict) -> dict:
    base, adapter = workdir / f"llama-{layers}", workdir / f"adapter-{layers}"
    parameters = write_random_llama(base, layers, tokenizer=tokenizer, **overrides)
    write_random_adapter(adapter, base, layers, **overrides)
    merged = workdir / f"merged-{layers}"
    steps = [{"step": "merge", **run_sampled(["bench.merge", "--child", base, adapter, merged])}]
    steps[0]["output_bytes"] = steps[0]["figures"]["output_bytes"]
    steps[0]["seconds"] = steps[0]["figures"]["seconds"]
    print(layers, "merge", steps[0]["figures"], flush=True)
    shutil.rmtree(base)
    for quantization in GGUF_QUANTIZATIONS:
        out = workdir / f"gguf-{layers}-{quantization}"
        step = run_sampled(["bench.export", "--child", merged, out, quantization])
        step["step"] = f"gguf {quantization}"
        step["output_bytes"] = step["figures"]["output_bytes"]
        step["seconds"] = step["figures"]["seconds"]
        steps.append(step)
        print(layers, quantization, step["figures"], flush=True)
        shutil.rmtree(out)
    shutil.rmtree(merged)
    shutil.rmtree(adapter)
    shapes = {"hidden_size": 2048, "intermediate_size": 5632, "vocab_size": 32000} | overrides
    largest = max(shapes["vocab_size"], shapes["intermediate_size"]) * shapes["hidden_size"]
    return {
        "layers": layers, "parameters": parameters, "hidden_size": shapes["hidden_size"],
        "largest_tensor_parameters": largest, "steps": steps,
    }  # fmt: skip


def step_rows(model: dict) -> list[dict]:
    """One row per process that matters: the merge; each GGUF's converter and quantizer."""
    rows = []
    for step in model["steps"]:
        own = [p for p in step["processes"] if p["role"] in ("merge", "convert", "quantize")]
        for process in own:
            role = process["role"]
            if role == "convert" and step["step"] == "gguf q4_k_m":
                role = "convert to f16"
            name = step["step"] if role == "merge" else f"{step['step']}: {role}"
            rows.append({
                "step": name, "peak_rss_bytes": process["peak_rss_bytes"],
                "anon_bytes": process["max_rss_anon_bytes"],
                "file_bytes": process["max_rss_file_bytes"],
                "seconds": step["seconds"]
                if role == "merge" else step["figures"]["step_seconds"][process["role"]],
            })  # fmt: skip
        # The step's output and its whole tree's largest RSS at once, on its last row.
        rows[-1]["output_bytes"] = step["output_bytes"]
        rows[-1]["tree_bytes"] = step["max_tree_rss_bytes"]
    return rows


def table(report: dict) -> str:
    m = report["machine"]
    lines = [
        "## Memory and time of every export process (merge: nf4, bfloat16, 256 MiB shards)",
        "",
        "| model | parameters | step (process) | output | peak RSS (VmHWM) | anonymous "
        "| file-backed | all processes at once | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in report["models"]:
        name = f"Llama {model['hidden_size']}, {model['layers']} layers"
        for row in step_rows(model):
            output = f"{mib(row['output_bytes'])} MiB" if "output_bytes" in row else ""
            tree = f"{mib(row['tree_bytes'])} MiB" if "tree_bytes" in row else ""
            lines.append(
                f"| {name} | {model['parameters'] / 1e9:.2f}B | {row['step']} | {output} | "
                f"{mib(row['peak_rss_bytes'])} MiB | {mib(row['anon_bytes'])} MiB | "
                f"{mib(row['file_bytes'])} MiB | {tree} | {row['seconds']:.1f} s |"
            )
    lines += [
        "",
        "Wall time: the merge's own, each GGUF step's (the child's start included); a GGUF "
        "export's whole time is the sum of its steps plus about a second.",
        "",
        f"CPU {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}, "
        f"transformers {m['transformers']}, llama-cpp-python {m['llama_cpp_python']}; load "
        f"average {report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} "
        "after.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_gguf(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 22, 40])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="one small model (the test's)")
    args = parser.parse_args()
    import llama_cpp

    from bench.training import machine_info
    from worker.training.sentencepiece_tokenizer import sentencepiece_llama_tokenizer

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tokenizer = sentencepiece_llama_tokenizer()
    overrides = TOKEN_IDS | (QUICK_SHAPES if args.quick else {})
    sizes = [2] if args.quick else args.layers
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        models = [measure_model(layers, Path(tmp), tokenizer, overrides) for layers in sizes]
    report = {
        "machine": machine_info("cpu") | {"llama_cpp_python": llama_cpp.__version__},
        "shard_bytes": SHARD_BYTES,
        "models": models,
        "load_average": [load_before, os.getloadavg()[0]],
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "export-cpu.md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
