"""DynamicSampler against torch.utils.data.WeightedRandomSampler wrapped in a BatchSampler (the PyTorch way to
draw batches with a chosen class mix), on 99:1 labels, batch 256."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import BatchSampler, WeightedRandomSampler

from benchmarks.runner import Case
from deepseek_ext.data import DynamicSampler

SIZES = [1_000_000, 50_000_000]
QUICK_SIZES = [100_000]
BATCH = 256
BATCHES = 2000  # batches timed from the start of an epoch (iterator creation included)


def _take(batch_sampler, k: int) -> None:
    it = iter(batch_sampler)
    for _ in range(k):
        next(it)


class TwoLevelTorchSampler:
    """What a user writes in plain PyTorch when WeightedRandomSampler cannot take the dataset (more than 2^24
    items): a class per draw from torch.multinomial, then a uniform item of that class."""

    def __init__(self, labels: torch.Tensor, class_weights: list[float], batch_size: int):
        self.members = [torch.nonzero(labels == c).flatten() for c in range(len(class_weights))]
        self.weights = torch.tensor(class_weights, dtype=torch.float64)
        self.batch_size = batch_size

    def __iter__(self):
        while True:
            classes = torch.multinomial(self.weights, self.batch_size, replacement=True)
            picks = []
            for c, m in enumerate(self.members):
                k = int((classes == c).sum())
                if k:
                    picks.append(m[torch.randint(len(m), (k,))])
            yield torch.cat(picks)[torch.randperm(self.batch_size)].tolist()


def _ours(sampler: DynamicSampler, k: int) -> None:
    sampler.set_epoch(0)
    _take(sampler, k)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    out = []
    for n in QUICK_SIZES if quick else SIZES:
        labels = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.01).long()
        rss = _rss_bytes()
        ours = DynamicSampler(labels=labels, target_dist={0: 0.5, 1: 0.5}, adjust_freq=1000, batch_size=BATCH)
        per_item = (_rss_bytes() - rss) / n
        rare = labels.sum().item()
        weights = torch.where(labels == 1, 0.5 / rare, 0.5 / (n - rare)).double()
        peer = BatchSampler(WeightedRandomSampler(weights, n, replacement=True), BATCH, drop_last=False)
        k = min(BATCHES, len(ours))
        out.append(
            Case(
                family="data",
                op="DynamicSampler",
                config=f"{n // 1_000_000 or n}{'M' if n >= 10**6 else ''} items, {k} batches",
                ours=functools.partial(_ours, ours, k),
                baseline=functools.partial(_take, peer, k),
                baseline_name="WeightedRandomSampler+BatchSampler",
                extra={"bytes_per_item_rss": per_item},
            )
        )
        out.append(
            Case(
                family="data",
                op="DynamicSampler",
                config=f"{n // 1_000_000 or n}{'M' if n >= 10**6 else ''} items, {k} batches",
                ours=functools.partial(_ours, ours, k),
                baseline=functools.partial(_take, TwoLevelTorchSampler(labels, [0.5, 0.5], BATCH), k),
                baseline_name="two-level torch (multinomial + randint)",
            )
        )
        if n <= 1_000_000:
            out.append(
                Case(
                    family="data",
                    op="DynamicSampler",
                    config=f"{n // 1000}k items, full epoch",
                    ours=functools.partial(_ours, ours, len(ours)),
                    baseline=functools.partial(_take, peer, len(peer)),
                    baseline_name="WeightedRandomSampler+BatchSampler",
                )
            )

        def reweight(s=ours):
            s.update({0: 0.9, 1: 0.6})
            s._adjust()

        out.append(
            Case(
                family="data",
                op="DynamicSampler",
                config=f"{n:,} items: update()+re-weight",
                ours=reweight,
                baseline=None,
                baseline_name=f"(memory {per_item:.1f} B/item, RSS)",
            )
        )
    return out
