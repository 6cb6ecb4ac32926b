"""Token ids -> text, as llama.cpp's token_to_piece / detokenize, plus a UTF-8-safe stream decoder.

Owns: the piece (bytes) of each token, whole-sequence detokenization (leading-space removal for
SPM-style vocabs, BPE's clean_up_tokenization_spaces passes) and `IncrementalDetokenizer`.

Pieces (llama_vocab::impl::token_to_piece): CONTROL/UNKNOWN tokens render their text only when
`special` is true; USER_DEFINED tokens always render their raw text; NORMAL tokens render with
"▁" -> " " (SPM/WPM) or GPT-2 byte decoding (BPE); BYTE tokens <0xXX> are one raw byte; UNUSED
and UNDEFINED tokens render nothing.
"""
from __future__ import annotations

import codecs
import re
from typing import Iterable

from ggserve.engine.tokenizer.bpe import UNICODE_TO_BYTE
from ggserve.engine.tokenizer.vocab import (ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED,
                                    VOCAB_BPE, Vocab)

_ATTR_SPECIAL = ATTR_UNKNOWN | ATTR_CONTROL


class PieceTable:
    """token id -> piece bytes (computed on first use: building all 262k up front is wasted work)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._attrs = vocab.attrs.tolist()  # python ints: this is called once per generated token
        self._pieces: dict[int, bytes] = {}

    def piece(self, token_id: int, special: bool = True) -> bytes:
        if not 0 <= token_id < self.vocab.n_vocab:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab.n_vocab})")
        attr = self._attrs[token_id]
        if not special and attr & _ATTR_SPECIAL:
            return b""
        got = self._pieces.get(token_id)
        if got is None:
            got = self._pieces[token_id] = self._render(token_id, attr)
        return got

    def _render(self, token_id: int, attr: int) -> bytes:
        text = self.vocab.tokens[token_id]
        if attr & (_ATTR_SPECIAL | ATTR_USER_DEFINED):
            return _raw(text)
        if attr & ATTR_NORMAL:
            if self.vocab.vocab_type == VOCAB_BPE:
                return _byte_decode(text)
            return _raw(text.replace("\u2581", " "))
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""


def _raw(text: str) -> bytes:
    """Token text back to its file bytes (ggserve.engine.model.gguf keeps invalid UTF-8 as surrogate escapes)."""
    return text.encode("utf-8", "surrogateescape")


_BYTE_DECODE_TABLE = {ord(c): b for c, b in UNICODE_TO_BYTE.items()}
_NOT_A_BYTE_CHAR = re.compile("[^" + "".join(re.escape(c) for c in UNICODE_TO_BYTE) + "]")


def _byte_decode(text: str) -> bytes:
    """GPT-2 byte-level characters -> bytes; characters outside the table are rendered the odd
    way llama.cpp does ("[UNK_BYTE_0x<hex>" + whole token text + "]")."""
    if not _NOT_A_BYTE_CHAR.search(text):  # the usual case, at C speed
        return text.translate(_BYTE_DECODE_TABLE).encode("latin-1")
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + _raw(ch).hex().encode() + _raw(text) + b"]"
    return bytes(out)


def detokenize(pieces: PieceTable, ids: Iterable[int], special: bool) -> bytes:
    """llama_detokenize(remove_special=false, unparse_special=special)."""
    vocab = pieces.vocab
    out = bytearray()
    remove_space = vocab.add_space_prefix  # the tokenizer added it, so the first piece drops it
    for token_id in ids:
        piece = pieces.piece(int(token_id), special)
        if remove_space and piece.startswith(b" "):
            piece = piece[1:]
        remove_space = False
        out += piece
    if vocab.clean_spaces:
        out = _clean_spaces(out)
    return bytes(out)


def _clean_spaces(text: bytearray) -> bytearray:
    """llama.cpp's three clean-up passes (byte-wise, same order and quirks)."""
    n = len(text)
    if n == 0:
        return text
    # pass 1: " ?" " !" " ." " ," -> drop the space
    out = bytearray(text[:1])
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == 0x20 and x in b"?!.,":
            out.pop()
        out.append(x)
    # pass 2: " ' " -> "'"
    text, n = out, len(out)
    out = bytearray(text[:1])
    i = 1
    while i < n:
        x = text[i]
        if x == 0x27 and i + 1 < n and text[i - 1] == 0x20 and text[i + 1] == 0x20:
            out.pop()
            i += 1
            text[i] = 0  # the next space is consumed
        out.append(x)
        i += 1
    # pass 3: " 's" " 'm" " 're" " 've" -> no space (but " 't", " 'd", " 'll" keep it)
    text, n = out, len(out)
    out = bytearray(text[:1])
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = text[i + 1]
            if x1 in b"sm":
                out.pop()
            elif x1 not in b"td" and i + 2 < n and (x1, text[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                out.pop()
        out.append(x)
    return out


class IncrementalDetokenizer:
    """Streams text token by token without ever emitting half a UTF-8 sequence.

    Pieces are concatenated raw (no leading-space removal or clean-up: llama-server streams
    generated pieces the same way). An emoji or CJK character split over several byte tokens is
    held back until complete; invalid bytes become U+FFFD; flush() ends the stream (an incomplete
    tail becomes U+FFFD).
    """

    def __init__(self, tokenizer, special: bool = True):
        self._tokenizer = tokenizer
        self._special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_to_piece(token_id, self._special))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
