"""Prefect tasks: each launches one Ray job of a stage and records it in MLflow.

Outputs live under `<workdir>/runs/<run_name>/<stage>/` and are written atomically; a stage
whose `model/` is complete is not trained again (its earlier result is returned), and an
interrupted stage resumes from its latest checkpoint.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from r1core import checkpoint as ckpt
from r1core.config import PipelineConfig
from r1core.reasoning_tasks import generate_split, pretraining_corpus, read_rows, write_rows
from r1core.rewards import REWARD_VERSIONS
from tasks import ray_jobs, tracking


class DataPaths(BaseModel):
    train_file: str
    heldout_file: str
    num_train: int
    num_heldout: int


class StageResult(BaseModel):
    stage: str
    model_dir: str
    mlflow_run_id: str
    seconds: float
    metrics: dict[str, float] = {}
    registered: str | None = None  # "name/version"
    skipped: bool = False


REGISTERED_NAMES = {"pretrain_base": "r1-base", "r1_zero": "r1-zero", "cold_start_sft": "r1-cold-start",
                    "reasoning_rl": "r1-reasoning-rl", "sft": "r1-sft"}


def _stage_dir(cfg: PipelineConfig, stage: str) -> Path:
    return cfg.run_dir() / stage


def _cached(cfg: PipelineConfig, stage: str) -> StageResult | None:
    result = _stage_dir(cfg, stage) / "result.json"
    if result.is_file() and ckpt.is_complete(_stage_dir(cfg, stage) / "model"):
        saved = json.loads(result.read_text())
        if saved.get("config_digest") != cfg.digest():
            raise RuntimeError(f"{result}: produced by another configuration; set another run_name")
        return StageResult(**{**saved["result"], "skipped": True})
    return None


def finished_dataset(done: Path, result_type: type[BaseModel]):
    """The saved result of a data stage (cold start, rejection sampling) whose output directory
    `done` is complete, marked skipped; None while it is not."""
    if ckpt.is_complete(done):
        return result_type(**{**json.loads((done / "result.json").read_text()), "skipped": True})
    return None


def save_result(cfg: PipelineConfig, result: StageResult) -> None:
    """Record a stage's result next to its model (atomically); a re-run returns it."""
    path = _stage_dir(cfg, result.stage) / "result.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config_digest": cfg.digest(), "result": result.model_dump()}, indent=1))
    tmp.replace(path)


@contextmanager
def stage_run(cfg: PipelineConfig, stage: str, parent_run_id: str | None, description: str):
    """A nested MLflow run for the stage, marked FAILED/KILLED if the stage does not finish."""
    run_id = tracking.start_run(
        cfg.runtime, stage, params=cfg.model_dump(mode="json", exclude={"runtime"}),
        tags={"stage": stage, "profile": cfg.profile, "run_name": cfg.resolved_run_name(),
              "config_digest": cfg.digest()},
        parent_run_id=parent_run_id, description=description,
    )
    try:
        yield run_id
    except KeyboardInterrupt:
        tracking.end_run(cfg.runtime, run_id, "KILLED")
        raise
    except BaseException:
        tracking.end_run(cfg.runtime, run_id, "FAILED")
        raise
    tracking.end_run(cfg.runtime, run_id, "FINISHED")


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(cfg: PipelineConfig) -> DataPaths:
    """Train/held-out task rows: the user's files when configured, else synthetic by seed."""
    out = cfg.run_dir() / "data"
    train_file, heldout_file = out / "train.jsonl", out / "heldout.jsonl"
    if cfg.data.train_file and cfg.data.heldout_file:
        train, heldout = read_rows(cfg.data.train_file), read_rows(cfg.data.heldout_file)
    elif train_file.is_file() and heldout_file.is_file():
        train, heldout = read_rows(train_file), read_rows(heldout_file)
    else:
        train, heldout = generate_split(cfg.data)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    if overlap:
        raise ValueError(f"data: {len(overlap)} held-out prompts also appear in train (e.g. {next(iter(overlap))!r})")
    write_rows(train, train_file)
    write_rows(heldout, heldout_file)
    return DataPaths(train_file=str(train_file), heldout_file=str(heldout_file),
                     num_train=len(train), num_heldout=len(heldout))


def log_dataset(cfg: PipelineConfig, run_id: str, path: str, context: str, tags: dict[str, str] | None = None) -> None:
    """Record a rows file or parquet directory as an input of the run (name, digest, source),
    with `tags` on it (e.g. the model that produced it)."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    df = pd.DataFrame(read_rows(path))
    ds = mlflow.data.from_pandas(df.astype(str), source=path, name=Path(path).stem)
    input_tags = [InputTag("mlflow.data.context", context)] + [InputTag(k, v) for k, v in (tags or {}).items()]
    tracking.client_for(cfg.runtime).log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=input_tags)])


def run_training_stage(cfg: PipelineConfig, stage: str, description: str, loop, compute,
                       parent_run_id: str | None, prepare) -> StageResult:
    """The shape every training stage shares: return the earlier result if the stage is complete;
    otherwise open its MLflow run, `prepare(run_id, stage_dir) -> job fields`, run the Ray Train
    job, and record the result."""
    logger = get_run_logger()
    if (cached := _cached(cfg, stage)) is not None:
        logger.info("%s: complete model found at %s, not training again", stage, cached.model_dir)
        return cached
    stage_dir = _stage_dir(cfg, stage)
    t0 = time.time()
    with stage_run(cfg, stage, parent_run_id, description) as run_id:
        job = _job(cfg, run_id, stage_dir, **prepare(run_id, stage_dir))
        logger.info("%s: Ray Train job on %d worker(s)", stage, compute.num_workers)
        ray_jobs.fit(stage, loop, job, cfg, compute)
        result = StageResult(stage=stage, model_dir=job["output_dir"], mlflow_run_id=run_id,
                             seconds=time.time() - t0)
        tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"stage_seconds": result.seconds})
    save_result(cfg, result)
    return result


@task(name="pretrain-base", cache_policy=NO_CACHE)
def pretrain_base(cfg: PipelineConfig, data: DataPaths, parent_run_id: str | None = None) -> StageResult:
    """Stage 0: build the tokenizer and corpus, then pretrain the tiny base as a Ray Train job."""

    def prepare(run_id: str, stage_dir: Path) -> dict:
        log_dataset(cfg, run_id, data.train_file, "train")
        prepared = stage_dir / "prepared"
        if not ckpt.is_complete(prepared):
            from r1core.tokenizer import train_tokenizer
            from r1core.training import pack

            docs = pretraining_corpus(read_rows(data.train_file), cfg.pretrain, seed=cfg.data.seed)
            tokenizer = train_tokenizer(docs, cfg.model.vocab_size)
            blocks = pack(tokenizer, docs, cfg.pretrain.seq_len)

            def write(d: Path):
                tokenizer.save_pretrained(d)
                torch.save(blocks, d / "blocks.pt")
                (d / "sample.txt").write_text("\n\n".join(docs[:20]))

            ckpt.write_atomically(prepared, write)
        rows, seq_len = torch.load(prepared / "blocks.pt").shape
        tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"corpus_tokens": rows * seq_len})
        return {"prepared_dir": str(prepared)}

    return run_training_stage(
        cfg, "pretrain_base", "Stage 0: next-token pretraining of the tiny base model on a synthetic corpus.",
        ray_jobs.pretrain_loop, cfg.pretrain.compute, parent_run_id, prepare)


GRPO_STAGES = {
    "r1_zero": "Stage 1 (R1-Zero): GRPO from the base model with rule rewards only, no SFT.",
    "reasoning_rl": "Stage 4: reasoning-oriented GRPO from the cold-start model; accuracy, readable-format "
                    "and language-consistency rewards.",
}


@task(name="grpo", task_run_name="grpo-{stage}", cache_policy=NO_CACHE)
def grpo(cfg: PipelineConfig, stage: str, init_model_dir: str, data: DataPaths,
         parent_run_id: str | None = None) -> StageResult:
    """A GRPO stage (R1-Zero, reasoning RL) from `init_model_dir`, as a Ray Train job."""
    rewards = {k: f"v{REWARD_VERSIONS[k]} x{w:g}" for k, w in getattr(cfg, stage).rewards.items()}
    return run_training_stage(cfg, stage, GRPO_STAGES[stage], ray_jobs.grpo_loop, getattr(cfg, stage).compute,
                              parent_run_id, _train_from(cfg, init_model_dir, data.train_file,
                                                         rewards=json.dumps(rewards)))


SFT_STAGES = {
    "cold_start_sft": "Stage 3: SFT of the base on the cold-start data (loss on responses, packed).",
    "sft": "Stage 6: SFT of the base on the rejection-sampled reasoning and non-reasoning set "
           "(loss on responses, packed).",
}


@task(name="sft", task_run_name="sft-{stage}", cache_policy=NO_CACHE)
def sft(cfg: PipelineConfig, stage: str, base_model_dir: str, dataset: str,
        parent_run_id: str | None = None) -> StageResult:
    """An SFT stage (cold start, the rejection-sampled set) of the base on `dataset` (a rows file
    or a parquet directory), as a Ray Train job."""
    return run_training_stage(cfg, stage, SFT_STAGES[stage], ray_jobs.sft_loop, getattr(cfg, stage).compute,
                              parent_run_id, _train_from(cfg, base_model_dir, dataset))


def _train_from(cfg: PipelineConfig, init_model_dir: str, train_file: str, **tags: str):
    """The `prepare` of a stage that trains an existing model on a rows file: the file as the
    run's dataset, the starting model (and `tags`) as tags."""

    def prepare(run_id: str, stage_dir: Path) -> dict:
        log_dataset(cfg, run_id, train_file, "train")
        tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"init_model_dir": init_model_dir, **tags})
        return {"init_model_dir": init_model_dir, "train_file": train_file}

    return prepare


def _job(cfg: PipelineConfig, run_id: str, stage_dir: Path, **extra) -> dict:
    return {
        "config": cfg.model_dump(mode="json"),
        "mlflow_tracking_uri": tracking.tracking_uri(cfg.runtime),
        "mlflow_run_id": run_id,
        "checkpoint_dir": str(stage_dir / "checkpoints"),
        "output_dir": str(stage_dir / "model"),
        **extra,
    }


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stage(cfg: PipelineConfig, stage: StageResult, heldout_file: str) -> dict[str, float]:
    """Held-out pass@1 / cons@k / format rate / length of a stage's model, logged to its run."""
    from tasks.evaluate import evaluate_on_ray

    metrics = evaluate_on_ray(cfg, stage.model_dir, heldout_file)
    tracking.log_metrics(tracking.client_for(cfg.runtime), stage.mlflow_run_id,
                         {f"eval/{k}": v for k, v in metrics.items()})
    get_run_logger().info("%s held-out: %s", stage.stage, json.dumps(metrics))
    return metrics


@task(name="register-model", cache_policy=NO_CACHE)
def register(cfg: PipelineConfig, stage: StageResult, metrics: dict[str, float]) -> str:
    """Register the stage's model in the MLflow registry (alias `newest`)."""
    name = REGISTERED_NAMES[stage.stage]
    version = tracking.register_model(
        cfg.runtime, stage.mlflow_run_id, Path(stage.model_dir), name,
        tags={"stage": stage.stage, "config_digest": cfg.digest(), "git_commit": tracking.git_commit(),
              "pass_at_1": f"{metrics.get('pass@1', 0):.4f}"},
    )
    get_run_logger().info("registered %s version %s (alias %s)", name, version, tracking.NEWEST_ALIAS)
    return f"{name}/{version}"


@task(name="use-pretrained-base", cache_policy=NO_CACHE)
def use_pretrained_base(cfg: PipelineConfig, parent_run_id: str | None = None) -> StageResult:
    """Stage 0 without pretraining: the user's local HF causal LM is the base model."""
    path = str(Path(cfg.model.pretrained_path).resolve())
    with stage_run(cfg, "pretrain_base", parent_run_id,
                   f"Stage 0: base model taken from the local directory {path} (no pretraining).") as run_id:
        tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"base_model_source": path})
    return StageResult(stage="pretrain_base", model_dir=path, mlflow_run_id=run_id, seconds=0.0)
