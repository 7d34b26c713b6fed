"""Writes docs/reference.md: every public class and function of deepseek_ext with its signature and docstring
(arguments, shapes, dtypes, an example). tests/test_docs.py fails when the page is out of date:
regenerate with ``python scripts/gen_reference.py``."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    ("deepseek_ext", "Loading and capabilities", ["capabilities"]),
    ("deepseek_ext.ops", "Operators", None),
    ("deepseek_ext.nn", "Drop-in modules: FP8 and fused attention", None),
    ("deepseek_ext.quant", "Quantization", None),
    ("deepseek_ext.data", "Data: DynamicSampler", None),
    ("deepseek_ext.amp", "Mixed precision: AutoMixedPrecision", None),
    ("deepseek_ext.privacy", "Differential privacy", None),
    ("deepseek_ext.distributed", "ZeRO-3 and checkpoints", None),
    ("deepseek_ext.serving", "Serving: DynamicBatcher", None),
    ("deepseek_ext.serving.server", "Serving: the reference HTTP server", ["ModelServer", "build_app", "serve"]),
]


def public_items():
    """(module name, section title, [(name, object)]) for every documented section."""
    for mod_name, title, names in SECTIONS:
        mod = importlib.import_module(mod_name)
        names = names or list(mod.__all__)
        yield mod_name, title, [(n, getattr(mod, n)) for n in names]


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = ""
    sig = re.sub(r"'([^']*)'", r"\1", sig)  # postponed annotations print quoted
    return f"class {name}{sig}" if inspect.isclass(obj) else f"{name}{sig}"


def _render_doc(doc: str) -> str:
    """Docstring text as Markdown: the ``Example:`` section becomes a Python code block."""
    out, in_example = [], False
    for line in doc.splitlines():
        if line.strip() in ("Example:", "Examples:"):
            out += ["", "Example:", "", "```python"]
            in_example = True
            continue
        if in_example and line and not line.startswith("    "):
            out.append("```")
            in_example = False
        out.append(line[4:] if in_example else line)
    if in_example:
        out.append("```")
    return "\n".join(out).strip()


def render() -> str:
    md = [
        "# deepseek-ext API reference",
        "",
        "Generated from the docstrings by `scripts/gen_reference.py` (do not edit by hand). Shapes, dtypes and",
        "semantics are each function's contract; `deepseek_ext/reference/` holds the plain-PyTorch specification of",
        "every operator.",
        "",
    ]
    for mod_name, title, items in public_items():
        md += [f"## {title} (`{mod_name}`)", ""]
        for name, obj in items:
            md += [f"### `{mod_name}.{name}`", "", "```python", _signature(name, obj), "```", ""]
            md += [_render_doc(inspect.getdoc(obj) or ""), ""]
            if inspect.isclass(obj):
                for meth_name, meth in inspect.getmembers(obj, inspect.isfunction):
                    if meth_name.startswith("_") or meth.__qualname__.split(".")[0] != obj.__name__:
                        continue
                    doc = inspect.getdoc(meth)
                    if doc:
                        md += [f"#### `{name}.{meth_name}`", "", "```python", _signature(meth_name, meth), "```", ""]
                        md += [_render_doc(doc), ""]
    return "\n".join(md).rstrip() + "\n"


if __name__ == "__main__":
    path = ROOT / "docs" / "reference.md"
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if path.exists() and path.read_text() == text else 1)
    path.write_text(text)
    print(f"wrote {path} ({len(text.splitlines())} lines)")
