"""Tests that need a CUDA GPU: marked `gpu`, skipped without one. bench/gpu_check.sh runs
them on the lent GPU machine (`pytest -m gpu tests/gpu --confcutdir=tests/gpu`: they use
no Postgres, Redis or S3, so tests/conftest.py, which starts those, stays out)."""

from __future__ import annotations

import pytest

try:
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - the worker extra is installed wherever tests run
    CUDA = False

GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
