"""AsyncEngine over the fake model: one engine thread, async streams, abort on disconnect, busy
error, embeddings, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from tests.engine.fakes import make_core

from ggserve.engine.async_engine import MAX_CONSECUTIVE_FAILURES, AsyncEngine
from ggserve.engine.request import EngineBusyError, EngineError, GenerationParams, PromptTooLongError


class SlowCore:
    """Wraps a core so each step takes a little time (gives the event loop room to act)."""

    def __init__(self, core, delay: float):
        self._core, self._delay = core, delay

    def step(self):
        time.sleep(self._delay)
        return self._core.step()

    def __getattr__(self, name):
        return getattr(self._core, name)


def make_engine(delay: float = 0.0, max_queue: int = 8, **kw) -> AsyncEngine:
    core = make_core(**kw)
    engine = AsyncEngine(SlowCore(core, delay) if delay else core, max_queue=max_queue)
    engine.start()
    return engine


async def collect(stream):
    return [out async for out in stream]


def test_concurrent_streams_match_solo_runs():
    async def main():
        engine = make_engine(n_slots=2)
        try:
            prompts = [[1 + i, 2 + i, 3] for i in range(5)]
            results = await asyncio.gather(
                *(collect(engine.generate(p, GenerationParams(max_tokens=4 + i))) for i, p in enumerate(prompts))
            )
        finally:
            engine.shutdown()
        solo = []
        for i, p in enumerate(prompts):
            core = make_core(n_slots=1)
            r = core.add_request(p, GenerationParams(max_tokens=4 + i))
            while core.has_work():
                core.step()
            solo.append(r.output_ids)
        for i, outs in enumerate(results):
            assert [t for o in outs for t in o.new_token_ids] == solo[i]
            assert outs[-1].finish_reason == "length" and sum(o.is_finished for o in outs) == 1

    asyncio.run(main())


def test_engine_thread_blocks_when_idle():
    engine = make_engine()
    try:
        time.sleep(0.2)
        cpu_before = time.thread_time()  # this thread; the engine's cost shows in process time
        proc_before = time.process_time()
        time.sleep(0.5)
        busy = time.process_time() - proc_before - (time.thread_time() - cpu_before)
        assert busy < 0.1  # a spinning engine thread would burn ~0.5 s of CPU here
        assert engine.is_running
    finally:
        engine.shutdown()
    assert not engine.is_running


def test_cancelling_the_consumer_aborts_and_frees_the_slot():
    async def main():
        engine = make_engine(delay=0.01, n_slots=1)
        try:
            stream = engine.generate([1, 2, 3], GenerationParams(max_tokens=50))

            async def consume():
                async for _ in stream:
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            task.cancel()  # client disconnect
            with pytest.raises(asyncio.CancelledError):
                await task
            # the next request gets the only slot promptly
            outs = await asyncio.wait_for(collect(engine.generate([4, 5], GenerationParams(max_tokens=2))), 5)
            assert outs[-1].finish_reason == "length"
            stats = engine.stats()
            assert stats.n_requests_finished_total == 2  # the aborted one counts as finished
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_explicit_abort_ends_the_stream_with_abort():
    async def main():
        engine = make_engine(delay=0.01, n_slots=1)
        try:
            stream = engine.generate([1, 2, 3], GenerationParams(max_tokens=1000), request_id="r1")
            first = await stream.__anext__()
            assert first.request_id == "r1" and not first.is_finished
            engine.abort("r1")
            rest = await asyncio.wait_for(collect(stream), 5)
            assert rest[-1].finish_reason == "abort"
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_busy_error_when_the_waiting_queue_is_full():
    async def main():
        engine = make_engine(delay=0.02, n_slots=1, max_queue=1)
        try:
            a = engine.generate([1, 2], GenerationParams(max_tokens=20))
            b = engine.generate([3, 4], GenerationParams(max_tokens=2))
            with pytest.raises(EngineBusyError):
                engine.generate([5, 6], GenerationParams(max_tokens=2))
            await collect(a)
            await collect(b)
            # capacity is back once requests finish
            outs = await collect(engine.generate([5, 6], GenerationParams(max_tokens=2)))
            assert outs[-1].is_finished
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_errors_raise_at_call_time():
    async def main():
        engine = make_engine(n_ctx=16, n_slots=1)
        try:
            with pytest.raises(PromptTooLongError):
                engine.generate(list(range(1, 17)))
            with pytest.raises(ValueError):
                engine.generate([])
            with pytest.raises(PromptTooLongError):
                await engine.embed(list(range(1, 18)))
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_embed_through_the_engine_thread():
    async def main():
        engine = make_engine(n_slots=1)
        try:
            gen = collect(engine.generate([1, 2, 3], GenerationParams(max_tokens=5)))
            vec, outs = await asyncio.gather(engine.embed([3, 4, 5]), gen)
            assert vec.shape == (8,) and abs(float((vec**2).sum()) - 1.0) < 1e-5
            assert outs[-1].is_finished
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_shutdown_aborts_in_flight_requests_and_joins():
    async def main():
        engine = make_engine(delay=0.01, n_slots=1)
        stream = engine.generate([1, 2, 3], GenerationParams(max_tokens=100))
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        rest = await asyncio.wait_for(collect(stream), 5)
        assert rest[-1].finish_reason == "abort"
        assert not engine.is_running
        with pytest.raises(EngineError):
            engine.generate([1, 2])

    asyncio.run(main())


def test_shutdown_with_drain_finishes_requests():
    async def main():
        engine = make_engine(delay=0.005, n_slots=1)
        stream = engine.generate([1, 2, 3], GenerationParams(max_tokens=6))
        await asyncio.to_thread(engine.shutdown, True)
        outs = await asyncio.wait_for(collect(stream), 5)
        assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 6

    asyncio.run(main())


def test_a_failing_step_fails_the_streams_but_not_the_engine():
    async def main():
        core = make_core(n_slots=1)
        engine = AsyncEngine(core)
        real_forward = core.model.forward
        calls = {"n": 0}

        def flaky_forward(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("kernel exploded")
            return real_forward(*args, **kw)

        core.model.forward = flaky_forward
        engine.start()
        try:
            with pytest.raises(EngineError, match="kernel exploded"):
                await collect(engine.generate([1, 2, 3], GenerationParams(max_tokens=5)))
            outs = await collect(engine.generate([1, 2, 3], GenerationParams(max_tokens=2)))
            assert outs[-1].finish_reason == "length"
            assert core.model.kv_cache.num_cached(0) == 4  # recomputed from a cleared slot
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_streams_are_delivered_on_their_own_loop_thread():
    async def main():
        engine = make_engine()
        loop_thread = threading.get_ident()
        seen = []
        try:
            async for out in engine.generate([1, 2], GenerationParams(max_tokens=3)):
                seen.append(threading.get_ident())
        finally:
            engine.shutdown()
        assert seen and all(t == loop_thread for t in seen)

    asyncio.run(main())


# ---- supervision: the engine thread never leaves a waiter hanging -------------------------------


class FlakyCore(SlowCore):
    """A core whose `stats` (called every loop pass, outside `step`) raises while `failing` is set."""

    def __init__(self, core):
        super().__init__(core, 0.0)
        self.failing = 0  # how many more calls fail (-1: all)

    def step(self):
        return self._core.step()

    def stats(self):
        if self.failing:
            self.failing -= 1 if self.failing > 0 else 0
            raise RuntimeError("stats bug")
        return self._core.stats()


def test_an_error_outside_the_step_fails_the_requests_in_flight_and_the_engine_goes_on():
    core = FlakyCore(make_core())
    engine = AsyncEngine(core, max_queue=8)
    engine.start()

    async def main():
        core.failing = 1
        with pytest.raises(EngineError, match="stats bug"):
            await asyncio.wait_for(collect(engine.generate([1, 2, 3], GenerationParams(max_tokens=5))), 30)
        outs = await asyncio.wait_for(collect(engine.generate([4, 5], GenerationParams(max_tokens=3))), 30)
        assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 3

    try:
        asyncio.run(main())
        assert engine.is_running and not engine.is_dead
    finally:
        engine.shutdown(timeout=10)


def test_an_engine_that_cannot_recover_stops_and_every_waiter_gets_an_error():
    core = FlakyCore(make_core())
    engine = AsyncEngine(core, max_queue=8)
    engine.start()

    async def main():
        core.failing = -1
        for _ in range(MAX_CONSECUTIVE_FAILURES):  # every request fails; the third failure in a row is fatal
            with pytest.raises(EngineError):
                await asyncio.wait_for(collect(engine.generate([1, 2, 3], GenerationParams(max_tokens=5))), 30)
        for _ in range(3000):
            if engine.is_dead:
                break
            await asyncio.sleep(0.01)
        assert engine.is_dead and "stats bug" in engine.failure
        with pytest.raises(EngineError, match="the engine stopped"):
            engine.generate([1, 2], GenerationParams(max_tokens=2))
        with pytest.raises(EngineError, match="the engine stopped"):
            await asyncio.wait_for(engine.embed([1, 2]), 30)

    try:
        asyncio.run(main())
        with pytest.raises(EngineError):
            engine.save_slot(0, "/nonexistent/never-written")
    finally:
        engine.shutdown(timeout=10)


def test_a_stream_waiting_on_a_dead_engine_ends_with_an_error():
    release = threading.Event()

    class Stuck(SlowCore):
        def step(self):
            release.wait(30)
            raise SystemExit("the engine thread dies")  # a BaseException: no recovery

    engine = AsyncEngine(Stuck(make_core(), 0.0), max_queue=8)
    engine.start()

    async def main():
        stream = engine.generate([1, 2, 3], GenerationParams(max_tokens=5))
        release.set()
        with pytest.raises(EngineError, match="the engine stopped"):
            await asyncio.wait_for(collect(stream), 30)

    asyncio.run(main())
    assert engine.is_dead


def test_shutdown_gives_up_on_a_step_that_never_returns():
    release = threading.Event()

    class Hung(SlowCore):
        def step(self):
            release.wait(60)
            return self._core.step()

    engine = AsyncEngine(Hung(make_core(), 0.0), max_queue=8)
    engine.start()

    async def main():
        engine.generate([1, 2, 3], GenerationParams(max_tokens=5))
        await asyncio.sleep(0.2)  # the engine thread is now inside the hung step
        assert engine.shutdown(timeout=0.5) is False

    try:
        asyncio.run(main())
    finally:
        release.set()


def test_requests_are_prepared_off_the_engine_thread():
    engine = make_engine()
    threads = []
    real_prepare = engine.core.prepare

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_prepare(*args, **kwargs)

    engine.core.prepare = spy

    async def main():
        prepared = await asyncio.to_thread(engine.prepare, [1, 2, 3], GenerationParams(max_tokens=2), "r-prep")
        outs = await asyncio.wait_for(collect(engine.generate([1, 2, 3], prepared=prepared)), 30)
        assert outs[-1].request_id == "r-prep" and outs[-1].is_finished

    try:
        asyncio.run(main())
    finally:
        engine.shutdown(timeout=10)
    assert threads and "ggserve-engine" not in threads
