"""Text filters for building SFT data by rejection sampling (DeepSeek-R1, section 2.3.3):
long paragraphs, code blocks, exact and near duplicates, and decontamination against
evaluation sets. (Mixed-language chains of thought: `rewards.mixes_languages`.)

Near duplicates use MinHash with locality-sensitive hashing: each text becomes the set of its
word shingles; `NUM_PERM` multiply-shift hash functions give a signature whose share of equal
entries estimates the Jaccard similarity of two sets; signatures are cut into bands, and texts
that agree on a whole band are candidates, kept as duplicates when the estimate reaches the
threshold. Hashes are CRC-32 based, so they agree across processes (Ray workers).
"""
from __future__ import annotations

import re
import unicodedata
import zlib
from functools import lru_cache

import numpy as np

from r1core.language import WORD

CODE_BLOCK = re.compile(r"```|^(?: {4}|\t)\S", re.MULTILINE)
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: what 'the same text' means for exact dedupe."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_hash(text: str) -> str:
    key = normalize(text)
    return f"{zlib.crc32(key.encode()):08x}{len(key):x}"


def has_long_paragraph(text: str, max_words: int) -> bool:
    """Whether a paragraph (text between blank lines) has more than `max_words` words."""
    return any(len(p.split()) > max_words for p in PARAGRAPH_BREAK.split(text))


def has_code_block(text: str) -> bool:
    """Fenced (```) or indented code."""
    return bool(CODE_BLOCK.search(text))


# ------------------------------------------------------------------------------ near duplicates
NUM_PERM = 64
_RNG = np.random.default_rng(20250122)
_A = _RNG.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_B = _RNG.integers(0, 2**63, NUM_PERM, dtype=np.uint64)


@lru_cache(maxsize=1 << 16)
def _word_hash(word: str) -> int:
    return zlib.crc32(word.encode())


def shingles(text: str, n: int = 3) -> np.ndarray:
    """Hashes of the word n-grams of the normalized text (the whole text if shorter): the words'
    CRC-32s combined position by position (vectorised; words repeat, so theirs are cached)."""
    words = np.array([_word_hash(w) for w in WORD.findall(normalize(text))] or [0], dtype=np.uint64)
    k = max(1, len(words) - n + 1)
    grams = np.zeros(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(min(n, len(words))):
            grams = grams * np.uint64(0x100000001B3) + words[i : i + k]  # FNV-style mixing, mod 2^64
    return np.unique((grams ^ (grams >> np.uint64(32))) & np.uint64(0xFFFFFFFF))  # 32-bit keys, as minhash wants


def minhash(text: str, n: int = 3) -> np.ndarray:
    """The MinHash signature (NUM_PERM uint32) of the text's shingles."""
    h = shingles(text, n)
    # multiply-shift hashing: ((a*h + b) mod 2^64) >> 32, vectorised over permutations x shingles
    with np.errstate(over="ignore"):
        mixed = (_A[:, None] * h[None, :] + _B[:, None]) >> np.uint64(32)
    return mixed.min(axis=1).astype(np.uint32)


class NearDuplicates:
    """Streaming near-duplicate detection: `add(key, text)` returns the key of an earlier text
    whose estimated Jaccard similarity is at least `threshold`, else records the text."""

    def __init__(self, threshold: float = 0.8, bands: int = 16, n: int = 3):
        if NUM_PERM % bands:
            raise ValueError(f"bands must divide {NUM_PERM}")
        self.threshold, self.bands, self.n = threshold, bands, n
        self.rows = NUM_PERM // bands
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.keys: list[str] = []
        self.signatures = np.empty((1024, NUM_PERM), dtype=np.uint32)  # row i: keys[i]'s; grown by doubling

    def add(self, key: str, text: str) -> str | None:
        return self.add_signature(key, minhash(text, self.n))

    def add_signature(self, key: str, sig: np.ndarray) -> str | None:
        """`add` for a signature computed elsewhere (by a Ray worker, with the same `n`)."""
        band_keys = [sig[band * self.rows : (band + 1) * self.rows].tobytes() for band in range(self.bands)]
        candidates = {i for band_key, bucket in zip(band_keys, self.buckets, strict=True)
                      for i in bucket.get(band_key, ())}
        if candidates:  # one vectorised comparison with every candidate: many texts share a band
            idx = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            similar = (self.signatures[idx] == sig).mean(axis=1) >= self.threshold
            if similar.any():
                return self.keys[int(idx[np.argmax(similar)])]
        index = len(self.keys)
        if index == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[index] = sig
        self.keys.append(key)
        for band_key, bucket in zip(band_keys, self.buckets, strict=True):
            bucket.setdefault(band_key, []).append(index)
        return None


# ------------------------------------------------------------------------------ decontamination
class Decontaminator:
    """Flags texts that repeat an evaluation text: the same normalized text, or any shared word
    n-gram (n words) with one of them."""

    def __init__(self, eval_texts, n: int = 13):  # 13 words, as GPT-3's decontamination: shorter
        # n-grams match the shared wording of templated prompts ("use each number once with ...")
        self.n = n
        self.texts = {normalize(t) for t in eval_texts}
        self.ngrams = {g for t in self.texts for g in self._ngrams(t)}

    def _ngrams(self, normalized: str) -> set[str]:
        words = WORD.findall(normalized)
        return {" ".join(words[i : i + self.n]) for i in range(len(words) - self.n + 1)}

    def contaminated(self, text: str) -> bool:
        t = normalize(text)
        return t in self.texts or not self.ngrams.isdisjoint(self._ngrams(t))
