"""What a training job will hold in memory, per worker, before any worker starts.

The architecture comes from the config (a model built from scratch) or from a local HF
directory's `config.json`, built on the meta device: parameters are counted exactly and no
weight is read. Each term is what the training loop allocates (`r1core.training`,
`r1core.parallel`, `r1core.logprobs`), in bytes, for one worker:

- parameters, gradients, AdamW state (two fp32 moments): fp32, divided by the workers under
  FSDP; DDP adds its gradient buckets (a second fp32 copy of the gradients) with 2+ workers;
- FSDP's gathered parameters: the root (embeddings, output layer) and two decoder layers (the
  one computing and the one prefetched), in the compute dtype;
- activations kept for backward at one micro-batch (`max_tokens_per_microbatch`, else the
  worker's whole share of a step): per token and layer, the tensors a transformers decoder layer
  saves (`ACTIVATIONS_PER_TOKEN`); with gradient checkpointing, each layer's input plus one
  layer's worth;
- logits: `logits_chunk_tokens` × vocabulary fp32 values, `LOGIT_COPIES` of them live; with
  chunking off, that for every scored token of the micro-batch;
- GRPO's frozen reference (sharded like the policy) and, for sampling, the KV cache of one
  generation batch (plus under FSDP the full copy the policy samples from).

The constants were measured with `bench/memory.py` on this code (docs/results.md); the estimate is
meant to be within 25% of the measured peak of tensor memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FP32 = 4
GIB = 2**30
# values a transformers Llama/Qwen decoder layer keeps for backward per token, in units of
# (hidden, key/value width, intermediate): two RMSNorms (input and normalised), q/k/v and their
# rotary copies, attention output and o_proj input, gate, up, SiLU and their product (bench/memory.py)
ACTIVATIONS_PER_TOKEN = {"hidden": 10, "kv": 4, "intermediate": 4}
# logits, logsumexp's exponentials, the softmax and its product with the logits (entropy), the
# logits' gradient in backward: five [chunk, vocab] fp32 tensors at the peak (bench/memory.py)
LOGIT_COPIES = 5


@dataclass(frozen=True)
class Architecture:
    """What the memory of a causal LM depends on."""

    parameters: int
    root_parameters: int  # outside the decoder layers: embeddings, final norm, output layer
    layer_parameters: int  # the largest decoder layer
    layers: int
    hidden: int
    kv_width: int  # num_key_value_heads × head_dim
    intermediate: int
    vocab: int
    source: str  # where it was read from

    @classmethod
    def of(cls, hf_config, source: str) -> Architecture:
        """Counted on the meta device: no memory, no weights read."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        layers = model.get_decoder().layers
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        total = sum(p.numel() for p in model.parameters())  # tied weights once
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        intermediate = getattr(hf_config, "intermediate_size", None) or hf_config.hidden_size * 4
        return cls(total, total - sum(per_layer), max(per_layer), len(per_layer), hf_config.hidden_size,
                   hf_config.num_key_value_heads * head_dim, intermediate, hf_config.vocab_size, source)

    @classmethod
    def from_directory(cls, path: str | Path) -> Architecture:
        from transformers import AutoConfig

        return cls.of(AutoConfig.from_pretrained(str(path), local_files_only=True), f"{path}/config.json")

    @classmethod
    def from_model_config(cls, model_cfg) -> Architecture:
        """A `ModelConfig`: its local HF directory if it names one, else the model built from scratch
        (the tokenizer's vocabulary taken as `vocab_size`)."""
        if model_cfg.pretrained_path:
            return cls.from_directory(model_cfg.pretrained_path)
        from r1core.modeling import hf_config

        return cls.of(hf_config(model_cfg, model_cfg.vocab_size), f"config: {model_cfg.architecture}, from scratch")


@dataclass(frozen=True)
class Workload:
    """One worker's share of a training step."""

    kind: str  # pretrain, sft, reward_model, grpo
    sequences_per_step: int  # all workers
    tokens_per_sequence: int  # the longest: padded width
    scored_per_sequence: int  # positions whose next token is scored (0: a scalar head)
    generation_batch: int = 0  # GRPO: sequences per generate call on one worker
    completion_tokens: int = 0  # GRPO: longest completion (the KV cache's length with the prompt)
    reference: bool = False  # GRPO with beta > 0: a frozen reference model


@dataclass
class Plan:
    stage: str
    workers: int
    strategy: str
    tokens_per_step: int
    tokens_per_microbatch: int
    microbatches: int
    terms: dict[str, int] = field(default_factory=dict)  # bytes per worker
    budget_gb: float | None = None

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def fits(self) -> bool:
        return self.budget_gb is None or self.total <= self.budget_gb * GIB

    def refusal(self) -> str:
        """Why it does not fit and what to change (the largest term decides the advice)."""
        term, size = max(self.terms.items(), key=lambda kv: kv[1])
        advice = {
            "activations": "lower compute.max_tokens_per_microbatch or set compute.gradient_checkpointing: true",
            "logits": "lower compute.logits_chunk_tokens (or max_tokens_per_microbatch if chunking is off)",
            "generation": "lower rollout.batch_size or the completion length (sampling.max_new_tokens)",
        }.get(term, "set compute.strategy: fsdp or add workers (compute.num_workers): parameters, gradients and "
                    "optimizer state are divided among them")
        return (f"stage {self.stage}: estimated {self.total / GIB:.2f} GiB per worker exceeds compute.memory_gb="
                f"{self.budget_gb:g}; the largest term is {term} ({size / GIB:.2f} GiB): {advice}")

    def rows(self) -> list[tuple[str, str]]:
        return [(k, f"{v / GIB:.3f}") for k, v in self.terms.items()] + [("total", f"{self.total / GIB:.3f}")]


def plan(stage: str, arch: Architecture, work: Workload, compute) -> Plan:
    """The per-worker memory of one training job (`compute`: its `TrainComputeConfig`)."""
    W = compute.num_workers
    sharded = compute.strategy == "fsdp"
    shard = W if sharded else 1
    compute_bytes = 2 if compute.bf16 and compute.use_gpu else FP32
    P = arch.parameters

    # the worker's sequences, then micro-batches of the token budget (padded rows × width)
    per_worker = -(-work.sequences_per_step // W)
    rows_per_micro = per_worker
    if compute.max_tokens_per_microbatch is not None:
        rows_per_micro = max(1, min(per_worker, compute.max_tokens_per_microbatch // work.tokens_per_sequence))
    micro_tokens = rows_per_micro * work.tokens_per_sequence
    micro_scored = rows_per_micro * work.scored_per_sequence

    terms = {
        "parameters": P * FP32 // shard,
        "gradients": P * FP32 // shard * (2 if not sharded and W > 1 else 1),  # DDP: + its buckets
        "optimizer": 2 * P * FP32 // shard,
    }
    if sharded:
        terms["gathered parameters"] = (arch.root_parameters + 2 * arch.layer_parameters) * compute_bytes
    a = ACTIVATIONS_PER_TOKEN
    per_token_layer = (a["hidden"] * arch.hidden + a["kv"] * arch.kv_width + a["intermediate"] * arch.intermediate)
    if compute.gradient_checkpointing:
        kept = arch.layers * arch.hidden + per_token_layer  # layer inputs + the layer being recomputed
    else:
        kept = arch.layers * per_token_layer
    terms["activations"] = micro_tokens * (kept + 4 * arch.hidden) * compute_bytes  # + embeddings, final norm
    if work.scored_per_sequence:
        chunk = compute.logits_chunk_tokens or micro_scored
        terms["logits"] = min(chunk, micro_scored) * arch.vocab * FP32 * LOGIT_COPIES
    if work.reference:
        terms["reference"] = P * FP32 // shard + (terms.get("gathered parameters", 0))
    if work.kind == "grpo":
        kv_cache = (2 * arch.layers * arch.kv_width * compute_bytes * work.generation_batch
                    * work.tokens_per_sequence)
        decode_logits = work.generation_batch * arch.vocab * FP32 * 2
        terms["generation"] = kv_cache + decode_logits + (P * FP32 if sharded and W > 1 else 0)
    return Plan(stage, W, compute.strategy, work.sequences_per_step * work.tokens_per_sequence,
                micro_tokens, -(-per_worker // rows_per_micro), terms, compute.memory_gb)


def render(plans: list[Plan]) -> str:
    """A table: one column per stage, one row per term (GiB per worker)."""
    terms = list(dict.fromkeys(k for p in plans for k in p.terms))
    header = ["GiB per worker"] + [p.stage for p in plans]
    rows = [header,
            ["workers x strategy"] + [f"{p.workers} x {p.strategy}" for p in plans],
            ["tokens per step"] + [f"{p.tokens_per_step:,}" for p in plans],
            ["tokens per micro-batch"] + [f"{p.tokens_per_microbatch:,} (x{p.microbatches})" for p in plans]]
    rows += [[t] + [f"{p.terms[t] / GIB:.3f}" if t in p.terms else "-" for p in plans] for t in terms]
    rows += [["total"] + [f"{p.total / GIB:.3f}" for p in plans],
             ["budget (memory_gb)"] + [f"{p.budget_gb:g}" if p.budget_gb else "-" for p in plans],
             ["fits"] + [("yes" if p.fits() else "NO") for p in plans]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                strict=True)))
                     for r in rows)


def plans_as_json(plans: list[Plan]) -> str:
    return json.dumps([{"stage": p.stage, "total_bytes": p.total, "terms": p.terms, "fits": p.fits()}
                       for p in plans], indent=2)
