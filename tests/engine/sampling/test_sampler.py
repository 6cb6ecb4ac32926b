"""Sampler chain: each sampler against hand-computed expectations, plus the Sampler's state.

Expected values follow llama.cpp's src/llama-sampling.cpp semantics (worked out by hand in
the comments), and the RNG is checked against the C++ standard's mt19937 guarantee.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ggserve.engine.sampling import samplers as S
from ggserve.engine.sampling.logit_bias import parse_logit_bias
from ggserve.engine.sampling.penalty_history import DryState, PenaltyWindow
from ggserve.engine.sampling.params import DEFAULT_SAMPLERS
from ggserve.engine.sampling.sampler import MT19937Stream, Sampler, SamplingParams

ONLY_DIST = dict(top_k=0, top_p=1.0, min_p=0.0)


def cands(logits) -> S.Candidates:
    return S.Candidates.from_logits(np.asarray(logits, np.float32))


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, seed=1, **kw)


# -- RNG parity -------------------------------------------------------------------------------
def test_mt19937_matches_cpp_standard():
    # [rand.predef]: the 10000th output of a default-constructed std::mt19937 is 4123659995
    stream = MT19937Stream(5489)
    raw = stream._bits.random_raw(10000)
    assert int(raw[-1]) == 4123659995


def test_uniform_double_uses_two_words_low_first():
    stream = MT19937Stream(5489)
    expected = (3499211612 + 581869302 * 2.0**32) / 2.0**64
    assert stream.f64() == pytest.approx(expected, rel=0, abs=0)


# -- individual samplers ----------------------------------------------------------------------
def test_penalties_over_history_window():
    window = PenaltyWindow(3)
    for t in [1, 2, 2, 3]:  # token 1 falls out of the 3-token window
        window.accept(t)
    ids, counts = window.arrays()
    c = S.penalties(cands([1.0, 2.0, -1.0, 0.5]), ids, counts, repeat=2.0, freq=0.5, present=0.25)
    # token 2 (count 2, logit <= 0): -1*2 - (2*0.5 + 0.25) = -3.25; token 3: 0.5/2 - 0.75 = -0.5
    np.testing.assert_allclose(c.logits, [1.0, 2.0, -3.25, -0.5])


def test_penalties_disabled_by_neutral_values():
    window = PenaltyWindow(64)
    window.accept(0)
    ids, counts = window.arrays()
    c = S.penalties(cands([3.0, 1.0]), ids, counts, 1.0, 0.0, 0.0)
    np.testing.assert_array_equal(c.logits, [3.0, 1.0])


def test_top_k_zero_means_disabled_and_k_sorts():
    c = S.top_k(cands([0.1, 3.0, 2.0, -1.0]), 0)
    assert c.size == 4 and not c.sorted
    c = S.top_k(cands([0.1, 3.0, 2.0, -1.0]), 2)
    assert c.ids.tolist() == [1, 2] and c.sorted
    assert S.top_k(cands([0.1, 3.0]), 10).ids.tolist() == [1, 0]


@pytest.mark.parametrize("p,min_keep,expected", [(0.4, 0, 1), (0.7, 0, 2), (0.8, 0, 3), (1.0, 0, 4), (0.4, 3, 3)])
def test_top_p_prefix(p, min_keep, expected):
    # probabilities 0.5, 0.25, 0.125, 0.125 -> cumulative 0.5, 0.75, 0.875, 1
    logits = np.log([0.125, 0.5, 0.125, 0.25])
    c = S.top_p(cands(logits), p, min_keep)
    assert c.size == expected
    if p < 1.0:  # p >= 1 disables top_p entirely (order untouched)
        assert c.ids.tolist() == [1, 3, 0, 2][:expected]


def test_min_p_threshold_and_min_keep():
    base = 2.0
    logits = [base, base + math.log(0.05) + 1e-3, base + math.log(0.05) - 1e-2]
    assert S.min_p(cands(logits), 0.05, 0).ids.tolist() == [0, 1]  # unsorted path keeps order
    assert S.min_p(cands(logits), 0.05, 3).size == 3               # min_keep forces the third
    assert S.min_p(cands(logits), 0.0, 0).size == 3                # 0 disables
    assert S.min_p(cands(logits), 1.0, 0).ids.tolist() == [0]      # only the max survives


def test_typical_keeps_most_typical_not_most_likely():
    # p = .45 .35 .20: entropy 1.0486; |-ln p - H| = .250, .001, .561 -> token 1 first
    c = S.typical(cands(np.log([0.45, 0.35, 0.20])), 0.3, 0)
    assert c.ids.tolist() == [1]
    c = S.typical(cands(np.log([0.45, 0.35, 0.20])), 0.7, 0)
    assert c.ids.tolist() == [1, 0]


def test_top_n_sigma_masks_far_tokens():
    # mean 4.75, std 4.763: keeps logits >= 10 - 4.763
    c = S.top_n_sigma(cands([10.0, 9.0, 0.0, 0.0]), 1.0)
    assert c.probs[c.ids == 2][0] == 0.0 and c.probs[c.ids == 1][0] > 0.2


def test_xtc_removes_top_choices():
    params = SamplingParams(temperature=0.0, xtc_probability=1.0, xtc_threshold=0.1, seed=3, **ONLY_DIST)
    logits = np.log([0.5, 0.3, 0.15, 0.05]).astype(np.float32)
    # tokens 0..2 are above 0.1: all but the last of them (token 2) are excluded
    assert Sampler(params, 4).sample(logits) == 2
    params = SamplingParams(temperature=0.0, xtc_probability=1.0, xtc_threshold=0.6, seed=3, **ONLY_DIST)
    assert Sampler(params, 4).sample(logits) == 0  # threshold > 0.5 disables XTC


def test_temperature_zero_is_argmax_first_occurrence():
    c = S.temperature(cands([1.0, 5.0, 5.0, 2.0]), 0.0)
    assert np.isfinite(c.logits).tolist() == [False, True, False, False]


def test_dry_penalises_token_extending_a_repeat():
    dry = DryState(multiplier=1.0, base=2.0, allowed_length=2, last_n=64, context_size=4096)
    for t in [1, 2, 3, 4, 1, 2, 3]:
        dry.accept(t)
    ids, values = dry.penalties()
    # "1 2 3" repeats; 4 would extend it to length 4: penalty 1 * 2^(3 - 2) = 2
    assert ids.tolist() == [4] and values.tolist() == [2.0]
    dry.breakers = {2: [()]}  # token 2 breaks sequences -> repeat limited to 1 < 2
    assert dry.penalties()[0].tolist() == []


def test_dry_in_sampler_changes_greedy_pick():
    params = greedy(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, **ONLY_DIST)
    sampler = Sampler(params, 6)
    for t in [1, 2, 3, 4, 1, 2, 3]:
        sampler.accept(t)
    assert sampler.sample(np.array([0, 0, 0, 0, 1.5, 0], np.float32)) == 0  # 1.5 - 2 < 0


# -- the Sampler --------------------------------------------------------------------------------
def test_defaults_match_llama_cpp():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.mirostat, p.seed) == (1.0, 64, 0, -1)
    assert p.samplers == DEFAULT_SAMPLERS


def test_invalid_params_raise():
    with pytest.raises(ValueError):
        SamplingParams(mirostat=3)
    with pytest.raises(ValueError):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError):
        SamplingParams(samplers=["top_k", "bogus"])
    with pytest.raises(ValueError):
        SamplingParams(repeat_last_n=-2)


def test_penalty_history_includes_accepted_prompt_tokens():
    logits = np.array([0.0, 5.0, 4.9], np.float32)
    sampler = Sampler(greedy(repeat_penalty=1.1, **ONLY_DIST), 3)
    sampler.accept(1)  # a prompt token: 5.0 / 1.1 = 4.55 < 4.9
    assert sampler.sample(logits) == 2
    sampler = Sampler(greedy(repeat_penalty=1.1, repeat_last_n=1, **ONLY_DIST), 3)
    sampler.accept(1)
    sampler.accept(0)  # token 1 left the 1-token window
    assert sampler.sample(logits) == 1


def test_sampled_tokens_enter_the_history():
    sampler = Sampler(greedy(presence_penalty=10.0, **ONLY_DIST), 3)
    logits = np.array([1.0, 2.0, 0.0], np.float32)
    assert [sampler.sample(logits) for _ in range(3)] == [1, 0, 2]


def test_logit_bias_both_forms_and_false_bans():
    class Tok:
        def encode(self, text, add_special=True, parse_special=False):
            return {"hi": [2]}[text]

    openai = parse_logit_bias({"1": 5, "hi": False}, 4, Tok())
    native = parse_logit_bias([[1, 5], ["hi", False], [99, 1], ["x"]], 4, Tok())
    assert openai == native == [(1, 5.0), (2, -math.inf)]
    logits = np.array([1.0, 0.0, 3.0, 0.5], np.float32)
    assert Sampler(greedy(logit_bias=openai, **ONLY_DIST), 4).sample(logits) == 1
    assert Sampler(greedy(logit_bias={2: False}, **ONLY_DIST), 4).sample(logits) == 0
    with pytest.raises(ValueError):
        parse_logit_bias(5, 4)


def test_custom_sampler_order_changes_result():
    # min_p(0.1) drops logit -3 before temperature 2, but keeps it (-1.5) after
    logits = np.array([0.0, -3.0, -10.0], np.float32)
    sizes = {}
    for order in ("mt", "tm", ["temperature", "min_p"]):
        params = SamplingParams(temperature=2.0, min_p=0.1, top_k=0, top_p=1.0, samplers=order,
                                post_sampling_probs=True, seed=5)
        sampler = Sampler(params, 3)
        sampler.sample(logits)
        sizes[str(order)] = len(sampler.last_logprobs(10)[1])
    assert sizes == {"mt": 1, "tm": 2, "['temperature', 'min_p']": 2}
    assert SamplingParams(samplers="edskypmxt").samplers == DEFAULT_SAMPLERS


def test_seed_reproducible_when_interleaved():
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal(1000).astype(np.float32) for _ in range(20)]
    params = SamplingParams(seed=1234, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    solo = Sampler(params, 1000)
    alone = [solo.sample(x) for x in steps]
    a, b, other = Sampler(params, 1000), Sampler(params, 1000), Sampler(SamplingParams(seed=99), 1000)
    stream_a, stream_b = [], []
    for x in steps:
        stream_a.append(a.sample(x))
        other.sample(x)
        stream_b.append(b.sample(x))
    assert stream_a == alone and stream_b == alone
    assert len(set(alone)) > 5  # really random, not greedy


def test_random_seed_differs_between_samplers():
    assert Sampler(SamplingParams(), 10).seed != Sampler(SamplingParams(), 10).seed


def test_greedy_logprobs_are_raw_softmax():
    logits = np.array([1.0, 3.0, 2.0, 0.0], np.float32)
    sampler = Sampler(greedy(n_probs=2, logit_bias={0: 100}), 4)
    token = sampler.sample(logits)
    assert token == 0  # the bias wins the pick, but n_probs shows the model's own probabilities
    chosen, top = sampler.last_logprobs(2)
    log_total = math.log(sum(math.exp(v) for v in [1.0, 3.0, 2.0, 0.0]))
    assert chosen.token_id == 0 and chosen.logprob == pytest.approx(1.0 - log_total, abs=1e-6)
    assert [t.token_id for t in top] == [1, 2]
    assert top[0].logprob == pytest.approx(3.0 - log_total, abs=1e-6)


def test_post_sampling_probs_after_chain():
    params = SamplingParams(top_k=2, top_p=1.0, min_p=0.0, temperature=1.0, post_sampling_probs=True, seed=7)
    sampler = Sampler(params, 4)
    sampler.sample(np.log(np.array([0.1, 0.6, 0.2, 0.1], np.float32)))
    chosen, top = sampler.last_logprobs(5)
    assert [t.token_id for t in top] == [1, 2]
    assert [round(t.prob, 4) for t in top] == [0.75, 0.25]


def test_mirostat_v2_truncates_and_updates_mu():
    params = SamplingParams(mirostat=2, mirostat_tau=0.75, mirostat_eta=0.1, temperature=1.0, seed=11)
    sampler = Sampler(params, 3)
    assert sampler.mirostat_mu == 1.5  # starts at 2 * tau
    logits = np.log(np.array([0.5, 0.25, 0.25], np.float32))
    # surprise 1 bit <= 1.5 keeps token 0 only; mu -= eta * (surprise(after renorm) = 0 - tau)
    assert sampler.sample(logits) == 0
    assert sampler.mirostat_mu == pytest.approx(1.5 + 0.1 * 0.75)


def test_mirostat_v1_updates_mu_from_observed_surprise():
    params = SamplingParams(mirostat=1, mirostat_tau=5.0, mirostat_eta=0.1, temperature=1.0,
                            seed=11, post_sampling_probs=True)
    sampler = Sampler(params, 200)
    logits = -np.arange(200, dtype=np.float32) * 0.5
    sampler.sample(logits)
    chosen, _ = sampler.last_logprobs(1)
    surprise = -chosen.logprob / math.log(2)
    assert sampler.mirostat_mu == pytest.approx(10.0 - 0.1 * (surprise - 5.0), rel=1e-5)


def test_sample_rejects_wrong_logits_size():
    with pytest.raises(ValueError):
        Sampler(SamplingParams(), 10).sample(np.zeros(5, np.float32))


def test_dist_walks_candidates_in_llama_cpp_order():
    # seed 5489: the first uniform double is ~0.1355 (high word 581869302 / 2^32)
    logits = np.log(np.array([0.1, 0.2, 0.7], np.float32))
    unsorted = SamplingParams(seed=5489, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    # vocab order: cumulative 0.1, 0.3, 1.0 -> 0.1355 falls on token 1
    assert Sampler(unsorted, 3).sample(logits) == 1
    # top_k sorts first: cumulative 0.7, 0.9, 1.0 -> token 2
    assert Sampler(SamplingParams(seed=5489, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0), 3).sample(logits) == 2


def test_dynamic_temperature_follows_entropy():
    # uniform logits: normalised entropy 1 -> temperature = temp + range; peaked: close to temp - range
    flat = S.temperature_ext(cands([0.0, 0.0, 0.0, 0.0]), 1.0, 0.5, 1.0)
    np.testing.assert_allclose(flat.probs, [0.25] * 4, rtol=1e-6)
    peaked = S.temperature_ext(cands([10.0, 0.0, 0.0, 0.0]), 1.0, 0.5, 1.0)
    # entropy of the softmax ~0.0014 nats of max ln 4 -> temperature ~0.5: logit 10 -> ~20
    assert peaked.logits[0] == pytest.approx(10.0 / (0.5 + 1.0 * (0.0014 / math.log(4))), rel=1e-2)


def test_top_order_with_live_positions_matches_plain_selection():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(5000).astype(np.float32)
    live = np.flatnonzero(rng.random(5000) < 0.01)
    masked = np.full(5000, -np.inf, np.float32)
    masked[live] = logits[live]
    assert S.top_order(masked, 20, live).tolist() == S.top_order(masked, 20).tolist()
    few = live[:5]
    only_few = np.full(5000, -np.inf, np.float32)
    only_few[few] = logits[few]
    got = S.top_order(only_few, 20, few)
    assert got[:5].tolist() == S.top_order(only_few, 5).tolist() and len(set(got.tolist())) == 20


def test_dist_draws_once_even_when_one_candidate_is_left():
    """llama.cpp's dist draws with a single candidate too, so the seeded stream after such a step
    (min_p leaving one token, say) stays aligned with llama.cpp's."""
    draws = []

    def draw() -> float:
        draws.append(1)
        return 0.5

    one = S.Candidates(np.array([7], np.int32), np.array([1.0], np.float32), None, True, False)
    c, pos = S.dist_select(one, draw)
    assert pos == 0 and c.probs.tolist() == [1.0] and len(draws) == 1
