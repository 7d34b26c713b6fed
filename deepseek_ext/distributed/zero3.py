"""ZeRO-3: parameters, gradients and optimizer state sharded over the ranks of a ``torch.distributed`` job.

Each *unit* (by default every child module that holds parameters, looking through ``ModuleList``/``Sequential``
containers; or every module of the classes in ``wrap_policy``) keeps its parameters as one flat buffer, padded to
split evenly, of which each rank stores a slice (an ``nn.Parameter`` the optimizer sees). Around the unit's
forward the slices are all-gathered into the full buffer and the module's parameters become views of it; after
the forward the buffer's storage is released (``reshard_after_forward``) and gathered again when the gradient
reaches the unit's outputs; once the full gradient has accumulated it is reduce-scattered (averaged over ranks)
into the slice's ``.grad`` and the storage is released again. With ``prefetch >= 1`` the next units' gathers are
started asynchronously while the current unit computes. Parameters shared between units (tied weights) and
parameters outside every unit live in a root unit that stays gathered for the whole step.

The flat layout (offsets, padding, each rank's slice) comes from the C++ planner in ``csrc/distributed``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .._native import _C, require_native

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group)


class ShardedParameter:
    """Stands where a sharded parameter used to be: any use outside a forward raises a clear error."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr):
        raise RuntimeError(
            f"'{object.__getattribute__(self, '_name')}' is sharded across ranks by ZeRO3; read it inside "
            "`with model.gathered_parameters():` (a collective: every rank must enter it)"
        )

    def __repr__(self) -> str:
        return f"ShardedParameter({object.__getattribute__(self, '_name')!r})"


@dataclass
class _Slot:
    """One original parameter: where it lived (all aliases, for tied weights) and where it sits in the flat buffer."""

    aliases: list[tuple[nn.Module, str, str]]  # (module, attribute, qualified name)
    shape: torch.Size
    numel: int
    offset: int = 0


@dataclass
class _Unit:
    name: str
    module: nn.Module | None  # None for the root unit
    slots: list[_Slot]
    used: int = 0
    padded: int = 0
    shard_size: int = 0
    shard: nn.Parameter | None = None
    full: torch.Tensor | None = None  # leaf requiring grad; storage released while sharded
    gathered: bool = False
    pending: object | None = None  # async all-gather in flight
    hooks: list = field(default_factory=list)


class ZeRO3(nn.Module):
    """Shards ``model`` in place over ``process_group`` (default: the world).

    Args:
        model: the module to shard (initialised identically on every rank; rank 0's values are broadcast).
        prefetch: how many units ahead to all-gather asynchronously (0: none).
        reshard_after_forward: release gathered parameters after each unit's forward (saves memory; they are
            gathered again for backward). With ``False`` they stay until the unit's backward is done.
        wrap_policy: module classes that form units (e.g. ``{MyTransformerBlock}``); default: children with
            parameters, looking through ModuleList/Sequential/ModuleDict.
        param_dtype: gather parameters in this dtype (e.g. ``torch.bfloat16``) while shards, gradients and optimizer
            state stay in the parameters' own dtype.
        process_group: the group to shard over.

    ``model.parameters()`` yields the local shards; build the optimizer after wrapping. Outside forward/backward
    the original parameters are not whole: use :meth:`gathered_parameters` or :meth:`full_state_dict`.

    Example:
        >>> dist.init_process_group('gloo')                 # under torchrun
        >>> model = ZeRO3(model, prefetch=1)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    """

    def __init__(
        self,
        model: nn.Module,
        prefetch: int = 1,
        reshard_after_forward: bool = True,
        wrap_policy=None,
        param_dtype: torch.dtype | None = None,
        process_group=None,
        align: int = 16,
    ):
        super().__init__()
        require_native("distributed.ZeRO3")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeRO3 needs torch.distributed initialised (dist.init_process_group) first")
        self.module = model
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.prefetch = prefetch
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.align = align
        self._units = self._plan_units(model, wrap_policy)
        self._order: list[_Unit] = []  # units in first-forward order, for prefetching
        self._recording = True
        self.flat_shards = nn.ParameterList()
        for unit in self._units:
            self._build(unit)
            self.flat_shards.append(unit.shard)
        self._root = next((u for u in self._units if u.module is None), None)
        for unit in self._units:
            if unit.module is not None:
                unit.hooks.append(unit.module.register_forward_pre_hook(self._pre_forward(unit)))
                unit.hooks.append(unit.module.register_forward_hook(self._post_forward(unit), always_call=True))

    # ------------------------------------------------------------------------------------------------ planning
    def _plan_units(self, model: nn.Module, wrap_policy) -> list[_Unit]:
        owners: list[tuple[str, nn.Module]] = []
        if wrap_policy:
            policy = tuple(wrap_policy)
            taken: set[int] = set()
            for name, m in model.named_modules():
                if isinstance(m, policy) and id(m) not in taken:
                    owners.append((name, m))
                    taken.update(id(s) for s in m.modules())
        else:

            def visit(prefix, module):
                for child_name, child in module.named_children():
                    full = f"{prefix}.{child_name}" if prefix else child_name
                    if isinstance(child, _CONTAINERS):
                        visit(full, child)
                    elif any(True for _ in child.parameters()):
                        owners.append((full, child))

            visit("", model)
        unit_of: dict[int, int] = {}  # id(module) -> owner index
        for i, (_, m) in enumerate(owners):
            for s in m.modules():
                unit_of.setdefault(id(s), i)
        # Every (module, attribute) alias of every parameter, and which units touch each parameter.
        aliases: dict[int, list[tuple[nn.Module, str, str]]] = {}
        param_of: dict[int, nn.Parameter] = {}
        touching: dict[int, set[int]] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            for pname, p in list(m._parameters.items()):
                if p is None:
                    continue
                fq = f"{mname}.{pname}" if mname else pname
                aliases.setdefault(id(p), []).append((m, pname, fq))
                param_of[id(p)] = p
                touching.setdefault(id(p), set()).add(unit_of.get(id(m), -1))
        slots_by_unit: dict[int, list[_Slot]] = {i: [] for i in range(-1, len(owners))}
        for pid, p in param_of.items():
            units = touching[pid]
            where = next(iter(units)) if len(units) == 1 else -1  # tied across units -> root
            slots_by_unit[where].append(_Slot(aliases[pid], p.shape, p.numel()))
        out = [_Unit(name, m, slots_by_unit[i]) for i, (name, m) in enumerate(owners) if slots_by_unit[i]]
        if slots_by_unit[-1]:
            out.append(_Unit("<root>", None, slots_by_unit[-1]))
        return out

    def _build(self, unit: _Unit) -> None:
        first = unit.slots[0].aliases[0]
        p0 = first[0]._parameters[first[1]]
        device, dtype = p0.device, p0.dtype
        offsets, used, padded, shard, _ = _C.flat_layout([s.numel for s in unit.slots], self.world, self.align)
        unit.used, unit.padded, unit.shard_size = used, padded, shard
        flat = torch.zeros(padded, dtype=dtype, device=device)
        for slot, off in zip(unit.slots, offsets):
            slot.offset = off
            m, attr, _ = slot.aliases[0]
            flat[off : off + slot.numel].copy_(m._parameters[attr].detach().reshape(-1))
        dist.broadcast(flat, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        unit.shard = nn.Parameter(flat[self.rank * shard : (self.rank + 1) * shard].clone())
        compute = self.param_dtype or dtype
        unit.full = torch.empty(padded, dtype=compute, device=device).requires_grad_()
        unit.full.untyped_storage().resize_(0)
        unit.full.register_post_accumulate_grad_hook(self._post_backward(unit))
        for slot in unit.slots:
            for m, attr, fq in slot.aliases:
                del m._parameters[attr]
                m.__dict__[attr] = ShardedParameter(fq)

    # ------------------------------------------------------------------------------------------ gather / release
    def _start_gather(self, unit: _Unit, async_op: bool) -> None:
        if unit.gathered or unit.pending is not None:
            return
        full = unit.full
        full.untyped_storage().resize_(full.numel() * full.element_size())
        src = unit.shard.detach().to(full.dtype)
        # Gather through a second tensor on the same storage: it has its own version counter, so refilling the
        # storage before backward does not look like an in-place change to the views autograd saved.
        alias = torch.empty(0, dtype=full.dtype, device=full.device).set_(full.untyped_storage(), 0, full.shape)
        with torch.no_grad():
            work = _all_gather(alias, src, self.group, async_op=async_op)
        if async_op:
            unit.pending = work
        else:
            unit.gathered = True

    def _gather(self, unit: _Unit) -> None:
        if unit.pending is not None:
            unit.pending.wait()
            unit.pending = None
            unit.gathered = True
        self._start_gather(unit, async_op=False)

    def _bind(self, unit: _Unit) -> None:
        """Points the modules' parameter attributes at views of the gathered buffer."""
        for slot in unit.slots:
            view = unit.full[slot.offset : slot.offset + slot.numel].view(slot.shape)
            for m, attr, _ in slot.aliases:
                m.__dict__[attr] = view

    def _release(self, unit: _Unit) -> None:
        for slot in unit.slots:
            for m, attr, fq in slot.aliases:
                m.__dict__[attr] = ShardedParameter(fq)
        if unit.pending is not None:
            unit.pending.wait()
            unit.pending = None
        unit.full.untyped_storage().resize_(0)
        unit.gathered = False

    def _prefetch_after(self, unit: _Unit, step: int) -> None:
        if self.prefetch <= 0 or unit not in self._order:
            return
        i = self._order.index(unit)
        for j in range(1, self.prefetch + 1):
            k = i + step * j
            if 0 <= k < len(self._order):
                self._start_gather(self._order[k], async_op=True)

    # --------------------------------------------------------------------------------------------------- hooks
    def _pre_forward(self, unit: _Unit):
        def hook(module, args):
            if self._recording and unit not in self._order:
                self._order.append(unit)
            self._gather(unit)
            self._bind(unit)
            self._prefetch_after(unit, +1)

        return hook

    def _post_forward(self, unit: _Unit):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                fired = [False]

                def pre_backward(grad):
                    if not fired[0]:
                        fired[0] = True
                        self._gather(unit)
                        self._prefetch_after(unit, -1)
                    return grad

                for t in output if isinstance(output, (tuple, list)) else (output,):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(pre_backward)
            if self.reshard_after_forward or not torch.is_grad_enabled():
                self._release(unit)

        return hook

    def _post_backward(self, unit: _Unit):
        def hook(full: torch.Tensor):
            grad = full.grad.to(unit.shard.dtype)
            out = torch.empty(unit.shard_size, dtype=grad.dtype, device=grad.device)
            _reduce_scatter(out, grad, self.group)
            out /= self.world
            unit.shard.grad = out if unit.shard.grad is None else unit.shard.grad + out
            full.grad = None
            self._release(unit)

        return hook

    def forward(self, *args, **kwargs):
        if self._root is not None:
            self._gather(self._root)
            self._bind(self._root)
        try:
            out = self.module(*args, **kwargs)
        finally:
            self._recording = False
        if self._root is not None and not torch.is_grad_enabled():
            self._release(self._root)
        return out

    # ------------------------------------------------------------------------------------------- full access
    @contextlib.contextmanager
    def gathered_parameters(self, writeback: bool = True):
        """All parameters whole, on every rank, for evaluation, generation or inspection. A collective: every rank
        must enter. With ``writeback``, changes made inside are written back to the shards on exit."""
        for unit in self._units:
            self._gather(unit)
            with torch.no_grad():
                for slot in unit.slots:
                    view = unit.full.detach()[slot.offset : slot.offset + slot.numel].view(slot.shape)
                    for m, attr, _ in slot.aliases:
                        m.__dict__[attr] = view
        try:
            yield self.module
        finally:
            for unit in self._units:
                if writeback:
                    with torch.no_grad():
                        lo = self.rank * unit.shard_size
                        unit.shard.copy_(unit.full.detach()[lo : lo + unit.shard_size].to(unit.shard.dtype))
                self._release(unit)

    def full_state_dict(self) -> dict:
        """The unsharded model's state_dict on rank 0 (an empty dict on other ranks), gathered one unit at a time,
        so peak memory is one unit's parameters, not the model twice. Keys are the original model's."""
        out: dict[str, torch.Tensor] = {}
        for unit in self._units:
            self._gather(unit)
            if self.rank == 0:
                for slot in unit.slots:
                    value = unit.full.detach()[slot.offset : slot.offset + slot.numel].view(slot.shape)
                    value = value.to(unit.shard.dtype).clone()
                    for _, _, fq in slot.aliases:
                        out[fq] = value
            self._release(unit)
        if self.rank == 0:
            for name, buf in self.module.named_buffers():
                out[name] = buf.detach().clone()
            keys = [k for k in _state_keys(self.module)]
            out = {k: out[k] for k in keys if k in out}
        return out

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None, print_report: bool = True) -> dict:
        """Bytes this rank holds: parameter shards, their gradients, optimizer state, and the largest gathered unit."""
        shards = [u.shard for u in self._units]
        report = {
            "rank": self.rank,
            "world_size": self.world,
            "param_shard_bytes": sum(s.numel() * s.element_size() for s in shards),
            "grad_shard_bytes": sum(s.grad.numel() * s.grad.element_size() for s in shards if s.grad is not None),
            "optimizer_state_bytes": 0,
            "largest_unit_gathered_bytes": max((u.padded * u.full.element_size() for u in self._units), default=0),
            "unsharded_param_bytes": sum(u.used * u.shard.element_size() for u in self._units),
        }
        if optimizer is not None:
            for st in optimizer.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        report["optimizer_state_bytes"] += v.numel() * v.element_size()
        if print_report:
            mib = {k: f"{v / 2**20:.2f} MiB" for k, v in report.items() if k.endswith("bytes")}
            print(f"ZeRO3 rank {self.rank}/{self.world}: {mib}")
        return report

    # ------------------------------------------------------------------------------- checkpoint support
    def sharded_layout(self) -> list[dict]:
        """The flat layout of every unit (what a checkpoint manifest records)."""
        return [
            {
                "name": u.name,
                "used": u.used,
                "padded": u.padded,
                "shard": u.shard_size,
                "params": [
                    {
                        "names": [fq for _, _, fq in s.aliases],
                        "shape": list(s.shape),
                        "numel": s.numel,
                        "offset": s.offset,
                    }
                    for s in u.slots
                ],
            }
            for u in self._units
        ]

    def shards(self) -> list[nn.Parameter]:
        return [u.shard for u in self._units]


def _state_keys(module: nn.Module) -> list[str]:
    """The keys an unsharded module's state_dict would have, in order (parameters then buffers per module)."""
    keys = []
    for mname, m in module.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for attr, value in m.__dict__.items():
            if isinstance(value, ShardedParameter):
                keys.append(prefix + attr)
        for bname, b in m._buffers.items():
            if b is not None and bname not in m._non_persistent_buffers_set:
                keys.append(prefix + bname)
    seen = set()
    return [k for k in keys if not (k in seen or seen.add(k))]
