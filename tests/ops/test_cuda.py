"""CUDA-only checks (every test here is marked ``cuda`` and skipped without a GPU and the CUDA kernels): CUDA against
the CPU kernels where both follow one rule (bit for bit where the rule is exact), varlen attention and dropout on the
GPU, grids over 65,535 blocks along what used to be gridDim.y / z, non-contiguous and expanded quantized weights,
low-precision activations with int4 weights, CUDA graph capture of every op, no host synchronisation, and one small
workload that touches every kernel (``test_sanitizer_workload``: what scripts/gpu_check.sh runs under
compute-sanitizer)."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepseek_ext.ops import (
    clip_sum_noise,
    dequantize_fp8,
    fp8_matmul,
    fused_attention,
    fused_attention_varlen,
    per_sample_sq_norms,
    quantize_fp8,
    unscale_check_norm_,
)
from deepseek_ext.ops.quant import quantize_weight, quantized_linear
from deepseek_ext.reference import attention as ref
from deepseek_ext.reference import quant as qref

pytestmark = [pytest.mark.cuda, pytest.mark.any_isa]

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def _close(got, want, tol):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


def _grads_close(got, want, tol):
    for a, w in zip(got, want):
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        _close(a / scale, w / scale, tol)


def _cuda(*ts, grad=False):
    return [t.detach().cuda().requires_grad_(grad) for t in ts]


# ------------------------------------------------------------------------------------------------------ attention
def _varlen(lens_q, lens_k, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)

    def make(n, h):
        return torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)

    return make(sum(lens_q), hq), make(sum(lens_k), hkv), make(sum(lens_k), hkv), cu_q, cu_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("offsets_on", ["cuda", "cpu"])
@pytest.mark.parametrize(
    "lens", [([5, 0, 17, 1], [5, 0, 17, 1]), ([3, 100, 7], [10, 100, 300]), ([257], [129]), ([0, 0], [4, 0])], ids=str
)
def test_varlen_forward_backward_match_the_reference(dtype, causal, offsets_on, lens):
    q, k, v, cu_q, cu_k = _varlen(*lens, 4, 2, 48, dtype)
    qc, kc, vc = _cuda(q, k, v, grad=True)
    out = fused_attention_varlen(qc, kc, vc, cu_q.to(offsets_on), cu_k.to(offsets_on), is_causal=causal)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = ref.attention_varlen(q64, k64, v64, cu_q, cu_k, is_causal=causal)
    _close(out, want, TOL[dtype])
    if out.numel():
        g = torch.randn(out.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, (qc, kc, vc), g.to(out))
        exp = torch.autograd.grad(want, (q64, k64, v64), g, allow_unused=True)
        exp = [torch.zeros_like(w) if w is None else w for w in exp]
        _grads_close(got, exp, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_dropout_mask_forward_and_backward_match_the_cpu_with_the_same_seed(dtype):
    p = 0.3
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    k, v = k[:, :2, :29].contiguous(), v[:, :2, :29].contiguous()
    out_grad = torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        qd, kd, vd = (t.detach().to(device).requires_grad_() for t in (q, k, v))
        torch.manual_seed(123)
        out = fused_attention(qd, kd, vd, dropout_p=p, enable_gqa=True)
        grads = torch.autograd.grad(out, (qd, kd, vd), out_grad.to(device))
        results.append((out, grads))
    (out_cpu, g_cpu), (out_gpu, g_gpu) = results
    if dtype == torch.float64:  # the same keep-mask: zeros in the same places
        assert torch.equal(out_cpu == 0, out_gpu.cpu() == 0)
    _close(out_gpu, out_cpu, 2 * TOL[dtype])
    _grads_close(g_gpu, g_cpu, 2 * GRAD_TOL[dtype])


def test_attention_grids_over_65535_blocks():
    # 70,000 (batch, head) pairs in the dense op and 70,000 sequences in the varlen op (formerly gridDim.y / z).
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(35000, 2, 3, 16, generator=g) for _ in range(3))
    qc, kc, vc = _cuda(q, k, v, grad=True)
    out = fused_attention(qc, kc, vc, is_causal=True)
    _close(out, ref.attention(q.double(), k.double(), v.double(), is_causal=True), 1e-4)
    out.sum().backward()
    lens = [1 + i % 3 for i in range(70000)]
    q, k, v, cu_q, cu_k = _varlen(lens, lens, 1, 1, 8, torch.float32)
    qc, kc, vc = _cuda(q, k, v, grad=True)
    out = fused_attention_varlen(qc, kc, vc, cu_q.cuda(), cu_k.cuda(), is_causal=True)
    cpu = fused_attention_varlen(q, k, v, cu_q, cu_k, is_causal=True)
    _close(out, cpu, 1e-5)
    gq, gk, gv = torch.autograd.grad(out, (qc, kc, vc), torch.ones_like(out))
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and torch.isfinite(gv).all()


def test_attention_backward_edge_cases():
    # heads_q == 0: no grid is launched, and K / V get zero gradients.
    q, k, v = (
        torch.randn(1, 0, 4, 8, device="cuda"),
        torch.randn(1, 1, 4, 8, device="cuda"),
        torch.randn(1, 1, 4, 8, device="cuda"),
    )
    out, lse = torch.ops.deepseek_ext.fused_attention_fwd(q, k, v, None, 0.0, False, 0.5, None)
    dq, dk, dv = torch.ops.deepseek_ext.fused_attention_bwd(
        torch.ones_like(out), q, k, v, out, lse, None, 0.0, False, 0.5, None
    )
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))
    # out on another device than q is an error naming it
    q = torch.randn(1, 1, 4, 8, device="cuda")
    out, lse = torch.ops.deepseek_ext.fused_attention_fwd(q, q, q, None, 0.0, False, 0.5, None)
    with pytest.raises(RuntimeError, match="expected query and out to be on the same device"):
        torch.ops.deepseek_ext.fused_attention_bwd(out, q, q, q, out.cpu(), lse, None, 0.0, False, 0.5, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("d", [8, 64, 80, 128, 256])
def test_tiled_backward_every_head_dim(dtype, d):
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, 4, 77, d, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    qc, kc, vc = (t.to(dtype).cuda().requires_grad_() for t in (q, k, v))
    out = fused_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (qc, kc, vc), go.to(out))
    q64, k64, v64 = (t.to(dtype).double().requires_grad_() for t in (q, k, v))
    want_out = ref.attention(q64, k64, v64, is_causal=True)
    want = torch.autograd.grad(want_out, (q64, k64, v64), go)
    _close(out, want_out, TOL[dtype])
    _grads_close(got, want, GRAD_TOL[dtype])


# ---------------------------------------------------------------------------------------------- integer quantization
CONFIGS = [(8, 0, True), (8, 0, False), (8, 128, True), (4, 0, True), (4, 64, False), (4, 32, True)]


@pytest.mark.parametrize("bits,group,sym", CONFIGS, ids=str)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_w8a8_is_bit_identical_to_the_cpu(bits, group, sym, m):
    """Exact integer dot products and the CPU's float epilogue: the same bits on both devices (both the dp4a tile
    kernel and, for per-channel int8 with M > 16, cuBLASLt's int8 GEMM)."""
    g = torch.Generator().manual_seed(bits * 100 + group + m)
    k, n = 300, 72
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    codes, scales, zeros = quantize_weight(w, bits, group, sym)
    want = quantized_linear(x, codes, scales, zeros, bits, group, k, 8, b)
    got = quantized_linear(*_cuda(x, codes, scales, zeros), bits, group, k, 8, b.cuda())
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("bits,group,sym", CONFIGS, ids=str)
def test_quantize_weight_is_bit_identical_to_the_cpu(bits, group, sym):
    w = torch.randn(37, 333) * torch.logspace(-3, 3, 333)
    for a, b in zip(quantize_weight(w.cuda(), bits, group, sym), quantize_weight(w, bits, group, sym)):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("act_bits", [8, 16])
def test_non_contiguous_and_expanded_weights(act_bits):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(20, 256, generator=g).cuda(), torch.randn(48, 256, generator=g).cuda()
    codes, scales, zeros = quantize_weight(w, 4, 64, True)
    want = quantized_linear(x, codes, scales, zeros, 4, 64, 256, act_bits)
    wide = torch.zeros(48, codes.shape[1] + 7, dtype=codes.dtype, device="cuda")
    wide[:, 3 : 3 + codes.shape[1]] = codes
    strided_codes = wide[:, 3 : 3 + codes.shape[1]]  # not contiguous, and starting at an odd byte
    expanded_zeros = zeros[:1].expand_as(zeros)  # stride 0: reads past 1 row's storage if taken as contiguous
    assert torch.equal(zeros, expanded_zeros)  # symmetric: one zero point everywhere
    scales_t = scales.t().contiguous().t()
    got = quantized_linear(x, strided_codes, scales_t, expanded_zeros, 4, 64, 256, act_bits)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 40])
def test_low_precision_activations_with_int4_weights_multiply_in_float32(dtype, m):
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 512, generator=g).to(dtype), torch.randn(96, 512, generator=g)
    codes, scales, zeros = quantize_weight(w, 4, 128, False)
    want = (x.float() @ qref.dequantize_weight(codes, scales, zeros, 4, 128, 512).t()).to(dtype)
    got = quantized_linear(*_cuda(x, codes, scales, zeros), 4, 128, 512, 16)
    cpu = quantized_linear(x, codes, scales, zeros, 4, 128, 512, 16)
    assert got.dtype == dtype
    _close(got, want, 1e-2 if dtype == torch.bfloat16 else 2e-3)
    # float32 products: at most one rounding step of the output dtype away from the CPU
    assert ((got.cpu().float() - cpu.float()).abs() <= torch.finfo(dtype).eps * cpu.float().abs() * 2 + 1e-6).all()


def test_non_finite_activation_rows_propagate_as_in_float():
    w = torch.randn(8, 64)
    codes, scales, zeros = quantize_weight(w, 8, 0, True)
    x = torch.randn(3, 64)
    x[1, 5], x[2, 3] = float("nan"), float("inf")
    want = quantized_linear(x, codes, scales, zeros, 8, 0, 64, 8)
    got = quantized_linear(*_cuda(x, codes, scales, zeros), 8, 0, 64, 8).cpu()
    assert torch.equal(got[0], want[0]) and torch.isnan(got[1]).all()
    torch.testing.assert_close(got[2], want[2], equal_nan=True)


# ------------------------------------------------------------------------------------------------------------ fp8
def _fp8_operands(m, k, n, mode, col_major_b=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    if mode == "tensor":
        (a, sa), (b, sb) = quantize_fp8(x), quantize_fp8(w)
    elif mode == "row":
        a, sa = quantize_fp8(x, torch.float8_e4m3fn, "row")
        bt, sbt = quantize_fp8(w.t().contiguous(), torch.float8_e4m3fn, "row")
        b, sb = bt.t(), sbt.t()
    else:
        a, sa = quantize_fp8(x, torch.float8_e4m3fn, "group")
        b, sb = quantize_fp8(w, torch.float8_e4m3fn, "block")
    if col_major_b:
        b = b.t().contiguous().t()
    return a, b, sa, sb


@pytest.mark.parametrize("mode", ["tensor", "row", "block"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 512), (3, 640, 384), (129, 1024, 256), (64, 300, 100)], ids=str)
@pytest.mark.parametrize("col_major_b", [False, True])
@pytest.mark.parametrize(
    "out_dtype,bias_dtype",
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
    ids=str,
)
def test_fp8_matmul_any_m_and_bias_added_in_float(mode, m, k, n, col_major_b, out_dtype, bias_dtype):
    a, b, sa, sb = _fp8_operands(m, k, n, mode, col_major_b)
    bias = (torch.randn(n) * 10).to(bias_dtype)
    want = fp8_matmul(a, b, sa, sb, bias, out_dtype)
    got = fp8_matmul(*_cuda(a, b, sa, sb), bias.cuda(), out_dtype)
    assert got.shape == (m, n) and got.dtype == out_dtype and got.is_contiguous()
    # float32 accumulation in another order, then one rounding of the output dtype (the bias added before it)
    tol = 4 * k * 2.0**-24 * 8 + 2 * torch.finfo(out_dtype).eps
    scale = want.float().abs().max().item() + 1
    assert (got.cpu().float() - want.float()).abs().max().item() <= tol * scale


def test_fp8_block_scaling_needs_no_full_size_float_temporaries():
    a, b, sa, sb = _fp8_operands(2048, 7168, 4096, "block")
    a, b, sa, sb = _cuda(a, b, sa, sb)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fp8_matmul(a, b, sa, sb, None, torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full = 4 * (2048 * 7168 + 7168 * 4096)  # float32 copies of both operands
    print(f"peak extra memory {extra / 2**20:.1f} MiB; full-size float operands would take {full / 2**20:.1f} MiB")
    assert extra < full / 2


def test_non_finite_scales_are_checked_on_cuda_only_in_debug_mode(monkeypatch):
    a, b, sa, sb = _cuda(*_fp8_operands(16, 64, 32, "tensor"))
    bad = torch.tensor(float("inf"), device="cuda")
    monkeypatch.setenv("DEEPSEEK_EXT_DEBUG_CHECKS", "0")
    fp8_matmul(a, b, bad, sb)  # no value check, no synchronisation
    monkeypatch.setenv("DEEPSEEK_EXT_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="must be finite"):
        fp8_matmul(a, b, bad, sb)
    q, k, v, cu_q, cu_k = _varlen([3, 4], [3, 4], 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="to end at the number of tokens"):
        fused_attention_varlen(*_cuda(q, k, v), cu_q.cuda() * 2, cu_k.cuda())
    w = torch.randn(4, 64, device="cuda")
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="w has non-finite values"):
        quantize_weight(w, 8, 0, True)
    codes, scales, zeros = quantize_weight(torch.randn(4, 64), 8, 0, True)
    with pytest.raises(ValueError, match="expected a finite, positive act_scale, but got 0"):
        quantized_linear(*_cuda(torch.randn(2, 64), codes, scales, zeros), 8, 0, 64, 8, None, torch.zeros(1).cuda())
    monkeypatch.setenv("DEEPSEEK_EXT_DEBUG_CHECKS", "0")
    quantize_weight(w, 8, 0, True)  # not checked: no synchronisation


# ---------------------------------------------------------------------------------------------------- amp, privacy
def test_unscale_many_tensors_and_norm_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(int(s), generator=gen).cuda() for s in torch.randint(1, 200000, (300,), generator=gen)]
    norms = []
    for _ in range(3):
        gs = [t.clone() for t in grads]
        norms.append(unscale_check_norm_(gs, torch.zeros(1, device="cuda"), torch.tensor([0.5], device="cuda")))
    assert norms[0].item() == norms[1].item() == norms[2].item()
    want = torch.sqrt(sum(((t * 0.5).double() ** 2).sum() for t in grads))
    torch.testing.assert_close(norms[0].double().cpu(), want.cpu(), rtol=1e-5, atol=0)


def test_dp_ops_float64_precision_wide_gradients_and_many_samples():
    g = torch.randn(70000, 3, dtype=torch.float64, device="cuda")  # samples > 65,535
    norms = per_sample_sq_norms(g)
    torch.testing.assert_close(norms, g.pow(2).sum(1), rtol=1e-12, atol=0)
    wide = torch.randn(3, 1 << 20, device="cuda")
    assert torch.equal(per_sample_sq_norms(wide), per_sample_sq_norms(wide))  # no float atomics: deterministic
    f = torch.rand(70000, device="cuda")
    out = clip_sum_noise(g, f, None, 1.0 / 3.0)
    want = (g * f.double().unsqueeze(1)).sum(0) / 3.0
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-11)


# --------------------------------------------------------------------------------- graph capture, no host syncs
def _every_op(state):
    """One call of every op on CUDA inputs (prepared in `state`); returns the outputs."""
    s = state
    outs = []
    outs += list(quantize_fp8(s["x"], torch.float8_e4m3fn, "block"))
    outs.append(dequantize_fp8(s["x8"], s["sx8"], "block", 128, torch.bfloat16))
    for mode in ("tensor", "row", "block"):
        a, b, sa, sb = s["fp8"][mode]
        outs.append(fp8_matmul(a, b, sa, sb, s["bias"], torch.bfloat16))
    outs += list(quantize_weight(s["w"], 4, 64, True))
    for act_bits in (8, 16):
        outs.append(quantized_linear(s["xq"], *s["packed"], 4, 64, 256, act_bits, s["bias"][:96]))
    outs.append(quantized_linear(s["xq"], *s["packed8"], 8, 0, 256, 8))
    grads = [t.clone() for t in s["grads"]]
    outs.append(unscale_check_norm_(grads, s["found"], s["inv"]))
    outs += grads
    outs.append(per_sample_sq_norms(s["ps"]))
    outs.append(clip_sum_noise(s["ps"], s["factors"], s["noise"], 0.5))
    q, k, v = s["qkv"]
    out, lse = torch.ops.deepseek_ext.fused_attention_fwd(q, k, v, None, 0.0, True, 0.2, None)
    outs += [out, lse, *torch.ops.deepseek_ext.fused_attention_bwd(out, q, k, v, out, lse, None, 0.0, True, 0.2, None)]
    qv, kv, vv, cu_q, cu_k = s["varlen"]
    out, lse = torch.ops.deepseek_ext.fused_attention_varlen_fwd(qv, kv, vv, cu_q, cu_k, 20, 20, True, 0.3)
    outs += [
        out,
        *torch.ops.deepseek_ext.fused_attention_varlen_bwd(out, qv, kv, vv, out, lse, cu_q, cu_k, 20, 20, True, 0.3),
    ]
    return outs


def _state():
    gen = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype).cuda()

    x = r(256, 384, dtype=torch.bfloat16)
    x8, sx8 = quantize_fp8(x, torch.float8_e4m3fn, "block")
    fp8 = {mode: _cuda(*_fp8_operands(48, 256, 128, mode, seed=i)) for i, mode in enumerate(("tensor", "row", "block"))}
    w = r(96, 256)
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device="cuda")
    return {
        "x": x,
        "x8": x8,
        "sx8": sx8,
        "fp8": fp8,
        "bias": r(128),
        "w": w,
        "xq": r(24, 256),
        "packed": quantize_weight(w, 4, 64, True),
        "packed8": quantize_weight(w, 8, 0, True),
        "grads": [r(1000), r(70001, dtype=torch.float16), r(33, 7, dtype=torch.bfloat16)],
        "found": torch.zeros(1, device="cuda"),
        "inv": torch.tensor([0.5], device="cuda"),
        "ps": r(6, 4, 5),
        "factors": torch.rand(6, generator=gen).cuda(),
        "noise": r(4, 5),
        "qkv": (
            r(2, 4, 40, 64, dtype=torch.bfloat16),
            r(2, 4, 40, 64, dtype=torch.bfloat16),
            r(2, 4, 40, 64, dtype=torch.bfloat16),
        ),
        "varlen": (r(20, 2, 32), r(20, 1, 32), r(20, 1, 32), cu, cu.clone()),
    }


def test_every_op_runs_without_host_synchronisation():
    state = _state()
    _every_op(state)  # warm-up: lazy initialisation (cuBLAS handles, function attributes) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _every_op(state)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_every_op_captures_in_a_cuda_graph():
    state = _state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = _every_op(state)  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _every_op(state)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype.is_floating_point and a.element_size() >= 2:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2, equal_nan=True)
        else:
            assert torch.equal(
                a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8) if b.element_size() == 1 else b
            )


# ------------------------------------------------------------------------------------------- sanitizer workload
def test_sanitizer_workload():
    """Every kernel once on small shapes (what gpu_check.sh runs under compute-sanitizer memcheck, racecheck and
    synccheck), checked loosely against the CPU so that a kernel that silently skipped its work fails here too."""
    state = _state()
    outs = _every_op(state)
    torch.cuda.synchronize()
    assert all(
        torch.isfinite(o.float()).all() or o.dtype == torch.uint8 for o in outs if o.dtype != torch.float8_e4m3fn
    )
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for d, mask in ((16, None), (72, "bool"), (128, "additive")):
            g = torch.Generator().manual_seed(d)
            q, k, v = (torch.randn(2, 2, 37, d, generator=g).to(dtype) for _ in range(3))
            m = None
            if mask == "bool":
                m = torch.rand(2, 1, 37, 37, generator=g) > 0.3
            elif mask == "additive":
                m = torch.randn(37, 37, generator=g).to(dtype)
            torch.manual_seed(0)
            out_cpu = fused_attention(q, k, v, attn_mask=m, dropout_p=0.1)
            qc, kc, vc = _cuda(q, k, v, grad=True)
            torch.manual_seed(0)
            out = fused_attention(qc, kc, vc, attn_mask=None if m is None else m.cuda(), dropout_p=0.1)
            out.sum().backward()
            _close(out, out_cpu, 2 * TOL[dtype])
