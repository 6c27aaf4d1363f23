"""Shared-prompt training (`compute.rollout_layout: shared_prompt`): one row per GRPO group, the
prompt computed once and each completion attending to it alone. Its log-probs, GRPO loss and
gradients must be the padded layout's (one row per rollout), whatever the group sizes, lengths,
micro-batch budget and attention implementation."""
import random

import pytest
import torch

from r1core.batching import collate_rollouts, split_rollouts
from r1core.config import GRPOConfig, ModelConfig, TrainComputeConfig
from r1core.grpo import grpo_loss
from r1core.logprobs import TokenScorer
from r1core.modeling import build_model
from r1core.training import TrainContext, TrainSequence, accumulate, policy_update

MICRO = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
TOL = {"rtol": 1e-4, "atol": 1e-6}  # fp32; the two layouts sum attention over different widths


def _groups(seed: int, groups: int = 4, sizes=(1, 2, 3, 5, 8), prompt_len=(3, 40), completion_len=(1, 20)):
    """GRPO-shaped rollouts: `groups` prompts, each followed by its group of completions."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(groups):
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(*prompt_len))]
        for _ in range(rng.choice(sizes)):
            prompts.append(prompt)
            completions.append([rng.randrange(5, 300) for _ in range(rng.randint(*completion_len))])
    return prompts, completions


def _scorer(tokenizer, seed=0, attention="sdpa"):
    model = build_model(MICRO, tokenizer, seed=seed)
    model.config._attn_implementation = attention
    return TokenScorer(model, chunk_tokens=16)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_group_is_one_row_with_its_prompt_once(tokenizer):
    prompts, completions = _groups(seed=0, groups=3, sizes=(4,), prompt_len=(30, 30), completion_len=(5, 5))
    shared = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="shared_prompt")
    padded = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="padded")
    assert shared.input_ids.shape == (3, 30 + 4 * 5)
    assert padded.input_ids.shape == (12, 30 + 5)
    assert shared.attention_mask.shape == (3, 1, 50, 50) and shared.attention_mask.dtype == torch.bool
    visible = shared.attention_mask[0, 0]
    assert visible[35, :30].all() and not visible[35, 30:35].any() and visible[35, 35].item()  # completion 2: the prompt, itself
    assert not visible[29, 30:].any()  # the prompt sees no completion
    # a completion's positions continue the prompt's, as in its own row
    assert shared.position_ids[0, 30:35].tolist() == shared.position_ids[0, 35:40].tolist() == list(range(30, 35))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prompt_logprobs_equal_the_padded_layouts(tokenizer, attention, seed):
    scorer = _scorer(tokenizer, attention=attention)
    prompts, completions = _groups(seed)
    with torch.no_grad():
        a, _ = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="padded").scored(scorer)
        shared = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="shared_prompt")
        b, _ = shared.scored(scorer)
    torch.testing.assert_close(b, a, **TOL)
    assert torch.isfinite(b).all()


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_gives_the_padded_layouts_loss_and_gradients(tokenizer, aggregation, attention):
    """The prompt's gradient, accumulated once over its G completions, is the sum of the G rows'."""
    prompts, completions = _groups(seed=5)
    advantages = torch.linspace(-1, 1, len(prompts))
    with torch.no_grad():
        ref = _scorer(tokenizer, seed=1, attention=attention)

    def loss_and_grads(layout, max_tokens):
        scorer = _scorer(tokenizer, attention=attention)
        groups = split_rollouts(prompts, completions, max_tokens, layout)

        def micro_loss(model, idx):
            mb = collate_rollouts([prompts[i] for i in idx], [completions[i] for i in idx], 0, layout=layout)
            logp, _ = mb.scored(model)
            with torch.no_grad():
                ref_logp, _ = mb.scored(ref)
            out = grpo_loss(logp, logp.detach() + 0.1, ref_logp, advantages[idx], mb.completion_mask(),
                            clip_low=0.2, clip_high=0.28, beta=0.05, kl_estimator="k3", aggregation=aggregation)
            return out.total, out.count

        loss = accumulate(scorer, groups, micro_loss, TrainContext("unused"))
        return loss, _grads(scorer), len(groups)

    whole_loss, whole, _ = loss_and_grads("padded", None)
    for max_tokens in (None, 120, 60):
        loss, grads, n = loss_and_grads("shared_prompt", max_tokens)
        assert n > 1 or max_tokens is None
        assert loss == pytest.approx(whole_loss, rel=1e-5, abs=1e-7)
        for k, g in whole.items():
            torch.testing.assert_close(grads[k], g, **TOL, msg=f"{k} (budget {max_tokens})")


def test_policy_update_takes_the_same_step_in_every_layout(tokenizer):
    """GRPO's whole update (micro-batches, clip, optimizer step) from the same weights: the same
    loss and the same weights after it, padded, packed or sharing prompts."""
    prompts, completions = _groups(seed=7, groups=5)
    seqs = [TrainSequence(p, c, a) for p, c, a in zip(prompts, completions, torch.linspace(-1, 1, len(prompts)).tolist(),
                                                        strict=True)]
    results = {}
    for layout in ("padded", "packed", "shared_prompt"):
        cfg = GRPOConfig(beta=0.04, compute=TrainComputeConfig(rollout_layout=layout, max_tokens_per_microbatch=150))
        policy, reference = _scorer(tokenizer), _scorer(tokenizer, seed=1)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        out = policy_update(cfg, policy, reference, optimizer, seqs, tokenizer.pad_token_id, TrainContext("unused"))
        results[layout] = out, {n: p.detach().clone() for n, p in policy.named_parameters()}
    base_out, base_weights = results["padded"]
    for layout in ("packed", "shared_prompt"):
        out, weights = results[layout]
        for key in ("loss", "kl", "policy_loss", "grad_norm", "entropy"):
            assert out[key] == pytest.approx(base_out[key], rel=1e-4, abs=1e-6), (layout, key)
        for n, w in base_weights.items():
            torch.testing.assert_close(weights[n], w, **TOL, msg=f"{layout}: {n}")


@pytest.mark.parametrize("seed", range(30))
def test_split_rollouts_keeps_every_rollout_once_within_the_budget(seed):
    """A fuzz of group sizes, lengths and budgets (a prompt repeated in a later group included)."""
    rng = random.Random(seed)
    prompts, completions = _groups(seed, groups=rng.randint(1, 6), sizes=(1, 2, 4, 8, 16), prompt_len=(1, 30),
                                   completion_len=(1, 30))
    if rng.random() < 0.3:  # the first group's prompt again, later and not adjacent
        prompts += [prompts[0]] * 2
        completions += [[7] * rng.randint(1, 9), [8]]
    budget = rng.choice([None, 16, 40, 100, 400])
    groups = split_rollouts(prompts, completions, budget, "shared_prompt")
    assert [i for g in groups for i in g] == list(range(len(prompts)))  # in order, each once
    for g in groups:
        assert g, "an empty micro-batch"
        mb = collate_rollouts([prompts[i] for i in g], [completions[i] for i in g], 0, layout="shared_prompt")
        if budget is not None and mb.input_ids.shape[0] > 1:
            assert mb.input_ids.numel() <= budget  # rows x width, as the padded cost
        assert int(mb.completion_mask().sum()) == sum(len(completions[i]) for i in g)
        assert mb.targets.tolist() == [t for i in g for t in completions[i]]


def test_a_flash_attention_model_refuses_the_shared_mask(tokenizer):
    scorer = _scorer(tokenizer, attention="flash_attention_2")
    prompts, completions = _groups(seed=0, groups=1, sizes=(2,))
    mb = collate_rollouts(prompts, completions, 0, layout="shared_prompt")
    with pytest.raises(ValueError, match=r"shared_prompt\) needs sdpa or eager"):
        mb.scored(scorer)
