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
    logprobs: list[float] | None = None  # the sampler's log-probs of completion_ids (remote engines)
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
    """Batched sampling with transformers' `generate` (KV cache), left-padded prompts."""

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Rollout]:
        tok, model = self.tokenizer, self.model
        was_training = model.training
        model.eval()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        rollouts: list[Rollout] = []
        device = next(model.parameters()).device
        try:
            for start in range(0, len(expanded), self.batch_size):
                chunk = expanded[start : start + self.batch_size]
                enc = tok([p for _, p in chunk], return_tensors="pt", padding=True, padding_side="left")
                enc = enc.to(device)
                out = model.generate(
                    **enc,
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature if sampling.temperature > 0 else None,
                    top_p=sampling.top_p if sampling.temperature > 0 else None,
                    top_k=None,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                for (i, _), seq in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist(), strict=False):
                    ids = _cut_at_eos(seq, tok.eos_token_id, tok.pad_token_id)
                    finish = "stop" if ids and ids[-1] == tok.eos_token_id else "length"
                    rollouts.append(Rollout(i, decode_completion(tok, ids), ids, finish))
        finally:
            model.train(was_training)
        return rollouts


def _cut_at_eos(seq: list[int], eos: int, pad: int) -> list[int]:
    if eos in seq:
        return seq[: seq.index(eos) + 1]
    return [t for t in seq if t != pad] if pad != eos else seq


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
