"""Parses `logit_bias` request fields into (token id, bias) pairs, as llama-server does.

Two shapes are accepted:
- OpenAI: `{"15043": 5.0, "Hello": -1}` (keys are token ids, or text that is tokenized);
- llama.cpp: `[[15043, 1.0], ["Hello", false]]` (id or text, bias or `false` = never).
Text entries are tokenized without special tokens and every resulting token gets the bias.
Entries with ids outside the vocabulary are dropped, and malformed entries are skipped, like
llama.cpp; a field that is neither an object nor an array is a ValueError.
"""
from __future__ import annotations

import math
from typing import Any, Protocol


class TextEncoder(Protocol):
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]: ...


def _bias_value(value: Any) -> float | None:
    if isinstance(value, bool):
        return -math.inf if value is False else None  # `true` has no meaning: skipped
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _token_ids(key: Any, n_vocab: int, tokenizer: TextEncoder | None) -> list[int]:
    if isinstance(key, bool):
        return []
    if isinstance(key, int):
        return [key] if 0 <= key < n_vocab else []
    if isinstance(key, str):
        try:
            token_id = int(key, 10)
        except ValueError:
            if tokenizer is None:
                raise ValueError(f"logit_bias entry {key!r} is text but no tokenizer was given") from None
            return [t for t in tokenizer.encode(key, add_special=False) if 0 <= t < n_vocab]
        return [token_id] if 0 <= token_id < n_vocab else []
    return []


def parse_logit_bias(field: Any, n_vocab: int, tokenizer: TextEncoder | None = None) -> list[tuple[int, float]]:
    """Turns a request's `logit_bias` into [(token_id, bias)] (bias -inf = banned)."""
    if field is None:
        return []
    pairs: list[tuple[Any, Any]]
    if isinstance(field, dict):
        pairs = list(field.items())
    elif isinstance(field, (list, tuple)):
        pairs = [tuple(el) for el in field if isinstance(el, (list, tuple)) and len(el) == 2]
    else:
        raise ValueError("logit_bias must be an object {token: bias} or an array [[token, bias], ...]")
    result: list[tuple[int, float]] = []
    for key, value in pairs:
        bias = _bias_value(value)
        if bias is None:
            continue
        result.extend((token_id, bias) for token_id in _token_ids(key, n_vocab, tokenizer))
    return result
