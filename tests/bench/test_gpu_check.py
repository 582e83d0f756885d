"""The prepared GPU check (bench/gpu_check.sh) cannot rot: its --dry-run, the same script on
the CPU with tiny shapes, writes the result files with every figure the device run would;
and the wheels it carries stay the pins, within the device tool's 64 MiB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check, gpu_wheels

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "tokens_per_second_ratio",
    "peak_memory_ratio",
    "flops_fraction",
    "peak_memory_gib",
    "memory_estimate_error",
}


@pytest.mark.slow
def test_the_dry_run_writes_every_part_and_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    names = {p.name for p in out.iterdir()}
    assert {"gpu-check.json", "gpu-check.md", "gpu-check.log", "gpu-tests.xml"} <= names
    # What the device tool brings back: at most 8 files, plain names.
    assert len(names) <= 8 and all(
        n.replace(".", "").replace("-", "").replace("_", "").isalnum() for n in names
    )
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    assert list(report["parts"]) == list(gpu_check.DRY_BUDGETS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error_tail"))
        assert part["seconds"] <= part["budget_seconds"] + 5
    tests = report["parts"]["gpu-tests"]["result"]
    counts = tests["counts"]
    assert tests["passed"] and counts["skipped"] == counts["tests"] > 0, "no CUDA: all skipped"
    assert "tests/gpu/test_training_cuda.py::" in (out / "gpu-check.log").read_text()
    for shape in gpu_check.DRY_SHAPES:
        bench = report["parts"][f"bench-{shape}"]["result"]
        assert set(bench["figures"]) == FIGURES
        for figure in bench["figures"].values():
            assert set(figure) == {"value", "target", "applies", "pass"}
        for side in ("lathe", "recipe"):
            run = bench["runs"][side]
            assert run["tokens_per_second"] > 0 and run["peak_memory_bytes"] > 0
        assert bench["figures"]["tokens_per_second_ratio"]["value"] > 0
        assert bench["figures"]["flops_fraction"]["value"] is None, "no bf16 rate on the CPU"
        assert bench["memory_estimate_gb"]["total"] > 0
    markdown = (out / "gpu-check.md").read_text()
    assert "tokens_per_second_ratio" in markdown and "| bench-tiny-tied | ok |" in markdown


def test_the_wheels_are_the_pins_and_fit(tmp_path: Path) -> None:
    pins = gpu_wheels.pins()
    wanted = gpu_wheels.requirements()
    assert "bitsandbytes==" + pins["bitsandbytes"] in wanted
    assert "transformers==" + pins["transformers"] in wanted
    names = [w.split("==")[0] for w in wanted]
    assert len(names) == len(set(names)), "one version of each"
    # The tree alone leaves room for the wheels (30 MiB when last downloaded).
    assert gpu_wheels.tree_bytes() < gpu_wheels.LIMIT_BYTES - 35 * 2**20


def test_trimming_bitsandbytes_keeps_cuda_13_and_cpu_and_a_true_record(tmp_path: Path) -> None:
    wheel = tmp_path / "bitsandbytes-0.0.0-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cuda118", "cuda128", "cuda130", "cuda132", "cpu", "rocm72"]
    with zipfile.ZipFile(wheel, "w") as z:
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", lib * 1000)
        z.writestr("bitsandbytes/__init__.py", "")
        z.writestr("bitsandbytes-0.0.0.dist-info/RECORD", "stale")

    assert gpu_wheels.trim_bitsandbytes(wheel) > 0

    with zipfile.ZipFile(wheel) as z:
        kept = sorted(
            n.removeprefix("bitsandbytes/libbitsandbytes_")
            for n in z.namelist()
            if n.endswith(".so")
        )
        record = z.read("bitsandbytes-0.0.0.dist-info/RECORD").decode().splitlines()
        assert kept == ["cpu.so", "cuda130.so", "cuda132.so"]
        for line in record[:-1]:
            name, digest, size = line.split(",")
            assert int(size) == len(z.read(name)), name
        assert record[-1] == "bitsandbytes-0.0.0.dist-info/RECORD,,"


@pytest.mark.slow
def test_the_gpu_path_imports_nothing_the_image_and_the_wheels_lack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert gpu_wheels.uncovered() == {}

    # The control: without two of the wheels, both are named, one as Lathe's own import
    # (worker.registry), one as a carried wheel's requirement (datasets needs dill).
    carried = gpu_wheels.requirements()
    monkeypatch.setattr(
        gpu_wheels,
        "requirements",
        lambda: [r for r in carried if not r.startswith(("sqlalchemy==", "dill=="))],
    )
    missing = gpu_wheels.uncovered()
    assert set(missing) == {"sqlalchemy", "dill"}
    assert missing["sqlalchemy"] == "import sqlalchemy"


def test_a_part_past_its_budget_is_killed_with_its_children(tmp_path: Path) -> None:
    # A bench part's training children hold the GPU: the whole process group goes.
    pidfile = tmp_path / "child.pid"
    ran = gpu_check.run_group(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=3)

    assert ran["timed_out"] and ran["seconds"] < 30
    child = int(pidfile.read_text())

    def alive() -> bool:  # a zombie (state Z) is dead, only not yet reaped by init
        stat = Path(f"/proc/{child}/stat")
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the kernel for the killed child, not synchronising
    assert not alive(), "the grandchild outlived the timeout"
