"""The engine loop on the real Qwen2.5-Coder-0.5B: batching never changes greedy tokens, many
concurrent requests all finish right, and a cached prompt prefix makes the prompt phase fast."""
from __future__ import annotations

import asyncio
import statistics

import numpy as np
import pytest

from ggserve.engine.core import EngineConfig, EngineCore
from ggserve.engine.request import GenerationParams
from tests.engine.fakes import run_to_completion

pytestmark = pytest.mark.slow

N_SLOTS = 4
N_CTX = 1024

TEXTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\n# compute the mean of a list of numbers\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def greedy(max_tokens: int, **kw) -> GenerationParams:
    from ggserve.engine.sampling.sampler import SamplingParams

    return GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0, top_k=1), **kw)


@pytest.fixture(scope="module")
def core(qwen_path):
    from ggserve.engine.model.gguf import GGUFFile
    from ggserve.engine.model.model import load_model
    from ggserve.engine.tokenizer import Tokenizer

    g = GGUFFile(qwen_path)
    tokenizer = Tokenizer.from_gguf(g)
    model = load_model(g, n_slots=N_SLOTS, n_ctx=N_CTX)
    core = EngineCore(model, tokenizer, EngineConfig(n_slots=N_SLOTS, n_ctx=N_CTX, batch_size=512))
    # warm up (numba compilation) so timings below measure the engine, not the JIT
    core.add_request(tokenizer.encode("warm up the kernels"), greedy(2, cache_prompt=False))
    run_to_completion(core)
    return core


def clear_slots(core: EngineCore) -> None:
    for slot in range(N_SLOTS):
        core.model.kv_cache.clear(slot)


def test_concurrent_greedy_requests_match_solo_runs(core):
    tok = core.tokenizer
    prompts = [tok.encode(t) for t in TEXTS]
    solo = []
    for p in prompts:
        clear_slots(core)
        r = core.add_request(p, greedy(16, cache_prompt=False))
        run_to_completion(core)
        solo.append(r.output_ids)
    clear_slots(core)
    reqs = [core.add_request(p, greedy(16, cache_prompt=False)) for p in prompts]
    outs = run_to_completion(core)
    assert len({r.slot_id for r in reqs}) == N_SLOTS  # really batched together
    for r, expected, text in zip(reqs, solo, TEXTS):
        assert r.output_ids == expected, f"batched output differs for {text!r}"
        got_text = "".join(o.new_text for o in outs[r.request_id])
        assert got_text == tok.decode(expected, special=False) or r.stop_type.value == "word"
    # the fixture texts produce real continuations, not garbage
    assert "fibonacci" in tok.decode(prompts[0] + solo[0]) and len(solo[1]) > 0


def test_sixteen_concurrent_requests_of_mixed_lengths_all_finish(core):
    from ggserve.engine.async_engine import AsyncEngine

    tok = core.tokenizer
    base = tok.encode(" ".join(TEXTS) * 4)
    jobs = []
    for i in range(16):
        n_prompt = 3 + (i * 37) % 180
        jobs.append((base[i : i + n_prompt], 1 + (i * 5) % 20))

    async def main():
        engine = AsyncEngine(core)
        engine.start()
        try:

            async def one(prompt, max_tokens):
                return [o async for o in engine.generate(prompt, greedy(max_tokens, ignore_eos=True))]

            return await asyncio.gather(*(one(p, m) for p, m in jobs))
        finally:
            engine.shutdown(drain=True)

    results = asyncio.run(main())
    for (prompt, max_tokens), outs in zip(jobs, results):
        assert sum(o.is_finished for o in outs) == 1 and outs[-1].is_finished
        assert outs[-1].finish_reason == "length"
        assert sum(len(o.new_token_ids) for o in outs) == max_tokens
        assert outs[-1].timings.predicted_n == max_tokens
        assert outs[-1].timings.prompt_n + outs[-1].timings.cache_n == len(prompt)


def test_shared_prefix_is_reused_and_prompt_phase_is_much_faster(core):
    tok = core.tokenizer
    long_ids = tok.encode(("def helper_%d(x):\n    return x * %d + 1\n\n" * 60) % tuple(v for i in range(60) for v in (i, i)))
    shared = long_ids[:400]
    assert len(shared) == 400
    q1 = shared + tok.encode("# first question: what does helper_3 return?", add_special=False)
    q2 = shared + tok.encode("# second question, different tail", add_special=False)

    cached_ms, uncached_ms = [], []
    for _ in range(3):
        clear_slots(core)
        core.add_request(q1, greedy(1, id_slot=0))
        run_to_completion(core)
        warm = core.add_request(q2, greedy(1, id_slot=0))
        outs_warm = run_to_completion(core)[warm.request_id]
        cold = core.add_request(q2, greedy(1, id_slot=1, cache_prompt=False))
        outs_cold = run_to_completion(core)[cold.request_id]
        t_warm, t_cold = outs_warm[-1].timings, outs_cold[-1].timings
        assert t_warm.cache_n >= 400 and t_warm.prompt_n == len(q2) - t_warm.cache_n
        assert t_cold.cache_n == 0 and t_cold.prompt_n == len(q2)
        assert warm.output_ids == cold.output_ids  # reusing the cache does not change the answer
        cached_ms.append(t_warm.prompt_ms)
        uncached_ms.append(t_cold.prompt_ms)
    speedup = statistics.median(uncached_ms) / statistics.median(cached_ms)
    print(f"prompt phase: uncached {statistics.median(uncached_ms):.1f} ms, cached {statistics.median(cached_ms):.1f} ms, "
          f"speedup {speedup:.1f}x")
    assert speedup >= 3.0


def test_prefix_similarity_routes_a_follow_up_to_its_slot(core):
    tok = core.tokenizer
    clear_slots(core)
    convo = tok.encode("<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n")
    first = core.add_request(convo, greedy(12))
    run_to_completion(core)
    other = core.add_request(tok.encode("Unrelated prompt about databases"), greedy(2))
    run_to_completion(core)
    follow = core.add_request(convo + first.output_ids + tok.encode("\nAnother one please.", add_special=False), greedy(2))
    outs = run_to_completion(core)[follow.request_id]
    assert follow.slot_id == first.slot_id != other.slot_id
    assert outs[-1].timings.cache_n >= len(convo) + len(first.output_ids) - 1


def test_embeddings_are_unit_norm_and_deterministic(core):
    tok = core.tokenizer
    a = core.embed(tok.encode("The quick brown fox"))
    b = core.embed(tok.encode("The quick brown fox"))
    c = core.embed(tok.encode("import os, sys"))
    assert a.shape == (core.model.n_embd,)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(a @ c) < 0.999


def test_build_async_engine_end_to_end(qwen_path):
    from ggserve.engine.loader import build_async_engine

    engine = build_async_engine(qwen_path, EngineConfig(n_slots=2, n_ctx=256, batch_size=64))
    try:
        info = engine.model_info
        assert info.architecture == "qwen2" and info.n_vocab == engine.tokenizer.n_vocab
        assert info.n_ctx_train == 32768 and info.n_embd == 896 and info.size_bytes > 300_000_000
        assert info.chat_template_source and "im_start" in info.chat_template_source

        async def main():
            prompt = engine.tokenizer.encode("def add(a, b):")
            outs = [o async for o in engine.generate(prompt, greedy(8, stop=["\n\n"]))]
            vec = await engine.embed(prompt)
            return outs, vec

        outs, vec = asyncio.run(main())
        assert outs[-1].is_finished and outs[-1].finish_reason in ("stop", "length")
        ids = [t for o in outs for t in o.new_token_ids]
        text = "".join(o.new_text for o in outs)
        if outs[-1].stop_type == "word":  # the text ends right before the first "\n\n"
            assert "\n\n" not in text and engine.tokenizer.decode(ids, special=False).startswith(text + "\n\n")
        else:
            assert len(ids) == 8 and text == engine.tokenizer.decode(ids, special=False)
        assert vec.shape == (896,)
        stats = engine.stats()
        assert stats.n_slots == 2 and stats.n_requests_finished_total == 1
    finally:
        engine.shutdown()
