"""Quantized weight matrices and the fused dequantize-dot matmul: out = x @ W^T.

Owns `QuantMatrix` (a W (m, k) kept as its raw GGML block bytes, usually a read-only view of
the memory-mapped GGUF file: nothing is copied or repacked, so construction is O(1) and the
process RSS holds the weights once), `matmul`, `matmul_multi` and `get_rows`.

Two paths, chosen per row of x (default: by the number of rows n; the model passes
`blas_rows_by_group(slot_ids)` so a row's path depends only on its own slot's chunk):
- fused (decode, batched decode, short chunks): one parallel region (OpenMP, see threads.py)
  over row chunks of every matrix in the call; each chunk runs a per-type kernel that streams
  the quantized blocks from memory once, prefetching ahead, and dots them with ALL n rows of x
  while they sit in L1. Q8_0 / Q5_0, Q4_K and Q6_K add their integer block sums in f32 in the
  exact shape of llama.cpp's AVX2 build, which for Q4_K and Q6_K depends on the batch that
  llama.cpp would see (`row_shapes`, see row_shapes_by_group and matmul_krows.py). Bitwise
  batch invariant: a row of the result depends only on its x row and its shape flags, never
  on n or the other rows of x (tested for every type).
- BLAS (prefill chunks of >= BLAS_MIN_ROWS rows): W is decoded to f32 a tile of rows at a time
  (serial numba, ~1-4 G values/s) and multiplied with numpy's BLAS sgemm. Faster for many
  rows, but sums in another order, so results differ in the last bits from the fused path.
Activations: as in llama.cpp, Q8_0 / Q5_0 matrices multiply x rounded to Q8_0 and Q4_K / Q5_K /
Q6_K matrices x rounded to Q8_K, on both paths (kernels/activations.py; then exact integer block
sums, kernels/intdot.py); every other type multiplies x as f32. Types with a fused kernel: Q8_0,
Q5_0, Q4_K, Q5_K, Q6_K (everything a Q4_K_M model streams per token; Q4_0 is widened to Q8_0 at
load unless --no-repack); all other types decode 4 rows into f32 scratch and dot those
(rows_generic).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.activations import q8_0_round_trip, q8_k_round_trip, quad_offsets, quantize_q8_0, quantize_q8_k
from ggserve.kernels.matmul_krows import QUAD, TILED, rows_q4_k, rows_q5_k, rows_q6_k
from ggserve.kernels.matmul_rows import rows_generic, rows_q5_0_int, rows_q8_0
from ggserve.kernels.ggml_types import Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, type_name
from ggserve.kernels.quant import (as_bytes, block_layout, deq_range, deq_rows_parallel,
                           f16_table)

K_QUANTS_Q8_K = (Q4_K, Q5_K, Q6_K)  # types whose kernels take x rounded to Q8_K
Q8_0_ACTIVATIONS = (Q8_0, Q5_0)  # types whose kernels take x rounded to Q8_0
AS_Q8_0, AS_Q8_K = 1, 2  # _run_tasks' `activations` bits: the roundings of x a call needs
BLAS_MIN_ROWS = 32  # n at which matmul switches from the fused kernels to tile dequant + sgemm
_TASK_BYTES = 48 * 1024  # weight bytes per parallel task: small enough to balance 2 threads
_TILE_BYTES = 32 * 1024 * 1024  # f32 bytes of one decoded tile on the BLAS path (transient)


class QuantMatrix:
    """A weight matrix W (m, k) in a GGML type, stored as its raw row-major block bytes."""

    def __init__(self, data: np.ndarray, ggml_type: int, m: int, k: int):
        self.ggml_type, self.m, self.k = int(ggml_type), int(m), int(k)
        self.block_size, self.block_bytes = block_layout(self.ggml_type)
        if self.m < 1 or self.k < 1 or self.k % self.block_size:
            raise ValueError(f"{type_name(self.ggml_type)} matrix ({m}, {k}): k must be a positive "
                             f"multiple of the block size {self.block_size}")
        self.data = as_bytes(data)  # uint8 (m * row_bytes,) read-only view, never a copy of a C array
        self.row_bytes = self.k // self.block_size * self.block_bytes
        if self.data.size != self.m * self.row_bytes:
            raise ValueError(f"{type_name(self.ggml_type)} matrix ({m}, {k}) needs "
                             f"{self.m * self.row_bytes} bytes, got {self.data.size}")
        rows = max(4, _TASK_BYTES // self.row_bytes // 4 * 4)
        starts = np.arange(0, self.m, rows, dtype=np.int64)
        # (T, 3): (slot in the call, first row, end row); slot is patched for matmul_multi
        self.tasks = np.stack([np.zeros_like(starts), starts, np.minimum(starts + rows, self.m)], axis=1)
        self._plans: dict[tuple, tuple] = {}  # matmul_multi groups starting with this matrix

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.k)

    @property
    def nbytes(self) -> int:
        return self.data.size

    def dequantize(self) -> np.ndarray:
        """W as f32 (m, k): debugging and tests only (a full f32 copy)."""
        out = np.empty((self.m, self.k), np.float32)
        deq_rows_parallel(self.ggml_type, self.data, f16_table(), 0, self.m, self.k // self.block_size,
                          self.block_size, self.block_bytes, out)
        return out

    def __repr__(self) -> str:
        return f"QuantMatrix({type_name(self.ggml_type)}, m={self.m}, k={self.k})"


@njit(cache=True)
def _rows(ggml_type, block_size, block_bytes, u8, lut, m, k, xf, xq, xd, xo, xqk, xdk, xbs, shapes, n, out, r0, r1, tmp):
    # out (n, m) flat, rows [r0, r1) of W (m, k) <- x (n, k) flat
    if ggml_type == Q8_0:
        rows_q8_0(u8, lut, m, k, xq, xd, n, out, r0, r1)
    elif ggml_type == Q5_0:
        rows_q5_0_int(u8, lut, m, k, xq, xd, xo, n, out, r0, r1)
    elif ggml_type == Q4_K:
        rows_q4_k(u8, lut, m, k, xqk, xdk, xbs, shapes, n, out, r0, r1)
    elif ggml_type == Q5_K:
        rows_q5_k(u8, lut, m, k, xqk, xdk, xbs, shapes, n, out, r0, r1)
    elif ggml_type == Q6_K:
        rows_q6_k(u8, lut, m, k, xqk, xdk, xbs, shapes, n, out, r0, r1)
    else:
        rows_generic(ggml_type, block_size, block_bytes, u8, lut, m, k, xf, n, out, r0, r1, tmp)


@njit(cache=True, parallel=True)
def _run_tasks(tasks, meta, u0, u1, u2, o0, o1, o2, lut, k, xf, activations, shapes, n):
    # tasks (T, 3) = (slot, r0, r1); meta (3, 4) = (ggml_type, block_size, block_bytes, m) per
    # slot; activations: which roundings of x the slots' kernels take (AS_Q8_0 | AS_Q8_K), made
    # here once per call before the parallel loop (one dispatch from Python instead of three)
    q8_0, q8_k = (activations & AS_Q8_0) != 0, (activations & AS_Q8_K) != 0
    xq, xd = np.empty(n * k if q8_0 else 0, np.int8), np.empty(n * (k // 32) if q8_0 else 0, np.float32)
    xo = np.empty(n * (k // 4) if q8_0 else 0, np.int32)
    xqk, xdk = np.empty(n * k if q8_k else 0, np.int8), np.empty(n * (k // 256) if q8_k else 0, np.float32)
    xbs = np.empty(n * (k // 16) if q8_k else 0, np.int32)
    if q8_0:  # (n, k) int8 values, (n, k/32) scales, (n, k/4) offsets for Q5_0
        quantize_q8_0(xf, n, k, xq, xd)
        quad_offsets(xq, xo)
    if q8_k:  # (n, k) int8 values, (n, k/256) scales, (n, k/16) int sums
        quantize_q8_k(xf, n, k, xqk, xdk, xbs)
    for t in prange(tasks.shape[0]):
        s = tasks[t, 0]
        ty = meta[s, 0]
        fused = ty == Q8_0 or ty == Q5_0 or ty == Q4_K or ty == Q5_K or ty == Q6_K
        tmp = np.empty(0 if fused else 4 * k, np.float32)  # decode scratch for rows_generic
        if s == 0:
            _rows(meta[0, 0], meta[0, 1], meta[0, 2], u0, lut, meta[0, 3], k, xf, xq, xd, xo, xqk, xdk, xbs, shapes, n, o0,
                  tasks[t, 1], tasks[t, 2], tmp)
        elif s == 1:
            _rows(meta[1, 0], meta[1, 1], meta[1, 2], u1, lut, meta[1, 3], k, xf, xq, xd, xo, xqk, xdk, xbs, shapes, n, o1,
                  tasks[t, 1], tasks[t, 2], tmp)
        else:
            _rows(meta[2, 0], meta[2, 1], meta[2, 2], u2, lut, meta[2, 3], k, xf, xq, xd, xo, xqk, xdk, xbs, shapes, n, o2,
                  tasks[t, 1], tasks[t, 2], tmp)


def _check(x: np.ndarray, w: QuantMatrix, out: np.ndarray) -> None:
    if x.ndim != 2 or x.shape[1] != w.k or x.dtype != np.float32:
        raise ValueError(f"x must be f32 (n, {w.k}), got {x.dtype} {x.shape}")
    if out.shape != (x.shape[0], w.m) or out.dtype != np.float32:
        raise ValueError(f"out must be f32 ({x.shape[0]}, {w.m}), got {out.dtype} {out.shape}")


def _plan(ws: list[QuantMatrix]) -> tuple:
    """(meta (3, 4), tasks (T, 3), activations, the 3 data arrays) for one group of matrices,
    cached on the first matrix: building them costs ~5 us, and decode repeats the same groups."""
    key = tuple(ws[1:])
    plan = ws[0]._plans.get(key)
    if plan is None:
        meta = np.zeros((3, 4), np.int64)
        tasks = []
        for s, w in enumerate(ws):
            meta[s] = (w.ggml_type, w.block_size, w.block_bytes, w.m)
            t = w.tasks.copy()
            t[:, 0] = s
            tasks.append(t)
        activations = ((AS_Q8_0 if any(w.ggml_type in Q8_0_ACTIVATIONS for w in ws) else 0)
                       | (AS_Q8_K if any(w.ggml_type in K_QUANTS_Q8_K for w in ws) else 0))
        data = [w.data for w in ws]
        data += [data[0]] * (3 - len(data))  # unused slots get any valid array of the same numba type
        plan = (meta, np.ascontiguousarray(np.concatenate(tasks)), activations, data)
        ws[0]._plans[key] = plan
    return plan


def _fused(x: np.ndarray, ws: list[QuantMatrix], outs: list[np.ndarray], shapes: np.ndarray) -> None:
    # x (n, k) @ W_i (m_i, k)^T -> out_i (n, m_i), up to 3 matrices in one parallel region. The
    # decode hot path: ~100 calls per token, so it does as little Python as it can.
    n, k = x.shape
    xf = (x if x.flags.c_contiguous else np.ascontiguousarray(x)).reshape(-1)
    flats = [o.reshape(-1) if o.flags.c_contiguous else np.empty(o.size, np.float32) for o in outs]
    meta, tasks, activations, data = _plan(ws)
    while len(flats) < 3:
        flats.append(flats[0])
    _run_tasks(tasks, meta, data[0], data[1], data[2], flats[0], flats[1], flats[2], f16_table(), k, xf,
               activations, shapes, n)
    for o, f in zip(outs, flats):
        if not o.flags.c_contiguous:
            o[...] = f.reshape(o.shape)


def _blas(x: np.ndarray, w: QuantMatrix, out: np.ndarray) -> None:
    # prefill: decode W to f32 a tile of rows at a time (the whole matrix when it fits
    # _TILE_BYTES) and let numpy's sgemm do x @ tile^T. The decode is serial on purpose:
    # measured, a numba parallel region between sgemm calls made OpenMP and OpenBLAS threads
    # fight over the 2 cores (2.3x slower), while the serial decode is ~20% of the sgemm time.
    # x arrives already rounded as w's type wants it (_blas_all).
    rows = max(4, min(w.m, _TILE_BYTES // (4 * w.k)))
    tile = np.empty((rows, w.k), np.float32)
    bpr = w.k // w.block_size
    lut = f16_table()
    contiguous = out.flags.c_contiguous
    for r0 in range(0, w.m, rows):
        r1 = min(w.m, r0 + rows)
        t = tile[: r1 - r0]
        deq_range(w.ggml_type, w.data, lut, r0 * bpr, (r1 - r0) * bpr, w.block_size, w.block_bytes,
                  tile.reshape(-1), 0)
        if r1 - r0 == w.m and contiguous:
            np.matmul(x, t.T, out=out)
        else:
            out[:, r0:r1] = x @ t.T


def blas_rows_by_group(groups: np.ndarray) -> np.ndarray:
    """(n,) bool: the rows whose group (e.g. slot id) has >= BLAS_MIN_ROWS rows in the batch.

    Passed as `blas_rows`, this makes a row's path, and so its bits, depend only on its own
    group's size: a prompt chunk gets the same numbers alone or batched with other slots."""
    groups = np.asarray(groups).reshape(-1)
    if groups.size < BLAS_MIN_ROWS:
        return np.zeros(groups.size, bool)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return counts[inverse] >= BLAS_MIN_ROWS


def row_shapes_by_span(positions: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """(n,) int8: the batch shape llama.cpp would sum each row in (kernels/matmul_krows.py) if
    row i, at positions[i], were part of one batch holding positions spans[i, 0]..spans[i, 1]:
    QUAD for the batch's first c - c % 4 rows (Q4_K's 4-row gemm), TILED for all of them when
    c >= 8 (the tiled k-quant matmul), c being the span's length."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    index, count = positions - spans[:, 0], spans[:, 1] - spans[:, 0] + 1
    quad = np.where(index < count - count % 4, QUAD, 0)
    return (quad | np.where(count >= 8, TILED, 0)).astype(np.int8)


def row_shapes_by_group(groups: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """(n,) int8 row_shapes_by_span with each group's (slot's) rows as one batch: its rows in
    order (without `positions`), or its whole sequence so far, positions 0..its last (with
    them). Like blas_rows_by_group, a row's shape then depends only on its own group."""
    groups = np.asarray(groups).reshape(-1)
    if positions is None and groups.size < 4:  # too few rows for any batch shape (the decode case)
        return np.zeros(groups.size, np.int8)
    if groups.size and groups.min() == groups.max():  # one group: no per-group bookkeeping
        index = np.arange(groups.size) if positions is None else np.asarray(positions, np.int64).reshape(-1)
        spans = np.zeros((groups.size, 2), np.int64)
        spans[:, 1] = index.max()
        return row_shapes_by_span(index, spans)
    if positions is None:
        index = np.empty(groups.size, np.int64)
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            index[rows] = np.arange(rows.size)
    else:
        index = np.asarray(positions, np.int64).reshape(-1)
    spans = np.zeros((groups.size, 2), np.int64)
    for g in np.unique(groups):
        rows = groups == g
        spans[rows, 1] = index[rows].max()
    return row_shapes_by_span(index, spans)


def _row_shapes(n: int, row_shapes: np.ndarray | None) -> np.ndarray:
    if row_shapes is None:  # one batch: llama.cpp's rule over all n rows
        return row_shapes_by_group(np.zeros(n, np.int8))
    shapes = np.ascontiguousarray(row_shapes, np.int8).reshape(-1)
    if shapes.shape != (n,):
        raise ValueError(f"row_shapes must be a ({n},) int8 array, got shape {shapes.shape}")
    return shapes


def matmul(x: np.ndarray, w: QuantMatrix, out: np.ndarray, blas_rows: np.ndarray | None = None,
           row_shapes: np.ndarray | None = None) -> None:
    """out (n, m) = x (n, k) @ W (m, k)^T, f32. blas_rows (n,) bool picks the rows that take the
    dequantize + BLAS path (default: all rows when n >= BLAS_MIN_ROWS, else none); row_shapes
    (n,) int8 the summation shape of each fused-path row (default: llama.cpp's for one batch
    of n rows; see row_shapes_by_group)."""
    matmul_multi(x, [w], [out], blas_rows, row_shapes)  # which checks x, w and out


def matmul_multi(x: np.ndarray, ws: list[QuantMatrix], outs: list[np.ndarray],
                 blas_rows: np.ndarray | None = None, row_shapes: np.ndarray | None = None) -> None:
    """out_i = x @ W_i^T for several matrices sharing x (QKV, gate/up) in one parallel region."""
    if len(ws) != len(outs):
        raise ValueError(f"{len(ws)} matrices but {len(outs)} outputs")
    for w, o in zip(ws, outs):
        _check(x, w, o)
    n = x.shape[0]
    if blas_rows is None:
        n_blas = n if n >= BLAS_MIN_ROWS else 0
    else:
        blas_rows = np.asarray(blas_rows, bool).reshape(-1)
        if blas_rows.shape != (n,):
            raise ValueError(f"blas_rows must be a ({n},) bool mask, got shape {blas_rows.shape}")
        n_blas = int(np.count_nonzero(blas_rows))
    shapes = _row_shapes(n, row_shapes)
    if n == 0:
        return
    if n_blas == n:
        _blas_all(x, ws, outs)
    elif n_blas == 0:
        _fused_all(x, ws, outs, shapes)
    else:  # a mixed batch: each part on its own path, results scattered back
        for rows, on_blas in ((np.flatnonzero(blas_rows), True), (np.flatnonzero(~blas_rows), False)):
            part = [np.empty((rows.size, w.m), np.float32) for w in ws]
            if on_blas:
                _blas_all(np.ascontiguousarray(x[rows]), ws, part)
            else:
                _fused_all(np.ascontiguousarray(x[rows]), ws, part, shapes[rows])
            for o, p in zip(outs, part):
                o[rows] = p


def _blas_all(x: np.ndarray, ws: list[QuantMatrix], outs: list[np.ndarray]) -> None:
    # The fused kernels multiply Q8_0 / Q4_K / Q5_K / Q6_K matrices with x rounded to Q8_0 /
    # Q8_K (kernels/activations.py, as llama.cpp does); prefill rounds it the same way, once
    # per kind for all the matrices sharing x (Q, K and V; gate and up).
    rounded = {}
    for w, o in zip(ws, outs):
        if w.ggml_type in Q8_0_ACTIVATIONS:
            kind, round_trip = "q8_0", q8_0_round_trip
        elif w.ggml_type in K_QUANTS_Q8_K:
            kind, round_trip = "q8_k", q8_k_round_trip
        else:
            kind, round_trip = "f32", None
        if kind not in rounded:
            rounded[kind] = round_trip(x) if round_trip else x
        _blas(rounded[kind], w, o)


def _fused_all(x: np.ndarray, ws: list[QuantMatrix], outs: list[np.ndarray], shapes: np.ndarray) -> None:
    for i in range(0, len(ws), 3):
        _fused(x, list(ws[i:i + 3]), list(outs[i:i + 3]), shapes)


@njit(cache=True)
def _gather(ggml_type, u8, lut, ids, bpr, block_size, block_bytes, out):
    for i in range(ids.shape[0]):
        deq_range(ggml_type, u8, lut, ids[i] * bpr, bpr, block_size, block_bytes, out[i], 0)


def get_rows(w: QuantMatrix, ids: np.ndarray, out: np.ndarray) -> None:
    """out (n, k) = W[ids] decoded to f32 (embedding lookup); IndexError on an id outside [0, m)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if out.shape != (ids.size, w.k) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous f32 ({ids.size}, {w.k}), got {out.dtype} {out.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= w.m):
        raise IndexError(f"row id out of range [0, {w.m}): {ids.min()}..{ids.max()}")
    _gather(w.ggml_type, w.data, f16_table(), ids, w.k // w.block_size, w.block_size, w.block_bytes, out)
