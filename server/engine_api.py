"""The one place the server touches the engine package.

Owns: importing the engine names the server needs (`from engine import ...`), building the
engine's parameter objects from plain keyword arguments, and reading the engine's output
objects (timings, logprobs, stats) into plain dicts / tuples for the response formatters.

Every engine name comes from `engine`'s public exports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine import (  # noqa: F401  (re-exported for the routes)
    ChatTemplate,
    ChatTemplateError,
    EngineBusyError,
    EngineConfig,
    GenerationParams,
    GGUFFile,
    ModelNotAvailable,
    SamplingParams,
    build_async_engine,
    ensure_model,
    json_schema_to_grammar,
    parse_grammar,
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


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def read_timings(timings: Any) -> dict[str, float]:
    """RequestOutput.timings -> {cache_n, prompt_n, prompt_ms, predicted_n, predicted_ms}."""
    return {
        "cache_n": int(_get(timings, "cache_n", 0) or 0),
        "prompt_n": int(_get(timings, "prompt_n", 0) or 0),
        "prompt_ms": float(_get(timings, "prompt_ms", 0.0) or 0.0),
        "predicted_n": int(_get(timings, "predicted_n", 0) or 0),
        "predicted_ms": float(_get(timings, "predicted_ms", 0.0) or 0.0),
    }


def _token_logprob(entry: Any) -> tuple[int, float]:
    token_id = _get(entry, "token_id", None)
    if token_id is None:
        token_id = _get(entry, "id")
    return int(token_id), float(_get(entry, "logprob"))


def read_logprobs(logprobs: Any) -> list[tuple[tuple[int, float], list[tuple[int, float]]]]:
    """RequestOutput.logprobs -> [((id, logprob), [(id, logprob) top...]), ...], one per new token.

    Accepts the engine's TokenProbs(token_id, logprob, top) and (chosen, [top]) pairs."""
    result = []
    for item in logprobs or ():
        if isinstance(item, (tuple, list)):
            chosen, top = item
        else:
            chosen, top = item, _get(item, "top", ()) or ()
        result.append((_token_logprob(chosen), [_token_logprob(t) for t in top]))
    return result


@dataclass
class StatsView:
    """EngineStats flattened for /metrics and /slots."""

    n_slots: int = 0
    busy_slots: int = 0
    queue_length: int = 0
    kv_used: int = 0
    kv_total: int = 0
    n_decode_total: int = 0
    n_busy_slots_total: int = 0
    # engine-side totals (None when the engine does not count them: the server's own are used)
    prompt_tokens_total: int | None = None
    prompt_seconds_total: float | None = None
    predicted_tokens_total: int | None = None
    predicted_seconds_total: float | None = None
    slots: list = field(default_factory=list)  # per-slot: {id, is_processing, id_task, n_cached}


def read_stats(engine: Any) -> StatsView:
    stats = engine.stats()
    kv = _get(stats, "kv_usage", None)
    if isinstance(kv, (tuple, list)) and len(kv) == 2:
        kv_used, kv_total = kv
    else:
        kv_used, kv_total = _get(stats, "kv_used_cells", 0) or 0, _get(stats, "kv_total_cells", 0) or 0
    slots = []
    for s in _get(stats, "slots", ()) or ():
        slot_id = _get(s, "id", None)
        slots.append(
            {
                "id": int(slot_id if slot_id is not None else _get(s, "slot_id", len(slots))),
                "is_processing": bool(_get(s, "is_processing", False)),
                "id_task": _get(s, "id_task", None) or _get(s, "request_id", None),
                "n_cached": int(_get(s, "n_past", _get(s, "num_cached", 0)) or 0),
            }
        )
    busy = _get(stats, "n_processing", _get(stats, "busy_slots", None))
    prompt_ms = _get(stats, "t_prompt_processing_total_ms", None)
    predicted_ms = _get(stats, "t_tokens_generation_total_ms", None)
    return StatsView(
        n_slots=int(_get(stats, "n_slots", len(slots)) or len(slots)),
        busy_slots=int(busy if busy is not None else sum(s["is_processing"] for s in slots)),
        queue_length=int(_get(stats, "n_deferred", _get(stats, "queue_length", 0)) or 0),
        kv_used=int(kv_used),
        kv_total=int(kv_total),
        n_decode_total=int(_get(stats, "n_decode_total", 0) or 0),
        n_busy_slots_total=int(_get(stats, "n_busy_slots_total", 0) or 0),
        prompt_tokens_total=_get(stats, "n_prompt_tokens_processed_total", None),
        prompt_seconds_total=prompt_ms / 1e3 if prompt_ms is not None else None,
        predicted_tokens_total=_get(stats, "n_tokens_predicted_total", None),
        predicted_seconds_total=predicted_ms / 1e3 if predicted_ms is not None else None,
        slots=slots,
    )

