"""The Prefect deployments an operator triggers from the UI (`r1 serve` serves them all):

    r1_pipeline/r1-pipeline           the whole recipe, stages 0-9
    <stage>/r1-stage-<stage>          one stage of the catalog (its earlier stages' outputs from the same run)
    retrain/r1-retrain                scheduled: general RL from the champion on new prompt files

A deployment runs its flow with the run form (`RunRequest`) in place of the whole pipeline
config: the profile chosen from those in configs/, the fields people change up front, any other
field as a validated setting; the served configuration's own settings (workdir, servers) are
the form's defaults. The flow's other parameters (a stage's `init_model`, ...) stay as they are."""
from __future__ import annotations

import inspect
import typing

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from flows.catalog import CATALOG, stage_flows
from flows.pipeline import r1_pipeline
from flows.retrain import retrain_flow
from r1core.config import CONFIG_DIR, DEFAULT_PROFILE, ConfigError, PipelineConfig, RunRequest

PIPELINE_DEPLOYMENT = "r1-pipeline"
RETRAIN_DEPLOYMENT = "r1-retrain"


def stage_deployment_name(stage: str) -> str:
    return f"r1-stage-{stage.replace('_', '-')}"


def from_run_form(target):
    """`target` as a deployment runs it: the same flow (its name, description, other parameters),
    with `config` replaced by `run: RunRequest`, resolved and checked when the run starts. Bound
    at this module's top level as `run_form_<flow name>` (`RUN_FORM_FLOWS`): a served run loads
    its flow by entrypoint, `flows/deployments.py:<that name>`."""
    signature = inspect.signature(target.fn, eval_str=True)
    hints = typing.get_type_hints(target.fn)
    form = inspect.Parameter("run", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=RunRequest(),
                             annotation=RunRequest)
    others = [p for name, p in signature.parameters.items() if name != "config"]

    def entry(run: RunRequest, **kwargs):
        from flows.preflight import check_inputs

        config = run.resolve()
        check_inputs(config)  # the files it names, before anything starts
        return target.fn(config=config, **kwargs)

    entry.__signature__ = signature.replace(parameters=[form, *others])
    entry.__annotations__ = {"run": RunRequest, **{k: v for k, v in hints.items() if k != "config"}}
    entry.__doc__ = target.fn.__doc__
    entry.__name__ = entry.__qualname__ = run_form_name(target)
    return flow(name=target.name, description=target.description, log_prints=True)(entry)


def run_form_name(target) -> str:
    return "run_form_" + "".join(c if c.isalnum() else "_" for c in target.name)


RUN_FORM_FLOWS: dict[str, object] = {}  # flow name -> its deployments' flow


def run_form_flow(target):
    """The deployments' flow of `target`, bound at this module's top level (see `from_run_form`)."""
    if target.name not in RUN_FORM_FLOWS:
        RUN_FORM_FLOWS[target.name] = globals()[run_form_name(target)] = from_run_form(target)
    return RUN_FORM_FLOWS[target.name]


for _target in (r1_pipeline, retrain_flow, *stage_flows().values()):  # what a served run's entrypoint names
    run_form_flow(_target)


def run_form_defaults(config_file: str | None, settings: list[str]) -> dict:
    """The form's defaults: the served profile and its settings (`r1 serve --config F --set ...`)."""
    from pathlib import Path

    path = Path(config_file).resolve() if config_file else DEFAULT_PROFILE
    if path.parent != CONFIG_DIR.resolve():
        raise ConfigError(f"r1 serve: the run form offers the profiles in {CONFIG_DIR}; '{path}' is not one of them "
                          "(copy it there)")
    # unset fields left out: the form shows them empty (a null would not validate as a number)
    return {"run": RunRequest(profile=path.stem, settings=settings).model_dump(mode="json", exclude_none=True)}


def deployments(cfg: PipelineConfig, config_file: str | None = None, settings: list[str] | None = None) -> list:
    """Runner deployments whose forms default to the profile `cfg` was loaded from (`config_file`,
    default tiny) with its `settings`."""
    config = run_form_defaults(config_file, settings or [])
    tags = ["r1", f"profile:{cfg.profile}"]
    out = [run_form_flow(r1_pipeline).to_deployment(
        name=PIPELINE_DEPLOYMENT, parameters=config, tags=[*tags, "pipeline"],
        description="The DeepSeek-R1 recipe end to end: base model, R1-Zero, cold start, reasoning RL, rejection "
                    "sampling, SFT, reward models, general RL (-> r1, gated to champion), distillation; every "
                    "model evaluated and registered in MLflow. Choose the profile in the form; fields left "
                    "empty take its values.")]
    for stage, stage_flow in stage_flows().items():
        out.append(run_form_flow(stage_flow).to_deployment(
            name=stage_deployment_name(stage), parameters=config, tags=[*tags, "stage", stage, CATALOG[stage].kind],
            description=f"Stage `{stage}` alone: {CATALOG[stage].description} Model inputs left empty "
                        "default to what this configuration's earlier stages produced."))
    out.append(run_form_flow(retrain_flow).to_deployment(
        name=RETRAIN_DEPLOYMENT, parameters=config, tags=[*tags, "retrain", *(["scheduled"] if cfg.retrain.cron else [])],
        schedule=Cron(cfg.retrain.cron, timezone=cfg.retrain.timezone) if cfg.retrain.cron else None,
        # one retrain at a time: a run due while another is still training is not started
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="Scheduled retraining: general RL from r1@champion on prompt files new in `retrain.data_dir` "
                    "since the last retrain; the promotion gate decides whether the result becomes champion. "
                    "Ends early when there is no new data. Schedule: `retrain.cron`."))
    return out


def serve(cfg: PipelineConfig, config_file: str | None = None, settings: list[str] | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs in this process's
    children until stopped (a `serve` process: the simplest Prefect worker)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(cfg, config_file, settings), print_starting_message=True)
