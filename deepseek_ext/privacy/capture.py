"""Hooks that record, for every trainable unit of a model, its inputs and the gradients of its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

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
    """Installs the hooks; ``loss_reduction='mean'`` rescales recorded output gradients to per-sample losses."""

    def __init__(self, model: nn.Module, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"DifferentialPrivacy: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.units = find_units(model)
        self._handles = []
        for u in self.units:
            self._handles.append(u.module.register_forward_pre_hook(self._pre_hook(u), with_kwargs=True))
            self._handles.append(
                u.module.register_forward_hook(self._forward_hook(u), with_kwargs=True, always_call=True)
            )

    def _pre_hook(self, unit: Unit):
        """Autograd need not compute the (summed) weight gradients of a unit with floating inputs: the DP step
        rebuilds every gradient from activations and output gradients. So the unit's parameters stop requiring
        grad while its forward records the graph (restored right after), which skips one weight-gradient GEMM
        per layer in backward. If nothing else requires grad, the input is made to, so the output's gradient still
        arrives. Units with integer inputs (Embedding) are left alone."""

        def pre(module, args, kwargs):
            if grad_sample.computing or not (module.training and torch.is_grad_enabled()):
                return None
            floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if not floats:
                return None
            unit.frozen = [p for p in unit.params if p.requires_grad]
            for p in unit.frozen:
                p.requires_grad_(False)
            if not any(args[i].requires_grad for i in floats):
                args = list(args)
                args[floats[0]] = args[floats[0]].detach().requires_grad_()
                return tuple(args), kwargs
            return None

        return pre

    def _forward_hook(self, unit: Unit):
        def hook(module, args, kwargs, output):
            for p in unit.frozen:  # runs even when the forward raised (always_call)
                p.requires_grad_(True)
            unit.frozen = []
            if grad_sample.computing or not (module.training and torch.is_grad_enabled()):
                return None
            bd = batch_dim(module)
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            record = Record(
                activations=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                kwargs=dict(kwargs),
                batch_size=0 if first is None else first.shape[bd],
            )
            outs = output if isinstance(output, tuple) else (output,)
            tensors = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            record.grad_outputs = [None] * len(tensors)
            scale = record.batch_size if self.loss_reduction == "mean" else 1

            for i, o in enumerate(tensors):
                if o.requires_grad:

                    def keep(g, i=i):
                        record.grad_outputs[i] = g.detach() * scale

                    o.register_hook(keep)
            unit.records.append(record)
            return None

        return hook

    def clear(self) -> None:
        for u in self.units:
            u.records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
