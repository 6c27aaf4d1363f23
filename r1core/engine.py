"""Rollout engines: sample n completions per prompt.

- `TorchEngine`: batched, KV-cached generation with transformers in this process. The default;
  it runs inside the Ray Train workers on the policy being trained, and returns token ids so
  that GRPO trains on exactly the tokens that were sampled.
- `OpenAIEngine`: a client for any OpenAI-compatible completions server. This is how vLLM (or
  SGLang, or `transformers serve`) is used at scale: the server runs in its own environment,
  since vLLM's pins clash with Prefect's. It returns text; token ids are re-tokenized.

Rollouts come back grouped: the n samples of prompt i are at [i*n, (i+1)*n).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from r1core.tokenizer import decode_completion


@dataclass
class Rollout:
    prompt_index: int
    text: str
    completion_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    logprobs: list[float] | None = None  # the sampler's untempered log-probs of completion_ids (torch and remote engines)
    version: int | None = None  # the weight version that sampled it (GRPO's rollout sources)


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg, seed: int | None = None) -> Sampling:
        return cls(cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Rollout]: ...


class TorchEngine:
    """Sampling from a transformers causal LM in this process, with its own decode loop.

    What `generate` would spend on work that changes nothing is not paid:
    - **one prefill per prompt**: a prompt's n samples share its KV cache (the prompt is encoded
      once, then the cache is repeated n times), where `model.generate` would prefill the same
      prompt n times; the output layer runs on each prompt's last position only;
    - **finished sequences leave the batch**: a row that sampled EOS is dropped from the cache,
      mask and positions at once, so a decode step costs the rows still running, not the longest.

    Tokens are sampled from softmax(logits / T), restricted to the top-p nucleus, with a
    `torch.Generator` seeded by `sampling.seed`; T = 0 is greedy. Each rollout carries the
    policy's own log-probs of its tokens (the untempered distribution, what the update computes:
    `tests/test_engine.py` checks they agree). `batch_size` bounds the rows decoded at once."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Rollout]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator(device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        per_chunk = max(1, self.batch_size // n)  # prompts per chunk: n rows each
        rollouts: list[Rollout] = []
        try:
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start : start + per_chunk]
                for j, (ids, logps) in enumerate(self._sample(chunk, n, sampling, generator, device)):
                    finish = "stop" if ids and ids[-1] == self.tokenizer.eos_token_id else "length"
                    rollouts.append(Rollout(start + j // n, decode_completion(self.tokenizer, ids), ids, finish,
                                            logprobs=logps))
        finally:
            model.train(was_training)
        return rollouts

    def _sample(self, prompts: list[str], n: int, sampling: Sampling, generator, device):
        """(completion ids, their log-probs) of each prompt's n samples, prompt after prompt."""
        tok, model = self.tokenizer, self.model
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache = out.cache
        cache.batch_repeat_interleave(n)  # the group's samples share their prompt's prefill
        logits = out.logits[:, -1].repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_position = positions[:, -1].repeat_interleave(n, 0) + 1
        running = torch.arange(len(prompts) * n, device=device)  # which sample each row is
        tokens = [[] for _ in range(len(prompts) * n)]
        logprobs = [[] for _ in range(len(prompts) * n)]
        # padding is never a completion token (it would be dropped when the text is re-encoded)
        banned = None if tok.pad_token_id in (None, tok.eos_token_id) else tok.pad_token_id
        for t in range(sampling.max_new_tokens):
            chosen = _sample_tokens(logits, sampling, generator, banned)
            chosen_logp = torch.log_softmax(logits.float(), -1).gather(1, chosen[:, None]).squeeze(1)
            for row, token, logp in zip(running.tolist(), chosen.tolist(), chosen_logp.tolist(), strict=True):
                tokens[row].append(token)
                logprobs[row].append(logp)
            if t + 1 == sampling.max_new_tokens:
                break
            going = chosen != tok.eos_token_id
            if not going.all():  # finished rows leave the batch
                keep = going.nonzero().squeeze(1)
                if len(keep) == 0:
                    break
                cache.batch_select_indices(keep)
                mask, next_position, running, chosen = mask[keep], next_position[keep], running[keep], chosen[keep]
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position[:, None],
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1]
            next_position = next_position + 1
        return zip(tokens, logprobs, strict=True)


def _sample_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator,
                   banned: int | None) -> torch.Tensor:
    """One token per row, never `banned`: argmax at T = 0, else from softmax(logits / T) within the
    top-p nucleus (the smallest set of most likely tokens whose probability reaches top_p)."""
    if banned is not None:
        logits = logits.clone()
        logits[:, banned] = float("-inf")
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # mass before it already reaches p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class OpenAIEngine:
    """Client for an OpenAI-compatible `/v1/completions` endpoint (vLLM, SGLang, transformers).

    Asks for n samples per prompt; servers that ignore `n` (transformers serve) are asked again
    until each prompt has n. Requests run concurrently."""

    def __init__(self, base_url: str, model: str, tokenizer=None, api_key: str = "EMPTY",
                 concurrency: int = 8, timeout_s: float = 300.0):
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.tokenizer, self.api_key = model, tokenizer, api_key
        self.concurrency, self.timeout_s = concurrency, timeout_s

    def _post(self, payload: dict) -> dict:
        req = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def _samples(self, prompt: str, n: int, sampling: Sampling, salt: int) -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        while len(got) < n:
            payload = {"model": self.model, "prompt": prompt, "n": n - len(got),
                       "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                       "top_p": sampling.top_p, **sampling.extra}
            if sampling.seed is not None:
                payload["seed"] = sampling.seed + salt + len(got)
            choices = self._post(payload)["choices"]
            if not choices:
                raise RuntimeError(f"{self.url}: server returned no choices")
            got += [(c["text"], c.get("finish_reason") or "stop") for c in choices][: n - len(got)]
        return got

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Rollout]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            per_prompt = list(pool.map(lambda ip: self._samples(ip[1], n, sampling, 1000 * ip[0]),
                                       enumerate(prompts)))
        rollouts = []
        for i, samples in enumerate(per_prompt):
            for text, finish in samples:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if self.tokenizer else []
                rollouts.append(Rollout(i, text, ids, finish))
        return rollouts
