"""Plumbing shared by the example scripts: arguments, the output folder, results, plots, timing and small models.

Every example runs offline on a CPU: data ships inside scikit-learn (``load_digits``, ``load_breast_cancer``) or is
generated, models are built from code or configs with random or locally trained weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run (the CI smoke test and `make demo`)")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for results (JSON) and plots (PNG)")
    p.add_argument("--seed", type=int, default=0)
    return p


def save_results(out: Path, name: str, results: dict) -> Path:
    """Writes ``out/name.json`` and returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


def plot(
    out: Path, name: str, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], kind="line"
) -> Path | None:
    """One PNG with a line per series (``kind='line'``) or grouped bars (``kind='stack'``: stacked areas).
    Returns None when matplotlib is not installed (the numbers are in the JSON either way)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    if kind == "stack":
        xs = next(iter(series.values()))[0]
        ax.stackplot(xs, *[ys for _, ys in series.values()], labels=list(series))
    else:
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def progress(iterable: Iterable, desc: str, total: int | None = None):
    """A progress bar on stderr (tqdm ships with transformers); the bare iterable when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def median_time(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state_dict (what a checkpoint of the model holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: (1797, 1, 8, 8) float images in [0, 1] and their labels 0-9."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, torch.tensor(y)


class DigitsCNN(nn.Module):
    """A small CNN for 8 x 8 images: two 3 x 3 convolutions, pooling, two linear layers."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 architecture (random weights), defined here: PyPI's torchvision does not import
    beside the CPU torch build, and nothing is downloaded."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet18:
    return ResNet18(num_classes)


def f1_recall(pred: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[list[float], list[float]]:
    """Per-class F1 and recall."""
    f1, recall = [], []
    for c in range(classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        r = tp / max(tp + fn, 1)
        p = tp / max(tp + fp, 1)
        recall.append(r)
        f1.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    return f1, recall


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = pos.view(-1, 1) - neg.view(1, -1)
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()
