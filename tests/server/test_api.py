"""Every endpoint's response shape and meaning, against the fake engine (no model needed)."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest

import ggserve.server.app as app_module
from ggserve.server.settings import ServerSettings
from starlette.testclient import TestClient
from tests.server.fake_engine import BOS, CHATML, FIM_MID, FIM_PRE, FIM_REP, FIM_SEP, FIM_SUF, FakeEngine
from tests.server.helpers import CHAT, fake_client, sse_events, sse_json

REPLY = "Hello world! I am a fake model."


# ---- native /completion -------------------------------------------------------------------------


def test_completion_shape_and_length_limit():
    with fake_client() as client:
        body = client.post("/completion", json={"prompt": "Hi", "n_predict": 5}).json()
    assert body["content"] == REPLY[:5]
    assert body["stop"] is True and body["stop_type"] == "limit" and body["stopping_word"] == ""
    assert body["tokens_predicted"] == 5
    assert body["tokens_evaluated"] == 3  # BOS + "H" + "i"
    assert body["model"] == "fake-model.gguf"
    assert body["generation_settings"]["n_predict"] == 5
    assert body["truncated"] is False and body["id_slot"] >= 0
    t = body["timings"]
    assert t["prompt_n"] == 3 and t["predicted_n"] == 5
    assert t["predicted_per_second"] == pytest.approx(1e3 * 5 / t["predicted_ms"])
    assert t["prompt_per_token_ms"] == pytest.approx(t["prompt_ms"] / 3)
    assert "completion_probabilities" not in body


def test_completion_eos_stop_word_and_return_tokens():
    with fake_client() as client:
        full = client.post("/completion", json={"prompt": "Hi", "return_tokens": True}).json()
        worded = client.post("/completion", json={"prompt": "Hi", "stop": ["world"]}).json()
        aliases = client.post("/completions", json={"prompt": "Hi", "stop": "I am", "max_tokens": 100}).json()
    assert full["content"] == REPLY and full["stop_type"] == "eos"
    assert full["tokens"] == list(REPLY.encode())
    assert worded["content"] == "Hello " and worded["stop_type"] == "word" and worded["stopping_word"] == "world"
    assert aliases["content"] == "Hello world! "


def test_completion_prompt_forms_reach_the_engine_as_ids():
    engine = FakeEngine()
    with fake_client(engine) as client:
        client.post("/completion", json={"prompt": [72, 105], "n_predict": 1})
        client.post("/completion", json={"prompt": ["ab", 65, "c"], "n_predict": 1})
        multi = client.post("/completion", json={"prompt": ["x", "yz"], "n_predict": 2}).json()
    assert engine.requests[0].prompt_ids == [72, 105]
    # mixed: special tokens only for the first text piece, ids kept as given
    assert engine.requests[1].prompt_ids == [BOS, 97, 98, 65, 99]
    assert [r.prompt_ids for r in engine.requests[2:]] == [[BOS, 120], [BOS, 121, 122]]
    assert isinstance(multi, list) and [m["index"] for m in multi] == [0, 1]
    assert all(m["content"] == "He" for m in multi)


def test_completion_probabilities():
    with fake_client() as client:
        body = client.post("/completion", json={"prompt": "Hi", "n_predict": 2, "n_probs": 3}).json()
    probs = body["completion_probabilities"]
    assert [p["token"] for p in probs] == ["H", "e"]
    assert probs[0]["id"] == ord("H") and probs[0]["bytes"] == [ord("H")]
    assert probs[0]["logprob"] == pytest.approx(-0.1)
    assert len(probs[0]["top_logprobs"]) == 3
    assert set(probs[0]["top_logprobs"][0]) == {"id", "token", "bytes", "logprob"}


def test_completion_stream():
    with fake_client() as client:
        r = client.post("/completion", json={"prompt": "Hi", "n_predict": 4, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert "[DONE]" not in events  # native stream has no terminator, as llama-server
    chunks = [json.loads(e) for e in events]
    assert [c["stop"] for c in chunks] == [False] * 4 + [True]
    assert "".join(c["content"] for c in chunks) == "Hell"
    final = chunks[-1]
    assert final["content"] == "" and final["tokens_predicted"] == 4 and final["stop_type"] == "limit"
    assert "timings" in final and "generation_settings" in final


def test_sampling_fields_reach_the_engine():
    engine = FakeEngine()
    with fake_client(engine, temperature=0.3) as client:
        client.post("/completion", json={
            "prompt": "Hi", "n_predict": 1, "top_k": 7, "top_p": 0.5, "min_p": 0.1, "seed": 42,
            "repeat_penalty": 1.1, "logit_bias": {"72": -5, "e": False}, "samplers": ["top_k", "temperature"],
            "stop": ["x"], "ignore_eos": True, "cache_prompt": False, "id_slot": 1, "unknown_field": [1, 2],
        })
        client.post("/completion", json={"prompt": "Hi", "max_tokens": 9})
        client.post("/completion", json={"prompt": "Hi", "max_tokens": 9, "n_predict": 3})
    p = engine.requests[0].params
    s = p.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed) == (0.3, 7, 0.5, 0.1, 42)
    assert s.repeat_penalty == pytest.approx(1.1)
    assert dict(s.logit_bias) == {72: -5.0, ord("e"): -np.inf}
    assert tuple(s.samplers) == ("top_k", "temperature")
    assert p.stop == ["x"] and p.ignore_eos and not p.cache_prompt and p.id_slot == 1
    assert engine.requests[1].params.max_tokens == 9
    assert engine.requests[2].params.max_tokens == 3  # n_predict wins over max_tokens


def test_json_constraints_become_a_grammar():
    engine = FakeEngine()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with fake_client(engine) as client:
        client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        })
        client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                  "response_format": {"type": "json_object"}})
        client.post("/completion", json={"prompt": "Hi", "n_predict": 1, "grammar": 'root ::= "yes"'})
        client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                  "response_format": {"type": "text"}})
    grammars = [r.params.sampling.grammar for r in engine.requests]
    assert '"\\"n\\""' in grammars[0] and "integer" in grammars[0]
    assert "root ::=" in grammars[1] and "object" in grammars[1]
    assert grammars[2] == 'root ::= "yes"'
    assert not grammars[3]


# ---- OpenAI chat --------------------------------------------------------------------------------


def test_chat_completion_shape():
    engine = FakeEngine()
    with fake_client(engine, alias="my-model") as client:
        body = client.post("/v1/chat/completions", json={"model": "x", "messages": CHAT}).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "my-model" and isinstance(body["created"], int) and body["system_fingerprint"]
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": REPLY}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    usage = body["usage"]
    assert usage["completion_tokens"] == len(REPLY)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert body["timings"]["predicted_n"] == len(REPLY)
    # the prompt is the chat template's rendering, tokenized with special tokens parsed
    prompt = engine.tokenizer.decode(engine.requests[0].prompt_ids)
    assert prompt == "<s><|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"


def test_chat_length_and_logprobs():
    with fake_client() as client:
        body = client.post("/chat/completions", json={
            "messages": CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
        }).json()
        no_top = client.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 1, "logprobs": True, "top_logprobs": 0,
        }).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "He"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert no_top["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_chat_native_n_probs_and_no_logprobs_by_default():
    with fake_client() as client:
        native = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "n_probs": 4}).json()
        plain = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}).json()
    assert [len(c["top_logprobs"]) for c in native["choices"][0]["logprobs"]["content"]] == [4, 4]
    assert plain["choices"][0]["logprobs"] is None


def test_chat_content_parts_and_tools_reach_the_template():
    engine = FakeEngine()
    with fake_client(engine) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "max_tokens": 1,
        })
    assert r.status_code == 200
    assert "user\na\nb<|im_end|>" in engine.tokenizer.decode(engine.requests[0].prompt_ids)


def test_chat_stream_chunk_order():
    with fake_client() as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True, "max_tokens": 3})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
    assert "".join(deltas) == "Hel"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in c for c in chunks)  # include_usage not asked for


def test_chat_stream_include_usage():
    with fake_client() as client:
        r = client.post("/v1/chat/completions", json={
            "messages": CHAT, "stream": True, "stream_options": {"include_usage": True},
        })
    chunks = sse_json(r.text)
    assert sse_events(r.text)[-1] == "[DONE]"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(REPLY)
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_chat_stream_logprobs_per_chunk():
    with fake_client() as client:
        r = client.post("/v1/chat/completions", json={
            "messages": CHAT, "stream": True, "max_tokens": 2, "logprobs": True, "top_logprobs": 1,
        })
    chunks = sse_json(r.text)
    with_lp = [c for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in with_lp] == ["H", "e"]


# ---- OpenAI legacy completions ------------------------------------------------------------------


def test_v1_completions():
    with fake_client() as client:
        body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 2}).json()
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == "Hel" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["H", "e", "l"] and choice["logprobs"]["text_offset"] == [0, 1, 2]
    assert len(choice["logprobs"]["top_logprobs"][0]) == 2
    assert body["usage"]["completion_tokens"] == 3
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "He"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


# ---- tokenizer endpoints ------------------------------------------------------------------------


def test_tokenize_detokenize_apply_template():
    with fake_client() as client:
        plain = client.post("/tokenize", json={"content": "a<s>"}).json()
        special = client.post("/tokenize", json={"content": "a<s>", "add_special": True, "parse_special": True}).json()
        literal = client.post("/tokenize", json={"content": "a<s>", "parse_special": False}).json()
        pieces = client.post("/tokenize", json={"content": "é", "with_pieces": True}).json()
        text = client.post("/detokenize", json={"tokens": [BOS, 104, 105]}).json()
        rendered = client.post("/apply-template", json={"messages": CHAT}).json()
    assert plain == {"tokens": [97, BOS]}  # parse_special defaults to true, add_special to false
    assert special == {"tokens": [BOS, 97, BOS]}
    assert literal == {"tokens": [97, 60, 115, 62]}
    # "é" is two bytes; each piece alone is not valid UTF-8, so it is given as bytes
    assert pieces == {"tokens": [{"id": 0xC3, "piece": [0xC3]}, {"id": 0xA9, "piece": [0xA9]}]}
    assert text == {"content": "<s>hi"}
    assert rendered == {"prompt": "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n"}


# ---- info endpoints -----------------------------------------------------------------------------


def test_health_models_props():
    with fake_client(alias="ggtest") as client:
        assert client.get("/health").json() == {"status": "ok"}
        models = client.get("/v1/models").json()
        assert client.get("/models").json()["data"][0]["id"] == "ggtest"
        props = client.get("/props").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "ggtest"
    assert models["data"][0]["meta"]["n_ctx_train"] == 4096
    assert props["total_slots"] == 2 and props["n_ctx"] == 512
    assert props["chat_template"] == CHATML and props["model_path"] == "/models/fake-model.gguf"
    assert props["default_generation_settings"]["params"]["temperature"] == 0.8
    assert props["bos_token"] == "<s>" and props["build_info"]


def test_post_props_changes_defaults():
    engine = FakeEngine()
    with fake_client(engine, endpoint_props=True) as client:
        assert client.post("/props", json={"default_generation_settings": {"params": {"temperature": 0.1}}}).json() \
            == {"success": True}
        client.post("/completion", json={"prompt": "Hi", "n_predict": 1})
        assert client.get("/props").json()["default_generation_settings"]["params"]["temperature"] == 0.1
    assert engine.requests[0].params.sampling.temperature == pytest.approx(0.1)


def test_health_is_503_while_loading(monkeypatch):
    release = threading.Event()

    def slow_build(settings):
        release.wait(10)
        return FakeEngine()

    monkeypatch.setattr(app_module, "build_engine", slow_build)
    app = app_module.create_app(ServerSettings(model_path="/nowhere.gguf"))
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "Loading model"
        assert r.json()["error"]["type"] == "unavailable_error" and r.json()["error"]["code"] == 503
        assert client.post("/completion", json={"prompt": "x"}).status_code == 503
        assert client.get("/v1/models").status_code == 200  # allowed while loading, as llama-server
        release.set()
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.02)
        assert client.get("/health").json() == {"status": "ok"}


def test_slots_endpoint():
    with fake_client() as client:
        slots = client.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1]
    assert all(s["n_ctx"] == 512 and s["is_processing"] is False for s in slots)
    with fake_client(endpoint_slots=False) as client:
        r = client.get("/slots")
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"


def test_metrics_endpoint():
    with fake_client(endpoint_metrics=False) as client:
        assert client.get("/metrics").status_code == 501
    with fake_client(endpoint_metrics=True) as client:
        client.post("/completion", json={"prompt": "Hi", "n_predict": 4})
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    started = int(r.headers["Process-Start-Time-Unix"])  # llama-server's header
    assert abs(started - time.time()) < 3600
    text = r.text
    for name in ("prompt_tokens_total", "prompt_seconds_total", "tokens_predicted_total",
                 "tokens_predicted_seconds_total", "n_decode_total", "n_busy_slots_per_decode",
                 "prompt_tokens_seconds", "predicted_tokens_seconds", "kv_cache_usage_ratio", "kv_cache_tokens",
                 "requests_processing", "requests_deferred", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket"):
        assert f"llamacpp:{name}" in text, name
    assert "llamacpp:tokens_predicted_total 4.0" in text
    assert "llamacpp:prompt_tokens_total 3.0" in text
    assert "llamacpp:time_to_first_token_seconds_count 1.0" in text
    assert "llamacpp:inter_token_latency_seconds_count 3.0" in text


def test_metrics_registries_are_per_app():
    with fake_client(endpoint_metrics=True) as a, fake_client(endpoint_metrics=True) as b:
        a.post("/completion", json={"prompt": "Hi", "n_predict": 2})
        assert "llamacpp:tokens_predicted_total 0.0" in b.get("/metrics").text


# ---- embeddings ---------------------------------------------------------------------------------


def test_embeddings():
    with fake_client() as client:
        r = client.post("/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 501
    with fake_client(embeddings=True) as client:
        native = client.post("/embedding", json={"content": "hi"}).json()
        oai = client.post("/v1/embeddings", json={"input": ["hi", "there"]}).json()
        b64 = client.post("/v1/embeddings", json={"input": [104, 105], "encoding_format": "base64"}).json()
    assert native[0]["index"] == 0 and len(native[0]["embedding"]) == 1 and len(native[0]["embedding"][0]) == 8
    assert oai["object"] == "list" and [d["index"] for d in oai["data"]] == [0, 1]
    vec = np.array(oai["data"][0]["embedding"])
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-6)
    assert oai["usage"]["prompt_tokens"] == 3 + 6  # BOS+"hi", BOS+"there"
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (8,) and np.linalg.norm(decoded) == pytest.approx(1.0, abs=1e-6)


# ---- infill -------------------------------------------------------------------------------------


def test_infill_layout():
    engine = FakeEngine()
    # extra context gets what is left of the slot after one batch and 2 * n_predict (llama-server)
    with fake_client(engine, batch_size=64) as client:
        body = client.post("/infill", json={
            "input_prefix": "ab", "input_suffix": "c", "prompt": "d", "n_predict": 2,
            "input_extra": [{"filename": "f.py", "text": "x"}],
        }).json()
    assert body["content"] == "He"
    ids = engine.requests[0].prompt_ids
    enc = lambda s: list(s.encode())  # noqa: E731
    extra = [FIM_REP] + enc("myproject\n") + [FIM_SEP] + enc("f.py\n") + enc("x") + [FIM_SEP] + enc("filename\n")
    assert ids == extra + [BOS, FIM_PRE] + enc("ab") + enc("d") + [FIM_SUF] + enc("c") + [FIM_MID]


# ---- slot save / restore / erase ----------------------------------------------------------------


def test_slot_actions(tmp_path):
    with fake_client(slot_save_path=str(tmp_path)) as client:
        saved = client.post("/slots/0?action=save", json={"filename": "s0.bin"}).json()
        restored = client.post("/slots/1?action=restore", json={"filename": "s0.bin"}).json()
        erased = client.post("/slots/0?action=erase").json()
    assert saved["id_slot"] == 0 and saved["filename"] == "s0.bin" and saved["n_saved"] == 3
    assert saved["n_written"] == (tmp_path / "s0.bin").stat().st_size and "save_ms" in saved["timings"]
    assert restored["id_slot"] == 1 and restored["n_restored"] == 3 and "restore_ms" in restored["timings"]
    assert erased == {"id_slot": 0, "n_erased": 3}


def test_slot_save_requires_directory():
    with fake_client() as client:
        r = client.post("/slots/0?action=save", json={"filename": "a.bin"})
    assert r.status_code == 501


# ---- web UI -------------------------------------------------------------------------------------


def test_web_ui_is_self_contained():
    with fake_client() as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/v1/chat/completions" in page and "<script" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline
    with fake_client(webui=False) as client:
        assert client.get("/").status_code == 404


def test_load_failure_is_reported(monkeypatch):
    def broken_build(settings):
        raise ValueError("unsupported architecture 'foo'")

    failures = []
    monkeypatch.setattr(app_module, "build_engine", broken_build)
    app = app_module.create_app(ServerSettings(model_path="/x.gguf"), on_load_failed=failures.append)
    with TestClient(app) as client:
        for _ in range(200):
            if failures:
                break
            threading.Event().wait(0.01)
        r = client.get("/health")
    assert failures == ["unsupported architecture 'foo'"]
    assert r.status_code == 500 and "unsupported architecture" in r.json()["error"]["message"]


def test_built_engine_is_shut_down_with_the_app(monkeypatch):
    class Tracked(FakeEngine):
        def start(self):
            self.started = True

        def shutdown(self, drain=False, timeout=None):
            self.stopped = True
            self.stop_timeout = timeout
            return True

    engine = Tracked()
    monkeypatch.setattr(app_module, "build_engine", lambda settings: engine)
    app = app_module.create_app(ServerSettings(model_path="/x.gguf", chat_template="llama3"))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        # --chat-template NAME overrides the model's template
        prompt = client.post("/apply-template", json={"messages": CHAT}).json()["prompt"]
    assert engine.started and engine.stopped
    assert engine.stop_timeout == app_module.ENGINE_STOP_SECONDS  # a stuck engine cannot hold the exit
    # the warm-up generations ran before the server reported ready: a short prompt for the decode
    # kernels and one long enough for the engine's prefill path (>= 32 tokens)
    assert [r.params.max_tokens for r in engine.requests] == [2, 2]
    assert len(engine.requests[0].prompt_ids) < 32 <= len(engine.requests[1].prompt_ids) <= app_module.WARM_UP_PROMPT_TOKENS
    assert prompt == "<|start_header_id|>user<|end_header_id|>\n\nSay hello<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_chat_template_file_overrides_the_model_template(tmp_path, monkeypatch):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    engine = FakeEngine()
    monkeypatch.setattr(app_module, "build_engine", lambda settings: engine)
    app = app_module.create_app(
        ServerSettings(model_path="/x.gguf", chat_template_file=str(template), warmup=False)
    )
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)
        assert client.post("/apply-template", json={"messages": CHAT}).json() == {"prompt": "[user]Say hello"}
    assert engine.requests == []  # --no-warmup


def test_post_props_is_off_without_the_flag_and_checks_every_value_with_it():
    engine = FakeEngine()
    with fake_client(engine) as client:
        r = client.post("/props", json={"default_generation_settings": {"params": {"temperature": 0.1}}})
        assert r.status_code == 501 and "--props" in r.json()["error"]["message"]
    poison = [{"temperature": float("nan")}, {"temperature": float("inf")}, {"top_k": -7}, {"top_p": 55},
              {"min_p": -1}, {"temperature": "hot"}, {"seed": 1.5}]
    with fake_client(engine, endpoint_props=True) as client:
        for params in poison:  # NaN / Infinity as Python's json writes them (and parses them)
            body = json.dumps({"default_generation_settings": {"params": params}}, allow_nan=True)
            r = client.post("/props", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, params
            assert r.json()["error"]["param"].startswith("default_generation_settings"), r.json()
        # nothing was stored: every request and the read endpoints still work with the old defaults
        assert client.get("/props").json()["default_generation_settings"]["params"]["temperature"] == 0.8
        assert client.get("/slots").status_code == 200
        assert client.post("/completion", json={"prompt": "Hi", "n_predict": 1}).status_code == 200
