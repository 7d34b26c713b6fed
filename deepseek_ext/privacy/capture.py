"""Hooks that record, for every trainable unit of a model, its inputs and the gradients of its outputs.

The batch size of a forward is the batch dimension of the model's first tensor input. A unit whose output has a
batch dimension of 1 while the batch is larger computes something *batch-shared* (stock BERT and GPT-2 look up
position ids of shape ``(1, seq)``): its output is expanded to the batch before anything else reads it, so the
gradient that reaches it is per example and its parameters get true per-example gradients (example ``i``'s is the
shared computation's vector-Jacobian product with example ``i``'s output gradient). A unit whose output batch
dimension is ``batch * seq`` for an input of shape ``(batch, seq, ...)`` reads the batch's tokens flattened example by
example (OPT's decoder layers flatten them before their MLP); its records are viewed as ``(batch, seq, ...)``. Any
other batch dimension (positions without a batch dimension, as T5's relative attention bias) is refused with an
error naming the unit: its gradient cannot be split by example.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import grad_sample
from .grad_sample import batch_dim

# Modules whose parameters are used directly by their forward, not through their submodules' forwards: the whole
# module is one unit (nn.MultiheadAttention reads out_proj.weight without calling out_proj).
COMPOSITE_UNITS: tuple[type, ...] = (nn.MultiheadAttention,)


@dataclass
class Record:
    activations: tuple
    kwargs: dict
    grad_outputs: list = field(default_factory=list)
    batch_size: int = 0
    # The factor turning grad_outputs into gradients of the per-sample losses (the batch size under a mean loss),
    # applied by the clipping code to norms and factors rather than to every recorded gradient.
    scale: float = 1.0
    # What the clipping strategy computed from this record as its gradients arrived (per-sample gradients, or ghost
    # terms); activations and grad_outputs are then dropped, so the backward frees them as it goes.
    ready: dict | None = None


@dataclass
class Unit:
    name: str
    module: nn.Module
    params: list[nn.Parameter]
    records: list[Record] = field(default_factory=list)
    frozen: list[nn.Parameter] = field(default_factory=list)  # parameters un-flagged during the current forward


def find_units(model: nn.Module) -> list[Unit]:
    """Modules owning trainable parameters (composites as a whole), in model order."""
    units, inside = [], set()
    for name, m in model.named_modules():
        if id(m) in inside:  # part of a composite unit
            continue
        if isinstance(m, COMPOSITE_UNITS):
            params = [p for p in m.parameters() if p.requires_grad]
            inside.update(id(sub) for sub in m.modules() if sub is not m)
        else:
            params = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if params:
            units.append(Unit(name or type(m).__name__, m, params))
    return units


class Capture:
    """Installs the hooks; under ``loss_reduction='mean'`` each record's ``scale`` (the batch size) turns its output
    gradients into those of the per-sample losses."""

    def __init__(self, model: nn.Module, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"DifferentialPrivacy: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        grad_sample.register_transformers_layers()
        self.units = find_units(model)
        # Called as on_gradients(unit, record) once every output gradient of a record has arrived (in the backward).
        self.on_gradients = None
        # The batch size of the model's forward in progress and, for an input of shape (batch, seq, ...), its
        # sequence length; None outside a forward of the model (units called on their own keep the batch
        # dimension of their first input).
        self.batch_size: int | None = None
        self.seq_len: int | None = None
        self._depth = 0
        # True while per-sample gradients are computed (``paused()``): re-running a module (the torch.func
        # fallback) must not record anything.
        self._paused = False
        self._anchor = torch.empty(0, requires_grad=True)  # what tapped outputs depend on (_Tap)
        # The model's hooks enclose the units' (hooks run in registration order; the model may be a unit itself).
        self._handles = [model.register_forward_pre_hook(self._model_pre_hook(model), with_kwargs=True)]
        for u in self.units:
            self._handles.append(u.module.register_forward_pre_hook(self._pre_hook(u), with_kwargs=True))
            self._handles.append(
                u.module.register_forward_hook(self._forward_hook(u), with_kwargs=True, always_call=True)
            )
        self._handles.append(model.register_forward_hook(self._model_hook, always_call=True))

    def _model_pre_hook(self, model: nn.Module):
        bd = batch_dim(model)

        def pre(module, args, kwargs):
            self._depth += 1
            if self._depth == 1 and not self._paused:
                first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
                batched = first is not None and first.dim() > bd
                self.batch_size = first.shape[bd] if batched else None
                self.seq_len = first.shape[1] if batched and bd == 0 and first.dim() > 1 else None
            return None

        return pre

    def _model_hook(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.batch_size = self.seq_len = None
        return None

    def _layout(self, unit: Unit, outputs: list[torch.Tensor]) -> str:
        """How the unit's (first) output holds the batch: ``'batched'`` (batch dimension = batch size, or nothing
        to compare), ``'shared'`` (1 for the whole batch), ``'tokens'`` (``batch * seq`` rows: the batch's tokens
        flattened example by example, as OPT's decoder layers do before their MLP); raises for anything else."""
        bd, batch = batch_dim(unit.module), self.batch_size
        if batch is None or not outputs or outputs[0].dim() <= bd or outputs[0].shape[bd] == batch:
            return "batched"
        n = outputs[0].shape[bd]
        if n == 1:
            return "shared"
        if bd == 0 and self.seq_len is not None and n == batch * self.seq_len:
            return "tokens"
        raise ValueError(
            f"DifferentialPrivacy: module '{unit.name}' ({type(unit.module).__name__}) returned an output with "
            f"{n} at its batch dimension {bd}, but the batch has {batch} examples: its input does not carry the "
            "batch (positions without a batch dimension, or rows that are not the examples), so its gradient "
            "cannot be split into per-example gradients. Freeze it (model."
            f"{unit.name or 'module'}.requires_grad_(False)) or give it batch-first inputs (one row per example)"
        )

    def _pre_hook(self, unit: Unit):
        """Autograd need not compute the (summed) gradients of a unit's parameters: the DP step rebuilds every
        gradient from activations and output gradients. So the unit's parameters stop requiring grad while its
        forward records the graph (restored right after), which skips one weight-gradient GEMM per layer in
        backward. If then nothing the output depends on requires grad (a model's first layer, an embedding), the
        forward hook taps the output instead (``_Tap``), so its gradient still arrives and no gradient of the
        input is computed."""

        def pre(module, args, kwargs):
            if self._paused or not (module.training and torch.is_grad_enabled()):
                return None
            unit.frozen = [p for p in unit.params if p.requires_grad]
            for p in unit.frozen:
                p.requires_grad_(False)
            return None

        return pre

    def _forward_hook(self, unit: Unit):
        def hook(module, args, kwargs, output):
            was_frozen = bool(unit.frozen)
            for p in unit.frozen:  # runs even when the forward raised (always_call)
                p.requires_grad_(True)
            unit.frozen = []
            if self._paused or not (module.training and torch.is_grad_enabled()):
                return None
            bd = batch_dim(module)
            outs = output if isinstance(output, tuple) else (output,)
            tensors = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            replaced = None
            if was_frozen and tensors and not any(o.requires_grad for o in tensors):
                # Nothing the output depends on requires grad now the parameters are frozen (the input needs no
                # gradient, or is integer, or the output comes from its shape alone as BART's positions): tap it.
                tapped = {id(o): _Tap.apply(o, self._anchor) for o in tensors}
                tensors = [tapped[id(o)] for o in tensors]
                outs = tuple(tapped.get(id(o), o) if isinstance(o, torch.Tensor) else o for o in outs)
                output = replaced = outs if isinstance(output, tuple) else outs[0]
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            batch_size = 0 if first is None or first.dim() <= bd else first.shape[bd]
            activations = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            layout = self._layout(unit, tensors)
            if self.batch_size is not None and tensors and tensors[0].dim() > bd:
                batch_size = self.batch_size
            fold = None
            if layout == "shared":
                # Expanded (a copy: later code may write to it in place) so each example's gradient arrives apart;
                # the inputs are expanded views, so every sample's computation sees the shared input.
                wide = {id(o): _expand(o, bd, batch_size).clone() for o in tensors if _has(o, bd, 1)}
                tensors = [wide.get(id(o), o) for o in tensors]
                new_outs = tuple(wide.get(id(o), o) if isinstance(o, torch.Tensor) else o for o in outs)
                replaced = new_outs if isinstance(output, tuple) else new_outs[0]
                activations = tuple(_expand(a, bd, batch_size) if _has(a, bd, 1) else a for a in activations)
            elif layout == "tokens":  # (batch * seq, ...) rows, example by example: viewed as (batch, seq, ...)
                seq = self.seq_len  # read now: the gradients arrive after the forward

                def fold(t):
                    return t.reshape(batch_size, seq, *t.shape[1:]) if _has(t, 0, batch_size * seq) else t

                activations = tuple(fold(a) for a in activations)
            record = Record(activations=activations, kwargs=dict(kwargs), batch_size=batch_size)
            record.grad_outputs = [None] * len(tensors)
            record.scale = float(record.batch_size) if self.loss_reduction == "mean" else 1.0

            pending = [sum(o.requires_grad for o in tensors)]
            for i, o in enumerate(tensors):
                if o.requires_grad:

                    def keep(g, i=i):
                        g = g.detach()
                        record.grad_outputs[i] = g if fold is None else fold(g)
                        pending[0] -= 1
                        if pending[0] == 0 and self.on_gradients is not None:
                            with self.paused():
                                self.on_gradients(unit, record)

                    o.register_hook(keep)
            unit.records.append(record)
            return replaced

        return hook

    @contextmanager
    def paused(self):
        """Within this block the hooks record nothing (per-sample gradient rules may re-run the modules)."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def clear(self) -> None:
        for u in self.units:
            u.records.clear()
        self._depth, self.batch_size, self.seq_len = 0, None, None  # a forward that raised left no trace

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()


class _Tap(torch.autograd.Function):
    """The identity on ``x``, made to require grad through ``anchor`` (an empty leaf): the gradient of the output
    arrives at the hooks on it and goes no further (nothing upstream needs it). The output is an alias of ``x``
    that is not a view, so in-place layers after it (``ReLU(inplace=True)``) work."""

    @staticmethod
    def forward(ctx, x, anchor):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _has(t, dim: int, size: int) -> bool:
    """Whether ``t`` is a tensor with ``size`` at dimension ``dim``."""
    return isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] == size


def _expand(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return t.expand(shape)
