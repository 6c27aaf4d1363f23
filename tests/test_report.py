"""The pipeline's comparison table: each model against the model it trained from, prompt by prompt."""
from tasks.report import comparison_rows, finding_rows, markdown
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



def test_the_papers_findings_are_paired_comparisons_with_a_verdict(tmp_path):
    up, same, down = [0.5] * 8, [0.25] * 8, [0.0] * 8
    results = {
        "pretrain_base": _result(tmp_path, "pretrain_base", None, same, same),
        "r1_zero": _result(tmp_path, "r1_zero", None, up, down),
        "cold_start_sft": _result(tmp_path, "cold_start_sft", None, same, up),
        "reasoning_rl": _result(tmp_path, "reasoning_rl", None, [0.25, 0.5] * 4, up),  # noisy: within it
        "distill/small/sft": _result(tmp_path, "distill/small/sft", None, down, up),
        "distill/small/rl_only": _result(tmp_path, "distill/small/rl_only", None, same, down),
        "distill/tiny/sft": _result(tmp_path, "distill/tiny/sft", None, up, up),  # its twin did not run
    }
    rows = {r["finding"]: r for r in finding_rows(results)}
    assert rows["R1-Zero above the base"]["difference (95%)"] == "+0.250 [+0.250, +0.250]"
    assert rows["R1-Zero above the base"]["interval"] == "above zero"
    assert rows["cold start more readable than R1-Zero"]["metric"] == "readability"
    assert rows["cold start more readable than R1-Zero"]["interval"] == "above zero"
    assert rows["reasoning RL above its cold-start model"]["interval"] == "above zero"  # +0.125 on every prompt pair
    assert rows["distilled student small above its RL-only twin"]["interval"] == "below zero"
    # stages this run lacks (sft, general_rl, the tiny student's twin) give no row
    assert set(rows) == {"R1-Zero above the base", "cold start more readable than R1-Zero",
                         "reasoning RL above its cold-start model", "distilled student small above its RL-only twin"}
    noisy = {**results, "reasoning_rl": _result(tmp_path, "reasoning_rl", None, [0.0, 0.5] * 4, up)}
    assert {r["finding"]: r for r in finding_rows(noisy)}["reasoning RL above its cold-start model"]["interval"] \
        == "within noise"


def test_the_language_consistency_ablation_is_a_finding_on_mixing_where_it_ran(tmp_path):
    from tasks.report import LC_ABLATION

    def with_mixing(stage, mixing):
        r = _result(tmp_path, stage, None, [0.25] * 8, [1.0] * 8)
        return r.model_copy(update={"per_prompt": {**r.per_prompt, "language_mixing": mixing}})

    results = {"reasoning_rl": with_mixing("reasoning_rl", [0.0] * 6 + [0.25] * 2)}
    assert finding_rows(results) == []  # no ablation in this run: no row
    finding = "language-consistency reward cuts mixing (mixing without it - with it)"
    mixes_more = {**results, LC_ABLATION: with_mixing("reasoning_rl", [0.5, 0.25] * 4)}
    row = {r["finding"]: r for r in finding_rows(mixes_more)}[finding]
    assert row["metric"] == "language_mixing" and row["interval"] == "above zero"
    assert row["difference (95%)"].startswith("+0.312 [")
    mixes_less = {"reasoning_rl": with_mixing("reasoning_rl", [0.25] * 8), LC_ABLATION: with_mixing("reasoning_rl", [0.0] * 8)}
    assert {r["finding"]: r for r in finding_rows(mixes_less)}[finding]["interval"] == "below zero"
