"""Constrained decoding: GBNF grammars and the JSON schemas that compile to them.

Owns parsing GBNF (`gbnf.py`), JSON schema -> GBNF (`json_schema.py`, with `$ref` checking and
rebasing in `schema_refs.py`), the bounds on both (`limits.py`: `GrammarLimits`), the compiled
automaton (`compiled.py`), the vocabulary prepared for matching (`vocab.py`), per-state token
masks shared across requests (`masks.py`), and one request's position in a grammar
(`matcher.py`). Imports go one way: compiled -> masks -> matcher.
"""
