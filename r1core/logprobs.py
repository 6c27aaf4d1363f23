"""Log-probabilities of chosen tokens without the [batch, time, vocabulary] tensor.

Every training loss of a causal LM here (pretraining and SFT cross-entropy, GRPO's ratio and
KL) needs only log π(token_t | tokens_<t) of the tokens that were chosen, at the positions
that are scored. Computing the full logits and a log-softmax for a batch costs
B × T × V × 4 bytes per copy (a 150k vocabulary, 128 completions of 4k tokens: ~300 GB), kept
for backward. Here the decoder's last hidden state is taken at the scored positions only, and
the output layer runs over them `chunk_tokens` at a time, in fp32: each chunk gives its
selected log-prob (logit − logsumexp) and entropy, and its logits are dropped at once; with
gradients on, the chunk is recomputed in backward (activation checkpointing), so at most one
chunk of logits lives at any time. Memory for logits goes from N × V to chunk × V.

`TokenScorer` wraps a transformers causal LM so that this is its forward: what DDP and FSDP
wrap, so that their hooks see the output layer run (under FSDP the output layer's weights are
gathered by the root's forward, which is this one).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, with_entropy: bool):
    logits = head(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    with torch.no_grad():  # a diagnostic, never differentiated: H = logsumexp − Σ p·logit
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def selected_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, *,
                      chunk_tokens: int, with_entropy: bool = False):
    """log softmax(head(hidden))[targets] for hidden [N, d], targets [N], in fp32, `chunk_tokens`
    rows of logits at a time (0: all rows at once, the naive path). Returns (logp [N], entropy
    [N] or None); entropy carries no gradient."""
    n = hidden.shape[0]
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return _chunk_logprobs(hidden, head, targets, with_entropy)
    logps, entropies = [], []
    for i in range(0, n, chunk_tokens):
        h, t = hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens]
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(_chunk_logprobs, h, head, t, with_entropy, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(h, head, t, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


class TokenScorer(torch.nn.Module):
    """A causal LM whose forward returns the log-probs of chosen tokens at chosen positions.

    `forward(input_ids, position_ids, attention_mask, positions, targets)`: `positions` [N] are
    flat indices into the [B, T] batch of the positions whose next token is scored (the logits
    at t predict token t+1), `targets` [N] those tokens. `attention_mask=None` with position ids
    that restart at 0 is a packed batch (transformers keeps each sequence's attention to itself);
    a boolean [B, 1, T, T] mask (True: may attend) says which positions each position sees."""

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, position_ids, attention_mask, positions, targets, with_entropy: bool = False):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._custom_mask(attention_mask)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.flatten(0, 1)[positions]
        return selected_logprobs(hidden, self.lm.get_output_embeddings(), targets,
                                 chunk_tokens=self.chunk_tokens, with_entropy=with_entropy)


    def _custom_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """A 4D mask as the model's attention takes it: sdpa a boolean one, eager an additive one
        (transformers passes a 4D mask through unchanged); flash kernels take none."""
        implementation = self.lm.config._attn_implementation
        if implementation == "sdpa":
            return visible
        if implementation == "eager":
            dtype = self.lm.get_output_embeddings().weight.dtype
            return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
                ~visible, torch.finfo(dtype).min)
        raise ValueError(f"a [B, 1, T, T] attention mask (rollout_layout shared_prompt) needs sdpa or eager "
                         f"attention, not {implementation}")


def next_token_targets(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) of a causal-LM batch: every position t whose next label (t+1) is not
    -100, flat over [B, T]. A packed row's label at a sequence start is never -100 only when the
    previous sequence's last token predicts it; `pack_examples` labels prompts -100, so it does not."""
    B, T = input_ids.shape
    scored = labels[:, 1:] != -100
    rows, cols = scored.nonzero(as_tuple=True)
    return rows * T + cols, labels[:, 1:][scored]
