"""Reflection in a completion: the paper's "aha moment", measured.

During R1-Zero's RL the paper's outputs came to re-check and revise their own reasoning ("Wait,
wait. Wait. That's an aha moment I can flag here. Let's reevaluate this step-by-step", its
Table 3), with response length growing alongside. `reflection_rate` is the share of completions
whose chain of thought (`rewards.cot_text`: the <think> part, else all the text) does either:

- **says so**: a phrase of the lexicon below, in English or Russian, that re-checks ("check",
  "verify", "double-check", "let me recompute"; "проверка", "проверим", "перепроверим") or
  revises ("wait", "actually", "re-evaluate", "I made a mistake"; "подожди", "на самом деле",
  "ошибся", "пересчитаем"); or
- **revises a result**: states the same intermediate step twice with different results, e.g.
  "3 plus 4 is 8. ... 3 plus 4 is 7." ("3 плюс 4 будет 8 ... 3 плюс 4 будет 7").

The tiny corpus writes a re-check as "Check: 7 minus 4 is 3." ("Проверка: ..."); the revising
phrases occur in no training text here, so on the tiny profile the rate measures mostly re-checks
learnt from the long worked answers, and a revision is what RL alone would have to discover.
Scanning is linear in the text (no nested quantifiers) and reads at most `MAX_SCANNED_CHARS`.
"""
from __future__ import annotations

import re

from r1core.rewards import cot_text

MAX_SCANNED_CHARS = 8_000

LEXICON = {
    "en": (r"check(?:ing|ed)?", r"re-?check", r"double[- ]check", r"verif(?:y|ied|ying|ication)",
           r"wait", r"actually", r"re-?evaluat\w*", r"re-?consider\w*", r"re-?comput\w*", r"recalculat\w*",
           r"let me (?:re|try again|think again)", r"(?:i|that) (?:made|was) (?:a )?(?:mistake|wrong)",
           r"aha", r"hmm+"),
    "ru": (r"проверк\w*", r"провер(?:им|ю|ить|ь|яем)\w*", r"перепровер\w*", r"подожд\w*", r"стоп",
           r"на самом деле", r"пересчита\w*", r"ошиб(?:ся|лась|ка)\w*", r"хм+"),
}
_PHRASE = re.compile(r"(?<!\w)(?:" + "|".join(p for ps in LEXICON.values() for p in ps) + r")(?!\w)",
                     re.IGNORECASE)

_OPS = r"plus|minus|times|divided by|плюс|минус|умножить на|делить на|[-+*/×]"
# "a op b is c" / "a op b = c" / "a op b будет c": one intermediate step and its result
_STEP = re.compile(rf"(?<![\w.])(-?\d{{1,12}})\s{{0,3}}({_OPS})\s{{0,3}}(-?\d{{1,12}})\s{{0,3}}"
                   rf"(?:is|equals|=|будет|равно)\s{{0,3}}(-?\d{{1,12}})(?![\w])", re.IGNORECASE)


def says_reflection(text: str) -> bool:
    """A phrase of the lexicon in the text."""
    return _PHRASE.search(text[:MAX_SCANNED_CHARS]) is not None


def revises_a_result(text: str) -> bool:
    """The same step ("a op b") stated with two different results."""
    results: dict[tuple[str, str, str], str] = {}
    for a, op, b, c in _STEP.findall(text[:MAX_SCANNED_CHARS]):
        key = (a, op.lower(), b)
        if results.setdefault(key, c) != c:
            return True
    return False


def reflects(completion: str) -> bool:
    """Whether the completion's reasoning re-checks or revises itself (module docstring)."""
    cot = cot_text(completion)
    return says_reflection(cot) or revises_a_result(cot)


def reflection_rate(completions: list[str]) -> float:
    """Share of `completions` that reflect; 0 for none."""
    return sum(map(reflects, completions)) / len(completions) if completions else 0.0
