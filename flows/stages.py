"""One Prefect flow per R1 stage. Each can run alone (`r1 run stage NAME`) or as a subflow of
`r1_pipeline`; its parameters are the typed pipeline config, shown as a form in the Prefect UI.
A model a stage starts from defaults to the one this configuration's earlier stage produced."""
from __future__ import annotations

import time

from prefect import flow

from flows.review import review_examples
from r1core.config import DEFAULT_CONFIG, PipelineConfig
from tasks import cold_start, rejection_sampling
from tasks.evaluate import resolve_model
from tasks.promotion import promote
from tasks.report import publish_stage_summary
from tasks.stages import (
    DataPaths,
    StageResult,
    evaluate_stage,
    grpo,
    prepare_data,
    pretrain,
    register,
    reward_model,
    save_result,
    sft,
    stage_run,
    use_pretrained_base,
)


def _model_of(config: PipelineConfig, stage: str) -> str:
    return str(config.run_dir() / stage / "model")


def _evaluate_and_register(config: PipelineConfig, result: StageResult, data: DataPaths,
                           register_model: bool = True) -> StageResult:
    if result.skipped and (result.registered or result.metrics):  # done in an earlier run of this config
        return result
    metrics, per_prompt = evaluate_stage(config, result, data.heldout_file)
    registered = register(config, result, metrics) if register_model else None
    final = result.model_copy(update={"metrics": metrics, "per_prompt": per_prompt, "registered": registered})
    save_result(config, final)
    _publish(config, final)
    return final


def _publish(config: PipelineConfig, result: StageResult) -> None:
    publish_stage_summary(config, result.stage, result.mlflow_run_id, result.metrics, result.model_dir,
                          result.registered, result.seconds)


@flow(name="pretrain_base", log_prints=True)
def pretrain_base_flow(config: PipelineConfig = DEFAULT_CONFIG, parent_run_id: str | None = None,
                       data: DataPaths | None = None) -> StageResult:
    """Stage 0: pretrain the tiny base model (or take `model.pretrained_path`), evaluate, register."""
    data = data or prepare_data(config)
    if not config.pretrain.enabled:
        result = use_pretrained_base(config, parent_run_id)
    else:
        result = pretrain(config, data, parent_run_id)
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
        written = cold_start.write_dataset(config, candidates, decisions, run_id, started)
    publish_stage_summary(config, cold_start.STAGE, written.mlflow_run_id, written.metrics, written.dataset_file,
                          seconds=time.time() - started)
    return written


@flow(name="cold_start_sft", log_prints=True)
def cold_start_sft_flow(config: PipelineConfig = DEFAULT_CONFIG, base_model_dir: str | None = None,
                        dataset_file: str | None = None, parent_run_id: str | None = None,
                        data: DataPaths | None = None, register_model: bool = True) -> StageResult:
    """Stage 3: SFT of the base on the cold-start data into the interim reasoning model."""
    data = data or prepare_data(config)
    dataset_file = dataset_file or str(cold_start.stage_dir(config) / "dataset" / "train.jsonl")
    result = sft(config, "cold_start_sft", base_model_dir or _model_of(config, "pretrain_base"), dataset_file,
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


@flow(name="rejection_sampling", log_prints=True)
def rejection_sampling_flow(config: PipelineConfig = DEFAULT_CONFIG, model_dir: str | None = None,
                            base_model_dir: str | None = None, producer: str | None = None,
                            parent_run_id: str | None = None,
                            data: DataPaths | None = None) -> rejection_sampling.RejectionSamplingData:
    """Stage 5: k samples per prompt from the reasoning-RL checkpoint, verified (rules, else the
    model judge), filtered, deduplicated, decontaminated, with non-reasoning data, to quotas."""
    if (done := rejection_sampling.finished(config)) is not None:
        return done
    data = data or prepare_data(config)
    model_dir = model_dir or _model_of(config, "reasoning_rl")
    judge = config.rejection_sampling.judge
    judge_dir = None
    if judge.kind == "local":
        judge_dir = (base_model_dir or _model_of(config, "pretrain_base")) if judge.model == "base" \
            else resolve_model(judge.model, config)
    started = time.time()
    with stage_run(config, rejection_sampling.STAGE, parent_run_id,
                   "Stage 5: rejection sampling from the reasoning-RL checkpoint, plus non-reasoning data.") as run_id:
        prompts = rejection_sampling.read_prompts(config, data)
        samples = rejection_sampling.generate(config, prompts, model_dir, run_id)
        rows, files, judge_metrics = rejection_sampling.check(config, samples, data, model_dir, judge_dir)
        written = rejection_sampling.write_dataset(config, rows, files, judge_metrics, run_id, started,
                                                   {"model_dir": model_dir, "model": producer or model_dir})
    publish_stage_summary(config, rejection_sampling.STAGE, written.mlflow_run_id, written.metrics,
                          written.dataset_dir, seconds=time.time() - started)
    return written


@flow(name="sft", log_prints=True)
def sft_flow(config: PipelineConfig = DEFAULT_CONFIG, base_model_dir: str | None = None,
             dataset_dir: str | None = None, parent_run_id: str | None = None,
             data: DataPaths | None = None, register_model: bool = True) -> StageResult:
    """Stage 6: SFT of the base on the rejection-sampled set (2 epochs in the paper)."""
    data = data or prepare_data(config)
    dataset_dir = dataset_dir or str(rejection_sampling.stage_dir(config) / "dataset")
    result = sft(config, "sft", base_model_dir or _model_of(config, "pretrain_base"), dataset_dir, parent_run_id)
    return _evaluate_and_register(config, result, data, register_model)


@flow(name="reward_models", log_prints=True)
def reward_models_flow(config: PipelineConfig = DEFAULT_CONFIG, base_model_dir: str | None = None,
                       parent_run_id: str | None = None, data: DataPaths | None = None) -> dict[str, StageResult]:
    """Stage 7: the helpfulness and harmlessness reward models, trained at the same time (one
    Ray Train job each), registered as r1-rm-helpful and r1-rm-harmless."""
    from r1core.reward_model import REWARD_MODELS

    data = data or prepare_data(config)
    base = base_model_dir or _model_of(config, "pretrain_base")
    futures = {m: reward_model.submit(config, m, base, data, parent_run_id) for m in REWARD_MODELS}
    results = {}
    for m, future in futures.items():
        result = future.result()
        if not (result.skipped and result.registered):
            result = result.model_copy(update={"registered": register(config, result, result.metrics)})
            save_result(config, result)
            _publish(config, result)
        results[m] = result
    return results


@flow(name="general_rl", log_prints=True)
def general_rl_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model_dir: str | None = None,
                    reward_model_dirs: dict[str, str] | None = None, parent_run_id: str | None = None,
                    data: DataPaths | None = None, register_model: bool = True) -> StageResult:
    """Stage 8: GRPO over all scenarios from the SFT model (rules for reasoning prompts, reward
    models for general ones); registered as `r1`, then the promotion gate decides `champion`."""
    data = data or prepare_data(config)
    reward_model_dirs = reward_model_dirs or {m: _model_of(config, f"reward_models/{m}")
                                              for m in config.general_rl.model_rewards}
    result = grpo(config, "general_rl", init_model_dir or _model_of(config, "sft"), data, parent_run_id,
                  reward_model_dirs=reward_model_dirs)
    final = _evaluate_and_register(config, result, data, register_model)
    if register_model and not result.skipped:
        promote(config, final.registered, final.mlflow_run_id, final.metrics)
    return final


@flow(name="distill", log_prints=True)
def distill_flow(config: PipelineConfig = DEFAULT_CONFIG, dataset_dir: str | None = None,
                 parent_run_id: str | None = None, data: DataPaths | None = None) -> dict[str, StageResult]:
    """Stage 9: each smaller student gets its own pretrained base (or `model.pretrained_path`),
    then SFT on the stage-6 set, no RL (r1-distill-<name>); for the paper's comparison, the same
    student by R1-Zero-style RL alone from its base (r1-rl-only-<name>)."""
    data = data or prepare_data(config)
    dataset_dir = dataset_dir or str(rejection_sampling.stage_dir(config) / "dataset")
    results = {}
    for student in config.distill.students:
        stage = f"distill/{student.name}"
        if student.model.pretrained_path:
            base = StageResult(stage=f"{stage}/base", model_dir=student.model.pretrained_path, mlflow_run_id="",
                               seconds=0.0)
        else:
            base = _evaluate_and_register(config, pretrain(config, data, parent_run_id, f"{stage}/base", student), data)
            results[f"{stage}/base"] = base
        distilled = sft(config, f"{stage}/sft", base.model_dir, dataset_dir, parent_run_id, section="distill.sft")
        results[f"{stage}/sft"] = _evaluate_and_register(config, distilled, data)
        if config.distill.rl_only:
            rl = grpo(config, f"{stage}/rl_only", base.model_dir, data, parent_run_id, section="distill.rl")
            results[f"{stage}/rl_only"] = _evaluate_and_register(config, rl, data)
    return results


STAGE_FLOWS = {"pretrain_base": pretrain_base_flow, "r1_zero": r1_zero_flow,
               "cold_start_data": cold_start_data_flow, "cold_start_sft": cold_start_sft_flow,
               "reasoning_rl": reasoning_rl_flow, "rejection_sampling": rejection_sampling_flow,
               "sft": sft_flow, "reward_models": reward_models_flow, "general_rl": general_rl_flow,
               "distill": distill_flow}
