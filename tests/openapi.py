"""Checking a response body against the OpenAPI document the API serves."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator


def component_validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for the document's schema `name` (#/components/schemas/name), its $refs
    resolved within the document (OpenAPI 3.1's schemas are JSON Schema 2020-12)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return Draft202012Validator(schema)


def schema_errors(document: dict[str, Any], name: str, instance: Any) -> list[str]:
    """What in `instance` the document's schema `name` does not allow, one line each."""
    errors = component_validator(document, name).iter_errors(instance)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
