"""Serving a BERT classifier with dynamic batching: the article's scenario (load rising from 100 to 500 requests/s).

A small BERT sequence classifier (built from a config, random weights, variable-length token ids padded per batch)
is served by the reference HTTP server (``python -m deepseek_ext.serving``) in its own process, on 127.0.0.1, with
three routes sharing the model: ``adaptive`` (DynamicBatcher's default policy), ``fixed`` (a fixed window with the
same max delay and max batch size: Ray Serve's ``@serve.batch`` / TorchServe's policy) and ``unbatched``
(``max_batch_size=1``). An open-loop Poisson load generator (benchmarks/serving.py) drives each route at a low and
a high rate, 1:5 apart: 100 and 500 requests/s when this machine's model capacity allows it, otherwise scaled down
the same way. For each run the script prints and plots the batch-size histogram, throughput and p50/p99 latency, and
measures throughput at saturation in-process (batched against unbatched).

    python examples/serving_bert.py [--quick] [--out demo-output] [--ray]

With ``--ray`` (where ``ray[serve]`` is installed; it is not a dependency) the same runs also go to Ray Serve itself:
the same model behind Ray's HTTP proxy, batched by ``@serve.batch`` with the same max batch size and wait.

Needs the serving extra (starlette, uvicorn) and transformers; everything runs offline on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from deepseek_ext.serving import DynamicBatcher, ServedModel, pad_collate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = dict(
    vocab_size=2000,
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=64,
    num_labels=2,
)
LENGTHS = (8, 32)  # token ids per request, uniform
MAX_BATCH, MAX_DELAY_MS = 32, 10.0  # Ray Serve's default batch_wait_timeout_s is 10 ms
ROUTES = ("adaptive", "fixed", "unbatched")
ARTICLE_RATES = (100, 500)

# -- the model and its routes (imported by the server process: --model adaptive=serving_bert:bert_adaptive) --------

_MODEL = None


def bert_model():
    """The classifier, built once per process (the three routes share it)."""
    global _MODEL
    if _MODEL is None:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        _MODEL = BertForSequenceClassification(BertConfig(**CONFIG)).eval()
    return _MODEL


def classify(batch):
    """(padded token ids, lengths) -> class probabilities, one row per request."""
    padded, lengths = batch
    mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).long()
    return torch.softmax(bert_model()(input_ids=padded, attention_mask=mask).logits, -1)


def _route(**batcher) -> ServedModel:
    bert_model()
    return ServedModel(
        classify,
        input_dtype=torch.int64,
        input_shape=(None,),
        batcher={"collate": pad_collate, **batcher},
        description=f"BERT classifier ({CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']})",
    )


def bert_adaptive() -> ServedModel:
    return _route()


def bert_fixed() -> ServedModel:
    return _route(policy="fixed")


def bert_unbatched() -> ServedModel:
    return _route(max_batch_size=1)


# -- the experiment ------------------------------------------------------------------------------------------------


def _requests(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(LENGTHS[0], LENGTHS[1] + 1, (n,), generator=g)
    return [torch.randint(1, CONFIG["vocab_size"], (int(k),), generator=g) for k in lengths]


def calibrate(seed: int) -> dict:
    """Model cost per call at batch 1 and 32 (mean request length), one thread, in this process."""
    reqs = _requests(64, seed)
    out = {}
    with torch.no_grad():
        for b in (1, 32):
            batch = pad_collate(reqs[:b])
            classify(batch)
            start, reps = time.perf_counter(), 0
            while time.perf_counter() - start < 0.5 or reps < 3:
                classify(batch)
                reps += 1
            out[b] = (time.perf_counter() - start) / reps
    return {"batch1_ms": out[1] * 1e3, "batch32_ms": out[32] * 1e3, "ratio": out[32] / out[1]}


def saturation(seed: int, n: int) -> dict:
    """Requests per second with n requests queued at once: batched (adaptive) vs unbatched, in-process."""
    reqs = _requests(n, seed)
    out = {}
    for name, max_batch in (("adaptive", MAX_BATCH), ("unbatched", 1)):
        with DynamicBatcher(classify, max_batch_size=max_batch, collate=pad_collate, max_queue=2 * n) as b:
            for f in [b.submit(r) for r in reqs[:32]]:
                f.result()
            start = time.perf_counter()
            for f in [b.submit(r) for r in reqs]:
                f.result()
            out[name] = n / (time.perf_counter() - start)
            out[f"{name}_mean_batch"] = b.stats()["mean_batch_size"]
    out["ratio"] = out["adaptive"] / out["unbatched"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepseek_ext.serving", "--port", str(port), "--threads", "1"]
    cmd += ["--max-batch-size", str(MAX_BATCH), "--max-delay-ms", str(MAX_DELAY_MS), "--timeout-ms", "5000"]
    for route in ROUTES:
        cmd += ["--model", f"{route}=serving_bert:bert_{route}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:
        try:
            if _get(f"http://127.0.0.1:{port}/healthz")["status"] == "ok":
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


def histogram_diff(after: dict, before: dict) -> dict[int, int]:
    sizes = {int(k): v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(sizes.items()) if v > 0}


def run(args) -> dict:
    sys.path.insert(0, str(ROOT))  # benchmarks/ (the load generator) lives beside examples/
    from _common import progress

    from benchmarks.serving import run_load, token_bodies

    torch.set_num_threads(1)  # as the server's model runs (--threads 1): the other core serves HTTP and the load
    model = calibrate(args.seed)
    print(
        f"model: {model['batch1_ms']:.1f} ms at batch 1, {model['batch32_ms']:.1f} ms at batch 32 "
        f"({model['ratio']:.1f}x the batch-1 call)"
    )
    sat = saturation(args.seed, 192 if args.quick else 768)
    print(
        f"saturation (in-process): {sat['adaptive']:.0f} requests/s batched vs {sat['unbatched']:.0f} unbatched "
        f"({sat['ratio']:.1f}x, mean batch {sat['adaptive_mean_batch']:.1f})"
    )
    duration = 3.0 if args.quick else 10.0
    port = _free_port()
    server = start_server(port)
    runs: dict[str, dict] = {route: {} for route in ROUTES}
    probe: dict[str, dict] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        bodies = token_bodies(LENGTHS[0], LENGTHS[1], CONFIG["vocab_size"], seed=args.seed)

        def measured(route: str, rate: float, seconds: float, seed: int) -> dict:
            before = _get(f"{base}/stats")[route]
            result = run_load(
                f"{base}/predict/{route}",
                rate,
                seconds,
                bodies,
                max_requests=int(rate * seconds * 2) + 1,
                grace=30,
                seed=seed,
            )
            after = _get(f"{base}/stats")[route]
            hist = histogram_diff(after["batch_sizes"], before["batch_sizes"])
            batches = sum(hist.values())
            result["batch_sizes"] = hist
            result["mean_batch_size"] = sum(k * v for k, v in hist.items()) / batches if batches else 0.0
            time.sleep(0.5)  # let the queue empty before the next run
            return result

        for route in ROUTES:  # warm-up: first calls allocate
            run_load(f"{base}/predict/{route}", 50, 0.5, bodies, max_requests=25)
        # Saturation over HTTP: far more than any route can answer (the excess is rejected with 503 or times out).
        # A first burst warms the model up at every batch shape (the routes share it), so no route pays for that.
        run_load(f"{base}/predict/adaptive", 2000, 1.0, bodies, max_requests=2000, grace=30, seed=args.seed + 2)
        for route in progress(ROUTES, desc="saturation over HTTP"):
            probe[route] = measured(route, 2000, 1.5 if args.quick else 3.0, args.seed + 1)
        capacity = probe["adaptive"]["throughput"]
        if ARTICLE_RATES[1] <= 0.7 * capacity:
            rates = ARTICLE_RATES
        else:  # this machine cannot sustain 500/s with this model: the same 1:5 step, at 70% of its capacity
            high = max(10, int(round(0.7 * capacity, -1)))
            rates = (high // 5, high)
        scaled = rates != ARTICLE_RATES
        print(
            f"saturation over HTTP: adaptive {probe['adaptive']['throughput']:.0f}/s, fixed window "
            f"{probe['fixed']['throughput']:.0f}/s, unbatched {probe['unbatched']['throughput']:.0f}/s; rates "
            f"{rates[0]} and {rates[1]} requests/s"
            + (" (the article's 100 and 500, scaled to this machine)" if scaled else "")
        )
        steps = [(rate, route) for rate in rates for route in ROUTES]
        for rate, route in progress(steps, desc="load runs"):
            runs[route][str(rate)] = measured(route, rate, duration, args.seed)
    finally:
        server.terminate()
        server.wait(30)
    if args.ray:
        probe["ray_serve"], runs["ray_serve"] = ray_serve_runs(args, rates, duration, bodies, run_load)
    return {
        "model": model,
        "rates": list(rates),
        "scaled_rates": scaled,
        "saturation": sat,
        "saturation_http": probe,
        "runs": runs,
        "max_batch_size": MAX_BATCH,
        "max_delay_ms": MAX_DELAY_MS,
        "duration_s": duration,
    }


def ray_serve_runs(args, rates, duration: float, bodies, run_load) -> tuple[dict, dict]:
    """The same probe and runs against Ray Serve itself (examples/_ray_serve_peer.py: @serve.batch with the same
    max batch size and wait), when ray[serve] is installed."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(HERE / "_ray_serve_peer.py"), str(port), str(MAX_BATCH), str(MAX_DELAY_MS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("Ray Serve did not start")
        url = f"http://127.0.0.1:{port}/predict/ray"
        run_load(url, 50, 0.5, bodies, max_requests=25)
        run_load(url, 2000, 1.0, bodies, max_requests=2000, grace=30, seed=args.seed + 2)
        probe = run_load(url, 2000, 1.5 if args.quick else 3.0, bodies, grace=30, seed=args.seed + 1)
        runs = {}
        for rate in rates:
            time.sleep(0.5)
            runs[str(rate)] = run_load(url, rate, duration, bodies, max_requests=int(rate * duration * 2) + 1, grace=30)
            runs[str(rate)].update(batch_sizes={}, mean_batch_size=float("nan"))  # not observable from outside
        probe.update(batch_sizes={}, mean_batch_size=float("nan"))
        print(f"Ray Serve: saturation over HTTP {probe['throughput']:.0f}/s")
        return probe, runs
    finally:
        proc.terminate()
        proc.wait(60)


def report(r: dict) -> None:
    print(f"\n{'rate/s':>7} {'route':<10} {'throughput/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}  errors")
    for rate in r["rates"]:
        for route in r["runs"]:
            x = r["runs"][route][str(rate)]
            lat = x["latency_ms"]
            print(
                f"{rate:>7} {route:<10} {x['throughput']:>12.0f} {lat['p50']:>8.1f} {lat['p99']:>8.1f} "
                f"{x['mean_batch_size']:>10.2f}  {x['errors'] or '-'}".replace("nan", "  -")
            )
    for rate in r["rates"]:
        for route in ("adaptive", "fixed"):
            hist = r["runs"][route][str(rate)]["batch_sizes"]
            print(f"batch sizes, {route} at {rate}/s: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))


def plot(r: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    ax = axes[0]
    for route, style in (("adaptive", "-"), ("fixed", "--")):
        for rate, color in zip(r["rates"], ("tab:blue", "tab:red")):
            hist = {int(k): v for k, v in r["runs"][route][str(rate)]["batch_sizes"].items()}
            total = sum(k * v for k, v in hist.items()) or 1
            xs = list(range(1, r["max_batch_size"] + 1))
            ax.plot(xs, [k * hist.get(k, 0) / total for k in xs], style, color=color, label=f"{route}, {rate}/s")
    ax.set_xlabel("batch size")
    ax.set_ylabel("share of requests")
    ax.set_title("batch-size histogram")
    ax.legend(fontsize=7)
    routes = list(r["runs"])
    width = 0.8 / len(routes)
    for i, (route, color) in enumerate(zip(routes, ("tab:blue", "tab:orange", "tab:green", "tab:purple"))):
        xs = [j + (i - (len(routes) - 1) / 2) * width for j in range(len(r["rates"]))]
        runs = [r["runs"][route][str(rate)] for rate in r["rates"]]
        axes[1].bar(xs, [x["latency_ms"]["p99"] for x in runs], width, color=color, alpha=0.35, label=f"{route} p99")
        axes[1].bar(xs, [x["latency_ms"]["p50"] for x in runs], width * 0.5, color=color, label=f"{route} p50")
        axes[2].bar(xs, [x["throughput"] for x in runs], width, color=color, label=route)
    for ax, title in ((axes[1], "latency (ms, log scale)"), (axes[2], "throughput (answers/s)")):
        ax.set_xticks(range(len(r["rates"])), [f"{rate}/s offered" for rate in r["rates"]])
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle(
        f"BERT classifier over HTTP: DynamicBatcher vs fixed window ({r['max_delay_ms']:g} ms) vs no batching"
        + (" vs Ray Serve" if "ray_serve" in r["runs"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "serving_bert.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    from _common import parser, save_results

    p = parser(__doc__)
    p.add_argument("--ray", action="store_true", help="also measure Ray Serve itself (needs ray[serve] installed)")
    args = p.parse_args(argv)
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"--ray needs ray[serve]: {e}") from e
    try:
        import starlette  # noqa: F401
        import transformers  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"serving_bert needs the serving extra and transformers: {e}") from e
    results = run(args)
    report(results)
    save_results(args.out, "serving_bert", results)
    path = plot(results, args.out)
    print(f"\nwrote {args.out / 'serving_bert.json'}" + (f" and {path}" if path else ""))


if __name__ == "__main__":
    main()
