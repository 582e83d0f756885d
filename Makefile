# Lathe: `make demo` and `make test` are the quick start (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICE ?= cpu

.PHONY: install demo test test-fast bench bench-service lint serve worker clean

install: $(VENV)/.installed

# torch is pinned to the CPU build here; Dockerfile.gpu installs the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,dev]'
	touch $@

demo: install
	$(BIN)/lathe demo

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Lathe's trainer against the tutorial QLoRA recipe (bench/training.py); DEVICE=cuda on a
# GPU host, with BENCH_ARGS='--model /path/to/model' for a real base model.
bench: install
	$(BIN)/python -m bench.training --device $(DEVICE) $(BENCH_ARGS)

# The service's benchmarks (bench/run.py): demo job, API latency, upload, GPU pool.
bench-service: install
	$(BIN)/python -m bench.run --device $(DEVICE)

lint: install
	$(BIN)/ruff check app worker tests bench migrations
	$(BIN)/ruff format --check app worker tests bench migrations

serve: install
	$(BIN)/lathe serve

worker: install
	$(BIN)/lathe worker

clean:
	rm -rf .lathe .pytest_cache
