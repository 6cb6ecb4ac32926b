"""The infill and adaptive-p samplers against hand-computed expectations.

Expected values follow llama.cpp's src/llama-sampler.cpp (llama_sampler_infill_apply and
llama_sampler_adaptive_p_*) and common/sampling.cpp (adaptive-p replaces the final dist);
the arithmetic is worked out in the comments.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ggserve.engine.sampling import samplers as S
from ggserve.engine.sampling import samplers_extra as SX
from ggserve.engine.sampling.sampler import MT19937Stream, Sampler, SamplingParams, infill_vocab

NO_TRUNCATION = dict(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)


class FakeTokenizer:
    """The tokenizer surface the infill sampler uses: pieces (control ones empty without
    special), EOG ids, EOT / EOS ids."""

    def __init__(self, pieces: list[bytes], eog=(), eot: int | None = None, eos: int | None = None,
                 control=()):
        self.pieces, self.n_vocab = pieces, len(pieces)
        self.eog_ids, self.eot_id, self.eos_id = frozenset(eog), eot, eos
        self.control = frozenset(control)
        self.calls = 0

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        self.calls += 1
        if not special and token_id in self.control:
            return b""
        return self.pieces[token_id]


def cands(probs) -> S.Candidates:
    """Candidates in id order whose softmax is `probs` (logits = log p, float32)."""
    with np.errstate(divide="ignore"):
        return S.Candidates.from_logits(np.log(np.asarray(probs, np.float64)).astype(np.float32))


def eog_mask(n: int, *ids: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[list(ids)] = True
    return mask


def vocab_of(*pieces: bytes) -> SX.InfillVocab:
    return SX.InfillVocab.from_pieces(list(pieces))


# -- infill: the prefix relation ----------------------------------------------------------------
def test_infill_vocab_lists_non_empty_proper_and_equal_prefixes():
    v = vocab_of(b"a", b"ab", b"abc", b"x", b"", b"ab")
    rows = [sorted(v.prefix_ids[v.prefix_start[t]:v.prefix_start[t + 1]].tolist()) for t in range(6)]
    # "ab" (1) and its twin (5) are prefixes of each other; the empty piece is nobody's prefix
    assert rows == [[], [0, 5], [0, 1, 5], [], [], [0, 1]]


# -- infill: merging ----------------------------------------------------------------------------
def test_infill_merges_into_the_more_likely_token():
    # ids: 0 "a" .3, 1 "ab" .4, 2 "abc" .1, 3 "x" .15, 4 EOG .05 (empty piece)
    # EOG check: 3 * .05 * 5 = .75 <= p_txt .95 -> no
    # sorted positions: 0:"ab" .4, 1:"a" .3, 2:"x" .15, 3:"abc" .1, 4:EOG .05
    # pairs in loop order: (0,3): .1 > .4? no -> "ab" takes "abc": .5
    #                      (1,0): .5 > .3 -> "a" merged into "ab": .8;  (1,3): "a" gone
    # thold .2: keep "ab" .8 and EOG .05 (sum .85); thold 1/(1+1): both stay
    v = vocab_of(b"a", b"ab", b"abc", b"x", b"")
    c = SX.infill(cands([0.3, 0.4, 0.1, 0.15, 0.05]), v, eog_mask(5, 4), 4)
    assert c.ids.tolist() == [1, 4] and c.sorted
    np.testing.assert_allclose(c.probs, [0.8 / 0.85, 0.05 / 0.85], rtol=1e-6)
    # logits are untouched (dist re-softmaxes them): log .4 and log .05
    np.testing.assert_allclose(c.logits, np.log([0.4, 0.05]), rtol=1e-6)


def test_infill_compares_probabilities_grown_by_earlier_merges():
    # ids 0 "ab" .3, 1 "a" .3, 2 "abc" .1, 3 "x" .25, 4 EOG .05; the tie keeps id order (stable
    # sort): 0:"ab" 1:"a" 2:"x" 3:"abc" 4:EOG. (0,3): "ab" takes "abc" -> .4; (1,0): .4 > .3 so
    # "a" goes into "ab" (.7) -- compared with the original .3 "a" would have won the tie.
    # thold .2: "ab" .7, "x" .25, EOG; thold 1/3: "x" goes
    v = vocab_of(b"ab", b"a", b"abc", b"x", b"")
    c = SX.infill(cands([0.3, 0.3, 0.1, 0.25, 0.05]), v, eog_mask(5, 4), 4)
    assert c.ids.tolist() == [0, 4]
    np.testing.assert_allclose(c.probs, [0.7 / 0.75, 0.05 / 0.75], rtol=1e-5)


# -- infill: EOG handling and thresholds ------------------------------------------------------
def test_infill_keeps_only_eog_when_text_is_unlikely():
    # 3 * p_eog * n = 3 * .3 * 3 = 2.7 > p_txt .7 -> only EOG tokens, renormalised (.2/.3, .1/.3)
    v = vocab_of(b"t", b"", b"")
    c = SX.infill(cands([0.7, 0.2, 0.1]), v, eog_mask(3, 1, 2), 1)
    assert c.ids.tolist() == [1, 2]
    np.testing.assert_allclose(c.probs, [2 / 3, 1 / 3], rtol=1e-6)


def test_infill_eog_ratio_scales_with_the_candidate_count():
    # p_eog .05, the rest text: with 4 candidates 3 * .05 * 4 = .6 <= .95 (text stays),
    # with 7 candidates (three more tiny text tokens) 3 * .05 * 7 = 1.05 > .95 -> EOG only
    # (with four: thold .2 keeps .6 .3 + EOG, then 1/3 drops .3/.95 = .316)
    four = SX.infill(cands([0.6, 0.3, 0.05, 0.05]), vocab_of(b"a", b"b", b"c", b""), eog_mask(4, 3), 3)
    assert four.ids.tolist() == [0, 3]
    v = vocab_of(b"a", b"b", b"c", b"d", b"e", b"f", b"")
    seven = SX.infill(cands([0.6, 0.3, 0.02, 0.01, 0.01, 0.01, 0.05]), v, eog_mask(7, 6), 6)
    assert seven.ids.tolist() == [6]
    np.testing.assert_allclose(seven.probs, [1.0])


@pytest.mark.parametrize("probs,kept", [
    # EOG .01 (3 * .01 * 6 = .18 <= .99); thold .2 keeps .45 .25 .21 + EOG (n_non_eog 3, sum .92:
    # .489 .272 .228 .011); thold 1/(3+1) = .25: .228 goes
    ([0.45, 0.25, 0.21, 0.05, 0.03, 0.01], [0, 1, 5]),
    # EOG .04 (.72 <= .96); thold .2 keeps .21 too (sum .82: .366 .329 .256); 1/4: .256 stays
    ([0.3, 0.27, 0.21, 0.12, 0.06, 0.04], [0, 1, 2, 5]),
])
def test_infill_thresholds(probs, kept):
    c = SX.infill(cands(probs), vocab_of(b"p", b"q", b"r", b"s", b"t", b""), eog_mask(6, 5), 5)
    assert c.ids.tolist() == kept
    expected = np.array(probs)[kept]
    np.testing.assert_allclose(c.probs, expected / expected.sum(), rtol=1e-5)


def test_infill_without_text_left_becomes_the_eot_token():
    # six text tokens at 1/6 < .2 each, no EOG candidate: nothing passes -> [EOT] with logit 1
    v = vocab_of(b"a", b"b", b"c", b"d", b"e", b"f", b"", b"")
    logits = np.full(8, -np.inf, np.float32)
    logits[:6] = 0.0
    c = SX.infill(S.Candidates.from_logits(logits), v, eog_mask(8, 6, 7), 7)
    assert c.ids.tolist() == [7] and c.logits.tolist() == [1.0]


def literal_infill(c: S.Candidates, pieces: list[bytes], is_eog: np.ndarray, eot: int):
    """llama_sampler_infill_apply transcribed loop for loop (float32 scalars): (id, logit, p) rows."""
    c = S.softmax(c, do_sort=True)
    ids, logits, p = c.ids.tolist(), c.logits.copy(), c.probs.copy()

    def normalise(rows):
        total = np.float32(0)
        for row in rows:
            total += row[2]
        return [(i, l, q / total) for i, l, q in rows]

    p_txt = p_eog = np.float32(0)
    for i, q in zip(ids, p):
        if is_eog[i]:
            p_eog += q
        else:
            p_txt += q
    if np.float32(3) * p_eog * np.float32(len(ids)) > p_txt:
        return normalise([r for r in zip(ids, logits, p) if is_eog[r[0]]])
    for i0 in range(len(ids)):
        for i1 in range(len(ids)):
            if logits[i0] == -np.inf:
                break
            if i0 == i1 or logits[i1] == -np.inf:
                continue
            a, b = pieces[ids[i0]], pieces[ids[i1]]
            if len(a) > 0 and len(a) <= len(b) and b[:len(a)] == a:
                dst, src = (i1, i0) if p[i1] > p[i0] else (i0, i1)
                p[dst] += p[src]
                logits[src], p[src] = -np.inf, 0
    rows = [r for r in zip(ids, logits, p) if not (r[2] < np.float32(0.2) and not is_eog[r[0]])]
    n_non_eog = sum(1 for r in rows if not is_eog[r[0]])
    if n_non_eog == 0:
        return [(eot, np.float32(1), None)]
    thold = np.float32(1.0 / (n_non_eog + 1))
    return normalise([r for r in normalise(rows) if not (r[2] < thold and not is_eog[r[0]])])


@pytest.mark.parametrize("seed", range(40))
def test_infill_matches_the_literal_double_loop(seed):
    # a vocabulary dense in prefixes (pieces over "ab", duplicates, empty control pieces), random
    # logits with ties, masked tokens and a few EOG tokens; every 4th case is flat over pieces
    # of 8 letters (few merges, so often no text token reaches .2: the EOT branch)
    rng = np.random.default_rng(seed)
    letters = [97, 98] if seed % 4 else list(range(97, 105))
    pieces = [bytes(rng.choice(letters, size=rng.integers(0, 4)).tolist()) for _ in range(24)]
    is_eog = np.zeros(24, bool)
    is_eog[rng.choice(24, size=2, replace=False)] = True
    logits = rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, -np.inf], size=24).astype(np.float32)
    if seed % 4 == 0:
        logits[:] = 0.0
    logits[rng.integers(0, 24)] = 4.0 if seed % 3 else -1.0
    logits[is_eog] -= np.float32(6.0 if seed % 2 or seed % 4 == 0 else 0.0)
    ids, expected_logits, expected_probs = zip(*literal_infill(S.Candidates.from_logits(logits), pieces,
                                                              is_eog, 23))
    got = SX.infill(S.Candidates.from_logits(logits), SX.InfillVocab.from_pieces(pieces), is_eog, 23)
    assert got.ids.tolist() == list(ids)
    np.testing.assert_array_equal(got.logits, np.array(expected_logits, np.float32))
    if expected_probs[0] is not None:
        np.testing.assert_array_equal(got.probs, np.array(expected_probs, np.float32))


# -- infill in the Sampler ----------------------------------------------------------------------
PIECES = [b"a", b"ab", b"abc", b"x", b"<eot>", b"<eos>"]


def infill_tokenizer(eot: int | None = 4) -> FakeTokenizer:
    return FakeTokenizer(PIECES, eog=(4, 5), eot=eot, eos=5, control=(4, 5))


def test_sampler_infill_forces_eot_then_eos():
    # ids 0..3 text at p 1/4, 4/5 EOG at -inf: sorted 0:"a" 1:"ab" 2:"abc" 3:"x" (ties keep id
    # order); (0,1) tie -> "a" .5; (0,2) -> "a" .75; thold .2: "a", "x" .25, EOGs (p 0);
    # thold 1/3 drops "x": dist picks "a" (without the merge seed 1's u = .997 would pick "x")
    logits = np.array([0, 0, 0, 0, -np.inf, -np.inf], np.float32)
    params = SamplingParams(samplers=["infill"], seed=1, **NO_TRUNCATION)
    assert Sampler(params, 6, frozenset({4, 5}), tokenizer=infill_tokenizer()).sample(logits) == 0
    # six equally likely unrelated tokens (1/6 < .2) -> none passes -> EOT (6), or EOS (7)
    tok = FakeTokenizer([b"p", b"q", b"r", b"s", b"t", b"u", b"<eot>", b"<eos>"], eog=(6, 7), eot=6,
                        eos=7, control=(6, 7))
    logits = np.array([0, 0, 0, 0, 0, 0, -np.inf, -np.inf], np.float32)
    assert Sampler(params, 8, tok.eog_ids, tokenizer=tok).sample(logits) == 6
    tok.eot_id = None
    assert Sampler(params, 8, tok.eog_ids, tokenizer=tok).sample(logits) == 7


def test_sampler_infill_uses_pieces_without_special_tokens():
    # token 4 is a control (not EOG) token whose text is "a": rendered without special tokens it
    # is empty, so it is no prefix of "ab" (with its text, .3 > .25, it would swallow "ab").
    # thold .2: "y" .35, ctrl .3, "ab" .25 (+EOG .01, sum .91); 1/4: .275 for "ab" passes
    tok = FakeTokenizer([b"y", b"ab", b"z", b"w", b"a", b"<eos>"], eog=(5,), eos=5, control=(4, 5))
    c = SX.infill(cands([0.35, 0.25, 0.05, 0.04, 0.3, 0.01]), infill_vocab(tok, 6), eog_mask(6, 5), 5)
    assert c.ids.tolist() == [0, 4, 1, 5]


@pytest.mark.parametrize("seed", [0, 1, 2, 4, 6, 8])
def test_sampler_infill_then_dist_with_letters(seed):
    # "ki": top_k 5 then infill; the survivors are "ab" (logit log .4) and EOG (log .05): dist
    # re-softmaxes the logits (.4/.45, .05/.45) and draws once from the dist stream
    probs = np.array([0.3, 0.4, 0.1, 0.15, 0.05, 0.0], np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(probs).astype(np.float32)
    params = SamplingParams(samplers="ki", top_k=5, temperature=1.0, seed=seed)
    sampler = Sampler(params, 6, frozenset({4, 5}), tokenizer=infill_tokenizer())
    u = MT19937Stream(seed).f64()
    expected = 1 if u <= 0.4 / 0.45 else 4
    assert sampler.sample(logits) == expected


def test_sampler_infill_needs_the_vocabulary():
    with pytest.raises(ValueError, match="infill"):
        Sampler(SamplingParams(samplers=["top_k", "infill"]), 6, frozenset({4}))
    with pytest.raises(ValueError, match="infill"):  # token bytes but no EOG id to stand in for EOT
        Sampler(SamplingParams(samplers="i"), 2, token_bytes=[b"a", b"b"])
    with pytest.raises(ValueError, match="EOT or EOS"):
        Sampler(SamplingParams(samplers="i"), 2, tokenizer=FakeTokenizer([b"a", b"b"]))
    # mirostat ignores `samplers` (llama.cpp builds no infill sampler then): no vocabulary needed
    Sampler(SamplingParams(samplers="i", mirostat=2), 6)


def test_sampler_infill_from_token_bytes_blanks_eog_pieces():
    # without a tokenizer the token bytes stand in (special tokens rendered): the EOG tokens'
    # pieces are emptied as llama.cpp's special=false rendering does, so "<" (.3) does not
    # swallow "<eot>" (.02, logit stays finite); the lowest EOG id stands in for EOT
    pieces = [b"<", b"ab", b"x", b"<e", b"<eot>", b"<eos>"]
    c = SX.infill(cands([0.3, 0.4, 0.28, 0.0, 0.02, 0.0]), infill_vocab(pieces, 6, frozenset({4, 5})),
                  eog_mask(6, 4, 5), 4)
    assert c.ids.tolist() == [1, 0, 2, 4, 5]
    assert np.isfinite(c.logits).tolist() == [True, True, True, True, False]
    flat = [b"p", b"q", b"r", b"s", b"t", b"u", b"<eot>", b"<eos>"]
    logits = np.array([0, 0, 0, 0, 0, 0, -np.inf, -np.inf], np.float32)
    sampler = Sampler(SamplingParams(samplers="i", seed=1), 8, frozenset({7, 6}), token_bytes=flat)
    assert sampler.sample(logits) == 6


def test_infill_vocab_is_built_once_per_tokenizer():
    tok = infill_tokenizer()
    first = infill_vocab(tok, 6)
    calls = tok.calls
    assert infill_vocab(tok, 6) is first and tok.calls == calls
    assert infill_vocab(tok, 8).n_vocab == 8  # padded model vocabulary: extra ids have no piece


# -- adaptive-p: the transform and selection ---------------------------------------------------
def test_adaptive_p_init_clamps_decay_and_seeds_the_ema():
    decay, ws, tw = SX.adaptive_p_init(0.3, 0.9)
    assert decay == np.float32(0.9)
    one = np.float32(1)
    assert ws == np.float32(0.3) / (one - np.float32(0.9)) and tw == one / (one - np.float32(0.9))
    assert ws.dtype == tw.dtype == np.float32
    assert SX.adaptive_p_init(0.3, 1.5)[0] == np.float32(0.99)
    assert SX.adaptive_p_init(0.3, -1.0)[0] == 0.0
    ws, tw = SX.adaptive_p_update(np.float32(0.5), np.float32(0.9), np.float32(3.0), np.float32(10.0))
    # in float32: .9f * 3 = 2.6999998, + .5 = 3.1999998 (not 3.2f); 1 + .9f * 10 = 10
    assert ws == np.float32(3.1999998) and tw == np.float32(10.0)
    assert ws.dtype == tw.dtype == np.float32


# p = .5 .3 .2, target .3, EMA at init (ws 3, tw 10): adapted = 2 * .3 - 3 / 10 = .3
# d = |p - .3| / .3 = 2/3, 0, 1/3 -> logits 5 - 10 d^2/(1+d) = 2.3333, 5, 4.1667
# softmax: e^-2.6667 = .069483, 1, e^-.8333 = .434598 (sum 1.504081) -> .046197 .664858 .288945
TRANSFORMED = [0.046197, 0.664858, 0.288945]


@pytest.mark.parametrize("seed,expected", [(8, 0), (2, 1), (0, 1), (4, 2), (1, 2)])
def test_adaptive_p_prefers_tokens_near_the_target(seed, expected):
    # seed 8 draws u = .0111 (< .046197), 2 .1851 / 0 .5928 (< .711055), 4 .9006 / 1 .9972
    c = cands([0.5, 0.3, 0.2])
    out, idx, original = SX.adaptive_p(c, 0.3, np.float32(3.0), np.float32(10.0), MT19937Stream(seed).f64)
    np.testing.assert_allclose(out.probs, TRANSFORMED, rtol=1e-5)
    np.testing.assert_allclose(out.logits, [7 / 3, 5.0, 25 / 6], rtol=1e-6)
    assert idx == expected
    assert original == pytest.approx([0.5, 0.3, 0.2][expected], rel=1e-6)


def test_adaptive_p_adapts_the_target_and_keeps_masked_tokens():
    # after picking .5-probability tokens the EMA mean is high: ws 3.2, tw 10 -> adapted
    # 2 * .3 - .32 = .28; the -inf token stays -inf (p 0 after the transform)
    c = cands([0.5, 0.3, 0.2, 0.0])
    out, _, _ = SX.adaptive_p(c, 0.3, np.float32(3.2), np.float32(10.0), MT19937Stream(3).f64)
    d = np.abs(np.array([0.5, 0.3, 0.2]) - 0.28) / 0.3
    logits = 5 - 10 * d * d / (1 + d)
    np.testing.assert_allclose(out.logits[:3], logits, rtol=1e-5)
    assert out.logits[3] == -np.inf and out.probs[3] == 0.0
    # a mean above 2 * target clamps the adapted target to 0: the least likely token wins most
    out, _, _ = SX.adaptive_p(cands([0.5, 0.3, 0.2]), 0.3, np.float32(7.0), np.float32(10.0),
                              MT19937Stream(3).f64)
    assert int(np.argmax(out.probs)) == 2


def test_adaptive_p_negative_target_samples_the_plain_distribution():
    draws = []

    def draw():
        draws.append(1)
        return 0.85  # cdf .5 .8 1 -> index 2

    out, idx, original = SX.adaptive_p(cands([0.5, 0.3, 0.2]), -1.0, np.float32(-10), np.float32(10), draw)
    assert (idx, original, len(draws)) == (2, None, 1)
    np.testing.assert_allclose(out.probs, [0.5, 0.3, 0.2], rtol=1e-6)
    # a single candidate: std::discrete_distribution returns 0 without drawing
    out, idx, _ = SX.adaptive_p(cands([1.0]), 0.3, np.float32(3), np.float32(10), draw)
    assert (idx, len(draws)) == (0, 1)


# -- adaptive-p in the Sampler ------------------------------------------------------------------
def reference_adaptive(probs, target, decay, us):
    """The adaptive-p steps in double precision (selections, final EMA): the hand model."""
    ws, tw = target / (1 - decay), 1 / (1 - decay)
    picks = []
    for u in us:
        adapted = min(max(2 * target - ws / tw, 0.0), 1.0)
        d = [abs(p - adapted) / 0.3 for p in probs]
        e = [math.exp(5 - 10 * x * x / (1 + x)) for x in d]
        cdf = np.cumsum(e) / sum(e)
        idx = int(np.searchsorted(cdf, u))
        picks.append(idx)
        ws, tw = probs[idx] + decay * ws, 1 + decay * tw
    return picks, ws, tw


@pytest.mark.parametrize("samplers", [["adaptive_p"], ["adaptive-p", "top_k"], "a", "ak"])
def test_sampler_adaptive_p_replaces_dist_over_several_steps(samplers):
    probs = [0.5, 0.3, 0.2]
    params = SamplingParams(samplers=samplers, adaptive_target=0.3, adaptive_decay=0.9, seed=8,
                            top_k=3, temperature=1.0)
    sampler = Sampler(params, 3)
    stream = MT19937Stream(8)
    us = [stream.f64() for _ in range(6)]
    picks, ws, tw = reference_adaptive(probs, 0.3, 0.9, us)
    logits = np.log(probs).astype(np.float32)
    assert [sampler.sample(logits) for _ in range(6)] == picks
    assert len(set(picks)) > 1  # the seed exercises more than one pick
    assert float(sampler.adaptive_weighted_sum) == pytest.approx(ws, rel=1e-5)
    assert float(sampler.adaptive_total_weight) == pytest.approx(tw, rel=1e-5)
    assert sampler._dist_rng.f64() == us[0]  # the dist stream was never drawn from


def test_sampler_adaptive_p_state_moves_only_when_the_selected_token_is_accepted():
    params = SamplingParams(samplers=["adaptive_p"], adaptive_target=0.3, seed=8, **NO_TRUNCATION)
    sampler = Sampler(params, 3)
    start = (sampler.adaptive_weighted_sum, sampler.adaptive_total_weight)
    sampler.accept(1)  # a prompt token: nothing pending
    assert (sampler.adaptive_weighted_sum, sampler.adaptive_total_weight) == start
    logits = np.log([0.5, 0.3, 0.2]).astype(np.float32)
    c, pos = sampler._run_chain(logits, None)  # seed 8 selects token 0 (see above)
    assert int(c.ids[pos]) == 0
    sampler.accept(2)  # another token accepted (e.g. forced): the pending pick is dropped
    sampler.accept(0)
    assert (sampler.adaptive_weighted_sum, sampler.adaptive_total_weight) == start
    # sample() accepts its own pick: ws = p_orig + .9 * 3, tw = 1 + .9 * 10
    token = sampler.sample(logits)
    assert float(sampler.adaptive_weighted_sum) == pytest.approx([0.5, 0.3, 0.2][token] + 0.9 * 3.0, rel=1e-6)
    assert float(sampler.adaptive_total_weight) == pytest.approx(1 + 0.9 * 10.0, rel=1e-6)


def test_sampler_adaptive_p_disabled_target_keeps_the_ema():
    params = SamplingParams(samplers=["min_p", "adaptive_p"], seed=8, **NO_TRUNCATION)
    assert params.adaptive_target == -1.0 and params.adaptive_decay == 0.9  # llama.cpp defaults
    sampler = Sampler(params, 3)
    start = (sampler.adaptive_weighted_sum, sampler.adaptive_total_weight)
    # u = .0111 on the plain distribution .5 .3 .2 -> token 0
    assert sampler.sample(np.log([0.5, 0.3, 0.2]).astype(np.float32)) == 0
    assert (sampler.adaptive_weighted_sum, sampler.adaptive_total_weight) == start


def test_sampler_infill_then_adaptive_p_letters():
    # "ia": infill leaves "ab" (logit log .4) and EOG (log .05) -> adaptive-p softmax .8889 .1111;
    # target .1 (EMA at init: adapted .1): "ab" d = 2.63 -> logit -14.05, EOG d = .037 -> 4.987,
    # so EOG is picked for any draw; the EMA takes EOG's .1111: ws = .1111 + .9 * 1, tw = 10
    probs = np.array([0.3, 0.4, 0.1, 0.15, 0.05, 0.0])
    with np.errstate(divide="ignore"):
        logits = np.log(probs).astype(np.float32)
    params = SamplingParams(samplers="ia", adaptive_target=0.1, seed=1, **NO_TRUNCATION)
    assert params.samplers == ("infill", "adaptive_p")
    sampler = Sampler(params, 6, frozenset({4, 5}), tokenizer=infill_tokenizer())
    assert sampler.sample(logits) == 4
    assert float(sampler.adaptive_weighted_sum) == pytest.approx(0.05 / 0.45 + 0.9, rel=1e-5)
    assert float(sampler.adaptive_total_weight) == pytest.approx(10.0, rel=1e-6)
    # plain dist instead ("i" alone) picks "ab" for seed 0's u = .593 < .8889
    plain = Sampler(SamplingParams(samplers="i", seed=0, **NO_TRUNCATION), 6, frozenset({4, 5}),
                    tokenizer=infill_tokenizer())
    assert plain.sample(logits) == 1


# -- parameters --------------------------------------------------------------------------------
def test_adaptive_params_validation_and_server_fields():
    with pytest.raises(ValueError, match="adaptive_target"):
        SamplingParams(adaptive_target=float("nan"))
    with pytest.raises(ValueError, match="adaptive_decay"):
        SamplingParams(adaptive_decay="0.5")
    from pydantic import ValidationError

    from ggserve.server.params import PASSTHROUGH_SAMPLING
    from ggserve.server.protocol import CompletionRequest

    assert {"adaptive_target", "adaptive_decay"} <= set(PASSTHROUGH_SAMPLING)
    req = CompletionRequest(prompt="x", adaptive_target=2.5, adaptive_decay=0.99)
    assert (req.adaptive_target, req.adaptive_decay) == (1.0, 0.99)  # target soft-clamped to 1
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", adaptive_decay=1.0)  # decay: hard limit [0, 0.99]
