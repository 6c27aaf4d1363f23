"""Cold-start data (DeepSeek-R1, section 2.3.1): a small set of long, readable chains of thought.
(`tasks/cold_start.py` is the same stage one layer down: it runs these functions on Ray Data.)

Three routes, as the paper names them, each producing candidate completions for train prompts:

- `few_shot`: the base model continues a prompt of long-CoT exemplars (question, reasoning
  with a verification step, summary, answer) followed by a new question;
- `direct`: the base model is asked directly for a detailed answer with reflection and
  verification ("solve step by step, check the result, then sum up");
- `rewrite_r1_zero`: R1-Zero's outputs that verify are rewritten into the readable format by
  rules: each reasoning step is parsed, checked, written in the prompt's language, followed by
  the verification step and a summary (what the paper had human annotators post-process).

Every candidate is then verified and filtered (`rejection_reason`): the answer must verify,
the completion must be readable (think, summary, answer; no language mixing) and bounded in
length. Kept examples are deduplicated, at most `per_problem` per problem. The result is a
set of SFT examples `{prompt, completion}` where `prompt` is the row's R1 prompt.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from r1core.problems import PHRASES, final_of, long_cot, readable_response
from r1core.rewards import final_answer, mixes_languages, parse_format, verify

ROUTES = ("few_shot", "direct", "rewrite_r1_zero")
# which model a route samples from: the base, or the R1-Zero checkpoint
ROUTE_MODEL = {"few_shot": "base", "direct": "base", "rewrite_r1_zero": "r1_zero"}


def direct_prompt(row: dict) -> str:
    """A direct request, in the row's language, for a detailed answer that checks itself."""
    return f"{PHRASES[row['language']]['instruction']} {row['question']}"


def exemplar(row: dict) -> str:
    """A long-CoT exemplar: the request and its readable worked answer."""
    return direct_prompt(row) + readable_response(*long_cot(row), final_of(row))


def few_shot_prompt(row: dict, exemplars: list[dict], separator: str) -> str:
    """Exemplars (documents joined by `separator`, the tokenizer's end-of-text), then the request.
    (A bare question after the exemplars would read, to a small base model, as the start of an
    ordinary document: it answers tersely, as most of its corpus does.)"""
    return separator.join([exemplar(e) for e in exemplars] + [direct_prompt(row)])


def route_prompts(route: str, rows: list[dict], shots: int, separator: str, seed: int) -> list[dict]:
    """One generation request per row: `{**row, route, generation_prompt}`."""
    rng = random.Random(seed)
    by_language: dict[str, list[dict]] = {}
    for r in rows:
        by_language.setdefault(r["language"], []).append(r)
    out = []
    for row in rows:
        if route == "few_shot":  # exemplars in the row's language, never its own problem
            pool = by_language[row["language"]]
            drawn = rng.sample(pool, min(shots + 1, len(pool)))
            text = few_shot_prompt(row, [r for r in drawn if r["problem"] != row["problem"]][:shots], separator)
        elif route == "direct":
            text = direct_prompt(row)
        elif route == "rewrite_r1_zero":
            text = row["prompt"]
        else:
            raise ValueError(f"unknown cold-start route '{route}'; known: {ROUTES}")
        out.append({**row, "route": route, "generation_prompt": text})
    return out


# --------------------------------------------------------------------- rewriting R1-Zero outputs
_OPS = {word: op for ph in PHRASES.values() for op, word in ph["ops"].items()}
_VERBS = "|".join(re.escape(ph["step"].split("{b}")[1].split("{c}")[0].strip()) for ph in PHRASES.values())
STEP = re.compile(
    r"(-?\d+)\s+(" + "|".join(sorted(map(re.escape, _OPS), key=len, reverse=True)) + r"|[+\-*])\s+(-?\d+)\s+(?:"
    + _VERBS + r"|=)\s+(-?\d+)"
)
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_steps(cot: str) -> list[list] | None:
    """The arithmetic steps `[a, op, b, c]` of a chain of thought in any of our languages (or
    symbols), or None if there are none or one is wrong."""
    steps = []
    for a_text, op_text, b_text, c_text in STEP.findall(cot):
        op, a, b, c = _OPS.get(op_text, op_text), int(a_text), int(b_text), int(c_text)
        if op not in APPLY or APPLY[op](a, b) != c:
            return None
        steps.append([a, op, b, c])
    return steps or None


def rewrite_readable(row: dict, completion: str) -> str | None:
    """R1-Zero's completion rewritten readable: its own steps, in the row's language, then a
    verification step and a summary. None when it does not verify or its steps don't parse."""
    parsed = parse_format(completion)
    if parsed is None or not verify(parsed.answer, row):
        return None
    steps = parse_steps(parsed.think)
    if steps is None:
        return None
    reasoning, summary = long_cot({**row, "steps": steps})
    return readable_response(reasoning, summary, parsed.answer)


# --------------------------------------------------------------------- verification and filters
def rejection_reason(example: dict, max_words: int) -> str | None:
    """Why a candidate `{completion, answer, task, numbers, language}` is not kept, or None."""
    completion = example.get("completion")
    if not completion:
        return "not_rewritable" if example.get("route") == "rewrite_r1_zero" else "empty"
    parsed = parse_format(completion)
    if parsed is None or parsed.summary is None:
        return "malformed"
    if not verify(final_answer(completion), example):
        return "unverified"
    if mixes_languages(completion, example["language"]):
        return "language_mixing"
    if len(completion.split()) > max_words:
        return "too_long"
    return None


def finish_candidate(request: dict, max_words: int) -> dict:
    """A sampled (or user-given) request turned into a candidate example with its verdict:
    R1-Zero outputs are rewritten readable first; `rejection` is '' for a kept candidate."""
    raw = request.get("completion") or ""
    completion = rewrite_readable(request, raw) if request["route"] == "rewrite_r1_zero" else raw
    example = {
        "id": request["id"], "problem": request.get("problem") or request["prompt"], "route": request["route"],
        "language": request["language"], "task": request["task"], "answer": str(request["answer"]),
        "numbers": list(request.get("numbers") or []), "prompt": request["prompt"],
        "question": request.get("question") or request["prompt"],
        "completion": completion or "", "raw_completion": raw,
    }
    example["rejection"] = rejection_reason(example, max_words) or ""
    return example


def select(candidates: list[dict], per_problem: int) -> list[dict]:
    """Kept candidates (no rejection reason), exact duplicates dropped, at most `per_problem`
    per problem, in a stable order."""
    seen, per = set(), Counter()
    out = []
    for c in candidates:
        key = (c["prompt"], " ".join(c["completion"].split()))
        if c.get("rejection") or key in seen or per[c["problem"]] >= per_problem:
            continue
        seen.add(key)
        per[c["problem"]] += 1
        out.append(c)
    return out


def route_counts(candidates: list[dict], kept: list[dict]) -> dict[str, float]:
    """Per route: candidates, each rejection reason, and kept examples (for MLflow)."""
    counts: Counter[str] = Counter()
    for c in candidates:
        counts[f"{c['route']}/candidates"] += 1
        if c.get("rejection"):
            counts[f"{c['route']}/rejected_{c['rejection']}"] += 1
    for c in kept:
        counts[f"{c['route']}/kept"] += 1
    return dict(sorted(counts.items()))
