"""ggserve.kernels.matmul: fused quantized matmul vs x @ dequantize(W).T, llama.cpp's summation shapes
bit for bit, batch invariance, get_rows."""
from __future__ import annotations

import numpy as np
import pytest

from ggserve.kernels.matmul import (BLAS_MIN_ROWS, QuantMatrix, blas_rows_by_group, get_rows, matmul, matmul_multi,
                            row_shapes_by_group)
from ggserve.kernels.matmul_krows import QUAD, TILED
from ggserve.kernels.ggml_types import Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, type_name
from ggserve.kernels.quant import SUPPORTED_TYPES, block_layout
from tests.kernels.test_intdot import fma32, ggml_quantize_q8_0, ggml_quantize_q8_k
from tests.kernels.test_quant import oracle, random_blocks

ALL_TYPES = sorted(SUPPORTED_TYPES)
IDS = [type_name(t) for t in ALL_TYPES]


def make_matrix(rng, ggml_type: int, m: int, k: int) -> tuple[QuantMatrix, np.ndarray]:
    raw = random_blocks(rng, ggml_type, m * k)
    return QuantMatrix(raw, ggml_type, m, k), oracle(raw, ggml_type).reshape(m, k)


def k_for(ggml_type: int, blocks: int) -> int:
    return blocks * max(block_layout(ggml_type)[0], 32)


def ggml_q8_0_activations(x: np.ndarray) -> np.ndarray:
    """x as ggml's quantize_row_q8_0 leaves it, dequantized (f64); oracle in test_kernels_intdot."""
    n, k = x.shape
    q, d = ggml_quantize_q8_0(x)
    return (q.reshape(n, k // 32, 32) * d.astype(np.float64)[..., None]).reshape(n, k)


def ggml_q8_k_activations(x: np.ndarray) -> np.ndarray:
    """x as ggml's quantize_row_q8_K_ref leaves it, dequantized (f64); oracle in test_kernels_intdot."""
    n, k = x.shape
    q, d = ggml_quantize_q8_k(x)
    return (q.reshape(n, k // 256, 256) * d.astype(np.float64)[..., None]).reshape(n, k)


def effective_x(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """The activations a matmul really multiplies, as in llama.cpp: Q8_0 / Q5_0 weights take x rounded
    to Q8_0 and Q4_K / Q5_K / Q6_K weights x rounded to Q8_K (on both the fused and the BLAS path);
    every other type takes x as is."""
    if ggml_type in (Q8_0, Q5_0):
        return ggml_q8_0_activations(x)
    return ggml_q8_k_activations(x) if ggml_type in (Q4_K, Q5_K, Q6_K) else x


def assert_close_to_reference(out: np.ndarray, x: np.ndarray, w_f32: np.ndarray) -> None:
    ref = x.astype(np.float64) @ w_f32.T.astype(np.float64)
    # f32 accumulation error bound ~ k * eps * sum|x*w|; far tighter than any kernel bug
    bound = 4e-7 * x.shape[1] ** 0.5 * (np.abs(x).astype(np.float64) @ np.abs(w_f32.T).astype(np.float64)) + 1e-30
    assert np.all(np.abs(out - ref) <= bound), np.max(np.abs(out - ref) / bound)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=IDS)
@pytest.mark.parametrize("m,blocks", [(1, 1), (13, 2), (37, 3)])
def test_matmul_matches_dequantized_reference(ggml_type, m, blocks):
    rng = np.random.default_rng(ggml_type * 100 + m)
    k = k_for(ggml_type, blocks)
    w, w_f32 = make_matrix(rng, ggml_type, m, k)
    for n in (1, 2, 3, 5, 8, 9, BLAS_MIN_ROWS + 3):
        x = rng.standard_normal((n, k)).astype(np.float32)
        out = np.full((n, m), np.nan, np.float32)
        matmul(x, w, out)
        assert_close_to_reference(out, effective_x(x, ggml_type), w_f32)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=IDS)
def test_fused_path_is_batch_invariant(ggml_type):
    # a row's result must not depend on n or on which other rows share the batch
    rng = np.random.default_rng(7 + ggml_type)
    m, k = 45, k_for(ggml_type, 2)
    w, _ = make_matrix(rng, ggml_type, m, k)
    xs = rng.standard_normal((BLAS_MIN_ROWS - 1, k)).astype(np.float32)
    single = np.empty((len(xs), m), np.float32)
    for i in range(len(xs)):
        matmul(xs[i:i + 1], w, single[i:i + 1])
    for n in (2, 3, 4, 7, 9, BLAS_MIN_ROWS - 1):
        order = rng.permutation(len(xs))[:n]
        out = np.empty((n, m), np.float32)
        # rows of the same shape flags (kernels/matmul_krows.py): the single-row ones here
        matmul(xs[order], w, out, row_shapes=np.zeros(n, np.int8))
        np.testing.assert_array_equal(out, single[order], err_msg=f"n={n}")
    flagged = np.empty_like(single)
    for i in range(len(xs)):
        matmul(xs[i:i + 1], w, flagged[i:i + 1], row_shapes=np.array([QUAD | TILED], np.int8))
    out = np.empty_like(single)
    matmul(xs, w, out, row_shapes=np.full(len(xs), QUAD | TILED, np.int8))
    np.testing.assert_array_equal(out, flagged)


def test_row_shapes_follow_llama_cpps_batch_rules_per_group():
    groups = np.array([3] * 9 + [1] + [2] * 6)
    shapes = row_shapes_by_group(groups)
    assert shapes.tolist() == [QUAD | TILED] * 8 + [TILED] + [0] + [QUAD] * 4 + [0] * 2
    assert row_shapes_by_group(np.zeros(3)).tolist() == [0, 0, 0]
    # with positions, a group is shaped as its whole sequence so far: the last token of a
    # 12-token prompt re-evaluated alone keeps the shape it had in the full batch
    full = row_shapes_by_group(np.zeros(12), np.arange(12))
    assert full.tolist() == row_shapes_by_group(np.zeros(12)).tolist()
    assert row_shapes_by_group(np.array([5]), np.array([11])).tolist() == [full[11]] == [QUAD | TILED]
    assert row_shapes_by_group(np.array([5, 5]), np.array([8, 9])).tolist() == [TILED, TILED]


def ggml_q4_k_rows(w: QuantMatrix, x: np.ndarray, quad: bool) -> np.ndarray:
    """numpy oracle of llama.cpp's repacked Q4_K on AVX2: ggml_gemv_q4_K_8x8_q8_K (one fused
    multiply-add per super-block for the scaled sums and one for the minimums) or, for rows in
    4-row groups, ggml_gemm_q4_K_8x8_q8_K (the same in four 64-value parts); out = acc - acc_min."""
    n, k = x.shape
    nb = k // 256
    raw = w.data.reshape(w.m, nb, 144)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc = raw[:, :, 4:16].astype(np.int64)
    scales, mins = np.empty((w.m, nb, 8), np.int64), np.empty((w.m, nb, 8), np.int64)
    for j in range(4):
        scales[..., j], mins[..., j] = sc[..., j] & 63, sc[..., j + 4] & 63
        scales[..., j + 4] = (sc[..., j + 8] & 15) | ((sc[..., j] >> 6) << 4)
        mins[..., j + 4] = (sc[..., j + 8] >> 4) | ((sc[..., j + 4] >> 6) << 4)
    qs = raw[:, :, 16:].astype(np.int64).reshape(w.m, nb, 4, 32)
    q = np.empty((w.m, nb, 8, 32), np.int64)
    q[:, :, 0::2], q[:, :, 1::2] = qs & 15, qs >> 4
    xq, xd = ggml_quantize_q8_k(x)
    out = np.empty((n, w.m), np.float32)
    parts = 4 if quad else 1
    for i in range(n):
        xs = xq[i].astype(np.int64).reshape(nb, 8, 32)
        sub = (scales * (q * xs[None]).sum(-1)).reshape(w.m, nb, parts, -1).sum(-1)
        sub_min = (mins * xs.sum(-1)[None]).reshape(w.m, nb, parts, -1).sum(-1)
        acc, acc_min = np.zeros(w.m, np.float32), np.zeros(w.m, np.float32)
        for b in range(nb):
            for p in range(parts):
                acc = fma32(sub[:, b, p].astype(np.float32), d[:, b] * xd[i, b], acc)
                acc_min = fma32(sub_min[:, b, p].astype(np.float32), dmin[:, b] * xd[i, b], acc_min)
        out[i] = acc - acc_min
    return out


def test_q4_k_rows_have_llama_cpps_bits_in_both_batch_shapes():
    rng = np.random.default_rng(31)
    w, _ = make_matrix(rng, Q4_K, 24, 256 * 3)
    x = rng.standard_normal((6, 256 * 3)).astype(np.float32)
    single, quad = np.empty((6, 24), np.float32), np.empty((6, 24), np.float32)
    matmul(x, w, single, row_shapes=np.zeros(6, np.int8))
    matmul(x, w, quad, row_shapes=np.full(6, QUAD, np.int8))
    np.testing.assert_array_equal(single, ggml_q4_k_rows(w, x, quad=False))
    np.testing.assert_array_equal(quad, ggml_q4_k_rows(w, x, quad=True))
    assert (single != quad).any()  # the shapes really sum differently
    default = np.empty((6, 24), np.float32)
    matmul(x, w, default)  # llama.cpp's rule for one batch of 6: rows 0-3 quad, 4-5 single
    np.testing.assert_array_equal(default, np.concatenate([quad[:4], single[4:]]))


def test_blas_rows_by_group_marks_rows_of_big_groups():
    groups = np.array([2] * BLAS_MIN_ROWS + [0, 1, 1] + [2])
    mask = blas_rows_by_group(groups)
    assert mask.tolist() == [True] * BLAS_MIN_ROWS + [False] * 3 + [True]
    assert not blas_rows_by_group(np.zeros(BLAS_MIN_ROWS - 1)).any()


@pytest.mark.parametrize("ggml_type", [8, 12])
def test_mixed_blas_mask_gives_each_row_its_own_paths_bits(ggml_type):
    rng = np.random.default_rng(21)
    k = 256
    w, _ = make_matrix(rng, ggml_type, 19, k)
    big = rng.standard_normal((BLAS_MIN_ROWS + 2, k)).astype(np.float32)
    small = rng.standard_normal((3, k)).astype(np.float32)
    alone_big, alone_small = np.empty((big.shape[0], 19), np.float32), np.empty((3, 19), np.float32)
    matmul(big, w, alone_big)
    matmul(small, w, alone_small)
    x = np.concatenate([small[:1], big, small[1:]])
    mask = np.array([False] + [True] * big.shape[0] + [False, False])
    out = np.empty((x.shape[0], 19), np.float32)
    matmul(x, w, out, mask, row_shapes_by_group(mask))
    np.testing.assert_array_equal(out[1:-2], alone_big)
    np.testing.assert_array_equal(out[[0, -2, -1]], alone_small)
    with pytest.raises(ValueError, match="blas_rows"):
        matmul(x, w, out, mask[:-1])


def test_matmul_multi_equals_separate_calls_with_mixed_types():
    rng = np.random.default_rng(3)
    k = 512
    mats = [make_matrix(rng, t, m, k)[0] for t, m in ((6, 40), (8, 9), (12, 21), (14, 6))]
    for n in (1, 4):
        x = rng.standard_normal((n, k)).astype(np.float32)
        outs = [np.empty((n, w.m), np.float32) for w in mats]
        matmul_multi(x, mats, outs)
        for w, o in zip(mats, outs):
            ref = np.empty_like(o)
            matmul(x, w, ref)
            np.testing.assert_array_equal(o, ref)


def test_large_matrix_spans_many_parallel_tasks():
    rng = np.random.default_rng(5)
    m, k = 3001, 896  # Q5_0 ~2 MB: dozens of tasks, m not a multiple of 4
    w, w_f32 = make_matrix(rng, 6, m, k)
    x = rng.standard_normal((3, k)).astype(np.float32)
    out = np.empty((3, m), np.float32)
    matmul(x, w, out)
    assert_close_to_reference(out, effective_x(x, 6), w_f32)


def test_prefill_path_for_many_rows():
    rng = np.random.default_rng(9)
    w, w_f32 = make_matrix(rng, 12, 70, 512)
    x = rng.standard_normal((200, 512)).astype(np.float32)
    out = np.empty((200, 70), np.float32)
    matmul(x, w, out)
    assert_close_to_reference(out, effective_x(x, 12), w_f32)


def test_output_views_and_non_contiguous_inputs():
    rng = np.random.default_rng(11)
    w, w_f32 = make_matrix(rng, 8, 20, 64)
    big = rng.standard_normal((4, 128)).astype(np.float32)
    x = big[:, ::2]  # non-contiguous x
    out_full = np.zeros((4, 30), np.float32)
    out = out_full[:, 5:25]  # non-contiguous out
    matmul(x, w, out)
    assert_close_to_reference(out, effective_x(np.ascontiguousarray(x), 8), w_f32)
    assert not out_full[:, :5].any() and not out_full[:, 25:].any()


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=IDS)
def test_get_rows_matches_reference_rows(ggml_type):
    rng = np.random.default_rng(13 + ggml_type)
    m, k = 17, k_for(ggml_type, 2)
    w, w_f32 = make_matrix(rng, ggml_type, m, k)
    ids = np.array([3, 0, 16, 3], np.int32)
    out = np.empty((4, k), np.float32)
    get_rows(w, ids, out)
    np.testing.assert_array_max_ulp(out, w_f32[ids], maxulp=1)


def test_get_rows_rejects_out_of_range_ids():
    w, _ = make_matrix(np.random.default_rng(0), 8, 4, 32)
    with pytest.raises(IndexError):
        get_rows(w, np.array([4], np.int32), np.empty((1, 32), np.float32))
    with pytest.raises(IndexError):
        get_rows(w, np.array([-1], np.int32), np.empty((1, 32), np.float32))


def test_shape_validation():
    raw = np.zeros(34 * 4, np.uint8)
    with pytest.raises(ValueError, match="needs"):
        QuantMatrix(raw, 8, 3, 32)  # 3 rows need 102 bytes
    with pytest.raises(ValueError, match="multiple"):
        QuantMatrix(raw, 8, 4, 30)
    w = QuantMatrix(raw, 8, 4, 32)
    with pytest.raises(ValueError, match="x must be"):
        matmul(np.zeros((1, 31), np.float32), w, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        matmul(np.zeros((1, 32), np.float32), w, np.zeros((1, 5), np.float32))


def test_quant_matrix_views_data_without_copy():
    raw = random_blocks(np.random.default_rng(2), 6, 8 * 64)
    w = QuantMatrix(raw, 6, 8, 64)
    assert np.shares_memory(w.data, raw)
    assert w.nbytes == raw.nbytes and w.shape == (8, 64)
