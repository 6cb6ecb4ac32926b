"""Black-box tests of the real server process with the real Qwen2.5-Coder-0.5B model.

Starts `python -m ggserve.server -m <qwen> --port <free> -np 4 ...` once per module and talks to it with
the official `openai` client (chat + legacy completions), httpx (native endpoints) and raw SSE.
Slow: needs the model and numba compilation.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from tests.server.helpers import running_server

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


@pytest.fixture(scope="module")
def base_url(qwen_path, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("server")
    slot_dir = tmp_path_factory.mktemp("slots")
    with running_server(qwen_path, log_dir, "-np", "4", "-c", "8192", "--metrics", "--embeddings",
                        "-a", "qwen-test", "--slot-save-path", str(slot_dir)) as url:
        yield url


@pytest.fixture(scope="module")
def oai(base_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300, max_retries=0)


# ---- OpenAI chat --------------------------------------------------------------------------------


def test_chat_non_stream(oai):
    r = oai.chat.completions.create(model="qwen-test", messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "qwen-test"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_max_tokens_gives_length(oai):
    r = oai.chat.completions.create(model="x", messages=MESSAGES, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_chat_stream_matches_non_stream_and_chunk_order(oai):
    kwargs = dict(model="x", messages=MESSAGES, max_tokens=16, temperature=0)
    whole = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole  # greedy: same text either way


def test_chat_stream_include_usage(oai):
    chunks = list(oai.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_seed_reproducible(oai):
    kwargs = dict(model="x", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=1234)
    a = oai.chat.completions.create(**kwargs).choices[0].message.content
    b = oai.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_chat_stop_string(oai):
    kwargs = dict(model="x", messages=MESSAGES, max_tokens=32, temperature=0)
    text = oai.chat.completions.create(**kwargs).choices[0].message.content
    words = text.split()
    assert len(words) >= 3
    stop = words[2]
    r = oai.chat.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model="x", messages=MESSAGES, max_tokens=5, temperature=0,
                                    logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
    assert "".join(e.token for e in content) == r.choices[0].message.content


# ---- OpenAI legacy completions ------------------------------------------------------------------


def test_legacy_completions(oai):
    r = oai.completions.create(model="x", prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="x", prompt="def fibonacci(n):", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


# ---- native endpoints (httpx) -------------------------------------------------------------------


def test_native_completion_and_tokenizer(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as client:
        tokens = client.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
        assert tokens == [9707, 1879]  # Qwen2 BPE ids (llama.cpp's llama-tokenize agrees)
        assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": "Hello world"}
        body = client.post("/completion", json={
            "prompt": "def add(a, b):", "n_predict": 8, "temperature": 0, "return_tokens": True, "n_probs": 2,
        }).json()
        assert body["tokens_predicted"] == 8 and len(body["tokens"]) == 8 and body["stop_type"] == "limit"
        again = client.post("/completion", json={"prompt": tokens, "n_predict": 4, "temperature": 0}).json()
        assert again["tokens_evaluated"] == 2
        assert len(body["completion_probabilities"]) == 8
        assert body["timings"]["predicted_n"] == 8 and body["timings"]["predicted_per_second"] > 0
        props = client.get("/props").json()
        assert props["total_slots"] == 4 and props["n_ctx"] == 2048
        assert "im_start" in props["chat_template"]
        assert client.get("/health").json() == {"status": "ok"}
        metrics = client.get("/metrics").text
        predicted = float(re.search(r"^llamacpp:tokens_predicted_total (\S+)$", metrics, re.M).group(1))
        assert predicted >= 8
        emb = client.post("/v1/embeddings", json={"input": "hello"}).json()["data"][0]["embedding"]
        assert len(emb) == 896 and abs(sum(x * x for x in emb) - 1.0) < 1e-3


def test_slot_save_restore_reuses_the_saved_prompt(base_url):
    prompt = "def quicksort(items):\n    " * 8
    with httpx.Client(base_url=base_url, timeout=300) as client:
        first = client.post("/completion", json={"prompt": prompt, "n_predict": 1, "id_slot": 3}).json()
        n_prompt = first["tokens_evaluated"]
        saved = client.post("/slots/3?action=save", json={"filename": "qs.bin"}).json()
        n_saved = saved["n_saved"]
        assert n_saved >= n_prompt and saved["n_written"] > 0
        assert client.post("/slots/3?action=erase").json() == {"id_slot": 3, "n_erased": n_saved}
        assert client.post("/slots/3?action=restore", json={"filename": "qs.bin"}).json()["n_restored"] == n_saved
        again = client.post("/completion", json={"prompt": prompt, "n_predict": 1, "id_slot": 3}).json()
        assert again["tokens_cached"] >= n_prompt - 1  # only the last prompt token is recomputed
        escape = client.post("/slots/3?action=save", json={"filename": "../escape.bin"})
        assert escape.status_code == 400 and "error" in escape.json()


def test_raw_sse_framing(base_url):
    with httpx.Client(base_url=base_url, timeout=300) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": MESSAGES, "max_tokens": 4, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = "".join(r.iter_text())
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    data = [b for b in blocks if not b.startswith(":")]
    assert all(b.startswith("data: ") for b in data)
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[0][6:])["choices"][0]["delta"]["role"] == "assistant"


# ---- disconnects --------------------------------------------------------------------------------


def test_dropped_streams_free_their_slots(base_url):
    async def drop_after_chunks(client: httpx.AsyncClient, n_chunks: int) -> int:
        body = {"messages": MESSAGES, "max_tokens": 4000, "stream": True, "ignore_eos": True}
        seen = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= n_chunks:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def scenario() -> float:
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
            seen = await asyncio.gather(*(drop_after_chunks(client, 4) for _ in range(4)))
            assert all(s >= 4 for s in seen)
        t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
            r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            elapsed = time.monotonic() - t0
            for _ in range(50):
                slots = (await client.get("/slots")).json()
                if not any(s["is_processing"] for s in slots):
                    break
                await asyncio.sleep(0.1)
            assert not any(s["is_processing"] for s in slots)
        return elapsed

    elapsed = asyncio.run(scenario())
    # had the 4 dropped streams kept their slots, this would wait for 4 x 4000 tokens
    assert elapsed < 120
