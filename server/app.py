"""The FastAPI application: factory, lifespan (background model loading), CORS.

Owns: `create_app(settings, engine=None)`; the lifespan that builds the engine in a worker
thread so /health can answer 503 "Loading model" meanwhile, fills in the `ServerState`
(server/state.py) and shuts the engine down at exit; the middleware stack (access log
outermost, then CORS, then the drain gate, so even a 503 "shutting down" carries CORS headers
and gets an access line).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ggserve.server import engine_api, model_store
from ggserve.server.access_log import AccessLogMiddleware
from ggserve.server.chat.template import ChatTemplate, ChatTemplateError, TemplateLimits
from ggserve.server.body_limit import BodyLimit
from ggserve.server.errors import CatchAll, install_error_handlers
from ggserve.server.metrics import ServerMetrics
from ggserve.server.routes import register_routes
from ggserve.server.served_engine import ServedEngine
from ggserve.server.settings import ServerSettings
from ggserve.server.shutdown import DrainGate, DrainState
from ggserve.server.state import ServerState

log = logging.getLogger("ggserve.server")


# ---- loading ------------------------------------------------------------------------------------


def _n_ctx_train(model_path: str) -> int:
    gguf = engine_api.GGUFFile(model_path)
    value = gguf.get(f"{gguf.architecture}.context_length")
    if not value:
        raise ValueError(f"{model_path}: no {gguf.architecture}.context_length; pass -c explicitly")
    return int(value)


def engine_config(settings: ServerSettings, model_path: str) -> Any:
    """EngineConfig for these settings (reads the GGUF header only when -c 0 needs n_ctx_train)."""
    n_ctx_train = _n_ctx_train(model_path) if settings.ctx_size == 0 else 0
    return engine_api.make_engine_config(
        n_slots=settings.n_parallel,
        n_ctx=settings.ctx_per_slot(n_ctx_train),
        batch_size=settings.batch_size,
        ubatch_size=settings.ubatch_size,
        n_threads=settings.threads,
        n_predict=settings.n_predict,
        context_shift=settings.context_shift,
        cache_reuse=settings.cache_reuse,
        kv_dtype=settings.cache_type_k,
        repack=settings.repack,
        embeddings=settings.embeddings,
    )


def build_engine(settings: ServerSettings) -> Any:
    """Blocking: resolve the model, size the context, build the engine (runs in a thread)."""
    model_path = settings.model_path or str(model_store.ensure_model())
    return engine_api.build_async_engine(model_path, engine_config(settings, model_path))


def make_chat_template(settings: ServerSettings, engine: Any) -> Any:
    """The model's template, unless --chat-template (a built-in NAME or Jinja text) or
    --chat-template-file overrides it."""
    source = None
    if settings.chat_template_file:
        source = Path(settings.chat_template_file).read_text(encoding="utf-8")
    info = engine.model_info
    limits = TemplateLimits(max_render_seconds=settings.template_seconds, max_output_bytes=settings.template_max_bytes)
    template = ChatTemplate.for_model(
        info.metadata, engine.tokenizer, name=settings.chat_template, source=source, limits=limits
    )
    # rendered once now: a template that cannot render a plain conversation fails the start with
    # one line, rather than every chat request later (it is untrusted code from the GGUF file)
    template.check()
    return template


def _show_progress(stop: threading.Event, label: str) -> None:
    """A one-line elapsed-time indicator while the model loads (only on a terminal)."""
    t0 = time.monotonic()
    frames = "|/-\\"
    i = 0
    while not stop.wait(0.25):
        sys.stderr.write(f"\r{frames[i % 4]} loading {label} ... {time.monotonic() - t0:5.1f}s ")
        sys.stderr.flush()
        i += 1
    sys.stderr.write("\r" + " " * (len(label) + 30) + "\r")
    sys.stderr.flush()


def attach_engine(state: ServerState, engine: Any) -> None:
    config = engine.config
    state.n_ctx_slot = int(getattr(config, "n_ctx", 0))
    state.model_name = state.settings.alias or Path(str(engine.model_info.path)).name
    state.chat_template = make_chat_template(state.settings, engine)
    state.engine = ServedEngine(engine)  # token counts for the access log; abort on shutdown


# Long enough for the engine's prefill path (chunks of >= 32 tokens take dequantize + BLAS,
# and attention over that many cells runs in parallel), which a short prompt never compiles.
WARM_UP_PROMPT_TOKENS = 48


async def warm_up(engine: Any) -> None:
    """Generate 2 tokens from a short prompt and from a ~48-token one so the decode and prefill
    kernels are compiled (numba JIT) before /health reports ready; the first real request is then
    as fast as the rest (llama-server warms up too; --no-warmup skips it). Without the long
    prompt, the first request of a first start spent 5.5 s compiling the prefill path."""
    tokenizer = engine.tokenizer
    short = tokenizer.encode("Hello", add_special=True, parse_special=False)
    words = tokenizer.encode(" hello" * WARM_UP_PROMPT_TOKENS, add_special=False, parse_special=False)
    n_ctx = int(getattr(engine.config, "n_ctx", 0) or 0)  # per slot; 0: the model's own
    limit = WARM_UP_PROMPT_TOKENS if n_ctx <= 0 else min(WARM_UP_PROMPT_TOKENS, n_ctx - 4)  # room for 2 tokens
    params = engine_api.make_generation_params(
        engine_api.make_sampling_params(temperature=0.0), max_tokens=2, cache_prompt=False
    )
    for prompt in (short, (short + words)[:max(len(short), limit)]):
        async for _ in engine.generate(prompt, params):
            pass


async def _load_in_background(state: ServerState, on_load_failed: Callable[[str], None] | None) -> None:
    settings = state.settings
    label = Path(settings.model_path).name if settings.model_path else "the default model"
    stop = threading.Event()
    spinner = None
    if sys.stderr.isatty() and settings.log_format == "text":  # JSON logs: every line is JSON
        spinner = threading.Thread(target=_show_progress, args=(stop, label), daemon=True)
        spinner.start()
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    engine = None
    try:
        engine = await loop.run_in_executor(None, build_engine, settings)
        start = getattr(engine, "start", None)
        if start is not None:
            result = start()
            if asyncio.iscoroutine(result):
                await result
        if settings.warmup:
            await warm_up(engine)
        # the chat template is rendered once here (untrusted code: up to --template-seconds)
        await loop.run_in_executor(None, attach_engine, state, engine)
    except asyncio.CancelledError:  # shut down while loading: a started engine must stop too
        if engine is not None:
            await _shutdown_engine(engine)
        raise
    except Exception as exc:  # reported via /health and the callback; the server cannot work
        state.load_error = str(exc) or type(exc).__name__
        if isinstance(exc, ChatTemplateError):  # the file's template: one line says it all
            log.error("the chat template cannot be used: %s", state.load_error)
        else:
            log.exception("failed to load the model")
        if engine is not None:
            await _shutdown_engine(engine)  # built, but unusable (e.g. a bad chat template)
        if on_load_failed is not None:
            on_load_failed(state.load_error)
        return
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()
    log.info("model %s loaded in %.1f s; server is ready", state.model_name, time.monotonic() - t0)


# How long the exit waits for the engine thread to stop (it finishes the step it is in); a step
# that never returns cannot hold the process: the thread is a daemon.
ENGINE_STOP_SECONDS = 2.0
WATCHDOG_SECONDS = 1.0  # how often the lifespan checks that the engine thread is alive
DEAD_EXIT_SECONDS = 2.0  # a dead engine: /health answers 503 this long before the process exits


async def _shutdown_engine(engine: Any) -> None:
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is None:
        return
    if asyncio.iscoroutinefunction(shutdown):
        await shutdown()
        return
    loop = asyncio.get_running_loop()
    stopped = await loop.run_in_executor(None, functools.partial(shutdown, timeout=ENGINE_STOP_SECONDS))
    if stopped is False:
        log.warning("the engine thread did not stop within %g s; exiting without it", ENGINE_STOP_SECONDS)


async def _watch_engine(state: ServerState, on_engine_dead: Callable[[str], None] | None) -> None:
    """If the engine thread stops on its own (it could not recover from errors), /health turns
    503 at once (ready_state) and the process is asked to exit non-zero."""
    while True:
        await asyncio.sleep(WATCHDOG_SECONDS)
        engine = state.engine
        if engine is not None and getattr(engine, "is_dead", False):
            message = getattr(engine, "failure", None) or "the engine thread stopped"
            log.critical("the engine stopped and cannot recover: %s; exiting in %g s", message, DEAD_EXIT_SECONDS)
            await asyncio.sleep(DEAD_EXIT_SECONDS)  # balancers and clients see /health 503 first
            if on_engine_dead is not None:
                on_engine_dead(message)
            return


def create_app(
    settings: ServerSettings,
    engine: Any = None,
    on_load_failed: Callable[[str], None] | None = None,
    on_engine_dead: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. With `engine` given (tests, embedding) it is used as is: the caller starts and
    stops it. Without, the lifespan builds one from `settings` in the background.
    `on_load_failed` / `on_engine_dead` are told when the server can no longer work (the CLI
    exits non-zero)."""
    state = ServerState(settings=settings, drain=DrainState(timeout=float(settings.timeout)))
    state.metrics = ServerMetrics(lambda: state.engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if engine is not None:
            attach_engine(state, engine)
        else:
            loader = asyncio.create_task(_load_in_background(state, on_load_failed))
        watchdog = asyncio.create_task(_watch_engine(state, on_engine_dead))
        try:
            yield
        finally:
            watchdog.cancel()
            if loader is not None:  # we built the engine, so we stop it (a given one: its owner)
                loader.cancel()
                try:
                    await loader  # its cleanup stops an engine that was still warming up
                except asyncio.CancelledError:
                    pass
                if state.engine is not None:
                    log.info("stopping the engine")
                    await _shutdown_engine(state.engine)

    app = FastAPI(title="ggserve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ggserve = state
    install_error_handlers(app)
    # add_middleware wraps: the first added is innermost
    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(DrainGate, drain=state.drain)
    # llama-server answers any origin; Jan's tauri://localhost included. Credentials are allowed,
    # so Starlette echoes the request's Origin instead of "*".
    app.add_middleware(
        CORSMiddleware,
        allow_origin_regex=".*",
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["*"],
        max_age=600,
    )
    app.add_middleware(AccessLogMiddleware)
    register_routes(app, settings)
    return app
