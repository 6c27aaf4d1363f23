import json
import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from r1core.config import CONFIG_DIR, ConfigError, load_config, validate_config


def test_default_profile_loads_and_overrides_apply():
    cfg = load_config(overrides=["r1_zero.steps=3", "data.task_mix={chain_sum: 1.0}"])
    assert cfg.profile == "tiny" and cfg.r1_zero.steps == 3 and cfg.data.task_mix == {"chain_sum": 1.0}


@pytest.mark.parametrize("overrides,field", [
    (["r1_zero.stepz=3"], "r1_zero.stepz"),
    (["r1_zero.steps=many"], "r1_zero.steps"),
    (["model.hidden_size=-1"], "model.hidden_size"),
    (["r1_zero.rewards={accuracy: 1, vibes: 1}"], "r1_zero.rewards"),
    (["data.task_mix={sudoku: 1}"], "data.task_mix"),
    (["data.train_file=/nope/train.jsonl"], "data.train_file"),
    (["model.pretrained_path=/nope/model"], "model.pretrained_path"),
    (["general_rl.model_rewards={helpfulness: 1, style: 1}"], "general_rl.model_rewards"),
    (["general_rl.prompt_mix={reasoning: 1, chitchat: 1}"], "general_rl.prompt_mix"),
    (["distill.students=[{name: a}, {name: a}]"], "distill.students"),
    (["distill.students=[{name: Big_One}]"], "distill.students.0.name"),
    (["reward_models.unsafe_patterns=[]"], "reward_models.unsafe_patterns"),
    (["promotion.margin=-0.1"], "promotion.margin"),
])
def test_bad_fields_are_named(overrides, field):
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        load_config(overrides=overrides)


def test_missing_file_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="config file not found: '/nope.yaml'"):
        load_config("/nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(overrides=["r1_zero.steps"])


def test_digest_ignores_where_it_runs_but_not_science_nor_seed():
    a = validate_config({})
    assert a.digest() == validate_config({"runtime": {"workdir": "/elsewhere"}}).digest()
    assert a.digest() != validate_config({"r1_zero": {"lr": 0.5}}).digest()
    # the seed changes every result: another seed's run must not find this one's stages complete
    assert a.digest() != validate_config({"runtime": {"seed": 1}}).digest()


def test_cli_rejects_bad_config_before_any_training(tmp_path):
    """Exit code 2 and the field named; no run directory is created."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "pipeline", "--set", "pretrain.stepz=1",
         "--set", f"runtime.workdir={tmp_path}"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "field 'pretrain.stepz'" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_tiny_profile_is_the_default_the_prefect_form_shows():
    from r1core.config import DEFAULT_CONFIG, DEFAULT_PROFILE

    assert load_config(DEFAULT_PROFILE) == DEFAULT_CONFIG


def test_flow_parameters_are_typed_for_the_prefect_ui():
    """The pipeline flow's parameter schema is the pydantic config (a form with defaults)."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import r1_pipeline

    schema = parameter_schema(r1_pipeline.fn).model_dump_for_openapi()
    config = schema["definitions"]["PipelineConfig"]["properties"]
    assert {"model", "data", "pretrain", "r1_zero", "reward_models", "general_rl", "promotion", "distill", "eval",
            "runtime"} <= set(config)
    grpo = schema["definitions"]["GRPOConfig"]["properties"]
    assert grpo["group_size"]["default"] == 8 and "completions sampled per prompt" in grpo["group_size"]["description"]


def test_overriding_one_field_keeps_the_stage_defaults():
    """A partial section (`--set reasoning_rl.steps=3`) keeps the stage's own defaults: the
    reasoning-RL stage never silently loses its language-consistency reward."""
    cfg = load_config(overrides=["reasoning_rl.steps=3"])
    assert cfg.reasoning_rl.steps == 3 and cfg.reasoning_rl.rewards["language_consistency"] == 1.0
    assert "language_consistency" not in cfg.r1_zero.rewards


def _config_fields(model, seen=None):
    """(model, field name, FieldInfo) of every field reachable from `model`, nested models too."""
    import typing

    from pydantic import BaseModel

    seen = set() if seen is None else seen
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        yield model, name, info
        pending = [info.annotation]
        while pending:
            t = pending.pop()
            pending += typing.get_args(t)
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _config_fields(t, seen)


def test_every_config_field_has_a_description():
    """The Prefect UI form and `r1 config` explain every field: none may lack a description."""
    from r1core.config import PipelineConfig

    fields = list(_config_fields(PipelineConfig))
    assert len(fields) > 190  # every nested section was walked
    missing = [f"{m.__name__}.{n}" for m, n, info in fields if not (info.description or "").strip()]
    assert not missing, missing


def test_a_partial_section_keeps_the_fields_own_defaults():
    """A profile that sets a few fields of a section keeps the rest of *that field's* defaults
    (the pipeline's R1-Zero has 16 steps and samples at 0.8; SFT of stage 6 runs 2 epochs, the student's 4), at
    every depth; dict-valued fields (reward weights) are replaced whole; typos still fail."""
    from pydantic import ValidationError

    from r1core.config import DEFAULT_CONFIG, PipelineConfig

    cfg = PipelineConfig.model_validate({"r1_zero": {"lr": 3e-4, "sampling": {"max_new_tokens": 8}},
                                         "sft": {"lr": 1e-4}, "distill": {"sft": {"batch_size": 4}},
                                         "reasoning_rl": {"rewards": {"accuracy": 1.0}}})
    assert (cfg.r1_zero.steps, cfg.r1_zero.lr) == (DEFAULT_CONFIG.r1_zero.steps, 3e-4) == (16, 3e-4)
    assert cfg.r1_zero.sampling.temperature == 0.8 and cfg.r1_zero.sampling.max_new_tokens == 8
    assert cfg.sft.epochs == DEFAULT_CONFIG.sft.epochs == 2 and cfg.distill.sft.epochs == DEFAULT_CONFIG.distill.sft.epochs == 4
    assert cfg.reasoning_rl.rewards == {"accuracy": 1.0}
    assert cfg.rejection_sampling.sampling == DEFAULT_CONFIG.rejection_sampling.sampling
    with pytest.raises(ValidationError, match="r1_zero.sampling.temprature"):
        PipelineConfig.model_validate({"r1_zero": {"sampling": {"temprature": 1.0}}})


GOOD_RUN_NAMES = ["from-the-browser", "tiny-2a4118a53b", "exp_1.v2", "тест-запуск", "实验", "x" * 100]
BAD_RUN_NAMES = ["../x", "a/b", "/abs", "a\\b", "..", ".", ".hidden", "-rf", "", " ", "a b", "x\x00y", "x\n",
                 "x" * 101, "C:", "\u202eevil", "a;b", "$(id)", "%2e%2e", "name/../../etc"]


@pytest.mark.parametrize("name", GOOD_RUN_NAMES)
def test_a_run_name_is_one_folder_name(tmp_path, name):
    cfg = load_config(None, [f"runtime.workdir={tmp_path}", f"run_name={json.dumps(name)}"])
    assert cfg.run_dir().parent == (tmp_path / "runs").resolve() and cfg.run_dir().name == name


@pytest.mark.parametrize("name", BAD_RUN_NAMES)
def test_a_run_name_that_is_a_path_or_odd_is_refused_naming_the_field(name):
    from r1core.config import RunRequest

    with pytest.raises(ConfigError, match="run_name"):
        load_config(None, [f"run_name={json.dumps(name)}"])
    with pytest.raises(ValidationError, match="run_name"):  # the run form refuses it as it is submitted
        RunRequest(run_name=name)


def test_the_run_form_request_refuses_what_the_config_refuses():
    from r1core.config import PROFILES, RunRequest

    assert set(PROFILES) == {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    for bad in ({"profile": "nope"}, {"profile": "../configs/tiny"}, {"r1_zero_steps": 0}, {"rl_lr": -1.0},
                {"seed": "x"}, {"settings": "eval.k=3"}, {"unknown": 1}, {"settings": [3]}):
        with pytest.raises(ValidationError):
            RunRequest.model_validate(bad)
    for settings, field in ((["eval.k"], "eval.k"), (["eval.k=[1"], "eval.k"), (["eval.kk=3"], "eval.kk"),
                            (["eval=3"], "eval"), (["eval.k.x=1"], "eval.k"), (["r1_zero.steps=-2"], "r1_zero.steps")):
        with pytest.raises(ConfigError, match=re.escape(field)):
            RunRequest(profile="micro", settings=settings).resolve()
    # a field set in the form wins over the same key in settings; the profile's values otherwise
    cfg = RunRequest(profile="micro", r1_zero_steps=5, settings=["r1_zero.steps=9", "eval.k=3"]).resolve()
    assert cfg.r1_zero.steps == 5 and cfg.eval.k == 3
    assert cfg.reasoning_rl == load_config(CONFIG_DIR / "micro.yaml").reasoning_rl


def test_random_settings_never_crash_the_run_form(tmp_path):
    """Open-ended input: any list of settings gives a config or a ConfigError, nothing else."""
    import random

    from r1core.config import RunRequest

    rng = random.Random(0)
    keys = ["eval.k", "r1_zero.steps", "run_name", "data.train_file", "model", "runtime.seed", "x.y.z", "", ".",
            "r1_zero..lr", "eval.sampling.top_p", "rollout.backend"]
    values = ["3", "-1", "[1, 2]", "{a: 1}", "null", "'", "\x00", "é" * 50, "1e309", "True", "../..", "&a *a",
              "!!python/object:os.system", "0x10", "" * 3, "~"]
    outcomes = {"config": 0, "refused": 0}
    for _ in range(300):
        settings = [f"{rng.choice(keys)}{rng.choice(['=', '', '=='])}{rng.choice(values)}"
                    for _ in range(rng.randint(1, 3))]
        request = RunRequest(profile=rng.choice(["micro", "tiny"]), settings=[f"runtime.workdir={tmp_path}", *settings])
        try:
            request.resolve()
            outcomes["config"] += 1
        except ConfigError as e:
            assert str(e), settings
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 0, outcomes
