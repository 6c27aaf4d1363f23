"""GRPO's step time and rollout mismatch for each rollout backend, side by side in one run.

R1-Zero's recipe (the profile's `r1_zero` section) from one base model, the same seeds, for:
`in_process` (sampling in the trainer), `workers` with k = 0 (synchronous, one rollout worker)
and `workers` with k = 1 (generation of step t+1 overlaps the update of step t). Prints seconds
per step, generation wait and sync seconds per step, the rollout-vs-trainer mismatch (mean
|d log p|, KL) and the IS weights, and the mean reward of the first and last halves.

    python bench/rollouts.py [--base DIR] [--config configs/tiny.yaml] [--steps N] [--gpu]

--base: an HF model directory (default: the newest `make demo` run's base/model, else a
randomly initialised model of the profile's architecture with the synthetic tokenizer).
On 2 CPUs the trainer and the rollout worker take one CPU each in every setting. `--gpu` (a
CUDA host with the vLLM environment, `make vllm-env`): the trainer on a GPU, and in_process
(transformers' `generate`) against vLLM engines on a GPU of their own with k = 0 and k = 1; the
generation tokens/s column is vLLM's vs transformers'. (Not run yet: no GPU was lent so far.)
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import statistics
import tempfile
import time

import torch

from r1core.config import RolloutConfig, RuntimeConfig, load_config
from r1core.modeling import build_model, load_pretrained
from r1core.problems import generate_split
from r1core.training import TrainContext, grpo_train
from tasks.ray_jobs import ensure_ray
from tasks.rollout_workers import RolloutPool

GPU_SETTINGS = {
    "in_process (transformers)": RolloutConfig(),
    "vllm, k=0": RolloutConfig(backend="vllm", max_staleness=0),
    "vllm, k=1": RolloutConfig(backend="vllm", max_staleness=1),
    "vllm, k=1, nccl sync": RolloutConfig(backend="vllm", max_staleness=1, weight_sync="nccl"),
}
SETTINGS = {
    "in_process": RolloutConfig(),
    "workers, k=0": RolloutConfig(backend="workers", max_staleness=0),
    "workers, k=1": RolloutConfig(backend="workers", max_staleness=1),
    "workers, k=1, checkpoint sync": RolloutConfig(backend="workers", max_staleness=1, weight_sync="checkpoint"),
}


def base_model(args, cfg, rows) -> str:
    if args.base:
        return args.base
    runs = sorted(glob.glob(".r1/runs/*/base/model"), key=os.path.getmtime)
    if runs:
        return runs[-1]
    from r1core.problems import pretraining_corpus
    from r1core.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(pretraining_corpus(rows, cfg.pretrain.model_copy(update={"corpus_docs": 2000}),
                                                   seed=0), cfg.model.vocab_size)
    d = tempfile.mkdtemp(prefix="bench-rollouts-")
    build_model(cfg.model, tokenizer, seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def run(name: str, rollout: RolloutConfig, recipe, model_dir: str, rows: list[dict], batch_size: int,
        gpu: bool = False) -> dict:
    policy, tokenizer = load_pretrained(model_dir)
    rollout = rollout.model_copy(update={"batch_size": batch_size})
    ctx = TrainContext(tempfile.mkdtemp(prefix="bench-rollouts-ckpt-"))
    if gpu:
        ctx.device = torch.device("cuda")
    pool = (RolloutPool(rollout, model_dir, logits_chunk_tokens=recipe.compute.logits_chunk_tokens,
                        weights_dir=os.path.join(ctx.checkpoint_dir, "rollout-weights"))
            if rollout.backend != "in_process" else None)
    t0 = time.perf_counter()
    try:
        grpo_train(recipe, policy, copy.deepcopy(policy), tokenizer, rows, ctx, seed=0, batch_size=batch_size,
                   rollout=rollout, source=pool)
    finally:
        if pool is not None:
            pool.close()
    wall = time.perf_counter() - t0
    steps = [m for _, m in ctx.history]
    half = len(steps) // 2

    def mean(key: str) -> float:
        return statistics.fmean(m.get(key, 0.0) for m in steps)

    return {"setting": name, "s/step": wall / len(steps), "gen tok/s": mean("gen_tokens_per_s"),
            "gen wait s": mean("time/gen_s"),
            "train s": mean("time/train_s"), "sync s": mean("time/sync_s"),
            "|d logp|": mean("rollout/logp_abs_diff"), "KL": mean("rollout/mismatch_kl"),
            "IS max": max(m.get("rollout/is_weight_max", 1.0) for m in steps),
            "reward 1st half": statistics.fmean(m["reward"] for m in steps[:half]),
            "reward 2nd half": statistics.fmean(m["reward"] for m in steps[half:]),
            "curve": [m["reward"] for m in steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gpu", action="store_true", help="trainer on a GPU; in_process vs vLLM engines")
    args = ap.parse_args()
    cfg = load_config(args.config)
    rows, _ = generate_split(cfg.data)
    recipe = cfg.r1_zero.model_copy(update={"steps": args.steps, "checkpoint_every": 10_000})
    model_dir = base_model(args, cfg, rows)
    if args.gpu:
        from tasks.environments import check_vllm_environment

        check_vllm_environment(RolloutConfig().vllm.python)
    else:
        torch.set_num_threads(1)  # the rollout worker's share: both sides compute alike
    ensure_ray(RuntimeConfig(num_cpus=os.cpu_count() if args.gpu else 2))
    print(f"base {model_dir}; {args.steps} GRPO steps of {recipe.prompts_per_step} prompts x {recipe.group_size}, "
          f"{recipe.sampling.max_new_tokens} new tokens")
    settings = GPU_SETTINGS if args.gpu else SETTINGS
    results = [run(name, r, recipe, model_dir, rows, cfg.rollout.batch_size, args.gpu) for name, r in settings.items()]
    curves = {r["setting"]: r.pop("curve") for r in results}
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in results:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.3g}" for v in r.values()) + " |")
    print("\nmean reward per step:")
    for name, curve in curves.items():
        print(f"  {name:32s} " + " ".join(f"{x:.2f}" for x in curve))


if __name__ == "__main__":
    main()
