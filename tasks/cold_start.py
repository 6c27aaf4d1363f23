"""Prefect tasks of stage 2, cold-start data: candidates by Ray Data, then the reviewed dataset.
The same concept as `r1core/cold_start.py` one layer down: that module holds the routes,
rewriting and filters; this one runs them on Ray Data and records them in MLflow.

Outputs under `<run_dir>/cold_start_data/`: `candidates/` (every candidate with its verdict,
written before any human review so that a pause or crash loses no generation) and `dataset/`
(the kept, reviewed examples and the review decisions). Both are written atomically; a
complete `dataset/` means the stage is done.
"""
from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from r1core import checkpoint as ckpt
from r1core.cold_start import ROUTE_MODEL, finish_candidate, route_counts, route_prompts, select
from r1core.config import PipelineConfig
from r1core.problems import read_rows, write_rows
from tasks import tracking
from tasks.rollout_workers import sampling_engines
from tasks.rollouts import sample_and_process
from tasks.training_stages import DataPaths, DatasetResult, log_dataset

STAGE = "cold_start_data"


def stage_dir(cfg: PipelineConfig) -> Path:
    return cfg.run_dir() / STAGE


def dataset_file(cfg: PipelineConfig) -> Path:
    """The cold-start examples SFT trains on."""
    return stage_dir(cfg) / "dataset" / "train.jsonl"


def _seed_requests(path: str) -> list[dict]:
    rows = read_rows(path)
    for i, row in enumerate(rows, start=1):
        if not row.get("completion"):
            raise ValueError(f"{path}: row {i} lacks required column 'completion'")
    return [{**r, "route": "seed_file", "model_dir": "", "generation_prompt": ""} for r in rows]


@task(name="cold-start-candidates", cache_policy=NO_CACHE)
def build_candidates(cfg: PipelineConfig, data: DataPaths, model_dirs: dict[str, str], run_id: str) -> str:
    """Sample every enabled route on Ray Data, rewrite, verify and filter; returns the
    candidates file (reused if this configuration already produced it)."""
    out = stage_dir(cfg) / "candidates"
    if ckpt.is_complete(out):
        get_run_logger().info("cold start: reusing the candidates in %s", out)
        return str(out / "candidates.jsonl")
    cs = cfg.cold_start
    train = read_rows(data.train_file)
    rng = random.Random(cfg.runtime.seed)
    eos = ""
    if cs.routes.get("few_shot"):  # the base's end-of-text separates exemplars as it did documents
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(model_dirs["base"], local_files_only=True).eos_token
    requests: list[dict] = []
    for i, (route, count) in enumerate(cs.routes.items()):
        if count <= 0:
            continue
        model_dir = model_dirs[ROUTE_MODEL[route]]
        rows = rng.sample(train, min(count, len(train)))
        requests += [{**r, "model_dir": model_dir}
                     for r in route_prompts(route, rows, cs.shots, eos, cfg.runtime.seed + i)]
    if cs.seed_file:
        requests += _seed_requests(cs.seed_file)
    t0 = time.time()
    models = [r["model_dir"] for r in requests if r["model_dir"]]
    with sampling_engines(cfg.rollout, cs.engine, models, "cold start") as engines:
        candidates = sample_and_process(requests, functools.partial(finish_candidate, max_words=cs.max_words),
                                        cs.sampling, cs.samples_per_prompt, cs.compute, cfg.runtime,
                                        cfg.rollout.batch_size, engines=engines,
                                        timeout_s=cfg.rollout.generate_timeout_s)
    if Path(model_dirs["base"]).is_dir():
        _reject_over_sft_length(candidates, model_dirs["base"], cfg.cold_start_sft.seq_len)
    else:  # e.g. a seed file alone, before any base exists: the SFT checks lengths when it packs
        get_run_logger().info("cold start: no base model at %s; SFT lengths not checked here", model_dirs["base"])
    candidates.sort(key=lambda c: (c["route"], c["id"], c["completion"], c["raw_completion"]))
    tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"generation_seconds": time.time() - t0})
    ckpt.write_atomically(out, lambda d: write_rows(candidates, d / "candidates.jsonl"))
    return str(out / "candidates.jsonl")


def _reject_over_sft_length(candidates: list[dict], tokenizer_dir: str, seq_len: int) -> None:
    """Kept candidates that would not fit one SFT sequence become `too_long` (words are checked
    in the workers; tokens here, with the base's tokenizer)."""
    from transformers import AutoTokenizer

    from r1core.tokenizer import sft_length

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    for c in candidates:
        if not c["rejection"] and sft_length(tokenizer, c["prompt"], c["completion"]) > seq_len:
            c["rejection"] = "too_long"


def selected(cfg: PipelineConfig, candidates_file: str) -> list[dict]:
    """The candidates that pass every filter, deduplicated: what a reviewer is shown."""
    return select(read_rows(candidates_file), cfg.cold_start.per_problem)


@task(name="cold-start-dataset", cache_policy=NO_CACHE)
def write_dataset(cfg: PipelineConfig, candidates_file: str, decisions: list[dict], run_id: str,
                  started: float) -> DatasetResult:
    """Kept examples minus those a reviewer rejected, written with the decisions; counts per
    route and review outcome go to MLflow, the dataset as the run's output."""
    logger = get_run_logger()
    candidates = read_rows(candidates_file)
    kept = select(candidates, cfg.cold_start.per_problem)
    verdict = {d["id"]: d for d in decisions}
    rejected = {i for i, d in verdict.items() if not d["approve"]}
    examples = [{**c, "review": ("approved" if c["id"] in verdict else "unreviewed")}
                for c in kept if c["id"] not in rejected]
    metrics = {k: float(v) for k, v in route_counts(candidates, kept).items()}
    metrics.update({"examples": float(len(examples)), "review/approved": float(len(verdict) - len(rejected)),
                    "review/rejected": float(len(rejected))})
    if not examples:
        raise RuntimeError(f"cold start: no example passed verification and filters ({metrics}); "
                           f"see {candidates_file}")
    done = dataset_file(cfg).parent
    result = DatasetResult(stage=STAGE, dataset=str(done / "train.jsonl"), num_examples=len(examples),
                           mlflow_run_id=run_id, metrics={**metrics, "stage_seconds": time.time() - started})

    def write(d: Path):
        write_rows(examples, d / "train.jsonl")
        (d / "review.json").write_text(json.dumps(decisions, indent=1))

    ckpt.write_atomically(done, write)
    client = tracking.client_for(cfg.runtime)
    tracking.log_metrics(client, run_id, result.metrics)
    log_dataset(cfg, run_id, result.dataset, "cold_start")
    client.log_artifacts(run_id, str(done), "cold_start_data")
    logger.info("cold start: %d examples (%s)", len(examples), json.dumps(metrics))
    return result
