"""The individual samplers of llama.cpp's chain, as small pure functions over `Candidates`.

Each function takes a candidate list (token ids + logits, in a meaningful order) and returns
the transformed list, following llama.cpp's `src/llama-sampling.cpp` step for step: which
samplers sort, which keep the order, where probabilities are float32 vs float64, and when a
random number is drawn. Order matters because the final draw walks the candidates in order,
so keeping it is what makes a seeded request pick the same token as llama.cpp.

Nothing here loops over the vocabulary in Python: selection uses `np.partition` before
sorting, so the default chain costs well under a millisecond at a 150k vocabulary.
Stateful pieces (history, DRY state, mirostat mu, the RNG) live in `engine/sampling/sampler.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

NEG_INF = np.float32(-np.inf)


@dataclass
class Candidates:
    """A candidate list: `ids` (k,) int32 and `logits` (k,) float32 in a meaningful order.

    `probs` (k,) float32 holds the last computed softmax (None until a sampler computes it);
    `sorted` says the list is in descending-logit order; `full` says it is still the whole
    vocabulary in id order (so `ids[i] == i`, which lets id-indexed samplers skip a lookup).
    `live` lists the positions not masked to -inf by a grammar: selection then works on
    those only (np.partition is ~10x slower on arrays full of equal -inf values).
    """

    ids: np.ndarray
    logits: np.ndarray
    probs: np.ndarray | None = None
    sorted: bool = False
    full: bool = False
    live: np.ndarray | None = None  # with `full`: the only positions that may be finite (grammar mask)

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> "Candidates":
        # logits (n_vocab,) -> a private float32 copy; samplers write into it
        values = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
        return cls(np.arange(values.shape[0], dtype=np.int32), values, None, False, True)

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray | slice, sorted_: bool) -> "Candidates":
        probs = None if self.probs is None else self.probs[index]
        return Candidates(self.ids[index], self.logits[index], probs, sorted_, False)

    def positions_of(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in this list, matching index into token_ids) for ids present here."""
        if self.full:
            ok = (token_ids >= 0) & (token_ids < self.size)
            return token_ids[ok].astype(np.int64), np.flatnonzero(ok)
        order = np.argsort(self.ids, kind="stable")
        where = np.searchsorted(self.ids, token_ids, sorter=order)
        where = np.minimum(where, max(self.size - 1, 0))
        if self.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pos = order[where]
        ok = self.ids[pos] == token_ids
        return pos[ok], np.flatnonzero(ok)


def sum_f32(values: np.ndarray) -> np.float32:
    """Sequential float32 sum (C's `float acc += x` loop); np.sum is pairwise and differs."""
    if values.shape[0] == 0:
        return np.float32(0.0)
    return np.cumsum(values, dtype=np.float32)[-1]


def _sorted_order(logits: np.ndarray) -> np.ndarray:
    # descending by logit; ties keep the current order
    return np.argsort(-logits, kind="stable")


def top_order(logits: np.ndarray, k: int, live: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest logits, sorted descending. O(n) selection, then sort k.

    With `live` (all other entries are -inf), only those are ranked; if fewer than k, the
    rest is filled with -inf entries (their order is arbitrary, as in llama.cpp's sort).
    """
    if live is not None:
        if live.shape[0] >= k:
            return live[top_order(logits[live], k)]
        dead = np.ones(logits.shape[0], bool)
        dead[live] = False
        return np.concatenate([live[_sorted_order(logits[live])], np.flatnonzero(dead)[:k - live.shape[0]]])
    n = logits.shape[0]
    if k >= n:
        return _sorted_order(logits)
    threshold = np.partition(logits, n - k)[n - k]
    index = np.flatnonzero(logits >= threshold)  # >= k entries (ties at the threshold)
    return index[_sorted_order(logits[index])][:k]


def sort_candidates(c: Candidates) -> Candidates:
    if c.sorted:
        return c
    return c.take(_sorted_order(c.logits), True)


def softmax(c: Candidates, do_sort: bool) -> Candidates:
    """llama_sampler_softmax_impl: float32 exp(l - max) / sequential float32 sum."""
    if do_sort and not c.sorted:
        c = sort_candidates(c)
    max_logit = c.logits[0] if c.sorted else c.logits.max()
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(c.logits - max_logit, dtype=np.float32)
    c.probs = (p / sum_f32(p)).astype(np.float32)
    return c


def logit_bias(c: Candidates, token_ids: np.ndarray, biases: np.ndarray) -> Candidates:
    """Adds biases (float32, -inf allowed) to the given token ids."""
    if token_ids.shape[0] == 0:
        return c
    pos, which = c.positions_of(token_ids)
    np.add.at(c.logits, pos, biases[which])
    return c


def penalties(c: Candidates, hist_ids: np.ndarray, hist_counts: np.ndarray, repeat: float,
              freq: float, present: float) -> Candidates:
    """Repeat/frequency/presence penalties for tokens seen in the last-n window.

    Positive logits are divided by `repeat`, non-positive ones multiplied (so a penalty
    always lowers the logit), then `count * freq + present` is subtracted.
    """
    if hist_ids.shape[0] == 0 or (repeat == 1.0 and freq == 0.0 and present == 0.0):
        return c
    pos, which = c.positions_of(hist_ids)
    values = c.logits[pos]
    values = np.where(values <= 0, values * np.float32(repeat), values / np.float32(repeat))
    counts = hist_counts[which].astype(np.float32)
    values = values - (counts * np.float32(freq) + np.float32(present))
    c.logits[pos] = values.astype(np.float32)
    c.sorted = False
    return c


def top_k(c: Candidates, k: int) -> Candidates:
    """Keeps the k highest logits, sorted; k <= 0 disables."""
    if k <= 0:
        return c
    k = min(k, c.size)
    if c.sorted:
        return c.take(slice(0, k), True)
    return c.take(top_order(c.logits, k, c.live if c.full else None), True)


def top_p(c: Candidates, p: float, min_keep: int) -> Candidates:
    """Smallest sorted prefix whose probability mass reaches p (at least min_keep)."""
    if p >= 1.0:
        return c
    c = softmax(c, do_sort=False)
    keep_ok = np.float32(p)
    if c.sorted:
        order = None
        cum = np.cumsum(c.probs, dtype=np.float32)
        hit = np.flatnonzero((cum >= keep_ok) & (np.arange(1, cum.shape[0] + 1) >= min_keep))
    else:
        # like llama.cpp: try the most likely 256 first, widen (here x16) until the mass is reached
        width = min(256, c.size)
        while True:
            order = top_order(c.logits, width, c.live if c.full else None)
            cum = np.cumsum(c.probs[order], dtype=np.float32)
            hit = np.flatnonzero((cum >= keep_ok) & (np.arange(1, width + 1) >= min_keep))
            if hit.shape[0] or width == c.size:
                break
            width = min(width * 16, c.size)
    last = int(hit[0]) + 1 if hit.shape[0] else c.size
    if order is None:
        return c.take(slice(0, last), True)
    return c.take(order[:last], True)


def min_p(c: Candidates, p: float, min_keep: int) -> Candidates:
    """Keeps tokens with prob >= p * max prob (compared in logit space, as llama.cpp)."""
    if p <= 0.0 or c.size == 0:
        return c
    log_p = np.float32(math.log(p))
    if not c.sorted:
        min_logit = np.float32(c.logits.max()) + log_p
        keep = np.flatnonzero(c.logits >= min_logit)  # keeps the current order
        if keep.shape[0] > 0 and keep.shape[0] >= min_keep:
            return c.take(keep, False)
        c = sort_candidates(c)
    min_logit = np.float32(c.logits[0]) + log_p
    below = np.flatnonzero((c.logits < min_logit) & (np.arange(c.size) >= max(min_keep, 1)))
    return c.take(slice(0, int(below[0]) if below.shape[0] else c.size), True)


def typical(c: Candidates, p: float, min_keep: int) -> Candidates:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy."""
    if p >= 1.0:
        return c
    c = softmax(c, do_sort=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_probs = np.log(c.probs)
        entropy = sum_f32(-c.probs * log_probs)
        shifted = np.abs(-log_probs - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(c.probs[order], dtype=np.float32)
    rank = np.arange(cum.shape[0])
    ok = (cum > np.float32(p)) & ((min_keep == 0) | (rank >= min_keep - 1))
    hit = np.flatnonzero(ok)
    last = int(hit[0]) + 1 if hit.shape[0] else c.size
    return c.take(order[:last], False)


def top_n_sigma(c: Candidates, n: float) -> Candidates:
    """Masks logits below max - n * std (std over the finite logits), then sorts."""
    if n <= 0.0 or c.size <= 1:
        return c
    finite = c.logits != NEG_INF
    values = c.logits[finite]
    if values.shape[0]:
        max_logit = values.max()
        mean = np.float32(sum_f32(values) / np.float32(values.shape[0]))
        std = np.float32(math.sqrt(float(sum_f32((values - mean) ** 2)) / values.shape[0]))
    else:
        max_logit, std = c.logits[0], np.float32(0.0)
    c.logits[c.logits < max_logit - np.float32(n) * std] = NEG_INF
    return softmax(c, do_sort=True)


def temperature(c: Candidates, temp: float) -> Candidates:
    """Divides logits by temp; temp <= 0 keeps only the first maximum (greedy)."""
    if temp <= 0.0:
        if c.size:
            best = int(np.argmax(c.logits))  # first occurrence, like the strict '>' scan
            kept = c.logits[best]
            c.logits[:] = NEG_INF
            c.logits[best] = kept
        return c
    c.logits = (c.logits / np.float32(temp)).astype(np.float32)
    return c


def temperature_ext(c: Candidates, temp: float, delta: float, exponent: float) -> Candidates:
    """Dynamic temperature: temp +- delta, chosen from the normalised entropy."""
    if delta <= 0.0:
        return temperature(c, temp)
    if c.size <= 1:
        return c
    min_temp = max(0.0, temp - delta)
    max_temp = temp + delta
    max_entropy = -math.log(1.0 / c.size)
    c = softmax(c, do_sort=True)
    nz = c.probs[c.probs > 0]
    entropy = float(-sum_f32(nz * np.log(nz)))
    dyn_temp = min_temp + (max_temp - min_temp) * (entropy / max_entropy) ** exponent
    c = temperature(c, dyn_temp)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(c.logits.astype(np.float64) - float(c.logits[0]))
    c.probs = (p / p.sum()).astype(np.float32)
    return c


def xtc(c: Candidates, probability: float, threshold: float, min_keep: int,
        draw_f32: Callable[[], float]) -> Candidates:
    """Exclude Top Choices: with some chance, drop all but the least likely above threshold."""
    if probability <= 0.0 or threshold > 0.5 or c.size < 2:
        return c
    if draw_f32() > probability:
        return c
    c = softmax(c, do_sort=True)
    above = c.probs >= np.float32(threshold)
    # index of the last token of the leading run with p >= threshold
    run = int(np.argmin(above)) if not above.all() else c.size
    pos_last = max(run - 1, 0)
    if c.size - pos_last >= min_keep and pos_last > 0:
        return c.take(slice(pos_last, None), True)
    return c


def dist_select(c: Candidates, draw_f64: Callable[[], float]) -> tuple[Candidates, int]:
    """llama.cpp's `dist`: softmax, then walk the cumulative mass (float64) to rnd * total.

    Returns (candidates with probs, selected position). Always one draw: with one candidate
    llama.cpp still draws (to keep its RNG aligned with backend sampling), so a seeded request's
    later draws stay llama.cpp's after a step that left one token (e.g. min_p).
    """
    if c.size == 1:
        draw_f64()
        c.probs = np.ones(1, np.float32)
        return c, 0
    max_logit = c.logits[0] if c.sorted else c.logits.max()
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(c.logits - max_logit, dtype=np.float32)
    cum = np.cumsum(p, dtype=np.float64)
    total = cum[-1]
    target = total * draw_f64()
    selected = int(np.searchsorted(cum, target, side="left"))
    c.probs = (p / total).astype(np.float32)
    return c, min(selected, c.size - 1)


def discrete_select(c: Candidates, draw_f64: Callable[[], float]) -> int:
    """std::discrete_distribution over c.probs: first index whose normalised cdf >= u.

    As libstdc++: fewer than two weights select 0 without drawing; the weights are divided by
    their sequential double sum (std::accumulate), then summed up with the last set to 1.
    """
    if c.size < 2:
        return 0
    probs = c.probs.astype(np.float64)
    cdf = np.cumsum(probs / np.cumsum(probs)[-1])
    cdf[-1] = 1.0
    return min(int(np.searchsorted(cdf, draw_f64(), side="left")), c.size - 1)


def mirostat_v1(c: Candidates, mu: float, tau: float, eta: float, m: int, n_vocab: int,
                draw_f64: Callable[[], float]) -> tuple[Candidates, int, float]:
    """Mirostat 1.0: estimate Zipf s from the top m, pick k from mu, sample, update mu."""
    c = softmax(c, do_sort=False)
    count = min(m - 1, c.size - 1)
    if count > 0:
        top = c.probs[top_order(c.logits, count + 1)]
        i = np.arange(count, dtype=np.float32)
        t = np.log((i + 2) / (i + 1)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.log(top[:count] / top[1:count + 1]).astype(np.float32)
        s_hat = float(sum_f32(t * b) / sum_f32(t * t))
    else:
        s_hat = float("nan")
    eps = s_hat - 1
    with np.errstate(all="ignore"):
        k = ((eps * 2.0 ** mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat) if eps != 0 else float("inf")
    k_int = int(k) if math.isfinite(k) else (c.size if k > 0 else 1)
    c = top_k(c, max(k_int, 1))
    c = softmax(c, do_sort=True)
    idx = discrete_select(c, draw_f64)
    surprise = -math.log2(float(c.probs[idx]))
    return c, idx, mu - eta * (surprise - tau)


def mirostat_v2(c: Candidates, mu: float, tau: float, eta: float,
                draw_f64: Callable[[], float]) -> tuple[Candidates, int, float]:
    """Mirostat 2.0: drop tokens with surprise > mu, sample, update mu."""
    c = softmax(c, do_sort=False)
    # the sorted prefix with surprise <= mu is exactly the set of such tokens
    with np.errstate(divide="ignore"):
        keep = np.flatnonzero(-np.log2(c.probs) <= np.float32(mu))
    if keep.shape[0] == 0:
        keep = top_order(c.logits, 1)
    c = c.take(keep[_sorted_order(c.logits[keep])], True)
    c = softmax(c, do_sort=True)
    idx = discrete_select(c, draw_f64)
    surprise = -math.log2(float(c.probs[idx]))
    return c, idx, mu - eta * (surprise - tau)
