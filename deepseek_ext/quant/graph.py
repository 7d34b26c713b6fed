"""Static int8 models: activations stay 7-bit codes from one quantized layer to the next.

``Quantizer(model, QuantConfig(method='static')).quantize()`` traces the float model with ``torch.fx`` and fuses
Conv2d + BatchNorm2d (+ ReLU), Linear (+ ReLU) and residual adds (+ ReLU) into single layers (BatchNorm folded into
the weights and bias). ``Quantizer.calibrate(loader, n)`` runs the fused float graph on ``n`` batches, records the
range of every tensor that will be quantized, and builds the int8 graph:

- every fused layer is one ``quantized_conv2d`` call (a Linear is a 1x1 convolution): codes in, codes out, with the
  bias, the residual add, the ReLU and the requantisation to the next layer's scale in the GEMM's epilogue;
- max pooling, adaptive average pooling, flatten, ReLU and adds work on codes;
- the model's input is quantized once, outputs and inputs of float-only operations are dequantized.

Codes are unsigned 7-bit (``u`` in [0, 127], value ``s * (u - z)``; ``z = 0`` for tensors that are never negative,
e.g. after a ReLU), channels last with channels padded to a multiple of 8 (``deepseek_ext.ops.quant``). Weights are
quantized per output channel (``group_size`` applies to the dynamic path), 8 or 4 bits.

A model that ``torch.fx`` cannot trace falls back to module-by-module quantization, with a warning naming the
reason.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from ..ops.quant import (
    dequantize_activation,
    pack_quantized_weight,
    quantize_weight,
    unpack_quantized_weight,
)
from .config import QuantConfig

_RELU_FUNCS = (F.relu, torch.relu, torch.nn.functional.relu)
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)


def _pad8(c: int) -> int:
    return -(-c // 8) * 8


# ------------------------------------------------------------------------------------------------ the float side
class FusedConv(nn.Module):
    """A float convolution (or Linear, as a 1x1 convolution on ``(N, K)``) with BatchNorm folded in, and optionally
    a residual input added and a ReLU: the unit that becomes one ``quantized_conv2d``."""

    def __init__(self, weight, bias, stride, padding, dilation, linear: bool, names: list[str], groups: int = 1):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(
            (bias if bias is not None else torch.zeros(weight.shape[0])).detach().clone().float(), requires_grad=False
        )
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.linear = linear
        self.relu = False
        self.names = names  # the float modules it replaces, for reports

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.linear:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    w = conv.weight * (gamma / std).reshape(-1, 1, 1, 1)
    b = conv.bias if conv.bias is not None else torch.zeros_like(std)
    return w.detach(), ((b - bn.running_mean) * gamma / std + beta).detach()


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in _ADD_FUNCS
        and len(node.args) == 2
        and all(isinstance(a, fx.Node) for a in node.args)
        and not node.kwargs
    )


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _conv_reason(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1 and not _depthwise(conv):
        return f"groups={conv.groups} (grouped convolution that is not depthwise)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} / {conv.padding_mode}"
    return None


def fuse(model: nn.Module, skip: Callable[[str], bool]) -> tuple[fx.GraphModule, dict[str, str]]:
    """Traces ``model`` and fuses its Conv2d/Linear + BatchNorm2d + residual add + ReLU chains into FusedConv
    modules. Returns the fused float GraphModule and ``{module name: reason}`` for layers left in float."""
    gm = fx.symbolic_trace(model)
    graph = gm.graph
    fallbacks: dict[str, str] = {}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if skip(node.target):
            fallbacks[node.target] = "skipped by config"
            continue
        if isinstance(mod, nn.Conv2d):
            reason = _conv_reason(mod)
            if reason is not None:
                fallbacks[node.target] = reason
                continue
        names = [node.target]
        weight, bias = mod.weight.detach(), mod.bias
        last = node
        users = list(last.users)
        if isinstance(mod, nn.Conv2d) and len(users) == 1 and users[0].op == "call_module":
            bn = gm.get_submodule(users[0].target)
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and not bn.training:
                weight, bias = _fold_bn(mod, bn)
                names.append(users[0].target)
                last = users[0]
        if isinstance(mod, nn.Conv2d):
            fused = FusedConv(weight, bias, mod.stride, mod.padding, mod.dilation, False, names, mod.groups)
        else:
            fused = FusedConv(weight, bias, (1, 1), (0, 0), (1, 1), True, names)
        residual = None
        users = list(last.users)
        if len(users) == 1 and _is_add(users[0]) and fused.groups == 1:
            add = users[0]
            other = add.args[1] if add.args[0] is last else add.args[0]
            if other is not last:
                residual, last = other, add
                users = list(last.users)
        if len(users) == 1 and _is_relu(gm, users[0]):
            fused.relu = True
            last = users[0]
        name = f"_dsx_fused_{count}"
        count += 1
        gm.add_submodule(name, fused)
        with graph.inserting_after(last):
            new = graph.call_module(name, (node.args[0],) if residual is None else (node.args[0], residual))
        last.replace_all_uses_with(new)
        new.args = (node.args[0],) if residual is None else (node.args[0], residual)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, fallbacks


# -------------------------------------------------------------------------------------------------- calibration
@dataclass
class Encoding:
    """How a tensor of the int8 graph is held: codes with a scale and zero point, or float."""

    quantized: bool
    scale: float = 1.0
    zero: int = 0
    channels: int = 0  # real channels (codes carry them padded to a multiple of 8)


class _Value(NamedTuple):
    """A node of the int8 graph being built and the encoding of what it computes."""

    node: fx.Node
    encoding: Encoding


def encoding_from_range(lo: float, hi: float, channels: int) -> Encoding:
    """7-bit asymmetric codes covering [min(lo, 0), max(hi, 0)]: zero point 0 for tensors that are never negative."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(
            "Quantizer.calibrate(): the model produced non-finite activations (inf or nan) on the calibration data; "
            "static quantization needs finite ranges"
        )
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 127.0
    zero = int(min(127, max(0, round(-lo / scale))))
    return Encoding(True, scale, zero, channels)


class _RangeObserver(fx.Interpreter):
    """Runs the fused float graph and records each node's output range and shape."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            lo, hi = out.detach().amin().item(), out.detach().amax().item()
            if n.name in self.ranges:
                plo, phi = self.ranges[n.name]
                lo, hi = min(lo, plo), max(hi, phi)
            self.ranges[n.name] = (lo, hi)
            self.shapes[n.name] = tuple(out.shape)
        return out


# ------------------------------------------------------------------------------------------- the int8 modules
class _Quantize(nn.Module):
    def __init__(self, enc: Encoding):
        super().__init__()
        self.scale, self.zero = enc.scale, enc.zero

    def forward(self, x):
        return torch.ops.deepseek_ext.quantize_activation.default(x.float(), self.scale, self.zero)


class _Dequantize(nn.Module):
    def __init__(self, enc: Encoding):
        super().__init__()
        self.scale, self.zero, self.channels = enc.scale, enc.zero, enc.channels

    def forward(self, codes):
        return torch.ops.deepseek_ext.dequantize_activation.default(codes, self.scale, self.zero, self.channels)


class QuantizedConvNode(nn.Module):
    """One fused layer of the int8 graph: ``quantized_conv2d`` with packed per-channel weights (the state_dict holds
    quantize_weight's portable codes; they are packed for this CPU on load)."""

    def __init__(self, fused: FusedConv, bits: int, symmetric: bool, x: Encoding, out: Encoding | None,
                 res: Encoding | None, in_channels: int):  # fmt: skip
        super().__init__()
        w = fused.weight.detach().float()
        if fused.linear:
            w = w.reshape(w.shape[0], 1, 1, w.shape[1])
        else:
            w = w.permute(0, 2, 3, 1)  # (Cout, kh, kw, Cin): taps outer, channels inner
        cout, kh, kw, cin = w.shape
        # A few-channel input (a first layer) is gathered into patches first, so the GEMM does not multiply the
        # channel padding of every tap: the layer then runs as a 1x1 convolution over round8(taps * cin) channels.
        self.im2col = not fused.linear and kh * kw > 1 and cin < 8
        if self.im2col:
            k = _pad8(kh * kw * cin)
            w = F.pad(w.reshape(cout, kh * kw * cin), (0, k - kh * kw * cin))
        else:
            cp = _pad8(cin)
            w = F.pad(w, (0, cp - cin)).reshape(cout, kh * kw * cp)
            k = kh * kw * cp
        codes, scales, zeros = quantize_weight(w, bits, 0, symmetric)
        stored = codes
        rows = _unpacked(stored, bits)[:, :k]
        self.bits, self.k, self.cout = bits, k, cout
        self.out_channels = cout
        self.patch = ((kh, kw), fused.stride, fused.padding, fused.dilation)
        if self.im2col:
            self.kernel, self.stride, self.padding, self.dilation = (1, 1), (1, 1), (0, 0), (1, 1)
        else:
            self.kernel = (kh, kw)
            self.stride, self.padding, self.dilation = fused.stride, fused.padding, fused.dilation
        self.linear = fused.linear
        self.relu = fused.relu
        self.in_scale, self.in_zero = x.scale, x.zero
        self.out_float = out is None
        self.out_scale, self.out_zero = (1.0, 0) if out is None else (out.scale, out.zero)
        self.res_scale, self.res_zero = (1.0, 0) if res is None else (res.scale, res.zero)
        self.register_buffer("codes", pack_quantized_weight(codes, bits, 0, k))
        self.register_buffer("w_scale", scales[:, 0].contiguous())
        self.register_buffer("w_sum", rows.sum(1, dtype=torch.int32))
        self.register_buffer("w_zero", zeros[:, 0].contiguous())
        self.register_buffer("bias", fused.bias.detach().float().clone())
        self.in_channels = in_channels
        self.names = fused.names

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "codes"] = unpack_quantized_weight(self.codes, self.bits, 0, self.k, self.cout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "codes"
        if key in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = pack_quantized_weight(state_dict[key], self.bits, 0, self.k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_bytes(self) -> int:
        """Bytes of the weight as stored (codes, scales, zero points; the in-memory layout pads outputs to 64)."""
        side = sum(t.numel() * t.element_size() for t in (self.w_scale, self.w_zero))
        return self.cout * self.k * self.bits // 8 + side

    def forward(self, x, residual=None):
        n = x.shape[0]
        if self.im2col:
            k, st, pd, dl = self.patch
            x = torch.ops.deepseek_ext.quantized_im2col.default(
                x, list(k), list(st), list(pd), list(dl), self.in_channels, self.in_zero
            )
        if self.linear:
            x = x.reshape(n, 1, 1, x.shape[-1])
            if residual is not None:
                residual = residual.reshape(n, 1, 1, residual.shape[-1])
        y = torch.ops.deepseek_ext.quantized_conv2d.default(
            x, self.codes, self.w_scale, self.w_sum, self.w_zero, self.bias, list(self.kernel), list(self.stride),
            list(self.padding), list(self.dilation), 1, self.cout, self.bits, self.in_scale, self.in_zero,
            self.out_scale, self.out_zero, self.relu, residual, self.res_scale, self.res_zero, self.out_float,
        )  # fmt: skip
        if self.linear:
            y = y.reshape(n, -1)
        return y


class QuantizedDepthwiseNode(nn.Module):
    """A fused depthwise convolution of the int8 graph: per-channel symmetric weight codes and
    ``quantized_depthwise_conv2d`` (no residual input: an add after it stays a separate add of codes)."""

    def __init__(self, fused: FusedConv, bits: int, x: Encoding, out: Encoding | None):
        super().__init__()
        w = fused.weight.detach().float()  # (C, 1, kh, kw)
        c, _, kh, kw = w.shape
        qmax = 127 if bits == 8 else 7
        scale = w.abs().amax((1, 2, 3)).clamp_min(1e-12) / qmax
        codes = torch.round(w / scale.view(-1, 1, 1, 1)).clamp(-qmax, qmax).to(torch.int8)
        weight = codes.reshape(c, kh * kw).t()  # (taps, C)
        self.register_buffer("weight", F.pad(weight, (0, _pad8(c) - c)).contiguous())
        self.register_buffer("w_scale", scale.float())
        self.register_buffer("bias", fused.bias.detach().float().clone())
        self.args = ([kh, kw], list(fused.stride), list(fused.padding), list(fused.dilation), c)
        self.out_channels = c
        self.in_scale, self.in_zero = x.scale, x.zero
        self.out_float = out is None
        self.out_scale, self.out_zero = (1.0, 0) if out is None else (out.scale, out.zero)
        self.relu = fused.relu
        self.names = fused.names

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.w_scale))

    def forward(self, x):
        k, st, pd, dl, c = self.args
        return torch.ops.deepseek_ext.quantized_depthwise_conv2d.default(
            x, self.weight, self.w_scale, self.bias, k, st, pd, dl, c, self.in_scale, self.in_zero, self.out_scale,
            self.out_zero, self.relu, self.out_float,
        )  # fmt: skip


def _unpacked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.int32)
    b = codes.to(torch.int32).view(codes.shape[0], -1, 16)
    return torch.cat([b & 0x0F, b >> 4], dim=2).view(codes.shape[0], -1)


class _MaxPool(nn.Module):
    def __init__(self, kernel, stride, padding, dilation, ceil_mode):
        super().__init__()
        self.args = (list(kernel), list(stride), list(padding), list(dilation), bool(ceil_mode))

    def forward(self, x):
        return torch.ops.deepseek_ext.quantized_max_pool2d.default(x, *self.args)


class _AdaptiveAvgPool(nn.Module):
    def __init__(self, output_size, x: Encoding, out: Encoding):
        super().__init__()
        self.args = (list(output_size), x.scale, x.zero, out.scale, out.zero)

    def forward(self, x):
        return torch.ops.deepseek_ext.quantized_adaptive_avg_pool2d.default(x, *self.args)


class _Add(nn.Module):
    def __init__(self, a: Encoding, b: Encoding, out: Encoding, relu: bool = False):
        super().__init__()
        self.args = (a.scale, a.zero, b.scale, b.zero, out.scale, out.zero, relu)

    def forward(self, a, b):
        sa, za, sb, zb, so, zo, relu = self.args
        return torch.ops.deepseek_ext.quantized_add.default(a, sa, za, b, sb, zb, so, zo, relu)


class _Relu(nn.Module):
    def __init__(self, enc: Encoding):
        super().__init__()
        self.zero = enc.zero

    def forward(self, x):
        return x.clamp_min(self.zero)


class _Flatten(nn.Module):
    """(N, H, W, Cp) codes -> (N, C * H * W) in PyTorch's (C, H, W) order, padded to a multiple of 8."""

    def __init__(self, enc: Encoding):
        super().__init__()
        self.channels, self.zero = enc.channels, enc.zero

    def forward(self, x):
        n, h, w, cp = x.shape
        if h == 1 and w == 1:
            return x.reshape(n, cp)
        flat = x[..., : self.channels].permute(0, 3, 1, 2).reshape(n, -1)
        pad = _pad8(flat.shape[1]) - flat.shape[1]
        return F.pad(flat, (0, pad), value=self.zero) if pad else flat


# --------------------------------------------------------------------------------------------------- conversion
def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _flatten_start(gm, node) -> int | None:
    """start_dim of a flatten-to-(N, -1) node, or None."""
    m = _module_of(gm, node)
    if isinstance(m, nn.Flatten):
        return m.start_dim if m.end_dim == -1 else None
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start if end == -1 else None
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start
    return None


def convert(float_gm: fx.GraphModule, encodings: dict[str, Encoding], shapes: dict[str, tuple], config: QuantConfig
            ) -> fx.GraphModule:  # fmt: skip
    """Builds the int8 GraphModule from the fused float graph and the calibrated encodings of its tensors."""
    graph = fx.Graph()
    root = nn.Module()
    env: dict[str, _Value] = {}  # old node name -> its value in the new graph
    counter = [0]

    def add_module(prefix: str, module: nn.Module) -> str:
        name = f"{prefix}_{counter[0]}"
        counter[0] += 1
        root.add_module(name, module)
        return name

    nodes = list(float_gm.graph.nodes)
    # Which values some consumer wants as codes (so layers produce codes, not floats).
    wants_codes: set[str] = set()
    for node in nodes:
        m = _module_of(float_gm, node)
        if isinstance(m, FusedConv):
            for a in node.args:
                if isinstance(a, fx.Node):
                    wants_codes.add(a.name)
        elif isinstance(m, (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.Flatten, nn.Dropout, nn.Identity)) or (
            _is_add(node) or _is_relu(float_gm, node) or _flatten_start(float_gm, node) is not None
        ):
            for a in node.args:
                if isinstance(a, fx.Node) and encodings.get(a.name, Encoding(False)).quantized:
                    wants_codes.add(a.name)
    # The uses of each value by consumers that stay quantized is decided below; values used by float ops are
    # dequantized on demand (once per value).
    float_cache: dict[str, fx.Node] = {}
    codes_cache: dict[str, fx.Node] = {}

    def as_float(name: str) -> fx.Node:
        new, enc = env[name]
        if not enc.quantized:
            return new
        if name not in float_cache:
            float_cache[name] = graph.call_module(add_module("dequantize", _Dequantize(enc)), (new,))
        return float_cache[name]

    def as_codes(name: str) -> tuple[fx.Node, Encoding]:
        new, enc = env[name]
        if enc.quantized:
            return new, enc
        target = encodings[name]
        if name not in codes_cache:
            codes_cache[name] = graph.call_module(add_module("quantize", _Quantize(target)), (new,))
        return codes_cache[name], target

    def map_float(arg):
        return fx.graph.map_arg(arg, lambda n: as_float(n.name))

    for node in nodes:
        m = _module_of(float_gm, node)
        quantized_in = [
            a for a in node.args if isinstance(a, fx.Node) and a.name in env and env[a.name].encoding.quantized
        ]
        if node.op == "placeholder":
            env[node.name] = _Value(graph.placeholder(node.name), Encoding(False))
        elif node.op == "output":
            graph.output(map_float(node.args[0]))
        elif isinstance(m, FusedConv) and m.groups > 1:
            x, xenc = as_codes(node.args[0].name)
            out_enc = encodings[node.name] if node.name in wants_codes else None
            qm = QuantizedDepthwiseNode(m, config.weight_bits, xenc, out_enc)
            new = graph.call_module(add_module("qdepthwise", qm), (x,))
            cout = m.weight.shape[0]
            out = Encoding(True, out_enc.scale, out_enc.zero, cout) if out_enc else Encoding(False)
            env[node.name] = _Value(new, out)
        elif isinstance(m, FusedConv) and (not m.linear or len(shapes.get(node.args[0].name, ())) == 2):
            x, xenc = as_codes(node.args[0].name)
            res, renc = (None, None)
            if len(node.args) > 1:
                res, renc = as_codes(node.args[1].name)
            out_enc = encodings[node.name] if node.name in wants_codes else None
            in_ch = shapes[node.args[0].name][1]
            qm = QuantizedConvNode(m, config.weight_bits, config.symmetric, xenc, out_enc, renc, in_ch)
            new = graph.call_module(add_module("qconv", qm), (x,) if res is None else (x, res))
            cout = m.weight.shape[0]
            out = Encoding(True, out_enc.scale, out_enc.zero, cout) if out_enc else Encoding(False)
            env[node.name] = _Value(new, out)
        elif isinstance(m, (nn.Dropout, nn.Identity)) and quantized_in:
            env[node.name] = env[node.args[0].name]
        elif isinstance(m, nn.MaxPool2d) and quantized_in:
            x, enc = env[node.args[0].name]
            k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
            pool = _MaxPool(k, s, _pair(m.padding), _pair(m.dilation), m.ceil_mode)
            env[node.name] = _Value(graph.call_module(add_module("maxpool", pool), (x,)), enc)
        elif isinstance(m, nn.AdaptiveAvgPool2d) and quantized_in and node.name in encodings:
            x, enc = env[node.args[0].name]
            out_enc = Encoding(True, encodings[node.name].scale, encodings[node.name].zero, enc.channels)
            pool = _AdaptiveAvgPool(_pair(m.output_size), enc, out_enc)
            env[node.name] = _Value(graph.call_module(add_module("avgpool", pool), (x,)), out_enc)
        elif _flatten_start(float_gm, node) == 1 and quantized_in and len(shapes.get(node.args[0].name, ())) == 4:
            x, enc = env[node.args[0].name]
            _, c, h, w = shapes[node.args[0].name]
            new = graph.call_module(add_module("flatten", _Flatten(enc)), (x,))
            env[node.name] = _Value(new, Encoding(True, enc.scale, enc.zero, c * h * w))
        elif _is_relu(float_gm, node) and quantized_in:
            x, enc = env[node.args[0].name]
            env[node.name] = _Value(graph.call_module(add_module("relu", _Relu(enc)), (x,)), enc)
        elif _is_add(node) and len(quantized_in) == 2 and node.name in encodings:
            (a, ae), (b, be) = env[node.args[0].name], env[node.args[1].name]
            if shapes.get(node.args[0].name) == shapes.get(node.args[1].name):
                out_enc = Encoding(True, encodings[node.name].scale, encodings[node.name].zero, ae.channels)
                env[node.name] = _Value(graph.call_module(add_module("add", _Add(ae, be, out_enc)), (a, b)), out_enc)
            else:
                env[node.name] = _Value(graph.create_node(node.op, node.target, map_float(node.args),
                                                    map_float(node.kwargs)), Encoding(False))  # fmt: skip
        else:  # float operation: its inputs dequantized
            if node.op == "call_module":
                name = add_module("float", copy.deepcopy(m))
                new = graph.call_module(name, map_float(node.args), map_float(node.kwargs))
            elif node.op == "get_attr":
                name = add_module("const", nn.Module())
                attr = float_gm
                for part in node.target.split("."):
                    attr = getattr(attr, part)
                if isinstance(attr, torch.Tensor):
                    root.register_buffer(f"{name}_value", attr.detach().clone())
                    new = graph.get_attr(f"{name}_value")
                else:
                    setattr(root, f"{name}_value", attr)
                    new = graph.get_attr(f"{name}_value")
            else:
                new = graph.create_node(node.op, node.target, map_float(node.args), map_float(node.kwargs))
            env[node.name] = _Value(new, Encoding(False))
    return fx.GraphModule(root, graph)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def encodings_from_ranges(float_gm: fx.GraphModule, ranges: dict, shapes: dict) -> dict[str, Encoding]:
    """One encoding per float tensor of the graph that has an observed range."""
    out = {}
    for node in float_gm.graph.nodes:
        if node.name in ranges:
            shape = shapes[node.name]
            channels = shape[1] if len(shape) >= 2 else 1
            out[node.name] = encoding_from_range(*ranges[node.name], channels)
    return out


class StaticQuantizedModel(nn.Module):
    """The result of ``Quantizer(...).quantize()`` for ``method='static'``: before :meth:`calibrate` it holds the
    fused float graph (and refuses to run); after, the int8 graph, which is what runs, what ``state_dict`` holds
    (portable codes, scales and the calibrated encodings) and what ``torch.compile`` traces.

    Example:
        >>> quantizer = Quantizer(resnet, QuantConfig(weight_bits=8, activation_bits=8, method="static"))
        >>> qmodel = quantizer.quantize()
        >>> quantizer.calibrate(loader, num_batches=8)   # builds qmodel's int8 graph
        >>> logits = qmodel(images)
    """

    def __init__(self, float_gm: fx.GraphModule, config: QuantConfig, fallbacks: dict[str, str]):
        super().__init__()
        self._float = [float_gm]  # not a submodule: kept out of the state_dict and .to()
        self.config = config
        self.fallbacks = fallbacks
        self.encodings: dict[str, Encoding] = {}
        self.shapes: dict[str, tuple] = {}
        self.int8: fx.GraphModule | None = None

    @property
    def float_graph(self) -> fx.GraphModule:
        return self._float[0]

    def calibrate(self, batches) -> dict[str, float]:
        """Observes the fused float graph on ``batches`` (an iterable of model inputs) and builds the int8 graph.
        Returns each quantized layer's input activation scale, by the name of its (first) float module."""
        obs = _RangeObserver(self.float_graph)
        seen = 0
        with torch.no_grad():
            for args in batches:
                obs.run(*args)
                seen += 1
        if seen == 0:
            raise ValueError("Quantizer.calibrate(): the loader gave no batches")
        self.shapes = obs.shapes
        self.encodings = encodings_from_ranges(self.float_graph, obs.ranges, obs.shapes)
        self._build()
        return {layer.names[0]: layer.in_scale for layer in self.quantized_layers()}

    def _build(self) -> None:
        self.int8 = convert(self.float_graph, self.encodings, self.shapes, self.config)

    def forward(self, *args, **kwargs):
        if self.int8 is None:
            raise RuntimeError(
                "StaticQuantizedModel: static quantization needs Quantizer.calibrate(loader) before the first forward"
            )
        return self.int8(*args, **kwargs)

    def quantized_layers(self) -> list[nn.Module]:
        kinds = (QuantizedConvNode, QuantizedDepthwiseNode)
        return [] if self.int8 is None else [m for m in self.int8.modules() if isinstance(m, kinds)]

    def layer_outputs(self, *args) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For every quantized layer (by its first float module's name): its output in the fused float graph and in
        the int8 graph (dequantized), on the same inputs; what ``Quantizer.compare`` reports."""
        floats: dict[str, torch.Tensor] = {}
        graph = self.float_graph

        class Capture(fx.Interpreter):
            def call_module(self, target, a, kw):
                out = super().call_module(target, a, kw)
                m = graph.get_submodule(target)
                if isinstance(m, FusedConv):
                    floats[m.names[0]] = out.detach().float()
                return out

        quants: dict[str, torch.Tensor] = {}

        def hook(mod, inputs, out):
            y = out if mod.out_float else dequantize_activation(out, mod.out_scale, mod.out_zero, mod.out_channels)
            quants[mod.names[0]] = y.detach().float().contiguous()

        handles = [m.register_forward_hook(hook) for m in self.quantized_layers()]
        try:
            with torch.no_grad():
                Capture(graph).run(*args)
                self(*args)
        finally:
            for h in handles:
                h.remove()
        return {k: (floats[k].reshape(quants[k].shape), quants[k]) for k in quants if k in floats}

    def get_extra_state(self):
        return {
            "config": self.config.to_dict(),
            "encodings": {k: (v.scale, v.zero, v.channels) for k, v in self.encodings.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
        }

    def set_extra_state(self, state) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError(
                f"StaticQuantizedModel: this state_dict was made with {state['config']}, but the model was quantized "
                f"with {self.config.to_dict()}; quantize with the same QuantConfig first"
            )
        self.encodings = {k: Encoding(True, s, z, c) for k, (s, z, c) in state["encodings"].items()}
        self.shapes = {k: tuple(v) for k, v in state["shapes"].items()}
        self._build()  # the int8 modules the rest of the state_dict is loaded into
