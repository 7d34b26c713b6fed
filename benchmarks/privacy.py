"""DP-SGD step time and peak memory: ours against Opacus (same clipping mode) and against non-private training, on
an MLP, a small CNN (CIFAR-sized inputs) and a 2-layer 128-wide transformer encoder (seq 128), batch 256, and on
two bigger models, batch 32: a 6-layer 512-wide transformer encoder (seq 128) and a ResNet-18-style CNN with
GroupNorm (CIFAR-sized inputs). And the noise: ``gaussian_noise`` against ``torch.normal`` (new tensors),
``gaussian_noise_`` against ``Tensor.normal_`` (existing tensors), and ``clip_sum_noise`` with the noise generated
inside against ``torch.normal`` followed by ``clip_sum_noise`` with that tensor.

Peak memory is each configuration's peak resident set size, measured in a fresh subprocess
(``python -m benchmarks.privacy MODEL MODE``), so the modes do not share an allocator's high-water mark; the
memory a mode adds to non-private training is also given per example (bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks import runner
from benchmarks.runner import Case
from deepseek_ext.ops import clip_sum_noise, draw_seed, gaussian_noise, gaussian_noise_

MODELS = ["mlp", "cnn", "transformer", "transformer6", "resnet18"]
BATCH = {"mlp": 256, "cnn": 256, "transformer": 256, "transformer6": 32, "resnet18": 32}
SAMPLE_RATE = 0.01


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, max(4, d // 64))
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    def __init__(self, vocab=1000, d=128, layers=2, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)).mean(1))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a skip connection, GroupNorm in place of BatchNorm."""

    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.GroupNorm(32, o)
        self.conv2, self.gn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.GroupNorm(32, o)
        self.skip = nn.Sequential()
        if stride != 1 or i != o:
            self.skip = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.GroupNorm(32, o))

    def forward(self, x):
        y = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(y)) + self.skip(x))


def resnet18(classes: int = 10) -> nn.Module:
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(32, 64), nn.ReLU()]
    width = 64
    for o, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(width, o, stride), BasicBlock(o, o, 1)]
        width = o
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def build(name: str):
    torch.manual_seed(0)
    batch = BATCH[name]
    if name == "mlp":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    elif name == "cnn":

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.ReLU(), nn.MaxPool2d(2)]

        model = nn.Sequential(*conv(3, 32), *conv(32, 64), *conv(64, 128), nn.Flatten(), nn.Linear(128 * 16, 10))
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    elif name == "resnet18":
        model = resnet18()
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    elif name in ("transformer", "transformer6"):
        model = Encoder() if name == "transformer" else Encoder(d=512, layers=6)
        x, y = torch.randint(0, 1000, (batch, 128)), torch.randint(0, 2, (batch,))
    else:
        raise ValueError(f"benchmarks.privacy: unknown model {name!r}; expected one of {MODELS}")
    return model, x, y


def make_step(name: str, mode: str):
    """mode: nonprivate | ours-flat | ours-ghost | opacus-flat | opacus-ghost"""
    model, x, y = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    if mode.startswith("ours"):
        from deepseek_ext.privacy import DifferentialPrivacy

        dp = DifferentialPrivacy(
            epsilon=1e9, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, clipping=mode.split("-")[1]
        )
        opt = dp.wrap(opt, model=model, sample_rate=SAMPLE_RATE, dataset_size=round(len(x) / SAMPLE_RATE))
    elif mode.startswith("opacus"):
        import warnings

        from opacus import PrivacyEngine

        warnings.filterwarnings("ignore")
        data = torch.utils.data.TensorDataset(x.repeat(2, *([1] * (x.dim() - 1))), y.repeat(2))
        loader = torch.utils.data.DataLoader(data, batch_size=len(x))
        engine = PrivacyEngine()
        out = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            criterion=loss_fn,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost" if mode.endswith("ghost") else "hooks",
        )
        model, opt = out[0], out[1]
        if mode.endswith("ghost"):
            loss_fn = out[2]

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def peak_rss_mb(name: str, mode: str) -> float:
    """Peak RSS of a fresh process that builds the configuration and runs three steps."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.privacy", name, mode], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


NOISE_SIZES = [10**6, 10**7]  # values; 10^7 is about a 10M-parameter model's noise per step
NOISE_REDUCTIONS = [(8, 2**20), (64, 100_000)]  # (samples, values per sample) of a clip_sum_noise call


def _check_normal(z: torch.Tensor, std: float) -> None:
    z = z.double().flatten()
    n = z.numel()
    if abs(z.mean().item()) > 6 * std / n**0.5 or abs(z.std().item() / std - 1) > 6 * (2 / n) ** 0.5:
        raise AssertionError(f"noise with mean {z.mean().item():.4g} and std {z.std().item():.4g}, expected 0, {std}")


def noise_cases(device: str, quick: bool = False) -> list[Case]:
    """Generating Gaussian noise, like with like: into a fresh tensor (``gaussian_noise`` against ``torch.normal``)
    and into a tensor that already exists (``gaussian_noise_`` against ``Tensor.normal_``, as a DP step adds noise
    to the sums it holds); and the reduction with the noise fused in."""
    out = []
    threads = torch.get_num_threads()
    seed = draw_seed()
    for n in NOISE_SIZES[:1] if quick else NOISE_SIZES:
        # A fresh tensor over glibc's mmap threshold (32 MB) is new memory on every call: both sides pay its page
        # faults, timed alone as torch.empty(n).zero_() and reported next to the ratio.
        touch = runner.median_seconds(lambda n=n: torch.empty(n, device=device).zero_(), 0.3)
        out.append(
            Case(
                family="privacy",
                op="gaussian_noise",
                config=f"{n:.0e} float32 new tensor, {threads} thr",
                ours=lambda n=n: gaussian_noise((n,), 1.0, seed, device=device),
                baseline=lambda n=n: torch.normal(0.0, 1.0, (n,), device=device),
                baseline_name=f"torch.normal (first touch of the output: {touch * 1e3:.1f} ms)",
                check=lambda n=n: (
                    _check_normal(gaussian_noise((n,), 1.0, seed, device=device), 1.0),
                    _check_normal(torch.normal(0.0, 1.0, (n,), device=device), 1.0),
                ),
                extra={"first_touch_ms": touch * 1e3},
            )
        )
        buf = torch.zeros(n, device=device)
        out.append(
            Case(
                family="privacy",
                op="gaussian_noise_",
                config=f"{n:.0e} float32 in place, {threads} thr",
                ours=lambda buf=buf: gaussian_noise_(buf, 1.0, seed),
                baseline=lambda buf=buf: buf.normal_(0.0, 1.0),
                baseline_name="Tensor.normal_ (torch.normal(out=) takes the same path)",
                check=lambda buf=buf: (
                    _check_normal(gaussian_noise_(buf, 1.0, seed), 1.0),
                    _check_normal(buf.normal_(), 1.0),
                ),
            )
        )
    if not quick:  # a model's noise: 10^7 values as ten 10^6-value parameters, offsets apart in one stream
        n = NOISE_SIZES[-1] // 10
        out.append(
            Case(
                family="privacy",
                op="gaussian_noise",
                config=f"10 x {n:.0e} float32, {threads} threads",
                ours=lambda n=n: [gaussian_noise((n,), 1.0, seed, i * n, device=device) for i in range(10)],
                baseline=lambda n=n: [torch.normal(0.0, 1.0, (n,), device=device) for _ in range(10)],
                baseline_name="torch.normal",
            )
        )
    for samples, d in NOISE_REDUCTIONS[:1] if quick else NOISE_REDUCTIONS:
        g = torch.randn(samples, d, device=device)
        f = torch.rand(samples, device=device)

        def fused(g=g, f=f):
            return clip_sum_noise(g, f, None, 1 / 256, noise_std=1.5, seed=seed)

        def unfused(g=g, f=f):
            return clip_sum_noise(g, f, torch.normal(0.0, 1.5, g.shape[1:], device=device), 1 / 256)

        def check(g=g, f=f, fused=fused):
            noise = gaussian_noise(g.shape[1:], 1.5, seed, device=device)
            if not torch.equal(fused(), clip_sum_noise(g, f, noise, 1 / 256)):
                raise AssertionError("fused noise differs from the same noise passed as a tensor")
            _check_normal(clip_sum_noise(g[:0], f[:0], None, 1.0, noise_std=1.5, seed=seed), 1.5)

        out.append(
            Case(
                family="privacy",
                op="clip_sum_noise",
                config=f"{samples}x{d} noise fused, {threads} thr",
                ours=fused,
                baseline=unfused,
                baseline_name="torch.normal + clip_sum_noise(noise)",
                check=check,
            )
        )
    return out


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    try:
        import opacus  # noqa: F401
    except ImportError:
        opacus = None
    out = noise_cases(device, quick)
    for name in ["mlp"] if quick else MODELS:
        batch = BATCH[name]
        pairs = [("ours-ghost", "nonprivate", "non-private step")]
        if opacus is not None:
            pairs = [
                ("ours-flat", "opacus-flat", "Opacus hooks (flat)"),
                ("ours-ghost", "opacus-ghost", "Opacus ghost"),
            ] + pairs
        plain = None if quick else peak_rss_mb(name, "nonprivate")
        for ours, peer, label in pairs:
            extra = {}
            if not quick:
                mine, theirs = peak_rss_mb(name, ours), peak_rss_mb(name, peer)
                extra = {
                    "ours_peak_rss_mb": mine,
                    "peer_peak_rss_mb": theirs,
                    # memory added to non-private training, per example
                    "ours_bytes_per_example": (mine - plain) * 2**20 / batch,
                    "peer_bytes_per_example": (theirs - plain) * 2**20 / batch,
                }
                label = (
                    f"{label}; peak RSS {mine:.0f} vs {theirs:.0f} MB, "
                    f"+{extra['ours_bytes_per_example'] / 1024:.0f} vs +{extra['peer_bytes_per_example'] / 1024:.0f} "
                    "KiB/example over non-private"
                )
            out.append(
                Case(
                    family="privacy",
                    op="DP-SGD step",
                    config=f"{name} b{batch} {ours.split('-')[1]}",
                    ours=make_step(name, ours),
                    baseline=make_step(name, peer),
                    baseline_name=label,
                    extra=extra,
                )
            )
    return out


if __name__ == "__main__":  # worker for peak_rss_mb
    model_name, run_mode = sys.argv[1], sys.argv[2]
    fn = make_step(model_name, run_mode)
    for _ in range(3):
        fn()
    print(json.dumps({"peak_rss_mb": runner.peak_rss_mb()}))
