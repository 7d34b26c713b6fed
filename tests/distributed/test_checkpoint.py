"""Checkpoint fault suite (deepseek_ext/distributed/checkpoint.py and convert.py): corrupted, truncated, wrong-shaped,
tampered, traversal, FIFO and malformed checkpoints, concurrent writers, and a kill at every stage of a save. Each case
ends with the newest valid state restored (with a warning naming why the newer ones were skipped) or a clear error.

Every job runs in a forked child with its own one-rank gloo group (tests.helpers.run_isolated), so a hang or a crash
fails the test, and a simulated kill (``os._exit``) really leaves the files as a killed process would.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import deepseek_ext.distributed.checkpoint as ck
from deepseek_ext.distributed import CheckpointManager, ZeRO3, consolidate, verify
from tests.helpers import result_of, run_isolated

KILLED = 9
# Warm-up in the parent: the first optimizer construction imports torch._dynamo (seconds), which every forked job
# would otherwise repeat.
torch.optim.AdamW([nn.Parameter(torch.zeros(1))])


# ---------------------------------------------------------------------------------------------------- jobs
def in_job(fn, allow_exit: bool = False):
    """``fn()`` in a forked child inside a one-rank gloo process group."""

    def run():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return fn()
        finally:
            dist.destroy_process_group()

    return run_isolated(run, timeout=120, allow_exit=allow_exit)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    model.register_buffer("seen", torch.full((2,), float(seed)))
    return model


def trained(seed: int):
    model = ZeRO3(make_model(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return model, opt


def install_kill(stage: str) -> None:
    """Makes this (child) process die like a killed one at ``stage`` of the next save."""

    def die(*args, **kwargs):
        os._exit(KILLED)

    real_replace = os.replace

    def replace_dying_at(prefix):
        def replace(src, dst, *args, **kwargs):
            if Path(dst).name.startswith(prefix):
                os._exit(KILLED)  # the temporary is fully written and fsync'ed, not yet renamed
            return real_replace(src, dst, *args, **kwargs)

        return replace

    if stage == "rank_file":
        ck.os.replace = replace_dying_at("rank_")
    elif stage == "before_manifest":
        ck._atomic_write_text = die
    elif stage == "manifest":
        ck.os.replace = replace_dying_at("manifest.json")
    elif stage == "garbage":
        ck.CheckpointManager._collect_garbage = staticmethod(die)
    elif stage == "prune":
        ck.shutil.rmtree = die
    else:
        raise AssertionError(stage)


def save(directory, step: int, seed: int, keep: int = 2, kill: str | None = None):
    """Trains model ``seed`` one step and saves it as ``step``; returns its full state (None when killed)."""

    def job():
        model, opt = trained(seed)
        if kill:
            install_kill(kill)
        CheckpointManager(directory, every=1, keep=keep).save(step, model, opt)
        return model.full_state_dict()

    out = in_job(job, allow_exit=kill is not None)
    if kill:
        assert out == ("exit", KILLED), f"the save was expected to die at stage {kill!r}, got {out}"
        return None
    return result_of(out)


def state_of(seed: int) -> dict:
    return result_of(in_job(lambda: trained(seed)[0].full_state_dict()))


def restore(directory, seed: int = 12345):
    """(start step, restored full state, warning messages, optimizer state) of a fresh model restored from directory."""

    def job():
        model = ZeRO3(make_model(seed))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = CheckpointManager(directory, every=1, keep=2).restore(model, opt)
        return start, model.full_state_dict(), [str(w.message) for w in caught], opt.state_dict()

    return result_of(in_job(job))


def assert_state(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


@pytest.fixture(scope="module")
def states():
    return {seed: state_of(seed) for seed in (1, 2, 3, 5)}


@pytest.fixture
def two_checkpoints(tmp_path, states):
    """step_1 (model 1) and step_3 (model 3), both valid."""
    assert_state(save(tmp_path, 1, 1), states[1])
    assert_state(save(tmp_path, 3, 3), states[3])
    return tmp_path


def manifest_of(step_dir: Path) -> dict:
    return json.loads((step_dir / "manifest.json").read_text())


def rank_file(step_dir: Path) -> Path:
    return step_dir / manifest_of(step_dir)["files"][0]["file"]


def resign(step_dir: Path, manifest=None, payload=None) -> None:
    """Rewrites a checkpoint as a careful forger would: the rank file after ``payload(p)`` (returns the new payload)
    with a matching size and CRC, and the manifest after ``manifest(m)`` with a matching checksum."""
    m = manifest_of(step_dir)
    if payload is not None:
        f = rank_file(step_dir)
        p = payload(torch.load(f, weights_only=False))
        torch.save(p, f)
        crc, size = ck.file_crc32c(f)
        m["files"][0].update(crc32c=crc, bytes=size)
    if manifest is not None:
        manifest(m)  # edits in place
    if isinstance(m, dict) and isinstance(m.get("crc32c"), int):
        m["crc32c"] = ck._manifest_crc(m)
    (step_dir / "manifest.json").write_text(json.dumps(m))


def consolidate_isolated(step_dir):
    return run_isolated(lambda: consolidate(step_dir), timeout=60)


def convert_isolated(*argv):
    """(exit code, stderr) of the converter CLI's main(), in a child (a hang fails the test)."""
    from deepseek_ext.distributed import convert

    def run():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = convert.main([str(a) for a in argv])
        return code, err.getvalue()

    return result_of(run_isolated(run, timeout=60))


class Evil:
    """Not a tensor, not allowed by weights_only loading."""


# ------------------------------------------------------------------------------------------------ corruption
def _truncate(d):
    f = rank_file(d)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(d):
    f = rank_file(d)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _fifo(d):
    f = rank_file(d)
    f.unlink()
    os.mkfifo(f)


def _dev_zero(d):
    f = rank_file(d)
    f.unlink()
    f.symlink_to("/dev/zero")


def _manifest_fifo(d):
    (d / "manifest.json").unlink()
    os.mkfifo(d / "manifest.json")


def _manifest_dev_zero(d):
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to("/dev/zero")


def _traversal(name_of):
    def corrupt(d):
        # A perfectly valid rank file waits at the target: following the name would load it.
        outside = d.parent.parent / "elsewhere"
        outside.mkdir(exist_ok=True)
        target = outside / "x.pt"
        shutil.copy(rank_file(d), target)

        def point(m):
            m["files"][0]["file"] = name_of(target, d)

        resign(d, manifest=point)

    return corrupt


def _shift_offset_unsigned(d):
    m = manifest_of(d)
    m["units"][0]["params"][1]["offset"] += 1
    (d / "manifest.json").write_text(json.dumps(m))


def _overlap_resigned(d):
    def shift(m):
        params = m["units"][0]["params"]
        params[1]["offset"] = params[0]["offset"] + 1  # inside the first parameter

    resign(d, manifest=shift)


def _shape(d):
    def scalar(p):
        p["shards"][0] = torch.tensor(0.5)
        return p

    resign(d, payload=scalar)


def _dtype(d):
    def double(p):
        p["shards"][0] = p["shards"][0].double()
        return p

    resign(d, payload=double)


def _buffer(d):
    def wide(p):
        p["buffers"]["seen"] = torch.zeros(5)
        return p

    resign(d, payload=wide)


def _optimizer(d):
    def broadcastable(p):
        p["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1, 1).expand(3, 1)
        return p

    resign(d, payload=broadcastable)


def _unloadable(d):
    def evil(p):
        p["evil"] = Evil()
        return p

    resign(d, payload=evil)


def _not_a_payload(d):
    resign(d, payload=lambda p: [p["shards"]])


def _manifest_edit(edit):
    return lambda d: resign(d, manifest=edit)


def _raw_manifest(text):
    return lambda d: (d / "manifest.json").write_text(text)


CORRUPTIONS = {
    "truncated": (_truncate, "bytes, the manifest says"),
    "flipped_byte": (_flip, "does not match its checksum"),
    "missing_file": (lambda d: rank_file(d).unlink(), "is missing"),
    "fifo_rank_file": (_fifo, "is not a regular file"),
    "dev_zero_symlink": (_dev_zero, "symbolic link"),
    "manifest_fifo": (_manifest_fifo, "manifest.json is not a regular file"),
    "manifest_dev_zero": (_manifest_dev_zero, "manifest.json is a symbolic link"),
    "traversal": (_traversal(lambda t, d: os.path.relpath(t, d)), "is not a plain file name"),
    "absolute_path": (_traversal(lambda t, d: str(t)), "is not a plain file name"),
    "dev_zero_name": (_manifest_edit(lambda m: m["files"][0].update(file="/dev/zero")), "not a plain file name"),
    "shifted_offset": (_shift_offset_unsigned, "does not match its own checksum"),
    "overlapping_offsets": (_overlap_resigned, "overlap"),
    "wrong_shape_shard": (_shape, "shard 0 is ()"),
    "wrong_dtype_shard": (_dtype, "float64, the manifest says"),
    "wrong_shape_buffer": (_buffer, "buffer 'seen'"),
    "wrong_shape_optimizer_state": (_optimizer, "optimizer state 'exp_avg' of parameter 0"),
    "pickled_object": (_unloadable, "cannot be loaded"),
    "not_a_payload": (_not_a_payload, "is not rank 0's file"),
    "empty_file_list": (_manifest_edit(lambda m: m.update(files=[])), "'files' must list 1 rank files"),
    "missing_key": (_manifest_edit(lambda m: m.pop("units")), "no 'units'"),
    "files_wrong_type": (_manifest_edit(lambda m: m.update(files={"0": "x"})), "'files' must list"),
    "world_size_string": (_manifest_edit(lambda m: m.update(world_size="1")), "world_size '1'"),
    "shape_wrong_type": (
        _manifest_edit(lambda m: m["units"][0]["params"][0].update(shape="7x5")),
        "params[0].shape",
    ),
    "old_format": (_manifest_edit(lambda m: m.update(format=1)), "format 1, this version reads format 2"),
    "json_array": (_raw_manifest("[1, 2, 3]"), "not a JSON object"),
    "not_json": (_raw_manifest("{'units': "), "not valid JSON"),
    "empty_manifest": (_raw_manifest(""), "not valid JSON"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_an_unusable_checkpoint_falls_back_to_the_newest_valid_one(kind, two_checkpoints, states):
    corrupt, reason = CORRUPTIONS[kind]
    step_3 = two_checkpoints / "step_3"
    corrupt(step_3)
    start, state, messages, _ = restore(two_checkpoints)
    assert start == 2, messages
    assert_state(state, states[1])
    assert any("skipping" in m and "step_3" in m and reason in m for m in messages), messages
    # Every reader agrees, and none hangs or follows the name: verify, consolidate, the converter.
    assert run_isolated(lambda: verify(step_3), timeout=60) == ("ok", None)
    outcome = consolidate_isolated(step_3)
    assert outcome[0] == "raised" and isinstance(outcome[1], ValueError), outcome
    assert "is not a complete, valid checkpoint" in str(outcome[1]) and reason in str(outcome[1])
    out = two_checkpoints / "model.pt"
    code, err = convert_isolated(two_checkpoints, out)
    assert code == 0 and "warning: skipping" in err and reason in err, err
    converted = torch.load(out, weights_only=True)
    assert_state({k: v for k, v in converted.items() if k in states[1]}, states[1])


def test_every_checkpoint_unusable_restores_nothing_and_says_why(two_checkpoints):
    _flip(two_checkpoints / "step_3")
    _truncate(two_checkpoints / "step_1")
    start, _, messages, _ = restore(two_checkpoints)
    assert start == 0
    assert sum("skipping" in m for m in messages) == 2, messages
    code, err = convert_isolated(two_checkpoints, two_checkpoints / "out.pt")
    assert code == 1 and "no complete, valid checkpoint" in err and "Traceback" not in err


def test_the_restored_optimizer_state_is_the_saved_one(two_checkpoints):
    start, _, _, opt_state = restore(two_checkpoints)
    assert start == 4
    expected = result_of(in_job(lambda: trained(3)[1].state_dict()))
    for idx, st in expected["state"].items():
        for key, value in st.items():
            assert torch.equal(opt_state["state"][idx][key], value), (idx, key)


def test_a_differently_structured_model_is_a_clear_error(two_checkpoints):
    def job():
        model = ZeRO3(nn.Sequential(nn.Linear(5, 9), nn.Linear(9, 3)))
        CheckpointManager(two_checkpoints).restore(model)

    outcome = in_job(job)
    assert outcome[0] == "raised" and isinstance(outcome[1], ValueError)
    assert "saved from a differently structured model" in str(outcome[1])


def test_consolidate_matches_the_model(two_checkpoints, states):
    state = consolidate(two_checkpoints / "step_3")
    assert_state({k: v for k, v in state.items() if k in states[3]}, states[3])
    assert torch.equal(state["seen"], torch.full((2,), 3.0))


# ------------------------------------------------------------------------------------------- kill mid-save
STAGES = ["rank_file", "before_manifest", "manifest", "garbage", "prune"]
PUBLISHED = {"garbage", "prune"}  # stages after the manifest's rename: the new checkpoint is complete


@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_at_any_stage_of_a_save_leaves_the_newest_complete_checkpoint(stage, tmp_path, states):
    save(tmp_path, 1, 1, keep=1)
    save(tmp_path, 3, 3, keep=1, kill=stage)
    start, state, messages, _ = restore(tmp_path)
    if stage in PUBLISHED:
        assert start == 4
        assert_state(state, states[3])
    else:
        assert start == 2, messages
        assert_state(state, states[1])
    # The next save cleans up after the killed one: only its own files remain.
    save(tmp_path, 5, 5, keep=1)
    start, state, _, _ = restore(tmp_path)
    assert start == 6
    assert_state(state, states[5])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step_5"]
    files = sorted(p.name for p in (tmp_path / "step_5").iterdir())
    assert len(files) == 2 and files[0] == "manifest.json" and files[1].startswith("rank_00000-")


@pytest.mark.parametrize("stage", ["rank_file", "before_manifest", "manifest", "garbage"])
def test_re_saving_a_step_with_keep_1_never_loses_the_only_checkpoint(stage, tmp_path, states):
    save(tmp_path, 1, 1, keep=1)
    save(tmp_path, 1, 2, keep=1, kill=stage)  # the same step again, from another model, killed mid-way
    start, state, messages, _ = restore(tmp_path)
    assert start == 2, messages
    assert_state(state, states[2] if stage in PUBLISHED else states[1])
    save(tmp_path, 1, 3, keep=1)
    start, state, _, _ = restore(tmp_path)
    assert start == 2
    assert_state(state, states[3])
    assert len(list((tmp_path / "step_1").iterdir())) == 2  # one rank file and the manifest: no stale files


# ------------------------------------------------------------------------------------------------- writers
def test_a_second_job_saving_into_the_same_directory_is_refused(two_checkpoints, states):
    fd = os.open(two_checkpoints / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another job" holds the directory
        outcome = in_job(lambda: CheckpointManager(two_checkpoints, every=1).save(5, *trained(5)))
    finally:
        os.close(fd)
    assert outcome[0] == "raised" and isinstance(outcome[1], RuntimeError), outcome
    assert "another job is saving into" in str(outcome[1])
    assert not (two_checkpoints / "step_5").exists()
    start, state, _, _ = restore(two_checkpoints)
    assert start == 4
    assert_state(state, states[3])


def _write_many(path: str, payload: dict, rounds: int) -> None:
    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
    for _ in range(rounds):
        ck._atomic_save(payload, Path(path))
    os._exit(0)


def test_temporary_names_are_unique_per_process(tmp_path):
    """Two processes writing the same file at once never write into each other's temporary."""
    target = tmp_path / "rank_00000.pt"
    ctx = multiprocessing.get_context("fork")
    payloads = [{"value": torch.full((50_000,), float(v))} for v in (1, 2)]
    procs = [ctx.Process(target=_write_many, args=(str(target), payload, 30)) for payload in payloads]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        if p.exitcode is None:
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    value = torch.load(target, weights_only=True)["value"]
    assert torch.equal(value, torch.full_like(value, value[0].item())) and value[0].item() in (1.0, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["rank_00000.pt"]  # no temporaries left behind


def test_step_names_that_are_not_folders_are_ignored(two_checkpoints, states):
    (two_checkpoints / "step_9").write_text("not a checkpoint")
    os.symlink(two_checkpoints / "step_3", two_checkpoints / "step_7")
    start, state, _, _ = restore(two_checkpoints)
    assert start == 4
    assert_state(state, states[3])


# ---------------------------------------------------------------------------------------------- converter
def test_the_converter_reports_bad_paths_without_a_traceback(tmp_path, two_checkpoints):
    code, err = convert_isolated(tmp_path / "does-not-exist", tmp_path / "out.pt")
    assert code == 1 and "is not a folder" in err and "Traceback" not in err
    code, err = convert_isolated(two_checkpoints, tmp_path / "missing-dir" / "out.pt")
    assert code == 1 and "cannot write" in err and "Traceback" not in err
    _flip(two_checkpoints / "step_3")
    code, err = convert_isolated(two_checkpoints / "step_3", tmp_path / "out.pt")
    assert code == 1 and "does not match its checksum" in err and "Traceback" not in err
