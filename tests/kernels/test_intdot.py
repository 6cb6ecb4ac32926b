"""ggserve.kernels.activations (ggml's Q8_0 / Q8_K activation rounding) and ggserve.kernels.intdot /
intdot_kquant (the integer dot intrinsics), each against a numpy oracle. The row dots are checked bit for bit against
numpy transcriptions of the summation shapes of ggml's AVX2 kernels (`fma32`, `lane_sum8`)."""
from __future__ import annotations

import numpy as np
from numba import njit

from ggserve.kernels.activations import quantize_q8_0, quantize_q8_k
from ggserve.kernels.intdot import dot_row_q8_0, dot_rows_q8_0
from ggserve.kernels.intdot_kquant import dot_row_q6_k, dot_row_q6_k_tiled, q4_k_block_isum, q5_k_block_isum


def ggml_quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy oracle of ggml's x86 quantize_row_q8_0: (values (n, k) int, f16-rounded scales (n, k/32)).
    Values are rint(x * (127 / amax)); the generic C reference multiplies by 1 / (amax / 127) instead."""
    n, k = x.shape
    blocks = x.reshape(n, k // 32, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=2)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(blocks * inv[..., None]).reshape(n, k), d.astype(np.float16).astype(np.float32)


def ggml_quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy oracle of quantize_row_q8_K_ref: (values (n, k), f32 scales (n, k/256))."""
    n, k = x.shape
    blocks = x.reshape(n, k // 256, 256).astype(np.float32)
    vmax = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127) / vmax, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(127, np.rint(iscale[..., None] * blocks))
    return q.reshape(n, k), d


def fma32(a, b, c):
    """f32 a * b + c rounded once: the f64 product of two f32 values is exact, so only the
    final rounding to f32 remains (a double rounding differs from fma in ~2^-29 of cases)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def lane_sum8(lanes: np.ndarray) -> np.float32:
    """ggml's hsum_float_8 of 8 f32 lanes: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    lanes = lanes.astype(np.float32)
    half = lanes[:4] + lanes[4:]
    return np.float32((half[0] + half[2]) + (half[1] + half[3]))


def ggml_q8_0_row_dot(values, w_scales, xq, xd) -> np.float32:
    """ggml's AVX2 Q8_0 dot of one row: values/xq (nb, 32) ints, scales (nb,) f32. Lane j of
    block b is the integer sum of elements 4j..4j+3; acc = fma(d_w * d_x, lane, acc)."""
    lanes = (values.astype(np.int64) * xq).reshape(-1, 8, 4).sum(axis=2).astype(np.float32)
    acc = np.zeros(8, np.float32)
    for b in range(lanes.shape[0]):
        acc = fma32(np.float32(w_scales[b]) * np.float32(xd[b]), lanes[b], acc)
    return lane_sum8(acc)


def ggml_q6_k_row_dot(blocks, xq, xd, tiled: bool) -> np.float32:
    """ggml's Q6_K dot of one row of Q6_K super-blocks (nb, 210) uint8 with Q8_K values xq
    (nb, 256) and scales xd (nb,): ggml_vec_dot_q6_K_q8_K's 8-lane shape, or (tiled) the tiled
    matmul's one f32 sum of fma(d_w * isum, d_x, acc)."""
    acc = np.float32(0.0) if tiled else np.zeros(8, np.float32)
    for b, block in enumerate(blocks):
        q = q6_k_values(block) + 32  # unsigned, 0..63
        sc = block[192:208].view(np.int8).astype(np.int64)
        x = xq[b].astype(np.int64)
        quads = (q * x).reshape(8, 8, 4).sum(axis=2)  # (chunk, lane)
        lane_scales = np.stack([np.repeat([sc[2 * c], sc[2 * c + 1]], 4) for c in range(8)])
        bsums = x.reshape(16, 16).sum(axis=1)
        lanes = (quads * lane_scales).sum(axis=0) - 32 * (bsums * sc).reshape(8, 2).sum(axis=1)
        d_w = np.float32(block[208:210].view(np.float16)[0])
        if tiled:
            acc = fma32(np.float32(d_w * np.float32(lanes.sum())), xd[b], acc)
        else:
            acc = fma32(np.float32(xd[b]) * d_w, lanes.astype(np.float32), acc)
    return np.float32(acc) if tiled else lane_sum8(acc)


def run_quantize(x):
    n, k = x.shape
    xq, xd = np.empty(n * k, np.int8), np.empty(n * (k // 32), np.float32)
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


def test_quantize_scales_by_127_over_amax_like_ggml_on_x86():
    # 60.559776 * (127 / 127.12547) rounds to 61, but times 1 / (127.12547 / 127) to 60: the two
    # formulas differ in the last bit here, and llama.cpp's x86 build uses the first
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = np.float32(127.12547), np.float32(60.559776)
    q, _ = run_quantize(x)
    assert q[0, 1] == 61 and q[0, 0] == 127


def test_non_finite_block_poisons_only_its_own_scale():
    x = np.ones((1, 64), np.float32)
    x[0, 5] = np.inf
    x[0, 40] = np.nan
    q, d = run_quantize(x)
    assert np.isnan(d).all() and not q.any()
    x[0, 40] = 1.0
    q, d = run_quantize(x)
    assert np.isnan(d[0, 0]) and d[0, 1] == np.float32(np.float16(1 / 127)) and (q[0, 32:] == 127).all()


def test_q8_0_block_dot_is_exact_at_the_extremes():
    # int8 -128 everywhere against x = -127: the largest products, one block of scale 1 x 1,
    # so the f32 result is the exact integer sum
    from ggserve.kernels.quant import f16_table
    w = np.full(34, 0x80, np.uint8)
    w[:2] = np.array([1.0], np.float16).view(np.uint8)
    xq = np.full(32, -127, np.int8)
    assert _row_dot(w, 1, f16_table(), xq, np.ones(1, np.float32)) == 32 * 128 * 127


def test_quantize_q8_k_matches_ggml_and_sums_each_16():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 768)).astype(np.float32) * np.float32(7.0)
    x[0, :256] = 0.0  # an all-zero block
    x[1, 300] = -50.0  # a negative extreme: iscale = -127 / -50 > 0, that value -> -127
    x[2, 10] = 60.0  # a positive extreme: the scale is negative and that value -> -127
    n, k = x.shape
    xq, xd, xbs = np.empty(n * k, np.int8), np.empty(n * k // 256, np.float32), np.empty(n * k // 16, np.int32)
    quantize_q8_k(x.reshape(-1), n, k, xq, xd, xbs)
    expected_q, expected_d = ggml_quantize_q8_k(x)
    np.testing.assert_array_equal(xq.reshape(n, k), expected_q)
    np.testing.assert_array_equal(xd.reshape(n, -1), expected_d)
    np.testing.assert_array_equal(xbs.reshape(n, -1), expected_q.reshape(n, -1, 16).sum(axis=2))
    q2, d2 = xq.reshape(n, k), xd.reshape(n, -1)
    assert q2[1, 300] == -127 and d2[1, 1] > 0 and q2[2, 10] == -127 and d2[2, 0] < 0 and d2[0, 0] == 0


@njit(cache=False)
def _block_isums(q4, q5, scales, q6, xq, out):
    # Q6_K has no integer-only intrinsic: its row dot with unit scales (d_w = d_x = 1) is the
    # exact integer while it stays below 2^24
    out[0] = q4_k_block_isum(q4, np.uint64(0), scales, xq, np.uint64(0))
    out[1] = np.int32(dot_row_q6_k_tiled(q6, np.uint64(0), 1, _UNIT_LUT, xq, _ONE, np.uint64(0), _bsums16(xq)))
    out[2] = q5_k_block_isum(q5, np.uint64(0), scales, xq, np.uint64(0))


@njit(cache=False)
def _bsums16(xq):
    out = np.zeros(xq.size // 16, np.int32)
    for i in range(xq.size):
        out[i // 16] += xq[i]
    return out


_UNIT_LUT = np.ones(65536, np.float32)  # every f16 scale bit pattern reads as 1.0
_ONE = np.ones(1, np.float32)


def q4_k_values(block: np.ndarray) -> np.ndarray:
    """The 256 4-bit values (0..15) of a Q4_K super-block, in order (numpy oracle)."""
    qs = block[16:144].astype(np.int64).reshape(4, 32)
    return np.concatenate([np.concatenate([g & 15, g >> 4]) for g in qs])


def q5_k_values(block: np.ndarray) -> np.ndarray:
    """The 256 5-bit values (0..31) of a Q5_K super-block, in order (numpy oracle, from ggml's
    dequantize_row_q5_K: bit s of qh[l] is the fifth bit of value 32 s + l)."""
    qh = block[16:48].astype(np.int64)
    low = q4_k_values(np.concatenate([block[:16], block[48:176]]))
    return low | np.concatenate([((qh >> s) & 1) << 4 for s in range(8)])


def q6_k_values(block: np.ndarray) -> np.ndarray:
    """The 256 6-bit values (-32..31) of a Q6_K super-block, in order (numpy oracle, from
    ggml's dequantize_row_q6_K)."""
    ql, qh = block[:128].astype(np.int64), block[128:192].astype(np.int64)
    out = []
    for half in range(2):
        l_, h_ = ql[64 * half:64 * half + 64], qh[32 * half:32 * half + 32]
        out += [(l_[:32] & 15) | ((h_ & 3) << 4), (l_[32:] & 15) | (((h_ >> 2) & 3) << 4),
                (l_[:32] >> 4) | (((h_ >> 4) & 3) << 4), (l_[32:] >> 4) | (((h_ >> 6) & 3) << 4)]
    return np.concatenate(out) - 32


def test_k_quant_super_block_sums_are_exact_at_the_extremes():
    rng = np.random.default_rng(5)
    for trial in range(4):
        q4 = rng.integers(0, 256, 144, dtype=np.uint8)
        q5 = rng.integers(0, 256, 176, dtype=np.uint8)
        q6 = rng.integers(0, 256, 210, dtype=np.uint8)
        scales = rng.integers(0, 64, 8).astype(np.int32)
        xq = rng.integers(-127, 128, 256).astype(np.int8)
        if trial == 0:  # largest magnitudes: every product at its bound (Q6_K's sum stays < 2^24)
            q4[16:] = 0xFF
            q5[16:] = 0xFF  # every value 31
            q6[:192] = 0x00  # all values -32
            q6[192:208] = np.array([-128] * 16, np.int8).view(np.uint8)
            scales[:] = 63
            xq[:] = -127
        else:
            q6[192:208] = rng.integers(-16, 16, 16).astype(np.int8).view(np.uint8)
        out = np.empty(3, np.int32)
        _block_isums(q4, q5, scales, q6, xq, out)
        expected_q4 = (np.repeat(scales.astype(np.int64), 32) * q4_k_values(q4) * xq).sum()
        sc6 = q6[192:208].view(np.int8).astype(np.int64)
        expected_q6 = (np.repeat(sc6, 16) * q6_k_values(q6) * xq).sum()
        expected_q5 = (np.repeat(scales.astype(np.int64), 32) * q5_k_values(q5) * xq).sum()
        assert (out[0], out[1], out[2]) == (expected_q4, expected_q6, expected_q5), trial


@njit(cache=False)
def _row_dot(w, n_blocks, lut, xq, xd):
    return dot_row_q8_0(w, np.uint64(0), n_blocks, lut, xq, xd, np.uint64(0))


@njit(cache=False)
def _row_pair(w, n_blocks, lut, xq, xd):
    return dot_rows_q8_0(w, np.uint64(0), np.uint64(0), n_blocks, lut, xq, xd, np.uint64(0))


def test_q8_0_row_dot_has_ggml_avx2_bits():
    from ggserve.kernels.quant import f16_table
    rng = np.random.default_rng(6)
    for n_blocks in (1, 2, 7, 28):
        w = rng.integers(0, 256, n_blocks * 34, dtype=np.uint8)
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        w.reshape(n_blocks, 34)[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
        xq = rng.integers(-127, 128, n_blocks * 32).astype(np.int8)
        xd = rng.uniform(0.001, 0.1, n_blocks).astype(np.float32)
        got = _row_dot(w, n_blocks, f16_table(), xq, xd)
        assert _row_pair(w, n_blocks, f16_table(), xq, xd) == (got, got)  # the two-row form, same row twice
        values = w.reshape(n_blocks, 34)[:, 2:].view(np.int8)
        expected = ggml_q8_0_row_dot(values, scales.astype(np.float32), xq.reshape(n_blocks, 32), xd)
        assert got == expected, n_blocks
        # and not merely close: the plain f64 sum lands elsewhere in the last bits for some length
        plain = np.float32((scales.astype(np.float64) * xd * (values.astype(np.int64) * xq.reshape(n_blocks, 32)).sum(1)).sum())
        assert abs(got - plain) <= 1e-5 * abs(plain) + 1e-6


@njit(cache=False)
def _q6_dots(w, n_blocks, lut, xq, xd, bsums, out):
    out[0] = dot_row_q6_k(w, np.uint64(0), n_blocks, lut, xq, xd, np.uint64(0), bsums)
    out[1] = dot_row_q6_k_tiled(w, np.uint64(0), n_blocks, lut, xq, xd, np.uint64(0), bsums)


def test_q6_k_row_dots_have_ggml_avx2_bits():
    from ggserve.kernels.quant import f16_table
    rng = np.random.default_rng(9)
    differ = 0
    for n_blocks in (1, 3, 19):
        w = rng.integers(0, 256, (n_blocks, 210), dtype=np.uint8)
        w[:, 192:208] = rng.integers(-128, 128, (n_blocks, 16)).astype(np.int8).view(np.uint8)
        w[:, 208:210] = (rng.uniform(0.5, 2.0, n_blocks) * 1e-3).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        xq = rng.integers(-127, 128, (n_blocks, 256)).astype(np.int8)
        xd = rng.uniform(0.01, 0.1, n_blocks).astype(np.float32)
        out = np.empty(2, np.float32)
        _q6_dots(w.reshape(-1), n_blocks, f16_table(), xq.reshape(-1), xd, _bsums16(xq.reshape(-1)), out)
        assert out[0] == ggml_q6_k_row_dot(w, xq, xd, tiled=False), n_blocks
        assert out[1] == ggml_q6_k_row_dot(w, xq, xd, tiled=True), n_blocks
        differ += out[0] != out[1]
    assert differ  # the two shapes are not the same sum: which one a row takes matters


def test_portable_ir_without_avx2_gives_the_same_integers(monkeypatch):
    # CPUs without AVX2 get generic vector IR instead of vpmaddwd: compile fresh wrappers with
    # that path and check them against the AVX2 build on the same data.
    import ggserve.kernels.intdot as intdot
    import ggserve.kernels.intdot_kquant as kquant
    from ggserve.kernels.quant import f16_table

    def build():
        @njit(cache=False)
        def run(w, xq, xq8, xd, lut, scales, out):
            out[0] = kquant.q5_k_block_isum(w, np.uint64(0), scales, xq, np.uint64(0))
            out[1] = kquant.q4_k_block_isum(w, np.uint64(0), scales, xq, np.uint64(0))
            out[2] = np.int32(kquant.dot_row_q6_k(w, np.uint64(0), 1, _UNIT_LUT, xq, _ONE, np.uint64(0), _bsums16(xq)))
            return intdot.dot_row_q8_0(w, np.uint64(0), 3, lut, xq8, xd, np.uint64(0))
        return run

    rng = np.random.default_rng(8)
    w = rng.integers(0, 256, 256, dtype=np.uint8)
    w[:102].reshape(3, 34)[:, :2] = np.array([0.01], np.float16).view(np.uint8)
    xq = rng.integers(-127, 128, 256).astype(np.int8)
    xq8 = xq[:96].copy()
    xd = np.array([0.5, 0.25, 0.125], np.float32)
    scales = rng.integers(0, 64, 8).astype(np.int32)
    native, portable = np.empty(3, np.int32), np.empty(3, np.int32)
    row_native = build()(w, xq, xq8, xd, f16_table(), scales, native)
    monkeypatch.setattr(intdot, "HAS_AVX2", False)
    row_portable = build()(w, xq, xq8, xd, f16_table(), scales, portable)
    np.testing.assert_array_equal(portable, native)
    assert row_portable == row_native
