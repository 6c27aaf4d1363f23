"""One Prefect flow per R1 stage. Each can run alone (`r1 run stage NAME`) or as a subflow of
`r1_pipeline`; its parameters are the typed pipeline config, shown as a form in the Prefect UI."""
from __future__ import annotations

from prefect import flow

from r1core.config import DEFAULT_CONFIG, PipelineConfig
from tasks.stages import (
    DataPaths,
    StageResult,
    evaluate_stage,
    prepare_data,
    pretrain_base,
    r1_zero,
    register,
    save_result,
    use_pretrained_base,
)


def _evaluate_and_register(config: PipelineConfig, result: StageResult, data: DataPaths) -> StageResult:
    if result.skipped and result.registered:  # done in an earlier run of this config
        return result
    metrics = evaluate_stage(config, result, data.heldout_file)
    registered = register(config, result, metrics)
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
                 parent_run_id: str | None = None, data: DataPaths | None = None) -> StageResult:
    """Stage 1 (R1-Zero): GRPO from the base with accuracy and format rewards, evaluate, register."""
    data = data or prepare_data(config)
    if base_model_dir is None:
        base_model_dir = str(config.run_dir() / "pretrain_base" / "model")
    result = r1_zero(config, base_model_dir, data, parent_run_id)
    return _evaluate_and_register(config, result, data)


STAGE_FLOWS = {"pretrain_base": pretrain_base_flow, "r1_zero": r1_zero_flow}
