"""What a user hands the CLI, checked before Prefect, Ray or any worker starts: the data files a
configuration names (bad rows within their error budget, at least one good row) and the models
it or a flag names (an HF directory with readable config and intact weights, or a registered
model that exists). Each problem is a `ConfigError` naming the flag or field and the file, so
that `r1` exits 2 with one line and nothing has been written. The stages check the same again
when they run (deployments do not pass through here)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from r1core import checkpoint as ckpt
from r1core.config import ConfigError, PipelineConfig
from r1core.validation import DataError, read_data_file


def check_inputs(cfg: PipelineConfig) -> list[str]:
    """The configuration's own files: data rows, rejection-sampling prompts, the local base model.
    Returns a line per file checked (`r1 doctor` prints them)."""
    checked = []
    files = [("data.train_file", cfg.data.train_file, cfg.data.error_budget),
             ("data.heldout_file", cfg.data.heldout_file, cfg.data.error_budget),
             ("rejection_sampling.prompts_file", cfg.rejection_sampling.prompts_file,
              cfg.rejection_sampling.error_budget)]
    for field, path, budget in files:
        if path:
            good, bad = check_data(path, field, budget)
            checked.append(f"{field} '{path}': {good} rows" + (f", {bad} malformed (to be quarantined)" if bad else ""))
    if cfg.model.pretrained_path:
        if problem := ckpt.check_model_dir(cfg.model.pretrained_path, "model.pretrained_path"):
            raise ConfigError(problem)
        checked.append(f"model.pretrained_path '{cfg.model.pretrained_path}': an intact HF model directory")
    return checked


def check_data(path: str, what: str, error_budget: float) -> tuple[int, int]:
    """(good rows, bad rows) of a data file within its error budget, else a `ConfigError`."""
    try:
        good, bad = read_data_file(path, what, error_budget)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return len(good), len(bad)


def resolve_model_argument(value: str, flag: str, cfg: PipelineConfig) -> str:
    """The local directory of `--model` / `--init-model` (a directory, or a `models:/` /
    `runs:/` URI fetched from this configuration's MLflow store), checked intact."""
    from mlflow.exceptions import MlflowException

    from tasks.evaluate import resolve_model
    from tasks.tracking import tracking_uri

    if not value.startswith(("models:/", "runs:/")):
        if problem := ckpt.check_model_dir(value, flag):
            raise ConfigError(problem)
    else:
        uri = tracking_uri(cfg.runtime)
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise ConfigError(f"{flag} {value}: no MLflow store at {uri} yet (nothing is registered there)")
    try:
        with _quiet("mlflow", "alembic"):  # a store's first use logs its migrations
            path = resolve_model(value, cfg)
    except MlflowException as e:
        first = (e.message if hasattr(e, "message") else str(e)).splitlines()[0]
        raise ConfigError(f"{flag} {value}: not in the MLflow store ({first})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {value}: {e}") from None
    if problem := ckpt.check_model_dir(path, f"{flag} {value}"):
        raise ConfigError(problem)
    return path


@contextlib.contextmanager
def _quiet(*loggers: str):
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
