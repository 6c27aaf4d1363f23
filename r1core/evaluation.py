"""Held-out evaluation as in the paper: k samples per prompt (temperature 0.6, top-p 0.95).

- pass@1   = mean over prompts of the share of the k samples that are correct, where correct
             means well-formed (format reward 1) and the final <answer> verifies;
- cons@k   = share of prompts whose majority-vote answer (over well-formed samples) verifies;
- format_rate, answer_accuracy_any (the last number stated anywhere, format-agnostic),
  mean_length (completion tokens), and pass@1 per task;
- language_consistency (mean share of CoT words in the prompt's language), language_mixing_rate
  (share of completions whose CoT has a word in another language) and readability (share that
  is well-formed with a summary and no mixing);
- reflection_rate: share of completions that re-check or revise their reasoning (the paper's
  "aha moment", r1core/reflection.py).

Two models are compared on the same prompts: `paired_difference` of their per-prompt scores
(`evaluate(..., per_prompt=True)`), with a bootstrap interval over prompts. At 200 prompts x 4
samples two nearly identical models differ by up to ~0.02 pass@1 by sampling alone; the
interval says whether a difference is more than that.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict

from r1core.engine import RolloutEngine, Sampling
from r1core.language import language_consistency
from r1core.reflection import reflection_rate
from r1core.rewards import (
    answer_accuracy_any,
    cot_text,
    final_answer,
    is_readable,
    parse_format,
    verify,
)


def _vote_key(answer: str) -> str:
    return " ".join(answer.split())


def evaluate(engine: RolloutEngine, rows: list[dict], k: int, sampling: Sampling, per_prompt: bool = False):
    """The metrics; with `per_prompt`, also {"pass@1": [...], "readability": [...],
    "language_mixing": [...]}: each row's share of its k samples that are correct, readable, or
    whose chain of thought mixes languages (pass@1: None for a row whose reference cannot be scored)."""
    prompts = [r["prompt"] for r in rows]
    rollouts = engine.generate(prompts, k, sampling)
    per_task: dict[str, list[float]] = defaultdict(list)
    cons, formatted, lengths, scorable = [], [], [], 0
    consistency, readable = [], []
    scores: dict[str, list] = {"pass@1": [], "readability": [], "language_mixing": []}
    loose = answer_accuracy_any(
        [r.text for r in rollouts],
        [rows[r.prompt_index]["answer"] for r in rollouts],
        [rows[r.prompt_index]["task"] for r in rollouts],
        [rows[r.prompt_index].get("numbers") for r in rollouts],
    )
    for i, row in enumerate(rows):
        group = rollouts[i * k : (i + 1) * k]
        language = row.get("language") or "en"
        votes: Counter[str] = Counter()
        correct = []
        for ro in group:
            ok_format = parse_format(ro.text) is not None
            formatted.append(float(ok_format))
            lengths.append(len(ro.completion_ids))
            consistency.append(language_consistency(cot_text(ro.text), language))
            readable.append(float(is_readable(ro.text, language)))
            pred = final_answer(ro.text) if ok_format else None
            verdict = verify(pred, row)
            correct.append(verdict)
            if pred is not None:
                votes[_vote_key(pred)] += 1
        scores["readability"].append(_mean(readable[-k:]))
        scores["language_mixing"].append(_mean(c < 1.0 for c in consistency[-k:]))
        if any(c is None for c in correct):  # unscorable reference: excluded, counted
            scores["pass@1"].append(None)
            continue
        scorable += 1
        share = sum(map(float, correct)) / k
        scores["pass@1"].append(share)
        per_task[row["task"]].append(share)
        majority = votes.most_common(1)[0][0] if votes else None
        cons.append(float(bool(verify(majority, row))))
    loose_scored = [x for x in loose if x is not None]
    metrics = {
        "pass@1": _mean(x for x in scores["pass@1"] if x is not None),
        f"cons@{k}": _mean(cons),
        "format_rate": _mean(formatted),
        "answer_accuracy_any": _mean(loose_scored),
        "mean_length": _mean(lengths),
        "language_consistency": _mean(consistency),
        "language_mixing_rate": _mean(c < 1.0 for c in consistency),
        "readability": _mean(readable),
        "reflection_rate": reflection_rate([r.text for r in rollouts]),
        "num_prompts": len(rows),
        "num_scorable": scorable,
        "k": k,
    }
    metrics.update({f"pass@1/{t}": _mean(v) for t, v in sorted(per_task.items())})
    return (metrics, scores) if per_prompt else metrics


def paired_difference(baseline: list, other: list, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> dict:
    """other - baseline, the mean over prompts both scored, and a percentile bootstrap interval
    that resamples prompts (each prompt's two scores stay together: the prompt-to-prompt spread in
    difficulty, shared by both models, cancels)."""
    if len(baseline) != len(other):
        raise ValueError(f"paired scores need the same prompts: {len(baseline)} vs {len(other)} rows")
    diffs = [b - a for a, b in zip(baseline, other, strict=True) if a is not None and b is not None]
    if not diffs:
        raise ValueError("no prompt is scored for both models")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    tail = (1 - level) / 2
    return {"difference": _mean(diffs), "low": means[int(tail * (resamples - 1))],
            "high": means[round((1 - tail) * (resamples - 1))], "level": level, "prompts": len(diffs)}


def paired_difference_over_runs(baselines: list[list], others: list[list], level: float = 0.95,
                                resamples: int = 2000, seed: int = 0) -> dict:
    """`paired_difference` pooled over independent runs (seeds) of the same comparison: the mean
    of the runs' mean differences, and a bootstrap interval that resamples prompts within each
    run (each run keeps its own prompts' pairs) and averages the runs; `runs_above` counts the
    runs whose own difference is above zero. The interval is of the prompt sampling within the
    runs, given these runs: with a few seeds, their spread is reported, not estimated."""
    if not baselines or len(baselines) != len(others):
        raise ValueError(f"pooled paired scores need the same runs on both sides: {len(baselines)} vs {len(others)}")
    diffs = []
    for i, (base, other) in enumerate(zip(baselines, others, strict=True)):
        if len(base) != len(other):
            raise ValueError(f"run {i}: paired scores need the same prompts: {len(base)} vs {len(other)} rows")
        d = [b - a for a, b in zip(base, other, strict=True) if a is not None and b is not None]
        if not d:
            raise ValueError(f"run {i}: no prompt is scored for both models")
        diffs.append(d)
    rng = random.Random(seed)
    means = sorted(_mean(_mean(rng.choices(d, k=len(d))) for d in diffs) for _ in range(resamples))
    tail = (1 - level) / 2
    per_run = [_mean(d) for d in diffs]
    return {"difference": _mean(per_run), "low": means[int(tail * (resamples - 1))],
            "high": means[round((1 - tail) * (resamples - 1))], "level": level, "runs": len(diffs),
            "per_run": per_run, "runs_above": sum(x > 0 for x in per_run)}


EVAL_SEED = 1234


def evaluate_heldout(engine: RolloutEngine, rows: list[dict], eval_cfg, per_prompt: bool = False):
    """`evaluate` as an `EvalConfig` asks: the first `num_prompts` rows, k samples, its sampling."""
    return evaluate(engine, rows[: eval_cfg.num_prompts], eval_cfg.k,
                    Sampling.from_config(eval_cfg.sampling, seed=EVAL_SEED), per_prompt)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
