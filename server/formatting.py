"""Response bodies in llama-server's native shape and in OpenAI's shapes.

Owns: `timings`, `completion_probabilities` / OpenAI `logprobs`, the native /completion result
(final and streamed), OpenAI `text_completion` and `chat.completion(.chunk)` objects and
`usage` (with prompt_tokens_details.cached_tokens). Pure functions of their inputs.
"""
from __future__ import annotations

import secrets
import time
from typing import Any

from ggserve.server import engine_api
from ggserve.server.generation import Completion

SYSTEM_FINGERPRINT = "ggserve-0.1.0"


def new_oai_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


def timings_json(t: dict[str, float]) -> dict[str, Any]:
    prompt_n, prompt_ms = int(t.get("prompt_n", 0)), float(t.get("prompt_ms", 0.0))
    predicted_n, predicted_ms = int(t.get("predicted_n", 0)), float(t.get("predicted_ms", 0.0))
    return {
        "cache_n": int(t.get("cache_n", 0)),
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1e3 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0,
    }


def _piece(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_to_piece(token_id, special=True)
    return raw.decode("utf-8", errors="ignore"), list(raw)


def _prob_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text, raw = _piece(tokenizer, token_id)
    # JSON has no -inf; llama.cpp sends the lowest float instead
    return {"id": token_id, "token": text, "bytes": raw, "logprob": max(logprob, -3.4028234663852886e38)}


def probs_json(tokenizer: Any, logprobs: list) -> list[dict[str, Any]]:
    """llama.cpp's completion_probabilities / OpenAI chat logprobs.content entries."""
    result = []
    for (token_id, logprob), top in logprobs:
        entry = _prob_entry(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [_prob_entry(tokenizer, t, lp) for t, lp in top]
        result.append(entry)
    return result


def legacy_logprobs_json(tokenizer: Any, logprobs: list, text_start: int = 0) -> dict[str, Any]:
    """OpenAI legacy completions logprobs, plus llama.cpp's `content` list (both clients parse it)."""
    entries = probs_json(tokenizer, logprobs)
    offsets, offset = [], text_start
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "content": entries,
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def usage_json(c: Completion) -> dict[str, Any]:
    n_predicted = len(c.token_ids)
    return {
        "completion_tokens": n_predicted,
        "prompt_tokens": c.n_prompt_tokens,
        "total_tokens": n_predicted + c.n_prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": c.n_cached_prompt_tokens},
    }


# ---- native /completion ------------------------------------------------------------------------


def native_final(
    c: Completion, model: str, settings_json: dict, tokenizer: Any, *, stream: bool, return_tokens: bool,
    n_probs: int, index: int = 0,
) -> dict[str, Any]:
    res = {
        "index": index,
        "content": "" if stream else c.content,
        "tokens": c.token_ids if (return_tokens and not stream) else [],
        "id_slot": c.slot_id,
        "stop": True,
        "model": model,
        "tokens_predicted": len(c.token_ids),
        "tokens_evaluated": c.n_prompt_tokens,
        "generation_settings": settings_json,
        "prompt": "",
        "has_new_line": "\n" in c.content,
        "truncated": c.truncated,
        "stop_type": c.stop_type,
        "stopping_word": c.stopping_word,
        "tokens_cached": c.n_prompt_tokens + len(c.token_ids),
        "timings": timings_json(c.timings),
    }
    if not stream and n_probs > 0:
        res["completion_probabilities"] = probs_json(tokenizer, c.logprobs)
    return res


def native_partial(
    out: Any, c: Completion, tokenizer: Any, *, return_tokens: bool, n_probs: int, index: int = 0
) -> dict[str, Any]:
    res = {
        "index": index,
        "content": out.new_text or "",
        "tokens": list(out.new_token_ids or ()) if return_tokens else [],
        "stop": False,
        "id_slot": c.slot_id,
        "tokens_predicted": len(c.token_ids),
        "tokens_evaluated": c.n_prompt_tokens,
    }
    if n_probs > 0:
        res["completion_probabilities"] = probs_json(tokenizer, engine_api.read_logprobs(out.logprobs))
    return res


# ---- OpenAI --------------------------------------------------------------------------------------


def _envelope(object_name: str, oai_id: str, model: str, created: int) -> dict[str, Any]:
    return {
        "id": oai_id,
        "object": object_name,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def usage_json_many(completions: list[Completion], n_choices: int = 1) -> dict[str, Any]:
    """Usage of a request with several choices (and prompts): the completion tokens of every
    choice, each prompt counted once (its `n_choices` choices share it)."""
    per_prompt = completions[::n_choices]
    n_predicted = sum(len(c.token_ids) for c in completions)
    n_prompt = sum(c.n_prompt_tokens for c in per_prompt)
    return {
        "completion_tokens": n_predicted,
        "prompt_tokens": n_prompt,
        "total_tokens": n_predicted + n_prompt,
        "prompt_tokens_details": {"cached_tokens": sum(c.n_cached_prompt_tokens for c in per_prompt)},
    }


def chat_finish_reason(c: Completion, has_tool_calls: bool) -> str:
    finish_reason = c.oai_finish_reason
    return "tool_calls" if finish_reason == "stop" and has_tool_calls else finish_reason


def chat_choice(
    index: int, c: Completion, message: dict[str, Any], tokenizer: Any, n_probs: int
) -> dict[str, Any]:
    finish_reason = chat_finish_reason(c, bool(message.get("tool_calls")))
    choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}
    if n_probs > 0:
        choice["logprobs"] = {"content": probs_json(tokenizer, c.logprobs)}
    return choice


def chat_completion(
    oai_id: str, model: str, choices: list[dict[str, Any]], completions: list[Completion]
) -> dict[str, Any]:
    """`chat.completion`; timings are those of the first choice (llama.cpp has one per request)."""
    return {
        **_envelope("chat.completion", oai_id, model, int(time.time())),
        "choices": choices,
        "usage": usage_json_many(completions, len(completions)),
        "timings": timings_json(completions[0].timings),
    }


def chat_chunk(
    oai_id: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
    logprobs: list | None = None, index: int = 0,
) -> dict[str, Any]:
    if delta is None:  # usage-only chunk: OpenAI sends an empty choices list
        return {**_envelope("chat.completion.chunk", oai_id, model, created), "choices": []}
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {**_envelope("chat.completion.chunk", oai_id, model, created), "choices": [choice]}


def text_completion(
    oai_id: str, model: str, created: int, choices: list[dict[str, Any]], usage: dict | None = None,
    timings: dict | None = None,
) -> dict[str, Any]:
    res = {**_envelope("text_completion", oai_id, model, created), "choices": choices}
    if usage is not None:
        res["usage"] = usage
    if timings is not None:
        res["timings"] = timings
    return res


def text_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
