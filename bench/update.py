"""GRPO's update (the optimizer step on a step's rollouts) in each rollout layout, side by side.

The rollouts are real: groups of G = 8 samples of R1-Zero's train prompts from the model, with
R1-Zero's sampling, at 16 and 64 prompts per step. The same rollouts and advantages then go
through `policy_update` (forward and backward of the policy, the reference's forward for β > 0,
one AdamW step) from the same weights in each layout (`compute.rollout_layout`,
r1core/batching.py), interleaved `--repeats` times (median kept):

- `padded`: one row per rollout, the prompt left-padded (what the update did until issue 22);
- `packed`: rollouts packed into rows without padding;
- `shared_prompt`: one row per group, its prompt computed once.

Tokens are the positions the forward computes (rows × width of every micro-batch).

    python bench/update.py [--model DIR] [--config configs/tiny.yaml] [--prompts 16 64] [--repeats 3]

--model: as bench/generation.py (the newest `make demo` run's R1-Zero model, else a randomly
initialised one of the profile, whose completions run to the token budget).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from generation import default_model

from r1core.batching import collate_rollouts, split_rollouts
from r1core.config import load_config
from r1core.engine import Sampling, TorchEngine
from r1core.logprobs import TokenScorer
from r1core.modeling import load_pretrained
from r1core.problems import generate_split
from r1core.training import TrainContext, TrainSequence, policy_update

LAYOUTS = ("padded", "packed", "shared_prompt")


def rollouts(model, tokenizer, rows, n_prompts: int, grpo, batch_size: int) -> list[TrainSequence]:
    prompts = [r["prompt"] for r in rows[:n_prompts]]
    s = grpo.sampling
    got = TorchEngine(model, tokenizer, batch_size).generate(
        prompts, grpo.group_size, Sampling(s.temperature, s.top_p, s.max_new_tokens, seed=0))
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    advantages = torch.randn(len(got), generator=torch.Generator().manual_seed(0)).tolist()
    return [TrainSequence(prompt_ids[r.prompt_index], r.completion_ids, a) for r, a in zip(got, advantages, strict=True)]


def forward_tokens(seqs: list[TrainSequence], layout: str, max_tokens, pad_id: int) -> int:
    prompts, completions = [q.prompt_ids for q in seqs], [q.completion_ids for q in seqs]
    return sum(collate_rollouts([prompts[i] for i in g], [completions[i] for i in g], pad_id, layout=layout)
               .input_ids.numel() for g in split_rollouts(prompts, completions, max_tokens, layout))


def time_update(grpo, layout: str, policy, reference, seqs, pad_id: int) -> tuple[float, float]:
    cfg = grpo.model_copy(update={"compute": grpo.compute.model_copy(update={"rollout_layout": layout})})
    model = TokenScorer(copy.deepcopy(policy), cfg.compute.logits_chunk_tokens)
    ref = TokenScorer(reference, cfg.compute.logits_chunk_tokens) if cfg.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    out = policy_update(cfg, model, ref, optimizer, seqs, pad_id, TrainContext("unused"))
    return time.perf_counter() - t0, out["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--section", default="r1_zero", help="the GRPO section whose settings the update uses")
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    grpo = getattr(cfg, args.section)
    train, _ = generate_split(cfg.data)
    model_dir, origin = (args.model, "given") if args.model else default_model(cfg, train)
    policy, tokenizer = load_pretrained(model_dir)
    reference = copy.deepcopy(policy).eval()
    pad = tokenizer.pad_token_id
    print(f"GRPO update ({args.section}: G = {grpo.group_size}, beta {grpo.beta}, micro-batch budget "
          f"{grpo.compute.max_tokens_per_microbatch}), {args.threads} threads, model {model_dir} ({origin}); "
          f"median of {args.repeats}, layouts interleaved")
    print(f"{'prompts x G':<12} {'layout':<14} {'forward tokens':>15} {'s/update':>9} {'vs padded':>10} {'loss':>10}")
    for n in args.prompts:
        seqs = rollouts(policy, tokenizer, train, n, grpo, cfg.rollout.batch_size)
        times = {layout: [] for layout in LAYOUTS}
        losses = {}
        time_update(grpo, "padded", policy, reference, seqs[: grpo.group_size], pad)  # warm-up
        for _ in range(args.repeats):
            for layout in LAYOUTS:
                seconds, losses[layout] = time_update(grpo, layout, policy, reference, seqs, pad)
                times[layout].append(seconds)
        base = statistics.median(times["padded"])
        for layout in LAYOUTS:
            t = statistics.median(times[layout])
            tokens = forward_tokens(seqs, layout, grpo.compute.max_tokens_per_microbatch, pad)
            print(f"{f'{n} x {grpo.group_size}':<12} {layout:<14} {tokens:>15} {t:>9.2f} {base / t:>9.2f}x "
                  f"{losses[layout]:>10.5f}")
    completion = statistics.mean(len(q.completion_ids) for q in seqs)
    prompt = statistics.mean(len(q.prompt_ids) for q in seqs)
    print(f"mean prompt {prompt:.0f} tokens, mean completion {completion:.1f} tokens (the last row's rollouts)")


if __name__ == "__main__":
    main()
