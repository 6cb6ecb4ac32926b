"""`logit_bias` in every shape llama-server accepts -> [(token id, bias)]: the one normaliser.

The server calls it with the request's field and the tokenizer (its ValueError is a 400);
`SamplingParams` calls it without a tokenizer, so programmatic callers get the same rules.
llama-server's rules (params_from_json_cmpl):
- an object `{"15043": 5.0, "Hello": -1}`: a key that is a whole base-10 integer (strtol: leading
  white space and a sign allowed) is a token id, any other key is text;
- an array `[[15043, 1.0], ["Hello", false]]`: an integer is a token id, a string is text, any
  other first element (a float, null, ...) is skipped, as is an element that is not a pair;
- the bias is a number, or `false` for "never" (-inf); `true` or anything else skips the entry;
- ids outside [0, n_vocab) are dropped; text is tokenized without special tokens and every
  resulting token gets the bias. Pairs are kept in order, duplicates included.
A field that is neither an object nor an array, and a NaN bias, are ValueErrors.
"""
from __future__ import annotations

import math
import re
from typing import Any, Protocol

# what C's strtol(key, &end, 10) consumes entirely: white space, a sign, digits
_STRTOL_WHOLE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+\Z")


class TextEncoder(Protocol):
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]: ...


def _bias_value(value: Any) -> float | None:
    if isinstance(value, bool):
        return -math.inf if value is False else None  # `true` has no meaning: skipped
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ValueError("logit_bias values must be numbers or false, got NaN")
        return float(value)
    return None


def _text_ids(text: str, tokenizer: TextEncoder | None) -> list[int]:
    if tokenizer is None:
        raise ValueError(f"logit_bias entry {text!r} is text, which needs the model's tokenizer")
    return list(tokenizer.encode(text, add_special=False, parse_special=False))


def _key_ids(key: Any, from_object: bool, tokenizer: TextEncoder | None) -> list[int]:
    if isinstance(key, bool):
        return []
    if isinstance(key, int):
        return [key]
    if isinstance(key, str):
        if from_object and (key == "" or _STRTOL_WHOLE.match(key)):
            return [int(key) if key.strip() else 0]  # strtol("") is 0 with nothing left over
        return _text_ids(key, tokenizer)
    return []


def parse_logit_bias(field: Any, n_vocab: int | None = None,
                     tokenizer: TextEncoder | None = None) -> list[tuple[int, float]]:
    """A request's `logit_bias` -> [(token_id, bias)] (bias -inf = banned). Ids are checked
    against [0, n_vocab) when n_vocab is given (the Sampler checks again either way)."""
    if field is None:
        return []
    if isinstance(field, dict):
        pairs, from_object = list(field.items()), True
    elif isinstance(field, (list, tuple)):
        pairs = [tuple(el) for el in field if isinstance(el, (list, tuple)) and len(el) == 2]
        from_object = False
    else:
        raise ValueError("logit_bias must be an object {token: bias} or an array [[token, bias], ...]")
    result: list[tuple[int, float]] = []
    for key, value in pairs:
        bias = _bias_value(value)
        if bias is None:
            continue
        ids = _key_ids(key, from_object, tokenizer)
        result.extend((t, bias) for t in ids if n_vocab is None or 0 <= t < n_vocab)
    return result
