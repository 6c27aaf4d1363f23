"""The recipes in-process: learning happens, checkpoints are atomic, resume is exact."""
import copy

import pytest
import torch

from r1core import checkpoint as ckpt
from r1core.config import GRPOConfig, ModelConfig, PretrainConfig
from r1core.modeling import build_model
from r1core.problems import pretraining_corpus
from r1core.training import TrainContext, grpo_train, pack, pretrain

MICRO = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


class Killed(Exception):
    pass


class KillAt(TrainContext):
    """Dies right after logging step `at`, as a preempted worker would."""

    def __init__(self, checkpoint_dir, at):
        super().__init__(checkpoint_dir)
        self.at = at

    def log(self, metrics, step):
        super().log(metrics, step)
        if step == self.at:
            raise Killed(step)


@pytest.fixture(scope="module")
def blocks(rows, tokenizer):
    return pack(tokenizer, pretraining_corpus(rows[0], PretrainConfig(corpus_docs=300), seed=0), 64)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pretraining_lowers_the_loss(tokenizer, blocks, tmp_path):
    cfg = PretrainConfig(steps=60, batch_size=8, lr=1e-2, warmup_steps=5, checkpoint_every=100, seq_len=64,
                         log_every=5)
    ctx = TrainContext(tmp_path)
    pretrain(cfg, build_model(MICRO, tokenizer), blocks, ctx, seed=0)
    losses = [m["loss"] for _, m in ctx.history]
    assert losses[-1] < 0.7 * losses[0]
    assert ckpt.complete_checkpoints(tmp_path)[0].name == "step_000060"


def test_pretraining_resumes_exactly_after_a_kill(tokenizer, blocks, tmp_path):
    cfg = PretrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=2, seq_len=64,
                         log_every=1)
    straight = build_model(MICRO, tokenizer, seed=1)
    pretrain(cfg, straight, blocks, TrainContext(tmp_path / "a"), seed=0)

    killed = build_model(MICRO, tokenizer, seed=1)
    with pytest.raises(Killed):
        pretrain(cfg, killed, blocks, KillAt(tmp_path / "b", at=5), seed=0)
    assert ckpt.complete_checkpoints(tmp_path / "b")[0].name == "step_000004"
    (tmp_path / "b" / "step_000006.tmp-999").mkdir()  # debris of a kill mid-write is ignored
    resumed = build_model(MICRO, tokenizer, seed=2)  # different init: everything must come from the checkpoint
    ctx = TrainContext(tmp_path / "b")
    pretrain(cfg, resumed, blocks, ctx, seed=0)
    assert [s for s, _ in ctx.history] == [5, 6]  # resumed at step 5, not from scratch
    for k, v in _weights(straight).items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_grpo_improves_reward_on_a_learnable_signal(tokenizer, rows, tmp_path):
    """A dense reward (share of digits in the completion) rises within a few GRPO steps."""
    torch.manual_seed(0)
    model = build_model(MICRO, tokenizer)
    cfg = GRPOConfig(steps=20, prompts_per_step=4, group_size=8, lr=2e-2, beta=0.0, rewards={"format": 1.0},
                     sampling={"max_new_tokens": 6}, checkpoint_every=100)
    from r1core import rewards as R

    def digit_share(completions, **_):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    R.register("digit_share")(digit_share)
    try:
        cfg = cfg.model_copy(update={"rewards": {"digit_share": 1.0}})
        ctx = TrainContext(tmp_path)
        grpo_train(cfg, model, None, tokenizer, rows[0], ctx, seed=0, batch_size=256)
    finally:
        del R.REWARDS["digit_share"], R.REWARD_VERSIONS["digit_share"]
    rewards = [m["reward"] for _, m in ctx.history]
    assert sum(rewards[:3]) / 3 < 0.1 and sum(rewards[-3:]) / 3 > 0.5, rewards
    for key in ("kl", "entropy", "response_length", "zero_variance_frac", "gen_tokens_per_s",
                "reward_none/reference", "reward_none/timeout", "reward_none/error", "reward_none/sandbox"):
        assert key in ctx.history[-1][1]
    assert "clip_fraction" not in ctx.history[-1][1]  # one pass per batch: the ratio is 1, nothing to clip


def test_grpo_clips_only_from_the_second_pass_over_a_batch(tokenizer, rows, tmp_path):
    """With `inner_epochs` 2 the second pass sees ratios away from 1; at a large step and a
    tiny clip range some are clipped, and `clip_fraction` (logged then only) says so."""
    from r1core import rewards as R

    R.register("length_share")(lambda completions, **_: [len(c) / 40 for c in completions])  # dense: never flat
    try:
        cfg = GRPOConfig(steps=2, prompts_per_step=4, group_size=4, inner_epochs=2, lr=5e-2, clip_low=0.01,
                         clip_high=0.01, beta=0.0, rewards={"length_share": 1.0}, sampling={"max_new_tokens": 6},
                         checkpoint_every=100)
        ctx = TrainContext(tmp_path)
        grpo_train(cfg, build_model(MICRO, tokenizer, seed=3), None, tokenizer, rows[0], ctx, seed=0, batch_size=256)
    finally:
        del R.REWARDS["length_share"], R.REWARD_VERSIONS["length_share"]
    fractions = [m["clip_fraction"] for _, m in ctx.history]
    assert len(fractions) == 2 and max(fractions) > 0 and all(f <= 1.0 for f in fractions), fractions


def test_grpo_steps_on_when_rows_cannot_be_scored_and_counts_why(tokenizer, rows, tmp_path):
    """Rows whose reference no rule can score (a chain sum with a prose answer, a Countdown row
    without numbers, a code row without tests) give None, not a crash: their groups get
    advantage 0 and the reason is counted in `reward_none/reference`."""
    broken = [{**r, "answer": "banana"} if r["task"] == "chain_sum" else
              {**r, "numbers": []} if r["task"] == "countdown" else {**r, "task": "code", "tests": None}
              for r in rows[0][:12]]
    cfg = GRPOConfig(steps=2, prompts_per_step=3, group_size=2, lr=1e-3, beta=0.0,
                     rewards={"accuracy": 1.0, "format": 0.5}, sampling={"max_new_tokens": 5}, checkpoint_every=100)
    ctx = TrainContext(tmp_path)
    grpo_train(cfg, build_model(MICRO, tokenizer, seed=5), None, tokenizer, broken, ctx, seed=0, batch_size=256)
    first, last = ctx.history[0][1], ctx.history[-1][1]
    assert first["unscorable_frac"] == 1.0 and last["reward_none/reference"] >= first["reward_none/reference"] + 6
    assert last["reward_none/error"] == first["reward_none/error"]


@pytest.mark.parametrize("skip", [True, False])
def test_grpo_leaves_flat_groups_out_of_the_update(tokenizer, rows, tmp_path, skip):
    """Groups whose rewards are all equal have A = 0: with `skip_flat_groups` only one output
    (for DDP) goes through the update; either way, with no KL term, the weights do not move."""
    from r1core import rewards as R

    R.register("constant")(lambda completions, **_: [1.0] * len(completions))
    try:
        cfg = GRPOConfig(steps=2, prompts_per_step=3, group_size=4, lr=1e-2, beta=0.0, rewards={"constant": 1.0},
                         skip_flat_groups=skip, sampling={"max_new_tokens": 5}, checkpoint_every=100)
        model = build_model(MICRO, tokenizer, seed=4)
        before = copy.deepcopy(_weights(model))
        ctx = TrainContext(tmp_path)
        grpo_train(cfg, model, None, tokenizer, rows[0], ctx, seed=0, batch_size=256)
    finally:
        del R.REWARDS["constant"], R.REWARD_VERSIONS["constant"]
    assert [m["zero_variance_frac"] for _, m in ctx.history] == [1.0, 1.0]
    assert [m["trained_frac"] for _, m in ctx.history] == ([1 / 12] * 2 if skip else [1.0] * 2)
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, before[k], msg=k)


def test_grpo_resumes_exactly_after_a_kill(tokenizer, rows, tmp_path):
    cfg = GRPOConfig(steps=4, prompts_per_step=2, group_size=2, lr=1e-3, beta=0.1, checkpoint_every=2,
                     sampling={"max_new_tokens": 5})
    base = build_model(MICRO, tokenizer, seed=3)
    straight = copy.deepcopy(base)
    grpo_train(cfg, straight, copy.deepcopy(base), tokenizer, rows[0], TrainContext(tmp_path / "a"), seed=0, batch_size=256)
    killed = copy.deepcopy(base)
    with pytest.raises(Killed):
        grpo_train(cfg, killed, copy.deepcopy(base), tokenizer, rows[0], KillAt(tmp_path / "b", at=3), seed=0, batch_size=256)
    resumed = copy.deepcopy(base)
    ctx = TrainContext(tmp_path / "b")
    grpo_train(cfg, resumed, copy.deepcopy(base), tokenizer, rows[0], ctx, seed=0, batch_size=256)
    assert [s for s, _ in ctx.history] == [3, 4]
    for k, v in _weights(straight).items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(d):
        (d / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.write_atomically(tmp_path / "step_000001", boom)
    assert ckpt.complete_checkpoints(tmp_path) == []
    assert not (tmp_path / "step_000001").exists()


def test_progress_lines_give_rate_and_eta():
    import time

    ctx = TrainContext("/nonexistent")
    assert ctx.progress_line(3) == "step 3"
    ctx.progress = (2, 12, time.perf_counter() - 4.0)  # resumed at step 2, 4 steps done in 4 s
    line = ctx.progress_line(6)
    assert line.startswith("step 6/12, 1 steps/s, ETA 0m0") and line[-3:] in ("06s", "05s")
