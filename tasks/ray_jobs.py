"""Ray: the local or remote cluster, and the Ray Train jobs that run the r1core recipes.

Each training stage is one `TorchTrainer.fit()`: Ray starts `num_workers` workers (DDP over
gloo on CPU, NCCL on GPU), each runs a `*_loop` below on its typed job (`tasks.jobs`), and rank
0 reports metrics to the stage's MLflow run and checkpoints to Ray's storage (from which a
re-run or a restarted worker group resumes). Tracking URIs and run ids travel in the job:
workers keep the environment they were started with.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch

import r1core
from r1core import checkpoint as ckpt
from r1core import parallel
from r1core.config import RuntimeConfig
from r1core.training import TrainContext
from tasks import console, lifecycle
from tasks.jobs import GeneralRLJob, GRPOJob, HeldoutEvaluation, PretrainJob, RewardModelJob, SFTJob, TrainJob

# Ray Train routes worker logging to the driver; print() there is both logged and teed (twice).
log = logging.getLogger("r1.train")

# The one metric a stage's console line shows, the first of these it logs.
HEADLINE_METRICS = ("reward", "loss", "eval/pairwise_accuracy")

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
            lifecycle.reclaim_signals()


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
        # The dashboard is also Ray's state API, which Ray Train's placement-group watchdog polls
        # every second. Ray takes 8265 or the next free port (several drivers on one host).
        ray.init(num_cpus=runtime.num_cpus or os.cpu_count(), include_dashboard=runtime.ray_dashboard,
                 dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": RAY_ENV_DEFAULTS})


def stop_workers() -> None:
    """Stop every Ray job this driver started (a stage interrupted by a signal): its workers die
    with the driver's connection, before the stage's run is closed."""
    with _ray_init_lock:
        if ray.is_initialized():
            ray.shutdown()


class RayContext(TrainContext):
    """A Ray Train worker: Ray's process group and device (DDP or FSDP2 wrapping is the base's,
    `r1core.parallel`), metrics to MLflow (rank 0), checkpoints reported to Ray Train and logged
    to MLflow."""

    def __init__(self, job: TrainJob, progress_queue=None):
        super().__init__(job.checkpoint_dir)
        self.progress_queue = progress_queue  # the driver's StageProgress (rank 0 puts, the driver logs)
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        self.rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.bf16 = job.compute.bf16
        self.stage = job.stage
        self._slug = "".join(c if c.isalnum() else "-" for c in job.stage)
        self.run_id = job.run_id
        self.client = self.tracking = None
        if self.rank == 0:
            from tasks.tracking import BufferedTracking

            self.tracking = BufferedTracking(job.tracking_uri, job.run_id, job.tracking_outage_s)
            self.client = self.tracking.client
        self.started = time.time()
        self.logged_through = self._logged_through() if self.rank == 0 else {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        if self.rank == 0:
            # A step replayed after a restart (a worker died after logging it, before the next
            # checkpoint) recomputes the same values: it is not logged again, so that each curve
            # has one point per step; the run's `r1.resumes` tag says where training resumed.
            fresh = {k: v for k, v in metrics.items() if step > self.logged_through.get(k.replace("@", "_at_"), -1)}
            self.tracking.log_metrics(fresh, step)
            self.logged_through.update(dict.fromkeys((k.replace("@", "_at_") for k in fresh), step))
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:8])
            line = f"{self.progress_line(step)} ({time.time() - self.started:.0f}s)"
            if self.progress_queue is None:
                log.info("[%s] %s %s", self.stage, line, shown)
                return
            total = self.progress[1] if self.progress else None
            headline = next((f"{k} {metrics[k]:.4g}" for k in HEADLINE_METRICS if k in metrics), "")
            with contextlib.suppress(Exception):  # a full queue or a driver gone: training goes on
                self.progress_queue.put_nowait({"stage": self.stage, "step": step, "total": total, "line": line,
                                                "shown": shown, "headline": headline})

    def _logged_through(self) -> dict[str, int]:
        """Metric -> the last step the run already has of it (a run continued after a kill)."""
        try:
            keys = self.client.get_run(self.run_id).data.metrics
            return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1) for k in keys}
        except Exception as e:  # tracking down at start: replayed steps may then be logged again
            log.warning("[%s] cannot read the run's logged steps (%s): replays are not filtered", self.stage, e)
            return {}

    def on_resume(self, path: Path, step: int) -> None:
        if self.rank == 0:
            from tasks.tracking import set_tags

            try:
                earlier = self.client.get_run(self.run_id).data.tags.get("r1.resumes")
                set_tags(self.client, self.run_id, {"r1.resumed_from_step": step,
                                                    "r1.resumes": f"{earlier},{step}" if earlier else str(step)})
            except Exception as e:  # a tracking outage must not stop training
                log.warning("[%s] resumed from step %d; tags not recorded (%s)", self.stage, step, e)

    def finish(self) -> None:
        """The job's time in its training loop and on its worker (bench/orchestration.py splits a
        stage's time with them); then everything still buffered reaches the tracking server (or
        the outage budget ends)."""
        if self.tracking is not None:
            now = time.perf_counter()
            timing = {"time/worker_s": time.time() - self.started}
            if self.progress is not None:  # the loop ran from `begin` (a resumed job: its remaining steps)
                timing["time/loop_s"] = now - self.progress[2]
            self.tracking.log_metrics(timing, self.progress[1] if self.progress else 0)
            self.tracking.close()

    def checkpoints(self) -> list[Path]:
        """Ray Train's latest checkpoint (after a worker failure or a re-run of the same job) and
        the complete local ones, newest step first: whichever is newer wins (a local one at the
        same step is preferred, as it needs no copy)."""
        import ray.train

        local = super().checkpoints()
        reported = ray.train.get_checkpoint()
        if reported is None or f"_{self._slug}_step_" not in Path(reported.path).name:
            return local  # none, or another part's of a job of several (`fit`)
        restored = self.checkpoint_dir.parent / f"restored_checkpoint_rank{self.rank}"  # ranks share a node
        shutil.rmtree(restored, ignore_errors=True)
        reported.to_directory(str(restored))
        if not ckpt.is_complete(restored):
            return local
        return sorted([*local, restored], key=lambda p: (ckpt.checkpoint_step(p), p != restored), reverse=True)

    def on_checkpoint(self, path: Path | None, step: int, metrics: dict) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if path else None
        # Named here (unique, as Ray's own timestamped names) so that a failed upload can be
        # removed: pyarrow copies files in parallel and leaves the ones that fit (a full disk
        # leaves COMPLETE next to a truncated shard), which Ray never registers but never deletes.
        # The stage in the name tells a job's parts' checkpoints apart (`checkpoints`).
        name = (f"checkpoint_{time.strftime('%Y-%m-%d_%H-%M-%S')}.{time.time_ns() % 10**9:09d}_{self._slug}_{path.name}"
                if path else None)
        try:
            ray.train.report({**metrics, "step": step}, checkpoint=checkpoint, checkpoint_dir_name=name)
        except BaseException:
            if name is not None:
                storage = ray.train.get_context().get_storage()
                with contextlib.suppress(Exception):
                    storage.storage_filesystem.delete_dir(storage.build_checkpoint_path_from_name(name))
            raise
        if path is not None:
            self.tracking.log_artifacts(str(path), f"checkpoints/{path.name}")


class StageProgress:
    """A running job's steps as the driver sees them: rank 0 puts one record per logged step on a
    Ray queue (an actor, so it works across a cluster); the driver, while it waits for the job,
    logs each to the Prefect run it runs in (the stage's task run: the UI's logs move with the
    stage) and keeps a Prefect progress artifact at step / total."""

    def __init__(self, stage: str):
        from ray.util.queue import Queue

        self.stage = stage
        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})  # never waits for a CPU
        self.artifacts: dict[str, object] = {}  # stage -> its progress artifact

    def drain(self) -> None:
        try:
            records = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception as e:  # the queue's actor lost (Ray shutting down): progress is not the job
            log.debug("[%s] progress not read: %s", self.stage, e)
            return
        for record in records:
            self._show(record)

    def _show(self, record: dict) -> None:
        from prefect import get_run_logger

        stage = record.get("stage", self.stage)  # a job of several parts: the part that logged it
        in_prefect = _in_prefect_run()
        (get_run_logger() if in_prefect else log).info("[%s] %s  %s", stage, record["line"], record["shown"])
        console.progress(stage, record["step"], record.get("total"), record["line"], record.get("headline", ""))
        if not in_prefect or not record.get("total"):
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = min(100.0, 100.0 * record["step"] / record["total"])
        text = f"{stage}: {record['line']}; {record['shown']}"
        if stage not in self.artifacts:
            key = "".join(c if c.isalnum() else "-" for c in f"{stage}-progress".lower())
            self.artifacts[stage] = create_progress_artifact(percent, key=key, description=text)
        else:
            update_progress_artifact(self.artifacts[stage], percent, description=text)


def _in_prefect_run() -> bool:
    """Inside a flow or task run (a stage), not a bench or a script calling `fit` directly."""
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        return get_run_context() is not None
    except MissingContextError:
        return False


def worker_group_shape(job: TrainJob) -> tuple[int, int, bool]:
    """What one Ray Train job's parts must share: workers, CPUs per worker, a GPU each."""
    return job.compute.num_workers, job.compute.cpus_per_worker, job.compute.use_gpu


def fit(parts: list[tuple[Callable[[dict], None], TrainJob]], runtime: RuntimeConfig, run_name: str) -> None:
    """Run one Ray Train job of each `(loop, job)` part, one after another on the same workers;
    raises with the worker's error if it fails. A stage is one part; a stage that trains
    several models on one worker-group shape (a student's base, SFT and RL) is several, so that
    it pays Ray Train's start-up once. `run_name` names it in Ray's storage (a re-run of the
    same name resumes from it; of several parts, those whose model is written are passed over)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    shapes = {worker_group_shape(j) for _, j in parts}
    if len(shapes) != 1:
        raise ValueError(f"one Ray Train job runs parts of one worker-group shape; got {sorted(shapes)} "
                         f"for {[j.stage for _, j in parts]}")
    ensure_ray(runtime)
    # read by Ray Train when the job starts and passed on to its controller
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(runtime.train_poll_interval_s)
    compute = parts[0][1].compute
    progress = StageProgress(" + ".join(j.stage for _, j in parts))
    if len(parts) == 1:
        loop, config = parts[0][0], {"job": parts[0][1].model_dump(mode="json")}
    else:
        loop, config = stages_loop, {"parts": [(part_loop, j.model_dump(mode="json")) for part_loop, j in parts]}
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "progress": progress.queue},
        torch_config=TorchConfig(backend="nccl" if compute.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=compute.num_workers, use_gpu=compute.use_gpu,
                                     resources_per_worker={"CPU": compute.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(runtime.workdir).resolve() / "ray_results"),
            failure_config=FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = _fit_off_the_main_thread(trainer, run_name, progress)
    if result.error:
        stages = ", ".join(j.stage for _, j in parts)
        raise RuntimeError(f"stage {stages}: Ray Train job failed: {result.error}") from result.error


def stages_loop(config: dict) -> None:
    """The loop of a job of several parts: each part's own loop on its own job, in order. A part
    whose model is already written (a job restarted after a failure, or re-run) is not trained
    again; its held-out evaluation is run if the job was to run one and it is missing."""
    import ray.train

    for loop, job in config["parts"]:
        common = TrainJob.model_validate(  # the fields every job carries
            {k: v for k, v in job.items() if k in TrainJob.model_fields})
        if not ckpt.is_complete(Path(common.output_dir)):
            loop({"job": job, "progress": config.get("progress")})
            continue
        evaluation = common.evaluation
        if evaluation is not None and ray.train.get_context().get_world_rank() == 0:
            from tasks.evaluate import evaluate_written_model, job_evaluation

            if job_evaluation(common.output_dir, evaluation) is None:
                evaluate_written_model(common.output_dir, evaluation)
        log.info("[%s] model already written at %s: not trained again", common.stage, common.output_dir)


def _fit_off_the_main_thread(trainer, run_name: str, progress: StageProgress):
    """`trainer.fit()` in a thread, waited for from this one. On the main thread Ray Train takes
    over SIGINT itself (and ends in a SystemExit that hides which signal came); off it, the
    signal stays the driver's (`tasks.lifecycle`): it interrupts the wait here, and the stage
    stops the workers and records the run as KILLED."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name=f"ray-train {run_name}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)  # how soon a finished job returns (the progress queue is read as often)
        progress.drain()
    progress.drain()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def worker_setup(config: dict, job_type: type[TrainJob]):
    """This worker's job (validated as `job_type`) and its Ray Train context."""
    job = job_type.model_validate(config["job"])
    torch.set_num_threads(job.compute.cpus_per_worker)
    return job, RayContext(job, config.get("progress"))


def write_final_model(ctx: TrainContext, model, tokenizer, output_dir: str,
                      evaluation: HeldoutEvaluation | None = None) -> None:
    """The trained model as a plain HF directory (loadable by transformers and vLLM), written
    atomically by rank 0; a sharded model's weights are gathered first (every rank takes part).
    Then, given the job's `evaluation`, rank 0 evaluates the written model on the held-out rows
    while its worker is up (`eval.in_training_job`)."""
    weights = parallel.full_state_dict(model, everywhere=False)
    if ctx.rank != 0:
        return
    ctx.finish()  # the job's last metrics, before its model counts as written

    def save(d: Path):
        model.save_pretrained(d, state_dict=weights)
        tokenizer.save_pretrained(d)

    ckpt.write_atomically(Path(output_dir), save, meta={"stage": getattr(ctx, "stage", "")})
    if evaluation is not None:
        from tasks.evaluate import evaluate_written_model

        del weights  # a full copy of the weights, no longer needed
        try:
            evaluate_written_model(output_dir, evaluation)
        except Exception as e:  # the trained model stands: the stage evaluates it as a Ray task instead
            log.warning("[%s] held-out evaluation in the job failed (%s: %s); the stage evaluates the model "
                        "after the job", getattr(ctx, "stage", ""), type(e).__name__, e)


# ---------------------------------------------------------------- per-worker loops of each stage
def pretrain_loop(config: dict) -> None:
    from transformers import AutoTokenizer

    from r1core.modeling import build_model
    from r1core.training import pretrain

    job, ctx = worker_setup(config, PretrainJob)
    tokenizer = AutoTokenizer.from_pretrained(job.prepared_dir)
    blocks = torch.load(Path(job.prepared_dir) / "blocks.pt")
    model = build_model(job.model, tokenizer, seed=job.seed)
    pretrain(job.recipe, model, blocks, ctx, seed=job.seed)
    write_final_model(ctx, model, tokenizer, job.output_dir, job.evaluation)


def train_policy(job: GRPOJob, ctx: RayContext, rows: list[dict], **routing) -> None:
    """GRPO of the policy from `job.init_model` (its frozen reference too) on `rows`."""
    from r1core import code_rewards
    from r1core.modeling import load_pretrained
    from r1core.training import grpo_train

    code_rewards.configure(job.code)  # the sandbox limits for code rewards in this worker
    policy, tokenizer = load_pretrained(job.init_model)
    reference, _ = load_pretrained(job.init_model)
    source = None
    if job.rollout.backend != "in_process" and ctx.rank == 0:  # rank 0 drives the pool for the whole job
        from tasks.rollout_workers import RolloutPool

        source = RolloutPool(job.rollout, job.init_model, logits_chunk_tokens=job.recipe.compute.logits_chunk_tokens,
                             weights_dir=str(Path(job.checkpoint_dir) / "rollout-weights"),
                             name=f"{job.stage} rollout")
    try:
        grpo_train(job.recipe, policy, reference, tokenizer, rows, ctx, seed=job.seed,
                   batch_size=job.rollout.batch_size, rollout=job.rollout, source=source, **routing)
    finally:
        if source is not None:
            source.close()
    write_final_model(ctx, policy, tokenizer, job.output_dir, job.evaluation)


def grpo_loop(config: dict) -> None:
    """R1-Zero, reasoning RL, a student's RL: rule rewards on the train rows."""
    from r1core.problems import read_rows

    job, ctx = worker_setup(config, GRPOJob)
    train_policy(job, ctx, read_rows(job.train_file))


def general_rl_loop(config: dict) -> None:
    """General RL: reasoning rows scored by the rule rewards, general prompts by the reward models."""
    from r1core.problems import read_rows
    from r1core.reward_model import general_rl_inputs

    job, ctx = worker_setup(config, GeneralRLJob)
    rows, reward_fn, sample_rows = general_rl_inputs(job.recipe, read_rows(job.train_file), job.languages, job.seed,
                                                     job.reward_models, ctx.device)
    train_policy(job, ctx, rows, reward_fn=reward_fn, sample_rows=sample_rows)


def reward_model_loop(config: dict) -> None:
    import json

    from r1core.reward_model import encode_pairs, init_reward_model, pairwise_accuracy
    from r1core.training import reward_model_train

    job, ctx = worker_setup(config, RewardModelJob)
    model, tokenizer = init_reward_model(job.init_model, seed=job.seed)

    def pairs(path: str) -> dict:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        return encode_pairs(tokenizer, job.reward_model, rows, job.recipe.seq_len)

    reward_model_train(job.recipe, model, pairs(job.train_file), ctx, seed=job.seed)
    # every worker scores the held-out pairs (under FSDP each forward gathers shards collectively)
    ctx.log({"eval/pairwise_accuracy": pairwise_accuracy(model, pairs(job.heldout_file))}, 0)
    write_final_model(ctx, model, tokenizer, job.output_dir, job.evaluation)


def sft_loop(config: dict) -> None:
    from r1core.modeling import load_pretrained
    from r1core.problems import read_rows
    from r1core.training import pack_examples, sft_train

    job, ctx = worker_setup(config, SFTJob)
    model, tokenizer = load_pretrained(job.init_model)
    packed = pack_examples(tokenizer, read_rows(job.train_file), job.recipe.seq_len)
    sft_train(job.recipe, model, packed, ctx, seed=job.seed)
    write_final_model(ctx, model, tokenizer, job.output_dir, job.evaluation)
