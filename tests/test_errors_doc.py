"""docs/errors.md cannot drift from the code: every error the code raises is listed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from poolq.model import ErrorType

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "errors.md").read_text()
ERRORS = {"HTTPError": 1, "InvalidRequest": 1, "NotFound": 0, "Conflict": 0, "Unavailable": 0, "TooMany": 0, "StorageFull": 0}


def _static_prefix(node: ast.expr) -> str | None:
    """The text before the first placeholder of a string or f-string argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        prefix = ""
        for part in node.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                break
            prefix += part.value
        return prefix
    return None


def raised_messages() -> list[tuple[str, str]]:
    found = []
    for path in sorted([*ROOT.glob("api_shim/**/*.py"), *ROOT.glob("poolq/**/*.py"), *ROOT.glob("worker/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS):
                continue
            position = ERRORS[node.func.id]
            if len(node.args) > position:
                prefix = _static_prefix(node.args[position])
                if prefix:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", prefix))
    return found


MESSAGES = raised_messages()


def test_the_code_raises_errors_with_messages():
    assert len(MESSAGES) > 15


@pytest.mark.parametrize("where,prefix", MESSAGES, ids=[w for w, _ in MESSAGES])
def test_every_raised_error_is_documented(where, prefix):
    # The documented pattern writes placeholders as <name>; the static text before the
    # first placeholder must appear verbatim in the table.
    assert f"`{prefix}" in DOC or prefix.strip() in DOC, f"{where}: {prefix!r} is not in docs/errors.md"


@pytest.mark.parametrize("error_type", [e.value for e in ErrorType])
def test_every_error_type_is_documented(error_type):
    assert f"| `{error_type}` |" in DOC
