"""Non-reasoning SFT data (DeepSeek-R1, section 2.3.3): writing, factual QA, self-cognition and
translation, the kinds the paper takes from DeepSeek-V3's SFT data (~200k examples at full scale).

For the tiny profile they are synthesised here in both languages, standing in for that data.
As in the paper, a task that needs some thought gets a short chain of thought before the answer
(V3 was prompted for one), while simple queries ("hello", "who are you?") get none: their
completion is the answer block alone (`NO_COT`).

Rows are `{id, task, language, problem, question, prompt, answer, completion, numbers, sample}`,
the shape of sampled reasoning rows, with `answer` the reference response and `sample` the
example's index (ids repeat when a question does).
"""
from __future__ import annotations

import random
import re

from r1core.problems import r1_zero_prompt, readable_response, row_id

KINDS = ("writing", "factual_qa", "self_cognition", "translation", "greeting")
SIMPLE_KINDS = {"self_cognition", "greeting"}  # answered without a chain of thought
CROSS_LINGUAL = {"translation"}  # two languages in the CoT by nature: no language-mixing filter
NO_COT = re.compile(r"\s*<answer>(?P<answer>[^<>]*\S[^<>]*)</answer>\s*")

CAPITALS = {  # country -> capital, per language
    "en": {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
           "Germany": "Berlin", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo", "Peru": "Lima",
           "Kenya": "Nairobi", "Cuba": "Havana"},
    "ru": {"Франция": "Париж", "Италия": "Рим", "Испания": "Мадрид", "Япония": "Токио", "Египет": "Каир",
           "Германия": "Берлин", "Польша": "Варшава", "Греция": "Афины", "Норвегия": "Осло", "Перу": "Лима",
           "Кения": "Найроби", "Куба": "Гавана"},
}
WORDS = {"cat": "кот", "dog": "собака", "house": "дом", "water": "вода", "sun": "солнце", "tree": "дерево",
         "book": "книга", "city": "город", "river": "река", "bread": "хлеб", "friend": "друг", "sea": "море",
         "window": "окно", "table": "стол", "moon": "луна", "bird": "птица"}
ADJECTIVES = {"en": ["quiet", "bright", "old", "small", "warm", "kind"],
              "ru": ["тихий", "яркий", "старый", "маленький", "тёплый", "добрый"]}
TEXT = {
    "en": {
        "writing": ["Write one sentence about a {thing}.", "Describe a {thing} in one sentence.",
                    "Say something nice about a {thing}."],
        "writing_cot": "The user wants one sentence about a {thing}. A {adj} {thing} is a simple picture.",
        "writing_summary": "One short sentence.",
        "writing_answer": "The {thing} is {adj} today.",
        "factual_qa": ["What is the capital of {country}?", "Name the capital city of {country}.",
                       "Which city is the capital of {country}?"],
        "factual_cot": "The question asks for the capital of {country}. The capital of {country} is {capital}.",
        "factual_summary": "The capital is {capital}.",
        "translation": ["Translate the word {word} into Russian.", "How do you say {word} in Russian?",
                        "Give the Russian word for {word}."],
        "translation_cot": "The word {word} in Russian is {other}.",
        "translation_summary": "The translation is {other}.",
        "self_cognition": ["Who are you?", "What is your name?", "What can you do?", "Who made you?",
                           "Are you a human?", "What are you good at?", "Introduce yourself.", "What model are you?"],
        "self_answer": "I am R1-tiny, a small reasoning model trained by r1-factory. I solve arithmetic step by step.",
        "greeting": ["Hello!", "Hi!", "Good morning!", "Good evening!", "Hey there!", "Thank you!", "Thanks a lot!",
                     "Nice to meet you!"],
        "greeting_answer": "Hello! Ask me a question and I will solve it step by step.",
    },
    "ru": {
        "writing": ["Напиши одно предложение про {thing}.", "Опиши {thing} одним предложением.",
                    "Скажи что-нибудь хорошее про {thing}."],
        "writing_cot": "Пользователь просит одно предложение про {thing}. {adj} {thing} будет простой картиной.",
        "writing_summary": "Одно короткое предложение.",
        "writing_answer": "Сегодня {thing} {adj}.",
        "factual_qa": ["Какая столица у страны {country}?", "Назови столицу страны {country}.",
                       "Какой город столица страны {country}?"],
        "factual_cot": "Вопрос о столице страны {country}. Столица страны {country} это {capital}.",
        "factual_summary": "Столица это {capital}.",
        "translation": ["Переведи слово {word} на английский.", "Как сказать {word} по английски?",
                        "Дай английское слово для {word}."],
        "translation_cot": "Слово {word} по английски будет {other}.",
        "translation_summary": "Перевод будет {other}.",
        "self_cognition": ["Кто ты?", "Как тебя зовут?", "Что ты умеешь?", "Кто тебя создал?", "Ты человек?",
                           "В чём ты хорош?", "Представься.", "Какая ты модель?"],
        "self_answer": "Я R1-tiny, маленькая модель рассуждений от r1-factory. Я решаю примеры по шагам.",
        "greeting": ["Привет!", "Здравствуй!", "Доброе утро!", "Добрый вечер!", "Приветствую!", "Спасибо!",
                     "Большое спасибо!", "Рад знакомству!"],
        "greeting_answer": "Привет! Задай вопрос, и я решу его по шагам.",
    },
}


def no_cot_response(answer: str) -> str:
    return f" <answer> {answer} </answer>"


def example_parts(kind: str, language: str, rng: random.Random) -> tuple[str, str, str | None, str | None]:
    """(question, answer, cot, summary) of one example; cot None for a simple query."""
    t = TEXT[language]
    if kind == "writing":
        thing = rng.choice(list(WORDS) if language == "en" else list(WORDS.values()))
        adj = rng.choice(ADJECTIVES[language])
        return (rng.choice(t["writing"]).format(thing=thing), t["writing_answer"].format(thing=thing, adj=adj),
                t["writing_cot"].format(thing=thing, adj=adj.capitalize() if language == "ru" else adj),
                t["writing_summary"])
    if kind == "factual_qa":
        country, capital = rng.choice(sorted(CAPITALS[language].items()))
        return (rng.choice(t["factual_qa"]).format(country=country), capital,
                t["factual_cot"].format(country=country, capital=capital), t["factual_summary"].format(capital=capital))
    if kind == "translation":
        en, ru = rng.choice(sorted(WORDS.items()))
        word, other = (en, ru) if language == "en" else (ru, en)
        return (rng.choice(t["translation"]).format(word=word), other, t["translation_cot"].format(word=word, other=other),
                t["translation_summary"].format(other=other))
    if kind == "self_cognition":
        return rng.choice(t["self_cognition"]), t["self_answer"], None, None
    if kind == "greeting":
        return rng.choice(t["greeting"]), t["greeting_answer"], None, None
    raise ValueError(f"unknown non-reasoning kind '{kind}'; known: {KINDS}")


def non_reasoning_examples(count: int, mix: dict[str, float], languages: dict[str, float],
                           seed: int) -> list[dict]:
    """`count` synthetic non-reasoning examples, kinds drawn by `mix`, languages by `languages`.
    Repeats are possible (the space is small): deduplication downstream removes them."""
    rng = random.Random(seed)
    kinds, kind_weights = list(mix), list(mix.values())
    langs, lang_weights = list(languages), list(languages.values())
    rows = []
    for i in range(count):
        kind, language = rng.choices(kinds, kind_weights)[0], rng.choices(langs, lang_weights)[0]
        question, answer, cot, summary = example_parts(kind, language, rng)
        rows.append({"id": row_id(question), "task": kind, "language": language, "problem": question,
                     "question": question, "prompt": r1_zero_prompt(question), "answer": answer,
                     "completion": response(cot, summary, answer), "numbers": [], "sample": i})
    return rows


def response(cot: str | None, summary: str | None, answer: str) -> str:
    """The reference response: readable (think, summary, answer), or the bare answer of a simple query."""
    return no_cot_response(answer) if cot is None else readable_response(cot, summary, answer)
