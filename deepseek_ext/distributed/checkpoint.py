"""Elastic, checksummed checkpoints for ZeRO3 models.

A checkpoint is a folder ``step_<N>/`` holding one file per rank (its parameter shards, its optimizer state and, on
rank 0, the buffers) and a ``manifest.json`` written last by rank 0: world size, the flat layout of every unit and
the CRC32C and size of every file. Every file is written to a temporary name, fsync'ed and renamed, so a crash
leaves either a complete checkpoint or one without a manifest. ``restore`` takes the newest checkpoint whose
manifest exists and whose files all verify (the ranks agree collectively), so a crash mid-save or a corrupted file
costs at most ``every`` steps. Restoring onto a different number of ranks re-shards from the manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from .._native import _C
from .zero3 import ZeRO3

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def file_crc32c(path: Path, chunk: int = 1 << 24) -> tuple[int, int]:
    """(CRC32C, size) of a file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = _C.crc32c(block, crc)
            size += len(block)
    return crc, size


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(step_dir: Path) -> dict | None:
    """The manifest of a complete checkpoint whose files all match their checksums, else None.

    Example:
        >>> manifest = verify(Path('ckpt/step_999'))   # None when a file is missing or its checksum differs
    """
    manifest_path = step_dir / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    for entry in manifest.get("files", []):
        path = step_dir / entry["file"]
        if not path.exists() or file_crc32c(path) != (entry["crc32c"], entry["bytes"]):
            return None
    return manifest


def _reshard(pieces: list[torch.Tensor], used: int, padded: int, rank: int) -> torch.Tensor:
    """This rank's shard of a flat buffer saved as ``pieces`` (the old ranks' shards, in order)."""
    flat = torch.cat([p.reshape(-1) for p in pieces])[:used]
    shard = padded // dist.get_world_size() if dist.is_initialized() else padded
    out = torch.zeros(shard, dtype=flat.dtype)
    lo = rank * shard
    piece = flat[lo : lo + shard]
    out[: piece.numel()] = piece
    return out


class CheckpointManager:
    """Periodic sharded checkpoints of a :class:`ZeRO3` model and its optimizer.

    Args:
        directory: where ``step_<N>/`` folders go (shared by all ranks).
        every: ``maybe_save(step, ...)`` saves when ``(step + 1) % every == 0``.
        keep: how many verified checkpoints to keep; older ones are deleted only after a newer one verifies.

    Example:
        >>> ckpt = CheckpointManager('ckpt/', every=1000, keep=3)
        >>> start = ckpt.restore(model, optimizer)
        >>> for step in range(start, steps):
        ...     train_step()
        ...     ckpt.maybe_save(step, model, optimizer)
    """

    def __init__(self, directory: str | os.PathLike, every: int = 1000, keep: int = 3):
        if every < 1 or keep < 1:
            raise ValueError(f"CheckpointManager: every and keep must be >= 1, got {every} and {keep}")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

    def _steps(self) -> list[int]:
        if not self.directory.exists():
            return []
        return sorted(
            (int(m.group(1)) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))), reverse=True
        )

    def maybe_save(self, step: int, model: ZeRO3, optimizer: torch.optim.Optimizer | None = None) -> bool:
        if (step + 1) % self.every:
            return False
        self.save(step, model, optimizer)
        return True

    def save(self, step: int, model: ZeRO3, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Writes checkpoint ``step`` (a collective: every rank must call it)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        step_dir = self.directory / f"step_{step}"
        if rank == 0:
            step_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        payload = {
            "format": FORMAT,
            "rank": rank,
            "shards": [s.detach().cpu() for s in model.shards()],
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "buffers": {k: v.detach().cpu() for k, v in model.module.named_buffers()} if rank == 0 else {},
        }
        name = f"rank_{rank:05d}.pt"
        _atomic_save(payload, step_dir / name)
        crc, size = file_crc32c(step_dir / name)
        entries = [None] * world
        dist.all_gather_object(entries, {"file": name, "rank": rank, "crc32c": crc, "bytes": size})
        if rank == 0:
            manifest = {
                "format": FORMAT,
                "step": step,
                "world_size": world,
                "units": model.sharded_layout(),
                "files": entries,
            }
            _atomic_write_text(json.dumps(manifest, indent=1), step_dir / "manifest.json")
        dist.barrier()
        self._prune(newest=step)
        return step_dir

    def _prune(self, newest: int) -> None:
        if dist.get_rank() != 0:
            dist.barrier()
            return
        if verify(self.directory / f"step_{newest}") is not None:
            valid = [s for s in self._steps() if s <= newest]
            for old in valid[self.keep :]:
                shutil.rmtree(self.directory / f"step_{old}", ignore_errors=True)
        dist.barrier()

    def restore(self, model: ZeRO3, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Loads the newest valid checkpoint and returns the step to continue from (its step + 1), or 0 if none.
        A collective: the ranks agree on which checkpoint is valid."""
        rank, world = dist.get_rank(), dist.get_world_size()
        for step in self._steps():
            step_dir = self.directory / f"step_{step}"
            manifest = verify(step_dir)
            ok = torch.tensor([1 if manifest is not None else 0])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not ok.item():
                continue
            self._load(step_dir, manifest, model, optimizer, rank, world)
            return step + 1
        return 0

    def _load(self, step_dir: Path, manifest: dict, model: ZeRO3, optimizer, rank: int, world: int) -> None:
        layout = model.sharded_layout()
        saved_units = manifest["units"]
        if [(u["used"], [p["shape"] for p in u["params"]]) for u in saved_units] != [
            (u["used"], [p["shape"] for p in u["params"]]) for u in layout
        ]:
            raise ValueError(f"CheckpointManager: {step_dir} was saved from a differently structured model")
        files = [step_dir / e["file"] for e in sorted(manifest["files"], key=lambda e: e["rank"])]
        same_world = manifest["world_size"] == world
        payloads = (
            [torch.load(files[rank], map_location="cpu", weights_only=True)]
            if same_world
            else [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
        )
        with torch.no_grad():
            for i, (shard, unit) in enumerate(zip(model.shards(), layout)):
                value = (
                    payloads[0]["shards"][i]
                    if same_world
                    else _reshard([p["shards"][i] for p in payloads], unit["used"], unit["padded"], rank)
                )
                shard.copy_(value.to(shard.dtype))
        if optimizer is not None and payloads[0]["optimizer"] is not None:
            if same_world:
                optimizer.load_state_dict(payloads[0]["optimizer"])
            else:
                states = [p["optimizer"] for p in payloads]
                optimizer.load_state_dict(self._reshard_optimizer(states, saved_units, layout, rank))
        # Buffers (replicated, not sharded) were saved by rank 0.
        buffers = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)["buffers"]
        named = dict(model.module.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                if k in named:
                    named[k].copy_(v)

    @staticmethod
    def _reshard_optimizer(states: list[dict], saved_units: list[dict], layout: list[dict], rank: int) -> dict:
        """Optimizer state saved by N ranks, re-sharded for this rank. The optimizer must have been built on
        ``model.parameters()`` (parameter i is unit i's shard): per-parameter tensors of the old shard's size are
        slices of a flat buffer and are re-cut; everything else (step counts, hyper-parameters) is copied."""
        new_state = {}
        for idx, st in states[0]["state"].items():
            old_shard = saved_units[idx]["shard"]
            new_state[idx] = {
                key: _reshard([s["state"][idx][key] for s in states], layout[idx]["used"], layout[idx]["padded"], rank)
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == old_shard
                else value
                for key, value in st.items()
            }
        return {"state": new_state, "param_groups": states[0]["param_groups"]}


def consolidate(step_dir: str | os.PathLike) -> dict:
    """One ordinary state_dict from a sharded checkpoint folder, without a distributed job (verifies checksums).

    Example:
        >>> state = consolidate('ckpt/step_999')   # one ordinary state_dict, no process group needed
        >>> model.load_state_dict(state)
    """
    step_dir = Path(step_dir)
    manifest = verify(step_dir)
    if manifest is None:
        raise ValueError(f"{step_dir} is not a complete, valid checkpoint (missing manifest or checksum mismatch)")
    files = [step_dir / e["file"] for e in sorted(manifest["files"], key=lambda e: e["rank"])]
    payloads = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    out = {}
    for i, unit in enumerate(manifest["units"]):
        flat = torch.cat([p["shards"][i] for p in payloads])[: unit["used"]]
        for param in unit["params"]:
            value = flat[param["offset"] : param["offset"] + param["numel"]].view(param["shape"]).clone()
            for name in param["names"]:
                out[name] = value
    out.update(payloads[0]["buffers"])
    return out
