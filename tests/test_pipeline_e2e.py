"""End to end: `r1_pipeline` on the micro profile through real Prefect (test harness), a real
local Ray and a temporary MLflow store; then the registry, the metrics and resumability."""
import json
import os

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("r1")


@pytest.fixture(scope="module")
def prefect_env(workdir):
    from prefect.testing.utilities import prefect_test_harness

    saved = os.environ.get("PREFECT_LOCAL_STORAGE_PATH")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(workdir / "prefect-results")  # the harness doesn't isolate it
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_LOCAL_STORAGE_PATH", None)
        else:
            os.environ["PREFECT_LOCAL_STORAGE_PATH"] = saved


@pytest.fixture(scope="module")
def micro(workdir, write_seed_examples):
    """The micro profile, its pretraining on 2 DDP workers; an untrained micro model writes no
    usable cold-start data, so a seed file of our own examples joins the three routes."""
    from r1core.config import CONFIG_DIR, load_config

    seed_file = workdir / "seed.jsonl"
    seed_file.touch()
    cfg = load_config(CONFIG_DIR / "micro.yaml", [f"runtime.workdir={workdir}", "pretrain.compute.num_workers=2",
                                                   "pretrain.compute.cpus_per_worker=1", f"cold_start.seed_file={seed_file}"])
    write_seed_examples(cfg.data, seed_file)
    return cfg


@pytest.fixture(scope="module")
def pipeline_results(prefect_env, micro):
    import ray

    from flows.pipeline import r1_pipeline

    try:
        yield r1_pipeline(config=micro)
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
        assert (pipeline_results[stage].model_dir and
                os.path.isfile(os.path.join(pipeline_results[stage].model_dir, "config.json")))
    zero_run = pipeline_results["r1_zero"].mlflow_run_id
    for key in ("reward", "accuracy", "format_rate", "response_length", "kl", "clip_fraction", "entropy",
                "gen_tokens_per_s", "train_tokens_per_s", "reward/accuracy", "reward/format"):
        history = client.get_metric_history(zero_run, key)
        assert [m.step for m in history] == [1, 2], key
    rl_run = pipeline_results["reasoning_rl"].mlflow_run_id
    for key in ("reward/language_consistency", "language_mixing_rate", "accuracy"):
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


def test_rejection_sampling_feeds_sft_and_is_tracked(pipeline_results, micro):
    import asyncio

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from r1core.reasoning_tasks import read_rows
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

    async def reasons_table():
        async with get_client() as prefect:
            found = await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rejection-sampling-reasons"])))
            return json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data

    table = {row["count"]: row["value"] for row in asyncio.run(reasons_table())}
    assert table["candidates/reasoning"] == candidates


def test_final_stages_carry_lineage_pass_the_gate_and_are_compared(pipeline_results, micro):
    import asyncio

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

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
    assert files == {"comparison/models.json", "comparison/models.png", "comparison/models.md"}
    evaluated = [k for k, v in r.items() if "pass@1" in v.metrics]
    assert len(evaluated) == 9

    async def comparison():
        async with get_client() as prefect:
            found = await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["r1-model-comparison"])))
            return json.loads(found[0].data) if isinstance(found[0].data, str) else found[0].data

    assert [row["stage"] for row in asyncio.run(comparison())] == evaluated


def test_rerun_skips_completed_stages(pipeline_results, prefect_env, micro):
    from flows.pipeline import r1_pipeline

    again = r1_pipeline(config=micro)
    assert all(r.skipped for r in again.values())
    assert again["r1_zero"].mlflow_run_id == pipeline_results["r1_zero"].mlflow_run_id


def test_r1_eval_cli_on_a_registered_model(pipeline_results, micro, workdir, capsys, monkeypatch):
    from r1core.config import PROJECT_ROOT

    monkeypatch.chdir(PROJECT_ROOT)
    from flows.cli import main

    heldout = micro.run_dir() / "data" / "heldout.jsonl"
    code = main(["eval", "--model", "models:/r1@champion", "--data", str(heldout), "--k", "2",
                 "--config", "configs/micro.yaml", "--set", f"runtime.workdir={workdir}",
                 "--set", "eval.num_prompts=3", "--set", "eval.sampling.max_new_tokens=4"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["k"] == 2 and out["num_prompts"] == 3 and {"pass@1", "cons@2", "format_rate", "mean_length"} <= set(out)
