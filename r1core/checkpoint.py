"""Atomic checkpoints: write into a temporary directory, mark it complete, then rename.

A kill mid-write leaves only a `*.tmp*` directory that resume ignores; a directory without the
COMPLETE marker is never loaded. Training state is written with `torch.distributed.checkpoint`
by every worker at once (sharded), into one temporary directory that rank 0 commits.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

COMPLETE = "COMPLETE"
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
    """Mark a fully written `tmp` complete and move it to `final_dir` (replacing an older copy)."""
    (tmp / COMPLETE).write_text(json.dumps(meta or {}))
    if final_dir.exists():  # same step written again (a retried worker): replace it
        shutil.rmtree(final_dir)
    tmp.rename(final_dir)
    return final_dir


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE).read_text())


def latest_complete(checkpoint_root: Path) -> Path | None:
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if ".tmp" not in p.name and is_complete(p))
    return done[-1] if done else None


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
