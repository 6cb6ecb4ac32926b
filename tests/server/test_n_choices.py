"""`n` choices on /v1/chat/completions and /v1/completions over the fake engine: one engine
request per choice with derived seeds, response and stream shapes, usage, and aborting every
choice when the client goes away."""
from __future__ import annotations

import asyncio
import json

import pytest

from ggserve.server.params import RANDOM_SEED, choice_seed
from tests.server.fake_engine import FakeEngine
from tests.server.helpers import CHAT, fake_client, sse_events, sse_json
from tests.server.test_streaming import AsgiCall, _run, _wait_for, _with_app

REPLY = "Hello world! I am a fake model."


def test_choice_seeds_are_distinct_reproducible_and_never_random():
    assert [choice_seed(42, i) for i in range(3)] == [42, 43, 44]
    assert choice_seed(-1, 5) == -1  # random stays random: each sampler draws its own seed
    assert choice_seed(RANDOM_SEED - 1, 1) != RANDOM_SEED
    seeds = {choice_seed(RANDOM_SEED - 2, i) for i in range(4)}
    assert len(seeds) == 4 and RANDOM_SEED not in seeds


def test_chat_n_choices_non_stream():
    with fake_client() as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 3, "seed": 7, "temperature": 1.0})
        assert r.status_code == 200
        body = r.json()
        requests = client.engine.requests
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"] == {"role": "assistant", "content": REPLY} for c in body["choices"])
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    assert len(requests) == 3 and all(r.prompt_ids == requests[0].prompt_ids for r in requests)
    assert [r.params.sampling.seed for r in requests] == [7, 8, 9]
    n_prompt = len(requests[0].prompt_ids)
    assert body["usage"]["prompt_tokens"] == n_prompt  # the shared prompt is counted once
    assert body["usage"]["completion_tokens"] == 3 * len(REPLY)
    assert body["usage"]["total_tokens"] == n_prompt + 3 * len(REPLY)


def test_n_greedy_is_allowed_and_n_larger_than_the_slots_is_queued():
    with fake_client(FakeEngine(n_slots=2)) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 5, "temperature": 0, "max_tokens": 4})
        assert r.status_code == 200
        assert [c["message"]["content"] for c in r.json()["choices"]] == ["Hell"] * 5


def test_chat_n_choices_stream_interleaves_with_one_finish_per_choice():
    with fake_client(FakeEngine(token_delay=0.001)) as client:
        r = client.post("/v1/chat/completions", json={
            "messages": CHAT, "n": 2, "stream": True, "seed": 3, "stream_options": {"include_usage": True},
        })
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 2 * len(REPLY)
    body = chunks[:-1]
    assert all(len(c["choices"]) == 1 for c in body)
    roles = [c["choices"][0]["index"] for c in body if c["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1]
    texts = {0: "", 1: ""}
    order = []
    for c in body:
        choice = c["choices"][0]
        if choice["delta"].get("content"):
            texts[choice["index"]] += choice["delta"]["content"]
            order.append(choice["index"])
    assert texts == {0: REPLY, 1: REPLY}
    assert order != sorted(order)  # the choices' tokens arrive interleaved, not one after the other
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in body
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]


def test_legacy_completions_n_with_several_prompts():
    with fake_client() as client:
        r = client.post("/v1/completions", json={"prompt": ["One", "Two!"], "n": 2, "max_tokens": 5, "seed": 10})
        body = r.json()
        requests = client.engine.requests
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "Hello" and c["finish_reason"] == "length" for c in body["choices"])
    # prompt-major: choices 0, 1 answer "One", choices 2, 3 answer "Two!"
    assert [len(r.prompt_ids) for r in requests] == [4, 4, 5, 5]
    assert [r.params.sampling.seed for r in requests] == [10, 11, 10, 11]
    assert body["usage"]["prompt_tokens"] == 4 + 5 and body["usage"]["completion_tokens"] == 20


def test_legacy_completions_n_stream():
    with fake_client(FakeEngine(token_delay=0.001)) as client:
        r = client.post("/v1/completions", json={"prompt": "Hi", "n": 3, "max_tokens": 6, "stream": True})
    chunks = sse_json(r.text)
    texts = ["", "", ""]
    finishes = []
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes.append(choice["index"])
    assert texts == ["Hello "] * 3 and sorted(finishes) == [0, 1, 2]


def test_n_choices_with_tools_are_parsed_per_choice():
    from tests.server.chat.test_tool_calls import HERMES_TEMPLATE, PARIS_CALL, WEATHER

    with fake_client(FakeEngine(reply=PARIS_CALL), chat_template=HERMES_TEMPLATE) as client:
        body = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 2, "tools": [WEATHER]}).json()
    assert [c["finish_reason"] for c in body["choices"]] == ["tool_calls", "tool_calls"]
    ids = [c["message"]["tool_calls"][0]["id"] for c in body["choices"]]
    assert len(set(ids)) == 2


@pytest.mark.parametrize("path,body", [
    ("/completion", {"prompt": "Hi", "n": 2}),
    ("/infill", {"input_prefix": "def f():", "n": 2}),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}),
])
def test_n_out_of_range_or_on_native_endpoints_is_a_400(path, body):
    with fake_client() as client:
        r = client.post(path, json=body)
        assert r.status_code == 400 and client.engine.requests == []


def test_busy_engine_refuses_all_choices_cleanly():
    with fake_client(FakeEngine(busy=True)) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "n": 3})
        assert r.status_code == 503


def test_disconnect_aborts_every_choice():
    engine = FakeEngine(token_delay=0.01, repeat_reply=True, n_slots=4)

    async def scenario(app):
        body = {"messages": CHAT, "stream": True, "max_tokens": 4000, "n": 3}
        call = AsgiCall(app, "POST", "/v1/chat/completions", body)
        task = asyncio.create_task(call.run())
        await _wait_for(lambda: len(call.chunks) >= 6)
        call.disconnect.set()
        await asyncio.wait_for(task, 5)
        await _wait_for(lambda: not engine._active)
        assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests)
        assert len(engine.requests) == 3

    _run(_with_app(engine, scenario))
