"""The shared helpers (deepseek_ext/utils) and the rule that production code never imports the test oracles."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import deepseek_ext
from deepseek_ext.utils import dequantize_weight, matches, padded_k, unpack_codes

PACKAGE = Path(deepseek_ext.__file__).parent


def test_matches_whole_components_and_globs():
    assert matches("layer.0", "bert.encoder.layer.0.attention")
    assert not matches("layer.0", "bert.encoder.layer.01")
    assert matches("layer.[01]", "enc.layer.1.q") and not matches("layer.[01]", "enc.layer.2.q")
    assert not matches("", "anything")


def test_int4_unpacking_and_dequantisation():
    codes = torch.tensor([[0x21, 0x43] * 8], dtype=torch.uint8)  # 32 nibbles: 16 low halves, then 16 high halves
    got = unpack_codes(codes, 4)
    assert got.shape == (1, 32)
    assert got[0, :16].tolist() == [1, 3] * 8 and got[0, 16:].tolist() == [2, 4] * 8
    assert padded_k(33, 0) == 64 and padded_k(10, 16) == 16 and padded_k(0, 0) == 32
    w = dequantize_weight(got.to(torch.uint8), torch.tensor([[0.5]]), torch.tensor([[2]]), 8, 0, 30)
    torch.testing.assert_close(w, 0.5 * (got[:, :30] - 2).float())


def test_production_code_never_imports_the_reference_oracles():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "reference":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = (node.module or "").split(".") + [a.name for a in node.names if node.module is None]
            elif isinstance(node, ast.Import):
                names = [part for a in node.names for part in a.name.split(".")]
            else:
                continue
            if "reference" in names:
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
