"""One request's position in a grammar (`GrammarMatcher`): accepts tokens and reports which
may come next.

The automaton is `compiled.py`'s `CompiledGrammar`; the per-state masks of allowed tokens are
`masks.py`'s `GrammarTables`, shared by every request with the same grammar. EOG tokens are
allowed only when some stack is empty (the grammar can be complete).
"""
from __future__ import annotations

import numpy as np

from ggserve.engine.grammar.compiled import DEAD, CompiledGrammar
from ggserve.engine.grammar.gbnf import Grammar, GrammarError, parse_grammar
from ggserve.engine.grammar.masks import GrammarTables
from ggserve.engine.grammar.vocab import GrammarVocab, decode_utf8


class GrammarMatcher:
    """One request's position in a grammar: accepts tokens, reports which may come next."""

    def __init__(self, grammar: "str | Grammar | CompiledGrammar | GrammarTables", vocab: GrammarVocab):
        if isinstance(grammar, str):
            grammar = parse_grammar(grammar)
        if isinstance(grammar, Grammar):
            grammar = CompiledGrammar(grammar)
        self.tables = grammar if isinstance(grammar, GrammarTables) else GrammarTables(grammar, vocab)
        self.compiled = self.tables.compiled
        self.vocab = vocab
        self.state = self.compiled.initial_state
        self.partial = (0, 0)  # (value, remain) of a character split across tokens

    # -- state ------------------------------------------------------------------------------
    @property
    def is_complete(self) -> bool:
        return self.partial[1] == 0 and self.compiled.complete[self.state]

    def _after(self, data: bytes) -> tuple[int, tuple[int, int]]:
        cps, value, remain = decode_utf8(data, *self.partial)
        if remain < 0:
            return DEAD, (0, 0)
        return self.compiled.walk(self.state, cps, value, remain), (value, remain)

    def accepts_bytes(self, data: bytes) -> bool:
        return self._after(data)[0] != DEAD

    def accept_bytes(self, data: bytes) -> None:
        state, partial = self._after(data)
        if state == DEAD:
            raise GrammarError(f"text {data!r} does not match the grammar here")
        self.state, self.partial = state, partial

    def token_allowed(self, token_id: int) -> bool:
        vocab = self.vocab
        if token_id in vocab.eog_ids:
            return self.is_complete
        if not vocab.usable[token_id]:
            return False
        if self.partial[1] == 0:
            cps = vocab.codepoints[token_id]
            value, remain = int(vocab.tail_value[token_id]), int(vocab.tail_remain[token_id])
            if remain < 0:
                return False
            return self.compiled.walk(self.state, cps, value, remain) != DEAD
        return self.accepts_bytes(vocab.token_bytes[token_id])

    def accept_token(self, token_id: int) -> None:
        if token_id in self.vocab.eog_ids:
            if not self.is_complete:
                raise GrammarError("end of generation before the grammar is complete")
            return
        if not self.token_allowed(token_id):
            raise GrammarError(f"token {token_id} is not allowed by the grammar here")
        self.accept_bytes(self.vocab.token_bytes[token_id])

    def allowed_mask(self) -> np.ndarray:
        """(n_vocab,) bool: tokens that keep the grammar alive (EOG only when complete)."""
        return self.tables.mask(self.state, self.partial)
