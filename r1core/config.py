"""Typed configuration for every stage of the R1 recipe.

One pydantic model per stage; `PipelineConfig` composes them. Profiles are YAML files
(`configs/tiny.yaml`, ...) loaded by `load_config`, with `key.sub=value` overrides from the
command line. Every model forbids unknown fields so that a typo fails before training starts,
with a message that names the field.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from r1core.code_rewards import CodeRewardConfig, SandboxConfig  # noqa: F401 (part of the pipeline's config)
from r1core.cold_start import ROUTES
from r1core.general_prompts import KINDS
from r1core.problems import GENERATORS, PHRASES
from r1core.rewards import REWARDS
from r1core.schema import Strict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_PROFILE = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and field."""


def _known_names(names, registry, what: str) -> None:
    unknown = sorted(set(names) - set(registry))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; known: {sorted(registry)}")


def _shares(v: dict[str, float], what: str) -> dict[str, float]:
    if not v or sum(v.values()) <= 0 or min(v.values()) < 0:
        raise ValueError(f"{what} shares must be non-negative and sum to more than 0")
    return v


def _names_in(registry, what: str, shares: bool = False) -> AfterValidator:
    """A field's keys must be names of `registry` (a collection, or a function returning one for
    a registry whose module is heavy to import); with `shares`, its values non-negative shares."""

    def check(v: dict) -> dict:
        _known_names(v, registry() if callable(registry) else registry, what)
        return _shares(v, what) if shares else v

    return AfterValidator(check)


def _existing(what: str) -> AfterValidator:
    def check(v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"{what} not found: '{v}'")
        return v

    return AfterValidator(check)


def _reward_models():
    from r1core.reward_model import REWARD_MODELS  # imports torch: only when a config names reward models

    return REWARD_MODELS


# Named fields whose keys come from a registry of r1core: a typo fails before training starts.
TaskShares = Annotated[dict[str, float], _names_in(GENERATORS, "task", shares=True)]
LanguageShares = Annotated[dict[str, float], _names_in(PHRASES, "language", shares=True)]
GeneralKindShares = Annotated[dict[str, float], _names_in(KINDS, "non-reasoning kind", shares=True)]
PromptKindShares = Annotated[dict[str, float], _names_in(("reasoning", "general"), "prompt kind", shares=True)]
RewardWeights = Annotated[dict[str, float], _names_in(REWARDS, "reward")]
ModelRewardWeights = Annotated[dict[str, float], _names_in(_reward_models, "reward model")]
RouteCounts = Annotated[dict[str, int], _names_in(ROUTES, "cold-start route")]
DataFile = Annotated[str | None, _existing("data file")]
SeedFile = Annotated[str | None, _existing("seed file")]
PromptsFile = Annotated[str | None, _existing("prompts file")]


class MoEConfig(Strict):
    """The DeepSeek-V3 block (`architecture: deepseek_v3`): multi-head latent attention (keys and
    values through a low-rank latent) and mixture-of-experts FFNs with shared experts; the first
    `first_dense_layers` layers keep a dense FFN."""

    routed_experts: PositiveInt = Field(4, description="routed experts per MoE layer")
    shared_experts: NonNegativeInt = Field(1, description="experts every token goes through")
    experts_per_token: PositiveInt = Field(2, description="routed experts each token is sent to (top-k)")
    expert_intermediate_size: int = Field(96, ge=8, description="feed-forward width of one expert")
    first_dense_layers: NonNegativeInt = Field(1, description="leading layers that keep a dense feed-forward")
    kv_lora_rank: int = Field(32, ge=4, description="rank of the latent that keys and values are compressed to")
    q_lora_rank: int | None = Field(None, description="rank of the query latent (None: full-rank queries)")
    qk_rope_head_dim: int = Field(16, ge=2, description="per-head query/key dimensions that carry rotary positions")
    qk_nope_head_dim: int = Field(16, ge=2, description="per-head query/key dimensions without positions")
    v_head_dim: int = Field(32, ge=2, description="per-head value dimension")

    @model_validator(mode="after")
    def _top_k(self) -> MoEConfig:
        if self.experts_per_token > self.routed_experts:
            raise ValueError("experts_per_token must be at most routed_experts")
        return self


class ModelConfig(Strict):
    """The base model: built from scratch (tiny profile) or loaded from a local HF directory."""

    architecture: Literal["llama", "qwen2", "deepseek_v3"] = Field(
        "llama", description="transformers architecture; deepseek_v3: MLA + MoE as in `moe`")
    hidden_size: int = Field(192, ge=8, description="width of the residual stream")
    num_layers: PositiveInt = Field(4, description="decoder layers")
    num_heads: PositiveInt = Field(6, description="attention heads (divides hidden_size)")
    num_kv_heads: PositiveInt = Field(6, description="key/value heads (grouped-query attention; divides num_heads)")
    intermediate_size: int = Field(576, ge=8, description="width of the dense feed-forward layers")
    max_positions: int = Field(320, ge=16, description="context length (prompt + completion)")
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary size of the from-scratch tokenizer")
    pretrained_path: str | None = Field(
        None, description="local HF causal-LM directory used as the base instead of pretraining"
    )
    moe: MoEConfig = Field(default_factory=MoEConfig, description="deepseek_v3 only")
    prompt_format: Literal["r1_zero", "chat_template"] = Field(
        "r1_zero", description="r1_zero: the paper's plain-text R1-Zero template; chat_template: the pretrained "
        "model's own chat template (the R1 instructions as the system message; needs pretrained_path)")

    @field_validator("pretrained_path")
    @classmethod
    def _path_exists(cls, v: str | None) -> str | None:
        if v is not None and not (Path(v) / "config.json").is_file():
            raise ValueError(f"no HF model directory (config.json) at '{v}'")
        return v

    @model_validator(mode="after")
    def _chat_template_needs_a_model(self) -> ModelConfig:
        if self.prompt_format == "chat_template" and self.pretrained_path is None:
            raise ValueError("prompt_format chat_template needs pretrained_path (a tokenizer with a chat template)")
        return self

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, num_heads by num_kv_heads")
        return self


class DataConfig(Strict):
    """Verifiable reasoning tasks: synthetic generators, or the user's own JSONL/parquet files."""

    seed: int = Field(0, description="seed of the synthetic rows and of the train/held-out split")
    num_train: PositiveInt = Field(3000, description="synthetic train rows")
    num_heldout: PositiveInt = Field(200, description="synthetic held-out rows (disjoint from train by problem)")
    task_mix: TaskShares = Field(
        default_factory=lambda: {"chain_sum": 0.75, "countdown": 0.1, "python_expr": 0.15},
        description="task name -> share of rows (synthetic generators in r1core.problems)",
    )
    languages: LanguageShares = Field(
        default_factory=lambda: {"en": 0.5, "ru": 0.5},
        description="language -> share of synthetic rows (r1core.problems.PHRASES)",
    )
    chain_min_terms: int = Field(2, ge=2, description="fewest terms of a chain-sum problem")
    chain_max_terms: int = Field(3, ge=2, description="most terms of a chain-sum problem")
    max_operand: PositiveInt = Field(9, description="largest operand of the synthetic tasks")
    countdown_numbers: int = Field(2, ge=2, le=6, description="how many numbers a Countdown row gives")
    train_file: DataFile = Field(None, description="your own train rows {prompt, answer, task} (jsonl/parquet)")
    heldout_file: DataFile = Field(None, description="your own held-out rows (jsonl/parquet)")
    error_budget: float = Field(0.01, ge=0, le=1, description="largest share of malformed rows tolerated in "
                                "train_file / heldout_file; the rest go to the run's data/quarantine-*.jsonl")


def _general_mix() -> dict[str, float]:
    """The default shares of non-reasoning kinds (rejection sampling's data, general RL's prompts)."""
    return {"writing": 0.25, "factual_qa": 0.25, "translation": 0.25, "self_cognition": 0.15, "greeting": 0.1}


class ComputeConfig(Strict):
    """How a Ray job is scaled (Ray Data actors, Ray Train workers)."""

    num_workers: PositiveInt = Field(1, description="Ray workers (Ray Train: data-parallel ranks)")
    cpus_per_worker: PositiveInt = Field(2, description="CPUs each worker reserves (and torch threads it uses)")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL instead of gloo)")
    bf16: bool = Field(False, description="bfloat16 compute on GPU (FSDP: fp32 master weights and reductions; "
                                          "DDP: autocast); CPU stays fp32")


class TrainComputeConfig(ComputeConfig):
    """How a Ray Train stage is scaled and fits in memory (`r1 plan` estimates each term)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full replica of model, gradients and optimizer state per worker; fsdp: "
        "FSDP2 (fully_shard per decoder layer and the root), each worker holds 1/num_workers of them")
    max_tokens_per_microbatch: PositiveInt | None = Field(
        None, description="tokens one forward/backward pass may hold per worker (padded rows x width; packed: "
        "tokens); a step is split into micro-batches with gradient accumulation, exactly normalised. "
        "None: the worker's whole share of the step at once")
    logits_chunk_tokens: NonNegativeInt = Field(
        1024, description="positions whose full-vocabulary logits are computed at a time for log-probs and "
                          "cross-entropy (recomputed in backward); 0: all at once (the [tokens, vocab] tensor)")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in "
                                                            "backward instead of keeping them")
    rollout_layout: Literal["padded", "packed", "shared_prompt"] = Field(
        "padded", description="GRPO's update batch (r1core/batching.py): padded: one row per rollout; packed: "
        "rollouts packed into rows without padding (pays with flash-attention's varlen kernels on GPU); "
        "shared_prompt: one row per group, its prompt computed once and each completion attending to it "
        "(pays where prompts are long against completions; dense attention over the row)")
    memory_gb: PositiveFloat | None = Field(None, description="memory each worker may use (GiB): `r1 plan` and "
                                            "the pipeline refuse a stage whose estimate exceeds it")


class OptimizerConfig(Strict):
    """AdamW and gradient clipping, as every training stage uses them."""

    adam_beta1: NonNegativeFloat = Field(0.9, lt=1, description="AdamW beta1 (decay of the gradient's running mean)")
    adam_beta2: NonNegativeFloat = Field(0.95, lt=1, description="AdamW beta2 (decay of the squared gradient's running mean)")
    max_grad_norm: PositiveFloat = Field(1.0, description="gradients are clipped to this global L2 norm before each step")


class LMTrainConfig(OptimizerConfig):
    """What the supervised stages share (pretraining, SFT, reward models): AdamW with linear
    warmup then cosine decay to `min_lr_ratio` of the peak, checkpoints and logging every few steps."""

    batch_size: PositiveInt = Field(16, description="sequences (packed rows; for reward models, preference pairs) "
                                                  "per optimizer step, all workers together")
    seq_len: int = Field(256, ge=16, description="tokens per packed training sequence (reward models: the longest "
                                                 "scored text)")
    lr: PositiveFloat = Field(5e-4, description="peak learning rate (AdamW; linear warmup, then cosine to min_lr_ratio)")
    warmup_steps: NonNegativeInt = Field(5, description="steps of linear learning-rate warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decay ends at this share of the peak "
                                                              "learning rate")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay")
    checkpoint_every: PositiveInt = Field(50, description="steps between checkpoints (a re-run resumes from the latest)")
    log_every: PositiveInt = Field(10, description="steps between logged metrics (loss, grad norm, lr, tokens/s)")
    compute: TrainComputeConfig = Field(default_factory=TrainComputeConfig,
                                        description="Ray Train workers, sharding and memory")


class PretrainConfig(LMTrainConfig):
    """Stage 0: next-token pretraining of the tiny base model on a synthetic corpus."""

    enabled: bool = Field(True, description="false: use model.pretrained_path as the base")
    corpus_docs: int = Field(60000, ge=10, description="documents in the synthetic corpus")
    template_share: float = Field(
        0.2, ge=0, le=1, description="share of documents that are conversations under the R1-Zero template"
    )
    format_share: float = Field(
        0.35, ge=0, le=1, description="share of those conversations answered in the think/answer format"
    )
    web_format_share: float = Field(
        0.3, ge=0, le=1, description="share of the other (bare) documents written with think/answer tags"
    )
    long_cot_share: float = Field(
        0.1, ge=0, le=1, description="share of the other documents that are detailed answers "
        "(reasoning, a verification step, a summary) after a 'solve step by step' instruction"
    )
    code_switch_share: float = Field(
        0.3, ge=0, le=1, description="share of documents whose reasoning steps switch language at random"
    )
    steps: PositiveInt = Field(340, description="optimizer steps")
    # the base learns from scratch: a larger step, longer warmup and weight decay than fine-tuning
    lr: PositiveFloat = Field(2e-3, description="peak learning rate (AdamW; linear warmup, then cosine to min_lr_ratio)")
    warmup_steps: NonNegativeInt = Field(30, description="steps of linear learning-rate warmup")
    weight_decay: NonNegativeFloat = Field(0.1, description="AdamW weight decay")
    checkpoint_every: PositiveInt = Field(200, description="steps between checkpoints (a re-run resumes from the latest)")

    @model_validator(mode="after")
    def _document_shares(self) -> PretrainConfig:
        if self.long_cot_share + self.web_format_share > 1:
            raise ValueError("long_cot_share + web_format_share must be at most 1")
        return self


RolloutBackend = Literal["in_process", "workers", "vllm"]
# where the Ray Data stages (cold start, rejection sampling) generate: in their own actors (torch),
# on a fixed pool of rollout workers or vLLM engines (the `rollout` section's), or a server (openai)
SamplingEngine = Literal["torch", "workers", "vllm"]
SAMPLING_ENGINE_HELP = ("torch: the Ray Data actors run the checkpoint in-process; workers / vllm: they hand "
                        "generation to rollout.num_workers rollout workers (torch engine) / vLLM engines "
                        "(rollout.vllm, in vLLM's environment) holding the checkpoint")
WeightSync = Literal["object_store", "checkpoint", "nccl"]


class RolloutOverrides(Strict):
    """A GRPO stage's own choice of rollout backend and staleness (unset fields: the pipeline's `rollout`)."""

    backend: RolloutBackend | None = Field(None, description="this stage's rollout backend (default: "
                                           "rollout.backend)")
    max_staleness: NonNegativeInt | None = Field(None, description="this stage's staleness bound (default: "
                                                 "rollout.max_staleness)")
    sync_every: PositiveInt | None = Field(None, description="this stage's optimizer steps between weight "
                                           "syncs (default: rollout.sync_every)")


class VLLMRolloutConfig(Strict):
    """The vLLM engines of `rollout.backend: vllm`: Ray actors running in vLLM's own environment
    (`make vllm-env`), one engine per rollout worker."""

    python: str = Field(".venv-vllm/bin/python", description="the vLLM environment's Python (relative "
                        "paths: from the project root); `r1 doctor` checks it")
    tensor_parallel_size: PositiveInt = Field(1, description="GPUs per engine (tensor parallel)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="share of each GPU vLLM may take "
                                          "(weights and KV cache)")
    colocate: bool = Field(False, description="engines share the trainer's GPUs: they sleep (weights "
                           "offloaded, KV cache freed) while the trainer updates and wake for the next "
                           "generation (needs max_staleness 0)")
    enforce_eager: bool = Field(False, description="no CUDA graphs (faster start, slower decode)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("bfloat16", description="the engines' "
                                                                      "weight and compute dtype")


class RolloutConfig(Strict):
    """How GRPO stages generate rollouts. `in_process`: the trainer's workers sample from the policy
    they train, between updates. `workers`: a pool of Ray actors hold a copy of the policy and sample
    with the torch engine. `vllm`: the same pool, of vLLM engines in their own environment. After
    each `sync_every` steps the trainer publishes its weights to them (versioned, in chunks). With
    `max_staleness` k >= 1 generation for step t+1 runs while step t trains, and the update corrects
    for the behaviour policy by truncated importance sampling."""

    backend: RolloutBackend = Field(
        "in_process", description="in_process (sample in the trainer), workers (Ray actors with the torch "
        "engine) or vllm (Ray actors with vLLM engines, in vLLM's environment)")
    weight_sync: WeightSync | None = Field(
        None, description="how weights reach the rollout engines: object_store (Ray's, in chunks; workers), "
        "checkpoint (a versioned safetensors directory every engine reloads; both, and the fallback "
        "that works everywhere), nccl (vLLM's native weight transfer, broadcast GPU to GPU; vllm). "
        "Default: object_store for workers, checkpoint for vllm")
    max_staleness: NonNegativeInt = Field(0, description="k: a step may train on rollouts sampled up to k "
                                          "weight versions ago (0: synchronous, on-policy GRPO)")
    sync_every: PositiveInt = Field(1, description="optimizer steps between weight syncs to the rollout "
                                    "engines (needs max_staleness >= sync_every - 1)")
    num_workers: PositiveInt = Field(1, description="rollout workers (backend: workers)")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs each rollout worker reserves (torch threads: "
                                           "at least 1)")
    use_gpu: bool = Field(False, description="one GPU per rollout worker")
    tis_cap: PositiveFloat = Field(2.0, description="truncated importance sampling: the per-token weight "
                                   "pi_trainer / pi_behaviour is capped at this (workers)")
    mismatch_warn_kl: PositiveFloat = Field(0.01, description="a step whose KL(behaviour || trainer) on "
                                            "its sampled tokens exceeds this is a warning (the log, rollout/mismatch_warning in MLflow, the stage's Prefect summary artifact)")
    mismatch_fail: bool = Field(False, description="stop the stage, naming the step, when the mismatch "
                                "exceeds mismatch_warn_kl")
    generate_timeout_s: PositiveFloat = Field(600.0, description="deadline of one generation call on a "
                                              "rollout worker")
    sync_timeout_s: PositiveFloat = Field(300.0, description="deadline of one weight sync on a rollout worker")
    start_timeout_s: PositiveFloat = Field(300.0, description="deadline for a rollout worker to start and "
                                           "answer its health check")
    max_restarts: NonNegativeInt = Field(2, description="rollout workers replaced (after a timeout or a "
                                         "crash) before the stage fails")
    chunk_mb: PositiveInt = Field(256, description="weights are published in chunks of about this many MiB")
    batch_size: PositiveInt = Field(256, description="sequences per generate call (torch engine)")
    max_prompt_tokens: PositiveInt = Field(256, description="the longest prompt `r1 plan` budgets for (GRPO "
                                           "update and generation), in tokens")
    vllm: VLLMRolloutConfig = Field(default_factory=VLLMRolloutConfig, description="the vLLM engines "
                                    "(backend: vllm)")

    @property
    def sync(self) -> WeightSync:
        """The weight-sync method in use (`weight_sync`, or the backend's default)."""
        return self.weight_sync or ("checkpoint" if self.backend == "vllm" else "object_store")

    @model_validator(mode="after")
    def _consistent(self) -> RolloutConfig:
        check_rollout(self)
        return self

    def for_stage(self, overrides: RolloutOverrides | None) -> RolloutConfig:
        """This section with a stage's overrides applied (validated again)."""
        if overrides is None:
            return self
        return RolloutConfig.model_validate({**self.model_dump(), **overrides.model_dump(exclude_none=True)})


def check_rollout(cfg: RolloutConfig) -> None:
    if cfg.backend == "in_process" and cfg.max_staleness:
        raise ValueError("backend in_process samples from the policy it trains: max_staleness must be 0 "
                         "(use workers for k >= 1)")
    allowed = {"in_process": set(), "workers": {"object_store", "checkpoint"},
               "vllm": {"checkpoint", "nccl"}}[cfg.backend]
    if cfg.weight_sync is not None and cfg.weight_sync not in allowed:
        raise ValueError(f"weight_sync {cfg.weight_sync} does not apply to backend {cfg.backend} "
                         f"({'use ' + ' or '.join(sorted(allowed)) if allowed else 'it publishes nothing'})")
    if cfg.backend == "vllm" and cfg.vllm.colocate:
        if cfg.max_staleness:
            raise ValueError("vllm.colocate: the engines sleep while the trainer updates, so nothing overlaps: "
                             "max_staleness must be 0")
        if cfg.num_workers != 1 or cfg.vllm.tensor_parallel_size != 1:
            raise ValueError("vllm.colocate shares the GPU of the trainer's rank 0: one engine "
                             "(num_workers 1, tensor_parallel_size 1)")
    if cfg.max_staleness < cfg.sync_every - 1:
        raise ValueError(f"sync_every {cfg.sync_every} leaves rollouts {cfg.sync_every - 1} versions old: "
                         f"max_staleness must be at least that (is {cfg.max_staleness})")


class SamplingConfig(Strict):
    temperature: NonNegativeFloat = Field(1.0, description="softmax temperature (0: greedy)")
    top_p: PositiveFloat = Field(1.0, le=1, description="nucleus sampling: keep the smallest set of tokens with this much probability")
    max_new_tokens: PositiveInt = Field(48, description="longest completion, in tokens")


def _shared_prompt_compute(max_tokens_per_microbatch: int | None = None) -> TrainComputeConfig:
    """The tiny profile's GRPO stages: short completions after long prompts (r1core/batching.py)."""
    return TrainComputeConfig(rollout_layout="shared_prompt", max_tokens_per_microbatch=max_tokens_per_microbatch)


class GRPOConfig(OptimizerConfig):
    """Stage 1 (R1-Zero): GRPO from the base with rule rewards only."""

    steps: PositiveInt = Field(20, description="optimizer steps (one batch of rollouts each)")
    prompts_per_step: PositiveInt = Field(16, description="prompts per step (all workers)")
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (G)")
    inner_epochs: PositiveInt = Field(1, description="optimisation passes over each batch of rollouts (mu). With 1, "
                              "the policy is the sampling policy at its only pass: the importance ratio is 1 and "
                              "the clip never acts (plain policy gradient); clip_low/clip_high and clip_fraction "
                              "matter only from 2 on")
    lr: PositiveFloat = Field(1e-4, description="learning rate (AdamW, constant)")
    clip_low: NonNegativeFloat = Field(0.2, description="epsilon below 1 of the importance-ratio clip (acts only "
                            "when inner_epochs > 1)")
    clip_high: NonNegativeFloat = Field(0.28, description="epsilon above 1 (clip-higher, DAPO; acts only when "
                             "inner_epochs > 1)")
    beta: NonNegativeFloat = Field(0.02, description="KL coefficient to the frozen reference")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="estimator of KL(policy || reference) per token: k1 = log ratio, k3 = ratio - log ratio - 1 (unbiased, never negative)")
    loss_aggregation: Literal["token", "sequence"] = Field("token", description="token: every completion token of the batch weighs the same (DAPO); sequence: mean over each completion's tokens, then over completions (the paper)")
    scale_rewards: bool = Field(True, description="divide advantages by the group std")
    # off by default: in the tiny profile it lowered R1-Zero's held-out pass@1 (docs/results.md)
    skip_flat_groups: bool = Field(False, description="leave groups whose rewards are all equal (no "
                                   "policy gradient, only the KL term) out of the update, as DAPO's "
                                   "dynamic sampling does: fewer passes, less pull to the reference")
    rewards: RewardWeights = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.5, "code_exec": 0.25},
        description="reward name -> weight (code_* rewards score code rows only)"
    )
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.8), description="how rollouts are sampled")
    adam_beta2: NonNegativeFloat = Field(0.99, lt=1, description="AdamW beta2 (decay of the squared gradient's running mean)")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay")
    checkpoint_every: PositiveInt = Field(10, description="steps between checkpoints (a re-run resumes from the latest)")
    compute: TrainComputeConfig = Field(default_factory=TrainComputeConfig,
                                        description="Ray Train workers, sharding and memory")
    rollout: RolloutOverrides | None = Field(None, description="this stage's rollout backend and staleness "
                                             "(default: the pipeline's rollout section)")


def _redefault(config: type[BaseModel], field: str, default):
    """A subclass's own default for a field it inherits from `config`, described as there."""
    return Field(default, description=config.model_fields[field].description)


class ReasoningRLConfig(GRPOConfig):
    """Stage 4: reasoning-oriented GRPO from the cold-start model. The language-consistency
    reward (share of CoT words in the prompt's language) is added to the accuracy reward."""

    # batch shape and flat-group skipping chosen on a validation split of train prompts
    # (bench/tune.py): small batches lost accuracy on prompts the stage did not train on
    steps: PositiveInt = _redefault(GRPOConfig, "steps", 4)
    prompts_per_step: PositiveInt = _redefault(GRPOConfig, "prompts_per_step", 64)
    skip_flat_groups: bool = _redefault(GRPOConfig, "skip_flat_groups", True)
    # RL after SFT: at R1-Zero's 1e-4 with std-scaled advantages the tiny models lost held-out
    # accuracy (0.201 -> 0.133); a smaller step without std scaling (Dr. GRPO) kept or gained it
    lr: PositiveFloat = _redefault(GRPOConfig, "lr", 3e-5)
    scale_rewards: bool = _redefault(GRPOConfig, "scale_rewards", False)
    rewards: RewardWeights = Field(
        default_factory=lambda: {"accuracy": 1.0, "readable_format": 0.5, "language_consistency": 1.0,
                                 "code_exec": 0.25},
        description="reward name -> weight (readable_format: think, summary, answer)",
    )
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.8, max_new_tokens=64), description="how rollouts are sampled")


class ReviewConfig(Strict):
    """The optional human review of cold-start examples in the Prefect UI."""

    enabled: bool = Field(False, description="pause the flow for a human review in the Prefect UI")
    sample_size: PositiveInt = Field(8, description="examples shown for approval or rejection")
    timeout_s: PositiveInt = Field(3600, description="unreviewed after this long: keep the examples and go on")


class ColdStartConfig(Strict):
    """Stage 2: cold-start data, a small set of long readable chains of thought."""

    routes: RouteCounts = Field(
        default_factory=lambda: {"few_shot": 160, "direct": 160, "rewrite_r1_zero": 160},
        description="route -> train prompts it is run on (few_shot, direct, rewrite_r1_zero); "
        "leave a route out to switch it off",
    )
    samples_per_prompt: PositiveInt = Field(2, description="completions sampled per prompt and route")
    shots: PositiveInt = Field(2, description="long-CoT exemplars in a few-shot prompt")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=64), description="how candidates are sampled")
    max_words: PositiveInt = Field(60, description="longest kept completion, in words")
    per_problem: PositiveInt = Field(1, description="most examples kept per problem")
    seed_file: SeedFile = Field(
        None, description="your own candidate examples {prompt, completion, answer, task, language} "
        "(jsonl/parquet), verified and filtered like the generated ones")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="the optional human review in the Prefect UI")
    engine: SamplingEngine = Field("torch", description=SAMPLING_ENGINE_HELP)
    compute: ComputeConfig = Field(
        default_factory=lambda: ComputeConfig(cpus_per_worker=1),
        description="Ray Data generation actors (num_workers) and their resources")

class SFTConfig(LMTrainConfig):
    """Supervised fine-tuning (loss on response tokens, packed sequences)."""

    epochs: PositiveInt = Field(3, description="passes over the packed examples")


class JudgeConfig(Strict):
    """The model judge of rejection sampling: rows no rule verifier can score (and rows of
    `judged_tasks`) are judged by a model fed the reference and the prediction."""

    kind: Literal["local", "openai"] = Field("local", description="local HF causal LM, or an OpenAI-compatible endpoint")
    model: str = Field("base", description="local: 'base' (this run's base model), a local HF directory "
                       "or models:/name@alias; openai: the served model name")
    base_url: str | None = Field(None, description="openai: the endpoint, e.g. http://host:8000/v1")
    judged_tasks: list[str] = Field(default_factory=list,
                                    description="tasks verified by the judge even though a rule could")
    audit_rows: NonNegativeInt = Field(256, description="rule-verified rows also shown to the judge, to measure "
                            "its agreement with the rules (its verdict is not used for them)")
    batch_size: PositiveInt = Field(64, description="judged rows per generate call")

    @model_validator(mode="after")
    def _endpoint(self) -> JudgeConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("judge.kind is 'openai' but judge.base_url is not set")
        return self


class RejectionSamplingConfig(Strict):
    """Stage 5: SFT data by rejection sampling from the reasoning-RL checkpoint, plus
    non-reasoning data. (At full scale the paper keeps ~600k reasoning and ~200k
    non-reasoning examples; the quotas below are the tiny profile's.)"""

    prompts_file: PromptsFile = Field(
        None, description="your own prompt rows {prompt, answer, task} (jsonl); default: the train split. "
        "Malformed rows go to a quarantine file")
    error_budget: float = Field(0.01, ge=0, le=1, description="largest share of malformed prompt rows tolerated")
    num_prompts: PositiveInt = Field(1200, description="prompts sampled from (the first N by id)")
    samples_per_prompt: PositiveInt = Field(4, description="completions sampled per prompt (k)")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=64), description="how candidates are sampled")
    engine: SamplingEngine | Literal["openai"] = Field(
        "torch", description=SAMPLING_ENGINE_HELP + "; openai: requests to a server (vLLM) serving it at base_url")
    base_url: str | None = Field(None, description="openai engine: the endpoint, e.g. http://host:8000/v1")
    served_model: str | None = Field(None, description="openai engine: the model name the server knows")
    prompts_per_shard: PositiveInt = Field(128, description="unit of generation work and of resumption")
    reasoning_examples: NonNegativeInt = Field(1000, description="quota of reasoning examples (paper: ~600k)")
    non_reasoning_examples: NonNegativeInt = Field(150, description="quota of non-reasoning examples (paper: ~200k)")
    non_reasoning_candidates: NonNegativeInt = Field(1000, description="synthesised non-reasoning candidates, "
                                          "before deduplication and the quota")
    non_reasoning_mix: GeneralKindShares = Field(
        default_factory=_general_mix,
        description="kind -> share of the synthesised non-reasoning candidates (r1core.general_prompts)")
    per_problem: PositiveInt = Field(1, description="most examples kept per problem")
    max_words: PositiveInt = Field(80, description="longest kept response, in words")
    max_paragraph_words: PositiveInt = Field(60, description="longest paragraph, in words")
    near_duplicate_threshold: PositiveFloat = Field(0.8, le=1, description="MinHash Jaccard estimate")
    eval_files: list[str] = Field(default_factory=list,
                                  description="more evaluation sets to decontaminate against (jsonl)")
    rows_per_output_shard: PositiveInt = Field(1000, description="rows per parquet part of the written SFT set")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="the model judge of rows no rule verifier scores")
    compute: ComputeConfig = Field(
        default_factory=lambda: ComputeConfig(num_workers=2, cpus_per_worker=1),
        description="Ray Data generation actors (num_workers) and their resources")

    @model_validator(mode="after")
    def _server(self) -> RejectionSamplingConfig:
        if self.engine == "openai" and not (self.base_url and self.served_model):
            raise ValueError("engine is 'openai' but base_url or served_model is not set")
        return self


class RewardModelConfig(LMTrainConfig):
    """Stage 7: reward models, a scalar head on the base LM trained with the Bradley-Terry loss
    on preference pairs: helpfulness judges the final summary and answer only, harmlessness the
    whole response (reasoning included). The tiny profile synthesises pairs whose preference is
    checkable (r1core.reward_model)."""

    train_pairs: PositiveInt = Field(800, description="preference pairs per reward model")
    heldout_pairs: PositiveInt = Field(400, description="held-out pairs for pairwise accuracy")
    unsafe_patterns: list[str] = Field(
        default_factory=lambda: ["you are an idiot", "steal the password", "build a bomb", "hurt them",
                                 "ты идиот", "укради пароль", "сделай бомбу", "сделай им больно"],
        description="phrases a harmless response never contains; a response with one is dispreferred")
    epochs: PositiveInt = Field(1, description="passes over the training pairs")
    seq_len: int = Field(160, ge=16, description="longest scored text, in tokens")  # a response, not packed rows
    lr: PositiveFloat = Field(1e-3, description="peak learning rate (AdamW; linear warmup, then cosine to min_lr_ratio)")
    warmup_steps: NonNegativeInt = Field(10, description="steps of linear learning-rate warmup")
    checkpoint_every: PositiveInt = Field(100, description="steps between checkpoints (a re-run resumes from the latest)")
    compute: TrainComputeConfig = Field(default_factory=lambda: TrainComputeConfig(cpus_per_worker=1),
                                   description="each reward model is its own Ray Train job; both run at once")

    @field_validator("unsafe_patterns")
    @classmethod
    def _some_patterns(cls, v: list[str]) -> list[str]:
        if not v or any(not p.strip() for p in v):
            raise ValueError("give at least one non-empty unsafe pattern")
        return v


class GeneralRLConfig(ReasoningRLConfig):
    """Stage 8: GRPO from the SFT model over all scenarios. Reasoning prompts are scored by the
    rule rewards (`rewards`), general prompts by the reward models (`model_rewards`): helpfulness
    on the final summary and answer, harmlessness on the whole response."""

    # chosen on a validation split (bench/tune.py --section general_rl): 8 x 16 kept the SFT model's
    # accuracy while both reward models' scores rose; 16 x 16 lost some
    steps: PositiveInt = _redefault(GRPOConfig, "steps", 8)
    prompts_per_step: PositiveInt = _redefault(GRPOConfig, "prompts_per_step", 16)
    skip_flat_groups: bool = _redefault(GRPOConfig, "skip_flat_groups", False)
    model_rewards: ModelRewardWeights = Field(
        default_factory=lambda: {"helpfulness": 1.0, "harmlessness": 1.0},
        description="reward model -> weight, for general prompts")
    prompt_mix: PromptKindShares = Field(
        default_factory=lambda: {"reasoning": 0.8, "general": 0.2},
        description="share of each step's prompts that are reasoning / general")
    general_mix: GeneralKindShares = Field(
        default_factory=_general_mix, description="kind -> share of the general prompts (r1core.general_prompts)")
    general_prompts: PositiveInt = Field(1000, description="general prompts synthesised to draw from")

class PromotionConfig(Strict):
    """The gate on the final model's `champion` alias: a new `r1` version takes it only when it
    beats the current champion on pass@1 and on cons@k by `margin`; otherwise it is `challenger`."""

    margin: NonNegativeFloat = Field(0.01, description="absolute improvement needed on both metrics")


class StudentConfig(Strict):
    """A smaller dense student: pretrained from scratch on the base's corpus (or taken from
    `model.pretrained_path`), then distilled by SFT on the stage-6 set."""

    name: str = Field("small", pattern=r"^[a-z0-9][a-z0-9-]*$", description="registered as r1-distill-<name>")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(hidden_size=128, num_layers=2, num_heads=4,
                                                                   num_kv_heads=4, intermediate_size=384), description="the student's architecture (smaller than the base), or its local HF model")
    pretrain_steps: PositiveInt = Field(200, description="pretraining steps of the student's own base")


class DistillConfig(Strict):
    """Stage 9: distillation. Each student is fine-tuned on the SFT set of stage 6, no RL; for the
    paper's comparison the same student is also trained by R1-Zero-style RL alone (`rl`)."""

    students: list[StudentConfig] = Field(default_factory=lambda: [StudentConfig()], description="the students, each pretrained on its own and then distilled")
    # both sides of the distilled-vs-RL-only comparison chosen on a validation split (bench/tune.py)
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=4, lr=1e-3), description="the students' SFT on the stage-6 set")
    rl_only: bool = Field(True, description="also train each student by RL alone from its own base")
    rl: GRPOConfig = Field(default_factory=lambda: GRPOConfig(steps=4, prompts_per_step=64,
                                                              compute=_shared_prompt_compute(40960)),
                           description="the RL-only student's GRPO (R1-Zero rewards)")

    @field_validator("students")
    @classmethod
    def _unique_names(cls, v: list[StudentConfig]) -> list[StudentConfig]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique: {names}")
        return v


class EvalConfig(Strict):
    """Held-out evaluation after every stage: pass@1 over k samples and cons@k."""

    k: PositiveInt = Field(4, description="samples per prompt: pass@1 is their mean accuracy, cons@k their majority vote's")
    num_prompts: PositiveInt = Field(200, description="held-out prompts evaluated (first N)")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=64), description="how evaluation samples are drawn")
    in_training_job: bool = Field(
        True, description="evaluate a trained model inside its Ray Train job, on rank 0 once the model is "
                          "written (no Ray task to start, no process to import torch again); off: a separate "
                          "Ray task after the job, e.g. where rank 0 cannot hold a second copy of the model")


class RetrainConfig(Strict):
    """Scheduled retraining (the `r1-retrain` deployment): general RL from the current champion
    on prompt files that appeared in `data_dir` since the last retrain; the promotion gate decides."""

    cron: str | None = Field(None, description="cron schedule of the r1-retrain deployment, e.g. '0 3 * * 1' "
                                               "(Mondays 03:00); none = run only when triggered")
    timezone: str = Field("UTC", description="time zone of the cron schedule")
    data_dir: str | None = Field(None, description="folder watched for new prompt files (*.jsonl, *.parquet: "
                                                   "rows {prompt, answer, task}); none = <workdir>/incoming")
    from_alias: str = Field("champion", description="alias of `r1` the retrain starts from")
    steps: int | None = Field(None, ge=1, description="GRPO steps of a retrain (default: general_rl.steps)")


class RuntimeConfig(Strict):
    """Where things run and are stored. Servers are chosen by environment variables too:
    RAY_ADDRESS, PREFECT_API_URL and MLFLOW_TRACKING_URI override the local defaults."""

    workdir: str = Field(".r1", description="project-local folder for runs, checkpoints and stores")
    mlflow_tracking_uri: str | None = Field(None, description="default: sqlite under workdir")
    experiment: str = Field("r1-factory", description="MLflow experiment of every run")
    ray_address: str | None = Field(None, description="default: a local Ray with num_cpus")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    seed: int = Field(0, description="seed of initialisation, data order and sampling")
    tracking_outage_s: PositiveFloat = Field(300, description="seconds a training job buffers and retries its metrics "
                                             "while the MLflow server is unreachable before the stage fails")
    max_failures: NonNegativeInt = Field(3, description="times Ray Train restarts a stage's worker group after a "
                                         "worker dies (each restart resumes from the newest verified checkpoint)")
    train_poll_interval_s: PositiveFloat = Field(0.25, description="how often Ray Train's controller polls a "
                                                 "job's workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): Ray's default, "
                                                 "2 s, adds up to 2 s to every job's start and end; raise it for "
                                                 "jobs of many workers")
    log_dir: str | None = Field(None, description="where `r1 run` writes the full log of its process (Prefect, "
                                "Ray's forwarded worker output, libraries) while the console stays quiet; "
                                "default: <run folder>/logs")
    ray_dashboard: bool = Field(True, description="a local Ray starts its dashboard on 127.0.0.1 (the address is "
                                "logged): Ray Train's controller watchdog queries actor state through it, and "
                                "without it logs 'Failed to query Ray Train Controller actor state' every second; "
                                "off saves ~320 MB")


def _one_folder_name(v: str | None) -> str | None:
    """A run name is one folder under runtime.workdir/runs (and a Prefect and MLflow run name):
    letters of any script, digits, `_`, `-`, `.`; not hidden, not a path."""
    if v is not None and not re.fullmatch(r"[^\W][\w.-]{0,99}", v):
        raise ValueError(f"{v[:120]!r} is not a folder name: 1-100 letters, digits, '_', '-' or '.', not starting "
                         "with '.' or '-'")
    return v


RunName = Annotated[str | None, AfterValidator(_one_folder_name)]


class PipelineConfig(Strict):
    """The whole R1 recipe (stages 0-9, evaluation after each) on one profile."""

    profile: str = Field("tiny", description="profile name: prefixes the run folder and tags every run")
    run_name: RunName = Field(None, description="output folder name; default: profile + config hash")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model's architecture, or a local HF model to start from")
    data: DataConfig = Field(default_factory=DataConfig, description="the verifiable reasoning rows: synthetic, or your own files")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="stage 0: pretraining of the base")
    r1_zero: GRPOConfig = Field(default_factory=lambda: GRPOConfig(steps=16, compute=_shared_prompt_compute()), description="stage 1: R1-Zero, GRPO from the base with rule rewards")
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig, description="stage 2: cold-start data")
    cold_start_sft: SFTConfig = Field(default_factory=SFTConfig, description="stage 3: SFT of the base on the cold-start data")
    reasoning_rl: ReasoningRLConfig = Field(default_factory=lambda: ReasoningRLConfig(compute=_shared_prompt_compute(40960)), description="stage 4: reasoning-oriented GRPO from the cold-start model")
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig, description="stage 5: rejection sampling from the reasoning-RL model")
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig(epochs=2),
                           description="stage 6: SFT of the base on the rejection-sampled set")
    reward_models: RewardModelConfig = Field(default_factory=RewardModelConfig, description="stage 7: the helpfulness and harmlessness reward models")
    general_rl: GeneralRLConfig = Field(default_factory=lambda: GeneralRLConfig(compute=_shared_prompt_compute()), description="stage 8: GRPO over all scenarios from the SFT model")
    promotion: PromotionConfig = Field(default_factory=PromotionConfig, description="the gate on the final model's champion alias")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="stage 9: distillation to smaller students (and their RL-only comparison)")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation after every model stage")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="how rollouts are generated in the pipeline")
    code: CodeRewardConfig = Field(default_factory=CodeRewardConfig, description="how model-written code is scored, and the sandbox it runs in")
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="the scheduled retrain deployment")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="where things run and are stored")

    @model_validator(mode="after")
    def _base_model_source(self) -> PipelineConfig:
        if not self.pretrain.enabled and self.model.pretrained_path is None:
            raise ValueError("pretrain.enabled is false but model.pretrained_path is not set")
        return self

    def section(self, path: str):
        """The config of a dotted path, e.g. `distill.sft`, `distill.students.0.model`."""
        node = self
        for part in path.split("."):
            node = node[int(part)] if isinstance(node, list) else getattr(node, part)
        return node

    def digest(self) -> str:
        """Hash of everything that changes the pipeline's results: run_name, where things run
        (runtime) and the retrain schedule excluded, but the seed (`runtime.seed`) included, so
        that another seed's run trains anew instead of finding this one's stages complete."""
        payload = self.model_dump(mode="json", exclude={"run_name", "runtime", "retrain"})
        payload["seed"] = self.runtime.seed
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    def resolved_run_name(self) -> str:
        return self.run_name or f"{self.profile}-{self.digest()}"

    def run_dir(self) -> Path:
        return Path(self.runtime.workdir).resolve() / "runs" / self.resolved_run_name()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (numbers, bools, lists...)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{key}': value is not valid YAML ({_yaml_problem(e)})") from None
    return raw


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`line 3, column 7: mapping values are not allowed here`, from a YAML error."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def _describe(err: ValidationError, source: str) -> str:
    problems = [f"field '{'.'.join(str(p) for p in e['loc']) or '<root>'}': {e['msg']}" for e in err.errors()]
    return f"invalid configuration ({source}): " + "; ".join(problems)


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a profile (default `configs/tiny.yaml`), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_PROFILE
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return validate_config(apply_overrides(raw, overrides or []), source=str(path))


# The tiny profile: what the Prefect UI form shows by default (tests keep it equal to tiny.yaml).
DEFAULT_CONFIG = PipelineConfig()


# The profiles a run form offers: every configs/<name>.yaml (each names itself in `profile`).
PROFILES = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
ProfileName = Literal[PROFILES]  # type: ignore[valid-type]


def _sets(*paths: str) -> dict:
    return {"sets": list(paths)}


def _empty_means_unset(schema: dict) -> None:
    """The form's optional fields as plain inputs (left empty: unset) instead of a type switch
    between the value's type and None."""
    for prop in schema.get("properties", {}).values():
        kinds = prop.get("anyOf", [])
        if len(kinds) == 2 and {"type": "null"} in kinds and prop.get("default", 0) is None:
            (given,) = [k for k in kinds if k != {"type": "null"}]
            del prop["anyOf"], prop["default"]
            prop.update(given)


class RunRequest(Strict):
    """A run as an operator starts it (the deployments' form): a profile, the fields people change,
    and any other field as a validated `key.path=value` setting. Every field left empty takes the
    chosen profile's value, so choosing another profile runs with that profile's values."""

    model_config = ConfigDict(**Strict.model_config, json_schema_extra=_empty_means_unset)

    profile: ProfileName = Field("tiny", description="the profile, configs/PROFILE.yaml, that every field left "
                                 "empty below takes its value from")
    run_name: RunName = Field(None, title="Output folder", description="the run's folder under "
                                 "runtime.workdir/runs and the name of its MLflow runs and Prefect flow runs "
                                 "(FOLDER/STAGE, replacing the random Run Name above); empty: PROFILE-DIGEST of "
                                 "the settings, so the same settings resume where they stopped")
    seed: int | None = Field(None, description="seed of initialisation, data order and sampling",
                             json_schema_extra=_sets("runtime.seed"))
    base_model: str | None = Field(None, title='Base model', description="a local HF causal-LM directory as the base model instead of "
                                   "pretraining one", json_schema_extra=_sets("model.pretrained_path"))
    train_file: str | None = Field(None, title='Train file', description="your own train rows {prompt, answer, task} (jsonl/parquet)",
                                   json_schema_extra=_sets("data.train_file"))
    heldout_file: str | None = Field(None, title='Held-out file', description="your own held-out rows (jsonl/parquet)",
                                     json_schema_extra=_sets("data.heldout_file"))
    r1_zero_steps: PositiveInt | None = Field(None, title='R1-Zero steps', description="R1-Zero GRPO steps",
                                              json_schema_extra=_sets("r1_zero.steps"))
    reasoning_rl_steps: PositiveInt | None = Field(None, title='Reasoning-RL steps', description="reasoning-RL GRPO steps",
                                                   json_schema_extra=_sets("reasoning_rl.steps"))
    general_rl_steps: PositiveInt | None = Field(None, title='General-RL steps', description="general-RL GRPO steps",
                                                 json_schema_extra=_sets("general_rl.steps"))
    sft_epochs: PositiveInt | None = Field(None, title='SFT epochs', description="epochs of the SFT on the rejection-sampled set",
                                           json_schema_extra=_sets("sft.epochs"))
    rl_lr: PositiveFloat | None = Field(None, title='RL learning rate', description="learning rate of every GRPO stage (R1-Zero, reasoning "
                                        "RL, general RL)",
                                        json_schema_extra=_sets("r1_zero.lr", "reasoning_rl.lr", "general_rl.lr"))
    sft_lr: PositiveFloat | None = Field(None, title='SFT learning rate', description="peak learning rate of both SFT stages (cold start, "
                                         "rejection-sampled set)",
                                         json_schema_extra=_sets("cold_start_sft.lr", "sft.lr"))
    settings: list[str] = Field(default_factory=list, description="any other field, as `r1 run --set`: "
                                "key.path=value (the value is YAML), e.g. eval.k=8 or runtime.workdir=/data/r1; "
                                "applied before the fields above and checked before anything runs (`r1 config` "
                                "prints every field)")

    def overrides(self) -> list[str]:
        """`settings`, then a `key.path=value` for each field that is set."""
        out = list(self.settings)
        if self.run_name is not None:
            out.append(f"run_name={json.dumps(self.run_name)}")
        if self.base_model is not None:
            out.append("pretrain.enabled=false")
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            extra = field.json_schema_extra or {}
            if value is not None and isinstance(extra, dict):
                out += [f"{path}={json.dumps(value)}" for path in extra.get("sets", [])]
        return out

    def resolve(self) -> PipelineConfig:
        """The pipeline config this request runs with (a ConfigError names a bad field)."""
        return load_config(CONFIG_DIR / f"{self.profile}.yaml", self.overrides())
