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


if __name__ == "__main__":
    main()
