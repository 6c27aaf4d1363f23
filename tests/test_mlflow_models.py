"""Registered versions are MLflow Models: `mlflow.transformers.load_model` loads one from
`models:/...@champion`, `mlflow models serve` (local env manager, loopback) answers a prompt, and
the artifact's `model/` is still a whole HF directory. A real MLflow store (SQLite in a temp dir)
and a real scoring server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from conftest import write_model_dir
from test_training import MICRO

from r1core.config import CONFIG_DIR, load_config
from tasks import tracking
from tasks.evaluate import resolve_model


def _registered(tmp_path, model_dir) -> tuple:
    cfg = load_config(CONFIG_DIR / "micro.yaml", [f"runtime.workdir={tmp_path / 'work'}"])
    run_id = tracking.start_run(cfg.runtime, "general_rl", tags={"stage": "general_rl"})
    version = tracking.register_model(cfg.runtime, run_id, model_dir, "r1", description="pass@1 0.500")
    tracking.end_run(cfg.runtime, run_id)
    client = tracking.client_for(cfg.runtime)
    client.set_registered_model_alias("r1", "champion", version)
    return cfg, client, version


def test_a_registered_version_loads_and_serves_as_an_mlflow_model(tmp_path, tokenizer, free_port, monkeypatch):
    import mlflow.transformers
    from transformers import AutoModelForCausalLM

    model_dir = write_model_dir(tmp_path / "hf", MICRO, tokenizer, seed=0)
    cfg, client, version = _registered(tmp_path, tmp_path / "hf")
    assert client.get_model_version("r1", version).description == "pass@1 0.500"
    uri = tracking.tracking_uri(cfg.runtime)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    pipe = mlflow.transformers.load_model("models:/r1@champion")
    assert pipe.task == "text-generation" and pipe.tokenizer.chat_template == tokenizer.chat_template
    local = resolve_model("models:/r1@champion", cfg)  # the HF directory inside: transformers (and vLLM) load it
    trained, served = AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), \
        AutoModelForCausalLM.from_pretrained(local).state_dict()
    assert trained.keys() == served.keys() and all(torch.equal(trained[k], served[k]) for k in trained)
    assert (Path(local) / "tokenizer.json").is_file() and (Path(local) / "chat_template.jinja").is_file()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/r1@champion",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri,  # it runs the venv's `uvicorn` by name
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = json.dumps({"inputs": ["Compute 2 + 3."], "params": {"max_new_tokens": 8}}).encode()
        deadline, answer = time.time() + 180, None
        while answer is None and time.time() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stdout.read().decode()[-3000:] if server.poll() is not None else "no answer"
        (completion,) = answer["predictions"]
        assert isinstance(completion, str) and completion.startswith("Compute 2 + 3.") and len(completion) > 14
    finally:
        os.killpg(server.pid, 9)
        server.wait()
