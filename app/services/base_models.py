"""What the API knows of a base model without loading it: its kind (causal or encoder), its
family, the LoRA targets a job gets by default, and its shape for the memory estimate.

Each fact comes from the deployment's declaration (BaseModelSpec) first, else from the
model's config.json when the API can read it: a local directory, which is `path`, or
models_dir/name when there is no path (Settings.base_model_path). An s3:// prefix or a hub
id is not read here (the API process fetches no model files): for those the declaration
applies, else the defaults, a causal model of unknown shape. config.json is plain JSON, so
nothing here imports transformers; a parsed file is reused until its mtime changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import BaseModelSpec, Settings
from app.domain.architectures import ModelKind, default_lora_targets, kind_from_config
from app.domain.jobs import JobKind, JobStatus
from app.domain.memory import ModelShape, parameters_from_shape
from app.models import Job, Team
from app.schemas.jobs import Model

log = logging.getLogger(__name__)

# The same quantity under the names some families' config.json use (DistilBERT, GPT-2).
HIDDEN_SIZE = ("hidden_size", "dim", "n_embd", "d_model")
NUM_LAYERS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")
INTERMEDIATE_SIZE = ("intermediate_size", "hidden_dim", "n_inner")
MAX_POSITIONS = ("max_position_embeddings", "n_positions")


@dataclass(frozen=True)
class BaseModelFacts:
    kind: ModelKind
    architecture: str | None
    """config.json's model_type ("bert", "llama"), declared or read; None: unknown."""
    target_modules: list[str]
    """The LoRA targets of a job that names none."""
    shape: ModelShape | None
    """None: neither declared nor readable; the estimate then guesses from `parameters`."""
    parameters: int | None
    max_positions: int | None
    """The longest input the model takes (BERT: 512); None: unknown or unbounded."""


def config_path(settings: Settings, spec: BaseModelSpec) -> Path | None:
    """Where `spec`'s config.json is, when it is a file this process can read."""
    if spec.path and spec.path.startswith("s3://"):
        return None
    # A hub id that is not a local directory is not a directory here either: not read.
    folder = settings.base_model_path(spec).expanduser()
    return folder / "config.json"


@lru_cache(maxsize=64)
def _parse(path: str, mtime_ns: int) -> dict[str, Any] | None:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        log.warning("cannot read %s: %s; its model's declaration or defaults apply", path, error)
        return None
    return config if isinstance(config, dict) else None


def read_config(path: Path | None) -> dict[str, Any]:
    """The parsed config.json, or {} when there is none to read."""
    if path is None:
        return {}
    try:
        mtime_ns = path.stat().st_mtime_ns
    except OSError:
        return {}
    return _parse(str(path), mtime_ns) or {}


def _first_int(config: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def describe(settings: Settings, spec: BaseModelSpec) -> BaseModelFacts:
    """`spec`'s kind, family, default LoRA targets and shape: declared, else read."""
    config = read_config(config_path(settings, spec))
    kind = ModelKind(spec.kind) if spec.kind else kind_from_config(config)
    model_type = config.get("model_type")
    architecture = spec.architecture or (model_type if isinstance(model_type, str) else None)
    targets = list(spec.target_modules or default_lora_targets(kind, architecture))

    hidden_size = spec.hidden_size or _first_int(config, HIDDEN_SIZE)
    num_layers = spec.num_layers or _first_int(config, NUM_LAYERS)
    vocab_size = spec.vocab_size or _first_int(config, ("vocab_size",))
    intermediate_size = _first_int(config, INTERMEDIATE_SIZE)
    parameters = spec.parameters
    shape = None
    if hidden_size and num_layers:
        vocab_size = vocab_size or 32000
        if parameters is None:
            parameters = parameters_from_shape(
                kind,
                hidden_size=hidden_size,
                num_layers=num_layers,
                vocab_size=vocab_size,
                intermediate_size=intermediate_size,
            )
        shape = ModelShape(
            parameters=parameters,
            hidden_size=hidden_size,
            num_layers=num_layers,
            vocab_size=vocab_size,
            intermediate_size=intermediate_size,
        )
    return BaseModelFacts(
        kind=kind,
        architecture=architecture,
        target_modules=targets,
        shape=shape,
        parameters=parameters,
        max_positions=_first_int(config, MAX_POSITIONS),
    )


def models_for(session: Session, settings: Settings, team: Team) -> list[Model]:
    """What the team may train on or use (GET /v1/models, the launch form's model list):
    the deployment's base models with their kind, then the team's fine-tuned models,
    newest first."""
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
