"""Ray: the local or remote cluster, and the Ray Train jobs that run the r1core recipes.

Each training stage is one `TorchTrainer.fit()`: Ray starts `num_workers` workers (DDP over
gloo on CPU, NCCL on GPU), each runs a `*_loop` below, and rank 0 reports metrics to the
stage's MLflow run and checkpoints to Ray's storage (from which a re-run or a restarted worker
group resumes). Tracking URIs and run ids travel in `train_loop_config`: workers keep the
environment they were started with.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import ray
import torch

import r1core
from r1core import checkpoint as ckpt
from r1core.config import PipelineConfig, RuntimeConfig
from r1core.training import TrainContext, unwrap

# Ray Train routes worker logging to the driver; print() there is both logged and teed (twice).
log = logging.getLogger("r1.train")

# Ray Train's defaults poll slowly; on one machine these cut ~10 s off every fit.
RAY_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


_ray_init_lock = threading.Lock()  # stages submitted concurrently (the reward models) start Ray once


def ensure_ray(runtime: RuntimeConfig) -> None:
    """Connect to RAY_ADDRESS / runtime.ray_address, else start a local Ray on this machine."""
    with _ray_init_lock:
        if not ray.is_initialized():
            _init_ray(runtime)


def _init_ray(runtime: RuntimeConfig) -> None:
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        # a cluster: ship the project's packages to the workers with the job
        import flows
        import tasks

        modules = [str(Path(m.__file__).parent) for m in (r1core, tasks, flows)]
        ray.init(address=address, runtime_env={"py_modules": modules, "env_vars": RAY_ENV_DEFAULTS},
                 log_to_driver=True)
    else:
        ray.init(num_cpus=runtime.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": RAY_ENV_DEFAULTS})


class RayContext(TrainContext):
    """A Ray Train worker: rank and device from Ray, DDP wrapping, metrics to MLflow (rank 0),
    checkpoints reported to Ray Train and logged to MLflow."""

    def __init__(self, job: dict):
        super().__init__(job["checkpoint_dir"])
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        self.rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.bf16 = job.get("bf16", False)
        self.stage = job["stage"]
        self.run_id = job["mlflow_run_id"]
        self.client = None
        if self.rank == 0:
            from mlflow import MlflowClient

            self.client = MlflowClient(job["mlflow_tracking_uri"])
        self.started = time.time()

    def wrap(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=False)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        if self.rank == 0:
            from tasks.tracking import log_metrics

            log_metrics(self.client, self.run_id, metrics, step)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:8])
            log.info("[%s] %s (%.0fs) %s", self.stage, self.progress_line(step), time.time() - self.started, shown)

    def latest_checkpoint(self) -> Path | None:
        """Ray Train's latest checkpoint (after a worker failure or a re-run of the same job),
        else the newest complete local one."""
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is not None:
            local = self.checkpoint_dir.parent / f"restored_checkpoint_rank{self.rank}"  # ranks share a node
            shutil.rmtree(local, ignore_errors=True)
            reported.to_directory(str(local))
            if ckpt.is_complete(local):
                return local
        return super().latest_checkpoint()

    def on_checkpoint(self, path: Path | None, step: int, metrics: dict) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint)
        if path is not None:
            self.client.log_artifacts(self.run_id, str(path), f"checkpoints/{path.name}")


def fit(stage: str, loop, job: dict, cfg: PipelineConfig, compute) -> None:
    """Run one Ray Train job; raises with the worker's error if it fails."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(cfg.runtime)
    storage = Path(cfg.runtime.workdir).resolve() / "ray_results"
    trainer = TorchTrainer(
        loop,
        train_loop_config={**job, "stage": stage, "bf16": compute.bf16,
                           "threads": compute.cpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker={"CPU": compute.cpus_per_worker}),
        run_config=RunConfig(
            name=f"{cfg.resolved_run_name()}-{stage}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"stage {stage}: Ray Train job failed: {result.error}") from result.error


def worker_setup(job: dict) -> tuple[PipelineConfig, RayContext]:
    from r1core import code_rewards

    torch.set_num_threads(job["threads"])
    cfg = PipelineConfig.model_validate(job["config"])
    code_rewards.configure(cfg.code)  # the sandbox limits for code rewards in this worker
    return cfg, RayContext(job)


def write_final_model(ctx: TrainContext, model, tokenizer, output_dir: str) -> None:
    """Rank 0 saves the trained model as an HF directory, atomically."""
    if ctx.rank != 0:
        return

    def save(d: Path):
        unwrap(model).save_pretrained(d)
        tokenizer.save_pretrained(d)

    ckpt.write_atomically(Path(output_dir), save, meta={"stage": getattr(ctx, "stage", "")})


# ---------------------------------------------------------------- per-worker loops of each stage
def pretrain_loop(job: dict) -> None:
    from transformers import AutoTokenizer

    from r1core.modeling import build_model
    from r1core.training import pretrain

    cfg, ctx = worker_setup(job)
    tokenizer = AutoTokenizer.from_pretrained(job["prepared_dir"])
    blocks = torch.load(Path(job["prepared_dir"]) / "blocks.pt")
    model = build_model(cfg.model, tokenizer, seed=cfg.runtime.seed)
    pretrain(cfg.pretrain, model, tokenizer, blocks, ctx, seed=cfg.runtime.seed)
    write_final_model(ctx, model, tokenizer, job["output_dir"])


def grpo_loop(job: dict) -> None:
    from r1core.modeling import load_pretrained
    from r1core.reasoning_tasks import read_rows
    from r1core.training import grpo_train

    cfg, ctx = worker_setup(job)
    policy, tokenizer = load_pretrained(job["init_model_dir"])
    reference, _ = load_pretrained(job["init_model_dir"])
    rows = read_rows(job["train_file"])
    stage_cfg = cfg.section(job["section"])
    routing = {}
    if job.get("reward_models"):  # general RL: reasoning rows by rules, general rows by the reward models
        from r1core.reward_model import RewardModel, general_prompts, prompt_sampler, routed_rewards

        general = general_prompts(stage_cfg.general_prompts, stage_cfg.general_mix, cfg.data.languages,
                                  seed=cfg.runtime.seed)
        scorers = {name: RewardModel(name, path, ctx.device) for name, path in job["reward_models"].items()}
        routing = {"reward_fn": routed_rewards(stage_cfg.rewards, stage_cfg.model_rewards, scorers),
                   "sample_rows": prompt_sampler(len(rows), len(general), stage_cfg.prompt_mix)}
        rows = rows + general
    grpo_train(stage_cfg, policy, reference, tokenizer, rows, ctx, seed=cfg.runtime.seed,
               batch_size=cfg.rollout.batch_size, **routing)
    write_final_model(ctx, policy, tokenizer, job["output_dir"])


def reward_model_loop(job: dict) -> None:
    import json

    from r1core.reward_model import encode_pairs, init_reward_model, pairwise_accuracy
    from r1core.training import reward_model_train

    cfg, ctx = worker_setup(job)
    model, tokenizer = init_reward_model(job["init_model_dir"])
    stage_cfg = cfg.section(job["section"])

    def pairs(path: str) -> dict:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        return encode_pairs(tokenizer, job["reward_model"], rows, stage_cfg.seq_len)

    reward_model_train(stage_cfg, model, tokenizer, pairs(job["train_file"]), ctx, seed=cfg.runtime.seed)
    if ctx.rank == 0:
        ctx.log({"eval/pairwise_accuracy": pairwise_accuracy(unwrap(model), pairs(job["heldout_file"]))}, 0)
    write_final_model(ctx, model, tokenizer, job["output_dir"])


def sft_loop(job: dict) -> None:
    from r1core.modeling import load_pretrained
    from r1core.reasoning_tasks import read_rows
    from r1core.training import pack_examples, sft_train

    cfg, ctx = worker_setup(job)
    model, tokenizer = load_pretrained(job["init_model_dir"])
    stage_cfg = cfg.section(job["section"])
    packed = pack_examples(tokenizer, read_rows(job["train_file"]), stage_cfg.seq_len)
    sft_train(stage_cfg, model, tokenizer, packed, ctx, seed=cfg.runtime.seed)
    write_final_model(ctx, model, tokenizer, job["output_dir"])
