#!/usr/bin/env bash
# Download the wheels the GPU image lacks into .whl/ and check the 64 MiB limit
# (bench/gpu_wheels.py says which and why). Run here, before the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m bench.gpu_wheels "$@"
