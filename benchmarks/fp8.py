"""FP8 quantisation: quantize_fp8 / dequantize_fp8 against the composite a user would write
(amax -> divide -> clamp -> .to(fp8)), both in eager PyTorch and compiled with torch.compile (inductor)."""

from __future__ import annotations

import functools

import torch

from benchmarks.runner import Case
from deepseek_ext.ops import dequantize_fp8, fp8_matmul, quantize_fp8

SHAPES = [(4096, 4096), (8192, 8192)]
MATMUL_SHAPES = [(1, 4096, 4096), (32, 4096, 4096), (2048, 4096, 4096)]  # (M, N, K)
QUICK_MATMUL_SHAPES = [(32, 512, 512)]
# CUDA: decode (M = 1), a small batch and the target 4096^3; quick mode keeps the target and decode.
CUDA_MATMUL_SHAPES = [(1, 4096, 4096), (32, 4096, 4096), (4096, 4096, 4096), (2048, 18432, 7168)]
CUDA_QUICK_MATMUL_SHAPES = [(1, 4096, 4096), (4096, 4096, 4096)]
QUICK_SHAPES = [(1024, 1024)]
GRANULARITIES = ["tensor", "row", "block"]
IN_DTYPES = [torch.bfloat16]
BLOCK = 128


def eager_quantize(x: torch.Tensor, dtype: torch.dtype, granularity: str, block: int = BLOCK):
    """The composite in plain PyTorch (for block scaling, shapes must be multiples of the block)."""
    fmax = torch.finfo(dtype).max
    if granularity == "tensor":
        scale = x.abs().amax().float().clamp(min=1e-12) / fmax
        q = (x.float() / scale).clamp(-fmax, fmax).to(dtype)
    elif granularity == "row":
        scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / fmax
        q = (x.float() / scale).clamp(-fmax, fmax).to(dtype)
    else:
        m, n = x.shape
        tiles = x.view(m // block, block, n // block, block)
        scale = tiles.abs().amax(dim=(1, 3), keepdim=True).float().clamp(min=1e-12) / fmax
        q = (tiles.float() / scale).clamp(-fmax, fmax).to(dtype).view(m, n)
        scale = scale.view(m // block, n // block)
    return q, scale


def eager_dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str, out_dtype: torch.dtype):
    if granularity == "block":
        m, n = q.shape
        tiles = q.view(m // BLOCK, BLOCK, n // BLOCK, BLOCK).float() * scale.view(m // BLOCK, 1, n // BLOCK, 1)
        return tiles.to(out_dtype).view(m, n)
    return (q.float() * scale).to(out_dtype)


def _check_same(x, dtype, granularity):
    def check():
        q, s = quantize_fp8(x, dtype, granularity, BLOCK)
        q_ref, s_ref = eager_quantize(x, dtype, granularity)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), "quantize_fp8 differs from the composite"

    return check


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    out = []
    fp8 = torch.float8_e4m3fn
    for m, n in QUICK_SHAPES if quick else SHAPES:
        for in_dtype in IN_DTYPES:
            x = torch.randn(m, n, device=device).to(in_dtype)
            name = str(in_dtype).removeprefix("torch.")
            for g in GRANULARITIES:
                ours = functools.partial(quantize_fp8, x, fp8, g, BLOCK)
                composite = functools.partial(eager_quantize, dtype=fp8, granularity=g)
                out.append(
                    Case(
                        family="fp8",
                        op="quantize_fp8",
                        config=f"{m}x{n} {name} {g}",
                        ours=ours,
                        baseline=functools.partial(composite, x),
                        baseline_name="eager amax/div/clamp/cast",
                        check=_check_same(x, fp8, g),
                    )
                )
                if compiled_baselines:
                    # One compiled graph per (shape, granularity): the composite is one code object for dynamo.
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                    compiled = torch.compile(composite, dynamic=False)
                    out.append(
                        Case(
                            family="fp8",
                            op="quantize_fp8",
                            config=f"{m}x{n} {name} {g}",
                            ours=ours,
                            baseline=functools.partial(compiled, x),
                            baseline_name="torch.compile of the same",
                        )
                    )
            q, s = quantize_fp8(x, fp8, "block", BLOCK)
            composite = functools.partial(eager_dequantize, granularity="block", out_dtype=in_dtype)
            baselines = [(composite, "eager float()*scale, cast")]
            if compiled_baselines:
                baselines.append((torch.compile(composite, dynamic=False), "torch.compile of the same"))
            for fn, label in baselines:
                out.append(
                    Case(
                        family="fp8",
                        op="dequantize_fp8",
                        config=f"{m}x{n} ->{name} block",
                        ours=functools.partial(dequantize_fp8, q, s, "block", BLOCK, in_dtype),
                        baseline=functools.partial(fn, q, s),
                        baseline_name=label,
                    )
                )
    out += matmul_cases(device, quick)
    return out


def _dequantize_then_matmul(a, b, sa, sb):
    return (dequantize_fp8(a, sa, "group") @ dequantize_fp8(b, sb, "block")).bfloat16()


def _scaled_mm_or_raise(a, b_col, sa, sb):
    return torch._scaled_mm(a, b_col, sa, sb, out_dtype=torch.bfloat16)


def matmul_cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        return cuda_matmul_cases(quick)
    out = []
    fp8 = torch.float8_e4m3fn
    for m, n, k in QUICK_MATMUL_SHAPES if quick else MATMUL_SHAPES:
        g = torch.Generator().manual_seed(0)
        a, sa = quantize_fp8(torch.randn(m, k, generator=g).to(device), fp8)
        b, sb = quantize_fp8(torch.randn(k, n, generator=g).to(device), fp8)
        b_col = b.t().contiguous().t()
        ours = functools.partial(fp8_matmul, a, b, sa, sb, None, torch.bfloat16)
        config = f"M={m} N={n} K={k} tensorwise"
        out.append(
            Case(
                family="fp8",
                op="fp8_matmul",
                config=config,
                ours=ours,
                baseline=lambda a=a, b=b, sa=sa, sb=sb: ((a.float() * sa) @ (b.float() * sb)).bfloat16(),
                baseline_name="eager dequantise (fp32) + matmul",
            )
        )
        out.append(
            Case(
                family="fp8",
                op="fp8_matmul",
                config=config,
                ours=ours,
                baseline=functools.partial(_scaled_mm_or_raise, a, b_col, sa, sb),
                baseline_name="torch._scaled_mm" + (" (CPU reference kernel: no real peer)" if device == "cpu" else ""),
                headline=device != "cpu",
            )
        )
        if m == 32 or quick:  # DeepSeek-V3 fine-grained scaling
            ag, sag = quantize_fp8(torch.randn(m, k, generator=g).to(device), fp8, "group")
            bb, sbb = quantize_fp8(torch.randn(k, n, generator=g).to(device), fp8, "block")
            out.append(
                Case(
                    family="fp8",
                    op="fp8_matmul",
                    config=f"M={m} N={n} K={k} 1x128/128x128",
                    ours=functools.partial(fp8_matmul, ag, bb, sag, sbb, None, torch.bfloat16),
                    baseline=functools.partial(_dequantize_then_matmul, ag, bb, sag, sbb),
                    baseline_name="dequantize_fp8 (fp32) + matmul",
                )
            )
    return out


def cuda_matmul_cases(quick: bool) -> list[Case]:
    """On CUDA every row gives TFLOP/s: ours against torch._scaled_mm (per tensor; for 1x128 / 128x128 block scaling
    too, on the same shapes: the target is >= 0.9x) and against a bfloat16 matmul."""
    out = []
    fp8 = torch.float8_e4m3fn
    for m, n, k in CUDA_QUICK_MATMUL_SHAPES if quick else CUDA_MATMUL_SHAPES:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(m, k, generator=g).cuda(), torch.randn(n, k, generator=g).cuda()
        a, sa = quantize_fp8(x, fp8)
        bt, sb = quantize_fp8(w, fp8)
        b = bt.t()  # (K, N) column-major, what torch._scaled_mm takes
        ag, sag = quantize_fp8(x, fp8, "group")
        bb, sbb = quantize_fp8(w.t().contiguous(), fp8, "block")  # (K, N) row-major weight, 128x128 blocks
        xb, wb = x.bfloat16(), w.t().contiguous().bfloat16()
        extra = {"flop": 2.0 * m * n * k}
        scaled_mm = functools.partial(_scaled_mm_or_raise, a, b, sa, sb)
        rows = [
            (
                "tensorwise",
                functools.partial(fp8_matmul, a, b, sa, sb, None, torch.bfloat16),
                scaled_mm,
                "torch._scaled_mm (tensorwise)",
            ),
            (
                "tensorwise",
                functools.partial(fp8_matmul, a, b, sa, sb, None, torch.bfloat16),
                functools.partial(torch.matmul, xb, wb),
                "bf16 matmul",
            ),
            (
                "1x128/128x128",
                functools.partial(fp8_matmul, ag, bb, sag, sbb, None, torch.bfloat16),
                scaled_mm,
                "torch._scaled_mm (tensorwise, same shape)",
            ),
            (
                "1x128/128x128",
                functools.partial(fp8_matmul, ag, bb, sag, sbb, None, torch.bfloat16),
                functools.partial(torch.matmul, xb, wb),
                "bf16 matmul",
            ),
        ]
        for mode, ours, peer, peer_name in rows:
            out.append(
                Case(
                    family="fp8",
                    op="fp8_matmul",
                    config=f"M={m} N={n} K={k} {mode}",
                    ours=ours,
                    baseline=peer,
                    baseline_name=peer_name,
                    extra=extra,
                )
            )
    return out
