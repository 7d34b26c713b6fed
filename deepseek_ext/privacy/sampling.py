"""Poisson sampling: every example joins a batch independently with probability ``sample_rate`` (the sampling that
DP-SGD's privacy accounting assumes). ``PoissonBatchSampler`` draws the batches; ``PoissonDataLoader`` is a new
DataLoader built from the user's (same dataset, collate function, workers, pinning), which is left unchanged."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .rng import secure_uniform


def check_real(owner: str, name: str, value, expected: str, ok) -> None:
    """ValueError (TypeError for a non-number) unless ``value`` is a finite real number with ``ok(value)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: expected {name} to be a number ({expected}), but got {type(value).__name__}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{owner}: expected {name} to be {expected}, but got {value}")


class PoissonBatchSampler(Sampler[list[int]]):
    """Each batch holds every example independently with probability ``sample_rate`` (so batches vary in size and
    may be empty); ``len`` is ``round(1 / sample_rate)`` batches per epoch.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=len(dataset), sample_rate=0.01)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)   # each example joins a batch with probability 0.01
    """

    def __init__(
        self, num_samples: int, sample_rate: float, generator: torch.Generator | None = None, secure_rng: bool = False
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"PoissonBatchSampler: expected num_samples >= 0, but got {num_samples!r}")
        check_real("PoissonBatchSampler", "sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.generator = generator
        self.secure_rng = secure_rng

    def __len__(self) -> int:
        return max(1, round(1 / self.sample_rate))

    def __iter__(self):
        for _ in range(len(self)):
            if self.secure_rng:
                u = secure_uniform(self.num_samples)
            else:
                u = torch.rand(self.num_samples, generator=self.generator)
            yield torch.nonzero(u < self.sample_rate).flatten().tolist()


def empty_like_sample(sample: Any) -> Any:
    """A batch of zero examples shaped like one (uncollated) example: tensors get a leading 0 dimension, Python
    numbers become empty tensors of their type, anything else is kept."""

    def empty(x):
        if isinstance(x, torch.Tensor):
            return torch.empty((0, *x.shape), dtype=x.dtype)
        if isinstance(x, bool):
            return torch.empty(0, dtype=torch.bool)
        if isinstance(x, int):
            return torch.empty(0, dtype=torch.int64)
        if isinstance(x, float):
            return torch.empty(0, dtype=torch.float64)
        return x

    return pytree.tree_map(empty, sample)


class EmptyAwareCollate:
    """The user's collate function, plus empty Poisson batches (which most collate functions cannot build)."""

    def __init__(self, collate_fn, dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, batch):
        if len(batch) == 0:
            return empty_like_sample(self.dataset[0])
        return self.collate_fn(batch)


class PoissonDataLoader(DataLoader):
    """A Poisson-sampling DataLoader built from ``loader``: the same dataset, collate function, workers, worker init,
    multiprocessing context, pinning, timeout and prefetching; batches drawn by ``PoissonBatchSampler``. ``loader``
    itself is not changed. ``batches_drawn`` counts the batches handed out (the DP optimizer checks that each step
    saw at least one).

    Example:
        >>> poisson = PoissonDataLoader(train_loader, sample_rate=0.01)
        >>> for x, y in poisson:   # batches of varying size, possibly empty
        ...     ...
    """

    def __init__(
        self,
        loader: DataLoader,
        sample_rate: float,
        generator: torch.Generator | None = None,
        secure_rng: bool = False,
    ):
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError(
                "PoissonDataLoader: expected a loader over a map-style dataset (with __getitem__ and __len__), "
                f"but got one over an IterableDataset ({type(loader.dataset).__name__})"
            )
        workers = loader.num_workers
        super().__init__(
            loader.dataset,
            batch_sampler=PoissonBatchSampler(len(loader.dataset), sample_rate, generator, secure_rng),
            num_workers=workers,
            collate_fn=EmptyAwareCollate(loader.collate_fn, loader.dataset),
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context if workers > 0 else None,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if workers > 0 else None,
            persistent_workers=loader.persistent_workers if workers > 0 else False,
            pin_memory_device=loader.pin_memory_device,
        )
        self.batches_drawn = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.batches_drawn += 1
            yield batch
