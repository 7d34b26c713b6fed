"""DifferentialPrivacy.wrap, the Poisson loader and the DP optimizer (deepseek_ext/privacy/engine.py, sampling.py,
optimizer.py, clipping.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deepseek_ext.ops import draw_seed, gaussian_noise
from deepseek_ext.privacy import (
    DifferentialPrivacy,
    PoissonDataLoader,
    PrivacyBudgetExceeded,
    register_clipping,
    register_norm_sampler,
)
from deepseek_ext.privacy.clipping import FlatClipping


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def inplace_model():  # an in-place activation right after the first layer, whose output is tapped
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))


def seq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 6), nn.LayerNorm(6), nn.Linear(6, 3))


def reference_clipped_mean(model, x, y, C, per_layer=False):
    """Hand-written DP-SGD without noise: per-sample grads by a loop, flat clipping, average."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        grads = [p.grad.clone() for p in params]
        if per_layer:
            bound = C / math.sqrt(len(params))
            grads = [g * min(1.0, bound / (g.norm().item() + 1e-6)) for g in grads]
        else:
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
            grads = [g * min(1.0, C / (norm + 1e-6)) for g in grads]
        total = [t + g for t, g in zip(total, grads)]
    model.zero_grad()
    return [t / len(x) for t in total]


@pytest.mark.parametrize("clipping", ["flat", "ghost", "per_layer"])
@pytest.mark.parametrize(
    "make,inputs",
    [
        (small_model, lambda: torch.randn(9, 6)),
        (inplace_model, lambda: torch.randn(9, 6)),
        (seq_model, lambda: torch.randint(0, 20, (9, 5))),
    ],
)
def test_clip_only_step_equals_hand_written_reference(clipping, make, inputs):
    x = inputs()
    y = torch.randint(0, 3, (9,))
    model = make()
    if x.dim() == 2 and not x.is_floating_point():  # sequence model: classify the mean over tokens
        model = nn.Sequential(model, Mean())
    reference = reference_clipped_mean(model, x, y, C=0.05, per_layer=clipping == "per_layer")
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, 0.05, clipping=clipping)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for b, p, r in zip(before, model.parameters(), reference):
        torch.testing.assert_close(b - p.detach(), r, rtol=1e-4, atol=1e-6)


class Mean(nn.Module):
    def forward(self, x):
        return x.mean(1)


def test_gradient_accumulation_with_virtual_steps():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = small_model()
    reference = reference_clipped_mean(model, x, y, C=0.1)
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, 0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:3]), y[:3], reduction="sum").div(3).backward()
    opt.virtual_step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[3:]), y[3:]).backward()
    opt.step()
    for b, p, r in zip(before, model.parameters(), reference):
        torch.testing.assert_close(b - p.detach(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clipping", ["flat", "ghost"])  # ghost: Linear weights' noise added into their GEMM sums
def test_dp_step_adds_gaussian_noise_and_divides_by_the_expected_batch_size(clipping):
    data = TensorDataset(torch.randn(200, 6), torch.randint(0, 3, (200,)))
    model = small_model()
    x, y = data.tensors[0][:13], data.tensors[1][:13]
    clean = reference_clipped_mean(model, x, y, C=0.5)
    gen = torch.Generator().manual_seed(7)
    dp = DifferentialPrivacy(
        epsilon=50.0, delta=1e-5, noise_multiplier=0.8, max_grad_norm=0.5, generator=gen, clipping=clipping
    )
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=1.0), model=model, sample_rate=0.1, dataset_size=200)
    state = gen.get_state()
    seed, offset, expected_noise = draw_seed(gen), 0, []
    for p in model.parameters():  # one seed per step, each parameter its own whole tiles of the stream
        expected_noise.append(gaussian_noise(p.shape, 0.8 * 0.5, seed, offset))
        offset += -(-p.numel() // 64) * 64
    gen.set_state(state)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for b, p, c, z in zip(before, model.parameters(), clean, expected_noise):
        expected = (c * 13 + z) / (0.1 * 200)  # clipped sum plus noise, over q * N
        torch.testing.assert_close(b - p.detach(), expected, rtol=1e-4, atol=1e-6)
    assert dp.steps == 1 and dp.epsilon_spent() > 0


def test_empirical_noise_std_matches_sigma_c():
    model = nn.Linear(50, 40)
    dp = DifferentialPrivacy(
        epsilon=1e6, delta=1e-5, noise_multiplier=1.3, max_grad_norm=2.0, generator=torch.Generator().manual_seed(0)
    )
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=1.0), model=model, sample_rate=0.01, dataset_size=1000)
    samples = []
    for _ in range(20):
        opt.zero_grad()
        opt.step()  # no examples this step: the gradient is the noise alone
        samples.append(model.weight.grad.flatten().clone())
    z = torch.cat(samples) * (0.01 * 1000)
    n = z.numel()
    expected = 1.3 * 2.0
    # The sample std of n Gaussians is within 5 standard errors (expected / sqrt(2n)) of the truth.
    assert abs(z.std().item() - expected) < 5 * expected / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 * expected / math.sqrt(n)


def test_noise_is_reproducible_under_manual_seed_and_the_generator():
    def run(**kwargs):
        model = nn.Linear(30, 20)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        dp = DifferentialPrivacy(epsilon=1e6, delta=1e-5, noise_multiplier=1.0, **kwargs)
        opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=1.0), model=model, sample_rate=0.1, dataset_size=100)
        for _ in range(2):
            opt.zero_grad()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(3)
    a = run()
    torch.manual_seed(3)
    b = run()
    torch.manual_seed(4)
    c = run()
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = run(generator=torch.Generator().manual_seed(5)), run(generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2) and not torch.equal(g1, a)
    # weight and bias draw disjoint ranges of the step's stream: no value repeats between them
    assert torch.unique(a).numel() == a.numel()


class DictData(Dataset):
    def __init__(self, n=60):
        self.x = torch.randn(n, 6)
        self.y = torch.randint(0, 3, (n,))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": int(self.y[i])}


def test_poisson_loader_varies_batches_and_empty_batches_flow_through():
    data = DictData()
    loader = DataLoader(data, batch_size=2)
    model = small_model()
    dp = DifferentialPrivacy(epsilon=1e4, delta=1e-5, noise_multiplier=1.0, generator=torch.Generator().manual_seed(1))
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, data_loader=loader)
    sizes = []
    for _ in range(3):
        for batch in dp.data_loader:  # Poisson-sampled, built from the caller's loader
            sizes.append(len(batch["label"]))
            opt.zero_grad()
            out = model(batch["x"])
            assert out.shape == (len(batch["label"]), 3)
            nn.functional.cross_entropy(out, batch["label"], reduction="sum").backward()
            opt.step()
    assert len(sizes) == 90 and 0 in sizes and len(set(sizes)) > 2
    assert dp.steps == 90 and all(torch.isfinite(p).all() for p in model.parameters())


def test_wrap_builds_a_poisson_loader_and_leaves_the_callers_loader_alone():
    data = DictData()

    def collate(batch):
        return {"x": torch.stack([b["x"] for b in batch]), "label": torch.tensor([b["label"] for b in batch])}

    loader = DataLoader(data, batch_size=6, shuffle=True, collate_fn=collate, pin_memory=False)
    model = small_model()
    dp = DifferentialPrivacy(epsilon=1e4, delta=1e-5, noise_multiplier=1.0, generator=torch.Generator().manual_seed(1))
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, data_loader=loader)
    assert loader.batch_size == 6 and type(loader.batch_sampler).__name__ == "BatchSampler"  # untouched
    assert isinstance(dp.data_loader, PoissonDataLoader) and dp.data_loader.dataset is data
    assert dp.data_loader.collate_fn.collate_fn is collate and dp.data_loader.num_workers == loader.num_workers
    assert dp.sample_rate == 0.1 and len(dp.data_loader) == 10
    batch = next(iter(dp.data_loader))
    nn.functional.cross_entropy(model(batch["x"]), batch["label"]).backward()
    opt.step()
    # A batch from the caller's own loader (not Poisson-sampled) is refused before anything changes.
    batch = next(iter(loader))
    opt.zero_grad()
    nn.functional.cross_entropy(model(batch["x"]), batch["label"]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"DPOptimizer.step\(\): no batch was drawn .* iterate dp.data_loader"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())) and dp.steps == 1


def test_the_poisson_loader_refuses_an_iterable_dataset():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(4)

    with pytest.raises(ValueError, match=r"PoissonDataLoader: expected a loader over a map-style dataset"):
        PoissonDataLoader(DataLoader(Stream(), batch_size=2), 0.5)


def test_clipping_names_are_checked_in_one_place():
    model = small_model()
    with pytest.raises(ValueError, match=r"DifferentialPrivacy: clipping must be 'flat', 'ghost' or 'per_layer', got"):
        DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, clipping="x")
    with pytest.raises(ValueError, match=r"clip_only: clipping must be 'flat', 'ghost' or 'per_layer', got 'x'"):
        DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=0.1), model, clipping="x")


def test_a_registered_norm_sampler_drives_ghost_clipping():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 6))

        def forward(self, x):
            return x * self.weight

    calls = []

    def scale_sum(module, activations, grad_outputs, factors):
        calls.append("sum")
        (x,), (g,) = activations, grad_outputs
        return {module.weight: (factors.view(-1, 1) * x * g).sum(0)}

    @register_norm_sampler(Scale, clipped_sum=scale_sum)
    def _(module, activations, grad_outputs):
        calls.append("norm")
        (x,), (g,) = activations, grad_outputs
        return {module.weight: (x * g).pow(2).sum(1)}

    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    steps = {}
    for clipping in ("flat", "ghost"):
        torch.manual_seed(0)
        model = nn.Sequential(Scale(), nn.Linear(6, 3))
        opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model, 0.1, clipping=clipping)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        steps[clipping] = [p.detach().clone() for p in model.parameters()]
    assert calls == ["norm", "sum"]  # flat materialised (torch.func); ghost used the rule
    for a, b in zip(steps["flat"], steps["ghost"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_registered_clipping_strategy_is_chosen_by_name():
    @register_clipping
    class Unbounded(FlatClipping):  # clip factors all 1: the plain mean gradient
        name = "unbounded-test"

        def bound(self, batch, group):
            return math.inf

    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    model = small_model()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=0.1), model, clipping="unbounded-test")
    assert isinstance(opt.clipping, Unbounded)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_refuses_to_step_past_the_budget_and_leaves_the_model_alone():
    data = TensorDataset(torch.randn(1000, 6), torch.randint(0, 3, (1000,)))
    loader = DataLoader(data, batch_size=10)
    model = small_model()
    dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, data_loader=loader)
    with pytest.raises(PrivacyBudgetExceeded, match=r"would exceed epsilon=1.0 .*the model was left unchanged"):
        for _ in range(1000):
            for x, y in dp.data_loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                before = [p.detach().clone() for p in model.parameters()]
                opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert dp.epsilon_spent() <= 1.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_multiplier_from_epochs_meets_the_budget(accountant):
    data = TensorDataset(torch.randn(500, 6), torch.randint(0, 3, (500,)))
    loader = DataLoader(data, batch_size=50)
    model = small_model()
    dp = DifferentialPrivacy(epsilon=2.0, delta=1e-5, noise_multiplier=None, epochs=3, accountant=accountant)
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, data_loader=loader)
    assert dp.noise_multiplier > 0
    for _ in range(3):
        for x, y in dp.data_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert dp.steps == 30 and 1.8 < dp.epsilon_spent() <= 2.0


def test_secure_rng_noise_has_the_right_scale():
    model = nn.Linear(40, 50)
    dp = DifferentialPrivacy(epsilon=1e6, delta=1e-5, noise_multiplier=2.0, secure_rng=True)
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=1.0), model=model, sample_rate=0.1, dataset_size=10)
    opt.step()
    z = model.weight.grad.flatten() * 1.0
    assert abs(z.std().item() - 2.0) < 0.3


def test_unsupported_layer_error_names_it_and_says_how_to_register():
    class Stubborn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.w * float(x.sum().item() > 0)  # data-dependent Python control flow: vmap cannot

    model = nn.Sequential(Stubborn(), nn.Linear(6, 3))
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=0.1), model)
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    with pytest.raises(RuntimeError, match=r"module '0' \(Stubborn\).*register_grad_sampler\(Stubborn\)"):
        opt.step()


def test_bad_input():
    with pytest.raises(ValueError, match="expected epsilon to be positive"):
        DifferentialPrivacy(epsilon=0.0, delta=1e-5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"expected delta to be in \(0, 1\)"):
        DifferentialPrivacy(epsilon=1.0, delta=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier=None with epochs="):
        DifferentialPrivacy(epsilon=1.0, delta=1e-5)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="GroupNorm"):
        dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sample_rate=0.1, dataset_size=100)
    model = small_model()
    dp = DifferentialPrivacy(epsilon=1e-3, delta=1e-5, noise_multiplier=0.1)
    with pytest.raises(ValueError, match="cannot be met even for one step"):
        dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sample_rate=0.5, dataset_size=100)
    dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=2.0)
    opt = dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sample_rate=0.1, dataset_size=100)
    with pytest.raises(RuntimeError, match="already called"):
        dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sample_rate=0.1, dataset_size=100)
    with pytest.raises(RuntimeError, match="already wrapped"):
        DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0).wrap(
            opt, model=model, sample_rate=0.1, dataset_size=100
        )
    with pytest.raises(ValueError, match="not the model's"):
        DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0).wrap(
            torch.optim.SGD(small_model().parameters(), lr=0.1),
            model=nn.Linear(2, 2),
            sample_rate=0.1,
            dataset_size=100,
        )


def test_lr_scheduler_accepts_the_wrapped_optimizer():
    model = small_model()
    opt = DifferentialPrivacy.clip_only(torch.optim.SGD(model.parameters(), lr=1.0), model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


# ------------------------------------------------------------------------------------------ reliability (issue 16)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_noise_multiplier_is_refused_instead_of_hanging_the_accountant(value):
    with pytest.raises(ValueError, match=r"DifferentialPrivacy: expected noise_multiplier to be non-negative and fin"):
        DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=value)


@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -1.0])
def test_max_grad_norm_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match=r"expected max_grad_norm to be positive and finite"):
        DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=value)
    with pytest.raises(ValueError, match=r"clip_only: expected max_grad_norm to be positive and finite"):
        DifferentialPrivacy.clip_only(torch.optim.SGD(small_model().parameters(), lr=0.1), small_model(), value)


@pytest.mark.parametrize("kwargs", [dict(epsilon=math.nan), dict(delta=math.nan), dict(epochs=math.inf)])
def test_other_non_finite_arguments_are_refused(kwargs):
    args = dict(epsilon=1.0, delta=1e-5, noise_multiplier=None, epochs=1.0) | kwargs
    with pytest.raises(ValueError, match=r"DifferentialPrivacy: expected (epsilon|delta|epochs) to be"):
        DifferentialPrivacy(**args)
    with pytest.raises(TypeError, match="expected epsilon to be a number"):
        DifferentialPrivacy(epsilon="1", delta=1e-5, noise_multiplier=1.0)


def test_wrap_over_an_empty_dataset_is_a_clear_error():
    model = small_model()
    loader = DataLoader(TensorDataset(torch.empty(0, 6), torch.empty(0, dtype=torch.long)), batch_size=4)
    dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"wrap\(\): expected a non-empty dataset in data_loader, but it has 0"):
        dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, data_loader=loader)
    with pytest.raises(ValueError, match=r"wrap\(\): expected dataset_size >= 1, but got 0"):
        dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sample_rate=0.1, dataset_size=0)
    with pytest.raises(ValueError, match=r"PoissonBatchSampler: expected sample_rate to be in \(0, 1\], but got 0"):
        from deepseek_ext.privacy.engine import PoissonBatchSampler

        PoissonBatchSampler(10, 0.0)


@pytest.mark.parametrize("sigma", [1e200, 1.7e308])
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_huge_noise_multipliers_account_as_no_privacy_loss(sigma, accountant):
    model = small_model()
    dp = DifferentialPrivacy(epsilon=1.0, delta=1e-5, noise_multiplier=sigma, accountant=accountant)
    dp.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model, sample_rate=0.1, dataset_size=100)
    eps = dp.accountant.get_epsilon(1e-5, [(sigma, 0.1, 1000)])
    assert 0.0 <= eps < 0.2  # no loss from the mechanism (RDP's conversion alone leaves ~0.1 at this delta)


def test_the_accountant_refuses_non_finite_mechanisms():
    from deepseek_ext.privacy.accountants import RDPAccountant

    for sigma, q in [(math.nan, 0.1), (math.inf, 0.1), (1.0, math.nan), (1.0, 1.5)]:
        with pytest.raises(ValueError, match=r"RDPAccountant.step: expected (a finite noise_multiplier|sample_rate)"):
            RDPAccountant().step(sigma, q)
