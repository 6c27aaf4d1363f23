"""A Ray Train job of several parts (`ray_jobs.fit` with several `(loop, job)`): a stage that
trains several models on one worker-group shape (a student's base, SFT and RL) pays Ray Train's
start-up once. Each part keeps its own MLflow run, checkpoints and model; a restarted job does
not train a written part again, and a part never resumes from another part's checkpoint. A real
local Ray and a real MLflow store; no mocks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1core import checkpoint as ckpt
from r1core.config import RuntimeConfig, TrainComputeConfig
from tasks import ray_jobs, tracking
from tasks.jobs import TrainJob

STEPS = 4  # each part's steps; a checkpoint after steps 2 and 4


def counting_part():
    """The loop of every part below (defined here: Ray pickles it by value, not by this test
    module's name, which its workers cannot import)."""

    def counting_part(config: dict) -> None:
        """A training loop reduced to what a job of parts must keep apart: each part resumes from its
        own newest checkpoint, logs its steps to its own run and writes its own model. The part named
        `fails` raises once at its first step, before it has any checkpoint of its own: its restart
        finds only the earlier part's checkpoint in Ray Train's storage."""
        import torch

        from r1core.training import resume, save_checkpoint

        job, ctx = ray_jobs.worker_setup(config, TrainJob)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        start = resume(ctx, model, optimizer, scheduler)
        marks = Path(job.output_dir).parent / "starts.jsonl"
        marks.parent.mkdir(parents=True, exist_ok=True)
        with marks.open("a") as f:
            f.write(json.dumps({"stage": job.stage, "start": start}) + "\n")
        ctx.begin(start, STEPS)
        for step in range(start + 1, STEPS + 1):
            flag = Path(job.output_dir).parent / "failed_once"
            if job.stage.endswith("fails") and not flag.exists():
                flag.write_text("")
                raise RuntimeError("injected failure of the second part")
            ctx.log({"loss": 1.0 / step}, step)
            if step % 2 == 0:
                save_checkpoint(ctx, model, optimizer, scheduler, step, {"loss": 1.0 / step})
        ctx.finish()
        ckpt.write_atomically(Path(job.output_dir), lambda d: torch.save(model.state_dict(), d / "model.pt"))

    return counting_part


def _job(runtime: RuntimeConfig, tmp_path: Path, stage: str, **compute) -> TrainJob:
    return TrainJob(stage=stage, tracking_uri=tracking.tracking_uri(runtime), run_id=tracking.start_run(runtime, stage),
                    tracking_outage_s=30, checkpoint_dir=str(tmp_path / stage / "checkpoints"),
                    output_dir=str(tmp_path / stage / "model"), compute=TrainComputeConfig(**compute), seed=0)


def _starts(tmp_path: Path, stage: str) -> list[int]:
    lines = (tmp_path / stage / "starts.jsonl").read_text().splitlines()
    return [json.loads(line)["start"] for line in lines]


def test_parts_of_one_job_keep_their_runs_and_checkpoints_and_a_restart_skips_written_parts(tmp_path):
    runtime = RuntimeConfig(workdir=str(tmp_path), num_cpus=2, max_failures=1)
    first, second = _job(runtime, tmp_path, "s/first"), _job(runtime, tmp_path, "s/fails")
    ray_jobs.fit([(counting_part(), first), (counting_part(), second)], runtime, "parts-test")

    for job in (first, second):
        assert ckpt.is_complete(Path(job.output_dir)), job.stage
    # the first part ran once: the restart after the second part's failure passed over its model
    assert _starts(tmp_path, "s/first") == [0]
    # the second part's restart found the first part's step-4 checkpoint in Ray Train's storage
    # (the job's latest) and did not take it: it started again from step 0
    assert _starts(tmp_path, "s/fails") == [0, 0]
    client = tracking.client_for(runtime)
    for job in (first, second):
        steps = sorted(m.step for m in client.get_metric_history(job.run_id, "loss"))
        assert steps == list(range(1, STEPS + 1)), (job.stage, steps)  # its own run, each step once
        metrics = client.get_run(job.run_id).data.metrics
        assert 0 < metrics["time/loop_s"] < metrics["time/worker_s"], (job.stage, metrics)


def test_a_rerun_of_a_finished_job_of_parts_trains_nothing_again(tmp_path):
    runtime = RuntimeConfig(workdir=str(tmp_path), num_cpus=2)
    parts = [(counting_part(), _job(runtime, tmp_path, "r/one")), (counting_part(), _job(runtime, tmp_path, "r/two"))]
    ray_jobs.fit(parts, runtime, "rerun-test")
    written = {j.stage: (Path(j.output_dir) / "model.pt").stat().st_mtime_ns for _, j in parts}
    ray_jobs.fit(parts, runtime, "rerun-test")
    assert {j.stage: (Path(j.output_dir) / "model.pt").stat().st_mtime_ns for _, j in parts} == written
    assert _starts(tmp_path, "r/one") == [0] and _starts(tmp_path, "r/two") == [0]


@pytest.mark.parametrize("other", [{"num_workers": 2}, {"cpus_per_worker": 1}, {"use_gpu": True}])
def test_parts_of_different_worker_group_shapes_are_refused_before_any_worker_starts(tmp_path, other):
    runtime = RuntimeConfig(workdir=str(tmp_path), num_cpus=2)
    jobs = [TrainJob(stage=s, tracking_uri="", run_id="", tracking_outage_s=30, checkpoint_dir=str(tmp_path / s),
                     output_dir=str(tmp_path / s / "model"), compute=TrainComputeConfig(**c), seed=0)
            for s, c in (("a", {}), ("b", other))]
    with pytest.raises(ValueError, match=r"one worker-group shape.*\['a', 'b'\]"):
        ray_jobs.fit([(counting_part(), j) for j in jobs], runtime, "shapes")
    assert not (tmp_path / "ray_results").exists()
