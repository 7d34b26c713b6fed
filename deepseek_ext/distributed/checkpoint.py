"""Elastic, checksummed checkpoints for ZeRO3 models.

A checkpoint is a folder ``step_<N>/`` holding one file per rank (its parameter shards, its optimizer state and, on
rank 0, the buffers) and a ``manifest.json`` written last by rank 0: world size, the flat layout and dtype of every
unit, the shape and dtype of every buffer, the name, CRC32C and size of every rank file, and a CRC32C of the manifest
itself. Rank files get fresh names on every save (``rank_<r>-<token>.pt``) and every file is written to a temporary
name unique to the process, fsync'ed and renamed, so the manifest's own atomic replacement is what publishes a save:
a crash at any point leaves the previous manifest and the files it names intact, re-saving an existing step included.
Files no manifest names are removed only after the new manifest is in place. Only one job may save into a directory
at a time (rank 0 holds an exclusive lock on ``<directory>/.lock`` while it saves).

Nothing read back is trusted: the manifest's checksum and schema are checked, file names must be plain names of
regular files inside the step folder whose sizes and checksums match, and every tensor's shape and dtype is checked
against the manifest before anything is copied into the model or optimizer. ``restore`` takes the newest checkpoint
that passes all of this on every rank, warning with the reason for each one it skips, so a crash mid-save or a
corrupted file costs at most ``every`` steps. Restoring onto a different number of ranks re-shards from the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .._native import _C
from .zero3 import ZeRO3

FORMAT = 2
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KiB per unit; anything larger is not one of ours
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"^rank_\d+(-[0-9a-f]+)?\.pt$")
_TEMP_FILE = re.compile(r"^\..+\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used, with the reason (missing, corrupted, tampered or mismatched)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_dtype_name(name) -> bool:
    return isinstance(name, str) and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype)


# ------------------------------------------------------------------------------------------------- reading safely
def _member(step_dir: Path, name) -> Path:
    """``step_dir / name`` for a plain file name, or CheckpointError (no separators, no absolute paths, no '..')."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise CheckpointError(f"file name {name!r} is not a plain file name inside the checkpoint folder")
    return step_dir / name


def _open_regular(path: Path, expected_size: int | None = None, max_size: int | None = None) -> int:
    """An fd of ``path`` opened without following a symlink or blocking on a FIFO, after checking that it is a
    regular file of the expected size (or at most max_size bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path.name} is a symbolic link, not a regular file") from None
        raise CheckpointError(f"{path.name} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path.name} is not a regular file")
        if expected_size is not None and st.st_size != expected_size:
            raise CheckpointError(f"{path.name} has {st.st_size} bytes, the manifest says {expected_size}")
        if max_size is not None and st.st_size > max_size:
            raise CheckpointError(f"{path.name} has {st.st_size} bytes, more than the {max_size} allowed")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path: Path, expected_size: int) -> None:
    os.close(_open_regular(path, expected_size))


def file_crc32c(path: Path, expected_size: int | None = None, chunk: int = 1 << 24) -> tuple[int, int]:
    """(CRC32C, size) of a regular file, read in 16 MiB chunks; CheckpointError for anything but a regular file (of
    ``expected_size`` bytes when given)."""
    path = Path(path)
    fd = _open_regular(path, expected_size)
    crc, size = 0, 0
    with os.fdopen(fd, "rb") as f:
        while block := f.read(chunk):
            crc = _C.crc32c(block, crc)
            size += len(block)
            if expected_size is not None and size > expected_size:
                break
    if expected_size is not None and size != expected_size:
        raise CheckpointError(f"{path.name} changed size while it was read")
    return crc, size


def _manifest_crc(manifest: dict) -> int:
    body = {k: v for k, v in manifest.items() if k != "crc32c"}
    return _C.crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise CheckpointError(f"malformed manifest: {what}")


def _check_schema(m, step: int | None) -> None:
    """Every field the loader uses, with its type and range; offsets and sizes consistent with each other."""
    _require(isinstance(m, dict), "not a JSON object")
    for key in ("format", "step", "world_size", "units", "files", "buffers", "crc32c"):
        _require(key in m, f"no '{key}'")
    _require(m["format"] == FORMAT, f"format {m['format']!r}, this version reads format {FORMAT}")
    _require(_is_int(m["step"]) and (step is None or m["step"] == step), f"step {m['step']!r} in folder step_{step}")
    world = m["world_size"]
    _require(_is_int(world, 1), f"world_size {world!r}")
    files = m["files"]
    _require(isinstance(files, list) and len(files) == world, f"'files' must list {world} rank files")
    for i, e in enumerate(files):
        _require(isinstance(e, dict), f"files[{i}] is not an object")
        _require(e.get("rank") == i and _is_int(e.get("rank")), f"files[{i}] has rank {e.get('rank')!r}")
        _require(isinstance(e.get("file"), str), f"files[{i}] has no file name")
        _require(_is_int(e.get("crc32c")) and _is_int(e.get("bytes")), f"files[{i}] needs integer crc32c and bytes")
    units = m["units"]
    _require(isinstance(units, list), "'units' is not a list")
    for i, u in enumerate(units):
        _require(isinstance(u, dict), f"units[{i}] is not an object")
        for key in ("used", "padded", "shard"):
            _require(_is_int(u.get(key)), f"units[{i}].{key} is {u.get(key)!r}")
        _require(u["used"] <= u["padded"] == u["shard"] * world, f"units[{i}] sizes do not add up")
        _require(_is_dtype_name(u.get("dtype")), f"units[{i}].dtype is {u.get('dtype')!r}")
        params = u.get("params")
        _require(isinstance(params, list), f"units[{i}].params is not a list")
        for j, p in enumerate(params):
            where = f"units[{i}].params[{j}]"
            _require(isinstance(p, dict), f"{where} is not an object")
            shape = p.get("shape")
            _require(isinstance(shape, list) and all(_is_int(s) for s in shape), f"{where}.shape is {shape!r}")
            _require(_is_int(p.get("numel")) and p["numel"] == math.prod(shape), f"{where}.numel")
            _require(_is_int(p.get("offset")) and p["offset"] + p["numel"] <= u["used"], f"{where}.offset")
            names = p.get("names")
            _require(isinstance(names, list) and names and all(isinstance(n, str) for n in names), f"{where}.names")
        spans = sorted((p["offset"], p["offset"] + p["numel"]) for p in params)
        _require(all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"units[{i}] has parameters that overlap")
    buffers = m["buffers"]
    _require(isinstance(buffers, dict), "'buffers' is not an object")
    for name, b in buffers.items():
        _require(
            isinstance(b, dict)
            and isinstance(b.get("shape"), list)
            and all(_is_int(s) for s in b["shape"])
            and _is_dtype_name(b.get("dtype")),
            f"buffers[{name!r}]",
        )


def read_manifest(step_dir: Path) -> dict:
    """The manifest of ``step_dir`` after its checksum and schema check (CheckpointError with the reason)."""
    step_dir = Path(step_dir)
    m = _STEP_DIR.match(step_dir.name)
    fd = _open_regular(step_dir / "manifest.json", max_size=MAX_MANIFEST_BYTES)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"manifest.json is not valid JSON ({e})") from None
    _require(isinstance(manifest, dict), "not a JSON object")
    _require(_is_int(manifest.get("crc32c")), "no integer 'crc32c'")
    if _manifest_crc(manifest) != manifest["crc32c"]:
        raise CheckpointError("manifest.json does not match its own checksum")
    _check_schema(manifest, int(m.group(1)) if m else None)
    return manifest


def _verify(step_dir: Path) -> dict:
    manifest = read_manifest(step_dir)
    for entry in manifest["files"]:
        path = _member(step_dir, entry["file"])
        crc, _ = file_crc32c(path, entry["bytes"])
        if crc != entry["crc32c"]:
            raise CheckpointError(f"{entry['file']} does not match its checksum")
    return manifest


def _verify_deep(step_dir: Path) -> tuple[dict, list[dict]]:
    """The manifest and every rank's payload (memory-mapped), after every check that needs no model."""
    manifest = _verify(step_dir)
    payloads = [_load_payload(step_dir, e, mmap=True) for e in manifest["files"]]
    shard_sizes = [u["shard"] for u in manifest["units"]]
    for e, p in zip(manifest["files"], payloads):
        _check_shards(p, manifest, e["file"])
        _check_optimizer(p.get("optimizer"), len(shard_sizes), shard_sizes, e["file"])
    _check_buffers(payloads[0]["buffers"], manifest, manifest["files"][0]["file"])
    return manifest, payloads


def verify(step_dir: str | os.PathLike) -> dict | None:
    """The manifest of a complete checkpoint whose manifest and files all check out, else None.

    Checked: the manifest's own CRC32C and schema; every file name is a plain name of a regular file in the folder
    with the recorded size and CRC32C; every rank file loads (``weights_only``) and its shards, buffers and optimizer
    state have the shapes and dtypes the manifest records. :func:`consolidate` raises with the reason instead.

    Example:
        >>> manifest = verify(Path('ckpt/step_999'))   # None when a file is missing or its checksum differs
    """
    try:
        return _verify_deep(Path(step_dir))[0]
    except CheckpointError:
        return None


def _load_payload(step_dir: Path, entry: dict, mmap: bool) -> dict:
    """One rank file, loaded with weights_only after its size and type are checked again."""
    path = _member(step_dir, entry["file"])
    _check_regular(path, entry["bytes"])
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # an unpicklable or truncated file, whatever the exception type
        raise CheckpointError(f"{entry['file']} cannot be loaded ({type(e).__name__}: {e})") from None
    if not (
        isinstance(payload, dict)
        and payload.get("format") == FORMAT
        and payload.get("rank") == entry["rank"]
        and isinstance(payload.get("shards"), list)
        and isinstance(payload.get("buffers"), dict)
    ):
        raise CheckpointError(f"{entry['file']} is not rank {entry['rank']}'s file of a format-{FORMAT} checkpoint")
    return payload


def _check_shards(payload: dict, manifest: dict, name: str) -> None:
    units = manifest["units"]
    shards = payload["shards"]
    if len(shards) != len(units):
        raise CheckpointError(f"{name} holds {len(shards)} shards, the manifest has {len(units)} units")
    for i, (s, u) in enumerate(zip(shards, units)):
        if isinstance(s, torch.Tensor) and tuple(s.shape) == (u["shard"],) and _dtype_name(s.dtype) == u["dtype"]:
            continue
        got = f"{tuple(s.shape)} {_dtype_name(s.dtype)}" if isinstance(s, torch.Tensor) else type(s).__name__
        raise CheckpointError(f"{name}: shard {i} is {got}, the manifest says ({u['shard']},) {u['dtype']}")


def _check_buffers(buffers: dict, manifest: dict, name: str) -> None:
    want = manifest["buffers"]
    if set(buffers) != set(want):
        raise CheckpointError(f"{name}: buffers {sorted(buffers)} differ from the manifest's {sorted(want)}")
    for k, b in buffers.items():
        w = want[k]
        if not isinstance(b, torch.Tensor) or list(b.shape) != w["shape"] or _dtype_name(b.dtype) != w["dtype"]:
            raise CheckpointError(f"{name}: buffer {k!r} does not match the manifest's {w['shape']} {w['dtype']}")


def _check_optimizer(state, n_params: int, shard_sizes: list[int], name: str) -> None:
    """Optimizer state: per-parameter tensors are scalars or shards of the parameter's size."""
    if state is None:
        return
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict) and "param_groups" in state):
        raise CheckpointError(f"{name}: the optimizer state is not an optimizer state_dict")
    for idx, st in state["state"].items():
        if not (_is_int(idx) and idx < n_params and isinstance(st, dict)):
            raise CheckpointError(f"{name}: optimizer state for parameter {idx!r} of {n_params}")
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.numel() != 1 and tuple(v.shape) != (shard_sizes[idx],):
                raise CheckpointError(
                    f"{name}: optimizer state {key!r} of parameter {idx} is {tuple(v.shape)}, expected a scalar or "
                    f"({shard_sizes[idx]},)"
                )


# ------------------------------------------------------------------------------------------------ writing safely
def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_write(path: Path, write) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _atomic_save(obj, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _directory_lock(directory: Path):
    """An exclusive, non-blocking lock on ``directory/.lock`` (released when the holder exits, however it exits)."""
    import fcntl

    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _looks_complete(step_dir: Path) -> bool:
    """A cheap check (no checksums of the rank files): the manifest verifies and names regular files of its sizes."""
    try:
        manifest = read_manifest(step_dir)
        for entry in manifest["files"]:
            _check_regular(_member(step_dir, entry["file"]), entry["bytes"])
        return True
    except CheckpointError:
        return False


def _reshard(pieces: list[torch.Tensor], used: int, padded: int, rank: int) -> torch.Tensor:
    """This rank's shard of a flat buffer saved as ``pieces`` (the old ranks' shards, in order)."""
    flat = torch.cat([p.reshape(-1) for p in pieces])[:used]
    shard = padded // dist.get_world_size() if dist.is_initialized() else padded
    out = torch.zeros(shard, dtype=flat.dtype)
    lo = rank * shard
    piece = flat[lo : lo + shard]
    out[: piece.numel()] = piece
    return out


def _structure(units: list[dict]) -> list:
    return [(u["used"], [(p["shape"], p["offset"], sorted(p["names"])) for p in u["params"]]) for u in units]


def _broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class CheckpointManager:
    """Periodic sharded checkpoints of a :class:`ZeRO3` model and its optimizer.

    Args:
        directory: where ``step_<N>/`` folders go (shared by all ranks).
        every: ``maybe_save(step, ...)`` saves when ``(step + 1) % every == 0``.
        keep: how many verified checkpoints to keep; older ones are deleted only after a newer one verifies.

    Guarantees: a crash or kill at any point of a save (rank files, manifest, pruning) leaves the newest previously
    completed checkpoint restorable, re-saving an existing step included; a second job saving into the same
    directory at the same time gets a ``RuntimeError`` instead of interleaving files; ``restore`` skips, with a
    warning naming the reason, every checkpoint that is incomplete, corrupted, tampered with or unloadable.

    Example:
        >>> ckpt = CheckpointManager('ckpt/', every=1000, keep=3)
        >>> start = ckpt.restore(model, optimizer)
        >>> for step in range(start, steps):
        ...     train_step()
        ...     ckpt.maybe_save(step, model, optimizer)
    """

    def __init__(self, directory: str | os.PathLike, every: int = 1000, keep: int = 3):
        for name, v in (("every", every), ("keep", keep)):
            if not _is_int(v, 1):
                raise ValueError(f"CheckpointManager: expected {name} to be an integer >= 1, but got {v!r}")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

    def _steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(
            (
                int(m.group(1))
                for p in self.directory.iterdir()
                if (m := _STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()
            ),
            reverse=True,
        )

    def maybe_save(self, step: int, model: ZeRO3, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Saves when ``(step + 1) % every == 0`` (a collective) and says whether it did."""
        if (step + 1) % self.every:
            return False
        self.save(step, model, optimizer)
        return True

    def save(self, step: int, model: ZeRO3, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Writes checkpoint ``step`` (a collective: every rank must call it)."""
        if not _is_int(step):
            raise ValueError(f"CheckpointManager.save: expected step to be a non-negative integer, but got {step!r}")
        rank, world = dist.get_rank(), dist.get_world_size()
        step_dir = self.directory / f"step_{step}"
        with contextlib.ExitStack() as stack:
            ok = True
            if rank == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                ok = stack.enter_context(_directory_lock(self.directory))
                if ok:
                    step_dir.mkdir(exist_ok=True)
            if not _broadcast_object(ok):
                raise RuntimeError(
                    f"CheckpointManager: another job is saving into {self.directory} ({self.directory / '.lock'} is "
                    "locked); give each job its own checkpoint directory"
                )
            self._write(step, step_dir, model, optimizer, rank, world)
            self._prune(newest=step)
        return step_dir

    def _write(self, step: int, step_dir: Path, model: ZeRO3, optimizer, rank: int, world: int) -> None:
        shards = [s.detach().cpu() for s in model.shards()]
        buffers = {k: v.detach().cpu() for k, v in model.module.named_buffers()} if rank == 0 else {}
        payload = {
            "format": FORMAT,
            "rank": rank,
            "shards": shards,
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "buffers": buffers,
        }
        name = f"rank_{rank:05d}-{secrets.token_hex(6)}.pt"  # a fresh name: the current manifest's file stays
        _atomic_save(payload, step_dir / name)
        crc, size = file_crc32c(step_dir / name)
        entries = [None] * world
        dist.all_gather_object(entries, {"file": name, "rank": rank, "crc32c": crc, "bytes": size})
        if rank == 0:
            units = model.sharded_layout()
            for unit, shard in zip(units, shards):
                unit["dtype"] = _dtype_name(shard.dtype)
            manifest = {
                "format": FORMAT,
                "step": step,
                "world_size": world,
                "units": units,
                "files": entries,
                "buffers": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in buffers.items()},
            }
            manifest["crc32c"] = _manifest_crc(manifest)
            _atomic_write_text(json.dumps(manifest, indent=1), step_dir / "manifest.json")  # publishes the save
            self._collect_garbage(step_dir, {e["file"] for e in entries} | {"manifest.json"})
        dist.barrier()

    @staticmethod
    def _collect_garbage(step_dir: Path, keep: set[str]) -> None:
        """Removes the files of an earlier save of this step and temporaries of killed writers (after the new
        manifest is in place, so they are no longer anyone's)."""
        for p in step_dir.iterdir():
            if p.name not in keep and (_RANK_FILE.match(p.name) or _TEMP_FILE.match(p.name)):
                with contextlib.suppress(OSError):
                    p.unlink()

    def _prune(self, newest: int) -> None:
        """Once checkpoint ``newest`` verifies: keeps it and the ``keep - 1`` newest older ones that look complete,
        and deletes every other older one (incomplete ones included)."""
        if dist.get_rank() != 0:
            dist.barrier()
            return
        if verify(self.directory / f"step_{newest}") is not None:
            kept = 1
            for old in (s for s in self._steps() if s < newest):
                if kept < self.keep and _looks_complete(self.directory / f"step_{old}"):
                    kept += 1
                    continue
                # Renamed out of sight first: a kill mid-delete leaves no half-deleted step_<N> behind.
                trash = self.directory / f".trash-step_{old}-{secrets.token_hex(4)}"
                with contextlib.suppress(OSError):
                    os.rename(self.directory / f"step_{old}", trash)
                    shutil.rmtree(trash, ignore_errors=True)
        for p in self.directory.iterdir():
            if p.name.startswith(".trash-step_"):
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def restore(self, model: ZeRO3, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Loads the newest valid checkpoint and returns the step to continue from (its step + 1), or 0 if none.

        A collective: the ranks agree on which checkpoint is valid. Every checkpoint skipped is reported with a
        ``UserWarning`` naming the reason. A checkpoint saved from a differently structured model is an error
        (``ValueError``), not a fallback."""
        rank, world = dist.get_rank(), dist.get_world_size()
        for step in _broadcast_object(self._steps()):
            step_dir = self.directory / f"step_{step}"
            plan, reason, mismatch = None, None, None
            try:
                plan = self._read(step_dir, model, optimizer, rank, world)
            except _StructureMismatch as e:
                mismatch = str(e)
            except CheckpointError as e:
                reason = str(e)
            except OSError as e:
                reason = f"cannot be read ({e})"
            ok = torch.tensor([1 if plan is not None else 0])
            bad_structure = torch.tensor([1 if mismatch else 0])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            dist.all_reduce(bad_structure, op=dist.ReduceOp.MAX)
            if bad_structure.item():
                raise ValueError(
                    mismatch or f"CheckpointManager: {step_dir} was saved from a differently structured model"
                )
            if not ok.item():
                warnings.warn(
                    f"CheckpointManager: skipping {step_dir}: {reason or 'another rank could not read it'}",
                    stacklevel=2,
                )
                continue
            self._apply(plan, model, optimizer)
            return step + 1
        return 0

    def _read(self, step_dir: Path, model: ZeRO3, optimizer, rank: int, world: int) -> dict:
        """Reads and checks everything this rank needs from ``step_dir``; changes nothing."""
        manifest = _verify(step_dir)
        layout = model.sharded_layout()
        files = manifest["files"]
        same_world = manifest["world_size"] == world
        mismatch = _structure(manifest["units"]) != _structure(layout) or (
            same_world and [u["shard"] for u in manifest["units"]] != [u["shard"] for u in layout]
        )
        named = dict(model.module.named_buffers())
        mismatch = mismatch or any(
            k in named and list(named[k].shape) != b["shape"] for k, b in manifest["buffers"].items()
        )
        if mismatch:
            raise _StructureMismatch(f"CheckpointManager: {step_dir} was saved from a differently structured model")
        wanted = [rank] if same_world else list(range(len(files)))
        if 0 not in wanted:
            wanted.append(0)  # rank 0's file holds the buffers
        payloads = {r: _load_payload(step_dir, files[r], mmap=True) for r in wanted}
        for r, p in payloads.items():
            _check_shards(p, manifest, files[r]["file"])
        _check_buffers(payloads[0]["buffers"], manifest, files[0]["file"])
        n_params = len(layout)
        if same_world:
            shards = list(payloads[rank]["shards"])
            opt_state = payloads[rank]["optimizer"]
            _check_optimizer(opt_state, n_params, [u["shard"] for u in manifest["units"]], files[rank]["file"])
        else:
            shards = [
                _reshard([payloads[r]["shards"][i] for r in range(len(files))], unit["used"], unit["padded"], rank)
                for i, unit in enumerate(layout)
            ]
            states = [payloads[r]["optimizer"] for r in range(len(files))]
            opt_state = None
            if states[0] is not None:
                for r, st in enumerate(states):
                    _check_optimizer(st, n_params, [u["shard"] for u in manifest["units"]], files[r]["file"])
                    if st is None or set(st["state"]) != set(states[0]["state"]):
                        raise CheckpointError(f"{files[r]['file']}: optimizer state differs in shape from rank 0's")
                opt_state = self._reshard_optimizer(states, manifest["units"], layout, rank)
        if optimizer is not None and opt_state is not None:
            groups = optimizer.state_dict()["param_groups"]
            saved = opt_state["param_groups"]
            if not isinstance(saved, list) or [len(g.get("params", ())) for g in saved if isinstance(g, dict)] != [
                len(g["params"]) for g in groups
            ]:
                raise CheckpointError("the optimizer's parameter groups differ from the saved ones")
        for i, (value, shard) in enumerate(zip(shards, model.shards())):
            if value.shape != shard.shape:  # cannot happen after the checks above; never broadcast into a shard
                raise CheckpointError(f"shard {i} is {tuple(value.shape)}, this rank holds {tuple(shard.shape)}")
        return {"shards": shards, "optimizer": opt_state, "buffers": payloads[0]["buffers"]}

    @staticmethod
    def _apply(plan: dict, model: ZeRO3, optimizer) -> None:
        with torch.no_grad():
            for shard, value in zip(model.shards(), plan["shards"]):
                shard.copy_(value.to(shard.dtype))
        if optimizer is not None and plan["optimizer"] is not None:
            optimizer.load_state_dict(plan["optimizer"])
        named = dict(model.module.named_buffers())
        with torch.no_grad():
            for k, v in plan["buffers"].items():
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


class _StructureMismatch(CheckpointError):
    pass


def consolidate(step_dir: str | os.PathLike) -> dict:
    """One ordinary state_dict from a sharded checkpoint folder, without a distributed job.

    Everything is checked first (manifest checksum and schema, file names, sizes, checksums, every shard's shape and
    dtype); a folder that fails raises ``ValueError`` with the reason.

    Example:
        >>> state = consolidate('ckpt/step_999')   # one ordinary state_dict, no process group needed
        >>> model.load_state_dict(state)
    """
    step_dir = Path(step_dir)
    try:
        manifest, payloads = _verify_deep(step_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{step_dir} is not a complete, valid checkpoint: {e}") from None
    out = {}
    for i, unit in enumerate(manifest["units"]):
        flat = torch.cat([p["shards"][i] for p in payloads])[: unit["used"]]
        for param in unit["params"]:
            value = flat[param["offset"] : param["offset"] + param["numel"]].view(param["shape"]).clone()
            for name in param["names"]:
                out[name] = value
    out.update(payloads[0]["buffers"])
    return out


def step_folders(directory: str | os.PathLike) -> list[Path]:
    """The ``step_<N>`` folders under ``directory``, newest first (symbolic links and plain files are not counted).

    Example:
        >>> for step_dir in step_folders('ckpt/'):
        ...     print(step_dir, verify(step_dir) is not None)
    """
    directory = Path(directory)
    return [directory / f"step_{s}" for s in CheckpointManager(directory)._steps()]
