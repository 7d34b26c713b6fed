"""ZeRO3 and CheckpointManager across real processes (gloo on localhost)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deepseek_ext.distributed import CheckpointManager, ZeRO3, consolidate
from deepseek_ext.distributed.zero3 import FlatLayout, UnitState, _Unit, plan_buckets, plan_flat_layout

STEPS = 6
BATCH = 8  # global batch; each rank takes BATCH / world of it


class TinyLM(nn.Module):
    """Embedding and output head share one weight (tied), two blocks in a ModuleList."""

    def __init__(self, vocab=23, d=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    return TinyLM()


def batches(kind: str, steps: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        if kind == "mlp":
            yield torch.randn(BATCH, 7, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        else:
            ids = torch.randint(0, 23, (BATCH, 9), generator=g)
            yield ids, torch.roll(ids, -1, 1)


def loss_fn(kind, out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def reference(kind: str, steps: int) -> dict:
    model = make_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in batches(kind, steps):
        opt.zero_grad()
        loss_fn(kind, model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, args: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = JOBS[job](rank, world, **args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's background threads can race Python's shutdown and abort a
    # process that has already finished its work.
    sys.stdout.flush()
    os._exit(0)


def run(job: str, world: int, **args) -> list:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), job, args, out), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------------------- jobs
def _train(
    rank,
    world,
    kind,
    steps,
    ckpt=None,
    every=2,
    start_from_ckpt=False,
    crash_at=None,
    corrupt=None,
    prefetch=1,
    reshard=True,
    bucket_elems=1 << 20,
):
    model = ZeRO3(make_model(kind), prefetch=prefetch, reshard_after_forward=reshard, bucket_elems=bucket_elems)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(ckpt, every=every, keep=2) if ckpt else None
    start = manager.restore(model, opt) if (manager and start_from_ckpt) else 0
    per = BATCH // world
    for step, (x, y) in enumerate(batches(kind, steps)):
        if step < start:
            continue
        opt.zero_grad()
        loss_fn(kind, model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per]).backward()
        opt.step()
        if manager:
            if crash_at is not None and step == crash_at and rank == 0:
                import deepseek_ext.distributed.checkpoint as ck

                def die(*a, **k):  # the process dies after writing its shard, before the manifest
                    os._exit(3)

                ck._atomic_write_text = die
            manager.maybe_save(step, model, opt)
            if corrupt is not None and step == corrupt and rank == 0:
                step_dir = Path(ckpt) / f"step_{step}"
                f = step_dir / json.loads((step_dir / "manifest.json").read_text())["files"][1]["file"]
                data = bytearray(f.read_bytes())
                data[len(data) // 2] ^= 0xFF
                f.write_bytes(bytes(data))
    report = model.memory_report(opt)
    states = set(model.unit_states().values())
    buckets = [len(b.units) for b in model._buckets]
    return {"state": model.full_state_dict(), "start": start, "report": report, "states": states, "buckets": buckets}


def _access(rank, world):
    model = ZeRO3(make_model("mlp"))
    errors = []
    try:
        _ = model.module[0].weight.shape
    except RuntimeError as e:
        errors.append(str(e))
    with model.gathered_parameters():
        w = model.module[0].weight.clone()
        model.module[0].weight.mul_(2.0)
    with model.gathered_parameters():
        doubled = model.module[0].weight.clone()
    return {"errors": errors, "w": w, "doubled": doubled}


JOBS = {"train": _train, "access": _access}


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["mlp", "tiny_lm"])
@pytest.mark.parametrize("world", [2, 4])
def test_same_parameters_as_unsharded_training(kind, world):
    expected = reference(kind, STEPS)
    results = run("train", world, kind=kind, steps=STEPS)
    state = results[0]["state"]
    assert all(r["state"] == {} for r in results[1:])  # full_state_dict is rank 0's
    assert set(state) == set(expected)
    for k in expected:
        torch.testing.assert_close(state[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    if kind == "tiny_lm":
        assert torch.equal(state["embed.weight"], state["head.weight"])  # still tied


def test_prefetch_off_and_no_reshard_give_the_same_result():
    expected = reference("tiny_lm", 3)
    for prefetch, reshard in [(0, True), (2, False)]:
        state = run("train", 2, kind="tiny_lm", steps=3, prefetch=prefetch, reshard=reshard)[0]["state"]
        for k in expected:
            torch.testing.assert_close(state[k], expected[k], rtol=1e-5, atol=1e-6)


def test_small_units_share_one_collective_and_every_unit_ends_sharded():
    expected = reference("tiny_lm", 3)
    for bucket_elems in (0, 1 << 20):
        results = run("train", 2, kind="tiny_lm", steps=3, bucket_elems=bucket_elems)
        # tiny_lm: 3 Linear/LayerNorm units per block, norm and the root (tied embedding/head): 8 units
        assert results[0]["buckets"] == ([1] * 8 if bucket_elems == 0 else [7, 1])
        assert all(r["states"] == {UnitState.SHARDED} for r in results)
        for k in expected:
            torch.testing.assert_close(results[0]["state"][k], expected[k], rtol=1e-5, atol=1e-6)


def test_flat_layout_aligns_pads_and_splits_evenly():
    layout = plan_flat_layout([10, 3, 0, 17], world_size=4, align=4)
    assert layout == FlatLayout(offsets=(0, 12, 16, 16), used=33, padded=48, shard=12)
    assert plan_flat_layout([], 3, 1) == FlatLayout((), 0, 3, 1)
    for world in (1, 2, 3, 7):
        numels = [7, 1, 20, 5, 64, 3]
        layout = plan_flat_layout(numels, world, 2)
        ends = [o + n for o, n in zip(layout.offsets, numels)]
        assert all(o % 2 == 0 for o in layout.offsets) and all(e <= o for e, o in zip(ends, layout.offsets[1:]))
        assert layout.used == ends[-1] <= layout.padded == layout.shard * world and layout.shard % 2 == 0
    with pytest.raises(ValueError, match=r"plan_flat_layout: expected world_size >= 1, but got 0"):
        plan_flat_layout([1], 0, 1)
    with pytest.raises(ValueError, match=r"plan_flat_layout: expected parameter sizes >= 0, but got -1"):
        plan_flat_layout([-1], 1, 1)


def test_buckets_group_consecutive_units_up_to_the_limit():
    assert plan_buckets([5, 5, 5, 20, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]
    assert plan_buckets([], 10) == []
    assert plan_buckets([100], 10) == [[0]]
    assert plan_buckets([1, 1], 0) == [[0], [1]]


def test_a_unit_refuses_an_impossible_transition():
    unit = _Unit("blocks.0", None, [], plan_flat_layout([4], 1, 1), nn.Parameter(torch.zeros(4)), torch.zeros(4))
    unit.to(UnitState.GATHERING)
    with pytest.raises(RuntimeError, match=r"ZeRO3: unit 'blocks.0' cannot go from gathering to reducing"):
        unit.to(UnitState.REDUCING)
    unit.to(UnitState.GATHERED)
    unit.to(UnitState.REDUCING)
    unit.to(UnitState.SHARDED)


def test_memory_is_split_across_ranks():
    total = sum(p.numel() * 4 for p in make_model("tiny_lm").parameters())
    for world in (2, 4):
        for r in run("train", world, kind="tiny_lm", steps=1):
            rep = r["report"]
            assert rep["unsharded_param_bytes"] <= total + 64 * 4 * 8
            assert rep["param_shard_bytes"] <= total / world + 16 * 4 * 8  # plus alignment padding per unit
            assert rep["grad_shard_bytes"] == rep["param_shard_bytes"]
            assert rep["optimizer_state_bytes"] >= 2 * rep["param_shard_bytes"]  # AdamW: two moments (+ steps)


def test_reading_a_sharded_parameter_outside_forward_is_a_clear_error():
    for r in run("access", 2):
        assert "is sharded across ranks by ZeRO3" in r["errors"][0] and "gathered_parameters" in r["errors"][0]
        torch.testing.assert_close(r["doubled"], 2 * r["w"])


def test_checkpoint_restores_the_newest_valid_one_after_corruption(tmp_path):
    expected = reference("tiny_lm", STEPS)
    # Saves after steps 1, 3, 5; the file of step 5 is then corrupted.
    run("train", 2, kind="tiny_lm", steps=STEPS, ckpt=str(tmp_path), corrupt=5)
    results = run("train", 2, kind="tiny_lm", steps=STEPS, ckpt=str(tmp_path), start_from_ckpt=True)
    assert results[0]["start"] == 4  # resumed after step 3, the newest checkpoint that verifies
    for k in expected:
        torch.testing.assert_close(results[0]["state"][k], expected[k], rtol=1e-5, atol=1e-6)


def test_crash_mid_save_falls_back_and_training_reaches_the_same_parameters(tmp_path):
    expected = reference("tiny_lm", STEPS)
    with pytest.raises(mp.ProcessExitedException):
        run("train", 2, kind="tiny_lm", steps=STEPS, ckpt=str(tmp_path), crash_at=3)
    assert (tmp_path / "step_3").exists() and not (tmp_path / "step_3" / "manifest.json").exists()
    results = run("train", 2, kind="tiny_lm", steps=STEPS, ckpt=str(tmp_path), start_from_ckpt=True)
    assert results[0]["start"] == 2  # step 1's checkpoint is the newest complete one
    for k in expected:
        torch.testing.assert_close(results[0]["state"][k], expected[k], rtol=1e-5, atol=1e-6)


def test_resharding_four_ranks_to_two_and_the_converter(tmp_path):
    expected = reference("tiny_lm", STEPS)
    run("train", 4, kind="tiny_lm", steps=4, ckpt=str(tmp_path))  # saves after steps 1 and 3
    manifest = json.loads((tmp_path / "step_3" / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and len(manifest["files"]) == 4
    consolidated = consolidate(tmp_path / "step_3")
    assert set(consolidated) == set(expected)
    out = tmp_path / "full.pt"
    subprocess.run(
        [sys.executable, "-m", "deepseek_ext.distributed.convert", str(tmp_path), str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    converted = torch.load(out, weights_only=True)
    for k in consolidated:
        assert torch.equal(converted[k], consolidated[k])
    results = run("train", 2, kind="tiny_lm", steps=STEPS, ckpt=str(tmp_path), start_from_ckpt=True)
    assert results[0]["start"] == 4
    for k in expected:
        torch.testing.assert_close(results[0]["state"][k], expected[k], rtol=1e-5, atol=1e-6)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ZeRO3(make_model("mlp"))
