"""FP8 training and inference for ``nn.Linear``: :class:`FP8Linear` and :func:`convert_to_fp8`.

Forward: activations and weights are quantised to float8_e4m3fn with current (just-in-time) scaling and multiplied
by :func:`deepseek_ext.ops.fp8_matmul` with float32 accumulation. Backward: the output gradient is quantised to
float8_e5m2 (more range, as gradients need) and both ``grad_input = grad_out @ W`` and
``grad_weight = grad_out^T @ x`` go through ``fp8_matmul``. The master weight stays in its own dtype and is what the
optimizer updates. The scaling granularity has the names of :func:`deepseek_ext.ops.quantize_fp8`:

* ``'tensor'``: one scale per tensor.
* ``'row'``: one scale per row of the left operand and per column of the right one (each operand is
  re-quantised along the right axis for the backward products).
* ``'block'``: DeepSeek-V3's fine grain: 1 x 128 groups (the ops' ``'group'``) for activations and gradients,
  128 x 128 blocks for weights.

``'tensorwise'``, ``'rowwise'`` and ``'blockwise'`` (and the ``recipe=`` keyword) are the deprecated former names.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import _transformers
from ..ops.fp8 import DEFAULT_FP8_DTYPE, fp8_matmul, quantize_fp8
from ..utils.names import matches

E4M3, E5M2 = DEFAULT_FP8_DTYPE, torch.float8_e5m2
GRANULARITIES = ("tensor", "row", "block")
RECIPES = ("tensorwise", "rowwise", "blockwise")  # the deprecated names, in GRANULARITIES' order
_FORMER_NAMES = dict(zip(RECIPES, GRANULARITIES))
BLOCK = 128


def resolve_granularity(owner: str, granularity: str | None, recipe: str | None = None, stacklevel: int = 3) -> str:
    """The granularity named by ``granularity`` (default ``'tensor'``) or by the deprecated ``recipe=``; the former
    names ``'tensorwise'``/``'rowwise'``/``'blockwise'`` are accepted with a ``DeprecationWarning``.

    Example:
        >>> resolve_granularity("FP8Linear", "row")
        'row'
    """
    if recipe is not None:
        if granularity is not None:
            raise TypeError(f"{owner}: pass granularity= alone (recipe= is its deprecated name)")
        warnings.warn(f"{owner}: recipe= is deprecated, use granularity=", DeprecationWarning, stacklevel=stacklevel)
        granularity = _FORMER_NAMES.get(recipe, recipe)  # one warning is enough
    if granularity is None:
        return "tensor"
    if granularity in _FORMER_NAMES:
        new = _FORMER_NAMES[granularity]
        warnings.warn(
            f"{owner}: granularity {granularity!r} is deprecated, use {new!r}",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return new
    if granularity not in GRANULARITIES:
        raise ValueError(f"{owner}: expected granularity to be 'tensor', 'row' or 'block', but got {granularity!r}")
    return granularity


def _left(x: torch.Tensor, dtype, granularity: str):
    """Quantise x (M, K) as the left operand of a product contracting K."""
    if granularity == "block":
        return quantize_fp8(x, dtype, "group", BLOCK)
    return quantize_fp8(x, dtype, granularity)


def _right(w: torch.Tensor, dtype, granularity: str):
    """Quantise w (K, N) as the right operand of a product contracting K: (w_fp8 (K, N), scale)."""
    if granularity == "row":  # per column of w: rows of w^T
        q, s = quantize_fp8(w.t().contiguous(), dtype, "row")
        return q.t(), s.t()
    return quantize_fp8(w.contiguous(), dtype, granularity, BLOCK)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, granularity, x_q=None):
        xq, sx = _left(x, E4M3, granularity) if x_q is None else x_q
        wq, sw = _right(weight.t(), E4M3, granularity)
        y = fp8_matmul(xq, wq, sx, sw, bias, x.dtype, BLOCK)
        ctx.save_for_backward(x, weight)
        ctx.granularity = granularity
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        granularity = ctx.granularity
        g = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            gq, sg = _left(g, E5M2, granularity)
            wq, sw = _right(weight, E4M3, granularity)
            grad_x = fp8_matmul(gq, wq, sg, sw, None, x.dtype, BLOCK)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K)
            gtq, sgt = _left(g.t().contiguous(), E5M2, granularity)
            xq, sx = _right(x, E4M3, granularity)
            grad_w = fp8_matmul(gtq, xq, sgt, sx, None, weight.dtype, BLOCK)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


class _FP8Compute:
    """What FP8Linear and FP8Conv1D share: the granularity, the scaling mode and the delayed-scaling history."""

    def _setup_fp8(self, granularity: str | None, scaling: str, amax_history_len: int, recipe: str | None) -> None:
        owner = type(self).__name__
        granularity = resolve_granularity(owner, granularity, recipe, stacklevel=4)
        if scaling not in ("current", "delayed"):
            raise ValueError(f"{owner}: scaling must be 'current' or 'delayed', got {scaling!r}")
        if scaling == "delayed" and granularity != "tensor":
            raise ValueError(f"{owner}: delayed scaling is implemented for granularity='tensor'")
        self.granularity = granularity
        self.scaling = scaling
        self.register_buffer("amax_history", torch.zeros(amax_history_len, device=self.weight.device), persistent=False)

    def _delayed_quantize(self, x2d: torch.Tensor):
        amax = x2d.detach().abs().amax().float()
        history = self.amax_history
        ref = torch.where(history.max() > 0, history.max(), amax)  # first step: nothing recorded yet
        scale = ref.clamp_min(1e-12) / 448.0
        q = (x2d.float() / scale).clamp(-448.0, 448.0).to(E4M3)
        if self.training:
            self.amax_history.copy_(torch.cat([amax.view(1), history[:-1]]))
        return q, scale.reshape(())

    @property
    def recipe(self) -> str:
        """Deprecated: the former name of :attr:`granularity` (``'tensorwise'``, ``'rowwise'``, ``'blockwise'``)."""
        return RECIPES[GRANULARITIES.index(self.granularity)]

    def _fp8_linear(self, x: torch.Tensor, weight_out_in: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x @ weight_out_in.t() + bias`` in FP8, for any leading dims of ``x``."""
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        x_q = self._delayed_quantize(x2d) if self.scaling == "delayed" else None
        y = _FP8LinearFn.apply(x2d, weight_out_in, self.bias, self.granularity, x_q)
        return y.reshape(*shape[:-1], out_features)


class FP8Linear(_FP8Compute, nn.Linear):
    """``nn.Linear`` computed in FP8 (see the module docstring). Same constructor, parameters and state_dict keys as
    ``nn.Linear``, so checkpoints load either way.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        granularity: ``'tensor'`` (default), ``'row'`` or ``'block'`` (see the module docstring).
        scaling: ``'current'`` (scales from each tensor as it is quantised) or ``'delayed'`` (``'tensor'`` only: the
            activation scale comes from the largest amax of the last ``amax_history_len`` steps, so the forward needs
            no amax pass; the history is a non-persistent buffer).
        amax_history_len: length of that history.
        recipe: deprecated name of ``granularity``.

    Example:
        >>> layer = FP8Linear(1024, 1024)           # or FP8Linear.from_linear(nn.Linear(1024, 1024))
        >>> y = layer(torch.randn(16, 1024))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        granularity: str | None = None,
        scaling: str = "current",
        amax_history_len: int = 16,
        recipe: str | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup_fp8(granularity, scaling, amax_history_len, recipe)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        granularity: str | None = None,
        scaling: str = "current",
        amax_history_len: int = 16,
        *,
        recipe: str | None = None,
    ) -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameter objects (an optimizer built on them stays valid)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._setup_fp8(granularity, scaling, amax_history_len, recipe)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp8_linear(x, self.weight, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}, scaling={self.scaling}"


class FP8Conv1D(_FP8Compute, nn.Module):
    """transformers' ``Conv1D`` (GPT-2 and its descendants: ``y = x @ weight + bias`` with ``weight`` of shape
    ``(in, out)``) computed in FP8 as :class:`FP8Linear` computes (the Linear whose weight is ``weight.t()``). It
    shares the Conv1D's parameter objects and has its ``state_dict`` keys (``weight``, ``bias``) and its ``nf``/``nx``
    attributes, so checkpoints load either way; it is an ``nn.Module``, not a subclass of transformers' class.

    Example:
        >>> layer = FP8Conv1D.from_conv1d(gpt2.transformer.h[0].mlp.c_fc, granularity='row')
    """

    def __init__(
        self,
        conv1d: nn.Module,
        granularity: str | None = None,
        scaling: str = "current",
        amax_history_len: int = 16,
        *,
        recipe: str | None = None,
    ):
        super().__init__()
        self.nx, self.nf = conv1d.weight.shape
        self.weight, self.bias = conv1d.weight, conv1d.bias
        self._setup_fp8(granularity, scaling, amax_history_len, recipe)

    @classmethod
    def from_conv1d(
        cls,
        conv1d: nn.Module,
        granularity: str | None = None,
        scaling: str = "current",
        amax_history_len: int = 16,
        *,
        recipe: str | None = None,
    ) -> FP8Conv1D:
        """An FP8Conv1D sharing ``conv1d``'s parameter objects (an optimizer built on them stays valid)."""
        if recipe is not None:
            granularity = resolve_granularity(cls.__name__, granularity, recipe)
        return cls(conv1d, granularity, scaling, amax_history_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp8_linear(x, self.weight.t(), self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, granularity={self.granularity}, scaling={self.scaling}"


def convert_to_fp8(
    model: nn.Module,
    granularity: str | None = None,
    skip=(),
    *,
    scaling: str = "current",
    min_features: int = 16,
    multiple_of: int = 16,
    recipe: str | None = None,
) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` (in place, also returned) by an :class:`FP8Linear`, and every
    transformers ``Conv1D`` (GPT-2's transposed Linear) by an :class:`FP8Conv1D`, sharing their parameters, except:

    * modules whose qualified name matches a pattern in ``skip`` (dot-component patterns, e.g. ``'lm_head'``);
    * layers FP8 tensor cores cannot take: ``in_features`` or ``out_features`` below ``min_features`` or not a
      multiple of ``multiple_of`` (16 for cuBLASLt's FP8 kernels);
    * subclasses of ``nn.Linear`` (their forward may differ), except transformers' FalconLinear (a plain Linear).

    Layers left in float for any reason but ``skip`` are named in one warning. Tied weights stay tied (the FP8
    layer computes from the same master parameter). Convert before building the optimizer, or keep using the same
    one: the parameter objects are reused.

    Example:
        >>> model = convert_to_fp8(model, granularity='row', skip=['lm_head'])

    ``granularity`` is ``'tensor'`` (default), ``'row'`` or ``'block'``, as for :class:`FP8Linear`; ``recipe=`` and
    the names ``'tensorwise'``/``'rowwise'``/``'blockwise'`` are deprecated aliases.
    """
    granularity = resolve_granularity("convert_to_fp8", granularity, recipe)
    skip = [skip] if isinstance(skip, str) else list(skip)
    conv1d, linears = _transformers.conv1d(), (nn.Linear, *_transformers.linear_likes())
    left: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            is_conv1d = conv1d is not None and type(child) is conv1d
            if not (type(child) in linears or is_conv1d):
                if isinstance(child, nn.Linear) and not isinstance(child, (FP8Linear, FP8Conv1D)):
                    left[full] = f"{type(child).__name__} subclasses Linear"
                continue
            if any(matches(p, full) for p in skip):
                continue
            sizes = tuple(child.weight.shape) if is_conv1d else (child.in_features, child.out_features)
            if min(sizes) < min_features or any(s % multiple_of for s in sizes):
                left[full] = f"sizes {sizes[0]} x {sizes[1]} (FP8 needs multiples of {multiple_of}, >= {min_features})"
                continue
            if is_conv1d:
                setattr(module, child_name, FP8Conv1D.from_conv1d(child, granularity, scaling))
            else:
                setattr(module, child_name, FP8Linear.from_linear(child, granularity, scaling))
    if left:
        listed = "; ".join(f"{k}: {v}" for k, v in left.items())
        warnings.warn(f"convert_to_fp8: {len(left)} layer(s) stay in float ({listed})", UserWarning, stacklevel=2)
    return model
