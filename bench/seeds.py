"""The demo over seeds: every stage's held-out numbers and each of the paper's findings, per seed
and pooled over the seeds.

Run the pipeline once per seed first (`make demo`, then `make demo ARGS="--set runtime.seed=1"`
and so on): the seed is part of the configuration's digest, so each seed's run has its own
folder. This reads the stage results those runs saved (`<run folder>/<stage>/result.json`: the
held-out metrics and each prompt's scores) and prints markdown tables: pass@1 per seed with the
mean and range, the reward models' held-out pairwise accuracy per seed, and each finding's paired
difference per seed and pooled (`r1core.evaluation.paired_difference_over_runs`). Where a seed
also has `make ablation-lc`'s model (reasoning RL from that seed's cold start with the
language-consistency reward weighted 0: `make demo-seeds` runs it), the reward's cut in language
mixing is one more finding.

    python bench/seeds.py [--config configs/tiny.yaml] [--seeds 0 1 2] [--set KEY=VALUE ...]
    python bench/seeds.py --cold-start-of SEED   (that seed's cold-start model: the ablation's start)
    python bench/seeds.py --ablation-args        (the ablation's override, as the Makefile passes it)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from r1core.config import load_config
from r1core.evaluation import paired_difference, paired_difference_over_runs
from tasks.report import LC_ABLATION, findings_of, interval, markdown, verdict
from tasks.training_stages import StageResult


def stage_results(run_dir: Path) -> dict[str, StageResult]:
    """The run's saved model-stage results in the order they were recorded (the pipeline's);
    data stages' results (datasets) are left out."""
    results = {}
    for f in sorted(run_dir.glob("**/result.json"), key=lambda f: f.stat().st_mtime):
        saved = json.loads(f.read_text())["result"]
        if "model_dir" in saved:
            results[f.parent.relative_to(run_dir).as_posix()] = StageResult(**saved)
    return results


# the language-consistency ablation's one override: `make ablation-lc` and `make demo-seeds` read
# it from here (`--ablation-args`), and each seed's ablation run folder is found with it
LC_ABLATION_SET = "reasoning_rl.rewards.language_consistency=0"


def stage_table(runs: dict[int, dict[str, StageResult]]) -> list[dict]:
    first = next(iter(runs.values()))
    rows = []
    for stage in first:
        if "pass@1" not in first[stage].metrics or not all(stage in r for r in runs.values()):
            continue
        scores = [r[stage].metrics["pass@1"] for r in runs.values()]
        row = {"stage": stage, **{f"pass@1 seed {s}": f"{r[stage].metrics['pass@1']:.4f}" for s, r in runs.items()}}
        row["pass@1 mean"] = f"{sum(scores) / len(scores):.4f}"
        row["range"] = f"{min(scores):.4f}–{max(scores):.4f}"
        for m in ("readability", "reflection_rate"):
            values = [r[stage].metrics.get(m, 0.0) for r in runs.values()]
            row[f"{m} mean"] = f"{sum(values) / len(values):.3f}"
        rows.append(row)
    return rows


def reward_model_table(runs: dict[int, dict[str, StageResult]]) -> list[dict]:
    first = next(iter(runs.values()))
    return [{"reward model": stage, **{f"seed {s}": f"{r[stage].metrics['pairwise_accuracy']:.3f}"
                                       for s, r in runs.items() if stage in r}}
            for stage in first if "pairwise_accuracy" in first[stage].metrics]


def finding_table(runs: dict[int, dict[str, StageResult]]) -> list[dict]:
    rows = []
    for finding, baseline, model, metric in findings_of(next(iter(runs.values()))):
        pairs = {s: (r[baseline].per_prompt.get(metric), r[model].per_prompt.get(metric)) for s, r in runs.items()
                 if baseline in r and model in r}
        if not pairs or any(not b or not a for b, a in pairs.values()):
            continue
        row = {"finding": finding}
        row.update({f"seed {s}": interval(paired_difference(b, a)) for s, (b, a) in pairs.items()})
        pooled = paired_difference_over_runs([b for b, _ in pairs.values()], [a for _, a in pairs.values()])
        row["pooled (95%)"] = interval(pooled)
        row["seeds above zero"] = f"{pooled['runs_above']}/{pooled['runs']}"
        row["pooled interval"] = verdict(pooled["low"], pooled["high"])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cold-start-of", type=int, metavar="SEED", help="print the seed's cold-start model dir and exit")
    ap.add_argument("--ablation-args", action="store_true", help="print the ablation's `r1 run` override and exit")
    args = ap.parse_args()
    if args.ablation_args:
        print(f"--set {LC_ABLATION_SET}")
        return
    if args.cold_start_of is not None:
        print(load_config(args.config, [*args.set, f"runtime.seed={args.cold_start_of}"]).run_dir()
              / "cold_start_sft" / "model")
        return
    runs, missing = {}, []
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.set, f"runtime.seed={seed}"])
        found = stage_results(cfg.run_dir())
        ablation = load_config(args.config, [*args.set, f"runtime.seed={seed}", LC_ABLATION_SET]).run_dir()
        if found and (ablation / "reasoning_rl" / "result.json").is_file():
            found[LC_ABLATION] = stage_results(ablation)["reasoning_rl"]
        if found:
            runs[seed] = found
        else:
            missing.append(f"seed {seed}: no stage results in {cfg.run_dir()}")
    if missing:
        raise SystemExit("\n".join(missing) + "\nrun `make demo ARGS=\"--set runtime.seed=N\"` for each seed first")
    print(f"{len(runs)} seeds ({', '.join(map(str, runs))}), config {args.config}\n")
    print(markdown(stage_table(runs)), "\n")
    print(markdown(reward_model_table(runs)), "\n")
    print(markdown(finding_table(runs)))


if __name__ == "__main__":
    main()
