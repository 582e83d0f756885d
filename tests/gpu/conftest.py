from __future__ import annotations

from pathlib import Path

import pytest

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.training.tiny_model import ensure_tiny_random_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


@pytest.fixture(autouse=True)
def fresh_peak_memory():
    """Each test's torch.cuda.max_memory_allocated is its own."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield
