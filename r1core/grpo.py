"""Group Relative Policy Optimization (DeepSeekMath / DeepSeek-R1, eq. 1-3).

For each question q, sample a group of G outputs {o_1..o_G} from the old policy, score them
with rule rewards r_i, and maximise

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min( ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i ) - β D_KL ) ]

    ρ_it = π_θ(o_it | q, o_i<t) / π_θold(o_it | q, o_i<t)          (importance ratio)
    A_i  = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                   (group-relative advantage)
    D_KL = π_ref/π_θ - log(π_ref/π_θ) - 1                           (k3, unbiased, always >= 0)

There is no value model: the group mean is the baseline. A group whose rewards are all equal
carries no signal; its advantage is 0 (never NaN). With `loss_aggregation="token"` every token
of the batch weighs the same (DAPO); "sequence" is the paper's 1/|o_i| per-output mean.

π_θold is the policy that sampled the batch. With one optimisation pass per batch
(`inner_epochs: 1`, the default) π_θ = π_θold at the only pass, so ρ = 1, the clip never acts
and the objective is the plain policy gradient A_i ∇log π_θ (plus the KL term); the clip range
matters from the second pass on (`inner_epochs > 1`), and `clip_fraction` is measured there.

Rollouts from another engine or an older policy (`rollout.backend: workers | vllm`,
`max_staleness` k >= 1) were sampled by a behaviour policy μ, not by π_θold: its log-probs come
with the rollout. The update then weighs each token by the truncated importance weight (TIS)

    w_t = min( π_θold(o_t) / μ(o_t), C )                            (detached; C = rollout.tis_cap)

so the surrogate's expectation is over π_θold again, with bounded variance. μ vs π_θold on the
same tokens is also the mismatch a training run must watch: mean |Δ log p| and the k3 estimate of
KL(μ || π_θold), which under staleness includes the policy's lag.

The settings (ε, β, estimator, aggregation) are keyword arguments without defaults: the only
defaults are the config's (`r1core.config.GRPOConfig`). The log-probs come from
`r1core.logprobs` (chunked, never the [B, T, V] tensor) on batches laid out by `r1core.batching`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool, eps: float = 1e-6):
    """A_i = (r_i - mean_group) / std_group, for rewards laid out group after group.

    Returns (advantages, zero_variance) where zero_variance marks outputs of groups whose
    rewards are all equal: their advantage is exactly 0."""
    r = rewards.view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    zero_variance = std < eps
    centered = r - mean
    advantages = torch.where(zero_variance, torch.zeros_like(r), centered / (std + eps) if scale else centered)
    return advantages.view(-1), zero_variance.expand_as(r).reshape(-1)


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from samples of π_θ (Schulman's k1 / k3)."""
    log_ratio = ref_logp - logp  # log π_ref/π_θ
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator '{estimator}' (k1 or k3)")


@dataclass
class GRPOLoss:
    total: torch.Tensor  # Σ over tokens ("token") or over outputs of their token mean ("sequence")
    count: float  # what `total` summed: tokens or outputs; the loss is total / count over the step
    policy_loss_sum: float  # Σ over tokens of the clipped surrogate (diagnostics, per token)
    kl_sum: float
    clipped_tokens: float
    tokens: float
    # behaviour policy μ vs π_θold on the same tokens (0 without behaviour log-probs)
    is_weight_sum: float = 0.0  # Σ w_t
    is_weight_max: float = 0.0
    is_truncated_tokens: float = 0.0  # tokens whose weight was capped
    logp_abs_diff_sum: float = 0.0  # Σ |log π_θold - log μ|
    mismatch_kl_sum: float = 0.0  # Σ k3 estimate of KL(μ || π_θold)
    entropy_sum: float = 0.0  # Σ policy entropy over the tokens (filled in by the caller, a diagnostic)

    @property
    def loss(self) -> torch.Tensor:
        """The loss when this batch is the whole step."""
        return self.total / max(self.count, 1.0)

    @property
    def policy_loss(self) -> float:
        return self.policy_loss_sum / max(self.tokens, 1.0)

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.tokens, 1.0)

    @property
    def clip_fraction(self) -> float:
        return self.clipped_tokens / max(self.tokens, 1.0)


def grpo_loss(
    logp: torch.Tensor,  # [B, T] log π_θ of the sampled tokens
    old_logp: torch.Tensor,  # [B, T] log π_θold (the policy that sampled them)
    ref_logp: torch.Tensor | None,  # [B, T] log π_ref (frozen reference), None when β = 0
    advantages: torch.Tensor,  # [B] one advantage per output, shared by its tokens
    mask: torch.Tensor,  # [B, T] 1 on completion tokens, 0 on padding
    *,
    clip_low: float,  # ε_low
    clip_high: float,  # ε_high
    beta: float,  # β
    kl_estimator: str,  # "k1" or "k3"
    aggregation: str,  # "token" or "sequence"
    behaviour_logp: torch.Tensor | None = None,  # [B, T] log μ of the engine that sampled, if not π_θold
    tis_cap: float | None = None,  # C (needed with behaviour_logp)
) -> GRPOLoss:
    """The negated objective as a sum and what it sums: a step split into micro-batches (and
    workers) divides the sum of its parts by the sum of their counts, which is the one-batch
    loss exactly (`r1core.training.accumulate`)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    A = advantages.unsqueeze(1)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * A
    per_token = -torch.min(unclipped, clipped)  # pessimistic bound: gradient ascent on J
    if behaviour_logp is not None:
        log_w = (old_logp - behaviour_logp).detach()
        weight = torch.exp(log_w).clamp(max=tis_cap)
        per_token = weight * per_token
    kl = torch.zeros_like(logp) if ref_logp is None else kl_to_reference(logp, ref_logp, kl_estimator)
    if beta:
        per_token = per_token + beta * kl

    if aggregation == "token":  # every completion token of the step weighs the same
        total, count = (per_token * mask).sum(), float(mask.sum())
    elif aggregation == "sequence":  # the paper: mean over each output's tokens, then over outputs
        total, count = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum(), float(mask.shape[0])
    else:
        raise ValueError(f"unknown loss aggregation '{aggregation}' (token or sequence)")

    with torch.no_grad():
        was_clipped = (unclipped != clipped).to(mask.dtype)
        stats = ((-torch.min(unclipped, clipped) * mask).sum(), (kl * mask).sum(), (was_clipped * mask).sum(),
                 mask.sum())
        if behaviour_logp is not None:
            on = mask > 0
            stats += ((weight * mask).sum(), weight[on].max() if on.any() else weight.new_zeros(()),
                      ((log_w > math.log(tis_cap)) & on).sum(), (log_w.abs() * mask).sum(),
                      ((torch.exp(log_w) - log_w - 1) * mask).sum())
    return GRPOLoss(total, count, *(float(s) for s in stats))
