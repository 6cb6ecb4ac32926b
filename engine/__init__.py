"""ggserve engine: everything between "token ids in" and "token ids out".

The server layer imports only the names re-exported here. They are resolved lazily (PEP 562)
so that `ggserve tokenize` / `ggserve info` do not pay for importing numba and the model code.
"""
from __future__ import annotations

import importlib
from typing import Any

# exported name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GGUFFile": "ggserve.engine.model.gguf",
    "GGUFError": "ggserve.engine.model.gguf",
    "GGMLType": "ggserve.engine.model.gguf",
    "TensorInfo": "ggserve.engine.model.gguf",
    "Tokenizer": "ggserve.engine.tokenizer",
    "IncrementalDetokenizer": "ggserve.engine.tokenizer",
    "SamplingParams": "ggserve.engine.sampling.params",
    "Sampler": "ggserve.engine.sampling.sampler",
    "TokenLogprob": "ggserve.engine.sampling.sampler",
    "GrammarError": "ggserve.engine.grammar.gbnf",
    "GrammarLimits": "ggserve.engine.grammar.limits",
    "GrammarLimitError": "ggserve.engine.grammar.gbnf",
    "SchemaReferenceError": "ggserve.engine.grammar.schema_refs",
    "check_schema": "ggserve.engine.grammar.schema_refs",
    "rebase_refs": "ggserve.engine.grammar.schema_refs",
    "parse_grammar": "ggserve.engine.grammar.gbnf",
    "json_schema_to_grammar": "ggserve.engine.grammar.json_schema",
    "json_object_grammar": "ggserve.engine.grammar.json_schema",
    "parse_logit_bias": "ggserve.engine.sampling.logit_bias",
    "normalize_samplers": "ggserve.engine.sampling.params",
    "SAMPLER_NAMES": "ggserve.engine.sampling.params",
    "SAMPLER_LETTERS": "ggserve.engine.sampling.params",
    "GrammarVocab": "ggserve.engine.grammar.vocab",
    "AsyncEngine": "ggserve.engine.async_engine",
    "EngineConfig": "ggserve.engine.core",
    "EngineCore": "ggserve.engine.core",
    "ModelInfo": "ggserve.engine.loader",
    "build_async_engine": "ggserve.engine.loader",
    "EngineBusyError": "ggserve.engine.request",
    "EngineError": "ggserve.engine.request",
    "FinishReason": "ggserve.engine.request",
    "GenerationParams": "ggserve.engine.request",
    "PromptTooLongError": "ggserve.engine.request",
    "Request": "ggserve.engine.request",
    "RequestOutput": "ggserve.engine.request",
    "StopType": "ggserve.engine.request",
    "Timings": "ggserve.engine.request",
    "TokenProbs": "ggserve.engine.request",
    "EngineStats": "ggserve.engine.stats",
    "HistogramData": "ggserve.engine.stats",
    "SlotStats": "ggserve.engine.stats",
    "load_model": "ggserve.engine.model.model",
    "Model": "ggserve.engine.model.model",
    "ModelConfig": "ggserve.engine.model.config",
    "SUPPORTED_ARCHITECTURES": "ggserve.engine.model.config",
    "KVCache": "ggserve.engine.kv_cache",
    "RopeSpec": "ggserve.engine.kv_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ggserve.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
