"""Where a GRPO step's rollouts come from, and how far behind the trainer they may be.

A `RolloutSource` is asked for the rollouts of step s (`submit`), hands them back (`collect`)
and is told of every new weight version (`publish`); version v is the policy after v optimizer
steps. `InProcessRollouts` samples, at `collect`, from the policy being trained: version s at
step s, nothing to publish. A remote source (`tasks.rollout_workers`: Ray actors with the torch
engine, or vLLM engines) samples with whatever version it last received, so the loop decides
when to ask:

    step t trains on version t; with staleness bound k, step s's rollouts may come from
    version s-k or newer. So as soon as version p is published, every step s <= p + k can be
    submitted: with k = 0 generation waits for each update (synchronous GRPO), with k >= 1
    generation of step t+1 runs while step t trains.

`submittable_steps` is that rule; `check_staleness` verifies what came back against it. Each
rollout carries the version it was sampled with and the sampler's log-probs of its tokens (the
behaviour policy of `r1core.grpo`'s truncated importance sampling).

`PolicySampler` is the body of a rollout worker: a copy of the policy, loaded by versioned
chunks of named tensors (`weight_chunks`) or from a weight-version directory (`write_weight_version`:
safetensors shards that vLLM engines reload as well), sampling with the torch engine and scoring
its own samples by teacher forcing, exactly as the trainer scores them (`r1core.logprobs`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1core.batching import collate_rollouts
from r1core.engine import Rollout, Sampling, TorchEngine
from r1core.logprobs import TokenScorer


@dataclass
class StepRollouts:
    """The rollouts of one step, grouped (the n samples of prompt i at [i*n, (i+1)*n)), and what
    producing them cost."""

    rollouts: list[Rollout]
    gen_s: float  # wall time of generation (for a remote source: waiting for it after submit)
    sync_s: float = 0.0  # time the rollout engines spent loading weights for these rollouts
    restarts: int = 0  # rollout workers replaced so far
    extra: dict[str, float] = field(default_factory=dict)  # source-specific metrics


class RolloutSource(Protocol):
    remote: bool  # True: one source for the whole job (rank 0), its rollouts shared with every rank

    def publish(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Send weight `version` to the engines; returns the seconds the trainer spent on it."""
        ...

    def submit(self, step: int, prompts: list[str], n: int, sampling: Sampling) -> None: ...

    def collect(self, step: int) -> StepRollouts: ...

    def close(self) -> None: ...


class InProcessRollouts:
    """Samples from the policy being trained when its rollouts are collected (version = step)."""

    remote = False

    def __init__(self, engine: TorchEngine):
        self.engine = engine
        self.pending: dict[int, tuple[list[str], int, Sampling]] = {}

    def publish(self, version: int, weights) -> float:
        return 0.0

    def submit(self, step: int, prompts: list[str], n: int, sampling: Sampling) -> None:
        self.pending[step] = (prompts, n, sampling)

    def collect(self, step: int) -> StepRollouts:
        prompts, n, sampling = self.pending.pop(step)
        t0 = time.perf_counter()
        rollouts = self.engine.generate(prompts, n, sampling)
        for r in rollouts:
            r.version = step
        return StepRollouts(rollouts, time.perf_counter() - t0)

    def close(self) -> None:
        pass


def submittable_steps(published: int, max_staleness: int, next_step: int, steps: int) -> range:
    """Steps that may be submitted once version `published` is out: up to `published + k`."""
    return range(next_step, min(steps, published + max_staleness + 1))


def check_staleness(step: int, rollouts: list[Rollout], max_staleness: int) -> int:
    """The largest staleness (step - version) among `rollouts`; raises if any breaks the bound."""
    worst = max(step - r.version for r in rollouts)
    if worst > max_staleness or any(r.version > step for r in rollouts):
        versions = sorted({r.version for r in rollouts})
        raise RuntimeError(f"step {step}: rollouts of weight versions {versions} break max_staleness "
                           f"{max_staleness}")
    return worst


def worker_shards(num_prompts: int, num_workers: int) -> list[list[int]]:
    """Prompt indices of each worker's share of a step: worker j takes j, j+W, ... (the same split
    as the trainer's ranks, so W workers sample what W in-process ranks would)."""
    return [list(range(j, num_prompts, num_workers)) for j in range(num_workers)]


def weight_chunks(weights: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int) -> Iterator[dict]:
    """Named tensors (CPU copies) in dicts of about `chunk_bytes` each, in order."""
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in weights:
        chunk[name] = t.detach().to("cpu", copy=True)
        size += t.numel() * t.element_size()
        if size >= chunk_bytes:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk


WEIGHTS_MANIFEST = "weights.json"


def weight_version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def write_weight_version(root: str | Path, version: int, weights: Iterable[tuple[str, torch.Tensor]],
                         chunk_bytes: int) -> Path:
    """Weight `version` as a directory of safetensors shards (HF names, so vLLM's loader takes them)
    and a manifest of every tensor, written under a temporary name and renamed whole: an engine
    never sees half a version."""
    final = weight_version_dir(root, version)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    manifest: dict = {"version": version, "shards": {}}
    for i, chunk in enumerate(weight_chunks(weights, chunk_bytes)):
        name = f"model-{i:05d}.safetensors"
        save_file(chunk, str(partial / name), metadata={"version": str(version)})
        manifest["shards"][name] = {k: [str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in chunk.items()}
    (partial / WEIGHTS_MANIFEST).write_text(json.dumps(manifest))
    for f in partial.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final


def read_weight_version(path: str | Path, version: int) -> Iterator[dict[str, torch.Tensor]]:
    """The chunks of a `write_weight_version` directory, each checked against its manifest; any
    damage (a missing or truncated shard, another version, a tensor of another shape) is an error
    naming the file."""
    path = Path(path)
    try:
        manifest = json.loads((path / WEIGHTS_MANIFEST).read_text())
        if not isinstance(manifest, dict) or manifest.get("version") != version:
            raise ValueError(f"it is not the manifest of version {version}")
        shards = manifest.get("shards")
        if not isinstance(shards, dict) or not shards or not all(
                isinstance(tensors, dict) and all(_tensor_spec(spec) for spec in tensors.values())
                for tensors in shards.values()):
            raise ValueError("its shards are not a map of shard -> tensor -> [dtype, shape]")
    except (OSError, ValueError) as e:
        raise ValueError(f"weight version {version}: '{path / WEIGHTS_MANIFEST}' is unreadable ({e})") from None
    for name, expected in shards.items():
        shard = path / Path(name).name
        try:
            with safe_open(str(shard), framework="pt") as f:
                if sorted(f.keys()) != sorted(expected):
                    raise ValueError(f"holds tensors {sorted(f.keys())[:3]}..., not the manifest's")
                chunk = {k: f.get_tensor(k) for k in expected}
        except (OSError, SafetensorError, ValueError) as e:
            raise ValueError(f"weight version {version}: shard '{shard}' is unreadable ({e})") from None
        for k, (dtype, shape) in expected.items():
            t = chunk[k]
            if str(t.dtype).removeprefix("torch.") != dtype or list(t.shape) != shape:
                raise ValueError(f"weight version {version}: '{shard}' tensor '{k}' is {t.dtype} "
                                 f"{list(t.shape)}, the manifest says {dtype} {shape}")
        yield chunk


def _tensor_spec(spec) -> bool:
    return (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], list)
            and all(isinstance(d, int) and d >= 0 for d in spec[1]))


class PolicySampler:
    """A rollout worker's copy of the policy: loads weight versions, samples, scores."""

    def __init__(self, model, tokenizer, batch_size: int, logits_chunk_tokens: int):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.engine = TorchEngine(model, tokenizer, batch_size)
        self.scorer = TokenScorer(model, logits_chunk_tokens)
        self.batch_size = batch_size
        self.version = -1  # none loaded yet

    @torch.no_grad()
    def load_weights(self, version: int, chunks: Iterable[dict[str, torch.Tensor]]) -> float:
        """Copy every named tensor of `chunks` into the model; all of its weights must come."""
        t0 = time.perf_counter()
        own = self.model.state_dict()
        seen: set[str] = set()
        for chunk in chunks:
            for name, t in chunk.items():
                if name not in own:
                    raise KeyError(f"weight version {version}: unknown tensor '{name}'")
                if t.shape != own[name].shape:
                    raise ValueError(f"weight version {version}: tensor '{name}' has shape {list(t.shape)}, "
                                     f"the model's is {list(own[name].shape)}")
                own[name].copy_(t)
                seen.add(name)
        missing = sorted(set(own) - seen)
        if missing:
            raise KeyError(f"weight version {version} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.version = version
        return time.perf_counter() - t0

    def load_checkpoint(self, version: int, path: str) -> float:
        """Weight `version` from its `write_weight_version` directory."""
        return self.load_weights(version, read_weight_version(path, version))

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[Rollout]:
        """n samples per prompt from the loaded version, each with its tokens' log-probs."""
        if self.version < 0:
            raise RuntimeError("no weights loaded: publish a version before generating")
        rollouts = self.engine.generate(prompts, n, sampling)
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        logps = self.score([prompt_ids[r.prompt_index] for r in rollouts], [r.completion_ids for r in rollouts])
        for r, lp in zip(rollouts, logps, strict=True):
            r.logprobs, r.version = lp, self.version
        return rollouts

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """log π of each completion's tokens, teacher-forced, `batch_size` sequences at a time."""
        out: list[list[float]] = []
        for i in range(0, len(prompt_ids), self.batch_size):
            p, c = prompt_ids[i : i + self.batch_size], completion_ids[i : i + self.batch_size]
            logp, _ = collate_rollouts(p, c, self.tokenizer.pad_token_id, layout="padded").scored(self.scorer)
            out += [row[: len(ids)] for row, ids in zip(logp.tolist(), c, strict=True)]
        return out
