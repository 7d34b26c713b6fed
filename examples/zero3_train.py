"""ZeRO-3 on two processes: sharded training, memory per rank, a crash, and a resume from the newest valid
checkpoint.

Run the training itself with torchrun (CPU, gloo)::

    torchrun --nproc_per_node=2 examples/zero3_train.py --steps 40 --ckpt ckpt/

or run the whole story (what ``make demo`` does)::

    python examples/zero3_train.py [--quick] [--out demo-output]

which launches three two-process jobs: a job where rank 1 is killed (SIGKILL) in the middle of training, a job that
resumes from the newest checkpoint whose checksums verify, and an uninterrupted reference job. It reports each
rank's memory against an unsharded model and checks that the resumed run ends with exactly the parameters of the
uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _common import parser, save_results
from torch import nn

from deepseek_ext.distributed import CheckpointManager, ZeRO3

WIDTH, DEPTH, BATCH = 512, 6, 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 1))


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)  # the same global batch whatever the number of ranks
    x = torch.randn(BATCH, WIDTH, generator=g)
    y = x[:, :8].sum(1, keepdim=True).tanh()
    per = BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def worker(steps: int, ckpt_dir: Path, every: int, crash_at: int, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = ZeRO3(make_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = CheckpointManager(ckpt_dir, every=every, keep=2)
    start = ckpt.restore(model, optimizer)  # 0 when there is no valid checkpoint
    if rank == 0:
        print(f"rank 0: starting at step {start}", flush=True)
    loss = torch.tensor(0.0)
    for step in range(start, steps):
        if step == crash_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies without warning
        x, y = batch(step, rank, world)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        ckpt.maybe_save(step, model, optimizer)
    report = model.memory_report(optimizer, print_report=False)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    state = model.full_state_dict()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "final_state.pt")
        save_results(out, "job", {"start_step": start, "final_loss": loss.item(), "ranks": reports})
    dist.barrier()
    dist.destroy_process_group()


def launch(args: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        "--nproc_per_node=2",
        "--max_restarts=0",
        __file__,
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return proc.returncode


def story(steps: int, every: int, out: Path) -> dict:
    import json
    import shutil

    work = out / "zero3"
    shutil.rmtree(work, ignore_errors=True)
    crash_at = steps // 2 + every // 2 + 1  # between two checkpoints: the steps since the last one are redone
    rc_crash = launch(
        [
            "--steps",
            str(steps),
            "--ckpt",
            str(work / "ckpt"),
            "--every",
            str(every),
            "--crash-at",
            str(crash_at),
            "--job-out",
            str(work / "crashed"),
        ]
    )
    saved = sorted(p.name for p in (work / "ckpt").iterdir())
    print(f"job 1: rank 1 killed at step {crash_at}; torchrun exit code {rc_crash}; checkpoints on disk: {saved}")
    rc_resume = launch(
        ["--steps", str(steps), "--ckpt", str(work / "ckpt"), "--every", str(every), "--job-out", str(work / "resumed")]
    )
    rc_ref = launch(
        [
            "--steps",
            str(steps),
            "--ckpt",
            str(work / "ckpt_ref"),
            "--every",
            str(every),
            "--job-out",
            str(work / "reference"),
        ]
    )
    if rc_resume or rc_ref:
        raise RuntimeError(f"zero3_train: the resumed or reference job failed (exit codes {rc_resume}, {rc_ref})")
    resumed = json.loads((work / "resumed" / "job.json").read_text())
    reference = json.loads((work / "reference" / "job.json").read_text())
    a = torch.load(work / "resumed" / "final_state.pt")
    b = torch.load(work / "reference" / "final_state.pt")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r0 = resumed["ranks"][0]
    per_rank = r0["param_shard_bytes"] + r0["grad_shard_bytes"] + r0["optimizer_state_bytes"]
    unsharded = 4 * r0["unsharded_param_bytes"]  # parameters + gradients + two Adam moments
    print(f"job 2: resumed at step {resumed['start_step']} from the newest valid checkpoint, finished step {steps}")
    print(
        f"memory per rank: {per_rank / 2**20:.2f} MiB of parameters, gradients and Adam state (+ "
        f"{r0['largest_unit_gathered_bytes'] / 2**20:.2f} MiB for the gathered unit) vs {unsharded / 2**20:.2f} "
        "MiB unsharded"
    )
    print(f"resumed run == uninterrupted run, bit for bit: {identical}")
    results = {
        "crash_exit_code": rc_crash,
        "crash_at": crash_at,
        "checkpoints_after_crash": saved,
        "resumed_from": resumed["start_step"],
        "final_loss": resumed["final_loss"],
        "reference_final_loss": reference["final_loss"],
        "identical_to_uninterrupted": identical,
        "per_rank_bytes": per_rank,
        "unsharded_bytes": unsharded,
        "ranks": resumed["ranks"],
    }
    save_results(out, "zero3_train", results)
    return results


def main(argv=None) -> dict | None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--ckpt", type=Path, default=Path("ckpt"))
    p.add_argument("--crash-at", type=int, default=-1)
    p.add_argument("--job-out", type=Path, default=None)
    args = p.parse_args(argv)
    steps = args.steps or (20 if args.quick else 200)
    every = args.every or (4 if args.quick else 25)
    if "LOCAL_RANK" in os.environ:  # launched by torchrun
        worker(steps, args.ckpt, every, args.crash_at, args.job_out or args.out / "zero3_job")
        return None
    return story(steps, every, args.out)


if __name__ == "__main__":
    main()
