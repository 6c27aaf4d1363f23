"""A rejection-sampling job killed midway (SIGKILL to its whole process group) and run again ends
with the same kept set as an uninterrupted run, with no duplicate rows; a malformed prompt row
is quarantined and the job goes on. Real `r1` CLI processes: Prefect, Ray Data, MLflow."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from r1core.config import ModelConfig
from r1core.modeling import build_model
from r1core.problems import write_rows

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 12


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer, rows):
    base = tmp_path_factory.mktemp("rs")
    model_dir = base / "model"  # an untrained micro model stands in for the reasoning-RL checkpoint
    build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
                tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = base / "prompts.jsonl"
    write_rows(rows[0][: SHARDS * 4], prompts)
    with open(prompts, "ab") as f:
        f.write(b'{"prompt": "Compute 1 + 1.", "answer": ["2"], "task": "chain_sum"}\n')  # a wrong type

    def command(workdir: Path) -> tuple[list[str], dict]:
        args = [sys.executable, "-m", "flows.cli", "run", "stage", "rejection_sampling", "--config",
                str(ROOT / "configs" / "micro.yaml"), "--init-model", str(model_dir)]
        for override in (f"runtime.workdir={workdir}", f"rejection_sampling.prompts_file={prompts}",
                         "rejection_sampling.num_prompts=100", "rejection_sampling.prompts_per_shard=4",
                         "rejection_sampling.samples_per_prompt=4", "rejection_sampling.sampling.max_new_tokens=24",
                         f"rejection_sampling.judge.model={model_dir}", "rejection_sampling.error_budget=0.05"):
            args += ["--set", override]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PREFECT_HOME": str(workdir / "prefect"),
               "PYTHONPATH": str(ROOT)}
        env.pop("PREFECT_API_URL", None)
        return args, env

    return base, command


def _stage_dir(workdir: Path) -> Path:
    found = glob.glob(str(workdir / "runs" / "*" / "rejection_sampling"))
    return Path(found[0]) if found else workdir / "missing"


def _parquet_rows(directory: Path) -> list[dict]:
    return [r for part in sorted(directory.glob("*.parquet")) for r in pq.read_table(part).to_pylist()]


def _run(command, workdir: Path) -> None:
    args, env = command(workdir)
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_killed_job_resumes_to_the_same_kept_set_without_duplicates(job):
    base, command = job
    _run(command, base / "reference")

    interrupted = base / "interrupted"
    args, env = command(interrupted)
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline, written = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        written = glob.glob(str(_stage_dir(interrupted) / "samples" / "shard-*.parquet"))
        if len(written) >= 2:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray workers and Prefect server alike
            break
        time.sleep(0.1)
    proc.wait(timeout=60)
    assert 2 <= len(written) < SHARDS, f"the kill did not land midway ({len(written)} of {SHARDS} shards)"
    assert not (_stage_dir(interrupted) / "dataset").exists()

    _run(command, interrupted)  # generates only the missing shards
    reference, resumed = _stage_dir(base / "reference"), _stage_dir(interrupted)
    kept = {name: _parquet_rows(d / "dataset") for name, d in (("ref", reference), ("resumed", resumed))}
    assert kept["resumed"] == kept["ref"] and kept["ref"]
    ids = [r["sample_id"] for r in kept["resumed"]]
    assert len(ids) == len(set(ids)) == json.loads((resumed / "result.json").read_text())["result"]["num_examples"]
    candidates = {n: _parquet_rows(d / "candidates") for n, d in (("ref", reference), ("resumed", resumed))}
    assert [(c["sample_id"], c["reason"], c["hash"]) for c in candidates["resumed"]] == \
           [(c["sample_id"], c["reason"], c["hash"]) for c in candidates["ref"]]
    assert len(candidates["ref"]) > SHARDS * 4 * 4  # every sample of every prompt, plus non-reasoning rows
    samples = {n: _parquet_rows(d / "samples") for n, d in (("ref", reference), ("resumed", resumed))}
    assert [(s["sample_id"], s["completion"]) for s in samples["resumed"]] == \
           [(s["sample_id"], s["completion"]) for s in samples["ref"]]  # regenerated shards: the same samples
    quarantined = [json.loads(line) for line in (resumed / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in quarantined] == [(SHARDS * 4 + 1, "field 'answer' is list, not a string")]
