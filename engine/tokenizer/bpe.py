"""Byte-level BPE (tokenizer.ggml.model = gpt2): GPT-2 byte mapping and llama.cpp's merge loop.

Owns: the byte <-> unicode table of GPT-2, merge ranks, and turning one raw-text fragment into
token ids (pre-tokenize -> byte-encode each word -> merge by rank -> ids).

The merge order is llama.cpp's (llm_tokenizer_bpe_session): a priority queue of adjacent pairs,
lowest merge rank first, ties broken by the leftmost pair; stale pairs are skipped when popped.
Words recur constantly in real text, so each word's ids are cached (bounded).
"""
from __future__ import annotations

import heapq

from ggserve.engine.tokenizer.piece_cache import PieceCache
from ggserve.engine.tokenizer.pretokenizer import PreTokenizer
from ggserve.engine.tokenizer.vocab import Vocab



def _byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table (index = byte value)."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_TO_UNICODE: tuple[str, ...] = tuple(_byte_to_unicode())
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
# latin-1 decoding turns bytes into code points 0..255; translate maps those to GPT-2 characters
_BYTE_ENCODE_TABLE = {b: c for b, c in enumerate(BYTE_TO_UNICODE)}


def byte_encode(word: str) -> str:
    """UTF-8 bytes of `word` as GPT-2 byte-level characters (one character per byte)."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_ENCODE_TABLE)


class BPEModel:
    """Encodes raw-text fragments (no special tokens inside) with byte-level BPE."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.pretokenizer = PreTokenizer(vocab.pre)
        merges = vocab.merges
        # key "left right" -> rank; the first occurrence of a duplicated merge wins (as in llama.cpp)
        self._ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
        self._cache = PieceCache(lambda word: self._encode_word(byte_encode(word)))

    def encode(self, text: str, out: list[int]) -> None:
        self._cache.encode_all(self.pretokenizer.split(text), out)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        token_to_id = self.vocab.token_to_id
        if self.vocab.ignore_merges and word in token_to_id:
            return (token_to_id[word],)
        ids: list[int] = []
        for piece in self._merge(word):
            token_id = token_to_id.get(piece)
            if token_id is not None:
                ids.append(token_id)
                continue
            # llama.cpp falls back to single *UTF-8 bytes* of the byte-level string (a lone byte
            # >= 0x80 can only be a token read as a surrogate escape); the rest is dropped
            for b in piece.encode("utf-8"):
                byte_id = token_to_id.get(chr(b) if b < 0x80 else chr(0xDC00 + b))
                if byte_id is not None:
                    ids.append(byte_id)
        return tuple(ids)

    def _merge(self, word: str) -> list[str]:
        n = len(word)
        if n < 2:
            return [word] if word else []
        ranks = self._ranks
        syms = list(word)  # symbol text per position; "" once merged into its left neighbour
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []  # (rank, left, right, merged text)
        for i in range(n - 1):
            rank = ranks.get(syms[i] + " " + syms[i + 1])
            if rank is not None:
                heap.append((rank, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            left_text, right_text = syms[left], syms[right]
            if not left_text or not right_text or left_text + right_text != text:
                continue  # one side changed since this pair was queued
            syms[left], syms[right] = text, ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prev[after] = left
            before = prev[left]
            if before != -1:
                rank = ranks.get(syms[before] + " " + text)
                if rank is not None:
                    heapq.heappush(heap, (rank, before, left, syms[before] + text))
            if after != -1:
                rank = ranks.get(text + " " + syms[after])
                if rank is not None:
                    heapq.heappush(heap, (rank, left, after, text + syms[after]))
        return [s for s in syms if s]
