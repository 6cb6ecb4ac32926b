"""`ggserve [flags]`: llama-server's command line, environment variables and a TOML config.

Owns: the option table (flag spellings, LLAMA_ARG_* variables as in llama.cpp's common/arg.cpp,
the ServerSettings field each one sets), merging with precedence CLI > environment > TOML
(--config FILE) > defaults, resolving the default model, and running the server (uvicorn with
server/shutdown.py's signal handling: SIGTERM/SIGINT drain running requests, then exit 0).
Usage errors (unknown flag, bad value, bad config) exit with status 2; a model that cannot be
found or loaded exits with status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ggserve.server.logging_setup import configure_logging
from ggserve.server.settings import SETTING_NAMES, ServerSettings

TRUE_WORDS = ("1", "true", "on", "enabled", "yes")
FALSE_WORDS = ("0", "false", "off", "disabled", "no")


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    dest: str  # ServerSettings field
    kind: str  # "str" | "int" | "float" | "true" | "false" | "keys" | "choice"
    help: str
    env: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()


OPTIONS = (
    Option(("-m", "--model"), "model_path", "str", "GGUF model file (default: the bundled Qwen2.5-Coder-0.5B)",
           ("LLAMA_ARG_MODEL",)),
    Option(("-a", "--alias"), "alias", "str", "model name shown to clients", ("LLAMA_ARG_ALIAS",)),
    Option(("-c", "--ctx-size"), "ctx_size", "int", "total context size, divided across slots (0 = from model)",
           ("LLAMA_ARG_CTX_SIZE",)),
    Option(("-np", "--parallel"), "n_parallel", "int", "number of slots (concurrent requests)",
           ("LLAMA_ARG_N_PARALLEL",)),
    Option(("-b", "--batch-size"), "batch_size", "int", "max tokens per engine step", ("LLAMA_ARG_BATCH",)),
    Option(("-ub", "--ubatch-size"), "ubatch_size", "int", "physical batch size (accepted)", ("LLAMA_ARG_UBATCH",)),
    Option(("-t", "--threads"), "threads", "int", "CPU threads for generation (-1 = all)", ("LLAMA_ARG_THREADS",)),
    Option(("-n", "--n-predict", "--predict"), "n_predict", "int", "default max tokens to predict (-1 = unlimited)",
           ("LLAMA_ARG_N_PREDICT",)),
    Option(("--host",), "host", "str", "address to listen on", ("LLAMA_ARG_HOST",)),
    Option(("--port",), "port", "int", "port to listen on", ("LLAMA_ARG_PORT",)),
    Option(("--api-key",), "api_keys", "keys", "API key(s); repeatable, or comma-separated", ("LLAMA_API_KEY",)),
    Option(("--chat-template",), "chat_template", "str", "built-in chat template name, or Jinja template text",
           ("LLAMA_ARG_CHAT_TEMPLATE",)),
    Option(("--chat-template-file",), "chat_template_file", "str", "file holding a Jinja chat template",
           ("LLAMA_ARG_CHAT_TEMPLATE_FILE",)),
    Option(("--jinja",), "jinja", "true", "use the Jinja chat template engine (default)", ("LLAMA_ARG_JINJA",)),
    Option(("--no-jinja",), "jinja", "false", "accepted for compatibility"),
    Option(("--metrics",), "endpoint_metrics", "true", "enable the Prometheus /metrics endpoint",
           ("LLAMA_ARG_ENDPOINT_METRICS",)),
    Option(("--slots",), "endpoint_slots", "true", "enable the /slots endpoint (default)",
           ("LLAMA_ARG_ENDPOINT_SLOTS",)),
    Option(("--no-slots",), "endpoint_slots", "false", "disable the /slots endpoint",
           ("LLAMA_ARG_NO_ENDPOINT_SLOTS",)),
    Option(("--props",), "endpoint_props", "true", "let POST /props change the server-wide sampling defaults",
           ("LLAMA_ARG_ENDPOINT_PROPS",)),
    Option(("--max-body-bytes",), "max_body_bytes", "int", "largest request body (larger: 413)",
           ("GGSERVE_MAX_BODY_BYTES",)),
    Option(("--max-prompts",), "max_prompts", "int", "most prompts x choices in one request",
           ("GGSERVE_MAX_PROMPTS",)),
    Option(("--max-logit-bias",), "max_logit_bias", "int", "most logit_bias entries in one request",
           ("GGSERVE_MAX_LOGIT_BIAS",)),
    Option(("--max-dry-breakers",), "max_dry_breakers", "int", "most dry_sequence_breakers in one request",
           ("GGSERVE_MAX_DRY_BREAKERS",)),
    Option(("--max-grammar-bytes",), "max_grammar_bytes", "int", "largest grammar (GBNF text, or made from a JSON schema)",
           ("GGSERVE_MAX_GRAMMAR_BYTES",)),
    Option(("--template-seconds",), "template_seconds", "float", "longest a chat template may render",
           ("GGSERVE_TEMPLATE_SECONDS",)),
    Option(("--template-max-bytes",), "template_max_bytes", "int", "largest output of a chat template render",
           ("GGSERVE_TEMPLATE_MAX_BYTES",)),
    Option(("--context-shift",), "context_shift", "true", "shift the context instead of stopping when full",
           ("LLAMA_ARG_CONTEXT_SHIFT",)),
    Option(("--no-context-shift",), "context_shift", "false", "stop when the context is full (default)",
           ("LLAMA_ARG_NO_CONTEXT_SHIFT",)),
    Option(("--temp",), "temperature", "float", "default temperature"),
    Option(("--top-k",), "top_k", "int", "default top-k (0 = off)"),
    Option(("--top-p",), "top_p", "float", "default top-p (1.0 = off)"),
    Option(("--min-p",), "min_p", "float", "default min-p (0.0 = off)"),
    Option(("--repeat-penalty",), "repeat_penalty", "float", "default repeat penalty (1.0 = off)"),
    Option(("-s", "--seed"), "seed", "int", "default RNG seed (-1 = random)"),
    Option(("--cache-reuse",), "cache_reuse", "int", "min chunk size to reuse from the cache via KV shifting",
           ("LLAMA_ARG_CACHE_REUSE",)),
    Option(("-to", "--timeout"), "timeout", "int", "server read/write timeout in seconds; also how long a shutdown waits for running requests", ("LLAMA_ARG_TIMEOUT",)),
    Option(("--ui", "--webui"), "webui", "true", "serve the web chat page at / (default)", ("LLAMA_ARG_UI",)),
    Option(("--no-ui", "--no-webui"), "webui", "false", "do not serve the web chat page at /", ("LLAMA_ARG_NO_WEBUI",)),
    Option(("-ctk", "--cache-type-k"), "cache_type_k", "str", "KV cache data type for K",
           ("LLAMA_ARG_CACHE_TYPE_K",)),
    Option(("-ctv", "--cache-type-v"), "cache_type_v", "str", "KV cache data type for V",
           ("LLAMA_ARG_CACHE_TYPE_V",)),
    Option(("-fa", "--flash-attn"), "flash_attn", "choice", "flash attention on|off|auto (accepted)",
           ("LLAMA_ARG_FLASH_ATTN",), ("on", "off", "auto")),
    Option(("-nr", "--no-repack"), "repack", "false",
           "keep every weight in the memory-mapped file (no Q4_0 -> Q8_0 widening at load; slower Q4_0 decode)",
           ("LLAMA_ARG_NO_REPACK",)),
    Option(("--no-warmup",), "warmup", "false", "skip the warm-up generation (first request compiles the kernels)"),
    Option(("--embedding", "--embeddings"), "embeddings", "true", "enable the embedding endpoints",
           ("LLAMA_ARG_EMBEDDINGS",)),
    Option(("--slot-save-path",), "slot_save_path", "str", "directory for slot save/restore files"),
    Option(("-v", "--verbose"), "verbose", "true", "log everything"),
    Option(("--log-format",), "log_format", "choice", "log format", (), ("text", "json")),
)


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggserve", description="llama-server compatible HTTP server for GGUF models (CPU, Python + numba).",
        argument_default=argparse.SUPPRESS, allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (keys as in config.example.toml)")
    for opt in OPTIONS:
        env = f" [env: {', '.join(opt.env)}]" if opt.env else ""
        kwargs: dict[str, Any] = {"dest": f"{opt.dest}__{opt.flags[-1]}", "help": opt.help + env}
        if opt.kind == "true":
            kwargs.update(action="store_true")
        elif opt.kind == "false":
            kwargs.update(action="store_false")
        elif opt.kind == "keys":
            kwargs.update(action="append", metavar="KEY")
        elif opt.kind == "choice":
            kwargs.update(choices=opt.choices, nargs="?" if opt.dest == "flash_attn" else None,
                          const="on" if opt.dest == "flash_attn" else None)
        else:
            kwargs.update(type={"int": int, "float": float, "str": str}[opt.kind],
                          metavar={"int": "N", "float": "X"}.get(opt.kind, opt.dest.upper()))
        parser.add_argument(*opt.flags, **kwargs)
    parser.add_argument("--api-key-file", metavar="FILE", dest="api_key_file", help="file with one API key per line")
    parser.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="ignored_ngl", metavar="N",
                        help="accepted for compatibility (CPU only)")
    parser.add_argument("--mlock", dest="ignored_mlock", action="store_true", help="accepted for compatibility")
    parser.add_argument("--offline", dest="ignored_offline", action="store_true",
                        help="accepted for compatibility: ggserve never downloads anything")
    parser.add_argument("--no-mmap", dest="ignored_mmap", action="store_true", help="accepted for compatibility")
    return parser


def _split_keys(values: list[str]) -> list[str]:
    return [k.strip() for v in values for k in v.split(",") if k.strip()]


def _read_key_file(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read --api-key-file {path}: {exc.strerror}") from None


def _convert(opt: Option, raw: str, source: str) -> Any:
    try:
        if opt.kind in ("true", "false"):
            word = raw.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(f"expected one of {TRUE_WORDS + FALSE_WORDS}")
            on = word in TRUE_WORDS
            return on if opt.kind == "true" else not on
        if opt.kind == "int":
            return int(raw)
        if opt.kind == "float":
            return float(raw)
        if opt.kind == "keys":
            return tuple(_split_keys([raw]))
        if opt.kind == "choice" and raw not in opt.choices:
            raise ValueError(f"expected one of {opt.choices}")
        return raw
    except ValueError as exc:
        raise UsageError(f"{source}={raw!r}: {exc}") from None


def from_environment(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        for name in opt.env:
            if name in environ:
                values[opt.dest] = _convert(opt, environ[name], name)
    return values


def from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(SETTING_NAMES))
    if unknown:
        raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)} (see config.example.toml)")
    if "api_keys" in data:
        keys = data["api_keys"]
        data["api_keys"] = tuple(_split_keys([keys] if isinstance(keys, str) else list(keys)))
    return data


def from_cli(ns: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in vars(ns).items():
        if "__" not in key:
            continue
        dest = key.split("__", 1)[0]
        if dest == "api_keys":
            values["api_keys"] = tuple(values.get("api_keys", ())) + tuple(_split_keys(value))
        else:
            values[dest] = value
    if getattr(ns, "api_key_file", None):
        values["api_keys"] = tuple(values.get("api_keys", ())) + tuple(_read_key_file(ns.api_key_file))
    return values


def resolve_settings(argv: list[str], environ: dict[str, str] | None = None) -> ServerSettings:
    """argv + environment + TOML -> ServerSettings (CLI > env > TOML > defaults).

    Raises SystemExit(2) for argparse errors and UsageError for bad values / files."""
    environ = dict(os.environ if environ is None else environ)
    ns = build_parser().parse_args(argv)
    merged: dict[str, Any] = {}
    config_path = getattr(ns, "config", None) or environ.get("GGSERVE_CONFIG")
    if config_path:
        merged.update(from_toml(config_path))
    merged.update(from_environment(environ))
    merged.update(from_cli(ns))
    try:
        return ServerSettings(**merged)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _fail(message: str, code: int) -> int:
    print(f"ggserve: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = resolve_settings(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    configure_logging(verbose=settings.verbose, log_format=settings.log_format)
    if settings.threads > 0:
        # numba reads this when it is first imported (by the engine, below); the flag wins over
        # an inherited environment value, as every other flag does
        os.environ["NUMBA_NUM_THREADS"] = str(settings.threads)

    from ggserve.server import model_store

    if settings.model_path is None:
        try:
            settings = settings.replace(model_path=str(model_store.ensure_model()))
        except model_store.ModelNotAvailable as exc:
            return _fail(str(exc), 1)
    if not Path(settings.model_path).is_file():
        return _fail(f"model file not found: {settings.model_path}", 1)

    from ggserve.server.app import create_app, engine_config

    try:
        engine_config(settings, settings.model_path)  # bad sizes fail now, not after loading
    except ValueError as exc:
        return _fail(str(exc), 1)
    return _serve(settings, create_app)


def _serve(settings: ServerSettings, create_app: Callable) -> int:
    """Run uvicorn until a signal (server/shutdown.py drains first) or a model load failure.
    Exit status: 0 after a signal, 1 when the model failed to load."""
    from ggserve.server.shutdown import make_server

    exit_code = {"value": 0}
    server_box: dict[str, Any] = {}
    log = logging.getLogger("ggserve.server")

    def on_load_failed(message: str) -> None:
        exit_code["value"] = 1
        if settings.log_format == "text":  # in JSON mode the loader's log record says it
            print(f"ggserve: error: failed to load the model: {message}", file=sys.stderr)
        if "server" in server_box:
            server_box["server"].should_exit = True

    def on_engine_dead(message: str) -> None:
        exit_code["value"] = 1
        if "server" in server_box:
            server_box["server"].should_exit = True

    app = create_app(settings, on_load_failed=on_load_failed, on_engine_dead=on_engine_dead)
    state = app.state.ggserve
    server = make_server(
        app, state.drain, state.abort_running, host=settings.host, port=settings.port,
        log_level="debug" if settings.verbose else "warning",
        timeout_keep_alive=min(settings.timeout, 75),
    )
    server_box["server"] = server
    log.info("listening on http://%s:%d (model %s)", settings.host, settings.port, settings.model_path)
    server.run()
    log.info("stopped")
    return exit_code["value"]
