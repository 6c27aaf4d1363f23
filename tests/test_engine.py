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


def _eos_when(model, tokenizer, threshold: float):
    """A hook that makes EOS the argmax wherever the output layer's input has feature 0 above
    `threshold`: a deterministic function of the context, so sequences finish at different steps
    on every path alike (a random tiny model almost never samples EOS by itself)."""
    eos = tokenizer.eos_token_id

    def hook(_module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 100.0 * (inputs[0][..., 0] > threshold)
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def _reference_generate(model, tokenizer, prompts, n, max_new_tokens):
    """The straightforward path: `model.generate` greedily on every prompt n times over."""
    enc = tokenizer([p for p in prompts for _ in range(n)], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, suppress_tokens=[tokenizer.pad_token_id])
    eos = tokenizer.eos_token_id
    seqs = out[:, enc["input_ids"].shape[1]:].tolist()
    return [seq[: seq.index(eos) + 1] if eos in seq else seq for seq in seqs]


def test_torch_engine_greedy_equals_the_straightforward_path(tokenizer, rows):
    """One prefill shared by the group and finished rows leaving the batch change no token: greedy
    output equals `model.generate`'s, in batches that split groups and sequences that stop early."""
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64), tokenizer, seed=3)
    prompts = [r["prompt"] for r in rows[1][:6]]  # prompts of different lengths: left padding varies
    seen = []  # feature 0 at the output layer on the hook-free path: EOS fires above its 75th percentile
    record = model.get_output_embeddings().register_forward_hook(lambda _m, i, _o: seen.append(i[0][..., 0].flatten()))
    _reference_generate(model, tokenizer, prompts, 1, 24)
    record.remove()
    import torch

    hook = _eos_when(model, tokenizer, threshold=float(torch.cat(seen).quantile(0.75)))
    try:
        want = _reference_generate(model, tokenizer, prompts, 2, 24)
        for batch_size in (256, 5):
            got = TorchEngine(model, tokenizer, batch_size).generate(prompts, 2, Sampling(temperature=0.0,
                                                                                             max_new_tokens=24))
            assert [r.completion_ids for r in got] == want, batch_size
    finally:
        hook.remove()
    lengths = {len(ids) for ids in want}
    assert len(lengths) >= 3 and min(lengths) < 24 and max(lengths) == 24, lengths  # the test's own premise
    assert {r.finish_reason for r in got} == {"stop", "length"}


def test_torch_engine_logprobs_are_the_policys(tiny_model, tokenizer, rows):
    """Each rollout's log-probs are log pi(token | context) as the update scores them by teacher
    forcing (the untempered policy, whatever temperature sampled the token)."""
    import torch

    from r1core.logprobs import TokenScorer

    prompts = [r["prompt"] for r in rows[1][:3]]
    out = TorchEngine(tiny_model, tokenizer).generate(prompts, 2, Sampling(temperature=0.8, top_p=0.9,
                                                                            max_new_tokens=9, seed=1))
    scorer = TokenScorer(tiny_model, chunk_tokens=0).eval()
    for r in out:
        prompt_ids = tokenizer(prompts[r.prompt_index])["input_ids"]
        ids = torch.tensor([prompt_ids + r.completion_ids])
        targets = torch.tensor(r.completion_ids)
        positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            want, _ = scorer(ids, torch.arange(ids.shape[1])[None], None, positions, targets)
        assert len(r.logprobs) == len(r.completion_ids)
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-5), (r.logprobs, want.tolist())


def _nucleus(logits, temperature: float, top_p: float):
    """The exact sampling distribution: softmax(logits / T) on the top-p nucleus, renormalised."""
    import torch

    probs = torch.softmax(logits.double() / temperature, -1)
    ordered, order = probs.sort(descending=True)
    inside = ordered.cumsum(0) - ordered < top_p
    exact = torch.zeros_like(probs)
    exact[order[inside]] = ordered[inside]
    return exact / exact.sum()


def _chi_square_p(counts, expected_probs):
    """Pearson's chi-square p-value of observed token counts against a distribution; tokens
    expected fewer than 5 times are pooled into one cell."""
    import numpy as np
    from scipy.stats import chisquare

    total = counts.sum()
    expected = expected_probs * total
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_torch_engine_samples_the_tempered_nucleus(tokenizer, rows):
    """At T > 0 the tokens follow softmax(logits / T) on the top-p nucleus: the first token's and
    (given the commonest first token) the second token's counts over 6,000 samples pass a
    chi-square test against the exact distribution, tokens outside the nucleus never appear,
    and the same counts reject the untempered distribution (the test can tell them apart)."""
    import numpy as np
    import torch

    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                    intermediate_size=64), tokenizer, seed=4)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)  # a peaked distribution: the nucleus cuts
    prompt = rows[1][0]["prompt"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    vocab = model.config.vocab_size

    def next_logits(ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        logits[tokenizer.pad_token_id] = float("-inf")  # the engine never samples padding
        return logits

    T, n = 0.7, 6000
    # top_p halfway through the 6th likeliest token: the nucleus's last token carries real mass,
    # so including or excluding the token that crosses p shows in the counts
    ordered = torch.softmax(next_logits(prompt_ids).double() / T, -1).sort(descending=True).values
    top_p = float(ordered[:5].sum() + ordered[5] / 2)
    out = TorchEngine(model, tokenizer, batch_size=n).generate([prompt], n, Sampling(
        temperature=T, top_p=top_p, max_new_tokens=2, seed=0))

    first = np.bincount([r.completion_ids[0] for r in out], minlength=vocab)
    exact_first = _nucleus(next_logits(prompt_ids), T, top_p).numpy()
    assert first[exact_first == 0].sum() == 0  # nothing outside the nucleus
    assert (exact_first > 0).sum() == 6 and exact_first[exact_first > 0].min() * n > 50  # the premise
    assert _chi_square_p(first, exact_first) > 1e-3
    untempered = _nucleus(next_logits(prompt_ids), 1.0, 1.0).numpy()
    assert _chi_square_p(first, untempered) < 1e-6

    top = int(first.argmax())
    after = [r.completion_ids[1] for r in out if r.completion_ids[0] == top and len(r.completion_ids) > 1]
    second = np.bincount(after, minlength=vocab)
    exact_second = _nucleus(next_logits(prompt_ids + [top]), T, top_p).numpy()
    assert len(after) > 500 and second[exact_second == 0].sum() == 0
    assert _chi_square_p(second, exact_second) > 1e-3


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


def test_a_difference_pooled_over_seeds_keeps_each_runs_prompts_together():
    from r1core.evaluation import paired_difference, paired_difference_over_runs

    base = [0.9, 0.1, 0.8, 0.0, 0.5, None]
    shifted = [None if x is None else x + 0.1 for x in base]
    one = paired_difference_over_runs([base], [shifted])
    assert one["low"] == pytest.approx(0.1) == one["high"] and one["runs_above"] == 1
    # three seeds, one of them worse: the pooled mean is the mean of the runs' means
    noisy = [[0.5] * 40, [0.5] * 30, [0.5] * 50]
    after = [[0.5 + (0.2 if i % 2 else -0.1) for i in range(40)], [0.55] * 30, [0.45] * 50]
    pooled = paired_difference_over_runs(noisy, after)
    assert pooled["per_run"] == pytest.approx([0.05, 0.05, -0.05]) and pooled["runs_above"] == 2
    assert pooled["difference"] == pytest.approx(0.05 / 3) and pooled["low"] < pooled["difference"] < pooled["high"]
    # pooling narrows the interval of one run's prompts: the others' constant shifts add no noise
    alone = paired_difference(noisy[0], after[0])
    assert pooled["high"] - pooled["low"] < alone["high"] - alone["low"]
    with pytest.raises(ValueError, match="run 1: paired scores need the same prompts: 30 vs 29"):
        paired_difference_over_runs(noisy, [after[0], after[1][:29], after[2]])
    with pytest.raises(ValueError, match="run 0: no prompt is scored"):
        paired_difference_over_runs([[None]], [[0.5]])
    with pytest.raises(ValueError, match="same runs on both sides"):
        paired_difference_over_runs(noisy, after[:2])


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
    assert per_prompt["language_mixing"] == [0.0, 0.0]
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


def test_per_prompt_language_mixing_is_the_share_of_mixed_chains():
    rows = [{"prompt": "p1", "answer": "5", "task": "chain_sum", "language": "en"},
            {"prompt": "p2", "answer": "7", "task": "chain_sum", "language": "zh"}]
    en, mixed_en = "<think> add two </think> <answer> 5 </answer>", "<think> add 加 two </think> <answer> 5 </answer>"
    zh, mixed_zh = "<think> 加 二 </think> <answer> 7 </answer>", "<think> 加 add </think> <answer> 7 </answer>"
    texts = [en, mixed_en, mixed_en, en, zh, zh, zh, mixed_zh]
    m, per_prompt = evaluate(_Scripted(texts), rows, k=4, sampling=Sampling(), per_prompt=True)
    assert per_prompt["language_mixing"] == [2 / 4, 1 / 4]
    assert m["language_mixing_rate"] == pytest.approx(3 / 8)  # the pooled rate is their mean
