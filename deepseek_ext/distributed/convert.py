"""Turns a sharded ZeRO3 checkpoint folder into one ordinary state_dict file, without a distributed job.

python -m deepseek_ext.distributed.convert ckpt/step_999 model.pt
python -m deepseek_ext.distributed.convert ckpt/ model.pt      # the newest valid checkpoint in the folder
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .checkpoint import consolidate, verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepseek_ext.distributed.convert", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a step_<N> folder, or a folder of them (newest valid is used)")
    p.add_argument("output", type=Path)
    args = p.parse_args(argv)
    folder = args.checkpoint
    if not (folder / "manifest.json").exists():
        steps = sorted((int(m.group(1)), d) for d in folder.iterdir() if (m := re.match(r"^step_(\d+)$", d.name)))
        valid = [d for _, d in reversed(steps) if verify(d) is not None]
        if not valid:
            print(f"no complete, valid checkpoint under {folder}", file=sys.stderr)
            return 1
        folder = valid[0]
    state = consolidate(folder)
    torch.save(state, args.output)
    print(f"wrote {args.output} from {folder}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
