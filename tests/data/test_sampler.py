"""DynamicSampler (deepseek_ext/data/sampler.py) and its C++ core through Python."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deepseek_ext.data import DynamicSampler


class NamedDataset(Dataset):
    """A dataset in torchvision's style: `targets`, `classes`, `class_to_idx`."""

    def __init__(self, n=2000, rare=0.05, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.targets = (torch.rand(n, generator=g) < rare).long().tolist()
        self.classes = ["normal", "abnormal"]
        self.class_to_idx = {"normal": 0, "abnormal": 1}

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), self.targets[i]


def imbalanced_labels(n, rare_fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < rare_fraction).long()


def class_fraction(sampler, labels, batches=None):
    counts = torch.zeros(int(labels.max()) + 1)
    for i, b in enumerate(sampler):
        counts += torch.bincount(labels[b], minlength=counts.numel())
        if batches is not None and i + 1 == batches:
            break
    return counts / counts.sum(), int(counts.sum())


@pytest.mark.parametrize("replacement", [False, True])
def test_class_frequencies_match_the_target(replacement):
    labels = imbalanced_labels(20000, 0.1)
    s = DynamicSampler(
        labels=labels, target_dist={0: 0.3, 1: 0.7}, adjust_freq=50, batch_size=64, replacement=replacement, seed=1
    )
    frac, n = class_fraction(s, labels)
    # Five standard errors of a multinomial draw; the deficit correction only tightens this.
    assert abs(frac[1].item() - 0.7) < 5 * math.sqrt(0.7 * 0.3 / n), frac


def test_running_mix_converges_on_a_99_to_1_dataset():
    labels = imbalanced_labels(50000, 0.01, seed=3)
    s = DynamicSampler(labels=labels, target_dist="balanced", adjust_freq=5, batch_size=32, seed=0)
    errors = []
    counts = torch.zeros(2)
    for i, b in enumerate(s):
        counts += torch.bincount(labels[b], minlength=2)
        if (i + 1) % 100 == 0:
            errors.append(abs(counts[1].item() / counts.sum().item() - 0.5))
    print("running error every 100 batches:", [f"{e:.4f}" for e in errors[:8]], "...", f"{errors[-1]:.5f}")
    assert errors[-1] < 0.002
    assert errors[-1] <= errors[0] + 1e-9


def test_feedback_moves_the_target_toward_the_weaker_class_and_stays_bounded():
    ds = NamedDataset()
    s = DynamicSampler(ds, target_dist={"normal": 0.3, "abnormal": 0.7}, adjust_freq=4, batch_size=16, max_shift=1.25)
    assert s.target == pytest.approx({"normal": 0.3, "abnormal": 0.7})
    s.update({"normal": 0.91, "abnormal": 0.62})
    assert s.target == pytest.approx({"normal": 0.3, "abnormal": 0.7})  # takes effect at the next adjustment
    it = iter(s)
    for _ in range(4):
        next(it)
    assert s.target["abnormal"] > 0.7
    # The most extreme scores still keep each class within max_shift of its base share.
    s.update({"normal": 1.0, "abnormal": 0.0})
    for _ in range(4):
        next(it)
    assert 0.3 / 1.25 - 1e-9 <= s.target["normal"] <= 0.3 * 1.25 + 1e-9
    assert sum(s.target.values()) == pytest.approx(1.0)
    # Equal scores bring back the base target (the rule always starts from it).
    s.update({"normal": 0.8, "abnormal": 0.8})
    for _ in range(4):
        next(it)
    assert s.target == pytest.approx({"normal": 0.3, "abnormal": 0.7})


def test_strategy_hook_replaces_the_feedback_rule():
    labels = imbalanced_labels(4000, 0.2)
    seen = {}

    def strategy(base, current, scores):
        seen.update(base=base, current=current, scores=scores)
        return [0.5, 0.5]

    s = DynamicSampler(labels=labels, target_dist=[0.8, 0.2], adjust_freq=2, batch_size=8, strategy=strategy)
    s.update([0.9, 0.1])
    it = iter(s)
    next(it), next(it)
    assert seen["scores"] == [0.9, 0.1] and seen["base"] == pytest.approx([0.8, 0.2])
    assert s.target == pytest.approx({0: 0.5, 1: 0.5})


def test_same_seed_same_stream_and_epochs_reshuffle():
    labels = imbalanced_labels(3000, 0.3)
    a = DynamicSampler(labels=labels, batch_size=32, seed=5)
    b = DynamicSampler(labels=labels, batch_size=32, seed=5)
    c = DynamicSampler(labels=labels, batch_size=32, seed=6)
    first = list(a)
    assert first == list(b)
    assert first != list(c)
    assert list(a) != first  # the next pass is epoch 1
    a.set_epoch(0)
    assert list(a) == first


def test_without_replacement_no_item_repeats_within_an_epoch():
    labels = imbalanced_labels(5000, 0.5)
    s = DynamicSampler(labels=labels, target_dist="natural", batch_size=100, num_samples=4000, seed=2)
    items = [i for b in s for i in b]
    assert len(items) == 4000 and len(set(items)) == 4000


def test_exhausted_class_is_walked_again():
    labels = torch.tensor([0] * 900 + [1] * 10)
    s = DynamicSampler(labels=labels, target_dist="balanced", batch_size=50, seed=0)
    rare = [i for b in s for i in b if labels[i] == 1]
    assert len(rare) > 10 and set(rare) == set(range(900, 910))
    assert len(set(rare[:10])) == 10  # the first pass visits each rare item once


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_equally_long_and_share_the_mix(world):
    labels = imbalanced_labels(9000, 0.3, seed=4)
    samplers = [
        DynamicSampler(
            labels=labels,
            target_dist={0: 0.5, 1: 0.5},
            batch_size=30,
            num_samples=3000,
            num_replicas=world,
            rank=r,
            seed=9,
        )
        for r in range(world)
    ]
    streams = [[i for b in s for i in b] for s in samplers]
    assert len({len(s) for s in samplers}) == 1 and len({len(x) for x in streams}) == 1
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(streams[a]) & set(streams[b])
    for x in streams:
        assert abs(labels[x].float().mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("cut", [1, 37, 64, 65, 130])
def test_state_dict_resumes_the_exact_stream(cut):
    labels = imbalanced_labels(20000, 0.1)
    kwargs = dict(labels=labels, target_dist={0: 0.4, 1: 0.6}, adjust_freq=10, batch_size=16, seed=3)
    ref = DynamicSampler(**kwargs)
    ref.update([0.9, 0.5])
    expected = list(ref)

    s = DynamicSampler(**kwargs)
    s.update([0.9, 0.5])
    it = iter(s)
    head = [next(it) for _ in range(cut)]
    state = s.state_dict()
    restored = DynamicSampler(**kwargs)
    restored.load_state_dict(state)
    assert head + list(restored) == expected
    # An abandoned iterator does not lose batches either: a new iterator on the same sampler continues.
    assert head + list(s) == expected


def test_works_with_a_dataloader_with_workers():
    ds = NamedDataset(n=600)
    s = DynamicSampler(ds, target_dist={"normal": 0.5, "abnormal": 0.5}, adjust_freq=3, batch_size=20, seed=0)
    seen = 0
    for x, y in DataLoader(ds, batch_sampler=s, num_workers=2):
        assert x.shape == (len(y), 1)
        seen += len(y)
    assert seen == 600


def test_label_sources_and_names():
    ds = NamedDataset(n=300)
    y = torch.tensor(ds.targets)
    by_attr = DynamicSampler(ds, target_dist={"abnormal": 1.0}, batch_size=10, seed=0)
    by_labels = DynamicSampler(labels=y, target_dist={1: 1.0}, batch_size=10, seed=0)
    tds = TensorDataset(torch.zeros(300, 1), y)
    by_fn = DynamicSampler(tds, target_dist=[0.0, 1.0], batch_size=10, seed=0, label_fn=lambda item: int(item[1]))
    named = DynamicSampler(
        labels=["cat" if v else "dog" for v in ds.targets], target_dist={"cat": 1.0}, batch_size=10, seed=0
    )
    explicit = DynamicSampler(
        labels=y, class_names=["healthy", "sick"], target_dist={"sick": 1.0}, batch_size=10, seed=0
    )
    first = next(iter(by_attr))
    for s in (by_labels, by_fn, explicit):  # same class ids, so the same stream
        assert next(iter(s)) == first
    assert all(ds.targets[i] == 1 for i in first)
    assert all(ds.targets[i] == 1 for b in named for i in b)  # names sorted: 'cat' is class 0 there


def test_length_num_samples_and_drop_last():
    labels = imbalanced_labels(1000, 0.5)
    assert len(DynamicSampler(labels=labels, batch_size=32)) == 32
    assert len(DynamicSampler(labels=labels, batch_size=32, drop_last=True)) == 31
    s = DynamicSampler(labels=labels, batch_size=32, num_samples=100)
    assert [len(b) for b in s] == [32, 32, 32, 4]
    assert len(DynamicSampler(labels=labels, batch_size=10, num_samples=101, num_replicas=2, rank=1)) == 6


def test_core_holds_eight_bytes_per_item():
    assert torch.classes.deepseek_ext.ClassSampler.bytes_per_item() == 8


def test_bad_input_raises_clear_errors():
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="must be finite and non-negative"):
        DynamicSampler(labels=labels, target_dist={0: -0.1, 1: 1.1})
    with pytest.raises(ValueError, match=r"unknown class 'cat'"):
        DynamicSampler(labels=labels, target_dist={"cat": 1.0})
    with pytest.raises(ValueError, match=r"gives class 3 probability 0.5 but the dataset has no items"):
        DynamicSampler(labels=labels, class_names=["a", "b", "c", 3], target_dist=[0.25, 0.25, 0.0, 0.5])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DynamicSampler(labels=labels, batch_size=0)
    with pytest.raises(ValueError, match="adjust_freq must be a positive integer"):
        DynamicSampler(labels=labels, adjust_freq=0)
    with pytest.raises(ValueError, match="cannot find labels"):
        DynamicSampler(TensorDataset(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas\)"):
        DynamicSampler(labels=labels, num_replicas=2, rank=2)
    s = DynamicSampler(labels=labels)
    with pytest.raises(ValueError, match=r"score of class 1 must be in \[0, 1\]"):
        s.update({1: 1.5})
    with pytest.warns(UserWarning, match="sums to 2, not 1; normalising it"):
        s2 = DynamicSampler(labels=labels, target_dist=[1.0, 1.0, 0.0])
    assert s2.target == pytest.approx({0: 0.5, 1: 0.5, 2: 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicSampler(labels=labels, target_dist=[0.5, 0.5, 0.0])


# ------------------------------------------------------------------------------------------ reliability (issue 16)
def _sampler(**kw):
    return DynamicSampler(labels=imbalanced_labels(600, 0.2), target_dist="balanced", adjust_freq=5, batch_size=8, **kw)


def _tampered(field, value):
    s = _sampler()
    it = iter(s)
    for _ in range(3):
        next(it)
    state = s.state_dict()
    state[field] = value
    return state


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("batch_in_epoch", -1000, r"expected batch_in_epoch to be a non-negative integer"),
        ("batch_in_epoch", 10**6, r"batch_in_epoch 1000000 is past the epoch's 75 batches"),
        ("chunk", {"core": [0, 0, 2, 0, 0, 0, 0], "yielded": 10**6}, r"expected chunk\['yielded'\] in \[1, 64\)"),
        ("chunk", {"core": [0, 0, 2, 0, 0, 0, 0], "yielded": 3.5}, r"expected chunk\['yielded'\] in \[1, 64\)"),
        ("batches", 1, r"batches \(1\) is below batch_in_epoch"),
        ("core", [0, 0, 5], r"core is not the state of a sampler over 2 classes"),
        ("weights", [float("nan"), 1.0], r"expected weights to hold finite non-negative numbers"),
        ("weights", [0.0, 0.0], r"expected weights positive for some classes"),
        ("target", [0.9, 0.9], r"expected target to be a distribution"),
        ("base", [1.0], r"expected base to be a list of 2 numbers"),
        ("scores", [2.0, 0.5], r"expected scores in \[0, 1\]"),
        ("epoch", "x", r"expected epoch to be a non-negative integer"),
    ],
)
def test_a_tampered_state_is_refused_before_anything_changes(field, value, match):
    s = _sampler()
    before = s.state_dict()
    with pytest.raises(ValueError, match=r"DynamicSampler.load_state_dict: " + match):
        s.load_state_dict(_tampered(field, value))
    assert s.state_dict() == before
    assert sum(1 for _ in s) == len(s)


def test_one_epoch_never_yields_more_batches_than_len_after_a_restore():
    s = _sampler()
    it = iter(s)
    for _ in range(7):
        next(it)
    restored = _sampler()
    restored.load_state_dict(s.state_dict())
    assert sum(1 for _ in restored) == len(s) - 7
    assert sum(1 for _ in restored) == len(s)


@pytest.mark.parametrize("strength", [1e6, 1e300, -1e300])
def test_huge_feedback_strength_gives_a_bounded_target_not_overflow(strength):
    s = _sampler(feedback_strength=strength, max_shift=3.0)
    s.update([0.2, 0.9])
    t = s._pending
    assert all(math.isfinite(v) for v in t) and abs(sum(t) - 1) < 1e-9
    # Pinned at the max_shift bounds around the balanced base.
    assert max(t) / 0.5 <= 3.0 + 1e-9 and min(t) / 0.5 >= 1 / 3.0 - 1e-9


@pytest.mark.parametrize("strength", [float("inf"), float("nan")])
def test_non_finite_feedback_strength_is_refused(strength):
    with pytest.raises(ValueError, match="DynamicSampler: expected a finite feedback_strength"):
        _sampler(feedback_strength=strength)
    with pytest.raises(ValueError, match="DynamicSampler: max_shift must be at least 1"):
        _sampler(max_shift=float("nan"))
