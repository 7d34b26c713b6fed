"""Private training with DifferentialPrivacy, and a membership-inference attack against it (the article's
MIMIC-III story, on scikit-learn's bundled breast-cancer data).

The same MLP is trained on half of the data (the "members") without and with ``DifferentialPrivacy(epsilon=1.0,
delta=1e-5)`` (the noise multiplier is calibrated so the whole run spends exactly that budget; a fixed
``noise_multiplier=0.5`` as in the article's snippet works too and stops at the budget). Reports each model's test
AUC, the epsilon spent over the steps (plotted), and the AUC of a loss-threshold membership-inference attack
(guess "member" when the model's loss on an example is low): 0.5 means the attacker learns nothing.

    python examples/private_training.py [--quick] [--out demo-output]
"""

from __future__ import annotations

import torch
from _common import auc, parser, plot, progress, save_results
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepseek_ext.privacy import DifferentialPrivacy


def load(seed: int):
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    return (x[perm[:half]], y[perm[:half]]), (x[perm[half:]], y[perm[half:]])


def train(members, epochs: int, private: bool, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    loader = DataLoader(
        TensorDataset(*members), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dp, spent = None, []
    if private:
        dp = DifferentialPrivacy(
            epsilon=1.0,
            delta=1e-5,
            noise_multiplier=None,
            epochs=epochs,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(seed),
        )
        optimizer = dp.wrap(optimizer, model=model, data_loader=loader)
    for _ in progress(range(epochs), desc="DP-SGD" if private else "non-private"):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if dp is not None:
            spent.append((dp.steps, dp.epsilon_spent()))
    return model, dp, spent


def evaluate(model, members, others) -> dict:
    with torch.no_grad():
        loss_in = nn.functional.cross_entropy(model(members[0]), members[1], reduction="none")
        loss_out = nn.functional.cross_entropy(model(others[0]), others[1], reduction="none")
        p = model(others[0]).softmax(1)[:, 1]
    y = others[1]
    return {
        "test_auc": auc(p[y == 1], p[y == 0]),
        "test_accuracy": ((p > 0.5).long() == y).float().mean().item(),
        "attack_auc": auc(-loss_in, -loss_out),  # lower loss -> guessed member
    }


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    epochs = 60 if args.quick else 300
    members, others = load(args.seed)
    results = {}
    for name, private in (("plain", False), ("dp", True)):
        model, dp, spent = train(members, epochs, private, args.seed)
        r = evaluate(model, members, others)
        if dp is not None:
            r.update(epsilon_spent=dp.epsilon_spent(), noise_multiplier=dp.noise_multiplier, epsilon_curve=spent)
        results[name] = r
        extra = (
            f", epsilon spent {r['epsilon_spent']:.2f} (delta 1e-5, sigma {r['noise_multiplier']:.2f})"
            if private
            else ""
        )
        print(
            f"{name:>5}: test AUC {r['test_auc']:.3f}, accuracy {r['test_accuracy']:.3f}, "
            f"membership-attack AUC {r['attack_auc']:.3f}{extra}"
        )
    steps, eps = zip(*results["dp"]["epsilon_curve"])
    plot(
        args.out,
        "private_training_epsilon",
        "Privacy spent during DP training",
        "optimizer steps",
        "epsilon (delta = 1e-5)",
        {"epsilon spent": (list(steps), list(eps))},
    )
    save_results(args.out, "private_training", results)
    return results


if __name__ == "__main__":
    main()
