"""Typed FastAPI dependencies: the database session, the caller's team, the object store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Unauthorized
from app.models import Team
from app.services.teams import team_for_key
from app.storage import ObjectStore


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def current_team(request: Request, session: SessionDep) -> Team:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    team = team_for_key(session, key.strip())
    if team is None:
        raise Unauthorized("invalid or revoked API key", code="invalid_api_key")
    return team


TeamDep = Annotated[Team, Depends(current_team)]
