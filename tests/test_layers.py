"""The layer rules, checked on every test run so that they fail CI instead of living in memory.

Most rules are import-linter contracts in .importlinter (read it for the list); two are
allowlists, which import-linter cannot express, checked here on the source's syntax tree: the
domain layer imports only the standard library, and the worker imports from app only the
lifecycle verbs and the infrastructure beneath them. The runtime check that the API process
never loads torch is tests/test_deployment_files.py::test_the_api_process_never_imports_torch.
"""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contract_ids() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    prefix = "importlinter:contract:"
    return [s.removeprefix(prefix) for s in config.sections() if s.startswith(prefix)]


def test_the_import_contracts_are_there() -> None:
    """Without .importlinter (or with its sections renamed) the test below has no cases."""
    assert len(contract_ids()) >= 4


@pytest.mark.parametrize("contract", contract_ids())
def test_import_contract_is_kept(contract: str) -> None:
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", "--contract", contract],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports, at any depth in the file (a lazy import
    inside a function is still a dependency)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            # `from app import models` imports the module app.models.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def within(name: str, prefixes: frozenset[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def allowed(name: str, prefixes: frozenset[str]) -> bool:
    """Whether `name` is in one of `prefixes`' packages, is an object imported from one
    (`from app.models import Job` names app.models.Job), or is a package above one (`from app
    import domain` names app)."""
    return (
        within(name, prefixes)
        or within(name.rpartition(".")[0], prefixes)
        or any(p.startswith(name + ".") for p in prefixes)
    )


DOMAIN = frozenset({"app.domain"})


@pytest.mark.parametrize("path", sources("app/domain"), ids=lambda p: p.name)
def test_the_domain_layer_imports_only_the_standard_library(path: Path) -> None:
    """app/domain is pure Python: tested without a database, loadable by the API, the
    scheduler and the training child alike."""
    foreign = {
        name
        for name in imported_modules(path)
        if name.split(".")[0] not in sys.stdlib_module_names and not allowed(name, DOMAIN)
    }
    assert not foreign, foreign


# What the worker may import from app: the lifecycle verbs (the only way a job's state
# changes), and the infrastructure beneath them. Anything else in app (the job, scheduler and
# admin services, routes, web, client) either writes job state by itself or belongs to another
# process.
WORKER_MAY_IMPORT = frozenset(
    {
        "app.services.lifecycle",
        "app.services.events",  # progress events of a running job; no state change
        "app.services.usage",  # GPU-seconds metering
        "app.services.training_metrics",  # earlier attempts' metrics rows, read only
        "app.models",
        "app.storage",
        "app.db",
        "app.config",
        "app.domain",
        "app.compat",
        "app.lifetime",
        "app.logs",
        "app.broker",  # the Celery task name and queue names the worker consumes
    }
)


@pytest.mark.parametrize("path", sources("worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_worker_imports_from_app_only_the_lifecycle_and_infrastructure(path: Path) -> None:
    outside = {
        name
        for name in imported_modules(path)
        if name.split(".")[0] == "app" and not allowed(name, WORKER_MAY_IMPORT)
    }
    assert not outside, outside
