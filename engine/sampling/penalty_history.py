"""Token history for the repetition penalties and the DRY ("don't repeat yourself") sampler.

llama.cpp's server feeds every prompt token into the sampler (without the grammar) once the
prompt is processed, then every generated token, so both windows cover prompt + output.
`PenaltyWindow` keeps per-token counts over the last n tokens; `DryState` keeps the last n
tokens and computes DRY's per-token penalties (Z-algorithm over the reversed window, as in
llama.cpp / koboldcpp's DRY). `DryBreakers` holds the sequence breakers: llama.cpp matches every
breaker against every vocabulary token up front (O(breakers x vocab), minutes for a request
with thousands of breakers); here a token's breaker entries are worked out the first time DRY
looks the token up, so the setup costs O(breaker characters) whatever the vocabulary size.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, deque
from typing import Any, Callable, Sequence

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


_UNSEEN = object()
_NO_NEEDLES: frozenset[int] = frozenset()

# A token's breaker entry: (single-token breaker?, groups, excluded needles). Each group maps the
# first token of a tail to its (tail, needle index) pairs, longest tail first; a tail whose
# needle index is in `excluded` does not count (see DryBreakers). None: the token has no entry.
DryEntry = tuple[bool, tuple[dict[int, list[tuple[tuple[int, ...], int]]], ...], frozenset[int]]


class DryState:
    """DRY sampler state: recent tokens and the processed sequence breakers.

    `breakers` maps a head token id to the tails (tuples of token ids) that complete a
    breaker sequence; an empty tail means the token alone breaks sequences. A dict works, or
    a `DryBreakers`, which evaluates each token lazily. Entries are looked up once per token
    and kept (reassigning `breakers` drops them).
    """

    def __init__(self, multiplier: float, base: float, allowed_length: int, last_n: int,
                 context_size: int, breakers: dict[int, list[tuple[int, ...]]] | DryBreakers | None = None):
        self.multiplier, self.base, self.allowed_length = multiplier, base, allowed_length
        self.enabled = multiplier != 0.0 and base >= 1.0 and last_n != 0
        self.context_size = context_size
        self.last_n = context_size if last_n == -1 else max(last_n, 0)
        self.tokens: deque[int] = deque(maxlen=max(self.last_n, 1))
        self.breakers = breakers

    @property
    def breakers(self) -> Any:
        return self._breakers

    @breakers.setter
    def breakers(self, value: Any) -> None:
        self._breakers = {} if value is None else value
        self._entries: dict[int, DryEntry | None] = {}

    def _entry(self, token: int) -> DryEntry | None:
        entry = self._entries.get(token, _UNSEEN)
        if entry is _UNSEEN:
            if isinstance(self._breakers, DryBreakers):
                entry = self._breakers.entry(token)
            else:
                entry = _entry_of(self._breakers.get(token))
            self._entries[token] = entry
        return entry

    def accept(self, token_id: int) -> None:
        if self.enabled:
            self.tokens.append(token_id)

    def _repeat_limit(self, recent: list[int]) -> int:
        """Longest allowed repeat: distance back to the most recent sequence breaker (its
        longest tail that matches, as llama.cpp)."""
        n = len(recent)
        entries = self._entries
        for i in range(n):
            entry = entries.get(recent[i], _UNSEEN)
            if entry is _UNSEEN:
                entry = self._entry(recent[i])
            if entry is None:
                continue
            single, groups, excluded = entry
            longest = 0 if single else -1
            if i:
                # tails are matched against the tokens after the head: only those starting with
                # the next token can match; in each group the first (longest) that fits wins
                following = recent[i - 1]
                for group in groups:
                    for tail, needle in group.get(following, ()):
                        size = len(tail)
                        if size <= longest:
                            break
                        if size <= i and needle not in excluded and all(
                                tail[o] == recent[i - o - 1] for o in range(1, size)):
                            longest = size
                            break
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
            entry = self._entry(token)
            if entry is not None and entry[0]:
                continue  # single-token breakers are never penalised
            exponent = repeat_len - self.allowed_length
            if max_exponent > 0:
                exponent = min(exponent, max_exponent)
            ids.append(token)
            values.append(self.multiplier * self.base ** exponent)
        return np.asarray(ids, np.int64), np.asarray(values, np.float32)


def _entry_of(tails) -> DryEntry | None:
    """The entry of a token with these tails (one group, nothing excluded); None if none."""
    if not tails:
        return None
    group: dict[int, list[tuple[tuple[int, ...], int]]] = {}
    single = False
    for tail in tails:
        if len(tail):
            group.setdefault(tail[0], []).append((tuple(tail), -1))
        else:
            single = True
    for pairs in group.values():
        pairs.sort(key=lambda pair: len(pair[0]), reverse=True)
    return single, ((group,) if group else ()), _NO_NEEDLES


class DryBreakers:
    """DRY sequence breakers against a vocabulary, with llama.cpp's semantics
    (`get_overlapping_token_sequences`), evaluated per token on first look-up.

    Each non-empty breaker is cut to `max_chars` UTF-8 bytes (a "needle"). For a token:
    a needle contained in its bytes makes it a single-token breaker (tail ()); for every other
    needle and every suffix of the token that is a proper prefix of that needle, the token is a
    head whose tail is `encode(rest of the needle)` cut to `max_tail` tokens (the rest decoded
    with invalid bytes dropped; an empty tail makes a single-token breaker too). Without
    `encode` only contained needles count.

    Setup sorts the distinct needles: O(breaker characters), independent of the vocabulary.
    A token's entry costs O(len(token) x distinct needle lengths) on its first look-up; the
    tails of the needles under one prefix (the token's suffix) form a group, built once and
    shared by every token ending with that prefix, so all groups together hold O(breaker
    characters) tails and each rest of a needle is tokenized at most once. `token_bytes`
    only needs to be indexable by token id. How many breakers a request may send is the
    server's limit (--max-dry-breakers): a token's first look-up may tokenize the rest of every
    breaker it overlaps (up to 39 per breaker, once per request).
    """

    def __init__(self, breakers: Sequence[str], token_bytes: Sequence[bytes],
                 encode: Callable[[str], Sequence[int]] | None = None, *,
                 max_chars: int = 40, max_tail: int = 20):
        needles = {text.encode("utf-8")[:max_chars] for text in breakers if text}
        self.needles: list[bytes] = sorted(needles)  # the needles under a prefix are contiguous
        self._index = {needle: at for at, needle in enumerate(self.needles)}
        self._lengths = sorted({len(needle) for needle in needles})
        self._first_bytes = frozenset(needle[0] for needle in needles)
        self._max_overlap = max(self._lengths, default=1) - 1  # longest proper prefix
        self.token_bytes = token_bytes
        self.encode = encode
        self.max_tail = max_tail
        self._entries: dict[int, DryEntry | None] = {}
        # needle prefix -> (tails by first token, longest first; any empty tail?) or None
        self._groups: dict[bytes, tuple[dict[int, list[tuple[tuple[int, ...], int]]], bool] | None] = {}

    def entry(self, token_id: int) -> DryEntry | None:
        """The token's entry (see DryEntry), evaluated on first use; None if it has none."""
        entry = self._entries.get(token_id, _UNSEEN)
        if entry is _UNSEEN:
            entry = self._entries[token_id] = self._evaluate(token_id)
        return entry

    def get(self, token_id: int, default: Any = None) -> tuple[tuple[int, ...], ...] | Any:
        """The token's distinct tails (() for a single-token breaker), or `default` if none:
        what llama.cpp's multimap holds for the token, for inspection and tests."""
        entry = self.entry(token_id)
        if entry is None:
            return default
        single, groups, excluded = entry
        tails = {tail for group in groups for pairs in group.values() for tail, needle in pairs
                 if needle not in excluded}
        if single:
            tails.add(())
        return tuple(tails)

    def _evaluate(self, token_id: int) -> DryEntry | None:
        if not self.needles or not 0 <= token_id < len(self.token_bytes):
            return None
        piece = bytes(self.token_bytes[token_id])
        contained = self._contained(piece)
        single = bool(contained)
        groups = []
        if self.encode is not None:
            first_bytes = self._first_bytes
            for overlap in range(1, min(len(piece), self._max_overlap) + 1):
                if piece[-overlap] not in first_bytes:
                    continue
                group = self._group(piece[-overlap:])
                if group is not None:
                    groups.append(group[0])
                    single = single or group[1]
        if not single and not any(groups):
            return None
        excluded = frozenset(self._index[needle] for needle in contained) if contained else _NO_NEEDLES
        return single, tuple(group for group in groups if group), excluded

    def _contained(self, piece: bytes) -> set[bytes]:
        """The needles occurring in `piece`."""
        found: set[bytes] = set()
        index, first_bytes, lengths = self._index, self._first_bytes, self._lengths
        size = len(piece)
        for start in range(size):
            if piece[start] not in first_bytes:
                continue
            for length in lengths:
                if start + length > size:
                    break
                if piece[start:start + length] in index:
                    found.add(piece[start:start + length])
        return found

    def _group(self, prefix: bytes) -> tuple[dict[int, list[tuple[tuple[int, ...], int]]], bool] | None:
        """The tails of the needles that `prefix` is a proper prefix of (None: no such needle),
        with each needle's index. Empty tails are not in the dict, the flag says whether there
        is one: it makes a token ending with `prefix` a single-token breaker (a token that
        contains that needle is one anyway, so exclusion does not matter for it)."""
        group = self._groups.get(prefix, _UNSEEN)
        if group is _UNSEEN:
            needles, overlap = self.needles, len(prefix)
            by_first: dict[int, list[tuple[tuple[int, ...], int]]] = {}
            has_empty = False
            at = bisect_left(needles, prefix)
            while at < len(needles) and needles[at].startswith(prefix):
                needle = needles[at]
                if len(needle) > overlap:
                    text = needle[overlap:].decode("utf-8", errors="ignore")
                    tail = tuple(self.encode(text)[:self.max_tail])
                    if tail:
                        by_first.setdefault(tail[0], []).append((tail, at))
                    else:
                        has_empty = True
                at += 1
            for pairs in by_first.values():
                pairs.sort(key=lambda pair: len(pair[0]), reverse=True)
            group = self._groups[prefix] = (by_first, has_empty) if by_first or has_empty else None
        return group
