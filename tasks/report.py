"""The end of the pipeline: one table comparing every model it produced, on the parent MLflow
run (a table and a PNG chart) and as a Prefect table artifact."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from r1core.config import PipelineConfig
from r1core.evaluation import paired_difference
from tasks import console, tracking
from tasks.training_stages import IDEMPOTENT, StageResult

COLUMNS = ("pass@1", "cons@{k}", "format_rate", "language_consistency", "readability", "reflection_rate",
           "mean_length")
PAIRED = ("pass@1", "readability")  # compared with the parent model prompt by prompt


def trained_from(result: StageResult, results: dict[str, StageResult]) -> str | None:
    """The stage of `results` whose model `result` trained from, when it is one of them."""
    if not result.init_model_dir:
        return None
    init = Path(result.init_model_dir).resolve()
    return next((s for s, r in results.items() if Path(r.model_dir).resolve() == init), None)


def comparison_rows(results: dict[str, StageResult], k: int) -> list[dict]:
    """One row per evaluated model, in pipeline order, with the change from the model it trained
    from: the mean per-prompt difference and its 95% bootstrap interval (same prompts and samples'
    seed; at 200 prompts x 4 samples an interval of about ±0.02 pass@1 is sampling alone)."""
    rows = []
    for stage, r in results.items():
        if "pass@1" not in r.metrics:
            continue
        row = {"stage": stage, "model": r.registered or "-"}
        for c in COLUMNS:
            name = c.format(k=k)
            row[name] = round(r.metrics.get(name, 0.0), 4)
        parent = trained_from(r, results)
        row["trained_from"] = parent or "-"
        for m in PAIRED:
            row[f"{m} change (95%)"] = _change(results[parent].per_prompt.get(m), r.per_prompt.get(m)) \
                if parent else "-"
        row["stage_seconds"] = round(r.seconds)
        rows.append(row)
    return rows


# The paper's findings as paired comparisons on the same held-out prompts: (finding, baseline
# stage, model stage, metric); each student adds "distilled above its RL-only twin".
FINDINGS = (
    ("R1-Zero above the base", "pretrain_base", "r1_zero", "pass@1"),
    ("cold start more readable than R1-Zero", "r1_zero", "cold_start_sft", "readability"),
    ("reasoning RL above its cold-start model", "cold_start_sft", "reasoning_rl", "pass@1"),
    ("SFT on the rejection-sampled set above reasoning RL", "reasoning_rl", "sft", "pass@1"),
    ("general RL at least matching SFT", "sft", "general_rl", "pass@1"),
)


# `make ablation-lc`'s model (reasoning RL with the language-consistency reward weighted 0), where
# results include it (bench/seeds.py adds each seed's)
LC_ABLATION = "reasoning_rl without language consistency"


def findings_of(results: dict[str, StageResult]) -> list[tuple[str, str, str, str]]:
    """The findings these results can test, as (finding, baseline stage, model stage, metric):
    FINDINGS, for each student "distilled above its RL-only twin", and with the ablation the
    language-consistency reward's cut in mixing (the share of chains of thought that mix
    languages without it minus with it: above zero where the reward cuts mixing)."""
    students = sorted({s.split("/")[1] for s in results if s.startswith("distill/")})
    findings = [*FINDINGS, *((f"distilled student {name} above its RL-only twin", f"distill/{name}/rl_only",
                              f"distill/{name}/sft", "pass@1") for name in students),
                ("language-consistency reward cuts mixing (mixing without it - with it)", "reasoning_rl",
                 LC_ABLATION, "language_mixing")]
    return [f for f in findings if f[1] in results and f[2] in results]


def interval(d: dict) -> str:
    """A paired difference as the tables show it: `+0.123 [+0.045, +0.201]`."""
    return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def verdict(low: float, high: float) -> str:
    return "above zero" if low > 0 else "below zero" if high < 0 else "within noise"


def finding_rows(results: dict[str, StageResult]) -> list[dict]:
    """Each of the paper's findings this run can test: the difference (model - baseline) with its
    95% paired bootstrap interval, and whether that interval excludes zero."""
    rows = []
    for finding, baseline, model, metric in findings_of(results):
        before, after = results[baseline].per_prompt.get(metric), results[model].per_prompt.get(metric)
        try:
            d = paired_difference(before or [], after or [])
        except ValueError:
            continue
        rows.append({"finding": finding, "metric": metric, "baseline": baseline, "model": model,
                     "difference (95%)": interval(d),
                     "interval": verdict(d["low"], d["high"])})
    return rows


def _change(before: list | None, after: list | None) -> str:
    """`after - before` with its interval; "-" where the two were not scored on the same prompts
    (a result saved before per-prompt scores were kept, or no prompt scorable for both)."""
    if not before or not after:
        return "-"
    try:
        d = paired_difference(before, after)
    except ValueError:
        return "-"
    return interval(d)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no evaluated models)"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def chart(rows: list[dict], k: int, path: Path) -> Path:
    """Grouped bars of pass@1, cons@k and readability per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["pass@1", f"cons@{k}", "readability"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        ax.bar([i + j * width for i in range(len(rows))], [r[m] for r in rows], width, label=m)
    ax.set_xticks([i + width for i in range(len(rows))], [r["stage"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("held-out evaluation of every model of the pipeline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="compare-models", cache_policy=NO_CACHE)
def compare_models(cfg: PipelineConfig, results: dict[str, StageResult], parent_run_id: str) -> list[dict]:
    """Log the comparison of every evaluated model to the parent run and as a Prefect artifact."""
    k = cfg.eval.k
    rows = comparison_rows(results, k)
    client = tracking.client_for(cfg.runtime)
    findings = finding_rows(results)
    client.log_table(parent_run_id, data={c: [r[c] for r in rows] for c in rows[0]} if rows else {},
                     artifact_file="comparison/models.json")
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(parent_run_id, str(chart(rows, k, Path(tmp) / "models.png")), "comparison")
        (Path(tmp) / "models.md").write_text(markdown(rows) + "\n")
        (Path(tmp) / "findings.md").write_text(markdown(findings) + "\n")
        client.log_artifact(parent_run_id, str(Path(tmp) / "models.md"), "comparison")
        client.log_artifact(parent_run_id, str(Path(tmp) / "findings.md"), "comparison")
    create_table_artifact(rows, key="r1-model-comparison",
                          description=f"Held-out evaluation of every model of run {cfg.resolved_run_name()} "
                                      f"(k = {k}, temperature {cfg.eval.sampling.temperature}, "
                                      f"top-p {cfg.eval.sampling.top_p}).")
    if findings:
        create_table_artifact(findings, key="r1-paper-findings",
                              description="The paper's findings on this run: paired differences on the same "
                                          "held-out prompts with 95% bootstrap intervals.")
    return rows


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def mismatch_lines(client, run_id: str, warn_kl: float, shown: int = 20) -> list[str]:
    """The steps of a GRPO run whose rollout-vs-trainer mismatch was a warning (`rollout/*`
    metrics), as markdown; nothing for runs without remote rollouts."""
    flagged = [m.step for m in client.get_metric_history(run_id, "rollout/mismatch_warning") if m.value > 0]
    kl = {m.step: m.value for m in client.get_metric_history(run_id, "rollout/mismatch_kl")}
    if not kl:
        return []
    if not flagged:
        return ["", f"Rollout-vs-trainer mismatch: no step above KL {warn_kl:g} (largest {max(kl.values()):.3g})."]
    diff = {m.step: m.value for m in client.get_metric_history(run_id, "rollout/logp_abs_diff")}
    stale = {m.step: m.value for m in client.get_metric_history(run_id, "rollout/staleness")}
    lines = ["", f"### Warning: rollout-vs-trainer mismatch above KL {warn_kl:g} at {len(flagged)} step(s)", "",
             "| step | KL(behaviour ‖ trainer) | mean \\|Δ log p\\| | staleness |", "|---|---|---|---|"]
    lines += [f"| {s} | {kl.get(s, float('nan')):.4g} | {diff.get(s, float('nan')):.4g} | {stale.get(s, 0):.0f} |"
              for s in sorted(flagged)[:shown]]
    if len(flagged) > shown:
        lines.append(f"\n… and {len(flagged) - shown} more (MLflow: rollout/mismatch_warning)")
    return lines


# A stage's held-out numbers the console's summary line shows, by prefix (the artifact has them all).
CONSOLE_METRICS = ("pass@1", "cons@", "format", "pairwise_accuracy", "examples")


@task(name="publish-stage-summary", cache_policy=NO_CACHE, **IDEMPOTENT)
def publish_stage_summary(cfg: PipelineConfig, stage: str, mlflow_run_id: str, metrics: dict[str, float],
                          output: str, registered: str | None = None, seconds: float | None = None) -> None:
    """What the stage did, its key numbers and a link to its MLflow run, as a Prefect markdown
    artifact on the flow run (the operator's view in the Prefect UI)."""
    run = tracking.client_for(cfg.runtime).get_run(mlflow_run_id)
    lines = [f"## {stage} ({cfg.resolved_run_name()})", "", run.data.tags.get("mlflow.note.content", ""), "",
             f"- MLflow run: [{run.info.run_name} {mlflow_run_id[:8]}]({tracking.run_url(cfg.runtime, mlflow_run_id)})",
             f"- output: `{output}`"]
    if registered:
        lines.append(f"- registered: `{registered}`")
    if seconds is not None:
        lines.append(f"- took {seconds:.0f} s")
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    lines += mismatch_lines(tracking.client_for(cfg.runtime), mlflow_run_id, cfg.rollout.mismatch_warn_kl)
    shown = {k: v for k, v in metrics.items() if k.startswith(CONSOLE_METRICS) and "/" not in k
             and isinstance(v, (int, float))}  # the per-task breakdowns stay in the artifact
    console.say(f"done {stage}" + (f" in {seconds:.0f} s" if seconds is not None else "")
                + "".join(f"{', ' if i else ': '}{k} {v:.3g}" for i, (k, v) in enumerate(shown.items()))
                + (f"; registered {registered}" if registered else ""))
    create_markdown_artifact("\n".join(lines), key=artifact_key(stage),
                             description=f"{stage}: summary of {cfg.resolved_run_name()}")
