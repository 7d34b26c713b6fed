"""python -m benchmarks [--family NAME ...] [--device cpu|cuda] [--quick] [--no-compile] [--json PATH]

Families: fp8, attention, data, amp, privacy, distributed, quant, serving (all by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import amp, attention, data, distributed, fp8, privacy, quant, runner, serving

FAMILIES = {
    "fp8": fp8.cases,
    "attention": attention.cases,
    "data": data.cases,
    "amp": amp.cases,
    "privacy": privacy.cases,
    "distributed": distributed.cases,
    "quant": quant.cases,
    "serving": serving.cases,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="op family (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    p.add_argument("--json", type=Path, default=Path("build/benchmarks.json"))
    args = p.parse_args(argv)
    cases = [
        c
        for fam in (args.family or sorted(FAMILIES))
        for c in FAMILIES[fam](args.device, args.quick, not args.no_compile)
    ]
    runner.run(cases, args.device, args.min_time, args.json)


if __name__ == "__main__":
    main()
