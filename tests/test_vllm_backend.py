"""What of `rollout.backend: vllm` runs without a GPU: its configuration, the weight-version
directories every engine reloads (written whole, read back checked, damage named), and the check
of the vLLM environment that runs before anything trains (`r1 doctor`, `r1 run`, the stage).

The engines themselves need a CUDA GPU and the vLLM environment: tests/test_vllm_rollouts.py."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from r1core.config import ModelConfig, RolloutConfig, load_config
from r1core.modeling import build_model
from r1core.rollout_sources import (
    PolicySampler,
    read_weight_version,
    weight_version_dir,
    write_weight_version,
)
from tasks import environments
from tasks.environments import EnvironmentMismatch, check_vllm_environment, vllm_problems

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("fields, error", [
    ({"weight_sync": "nccl"}, "does not apply to backend in_process"),
    ({"backend": "workers", "weight_sync": "nccl"}, "use checkpoint or object_store"),
    ({"backend": "vllm", "weight_sync": "object_store"}, "use checkpoint or nccl"),
    ({"backend": "vllm", "vllm": {"colocate": True}, "max_staleness": 1}, "max_staleness must be 0"),
    ({"backend": "vllm", "vllm": {"colocate": True}, "num_workers": 2}, "one engine"),
    ({"backend": "vllm", "vllm": {"gpu_memory_utilization": 1.5}}, "less than or equal to 1"),
    ({"backend": "vllm", "vllm": {"dtype": "int8"}}, "dtype"),
    ({"backend": "vllm", "vllm": {"pythn": "x"}}, "pythn"),
])
def test_vllm_rollout_config_is_checked(fields, error):
    with pytest.raises(ValidationError, match=error):
        RolloutConfig(**fields)


def test_each_backend_has_its_default_weight_sync_and_a_stage_may_choose_vllm():
    assert RolloutConfig(backend="workers").sync == "object_store"
    assert RolloutConfig(backend="vllm").sync == "checkpoint"
    assert RolloutConfig(backend="vllm", weight_sync="nccl").sync == "nccl"
    cfg = load_config(ROOT / "configs" / "micro.yaml", ["reasoning_rl.rollout.backend=vllm"])
    assert cfg.rollout.for_stage(cfg.reasoning_rl.rollout).backend == "vllm"
    assert cfg.rollout.for_stage(cfg.r1_zero.rollout).backend == "in_process"


# ---------------------------------------------------------------------------- weight versions
SMALL = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def weights(tokenizer):
    model = build_model(SMALL, tokenizer, seed=5)
    return model, list(model.state_dict().items())


def test_a_weight_version_round_trips_in_chunks_and_replaces_a_partial_one(tmp_path, weights):
    _, named = weights
    root = tmp_path / "w"
    stale = weight_version_dir(root, 3).with_name("v000003.partial")  # a writer killed midway left this
    stale.mkdir(parents=True)
    (stale / "model-00000.safetensors").write_bytes(b"half")
    path = write_weight_version(root, 3, named, chunk_bytes=4096)
    assert path == weight_version_dir(root, 3) and sorted(p.name for p in root.iterdir()) == ["v000003"]
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1  # chunked
    back = {k: t for chunk in read_weight_version(path, 3) for k, t in chunk.items()}
    assert list(back) == [k for k, _ in named] and all(torch.equal(back[k], t) for k, t in named)


def _damage(path: Path, how: str, rng: random.Random) -> None:
    shards = sorted(path.glob("*.safetensors"))
    manifest = path / "weights.json"
    shard = shards[rng.randrange(len(shards))]
    data = shard.read_bytes()
    if how == "truncate":
        shard.write_bytes(data[: rng.randrange(0, len(data))])
    elif how == "garbage_header":
        shard.write_bytes(rng.randbytes(rng.randrange(1, 64)) + data[64:])
    elif how == "flip_header_length":
        shard.write_bytes((2**63 - 1).to_bytes(8, "little") + data[8:])
    elif how == "delete_shard":
        shard.unlink()
    elif how == "empty_file":
        shard.write_bytes(b"")
    elif how == "manifest_other_version":
        m = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**m, "version": 4}))
    elif how == "manifest_not_json":
        manifest.write_bytes(rng.choice([b"", b"{", b"\xff\xfe", "版本".encode("utf-16"), b"[1, 2"]))
    elif how == "manifest_wrong_types":
        m = json.loads(manifest.read_text())
        name = next(iter(m["shards"]))
        manifest.write_text(json.dumps(rng.choice([
            [], None, 3, {"version": 3}, {"version": 3, "shards": []}, {"version": 3, "shards": {}},
            {"version": "3", "shards": m["shards"]}, {"shards": {"a": {}}}, {"version": 3, "shards": {name: 5}},
            {"version": 3, "shards": {name: {"x": 5}}}, {"version": 3, "shards": {name: {"x": ["float32", "7"]}}},
            {"version": 3, "shards": {name: {"x": ["float32", [-1]]}}}, {"version": 3, "shards": {name: {"x": [1, [1]]}}},
        ])))
    elif how == "manifest_wrong_shape":
        m = json.loads(manifest.read_text())
        name = next(iter(m["shards"]))
        tensor = next(iter(m["shards"][name]))
        m["shards"][name][tensor][1] = [rng.randrange(1, 9), 999]
        manifest.write_text(json.dumps(m))
    elif how == "manifest_hides_a_tensor":
        m = json.loads(manifest.read_text())
        name = next(iter(m["shards"]))
        m["shards"][name].pop(next(iter(m["shards"][name])))
        manifest.write_text(json.dumps(m))
    elif how == "manifest_path_escape":
        m = json.loads(manifest.read_text())
        m["shards"] = {"../../etc/passwd": {"x": ["float32", [1]]}}
        manifest.write_text(json.dumps(m))


DAMAGE = ["truncate", "garbage_header", "flip_header_length", "delete_shard", "empty_file", "manifest_other_version",
          "manifest_not_json", "manifest_wrong_types", "manifest_wrong_shape", "manifest_hides_a_tensor",
          "manifest_path_escape"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("seed", range(3))
def test_a_damaged_weight_version_is_an_error_naming_the_file(tmp_path, weights, how, seed):
    _, named = weights
    path = write_weight_version(tmp_path / "w", 3, named, chunk_bytes=4096)
    _damage(path, how, random.Random(seed))
    with pytest.raises(ValueError, match=r"weight version 3: .*'" + str(path)) as e:
        for _ in read_weight_version(path, 3):
            pass
    if how == "manifest_path_escape":
        assert "/etc/passwd" not in str(e.value)  # shard names cannot leave the version directory


def test_a_sampler_refuses_a_version_that_lacks_or_misshapes_tensors(tmp_path, weights, tokenizer):
    _, named = weights
    sampler = PolicySampler(build_model(SMALL, tokenizer, seed=1), tokenizer, 8, 64)
    assert sampler.load_checkpoint(1, str(write_weight_version(tmp_path / "a", 1, named, 1 << 20))) >= 0
    assert sampler.version == 1
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        sampler.load_checkpoint(2, str(write_weight_version(tmp_path / "b", 2, named[1:], 1 << 20)))
    misshapen = [(k, t[:1] if i == 0 else t) for i, (k, t) in enumerate(named)]
    with pytest.raises(ValueError, match="has shape"):
        sampler.load_checkpoint(3, str(write_weight_version(tmp_path / "c", 3, misshapen, 1 << 20)))
    renamed = [("model.evil.weight" if i == 0 else k, t) for i, (k, t) in enumerate(named)]
    with pytest.raises(KeyError, match="unknown tensor 'model.evil.weight'"):
        sampler.load_checkpoint(4, str(write_weight_version(tmp_path / "d", 4, renamed, 1 << 20)))
    assert sampler.version == 1


# ---------------------------------------------------------------------------- the vLLM environment
def _script(tmp_path: Path, body: str) -> str:
    """A stand-in interpreter for environments this machine cannot hold (a broken one, one that hangs)."""
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    return str(exe)


def test_a_missing_environment_names_the_command_that_creates_it(tmp_path):
    with pytest.raises(EnvironmentMismatch, match=r"no Python at .*create it with `make vllm-env`"):
        check_vllm_environment(str(tmp_path / "nope" / "bin" / "python"))


def test_a_real_environment_without_vllm_or_ray_is_refused(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    with pytest.raises(EnvironmentMismatch) as e:
        check_vllm_environment(str(venv / "bin" / "python"))
    assert "ray None" in str(e.value) and "vllm None" in str(e.value) and "make vllm-env" in str(e.value)


@pytest.mark.parametrize("body, error", [
    ("exit 3", "exit 3"),
    ("echo 'Traceback: boom' >&2; exit 1", "boom"),
    ("echo hello", "exit 0"),
    ("echo 'R1-PROBE {not json'", "no readable check"),
    ("echo 'R1-PROBE [1, 2]'", "no readable check"),
    ("echo 'R1-PROBE \"x\"'", "no readable check"),
])
def test_a_broken_environment_is_refused_with_what_it_said(tmp_path, body, error):
    with pytest.raises(EnvironmentMismatch, match=error):
        check_vllm_environment(_script(tmp_path, body))


def test_an_environment_that_hangs_is_refused_in_bounded_time(tmp_path):
    with pytest.raises(EnvironmentMismatch, match="could not be run"):
        environments.probe(_script(tmp_path, "sleep 60"), timeout_s=2)


def test_each_difference_from_this_environment_is_named():
    import platform
    from importlib.metadata import version

    ours = {"python": platform.python_version(), "ray": version("ray"), "vllm": environments.pinned_vllm(),
            "vllm_import": "ok", "torch": "2.14.0"}
    assert vllm_problems(ours) == []
    assert vllm_problems({**ours, "python": "3.12.1"}) == [f"Python 3.12.1 (Ray needs this environment's "
                                                           f"{'.'.join(platform.python_version_tuple()[:2])})"]
    assert "ray 2.59.0" in vllm_problems({**ours, "ray": "2.59.0"})[0]
    assert "vllm 0.32.0" in vllm_problems({**ours, "vllm": "0.32.0"})[0]
    assert "does not import: ImportError: libcuda" in vllm_problems({**ours, "vllm_import": "ImportError: libcuda"})[0]
    assert len(vllm_problems({})) == 3


def test_doctor_and_run_refuse_a_missing_vllm_environment_before_anything_starts(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    sets = ["--config", "configs/micro.yaml", "--set", f"runtime.workdir={tmp_path}", "--set",
            "reasoning_rl.rollout.backend=vllm", "--set", "rejection_sampling.engine=vllm", "--set",
            f"rollout.vllm.python={tmp_path}/vllm/bin/python"]
    doctor = subprocess.run([sys.executable, "-m", "flows.cli", "doctor", *sets], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "FAIL" in doctor.stdout and "make vllm-env" in doctor.stdout and "(used by reasoning_rl, rejection_sampling)" in doctor.stdout
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "stage", "reasoning_rl", *sets], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and "make vllm-env" in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
    assert not (tmp_path / "prefect").exists() and not (tmp_path / "runs").exists()  # nothing started
    rs = subprocess.run([sys.executable, "-m", "flows.cli", "run", "stage", "rejection_sampling", *sets[:-6], "--set",
                         "rejection_sampling.engine=vllm", *sets[-2:]], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
    assert rs.returncode == 2 and "make vllm-env" in rs.stderr, rs.stdout[-2000:] + rs.stderr[-2000:]
