"""Incremental grammar matching and per-step token masks (llama.cpp's stack-based matcher).

A parse position is a stack of grammar positions (top = the next character element to
match); the matcher state is the set of all live stacks, interned as an int so that
transitions can be memoised: `(state, code point class) -> state`. Code points are grouped
into classes by every boundary of every character class in the grammar, since code points
in one class behave identically everywhere; this keeps the memo small.

`GrammarMatcher` is one request's position (state + a character split across tokens); the
masks of which tokens may come next live in `engine/grammar_masks.py`. EOG tokens are
allowed only when some stack is empty (the grammar can be complete).
"""
from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

import numpy as np

from engine.grammar import CharClass, Grammar, GrammarError, parse_grammar
from engine.grammar_vocab import GrammarVocab, decode_utf8

if TYPE_CHECKING:
    from engine.grammar_masks import GrammarTables

DEAD = -1


class CompiledGrammar:
    """Flattened grammar positions, interned states and memoised transitions."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.pos_char: list[CharClass | None] = []
        self.pos_ref: list[int] = []
        self.pos_next: list[int] = []
        self.rule_starts: list[list[int]] = []
        for alternatives in grammar.rules:
            starts = []
            for alt in alternatives:
                first = len(self.pos_char)
                for i, element in enumerate(alt):
                    is_char = isinstance(element, CharClass)
                    self.pos_char.append(element if is_char else None)
                    self.pos_ref.append(-1 if is_char else element.rule_id)
                    self.pos_next.append(first + i + 1 if i + 1 < len(alt) else -1)
                starts.append(first if alt else -1)
            self.rule_starts.append(starts)
        bounds = {0, 0x110000}
        for char in self.pos_char:
            if char is not None:
                for lo, hi in char.ranges:
                    bounds.update((lo, hi + 1))
        self.bounds = sorted(bounds)  # class c = code points [bounds[c], bounds[c+1])
        self.class_rep = self.bounds[:-1]
        # pos_classes[pos]: bitmask over code point classes matched by a character position
        self.pos_classes = [0] * len(self.pos_char)
        self.pos_negated = [char is not None and char.negated for char in self.pos_char]
        for pos, char in enumerate(self.pos_char):
            if char is not None:
                self.pos_classes[pos] = sum(1 << c for c, cp in enumerate(self.class_rep) if char.matches(cp))
        self.states: list[frozenset] = []
        self.state_ids: dict[frozenset, int] = {}
        self.complete: list[bool] = []
        self._expanded: dict[tuple, frozenset] = {}
        self._trans: dict[tuple[int, int], int] = {}
        self._partial: dict[tuple[int, int, int], bool] = {}
        self.initial_state = self._intern(self._root_stacks())

    def _root_stacks(self) -> frozenset:
        out: set = set()
        for start in self.rule_starts[self.grammar.root_id]:
            out |= self._expand((start,) if start >= 0 else ())
        return frozenset(out)

    def _intern(self, stacks: frozenset) -> int:
        if not stacks:
            return DEAD
        state = self.state_ids.get(stacks)
        if state is None:
            state = len(self.states)
            self.states.append(stacks)
            self.state_ids[stacks] = state
            self.complete.append(() in stacks)
        return state

    def _expand(self, stack: tuple) -> frozenset:
        """All stacks reachable from `stack` whose top is a character element (or empty)."""
        cached = self._expanded.get(stack)
        if cached is not None:
            return cached
        if not stack or self.pos_char[stack[-1]] is not None:
            result = frozenset((stack,))
        else:
            top = stack[-1]
            base = stack[:-1] + ((self.pos_next[top],) if self.pos_next[top] >= 0 else ())
            out: set = set()
            for start in self.rule_starts[self.pos_ref[top]]:
                out |= self._expand(base + (start,) if start >= 0 else base)
            result = frozenset(out)
        self._expanded[stack] = result
        return result

    def char_class(self, cp: int) -> int:
        return bisect_right(self.bounds, cp) - 1

    def step(self, state: int, cls: int) -> int:
        """State after one code point of class `cls` (DEAD if no stack accepts it)."""
        key = (state, cls)
        nxt = self._trans.get(key)
        if nxt is None:
            out: set = set()
            pos_classes = self.pos_classes
            for stack in self.states[state]:
                if stack and (pos_classes[stack[-1]] >> cls) & 1:
                    top = stack[-1]
                    rest = stack[:-1] + ((self.pos_next[top],) if self.pos_next[top] >= 0 else ())
                    out |= self._expand(rest)
            nxt = self._intern(frozenset(out))
            self._trans[key] = nxt
        return nxt

    def partial_ok(self, state: int, value: int, remain: int) -> bool:
        """Could some completion of a partial UTF-8 character be matched next?"""
        key = (state, value, remain)
        ok = self._partial.get(key)
        if ok is None:
            ok = False
            if remain > 0 and not (remain == 1 and value < 2):
                low = value << (remain * 6)
                high = low | ((1 << (remain * 6)) - 1)
                if low == 0:
                    low = {2: 1 << 11, 3: 1 << 16}.get(remain, low)
                high = min(high, 0x10FFFF)
                lo_cls, hi_cls = self.char_class(low), self.char_class(max(low, high))
                span = ((1 << (hi_cls + 1)) - 1) ^ ((1 << lo_cls) - 1)  # classes overlapping [low, high]
                for stack in self.states[state]:
                    if not stack:
                        continue
                    matched = self.pos_classes[stack[-1]]
                    # like llama.cpp: a positive class needs some overlap, a negated class
                    # must not exclude any code point the partial character could become
                    if (span & ~matched) == 0 if self.pos_negated[stack[-1]] else (span & matched) != 0:
                        ok = True
                        break
            self._partial[key] = ok
        return ok

    def walk(self, state: int, cps, value: int = 0, remain: int = 0) -> int:
        """State after the code points `cps` and a trailing partial character (or DEAD)."""
        for cp in cps:
            state = self.step(state, self.char_class(cp))
            if state == DEAD:
                return DEAD
        if remain and not self.partial_ok(state, value, remain):
            return DEAD
        return state


class GrammarMatcher:
    """One request's position in a grammar: accepts tokens, reports which may come next."""

    def __init__(self, grammar: "str | Grammar | CompiledGrammar | GrammarTables", vocab: GrammarVocab):
        from engine.grammar_masks import GrammarTables  # masks build on this module

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
