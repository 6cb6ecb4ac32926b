"""The one place the server touches the engine package.

Owns: importing the engine names the server needs (`from engine import ...`), building the
engine's parameter objects from plain keyword arguments, and reading the engine's output
objects (timings, logprobs, stats) into plain dicts / tuples for the response formatters.

Every engine name comes from `engine`'s public exports.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ggserve.engine import (  # noqa: F401  (re-exported for the routes)
    EngineBusyError,
    EngineConfig,
    EngineStats,
    GenerationParams,
    GrammarError,
    GrammarLimitError,
    GrammarLimits,
    GGUFFile,
    SamplingParams,
    Timings,
    TokenProbs,
    build_async_engine,
    check_schema,
    json_schema_to_grammar,
    normalize_samplers,
    parse_logit_bias,
    rebase_refs,
)


# ---- building engine parameter objects ---------------------------------------------------------


def _build(cls, values: dict[str, Any]):
    """cls(**values) keeping only the fields the dataclass cls knows (the server also carries
    llama-server settings the engine has no use for); ValueError from validation passes up."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in values.items() if k in names})


def make_sampling_params(**values: Any):
    """SamplingParams from llama.cpp-named values; fields this engine lacks are dropped."""
    return _build(SamplingParams, values)


def make_generation_params(sampling, **values: Any):
    return _build(GenerationParams, {**values, "sampling": sampling})


def replace_sampling(generation, **changes: Any):
    """A copy of GenerationParams `generation` whose SamplingParams has `changes` applied
    (re-validated by SamplingParams itself; ValueError passes up)."""
    sampling = dataclasses.replace(generation.sampling, **changes)
    return dataclasses.replace(generation, sampling=sampling)


def make_engine_config(**values: Any):
    return _build(EngineConfig, values)


# ---- reading engine outputs --------------------------------------------------------------------
# Typed: the engine (and the tests' fake engine) hand over its dataclasses, read field by field,
# so a renamed field is an AttributeError in a test, never a silent default.


def read_timings(timings: Timings) -> dict[str, float]:
    """RequestOutput.timings -> {cache_n, prompt_n, prompt_ms, predicted_n, predicted_ms}."""
    return {
        "cache_n": timings.cache_n,
        "prompt_n": timings.prompt_n,
        "prompt_ms": timings.prompt_ms,
        "predicted_n": timings.predicted_n,
        "predicted_ms": timings.predicted_ms,
    }


def read_logprobs(logprobs: list[TokenProbs] | None) -> list[tuple[tuple[int, float], list[tuple[int, float]]]]:
    """RequestOutput.logprobs -> [((id, logprob), [(id, logprob) top...]), ...], one per new token."""
    return [((p.token_id, p.logprob), [(t.token_id, t.logprob) for t in p.top]) for p in logprobs or ()]


def read_stats(engine: Any) -> EngineStats:
    """The engine's live statistics; an all-zero snapshot while no engine is loaded."""
    return engine.stats() if engine is not None else EngineStats.empty()
