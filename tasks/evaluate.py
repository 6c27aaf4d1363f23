"""Evaluation jobs: a model directory (or `models:/` URI) on held-out rows, as a Ray task."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray

from r1core import checkpoint as ckpt
from r1core.config import CodeRewardConfig, EvalConfig, PipelineConfig
from tasks.jobs import HeldoutEvaluation
from tasks.ray_jobs import ensure_ray

REGISTRY_FILE = "registry.json"  # next to a model downloaded from the registry: which version it is


def resolve_model(model: str, cfg: PipelineConfig | None = None) -> str:
    """A local HF directory, or an MLflow `models:/name@alias` / `runs:/` URI downloaded locally."""
    if model.startswith(("models:/", "runs:/")):
        import tempfile

        from mlflow import MlflowClient

        from tasks.tracking import client_for

        # resolved with this configuration's store explicitly: mlflow.set_tracking_uri would export
        # MLFLOW_TRACKING_URI and override every later configuration in this process
        client = client_for(cfg.runtime) if cfg is not None else MlflowClient()
        source = model
        if model.startswith("models:/"):
            ref = model[len("models:/"):]
            name, alias = ref.split("@", 1) if "@" in ref else (ref, None)
            version = client.get_model_version_by_alias(name, alias) if alias else \
                client.get_model_version(*name.split("/", 1))
            source = version.source
        import mlflow.artifacts

        # a version's source: its LoggedModel's artifact location or, registered before, runs:/<run>/model
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="r1-model-"),
                                                         tracking_uri=client.tracking_uri))
        candidates = [p.parent for p in local.rglob("config.json")]
        if not candidates:
            raise FileNotFoundError(f"{model}: no HF model (config.json) in its artifacts")
        if model.startswith("models:/"):  # the lineage of what trains from it names the version
            (candidates[0].parent / REGISTRY_FILE).write_text(json.dumps({"registered": f"{name}/{version.version}"}))
        return str(candidates[0])
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"model '{model}': not an HF model directory nor a models:/ URI")
    return model


def evaluate_locally(model_dir: str, rows: list[dict], eval_cfg: EvalConfig, batch_size: int = 256,
                     threads: int | None = None, code: CodeRewardConfig | None = None, per_prompt: bool = False):
    """The metrics (and with `per_prompt` each row's scores, as `r1core.evaluation.evaluate`)."""
    import torch

    from r1core import code_rewards
    from r1core.engine import TorchEngine
    from r1core.evaluation import evaluate_heldout
    from r1core.modeling import load_pretrained

    if threads:
        torch.set_num_threads(threads)
    code_rewards.configure(code)
    model, tokenizer = load_pretrained(model_dir)
    t0 = time.perf_counter()
    out = evaluate_heldout(TorchEngine(model, tokenizer, batch_size), rows, eval_cfg, per_prompt)
    (out[0] if per_prompt else out)["compute_s"] = time.perf_counter() - t0  # sampling and scoring, model loaded
    return out


def evaluate_written_model(model_dir: str, evaluation: HeldoutEvaluation) -> None:
    """A training job's last act (rank 0, `eval.in_training_job`): the held-out evaluation of the
    model it wrote, saved atomically with what it measured (the rows file, the settings, the
    model's fingerprint) so that the stage takes it only for that model and those settings."""
    from r1core.problems import read_rows

    t0 = time.perf_counter()
    metrics, per_prompt = evaluate_locally(model_dir, read_rows(evaluation.heldout_file), evaluation.eval,
                                           evaluation.batch_size, code=evaluation.code, per_prompt=True)
    metrics["wall_s"] = time.perf_counter() - t0  # with the model's load; no task to start

    def write(d: Path) -> None:
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "per_prompt.json").write_text(json.dumps(per_prompt))

    ckpt.write_atomically(Path(evaluation.output_dir), write, meta=_measured_on(model_dir, evaluation))


def _measured_on(model_dir: str, evaluation: HeldoutEvaluation) -> dict:
    return {"model": ckpt.fingerprint(Path(model_dir)), "heldout_file": str(Path(evaluation.heldout_file).resolve()),
            "eval": evaluation.eval.model_dump(mode="json")}


def job_evaluation(model_dir: str, evaluation: HeldoutEvaluation) -> tuple[dict[str, float], dict] | None:
    """The evaluation a training job wrote (`evaluate_written_model`), when it is complete and
    measured this model on these rows with these settings; else None (evaluate again)."""
    out = Path(evaluation.output_dir)
    if not (ckpt.is_complete(out) and ckpt.is_complete(Path(model_dir))) or ckpt.verify(out) is not None:
        return None
    if ckpt.read_meta(out) != _measured_on(model_dir, evaluation):
        return None
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "per_prompt.json").read_text())


@ray.remote
def _evaluate_remote(model_dir: str, rows: list[dict], eval_cfg: dict, batch_size: int, threads: int, code: dict):
    return evaluate_locally(model_dir, rows, EvalConfig.model_validate(eval_cfg), batch_size, threads,
                            CodeRewardConfig.model_validate(code), per_prompt=True)


def evaluate_on_ray(cfg: PipelineConfig, model_dir: str, heldout_file: str) -> tuple[dict[str, float], dict]:
    """The held-out metrics and each prompt's scores (for paired comparisons between models)."""
    from r1core.problems import read_rows

    ensure_ray(cfg.runtime)
    threads = cfg.runtime.num_cpus or os.cpu_count() or 1
    rows = read_rows(heldout_file)
    ref = _evaluate_remote.options(num_cpus=threads).remote(
        model_dir, rows, cfg.eval.model_dump(), cfg.rollout.batch_size, threads, cfg.code.model_dump())
    return ray.get(ref)
