"""Worst-case time of one reward call, on the classes of attack the reward tests cover and on random strings.

    python bench/rewards.py [--fuzz N] [--seed S]

Every rule reward (accuracy on rows of each answer kind but code, format, readable_format,
language_consistency) is called on one completion at a time: the pathological inputs (power
towers for math-verify, tens of thousands of unclosed tags, deep nesting, huge numbers, 10 MB of
text) and N random and mutated completions. Prints, per reward and answer kind: calls, median,
p99 and worst milliseconds per call, and the bound that holds by construction (the math-verify
time limit where math-verify runs, else linear parsing of at most MAX_COMPLETION_CHARS).
The code rewards' bound is the sandbox's wall limit (`make bench-sandbox` measures its cost).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from r1core import math_check
from r1core.rewards import MAX_COMPLETION_CHARS, REWARDS

ROWS = {  # answer kind -> (reference, task, extra columns)
    "integer": ("6", "chain_sum", {}),
    "number": ("0.5", "gsm8k", {"answer_kind": "number"}),
    "math": ("x^2 + 1", "math", {}),
    "countdown": ("32", "countdown", {"numbers": [3, 5, 40], "operations": ["+", "-", "*"]}),
}
PATHOLOGICAL = [
    "<think> t </think> <answer> 9^{9^{9}} </answer>",
    "<think> t </think> <answer> 9^{999999999} + 1 </answer>",
    "<think> t </think> <answer> " + "\\frac{" * 200 + "1" + "}" * 200 + " </answer>",
    "<think> t </think> <answer> " + "(" * 100_000 + "1" + ")" * 100_000 + " </answer>",
    "<think> t </think> <answer> " + "1" * 100_000 + " </answer>",
    "<think>" * 30_000,
    "<answer>" * 30_000 + " 6 </answer>",
    "</think>" * 50_000 + "<answer> 6 </answer>",
    "<think> " + "plus минус " * 5000 + "</think> <summary> " + "\u200b" * 20_000 + " x </summary> <answer> 6 </answer>",
    "x" * 10_000_000,
]
ALPHABET = ["<think>", "</think>", "<summary>", "</summary>", "<answer>", "</answer>", " ", "\n", "6", "7", "-", "+",
            "*", "/", "(", ")", "=", ",", "$", "\\boxed{", "}", "^", "\\frac{", "\\sqrt", "x", "or", "или", "plus",
            "\u200b", "\ufeff", "\u0301", "１", "\\\\", "\\text{", "True", "∨", "→"]


def fuzz_case(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, rng.choice([20, 200, 4000]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuzz", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    math_check.equivalent("x", "x", timeout_s=60)  # the helper's start-up is not a reward call
    REWARDS["format"](["<think> t </think> <answer> 6 </answer>"])  # nor building the invisible-character table
    cases = PATHOLOGICAL + [fuzz_case(rng) for _ in range(args.fuzz)]
    times: dict[tuple[str, str], list[float]] = {}
    for completion in cases:
        for kind, (reference, task, extra) in ROWS.items():
            names = ("accuracy",) if kind != "integer" else ("accuracy", "format", "readable_format",
                                                             "language_consistency")
            for name in names:
                t0 = time.perf_counter()
                REWARDS[name]([completion], answer=[reference], task=[task], language=["en"],
                              **{k: [v] for k, v in extra.items()})
                times.setdefault((name, kind if name == "accuracy" else "any"), []).append(time.perf_counter() - t0)
    print(f"\nreward calls on {len(PATHOLOGICAL)} pathological inputs and {args.fuzz} random ones (seed {args.seed})\n")
    print("| reward | answer kind | calls | median (ms) | p99 (ms) | worst (ms) | bound |")
    print("|---|---|---|---|---|---|---|")
    for (name, kind), ts in times.items():
        ts.sort()
        bound = (f"math-verify time limit {math_check.TIMEOUT_S:g} s per call" if kind == "math"
                 else f"linear, input capped at {MAX_COMPLETION_CHARS:,} chars")
        print(f"| {name} | {kind} | {len(ts)} | {1000 * statistics.median(ts):.3f} | "
              f"{1000 * ts[int(0.99 * (len(ts) - 1))]:.3f} | {1000 * ts[-1]:.1f} | {bound} |")


if __name__ == "__main__":
    main()
