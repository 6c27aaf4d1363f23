"""Reward models for general prompts (DeepSeek-R1, section 2.3.4), framework-free.

A reward model is the base causal LM with a scalar head (transformers' `*ForSequenceClassification`
with one label: the score is read at the last token), trained with the Bradley-Terry loss

    L = -log σ( r(x, y_chosen) - r(x, y_rejected) )

on preference pairs. As in the paper, two of them judge different parts of a response:
- helpfulness sees the question and only the final summary and answer (`final_part`), so the
  reasoning cannot win points by itself;
- harmlessness sees the question and the whole response, reasoning included, so harm hidden in
  the reasoning is caught.

The tiny profile synthesises pairs whose preference is real and checkable:
- helpfulness: the reference answer, brief and in the question's language, beats an evasive,
  padded, off-language or off-topic one. (Whether a capital or a translation is right is not
  among them: a tiny base pretrained on arithmetic knows no such facts for its reward model to
  check; a 2M-parameter RM trained on them scored at chance on held-out pairs.)
- harmlessness: a response with one of the configured unsafe phrases anywhere beats none; the
  preferred side gets a harmless phrase of similar length at the same place, so length tells
  nothing.

In general RL (`routed_rewards`) reasoning rows keep the rule rewards and general rows get the
reward models' scores; GRPO normalises rewards within each prompt's group, so the two scales
never meet.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from r1core.general_prompts import KINDS, example_parts, response
from r1core.problems import GENERATORS, final_of, long_cot, r1_zero_prompt, readable_response
from r1core.rewards import combine, parse_format, score

REWARD_MODELS = ("helpfulness", "harmlessness")
HARMLESS_PHRASES = ["take your time", "this is a good question", "let us be careful", "stay calm",
                    "не спеши", "это хороший вопрос", "будем внимательны", "сохраняй спокойствие"]
EVASIVE = {"en": "I can not say.", "ru": "Не могу сказать."}


# ------------------------------------------------------------------------------ what is scored
def final_part(completion: str) -> str:
    """The summary and answer of a well-formed response; otherwise what follows the last
    </think> (all of it when there is none)."""
    parsed = parse_format(completion)
    if parsed is not None:
        summary = "" if parsed.summary is None else f" <summary> {parsed.summary} </summary>"
        return f"{summary} <answer> {parsed.answer} </answer>"
    return completion.rsplit("</think>", 1)[-1]


def scored_text(model: str, question: str, completion: str) -> str:
    """The text a reward model scores: the question, then the part of the response it judges."""
    shown = final_part(completion) if model == "helpfulness" else completion
    return f"{question}\n{shown.strip()}"


# ------------------------------------------------------------------------------ preference pairs
def _general(rng: random.Random, languages: list[str], kinds=KINDS) -> tuple[str, str, str, str | None, str | None]:
    kind, language = rng.choice(kinds), rng.choice(languages)
    return (kind, language, *example_parts(kind, language, rng))


def helpfulness_pair(rng: random.Random, languages: list[str]) -> dict:
    """One pair: the reference response to a general question vs a worse one: evasive, padded
    (right but three times as long), in another language than the question's, or off topic (the
    answer to another kind of request)."""
    kind, language, question, answer, cot, summary = _general(rng, languages)
    corruptions = ["evasive", "padded", "off_topic"] + \
        ([] if kind == "translation" or len(languages) < 2 else ["other_language"])
    corruption = rng.choice(corruptions)
    if corruption == "off_topic":
        other_kind = rng.choice([k for k in KINDS if k != kind])
        _, other, other_cot, other_summary = example_parts(other_kind, language, rng)
        rejected = response(other_cot, other_summary, other)
    elif corruption == "other_language":  # the same kind of answer, in another language
        other_language = rng.choice([lang for lang in languages if lang != language])
        _, other, other_cot, other_summary = example_parts(kind, other_language, rng)
        rejected = response(other_cot, other_summary, other)
    elif corruption == "evasive":
        rejected = response(cot, summary and EVASIVE[language], EVASIVE[language])
    else:
        rejected = response(cot, summary and " ".join([summary] * 3), " ".join([answer] * 3))
    return {"question": question, "chosen": response(cot, summary, answer), "rejected": rejected,
            "kind": kind, "language": language, "corruption": corruption}


def harmlessness_pair(rng: random.Random, reasoning_rows: list[dict], languages: list[str],
                      unsafe_patterns: list[str]) -> dict:
    """One pair: a response with a harmless phrase vs the same response with an unsafe one, both
    put at the same random word position (in the reasoning, the summary or the answer)."""
    if reasoning_rows and rng.random() < 0.5:
        row = rng.choice(reasoning_rows)
        question, language, kind = row["question"], row["language"], row["task"]
        text = readable_response(*long_cot(row), final_of(row))
    else:
        kind, language, question, answer, cot, summary = _general(rng, languages)
        text = response(cot, summary, answer)
    words = text.split(" ")
    at = rng.randrange(2, len(words))

    def put(phrase: str) -> str:
        return " ".join(words[:at] + [phrase] + words[at:])

    return {"question": question, "chosen": put(rng.choice(HARMLESS_PHRASES)),
            "rejected": put(rng.choice(unsafe_patterns)), "kind": kind, "language": language,
            "corruption": "unsafe"}


def preference_pairs(model: str, n: int, languages: list[str], seed: int, reasoning_rows: list[dict] | None = None,
                     unsafe_patterns: list[str] | None = None) -> list[dict]:
    """`n` pairs `{question, chosen, rejected, kind, language, corruption}` for one reward model."""
    rng = random.Random(seed)
    if model == "helpfulness":
        return [helpfulness_pair(rng, languages) for _ in range(n)]
    if model == "harmlessness":
        if not unsafe_patterns:
            raise ValueError("harmlessness pairs need unsafe_patterns")
        return [harmlessness_pair(rng, reasoning_rows or [], languages, unsafe_patterns) for _ in range(n)]
    raise ValueError(f"unknown reward model '{model}'; known: {REWARD_MODELS}")


def general_prompts(n: int, mix: dict[str, float], languages: dict[str, float], seed: int) -> list[dict]:
    """General (non-reasoning) prompt rows for RL: `{id, task, language, question, prompt, answer}`."""
    rng = random.Random(seed)
    kinds, langs = list(mix), list(languages)
    rows = []
    for _ in range(n):
        kind = rng.choices(kinds, list(mix.values()))[0]
        language = rng.choices(langs, list(languages.values()))[0]
        question, answer, _, _ = example_parts(kind, language, rng)
        rows.append({"id": f"general-{len(rows)}", "task": kind, "language": language, "question": question,
                     "prompt": r1_zero_prompt(question), "answer": answer, "numbers": []})
    return rows


# ------------------------------------------------------------------------------ training
def encode_texts(tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts with EOS, right-padded to the longest; a text longer than `seq_len` keeps its end
    (the score is read at the last token). Returns (input_ids, attention_mask)."""
    ids = [enc[-(seq_len - 1):] + [tokenizer.eos_token_id]
           for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return out, mask


def encode_pairs(tokenizer, model: str, pairs: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """Both sides of each pair as `model` scores them (`encode_texts`), padded to one width."""
    sides = {side: encode_texts(tokenizer, [scored_text(model, p["question"], p[side]) for p in pairs], seq_len)
             for side in ("chosen", "rejected")}
    width = max(ids.shape[1] for ids, _ in sides.values())
    out = {}
    for side, (ids, mask) in sides.items():
        pad = width - ids.shape[1]
        out[f"{side}_input_ids"] = F.pad(ids, (0, pad), value=tokenizer.pad_token_id)
        out[f"{side}_attention_mask"] = F.pad(mask, (0, pad), value=0)
    return out


def rewards_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def bradley_terry_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Σ over pairs of -log σ(r_chosen - r_rejected), both sides in one forward pass, and the
    number of pairs (`r1core.training.accumulate` divides by the step's total)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    width = int(mask.sum(1).max())  # right-padded: columns past the batch's longest text are all padding
    chosen, rejected = rewards_of(model, ids[:, :width], mask[:, :width]).chunk(2)
    return -F.logsigmoid(chosen - rejected).sum(), len(chosen)


@torch.no_grad()
def pairwise_accuracy(model, encoded: dict[str, torch.Tensor], batch_size: int = 128) -> float:
    """Share of pairs whose chosen response scores higher than the rejected one."""
    model.eval()
    wins = 0
    n = len(encoded["chosen_input_ids"])
    device = next(model.parameters()).device
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size].to(device) for k, v in encoded.items()}
        chosen = rewards_of(model, b["chosen_input_ids"], b["chosen_attention_mask"])
        rejected = rewards_of(model, b["rejected_input_ids"], b["rejected_attention_mask"])
        wins += int((chosen > rejected).sum())
    return wins / max(1, n)


def init_reward_model(base_dir: str | Path, *, seed: int):
    """The base causal LM with a fresh scalar head (transformers' sequence classifier), the head
    initialised from `seed` (from the process's unseeded generator, two runs would differ)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ------------------------------------------------------------------------------ scoring in RL
class RewardModel:
    """A trained reward model scoring (question, response) pairs."""

    def __init__(self, name: str, path: str | Path, device: torch.device | str = "cpu", seq_len: int = 256,
                 batch_size: int = 128):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.seq_len, self.batch_size, self.device = name, seq_len, batch_size, device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def score(self, questions: list[str], completions: list[str]) -> list[float]:
        texts = [scored_text(self.name, q, c) for q, c in zip(questions, completions, strict=True)]
        ids, mask = encode_texts(self.tokenizer, texts, self.seq_len)
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            out += rewards_of(self.model, ids[i : i + self.batch_size].to(self.device),
                              mask[i : i + self.batch_size].to(self.device)).tolist()
        return out


def prompt_sampler(num_reasoning: int, num_general: int, mix: dict[str, float]):
    """For rows laid out reasoning first, then general: each step draws `mix` shares of each
    kind (`(rng, n) -> row indices`)."""
    share = mix.get("reasoning", 0.0) / sum(mix.values())

    def sample(rng: random.Random, n: int) -> list[int]:
        k = min(num_reasoning, round(n * share)) if num_general else n
        return rng.sample(range(num_reasoning), k) + [num_reasoning + i for i in rng.sample(range(num_general), n - k)]

    return sample


def routed_rewards(rule_weights: dict[str, float], model_weights: dict[str, float],
                   reward_models: dict[str, RewardModel]):
    """The general-RL reward: rows of a reasoning task (`GENERATORS`) get the weighted rule
    rewards, other rows the weighted reward-model scores. Returns a function
    `(completions, rows) -> (total, per_reward)`; a reward that does not apply to a row is None
    there (and left out of its mean)."""

    def reward(completions: list[str], rows: list[dict]):
        reasoning = [i for i, r in enumerate(rows) if r["task"] in GENERATORS]
        general = [i for i, r in enumerate(rows) if r["task"] not in GENERATORS]
        total: list[float | None] = [None] * len(rows)
        per_reward: dict[str, list[float | None]] = {k: [None] * len(rows) for k in [*rule_weights, *model_weights]}
        if reasoning:
            sub_total, sub = score([completions[i] for i in reasoning], [rows[i] for i in reasoning], rule_weights)
            for name, values in sub.items():
                for i, v in zip(reasoning, values, strict=True):
                    per_reward[name][i] = v
            for i, v in zip(reasoning, sub_total, strict=True):
                total[i] = v
        if general:
            questions = [rows[i]["question"] for i in general]
            texts = [completions[i] for i in general]
            sub = {name: reward_models[name].score(questions, texts) for name in model_weights}
            for name, values in sub.items():
                for i, v in zip(general, values, strict=True):
                    per_reward[name][i] = v
            for i, v in zip(general, combine(sub, model_weights), strict=True):
                total[i] = v
        return total, per_reward

    return reward



def general_rl_inputs(recipe, reasoning_rows: list[dict], languages: dict[str, float], seed: int,
                      reward_model_dirs: dict[str, str], device: torch.device | str = "cpu"):
    """What general RL trains on (`recipe`: a `GeneralRLConfig`): the reasoning rows followed by
    synthesised general prompts, the routed reward, and the sampler that draws each step's
    `prompt_mix` of both. Returns `(rows, reward_fn, sample_rows)` for `grpo_train`."""
    general = general_prompts(recipe.general_prompts, recipe.general_mix, languages, seed=seed)
    scorers = {name: RewardModel(name, reward_model_dirs[name], device) for name in recipe.model_rewards}
    return (reasoning_rows + general, routed_rewards(recipe.rewards, recipe.model_rewards, scorers),
            prompt_sampler(len(reasoning_rows), len(general), recipe.prompt_mix))
