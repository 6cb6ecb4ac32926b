"""A vocabulary prepared for grammar masking: each token's code points and a byte trie.

Built once per tokenizer (it costs about a second for a 150k vocabulary) and shared by every
grammar-constrained request. Token pieces are the bytes llama.cpp's grammar sees
(`token_to_piece(id)` with special tokens rendered). Like llama.cpp, a token whose piece is
empty or starts with a NUL byte can never be accepted, and grammars match code points: a
token ending inside a multi-byte UTF-8 character keeps that partial character as its tail.

The trie is stored flat in depth-first preorder so a walk is one Python loop with subtree
skips instead of recursion: `node_byte[i]`, `node_depth[i]` (root children have depth 1),
`node_end[i]` (first node after i's subtree), and `token_node[t]` (node where token t ends,
-1 when the token is excluded).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

UTF8_LEAD_REMAIN = [0] * 128 + [-1] * 64 + [1] * 32 + [2] * 16 + [3] * 8 + [-1] * 8
MATRIX_CPS = 16  # code points kept per token in the dense matrix; longer tokens take a slow path


def decode_utf8(data: bytes, value: int = 0, remain: int = 0) -> tuple[list[int], int, int]:
    """Decodes bytes continuing from a partial character (value, remain).

    Returns (complete code points, value, remain) where remain > 0 means the data ended
    inside a character and remain == -1 means the bytes are not valid UTF-8.
    """
    cps: list[int] = []
    for byte in data:
        if remain > 0:
            if byte >> 6 != 2:
                return cps, 0, -1
            value = (value << 6) | (byte & 0x3F)
            remain -= 1
            if remain == 0:
                cps.append(value)
            continue
        need = UTF8_LEAD_REMAIN[byte]
        if need < 0:
            return cps, 0, -1
        if need == 0:
            cps.append(byte)
        else:
            value, remain = byte & (0x3F >> need), need
    return cps, value, remain


class GrammarVocab:
    """Token pieces decoded to code points, plus the flat byte trie (see module doc)."""

    def __init__(self, token_bytes: list[bytes], eog_ids=frozenset()):
        self.n_vocab = len(token_bytes)
        self.token_bytes = [bytes(b) for b in token_bytes]
        self.eog_ids = frozenset(int(t) for t in eog_ids)
        self.eog_array = np.array(sorted(t for t in self.eog_ids if 0 <= t < self.n_vocab), np.int64)
        self.usable = np.zeros(self.n_vocab, bool)  # not EOG, non-empty, no leading NUL
        # per token: complete code points from a clean start, and the trailing partial state
        self.codepoints: list[list[int]] = [[] for _ in range(self.n_vocab)]
        self.tail_value = np.zeros(self.n_vocab, np.int64)
        self.tail_remain = np.zeros(self.n_vocab, np.int64)
        for token_id, piece in enumerate(self.token_bytes):
            if token_id in self.eog_ids or not piece or piece[0] == 0:
                continue
            self.usable[token_id] = True
            try:
                self.codepoints[token_id] = [ord(ch) for ch in piece.decode("utf-8")]
            except UnicodeDecodeError:
                cps, value, remain = decode_utf8(piece)
                self.codepoints[token_id] = cps
                self.tail_value[token_id], self.tail_remain[token_id] = value, remain
        self.num_cps = np.array([len(c) for c in self.codepoints], np.int64)
        # cp_matrix (n_vocab, MATRIX_CPS) int64: first code points, -1 padded
        self.cp_matrix = np.full((self.n_vocab, MATRIX_CPS), -1, np.int64)
        for token_id, cps in enumerate(self.codepoints):
            if cps:
                row = cps[:MATRIX_CPS]
                self.cp_matrix[token_id, :len(row)] = row
        # long tokens (> MATRIX_CPS code points) get their own full-width matrix
        self.long_ids = np.flatnonzero(self.num_cps > MATRIX_CPS)
        self.long_index = np.full(self.n_vocab, -1, np.int64)
        self.long_index[self.long_ids] = np.arange(self.long_ids.shape[0])
        width = int(self.num_cps.max()) if self.n_vocab else 0
        self.long_cp_matrix = np.full((self.long_ids.shape[0], width), -1, np.int64)
        for row, token_id in enumerate(self.long_ids.tolist()):
            cps = self.codepoints[token_id]
            self.long_cp_matrix[row, :len(cps)] = cps
        # distinct code points (+ the -1 padding) and the matrices as indices into them, so a
        # grammar maps ~10^4 distinct code points to classes instead of every matrix cell
        self.cp_unique, inverse = np.unique(np.concatenate([self.cp_matrix.ravel(), self.long_cp_matrix.ravel()]),
                                            return_inverse=True)
        inverse = inverse.astype(np.int32)
        split = self.cp_matrix.size
        self.cp_index = inverse[:split].reshape(self.cp_matrix.shape)
        self.long_cp_index = inverse[split:].reshape(self.long_cp_matrix.shape)
        self._build_trie()
        # GrammarTables per grammar text (see ggserve.engine.grammar.masks.tables_for)
        self.grammar_cache: OrderedDict = OrderedDict()

    def _build_trie(self) -> None:
        order = sorted((i for i in range(self.n_vocab) if self.usable[i]), key=lambda i: self.token_bytes[i])
        node_byte: list[int] = []
        node_depth: list[int] = []
        token_node = np.full(self.n_vocab, -1, np.int64)
        path: list[int] = []  # node index per depth along the current prefix
        prev = b""
        for token_id in order:
            piece = self.token_bytes[token_id]
            common = 0
            limit = min(len(prev), len(piece))
            while common < limit and prev[common] == piece[common]:
                common += 1
            del path[common:]
            for depth in range(common, len(piece)):
                path.append(len(node_byte))
                node_byte.append(piece[depth])
                node_depth.append(depth + 1)
            token_node[token_id] = path[len(piece) - 1]
            prev = piece
        self.node_byte = node_byte
        self.node_depth = node_depth
        self.token_node = token_node
        n_nodes = len(node_byte)
        # node_end[i]: first later node whose depth is <= depth[i] (end of i's subtree)
        node_end = [n_nodes] * n_nodes
        open_nodes: list[int] = []
        for i, depth in enumerate(node_depth):
            while open_nodes and node_depth[open_nodes[-1]] >= depth:
                node_end[open_nodes.pop()] = i
            open_nodes.append(i)
        self.node_end = node_end
        self.n_nodes = n_nodes
        self.max_depth = max(node_depth, default=0)
