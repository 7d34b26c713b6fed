"""Quantized drop-ins for nn.Linear and nn.Conv2d, holding packed weights (see deepseek_ext.ops.quant)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._native import require_native
from ..ops.quant import (
    code_sums,
    pack_quantized_weight,
    quantize_weight,
    unpack_quantized_weight,
)
from ..utils.packing import dequantize_weight, none_as_zero
from .config import QuantConfig


def _quantized_linear_op():
    """The op itself (one Python layer less than ops.quant.quantized_linear on every layer call)."""
    require_native("quant.QuantizedLinear")
    return torch.ops.deepseek_ext.quantized_linear.default


class _QuantizedWeight(nn.Module):
    """Packed weight buffers and the config they were made with (checked when a state_dict is loaded).

    On the CPU, integer-activation layers keep ``codes`` in the layout of the integer GEMM
    (:func:`~deepseek_ext.ops.quant.pack_quantized_weight`: same bytes, no second copy); the state_dict always holds
    :func:`~deepseek_ext.ops.quant.quantize_weight`'s portable layout, and moving the module to another device
    converts between the two."""

    def _init_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig) -> None:
        self.config = config
        self.in_features = weight.shape[1]
        codes, scales, zeros = quantize_weight(weight.detach(), config.weight_bits, config.group_size, config.symmetric)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("code_sums", code_sums(codes, config.weight_bits, scales.shape[1]))
        self.codes = self._layout_for_device(codes)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # Static activation scale, set by Quantizer.calibrate(); a NaN placeholder until then.
        self.register_buffer("act_scale", torch.full((), float("nan")) if config.method == "static" else None)

    def _packs(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.config.activation_bits == 8

    def _stored_codes(self) -> torch.Tensor:
        """The codes in quantize_weight's (portable) layout."""
        if self.codes.dim() == 2:
            return self.codes
        c = self.config
        return unpack_quantized_weight(self.codes, c.weight_bits, c.group_size, self.in_features, self.scales.shape[0])

    def _layout_for_device(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in the layout the kernels of their device read (packed on the CPU for integer activations)."""
        c = self.config
        packed = codes.dim() == 4
        if self._packs(codes.device) and not packed:
            return pack_quantized_weight(codes, c.weight_bits, c.group_size, self.in_features)
        if not self._packs(codes.device) and packed:
            n = self.scales.shape[0]
            return unpack_quantized_weight(codes, c.weight_bits, c.group_size, self.in_features, n)
        return codes

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if isinstance(getattr(self, "codes", None), torch.Tensor):
            self.codes = self._layout_for_device(self.codes)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "codes"] = self._stored_codes() if keep_vars else self._stored_codes().detach()

    def get_extra_state(self):
        return {"config": self.config.to_dict(), "in_features": self.in_features}

    def _check_extra_state(self, state) -> None:
        name = type(self).__name__
        if not isinstance(state, dict) or "config" not in state or "in_features" not in state:
            raise ValueError(f"{name}: expected extra state {{'config': ..., 'in_features': ...}}, got {state!r:.80}")
        if state["config"] != self.config.to_dict():
            raise ValueError(
                f"{name}: this state_dict was made with {state['config']}, but the module "
                f"was built with {self.config.to_dict()}; quantize with the same QuantConfig first"
            )
        if state["in_features"] != self.in_features:
            raise ValueError(
                f"{name}: this state_dict was made for in_features={state['in_features']!r}, but the module "
                f"has in_features={self.in_features}"
            )

    def set_extra_state(self, state) -> None:
        self._check_extra_state(state)

    def check_state_dict(self, state_dict, prefix: str = "") -> None:
        """Raises ``ValueError`` unless ``state_dict`` (entries under ``prefix``) fits this module: the same config
        and in_features, and every buffer with this module's shape and dtype. Nothing is changed; loading calls it
        before copying a single value (and a quantized model checks all its layers before loading any of them).

        Example:
            >>> qlinear.check_state_dict(torch.load('layer.pt'))   # ValueError on a mismatch
        """
        name = type(self).__name__
        own = [k for k in self._buffers if prefix + k in state_dict]
        extra_key = prefix + "_extra_state"
        if extra_key not in state_dict:
            if own:
                raise ValueError(f"{name}: the state_dict has {prefix + own[0]} but no {extra_key} (the config)")
            return
        self._check_extra_state(state_dict[extra_key])
        for k in own:
            value, mine = state_dict[prefix + k], self._stored_codes() if k == "codes" else self._buffers[k]
            if mine is None:
                raise ValueError(f"{name}: the state_dict has {prefix + k}, but this module has no {k}")
            if not isinstance(value, torch.Tensor) or value.shape != mine.shape or value.dtype != mine.dtype:
                got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{name}: expected {prefix + k} of shape {tuple(mine.shape)} and dtype {mine.dtype}, but got {got}"
                )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.check_state_dict(state_dict, prefix)
        self.codes = self._stored_codes()  # compare and copy in the portable layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.codes = self._layout_for_device(self.codes)

    def _linear(self, x2d: torch.Tensor) -> torch.Tensor:
        c = self.config
        act_scale = None
        if c.method == "static" and c.activation_bits == 8:
            if torch.isnan(self.act_scale):
                raise RuntimeError(
                    f"{type(self).__name__}: static quantization needs Quantizer.calibrate(loader) "
                    "before the first forward"
                )
            act_scale = self.act_scale
        return _quantized_linear_op()(
            x2d,
            self.codes,
            self.scales,
            self.zeros,
            c.weight_bits,
            none_as_zero(c.group_size),  # the raw op: its schema's integer for None
            self.in_features,
            none_as_zero(c.activation_bits),
            self.bias,
            act_scale,
            self.code_sums,
        )

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    def _dequantized(self) -> torch.Tensor:
        """The float32 weight the codes stand for, ``(out, in_features)``, computed on each call."""
        c = self.config
        return dequantize_weight(
            self._stored_codes(), self.scales, self.zeros, c.weight_bits, c.group_size, self.in_features
        )


class QuantizedLinear(_QuantizedWeight):
    """``nn.Linear`` with an 8- or 4-bit packed weight (activations per the config).

    Example:
        >>> qlinear = QuantizedLinear(nn.Linear(512, 256), QuantConfig(weight_bits=8, activation_bits=8))
        >>> y = qlinear(torch.randn(4, 512))   # (4, 256) float32
    """

    def __init__(self, linear: nn.Linear, config: QuantConfig):
        super().__init__()
        self.out_features = linear.out_features
        self._init_weight(linear.weight, linear.bias, config)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, config: QuantConfig) -> QuantizedLinear:
        """A QuantizedLinear computing transformers' ``Conv1D`` (GPT-2 and its descendants): ``x @ weight + bias``
        with ``weight`` of shape ``(in, out)``, i.e. the Linear whose weight is ``weight.t()``.

        Example:
            >>> qproj = QuantizedLinear.from_conv1d(gpt2.transformer.h[0].attn.c_attn, QuantConfig())
        """
        new = cls.__new__(cls)
        _QuantizedWeight.__init__(new)
        new.out_features = conv1d.weight.shape[1]
        new._init_weight(conv1d.weight.detach().t().contiguous(), conv1d.bias, config)
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight ``(out_features, in_features)``, computed on each access: for code that
        inspects a layer's ``weight`` (its dtype, device or shape, as transformers' T5 does), not for computing."""
        return self._dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self._linear(x)
        y = self._linear(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w{c.weight_bits}"
            f"a{c.activation_bits or 'float'}, group_size={c.group_size or 'channel'}"
        )


class QuantizedConv2d(_QuantizedWeight):
    """``nn.Conv2d`` (groups=1, zero padding) as an im2col GEMM over the quantized weight. The input is read in
    channels-last order (a view when it already is channels_last, as this module's own output is), patches are
    gathered once with (kh, kw, c) ordering matching the packed weight, and 1x1 stride-1 convolutions need no
    gathering at all.

    Example:
        >>> qconv = QuantizedConv2d(nn.Conv2d(3, 16, 3, padding=1), QuantConfig(weight_bits=4))
        >>> y = qconv(torch.randn(1, 3, 32, 32))   # (1, 16, 32, 32)
    """

    def __init__(self, conv: nn.Conv2d, config: QuantConfig):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("QuantizedConv2d takes groups=1 convolutions with numeric zero padding")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        # (Cout, Cin, kh, kw) -> (Cout, kh * kw * Cin): the patch order of forward()
        self._init_weight(conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1), conv.bias, config)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight ``(out_channels, in_channels, kh, kw)``, computed on each access: for code
        that inspects a layer's ``weight`` (its dtype, device or shape, as transformers' ViT does), not for
        computing."""
        kh, kw = self.kernel_size
        return self._dequantized().view(self.out_channels, kh, kw, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        xl = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        if kh == kw == 1 and ph == pw == 0:
            cols = xl[:, ::sh, ::sw].reshape(n * ho * wo, c)
        else:
            if ph or pw:
                xl = F.pad(xl, (0, 0, pw, pw, ph, ph))
            patches = xl.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)  # (N, Ho, Wo, C, KH, KW)
            patches = patches[..., ::dh, ::dw]
            cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * c)
        y = self._linear(cols)
        return y.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # channels_last memory

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{self.in_features // (self.kernel_size[0] * self.kernel_size[1])}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, w{c.weight_bits}a{c.activation_bits or 'float'}"
        )


def check_quantized_state_dict(module: nn.Module, state_dict, prefix: str = "", *args) -> None:
    """Checks every quantized layer under ``module`` against ``state_dict`` (see
    :meth:`_QuantizedWeight.check_state_dict`); a load_state_dict pre-hook of quantized models, so a mismatch in any
    layer is found before any layer is loaded."""
    for name, m in module.named_modules():
        if isinstance(m, _QuantizedWeight):
            m.check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)
