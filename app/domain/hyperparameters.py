"""Resolving "auto" hyperparameters into concrete values for one job."""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
# DPO's beta when a job gives none or "auto": OpenAI's and TRL's default. The API stores
# the resolved value; the worker falls back to it for a job stored without one.
DEFAULT_BETA = 0.1


@dataclass(frozen=True)
class ResolvedHyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


def auto_batch_size(examples: int) -> int:
    """About 0.2% of the dataset, as a power of two between 1 and 32."""
    target = max(1, examples // 512)
    size = 1
    while size * 2 <= min(target, 32):
        size *= 2
    return max(size, min(8, examples))


def auto_n_epochs(examples: int) -> int:
    """Three passes, more for small sets so a job sees at least ~100 examples."""
    return max(3, min(10, -(-100 // max(examples, 1))))


def resolve(
    n_epochs: int | str,
    batch_size: int | str,
    learning_rate_multiplier: float | str,
    examples: int,
) -> ResolvedHyperparameters:
    return ResolvedHyperparameters(
        n_epochs=auto_n_epochs(examples) if n_epochs == AUTO else int(n_epochs),
        batch_size=auto_batch_size(examples) if batch_size == AUTO else int(batch_size),
        learning_rate_multiplier=(
            1.0 if learning_rate_multiplier == AUTO else float(learning_rate_multiplier)
        ),
    )
