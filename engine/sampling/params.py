"""`SamplingParams`: llama.cpp's sampling settings, defaults and sampler names.

Defaults are `common_params_sampling`'s (common/common.h). Field names follow llama-server's
request fields (`repeat_penalty`, `repeat_last_n`, `typical_p`, ...). `samplers` accepts
llama.cpp's names (and alternative spellings like "top-k", "topk", "nucleus", "temp") as a list,
or a string of the one-letter codes (`"edskypmxt"`), and is normalised to canonical names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ggserve.engine.grammar.gbnf import parse_grammar
from ggserve.engine.sampling.logit_bias import parse_logit_bias

# llama.cpp's sampler types: canonical name -> one-letter code (common/sampling.cpp,
# common_sampler_type_to_str / _to_chr). The one table of sampler names: the aliases below, the
# letter codes, the server's validation and the engine's chain all derive from it.
SAMPLER_TYPES: dict[str, str] = {
    "dry": "d", "top_k": "k", "typ_p": "y", "top_p": "p", "top_n_sigma": "s", "min_p": "m",
    "temperature": "t", "xtc": "x", "infill": "i", "penalties": "e", "adaptive_p": "a",
}
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")


def _sampler_names() -> dict[str, str]:
    """Every accepted (lower-case) name -> canonical, as common_sampler_types_from_names builds
    it: each canonical name, its kebab-case and no-underscore forms, and three misc aliases."""
    names = {}
    for canonical in SAMPLER_TYPES:
        if "_" in canonical:
            names[canonical.replace("_", "-")] = canonical
            names[canonical.replace("_", "")] = canonical
        names[canonical] = canonical
    names.update(nucleus="top_p", temp="temperature", typ="typ_p")
    return names


SAMPLER_NAMES: dict[str, str] = _sampler_names()
SAMPLER_LETTERS: dict[str, str] = {letter: name for name, letter in SAMPLER_TYPES.items()}


def normalize_samplers(value: Any) -> tuple[str, ...]:
    """Sampler order -> canonical names, with llama.cpp's rules: a list of names (matched
    case-insensitively against SAMPLER_NAMES), or a string of one-letter codes (case-sensitive).

    llama.cpp skips a name or letter it does not know with a warning, which silently changes the
    chain; here it is a ValueError (the server's 400) naming what is accepted.
    """
    if isinstance(value, str):
        unknown = sorted({ch for ch in value if ch not in SAMPLER_LETTERS})
        if unknown:
            raise ValueError(f"unknown sampler letter(s) {''.join(unknown)!r} "
                             f"(known: {''.join(SAMPLER_LETTERS)})")
        return tuple(SAMPLER_LETTERS[ch] for ch in value)
    if not isinstance(value, (list, tuple)):
        raise ValueError("samplers must be a list of names or a string of sampler letters")
    result = []
    for name in value:
        if not isinstance(name, str):
            raise ValueError(f"sampler names must be strings, got {name!r}")
        canonical = SAMPLER_NAMES.get(name.lower())
        if canonical is None:
            raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLER_TYPES)} and their "
                             "kebab-case / no-underscore forms, nucleus, temp, typ)")
        result.append(canonical)
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
    adaptive_target: float = -1.0     # adaptive-p: select tokens near this probability (< 0: disabled)
    adaptive_decay: float = 0.90      # adaptive-p EMA decay (the sampler clamps it to [0, 0.99])
    min_keep: int = 0
    seed: int = -1                    # -1 (or 0xFFFFFFFF): random
    n_probs: int = 0
    post_sampling_probs: bool = False
    logit_bias: Any = field(default_factory=dict)   # any shape parse_logit_bias takes (ids only)
    samplers: Any = DEFAULT_SAMPLERS                # names or letters; normalised
    grammar: str | None = None        # GBNF text
    grammar_limits: Any = None        # GrammarLimits for parsing it (None: the defaults)
    ignore_eos: bool = False          # bans EOG tokens (llama.cpp adds -inf biases)

    def __post_init__(self) -> None:
        for name in ("temperature", "dynatemp_range", "dynatemp_exponent", "top_p", "min_p", "typical_p",
                     "top_n_sigma", "xtc_probability", "xtc_threshold", "repeat_penalty", "presence_penalty",
                     "frequency_penalty", "dry_multiplier", "dry_base", "mirostat_tau", "mirostat_eta",
                     "adaptive_target", "adaptive_decay"):
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
        self.parsed_grammar = parse_grammar(self.grammar, limits=self.grammar_limits) if self.grammar else None
        self.logit_bias = tuple(parse_logit_bias(self.logit_bias))
        self.samplers = normalize_samplers(self.samplers)
