"""One Prefect flow per R1 stage of the catalog (`flows.catalog`). Each can run alone
(`r1 run stage NAME`) or as a subflow of `r1_pipeline`; its parameters are the typed pipeline
config (a form in the Prefect UI) and the model it starts from, `init_model`, which defaults to
the one this configuration's earlier stage produced (`Stage.starts_from`). The flows are grouped
by kind (pretraining, GRPO, SFT, data, reward models, distillation); the catalog and
`r1_pipeline` give the recipe's order."""
from __future__ import annotations

import time

from flows.catalog import model_dir, registered_name, stage, stage_flow
from flows.review import review_examples
from r1core.config import DEFAULT_CONFIG, PipelineConfig
from tasks import cold_start, rejection_sampling
from tasks.evaluate import resolve_model
from tasks.promotion import promote
from tasks.report import publish_stage_summary
from tasks.training_stages import (
    DataPaths,
    DatasetResult,
    StageCache,
    StageResult,
    evaluate_stage,
    grpo,
    pretrain,
    register,
    reward_model,
    sft,
    stage_run,
    train_student,
    use_pretrained_base,
)


def evaluate_and_register(config: PipelineConfig, result: StageResult, data: DataPaths,
                          register_model: bool = True) -> StageResult:
    """Held-out evaluation of a stage's model, its registration (under the catalog's name) and
    its summary in the Prefect UI; a stage done in an earlier run of this config is returned."""
    if result.skipped and (result.registered or result.metrics):
        return result
    metrics, per_prompt = evaluate_stage(config, result, data.heldout_file)
    registered = register(config, result, metrics, registered_name(result.stage)) if register_model else None
    return record(config, result.model_copy(update={"metrics": metrics, "per_prompt": per_prompt,
                                                     "registered": registered}))


def run_data_stage(config: PipelineConfig, name: str, parent_run_id: str | None, build) -> DatasetResult:
    """The shape both data stages share: the earlier dataset when it is complete; otherwise
    `build(run_id, started)` inside the stage's MLflow run, then its result saved and summarised."""
    cache = StageCache(config, name, output="dataset")
    if (done := cache.load(DatasetResult)) is not None:
        return done
    started = time.time()
    with stage_run(config, name, parent_run_id, stage(name).description) as run_id:
        written = build(run_id, started)
    cache.save(written)
    publish_stage_summary(config, name, written.mlflow_run_id, written.metrics, written.dataset,
                          seconds=time.time() - started)
    return written


def record(config: PipelineConfig, result: StageResult) -> StageResult:
    """A model stage's final result: saved next to its model (a re-run returns it) and
    summarised in the Prefect UI."""
    StageCache(config, result.stage).save(result)
    publish_stage_summary(config, result.stage, result.mlflow_run_id, result.metrics, result.model_dir,
                          result.registered, result.seconds)
    return result


@stage_flow("pretrain_base")
def pretrain_base_flow(config: PipelineConfig = DEFAULT_CONFIG, parent_run_id: str | None = None,
                       data: DataPaths | None = None) -> StageResult:
    if not config.pretrain.enabled:
        result = use_pretrained_base(config, "pretrain_base", parent_run_id)
    else:
        result = pretrain(config, data, "pretrain_base", stage("pretrain_base").description, parent_run_id)
    return evaluate_and_register(config, result, data)


def grpo_stage_flow(name: str):
    """The flow of a GRPO stage that needs nothing but its starting model (R1-Zero, reasoning RL):
    GRPO on the stage's config section, then evaluation and registration."""

    @stage_flow(name)
    def grpo_stage(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                   parent_run_id: str | None = None, data: DataPaths | None = None,
                   register_model: bool = True) -> StageResult:
        s = stage(name)
        result = grpo(config, s.name, s.section, s.description, init_model, data, parent_run_id)
        return evaluate_and_register(config, result, data, register_model)

    return grpo_stage


r1_zero_flow = grpo_stage_flow("r1_zero")
reasoning_rl_flow = grpo_stage_flow("reasoning_rl")


@stage_flow("general_rl")
def general_rl_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                    reward_model_dirs: dict[str, str] | None = None, parent_run_id: str | None = None,
                    data: DataPaths | None = None, register_model: bool = True) -> StageResult:
    reward_model_dirs = reward_model_dirs or {m: model_dir(config, f"reward_models/{m}")
                                              for m in config.general_rl.model_rewards}
    s = stage("general_rl")
    result = grpo(config, s.name, s.section, s.description, init_model, data, parent_run_id,
                  reward_model_dirs=reward_model_dirs)
    final = evaluate_and_register(config, result, data, register_model)
    if register_model and not result.skipped:
        promote(config, final.registered, final.mlflow_run_id, final.metrics)
    return final


def sft_stage_flow(name: str, default_dataset):
    """The flow of an SFT stage: SFT of `init_model` on `dataset` (default: `default_dataset(config)`,
    the output of the data stage before it), then evaluation and registration."""

    @stage_flow(name)
    def sft_stage(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                  dataset: str | None = None, parent_run_id: str | None = None,
                  data: DataPaths | None = None, register_model: bool = True) -> StageResult:
        s = stage(name)
        result = sft(config, s.name, s.section, s.description, init_model, dataset or str(default_dataset(config)),
                     parent_run_id, data.heldout_file)
        return evaluate_and_register(config, result, data, register_model)

    return sft_stage


cold_start_sft_flow = sft_stage_flow("cold_start_sft", cold_start.dataset_file)
sft_flow = sft_stage_flow("sft", rejection_sampling.dataset_dir)


@stage_flow("cold_start_data")
def cold_start_data_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                         r1_zero_model: str | None = None, parent_run_id: str | None = None,
                         data: DataPaths | None = None) -> DatasetResult:
    """`init_model` (the base) serves the few-shot and direct routes, `r1_zero_model` the rewrites."""
    models = {"base": init_model, "r1_zero": r1_zero_model or model_dir(config, "r1_zero")}

    def build(run_id: str, started: float) -> DatasetResult:
        candidates = cold_start.build_candidates(config, data, models, run_id)
        decisions = []
        if config.cold_start.review.enabled:
            decisions = review_examples(cold_start.selected(config, candidates), config.cold_start.review,
                                        seed=config.runtime.seed)
        return cold_start.write_dataset(config, candidates, decisions, run_id, started)

    return run_data_stage(config, cold_start.STAGE, parent_run_id, build)


@stage_flow("rejection_sampling")
def rejection_sampling_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                            judge_base_model: str | None = None, producer: str | None = None,
                            parent_run_id: str | None = None, data: DataPaths | None = None) -> DatasetResult:
    """Samples from `init_model` (the reasoning-RL model); a local judge set to 'base' is
    `judge_base_model` (default: this configuration's base)."""
    judge = config.rejection_sampling.judge
    judge_dir = None
    if judge.kind == "local":
        judge_dir = (judge_base_model or model_dir(config, "pretrain_base")) if judge.model == "base" \
            else resolve_model(judge.model, config)

    def build(run_id: str, started: float) -> DatasetResult:
        prompts = rejection_sampling.read_prompts(config, data)
        samples = rejection_sampling.generate(config, prompts, init_model, run_id)
        rows, files, judge_metrics = rejection_sampling.check(config, samples, data, init_model, judge_dir)
        return rejection_sampling.write_dataset(config, rows, files, judge_metrics, run_id, started,
                                                {"model_dir": init_model, "model": producer or init_model})

    return run_data_stage(config, rejection_sampling.STAGE, parent_run_id, build)


@stage_flow("reward_models")
def reward_models_flow(config: PipelineConfig = DEFAULT_CONFIG, init_model: str | None = None,
                       parent_run_id: str | None = None, data: DataPaths | None = None) -> dict[str, StageResult]:
    """Both reward models at once (one Ray Train job each), registered under the catalog's names."""
    from r1core.reward_model import REWARD_MODELS

    futures = {m: reward_model.submit(config, m, f"Stage 7: the {m} reward model (Bradley-Terry on preference "
                                      "pairs).", init_model, data, parent_run_id) for m in REWARD_MODELS}
    results = {}
    for m, future in futures.items():
        result = future.result()
        if not (result.skipped and result.registered):
            result = record(config, result.model_copy(update={"registered": register(
                config, result, result.metrics, registered_name(result.stage))}))
        results[m] = result
    return results


@stage_flow("distill")
def distill_flow(config: PipelineConfig = DEFAULT_CONFIG, dataset: str | None = None,
                 parent_run_id: str | None = None, data: DataPaths | None = None) -> dict[str, StageResult]:
    """Each student in one Ray Train job (`train_student`: its base, its SFT, its RL-only twin),
    then each model evaluated (in the job, as it was written) and registered, base first."""
    dataset = dataset or str(rejection_sampling.dataset_dir(config))
    results = {}
    for student in config.distill.students:
        for name, trained in train_student(config, student, dataset, data, parent_run_id).items():
            results[name] = evaluate_and_register(config, trained, data)
    return results
