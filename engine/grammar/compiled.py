"""Compiles a parsed GBNF grammar into an automaton over interned parse states (llama.cpp's
stack-based matcher, memoised).

A parse position is a stack of grammar positions (top = the next character element to
match); the matcher state is the set of all live stacks, interned as an int so that
transitions can be memoised: `(state, code point class) -> state`. Code points are grouped
into classes by every boundary of every character class in the grammar, since code points
in one class behave identically everywhere; this keeps the memo small. `DEAD` is the state
with no live stack.
"""
from __future__ import annotations

from bisect import bisect_right

from ggserve.engine.grammar.gbnf import CharClass, Grammar

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
