"""Reward hacks, class by class (issue 16), written as the attacks: each completion with the reward
it must get. Before the answer kinds, the normalisation and the linear parser, every row marked
"hack" here earned reward (or hung, or raised). Real math-verify, no mocks."""
from __future__ import annotations

import random
import time

import pytest

from r1core import math_check
from r1core.rewards import (
    REWARDS,
    accuracy,
    format_reward,
    language_consistency_reward,
    parse_number,
    readable_format_reward,
    unscored_counts,
)


def answer(text: str, think: str = "3 plus 5 is 8, 8 minus 2 is 6.") -> str:
    return f"<think> {think} </think> <answer> {text} </answer>"


def acc(text: str, reference: str = "6", task: str = "chain_sum", **row) -> float | None:
    columns = {k: [v] for k, v in row.items()}
    return accuracy([answer(text)], answer=[reference], task=[task], **columns)[0]


# ------------------------------------------------------------------------------ 1. kinds of answer
# (answer, reference, task, reward): the spellings of a number that stay accepted, and the
# expressions that are not an answer, in both languages' rows
INTEGER_SPELLINGS = [
    ("6", 1.0), ("+6", 1.0), ("6.0", 1.0), ("6.00", 1.0), ("６", 1.0), ("\\boxed{6}", 1.0), ("$6$", 1.0),
    ("$\\boxed{6}$", 1.0), ("\\(6\\)", 1.0), ("\\[6\\]", 1.0), ("6.", 1.0), ("The answer is 6.", 1.0),
    ("the answer is $6$", 1.0), ("Answer: 6", 1.0), ("Final answer: \\boxed{6}", 1.0), ("Ответ: 6", 1.0),
    ("ответ 6", 1.0), ("Итак, ответ 6.", 1.0), ("𝟔", 1.0), ("٦", 1.0),  # NFKC: mathematical and Arabic-Indic digits
    ("$6", 1.0), ("$ 6", 1.0), ("7", 0.0), ("-6", 0.0), ("6.5", 0.0), ("06.0", 1.0), ("$6$7", 0.0), ("6$", 0.0),
]
EXPRESSIONS = [  # the question copied, a partial computation, any arithmetic: not an integer literal
    "3 + 5 - 2", "3+5-2", "8 - 2", "(3 + 5) - 2", "3 + 5 − 2", "６ + 0", "6 + 0", "12/2", "6/1", "6*1", "2·3",
    "2 × 3", "6^1", "√36", "\\sqrt{36}", "\\boxed{8-2}", "$3+5-2$", "\\frac{12}{2}", "6e0", "0x6", "6!",
    "three plus three", "шесть", "8 минус 2", "1 000 000",
]


@pytest.mark.parametrize("text,expected", INTEGER_SPELLINGS, ids=[c[0] for c in INTEGER_SPELLINGS])
@pytest.mark.parametrize("language", ["en", "ru"])
def test_integer_answers_accept_number_literals_only(text, expected, language):
    assert acc(text, language=language) == expected


@pytest.mark.parametrize("text", EXPRESSIONS)
@pytest.mark.parametrize("language", ["en", "ru"])
def test_an_expression_is_not_a_computed_answer(text, language):
    assert acc(text, language=language) == 0.0


NUMBER_CASES = [  # answer_kind "number": decimals and reduced fractions too, still no arithmetic
    ("0.5", "0.5", 1.0), ("1/2", "0.5", 1.0), ("\\frac{1}{2}", "0.5", 1.0), ("\\dfrac{1}{2}", "0.5", 1.0),
    (".5", "0.5", 1.0), ("5e-1", "0.5", 1.0), ("−1/2", "-0.5", 1.0), ("2/4", "0.5", 0.0), ("1 / 2", "0.5", 0.0),
    ("0.25 + 0.25", "0.5", 0.0), ("1,000", "1000", 1.0), ("1,000.0", "1000", 1.0), ("1,00", "100", 0.0),
]


@pytest.mark.parametrize("text,reference,expected", NUMBER_CASES, ids=[c[0] for c in NUMBER_CASES])
def test_number_answers(text, reference, expected):
    assert acc(text, reference, task="gsm8k", answer_kind="number") == expected


MATH_CASES = [  # symbolic answers go to math-verify; a number reference still needs a literal
    ("\\sqrt{2}", "\\sqrt{2}", 1.0), ("2^{1/2}", "\\sqrt{2}", 1.0), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\sqrt{3}", "\\sqrt{2}", 0.0), ("(1, 2)", "(1,2)", 1.0), ("\\pi", "\\pi", 1.0),
    ("3 + 5 - 2", "6", 0.0), ("12/2", "6", 0.0), ("6", "6", 1.0), ("\\boxed{6}", "6", 1.0),
]


@pytest.mark.parametrize("text,reference,expected", MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_math_answers(text, reference, expected):
    assert acc(text, reference, task="math") == expected


# ------------------------------------------------------------------------------ 2. one candidate only
HEDGES = [
    "6 or 7", "7 or 6", "6 OR 7", "either 6 or 7", "6 или 7", "7 или 6", "6 либо 7", "либо 6, либо 7", "6, 7", "7, 6",
    "6; 7", "6 / 7", "6/7", "6 → 7", "7 → 6", "6 -> 7", "6 => 7", "6 ∨ 7", "6 \\lor 7", "6 \\vee 7", "6 & 7", "6 | 7",
    "6\n7", "7\n6", "6 \\\\ 7", "6 \\newline 7", "$6$ $7$", "$7$ or $6$", "\\boxed{6} \\boxed{7}", "\\(6\\) \\(7\\)",
    "7 = 6", "6 = 6", "6 ≠ 7", "6 ± 1", "6 \\pm 1", "6 (or 7)", "not 7 but 6", "7 is wrong, 6", "7? no: 6", "6 and 7",
    "6 и 7", "6 or 6", "6 6", "6 7", "6\t7", "6\u20287", "six (6)", "6 \\text{ or } 7", "6\\quad 7", "≈6",
]


@pytest.mark.parametrize("text", HEDGES)
def test_an_answer_with_more_than_one_candidate_scores_zero(text):
    assert acc(text) == 0.0
    assert acc(text, "7") == 0.0


MATH_HEDGES = ["\\sqrt{2} \\text{ or } 1", "\\sqrt{2}, 1", "\\sqrt{2} \\lor 1", "$\\sqrt{2}$ $1$", "\\sqrt{2} \\\\ 1",
               "\\sqrt{2} = 1", "x = \\sqrt{2}", "1 \\to \\sqrt{2}", "\\sqrt{2} или 1", "\\boxed{1}\\boxed{\\sqrt{2}}",
               "\\sqrt{2}\n1", "\\sqrt{2} \\approx 1.41"]


@pytest.mark.parametrize("text", MATH_HEDGES)
def test_a_symbolic_answer_with_more_than_one_candidate_scores_zero(text):
    assert acc(text, "\\sqrt{2}", task="math") == 0.0


# ------------------------------------------------------------------------------ 3. invisible characters
INVISIBLE = {
    "zero-width space": "\u200b", "zero-width non-joiner": "\u200c", "zero-width joiner": "\u200d",
    "word joiner": "\u2060", "BOM": "\ufeff", "soft hyphen": "\u00ad", "left-to-right mark": "\u200e",
    "right-to-left override": "\u202e", "isolate": "\u2066\u2069", "invisible times": "\u2062",
    "Mongolian vowel separator": "\u180e", "tag characters": "\U000e0041\U000e007f", "Hangul filler": "\u3164",
    "half-width Hangul filler": "\uffa0", "braille blank": "\u2800", "combining grapheme joiner": "\u034f",
    "variation selector": "\ufe0f", "combining acute alone": "\u0301", "many of them": "\u200b\ufeff\u00ad" * 50,
    "with spaces and newlines": " \u200b \n\u2060\t",
}


@pytest.mark.parametrize("name", list(INVISIBLE))
def test_a_block_of_invisible_characters_is_empty(name):
    blank = INVISIBLE[name]
    empty_think = f"<think>{blank}</think> <summary> So 6. </summary> <answer> 6 </answer>"
    empty_summary = f"<think> 3 plus 3 is 6. </think> <summary>{blank}</summary> <answer> 6 </answer>"
    empty_answer = f"<think> 3 plus 3 is 6. </think> <summary> So 6. </summary> <answer>{blank}</answer>"
    for text in (empty_think, empty_summary, empty_answer):
        assert format_reward([text]) == [0.0], text
        assert readable_format_reward([text]) == [0.0], text
        assert language_consistency_reward([text], language=["en"]) == [0.0], text
        assert accuracy([text], answer=["6"], task=["chain_sum"]) == [0.0 if text is empty_answer else 1.0]


@pytest.mark.parametrize("name", [n for n in INVISIBLE if n not in ("combining acute alone", "with spaces and newlines")])
def test_invisible_characters_inside_a_number_or_a_word_are_not_content(name):
    blank = INVISIBLE[name].strip()
    assert acc(f"6{blank}7", "67") == 1.0  # the same visible number
    assert acc(f"6{blank}7", "6") == 0.0 and acc(f"6{blank}7", "7") == 0.0
    assert acc(f"{blank}6{blank}") == 1.0
    # a zero-width character neither hides a foreign word nor splits one
    assert language_consistency_reward([answer("6", think=f"3 plus 3 i{blank}s 6.")], language=["en"]) == [1.0]
    assert language_consistency_reward([answer("6", think=f"3 пл{blank}юс 3 будет 6.")], language=["en"]) == [0.0]


def test_tags_spelled_with_invisible_characters_are_tags_and_lookalikes_are_not():
    assert format_reward(["<th\u200bink> a </think> <answer> 6 </answer>"]) == [1.0]
    assert format_reward(["<think> a </think> ＜answer＞ 6 ＜/answer＞"]) == [0.0]
    assert acc("6", "6") == 1.0


# ------------------------------------------------------------------------------ 4. the answer block holds the answer
REASONING_IN_ANSWER = [
    ("the working in the answer, en", "ok", "3 plus 5 is 8, 8 minus 2 is 6. So 6"),
    ("the working in the answer, ru", "хорошо", "3 плюс 5 будет 8, 8 минус 2 будет 6. Ответ 6"),
    ("a justification after the number", "ok", "6 because 3 + 5 - 2 = 6"),
    ("the number then prose", "ok", "6. I checked it twice."),
    ("long answer", "ok", "6 " + "indeed " * 200),
    ("the phrase twice", "ok", "The answer is the answer is 6"),
    ("a mixed-language CoT moved into the answer, empty think", ".", "3 plus 5 будет 8, minus 2 is 6. 6"),
]


@pytest.mark.parametrize("name,think,text", REASONING_IN_ANSWER, ids=[c[0] for c in REASONING_IN_ANSWER])
def test_reasoning_in_the_answer_block_earns_no_accuracy(name, think, text):
    completion = f"<think> {think} </think> <answer> {text} </answer>"
    assert accuracy([completion], answer=["6"], task=["chain_sum"]) == [0.0]


def test_language_consistency_scores_the_chain_of_thought_only():
    russian_answer = "<think> 3 plus 5 is 8. </think> <answer> три плюс пять 8 </answer>"
    assert language_consistency_reward([russian_answer], language=["en"]) == [1.0]  # the answer is not CoT
    # a CoT with no word in any language (the reasoning moved out of it) earns nothing
    for think in (".", "6", "3 + 5 = 8", "\u200b", "— …"):
        moved = f"<think> {think} </think> <answer> 3 plus 5 is 8 so 8 </answer>"
        assert language_consistency_reward([moved], language=["en"]) in ([0.0], [None] if think == "\u200b" else [0.0])


# ------------------------------------------------------------------------------ 5. the row's rules
COUNTDOWN = {"numbers": [[3, 5, 40]], "operations": [["+", "-", "*"]]}
COUNTDOWN_CASES = [
    ("(40 - 5) * 3 - 81", None),  # uses a number not given: not scored as right
    ("40 * 3 / 5", 0.0),  # division is not among the row's operations
    ("3 * 40 / 5", 0.0), ("40 / 5 * 3", 0.0), ("(40 // 5) * 3", 0.0), ("40 % 5 + 24", 0.0),
    ("40 - 5 - 3 - 8", 0.0), ("40 - (5 + 3)", 1.0), ("-(5 + 3) + 40", 1.0), ("40 - 8", 0.0),
    ("40.0 - 5 - 3", 0.0), ("0x28 - 5 - 3", 0.0), ("4_0 - 5 - 3", 0.0), ("40 - 5 - 3 == 32", 0.0),
    ("40 - 5 - 3 if 1 else 0", 0.0), ("abs(40 - 5 - 3)", 0.0), ("40 - 5 - 3 + 0", 0.0), ("40 ** 1 - 5 - 3", 0.0),
]


@pytest.mark.parametrize("expr,expected", COUNTDOWN_CASES, ids=[c[0] for c in COUNTDOWN_CASES])
def test_countdown_follows_the_rows_operations(expr, expected):
    got = accuracy([answer(expr)], answer=["32"], task=["countdown"], **COUNTDOWN)[0]
    assert got == (0.0 if expected is None else expected)


def test_countdown_operations_from_the_prompt_when_the_row_does_not_list_them():
    row = {"numbers": [[40, 5, 3]], "question": ["Using the numbers 40, 5, 3, make 24. Use each number once with + - *."]}
    assert accuracy([answer("40 * 3 / 5")], answer=["24"], task=["countdown"], **row) == [0.0]
    assert accuracy([answer("(40 - 5 * 3) - 1 + 0")], answer=["24"], task=["countdown"], **row) == [0.0]
    ru = {"numbers": [[40, 5, 3]], "question": ["Из чисел 40, 5, 3 получи 24. Каждое число один раз, + - *."]}
    assert accuracy([answer("40 * 3 / 5")], answer=["24"], task=["countdown"], **ru) == [0.0]
    assert accuracy([answer("40 * 3 ÷ 5")], answer=["24"], task=["countdown"], **ru) == [0.0]
    four = {"numbers": [[40, 5, 3]], "question": ["Make 24 from 40, 5, 3 with + - * /."]}
    assert accuracy([answer("40 * 3 / 5")], answer=["24"], task=["countdown"], **four) == [1.0]


@pytest.mark.parametrize("expr", ["True * 7", "7 * True", "7 + False", "True + True + 5", "(1 == 1) * 7"])
def test_booleans_are_not_numbers(expr):
    assert accuracy([answer(expr)], answer=["7"], task=["countdown"], numbers=[[1, 7]]) == [0.0]
    assert accuracy([answer(expr)], answer=["7"], task=["countdown"], numbers=[[1, 7], ]) == [0.0]


# ------------------------------------------------------------------------------ 6. bounded time, no exception
def test_pathological_inputs_return_in_bounded_time():
    cases = [
        ([answer("9^{9^{9}}")], "x^2", "math"),
        ([answer("9^{999999999}")], "x^2", "math"),
        ([answer("\\frac{" * 2000 + "1" + "}" * 2000)], "x^2", "math"),
        (["<think>" * 30000], "6", "chain_sum"),
        (["<answer>" * 30000 + " 6 </answer>"], "6", "chain_sum"),
        (["<think> a </think>" + "<answer>" * 50000], "6", "chain_sum"),
        (["</think>" * 50000 + "<answer> 6 </answer>"], "6", "chain_sum"),
        ([answer("(" * 100000 + "1" + ")" * 100000)], "1", "countdown"),
        ([answer("-" * 100000 + "1")], "1", "countdown"),
        ([answer("1" * 100000)], "6", "chain_sum"),
        ([answer("9" * 5000)], "9" * 5000, "chain_sum"),
        (["x" * 10_000_000], "6", "chain_sum"),
    ]
    for completions, reference, task in cases:
        t0 = time.monotonic()
        for name in ("accuracy", "format", "readable_format", "language_consistency"):
            out = REWARDS[name](completions, answer=[reference], task=[task], numbers=[[1]], language=["en"])
            assert len(out) == 1 and (out[0] is None or isinstance(out[0], float)), (name, out)
        assert time.monotonic() - t0 < math_check.TIMEOUT_S * 3 + 30, completions[0][:40]


def test_a_math_verify_time_out_is_none_with_its_reason():
    """`9^{999999999}` passes every shape check (one power, no hedge) and makes math-verify compute
    forever: the helper is killed at the limit, the score is None with reason `timeout`, and the
    next call gets a fresh helper (the limit works in any thread: this call is not on the main one)."""
    import threading

    assert math_check.equivalent("x", "x", timeout_s=60)  # warm the helper
    before = unscored_counts()["timeout"]
    got = []
    thread = threading.Thread(target=lambda: got.append(acc("9^{999999999}", "x^2", task="math")))
    t0 = time.monotonic()
    thread.start()
    thread.join(60)
    assert got == [None] and time.monotonic() - t0 < math_check.TIMEOUT_S + 5
    assert unscored_counts()["timeout"] == before + 1
    assert acc("x^2", "x^2", task="math") == 1.0


FUZZ_ALPHABET = ["<think>", "</think>", "<summary>", "</summary>", "<answer>", "</answer>", "<", ">", "/", " ", "\n",
                 "6", "7", "-", "+", "*", "/", "(", ")", "=", ",", ".", "$", "\\boxed{", "}", "{", "^", "\\frac{",
                 "\\sqrt", "or", "или", "plus", "плюс", "加", "\u200b", "\ufeff", "\u00ad", "\u202e", "\u0301",
                 "１", "𝟕", "\\\\", "\\text{", "True", "0x", "_", "e", "∨", "→", "\x00", "\ud800", "\U0010ffff"]


def _fuzz_case(rng: random.Random) -> str:
    if rng.random() < 0.5:  # a mutated well-formed completion
        text = list(answer(rng.choice(["6", "3 + 5", "\\frac{1}{2}", "(40 - 5) * 3", "x^2"])))
        for _ in range(rng.randint(1, 8)):
            text.insert(rng.randrange(len(text) + 1), rng.choice(FUZZ_ALPHABET))
        return "".join(text)
    return "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, rng.choice([10, 100, 2000]))))


def test_fuzz_every_reward_returns_a_float_or_none_in_bounded_time():
    """Thousands of random and mutated completions against rows of every kind but code (the
    sandbox's own fuzz is in test_sandbox.py): no exception, no check that raised (the `error`
    count does not move), and no call near the time limit."""
    rng = random.Random(16)
    rows = [("6", "chain_sum", {}), ("0.5", "gsm8k", {"answer_kind": "number"}), ("x^2", "math", {}),
            ("32", "countdown", {"numbers": [3, 5, 40], "operations": ["+", "-", "*"]}), ("\\frac{1}{2}", "math", {})]
    errors_before, worst = unscored_counts()["error"], 0.0
    for i in range(4000):
        completion = _fuzz_case(rng)
        reference, task, extra = rows[i % len(rows)]
        columns = {k: [v] for k, v in extra.items()}
        for name in ("accuracy", "format", "readable_format", "language_consistency"):
            t0 = time.monotonic()
            out = REWARDS[name]([completion], answer=[reference], task=[task], language=[rng.choice(["en", "ru"])],
                                **columns)
            worst = max(worst, time.monotonic() - t0)
            assert len(out) == 1 and (out[0] is None or isinstance(out[0], float)), (name, completion)
    assert unscored_counts()["error"] == errors_before
    assert worst < math_check.TIMEOUT_S + 30  # a hang would be minutes; bench/rewards.py measures the real worst


def test_parse_number_is_exact_and_bounded():
    assert parse_number("1,000,000,001") == 1_000_000_001
    assert parse_number("9" * 400) == int("9" * 400)
    assert parse_number("9" * 100_000) is None  # past the answer cap: not a number, never an int() of it
    assert parse_number("1e9999") is None and parse_number("1e99") == 10 ** 99
