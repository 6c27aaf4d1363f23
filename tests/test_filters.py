"""Rejection-sampling filters as tables: long paragraphs, code blocks, exact and near
duplicates, decontamination."""
import pytest

from r1core.filters import (
    Decontaminator,
    NearDuplicates,
    content_hash,
    has_code_block,
    has_long_paragraph,
    minhash,
)

STEPS = "3 plus 4 is 7. 7 minus 2 is 5. Check: 5 plus 2 is 7."


@pytest.mark.parametrize("text,max_words,expected", [
    (STEPS, 30, False),
    (STEPS, 5, True),
    ("short one.\n\nshort two.", 2, False),
    ("short one.\n\n" + "word " * 12, 10, True),
    ("", 1, False),
])
def test_long_paragraphs(text, max_words, expected):
    assert has_long_paragraph(text, max_words) is expected


@pytest.mark.parametrize("text,expected", [
    (STEPS, False),
    ("Here:\n```python\nprint(1)\n```", True),
    ("Here:\n    x = 1\n", True),
    ("Here:\n\tx = 1\n", True),
    ("a `inline` word", False),
])
def test_code_blocks(text, expected):
    assert has_code_block(text) is expected


def test_exact_duplicates_ignore_case_whitespace_and_lookalikes():
    assert content_hash(STEPS) == content_hash("  3 PLUS 4 is 7.\n7 minus 2 is 5.   Check: 5 plus 2 is 7.")
    assert content_hash(STEPS) == content_hash(STEPS.replace("plus", "ｐｌｕｓ"))  # full-width, NFKC
    assert content_hash(STEPS) != content_hash(STEPS.replace("5.", "6."))


def test_near_duplicates():
    base = " ".join(f"step {i} adds {i} to the total and checks it again." for i in range(12))
    index = NearDuplicates(threshold=0.8)
    assert index.add("a", base) is None
    assert index.add("b", base.replace("step 7", "stage 7")) == "a"  # one word changed
    assert index.add("c", " ".join(f"line {i} multiplies {i} by two." for i in range(12))) is None
    assert index.add("d", base[: len(base) // 3]) is None  # a third of it: similar, not a duplicate
    assert (minhash(base) == minhash(base)).all()


def test_decontamination_against_eval_sets():
    heldout = ["Compute 3 + 4 - 2.", "Using the numbers 3, 5, make 15 with every number once, please now."]
    dc = Decontaminator(heldout, n=8)
    assert dc.contaminated("compute 3 + 4 - 2.")
    assert dc.contaminated("Question: using the numbers 3, 5, make 15 with every number once.")  # 8-gram
    assert not dc.contaminated("Compute 3 + 4 - 1.")
    assert not dc.contaminated("Using the numbers 3, 6, make 18.")
