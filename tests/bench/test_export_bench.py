"""bench/export.py's measuring parts, cheaply: the /proc sampler finds a grandchild's memory
(the GGUF converter is one: the process export_gguf starts), and the table has a row for
every process of every step. The full run is `python -m bench.export` (minutes)."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.export import TreeSampler, table

MIB = 2**20
GRANDCHILD = "import sys; b = b'x' * (200 * 2**20); print('ready', flush=True); sys.stdin.read()"
ROOT_PROCESS = (
    "import subprocess, sys; "
    f"sys.exit(subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]).wait())"
)


def test_sampler_finds_a_grandchilds_peak() -> None:
    root = subprocess.Popen(
        [sys.executable, "-c", ROOT_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert root.stdout.readline() == b"ready\n"  # the grandchild holds its 200 MiB
        sampler = TreeSampler(root.pid)
        deadline = time.monotonic() + 10
        while len(sampler.processes) < 2 and time.monotonic() < deadline:
            sampler.sample()
    finally:
        root.stdin.close()  # the grandchild ends, then the root
        root.wait(timeout=10)
    sampler.sample()  # both gone: nothing new, nothing lost
    peaks = sorted(sampler.processes.values(), key=lambda p: p.peak_rss_bytes)
    assert len(peaks) == 2
    small, large = peaks
    assert small.pid == root.pid and large.pid != root.pid
    assert small.peak_rss_bytes < 100 * MIB
    assert large.peak_rss_bytes >= 200 * MIB
    assert large.max_rss_anon_bytes >= 200 * MIB  # the bytes object, not a mapped file
    assert sampler.max_tree_rss_bytes >= small.peak_rss_bytes // 2 + 200 * MIB


def process(role: str, peak_mib: int, anon_mib: int) -> dict:
    return {
        "pid": 1, "role": role, "peak_rss_bytes": peak_mib * MIB,
        "max_rss_anon_bytes": anon_mib * MIB, "max_rss_file_bytes": (peak_mib - anon_mib) * MIB,
        "first_seen": 0.0, "last_seen": 1.0,
    }  # fmt: skip


def test_table_has_a_row_for_every_process() -> None:
    steps = [
        {"step": "merge", "processes": [process("merge", 900, 700)], "seconds": 4.7,
         "output_bytes": 586 * MIB, "max_tree_rss_bytes": 900 * MIB, "figures": {}},
        {"step": "gguf q8_0",
         "processes": [process("export", 600, 500), process("convert", 800, 300)],
         "seconds": 15.0, "output_bytes": 312 * MIB, "max_tree_rss_bytes": 1400 * MIB,
         "figures": {"step_seconds": {"convert": 14.0}}},
        {"step": "gguf q4_k_m",
         "processes": [process("export", 600, 500), process("convert", 800, 300),
                       process("quantize", 1000, 100)],
         "seconds": 34.0, "output_bytes": 188 * MIB, "max_tree_rss_bytes": 1600 * MIB,
         "figures": {"step_seconds": {"convert": 13.0, "quantize": 20.0}}},
    ]  # fmt: skip
    report = {
        "machine": {"cpu": "test", "cores": 2, "memory_gib": 24, "torch": "t",
                    "transformers": "tf", "llama_cpp_python": "l"},
        "models": [{"layers": 4, "parameters": 310_000_000, "hidden_size": 2048, "steps": steps}],
        "load_average": [1.0, 2.0],
    }  # fmt: skip
    rows = [line for line in table(report).splitlines() if line.startswith("| Llama 2048")]
    assert rows == [
        "| Llama 2048, 4 layers | 0.31B | merge | 586 MiB | 900 MiB | 700 MiB | 200 MiB "
        "| 900 MiB | 4.7 s |",
        "| Llama 2048, 4 layers | 0.31B | gguf q8_0: convert | 312 MiB | 800 MiB | 300 MiB "
        "| 500 MiB | 1,400 MiB | 14.0 s |",
        "| Llama 2048, 4 layers | 0.31B | gguf q4_k_m: convert to f16 |  | 800 MiB | 300 MiB "
        "| 500 MiB |  | 13.0 s |",
        "| Llama 2048, 4 layers | 0.31B | gguf q4_k_m: quantize | 188 MiB | 1,000 MiB "
        "| 100 MiB | 900 MiB | 1,600 MiB | 20.0 s |",
    ]
