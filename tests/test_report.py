"""The pipeline's comparison table: each model against the model it trained from, prompt by prompt."""
from tasks.report import comparison_rows, markdown
from tasks.training_stages import StageResult


def _result(tmp_path, stage, init, pass1, readability, **extra):
    return StageResult(stage=stage, model_dir=str(tmp_path / stage / "model"), mlflow_run_id=stage, seconds=1.0,
                       init_model_dir=init, metrics={"pass@1": 0.0, "cons@4": 0.0},
                       per_prompt={"pass@1": pass1, "readability": readability}, **extra)


def test_each_model_is_compared_with_the_model_it_trained_from(tmp_path):
    base = _result(tmp_path, "pretrain_base", None, [0.0, 0.25, 0.0, None], [0.5] * 4)
    # the path it names need not be spelled the same way as the parent's model_dir
    sft = _result(tmp_path, "sft", str(tmp_path / "pretrain_base" / ".." / "pretrain_base" / "model"),
                  [0.5, 0.25, 0.5, None], [1.0] * 4)
    rl = _result(tmp_path, "general_rl", sft.model_dir, [0.5, 0.25, 0.5, 0.75], [1.0] * 4)
    outside = _result(tmp_path, "distill/small/sft", str(tmp_path / "elsewhere"), [0.0] * 4, [0.0] * 4)
    before_scores = _result(tmp_path, "r1_zero", base.model_dir, [], [])  # a result saved before scores were kept
    other_prompts = _result(tmp_path, "reasoning_rl", base.model_dir, [0.5] * 3, [1.0] * 3)
    rows = comparison_rows({"pretrain_base": base, "r1_zero": before_scores, "reasoning_rl": other_prompts,
                            "sft": sft, "general_rl": rl, "distill/small/sft": outside}, k=4)
    by_stage = {r["stage"]: r for r in rows}
    assert [by_stage[s]["trained_from"] for s in by_stage] == ["-", "pretrain_base", "pretrain_base",
                                                               "pretrain_base", "sft", "-"]
    assert by_stage["sft"]["pass@1 change (95%)"].startswith("+0.333 [")  # prompt 4 unscorable for the base
    assert by_stage["sft"]["readability change (95%)"] == "+0.500 [+0.500, +0.500]"
    assert by_stage["general_rl"]["pass@1 change (95%)"] == "+0.000 [+0.000, +0.000]"
    for stage in ("pretrain_base", "r1_zero", "reasoning_rl", "distill/small/sft"):
        assert by_stage[stage]["pass@1 change (95%)"] == by_stage[stage]["readability change (95%)"] == "-"
    assert "trained_from" in markdown(rows).splitlines()[0]


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
