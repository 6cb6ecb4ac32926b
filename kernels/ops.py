"""Element-wise and per-row kernels of a transformer layer, computed the way ggml's CPU backend does.

Owns: RMS norm (plain, and fused with the residual add), rotary position embedding (normal and
NeoX pair layouts, ggml's incremental theta), `prepare_qkv` (biases, per-head Q/K norms and rope
in one call), SiLU / GELU gated products (GELU through ggml's f16 table, `gelu_f16_table`), a row
softmax and soft-capping. Every kernel writes into a caller-provided buffer so a decode step
allocates nothing; buffers are float32 and C-contiguous.

Matching llama.cpp numerically matters more than elegance here: float32 squares are summed in
float64 as ggml does, the norm scale is applied before the weight, and rope angles are built by
repeated float32 multiplication by theta_scale exactly like ggml_rope_cache_init.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.lanes import fma
from ggserve.kernels.quant import f32_to_f16_bits

GELU_COEF_A = 0.044715
SQRT_2_OVER_PI = 0.7978845608028654


# The norms, rope and prepare_qkv are compiled without fastmath: its approximate reciprocal square
# root, reassociation and approximate cos/sin moved ~1/3 of their outputs off ggml's bits (which a
# later 8-bit rounding can turn into whole quantization steps). rmsnorm, rope, _bias_heads and
# _rmsnorm_heads are inlined into the kernels that call them: called as separately compiled
# functions, a caller loaded from numba's disk cache computed other last bits than the same caller
# freshly compiled (tests/kernels/test_jit_cache.py). They stay callable on their own.
@njit(cache=True, inline="always")
def rmsnorm(x, weight, eps, out):
    # x (n, d), weight (d,) -> out (n, d) = x / sqrt(mean(x^2) + eps) * weight; out may alias x
    n, d = x.shape
    for i in range(n):
        ss = 0.0  # float64 accumulator of f32 squares, as ggml's (ggml_float)(x * x)
        for j in range(d):
            ss += np.float64(x[i, j] * x[i, j])
        mean = np.float32(ss / d)
        scale = np.float32(1.0) / np.float32(math.sqrt(mean + eps))
        for j in range(d):
            out[i, j] = (x[i, j] * scale) * weight[j]


@njit(cache=True)
def residual_rmsnorm(x, delta, post_weight, weight, eps, out):
    # x (n, d) += post_norm(delta (n, d)); then out (n, d) = rmsnorm(x) * weight (d,).
    # post_weight (d,) or (0,): when non-empty, delta is RMS-normed with it first (Gemma's
    # post-attention / post-FFN norms). delta is clobbered. weight (0,) skips the second norm.
    n, d = x.shape
    if post_weight.shape[0] > 0:
        rmsnorm(delta, post_weight, eps, delta)
    for i in range(n):
        for j in range(d):
            x[i, j] += delta[i, j]
    if weight.shape[0] > 0:
        rmsnorm(x, weight, eps, out)


@njit(cache=True, inline="always")
def _rotate(x0, x1, cos_theta, sin_theta):
    # (x0 cos - x1 sin, x0 sin + x1 cos) with the first product fused into the add, as the C
    # compiler contracts ggml's rotate_pairs (GCC's default -ffp-contract=fast); plain f32
    # arithmetic differed from llama.cpp's rope in ~15% of outputs by one ulp
    return fma(x0, cos_theta, -(x1 * sin_theta)), fma(x0, sin_theta, x1 * cos_theta)


@njit(cache=True, inline="always")
def rope(x, positions, n_rot, theta_scale, freq_scale, freq_factors, neox):
    # x (n, n_heads, head_dim) rotated in place by position (n,) int32; only the first n_rot dims
    # of each head rotate. Pair i turns by pos * theta_scale^i * freq_scale / freq_factors[i]
    # (freq_factors (n_rot/2,), ones when the model has none). neox: pairs are (i, i + n_rot/2),
    # otherwise (2i, 2i+1). The angle is grown by repeated f32 multiplication like ggml.
    n, n_heads, head_dim = x.shape
    half = n_rot // 2
    cos_t = np.empty(half, np.float32)
    sin_t = np.empty(half, np.float32)
    for i in range(n):
        theta = np.float32(positions[i])
        for p in range(half):
            angle = np.float32(np.float32(theta / freq_factors[p]) * freq_scale)
            cos_t[p] = np.float32(math.cos(angle))
            sin_t[p] = np.float32(math.sin(angle))
            theta = np.float32(theta * theta_scale)
        for h in range(n_heads):
            if neox:
                for p in range(half):
                    x0 = x[i, h, p]
                    x1 = x[i, h, p + half]
                    x[i, h, p], x[i, h, p + half] = _rotate(x0, x1, cos_t[p], sin_t[p])
            else:
                for p in range(half):
                    x0 = x[i, h, 2 * p]
                    x1 = x[i, h, 2 * p + 1]
                    x[i, h, 2 * p], x[i, h, 2 * p + 1] = _rotate(x0, x1, cos_t[p], sin_t[p])


@njit(cache=True, inline="always")
def _bias_heads(x, bias):
    # x (n, heads, d) += bias (heads * d,)
    n, heads, d = x.shape
    for i in range(n):
        for h in range(heads):
            for j in range(d):
                x[i, h, j] += bias[h * d + j]


@njit(cache=True, inline="always")
def _rmsnorm_heads(x, weight, eps):
    # x (n, heads, d): each head's d values RMS-normed in place, times weight (d,)
    n, heads, d = x.shape
    for i in range(n):
        for h in range(heads):
            ss = 0.0
            for j in range(d):
                ss += np.float64(x[i, h, j] * x[i, h, j])
            scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(ss / d) + eps))
            for j in range(d):
                x[i, h, j] = (x[i, h, j] * scale) * weight[j]


@njit(cache=True)
def prepare_qkv(q, k, v, bq, bk, bv, q_norm, k_norm, eps, positions, n_rot, theta_scale, freq_scale,
                freq_factors, neox):
    # One call for everything between the Q/K/V projections and attention, in llama.cpp's order:
    # q (n, n_heads, head_dim), k (n, n_kv_heads, head_dim), v (n, n_kv_heads, value_dim) in place
    # += biases (flat (heads * dim,), or (0,) for none); q, k per-head RMS norm (weights
    # (head_dim,) or (0,)); q, k rotated by positions (n,) (see `rope`).
    if bq.shape[0] > 0:
        _bias_heads(q, bq)
    if bk.shape[0] > 0:
        _bias_heads(k, bk)
    if bv.shape[0] > 0:
        _bias_heads(v, bv)
    if q_norm.shape[0] > 0:
        _rmsnorm_heads(q, q_norm, eps)
    if k_norm.shape[0] > 0:
        _rmsnorm_heads(k, k_norm, eps)
    rope(q, positions, n_rot, theta_scale, freq_scale, freq_factors, neox)
    rope(k, positions, n_rot, theta_scale, freq_scale, freq_factors, neox)


@njit(fastmath=True, cache=True)
def silu_mul(gate, up):
    # gate (n, f) <- silu(gate) * up (n, f); silu(g) = g / (1 + exp(-g))
    n, f = gate.shape
    for i in range(n):
        for j in range(f):
            g = gate[i, j]
            gate[i, j] = g / (np.float32(1.0) + np.exp(-g)) * up[i, j]


@njit(cache=True)
def _gelu_f32(xs, out):
    # xs (m,) f32 -> out (m,) f32: ggml_gelu_f32 (tanh approximation) as ggml's CPU build computes it,
    # where the compiler fuses 1 + a*x*x into one multiply-add; emulated in f64, whose single rounding
    # to f32 is the fused result here (checked bit for bit against ggml's table). Not fastmath: the
    # order of the f32 steps is the point. numba's float32 math.tanh is libm's tanhf, as in ggml.
    a = np.float32(GELU_COEF_A)
    c = np.float32(SQRT_2_OVER_PI)
    for i in range(xs.shape[0]):
        x = xs[i]
        inner = np.float32(np.float64(a * x) * np.float64(x) + 1.0)
        out[i] = np.float32(0.5) * x * (np.float32(1.0) + math.tanh(c * x * inner))


@functools.lru_cache(maxsize=1)
def gelu_f16_table() -> np.ndarray:
    """(65536,) f32, read-only: GELU of the f16 value of every bit pattern, rounded to f16.

    This is ggml's `ggml_table_gelu_f16`: llama.cpp's CPU backend looks GELU up by the f16 of its
    input, so its results carry f16 precision (~5e-4 relative); matching llama.cpp's logits needs
    the same table. Built once per process (~2 ms)."""
    xs = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    table = np.empty_like(xs)
    with np.errstate(invalid="ignore", over="ignore"):
        _gelu_f32(xs, table)
        table = table.astype(np.float16).astype(np.float32)
    table.flags.writeable = False
    return table


@njit(fastmath=True, cache=True)
def gelu_mul(gate, up, table):
    # gate (n, f) <- gelu(gate) * up (n, f), GELU looked up by the f16 of its input in
    # table (65536,) = gelu_f16_table(), as ggml's geglu does; beyond +-10 GELU is x or 0.
    n, f = gate.shape
    for i in range(n):
        for j in range(f):
            g = gate[i, j]
            if g <= np.float32(-10.0):
                gelu = np.float32(0.0)
            elif g >= np.float32(10.0):
                gelu = g
            else:
                gelu = table[f32_to_f16_bits(g)]
            gate[i, j] = gelu * up[i, j]


@njit(fastmath=True, cache=True)
def add_bias(x, bias):
    # x (n, m) += bias (m,)
    n, m = x.shape
    for i in range(n):
        for j in range(m):
            x[i, j] += bias[j]


@njit(fastmath=True, cache=True)
def softmax_rows(x, out):
    # x (n, m) -> out (n, m), each row exp(x - max) / sum; sum in float64 like ggml; out may alias x
    n, m = x.shape
    for i in range(n):
        mx = x[i, 0]
        for j in range(1, m):
            if x[i, j] > mx:
                mx = x[i, j]
        s = 0.0
        for j in range(m):
            e = np.exp(x[i, j] - mx)
            out[i, j] = e
            s += e
        inv = np.float32(1.0 / s)
        for j in range(m):
            out[i, j] *= inv


@njit(fastmath=True, cache=True)
def softcap(x, cap):
    # x (n, m) <- cap * tanh(x / cap) (Gemma 2 style final-logit soft-capping)
    n, m = x.shape
    inv = np.float32(1.0 / cap)
    for i in range(n):
        for j in range(m):
            x[i, j] = cap * np.tanh(x[i, j] * inv)
