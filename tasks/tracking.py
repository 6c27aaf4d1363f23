"""MLflow: one parent run per pipeline run, a nested run per stage, registered models.

Everything goes through `MlflowClient` with explicit run ids: Prefect runs tasks in threads
and Ray runs workers in other processes, where MLflow's fluent "active run" would collide.
The tracking URI is MLFLOW_TRACKING_URI when set (a server), else SQLite under the workdir.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from r1core.config import PROJECT_ROOT, RuntimeConfig

PARENT_TAG = "mlflow.parentRunId"
NEWEST_ALIAS = "newest"  # MLflow reserves "latest"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the MLflow UI opens training runs, not its GenAI views


def tracking_uri(runtime: RuntimeConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if runtime.mlflow_tracking_uri:
        return runtime.mlflow_tracking_uri
    workdir = Path(runtime.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir}/mlflow.db"


def artifact_location(runtime: RuntimeConfig, uri: str) -> str | None:
    """Local stores keep artifacts under the workdir; a server decides for itself."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (Path(runtime.workdir).resolve() / "mlartifacts").as_uri()
    return None


def client_for(runtime: RuntimeConfig) -> MlflowClient:
    return _client(tracking_uri(runtime))


@functools.cache
def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def experiment_id(runtime: RuntimeConfig) -> str:
    client = client_for(runtime)
    exp = client.get_experiment_by_name(runtime.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(runtime.experiment,
                                        artifact_location=artifact_location(runtime, tracking_uri(runtime)),
                                        tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(runtime.experiment).experiment_id


@functools.cache
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, check=False,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested config as MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return out


def start_run(runtime: RuntimeConfig, name: str, params: dict | None = None, tags: dict | None = None,
              parent_run_id: str | None = None, description: str | None = None) -> str:
    client = client_for(runtime)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if description:
        all_tags["mlflow.note.content"] = description
    run = client.create_run(experiment_id(runtime), run_name=name, tags=all_tags)
    if params:
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int | None = None):
    now = int(time.time() * 1000)
    items = [Metric(k.replace("@", "_at_"), float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]):
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(runtime: RuntimeConfig, run_id: str, status: str = "FINISHED"):
    client_for(runtime).set_terminated(run_id, status=status)


def register_model(runtime: RuntimeConfig, run_id: str, model_dir: Path, name: str,
                   tags: dict | None = None) -> str:
    """Log an HF model directory as the run's `model` artifact, register it as a new version of
    `name`, and point the alias `newest` at it. Returns the version. Idempotent (so that the
    task may be retried): a version of `name` from this run already registered is reused."""
    client = client_for(runtime)
    client.log_artifacts(run_id, str(model_dir), "model")
    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(name)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = existing[0] if existing else client.create_model_version(
        name, source=f"runs:/{run_id}/model", run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()})
    client.set_registered_model_alias(name, NEWEST_ALIAS, version.version)
    return str(version.version)


LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # what `make ui` starts on a local store by default
MLFLOW_UI_ENV = "R1_MLFLOW_UI_URL"  # set by `r1 ui` for the runs it serves


def run_url(runtime: RuntimeConfig, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's own, or `r1 ui`'s for a local store."""
    uri = tracking_uri(runtime)
    base = uri if uri.startswith(("http://", "https://")) else os.environ.get(MLFLOW_UI_ENV, LOCAL_MLFLOW_UI)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id(runtime)}/runs/{run_id}"


CURVE_PANELS = (("reward", "reward"), ("accuracy", "accuracy"), ("response length (tokens)", "response_length"),
                ("loss", "loss"))


def log_curves(runtime: RuntimeConfig, run_id: str) -> str | None:
    """A PNG of the run's per-step curves (reward and its parts, accuracy per task, response
    length, loss) as the run's artifact `curves/training_curves.png`; None without curves."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = client_for(runtime)
    keys = client.get_run(run_id).data.metrics
    panels = []
    for title, prefix in CURVE_PANELS:
        series = {}
        for key in sorted(k for k in keys if k == prefix or k.startswith(prefix + "/")):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if len(history) > 1:
                series[key] = history
        if series:
            panels.append((title, series))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for key, history in series.items():
            ax.plot(*zip(*history, strict=True), label=key, linewidth=2.2 if key in dict(CURVE_PANELS).values() else 1.0)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(client.get_run(run_id).info.run_name)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "training_curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        client.log_artifact(run_id, str(path), "curves")
    return "curves/training_curves.png"
