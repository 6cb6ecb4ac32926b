"""EngineCore with a fake model: stop conditions end to end, deltas, timings, logprobs, embeddings,
stats. Scripted models make the generated text known in advance."""
from __future__ import annotations

import numpy as np
import pytest
from tests.engine.fakes import EOS_ID, TOKEN, make_core, run_to_completion

from ggserve.engine.core import EngineConfig
from ggserve.engine.request import GenerationParams

PROMPT = [1, 2, 3, 4]


def scripted(pieces: list[str | int]):
    """Model that emits `pieces` (vocab strings or ids) one per generated token, then 'z' forever."""
    ids = [TOKEN[p] if isinstance(p, str) else p for p in pieces]

    def next_token(slot_id, context):
        i = len(context) - len(PROMPT)
        return ids[i] if i < len(ids) else TOKEN["z"]

    return next_token


def run_one(pieces, params: GenerationParams, **kw):
    core = make_core(n_slots=1, next_token_fn=scripted(pieces), **kw)
    r = core.add_request(PROMPT, params)
    return core, r, run_to_completion(core)[r.request_id]


def text_of(outs) -> str:
    return "".join(o.new_text for o in outs)


def test_stop_string_across_tokens_is_not_output_and_reports_word():
    core, r, outs = run_one(["a", "b", " ", "ST", "OP", "c"], GenerationParams(stop=["STOP"]))
    assert text_of(outs) == "ab "
    assert [o.new_text for o in outs] == ["a", "b", " ", "", ""]  # "ST" held back, never sent
    last = outs[-1]
    assert (last.finish_reason, last.stop_type, last.stopping_word) == ("stop", "word", "STOP")
    assert [t for o in outs for t in o.new_token_ids] == [TOKEN[p] for p in ["a", "b", " ", "ST", "OP"]]


def test_false_stop_prefix_is_released_later():
    _, _, outs = run_one(["ST", "a", "ST"], GenerationParams(stop=["STOP"], max_tokens=3))
    assert [o.new_text for o in outs] == ["", "STa", "ST"]  # tail flushed when the length limit hits
    assert outs[-1].finish_reason == "length" and outs[-1].stop_type == "limit"


def test_eos_finishes_with_stop_eos():
    _, r, outs = run_one(["h", "i", EOS_ID], GenerationParams())
    assert text_of(outs) == "hi"
    assert (outs[-1].finish_reason, outs[-1].stop_type) == ("stop", "eos")
    assert r.output_ids[-1] == EOS_ID and outs[-1].timings.predicted_n == 3


def test_ignore_eos_masks_eog_tokens_and_keeps_going():
    _, r, outs = run_one(["h", EOS_ID, "i"], GenerationParams(ignore_eos=True, max_tokens=3))
    assert EOS_ID not in r.output_ids and len(r.output_ids) == 3
    assert outs[-1].finish_reason == "length"


def test_max_tokens_and_server_default_n_predict():
    _, r, outs = run_one([], GenerationParams(max_tokens=5))
    assert len(r.output_ids) == 5 and sum(len(o.new_token_ids) for o in outs) == 5
    _, r, outs = run_one([], GenerationParams(), n_predict=3)
    assert len(r.output_ids) == 3 and outs[-1].stop_type == "limit"
    _, r, outs = run_one([], GenerationParams(max_tokens=2), n_predict=3)
    assert len(r.output_ids) == 2  # the request's own limit wins


def test_max_tokens_zero_only_processes_the_prompt():
    core, r, outs = run_one([], GenerationParams(max_tokens=0))
    assert r.output_ids == [] and len(outs) == 1 and outs[0].finish_reason == "length"
    assert core.model.kv_cache.cached_tokens(0) == PROMPT  # the cache is warm for the next request


def test_one_delta_per_token_and_exactly_one_final():
    _, _, outs = run_one([], GenerationParams(max_tokens=4))
    assert [len(o.new_token_ids) for o in outs] == [1, 1, 1, 1]
    assert [o.is_finished for o in outs] == [False, False, False, True]
    assert all(o.slot_id == 0 for o in outs)


def test_timings_count_prompt_cache_and_predicted_tokens():
    core = make_core(n_slots=1)
    a = core.add_request(list(range(1, 21)), GenerationParams(max_tokens=3))
    outs_a = run_to_completion(core)[a.request_id]
    t = outs_a[-1].timings
    assert (t.prompt_n, t.cache_n, t.predicted_n) == (20, 0, 3)
    assert t.prompt_ms > 0 and t.predicted_ms >= 0
    b = core.add_request(list(range(1, 21)) + [5, 6], GenerationParams(max_tokens=2))
    t = run_to_completion(core)[b.request_id][-1].timings
    assert (t.prompt_n, t.cache_n, t.predicted_n) == (2, 20, 2)
    assert set(t.to_dict()) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n", "predicted_per_second"}


def test_logprobs_reported_per_token_when_n_probs_set():
    _, _, outs = run_one(["a", "b"], GenerationParams(max_tokens=2, n_probs=3))
    for out, expected in zip(outs, ["a", "b"]):
        (lp,) = out.logprobs
        assert lp.token_id == TOKEN[expected] and lp.logprob < 0
        assert len(lp.top) == 3 and lp.top[0].token_id == TOKEN[expected]
    _, _, outs = run_one(["a"], GenerationParams(max_tokens=1))
    assert outs[0].logprobs is None


def test_prompt_is_replayed_into_the_sampler_before_the_first_sample():
    _, r, _ = run_one(["a", "b"], GenerationParams(max_tokens=2))
    assert r.sampler.history == PROMPT + [TOKEN["a"], TOKEN["b"]]


def test_embed_is_mean_pooled_and_normalised_and_leaves_slot_reusable():
    core = make_core(n_slots=1, batch_size=4)
    ids = [3, 5, 7, 9, 11, 13]
    vec = core.embed(ids)
    assert vec.shape == (core.model.n_embd,) and abs(np.linalg.norm(vec) - 1.0) < 1e-6
    # the fake's hidden state: one-hot(token % 8) + 0.5 * one-hot((pos + 1) % 8)
    expected = np.zeros(8)
    for pos, t in enumerate(ids):
        expected[t % 8] += 1
        expected[(pos + 1) % 8] += 0.5
    np.testing.assert_allclose(vec, expected / np.linalg.norm(expected), rtol=1e-6)
    assert [c.output for c in core.model.calls] == ["embeddings", "embeddings"]  # chunked by batch_size
    assert core.embed(ids) is not None  # slot cleared and recomputed, no stale positions


def test_embed_returns_none_while_every_slot_is_busy():
    core = make_core(n_slots=1)
    core.add_request(PROMPT, GenerationParams(max_tokens=3))
    core.step()
    assert core.embed([1, 2]) is None


def test_stats_snapshot_reports_slots_queue_and_totals():
    core = make_core(n_slots=2)
    core.add_request(PROMPT, GenerationParams(max_tokens=3))
    core.add_request([5, 6, 7], GenerationParams(max_tokens=3))
    core.add_request([8, 9], GenerationParams(max_tokens=3))
    core.step()
    s = core.stats()
    assert s.n_processing == 2 and s.n_deferred == 1 and s.n_slots == 2
    assert [sl.state for sl in s.slots] == ["generating", "generating"]
    assert s.slots[0].n_past == 4 and s.slots[0].n_remaining == 2
    assert s.kv_used_cells == 7 and s.kv_total_cells == 2 * 64
    run_to_completion(core)
    s = core.stats()
    assert s.n_processing == 0 and s.n_requests_finished_total == 3
    assert s.n_prompt_tokens_processed_total == 9 and s.n_tokens_predicted_total == 9
    assert s.ttft_seconds.count == 3 and s.inter_token_seconds.count == 6
    assert s.n_decode_total == len(core.model.calls) and s.busy_slots_per_decode > 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_slots=0), dict(n_ctx=4), dict(batch_size=2, n_slots=4), dict(slot_prompt_similarity=1.5),
     dict(n_predict=-2), dict(max_queue=-1), dict(kv_dtype="q8")],
)
def test_engine_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        EngineConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=-2), dict(n_probs=-1), dict(id_slot=-2), dict(n_keep=-3), dict(stop=[1])]
)
def test_generation_params_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        GenerationParams(**kwargs)


def test_generation_params_accept_a_single_stop_string_and_drop_empty_ones():
    assert GenerationParams(stop="END").stop == ["END"]
    assert GenerationParams(stop=["", "x"]).stop == ["x"]


def test_empty_and_out_of_vocab_prompts_are_rejected():
    core = make_core()
    with pytest.raises(ValueError, match="empty"):
        core.add_request([], GenerationParams())
    with pytest.raises(ValueError, match="out of range"):
        core.add_request([1, 10_000], GenerationParams())


def test_a_failing_sampler_fails_only_its_own_request():
    from tests.engine.fakes import GreedySampler

    class Exploding(GreedySampler):
        def sample(self, logits):
            raise RuntimeError("the grammar allows no further token")

    core = make_core(n_slots=2)
    samplers = iter([Exploding(), GreedySampler()])
    core._sampler_factory = lambda params: next(samplers)
    bad = core.add_request(PROMPT, GenerationParams(max_tokens=3))
    good = core.add_request([5, 6, 7], GenerationParams(max_tokens=3))
    outs = run_to_completion(core)
    assert outs[bad.request_id][-1].finish_reason == "abort"
    assert "no further token" in outs[bad.request_id][-1].error
    assert len(good.output_ids) == 3 and outs[good.request_id][-1].error is None


# ---- slot files: a save never destroys what is there unless it succeeds ------------------------


def test_saving_a_busy_slot_leaves_the_existing_file_alone(tmp_path):
    core = make_core(n_slots=1)
    path = tmp_path / "slot0.bin"
    path.write_bytes(b"an earlier save")
    core.add_request([1, 2, 3], GenerationParams(max_tokens=50))
    core.step()  # the request now occupies slot 0
    with pytest.raises(ValueError, match="busy|processing"):
        core.save_slot(0, str(path))
    assert path.read_bytes() == b"an earlier save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot0.bin"]


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    core = make_core(n_slots=1)
    path = tmp_path / "slot0.bin"
    path.write_bytes(b"an earlier save")
    core.add_request([1, 2, 3], GenerationParams(max_tokens=2))
    run_to_completion(core)  # slot 0 is idle again, with the prompt cached
    core.model.kv_cache.fail_save = True
    with pytest.raises(OSError):
        core.save_slot(0, str(path))
    assert path.read_bytes() == b"an earlier save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot0.bin"]
    core.model.kv_cache.fail_save = False
    assert core.save_slot(0, str(path)) > 0
    assert path.read_bytes() != b"an earlier save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot0.bin"]
