"""`r1 plan`: every training job of a configuration, its per-worker memory estimate, and the check
that refuses a job that cannot fit before any worker starts (`r1core.memory_plan`)."""
from __future__ import annotations

from r1core.config import PipelineConfig
from r1core.memory_plan import Architecture, Plan, Workload, plan


class PlanError(RuntimeError):
    """A stage's estimated memory exceeds its `compute.memory_gb`."""


def _lm(kind: str, recipe) -> Workload:
    rows = recipe.batch_size * (2 if kind == "reward_model" else 1)
    return Workload(kind, rows, recipe.seq_len, 0 if kind == "reward_model" else recipe.seq_len - 1)


def _grpo(cfg: PipelineConfig, recipe) -> Workload:
    rollouts = recipe.prompts_per_step * recipe.group_size
    per_worker = -(-rollouts // recipe.compute.num_workers)
    new = recipe.sampling.max_new_tokens
    return Workload("grpo", rollouts, cfg.rollout.max_prompt_tokens + new, new,
                    generation_batch=min(cfg.rollout.batch_size, per_worker), completion_tokens=new,
                    reference=recipe.beta > 0)


def training_jobs(cfg: PipelineConfig) -> list[tuple[str, Architecture, Workload, object]]:
    """(stage, architecture, workload, compute) of every Ray Train job the pipeline runs."""
    from flows.catalog import CATALOG

    base = Architecture.from_model_config(cfg.model)
    jobs = []
    for entry in CATALOG.values():
        if entry.kind == "pretrain" and cfg.pretrain.enabled:
            jobs.append((entry.name, base, _lm("pretrain", cfg.pretrain), cfg.pretrain.compute))
        elif entry.kind in ("sft", "reward_model") and entry.name != "distill":
            recipe = cfg.section(entry.section)
            jobs.append((entry.name, base, _lm(entry.kind, recipe), recipe.compute))
        elif entry.kind == "grpo":
            recipe = cfg.section(entry.section)
            jobs.append((entry.name, base, _grpo(cfg, recipe), recipe.compute))
    for student in cfg.distill.students:
        arch = Architecture.from_model_config(student.model)
        name = f"distill/{student.name}"
        if not student.model.pretrained_path:
            jobs.append((f"{name}/base", arch, _lm("pretrain", cfg.pretrain), cfg.pretrain.compute))
        jobs.append((f"{name}/sft", arch, _lm("sft", cfg.distill.sft), cfg.distill.sft.compute))
        if cfg.distill.rl_only:
            jobs.append((f"{name}/rl_only", arch, _grpo(cfg, cfg.distill.rl), cfg.distill.rl.compute))
    return jobs


def grpo_rollouts(cfg: PipelineConfig, stages: list[str] | None = None) -> dict[str, object]:
    """stage -> its `RolloutConfig` (the stage's overrides applied), for every GRPO job in `stages`."""
    from flows.catalog import CATALOG

    sections = {e.name: cfg.section(e.section) for e in CATALOG.values() if e.kind == "grpo"}
    if cfg.distill.rl_only:
        sections["distill"] = cfg.distill.rl
    return {name: cfg.rollout.for_stage(recipe.rollout) for name, recipe in sections.items()
            if stages is None or name in stages}


def vllm_users(cfg: PipelineConfig, stages: list[str] | None = None) -> dict[str, list[str]]:
    """vLLM environment (its Python) -> the stages in `stages` that sample with it."""
    users: dict[str, list[str]] = {}
    for stage, rollout in grpo_rollouts(cfg, stages).items():
        if rollout.backend == "vllm":
            users.setdefault(rollout.vllm.python, []).append(stage)
    for stage, engine in (("cold_start_data", cfg.cold_start.engine), ("rejection_sampling", cfg.rejection_sampling.engine)):
        if engine == "vllm" and (stages is None or stage in stages):
            users.setdefault(cfg.rollout.vllm.python, []).append(stage)
    return users


def check_environments(cfg: PipelineConfig, stages: list[str] | None = None) -> None:
    """Raise `tasks.environments.EnvironmentMismatch` if a stage's vLLM environment is missing or
    differs from this one (before Prefect, Ray or any worker starts)."""
    from tasks.environments import check_vllm_environment

    for python in sorted(vllm_users(cfg, stages)):
        check_vllm_environment(python)


def plan_all(cfg: PipelineConfig, stages: list[str] | None = None, stage: str | None = None) -> list[Plan]:
    """The plans of the pipeline's jobs, of the jobs of `stages` (sub-stages included), or of the one
    job `stage` (a sub-stage's job is planned as its stage's: `reward_models/helpfulness`)."""
    def wanted(name: str) -> bool:
        if stage is not None:
            return name in (stage, stage.split("/")[0])
        return stages is None or name.split("/")[0] in stages

    return [plan(name, arch, work, compute) for name, arch, work, compute in training_jobs(cfg) if wanted(name)]


def check(cfg: PipelineConfig, stages: list[str] | None = None, stage: str | None = None) -> list[Plan]:
    """Raise `PlanError` naming every job whose estimate exceeds its budget; else the plans."""
    plans = plan_all(cfg, stages, stage)
    refused = [p.refusal() for p in plans if not p.fits()]
    if refused:
        raise PlanError("the memory plan does not fit:\n  " + "\n  ".join(refused) + "\n(`r1 plan` shows every term)")
    return plans
