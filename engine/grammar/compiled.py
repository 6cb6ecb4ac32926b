"""Compiles a parsed GBNF grammar into an automaton over interned parse states (llama.cpp's
stack-based matcher, memoised).

A parse position is a stack of grammar positions (top = the next character element to
match); the matcher state is the set of all live stacks, interned as an int so that
transitions can be memoised: `(state, code point class) -> state`. Code points are grouped
into classes by every boundary of every character class in the grammar, since code points
in one class behave identically everywhere; this keeps the memo small. `DEAD` is the state
with no live stack.

Stacks are interned too, as linked nodes (top position, parent node): pushing or popping is
one dict lookup whatever the depth, so a long chain of rules costs linear, not quadratic,
time and memory. Node `EMPTY` is the empty stack (the grammar is complete). A character
position matches a sorted tuple of class intervals, so a grammar with many distinct
characters costs space linear in its size; large states index their stacks by class.

Every transition computed costs "work", in units of roughly equal time (~10-40 ns) and
memory: a stack added to a set (C speed, kept in memos), SCAN_WORK per stack a Python loop
looks at, NODE_WORK per new stack node. `reset_budget` allows `limits.max_match_work` of it (per token mask or matched token), beyond
which GrammarLimitError is raised: an ambiguous grammar (e.g. nested optional items, whose
live stacks multiply) fails with a clear error instead of stalling the engine thread.
"""
from __future__ import annotations

from bisect import bisect_right

from ggserve.engine.grammar.gbnf import CharClass, Grammar, GrammarError, GrammarLimitError
from ggserve.engine.grammar.limits import GrammarLimits

DEAD = -1
EMPTY = 0
INDEX_MIN_STACKS = 16  # states with more stacks get a class -> stacks index
NARROW_CLASSES = 8  # stacks whose top matches at most this many classes go into the index
SCAN_WORK = 8  # work per stack looked at in a Python loop (per stack added to a set: 1)
NODE_WORK = 64  # work per new stack node (a few dict and list entries)


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class CompiledGrammar:
    """Flattened grammar positions, interned stacks and states, memoised transitions."""

    def __init__(self, grammar: Grammar, limits: GrammarLimits | None = None):
        self.grammar = grammar
        self.limits = limits if limits is not None else grammar.limits
        self.pos_char: list[CharClass | None] = []
        self.pos_ref: list[int] = []
        self.pos_next: list[int] = []
        self.rule_starts: list[list[int]] = []
        for alternatives in grammar.rules:
            starts = []
            for alt in alternatives:
                first = len(self.pos_char)
                starts.append(first if alt else -1)
                self.pos_char.extend(e if isinstance(e, CharClass) else None for e in alt)
                self.pos_ref.extend(-1 if isinstance(e, CharClass) else e.rule_id for e in alt)
                self.pos_next.extend(range(first + 1, first + len(alt)))
                if alt:
                    self.pos_next.append(-1)
            self.rule_starts.append(starts)
        distinct = set(self.pos_char)
        distinct.discard(None)
        bounds = {0, 0x110000}
        for char in distinct:
            for lo, hi in char.ranges:
                bounds.update((lo, hi + 1))
        self.bounds = sorted(bounds)  # class c = code points [bounds[c], bounds[c+1])
        self.class_rep = self.bounds[:-1]
        n_classes = len(self.class_rep)
        # pos_ivals[pos]: the classes a character position matches, as merged (lo, hi) runs
        class_runs: dict[CharClass | None, tuple[tuple[int, int], ...]] = {None: ()}
        for char in distinct:
            runs = _merge([(self.char_class(lo), self.char_class(hi + 1) - 1) for lo, hi in char.ranges])
            if char.negated:  # the gaps between the runs, within [0, n_classes)
                gaps = zip([0] + [hi + 1 for _, hi in runs], [lo - 1 for lo, _ in runs] + [n_classes - 1])
                runs = [(lo, hi) for lo, hi in gaps if lo <= hi]
            class_runs[char] = tuple(runs)
        self.pos_ivals = [class_runs[char] for char in self.pos_char]
        self.pos_negated = [char is not None and char.negated for char in self.pos_char]
        # stack nodes: node_pos[n] is the top position, node_parent[n] the rest of the stack
        self.node_pos: list[int] = [-1]
        self.node_parent: list[int] = [-1]
        self._nodes: dict[int, int] = {}
        self._key_base = len(self.pos_char) + 1
        self.states: list[frozenset] = []
        self.state_ids: dict[frozenset, int] = {}
        self.complete: list[bool] = []
        self._expanded: dict[int, frozenset] = {}
        self._trans: dict[tuple[int, int], int] = {}
        self._partial: dict[tuple[int, int, int], bool] = {}
        self._index: dict[int, tuple[dict[int, list[int]], list[int]]] = {}
        self._cover: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
        self.budget = 0
        self.reset_budget()
        out: set = set()
        for start in self.rule_starts[grammar.root_id]:
            out |= self._expand(self._push(start, EMPTY) if start >= 0 else EMPTY)
        self.initial_state = self._intern(frozenset(out))

    # -- stacks -----------------------------------------------------------------------------
    def reset_budget(self) -> None:
        """Allows `limits.max_match_work` more work (call before each mask or matched token)."""
        self.budget = self.limits.max_match_work

    def _spend(self, amount: int) -> None:
        self.budget -= amount
        if self.budget < 0:
            raise GrammarLimitError(f"the grammar is too complex to match: one step needs more than "
                                    f"{self.limits.max_match_work} units of work (too many parse stacks "
                                    "alive at once, e.g. from nested optional or ambiguous items)")

    def _push(self, pos: int, parent: int) -> int:
        key = parent * self._key_base + pos
        node = self._nodes.get(key)
        if node is None:
            self._spend(NODE_WORK)
            node = len(self.node_pos)
            self._nodes[key] = node
            self.node_pos.append(pos)
            self.node_parent.append(parent)
        return node

    def _pop(self, node: int) -> int:
        """The stack after the top position's element has been matched."""
        nxt = self.pos_next[self.node_pos[node]]
        parent = self.node_parent[node]
        return self._push(nxt, parent) if nxt >= 0 else parent

    def _children(self, node: int) -> list[int]:
        """For a stack whose top is a rule reference: the stacks starting each alternative."""
        base = self._pop(node)
        return [self._push(start, base) if start >= 0 else base
                for start in self.rule_starts[self.pos_ref[self.node_pos[node]]]]

    def _expand(self, node: int) -> frozenset:
        """All stacks reachable from `node` whose top is a character element (or empty).

        Iterative depth-first search (rule chains can be long); no left recursion means no
        cycles, but a cycle in a hand-built Grammar is still an error, not a hang."""
        memo = self._expanded
        done = memo.get(node)
        if done is not None:
            return done
        if node == EMPTY or self.pos_ref[self.node_pos[node]] < 0:
            memo[node] = done = frozenset((node,))
            return done
        path = [(node, self._children(node), [0])]
        on_path = {node}
        self._spend(SCAN_WORK * len(path[0][1]))
        while path:
            cur, children, at = path[-1]
            descended = False
            while at[0] < len(children):
                child = children[at[0]]
                at[0] += 1
                if child in memo:
                    continue
                if child != EMPTY and self.pos_ref[self.node_pos[child]] >= 0:
                    if child in on_path:
                        raise GrammarError("left recursion in the grammar")
                    on_path.add(child)
                    path.append((child, self._children(child), [0]))
                    self._spend(SCAN_WORK * len(path[-1][1]))
                    descended = True
                    break
                memo[child] = frozenset((child,))
            if descended:
                continue
            out: set = set()
            for child in children:
                out |= memo[child]
            self._spend(len(out))
            memo[cur] = frozenset(out)
            on_path.discard(cur)
            path.pop()
        return memo[node]

    def _intern(self, stacks: frozenset) -> int:
        if not stacks:
            return DEAD
        state = self.state_ids.get(stacks)
        if state is None:
            state = len(self.states)
            self.states.append(stacks)
            self.state_ids[stacks] = state
            self.complete.append(EMPTY in stacks)
        return state

    # -- transitions ------------------------------------------------------------------------
    def char_class(self, cp: int) -> int:
        return bisect_right(self.bounds, cp) - 1

    def _matches(self, pos: int, cls: int) -> bool:
        for lo, hi in self.pos_ivals[pos]:
            if cls <= hi:
                return cls >= lo
        return False

    def _candidates(self, state: int, cls: int) -> list[int]:
        """The stacks of `state` whose top matches class `cls`."""
        stacks = self.states[state]
        node_pos, matches = self.node_pos, self._matches
        if len(stacks) < INDEX_MIN_STACKS:
            self._spend(SCAN_WORK * len(stacks))
            return [n for n in stacks if n != EMPTY and matches(node_pos[n], cls)]
        index = self._index.get(state)
        if index is None:
            buckets: dict[int, list[int]] = {}
            wide: list[int] = []
            for node in stacks:
                if node == EMPTY:
                    continue
                runs = self.pos_ivals[node_pos[node]]
                if sum(hi - lo + 1 for lo, hi in runs) > NARROW_CLASSES:
                    wide.append(node)
                    continue
                for lo, hi in runs:
                    for c in range(lo, hi + 1):
                        buckets.setdefault(c, []).append(node)
            self._spend(SCAN_WORK * len(stacks))
            self._index[state] = index = (buckets, wide)
        buckets, wide = index
        self._spend(SCAN_WORK * len(wide))
        found = [n for n in wide if matches(node_pos[n], cls)]
        return found + buckets[cls] if cls in buckets else found

    def step(self, state: int, cls: int) -> int:
        """State after one code point of class `cls` (DEAD if no stack accepts it)."""
        key = (state, cls)
        nxt = self._trans.get(key)
        if nxt is None:
            out: set = set()
            for node in self._candidates(state, cls):
                expanded = self._expand(self._pop(node))
                self._spend(SCAN_WORK + len(expanded))
                out |= expanded
            nxt = self._intern(frozenset(out))
            self._trans[key] = nxt
        return nxt

    def _partial_cover(self, state: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """Per state, for partial_ok: the merged class runs of its positive tops (starts,
        ends), and the runs of its negated tops sorted by start with running maximum ends."""
        cover = self._cover.get(state)
        if cover is None:
            positive: list[tuple[int, int]] = []
            negated: list[tuple[int, int]] = []
            for node in self.states[state]:
                if node != EMPTY:
                    pos = self.node_pos[node]
                    (negated if self.pos_negated[pos] else positive).extend(self.pos_ivals[pos])
            self._spend(SCAN_WORK * len(self.states[state]))
            runs = _merge(positive)
            negated.sort()
            max_ends: list[int] = []
            for _, hi in negated:
                max_ends.append(max(hi, max_ends[-1]) if max_ends else hi)
            cover = ([lo for lo, _ in runs], [hi for _, hi in runs], [lo for lo, _ in negated], max_ends)
            self._cover[state] = cover
        return cover

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
                starts, ends, neg_starts, neg_max_ends = self._partial_cover(state)
                # like llama.cpp: a positive class needs some overlap with the classes the
                # character could become, a negated class must not exclude any of them
                i = bisect_right(starts, hi_cls) - 1
                ok = i >= 0 and ends[i] >= lo_cls
                if not ok:
                    j = bisect_right(neg_starts, lo_cls) - 1
                    ok = j >= 0 and neg_max_ends[j] >= hi_cls
            self._partial[key] = ok
        return ok

    def walk(self, state: int, cps, value: int = 0, remain: int = 0) -> int:
        """State after the code points `cps` and a trailing partial character (or DEAD)."""
        self.reset_budget()
        for cp in cps:
            state = self.step(state, self.char_class(cp))
            if state == DEAD:
                return DEAD
        if remain and not self.partial_ok(state, value, remain):
            return DEAD
        return state
