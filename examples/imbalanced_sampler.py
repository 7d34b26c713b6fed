"""Imbalanced classification with DynamicSampler: the article's medical-imaging story on bundled digits.

A small CNN learns to tell 'abnormal' images (the digit 8, kept rare: about 2% of the training set) from 'normal'
ones (every other digit). It is trained twice with the same budget of batches: with a plain shuffled loader, and
with ``DynamicSampler`` steering every batch toward a target class mix that is re-tuned each epoch from the
per-class F1 on a validation split (``sampler.update``). Both are scored on a held-out test set with the natural
class mix; the script prints per-class recall and F1 and plots the class mix the sampler drew over time.

    python examples/imbalanced_sampler.py [--quick] [--out demo-output]
"""

from __future__ import annotations

import torch
from _common import DigitsCNN, digits_images, f1_recall, parser, plot, progress, save_results
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deepseek_ext.data import DynamicSampler

CLASSES = ["normal", "abnormal"]
RARE_DIGIT = 8


class Scans(Dataset):
    """Images with a 'normal' / 'abnormal' label; ``targets`` and ``classes`` as torchvision datasets have them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.targets, self.classes = x, y.tolist(), CLASSES

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def splits(seed: int, rare_train: int):
    x, digits = digits_images()
    y = (digits == RARE_DIGIT).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    test, val, train = perm[:500], perm[500:800], perm[800:]
    rare = train[y[train] == 1][:rare_train]  # keep the rare class rare in training
    train = torch.cat([train[y[train] == 0], rare])
    return Scans(x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def evaluate(model, data):
    model.eval()
    with torch.no_grad():
        pred = model(data[0]).argmax(1)
    model.train()
    return f1_recall(pred, data[1], len(CLASSES))


def train(dataset, val, steps: int, dynamic: bool, seed: int, epochs: int):
    torch.manual_seed(seed)
    model = DigitsCNN(classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    if dynamic:
        sampler = DynamicSampler(dataset, target_dist={"normal": 0.3, "abnormal": 0.7}, adjust_freq=10, seed=seed)
        loader = DataLoader(dataset, batch_sampler=sampler)
    else:
        sampler = None
        loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    mix, done = [], 0
    bar = progress(range(epochs), desc="DynamicSampler" if dynamic else "plain loader")
    for _ in bar:
        drawn = [0, 0]
        for x, y in loader:
            if done == steps:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            drawn[1] += int(y.sum())
            drawn[0] += len(y) - int(y.sum())
        mix.append(drawn[1] / max(1, sum(drawn)))
        if sampler is not None:
            f1, _ = evaluate(model, val)
            sampler.update(dict(zip(CLASSES, f1)))  # the weaker class gets more of the next batches
    return model, mix


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    epochs = 6 if args.quick else 30
    dataset, val, test = splits(args.seed, rare_train=30)
    steps = epochs * -(-len(dataset) // 32)  # same number of batches for both runs
    results = {"train_items": len(dataset), "train_abnormal": sum(dataset.targets), "steps": steps}
    mixes = {}
    for name, dynamic in (("plain", False), ("dynamic", True)):
        model, mix = train(dataset, val, steps, dynamic, args.seed, epochs)
        f1, recall = evaluate(model, test)
        results[name] = {"f1": dict(zip(CLASSES, f1)), "recall": dict(zip(CLASSES, recall)), "abnormal_share": mix}
        mixes[name] = mix
        print(
            f"{name:>8}: recall normal {recall[0]:.3f} abnormal {recall[1]:.3f} | "
            f"F1 normal {f1[0]:.3f} abnormal {f1[1]:.3f}"
        )
    gain = results["dynamic"]["recall"]["abnormal"] - results["plain"]["recall"]["abnormal"]
    print(
        f"rare-class recall: {gain:+.3f} with DynamicSampler (train set: {results['train_abnormal']} abnormal of "
        f"{results['train_items']})"
    )
    results["rare_recall_gain"] = gain
    xs = list(range(1, epochs + 1))
    plot(
        args.out,
        "imbalanced_sampler_mix",
        "Share of 'abnormal' items per epoch",
        "epoch",
        "share of batch items",
        {k: (xs, v) for k, v in mixes.items()},
    )
    save_results(args.out, "imbalanced_sampler", results)
    return results


if __name__ == "__main__":
    main()
