"""kernels/ops.py against plain numpy formulas (the definitions llama.cpp's ggml implements)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ggserve.kernels.ops import (add_bias, gelu_f16_table, gelu_mul, prepare_qkv, residual_rmsnorm, rmsnorm, rope, silu_mul, softcap,
                         softmax_rows)

rng = np.random.default_rng(1234)


def ref_rmsnorm(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def ref_rope(x, positions, base, n_rot, neox, freq_scale=1.0, factors=None):
    # rotation of dimension pairs by angle pos * freq_scale * base^(-2i/n_rot) / factor_i
    out = x.astype(np.float64).copy()
    half = n_rot // 2
    inv = base ** (-2.0 * np.arange(half) / n_rot) * freq_scale
    if factors is not None:
        inv = inv / factors
    for i, p in enumerate(positions):
        angle = p * inv
        cos, sin = np.cos(angle), np.sin(angle)
        if neox:
            a, b = x[i, :, :half].astype(np.float64), x[i, :, half:n_rot].astype(np.float64)
            out[i, :, :half] = a * cos - b * sin
            out[i, :, half:n_rot] = a * sin + b * cos
        else:
            a, b = x[i, :, 0:n_rot:2].astype(np.float64), x[i, :, 1:n_rot:2].astype(np.float64)
            out[i, :, 0:n_rot:2] = a * cos - b * sin
            out[i, :, 1:n_rot:2] = a * sin + b * cos
    return out.astype(np.float32)


def theta_scale(base, n_rot):
    return np.power(np.float32(base), np.float32(-2.0) / np.float32(n_rot))


def test_rmsnorm_matches_formula_and_can_work_in_place():
    x = rng.standard_normal((5, 96)).astype(np.float32) * 3
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm(x, w, np.float32(1e-6), out)
    np.testing.assert_allclose(out, ref_rmsnorm(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    y = x.copy()
    rmsnorm(y, w, np.float32(1e-6), y)
    np.testing.assert_allclose(y, out, rtol=1e-6)


def test_rmsnorm_eps_dominates_tiny_input():
    x = np.full((1, 8), 1e-4, np.float32)
    out = np.empty_like(x)
    rmsnorm(x, np.ones(8, np.float32), np.float32(1.0), out)
    np.testing.assert_allclose(out, x / np.sqrt(1e-8 + 1.0), rtol=1e-5)


def test_residual_rmsnorm_adds_then_normalizes_with_optional_post_norm():
    x = rng.standard_normal((3, 32)).astype(np.float32)
    delta = rng.standard_normal((3, 32)).astype(np.float32)
    post = rng.standard_normal(32).astype(np.float32)
    w = rng.standard_normal(32).astype(np.float32)
    eps = np.float32(1e-6)

    x1, out1 = x.copy(), np.empty_like(x)
    residual_rmsnorm(x1, delta.copy(), np.zeros(0, np.float32), w, eps, out1)
    np.testing.assert_allclose(x1, x + delta, rtol=1e-6)
    np.testing.assert_allclose(out1, ref_rmsnorm(x + delta, w, 1e-6), rtol=1e-5, atol=1e-6)

    x2, out2 = x.copy(), np.empty_like(x)
    residual_rmsnorm(x2, delta.copy(), post, w, eps, out2)
    expected_x = x + ref_rmsnorm(delta, post, 1e-6)
    np.testing.assert_allclose(x2, expected_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out2, ref_rmsnorm(expected_x, w, 1e-6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_matches_rotation_formula(neox):
    x = rng.standard_normal((4, 3, 16)).astype(np.float32)
    positions = np.array([0, 1, 7, 300], np.int32)
    y = x.copy()
    rope(y, positions, 16, theta_scale(10000.0, 16), np.float32(1.0), np.ones(8, np.float32), neox)
    np.testing.assert_allclose(y, ref_rope(x, positions, 10000.0, 16, neox), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity


def test_rope_partial_rotation_scaling_and_factors():
    x = rng.standard_normal((2, 2, 16)).astype(np.float32)
    positions = np.array([5, 40], np.int32)
    factors = np.array([1, 2, 4, 8], np.float32)
    y = x.copy()
    rope(y, positions, 8, theta_scale(500.0, 8), np.float32(0.25), factors, True)
    expected = ref_rope(x, positions, 500.0, 8, True, freq_scale=0.25, factors=factors)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(y[:, :, 8:], x[:, :, 8:])  # dims past n_rot are untouched


def test_rope_rotations_compose_additively():
    # what the context shift relies on: rope(p) then rope(-d) == rope(p - d)
    x = rng.standard_normal((3, 2, 32)).astype(np.float32)
    p = np.array([10, 20, 30], np.int32)
    args = (32, theta_scale(1e6, 32), np.float32(1.0), np.ones(16, np.float32), True)
    shifted = x.copy()
    rope(shifted, p, *args)
    rope(shifted, np.full(3, -7, np.int32), *args)
    direct = x.copy()
    rope(direct, p - 7, *args)
    np.testing.assert_allclose(shifted, direct, atol=1e-4)


def test_gated_activations():
    g = rng.standard_normal((3, 40)).astype(np.float32) * 4
    u = rng.standard_normal((3, 40)).astype(np.float32)
    s = g.copy()
    silu_mul(s, u)
    np.testing.assert_allclose(s, g / (1 + np.exp(-g.astype(np.float64))) * u, rtol=1e-5, atol=1e-6)


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def test_gelu_is_looked_up_by_f16_like_ggml():
    g = np.concatenate([rng.standard_normal(400).astype(np.float32) * 4,
                        np.array([-10.5, -10.0, -9.99, 0.0, 9.99, 10.0, 12.5], np.float32)]).reshape(1, -1)
    u = rng.standard_normal(g.shape).astype(np.float32)
    e = g.copy()
    gelu_mul(e, u, gelu_f16_table())
    g64 = _f16(g).astype(np.float64)  # ggml rounds the input to f16 first
    gelu = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64**3)))
    expected = np.where(g <= -10, 0.0, np.where(g >= 10, g, _f16(gelu))) * u
    # the table entry is f16(GELU computed in f32), which can land an f16 step or two from f16(exact
    # GELU) where 1 + tanh cancels (negative inputs); test_gelu_table_is_ggmls_bit_for_bit is exact
    np.testing.assert_allclose(e, expected, rtol=2.0**-10, atol=1e-6)
    inside = np.abs(g) < 10
    # the f16 lookup is visible: results are f16 GELU values times up, not the exact f32 GELU
    np.testing.assert_array_equal(e[inside], (gelu_f16_table()[_f16(g[inside]).astype(np.float16).view(np.uint16)]
                                              * u[inside]).astype(np.float32))
    assert e[0, -4] == 0.0 and e[0, -2] == g[0, -2] * u[0, -2] and e[0, -1] == g[0, -1] * u[0, -1]


def test_gelu_table_is_ggmls_bit_for_bit():
    # sha256 of ggml_table_gelu_f16 (uint16 little-endian, the 63488 finite f16 inputs), read out of
    # llama.cpp's libggml-cpu (llama-cpp-python 0.3.36, x86-64 AVX2 build) after ggml_cpu_init()
    table = gelu_f16_table()
    xs = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.isfinite(xs)
    bits = table[finite].astype(np.float16).view(np.uint16).astype("<u2")
    assert hashlib.sha256(bits.tobytes()).hexdigest() == GGML_GELU_TABLE_SHA256
    assert not table.flags.writeable
    # gelu(1.0) = 0.8413 and gelu(-1.0) = -0.1587 in f16; 0xBFFF is the one entry where an unfused
    # 1 + a*x*x gives another f16 than ggml's fused multiply-add
    assert list(table[[0x3C00, 0xBC00, 0xBFFF]].astype(np.float16).view(np.uint16)) == [15035, 45333, 43475]


GGML_GELU_TABLE_SHA256 = "6be7bd8fd6b8a8fb4b704136976fc0173a0d12de047f1322f1e97fb20723bef7"


def test_softmax_bias_and_softcap():
    x = rng.standard_normal((2, 50)).astype(np.float32) * 10
    out = np.empty_like(x)
    softmax_rows(x, out)
    e = np.exp(x - x.max(1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-6)

    b = rng.standard_normal(50).astype(np.float32)
    y = x.copy()
    add_bias(y, b)
    np.testing.assert_allclose(y, x + b, rtol=1e-6)

    z = x.copy()
    softcap(z, np.float32(5.0))
    np.testing.assert_allclose(z, 5 * np.tanh(x / 5), rtol=1e-5, atol=1e-6)
    assert np.abs(z).max() <= 5.0


def test_prepare_qkv_is_bias_then_head_norm_then_rope():
    n, heads, kv_heads, d = 3, 4, 2, 16
    q = rng.standard_normal((n, heads, d)).astype(np.float32)
    k = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
    bq, bk, bv = (rng.standard_normal(h * d).astype(np.float32) for h in (heads, kv_heads, kv_heads))
    qn, kn = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    positions = np.array([4, 5, 9], np.int32)
    rope_args = (d, theta_scale(1e4, d), np.float32(1.0), np.ones(d // 2, np.float32), True)
    qq, kk, vv = q.copy(), k.copy(), v.copy()
    prepare_qkv(qq, kk, vv, bq, bk, bv, qn, kn, np.float32(1e-6), positions, *rope_args)
    expected_q = ref_rope(ref_rmsnorm(q + bq.reshape(heads, d), qn, 1e-6), positions, 1e4, d, True)
    expected_k = ref_rope(ref_rmsnorm(k + bk.reshape(kv_heads, d), kn, 1e-6), positions, 1e4, d, True)
    np.testing.assert_allclose(qq, expected_q, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kk, expected_k, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vv, v + bv.reshape(kv_heads, d), rtol=1e-6)
    # without biases and norms it is rope alone
    empty = np.zeros(0, np.float32)
    qq = q.copy()
    prepare_qkv(qq, k.copy(), v.copy(), empty, empty, empty, empty, empty, np.float32(1e-6), positions, *rope_args)
    np.testing.assert_allclose(qq, ref_rope(q, positions, 1e4, d, True), rtol=1e-4, atol=1e-4)
