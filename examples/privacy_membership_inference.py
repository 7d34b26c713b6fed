"""Does DP-SGD stop a membership-inference attack? (The article's MIMIC-III claim, on data that ships offline.)

Trains the same MLP on 400 images of scikit-learn's bundled digits dataset (the "members") with and without
``DifferentialPrivacy``, then runs a loss-threshold attack: an example is guessed to be a member when the model's
loss on it is low. The attack's AUC is 0.5 when members and non-members look alike to the model.

    python examples/privacy_membership_inference.py [--quick] [--epsilon 1.0]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepseek_ext.privacy import DifferentialPrivacy


def auc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    diff = scores_pos.view(-1, 1) - scores_neg.view(1, -1)
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


MEMBERS = 400


def load():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[perm[:MEMBERS]], y[perm[:MEMBERS]]), (x[perm[MEMBERS:]], y[perm[MEMBERS:]])


def train(members, epochs: int, private: bool, epsilon: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    loader = DataLoader(TensorDataset(*members), batch_size=32, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dp = None
    if private:
        dp = DifferentialPrivacy(
            epsilon=epsilon,
            delta=1e-5,
            noise_multiplier=None,
            epochs=epochs,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(0),
        )
        opt = dp.wrap(opt, model=model, data_loader=loader)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, dp


def evaluate(model, members, others):
    with torch.no_grad():
        loss_in = nn.functional.cross_entropy(model(members[0]), members[1], reduction="none")
        loss_out = nn.functional.cross_entropy(model(others[0]), others[1], reduction="none")
        accuracy = (model(others[0]).argmax(1) == others[1]).float().mean().item()
    return {"test_accuracy": accuracy, "attack_auc": auc(-loss_in, -loss_out)}  # lower loss -> "member"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs (CI smoke run)")
    p.add_argument("--epsilon", type=float, default=1.0)
    args = p.parse_args(argv)
    epochs = 40 if args.quick else 200
    members, others = load()
    results = {}
    for private in (False, True):
        model, dp = train(members, epochs, private, args.epsilon)
        r = evaluate(model, members, others)
        if dp is not None:
            r["epsilon_spent"] = dp.epsilon_spent()
        results["dp" if private else "plain"] = r
    for name, r in results.items():
        extra = f", epsilon spent {r['epsilon_spent']:.2f} (delta 1e-5)" if "epsilon_spent" in r else ""
        print(f"{name:>5}: test accuracy {r['test_accuracy']:.3f}, membership-attack AUC {r['attack_auc']:.3f}{extra}")
    return results


if __name__ == "__main__":
    main()
