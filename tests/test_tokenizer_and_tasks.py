import pytest
from transformers import AutoTokenizer

from r1core.config import DataConfig, PretrainConfig
from r1core.problems import (
    R1_ZERO_TEMPLATE,
    formatted_response,
    generate_split,
    pretraining_corpus,
    read_rows,
    write_rows,
)
from r1core.rewards import accuracy, format_reward
from r1core.tokenizer import R1_TAGS, decode_completion


def test_tags_are_single_tokens_that_survive_decoding(tokenizer):
    for tag in R1_TAGS:
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, tag
    text = " <think> 1 + 2 = 3. </think> <answer> 3 </answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # servers and TRL decode with skip_special_tokens=True: the tags must still be there
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert decode_completion(tokenizer, ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) == text


def test_digits_are_split(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if t.strip("Ġ")] == list("12345")


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = R1_ZERO_TEMPLATE.format(question="Compute 1 + 2.") + " <think> x </think>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (again.pad_token_id, again.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_split_is_disjoint_deterministic_and_verifiable(rows):
    train, heldout = rows
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    again_train, _ = generate_split(DataConfig(num_train=300, num_heldout=20))
    assert [r["id"] for r in again_train] == [r["id"] for r in train]
    # every row's own worked solution is rewarded as correct and well formed
    for r in train + heldout:
        final = r["expression"] or r["answer"]
        completion = formatted_response(r["solution"], final)
        assert format_reward([completion]) == [1.0]
        assert accuracy([completion], answer=[r["answer"]], task=[r["task"]], numbers=[r["numbers"]]) == [1.0], r


def test_every_task_kind_is_generated(rows):
    assert {r["task"] for r in rows[0]} == {"chain_sum", "countdown", "python_expr"}
    code = next(r for r in rows[0] if r["task"] == "python_expr" and r["language"] == "ru")
    assert code["question"].startswith("Напиши выражение на Python:")
    assert ("плюс" in code["question"] or "минус" in code["question"]) and "+" not in code["question"]
    assert code["expression"] == code["problem"].removeprefix("python: ")
    assert all(r["prompt"].startswith("A conversation between User and Assistant") for r in rows[0])


def test_too_small_task_space_fails_clearly():
    cfg = DataConfig(num_train=500, num_heldout=10, task_mix={"chain_sum": 1.0}, chain_max_terms=2, max_operand=2)
    with pytest.raises(ValueError, match="distinct"):
        generate_split(cfg)


def test_corpus_never_contains_heldout_questions(rows):
    train, heldout = rows
    docs = pretraining_corpus(train, PretrainConfig(corpus_docs=2000), seed=1)
    for r in heldout:
        q = r["question"]
        leaks = [d for d in docs if f"User: {q} " in d or d.startswith((f"{q} ", f"{q[:-1]} = "))]
        assert not leaks, leaks[:1]


def test_rows_round_trip_and_bad_rows_name_file_and_row(tmp_path, rows):
    path = write_rows(rows[1], tmp_path / "h.jsonl")
    assert read_rows(path) == rows[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "1", "task": "chain_sum"}\n{"prompt": "p2", "task": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 2: missing field 'answer'"):
        read_rows(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="row 1: invalid JSON"):
        read_rows(bad)
