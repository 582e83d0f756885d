"""/v1/models: the base models this deployment allows and the team's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.domain.jobs import JobKind, JobStatus
from app.errors import NotFound
from app.models import Job
from app.schemas.jobs import Model, ModelList
from app.services.base_models import describe

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(*COMMON_ERRORS))


def _all_models(session: SessionDep, settings: SettingsDep, team: TeamDep) -> list[Model]:
    kinds = {m.name: describe(settings, m).kind.value for m in settings.base_models}
    base = [Model(id=name, created=0, owned_by="lathe", kind=kind) for name, kind in kinds.items()]
    tuned = session.execute(
        select(Job.fine_tuned_model, Job.finished_at, Job.model)
        .where(
            Job.team_pk == team.pk,
            Job.kind == JobKind.FINE_TUNE,
            Job.status == JobStatus.SUCCEEDED.value,
        )
        .order_by(Job.pk.desc())
    )
    return base + [
        Model(id=name, created=finished or 0, owned_by=team.id, kind=kinds.get(base_name))
        for name, finished, base_name in tuned
    ]


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, settings: SettingsDep, team: TeamDep) -> ModelList:
    return ModelList(data=_all_models(session, settings, team))


@router.get("/{model_id:path}", response_model=Model)
def retrieve_model(
    model_id: str, session: SessionDep, settings: SettingsDep, team: TeamDep
) -> Model:
    for model in _all_models(session, settings, team):
        if model.id == model_id:
            return model
    raise NotFound(f"no model {model_id!r}", code="model_not_found", param="model")
