"""ZeRO3 against PyTorch FSDP2 (``fully_shard``) and DDP: a transformer trained on 2 gloo ranks on this machine.
Each mode runs in its own 2-process job; reported: median step time, peak RSS per rank, and for ZeRO3 the share of
step time spent inside its collectives."""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.runner import Case, peak_rss_mb

WORLD = 2
FULL = dict(vocab=8000, d=768, layers=4, heads=12, seq=128, batch=2, steps=3)
QUICK = dict(vocab=500, d=64, layers=2, heads=4, seq=32, batch=2, steps=2)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    def __init__(self, vocab, d, layers, heads, **_):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def _job(rank: int, port: int, mode: str, cfg: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = LM(**cfg)
    params = sum(p.numel() for p in model.parameters())
    comm = [0.0]
    if mode == "zero3":
        import deepseek_ext.distributed.zero3 as z
        from deepseek_ext.distributed import ZeRO3

        def timed(fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                work = fn(*a, **k)
                if k.get("async_op"):
                    return work
                comm[0] += time.perf_counter() - t0
                return work

            return wrapper

        z._all_gather, z._reduce_scatter = timed(z._all_gather), timed(z._reduce_scatter)
        model = ZeRO3(model, prefetch=1, wrap_policy={Block})
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    times = []
    for step in range(cfg["steps"] + 1):
        ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
        comm[0] = 0.0
        t0 = time.perf_counter()
        logits = model(ids)
        nn.functional.cross_entropy(logits.reshape(-1, cfg["vocab"]), ids.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if step:  # the first step is warm-up
            times.append((time.perf_counter() - t0, comm[0]))
    result = {
        "step_s": statistics.median(t for t, _ in times),
        "comm_share": statistics.median(c / t for t, c in times),
        "peak_rss_mb": peak_rss_mb(),
        "params_m": params / 1e6,
    }
    (Path(out_dir) / f"{mode}_{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def measure(mode: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(_job, args=(port, mode, cfg, out), nprocs=WORLD, join=True)
        runs = [json.loads((Path(out) / f"{mode}_{r}.json").read_text()) for r in range(WORLD)]
    return {k: max(r[k] for r in runs) for k in runs[0]}


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    cfg = QUICK if quick else FULL
    ours = measure("zero3", cfg)
    out = []
    for peer, label in (("fsdp2", "FSDP2 fully_shard"), ("ddp", "DDP")):
        theirs = measure(peer, cfg)
        config = f"{ours['params_m']:.0f}M-param LM, {WORLD} gloo ranks"
        note = (
            f"{label}; peak RSS/rank {ours['peak_rss_mb']:.0f} vs {theirs['peak_rss_mb']:.0f} MB; "
            f"ZeRO3 time in collectives {100 * ours['comm_share']:.0f}%"
        )
        out.append(
            Case(
                family="distributed",
                op="ZeRO3 step",
                config=config,
                ours=None,
                baseline=None,
                baseline_name=note,
                ours_s=ours["step_s"],
                baseline_s=theirs["step_s"],
                extra={"ours": ours, "peer": theirs},
            )
        )
    return out
