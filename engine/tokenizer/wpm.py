"""WordPiece (tokenizer.ggml.model = bert), as llama.cpp's llm_tokenizer_wpm_session does it.

Owns: BERT normalisation (optional accent stripping and lowercasing, one code point at a time
like llama.cpp's tables: NFD keeps the first code point, lowercase takes the first of
str.lower()), splitting on whitespace/punctuation/CJK, and greedy longest-match of "▁" + word.
A word with any unmatched position becomes a single [UNK].
"""
from __future__ import annotations

import unicodedata

import regex

from ggserve.engine.tokenizer.vocab import Vocab

_WHITESPACE = regex.compile(r"\s")
_CONTROL = regex.compile(r"\p{C}")
_MARK = regex.compile(r"\p{M}")
_PUNCT = regex.compile(r"\p{P}")
_SYMBOL = regex.compile(r"\p{S}")

_SKIP, _SPACE, _ALONE, _APPEND = 0, 1, 2, 3


def _is_chinese(cpt: int) -> bool:
    return (0x4E00 <= cpt <= 0x9FFF or 0x3400 <= cpt <= 0x4DBF or 0x20000 <= cpt <= 0x2A6DF
            or 0x2A700 <= cpt <= 0x2B73F or 0x2B740 <= cpt <= 0x2B81F or 0x2B920 <= cpt <= 0x2CEAF
            or 0xF900 <= cpt <= 0xFAFF or 0x2F800 <= cpt <= 0x2FA1F)


class WPMModel:
    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._max_len = max(len(t) for t in vocab.tokens)
        self._char_cache: dict[str, tuple[int, str]] = {}

    def _classify(self, ch: str) -> tuple[int, str]:
        got = self._char_cache.get(ch)
        if got is not None:
            return got
        original = ch
        if self.vocab.strip_accents:
            ch = unicodedata.normalize("NFD", ch)[0]
        cpt = ord(ch)
        if _WHITESPACE.match(ch):
            kind = _SPACE
        elif cpt == 0 or cpt == 0xFFFD or _CONTROL.match(ch):
            kind = _SKIP
        elif self.vocab.strip_accents and _MARK.match(ch):
            kind = _SKIP
        elif _PUNCT.match(ch) or (cpt < 0x7F and _SYMBOL.match(ch)) or _is_chinese(cpt):
            kind = _ALONE
        else:
            kind = _APPEND
        text = ch.lower()[0] if self.vocab.lowercase else ch
        got = (kind, text)
        self._char_cache[original] = got
        return got

    def _words(self, text: str) -> list[str]:
        words: list[str] = []
        current: list[str] = []
        for ch in text:
            kind, s = self._char_cache.get(ch) or self._classify(ch)
            if kind == _APPEND:
                current.append(s)
            elif kind == _SPACE:
                if current:
                    words.append("".join(current))
                    current = []
            elif kind == _ALONE:
                if current:
                    words.append("".join(current))
                    current = []
                words.append(s)
        if current:
            words.append("".join(current))
        return words

    def encode(self, text: str, out: list[int]) -> None:
        t2i = self.vocab.token_to_id
        unk = self.vocab.ids["unk"]
        for word in self._words(text):
            word = "\u2581" + word
            n = len(word)
            start = len(out)
            i = 0
            while i < n:
                for j in range(min(n, i + self._max_len + 1), i, -1):
                    token_id = t2i.get(word[i:j])
                    if token_id is not None:
                        out.append(token_id)
                        i = j
                        break
                else:
                    del out[start:]  # any gap discards the whole word
                    break
            if len(out) == start and unk is not None:
                out.append(unk)
