"""SentencePiece-style BPE (tokenizer.ggml.model = llama): llama.cpp's bigram-merge-by-score.

Owns: turning one raw-text fragment (spaces already escaped to U+2581) into token ids.
Algorithm (llm_tokenizer_spm_session): start from single code points, repeatedly merge the
adjacent pair whose concatenation is a token with the highest score (ties: leftmost pair),
then emit each final piece as its token, or as <0xXX> byte tokens when it is not in the vocab.

Speed: the merge is global over a fragment, but no merge can cross a boundary "X▁" when no
token contains "X▁" (X != ▁). So fragments are cut before such "▁" and each piece is merged
on its own and cached; the result is identical (checked against the vocab at build time: the
characters X for which some token does contain "X▁" never start a cut).
"""
from __future__ import annotations

import heapq
import re

from ggserve.engine.tokenizer.piece_cache import PieceCache
from ggserve.engine.tokenizer.vocab import Vocab

SPACE_ESCAPE = "\u2581"  # ▁


class SPMModel:
    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._scores = vocab.scores.tolist()  # python floats (exact float32 values) for the heap
        self._byte_ids = self._find_byte_tokens()
        self._splitter = self._build_splitter()
        self._cache = PieceCache(self._encode_piece)

    def _find_byte_tokens(self) -> list[int | None]:
        """byte value -> token id: "<0xXX>", else the single-character token (llama.cpp's fallback)."""
        t2i = self.vocab.token_to_id
        ids: list[int | None] = []
        for b in range(256):
            token_id = t2i.get(f"<0x{b:02X}>")
            if token_id is None:  # a one-byte token; ggserve.engine.model.gguf keeps invalid UTF-8 as surrogates
                token_id = t2i.get(chr(b) if b < 0x80 else chr(0xDC00 + b))
            ids.append(token_id)
        return ids

    def _build_splitter(self) -> re.Pattern | None:
        joined = "\x00".join(self.vocab.tokens)
        blocked = set(re.findall("([^\x00" + SPACE_ESCAPE + "])" + SPACE_ESCAPE, joined))
        blocked.add(SPACE_ESCAPE)
        # cut before a "▁" whose left neighbour is not blocked
        return re.compile("(?<=[^" + "".join(re.escape(c) for c in sorted(blocked)) + "])(?=" + SPACE_ESCAPE + ")")

    def encode(self, text: str, out: list[int]) -> None:
        """`text` is a fragment with spaces already replaced by ▁ (and the prefix space added)."""
        self._cache.encode_all(self._splitter.split(text), out)

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        t2i = self.vocab.token_to_id
        ids: list[int] = []
        for symbol in self._merge(text):
            token_id = t2i.get(symbol)
            if token_id is not None:
                ids.append(token_id)
                continue
            for b in symbol.encode("utf-8", "surrogatepass"):
                byte_id = self._byte_ids[b]
                # llama.cpp would abort on a vocab without byte tokens; <unk> is the sane answer
                ids.append(byte_id if byte_id is not None else self.vocab.ids["unk"] or 0)
        return tuple(ids)

    def _merge(self, text: str) -> list[str]:
        n = len(text)
        if n < 2:
            return [text] if text else []
        t2i, scores = self.vocab.token_to_id, self._scores
        syms = list(text)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)
        for i in range(n - 1):
            token_id = t2i.get(syms[i] + syms[i + 1])
            if token_id is not None:
                heap.append((-scores[token_id], i, i + 1, 2))
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            left_text, right_text = syms[left], syms[right]
            # stale if either side was merged since (lengths only grow, so the sum tells)
            if not left_text or not right_text or len(left_text) + len(right_text) != size:
                continue
            merged = left_text + right_text
            syms[left], syms[right] = merged, ""
            after = nxt[right]
            nxt[left] = after
            if after != -1:
                prev[after] = left
            before = prev[left]
            if before != -1:
                token_id = t2i.get(syms[before] + merged)
                if token_id is not None:
                    heapq.heappush(heap, (-scores[token_id], before, left, len(syms[before]) + len(merged)))
            if after != -1:
                token_id = t2i.get(merged + syms[after])
                if token_id is not None:
                    heapq.heappush(heap, (-scores[token_id], left, after, len(merged) + len(syms[after])))
        return [s for s in syms if s]
