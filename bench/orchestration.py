"""Where a pipeline run's time goes: training loops, evaluation compute, and orchestration.

Read from the run's MLflow store (the parent `r1_pipeline` run and its stage runs, as the
pipeline logged them; the stage runs' times match their Prefect flow runs'):

- **wall**: the stage run's start to end (the pipeline's: its parent run's);
- **loop**: time in the training loop, from its first step's start to its end, on the worker
  (`time/loop_s`, checkpoints included);
- **eval**: the held-out evaluation's sampling and scoring, the model loaded (`eval/compute_s`);
  `eval/wall_s` adds the model's load and, for an evaluation run as its own Ray task after the
  job, the task's start-up; with `eval.in_training_job` (`eval/in_job`) it runs inside the job,
  at its end, so its time is within the stage run's wall;
- **data**: a data stage's whole time (cold_start_data, rejection_sampling: sampling,
  verification and Ray Data's own set-up, not split here);
- **orchestration**: the rest (Ray Train's job start-up and worker set-up, data loading, model
  writing and registration, Prefect and MLflow calls, evaluation start-up, time between stages).

Stages whose runs overlap in time are one row, their wall the span: the two reward models (two
jobs at once: the longest loop counts) and a distill student's three stages (one Ray Train job
of three parts, run one after another: their loops add up). The orchestration share is given
with data stages counted as compute (a lower bound: their Ray Data set-up is orchestration too).

    python bench/orchestration.py [--config configs/tiny.yaml] [--run-id ID] [--set KEY=VALUE ...]
                                  [--vmstat FILE]

With `--vmstat FILE` (`vmstat -t 1 > FILE` recorded while the pipeline ran, on its host), it also
prints how busy the CPUs were in the compute seconds and in the orchestration seconds (those
outside every loop, evaluation and data stage, placed by the times the worker logged them): CPUs
busy during orchestration mean it is work (process starts, imports), not waiting, so running
stages at once could not hide it.

Default: the newest finished pipeline run of the profile's MLflow store (after `make demo`).
"""
from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from r1core.config import load_config

DATA_STAGES = ("cold_start_data", "rejection_sampling")


def stage_runs(client, parent_id: str) -> list:
    """Every run under the pipeline run (stage runs and their own children), oldest first."""
    parent = client.get_run(parent_id)
    found, frontier = [], [parent_id]
    while frontier:
        children = [c for i in frontier for c in client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{i}'", max_results=1000)]
        found += children
        frontier = [r.info.run_id for r in children]
    return sorted(found, key=lambda r: r.info.start_time)


def timings(run) -> dict:
    m = run.data.metrics
    stage = run.data.tags.get("stage", run.info.run_name)
    wall = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
    data = wall if stage.split("/")[0] in DATA_STAGES else 0.0
    return {"stage": stage, "start": run.info.start_time / 1000, "end": (run.info.end_time or 0) / 1000,
            "wall": wall, "loop": m.get("time/loop_s", 0.0), "eval": m.get("eval/compute_s", 0.0),
            "eval_wall": m.get("eval/wall_s", 0.0), "data": data, "in_job": m.get("eval/in_job", 0.0) > 0,
            "job": run.data.tags.get("r1.ray_train_job")}


def merge_overlapping(rows: list[dict]) -> list[dict]:
    """Leaf stage runs that ran at the same time as one row (their span). The parts of one Ray
    Train job (the same `r1.ray_train_job` tag: a student's base, SFT and RL) ran one after
    another, so their loops and evaluations add up; separate jobs at the same time (the two
    reward models) overlap, so the longest counts."""
    merged: list[dict] = []
    for r in rows:
        last = merged[-1] if merged else None
        if last is not None and r["start"] < last["end"] - 1:
            last.update(stage=f"{last['stage']} + {r['stage']}", end=max(last["end"], r["end"]),
                        in_job=last["in_job"] or r["in_job"])
            last["parts"].append(r)
        else:
            merged.append({**r, "parts": [r]})
    for row in merged:
        by_job: dict[str, list[dict]] = {}
        for i, part in enumerate(row["parts"]):
            by_job.setdefault(part["job"] or f"run {i}", []).append(part)
        for k in ("loop", "eval", "eval_wall", "data"):
            row[k] = max(sum(part[k] for part in parts) for parts in by_job.values())
        row["wall"] = row["end"] - row["start"]
    return merged


def compute_intervals(client, runs: list) -> list[tuple[float, float]]:
    """When each training loop, in-job evaluation and data stage ran (epoch seconds): a loop or
    an evaluation ends when its time metric was logged, and lasted that long."""
    intervals = []
    for run in runs:
        t = timings(run)
        if t["data"]:
            intervals.append((t["start"], t["end"]))
        for key in ("time/loop_s", "eval/compute_s"):
            for m in client.get_metric_history(run.info.run_id, key)[-1:]:
                intervals.append((m.timestamp / 1000 - m.value, m.timestamp / 1000))
    return intervals


def cpu_busy(vmstat_file: str, start: float, end: float, intervals: list[tuple[float, float]]) -> dict[str, list[int]]:
    """Each second's CPU use (100 - idle - iowait, % of all CPUs) from `vmstat -t 1` lines (UTC
    timestamps), split into compute and orchestration seconds of the run's span."""
    busy: dict[str, list[int]] = {"compute": [], "orchestration": []}
    for line in Path(vmstat_file).read_text().splitlines():
        fields = line.split()
        if len(fields) < 17 or not fields[0].isdigit():
            continue  # a header
        at = datetime.fromisoformat(f"{fields[-2]} {fields[-1]}").replace(tzinfo=timezone.utc).timestamp() - 0.5
        if start <= at <= end:
            kind = "compute" if any(a <= at <= b for a, b in intervals) else "orchestration"
            busy[kind].append(100 - int(fields[14]) - int(fields[15]))
    return busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run-id", help="the r1_pipeline parent run (default: the newest finished one)")
    ap.add_argument("--vmstat", help="`vmstat -t 1` output recorded during the run: CPU use in compute and orchestration")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    from tasks.tracking import client_for, experiment_id

    client = client_for(cfg.runtime)
    if args.run_id:
        parent = client.get_run(args.run_id)
    else:
        found = client.search_runs([experiment_id(cfg.runtime)], "tags.stage = 'pipeline' and attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise SystemExit("no finished pipeline run in this store: run `make demo` first or pass --run-id")
        parent = found[0]
    runs = stage_runs(client, parent.info.run_id)
    has_children = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    leaves = merge_overlapping([timings(r) for r in runs if r.info.run_id not in has_children])
    total = (parent.info.end_time - parent.info.start_time) / 1000
    print(f"pipeline run {parent.info.run_id} ({parent.data.tags.get('run_name')}): {total:.0f} s wall")
    # a stage run spans its job (or data pipeline) and, with eval.in_training_job, the job's
    # evaluation; otherwise the evaluation runs after it, between stage runs
    print(f"{'stage':<46} {'wall s':>7} {'loop s':>7} {'data s':>7} {'orch. s':>8} {'eval s':>7} {'eval start s':>12}")
    sums = dict.fromkeys(("wall", "loop", "eval", "eval_wall", "data"), 0.0)
    eval_between = 0.0  # the compute of evaluations run after their jobs
    for r in leaves:
        in_run = r["eval"] if r["in_job"] else 0.0
        eval_between += r["eval"] - in_run
        print(f"{r['stage'][:46]:<46} {r['wall']:>7.0f} {r['loop']:>7.0f} {r['data']:>7.0f} "
              f"{r['wall'] - r['loop'] - r['data'] - in_run:>8.0f} {r['eval']:>7.0f} {r['eval_wall'] - r['eval']:>12.0f}"
              f"{'  (in job)' if r['in_job'] else ''}")
        for k in sums:
            sums[k] += r[k]
    between = total - sums["wall"]
    print(f"{'between stage runs (evaluations, Prefect, ...)':<46} {between:>7.0f} {'':>7} {'':>7} "
          f"{between - eval_between:>8.0f}")
    orchestration = total - sums["loop"] - sums["data"] - sums["eval"]
    print(f"{'total':<46} {total:>7.0f} {sums['loop']:>7.0f} {sums['data']:>7.0f} {orchestration:>8.0f} "
          f"{sums['eval']:>7.0f} {sums['eval_wall'] - sums['eval']:>12.0f}")
    print(f"orchestration: {orchestration:.0f} s of {total:.0f} s = {orchestration / total:.1%} (data stages counted "
          f"as compute; evaluations' start-up and model load, {sums['eval_wall'] - sums['eval']:.0f} s, included)")
    if args.vmstat:
        busy = cpu_busy(args.vmstat, parent.info.start_time / 1000, parent.info.end_time / 1000,
                        compute_intervals(client, runs))
        for kind, seconds in busy.items():
            mean = sum(seconds) / len(seconds) if seconds else float("nan")
            print(f"CPU busy in {kind} seconds ({len(seconds)} s): mean {mean:.0f}%, under half busy: "
                  f"{sum(b < 50 for b in seconds)} s")

if __name__ == "__main__":
    main()
