"""AutoMixedPrecision (deepseek_ext/amp/mixed_precision.py)."""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deepseek_ext.amp import AutoMixedPrecision

MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.matmul.default,
}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matmul, keyed by the innermost module running it."""

    def __init__(self, model):
        super().__init__()
        self.stack, self.seen = [], {}
        for name, m in model.named_modules():
            m.register_forward_pre_hook(lambda mod, args, name=name: self.stack.append(name))
            m.register_forward_hook(self._leave)

    def _leave(self, module, args, output):
        self.stack.pop()  # returns None, so the output is left alone

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS and self.stack:
            self.seen.setdefault(self.stack[-1], set()).add(out.dtype)
        return out


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def mlp(width=32, depth=4, classes=3):
    layers = OrderedDict()
    layers["layer"] = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)])
    layers["classifier"] = nn.Linear(width, classes)
    return nn.Sequential(layers)


def test_bert_groups_run_in_their_dtypes():
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters())
    amp = AutoMixedPrecision(opt, model=model, fp16_groups=[["layer.0", "layer.1"]], bf16_groups=["classifier"])
    recorder = MatmulDtypes(model)
    ids = torch.randint(0, 50, (4, 12))
    with recorder:
        out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]))
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, dtypes in recorder.seen.items():
        if name not in linears:  # e.g. SDPA's CPU math path, which autocast's policy keeps in float32
            continue
        expected = (
            torch.float16
            if ".layer.0." in name + "." or ".layer.1." in name + "."
            else torch.bfloat16
            if name == "classifier"
            else torch.float32
        )
        assert dtypes == {expected}, (name, dtypes)
    assert any(".layer.0." in n for n in recorder.seen) and "classifier" in recorder.seen
    plan = amp.plan(print_table=False)
    assert plan["bert.encoder.layer.1.output.dense"] == torch.float16
    assert plan["bert.encoder.layer.2.output.dense"] == torch.float32
    assert plan["classifier"] == torch.bfloat16
    amp.backward(out.loss)
    amp.step()
    assert not amp.last_step_skipped


def test_fp32_group_inside_a_bf16_default():
    model = mlp()
    amp = AutoMixedPrecision(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        fp32_groups=["classifier"],
        default_dtype=torch.bfloat16,
    )
    recorder = MatmulDtypes(model)
    with recorder:
        out = model(torch.randn(5, 32))
    assert out.dtype == torch.float32
    assert recorder.seen["classifier"] == {torch.float32}
    assert recorder.seen["layer.0.0"] == {torch.bfloat16}
    assert not amp.scaling


def test_plan_logs_regions_and_prints_only_when_asked(capsys, caplog):
    model = mlp()
    amp = AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer.1"])
    with caplog.at_level("INFO", logger="deepseek_ext.amp.mixed_precision"):
        plan = amp.plan()
    assert capsys.readouterr().out == ""
    assert "float16   layer.1" in caplog.text and "loss scaling on" in caplog.text
    assert plan["layer.1.0"] == torch.float16 and plan["layer.0.0"] == torch.float32
    amp.plan(print_table=True)
    printed = capsys.readouterr().out
    assert "float16   layer.1" in printed and "loss scaling on" in printed


def train(model, step_fn, steps, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, 32, generator=g)
        y = x[:, :3].argmax(1)
        losses.append(step_fn(x, y))
    return losses


def test_equivalent_to_autocast_and_gradscaler_with_one_group():
    torch.manual_seed(0)
    ref_model = mlp()
    model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A huge initial scale overflows fp16 at first, so both must back off the same way.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=5)
    amp = AutoMixedPrecision(
        opt, model=model, fp16_groups=[["layer", "classifier"]], init_scale=2.0**40, growth_interval=5
    )

    def ref_step(x, y):
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = ref_model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(ref_opt)
        scaler.update()
        return loss.item()

    def our_step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        amp.backward(loss)
        amp.step()
        return loss.item()

    ref = train(ref_model, ref_step, 30)
    ours = train(model, our_step, 30)
    assert ours == ref
    assert amp.get_scale() == scaler.get_scale()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_overflow_skips_the_step_and_backs_off_then_grows():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    amp = AutoMixedPrecision(opt, model=model, fp16_groups=["layer"], init_scale=1024.0, growth_interval=3)
    x, y = torch.randn(8, 32), torch.randint(0, 3, (8,))

    amp.backward(nn.functional.cross_entropy(model(x), y))
    amp.step()
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())

    amp.backward(nn.functional.cross_entropy(model(x), y))
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    amp.step()
    assert amp.last_step_skipped and amp.get_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert str(opt.state_dict()) == str(state)
    for _ in range(3):
        opt.zero_grad()
        amp.backward(nn.functional.cross_entropy(model(x), y))
        amp.step()
        assert not amp.last_step_skipped
    assert amp.get_scale() == 1024.0


def test_bf16_only_needs_no_scaling():
    model = mlp()
    amp = AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, bf16_groups=["layer"])
    assert not amp.scaling and amp.get_scale() == 1.0


def test_clip_grad_norm_works_on_unscaled_gradients():
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    amp = AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer"])
    x, y = torch.randn(8, 32), torch.randint(0, 3, (8,))
    amp.backward(nn.functional.cross_entropy(model(x), y))
    norm = amp.clip_grad_norm_(0.01)
    with torch.autocast("cpu", dtype=torch.float16):
        hidden = ref.layer(x)
    nn.functional.cross_entropy(ref.classifier(hidden.float()), y).backward()
    ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-3, atol=0)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-6)
    amp.step()


def test_gradient_accumulation_matches_gradscaler():
    torch.manual_seed(1)
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    amp = AutoMixedPrecision(opt, model=model, fp16_groups=[["layer", "classifier"]])
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        xs = [torch.randn(4, 32) for _ in range(2)]
        ys = [torch.randint(0, 3, (4,)) for _ in range(2)]
        for x, y in zip(xs, ys):
            amp.backward(nn.functional.cross_entropy(model(x), y) / 2)
            with torch.autocast("cpu", dtype=torch.float16):
                out = ref_model(x)
            scaler.scale(nn.functional.cross_entropy(out.float(), y) / 2).backward()
        amp.step()
        scaler.step(ref_opt)
        scaler.update()
        opt.zero_grad()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_resume_gives_the_same_trajectory():
    def make():
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        amp = AutoMixedPrecision(opt, model=model, fp16_groups=["layer"], init_scale=2.0**30, growth_interval=2)
        return model, opt, amp

    def step(model, opt, amp, x, y):
        opt.zero_grad()
        amp.backward(nn.functional.cross_entropy(model(x), y))
        amp.step()

    data = [(torch.randn(8, 32), torch.randint(0, 3, (8,))) for _ in range(10)]
    full = make()
    for x, y in data:
        step(*full, x, y)

    first = make()
    for x, y in data[:5]:
        step(*first, x, y)
    saved = (copy.deepcopy(first[0].state_dict()), copy.deepcopy(first[1].state_dict()), first[2].state_dict())
    resumed = make()
    resumed[0].load_state_dict(saved[0])
    resumed[1].load_state_dict(saved[1])
    resumed[2].load_state_dict(saved[2])
    for x, y in data[5:]:
        step(*resumed, x, y)
    assert resumed[2].get_scale() == full[2].get_scale()
    for a, b in zip(resumed[0].parameters(), full[0].parameters()):
        assert torch.equal(a, b)


def test_article_split_converges_like_fp32():
    def run(use_amp):
        torch.manual_seed(0)
        model = mlp(depth=4)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        amp = AutoMixedPrecision(opt, model=model, fp16_groups=[["layer.0", "layer.1"]], bf16_groups=["classifier"])
        if not use_amp:
            amp.detach()

        def step(x, y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if use_amp:
                amp.backward(loss)
                amp.step()
            else:
                loss.backward()
                opt.step()
            return loss.item()

        losses = train(model, step, 300, seed=1, batch=32)
        return sum(losses[-50:]) / 50

    fp32, mixed = run(False), run(True)
    print(f"final loss fp32 {fp32:.4f}, AutoMixedPrecision {mixed:.4f}")
    assert abs(mixed - fp32) <= 0.02 * fp32


def test_torch_compile():
    model = mlp()
    AutoMixedPrecision(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer.0"], bf16_groups=["classifier"]
    )
    x = torch.randn(6, 32)
    # Inductor fuses the low-precision regions differently, so compare at bf16 accuracy.
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=2e-2, atol=1e-3)


def test_bad_input():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"module 'layer.1.0' is matched by two groups"):
        AutoMixedPrecision(opt, model=model, fp16_groups=["layer.1"], bf16_groups=["layer.1.0"])
    with pytest.warns(UserWarning, match=r"bf16_groups\[0\] \['decoder'\] matches no module"):
        AutoMixedPrecision(opt, model=model, bf16_groups=["decoder"])
    with pytest.warns(UserWarning, match=r"patterns \['head'\] of fp16_groups\[0\] match no module"):
        AutoMixedPrecision(opt, model=model, fp16_groups=[["layer.0", "head"]])
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer's parameters are not parameters of the model"):
        AutoMixedPrecision(other, model=model)
    amp = AutoMixedPrecision(opt, fp16_groups=["layer"])
    with pytest.raises(RuntimeError, match="pass model= or call amp.attach"):
        amp.backward(model(torch.randn(2, 32)).sum())
    with pytest.raises(ValueError, match="default_dtype must be"):
        AutoMixedPrecision(opt, default_dtype=torch.float64)


def test_fp16_unavailable_falls_back_to_bf16(monkeypatch):
    import deepseek_ext.amp.mixed_precision as mp

    monkeypatch.setattr(mp, "_fp16_supported", lambda device: False)
    model = mlp()
    with pytest.warns(UserWarning, match="fp16 groups run in bfloat16 instead"):
        amp = AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer"])
    assert amp.plan(print_table=False)["layer.0.0"] == torch.bfloat16 and not amp.scaling
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp.detach()


# ------------------------------------------------------------------------------------------ reliability (issue 16)
def test_bf16_only_skips_steps_on_non_finite_gradients():
    """clip_grad_norm_'s docstring promises the step is skipped; without loss scaling it must be too."""
    for clip in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        amp = AutoMixedPrecision(opt, model=model, bf16_groups=["layer"])
        before = copy.deepcopy(model.state_dict())
        amp.backward(nn.functional.cross_entropy(model(torch.randn(4, 32)), torch.randint(0, 3, (4,))))
        next(model.parameters()).grad[0, 0] = float("nan")
        if clip:
            assert not math.isfinite(float(amp.clip_grad_norm_(1.0)))
        assert amp.step() is None and amp.last_step_skipped
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert amp.get_scale() == 1.0
        # A finite step afterwards goes through.
        opt.zero_grad()
        amp.backward(nn.functional.cross_entropy(model(torch.randn(4, 32)), torch.randint(0, 3, (4,))))
        amp.step()
        assert not amp.last_step_skipped


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("scale", -1.0, r"expected scale > 0"),
        ("scale", 0.0, r"expected scale > 0"),
        ("scale", float("inf"), r"expected scale to be finite"),
        ("scale", float("nan"), r"expected scale to be finite"),
        ("min_scale", 1e9, r"expected min_scale in \(0, scale="),
        ("growth_factor", 0.5, r"expected growth_factor > 1"),
        ("backoff_factor", 1.5, r"expected backoff_factor in \(0, 1\)"),
        ("growth_interval", 0, r"expected growth_interval >= 1"),
        ("growth_tracker", -3, r"expected growth_tracker in \[0, "),
        ("growth_interval", 2.5, r"expected growth_interval to be an integer"),
        ("scale", "big", r"expected scale to be a number"),
    ],
)
def test_load_state_dict_checks_every_field_before_changing_anything(field, value, match):
    model = mlp()
    amp = AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer"])
    good = amp.state_dict()
    state = dict(good, **{field: value})
    with pytest.raises((ValueError, TypeError), match=r"AutoMixedPrecision.load_state_dict: " + match):
        amp.load_state_dict(state)
    assert amp.state_dict() == good
    with pytest.raises(ValueError, match=r"lacks \['scale'\]"):
        amp.load_state_dict({k: v for k, v in good.items() if k != "scale"})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(init_scale=float("inf")), r"expected init_scale to be finite"),
        (dict(init_scale=float("nan")), r"expected init_scale to be finite"),
        (dict(min_scale=float("nan")), r"expected min_scale to be finite"),
        (dict(growth_factor=float("inf")), r"expected growth_factor to be finite"),
    ],
)
def test_non_finite_schedules_are_refused(kwargs, match):
    model = mlp()
    with pytest.raises(ValueError, match=r"AutoMixedPrecision: " + match):
        AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer"], **kwargs)


@pytest.mark.parametrize("max_norm", [float("nan"), -1.0])
def test_clip_grad_norm_refuses_a_bad_max_norm(max_norm):
    model = mlp()
    amp = AutoMixedPrecision(torch.optim.SGD(model.parameters(), lr=0.1), model=model, fp16_groups=["layer"])
    amp.backward(nn.functional.cross_entropy(model(torch.randn(4, 32)), torch.randint(0, 3, (4,))))
    with pytest.raises(ValueError, match=r"clip_grad_norm_: expected max_norm >= 0"):
        amp.clip_grad_norm_(max_norm)
