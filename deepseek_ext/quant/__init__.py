"""Integer quantization for inference: QuantConfig, Quantizer and the quantized modules."""

from __future__ import annotations

from .config import QuantConfig
from .modules import QuantizedConv2d, QuantizedLinear
from .quantizer import LayerReport, Quantizer, register_quantized_module

__all__ = ["QuantConfig", "Quantizer", "QuantizedLinear", "QuantizedConv2d", "LayerReport", "register_quantized_module"]
