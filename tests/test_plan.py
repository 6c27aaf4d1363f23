"""`r1 plan`: architectures read without weights, the real-model profile planned, plans that
cannot fit refused before Ray starts, and estimates checked against measured peaks."""
import json
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.plan import PlanError, check, plan_all
from r1core.config import load_config
from r1core.memory_plan import GIB, Architecture

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "configs" / "qwen2.5-1.5b.yaml"
# Qwen2.5-1.5B-Instruct's and Qwen2.5-0.5B-Instruct's config.json, dimensions only (no weights here)
QWEN_1_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
             "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
QWEN_0_5B = {**QWEN_1_5B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, cfg in (("qwen-1.5b", QWEN_1_5B), ("qwen-0.5b", QWEN_0_5B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def _profile_args(model_dirs, tmp_path):
    student = f"[{{name: qwen-0-5b, model: {{architecture: qwen2, pretrained_path: {model_dirs / 'qwen-0.5b'}, " \
              "prompt_format: chat_template}}]"
    return ["--config", str(PROFILE), "--set", f"model.pretrained_path={model_dirs / 'qwen-1.5b'}",
            "--set", f"distill.students={student}", "--set", f"runtime.workdir={tmp_path / 'wd'}"]


def test_the_architecture_is_counted_on_the_meta_device(model_dirs):
    arch = Architecture.from_directory(model_dirs / "qwen-1.5b")
    assert arch.parameters == 1_543_714_304  # Qwen2.5-1.5B's published count (tied embeddings once)
    assert (arch.layers, arch.hidden, arch.kv_width, arch.vocab) == (28, 1536, 256, 151936)
    assert arch.root_parameters == 151936 * 1536 + 1536  # embeddings (tied head) + final norm


def test_the_real_model_profile_validates_and_plans(model_dirs, tmp_path, capsys):
    assert main(["config", *_profile_args(model_dirs, tmp_path)]) == 0
    assert main(["plan", *_profile_args(model_dirs, tmp_path)]) == 0
    table = capsys.readouterr().out
    for stage in ("r1_zero", "cold_start_sft", "reasoning_rl", "sft", "reward_models", "general_rl",
                  "distill/qwen-0-5b/sft", "distill/qwen-0-5b/rl_only"):
        assert stage in table
    assert "pretrain_base" not in table and "NO" not in table
    cfg = load_config(PROFILE, _profile_args(model_dirs, tmp_path)[3::2])
    (r1_zero,) = plan_all(cfg, stage="r1_zero")
    P = 1_543_714_304
    assert r1_zero.terms["parameters"] == P * 4 // 8  # fp32 master weights, 1/8 per worker
    assert r1_zero.terms["optimizer"] == 2 * P * 4 // 8
    assert r1_zero.tokens_per_step == 512 * (512 + 4096)
    assert r1_zero.tokens_per_microbatch <= 16384 and r1_zero.total < 80 * GIB


def test_a_plan_that_cannot_fit_is_refused_before_ray_starts(model_dirs, tmp_path, capsys):
    args = _profile_args(model_dirs, tmp_path) + ["--set", "r1_zero.compute.memory_gb=8"]
    assert main(["plan", *args]) == 1
    assert main(["run", "stage", "r1_zero", *args]) == 2
    err = capsys.readouterr().err
    assert "stage r1_zero: estimated" in err and "compute.memory_gb=8" in err and "the largest term is" in err
    assert not (tmp_path / "wd").exists()  # nothing started: no Prefect home, no Ray storage, no run folder
    # the same budget with DDP: the parameters, not the activations, are what does not fit
    ddp = load_config(PROFILE, _profile_args(model_dirs, tmp_path)[3::2] + ["r1_zero.compute.strategy=ddp",
                                                                            "r1_zero.compute.memory_gb=20"])
    with pytest.raises(PlanError, match=r"stage r1_zero: .* largest term is (gradients|optimizer) .* compute.strategy: fsdp"):
        check(ddp, stage="r1_zero")
    # the pipeline flow runs the same check first
    assert main(["run", "pipeline", *args]) == 2


def test_activation_checkpointing_and_micro_batches_shrink_the_plan(model_dirs, tmp_path):
    base = _profile_args(model_dirs, tmp_path)[3::2]
    plans = {}
    for name, extra in {"as profiled": [], "no checkpointing": ["r1_zero.compute.gradient_checkpointing=false"],
                        "no micro-batches": ["r1_zero.compute.max_tokens_per_microbatch=null"]}.items():
        (plans[name],) = plan_all(load_config(PROFILE, base + extra), stage="r1_zero")
    assert plans["no checkpointing"].terms["activations"] > 5 * plans["as profiled"].terms["activations"]
    assert plans["no micro-batches"].terms["activations"] > 10 * plans["as profiled"].terms["activations"]


@pytest.mark.slow
@pytest.mark.parametrize("label", ["naive", "micro+chunk"])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(label):
    """Two cases of bench/memory.py (one GRPO update, peak tensor memory measured) on a smaller
    step: the plan's estimate within 25% of what was measured."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    knobs = memory.NAIVE if label == "naive" else memory.BUDGETED
    case = {"sweep": "test", "label": label, "completions": 8, "length": 128, **knobs}
    measured = memory.run_case(case, gpu=False)
    assert memory.estimate(case, gpu=False) == pytest.approx(measured["peak"], rel=0.25)


def test_prompts_in_the_models_own_chat_template(tokenizer, rows):
    import copy

    from r1core.config import ConfigError, validate_config
    from r1core.problems import R1_SYSTEM_PROMPT, chat_prompts

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rendered = chat_prompts(copy.deepcopy(rows[1][:3]), templated)
    for row, original in zip(rendered, rows[1][:3], strict=True):
        assert row["prompt"] == f"<|system|>{R1_SYSTEM_PROMPT}\n<|user|>{original['question']}\n<|assistant|>"
        assert "User:" not in row["prompt"]  # the plain-text template is replaced, not wrapped
    own = [{"prompt": "What is 2 + 2?", "answer": "4", "task": "chain_sum"}]  # a row of one's own: no question
    assert "<|user|>What is 2 + 2?\n" in chat_prompts(own, templated)[0]["prompt"]
    untemplated = copy.deepcopy(tokenizer)
    untemplated.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompts(copy.deepcopy(rows[1][:1]), untemplated)
    with pytest.raises(ConfigError, match="prompt_format chat_template needs pretrained_path"):
        validate_config({"model": {"prompt_format": "chat_template"}})
