"""FP8 quantisation: ``quantize_fp8`` and ``dequantize_fp8``.

Scaling follows the usual recipes for FP8 training and inference:

* ``'tensor'``: one scale for the whole tensor (any shape); the scale has shape ``()``.
* ``'row'``: one scale per row of a 2-D ``(M, N)`` tensor; the scale has shape ``(M, 1)``, the layout
  ``torch._scaled_mm`` takes for row-wise scales.
* ``'group'``: one scale per ``1 x block_size`` group of a row (DeepSeek-V3's activation scaling); the scale has
  shape ``(M, ceil(N / block_size))``.
* ``'block'``: one scale per ``block_size x block_size`` tile of a 2-D tensor (the fine-grained weight scaling of
  DeepSeek-V3); the scale has shape ``(ceil(M / block_size), ceil(N / block_size))`` and edge tiles may be partial.

Each scale is ``max(amax, 1e-12) / fp8_max`` in float32, where ``amax`` is the largest *finite* ``|x|`` of its
tile and ``fp8_max`` is 448 for ``float8_e4m3fn`` and 57344 for ``float8_e5m2``. Values are then
``clamp(x / scale, -fp8_max, fp8_max).to(dtype)``, bit for bit what PyTorch computes for the same scaled values
(round to nearest even, true float32 division). :mod:`deepseek_ext.reference.fp8` is the executable specification.
"""

from __future__ import annotations

from typing import Literal

import torch

from .._native import NATIVE_AVAILABLE, require_native
from ._checks import check_dtype, check_dtype_value, check_same_device, sizes

Granularity = Literal["tensor", "row", "group", "block"]
GRANULARITIES = ("tensor", "row", "group", "block")

# The FP8 format of activations and weights when none is given (the C++ default of quantize_fp8's dtype=None).
DEFAULT_FP8_DTYPE = torch.float8_e4m3fn
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_fp8(
    x: torch.Tensor,
    dtype: torch.dtype = DEFAULT_FP8_DTYPE,
    granularity: Granularity = "tensor",
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantises ``x`` to FP8 with float32 scales computed from its absolute maximum ("current scaling").

    Args:
        x: float32, float16 or bfloat16 tensor; any shape for ``'tensor'``, 2-D ``(M, N)`` for ``'row'``,
            ``'group'`` and ``'block'``. Non-contiguous inputs are accepted (read through a contiguous copy).
        dtype: ``torch.float8_e4m3fn`` (forward activations and weights) or ``torch.float8_e5m2`` (gradients).
        granularity: ``'tensor'``, ``'row'``, ``'group'`` or ``'block'`` (see the module docstring for scale shapes).
        block_size: group length / tile edge for ``'group'`` and ``'block'``; any positive integer, sizes that do
            not divide M or N included.

    Returns:
        ``(x_fp8, scale)``: ``x_fp8`` has ``x``'s shape and ``dtype`` (contiguous); ``scale`` is float32 with
        shape ``()``, ``(M, 1)`` or ``(ceil(M/b), ceil(N/b))``, such that ``x ~= x_fp8.float() * scale``
        (broadcast per tile).

    Special values: NaN stays NaN (e4m3fn's only NaN code ``0x7f``/``0xff``, sign kept; e5m2's NaN); ``+-inf``
    saturate to ``+-fp8_max``. Neither enters the amax, so one bad value does not wipe out its tile's scale.
    An all-zero (or empty) tile gets scale ``1e-12 / fp8_max`` and quantises to zeros.

    Example:
        >>> x = torch.randn(256, 512, dtype=torch.bfloat16)
        >>> q, s = quantize_fp8(x, granularity="block", block_size=128)
        >>> q.dtype, s.shape
        (torch.float8_e4m3fn, torch.Size([2, 4]))
    """
    require_native("ops.quantize_fp8")
    return torch.ops.deepseek_ext.quantize_fp8.default(x, dtype, granularity, block_size)


def dequantize_fp8(
    x: torch.Tensor,
    scale: torch.Tensor,
    granularity: Granularity = "tensor",
    block_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: ``(x.float() * scale).to(out_dtype)``, each scale applied to its tile.

    Args:
        x: ``float8_e4m3fn`` or ``float8_e5m2`` tensor, shaped as for :func:`quantize_fp8`.
        scale: float32 scales in exactly the shape :func:`quantize_fp8` returns for ``x``'s shape,
            ``granularity`` and ``block_size``, on ``x``'s device.
        granularity: ``'tensor'``, ``'row'``, ``'group'`` or ``'block'``.
        block_size: group length / tile edge for ``'group'`` and ``'block'``.
        out_dtype: float32, float16 or bfloat16 (rounded to nearest even from the float32 product).

    Returns:
        A contiguous tensor of ``x``'s shape and ``out_dtype``.

    Example:
        >>> q, s = quantize_fp8(torch.randn(256, 256), torch.float8_e4m3fn, 'block', 128)
        >>> x = dequantize_fp8(q, s, 'block', 128, out_dtype=torch.bfloat16)   # (256, 256) bf16
    """
    require_native("ops.dequantize_fp8")
    return torch.ops.deepseek_ext.dequantize_fp8.default(x, scale, granularity, block_size, out_dtype)


def fp8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: int = 128,
) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b) + bias`` with float32 accumulation, from FP8 operands.

    Args:
        a: ``(M, K)`` float8_e4m3fn or float8_e5m2.
        b: ``(K, N)`` FP8, any strides (a column-major ``b``, as ``torch._scaled_mm`` takes, is read as is).
            e5m2 x e5m2 is accepted everywhere (on CUDA through the float32 fallback: FP8 tensor cores need at
            least one e4m3 operand). On CUDA pass ``b`` column-major, or it is copied once per call.
        scale_a, scale_b: float32 scales; the mode follows their shapes:
            per tensor (one element each); per row of ``a`` / per column of ``b`` (``(M, 1)`` and ``(1, N)``, as
            :func:`quantize_fp8` with ``'row'`` returns them for ``a`` and for ``b.t()``); or DeepSeek-V3's fine
            grain: ``1 x block_size`` groups of ``a`` (``(M, ceil(K/bs))``, ``quantize_fp8(a, ..., 'group')``) with
            ``block_size x block_size`` blocks of ``b`` (``(ceil(K/bs), ceil(N/bs))``, ``'block'``).
        bias: optional ``(N,)`` float32/float16/bfloat16.
        out_dtype: bfloat16 (default), float16 or float32.
        block_size: group / block edge for the fine-grained mode.

    Any M, N, K are accepted (no padding is needed: partial groups and blocks at the edges use their own scales).
    Scales must be finite (checked for CPU scales; for CUDA scales only with ``DEEPSEEK_EXT_DEBUG_CHECKS=1``, since
    the check would synchronise). The bias is added to the float32 result before it is rounded to ``out_dtype``.
    CPU: a tiled GEMM that dequantises tiles on the fly (no full-size dequantised copy). CUDA: cuBLASLt's FP8 GEMM
    through ``torch._scaled_mm`` for per-tensor (sm_89+), per-row (sm_90+) and, with ``block_size=128`` on sm_90,
    1x128 / 128x128 block scaling (cuBLASLt's own block-scaling modes), any M; otherwise slabs of K dequantised to
    float32 and multiplied (temporaries of about 64 MB, never full-size float copies).

    Example:
        >>> a, sa = quantize_fp8(torch.randn(64, 512), torch.float8_e4m3fn, 'row')          # sa: (64, 1)
        >>> b, sb = quantize_fp8(torch.randn(256, 512), torch.float8_e4m3fn, 'row')         # sb: (256, 1)
        >>> y = fp8_matmul(a, b.t(), sa, sb.t(), out_dtype=torch.bfloat16)                # (64, 256)
    """
    require_native("ops.fp8_matmul")
    return torch.ops.deepseek_ext.fp8_matmul.default(a, b, scale_a, scale_b, bias, out_dtype, block_size)


def scale_shape(
    shape: tuple[int, ...], granularity: Granularity, block_size: int = 128, op: str = "quantize_fp8"
) -> tuple[int, ...]:
    """Shape of the scales :func:`quantize_fp8` returns for an input of ``shape``; validates the arguments with the
    C++ checks' messages (``op`` names the op in them).

    Example:
        >>> scale_shape((256, 512), "block", 128)
        (2, 4)
    """
    torch._check_value(
        granularity in GRANULARITIES,
        lambda: f"{op}: expected granularity to be 'tensor', 'row', 'group' or 'block', but got '{granularity}'",
    )
    if granularity == "tensor":
        return ()
    torch._check_value(
        len(shape) == 2,
        lambda: (
            f"{op}: granularity='{granularity}' expects x to be a 2-D tensor, but got a {len(shape)}-D tensor of "
            f"shape {sizes(shape)} (use granularity='tensor', or reshape to 2-D first)"
        ),
    )
    rows, cols = shape
    if granularity == "row":
        return (rows, 1)
    torch._check_value(
        block_size > 0, lambda: f"{op}: expected block_size to be a positive integer, but got {block_size}"
    )
    groups = (cols + block_size - 1) // block_size
    return (rows, groups) if granularity == "group" else ((rows + block_size - 1) // block_size, groups)


if NATIVE_AVAILABLE:

    @torch.library.register_fake("deepseek_ext::quantize_fp8")
    def _quantize_fp8_fake(x, dtype=None, granularity="tensor", block_size=128):
        op = "quantize_fp8"
        dtype = DEFAULT_FP8_DTYPE if dtype is None else dtype
        check_dtype(op, "x", x, _IN_DTYPES)
        check_dtype_value(op, "dtype", dtype, _FP8_DTYPES)
        shape = scale_shape(tuple(x.shape), granularity, block_size, op)
        return x.new_empty(x.shape, dtype=dtype), x.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("deepseek_ext::fp8_matmul")
    def _fp8_matmul_fake(a, b, scale_a, scale_b, bias=None, out_dtype=None, block_size=128):
        op = "fp8_matmul"
        check_dtype(op, "a", a, _FP8_DTYPES)
        check_dtype(op, "b", b, _FP8_DTYPES)
        torch._check_value(
            a.dim() == 2 and b.dim() == 2,
            lambda: f"{op}: expected 2-D a (M, K) and b (K, N), but got shapes {sizes(a.shape)} and {sizes(b.shape)}",
        )
        torch._check_value(
            a.shape[1] == b.shape[0],
            lambda: f"{op}: a is {sizes(a.shape)} and b is {sizes(b.shape)}: the inner dimensions (K) must match",
        )
        check_dtype(op, "scale_a", scale_a, (torch.float32,))
        check_dtype(op, "scale_b", scale_b, (torch.float32,))
        check_same_device(op, "a", a, "b", b)
        check_same_device(op, "a", a, "scale_a", scale_a)
        check_same_device(op, "a", a, "scale_b", scale_b)
        torch._check_value(
            block_size > 0, lambda: f"{op}: expected block_size to be a positive integer, but got {block_size}"
        )
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        check_dtype_value(op, "out_dtype", out_dtype, _IN_DTYPES)
        m, k, n = a.shape[0], a.shape[1], b.shape[1]
        block = min(block_size, max(k, n, 1))
        kb, nb = (k + block - 1) // block, (n + block - 1) // block
        sa, sb = tuple(scale_a.shape), tuple(scale_b.shape)
        per_tensor = scale_a.numel() == 1 and scale_b.numel() == 1 and scale_a.dim() <= 2 and scale_b.dim() <= 2
        torch._check_value(
            per_tensor or (sa == (m, 1) and sb == (1, n)) or (sa == (m, kb) and sb == (kb, nb)),
            lambda: (
                f"{op}: scale_a and scale_b of shapes {sizes(sa)} and {sizes(sb)} fit no scaling mode for a "
                f"{sizes(a.shape)} and b {sizes(b.shape)}; expected one element each (per tensor), [{m}, 1] and "
                f"[1, {n}] (per row of a / column of b), or [{m}, {kb}] and [{kb}, {nb}] (1x{block_size} groups of "
                f"a, {block_size}x{block_size} blocks of b)"
            ),
        )
        if bias is not None:
            check_dtype(op, "bias", bias, _IN_DTYPES)
            torch._check_value(
                bias.dim() == 1 and bias.shape[0] == n,
                lambda: f"{op}: expected bias of shape [{n}], but got {sizes(bias.shape)}",
            )
            check_same_device(op, "a", a, "bias", bias)
        return a.new_empty((m, n), dtype=out_dtype)

    @torch.library.register_fake("deepseek_ext::dequantize_fp8")
    def _dequantize_fp8_fake(x, scale, granularity="tensor", block_size=128, out_dtype=None):
        op = "dequantize_fp8"
        out_dtype = torch.float32 if out_dtype is None else out_dtype
        check_dtype(op, "x", x, _FP8_DTYPES)
        check_dtype(op, "scale", scale, (torch.float32,))
        check_same_device(op, "x", x, "scale", scale)
        check_dtype_value(op, "out_dtype", out_dtype, _IN_DTYPES)
        expected = scale_shape(tuple(x.shape), granularity, block_size, op)
        blocked = granularity in ("block", "group")
        torch._check_value(
            tuple(scale.shape) == expected,
            lambda: (
                f"{op}: expected scale of shape {sizes(expected)} for x of shape {sizes(x.shape)} with "
                f"granularity='{granularity}'{f' and block_size={block_size}' if blocked else ''}, but got "
                f"{sizes(scale.shape)}"
            ),
        )
        return x.new_empty(x.shape, dtype=out_dtype)
