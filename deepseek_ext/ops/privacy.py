"""Differential-privacy ops: ``per_sample_sq_norms`` and ``clip_sum_noise`` (the DP-SGD reduction)."""

from __future__ import annotations

import torch

from .._native import NATIVE_AVAILABLE, require_native


def per_sample_sq_norms(grads: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each sample's gradient.

    Args:
        grads: ``(N, *shape)`` per-sample gradients, float32/float64/float16/bfloat16.

    Returns:
        ``(N,)`` float32 (float64 for float64 input), accumulated in float32 or better.

    Example:
        >>> g = torch.randn(32, 10, 5)              # 32 per-sample gradients of a (10, 5) weight
        >>> norms = per_sample_sq_norms(g).sqrt()     # (32,)
    """
    require_native("ops.per_sample_sq_norms")
    return torch.ops.deepseek_ext.per_sample_sq_norms.default(grads)


def clip_sum_noise(
    grads: torch.Tensor, factors: torch.Tensor, noise: torch.Tensor | None = None, scale: float = 1.0
) -> torch.Tensor:
    """``(sum_i factors[i] * grads[i] + noise) * scale`` in one pass over ``grads``: the DP-SGD reduction.

    Args:
        grads: ``(N, *shape)`` per-sample gradients.
        factors: ``(N,)`` float32 clip factors, typically ``min(1, C / (||g_i|| + 1e-6))``.
        noise: optional float32/float64 tensor of ``shape`` (already multiplied by its standard deviation).
        scale: final multiplier, typically ``1 / expected_batch_size``.

    Returns:
        A tensor of ``shape`` and ``grads``' dtype (accumulated in float32, float64 for float64 input).

    Example:
        >>> g = torch.randn(32, 10, 5)
        >>> factors = (1.0 / (per_sample_sq_norms(g).sqrt() + 1e-6)).clamp(max=1.0)
        >>> noisy = clip_sum_noise(g, factors, torch.randn(10, 5) * 0.5, scale=1 / 32)   # (10, 5)
    """
    require_native("ops.clip_sum_noise")
    return torch.ops.deepseek_ext.clip_sum_noise.default(grads, factors, noise, scale)


if NATIVE_AVAILABLE:

    @torch.library.register_fake("deepseek_ext::per_sample_sq_norms")
    def _per_sample_sq_norms_fake(grads):
        torch._check(grads.dim() >= 1, lambda: "per_sample_sq_norms: grads needs a leading per-sample dimension")
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        return grads.new_empty((grads.shape[0],), dtype=dtype)

    @torch.library.register_fake("deepseek_ext::clip_sum_noise")
    def _clip_sum_noise_fake(grads, factors, noise=None, scale=1.0):
        torch._check(grads.dim() >= 1, lambda: "clip_sum_noise: grads needs a leading per-sample dimension")
        torch._check(factors.shape == (grads.shape[0],), lambda: "clip_sum_noise: factors must be (N,)")
        return grads.new_empty(grads.shape[1:])
