"""/v1/models: the base models this deployment allows and the team's fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.errors import NotFound
from app.schemas.jobs import Model, ModelList
from app.services.base_models import models_for

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(*COMMON_ERRORS))


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, settings: SettingsDep, team: TeamDep) -> ModelList:
    return ModelList(data=models_for(session, settings, team))


@router.get("/{model_id:path}", response_model=Model)
def retrieve_model(
    model_id: str, session: SessionDep, settings: SettingsDep, team: TeamDep
) -> Model:
    for model in models_for(session, settings, team):
        if model.id == model_id:
            return model
    raise NotFound(f"no model {model_id!r}", code="model_not_found", param="model")
