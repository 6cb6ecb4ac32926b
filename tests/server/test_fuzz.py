"""Property test: whatever JSON a client sends to any endpoint, the answer is a success or a 4xx /
501 / 503 with the OpenAI envelope, never a 500, and the server keeps answering.

Bodies are valid requests with one field replaced by arbitrary JSON, and arbitrary JSON objects
using the endpoints' own field names, so the fuzzing reaches past the first validation step.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.fake_engine import FakeEngine
from tests.server.helpers import CHAT, fake_client

VALID = {
    "/completion": {"prompt": "Hi", "n_predict": 2},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": CHAT, "max_tokens": 2},
    "/infill": {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 2},
    "/tokenize": {"content": "Hi"},
    "/detokenize": {"tokens": [72, 105]},
    "/apply-template": {"messages": CHAT},
    "/embedding": {"content": "Hi"},
    "/v1/embeddings": {"input": "Hi"},
}
FIELDS = sorted({
    "prompt", "n_predict", "max_tokens", "messages", "stream", "temperature", "top_k", "top_p", "min_p",
    "seed", "stop", "logit_bias", "samplers", "grammar", "json_schema", "response_format", "n", "n_probs",
    "logprobs", "top_logprobs", "dry_multiplier", "dry_sequence_breakers", "tools", "tool_choice", "id_slot",
    "cache_prompt", "tokens", "content", "input", "with_pieces", "input_prefix", "input_suffix", "input_extra",
    "mirostat", "typical_p", "repeat_last_n", "ignore_eos", "add_special", "chat_template_kwargs",
})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6),
), max_leaves=30)


@st.composite
def bodies(draw):
    path = draw(st.sampled_from(sorted(VALID)))
    if draw(st.booleans()):
        body = dict(VALID[path])
        body[draw(st.sampled_from(FIELDS))] = draw(values)
    else:
        body = draw(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))
    return path, body


@pytest.fixture(scope="module")
def client():
    with fake_client(FakeEngine(), raise_server_exceptions=False, embeddings=True) as client:
        yield client


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(bodies())
def test_any_json_body_gets_an_answer_or_an_envelope_never_a_500(client, path_body):
    path, body = path_body
    raw = json.dumps(body, allow_nan=True)  # NaN / Infinity too, as a sloppy client would send them
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500 or r.status_code in (501, 503), (path, raw[:300], r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["code"] == r.status_code
    elif r.headers["content-type"].startswith("application/json"):
        r.json()  # a success is valid JSON (a stream is SSE)


def test_the_server_still_answers_after_the_fuzzing(client):
    assert client.get("/health").status_code == 200
    assert client.post("/completion", json=VALID["/completion"]).status_code == 200
