"""Rejection sampling (DeepSeek-R1, section 2.3.3): from the reasoning-RL checkpoint, many samples
per prompt; keep only the verified, readable ones; add non-reasoning data; that is the SFT set.
(`tasks/rejection_sampling.py` is the same stage one layer down: it runs these on Ray Data.)

    candidate ─► check_candidate (per row, in parallel)
                   truncated · malformed · mixed_language · long_paragraph · code_block
                   · too_long · contaminated                 (filters, cheapest first)
                   · unverified                              (rule verifier, else the judge)
              ─► select (over all rows, in id order)
                   duplicate (normalised hash) · near_duplicate (MinHash) · per_problem
                   · over_quota (reasoning / non-reasoning targets)
              ─► kept

`check_candidate` sees one row and is what Ray Data maps over the candidates; `select` needs
them all and runs once, on compact columns. A row is kept when its `reason` is empty; the first
failing check names it. A reasoning row is verified by rules when its task has a rule verifier
that can score its reference (`rewards.verify`), otherwise (or when its task is listed in
`judged_tasks`) the model judge decides (`r1core.judge`). A non-reasoning row carries its
reference response (`r1core.general_prompts`): it is filtered, not verified.
"""
from __future__ import annotations

import functools
import hashlib
from collections import Counter

import numpy as np

from r1core.filters import (
    Decontaminator,
    NearDuplicates,
    content_hash,
    has_code_block,
    has_long_paragraph,
    minhash,
)
from r1core.general_prompts import CROSS_LINGUAL, KINDS, NO_COT, SIMPLE_KINDS
from r1core.rewards import final_answer, mixes_languages, parse_format, verify

FILTER_REASONS = ("truncated", "malformed", "mixed_language", "long_paragraph", "code_block", "too_long",
                  "contaminated", "unverified")
SELECT_REASONS = ("duplicate", "near_duplicate", "per_problem", "over_quota")
REASONS = FILTER_REASONS + SELECT_REASONS
NEEDS_JUDGE = "needs_judge"  # a provisional verdict: the judge replaces it with '' or 'unverified'


def is_reasoning(row: dict) -> bool:
    return row["task"] not in KINDS


def sample_id(row: dict) -> str:
    """The deterministic id of a candidate: its prompt's id and its sample index."""
    return f"{row['id']}-{int(row['sample']):03d}"


def dedupe_text(row: dict) -> str:
    """What two candidates must share to be duplicates: the question and the response."""
    return f"{row.get('question') or row['prompt']} {row['completion']}"


def verdict(row: dict, judged_tasks: frozenset[str] = frozenset()) -> str:
    """'' when a rule verifies the final answer, 'unverified' when it refutes it, NEEDS_JUDGE
    when no rule can score the reference (or the task's rows go to the judge by configuration)."""
    if row["task"] in judged_tasks:
        return NEEDS_JUDGE
    ok = verify(final_answer(row["completion"]), row)
    return NEEDS_JUDGE if ok is None else ("" if ok else "unverified")


def check_candidate(row: dict, cfg, decontaminator: Decontaminator | None,
                    judged_tasks: frozenset[str] = frozenset(), count_tokens=None, max_tokens: int = 0) -> str:
    """The first reason (FILTER_REASONS order) the candidate is rejected, NEEDS_JUDGE, or ''.
    `cfg` holds `max_words` and `max_paragraph_words` (a `RejectionSamplingConfig`); with
    `count_tokens(prompt, completion)` (`sft_length`), an example longer than `max_tokens` (the
    SFT sequence) is too long."""
    completion = row["completion"]
    reasoning = is_reasoning(row)
    if row.get("finish_reason") == "length":
        return "truncated"
    parsed = parse_format(completion)
    if reasoning and (parsed is None or parsed.summary is None):  # the readable format, as cold start
        return "malformed"
    if not reasoning and parsed is None and not (row["task"] in SIMPLE_KINDS and NO_COT.fullmatch(completion)):
        return "malformed"
    if parsed is not None and row["task"] not in CROSS_LINGUAL and mixes_languages(completion, row["language"]):
        return "mixed_language"
    if has_long_paragraph(completion, cfg.max_paragraph_words):
        return "long_paragraph"
    if has_code_block(completion):  # no code tasks yet; a code task will be exempt
        return "code_block"
    if len(completion.split()) > cfg.max_words:
        return "too_long"
    if count_tokens is not None and count_tokens(row["prompt"], completion) > max_tokens:
        return "too_long"
    if decontaminator is not None and any(map(decontaminator.contaminated,
                                              (row.get("question") or row["prompt"], completion))):
        return "contaminated"  # the question is an eval question, or either shares an n-gram with one
    return verdict(row, judged_tasks) if reasoning else ""



def annotate(row: dict, cfg, decontaminator: Decontaminator | None,
             judged_tasks: frozenset[str] = frozenset(), count_tokens=None, max_tokens: int = 0) -> dict:
    """The compact columns `select` needs (the texts stay where they are, joined back by
    `sample_id` for what is kept): id, task, problem, reason, and for a row still in the running
    the exact-dedupe hash and MinHash signature (a rejected row needs neither: most, at scale)."""
    reason = check_candidate(row, cfg, decontaminator, judged_tasks, count_tokens, max_tokens)
    text = dedupe_text(row) if reason in ("", NEEDS_JUDGE) else ""
    return {"sample_id": sample_id(row), "task": row["task"], "problem": row["problem"],
            "reasoning": is_reasoning(row), "reason": reason,
            "hash": content_hash(text) if text else "", "signature": minhash(text).tobytes() if text else b""}


@functools.cache
def _decontaminator(eval_texts: tuple[str, ...]) -> Decontaminator:
    return Decontaminator(eval_texts)


@functools.cache
def _token_counter(tokenizer_dir: str):
    from transformers import AutoTokenizer

    from r1core.tokenizer import sft_length

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return functools.partial(sft_length, tokenizer)


def annotate_rows(rows: list[dict], cfg, eval_texts: tuple[str, ...], judged_tasks: tuple[str, ...] = (),
                  tokenizer_dir: str | None = None, max_tokens: int = 0) -> list[dict]:
    """`annotate` rows against the eval texts (and, with `tokenizer_dir`, the SFT length); the
    unit of work of a Ray Data task or of a plain loop (a process builds its helpers once)."""
    count_tokens = _token_counter(tokenizer_dir) if tokenizer_dir else None
    decontaminator = _decontaminator(eval_texts)
    return [annotate(r, cfg, decontaminator, frozenset(judged_tasks), count_tokens, max_tokens) for r in rows]


def quota_order(sample: str) -> str:
    """A fixed pseudo-random order of sample ids: a quota (or an audit) takes a uniform subset,
    whatever the input order."""
    return hashlib.sha1(sample.encode()).hexdigest()


def select(rows: list[dict], per_problem: int, quotas: dict[bool, int], near_threshold: float) -> list[dict]:
    """Final reasons for annotated rows (`annotate`, judge verdicts applied): exact and near
    duplicates, `per_problem` per problem, then the quota per side (`quotas[is_reasoning]`).
    Sorts `rows` by `sample_id` and sets their `reason` in place (no copies: at scale these
    are millions of rows); returns them. Kept rows have ''."""
    rows.sort(key=lambda r: r["sample_id"])
    hashes: set[str] = set()
    near = NearDuplicates(near_threshold)
    per: Counter[tuple] = Counter()
    passing: dict[bool, list[dict]] = {True: [], False: []}
    for r in rows:
        if r["reason"]:
            continue
        if r["hash"] in hashes:
            r["reason"] = "duplicate"
        elif near.add_signature(r["sample_id"], np.frombuffer(r["signature"], dtype=np.uint32)):
            r["reason"] = "near_duplicate"
        elif per[(r["reasoning"], r["problem"])] >= per_problem:
            r["reason"] = "per_problem"
        else:
            per[(r["reasoning"], r["problem"])] += 1
            passing[r["reasoning"]].append(r)
        hashes.add(r["hash"])
    for side, kept in passing.items():
        for r in sorted(kept, key=lambda r: quota_order(r["sample_id"]))[quotas[side]:]:
            r["reason"] = "over_quota"
    return rows


def reason_counts(rows: list[dict]) -> dict[str, int]:
    """Candidates, kept per side, and rejections per reason (every reason listed, zeros too)."""
    counts = Counter({f"rejected/{reason}": 0 for reason in REASONS})
    for r in rows:
        side = "reasoning" if r["reasoning"] else "non_reasoning"
        counts[f"candidates/{side}"] += 1
        counts[f"kept/{side}" if not r["reason"] else f"rejected/{r['reason']}"] += 1
    return dict(sorted(counts.items()))
