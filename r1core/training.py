"""The training recipes, framework-free: pretraining, SFT and GRPO.

Each recipe is one function driven by one typed config and a `TrainContext`, which says who
this worker is (rank, world size, device), how to wrap the model for data parallelism, where
metrics and checkpoints go, and which checkpoint to resume from. `tasks/` provides the Ray
Train context; the base `TrainContext` runs a recipe in-process (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1core import checkpoint as ckpt
from r1core import code_rewards, parallel
from r1core.batching import TokenBatch, collate_rollouts, pad_groups, split_rollouts
from r1core.config import RolloutConfig
from r1core.engine import Sampling, TorchEngine
from r1core.grpo import GRPOLoss, group_advantages, grpo_loss
from r1core.logprobs import TokenScorer, next_token_targets
from r1core.problems import GENERATORS
from r1core.reflection import reflection_rate
from r1core.rewards import format_reward, mixes_languages, score, unscored_counts
from r1core.rollout_sources import (
    InProcessRollouts,
    RolloutSource,
    StepRollouts,
    check_staleness,
    submittable_steps,
)

log = logging.getLogger("r1.train")


class TrainContext:
    """One worker of a training job. Rank, world size and the process group come from
    `torch.distributed` when it is initialised (a Ray Train worker, a benchmark's processes),
    else this is the only worker; a runner overrides what differs (device, logging, reporting)."""

    device: torch.device = torch.device("cpu")
    bf16: bool = False

    def __init__(self, checkpoint_dir: str | Path, log_fn=None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.history: list[tuple[int, dict]] = []
        self._log_fn = log_fn
        self.progress: tuple[int, int, float] | None = None  # (first step, total steps, start time)
        distributed = parallel.is_distributed()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1

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

    def wrap(self, model: torch.nn.Module, compute, *, trainable: bool = True) -> torch.nn.Module:
        """DDP or FSDP2 over the workers (`r1core.parallel`), on this worker's device."""
        return parallel.wrap(model, compute, self.device, trainable=trainable)

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], device=self.device)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def sum(self, value: float) -> float:
        return parallel.all_reduce(value, "sum", self.device)

    def max(self, value: float) -> float:
        return parallel.all_reduce(value, "max", self.device)

    def barrier(self) -> None:
        if parallel.is_distributed():
            torch.distributed.barrier()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.append((step, metrics))
        if self._log_fn:
            self._log_fn(metrics, step)

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints resume may start from, newest first."""
        return ckpt.complete_checkpoints(self.checkpoint_dir)

    def on_checkpoint(self, path: Path | None, step: int, metrics: dict) -> None:
        """Called on every rank after the checkpoint was committed (path is None but on rank 0)."""

    def on_resume(self, path: Path, step: int) -> None:
        """Called on every rank once the state of checkpoint `path` (of `step`) is loaded."""

    def finish(self) -> None:
        """Called by rank 0 at the end of the job, before its model is written."""

    def autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def save_checkpoint(ctx: TrainContext, model, optimizer, scheduler, step: int, metrics: dict):
    """Every worker writes its shard of the training state (`torch.distributed.checkpoint`) into
    one temporary directory; rank 0 then marks it complete and renames it, so a kill mid-save
    leaves the previous checkpoint the latest. Every rank then calls `on_checkpoint`."""
    final = ctx.checkpoint_dir / f"step_{step:06d}"
    tmp = final.with_name(f"{final.name}.tmp")  # one name for all workers; resume ignores it
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    ckpt.save_training_state(tmp, model, optimizer, scheduler, step, rank=ctx.rank)
    ctx.barrier()
    path = ckpt.commit(tmp, final, {"step": step, "workers": ctx.world_size}) if ctx.rank == 0 else None
    ctx.on_checkpoint(path, step, metrics)


def resume(ctx: TrainContext, model, optimizer, scheduler) -> int:
    """Step to start from: 0, or the step of the newest complete checkpoint whose files match
    its manifest and load (state loaded); each one passed over is logged with the reason."""
    for path in ctx.checkpoints():
        problem = ckpt.verify(path)
        if problem is None:
            try:
                step = ckpt.load_training_state(path, model, optimizer, scheduler)
            except RuntimeError as e:
                problem = str(e)
            else:
                if ctx.rank == 0:
                    log.info("resuming from %s (step %d)", path, step)
                ctx.on_resume(path, step)
                return step
        log.warning("checkpoint %s is not used: %s; trying the one before", path, problem)
    return 0


def accumulate(model, micro_batches: list, loss_fn, ctx: TrainContext) -> float:
    """Gradients of one optimizer step over its micro-batches, exactly those of one big batch.

    `loss_fn(model, micro_batch) -> (loss_sum, count)` returns a sum (over tokens, sequences or
    pairs) and how many it summed. Each micro-batch's sum is back-propagated as it is, with
    gradients reduced over workers only after the last one; the accumulated gradient is then
    divided by the step's global count (all micro-batches, all workers; DDP and FSDP average over
    workers, hence the world size). Returns the step's loss, Σ sums / Σ counts."""
    loss_sum = count = 0.0
    for i, batch in enumerate(micro_batches):
        with parallel.no_sync(model, last=i == len(micro_batches) - 1):
            with ctx.autocast():
                total, n = loss_fn(model, batch)
            total.backward()
        loss_sum, count = loss_sum + float(total.detach()), count + float(n)
    count = ctx.sum(count)
    scale = ctx.world_size / max(count, 1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return ctx.sum(loss_sum) / max(count, 1.0)


def clip_and_step(cfg, model, optimizer) -> float:
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    return parallel.grad_norm_value(grad_norm)


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


def pretrain(cfg, model, blocks: torch.Tensor, ctx: TrainContext, *, seed: int) -> dict:
    """Next-token prediction on packed blocks drawn at random; `cfg` is a `PretrainConfig`."""

    def batch(step: int) -> torch.Tensor:
        return torch.randint(len(blocks), (cfg.batch_size,), generator=step_generator(seed, step))

    return lm_train(cfg, cfg.steps, TokenScorer(model, cfg.compute.logits_chunk_tokens),
                    {"input_ids": blocks, "labels": blocks}, batch, ctx)


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


def sft_train(cfg, model, packed: dict[str, torch.Tensor], ctx: TrainContext, *, seed: int) -> dict:
    """Supervised fine-tuning on packed examples for `cfg.epochs` epochs (`cfg` is an
    `SFTConfig`); each epoch visits every packed row once, in an order fixed by (seed, epoch)."""
    n = len(packed["input_ids"])
    per_epoch = math.ceil(n / cfg.batch_size)

    def batch(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=step_generator(seed, epoch))
        return order[i * cfg.batch_size : (i + 1) * cfg.batch_size]

    return lm_train(cfg, cfg.epochs * per_epoch, TokenScorer(model, cfg.compute.logits_chunk_tokens), packed,
                    batch, ctx)


# --------------------------------------------------------------------------- reward models
def reward_model_train(cfg, model, pairs: dict[str, torch.Tensor], ctx: TrainContext, *,
                       seed: int) -> dict:
    """Bradley-Terry training of a reward model on encoded preference pairs
    (`r1core.reward_model.encode_pairs`) for `cfg.epochs` epochs; `cfg` is a `RewardModelConfig`."""
    from r1core.reward_model import bradley_terry_loss

    n = len(pairs["chosen_input_ids"])
    per_epoch = math.ceil(n / cfg.batch_size)

    def batch(step: int) -> torch.Tensor:
        epoch, i = divmod(step, per_epoch)
        return torch.randperm(n, generator=step_generator(seed, epoch))[i * cfg.batch_size : (i + 1) * cfg.batch_size]

    return lm_train(cfg, cfg.epochs * per_epoch, model, pairs, batch, ctx, loss_fn=bradley_terry_loss)


# --------------------------------------------------------------------------- the shared loop
def causal_lm_loss(scorer: TokenScorer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of next-token prediction (labels -100 are not scored) and the number
    of scored tokens; `position_ids` restarting at 0 mark packed examples."""
    positions, targets = next_token_targets(batch["input_ids"], batch["labels"])
    logp, _ = scorer(batch["input_ids"], batch.get("position_ids"), None, positions, targets)
    return -logp.sum(), len(targets)


def adamw(cfg, model) -> torch.optim.AdamW:
    """The optimizer of every recipe, from the stage's `OptimizerConfig` fields."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay)


def row_groups(rows: torch.Tensor, tokens_per_row: int, max_tokens: int | None, ctx: TrainContext) -> list:
    """This worker's rows of a step in micro-batches of at most `max_tokens` tokens, as many on
    every worker (an empty one holds a row of data with weight 0; `lm_train`)."""
    per_micro = len(rows) if max_tokens is None else max(1, max_tokens // tokens_per_row)
    groups = [rows[i : i + per_micro] for i in range(0, len(rows), per_micro)]
    return pad_groups(groups, int(ctx.max(len(groups))))


def lm_train(cfg, steps: int, model, data: dict[str, torch.Tensor], batch_indices, ctx: TrainContext,
             loss_fn=causal_lm_loss) -> dict:
    """`loss_fn` (default: cross-entropy on `input_ids`/`labels`/optional `position_ids`) on
    `data` rows, the rows of each step given by `batch_indices(step)` and split across ranks,
    then into micro-batches of `cfg.compute.max_tokens_per_microbatch` tokens; AdamW, warmup +
    cosine, metrics every `cfg.log_every` steps."""
    compute = cfg.compute
    model = ctx.wrap(model, compute)
    log_every = cfg.log_every
    optimizer = adamw(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, steps, cfg.min_lr_ratio))
    start = resume(ctx, model, optimizer, scheduler)
    model.train()
    row_tokens = sum(v.shape[1] for k, v in data.items() if k.endswith("input_ids"))
    metrics: dict = {}
    t0, window, tokens = time.perf_counter(), 0.0, 0
    ctx.begin(start, steps)
    for step in range(start, steps):
        idx = batch_indices(step)[ctx.rank :: ctx.world_size]
        micro = [({k: v[g if len(g) else idx[:1]].to(ctx.device) for k, v in data.items()}, len(g) > 0)
                 for g in row_groups(idx, row_tokens, compute.max_tokens_per_microbatch, ctx)]

        def micro_loss(m, item):
            batch, real = item
            total, n = loss_fn(m, batch)
            return (total, n) if real else (total * 0, 0)  # an empty micro-batch: same collectives, no gradient

        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(model, micro, micro_loss, ctx)
        grad_norm = clip_and_step(cfg, model, optimizer)
        scheduler.step()
        window += loss
        tokens += len(idx) * row_tokens * ctx.world_size
        done = step + 1
        if done % log_every == 0 or done == steps:
            n = (done - start) % log_every or log_every
            elapsed = time.perf_counter() - t0
            metrics = {"loss": window / n, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens / elapsed}
            ctx.log(metrics, done)
            t0, window, tokens = time.perf_counter(), 0.0, 0
        if done % cfg.checkpoint_every == 0 or done == steps:
            save_checkpoint(ctx, model, optimizer, scheduler, done, metrics)
    return metrics


# --------------------------------------------------------------------------- GRPO (R1-Zero)
@dataclass
class TrainSequence:
    """One rollout as the update trains on it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    behaviour_logp: list[float] | None = None  # the sampling engine's log-probs (remote sources)


def grpo_train(cfg, policy, reference, tokenizer, rows: list[dict], ctx: TrainContext, *,
               seed: int, batch_size: int, rollout: RolloutConfig | None = None,
               source: RolloutSource | None = None, reward_fn=None, sample_rows=None) -> dict:
    """GRPO (`cfg` is a `GRPOConfig`). Rewards: the rule rewards of `cfg.rewards`, unless
    `reward_fn(completions, rows) -> (total, per_reward)` is given (general RL routes rows to
    rules or reward models); each step's prompts are `cfg.prompts_per_step` rows drawn
    uniformly, unless `sample_rows(rng, n) -> indices` says otherwise (a mix of prompt kinds).

    Rollouts come from `rollout.backend` (default in_process: sampled here, from the policy being
    trained); a remote backend's `source` is given on rank 0 (`tasks.rollout_workers`), which
    shares each step's rollouts with the other ranks, and is told of every new weight version
    (`r1core.rollout_sources`: the staleness rule)."""
    rollout = rollout or RolloutConfig()
    remote = rollout.backend != "in_process"
    k = rollout.max_staleness
    if remote and ctx.rank == 0 and source is None:
        raise ValueError(f"rollout backend {rollout.backend}: no rollout source was given")
    reward_fn = reward_fn or (lambda texts, batch_rows: score(texts, batch_rows, cfg.rewards))
    sample_rows = sample_rows or (lambda rng, n: rng.sample(range(len(rows)), n))
    compute = cfg.compute
    sharded = compute.strategy == "fsdp" and parallel.is_distributed()
    # a sharded policy cannot generate (each decode step would gather parameters collectively,
    # and workers decode different lengths): in process, it samples from a full copy, refreshed every step
    sampler = copy.deepcopy(policy).to(ctx.device) if sharded and not remote else policy
    model = ctx.wrap(TokenScorer(policy, compute.logits_chunk_tokens), compute)
    if cfg.beta > 0:
        reference = ctx.wrap(TokenScorer(reference.eval().requires_grad_(False), compute.logits_chunk_tokens),
                             compute, trainable=False)
    else:
        reference = None
    model.train()  # a loaded model starts in eval mode; activation checkpointing acts in training mode only
    if not remote:
        source = InProcessRollouts(TorchEngine(sampler, tokenizer, batch_size))
    optimizer = adamw(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    start = resume(ctx, model, optimizer, scheduler)
    G = cfg.group_size
    problem_types = sorted({r["task"] for r in rows if r["task"] in GENERATORS})  # the same keys on every rank
    drives = ctx.rank == 0 or not remote  # this rank talks to the rollout source

    def prompts_of(step: int) -> list[dict]:
        picked = sample_rows(random.Random(seed * 1_000_003 + step), cfg.prompts_per_step)
        return [rows[i] for i in (picked if remote else picked[ctx.rank :: ctx.world_size])]

    def publish(version: int) -> float:
        if not remote:
            return 0.0
        if ctx.rank == 0:
            return source.publish(version, parallel.full_tensors(policy))
        if sharded:  # gathering a sharded weight is collective: every rank takes part
            for _ in parallel.full_tensors(policy):
                pass
        return 0.0

    sync_s = publish(start)  # a resumed run's engines start from the checkpoint's weights
    published, next_step = start, start
    metrics: dict = {}
    ctx.begin(start, cfg.steps)
    for step in range(start, cfg.steps):
        # 1. sample a group of G outputs for each question from the old policy (π_θold, or a
        #    behaviour policy at most k versions older), submitting every step the bound allows
        if sharded and not remote:
            sampler.load_state_dict(parallel.full_state_dict(policy, everywhere=True))
        if drives:
            for s in submittable_steps(published, k, next_step, cfg.steps):
                seed_s = seed * 7919 + s * 101 + (0 if remote else ctx.rank)
                source.submit(s, [r["prompt"] for r in prompts_of(s)], G, Sampling.from_config(cfg.sampling, seed=seed_s))
                next_step = s + 1
        got = source.collect(step) if drives else None
        batch = prompts_of(step)
        if remote:
            got = _share_rollouts(got, ctx)
            check_staleness(step, got.rollouts, k)
            batch = batch[ctx.rank :: ctx.world_size]
        rollouts = got.rollouts

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

        # 3. policy update on the sampled tokens
        t1 = time.perf_counter()
        prompt_ids = tokenizer([r["prompt"] for r in batch], add_special_tokens=False)["input_ids"]
        seqs = [TrainSequence(prompt_ids[rollouts[j].prompt_index], rollouts[j].completion_ids,
                              float(advantages[j]), rollouts[j].logprobs if remote else None) for j in kept]
        update = policy_update(cfg, model, reference, optimizer, seqs, tokenizer.pad_token_id, ctx,
                               tis_cap=rollout.tis_cap)
        scheduler.step()
        train_s = time.perf_counter() - t1
        trained_tokens = sum(len(q.prompt_ids) + len(q.completion_ids) for q in seqs)

        # 4. what the paper plots: reward, accuracy and response length per step
        n_tokens = float(sum(len(r.completion_ids) for r in rollouts))
        scored = [t for t in total if t is not None]
        metrics = {
            "reward": sum(scored) / max(1, len(scored)),
            # each reward's mean (reward/accuracy is the paper's accuracy curve), and accuracy by task
            **{f"reward/{k}": _mean(v) for k, v in per_reward.items()},
            **{f"accuracy_by_task/{task}": _mean(a for a, r in zip(per_reward.get("accuracy") or [None] * len(texts),
                                                           rollout_rows, strict=True) if r["task"] == task)
               for task in problem_types},
            "format_rate": _mean(format_reward(texts)),
            "language_mixing_rate": _mean(mixes_languages(t, r["language"]) for t, r in zip(texts, rollout_rows,
                                                                                             strict=True)),
            "response_length": n_tokens / len(rollouts),
            "reflection_rate": reflection_rate(texts),  # the "aha moment" (r1core/reflection.py)
            "truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            **update,
            "zero_variance_frac": float(zero_variance.float().mean()),
            "trained_frac": len(kept) / len(rollouts),
            "unscorable_frac": float(unscorable.float().mean()),
            # programs run for code rewards so far, by outcome ("unavailable": the sandbox could not run one)
            **{f"sandbox/{status}": float(n) for status, n in code_rewards.sandbox_counts(all_statuses=True).items()},
            # reward scores that were None so far, by reason (reference, timeout, error, sandbox)
            **{f"reward_none/{reason}": float(n) for reason, n in unscored_counts().items()},
            "gen_tokens_per_s": n_tokens / max(got.gen_s, 1e-9),
            "train_tokens_per_s": trained_tokens * cfg.inner_epochs / train_s,
            "time/gen_s": got.gen_s,
            "time/train_s": train_s,
        }
        if remote:
            metrics.update({"rollout/staleness": _mean(step - r.version for r in rollouts),
                            "rollout/max_staleness": float(max(step - r.version for r in rollouts)),
                            "rollout/restarts": float(got.restarts),
                            "time/sync_s": sync_s + got.sync_s, **got.extra})
        metrics = ctx.all_reduce_mean(metrics)
        if remote:
            _check_mismatch(rollout, metrics, step + 1)
        ctx.log(metrics, step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ctx, model, optimizer, scheduler, step + 1, metrics)
        sync_s = 0.0
        if (step + 1) % rollout.sync_every == 0 and step + 1 < cfg.steps:
            sync_s = publish(step + 1)
            published = step + 1
    return metrics


def _share_rollouts(got: StepRollouts | None, ctx: TrainContext) -> StepRollouts:
    """This rank's share of rank 0's rollouts of the step: those of prompts rank, rank + W, ...
    (prompt indices renumbered), as `prompts_of` splits prompts in process. Rank 0 sends each
    rank only its share (a scatter, not the whole step to everyone)."""
    if ctx.world_size == 1:
        return got
    shares = None
    if ctx.rank == 0:
        shares = [[] for _ in range(ctx.world_size)]
        for r in got.rollouts:
            shares[r.prompt_index % ctx.world_size].append(r)
            r.prompt_index //= ctx.world_size
        shares = [dataclasses.replace(got, rollouts=mine) for mine in shares]
    box: list = [None]
    torch.distributed.scatter_object_list(box, shares, src=0)
    return box[0]


def _check_mismatch(rollout: RolloutConfig, metrics: dict, step: int) -> None:
    """Warn (and with `mismatch_fail`, stop) when the behaviour policy strays from the trainer's."""
    kl = metrics.get("rollout/mismatch_kl", 0.0)
    metrics["rollout/mismatch_warning"] = float(kl > rollout.mismatch_warn_kl)
    if kl > rollout.mismatch_warn_kl:
        message = (f"step {step}: rollout-vs-trainer mismatch KL {kl:.3g} exceeds {rollout.mismatch_warn_kl:g} "
                   f"(mean |d log p| {metrics.get('rollout/logp_abs_diff', 0.0):.3g}, staleness "
                   f"{metrics.get('rollout/staleness', 0.0):.2g})")
        if rollout.mismatch_fail:
            raise RuntimeError(message)
        log.warning(message)


def policy_update(cfg, model, reference, optimizer, seqs: list[TrainSequence], pad_id: int,
                  ctx: TrainContext, *, tis_cap: float | None = None) -> dict[str, float]:
    """GRPO's update on this worker's rollouts `seqs`: `cfg.inner_epochs` optimizer steps, each
    over micro-batches of at most `compute.max_tokens_per_microbatch` tokens (as many on every
    worker), normalised over the whole step (`accumulate`). Rollouts with behaviour log-probs
    are weighted by truncated importance sampling (cap `tis_cap`, `r1core.grpo`). Returns the
    step's loss and diagnostics, the same on every worker."""
    compute = cfg.compute
    groups = split_rollouts([q.prompt_ids for q in seqs], [q.completion_ids for q in seqs],
                            compute.max_tokens_per_microbatch, compute.rollout_layout)
    behaviour = bool(seqs) and seqs[0].behaviour_logp is not None
    if behaviour and tis_cap is None:
        raise ValueError("rollouts with behaviour log-probs need a tis_cap")
    micro = []  # MicroBatch per micro-batch
    for g in pad_groups(groups, int(ctx.max(len(groups)))):
        mb = collate_rollouts([seqs[i].prompt_ids for i in g], [seqs[i].completion_ids for i in g], pad_id,
                              layout=compute.rollout_layout).to(ctx.device)
        with torch.no_grad(), ctx.autocast():
            ref_logp = mb.scored(reference)[0] if reference is not None else None
            # π_θold: the policy that sampled, i.e. the weights before this step's first pass; with
            # a single pass it equals π_θ there, so ρ = 1 and the clip cannot act (r1core.grpo)
            old_logp = mb.scored(model)[0] if cfg.inner_epochs > 1 else None
        behaviour_logp = _padded([seqs[i].behaviour_logp for i in g], mb).to(ctx.device) if behaviour else None
        micro.append(MicroBatch(mb, torch.tensor([seqs[i].advantage for i in g], device=ctx.device), ref_logp,
                                old_logp, behaviour_logp))
    clip_fractions = []  # of the passes after the first, where ρ can leave 1
    for inner in range(cfg.inner_epochs):
        stats: list[GRPOLoss] = []
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(model, micro, functools.partial(_grpo_micro_loss, cfg, tis_cap, stats), ctx)
        grad_norm = clip_and_step(cfg, model, optimizer)
        total = {f: ctx.sum(sum(getattr(s, f) for s in stats)) for f in _SUMMED}
        entropy_sum = ctx.sum(sum(s.entropy_sum for s in stats))
        if inner > 0:
            clip_fractions.append(total["clipped_tokens"] / max(total["tokens"], 1.0))
    n_scored = max(total["tokens"], 1.0)
    out = {"loss": loss, "policy_loss": total["policy_loss_sum"] / n_scored, "kl": total["kl_sum"] / n_scored,
           # logged only where clipping can act (inner_epochs > 1): a constant 0 would say nothing
           **({"clip_fraction": _mean(clip_fractions)} if clip_fractions else {}),
           "entropy": entropy_sum / n_scored, "grad_norm": grad_norm}
    if behaviour:  # behaviour policy vs π_θold on the same tokens (the last pass's; π_θold is fixed)
        out.update({"rollout/logp_abs_diff": total["logp_abs_diff_sum"] / n_scored,
                    "rollout/mismatch_kl": total["mismatch_kl_sum"] / n_scored,
                    "rollout/is_weight_mean": total["is_weight_sum"] / n_scored,
                    "rollout/is_weight_max": ctx.max(max(s.is_weight_max for s in stats)),
                    "rollout/is_truncated_frac": total["is_truncated_tokens"] / n_scored})
    return out


_SUMMED = ("policy_loss_sum", "kl_sum", "clipped_tokens", "tokens", "is_weight_sum", "is_truncated_tokens",
           "logp_abs_diff_sum", "mismatch_kl_sum")


@dataclass
class MicroBatch:
    """One micro-batch of GRPO's update and what stays fixed over its passes."""

    batch: TokenBatch
    advantages: torch.Tensor  # [B]
    ref_logp: torch.Tensor | None  # log π_ref, when β > 0
    old_logp: torch.Tensor | None  # log π_θold, when inner_epochs > 1 (else the first pass's, detached)
    behaviour_logp: torch.Tensor | None  # log μ, from a remote rollout source


def _padded(rows: list[list[float]], mb: TokenBatch) -> torch.Tensor:
    """Per-token values of each rollout as [num_seqs, width] (0 past a completion's end)."""
    out = torch.zeros(mb.num_seqs, mb.width)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(values)
    return out


def _grpo_micro_loss(cfg, tis_cap: float, stats: list, model, micro: MicroBatch) -> tuple[torch.Tensor, float]:
    """GRPO's loss sum on one micro-batch (`accumulate`); its diagnostics go to `stats`."""
    logp, entropy = micro.batch.scored(model, with_entropy=True)
    mask = micro.batch.completion_mask()
    old = logp.detach() if micro.old_logp is None else micro.old_logp
    out = grpo_loss(logp, old, micro.ref_logp, micro.advantages, mask,
                    clip_low=cfg.clip_low, clip_high=cfg.clip_high, beta=cfg.beta,
                    kl_estimator=cfg.kl_estimator, aggregation=cfg.loss_aggregation,
                    behaviour_logp=micro.behaviour_logp, tis_cap=tis_cap)
    out.entropy_sum = float((entropy * mask).sum())
    stats.append(out)
    return out.total, out.count


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else 0.0
