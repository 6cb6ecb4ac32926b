"""`SamplingParams`: llama.cpp's sampling settings, defaults and sampler names.

Defaults are `common_params_sampling`'s (common/common.h). Field names follow llama-server's
request fields (`repeat_penalty`, `repeat_last_n`, `typical_p`, ...). `samplers` accepts
llama.cpp's names (and alternative spellings like "top-k", "nucleus", "temp") as a list, or
a string of the short letters (`"edskypmxt"`), and is normalised to canonical names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engine.grammar import parse_grammar

DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")

SAMPLER_LETTERS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p",
                   "p": "top_p", "m": "min_p", "x": "xtc", "t": "temperature"}

SAMPLER_ALIASES = {"top-k": "top_k", "top-p": "top_p", "top-n-sigma": "top_n_sigma", "nucleus": "top_p",
                   "typical-p": "typ_p", "typical": "typ_p", "typ-p": "typ_p", "typ": "typ_p",
                   "min-p": "min_p", "temp": "temperature"}

UNSUPPORTED_SAMPLERS = {"infill", "adaptive_p", "adaptive-p", "i", "a"}


def normalize_samplers(value: Any) -> tuple[str, ...]:
    """Sampler order from a list of names or a string of letters -> canonical names."""
    if isinstance(value, str):
        items = list(value) if ";" not in value else [v for v in value.split(";") if v]
        if ";" not in value and all(ch in SAMPLER_LETTERS or ch in UNSUPPORTED_SAMPLERS for ch in items):
            names = [SAMPLER_LETTERS.get(ch, ch) for ch in items]
        else:
            names = items if ";" in value else [value]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise ValueError("samplers must be a list of names or a string of sampler letters")
    result = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"sampler names must be strings, got {name!r}")
        if name in UNSUPPORTED_SAMPLERS:
            raise ValueError(f"sampler {name!r} is not supported")
        canonical = SAMPLER_ALIASES.get(name, name)
        if canonical not in DEFAULT_SAMPLERS:
            raise ValueError(f"unknown sampler {name!r} (known: {', '.join(DEFAULT_SAMPLERS)})")
        result.append(canonical)
    return tuple(result)


def normalize_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """{id: bias} or [(id, bias)] with integer ids -> ((id, bias), ...); `False` = -inf.

    Text keys must be resolved first with `engine.logit_bias.parse_logit_bias`.
    """
    items = value.items() if isinstance(value, dict) else value
    result = []
    for entry in items:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"logit_bias entries must be (token_id, bias) pairs, got {entry!r}")
        token, bias = entry
        if isinstance(token, str) and token.lstrip("-").isdigit():
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"logit_bias token must be an integer id here, got {token!r}")
        if bias is False:
            bias = -math.inf
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias):
            raise ValueError(f"logit_bias value for token {token} must be a number or false")
        result.append((token, float(bias)))
    return tuple(result)


@dataclass
class SamplingParams:
    temperature: float = 0.8          # <= 0: greedy (argmax)
    dynatemp_range: float = 0.0       # 0 = off; else temperature +- range by entropy
    dynatemp_exponent: float = 1.0
    top_k: int = 40                   # <= 0: disabled
    top_p: float = 0.95               # >= 1: disabled
    min_p: float = 0.05               # <= 0: disabled
    typical_p: float = 1.0            # >= 1: disabled
    top_n_sigma: float = -1.0         # <= 0: disabled
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1        # > 0.5: disabled
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64           # 0: disabled, -1: whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0       # 0: DRY disabled
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64      # 0: disabled, -1: whole context
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    mirostat: int = 0                 # 0 off, 1 = mirostat, 2 = mirostat 2.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    min_keep: int = 0
    seed: int = -1                    # -1 (or 0xFFFFFFFF): random
    n_probs: int = 0
    post_sampling_probs: bool = False
    logit_bias: Any = field(default_factory=dict)   # {id: bias} / [(id, bias)]; normalised
    samplers: Any = DEFAULT_SAMPLERS                # names or letters; normalised
    grammar: str | None = None        # GBNF text
    ignore_eos: bool = False          # bans EOG tokens (llama.cpp adds -inf biases)

    def __post_init__(self) -> None:
        for name in ("temperature", "dynatemp_range", "dynatemp_exponent", "top_p", "min_p", "typical_p",
                     "top_n_sigma", "xtc_probability", "xtc_threshold", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "dry_multiplier", "dry_base", "mirostat_tau", "mirostat_eta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("top_k", "repeat_last_n", "dry_allowed_length", "dry_penalty_last_n", "mirostat",
                     "min_keep", "seed", "n_probs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.repeat_last_n < -1:
            raise ValueError("repeat_last_n must be >= -1")
        if self.dry_penalty_last_n < -1:
            raise ValueError("dry_penalty_last_n must be >= -1")
        if self.mirostat not in (0, 1, 2):
            raise ValueError("mirostat must be 0, 1 or 2")
        if self.min_keep < 0 or self.n_probs < 0 or self.dry_allowed_length < 0:
            raise ValueError("min_keep, n_probs and dry_allowed_length must be >= 0")
        if not isinstance(self.dry_sequence_breakers, (list, tuple)) or not all(
                isinstance(b, str) for b in self.dry_sequence_breakers):
            raise ValueError("dry_sequence_breakers must be a list of strings")
        if not self.dry_sequence_breakers:
            raise ValueError("dry_sequence_breakers must be a non-empty list of strings")
        self.dry_sequence_breakers = tuple(self.dry_sequence_breakers)
        if self.dry_base < 1.0:
            self.dry_base = 1.75  # llama-server resets an invalid base to the default
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("grammar must be a string")
        # parse now so an invalid grammar is a ValueError (HTTP 400) when the request is built,
        # not a failure inside the engine loop; an empty grammar means none, as in llama.cpp
        self.parsed_grammar = parse_grammar(self.grammar) if self.grammar else None
        self.logit_bias = normalize_logit_bias(self.logit_bias)
        self.samplers = normalize_samplers(self.samplers)
