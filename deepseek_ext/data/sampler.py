"""DynamicSampler: a batch sampler that steers each batch's class mix toward a target and adapts the target
from validation metrics.

The sampling core is C++ (``torch.classes.deepseek_ext.ClassSampler``, csrc/data/sampler_core.h): an alias table
over class weights and a counter-based RNG, O(1) work per draw and 8 bytes per dataset item. This module resolves
labels and class names, turns targets and metrics into class weights, and yields whole batches as lists.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Union

import torch
from torch.utils.data import Sampler

from .._native import require_native

TargetDist = Union[str, Mapping[Any, float], Sequence[float]]
# strategy(base_target, current_target, scores) -> new target; all indexed by class id.
Strategy = Callable[[list[float], list[float], list[float]], Sequence[float]]

_CHUNK_BATCHES = 64  # batches drawn per call into C++ (never across an adjustment or the end of an epoch)


def _resolve_labels(dataset, labels, label_fn) -> tuple[list[Any] | torch.Tensor, str]:
    if labels is not None:
        return labels, "labels="
    if label_fn is not None:
        if dataset is None:
            raise ValueError("DynamicSampler: label_fn= needs a dataset to apply it to")
        return [label_fn(dataset[i]) for i in range(len(dataset))], "label_fn="
    for attr in ("targets", "labels"):
        if dataset is not None and hasattr(dataset, attr):
            return getattr(dataset, attr), f"dataset.{attr}"
    raise ValueError(
        "DynamicSampler: cannot find labels; pass labels=, label_fn=, or a dataset with a `targets` or `labels` "
        "attribute"
    )


def _class_names(dataset, class_names) -> dict[Any, int]:
    """Name -> class id, from class_names= (list or dict), dataset.class_to_idx, or dataset.classes."""
    if class_names is None and dataset is not None:
        class_names = getattr(dataset, "class_to_idx", None) or getattr(dataset, "classes", None)
    if class_names is None:
        return {}
    if isinstance(class_names, Mapping):
        return {name: int(idx) for name, idx in class_names.items()}
    return {name: idx for idx, name in enumerate(class_names)}


class DynamicSampler(Sampler[list[int]]):
    """Batch sampler with a steerable class mix, for ``DataLoader(dataset, batch_sampler=sampler)``.

    Every batch is drawn class first, then item: a class from the current class weights, then an item of that
    class. Every ``adjust_freq`` batches the weights are re-derived so the *running* class frequencies converge on
    the target: with ``n_c`` items of class ``c`` drawn out of ``n`` so far and ``W = adjust_freq * batch_size``
    draws in the next window, class ``c`` gets weight ``max(0, t_c (n + W) - n_c)`` (the deficit it must make up).

    Feedback: ``update(scores)`` takes per-class validation scores in [0, 1] (F1 or recall; higher is better). At the
    next adjustment the target becomes ``t_c ∝ b_c * exp(feedback_strength * (mean(s) - s_c))`` where ``b`` is the
    target given at construction, with each ``t_c / b_c`` kept within ``[1 / max_shift, max_shift]``. Targets are
    always recomputed from ``b``, so repeated updates cannot drift without bound. ``strategy=`` replaces this rule.

    Args:
        dataset: the dataset (for its length, ``targets``/``labels`` and ``classes``/``class_to_idx``); optional when
            ``labels`` is given.
        target_dist: ``{class: probability}`` with class names or integer ids, a sequence indexed by class id,
            ``'balanced'`` (equal over classes that have items) or ``'natural'`` (the dataset's own frequencies).
            Classes missing from a dict get probability 0. Negative values are an error; a total other than 1 is
            normalised with a warning.
        adjust_freq: batches between re-weightings.
        batch_size: items per batch.
        labels: per-item labels (sequence, tensor or array of ints or of names).
        label_fn: ``label_fn(dataset[i]) -> label``, used when labels are not stored on the dataset.
        class_names: a list (id -> name) or dict (name -> id), when the dataset has neither ``classes`` nor
            ``class_to_idx``.
        num_samples: items per epoch over all ranks (default: the number of labelled items).
        replacement: ``False`` (default): within an epoch no item repeats until its class is exhausted; an exhausted
            class is then walked again in a fresh order. ``True``: every draw is uniform within its class.
        drop_last: drop the last, smaller batch of each epoch.
        num_replicas, rank: distributed sampling (default: from ``torch.distributed`` when initialised). Each rank
            draws from its own disjoint share of every class and yields the same number of batches; the class mix is
            the same on every rank. Classes with fewer items than ranks are shared by all ranks.
        seed: the stream is a pure function of (seed, rank, epoch, position).
        feedback_strength, max_shift: the feedback rule above.
        strategy: ``strategy(base, current, scores) -> new target``, all lists indexed by class id.

    Each full pass over the iterator advances the epoch; ``set_epoch(e)`` sets it explicitly, as with
    ``DistributedSampler``. ``state_dict()`` / ``load_state_dict()`` resume the exact stream, mid-epoch included (they
    record the batches this sampler has yielded; a DataLoader may have prefetched a few of them).

    Example:
        >>> sampler = DynamicSampler(dataset, target_dist={"normal": 0.3, "abnormal": 0.7}, adjust_freq=1000)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> sampler.update({"normal": 0.91, "abnormal": 0.62})  # after validation
    """

    def __init__(
        self,
        dataset=None,
        target_dist: TargetDist = "natural",
        adjust_freq: int = 1000,
        batch_size: int = 32,
        *,
        labels=None,
        label_fn: Callable[[Any], Any] | None = None,
        class_names=None,
        num_samples: int | None = None,
        replacement: bool = False,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        feedback_strength: float = 1.0,
        max_shift: float = 2.0,
        strategy: Strategy | None = None,
    ):
        require_native("data.DynamicSampler")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DynamicSampler: batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(adjust_freq, int) or adjust_freq < 1:
            raise ValueError(f"DynamicSampler: adjust_freq must be a positive integer, got {adjust_freq!r}")
        for name, v in (("feedback_strength", feedback_strength), ("max_shift", max_shift)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"DynamicSampler: expected {name} to be a number, but got {type(v).__name__}")
        if not math.isfinite(feedback_strength):
            raise ValueError(f"DynamicSampler: expected a finite feedback_strength, but got {feedback_strength}")
        if not max_shift >= 1:
            raise ValueError(f"DynamicSampler: max_shift must be at least 1, got {max_shift}")

        raw, source = _resolve_labels(dataset, labels, label_fn)
        self._names = _class_names(dataset, class_names)
        ids = self._label_ids(raw, source)
        if dataset is not None and len(ids) != len(dataset):
            raise ValueError(f"DynamicSampler: {source} has {len(ids)} entries but the dataset has {len(dataset)}")
        num_classes = max(int(ids.max()) + 1 if ids.numel() else 0, max(self._names.values(), default=-1) + 1)
        if num_classes == 0:
            raise ValueError("DynamicSampler: the dataset has no labelled items")

        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if initialised else 1)
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"DynamicSampler: rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}"
            )

        self.batch_size = batch_size
        self.adjust_freq = adjust_freq
        self.replacement = replacement
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.feedback_strength = feedback_strength
        self.max_shift = max_shift
        self.strategy = strategy
        total = int((ids >= 0).sum()) if num_samples is None else num_samples
        if total < 0:
            raise ValueError(f"DynamicSampler: num_samples must be non-negative, got {num_samples}")
        self.num_samples = total
        self._per_rank = math.ceil(total / num_replicas)

        self._core = torch.classes.deepseek_ext.ClassSampler(ids, num_classes, seed & (2**63 - 1), num_replicas, rank)
        self._sizes = list(self._core.class_sizes())
        self._base = self._parse_target(target_dist)
        self._target = list(self._base)
        self._pending: list[float] | None = None
        self._scores: list[float] | None = None
        self.epoch = 0
        self._batch_in_epoch = 0
        self._batches = 0
        # The chunk being yielded: the core's state before it was drawn and how many of its batches went out.
        self._chunk: dict | None = None
        self._core.set_weights(self._target)

    # ----------------------------------------------------------------------------------------------- labels & targets
    def _label_ids(self, raw, source: str) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):
            values = raw.flatten().tolist() if raw.is_floating_point() else None
            if values is None:
                return raw.flatten().to(torch.int64).cpu()
            raw = values
        raw = list(raw.tolist() if hasattr(raw, "tolist") else raw)
        if all(isinstance(v, (int, bool)) or (hasattr(v, "__index__")) for v in raw):
            return torch.tensor([int(v) for v in raw], dtype=torch.int64)
        # Named labels: map through the class names, or name classes by their sorted unique labels.
        if not self._names:
            self._names = {name: i for i, name in enumerate(sorted(set(raw), key=str))}
        unknown = {v for v in raw if v not in self._names}
        if unknown:
            raise ValueError(
                f"DynamicSampler: {source} contains labels {sorted(map(str, unknown))[:5]} that are not "
                f"class names {sorted(map(str, self._names))[:10]}"
            )
        return torch.tensor([self._names[v] for v in raw], dtype=torch.int64)

    def class_id(self, key) -> int:
        """The class id of a class name or integer id (``ValueError`` for unknown classes)."""
        if key in self._names:
            return self._names[key]
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(self._sizes):
            return key
        known = sorted(map(str, self._names)) or list(range(len(self._sizes)))
        raise ValueError(f"DynamicSampler: unknown class {key!r}; known classes: {known}")

    def _as_vector(self, values, what: str) -> list[float]:
        if isinstance(values, Mapping):
            out = [0.0] * len(self._sizes)
            for key, v in values.items():
                out[self.class_id(key)] = float(v)
            return out
        out = [float(v) for v in values]
        if len(out) != len(self._sizes):
            raise ValueError(f"DynamicSampler: {what} has {len(out)} entries for {len(self._sizes)} classes")
        return out

    def _parse_target(self, target: TargetDist) -> list[float]:
        if isinstance(target, str):
            if target == "balanced":
                return self._normalised([1.0 if n > 0 else 0.0 for n in self._sizes], "target_dist", warn=False)
            if target == "natural":
                return self._normalised([float(n) for n in self._sizes], "target_dist", warn=False)
            raise ValueError(
                f"DynamicSampler: target_dist must be a dict, a sequence, 'balanced' or 'natural', got {target!r}"
            )
        return self._normalised(self._as_vector(target, "target_dist"), "target_dist")

    def _normalised(self, p: list[float], what: str, warn: bool = True) -> list[float]:
        if any(not math.isfinite(v) or v < 0 for v in p):
            raise ValueError(f"DynamicSampler: {what} must be finite and non-negative, got {p}")
        total = sum(p)
        if total <= 0:
            raise ValueError(f"DynamicSampler: {what} gives every class probability 0")
        for c, v in enumerate(p):
            if v > 0 and self._sizes[c] == 0:
                raise ValueError(
                    f"DynamicSampler: {what} gives class {self._name(c)!r} probability {v} but the "
                    f"dataset has no items of it"
                )
        if warn and abs(total - 1.0) > 1e-6:
            warnings.warn(f"DynamicSampler: {what} sums to {total:.6g}, not 1; normalising it", stacklevel=4)
        return [v / total for v in p]

    def _name(self, c: int):
        for name, idx in self._names.items():
            if idx == c:
                return name
        return c

    # ----------------------------------------------------------------------------------------------------- feedback
    def update(self, scores: Mapping[Any, float] | Sequence[float]) -> None:
        """Per-class validation scores in [0, 1] (higher is better); the target moves toward weaker classes at the
        next adjustment. Classes left out of a dict keep a neutral score (the mean of the others)."""
        given = (
            {self.class_id(k): float(v) for k, v in scores.items()}
            if isinstance(scores, Mapping)
            else dict(enumerate(self._as_vector(scores, "scores")))
        )
        for c, v in given.items():
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"DynamicSampler: score of class {self._name(c)!r} must be in [0, 1], got {v}")
        mean = sum(given.values()) / len(given) if given else 0.0
        self._scores = [given.get(c, mean) for c in range(len(self._sizes))]
        if self.strategy is not None:
            proposed = self._as_vector(
                self.strategy(list(self._base), list(self._target), list(self._scores)), "strategy result"
            )
            self._pending = self._normalised(proposed, "strategy result")
        else:
            self._pending = self._feedback_target(self._scores)

    def _feedback_target(self, scores: list[float]) -> list[float]:
        active = [c for c, b in enumerate(self._base) if b > 0]
        mean = sum(scores[c] for c in active) / len(active)
        t = [0.0] * len(self._base)
        # In log space, shifted by the largest exponent: any finite feedback_strength, however large, stays finite.
        logs = {c: math.log(self._base[c]) + self.feedback_strength * (mean - scores[c]) for c in active}
        top = max(logs.values())
        for c in active:
            t[c] = math.exp(logs[c] - top)
        # Normalise, then keep each ratio t_c / b_c within [1/max_shift, max_shift]; a few rounds settle both.
        for _ in range(20):
            total = sum(t)
            t = [v / total for v in t]
            clipped = [
                min(max(t[c], self._base[c] / self.max_shift), self._base[c] * self.max_shift) for c in range(len(t))
            ]
            if all(abs(a - b) < 1e-12 for a, b in zip(clipped, t)):
                break
            t = clipped
        total = sum(t)
        return [v / total for v in t]

    @property
    def target(self) -> dict:
        """The current target mix, by class name (or id)."""
        return {self._name(c): p for c, p in enumerate(self._target)}

    def class_counts(self) -> dict:
        """Items of each class drawn so far by this sampler (all epochs)."""
        return {self._name(c): n for c, n in enumerate(self._core.drawn())}

    def _adjust(self) -> None:
        """Re-weights toward the target, correcting for the mix drawn so far (see the class docstring)."""
        if self._pending is not None:
            self._target, self._pending = self._pending, None
        drawn = self._core.drawn()
        n = sum(drawn)
        window = self.adjust_freq * self.batch_size
        deficit = [max(0.0, t * (n + window) - d) if t > 0 else 0.0 for t, d in zip(self._target, drawn)]
        self._core.set_weights(deficit if sum(deficit) > 0 else self._target)

    # ----------------------------------------------------------------------------------------------------- iteration
    def __len__(self) -> int:
        if self.drop_last:
            return self._per_rank // self.batch_size
        return math.ceil(self._per_rank / self.batch_size)

    def _batch_len(self, b: int) -> int:
        return min(self.batch_size, self._per_rank - b * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch ``epoch`` (its own shuffle of every class), from its first batch."""
        self.epoch = epoch
        self._batch_in_epoch = 0
        self._chunk = None
        self._core.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        length = len(self)
        while self._batch_in_epoch < length:
            skip = 0
            if self._chunk is not None:
                # A chunk was drawn but not fully yielded (an abandoned iterator, or a restored state_dict):
                # rewind the core to the chunk's start and redraw it, skipping what was already yielded.
                skip = self._chunk["yielded"]
                self._core.load_state(self._chunk["core"])
                self._batch_in_epoch -= skip
                self._batches -= skip
            # A chunk ends at the next adjustment and at the end of the epoch; its batches share one weight table.
            until_adjust = self.adjust_freq - self._batches % self.adjust_freq
            k = min(_CHUNK_BATCHES, until_adjust, length - self._batch_in_epoch)
            sizes = [self._batch_len(self._batch_in_epoch + i) for i in range(k)]
            self._chunk = {"core": list(self._core.state()), "yielded": 0}
            flat = self._core.draw(sum(sizes), self.replacement).tolist()
            start = 0
            for i, size in enumerate(sizes):
                batch = flat[start : start + size]
                start += size
                self._batch_in_epoch += 1
                self._batches += 1
                if i < skip:
                    continue
                if i + 1 == k:
                    self._chunk = None
                    if self._batches % self.adjust_freq == 0:
                        self._adjust()
                else:
                    self._chunk["yielded"] = i + 1
                yield batch
        self.set_epoch(self.epoch + 1)

    # -------------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the exact stream (see load_state_dict)."""
        return {
            "core": list(self._core.state()),
            "chunk": None if self._chunk is None else dict(self._chunk),
            "weights": list(self._core.weights()),
            "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "batches": self._batches,
            "target": list(self._target),
            "base": list(self._base),
            "pending": None if self._pending is None else list(self._pending),
            "scores": None if self._scores is None else list(self._scores),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict() of a sampler built on the same labels, seed, replicas and rank. Every field is
        checked (types, lengths, ranges, consistency with this sampler) before anything changes."""
        self._check_state(state)
        self._core.load_state(state["core"])
        self._core.set_weights(state["weights"])
        self._chunk = None if state["chunk"] is None else dict(state["chunk"])
        self.epoch = state["epoch"]
        self._batch_in_epoch = state["batch_in_epoch"]
        self._batches = state["batches"]
        self._target = list(state["target"])
        self._base = list(state["base"])
        self._pending = state["pending"]
        self._scores = state["scores"]

    def _check_state(self, state) -> None:
        def bad(what: str):
            raise ValueError(f"DynamicSampler.load_state_dict: {what}")

        keys = ("core", "chunk", "weights", "epoch", "batch_in_epoch", "batches", "target", "base", "pending", "scores")
        if not isinstance(state, Mapping) or any(k not in state for k in keys):
            bad(f"expected a state_dict() with keys {list(keys)}")
        n = len(self._sizes)

        def ints(v, lo=0):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        def vector(name, v, unit_sum: bool, allow_none: bool = False):
            if v is None and allow_none:
                return
            if not isinstance(v, (list, tuple)) or len(v) != n:
                bad(f"expected {name} to be a list of {n} numbers (one per class), but got {v!r:.80}")
            if any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0 for x in v):
                bad(f"expected {name} to hold finite non-negative numbers, but got {v}")
            if unit_sum and (abs(sum(v) - 1.0) > 1e-6 or any(x > 0 and self._sizes[c] == 0 for c, x in enumerate(v))):
                bad(f"expected {name} to be a distribution over classes that have items, but got {v}")

        def core(name, v):
            if not isinstance(v, (list, tuple)) or len(v) != 3 + 2 * n or not all(ints(x) for x in v) or v[2] != n:
                bad(f"{name} is not the state of a sampler over {n} classes")

        for name in ("epoch", "batch_in_epoch", "batches"):
            if not ints(state[name]):
                bad(f"expected {name} to be a non-negative integer, but got {state[name]!r}")
        if state["batch_in_epoch"] > len(self):
            bad(f"batch_in_epoch {state['batch_in_epoch']} is past the epoch's {len(self)} batches")
        if state["batches"] < state["batch_in_epoch"]:
            bad(f"batches ({state['batches']}) is below batch_in_epoch ({state['batch_in_epoch']})")
        core("core", state["core"])
        chunk = state["chunk"]
        if chunk is not None:
            if not isinstance(chunk, Mapping) or set(chunk) != {"core", "yielded"}:
                bad(f"expected chunk to be None or {{'core': ..., 'yielded': ...}}, but got {chunk!r:.80}")
            core("chunk['core']", chunk["core"])
            if not (ints(chunk["yielded"], 1) and chunk["yielded"] < _CHUNK_BATCHES):
                bad(f"expected chunk['yielded'] in [1, {_CHUNK_BATCHES}), but got {chunk['yielded']!r}")
            if chunk["yielded"] > state["batch_in_epoch"]:
                bad(f"chunk['yielded'] ({chunk['yielded']}) is past batch_in_epoch ({state['batch_in_epoch']})")
        vector("weights", state["weights"], unit_sum=False)
        if sum(state["weights"]) <= 0 or any(x > 0 and self._sizes[c] == 0 for c, x in enumerate(state["weights"])):
            bad(f"expected weights positive for some classes, and only for classes with items: {state['weights']}")
        for name in ("target", "base"):
            vector(name, state[name], unit_sum=True)
        vector("pending", state["pending"], unit_sum=True, allow_none=True)
        vector("scores", state["scores"], unit_sum=False, allow_none=True)
        if state["scores"] is not None and any(x > 1 for x in state["scores"]):
            bad(f"expected scores in [0, 1], but got {state['scores']}")
