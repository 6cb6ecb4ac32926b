"""Client mistakes become 4xx OpenAI envelopes (never a 500, never a traceback), auth, CORS,
busy engine -> 503, unexpected errors -> 500 without details."""
from __future__ import annotations

import json
import os

import pytest

from tests.server.fake_engine import FakeEngine
from tests.server.helpers import CHAT, fake_client

LONG_PROMPT = " ".join(["word"] * 20_000)
CHAT_URL = "/v1/chat/completions"

BAD_REQUESTS = [
    # (id, path, body: str (raw) or JSON-able, expected status)
    ("non-json body", "/completion", "this is not json", 400),
    ("empty body", "/completion", "", 400),
    ("json array body", "/completion", [1, 2], 400),
    ("truncated json", CHAT_URL, '{"messages": [', 400),
    ("20k-word prompt", "/completion", {"prompt": LONG_PROMPT}, 400),
    ("20k-word chat message", CHAT_URL, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400),
    ("20k-word stream prompt", CHAT_URL,
     {"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True}, 400),
    ("detokenize negative id", "/detokenize", {"tokens": [-7]}, 400),
    ("detokenize out of vocab", "/detokenize", {"tokens": [10**6]}, 400),
    ("detokenize tokens not a list", "/detokenize", {"tokens": "abc"}, 400),
    ("tokenize content not a string", "/tokenize", {"content": 123}, 400),
    ("tokenize without content", "/tokenize", {}, 400),
    ("negative max_tokens", CHAT_URL, {"messages": CHAT, "max_tokens": -5}, 400),
    ("negative max_tokens stream", CHAT_URL, {"messages": CHAT, "max_tokens": -5, "stream": True}, 400),
    ("temperature -1", CHAT_URL, {"messages": CHAT, "temperature": -1}, 400),
    ("top_p 2", CHAT_URL, {"messages": CHAT, "top_p": 2}, 400),
    ("top_logprobs 25", CHAT_URL, {"messages": CHAT, "logprobs": True, "top_logprobs": 25}, 400),
    ("top_logprobs without logprobs", CHAT_URL, {"messages": CHAT, "top_logprobs": 2}, 400),
    ("unknown response_format", CHAT_URL, {"messages": CHAT, "response_format": {"type": "xml"}}, 400),
    ("prompt token id out of vocab", "/completion", {"prompt": [1, 99999]}, 400),
    ("prompt negative token id", "/completion", {"prompt": [-1, 5]}, 400),
    ("prompt is an object", "/completion", {"prompt": {"a": 1}}, 400),
    ("prompt list of bools", "/completion", {"prompt": [True, False]}, 400),
    ("legacy prompt bad id", "/v1/completions", {"prompt": [3, 500]}, 400),
    ("legacy logprobs 30", "/v1/completions", {"prompt": "hi", "logprobs": 30}, 400),
    ("empty messages", CHAT_URL, {"messages": []}, 400),
    ("missing messages", CHAT_URL, {"model": "x"}, 400),
    ("messages is a string", CHAT_URL, {"messages": "hello"}, 400),
    ("message without role", CHAT_URL, {"messages": [{"content": "hi"}]}, 400),
    ("image content part", CHAT_URL,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("n_predict not a number", "/completion", {"prompt": "hi", "n_predict": "abc"}, 400),
    ("stop is a number", "/completion", {"prompt": "hi", "stop": 5}, 400),
    ("id_slot beyond slots", "/completion", {"prompt": "hi", "id_slot": 7}, 400),
    ("logit_bias not an object or array", "/completion", {"prompt": "hi", "logit_bias": "five"}, 400),
    ("unknown sampler", "/completion", {"prompt": "hi", "samplers": ["bogus"]}, 400),
    ("mirostat 3", "/completion", {"prompt": "hi", "mirostat": 3}, 400),
    ("repeat_last_n -2", "/completion", {"prompt": "hi", "repeat_last_n": -2}, 400),
    ("n = 0", CHAT_URL, {"messages": CHAT, "n": 0}, 400),
    ("n above the limit", CHAT_URL, {"messages": CHAT, "n": 129}, 400),
    ("malformed grammar", "/completion", {"prompt": "hi", "grammar": "root ::= (", "stream": True}, 400),
    ("invalid json_schema", "/completion", {"prompt": "hi", "json_schema": {"type": "bogus"}}, 400),
    ("response_format bad schema", CHAT_URL,
     {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}, 400),
    ("grammar and json_schema", "/completion", {"prompt": "hi", "grammar": "root ::= \"a\"", "json_schema": {}}, 400),
    ("infill chunk without text", "/infill", {"input_prefix": "a", "input_extra": [{"filename": "x"}]}, 400),
    ("apply-template bad messages", "/apply-template", {"messages": [{"role": 5}]}, 400),
    ("embeddings empty input", "/v1/embeddings", {"input": []}, 400),
    ("embeddings missing input", "/v1/embeddings", {"model": "x"}, 400),
    ("slot save with ..", "/slots/0?action=save", {"filename": "../escape.bin"}, 400),
    ("slot save absolute path", "/slots/0?action=save", {"filename": "/etc/passwd"}, 400),
    ("slot restore missing file", "/slots/0?action=restore", {"filename": "nope.bin"}, 400),
    ("slot unknown action", "/slots/0?action=explode", {"filename": "a.bin"}, 400),
    ("slot id out of range", "/slots/9?action=erase", {}, 400),
    ("unknown endpoint", "/v2/unknown", {"x": 1}, 404),
]


def _assert_envelope(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == status and isinstance(error["type"], str)
    assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.fixture(scope="module")
def error_client(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("slots")
    with fake_client(embeddings=True, slot_save_path=str(save_dir)) as client:
        yield client


@pytest.mark.parametrize("name,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_an_envelope(error_client, name, path, body, status):
    if isinstance(body, str):
        r = error_client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = error_client.post(path, json=body)
    _assert_envelope(r, status)
    # the server is still healthy and serving after every bad request
    assert error_client.get("/health").json() == {"status": "ok"}
    ok = error_client.post("/completion", json={"prompt": "Hi", "n_predict": 2})
    assert ok.status_code == 200 and ok.json()["content"] == "He"


def test_context_error_type_and_no_generation_started(error_client):
    n_before = len(error_client.engine.requests)
    r = error_client.post(CHAT_URL, json={"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True})
    assert r.json()["error"]["type"] == "exceed_context_size_error"
    assert r.headers["content-type"].startswith("application/json")  # not a half-started stream
    assert len(error_client.engine.requests) == n_before


def test_wrong_method_is_an_envelope(error_client):
    _assert_envelope(error_client.get("/completion"), 405)


def test_slot_symlink_out_of_directory(tmp_path):
    save_dir, outside = tmp_path / "slots", tmp_path / "outside"
    save_dir.mkdir()
    outside.mkdir()
    os.symlink(outside, save_dir / "link")
    with fake_client(slot_save_path=str(save_dir)) as client:
        _assert_envelope(client.post("/slots/0?action=save", json={"filename": "link/x.bin"}), 400)
        assert client.post("/slots/0?action=save", json={"filename": "ok.bin"}).status_code == 200
    assert not (outside / "x.bin").exists()


# ---- auth ---------------------------------------------------------------------------------------


def test_api_key_required_except_public_endpoints():
    with fake_client(api_keys=("k1", "secret")) as client:
        for path, body in (("/completion", {"prompt": "Hi", "n_predict": 1}), (CHAT_URL, {"messages": CHAT})):
            _assert_envelope(client.post(path, json=body), 401)
            r = client.post(path, json=body, headers={"Authorization": "Bearer wrong"})
            _assert_envelope(r, 401)
            assert r.json()["error"]["type"] == "authentication_error"
            assert client.post(path, json=body, headers={"Authorization": "Bearer secret"}).status_code == 200
            assert client.post(path, json=body, headers={"X-Api-Key": "k1"}).status_code == 200
        _assert_envelope(client.get("/props"), 401)
        _assert_envelope(client.post("/tokenize", json={"content": "a"}), 401)
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 200
        assert client.get("/").status_code == 200


# ---- CORS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["tauri://localhost", "http://localhost:1420", "https://example.com"])
def test_cors_preflight_any_origin(origin):
    with fake_client(api_keys=("secret",)) as client:
        r = client.options(CHAT_URL, headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-api-key",
        })
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
        allowed = r.headers["access-control-allow-headers"].lower()
        for header in ("authorization", "content-type", "x-api-key"):
            assert header in allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        # actual requests (even a 401) carry the CORS header so the browser can read the error
        denied = client.post(CHAT_URL, json={"messages": CHAT}, headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin


# ---- busy / unexpected --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_busy_engine_is_503_with_retry_after(stream):
    with fake_client(FakeEngine(busy=True)) as client:
        r = client.post(CHAT_URL, json={"messages": CHAT, "stream": stream})
    _assert_envelope(r, 503)
    assert r.headers["retry-after"] == "1"


class ExplodingEngine(FakeEngine):
    def generate(self, prompt_ids, params, request_id=None):
        raise RuntimeError("secret internal detail")


def test_unexpected_error_is_500_without_details():
    with fake_client(ExplodingEngine(), raise_server_exceptions=False) as client:
        r = client.post(CHAT_URL, json={"messages": CHAT})
        _assert_envelope(r, 500)
        assert "secret internal detail" not in r.text
        assert client.get("/health").json() == {"status": "ok"}


def test_unknown_fields_are_ignored():
    with fake_client() as client:
        r = client.post(CHAT_URL, json={"messages": CHAT, "max_tokens": 2, "frobnicate": {"x": 1},
                                        "user": "u", "metadata": {"a": "b"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "He"


def test_error_body_is_json_even_for_non_ascii():
    with fake_client() as client:
        r = client.post("/completion", content="{\"prompt\": \"é\"".encode(), headers={"content-type": "text/plain"})
    _assert_envelope(r, 400)
    json.loads(r.text)
