"""The training recipes, framework-free: pretraining, SFT and GRPO.

Each recipe is one function driven by one typed config and a `TrainContext`, which says who
this worker is (rank, world size, device), how to wrap the model for data parallelism, where
metrics and checkpoints go, and which checkpoint to resume from. `tasks/` provides the Ray
Train context; the base `TrainContext` runs a recipe in-process (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch

from r1core import checkpoint as ckpt
from r1core import code_rewards
from r1core.engine import Sampling, TorchEngine
from r1core.grpo import group_advantages, grpo_loss, token_logprobs
from r1core.problems import GENERATORS
from r1core.rewards import format_reward, mixes_languages, score, unscored_counts


class TrainContext:
    """Single-process defaults; a distributed runner overrides what differs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    bf16: bool = False

    def __init__(self, checkpoint_dir: str | Path, log_fn=None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.history: list[tuple[int, dict]] = []
        self._log_fn = log_fn
        self.progress: tuple[int, int, float] | None = None  # (first step, total steps, start time)

    def begin(self, start: int, total: int) -> None:
        """The loop runs steps start..total-1 from now on: what progress lines (rate, ETA) count."""
        self.progress = (start, total, time.perf_counter())

    def progress_line(self, step: int) -> str:
        """`step 7/16, 0.11 steps/s, ETA 1m22s` (after `begin`)."""
        if self.progress is None:
            return f"step {step}"
        start, total, began = self.progress
        rate = (step - start) / max(time.perf_counter() - began, 1e-9)
        eta = (total - step) / rate if rate > 0 else float("inf")
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta != float("inf") else "?"
        return f"step {step}/{total}, {rate:.3g} steps/s, ETA {eta_text}"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.append((step, metrics))
        if self._log_fn:
            self._log_fn(metrics, step)

    def latest_checkpoint(self) -> Path | None:
        return ckpt.latest_complete(self.checkpoint_dir)

    def on_checkpoint(self, path: Path | None, step: int, metrics: dict) -> None:
        """Called on every rank after rank 0 wrote a checkpoint (path is None elsewhere)."""

    def autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def save_checkpoint(ctx: TrainContext, model, tokenizer, optimizer, scheduler, step: int, metrics: dict):
    """Rank 0 writes the checkpoint atomically; every rank then calls `on_checkpoint`
    (distributed runners need all ranks to take part in reporting it)."""
    path = None
    if ctx.rank == 0:
        path = ckpt.write_atomically(
            ctx.checkpoint_dir / f"step_{step:06d}",
            lambda d: ckpt.save_training_state(d, unwrap(model), tokenizer, optimizer, scheduler, step),
            meta={"step": step},
        )
    ctx.on_checkpoint(path, step, metrics)


def resume(ctx: TrainContext, model, optimizer, scheduler) -> int:
    """Step to start from: 0, or the step of the latest complete checkpoint (weights loaded)."""
    path = ctx.latest_checkpoint()
    return ckpt.load_training_state(path, unwrap(model), optimizer, scheduler) if path else 0


def step_generator(seed: int, step: int) -> torch.Generator:
    """Data order is a function of (seed, step): a resumed run sees what it would have seen."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# --------------------------------------------------------------------------- stage 0: pretraining
def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into [N, seq_len] blocks."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def warmup_cosine(warmup: int, total: int, floor: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def pretrain(cfg, model, tokenizer, blocks: torch.Tensor, ctx: TrainContext, *, seed: int) -> dict:
    """Next-token prediction on packed blocks drawn at random; `cfg` is a `PretrainConfig`."""

    def batch(step: int) -> torch.Tensor:
        return torch.randint(len(blocks), (cfg.batch_size,), generator=step_generator(seed, step))

    return lm_train(cfg, cfg.steps, model, tokenizer, {"input_ids": blocks, "labels": blocks}, batch, ctx)


# --------------------------------------------------------------------------- SFT
def pack_examples(tokenizer, examples: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """Pack `{prompt, completion}` examples into `[N, seq_len]` rows, first fit in order.

    Loss is on completion tokens (and the EOS after them) only: prompt tokens get label -100.
    Position ids restart at 0 for every example; with no attention mask, transformers reads
    that as packed sequences and keeps each example's attention to itself (given use_cache=False)."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([e["completion"] for e in examples], add_special_tokens=False)["input_ids"]
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = p + c + [tokenizer.eos_token_id]
        if len(ids) > seq_len:
            raise ValueError(f"SFT example {i} has {len(ids)} tokens, more than seq_len={seq_len}")
        labels = [-100] * len(p) + c + [tokenizer.eos_token_id]
        for row in rows:
            if len(row[0]) + len(ids) <= seq_len:
                break
        else:
            row = ([], [], [])
            rows.append(row)
        row[0].extend(ids)
        row[1].extend(labels)
        row[2].extend(range(len(ids)))
    out = {"input_ids": torch.full((len(rows), seq_len), tokenizer.pad_token_id),
           "labels": torch.full((len(rows), seq_len), -100),
           "position_ids": torch.zeros((len(rows), seq_len), dtype=torch.long)}
    for j, (ids, labels, pos) in enumerate(rows):
        out["input_ids"][j, : len(ids)] = torch.tensor(ids)
        out["labels"][j, : len(ids)] = torch.tensor(labels)
        out["position_ids"][j, : len(ids)] = torch.tensor(pos)
        out["position_ids"][j, len(ids):] = torch.arange(seq_len - len(ids))  # padding: its own sequence
    return out


def sft_train(cfg, model, tokenizer, packed: dict[str, torch.Tensor], ctx: TrainContext, *, seed: int) -> dict:
    """Supervised fine-tuning on packed examples for `cfg.epochs` epochs (`cfg` is an
    `SFTConfig`); each epoch visits every packed row once, in an order fixed by (seed, epoch)."""
    n = len(packed["input_ids"])
    per_epoch = math.ceil(n / cfg.batch_size)

    def batch(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=step_generator(seed, epoch))
        return order[i * cfg.batch_size : (i + 1) * cfg.batch_size]

    return lm_train(cfg, cfg.epochs * per_epoch, model, tokenizer, packed, batch, ctx)


# --------------------------------------------------------------------------- reward models
def reward_model_train(cfg, model, tokenizer, pairs: dict[str, torch.Tensor], ctx: TrainContext, *,
                       seed: int) -> dict:
    """Bradley-Terry training of a reward model on encoded preference pairs
    (`r1core.reward_model.encode_pairs`) for `cfg.epochs` epochs; `cfg` is a `RewardModelConfig`."""
    from r1core.reward_model import bradley_terry_loss

    n = len(pairs["chosen_input_ids"])
    per_epoch = math.ceil(n / cfg.batch_size)

    def batch(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        return torch.randperm(n, generator=step_generator(seed, epoch))[i * cfg.batch_size : (i + 1) * cfg.batch_size]

    return lm_train(cfg, cfg.epochs * per_epoch, model, tokenizer, pairs, batch, ctx, loss_fn=bradley_terry_loss)


# --------------------------------------------------------------------------- the shared loop
def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of next-token prediction (labels -100 are ignored)."""
    return model(**batch, use_cache=False).loss


def adamw(cfg, model) -> torch.optim.AdamW:
    """The optimizer of every recipe, from the stage's `OptimizerConfig` fields."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


def lm_train(cfg, steps: int, model, tokenizer, data: dict[str, torch.Tensor], batch_indices, ctx: TrainContext,
             loss_fn=causal_lm_loss) -> dict:
    """`loss_fn` (default: cross-entropy on `input_ids`/`labels`/optional `position_ids`) on
    `data` rows, the rows of each step given by `batch_indices(step)` and split across ranks;
    AdamW, warmup + cosine, metrics every `cfg.log_every` steps."""
    model = ctx.wrap(model)
    log_every = cfg.log_every
    optimizer = adamw(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, steps, cfg.min_lr_ratio))
    start = resume(ctx, model, optimizer, scheduler)
    model.train()
    metrics: dict = {}
    t0, window, tokens = time.perf_counter(), 0.0, 0
    ctx.begin(start, steps)
    for step in range(start, steps):
        idx = batch_indices(step)[ctx.rank :: ctx.world_size]
        inputs = {k: v[idx].to(ctx.device) for k, v in data.items()}
        with ctx.autocast():
            loss = loss_fn(model, inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        window += loss.item()
        tokens += sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids")) * ctx.world_size
        done = step + 1
        if done % log_every == 0 or done == steps:
            n = (done - start) % log_every or log_every
            elapsed = time.perf_counter() - t0
            metrics = ctx.all_reduce_mean({"loss": window / n, "grad_norm": float(grad_norm)})
            metrics.update(lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / elapsed)
            ctx.log(metrics, done)
            t0, window, tokens = time.perf_counter(), 0.0, 0
        if done % cfg.checkpoint_every == 0 or done == steps:
            save_checkpoint(ctx, model, tokenizer, optimizer, scheduler, done, metrics)
    return metrics


# --------------------------------------------------------------------------- GRPO (R1-Zero)
def collate(tokenizer, prompts: list[str], rollouts, device) -> tuple[torch.Tensor, ...]:
    """[left-padded prompt | completion | right padding] with masks; returns
    (input_ids, attention_mask, completion_mask, completion_start)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    width = max(1, *(len(r.completion_ids) for r in rollouts))
    comp = torch.full((len(rollouts), width), tokenizer.pad_token_id, dtype=torch.long)
    comp_mask = torch.zeros((len(rollouts), width), dtype=torch.long)
    for j, r in enumerate(rollouts):
        comp[j, : len(r.completion_ids)] = torch.tensor(r.completion_ids, dtype=torch.long)
        comp_mask[j, : len(r.completion_ids)] = 1
    rows = torch.tensor([r.prompt_index for r in rollouts])
    input_ids = torch.cat([prompt_ids[rows], comp], dim=1).to(device)
    attention_mask = torch.cat([prompt_mask[rows], comp_mask], dim=1).to(device)
    return input_ids, attention_mask, comp_mask.to(device), prompt_ids.shape[1]


def grpo_train(cfg, policy, reference, tokenizer, rows: list[dict], ctx: TrainContext, *,
               seed: int, batch_size: int, reward_fn=None, sample_rows=None) -> dict:
    """GRPO (`cfg` is a `GRPOConfig`). Rewards: the rule rewards of `cfg.rewards`, unless
    `reward_fn(completions, rows) -> (total, per_reward)` is given (general RL routes rows to
    rules or reward models); each step's prompts are `cfg.prompts_per_step` rows drawn
    uniformly, unless `sample_rows(rng, n) -> indices` says otherwise (a mix of prompt kinds)."""
    reward_fn = reward_fn or (lambda texts, batch_rows: score(texts, batch_rows, cfg.rewards))
    sample_rows = sample_rows or (lambda rng, n: rng.sample(range(len(rows)), n))
    model = ctx.wrap(policy)
    reference = reference.to(ctx.device).eval().requires_grad_(False) if cfg.beta > 0 else None
    engine = TorchEngine(unwrap(model), tokenizer, batch_size)
    optimizer = adamw(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    start = resume(ctx, model, optimizer, scheduler)
    G = cfg.group_size
    problem_types = sorted({r["task"] for r in rows if r["task"] in GENERATORS})  # the same keys on every rank
    metrics: dict = {}
    ctx.begin(start, cfg.steps)
    for step in range(start, cfg.steps):
        # 1. sample a group of G outputs for each question from the current (old) policy
        picked = sample_rows(random.Random(seed * 1_000_003 + step), cfg.prompts_per_step)
        batch = [rows[i] for i in picked[ctx.rank :: ctx.world_size]]
        t0 = time.perf_counter()
        rollouts = engine.generate([r["prompt"] for r in batch], G,
                                   Sampling.from_config(cfg.sampling, seed=seed * 7919 + step * 101 + ctx.rank))
        gen_s = time.perf_counter() - t0

        # 2. rewards and group-relative advantages
        texts = [r.text for r in rollouts]
        rollout_rows = [batch[r.prompt_index] for r in rollouts]
        total, per_reward = reward_fn(texts, rollout_rows)
        unscorable = torch.tensor([t is None for t in total])
        rewards = torch.tensor([0.0 if t is None else t for t in total])
        advantages, zero_variance = group_advantages(rewards, G, scale=cfg.scale_rewards)
        unscorable = unscorable.view(-1, G).any(dim=1, keepdim=True).expand(-1, G).reshape(-1)
        advantages = advantages.masked_fill(unscorable, 0.0)
        # a group whose rewards are all equal has no policy gradient (A = 0): with
        # `skip_flat_groups` it is left out of the update (DAPO's dynamic-sampling filter), so its
        # tokens do not dilute the step's gradient and its forward/backward passes are saved; one
        # output is always kept (with DDP every rank takes part in the backward pass)
        kept = [j for j in range(len(rollouts))
                if not (cfg.skip_flat_groups and (zero_variance[j] or unscorable[j]))] or [0]
        advantages = advantages[kept].to(ctx.device)

        # 3. policy update on the sampled tokens
        t1 = time.perf_counter()
        input_ids, attn, mask, start_col = collate(tokenizer, [r["prompt"] for r in batch],
                                                   [rollouts[j] for j in kept], ctx.device)
        with torch.no_grad(), ctx.autocast():
            ref_logp = token_logprobs(reference, input_ids, attn, start_col) if reference is not None else None
            # π_θold: the policy that sampled, i.e. the weights before this step's first pass; with a
            # single pass it equals π_θ there, so ρ = 1 and the clip cannot act (r1core.grpo)
            old_logp = token_logprobs(model, input_ids, attn, start_col) if cfg.inner_epochs > 1 else None
        clip_fractions = []  # of the passes after the first, where ρ can leave 1
        for inner in range(cfg.inner_epochs):
            with ctx.autocast():
                logp, entropy = token_logprobs(model, input_ids, attn, start_col, return_entropy=True)
                out = grpo_loss(logp, logp.detach() if old_logp is None else old_logp, ref_logp, advantages,
                                mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, beta=cfg.beta,
                                kl_estimator=cfg.kl_estimator, aggregation=cfg.loss_aggregation)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            if inner > 0:
                clip_fractions.append(out.clip_fraction)
        scheduler.step()
        train_s = time.perf_counter() - t1

        # 4. what the paper plots: reward, accuracy and response length per step
        n_tokens = float(sum(len(r.completion_ids) for r in rollouts))
        scored = [t for t in total if t is not None]
        metrics = {
            "reward": sum(scored) / max(1, len(scored)),
            **{f"reward/{k}": _mean(v) for k, v in per_reward.items()},
            "accuracy": _mean(per_reward.get("accuracy", [])),
            **{f"accuracy/{task}": _mean(a for a, r in zip(per_reward.get("accuracy") or [None] * len(texts),
                                                           rollout_rows, strict=True) if r["task"] == task)
               for task in problem_types},
            "format_rate": _mean(format_reward(texts)),
            "language_mixing_rate": _mean(mixes_languages(t, r["language"]) for t, r in zip(texts, rollout_rows,
                                                                                             strict=True)),
            "response_length": n_tokens / len(rollouts),
            "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "loss": out.loss.item(),
            "policy_loss": out.policy_loss,
            "kl": out.kl,
            # logged only where clipping can act (inner_epochs > 1): a constant 0 would say nothing
            **({"clip_fraction": _mean(clip_fractions)} if clip_fractions else {}),
            "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
            "grad_norm": float(grad_norm),
            "zero_variance_frac": float(zero_variance.float().mean()),
            "trained_frac": len(kept) / len(rollouts),
            "unscorable_frac": float(unscorable.float().mean()),
            # programs run for code rewards so far, by outcome ("unavailable": the sandbox could not run one)
            **{f"sandbox/{status}": float(n) for status, n in code_rewards.sandbox_counts(all_statuses=True).items()},
            # reward scores that were None so far, by reason (reference, timeout, error, sandbox)
            **{f"reward_none/{reason}": float(n) for reason, n in unscored_counts().items()},
            "gen_tokens_per_s": n_tokens / gen_s,
            "train_tokens_per_s": float(attn.sum()) * cfg.inner_epochs / train_s,
        }
        metrics = ctx.all_reduce_mean(metrics)
        ctx.log(metrics, step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ctx, model, tokenizer, optimizer, scheduler, step + 1, metrics)
    return metrics


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0
