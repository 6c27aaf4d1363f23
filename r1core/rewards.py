"""Rule rewards, as a registry of named callables `(completions, **columns) -> list[float | None]`.

`None` means "cannot be scored" (an unparseable reference answer, a check that ran out of time,
a sandbox that could not run the program, an error inside a check): it is never silently turned
into 0 or 1; GRPO gives such groups zero advantage, and `unscored_counts()` counts the reasons
(logged per GRPO step as `reward_none/<reason>`). No input makes a reward raise or hang: input
is capped in length before any parsing, parsing is linear, math-verify runs behind a hard time
limit (r1core/math_check.py) and any exception inside one completion's check is its None.

The completion is the model's text after the prompt, tags kept. The R1 format is
    <think> reasoning </think> [<summary> summary </summary>] <answer> final answer </answer>
with nothing before or after but whitespace; the summary block is the readable format of the
cold-start data and later stages (optional for R1-Zero). Every check reads text through
`language.normalise` (NFKC, invisible characters removed): a block with nothing visible in it
is empty. Tags are found before NFKC, so full-width look-alikes of `<` and `>` are not tags.

The answer block holds the answer alone, of the kind the row's task declares (`answer_kind`):
- `integer`: an integer literal (`7`, `+7`, `-7`, `−7`, `7.0`, `1,000`, `$7` as currency, full-width
  digits, wrapped in `$…$`, `\\(…\\)`, `\\boxed{…}`, optionally after "The answer is" / "Answer:" /
  "Ответ:" and with a final period);
- `number`: the same, or a decimal, a reduced fraction `a/b` or `\\frac{a}{b}`, scientific `1.5e3`;
- `math`: a number as above when the reference is a number, else one symbolic answer that
  math-verify proves equal to the reference (no relation, hedge word, separator or second math
  span that the reference itself does not have);
- `countdown`: an expression using each of the row's numbers once and only the row's operations;
- `code`: a program or expression run in the sandbox against the row's tests (code_rewards).
An expression (`3 + 5 - 2`), several candidates (`6 or 7`, `6 → 7`, `7 = 6`) or reasoning in
the answer block is not an answer of the first three kinds and scores 0.
"""
from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from math import gcd
from typing import NamedTuple

from r1core import code_rewards, math_check
from r1core.expressions import OPERATORS, integer_expression
from r1core.expressions import value as expression_value
from r1core.language import has_visible, language_consistency, language_words, normalise, strip_invisible
from r1core.problems import TASK_ANSWER_KINDS

RewardFn = Callable[..., list[float | None]]
REWARDS: dict[str, RewardFn] = {}
REWARD_VERSIONS: dict[str, str] = {}


def register(name: str, version: str = "1") -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        REWARD_VERSIONS[name] = version
        return fn

    return add


# ------------------------------------------------------------------------------ why a score is None
UNSCORED_REASONS = ("reference", "timeout", "error", "sandbox")
_unscored: Counter[str] = Counter()
_unscored_lock = threading.Lock()


def count_unscored(reason: str) -> None:
    """Count one None score for `reason` (returns None, the score)."""
    with _unscored_lock:
        _unscored[reason] += 1


def unscored_counts() -> dict[str, int]:
    """Scores this process returned as None so far, by reason (every reason, zeros too):
    `reference` (the row's reference cannot be scored), `timeout` (math-verify ran out of
    time), `error` (a check raised), `sandbox` (the sandbox could not run a program)."""
    with _unscored_lock:
        return {r: _unscored.get(r, 0) for r in UNSCORED_REASONS}


def guarded(check: Callable[..., bool | None], *args) -> bool | None:
    """`check(*args)`, with any exception or time-out turned into None and counted."""
    try:
        verdict = check(*args)
    except math_check.Timeout:
        count_unscored("timeout")
        return None
    except Exception:  # noqa: BLE001 - one completion's broken check must not stop a training step
        count_unscored("error")
        return None
    return verdict


# ------------------------------------------------------------------------------ the format
MAX_COMPLETION_CHARS = 65536  # ~16k tokens; longer texts are not well-formed (and not parsed)
MAX_ANSWER_CHARS = 512  # an answer block of a non-code task is one value, not an essay
TAG = re.compile(r"</?(?:think|summary|answer)>")
R1_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
READABLE_TAGS = ["<think>", "</think>", "<summary>", "</summary>", "<answer>", "</answer>"]


class Parsed(NamedTuple):
    think: str
    answer: str
    summary: str | None  # None: no summary block

    @property
    def cot(self) -> str:
        """The chain of thought: the reasoning and its summary (all but the final answer)."""
        return self.think if self.summary is None else f"{self.think} {self.summary}"


def _tags(text: str, at_most: int) -> list[re.Match] | None:
    """The tags of `text` in order, or None when there are more than `at_most` (linear time)."""
    found = []
    for m in TAG.finditer(text):
        found.append(m)
        if len(found) > at_most:
            return None
    return found


def parse_format(completion: str) -> Parsed | None:
    """The blocks when the completion is exactly one think block, optionally one summary block,
    and one answer block, each with visible content, and nothing else but whitespace; else None."""
    if len(completion) > MAX_COMPLETION_CHARS:
        return None
    text = strip_invisible(completion)
    tags = _tags(text, len(READABLE_TAGS))
    if tags is None or [m.group() for m in tags] not in (R1_TAGS, READABLE_TAGS):
        return None
    bounds = [0, *(i for m in tags for i in (m.start(), m.end())), len(text)]
    # the text between tags alternates: outside, inside, outside, inside, ... (tags themselves skipped)
    between = [normalise(text[bounds[i]:bounds[i + 1]]) for i in range(0, len(bounds) - 1, 2)]
    outside, inside = between[0::2], between[1::2]
    if any(p.strip() for p in outside) or not all(map(has_visible, inside)):
        return None
    inside = [p.strip() for p in inside]
    return Parsed(inside[0], inside[-1], inside[1] if len(inside) == 3 else None)


def final_answer(completion: str) -> str | None:
    """The content of the last <answer> block that stands after the reasoning, without invisible
    characters (not NFKC-normalised: it may be code; the checks of other kinds normalise it).

    An answer written inside <think> does not count: only text after the last </think>
    (or the whole completion when there is no think block) is searched."""
    if len(completion) > MAX_COMPLETION_CHARS:
        return None
    text = strip_invisible(completion)
    tail = text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text
    end = tail.rfind("</answer>")
    start = tail.rfind("<answer>", 0, end) if end >= 0 else -1
    return None if start < 0 else tail[start + len("<answer>"):end].strip()


def loose_answer(completion: str, task: str) -> str | None:
    """The last answer the text states wherever it stands (format-agnostic accuracy)."""
    text = normalise(TAG.sub(" ", completion[:MAX_COMPLETION_CHARS]))
    if task == "countdown":
        exprs = [e.strip() for e in re.findall(r"[\d\s+\-*/()]+", text) if re.search(r"\d", e)]
        return exprs[-1] if exprs else None
    numbers = re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?", text)
    return numbers[-1] if numbers else None


# ------------------------------------------------------------------------------ answer kinds
def answer_kind(row: dict) -> str:
    """What the row's answer must be: the row's own `answer_kind`, else its task's (code tasks:
    `code`; the synthetic tasks declare theirs in `problems.TASK_ANSWER_KINDS`), else `math`."""
    if row.get("answer_kind"):
        return row["answer_kind"]
    if code_rewards.is_code_task(row.get("task")):
        return "code"
    return TASK_ANSWER_KINDS.get(row.get("task"), "math")


# "The answer is 7." / "Answer: 7" / "Ответ: 7": the one phrase allowed before a number
ANSWER_PHRASE = re.compile(r"^(?:(?:the\s+)?(?:final\s+)?answer(?:\s+is|\s*:)|(?:итак,?\s+)?ответ\s*(?::|—|-)?)\s*",
                           re.IGNORECASE)
WRAPPERS = [re.compile(p, re.DOTALL) for p in (r"^\$\$(.*)\$\$$", r"^\$(.*)\$$", r"^\\\((.*)\\\)$",
                                               r"^\\\[(.*)\\\]$", r"^\\(?:boxed|fbox)\{(.*)\}$")]
SIGN = r"[+\-\u2212]?"
INTEGER = re.compile(rf"({SIGN})(\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.0+)?")
DECIMAL = re.compile(rf"({SIGN})(\d+\.\d+|\.\d+|\d+)(?:[eE]([+\-]?\d{{1,3}}))?")
FRACTION = re.compile(rf"({SIGN})(\d+)/(\d+)")
LATEX_FRACTION = re.compile(rf"({SIGN})\\[dt]?frac\{{\s*(\d+)\s*\}}\{{\s*(\d+)\s*\}}")


def _bare(answer: str) -> str:
    """The value inside an answer: without the allowed phrase, a final period and the wrappers."""
    s = ANSWER_PHRASE.sub("", answer.strip(), count=1).strip()
    if s.startswith("$") and s.count("$") == 1:  # a currency sign ("$18", GSM8K-style), not LaTeX
        s = s[1:].strip()
    for _ in range(4):  # e.g. "$\boxed{7}$": a few levels, each at most once
        s = s.rstrip(".").strip()
        for wrapper in WRAPPERS:
            m = wrapper.fullmatch(s)
            if m:
                s = m.group(1).strip()
                break
        else:
            break
    return s


def parse_number(text: str, kind: str = "number") -> Fraction | None:
    """The exact value of one number literal of `kind` (`integer` or `number`), or None for
    anything else: an expression, several values, words."""
    s = _bare(text) if len(text) <= MAX_ANSWER_CHARS else ""
    s = s.replace(" ", "") if re.fullmatch(r"[+\-\u2212]\s+\d.*", s) else s  # "- 7"
    if m := INTEGER.fullmatch(s):
        value = Fraction(int(m.group(2).replace(",", "")))
    elif kind == "integer":
        return None
    elif m := DECIMAL.fullmatch(s):
        value = Fraction(m.group(2)) * Fraction(10) ** int(m.group(3) or 0)
    elif m := FRACTION.fullmatch(s) or LATEX_FRACTION.fullmatch(s):
        num, den = int(m.group(2)), int(m.group(3))
        if den < 2 or gcd(num, den) != 1:  # "8/1" and "14/2" are computations, not literals
            return None
        value = Fraction(num, den)
    else:
        return None
    return -value if m.group(1) in ("-", "\u2212") else value


# Marks of a second candidate or of a statement, in an answer of the `math` kind: allowed only
# where the reference itself has them (an interval has a comma, an equation an "=").
HEDGE_MARKS = ("=", "≠", "<", ">", "≤", "≥", "≈", "±", "∓", "→", "←", "↔", "⇒", "⇔", "⟹", "⟶", "∨", "∧", "&", "|",
               ";", ",", "\n", "\\\\", "\\lor", "\\vee", "\\land", "\\wedge", "\\quad", "\\qquad",
               "\\newline", "\\cr", "\\text", "\\mbox", "\\mathrm", "\\textrm", "\\textbf", "\\implies",
               "\\iff", "\\to", "\\rightarrow", "\\Rightarrow", "\\leftarrow", "\\Leftrightarrow", "\\neq",
               "\\ne", "\\le", "\\ge", "\\approx", "\\pm", "\\mp", "\\sim", "\\equiv", "\\cdots",
               "\\ldots", "\\dots")
MATH_SPAN = re.compile(r"\$+|\\\(|\\\[|\\boxed|\\fbox")


def _words(text: str) -> set[str]:
    """Words of two or more letters outside LaTeX command names (prose, "or", "или", ...)."""
    return {w.lower() for w in re.findall(r"[^\W\d_]{2,}", re.sub(r"\\[a-zA-Z]+", " ", text))}


def _marks(text: str) -> set[str]:
    return {m for m in HEDGE_MARKS if m in text}


def single_math_answer(prediction: str, reference: str) -> bool:
    """Whether `prediction` is one symbolic answer in the shape of `reference`: no more math
    spans, and no hedge word, relation or separator that the reference does not have."""
    value, ref = _bare(prediction), _bare(reference)
    return (len(MATH_SPAN.findall(value)) <= len(MATH_SPAN.findall(ref))
            and _words(value) <= _words(ref) and _marks(value) <= _marks(ref)
            and value.count("^") <= max(1, ref.count("^")))  # no power towers: 9^{9^{9}}


def reference_parses(reference: str) -> bool:
    """A reference is scorable if it is a number, or a math expression that math-verify parses.
    Prose is not ("banana" would parse as the product b*a*n*a*n*a)."""
    reference = normalise(reference)
    if parse_number(reference) is not None:
        return True
    if not reference.strip() or len(reference) > MAX_ANSWER_CHARS:
        return False
    without_commands = re.sub(r"\\[a-zA-Z]+", " ", reference)
    return not re.search(r"[a-zA-Z]{2,}", without_commands) and math_check.parses(reference)


def math_equal(prediction: str, reference: str) -> bool:
    """Exact comparison of number literals when the reference is a number; else math-verify,
    for a single answer in the reference's shape (`single_math_answer`)."""
    ref = parse_number(reference)
    if ref is not None:
        return parse_number(prediction) == ref
    if len(prediction) > MAX_ANSWER_CHARS or not single_math_answer(prediction, reference):
        return False
    return math_check.equivalent(reference, prediction)


# ------------------------------------------------------------------------------ Countdown
def countdown_operations(row: dict) -> set[str]:
    """The operations a Countdown row allows: its `operations` field; else the operator signs its
    question (or prompt, tags removed) lists; else all four."""
    if row.get("operations"):
        return set(row["operations"]) & set(OPERATORS)
    text = TAG.sub(" ", row.get("question") or row.get("prompt") or "")
    named = {op for op in OPERATORS if re.search(rf"(?<![\w/<]){re.escape(op)}(?![\w/>])", text)}
    named |= {"*"} if "×" in text else set()
    named |= {"/"} if "÷" in text else set()
    return named or set(OPERATORS)


def countdown_value(expression: str, numbers: list[int], operations: set[str] | None = None) -> Fraction | None:
    """Exact value of an arithmetic expression that uses each given number exactly once and only
    `operations` (default all four); None if it is not such an expression (or divides by zero)."""
    tree = integer_expression(expression, numbers, set(OPERATORS) if operations is None else operations)
    return None if tree is None else expression_value(tree)


# ------------------------------------------------------------------------------ verification
def _check(prediction: str | None, row: dict) -> bool | None:
    kind, answer = answer_kind(row), normalise(str(row.get("answer") or ""))
    if kind == "code":
        if row.get("task") == "code" and not code_rewards.has_tests(row):
            return count_unscored("reference")
        verdict = code_rewards.passes(prediction, row)
        return count_unscored("sandbox") if verdict is None else verdict
    prediction = None if prediction is None else normalise(prediction)
    if kind == "countdown":
        target = parse_number(answer)
        if target is None or not row.get("numbers"):
            return count_unscored("reference")
        return prediction is not None and countdown_value(prediction, list(row["numbers"]),
                                                          countdown_operations(row)) == target
    if kind in ("integer", "number"):
        reference = parse_number(answer, kind)
        if reference is None:
            return count_unscored("reference")
        return prediction is not None and parse_number(prediction, kind) == reference
    if kind != "math":
        raise ValueError(f"unknown answer kind '{kind}'")
    if not reference_parses(answer):
        return count_unscored("reference")
    return bool(prediction) and math_equal(prediction, answer)


def verify(prediction: str | None, row: dict) -> bool | None:
    """Verify a prediction (a final answer) against a task row by the row's answer kind. None:
    the row cannot be scored (its reference, a time-out, the sandbox, an error; counted by reason
    in `unscored_counts`)."""
    return guarded(_check, prediction, row)


def is_correct(prediction: str | None, answer: str, task: str, numbers=None) -> bool | None:
    """`verify` for a row given by its parts (code rows need their tests: use `verify`)."""
    return verify(prediction, {"answer": answer, "task": task, "numbers": numbers or []})


# the row columns a reward function may read (`score` passes them; absent ones are None)
ROW_COLUMNS = ("answer", "task", "numbers", "language", "tests", "entry_point", "answer_kind", "operations",
               "question")


def _rows(n: int, columns: dict) -> list[dict]:
    """Rows back from reward columns, with the defaults of rows that lack a column."""
    defaults = {"task": "math", "numbers": [], "language": "en"}
    return [{k: (columns[k][i] if columns.get(k) is not None else defaults.get(k)) for k in ROW_COLUMNS}
            for i in range(n)]


def _columns(n: int, value, default):
    return value if value is not None else [default] * n


def _per_completion(check: Callable[..., float | None], *columns) -> list[float | None]:
    """`check` on each completion's values of `columns`, each call `guarded`."""
    out = []
    for args in zip(*columns, strict=True):
        value = guarded(check, *args)
        out.append(None if value is None else float(value))
    return out


@register("accuracy", version="2")
def accuracy(completions: list[str], answer: list[str], **columns) -> list[float | None]:
    """1 if the final <answer> (after the reasoning) verifies against the reference, else 0."""
    rows = _rows(len(completions), {"answer": answer, **columns})
    return _per_completion(lambda c, row: verify(final_answer(c), row), completions, rows)


@register("format", version="2")
def format_reward(completions: list[str], **_) -> list[float | None]:
    """1 for exactly `<think>…</think> [<summary>…</summary>] <answer>…</answer>`, nothing after."""
    return _per_completion(lambda c: parse_format(c) is not None, completions)


@register("readable_format", version="2")
def readable_format_reward(completions: list[str], **_) -> list[float | None]:
    """1 for the readable format of the cold-start data: think, a non-empty summary, answer.
    Reasoning-oriented RL rewards it so that RL keeps what the cold start taught."""
    return _per_completion(lambda c: (p := parse_format(c)) is not None and p.summary is not None, completions)


def cot_text(completion: str) -> str:
    """The chain of thought (`Parsed.cot`) of a well-formed completion, else all its text."""
    parsed = parse_format(completion)
    return TAG.sub(" ", completion[:MAX_COMPLETION_CHARS]) if parsed is None else parsed.cot


def mixes_languages(completion: str, language: str) -> bool:
    """Whether any word of the CoT is not in the prompt's language (`language_mixing_rate`)."""
    return language_consistency(cot_text(completion), language) < 1.0


def cot_language_consistency(completion: str, language: str) -> float:
    """Share of the CoT's words in `language`: the think block and the summary, never the answer
    block. A completion that is not well-formed, or whose CoT has no word that carries a language
    (digits and symbols only, or reasoning moved into the answer), scores 0."""
    parsed = parse_format(completion)
    if parsed is None or not language_words(parsed.cot):
        return 0.0
    return language_consistency(parsed.cot, language)


@register("language_consistency", version="2")
def language_consistency_reward(completions: list[str], language: list[str] | None = None,
                                **_) -> list[float | None]:
    """The paper's language-consistency reward: the proportion of CoT words in the prompt's
    language (the row's `language` column), added to the accuracy reward."""
    language = _columns(len(completions), language, "en")
    return _per_completion(cot_language_consistency, completions, language)


def is_readable(completion: str, language: str, max_words: int | None = None) -> bool:
    """Readable as the cold-start data must be: well-formed with a summary, the CoT and summary
    entirely in the prompt's language, and (if given) at most `max_words` words."""
    parsed = parse_format(completion)
    return (parsed is not None and parsed.summary is not None
            and language_consistency(parsed.cot, language) == 1.0
            and (max_words is None or len(completion.split()) <= max_words))


def _code_reward(name: str, doc: str) -> RewardFn:
    def reward(completions: list[str], answer: list[str], **columns) -> list[float | None]:
        rows = _rows(len(completions), {"answer": answer, **columns})
        return _per_completion(lambda c, row: code_rewards.code_scores([final_answer(c)], [row])[name][0],
                               completions, rows)

    reward.__name__, reward.__doc__ = name, doc
    return register(name, version="2")(reward)


code_syntax = _code_reward("code_syntax", "Code rows: 1 if the final answer's code parses; None for other rows.")
code_exec = _code_reward("code_exec", "Code rows: 1 if it runs in the sandbox without error or limit.")
code_tests = _code_reward("code_tests", "Code rows: share (or all-or-nothing) of unit tests passed.")
code_speed = _code_reward("code_speed", "Code rows: 1 - wall/limit when every test passes, else 0.")


def answer_accuracy_any(completions: list[str], answer: list[str], task: list[str],
                        numbers: list | None = None) -> list[float | None]:
    """Format-agnostic accuracy: the last answer the text states, wherever it stands."""
    numbers = _columns(len(completions), numbers, [])
    rows = [{"answer": a, "task": t, "numbers": nums or []} for a, t, nums in zip(answer, task, numbers, strict=False)]
    return _per_completion(lambda c, row: verify(loose_answer(c, row["task"]), row), completions[:len(rows)], rows)


def combine(per_reward: dict[str, list[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Weighted sum per completion; None if any weighted reward is None for it."""
    n = len(next(iter(per_reward.values())))
    total: list[float | None] = []
    for i in range(n):
        vals = [(per_reward[k][i], w) for k, w in weights.items()]
        total.append(None if any(v is None for v, _ in vals) else sum(v * w for v, w in vals))
    return total


def applies(reward: str, row: dict) -> bool:
    """Code rewards score code rows only; the others apply to every row."""
    return reward not in code_rewards.CODE_REWARDS or code_rewards.is_code_task(row.get("task"))


def score(completions: list[str], rows: list[dict], weights: dict[str, float]):
    """All weighted rewards for completions of `rows` (one row per completion). A row's total
    sums the rewards that apply to it (`applies`); None if one of those is None."""
    columns = {k: [r.get(k) for r in rows] for k in ROW_COLUMNS}
    per_reward = {name: REWARDS[name](completions, **columns) for name in weights}
    total = [combine({k: [per_reward[k][i]] for k in row_weights}, row_weights)[0] if row_weights else None
             for i, row_weights in enumerate({k: w for k, w in weights.items() if applies(k, row)} for row in rows)]
    return total, per_reward
