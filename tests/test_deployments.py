"""The deployments as the Prefect API reports them (typed forms, the retrain schedule and its
concurrency limit), the retrain's new-data bookkeeping, and a no-new-data run ending early."""
import json
from pathlib import Path

import pytest

from r1core.config import CONFIG_DIR, load_config


@pytest.fixture
def settings(tmp_path):
    return [f"runtime.workdir={tmp_path}", "retrain.cron='*/30 * * * *'", "retrain.timezone=Europe/Berlin"]


@pytest.fixture
def cfg(settings):
    return load_config(CONFIG_DIR / "micro.yaml", settings)


def test_deployments_carry_the_run_form_schedule_and_concurrency_limit(prefect_harness, cfg, settings):
    from prefect import get_client

    from flows.catalog import stage_flows
    from flows.deployments import PIPELINE_DEPLOYMENT, RETRAIN_DEPLOYMENT, deployments, stage_deployment_name
    from r1core.config import PROFILES

    ids = {d.name: d.apply() for d in deployments(cfg, str(CONFIG_DIR / "micro.yaml"), settings)}
    assert set(ids) >= {PIPELINE_DEPLOYMENT, RETRAIN_DEPLOYMENT, *map(stage_deployment_name, stage_flows())}
    with get_client(sync_client=True) as client:
        pipeline = client.read_deployment(ids[PIPELINE_DEPLOYMENT])
        retrain = client.read_deployment(ids[RETRAIN_DEPLOYMENT])
        sft = client.read_deployment(ids[stage_deployment_name("sft")])
    # the form: the run request (a profile from configs/, the common fields, settings), not the
    # whole config; the served profile and its settings as defaults
    schema = pipeline.parameter_openapi_schema
    assert list(schema["properties"]) == ["run"] and schema["properties"]["run"]["$ref"].endswith("/RunRequest")
    form = schema["definitions"]["RunRequest"]["properties"]
    assert form["profile"]["enum"] == list(PROFILES) and {"micro", "tiny"} <= set(PROFILES)
    assert form["run_name"]["title"] == "Output folder"  # Prefect's own "Run Name" is the only run-name field
    assert {"seed", "r1_zero_steps", "rl_lr", "train_file", "base_model", "settings"} <= set(form)
    assert all(f.get("description") for f in form.values())
    assert "PipelineConfig" not in schema["definitions"]
    assert pipeline.parameters["run"]["profile"] == "micro" and pipeline.parameters["run"]["settings"] == settings
    assert {"r1", "profile:micro", "pipeline"} <= set(pipeline.tags) and "R1-Zero" in pipeline.description
    # a served run loads its flow by the deployment's entrypoint: it must name the form's flow
    from prefect.flows import load_flow_from_entrypoint

    for d in deployments(cfg, str(CONFIG_DIR / "micro.yaml"), settings):
        loaded = load_flow_from_entrypoint(d.entrypoint)
        assert loaded.name == d.flow_name and "run" in loaded.parameters.properties, d.entrypoint
        assert "config" not in loaded.parameters.properties, d.entrypoint
    # a stage keeps its own parameters beside the form
    assert {"run", "init_model"} <= set(sft.parameter_openapi_schema["properties"])
    assert "config" not in sft.parameter_openapi_schema["properties"]
    assert not pipeline.schedules and pipeline.global_concurrency_limit is None
    assert "sft" in sft.tags and sft.description.startswith("Stage `sft` alone")
    # the retrain: its cron in its time zone, and one run at a time (a run due meanwhile is not started)
    (schedule,) = retrain.schedules
    assert schedule.active and schedule.schedule.cron == "*/30 * * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy == "CANCEL_NEW"


def test_the_tiny_profile_schedules_nothing(prefect_harness, tmp_path):
    from flows.deployments import RETRAIN_DEPLOYMENT, deployments

    cfg = load_config(None, [f"runtime.workdir={tmp_path}"])
    retrain = next(d for d in deployments(cfg) if d.name == RETRAIN_DEPLOYMENT)
    assert cfg.retrain.cron is None and not retrain.schedules
    assert "scheduled" not in retrain.tags  # only a deployment with a schedule says so


def test_the_run_form_runs_with_the_chosen_profiles_values(prefect_harness, tmp_path):
    """A flow behind the form gets the chosen profile's config, the form's fields on top, its
    other parameters untouched; a bad setting fails the run naming the field, before the flow's
    own code runs."""
    from prefect import flow

    from flows.deployments import from_run_form
    from r1core.config import PipelineConfig

    seen = []

    @flow(name="probe-run-form")
    def probe(config: PipelineConfig, note: str = "kept") -> str:
        seen.append(config)
        return note

    entry = from_run_form(probe)
    workdir = f"runtime.workdir={tmp_path}"
    micro, tiny = load_config(CONFIG_DIR / "micro.yaml"), load_config(CONFIG_DIR / "tiny.yaml")
    assert entry(run={"profile": "tiny", "settings": [workdir]}, note="given") == "given"
    assert entry(run={"profile": "micro", "r1_zero_steps": 7, "rl_lr": 3e-5, "run_name": "mine",
                      "settings": [workdir, "eval.k=3"]}) == "kept"
    got_tiny, got_micro = seen
    assert got_tiny.profile == "tiny" and got_tiny.r1_zero == tiny.r1_zero and got_tiny.model == tiny.model
    assert got_micro.profile == "micro" and got_micro.model == micro.model and got_micro.eval.k == 3
    assert got_micro.r1_zero.steps == 7 and got_micro.r1_zero.lr == got_micro.general_rl.lr == 3e-5
    assert got_micro.resolved_run_name() == "mine" and got_micro.runtime.workdir == str(tmp_path)
    for bad, named in ((["eval.kk=3"], "eval.kk"), (["r1_zero.steps=-1"], "r1_zero.steps"),
                       (["data.train_file=/nonexistent/rows.jsonl"], "data.train_file")):
        state = entry(run={"profile": "micro", "settings": [workdir, *bad]}, return_state=True)
        assert state.is_failed() and named in state.message, (bad, state.message)
    assert len(seen) == 2
    state = entry(run={"profile": "no-such-profile"}, return_state=True)
    assert state.is_failed() and "profile" in state.message


def test_a_run_without_new_data_ends_early_and_says_so(prefect_harness, cfg):
    from prefect import get_client

    from flows.retrain import retrain_flow
    from tasks.retrain import incoming_dir

    incoming_dir(cfg).mkdir(parents=True)
    (incoming_dir(cfg) / "notes.txt").write_text("not a prompt file")
    state = retrain_flow(cfg, return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        task_runs = client.read_task_runs()
    assert run.state.message == f"no new data in {incoming_dir(cfg)}: nothing to retrain"
    # it looked for data and trained nothing
    names = {t.name.rsplit("-", 1)[0] for t in task_runs if t.flow_run_id == run.id}
    assert "find-new-data" in names and not names & {"grpo", "evaluate", "register-model"}


def test_new_data_is_found_once_by_content(cfg, rows):
    from r1core.problems import write_rows
    from tasks.retrain import find_new_data, incoming_dir, mark_consumed, read_ledger

    train, _ = rows
    folder = incoming_dir(cfg)
    write_rows(train[:5], folder / "week1.jsonl")
    batch = find_new_data.fn(cfg)
    assert batch.num_rows == 5 and list(batch.files) == [str(folder / "week1.jsonl")]
    written = Path(batch.rows_file).read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in written] == [r["prompt"] for r in train[:5]]
    assert find_new_data.fn(cfg).digest == batch.digest  # not consumed until the retrain finished
    mark_consumed.fn(cfg, batch)
    assert set(read_ledger(cfg).values()) == {"week1.jsonl"}
    assert find_new_data.fn(cfg) is None
    (folder / "week1-copy.jsonl").write_bytes((folder / "week1.jsonl").read_bytes())  # same content: not new
    assert find_new_data.fn(cfg) is None
    write_rows(train[5:8], folder / "week2.jsonl")
    assert find_new_data.fn(cfg).num_rows == 3


def test_a_bad_row_in_new_data_names_file_and_row(cfg, rows):
    from r1core.problems import write_rows
    from tasks.retrain import find_new_data, incoming_dir

    train, _ = rows
    bad = [train[0], {"prompt": "what is 2 + 2?"}]  # no answer
    write_rows(bad, incoming_dir(cfg) / "broken.jsonl")
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 2"):
        find_new_data.fn(cfg)
