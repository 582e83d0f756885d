# Lathe: `make demo` and `make test` are the quick start (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVICE ?= cpu

# llama.cpp's GGUF converter (worker/export/gguf.py): convert_hf_to_gguf.py and its conversion/
# and gguf-py/ packages, taken from the source distribution of the llama-cpp-python that
# pyproject.toml pins (pip builds the package itself from that sdist: minutes on a fresh
# machine, then pip's wheel cache) and extracted once into the venv, where app.config's
# llama_cpp_dir looks. A new pin names a new stamp, so the next `make install` extracts again.
LLAMA_CPP_PYTHON := $(shell sed -n 's/^ *"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CPP_DIR := $(VENV)/share/llama.cpp
LLAMA_CPP_STAMP := $(LLAMA_CPP_DIR)/.llama-cpp-python-$(LLAMA_CPP_PYTHON)

.PHONY: install demo test test-fast bench bench-service bench-load lint serve worker clean system-deps python-venv

install: $(VENV)/.installed $(LLAMA_CPP_STAMP)

# torch is pinned to the CPU build here; Dockerfile.gpu installs the CUDA build.
$(VENV)/.installed: pyproject.toml | python-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,dev]'
	touch $@

# The converter, extracted as described above (LLAMA_CPP_DIR).
$(LLAMA_CPP_STAMP): | $(VENV)/.installed
	rm -rf $(LLAMA_CPP_DIR) $(LLAMA_CPP_DIR).partial
	mkdir -p $(LLAMA_CPP_DIR).partial/sdist
	$(BIN)/pip download -q --no-deps --no-binary :all: --dest $(LLAMA_CPP_DIR).partial/sdist \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_CPP_DIR).partial/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz \
		-C $(LLAMA_CPP_DIR).partial --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	rm -rf $(LLAMA_CPP_DIR).partial/sdist
	touch $(LLAMA_CPP_DIR).partial/$(notdir $@)
	mv $(LLAMA_CPP_DIR).partial $(LLAMA_CPP_DIR)

demo: install
	$(BIN)/lathe demo

test: system-deps install
	$(BIN)/python -m pytest -q -ra

test-fast: system-deps install
	$(BIN)/python -m pytest -q -m "not slow"

# Lathe's trainers against the tutorial recipes: SFT (bench/training.py), then DPO against
# TRL's plain DPOTrainer (bench/dpo.py); DEVICE=cuda on a GPU host, with
# BENCH_ARGS='--model /path/to/model' for a real base model (both take the same options);
# then the merged export's fidelity and memory (bench/merge.py, CPU), and the whole export's
# memory and time, merge and GGUF, every process (bench/export.py, CPU); then a simulated
# week of the GPU pool's scheduling policy, with and without preemption (bench/pool_sim.py).
bench: install
	$(BIN)/python -m bench.training --device $(DEVICE) $(BENCH_ARGS)
	$(BIN)/python -m bench.dpo --device $(DEVICE) $(BENCH_ARGS)
	$(BIN)/python -m bench.merge
	$(BIN)/python -m bench.export
	$(BIN)/python -m bench.pool_sim

# The prepared GPU check (docs/gpu.md): the wheels the GPU image lacks into .whl/ with the
# 64 MiB size check, then the same script's dry run here on the CPU. On the GPU machine,
# with .whl carried: bash bench/gpu_check.sh (results in $OUT).
.PHONY: gpu-check
gpu-check: install
	bash bench/gpu_wheels.sh
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --dry-run

# The service's benchmarks (bench/run.py): demo job, API latency, upload, GPU pool.
bench-service: install
	$(BIN)/python -m bench.run --device $(DEVICE)

# Load test (bench/load.py): 500 clients on Postgres with a worker, 100 on the embedded
# default, 2 minutes each; fails on any 5xx or a /healthz p99 over 1 s. LOAD_ARGS='--only sqlite'.
bench-load: install
	$(BIN)/python -m bench.load $(LOAD_ARGS)

lint: install
	$(BIN)/ruff check app worker tests bench migrations
	$(BIN)/ruff format --check app worker tests bench migrations

serve: install
	$(BIN)/lathe serve

worker: install
	$(BIN)/lathe worker

clean:
	rm -rf .lathe .pytest_cache

# What the machine must provide (Debian 12 package names), so that `make test` is the one
# command on a fresh machine as on a laptop (CI's .ci/run is just `make test`):
# - python3-venv: without it Debian's python3 cannot create .venv (no ensurepip);
# - postgresql, redis-server: the binaries the tests start throwaway servers from
#   (tests/conftest.py); no running service is needed;
# - chromium: Debian's browser, which Playwright drives in tests/e2e/test_dashboard.py.
# As root, apt-get installs whatever is missing, with a policy-rc.d that keeps the packages
# from starting their system services (invoke-rc.d skips any start it refuses with 101);
# otherwise the exact command to run is printed and make stops. Every check can be pointed
# elsewhere (tests/test_deployment_files.py does).
PG_CTL ?= $(firstword $(wildcard /usr/lib/postgresql/*/bin/pg_ctl) $(shell command -v pg_ctl 2>/dev/null))
REDIS_SERVER ?= $(shell command -v redis-server 2>/dev/null)
CHROMIUM ?= /usr/bin/chromium
APT_GET ?= apt-get
POLICY_RC_D ?= /usr/sbin/policy-rc.d
AS_ROOT ?= $(filter 0,$(shell id -u))

missing_venv = $(if $(shell $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && echo ok),,python3-venv)
missing_test = $(missing_venv) \
	$(if $(PG_CTL),$(if $(wildcard $(PG_CTL)),,postgresql),postgresql) \
	$(if $(REDIS_SERVER),$(if $(wildcard $(REDIS_SERVER)),,redis-server),redis-server) \
	$(if $(wildcard $(CHROMIUM)),,chromium)

# $(call apt_install,PACKAGES): install PACKAGES (none: nothing to do), as described above.
define apt_install
@missing='$(strip $(1))'; \
if [ -z "$$missing" ]; then exit 0; fi; \
if [ -z '$(AS_ROOT)' ] || ! command -v $(firstword $(APT_GET)) >/dev/null 2>&1; then \
	echo "make: missing system packages (Debian names): $$missing. Install them with:" >&2; \
	echo "  sudo $(APT_GET) update && sudo $(APT_GET) install -y --no-install-recommends $$missing" >&2; \
	exit 1; \
fi; \
export DEBIAN_FRONTEND=noninteractive; \
if [ ! -e '$(POLICY_RC_D)' ]; then \
	printf '#!/bin/sh\nexit 101\n' >'$(POLICY_RC_D)' && chmod +x '$(POLICY_RC_D)'; \
	trap "rm -f '$(POLICY_RC_D)'" EXIT; \
fi; \
echo "make: installing system packages: $$missing"; \
$(APT_GET) update && $(APT_GET) install -y --no-install-recommends $$missing
endef

python-venv:
	$(call apt_install,$(missing_venv))

system-deps:
	$(call apt_install,$(missing_test))
