"""ggserve engine: everything between "token ids in" and "token ids out".

The server layer imports only the names re-exported here. They are resolved lazily (PEP 562)
so that `ggserve tokenize` / `ggserve info` do not pay for importing numba and the model code.
"""
from __future__ import annotations

import importlib
from typing import Any

# exported name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GGUFFile": "engine.gguf",
    "GGUFError": "engine.gguf",
    "GGMLType": "engine.gguf",
    "TensorInfo": "engine.gguf",
    "Tokenizer": "engine.tokenizer",
    "IncrementalDetokenizer": "engine.tokenizer",
    "ChatTemplate": "engine.chat_template",
    "ChatTemplateError": "engine.chat_template",
    "BUILTIN_TEMPLATES": "engine.chat_template",
    "SamplingParams": "engine.sampling",
    "Sampler": "engine.sampling",
    "TokenLogprob": "engine.sampling",
    "GrammarError": "engine.grammar",
    "parse_grammar": "engine.grammar",
    "json_schema_to_grammar": "engine.json_schema",
    "json_object_grammar": "engine.json_schema",
    "parse_logit_bias": "engine.logit_bias",
    "GrammarVocab": "engine.grammar_vocab",
    "AsyncEngine": "engine.async_engine",
    "EngineConfig": "engine.core",
    "EngineCore": "engine.core",
    "ModelInfo": "engine.loader",
    "build_async_engine": "engine.loader",
    "EngineBusyError": "engine.request",
    "EngineError": "engine.request",
    "FinishReason": "engine.request",
    "GenerationParams": "engine.request",
    "PromptTooLongError": "engine.request",
    "RequestOutput": "engine.request",
    "StopType": "engine.request",
    "Timings": "engine.request",
    "TokenProbs": "engine.request",
    "EngineStats": "engine.stats",
    "HistogramData": "engine.stats",
    "SlotStats": "engine.stats",
    "load_model": "engine.model",
    "Model": "engine.model",
    "ModelConfig": "engine.model",
    "SUPPORTED_ARCHITECTURES": "engine.model",
    "KVCache": "engine.kv_cache",
    "RopeSpec": "engine.kv_cache",
    "ModelNotAvailable": "engine.model_store",
    "ensure_model": "engine.model_store",
    "DEFAULT_MODEL": "engine.model_store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
