"""ZeRO-3: parameters, gradients and optimizer state sharded over the ranks of a ``torch.distributed`` job.

Each *unit* (by default every child module that holds parameters, looking through ``ModuleList``/``Sequential``
containers; or every module of the classes in ``wrap_policy``) keeps its parameters as one flat buffer, padded to
split evenly, of which each rank stores a slice (an ``nn.Parameter`` the optimizer sees). Parameters shared between
units (tied weights) and parameters outside every unit live in a root unit that stays gathered for the whole step.

A unit is always in one of four states (``UnitState``), and ``_Unit.to`` is the one place that changes it:

    SHARDED --gather(async)--> GATHERING --wait--> GATHERED --release--> SHARDED
    SHARDED --gather---------------------------> GATHERED --reduce---> REDUCING --done--> SHARDED

Around the unit's forward it is gathered and the module's parameters become views of the full buffer; after the
forward it is released (``reshard_after_forward``) and gathered again when the gradient reaches the unit's outputs;
once the full gradient has accumulated it is reduce-scattered (averaged over ranks) into the slice's ``.grad`` and
released. With ``prefetch >= 1`` the next units' gathers start asynchronously while the current unit computes.

Small consecutive units (up to ``bucket_elems`` elements together, in first-forward order) share one *bucket*: one
all-gather brings all of them in (each unit's slice is copied out of the bucket's buffer), so a model of many small
modules does not pay one collective latency per module. The flat layout (offsets, alignment, padding) and the buckets
are planned here, in Python: they are computed once, at construction.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
_MAX_REDUCTIONS = 2  # asynchronous reduce-scatters in flight during backward


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


# -------------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class FlatLayout:
    """Where the parameters of one unit sit in its flat buffer.

    Attributes:
        offsets: start of each parameter (elements), each aligned to ``align``.
        used: elements up to the end of the last parameter (alignment gaps included).
        padded: the buffer's size: a multiple of ``world_size * align`` (at least one such block), so every rank's
            slice has the same size and starts aligned.
        shard: ``padded // world_size``, the elements each rank owns.
    """

    offsets: tuple[int, ...]
    used: int
    padded: int
    shard: int


def plan_flat_layout(numels: list[int], world_size: int, align: int) -> FlatLayout:
    """The flat layout of parameters of ``numels`` elements, laid out in order.

    Example:
        >>> plan_flat_layout([10, 3, 0, 17], world_size=4, align=4)
        FlatLayout(offsets=(0, 12, 16, 16), used=33, padded=48, shard=12)
    """
    if world_size < 1:
        raise ValueError(f"plan_flat_layout: expected world_size >= 1, but got {world_size}")
    if align < 1:
        raise ValueError(f"plan_flat_layout: expected align >= 1, but got {align}")
    offsets, pos = [], 0
    for n in numels:
        if n < 0:
            raise ValueError(f"plan_flat_layout: expected parameter sizes >= 0, but got {n}")
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += n
    block = world_size * align
    padded = max(block, -(-pos // block) * block)
    return FlatLayout(tuple(offsets), pos, padded, padded // world_size)


def plan_buckets(sizes: list[int], bucket_elems: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's ``sizes`` add up to at most ``bucket_elems`` (an item larger than
    that is a group of its own).

    Example:
        >>> plan_buckets([5, 5, 5, 20, 1, 1], 10)
        [[0, 1], [2], [3], [4, 5]]
    """
    groups: list[list[int]] = []
    filled = 0
    for i, n in enumerate(sizes):
        if not groups or filled + n > bucket_elems:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += n
    return groups


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

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This parameter's view of a unit's flat buffer."""
        return flat[self.offset : self.offset + self.numel].view(self.shape)

    def point_at(self, value) -> None:
        """Every alias of the parameter now reads ``value`` (a view, or a ``ShardedParameter``)."""
        for m, attr, fq in self.aliases:
            m.__dict__[attr] = ShardedParameter(fq) if value is None else value


class UnitState(enum.Enum):
    SHARDED = "sharded"  # the rank holds its slice only; the full buffer has no storage
    GATHERING = "gathering"  # an asynchronous all-gather into the full buffer is in flight
    GATHERED = "gathered"  # the full buffer holds the whole parameters
    REDUCING = "reducing"  # the full gradient is being reduce-scattered into the slice's gradient


_TRANSITIONS = {
    UnitState.SHARDED: {UnitState.GATHERING, UnitState.GATHERED},
    UnitState.GATHERING: {UnitState.GATHERED},
    UnitState.GATHERED: {UnitState.SHARDED, UnitState.REDUCING},
    UnitState.REDUCING: {UnitState.SHARDED},
}


@dataclass(eq=False)
class _Unit:
    name: str
    module: nn.Module | None  # None for the root unit
    slots: list[_Slot]
    layout: FlatLayout
    shard: nn.Parameter  # this rank's slice, what the optimizer sees
    full: torch.Tensor  # the whole flat buffer: a leaf requiring grad, without storage while sharded
    state: UnitState = UnitState.SHARDED
    bucket: _Bucket | None = None
    hooks: list = field(default_factory=list)

    def to(self, state: UnitState) -> None:
        """The one place a unit's state changes; an impossible transition is a bug, reported as such."""
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"ZeRO3: unit '{self.name}' cannot go from {self.state.value} to {state.value}")
        self.state = state

    def point_modules(self, flat: torch.Tensor | None) -> None:
        """Every parameter attribute now reads its view of ``flat`` (None: a ``ShardedParameter``)."""
        for slot in self.slots:
            slot.point_at(None if flat is None else slot.view(flat))

    def storage_alias(self) -> torch.Tensor:
        """A second tensor on the full buffer's storage (allocated if released): it has its own version counter, so
        refilling the storage before backward does not look like an in-place change to the views autograd saved."""
        full = self.full
        full.untyped_storage().resize_(full.numel() * full.element_size())
        return torch.empty(0, dtype=full.dtype, device=full.device).set_(full.untyped_storage(), 0, full.shape)


@dataclass(eq=False)
class _Bucket:
    """Consecutive units gathered by one all-gather and reduce-scattered by one reduce-scatter. Rank ``r``'s part
    of the collective buffer is ``[unit 0's slice r | unit 1's slice r | ...]``."""

    units: list[_Unit]
    work: object | None = None  # the all-gather in flight
    gathered: torch.Tensor | None = None  # its output, until copied into the units' buffers
    receivers: list[_Unit] = field(default_factory=list)  # the units it fills
    # reduce-scatters in flight: (work, its input and output, {unit: its part of the output})
    reductions: list[tuple[object, torch.Tensor, torch.Tensor, dict]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(u.layout.shard for u in self.units)

    def columns(self):
        """``(unit, first column, last column)`` of each unit in the ``(world, total)`` view of a bucket buffer."""
        start = 0
        for u in self.units:
            yield u, start, start + u.layout.shard
            start += u.layout.shard


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
        align: every parameter and every rank's slice starts at a multiple of this many elements.
        bucket_elems: consecutive units with at most this many elements together share one all-gather and one
            reduce-scatter (0: one collective per unit).

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
        bucket_elems: int = 1 << 20,
    ):
        super().__init__()
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
        self._state_keys = list(model.state_dict().keys())  # the unsharded model's, in its order
        self._units = [self._build(name, m, slots) for name, m, slots in self._plan_units(model, wrap_policy)]
        self.flat_shards = nn.ParameterList([u.shard for u in self._units])
        self._root = next((u for u in self._units if u.module is None), None)
        self._buckets = self._plan_buckets(bucket_elems)
        self._order: list[_Unit] = []  # units in first-forward order, for prefetching
        self._recording = True
        self._flush_queued = False
        self._reducing: list[_Bucket] = []  # buckets with reduce-scatters in flight, oldest first
        for unit in self._units:
            if unit.module is not None:
                unit.hooks.append(unit.module.register_forward_pre_hook(self._pre_forward(unit)))
                unit.hooks.append(unit.module.register_forward_hook(self._post_forward(unit), always_call=True))

    # ------------------------------------------------------------------------------------------------ planning
    @staticmethod
    def _plan_units(model: nn.Module, wrap_policy) -> list[tuple[str, nn.Module | None, list[_Slot]]]:
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
        out = [(name, m, slots_by_unit[i]) for i, (name, m) in enumerate(owners) if slots_by_unit[i]]
        if slots_by_unit[-1]:
            out.append(("<root>", None, slots_by_unit[-1]))
        return out

    def _build(self, name: str, module: nn.Module | None, slots: list[_Slot]) -> _Unit:
        first_module, first_attr, _ = slots[0].aliases[0]
        p0 = first_module._parameters[first_attr]
        device, dtype = p0.device, p0.dtype
        layout = plan_flat_layout([s.numel for s in slots], self.world, self.align)
        flat = torch.zeros(layout.padded, dtype=dtype, device=device)
        for slot, offset in zip(slots, layout.offsets):
            slot.offset = offset
            m, attr, _ = slot.aliases[0]
            slot.view(flat).copy_(m._parameters[attr].detach())
        dist.broadcast(flat, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        shard = nn.Parameter(flat[self.rank * layout.shard : (self.rank + 1) * layout.shard].clone())
        full = torch.empty(layout.padded, dtype=self.param_dtype or dtype, device=device).requires_grad_()
        full.untyped_storage().resize_(0)
        unit = _Unit(name, module, slots, layout, shard, full)
        full.register_post_accumulate_grad_hook(self._post_backward(unit))
        for slot in slots:
            for m, attr, _ in slot.aliases:
                del m._parameters[attr]
        unit.point_modules(None)
        return unit

    def _plan_buckets(self, bucket_elems: int) -> list[_Bucket]:
        """Consecutive module units of the same dtype and device up to ``bucket_elems`` elements share a bucket;
        the root unit (gathered for the whole step) has its own."""
        buckets: list[_Bucket] = []
        run: list[_Unit] = []

        def close():
            for group in plan_buckets([u.layout.padded for u in run], bucket_elems):
                buckets.append(_Bucket([run[i] for i in group]))
            run.clear()

        for unit in self._units:
            if run and (
                unit.module is None or (unit.full.dtype, unit.full.device) != (run[0].full.dtype, run[0].full.device)
            ):
                close()
            run.append(unit)
            if unit.module is None:
                close()
        close()
        for b in buckets:
            for u in b.units:
                u.bucket = b
        return buckets

    # ------------------------------------------------------------------------------------------ gather / release
    def _start_gather(self, unit: _Unit, async_op: bool) -> None:
        """SHARDED -> GATHERING (async) or GATHERED, for every sharded unit of ``unit``'s bucket."""
        bucket = unit.bucket
        if bucket.receivers:  # the bucket's previous gather (for its other units) completes first
            self._finish_gather(bucket)
        if unit.state is not UnitState.SHARDED:
            return
        receivers = [u for u in bucket.units if u.state is UnitState.SHARDED]
        full = unit.full
        if len(bucket.units) == 1:  # straight into the unit's buffer
            out = unit.storage_alias()
            send = unit.shard.detach().to(full.dtype)
        else:
            out = torch.empty(self.world * bucket.total, dtype=full.dtype, device=full.device)
            send = torch.cat([u.shard.detach().to(full.dtype) for u in bucket.units])
        with torch.no_grad():
            work = _all_gather(out, send, self.group, async_op=async_op)
        bucket.work, bucket.gathered, bucket.receivers = work if async_op else None, out, receivers
        for u in receivers:
            u.to(UnitState.GATHERING)
        if not async_op:
            self._finish_gather(bucket)

    def _finish_gather(self, bucket: _Bucket) -> None:
        """GATHERING -> GATHERED: waits for the bucket's all-gather and copies each unit's part out of it."""
        if bucket.work is not None:
            bucket.work.wait()
            bucket.work = None
        if len(bucket.units) > 1:
            table = bucket.gathered.view(self.world, bucket.total)
            with torch.no_grad():
                for u, lo, hi in bucket.columns():
                    if u in bucket.receivers:
                        u.storage_alias().view(self.world, u.layout.shard).copy_(table[:, lo:hi])
        for u in bucket.receivers:
            u.to(UnitState.GATHERED)
        bucket.gathered, bucket.receivers = None, []

    def _gather(self, unit: _Unit) -> None:
        """Whatever its state, ``unit`` is GATHERED (or REDUCING) on return."""
        if unit.state is UnitState.SHARDED:
            self._start_gather(unit, async_op=False)
        elif unit.state is UnitState.GATHERING:
            self._finish_gather(unit.bucket)

    def _release(self, unit: _Unit) -> None:
        """-> SHARDED: the modules see ``ShardedParameter``s and the full buffer's storage is freed."""
        if unit.state is UnitState.GATHERING:
            self._finish_gather(unit.bucket)
        if unit.state is UnitState.SHARDED:
            return
        unit.point_modules(None)
        unit.full.untyped_storage().resize_(0)
        unit.to(UnitState.SHARDED)

    def _prefetch_after(self, unit: _Unit, step: int) -> None:
        if self.prefetch <= 0 or unit not in self._order:
            return
        i = self._order.index(unit)
        for j in range(1, self.prefetch + 1):
            k = i + step * j
            if 0 <= k < len(self._order):
                self._start_gather(self._order[k], async_op=True)

    # ---------------------------------------------------------------------------------------------- reduction
    def _reduce(self, bucket: _Bucket) -> None:
        """Starts one asynchronous reduce-scatter of the gradients of the bucket's REDUCING units (zeros stand in for
        units without one) and frees their full buffers; ``_finish_reductions`` completes it. Backward goes on
        meanwhile, so the collective overlaps the earlier units' gradient computation."""
        reducing = [u for u in bucket.units if u.state is UnitState.REDUCING and u.full.grad is not None]
        if not reducing:
            return
        dtype, device = bucket.units[0].shard.dtype, bucket.units[0].shard.device
        if len(bucket.units) == 1:
            send = reducing[0].full.grad.to(dtype)
        else:
            columns = []
            for u, _, _ in bucket.columns():
                g = u.full.grad if u in reducing else None
                g = torch.zeros(u.layout.padded, dtype=dtype, device=device) if g is None else g.to(dtype)
                columns.append(g.view(self.world, u.layout.shard))
            send = torch.cat(columns, dim=1).reshape(-1)
        out = torch.empty(bucket.total, dtype=dtype, device=device)
        work = _reduce_scatter(out, send, self.group, async_op=True)
        bucket.reductions.append((work, send, out, {u: out[lo:hi] for u, lo, hi in bucket.columns() if u in reducing}))
        for u in reducing:
            u.full.grad = None
            u.point_modules(None)
            u.full.untyped_storage().resize_(0)
        # At most MAX_REDUCTIONS in flight: enough to overlap the next units' backward, while a full-size gradient
        # is never held for more than that many buckets.
        self._reducing.append(bucket)
        while len(self._reducing) > _MAX_REDUCTIONS:
            self._finish_reductions(self._reducing.pop(0))

    def _finish_reductions(self, bucket: _Bucket) -> None:
        """REDUCING -> SHARDED: waits for the bucket's reduce-scatters and adds each unit's part, averaged over the
        ranks, to its slice's ``.grad``."""
        for work, _, _, parts in bucket.reductions:
            work.wait()
            for u, part in parts.items():
                g = part / self.world
                u.shard.grad = g if u.shard.grad is None else u.shard.grad + g
                u.to(UnitState.SHARDED)
        bucket.reductions.clear()

    def _flush(self) -> None:
        """End of backward: the buckets still holding gradients (some of their units took no part in this backward)
        are reduced, and every reduce-scatter in flight completes before ``backward()`` returns."""
        self._flush_queued = False
        for bucket in self._buckets:
            self._reduce(bucket)
        for bucket in self._buckets:
            self._finish_reductions(bucket)
        self._reducing.clear()

    # --------------------------------------------------------------------------------------------------- hooks
    def _pre_forward(self, unit: _Unit):
        def hook(module, args):
            if self._recording and unit not in self._order:
                self._order.append(unit)
            self._gather(unit)
            unit.point_modules(unit.full)
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
            # The last unit of the forward is the first of backward: kept gathered rather than released and gathered
            # again at once (from the second step on, when the order is known).
            last = not self._recording and self._order and unit is self._order[-1]
            if not torch.is_grad_enabled() or (self.reshard_after_forward and not last):
                self._release(unit)

        return hook

    def _post_backward(self, unit: _Unit):
        def hook(full: torch.Tensor):
            unit.to(UnitState.REDUCING)
            if not self._flush_queued:
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            if all(u.state is UnitState.REDUCING for u in unit.bucket.units):
                self._reduce(unit.bucket)

        return hook

    def forward(self, *args, **kwargs):
        self._flush_queued = False  # a backward that raised left its flush unqueued
        if self._root is not None:
            self._gather(self._root)
            self._root.point_modules(self._root.full)
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
            unit.point_modules(unit.full.detach())
        try:
            yield self.module
        finally:
            for unit in self._units:
                if writeback:
                    with torch.no_grad():
                        lo = self.rank * unit.layout.shard
                        unit.shard.copy_(unit.full.detach()[lo : lo + unit.layout.shard].to(unit.shard.dtype))
                self._release(unit)

    def full_state_dict(self) -> dict:
        """The unsharded model's state_dict on rank 0 (an empty dict on other ranks), gathered one unit at a time,
        so peak memory is one unit's parameters, not the model twice. Keys and order are the original model's."""
        out: dict[str, torch.Tensor] = {}
        for unit in self._units:
            self._gather(unit)
            if self.rank == 0:
                for slot in unit.slots:
                    value = slot.view(unit.full.detach()).to(unit.shard.dtype).clone()
                    for _, _, fq in slot.aliases:
                        out[fq] = value
            self._release(unit)
        if self.rank != 0:
            return {}
        for name, buf in self.module.named_buffers():
            out[name] = buf.detach().clone()
        return {k: out[k] for k in self._state_keys if k in out}

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None, print_report: bool = False) -> dict:
        """Bytes this rank holds: parameter shards, their gradients, optimizer state, and the largest gathered unit.

        The report is returned and logged (``logging``, INFO); ``print_report=True`` also prints it."""
        shards = [u.shard for u in self._units]
        report = {
            "rank": self.rank,
            "world_size": self.world,
            "param_shard_bytes": sum(s.numel() * s.element_size() for s in shards),
            "grad_shard_bytes": sum(s.grad.numel() * s.grad.element_size() for s in shards if s.grad is not None),
            "optimizer_state_bytes": 0,
            "largest_unit_gathered_bytes": max(
                (u.layout.padded * u.full.element_size() for u in self._units), default=0
            ),
            "unsharded_param_bytes": sum(u.layout.used * u.shard.element_size() for u in self._units),
        }
        if optimizer is not None:
            for st in optimizer.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        report["optimizer_state_bytes"] += v.numel() * v.element_size()
        mib = {k: f"{v / 2**20:.2f} MiB" for k, v in report.items() if k.endswith("bytes")}
        line = f"ZeRO3 rank {self.rank}/{self.world}: {mib}"
        log.info(line)
        if print_report:
            print(line)
        return report

    # ------------------------------------------------------------------------------- checkpoint support
    def sharded_layout(self) -> list[dict]:
        """The flat layout of every unit (what a checkpoint manifest records)."""
        return [
            {
                "name": u.name,
                "used": u.layout.used,
                "padded": u.layout.padded,
                "shard": u.layout.shard,
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

    def unit_states(self) -> dict[str, UnitState]:
        """Each unit's state (all ``SHARDED`` between steps)."""
        return {u.name: u.state for u in self._units}
