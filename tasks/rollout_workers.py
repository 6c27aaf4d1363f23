"""Rollout workers: Ray actors that hold a copy of the policy and sample GRPO's rollouts.

    trainer rank 0 ── publish(v): weights ──► object store chunks | a version directory | NCCL ──► every worker loads v
                  ── submit(step): prompt shards ─────────────────────► worker j samples shard j
                  ◄─ collect(step): rollouts (tokens, log-probs, version) ─┘

A `RolloutPool` is the `r1core.rollout_sources.RolloutSource` of `rollout.backend: workers`
(`RolloutWorker`: the torch engine) and `vllm` (`r1core.vllm_engine.VLLMSampler`, started with
the vLLM environment's Python as the actor's runtime environment), driven by rank 0 of the Ray
Train job (its actors die with it). Weights go by `rollout.sync`: `object_store` (chunks put in
Ray's object store), `checkpoint` (a safetensors version directory under `weights_dir`, which
every worker must be able to read; kept until every worker has loaded a newer one) or `nccl`
(vLLM's native transfer from an `NCCLWeightSender`; after a worker is replaced the group is
short of a member, so the stage goes on with `checkpoint`). Calls on one actor run in the
order they were sent, so a generation submitted after publishing version v samples with v or
newer: the staleness rule of `r1core.rollout_sources` rests on that. Nothing is waited for
without a deadline: a call that does not answer in time, or whose actor died, costs that actor
(killed and replaced, up to `max_restarts` times; the replacement loads the latest version and
takes over its unfinished calls), else the stage fails with an error naming the worker and the
call. The latest version's chunks stay in the object store so that a replacement can load them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from r1core.config import RolloutConfig
from r1core.engine import Rollout, Sampling
from r1core.rollout_sources import (
    StepRollouts,
    weight_chunks,
    worker_shards,
    write_weight_version,
)
from r1core.vllm_engine import chunk_spec

log = logging.getLogger("r1.rollouts")
REPLACED = object()  # what waiting on a call gives when its worker failed it and was replaced


class RolloutWorkerError(RuntimeError):
    """A rollout worker failed a call and could not be replaced."""


class RolloutWorker:
    """The actor: an `r1core.rollout_sources.PolicySampler` on this worker's CPUs or GPU."""

    def __init__(self, model_dir: str, batch_size: int, logits_chunk_tokens: int, threads: int, use_gpu: bool,
                 version: int = -1):
        import torch

        from r1core.modeling import load_pretrained
        from r1core.rollout_sources import PolicySampler

        torch.set_num_threads(threads)
        model, tokenizer = load_pretrained(model_dir)
        model.to("cuda" if use_gpu else "cpu")
        self.sampler = PolicySampler(model, tokenizer, batch_size, logits_chunk_tokens)
        self.sampler.version = version  # -1: samples only once a version is published

    def ping(self) -> int:
        return os.getpid()

    def load_weights(self, version: int, chunk_refs: list) -> float:
        # chunk refs arrive inside a list, so Ray leaves them unresolved: fetched one at a time
        return self.sampler.load_weights(version, (ray.get(ref) for ref in chunk_refs))

    def load_checkpoint(self, version: int, path: str) -> float:
        return self.sampler.load_checkpoint(version, path)

    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> tuple[list[Rollout], float]:
        t0 = time.perf_counter()
        rollouts = self.sampler.generate(prompts, n, sampling)
        return rollouts, time.perf_counter() - t0

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        return self.sampler.score(prompt_ids, completion_ids)


class NCCLWeightSender:
    """The sending end of vLLM's NCCL weight transfer, in vLLM's environment (the trainer cannot
    import vllm): takes the trainer's chunks from Ray's object store onto its GPU and broadcasts
    them to every engine (rank 0 of the transfer group)."""

    def __init__(self):
        from vllm.utils.network_utils import get_ip, get_open_port

        self.address, self.port = get_ip(), get_open_port()
        self.group = None

    def endpoint(self) -> tuple[str, int]:
        return self.address, self.port

    def init(self, world_size: int) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        self.group = NCCLWeightTransferEngine.trainer_init(
            {"master_address": self.address, "master_port": self.port, "world_size": world_size})

    def send(self, chunks: list) -> float:
        """Broadcast each chunk (a dict of CPU tensors), in order; one engine `update_weights` each."""
        import torch
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerSendWeightsArgs,
            NCCLWeightTransferEngine,
        )

        t0 = time.perf_counter()
        for ref in chunks:
            chunk = {k: t.to("cuda", non_blocking=True) for k, t in ray.get(ref).items()}
            torch.cuda.synchronize()
            NCCLWeightTransferEngine.trainer_send_weights(
                iterator=iter(chunk.items()), trainer_args=NCCLTrainerSendWeightsArgs(group=self.group, packed=True))
        return time.perf_counter() - t0

    def ping(self) -> int:
        return os.getpid()


@dataclass
class _Call:
    """A call sent to a worker and not yet answered."""

    what: str  # how errors name it, e.g. "load_weights(version 3)"
    ref: ray.ObjectRef
    timeout_s: float
    generation: tuple | None = None  # (step, shard, prompts, n, sampling, prompt indices) to re-issue
    load: int | None = None  # the weight version a load call loads


class RolloutPool:
    """`rollout.num_workers` rollout workers (`RolloutWorker`, `VLLMSampler`, or `worker_cls`) for one stage."""

    remote = True

    def __init__(self, cfg: RolloutConfig, model_dir: str, *, logits_chunk_tokens: int,
                 weights_dir: str | None = None, worker_cls: type | None = None, name: str = "rollout",
                 fixed: bool = False):
        self.cfg, self.name, self.sync = cfg, name, cfg.sync
        # fixed: the workers sample `model_dir` as version 0 and nothing is published (cold start,
        # rejection sampling); else they sample only once the trainer has published a version
        if self.sync != "object_store" and weights_dir is None and not fixed:  # nccl falls back to checkpoint
            raise ValueError(f"weight_sync {self.sync} needs a weights_dir every rollout worker can read")
        self.weights_dir = Path(weights_dir) if weights_dir else None
        if cfg.backend == "vllm":
            from r1core.vllm_engine import VLLMSampler

            worker_cls = worker_cls or VLLMSampler
            self.worker_args = (model_dir, cfg.vllm.model_dump(), "checkpoint" if fixed else self.sync,
                                0 if fixed else -1)
        else:
            worker_cls = worker_cls or RolloutWorker
            self.worker_args = (model_dir, cfg.batch_size, logits_chunk_tokens, max(1, int(cfg.cpus_per_worker)),
                                cfg.use_gpu, 0 if fixed else -1)
        self.actor_cls = ray.remote(worker_cls)
        self.latest: tuple | None = None  # (version, chunk refs or version directory) a replacement loads
        self.loaded: list[int] = [-1] * cfg.num_workers  # the newest version each worker answered
        self.results: dict[tuple[int, int], tuple[list[Rollout], float, list[int]]] = {}
        self.shards: dict[int, list[int]] = {}  # step -> the workers holding its shards
        self.load_seconds: list[float] = []  # weight loads answered since the last collect
        self.restarts = 0
        self.actors: list = [None] * cfg.num_workers
        self.pids: list[int | None] = [None] * cfg.num_workers
        self.queues: list[deque[_Call]] = [deque() for _ in range(cfg.num_workers)]
        self.sender, self.sender_calls = None, deque()  # nccl: the sending end and its broadcasts
        self.nccl_specs: list[dict] = []  # nccl: what each chunk of the latest version holds
        launched = [self._launch() for _ in range(cfg.num_workers)]  # all start at once, then each is awaited
        try:
            for j, actor in enumerate(launched):
                self._await_start(j, actor)
        except RolloutWorkerError:
            for actor in launched:
                ray.kill(actor)
            raise
        if self.sync == "nccl" and not fixed:
            self._init_nccl()

    # ------------------------------------------------------------------ the RolloutSource interface
    def publish(self, version: int, weights) -> float:
        t0 = time.perf_counter()
        if self.sync == "checkpoint":
            path = write_weight_version(self.weights_dir, version, weights, self.cfg.chunk_mb << 20)
            self.latest = (version, str(path))
        else:  # one chunk in this process at a time: a 7B model is never copied whole here
            refs, self.nccl_specs = [], []
            for chunk in weight_chunks(weights, self.cfg.chunk_mb << 20):
                refs.append(ray.put(chunk))
                if self.sync == "nccl":
                    self.nccl_specs.append(chunk_spec(chunk))
            self.latest = (version, refs)
        if self.sync == "nccl":
            self.sender_calls.append(_Call(f"NCCL broadcast of version {version}",
                                           self.sender.send.remote(self.latest[1]), self.cfg.sync_timeout_s))
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
        self._drain_sender()
        if self.cfg.backend == "vllm" and self.cfg.vllm.colocate:  # the trainer's update needs the GPU: wait
            for j, actor in enumerate(self.actors):
                self.queues[j].append(_Call("sleep", actor.sleep.remote(), self.cfg.sync_timeout_s))
                self._drain(j)
        self._prune_versions()
        loads, self.load_seconds = self.load_seconds, []
        return StepRollouts(rollouts, time.perf_counter() - t0,
                            sync_s=max(loads) if loads else 0.0, restarts=self.restarts,
                            extra={"time/gen_worker_s": max(worker_s) if worker_s else 0.0})

    def score(self, worker: int, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Worker `worker`'s log-probs of fixed sequences (after the weights sent so far)."""
        while True:  # a replaced worker is asked again, once it has loaded the latest version
            self._drain(worker)
            scores = self._get(worker, _Call("score", self.actors[worker].score.remote(prompt_ids, completion_ids),
                                             self.cfg.generate_timeout_s))
            if scores is not REPLACED:
                return scores

    def close(self) -> None:
        for actor in [*self.actors, self.sender]:
            if actor is not None:
                ray.kill(actor)
        self.latest = None
        if self.sync == "checkpoint" and self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)

    # ------------------------------------------------------------------ calls, deadlines, replacement
    def _actor_options(self) -> dict:
        """Resources and environment of a worker: outside the trainer's placement group (Ray Train
        captures its workers' children there, where its bundles leave no room)."""
        cfg = self.cfg
        options = {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.use_gpu else 0, "max_restarts": 0,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(None)}
        if cfg.backend == "vllm":
            options.update(num_gpus=cfg.vllm.tensor_parallel_size, runtime_env=vllm_runtime_env(cfg))
            if cfg.vllm.colocate:  # on this process's node and GPU, which the trainer holds in Ray's books
                options.update(num_gpus=0, scheduling_strategy=_this_node(),
                               runtime_env=vllm_runtime_env(cfg, **_this_gpu()))
        return options

    def _launch(self):
        return self.actor_cls.options(**self._actor_options()).remote(*self.worker_args)

    def _start(self, j: int) -> None:
        self._await_start(j, self._launch())

    def _await_start(self, j: int, actor) -> None:
        cfg = self.cfg
        try:
            self.pids[j] = ray.get(actor.ping.remote(), timeout=cfg.start_timeout_s)
        except GetTimeoutError:
            ray.kill(actor)
            needs = (f"{cfg.vllm.tensor_parallel_size} GPU(s)" if cfg.backend == "vllm" and not cfg.vllm.colocate
                     else "a GPU" if cfg.use_gpu else "")
            raise RolloutWorkerError(
                f"{self.name} worker {j} did not start within {cfg.start_timeout_s:g}s (it needs "
                f"{cfg.cpus_per_worker:g} CPUs{' and ' + needs if needs else ''}: are they free "
                f"beside the trainer's workers?)") from None
        except RayActorError as e:
            raise RolloutWorkerError(f"{self.name} worker {j} failed to start: {e}") from e
        self.actors[j] = actor

    def _init_nccl(self) -> None:
        """vLLM's NCCL weight-transfer group: the sender (rank 0, on this process's GPU) and every
        worker of every engine (ranks 1..)."""
        self.sender = ray.remote(NCCLWeightSender).options(
            num_cpus=0, num_gpus=0, max_restarts=0, scheduling_strategy=_this_node(),
            runtime_env=vllm_runtime_env(self.cfg, **_this_gpu()),
        ).remote()
        timeout = self.cfg.start_timeout_s
        address, port = ray.get(self.sender.endpoint.remote(), timeout=timeout)
        sizes = ray.get([a.world_size.remote() for a in self.actors], timeout=timeout)
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:j]) for j in range(len(sizes))]
        ray.get([self.sender.init.remote(world),
                 *(a.init_nccl.remote(address, port, o, world) for a, o in zip(self.actors, offsets, strict=True))],
                timeout=timeout)

    def _drain_sender(self) -> None:
        while self.sender_calls:
            call = self.sender_calls[0]
            try:
                ray.get(call.ref, timeout=call.timeout_s)
            except (GetTimeoutError, RayActorError, ray.exceptions.RayTaskError) as e:
                raise RolloutWorkerError(f"{self.name} weight sender failed {call.what}: {e!r}") from e
            self.sender_calls.popleft()

    def _fall_back_to_checkpoint(self, reason: str) -> None:
        """A broken NCCL group cannot take a new member: the rest of the stage syncs by directory."""
        log.warning("%s: %s; weight sync falls back from nccl to checkpoint for the rest of the stage",
                    self.name, reason)
        self.sync = "checkpoint"
        if self.sender is not None:
            ray.kill(self.sender)
            self.sender, self.sender_calls = None, deque()
        if self.latest is not None and not isinstance(self.latest[1], str):
            version, refs = self.latest
            weights = ((k, t) for ref in refs for k, t in ray.get(ref).items())
            self.latest = (version, str(write_weight_version(self.weights_dir, version, weights,
                                                             self.cfg.chunk_mb << 20)))

    def _prune_versions(self) -> None:
        """Delete version directories that every worker has loaded past."""
        if self.sync != "checkpoint" or self.weights_dir is None or not self.weights_dir.is_dir():
            return
        oldest_needed = min(self.loaded)
        for d in self.weights_dir.glob("v*"):
            if d.name[1:].isdigit() and int(d.name[1:]) < oldest_needed and d != Path(self.latest[1]):
                shutil.rmtree(d, ignore_errors=True)

    def _send_load(self, j: int) -> None:
        version, payload = self.latest
        actor = self.actors[j]
        if self.sync == "checkpoint":
            ref = actor.load_checkpoint.remote(version, payload)
        elif self.sync == "nccl":
            ref = actor.load_nccl.remote(version, self.nccl_specs)
        else:
            ref = actor.load_weights.remote(version, payload)
        self.queues[j].append(_Call(f"load_weights(version {version})", ref, self.cfg.sync_timeout_s, load=version))

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
            if result is REPLACED:  # its queue was sent again to the replacement
                continue
            self.queues[j].popleft()
            if call.load is not None:
                self.load_seconds.append(result)
                self.loaded[j] = call.load
            if call.generation is None:
                continue
            step, shard, _, _, _, idx = call.generation
            self.results[(step, shard)] = (*result, idx)
            if (step, shard) == until:
                return

    def _get(self, j: int, call: _Call):
        """The call's result, or `REPLACED` after replacing worker j (which failed it)."""
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
        return REPLACED

    def _replace(self, j: int, reason: str) -> None:
        if self.restarts >= self.cfg.max_restarts:
            raise RolloutWorkerError(f"{self.name} worker {j} (pid {self.pids[j]}) {reason}; "
                                     f"{self.restarts} of max_restarts={self.cfg.max_restarts} replacements used")
        self.restarts += 1
        log.warning("%s worker %d (pid %s) %s: replacing it (%d/%d)", self.name, j, self.pids[j], reason,
                    self.restarts, self.cfg.max_restarts)
        ray.kill(self.actors[j], no_restart=True)
        if self.sync == "nccl":
            self._fall_back_to_checkpoint(f"worker {j} was replaced")
        unfinished = [c.generation for c in self.queues[j] if c.generation is not None]
        self.queues[j].clear()
        self._start(j)
        if self.latest is not None:
            self._send_load(j)
        for generation in unfinished:  # same prompts and seeds, on the newest weights
            self._send_generation(j, generation)


@contextlib.contextmanager
def fixed_engines(cfg: RolloutConfig, model_dirs: list[str], name: str):
    """{model dir: actor handles} of `cfg.num_workers` rollout workers (backend workers) or vLLM
    engines (vllm) per model, each sampling that model as it is (version 0); all stopped after."""
    pools: dict[str, RolloutPool] = {}
    try:
        for model_dir in sorted(set(model_dirs)):
            pools[model_dir] = RolloutPool(cfg, model_dir, logits_chunk_tokens=1024, name=f"{name} {cfg.backend}",
                                           fixed=True)
        yield {model_dir: list(pool.actors) for model_dir, pool in pools.items()}
    finally:
        for pool in pools.values():
            pool.close()


@contextlib.contextmanager
def sampling_engines(rollout: RolloutConfig, engine: str, model_dirs: list[str], name: str):
    """The engines of a Ray Data stage's `engine` setting: None for torch and openai (the Ray Data
    actors sample themselves), else `fixed_engines` of that backend with the `rollout` section's
    resources and vLLM settings (the vLLM environment checked first)."""
    if engine not in ("workers", "vllm"):
        yield None
        return
    cfg = RolloutConfig.model_validate({**rollout.model_dump(), "backend": engine, "max_staleness": 0,
                                        "sync_every": 1, "weight_sync": None})
    if engine == "vllm":
        from tasks.environments import check_vllm_environment

        check_vllm_environment(cfg.vllm.python)
    with fixed_engines(cfg, model_dirs, name) as engines:
        yield engines


def _this_gpu() -> dict[str, str]:
    """The GPU(s) Ray gave this process, for an actor that shares them (Ray's books show them taken)."""
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}


def _this_node() -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def vllm_runtime_env(cfg: RolloutConfig, **env_vars: str) -> dict:
    """The Ray runtime environment of a vLLM actor: the vLLM environment's Python, this project
    on its path (for `r1core.vllm_engine`), and nothing of Prefect's environment."""
    root = Path(__file__).resolve().parent.parent
    python = Path(cfg.vllm.python)
    return {"py_executable": str(python if python.is_absolute() else root / python),
            "env_vars": {"PYTHONPATH": str(root), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **env_vars}}
