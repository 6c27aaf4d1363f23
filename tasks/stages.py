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
from r1core.config import PipelineConfig, StudentConfig
from r1core.reasoning_tasks import generate_split, pretraining_corpus, read_rows, write_rows
from r1core.rewards import REWARD_VERSIONS
from tasks import ray_jobs, tracking
from tasks.evaluate import REGISTRY_FILE


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
    # each held-out prompt's pass@1 and readability (None: unscorable), for paired comparisons
    per_prompt: dict[str, list[float | None]] = {}
    init_model_dir: str | None = None  # the model it trained from (None: pretrained from scratch)
    registered: str | None = None  # "name/version"
    skipped: bool = False


REGISTERED_NAMES = {"pretrain_base": "r1-base", "r1_zero": "r1-zero", "cold_start_sft": "r1-cold-start",
                    "reasoning_rl": "r1-reasoning-rl", "sft": "r1-sft", "general_rl": "r1",
                    "reward_models/helpfulness": "r1-rm-helpful", "reward_models/harmlessness": "r1-rm-harmless"}
STUDENT_MODELS = {"base": "r1-student-base-{}", "sft": "r1-distill-{}", "rl_only": "r1-rl-only-{}"}


def registered_name(stage: str) -> str:
    """The registry name of a stage's model; a student's stages are `distill/<name>/<kind>`."""
    if stage.startswith("distill/"):
        _, student, kind = stage.split("/")
        return STUDENT_MODELS[kind].format(student)
    return REGISTERED_NAMES[stage]


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

    # a rows file is logged as it is (preference pairs have no prompt column); a parquet directory
    # through read_rows, which reads its parts
    df = pd.read_json(path, lines=True) if str(path).endswith(".jsonl") else pd.DataFrame(read_rows(path))
    ds = mlflow.data.from_pandas(df.astype(str), source=path, name=Path(path).stem)
    input_tags = [InputTag("mlflow.data.context", context)] + [InputTag(k, v) for k, v in (tags or {}).items()]
    tracking.client_for(cfg.runtime).log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=input_tags)])


def run_training_stage(cfg: PipelineConfig, stage: str, description: str, loop, section: str,
                       parent_run_id: str | None, prepare, job_cfg: PipelineConfig | None = None) -> StageResult:
    """The shape every training stage shares: return the earlier result if the stage is complete;
    otherwise open its MLflow run, `prepare(run_id, stage_dir) -> job fields`, run the Ray Train
    job on the config `section` (its recipe's settings and compute), and record the result.
    `job_cfg` is the configuration the job sees when it differs (a student's model)."""
    logger = get_run_logger()
    if (cached := _cached(cfg, stage)) is not None:
        logger.info("%s: complete model found at %s, not training again", stage, cached.model_dir)
        return cached
    stage_dir = _stage_dir(cfg, stage)
    t0 = time.time()
    with stage_run(cfg, stage, parent_run_id, description) as run_id:
        compute = cfg.section(section).compute
        job = _job(job_cfg or cfg, run_id, stage_dir, section=section, **prepare(run_id, stage_dir))
        logger.info("%s: Ray Train job on %d worker(s)", stage, compute.num_workers)
        ray_jobs.fit(stage, loop, job, cfg, compute)
        result = StageResult(stage=stage, model_dir=job["output_dir"], mlflow_run_id=run_id,
                             seconds=time.time() - t0, init_model_dir=job.get("init_model_dir"))
        tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"stage_seconds": result.seconds})
        tracking.log_curves(cfg.runtime, run_id)
    save_result(cfg, result)
    return result


def prepared_corpus(cfg: PipelineConfig, data: DataPaths) -> Path:
    """The tokenizer and packed pretraining blocks (built once per run; students share them)."""
    prepared = _stage_dir(cfg, "pretrain_base") / "prepared"
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
    return prepared


@task(name="pretrain", task_run_name="pretrain-{stage}", cache_policy=NO_CACHE)
def pretrain(cfg: PipelineConfig, data: DataPaths, parent_run_id: str | None = None, stage: str = "pretrain_base",
             student: StudentConfig | None = None) -> StageResult:
    """Stage 0: build the tokenizer and corpus, then pretrain the tiny base as a Ray Train job;
    with `student`, that student's own (smaller) base on the same corpus and tokenizer."""
    job_cfg = cfg
    if student is not None:
        job_cfg = cfg.model_copy(update={"model": student.model,
                                         "pretrain": cfg.pretrain.model_copy(update={"steps": student.pretrain_steps})})

    def prepare(run_id: str, stage_dir: Path) -> dict:
        log_dataset(cfg, run_id, data.train_file, "train")
        prepared = prepared_corpus(cfg, data)
        rows, seq_len = torch.load(prepared / "blocks.pt").shape
        tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"corpus_tokens": rows * seq_len})
        if student is not None:
            tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"student": student.name})
        return {"prepared_dir": str(prepared)}

    description = ("Stage 0: next-token pretraining of the tiny base model on a synthetic corpus." if student is None
                   else f"Stage 9: pretraining of student '{student.name}' (its own base) on the same corpus.")
    return run_training_stage(cfg, stage, description, ray_jobs.pretrain_loop, "pretrain", parent_run_id, prepare,
                              job_cfg=job_cfg)


GRPO_STAGES = {
    "r1_zero": "Stage 1 (R1-Zero): GRPO from the base model with rule rewards only, no SFT.",
    "reasoning_rl": "Stage 4: reasoning-oriented GRPO from the cold-start model; accuracy, readable-format "
                    "and language-consistency rewards.",
    "general_rl": "Stage 8: GRPO over all scenarios from the SFT model: rule rewards for reasoning prompts, "
                  "reward models for general ones (helpfulness on the summary, harmlessness on the whole response).",
    "distill.rl": "Stage 9 (comparison): R1-Zero-style GRPO of the student from its own base, no distillation.",
}


@task(name="grpo", task_run_name="grpo-{stage}", cache_policy=NO_CACHE)
def grpo(cfg: PipelineConfig, stage: str, init_model_dir: str, data: DataPaths, parent_run_id: str | None = None,
         section: str | None = None, reward_model_dirs: dict[str, str] | None = None) -> StageResult:
    """A GRPO stage (R1-Zero, reasoning RL, general RL, a student's RL) from `init_model_dir`, as a
    Ray Train job on the config `section` (default: the stage's own). With `reward_model_dirs`,
    general prompts join the reasoning ones and are scored by those reward models."""
    section = section or stage
    stage_cfg = cfg.section(section)
    rewards = {k: f"v{REWARD_VERSIONS[k]} x{w:g}" for k, w in stage_cfg.rewards.items()}
    tags = {"rewards": json.dumps(rewards)}
    extra = {}
    if reward_model_dirs:
        tags["model_rewards"] = json.dumps({k: f"{_registered_of(reward_model_dirs[k])} x{w:g}"
                                            for k, w in stage_cfg.model_rewards.items()})
        extra["reward_models"] = {k: reward_model_dirs[k] for k in stage_cfg.model_rewards}
    return run_training_stage(cfg, stage, GRPO_STAGES[section], ray_jobs.grpo_loop, section, parent_run_id,
                              _train_from(cfg, init_model_dir, data.train_file, extra, **tags))


SFT_STAGES = {
    "cold_start_sft": "Stage 3: SFT of the base on the cold-start data (loss on responses, packed).",
    "sft": "Stage 6: SFT of the base on the rejection-sampled reasoning and non-reasoning set "
           "(loss on responses, packed).",
    "distill.sft": "Stage 9: distillation, SFT of a smaller student on the stage-6 set (no RL).",
}


@task(name="sft", task_run_name="sft-{stage}", cache_policy=NO_CACHE)
def sft(cfg: PipelineConfig, stage: str, base_model_dir: str, dataset: str, parent_run_id: str | None = None,
        section: str | None = None) -> StageResult:
    """An SFT stage (cold start, the rejection-sampled set, a student's distillation) of
    `base_model_dir` on `dataset` (a rows file or a parquet directory), as a Ray Train job."""
    section = section or stage
    return run_training_stage(cfg, stage, SFT_STAGES[section], ray_jobs.sft_loop, section, parent_run_id,
                              _train_from(cfg, base_model_dir, dataset))


@task(name="reward-model", task_run_name="reward-model-{model}", cache_policy=NO_CACHE)
def reward_model(cfg: PipelineConfig, model: str, base_model_dir: str, data: DataPaths,
                 parent_run_id: str | None = None) -> StageResult:
    """Stage 7: one reward model (helpfulness or harmlessness) from the base, on synthesised
    preference pairs, as a Ray Train job; held-out pairwise accuracy in its metrics."""
    from r1core.reward_model import preference_pairs

    rm = cfg.reward_models
    stage = f"reward_models/{model}"

    def prepare(run_id: str, stage_dir: Path) -> dict:
        languages = list(cfg.data.languages)
        reasoning = read_rows(data.train_file)
        files = {}
        for split, n, seed in (("train", rm.train_pairs, cfg.data.seed), ("heldout", rm.heldout_pairs, cfg.data.seed + 1)):
            pairs = preference_pairs(model, n, languages, seed, reasoning, rm.unsafe_patterns)
            files[f"{split}_file"] = str(write_rows(pairs, stage_dir / "pairs" / f"{split}.jsonl"))
        log_dataset(cfg, run_id, files["train_file"], "train")
        tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"init_model_dir": base_model_dir,
                                                                     "reward_model": model})
        return {"init_model_dir": base_model_dir, "reward_model": model, **files}

    result = run_training_stage(cfg, stage, f"Stage 7: the {model} reward model (Bradley-Terry on preference pairs).",
                                ray_jobs.reward_model_loop, "reward_models", parent_run_id, prepare)
    if result.skipped:
        return result
    run = tracking.client_for(cfg.runtime).get_run(result.mlflow_run_id)
    metrics = {"pairwise_accuracy": run.data.metrics["eval/pairwise_accuracy"]}
    return result.model_copy(update={"metrics": metrics})


def _train_from(cfg: PipelineConfig, init_model_dir: str, train_file: str, job_fields: dict | None = None,
                **tags: str):
    """The `prepare` of a stage that trains an existing model on a rows file: the file as the
    run's dataset, the starting model (and `tags`) as tags."""

    def prepare(run_id: str, stage_dir: Path) -> dict:
        log_dataset(cfg, run_id, train_file, "train")
        tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"init_model_dir": init_model_dir, **tags})
        return {"init_model_dir": init_model_dir, "train_file": train_file, **(job_fields or {})}

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
def evaluate_stage(cfg: PipelineConfig, stage: StageResult, heldout_file: str) -> tuple[dict[str, float], dict]:
    """Held-out pass@1 / cons@k / format rate / length of a stage's model, logged to its run
    (with each prompt's scores as `eval/per_prompt.json`); returns the metrics and those scores."""
    from tasks.evaluate import evaluate_on_ray

    metrics, per_prompt = evaluate_on_ray(cfg, stage.model_dir, heldout_file)
    client = tracking.client_for(cfg.runtime)
    tracking.log_metrics(client, stage.mlflow_run_id, {f"eval/{k}": v for k, v in metrics.items()})
    client.log_dict(stage.mlflow_run_id, per_prompt, "eval/per_prompt.json")
    get_run_logger().info("%s held-out: %s", stage.stage, json.dumps(metrics))
    return metrics, per_prompt


def _registered_of(model_dir: str) -> str:
    """The registry version (`name/version`) of a model a stage of this project wrote (from the
    result saved next to it); for a model from elsewhere, its directory."""
    result, downloaded = Path(model_dir).parent / "result.json", Path(model_dir).parent / REGISTRY_FILE
    if result.is_file():
        registered = json.loads(result.read_text())["result"].get("registered")
        if registered:
            return registered
    if downloaded.is_file():
        return json.loads(downloaded.read_text())["registered"]
    return str(model_dir)


HEADLINE_METRICS = ("pass@1", "cons@{k}", "format_rate", "readability", "pairwise_accuracy")


@task(name="register-model", cache_policy=NO_CACHE)
def register(cfg: PipelineConfig, stage: StageResult, metrics: dict[str, float]) -> str:
    """Register the stage's model in the MLflow registry (alias `newest`) with its lineage: the
    model version it started from, the digests of its training data, its rewards with their
    versions, the config hash and the git commit, and its headline evaluation numbers."""
    name = registered_name(stage.stage)
    run = tracking.client_for(cfg.runtime).get_run(stage.mlflow_run_id)
    init = run.data.tags.get("init_model_dir")
    lineage = {
        "stage": stage.stage,
        "parent_model": _registered_of(init) if init else "none (pretrained from scratch)",
        "train_datasets": ",".join(f"{i.dataset.name}@{i.dataset.digest}" for i in run.inputs.dataset_inputs) or "none",
        "config_digest": cfg.digest(),
        "git_commit": tracking.git_commit(),
        **{k: run.data.tags[k] for k in ("rewards", "model_rewards") if k in run.data.tags},
    }
    headline = [m.format(k=cfg.eval.k) for m in HEADLINE_METRICS]
    numbers = {m.replace("@", "_at_"): f"{metrics[m]:.4f}" for m in headline if m in metrics}
    version = tracking.register_model(cfg.runtime, stage.mlflow_run_id, Path(stage.model_dir), name,
                                      tags={**lineage, **numbers})
    get_run_logger().info("registered %s version %s (alias %s), from %s", name, version, tracking.NEWEST_ALIAS,
                          lineage["parent_model"])
    return f"{name}/{version}"


@task(name="use-pretrained-base", cache_policy=NO_CACHE)
def use_pretrained_base(cfg: PipelineConfig, parent_run_id: str | None = None) -> StageResult:
    """Stage 0 without pretraining: the user's local HF causal LM is the base model."""
    path = str(Path(cfg.model.pretrained_path).resolve())
    with stage_run(cfg, "pretrain_base", parent_run_id,
                   f"Stage 0: base model taken from the local directory {path} (no pretraining).") as run_id:
        tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"base_model_source": path})
    return StageResult(stage="pretrain_base", model_dir=path, mlflow_run_id=run_id, seconds=0.0)
