"""The Prefect deployments an operator triggers from the UI (`r1 serve` serves them all):

    r1_pipeline/r1-pipeline           the whole recipe, stages 0-9
    <stage>/r1-stage-<stage>          one stage of the catalog (its earlier stages' outputs from the same run)
    retrain/r1-retrain                scheduled: general RL from the champion on new prompt files

Each deployment's parameter schema is its flow's signature, so the UI shows the pipeline
config (pydantic, with descriptions and the profile's values as defaults) as a form."""
from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.catalog import CATALOG, stage_flows
from flows.pipeline import r1_pipeline
from flows.retrain import retrain_flow
from r1core.config import PipelineConfig

PIPELINE_DEPLOYMENT = "r1-pipeline"
RETRAIN_DEPLOYMENT = "r1-retrain"


def stage_deployment_name(stage: str) -> str:
    return f"r1-stage-{stage.replace('_', '-')}"


def deployments(cfg: PipelineConfig) -> list:
    """Runner deployments with `cfg` as every form's defaults."""
    config = {"config": cfg.model_dump(mode="json")}
    tags = ["r1", f"profile:{cfg.profile}"]
    out = [r1_pipeline.to_deployment(
        name=PIPELINE_DEPLOYMENT, parameters=config, tags=[*tags, "pipeline"],
        description="The DeepSeek-R1 recipe end to end: base model, R1-Zero, cold start, reasoning RL, rejection "
                    "sampling, SFT, reward models, general RL (-> r1, gated to champion), distillation; every "
                    "model evaluated and registered in MLflow. Edit `config` to change the profile.")]
    for stage, stage_flow in stage_flows().items():
        out.append(stage_flow.to_deployment(
            name=stage_deployment_name(stage), parameters=config, tags=[*tags, "stage", stage, CATALOG[stage].kind],
            description=f"Stage `{stage}` alone: {CATALOG[stage].description} Model inputs left empty "
                        "default to what this configuration's earlier stages produced."))
    out.append(retrain_flow.to_deployment(
        name=RETRAIN_DEPLOYMENT, parameters=config, tags=[*tags, "retrain", "scheduled"],
        schedule=Cron(cfg.retrain.cron, timezone=cfg.retrain.timezone) if cfg.retrain.cron else None,
        # one retrain at a time: a run due while another is still training is not started
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="Scheduled retraining: general RL from r1@champion on prompt files new in `retrain.data_dir` "
                    "since the last retrain; the promotion gate decides whether the result becomes champion. "
                    "Ends early when there is no new data. Schedule: `retrain.cron`."))
    return out


def serve(cfg: PipelineConfig) -> None:
    """Register the deployments with the Prefect API and run their flow runs in this process's
    children until stopped (a `serve` process: the simplest Prefect worker)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cfg), print_starting_message=True)
