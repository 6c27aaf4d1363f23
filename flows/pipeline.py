"""`r1_pipeline`: the DeepSeek-R1 recipe as one Prefect flow, stage after stage.

    synthetic tasks ─► pretrain_base ─► r1_zero (GRPO, rule rewards)
                          │                │
                          ▼                ▼
                       cold_start_data (few-shot, direct, rewritten R1-Zero; verified,
                          │             filtered, optionally reviewed in the Prefect UI)
                          ▼
      base ─────────► cold_start_sft ─► reasoning_rl (GRPO + language consistency)
                                              │
                                              ▼
                       rejection_sampling (k samples per prompt; verified by rules or the
                          │                 model judge; filtered, deduplicated, decontaminated;
                          │                 plus non-reasoning data, to quotas)
                          ▼
      base ─────────► sft (2 epochs on the combined set) ──────────────┐
                                                                      ▼
      base ─────────► reward_models (helpfulness, harmlessness) ─► general_rl (rules for reasoning,
                                                                      │     reward models for the rest)
                                                                      ▼
                                                               r1 (champion / challenger)
      student bases ─► distill (SFT on the stage-6 set, no RL)
                   └─► the same students by RL alone (the paper's comparison)

Every model stage is evaluated on held-out prompts and registered with its lineage (r1-base,
r1-zero, r1-cold-start, r1-reasoning-rl, r1-sft, r1-rm-helpful, r1-rm-harmless, r1,
r1-distill-<student>, ...); the end compares them all. One MLflow parent run per pipeline run;
each stage is a nested run.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from flows.catalog import label_flow_run, reconcile_stale_runs
from flows.plan import check as check_memory_plan
from flows.stage_flows import (
    cold_start_data_flow,
    cold_start_sft_flow,
    distill_flow,
    general_rl_flow,
    pretrain_base_flow,
    r1_zero_flow,
    reasoning_rl_flow,
    rejection_sampling_flow,
    reward_models_flow,
    sft_flow,
)
from r1core.config import DEFAULT_CONFIG, PipelineConfig
from tasks import lifecycle, tracking
from tasks.lifecycle import workdir_lock
from tasks.report import compare_models
from tasks.training_stages import StageResult, prepare_data


@flow(name="r1_pipeline", log_prints=True)
def r1_pipeline(config: PipelineConfig = DEFAULT_CONFIG) -> dict[str, StageResult]:
    """Run the R1 recipe end to end on one profile; returns each stage's result."""
    label_flow_run(config, "pipeline")
    with workdir_lock(config.runtime.workdir, "r1_pipeline"):
        return _pipeline(config)


def _pipeline(config: PipelineConfig) -> dict[str, StageResult]:
    logger = get_run_logger()
    check_memory_plan(config)  # a job that cannot fit fails here, before any stage runs
    reconcile_stale_runs(config)
    parent = tracking.start_run(
        config.runtime, f"r1_pipeline/{config.resolved_run_name()}",
        params=config.model_dump(mode="json", exclude={"runtime"}),
        tags={"profile": config.profile, "run_name": config.resolved_run_name(), "stage": "pipeline",
              "config_digest": config.digest()},
        description="DeepSeek-R1 recipe: base model, R1-Zero, cold start, reasoning-oriented RL, rejection "
                    "sampling, SFT, reward models, general RL, distillation; the comparison of every model is "
                    "in the artifacts (comparison/).",
        continue_run=True,
    )
    status = "FAILED"
    try:
        data = prepare_data(config)
        base = pretrain_base_flow(config, parent_run_id=parent, data=data)
        zero = r1_zero_flow(config, init_model=base.model_dir, parent_run_id=parent, data=data)
        cold = cold_start_data_flow(config, init_model=base.model_dir, r1_zero_model=zero.model_dir,
                                    parent_run_id=parent, data=data)
        interim = cold_start_sft_flow(config, init_model=base.model_dir, dataset=cold.dataset,
                                      parent_run_id=parent, data=data)
        reasoning = reasoning_rl_flow(config, init_model=interim.model_dir, parent_run_id=parent, data=data)
        sampled = rejection_sampling_flow(config, init_model=reasoning.model_dir, judge_base_model=base.model_dir,
                                          producer=reasoning.registered, parent_run_id=parent, data=data)
        final_sft = sft_flow(config, init_model=base.model_dir, dataset=sampled.dataset,
                             parent_run_id=parent, data=data)
        reward_models = reward_models_flow(config, init_model=base.model_dir, parent_run_id=parent, data=data)
        final = general_rl_flow(config, init_model=final_sft.model_dir,
                                reward_model_dirs={m: r.model_dir for m, r in reward_models.items()},
                                parent_run_id=parent, data=data)
        students = distill_flow(config, dataset=sampled.dataset, parent_run_id=parent, data=data)
        results = {"pretrain_base": base, "r1_zero": zero, "cold_start_sft": interim, "reasoning_rl": reasoning,
                   "sft": final_sft, **{f"reward_models/{m}": r for m, r in reward_models.items()},
                   "general_rl": final, **students}
        compare_models(config, results, parent)
        client = tracking.client_for(config.runtime)
        for name, data_stage in (("cold_start_data", cold), ("rejection_sampling", sampled)):
            tracking.log_metrics(client, parent, {f"{name}/{k}": v for k, v in data_stage.metrics.items()})
        for name, r in results.items():
            tracking.log_metrics(client, parent, {f"{name}/{k}": v for k, v in r.metrics.items()})
        status = "FINISHED"
        logger.info("pipeline done: %s", {n: r.metrics.get("pass@1") for n, r in results.items()})
        return results
    except BaseException as e:
        status = lifecycle.ending_status(e)
        raise
    finally:
        tracking.end_run(config.runtime, parent, status)
