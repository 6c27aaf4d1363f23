"""Prompt rows from files people wrote: each row is checked, bad ones are set aside with the
reason (a quarantine), and the job goes on while they stay within an error budget.

A row needs `prompt`, `answer` and `task` as non-empty strings (an integer answer is accepted
and turned into its string); a `code` row (MBPP / HumanEval style) needs `prompt` and tests
instead of an answer (r1core/code_rewards.py: `row_tests`, the forms they ship in). A line that is not valid UTF-8 or
not a JSON object is bad too.
"""
from __future__ import annotations

import json
from pathlib import Path

from r1core.code_rewards import row_tests
from r1core.language import LANGUAGE_SCRIPTS

# what a row's `answer_kind` may say (r1core/rewards.py: answer kinds)
ANSWER_KINDS = ("integer", "number", "math", "countdown", "code")

REQUIRED_TEXT = ("prompt", "answer", "task")

# Far beyond any context a model here takes (~250k tokens), and a bound on what one row may cost
# to read: a longer line is quarantined unread (the rest of it skipped), never loaded whole.
MAX_LINE_BYTES = 1 << 20


class DataError(ValueError):
    """A data file that cannot be used: the message names the file (and the row, where one is at fault)."""


class ErrorBudgetExceeded(DataError):
    """More bad rows than the configured share: the message names the file, counts and examples."""


def row_problem(row) -> str | None:
    """Why a parsed row cannot be used, or None."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    code = row.get("task") == "code"
    if code:
        try:
            row_tests(row, "code row")
        except ValueError as e:
            return str(e)
    if row.get("language") not in (None, "") and row.get("language") not in LANGUAGE_SCRIPTS:
        return f"field 'language' is {row.get('language')!r:.20}; known: {', '.join(sorted(LANGUAGE_SCRIPTS))}"
    if row.get("answer_kind") not in (None, "") and row.get("answer_kind") not in ANSWER_KINDS:
        return f"field 'answer_kind' is {row.get('answer_kind')!r:.20}; known: {', '.join(ANSWER_KINDS)}"
    for name in REQUIRED_TEXT if not code else ("prompt", "task"):
        value = row.get(name)
        if value is None or value == "":
            return f"missing field '{name}'"
        if name == "answer" and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, str):
            return f"field '{name}' is {type(value).__name__}, not a string"
    return None


def check_rows(rows: list, first_line: int = 1) -> tuple[list[dict], list[dict]]:
    """(good rows with `answer` as a string, quarantined `{line, raw, reason}`)."""
    good, bad = [], []
    for line_no, row in enumerate(rows, start=first_line):
        problem = row_problem(row)
        if problem:
            bad.append({"line": line_no, "raw": json.dumps(row, default=str), "reason": problem})
        else:
            good.append({**row, "answer": str(row.get("answer", "")),
                         **({"tests": row_tests(row, f"row {line_no}")} if row["task"] == "code" else {})})
    return good, bad


def read_jsonl_checked(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(good rows, quarantined `{line, raw, reason}`) of a JSONL file, reading bytes so that a
    line of invalid UTF-8 is quarantined rather than failing the whole file."""
    good, bad = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(_bounded_lines(f), start=1):
            if raw is None:
                bad.append({"line": line_no, "raw": "", "reason": f"line longer than {MAX_LINE_BYTES >> 20} MiB"})
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append({"line": line_no, "raw": raw.decode("utf-8", "replace").rstrip("\n"),
                            "reason": f"invalid UTF-8 at byte {e.start}"})
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append({"line": line_no, "raw": text.rstrip("\n"), "reason": f"invalid JSON ({e.msg})"})
                continue
            ok, problem = check_rows([row], line_no)
            good += ok
            bad += [{**b, "raw": text.rstrip("\n")} for b in problem]
    return good, bad


def _bounded_lines(f):
    """The file's lines, each read with a size limit: None stands for a line over MAX_LINE_BYTES."""
    while raw := f.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def read_checked(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(good rows, quarantined rows) of a JSONL file, a parquet file, or a directory of parquet
    parts (read in name order; a part's rows are numbered on from the previous part's)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq

        good, bad = [], []
        for part in sorted(path.glob("*.parquet")) if path.is_dir() else [path]:
            g, b = check_rows(pq.read_table(part).to_pylist(), first_line=len(good) + len(bad) + 1)
            good, bad = good + g, bad + b
        return good, bad
    return read_jsonl_checked(path)


def within_budget(source: str, good: int, bad: list[dict], error_budget: float) -> None:
    """Raise if the share of bad rows exceeds `error_budget` (0.01 = 1%)."""
    total = good + len(bad)
    if total and len(bad) / total > error_budget:
        shown = "; ".join(f"line {b['line']}: {b['reason']}" for b in bad[:3])
        raise ErrorBudgetExceeded(f"{source}: {len(bad)} of {total} rows are bad, more than the error budget "
                                  f"of {error_budget:.1%} ({shown})")


def write_quarantine(bad: list[dict], source: str | Path, quarantine_file: str | Path) -> None:
    """The bad rows of `source` as `{file, line, raw, reason}` lines, written atomically (none: no file)."""
    quarantine_file = Path(quarantine_file)
    quarantine_file.unlink(missing_ok=True)
    if bad:
        quarantine_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = quarantine_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"file": str(source), **b}, ensure_ascii=False) + "\n" for b in bad))
        tmp.replace(quarantine_file)


def read_with_quarantine(path: str | Path, quarantine_file: str | Path,
                         error_budget: float) -> tuple[list[dict], list[dict]]:
    """(good rows, bad rows) of a file; the bad ones are written to `quarantine_file`
    (`write_quarantine`), and more of them than `error_budget` raises."""
    good, bad = read_checked(path)
    write_quarantine(bad, path, quarantine_file)
    within_budget(str(path), len(good), bad, error_budget)
    return good, bad


def read_data_file(path: str | Path, field: str, error_budget: float) -> tuple[list[dict], list[dict]]:
    """(good rows, bad rows) of a user's data file named by config `field` (e.g.
    `data.train_file`), bad ones within `error_budget`; an unreadable file, more bad rows than
    the budget, or no good row at all is a `DataError` naming both."""
    try:
        good, bad = read_checked(path)
    except (OSError, ValueError) as e:  # a parquet file that is not one, a directory without parts
        raise DataError(f"{field} '{path}': cannot be read: {type(e).__name__}: {e}") from None
    if not good:
        reason = f" ({len(bad)} bad; line {bad[0]['line']}: {bad[0]['reason']})" if bad else ""
        raise DataError(f"{field} '{path}': no usable rows{reason}")
    try:
        within_budget(str(path), len(good), bad, error_budget)
    except DataError as e:
        raise DataError(f"{field}: {e}") from None
    return good, bad
