"""QuantConfig: what to quantize and how."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class QuantConfig:
    """How :class:`~deepseek_ext.quant.Quantizer` quantizes a model.

    Args:
        weight_bits: 8 or 4.
        activation_bits: 8 (integer products), or 16 / None (weight-only: activations stay float).
        method: ``'dynamic'`` (activation scales per row at run time) or ``'static'`` (one scale per layer from
            ``Quantizer.calibrate``).
        group_size: None for one scale per output channel, or 32/64/128/... input features per scale.
        symmetric: weights symmetric around zero, or with a per-group zero point.
        skip: module-name patterns to keep in float (dot-component patterns, e.g. ``'conv1'``, ``'fc'``).

    Example:
        >>> config = QuantConfig(weight_bits=4, activation_bits=8, method='dynamic', group_size=128)
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    method: str = "dynamic"
    group_size: int | None = None
    symmetric: bool = True
    skip: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if self.weight_bits not in (8, 4):
            raise ValueError(f"QuantConfig: weight_bits must be 8 or 4, got {self.weight_bits}")
        if self.activation_bits not in (8, 16, None):
            raise ValueError(f"QuantConfig: activation_bits must be 8, 16 or None, got {self.activation_bits}")
        if self.method not in ("dynamic", "static"):
            raise ValueError(f"QuantConfig: method must be 'dynamic' or 'static', got {self.method!r}")
        if self.method == "static" and self.activation_bits != 8:
            raise ValueError("QuantConfig: method='static' calibrates activation scales, so it needs activation_bits=8")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 32 or self.group_size > 65536):
            raise ValueError(
                f"QuantConfig: group_size must be None (per channel) or a positive multiple of 32 up to 65536, got "
                f"{self.group_size}"
            )
        self.skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(d["skip"])
        return d
