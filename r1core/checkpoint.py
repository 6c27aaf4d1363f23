"""Atomic checkpoints: write into a temporary directory, mark it complete, then rename.

A kill mid-write leaves only a `*.tmp-*` directory that resume ignores; a directory without the
COMPLETE marker is never loaded.
"""
from __future__ import annotations

import json
import os
import shutil
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
    done = sorted(p for p in root.glob("step_*") if ".tmp-" not in p.name and is_complete(p))
    return done[-1] if done else None


def save_training_state(path: Path, model, tokenizer, optimizer, scheduler, step: int) -> None:
    """An HF model directory plus the optimiser/scheduler state and step needed to resume."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state()}, path / TRAINER_STATE)


def load_training_state(path: Path, model, optimizer, scheduler) -> int:
    """Load weights and optimiser state saved by `save_training_state`; returns the step done."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict(weights, strict=False)  # tied embeddings are stored once
    state = torch.load(Path(path) / TRAINER_STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
