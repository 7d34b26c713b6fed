"""Private training with DifferentialPrivacy, and a membership-inference attack against it (the article's
MIMIC-III story, on scikit-learn's bundled digits table).

The same MLP is trained on 200 examples (the "members") without and with ``DifferentialPrivacy(epsilon=1.0,
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

MEMBERS = 200


def load(seed: int):
    """scikit-learn's bundled digits as a tabular task (64 pixel features, 10 classes): 200 training examples
    (the members) and the rest held out. (The bundled breast-cancer table separates almost perfectly, so a model
    has nothing to memorise there and the attack says little either way.)"""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (x[perm[:MEMBERS]], y[perm[:MEMBERS]]), (x[perm[MEMBERS:]], y[perm[MEMBERS:]])


def train(members, epochs: int, private: bool, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    loader = DataLoader(
        TensorDataset(*members), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
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
        loader = dp.data_loader  # the Poisson-sampled loader built from ours
    for _ in progress(range(epochs), desc="DP-SGD" if private else "non-private"):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if dp is not None:
            spent.append((dp.steps, dp.epsilon_spent()))
    return model, dp, spent


def margin(model, data) -> torch.Tensor:
    """The true class's logit minus the best other logit: a loss-threshold attack's score (a monotone function of
    the loss) that does not round to zero when a model is very confident, as float32 losses do."""
    logits = model(data[0])
    true = logits.gather(1, data[1].view(-1, 1)).squeeze(1)
    other = logits.scatter(1, data[1].view(-1, 1), float("-inf")).amax(1)
    return true - other


def evaluate(model, members, others) -> dict:
    with torch.no_grad():
        p = model(others[0]).softmax(1)
        attack = auc(margin(model, members), margin(model, others))  # high margin (low loss) -> guessed member
    y = others[1]
    return {
        "test_auc": sum(auc(p[y == c, c], p[y != c, c]) for c in range(10)) / 10,  # one-vs-rest, macro average
        "test_accuracy": (p.argmax(1) == y).float().mean().item(),
        "attack_auc": attack,
    }


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    epochs = 60 if args.quick else 300
    members, others = load(args.seed)
    results = {}
    for name, private in (("plain", False), ("dp", True)):
        # The non-private model trains to (over)fit, as a model without a privacy budget usually does.
        # DP-SGD takes few epochs: every extra step costs budget, and at epsilon = 1 on 200 examples fewer, less
        # noisy steps learn more.
        model, dp, spent = train(members, max(1, epochs // 4) if private else 5 * epochs, private, args.seed)
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
