"""The torch engine's sampling speed, before and after, side by side in one run.

GRPO's rollouts on the tiny profile: groups of G = 8 samples of R1-Zero's train prompts at 16
and 64 prompts per call, R1-Zero's sampling settings (or `--section`'s). Two paths on the same
model, prompts and thread count, interleaved `--repeats` times (median kept):

- `generate (before)`: what `TorchEngine` did until issue 22, kept here as the reference only:
  transformers' `model.generate` on the prompts repeated G times, left-padded, so each prompt is
  prefilled G times and finished rows decode until the longest one stops;
- `TorchEngine (after)`: one prefill per prompt shared by its G samples, finished rows leave
  the batch (r1core/engine.py).

Real tokens are completion tokens up to and including EOS (padding after EOS is not counted).

    python bench/generation.py [--model DIR] [--config configs/tiny.yaml] [--section r1_zero]
                               [--prompts 16 64] [--repeats 3]

--model: an HF model directory (default: the newest `make demo` run's R1-Zero model, whose
completions stop as GRPO's do; else its base model; else a randomly initialised model of the
profile, which never stops early and so shows prefill sharing only).
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time

import torch

from r1core.config import load_config
from r1core.engine import Sampling, TorchEngine
from r1core.modeling import build_model, load_pretrained
from r1core.problems import generate_split


def default_model(cfg, rows) -> tuple[str, str]:
    for stage in ("r1_zero", "pretrain_base"):
        found = sorted(glob.glob(f".r1/runs/*/{stage}/model"), key=os.path.getmtime)
        if found:
            return found[-1], f"{stage} of a demo run"
    from r1core.problems import pretraining_corpus
    from r1core.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(pretraining_corpus(rows, cfg.pretrain.model_copy(update={"corpus_docs": 2000}),
                                                   seed=0), cfg.model.vocab_size)
    d = tempfile.mkdtemp(prefix="bench-generation-")
    build_model(cfg.model, tokenizer, seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d, "randomly initialised (never stops early)"


@torch.no_grad()
def generate_before(model, tok, prompts: list[str], n: int, sampling: Sampling, batch_size: int) -> list[list[int]]:
    """The engine before issue 22: `model.generate` on each prompt repeated n times."""
    model.eval()
    torch.manual_seed(sampling.seed)
    expanded = [p for p in prompts for _ in range(n)]
    completions = []
    for start in range(0, len(expanded), batch_size):
        enc = tok(expanded[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(**enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                             top_k=None, max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for seq in out[:, enc["input_ids"].shape[1] :].tolist():
            completions.append(seq[: seq.index(tok.eos_token_id) + 1] if tok.eos_token_id in seq
                               else [t for t in seq if t != tok.pad_token_id])
    return completions


def generate_after(model, tok, prompts: list[str], n: int, sampling: Sampling, batch_size: int) -> list[list[int]]:
    return [r.completion_ids for r in TorchEngine(model, tok, batch_size).generate(prompts, n, sampling)]


PATHS = {"generate (before)": generate_before, "TorchEngine (after)": generate_after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--section", default="r1_zero", help="the config section whose sampling and group size are used")
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    rows, _ = generate_split(cfg.data)
    model_dir, origin = (args.model, "given") if args.model else default_model(cfg, rows)
    model, tok = load_pretrained(model_dir)
    recipe = getattr(cfg, args.section)
    G, batch_size = recipe.group_size, cfg.rollout.batch_size
    print(f"model {model_dir} ({origin}); G = {G}, T {recipe.sampling.temperature}, top-p {recipe.sampling.top_p}, "
          f"{recipe.sampling.max_new_tokens} new tokens, {batch_size} rows per call, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    table = []
    for num_prompts in args.prompts:
        prompts = [r["prompt"] for r in rows[:num_prompts]]
        prompt_tokens = statistics.fmean(len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"])
        seconds: dict[str, list[float]] = {name: [] for name in PATHS}
        tokens: dict[str, list[int]] = {name: [] for name in PATHS}
        lengths: dict[str, list[float]] = {name: [] for name in PATHS}
        for repeat in range(args.repeats):
            sampling = Sampling.from_config(recipe.sampling, seed=repeat)
            for name, path in PATHS.items():  # interleaved: both see the same machine load
                t0 = time.perf_counter()
                completions = path(model, tok, prompts, G, sampling, batch_size)
                seconds[name].append(time.perf_counter() - t0)
                tokens[name].append(sum(map(len, completions)))
                lengths[name].append(statistics.fmean(map(len, completions)))
        rates = {name: statistics.median(t / s for t, s in zip(tokens[name], seconds[name], strict=True))
                 for name in PATHS}
        before, after = rates.values()
        for name in PATHS:
            table.append({"prompts x G": f"{num_prompts} x {G}", "path": name,
                          "prompt tokens": f"{prompt_tokens:.0f}",
                          "completion tokens": f"{statistics.fmean(lengths[name]):.1f}",
                          "s per call": f"{statistics.median(seconds[name]):.2f}",
                          "real tokens/s": f"{rates[name]:.0f}",
                          "after/before": f"{after / before:.2f}x" if name.endswith("(after)") else ""})
    keys = list(table[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
