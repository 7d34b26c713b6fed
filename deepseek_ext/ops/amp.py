"""Mixed-precision helper op: ``unscale_check_norm_``."""

from __future__ import annotations

import torch

from .._native import NATIVE_AVAILABLE, require_native


def unscale_check_norm_(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """Unscales gradients in place, flags non-finite values and returns the norm, in one pass over memory.

    The fused form of ``torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)`` followed by
    ``torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))``.

    Args:
        grads: float32, float16 or bfloat16 tensors on one device (any shapes; each is multiplied by ``inv_scale``
            in float32 and written back in its own dtype).
        found_inf: float32 tensor with one element, set to 1.0 if any gradient held an inf or NaN (never reset to
            0 here, so it accumulates over calls as PyTorch's op does).
        inv_scale: float32 tensor with one element, ``1 / loss_scale``.

    Returns:
        The L2 norm of all unscaled gradients together, a float32 0-d tensor on ``inv_scale``'s device (inf or
        NaN when ``found_inf`` was set).

    Example:
        >>> grads = [p.grad for p in model.parameters() if p.grad is not None]
        >>> found_inf = torch.zeros(1)
        >>> norm = unscale_check_norm_(grads, found_inf, torch.tensor([1 / 65536.0]))
    """
    require_native("ops.unscale_check_norm_")
    return torch.ops.deepseek_ext.unscale_check_norm_.default(grads, found_inf, inv_scale)


if NATIVE_AVAILABLE:

    @torch.library.register_fake("deepseek_ext::unscale_check_norm_")
    def _unscale_check_norm_fake(grads, found_inf, inv_scale):
        return inv_scale.new_empty((), dtype=torch.float32)
