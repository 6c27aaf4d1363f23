"""Training at real sizes, checked at tiny ones: chunked log-probs, exact micro-batch accumulation,
packed rollouts, and DDP vs FSDP2 vs one worker on 2 Ray Train workers over gloo, with sharded
checkpoints that resume on 2 and on 1 worker."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from r1core import checkpoint as ckpt
from r1core.batching import collate_rollouts, split_by_tokens
from r1core.config import GRPOConfig, ModelConfig, SFTConfig, TrainComputeConfig
from r1core.logprobs import TokenScorer, next_token_targets, selected_logprobs
from r1core.modeling import build_model
from r1core.reward_model import bradley_terry_loss, encode_pairs, init_reward_model, preference_pairs
from r1core.training import (
    TrainContext,
    accumulate,
    causal_lm_loss,
    grpo_train,
    pack_examples,
    save_checkpoint,
    sft_train,
)

MICRO = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
TOL = {"rtol": 1e-5, "atol": 1e-6}  # fp32


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 64), (5, 16), (50, 1)])
def test_chunked_logprobs_and_entropy_equal_the_full_log_softmax(n, chunk):
    torch.manual_seed(n)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(n, 16, requires_grad=True)
    targets = torch.randint(300, (n,))
    logp, entropy = selected_logprobs(hidden, head, targets, chunk_tokens=chunk, with_entropy=True)
    full = torch.log_softmax(head(hidden).float(), -1)
    torch.testing.assert_close(logp, full.gather(-1, targets[:, None]).squeeze(-1), **TOL)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), **TOL)
    weights = torch.randn(n)  # any downstream loss: gradients equal too
    g_chunked = torch.autograd.grad((logp * weights).sum(), [hidden, head.weight])
    g_full = torch.autograd.grad((full.gather(-1, targets[:, None]).squeeze(-1) * weights).sum(), [hidden, head.weight])
    for a, b in zip(g_chunked, g_full, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_chunked_logprobs_never_hold_the_full_logits():
    """With gradients on, the saved tensors of the chunked path hold no [N, V] logits."""
    head = torch.nn.Linear(8, 5000, bias=False)
    hidden = torch.randn(400, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selected_logprobs(hidden, head, torch.randint(5000, (400,)), chunk_tokens=50)[0].sum().backward()
    assert max(saved) <= 50 * 5000  # only one chunk's logits, recomputed in backward
    saved.clear()
    hidden.grad = None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selected_logprobs(hidden, head, torch.randint(5000, (400,)), chunk_tokens=0)[0].sum().backward()
    assert max(saved) >= 400 * 5000  # the naive path does


def test_the_scorer_gives_the_models_own_cross_entropy(tokenizer, rows):
    model = build_model(MICRO, tokenizer, seed=0)
    ex = [{"prompt": r["prompt"], "completion": f" <answer>{r['answer']}</answer>"} for r in rows[0][:6]]
    packed = pack_examples(tokenizer, ex, 256)
    total, n = causal_lm_loss(TokenScorer(model, chunk_tokens=7), packed)
    expected = model(**packed, use_cache=False).loss
    torch.testing.assert_close(total / n, expected, **TOL)
    positions, targets = next_token_targets(packed["input_ids"], packed["labels"])
    assert n == len(targets) == int((packed["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------- micro-batches
def test_split_by_tokens_respects_the_budget_padded_and_packed():
    lengths = [5, 9, 3, 12, 4, 4, 30]
    for packed in (False, True):
        groups = split_by_tokens(lengths, 20, packed=packed)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            cost = sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g)
            assert cost <= 20 or len(g) == 1  # a sequence over the budget goes alone
    assert split_by_tokens(lengths, None, packed=False) == [list(range(len(lengths)))]


def _accumulated_grads(model, micro, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = accumulate(model, micro, loss_fn, TrainContext("unused"))
    return loss, _grads(model)


def test_accumulated_lm_micro_batches_give_one_batchs_gradient(tokenizer, rows):
    """Token-level normalisation (cross-entropy): rows with very different numbers of scored
    tokens, split unevenly, give the one-batch gradient."""
    ex = [{"prompt": r["prompt"], "completion": " <answer>" + r["answer"] * (i % 4 + 1) + "</answer>"}
          for i, r in enumerate(rows[0][:12])]
    packed = pack_examples(tokenizer, ex, 400)
    scorer = TokenScorer(build_model(MICRO, tokenizer, seed=0), chunk_tokens=16)
    whole_loss, whole = _accumulated_grads(scorer, [packed], causal_lm_loss)
    parts = [{k: v[s] for k, v in packed.items()} for s in (slice(0, 1), slice(1, 4), slice(4, None))]
    loss, grads = _accumulated_grads(scorer, parts, causal_lm_loss)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for k, g in whole.items():
        torch.testing.assert_close(grads[k], g, **TOL, msg=k)


def test_accumulated_preference_pairs_give_one_batchs_gradient(tokenizer, tmp_path):
    """Sequence-level normalisation (Bradley-Terry: per pair)."""
    base = tmp_path / "base"
    build_model(MICRO, tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, tok = init_reward_model(base, seed=0)
    enc = encode_pairs(tok, "helpfulness", preference_pairs("helpfulness", 7, ["en"], seed=1), seq_len=64)
    _, whole = _accumulated_grads(model, [enc], bradley_terry_loss)
    _, grads = _accumulated_grads(model, [{k: v[s] for k, v in enc.items()} for s in (slice(0, 2), slice(2, None))],
                                  bradley_terry_loss)
    for k, g in whole.items():
        torch.testing.assert_close(grads[k], g, **TOL, msg=k)


def _rollouts(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 300, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(5, 300, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    return prompts, completions


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_accumulated_grpo_micro_batches_give_one_batchs_gradient(tokenizer, aggregation):
    from r1core.grpo import grpo_loss

    prompts, completions = _rollouts()
    advantages = torch.linspace(-1, 1, len(prompts))
    scorer = TokenScorer(build_model(MICRO, tokenizer, seed=0), chunk_tokens=8)
    with torch.no_grad():
        ref = TokenScorer(build_model(MICRO, tokenizer, seed=1), chunk_tokens=8)

    def micro(idx):
        return collate_rollouts([prompts[i] for i in idx], [completions[i] for i in idx], 0, layout="padded"), idx

    def loss_fn(model, item):
        mb, idx = item
        logp, _ = mb.scored(model)
        with torch.no_grad():
            ref_logp, _ = mb.scored(ref)
        out = grpo_loss(logp, logp.detach() + 0.1, ref_logp, advantages[idx], mb.completion_mask(), clip_low=0.2,
                        clip_high=0.28, beta=0.05, kl_estimator="k3", aggregation=aggregation)
        return out.total, out.count

    whole_loss, whole = _accumulated_grads(scorer, [micro(list(range(10)))], loss_fn)
    groups = split_by_tokens([len(p) + len(c) for p, c in zip(prompts, completions, strict=True)], 40, packed=False)
    assert len(groups) > 2
    loss, grads = _accumulated_grads(scorer, [micro(g) for g in groups], loss_fn)
    assert loss == pytest.approx(whole_loss, rel=1e-5, abs=1e-7)  # a sum of terms of both signs
    for k, g in whole.items():
        torch.testing.assert_close(grads[k], g, **TOL, msg=k)


def test_packed_and_padded_rollouts_give_the_same_logprobs(tokenizer):
    scorer = TokenScorer(build_model(MICRO, tokenizer, seed=0), chunk_tokens=16)
    prompts, completions = _rollouts(n=9, seed=3)
    padded = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="padded")
    packed = collate_rollouts(prompts, completions, tokenizer.pad_token_id, layout="packed")
    assert packed.attention_mask is None and packed.input_ids.numel() < padded.input_ids.numel()
    with torch.no_grad():
        a, _ = padded.scored(scorer)
        b, _ = packed.scored(scorer)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.completion_mask(), padded.completion_mask())
    for i, c in enumerate(completions):  # each completion's log-probs land in its own row
        assert int(padded.completion_mask()[i].sum()) == len(c)


def test_a_kill_mid_save_leaves_the_previous_checkpoint_usable(tokenizer, tmp_path, monkeypatch):
    model = TokenScorer(build_model(MICRO, tokenizer, seed=0), chunk_tokens=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    ctx = TrainContext(tmp_path)
    save_checkpoint(ctx, model, opt, sched, 2, {})
    real_save = ckpt.save_training_state

    def killed(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        (Path(path) / "__0_0.distcp").write_bytes(b"half")  # a shard cut short, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_training_state", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ctx, model, opt, sched, 4, {})
    assert ckpt.complete_checkpoints(tmp_path)[0].name == "step_000002"
    assert ckpt.load_training_state(ckpt.complete_checkpoints(tmp_path)[0], model, opt, sched) == 2
    (tmp_path / "step_000004.tmp" / COMPLETE_MARKER).write_text("{}")  # even marked, a .tmp is never chosen
    assert ckpt.complete_checkpoints(tmp_path)[0].name == "step_000002"


COMPLETE_MARKER = ckpt.COMPLETE


def test_a_corrupt_checkpoint_is_an_error_naming_it(tokenizer, tmp_path):
    model = TokenScorer(build_model(MICRO, tokenizer, seed=0), chunk_tokens=0)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    save_checkpoint(TrainContext(tmp_path), model, opt, sched, 2, {})
    shard = next((tmp_path / "step_000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="step_000002 cannot be loaded"):
        ckpt.load_training_state(tmp_path / "step_000002", model, opt, sched)


# ---------------------------------------------------------------------------- 2 Ray Train workers
SFT_STEPS = 4


def _configs(strategy: str, max_tokens: int | None):
    compute = TrainComputeConfig(strategy=strategy, max_tokens_per_microbatch=max_tokens, logits_chunk_tokens=64,
                                 cpus_per_worker=1)
    sft = SFTConfig(epochs=1, batch_size=8, seq_len=192, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                    compute=compute)
    grpo = GRPOConfig(steps=2, prompts_per_step=2, group_size=2, lr=3e-3, beta=0.05, inner_epochs=2,
                      sampling={"max_new_tokens": 6}, checkpoint_every=10, compute=compute)
    return sft, grpo


def _grpo_updates(cfg, tok, ctx: TrainContext, steps: int = 3) -> dict:
    """GRPO updates (two passes each, a KL to the reference) on fixed rollouts, the same whatever
    the number of workers (each takes every world_size-th): the update path alone, since sampled
    rollouts differ with the workers' batches."""
    from r1core.training import TrainSequence, adamw, policy_update

    model = ctx.wrap(TokenScorer(build_model(MICRO, tok, seed=0), cfg.compute.logits_chunk_tokens), cfg.compute)
    reference = ctx.wrap(TokenScorer(build_model(MICRO, tok, seed=1).requires_grad_(False), 64), cfg.compute,
                         trainable=False)
    optimizer = adamw(cfg, model)
    curves = {"grpo": [], "grpo_kl": []}
    for step in range(steps):
        prompts, completions = _rollouts(n=8, seed=step)
        advantages = torch.randn(8, generator=torch.Generator().manual_seed(100 + step)).tolist()
        seqs = [TrainSequence(*s) for s in zip(prompts, completions, advantages, strict=True)][ctx.rank :: ctx.world_size]
        out = policy_update(cfg, model, reference, optimizer, seqs, tok.pad_token_id, ctx)
        curves["grpo"].append(out["loss"])
        curves["grpo_kl"].append(out["kl"])
    return curves


def _run_all(d: Path, strategy: str, max_tokens: int | None, ctx_dir: Path) -> dict:
    """SFT and GRPO updates of the micro model under `strategy`; their curves, and the SFT model
    written as an HF directory (gathered from the shards under FSDP)."""
    from transformers import AutoTokenizer

    from tasks.ray_jobs import write_final_model

    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    packed = pack_examples(tok, json.loads((d / "sft.json").read_text()), 192)
    sft_cfg, grpo_cfg = _configs(strategy, max_tokens)
    sft_ctx = TrainContext(ctx_dir / "sft")
    sft_model = build_model(MICRO, tok, seed=0)
    sft_train(sft_cfg, sft_model, packed, sft_ctx, seed=0)
    write_final_model(sft_ctx, sft_model, tok, str(ctx_dir / "model"))
    return {"sft": [m["loss"] for _, m in sft_ctx.history],
            **_grpo_updates(grpo_cfg, tok, TrainContext(ctx_dir / "grpo"))}


def _resume_sft(d: Path, strategy: str, ckpt_dir: Path) -> list[float]:
    """SFT from a fresh init, resuming from the one checkpoint in `ckpt_dir`: the later steps' losses."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    packed = pack_examples(tok, json.loads((d / "sft.json").read_text()), 192)
    ctx = TrainContext(ckpt_dir)
    sft_train(_configs(strategy, None)[0], build_model(MICRO, tok, seed=7), packed, ctx, seed=0)
    return [m["loss"] for _, m in ctx.history]


def _ddp_reductions(d: Path, tok) -> dict[int, int]:
    """How often DDP all-reduces gradient buckets in one step of 1 and of 3 micro-batches."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    packed = pack_examples(tok, json.loads((d / "sft.json").read_text())[:6], 192)
    counts = {}
    for n in (1, 3):
        model = DistributedDataParallel(TokenScorer(build_model(MICRO, tok, seed=0), 64))
        calls = []

        def count(state, bucket, calls=calls):
            calls.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, count)
        rows = torch.arange(len(packed["input_ids"])).chunk(n)
        accumulate(model, [{k: v[r] for k, v in packed.items()} for r in rows], causal_lm_loss, TrainContext(d))
        counts[n] = len(calls)
    return counts


class _RankZeroSampler:
    """A remote rollout source kept in rank 0's process (a Ray actor would need a CPU this 2-CPU
    test has not got): a `PolicySampler` loaded from what the trainer publishes, sampling when
    a step is submitted, as a rollout worker's FIFO does."""

    remote = True

    def __init__(self, sampler):
        from r1core.rollout_sources import StepRollouts

        self.sampler, self.pending, self.step_rollouts = sampler, {}, StepRollouts

    def publish(self, version, weights):
        from r1core.rollout_sources import weight_chunks

        return self.sampler.load_weights(version, weight_chunks(weights, 1 << 16))

    def submit(self, step, prompts, n, sampling):
        self.pending[step] = self.sampler.generate(prompts, n, sampling)

    def collect(self, step):
        return self.step_rollouts(self.pending.pop(step), 0.0)

    def close(self):
        pass


def _remote_rollouts_on_two_ranks(d: Path, tok) -> dict:
    """GRPO under FSDP on 2 ranks with a remote source and k = 1: weights gathered across ranks to
    publish, rank 0's rollouts scattered (each rank its share), TIS on the behaviour log-probs."""
    import torch.distributed as dist

    from r1core.config import RolloutConfig
    from r1core.rollout_sources import PolicySampler

    rollout = RolloutConfig(backend="workers", max_staleness=1)
    cfg = _configs("fsdp", 300)[1].model_copy(update={"steps": 3})
    source = _RankZeroSampler(PolicySampler(build_model(MICRO, tok, seed=9), tok, 64, 64)) if dist.get_rank() == 0 else None
    ctx = TrainContext(d / f"w2-remote-{dist.get_rank()}")
    grpo_train(cfg, build_model(MICRO, tok, seed=0), build_model(MICRO, tok, seed=0), tok,
               json.loads((d / "rows.json").read_text()), ctx, seed=0, batch_size=64, rollout=rollout, source=source)
    return {"steps": [s for s, _ in ctx.history],
            **{k: [m[k] for _, m in ctx.history] for k in ("rollout/max_staleness", "rollout/logp_abs_diff")}}


def _two_worker_loop(config: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    d = Path(config["dir"])
    results = {s: _run_all(d, s, 300, d / f"w2-{s}") for s in ("ddp", "fsdp")}
    # GRPO as a stage runs it under FSDP: sampling from the gathered weights, reference sharded
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    ctx = TrainContext(d / "w2-grpo-stage")
    grpo_train(_configs("fsdp", 300)[1], build_model(MICRO, tok, seed=0), build_model(MICRO, tok, seed=0), tok,
               json.loads((d / "rows.json").read_text()), ctx, seed=0, batch_size=64)
    results["grpo_stage_steps"] = [s for s, _ in ctx.history]
    results["remote_rollouts"] = _remote_rollouts_on_two_ranks(d, tok)
    results["ddp_reductions"] = _ddp_reductions(d, tok)
    # resume on 2 workers from the FSDP run's step-2 checkpoint
    resume_dir = d / "w2-resume"
    if dist.get_rank() == 0:
        shutil.copytree(d / "w2-fsdp" / "sft" / "step_000002", resume_dir / "step_000002")
    dist.barrier()
    results["resume_fsdp"] = _resume_sft(d, "fsdp", resume_dir)
    if dist.get_rank() == 0:
        (d / "w2.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def strategy_runs(tokenizer, rows, tmp_path_factory):
    """One Ray Train job on 2 workers (DDP, FSDP, a resume) and the same recipes on 1 worker."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from r1core.config import RuntimeConfig
    from tasks.ray_jobs import ensure_ray

    d = tmp_path_factory.mktemp("strategies")
    tokenizer.save_pretrained(d / "tokenizer")
    (d / "rows.json").write_text(json.dumps(rows[0][:40]))
    (d / "sft.json").write_text(json.dumps([{"prompt": r["prompt"], "completion": f" <answer>{r['answer']}</answer>"}
                                            for r in rows[0][:32]]))
    ensure_ray(RuntimeConfig(num_cpus=2))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop lives in this test module
    result = TorchTrainer(_two_worker_loop, train_loop_config={"dir": str(d)}, torch_config=TorchConfig(backend="gloo"),
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(name="strategies", storage_path=str(d / "ray"))).fit()
    assert result.error is None, result.error
    two = json.loads((d / "w2.json").read_text())
    one = _run_all(d, "ddp", None, d / "w1")  # one worker, each step in one batch
    shutil.copytree(d / "w2-fsdp" / "sft" / "step_000002", d / "w1-resume" / "step_000002")
    one["resume_fsdp"] = _resume_sft(d, "ddp", d / "w1-resume")
    return d, one, two


@pytest.mark.slow
@pytest.mark.parametrize("curve", ["sft", "grpo", "grpo_kl"])
def test_fsdp_ddp_and_one_worker_give_the_same_losses(strategy_runs, curve):
    """fp32: the same losses within 1e-4 relative (reductions are summed in another order)."""
    _, one, two = strategy_runs
    assert len(one[curve]) == (SFT_STEPS if curve == "sft" else 3)
    assert two["ddp"][curve] == pytest.approx(one[curve], rel=1e-4, abs=1e-6)
    assert two["fsdp"][curve] == pytest.approx(one[curve], rel=1e-4, abs=1e-6)
    if curve != "grpo_kl":
        assert len(set(one[curve])) > 1  # the curves move: the comparison is not of constants
    assert all(v > 0 for v in one["grpo_kl"][1:])  # the policy left the reference: the KL term is live


@pytest.mark.slow
def test_the_final_model_is_a_plain_hf_directory_with_the_same_weights(strategy_runs):
    """Written by rank 0 from the gathered shards: transformers loads it, and its weights are
    those of DDP and of one worker."""
    from transformers import AutoModelForCausalLM

    d, _, two = strategy_runs
    one = AutoModelForCausalLM.from_pretrained(d / "w1" / "model").state_dict()
    for s in ("ddp", "fsdp"):
        loaded = AutoModelForCausalLM.from_pretrained(d / f"w2-{s}" / "model").state_dict()
        assert loaded.keys() == one.keys()
        for k, v in one.items():
            torch.testing.assert_close(loaded[k], v, rtol=1e-4, atol=1e-6, msg=f"{s}: {k}")
    assert two["grpo_stage_steps"] == [1, 2]  # a GRPO stage ran under FSDP, sampling included
    # ... and with a remote rollout source and k = 1: gathered publishes, scattered rollouts
    remote = two["remote_rollouts"]
    assert remote["steps"] == [1, 2, 3] and remote["rollout/max_staleness"] == [0.0, 1.0, 1.0], remote
    assert remote["rollout/logp_abs_diff"][0] < 1e-5, remote  # version 0: the sampler holds the trainer's weights


@pytest.mark.slow
def test_gradients_are_reduced_once_per_step_not_per_micro_batch(strategy_runs):
    _, _, two = strategy_runs
    assert two["ddp_reductions"]["3"] == two["ddp_reductions"]["1"] >= 1  # 3 micro-batches, one reduction


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_two_and_on_one_worker(strategy_runs):
    """Written by 2 FSDP workers at step 2; resumed on 2 (FSDP) and on 1 worker: steps 3-4's losses
    equal the uninterrupted run's within 1e-4 relative."""
    d, one, two = strategy_runs
    assert len(list((d / "w2-fsdp" / "sft" / "step_000002").glob("*.distcp"))) == 2  # one shard per worker
    assert two["resume_fsdp"] == pytest.approx(two["fsdp"]["sft"][2:], rel=1e-4)
    assert one["resume_fsdp"] == pytest.approx(two["fsdp"]["sft"][2:], rel=1e-4)


def test_activation_checkpointing_keeps_the_gradients_and_frees_the_activations(tokenizer, rows):
    """`gradient_checkpointing: true`: the same gradients; fewer tensors kept for backward."""
    from r1core import parallel

    ex = [{"prompt": r["prompt"], "completion": f" <answer>{r['answer']}</answer>"} for r in rows[0][:4]]
    packed = pack_examples(tokenizer, ex, 192)
    grads, saved = {}, {}
    for checkpointing in (False, True):
        compute = TrainComputeConfig(gradient_checkpointing=checkpointing)
        model = parallel.wrap(TokenScorer(build_model(MICRO, tokenizer, seed=0), 64), compute, torch.device("cpu"))
        model.train()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=sizes: s.append(t.numel()) or t, lambda t: t):
            total, n = causal_lm_loss(model, packed)
        (total / n).backward()
        grads[checkpointing], saved[checkpointing] = _grads(model), sum(sizes)
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, **TOL, msg=k)
    assert saved[True] < 0.5 * saved[False]


@pytest.mark.slow
def test_a_reward_model_trains_sharded_through_its_ray_train_loop(tokenizer, tmp_path):
    """The production path under FSDP on 2 workers (`RayContext`, the stage's worker loop): metrics
    reach the stage's MLflow run, every worker scores the held-out pairs (each forward gathers
    shards), and the model written is a plain HF sequence classifier."""
    from mlflow import MlflowClient
    from transformers import AutoModelForSequenceClassification

    from r1core.config import RewardModelConfig, RuntimeConfig
    from tasks import ray_jobs
    from tasks.jobs import RewardModelJob

    base = tmp_path / "base"
    build_model(MICRO, tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    for name, n, seed in (("train", 24, 1), ("heldout", 8, 2)):
        pairs = preference_pairs("helpfulness", n, ["en"], seed=seed)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sharded", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    compute = TrainComputeConfig(num_workers=2, cpus_per_worker=1, strategy="fsdp", max_tokens_per_microbatch=400)
    job = RewardModelJob(stage="reward_models/helpfulness", tracking_uri=uri, run_id=run_id, tracking_outage_s=60,
                         checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "model"), compute=compute,
                         seed=0, recipe=RewardModelConfig(batch_size=8, seq_len=96, log_every=1, checkpoint_every=2,
                                                          compute=compute),
                         init_model=str(base), train_file=str(tmp_path / "train.jsonl"), reward_model="helpfulness",
                         heldout_file=str(tmp_path / "heldout.jsonl"))
    ray_jobs.fit([(ray_jobs.reward_model_loop, job)], RuntimeConfig(workdir=str(tmp_path), num_cpus=2), run_name="rm-fsdp")
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert 0.0 <= client.get_metric_history(run_id, "eval/pairwise_accuracy")[0].value <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.score.weight.shape == (1, MICRO.hidden_size)
    assert len(list((tmp_path / "ckpt" / "step_000002").glob("*.distcp"))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: FSDP2's bf16 mixed precision (fp32 "
                    "master weights and reductions) runs on GPU only; `python bench/memory.py --gpu` measures it")
def test_fsdp_on_gpu_computes_in_bf16_and_keeps_fp32_master_weights(tokenizer):
    import socket

    import torch.distributed as dist

    from r1core import parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        compute = TrainComputeConfig(use_gpu=True, bf16=True, strategy="fsdp", logits_chunk_tokens=16)
        model = parallel.wrap(TokenScorer(build_model(MICRO, tokenizer, seed=0), 16), compute, torch.device("cuda"))
        prompts, completions = _rollouts(n=4)
        mb = collate_rollouts(prompts, completions, 0, layout="padded").to("cuda")
        seen = []
        handle = model.lm.get_decoder().layers[0].register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))
        logp, _ = mb.scored(model)
        (-logp.sum()).backward()
        handle.remove()
        assert seen == [torch.bfloat16] and logp.dtype == torch.float32
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()
