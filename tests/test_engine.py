"""Rollout engines: the in-process torch engine, and the OpenAI-compatible client against a
real local server (`transformers serve`) running the tiny model on CPU."""
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from r1core.config import ModelConfig
from r1core.engine import OpenAIEngine, Sampling, TorchEngine
from r1core.evaluation import evaluate
from r1core.modeling import build_model


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                   intermediate_size=64), tokenizer)


def test_torch_engine_groups_and_lengths(tiny_model, tokenizer, rows):
    engine = TorchEngine(tiny_model, tokenizer, batch_size=5)  # batches split across groups
    prompts = [r["prompt"] for r in rows[1][:3]]
    out = engine.generate(prompts, n=4, sampling=Sampling(max_new_tokens=7, seed=0))
    assert [r.prompt_index for r in out] == [0] * 4 + [1] * 4 + [2] * 4
    for r in out:
        assert 1 <= len(r.completion_ids) <= 7
        assert r.finish_reason in ("stop", "length")
        assert tokenizer.pad_token_id not in r.completion_ids
        if r.finish_reason == "length":
            assert len(r.completion_ids) == 7
    assert tiny_model.training  # the engine restores the train/eval mode it found


def test_torch_engine_seeded_sampling_is_reproducible(tiny_model, tokenizer, rows):
    engine = TorchEngine(tiny_model, tokenizer)
    prompts = [rows[1][0]["prompt"]]
    a = engine.generate(prompts, 3, Sampling(max_new_tokens=6, seed=5))
    b = engine.generate(prompts, 3, Sampling(max_new_tokens=6, seed=5))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    greedy = engine.generate(prompts, 2, Sampling(temperature=0.0, max_new_tokens=6))
    assert greedy[0].completion_ids == greedy[1].completion_ids


def test_evaluate_reports_the_paper_metrics(tiny_model, tokenizer, rows):
    m = evaluate(TorchEngine(tiny_model, tokenizer), rows[1][:4], k=2, sampling=Sampling(max_new_tokens=5, seed=0))
    assert {"pass@1", "cons@2", "format_rate", "answer_accuracy_any", "mean_length"} <= set(m)
    assert m["num_prompts"] == 4 and 0 <= m["pass@1"] <= 1 and 1 <= m["mean_length"] <= 5


def test_paired_difference_keeps_each_prompts_scores_together():
    from r1core.evaluation import paired_difference

    easy_and_hard = [0.9, 0.1, 0.8, 0.0, 0.5, None]
    same = paired_difference(easy_and_hard, easy_and_hard)
    assert same["difference"] == same["low"] == same["high"] == 0 and same["prompts"] == 5
    # a constant gain is exact however different the prompts are: pairing removes their spread
    gain = paired_difference(easy_and_hard, [None if x is None else x + 0.1 for x in easy_and_hard])
    assert gain["low"] == pytest.approx(0.1) and gain["high"] == pytest.approx(0.1)
    mixed = paired_difference([0.5] * 40, [0.5 + (0.2 if i % 2 else -0.1) for i in range(40)])
    assert mixed["difference"] == pytest.approx(0.05) and mixed["low"] < 0.05 < mixed["high"]
    assert mixed["low"] > -0.1 and mixed["high"] < 0.2
    with pytest.raises(ValueError, match="same prompts: 2 vs 3"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


class _Scripted:
    """An engine that returns fixed completions (to check the metric arithmetic)."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, n, sampling):
        from r1core.engine import Rollout

        return [Rollout(i, self.texts[i * n + j], [1] * 3, "stop") for i in range(len(prompts)) for j in range(n)]


def test_pass_at_1_and_cons_at_k_arithmetic():
    rows = [{"prompt": "p1", "answer": "5", "task": "chain_sum"}, {"prompt": "p2", "answer": "7", "task": "chain_sum"}]
    ok5, ok7 = "<think> a </think> <answer> 5 </answer>", "<think> a </think> <answer> 7 </answer>"
    bad = "<think> a </think> <answer> 1 </answer>"
    texts = [ok5, bad, ok5, "5", bad, bad, ok7, "7"]  # row 1: 2/4 correct, majority 5; row 2: 1/4, majority 1
    m, per_prompt = evaluate(_Scripted(texts), rows, k=4, sampling=Sampling(), per_prompt=True)
    assert per_prompt["pass@1"] == [2 / 4, 1 / 4] and len(per_prompt["readability"]) == 2
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["cons@4"] == pytest.approx(0.5)
    assert m["format_rate"] == pytest.approx(6 / 8)
    assert m["answer_accuracy_any"] == pytest.approx(5 / 8)  # "5" and "7" count without format



@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_model, tokenizer, free_port):
    model_dir = tmp_path_factory.mktemp("served")
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    with open(model_dir / "server.log", "w") as log:
        proc = subprocess.Popen([str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited: {(model_dir / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("transformers serve did not become healthy in 120 s")
    yield base + "/v1", str(model_dir)
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_client_against_a_real_local_server(served_model, tokenizer, rows):
    url, model_dir = served_model
    engine = OpenAIEngine(url, model_dir, tokenizer, concurrency=2)
    prompts = [r["prompt"] for r in rows[1][:2]]
    out = engine.generate(prompts, n=2, sampling=Sampling(max_new_tokens=6, seed=1))
    assert [r.prompt_index for r in out] == [0, 0, 1, 1]
    for r in out:
        assert isinstance(r.text, str) and r.finish_reason in ("stop", "length")
        assert len(r.completion_ids) <= 6 + 2  # re-tokenized text of at most 6 generated tokens
    m = evaluate(engine, rows[1][:2], k=2, sampling=Sampling(max_new_tokens=6, seed=1))
    assert m["num_prompts"] == 2


def test_openai_client_reports_http_errors(tokenizer, free_port):
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", "m", tokenizer, timeout_s=2)
    with pytest.raises(OSError):
        engine.generate(["x"], 1, Sampling(max_new_tokens=2))


def test_rejection_sampling_generation_against_a_real_local_server(served_model, rows, tmp_path):
    """The `engine: openai` path of rejection sampling: Ray Data sampler actors send the shards'
    prompts to the server and write one parquet file per shard."""
    import pyarrow.parquet as pq

    from r1core.config import ComputeConfig, RuntimeConfig, SamplingConfig
    from tasks.ray_jobs import ensure_ray
    from tasks.rejection_sampling import SAMPLE_SCHEMA
    from tasks.rollouts import generate_shards, shard_path

    url, model_dir = served_model
    ensure_ray(RuntimeConfig(num_cpus=2))
    requests = [{**r, "sample": 0, "model_dir": model_dir, "generation_prompt": r["prompt"]} for r in rows[1][:3]]
    written = list(generate_shards({0: requests[:2], 1: requests[2:]}, str(tmp_path), ComputeConfig(cpus_per_worker=1),
                                   schema=SAMPLE_SCHEMA, sampling=SamplingConfig(max_new_tokens=4).model_dump(), n=2,
                                   batch_size=8, seed=0, server={"base_url": url, "model": model_dir}))
    assert sorted((w["shard"], w["samples"]) for w in written) == [(0, 4), (1, 2)]
    shard0 = pq.read_table(shard_path(tmp_path, 0)).to_pylist()
    assert [(s["id"], s["sample"]) for s in shard0] == [(requests[0]["id"], 0), (requests[0]["id"], 1),
                                                        (requests[1]["id"], 0), (requests[1]["id"], 1)]
    assert all(isinstance(s["completion"], str) and s["finish_reason"] in ("stop", "length") for s in shard0)


def test_openai_judge_against_a_real_local_server(served_model):
    from r1core.judge import JudgeItem, OpenAIJudge

    url, model_dir = served_model
    verdicts = OpenAIJudge(url, model_dir, concurrency=2).judge([JudgeItem("Compute 1 + 1.", "2", "2"),
                                                                 JudgeItem("Compute 1 + 2.", "3", "4")])
    assert len(verdicts) == 2 and all(isinstance(v, bool) for v in verdicts)  # an untrained model: any verdict
