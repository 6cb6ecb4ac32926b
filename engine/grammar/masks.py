"""Token masks for a grammar over a vocabulary, cached per grammar state and shared.

`GrammarTables` binds a compiled grammar to a `GrammarVocab` (code point classes of every
token) and computes which tokens may come next in a given matcher state, two ways:
- restrictive states: walk the vocabulary's byte trie, pruning a subtree as soon as its
  prefix is dead (a few thousand nodes after, e.g., `{` in JSON);
- permissive states (most first code points keep the state, e.g. inside a JSON string):
  vectorised skip over the leading code points that loop back to the same state, then walk
  only the remainder of the tokens that leave it.
Masks are cached per (state, partial character), bit-packed. `tables_for` keeps a few
GrammarTables per vocabulary keyed by grammar text, so requests repeating a grammar (the
usual case for a fixed response_format) share transitions and masks. New tables are checked
before they are shared: a grammar that allows no token of the vocabulary at its start raises
GrammarError right away (when the request is built, not after its prompt is processed).
Each mask may cost at most `limits.max_match_work` (see compiled.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ggserve.engine.grammar.gbnf import Grammar, GrammarError
from ggserve.engine.grammar.compiled import DEAD, CompiledGrammar
from ggserve.engine.grammar.vocab import MATRIX_CPS, UTF8_LEAD_REMAIN, GrammarVocab

MASK_CACHE_SIZE = 64
GRAMMAR_CACHE_SIZE = 8
PERMISSIVE_FRACTION = 0.3  # share of tokens whose first code point loops -> vectorised path
_CACHE_LOCK = threading.Lock()  # requests are prepared on several worker threads


class GrammarTables:
    """A compiled grammar bound to a vocabulary: class matrices and cached masks."""

    def __init__(self, compiled: CompiledGrammar, vocab: GrammarVocab):
        self.compiled, self.vocab = compiled, vocab
        # cls_matrix (n_vocab, MATRIX_CPS): code point classes, padding = class n_classes
        cls_unique = self._classes(vocab.cp_unique)
        n_classes = len(compiled.class_rep)
        # the classes some token's code point falls in: the only ones a mask ever steps on
        self._vocab_classes = np.unique(cls_unique[cls_unique < n_classes]).tolist()
        self._cls_matrix = cls_unique[vocab.cp_index]
        self._long_cls = cls_unique[vocab.long_cp_index]  # (n_long, max_cps)
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def _classes(self, cps: np.ndarray) -> np.ndarray:
        """Code points -> classes; padding (-1) -> the extra class n_classes."""
        n_classes = len(self.compiled.class_rep)
        found = np.searchsorted(self.compiled.bounds, cps, side="right") - 1
        # uint8 when the grammar has few classes: halves the cost of the per-step gathers
        dtype = np.uint8 if n_classes < 255 else np.int32
        return np.where(cps >= 0, found, n_classes).astype(dtype)

    def mask(self, state: int, partial: tuple[int, int]) -> np.ndarray:
        """(n_vocab,) bool: tokens that keep the grammar alive (EOG only when complete)."""
        key = (state, partial)
        packed = self._masks.get(key)
        if packed is None:
            mask = self._compute_mask(state, partial)
            self._masks[key] = np.packbits(mask)  # 1 bit per token: ~19 KB at 150k
            if len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
            return mask
        self._masks.move_to_end(key)
        return np.unpackbits(packed, count=self.vocab.n_vocab).view(bool)

    def _compute_mask(self, state: int, partial: tuple[int, int]) -> np.ndarray:
        vocab = self.vocab
        self.compiled.reset_budget()
        if partial[1] != 0:
            # the previous token ended inside a character: only continuation bytes can follow,
            # so the trie walk (started mid-character) prunes almost everything at once
            mask = self._mask_trie(state, partial)
        else:
            next_states = self._next_states(state)
            loops = next_states[:-1] == state
            first = self._cls_matrix[:, 0]
            share = float(np.mean(np.append(loops, False)[first[vocab.usable]])) if vocab.usable.any() else 0.0
            if share >= PERMISSIVE_FRACTION:
                mask = self._mask_permissive(state, loops, next_states)
            else:
                mask = self._mask_trie(state, partial)
        if vocab.eog_array.shape[0]:
            mask[vocab.eog_array] = partial[1] == 0 and self.compiled.complete[state]
        return mask

    def _next_states(self, state: int) -> np.ndarray:
        """(n_classes + 1,) the state after one code point of each class (DEAD for the padding
        class and for classes no token contains, which no mask needs)."""
        out = np.full(len(self.compiled.class_rep) + 1, DEAD, np.int64)
        step = self.compiled.step
        out[self._vocab_classes] = [step(state, c) for c in self._vocab_classes]
        return out

    def _mask_permissive(self, state: int, loops: np.ndarray, next_states: np.ndarray) -> np.ndarray:
        vocab, compiled = self.vocab, self.compiled
        loops_ext = np.append(loops, True)  # the padding class counts as looping
        in_loop = loops_ext[self._cls_matrix]  # (n_vocab, MATRIX_CPS) bool
        # a row is all-True iff its bytes, read as uint64 words, are all 0x0101...01
        words = in_loop.view(np.uint64).reshape(in_loop.shape[0], -1)
        broken = (words != np.uint64(0x0101010101010101)).any(axis=1)
        first_break = np.zeros(vocab.n_vocab, np.int64)
        broken_rows = np.flatnonzero(broken)
        first_break[broken_rows] = np.argmin(in_loop[broken_rows], axis=1)
        if vocab.long_ids.shape[0]:  # tokens longer than the dense matrix: decide on full rows
            long_in = loops_ext[self._long_cls]
            long_broken = ~long_in.all(axis=1)
            broken[vocab.long_ids] = long_broken
            first_break[vocab.long_ids] = np.argmin(long_in, axis=1)
        looping = vocab.usable & ~broken
        mask = looping & (vocab.tail_remain == 0)
        # tokens that loop up to a trailing partial character: one check per distinct tail
        tails = np.flatnonzero(looping & (vocab.tail_remain > 0))
        if tails.shape[0]:
            pairs = vocab.tail_value[tails] * 8 + vocab.tail_remain[tails]
            unique, inverse = np.unique(pairs, return_inverse=True)
            ok = np.array([compiled.partial_ok(state, int(u) >> 3, int(u) & 7) for u in unique], bool)
            mask[tails] = ok[inverse]
        # tokens leaving the loop: the first non-looping class decides for most of them
        breaking = np.flatnonzero(vocab.usable & broken & (vocab.tail_remain >= 0))
        starts = first_break[breaking]
        break_cls = self._cls_matrix[breaking, np.minimum(starts, MATRIX_CPS - 1)]
        if self._long_cls.shape[0]:
            long_at = vocab.long_index[breaking]
            long_cls = self._long_cls[np.maximum(long_at, 0), np.minimum(starts, self._long_cls.shape[1] - 1)]
            break_cls = np.where(long_at >= 0, long_cls, break_cls)
        alive = next_states[break_cls] != DEAD
        walk_ids, walk_from = breaking[alive].tolist(), starts[alive].tolist()
        memo: dict[tuple, bool] = {}
        tail_value, tail_remain, num_cps, long_index = vocab.tail_value, vocab.tail_remain, vocab.num_cps, vocab.long_index
        rows = self._cls_matrix[walk_ids].tolist()
        step = compiled.step
        for token_id, start, row in zip(walk_ids, walk_from, rows):
            n = int(num_cps[token_id])
            if n > MATRIX_CPS:
                row = self._long_cls[long_index[token_id]].tolist()
            suffix = tuple(row[start:n])
            key = (suffix, int(tail_value[token_id]), int(tail_remain[token_id]))
            ok = memo.get(key)
            if ok is None:
                cur = state
                for cls in suffix:
                    cur = step(cur, cls)
                    if cur == DEAD:
                        break
                ok = cur != DEAD and (key[2] == 0 or compiled.partial_ok(cur, key[1], key[2]))
                memo[key] = ok
            mask[token_id] = ok
        return mask

    def _mask_trie(self, state: int, partial: tuple[int, int]) -> np.ndarray:
        vocab, compiled = self.vocab, self.compiled
        node_byte, node_depth, node_end = vocab.node_byte, vocab.node_depth, vocab.node_end
        step, partial_ok, char_class = compiled.step, compiled.partial_ok, compiled.char_class
        node_ok = np.zeros(vocab.n_nodes, bool)
        depth_cap = vocab.max_depth + 1
        # per depth: grammar state, partial character value and bytes still missing
        g_state = [0] * depth_cap
        d_value = [0] * depth_cap
        d_remain = [0] * depth_cap
        g_state[0] = state
        d_value[0], d_remain[0] = partial
        ok_nodes: list[int] = []
        i, n_nodes = 0, vocab.n_nodes
        while i < n_nodes:
            depth = node_depth[i]
            byte = node_byte[i]
            state, value, remain = g_state[depth - 1], d_value[depth - 1], d_remain[depth - 1]
            if remain > 0:
                if byte >> 6 != 2:
                    i = node_end[i]
                    continue
                value = (value << 6) | (byte & 0x3F)
                remain -= 1
                cp = value if remain == 0 else -1
            else:
                need = UTF8_LEAD_REMAIN[byte]
                if need < 0:
                    i = node_end[i]
                    continue
                if need == 0:
                    cp = byte
                else:
                    value, remain, cp = byte & (0x3F >> need), need, -1
            if cp >= 0:
                state = step(state, char_class(cp))
                if state == DEAD:
                    i = node_end[i]
                    continue
            elif not partial_ok(state, value, remain):
                i = node_end[i]
                continue
            g_state[depth], d_value[depth], d_remain[depth] = state, value, remain
            ok_nodes.append(i)
            i += 1
        node_ok[ok_nodes] = True
        token_node = vocab.token_node
        return np.where(token_node >= 0, node_ok[np.maximum(token_node, 0)], False)


def tables_for(vocab: GrammarVocab, text: str, parsed: Grammar) -> GrammarTables:
    """Shared GrammarTables for grammar `text` on `vocab` (LRU of GRAMMAR_CACHE_SIZE).

    New tables compute their first mask before they are shared (so no other thread uses them
    yet): GrammarError if no token can start the grammar (EOG counts when it may be empty),
    GrammarLimitError if that mask is over the work limit."""
    with _CACHE_LOCK:
        tables = vocab.grammar_cache.get(text)
        if tables is not None:
            vocab.grammar_cache.move_to_end(text)
            return tables
    tables = GrammarTables(CompiledGrammar(parsed), vocab)
    if not tables.mask(tables.compiled.initial_state, (0, 0)).any():
        raise GrammarError("the grammar allows no token of this model's vocabulary at its start: "
                           "no token's text can begin a match")
    with _CACHE_LOCK:
        cache = vocab.grammar_cache
        tables = cache.setdefault(text, tables)  # another thread may have built it meanwhile
        cache.move_to_end(text)
        if len(cache) > GRAMMAR_CACHE_SIZE:
            cache.popitem(last=False)
    return tables
