"""Synthetic verifiable reasoning tasks with exact answers, and the R1-Zero prompt template.

Every row is `{id, task, question, prompt, answer, solution, numbers}`:
- `question` is the bare problem, `prompt` the problem inside the R1-Zero template;
- `answer` the reference the accuracy reward verifies against;
- `solution` a step-by-step derivation (used only to write the pretraining corpus);
- `numbers` the numbers a Countdown row allows (empty for other tasks).
Train and held-out rows are disjoint by question; the split is a function of the seed.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

# The paper's R1-Zero template (DeepSeek-R1, Table 1), verbatim but for the placeholder.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {question} Assistant:"
)


def r1_zero_prompt(question: str) -> str:
    return R1_ZERO_TEMPLATE.format(question=question)


def formatted_response(solution: str, answer: str) -> str:
    """A completion in the R1 format: reasoning in think, the final answer in answer."""
    return f" <think> {solution} </think> <answer> {answer} </answer>"


def _fmt(x: int) -> str:
    return str(x)


def chain_sum(rng: random.Random, chain_min_terms: int, chain_max_terms: int, max_operand: int, **_) -> dict:
    """a ± b ± c ...: several single-step facts chained; the answer is the exact integer."""
    n = rng.randint(chain_min_terms, chain_max_terms)
    terms = [rng.randint(0, max_operand) for _ in range(n)]
    ops = [rng.choice("+-") for _ in range(n - 1)]
    expr = _fmt(terms[0]) + "".join(f" {o} {_fmt(t)}" for o, t in zip(ops, terms[1:], strict=False))
    total, steps = terms[0], []
    for o, t in zip(ops, terms[1:], strict=False):
        new = total + t if o == "+" else total - t
        steps.append(f"{_fmt(total)} {o} {_fmt(t)} = {_fmt(new)}.")
        total = new
    return {
        "task": "chain_sum",
        "question": f"Compute {expr}.",
        "answer": _fmt(total),
        "solution": " ".join(steps),
        "numbers": [],
    }


def countdown(rng: random.Random, countdown_numbers: int, max_operand: int, **_) -> dict:
    """Countdown: reach the target with each given number used exactly once (+, -, *).

    The reference answer is the target; any expression that uses the numbers and hits it is
    correct (the accuracy reward checks the expression, not a string)."""
    nums = [rng.randint(1, max_operand) for _ in range(countdown_numbers)]
    order = nums[:]
    rng.shuffle(order)
    value, expr, steps = order[0], _fmt(order[0]), []
    for t in order[1:]:
        op = rng.choice("+-*") if value - t >= 0 else rng.choice("+*")
        new = {"+": value + t, "-": value - t, "*": value * t}[op]
        steps.append(f"{_fmt(value)} {op} {_fmt(t)} = {_fmt(new)}.")
        expr = f"({expr}) {op} {_fmt(t)}" if len(steps) > 1 and op == "*" else f"{expr} {op} {_fmt(t)}"
        value = new
    listed = ", ".join(_fmt(x) for x in nums)
    return {
        "task": "countdown",
        "question": f"Using the numbers {listed}, make {value}. Use each number once with + - *.",
        "answer": _fmt(value),
        "solution": " ".join(steps),
        "numbers": nums,
        "expression": expr,
    }


GENERATORS: dict[str, Callable[..., dict]] = {"chain_sum": chain_sum, "countdown": countdown}


def row_id(question: str) -> str:
    return hashlib.sha1(question.encode()).hexdigest()[:16]


def _finish(row: dict) -> dict:
    row["id"] = row_id(row["question"])
    row["prompt"] = r1_zero_prompt(row["question"])
    row.setdefault("expression", "")
    return row


def generate_split(cfg, seed: int | None = None) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows from a `DataConfig`, disjoint by question.

    Held-out questions are drawn first; train rows never repeat them. Raises if the task
    space is too small for the requested sizes (rather than silently shrinking it)."""
    rng = random.Random(cfg.seed if seed is None else seed)
    names = list(cfg.task_mix)
    weights = [cfg.task_mix[n] for n in names]
    params = cfg.model_dump()
    seen: set[str] = set()

    def draw(count: int, what: str) -> list[dict]:
        rows, attempts = [], 0
        while len(rows) < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise ValueError(
                    f"data: only {len(rows)} distinct {what} rows possible for {count} requested; "
                    "lower data.num_train/num_heldout or widen the task ranges"
                )
            row = GENERATORS[rng.choices(names, weights)[0]](rng, **params)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(_finish(row))
        return rows

    heldout = draw(cfg.num_heldout, "held-out")
    train = draw(cfg.num_train, "train")
    return train, heldout


REQUIRED_COLUMNS = ("prompt", "answer", "task")


def read_rows(path: str | Path) -> list[dict]:
    """Rows from JSONL or parquet; a row missing a required column fails naming file and row."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
    for i, row in enumerate(rows, start=1):
        missing = [c for c in REQUIRED_COLUMNS if c not in row or row[c] in (None, "")]
        if missing:
            raise ValueError(f"{path}: row {i} lacks required column(s) {missing}")
        row.setdefault("numbers", [])
        row.setdefault("id", row_id(row["prompt"]))
    return rows


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write JSONL atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def pretraining_corpus(train_rows: list[dict], cfg, seed: int) -> list[str]:
    """`cfg.corpus_docs` documents of web-like text about the train problems (`cfg` is a
    `PretrainConfig`), built only from train rows: held-out questions never leak into pretraining.

    - `template_share` of the documents are conversations under the R1-Zero template; of those,
      `format_share` reason in the think/answer format, the rest answer at once without
      reasoning. So the base model, given the template, mostly answers directly (and less
      accurately); R1-Zero has to discover, through the rewards, that reasoning in the format
      pays off.
    - The other documents are bare worked solutions; `web_format_share` of them use the
      think/answer tags (as some web text does), so the base can reason inside the tags at all.
      A few are direct answers without working."""
    rng = random.Random(seed)
    docs = []
    for _ in range(cfg.corpus_docs):
        row = rng.choice(train_rows)
        q, sol, ans = row["question"], row["solution"], row["answer"]
        final = row.get("expression") or ans
        if rng.random() < cfg.template_share:
            if rng.random() < cfg.format_share:
                docs.append(r1_zero_prompt(q) + formatted_response(sol, final))
            else:  # a chat model that answers at once, without reasoning
                docs.append(r1_zero_prompt(q) + f" The answer is {final}.")
            continue
        u = rng.random()
        if u < cfg.web_format_share:
            docs.append(q + formatted_response(sol, final))
        elif u < 0.93:
            docs.append(f"{q} {sol} The answer is {final}.")
        else:
            docs.append(f"{q[:-1]} = {ans}." if row["task"] == "chain_sum" else f"{q} {final} = {ans}.")
    return docs
