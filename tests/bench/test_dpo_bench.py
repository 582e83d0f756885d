"""`make bench`'s DPO part (bench/dpo.py) end to end in its smoke mode, so it cannot rot
between the runs whose figures docs/benchmarks.md reports: both sides train in their own
child processes on the first 8 pairs, one step each, and the shared evaluator scores them.
Also: the bundled preference files are what bench/make_preference_data.py generates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import make_preference_data
from bench.dpo import TRAIN_FILE, VALID_FILE
from bench.recipe import MAX_LENGTH

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 8


def test_bundled_pairs_are_the_generators(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(make_preference_data, "DATA", tmp_path)
    make_preference_data.main()
    for committed in (TRAIN_FILE, VALID_FILE):
        assert (tmp_path / committed.name).read_bytes() == committed.read_bytes()


@pytest.mark.slow
def test_dpo_bench_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.dpo", "--pairs", str(PAIRS), "--epochs", "1"]
        + ["--seeds", "42", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "dpo-cpu.json").read_text())
    lathe, recipe = report["runs"]["lathe"], report["runs"]["recipe"]

    # The same work on both sides: TRL's own tokenization of the conversational rows gives
    # the tokens Lathe counts, and Lathe's Trainer saw exactly those; the recipe pads every
    # sequence of every pair to max_length.
    assert report["dataset"]["train_pairs"] == PAIRS
    assert recipe["real_tokens"] == lathe["lathe_trained_tokens"] == report["real_tokens"]
    assert recipe["padded_tokens"] == 2 * PAIRS * MAX_LENGTH
    assert lathe["steps"] == recipe["steps"] == 1  # 8 pairs, an effective batch of 8
    for r in (lathe, recipe):
        assert r["tokens_per_second"] > 0
        assert 0 < r["train_seconds"] < r["total_seconds"]
        assert r["peak_memory_bytes"] >= r["memory_at_train_begin_bytes"] > 0
        assert 0.0 <= r["reward_accuracy"] <= 1.0
        assert r["valid_loss"] > 0
    # One step moved both policies off their reference (the base): rewards are not all 0.
    assert lathe["reward_margin"] != 0 and recipe["reward_margin"] != 0
    table = (tmp_path / "dpo-cpu.md").read_text()
    assert "| lathe |" in table and "| recipe |" in table and "| lathe / recipe |" in table
