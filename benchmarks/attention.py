"""Fused attention against torch.nn.functional.scaled_dot_product_attention (SDPA).

On CPU PyTorch picks its own flash-attention CPU kernel for these inputs; on CUDA the baseline is pinned to SDPA's
flash backend (and, for bfloat16, SDPA's cuDNN backend as a second peer) and every row gives TFLOP/s for ours and the
peer. Quick mode on CUDA runs the targets' configuration (bfloat16, head dim 128, sequence 4096) instead of the tiny
CPU smoke shapes. Shapes: batch 4, 8 heads, head dim 64 and 128, sequence
512 / 1024 / 4096, causal and not, float32 and bfloat16, forward and forward + backward. Peak memory at sequence
8192 is measured in fresh subprocesses (growth of the peak resident set over the inputs, CPU; peak allocated
bytes, CUDA).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.runner import Case, peak_rss_mb, reset_peak_rss
from deepseek_ext.ops import fused_attention

BATCH, HEADS = 4, 8


def _flops(seq: int, dim: int, causal: bool, backward: bool) -> float:
    f = 4.0 * BATCH * HEADS * seq * seq * dim * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)  # backward: 5 matmuls of the forward's 2, plus the recomputed QK^T


def _sdpa_context(device: str, backend: str = "flash"):
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


_inputs_cache: dict = {}


def _inputs(device: str, seq: int, dim: int, dtype: torch.dtype, backward: bool):
    """q, k, v and an output gradient; one set alive at a time (cases run one after another), so a full run does not
    hold the inputs of every case at once."""
    key = (device, seq, dim, dtype, backward)
    if key not in _inputs_cache:
        _inputs_cache.clear()
        gen = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(BATCH, HEADS, seq, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_(backward)
            for _ in range(3)
        )
        grad = torch.randn(BATCH, HEADS, seq, dim, generator=gen).to(device=device, dtype=dtype)
        _inputs_cache[key] = (q, k, v, grad)
    return _inputs_cache[key]


def _make(impl: str, device: str, seq: int, dim: int, dtype: torch.dtype, causal: bool, backward: bool):
    def step():
        q, k, v, grad = _inputs(device, seq, dim, dtype, backward)
        if impl == "ours":
            out = fused_attention(q, k, v, is_causal=causal)
        else:
            with _sdpa_context(device, "cudnn" if impl == "cudnn" else "flash"):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return step


def _check(device, seq, dim, dtype, causal):
    def run():
        ours = _make("ours", device, seq, dim, dtype, causal, False)().float()
        peer = _make("sdpa", device, seq, dim, dtype, causal, False)().float()
        tol = 2e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ours, peer, rtol=tol, atol=tol)

    return run


def peak_memory(impl: str, device: str, seq: int, dim: int, dtype: str, causal: bool, backward: bool) -> dict:
    """Runs one configuration in a fresh process; returns its peak memory growth (MB) and the call's time (s)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.attention",
        impl,
        device,
        str(seq),
        str(dim),
        dtype,
        str(int(causal)),
        str(int(backward)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    seqs = [256] if quick else [512, 1024, 4096]
    dims = [64] if quick else [64, 128]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    causals = (False, True)
    if quick and device == "cuda":  # the targets: bf16, d128, s4096 (forward >= 0.9x flash, fwd+bwd >= 0.7x)
        seqs, dims, dtypes, causals = [4096], [128], [torch.bfloat16], (False,)
    out = []
    for dtype, dim, seq, causal, backward in (
        (dt, d, s, c, b) for b in (False, True) for dt in dtypes for d in dims for s in seqs for c in causals
    ):
        name = "fwd+bwd" if backward else "forward"
        config = f"{name} s{seq} d{dim} {'causal' if causal else 'full'} {str(dtype)[6:]}"
        extra = {"flop": _flops(seq, dim, causal, backward)}
        peers = [("sdpa", "SDPA (flash backend)" if device == "cuda" else "SDPA (PyTorch's CPU flash kernel)")]
        if device == "cuda" and dtype == torch.bfloat16:
            peers.append(("cudnn", "SDPA (cuDNN backend)"))
        for i, (impl, peer_name) in enumerate(peers):
            out.append(
                Case(
                    family="attention",
                    op="fused_attention",
                    config=config,
                    ours=_make("ours", device, seq, dim, dtype, causal, backward),
                    baseline=_make(impl, device, seq, dim, dtype, causal, backward),
                    baseline_name=peer_name,
                    check=None if backward or i else _check(device, min(seq, 512), dim, dtype, causal),
                    min_run_time=0.2 if seq >= 4096 else None,
                    extra=extra,
                )
            )
    if quick and device == "cuda":
        return out  # the peak-memory subprocesses would spend the GPU check's time on CUDA start-ups
    seq_mem = 1024 if quick else 8192
    for backward in (False, True):
        ours = peak_memory("ours", device, seq_mem, 64, "float32", True, backward)
        peer = peak_memory("sdpa", device, seq_mem, 64, "float32", True, backward)
        name = "fwd+bwd" if backward else "forward"
        out.append(
            Case(
                family="attention",
                op="attention memory",
                config=f"{name} s{seq_mem} d64 causal float32",
                ours=None,
                baseline=None,
                baseline_name=f"SDPA; peak memory +{ours['peak_mb']:.0f} MB (ours) vs +{peer['peak_mb']:.0f} MB",
                ours_s=ours["seconds"],
                baseline_s=peer["seconds"],
                extra={"ours_peak_mb": ours["peak_mb"], "peer_peak_mb": peer["peak_mb"]},
            )
        )
    return out


if __name__ == "__main__":  # worker for peak_memory
    impl, dev, seq_s, dim_s, dtype_s, causal_s, backward_s = sys.argv[1:8]
    args = (getattr(torch, dtype_s), causal_s == "1", backward_s == "1")
    _make(impl, dev, 128, int(dim_s), *args)()  # warm-up: libraries, thread pools and allocator caches
    step = _make(impl, dev, int(seq_s), int(dim_s), *args)
    _inputs(dev, int(seq_s), int(dim_s), args[0], args[2])  # inputs are not part of the measured growth
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = peak_rss_mb()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    if dev == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mb() - base
    print(json.dumps({"peak_mb": peak, "seconds": seconds}))
