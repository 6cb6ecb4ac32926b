"""Causal self-attention of a flat batch of query rows over per-slot K/V caches.

Owns: the attention kernel (scaled dot product, causal by position, grouped-query heads,
optional sliding window), `store_kv` (writing a batch's K/V rows into the cache, rounding to
float16 exactly like numpy / ggml: nearest even), and the f16-bits <-> f32 row converters.

The cache is the model's 5-D array (n_slots, n_layers, n_ctx, n_kv_heads, head_dim), passed whole
with the layer index so no strided view is built per call. Cell t of a slot holds the key of
position t. A float16 cache is passed as its uint16 bit pattern (numba has no float16 on CPU);
a float32 cache is passed as is; both compile from the same source through `load_row`.

Numerics are those of llama.cpp's x86 attention without flash attention (its reference outputs
were made so), to the bit for a prompt batch: with an f16 cache, Q and the softmax probabilities
are rounded to f16 before their products (`round_to_cache`); Q.K and P.V are summed as llamafile's
tinyBLAS sums them (8 lanes of fused multiply-adds over the head dim, resp. over cells by cell
index mod 8, then lane_sum8; kernels/lanes.py); the softmax adds its exponentials per aligned
run of 8 cells in f32, into a float64 total, and normalizes before the probabilities weight V.
One difference remains: exp is libm's expf, ggml uses its own polynomial (they agree on most
inputs; the f16 rounding of the probabilities hides most of the rest). A one-token decode batch
in llama.cpp takes ggml_vec_dot_f16 instead, which this kernel does not imitate.

Work is split over (query row, kv head) pairs: all query heads that share a kv head are done
together, so each cached K/V row is loaded (and converted) once per query row.
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange, types
from numba.extending import overload

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.lanes import fma, lane_dot, lane_sum, lane_sum8
from ggserve.kernels.quant import f16_round, f16_row_to_f32, f32_to_f16_bits


def load_row(src, dst):
    """dst (d,) f32 <- src (d,) as float32 (src is float32, or float16 bit patterns as uint16)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(load_row, inline="always")
def _load_row_overload(src, dst):
    if isinstance(src.dtype, types.Integer):

        def load_f16_bits(src, dst):
            f16_row_to_f32(src, dst)

        return load_f16_bits

    def load_f32(src, dst):
        for j in range(src.shape[0]):
            dst[j] = src[j]

    return load_f32


def round_to_cache(v, cache):
    """v f32 as llama.cpp's attention sees it next to `cache`: rounded to f16 when the cache is f16.

    Without flash attention, ggml multiplies an f16 cache by f16 operands: it converts Q to f16
    for Q.K, and the softmax probabilities to f16 for P.V. An f32 cache takes f32 operands."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(round_to_cache, inline="always")
def _round_to_cache_overload(v, cache):
    if isinstance(cache.dtype, types.Integer):
        return lambda v, cache: f16_round(v)
    return lambda v, cache: v


# Below this many multiply-adds a call runs on the calling thread: a parallel region costs a few
# microseconds to launch, more than the work itself for short contexts. Measured on Qwen's
# decode shape, both threads already win at 80 cells (34 -> 23 us per layer).
SERIAL_WORK_LIMIT = 1 << 17  # ~15 us of serial work: decode rows past ~80 cells go parallel


def attention(q, k_cache, v_cache, layer, slot_ids, positions, scale, window, out):
    """out (n, n_heads, value_dim) = softmax(q K^T * scale) V over each row's slot cache."""
    # q (n, n_heads, head_dim) f32; k_cache (n_slots, n_layers, n_ctx, n_kv_heads, head_dim) and
    # v_cache (..., n_kv_heads, value_dim), f32 or f16-bits uint16; slot_ids, positions (n,) int32
    # -> out (n, n_heads, value_dim) f32.
    # Row i attends to cells [start, positions[i]] of slot slot_ids[i] in `layer`, where
    # start = 0, or positions[i] - window + 1 when window > 0 (sliding-window layers).
    # Query head h reads kv head h // (n_heads / n_kv_heads), as ggml broadcasts.
    n, n_heads, head_dim = q.shape
    if n == 0:
        return
    max_len = int(positions.max()) + 1
    if 0 < window < max_len:
        max_len = window
    work = n * n_heads * max_len * (head_dim + v_cache.shape[4])
    if work < SERIAL_WORK_LIMIT:
        args = (q, k_cache, v_cache, layer, slot_ids, positions, np.float32(scale), window, out, max_len, 1)
        _attend_tasks(*args, 0, n * k_cache.shape[3])
        return
    # get_num_threads() inside a compiled kernel would make it uncachable (dynamic global)
    n_threads = get_num_threads()
    group = n_heads // k_cache.shape[3]
    # Too few (row, kv head) tasks for the threads (a decode row of a model with 1-2 kv heads):
    # split each task's query heads too; each part then converts the shared K/V rows itself.
    n_splits = 1
    while n * k_cache.shape[3] * n_splits < n_threads and n_splits < group and group % (2 * n_splits) == 0:
        n_splits *= 2
    args = (q, k_cache, v_cache, layer, slot_ids, positions, np.float32(scale), window, out, max_len, n_splits)
    _attention_parallel(*args, 4 * n_threads)


@njit(parallel=True, cache=True)
def _attention_parallel(q, k_cache, v_cache, layer, slot_ids, positions, scale, window, out, max_len, n_splits,
                        n_chunks):
    # the (row, kv head, head split) tasks cut into n_chunks contiguous ranges, one per iteration
    n_tasks = q.shape[0] * k_cache.shape[3] * n_splits
    n_chunks = min(n_tasks, n_chunks)
    for c in prange(n_chunks):
        _attend_tasks(q, k_cache, v_cache, layer, slot_ids, positions, scale, window, out, max_len, n_splits,
                      c * n_tasks // n_chunks, (c + 1) * n_tasks // n_chunks)


@njit(cache=True)
def _attend_tasks(q, k_cache, v_cache, layer, slot_ids, positions, scale, window, out, max_len, n_splits,
                  task_begin, task_end):
    # tasks task_begin..task_end-1; task = (row * n_kv_heads + kv_head) * n_splits + split, where a
    # split covers group / n_splits of the query heads sharing kv_head; max_len bounds any row's span.
    # Every sum has the shape of llama.cpp's x86 attention without flash attention (module
    # docstring), without fastmath: products in 8 fma lanes and lane_sum; exp sums per 8 cells.
    n, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[3]
    value_dim = v_cache.shape[4]
    group = n_heads // n_kv_heads // n_splits  # query heads per task
    scores = np.empty((group, max_len), np.float32)
    padded_dim = (head_dim + 7) // 8 * 8  # zero-padded to whole 8-lane steps
    query = np.zeros((group, padded_dim), np.float32)
    key = np.zeros(padded_dim, np.float32)
    value = np.empty(value_dim, np.float32)
    lanes = np.empty(8, np.float32)
    acc = np.empty((group, 8, value_dim), np.float32)  # P.V lanes: cell t goes to lane t % 8
    for task in range(task_begin, task_end):
        i = task // (n_kv_heads * n_splits)
        kv_head = (task // n_splits) % n_kv_heads
        first_head = kv_head * group * n_splits + (task % n_splits) * group
        slot = slot_ids[i]
        pos = positions[i]
        start = 0
        if window > 0 and pos - window + 1 > 0:
            start = pos - window + 1
        length = pos + 1 - start
        for g in range(group):
            for j in range(head_dim):
                query[g, j] = round_to_cache(q[i, first_head + g, j], k_cache)
        for t in range(length):
            load_row(k_cache[slot, layer, start + t, kv_head], key[:head_dim])
            for g in range(group):
                scores[g, t] = lane_dot(key, query[g], padded_dim // 8) * scale
        # softmax as ggml's soft_max: exp(s - max); the sum adds each aligned run of 8 cells
        # (lane_sum, f32) into a float64 total; scaled by f32(1 / total). The probabilities then
        # meet V in V's precision.
        for g in range(group):
            mx = scores[g, 0]
            for t in range(1, length):
                if scores[g, t] > mx:
                    mx = scores[g, t]
            for t in range(length):
                scores[g, t] = math.exp(scores[g, t] - mx)
            total = 0.0
            for run in range(start // 8, pos // 8 + 1):
                for u in range(8):
                    t = 8 * run + u - start
                    lanes[u] = scores[g, t] if 0 <= t < length else np.float32(0.0)
                total += lane_sum(lanes, 0)
            inv = np.float32(1.0 / total)
            for t in range(length):
                scores[g, t] = round_to_cache(scores[g, t] * inv, v_cache)
        acc[:, :, :] = 0.0
        for t in range(length):
            load_row(v_cache[slot, layer, start + t, kv_head], value)
            u = (start + t) & 7
            for g in range(group):
                w = scores[g, t]
                lane = acc[g, u]
                for j in range(value_dim):
                    lane[np.uint64(j)] = fma(value[np.uint64(j)], w, lane[np.uint64(j)])
        for g in range(group):
            h = first_head + g
            for j in range(value_dim):
                out[i, h, j] = lane_sum8(acc[g, 0, j], acc[g, 1, j], acc[g, 2, j], acc[g, 3, j],
                                         acc[g, 4, j], acc[g, 5, j], acc[g, 6, j], acc[g, 7, j])


def store_row(src, dst):
    """dst (d,) <- src (d,) f32, rounded to float16 bits when dst is uint16 (round to nearest even)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(store_row, inline="always")
def _store_row_overload(src, dst):
    if isinstance(dst.dtype, types.Integer):

        def store_f16_bits(src, dst):
            for j in range(src.shape[0]):
                dst[j] = f32_to_f16_bits(src[j])

        return store_f16_bits

    def store_f32(src, dst):
        for j in range(src.shape[0]):
            dst[j] = src[j]

    return store_f32


@njit(cache=True)
def store_kv(k, v, k_cache, v_cache, layer, slot_ids, positions):
    # k (n, n_kv_heads, head_dim), v (n, n_kv_heads, value_dim) f32 -> cells
    # k_cache[slot_ids[i], layer, positions[i]] (f32, or f16 bits as uint16), same for v
    for i in range(k.shape[0]):
        for h in range(k.shape[1]):
            store_row(k[i, h], k_cache[slot_ids[i], layer, positions[i], h])
            store_row(v[i, h], v_cache[slot_ids[i], layer, positions[i], h])
