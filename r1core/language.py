"""Which language a chain of thought is written in, word by word.

A word's language is the writing system of its letters (after `normalise`: NFKC, so that
full-width or mathematical look-alikes of Latin letters count as Latin, and invisible
characters removed, so that a zero-width space neither splits nor forms a word). Words without letters
(numbers, symbols) carry no language. A word that mixes scripts ("plюс") belongs to no
language: it counts against consistency, as it should.

    language_consistency(cot, lang) = (# words in lang) / (# words that carry a language)

which is the paper's language-consistency reward (DeepSeek-R1, section 2.3.3: "the proportion
of target language words in the CoT"). A CoT is *mixed* when that share is below 1. (In the
readable format the CoT is the reasoning and its summary; see `rewards.cot_text`.)
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# language code -> the script its words are written in (the first word of a letter's Unicode name)
LANGUAGE_SCRIPTS = {"en": "LATIN", "ru": "CYRILLIC", "el": "GREEK", "zh": "CJK"}
SCRIPT_LANGUAGE = {script: lang for lang, script in LANGUAGE_SCRIPTS.items()}
WORD = re.compile(r"\w+")

# Characters that draw nothing but are not Unicode format (Cf) characters: Hangul fillers, the
# braille blank, the combining grapheme joiner, Khmer inherent vowels, Mongolian and other
# variation selectors.
BLANK = {0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x034F, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F,
         *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)}
KEEP = {"\t", "\n", "\r"}


@lru_cache(maxsize=1)
def _invisible_table() -> dict[int, int | None]:
    """str.translate table: every format (Cf) and control (Cc) character but tab and newlines,
    and the blanks above, removed; line and paragraph separators become newlines."""
    table: dict[int, int | None] = {c: None for c in BLANK}
    for c in range(0x110000):
        ch = chr(c)
        if unicodedata.category(ch) in ("Cf", "Cc") and ch not in KEEP:
            table[c] = None
    table.update({0x2028: ord("\n"), 0x2029: ord("\n"), 0x85: ord("\n")})
    return table


def strip_invisible(text: str) -> str:
    """`text` without the characters that draw nothing (zero-width spaces and joiners, the BOM,
    soft hyphens, bidi controls, tag characters, fillers, variation selectors, controls)."""
    return text.translate(_invisible_table())


def normalise(text: str) -> str:
    """What every format, answer and language check reads: NFKC, then `strip_invisible` (before
    and after NFKC, since NFKC maps some characters onto invisible ones)."""
    return strip_invisible(unicodedata.normalize("NFKC", strip_invisible(text)))


def has_visible(text: str) -> bool:
    """Whether `text` (already `normalise`d) draws anything: a letter, digit, punctuation or symbol.
    A block of spaces, combining marks alone or invisible characters is empty."""
    return any(unicodedata.category(ch)[0] in "LNPS" for ch in text)


@lru_cache(maxsize=4096)
def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else None


@lru_cache(maxsize=1 << 16)  # words repeat (Zipf): rejection sampling checks millions of them
def word_script(word: str) -> str | None:
    """The one script of the word's letters; '' if letters of several scripts; None if no letters."""
    scripts = {s for s in map(_script, word) if s}
    if not scripts:
        return None
    return scripts.pop() if len(scripts) == 1 else ""


def language_words(text: str) -> list[str | None]:
    """For each word that carries a language: its language code, or None (mixed/unknown script)."""
    out = []
    for word in WORD.findall(normalise(text)):
        script = word_script(word)
        if script is not None:
            out.append(SCRIPT_LANGUAGE.get(script))
    return out


def language_consistency(text: str, language: str) -> float:
    """Share of language-carrying words of `text` written in `language`; 1.0 if there are none."""
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language '{language}'; known: {sorted(LANGUAGE_SCRIPTS)}")
    langs = language_words(text)
    return sum(lang == language for lang in langs) / len(langs) if langs else 1.0


def dominant_language(text: str) -> str | None:
    """The most frequent language among the words of `text` (None if no word carries one)."""
    langs = [lang for lang in language_words(text) if lang]
    return max(sorted(set(langs)), key=langs.count) if langs else None  # ties: alphabetical
