"""Serving: an open-loop HTTP load generator for the reference server, and the DynamicBatcher cases of the
benchmark report.

Load generator (``python -m benchmarks.serving``): Poisson arrivals at a given rate against a server on 127.0.0.1,
bounded in count and in time, over keep-alive HTTP/1.1 connections (a small asyncio client: a general-purpose client
would cost more CPU per request than the server on a 2-core machine). Latency is measured from each request's
*scheduled* send time, so a slow server cannot hide its queueing in a slower client (no coordinated omission).

    python -m benchmarks.serving --url http://127.0.0.1:8000/predict --rate 100 --duration 10 \\
        --body '{"inputs": [1, 2, 3]}'                      # or --tokens 8 32 2000: random token-id lists

Report cases (``python -m benchmarks --family serving``), measured in-process:
  - the batcher's own overhead: requests/s through a no-op ``fn`` (one client thread, 1024 requests in flight);
  - throughput at saturation against no batching, for a stand-in model of known cost whose batch-32 call costs 2.9x
    its batch-1 call, and for a real narrow MLP (its measured batch-32 / batch-1 cost ratio is in the row);
  - added latency at light load against a fixed-window batcher with the same max delay (Ray Serve's policy).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

# -- the load generator (no torch needed) ------------------------------------------------------------------------


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        payload = await self.reader.readexactly(length)
        if close:
            self.writer.close()
            raise _Closed(status, payload)
        return status, payload


class _Closed(Exception):
    def __init__(self, status: int, payload: bytes):
        self.status, self.payload = status, payload


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def _load(
    url: str,
    rate: float,
    duration: float,
    make_body: Callable[[int], bytes],
    max_requests: int,
    max_connections: int,
    seed: int,
    grace: float,
) -> dict:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n".encode()
    idle: list[_Connection] = []
    opened = 0
    slots = asyncio.Semaphore(max_connections)
    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    finished: list[float] = []

    async def one(i: int, scheduled: float) -> None:
        nonlocal opened
        body = make_body(i)
        async with slots:
            status = 0  # a transport failure unless a response comes
            for attempt in range(2):
                reused = bool(idle) and attempt == 0  # a retry always opens a fresh connection
                conn = idle.pop() if reused else None
                try:
                    if conn is None:
                        opened += 1
                        conn = _Connection(*await asyncio.open_connection(host, port))
                    status, _ = await conn.post(head, body)
                    idle.append(conn)
                    break
                except _Closed as e:
                    status = e.status
                    break
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    if conn is not None:
                        conn.writer.close()
                    if not reused:  # a pooled connection the server had closed (keep-alive timeout): retry once
                        break
        now = time.perf_counter()
        statuses[status] += 1
        if status == 200:
            latencies.append(now - scheduled)
            finished.append(now)

    loop_start = time.perf_counter()
    t, tasks = loop_start, []
    while len(tasks) < max_requests:
        t += rng.expovariate(rate)
        if t - loop_start > duration:
            break
        if (delay := t - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(len(tasks), t)))
    sent_for = time.perf_counter() - loop_start
    done, pending = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    for conn in idle:
        conn.writer.close()
    ok = len(latencies)
    span = (max(finished) - loop_start) if finished else float("nan")
    return {
        "url": url,
        "rate": rate,
        "duration_s": duration,
        "sent": len(tasks),
        "offered_rate": len(tasks) / sent_for if sent_for > 0 else float("nan"),
        "ok": ok,
        "errors": {str(k): v for k, v in sorted(statuses.items()) if k != 200},
        "unfinished": len(pending),
        "throughput": ok / span if ok else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1e3,
            "p90": percentile(latencies, 90) * 1e3,
            "p99": percentile(latencies, 99) * 1e3,
            "mean": statistics.fmean(latencies) * 1e3 if latencies else float("nan"),
        },
        "connections": opened,
    }


def run_load(
    url: str,
    rate: float,
    duration: float,
    make_body: Callable[[int], bytes],
    max_requests: int = 100_000,
    max_connections: int = 512,
    seed: int = 0,
    grace: float = 30.0,
) -> dict:
    """Open-loop Poisson load: about ``rate`` requests per second for ``duration`` seconds (at most
    ``max_requests``), then up to ``grace`` seconds for the answers. Returns sent / ok / errors by status,
    throughput (answers per second), and latency percentiles from the scheduled send times."""
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load generator only targets this machine (127.0.0.1 / localhost), not {host!r}")
    return asyncio.run(_load(url, rate, duration, make_body, max_requests, max_connections, seed, grace))


def token_bodies(min_len: int, max_len: int, vocab: int, seed: int = 0) -> Callable[[int], bytes]:
    """Request bodies ``{"inputs": [token ids]}`` of random lengths in [min_len, max_len] (deterministic per index)."""

    def make(i: int) -> bytes:
        r = random.Random(seed * 1_000_003 + i)
        ids = [r.randrange(1, vocab) for _ in range(r.randint(min_len, max_len))]
        return json.dumps({"inputs": ids}).encode()

    return make


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/predict")
    p.add_argument("--rate", type=float, required=True, help="requests per second (Poisson arrivals)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--max-connections", type=int, default=512)
    p.add_argument("--grace", type=float, default=30.0, help="seconds to wait for answers after sending")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--body", help="the JSON body of every request")
    g.add_argument("--tokens", nargs=3, type=int, metavar=("MIN", "MAX", "VOCAB"), help="random token-id lists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    if args.body is not None:
        body = args.body.encode()
        json.loads(body)  # fail early on a malformed body
        make = lambda i: body  # noqa: E731
    else:
        make = token_bodies(*args.tokens, seed=args.seed)
    result = run_load(
        args.url, args.rate, args.duration, make, args.max_requests, args.max_connections, args.seed, args.grace
    )
    lat = result["latency_ms"]
    print(
        f"{result['url']}: offered {result['offered_rate']:.0f}/s, {result['ok']}/{result['sent']} ok, "
        f"throughput {result['throughput']:.0f}/s, latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms, "
        f"errors {result['errors'] or 'none'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] else 1)


# -- report cases (in-process) ------------------------------------------------------------------------------------


def _overhead_per_request(n: int, max_batch: int = 64, window: int = 1024) -> float:
    import torch

    from deepseek_ext.serving import DynamicBatcher

    x = torch.zeros(4)
    with DynamicBatcher(lambda b: b, max_batch_size=max_batch, max_delay_ms=5, max_queue=10 * window) as b:
        for f in [b.submit(x) for _ in range(256)]:  # warm-up
            f.result()
        q: collections.deque = collections.deque()
        start = time.perf_counter()
        for _ in range(n):
            if len(q) >= window:
                q.popleft().result()
            q.append(b.submit(x))
        for f in q:
            f.result()
        return (time.perf_counter() - start) / n


IN_FEATURES = 64


def _mlp(width: int, depth: int):
    """A narrow, deep MLP (tabular / ranking-style): at batch 1 its cost is mostly per-layer overhead, so batching
    is cheap. Its measured batch-32 / batch-1 cost ratio is printed with the result."""
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Linear(IN_FEATURES, width), torch.nn.ReLU()]
    for _ in range(depth - 2):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers).eval()


class LatencyModel:
    """A stand-in model of known cost: sleeps ``base + per_item * batch`` seconds (no CPU used), returns 2x."""

    def __init__(self, base: float, per_item: float):
        self.base, self.per_item = base, per_item

    def __call__(self, x):
        time.sleep(self.base + self.per_item * x.shape[0])
        return x * 2


def _call_seconds(model, batch: int, reps: int = 50) -> float:
    import torch

    x = torch.randn(batch, IN_FEATURES)
    with torch.no_grad():
        for _ in range(3):
            model(x)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - start) / reps


def _saturated_per_request(model, max_batch: int, n: int) -> float:
    """Seconds per request when n requests are queued at once (closed loop: the server is saturated)."""
    import torch

    from deepseek_ext.serving import DynamicBatcher

    xs = [torch.randn(IN_FEATURES) for _ in range(n)]
    with DynamicBatcher(model, max_batch_size=max_batch, max_delay_ms=5, max_queue=2 * n) as b:
        for f in [b.submit(x) for x in xs[:64]]:  # warm-up and a first latency estimate
            f.result()
        start = time.perf_counter()
        for f in [b.submit(x) for x in xs]:
            f.result()
        return (time.perf_counter() - start) / n


def _light_load_latency(policy: str, n: int, gap_s: float = 0.01, delay_ms: float = 5.0) -> float:
    import torch

    from deepseek_ext.serving import DynamicBatcher

    out = []
    with DynamicBatcher(lambda b: b, max_batch_size=32, max_delay_ms=delay_ms, policy=policy) as b:
        for _ in range(n):
            start = time.perf_counter()
            b(torch.zeros(4))
            out.append(time.perf_counter() - start)
            time.sleep(gap_s)
    return statistics.median(out)


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list:
    from benchmarks.runner import Case

    out = []
    n = 30_000 if quick else 200_000
    per = _overhead_per_request(n)
    out.append(
        Case(
            family="serving",
            op="DynamicBatcher",
            config=f"no-op fn, {n // 1000}k requests",
            ours=None,
            baseline=None,
            baseline_name=f"(overhead: {1 / per:,.0f} requests/s)",
            ours_s=per,
            extra={"requests_per_s": 1 / per},
        )
    )
    import torch

    fake = LatencyModel(0.003, 0.0002)
    count = 300 if quick else 1500
    for name, model, ratio in [
        ("latency model 3 ms + 0.2 ms/item", fake, (0.003 + 32 * 0.0002) / (0.003 + 0.0002)),
        ("MLP 6 x 256, 1 thread", _mlp(256, 6), None),
    ]:
        # One intra-op thread for the real model, as a server pins it (--threads): on a shared 2-core machine two
        # OpenMP threads per GEMM measure the contention, not the batching.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if ratio is None:
                ratio = _call_seconds(model, 32) / _call_seconds(model, 1)
            batched = _saturated_per_request(model, 32, count)
            unbatched = _saturated_per_request(model, 1, count // 2)
        finally:
            torch.set_num_threads(threads)
        out.append(
            Case(
                family="serving",
                op="DynamicBatcher",
                config=f"saturation, {name} (b32 = {ratio:.1f}x b1)",
                ours=None,
                baseline=None,
                baseline_name="no batching (max_batch_size=1)",
                ours_s=batched,
                baseline_s=unbatched,
                extra={"batch32_over_batch1_cost": ratio, "throughput_ratio": unbatched / batched},
            )
        )
    light = 20 if quick else 100
    out.append(
        Case(
            family="serving",
            op="DynamicBatcher",
            config="light load, median latency",
            ours=None,
            baseline=None,
            baseline_name="fixed window, same max delay (Ray Serve policy)",
            ours_s=_light_load_latency("adaptive", light),
            baseline_s=_light_load_latency("fixed", light),
        )
    )
    return out


if __name__ == "__main__":
    main()
