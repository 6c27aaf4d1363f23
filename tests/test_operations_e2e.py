"""Operations end to end, "as on a cluster" on this machine: a Ray cluster from `ray start` (a head
and one more node on loopback), a Prefect server, an MLflow server keeping the artifacts itself,
and `r1 serve`, all started by `r1 ui` (what `make ui` runs) and pointed at each other through
environment variables only. A headless Chromium (Debian's, driven by Playwright) starts the
pipeline from the deployment's form with a changed parameter and finds the results in both
UIs; screenshots of every step are saved (R1_TEST_ARTIFACTS, default .r1/test-artifacts/).
Then the scheduled retrain deployment retrains from the champion on new data."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from r1core.config import CONFIG_DIR, PROJECT_ROOT, load_config

pytestmark = pytest.mark.slow

RUN_NAME = "from-the-browser"
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")



def _ray(*args: str, env: dict) -> None:
    subprocess.run([str(BIN / "ray"), *args], env=env, check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, write_seed_examples, free_port):
    """Ray head + worker node, then `r1 ui` (Prefect server, MLflow server with its own artifact
    store, `r1 serve`) with RAY_ADDRESS in its environment; the micro profile as the forms'
    defaults, pretraining on 2 workers of 2 CPUs each: more than one 2-CPU node holds."""
    workdir = tmp_path_factory.mktemp("ops")
    server_artifacts = tmp_path_factory.mktemp("mlflow-server") / "artifacts"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    gcs, prefect_port, mlflow_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "PREFECT_HOME")}
    env.update(RAY_AUTH_MODE="disabled", PREFECT_HOME=str(workdir / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    _ray("start", "--head", "--port", str(gcs), "--num-cpus", "2", "--include-dashboard", "false",
         "--temp-dir", ray_tmp, "--disable-usage-stats", env=env)
    ui = None
    try:
        _ray("start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", "--disable-usage-stats", env=env)
        seed_file = workdir / "seed.jsonl"
        seed_file.touch()  # the config checks it exists; its rows need the config's data settings
        overrides = [f"runtime.workdir={workdir}", f"cold_start.seed_file={seed_file}",
                     "pretrain.compute.num_workers=2"]
        cfg = load_config(CONFIG_DIR / "micro.yaml", overrides)
        write_seed_examples(cfg.data, seed_file)
        ui = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(prefect_port), "--mlflow-port",
             str(mlflow_port), "--artifacts-destination", str(server_artifacts), "--config",
             str(CONFIG_DIR / "micro.yaml"), *(f"--set={o}" for o in overrides)],
            cwd=PROJECT_ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        _wait_for_deployment(prefect_url, ui)
        yield {"cfg": cfg, "workdir": workdir, "server_artifacts": server_artifacts, "prefect": prefect_url,
               "mlflow": mlflow_url, "ray": f"127.0.0.1:{gcs}", "env": env}
    finally:
        if ui is not None:
            ui.terminate()  # the launcher stops the serve process and both servers
            out, _ = ui.communicate(timeout=60)
            print(out[-3000:])
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_for_deployment(prefect_url: str, ui: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert ui.poll() is None, ui.stdout.read()
        try:
            found = httpx.post(f"{prefect_url}/api/deployments/filter", json={}, timeout=5).json()
            if {"r1-pipeline", "r1-retrain"} <= {d["name"] for d in found}:
                return
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(1)
    raise TimeoutError("the deployments were not served in time")


def _deployment(prefect_url: str, name: str) -> dict:
    found = httpx.post(f"{prefect_url}/api/deployments/filter",
                       json={"deployments": {"name": {"any_": [name]}}}, timeout=10).json()
    assert len(found) == 1, found
    return found[0]


def _wait_for_run(prefect_url: str, deployment_id: str, run_name: str | None = None,
                  timeout_s: float = 1200) -> dict:
    """The deployment's newest flow run (with `config.run_name`, if given), once it ended."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = httpx.post(f"{prefect_url}/api/flow_runs/filter", timeout=10, json={
            "deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_DESC"}).json()
        runs = [r for r in runs if run_name is None or r["parameters"]["config"]["run_name"] == run_name]
        if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return runs[0]
        time.sleep(3)
    raise TimeoutError(f"no finished run of deployment {deployment_id} within {timeout_s} s")


def _screenshots() -> Path:
    out = Path(os.environ.get("R1_TEST_ARTIFACTS", PROJECT_ROOT / ".r1" / "test-artifacts")) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("R1_REQUIRE_BROWSER"):
            pytest.fail("R1_REQUIRE_BROWSER is set but Debian's chromium is not installed")
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def pipeline_run(stack, browser):
    """From the Prefect UI: Deployments -> r1-pipeline -> Run -> Custom run -> the config's
    run_name set in the form -> Submit; then the run, followed to its end in the UI."""
    shots, prefect_url = _screenshots(), stack["prefect"]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{prefect_url}/deployments", wait_until="networkidle")
    page.get_by_text("r1-pipeline").first.wait_for()
    page.screenshot(path=shots / "01-prefect-deployments.png")
    page.get_by_text("r1-pipeline").first.click()
    page.get_by_role("button", name="Run", exact=True).wait_for()
    page.screenshot(path=shots / "02-prefect-r1-pipeline.png")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    page.wait_for_load_state("networkidle")
    page.get_by_text("Profile (Optional)").wait_for()
    page.screenshot(path=shots / "03-prefect-run-form.png")
    # config.run_name is `str | None` (None: profile + config hash): switch it to str and name the run
    page.get_by_role("button", name="str", exact=True).first.click()
    page.locator("textarea").nth(1).fill(RUN_NAME)
    page.screenshot(path=shots / "04-prefect-run-form-changed.png")
    page.get_by_role("button", name="Submit").click()
    deployment = _deployment(prefect_url, "r1-pipeline")
    run = _wait_for_run(prefect_url, deployment["id"], RUN_NAME)
    page.goto(f"{prefect_url}/runs/flow-run/{run['id']}", wait_until="networkidle")
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=shots / "05-prefect-flow-run-completed.png")
    page.close()
    return run


def test_browser_starts_the_pipeline_from_the_form_and_finds_it_in_both_uis(stack, browser, pipeline_run):
    assert pipeline_run["state_type"] == "COMPLETED", pipeline_run["state"]
    assert pipeline_run["parameters"]["config"]["profile"] == "micro"  # the form's defaults, one field changed
    from urllib.parse import quote

    from mlflow import MlflowClient

    shots, mlflow_url = _screenshots(), stack["mlflow"]
    experiment = MlflowClient(mlflow_url).get_experiment_by_name(stack["cfg"].runtime.experiment)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    # MLflow is a single-page app on hash routes: wait for content, not for page loads
    page.goto(f"{mlflow_url}/#/experiments", wait_until="commit")
    page.get_by_text(experiment.name).first.wait_for()
    page.screenshot(path=shots / "06-mlflow-experiments.png")
    # this pipeline run and its stage runs (every stage run is tagged with the run name)
    search = quote(f"tags.run_name = '{RUN_NAME}'")
    page.goto(f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs?searchFilter={search}", wait_until="commit")
    page.get_by_text(f"r1_pipeline/{RUN_NAME}").first.wait_for()
    page.locator("[role=gridcell] button").first.click()  # expand the parent run
    for stage in ("pretrain_base", "r1_zero", "cold_start_sft", "reasoning_rl", "sft", "general_rl"):
        page.get_by_text(stage, exact=True).first.wait_for()
    page.screenshot(path=shots / "07-mlflow-stage-runs.png")
    page.goto(f"{mlflow_url}/#/models", wait_until="commit")
    page.get_by_role("link", name="r1-distill-mini", exact=True).wait_for()
    page.keyboard.press("Escape")  # MLflow's "new registry UI" announcement, when it shows
    page.screenshot(path=shots / "08-mlflow-registered-models.png")
    page.get_by_role("link", name="r1", exact=True).click()
    page.get_by_text("champion").first.wait_for()
    page.screenshot(path=shots / "09-mlflow-r1-champion.png")
    page.close()


def test_the_run_used_the_cluster_and_the_servers_artifact_store(stack, pipeline_run):
    import ray
    from mlflow import MlflowClient

    assert pipeline_run["state_type"] == "COMPLETED"
    client = MlflowClient(stack["mlflow"])
    experiment = client.get_experiment_by_name(stack["cfg"].runtime.experiment)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id], f"tags.run_name = '{RUN_NAME}'")
    stages = {r.data.tags["stage"] for r in runs}
    assert {"pipeline", "pretrain_base", "r1_zero", "cold_start_sft", "general_rl", "distill/mini/sft"} <= stages
    assert all(r.info.status == "FINISHED" for r in runs)
    # every artifact went over HTTP into the server's store; nothing was written as a local MLflow store
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    champion = client.get_model_version_by_alias("r1", "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
    model_files = list(stack["server_artifacts"].rglob(f"{champion.run_id}/artifacts/model/config.json"))
    assert len(model_files) == 1
    assert list(stack["server_artifacts"].rglob("curves/training_curves.png"))
    assert not (stack["workdir"] / "mlartifacts").exists()
    # pretraining asked for 2 workers x 2 CPUs: only the two 2-CPU nodes together could run it
    pretrain = next(r for r in runs if r.data.tags["stage"] == "pretrain_base")
    assert pretrain.data.params["pretrain.compute.num_workers"] == "2"
    assert pretrain.data.params["pretrain.compute.cpus_per_worker"] == "2"
    ray.init(address=stack["ray"], logging_level="ERROR")
    try:
        assert sum(n["Alive"] for n in ray.nodes()) == 2
    finally:
        ray.shutdown()


def test_scheduled_retrain_deployment_retrains_from_the_champion_on_new_data(stack, pipeline_run):
    from mlflow import MlflowClient

    from r1core.reasoning_tasks import read_rows, write_rows
    from tasks.retrain import incoming_dir, read_ledger

    cfg, prefect_url = stack["cfg"], stack["prefect"]
    deployment = _deployment(prefect_url, "r1-retrain")
    assert deployment["global_concurrency_limit"]["limit"] == 1
    client = MlflowClient(stack["mlflow"])
    champion_before = client.get_model_version_by_alias("r1", "champion")
    # new prompt rows (any rows but held-out ones, which the retrain refuses): some of the run's own
    train = read_rows(stack["workdir"] / "runs" / RUN_NAME / "data" / "train.jsonl")
    write_rows(train[-24:], incoming_dir(cfg) / "new-prompts.jsonl")
    httpx.post(f"{prefect_url}/api/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10) \
        .raise_for_status()
    run = _wait_for_run(prefect_url, deployment["id"], timeout_s=600)
    assert run["state_type"] == "COMPLETED", run["state"]
    newest = client.get_model_version_by_alias("r1", "newest")
    assert int(newest.version) > int(champion_before.version)
    assert newest.tags["parent_model"] == f"r1/{champion_before.version}"  # trained from the champion
    retrain_run = client.get_run(newest.run_id)
    assert retrain_run.data.tags["run_name"].startswith("retrain-")
    # the gate decided against the champion it started from, and its alias follows the decision
    assert retrain_run.data.tags["champion_before"] == champion_before.version
    alias = "champion" if retrain_run.data.tags["promotion"] == "promoted" else "challenger"
    assert client.get_model_version_by_alias("r1", alias).version == newest.version
    assert set(read_ledger(cfg).values()) == {"new-prompts.jsonl"}
    # the same data again: the next run ends early and says so
    httpx.post(f"{prefect_url}/api/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10) \
        .raise_for_status()
    time.sleep(2)
    again = _wait_for_run(prefect_url, deployment["id"], timeout_s=300)
    assert again["id"] != run["id"] and again["state_type"] == "COMPLETED"
    assert again["state"]["message"].startswith("no new data in")
