"""The launch form's "Check": the memory a job would need on each GPU and which of the
pool's GPU classes fit it, worked out as app.services.jobs.create_job works them out (its
base model, adapter, hyperparameters and memory estimate), without creating the job."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.memory import fitting_classes
from app.errors import BadRequest
from app.models import Team
from app.schemas.jobs import JobCreate
from app.services import jobs as jobs_service
from app.services.base_models import models_for
from app.services.pool import pool_classes

MAX_TUNED_SHOWN = 100  # fine-tuned models in the form's list, newest first


@dataclass(frozen=True)
class ClassFit:
    name: str
    memory_gb: float
    host_gpus: int
    fits: bool


@dataclass(frozen=True)
class CheckResult:
    memory_gb: float  # on each of the job's GPUs
    gpus: int
    parallelism: str | None
    hyperparameters: dict
    classes: list[ClassFit]
    examples: int
    refusal: BadRequest | None  # what Submit would be told about the pool, if anything


def model_choices(session: Session, settings: Settings, team: Team) -> list[tuple[str, str]]:
    """What GET /v1/models offers the team (services.base_models.models_for): the base
    models labelled with their kind, then the team's fine-tuned models, newest first (the
    latest 100). (name, label) pairs."""
    models = models_for(session, settings, team)
    base = [(m.id, f"{m.id} ({m.kind})") for m in models if m.owned_by == "lathe"]
    tuned = [(m.id, m.id) for m in models if m.owned_by != "lathe" and m.id]
    return base + tuned[:MAX_TUNED_SHOWN]


def check_job(session: Session, settings: Settings, team: Team, body: JobCreate) -> CheckResult:
    """The estimate for `body`; the services' BadRequest (with its `param`) for what
    create_job would refuse on the way (app.services.jobs.plan_job: an unknown model, a
    missing file, a method or parallelism the model or file cannot take, a batch that does
    not split among the GPUs); the pool's refusal (a class too small or unknown) comes
    back in the result."""
    plan = jobs_service.plan_job(session, settings, team, body)
    sizing, training = plan.sizing, plan.training
    memory_gb, parallelism = sizing.memory_gb, sizing.parallelism
    classes = pool_classes(session, settings)
    hosts = jobs_service.class_host_gpus(session, settings)
    fitting = set(fitting_classes(memory_gb, classes))
    fits = [
        ClassFit(name, gb, hosts.get(name, 1), name in fitting and hosts.get(name, 1) >= body.gpus)
        for name, gb in sorted(classes.items(), key=lambda kv: (kv[1], kv[0]))
    ]
    refusal = None
    try:  # the service's own refusal, so the Check says what Submit would
        jobs_service.check_fits_pool(session, settings, body.gpu_class, memory_gb, gpus=body.gpus)
    except BadRequest as exc:
        refusal = exc
    return CheckResult(
        round(memory_gb, 2),
        body.gpus,
        parallelism,
        sizing.hyperparameters,
        fits,
        training.examples or 0,
        refusal,
    )
