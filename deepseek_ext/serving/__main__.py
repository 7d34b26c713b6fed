"""python -m deepseek_ext.serving --model [name=]module:factory [--model ...] [--port 8000] [batcher options]

Runs the reference HTTP server (deepseek_ext.serving.server): one route per --model, each with its own
DynamicBatcher. The factory is called with no arguments and returns a model (any callable on a batch) or a
ServedModel. Needs the optional extra: pip install 'deepseek-ext[serving]'.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepseek_ext.serving", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]MODULE:FACTORY",
        help="a model route (repeatable); the first is also POST /predict. NAME defaults to the factory's name",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--latency-slo-ms", type=float, default=None)
    p.add_argument("--timeout-ms", type=float, default=None, help="default deadline of a request in the queue")
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--policy", choices=["adaptive", "fixed"], default="adaptive")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the model")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        from .server import serve
    except ImportError as e:
        sys.exit(f"python -m deepseek_ext.serving: {e}")
    import torch

    from .model import load_factory

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for spec in args.model:
        name, eq, target = spec.partition("=")
        if not eq:
            name, target = spec.rpartition(":")[2].split(".")[-1], spec
        if name in models:
            sys.exit(f"python -m deepseek_ext.serving: two routes named {name!r}; use NAME=module:factory")
        try:
            models[name] = load_factory(target)
        except ValueError as e:
            sys.exit(f"python -m deepseek_ext.serving: {e}")
    options = dict(
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        latency_slo_ms=args.latency_slo_ms,
        timeout_ms=args.timeout_ms,
        max_queue=args.max_queue,
        num_workers=args.num_workers,
        policy=args.policy,
    )
    print(f"deepseek_ext.serving: {', '.join(models)} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        serve(models, host=args.host, port=args.port, log_level=args.log_level, **options)
    except (TypeError, ValueError) as e:
        sys.exit(f"python -m deepseek_ext.serving: {e}")


if __name__ == "__main__":
    main()
