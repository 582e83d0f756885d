#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it runs and writes).
#
# On the GPU machine, from the repository root, with .whl/ carried (bash bench/gpu_wheels.sh
# downloads it here first):   bash bench/gpu_check.sh        (results in $OUT)
# Here, on the CPU:           bash bench/gpu_check.sh --dry-run [--out DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [[ " $* " == *" --dry-run "* ]]; then
	exec "${PYTHON:-.venv/bin/python}" -m bench.gpu_check "$@"
fi
# The image's python3 holds torch; the carried wheels go on top of it, in a folder of their own.
if compgen -G ".whl/*.whl" >/dev/null; then
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
		--target /tmp/site .whl/*.whl || exit 1
	export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
	echo "gpu_check.sh: no wheels in .whl/ (bash bench/gpu_wheels.sh); using what is installed" >&2
fi
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
