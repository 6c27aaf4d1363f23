"""Scheduled retraining's bookkeeping: which prompt files in the watched folder are new (the
flow of the same name is `flows/retrain.py`, one layer up).

A file is new when its content (sha256) is not in the ledger, so a renamed copy is not
retrained on twice and an edited file is. The ledger is written atomically, and only after the
retrain finished, so a crashed retrain sees the same batch again and resumes it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from r1core.config import PipelineConfig
from r1core.problems import read_rows, write_rows

DATA_SUFFIXES = (".jsonl", ".parquet")


class NewData(BaseModel):
    files: dict[str, str]  # path -> sha256
    digest: str  # of the whole batch: names the retrain's run, so a re-run resumes it
    rows_file: str  # the batch's rows, validated, in one file
    num_rows: int


def incoming_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.retrain.data_dir or Path(cfg.runtime.workdir) / "incoming").resolve()


def ledger_file(cfg: PipelineConfig) -> Path:
    return Path(cfg.runtime.workdir).resolve() / "retrain" / "ledger.json"


def read_ledger(cfg: PipelineConfig) -> dict[str, str]:
    """sha256 -> the file name it was first trained on under."""
    path = ledger_file(cfg)
    return json.loads(path.read_text())["consumed"] if path.is_file() else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@task(name="find-new-data", cache_policy=NO_CACHE)
def find_new_data(cfg: PipelineConfig) -> NewData | None:
    """The watched folder's files not yet trained on, validated (a bad row fails naming file and
    row) and combined into one rows file; None when there is nothing new."""
    folder = incoming_dir(cfg)
    if not folder.is_dir():
        return None
    consumed = read_ledger(cfg)
    files = {str(p): _sha256(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith(".")}
    new = {p: h for p, h in files.items() if h not in consumed}
    if not new:
        return None
    digest = hashlib.sha256("".join(sorted(new.values())).encode()).hexdigest()[:10]
    rows = [row for path in new for row in read_rows(path)]
    if not rows:
        return None
    rows_file = Path(cfg.runtime.workdir).resolve() / "retrain" / digest / "new_rows.jsonl"
    write_rows(rows, rows_file)
    return NewData(files=new, digest=digest, rows_file=str(rows_file), num_rows=len(rows))


@task(name="mark-data-consumed", cache_policy=NO_CACHE)
def mark_consumed(cfg: PipelineConfig, batch: NewData) -> None:
    path = ledger_file(cfg)
    consumed = {**read_ledger(cfg), **{h: Path(p).name for p, h in batch.files.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"consumed": consumed}, indent=1))
    os.replace(tmp, path)
