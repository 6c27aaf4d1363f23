"""Rule rewards as tables of strings, including the known reward hacks."""
import pytest

from r1core.rewards import REWARDS, accuracy, answer_accuracy_any, combine, format_reward, is_correct

GOOD = "<think> 3 + 4 = 7. 7 - 2 = 5. </think> <answer> 5 </answer>"

FORMAT_CASES = [
    ("well formed", GOOD, 1.0),
    ("leading/trailing whitespace", "  <think>a</think>\n<answer>5</answer>\n", 1.0),
    ("no tags", "3 + 4 = 7. The answer is 5.", 0.0),
    ("empty think", "<think>  </think> <answer> 5 </answer>", 0.0),
    ("empty answer", "<think> x </think> <answer> </answer>", 0.0),
    ("text after </answer>", GOOD + " and also 6", 0.0),
    ("text before <think>", "Sure! " + GOOD, 0.0),
    ("repeated think blocks", "<think> a </think><think> b </think> <answer> 5 </answer>", 0.0),
    ("repeated answer blocks", "<think> a </think> <answer> 5 </answer><answer> 6 </answer>", 0.0),
    ("answer only inside think", "<think> <answer> 5 </answer> </think>", 0.0),
    ("answer before think", "<answer> 5 </answer> <think> a </think>", 0.0),
    ("nested tag in answer", "<think> a </think> <answer> <think> 5 </answer>", 0.0),
    ("unclosed answer", "<think> a </think> <answer> 5", 0.0),
]


@pytest.mark.parametrize("name,completion,expected", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_format_reward(name, completion, expected):
    assert format_reward([completion]) == [expected]


ACCURACY_CASES = [
    ("correct", GOOD, "5", 1.0),
    ("wrong", GOOD.replace("> 5 <", "> 6 <"), "5", 0.0),
    ("negative", "<think> a </think> <answer> -13 </answer>", "-13", 1.0),
    ("trailing period", "<think> a </think> <answer> 5. </answer>", "5", 1.0),
    ("equivalent decimal", "<think> a </think> <answer> 5.0 </answer>", "5", 1.0),
    ("several candidate answers", "<think> a </think> <answer> 5 or 6 </answer>", "5", 0.0),
    ("list of candidates", "<think> a </think> <answer> 4, 5, 6 </answer>", "5", 0.0),
    ("empty answer", "<think> a </think> <answer> </answer>", "5", 0.0),
    ("answer only inside think", "<think> <answer> 5 </answer> </think>", "5", 0.0),
    ("no answer block", "the answer is 5", "5", 0.0),
    ("last answer block counts", "<think> a </think> <answer> 6 </answer> <answer> 5 </answer>", "5", 1.0),
    ("last answer block counts (wrong)", "<think> a </think> <answer> 5 </answer> <answer> 6 </answer>", "5", 0.0),
    ("text around number", "<think> a </think> <answer> x is 5 </answer>", "5", 0.0),
    ("unparseable reference", GOOD, "banana split?!", None),
    ("empty reference", GOOD, "", None),
]


@pytest.mark.parametrize("name,completion,answer,expected", ACCURACY_CASES, ids=[c[0] for c in ACCURACY_CASES])
def test_accuracy_reward(name, completion, answer, expected):
    assert accuracy([completion], answer=[answer], task=["chain_sum"]) == [expected]


COUNTDOWN_CASES = [
    ("uses both numbers", "3 + 5", 1.0),
    ("spaces and parens", "(5) + 3", 1.0),
    ("multiplication", "2 * 4", 0.0),
    ("reuses a number", "5 + 3 + 0", 0.0),
    ("misses a number", "8", 0.0),
    ("uses a number twice", "5 + 5 - 2", 0.0),
    ("code injection", "__import__('os').system('true')", 0.0),
    ("power operator", "3 ** 5", 0.0),
    ("not an expression", "eight", 0.0),
]


@pytest.mark.parametrize("name,expr,expected", COUNTDOWN_CASES, ids=[c[0] for c in COUNTDOWN_CASES])
def test_countdown_accuracy(name, expr, expected):
    completion = f"<think> 3 + 5 = 8. </think> <answer> {expr} </answer>"
    assert accuracy([completion], answer=["8"], task=["countdown"], numbers=[[3, 5]]) == [expected]


def test_latex_fraction_equals_decimal_for_a_math_task():
    assert accuracy(["<think> a </think> <answer> \\frac{1}{2} </answer>"], answer=["0.5"], task=["math"]) == [1.0]
    # a chain sum's answer is an integer: 0.5 is not a reference it can have
    assert accuracy(["<think> a </think> <answer> 5 </answer>"], answer=["0.5"], task=["chain_sum"]) == [None]


def test_countdown_division_by_zero_is_wrong_not_error():
    assert is_correct("3 / (5 - 5)", "1", "countdown", [3, 5, 5]) is False


def test_format_agnostic_accuracy_reads_last_number_anywhere():
    texts = ["3 + 4 = 7. 7 - 2 = 5.", "<answer> 5 </answer> then 6", "no number"]
    assert answer_accuracy_any(texts, ["5"] * 3, ["chain_sum"] * 3) == [1.0, 0.0, 0.0]


def test_combine_weights_and_propagates_none():
    per = {"accuracy": [1.0, None, 0.0], "format": [1.0, 1.0, 0.0]}
    assert combine(per, {"accuracy": 1.0, "format": 0.5}) == [1.5, None, 0.0]


def test_registry_names():
    assert {"accuracy", "format"} <= set(REWARDS)
