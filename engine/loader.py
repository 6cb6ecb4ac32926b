"""Builds a ready-to-serve engine from a GGUF path: file -> tokenizer + model -> core -> AsyncEngine.

Owns `ModelInfo` (what /props and /v1/models report about the loaded model) and
`build_async_engine(model_path, EngineConfig)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggserve.engine.async_engine import AsyncEngine
from ggserve.engine.core import EngineConfig, EngineCore


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_params: int  # total elements over all tensors
    size_bytes: int  # total tensor bytes (llama.cpp's "model size")
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    chat_template_source: str | None = None


def model_info_from_gguf(gguf: Any, path: str | Path, n_vocab: int) -> ModelInfo:
    arch = gguf.architecture
    return ModelInfo(
        path=str(path),
        architecture=arch,
        n_vocab=int(n_vocab),
        n_ctx_train=int(gguf.get(f"{arch}.context_length", 0) or 0),
        n_embd=int(gguf.get(f"{arch}.embedding_length", 0) or 0),
        n_params=sum(int(t.n_elements) for t in gguf.tensors.values()),
        size_bytes=sum(int(t.n_bytes) for t in gguf.tensors.values()),
        metadata=dict(gguf.metadata),
        chat_template_source=gguf.get("tokenizer.chat_template"),
    )


def build_async_engine(model_path: str | Path, config: EngineConfig | None = None, start: bool = True) -> AsyncEngine:
    """Load the model and return an AsyncEngine (started unless start=False; start() is idempotent).

    config.n_ctx == 0 means the model's training context per slot.
    """
    from ggserve.engine.model.gguf import GGUFFile
    from ggserve.engine.model.model import load_model
    from ggserve.engine.tokenizer import Tokenizer

    config = config if config is not None else EngineConfig()
    gguf = GGUFFile(model_path)
    if config.n_ctx == 0:
        n_ctx_train = int(gguf.get(f"{gguf.architecture}.context_length", 0) or 0)
        if n_ctx_train <= 0:
            raise ValueError("n_ctx = 0 asks for the model's training context, but the GGUF has none")
        config = dataclasses.replace(config, n_ctx=n_ctx_train)
    tokenizer = Tokenizer.from_gguf(gguf)
    model = load_model(gguf, n_slots=config.n_slots, n_ctx=config.n_ctx, kv_dtype=config.kv_dtype,
                       repack=config.repack)
    core = EngineCore(model, tokenizer, config)
    engine = AsyncEngine(core, tokenizer=tokenizer, model_info=model_info_from_gguf(gguf, model_path, model.n_vocab))
    if start:
        engine.start()
    return engine
