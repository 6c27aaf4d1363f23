"""The human review of cold-start data through a real local Prefect server: the flow pauses,
the form (schema + description) is read back and the review submitted through Prefect's REST
API exactly as the UI's form does (`POST /flow_runs/{id}/resume` with `run_input`); the
decisions end up in the dataset and in MLflow. A second run is left unreviewed and goes on
after its timeout."""
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from r1core.config import CONFIG_DIR, PROJECT_ROOT, load_config

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, free_port):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(api + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("local Prefect server did not become healthy in 120 s")
    yield api, home
    server.terminate()
    server.wait(timeout=30)


def _overrides(workdir, seed_file, timeout_s):
    return [f"runtime.workdir={workdir}", "cold_start.routes={}", f"cold_start.seed_file={seed_file}",
            "cold_start.review.enabled=true", "cold_start.review.sample_size=6", f"cold_start.review.timeout_s={timeout_s}"]


@pytest.fixture
def make_config(write_seed_examples):
    def make(workdir, timeout_s):
        """The micro profile with review on over a seed file of our own (written once the
        config gives the train rows) and no generation routes."""
        seed_file = workdir / "seed.jsonl"
        seed_file.touch()
        cfg = load_config(CONFIG_DIR / "micro.yaml", _overrides(workdir, seed_file, timeout_s))
        return cfg, write_seed_examples(cfg.data, seed_file)

    return make


def _start_flow(api, home, cfg):
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    sets = [a for o in _overrides(cfg.runtime.workdir, cfg.cold_start.seed_file, cfg.cold_start.review.timeout_s)
            for a in ("--set", o)]
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "stage", "cold_start_data", "--config", str(CONFIG_DIR / "micro.yaml"),
         *sets], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _paused_run(api, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flow exited before pausing:\n{proc.stdout.read()[-3000:]}")
        runs = httpx.post(api + "/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}},
                          timeout=10).json()
        if runs:
            return runs[0]
        time.sleep(1)
    proc.kill()
    pytest.fail("flow run never paused for review")


def _mlflow_run(cfg):
    from mlflow import MlflowClient

    from tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg.runtime))
    exp = client.get_experiment_by_name(cfg.runtime.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'cold_start_data'")
    return client, run


def test_review_in_the_prefect_ui_decides_what_is_trained_on(prefect_server, make_config, tmp_path):
    api, home = prefect_server
    cfg, seeds = make_config(tmp_path, timeout_s=600)
    proc = _start_flow(api, home, cfg)
    run = _paused_run(api, proc)

    # what the UI shows: the form's schema and its description with the examples
    key = "paused-cold-start-review"
    schema = httpx.get(f"{api}/flow_runs/{run['id']}/input/{key}-schema", timeout=10).json()
    assert {"decisions"} <= set(schema["properties"])
    description = httpx.get(f"{api}/flow_runs/{run['id']}/input/{key}-description", timeout=10).json()
    shown = [s["id"] for s in seeds[:6] if s["id"] in description]
    assert len(shown) == 6  # the six valid examples; the mixed and the wrong one were filtered out
    assert seeds[6]["id"] not in description and seeds[7]["id"] not in description

    rejected = shown[0]
    run_input = {"decisions": [{"id": i, "approve": i != rejected, "reason": "too terse" if i == rejected else ""}
                               for i in shown]}
    resp = httpx.post(f"{api}/flow_runs/{run['id']}/resume", json={"run_input": run_input}, timeout=10)
    assert resp.status_code in (200, 201) and resp.json()["status"] == "ACCEPT", resp.text
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]

    dataset = cfg.run_dir() / "cold_start_data" / "dataset"
    kept = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in kept) == sorted(set(shown) - {rejected})
    assert all(e["review"] == "approved" for e in kept)
    review = json.loads((dataset / "review.json").read_text())
    assert {"id": rejected, "approve": False, "reason": "too terse"} in review

    client, mlrun = _mlflow_run(cfg)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["review/rejected"] == 1 and mlrun.data.metrics["review/approved"] == 5
    assert mlrun.data.metrics["examples"] == 5 and mlrun.data.metrics["seed_file/rejected_language_mixing"] == 1
    assert mlrun.data.metrics["seed_file/rejected_unverified"] == 1
    assert "cold_start_data/review.json" in [a.path for a in client.list_artifacts(mlrun.info.run_id, "cold_start_data")]
    assert [d.dataset.name for d in mlrun.inputs.dataset_inputs] == ["train"]


def test_unreviewed_run_goes_on_after_the_timeout(prefect_server, make_config, tmp_path):
    api, home = prefect_server
    cfg, _ = make_config(tmp_path, timeout_s=3)
    proc = _start_flow(api, home, cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    kept = (cfg.run_dir() / "cold_start_data" / "dataset" / "train.jsonl").read_text().splitlines()
    assert len(kept) == 6 and all(json.loads(line)["review"] == "unreviewed" for line in kept)
    logged = out + "".join(f.read_text(errors="replace") for f in cfg.run_dir().glob("logs/driver-*.log"))
    assert "no review within 3 s" in logged  # in the run's full log (`r1 run` keeps the console quiet)
