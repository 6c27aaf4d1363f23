"""The "aha moment" metric (r1core/reflection.py): which completions re-check or revise their
reasoning, in both languages, and that no input can make it slow or crash."""
import random
import time

import pytest

from r1core.evaluation import evaluate
from r1core.reflection import MAX_SCANNED_CHARS, reflection_rate, reflects, revises_a_result, says_reflection


def _wrap(think: str, answer: str = "7") -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


@pytest.mark.parametrize("think", [
    "3 plus 4 is 7. Check: 7 minus 4 is 3.",
    "3 plus 4 is 7. Wait, let me re-evaluate this step.",
    "WAIT. 3 plus 4 is 7.",
    "3 plus 4 is 7, let me recompute: 3 plus 4 is 7.",
    "Let me double-check: 7 minus 4 is 3.",
    "I made a mistake above; 3 plus 4 is 7.",
    "Hmmm, 3 plus 4 is 7. Actually yes.",
    "We verify it: 7 - 4 = 3.",
    "3 плюс 4 будет 7. Проверка: 7 минус 4 будет 3.",
    "Подожди, 3 плюс 4 будет 7.",
    "На самом деле 3 плюс 4 будет 7.",
    "Я ошибся: 3 плюс 4 будет 7.",
    "Перепроверим: 3 плюс 4 будет 7.",
])
def test_reflective_phrases_in_either_language_count(think):
    assert reflects(_wrap(think))
    assert says_reflection(think)


@pytest.mark.parametrize("think", [
    "3 plus 4 is 8. 8 minus 2 is 6. 3 plus 4 is 7. 7 minus 2 is 5.",
    "3 плюс 4 будет 8, 3 плюс 4 будет 7.",
    "3 + 4 = 8 ... 3 + 4 = 7",
    "12 times 3 is 35; 12 times 3 equals 36",
    "3 Plus 4 is 8. 3 plus 4 is 7.",  # the operator's case does not make it another step
])
def test_a_step_restated_with_another_result_is_a_revision(think):
    assert revises_a_result(think) and reflects(_wrap(think))


@pytest.mark.parametrize("think", [
    "3 plus 4 is 7. 7 minus 2 is 5.",
    "3 plus 4 is 7. So 3 plus 4 is 7.",  # the same result twice revises nothing
    "3 плюс 4 будет 7. 7 минус 2 будет 5.",
    "3 plus 4 is 7 and 3 minus 4 is -1.",  # another step, not a revision
    "13 plus 4 is 17. 3 plus 4 is 7.",  # "3 plus 4" inside "13 plus 4" is not the same step
    "The checkpoint and the checker are awaiting a verdict; the waitress is unverified.",  # words containing the lexicon's
    "",
])
def test_plain_reasoning_does_not_count(think):
    assert not reflects(_wrap(think))


def test_only_the_chain_of_thought_is_read():
    assert not reflects(_wrap("3 plus 4 is 7.", answer="wait, check, verify"))
    assert reflects("no tags at all, wait")  # malformed: all of its text is the reasoning


def test_the_rate_is_a_share():
    texts = [_wrap("Wait."), _wrap("3 plus 4 is 7."), _wrap("Проверка: 7 минус 4 будет 3."), _wrap("1 plus 1 is 2.")]
    assert reflection_rate(texts) == 0.5
    assert reflection_rate([]) == 0.0


@pytest.mark.parametrize("text", [
    "1 plus " * 200_000,  # steps that never end
    "9" * 1_000_000,  # one enormous number
    " ".join(f"{i} plus {i} is {i}" for i in range(50_000)),  # many distinct steps
    "<think>" * 100_000 + "wait",  # tags without end
    "провер" * 200_000,
    "\u0000\ud800 wait" * 10_000,  # NULs and a lone surrogate
])
def test_hostile_inputs_are_answered_quickly(text):
    start = time.perf_counter()
    reflects(text)
    assert time.perf_counter() - start < 1.0


def test_only_the_first_chars_are_scanned():
    late = "x " * MAX_SCANNED_CHARS + "wait"
    assert not says_reflection(late)


def test_fuzz_random_text_never_raises():
    rng = random.Random(0)
    alphabet = list("0123456789 +-*/=.,:;!?<>/ ") + ["plus ", "minus ", "is ", "будет ", "wait", "Проверка", "<think>",
                                                     "</think>", "<answer>", "</answer>", "\n", "é", "ё", "🙂"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert isinstance(reflects(text), bool)


class _Echo:
    """An engine answering every prompt with fixed completions (a stand-in for a model)."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, n, sampling):
        from r1core.engine import Rollout

        return [Rollout(prompt_index=i, text=self.texts[j % len(self.texts)], completion_ids=[1, 2], finish_reason="stop")
                for i in range(len(prompts)) for j in range(n)]


def test_evaluation_reports_the_reflection_rate(rows):
    from r1core.engine import Sampling

    heldout = rows[1][:3]
    metrics = evaluate(_Echo([_wrap("Wait, 1 plus 1 is 2."), _wrap("1 plus 1 is 2.")]), heldout, 2,
                       Sampling(0.6, 0.95, 8, seed=0))
    assert metrics["reflection_rate"] == 0.5
