"""Model factory: a tiny causal LM built from a transformers config, or any local HF directory."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
)

ARCHITECTURES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "deepseek_v3": DeepseekV3Config}


def _deepseek_v3_fields(moe) -> dict:
    """A tiny DeepSeek-V3: MLA attention, MoE FFNs with shared experts after the first dense
    layers, one expert group (the group-limited routing of the full model needs many experts)."""
    return {"n_routed_experts": moe.routed_experts, "n_shared_experts": moe.shared_experts,
            "num_experts_per_tok": moe.experts_per_token, "moe_intermediate_size": moe.expert_intermediate_size,
            "first_k_dense_replace": moe.first_dense_layers, "kv_lora_rank": moe.kv_lora_rank,
            "q_lora_rank": moe.q_lora_rank, "qk_rope_head_dim": moe.qk_rope_head_dim,
            "qk_nope_head_dim": moe.qk_nope_head_dim, "v_head_dim": moe.v_head_dim,
            "n_group": 1, "topk_group": 1, "num_mtp_layers": 0}


def hf_config(cfg, vocab_size: int, bos: int | None = None, eos: int | None = None, pad: int | None = None):
    """The transformers config of a `ModelConfig` for a tokenizer of `vocab_size` tokens."""
    extra = _deepseek_v3_fields(cfg.moe) if cfg.architecture == "deepseek_v3" else {}
    return ARCHITECTURES[cfg.architecture](
        **extra,
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )


def build_model(cfg, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of the size given by a `ModelConfig`."""
    config = hf_config(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if cfg.architecture == "deepseek_v3":  # the eager expert loop is the fastest on CPU
        return AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    return AutoModelForCausalLM.from_config(config)


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32):
    """Model and tokenizer from a local HF directory (never from a hub)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no HF model directory (config.json) at '{path}'")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model, tokenizer


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
