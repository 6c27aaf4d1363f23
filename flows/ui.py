"""`r1 ui` (`make ui`): on 127.0.0.1 only, a Prefect server, an MLflow tracking server with the
model registry, and `r1 serve` running the deployments, on the stores `make demo` uses
(<workdir>/prefect, <workdir>/mlflow.db). Ctrl-C, SIGTERM or `r1 ui --stop` stops all three.

With `--artifacts-destination DIR` the MLflow server keeps artifacts itself (proxied uploads
over HTTP, as a remote server with an object store would) and the deployments log to it
through MLFLOW_TRACKING_URI; otherwise they write the local store directly, like `make demo`.
RAY_ADDRESS, when set, is passed on: flow runs then train on that Ray cluster."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from r1core.config import PROJECT_ROOT, PipelineConfig

HOST = "127.0.0.1"


def pid_file(workdir: str) -> Path:
    return Path(workdir).resolve() / "ui.json"


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # its own session: a terminal's Ctrl-C reaches only this launcher, which stops each group in order
    return subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):  # the serve process first, then the servers it talks to
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run(cfg: PipelineConfig, config_args: list[str], prefect_port: int = 4200, mlflow_port: int = 5000,
        artifacts_destination: str | None = None) -> int:
    from tasks.tracking import MLFLOW_UI_ENV, tracking_uri

    workdir = Path(cfg.runtime.workdir).resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(workdir / "prefect")),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    store = tracking_uri(cfg.runtime)
    mlflow_args = [str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
                   "--backend-store-uri", store]
    if artifacts_destination:
        mlflow_args += ["--artifacts-destination", str(Path(artifacts_destination).resolve()), "--serve-artifacts"]
    else:
        mlflow_args += ["--default-artifact-root", (workdir / "mlartifacts").as_uri()]
    procs: list[subprocess.Popen] = []

    def stop(signum=None, frame=None):
        _stop(procs)
        pid_file(str(workdir)).unlink(missing_ok=True)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        procs.append(_start([str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
                            logs / "prefect-server.log", {**env, "PREFECT_UI_API_URL": f"{prefect_url}/api"}))
        procs.append(_start(mlflow_args, logs / "mlflow-server.log", env))
        wait_healthy(f"{prefect_url}/api/health", 180, procs[0])
        wait_healthy(f"{mlflow_url}/health", 180, procs[1])
        serve_env = {**env, "PREFECT_API_URL": f"{prefect_url}/api", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                     MLFLOW_UI_ENV: mlflow_url}
        if artifacts_destination:
            serve_env["MLFLOW_TRACKING_URI"] = mlflow_url
        procs.append(_start([sys.executable, "-m", "flows.cli", "serve", *config_args], logs / "serve.log", serve_env))
        pid_file(str(workdir)).write_text(json.dumps({"launcher": os.getpid(), "prefect": prefect_url,
                                                      "mlflow": mlflow_url}))
        print(f"Prefect UI: {prefect_url}   (deployments served by `r1 serve`; log: {logs / 'serve.log'})")
        print(f"MLflow UI:  {mlflow_url}   (store: {store}; its experiments in the model-training views: "
              f"{mlflow_url}/#/experiments?workflowType=machine_learning)")
        if os.environ.get("RAY_ADDRESS"):
            print(f"Ray:        {os.environ['RAY_ADDRESS']} (flow runs train there)")
        print("Stop all with Ctrl-C or `make ui-stop`.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        dead = next(p for p in procs if p.poll() is not None)
        print(f"r1 ui: {dead.args[0]} {dead.args[1]} exited with {dead.returncode}; stopping the rest "
              f"(logs in {logs})", file=sys.stderr)
        return 1
    finally:
        _stop(procs)
        pid_file(str(workdir)).unlink(missing_ok=True)


def stop_running(workdir: str) -> int:
    path = pid_file(workdir)
    if not path.is_file():
        print("no UI running")
        return 0
    pid = json.loads(path.read_text())["launcher"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        print("no UI running (stale pid file removed)")
        return 0
    for _ in range(60):
        if not path.exists():
            break
        time.sleep(0.5)
    print("stopped")
    return 0
