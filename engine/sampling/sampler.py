"""Per-request token sampling with llama.cpp's chain, defaults, RNG and probabilities.

`SamplingParams` mirrors llama.cpp's `common_params_sampling` (defaults included);
`Sampler` owns one request's state: the penalty/DRY history (prompt tokens are fed with
`accept`, like llama-server does), the grammar matcher, mirostat's mu, and its RNGs.

The chain follows `common_sampler_init`: logit_bias, then `samplers` in order (default
penalties; dry; top_n_sigma; top_k; typ_p; top_p; min_p; xtc; temperature), then `dist`.
`adaptive_p` is not a step in place: anywhere in `samplers`, it replaces the final `dist` (with
its own RNG and EMA state); `infill` needs the vocabulary: the `tokenizer` (pieces without
special tokens, EOT), or else `token_bytes` and `eog_ids` (an approximation, see _infill_setup).
With mirostat 1/2 the chain is logit_bias, temperature, mirostat. A grammar is checked after
sampling; only if the sampled token breaks it are the logits masked and the chain re-run
(llama.cpp's `common_sampler_sample`). RNGs are mt19937 seeded like llama.cpp's (`dist`,
`xtc`, `mirostat` each own one), so a seeded request draws the same numbers as llama.cpp;
seed -1 picks a random seed, and each Sampler owns its streams (no shared global RNG).

Grammars (and DRY's sequence breakers) need every token's bytes: pass `token_bytes` as a
`GrammarVocab` built once per tokenizer (a plain list works but costs seconds per request
at 150k tokens); requests with the same grammar text then share transitions and masks.
"""
from __future__ import annotations

import math
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ggserve.engine.sampling import samplers as S
from ggserve.engine.sampling import samplers_extra as SX
from ggserve.engine.grammar.masks import tables_for
from ggserve.engine.grammar.matcher import GrammarMatcher
from ggserve.engine.grammar.vocab import GrammarVocab
from ggserve.engine.sampling.penalty_history import DryBreakers, DryState, PenaltyWindow
from ggserve.engine.sampling.params import SamplingParams

__all__ = ["SamplingParams", "Sampler", "TokenLogprob", "MT19937Stream"]

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
MIROSTAT_M = 100
_INFILL_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # source -> (key, InfillVocab)


def infill_vocab(source: Any, n_vocab: int, blank: frozenset = frozenset()) -> SX.InfillVocab:
    """The InfillVocab of a tokenizer (its pieces without special tokens, as llama.cpp's infill
    reads them) or of token bytes (a GrammarVocab or list; the `blank` ids get empty pieces).
    Built once per source object while it lives (a plain list is rebuilt every time)."""
    key = (n_vocab, blank)
    try:
        cached = _INFILL_VOCABS.get(source)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    if hasattr(source, "token_to_piece"):
        n_tokens = min(int(getattr(source, "n_vocab", n_vocab)), n_vocab)
        pieces = [bytes(source.token_to_piece(i, special=False)) for i in range(n_tokens)]
    else:
        pieces = [bytes(b) for b in (source.token_bytes if isinstance(source, GrammarVocab) else source)][:n_vocab]
        pieces = [b"" if i in blank else piece for i, piece in enumerate(pieces)]
    vocab = SX.InfillVocab.from_pieces(pieces + [b""] * (n_vocab - len(pieces)))
    try:
        _INFILL_VOCABS[source] = (key, vocab)
    except TypeError:
        pass
    return vocab


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


class MT19937Stream:
    """std::mt19937 seeded like C++ (init_genrand), with libstdc++'s canonical draws."""

    def __init__(self, seed: int):
        key = np.random.RandomState(seed & 0xFFFFFFFF).get_state()  # legacy init == init_genrand
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key[1], "pos": key[2]}}

    def f64(self) -> float:
        """uniform_real_distribution<double>(0, 1): two 32-bit words, low word first."""
        low, high = self._bits.random_raw(2).tolist()
        value = (float(low) + float(high) * 4294967296.0) / 18446744073709551616.0
        return value if value < 1.0 else math.nextafter(1.0, 0.0)

    def f32(self) -> float:
        """uniform_real_distribution<float>(0, 1): one 32-bit word, float arithmetic."""
        value = np.float32(self._bits.random_raw()) / np.float32(4294967296.0)
        return float(value) if value < 1.0 else float(np.nextafter(np.float32(1.0), np.float32(0.0)))


class Sampler:
    """One request's sampler: `sample(logits)` picks a token and records it."""

    def __init__(self, params: SamplingParams, n_vocab: int, eog_ids: frozenset = frozenset(),
                 token_bytes: list[bytes] | GrammarVocab | None = None, *, n_ctx: int | None = None,
                 tokenizer: Any = None):
        self.params, self.n_vocab = params, n_vocab
        self.eog_ids = frozenset(eog_ids)
        seed = params.seed & 0xFFFFFFFF
        self.seed = secrets.randbits(32) if seed == LLAMA_DEFAULT_SEED else seed
        while self.seed == LLAMA_DEFAULT_SEED:
            self.seed = secrets.randbits(32)
        self._dist_rng = MT19937Stream(self.seed)
        self._xtc_rng = MT19937Stream(self.seed)
        self._mirostat_rng = MT19937Stream(self.seed)
        self.mirostat_mu = 2.0 * params.mirostat_tau
        # adaptive-p (selects instead of dist): float32 EMA state, and the token last selected
        # with its pre-transform probability, folded into the EMA when that token is accepted
        self.adaptive_p = params.mirostat == 0 and "adaptive_p" in params.samplers
        self._adaptive_rng = MT19937Stream(self.seed)
        self.adaptive_decay, self.adaptive_weighted_sum, self.adaptive_total_weight = SX.adaptive_p_init(
            params.adaptive_target, params.adaptive_decay)
        self._adaptive_pending: tuple[int, np.float32] | None = None
        self._infill = None
        if params.mirostat == 0 and "infill" in params.samplers:
            self._infill = self._infill_setup(tokenizer, token_bytes)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._vocab = token_bytes if isinstance(token_bytes, GrammarVocab) else None
        context = n_ctx if n_ctx is not None else 1 << 30
        last_n = params.repeat_last_n if params.repeat_last_n != -1 else context
        self.penalty_window = PenaltyWindow(last_n)
        self.dry = DryState(params.dry_multiplier, params.dry_base, params.dry_allowed_length,
                            params.dry_penalty_last_n, context)
        if self.dry.enabled and token_bytes is not None:
            self.dry.breakers = self._dry_breakers(token_bytes, tokenizer)
        self._bias_ids, self._bias_values = self._bias_arrays()
        self.grammar: GrammarMatcher | None = None
        if params.grammar:
            if token_bytes is None:
                raise ValueError("a grammar needs the vocabulary's token bytes (token_bytes=...)")
            vocab = self._vocab or GrammarVocab(list(token_bytes), self.eog_ids)
            self.grammar = GrammarMatcher(tables_for(vocab, params.grammar, params.parsed_grammar), vocab)
        self._raw_logits: np.ndarray | None = None
        self._final: S.Candidates | None = None
        self._selected = -1

    def _infill_setup(self, tokenizer, token_bytes) -> tuple[SX.InfillVocab, np.ndarray, int]:
        """(prefix relation, EOG mask, EOT id) for the infill sampler.

        With a tokenizer (what the engine passes) this is llama.cpp's: pieces without special
        tokens, EOT else EOS. Without one, `token_bytes` (special tokens rendered) stand in with
        the EOG tokens' pieces emptied (they are control tokens, empty in llama.cpp), and the
        lowest EOG id stands in for EOT.
        """
        eog = self.eog_ids | frozenset(getattr(tokenizer, "eog_ids", ()))
        eog = frozenset(t for t in eog if 0 <= t < self.n_vocab)
        is_eog = np.zeros(self.n_vocab, bool)
        is_eog[list(eog)] = True
        if tokenizer is not None:
            eot = getattr(tokenizer, "eot_id", None)
            eot = eot if eot is not None else getattr(tokenizer, "eos_id", None)
            if eot is None:
                raise ValueError("the infill sampler needs a vocabulary with an EOT or EOS token")
            return infill_vocab(tokenizer, self.n_vocab), is_eog, int(eot)
        if token_bytes is None or not eog:
            raise ValueError("the infill sampler needs the vocabulary: tokenizer=..., or token_bytes=... "
                             "and eog_ids=...")
        return infill_vocab(token_bytes, self.n_vocab, eog), is_eog, min(eog)

    def _dry_breakers(self, token_bytes, tokenizer) -> DryBreakers:
        """This request's DRY breakers: O(breaker characters) here, each token evaluated when
        DRY first looks it up (llama.cpp scans the whole vocabulary per breaker up front)."""
        pieces = token_bytes.token_bytes if isinstance(token_bytes, GrammarVocab) else token_bytes
        if not isinstance(pieces, (list, tuple)):
            pieces = list(pieces)
        encode = (lambda text: tokenizer.encode(text, add_special=False)) if tokenizer is not None else None
        return DryBreakers(self.params.dry_sequence_breakers, pieces, encode)

    def _bias_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(t, b) for t, b in self.params.logit_bias if 0 <= t < self.n_vocab]
        if self.params.ignore_eos:
            pairs += [(t, -math.inf) for t in sorted(self.eog_ids) if 0 <= t < self.n_vocab]
        ids = np.array([t for t, _ in pairs], np.int64)
        return ids, np.array([b for _, b in pairs], np.float32)

    # -- history ----------------------------------------------------------------------------
    def accept(self, token_id: int, accept_grammar: bool = False) -> None:
        """Feeds a prompt/forced token into the penalty history (and optionally the grammar)."""
        if accept_grammar and self.grammar is not None:
            self.grammar.accept_token(token_id)
        self.penalty_window.accept(token_id)
        self.dry.accept(token_id)
        if self.adaptive_p:
            pending, self._adaptive_pending = self._adaptive_pending, None
            if pending is not None and pending[0] == token_id:
                self.adaptive_weighted_sum, self.adaptive_total_weight = SX.adaptive_p_update(
                    pending[1], self.adaptive_decay, self.adaptive_weighted_sum, self.adaptive_total_weight)

    # -- the chain --------------------------------------------------------------------------
    def _step(self, name: str, c: S.Candidates) -> S.Candidates:
        p = self.params
        if name == "penalties":
            ids, counts = self.penalty_window.arrays()
            return S.penalties(c, ids, counts, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        if name == "dry":
            ids, values = self.dry.penalties()
            if ids.shape[0]:
                c = S.logit_bias(c, ids, -values)
                c.sorted = False
            return c
        if name == "top_n_sigma":
            return S.top_n_sigma(c, p.top_n_sigma)
        if name == "top_k":
            return S.top_k(c, p.top_k)
        if name == "typ_p":
            return S.typical(c, p.typical_p, p.min_keep)
        if name == "top_p":
            return S.top_p(c, p.top_p, p.min_keep)
        if name == "min_p":
            return S.min_p(c, p.min_p, p.min_keep)
        if name == "xtc":
            return S.xtc(c, p.xtc_probability, p.xtc_threshold, p.min_keep, self._xtc_rng.f32)
        if name == "temperature":
            return S.temperature_ext(c, p.temperature, p.dynatemp_range, p.dynatemp_exponent)
        if name == "infill":
            return SX.infill(c, *self._infill)
        if name == "adaptive_p":
            return c  # not applied in place: it replaces dist at the end of the chain (_run_chain)
        raise ValueError(f"unknown sampler {name!r}")

    def _run_chain(self, logits: np.ndarray, mask: np.ndarray | None) -> tuple[S.Candidates, int]:
        """Runs logit_bias + samplers + selection; returns (final candidates, selected position)."""
        c = S.Candidates(self._ids, np.array(logits, dtype=np.float32, copy=True), None, False, True)
        if mask is not None:
            c.logits[~mask] = S.NEG_INF
            c.live = np.flatnonzero(mask)
        if self._bias_ids.shape[0]:
            c = S.logit_bias(c, self._bias_ids, self._bias_values)
        p = self.params
        if p.mirostat == 0:
            for name in p.samplers:
                c = self._step(name, c)
            if self.adaptive_p:
                c, idx, original_p = SX.adaptive_p(c, p.adaptive_target, self.adaptive_weighted_sum,
                                                   self.adaptive_total_weight, self._adaptive_rng.f64)
                self._adaptive_pending = None if original_p is None else (int(c.ids[idx]), original_p)
                return c, idx
            return S.dist_select(c, self._dist_rng.f64)
        c = S.temperature(c, p.temperature)
        if p.mirostat == 1:
            c, idx, self.mirostat_mu = S.mirostat_v1(c, self.mirostat_mu, p.mirostat_tau, p.mirostat_eta,
                                                     MIROSTAT_M, self.n_vocab, self._mirostat_rng.f64)
        else:
            c, idx, self.mirostat_mu = S.mirostat_v2(c, self.mirostat_mu, p.mirostat_tau, p.mirostat_eta,
                                                     self._mirostat_rng.f64)
        return c, idx

    def sample(self, logits: np.ndarray) -> int:
        """Picks the next token from logits (n_vocab,) and records it (history + grammar)."""
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if logits.shape[0] != self.n_vocab:
            raise ValueError(f"expected {self.n_vocab} logits, got {logits.shape[0]}")
        self._raw_logits = logits.copy()
        c, pos = self._run_chain(logits, None)
        token_id = int(c.ids[pos])
        if self.grammar is not None and not self.grammar.token_allowed(token_id):
            mask = self.grammar.allowed_mask()
            if not mask.any():
                from ggserve.engine.grammar.gbnf import GrammarError
                raise GrammarError("the grammar allows no further token")
            c, pos = self._run_chain(logits, mask)
            token_id = int(c.ids[pos])
        self._final, self._selected = c, pos
        self.accept(token_id, accept_grammar=True)
        return token_id

    # -- probabilities ----------------------------------------------------------------------
    def last_logprobs(self, n: int) -> tuple[TokenLogprob, list[TokenLogprob]]:
        """(chosen token, top n) for the last `sample` call, as log-probabilities.

        Default (llama.cpp's n_probs): softmax of the raw model logits over the whole
        vocabulary, before bias, penalties or grammar. With `post_sampling_probs`: the
        probabilities of the final candidates after the chain (zero-probability ones dropped).
        """
        if self._raw_logits is None or self._final is None:
            raise RuntimeError("last_logprobs() needs a previous sample() call")
        chosen_id = int(self._final.ids[self._selected])
        if self.params.post_sampling_probs:
            c = self._final
            probs = c.probs if c.probs is not None else np.zeros(c.size, np.float32)
            order = np.argsort(-probs, kind="stable")
            order = order[probs[order] > 0][:max(n, 0)]
            with np.errstate(divide="ignore"):
                chosen = TokenLogprob(chosen_id, float(np.log(probs[self._selected])))
                top = [TokenLogprob(int(c.ids[i]), float(np.log(probs[i]))) for i in order]
            return chosen, top
        raw = self._raw_logits
        max_logit = float(raw.max())
        with np.errstate(under="ignore"):
            log_total = max_logit + math.log(float(np.exp(raw - np.float32(max_logit)).sum(dtype=np.float64)))
        chosen = TokenLogprob(chosen_id, float(raw[chosen_id]) - log_total)
        order = S.top_order(raw, min(n, self.n_vocab)).tolist() if n > 0 else []
        return chosen, [TokenLogprob(int(i), float(raw[i]) - log_total) for i in order]


def make_sampler(params: SamplingParams | dict, n_vocab: int, **kwargs: Any) -> Sampler:
    """Convenience: builds a Sampler from params or a dict of SamplingParams fields."""
    if isinstance(params, dict):
        params = SamplingParams(**params)
    return Sampler(params, n_vocab, **kwargs)

