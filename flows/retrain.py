"""`retrain`: the scheduled deployment's flow. New prompt files in the watched folder ->
general RL from the current `r1@champion` (rule rewards, the registered reward models) ->
a new `r1` version, which the promotion gate makes champion only if it is better.
(`tasks/retrain.py` is the same concept one layer down: the ledger of which files are new.)"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Completed

from flows.catalog import label_flow_run, registered_name
from flows.stage_flows import general_rl_flow
from r1core.config import DEFAULT_CONFIG, PipelineConfig
from tasks.evaluate import resolve_model
from tasks.retrain import find_new_data, incoming_dir, mark_consumed
from tasks.training_stages import prepare_data


@flow(name="retrain", log_prints=True)
def retrain_flow(config: PipelineConfig = DEFAULT_CONFIG):
    """Retrain `r1` from its champion on prompt files new in `retrain.data_dir`; ends early, and
    says so, when there are none."""
    logger = get_run_logger()
    label_flow_run(config, "retrain")
    batch = find_new_data(config)
    if batch is None:
        message = f"no new data in {incoming_dir(config)}: nothing to retrain"
        logger.info(message)
        return Completed(message=message)
    logger.info("retraining r1@%s on %d rows from %d new file(s): %s", config.retrain.from_alias, batch.num_rows,
                len(batch.files), ", ".join(batch.files))
    heldout = prepare_data(config).heldout_file  # the pipeline's held-out set: comparable with the champion's
    run = config.model_copy(deep=True, update={"run_name": f"retrain-{batch.digest}"})
    run.data.train_file, run.data.heldout_file = batch.rows_file, heldout
    run.general_rl.steps = config.retrain.steps or config.general_rl.steps
    result = general_rl_flow(
        run, init_model=resolve_model(f"models:/{registered_name('general_rl')}@{config.retrain.from_alias}", config),
        reward_model_dirs={m: resolve_model(f"models:/{registered_name(f'reward_models/{m}')}@newest", config)
                           for m in run.general_rl.model_rewards},
        data=prepare_data(run))
    mark_consumed(config, batch)
    return result
