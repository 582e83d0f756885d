"""The OpenAPI document the API serves, and checking a body against its schemas."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator


def served_document() -> dict[str, Any]:
    """The document of the app as create_app builds it, from settings that reach nothing
    (building the app connects to no server)."""
    from app.config import Settings
    from app.main import create_app

    app = create_app(
        Settings(
            database_url="postgresql+psycopg://spec@127.0.0.1:9/spec",
            broker_url="redis://127.0.0.1:9/0",
            storage_url="s3://spec/lathe",
            scheduler_in_api=False,
        )
    )
    return app.openapi()


def component_validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    """A validator for the document's schema `name` (#/components/schemas/name), its $refs
    resolved within the document (OpenAPI 3.1's schemas are JSON Schema 2020-12)."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return Draft202012Validator(schema)


def schema_errors(document: dict[str, Any], name: str, instance: Any) -> list[str]:
    """What in `instance` the document's schema `name` does not allow, one line each."""
    errors = component_validator(document, name).iter_errors(instance)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
