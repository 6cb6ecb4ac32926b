"""Splitting raw text on special tokens before tokenization (llama.cpp's tokenizer_st_partition).

Owns: `SpecialSplitter.partition(text, parse_special)` -> fragments, each either a token id
(a special token found in the text) or a str (raw text to tokenize).

Semantics reproduced from llama.cpp: special tokens are tried longest first; each one splits
every raw fragment at all its (non-overlapping, left to right) occurrences. USER_DEFINED tokens
split the text even when parse_special is False; CONTROL and UNKNOWN ones only when it is True.
Tokens with the LSTRIP/RSTRIP attribute swallow the ASCII whitespace before/after them (Phi-3).

Speed: only tokens that occur in the text can match, so candidates are found first by grouping
the special tokens on a short prefix (one substring test per group, then per token of the groups
whose prefix occurs); a 262k vocab with ~6k control tokens costs a few hundred tests per call.
"""
from __future__ import annotations

from ggserve.engine.tokenizer.vocab import (ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN, Vocab)

_C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale
_PREFIX_LEN = 6


class SpecialSplitter:
    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        # (rank in llama.cpp's order, token id, text), grouped by text prefix, split by kind
        self._groups: dict[bool, dict[str, list[tuple[int, int, str]]]] = {False: {}, True: {}}
        for rank, token_id in enumerate(vocab.special_ids):
            text = vocab.tokens[token_id]
            needs_parse_special = bool(vocab.attrs[token_id] & (ATTR_CONTROL | ATTR_UNKNOWN))
            group = self._groups[needs_parse_special].setdefault(text[:_PREFIX_LEN], [])
            group.append((rank, token_id, text))

    def _candidates(self, text: str, parse_special: bool) -> list[tuple[int, int, str]]:
        found = []
        for needs_parse_special in ((False, True) if parse_special else (False,)):
            for prefix, group in self._groups[needs_parse_special].items():
                if prefix in text:
                    found.extend(entry for entry in group if entry[2] in text)
        found.sort()
        return found

    def partition(self, text: str, parse_special: bool) -> list[int | str]:
        if not text:
            return []
        fragments: list[int | tuple[int, int]] = [(0, len(text))]
        attrs = self.vocab.attrs
        for _, token_id, special in self._candidates(text, parse_special):
            lstrip = bool(attrs[token_id] & ATTR_LSTRIP)
            rstrip = bool(attrs[token_id] & ATTR_RSTRIP)
            size = len(special)
            out: list[int | tuple[int, int]] = []
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                start, end = frag
                while True:
                    match = text.find(special, start, end)
                    if match < 0:
                        out.append((start, end))
                        break
                    left_end = match
                    if lstrip:
                        while left_end > start and text[left_end - 1] in _C_SPACE:
                            left_end -= 1
                    if left_end > start:
                        out.append((start, left_end))
                    out.append(token_id)
                    start = match + size
                    if rstrip:
                        while start < end and text[start] in _C_SPACE:
                            start += 1
                    if start >= end:
                        break
            fragments = out
        return [f if isinstance(f, int) else text[f[0]:f[1]] for f in fragments]
