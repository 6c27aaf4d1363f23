"""Rule rewards, as a registry of named callables `(completions, **columns) -> list[float | None]`.

`None` means "cannot be scored" (for example an unparseable reference answer): it is never
silently turned into 0 or 1; GRPO gives such groups zero advantage and the share is logged.

The completion is the model's text after the prompt, tags kept. The R1 format is
    <think> reasoning </think> [<summary> summary </summary>] <answer> final answer </answer>
with nothing before or after but whitespace; the summary block is the readable format of the
cold-start data and later stages (optional for R1-Zero).
"""
from __future__ import annotations

import ast
import logging
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import NamedTuple

import math_verify

from r1core import code_rewards
from r1core.language import language_consistency

# We run math-verify without its signal-based timeouts (they fail off the main thread); it
# warns about that on every call.
logging.getLogger("math_verify").setLevel(logging.ERROR)

RewardFn = Callable[..., list[float | None]]
REWARDS: dict[str, RewardFn] = {}
REWARD_VERSIONS: dict[str, str] = {}


def register(name: str, version: str = "1") -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        REWARD_VERSIONS[name] = version
        return fn

    return add


TAG = re.compile(r"</?(think|summary|answer)>")
FORMAT = re.compile(
    r"\s*<think>(?P<think>.*?)</think>\s*(?:<summary>(?P<summary>.*?)</summary>\s*)?"
    r"<answer>(?P<answer>.*?)</answer>\s*",
    re.DOTALL,
)
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


class Parsed(NamedTuple):
    think: str
    answer: str
    summary: str | None  # None: no summary block

    @property
    def cot(self) -> str:
        """The chain of thought: the reasoning and its summary (all but the final answer)."""
        return self.think if self.summary is None else f"{self.think} {self.summary}"


def parse_format(completion: str) -> Parsed | None:
    """The blocks when the completion is exactly one non-empty think block, optionally one
    non-empty summary block, and one non-empty answer block, and nothing else; otherwise None."""
    m = FORMAT.fullmatch(completion)
    tags = 6 if m and m["summary"] is not None else 4
    if not m or len(TAG.findall(completion)) != tags:
        return None
    think, answer = m["think"].strip(), m["answer"].strip()
    summary = None if m["summary"] is None else m["summary"].strip()
    if not think or not answer or summary == "":
        return None
    return Parsed(think, answer, summary)


def final_answer(completion: str) -> str | None:
    """The content of the last <answer> block that stands after the reasoning.

    An answer written inside <think> does not count: only text after the last </think>
    (or the whole completion when there is no think block) is searched."""
    tail = completion.rsplit("</think>", 1)[-1]
    blocks = ANSWER_BLOCK.findall(tail)
    return blocks[-1].strip() if blocks else None


def loose_answer(completion: str, task: str) -> str | None:
    """The last answer the text states wherever it stands (format-agnostic accuracy)."""
    text = TAG.sub(" ", completion)
    if task == "countdown":
        exprs = [e.strip() for e in re.findall(r"[\d\s+\-*/()]+", text) if re.search(r"\d", e)]
        return exprs[-1] if exprs else None
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """A single exact number (integer, decimal or fraction), or None. '3 or 5' is not one."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").strip()
    s = re.sub(r"^\\boxed\{(.*)\}$", r"\1", s).strip()
    if not re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(prediction: str, reference: str) -> bool:
    """Exact numeric comparison when both sides are numbers; math-verify otherwise."""
    ref = parse_number(reference)
    if ref is not None:
        pred = parse_number(prediction)
        if pred is not None:
            return pred == ref
    if _several_candidates(prediction):
        return False
    gold, target = _math_parse(reference), _math_parse(prediction)
    return bool(gold and target and math_verify.verify(gold, target, timeout_seconds=None))


def reference_parses(reference: str) -> bool:
    """A reference is scorable if it is a number, or a math expression that math-verify parses.
    Prose is not ("banana" would parse as the product b*a*n*a*n*a)."""
    if parse_number(reference) is not None:
        return True
    without_commands = re.sub(r"\\[a-zA-Z]+", " ", reference)
    return not re.search(r"[a-zA-Z]{2,}", without_commands) and bool(_math_parse(reference))


def _math_parse(text: str):
    # timeouts off: math-verify uses signal.alarm, which fails off the main thread (Ray workers)
    return math_verify.parse(text if "$" in text else f"${text}$", parsing_timeout=None)


def _several_candidates(text: str) -> bool:
    return len(NUMBER.findall(text)) > 1 and bool(re.search(r"\bor\b|,|;|\band\b", text))


ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
                 ast.Div, ast.USub)


def countdown_value(expression: str, numbers: list[int]) -> Fraction | None:
    """Exact value of an arithmetic expression that uses each given number exactly once;
    None if it is not such an expression."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None
    if not all(isinstance(n, ALLOWED_NODES) for n in ast.walk(tree)):
        return None
    used = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    if not all(isinstance(u, int) for u in used) or Counter(used) != Counter(int(x) for x in numbers):
        return None

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b

    try:
        return ev(tree)
    except ZeroDivisionError:
        return None


def is_correct(prediction: str | None, answer: str, task: str, numbers=None) -> bool | None:
    """Verify one prediction against a reference. None: the reference is unscorable. (Code rows
    need their tests: `verify`.)"""
    if code_rewards.is_code_task(task):
        return code_rewards.passes(prediction, {"task": task, "answer": answer, "numbers": numbers})
    if task == "countdown":
        target = parse_number(str(answer))
        if target is None or not numbers:
            return None
        return prediction is not None and countdown_value(prediction, list(numbers)) == target
    if not reference_parses(str(answer)):
        return None
    if prediction is None or not prediction.strip():
        return False
    return math_equal(prediction, str(answer))


def verify(prediction: str | None, row: dict) -> bool | None:
    """Verify a prediction against a task row: code rows by their tests in the sandbox, the
    others by `is_correct`."""
    if code_rewards.is_code_task(row["task"]):
        return code_rewards.passes(prediction, row)
    return is_correct(prediction, row["answer"], row["task"], row.get("numbers"))


# the row columns a reward function may read (`score` passes them; absent ones are None)
ROW_COLUMNS = ("answer", "task", "numbers", "language", "tests", "entry_point")


def _rows(n: int, columns: dict) -> list[dict]:
    """Rows back from reward columns, with the defaults of rows that lack a column."""
    defaults = {"task": "math", "numbers": [], "language": "en"}
    return [{k: (columns[k][i] if columns.get(k) is not None else defaults.get(k)) for k in ROW_COLUMNS}
            for i in range(n)]


def _columns(n: int, value, default):
    return value if value is not None else [default] * n


@register("accuracy")
def accuracy(completions: list[str], answer: list[str], **columns) -> list[float | None]:
    """1 if the final <answer> (after the reasoning) verifies against the reference, else 0."""
    out = []
    for c, row in zip(completions, _rows(len(completions), {"answer": answer, **columns}), strict=True):
        ok = verify(final_answer(c), row)
        out.append(None if ok is None else float(ok))
    return out


@register("format")
def format_reward(completions: list[str], **_) -> list[float | None]:
    """1 for exactly `<think>…</think> [<summary>…</summary>] <answer>…</answer>`, nothing after."""
    return [float(parse_format(c) is not None) for c in completions]


@register("readable_format")
def readable_format_reward(completions: list[str], **_) -> list[float | None]:
    """1 for the readable format of the cold-start data: think, a non-empty summary, answer.
    Reasoning-oriented RL rewards it so that RL keeps what the cold start taught."""
    return [float((p := parse_format(c)) is not None and p.summary is not None) for c in completions]


def cot_text(completion: str) -> str:
    """The chain of thought (`Parsed.cot`) of a well-formed completion, else all its text."""
    parsed = parse_format(completion)
    return TAG.sub(" ", completion) if parsed is None else parsed.cot


def mixes_languages(completion: str, language: str) -> bool:
    """Whether any word of the CoT is not in the prompt's language (`language_mixing_rate`)."""
    return language_consistency(cot_text(completion), language) < 1.0


def cot_language_consistency(completion: str, language: str) -> float:
    """Share of the CoT's words (`cot_text`) in `language`; a completion that is not well-formed
    scores 0 (no reward for dropping the reasoning)."""
    parsed = parse_format(completion)
    return 0.0 if parsed is None else language_consistency(parsed.cot, language)


@register("language_consistency")
def language_consistency_reward(completions: list[str], language: list[str] | None = None,
                                **_) -> list[float | None]:
    """The paper's language-consistency reward: the proportion of CoT words in the prompt's
    language (the row's `language` column), added to the accuracy reward."""
    language = _columns(len(completions), language, "en")
    return [cot_language_consistency(c, lang) for c, lang in zip(completions, language, strict=True)]


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
        return code_rewards.code_scores([final_answer(c) for c in completions], rows)[name]

    reward.__name__, reward.__doc__ = name, doc
    return register(name)(reward)


code_syntax = _code_reward("code_syntax", "Code rows: 1 if the final answer's code parses; None for other rows.")
code_exec = _code_reward("code_exec", "Code rows: 1 if it runs in the sandbox without error or limit.")
code_tests = _code_reward("code_tests", "Code rows: share (or all-or-nothing) of unit tests passed.")
code_speed = _code_reward("code_speed", "Code rows: 1 - wall/limit when every test passes, else 0.")


def answer_accuracy_any(completions: list[str], answer: list[str], task: list[str],
                        numbers: list | None = None) -> list[float | None]:
    """Format-agnostic accuracy: the last answer the text states, wherever it stands."""
    numbers = _columns(len(completions), numbers, [])
    out = []
    for c, a, t, nums in zip(completions, answer, task, numbers, strict=False):
        ok = is_correct(loose_answer(c, t), a, t, nums)
        out.append(None if ok is None else float(ok))
    return out


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
