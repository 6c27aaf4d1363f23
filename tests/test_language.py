"""Language consistency and readability, as tables of strings: the paper's reward, plus what
a model (or a data source) could do to game or break it."""
import pytest

from r1core.language import dominant_language, language_consistency
from r1core.rewards import (
    REWARDS,
    format_reward,
    is_readable,
    language_consistency_reward,
    mixes_languages,
    parse_format,
)


def completion(cot: str, summary: str | None = None, answer: str = "7") -> str:
    middle = f" <summary> {summary} </summary>" if summary is not None else ""
    return f"<think> {cot} </think>{middle} <answer> {answer} </answer>"


LC_CASES = [
    # name, completion, prompt language, reward
    ("english cot, english prompt", completion("3 plus 4 is 7."), "en", 1.0),
    ("russian cot, russian prompt", completion("3 плюс 4 будет 7."), "ru", 1.0),
    ("english cot, russian prompt", completion("3 plus 4 is 7."), "ru", 0.0),
    ("half and half", completion("3 plus 4 будет 7."), "en", 0.5),
    ("switch mid-way", completion("3 plus 4 is 7. 7 минус 2 будет 5."), "en", 0.5),
    ("mixed scripts within a word", completion("3 plюс 4 is 7."), "en", 0.5),
    ("cyrillic look-alike letter in a latin word", completion("3 p\u0430lus 4 is 7."), "en", 0.5),
    ("latin look-alike letter in a cyrillic word", completion("3 плюc 4 будет 7."), "ru", 0.5),
    # no word carries a language: nothing is consistent (else moving the reasoning out of the
    # CoT, into the answer, would earn the full reward)
    ("digits and symbols only", completion("3 + 4 = 7."), "en", 0.0),
    ("digits only, russian prompt", completion("3 4 7"), "ru", 0.0),
    ("full-width latin (NFKC)", completion("3 ｐｌｕｓ 4 ｉｓ 7."), "en", 1.0),
    ("mathematical bold latin (NFKC)", completion("3 𝐩𝐥𝐮𝐬 4 𝐢𝐬 7."), "en", 1.0),
    ("ligature (NFKC)", completion("ﬁve plus two is seven"), "en", 1.0),
    ("empty cot", completion(""), "en", 0.0),
    ("whitespace-only cot", completion("   \n "), "en", 0.0),
    ("no format at all", "3 plus 4 is 7. The answer is 7.", "en", 0.0),
    ("russian words only in the answer", completion("3 plus 4 is 7.", answer="семь"), "en", 1.0),
    ("the summary counts as CoT", completion("3 плюс 4 будет 7.", "So the answer is 7."), "ru", 1 / 3),
    ("russian cot and summary", completion("3 плюс 4 будет 7.", "Итак, ответ 7."), "ru", 1.0),
    ("another script entirely", completion("3 加 4 是 7"), "en", 0.0),
]


@pytest.mark.parametrize("name,text,language,expected", LC_CASES, ids=[c[0] for c in LC_CASES])
def test_language_consistency_reward(name, text, language, expected):
    assert language_consistency_reward([text], language=[language]) == [pytest.approx(expected)]
    assert REWARDS["language_consistency"] is language_consistency_reward


@pytest.mark.parametrize("name,text,language,expected", LC_CASES, ids=[c[0] for c in LC_CASES])
def test_mixing_is_any_word_outside_the_prompt_language(name, text, language, expected):
    if parse_format(text) is not None and "digits" not in name:  # well-formed: mixing and the reward agree
        assert mixes_languages(text, language) == (expected < 1.0)
    elif "digits" in name:  # no word: nothing mixes, and nothing earns the reward
        assert not mixes_languages(text, language) and expected == 0.0


READABLE_CASES = [
    ("reasoning, summary, answer", completion("3 plus 4 is 7. Check: 7 minus 4 is 3.", "So the answer is 7."), "en", True),
    ("russian, readable", completion("3 плюс 4 будет 7.", "Итак, ответ 7."), "ru", True),
    ("no summary", completion("3 plus 4 is 7."), "en", False),
    ("empty summary", completion("3 plus 4 is 7.", " "), "en", False),
    ("summary in another language", completion("3 plus 4 is 7.", "Итак, ответ 7."), "en", False),
    ("mixed cot", completion("3 plus 4 будет 7.", "So the answer is 7."), "en", False),
    ("two summaries", completion("3 plus 4 is 7.", "So 7. </summary> <summary> 7"), "en", False),
    ("summary after the answer", "<think> 3 plus 4 is 7. </think> <answer> 7 </answer> <summary> So 7. </summary>",
     "en", False),
]


@pytest.mark.parametrize("name,text,language,expected", READABLE_CASES, ids=[c[0] for c in READABLE_CASES])
def test_readability(name, text, language, expected):
    assert is_readable(text, language) is expected


READABLE_FORMAT_CASES = [
    ("think, summary, answer", completion("3 plus 4 is 7.", "So 7."), 1.0),
    ("no summary (R1-Zero format)", completion("3 plus 4 is 7."), 0.0),
    ("empty cot", completion("", "So 7."), 0.0),
    ("empty summary", completion("3 plus 4 is 7.", "  "), 0.0),
    ("digits-only summary", completion("3 + 4 = 7.", "7"), 1.0),
    ("mixed-script summary (structure only)", completion("3 plus 4 is 7.", "plюс"), 1.0),
    ("full-width look-alike tags are not tags",
     "<think> 3 plus 4 is 7. </think> ＜summary＞ So 7. ＜/summary＞ <answer> 7 </answer>", 0.0),
    ("summary after the answer", "<think> a </think> <answer> 7 </answer> <summary> So 7. </summary>", 0.0),
    ("summary inside think", "<think> a <summary> So 7. </summary> </think> <answer> 7 </answer>", 0.0),
    ("two summaries", "<think> a </think> <summary> x </summary> <summary> y </summary> <answer> 7 </answer>", 0.0),
]


@pytest.mark.parametrize("name,text,expected", READABLE_FORMAT_CASES, ids=[c[0] for c in READABLE_FORMAT_CASES])
def test_readable_format_reward(name, text, expected):
    assert REWARDS["readable_format"]([text]) == [expected]


def test_summary_is_optional_for_the_format_reward_and_length_bounds_readability():
    assert format_reward([completion("a"), completion("a", "b"), completion("a", "")]) == [1.0, 1.0, 0.0]
    assert REWARDS["readable_format"]([completion("a"), completion("a", "b"), completion("a", "")]) == [0.0, 1.0, 0.0]
    long = completion(" ".join(["plus"] * 80), "So the answer is 7.")
    assert is_readable(long, "en") and not is_readable(long, "en", max_words=60)


def test_unknown_language_is_an_error_and_dominant_language():
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        language_consistency("plus", "xx")
    assert dominant_language("Вычисли 3 + 4 быстро, please") == "ru"
    assert dominant_language("Вычисли, please") == "en"  # a tie goes alphabetically
    assert dominant_language("3 + 4") is None
