"""Request fields -> the engine's GenerationParams / SamplingParams, llama-server semantics.

Owns: which request field wins (n_predict > max_completion_tokens > max_tokens > -n flag),
server-wide sampling defaults (CLI flags) under the request's own values, logit_bias in all
of llama.cpp's shapes, stop strings, sampler order names, grammar / json_schema /
response_format, and the `generation_settings` echo that responses and /props carry.
Every bad value is a 400 `APIError` raised here, before any generation starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ggserve.server import engine_api
from ggserve.server.errors import bad_request
from ggserve.server.protocol import SamplingFields
from ggserve.server.settings import ServerSettings

# request fields passed to SamplingParams under the same name when the client sets them
PASSTHROUGH_SAMPLING = (
    "typical_p", "top_n_sigma", "repeat_last_n", "presence_penalty", "frequency_penalty",
    "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers",
    "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent", "mirostat",
    "mirostat_tau", "mirostat_eta", "min_keep", "adaptive_target", "adaptive_decay",
)


RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED (== -1 as uint32): a fresh random seed


@dataclass
class PreparedParams:
    generation: Any  # engine GenerationParams
    settings_json: dict[str, Any]  # llama.cpp's `generation_settings` for the response
    n_probs: int
    stream: bool
    include_usage: bool


def resolve_n_predict(req: SamplingFields, settings: ServerSettings) -> int:
    for value in (req.n_predict, req.max_completion_tokens, req.max_tokens):
        if value is not None:
            return value
    return settings.n_predict


def normalize_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    words = [stop] if isinstance(stop, str) else stop
    return [w for w in words if w]


def parse_logit_bias(req: SamplingFields, tokenizer: Any) -> list[tuple[int, float]]:
    """The engine's one logit_bias normaliser (llama.cpp's rules); its ValueError is a 400."""
    try:
        return engine_api.parse_logit_bias(req.logit_bias, tokenizer.n_vocab, tokenizer)
    except ValueError as exc:
        raise bad_request(str(exc), "logit_bias") from None


def normalize_samplers(req: SamplingFields) -> tuple[str, ...] | None:
    """The engine's one sampler-name table (llama.cpp's names, aliases and letters); a 400 for
    a name it does not know."""
    if req.samplers is None:
        return None
    try:
        return engine_api.normalize_samplers(req.samplers)
    except ValueError as exc:
        raise bad_request(str(exc), "samplers") from None


def check_limits(req: SamplingFields, settings: ServerSettings) -> None:
    """What one request may cost, checked before any of the work: each limit is a setting."""
    if req.logit_bias is not None and len(req.logit_bias) > settings.max_logit_bias:
        raise bad_request(f"logit_bias has {len(req.logit_bias)} entries; at most {settings.max_logit_bias} "
                          "are allowed (--max-logit-bias)", "logit_bias")
    breakers = req.dry_sequence_breakers
    if breakers is not None and len(breakers) > settings.max_dry_breakers:
        raise bad_request(f"dry_sequence_breakers has {len(breakers)} strings; at most {settings.max_dry_breakers} "
                          "are allowed (--max-dry-breakers)", "dry_sequence_breakers")


def resolve_grammar(req: SamplingFields) -> tuple[str | None, dict | None]:
    """(GBNF grammar, JSON schema) from grammar / json_schema / response_format, llama.cpp order."""
    schema = req.json_schema
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            schema = rf.schema_ if rf.schema_ is not None else {}
        else:
            wrapper = rf.json_schema or {}
            schema = wrapper.get("schema", rf.schema_ if rf.schema_ is not None else {})
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be an object", "response_format")
    if req.grammar is not None and schema is not None:
        raise bad_request("give either grammar or a JSON schema, not both", "grammar")
    return req.grammar, schema


def grammar_limits(settings: ServerSettings) -> Any:
    """The engine's grammar bounds, with the size the operator allows (--max-grammar-bytes)."""
    return engine_api.GrammarLimits(max_grammar_bytes=settings.max_grammar_bytes)


def _grammar_fields(grammar: str | None, schema: dict | None, settings: ServerSettings) -> dict[str, Any]:
    """The constraint as GBNF `grammar` sampling fields; a JSON schema is converted here (a bad
    one is a 400 naming json_schema). SamplingParams parses the grammar once, with the limits,
    which it keeps even without a grammar: a tool-call grammar added later gets the same ones."""
    limits = grammar_limits(settings)
    if schema is not None:
        try:
            grammar = engine_api.json_schema_to_grammar(schema, limits=limits)
        except ValueError as exc:
            raise bad_request(f"json_schema: {exc}", "json_schema") from None
    return {"grammar_limits": limits} if grammar is None else {"grammar": grammar, "grammar_limits": limits}


def build_params(
    req: SamplingFields,
    settings: ServerSettings,
    tokenizer: Any,
    n_slots: int,
    n_probs: int | None = None,
    defaults: dict[str, Any] | None = None,
) -> PreparedParams:
    """Validate and convert; `n_probs` overrides the request's own (OpenAI logprobs fields)."""
    defaults = defaults or {}
    check_limits(req, settings)
    if req.id_slot >= n_slots:
        raise bad_request(f"id_slot {req.id_slot} does not exist (the server has {n_slots} slots)", "id_slot")
    if n_probs is None:
        n_probs = req.n_probs or 0
    if n_probs > tokenizer.n_vocab:
        raise bad_request(f"n_probs must be <= {tokenizer.n_vocab}", "n_probs")
    sampling = {
        "temperature": req.temperature if req.temperature is not None else defaults.get("temperature", settings.temperature),
        "top_k": req.top_k if req.top_k is not None else defaults.get("top_k", settings.top_k),
        "top_p": req.top_p if req.top_p is not None else defaults.get("top_p", settings.top_p),
        "min_p": req.min_p if req.min_p is not None else defaults.get("min_p", settings.min_p),
        "repeat_penalty": req.repeat_penalty if req.repeat_penalty is not None
        else defaults.get("repeat_penalty", settings.repeat_penalty),
        "seed": req.seed if req.seed is not None else defaults.get("seed", settings.seed),
        "n_probs": n_probs,
        "logit_bias": parse_logit_bias(req, tokenizer),
        "ignore_eos": req.ignore_eos,
    }
    for name in PASSTHROUGH_SAMPLING:
        value = getattr(req, name)
        if value is not None:
            sampling[name] = value
    samplers = normalize_samplers(req)
    if samplers is not None:
        sampling["samplers"] = samplers
    grammar, schema = resolve_grammar(req)
    sampling.update(_grammar_fields(grammar, schema, settings))
    try:
        sampling_params = engine_api.make_sampling_params(**sampling)
    except engine_api.GrammarError as exc:
        param = "json_schema" if schema is not None else "grammar"
        raise bad_request(f"{param}: {exc}", param) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None

    n_predict = resolve_n_predict(req, settings)
    stop = normalize_stop(req.stop)
    try:
        generation = engine_api.make_generation_params(
            sampling_params,
            max_tokens=n_predict,
            stop=stop,
            ignore_eos=req.ignore_eos,
            n_probs=n_probs,
            cache_prompt=req.cache_prompt,
            id_slot=req.id_slot,
            n_keep=req.n_keep,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None

    settings_json = {
        **{k: v for k, v in sampling.items() if k not in ("logit_bias", "samplers", "grammar_limits")},
        "logit_bias": [{"token": t, "bias": b if math.isfinite(b) else None} for t, b in sampling["logit_bias"]],
        "samplers": list(sampling_params.samplers),
        "n_predict": n_predict,
        "max_tokens": n_predict,
        "stop": stop,
        "n_keep": req.n_keep,
        "ignore_eos": req.ignore_eos,
        "stream": req.stream,
        "cache_prompt": req.cache_prompt,
        "grammar": grammar or "",
        "json_schema": schema,
    }
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return PreparedParams(generation, settings_json, n_probs, req.stream, include_usage)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of an n > 1 request: choice 0 keeps the request's seed (so it
    equals the n = 1 answer), choice i uses seed + i (mod 2^32 - 1, never the "random" value),
    so the choices differ from each other and a repeated request repeats all of them. A random
    seed (-1) stays random: every choice's sampler then draws its own."""
    seed32 = seed & 0xFFFFFFFF
    if index == 0 or seed32 == RANDOM_SEED:
        return seed
    return (seed32 + index) % RANDOM_SEED


def choice_params(generation: Any, index: int) -> Any:
    """GenerationParams for choice `index` (its own sampling stream; see choice_seed)."""
    seed = generation.sampling.seed
    derived = choice_seed(seed, index)
    return generation if derived == seed else engine_api.replace_sampling(generation, seed=derived)


def with_grammar(prepared: PreparedParams, grammar: str) -> PreparedParams:
    """`prepared` constrained by `grammar` (the tool-call grammar of tool_choice required)."""
    try:
        generation = engine_api.replace_sampling(prepared.generation, grammar=grammar)
    except ValueError as exc:  # a tool schema produced a grammar the engine refuses
        raise bad_request(f"tools: {exc}", "tools") from None
    settings_json = {**prepared.settings_json, "grammar": grammar}
    return PreparedParams(generation, settings_json, prepared.n_probs, prepared.stream, prepared.include_usage)
