"""GRPO against hand-computed values."""
import math

import pytest
import torch

from r1core.grpo import group_advantages, grpo_loss, kl_to_reference


def test_group_advantages_normalise_within_groups_and_zero_variance_is_zero():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # group 1: mixed, group 2: all equal
    adv, zero_var = group_advantages(rewards, group_size=2, scale=True)
    assert adv[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)  # (r - 0.5) / 0.5
    assert adv[2:].tolist() == [0.0, 0.0]
    assert zero_var.tolist() == [False, False, True, True]
    assert not torch.isnan(adv).any()


def test_group_advantages_without_std_scaling():
    adv, _ = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2, scale=False)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])


def test_token_level_loss_on_policy_is_minus_mean_token_advantage():
    # ratio = 1 everywhere; lengths 2,1,1,1; advantages 1,-1,0,0
    logp = torch.zeros(4, 2)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]])
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    out = grpo_loss(logp, logp, None, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.0, kl_estimator="k3", aggregation="token")
    assert out.loss.item() == pytest.approx(-(1 * 2 - 1 * 1) / 5)
    seq = grpo_loss(logp, logp, None, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.0, kl_estimator="k3",
                    aggregation="sequence")
    assert seq.loss.item() == pytest.approx(-(1 - 1 + 0 + 0) / 4)


def test_clipping_is_asymmetric_and_pessimistic():
    old = torch.zeros(2, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]])  # ratios 1.5 and 0.5
    mask = torch.ones(2, 1)
    out = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, clip_low=0.2, clip_high=0.28,
                    beta=0.0, kl_estimator="k3", aggregation="sequence")
    # sample 1: A=+1, min(1.5, 1.28) = 1.28; sample 2: A=-1, min(-0.5, -0.8) = -0.8
    assert out.loss.item() == pytest.approx(-(1.28 + -0.8) / 2)
    assert out.clip_fraction == pytest.approx(1.0)


def test_k3_kl_value_and_gradient_flows_through_policy():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    assert kl_to_reference(logp, ref, "k3").item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_to_reference(logp, ref, "k1").item() == pytest.approx(math.log(2))
    out = grpo_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28,
                    beta=0.1, kl_estimator="k3", aggregation="token")
    assert out.loss.item() == pytest.approx(0.1 * (0.5 - math.log(0.5) - 1))
    out.loss.backward()
    # d/dlogp of beta*(exp(ref-logp) - (ref-logp) - 1) = beta*(1 - exp(ref-logp)) = 0.1*0.5
    assert logp.grad.item() == pytest.approx(0.05)


def test_policy_gradient_sign():
    logp = torch.zeros(1, 3, requires_grad=True)
    out = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]), torch.ones(1, 3), clip_low=0.2, clip_high=0.28, beta=0.0, kl_estimator="k3", aggregation="token")
    out.loss.backward()
    assert (logp.grad < 0).all()  # descending the loss raises log-probs of a positive-advantage output
