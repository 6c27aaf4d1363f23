"""The stage catalog: one declaration per stage of the recipe.

The CLI (`r1 run stage NAME`, `r1 stages`), the deployments (`r1-stage-<name>`), the Prefect UI
descriptions, the MLflow run descriptions, the registry names and the default starting models
all derive from these entries. Adding a stage is: its recipe in `r1core`, one `declare(Stage(...))`
here (or in any module imported before the CLI runs), and its flow under `@stage_flow(name)`.

A stage's outputs live in `<run_dir>/<name>/`; its model, for the stages that train one, in
`<run_dir>/<name>/model/`. Sub-stages (a reward model of `reward_models`, a student of `distill`)
are named `<name>/<part>` or `<name>/<student>/<part>`.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from r1core.config import PipelineConfig

Kind = Literal["data", "pretrain", "sft", "grpo", "reward_model", "eval"]


@dataclass(frozen=True)
class Stage:
    name: str  # the flow's name, `r1 run stage NAME`, the folder under the run directory
    kind: Kind  # what it does: makes data, pretrains, fine-tunes, runs GRPO, trains reward models, evaluates
    section: str  # its config section, a dotted path of `PipelineConfig` (`PipelineConfig.section`)
    description: str  # shown in the Prefect UI (flow, deployment), on its MLflow run and by `r1 stages`
    starts_from: str | None = None  # the stage whose model it starts (or samples) from by default
    # the registry name of its model; for sub-stages, part -> name (`{student}` is filled in)
    registers: str | dict[str, str] | None = None

    def registered_name(self, substage: str | None = None) -> str:
        """The registry name of this stage's model, or of a sub-stage's (`reward_models/helpfulness`,
        `distill/small/sft`)."""
        if self.registers is None:
            raise KeyError(f"stage {self.name} registers no model")
        if isinstance(self.registers, str):
            return self.registers
        parts = (substage or "").split("/")
        return self.registers[parts[-1]].format(student=parts[1] if len(parts) == 3 else "")


CATALOG: dict[str, Stage] = {}
_FLOWS: dict[str, object] = {}


def declare(stage: Stage) -> Stage:
    if stage.name in CATALOG and CATALOG[stage.name] != stage:
        raise ValueError(f"stage {stage.name} is declared twice, differently")
    CATALOG[stage.name] = stage
    return stage


for _stage in (
    Stage("pretrain_base", "pretrain", "pretrain",
          "Stage 0: next-token pretraining of the tiny base model on a synthetic corpus (or the local model of "
          "`model.pretrained_path`).", registers="r1-base"),
    Stage("r1_zero", "grpo", "r1_zero",
          "Stage 1 (R1-Zero): GRPO from the base model with rule rewards only (accuracy, format), no SFT.",
          starts_from="pretrain_base", registers="r1-zero"),
    Stage("cold_start_data", "data", "cold_start",
          "Stage 2: cold-start data by few-shot prompting, direct prompting and rewritten R1-Zero outputs; "
          "verified, filtered, optionally reviewed by a person in the Prefect UI.",
          starts_from="pretrain_base"),
    Stage("cold_start_sft", "sft", "cold_start_sft",
          "Stage 3: SFT of the base on the cold-start data (loss on responses, packed).",
          starts_from="pretrain_base", registers="r1-cold-start"),
    Stage("reasoning_rl", "grpo", "reasoning_rl",
          "Stage 4: reasoning-oriented GRPO from the cold-start model; accuracy, readable-format and "
          "language-consistency rewards.", starts_from="cold_start_sft", registers="r1-reasoning-rl"),
    Stage("rejection_sampling", "data", "rejection_sampling",
          "Stage 5: k samples per prompt from the reasoning-RL checkpoint, verified (rules, else the model judge), "
          "filtered, deduplicated, decontaminated, with non-reasoning data, to quotas.",
          starts_from="reasoning_rl"),
    Stage("sft", "sft", "sft",
          "Stage 6: SFT of the base on the rejection-sampled reasoning and non-reasoning set (loss on responses, "
          "packed).", starts_from="pretrain_base", registers="r1-sft"),
    Stage("reward_models", "reward_model", "reward_models",
          "Stage 7: the helpfulness and harmlessness reward models (Bradley-Terry on preference pairs), one Ray "
          "Train job each, trained at the same time.", starts_from="pretrain_base",
          registers={"helpfulness": "r1-rm-helpful", "harmlessness": "r1-rm-harmless"}),
    Stage("general_rl", "grpo", "general_rl",
          "Stage 8: GRPO over all scenarios from the SFT model: rule rewards for reasoning prompts, reward models "
          "for general ones (helpfulness on the summary, harmlessness on the whole response); registered as `r1`, "
          "the promotion gate decides `champion`.", starts_from="sft", registers="r1"),
    Stage("distill", "sft", "distill",
          "Stage 9: each smaller student gets its own pretrained base, then SFT on the stage-6 set, no RL "
          "(r1-distill-<name>); for the paper's comparison, the same student by R1-Zero-style RL alone "
          "(r1-rl-only-<name>); one Ray Train job per student.",
          registers={"base": "r1-student-base-{student}", "sft": "r1-distill-{student}",
                     "rl_only": "r1-rl-only-{student}"}),
):
    declare(_stage)


def stage(name: str) -> Stage:
    """The catalog entry of a stage or sub-stage (`reward_models/helpfulness` -> `reward_models`)."""
    return CATALOG[name.split("/")[0]]


def registered_name(substage: str) -> str:
    return stage(substage).registered_name(substage)


def model_dir(config: PipelineConfig, name: str) -> str:
    """Where this configuration's stage (or sub-stage) `name` writes its model."""
    from tasks.training_stages import StageCache

    return str(StageCache(config, name).output)


def stage_flow(name: str):
    """Make `fn` the Prefect flow of the catalog's stage `name`: the flow is named after it and
    described by it, and fills in what its caller left out: `data` (this configuration's train
    and held-out rows, prepared once) and `init_model` (the model of the stage it starts from)."""
    entry = CATALOG[name]

    def bind(fn):
        from prefect import flow

        # the annotations resolved in `fn`'s module: Prefect reads them from the wrapper, whose
        # module (this one) does not import the types a flow's signature names
        signature = inspect.signature(fn, eval_str=True)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            from tasks.lifecycle import workdir_lock
            from tasks.training_stages import prepare_data

            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            params = bound.arguments
            label_flow_run(params["config"], name)
            with workdir_lock(params["config"].runtime.workdir, f"stage {name}"):
                reconcile_stale_runs(params["config"])
                if "data" in params and params["data"] is None:
                    params["data"] = prepare_data(params["config"])
                if "init_model" in params and params["init_model"] is None and entry.starts_from:
                    params["init_model"] = model_dir(params["config"], entry.starts_from)
                return fn(**params)

        run.__annotations__ = typing.get_type_hints(fn)
        run.__signature__ = signature
        stage_flow_ = flow(name=name, description=entry.description, log_prints=True)(run)
        _FLOWS[name] = stage_flow_
        return stage_flow_

    return bind


def label_flow_run(config, stage: str) -> None:
    """Name the running flow run `<run_name>/<stage>` (run_name: profile + config digest unless
    set) and tag it with the profile, config digest, git commit and stage: what tells runs apart
    in the Prefect UI's lists and filters; and with its owner, this process (`owner_tags`: a run
    left Running by a dead owner is marked Crashed). Prefect's `flow_run_name` alone cannot tag
    a run."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from tasks.tracking import git_commit

    if (run_id := flow_run.get_id()) is None:
        return
    # The owner tag is the flow run's alone: a task run with tags asks the Prefect server for
    # tag-based concurrency slots before it starts (measured: up to 2.4 s per task here).
    labels = {f"profile:{config.profile}", f"config:{config.digest()}", f"commit:{git_commit()[:12]}", f"stage:{stage}",
              *owner_tags()}
    with get_client(sync_client=True) as client:
        client.update_flow_run(run_id, name=f"{config.resolved_run_name()}/{stage}",
                               tags=sorted(set(flow_run.get_tags()) | labels))


OWNER_TAG_PREFIX = "r1-owner:"  # a Prefect flow-run tag: r1-owner:<host>:<pid>:<pid start>


def owner_tags() -> list[str]:
    """The Prefect tags that name this process as the owner of the flow runs it starts."""
    from tasks.lifecycle import owner

    me = owner()
    return [f"{OWNER_TAG_PREFIX}{me['host']}:{me['pid']}:{me['pid_start']}"]


_reconciled: set[str] = set()  # tracking URIs reconciled by this process


def reconcile_stale_runs(config) -> None:
    """Once per process and store: MLflow runs and Prefect flow runs left RUNNING by an owner that
    is gone (a driver killed by SIGKILL) are marked KILLED and Crashed, each saying why."""
    from prefect import get_run_logger

    from tasks import tracking

    uri = tracking.tracking_uri(config.runtime)
    if uri in _reconciled:
        return
    _reconciled.add(uri)
    killed = tracking.reconcile_stale_runs(config.runtime)
    try:
        crashed = crash_orphaned_flow_runs()
    except Exception as e:  # best effort: a stale flow run in the UI must not stop this one
        get_run_logger().warning("could not check for flow runs of dead owners: %s", e)
        crashed = []
    if killed or crashed:
        get_run_logger().warning("closed %d MLflow run(s) and %d Prefect flow run(s) whose owner is gone",
                                 len(killed), len(crashed))


def crash_orphaned_flow_runs() -> list[str]:
    """Mark Crashed every Running or Pending flow run whose `r1-owner` process is gone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from tasks.lifecycle import owner, owner_alive

    crashed = []
    states = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING,
                                                                                      StateType.PENDING])))
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=states, limit=200):
            for tag in run.tags:
                if not tag.startswith(OWNER_TAG_PREFIX):
                    continue
                host, _, rest = tag[len(OWNER_TAG_PREFIX):].partition(":")
                pid, _, pid_start = rest.partition(":")
                if owner_alive({"host": host, "pid": pid, "pid_start": pid_start}) is False:
                    client.set_flow_run_state(run.id, Crashed(
                        message=f"its owner (pid {pid} on {host}) ended without finishing it; marked by pid "
                                f"{owner()['pid']}"), force=True)
                    crashed.append(str(run.id))
    return crashed


def stage_flows() -> dict[str, object]:
    """Every catalogued stage's flow, in catalog order (the built-in ones are imported here)."""
    import flows.stage_flows  # noqa: F401 (binds the built-in stages' flows)

    return {name: _FLOWS[name] for name in CATALOG if name in _FLOWS}
