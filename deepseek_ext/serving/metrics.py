"""Prometheus text exposition (format 0.0.4) of DynamicBatcher statistics, written by hand: no client library."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "deepseek_serving"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def render_prometheus(stats: Mapping[str, Mapping[str, Any]], http_counts: Mapping[tuple[str, int], int]) -> str:
    """The metrics page: per model (label ``model``) counters, gauges, the batch-size histogram and latency
    summaries; HTTP responses per model and status code.

    Args:
        stats: ``{model name: DynamicBatcher.stats()}``.
        http_counts: ``{(model name, status code): responses}``.

    Returns:
        The page text.
    """
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"{PREFIX}_{name}"
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} {kind}")
        return full

    counters = [
        ("requests_total", "requests", "Requests accepted into the batcher's queue."),
        ("batches_total", "batches", "Batches run."),
        ("rejected_total", "rejected", "Requests rejected because the queue was full."),
        ("timed_out_total", "timed_out", "Requests whose deadline passed in the queue (not run)."),
        ("cancelled_total", "cancelled", "Requests failed by close(drain=False)."),
        ("failed_total", "failed", "Requests for which the model raised."),
    ]
    for metric, key, help_text in counters:
        full = family(metric, "counter", help_text)
        out += [f'{full}{{model="{_label(m)}"}} {s[key]}' for m, s in stats.items()]
    gauges = [
        ("queue_depth", "queued", "Requests waiting now."),
        ("in_flight", "in_flight", "Requests in batches being run now."),
        ("target_batch_size", "target_batch_size", "The batch size the policy waits for now."),
        ("arrival_rate", "arrival_rate", "Estimated arrival rate, requests per second."),
    ]
    for metric, key, help_text in gauges:
        full = family(metric, "gauge", help_text)
        out += [f'{full}{{model="{_label(m)}"}} {_num(s[key])}' for m, s in stats.items()]

    full = family("batch_size", "histogram", "Sizes of the batches run.")
    for m, s in stats.items():
        sizes: Mapping[int, int] = s["batch_sizes"]
        top = max(sizes, default=1)
        edges, e = [], 1
        while e < top:
            edges.append(e)
            e *= 2
        edges.append(max(top, 1))
        for le in edges:
            count = sum(n for b, n in sizes.items() if b <= le)
            out.append(f'{full}_bucket{{model="{_label(m)}",le="{le}"}} {count}')
        out.append(f'{full}_bucket{{model="{_label(m)}",le="+Inf"}} {s["batches"]}')
        out.append(f'{full}_sum{{model="{_label(m)}"}} {sum(b * n for b, n in sizes.items())}')
        out.append(f'{full}_count{{model="{_label(m)}"}} {s["batches"]}')

    summaries = [
        ("queue_wait_seconds", "queue_wait_ms", "Time a request waited in the queue."),
        ("compute_seconds", "compute_ms", "Time to run one batch (collate, model, split)."),
        ("latency_seconds", "latency_ms", "Time from a request's arrival in the queue to its result."),
    ]
    for metric, key, help_text in summaries:
        full = family(metric, "summary", help_text)
        for m, s in stats.items():
            fig = s[key]
            for q, name in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
                out.append(f'{full}{{model="{_label(m)}",quantile="{q}"}} {_num(fig[name] / 1e3)}')
            out.append(f'{full}_sum{{model="{_label(m)}"}} {_num(fig["sum"] / 1e3)}')
            out.append(f'{full}_count{{model="{_label(m)}"}} {fig["count"]}')

    full = family("http_responses_total", "counter", "HTTP responses of the model routes, by status code.")
    for (m, code), n in sorted(http_counts.items()):
        out.append(f'{full}{{model="{_label(m)}",code="{code}"}} {n}')
    return "\n".join(out) + "\n"
