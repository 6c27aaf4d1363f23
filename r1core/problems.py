"""Synthetic verifiable reasoning tasks with exact answers, and the R1-Zero prompt template.

Every row is `{id, task, language, problem, question, prompt, answer, solution, steps, numbers,
operations, expression}`:
- `problem` is the language-neutral problem, `question` its text in the row's `language`
  (English or Russian: two languages with their own words, so that a model can mix them),
  `prompt` the question inside the R1-Zero template;
- `answer` the reference the accuracy reward verifies against;
- `steps` the derivation as `[a, op, b, result]`, `solution` it written out (used to write the
  pretraining corpus and the cold-start exemplars);
- `numbers` the numbers a Countdown row allows (empty for other tasks), `operations` the
  operations its answer may use, `expression` one expression that reaches its target.
Train and held-out rows are disjoint by problem (in any language); the split is a function of
the seed.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from r1core.language import dominant_language
from r1core.validation import read_checked

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


# With a model's own chat template (`model.prompt_format: chat_template`) the template's
# instructions become the system message and the question the user's turn.
R1_SYSTEM_PROMPT = R1_ZERO_TEMPLATE.split(" User:")[0].replace("A conversation between User and Assistant. ", "")


def chat_prompts(rows: list[dict], tokenizer) -> list[dict]:
    """`rows` with each prompt rendered by the tokenizer's own chat template: the R1 instructions as
    the system message, the question (or, for rows of one's own without one, the prompt) as the user's
    turn, and the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.prompt_format is chat_template but the tokenizer has no chat template")
    for row in rows:
        messages = [{"role": "system", "content": R1_SYSTEM_PROMPT},
                    {"role": "user", "content": row.get("question") or row["prompt"]}]
        row["prompt"] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rows


def formatted_response(solution: str, answer: str) -> str:
    """A completion in the R1 format: reasoning in think, the final answer in answer."""
    return f" <think> {solution} </think> <answer> {answer} </answer>"


def readable_response(reasoning: str, summary: str, answer: str) -> str:
    """The readable format of the cold-start data (the paper's `|special_token|<reasoning_process>
    |special_token|<summary>`, with our tags): reasoning, then a short summary, then the answer."""
    return f" <think> {reasoning} </think> <summary> {summary} </summary> <answer> {answer} </answer>"


# ------------------------------------------------------------------------------ two languages
# Task text, chains of thought and summaries in each language. The numbers stay digits; the
# operations and the connecting words carry the language, so a CoT that switches language
# mid-way is visible word by word (see r1core/language.py).
PHRASES = {
    "en": {
        "chain_sum": "Compute {expr}.",
        "countdown": "Using the numbers {listed}, make {target}. Use each number once with + - *.",
        "python_expr": "Write a Python expression for {words}.",
        "ops": {"+": "plus", "-": "minus", "*": "times", "/": "divided by"},
        "step": "{a} {op} {b} is {c}.",
        "check": "Check: {c} {op} {b} is {a}.",
        "summary": "So the answer is {final}.",
        "direct": "The answer is {final}.",
        "instruction": "Solve step by step, check the result, then sum up.",
    },
    "ru": {
        "chain_sum": "Вычисли {expr}.",
        "countdown": "Из чисел {listed} получи {target}. Каждое число один раз, + - *.",
        "python_expr": "Напиши выражение на Python: {words}.",
        "ops": {"+": "плюс", "-": "минус", "*": "умножить на", "/": "делить на"},
        "step": "{a} {op} {b} будет {c}.",
        "check": "Проверка: {c} {op} {b} будет {a}.",
        "summary": "Итак, ответ {final}.",
        "direct": "Ответ: {final}.",
        "instruction": "Реши по шагам, проверь результат, затем подведи итог.",
    },
}
INVERSE = {"+": "-", "-": "+", "*": "/"}


def render_steps(steps: list[list], languages: list[str]) -> str:
    """A chain of thought: step i (`[a, op, b, c]`) written in `languages[i]`."""
    out = []
    for (a, op, b, c), lang in zip(steps, languages, strict=True):
        ph = PHRASES[lang]
        out.append(ph["step"].format(a=a, op=ph["ops"][op], b=b, c=c))
    return " ".join(out)


def render_check(steps: list[list], language: str) -> str:
    """Verification of the last step by its inverse operation ("7 minus 4 is 3")."""
    a, op, b, c = steps[-1]
    ph = PHRASES[language]
    return ph["check"].format(c=c, op=ph["ops"][INVERSE[op]], b=b, a=a)


def final_of(row: dict) -> str:
    """What goes into <answer>: the expression for Countdown, else the reference answer."""
    return row.get("expression") or row["answer"]


def long_cot(row: dict, languages: list[str] | None = None) -> tuple[str, str]:
    """(reasoning with a verification step, summary) in the row's language (or per-step languages)."""
    lang = row["language"]
    langs = languages or [lang] * len(row["steps"])
    reasoning = render_steps(row["steps"], langs) + " " + render_check(row["steps"], langs[-1])
    return reasoning, PHRASES[lang]["summary"].format(final=final_of(row))


# ------------------------------------------------------------------------------ task generators
def chain_sum(rng: random.Random, chain_min_terms: int, chain_max_terms: int, max_operand: int, **_) -> dict:
    """a ± b ± c ...: several single-step facts chained; the answer is the exact integer."""
    n = rng.randint(chain_min_terms, chain_max_terms)
    terms = [rng.randint(0, max_operand) for _ in range(n)]
    ops = [rng.choice("+-") for _ in range(n - 1)]
    expr = str(terms[0]) + "".join(f" {o} {t}" for o, t in zip(ops, terms[1:], strict=False))
    total, steps = terms[0], []
    for o, t in zip(ops, terms[1:], strict=False):
        new = total + t if o == "+" else total - t
        steps.append([total, o, t, new])
        total = new
    return {"task": "chain_sum", "problem": expr, "answer": str(total), "steps": steps, "numbers": [],
            "fields": {"expr": expr}}


def countdown(rng: random.Random, countdown_numbers: int, max_operand: int, **_) -> dict:
    """Countdown: reach the target with each given number used exactly once (+, -, *).

    The reference answer is the target; any expression that uses the numbers and hits it is
    correct (the accuracy reward checks the expression, not a string)."""
    nums = [rng.randint(1, max_operand) for _ in range(countdown_numbers)]
    order = nums[:]
    rng.shuffle(order)
    value, expr, steps = order[0], str(order[0]), []
    for t in order[1:]:
        op = rng.choice("+-*") if value - t >= 0 else rng.choice("+*")
        new = {"+": value + t, "-": value - t, "*": value * t}[op]
        steps.append([value, op, t, new])
        expr = f"({expr}) {op} {t}" if len(steps) > 1 and op == "*" else f"{expr} {op} {t}"
        value = new
    listed = ", ".join(str(x) for x in nums)
    return {"task": "countdown", "problem": f"{listed} -> {value}", "answer": str(value), "steps": steps,
            "numbers": nums, "expression": expr, "operations": ["+", "-", "*"],
            "fields": {"listed": listed, "target": value}}


def python_expr(rng: random.Random, chain_min_terms: int, chain_max_terms: int, max_operand: int, **_) -> dict:
    """A chain sum told in words ("3 plus 4 minus 2"), answered as Python code (`3 + 4 - 2`).

    The code task of the tiny profile: the answer is run in the sandbox and must evaluate to the
    total using exactly the given numbers (r1core/code_rewards.py); the reasoning works it out."""
    row = chain_sum(rng, chain_min_terms, chain_max_terms, max_operand)
    expr = row["problem"]
    terms = [int(t) for t in expr.split()[::2]]
    return {**row, "task": "python_expr", "problem": f"python: {expr}", "numbers": terms, "expression": expr,
            "operations": ["+", "-"], "fields": {"words": expr}}


GENERATORS: dict[str, Callable[..., dict]] = {"chain_sum": chain_sum, "countdown": countdown,
                                              "python_expr": python_expr}
# What each task's <answer> must hold (r1core/rewards.py: answer kinds): chain sums an integer
# literal (not the expression, not a hedge), Countdown an expression of the row's numbers and
# operations, the code task code. Other tasks' rows are `math` unless a row says otherwise.
TASK_ANSWER_KINDS = {"chain_sum": "integer", "countdown": "countdown", "python_expr": "code"}


def localize(problem: dict, language: str) -> dict:
    """A task row in one language: its question, prompt and worked solution."""
    row = {k: v for k, v in problem.items() if k != "fields"}
    row["language"] = language
    fields = dict(problem["fields"])
    if "words" in fields:  # operations in the row's language: "3 plus 4", "3 плюс 4"
        fields["words"] = " ".join(PHRASES[language]["ops"].get(t, t) for t in fields["words"].split())
    row["question"] = PHRASES[language][row["task"]].format(**fields)
    row["solution"] = render_steps(row["steps"], [language] * len(row["steps"]))
    return _finish(row)


def row_id(question: str) -> str:
    return hashlib.sha1(question.encode()).hexdigest()[:16]


def _finish(row: dict) -> dict:
    row["id"] = row_id(row["question"])
    row["prompt"] = r1_zero_prompt(row["question"])
    row.setdefault("expression", "")
    row.setdefault("operations", [])
    return row


def generate_split(cfg, seed: int | None = None) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows from a `DataConfig`, disjoint by problem.

    Held-out problems are drawn first; train rows never repeat them. Raises if the task
    space is too small for the requested sizes (rather than silently shrinking it)."""
    rng = random.Random(cfg.seed if seed is None else seed)
    names = list(cfg.task_mix)
    weights = [cfg.task_mix[n] for n in names]
    langs = list(cfg.languages)
    lang_weights = [cfg.languages[lang] for lang in langs]
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
            problem = GENERATORS[rng.choices(names, weights)[0]](rng, **params)
            language = rng.choices(langs, lang_weights)[0]
            if problem["problem"] not in seen:  # one problem never appears in both splits, in any language
                seen.add(problem["problem"])
                rows.append(localize(problem, language))
        return rows

    heldout = draw(cfg.num_heldout, "held-out")
    train = draw(cfg.num_train, "train")
    return train, heldout


def read_rows(path: str | Path) -> list[dict]:
    """Rows from JSONL, parquet or a directory of parquet parts; the first bad row (see
    `r1core.validation`) fails the read, naming file, row and reason."""
    rows, bad = read_checked(path)
    if bad:
        raise ValueError(f"{path}: row {bad[0]['line']}: {bad[0]['reason']}")
    return complete_rows(rows)


def complete_rows(rows: list[dict]) -> list[dict]:
    """Checked rows with what later stages rely on: `numbers`, an `id`, a `language`."""
    for row in rows:
        row.setdefault("numbers", [])
        row.setdefault("id", row_id(row["prompt"]))
        if not row.get("language"):  # the question's own words say which language it is in
            row["language"] = dominant_language(row.get("question") or row["prompt"]) or "en"
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
    `PretrainConfig`), built only from train rows: held-out problems never leak into pretraining.

    - `template_share` of the documents are conversations under the R1-Zero template; of those,
      `format_share` reason in the think/answer format, the rest answer at once without
      reasoning. So the base model, given the template, mostly answers directly (and less
      accurately); R1-Zero has to discover, through the rewards, that reasoning in the format
      pays off.
    - `long_cot_share` are detailed worked answers after an instruction ("solve step by step,
      check, sum up"): reasoning with a verification step and a summary, in the readable format.
      The cold-start routes elicit this style by few-shot and direct prompting.
    - The rest are bare worked solutions; `web_format_share` of them use the think/answer tags
      (as some web text does), so the base can reason inside the tags at all. A few are direct
      answers without working.
    - In `code_switch_share` of the documents each reasoning step is written in a language
      drawn at random, as in multilingual web text: the base model mixes languages, and RL
      without a language-consistency reward has no reason to stop it.
    """
    for i, r in enumerate(train_rows, start=1):
        if not r.get("steps"):
            raise ValueError(f"pretraining corpus: train row {i} has no worked `steps`; pretraining needs "
                             "the synthetic tasks (or set model.pretrained_path to skip it)")
    rng = random.Random(seed)
    languages = sorted({r["language"] for r in train_rows})
    docs = []
    for _ in range(cfg.corpus_docs):
        row = rng.choice(train_rows)
        q, lang, final = row["question"], row["language"], final_of(row)
        if rng.random() < cfg.code_switch_share:
            step_langs = [rng.choice(languages) for _ in row["steps"]]
        else:
            step_langs = [lang] * len(row["steps"])
        sol = render_steps(row["steps"], step_langs)
        direct = PHRASES[lang]["direct"].format(final=final)
        if rng.random() < cfg.template_share:
            if rng.random() < cfg.format_share:
                docs.append(r1_zero_prompt(q) + formatted_response(sol, final))
            else:  # a chat model that answers at once, without reasoning
                docs.append(f"{r1_zero_prompt(q)} {direct}")
            continue
        u = rng.random()
        if u < cfg.long_cot_share:
            docs.append(f"{PHRASES[lang]['instruction']} {q}" + readable_response(*long_cot(row, step_langs), final))
        elif u < cfg.long_cot_share + cfg.web_format_share:
            docs.append(q + formatted_response(sol, final))
        elif u < 0.93:
            docs.append(f"{q} {sol} {direct}")
        else:
            docs.append(f"{q} {final} = {row['answer']}." if row["task"] == "countdown" else f"{q} = {row['answer']}.")
    return docs
