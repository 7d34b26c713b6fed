"""Quantizer: one call from a float model to a quantized one, plus calibration and an error/size report."""

from __future__ import annotations

import copy
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import _transformers
from ..utils.names import matches
from .config import QuantConfig
from .modules import QuantizedConv2d, QuantizedLinear, _QuantizedWeight, check_quantized_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Handler:
    """How :class:`Quantizer` treats one module type."""

    can_take: Callable  # (module) -> a reason to keep this module in float, or None
    factory: Callable  # (module, config) -> the quantized module


_HANDLERS: dict[type, _Handler] = {}


def register_quantized_module(module_type: type, factory: Callable, can_take: Callable | None = None) -> None:
    """Makes :class:`Quantizer` replace modules of exactly ``module_type`` by ``factory(module, config)``;
    ``can_take(module)`` may return a reason to keep a particular module in float.

    Example:
        >>> register_quantized_module(MyLinear, QuantizedLinear)   # factory(module, config) -> quantized module
    """
    _HANDLERS[module_type] = _Handler(can_take or (lambda m: None), factory)


def _conv_reason(conv: nn.Conv2d):
    if conv.groups != 1:
        return f"groups={conv.groups} (grouped/depthwise convolution)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / {conv.padding_mode}"
    return None


register_quantized_module(nn.Linear, QuantizedLinear)
register_quantized_module(nn.Conv2d, QuantizedConv2d, _conv_reason)


def _handler(module: nn.Module):
    """The handler of ``module``'s exact type. transformers' Conv1D (the Linear of its transposed
    weight) and FalconLinear (a Linear) are registered on first sight."""
    conv1d = _transformers.conv1d()
    if conv1d is not None and conv1d not in _HANDLERS:
        register_quantized_module(conv1d, QuantizedLinear.from_conv1d)
    for linear in _transformers.linear_likes():
        if linear not in _HANDLERS:
            register_quantized_module(linear, QuantizedLinear)
    return _HANDLERS.get(type(module))


def _unhandled_reason(module: nn.Module) -> str | None:
    """Why a layer that looks quantizable (a subclass of a registered type) is left in float, or None."""
    for base in (nn.Linear, nn.Conv2d):
        if isinstance(module, base) and type(module) is not base:
            return (
                f"{type(module).__name__} subclasses {base.__name__} but has no handler "
                f"(register_quantized_module({type(module).__name__}, ...))"
            )
    return None


def _tied_reason(name: str, module: nn.Module, holders: dict[int, list]) -> str | None:
    """A layer whose weight is also held by another module (a tied LM head and embedding) stays in float with it:
    quantizing one alone would keep the float weight for the other as well as the codes (a larger model)."""
    weight = getattr(module, "weight", None)
    others = [(n, m) for n, m in holders.get(id(weight), []) if m is not module]
    if not isinstance(weight, torch.Tensor) or not others:
        return None
    n, m = others[0]
    return f"weight tied to '{n}' ({type(m).__name__}); tied layers stay in float together"


def _warn_fallbacks(fallbacks: dict[str, str]) -> None:
    """One warning per quantization listing the layers left in float that the config did not ask to skip."""
    left = {k: v for k, v in fallbacks.items() if v != "skipped by config"}
    if left:
        listed = "; ".join(f"{k}: {v}" for k, v in left.items())
        warnings.warn(
            f"Quantizer: {len(left)} layer(s) stay in float ({listed}); Quantizer.fallbacks and compare() list them",
            UserWarning,
            stacklevel=3,
        )


def _run(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _model_args(batch: Any) -> tuple:
    """The positional inputs of a traced model for one batch of a loader."""
    if isinstance(batch, dict):
        raise TypeError("Quantizer.calibrate(): a static int8 graph takes positional inputs, not a dict batch")
    if isinstance(batch, (tuple, list)):
        return (batch[0],)
    return (batch,)


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    raise TypeError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref.float() - test.float()).pow(2).sum().item()
    signal = ref.float().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()


@dataclass
class LayerReport:
    """One layer's row of :meth:`Quantizer.compare`: its name, kind, status (``'quantized'`` or ``'float: <reason>'``),
    float and packed sizes in bytes, and the output's SQNR (dB) and relative error against the float layer.

    Example:
        >>> for row in quantizer.compare(quantized_model, sample_inputs, print_table=False):
        ...     print(row.name, row.status, row.sqnr_db)
    """

    name: str
    kind: str
    status: str  # "quantized" or "float: <reason>"
    float_bytes: int
    quantized_bytes: int
    sqnr_db: float | None
    rel_error: float | None


class Quantizer:
    """Quantizes ``model``'s Linear and Conv2d layers (and transformers' ``Conv1D``, GPT-2's transposed Linear) per
    ``config``; the rest is untouched. Layers left in float (skipped, unsupported, or with a weight tied to a module
    that stays float, as a tied LM head and embedding) are listed in ``fallbacks`` and in :meth:`compare`, and
    :meth:`quantize` warns once about those the config did not ask to skip.

    Static quantization: ``calibrate(loader, model=quantized_model)`` sets the activation scales of the model it is
    given; scales observed before :meth:`quantize` also go into the models quantized afterwards. A quantizer keeps
    no reference to the models it returned (``calibrate`` without ``model=`` after ``quantize`` is a deprecated
    form that calibrates the most recent one).

    Example:
        >>> quantizer = Quantizer(model, QuantConfig(weight_bits=4, activation_bits=8, method="dynamic"))
        >>> quantized_model = quantizer.quantize()
        >>> report = quantizer.compare(quantized_model, sample_inputs)
    """

    def __init__(self, model: nn.Module, config: QuantConfig | None = None):
        self.model = model
        self.config = config or QuantConfig()
        self.fallbacks: dict[str, str] = {}
        self._act_scales: dict[str, torch.Tensor] = {}
        # Only for the deprecated calibrate() without model=: a weak reference, so the quantizer owns nothing.
        self._most_recent: weakref.ref | None = None

    def quantize(self) -> nn.Module:
        """A quantized copy of the model (the original is left as it was).

        ``method='static'``: the copy is traced with ``torch.fx`` and its layers fused (see
        :mod:`deepseek_ext.quant.graph`); the result runs after :meth:`calibrate`, with int8 activations between
        layers. A model that cannot be traced is quantized module by module instead, with a warning."""
        if self.config.method == "static":
            static = self._quantize_graph()
            if static is not None:
                self._most_recent = weakref.ref(static)
                return static
        qmodel = copy.deepcopy(self.model)
        self.fallbacks = {}
        holders: dict[int, list] = {}  # parameter -> the modules holding it (tied weights have several)
        for name, module in qmodel.named_modules():
            for p in module.parameters(recurse=False):
                holders.setdefault(id(p), []).append((name, module))
        for name, module in list(qmodel.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                handler = _handler(child)
                if handler is None:
                    reason = _unhandled_reason(child)
                    if reason is not None:
                        self.fallbacks[full] = reason
                    continue
                if any(matches(p, full) for p in self.config.skip):
                    self.fallbacks[full] = "skipped by config"
                    continue
                reason = handler.can_take(child) or _tied_reason(full, child, holders)
                if reason is not None:
                    self.fallbacks[full] = reason
                    continue
                setattr(module, child_name, handler.factory(child, self.config))
        _warn_fallbacks(self.fallbacks)
        self._most_recent = weakref.ref(qmodel)
        self._apply_act_scales(qmodel)
        if not isinstance(qmodel, _QuantizedWeight):
            qmodel.register_load_state_dict_pre_hook(check_quantized_state_dict)
        return qmodel

    def _quantize_graph(self) -> nn.Module | None:
        from .graph import StaticQuantizedModel, fuse

        model = copy.deepcopy(self.model).eval()
        try:
            gm, fallbacks = fuse(model, lambda name: any(matches(p, name) for p in self.config.skip))
        except Exception as e:  # torch.fx cannot trace data-dependent control flow, for one
            warnings.warn(
                f"Quantizer: torch.fx could not trace {type(self.model).__name__} for the static int8 graph "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); quantizing it module by module "
                "instead (activations are quantized and dequantized around each layer)",
                UserWarning,
                stacklevel=3,
            )
            return None
        conv1d = _transformers.conv1d()  # not part of the int8 graph: say so
        for name, mod in model.named_modules():
            if conv1d is not None and isinstance(mod, conv1d) and name not in fallbacks:
                fallbacks[name] = "Conv1D is not part of the static int8 graph (method='dynamic' quantizes it)"
        self.fallbacks = fallbacks
        _warn_fallbacks(fallbacks)
        return StaticQuantizedModel(gm, self.config, fallbacks)

    def calibrate(self, loader, num_batches: int = 10, model: nn.Module | None = None) -> dict[str, float]:
        """Static quantization: observes each layer's input range over ``num_batches`` batches of ``loader`` and
        sets one activation scale per layer in ``model`` (a model :meth:`quantize` returned) and in the models
        quantized from now on.

        Args:
            loader: batches (a tensor, a tuple whose first item is the input, or a dict of keyword inputs).
            num_batches: how many batches to observe.
            model: the quantized model to calibrate. Omitting it after :meth:`quantize` is deprecated (it calibrates
                the most recently quantized model, if it still exists).

        Returns:
            ``{layer name: activation scale}``.

        Example:
            >>> qmodel = quantizer.quantize()
            >>> quantizer.calibrate(loader, num_batches=8, model=qmodel)
        """
        if self.config.method != "static":
            raise ValueError(
                "Quantizer.calibrate(): the config uses method='dynamic', whose activation scales are "
                "computed at run time; use QuantConfig(method='static') to calibrate"
            )
        from .graph import StaticQuantizedModel

        if model is None and self._most_recent is not None and self._most_recent() is not None:
            warnings.warn(
                "Quantizer.calibrate(): pass the model to calibrate (calibrate(loader, n, model=qmodel)); "
                "calibrating the most recently quantized model implicitly is deprecated",
                DeprecationWarning,
                stacklevel=2,
            )
            model = self._most_recent()
        if isinstance(model, StaticQuantizedModel):

            def inputs():
                for i, batch in enumerate(loader):
                    if i >= num_batches:
                        break
                    yield _model_args(batch)

            return model.calibrate(inputs())
        amax: dict[str, torch.Tensor] = {}
        hooks = []
        for name, m in self.model.named_modules():
            if _handler(m) is not None:

                def observe(mod, args, name=name):
                    a = args[0].detach().abs().amax().float()
                    amax[name] = torch.maximum(amax[name], a) if name in amax else a

                hooks.append(m.register_forward_pre_hook(observe))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    if i >= num_batches:
                        break
                    _run(self.model, batch)
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        self._act_scales = {k: (v.clamp_min(1e-12) / 63.0) for k, v in amax.items()}  # 7-bit codes
        if model is not None:
            self._apply_act_scales(model)
        return {k: v.item() for k, v in self._act_scales.items()}

    def _compare_static(self, qmodel, sample_inputs) -> list[LayerReport]:
        x = _model_args(sample_inputs)
        float_mods = dict(self.model.named_modules())
        outputs = qmodel.layer_outputs(*x)
        rows = []
        for layer in qmodel.quantized_layers():
            name = layer.names[0]
            fbytes = sum(
                p.numel() * p.element_size() for n in layer.names if n in float_mods for p in float_mods[n].parameters()
            )
            a, b = outputs.get(name, (None, None))
            rel = None if a is None else ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
            rows.append(
                LayerReport(
                    "+".join(layer.names),
                    type(float_mods[name]).__name__ if name in float_mods else "fused",
                    "quantized (int8 graph)",
                    fbytes,
                    layer.weight_bytes() + layer.bias.numel() * 4,
                    None if a is None else _sqnr_db(a, b),
                    rel,
                )
            )
        for name, reason in self.fallbacks.items():
            fm = float_mods.get(name)
            fbytes = 0 if fm is None else sum(p.numel() * p.element_size() for p in fm.parameters())
            kind = "?" if fm is None else type(fm).__name__
            rows.append(LayerReport(name, kind, f"float: {reason}", fbytes, fbytes, None, None))
        with torch.no_grad():
            ref, out = _output_tensor(self.model(*x)), _output_tensor(qmodel(*x))
        total_f = sum(p.numel() * p.element_size() for p in self.model.parameters())
        total_q = sum(r.quantized_bytes for r in rows)
        rows.append(
            LayerReport(
                "<model output>", type(self.model).__name__, "", total_f, total_q, _sqnr_db(ref, out),
                ((ref.float() - out.float()).norm() / ref.float().norm()).item(),
            )
        )  # fmt: skip
        return rows

    def _apply_act_scales(self, qmodel: nn.Module) -> None:
        for name, m in qmodel.named_modules():
            if isinstance(m, _QuantizedWeight) and m.act_scale is not None and name in self._act_scales:
                m.act_scale.copy_(self._act_scales[name])

    def compare(self, quantized_model: nn.Module, sample_inputs, print_table: bool = False) -> list[LayerReport]:
        """Per-layer output error (SQNR in dB, relative L2) and weight sizes, float vs quantized, on
        ``sample_inputs`` (a tensor, a tuple whose first item is the input, or a dict of keyword inputs). The last
        row is the whole model's output. For a static int8 model each row is a fused layer (named after its first
        float module), compared with the same layer of the fused float graph.

        The rows are returned and logged as a table (``logging``, INFO); ``print_table=True`` also prints it
        (``format_report(rows)`` gives the same table as a string)."""
        from .graph import StaticQuantizedModel

        if isinstance(quantized_model, StaticQuantizedModel):
            rows = self._compare_static(quantized_model, sample_inputs)
        else:
            rows = self._compare_modules(quantized_model, sample_inputs)
        table = format_report(rows)
        log.info("Quantizer.compare:\n%s", table)
        if print_table:
            print(table)
        return rows

    def _compare_modules(self, quantized_model: nn.Module, sample_inputs) -> list[LayerReport]:
        float_out: dict[str, torch.Tensor] = {}
        quant_out: dict[str, torch.Tensor] = {}

        def record(store):
            def hook(mod, args, out, name=None):
                store[hook.names[id(mod)]] = out.detach()

            hook.names = {}
            return hook

        fh, qh = record(float_out), record(quant_out)
        handles = []
        float_mods = dict(self.model.named_modules())
        for name, m in quantized_model.named_modules():
            if name in float_mods and (isinstance(m, _QuantizedWeight) or name in self.fallbacks):
                fh.names[id(float_mods[name])] = name
                qh.names[id(m)] = name
                handles.append(float_mods[name].register_forward_hook(fh))
                handles.append(m.register_forward_hook(qh))
        try:
            with torch.no_grad():
                ref = _output_tensor(_run(self.model, sample_inputs))
                out = _output_tensor(_run(quantized_model, sample_inputs))
        finally:
            for h in handles:
                h.remove()
        rows = []
        for name in fh.names.values():
            fm, qm = float_mods[name], dict(quantized_model.named_modules())[name]
            fbytes = sum(p.numel() * p.element_size() for p in fm.parameters())
            quantized = isinstance(qm, _QuantizedWeight)
            a, b = float_out.get(name), quant_out.get(name)
            rel = None if a is None else ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-30)).item()
            rows.append(
                LayerReport(
                    name,
                    type(fm).__name__,
                    "quantized" if quantized else f"float: {self.fallbacks[name]}",
                    fbytes,
                    qm.weight_bytes() + (qm.bias.numel() * 4 if qm.bias is not None else 0) if quantized else fbytes,
                    None if a is None else _sqnr_db(a, b),
                    rel,
                )
            )
        total_f = sum(p.numel() * p.element_size() for p in self.model.parameters())
        total_q = sum(
            t.numel() * t.element_size()
            for t in list(quantized_model.parameters())
            + [b for n, b in quantized_model.named_buffers() if not n.endswith("code_sums")]
        )
        rows.append(
            LayerReport(
                "<model output>",
                type(self.model).__name__,
                "",
                total_f,
                total_q,
                _sqnr_db(ref, out),
                ((ref.float() - out.float()).norm() / ref.float().norm()).item(),
            )
        )
        return rows


def format_report(rows: list[LayerReport]) -> str:
    """:meth:`Quantizer.compare`'s rows as a text table.

    Example:
        >>> print(format_report(quantizer.compare(qmodel, x)))
    """
    lines = [f"{'layer':<40} {'kind':<14} {'float KB':>9} {'quant KB':>9} {'SQNR dB':>8} {'rel err':>8}  status"]
    for r in rows:
        sq = "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}"
        re_ = "-" if r.rel_error is None else f"{r.rel_error:.4f}"
        lines.append(
            f"{r.name:<40} {r.kind:<14} {r.float_bytes / 1024:>9.1f} {r.quantized_bytes / 1024:>9.1f} "
            f"{sq:>8} {re_:>8}  {r.status}"
        )
    return "\n".join(lines)
