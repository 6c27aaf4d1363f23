"""The deployments as the Prefect API reports them (typed forms, the retrain schedule and its
concurrency limit), the retrain's new-data bookkeeping, and a no-new-data run ending early."""
import json
from pathlib import Path

import pytest

from r1core.config import CONFIG_DIR, load_config


@pytest.fixture
def cfg(tmp_path):
    return load_config(CONFIG_DIR / "micro.yaml", [f"runtime.workdir={tmp_path}", "retrain.cron='*/30 * * * *'",
                                                   "retrain.timezone=Europe/Berlin"])


def test_deployments_carry_the_config_form_schedule_and_concurrency_limit(prefect_harness, cfg):
    from prefect import get_client

    from flows.catalog import stage_flows
    from flows.deployments import PIPELINE_DEPLOYMENT, RETRAIN_DEPLOYMENT, deployments, stage_deployment_name

    ids = {d.name: d.apply() for d in deployments(cfg)}
    assert set(ids) >= {PIPELINE_DEPLOYMENT, RETRAIN_DEPLOYMENT, *map(stage_deployment_name, stage_flows())}
    with get_client(sync_client=True) as client:
        pipeline = client.read_deployment(ids[PIPELINE_DEPLOYMENT])
        retrain = client.read_deployment(ids[RETRAIN_DEPLOYMENT])
        sft = client.read_deployment(ids[stage_deployment_name("sft")])
    # the form: the pipeline config's JSON schema, with its descriptions, and this profile as defaults
    schema = pipeline.parameter_openapi_schema
    definitions = schema["definitions"]
    assert schema["properties"]["config"]["$ref"].endswith("/PipelineConfig")
    assert "RetrainConfig" in definitions and "GeneralRLConfig" in definitions
    assert definitions["RetrainConfig"]["properties"]["cron"]["description"].startswith("cron schedule")
    assert pipeline.parameters["config"]["profile"] == "micro"
    assert pipeline.parameters["config"]["r1_zero"]["steps"] == cfg.r1_zero.steps
    assert {"r1", "profile:micro", "pipeline"} <= set(pipeline.tags) and "R1-Zero" in pipeline.description
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
