"""bench/tune.py's candidates: each one is a valid config of every section it may tune (a
misspelt field or a bad value fails before any training), and the validation split it scores on
is held out of the distilled student's SFT examples."""
from __future__ import annotations

import importlib.util

import pytest
from pydantic import ValidationError

from r1core.config import PROJECT_ROOT, load_config

spec = importlib.util.spec_from_file_location("tune_bench", PROJECT_ROOT / "bench" / "tune.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
CFG = load_config(PROJECT_ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("section", list(bench.START_MODEL))
def test_every_candidate_is_a_valid_config_of_its_section(section):
    base = CFG.section(section)
    for name, change in bench.candidates_of(section).items():
        recipe = bench.candidate_recipe(base, change)
        assert type(recipe) is type(base)
        assert all(getattr(recipe, k) == getattr(type(base).model_validate({**base.model_dump(), k: v}), k)
                   for k, v in change.items()), name
        if hasattr(recipe, "checkpoint_every"):
            assert recipe.checkpoint_every == 10_000  # a candidate never resumes another's checkpoint
    assert bench.candidate_recipe(base, {}).model_dump(exclude={"checkpoint_every"}) == \
        base.model_dump(exclude={"checkpoint_every"})  # "profile" is the profile


@pytest.mark.parametrize("change", [{"stepz": 3}, {"lr": -1.0}, {"rewards": {"no_such_reward": 1.0}},
                                    {"prompts_per_step": 0}, {"epochs": "many"}])
def test_a_bad_candidate_is_refused_before_training(change):
    section = "distill.sft" if "epochs" in change else "reasoning_rl"
    with pytest.raises(ValidationError):
        bench.candidate_recipe(CFG.section(section), change)


def test_sft_examples_of_validation_prompts_are_left_out():
    validation = [{"prompt": "p1"}, {"prompt": "p3"}]
    examples = [{"prompt": p, "completion": c} for p, c in [("p1", "a"), ("p2", "b"), ("p3", "c"), ("p2", "d")]]
    assert [e["completion"] for e in bench.outside(examples, validation)] == ["b", "d"]
    assert bench.outside(examples, []) == examples


def test_general_rl_candidates_report_the_reward_models_first_and_last_step():
    recipe = CFG.section("general_rl")
    history = [(1, {"reward/helpfulness": -2.5, "reward/harmlessness": 0.5, "loss": 1.0}),
               (2, {"reward/helpfulness": -1.0, "loss": 0.5})]  # a step without harmlessness rows
    assert bench.model_rewards(recipe, history) == "helpfulness -2.50 -> -1.00, harmlessness 0.50 -> nan"
    assert bench.model_rewards(CFG.section("reasoning_rl"), history) == ""
    assert bench.model_rewards(recipe, []) == ""
