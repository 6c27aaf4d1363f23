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


def test_quarantine_file_keeps_row_and_reason_and_a_clean_rerun_clears_it(tmp_path):
    from r1core.validation import read_with_quarantine

    path, quarantine = tmp_path / "prompts.jsonl", tmp_path / "out" / "quarantine.jsonl"
    ok = {"prompt": "Compute 1 + 1.", "answer": "2", "task": "chain_sum"}
    lines = [json.dumps(ok).encode()] * 8 + [json.dumps({"prompt": "p", "answer": 3.5, "task": "t"}).encode(),
                                             b'{"prompt": "\xc3\x28", "answer": "1", "task": "t"}']
    path.write_bytes(b"\n".join(lines))
    good, bad = read_with_quarantine(path, quarantine, error_budget=0.2)
    assert len(good) == 8 and len(bad) == 2
    saved = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [(q["file"], q["line"], q["reason"]) for q in saved] == [
        (str(path), 9, "field 'answer' is float, not a string"), (str(path), 10, "invalid UTF-8 at byte 12")]
    assert '"answer": 3.5' in saved[0]["raw"]  # the row itself, as written
    with pytest.raises(ErrorBudgetExceeded, match="prompts.jsonl: 2 of 10 rows are bad"):
        read_with_quarantine(path, quarantine, error_budget=0.1)
    path.write_bytes(b"\n".join(lines[:8]))
    assert read_with_quarantine(path, quarantine, error_budget=0.0) == ([{**ok}] * 8, [])
    assert not quarantine.exists()


def test_parquet_parts_are_read_in_order_with_running_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1core.validation import read_checked

    ok = {"prompt": "p", "answer": "1", "task": "t"}
    pq.write_table(pa.Table.from_pylist([ok, ok]), tmp_path / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist([ok, {"prompt": "p", "answer": "", "task": "t"}]), tmp_path / "part-00001.parquet")
    good, bad = read_checked(tmp_path)
    assert len(good) == 3 and [(b["line"], b["reason"]) for b in bad] == [(4, "missing field 'answer'")]
