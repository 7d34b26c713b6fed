"""Differential-privacy ops: ``per_sample_sq_norms``, ``clip_sum_noise`` (the DP-SGD reduction, with the Gaussian
noise given as a tensor or generated in the same pass), ``gaussian_noise`` (the noise stream alone) and
``gaussian_noise_`` (the stream written into an existing tensor, or added to it).

The generated noise is Philox4x32-10 (counter-based: a value depends only on the seed and its position in the
stream, never on threads, devices or call order) with Box-Muller in float32; deepseek_ext.reference.privacy
specifies it. A ``seed`` is a Python int or a one-element int64 CPU tensor (``draw_seed()`` takes one from a
``torch.Generator``, so ``torch.manual_seed`` governs it).
"""

from __future__ import annotations

import torch

from .._native import NATIVE_AVAILABLE, require_native


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A noise seed drawn from ``generator`` (PyTorch's default CPU generator when None): a one-element int64 tensor.

    Example:
        >>> torch.manual_seed(0)
        >>> seed = draw_seed()                 # the same seed after every torch.manual_seed(0)
        >>> z = gaussian_noise((3, 4), 1.0, seed)
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator)


def _seed_tensor(op: str, seed) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"{op}: expected seed to be an int or a one-element int64 CPU tensor, but got {type(seed).__name__}"
        )
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{op}: expected seed in [-2^63, 2^64), but got {seed}")
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64)


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
    grads: torch.Tensor,
    factors: torch.Tensor,
    noise: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    noise_std: float = 0.0,
    seed: int | torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``(sum_i factors[i] * grads[i] + noise) * scale`` in one pass over ``grads``: the DP-SGD reduction.

    The noise is either a tensor or, with ``noise_std > 0``, generated inside the op block by block (it never exists
    as a tensor): ``noise_std`` times ``gaussian_noise(grads.shape[1:], 1.0, seed, offset)``, the same values.

    Args:
        grads: ``(N, *shape)`` per-sample gradients.
        factors: ``(N,)`` float32 clip factors, typically ``min(1, C / (||g_i|| + 1e-6))``.
        noise: optional float32/float64 tensor of ``shape`` (already multiplied by its standard deviation).
        scale: final multiplier, typically ``1 / expected_batch_size``.
        noise_std: standard deviation of generated noise (0: none); exclusive with ``noise``.
        seed: the noise stream (see ``gaussian_noise``); required when ``noise_std > 0``.
        offset: position of the first value in the stream; give each parameter of a step its own range.

    Returns:
        A tensor of ``shape`` and ``grads``' dtype (accumulated in float32, float64 for float64 input).

    Example:
        >>> g = torch.randn(32, 10, 5)
        >>> factors = (1.0 / (per_sample_sq_norms(g).sqrt() + 1e-6)).clamp(max=1.0)
        >>> noisy = clip_sum_noise(g, factors, torch.randn(10, 5) * 0.5, scale=1 / 32)   # (10, 5)
        >>> fused = clip_sum_noise(g, factors, scale=1 / 32, noise_std=0.5, seed=draw_seed())
    """
    require_native("ops.clip_sum_noise")
    seed_t = None if seed is None else _seed_tensor("clip_sum_noise", seed)
    return torch.ops.deepseek_ext.clip_sum_noise.default(grads, factors, noise, scale, noise_std, seed_t, offset)


def gaussian_noise(
    shape,
    std: float,
    seed: int | torch.Tensor,
    offset: int = 0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``std`` times standard normals from the counter-based stream ``seed``: the values at positions ``offset``,
    ``offset + 1``, ... in row-major order, so any slice of a stream can be generated alone and two calls with
    disjoint position ranges are independent.

    Multi-threaded and vectorised on the CPU (the values do not depend on the thread count); the CUDA kernel
    computes the same stream. Values are float32 normals (cast to ``dtype``) with ``|z| < 6.67``; the last bits may
    differ between instruction-set levels and devices.

    Args:
        shape: the output shape.
        std: standard deviation, finite and >= 0.
        seed: a Python int or a one-element int64 CPU tensor (``draw_seed()``).
        offset: stream position of the first value, >= 0; multiples of 64 are fastest.
        dtype: float32 (default: PyTorch's default dtype), float64, float16 or bfloat16.
        device: the output device (default: CPU).

    Returns:
        A tensor of ``shape``.

    Example:
        >>> z = gaussian_noise((1000, 1000), 0.5, seed=1234)
        >>> tail = gaussian_noise((1000,), 0.5, seed=1234, offset=999_000)   # equals z[-1]
    """
    require_native("ops.gaussian_noise")
    size = [shape] if isinstance(shape, int) else list(shape)
    return torch.ops.deepseek_ext.gaussian_noise.default(
        size, std, _seed_tensor("gaussian_noise", seed), offset, dtype=dtype, device=device
    )


def gaussian_noise_(
    tensor: torch.Tensor,
    std: float,
    seed: int | torch.Tensor,
    offset: int = 0,
    *,
    scale: float = 1.0,
    accumulate: bool = False,
) -> torch.Tensor:
    """Writes ``gaussian_noise(tensor.shape, std, seed, offset)`` into ``tensor`` (the in-place form, like
    ``Tensor.normal_``): ``tensor = ((tensor if accumulate else 0) + std * z) * scale``, with ``z`` the stream's
    normals at positions ``offset``, ``offset + 1``, ... in row-major order.

    No new memory: a DP step adds a parameter's noise to a sum it already holds (``accumulate=True``), or fills a
    buffer it keeps. The values equal ``gaussian_noise``'s (bit for bit without ``scale``); with ``accumulate`` they
    equal ``clip_sum_noise(tensor[None], ones(1), scale=scale, noise_std=std, seed=seed, offset=offset)``.

    Args:
        tensor: float32/float64/float16/bfloat16, any shape and layout (non-contiguous tensors go through a
            contiguous copy).
        std: standard deviation, finite and >= 0 (0: no noise, ``tensor`` is zeroed or only scaled).
        seed: a Python int or a one-element int64 CPU tensor (``draw_seed()``).
        offset: stream position of the first value, >= 0.
        scale: finite multiplier of the result.
        accumulate: add the noise to ``tensor`` instead of overwriting it.

    Returns:
        ``tensor``.

    Example:
        >>> buf = torch.empty(1000, 1000)
        >>> gaussian_noise_(buf, 0.5, seed=1234)                   # equals gaussian_noise((1000, 1000), 0.5, 1234)
        >>> total = torch.ones(10)
        >>> gaussian_noise_(total, 0.5, 1234, scale=0.1, accumulate=True)   # (1 + 0.5 z) * 0.1
    """
    require_native("ops.gaussian_noise_")
    torch.ops.deepseek_ext.gaussian_noise_.default(
        tensor, std, _seed_tensor("gaussian_noise_", seed), offset, scale=scale, accumulate=accumulate
    )
    return tensor


if NATIVE_AVAILABLE:

    @torch.library.register_fake("deepseek_ext::per_sample_sq_norms")
    def _per_sample_sq_norms_fake(grads):
        torch._check(grads.dim() >= 1, lambda: "per_sample_sq_norms: grads needs a leading per-sample dimension")
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        return grads.new_empty((grads.shape[0],), dtype=dtype)

    @torch.library.register_fake("deepseek_ext::clip_sum_noise")
    def _clip_sum_noise_fake(grads, factors, noise=None, scale=1.0, noise_std=0.0, seed=None, offset=0):
        torch._check(grads.dim() >= 1, lambda: "clip_sum_noise: grads needs a leading per-sample dimension")
        torch._check(factors.shape == (grads.shape[0],), lambda: "clip_sum_noise: factors must be (N,)")
        return grads.new_empty(grads.shape[1:])

    @torch.library.register_fake("deepseek_ext::gaussian_noise_")
    def _gaussian_noise__fake(tensor, std, seed, offset=0, scale=1.0, accumulate=False):
        return None
