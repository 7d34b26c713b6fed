"""AutoMixedPrecision: per-module-group fp16 / bf16 / fp32 compute with fp32 master weights and loss scaling."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..ops.amp import unscale_check_norm_
from ..utils.names import matches
from .patterns import normalise_groups

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Group:
    """One precision group: the dtype its modules compute in, their name patterns, and how errors name it."""

    dtype: torch.dtype
    patterns: list[str]
    label: str  # e.g. "fp16_groups[0]"


_LOW = (torch.float16, torch.bfloat16)


def _cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """Casts every fp16/bf16 tensor in a (nested) output to ``dtype``."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if t.dtype in _LOW and t.dtype != dtype else t, tree
    )


def _fp16_supported(device_type: str) -> bool:
    try:
        with torch.autocast(device_type, dtype=torch.float16):
            a = torch.ones(2, 2, device=device_type)
            (a @ a).sum().item()
        return True
    except (RuntimeError, AssertionError):
        return False


def _check_schedule(owner: str, v: dict) -> None:
    """The loss-scale schedule: finite numbers with growth_factor > 1, 0 < backoff_factor < 1, an integer
    growth_interval >= 1, 0 < min_scale <= init_scale (or the current scale) and 0 <= growth_tracker < interval."""
    for name, value in v.items():
        integral = name in ("growth_interval", "growth_tracker")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integral else numbers.Real):
            raise TypeError(
                f"{owner}: expected {name} to be {'an integer' if integral else 'a number'}, but got "
                f"{type(value).__name__}"
            )
        if not math.isfinite(value):
            raise ValueError(f"{owner}: expected {name} to be finite, but got {value}")
    scale_name = "init_scale" if "init_scale" in v else "scale"
    rules = [
        (scale_name, v[scale_name] > 0, "> 0"),
        ("growth_factor", v["growth_factor"] > 1.0, "> 1"),
        ("backoff_factor", 0.0 < v["backoff_factor"] < 1.0, "in (0, 1)"),
        ("growth_interval", v["growth_interval"] >= 1, ">= 1"),
        ("min_scale", 0.0 < v["min_scale"] <= v[scale_name], f"in (0, {scale_name}={v[scale_name]}]"),
    ]
    if "growth_tracker" in v:
        rules.append(
            ("growth_tracker", 0 <= v["growth_tracker"] < v["growth_interval"], f"in [0, {v['growth_interval']})")
        )
    for name, ok, expected in rules:
        if not ok:
            raise ValueError(f"{owner}: expected {name} {expected}, but got {v[name]}")


class AutoMixedPrecision:
    """Runs groups of modules in their own precision and scales the loss where fp16 is in play.

    Each group is a list of module-name patterns (see :mod:`deepseek_ext.amp.patterns`: ``'layer.0'`` matches
    ``bert.encoder.layer.0`` and all below it, never ``layer.01``; components may be globs). Modules of an fp16 or
    bf16 group compute under ``torch.autocast`` with that dtype (per-op casting: matmuls and convolutions in low
    precision, reductions where autocast keeps them); their floating outputs are cast back to fp32 at the group's
    boundary when the rest of the model runs in fp32. Parameters stay fp32 and belong to the optimizer as before, so
    they are the master weights. A module matched by two groups is an error.

    Loss scaling is dynamic, as ``torch.amp.GradScaler`` (``init_scale``, ``growth_factor``, ``backoff_factor``,
    ``growth_interval``, plus a floor ``min_scale``), and active only when some group (or the default) is fp16.
    Unscaling, the non-finite check and the gradient norm are one fused native op
    (``torch.ops.deepseek_ext.unscale_check_norm_``). A step with non-finite gradients is skipped: parameters and
    optimizer state stay as they were, and the scale backs off.

    Args:
        optimizer: any ``torch.optim`` optimizer over (a subset of) ``model``'s parameters.
        model: the model whose modules the patterns name. May instead be given later with :meth:`attach`.
        fp16_groups, bf16_groups, fp32_groups: lists of groups; a group is a pattern or a list of patterns.
        default_dtype: precision of every module no group matches (``torch.float32``, ``torch.bfloat16`` or
            ``torch.float16``).
        init_scale, growth_factor, backoff_factor, growth_interval, min_scale: the loss-scale schedule.

    Example:
        >>> amp = AutoMixedPrecision(optimizer, model=model, fp16_groups=[["layer.0", "layer.1"]],
        ...                          bf16_groups=["classifier"])
        >>> loss = model(**batch).loss
        >>> amp.backward(loss)
        >>> amp.step()
        >>> optimizer.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        fp16_groups=None,
        bf16_groups=None,
        fp32_groups=None,
        default_dtype: torch.dtype = torch.float32,
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        min_scale: float = 1.0,
    ):
        if default_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"AutoMixedPrecision: default_dtype must be torch.float32, torch.float16 or "
                f"torch.bfloat16, got {default_dtype}"
            )
        _check_schedule(
            "AutoMixedPrecision",
            {
                "init_scale": init_scale,
                "growth_factor": growth_factor,
                "backoff_factor": backoff_factor,
                "growth_interval": growth_interval,
                "min_scale": min_scale,
            },
        )
        self.optimizer = optimizer
        self.default_dtype = default_dtype
        self._groups: list[_Group] = []
        for dtype, groups, name in (
            (torch.float16, fp16_groups, "fp16_groups"),
            (torch.bfloat16, bf16_groups, "bf16_groups"),
            (torch.float32, fp32_groups, "fp32_groups"),
        ):
            for i, patterns in enumerate(normalise_groups(groups, name)):
                self._groups.append(_Group(dtype, patterns, f"{name}[{i}]"))
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._min_scale = min_scale
        self._scale = float(init_scale)
        self._growth_tracker = 0
        self._unscaled = False
        self._found_inf = False
        self._grad_norm: torch.Tensor | None = None
        self.last_step_skipped = False
        self.model: torch.nn.Module | None = None
        self._plan: dict[str, torch.dtype] = {}
        self._originals: dict[torch.nn.Module, Any] = {}
        self._device_type = "cpu"
        if model is not None:
            self.attach(model)

    # ------------------------------------------------------------------------------------------------- the plan
    @property
    def scaling(self) -> bool:
        """Whether loss scaling is active (some group, or the default, computes in fp16)."""
        return self.default_dtype == torch.float16 or any(g.dtype == torch.float16 for g in self._groups)

    def attach(self, model: torch.nn.Module) -> AutoMixedPrecision:
        """Assigns ``model``'s modules to groups and installs the per-group precision. Returns ``self``."""
        if self.model is not None:
            raise RuntimeError("AutoMixedPrecision: a model is already attached; call detach() first")
        model_params = {id(p) for p in model.parameters()}
        foreign = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in model_params]
        if foreign:
            raise ValueError(
                f"AutoMixedPrecision: {len(foreign)} of the optimizer's parameters are not parameters of "
                "the model (shapes " + ", ".join(str(tuple(p.shape)) for p in foreign[:3]) + ")"
            )
        first = next(model.parameters(), None)
        self._device_type = first.device.type if first is not None else "cpu"

        dtypes = [g.dtype for g in self._groups]
        if torch.float16 in dtypes + [self.default_dtype] and not _fp16_supported(self._device_type):
            warnings.warn(
                f"AutoMixedPrecision: float16 autocast does not work on {self._device_type} with this "
                "torch; the fp16 groups run in bfloat16 instead",
                stacklevel=2,
            )
            self._groups = [
                dataclasses.replace(g, dtype=torch.bfloat16) if g.dtype == torch.float16 else g for g in self._groups
            ]
            if self.default_dtype == torch.float16:
                self.default_dtype = torch.bfloat16

        assignment: dict[str, int] = {}
        used = [False] * len(self._groups)
        for name, _ in model.named_modules():
            hits = [gi for gi, g in enumerate(self._groups) if any(matches(p, name) for p in g.patterns)]
            if len(hits) > 1:
                labels = " and ".join(f"{self._groups[g].label} {self._groups[g].patterns}" for g in hits)
                raise ValueError(f"AutoMixedPrecision: module '{name}' is matched by two groups: {labels}")
            if hits:
                assignment[name] = hits[0]
                used[hits[0]] = True
        for gi, group in enumerate(self._groups):
            patterns, label = group.patterns, group.label
            if not used[gi]:
                warnings.warn(f"AutoMixedPrecision: {label} {patterns} matches no module of the model", stacklevel=2)
            else:
                names = [n for n in assignment if assignment[n] == gi]
                unused = [p for p in patterns if not any(matches(p, n) for n in names)]
                if unused:
                    warnings.warn(f"AutoMixedPrecision: patterns {unused} of {label} match no module", stacklevel=2)

        self.model = model
        self._plan = {}
        for name, module in model.named_modules():
            if not name:
                continue
            group = assignment.get(name)
            self._plan[name] = self.default_dtype if group is None else self._groups[group].dtype
            parent = name.rpartition(".")[0]
            if group is not None and assignment.get(parent) != group:  # the group's boundary: wrap here
                self._wrap(module, self._groups[group].dtype)
        if self.default_dtype != torch.float32:
            self._wrap(model, self.default_dtype, outermost=True)
        return self

    def _wrap(self, module: torch.nn.Module, dtype: torch.dtype, outermost: bool = False) -> None:
        original = module.forward
        device_type = self._device_type
        # Outputs go back to what the surrounding code expects: fp32 around an fp32 default region.
        back = torch.float32 if (outermost or self.default_dtype == torch.float32) else None

        if dtype == torch.float32:

            def forward(*args, **kwargs):
                args, kwargs = _cast_floating((args, kwargs), torch.float32)
                with torch.autocast(device_type, enabled=False):
                    return original(*args, **kwargs)
        else:

            def forward(*args, **kwargs):
                with torch.autocast(device_type, dtype=dtype):
                    out = original(*args, **kwargs)
                return out if back is None else _cast_floating(out, back)

        self._originals[module] = original
        module.forward = forward

    def detach(self) -> None:
        """Restores every wrapped module's own forward."""
        for module in self._originals:
            del module.forward  # the instance attribute shadows the class's forward
        self._originals.clear()
        self.model = None
        self._plan = {}

    def plan(self, print_table: bool = False) -> dict[str, torch.dtype]:
        """Which dtype each submodule computes in, ``{qualified name: dtype}``. A summary (one line per region) is
        logged (``logging``, INFO) and, with ``print_table=True``, printed."""
        if self.model is None:
            raise RuntimeError("AutoMixedPrecision.plan(): no model attached (pass model= or call attach(model))")
        lines = [
            f"AutoMixedPrecision plan (default {self.default_dtype}, loss scaling {'on' if self.scaling else 'off'}):"
        ]
        # A region starts where a module's dtype differs from its parent's (the root's is the default).
        roots = [n for n in self._plan if self._plan[n] != self._plan.get(n.rpartition(".")[0], self.default_dtype)]
        for name in roots:
            below = sum(1 for m in self._plan if m.startswith(name + "."))
            lines.append(f"  {str(self._plan[name]).removeprefix('torch.'):<9} {name}  (+{below} submodules)")
        log.info("\n".join(lines))
        if print_table:
            print("\n".join(lines))
        return dict(self._plan)

    # --------------------------------------------------------------------------------------------- loss scaling
    def get_scale(self) -> float:
        return self._scale if self.scaling else 1.0

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()``, scaled when fp16 is in play. Call once per micro-batch when accumulating."""
        if self.model is None:
            raise RuntimeError(
                "AutoMixedPrecision needs the model to map module names to groups: pass model= or call "
                "amp.attach(model) before training"
            )
        (loss * self._scale if self.scaling else loss).backward(**kwargs)

    def _grads_by_device(self) -> dict[torch.device, list[torch.Tensor]]:
        out: dict[torch.device, list[torch.Tensor]] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("AutoMixedPrecision: sparse gradients are not supported")
                    out.setdefault(p.grad.device, []).append(p.grad)
        return out

    def unscale_(self) -> torch.Tensor:
        """Unscales the gradients in place (once per step) and returns their total L2 norm (inf/NaN if any gradient
        is non-finite). Called by :meth:`step` and :meth:`clip_grad_norm_` as needed."""
        if self._unscaled:
            raise RuntimeError("AutoMixedPrecision.unscale_() has already been called since the last step()")
        inv = torch.tensor([1.0 / self.get_scale()], dtype=torch.float32)
        total_sq = torch.zeros((), dtype=torch.float64)
        found = False
        for device, grads in self._grads_by_device().items():
            found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            norm = unscale_check_norm_(grads, found_inf, inv.to(device))
            total_sq += norm.double().cpu() ** 2
            found |= bool(found_inf.item())
        self._found_inf = found
        self._grad_norm = total_sq.sqrt().float()
        self._unscaled = True
        return self._grad_norm

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clips the unscaled gradients to total L2 norm ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``) and
        returns the norm before clipping. With non-finite gradients nothing is clipped (the step will be skipped).
        ``max_norm`` must be a non-negative number (``inf``: no clipping)."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
            raise TypeError(f"AutoMixedPrecision.clip_grad_norm_: expected max_norm to be a number, got {max_norm!r}")
        if not max_norm >= 0:
            raise ValueError(f"AutoMixedPrecision.clip_grad_norm_: expected max_norm >= 0, but got {max_norm}")
        norm = self._grad_norm if self._unscaled else self.unscale_()
        if not self._found_inf:
            coef = max_norm / (float(norm) + 1e-6)
            if coef < 1.0:
                for grads in self._grads_by_device().values():
                    torch._foreach_mul_(grads, coef)
        return norm

    def step(self, *args, **kwargs):
        """Unscales (if not yet done), then ``optimizer.step()`` unless the gradients hold inf/NaN, then updates the
        loss scale. Returns what ``optimizer.step`` returned, or None for a skipped step. Without loss scaling (bf16
        and fp32 only) the gradients are still checked, in the same fused pass, and a non-finite step is skipped."""
        if not self._unscaled:
            self.unscale_()
        skip = self._found_inf
        result = None if skip else self.optimizer.step(*args, **kwargs)
        self.last_step_skipped = skip
        if self.scaling:
            if skip:
                self._scale = max(self._scale * self._backoff_factor, self._min_scale)
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    self._scale *= self._growth_factor
                    self._growth_tracker = 0
        self._unscaled = False
        self._found_inf = False
        return result

    # ---------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "min_scale": self._min_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`; every field is checked (finite, in range) before anything changes."""
        keys = ("scale", "growth_tracker", "growth_factor", "backoff_factor", "growth_interval", "min_scale")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            missing = [k for k in keys if not isinstance(state, dict) or k not in state]
            raise ValueError(f"AutoMixedPrecision.load_state_dict: the state lacks {missing}")
        _check_schedule("AutoMixedPrecision.load_state_dict", {k: state[k] for k in keys})
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._growth_factor = float(state["growth_factor"])
        self._backoff_factor = float(state["backoff_factor"])
        self._growth_interval = int(state["growth_interval"])
        self._min_scale = float(state["min_scale"])
