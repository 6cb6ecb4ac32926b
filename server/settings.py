"""Validated server settings: everything `ggserve` was started with, in one frozen dataclass.

Owns: `ServerSettings` (field names match the TOML config keys; defaults match llama-server),
the derived per-slot context size, and the default sampling settings the CLI can change.
Parsing argv / environment / TOML into these fields is `server/cli/serve.py`'s job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
FLASH_ATTN_MODES = ("on", "off", "auto")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerSettings:
    # model
    model_path: str | None = None  # None -> the bundled default model (engine.ensure_model)
    alias: str | None = None  # the model name clients see; default: the GGUF file name
    # context and batching
    ctx_size: int = 4096  # TOTAL context, divided evenly across slots; 0 = the model's n_ctx_train
    n_parallel: int = 1  # number of slots (concurrent requests)
    batch_size: int = 2048  # max tokens per engine step (logical batch)
    ubatch_size: int = 512  # accepted for compatibility; the engine uses batch_size
    threads: int = -1  # -1 = all cores
    n_predict: int = -1  # default max tokens per request; -1 = until EOS / context full
    context_shift: bool = False
    cache_reuse: int = 0
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"  # accepted for compatibility
    repack: bool = True  # False = --no-repack: weights stay in the mapped file (slower decode)
    warmup: bool = True  # run a 2-token generation before /health says ok (compiles the kernels)
    # http
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    timeout: int = 600  # seconds; uvicorn keep-alive and the SSE send timeout
    webui: bool = True
    endpoint_metrics: bool = False
    endpoint_slots: bool = True
    endpoint_props: bool = False  # POST /props may change the server-wide defaults (--props)
    embeddings: bool = False
    slot_save_path: str | None = None
    # chat
    chat_template: str | None = None  # a built-in template NAME (or inline Jinja source)
    chat_template_file: str | None = None
    jinja: bool = True
    # default sampling (a request's own fields win)
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = -1
    # limits: what one request may cost (a 413 / 400 with the OpenAI envelope past them)
    max_body_bytes: int = 8 << 20  # request body size
    max_prompts: int = 64  # prompts x choices (n) in one request; each takes an engine place
    max_logit_bias: int = 16384  # logit_bias entries
    max_dry_breakers: int = 256  # dry_sequence_breakers strings (each cut to 40 characters)
    max_grammar_bytes: int = 256 << 10  # GBNF grammar text (JSON schemas: the grammar made from them)
    template_seconds: float = 10.0  # a chat template render's time (long chats in some templates take seconds)
    template_max_bytes: int = 8 << 20  # a chat template render's output (and any string it builds)
    # logging
    verbose: bool = False
    log_format: str = "text"
    # not a user option: how often an idle SSE stream sends a `: ping` comment
    sse_ping_seconds: float = field(default=15.0, repr=False)

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        self._check_types()
        need(self.ctx_size >= 0, f"ctx_size must be >= 0 (0 = from model), got {self.ctx_size}")
        need(self.n_parallel >= 1, f"n_parallel must be >= 1, got {self.n_parallel}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.ubatch_size >= 1, f"ubatch_size must be >= 1, got {self.ubatch_size}")
        need(self.threads == -1 or self.threads >= 1, f"threads must be >= 1 or -1, got {self.threads}")
        need(self.n_predict >= -1, f"n_predict must be >= -1, got {self.n_predict}")
        need(self.cache_reuse >= 0, f"cache_reuse must be >= 0, got {self.cache_reuse}")
        need(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        need(self.timeout >= 1, f"timeout must be >= 1 second, got {self.timeout}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        need(0 <= self.top_p <= 1, f"top_p must be in [0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repeat_penalty >= 0, f"repeat_penalty must be >= 0, got {self.repeat_penalty}")
        need(self.cache_type_k in KV_CACHE_TYPES, f"cache_type_k must be one of {KV_CACHE_TYPES}")
        need(self.cache_type_v in KV_CACHE_TYPES, f"cache_type_v must be one of {KV_CACHE_TYPES}")
        # One KV cache dtype serves both K and V; refuse a split rather than silently ignore -ctv.
        need(self.cache_type_v == self.cache_type_k,
             f"-ctk and -ctv must name the same type here (got {self.cache_type_k} and {self.cache_type_v})")
        need(self.flash_attn in FLASH_ATTN_MODES, f"flash_attn must be one of {FLASH_ATTN_MODES}")
        need(self.log_format in LOG_FORMATS, f"log_format must be one of {LOG_FORMATS}")
        need(self.sse_ping_seconds > 0, "sse_ping_seconds must be > 0")
        for name in ("max_body_bytes", "max_prompts", "max_logit_bias", "max_dry_breakers", "max_grammar_bytes",
                     "template_max_bytes"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.template_seconds > 0, f"template_seconds must be > 0, got {self.template_seconds}")
        need(all(isinstance(k, str) and k for k in self.api_keys), "api keys must be non-empty strings")
        need(
            not (self.chat_template and self.chat_template_file),
            "give either chat_template or chat_template_file, not both",
        )
        if self.chat_template_file is not None:
            need(Path(self.chat_template_file).is_file(), f"chat template file not found: {self.chat_template_file}")
        if self.slot_save_path is not None:
            need(Path(self.slot_save_path).is_dir(), f"slot_save_path is not a directory: {self.slot_save_path}")

    def _check_types(self) -> None:
        """Values from TOML / callers must have the default's type (None-default fields: str)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is None:
                ok, expected = value is None or isinstance(value, str), "a string"
            elif isinstance(default, bool):
                ok, expected = isinstance(value, bool), "true or false"
            elif isinstance(default, int):
                ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif isinstance(default, float):
                ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            elif isinstance(default, tuple):
                ok, expected = isinstance(value, tuple), "a list"
            else:
                ok, expected = isinstance(value, type(default)), type(default).__name__
            if not ok:
                raise ValueError(f"{f.name} must be {expected}, got {value!r}")

    # ---- derived values -------------------------------------------------------------------

    def ctx_per_slot(self, n_ctx_train: int) -> int:
        """llama-server semantics: -c is the total context, split evenly across the slots."""
        total = self.ctx_size if self.ctx_size > 0 else n_ctx_train
        per_slot = total // self.n_parallel
        if per_slot < 1:
            raise ValueError(f"ctx_size {total} is too small for {self.n_parallel} slots")
        return per_slot

    def model_name(self) -> str:
        """What /v1/models and every response call the model."""
        if self.alias:
            return self.alias
        return Path(self.model_path).name if self.model_path else "ggserve"

    def replace(self, **changes) -> "ServerSettings":
        return dataclasses.replace(self, **changes)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(ServerSettings) if f.repr)
