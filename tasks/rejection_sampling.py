"""Prefect tasks of stage 5, rejection sampling (the same concept as `r1core/rejection_sampling.py`,
one layer down: that module checks and selects rows, this one runs it on Ray Data): Ray Data
generates, checks and judges candidates; the driver deduplicates and applies the quotas on
compact rows, then joins the kept ones back to their texts (Arrow, by `sample_id`) and writes
the SFT set.

Outputs under `<run_dir>/rejection_sampling/`:
- `quarantine.jsonl`: prompt rows that could not be used, with line and reason;
- `samples/shard-NNNNN.parquet`: the samples of each shard of prompts, written atomically as
  each shard finishes; a re-run generates only the missing shards (same seed per shard);
- `candidates/`: every candidate's verdict (`sample_id`, task, problem, `reason` ('' = kept),
  dedupe hash; its text is in `samples/`), for inspection;
- `dataset/part-NNNNN.parquet`: the kept examples, sorted by their deterministic `sample_id`.
`candidates/` and `dataset/` are written atomically from the samples, so a killed or retried
run never duplicates a row; a complete `dataset/` means the stage is done.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from r1core import checkpoint as ckpt
from r1core.config import PipelineConfig
from r1core.general_prompts import non_reasoning_examples
from r1core.problems import complete_rows, read_rows
from r1core.rejection_sampling import (
    NEEDS_JUDGE,
    annotate_rows,
    quota_order,
    reason_counts,
    sample_id,
    select,
)
from r1core.validation import read_with_quarantine
from tasks import tracking
from tasks.ray_jobs import ensure_ray
from tasks.rollout_workers import sampling_engines
from tasks.rollouts import generate_shards, shard_path
from tasks.training_stages import IDEMPOTENT, DataPaths, DatasetResult, log_dataset

STAGE = "rejection_sampling"
# what a sample keeps of its prompt row (flat, so that Arrow stores it as columns)
SAMPLE_SCHEMA = pa.schema([("sample_id", pa.string()), ("id", pa.string()), ("sample", pa.int64()), ("task", pa.string()),
                          ("language", pa.string()), ("problem", pa.string()), ("question", pa.string()),
                          ("prompt", pa.string()), ("answer", pa.string()), ("numbers", pa.list_(pa.int64())),
                          ("completion", pa.string()), ("finish_reason", pa.string())])
DATASET_COLUMNS = [*SAMPLE_SCHEMA.names[:-1], "reasoning", "verifier"]


def stage_dir(cfg: PipelineConfig) -> Path:
    return cfg.run_dir() / STAGE


def dataset_dir(cfg: PipelineConfig) -> Path:
    """The rejection-sampled SFT set (parquet parts)."""
    return stage_dir(cfg) / "dataset"


@task(name="rejection-sampling-prompts", cache_policy=NO_CACHE, **IDEMPOTENT)
def read_prompts(cfg: PipelineConfig, data: DataPaths) -> list[dict]:
    """The prompts to sample from: the user's file or the train split. Malformed rows go to
    `quarantine.jsonl`; more of them than `error_budget` fails the stage, naming the file."""
    rs = cfg.rejection_sampling
    source = rs.prompts_file or data.train_file
    quarantine = stage_dir(cfg) / "quarantine.jsonl"
    good, bad = read_with_quarantine(source, quarantine, rs.error_budget)
    if bad:
        get_run_logger().warning("rejection sampling: %d malformed prompt rows of %s quarantined in %s (first: "
                                 "line %d, %s)", len(bad), source, quarantine, bad[0]["line"], bad[0]["reason"])
    rows = sorted(complete_rows(good), key=lambda r: r["id"])
    return rows[: rs.num_prompts]


@task(name="rejection-sampling-generate", cache_policy=NO_CACHE)
def generate(cfg: PipelineConfig, prompts: list[dict], model_dir: str, run_id: str) -> str:
    """k samples per prompt from the checkpoint, one shard of prompts per Ray Data item on a pool
    of sampler actors; shards already on disk are not generated again."""
    rs, logger = cfg.rejection_sampling, get_run_logger()
    out = stage_dir(cfg) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    shards = [prompts[i : i + rs.prompts_per_shard] for i in range(0, len(prompts), rs.prompts_per_shard)]
    pending = [i for i in range(len(shards)) if not shard_path(out, i).is_file()]
    logger.info("rejection sampling: %d of %d shards to generate (%d prompts x %d samples)", len(pending),
                len(shards), len(prompts), rs.samples_per_prompt)
    t0 = time.time()
    if pending:
        ensure_ray(cfg.runtime)
        requests = {i: [{**r, "model_dir": model_dir, "generation_prompt": r["prompt"]} for r in shards[i]]
                    for i in pending}
        server = {"base_url": rs.base_url, "model": rs.served_model} if rs.engine == "openai" else None
        with sampling_engines(cfg.rollout, rs.engine, [model_dir], "rejection sampling") as engines:
            written = generate_shards(requests, str(out), rs.compute, schema=SAMPLE_SCHEMA,
                                      sampling=rs.sampling.model_dump(), n=rs.samples_per_prompt,
                                      batch_size=cfg.rollout.batch_size, seed=cfg.runtime.seed, server=server,
                                      engines=engines, timeout_s=cfg.rollout.generate_timeout_s)
            for done, row in enumerate(written, start=1):
                logger.info("rejection sampling: shard %d written (%d samples; %d/%d this run)", row["shard"],
                            row["samples"], done, len(pending))
    tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"generation_seconds": time.time() - t0})
    return str(out)


def annotate_files(batch: dict, **kwargs) -> dict:
    """Ray Data map: every candidate of the batch's parquet files annotated (`annotate_rows`)."""
    rows = [r for f in batch["file"] for r in annotate_rows(pq.read_table(str(f)).to_pylist(), **kwargs)]
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def annotate_with_ray(files: list[str], rs, eval_texts: list[str], tokenizer_dir: str | None = None,
                      max_tokens: int = 0) -> list[dict]:
    """Every candidate of the parquet `files` annotated (reason, hash, MinHash signature), a
    Ray Data task per file; `rs` is the `RejectionSamplingConfig`. Returns the compact rows."""
    file_items = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    annotated = file_items.map_batches(annotate_files, batch_size=1, num_cpus=1,
                                       fn_kwargs={"cfg": rs, "eval_texts": tuple(eval_texts),
                                                  "judged_tasks": tuple(rs.judge.judged_tasks),
                                                  "tokenizer_dir": tokenizer_dir, "max_tokens": max_tokens})
    return list(annotated.iter_rows())  # streamed out of the object store


def read_by_id(files: list[str], ids) -> pa.Table:
    """The sample rows of `files` whose `sample_id` is in `ids`, sorted by it (Arrow: the
    texts of millions of rows never become Python objects)."""
    wanted = pa.array(sorted(ids), type=pa.string())
    parts = [t.filter(pc.is_in(t["sample_id"], value_set=wanted)) for t in map(pq.read_table, files)]
    return pa.concat_tables(parts).sort_by("sample_id")


def _plain(row: dict) -> dict:
    """Arrow/numpy values as Python ones."""
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}


class JudgeActor:
    """A Ray Data actor holding the judge: verdicts for rows that need one."""

    def __init__(self, judge_cfg: dict, model_dir: str | None, threads: int):
        import torch

        from r1core.config import JudgeConfig
        from r1core.judge import LocalJudge, OpenAIJudge
        from r1core.modeling import load_pretrained

        torch.set_num_threads(threads)
        jc = JudgeConfig.model_validate(judge_cfg)
        self.judge = (OpenAIJudge(jc.base_url, jc.model) if jc.kind == "openai"
                      else LocalJudge(*load_pretrained(model_dir), batch_size=jc.batch_size))

    def __call__(self, batch: dict) -> dict:
        from r1core.judge import JudgeItem
        from r1core.rewards import final_answer, verify

        rows = [_plain(dict(zip(batch, values, strict=True))) for values in zip(*batch.values(), strict=True)]
        items = [JudgeItem(r["question"] or r["prompt"], r["answer"], final_answer(r["completion"]) or "")
                 for r in rows]
        verdicts = self.judge.judge(items)
        rule = [verify(it.prediction, r) for it, r in zip(items, rows, strict=True)]
        return {"sample_id": [r["sample_id"] for r in rows], "judged": verdicts,
                "rule": [-1 if x is None else int(x) for x in rule]}


def judge_rows(cfg: PipelineConfig, rows: list[dict], files: list[str], judge_model_dir: str | None) -> dict[str, float]:
    """Apply the judge's verdicts to the rows marked NEEDS_JUDGE (in place). `judge.audit_rows`
    rule-verified rows are judged too, verdict unused: with the judged rows a rule could also
    score, they give the judge's agreement with the rules. Returns the judge's metrics."""
    jc = cfg.rejection_sampling.judge
    for r in rows:
        r["verifier"] = "judge" if r["reason"] == NEEDS_JUDGE else ("rule" if r["reasoning"] else "reference")
    todo = [r for r in rows if r["reason"] == NEEDS_JUDGE]
    verified = sorted((r for r in rows if r["verifier"] == "rule" and r["reason"] in ("", "unverified")),
                      key=lambda r: quota_order(r["sample_id"]))
    audit = verified[: jc.audit_rows]
    if not todo and not audit:
        return {"judge/rows": 0.0}
    if jc.kind == "local" and not judge_model_dir:
        raise ValueError(f"rejection sampling: {len(todo)} rows to judge and {len(audit)} to audit, but no local "
                         "judge model (judge.model)")
    keep = ["sample_id", "question", "prompt", "answer", "task", "numbers", "completion"]
    texts = read_by_id(files, [r["sample_id"] for r in todo + audit]).select(keep).to_pylist()
    ds = ray.data.from_items(texts).map_batches(
        JudgeActor, batch_size=jc.batch_size,
        fn_constructor_kwargs={"judge_cfg": jc.model_dump(), "model_dir": judge_model_dir,
                               "threads": cfg.rejection_sampling.compute.cpus_per_worker},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.rejection_sampling.compute.cpus_per_worker)
    verdicts = {v["sample_id"]: v for v in ds.take_all()}
    for r in todo:
        r["reason"] = "" if verdicts[r["sample_id"]]["judged"] else "unverified"
    metrics = {"judge/rows": float(len(todo)), "judge/audited": float(len(audit)),
               "judge/approved": float(sum(verdicts[r["sample_id"]]["judged"] for r in todo))}
    scored = [v for v in verdicts.values() if v["rule"] >= 0]
    if scored:
        metrics["judge/agreement_with_rules"] = sum(int(v["judged"]) == v["rule"] for v in scored) / len(scored)
    return metrics


@task(name="rejection-sampling-check", cache_policy=NO_CACHE)
def check(cfg: PipelineConfig, samples_dir: str, data: DataPaths, model_dir: str,
          judge_model_dir: str | None) -> tuple[list[dict], list[str], dict]:
    """Annotate the samples and the non-reasoning candidates on Ray Data, then judge what the
    rules cannot verify. Returns (annotated rows, the candidate files, judge metrics)."""
    rs = cfg.rejection_sampling
    ensure_ray(cfg.runtime)
    eval_rows = read_rows(data.heldout_file) + [r for f in rs.eval_files for r in read_rows(f)]
    eval_texts = [r.get("question") or r["prompt"] for r in eval_rows]
    general = non_reasoning_examples(rs.non_reasoning_candidates, rs.non_reasoning_mix, cfg.data.languages,
                                     seed=cfg.runtime.seed)
    general_file = Path(samples_dir) / "general.parquet"
    pq.write_table(pa.Table.from_pylist([{**g, "sample_id": sample_id(g), "finish_reason": "stop"} for g in general],
                                        schema=SAMPLE_SCHEMA), general_file)
    files = [*sorted(str(p) for p in Path(samples_dir).glob("shard-*.parquet")), str(general_file)]
    rows = annotate_with_ray(files, rs, eval_texts, tokenizer_dir=model_dir, max_tokens=cfg.sft.seq_len)
    return rows, files, judge_rows(cfg, rows, files, judge_model_dir)


def kept_table(rows: list[dict], files: list[str]) -> pa.Table:
    """The kept examples (selected `rows` whose reason is ''), their texts read back from the
    candidate `files`, with `reasoning` and `verifier`: DATASET_COLUMNS, sorted by `sample_id`."""
    kept = {r["sample_id"]: r for r in rows if not r["reason"]}
    table = read_by_id(files, kept)
    ids = table["sample_id"].to_pylist()
    return (table.append_column("reasoning", pa.array([kept[i]["reasoning"] for i in ids], pa.bool_()))
            .append_column("verifier", pa.array([kept[i]["verifier"] for i in ids], pa.string()))
            .select(DATASET_COLUMNS))


def write_parts(table: pa.Table, out_dir: Path, rows_per_part: int) -> None:
    """`table` as `part-NNNNN.parquet` files of `rows_per_part` rows."""
    for i in range(0, table.num_rows, rows_per_part):
        pq.write_table(table.slice(i, rows_per_part), out_dir / f"part-{i // rows_per_part:05d}.parquet")


@task(name="rejection-sampling-write", cache_policy=NO_CACHE)
def write_dataset(cfg: PipelineConfig, rows: list[dict], files: list[str], judge_metrics: dict, run_id: str,
                  started: float, producer: dict[str, str]) -> DatasetResult:
    """Deduplicate and apply the quotas; write every candidate's verdict and the kept set;
    per-reason counts to MLflow and to a Prefect table; the set as an MLflow dataset."""
    rs, logger = cfg.rejection_sampling, get_run_logger()
    final = select(rows, rs.per_problem, {True: rs.reasoning_examples, False: rs.non_reasoning_examples},
                   rs.near_duplicate_threshold)  # in place
    counts = reason_counts(final)
    kept = kept_table(final, files)
    if not kept.num_rows:
        raise RuntimeError(f"rejection sampling: no candidate kept ({counts})")
    done = dataset_dir(cfg)
    metrics = {**{k: float(v) for k, v in counts.items()}, **judge_metrics, "examples": float(kept.num_rows),
               "stage_seconds": time.time() - started}
    result = DatasetResult(stage=STAGE, dataset=str(done), num_examples=kept.num_rows, mlflow_run_id=run_id,
                           metrics=metrics)

    candidates = stage_dir(cfg) / "candidates"
    ckpt.write_atomically(candidates, lambda d: pq.write_table(
        pa.Table.from_pylist(final).drop_columns(["signature"]),
        d / "candidates.parquet"))
    ckpt.write_atomically(done, lambda d: write_parts(kept, d, rs.rows_per_output_shard))
    client = tracking.client_for(cfg.runtime)
    tracking.log_metrics(client, run_id, metrics)
    tracking.set_tags(client, run_id, {f"producer_{k}": v for k, v in producer.items()})
    log_dataset(cfg, run_id, str(done), "rejection_sampling_output", producer)
    quarantine = stage_dir(cfg) / "quarantine.jsonl"
    if quarantine.is_file():
        client.log_artifact(run_id, str(quarantine), "rejection_sampling")
    create_table_artifact(
        key="rejection-sampling-reasons",
        table=[{"count": k, "value": int(v)} for k, v in counts.items()],
        description=f"Rejection sampling ({cfg.resolved_run_name()}): candidates, kept and rejections per reason.")
    logger.info("rejection sampling: kept %d (%s)", kept.num_rows, json.dumps(counts))
    return result
