"""Turns a sharded ZeRO3 checkpoint folder into one ordinary state_dict file, without a distributed job.

python -m deepseek_ext.distributed.convert ckpt/step_999 model.pt
python -m deepseek_ext.distributed.convert ckpt/ model.pt      # the newest valid checkpoint in the folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, consolidate, step_folders


def main(argv=None) -> int:
    prog = "python -m deepseek_ext.distributed.convert"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a step_<N> folder, or a folder of them (newest valid is used)")
    p.add_argument("output", type=Path)
    args = p.parse_args(argv)
    folder = args.checkpoint

    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1

    if not folder.is_dir():
        return fail(f"{folder} is not a folder")
    if (folder / "manifest.json").exists() or not step_folders(folder):
        candidates = [folder]  # one checkpoint: its error is the answer
    else:
        candidates = step_folders(folder)  # newest first; each unusable one is skipped with the reason
    state = None
    for candidate in candidates:
        try:
            state = consolidate(candidate)
            folder = candidate
            break
        except CheckpointError as e:
            if len(candidates) == 1:
                return fail(str(e))
            print(f"{prog}: warning: skipping {candidate}: {e}", file=sys.stderr)
        except OSError as e:
            return fail(f"cannot read {candidate}: {e}")
    if state is None:
        return fail(f"no complete, valid checkpoint under {folder}")
    if not args.output.parent.is_dir():
        return fail(f"cannot write {args.output}: {args.output.parent} is not a folder")
    try:
        torch.save(state, args.output)
    except (OSError, RuntimeError) as e:  # torch.save reports some file errors as RuntimeError
        return fail(f"cannot write {args.output}: {e}")
    print(f"wrote {args.output} from {folder}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
