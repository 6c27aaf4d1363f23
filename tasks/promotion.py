"""The promotion gate of the final model: the `champion` alias moves only on evidence.

A new version of `r1` becomes `champion` when there is none yet, or when it beats the current
champion's held-out pass@1 and cons@k, each by `promotion.margin`; otherwise it is kept as
`challenger`. The decision and the numbers it was made on go to the new version's MLflow run
(metrics `gate/*`, tag `promotion`) and to the version's tags.
"""
from __future__ import annotations

from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from r1core.config import PipelineConfig
from tasks import tracking

CHAMPION, CHALLENGER = "champion", "challenger"


class GateDecision(BaseModel):
    promoted: bool
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float] | None = None
    champion_version: str | None = None


def decide(candidate: dict[str, float], champion: dict[str, float] | None, margin: float,
           metrics: tuple[str, ...]) -> GateDecision:
    """Promote when there is no champion, or when every gate metric improves by `margin`."""
    if champion is None:
        return GateDecision(promoted=True, reason="no champion yet", candidate=candidate)
    short = [m for m in metrics if candidate[m] < champion[m] + margin]
    if short:
        reason = "; ".join(f"{m} {candidate[m]:.4f} < champion {champion[m]:.4f} + margin {margin:g}" for m in short)
        return GateDecision(promoted=False, reason=reason, candidate=candidate, champion=champion)
    reason = ", ".join(f"{m} {candidate[m]:.4f} >= {champion[m]:.4f} + {margin:g}" for m in metrics)
    return GateDecision(promoted=True, reason=reason, candidate=candidate, champion=champion)


def gate_metrics(k: int) -> tuple[str, ...]:
    return ("pass@1", f"cons@{k}")


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promote(cfg: PipelineConfig, registered: str, run_id: str, metrics: dict[str, float]) -> GateDecision:
    """Apply the gate to the new version `registered` ("name/version") of the final model."""
    client = tracking.client_for(cfg.runtime)
    name, version = registered.split("/")
    wanted = gate_metrics(cfg.eval.k)
    champion, champion_version = None, None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion_version = str(current.version)
        run_metrics = client.get_run(current.run_id).data.metrics
        champion = {m: run_metrics[f"eval/{m.replace('@', '_at_')}"] for m in wanted}
    except MlflowException:  # no champion yet
        pass
    if champion_version == version:
        decision = GateDecision(promoted=True, reason="already champion", candidate=champion, champion=champion,
                                champion_version=champion_version)
    else:
        decision = decide({m: metrics[m] for m in wanted}, champion, cfg.promotion.margin, wanted)
        decision.champion_version = champion_version
        client.set_registered_model_alias(name, CHAMPION if decision.promoted else CHALLENGER, version)
    outcome = "promoted" if decision.promoted else "refused"
    tracking.log_metrics(client, run_id, {"gate/promoted": float(decision.promoted), "gate/margin": cfg.promotion.margin,
                                          **{f"gate/candidate/{m}": v for m, v in decision.candidate.items()},
                                          **{f"gate/champion/{m}": v for m, v in (decision.champion or {}).items()}})
    tracking.set_tags(client, run_id, {"promotion": outcome, "promotion_reason": decision.reason,
                                       "champion_before": champion_version or "none"})
    client.set_model_version_tag(name, version, "promotion", f"{outcome}: {decision.reason}")
    get_run_logger().info("promotion gate for %s: %s (%s)", registered, outcome, decision.reason)
    return decision
