"""Prefect tasks of the stages that train a model: each launches one Ray Train job (a typed job
of `tasks.jobs`) and records it in MLflow; plus the data preparation, evaluation and registration
every model stage shares.

Outputs live under `<workdir>/runs/<run_name>/<stage>/` and are written atomically; a stage
whose output is complete is not run again (`StageCache`: its earlier result is returned), and
an interrupted stage resumes from its latest checkpoint.
"""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from r1core import checkpoint as ckpt
from r1core.config import PipelineConfig, StudentConfig
from r1core.problems import complete_rows, generate_split, pretraining_corpus, read_rows, write_rows
from r1core.rewards import REWARD_VERSIONS
from r1core.validation import DataError, read_data_file, write_quarantine
from tasks import lifecycle, ray_jobs, tracking
from tasks.environments import check_vllm_environment
from tasks.evaluate import REGISTRY_FILE
from tasks.jobs import GeneralRLJob, GRPOJob, HeldoutEvaluation, PretrainJob, RewardModelJob, SFTJob, TrainJob

# Tasks that only read files or write idempotently to MLflow, Prefect artifacts or atomic files
# are retried on a transient error (a busy SQLite store, a restarting tracking server); the
# training, generation and evaluation tasks are not: Ray Train's FailureConfig restarts their
# workers, and their work is resumed from checkpoints by a re-run instead.
IDEMPOTENT = {"retries": 2, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
              "retry_jitter_factor": 0.5}


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


class DatasetResult(BaseModel):
    """What a data stage (cold start, rejection sampling) produced."""

    stage: str
    dataset: str  # a rows file or a parquet directory, as SFT reads it
    num_examples: int
    mlflow_run_id: str
    metrics: dict[str, float] = {}
    skipped: bool = False


class StageCache:
    """The one skip mechanism of every stage: `<run_dir>/<stage>/result.json` (the result and
    the config digest it was produced under) next to the stage's `output`, a directory written
    atomically. A stage whose output is complete and whose result is saved is not run again.

    Prefect's own cache policies were not used: a cached result would be returned while the
    model or dataset it points to is gone or half-written, and the key would have to exclude
    run-specific inputs (the parent run id) while the stage's folder already names its
    configuration (run_name = profile + digest)."""

    def __init__(self, cfg: PipelineConfig, stage: str, output: str = "model"):
        self.dir = cfg.run_dir() / stage
        self.output = self.dir / output
        self.file = self.dir / "result.json"
        self.digest = cfg.digest()

    def load(self, result_type: type[BaseModel]):
        """The saved result (marked skipped) when the output is complete; else None. A result of
        another configuration under the same run_name is an error, not a silent reuse."""
        if not (self.file.is_file() and ckpt.is_complete(self.output)):
            return None
        saved = json.loads(self.file.read_text())
        if saved.get("config_digest") != self.digest:
            raise RuntimeError(f"{self.file}: produced by another configuration; set another run_name")
        return result_type(**{**saved["result"], "skipped": True})

    def save(self, result: BaseModel) -> None:
        """Record the result (atomically); a re-run returns it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config_digest": self.digest, "result": result.model_dump()}, indent=1))
        tmp.replace(self.file)


@contextmanager
def stage_run(cfg: PipelineConfig, stage: str, parent_run_id: str | None, description: str):
    """The stage's nested MLflow run: an interrupted earlier attempt at the same stage and
    configuration is continued (same run id, its curves go on); marked KILLED if a signal stops
    the stage (the workers stopped first, so that nothing is logged after its end), FAILED on an
    error. MLflow's system metrics of the driver's host are on for its duration."""
    run_id = tracking.start_run(
        cfg.runtime, stage, params=cfg.model_dump(mode="json", exclude={"runtime"}),
        tags={"stage": stage, "profile": cfg.profile, "run_name": cfg.resolved_run_name(),
              "config_digest": cfg.digest()},
        parent_run_id=parent_run_id, description=description, continue_run=True,
    )
    system = tracking.monitor_system(cfg.runtime, run_id)
    try:
        yield run_id
    except BaseException as e:
        status = lifecycle.ending_status(e)
        if status == "KILLED":
            ray_jobs.stop_workers()
        system.finish()  # its last points land before the run's end
        tracking.end_run(cfg.runtime, run_id, status)
        raise
    system.finish()
    tracking.end_run(cfg.runtime, run_id, "FINISHED")


@task(name="prepare-data", cache_policy=NO_CACHE, **IDEMPOTENT)
def prepare_data(cfg: PipelineConfig) -> DataPaths:
    """Train/held-out task rows: the user's files when configured (bad rows quarantined within
    `data.error_budget`), else synthetic by seed; written together, atomically, to the run's
    `data/` (a re-run takes that folder only when it is complete)."""
    out = cfg.run_dir() / "data"
    train_file, heldout_file = out / "train.jsonl", out / "heldout.jsonl"
    quarantined: dict[str, list[dict]] = {}
    if cfg.data.train_file and cfg.data.heldout_file:
        (train, quarantined["train"]), (heldout, quarantined["heldout"]) = (
            read_data_file(getattr(cfg.data, f"{split}_file"), f"data.{split}_file", cfg.data.error_budget)
            for split in ("train", "heldout"))
        train, heldout = complete_rows(train), complete_rows(heldout)
        for split, bad in quarantined.items():
            if bad:
                get_run_logger().warning("data.%s_file: %d malformed rows quarantined in %s (first: line %d, %s)",
                                         split, len(bad), out / f"quarantine-{split}.jsonl", bad[0]["line"],
                                         bad[0]["reason"])
    elif ckpt.is_complete(out):  # prepared by an earlier run: rendered already
        return DataPaths(train_file=str(train_file), heldout_file=str(heldout_file),
                         num_train=len(read_rows(train_file)), num_heldout=len(read_rows(heldout_file)))
    else:
        train, heldout = generate_split(cfg.data)
    if cfg.model.prompt_format == "chat_template":
        from transformers import AutoTokenizer

        from r1core.problems import chat_prompts

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.pretrained_path, local_files_only=True)
        train, heldout = chat_prompts(train, tokenizer), chat_prompts(heldout, tokenizer)
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    if overlap:
        raise DataError(f"data: {len(overlap)} held-out prompts also appear in train (e.g. {next(iter(overlap))!r:.80})")

    def write(tmp: Path) -> None:
        write_rows(train, tmp / train_file.name)
        write_rows(heldout, tmp / heldout_file.name)
        for split, bad in quarantined.items():
            write_quarantine(bad, getattr(cfg.data, f"{split}_file"), tmp / f"quarantine-{split}.jsonl")

    ckpt.write_atomically(out, write)
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


@dataclass(frozen=True)
class TrainingPart:
    """One training stage as a part of a Ray Train job: its loop (`tasks.ray_jobs`), its config
    section (`recipe`) and `make_job(run_id, stage_dir, common)`, which builds its typed job once
    its MLflow run is open (`common`: the fields every job carries, `recipe` and its compute
    among them). With `heldout_file` (and `eval.in_training_job`) the job also evaluates the
    part's model on those rows before it ends (`evaluate_stage` takes that result)."""

    stage: str
    description: str
    loop: Callable[[dict], None]
    recipe: BaseModel
    make_job: Callable[[str, Path, dict], TrainJob]
    heldout_file: str | None = None


def run_training_stages(cfg: PipelineConfig, parts: list[TrainingPart], parent_run_id: str | None) -> list[StageResult]:
    """The shape every training stage shares: each part whose stage is complete returns its
    earlier result; the others get their MLflow runs opened and their typed jobs built, and run
    in order, consecutive parts of one worker-group shape as one Ray Train job (its start-up paid
    once), then each result is recorded. A stage is usually one part; a student's base, SFT and
    RL are three."""
    logger = get_run_logger()
    results: dict[str, StageResult] = {}
    pending: list[tuple[TrainingPart, StageCache]] = []
    for part in parts:
        cache = StageCache(cfg, part.stage)
        if (cached := cache.load(StageResult)) is not None:
            logger.info("%s: complete model found at %s, not training again", part.stage, cached.model_dir)
            results[part.stage] = cached
        else:
            pending.append((part, cache))
    if pending:
        from flows.plan import check as check_memory_plan

        for part, _ in pending:
            check_memory_plan(cfg, stage=part.stage)  # before any run opens and any worker starts
        t0 = time.time()
        with ExitStack() as runs:
            jobs = []
            for part, cache in pending:
                run_id = runs.enter_context(stage_run(cfg, part.stage, parent_run_id, part.description))
                common = {"stage": part.stage, "tracking_uri": tracking.tracking_uri(cfg.runtime), "run_id": run_id,
                          "tracking_outage_s": cfg.runtime.tracking_outage_s,
                          "checkpoint_dir": str(cache.dir / "checkpoints"), "output_dir": str(cache.output),
                          "seed": cfg.runtime.seed, "recipe": part.recipe, "compute": part.recipe.compute,
                          "evaluation": heldout_evaluation(cfg, part.stage, part.heldout_file)
                          if part.heldout_file and cfg.eval.in_training_job else None}
                jobs.append((part.loop, part.make_job(run_id, cache.dir, common)))
            client = tracking.client_for(cfg.runtime)
            # consecutive parts of one worker-group shape share a job (one per shape otherwise)
            for _, same_shape in itertools.groupby(jobs, key=lambda lj: ray_jobs.worker_group_shape(lj[1])):
                group = list(same_shape)
                names = [j.stage for _, j in group]
                logger.info("%s: Ray Train job on %d worker(s)", " + ".join(names), group[0][1].compute.num_workers)
                job_name = f"{cfg.resolved_run_name()}-{'+'.join(names)}"
                for _, job in group:  # which runs were one job's parts (bench/orchestration.py adds their loops)
                    tracking.set_tags(client, job.run_id, {"r1.ray_train_job": job_name})
                ray_jobs.fit(group, cfg.runtime, run_name=job_name)
            # each part's own time on the worker; the first also carries the job's start-up
            own = [client.get_run(j.run_id).data.metrics.get("time/worker_s", 0.0) for _, j in jobs]
            seconds = [time.time() - t0 - sum(own[1:]), *own[1:]]
            for (_, job), (part, _), s in zip(jobs, pending, seconds, strict=True):
                results[part.stage] = StageResult(stage=part.stage, model_dir=job.output_dir, mlflow_run_id=job.run_id,
                                                  seconds=s, init_model_dir=getattr(job, "init_model", None))
                tracking.log_metrics(client, job.run_id, {"stage_seconds": s})
                tracking.log_curves(cfg.runtime, job.run_id)
        for part, cache in pending:
            cache.save(results[part.stage])
    return [results[part.stage] for part in parts]


def prepared_corpus(cfg: PipelineConfig, data: DataPaths) -> Path:
    """The tokenizer and packed pretraining blocks (built once per run; students share them)."""
    prepared = cfg.run_dir() / "pretrain_base" / "prepared"  # the base's stage folder, whichever model trains
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


def pretrain_part(cfg: PipelineConfig, data: DataPaths, stage: str, description: str,
                  student: StudentConfig | None = None) -> TrainingPart:
    """Stage 0: build the tokenizer and corpus, then pretrain the tiny base; with `student`,
    that student's own (smaller) base on the same corpus and tokenizer."""
    model, recipe = cfg.model, cfg.pretrain
    if student is not None:
        model, recipe = student.model, recipe.model_copy(update={"steps": student.pretrain_steps})

    def make_job(run_id: str, stage_dir: Path, common: dict) -> PretrainJob:
        log_dataset(cfg, run_id, data.train_file, "train")
        prepared = prepared_corpus(cfg, data)
        rows, seq_len = torch.load(prepared / "blocks.pt").shape
        tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"corpus_tokens": rows * seq_len})
        if student is not None:
            tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"student": student.name})
        return PretrainJob(**common, model=model, prepared_dir=str(prepared))

    return TrainingPart(stage, description, ray_jobs.pretrain_loop, recipe, make_job, data.heldout_file)


def grpo_part(cfg: PipelineConfig, stage: str, section: str, description: str, init_model: str, data: DataPaths,
              reward_model_dirs: dict[str, str] | None = None) -> TrainingPart:
    """A GRPO stage (R1-Zero, reasoning RL, general RL, a student's RL) from `init_model` on the
    config `section`. With `reward_model_dirs`, general prompts join the reasoning ones and are
    scored by those reward models."""
    recipe = cfg.section(section)
    tags = {"rewards": json.dumps({k: f"v{REWARD_VERSIONS[k]} x{w:g}" for k, w in recipe.rewards.items()})}
    if reward_model_dirs:
        tags["model_rewards"] = json.dumps({k: f"{_registered_of(reward_model_dirs[k])} x{w:g}"
                                            for k, w in recipe.model_rewards.items()})

    rollout = cfg.rollout.for_stage(recipe.rollout)
    if rollout.backend == "vllm":  # also when started from a deployment, which skips the CLI's check
        check_vllm_environment(rollout.vllm.python)

    def make_job(run_id: str, stage_dir: Path, common: dict) -> GRPOJob:
        _log_training_inputs(cfg, run_id, init_model, data.train_file, tags)
        common.update(init_model=init_model, train_file=data.train_file, rollout=rollout, code=cfg.code)
        if reward_model_dirs:
            return GeneralRLJob(**common, reward_models={k: reward_model_dirs[k] for k in recipe.model_rewards},
                                languages=cfg.data.languages)
        return GRPOJob(**common)

    loop = ray_jobs.general_rl_loop if reward_model_dirs else ray_jobs.grpo_loop
    return TrainingPart(stage, description, loop, recipe, make_job, data.heldout_file)


def sft_part(cfg: PipelineConfig, stage: str, section: str, description: str, init_model: str, dataset: str,
             heldout_file: str | None = None) -> TrainingPart:
    """An SFT stage (cold start, the rejection-sampled set, a student's distillation) of
    `init_model` on `dataset` (a rows file or a parquet directory); with `heldout_file`, the
    job evaluates its model on it."""
    recipe = cfg.section(section)

    def make_job(run_id: str, stage_dir: Path, common: dict) -> SFTJob:
        _log_training_inputs(cfg, run_id, init_model, dataset)
        return SFTJob(**common, init_model=init_model, train_file=dataset)

    return TrainingPart(stage, description, ray_jobs.sft_loop, recipe, make_job, heldout_file)


@task(name="pretrain", task_run_name="pretrain-{stage}", cache_policy=NO_CACHE)
def pretrain(cfg: PipelineConfig, data: DataPaths, stage: str, description: str, parent_run_id: str | None = None,
             student: StudentConfig | None = None) -> StageResult:
    """Stage 0 (or a student's base) as a Ray Train job (`pretrain_part`)."""
    return run_training_stages(cfg, [pretrain_part(cfg, data, stage, description, student)], parent_run_id)[0]


@task(name="grpo", task_run_name="grpo-{stage}", cache_policy=NO_CACHE)
def grpo(cfg: PipelineConfig, stage: str, section: str, description: str, init_model: str, data: DataPaths,
         parent_run_id: str | None = None, reward_model_dirs: dict[str, str] | None = None) -> StageResult:
    """A GRPO stage as a Ray Train job (`grpo_part`)."""
    part = grpo_part(cfg, stage, section, description, init_model, data, reward_model_dirs)
    return run_training_stages(cfg, [part], parent_run_id)[0]


@task(name="sft", task_run_name="sft-{stage}", cache_policy=NO_CACHE)
def sft(cfg: PipelineConfig, stage: str, section: str, description: str, init_model: str, dataset: str,
        parent_run_id: str | None = None, heldout_file: str | None = None) -> StageResult:
    """An SFT stage as a Ray Train job (`sft_part`)."""
    part = sft_part(cfg, stage, section, description, init_model, dataset, heldout_file)
    return run_training_stages(cfg, [part], parent_run_id)[0]


@task(name="train-student", task_run_name="train-student-{student.name}", cache_policy=NO_CACHE)
def train_student(cfg: PipelineConfig, student: StudentConfig, dataset: str, data: DataPaths,
                  parent_run_id: str | None = None) -> dict[str, StageResult]:
    """Stage 9 for one student, as one Ray Train job of up to three parts: its own base (unless
    `model.pretrained_path` gives one), SFT of that base on the stage-6 set (distillation, no
    RL) and, for the paper's comparison, R1-Zero-style GRPO of the same base (`distill.rl_only`)."""
    name = f"distill/{student.name}"
    parts = []
    if student.model.pretrained_path:
        base_dir = student.model.pretrained_path
    else:
        parts.append(pretrain_part(cfg, data, f"{name}/base", "Stage 9: pretraining of student "
                                   f"'{student.name}' (its own base) on the same corpus.", student))
        base_dir = str(StageCache(cfg, f"{name}/base").output)
    parts.append(sft_part(cfg, f"{name}/sft", "distill.sft", "Stage 9: distillation, SFT of a smaller student on "
                          "the stage-6 set (no RL).", base_dir, dataset, data.heldout_file))
    if cfg.distill.rl_only:
        parts.append(grpo_part(cfg, f"{name}/rl_only", "distill.rl", "Stage 9 (comparison): R1-Zero-style GRPO of "
                               "the student from its own base, no distillation.", base_dir, data))
    return {r.stage: r for r in run_training_stages(cfg, parts, parent_run_id)}


@task(name="reward-model", task_run_name="reward-model-{model}", cache_policy=NO_CACHE)
def reward_model(cfg: PipelineConfig, model: str, description: str, init_model: str, data: DataPaths,
                 parent_run_id: str | None = None) -> StageResult:
    """Stage 7: one reward model (helpfulness or harmlessness) from the base, on synthesised
    preference pairs, as a Ray Train job; held-out pairwise accuracy in its metrics."""
    from r1core.reward_model import preference_pairs

    recipe = cfg.reward_models

    def make_job(run_id: str, stage_dir: Path, common: dict) -> RewardModelJob:
        languages = list(cfg.data.languages)
        reasoning = read_rows(data.train_file)
        files = {}
        for split, n, seed in (("train", recipe.train_pairs, cfg.data.seed),
                               ("heldout", recipe.heldout_pairs, cfg.data.seed + 1)):
            pairs = preference_pairs(model, n, languages, seed, reasoning, recipe.unsafe_patterns)
            files[f"{split}_file"] = str(write_rows(pairs, stage_dir / "pairs" / f"{split}.jsonl"))
        _log_training_inputs(cfg, run_id, init_model, files["train_file"], {"reward_model": model})
        return RewardModelJob(**common, init_model=init_model, reward_model=model, **files)

    part = TrainingPart(f"reward_models/{model}", description, ray_jobs.reward_model_loop, recipe, make_job)
    result = run_training_stages(cfg, [part], parent_run_id)[0]
    if result.skipped:
        return result
    run = tracking.client_for(cfg.runtime).get_run(result.mlflow_run_id)
    return result.model_copy(update={"metrics": {"pairwise_accuracy": run.data.metrics["eval/pairwise_accuracy"]}})


def _log_training_inputs(cfg: PipelineConfig, run_id: str, init_model: str, train_file: str,
                         tags: dict[str, str] | None = None) -> None:
    """A stage that trains an existing model on a rows file: the file as the run's dataset, the
    starting model (and `tags`) as tags."""
    log_dataset(cfg, run_id, train_file, "train")
    tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"init_model_dir": init_model, **(tags or {})})


EVAL_SETTINGS = ("k", "num_prompts")  # of an evaluation's results: what it measured on, not a score


def heldout_evaluation(cfg: PipelineConfig, stage: str, heldout_file: str) -> HeldoutEvaluation:
    """What a stage's evaluation measures and where its job writes it (`eval.in_training_job`)."""
    return HeldoutEvaluation(heldout_file=heldout_file, eval=cfg.eval, code=cfg.code, batch_size=cfg.rollout.batch_size,
                             output_dir=str(StageCache(cfg, stage).dir / "heldout_eval"))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_stage(cfg: PipelineConfig, stage: StageResult, heldout_file: str) -> tuple[dict[str, float], dict]:
    """Held-out pass@1 / cons@k / format rate / length of a stage's model, logged to its run
    (with each prompt's scores as `eval/per_prompt.json`); returns the metrics and those scores."""
    from mlflow.entities import Param

    from tasks.evaluate import evaluate_on_ray, job_evaluation

    in_job = job_evaluation(stage.model_dir, heldout_evaluation(cfg, stage.stage, heldout_file))
    if in_job is not None:
        metrics, per_prompt = in_job
        metrics["in_job"] = 1.0  # bench/orchestration.py: its time is inside the job's
    else:
        t0 = time.time()
        metrics, per_prompt = evaluate_on_ray(cfg, stage.model_dir, heldout_file)
        metrics["wall_s"] = time.time() - t0  # with the Ray task's start-up and the model's load (compute_s: without)
    client = tracking.client_for(cfg.runtime)
    # how it was measured (k, prompts) as params: a one-point metric would show as a chart
    settings = {k: v for k, v in metrics.items() if k in EVAL_SETTINGS}
    tracking.log_metrics(client, stage.mlflow_run_id, {f"eval/{k}": v for k, v in metrics.items() if k not in settings})
    client.log_batch(stage.mlflow_run_id, params=[Param(f"eval/{k}", str(v)) for k, v in settings.items()])
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


@task(name="register-model", cache_policy=NO_CACHE, **IDEMPOTENT)
def register(cfg: PipelineConfig, stage: StageResult, metrics: dict[str, float], name: str) -> str:
    """Register the stage's model in the MLflow registry (alias `newest`) with its lineage: the
    model version it started from, the digests of its training data, its rewards with their
    versions, the config hash and the git commit, and its headline evaluation numbers."""
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
    description = (f"{stage.stage} from {lineage['parent_model']}; held-out "
                   + ", ".join(f"{m} {metrics[m]:.3f}" for m in headline if m in metrics)
                   + f" (config {cfg.digest()}, commit {lineage['git_commit'][:12]})")
    version = tracking.register_model(cfg.runtime, stage.mlflow_run_id, Path(stage.model_dir), name,
                                      tags={**lineage, **numbers}, description=description)
    get_run_logger().info("registered %s version %s (alias %s), from %s", name, version, tracking.NEWEST_ALIAS,
                          lineage["parent_model"])
    return f"{name}/{version}"


@task(name="use-pretrained-base", cache_policy=NO_CACHE)
def use_pretrained_base(cfg: PipelineConfig, stage: str, parent_run_id: str | None = None) -> StageResult:
    """Stage 0 without pretraining: the user's local HF causal LM is the base model."""
    path = str(Path(cfg.model.pretrained_path).resolve())
    with stage_run(cfg, stage, parent_run_id,
                   f"Stage 0: base model taken from the local directory {path} (no pretraining).") as run_id:
        tracking.set_tags(tracking.client_for(cfg.runtime), run_id, {"base_model_source": path})
    return StageResult(stage=stage, model_dir=path, mlflow_run_id=run_id, seconds=0.0)
