"""Code rewards: model-written Python is run in the sandbox (r1core/sandbox.py) and checked here,
in the trainer's process, against expected values the program never sees.

Rows of a code task carry their tests:
- `python_expr` (the tiny profile): the final answer is a Python expression that must use exactly
  the row's `numbers` and evaluate to its `answer`; the sandbox evaluates it.
- `code` (MBPP / HumanEval-style rows from a local file: `{prompt, tests, entry_point}`): the
  final answer is a program (a ```python fence is allowed); `tests` is a list of
  `{"call": "f(2)", "expected": 4}`, `{"stdin": "...", "stdout": "..."}`, or `"assert f(2) == 4"`
  strings (turned into calls at load time by `normalise_tests`).

Rewards (registered in `r1core.rewards.REWARDS`; `None` for rows that are not code, and for code
rows the sandbox could not run, which `sandbox_counts()` counts):
- code_syntax: the code parses;
- code_exec:   it runs to the end without an error or a limit (tests not considered);
- code_tests:  the share of tests passed (`CodeRewardConfig.tests`: "fraction" or "all"); a test
               with no result is failed; a stdout test needs the same number of lines;
- code_speed:  1 - wall time / wall limit for a program that passes every test, else 0.
"""
from __future__ import annotations

import ast
import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from r1core.config import CodeRewardConfig
from r1core.sandbox import STATUSES, Result, Sandbox

CODE_TASKS = ("python_expr", "code")
CODE_REWARDS = ("code_syntax", "code_exec", "code_tests", "code_speed")
FENCE = re.compile(r"```(?:python|py)?\s*\n?(.*?)```", re.DOTALL)

class _Shared:
    """This process's settings and its one sandbox pool (started on first use)."""

    settings = CodeRewardConfig()
    pool: Sandbox | None = None
    lock = threading.Lock()


def configure(settings: CodeRewardConfig | dict | None) -> None:
    """Use these limits and test mode from now on in this process (a new pool if they changed)."""
    new = CodeRewardConfig.model_validate(settings or {})
    with _Shared.lock:
        if new != _Shared.settings and _Shared.pool is not None:
            _Shared.pool.close()
            _Shared.pool = None
        _Shared.settings = new


def sandbox() -> Sandbox:
    with _Shared.lock:
        if _Shared.pool is None:
            _Shared.pool = Sandbox(_Shared.settings.sandbox)
        return _Shared.pool


def sandbox_counts(all_statuses: bool = False) -> dict[str, int]:
    """Programs run in this process so far, by sandbox status ("unavailable" included); every
    status, zeros too, with `all_statuses` (the same keys on every rank)."""
    counts = dict(_Shared.pool.counts) if _Shared.pool else {}
    return {s: counts.get(s, 0) for s in STATUSES} if all_statuses else counts


def is_code_task(task: str | None) -> bool:
    return task in CODE_TASKS


def extract_code(answer: str) -> str:
    """The program in a final answer: the first ```python fence if there is one, else all of it."""
    fenced = FENCE.search(answer)
    return (fenced.group(1) if fenced else answer).strip()


# ------------------------------------------------------------------------------ tests
def normalise_tests(tests, where: str) -> list[dict]:
    """Tests as `{"call", "expected"}` or `{"stdin", "stdout"}` dicts; `assert <call> == <literal>`
    strings are converted. Anything else is an error naming `where` (file and row)."""
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"{where}: `tests` must be a non-empty list")
    out = []
    for i, given in enumerate(tests, start=1):
        test = _assert_to_call(given, f"{where}: test {i}") if isinstance(given, str) else given
        if not isinstance(test, dict) or not ({"call", "expected"} <= test.keys() or {"stdout"} <= test.keys()):
            raise ValueError(f"{where}: test {i} must be {{call, expected}}, {{stdin, stdout}} or "
                             f"'assert <call> == <literal>', got {test!r:.80}")
        if "call" in test:
            try:
                ast.parse(test["call"], mode="eval")
            except SyntaxError as exc:
                raise ValueError(f"{where}: test {i}: call {test['call']!r:.60} does not parse ({exc.msg})") from None
        out.append(test)
    return out


def _assert_to_call(text: str, where: str) -> dict:
    try:
        node = ast.parse(text.strip()).body[0]
        if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)
                and len(node.test.ops) == 1 and isinstance(node.test.ops[0], ast.Eq)):
            raise ValueError
        return {"call": ast.unparse(node.test.left), "expected": ast.literal_eval(node.test.comparators[0])}
    except (SyntaxError, ValueError, IndexError):
        raise ValueError(f"{where}: only 'assert <call> == <literal>' is supported, got {text!r:.80}") from None


def _same(value, expected) -> bool:
    """Equality of a reported JSON value and an expected value (floats within 1e-6)."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(expected, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(expected, (list, tuple)) and isinstance(value, list):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected, strict=True))
    if isinstance(expected, dict) and isinstance(value, dict):
        return value.keys() == {str(k) for k in expected} and all(_same(value[str(k)], e) for k, e in expected.items())
    return value == expected


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@dataclass
class Verdict:
    """What running one answer showed. `passed`/`total` count tests; `ran` is None when the
    sandbox could not run it; `wall_s` is the slowest run."""

    parses: bool
    ran: bool | None
    passed: int
    total: int
    wall_s: float = 0.0

    @property
    def all_passed(self) -> bool:
        return self.ran is not None and self.total > 0 and self.passed == self.total


def _expression_program(answer: str, numbers: list) -> tuple[str | None, bool]:
    """(program, uses exactly the allowed numbers) for a `python_expr` answer; None if it does not parse."""
    expression = extract_code(answer)
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None, False
    used = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, (int, float))]
    return f"value = ({expression})\n", Counter(used) == Counter(int(x) for x in numbers)


def run_tests(answer: str | None, row: dict) -> Verdict:
    """Run a code row's answer against its tests in the sandbox (the same answer to the same row
    runs once: GRPO groups and the four rewards ask again)."""
    return _run_tests(answer, row["task"], str(row.get("answer")), tuple(row.get("numbers") or ()),
                      json.dumps(row.get("tests")), row.get("entry_point") or "", str(row.get("id", "?")))


@lru_cache(maxsize=8192)
def _run_tests(answer: str | None, task: str, reference: str, numbers: tuple, tests_json: str, entry_point: str,
               row_id: str) -> Verdict:
    row = {"task": task, "answer": reference, "numbers": list(numbers), "tests": json.loads(tests_json), "id": row_id}
    if answer is None:
        return Verdict(parses=False, ran=False, passed=0, total=1)
    if row["task"] == "python_expr":
        program, allowed = _expression_program(answer, row.get("numbers") or [])
        if program is None:
            return Verdict(parses=False, ran=False, passed=0, total=1)
        tests = [{"call": "value", "expected": _number(row["answer"])}]
    else:
        program, allowed = extract_code(answer), True
        try:
            ast.parse(program)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return Verdict(parses=False, ran=False, passed=0, total=len(row["tests"]))
        if entry_point.isidentifier():  # HumanEval's tests call the solution `candidate`
            program += f"\ncandidate = {entry_point}\n"
        tests = normalise_tests(row["tests"], f"row {row.get('id', '?')}")
    box = sandbox()
    calls = [t for t in tests if "call" in t]
    results: list[tuple[Result, list[bool]]] = []
    if calls or not tests:
        result = box.run(program, [t["call"] for t in calls])
        values = result.values if result.status != "unavailable" else []
        results.append((result, [i < len(values) and _same(values[i], t["expected"]) for i, t in enumerate(calls)]))
    for test in (t for t in tests if "call" not in t):
        result = box.run(program, stdin=test.get("stdin", ""))
        results.append((result, [result.ok and _lines(result.stdout) == _lines(test["stdout"])]))
    if any(r.status == "unavailable" for r, _ in results):
        return Verdict(parses=True, ran=None, passed=0, total=len(tests))
    # results count only from runs that ended normally: not cut off by a limit, not exited early
    passed = sum(sum(ok) for r, ok in results if r.ok) if allowed else 0
    return Verdict(parses=True, ran=all(r.ok for r, _ in results), passed=passed, total=len(tests),
                   wall_s=max(r.wall_s for r, _ in results))


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def passes(answer: str | None, row: dict) -> bool | None:
    """Accuracy of a code row: every test passes (None: no tests to check against, or the
    sandbox could not run it)."""
    if row["task"] == "code" and not row.get("tests"):
        return None
    verdict = run_tests(answer, row)
    return None if verdict.ran is None else verdict.all_passed


# ------------------------------------------------------------------------------ rewards
def code_scores(answers: list[str | None], rows: list[dict]) -> dict[str, list[float | None]]:
    """The four code rewards for final answers of `rows` (None for non-code rows)."""
    out: dict[str, list[float | None]] = {n: [] for n in CODE_REWARDS}
    limit = _Shared.settings.sandbox.wall_s
    for answer, row in zip(answers, rows, strict=True):
        if not is_code_task(row.get("task")):
            for n in CODE_REWARDS:
                out[n].append(None)
            continue
        v = run_tests(answer, row)
        unscorable = v.ran is None
        tests = (float(v.all_passed) if _Shared.settings.tests == "all" else v.passed / max(v.total, 1))
        out["code_syntax"].append(float(v.parses))
        out["code_exec"].append(None if unscorable else float(bool(v.ran)))
        out["code_tests"].append(None if unscorable else tests)
        out["code_speed"].append(None if unscorable else
                                 (max(0.0, 1.0 - v.wall_s / limit) if v.all_passed else 0.0))
    return out
