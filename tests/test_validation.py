"""Bad prompt rows are quarantined with line and reason; an error budget decides whether the
job goes on."""
import json

import pytest

from r1core.validation import ErrorBudgetExceeded, read_jsonl_checked, row_problem, within_budget


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p", "answer": "1", "task": "chain_sum"}, None),
    ({"prompt": "p", "answer": 7, "task": "chain_sum"}, None),
    ({"prompt": "p", "task": "chain_sum"}, "missing field 'answer'"),
    ({"prompt": "", "answer": "1", "task": "t"}, "missing field 'prompt'"),
    ({"prompt": ["p"], "answer": "1", "task": "t"}, "field 'prompt' is list, not a string"),
    ({"prompt": "p", "answer": True, "task": "t"}, "field 'answer' is bool, not a string"),
    ([1, 2], "not a JSON object (list)"),
])
def test_row_problems(row, reason):
    assert row_problem(row) == reason


def test_quarantine_and_error_budget(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = json.dumps({"prompt": "Compute 1 + 1.", "answer": 2, "task": "chain_sum"}).encode()
    path.write_bytes(b"\n".join([good, b'{"prompt": "x", "task": "t"}', b'{"prompt": "\xff\xfe", "answer": "1"',
                                 b"not json", good, b""]))
    rows, bad = read_jsonl_checked(path)
    assert len(rows) == 2 and rows[0]["answer"] == "2"
    assert [(b["line"], b["reason"]) for b in bad] == [
        (2, "missing field 'answer'"), (3, "invalid UTF-8 at byte 12"), (4, "invalid JSON (Expecting value)")]
    within_budget(str(path), len(rows), bad, error_budget=0.7)  # 3 of 5 bad: within 70%
    with pytest.raises(ErrorBudgetExceeded, match=r"prompts.jsonl: 3 of 5 rows are bad, more than the error "
                                                 r"budget of 50.0% \(line 2: missing field 'answer'"):
        within_budget(str(path), len(rows), bad, error_budget=0.5)
