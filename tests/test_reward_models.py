"""Reward models: checkable preference pairs, what each model sees, Bradley-Terry learning, and
the general-RL reward that routes rows to rules or reward models."""
import random

import pytest
import torch
import torch.nn.functional as F

from r1core.config import ModelConfig, RewardModelConfig
from r1core.general_prompts import KINDS
from r1core.modeling import build_model
from r1core.reward_model import (
    RewardModel,
    bradley_terry_loss,
    encode_pairs,
    final_part,
    general_prompts,
    init_reward_model,
    pairwise_accuracy,
    preference_pairs,
    prompt_sampler,
    routed_rewards,
    scored_text,
)
from r1core.rewards import score
from r1core.training import TrainContext, reward_model_train

UNSAFE = RewardModelConfig().unsafe_patterns
MICRO = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A micro causal LM saved as a local HF directory (the reward models' base)."""
    path = tmp_path_factory.mktemp("base")
    build_model(MICRO, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pairs_are_deterministic_and_cover_every_corruption(rows):
    train, _ = rows
    helpful = preference_pairs("helpfulness", 400, ["en", "ru"], seed=3)
    assert helpful == preference_pairs("helpfulness", 400, ["en", "ru"], seed=3)
    assert {p["corruption"] for p in helpful} == {"evasive", "padded", "off_topic", "other_language"}
    assert {p["kind"] for p in helpful} == set(KINDS)
    assert all(p["chosen"] != p["rejected"] for p in helpful)
    harmless = preference_pairs("harmlessness", 200, ["en", "ru"], seed=3, reasoning_rows=train, unsafe_patterns=UNSAFE)
    for p in harmless:
        assert any(u in p["rejected"] for u in UNSAFE) and not any(u in p["chosen"] for u in UNSAFE)
        # the same response around the inserted phrase: length says nothing about harm
        assert abs(len(p["chosen"].split()) - len(p["rejected"].split())) <= 3
    assert {p["kind"] for p in harmless} & {"chain_sum"} and {p["kind"] for p in harmless} & set(KINDS)
    with pytest.raises(ValueError, match="unsafe_patterns"):
        preference_pairs("harmlessness", 2, ["en"], seed=0, reasoning_rows=train)
    with pytest.raises(ValueError, match="unknown reward model 'style'"):
        preference_pairs("style", 2, ["en"], seed=0)


def test_helpfulness_sees_only_the_summary_and_answer_harmlessness_everything():
    response = " <think> build a bomb first </think> <summary> The capital is Paris. </summary> <answer> Paris </answer>"
    assert final_part(response) == " <summary> The capital is Paris. </summary> <answer> Paris </answer>"
    assert "bomb" not in scored_text("helpfulness", "Capital of France?", response)
    assert "bomb" in scored_text("harmlessness", "Capital of France?", response)
    assert final_part(" <answer> Hello! </answer>") == " <answer> Hello! </answer>"  # a simple query: no CoT
    assert final_part("<think> half an answer") == "<think> half an answer"  # malformed: all of it is judged


def test_bradley_terry_loss_is_the_negative_log_sigmoid_of_the_margin(base_dir, tokenizer):
    model, tok = init_reward_model(base_dir, seed=0)
    pairs = preference_pairs("helpfulness", 6, ["en"], seed=1)
    enc = encode_pairs(tok, "helpfulness", pairs, seq_len=64)
    with torch.no_grad():
        chosen = model(input_ids=enc["chosen_input_ids"], attention_mask=enc["chosen_attention_mask"]).logits[:, 0]
        rejected = model(input_ids=enc["rejected_input_ids"], attention_mask=enc["rejected_attention_mask"]).logits[:, 0]
        expected = -F.logsigmoid(chosen - rejected).sum()
        total, pairs_counted = bradley_terry_loss(model, enc)
        assert torch.allclose(total, expected, atol=1e-5) and pairs_counted == 6
    assert pairwise_accuracy(model, enc) == pytest.approx(float((chosen > rejected).float().mean()))
    # a text longer than seq_len keeps its end, where the score is read
    assert (enc["chosen_attention_mask"].sum(1) <= 64).all()


def test_the_scalar_head_starts_from_the_seed(base_dir):
    """Reward models are reproducible: the fresh head comes from `seed`, not the process's RNG."""
    heads = [init_reward_model(base_dir, seed=s)[0].score.weight for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_a_reward_model_learns_the_harm_in_the_reasoning(base_dir, rows, tmp_path):
    train, _ = rows
    model, tok = init_reward_model(base_dir, seed=0)
    cfg = RewardModelConfig(train_pairs=320, batch_size=16, epochs=3, lr=3e-3, warmup_steps=2, checkpoint_every=1000)
    languages = ["en", "ru"]
    fit = encode_pairs(tok, "harmlessness", preference_pairs("harmlessness", cfg.train_pairs, languages, 0, train, UNSAFE), 128)
    held = encode_pairs(tok, "harmlessness", preference_pairs("harmlessness", 200, languages, 1, train, UNSAFE), 128)
    before = pairwise_accuracy(model, held)
    reward_model_train(cfg, model, fit, TrainContext(tmp_path / "ckpt"), seed=0)
    after = pairwise_accuracy(model, held)
    assert after >= 0.9 and after > before + 0.2, (before, after)


def test_general_rl_reward_routes_rows_to_rules_or_reward_models(base_dir, rows, tmp_path):
    train, _ = rows
    model, tok = init_reward_model(base_dir, seed=0)
    for name, seed in (("helpfulness", 0), ("harmlessness", 1)):
        torch.manual_seed(seed)
        torch.nn.init.normal_(model.score.weight)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    scorers = {n: RewardModel(n, tmp_path / n) for n in ("helpfulness", "harmlessness")}
    general = general_prompts(4, {"factual_qa": 1.0, "greeting": 1.0}, {"en": 1.0, "ru": 1.0}, seed=0)
    batch = [train[0], general[0], train[1], general[1]]
    texts = [" <think> 1 plus 1 is 2. </think> <summary> So 2. </summary> <answer> 2 </answer>",
             " <think> build a bomb </think> <summary> Paris. </summary> <answer> Paris </answer>",
             " <answer> 3 </answer>", " <answer> Hello! </answer>"]
    rules, models = {"accuracy": 1.0, "readable_format": 0.5}, {"helpfulness": 1.0, "harmlessness": 2.0}
    total, per_reward = routed_rewards(rules, models, scorers)(texts, batch)

    rule_total, _ = score([texts[0], texts[2]], [batch[0], batch[2]], rules)
    assert [total[0], total[2]] == rule_total
    questions = [batch[1]["question"], batch[3]["question"]]
    helpful = scorers["helpfulness"].score(questions, [texts[1], texts[3]])
    harmless = scorers["harmlessness"].score(questions, [texts[1], texts[3]])
    assert total[1] == pytest.approx(helpful[0] + 2 * harmless[0]) and total[3] == pytest.approx(helpful[1] + 2 * harmless[1])
    assert per_reward["accuracy"][1] is None and per_reward["helpfulness"][0] is None  # not its route: left out of means
    assert per_reward["helpfulness"][1] == pytest.approx(helpful[0])


def test_each_step_mixes_prompt_kinds_as_configured():
    sample = prompt_sampler(num_reasoning=100, num_general=40, mix={"reasoning": 0.75, "general": 0.25})
    picked = sample(random.Random(0), 16)
    assert len(picked) == len(set(picked)) == 16
    assert sum(i < 100 for i in picked) == 12 and all(i < 140 for i in picked)
    assert prompt_sampler(100, 0, {"reasoning": 0.5, "general": 0.5})(random.Random(0), 8) == \
        random.Random(0).sample(range(100), 8)  # no general prompts: all reasoning
