"""The promotion gate on a real MLflow registry (SQLite in a temp dir) inside real Prefect flows:
a first version becomes champion, a worse challenger does not move `champion`, a better one
does, and each decision is logged with its numbers."""

from pathlib import Path

from conftest import write_model_dir
from test_training import MICRO

from r1core.config import PipelineConfig
from tasks import tracking
from tasks.promotion import CHALLENGER, CHAMPION, decide


def _version(cfg: PipelineConfig, model_dir, pass1: float, cons: float) -> tuple[str, str]:
    """A registered `r1` version whose run carries these held-out numbers."""
    run_id = tracking.start_run(cfg.runtime, "general_rl", tags={"stage": "general_rl"})
    tracking.log_metrics(tracking.client_for(cfg.runtime), run_id, {"eval/pass@1": pass1, f"eval/cons@{cfg.eval.k}": cons})
    tracking.end_run(cfg.runtime, run_id)
    return f"r1/{tracking.register_model(cfg.runtime, run_id, model_dir, 'r1')}", run_id


def test_decision_needs_both_metrics_to_clear_the_margin():
    metrics = ("pass@1", "cons@4")
    assert decide({"pass@1": 0.5, "cons@4": 0.5}, None, 0.01, metrics).promoted
    assert decide({"pass@1": 0.52, "cons@4": 0.52}, {"pass@1": 0.5, "cons@4": 0.5}, 0.01, metrics).promoted
    refused = decide({"pass@1": 0.6, "cons@4": 0.505}, {"pass@1": 0.5, "cons@4": 0.5}, 0.01, metrics)
    assert not refused.promoted and "cons@4 0.5050 < champion 0.5000 + margin 0.01" in refused.reason
    assert not decide({"pass@1": 0.505, "cons@4": 0.6}, {"pass@1": 0.5, "cons@4": 0.5}, 0.01, metrics).promoted


def test_gate_promotes_and_refuses(prefect_harness, tmp_path, monkeypatch, tokenizer):
    from prefect import flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # this test's own store under tmp_path
    from tasks.promotion import promote

    cfg = PipelineConfig(runtime={"workdir": str(tmp_path)})
    model_dir = Path(write_model_dir(tmp_path / "model", MICRO, tokenizer, seed=0))  # registered as an MLflow Model
    client = tracking.client_for(cfg.runtime)
    k = cfg.eval.k

    @flow
    def gate(registered: str, run_id: str, pass1: float, cons: float):
        return promote(cfg, registered, run_id, {"pass@1": pass1, f"cons@{k}": cons})

    first, run1 = _version(cfg, model_dir, 0.50, 0.50)
    assert gate(first, run1, 0.50, 0.50).promoted
    assert str(client.get_model_version_by_alias("r1", CHAMPION).version) == "1"

    worse, run2 = _version(cfg, model_dir, 0.45, 0.55)
    decision = gate(worse, run2, 0.45, 0.55)
    assert not decision.promoted and decision.champion == {"pass@1": 0.50, f"cons@{k}": 0.50}
    assert str(client.get_model_version_by_alias("r1", CHAMPION).version) == "1"  # champion did not move
    assert str(client.get_model_version_by_alias("r1", CHALLENGER).version) == "2"
    logged = client.get_run(run2).data
    assert logged.metrics["gate/promoted"] == 0.0 and logged.metrics["gate/champion/pass_at_1"] == 0.50
    assert logged.tags["promotion"] == "refused" and "pass@1 0.4500 < champion 0.5000" in logged.tags["promotion_reason"]
    assert client.get_model_version("r1", "2").tags["promotion"].startswith("refused")

    better, run3 = _version(cfg, model_dir, 0.60, 0.58)
    assert gate(better, run3, 0.60, 0.58).promoted
    assert str(client.get_model_version_by_alias("r1", CHAMPION).version) == "3"
    assert client.get_run(run3).data.tags["champion_before"] == "1"
    # registration is idempotent (its task is retried): the same run registers no second version
    assert tracking.register_model(cfg.runtime, run3, model_dir, "r1") == "3"
    assert len(client.search_model_versions("name = 'r1'")) == 3


def test_only_idempotent_tasks_are_retried():
    """Retries (with backoff) on the tasks that only read files or write idempotently; none on
    training, generation or evaluation, which Ray Train restarts and re-runs resume."""
    from tasks import cold_start, rejection_sampling, report, training_stages

    retried = [training_stages.prepare_data, training_stages.register, rejection_sampling.read_prompts,
               report.publish_stage_summary]
    not_retried = [training_stages.pretrain, training_stages.grpo, training_stages.sft, training_stages.reward_model,
                   training_stages.evaluate_stage, cold_start.build_candidates, rejection_sampling.generate,
                   report.compare_models]  # MLflow's log_table appends: not idempotent
    assert all(t.retries == 2 and t.retry_delay_seconds for t in retried), [t.name for t in retried if not t.retries]
    assert not any(t.retries for t in not_retried), [t.name for t in not_retried if t.retries]


def test_the_stage_summary_names_the_steps_whose_rollout_mismatch_was_a_warning(tmp_path, prefect_harness):
    """A real MLflow store and Prefect's harness: the markdown artifact an operator reads."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from r1core.config import load_config
    from tasks import tracking
    from tasks.report import mismatch_lines, publish_stage_summary

    cfg = load_config("configs/micro.yaml", [f"runtime.workdir={tmp_path}"])
    client = tracking.client_for(cfg.runtime)
    run = client.create_run(client.create_experiment("mismatch")).info.run_id
    kls = [0.001, 0.05, 0.002, 0.3]
    for step, kl in enumerate(kls, start=1):
        client.log_metric(run, "rollout/mismatch_kl", kl, step=step)
        client.log_metric(run, "rollout/mismatch_warning", float(kl > cfg.rollout.mismatch_warn_kl), step=step)
        client.log_metric(run, "rollout/logp_abs_diff", kl * 2, step=step)
        client.log_metric(run, "rollout/staleness", 1.0, step=step)
    lines = mismatch_lines(client, run, cfg.rollout.mismatch_warn_kl)
    assert "at 2 step(s)" in lines[1] and [row.split(" | ")[0] for row in lines[5:]] == ["| 2", "| 4"]
    assert "| 4 | 0.3 | 0.6 | 1 |" in lines
    quiet = client.create_run(client.create_experiment("quiet")).info.run_id
    client.log_metric(quiet, "rollout/mismatch_kl", 0.004, step=1)
    assert mismatch_lines(client, quiet, 0.01) == ["", "Rollout-vs-trainer mismatch: no step above KL 0.01 "
                                                       "(largest 0.004)."]
    in_process = client.create_run(client.create_experiment("in-process")).info.run_id
    assert mismatch_lines(client, in_process, 0.01) == []

    publish_stage_summary.fn(cfg, "reasoning_rl", run, {"reward": 0.5}, str(tmp_path / "model"))

    async def read():
        async with get_client() as prefect:
            return await prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["reasoning-rl"])))

    artifact = asyncio.run(read())[-1]
    assert "Warning: rollout-vs-trainer mismatch above KL 0.01 at 2 step(s)" in artifact.data
