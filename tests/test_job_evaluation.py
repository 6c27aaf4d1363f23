"""The held-out evaluation inside a training job (`eval.in_training_job`): rank 0 evaluates the
model it wrote before the job ends, and the stage takes that result only for that model, those
rows and those settings. A real Ray Train job on a real local Ray; no mocks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1core import checkpoint as ckpt
from r1core.config import CONFIG_DIR, RuntimeConfig, TrainComputeConfig, load_config
from r1core.modeling import build_model
from r1core.problems import generate_split, read_rows, write_rows
from tasks.evaluate import evaluate_locally, evaluate_written_model, job_evaluation
from tasks.jobs import HeldoutEvaluation, TrainJob

TIMES = ("compute_s", "wall_s")  # how long it took: the only numbers allowed to differ


@pytest.fixture
def setting(tmp_path, tokenizer):
    """The micro profile, its held-out rows on disk, and a model written as a stage writes one."""
    cfg = load_config(CONFIG_DIR / "micro.yaml", [f"runtime.workdir={tmp_path}", "eval.num_prompts=6"])
    _, heldout = generate_split(cfg.data)
    heldout_file = str(write_rows(heldout, tmp_path / "heldout.jsonl"))
    evaluation = HeldoutEvaluation(heldout_file=heldout_file, eval=cfg.eval, code=cfg.code,
                                   batch_size=cfg.rollout.batch_size, output_dir=str(tmp_path / "stage" / "heldout_eval"))
    model_dir = tmp_path / "stage" / "model"
    write_model(model_dir, cfg, tokenizer, seed=0)
    return cfg, evaluation, str(model_dir)


def write_model(path: Path, cfg, tokenizer, seed: int) -> None:
    def save(d: Path) -> None:
        build_model(cfg.model, tokenizer, seed=seed).save_pretrained(d)
        tokenizer.save_pretrained(d)

    ckpt.write_atomically(path, save)


def without_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMES}


def test_a_job_evaluates_its_written_model_as_a_separate_evaluation_would(setting, tmp_path):
    """The whole path: a Ray Train job writes its model and evaluates it on rank 0; the stage
    reads the same metrics and per-prompt scores an evaluation after the job computes."""
    import torch

    from tasks import ray_jobs

    cfg, evaluation, model_dir = setting
    output_dir = str(tmp_path / "trained" / "model")
    evaluation = evaluation.model_copy(update={"output_dir": str(tmp_path / "trained" / "heldout_eval")})
    runtime = RuntimeConfig(workdir=str(tmp_path), num_cpus=2)
    job = TrainJob(stage="r1_zero", tracking_uri="", run_id="", tracking_outage_s=30,
                   checkpoint_dir=str(tmp_path / "ckpt"), output_dir=output_dir,
                   compute=TrainComputeConfig(cpus_per_worker=2), seed=0, evaluation=evaluation)

    def write_and_evaluate(config: dict) -> None:  # a training loop without its steps
        from r1core.modeling import load_pretrained
        from r1core.training import TrainContext

        job = TrainJob.model_validate(config["job"])
        torch.set_num_threads(job.compute.cpus_per_worker)
        model, tokenizer = load_pretrained(config["init_model"])
        ray_jobs.write_final_model(TrainContext(job.checkpoint_dir), model, tokenizer, job.output_dir, job.evaluation)

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray_jobs.ensure_ray(runtime)
    TorchTrainer(write_and_evaluate, train_loop_config={"job": job.model_dump(mode="json"), "init_model": model_dir},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                 run_config=RunConfig(name="job-evaluation-test", storage_path=str(tmp_path / "ray"))).fit()

    found = job_evaluation(output_dir, evaluation)
    assert found is not None, "the job's evaluation was not found or not accepted"
    metrics, per_prompt = found
    again, again_per_prompt = evaluate_locally(output_dir, read_rows(evaluation.heldout_file), cfg.eval,
                                               cfg.rollout.batch_size, threads=2, code=cfg.code, per_prompt=True)
    assert without_times(metrics) == without_times(again)
    assert per_prompt == json.loads(json.dumps(again_per_prompt))
    assert metrics["num_prompts"] == 6 and 0 < metrics["compute_s"] <= metrics["wall_s"]


def test_an_evaluation_is_taken_only_for_the_model_rows_and_settings_it_measured(setting, tmp_path, tokenizer):
    cfg, evaluation, model_dir = setting
    evaluate_written_model(model_dir, evaluation)
    assert job_evaluation(model_dir, evaluation) is not None

    other_rows = tmp_path / "other.jsonl"
    other_rows.write_bytes(Path(evaluation.heldout_file).read_bytes())
    changed = {
        "other rows file": evaluation.model_copy(update={"heldout_file": str(other_rows)}),
        "other k": evaluation.model_copy(update={"eval": cfg.eval.model_copy(update={"k": cfg.eval.k + 1})}),
        "other prompts": evaluation.model_copy(update={"eval": cfg.eval.model_copy(update={"num_prompts": 5})}),
        "other sampling": evaluation.model_copy(update={"eval": cfg.eval.model_copy(update={
            "sampling": cfg.eval.sampling.model_copy(update={"temperature": 0.9})})}),
    }
    for why, other in changed.items():
        assert job_evaluation(model_dir, other) is None, why

    write_model(Path(model_dir), cfg, tokenizer, seed=0)  # the same weights written again: still valid
    assert job_evaluation(model_dir, evaluation) is not None
    write_model(Path(model_dir), cfg, tokenizer, seed=1)  # another model in the stage's folder
    assert job_evaluation(model_dir, evaluation) is None


@pytest.mark.parametrize("damage", ["metrics edited", "per-prompt truncated", "manifest gone", "not complete",
                                    "model not complete", "nothing written"])
def test_a_damaged_or_missing_evaluation_is_not_taken(setting, damage):
    """The stage evaluates again (a Ray task) rather than report numbers it cannot trust."""
    _, evaluation, model_dir = setting
    out = Path(evaluation.output_dir)
    if damage != "nothing written":
        evaluate_written_model(model_dir, evaluation)
    if damage == "metrics edited":
        metrics = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(json.dumps({**metrics, "pass@1": 1.0}))
    elif damage == "per-prompt truncated":
        (out / "per_prompt.json").write_bytes((out / "per_prompt.json").read_bytes()[:10])
    elif damage == "manifest gone":
        (out / ckpt.MANIFEST).unlink()
    elif damage == "not complete":
        (out / ckpt.COMPLETE).unlink()
    elif damage == "model not complete":
        (Path(model_dir) / ckpt.COMPLETE).unlink()
    assert job_evaluation(model_dir, evaluation) is None


def test_the_stage_takes_its_jobs_evaluation_and_evaluates_on_ray_without_one(setting, tokenizer, prefect_harness):
    """`evaluate_stage` on a real MLflow run: without an evaluation from the job it runs one as
    a Ray task; with one written for the model it takes it (`eval/in_job`); the numbers agree."""
    import torch
    from mlflow import MlflowClient
    from prefect import flow

    from tasks import tracking
    from tasks.training_stages import StageResult, evaluate_stage, heldout_evaluation

    cfg, evaluation, _ = setting
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"num_cpus": 2})})
    torch.set_num_threads(2)  # as the Ray task's
    stage_evaluation = heldout_evaluation(cfg, "r1_zero", evaluation.heldout_file)
    model_dir = str(Path(stage_evaluation.output_dir).parent / "model")
    write_model(Path(model_dir), cfg, tokenizer, seed=0)

    @flow
    def evaluate(run_id: str):
        stage = StageResult(stage="r1_zero", model_dir=model_dir, mlflow_run_id=run_id, seconds=0.0)
        return evaluate_stage(cfg, stage, evaluation.heldout_file)

    on_ray_run, in_job_run = (tracking.start_run(cfg.runtime, f"r1_zero-{i}") for i in range(2))
    on_ray, _ = evaluate(on_ray_run)
    assert "in_job" not in on_ray and on_ray["wall_s"] > on_ray["compute_s"] > 0
    evaluate_written_model(model_dir, stage_evaluation)
    in_job, per_prompt = evaluate(in_job_run)
    assert in_job["in_job"] == 1.0
    assert {k: v for k, v in without_times(in_job).items() if k != "in_job"} == without_times(on_ray)
    logged = MlflowClient(tracking.tracking_uri(cfg.runtime)).get_run(in_job_run).data.metrics
    assert logged["eval/in_job"] == 1.0 and logged["eval/pass_at_1"] == on_ray["pass@1"]
    assert per_prompt == json.loads((Path(stage_evaluation.output_dir) / "per_prompt.json").read_text())


def test_an_evaluation_that_fails_in_the_job_leaves_the_model_and_no_result(setting, tmp_path, caplog):
    """The trained model is not lost to its evaluation: the job ends, the model is written, and
    the stage (finding no result) evaluates it as a Ray task, which reports the error itself."""
    from r1core.modeling import load_pretrained
    from r1core.training import TrainContext
    from tasks import ray_jobs

    _, evaluation, model_dir = setting
    model, tokenizer = load_pretrained(model_dir)
    broken = evaluation.model_copy(update={"heldout_file": str(tmp_path / "gone.jsonl"),
                                           "output_dir": str(tmp_path / "trained" / "heldout_eval")})
    output_dir = tmp_path / "trained" / "model"
    with caplog.at_level("WARNING", logger="r1.train"):
        ray_jobs.write_final_model(TrainContext(str(tmp_path / "ckpt")), model, tokenizer, str(output_dir), broken)
    assert ckpt.is_complete(output_dir) and ckpt.verify(output_dir) is None
    assert job_evaluation(str(output_dir), broken) is None
    assert "held-out evaluation in the job failed" in caplog.text and "gone.jsonl" in caplog.text
