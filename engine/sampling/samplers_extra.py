"""llama.cpp's `infill` and `adaptive_p` samplers, as pure functions over `Candidates`.

Kept apart from `samplers.py` only for size; the same rules apply (see its docstring): each
function follows `src/llama-sampler.cpp` step for step, float32 where the C++ uses `float`,
the candidate order kept where the C++ keeps it, and `cur_p->sorted` (`Candidates.sorted`)
left alone where the C++ leaves it (a softmax of a "sorted" list takes its first logit as max).

`infill` needs the vocabulary: `InfillVocab` is built once per tokenizer (the prefix relation
between token pieces); `adaptive_p`'s state (the EMA of selected tokens' probabilities, the
pending token) lives in `engine/sampling/sampler.py`, as mirostat's mu does.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ggserve.engine.sampling.samplers import NEG_INF, Candidates, discrete_select, softmax, sum_f32

ONE = np.float32(1.0)
ZERO = np.float32(0.0)


# -- infill ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfillVocab:
    """For each token b, the tokens a != b whose piece is a non-empty prefix of b's piece.

    Pieces are `token_to_piece(id, special=False)` (control tokens render empty, so they are
    never merged). Stored as CSR: the a's of token b are `prefix_ids[prefix_start[b]:prefix_start[b+1]]`.
    Building it walks every prefix of every piece once (~a second at 150k tokens); sampling then
    only gathers the rows of the current candidates.
    """

    prefix_start: np.ndarray  # (n_vocab + 1,) int64
    prefix_ids: np.ndarray    # (n_pairs,) int32

    @property
    def n_vocab(self) -> int:
        return int(self.prefix_start.shape[0]) - 1

    @classmethod
    def from_pieces(cls, pieces: list[bytes]) -> "InfillVocab":
        by_piece: dict[bytes, list[int]] = {}
        for token_id, piece in enumerate(pieces):
            if piece:
                by_piece.setdefault(piece, []).append(token_id)
        counts = np.zeros(len(pieces), np.int64)
        found: list[int] = []
        for token_id, piece in enumerate(pieces):
            before = len(found)
            for n in range(1, len(piece) + 1):
                group = by_piece.get(piece[:n])
                if group is not None:
                    found.extend(a for a in group if a != token_id)
            counts[token_id] = len(found) - before
        start = np.zeros(len(pieces) + 1, np.int64)
        np.cumsum(counts, out=start[1:])
        return cls(start, np.array(found, np.int32))

    def prefix_pairs(self, c: Candidates) -> tuple[np.ndarray, np.ndarray]:
        """Positions (i0, i1) in c where piece(i0) is a non-empty prefix of piece(i1), i0 != i1,
        ordered by i0, then i1: the order of infill's double loop over the candidates."""
        starts = self.prefix_start[c.ids]
        counts = self.prefix_start[c.ids + 1] - starts
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        row_first = np.cumsum(counts) - counts
        flat = np.repeat(starts - row_first, counts) + np.arange(total)
        i1 = np.repeat(np.arange(c.size, dtype=np.int64), counts)
        position = np.full(self.n_vocab, -1, np.int64)  # token id -> position in c (-1: absent)
        position[c.ids] = np.arange(c.size)
        i0 = position[self.prefix_ids[flat]]
        present = i0 >= 0
        key = np.sort(i0[present] * c.size + i1[present])  # by i0, then i1
        return key // c.size, key % c.size


def _merge_prefixes(probs: np.ndarray, finite: np.ndarray, i0s: np.ndarray,
                    i1s: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """infill's "combine tokens with common prefix" double loop, run over the prefix pairs only.

    For each pair in order (both still alive: finite logit, not merged away): the less likely
    token (ties: i1) is merged into the other, whose p grows by its p (float32). Returns the new
    probs and the positions merged away (their logit becomes -inf, their p 0).
    """
    # array('f') stores float32: `p[a] += p[b]` adds the two float32 values in double, exactly
    # (or within far less than half a float32 ulp), and rounds the store to float32, so each
    # step equals the C++ float addition. The loop is over prefix pairs, not the vocabulary.
    p = array("f", probs.astype(np.float32).tobytes())
    alive = finite.tolist()
    merged: list[int] = []
    for a, b in zip(i0s.tolist(), i1s.tolist()):
        if not (alive[a] and alive[b]):
            continue
        if p[b] > p[a]:
            a, b = b, a
        p[a] += p[b]
        p[b] = 0.0
        alive[b] = False
        merged.append(b)
    return np.frombuffer(p, np.float32).copy(), merged


def infill(c: Candidates, vocab: InfillVocab, is_eog: np.ndarray, eot_id: int) -> Candidates:
    """llama_sampler_infill_apply: prefer EOG when text is unlikely, merge prefix-sharing tokens.

    1. softmax (sorting); if 3 * p(EOG) * n > p(text), keep only the EOG tokens (renormalised).
    2. merge every token into a more likely one it is a prefix of / that is a prefix of it.
    3. keep EOG tokens and tokens with p >= 0.2; if no text token is left the list becomes the
       single EOT (else EOS) token with logit 1; renormalise, then keep EOG tokens and tokens
       with p >= 1 / (n_text + 1), renormalise again.
    Logits are untouched except merged-away tokens (-inf): the later `dist` re-softmaxes them.
    """
    c = softmax(c, do_sort=True)
    eog = is_eog[c.ids]
    probs = c.probs
    p_eog = sum_f32(probs[eog])
    p_txt = sum_f32(probs[~eog])
    if np.float32(3.0) * p_eog * np.float32(c.size) > p_txt:
        keep = np.flatnonzero(eog)
        out = c.take(keep, True)
        out.probs = (out.probs / sum_f32(out.probs)).astype(np.float32)
        return out

    i0s, i1s = vocab.prefix_pairs(c)
    probs, merged = _merge_prefixes(probs, c.logits != NEG_INF, i0s, i1s)
    logits = c.logits.copy()
    logits[merged] = NEG_INF

    # first pass: p >= 0.2 or EOG (written as "not below", so a NaN p is kept like in C++)
    keep = np.flatnonzero(~(probs < np.float32(0.2)) | eog)
    n_non_eog = int(np.count_nonzero(~eog[keep]))
    if n_non_eog == 0:
        first = probs[keep[0]] if keep.shape[0] else probs[0]  # the C++ leaves data[0].p as is
        return Candidates(np.array([eot_id], np.int32), np.array([1.0], np.float32),
                          np.array([first], np.float32), True, False)
    kept = probs[keep] / sum_f32(probs[keep])
    # second pass: thold = 1.0 / (n_non_eog + 1) computed in double, stored in a float
    second = ~(kept < np.float32(1.0 / (n_non_eog + 1))) | eog[keep]
    keep, kept = keep[second], kept[second]
    return Candidates(c.ids[keep], logits[keep], (kept / sum_f32(kept)).astype(np.float32), True, False)


# -- adaptive-p --------------------------------------------------------------------------------
ADAPTIVE_PEAK_LOGIT = np.float32(5.0)
ADAPTIVE_SHARPNESS = np.float32(10.0)
ADAPTIVE_INV_WIDTH = ONE / np.float32(0.3)  # 1.0f / DISTRIBUTION_WIDTH, a float division


def adaptive_p_init(target: float, decay: float) -> tuple[np.float32, np.float32, np.float32]:
    """llama_sampler_init_adaptive_p: (decay clamped to [0, 0.99], weighted_sum, total_weight).

    The EMA starts as if an infinite history had selected tokens at exactly `target`.
    """
    decay32 = min(max(np.float32(decay), ZERO), np.float32(0.99))
    return decay32, np.float32(target) / (ONE - decay32), ONE / (ONE - decay32)


def adaptive_p_update(original_p: np.float32, decay: np.float32, weighted_sum: np.float32,
                      total_weight: np.float32) -> tuple[np.float32, np.float32]:
    """llama_sampler_adaptive_p_accept: fold the selected token's original p into the EMA."""
    return np.float32(original_p) + decay * weighted_sum, ONE + decay * total_weight


def adaptive_p(c: Candidates, target: float, weighted_sum: np.float32, total_weight: np.float32,
               draw_f64: Callable[[], float]) -> tuple[Candidates, int, np.float32 | None]:
    """llama_sampler_adaptive_p_apply: select a token whose probability is near the target.

    softmax (no sort); a negative target just samples that distribution. Otherwise the target is
    adapted by the EMA (2 * target - mean of recent selections), each finite logit is replaced by
    5 - 10 d^2 / (1 + d) with d = |p - adapted| / 0.3, and the new softmax is sampled with
    std::discrete_distribution. Returns (candidates, selected position, the selected token's
    probability before the transform, for the EMA; None when disabled).
    """
    c = softmax(c, do_sort=False)
    if np.float32(target) < ZERO:
        return c, discrete_select(c, draw_f64), None
    original = c.probs
    clamped = min(max(np.float32(target), ZERO), ONE)
    adapted = clamped if total_weight == ZERO else np.float32(2.0) * clamped - weighted_sum / total_weight
    adapted = min(max(np.float32(adapted), ZERO), ONE)
    dist = np.abs((original - adapted) * ADAPTIVE_INV_WIDTH)
    transformed = ADAPTIVE_PEAK_LOGIT - ADAPTIVE_SHARPNESS * dist * dist / (ONE + dist)
    # -inf logits (masked by a grammar or an earlier sampler) stay -inf; `sorted` is kept as is
    c.logits = np.where(c.logits == NEG_INF, c.logits, transformed).astype(np.float32)
    c = softmax(c, do_sort=False)
    selected = discrete_select(c, draw_f64)
    return c, selected, np.float32(original[selected])
