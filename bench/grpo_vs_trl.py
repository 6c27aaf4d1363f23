"""Our GRPO step vs TRL's GRPOTrainer, side by side in one process (CPU, no vLLM).

Same tiny model, group size, prompts per step, completion length, learning rate, clip range, KL
coefficient and rewards; the same number of steps, and the same prompts in the same order: one
schedule of each step's prompts is drawn first, our trainer takes its steps' prompts from it
(`sample_rows`) and TRL's dataset is that schedule, unshuffled. Each step is timed whole, from
its start to the next (sampling, rewards, update); the first is left out as warm-up. Prints
seconds per step for each, their ratio, and the reward reached. TRL is a benchmark-only extra
(`make bench` installs it, with constraints.txt).

    python bench/grpo_vs_trl.py [--model DIR] [--steps N] [--threads T]

--model defaults to the newest pretrained base of `make demo` (.r1/runs/*/pretrain_base/model).
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import random
import statistics
import tempfile
import time

import torch

from r1core.config import load_config
from r1core.modeling import load_pretrained
from r1core.problems import generate_split
from r1core.rewards import REWARDS
from r1core.training import TrainContext, grpo_train


def default_model() -> str:
    found = sorted(glob.glob(".r1/runs/*/pretrain_base/model/config.json"), key=os.path.getmtime)
    if not found:
        raise SystemExit("no pretrained base found: run `make demo` first or pass --model DIR")
    return os.path.dirname(found[-1])


def prompt_schedule(cfg, rows: list[dict], seed: int = 0) -> list[list[int]]:
    """Each step's prompts (row indices), drawn once for both trainers."""
    rng = random.Random(seed)
    return [rng.sample(range(len(rows)), cfg.prompts_per_step) for _ in range(cfg.steps)]


def run_ours(cfg, model_dir: str, rows: list[dict], schedule: list[list[int]]) -> tuple[list[float], list[float]]:
    policy, tokenizer = load_pretrained(model_dir)
    reference = copy.deepcopy(policy)
    times, rewards, last = [], [], [time.perf_counter()]

    def log(metrics, step):
        now = time.perf_counter()
        times.append(now - last[0])
        rewards.append(metrics["reward"])
        last[0] = now

    with tempfile.TemporaryDirectory() as ckdir:
        ctx = TrainContext(ckdir, log_fn=log)
        cfg = cfg.model_copy(update={"checkpoint_every": 10**6})  # time the steps, not checkpoint writes
        last[0] = time.perf_counter()
        # the trainer asks for a step's prompts more than once (when it submits the step's sampling
        # and when it trains on it), each step with its own seeded rng: the n-th new rng is step n
        step_of: dict = {}

        def sample_rows(rng, n):
            return schedule[step_of.setdefault(rng.getstate(), len(step_of))]

        grpo_train(cfg, policy, reference, tokenizer, rows, ctx, seed=0, batch_size=256, sample_rows=sample_rows)
    return times, rewards


def run_trl(cfg, model_dir: str, rows: list[dict], schedule: list[list[int]]) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy, tokenizer = load_pretrained(model_dir)
    weights = list(cfg.rewards.values())
    funcs = []
    for name in cfg.rewards:
        def fn(completions, _name=name, **columns):
            return REWARDS[_name](completions, **columns)
        fn.__name__ = name
        funcs.append(fn)

    times, last = [], [0.0]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - last[0])

    data = Dataset.from_list([{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"], "task": rows[i]["task"],
                               "numbers": rows[i]["numbers"]} for step in schedule for i in step])
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
            per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
            num_generations=cfg.group_size, max_completion_length=cfg.sampling.max_new_tokens,
            temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, beta=cfg.beta,
            epsilon=cfg.clip_low, epsilon_high=cfg.clip_high, loss_type="dapo", num_iterations=cfg.inner_epochs,
            reward_weights=weights, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=True, seed=0, max_grad_norm=1.0, adam_beta2=0.99, weight_decay=0.0,
            shuffle_dataset=False,  # the schedule's order
        )
        trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return times, rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="pretrained base (HF dir)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model()
    cfg = load_config(overrides=[f"r1_zero.steps={args.steps}"])
    train, _ = generate_split(cfg.data)
    schedule = prompt_schedule(cfg.r1_zero, train)
    results = {}
    for name, fn in (("r1-factory", run_ours), ("trl", run_trl)):
        t0 = time.perf_counter()
        times, rewards = fn(cfg.r1_zero, model_dir, train, schedule)
        results[name] = (times, rewards, time.perf_counter() - t0)

    g = cfg.r1_zero
    print(f"\nGRPO, {args.steps} steps x {g.prompts_per_step} prompts x {g.group_size} samples, "
          f"{g.sampling.max_new_tokens} new tokens, {args.threads} threads, model {model_dir}")
    print(f"{'impl':<12} {'s/step (median)':>16} {'s/step (mean)':>14} {'reward first':>13} {'reward last3':>13} {'wall s':>8}")
    for name, (times, rewards, wall) in results.items():
        steady = times[1:] or times  # first step includes warm-up
        print(f"{name:<12} {statistics.median(steady):>16.2f} {statistics.mean(steady):>14.2f} "
              f"{rewards[0]:>13.3f} {statistics.mean(rewards[-3:]):>13.3f} {wall:>8.1f}")
    ours, trl = (statistics.median(results[n][0][1:] or results[n][0]) for n in ("r1-factory", "trl"))
    print(f"ratio trl / r1-factory (s/step): {trl / ours:.2f}")


if __name__ == "__main__":
    main()
