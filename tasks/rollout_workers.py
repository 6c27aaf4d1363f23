"""Rollout workers: Ray actors that hold a copy of the policy and sample GRPO's rollouts.

    trainer rank 0 ── publish(v): weights in chunks ──► object store ──► every worker loads v
                  ── submit(step): prompt shards ─────────────────────► worker j samples shard j
                  ◄─ collect(step): rollouts (tokens, log-probs, version) ─┘

A `RolloutPool` is the `r1core.rollout_sources.RolloutSource` of `rollout.backend: workers`,
driven by rank 0 of the Ray Train job (its actors die with it). Calls on one actor run in the
order they were sent, so a generation submitted after publishing version v samples with v or
newer: the staleness rule of `r1core.rollout_sources` rests on that. Nothing is waited for
without a deadline: a call that does not answer in time, or whose actor died, costs that actor
(killed and replaced, up to `max_restarts` times; the replacement loads the latest version and
takes over its unfinished calls), else the stage fails with an error naming the worker and the
call. The latest version's chunks stay in the object store so that a replacement can load them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r1core.config import RolloutConfig
from r1core.engine import Rollout, Sampling
from r1core.rollout_sources import StepRollouts, weight_chunks, worker_shards

log = logging.getLogger("r1.rollouts")


class RolloutWorkerError(RuntimeError):
    """A rollout worker failed a call and could not be replaced."""


class RolloutWorker:
    """The actor: an `r1core.rollout_sources.PolicySampler` on this worker's CPUs or GPU."""

    def __init__(self, model_dir: str, batch_size: int, logits_chunk_tokens: int, threads: int, use_gpu: bool):
        import torch

        from r1core.modeling import load_pretrained
        from r1core.rollout_sources import PolicySampler

        torch.set_num_threads(threads)
        model, tokenizer = load_pretrained(model_dir)
        model.to("cuda" if use_gpu else "cpu")
        self.sampler = PolicySampler(model, tokenizer, batch_size, logits_chunk_tokens)

    def ping(self) -> int:
        return os.getpid()

    def load_weights(self, version: int, chunk_refs: list) -> float:
        # chunk refs arrive inside a list, so Ray leaves them unresolved: fetched one at a time
        return self.sampler.load_weights(version, (ray.get(ref) for ref in chunk_refs))

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> tuple[list[Rollout], float]:
        t0 = time.perf_counter()
        rollouts = self.sampler.generate(prompts, n, sampling)
        return rollouts, time.perf_counter() - t0

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        return self.sampler.score(prompt_ids, completion_ids)


@dataclass
class _Call:
    """A call sent to a worker and not yet answered."""

    what: str  # how errors name it, e.g. "load_weights(version 3)"
    ref: ray.ObjectRef
    timeout_s: float
    generation: tuple | None = None  # (step, shard, prompts, n, sampling, prompt indices) to re-issue


class RolloutPool:
    """`rollout.num_workers` rollout workers (`RolloutWorker`, or `worker_cls`) for one stage."""

    remote = True

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, logits_chunk_tokens: int,
                 worker_cls: type = RolloutWorker, name: str = "rollout"):
        self.cfg, self.name = cfg, name
        self.worker_args = (model_dir, cfg.batch_size, logits_chunk_tokens, max(1, int(cfg.cpus_per_worker)),
                            cfg.use_gpu)
        self.actor_cls = ray.remote(worker_cls)
        self.latest: tuple[int, list] | None = None  # (version, chunk refs) a replacement loads
        self.results: dict[tuple[int, int], tuple[list[Rollout], float, list[int]]] = {}
        self.shards: dict[int, list[int]] = {}  # step -> the workers holding its shards
        self.load_seconds: list[float] = []  # weight loads answered since the last collect
        self.restarts = 0
        self.actors: list = [None] * cfg.num_workers
        self.pids: list[int | None] = [None] * cfg.num_workers
        self.queues: list[deque[_Call]] = [deque() for _ in range(cfg.num_workers)]
        for j in range(cfg.num_workers):
            self._start(j)

    # ------------------------------------------------------------------ the RolloutSource interface
    def publish(self, version: int, weights) -> float:
        t0 = time.perf_counter()
        refs = [ray.put(chunk) for chunk in weight_chunks(weights, self.cfg.chunk_mb << 20)]
        self.latest = (version, refs)
        for j in range(len(self.actors)):
            self._send_load(j)
        return time.perf_counter() - t0

    def submit(self, step: int, prompts: list[str], n: int, sampling: Sampling) -> None:
        self.shards[step] = []
        for j, idx in enumerate(worker_shards(len(prompts), len(self.actors))):
            if idx:
                shard = dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + j)
                self._send_generation(j, (step, j, [prompts[i] for i in idx], n, shard, idx))
                self.shards[step].append(j)

    def collect(self, step: int) -> StepRollouts:
        t0 = time.perf_counter()
        rollouts: list[Rollout] = []
        worker_s = []
        for j in self.shards.pop(step):
            self._drain(j, until=(step, j))
            shard_rollouts, seconds, idx = self.results.pop((step, j))
            worker_s.append(seconds)
            for r in shard_rollouts:
                r.prompt_index = idx[r.prompt_index]
            rollouts += shard_rollouts
        rollouts.sort(key=lambda r: r.prompt_index)  # stable: each group keeps its sample order
        loads, self.load_seconds = self.load_seconds, []
        return StepRollouts(rollouts, time.perf_counter() - t0,
                            sync_s=max(loads) if loads else 0.0, restarts=self.restarts,
                            extra={"time/gen_worker_s": max(worker_s) if worker_s else 0.0})

    def score(self, worker: int, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Worker `worker`'s log-probs of fixed sequences (after the weights sent so far)."""
        self._drain(worker)
        return self._get(worker, _Call("score", self.actors[worker].score.remote(prompt_ids, completion_ids),
                                       self.cfg.generate_timeout_s))

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor)
        self.latest = None

    # ------------------------------------------------------------------ calls, deadlines, replacement
    def _start(self, j: int) -> None:
        cfg = self.cfg
        # outside the trainer's placement group (Ray Train captures its workers' children there,
        # where the trainer's bundles leave no room): the workers' resources are their own
        actor = self.actor_cls.options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0,
                                       max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(None),
                                       ).remote(*self.worker_args)
        try:
            self.pids[j] = ray.get(actor.ping.remote(), timeout=cfg.start_timeout_s)
        except GetTimeoutError:
            ray.kill(actor)
            raise RolloutWorkerError(
                f"{self.name} worker {j} did not start within {cfg.start_timeout_s:g}s (it needs "
                f"{cfg.cpus_per_worker:g} CPUs{' and a GPU' if cfg.use_gpu else ''}: are they free "
                f"beside the trainer's workers?)") from None
        except RayActorError as e:
            raise RolloutWorkerError(f"{self.name} worker {j} failed to start: {e}") from e
        self.actors[j] = actor

    def _send_load(self, j: int) -> None:
        version, refs = self.latest
        self.queues[j].append(_Call(f"load_weights(version {version})",
                                    self.actors[j].load_weights.remote(version, refs), self.cfg.sync_timeout_s))

    def _send_generation(self, j: int, generation: tuple) -> None:
        step, _, prompts, n, sampling, _ = generation
        self.queues[j].append(_Call(f"generate(step {step}, {len(prompts)} prompts x {n})",
                                    self.actors[j].generate.remote(prompts, n, sampling),
                                    self.cfg.generate_timeout_s, generation))

    def _drain(self, j: int, until: tuple[int, int] | None = None) -> None:
        """Wait for worker j's calls in order, up to the generation `until` (default: all)."""
        while self.queues[j]:
            call = self.queues[j][0]
            result = self._get(j, call)
            if result is None:  # the worker was replaced; its queue was sent again
                continue
            self.queues[j].popleft()
            if call.generation is None:
                self.load_seconds.append(result)
                continue
            step, shard, _, _, _, idx = call.generation
            self.results[(step, shard)] = (*result, idx)
            if (step, shard) == until:
                return

    def _get(self, j: int, call: _Call):
        """The call's result, or None after replacing worker j (which failed it)."""
        try:
            return ray.get(call.ref, timeout=call.timeout_s)
        except GetTimeoutError:
            reason = f"did not answer {call.what} within {call.timeout_s:g}s"
        except RayActorError as e:
            reason = f"died during {call.what} ({type(e).__name__})"
        except ray.exceptions.RayTaskError as e:  # the call itself raised: replacing it would not help
            raise RolloutWorkerError(f"{self.name} worker {j} (pid {self.pids[j]}) failed {call.what}: "
                                     f"{e.cause!r}") from e
        self._replace(j, reason)
        return None

    def _replace(self, j: int, reason: str) -> None:
        if self.restarts >= self.cfg.max_restarts:
            raise RolloutWorkerError(f"{self.name} worker {j} (pid {self.pids[j]}) {reason}; "
                                     f"{self.restarts} of max_restarts={self.cfg.max_restarts} replacements used")
        self.restarts += 1
        log.warning("%s worker %d (pid %s) %s: replacing it (%d/%d)", self.name, j, self.pids[j], reason,
                    self.restarts, self.cfg.max_restarts)
        ray.kill(self.actors[j], no_restart=True)
        unfinished = [c.generation for c in self.queues[j] if c.generation is not None]
        self.queues[j].clear()
        self._start(j)
        if self.latest is not None:
            self._send_load(j)
        for generation in unfinished:  # same prompts and seeds, on the newest weights
            self._send_generation(j, generation)
