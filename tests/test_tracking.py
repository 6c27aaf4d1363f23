"""The stage's MLflow run on a real local store (SQLite under the workdir): system metrics for
its duration, none after its end, on a finished and on an interrupted stage."""
from __future__ import annotations

import contextlib
import time

import pytest

from r1core.config import CONFIG_DIR, load_config
from tasks import tracking
from tasks.training_stages import stage_run


@pytest.fixture
def micro(tmp_path):
    return load_config(CONFIG_DIR / "micro.yaml", [f"runtime.workdir={tmp_path}"])


def _system_points(client, run):
    keys = [k for k in run.data.metrics if k.startswith("system/")]
    return keys, [m for k in keys for m in client.get_metric_history(run.info.run_id, k)]


@pytest.mark.parametrize("interrupt", [None, KeyboardInterrupt])  # an error ends the run as KILLED does, FAILED
def test_a_stage_run_records_system_metrics_and_none_after_its_end(micro, interrupt):
    raised = pytest.raises(interrupt) if interrupt else contextlib.nullcontext()
    with raised, stage_run(micro, "r1_zero", None, "a stage of the test") as run_id:
        time.sleep(6)  # one 5 s sample
        if interrupt:
            raise interrupt("stopped")
    client = tracking.client_for(micro.runtime)
    run = client.get_run(run_id)
    assert run.info.status == {None: "FINISHED", KeyboardInterrupt: "KILLED"}[interrupt]
    keys, points = _system_points(client, run)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(keys), keys
    time.sleep(6)  # a monitor still running would log again now
    keys, after = _system_points(client, client.get_run(run_id))
    assert len(after) == len(points) and max(m.timestamp for m in after) <= run.info.end_time

