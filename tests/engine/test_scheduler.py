"""Slots and continuous batching with a fake model: FIFO, slot choice, prefix reuse, chunked prefill,
pinning, context full / context shift. No real model needed."""
from __future__ import annotations

import pytest
from tests.engine.fakes import make_core, run_to_completion

from ggserve.engine.request import GenerationParams, RequestStatus
from ggserve.engine.scheduler import common_prefix_len


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def solo(prompt, max_tokens, **kw) -> list[int]:
    core = make_core(n_slots=1, **kw)
    r = core.add_request(prompt, GenerationParams(max_tokens=max_tokens))
    return tokens_of(run_to_completion(core)[r.request_id])


def prompt(n: int, start: int = 1) -> list[int]:
    return [1 + (start + i) % 26 for i in range(n)]


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_more_requests_than_slots_fifo_nothing_lost():
    core = make_core(n_slots=2, slot_prompt_similarity=0.0)
    prompts = [prompt(5 + i, start=3 * i) for i in range(5)]
    reqs = [core.add_request(p, GenerationParams(max_tokens=4)) for p in prompts]
    admitted_order = []
    outputs = {}
    while core.has_work():
        for r in reqs:
            if r.slot_id >= 0 and r.request_id not in admitted_order:
                admitted_order.append(r.request_id)
        assert len(core.scheduler.running) <= 2
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        for r in reqs:
            if r.status is RequestStatus.RUNNING and r.request_id not in admitted_order:
                admitted_order.append(r.request_id)
    assert admitted_order == [r.request_id for r in reqs]  # FIFO admission
    for r, p in zip(reqs, prompts):
        outs = outputs[r.request_id]
        assert outs[-1].finish_reason == "length" and outs[-1].stop_type == "limit"
        assert sum(o.is_finished for o in outs) == 1
        assert tokens_of(outs) == solo(p, 4)  # batching never changes a request's tokens


def test_prefix_reuse_picks_the_matching_slot_and_computes_only_the_suffix():
    core = make_core(n_slots=3)
    shared = prompt(20, start=5)
    others = [prompt(12, start=0), shared, prompt(14, start=11)]
    first = [core.add_request(p, GenerationParams(max_tokens=2)) for p in others]
    run_to_completion(core)
    shared_slot = first[1].slot_id
    # Make the matching slot the most recently used one, so LRU alone would not pick it.
    core.model.calls.clear()
    new_prompt = shared + prompt(6, start=2)
    r = core.add_request(new_prompt, GenerationParams(max_tokens=3))
    outs = run_to_completion(core)[r.request_id]
    assert r.slot_id == shared_slot
    assert r.cache_n == 20 and outs[-1].timings.cache_n == 20
    assert outs[-1].timings.prompt_n == 6
    prompt_tokens_computed = sum(len(c.token_ids) for c in core.model.calls) - 2  # 2 decode steps
    assert prompt_tokens_computed == 6
    assert tokens_of(outs) == solo(new_prompt, 3)


def test_identical_prompt_recomputes_only_the_last_token():
    core = make_core(n_slots=1)
    p = prompt(10)
    a = core.add_request(p, GenerationParams(max_tokens=2))
    run_to_completion(core)
    core.model.calls.clear()
    b = core.add_request(p, GenerationParams(max_tokens=2))
    outs = run_to_completion(core)[b.request_id]
    assert b.cache_n == 9
    assert core.model.calls[0].token_ids == [p[-1]] and core.model.calls[0].positions == [9]
    assert tokens_of(outs) == solo(p, 2)
    assert a.output_ids == b.output_ids


def test_same_long_prompt_arriving_together_is_prefilled_once_and_forked():
    # n choices of one request: three identical 40-token prompts, prompt chunks of <= 16 tokens
    core = make_core(n_slots=3, batch_size=16)
    p = prompt(40, start=4)
    reqs = [core.add_request(p, GenerationParams(max_tokens=3)) for _ in range(3)]
    outs = run_to_completion(core)
    prompt_tokens = sum(len(c.token_ids) for c in core.model.calls) - 3 * 2  # minus decode tokens
    assert prompt_tokens == 40 + 1 + 1  # once, plus each fork's last prompt token
    assert [r.cache_n for r in reqs] == [0, 39, 39]
    assert sorted({r.slot_id for r in reqs}) == [0, 1, 2]
    for r in reqs:
        assert tokens_of(outs[r.request_id]) == solo(p, 3)


def test_prefix_held_by_a_busy_slot_is_copied_not_recomputed():
    core = make_core(n_slots=2)
    system = prompt(30, start=7)
    a = core.add_request(system + [3], GenerationParams(max_tokens=6))
    for _ in range(3):  # a's prompt is done and it is decoding
        core.step()
    b = core.add_request(system + prompt(4, start=1), GenerationParams(max_tokens=2))
    outs = run_to_completion(core)
    assert b.slot_id != a.slot_id and b.cache_n == 30
    assert outs[b.request_id][-1].timings.prompt_n == 4
    assert tokens_of(outs[b.request_id]) == solo(system + prompt(4, start=1), 2)


def test_short_shared_prefixes_do_not_hold_requests_back():
    core = make_core(n_slots=2, batch_size=64)
    a = core.add_request(prompt(5, start=2) + prompt(30, start=9), GenerationParams(max_tokens=1))
    b = core.add_request(prompt(5, start=2) + prompt(30, start=17), GenerationParams(max_tokens=1))
    core.step()
    assert a.slot_id >= 0 and b.slot_id >= 0  # both admitted in the first step


def test_cache_reuse_slides_a_matching_chunk_into_place():
    # llama-server's --cache-reuse: the cache holds A B C, the new prompt is A C D; C (>= 8
    # tokens) is shifted down over B instead of being recomputed.
    a, b, c, d = prompt(6, start=1), prompt(10, start=9), prompt(12, start=3), prompt(4, start=20)
    core = make_core(n_slots=1, cache_reuse=8)
    core.add_request(a + b + c, GenerationParams(max_tokens=1))
    run_to_completion(core)
    r = core.add_request(a + c + d, GenerationParams(max_tokens=2))
    outs = run_to_completion(core)[r.request_id]
    assert core.model.kv_cache.shifts == [(0, 6, 10)]  # drop B's 10 cells after A's 6
    assert r.cache_n == 18 and outs[-1].timings.prompt_n == 4  # only D is computed
    assert tokens_of(outs) == solo(a + c + d, 2)


def test_cache_reuse_ignores_chunks_shorter_than_the_threshold():
    a, b, c = prompt(6, start=1), prompt(10, start=9), prompt(5, start=3)
    core = make_core(n_slots=1, cache_reuse=8)
    core.add_request(a + b + c, GenerationParams(max_tokens=1))
    run_to_completion(core)
    r = core.add_request(a + c + prompt(3, start=20), GenerationParams(max_tokens=1))
    run_to_completion(core)
    assert core.model.kv_cache.shifts == [] and r.cache_n == 6


def test_cache_prompt_false_recomputes_everything():
    core = make_core(n_slots=1)
    p = prompt(10)
    core.add_request(p, GenerationParams(max_tokens=1))
    run_to_completion(core)
    b = core.add_request(p, GenerationParams(max_tokens=1, cache_prompt=False))
    outs = run_to_completion(core)[b.request_id]
    assert b.cache_n == 0 and outs[-1].timings.prompt_n == 10


def test_lru_slot_when_no_cached_prefix_is_similar_enough():
    core = make_core(n_slots=2)
    a = core.add_request(prompt(10, start=0), GenerationParams(max_tokens=1))
    run_to_completion(core)
    b = core.add_request(prompt(10, start=7), GenerationParams(max_tokens=1))
    run_to_completion(core)
    assert (a.slot_id, b.slot_id) == (0, 1)  # slot 1 was never used: least recently used
    c = core.add_request(prompt(10, start=13), GenerationParams(max_tokens=1))
    run_to_completion(core)
    assert c.slot_id == 0  # slot 0 released before slot 1


def test_similarity_threshold_protects_a_long_cache_from_a_short_match():
    core = make_core(n_slots=2, slot_prompt_similarity=0.5)
    long_prompt = prompt(40)
    a = core.add_request(long_prompt, GenerationParams(max_tokens=1))
    run_to_completion(core)
    # shares 10 of slot 0's 41 cached tokens (< 50%): goes to the other (LRU) slot instead
    b = core.add_request(long_prompt[:10] + prompt(5, start=20), GenerationParams(max_tokens=1))
    run_to_completion(core)
    assert a.slot_id == 0 and b.slot_id == 1


def test_chunked_prefill_interleaves_with_decoding():
    core = make_core(n_slots=2, n_ctx=128, batch_size=8)
    a = core.add_request(prompt(4), GenerationParams(max_tokens=20))
    core.step()  # a's prompt
    assert a.n_decoded == 1
    long_prompt = prompt(50, start=3)
    b = core.add_request(long_prompt, GenerationParams(max_tokens=2))
    core.model.calls.clear()
    steps_while_b_prefills = 0
    while b.is_prefilling:
        before = a.n_decoded
        core.step()
        call = core.model.calls[-1]
        assert len(call.token_ids) <= 8  # the per-step budget counts every token
        assert call.slot_ids[0] == a.slot_id and call.positions[0] == a.num_computed_tokens - 1  # decode first
        assert a.n_decoded == before + 1  # the running stream never stalls
        steps_while_b_prefills += 1
    assert steps_while_b_prefills == 8  # ceil(50 / 7)
    run_to_completion(core)
    assert a.output_ids == solo(prompt(4), 20, n_ctx=128)
    assert b.output_ids == solo(long_prompt, 2, n_ctx=128)


def test_two_prompts_share_the_budget_in_admission_order():
    core = make_core(n_slots=2, n_ctx=64, batch_size=10)
    a = core.add_request(prompt(15), GenerationParams(max_tokens=1))
    b = core.add_request(prompt(6, start=9), GenerationParams(max_tokens=1))
    core.step()
    call = core.model.calls[-1]
    assert call.slot_ids == [a.slot_id] * 10 and call.logits_rows == []
    core.step()  # a: 5 more (done), b: 5 of 6
    call = core.model.calls[-1]
    assert call.slot_ids == [a.slot_id] * 5 + [b.slot_id] * 5 and call.logits_rows == [4]
    assert a.n_decoded == 1 and b.is_prefilling


def test_abort_mid_prefill_frees_the_slot_for_the_next_request():
    core = make_core(n_slots=1, n_ctx=128, batch_size=8)
    a = core.add_request(prompt(40), GenerationParams(max_tokens=5))
    b = core.add_request(prompt(5, start=4), GenerationParams(max_tokens=2))
    core.step()
    assert a.is_prefilling and b.status is RequestStatus.WAITING
    out = core.abort(a.request_id)
    assert out.finish_reason == "abort" and out.is_finished and out.new_token_ids == []
    assert core.scheduler.slots[0].is_idle
    core.step()
    assert b.status is RequestStatus.RUNNING and b.slot_id == 0
    run_to_completion(core)
    assert b.output_ids == solo(prompt(5, start=4), 2, n_ctx=128)
    assert core.abort(a.request_id) is None  # already gone


def test_abort_mid_decode_and_abort_while_waiting():
    core = make_core(n_slots=1)
    a = core.add_request(prompt(5), GenerationParams(max_tokens=50))
    b = core.add_request(prompt(5, start=2), GenerationParams(max_tokens=50))
    for _ in range(3):
        core.step()
    assert a.n_decoded == 3
    out_b = core.abort(b.request_id)
    assert out_b.finish_reason == "abort" and b.status is RequestStatus.FINISHED_ABORTED
    out_a = core.abort(a.request_id)
    assert out_a.finish_reason == "abort" and out_a.timings.predicted_n == 3
    assert not core.has_work() and core.scheduler.slots[0].is_idle


def test_id_slot_pinning_waits_for_its_slot():
    core = make_core(n_slots=2, slot_prompt_similarity=0.0)
    a = core.add_request(prompt(5), GenerationParams(max_tokens=6, id_slot=1))
    core.step()
    assert a.slot_id == 1
    b = core.add_request(prompt(5, start=3), GenerationParams(max_tokens=2, id_slot=1))
    c = core.add_request(prompt(5, start=6), GenerationParams(max_tokens=2))
    core.step()
    assert b.status is RequestStatus.WAITING  # slot 1 busy; slot 0 free but b is pinned
    assert c.slot_id == 0  # c, queued behind b, goes ahead
    run_to_completion(core)
    assert b.slot_id == 1 and b.n_decoded == 2


def test_invalid_id_slot_is_rejected_up_front():
    core = make_core(n_slots=2)
    with pytest.raises(ValueError, match="id_slot"):
        core.add_request(prompt(5), GenerationParams(id_slot=2))


def test_context_full_finishes_with_length():
    core = make_core(n_slots=1, n_ctx=16)
    r = core.add_request(prompt(10), GenerationParams(max_tokens=-1))
    outs = run_to_completion(core)[r.request_id]
    assert len(tokens_of(outs)) == 6  # prompt + output fill the 16-token context
    assert outs[-1].finish_reason == "length" and outs[-1].stop_type == "limit" and outs[-1].truncated
    assert max(max(c.positions) for c in core.model.calls) == 14  # the last token is never fed


def test_context_shift_keeps_n_keep_and_discards_half_the_rest():
    core = make_core(n_slots=1, n_ctx=16, context_shift=True)
    p = prompt(10)
    r = core.add_request(p, GenerationParams(max_tokens=20, n_keep=4))
    outs = run_to_completion(core)[r.request_id]
    assert len(tokens_of(outs)) == 20 and outs[-1].finish_reason == "length" and outs[-1].truncated
    shifts = core.model.kv_cache.shifts
    # first shift when 15 tokens are cached and a 16th is pending: n_left = 15 - 4, discard 5
    assert shifts[0] == (0, 4, 5)
    cached = core.model.kv_cache.cached_tokens(0)
    assert cached[:4] == p[:4]  # the kept prefix survives every shift
    assert len(cached) < 16


def test_context_shift_n_keep_minus_one_keeps_the_prompt_and_bos():
    core = make_core(n_slots=1, n_ctx=32, context_shift=True, add_bos=True)
    p = prompt(12)
    core.add_request(p, GenerationParams(max_tokens=30, n_keep=-1))
    run_to_completion(core)
    # n_keep = 12 prompt tokens + 1 for BOS (llama-server); n_left = 31 - 13 -> discard 9
    assert core.model.kv_cache.shifts[0] == (0, 13, 9)


def test_prompt_too_long_is_rejected_with_a_distinct_error():
    from ggserve.engine.request import PromptTooLongError

    core = make_core(n_slots=1, n_ctx=16)
    with pytest.raises(PromptTooLongError) as err:
        core.add_request(prompt(16), GenerationParams())
    assert err.value.n_prompt_tokens == 16 and err.value.n_ctx == 16
    assert isinstance(err.value, ValueError)
    core.add_request(prompt(15), GenerationParams())  # 15 fits: one token can still be sampled
