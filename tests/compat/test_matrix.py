"""The compatibility matrix: every feature on every stock transformers architecture of tests/compat/models.py (tiny
configs, random weights, nothing downloaded), each against the stock PyTorch / transformers path.

Per architecture:

* ``use_fused_attention()``: forward and backward of a training batch, left/right padding, greedy ``generate()``,
  all equal to stock SDPA, with the fused kernels actually called (T5's training passes a position bias that needs
  gradients, so it runs SDPA with the documented one-time warning);
* ``Quantizer`` W8A8: logits SQNR, every Linear / Conv1D either quantized or listed in ``fallbacks``, a model no
  larger than the float one, and a state_dict round trip into a differently initialised copy;
* ``DifferentialPrivacy.clip_only``, in each clipping mode: one step equals the clipped mean of per-example gradients
  computed one example at a time, and the same step with explicit per-example position ids where the model shares
  them across the batch (stock BERT and GPT-2 build them as ``(1, seq)``); flat clipping also equals Opacus's
  per-sample gradients clipped, where Opacus runs;
* ``AutoMixedPrecision`` (bf16) and ``convert_to_fp8``: a few training steps with finite, falling losses.

Models are built once per architecture and copied where a test changes them; the module runs on one thread. With
``--slow``: bf16 attention as well and more training steps.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import deepseek_ext.ops.attention as attention_ops  # noqa: E402
from deepseek_ext.amp import AutoMixedPrecision  # noqa: E402
from deepseek_ext.nn import convert_to_fp8, use_fused_attention  # noqa: E402
from deepseek_ext.nn.fp8 import FP8Conv1D, FP8Linear  # noqa: E402
from deepseek_ext.privacy import DifferentialPrivacy  # noqa: E402
from deepseek_ext.quant import QuantConfig, Quantizer  # noqa: E402
from deepseek_ext.quant.modules import _QuantizedWeight  # noqa: E402

from .models import ARCHITECTURES, BATCH, build  # noqa: E402

# Opacus computes per-sample gradients of these (with explicit per-example position ids); on the others it fails
# (buffers in trainable layers: Gemma; keyword-only integer inputs: OPT, BART; views modified in place: Falcon) or
# returns batch-shared gradients (DistilBERT's positions, T5's relative attention bias).
OPACUS_RUNS = (
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt_neox", "starcoder2", "bert", "roberta", "vit",
    "whisper",
)  # fmt: skip
# T5's relative attention bias is computed from positions without any batch dimension: DP refuses it by name.
DP_FROZEN = {"t5": "relative_attention_bias"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has two cores
    yield
    torch.set_num_threads(threads)


_BUILT: dict = {}


def arch_of(name: str):
    """The architecture's shared model (built once; copy it before changing it)."""
    if name not in _BUILT:
        _BUILT[name] = build(name)
    return _BUILT[name]


def fresh(name: str) -> torch.nn.Module:
    return copy.deepcopy(arch_of(name).model)


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _grads(model: torch.nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    original = attention_ops._call_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "_call_forward", counting)
    return calls


# ------------------------------------------------------------------------------------------------ fused attention
def _padded(arch, side: str, labels: bool = True) -> dict:
    """The training batch with the last example two tokens shorter, padded on ``side`` (labels give encoder-decoder
    models their decoder inputs; ``generate`` takes none)."""
    x = {k: v for k, v in arch.inputs(0).items() if labels or k != "labels"}
    if "attention_mask" not in x:
        return x
    mask = torch.ones_like(x["input_ids"])
    if side == "left":
        mask[-1, :2] = 0
    else:
        mask[-1, -2:] = 0
    x["attention_mask"] = mask
    x["input_ids"] = x["input_ids"].masked_fill(mask == 0, 0)
    return x


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fused_attention_matches_stock(name, monkeypatch, request):
    arch = arch_of(name)
    model = fresh(name).train()
    batch = arch.inputs(0)
    calls = _count_kernel_calls(monkeypatch)
    attention_ops._warned.clear()

    ref = model(**batch)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with use_fused_attention():
            out = model(**batch)
            out.loss.backward()
    fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
    if name == "t5":  # trainable relative position bias -> mask that requires grad -> SDPA, warned once
        assert len(fallbacks) == 1 and "attn_mask requires grad" in fallbacks[0]
    else:
        assert not fallbacks and calls, "the fused kernels did not run"
    assert _rel(out.logits, ref.logits) < 1e-5
    _assert_grads_close(_grads(model), ref_grads)

    # Padding on either side (the padded positions' outputs are arbitrary in both), in eval mode.
    model.eval()
    calls.clear()
    with torch.no_grad():
        for side in ("left", "right"):
            x = _padded(arch, side)
            want = model(**x).logits
            with use_fused_attention():
                got = model(**x).logits
            if "attention_mask" in x and arch.kind == "causal":
                keep = x["attention_mask"].bool()
                want, got = want[keep], got[keep]
            assert _rel(got, want) < 1e-5, side
    assert calls

    if arch.generates:  # greedy decoding, left-padded prompts for decoder-only models
        x = _padded(arch, "left" if arch.kind == "causal" else "right", labels=False)
        want = model.generate(**x, max_new_tokens=4, do_sample=False)
        with use_fused_attention():
            got = model.generate(**x, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, want)

    if request.config.getoption("--slow"):  # bf16: both paths in bf16, compared in their own precision
        model16 = copy.deepcopy(model).to(torch.bfloat16).train()
        batch16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
        want = model16(**batch16).logits.float()
        with use_fused_attention():
            got = model16(**batch16).logits.float()
        assert _rel(got, want) < 3e-2


# ------------------------------------------------------------------------------------------------------ Quantizer
def _weight_layers(model: torch.nn.Module) -> list[str]:
    conv1d = _conv1d_type()
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, conv1d))]


def _size(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_quantizer_w8a8_logits_fallbacks_and_state_dict(name):
    arch = arch_of(name)
    float_model = arch.model
    batch = arch.inputs(0)
    config = QuantConfig(weight_bits=8, activation_bits=8)
    quantizer = Quantizer(float_model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = quantizer.quantize().eval()
    warned = [str(w.message) for w in caught if str(w.message).startswith("Quantizer:")]
    modules = dict(qmodel.named_modules())
    for layer in _weight_layers(float_model):  # every weight layer: quantized, or float and said so
        assert isinstance(modules[layer], _QuantizedWeight) or layer in quantizer.fallbacks, layer
    assert len(warned) == (1 if quantizer.fallbacks else 0)
    for layer in quantizer.fallbacks:
        assert layer in warned[0]
    # tied LM head and embedding: both float (no float copy next to codes); the model is never larger
    assert _size(qmodel) <= _size(float_model)

    rows = quantizer.compare(qmodel, batch, print_table=False)
    assert {r.name for r in rows[:-1]} == set(_weight_layers(float_model))
    assert rows[-1].sqnr_db > 20, rows[-1]

    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    other = Quantizer(build(name, seed=1).model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = other.quantize().eval()
    buffer.seek(0)
    loaded.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, qmodel(**batch).logits)


# ----------------------------------------------------------------------------------------- differential privacy
def _dp_model(name: str) -> torch.nn.Module:
    model = fresh(name).train()
    frozen = DP_FROZEN.get(name)
    for n, p in model.named_parameters():
        if frozen is not None and frozen in n:
            p.requires_grad_(False)
    return model


def _example(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


def _per_example_grads(model, batch) -> list[dict]:
    """Each example's gradient, one example at a time (the definition DP-SGD clips)."""
    out = []
    for i in range(BATCH):
        model.zero_grad()
        model(**_example(batch, i)).loss.backward()
        out.append(_grads(model))
    model.zero_grad()
    return out


def _clipped_mean(per_example: list[dict], max_norm: float, per_layer: bool = False) -> dict:
    names = per_example[0].keys()
    if per_layer:
        bound = max_norm / len(names) ** 0.5
        return {
            n: sum(g[n] * min(1.0, bound / (g[n].norm().item() + 1e-6)) for g in per_example) / len(per_example)
            for n in names
        }
    norms = [sum(g[n].double().pow(2).sum() for n in names).sqrt().item() for g in per_example]
    factors = [min(1.0, max_norm / (v + 1e-6)) for v in norms]
    return {n: sum(f * g[n] for f, g in zip(factors, per_example)) / len(per_example) for n in names}


def _dp_step(model, batch, max_norm: float, clipping: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DifferentialPrivacy.clip_only(
        torch.optim.SGD(params, lr=0.0), model, max_grad_norm=max_norm, clipping=clipping
    )
    try:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        return _grads(model)
    finally:
        optimizer.capture.remove()
        model.zero_grad()


def _assert_grads_close(got: dict, want: dict, tol: float = 1e-4) -> None:
    """Each gradient within ``tol`` relative error; gradients that are zero in exact arithmetic (the bias of a key
    projection) are held to ``tol`` times a thousandth of the model's gradient norm instead."""
    assert got.keys() == want.keys()
    floor = 1e-3 * sum(w.double().pow(2).sum() for w in want.values()).sqrt().item()
    for n in want:
        err = (got[n].double() - want[n].double()).norm().item()
        assert err <= tol * max(want[n].double().norm().item(), floor), (n, err)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_dp_clip_only_step_equals_per_example_clipping(name):
    arch = arch_of(name)
    model = _dp_model(name)
    batch = arch.inputs(0)
    per_example = _per_example_grads(model, batch)
    norms = sorted(sum(g.double().pow(2).sum() for g in e.values()).sqrt().item() for e in per_example)
    max_norm = norms[len(norms) // 2]  # some examples clipped, some not
    want = _clipped_mean(per_example, max_norm)
    for clipping in ("flat", "ghost", "per_layer"):
        got = _dp_step(model, batch, max_norm, clipping)
        _assert_grads_close(got, want if clipping != "per_layer" else _clipped_mean(per_example, max_norm, True))
        if arch.explicit_positions is not None:  # the same step with every example's own position ids
            explicit = {**batch, **arch.explicit_positions(batch)}
            _assert_grads_close(got, _dp_step(model, explicit, max_norm, clipping), 1e-5)
    if name in OPACUS_RUNS:
        _assert_grads_close(_opacus_clipped_mean(name, batch, max_norm), want)


def _opacus_clipped_mean(name: str, batch: dict, max_norm: float) -> dict:
    from opacus import GradSampleModule

    arch = arch_of(name)
    model = _dp_model(name)
    if arch.explicit_positions is not None:  # Opacus needs every input per example
        batch = {**batch, **arch.explicit_positions(batch)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        wrapped(**batch).loss.backward()
    samples = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
    wrapped._close()
    return _clipped_mean([{n: g[i] for n, g in samples.items()} for i in range(BATCH)], max_norm)


def test_dp_refuses_t5_relative_attention_bias_by_name():
    model = fresh("t5").train()
    optimizer = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=0.0), model)
    bias = r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias"
    with pytest.raises(ValueError, match=f"module '{bias}' .* cannot be split into per-example gradients"):
        model(**arch_of("t5").inputs(0))
    optimizer.capture.remove()


# --------------------------------------------------------------------------------------------------- AMP and FP8
def _train(model, batch, steps: int, step_fn) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = step_fn(model, batch)
        losses.append(loss)
    return losses


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_amp_and_fp8_train(name, request):
    arch = arch_of(name)
    batch = arch.inputs(0)
    steps = 12 if request.config.getoption("--slow") else 4

    model = fresh(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    amp = AutoMixedPrecision(optimizer, model=model, default_dtype=torch.bfloat16)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        amp.backward(loss)
        amp.step()
        losses.append(loss.item())
    amp.detach()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses

    model = fresh(name).train()
    with torch.no_grad():
        want = model(**batch).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_to_fp8(model, granularity="row")
    warned = " ".join(str(w.message) for w in caught if "convert_to_fp8" in str(w.message))
    fp8_layers = (FP8Linear, FP8Conv1D)
    for n, m in model.named_modules():  # every Linear / Conv1D in FP8, or named in the warning
        if isinstance(m, (torch.nn.Linear, _conv1d_type())) and not isinstance(m, fp8_layers):
            assert f"{n}:" in warned, n
    assert any(isinstance(m, fp8_layers) for m in model.modules())
    with torch.no_grad():
        assert _rel(model(**batch).logits, want) < 0.15
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
