"""Ghost clipping rules: per-sample gradient norms and clipped sums from activations and output gradients.

A *ghost rule* turns one recorded use of a layer (its inputs, the gradients of its outputs) into one *term* per
parameter; a term knows the per-sample squared norms of that parameter's gradient and, given the clip factors
``c``, the clipped sum ``sum_i c_i g_i``, usually without ever holding the per-sample gradients ``g_i``:

- :class:`OuterProduct`: ``g_i = sum_t G[i, t]^T A[i, t]`` (Linear, convolutions after ``unfold``, the projections
  of ``nn.MultiheadAttention``, transformers' Conv1D; any layer with such a gradient through
  :func:`register_ghost_rule`). Norms by the Gram identity ``||g_i||^2 = <A_i A_i^T, G_i G_i^T>`` where that is
  cheaper than the gradient and not larger than the activations, otherwise from ``g_i`` itself by one batched GEMM
  (then the clipped sum is a weighted reduction of ``g_i`` instead of another GEMM: the mixed ghost clipping of
  Bu et al.); the clipped sum by one GEMM over all tokens of all samples, with ``G`` scaled by ``c``.
- :class:`Lookup`: embedding rows; norms from the token-pair equality pattern, sums by ``index_add``.
- :class:`PerSample`: gradients that are cheap to hold per sample (biases, LayerNorm and GroupNorm affine).

Several uses of a layer in one step merge into one term (tokens concatenated), so a reused layer is ghost-clipped
too. A layer without a rule has its per-sample gradients materialised (once, with a warning naming its type).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .. import _transformers
from ..ops.privacy import per_sample_sq_norms
from . import grad_sample

# rule(module, activations, grad_outputs, kwargs) -> {param: term}, or None when this use is not covered
GhostRule = Callable[[nn.Module, tuple, tuple, dict], "dict | None"]
_RULES: dict[type, GhostRule] = {}
_WARNED: set[type] = set()


class PerSample:
    """A parameter's per-sample gradients held as they are: ``grads`` of shape ``(batch, *param.shape)``.

    Example:
        >>> # a per-channel gate y = x * gate over (batch, channels): its per-sample gradient is x * gy
        >>> @register_ghost_rule(Gate)
        ... def _(module, activations, grad_outputs, kwargs):
        ...     return {module.gate: PerSample(activations[0] * grad_outputs[0])}
    """

    def __init__(self, grads: torch.Tensor):
        self.grads = grads

    def sq_norms(self) -> torch.Tensor:
        return per_sample_sq_norms(self.grads)

    def per_sample(self) -> torch.Tensor:
        return self.grads

    def held(self) -> torch.Tensor:
        return self.grads

    def merge(self, other: PerSample) -> PerSample:
        return PerSample(self.grads + other.per_sample())


def materialises(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether an outer-product gradient is best held per sample: when it is no larger than the activations it
    comes from (then squaring it is also cheaper than the Gram matrices, and the clipped sum is a reduction)."""
    return tokens > 1 and d_in * d_out <= tokens * (d_in + d_out)


class OuterProduct:
    """``g_i = sum_t G[i, t]^T A[i, t]`` viewed as the parameter's shape.

    Args:
        a: activations ``(batch, d_in)``, ``(batch, T, d_in)``, or ``(batch, K, T, d_in)`` for ``K`` independent
            blocks (convolution groups, stacked projections) whose gradients are stacked along the output rows.
        g: output gradients in the same layout, ``d_out`` wide.
        shape: the parameter's shape; the per-sample gradient ``(K * d_out, d_in)`` is reshaped to it.
        transpose: the parameter holds ``(d_in, d_out)`` (transformers' Conv1D).
        sum_fn: optional ``fn(factors) -> clipped sum`` replacing the default GEMM (a convolution's own weight
            gradient kernel).

    Example:
        >>> # a layer computing x @ self.w.T over the last dimension
        >>> @register_ghost_rule(MyProjection)
        ... def _(module, activations, grad_outputs, kwargs):
        ...     return {module.w: OuterProduct(activations[0], grad_outputs[0], module.w.shape)}
    """

    def __init__(self, a, g, shape, transpose: bool = False, sum_fn=None):
        if a.dim() not in (2, 3, 4) or g.dim() != a.dim() or a.shape[:-1] != g.shape[:-1]:
            raise ValueError(
                "OuterProduct: expected a (batch, [K,] [T,] d_in) and g (batch, [K,] [T,] d_out) with equal batch, "
                f"K and T, but got {tuple(a.shape)} and {tuple(g.shape)}"
            )
        while a.dim() < 4:
            a, g = a.unsqueeze(1), g.unsqueeze(1)
        self.a, self.g, self.shape, self.transpose, self.sum_fn = a, g, tuple(shape), transpose, sum_fn
        self._grads = None

    def _materialise(self) -> bool:
        return materialises(self.a.shape[2], self.a.shape[3], self.g.shape[3])

    def per_sample(self) -> torch.Tensor:
        if self._grads is None:
            g = torch.matmul(self.g.transpose(-1, -2), self.a)  # (B, K, d_out, d_in)
            g = g.reshape(g.shape[0], -1, g.shape[-1])
            self._grads = (g.transpose(1, 2) if self.transpose else g).reshape(g.shape[0], *self.shape)
        return self._grads

    def sq_norms(self) -> torch.Tensor:
        a, g = self.a, self.g
        if self._grads is not None:  # held since the backward
            norms = per_sample_sq_norms(self._grads)
        elif a.shape[2] == 1 and a.shape[1] == 1:  # ||g a^T||^2 = ||a||^2 ||g||^2, no temporaries
            b = a.shape[0]
            norms = per_sample_sq_norms(a.reshape(b, -1)) * per_sample_sq_norms(g.reshape(b, -1))
        elif a.shape[2] == 1:
            norms = (a.pow(2).sum(-1) * g.pow(2).sum(-1)).sum((1, 2))
        elif self._materialise():
            norms = per_sample_sq_norms(self.per_sample())
        else:
            norms = _gram_dot(a, g)
        if self._grads is not None or self.sum_fn is not None:  # the factors are no longer needed: free them
            self.a = self.g = None
        return norms

    def held(self) -> torch.Tensor | None:
        """The per-sample gradients, where the norms materialised them."""
        return self._grads

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        if self._grads is not None:
            return torch.tensordot(factors.to(self._grads.dtype), self._grads, 1)
        if self.sum_fn is not None:
            return self.sum_fn(factors)
        b, k, t, din = self.a.shape
        a, g, c = self.a, self.g, factors.to(self.g.dtype).view(-1, 1, 1, 1)
        if a.shape[-1] < g.shape[-1]:  # the factors scale the narrower of the two
            a = a * c
        else:
            g = g * c
        # one GEMM per block over all tokens of all samples: (d_out, B*T) @ (B*T, d_in)
        s = torch.bmm(g.permute(1, 3, 0, 2).reshape(k, -1, b * t), a.transpose(0, 1).reshape(k, b * t, din)).reshape(
            -1, din
        )
        return (s.t() if self.transpose else s).reshape(self.shape)

    def merge(self, other) -> OuterProduct | PerSample:
        if (
            isinstance(other, OuterProduct)
            and self._grads is None
            and other._grads is None
            and self.sum_fn is None
            and other.sum_fn is None
            and self.transpose == other.transpose
            and _blocks(self.a) == _blocks(other.a)
            and _blocks(self.g) == _blocks(other.g)
        ):  # a layer used twice: its tokens concatenated
            return OuterProduct(
                torch.cat([self.a, other.a], 2), torch.cat([self.g, other.g], 2), self.shape, self.transpose
            )
        return PerSample(self.per_sample() + other.per_sample())


def _gram_dot(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``<A A^T, G G^T>`` per sample (``sum_{t,s} (a_t . a_s) (g_t . g_s)``), summed over the blocks of
    ``a (B, K, T, d_in)`` and ``g (B, K, T, d_out)``. Both Gram matrices are symmetric, so for longer sequences the
    tokens are split in halves and the off-diagonal product is computed once and doubled: 3/4 of the GEMM work."""
    t = a.shape[2]
    if t < 32:
        return (torch.matmul(a, a.transpose(-1, -2)) * torch.matmul(g, g.transpose(-1, -2))).sum((1, 2, 3))
    h = t // 2
    a1, a2, g1, g2 = a[:, :, :h], a[:, :, h:], g[:, :, :h], g[:, :, h:]

    def dot(x1, x2, y1, y2):
        return (torch.matmul(x1, x2.transpose(-1, -2)) * torch.matmul(y1, y2.transpose(-1, -2))).sum((1, 2, 3))

    return dot(a1, a1, g1, g1) + dot(a2, a2, g2, g2) + 2 * dot(a1, a2, g1, g2)


def _blocks(t: torch.Tensor) -> tuple:
    """(batch, K, d) of a (batch, K, T, d) factor: what two uses must share to be concatenated."""
    return t.shape[0], t.shape[1], t.shape[3]


class Lookup:
    """Embedding rows: ``g_i[v] = sum_{t: idx[i, t] = v} G[i, t]`` for indices ``idx (batch, T)`` and output
    gradients ``g (batch, T, dim)``; rows at ``padding_idx`` get no gradient.

    Example:
        >>> @register_ghost_rule(MyEmbedding)
        ... def _(module, activations, grad_outputs, kwargs):
        ...     return {module.weight: Lookup(activations[0], grad_outputs[0], module.num_embeddings, None)}
    """

    def __init__(self, idx: torch.Tensor, g: torch.Tensor, num: int, padding_idx: int | None):
        batch = idx.shape[0]
        self.idx = idx.reshape(batch, -1)
        self.g = g.reshape(batch, self.idx.shape[1], g.shape[-1])
        if padding_idx is not None:
            self.g = self.g * (self.idx != padding_idx).unsqueeze(-1).to(self.g.dtype)
        self.num, self.padding_idx = num, padding_idx

    def sq_norms(self) -> torch.Tensor:
        # ||g_i||^2 = sum over the rows v example i looks up of ||sum_{t: idx[i, t] = v} G[i, t]||^2: the rows of all
        # examples summed at once over their (example, row) keys, in O(B T dim) instead of O(B T^2 dim) token pairs
        batch, dim = self.g.shape[0], self.g.shape[-1]
        keys = (torch.arange(batch, device=self.idx.device).unsqueeze(1) * self.num + self.idx).reshape(-1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        rows = self.g.new_zeros(uniq.numel(), dim).index_add_(0, inverse, self.g.reshape(-1, dim))
        sq = rows.pow(2).sum(1)
        return sq.new_zeros(batch).index_add_(0, torch.div(uniq, self.num, rounding_mode="floor"), sq)

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        gc = (self.g * factors.to(self.g.dtype).view(-1, 1, 1)).reshape(-1, self.g.shape[-1])
        out = torch.zeros(self.num, self.g.shape[-1], dtype=self.g.dtype, device=self.g.device)
        return out.index_add_(0, self.idx.reshape(-1), gc)

    def held(self) -> None:
        return None

    def per_sample(self) -> torch.Tensor:
        out = torch.zeros(self.idx.shape[0], self.num, self.g.shape[-1], dtype=self.g.dtype, device=self.g.device)
        return out.scatter_add_(1, self.idx.unsqueeze(-1).expand_as(self.g), self.g)

    def merge(self, other) -> Lookup | PerSample:
        if isinstance(other, Lookup):
            merged = Lookup(torch.cat([self.idx, other.idx], 1), torch.cat([self.g, other.g], 1), self.num, None)
            return merged
        return PerSample(self.per_sample() + other.per_sample())


class Sampled:
    """A norm sampler's result (``register_norm_sampler``): the norms as given, the clipped sum from its
    ``clipped_sum`` (called once for all of the module's parameters). It cannot merge with another use."""

    def __init__(self, norms: torch.Tensor, param: nn.Parameter, sums: Callable[[torch.Tensor], dict]):
        self.norms, self.param, self.sums = norms, param, sums

    def sq_norms(self) -> torch.Tensor:
        return self.norms

    def held(self) -> None:
        return None

    def clipped_sum(self, factors: torch.Tensor) -> torch.Tensor:
        return self.sums(factors)[self.param]


def _from_norm_sampler(sampler: grad_sample.NormRule) -> GhostRule:
    norm_fn, sum_fn = sampler.norms, sampler.clipped_sum

    def rule(module, activations, grad_outputs, kwargs):
        cache: dict = {}

        def sums(factors):
            if "sums" not in cache:
                cache["sums"] = sum_fn(module, activations, grad_outputs, factors)
            return cache["sums"]

        return {p: Sampled(v, p, sums) for p, v in norm_fn(module, activations, grad_outputs).items()}

    return rule


def register_ghost_rule(*module_types: type):
    """Decorator: ``fn(module, activations, grad_outputs, kwargs) -> {param: term}`` for these module types, where a
    term is an :class:`OuterProduct`, a :class:`Lookup` or a :class:`PerSample`. ``activations`` are the module's
    positional inputs and ``grad_outputs`` the gradients of its floating outputs (batch first, gradients of the
    per-sample losses); returning ``None`` leaves this use to the materialised path. Every trainable parameter of
    the module must get a term.

    Example:
        >>> # a gated projection y = (x @ w.T) * gate: its weight's per-sample gradient is an outer product
        >>> @register_ghost_rule(GatedProjection)
        ... def _(module, activations, grad_outputs, kwargs):
        ...     (x,), (gy,) = activations, grad_outputs
        ...     return {module.w: OuterProduct(x, gy * module.gate, module.w.shape),
        ...             module.gate: PerSample((gy * (x @ module.w.T)).sum(1))}
    """

    def register(fn: GhostRule) -> GhostRule:
        for t in module_types:
            _RULES[t] = fn
        return fn

    return register


def rule_for(module: nn.Module, alone: bool = True) -> GhostRule | None:
    """The module type's rule: a ghost rule, else a norm sampler (``register_norm_sampler``; only for a unit that
    ran once and holds no tied parameter, ``alone``); a subclass that keeps its base's ``forward``
    (NonDynamicallyQuantizableLinear) inherits the base's ghost rule."""
    _register_transformers_layers()
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    sampler = grad_sample.norm_sampler(module)
    if sampler is not None:
        return _from_norm_sampler(sampler) if alone else None
    for base in cls.__mro__[1:]:
        if base in _RULES and cls.forward is base.forward:
            return _RULES[base]
    return None


def warn_materialised(module: nn.Module, name: str) -> None:
    """The one-time message for a layer type that ghost clipping cannot cover."""
    cls = type(module)
    if cls in _WARNED:
        return
    _WARNED.add(cls)
    warnings.warn(
        f"DifferentialPrivacy(clipping='ghost'): no ghost rule covers module '{name}' ({cls.__name__}), so its "
        "per-sample gradients are materialised (slower, more memory); add one with "
        f"deepseek_ext.privacy.register_ghost_rule({cls.__name__})",
        stacklevel=3,
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, *, d) -> (B, T, d): any middle dims become one token dimension."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])  # explicit: the batch may be empty


def _wants(p) -> bool:
    return p is not None and p.requires_grad


# ------------------------------------------------------------------------------------------------------ Linear
@register_ghost_rule(nn.Linear)
def _linear(module, activations, grad_outputs, kwargs, transpose: bool = False):
    a, g = _flat(activations[0]), _flat(grad_outputs[0])
    out = {}
    if _wants(module.weight):
        out[module.weight] = OuterProduct(a, g, module.weight.shape, transpose)
    if _wants(module.bias):
        out[module.bias] = PerSample(g.sum(1))
    return out


def _hf_conv1d(module, activations, grad_outputs, kwargs):
    """transformers' Conv1D: ``x @ weight + bias`` with ``weight (in, out)``."""
    return _linear(module, activations, grad_outputs, kwargs, transpose=True)


def _register_transformers_layers() -> None:
    conv1d = _transformers.conv1d()
    if conv1d is not None and conv1d not in _RULES:
        _RULES[conv1d] = _hf_conv1d
    for linear in _transformers.linear_likes():
        _RULES.setdefault(linear, _linear)


# --------------------------------------------------------------------------------------------------- Embedding
@register_ghost_rule(nn.Embedding)
def _embedding(module, activations, grad_outputs, kwargs):
    if not _wants(module.weight):
        return {}
    return {module.weight: Lookup(activations[0], grad_outputs[0], module.num_embeddings, module.padding_idx)}


# ------------------------------------------------------------------------------------------------------ Conv
def _conv_padded(module, x: torch.Tensor, nd: int):
    """The input as the convolution reads it (non-zero padding modes and 'same' applied) and the remaining
    symmetric zero padding."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if module.padding == "valid":
        return x, (0,) * nd
    if module.padding == "same":
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


@register_ghost_rule(nn.Conv1d, nn.Conv2d)
def _conv(module, activations, grad_outputs, kwargs):
    nd = 1 if isinstance(module, nn.Conv1d) else 2
    x, gy = activations[0], grad_outputs[0]
    if x.dim() == nd + 1:  # unbatched input
        return None
    x, pad = _conv_padded(module, x, nd)
    batch, groups = x.shape[0], module.groups
    out = {}
    gy2 = gy.reshape(batch, groups, module.out_channels // groups, -1)  # (B, G, Cout/G, L)
    weight = module.weight
    if _wants(weight):
        din, dout = math.prod(weight.shape[1:]), weight.shape[0] // groups
        # per-sample weight gradients: the convolution's weight-gradient kernel with the batch folded into the
        # groups (no unfolded copy of the input)
        if materialises(gy2.shape[-1], din, dout):
            mask = (False, True, False)
            args = (module.stride, pad, module.dilation, False, (0,) * nd, batch * groups, mask)
            shape = (batch * weight.shape[0], *weight.shape[1:])  # read for its shape only
            w = torch.empty((), dtype=weight.dtype, device=weight.device).expand(shape)
            g = torch.ops.aten.convolution_backward(
                gy.reshape(1, -1, *gy.shape[2:]), x.reshape(1, -1, *x.shape[2:]), w, None, *args
            )[1]
            out[weight] = PerSample(g.view(batch, *weight.shape))
        else:  # the Gram identity over the unfolded input
            lead = (1,) if nd == 1 else ()  # Conv1d as a Conv2d of height 1
            cols = grad_sample.unfold(  # (B, Cin*k, L)
                x.unsqueeze(2) if nd == 1 else x,
                lead + tuple(module.kernel_size),
                lead + tuple(module.dilation),
                (0,) * len(lead) + pad,
                lead + tuple(module.stride),
            )
            cols = cols.reshape(batch, groups, cols.shape[1] // groups, cols.shape[-1])

            def conv_weight_grad(factors):  # the convolution's own weight-gradient kernel on the scaled gradient
                gc = gy * factors.to(gy.dtype).view(-1, *([1] * (gy.dim() - 1)))
                args = (module.stride, pad, module.dilation, False, (0,) * nd, groups, (False, True, False))
                return torch.ops.aten.convolution_backward(gc, x, weight, None, *args)[1]

            term = OuterProduct(cols.transpose(2, 3), gy2.transpose(2, 3), weight.shape, sum_fn=conv_weight_grad)
            out[weight] = term
    if _wants(module.bias):
        out[module.bias] = PerSample(gy2.sum(-1).reshape(batch, -1))
    return out


# ------------------------------------------------------------------------------------------------ norm layers
def _affine_terms(module, gy, dims, normalised) -> dict:
    """The terms of a normalisation layer's affine parameters: ``weight`` gets ``gy * x_hat`` and ``bias`` ``gy``,
    each summed over ``dims`` (``normalised()`` computes ``x_hat`` only when the weight needs it)."""
    out = {}
    if _wants(module.weight):
        x_hat = normalised()
        out[module.weight] = PerSample((gy * x_hat).sum(dims) if dims else gy * x_hat)
    if _wants(module.bias):
        out[module.bias] = PerSample(gy.sum(dims) if dims else gy)
    return out


@register_ghost_rule(nn.LayerNorm)
def _layer_norm(module, activations, grad_outputs, kwargs):
    x, gy = activations[0], grad_outputs[0]
    dims = tuple(range(1, x.dim() - len(module.normalized_shape)))
    return _affine_terms(module, gy, dims, lambda: F.layer_norm(x, module.normalized_shape, eps=module.eps))


@register_ghost_rule(nn.GroupNorm)
def _group_norm(module, activations, grad_outputs, kwargs):
    x, gy = activations[0], grad_outputs[0]
    dims = tuple(range(2, x.dim()))
    return _affine_terms(module, gy, dims, lambda: F.group_norm(x, module.num_groups, eps=module.eps))


# --------------------------------------------------------------------------------------- nn.MultiheadAttention
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


@register_ghost_rule(nn.MultiheadAttention)
def _mha(module: nn.MultiheadAttention, activations, grad_outputs, kwargs):
    """The projections' gradients are outer products of the projected inputs and the gradients of the projections'
    outputs; those come from the attention core alone (softmax(q k^T) v, recomputed from the recorded inputs with
    the module's masks), never from the rest of the model. Uses with bias_k/bias_v, add_zero_attn, dropout, or a
    loss on the attention weights are left to the materialised path."""
    args = dict(zip(_MHA_ARGS, activations))
    args.update({k: v for k, v in kwargs.items() if k in _MHA_ARGS})
    if (
        module.bias_k is not None
        or module.add_zero_attn
        or (module.dropout > 0 and module.training)
        or (len(grad_outputs) > 1 and grad_outputs[1] is not None)
        or args["query"].dim() != 3
    ):
        return None
    q_in, k_in, v_in = args["query"], args["key"], args["value"]
    if not module.batch_first:
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
    gy = grad_outputs[0] if module.batch_first else grad_outputs[0].transpose(0, 1)
    b, t, e = q_in.shape
    s, h = k_in.shape[1], module.num_heads
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    mask = _mha_mask(args.get("attn_mask"), args.get("key_padding_mask"), b, h, t, s, q_in.dtype)
    with torch.enable_grad():
        q, k, v = (
            F.linear(x, w.detach(), None if bias is None else bias.detach()).detach().requires_grad_()
            for x, w, bias in ((q_in, wq, bq), (k_in, wk, bk), (v_in, wv, bv))
        )

        def heads(x):
            return x.view(b, x.shape[1], h, e // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
        o = o.transpose(1, 2).reshape(b, t, e)
        go = gy @ module.out_proj.weight.detach()  # gradient of the attention core's output
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), go)
    o = o.detach()
    out = {}
    if module._qkv_same_embed_dim and _wants(module.in_proj_weight):
        shape = module.in_proj_weight.shape
        if _same(q_in, k_in) and _same(q_in, v_in):  # self-attention: one Linear to 3 * embed_dim
            out[module.in_proj_weight] = OuterProduct(q_in, torch.cat([dq, dk, dv], -1), shape)
        elif t == s:
            out[module.in_proj_weight] = OuterProduct(
                torch.stack([q_in, k_in, v_in], 1), torch.stack([dq, dk, dv], 1), shape
            )
        else:
            blocks = [OuterProduct(x, d, (e, e)).per_sample() for x, d in ((q_in, dq), (k_in, dk), (v_in, dv))]
            out[module.in_proj_weight] = PerSample(torch.cat(blocks, 1))
    elif not module._qkv_same_embed_dim:
        for w, x, d in ((wq, q_in, dq), (wk, k_in, dk), (wv, v_in, dv)):
            if _wants(w):
                out[w] = OuterProduct(x, d, w.shape)
    if _wants(module.in_proj_bias):
        out[module.in_proj_bias] = PerSample(torch.cat([dq.sum(1), dk.sum(1), dv.sum(1)], -1))
    if _wants(module.out_proj.weight):
        out[module.out_proj.weight] = OuterProduct(o, gy, module.out_proj.weight.shape)
    if _wants(module.out_proj.bias):
        out[module.out_proj.bias] = PerSample(gy.sum(1))
    return out


def _mha_mask(attn_mask, key_padding_mask, b, h, t, s, dtype):
    """The additive float mask nn.MultiheadAttention applies, as (batch or 1, heads or 1, T, S)."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        mask = m.to(dtype).view(b, h, t, s) if m.dim() == 3 else m.to(dtype).view(1, 1, t, s)
    if key_padding_mask is not None:
        m = key_padding_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        m = m.to(dtype).view(b, 1, 1, s)
        mask = m if mask is None else mask + m
    return mask


# ------------------------------------------------------------------------------------------------- one step
def terms_for_unit(module: nn.Module, records, alone: bool = True):
    """{param: term} for all of a unit's uses in the step, or None when a use has no rule (then the unit is
    materialised); ``alone``: the unit ran once and holds no tied parameter."""
    rule = rule_for(module, alone)
    if rule is None:
        return None
    merged: dict = {}
    for r in records:
        if r.ready is not None:  # computed in the backward (record_terms)
            terms = r.ready
        elif r.grad_outputs[0] is None:
            return None
        else:
            terms = rule(module, r.activations, tuple(r.grad_outputs), r.kwargs)
        if terms is None:
            return None
        for p, term in terms.items():
            merged[p] = term if p not in merged else merged[p].merge(term)
    return merged


def record_terms(module: nn.Module, record) -> dict | None:
    """One record's terms (ghost rules only, not norm samplers), as soon as its gradients have arrived; outer
    products whose per-sample gradients are no larger than their activations compute them now."""
    rule = _RULES.get(type(module)) or (rule_for(module) if grad_sample.norm_sampler(module) is None else None)
    if rule is None or record.grad_outputs[0] is None:
        return None
    terms = rule(module, record.activations, tuple(record.grad_outputs), record.kwargs)
    if terms is None:
        return None
    for t in terms.values():
        if isinstance(t, OuterProduct) and t.a.shape[2] > 1 and t._materialise():
            t.per_sample()
            t.a = t.g = t.sum_fn = None
    return terms
