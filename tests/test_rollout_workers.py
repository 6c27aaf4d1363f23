"""Rollout workers (`rollout.backend: workers`), with real Ray actors on the local Ray: weight sync,
the staleness bound, equivalence with in-process sampling, and workers that hang or are killed."""
from __future__ import annotations

import copy
import os
import signal
import sys
import time

import pytest
import ray
import torch
from conftest import write_model_dir

from r1core.batching import collate_rollouts
from r1core.config import CodeRewardConfig, GRPOConfig, ModelConfig, RolloutConfig, RuntimeConfig
from r1core.logprobs import TokenScorer
from r1core.modeling import build_model
from r1core.training import TrainContext, grpo_train
from tasks.ray_jobs import ensure_ray
from tasks.rollout_workers import RolloutPool, RolloutWorker, RolloutWorkerError

MICRO = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
# the workers' test subclasses below travel by value: Ray's workers cannot import this test module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
GRPO = GRPOConfig(steps=4, prompts_per_step=4, group_size=2, beta=0.02, sampling={"max_new_tokens": 6},
                  checkpoint_every=100)


@pytest.fixture(scope="module")
def ray_up():
    ensure_ray(RuntimeConfig(num_cpus=2))


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A model directory the workers start from (other weights than the trainer's: syncs must overwrite them)."""
    return write_model_dir(tmp_path / "init", MICRO, tokenizer, seed=99)


def _rollout(**kw) -> RolloutConfig:
    return RolloutConfig(backend="workers", cpus_per_worker=0.5, **kw)


def _train(tokenizer, rows, tmp_path, rollout: RolloutConfig, source=None, policy_seed: int = 3):
    torch.manual_seed(0)
    policy = build_model(MICRO, tokenizer, seed=policy_seed)
    ctx = TrainContext(tmp_path / "ckpt")
    grpo_train(GRPO, policy, copy.deepcopy(policy), tokenizer, rows[0], ctx, seed=0, batch_size=256,
               rollout=rollout, source=source)
    return ctx.history


class RecordingPool(RolloutPool):
    """Remembers the weight versions of every step's rollouts, and the versions published."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.versions: dict[int, set[int]] = {}
        self.published: list[int] = []

    def publish(self, version, weights):
        self.published.append(version)
        return super().publish(version, weights)

    def collect(self, step):
        got = super().collect(step)
        self.versions[step] = {r.version for r in got.rollouts}
        return got


@pytest.mark.parametrize("sync", ["object_store", "checkpoint"])
def test_synced_worker_scores_like_the_trainer(ray_up, tokenizer, model_dir, tmp_path, sync):
    policy = build_model(MICRO, tokenizer, seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (int(n),), generator=g).tolist() for n in (3, 7, 5, 11)]
    completions = [torch.randint(5, 300, (int(n),), generator=g).tolist() for n in (4, 1, 9, 6)]
    with torch.no_grad():
        logp, _ = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="padded").scored(
            TokenScorer(policy, 8))
    trainer = [row[: len(c)] for row, c in zip(logp.tolist(), completions, strict=True)]
    weights_dir = tmp_path / "weights"
    pool = RolloutPool(_rollout(num_workers=2, chunk_mb=1, weight_sync=sync), model_dir, logits_chunk_tokens=8,
                       weights_dir=str(weights_dir))
    try:
        before = pool.score(0, prompts, completions)
        assert max(abs(a - b) for r, s in zip(before, trainer, strict=True) for a, b in zip(r, s, strict=True)) > 1e-3
        pool.publish(1, policy.state_dict().items())
        for worker in (0, 1):
            after = pool.score(worker, prompts, completions)
            diff = max(abs(a - b) for r, s in zip(after, trainer, strict=True) for a, b in zip(r, s, strict=True))
            assert diff <= 1e-6, (worker, diff)
        if sync == "checkpoint":  # a version directory lives until every worker has loaded a newer one
            pool.publish(2, policy.state_dict().items())
            assert sorted(d.name for d in weights_dir.iterdir()) == ["v000001", "v000002"]
            pool.score(0, prompts, completions)
            pool.score(1, prompts, completions)
            pool._prune_versions()
            assert sorted(d.name for d in weights_dir.iterdir()) == ["v000002"]
    finally:
        pool.close()
    assert not weights_dir.exists()


@pytest.mark.parametrize("k", [0, 1])
def test_rollouts_are_never_staler_than_the_bound(ray_up, tokenizer, rows, tmp_path, model_dir, k):
    rollout = _rollout(max_staleness=k)
    pool = RecordingPool(rollout, model_dir, logits_chunk_tokens=1024)
    try:
        history = _train(tokenizer, rows, tmp_path, rollout, pool)
    finally:
        pool.close()
    assert sorted(pool.versions) == [0, 1, 2, 3]
    for step, versions in pool.versions.items():
        assert versions <= set(range(step - k, step + 1)), (step, versions)
    if k == 1:  # generation ran ahead: step t trained on version t-1 (overlap happened)
        assert all(pool.versions[t] == {t - 1} for t in (1, 2, 3)), pool.versions
    metrics = dict(history)[4]
    assert metrics["rollout/max_staleness"] <= k and metrics["rollout/mismatch_kl"] >= 0
    assert 0 < metrics["rollout/is_weight_mean"] <= rollout.tis_cap


def test_a_resumed_stage_syncs_its_checkpoints_version_before_sampling(ray_up, tokenizer, rows, tmp_path, model_dir):
    """Killed after step 2 and run again (k = 1, weights by version directory): the new workers
    first get version 2, the checkpoint's, and no rollout is older than the bound allows."""
    rollout = _rollout(max_staleness=1, weight_sync="checkpoint")
    runs = []
    for steps in (2, 4):
        pool = RecordingPool(rollout, model_dir, logits_chunk_tokens=1024, weights_dir=str(tmp_path / f"w{steps}"))
        try:
            policy = build_model(MICRO, tokenizer, seed=3)
            ctx = TrainContext(tmp_path / "ckpt")  # the same folder: the second run resumes from step 2
            grpo_train(GRPO.model_copy(update={"steps": steps, "checkpoint_every": 1}), policy,
                       copy.deepcopy(policy), tokenizer, rows[0], ctx, seed=0, batch_size=256, rollout=rollout,
                       source=pool)
        finally:
            pool.close()
        runs.append(pool)
    assert runs[0].published == [0, 1] and runs[0].versions == {0: {0}, 1: {0}}
    assert runs[1].published[0] == 2 and runs[1].versions == {2: {2}, 3: {2}}, (runs[1].published, runs[1].versions)


def test_workers_without_staleness_sample_what_in_process_samples(ray_up, tokenizer, rows, tmp_path, model_dir):
    torch.set_num_threads(1)  # the worker's thread count: the same float reductions
    try:
        in_process = _train(tokenizer, rows, tmp_path / "a", RolloutConfig())
        pool = RolloutPool(_rollout(), model_dir, logits_chunk_tokens=1024)
        try:
            workers = _train(tokenizer, rows, tmp_path / "b", _rollout(), pool)
        finally:
            pool.close()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert [m["reward"] for _, m in workers] == [m["reward"] for _, m in in_process]
    assert [m["response_length"] for _, m in workers] == [m["response_length"] for _, m in in_process]
    assert all(m["rollout/logp_abs_diff"] < 1e-5 for _, m in workers), [m["rollout/logp_abs_diff"] for _, m in workers]


def _marked_once(marker: str) -> bool:
    """True the first time (any process) it is asked about `marker`."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("restarts", [1, 0])
def test_a_worker_that_hangs_in_a_sync_is_replaced_or_named(ray_up, tokenizer, rows, tmp_path, model_dir, restarts):
    marker = str(tmp_path / "hung")

    class HangsInSecondSync(RolloutWorker):
        loads = 0

        def load_weights(self, version, chunk_refs):
            self.loads += 1
            if self.loads == 2 and _marked_once(marker):
                time.sleep(10_000)
            return super().load_weights(version, chunk_refs)

    rollout = _rollout(sync_timeout_s=3, max_restarts=restarts)
    pool = RolloutPool(rollout, model_dir, logits_chunk_tokens=1024, worker_cls=HangsInSecondSync)
    t0 = time.perf_counter()
    try:
        if restarts:
            history = _train(tokenizer, rows, tmp_path, rollout, pool)
            assert [s for s, _ in history] == [1, 2, 3, 4] and history[-1][1]["rollout/restarts"] == 1
        else:
            with pytest.raises(RolloutWorkerError, match=r"worker 0 \(pid \d+\) did not answer "
                                                         r"load_weights\(version 1\) within 3s"):
                _train(tokenizer, rows, tmp_path, rollout, pool)
            assert time.perf_counter() - t0 < 60
    finally:
        pool.close()


def test_a_sigkilled_worker_is_replaced_and_the_stage_completes(ray_up, tokenizer, rows, tmp_path, model_dir):
    marker = str(tmp_path / "killed")

    class DiesInThirdGeneration(RolloutWorker):
        calls = 0

        def generate(self, prompts, n, sampling):
            self.calls += 1
            if self.calls == 3 and _marked_once(marker):
                os.kill(os.getpid(), signal.SIGKILL)
            return super().generate(prompts, n, sampling)

    rollout = _rollout(max_staleness=1)
    pool = RecordingPool(rollout, model_dir, logits_chunk_tokens=1024, worker_cls=DiesInThirdGeneration)
    try:
        history = _train(tokenizer, rows, tmp_path, rollout, pool)
    finally:
        pool.close()
    assert os.path.exists(marker) and pool.restarts == 1
    assert [s for s, _ in history] == [1, 2, 3, 4]
    for step, versions in pool.versions.items():
        assert versions <= {step - 1, step}, (step, versions)


def test_a_worker_that_cannot_be_placed_fails_with_what_it_needs(ray_up, model_dir):
    with pytest.raises(RolloutWorkerError, match="did not start within 2s .*64 CPUs"):
        RolloutPool(_rollout(start_timeout_s=2).model_copy(update={"cpus_per_worker": 64.0}), model_dir,
                    logits_chunk_tokens=8)


@pytest.mark.slow
def test_grpo_with_rollout_workers_through_its_ray_train_loop(tokenizer, rows, tmp_path):
    """The production path: a Ray Train worker (`RayContext`, the stage's worker loop) driving a
    rollout worker it started, with k = 1 (on 2 CPUs: one for the trainer, one for the worker)."""
    import json

    from mlflow import MlflowClient

    from r1core.config import TrainComputeConfig
    from tasks import ray_jobs
    from tasks.jobs import GRPOJob

    base = write_model_dir(tmp_path / "base", MICRO, tokenizer, seed=0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[0][:40]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("rollouts", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    compute = TrainComputeConfig(num_workers=1, cpus_per_worker=1)
    rollout = RolloutConfig(backend="workers", max_staleness=1, cpus_per_worker=0.5, start_timeout_s=60)
    job = GRPOJob(stage="r1_zero", tracking_uri=uri, run_id=run_id, tracking_outage_s=60, checkpoint_dir=str(tmp_path / "ckpt"),
                  output_dir=str(tmp_path / "model"), compute=compute, seed=0,
                  recipe=GRPO.model_copy(update={"steps": 3, "compute": compute}), init_model=str(base),
                  train_file=str(tmp_path / "train.jsonl"), rollout=rollout, code=CodeRewardConfig())
    ray_jobs.fit([(ray_jobs.grpo_loop, job)], RuntimeConfig(workdir=str(tmp_path), num_cpus=2), run_name="grpo-workers")
    assert [m.step for m in client.get_metric_history(run_id, "reward")] == [1, 2, 3]
    staleness = [m.value for m in client.get_metric_history(run_id, "rollout/max_staleness")]
    assert staleness == [0.0, 1.0, 1.0], staleness
    assert all(m.value < 1e-4 for m in client.get_metric_history(run_id, "rollout/logp_abs_diff")[:1])
    assert (tmp_path / "model" / "config.json").is_file()


def test_ray_data_sampling_on_rollout_workers_gives_the_in_actor_samples(ray_up, tokenizer, rows, tmp_path, model_dir):
    """`rejection_sampling.engine: workers` and `cold_start.engine: workers`: the Ray Data actors
    hand generation to a fixed pool of rollout workers (one per model) and get exactly the samples
    the torch engine in the Ray Data actors draws."""
    import pyarrow.parquet as pq

    from r1core.config import ComputeConfig, SamplingConfig
    from tasks.rejection_sampling import SAMPLE_SCHEMA
    from tasks.rollout_workers import sampling_engines
    from tasks.rollouts import generate_shards, sample_and_process, shard_path

    other = write_model_dir(tmp_path / "other", MICRO, tokenizer, seed=7)
    requests = [{**r, "model_dir": model_dir, "generation_prompt": r["prompt"]} for r in rows[1][:6]]
    shards = {0: requests[:3], 1: requests[3:]}
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    kwargs = dict(schema=SAMPLE_SCHEMA, sampling=sampling.model_dump(), n=2, batch_size=8, seed=0)
    compute = ComputeConfig(num_workers=1, cpus_per_worker=1)
    # a quarter CPU each: Ray Data may still be releasing the actor of the run before
    rollout = _rollout(num_workers=2).model_copy(update={"cpus_per_worker": 0.25})

    def samples(out) -> list[tuple]:
        return sorted((s["sample_id"], s["completion"], s["finish_reason"])
                      for i in shards for s in pq.read_table(shard_path(out, i)).to_pylist())

    (tmp_path / "torch").mkdir()
    (tmp_path / "workers").mkdir()
    list(generate_shards(shards, str(tmp_path / "torch"), compute, **kwargs))
    with sampling_engines(rollout, "workers", [model_dir], "test") as engines:
        assert list(engines) == [model_dir] and len(engines[model_dir]) == 2
        list(generate_shards(shards, str(tmp_path / "workers"), compute, engines=engines, timeout_s=60, **kwargs))
    assert samples(tmp_path / "torch") == samples(tmp_path / "workers") and len(samples(tmp_path / "torch")) == 12

    two_models = requests[:2] + [{**r, "model_dir": str(other)} for r in requests[2:4]]  # cold start's routes
    one_each = rollout.model_copy(update={"num_workers": 1})
    with sampling_engines(one_each, "workers", [r["model_dir"] for r in two_models], "test") as engines:
        assert sorted(engines) == sorted({model_dir, str(other)})
        got = sample_and_process(two_models, lambda row: {**row, "words": len(row["completion"].split())}, sampling,
                                 2, compute, RuntimeConfig(num_cpus=2), 8, engines=engines, timeout_s=60)
    assert sorted((r["id"], r["model_dir"]) for r in got) == sorted((r["id"], r["model_dir"]) for r in two_models
                                                                    for _ in range(2))
    assert all("words" in r for r in got)
