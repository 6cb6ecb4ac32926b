"""A bounded memo of pre-token piece -> token ids, shared by the BPE and SPM encoders.

Text repeats its words, so encoding each distinct piece once is most of the tokenizer's speed.
When the memo is full it is dropped wholesale: cheap, and by then the text has moved on.
"""
from __future__ import annotations

from typing import Callable, Iterable

CACHE_LIMIT = 1 << 16  # pieces


class PieceCache:
    def __init__(self, encode_piece: Callable[[str], tuple[int, ...]], limit: int = CACHE_LIMIT):
        self._encode_piece = encode_piece
        self._limit = limit
        self._ids: dict[str, tuple[int, ...]] = {}

    def encode_all(self, pieces: Iterable[str], out: list[int]) -> None:
        """Append the token ids of every piece to `out`."""
        cache = self._ids
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
                if len(cache) >= self._limit:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
