"""The server and the engine agree: one sampler-name table, one logit_bias normaliser, and the
server reading the engine's typed statistics (a renamed EngineStats field fails here)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ggserve.engine import EngineStats, Sampler, SamplingParams
from tests.server.fake_engine import FakeEngine
from tests.server.helpers import fake_client

# What llama.cpp's common_sampler_types_from_names accepts (common/sampling.cpp, case-insensitive):
# the canonical names, their kebab-case and no-underscore forms, and nucleus / temp / typ.
LLAMA_CPP_NAMES = {
    "dry": "dry", "top_k": "top_k", "top-k": "top_k", "topk": "top_k", "top_p": "top_p", "top-p": "top_p",
    "topp": "top_p", "nucleus": "top_p", "top_n_sigma": "top_n_sigma", "top-n-sigma": "top_n_sigma",
    "topnsigma": "top_n_sigma", "typ_p": "typ_p", "typ-p": "typ_p", "typp": "typ_p", "typ": "typ_p",
    "min_p": "min_p", "min-p": "min_p", "minp": "min_p", "temperature": "temperature", "temp": "temperature",
    "xtc": "xtc", "infill": "infill", "penalties": "penalties", "adaptive_p": "adaptive_p",
    "adaptive-p": "adaptive_p", "adaptivep": "adaptive_p",
    "TOP_K": "top_k", "Top-P": "top_p", "Temp": "temperature", "XTC": "xtc",  # names are lower-cased first
}
# ... and what it does not (it skips them with a warning; ggserve refuses them with a 400)
NOT_LLAMA_CPP_NAMES = ["typical_p", "typical-p", "typical", "top_a", "mirostat", "greedy", "dist", "", " top_k",
                       "top__k", "tfs_z", "logit_bias"]
# common_sampler_types_from_chars: one case-sensitive letter per sampler
LLAMA_CPP_LETTERS = {"d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma", "m": "min_p",
                     "t": "temperature", "x": "xtc", "i": "infill", "e": "penalties", "a": "adaptive_p"}
NOT_LLAMA_CPP_LETTERS = ["K", "T", "z", "1", " ", "-", "_"]


def _engine_accepts(samplers) -> tuple[str, ...] | None:
    try:
        return SamplingParams(samplers=samplers).samplers
    except ValueError:
        return None


def _http_accepts(client, samplers) -> bool:
    r = client.post("/completion", json={"prompt": "Hi", "n_predict": 1, "samplers": samplers})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "samplers"
    return r.status_code == 200


def test_http_and_engine_accept_exactly_llama_cpps_sampler_names():
    with fake_client() as client:
        for name, canonical in LLAMA_CPP_NAMES.items():
            assert _engine_accepts([name]) == (canonical,), name
            assert _http_accepts(client, [name]), name
        for name in NOT_LLAMA_CPP_NAMES:
            assert _engine_accepts([name]) is None, name
            assert not _http_accepts(client, [name]), name


def test_http_and_engine_accept_exactly_llama_cpps_sampler_letters():
    with fake_client() as client:
        for letter, canonical in LLAMA_CPP_LETTERS.items():
            assert _engine_accepts(letter) == (canonical,), letter
            assert _http_accepts(client, letter), letter
        for letter in NOT_LLAMA_CPP_LETTERS:
            assert _engine_accepts(letter) is None and not _http_accepts(client, letter), letter
        full = "edskypmxt"  # llama.cpp's default chain, as its --sampling-seq
        assert _engine_accepts(full) == tuple(LLAMA_CPP_LETTERS[c] for c in full)
        body = client.post("/completion", json={"prompt": "Hi", "n_predict": 1, "samplers": "kpt"}).json()
        assert body["generation_settings"]["samplers"] == ["top_k", "top_p", "temperature"]


@pytest.mark.parametrize("name", sorted(set(LLAMA_CPP_NAMES.values())))
def test_every_accepted_sampler_runs_in_the_engine(name):
    """Accepting a name is a promise: the chain really runs it (no unknown-sampler error later)."""
    n_vocab = 64
    pieces = [bytes([97 + i % 26]) * (1 + i // 26) for i in range(n_vocab)]
    sampler = Sampler(SamplingParams(samplers=[name], seed=7), n_vocab, eog_ids=frozenset({n_vocab - 1}),
                      token_bytes=pieces)
    logits = np.random.default_rng(0).normal(size=n_vocab).astype(np.float32)
    for _ in range(3):
        assert 0 <= sampler.sample(logits) < n_vocab


# ---- logit_bias: llama-server's rules, one normaliser for both ----------------------------------


def test_logit_bias_shapes_follow_llama_server():
    engine = FakeEngine()
    tok = engine.tokenizer
    text_ids = tok.encode("Hi", add_special=False)
    cases = [
        ({"5": 2.0, "Hi": -1, "6": False, "7": True, "9999999": 1.0, "-3": 1.0}, [(5, 2.0)] + [(t, -1.0) for t in text_ids]
         + [(6, -math.inf)]),
        ([[5, 2.0], ["Hi", False], [5.5, 1.0], [None, 1.0], [8], [9999999, 3.0], [7, True]],
         [(5, 2.0)] + [(t, -math.inf) for t in text_ids]),
        ({" 12": 1.5, "+13": 0.5}, [(12, 1.5), (13, 0.5)]),  # strtol: leading space and sign
    ]
    with fake_client(engine) as client:
        for field, expected in cases:
            r = client.post("/completion", json={"prompt": "x", "n_predict": 1, "logit_bias": field})
            assert r.status_code == 200, (field, r.text)
            assert list(engine.requests[-1].params.sampling.logit_bias) == expected, field
            echoed = r.json()["generation_settings"]["logit_bias"]
            assert echoed == [{"token": t, "bias": b if math.isfinite(b) else None} for t, b in expected]
        assert client.post("/completion", json={"prompt": "x", "logit_bias": 5}).status_code == 400


def test_the_engine_takes_the_same_logit_bias_shapes_without_a_tokenizer():
    assert SamplingParams(logit_bias={"5": 2.0, "6": False}).logit_bias == ((5, 2.0), (6, -math.inf))
    assert SamplingParams(logit_bias=[[5, 2.0], [5.5, 1.0]]).logit_bias == ((5, 2.0),)
    with pytest.raises(ValueError, match="tokenizer"):
        SamplingParams(logit_bias={"Hello": 1.0})


# ---- statistics: the server reads EngineStats itself --------------------------------------------


def test_metrics_and_slots_report_the_engines_own_statistics():
    engine = FakeEngine(n_slots=3)
    engine.n_deferred, engine.n_cached = 4, 17
    with fake_client(engine, endpoint_metrics=True, endpoint_slots=True) as client:
        client.post("/completion", json={"prompt": "Hello", "n_predict": 3})
        stats = engine.stats()
        metrics = client.get("/metrics").text
        slots = client.get("/slots").json()
    expected = {
        "llamacpp:requests_deferred": 4.0,
        "llamacpp:kv_cache_tokens": float(stats.kv_used_cells),
        "llamacpp:kv_cache_usage_ratio": stats.kv_used_cells / stats.kv_total_cells,
        "llamacpp:prompt_tokens_total": float(stats.n_prompt_tokens_processed_total),
        "llamacpp:tokens_predicted_total": float(stats.n_tokens_predicted_total),
        "llamacpp:n_decode_total": float(stats.n_decode_total),
        "llamacpp:prompt_seconds_total": stats.t_prompt_processing_total_ms / 1e3,
    }
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    for name, value in expected.items():
        assert values[name] == pytest.approx(value), name
    assert stats.n_prompt_tokens_processed_total == 6 and stats.n_tokens_predicted_total == 3
    assert [s["n_cached_tokens"] for s in slots] == [17, 17, 17]


def test_every_engine_stats_field_is_one_the_fake_engine_sets():
    """The fake builds EngineStats by keyword: renaming a field breaks it and every server test
    above, instead of letting /metrics report a default."""
    built = FakeEngine().stats()
    assert isinstance(built, EngineStats)
    defaults = {f.name for f in dataclasses.fields(EngineStats)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert defaults == {"ttft_seconds", "inter_token_seconds"}
