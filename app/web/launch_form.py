"""The launch form's fields and how a posted form becomes a JobCreate body.

Every field's default, limits and choices are read from JobCreate's JSON schema
(app/schemas/jobs.py), so the form shows what the API accepts and never drifts from it.
Errors, pydantic's and the services' (`param`), are mapped back to the field they name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import ValidationError

from app.models import Job
from app.schemas.jobs import JobCreate

METHODS = ("supervised", "dpo")
AUTO = "auto"


@dataclass(frozen=True)
class FormField:
    """One input: `name` is the form's, `path` the body's place in JobCreate (the
    hyperparameters' under method.<type>, which the body builder fills in)."""

    name: str
    path: tuple[str, ...]
    label: str
    kind: str  # int, float, text, choice, check (a checkbox), list (comma-separated)
    section: str
    note: str = ""
    auto: bool = False  # "auto" is accepted (and is the default)
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    only_for: str | None = None  # a method the field belongs to (beta: dpo)

    @property
    def limits(self) -> str:
        """The accepted range as the page shows it ("1 to 50", "above 0, up to 10")."""
        if self.minimum is None and self.maximum is None:
            return ""
        low = "" if self.minimum is None else _num(self.minimum)
        high = "" if self.maximum is None else _num(self.maximum)
        if self.exclusive_min and self.exclusive_max:
            return f"between {low} and {high}, exclusive"
        if self.exclusive_min:
            return f"above {low}, up to {high}"
        if self.exclusive_max:
            return f"{low} up to (not including) {high}"
        return f"{low} to {high}"

    @property
    def hint(self) -> str:
        """What the page says under the input: the default, the range, and notes."""
        default = (
            "default auto"
            if self.auto
            else (f"default {self.default_text}" if self.default_text else "")
        )
        first = "; ".join(part for part in (default, self.limits) if part)
        only = f"{self.only_for.upper()} only" if self.only_for else ""
        return " · ".join(part for part in (first, only, self.note) if part)

    @property
    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return _num(self.default) if isinstance(self.default, int | float) else str(self.default)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@cache
def _schema() -> dict[str, Any]:
    return JobCreate.model_json_schema()


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """A property's schema, with its $ref followed and a nullable union's null dropped."""
    defs = _schema()["$defs"]
    while True:
        if "$ref" in node:
            node = {
                **defs[node["$ref"].rsplit("/", 1)[-1]],
                **{k: v for k, v in node.items() if k != "$ref"},
            }
            continue
        options = [o for o in node.get("anyOf", []) if o.get("type") != "null" and "const" not in o]
        if len(options) == 1 and "properties" not in node:
            merged = {**options[0], "default": node.get("default"), "_auto": _has_auto(node)}
            node = merged
            continue
        return node


def _has_auto(node: dict[str, Any]) -> bool:
    return any(o.get("const") == AUTO for o in node.get("anyOf", [])) or node.get("_auto", False)


def schema_at(path: tuple[str, ...]) -> dict[str, Any]:
    node: dict[str, Any] = _schema()
    for key in path:
        node = _resolve(node)["properties"][key]
    return _resolve(node)


def _from_schema(
    name: str, path: tuple[str, ...], label: str, section: str, **extra: Any
) -> FormField:
    schema = schema_at(path)
    kind = extra.pop("kind", None)
    if kind is None:
        kind = {"integer": "int", "number": "float", "boolean": "check"}.get(
            schema.get("type", ""), "choice" if "enum" in schema else "text"
        )
    if "enum" in schema and kind == "text":
        kind = "choice"
    return FormField(
        name=name,
        path=path,
        label=label,
        kind=kind,
        section=section,
        auto=bool(schema.get("_auto")),
        default=schema.get("default"),
        choices=tuple(extra.pop("choices", schema.get("enum", ()))),
        minimum=schema.get("minimum", schema.get("exclusiveMinimum")),
        maximum=schema.get("maximum", schema.get("exclusiveMaximum")),
        exclusive_min="exclusiveMinimum" in schema,
        exclusive_max="exclusiveMaximum" in schema,
        **extra,
    )


_HP = ("method", "dpo", "hyperparameters")  # the schema of every hyperparameter, beta too


@cache
def fields() -> tuple[FormField, ...]:
    """The form's fields beyond the model, the files and the method, in page order."""
    hp, lora, train, quant = "Hyperparameters", "LoRA adapter", "Training", "Quantization"
    where = "Resources"
    return (
        _from_schema("n_epochs", (*_HP, "n_epochs"), "Epochs", hp),
        _from_schema(
            "batch_size", (*_HP, "batch_size"), "Batch size", hp, note="split among the GPUs"
        ),
        _from_schema(
            "learning_rate_multiplier",
            (*_HP, "learning_rate_multiplier"),
            "Learning rate multiplier",
            hp,
        ),
        _from_schema("beta", (*_HP, "beta"), "Beta (DPO)", hp, only_for="dpo", note="auto: 0.1"),
        _from_schema("lora_r", ("lora", "r"), "Rank r", lora),
        _from_schema("lora_alpha", ("lora", "alpha"), "Alpha", lora),
        _from_schema("lora_dropout", ("lora", "dropout"), "Dropout", lora),
        _from_schema(
            "lora_target_modules",
            ("lora", "target_modules"),
            "Target modules",
            lora,
            kind="list",
            note="comma-separated, or all-linear; empty: the base model's default",
        ),
        _from_schema(
            "max_seq_length", ("max_seq_length",), "Max sequence length", train, note="tokens"
        ),
        _from_schema(
            "packing", ("training", "packing"), "Packing", train, note="padding-free batches"
        ),
        _from_schema(
            "train_on_inputs", ("training", "train_on_inputs"), "Loss on inputs too", train
        ),
        _from_schema("truncation", ("training", "truncation"), "Examples too long", train),
        _from_schema(
            "gradient_checkpointing",
            ("training", "gradient_checkpointing"),
            "Gradient checkpointing",
            train,
            kind="choice",
            choices=(AUTO, "true", "false"),
        ),
        _from_schema("optimizer", ("training", "optimizer"), "Optimizer", train),
        _from_schema(
            "eval_steps",
            ("training", "eval_steps"),
            "Evaluate every",
            train,
            note="steps; empty: ~10 times a run",
        ),
        _from_schema(
            "sample_max_new_tokens",
            ("training", "sample_max_new_tokens"),
            "Sample tokens",
            train,
            note="0: no sample",
        ),
        _from_schema("quant_type", ("quantization", "type"), "4-bit type", quant),
        _from_schema(
            "double_quant", ("quantization", "double_quant"), "Double quantization", quant
        ),
        _from_schema("compute_dtype", ("quantization", "compute_dtype"), "Compute dtype", quant),
        _from_schema("priority", ("priority",), "Priority", where),
        _from_schema(
            "gpu_class",
            ("gpu_class",),
            "GPU class",
            where,
            kind="choice",
            note="any: the scheduler picks one that fits",
        ),
        _from_schema("gpus", ("gpus",), "GPUs", where, note="of one host"),
        _from_schema(
            "parallelism",
            ("parallelism",),
            "Parallelism",
            where,
            note="several GPUs only; empty: chosen for you",
        ),
        _from_schema(
            "suffix", ("suffix",), "Suffix", where, note="letters, digits, - and _; up to 64"
        ),
        _from_schema("seed", ("seed",), "Seed", where, note="empty: random"),
    )


def by_name() -> dict[str, FormField]:
    return {f.name: f for f in fields()}


def defaults() -> dict[str, str]:
    """The form as a new job starts: every field at the schema's default."""
    values = {"model": "", "method": "supervised", "training_file": "", "validation_file": ""}
    for f in fields():
        if f.kind == "check":
            values[f.name] = "on" if f.default else ""
        elif f.auto:
            values[f.name] = AUTO if f.kind == "choice" else ""
        elif f.default is None:
            values[f.name] = ""
        else:
            values[f.name] = (
                str(f.default).lower() if isinstance(f.default, bool) else _num(f.default)
            )
    return values


def posted_values(form: dict[str, str]) -> dict[str, str]:
    """The posted form's values for the known fields (a missing checkbox is off)."""
    values = defaults()
    for name in values:
        raw = form.get(name, "")
        values[name] = raw.strip() if isinstance(raw, str) else ""
    return values


def _stored(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return _num(value) if isinstance(value, int | float) else str(value)


def values_from_job(job: Job) -> dict[str, str]:
    """The form filled with a job's stored settings ("run again with these settings"): its
    resolved hyperparameters, adapter, training options, resources and seed."""
    values = defaults()
    parent = job.parent if isinstance(job.parent, dict) else None
    values["model"] = str(parent.get("fine_tuned_model")) if parent else job.model
    values["method"] = job.method if job.method in METHODS else "supervised"
    values["training_file"] = job.training_file or ""
    values["validation_file"] = job.validation_file or ""
    stored = {
        "hyperparameters": job.hyperparameters or {},
        "lora": job.lora or {},
        "training": job.training or {},
        "quantization": job.quantization or {},
    }
    top = {
        "max_seq_length": job.max_seq_length,
        "priority": job.priority,
        "gpu_class": job.gpu_class,
        "gpus": job.gpus,
        "parallelism": job.parallelism,
        "suffix": job.suffix,
        "seed": job.seed,
    }
    for f in fields():
        if f.path[0] == "method":
            value = stored["hyperparameters"].get(f.path[-1])
        elif f.path[0] in stored:
            value = stored[f.path[0]].get(f.path[-1])
        else:
            value = top.get(f.path[0])
        if value is None and f.path[-1] not in ("gpu_class", "parallelism", "suffix", "eval_steps"):
            continue  # an older row without it: the default stays
        if f.kind == "check":
            values[f.name] = "on" if value else ""
        else:
            values[f.name] = _stored(value)
    return values


def _convert(f: FormField, raw: str) -> Any:
    if f.kind == "check":
        return raw == "on"
    if raw == "" or (f.auto and raw.lower() == AUTO):
        return None  # left out: the schema's default applies
    if f.kind == "choice" and raw in ("true", "false") and set(f.choices) >= {"true", "false"}:
        return raw == "true"
    if f.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError("enter a whole number" + (" or auto" if f.auto else "")) from None
    if f.kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError("enter a number" + (" or auto" if f.auto else "")) from None
    if f.kind == "list":
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def body_from(values: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The JobCreate body the form's values describe, and the fields whose values are not
    even numbers (left out of the body, so pydantic checks the others' limits)."""
    method = values.get("method") or "supervised"
    body: dict[str, Any] = {
        "model": values.get("model", ""),
        "training_file": values.get("training_file", ""),
    }
    if values.get("validation_file"):
        body["validation_file"] = values["validation_file"]
    hyperparameters: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for f in fields():
        if f.only_for and f.only_for != method:
            continue
        try:
            value = _convert(f, values.get(f.name, ""))
        except ValueError as exc:
            errors[f.name] = str(exc)
            continue
        if value is None:
            continue
        if f.path[0] == "method":
            hyperparameters[f.path[-1]] = value
            continue
        target = body
        for key in f.path[:-1]:
            target = target.setdefault(key, {})
        target[f.path[-1]] = value
    block = {"hyperparameters": hyperparameters} if hyperparameters else {}
    body["method"] = {"type": method, method: block}
    return body, errors


def field_for(param: str | None) -> str | None:
    """The form field a body path names (an error's `param`, or pydantic's loc joined by
    dots); None when no field of the form holds it."""
    if not param:
        return None
    parts = param.split(".")
    if parts[:1] == ["method"]:
        if len(parts) >= 4 and parts[2] == "hyperparameters":
            parts = ["hyperparameters", *parts[3:]]
        else:
            return "method"
    if parts[:1] == ["hyperparameters"] and len(parts) >= 2:
        return parts[1] if parts[1] in by_name() else None
    if parts[0] in ("model", "training_file", "validation_file"):
        return parts[0]
    for f in fields():
        if f.path[0] != "method" and tuple(parts[: len(f.path)]) == f.path:
            return f.name
    return None


def validation_errors(exc: ValidationError) -> tuple[dict[str, str], list[str]]:
    """pydantic's errors by form field, and those no field holds. A union's "or auto"
    alternative is dropped when the number's own error is there."""
    by_field: dict[str, str] = {}
    other: list[str] = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if not str(p).startswith(("literal[", "function-"))]
        name = field_for(".".join(loc))
        message = error["msg"].removeprefix("Value error, ")
        if name is None:
            other.append(f"{'.'.join(loc) or 'body'}: {message}")
        elif error["type"] != "literal_error" or name not in by_field:
            if name not in by_field or by_field[name].startswith("Input should be 'auto'"):
                by_field[name] = message
    return by_field, other
