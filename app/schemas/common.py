"""What every resource's schemas share: the strict request base, the response base, OpenAI's
list envelope, the deleted-object answer, and the query and header parameters stated in the
OpenAPI document (id patterns of cursors, periods, purposes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Header, Query
from pydantic import BaseModel, ConfigDict

Auto = Literal["auto"]


class Strict(BaseModel):
    # Unknown fields are a client's typo ("lora_r"), refused with the field named.
    model_config = ConfigDict(extra="forbid")


class ApiObject(BaseModel):
    """An object the API returns. Every field is always sent (a null is sent as null, never
    left out), so the document marks every field required; no field beyond the declared
    ones, so a serializer that drifts from its model fails (a 500 in tests) instead of
    sending what the document does not say. Fields named as a row's columns are read from
    the row (`model_validate(row)`)."""

    model_config = ConfigDict(
        extra="forbid", from_attributes=True, json_schema_serialization_defaults_required=True
    )


class StoredJson(BaseModel):
    """A JSON column's known keys (a job's error, its hyperparameters), sent as stored:
    keys it may hold beyond these (older rows) pass through rather than fail the answer."""

    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


T = TypeVar("T")


class ListPage(ApiObject, Generic[T]):
    """OpenAI's list envelope: a page of objects, and the ids a client continues after
    (`after=last_id` while `has_more`)."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None
    last_id: str | None


def list_page(data: list[Any], has_more: bool) -> ListPage[Any]:
    return ListPage(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


class Deleted(ApiObject):
    """OpenAI's answer to a DELETE: the id and kind of what was deleted."""

    id: str
    object: str
    deleted: bool


# --- Rules said in the OpenAPI document -----------------------------------------------------
# What the API refuses for its form alone is stated in the document (pattern, bounds), so
# the document, generated clients and the docs match the validation; tests/api/test_fuzz.py
# checks that no request valid by the document is refused for its form. The rules below are
# enforced by the services, which answer with their own codes (invalid_cursor,
# invalid_period, invalid_url, denied_url), so they are put in the document only
# (json_schema_extra) rather than checked a second time by FastAPI with a generic code.

ID_PATTERN = "^{prefix}-[0-9a-f]{{24}}$"  # app.domain.ids.new_id


def pattern_of_string(pattern: str) -> Callable[[dict[str, Any]], None]:
    """json_schema_extra: the pattern on the string (not the null) of an optional value."""

    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "string":
                branch["pattern"] = pattern

    return extra


def _documented_query(pattern: str, description: str) -> Any:
    return Query(description=description, json_schema_extra=pattern_of_string(pattern))


def cursor(prefix: str) -> Any:
    """An optional `after` query parameter: the id of an object of the list (`ftjob-...`).
    Any other value, well-formed or not, is 400 invalid_cursor (app.services.pagination)."""
    return Annotated[
        str | None,
        _documented_query(
            ID_PATTERN.format(prefix=prefix),
            f"Continue after this object of the list (its id, `{prefix}-...`)",
        ),
    ]


JobCursor = cursor("ftjob")
EventCursor = cursor("ftevent")
CheckpointCursor = cursor("ftckpt")
FileCursor = cursor("file")
TeamCursor = cursor("team")
AuditCursor = cursor("audit")
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description="The last event received (`ftevent-...`): the stream resumes after it",
        json_schema_extra=pattern_of_string(ID_PATTERN.format(prefix="ftevent")),
    ),
]
# A file purpose to list by ("fine-tune", "fine-tune-results"); another name lists nothing.
PurposeFilter = Annotated[
    str | None, _documented_query(r"^[a-z][a-z0-9_-]{0,63}$", "Only files of this purpose")
]
# A calendar month (app.services.usage.period_bounds: else 400 invalid_period).
Period = Annotated[
    str | None,
    _documented_query(
        r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$", "A calendar month, YYYY-MM (UTC); default: this month"
    ),
]
