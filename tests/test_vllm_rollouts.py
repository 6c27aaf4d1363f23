"""`rollout.backend: vllm` end to end: vLLM engines as Ray actors in the vLLM environment, weight
sync by version directory and by vLLM's NCCL transfer, log-probs against the trainer's, the
staleness bound, and colocated engines that sleep through the update.

Needs a CUDA GPU and the vLLM environment (`make vllm-env`); skipped, with the reason, without
them. Run on a GPU host with: `make vllm-env && .venv/bin/pytest tests/test_vllm_rollouts.py`."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import write_model_dir

from r1core.batching import collate_rollouts
from r1core.config import GRPOConfig, ModelConfig, RolloutConfig, RuntimeConfig
from r1core.engine import Sampling
from r1core.logprobs import TokenScorer
from r1core.modeling import build_model
from r1core.training import TrainContext, grpo_train
from tasks.environments import EnvironmentMismatch, check_vllm_environment


def _vllm_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: vLLM engines do not run on this machine's CPU build"
    try:
        check_vllm_environment(RolloutConfig().vllm.python)
    except EnvironmentMismatch as e:
        return f"needs the vLLM environment: {e}"
    return None


NOT_READY = _vllm_ready()
pytestmark = pytest.mark.skipif(NOT_READY is not None, reason=NOT_READY or "")

SMALL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
GRPO = GRPOConfig(steps=4, prompts_per_step=8, group_size=4, sampling={"max_new_tokens": 16}, checkpoint_every=100)


def _vllm(**kw) -> RolloutConfig:
    return RolloutConfig(backend="vllm", vllm={"dtype": "float32", "enforce_eager": True,
                                               "gpu_memory_utilization": 0.2, **kw.pop("vllm", {})}, **kw)


@pytest.fixture(scope="module")
def ray_up():
    from tasks.ray_jobs import ensure_ray

    ensure_ray(RuntimeConfig(num_cpus=4))


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return write_model_dir(tmp_path / "init", SMALL, tokenizer, seed=99)


@pytest.mark.parametrize("sync", ["checkpoint", "nccl"])
def test_synced_engine_samples_with_the_trainers_log_probs(ray_up, tokenizer, rows, model_dir, tmp_path, sync):
    from tasks.rollout_workers import RolloutPool

    policy = build_model(SMALL, tokenizer, seed=3)
    pool = RolloutPool(_vllm(weight_sync=sync), model_dir, logits_chunk_tokens=1024,
                       weights_dir=str(tmp_path / "weights"))
    try:
        pool.publish(1, policy.state_dict().items())
        prompts = [r["prompt"] for r in rows[0][:8]]
        pool.submit(1, prompts, 4, Sampling(temperature=1.0, max_new_tokens=16, seed=0))
        got = pool.collect(1).rollouts
    finally:
        pool.close()
    assert len(got) == 32 and {r.version for r in got} == {1}
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp, _ = collate_rollouts([ids[r.prompt_index] for r in got], [r.completion_ids for r in got],
                                   tokenizer.pad_token_id, layout="padded").scored(TokenScorer(policy, 1024))
    diffs = [abs(a - b) for r, row in zip(got, logp.tolist(), strict=True)
             for a, b in zip(r.logprobs, row[: len(r.completion_ids)], strict=True)]
    assert sum(diffs) / len(diffs) < 1e-3 and max(diffs) < 2e-2, (sum(diffs) / len(diffs), max(diffs))


@pytest.mark.parametrize("rollout", [{"max_staleness": 1}, {"vllm": {"colocate": True}}], ids=["k1", "colocated"])
def test_grpo_with_vllm_engines_keeps_the_staleness_bound(ray_up, tokenizer, rows, model_dir, tmp_path, rollout):
    from tasks.rollout_workers import RolloutPool

    cfg = _vllm(**copy.deepcopy(rollout))
    policy = build_model(SMALL, tokenizer, seed=3)
    pool = RolloutPool(cfg, model_dir, logits_chunk_tokens=1024, weights_dir=str(tmp_path / "weights"))
    ctx = TrainContext(tmp_path / "ckpt")
    try:
        grpo_train(GRPO, policy, copy.deepcopy(policy), tokenizer, rows[0], ctx, seed=0, batch_size=256,
                   rollout=cfg, source=pool)
    finally:
        pool.close()
    steps = dict(ctx.history)
    assert len(steps) == 4 and all(m["rollout/max_staleness"] <= cfg.max_staleness for m in steps.values())
    assert all(m["rollout/mismatch_kl"] < cfg.mismatch_warn_kl for m in steps.values()), steps
