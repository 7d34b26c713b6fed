"""The deepseek-ext tour (``make demo``): every example in quick mode, the benchmark report, one summary.

Runs the example scripts one after another (each in its own process, as a user would), then the benchmark
suite in quick mode, and ends with one table -- feature, what was measured, ours, the PyTorch baseline -- printed
and written with the plots to ``demo-output/`` (``summary.md``, ``*.png``, ``*.json``). Offline, CPU only.

    python examples/tour.py [--out demo-output] [--full]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLES = [
    ("imbalanced_sampler", "DynamicSampler on imbalanced digits"),
    ("amp_bert", "AutoMixedPrecision on a BERT"),
    ("quantize_deploy", "Quantizer: W4A8 / W8A8"),
    ("private_training", "DifferentialPrivacy + membership attack"),
    ("gpt_fp8_attention", "FP8 + fused attention in a GPT"),
    ("zero3_train", "ZeRO-3 on 2 processes, crash and resume"),
    ("serving_bert", "Serving: DynamicBatcher behind the HTTP server"),
]
BENCH_FAMILIES = ["attention", "fp8", "quant", "data", "amp", "privacy", "serving"]


def run_step(title: str, cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    print(f"==> {title}", flush=True)
    # Progress bars go to stderr and stay visible; stdout (the example's report) is shown and logged.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        print("    " + line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"tour: {title} failed (exit code {proc.returncode}); see above")
    log.write_text("".join(lines))
    took = time.perf_counter() - start
    print(f"    ({took:.0f} s)", flush=True)
    return took


def summary_rows(out: Path) -> list[tuple[str, str, str, str]]:
    def load(name):
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    rows = []
    if r := load("imbalanced_sampler"):
        rows.append(
            (
                "DynamicSampler",
                "test recall of the rare class (F1 feedback each epoch)",
                f"{r['dynamic']['recall']['abnormal']:.2f}",
                f"{r['plain']['recall']['abnormal']:.2f} (shuffled loader)",
            )
        )
    if r := load("amp_bert"):
        rows.append(
            (
                "AutoMixedPrecision",
                "BERT final loss / step time (fp16 layers 0-1, bf16 classifier)",
                f"{r['amp']['final_loss']:.3f} / {r['amp']['step_s'] * 1e3:.0f} ms",
                f"{r['fp32']['final_loss']:.3f} / {r['fp32']['step_s'] * 1e3:.0f} ms (fp32)",
            )
        )
    if r := load("quantize_deploy"):
        c, n = r["digits_cnn"], r["resnet18"]
        rows.append(
            (
                "Quantizer",
                "digits CNN accuracy, W4A8 / W8A8",
                f"{c['W4A8']['accuracy']:.3f} / {c['W8A8']['accuracy']:.3f}",
                f"{c['float']['accuracy']:.3f} (fp32)",
            )
        )
        rows.append(
            (
                "Quantizer",
                f"ResNet-18 batch-1 latency {n['image']}px and size, W8A8",
                f"{n['W8A8']['latency_ms']:.1f} ms, {n['W8A8']['bytes'] / 2**20:.1f} MB",
                f"{n['float']['latency_ms']:.1f} ms, {n['float']['bytes'] / 2**20:.1f} MB (fp32)",
            )
        )
    if r := load("private_training"):
        rows.append(
            (
                "DifferentialPrivacy",
                "test AUC / membership-attack AUC (0.5 = no leak), epsilon 1",
                f"{r['dp']['test_auc']:.3f} / {r['dp']['attack_auc']:.3f}",
                f"{r['plain']['test_auc']:.3f} / {r['plain']['attack_auc']:.3f} (non-private)",
            )
        )
    if r := load("gpt_fp8_attention"):
        rows.append(
            (
                "FP8 + fused attention",
                "char-GPT final loss / step time",
                f"{r['fp8_fused']['final_loss']:.3f} / {r['fp8_fused']['step_s'] * 1e3:.0f} ms",
                f"{r['plain']['final_loss']:.3f} / {r['plain']['step_s'] * 1e3:.0f} ms (plain)",
            )
        )
    if r := load("zero3_train"):
        rows.append(
            (
                "ZeRO3 + CheckpointManager",
                "per-rank state; resume after a killed rank",
                f"{r['per_rank_bytes'] / 2**20:.1f} MiB; resumed at step {r['resumed_from']}, "
                f"identical: {r['identical_to_uninterrupted']}",
                f"{r['unsharded_bytes'] / 2**20:.1f} MiB (unsharded)",
            )
        )
    if r := load("serving_bert"):
        high = str(r["rates"][1])
        run = {route: r["runs"][route][high] for route in ("adaptive", "fixed", "unbatched")}

        def cell(x):
            lat = x["latency_ms"]
            return f"p50/p99 {lat['p50']:.0f}/{lat['p99']:.0f} ms, {x['throughput']:.0f}/s"

        rows.append(
            (
                "DynamicBatcher (serving)",
                f"BERT over HTTP at {high} req/s offered: latency, throughput",
                f"{cell(run['adaptive'])}, mean batch {run['adaptive']['mean_batch_size']:.1f}",
                f"{cell(run['fixed'])} (fixed window); {cell(run['unbatched'])} (unbatched)",
            )
        )
    if r := load("benchmarks"):
        by_family: dict[str, list[float]] = {}
        for row in r["results"]:
            if row.get("speedup") and row.get("headline", True):
                by_family.setdefault(row["family"], []).append(row["speedup"])
        for fam, ups in by_family.items():
            geo = math.exp(sum(map(math.log, ups)) / len(ups))
            rows.append(
                (
                    f"benchmarks: {fam}",
                    f"geometric mean speed-up over {len(ups)} quick cases",
                    f"{geo:.2f}x",
                    "PyTorch baseline = 1.00x",
                )
            )
    return rows


def _cpu_line() -> str:
    import deepseek_ext

    caps = deepseek_ext.capabilities()
    return f"{caps['cpu_model']}, kernels at level {caps.get('cpu_isa')} ({', '.join(caps.get('cpu_features', []))})"


def plot_benchmarks(out: Path) -> None:
    path = out / "benchmarks.json"
    if not path.exists():
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    data = json.loads(path.read_text())
    rows = [r for r in data["results"] if r.get("speedup") and r.get("headline", True)]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.4), dpi=110)
    labels = [f"{r['op']} {r['config']} vs {r['baseline'].split(';')[0]}"[:90] for r in rows]
    ax.barh(
        range(len(rows)),
        [r["speedup"] for r in rows],
        color=["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows],
    )
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up vs the named baseline (log scale; > 1 = ours faster)")
    env = data.get("environment", {})
    title = f"{env.get('cpu', '')}, kernels at {env.get('cpu_isa', '?')}, {env.get('threads', '?')} threads"
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "benchmarks.png")
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--full", action="store_true", help="full-length examples and benchmarks (tens of minutes)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    mode = [] if args.full else ["--quick"]
    timings = {}
    for i, (name, title) in enumerate(EXAMPLES, 1):
        timings[name] = run_step(
            f"[{i}/{len(EXAMPLES) + 1}] {title}",
            [sys.executable, str(HERE / f"{name}.py"), *mode, "--out", str(out)],
            out / f"{name}.log",
        )
    fams = [a for f in BENCH_FAMILIES for a in ("--family", f)]
    timings["benchmarks"] = run_step(
        f"[{len(EXAMPLES) + 1}/{len(EXAMPLES) + 1}] benchmark report",
        [sys.executable, "-m", "benchmarks", *mode, *fams, "--min-time", "0.2", "--json", str(out / "benchmarks.json")],
        out / "benchmarks.log",
    )
    plot_benchmarks(out)
    rows = summary_rows(out)
    header = ("feature", "what was measured", "ours", "PyTorch baseline")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    print()
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    when = time.strftime("%Y-%m-%d %H:%M")
    md = [
        "# deepseek-ext tour",
        "",
        f"Measured in one run ({'full' if args.full else 'quick'} mode) on {when}, {os.cpu_count()} CPU cores: "
        f"{_cpu_line()}.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    bench = out / "benchmarks.json"
    if bench.exists():
        md += ["", "## Benchmarks (speed-up = baseline time / ours; above 1 means ours is faster)", ""]
        md += ["| op | config | ours ms | baseline ms | speed-up | baseline |", "| --- | --- | --- | --- | --- | --- |"]
        for r in json.loads(bench.read_text())["results"]:
            base = "-" if r["baseline_ms"] is None else f"{r['baseline_ms']:.3f}"
            up = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            md.append(f"| {r['op']} | {r['config']} | {r['ours_ms']:.3f} | {base} | {up} | {r['baseline']} |")
    md += [
        "",
        "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in sorted(out.glob("*.png"))),
        "",
        "Seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / 'summary.md'} and the plots in {out}/ (total {sum(timings.values()):.0f} s)")


if __name__ == "__main__":
    main()
