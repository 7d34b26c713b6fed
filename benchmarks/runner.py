"""The shared benchmark runner.

Each op family contributes a module with ``cases(device, quick) -> list[Case]``; the runner checks that ours and
the baseline agree, times both with ``torch.utils.benchmark`` in the same process, prints one table with the
speed-up (baseline time / our time, so > 1 means we are faster) and writes the rows as JSON.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.benchmark import Timer


@dataclass
class Case:
    family: str
    op: str
    config: str  # what varies: shape, dtype, granularity ...
    ours: Callable[[], Any] | None
    baseline: Callable[[], Any] | None  # None: ours alone (a figure with no peer, e.g. a latency)
    baseline_name: str
    # Raises if ours and the baseline disagree; run once before timing.
    check: Callable[[], None] | None = None
    # Seconds of timing per side, when a case needs more than the run's default to beat noise.
    min_run_time: float | None = None
    # Times measured elsewhere (e.g. inside a multi-process job), in seconds: used instead of timing ours/baseline.
    ours_s: float | None = None
    baseline_s: float | None = None
    # False when the baseline is no real alternative on this device (e.g. torch._scaled_mm on a CPU, a reference
    # implementation): the row is reported but kept out of charts and geometric means.
    headline: bool = True
    extra: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (VmHWM: it belongs to the address space, so unlike
    ``ru_maxrss`` it does not inherit the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # not Linux: the closest portable figure

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Resets the peak RSS to the current RSS (Linux: /proc/self/clear_refs); False where that is unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    fn()  # warm-up (first-call allocations, lazy initialisation, compilation)
    # Timer defaults to one thread; measure with the threads the process really has, as users run.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def environment(device: str) -> dict:
    import deepseek_ext

    caps = deepseek_ext.capabilities()
    env = {
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": caps["cpu_model"] or platform.processor() or platform.machine(),
        "cpu_isa": caps.get("cpu_isa"),
        "cpu_features": caps.get("cpu_features", []),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run(cases: list[Case], device: str, min_run_time: float = 0.5, json_path: Path | None = None) -> list[dict]:
    env = environment(device)
    print(
        f"deepseek-ext benchmarks on {device} (torch {env['torch']}, {env['threads']} threads"
        + (f", {env['gpu']}" if "gpu" in env else "")
        + ")"
    )
    print(f"CPU: {env['cpu']}; kernels at level {env['cpu_isa']} (features: {', '.join(env['cpu_features']) or '-'})")
    header = f"{'op':<16} {'config':<34} {'ours ms':>9} {'baseline ms':>12} {'speed-up':>9}  baseline"
    print(header)
    print("-" * (len(header) + 16))
    rows = []
    for case in cases:
        if case.check is not None:
            case.check()
        run_time = max(min_run_time, case.min_run_time or 0.0)
        ours = case.ours_s if case.ours_s is not None else median_seconds(case.ours, run_time)
        base, note = case.baseline_s, case.baseline_name
        if base is None and case.baseline is not None:
            try:
                base = median_seconds(case.baseline, run_time)
            except Exception as e:  # a peer that cannot run this configuration is a result too
                note = f"{case.baseline_name}: fails ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
        row = {
            "family": case.family,
            "op": case.op,
            "config": case.config,
            "ours_ms": ours * 1e3,
            "baseline_ms": None if base is None else base * 1e3,
            "speedup": None if base is None else base / ours,
            "baseline": note,
            "headline": case.headline,
            **case.extra,
        }
        if "flop" in case.extra:  # throughput next to the peer's (CUDA reports lead with it)
            row["ours_tflops"] = case.extra["flop"] / ours / 1e12
            row["baseline_tflops"] = None if base is None else case.extra["flop"] / base / 1e12
        rows.append(row)
        base_txt = "-" if base is None else f"{base * 1e3:.3f}"
        speed_txt = "-" if base is None else f"{base / ours:.2f}x"
        rate = ""
        if "ours_tflops" in row and device == "cuda":
            peer = "-" if row["baseline_tflops"] is None else f"{row['baseline_tflops']:.1f}"
            rate = f"  [{row['ours_tflops']:.1f} vs {peer} TFLOP/s]"
        print(
            f"{case.op:<16} {case.config:<34} {row['ours_ms']:>9.3f} {base_txt:>12} {speed_txt:>9}  {note}{rate}",
            flush=True,
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"environment": env, "results": rows}, indent=2))
        print(f"wrote {json_path}")
    return rows
