"""A job's experiment-tracking integrations (W&B, MLflow): refused at creation when this
deployment has no tracker of that kind, since the worker could log the run nowhere."""

from __future__ import annotations

from app.config import Settings
from app.errors import BadRequest
from app.schemas.jobs import IntegrationIn

# What the operator sets, on the API and the workers, for each kind (docs/operations.md).
SETTING = {
    "wandb": "LATHE_WANDB_API_KEY (with LATHE_WANDB_BASE_URL for a self-hosted W&B server, "
    "or LATHE_WANDB_MODE=offline to keep runs on the worker's disk)",
    "mlflow": "LATHE_MLFLOW_TRACKING_URI",
}
NAME = {"wandb": "Weights & Biases", "mlflow": "MLflow"}


def _configured(settings: Settings, kind: str) -> bool:
    return settings.wandb_configured if kind == "wandb" else settings.mlflow_configured


def checked_integrations(settings: Settings, requested: list[IntegrationIn]) -> list[dict]:
    """The integrations as stored on the job (OpenAI's shape, every field present), or a
    400 naming what the operator sets for a tracker this deployment lacks."""
    seen: set[str] = set()
    for integration in requested:
        kind = integration.type
        if not _configured(settings, kind):
            raise BadRequest(
                f"{NAME[kind]} tracking is not configured on this deployment; the operator "
                f"enables it by setting {SETTING[kind]}",
                code="integration_not_configured",
                param="integrations",
            )
        if kind in seen:
            raise BadRequest(
                f"integrations has more than one {kind!r} entry; a job logs one run per tracker",
                code="duplicate_integration",
                param="integrations",
            )
        seen.add(kind)
    return [integration.stored() for integration in requested]
