"""Module-name patterns (deepseek_ext/amp/patterns.py)."""

from __future__ import annotations

import pytest

from deepseek_ext.amp.patterns import matches, normalise_groups


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("layer.0", "bert.encoder.layer.0", True),
        ("layer.0", "bert.encoder.layer.0.attention.self.query", True),
        ("layer.0", "layer.0", True),
        ("layer.0", "bert.encoder.layer.00", False),
        ("layer.0", "bert.encoder.layer.01", False),
        ("layer.0", "bert.encoder.layer.10", False),
        ("layer.0", "bert.encoder.layer", False),
        ("classifier", "classifier", True),
        ("classifier", "classifier_head", False),
        ("encoder.layer", "bert.encoder.layer.3.output", True),
        ("layer.[01]", "bert.encoder.layer.1.output", True),
        ("layer.[01]", "bert.encoder.layer.2.output", False),
        ("*.query", "bert.encoder.layer.2.attention.self.query", True),
        ("attention.*.query", "bert.encoder.layer.2.attention.self.query", True),
        ("layer.0", "", False),
    ],
)
def test_matches(pattern, name, expected):
    assert matches(pattern, name) is expected


def test_groups_accept_strings_and_lists():
    assert normalise_groups([["layer.0", "layer.1"]], "fp16_groups") == [["layer.0", "layer.1"]]
    assert normalise_groups(["classifier"], "bf16_groups") == [["classifier"]]
    assert normalise_groups("classifier", "bf16_groups") == [["classifier"]]
    assert normalise_groups(None, "fp32_groups") == []


@pytest.mark.parametrize("bad", ["", ".layer", "layer.", "a..b", 3])
def test_invalid_patterns_are_rejected(bad):
    with pytest.raises(ValueError, match="invalid module-name pattern"):
        normalise_groups([bad], "fp16_groups")
