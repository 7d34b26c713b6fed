"""The API reference page is generated from the docstrings and must be current; every public item documents an
example; the README points at every example script."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_page_is_current():
    text = _generator().render()
    assert (ROOT / "docs" / "reference.md").read_text() == text, "run: python scripts/gen_reference.py"


@pytest.mark.parametrize(
    "qualname,obj",
    [(f"{m}.{n}", o) for m, _, items in _generator().public_items() for n, o in items],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_public_item_has_a_docstring_with_an_example(qualname, obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 40, f"{qualname} needs a docstring"
    assert "Example:" in doc, f"{qualname}'s docstring needs an Example: section"


def test_readme_links_every_example():
    readme = (ROOT / "README.md").read_text()
    for script in sorted((ROOT / "examples").glob("[a-z]*.py")):
        assert f"examples/{script.name}" in readme, f"README.md does not mention examples/{script.name}"
