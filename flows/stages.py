"""One Prefect flow per R1 stage. Each can run alone (`r1 run stage NAME`) or as a subflow of
`r1_pipeline`; its parameters are the typed pipeline config, shown as a form in the Prefect UI.
A model a stage starts from defaults to the one this configuration's earlier stage produced."""
from __future__ import annotations

import time

from prefect import flow

from flows.review import review_examples
from r1core.config import DEFAULT_CONFIG, PipelineConfig
from tasks import cold_start
from tasks.stages import (
    DataPaths,
    StageResult,
    cold_start_sft,
    evaluate_stage,
    grpo,
    prepare_data,
    pretrain_base,
    register,
    save_result,
    stage_run,
    use_pretrained_base,
)


def _model_of(config: PipelineConfig, stage: str) -> str:
    return str(config.run_dir() / stage / "model")


def _evaluate_and_register(config: PipelineConfig, result: StageResult, data: DataPaths,
                           register_model: bool = True) -> StageResult:
    if result.skipped and (result.registered or result.metrics):  # done in an earlier run of this config
        return result
    metrics = evaluate_stage(config, result, data.heldout_file)
    registered = register(config, result, metrics) if register_model else None
    final = result.model_copy(update={"metrics": metrics, "registered": registered})
    save_result(config, final)
    return final


@flow(name="pretrain_base", log_prints=True)
def pretrain_base_flow(config: PipelineConfig = DEFAULT_CONFIG, parent_run_id: str | None = None,
                       data: DataPaths | None = None) -> StageResult:
    """Stage 0: pretrain the tiny base model (or take `model.pretrained_path`), evaluate, register."""
    data = data or prepare_data(config)
    if not config.pretrain.enabled:
        result = use_pretrained_base(config, parent_run_id)
    else:
        result = pretrain_base(config, data, parent_run_id)
    return _evaluate_and_register(config, result, data)


@flow(name="r1_zero", log_prints=True)
def r1_zero_flow(config: PipelineConfig = DEFAULT_CONFIG, base_model_dir: str | None = None,
                 parent_run_id: str | None = None, data: DataPaths | None = None,
                 register_model: bool = True) -> StageResult:
    """Stage 1 (R1-Zero): GRPO from the base with accuracy and format rewards, evaluate, register."""
    data = data or prepare_data(config)
    result = grpo(config, "r1_zero", base_model_dir or _model_of(config, "pretrain_base"), data, parent_run_id)
    return _evaluate_and_register(config, result, data, register_model)


@flow(name="cold_start_data", log_prints=True)
def cold_start_data_flow(config: PipelineConfig = DEFAULT_CONFIG, base_model_dir: str | None = None,
                         r1_zero_model_dir: str | None = None, parent_run_id: str | None = None,
                         data: DataPaths | None = None) -> cold_start.ColdStartData:
    """Stage 2: cold-start data by few-shot prompting, direct prompting and rewritten R1-Zero
    outputs; verified, filtered, optionally reviewed by a person in the Prefect UI."""
    if (done := cold_start.finished(config)) is not None:
        return done
    data = data or prepare_data(config)
    models = {"base": base_model_dir or _model_of(config, "pretrain_base"),
              "r1_zero": r1_zero_model_dir or _model_of(config, "r1_zero")}
    started = time.time()
    with stage_run(config, cold_start.STAGE, parent_run_id,
                   "Stage 2: cold-start data (few-shot, direct prompting, rewritten R1-Zero outputs).") as run_id:
        candidates = cold_start.build_candidates(config, data, models, run_id)
        decisions = []
        if config.cold_start.review.enabled:
            decisions = review_examples(cold_start.selected(config, candidates), config.cold_start.review,
                                        seed=config.runtime.seed)
        return cold_start.write_dataset(config, candidates, decisions, run_id, started)


@flow(name="cold_start_sft", log_prints=True)
def cold_start_sft_flow(config: PipelineConfig = DEFAULT_CONFIG, base_model_dir: str | None = None,
                        dataset_file: str | None = None, parent_run_id: str | None = None,
                        data: DataPaths | None = None, register_model: bool = True) -> StageResult:
    """Stage 3: SFT of the base on the cold-start data into the interim reasoning model."""
    data = data or prepare_data(config)
    dataset_file = dataset_file or str(cold_start.stage_dir(config) / "dataset" / "train.jsonl")
    result = cold_start_sft(config, base_model_dir or _model_of(config, "pretrain_base"), dataset_file,
                            parent_run_id)
    return _evaluate_and_register(config, result, data, register_model)


@flow(name="reasoning_rl", log_prints=True)
def reasoning_rl_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model_dir: str | None = None,
                      parent_run_id: str | None = None, data: DataPaths | None = None,
                      register_model: bool = True) -> StageResult:
    """Stage 4: reasoning-oriented GRPO from the cold-start model, with language consistency."""
    data = data or prepare_data(config)
    result = grpo(config, "reasoning_rl", init_model_dir or _model_of(config, "cold_start_sft"), data,
                  parent_run_id)
    return _evaluate_and_register(config, result, data, register_model)


STAGE_FLOWS = {"pretrain_base": pretrain_base_flow, "r1_zero": r1_zero_flow,
               "cold_start_data": cold_start_data_flow, "cold_start_sft": cold_start_sft_flow,
               "reasoning_rl": reasoning_rl_flow}
