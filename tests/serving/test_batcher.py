"""DynamicBatcher: results equal single calls, concurrency (threads, asyncio), failure isolation, timeouts,
back-pressure, close, stats, and the policy's behaviour under load (fake models with sleep-based latency; assertions on
trends with wide margins, so a loaded 2-core machine passes)."""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

import deepseek_ext
from deepseek_ext.serving import (
    BatcherClosed,
    DynamicBatcher,
    QueueFull,
    RequestTimeout,
    index_split,
    pad_collate,
    stack_collate,
    unpad_split,
)

pytestmark = pytest.mark.skipif(not deepseek_ext.NATIVE_AVAILABLE, reason="native module not built")


class FakeModel:
    """Sleeps base + per_item * batch seconds (a model of known latency); records every batch size it saw."""

    def __init__(self, base: float, per_item: float):
        self.base, self.per_item = base, per_item
        self.sizes: list[int] = []

    def __call__(self, x):
        self.sizes.append(x.shape[0])
        time.sleep(self.base + self.per_item * x.shape[0])
        return x * 2


def test_results_equal_single_calls_for_tensors_and_dicts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).eval()
    xs = [torch.randn(8) for _ in range(64)]
    with DynamicBatcher(model, max_batch_size=16, max_delay_ms=5) as b:
        got = [f.result() for f in [b.submit(x) for x in xs]]
    with torch.no_grad():
        for x, y in zip(xs, got):
            torch.testing.assert_close(y, model(x[None])[0], rtol=1e-6, atol=1e-6)
    # Row-wise arithmetic: bit for bit, and dict requests/outputs.
    fn = lambda d: {"y": torch.tanh(d["a"] * 3 + d["b"]), "n": d["a"].sum(-1)}  # noqa: E731
    reqs = [{"a": torch.randn(5), "b": torch.randn(5)} for _ in range(40)]
    with DynamicBatcher(fn, max_batch_size=8) as b:
        got = [f.result() for f in [b.submit(r) for r in reqs]]
    for r, y in zip(reqs, got):
        alone = fn({k: v[None] for k, v in r.items()})
        assert torch.equal(y["y"], alone["y"][0]) and torch.equal(y["n"], alone["n"][0])


def test_variable_lengths_padded_equal_single_calls():
    def fn(batch):  # per-sequence mean and per-position running sum, padding masked out
        padded, lengths = batch
        mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        return (padded * mask).cumsum(1)

    def pooled(batch):
        padded, lengths = batch
        mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        return (padded * mask).sum(1) / lengths[:, None]

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randn(int(n), 4, generator=g) for n in torch.randint(1, 20, (60,), generator=g)]
    with DynamicBatcher(fn, max_batch_size=16, collate=pad_collate, split=unpad_split) as b:
        got = [f.result() for f in [b.submit(s) for s in seqs]]
        assert max(b.stats()["batch_sizes"]) > 1  # requests of different lengths did share batches
    with DynamicBatcher(pooled, max_batch_size=16, collate=pad_collate) as b:
        got_pooled = [f.result() for f in [b.submit(s) for s in seqs]]
    for s, y, p in zip(seqs, got, got_pooled):
        assert y.shape == s.shape
        assert torch.equal(y, fn(pad_collate([s]))[0])
        assert torch.equal(p, pooled(pad_collate([s]))[0])


def test_collate_helpers():
    assert stack_collate([(torch.zeros(2), 1), (torch.ones(2), 2)])[1].tolist() == [1, 2]
    with pytest.raises(ValueError, match="dim 0 of size 3"):
        index_split(torch.zeros(2, 4), [None] * 3)
    with pytest.raises(TypeError, match="pass split="):
        index_split("text", [None])


def test_many_threads_get_their_own_results():
    seen_sizes = []

    def fn(x):
        seen_sizes.append(x.shape[0])
        return x * 10

    n_threads, each = 8, 300
    results: dict[int, list] = {}
    with DynamicBatcher(fn, max_batch_size=32, max_delay_ms=2, max_queue=n_threads * each) as b:

        def client(t):
            futures = [b.submit(torch.tensor([float(t * each + i)])) for i in range(each)]
            results[t] = [f.result().item() for f in futures]

        threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        stats = b.stats()
    for t in range(n_threads):
        assert results[t] == [10.0 * (t * each + i) for i in range(each)]
    assert stats["requests"] == n_threads * each
    assert sum(s * n for s, n in stats["batch_sizes"].items()) == n_threads * each
    assert max(seen_sizes) > 1


def test_asyncio_submissions():
    async def main(b):
        return await asyncio.gather(*(b.asubmit(torch.tensor(float(i))) for i in range(500)))

    with DynamicBatcher(lambda x: x + 0.5, max_batch_size=64) as b:
        out = asyncio.run(main(b))
    assert [o.item() for o in out] == [i + 0.5 for i in range(500)]


def test_torch_classes_wait_releases_the_gil():
    # A thread blocked in the custom class's next_batch (a TorchScript method call) must not hold the GIL.
    q = torch.classes.deepseek_ext.BatchQueue(8, 10.0, 0.0, [], 16, 1, 1)
    waiter = threading.Thread(target=q.next_batch, args=(0, 0.6, -1.0))
    waiter.start()
    time.sleep(0.05)
    t0, spins = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        spins += 1
    assert waiter.is_alive()
    assert spins > 10_000  # the main thread ran Python all along
    q.close(False)
    waiter.join()


def test_submitters_are_not_blocked_by_a_waiting_worker():
    # Fixed policy, long delay: the worker waits in C++ for a full batch while 4 threads submit.
    with DynamicBatcher(lambda x: x, max_batch_size=1000, max_delay_ms=5000, policy="fixed") as b:
        durations = []

        def client():
            t = time.perf_counter()
            for _ in range(200):
                b.submit(torch.zeros(1))
            durations.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert max(durations) < 2.0
        assert b.stats()["queued"] == 800 and b.stats()["batches"] == 0
        b.close(drain=True)
        assert b.stats()["batches"] == 1


def test_failure_isolation():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        if torch.isnan(x).any():
            raise ValueError("NaN in the input")
        return x + 1

    xs = [torch.tensor([float(i)]) for i in range(20)]
    xs[7] = torch.tensor([float("nan")])
    with DynamicBatcher(fn, max_batch_size=32, max_delay_ms=50, policy="fixed") as b:
        futures = [b.submit(x) for x in xs]
        for i, f in enumerate(futures):
            if i == 7:
                with pytest.raises(ValueError, match="NaN in the input"):
                    f.result()
            else:
                assert f.result().item() == i + 1
        assert b.stats()["failed"] == 1
    assert calls[0] == 20 and calls.count(1) == 20  # one batch, then each request alone


def test_unstackable_shapes_are_batched_apart():
    shapes = []

    def fn(x):
        shapes.append(tuple(x.shape))
        return x.sum(-1)

    xs = [torch.ones(3) if i % 3 else torch.ones(5) for i in range(30)] + [{"not": "a tensor"}]
    with DynamicBatcher(fn, max_batch_size=64, max_delay_ms=30, policy="fixed") as b:
        futures = [b.submit(x) for x in xs]
        for x, f in zip(xs[:-1], futures[:-1]):
            assert f.result().item() == x.shape[0]
        with pytest.raises(TypeError, match="cannot batch requests of type str"):
            futures[-1].result()
    assert sorted(shapes) == [(10, 5), (20, 3)]  # never a mixed batch, never an error for the others


def test_timeouts_fail_queued_requests_without_running_them():
    gate = threading.Event()
    ran = []

    def fn(x):
        ran.extend(x.flatten().tolist())
        gate.wait(20)
        return x

    with DynamicBatcher(fn, max_batch_size=1) as b:
        first = b.submit(torch.tensor([0.0]))
        while b.stats()["in_flight"] == 0:
            time.sleep(0.001)
        late = [b.submit(torch.tensor([float(i)]), timeout_ms=30) for i in range(1, 4)]
        patient = b.submit(torch.tensor([9.0]), timeout_ms=10_000)
        for f in late:  # on time, while the only worker is still busy with the first request
            with pytest.raises(RequestTimeout, match="timed out after 30 ms in the queue; it was not run"):
                f.result(timeout=5)
        assert not first.done()
        gate.set()
        assert first.result().item() == 0.0 and patient.result().item() == 9.0
        assert b.stats()["timed_out"] == 3
    assert ran == [0.0, 9.0]
    with DynamicBatcher(lambda x: x, timeout_ms=1000) as b:  # a default deadline that is met
        assert b(torch.tensor(1.0)).item() == 1.0


def test_cancelled_requests_are_not_run():
    gate, ran = threading.Event(), []

    def fn(x):
        ran.extend(x.flatten().tolist())
        gate.wait(5)
        return x

    with DynamicBatcher(fn, max_batch_size=8) as b:
        first = b.submit(torch.tensor([0.0]))
        while b.stats()["in_flight"] == 0:
            time.sleep(0.001)
        doomed, kept = b.submit(torch.tensor([1.0])), b.submit(torch.tensor([2.0]))
        assert doomed.cancel()
        gate.set()
        assert kept.result().item() == 2.0 and first.result().item() == 0.0
    with pytest.raises(CancelledError):
        doomed.result()
    assert ran == [0.0, 2.0]


def test_back_pressure_rejects_at_once():
    gate = threading.Event()
    b = DynamicBatcher(lambda x: (gate.wait(5), x)[1], max_batch_size=1, max_queue=4)
    first = b.submit(torch.zeros(1))
    while b.stats()["in_flight"] == 0:
        time.sleep(0.001)
    queued = [b.submit(torch.zeros(1)) for _ in range(4)]
    t = time.perf_counter()
    with pytest.raises(QueueFull, match=r"queue full \(4 requests waiting\)"):
        b.submit(torch.zeros(1))
    assert time.perf_counter() - t < 0.5
    assert b.stats()["rejected"] == 1
    gate.set()
    assert all(f.result(timeout=5).shape == (1,) for f in [first, *queued])
    b.close()


def test_close_with_and_without_drain():
    gate = threading.Event()

    def fn(x):
        gate.wait(5)
        return x

    b = DynamicBatcher(fn, max_batch_size=1)
    running = b.submit(torch.tensor([1.0]))
    while b.stats()["in_flight"] == 0:
        time.sleep(0.001)
    queued = [b.submit(torch.tensor([2.0])) for _ in range(3)]
    b.close(drain=False, timeout=0.05)  # the running batch is still blocked: do not wait for it here
    for f in queued:
        with pytest.raises(BatcherClosed, match="closed with drain=False before this request ran"):
            f.result(timeout=1)
    with pytest.raises(BatcherClosed, match="is closed"):
        b.submit(torch.zeros(1))
    gate.set()
    assert running.result(timeout=5).item() == 1.0  # a batch already running is not lost
    b.close()
    assert b.stats()["cancelled"] == 3

    b = DynamicBatcher(lambda x: x * 3, max_batch_size=4, max_delay_ms=60_000, policy="fixed")
    futures = [b.submit(torch.tensor([float(i)])) for i in range(10)]
    t = time.perf_counter()
    b.close(drain=True)
    assert time.perf_counter() - t < 5  # drained at once, not after the 60 s delay
    assert [f.result(timeout=0).item() for f in futures] == [3.0 * i for i in range(10)]
    assert b.closed


def test_stats():
    with DynamicBatcher(lambda x: x, max_batch_size=8) as b:
        for f in [b.submit(torch.zeros(2)) for _ in range(50)]:
            f.result()
        deadline = time.time() + 5
        while b.stats()["in_flight"] and time.time() < deadline:  # the worker books a batch when it returns
            time.sleep(0.001)
        s = b.stats()
    assert s["requests"] == 50 and s["rejected"] == s["timed_out"] == s["failed"] == 0
    assert sum(n for n in s["batch_sizes"].values()) == s["batches"]
    assert sum(k * n for k, n in s["batch_sizes"].items()) == 50
    assert max(s["batch_sizes"]) <= 8
    assert s["queued"] == 0 and s["in_flight"] == 0
    for key in ("queue_wait_ms", "compute_ms", "latency_ms"):
        fig = s[key]
        assert 0 <= fig["p50"] <= fig["p90"] <= fig["p99"] <= fig["max"] + 1e-9
    assert s["latency_ms"]["count"] == 50 and s["compute_ms"]["count"] == s["batches"]
    assert s["compute_estimate_ms"] and s["target_batch_size"] >= 1


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"fn": 3}, TypeError, "fn must be callable"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1"),
        ({"max_batch_size": 2.5}, TypeError, "max_batch_size must be an int"),
        ({"max_delay_ms": -1}, ValueError, "max_delay_ms must be finite and >= 0"),
        ({"latency_slo_ms": 0}, ValueError, "latency_slo_ms must be finite and > 0"),
        ({"max_queue": 0}, ValueError, "max_queue must be >= 1"),
        ({"num_workers": 0}, ValueError, "num_workers must be >= 1"),
        ({"collate": "stack"}, TypeError, "collate must be callable"),
        ({"policy": "greedy"}, ValueError, "policy must be one of"),
        ({"preferred_batch_sizes": [4, 64]}, ValueError, "must not exceed max_batch_size=32"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, message):
    args = {"fn": lambda x: x, **kwargs}
    with pytest.raises(error, match=message):
        DynamicBatcher(**args)


def test_import_without_the_http_stack():
    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
        "import torch, deepseek_ext.serving as s\n"
        "with s.DynamicBatcher(lambda x: x + 1) as b: assert b(torch.tensor(1.0)).item() == 2.0\n"
        "try:\n    import deepseek_ext.serving.server\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'deepseek-ext[serving]'" in out.stdout


# -- the policy under load -------------------------------------------------------------------------------------


def _open_loop(batcher, rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Poisson arrivals at `rate`/s for `seconds`; returns each request's latency (submit to result) in seconds."""
    rng = random.Random(seed)
    pending, latencies = [], []

    def done(start):
        return lambda f: latencies.append(time.perf_counter() - start)

    t0 = time.perf_counter()
    t = t0
    while t - t0 < seconds:
        t += rng.expovariate(rate)
        if (delay := t - time.perf_counter()) > 0:
            time.sleep(delay)
        f = batcher.submit(torch.ones(2))
        f.add_done_callback(done(time.perf_counter()))
        pending.append(f)
    for f in pending:
        f.result(timeout=30)
    return latencies


def test_batch_size_grows_with_the_arrival_rate():
    means = {}
    for rate in (40, 800):
        model = FakeModel(0.004, 0.0002)  # 4.2 ms at batch 1, 10.4 ms at batch 32
        with DynamicBatcher(model, max_batch_size=32, max_delay_ms=10) as b:
            _open_loop(b, rate, 1.5)
            means[rate] = b.stats()["mean_batch_size"]
    print(means)
    assert means[40] < 1.6
    assert means[800] > 2 * means[40]


def test_light_load_adds_no_more_than_the_delay():
    def light(policy):
        with DynamicBatcher(lambda x: x, max_batch_size=32, max_delay_ms=5, policy=policy) as b:
            out = []
            for _ in range(30):
                t = time.perf_counter()
                b(torch.zeros(2))
                out.append(time.perf_counter() - t)
                time.sleep(0.01)
            return statistics.median(out)

    adaptive, fixed = light("adaptive"), light("fixed")
    print(f"median latency: adaptive {adaptive * 1e3:.2f} ms, fixed window {fixed * 1e3:.2f} ms")
    assert adaptive < 0.006  # max_delay_ms + 1 ms (in fact it does not wait at light load)
    assert fixed >= 0.004  # the fixed window waits out its delay
    assert adaptive < fixed


def _slo_run(slo):
    model = FakeModel(0.005, 0.0005)
    with DynamicBatcher(model, max_batch_size=64, max_delay_ms=100, latency_slo_ms=slo) as b:
        lat = _open_loop(b, 300, 2.0, seed=1)
        return sorted(lat)[int(0.99 * len(lat))], b.stats()["mean_batch_size"]


def test_latency_slo_is_met_with_larger_batches():
    plain = _slo_run(None)
    # The policy plans for about 63 ms against the 80 ms SLO. A second try only absorbs a stall of the whole machine
    # (another process hogging both cores): a policy that ignores the SLO fails both.
    for _ in range(2):
        slo = _slo_run(80.0)
        print(
            f"no SLO: p99 {plain[0] * 1e3:.1f} ms, mean batch {plain[1]:.2f}; "
            f"SLO 80 ms: p99 {slo[0] * 1e3:.1f} ms, mean batch {slo[1]:.2f}"
        )
        if slo[0] < 0.080:
            break
    assert slo[0] < 0.080
    assert slo[1] > 1.5 * plain[1]  # the SLO's headroom buys larger (cheaper per request) batches


def test_saturation_throughput_beats_unbatched():
    def throughput(max_batch):
        model = FakeModel(0.003, 0.0002)  # batch 32 costs 9.4 ms, 2.9x batch 1 (3.2 ms)
        with DynamicBatcher(model, max_batch_size=max_batch, max_delay_ms=5, max_queue=10_000) as b:
            t = time.perf_counter()
            for f in [b.submit(torch.ones(2)) for _ in range(300)]:
                f.result()
            return 300 / (time.perf_counter() - t)

    batched, unbatched = throughput(32), throughput(1)
    print(f"saturation: {batched:.0f}/s batched vs {unbatched:.0f}/s unbatched")
    assert batched > 3 * unbatched


def test_batcher_overhead_is_small():
    # The target is >= 50,000 requests/s through a no-op fn on 2 cores (benchmarks/serving.py reports the figure); the
    # test is no timing: it asserts a floor far below it (the best of three tries, so a stall of the machine does not
    # decide it) that a per-request GIL hand-off or thread switch (hundreds to a few thousand requests/s) would miss.
    from benchmarks.serving import _overhead_per_request

    rate = max(1 / _overhead_per_request(20_000) for _ in range(3))
    print(f"{rate:,.0f} requests/s through a no-op fn")
    assert rate > 10_000


def test_preferred_batch_sizes_are_formed():
    sizes = []

    def fn(x):
        sizes.append(x.shape[0])
        return x

    with DynamicBatcher(fn, max_batch_size=16, max_delay_ms=50, preferred_batch_sizes=[4, 8], policy="fixed") as b:
        for f in [b.submit(torch.zeros(1)) for _ in range(20)]:
            f.result()
    assert sum(sizes) == 20 and set(sizes) <= {4, 8}  # never 16 nor the 12 or 20 that were queued at some point


def test_several_workers_run_batches_concurrently():
    lock, running, peak = threading.Lock(), [0], [0]

    def fn(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)  # releases the GIL, as torch ops do
        with lock:
            running[0] -= 1
        return x

    with DynamicBatcher(fn, max_batch_size=1, num_workers=3) as b:
        t = time.perf_counter()
        for f in [b.submit(torch.zeros(1)) for _ in range(3)]:
            f.result()
        elapsed = time.perf_counter() - t
    assert peak[0] >= 2 and elapsed < 0.28  # one worker alone would take 0.3 s
