"""Resource limits for grammars: `GrammarLimits`, one frozen set of bounds.

`parse_grammar(text, limits=...)` and `json_schema_to_grammar(schema, limits=...)` check the
size and nesting bounds before (or while) doing any work that could grow with them, and raise
`GrammarLimitError` (a GrammarError, so a ValueError -> HTTP 400) naming the limit. The parsed
`Grammar` keeps its limits, so the compiled automaton (`compiled.py`) applies `max_match_work`.

The defaults are generous for real grammars. json_schema_to_grammar makes ~70 KiB, 7,600
rules, 14,000 alternatives and 20,000 elements of 16 tools with 8 (nested) parameters each; a
256 KiB enum needs up to ~4 million work per mask. The worst grammars that pass take about a second
each to parse and to compile on one core (24,000 alternatives in 247 KiB; 25,000 distinct
characters; 98,000 repetition helpers; 10^6 elements) - see tests/engine/grammar/test_limits.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

# deeper nesting than this would overflow Python's recursion limit (1000) in the recursive
# descent parser / schema converter, which use up to ~3 frames per level
MAX_NESTING_CEILING = 256


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on one grammar (all positive integers)."""

    # GBNF text, in UTF-8 bytes; also the grammar a JSON schema turns into. Matches the
    # server's --max-grammar-bytes default.
    max_grammar_bytes: int = 256 << 10
    # ( ... ) groups inside groups in GBNF; objects/arrays inside each other in a JSON schema
    # document (a property level is two: the schema and its "properties"), and $ref chains
    max_nesting: int = 100
    # rules after the parser's rewriting: named rules, one per group, and one helper per
    # optional repetition (`x{0,2000}` alone makes 2,000)
    max_rules: int = 100_000
    # alternatives over all rules (each repetition helper has two)
    max_alternatives: int = 250_000
    # elements (characters, character classes, rule references) over all alternatives
    max_elements: int = 1_000_000
    # largest count in {m} / {m,n} (llama.cpp's MAX_REPETITION_THRESHOLD); a larger maximum
    # means "unbounded", a larger minimum is an error
    max_repetitions: int = 2000
    # work (parse stacks visited and created, see compiled.py) the matcher may spend on one
    # token mask or one matched token: a deterministic bound on the engine-thread time and
    # memory an ambiguous grammar can take (at the default ~1-2 s and ~100 MB on one core)
    max_match_work: int = 20_000_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GrammarLimits.{f.name} must be a positive integer, got {value!r}")
        if self.max_nesting > MAX_NESTING_CEILING:
            raise ValueError(f"GrammarLimits.max_nesting must be at most {MAX_NESTING_CEILING}, "
                             f"got {self.max_nesting}")


DEFAULT_LIMITS = GrammarLimits()
