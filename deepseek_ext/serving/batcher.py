"""DynamicBatcher: requests from any number of threads or asyncio tasks, served by a model in batches whose size
follows the load.

The queue, its clock and the batching policy are C++ (``torch.classes.deepseek_ext.BatchQueue``,
csrc/serving/batch_queue.h); it holds request ids, while the payloads and futures stay here. Worker threads block
in ``BatchQueue.next_batch`` without the GIL (PyTorch releases it around every custom-class call) and take the GIL
only to collate, call ``fn``, split and complete the futures.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import math
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Callable

import torch

from .. import _native
from .._native import require_native
from .collate import index_split, stack_collate, stack_key
from .errors import BatcherClosed, QueueFull, RequestTimeout

_POLICIES = {"adaptive": 0, "fixed": 1}
_POLL_S = 0.5  # a worker re-checks for shutdown at least this often (close() wakes it at once anyway)
_PUSH_OK, _PUSH_FULL, _PUSH_CLOSED = 0, 1, 2
_MAX_GROUP_KEYS = 4096
_LIVE: weakref.WeakSet = weakref.WeakSet()  # batchers not closed yet, closed at interpreter exit


@atexit.register
def _close_all() -> None:
    # A worker still blocked in C++ when the interpreter finalises would be torn down mid-call (and abort the
    # process): shut every open batcher down first. Queued requests fail with BatcherClosed.
    for batcher in list(_LIVE):
        batcher.close(drain=False, timeout=5.0)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DynamicBatcher: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"DynamicBatcher: {name} must be >= {low}, got {value}")
    return value


def _check_ms(name: str, value: Any, allow_none: bool, positive: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"DynamicBatcher: {name} must be a number of milliseconds, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"DynamicBatcher: {name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"DynamicBatcher: {name} must be callable, got {type(value).__name__}")


class DynamicBatcher:
    """Batches requests for ``fn`` dynamically: the batch grows with the arrival rate, within a latency budget.

    Each request is one sample (by default a tensor, or a dict / list / tuple of tensors); requests that can be
    stacked together (same :func:`~deepseek_ext.serving.stack_key`: shapes, dtypes, devices) share batches, others are
    batched apart. ``fn`` gets ``collate(requests)`` and returns a batch of results that ``split`` cuts back into
    one result per request, so every caller gets its own slice, as if it had called ``fn`` alone.

    Policy (in C++): a batch goes out when its group holds the current *target* size or its oldest request has
    waited ``max_delay_ms``. The target is the batch that arrives while one batch is served, with 20% headroom: the
    smallest ``b`` with ``arrival_rate * L(b) / num_workers <= 0.8 * b``, where ``L(b)`` is a moving estimate of
    ``fn``'s measured time per batch size (interpolated for sizes not seen yet). At light load that is 1 (no
    waiting at all); as the load grows so does the batch, up to ``max_batch_size``. With ``latency_slo_ms`` the
    target is instead the largest size whose predicted queueing (the 99th percentile of Poisson arrivals, at most
    ``max_delay_ms``) plus compute time fits in 85% of the SLO; a batch also goes out as soon as waiting longer would
    leave too little time to compute it within that budget, and a backlog is served in batches that can still finish
    in time. When a batch goes out it takes every queued request of its group up to that cap (a backlog is never
    split into small batches).
    ``policy='fixed'`` is the fixed-window policy of Ray Serve's ``@serve.batch`` and TorchServe: always wait for
    ``max_batch_size`` or ``max_delay_ms``.

    Failures stay with their request: if ``fn`` (or collate / split) raises on a batch, the batch is retried request
    by request and only the requests that fail alone get the exception. A full queue rejects at once with
    :class:`~deepseek_ext.serving.QueueFull`; a request whose deadline passed in the queue fails with
    :class:`~deepseek_ext.serving.RequestTimeout` and is not run (at its deadline, even while every worker is busy);
    a cancelled future is dropped before it runs.
    ``fn`` runs under ``torch.no_grad()`` in the batcher's worker threads.

    Args:
        fn: ``fn(batch) -> batch of results``, e.g. an ``nn.Module`` in eval mode.
        max_batch_size: the largest batch.
        max_delay_ms: the longest a request waits for its batch to fill (while a worker is free).
        latency_slo_ms: target end-to-end latency; ``None`` for none (see the policy above).
        collate: ``collate(requests) -> batch``; default :func:`~deepseek_ext.serving.stack_collate`.
        split: ``split(output, requests) -> list`` of one result per request; default
            :func:`~deepseek_ext.serving.index_split`.
        max_queue: requests that may wait at once; more are rejected with ``QueueFull``.
        num_workers: threads calling ``fn`` (more than one helps when ``fn`` releases the GIL, as torch ops do).
        preferred_batch_sizes: sizes to form whenever one fits (e.g. those a compiled model or a CUDA graph was
            captured for); a batch is smaller than all of them only when ``max_delay_ms`` or ``close()`` forces it.
        timeout_ms: default deadline of a request in the queue (``None``: none); ``submit`` can override it.
        policy: ``'adaptive'`` (default) or ``'fixed'``.
        group_key: ``group_key(request) -> hashable``: requests with equal keys may share a batch. Default:
            :func:`~deepseek_ext.serving.stack_key` with the default collate, a single group with a custom one.
        name: a label for the worker threads and the server's metrics.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or out of range.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import DynamicBatcher
        >>> model = torch.nn.Linear(4, 2).eval()
        >>> with DynamicBatcher(model, max_batch_size=16, max_delay_ms=2) as batcher:
        ...     futures = [batcher.submit(torch.randn(4)) for _ in range(100)]
        ...     outputs = [f.result() for f in futures]          # one (2,) tensor per request
        ...     one = batcher(torch.randn(4))                     # blocking call
        >>> outputs[0].shape, batcher.stats()["requests"]
        (torch.Size([2]), 101)
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        latency_slo_ms: float | None = None,
        collate: Callable[[list], Any] | None = None,
        split: Callable[[Any, list], Sequence[Any]] | None = None,
        max_queue: int = 1024,
        num_workers: int = 1,
        *,
        preferred_batch_sizes: Sequence[int] | None = None,
        timeout_ms: float | None = None,
        policy: str = "adaptive",
        group_key: Callable[[Any], Any] | None = None,
        name: str | None = None,
    ):
        if not callable(fn):
            raise TypeError(f"DynamicBatcher: fn must be callable, got {type(fn).__name__}")
        for arg, value in (("collate", collate), ("split", split), ("group_key", group_key)):
            _check_callable(arg, value)
        self.max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        self.max_delay_ms = _check_ms("max_delay_ms", max_delay_ms, allow_none=False, positive=False)
        self.latency_slo_ms = _check_ms("latency_slo_ms", latency_slo_ms, allow_none=True, positive=True)
        self.timeout_ms = _check_ms("timeout_ms", timeout_ms, allow_none=True, positive=True)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        self.num_workers = _check_int("num_workers", num_workers, 1)
        if policy not in _POLICIES:
            raise ValueError(f"DynamicBatcher: policy must be one of {sorted(_POLICIES)}, got {policy!r}")
        self.policy = policy
        preferred = [] if preferred_batch_sizes is None else list(preferred_batch_sizes)
        for p in preferred:
            _check_int("each of preferred_batch_sizes", p, 1)
            if p > max_batch_size:
                raise ValueError(
                    f"DynamicBatcher: preferred_batch_sizes must not exceed max_batch_size={max_batch_size}, got {p}"
                )
        self.preferred_batch_sizes = sorted(set(preferred))
        require_native("serving.DynamicBatcher")

        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._collate = collate or stack_collate
        self._split = split or index_split
        self._key = group_key or (stack_key if collate is None else (lambda _request: None))
        self._queue = torch.classes.deepseek_ext.BatchQueue(
            max_batch_size,
            self.max_delay_ms / 1e3,
            (self.latency_slo_ms or 0.0) / 1e3,
            self.preferred_batch_sizes,
            max_queue,
            num_workers,
            _POLICIES[policy],
        )
        # The hot calls skip TorchScript's call machinery: see csrc/serving/serving_capi.cpp.
        self._handle = self._queue.handle()
        self._push = _native._C._serving_push
        self._next_batch = _native._C._serving_next_batch
        self._reaper: threading.Thread | None = None  # fails timed-out requests while workers are busy
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Any, Future, float | None]] = {}
        self._groups: dict[Any, int] = {}
        self._group_ids = itertools.count()
        self._groups_lock = threading.Lock()
        self._failed = 0
        self._failed_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"DynamicBatcher-{self.name}-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for w in self._workers:
            w.start()
        _LIVE.add(self)
        if self.timeout_ms is not None:
            self._start_reaper()

    # -- submitting ---------------------------------------------------------------------------------------------

    def submit(self, request: Any, timeout_ms: float | None = None) -> Future:
        """Queues one request and returns a future for its result (thread-safe, never blocks).

        Args:
            request: one sample (a tensor without the batch dim, or whatever ``collate`` takes).
            timeout_ms: deadline in the queue; default the batcher's ``timeout_ms``. A request still queued at its
                deadline fails with ``RequestTimeout`` and is not run.

        Returns:
            A ``concurrent.futures.Future`` with the request's own result (or its exception).

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            BatcherClosed: after ``close()``.

        Example:
            >>> import torch
            >>> from deepseek_ext.serving import DynamicBatcher
            >>> with DynamicBatcher(lambda x: x * 2) as b:
            ...     b.submit(torch.tensor([1.0, 2.0])).result().tolist()
            [2.0, 4.0]
        """
        key = self._key(request)
        group = self._groups.get(key)
        if group is None:
            with self._groups_lock:
                if len(self._groups) >= _MAX_GROUP_KEYS:  # e.g. every request a new length: forget old shapes
                    self._groups.clear()
                group = self._groups.setdefault(key, next(self._group_ids))
        timeout = self.timeout_ms if timeout_ms is None else _check_ms("timeout_ms", timeout_ms, False, True)
        if timeout is not None and self._reaper is None:
            self._start_reaper()
        rid = next(self._ids)
        future: Future = Future()
        self._pending[rid] = (request, future, timeout)
        status = self._push(self._handle, rid, group, 0.0 if timeout is None else timeout / 1e3)
        if status != _PUSH_OK:
            del self._pending[rid]
            if status == _PUSH_FULL:
                raise QueueFull(
                    f"DynamicBatcher {self.name!r}: queue full ({self.max_queue} requests waiting); request rejected. "
                    "Retry later, add capacity, or raise max_queue."
                )
            raise BatcherClosed(f"DynamicBatcher {self.name!r} is closed; it accepts no new requests")
        return future

    def __call__(self, request: Any, timeout_ms: float | None = None) -> Any:
        """Submits one request and waits for its result (blocking).

        Args:
            request: one sample.
            timeout_ms: deadline in the queue, as for ``submit``.

        Returns:
            The request's result.

        Example:
            >>> import torch
            >>> from deepseek_ext.serving import DynamicBatcher
            >>> with DynamicBatcher(lambda x: x + 1) as b:
            ...     b(torch.tensor(1.0)).item()
            2.0
        """
        return self.submit(request, timeout_ms).result()

    async def asubmit(self, request: Any, timeout_ms: float | None = None) -> Any:
        """Submits one request and awaits its result (asyncio; the event loop is never blocked).

        Cancelling the awaiting task cancels the request if it has not started.

        Args:
            request: one sample.
            timeout_ms: deadline in the queue, as for ``submit``.

        Returns:
            The request's result.

        Example:
            >>> import asyncio, torch
            >>> from deepseek_ext.serving import DynamicBatcher
            >>> async def main(b):
            ...     return await asyncio.gather(*(b.asubmit(torch.tensor(float(i))) for i in range(4)))
            >>> with DynamicBatcher(lambda x: x * 10) as b:
            ...     [r.item() for r in asyncio.run(main(b))]
            [0.0, 10.0, 20.0, 30.0]
        """
        return await asyncio.wrap_future(self.submit(request, timeout_ms))

    # -- serving ------------------------------------------------------------------------------------------------

    def _work(self, slot: int) -> None:
        next_batch, handle, pending = self._next_batch, self._handle, self._pending
        service = -1.0
        with torch.no_grad():
            while True:
                ids, expired, _group, finished = next_batch(handle, slot, _POLL_S, service)
                service = -1.0
                for rid in expired:
                    self._expire(rid)
                if ids:
                    service = self._serve([pending.pop(rid) for rid in ids])
                elif finished:
                    return

    def _expire(self, rid: int) -> None:
        _request, future, timeout = self._pending.pop(rid)
        if future.set_running_or_notify_cancel():
            future.set_exception(
                RequestTimeout(
                    f"DynamicBatcher {self.name!r}: request timed out after {timeout:g} ms in the queue; it was not run"
                )
            )

    def _start_reaper(self) -> None:
        with self._groups_lock:
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, name=f"DynamicBatcher-{self.name}-timeouts", daemon=True
                )
                self._reaper.start()

    def _reap(self) -> None:
        # Waits in C++ (without the GIL) for the next deadline, so a request times out on time even while every
        # worker is busy in fn; workers also drop expired requests when they form a batch.
        reap, handle = _native._C._serving_reap, self._handle
        while True:
            ids, finished = reap(handle, _POLL_S)
            for rid in ids:
                self._expire(rid)
            if finished:
                return

    def _serve(self, entries: list[tuple[Any, Future, float | None]]) -> float:
        """Runs one batch; returns its time in seconds, or -1 when it is not a clean measurement of its size."""
        live = [(request, future) for request, future, _ in entries if future.set_running_or_notify_cancel()]
        if not live:
            return -1.0
        requests = [request for request, _ in live]
        try:
            start = time.perf_counter()
            results = self._split(self.fn(self._collate(requests)), requests)
            elapsed = time.perf_counter() - start
            if len(results) != len(requests):
                raise ValueError(f"split returned {len(results)} results for a batch of {len(requests)} requests")
        except Exception as exc:
            if len(live) == 1:
                ((_, only),) = live
                self._fail(only, exc)
            else:  # isolate the failure: each request alone, so only the bad ones fail
                for request, future in live:
                    self._serve_one(request, future)
            return -1.0
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: fail the batch, never leave it hanging
            for _, future in live:
                self._fail(future, exc)
            raise
        for (_, future), result in zip(live, results):
            future.set_result(result)
        return elapsed if len(live) == len(entries) else -1.0

    def _serve_one(self, request: Any, future: Future) -> None:
        try:
            results = self._split(self.fn(self._collate([request])), [request])
            if len(results) != 1:
                raise ValueError(f"split returned {len(results)} results for a batch of 1 request")
        except Exception as exc:
            self._fail(future, exc)
        else:
            future.set_result(results[0])

    def _fail(self, future: Future, exc: BaseException) -> None:
        with self._failed_lock:
            self._failed += 1
        future.set_exception(exc)

    # -- lifecycle and metrics ----------------------------------------------------------------------------------

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting requests and shuts the workers down. Idempotent.

        Args:
            drain: ``True``: everything queued is still served (at once, without waiting for fuller batches);
                ``False``: queued requests fail with ``BatcherClosed`` (batches already running finish).
            timeout: seconds to wait for the workers (``None``: until they finish).

        Example:
            >>> import torch
            >>> from deepseek_ext.serving import DynamicBatcher
            >>> b = DynamicBatcher(lambda x: x)
            >>> f = b.submit(torch.zeros(1)); b.close(drain=True); f.done()
            True
        """
        with self._close_lock:
            self._closed = True
            cancelled = self._queue.close(drain)
        for rid in cancelled:
            entry = self._pending.pop(rid, None)
            if entry is not None and entry[1].set_running_or_notify_cancel():
                entry[1].set_exception(
                    BatcherClosed(f"DynamicBatcher {self.name!r} was closed with drain=False before this request ran")
                )
        _LIVE.discard(self)
        current = threading.current_thread()
        for w in [*self._workers, *([self._reaper] if self._reaper is not None else [])]:
            if w is not current:
                w.join(timeout)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(drain=True)

    def stats(self) -> dict[str, Any]:
        """Counters and latency figures since construction.

        Returns:
            A dict with ``requests`` (accepted), ``batches``, ``rejected`` (queue full), ``timed_out``,
            ``cancelled`` (by ``close(drain=False)``), ``failed`` (``fn`` raised for them), ``queued`` and
            ``in_flight`` now, ``batch_sizes`` (``{size: batches}``), ``mean_batch_size``, ``queue_wait_ms``,
            ``compute_ms`` (per batch: collate + ``fn`` + split) and ``latency_ms`` (per request, queue to result),
            each ``{'p50', 'p90', 'p99', 'mean', 'max', 'sum', 'count'}``, the current ``target_batch_size`` and
            ``arrival_rate`` (requests/s), and ``compute_estimate_ms`` (the policy's ``{size: ms}`` model).
            Percentiles come from log-scale histograms (within about 2%). A batch's compute time, its requests'
            latencies and ``in_flight`` are booked when its worker comes back for the next batch, right after
            completing the futures.

        Example:
            >>> import torch
            >>> from deepseek_ext.serving import DynamicBatcher
            >>> with DynamicBatcher(lambda x: x) as b:
            ...     _ = [f.result() for f in [b.submit(torch.zeros(2)) for _ in range(10)]]
            ...     s = b.stats()
            >>> s["requests"], sum(size * n for size, n in s["batch_sizes"].items())
            (10, 10)
        """
        counters, sizes, figures, estimate = self._queue.stats()

        def ms(name: str) -> dict[str, float]:
            out = {q: figures[f"{name}_{q}"] * 1e3 for q in ("p50", "p90", "p99", "mean", "max", "sum")}
            out["count"] = int(figures[f"{name}_count"])
            return out

        batch_sizes = {b: n for b, n in enumerate(sizes) if n}
        batches = sum(batch_sizes.values())
        return {
            "requests": counters["requests"],
            "batches": counters["batches"],
            "rejected": counters["rejected"],
            "timed_out": counters["timed_out"],
            "cancelled": counters["cancelled"],
            "failed": self._failed,
            "queued": counters["queued"],
            "in_flight": counters["in_flight"],
            "batch_sizes": batch_sizes,
            "mean_batch_size": sum(b * n for b, n in batch_sizes.items()) / batches if batches else 0.0,
            "queue_wait_ms": ms("queue_wait"),
            "compute_ms": ms("compute"),
            "latency_ms": ms("latency"),
            "target_batch_size": counters["target_batch_size"],
            "arrival_rate": figures["arrival_rate"],
            "compute_estimate_ms": {b: e * 1e3 for b, e in enumerate(estimate) if e >= 0},
        }

    def __repr__(self) -> str:
        return (
            f"DynamicBatcher({self.name!r}, max_batch_size={self.max_batch_size}, max_delay_ms={self.max_delay_ms}, "
            f"latency_slo_ms={self.latency_slo_ms}, policy={self.policy!r}, closed={self._closed})"
        )
