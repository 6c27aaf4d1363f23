"""Model factory: a tiny causal LM built from a transformers config, or any local HF directory."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, Qwen2Config

ARCHITECTURES = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def build_model(cfg, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of the size given by a `ModelConfig`."""
    hf_config = ARCHITECTURES[cfg.architecture](
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config)


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
