"""kernels.intdot: ggml's Q8_0 activation rounding and the exact int8 x int16 block dot."""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.intdot import dot32_i8_i16, quantize_q8_0


def ggml_quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy oracle of quantize_row_q8_0: (values (n, k) int, f16-rounded scales (n, k/32))."""
    n, k = x.shape
    blocks = x.reshape(n, k // 32, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    return np.rint(blocks * inv[..., None]).reshape(n, k), d.astype(np.float16).astype(np.float32)


def run_quantize(x):
    n, k = x.shape
    xq, xd = np.empty(n * k, np.int16), np.empty(n * (k // 32), np.float32)
    quantize_q8_0(x.reshape(-1), n, k, xq, xd)
    return xq.reshape(n, k), xd.reshape(n, k // 32)


def test_quantize_matches_ggml_rounding_over_many_scales():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 32 * 40)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-9, 5, (5, 40)).repeat(32, axis=1)  # f16 subnormal scales too
    x[0, :32] = 0.0  # an all-zero block: scale 0, values 0
    x[1, 32:64] = np.float32(0.5) * np.arange(32) - 8  # exact .5 ties: round half to even
    q, d = run_quantize(x)
    expected_q, expected_d = ggml_quantize_q8_0(x)
    np.testing.assert_array_equal(q, expected_q)
    np.testing.assert_array_equal(d, expected_d)
    assert np.abs(q).max() == 127 and d[0, 0] == 0 and not q[0, :32].any()


def test_non_finite_block_poisons_only_its_own_scale():
    x = np.ones((1, 64), np.float32)
    x[0, 5] = np.inf
    x[0, 40] = np.nan
    q, d = run_quantize(x)
    assert np.isnan(d).all() and not q.any()
    x[0, 40] = 1.0
    q, d = run_quantize(x)
    assert np.isnan(d[0, 0]) and d[0, 1] == np.float32(np.float16(1 / 127)) and (q[0, 32:] == 127).all()


@njit(cache=False)
def _dots(w, xq, n_blocks, out):
    for b in range(n_blocks):
        out[b] = dot32_i8_i16(w, np.uint64(b * 34 + 2), xq, np.uint64(b * 32))


def test_block_dot_is_the_exact_integer_sum_at_the_extremes():
    rng = np.random.default_rng(1)
    n_blocks = 9
    w = rng.integers(0, 256, n_blocks * 34, dtype=np.uint8)
    w[2:34] = 0x80  # int8 -128 everywhere, against x = -127: the largest products
    xq = rng.integers(-127, 128, n_blocks * 32).astype(np.int16)
    xq[:32] = -127
    out = np.empty(n_blocks, np.int32)
    _dots(w, xq, n_blocks, out)
    values = w.reshape(n_blocks, 34)[:, 2:].view(np.int8).astype(np.int64)
    expected = (values * xq.reshape(n_blocks, 32)).sum(axis=1)
    np.testing.assert_array_equal(out, expected)
    assert out[0] == 32 * 128 * 127
