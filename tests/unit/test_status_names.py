"""Job statuses and worker states are named by their enums (app.domain.jobs.JobStatus,
app.domain.workers.WorkerState) outside the domain layer, not spelled as string literals:
a typo in a literal ("canceled") is a comparison that is silently never true.

Checked on the syntax tree of app/, worker/ and bench/: a status compared (==, !=, in), a
`.status` attribute set, a `status=` argument or a column's in_() given as one of the
enums' strings fails.
SQL text and JSON field names (dict keys such as the queue view's "queued" count) are
strings of another kind and are not looked at.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.domain.jobs import JobStatus
from app.domain.workers import WorkerState

ROOT = Path(__file__).resolve().parents[2]
NAMES = frozenset(s.value for s in JobStatus) | frozenset(s.value for s in WorkerState)


def sources() -> list[Path]:
    return sorted(
        path
        for folder in ("app", "worker", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if path.relative_to(ROOT).parts[:2] != ("app", "domain")  # where they are defined
    )


def _literals(node: ast.AST) -> list[str]:
    """The status strings `node` spells: a constant, or a tuple, list or set of them."""
    if isinstance(node, ast.Constant) and node.value in NAMES:
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [name for element in node.elts for name in _literals(element)]
    return []


def status_literals(source: str) -> list[tuple[int, str]]:
    """(line, status string) for each status spelled as a literal in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        spelled: list[str] = []
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                spelled += _literals(side)
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in node.targets):
                spelled += _literals(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "status":
            spelled += _literals(node.value)
        elif (  # SQLAlchemy's column.in_(...) / not_in(...)
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("in_", "not_in")
        ):
            for argument in node.args:
                spelled += _literals(argument)
        found += [(node.lineno, name) for name in spelled]
    return sorted(found)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_statuses_are_named_by_their_enums(path: Path) -> None:
    assert status_literals(path.read_text()) == []


def test_the_check_sees_each_shape_and_not_json_field_names() -> None:
    source = (
        'if job.status == "running": pass\n'
        'if w["status"] in ("draining", "drained"): pass\n'
        'row.status = "lost"\n'
        'update(Worker).values(status="stopped")\n'
        'select(Job).where(Job.status.in_(("queued", "paused")))\n'
        'counts = {"queued": 0, "status": "failed"}\n'  # JSON: a field name, a webhook's state
        "if job.status == JobStatus.PAUSED: pass\n"
    )
    assert status_literals(source) == [
        (1, "running"),
        (2, "drained"),
        (2, "draining"),
        (3, "lost"),
        (4, "stopped"),
        (5, "paused"),
        (5, "queued"),
    ]
