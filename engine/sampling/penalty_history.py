"""Token history for the repetition penalties and the DRY ("don't repeat yourself") sampler.

llama.cpp's server feeds every prompt token into the sampler (without the grammar) once the
prompt is processed, then every generated token, so both windows cover prompt + output.
`PenaltyWindow` keeps per-token counts over the last n tokens; `DryState` keeps the last n
tokens and computes DRY's per-token penalties (Z-algorithm over the reversed window, as in
llama.cpp / koboldcpp's DRY).
"""
from __future__ import annotations

import math
from collections import Counter, deque

import numpy as np

FLOAT_MAX_LOG = 88.7228391  # ~log(FLT_MAX): caps base ** exponent


class PenaltyWindow:
    """Counts of each token id over the last `last_n` accepted tokens (0 = disabled)."""

    def __init__(self, last_n: int):
        self.last_n = max(last_n, 0)
        self.tokens: deque[int] = deque()
        self.counts: Counter[int] = Counter()

    def accept(self, token_id: int) -> None:
        if self.last_n == 0:
            return
        if len(self.tokens) >= self.last_n:
            old = self.tokens.popleft()
            self.counts[old] -= 1
            if self.counts[old] == 0:
                del self.counts[old]
        self.tokens.append(token_id)
        self.counts[token_id] += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (u,), counts int64 (u,)) of the distinct tokens in the window."""
        if not self.counts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.fromiter(self.counts.keys(), np.int64, len(self.counts))
        counts = np.fromiter(self.counts.values(), np.int64, len(self.counts))
        return ids, counts


def z_array(seq: list[int]) -> list[int]:
    """z[k] = length of the longest common prefix of seq and seq[k:] (z[0] = len)."""
    n = len(seq)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and seq[z[k]] == seq[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


class DryState:
    """DRY sampler state: recent tokens and the processed sequence breakers.

    `breakers` maps a head token id to the tails (tuples of token ids) that complete a
    breaker sequence; an empty tail means the token alone breaks sequences.
    """

    def __init__(self, multiplier: float, base: float, allowed_length: int, last_n: int,
                 context_size: int, breakers: dict[int, list[tuple[int, ...]]] | None = None):
        self.multiplier, self.base, self.allowed_length = multiplier, base, allowed_length
        self.enabled = multiplier != 0.0 and base >= 1.0 and last_n != 0
        self.context_size = context_size
        self.last_n = context_size if last_n == -1 else max(last_n, 0)
        self.tokens: deque[int] = deque(maxlen=max(self.last_n, 1))
        self.breakers = breakers or {}

    def accept(self, token_id: int) -> None:
        if self.enabled:
            self.tokens.append(token_id)

    def _repeat_limit(self, recent: list[int]) -> int:
        """Longest allowed repeat: distance back to the most recent sequence breaker."""
        n = len(recent)
        for i in range(n):
            tails = self.breakers.get(recent[i])
            if not tails:
                continue
            longest = -1
            for tail in tails:
                if longest < len(tail) <= i and all(tail[o] == recent[i - o - 1] for o in range(len(tail))):
                    longest = len(tail)
            if longest >= 0:
                return i - longest
        return n

    def penalties(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, penalty to subtract) for tokens that would extend a repetition."""
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        if not self.enabled:
            return empty
        n = min(len(self.tokens), self.last_n, self.context_size)
        if n <= self.allowed_length:
            return empty
        # recent[i] = i-th most recent token
        recent = [self.tokens[-1 - i] for i in range(n)]
        rep_limit = self._repeat_limit(recent)
        if rep_limit < self.allowed_length:
            return empty
        z = z_array(recent)
        best: dict[int, int] = {}
        for k in range(1, n):
            repeat_len = min(z[k], rep_limit)
            if repeat_len >= self.allowed_length:
                follower = recent[k - 1]  # the token that came right after the earlier copy
                if best.get(follower, -1) < repeat_len:
                    best[follower] = repeat_len
        max_exponent = int(FLOAT_MAX_LOG / math.log(self.base)) if self.base > 1.000001 else 0
        ids, values = [], []
        for token, repeat_len in best.items():
            if any(len(t) == 0 for t in self.breakers.get(token, ())):
                continue  # single-token breakers are never penalised
            exponent = repeat_len - self.allowed_length
            if max_exponent > 0:
                exponent = min(exponent, max_exponent)
            ids.append(token)
            values.append(self.multiplier * self.base ** exponent)
        return np.asarray(ids, np.int64), np.asarray(values, np.float32)


def dry_breakers(breakers: list[str], token_bytes: list[bytes], encode=None,
                 max_chars: int = 40, max_tail: int = 20) -> dict[int, list[tuple[int, ...]]]:
    """Processes DRY sequence breaker strings against a vocabulary (llama.cpp semantics).

    A token containing the breaker is a single-token breaker; a token ending with a prefix
    of the breaker is a head whose tail is the tokenization (via `encode`, when given) of the
    rest of the breaker, cut to `max_tail` tokens.
    """
    result: dict[int, list[tuple[int, ...]]] = {}
    for text in breakers:
        if not text:
            continue
        needle = text.encode("utf-8")[:max_chars]
        for token_id, piece in enumerate(token_bytes):
            if needle in piece:
                result.setdefault(token_id, []).append(())
                continue
            if encode is None or needle[:1] not in piece:
                continue
            start = piece.find(needle[:1])
            while start != -1:
                overlap = len(piece) - start
                if overlap < len(needle) and piece[start:] == needle[:overlap]:
                    rest = needle[overlap:].decode("utf-8", errors="ignore")
                    tail = tuple(encode(rest)[:max_tail])
                    if tail not in result.setdefault(token_id, []):
                        result[token_id].append(tail)
                start = piece.find(needle[:1], start + 1)
    return result
