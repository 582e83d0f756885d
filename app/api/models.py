"""/v1/models: the base models this deployment allows and the team's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.errors import NotFound
from app.models import Job

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(*COMMON_ERRORS))


def _model_object(model_id: str, created: int, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def _all_models(session: SessionDep, settings: SettingsDep, team: TeamDep) -> list[dict]:
    base = [_model_object(m.name, 0, "lathe") for m in settings.base_models]
    tuned = session.execute(
        select(Job.fine_tuned_model, Job.finished_at)
        .where(Job.team_pk == team.pk, Job.status == "succeeded")
        .order_by(Job.pk.desc())
    )
    return base + [_model_object(name, finished or 0, team.id) for name, finished in tuned]


@router.get("")
def list_models(session: SessionDep, settings: SettingsDep, team: TeamDep) -> dict:
    return {"object": "list", "data": _all_models(session, settings, team)}


@router.get("/{model_id:path}")
def retrieve_model(model_id: str, session: SessionDep, settings: SettingsDep, team: TeamDep):
    for model in _all_models(session, settings, team):
        if model["id"] == model_id:
            return model
    raise NotFound(f"no model {model_id!r}", code="model_not_found", param="model")
