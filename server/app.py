"""The FastAPI application: factory, lifespan (background model loading), CORS.

Owns: `create_app(settings, engine=None)`; the lifespan that builds the engine in a worker
thread so /health can answer 503 "Loading model" meanwhile, fills in the `ServerState`
(server/state.py) and shuts the engine down at exit; the middleware stack (access log
outermost, then CORS, then the drain gate, so even a 503 "shutting down" carries CORS headers
and gets an access line).
"""
from __future__ import annotations

import asyncio
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
from ggserve.server.chat.template import ChatTemplate
from ggserve.server.errors import install_error_handlers
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
    return ChatTemplate.for_model(
        info.metadata, engine.tokenizer, name=settings.chat_template, source=source
    )


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
        attach_engine(state, engine)
    except asyncio.CancelledError:  # shut down while loading: a started engine must stop too
        if engine is not None:
            await _shutdown_engine(engine)
        raise
    except Exception as exc:  # reported via /health and the callback; the server cannot work
        state.load_error = str(exc) or type(exc).__name__
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


async def _shutdown_engine(engine: Any) -> None:
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        result = shutdown()
        if asyncio.iscoroutine(result):
            await result


def create_app(
    settings: ServerSettings,
    engine: Any = None,
    on_load_failed: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. With `engine` given (tests, embedding) it is used as is: the caller starts and
    stops it. Without, the lifespan builds one from `settings` in the background."""
    state = ServerState(settings=settings, drain=DrainState(timeout=float(settings.timeout)))
    state.metrics = ServerMetrics(lambda: state.engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if engine is not None:
            attach_engine(state, engine)
        else:
            loader = asyncio.create_task(_load_in_background(state, on_load_failed))
        try:
            yield
        finally:
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
