"""A running training job's progress where an operator watches it: each logged step in the
Prefect task run's logs (sent by the Ray Train worker, logged by the driver while it waits) and
a Prefect progress artifact that reaches 100%. Real Prefect (the test harness), a real local
Ray, a real MLflow store."""
from __future__ import annotations

import time

from r1core.config import RuntimeConfig, TrainComputeConfig
from tasks import ray_jobs, tracking
from tasks.jobs import TrainJob

STEPS = 4


def test_each_step_of_a_running_job_reaches_the_prefect_logs_and_a_progress_artifact(prefect_harness, tmp_path):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterTaskRunId,
    )
    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import task_run

    runtime = RuntimeConfig(workdir=str(tmp_path), num_cpus=2)
    job = TrainJob(stage="r1_zero", tracking_uri=tracking.tracking_uri(runtime),
                   run_id=tracking.start_run(runtime, "r1_zero"), tracking_outage_s=30,
                   checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"),
                   compute=TrainComputeConfig(), seed=0)

    def four_steps(config: dict) -> None:  # a training loop reduced to what progress sees
        job, ctx = ray_jobs.worker_setup(config, TrainJob)
        ctx.begin(0, STEPS)
        for step in range(1, STEPS + 1):
            time.sleep(0.6)  # the driver reads every 0.1 s: steps arrive while it waits
            ctx.log({"loss": 1.0 / step}, step)
        ctx.finish()

    @task
    def train() -> str:
        ray_jobs.fit([(four_steps, job)], runtime, "progress-test")
        return task_run.get_id()

    @flow
    def stage() -> str:
        return train()

    task_run_id = stage()
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["r1-zero-progress"])))
    lines = [entry.message for entry in logs if entry.message.startswith("[r1_zero] step ")]
    assert [line.split()[2] for line in lines] == [f"{s}/{STEPS}," for s in range(1, STEPS + 1)], lines
    assert all("steps/s, ETA" in line and "loss=" in line for line in lines)
    assert artifact.type == "progress" and float(artifact.data) == 100.0
    assert f"step {STEPS}/{STEPS}" in artifact.description
    # the job's loop and worker times, for bench/orchestration.py's split of a stage's time
    metrics = tracking.client_for(runtime).get_run(job.run_id).data.metrics
    assert STEPS * 0.6 <= metrics["time/loop_s"] < metrics["time/worker_s"] < 120, metrics
