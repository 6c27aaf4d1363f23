"""The pipeline end to end, "as on a cluster" on this machine: a Ray cluster from `ray start` (a
head and one more node on loopback), a Prefect server, an MLflow server keeping the artifacts
itself, and `r1 serve`, all started by `r1 ui` (what `make ui` runs) and pointed at each other
through environment variables only. A headless Chromium (Debian's, driven by Playwright) starts
`r1-pipeline` on the micro profile from the deployment's form with a changed parameter and finds
the results in both UIs (screenshots of every step in R1_TEST_ARTIFACTS, default
.r1/test-artifacts/); without a browser (and R1_REQUIRE_BROWSER unset) the run is started through
the API instead. Then the registry, the metrics, the lineage and the gate of that run, a re-run
that skips every stage, `r1 eval` on the champion, and the scheduled retrain deployment."""
import json
import os
import re
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
    store, `r1 serve`) with RAY_ADDRESS in its environment; the tiny profile as the forms'
    defaults and `cfg` the micro profile the runs choose, both with pretraining on 2 workers of
    2 CPUs each: more than one 2-CPU node holds."""
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
        # the forms default to the tiny profile: the run below chooses micro from the profile enum
        ui = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(prefect_port), "--mlflow-port",
             str(mlflow_port), "--artifacts-destination", str(server_artifacts), "--config",
             str(CONFIG_DIR / "tiny.yaml"), *(f"--set={o}" for o in overrides)],
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


def _named_runs(prefect_url: str, deployment_id: str, run_name: str | None = None) -> list[dict]:
    """The deployment's flow runs (with the run form's `run_name`, if given), newest first."""
    runs = httpx.post(f"{prefect_url}/api/flow_runs/filter", timeout=10, json={
        "deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_DESC"}).json()
    return [r for r in runs if run_name is None or r["parameters"]["run"].get("run_name") == run_name]


def _flow_runs(prefect_url: str, **flow_runs_filter) -> list[dict]:
    return httpx.post(f"{prefect_url}/api/flow_runs/filter", timeout=10,
                      json={"flow_runs": flow_runs_filter, "sort": "EXPECTED_START_TIME_DESC"}).json()


def _progress_while_running(prefect_url: str, stage: str, deadline: float) -> tuple[dict, dict] | None:
    """The stage's progress artifact and its flow run, read while that run is still running
    (polled as an operator's UI would); None if the pipeline ended first or time ran out."""
    key = "".join(c if c.isalnum() else "-" for c in f"{stage}-progress".lower())
    while time.time() < deadline:
        found = httpx.post(f"{prefect_url}/api/artifacts/filter", timeout=10, json={
            "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).json()
        if found and found[0].get("flow_run_id"):
            run = httpx.get(f"{prefect_url}/api/flow_runs/{found[0]['flow_run_id']}", timeout=10).json()
            if run["state_type"] == "RUNNING":
                return found[0], run
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return None
        time.sleep(0.5)
    return None


def _wait_for_run(prefect_url: str, deployment_id: str, run_name: str | None = None,
                  timeout_s: float = 1800) -> dict:
    """The deployment's newest flow run (with `config.run_name`, if given), once it ended."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = _named_runs(prefect_url, deployment_id, run_name)
        if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return runs[0]
        time.sleep(3)
    raise TimeoutError(f"no finished run of deployment {deployment_id} within {timeout_s} s")


def _artifact(stack: dict, key: str):
    """The newest Prefect artifact under `key`, its data decoded (tables are JSON strings)."""
    found = httpx.post(f"{stack['prefect']}/api/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).json()
    assert found, f"no Prefect artifact {key}"
    data = found[0]["data"]
    return json.loads(data) if found[0]["type"] == "table" and isinstance(data, str) else data


def _screenshots() -> Path:
    out = Path(os.environ.get("R1_TEST_ARTIFACTS", PROJECT_ROOT / ".r1" / "test-artifacts")) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium, or None where it is not installed (a failure under R1_REQUIRE_BROWSER)."""
    if CHROMIUM is None:
        if os.environ.get("R1_REQUIRE_BROWSER"):
            pytest.fail("R1_REQUIRE_BROWSER is set but Debian's chromium is not installed")
        yield None
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def pipeline_run(stack, browser):
    """The micro pipeline, started from the Prefect UI: Deployments -> r1-pipeline -> Run ->
    Custom run -> the micro profile chosen from the form's enum (its default: tiny) and the
    output folder named -> Submit; R1-Zero's progress watched while it runs; followed to its
    end. Without a browser, the same parameters go through the API."""
    prefect_url = stack["prefect"]
    deployment = _deployment(prefect_url, "r1-pipeline")
    assert deployment["parameters"]["run"]["profile"] == "tiny"
    if browser is None:
        run = {**deployment["parameters"]["run"], "profile": "micro", "run_name": RUN_NAME}
        httpx.post(f"{prefect_url}/api/deployments/{deployment['id']}/create_flow_run",
                   json={"parameters": {"run": run}}, timeout=10).raise_for_status()
        return _wait_for_run(prefect_url, deployment["id"], RUN_NAME)
    shots = _screenshots()
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
    page.get_by_text("Output folder (Optional)").wait_for()
    page.screenshot(path=shots / "03-prefect-run-form.png")
    # the form is short: the run request, not the whole config
    assert page.evaluate("document.querySelector('form').scrollHeight") < 4000, "the run form is a wall again"
    assert page.get_by_text("Run Name", exact=True).count() == 1  # Prefect's own; ours reads "Output folder"
    page.locator(".p-select-button__control").first.click()  # the profile: an enum of configs/
    option = page.get_by_role("option", name="micro", exact=True)
    if not option.is_visible():  # Prefect's select opens its list on a key once focused
        page.keyboard.press("ArrowDown")
    option.click()
    field = page.locator(".schema-form-property", has=page.get_by_text("Output folder (Optional)", exact=True)).last
    field.locator("textarea, input").first.fill(RUN_NAME)
    page.screenshot(path=shots / "04-prefect-run-form-changed.png")
    page.wait_for_load_state("networkidle")  # the form validates as it is edited
    for attempt in (1, 2):  # a click while the form re-validates can go unanswered (seen once in CI)
        page.get_by_role("button", name="Submit").click()
        deadline = time.time() + 120
        while time.time() < deadline and not _named_runs(prefect_url, deployment["id"], RUN_NAME):
            time.sleep(2)
        if _named_runs(prefect_url, deployment["id"], RUN_NAME):  # the run exists: Submit was answered
            break
        page.screenshot(path=shots / f"04-prefect-submit-unanswered-{attempt}.png")
        if attempt == 2:
            raise AssertionError("Submit created no flow run; the page said: " + page.inner_text("body")[:2000])
    # No page stays open on a running flow run while the pipeline runs (Submit opens one): its
    # live run graph is a canvas that headless Chromium redraws in software, on the CPUs the
    # pipeline needs. With the page left there, CI's micro pipeline took over 20 min; without a
    # browser it takes about 5 min on this machine.
    page.goto("about:blank")
    # a running GRPO stage's progress: its artifact below 100% and its step lines in the run's logs
    seen = _progress_while_running(prefect_url, "r1_zero", time.time() + 900)
    assert seen is not None, "R1-Zero's progress artifact was not seen while its flow run ran"
    artifact, r1_zero_run = seen
    page.goto(f"{prefect_url}/runs/flow-run/{r1_zero_run['id']}", wait_until="networkidle")
    page.get_by_text(re.compile(r"\[r1_zero\] step \d+/\d+")).first.wait_for()
    page.screenshot(path=shots / "05-prefect-r1-zero-running.png")
    stack["progress_seen"] = {"artifact": artifact, "run": r1_zero_run}
    page.goto("about:blank")
    run = _wait_for_run(prefect_url, deployment["id"], RUN_NAME)
    # the run list: each flow run named <output folder>/<stage> and tagged
    page.goto(f"{prefect_url}/runs", wait_until="networkidle")
    page.get_by_text(f"{RUN_NAME}/r1_zero").first.wait_for()
    page.get_by_text(f"{RUN_NAME}/pipeline").first.wait_for()
    page.screenshot(path=shots / "06-prefect-run-list.png")
    page.goto(f"{prefect_url}/runs/flow-run/{run['id']}", wait_until="networkidle")
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=shots / "07-prefect-flow-run-completed.png")
    page.close()
    return run


@pytest.fixture(scope="module")
def micro(stack, pipeline_run):
    """The configuration the served run used (the form's defaults, run_name changed), pointed at
    the stack's MLflow server and Ray cluster; the test process talks to its Prefect server."""
    cfg = stack["cfg"]
    return cfg.model_copy(update={"run_name": RUN_NAME, "runtime": cfg.runtime.model_copy(
        update={"mlflow_tracking_uri": stack["mlflow"], "ray_address": stack["ray"]})})


@pytest.fixture(scope="module")
def prefect_api(stack):
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{stack['prefect']}/api",
                             PREFECT_LOCAL_STORAGE_PATH: str(stack["workdir"] / "prefect-results")}):
        yield
        # send this process's flow-run logs and events while their server is up: left queued, a
        # later test harness would wait on them forever when it drains at its end
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)


@pytest.fixture(scope="module")
def pipeline_results(micro, prefect_api) -> dict:
    """Each stage's result as the run saved it next to its model (`result.json`)."""
    from tasks.training_stages import StageResult

    stages = ("pretrain_base", "r1_zero", "cold_start_sft", "reasoning_rl", "sft", "reward_models/helpfulness",
              "reward_models/harmlessness", "general_rl", "distill/mini/base", "distill/mini/sft",
              "distill/mini/rl_only")
    return {s: StageResult(**json.loads((micro.run_dir() / s / "result.json").read_text())["result"])
            for s in stages}


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("R1_REQUIRE_BROWSER"),
                    reason="no chromium on this machine (.ci/run installs it and sets R1_REQUIRE_BROWSER); "
                           "the run went through the API")
def test_browser_starts_the_pipeline_from_the_form_and_finds_it_in_both_uis(stack, browser, pipeline_run):
    assert pipeline_run["state_type"] == "COMPLETED", pipeline_run["state"]
    # the profile chosen in the form, and the run used its values (the form's default was tiny)
    assert pipeline_run["parameters"]["run"]["profile"] == "micro"
    tags = set(pipeline_run["tags"])
    assert {"profile:micro", f"config:{stack['cfg'].digest()}", "stage:pipeline"} <= tags, tags
    assert any(t.startswith("commit:") for t in tags) and pipeline_run["name"] == f"{RUN_NAME}/pipeline"
    stage_runs = _flow_runs(stack["prefect"], tags={"all_": ["profile:micro", "stage:r1_zero"]})
    assert [r["name"] for r in stage_runs] == [f"{RUN_NAME}/r1_zero"]
    # R1-Zero's progress, read while its run was running: a progress artifact of its steps
    seen = stack["progress_seen"]
    assert seen["artifact"]["type"] == "progress" and 0 < float(seen["artifact"]["data"]) <= 100
    assert seen["run"]["name"] == f"{RUN_NAME}/r1_zero"
    from urllib.parse import quote

    from mlflow import MlflowClient

    shots, mlflow_url = _screenshots(), stack["mlflow"]
    experiment = MlflowClient(mlflow_url).get_experiment_by_name(stack["cfg"].runtime.experiment)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    # MLflow is a single-page app on hash routes: wait for content, not for page loads
    page.goto(f"{mlflow_url}/#/experiments", wait_until="commit")
    page.get_by_text(experiment.name).first.wait_for()
    page.screenshot(path=shots / "08-mlflow-experiments.png")
    # the links r1 gives (the run's summary, the final table) open the experiment on its training
    # runs, not MLflow's GenAI views (traces, an assistant), which its UI otherwise opens with
    summary = _artifact(stack, "r1-zero")
    (run_link,) = [u for u in re.findall(r"\]\((http[^)]+)\)", summary) if "/runs/" in u]
    assert run_link.endswith("?workflowType=machine_learning"), run_link
    page.goto(run_link, wait_until="commit")
    page.get_by_text("Model metrics").first.wait_for()
    page.get_by_text("System metrics").first.wait_for()  # system metrics on the stage run
    page.screenshot(path=shots / "08-mlflow-r1-zero-run.png")
    page.goto(run_link.split("/runs/")[0] + "/runs?workflowType=machine_learning", wait_until="commit")
    page.get_by_text(f"r1_pipeline/{RUN_NAME}").first.wait_for()
    page.screenshot(path=shots / "08-mlflow-training-runs.png")
    # this pipeline run and its stage runs (every stage run is tagged with the run name)
    search = quote(f"tags.run_name = '{RUN_NAME}'")
    page.goto(f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs?searchFilter={search}&workflowType="
              "machine_learning", wait_until="commit")
    page.get_by_text(f"r1_pipeline/{RUN_NAME}").first.wait_for()
    parent = MlflowClient(mlflow_url).search_runs([experiment.experiment_id], f"tags.run_name = '{RUN_NAME}' and "
                                                  "tags.stage = 'pipeline'")[0]
    tiny, micro = load_config(CONFIG_DIR / "tiny.yaml"), load_config(CONFIG_DIR / "micro.yaml")
    assert parent.data.tags["profile"] == "micro"
    assert parent.data.params["r1_zero.steps"] == str(micro.r1_zero.steps) != str(tiny.r1_zero.steps)
    assert parent.data.params["model.hidden_size"] == str(micro.model.hidden_size)
    page.locator("[role=gridcell] button").first.click()  # expand the parent run
    for stage in ("pretrain_base", "r1_zero", "cold_start_sft", "reasoning_rl", "sft", "general_rl"):
        page.get_by_text(stage, exact=True).first.wait_for()
    page.screenshot(path=shots / "09-mlflow-stage-runs.png")
    page.goto(f"{mlflow_url}/#/models", wait_until="commit")
    page.get_by_role("link", name="r1-distill-mini", exact=True).wait_for()
    page.keyboard.press("Escape")  # MLflow's "new registry UI" announcement, when it shows
    page.screenshot(path=shots / "10-mlflow-registered-models.png")
    page.get_by_role("link", name="r1", exact=True).click()
    page.get_by_text("champion").first.wait_for()
    page.screenshot(path=shots / "11-mlflow-r1-champion.png")
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
    # MLflow's system metrics (CPU, memory) on the stage runs (sampled every 5 s: a seconds-long
    # micro stage may end before its first sample, pretraining on the cluster does not)
    pretrain = next(r for r in runs if r.data.tags["stage"] == "pretrain_base")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(pretrain.data.metrics)
    # every artifact went over HTTP into the server's store; nothing was written as a local MLflow store
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    champion = client.get_model_version_by_alias("r1", "champion")
    assert champion.run_id in {r.info.run_id for r in runs}
    # an MLflow Model (its MLmodel) in a LoggedModel of the run, with the HF directory inside (`model/`)
    logged = client.get_logged_model(champion.tags["logged_model_id"])
    assert logged.source_run_id == champion.run_id and logged.status == "READY"
    assert champion.source == logged.artifact_location and logged.artifact_location.startswith("mlflow-artifacts:")
    model_files = list(stack["server_artifacts"].rglob(f"models/{logged.model_id}/artifacts/model/config.json"))
    assert len(model_files) == 1 and (model_files[0].parent.parent / "MLmodel").is_file()
    assert list(stack["server_artifacts"].rglob("curves/training_curves.png"))
    assert not (stack["workdir"] / "mlartifacts").exists()
    # pretraining asked for 2 workers x 2 CPUs: only the two 2-CPU nodes together could run it
    assert pretrain.data.params["pretrain.compute.num_workers"] == "2"
    assert pretrain.data.params["pretrain.compute.cpus_per_worker"] == "2"
    ray.init(address=stack["ray"], logging_level="ERROR")
    try:
        assert sum(n["Alive"] for n in ray.nodes()) == 2
    finally:
        ray.shutdown()


def test_pipeline_registers_models_and_logs_metrics(pipeline_results, micro):
    from mlflow import MlflowClient

    from tasks.tracking import NEWEST_ALIAS, tracking_uri

    assert set(pipeline_results) == {"pretrain_base", "r1_zero", "cold_start_sft", "reasoning_rl", "sft",
                                     "reward_models/helpfulness", "reward_models/harmlessness", "general_rl",
                                     "distill/mini/base", "distill/mini/sft", "distill/mini/rl_only"}
    client = MlflowClient(tracking_uri(micro.runtime))
    for name, stage in (("r1-base", "pretrain_base"), ("r1-zero", "r1_zero"), ("r1-cold-start", "cold_start_sft"),
                        ("r1-reasoning-rl", "reasoning_rl"), ("r1-sft", "sft"), ("r1", "general_rl"),
                        ("r1-student-base-mini", "distill/mini/base"), ("r1-distill-mini", "distill/mini/sft"),
                        ("r1-rl-only-mini", "distill/mini/rl_only")):
        version = client.get_model_version_by_alias(name, NEWEST_ALIAS)
        assert version.run_id == pipeline_results[stage].mlflow_run_id
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"]
        assert {"eval/pass_at_1", "eval/format_rate", "eval/mean_length", "eval/cons_at_2", "eval/language_consistency",
                "eval/language_mixing_rate", "eval/readability"} <= set(run.data.metrics)
        assert run.data.metrics["eval/in_job"] == 1.0  # evaluated inside its training job (eval.in_training_job)
        assert (pipeline_results[stage].model_dir and
                os.path.isfile(os.path.join(pipeline_results[stage].model_dir, "config.json")))
    zero_run = pipeline_results["r1_zero"].mlflow_run_id
    for key in ("reward", "format_rate", "response_length", "kl", "entropy", "gen_tokens_per_s",
                "train_tokens_per_s", "reward/accuracy", "reward/format"):
        history = client.get_metric_history(zero_run, key)
        assert [m.step for m in history] == [1, 2], key
    # metric names that do not collide in MLflow's sections (no bare `accuracy` beside reward/accuracy);
    # what an evaluation measured on is a param, not a one-point metric
    zero = client.get_run(zero_run).data
    assert "accuracy" not in zero.metrics and any(k.startswith("accuracy_by_task/") for k in zero.metrics)
    assert zero.params["eval/k"] == str(micro.eval.k) and "eval/k" not in zero.metrics
    rl_run = pipeline_results["reasoning_rl"].mlflow_run_id
    for key in ("reward/language_consistency", "language_mixing_rate", "reward/accuracy"):
        assert [m.step for m in client.get_metric_history(rl_run, key)] == [1, 2], key
    assert client.get_run(rl_run).data.tags["init_model_dir"] == pipeline_results["cold_start_sft"].model_dir
    sft_loss = client.get_metric_history(pipeline_results["cold_start_sft"].mlflow_run_id, "loss")
    assert sft_loss and sft_loss[-1].step >= 1
    pre_loss = client.get_metric_history(pipeline_results["pretrain_base"].mlflow_run_id, "loss")
    assert pre_loss and pre_loss[-1].step == micro.pretrain.steps
    artifacts = [a.path for a in client.list_artifacts(zero_run, "checkpoints")]
    assert artifacts == ["checkpoints/step_000001", "checkpoints/step_000002"]
    parent = client.get_run(client.get_run(zero_run).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and "r1_zero/pass_at_1" in parent.data.metrics
    # the cold-start dataset: the three routes ran and were counted; our six good examples kept
    assert parent.data.metrics["cold_start_data/seed_file/kept"] == 6
    for route in ("few_shot", "direct", "rewrite_r1_zero"):
        assert parent.data.metrics[f"cold_start_data/{route}/candidates"] == 4
    dataset = micro.run_dir() / "cold_start_data" / "dataset" / "train.jsonl"
    assert len(dataset.read_text().splitlines()) == parent.data.metrics["cold_start_data/examples"]


def test_rejection_sampling_feeds_sft_and_is_tracked(pipeline_results, micro, stack):
    from mlflow import MlflowClient

    from r1core.problems import read_rows
    from r1core.rejection_sampling import REASONS
    from tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri(micro.runtime))
    sft_run = client.get_run(pipeline_results["sft"].mlflow_run_id)
    parent = client.get_run(sft_run.data.tags["mlflow.parentRunId"])
    rs = micro.rejection_sampling
    candidates = rs.num_prompts * rs.samples_per_prompt  # every sample counted, whatever its fate
    assert parent.data.metrics["rejection_sampling/candidates/reasoning"] == candidates
    assert all(f"rejection_sampling/rejected/{r}" in parent.data.metrics for r in REASONS)
    dataset_dir = micro.run_dir() / "rejection_sampling" / "dataset"
    kept = read_rows(dataset_dir)
    assert len(kept) == parent.data.metrics["rejection_sampling/examples"] > 0
    assert len({r["sample_id"] for r in kept}) == len(kept)
    # the set is the SFT run's input and the rejection-sampling run's output, linked to its model
    assert [i.dataset.source for i in sft_run.inputs.dataset_inputs] and \
        str(dataset_dir) in sft_run.inputs.dataset_inputs[0].dataset.source
    rs_runs = client.search_runs([sft_run.info.experiment_id], "tags.stage = 'rejection_sampling'")
    output = rs_runs[0].inputs.dataset_inputs[0]
    tags = {t.key: t.value for t in output.tags}
    assert tags["mlflow.data.context"] == "rejection_sampling_output"
    assert tags["model_dir"] == pipeline_results["reasoning_rl"].model_dir
    assert tags["model"] == pipeline_results["reasoning_rl"].registered
    assert output.dataset.digest == sft_run.inputs.dataset_inputs[0].dataset.digest

    table = {row["count"]: row["value"] for row in _artifact(stack, "rejection-sampling-reasons")}
    assert table["candidates/reasoning"] == candidates


def test_final_stages_carry_lineage_pass_the_gate_and_are_compared(pipeline_results, micro, stack):
    from mlflow import MlflowClient

    from tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri(micro.runtime))
    r = pipeline_results
    # the reward models: from the base, evaluated on held-out pairs, registered
    for model, name in (("helpfulness", "r1-rm-helpful"), ("harmlessness", "r1-rm-harmless")):
        version = client.get_model_version_by_alias(name, "newest")
        assert version.run_id == r[f"reward_models/{model}"].mlflow_run_id
        assert version.tags["parent_model"] == r["pretrain_base"].registered
        assert 0.0 <= float(version.tags["pairwise_accuracy"]) <= 1.0
        assert "eval/pairwise_accuracy" in client.get_run(version.run_id).data.metrics
    # general RL: reasoning rows scored by rules, general rows by the reward models, every step
    rl_run = r["general_rl"].mlflow_run_id
    for key in ("reward/accuracy", "reward/helpfulness", "reward/harmlessness", "reward"):
        assert [m.step for m in client.get_metric_history(rl_run, key)] == [1, 2], key
    final = client.get_model_version_by_alias("r1", "champion")  # the first r1: no champion to beat
    assert final.run_id == rl_run and final.tags["promotion"].startswith("promoted")
    assert final.tags["parent_model"] == r["sft"].registered
    assert "accuracy" in final.tags["rewards"] and "r1-rm-helpful/" in final.tags["model_rewards"]
    assert final.tags["config_digest"] == micro.digest() and final.tags["git_commit"]
    assert final.tags["train_datasets"].startswith("train@")
    assert client.get_run(rl_run).data.metrics["gate/promoted"] == 1.0
    # the student: its own base, then SFT on the same set as stage 6 (same digest)
    distilled = client.get_model_version_by_alias("r1-distill-mini", "newest")
    assert distilled.tags["parent_model"] == r["distill/mini/base"].registered
    sft_digest = client.get_run(r["sft"].mlflow_run_id).inputs.dataset_inputs[0].dataset.digest
    assert client.get_run(distilled.run_id).inputs.dataset_inputs[0].dataset.digest == sft_digest
    assert client.get_model_version_by_alias("r1-rl-only-mini", "newest").tags["parent_model"] == \
        r["distill/mini/base"].registered
    # one comparison of every evaluated model: MLflow table, chart and markdown, Prefect artifact
    parent = client.get_run(client.get_run(rl_run).data.tags["mlflow.parentRunId"])
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert files == {"comparison/models.json", "comparison/models.png", "comparison/models.md",
                     "comparison/findings.md"}
    evaluated = [k for k, v in r.items() if "pass@1" in v.metrics]
    assert len(evaluated) == 9

    table = _artifact(stack, "r1-model-comparison")
    assert [row["stage"] for row in table] == evaluated
    # each model against the one it trained from, prompt by prompt (scores kept on the stage's run)
    general = next(row for row in table if row["stage"] == "general_rl")
    assert general["trained_from"] == "sft"
    assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", general["pass@1 change (95%)"])
    assert {a.path for a in client.list_artifacts(r["general_rl"].mlflow_run_id, "eval")} == {"eval/per_prompt.json"}
    assert len(r["general_rl"].per_prompt["pass@1"]) == len(r["sft"].per_prompt["pass@1"]) > 0
    # each stage's summary for operators: what it did, its numbers, a link to its run on the server
    summary = _artifact(stack, "general-rl")
    assert f"{stack['mlflow']}/#/experiments/" in summary and r["general_rl"].mlflow_run_id in summary
    assert f"registered: `{r['general_rl'].registered}`" in summary and "| pass@1 |" in summary


def test_rerun_skips_completed_stages(pipeline_results, micro):
    import ray

    from flows.pipeline import r1_pipeline

    try:
        again = r1_pipeline(config=micro)  # in this process, against the same servers and cluster
    finally:
        ray.shutdown()
    assert set(again) == set(pipeline_results) and all(r.skipped for r in again.values())
    assert again["r1_zero"].mlflow_run_id == pipeline_results["r1_zero"].mlflow_run_id


def test_r1_eval_cli_on_a_registered_model(pipeline_results, micro, stack, capsys, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    from flows.cli import main

    heldout = micro.run_dir() / "data" / "heldout.jsonl"
    code = main(["eval", "--model", "models:/r1@champion", "--data", str(heldout), "--k", "2",
                 "--config", "configs/micro.yaml", "--set", f"runtime.workdir={stack['workdir']}",
                 "--set", f"runtime.mlflow_tracking_uri={stack['mlflow']}",
                 "--set", "eval.num_prompts=3", "--set", "eval.sampling.max_new_tokens=4"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["k"] == 2 and out["num_prompts"] == 3 and {"pass@1", "cons@2", "format_rate", "mean_length"} <= set(out)
    # two models on the same prompts and samples' seeds: the champion against itself differs by exactly 0
    code = main(["eval", "--model", "models:/r1@champion", "--model", "models:/r1@champion", "--data", str(heldout),
                 "--k", "2", "--config", "configs/micro.yaml", "--set", f"runtime.workdir={stack['workdir']}",
                 "--set", f"runtime.mlflow_tracking_uri={stack['mlflow']}",
                 "--set", "eval.num_prompts=3", "--set", "eval.sampling.max_new_tokens=4"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (difference,) = out["minus models:/r1@champion"].values()
    assert set(difference) == {"pass@1", "readability", "language_mixing"}
    for metric in difference.values():
        assert metric["difference"] == metric["low"] == metric["high"] == 0


def test_scheduled_retrain_deployment_retrains_from_the_champion_on_new_data(stack, pipeline_run):
    from mlflow import MlflowClient

    from r1core.problems import read_rows, write_rows
    from tasks.retrain import incoming_dir, read_ledger

    cfg, prefect_url = stack["cfg"], stack["prefect"]
    deployment = _deployment(prefect_url, "r1-retrain")
    assert deployment["global_concurrency_limit"]["limit"] == 1
    client = MlflowClient(stack["mlflow"])
    champion_before = client.get_model_version_by_alias("r1", "champion")
    # new prompt rows (any rows but held-out ones, which the retrain refuses): some of the run's own
    train = read_rows(stack["workdir"] / "runs" / RUN_NAME / "data" / "train.jsonl")
    write_rows(train[-24:], incoming_dir(cfg) / "new-prompts.jsonl")
    micro_run = {"parameters": {"run": {**deployment["parameters"]["run"], "profile": "micro"}}}
    httpx.post(f"{prefect_url}/api/deployments/{deployment['id']}/create_flow_run", json=micro_run, timeout=10) \
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
    httpx.post(f"{prefect_url}/api/deployments/{deployment['id']}/create_flow_run", json=micro_run, timeout=10) \
        .raise_for_status()
    time.sleep(2)
    again = _wait_for_run(prefect_url, deployment["id"], timeout_s=300)
    assert again["id"] != run["id"] and again["state_type"] == "COMPLETED"
    assert again["state"]["message"].startswith("no new data in")
