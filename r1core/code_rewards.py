"""Code rewards: model-written Python is run in the sandbox (r1core/sandbox.py) and checked here,
in the trainer's process, against expected values the program never sees.

Rows of a code task carry their tests:
- `python_expr` (the tiny profile): the final answer is a Python expression that must use exactly
  the row's `numbers` and evaluate to its `answer`; the sandbox evaluates it.
- `code` (MBPP / HumanEval rows from a local file): the final answer is a program (a ```python
  fence is allowed); its tests (`row_tests`) are a `tests` list of `{"call": "f(2)", "expected":
  4}`, `{"stdin": "...", "stdout": "..."}` or `"assert ..."` strings; or HumanEval's own `test`
  (`check(candidate)`) and `entry_point`; or MBPP's `test_list`. `assert <call> == <literal>`
  becomes a call whose value the trainer compares; other asserts and HumanEval's check run as a
  check function, each assert that uses the solution one test, judged in a process that never
  ran the program (r1core/sandbox.py: the test protocol).

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
import builtins
import json
import math
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from r1core.expressions import OPERATORS, integer_expression
from r1core.sandbox import STATUSES, Result, Sandbox, Unencodable, decode
from r1core.schema import Strict

CODE_TASKS = ("python_expr", "code")
CODE_REWARDS = ("code_syntax", "code_exec", "code_tests", "code_speed")
FENCE = re.compile(r"```(?:python|py)?\s*\n?(.*?)```", re.DOTALL)


class SandboxConfig(Strict):
    """Limits of the sandbox that runs model-written code (r1core/sandbox.py: what is isolated)."""

    workers: PositiveInt = Field(2, description="warm sandbox workers (programs run at once)")
    wall_s: PositiveFloat = Field(5.0, description="wall-clock limit of one program and its test calls")
    cpu_s: PositiveInt = Field(2, description="CPU-seconds limit")
    memory_mb: int = Field(512, ge=64, description="address-space limit")
    processes: PositiveInt = Field(32, description="process limit (counted per user)")
    file_size_mb: PositiveInt = Field(16, description="largest file a program may write")
    open_files: int = Field(64, ge=8, description="open file descriptors")
    output_bytes: int = Field(65536, ge=256, description="stdout + stderr + results; more kills the program")
    tmp_mb: PositiveInt = Field(64, description="bytes a program may write in all (its working directory, /tmp, "
                                              "/var/tmp, /dev/shm: one fresh tmpfs per program), in MB")
    tmp_inodes: int = Field(4096, ge=64, description="files and directories a program may create in all")
    uid: PositiveInt = Field(65534, description="user the programs run as when the trainer runs as root")
    require_isolation: bool = Field(
        False, description="fail instead of falling back to a process group without network/file isolation")


class CodeRewardConfig(Strict):
    """How model-written code is scored (code_syntax, code_exec, code_tests, code_speed)."""

    tests: Literal["fraction", "all"] = Field(
        "fraction", description="code_tests: share of unit tests passed, or 1 only if all pass")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="limits of the sandbox that runs model-written code")


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
def row_tests(row: dict, where: str) -> list[dict]:
    """A code row's tests, normalised (`normalise_tests`), from whichever form it ships in: our
    `tests` list; HumanEval's `test` (a `check(candidate)` function) with its `entry_point` (its
    `prompt` is the trusted prelude the check may call into, e.g. HumanEval/32's `poly`); MBPP's
    `test_list` asserts with `test_setup_code` / `test_imports`."""
    if row.get("tests") is not None:
        return normalise_tests(row["tests"], where, row.get("entry_point"), row.get("test_prelude") or "")
    if isinstance(row.get("test"), str) and row.get("test").strip():
        entry = row.get("entry_point")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError(f"{where}: a HumanEval `test` needs the row's `entry_point` (a function name)")
        prelude = row.get("prompt") if isinstance(row.get("prompt"), str) else ""
        return [check_test(row["test"], where, entry, prelude, argument="candidate")]
    if row.get("test_list") is not None:
        imports = row.get("test_imports") or []
        prelude = "\n".join([*(imports if isinstance(imports, list) else [str(imports)]),
                             str(row.get("test_setup_code") or "")])
        return normalise_tests(row["test_list"], where, row.get("entry_point"), prelude)
    raise ValueError(f"{where}: a code row needs `tests`, HumanEval's `test` + `entry_point`, or MBPP's `test_list`")


def normalise_tests(tests, where: str, entry_point: str | None = None, prelude: str = "") -> list[dict]:
    """Tests as `{"call", "expected"}`, `{"stdin", "stdout"}` or check dicts (`check_test`).
    `assert <call> == <literal>` strings become calls (compared in the trainer); the other assert
    strings (`assert not f(x)`, `assert f(x)`, `assert abs(f(x) - y) < tol`, ...) become one
    check of the row, each assert a test. Anything else is an error naming `where`."""
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"{where}: `tests` must be a non-empty list")
    out, asserts = [], []
    for i, test in enumerate(tests, start=1):
        given = _assert_to_call(test, f"{where}: test {i}") if isinstance(test, str) else test
        if given is None:  # an assert that is not `call == literal`: part of the row's check
            asserts.append(test.strip())
            continue
        if isinstance(given, dict) and "check" in given and "asserts" in given:
            out.append(given)  # already normalised
            continue
        if not isinstance(given, dict) or not ({"call", "expected"} <= given.keys() or {"stdout"} <= given.keys()):
            raise ValueError(f"{where}: test {i} must be {{call, expected}}, {{stdin, stdout}} or "
                             f"an 'assert ...' string, got {given!r:.80}")
        if "call" in given:
            try:
                ast.parse(given["call"], mode="eval")
            except (SyntaxError, ValueError) as exc:
                raise ValueError(f"{where}: test {i}: call {given['call']!r:.60} does not parse ({exc})") from None
        out.append(given)
    if asserts:
        body = "\n".join("    " + line for a in asserts for line in a.splitlines())
        out.append(check_test(f"def check():\n{body}\n", where, entry_point, prelude))
    return out


def _assert_to_call(text: str, where: str) -> dict | None:
    """`{"call", "expected"}` for `assert <call> == <literal>`; None for another assert."""
    try:
        body = ast.parse(text.strip()).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"{where}: {text!r:.80} does not parse as Python") from None
    if len(body) != 1 or not isinstance(body[0], ast.Assert):
        raise ValueError(f"{where}: only 'assert ...' strings are tests, got {text!r:.80}")
    node = body[0].test
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
        try:
            return {"call": ast.unparse(node.left), "expected": ast.literal_eval(node.comparators[0])}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
    return None


class _Asserts(ast.NodeTransformer):
    """`assert x, msg` -> `__r1_assert__(i, lambda: x)`: each assert judged on its own."""

    def __init__(self):
        self.tests: list[ast.expr] = []

    def visit_Assert(self, node: ast.Assert):
        self.tests.append(node.test)
        call = ast.Call(func=ast.Name("__r1_assert__", ast.Load()),
                        args=[ast.Constant(len(self.tests) - 1),
                              ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[],
                                                            defaults=[]), body=node.test)], keywords=[])
        return ast.copy_location(ast.Expr(call), node)


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _tainted(tree: ast.AST, sources: set[str]) -> set[str]:
    """Names whose value comes from the program under test: `sources` and whatever is assigned
    (or looped over) from an expression that uses one of them, to a fixed point."""
    tainted = set(sources)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                targets, value = (node.targets if isinstance(node, ast.Assign) else [node.target]), node.value
            elif isinstance(node, (ast.For, ast.comprehension)):
                targets, value = [node.target], node.iter
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                targets, value = [node.optional_vars], node.context_expr
            else:
                continue
            if _names(value) & tainted:
                new = set().union(*map(_names, targets)) - tainted
                if new:
                    tainted |= new
                    changed = True
    return tainted


def check_test(source: str, where: str, entry_point: str | None, prelude: str = "",
               argument: str | None = None) -> dict:
    """A check function as a test: its asserts rewritten (`_Asserts`), the ones that test the
    program counted (those that use, directly or through a variable, `argument` or a function the
    program defines; `assert True, "..."` tests nothing), and the names the program must supply
    (`stubs`). `prelude` is trusted code the check may call (HumanEval's prompt, MBPP's setup)."""
    try:
        tree = ast.parse(source)
        ast.parse(prelude)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{where}: the test code does not parse ({exc})") from None
    if argument is None:  # MBPP: the functions the asserts call that neither builtins nor the prelude define
        defined = {n.name for n in ast.walk(ast.parse(prelude)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        stubs = sorted(called - defined - set(dir(builtins)) - {"check"} | ({entry_point} if entry_point else set()))
    else:  # HumanEval: `candidate`, and the entry point by name where a check calls it so (HumanEval/33)
        stubs = [argument, *([entry_point] if entry_point in _names(tree) else [])]
    rewrite = _Asserts()
    tree = ast.fix_missing_locations(rewrite.visit(tree))
    tainted = _tainted(tree, set(stubs))
    counted = [i for i, test in enumerate(rewrite.tests) if _names(test) & tainted]
    if not counted:
        raise ValueError(f"{where}: the test code has no assert that uses the solution")
    return {"check": ast.unparse(tree), "asserts": len(rewrite.tests), "counted": counted, "stubs": stubs,
            "argument": argument, "entry_point": entry_point, "prelude": prelude}


def _same(value, expected) -> bool:
    """Equality of a returned value and an expected one: integers, strings, booleans and None
    exactly (an integer test is not passed by a near miss); floats within a relative 1e-6 (and an
    absolute 1e-9 near zero); containers element by element."""
    if isinstance(expected, bool) or isinstance(value, bool) or expected is None or value is None:
        return type(value) is type(expected) and value == expected
    if type(expected) is int:
        return type(value) in (int, float) and value == expected
    if type(expected) is float:
        return type(value) in (int, float) and math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(expected, (list, tuple)) and isinstance(value, (list, tuple)):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected, strict=True))
    if isinstance(expected, (set, frozenset)) and isinstance(value, (set, frozenset)):
        return value == expected
    if isinstance(expected, dict) and isinstance(value, dict):
        keys = {str(k): k for k in value}
        return len(keys) == len(value) == len(expected) and set(keys) == {str(k) for k in expected} and all(
            _same(value[keys[str(k)]], e) for k, e in expected.items())
    return type(value) is type(expected) and value == expected


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


def run_tests(answer: str | None, row: dict) -> Verdict:
    """Run a code row's answer against its tests in the sandbox (the same answer to the same row
    runs once: GRPO groups and the four rewards ask again)."""
    where = f"row {row.get('id', '?')}"
    tests = [] if row["task"] == "python_expr" else row_tests(row, where)
    verdict = _run_tests(answer, row["task"], str(row.get("answer")), tuple(row.get("numbers") or ()),
                         tuple(row.get("operations") or ()), json.dumps(tests), row.get("entry_point") or "")
    if verdict.ran is None:  # the sandbox could not run it: ask again next time, do not remember that
        _run_tests.cache_clear()
    return verdict


def _decoded(reply) -> tuple[bool, object]:
    """(whether a call's reply holds a value, the value)."""
    if not isinstance(reply, dict) or "value" not in reply:
        return False, None
    try:
        return True, decode(reply["value"])
    except (Unencodable, ValueError, TypeError, RecursionError, MemoryError):
        return False, None


@lru_cache(maxsize=8192)
def _run_tests(answer: str | None, task: str, reference: str, numbers: tuple, operations: tuple, tests_json: str,
               entry_point: str) -> Verdict:
    if answer is None:
        return Verdict(parses=False, ran=False, passed=0, total=1)
    if task == "python_expr":
        expression = extract_code(answer)
        try:
            ast.parse(expression, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return Verdict(parses=False, ran=False, passed=0, total=1)
        # it runs in the sandbox whatever it is (code_exec: it runs), but counts as right only if it
        # is an expression of the row's numbers and operators (no names, calls, strings, ...)
        allowed = integer_expression(expression, list(numbers), set(operations) or set(OPERATORS)) is not None
        program, tests = f"value = ({expression})\n", [{"call": "value", "expected": _number(reference)}]
    else:
        program, tests, allowed = extract_code(answer), json.loads(tests_json), True
        try:
            ast.parse(program)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return Verdict(parses=False, ran=False, passed=0, total=sum(_weight(t) for t in tests))
        if entry_point.isidentifier():  # HumanEval-style calls name the solution `candidate`
            program += f"\ncandidate = {entry_point}\n"
    box = sandbox()
    in_process = [t for t in tests if "stdout" not in t]
    results: list[tuple[Result, int]] = []  # (a run, tests it passed)
    if in_process or not tests:
        run = box.run(program, [{"call": t["call"]} if "call" in t else {**t, "counted": None, "record": True}
                                for t in in_process])
        passed = 0
        for test, reply in zip(in_process, run.values if run.ok else [], strict=False):
            if "call" in test:
                has_value, value = _decoded(reply)
                passed += has_value and _same(value, test["expected"])
            else:
                verdicts = _judge_check(box, test, reply)
                if verdicts is None:
                    return Verdict(parses=True, ran=None, passed=0, total=sum(_weight(t) for t in tests))
                passed += verdicts
        results.append((run, passed))
    for test in (t for t in tests if "stdout" in t):
        run = box.run(program, stdin=test.get("stdin", ""))
        results.append((run, int(run.ok and _lines(run.stdout) == _lines(test["stdout"]))))
    if any(r.status == "unavailable" for r, _ in results):
        return Verdict(parses=True, ran=None, passed=0, total=sum(_weight(t) for t in tests))
    # results count only from runs that ended normally: not cut off by a limit, not exited early,
    # no protocol violation
    return Verdict(parses=True, ran=all(r.ok for r, _ in results),
                   passed=sum(p for r, p in results if r.ok) if allowed else 0,
                   total=sum(_weight(t) for t in tests) or 1, wall_s=max(r.wall_s for r, _ in results))


def _weight(test: dict) -> int:
    """How many tests a test entry is: a check counts its counted asserts."""
    return len(test["counted"]) if "check" in test else 1


def _judge_check(box: Sandbox, test: dict, reply) -> int | None:
    """Counted asserts of a check that pass, judged in a fresh sandbox process that runs only the
    row's trusted prelude and the check, on the calls the program's process recorded (phase 2 of
    `sandbox._Check`); None if that process could not be run."""
    calls = reply.get("calls") if isinstance(reply, dict) else None
    if not isinstance(calls, list):
        return 0
    judged = box.run(test["prelude"], [{**test, "counted": None, "prelude": "", "replay": calls}])
    if judged.status == "unavailable":
        return None
    outcome = judged.values[0] if judged.ok and judged.values else {}
    outcomes, completed = outcome.get("outcomes") or [], outcome.get("completed") is True
    if len(outcomes) != test["asserts"]:
        return 0
    # an assert never reached counts as passed only when the check ran to its end
    return sum(outcomes[i] is True or (outcomes[i] is None and completed) for i in test["counted"])


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def has_tests(row: dict) -> bool:
    """Whether a `code` row carries tests in one of the forms `row_tests` reads."""
    return any(row.get(k) for k in ("tests", "test", "test_list"))


def passes(answer: str | None, row: dict) -> bool | None:
    """Accuracy of a code row: every test passes (None: no tests to check against, or the
    sandbox could not run it)."""
    if row["task"] == "code" and not has_tests(row):
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
