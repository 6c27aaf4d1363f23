"""The stage catalog: a stage declared here, in a test module, with its flow, appears in the CLI,
the deployments and the report without any other module being touched."""
from __future__ import annotations  # as in flows/stage_flows.py: the flow's annotations are strings

import pytest

from flows import catalog
from flows.catalog import Stage, declare, stage_flow
from r1core.config import CONFIG_DIR, DEFAULT_CONFIG, PipelineConfig, load_config
from tasks.training_stages import DataPaths, StageResult

CHECK = Stage("heldout_check", "eval", "eval", "Held-out evaluation of a model alone, nothing trained (a test stage).",
              starts_from="pretrain_base")


@pytest.fixture(scope="module")
def eval_only_stage():
    """The catalog entry and its flow: all that adding a stage takes (besides its recipe)."""
    from r1core.problems import read_rows
    from tasks.evaluate import evaluate_locally

    declare(CHECK)

    @stage_flow(CHECK.name)
    def heldout_check_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                           data: DataPaths | None = None) -> StageResult:
        metrics, per_prompt = evaluate_locally(init_model, read_rows(data.heldout_file), config.eval,
                                               code=config.code, per_prompt=True)
        return StageResult(stage=CHECK.name, model_dir=init_model, mlflow_run_id="", seconds=0.0, metrics=metrics,
                           per_prompt=per_prompt)

    yield heldout_check_flow
    catalog.CATALOG.pop(CHECK.name)
    catalog._FLOWS.pop(CHECK.name)


@pytest.fixture
def micro(tmp_path):
    return load_config(CONFIG_DIR / "micro.yaml", [f"runtime.workdir={tmp_path}"])


@pytest.fixture
def untrained_model(micro, tokenizer, tmp_path):
    """A micro model straight from initialisation, as an HF directory (evaluation needs one)."""
    from r1core.modeling import build_model

    path = tmp_path / "untrained"
    build_model(micro.model, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_built_in_catalog_is_consistent():
    """Every built-in stage has a flow, starts from a catalogued stage, and names a config section."""
    flows = catalog.stage_flows()
    assert set(catalog.CATALOG) - {CHECK.name} == set(flows) - {CHECK.name}
    for s in catalog.CATALOG.values():
        assert s.starts_from is None or s.starts_from in catalog.CATALOG
        DEFAULT_CONFIG.section(s.section)  # raises on an unknown section
        assert flows[s.name].description == s.description
    assert catalog.registered_name("reward_models/helpfulness") == "r1-rm-helpful"
    assert catalog.registered_name("distill/small/rl_only") == "r1-rl-only-small"
    assert catalog.registered_name("general_rl") == "r1"
    with pytest.raises(ValueError, match="declared twice"):
        declare(Stage("sft", "grpo", "sft", "another sft"))


def test_a_declared_stage_is_in_the_cli_and_the_deployments(eval_only_stage, micro, capsys):
    from flows.cli import main, parser
    from flows.deployments import deployments, stage_deployment_name

    run = parser().parse_args(["run", "stage", CHECK.name])
    assert run.name == CHECK.name
    assert main(["stages"]) == 0
    assert f"| {CHECK.name} | eval | eval | pretrain_base |" in capsys.readouterr().out
    by_name = {d.name: d for d in deployments(micro)}
    deployment = by_name[stage_deployment_name(CHECK.name)]
    assert CHECK.description in deployment.description and "eval" in deployment.tags
    assert deployment.flow_name == CHECK.name and "init_model" in eval_only_stage.parameters.properties


def test_a_declared_stage_runs_from_the_cli_and_is_in_the_report(eval_only_stage, micro, untrained_model,
                                                                  prefect_harness, capsys, monkeypatch, tmp_path):
    from flows.cli import main

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    assert main(["run", "stage", CHECK.name, "--init-model", untrained_model, "--config",
                 str(CONFIG_DIR / "micro.yaml"), "--set", f"runtime.workdir={micro.runtime.workdir}"]) == 0
    out = capsys.readouterr().out
    assert f"=== stage {CHECK.name} finished" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {CHECK.name} |"))
    assert len(row.split("|")) > 8  # pass@1, cons@k, ... of the model, in the report's table
    assert (micro.run_dir() / "data" / "heldout.jsonl").is_file()  # `data` was prepared by the catalog's flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:  # named and tagged: what tells runs apart in the UI
        (run,) = [r for r in client.read_flow_runs() if r.name == f"{micro.resolved_run_name()}/{CHECK.name}"]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert {f"profile:{micro.profile}", f"config:{micro.digest()}", f"stage:{CHECK.name}"} <= set(run.tags), run.tags
    assert any(t.startswith("commit:") for t in run.tags) and any(t.startswith("r1-owner:") for t in run.tags)
    # the tags are the flow run's alone: a tagged task run waits for the server's tag-concurrency check
    assert tasks and all(t.tags == [] for t in tasks), [(t.name, t.tags) for t in tasks]
