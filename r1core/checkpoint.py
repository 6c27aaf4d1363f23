"""Atomic, verified checkpoints: write into a temporary directory, record every file's size and
SHA-256 in a manifest, mark it complete, then rename.

A kill mid-write leaves only a `*.tmp*` directory that resume ignores; a directory without the
COMPLETE marker is never loaded, and one whose files no longer match its manifest (truncated,
overwritten, missing) is skipped for the newest one that does (`verify`). Training state is
written with `torch.distributed.checkpoint` by every worker at once (sharded), into one
temporary directory that rank 0 commits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"  # {"files": {relative path: {"size": bytes, "sha256": hex}}}
TRAINER_STATE = "trainer_state.pt"


def write_atomically(final_dir: Path, write: Callable[[Path], None], meta: dict | None = None) -> Path:
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    return commit(tmp, final_dir, meta)


def commit(tmp: Path, final_dir: Path, meta: dict | None = None) -> Path:
    """Record the manifest of a fully written `tmp`, flush it to disk, mark it complete and move it
    to `final_dir` (replacing an older copy): the marker is written only once the files are."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        _fsync(f)
    _write_synced(tmp / MANIFEST, json.dumps({"files": files}))
    _write_synced(tmp / COMPLETE, json.dumps(meta or {}))
    if final_dir.exists():  # same step written again (a retried worker): replace it
        shutil.rmtree(final_dir)
    tmp.rename(final_dir)
    _fsync(final_dir.parent)
    return final_dir


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def verify(path: Path) -> str | None:
    """Why the complete directory `path` cannot be trusted (a file missing, of another size or
    content than its manifest says, or no readable manifest), or None when every file matches."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not a map")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path / MANIFEST}: no readable manifest ({type(e).__name__}: {e})"
    for name, want in files.items():
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{f}: missing"
        if size != want.get("size"):
            return f"{f}: {size} bytes, the manifest says {want.get('size')}"
        if _sha256(f) != want.get("sha256"):
            return f"{f}: content differs from the manifest (SHA-256)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fingerprint(path: Path) -> str:
    """The identity of a complete directory's contents: the SHA-256 of its manifest, which holds
    every file's name, size and SHA-256 (the same files give the same fingerprint)."""
    return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE).read_text())


def complete_checkpoints(checkpoint_root: Path) -> list[Path]:
    """The complete `step_*` checkpoints under `checkpoint_root`, newest first (unverified)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if ".tmp" not in p.name and is_complete(p)), reverse=True)


def checkpoint_step(path: Path) -> int:
    return int(read_meta(path).get("step", -1))


def check_model_dir(path: str | Path, what: str = "model") -> str | None:
    """Why `path` is not a loadable HF model directory (no config.json, no weights, a
    safetensors file that is truncated or whose header is damaged), or None. Cheap: only headers
    and sizes are read, so that it runs before any training starts."""
    path = Path(path)
    if not path.is_dir():
        return f"{what} '{path}': no such directory"
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"{what} '{path}': no readable config.json ({type(e).__name__})"
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not list(path.glob("pytorch_model*.bin")):
        return f"{what} '{path}': no weights (*.safetensors or pytorch_model*.bin)"
    for shard in shards:
        if problem := safetensors_problem(shard):
            return f"{what}: {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable: its 8-byte header length, the JSON header and the data
    its tensors' offsets need must all be there (the format: u64 length, JSON, raw data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"'{path}': {size} bytes, shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 << 20):
            return f"'{path}': header of {header_len} bytes in a file of {size} (truncated or not safetensors)"
        try:
            header = json.loads(f.read(header_len))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return f"'{path}': damaged header ({type(e).__name__})"
    if 8 + header_len + end != size:
        return f"'{path}': {size} bytes, its header needs {8 + header_len + end} (truncated)"
    return None


def save_training_state(path: Path, model, optimizer, scheduler, step: int, *, rank: int) -> None:
    """Model and optimizer state with `torch.distributed.checkpoint` (every worker writes its own
    shard and calls this; a replicated tensor is written once), plus the scheduler and step (rank 0).
    The layout does not depend on the number of workers or the strategy: a checkpoint written by
    2 FSDP workers loads onto 1, onto 4, or onto DDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "step": step}, Path(path) / TRAINER_STATE)


def load_training_state(path: Path, model, optimizer, scheduler) -> int:
    """Load what `save_training_state` wrote (resharded onto this run's workers); returns the
    step done. A missing or unreadable file is an error naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        trainer = torch.load(path / TRAINER_STATE, weights_only=True)
    except (Exception, CheckpointException) as err:  # re-raised with the checkpoint's name
        raise RuntimeError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err
    scheduler.load_state_dict(trainer["scheduler"])
    return int(trainer["step"])


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group that it assumes a single process: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
