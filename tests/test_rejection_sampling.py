"""Rejection sampling: every filter's reason, the judge, deduplication, quotas, non-reasoning data."""
import copy
import random

import pytest

from r1core.config import RejectionSamplingConfig
from r1core.filters import Decontaminator, normalize
from r1core.general_prompts import KINDS, SIMPLE_KINDS, non_reasoning_examples
from r1core.judge import JudgeItem, LocalJudge, judge_prompt, parse_verdict
from r1core.problems import final_of, long_cot, readable_response
from r1core.rejection_sampling import (
    NEEDS_JUDGE,
    REASONS,
    annotate,
    check_candidate,
    dedupe_text,
    reason_counts,
    sample_id,
    select,
)

CFG = RejectionSamplingConfig(max_words=70, max_paragraph_words=40)


def _sample(row: dict, completion: str, sample: int = 0, finish: str = "stop") -> dict:
    return {**row, "completion": completion, "sample": sample, "finish_reason": finish}


def _readable(row: dict, languages=None, answer=None) -> str:
    return readable_response(*long_cot(row, languages), answer or final_of(row))


@pytest.fixture(scope="module")
def chain(rows):
    return next(r for r in rows[0] if r["task"] == "chain_sum" and len(r["steps"]) == 2 and r["language"] == "en")


def test_every_filter_names_its_reason(chain):
    other = "ru" if chain["language"] == "en" else "en"
    good = _readable(chain)
    cases = {
        "truncated": _sample(chain, good, finish="length"),
        "malformed": _sample(chain, f" <think> x </think> <answer> {chain['answer']} </answer>"),  # no summary
        "mixed_language": _sample(chain, _readable(chain, [other, chain["language"]])),
        "long_paragraph": _sample(chain, good.replace("<think>", "<think> " + "word " * 41)),
        "code_block": _sample(chain, good.replace("<think>", "<think>\n```\nprint(1)\n```\n")),
        "too_long": _sample(chain, good.replace("<think>", "<think>" + " step." * 25 + "\n\n" + " step." * 25 + "\n\n")),
        "unverified": _sample(chain, _readable(chain, answer="12345")),
        "": _sample(chain, good),
    }
    for reason, row in cases.items():
        assert check_candidate(row, CFG, None) == reason, reason
    heldout = Decontaminator([chain["question"]])
    assert check_candidate(cases[""], CFG, heldout) == "contaminated"
    assert check_candidate(cases[""], CFG, None, count_tokens=lambda p, c: len(p) + len(c) + 1, max_tokens=50) == "too_long"


def test_the_judge_decides_where_no_rule_can(chain):
    good = _sample(chain, _readable(chain))
    assert check_candidate(good, CFG, None, judged_tasks=frozenset({"chain_sum"})) == NEEDS_JUDGE
    prose = {**good, "answer": "the same as the sum"}  # a reference no rule can score
    assert check_candidate(prose, CFG, None) == NEEDS_JUDGE


def test_non_reasoning_data_simple_queries_have_no_cot_and_translation_may_mix():
    rows = non_reasoning_examples(200, {k: 1.0 for k in KINDS}, {"en": 0.5, "ru": 0.5}, seed=3)
    assert rows == non_reasoning_examples(200, {k: 1.0 for k in KINDS}, {"en": 0.5, "ru": 0.5}, seed=3)
    assert {r["task"] for r in rows} == set(KINDS)
    for r in rows:
        assert ("<think>" not in r["completion"]) == (r["task"] in SIMPLE_KINDS), r
        assert check_candidate(r, CFG, None) == "", r  # translation mixes scripts and is kept
    assert check_candidate({**rows[0], "completion": "no tags"}, CFG, None) == "malformed"


def _annotated(rows_, completions):
    return [annotate(_sample(r, c, sample=i), CFG, None) for i, (r, c) in enumerate(zip(rows_, completions, strict=True))]


def test_select_drops_duplicates_near_duplicates_per_problem_and_applies_quotas(rows):
    chains = [r for r in rows[0] if r["task"] == "chain_sum" and r["language"] == "en"][:30]
    a = chains[0]
    text = _readable(a)
    near = text.replace("</summary>", "indeed </summary>")  # one word added
    annotated = _annotated([a, a, a], [text, text.replace(" ", "   "), near])  # exact (normalised) and near copies
    annotated += _annotated(chains[1:], [_readable(r) for r in chains[1:]])
    annotated += [annotate({**g, "finish_reason": "stop"}, CFG, None)
                  for g in non_reasoning_examples(40, {"greeting": 1.0}, {"en": 1.0}, seed=0)]
    out = select(copy.deepcopy(annotated), per_problem=1, quotas={True: 20, False: 5}, near_threshold=0.8)
    reasons = {r["sample_id"]: r["reason"] for r in out}
    # the first copy competes for the quota like any problem; its copies are duplicates either way
    assert [reasons[f"{a['id']}-{i:03d}"] for i in range(1, 3)] == ["duplicate", "near_duplicate"]
    assert reasons[f"{a['id']}-000"] in ("", "over_quota")
    kept = [r for r in out if not r["reason"]]
    greetings = {normalize(dedupe_text(g)) for g in non_reasoning_examples(40, {"greeting": 1.0}, {"en": 1.0}, seed=0)}
    counts = reason_counts(out)
    assert counts["kept/reasoning"] == 20 and counts["rejected/over_quota"] == 30 - 20  # 30 problems passed
    assert counts["rejected/duplicate"] == 1 + 40 - len(greetings)
    assert 1 <= counts["kept/non_reasoning"] <= len(greetings)  # "Hi! Hello! ..." ~ "Hello! Hello! ..."
    assert counts["kept/reasoning"] + counts["kept/non_reasoning"] == len(kept)
    assert sum(v for k, v in counts.items() if k.startswith(("kept/", "rejected/"))) == len(annotated)
    assert set(REASONS) <= {k.split("/")[1] for k in counts if k.startswith("rejected/")}
    shuffled = annotated[:]
    random.Random(0).shuffle(shuffled)  # the outcome is a function of the rows, not of their order
    assert select(copy.deepcopy(shuffled), 1, {True: 20, False: 5}, 0.8) == out


def test_judge_prompt_and_verdict_parsing():
    item = JudgeItem("Compute 2 + 3.", " 5 ", "5")
    assert judge_prompt(item).endswith("Reference: 5 Prediction: 5 Verdict:")
    assert parse_verdict(" Yes.") and parse_verdict("yes, it matches")
    assert not parse_verdict(" no") and not parse_verdict("") and not parse_verdict("yesterday")


def test_local_judge_runs_any_causal_lm(tokenizer):
    from r1core.config import ModelConfig
    from r1core.modeling import build_model

    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                    intermediate_size=64), tokenizer)
    judge = LocalJudge(model, tokenizer, batch_size=3)
    items = [JudgeItem(f"Compute {i} + 1.", str(i + 1), str(i + (i % 2))) for i in range(7)]
    verdicts = judge.judge(items)
    assert len(verdicts) == 7 and all(isinstance(v, bool) for v in verdicts)
    assert judge.judge(items[::-1]) == verdicts[::-1]  # batching and padding do not change a verdict


def test_judge_rows_on_ray_decide_what_rules_cannot_and_audit_the_rest(rows, tokenizer, tmp_path):
    """The judge as a Ray Data actor: rows of a judged task get its verdict; a sample of the
    rule-verified rows is judged too, verdict unused, for the agreement metric."""
    from r1core.config import ModelConfig, PipelineConfig, RuntimeConfig
    from r1core.modeling import build_model
    from tasks.ray_jobs import ensure_ray
    from tasks.rejection_sampling import judge_rows

    build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
                tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    chains = [r for r in rows[0] if r["task"] == "chain_sum" and r["language"] == "en"][:8]
    countdowns = [r for r in rows[0] if r["task"] == "countdown"][:4]
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.rejection_sampling import SAMPLE_SCHEMA

    samples = [_sample(r, _readable(r), sample=0) for r in chains + countdowns]
    pq.write_table(pa.Table.from_pylist([{**s, "sample_id": sample_id(s)} for s in samples], schema=SAMPLE_SCHEMA),
                   tmp_path / "samples.parquet")
    annotated = [annotate(s, CFG, None, frozenset({"chain_sum"})) for s in samples]
    assert [r["reason"] for r in annotated] == [NEEDS_JUDGE] * 8 + [""] * 4
    cfg = PipelineConfig(runtime=RuntimeConfig(num_cpus=2),
                         rejection_sampling={"judge": {"judged_tasks": ["chain_sum"], "audit_rows": 3}})
    ensure_ray(cfg.runtime)
    metrics = judge_rows(cfg, annotated, [str(tmp_path / "samples.parquet")], str(tmp_path))
    assert [r["verifier"] for r in annotated] == ["judge"] * 8 + ["rule"] * 4
    assert all(r["reason"] in ("", "unverified") for r in annotated[:8])
    assert [r["reason"] for r in annotated[8:]] == [""] * 4  # audited, not overruled
    assert metrics["judge/rows"] == 8 and metrics["judge/audited"] == 3
    assert metrics["judge/approved"] == sum(r["reason"] == "" for r in annotated[:8])
    assert 0 <= metrics["judge/agreement_with_rules"] <= 1  # 8 judged + 3 audited rows a rule also scores
