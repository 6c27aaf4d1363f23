"""Choose a training stage's settings on a validation split of train prompts, never the held-out set.

From a `make demo` run, this takes the stage's starting model, sets the last `--validation` rows
of the run's train prompts aside, and for each candidate runs the stage's own recipe (the
profile's section: its rewards, KL, sampling, schedule; only the fields a candidate names
change) in this process, on one worker:

- a GRPO stage (`r1_zero`, `reasoning_rl`, `distill.rl`: a student's RL-only twin) on the other
  train rows; `general_rl` on those and its synthesised general prompts, scored by the run's
  reward models (the table adds their mean reward on the first and last steps' general prompts);
- an SFT stage (`distill.sft`: the student's distillation) on the run's rejection-sampled set,
  less the examples whose prompt is a validation row.

Each trained model is scored on the validation rows as the pipeline scores the held-out set
(`eval.k` samples at `eval.sampling`), paired with the starting model's scores on the same rows
(95% bootstrap interval over prompts).

    python bench/tune.py [--section reasoning_rl] [--run DIR] [--validation 400] [--only NAME ...] [--student NAME]

--run defaults to the newest `make demo` run (.r1/runs/*). Candidate names give steps x prompts
per step (GRPO) or epochs (SFT); GRPO candidates sample the profile's 16 x 16 = 256 groups
unless marked "2x" or "4x".
"""
from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import torch

from r1core.config import load_config
from r1core.engine import TorchEngine
from r1core.evaluation import evaluate_heldout, paired_difference
from r1core.modeling import load_pretrained
from r1core.problems import read_rows
from r1core.reward_model import general_rl_inputs
from r1core.training import TrainContext, grpo_train, pack_examples, sft_train

START_MODEL = {"r1_zero": "pretrain_base/model", "reasoning_rl": "cold_start_sft/model",
               "distill.rl": "distill/{student}/base/model", "distill.sft": "distill/{student}/base/model",
               "general_rl": "sft/model"}
GRPO_CANDIDATES = {  # name -> the section's fields it changes
    "profile": {},
    "4 x 64": {"prompts_per_step": 64, "steps": 4},
    "4 x 64, lr 1e-4": {"prompts_per_step": 64, "steps": 4, "lr": 1e-4},
    "8 x 32, lr 1e-4": {"prompts_per_step": 32, "steps": 8, "lr": 1e-4},
    "16 x 16, lr 1e-4": {"steps": 16, "prompts_per_step": 16, "lr": 1e-4},
    "16 x 16, lr 3e-5": {"steps": 16, "prompts_per_step": 16, "lr": 3e-5},
    "4 x 64, flat groups skipped": {"prompts_per_step": 64, "steps": 4, "skip_flat_groups": True},
    "4 x 64, accuracy reward only": {"prompts_per_step": 64, "steps": 4, "rewards": {"accuracy": 1.0}},
    "4 x 64, accuracy + language consistency": {"prompts_per_step": 64, "steps": 4,
                                                "rewards": {"accuracy": 1.0, "language_consistency": 1.0}},
    "4 x 64, accuracy only, flat groups skipped": {"prompts_per_step": 64, "steps": 4, "rewards": {"accuracy": 1.0},
                                                   "skip_flat_groups": True},
    "8 x 64 (2x)": {"prompts_per_step": 64, "steps": 8},
    "8 x 64, accuracy reward only (2x)": {"prompts_per_step": 64, "steps": 8, "rewards": {"accuracy": 1.0}},
    "8 x 64, lr 1e-4 (2x)": {"prompts_per_step": 64, "steps": 8, "lr": 1e-4},
    "16 x 64 (4x)": {"prompts_per_step": 64, "steps": 16},
}
GENERAL_RL_CANDIDATES = {
    "profile": {},
    "8 x 16": {"steps": 8, "prompts_per_step": 16},
    "16 x 16, lr 1e-5": {"steps": 16, "prompts_per_step": 16, "lr": 1e-5},
    "4 x 64": {"prompts_per_step": 64, "steps": 4},
    "4 x 64, flat groups skipped": {"prompts_per_step": 64, "steps": 4, "skip_flat_groups": True},
    "16 x 16, flat groups skipped": {"steps": 16, "prompts_per_step": 16, "skip_flat_groups": True},
    "16 x 16, beta 0.1": {"steps": 16, "prompts_per_step": 16, "beta": 0.1},
}
SFT_CANDIDATES = {
    "profile": {},
    "4 epochs": {"epochs": 4},
    "6 epochs": {"epochs": 6},
    "2 epochs, lr 1e-3": {"epochs": 2, "lr": 1e-3},
    "4 epochs, lr 1e-3": {"epochs": 4, "lr": 1e-3},
}


def candidates_of(section: str) -> dict[str, dict]:
    return {"distill.sft": SFT_CANDIDATES, "general_rl": GENERAL_RL_CANDIDATES}.get(section, GRPO_CANDIDATES)


def candidate_recipe(section, change: dict):
    """The section with a candidate's fields, validated as the section's own config type (a
    misspelt field or a bad value fails here, not mid-run); no checkpoints: nothing resumes."""
    fields = {**section.model_dump(), **change}
    if "checkpoint_every" in fields:
        fields["checkpoint_every"] = 10_000
    return type(section).model_validate(fields)


def default_run() -> str:
    found = sorted(glob.glob(".r1/runs/*/data/train.jsonl"), key=os.path.getmtime)
    if not found:
        raise SystemExit("no demo run found: run `make demo` first or pass --run DIR")
    return os.path.dirname(os.path.dirname(found[-1]))


def outside(examples: list[dict], validation: list[dict]) -> list[dict]:
    """The examples whose prompt is not a validation row's (the rejection-sampled set was
    sampled from every train prompt, the validation rows included)."""
    held = {r["prompt"] for r in validation}
    return [r for r in examples if r["prompt"] not in held]


def train(section: str, recipe, start: str, run: str, train_rows: list[dict], validation: list[dict], seed: int,
          batch_size: int, languages: dict[str, float]):
    """The stage's recipe from `start`, as its worker runs it; the trained model, its tokenizer
    and the logged metrics (`[(step, metrics)]`)."""
    model, tokenizer = load_pretrained(start)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TrainContext(tmp)
        if section == "distill.sft":
            examples = outside(read_rows(f"{run}/rejection_sampling/dataset"), validation)
            sft_train(recipe, model, pack_examples(tokenizer, examples, recipe.seq_len), ctx, seed=seed)
        else:
            routing = {}
            if section == "general_rl":
                dirs = {name: f"{run}/reward_models/{name}/model" for name in recipe.model_rewards}
                train_rows, routing["reward_fn"], routing["sample_rows"] = general_rl_inputs(
                    recipe, train_rows, languages, seed, dirs)
            reference, _ = load_pretrained(start)
            grpo_train(recipe, model, reference, tokenizer, train_rows, ctx, seed=seed, batch_size=batch_size, **routing)
    return model, tokenizer, ctx.history


def model_rewards(recipe, history: list[tuple[int, dict]]) -> str:
    """Each reward model's mean score on the first and the last step's general prompts (general
    RL); empty for a recipe without reward models, and then the table has no such column."""
    if not getattr(recipe, "model_rewards", None) or not history:
        return ""
    first, last = history[0][1], history[-1][1]
    return ", ".join(f"{name} {first.get(f'reward/{name}', float('nan')):.2f} -> {last.get(f'reward/{name}', float('nan')):.2f}"
                     for name in recipe.model_rewards)


def describe(section: str, recipe) -> str:
    if section == "distill.sft":
        return f"{recipe.epochs} epochs, lr {recipe.lr:g}"
    return f"{recipe.steps} x {recipe.prompts_per_step}, lr {recipe.lr:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--section", choices=list(START_MODEL), default="reasoning_rl")
    ap.add_argument("--run", default=None)
    ap.add_argument("--validation", type=int, default=400, help="train rows set aside (the last ones)")
    ap.add_argument("--only", nargs="*", default=None, help="candidate names (default: all of the stage's kind)")
    ap.add_argument("--student", default=None, help="distill sections: the student (default: the profile's first)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    candidates = candidates_of(args.section)
    unknown = set(args.only or ()) - set(candidates)
    if unknown:
        raise SystemExit(f"--only: no candidate {sorted(unknown)} for {args.section}; candidates: {list(candidates)}")
    run = args.run or default_run()
    start = f"{run}/{START_MODEL[args.section].format(student=args.student or cfg.distill.students[0].name)}"
    rows = read_rows(f"{run}/data/train.jsonl")
    train_rows, validation = rows[: -args.validation], rows[-args.validation:]
    eval_cfg = cfg.eval.model_copy(update={"num_prompts": len(validation)})

    def scored(model, tokenizer):
        metrics, per_prompt = evaluate_heldout(TorchEngine(model, tokenizer), validation, eval_cfg, per_prompt=True)
        return metrics, per_prompt["pass@1"]

    start_metrics, start_scores = scored(*load_pretrained(start))
    table = []
    for name, change in candidates.items():
        if args.only and name not in args.only:
            continue
        recipe = candidate_recipe(cfg.section(args.section), change)
        t0 = time.perf_counter()
        model, tokenizer, history = train(args.section, recipe, start, run, train_rows, validation, cfg.runtime.seed,
                                          cfg.rollout.batch_size, cfg.data.languages)
        seconds = time.perf_counter() - t0
        metrics, scores = scored(model, tokenizer)
        d = paired_difference(start_scores, scores)
        rewards = model_rewards(recipe, history)
        table.append((name, describe(args.section, recipe), metrics, d, seconds, rewards))
        print(f"{name}: validation pass@1 {metrics['pass@1']:.3f} ({d['difference']:+.3f} "
              f"[{d['low']:+.3f}, {d['high']:+.3f}]), {seconds:.0f} s {rewards}", flush=True)
    print(f"\n{args.section} from {start}; {len(train_rows)} train rows, {len(validation)} validation rows "
          f"(k = {eval_cfg.k}); the starting model: pass@1 {start_metrics['pass@1']:.3f}, "
          f"readability {start_metrics['readability']:.3f}\n")
    extra = any(row[-1] for row in table)
    print("| candidate | setting | validation pass@1 | vs start (95%) | readability | training s |"
          + (" reward models, first -> last step |" if extra else ""))
    print("|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for name, setting, metrics, d, seconds, rewards in table:
        print(f"| {name} | {setting} | {metrics['pass@1']:.3f} | {d['difference']:+.3f} [{d['low']:+.3f}, "
              f"{d['high']:+.3f}] | {metrics['readability']:.3f} | {seconds:.0f} |" + (f" {rewards} |" if extra else ""))


if __name__ == "__main__":
    main()
