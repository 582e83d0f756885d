"""The wheels the GPU machine's image lacks, downloaded into .whl/ (git-ignored) for the
device check (bench/gpu_check.py), and the size check: `bash bench/gpu_wheels.sh`.

The device machine (one H200) has Python 3.12 with torch, transformers, peft, accelerate,
triton and most of the scientific stack, but no network: whatever else Lathe's training
path imports travels with the working tree as wheels, at most 64 MiB together with the
tree. Carried, at the versions pyproject.toml pins (its unpinned dependencies at the
versions this venv resolved):

- the worker's training stack: bitsandbytes, transformers and peft (the image has older
  ones; Lathe is written against the pins), trl and datasets (worker.training.dpo is
  imported by worker.training.run), datasets' dill and multiprocess, liger-kernel;
- what worker.registry and app.config import: sqlalchemy, pydantic and pydantic-settings
  with their pydantic-core, annotated-types, typing-inspection and python-dotenv.

bitsandbytes' wheel holds one native library per CUDA release (43 MB); the image's torch is
a CUDA 13 build, so the copy carried keeps the CUDA 13 and CPU libraries only (RECORD
rewritten to match), which bitsandbytes picks by torch.version.cuda.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT_BYTES = 64 * 2**20  # the device tool's limit on what travels, tree and carried paths
PYTHON_VERSION = "3.12"  # the image's python3 (the device tool's KINDS.md)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Pinned in pyproject.toml (the worker extra or the service's dependencies).
PINNED = (
    "bitsandbytes",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "liger-kernel",
    "sqlalchemy",
    "pydantic",
    "pydantic-settings",
)
# Their dependencies the image lacks, at the versions installed here.
UNPINNED = (
    "dill",
    "multiprocess",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "python-dotenv",
)
# bitsandbytes' native libraries kept: what a CUDA 13 torch loads, and the CPU fallback.
BNB_KEEP = re.compile(r"libbitsandbytes_(cuda13\d|cpu)\.so$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """name -> version for every exact pin in pyproject.toml (dependencies and extras)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    found = {}
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", line)
        if match:
            found[normalise(match.group(1))] = match.group(3)
    return found


def requirements() -> list[str]:
    """NAME==VERSION for every wheel the device needs carried."""
    pinned = pins()
    missing = [name for name in PINNED if normalise(name) not in pinned]
    if missing:
        raise SystemExit(f"pyproject.toml pins none of {missing}")
    out = [f"{name}=={pinned[normalise(name)]}" for name in PINNED]
    out += [f"{name}=={importlib.metadata.version(name)}" for name in UNPINNED]
    return out


def download(specs: list[str], dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each: two stop the whole install
        old.unlink()
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", PYTHON_VERSION]
    command += ["--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + specs, check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def trim_bitsandbytes(wheel: Path) -> int:
    """Rewrite the wheel without the native libraries BNB_KEEP does not name; bytes saved."""
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
        kept = [
            info
            for info in src.infolist()
            if not (info.filename.endswith(".so") and not BNB_KEEP.search(info.filename))
        ]
        record = next(i for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info is record:
                continue
            data = src.read(info)
            out.writestr(info, data)
            lines.append(record_line(info.filename, data))
        lines.append(f"{record.filename},,")
        out.writestr(record, "\n".join(lines) + "\n")
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


IMAGE_PACKAGES = ROOT / "bench" / "gpu_image_packages.txt"
# What bench/gpu_check.py runs on the device imports these (and tests/gpu).
GPU_MODULES = (
    "worker.training.run",
    "worker.registry",
    "app.domain.memory",
    "bench.training",
    "bench.recipe",
    "bench.gpu_check",
    "tests.gpu.test_training_cuda",
    "tests.gpu.test_packing_cuda",
    "tests.gpu.test_hardware_cuda",
    "tests.gpu.test_memory_estimate_cuda",
    "tests.gpu.test_distributed_cuda",
    "worker.training.distributed",
)
# Run in a fresh interpreter: every top-level module that Lathe's own code (app, worker,
# bench, tests) imports itself, as it imports GPU_MODULES. What those packages import in
# turn is their own affair: transformers, say, imports wandb only where it is installed.
_DIRECT_IMPORTS = """
import builtins, importlib, json, sys
own = ("app", "worker", "bench", "tests")
original, found = builtins.__import__, set()
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and importer.split(".")[0] in own:
        found.add(name.split(".")[0])
    return original(name, globals, locals, fromlist, level)
builtins.__import__ = spy
for module in sys.argv[1:]:
    importlib.import_module(module)
print(json.dumps(sorted(found - set(sys.stdlib_module_names) - set(own))))
"""


def image_packages() -> set[str]:
    lines = IMAGE_PACKAGES.read_text().splitlines()
    return {normalise(line) for line in lines if line.strip() and not line.startswith("#")}


def uncovered() -> dict[str, str]:
    """Distributions the GPU path needs that neither the image nor the carried wheels give:
    {name: what needs it}. Lathe's direct imports, then the requirements of every carried
    wheel, recursively (an image package's own requirements are the image's affair)."""
    from packaging.requirements import Requirement

    found = subprocess.run(
        [sys.executable, "-c", _DIRECT_IMPORTS, *GPU_MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = json.loads(found.stdout.strip().splitlines()[-1])
    owners = importlib.metadata.packages_distributions()
    image = image_packages()
    carried = {normalise(spec.split("==")[0]) for spec in requirements()}
    queue = [(normalise(owners.get(m, [m])[0]), f"import {m}") for m in modules]
    missing, seen = {}, set()
    while queue:
        name, why = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in image:
            continue
        if name not in carried:
            missing[name] = why
            continue
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append((normalise(requirement.name), f"{name} requires it"))
    return missing


def tree_bytes(root: Path = ROOT) -> int:
    """What travels besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = root / name.decode()
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def size_report(dest: Path) -> tuple[int, int, list[tuple[str, int]]]:
    wheels = sorted((w.name, w.stat().st_size) for w in dest.glob("*.whl"))
    return tree_bytes(), sum(size for _, size in wheels), wheels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only the size check")
    parser.add_argument("--list", action="store_true", help="only print the requirements")
    args = parser.parse_args()
    if args.list:
        print("\n".join(requirements()))
        return
    if not args.check:
        download(requirements(), WHEELS)
        for wheel in WHEELS.glob("bitsandbytes-*.whl"):
            saved = trim_bitsandbytes(wheel)
            print(f"{wheel.name}: CUDA 13 and CPU libraries only ({saved / 2**20:.1f} MiB less)")
    missing = uncovered()
    for name, why in sorted(missing.items()):
        print(f"not on the image and not carried: {name} ({why})")
    tree, wheels, listing = size_report(WHEELS)
    for name, size in listing:
        print(f"{size / 2**20:8.2f} MiB  {name}")
    total = tree + wheels
    print(
        f"tree {tree / 2**20:.1f} MiB + wheels {wheels / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
        f"of {LIMIT_BYTES / 2**20:.0f} MiB"
    )
    if total > LIMIT_BYTES:
        raise SystemExit("over the device tool's 64 MiB: carry less")
    if missing:
        raise SystemExit("the GPU path imports what would not be there: add it to the wheels")


if __name__ == "__main__":
    main()
