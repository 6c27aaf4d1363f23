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
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from r1core.config import PROJECT_ROOT, RuntimeConfig

PARENT_TAG = "mlflow.parentRunId"
OWNER_TAG = "r1.owner"  # {"host", "pid", "pid_start", "started"} of the process that has the run open
HEARTBEAT_TAG = "r1.heartbeat"  # unix seconds, refreshed every HEARTBEAT_S while the run is open
END_REASON_TAG = "r1.end_reason"  # why a run was closed by someone other than its owner
REOPENED_TAG = "r1.reopened"  # how many times a re-run continued this run
HEARTBEAT_S = 30
STALE_AFTER_S = 5 * HEARTBEAT_S  # an owner on another host without a heartbeat for this long is gone
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
              parent_run_id: str | None = None, description: str | None = None, continue_run: bool = False) -> str:
    """A new MLflow run owned by this process, or with `continue_run` the newest unfinished run of
    the same name and `tags` (an interrupted earlier attempt at the same work), reopened so that
    its curves go on where they stopped."""
    client = client_for(runtime)
    if continue_run and (earlier := unfinished_run(runtime, name, tags or {})) is not None:
        client.update_run(earlier.info.run_id, status="RUNNING")
        reopened = int(earlier.data.tags.get(REOPENED_TAG, "0")) + 1
        set_tags(client, earlier.info.run_id, {**_ownership(), REOPENED_TAG: reopened,
                                               **({PARENT_TAG: parent_run_id} if parent_run_id else {})})
        _open_runs[earlier.info.run_id] = client
        return earlier.info.run_id
    all_tags = {"git_commit": git_commit(), **(tags or {}), **_ownership()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if description:
        all_tags["mlflow.note.content"] = description
    run = client.create_run(experiment_id(runtime), run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    if params:
        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
    _open_runs[run.info.run_id] = client
    return run.info.run_id


def unfinished_run(runtime: RuntimeConfig, name: str, tags: dict):
    """The newest run of `name` with all of `tags` that did not finish and whose owner is gone."""
    from tasks.lifecycle import owner_alive

    query = " and ".join([f"attributes.run_name = '{name}'", "attributes.status != 'FINISHED'",
                          *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    for run in client_for(runtime).search_runs([experiment_id(runtime)], query, order_by=["attributes.start_time DESC"],
                                               max_results=5):
        if run.info.status != "RUNNING" or _owner_gone(run, owner_alive):
            return run
    return None


def _ownership() -> dict[str, str]:
    from tasks.lifecycle import owner

    _start_heartbeat()
    return {OWNER_TAG: json.dumps(owner()), HEARTBEAT_TAG: str(int(time.time()))}


def _owner_gone(run, owner_alive) -> bool:
    try:
        who = json.loads(run.data.tags[OWNER_TAG])
    except (KeyError, ValueError):
        return False  # a run from before owners were recorded: not ours to judge
    alive = owner_alive(who)
    if alive is None:  # another host: its heartbeat says
        return time.time() - float(run.data.tags.get(HEARTBEAT_TAG, 0)) > STALE_AFTER_S
    return not alive


def reconcile_stale_runs(runtime: RuntimeConfig) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owner is gone (a driver killed by
    SIGKILL, a lost host), ending at its last heartbeat, with a tag saying why. Returns their ids."""
    from tasks.lifecycle import owner, owner_alive

    client = client_for(runtime)
    me = owner()
    closed = []
    for run in client.search_runs([experiment_id(runtime)], "attributes.status = 'RUNNING'", max_results=1000):
        if not _owner_gone(run, owner_alive):
            continue
        who = json.loads(run.data.tags[OWNER_TAG])
        last = int(float(run.data.tags.get(HEARTBEAT_TAG, time.time())) * 1000)
        set_tags(client, run.info.run_id, {END_REASON_TAG: f"owner pid {who.get('pid')} on {who.get('host')} ended "
                                           f"without closing the run; closed by pid {me['pid']} at {me['started']}"})
        client.set_terminated(run.info.run_id, status="KILLED", end_time=max(last, run.info.start_time))
        closed.append(run.info.run_id)
    return closed


_open_runs: dict[str, MlflowClient] = {}  # run id -> its client, while this process has the run open


@functools.cache
def _start_heartbeat() -> None:
    """A daemon thread (one per process) refreshing the heartbeat tag of this process's open runs."""

    def beat():
        while True:
            time.sleep(HEARTBEAT_S)
            for run_id, client in list(_open_runs.items()):
                with contextlib.suppress(Exception):  # a tracking outage: the next beat retries
                    client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))

    threading.Thread(target=beat, name="r1-mlflow-heartbeat", daemon=True).start()


def monitor_system(runtime: RuntimeConfig, run_id: str):
    """MLflow's system metrics (`system/...`: CPU, memory, disk, network, and GPU where NVML finds
    one) of this host on `run_id` every 5 s, until `.finish()` (which flushes them) or the run
    ends; a continued run's points go on from its last step."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=True,
                                   tracking_uri=tracking_uri(runtime))
    monitor.start()
    return monitor


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int | None = None):
    now = int(time.time() * 1000)
    items = [Metric(k.replace("@", "_at_"), float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable for longer than `runtime.tracking_outage_s`."""


class BufferedTracking:
    """What a training job sends to its MLflow run, in order, surviving a tracking outage: a call
    that fails stays queued (metrics, then artifact uploads) and is retried with exponential
    backoff on the next call and at `close`, while training goes on. An outage longer than
    `outage_s` raises `TrackingUnavailable` naming the URI. The client does not retry by itself
    here (MLflow's own HTTP retries would block a training step for minutes)."""

    def __init__(self, uri: str, run_id: str, outage_s: float):
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        self.client, self.uri, self.run_id, self.outage_s = MlflowClient(uri), uri, run_id, outage_s
        self.pending: list[tuple[str, object]] = []  # ("metrics", [Metric]) | ("artifacts", (local, path))
        self.failing_since: float | None = None
        self.backoff_s, self.next_try = 1.0, 0.0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        if items:
            self.pending.append(("metrics", items))
        self.flush()

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.pending.append(("artifacts", (local_dir, artifact_path)))
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what is queued; `wait`: keep retrying (with backoff) until sent or out of budget."""
        while self.pending:
            if time.time() < self.next_try:
                if not wait:
                    return
                time.sleep(max(0.0, self.next_try - time.time()))
            kind, item = self.pending[0]
            try:
                if kind == "metrics":
                    for i in range(0, len(item), 1000):
                        self.client.log_batch(self.run_id, metrics=item[i : i + 1000])
                else:
                    self.client.log_artifacts(self.run_id, *item)
            except Exception as e:  # the server down or restarting: any error of the client
                now = time.time()
                self.failing_since = self.failing_since or now
                if now - self.failing_since > self.outage_s:
                    raise TrackingUnavailable(
                        f"MLflow tracking at {self.uri} unreachable for {now - self.failing_since:.0f} s, longer than "
                        f"runtime.tracking_outage_s = {self.outage_s:g} ({type(e).__name__}: {str(e)[:200]})") from e
                self.next_try, self.backoff_s = now + self.backoff_s, min(2 * self.backoff_s, 30.0)
                continue
            self.pending.pop(0)
            self.failing_since, self.backoff_s, self.next_try = None, 1.0, 0.0

    def close(self) -> None:
        self.flush(wait=True)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]):
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(runtime: RuntimeConfig, run_id: str, status: str = "FINISHED"):
    _open_runs.pop(run_id, None)
    client_for(runtime).set_terminated(run_id, status=status)


GENERATION_PARAMS = {"max_new_tokens": 256, "do_sample": False, "temperature": 1.0}  # what a request may set


def save_mlflow_model(model_dir: Path, dest: Path) -> None:
    """`model_dir` (an HF directory) as an MLflow Model at `dest`: the `transformers` flavor
    (text generation; text classification for a reward model), its tokenizer and chat template,
    a signature with the generation parameters a request may set, an input example and the pip
    requirements of a serving environment. `dest/model/` stays the whole HF directory (the
    tokenizer copied in), so that transformers and vLLM load it directly.

    Built from a pipeline in memory: MLflow 3.17's save from a checkpoint path fails on
    transformers 5 (its task registry holds class names, not classes)."""
    import shutil
    from importlib.metadata import version

    import mlflow.transformers
    import transformers
    from mlflow.models import infer_signature

    architecture = (json.loads((model_dir / "config.json").read_text()).get("architectures") or [""])[0]
    classifier = architecture.endswith("ForSequenceClassification")
    task = "text-classification" if classifier else "text-generation"
    pipe = transformers.pipeline(task, model=str(model_dir), tokenizer=str(model_dir), device="cpu")
    example = ["Compute 17 + 25. Think step by step, then give the answer."]
    signature = (infer_signature(example, [{"label": "LABEL_0", "score": 0.5}]) if classifier else
                 infer_signature(example, ["…"], params=GENERATION_PARAMS))
    mlflow.transformers.save_model(
        pipe, path=str(dest), task=task, signature=signature, input_example=example,
        pip_requirements=[f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "tokenizers",
                                                                          "accelerate")])
    for f in model_dir.iterdir():
        if f.is_file() and not (dest / "model" / f.name).exists():
            shutil.copy2(f, dest / "model" / f.name)


def register_model(runtime: RuntimeConfig, run_id: str, model_dir: Path, name: str,
                   tags: dict | None = None, description: str | None = None) -> str:
    """Log an HF model directory as an MLflow Model (`save_mlflow_model`) in a LoggedModel of the
    run's experiment (MLflow 3: its own page, linked to the run as the run's output), register
    it as a new version of `name` and point the alias `newest` at it. Returns the version.
    Idempotent (so that the task may be retried): a version of `name` from this run already
    registered is reused."""
    import tempfile

    from mlflow.entities import LoggedModelOutput

    client = client_for(runtime)
    with contextlib.suppress(MlflowException):  # already registered
        client.create_registered_model(name)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = existing[0]
    else:
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id,
                                            model_type="transformers", tags=tags)
        try:
            with tempfile.TemporaryDirectory(prefix="r1-mlflow-model-") as tmp:
                save_mlflow_model(Path(model_dir), Path(tmp) / "model")
                client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
        except BaseException:
            with contextlib.suppress(Exception):
                client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        # the source is the model's storage location: MLflow's registry links a version to its
        # LoggedModel only through a models:/<id> source, which it resolves through the
        # process-wide tracking URI (this project never sets it: one process serves many stores).
        # model_id lets a tracking server accept a source outside the run's artifacts; the
        # stores keep no model_id for such a source, so a tag names the LoggedModel.
        version = client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                              tags={**tags, "logged_model_id": logged.model_id},
                                              description=description, model_id=logged.model_id)
    client.set_registered_model_alias(name, NEWEST_ALIAS, version.version)
    return str(version.version)


LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # what `make ui` starts on a local store by default
MLFLOW_UI_ENV = "R1_MLFLOW_UI_URL"  # set by `r1 ui` for the runs it serves


# MLflow 3's UI opens every experiment in its GenAI views (traces, an assistant) unless the link
# asks for model training: the choice is a URL parameter or the browser's stored toggle, which
# starts at GenAI whatever the experiment's kind tag says
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(runtime: RuntimeConfig, path: str = "runs") -> str:
    """A page of the experiment in the MLflow UI, in its model-training views: the tracking
    server's own UI, or `r1 ui`'s for a local store."""
    uri = tracking_uri(runtime)
    base = uri if uri.startswith(("http://", "https://")) else os.environ.get(MLFLOW_UI_ENV, LOCAL_MLFLOW_UI)
    return f"{base.rstrip('/')}/#/experiments/{experiment_id(runtime)}/{path}?{MODEL_TRAINING_VIEW}"


def run_url(runtime: RuntimeConfig, run_id: str) -> str:
    """The run's page in the MLflow UI (`experiment_url`)."""
    return experiment_url(runtime, f"runs/{run_id}")


# title -> the metrics it plots: the first key (drawn bold) and every key under the other prefixes
CURVE_PANELS = (("reward", ("reward",)), ("accuracy", ("reward/accuracy", "accuracy_by_task")),
                ("response length (tokens)", ("response_length",)),
                ("reflection (share of completions)", ("reflection_rate",)), ("loss", ("loss",)))
HEADLINE_CURVES = {prefixes[0] for _, prefixes in CURVE_PANELS}


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
    for title, prefixes in CURVE_PANELS:
        series = {}
        for key in sorted(k for k in keys if k in prefixes or k.startswith(tuple(p + "/" for p in prefixes))):
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
            ax.plot(*zip(*history, strict=True), label=key, linewidth=2.2 if key in HEADLINE_CURVES else 1.0)
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
