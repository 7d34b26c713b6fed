"""transformers' layer classes that deepseek_ext treats as its own kinds of layer, found only when transformers is
already loaded (a model holding one has imported them; deepseek_ext never imports transformers itself)."""

from __future__ import annotations

import sys


def conv1d() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2 and its descendants): ``x @ weight + bias`` with ``weight`` of
    shape ``(in, out)``, the Linear of ``weight.t()``."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_likes() -> tuple[type, ...]:
    """``nn.Linear`` subclasses whose own forward computes exactly ``x @ weight.T + bias`` (FalconLinear)."""
    falcon = getattr(sys.modules.get("transformers.models.falcon.modeling_falcon"), "FalconLinear", None)
    return (falcon,) if falcon is not None else ()
