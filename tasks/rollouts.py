"""Ray Data pipelines that sample completions from checkpoints and post-process them at scale.

    requests ──► map_batches(Sampler actors: each loads its models once) ──► map(postprocess) ──► rows

A request is a row with `model_dir` and `generation_prompt`; a request whose `model_dir` is
empty already carries its `completion` (a user's own example) and only goes through the
post-processing. Rows travel as JSON so that nested task fields survive Arrow unchanged.

Where the samples come from: the checkpoint in each actor (torch), a server (openai), or, with
`engines` ({model dir: actor handles} from `tasks.rollout_workers.fixed_engines`), the rollout
workers or vLLM engines of the `rollout` section: the Ray Data actors are then clients that hand
each batch to one engine (chosen from the batch's prompts, so a re-run asks the same one) under
a deadline.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import ray

from r1core.config import ComputeConfig, RuntimeConfig, SamplingConfig
from r1core.rejection_sampling import sample_id
from tasks.ray_jobs import ensure_ray


class Sampler:
    """A Ray Data actor: n samples for every request of a batch from the request's model, in
    this process (torch), or from the OpenAI-compatible `server` {base_url, model} serving it."""

    def __init__(self, sampling: dict, n: int, batch_size: int, threads: int, seed: int,
                 server: dict | None = None, engines: dict[str, list] | None = None, timeout_s: float = 600.0):
        import torch

        torch.set_num_threads(threads)
        self.sampling = SamplingConfig.model_validate(sampling)
        self.n, self.batch_size, self.seed, self.server = n, batch_size, seed, server
        self.remote, self.timeout_s = engines, timeout_s
        self.engines: dict = {}

    def _engine(self, model_dir: str):
        if model_dir not in self.engines:
            from r1core.engine import OpenAIEngine, TorchEngine
            from r1core.modeling import load_pretrained

            if self.remote is not None:
                self.engines[model_dir] = ActorEngine(self.remote[model_dir], self.timeout_s)
            elif self.server:
                self.engines[model_dir] = OpenAIEngine(self.server["base_url"], self.server["model"])
            else:
                self.engines[model_dir] = TorchEngine(*load_pretrained(model_dir), self.batch_size)
        return self.engines[model_dir]

    def __call__(self, batch: dict) -> dict:
        from r1core.engine import Sampling

        out: list[str] = []
        requests = [json.loads(r) for r in batch["row"]]
        for model_dir in sorted({r["model_dir"] for r in requests}):
            group = [r for r in requests if r["model_dir"] == model_dir]
            if not model_dir:  # carries its own completion
                out += [json.dumps(r) for r in group]
                continue
            # the seed is a function of the requests, not of how Ray split them over actors
            seed = self.seed + zlib.crc32("".join(r["generation_prompt"] for r in group).encode())
            rollouts = self._engine(model_dir).generate([r["generation_prompt"] for r in group], self.n,
                                                        Sampling.from_config(self.sampling, seed=seed))
            out += [json.dumps({**group[ro.prompt_index], "completion": ro.text, "sample": j % self.n,
                                "finish_reason": ro.finish_reason}) for j, ro in enumerate(rollouts)]
        return {"row": out}


class ActorEngine:
    """A `r1core.engine.RolloutEngine` whose samples come from rollout-worker or vLLM actors."""

    def __init__(self, actors: list, timeout_s: float):
        self.actors, self.timeout_s = actors, timeout_s

    def generate(self, prompts, n, sampling):
        j = zlib.crc32("".join(prompts).encode()) % len(self.actors)
        try:
            rollouts, _ = ray.get(self.actors[j].generate.remote(prompts, n, sampling), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"sampling engine {j} did not answer generate({len(prompts)} prompts x {n}) within "
                               f"{self.timeout_s:g}s (rollout.generate_timeout_s)") from None
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"sampling engine {j} died during generate({len(prompts)} prompts x {n}): {e}") from e
        return rollouts


class ShardSampler(Sampler):
    """A Ray Data actor for resumable generation: each input row is one shard of prompts; its
    samples (with their `sample_id`) are written to `<out_dir>/shard-NNNNN.parquet` atomically
    (the same shard always gets the same seed, so a re-run writes the same rows). Returns one
    count row per shard."""

    def __init__(self, out_dir: str, schema, **sampler_kwargs):
        super().__init__(**sampler_kwargs)
        self.out_dir, self.schema = Path(out_dir), schema

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        counts = []
        for shard, rows in zip(batch["shard"], batch["rows"], strict=True):
            samples = [json.loads(r) for r in super().__call__({"row": rows.tolist()})["row"]]
            table = pa.Table.from_pylist([{**s, "sample_id": sample_id(s)} for s in samples], schema=self.schema)
            final = shard_path(self.out_dir, int(shard))
            tmp = final.with_suffix(".tmp")
            pq.write_table(table, tmp)
            tmp.replace(final)
            counts.append(len(samples))
        return {"shard": batch["shard"], "samples": counts}


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard-{shard:05d}.parquet"


def _actor_resources(compute: ComputeConfig, engines: dict | None) -> dict:
    """Ray Data actors that hand generation to engines only wait on them: a sliver of a CPU, no GPU."""
    if engines is not None:
        return {"num_cpus": CLIENT_CPUS, "num_gpus": 0}
    return {"num_cpus": compute.cpus_per_worker, "num_gpus": 1 if compute.use_gpu else 0}


CLIENT_CPUS = 0.1


def sample_and_process(requests: list[dict], postprocess: Callable[[dict], dict], sampling: SamplingConfig,
                       n: int, compute: ComputeConfig, runtime: RuntimeConfig, batch_size: int,
                       requests_per_batch: int = 64, engines: dict | None = None,
                       timeout_s: float = 600.0) -> list[dict]:
    """Run the pipeline on Ray Data; returns the post-processed rows (order not guaranteed)."""
    ensure_ray(runtime)
    ray.data.DataContext.get_current().enable_progress_bars = False  # stage logs say what it did
    ds = ray.data.from_items([{"row": json.dumps(r)} for r in requests])
    ds = ds.map_batches(
        Sampler,
        fn_constructor_kwargs={"sampling": sampling.model_dump(), "n": n, "batch_size": batch_size,
                               "threads": compute.cpus_per_worker, "seed": runtime.seed, "engines": engines,
                               "timeout_s": timeout_s},
        batch_size=requests_per_batch,
        # a fixed pool with explicit CPUs: on 2 CPUs, `concurrency=` starves the read tasks
        compute=ray.data.ActorPoolStrategy(size=compute.num_workers),
        **_actor_resources(compute, engines),
    )
    ds = ds.map(lambda rec: {"row": json.dumps(postprocess(json.loads(rec["row"])))})
    return [json.loads(rec["row"]) for rec in ds.take_all()]


def generate_shards(shards: dict[int, list[dict]], out_dir: str, compute: ComputeConfig, **sampler_kwargs):
    """Samples of each shard of requests, written by a pool of `ShardSampler` actors to
    `out_dir`; yields `{shard, samples}` as each shard is written (Ray must be up)."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"shard": i, "rows": [json.dumps(r) for r in rows]} for i, rows in shards.items()]
    ds = ray.data.from_items(items).map_batches(
        ShardSampler,
        fn_constructor_kwargs={"out_dir": out_dir, "threads": compute.cpus_per_worker, **sampler_kwargs},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=compute.num_workers),
        **_actor_resources(compute, sampler_kwargs.get("engines")),
    )
    yield from ds.iter_rows()
