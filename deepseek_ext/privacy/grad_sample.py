"""Per-sample gradients from module hooks.

A forward hook keeps each hooked module's input, a backward hook its output gradient. From the pair, a *grad
sampler* computes per-sample gradients ``{parameter: (batch, *parameter.shape)}`` (flat and per-layer clipping, and
the layers of ghost clipping without a ghost rule; the built-in ghost rules are in ``ghost.py``).

Samplers exist for Linear, Conv1d/Conv2d, Embedding, LayerNorm, GroupNorm and transformers' Conv1D (GPT-2's
transposed Linear) and FalconLinear. Any other module with parameters falls back to ``torch.func`` (``vmap`` over
``vjp`` of the module on one sample), which also covers ``nn.MultiheadAttention``. BatchNorm is refused: it mixes the
examples of a batch. ``register_grad_sampler`` adds a layer type, ``register_norm_sampler`` a ghost rule given as
norms and clipped sums (``ghost.register_ghost_rule`` gives one as per-parameter terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .. import _transformers

# sampler(module, activations, grad_outputs) -> {param: per-sample grad (B, *param.shape)}
GradSampler = Callable[[nn.Module, tuple, tuple], dict]
# norm_sampler(module, activations, grad_outputs) -> {param: per-sample squared norm (B,)}
NormSampler = Callable[[nn.Module, tuple, tuple], dict]
# clipped_sum(module, activations, grad_outputs, factors) -> {param: sum_i factors_i * g_i}
ClippedSum = Callable[[nn.Module, tuple, tuple, torch.Tensor], dict]
_SAMPLERS: dict[type, GradSampler] = {}


@dataclass(frozen=True)
class NormRule:
    """A ghost rule (``register_norm_sampler``): per-sample squared norms and the clipped sum of one layer type."""

    norms: NormSampler
    clipped_sum: ClippedSum


_NORM_SAMPLERS: dict[type, NormRule] = {}


def register_grad_sampler(*module_types: type):
    """Decorator: ``fn(module, activations, grad_outputs) -> {param: (B, *param.shape)}`` for these module types.

    ``activations`` is the tuple of the module's positional inputs, ``grad_outputs`` the tuple of gradients of its
    outputs, both with the batch as first dimension (as seen by the module). The gradients are those of the
    per-sample losses up to one positive factor common to the batch (a mean reduction's), which the caller applies
    to the results: a sampler must be linear in ``grad_outputs``, as every per-sample gradient is.

    Example:
        >>> @register_grad_sampler(MyScale)
        ... def _(module, activations, grad_outputs):
        ...     (x,), (g,) = activations, grad_outputs
        ...     return {module.weight: (x * g).flatten(2).sum(-1) if x.dim() > 2 else x * g}
    """

    def register(fn: GradSampler) -> GradSampler:
        for t in module_types:
            _SAMPLERS[t] = fn
        return fn

    return register


def register_norm_sampler(*module_types: type, clipped_sum: ClippedSum):
    """Decorator: a *ghost* rule for these module types, used by ``clipping='ghost'``.

    The decorated ``fn(module, activations, grad_outputs) -> {param: (B,)}`` gives each example's squared gradient
    norm per parameter, and ``clipped_sum(module, activations, grad_outputs, factors) -> {param: param.shape}`` the
    clipped sum ``sum_i factors[i] * g_i``, both without materialising the per-sample gradients ``g_i``. Inputs are
    as for ``register_grad_sampler``; ``factors`` is a ``(B,)`` float32 tensor on the parameters' device.

    Example:
        >>> def scale_sum(module, activations, grad_outputs, factors):
        ...     (x,), (g,) = activations, grad_outputs
        ...     return {module.weight: (factors.view(-1, 1) * x * g).sum(0)}
        >>> @register_norm_sampler(MyScale, clipped_sum=scale_sum)
        ... def _(module, activations, grad_outputs):
        ...     (x,), (g,) = activations, grad_outputs
        ...     return {module.weight: (x * g).pow(2).sum(1)}
    """

    def register(fn: NormSampler) -> NormSampler:
        for t in module_types:
            _NORM_SAMPLERS[t] = NormRule(fn, clipped_sum)
        return fn

    return register


def has_sampler(module: nn.Module) -> bool:
    return type(module) in _SAMPLERS


def refuse_batch_norm(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"DifferentialPrivacy: module '{name}' ({type(m).__name__}) mixes the examples of a batch, so "
                "per-sample gradients are not defined; replace it with GroupNorm, e.g. "
                f"nn.GroupNorm(min(32, {m.num_features}), {m.num_features})"
            )


# ------------------------------------------------------------------------------------------------------- Linear
def _flat(a: torch.Tensor) -> torch.Tensor:
    """(B, *, d) -> (B, T, d): any middle dims become one sequence dimension."""
    return a.reshape(a.shape[0], math.prod(a.shape[1:-1]), a.shape[-1])  # explicit: the batch may be empty


@register_grad_sampler(nn.Linear)
def _linear(module: nn.Linear, activations, grad_outputs):
    a, b = _flat(activations[0]), _flat(grad_outputs[0])
    out = {}
    if module.weight.requires_grad:
        out[module.weight] = torch.einsum("bto,bti->boi", b, a)
    if module.bias is not None and module.bias.requires_grad:
        out[module.bias] = b.sum(1)
    return out


# transformers' Conv1D (GPT-2): y = x @ weight + bias with weight (in, out), the Linear of weight.t()
def _conv1d(module, activations, grad_outputs):
    return {
        p: g.transpose(1, 2) if p is module.weight else g for p, g in _linear(module, activations, grad_outputs).items()
    }


def register_transformers_layers() -> None:
    """Registers the samplers of transformers' layers that are loaded: Conv1D as the transposed Linear and
    FalconLinear as a Linear."""
    conv1d = _transformers.conv1d()
    if conv1d is not None and conv1d not in _SAMPLERS:
        register_grad_sampler(conv1d)(_conv1d)
    for linear in _transformers.linear_likes():
        if linear not in _SAMPLERS:
            register_grad_sampler(linear)(_linear)


# --------------------------------------------------------------------------------------------------- Embedding
@register_grad_sampler(nn.Embedding)
def _embedding(module: nn.Embedding, activations, grad_outputs):
    if not module.weight.requires_grad:
        return {}
    idx, b = activations[0], grad_outputs[0]
    batch = idx.shape[0]
    flat_idx = idx.reshape(batch, math.prod(idx.shape[1:]))
    flat_b = b.reshape(batch, flat_idx.shape[1], b.shape[-1])
    g = torch.zeros(batch, *module.weight.shape, dtype=b.dtype, device=b.device)
    g.scatter_add_(1, flat_idx.unsqueeze(-1).expand_as(flat_b), flat_b)
    if module.padding_idx is not None:
        g[:, module.padding_idx] = 0
    return {module.weight: g}


# ------------------------------------------------------------------------------------------------------ Conv
def unfold(x: torch.Tensor, kernel_size, dilation, padding, stride) -> torch.Tensor:
    """``F.unfold`` of a ``(B, C, H, W)`` input: ``(B, C * kh * kw, L)`` columns, from one strided view of the
    zero-padded input copied once: somewhat faster than ``F.unfold``'s CPU kernel for small images in big batches,
    and far steadier when another process holds a core (that kernel then took seconds instead of tens of ms)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    b, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    view = x.as_strided((b, c, kh, kw, oh, ow), (s[0], s[1], dh * s[2], dw * s[3], sh * s[2], sw * s[3]))
    return view.reshape(b, c * kh * kw, oh * ow)


@register_grad_sampler(nn.Conv1d, nn.Conv2d)
def _conv(module, activations, grad_outputs):
    if module.padding_mode != "zeros":
        return _functional(module, activations, grad_outputs)
    x, b = activations[0], grad_outputs[0]
    if isinstance(module, nn.Conv1d):  # as a Conv2d of height 1
        x, b = x.unsqueeze(2), b.unsqueeze(2)
        ks, stride, dil = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        pad = (0, module.padding[0]) if not isinstance(module.padding, str) else module.padding
    else:
        ks, stride, dil, pad = module.kernel_size, module.stride, module.dilation, module.padding
    if isinstance(pad, str):  # 'same' / 'valid': the padding torch applied is not in the module
        return _functional(module, activations, grad_outputs)
    batch, groups = x.shape[0], module.groups
    cols = unfold(x, ks, dil, pad, stride)  # (B, Cin*k, L)
    b = b.reshape(batch, groups, b.shape[1] // groups, b.shape[2] * b.shape[3])  # (B, G, Cout/G, L)
    cols = cols.reshape(batch, groups, cols.shape[1] // groups, cols.shape[-1])  # (B, G, Cin/G * k, L)
    out = {}
    if module.weight.requires_grad:
        g = torch.einsum("bgol,bgil->bgoi", b, cols)
        out[module.weight] = g.reshape(batch, *module.weight.shape)
    if module.bias is not None and module.bias.requires_grad:
        out[module.bias] = b.sum(-1).reshape(batch, -1)
    return out


# ------------------------------------------------------------------------------------------------ LayerNorm
@register_grad_sampler(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, activations, grad_outputs):
    x, b = activations[0], grad_outputs[0]
    dims = tuple(range(1, x.dim() - len(module.normalized_shape)))
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        out[module.weight] = (b * x_hat).sum(dims) if dims else b * x_hat
    if module.bias is not None and module.bias.requires_grad:
        out[module.bias] = b.sum(dims) if dims else b
    return out


@register_grad_sampler(nn.GroupNorm)
def _group_norm(module: nn.GroupNorm, activations, grad_outputs):
    x, b = activations[0], grad_outputs[0]
    x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
    dims = tuple(range(2, x.dim()))
    out = {}
    if module.weight is not None and module.weight.requires_grad:
        out[module.weight] = (b * x_hat).sum(dims) if dims else b * x_hat
    if module.bias is not None and module.bias.requires_grad:
        out[module.bias] = b.sum(dims) if dims else b
    return out


# ------------------------------------------------------------------------------------------ torch.func fallback
def batch_dim(module: nn.Module) -> int:
    """Where the batch sits in this module's inputs and outputs."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def _functional(module: nn.Module, activations, grad_outputs, kwargs=None, batch_size: int | None = None):
    """vmap over samples of vjp(module's own parameters) — for any module without a dedicated sampler.

    Inputs are mapped over the batch when they carry it (``batch_size`` at the module's batch dimension; every
    positional tensor when ``batch_size`` is None); the others (a position tensor shared by the whole batch, say) go
    to every sample's call unchanged. nn.MultiheadAttention maps its key_padding_mask and nothing else among its
    keyword arguments."""
    from torch.func import functional_call, vjp, vmap

    kwargs = dict(kwargs or {})
    composite = isinstance(module, nn.MultiheadAttention)
    params = {n: p.detach() for n, p in module.named_parameters(recurse=composite) if p.requires_grad}
    if not params:
        return {}
    if composite and isinstance(kwargs.get("attn_mask"), torch.Tensor) and kwargs["attn_mask"].dim() == 3:
        raise ValueError("a 3-D attn_mask mixes batch and heads; pass a 2-D attn_mask and key_padding_mask instead")
    bd = batch_dim(module)

    def batched(x) -> bool:
        if not isinstance(x, torch.Tensor):
            return False
        return batch_size is None or (x.dim() > bd and x.shape[bd] == batch_size)

    tensor_pos = [i for i, a in enumerate(activations) if batched(a)]
    if composite:
        batched_kw = [k for k in ("key_padding_mask",) if isinstance(kwargs.get(k), torch.Tensor)]
    else:
        batched_kw = [k for k, v in kwargs.items() if batch_size is not None and batched(v)]
    kw_dim = 0 if composite else bd

    def one(p, xs, kws, gs):
        args = list(activations)
        for i, x in zip(tensor_pos, xs):
            args[i] = x.unsqueeze(bd)
        kw = dict(kwargs)
        for k, v in zip(batched_kw, kws):
            kw[k] = v.unsqueeze(kw_dim)

        def run(p_):
            out = functional_call(module, p_, tuple(args), kw)
            outs = out if isinstance(out, tuple) else (out,)
            return tuple(o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())

        outs, pullback = vjp(run, p)
        cot = tuple(torch.zeros_like(o) if g is None else g.unsqueeze(bd) for o, g in zip(outs, gs))
        return pullback(cot)[0]

    xs = tuple(activations[i] for i in tensor_pos)
    kws = tuple(kwargs[k] for k in batched_kw)
    in_dims = (
        None,
        tuple(bd for _ in xs),
        tuple(kw_dim for _ in kws),
        tuple(None if g is None else bd for g in grad_outputs),
    )
    grads = vmap(one, in_dims=in_dims)(params, xs, kws, tuple(grad_outputs))
    by_name = dict(module.named_parameters(recurse=composite))
    return {by_name[n]: g for n, g in grads.items()}


def per_sample_grads(module: nn.Module, activations, grad_outputs, kwargs=None, batch_size: int | None = None) -> dict:
    """``{param: (B, *param.shape)}`` from the module's grad sampler, or the ``torch.func`` fallback (which re-runs
    the module: call it inside ``Capture.paused()`` while capture hooks are installed)."""
    sampler = _SAMPLERS.get(type(module))
    if sampler is None:
        return _functional(module, activations, grad_outputs, kwargs, batch_size)
    return sampler(module, activations, grad_outputs)


def norm_sampler(module: nn.Module) -> NormRule | None:
    """The rule (norm sampler and clipped sum) registered for the module's type, if any."""
    return _NORM_SAMPLERS.get(type(module))
