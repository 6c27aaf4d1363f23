"""What a Ray Train job of a stage is told: one typed job per kind of stage.

The task resolves the stage's config section once and sends the workers only that section (the
`recipe`), its `compute`, the paths of its model and data, and the tracking ids; each worker
loop validates its own job type (`tasks.ray_jobs`), never the whole pipeline config.
"""
from __future__ import annotations

from r1core.config import (
    CodeRewardConfig,
    EvalConfig,
    GeneralRLConfig,
    GRPOConfig,
    ModelConfig,
    PretrainConfig,
    RewardModelConfig,
    RolloutConfig,
    SFTConfig,
    TrainComputeConfig,
)
from r1core.schema import Strict


class HeldoutEvaluation(Strict):
    """The held-out evaluation rank 0 runs on the job's written model before the job ends
    (`eval.in_training_job`); the stage reads it back instead of starting a Ray task."""

    heldout_file: str  # the held-out rows (jsonl)
    eval: EvalConfig
    code: CodeRewardConfig  # the sandbox limits, for code rows
    batch_size: int  # rollout.batch_size: sequences sampled at once
    output_dir: str  # where its metrics and per-prompt scores are written (atomically)


class TrainJob(Strict):
    """What every training job carries."""

    stage: str  # the stage (or sub-stage) it trains, e.g. r1_zero, distill/small/sft
    tracking_uri: str  # the MLflow tracking URI the workers log to
    run_id: str  # the stage's MLflow run
    tracking_outage_s: float  # runtime.tracking_outage_s: how long logging may buffer through an outage
    checkpoint_dir: str  # where rank 0 writes step checkpoints
    output_dir: str  # where rank 0 writes the final HF model directory
    compute: TrainComputeConfig  # workers, sharding and memory
    seed: int  # runtime.seed: data order, sampling and initialisation
    evaluation: HeldoutEvaluation | None = None  # the written model's held-out evaluation, in the job


class PretrainJob(TrainJob):
    recipe: PretrainConfig
    model: ModelConfig  # the architecture built from scratch
    prepared_dir: str  # the tokenizer and packed blocks (`prepared_corpus`)


class FineTuneJob(TrainJob):
    """A job that trains an existing model (`init_model`, an HF directory) on `train_file`: SFT
    examples, preference pairs or prompts (a rows file or a parquet directory)."""

    init_model: str
    train_file: str


class SFTJob(FineTuneJob):
    recipe: SFTConfig


class RewardModelJob(FineTuneJob):
    recipe: RewardModelConfig
    reward_model: str  # helpfulness or harmlessness
    heldout_file: str  # preference pairs for the held-out pairwise accuracy (jsonl)


class GRPOJob(FineTuneJob):
    """The policy and its frozen reference both start from `init_model`."""

    recipe: GRPOConfig
    rollout: RolloutConfig  # how rollouts are generated (the stage's overrides applied)
    code: CodeRewardConfig  # the sandbox limits of code rewards


class GeneralRLJob(GRPOJob):
    recipe: GeneralRLConfig
    reward_models: dict[str, str]  # reward model -> its HF directory (scores the general prompts)
    languages: dict[str, float]  # data.languages: the languages of the synthesised general prompts
