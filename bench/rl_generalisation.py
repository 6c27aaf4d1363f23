"""Does GRPO after SFT generalise at this scale? Accuracy on the problems RL trains on vs on
problems it never sees, for three ways of feeding it problems, from one SFT model.

Chain sums only, the accuracy reward only, no KL term, lr 1e-4, groups of 8, flat groups left
out of the update. Accuracy is measured on the first 64 training problems ("seen") and on 128
problems outside the run's train and held-out sets ("unseen"), 8 samples each at temperature
0.6 / top-p 0.95, before and after:

- same 64 problems, 16 per step, 20 steps (each problem about five times);
- fresh problems, 16 per step, 20 steps (each drawn about once from 2,000);
- fresh problems, 64 per step, 10 steps.

    python bench/rl_generalisation.py [--run DIR] [--only SETTING]

--run defaults to the newest `make demo` run (.r1/runs/*, with sft/model and data/train.jsonl).
"""
from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import torch

from r1core.config import GRPOConfig, load_config
from r1core.engine import Sampling, TorchEngine
from r1core.evaluation import evaluate
from r1core.modeling import load_pretrained
from r1core.problems import generate_split, read_rows
from r1core.training import TrainContext, grpo_train

SETTINGS = {  # name -> (training problems, steps, prompts per step)
    "same 64 problems": (64, 20, 16),
    "fresh problems, 16 per step": (2000, 20, 16),
    "fresh problems, 64 per step": (2000, 10, 64),
}
EVAL = Sampling(temperature=0.6, top_p=0.95, max_new_tokens=64, seed=5)


def default_run() -> str:
    found = sorted(glob.glob(".r1/runs/*/sft/model/config.json"), key=os.path.getmtime)
    if not found:
        raise SystemExit("no SFT model found: run `make demo` first or pass --run DIR")
    return os.path.dirname(os.path.dirname(os.path.dirname(found[-1])))


def unseen_problems(run: str, n: int) -> list[dict]:
    """Chain sums of another seed that are in neither the run's train nor its held-out set."""
    seen = {r["prompt"] for f in ("train.jsonl", "heldout.jsonl") for r in read_rows(f"{run}/data/{f}")}
    train, held = generate_split(load_config().data.model_copy(update={"seed": 4242}))
    rows = [r for r in train + held if r["prompt"] not in seen][:400]
    return [r for r in rows if r["task"] == "chain_sum"][:n]


def accuracy(model, tokenizer, rows: list[dict], k: int = 8) -> float:
    return evaluate(TorchEngine(model, tokenizer), rows, k, EVAL)["pass@1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None)
    ap.add_argument("--only", choices=list(SETTINGS), default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = args.run or default_run()
    train = [r for r in read_rows(f"{run}/data/train.jsonl") if r["task"] == "chain_sum"]
    unseen = unseen_problems(run, 128)
    model, tokenizer = load_pretrained(f"{run}/sft/model")
    before = accuracy(model, tokenizer, train[:64]), accuracy(model, tokenizer, unseen)
    table = []
    for name, (pool, steps, per_step) in SETTINGS.items():
        if args.only and name != args.only:
            continue
        model, tokenizer = load_pretrained(f"{run}/sft/model")
        cfg = GRPOConfig(steps=steps, prompts_per_step=per_step, group_size=8, lr=1e-4, beta=0.0,
                         scale_rewards=False, rewards={"accuracy": 1.0}, skip_flat_groups=True,
                         sampling={"temperature": 0.8, "max_new_tokens": 64}, checkpoint_every=10_000)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            ctx = TrainContext(tmp)
            grpo_train(cfg, model, None, tokenizer, train[:pool], ctx, seed=0, batch_size=256)
        seconds = time.perf_counter() - t0
        batch = [h["reward/accuracy"] for _, h in ctx.history]
        table.append((name, f"{steps} x {per_step}", accuracy(model, tokenizer, train[:64]),
                      accuracy(model, tokenizer, unseen), batch[0], batch[-1], seconds))
    print(f"\nSFT model: {run}/sft/model; before RL: seen {before[0]:.3f}, unseen {before[1]:.3f}\n")
    print("| setting | steps x prompts | seen after | unseen after | batch accuracy first / last step | s |")
    print("|---|---|---|---|---|---|")
    for name, shape, seen, new, first, last, seconds in table:
        print(f"| {name} | {shape} | {seen:.3f} | {new:.3f} | {first:.2f} / {last:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
