"""ggserve.kernels.quant: every GGML block type decodes exactly like gguf-py's numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as oracle_dequantize

from ggserve.kernels.ggml_types import type_name
from ggserve.kernels.quant import SUPPORTED_TYPES, block_layout, dequantize

ALL_TYPES = sorted(SUPPORTED_TYPES)
# byte offsets of the f16 scales inside a block; random bytes there could be inf/NaN
SCALE_OFFSETS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 10: [80, 82], 11: [108], 12: [0, 2],
                 13: [0, 2], 14: [208]}


def random_blocks(rng: np.random.Generator, ggml_type: int, n_elements: int) -> np.ndarray:
    """Random raw bytes of `ggml_type` for n_elements values, with finite f16 scales."""
    block_size, block_bytes = block_layout(ggml_type)
    nblk = n_elements // block_size
    if ggml_type == 0:
        return rng.standard_normal(nblk).astype(np.float32).view(np.uint8)
    if ggml_type == 1:
        return rng.standard_normal(nblk).astype(np.float16).view(np.uint8)
    if ggml_type == 30:
        return (rng.standard_normal(nblk).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (nblk, block_bytes), dtype=np.uint8)
    for o in SCALE_OFFSETS[ggml_type]:
        scales = (rng.standard_normal(nblk) * 0.03).astype(np.float16)
        raw[:, o:o + 2] = scales.view(np.uint8).reshape(nblk, 2)
    return raw.reshape(-1)


def oracle(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    return oracle_dequantize(raw, GGMLQuantizationType(ggml_type)).astype(np.float32).reshape(-1)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=[type_name(t) for t in ALL_TYPES])
@pytest.mark.parametrize("n_blocks", [1, 37])
def test_dequantize_matches_gguf_reference(ggml_type, n_blocks):
    rng = np.random.default_rng(1000 + ggml_type * 7 + n_blocks)
    block_size, _ = block_layout(ggml_type)
    n = n_blocks * max(block_size, 32)
    raw = random_blocks(rng, ggml_type, n)
    got = dequantize(raw, ggml_type, n)
    want = oracle(raw, ggml_type)
    assert got.dtype == np.float32 and got.shape == (n,)
    assert np.isfinite(got).all()
    np.testing.assert_array_max_ulp(got, want, maxulp=1)
    assert np.abs(want).max() > 0  # the random blocks are not degenerate


def test_dequantize_rejects_size_mismatch():
    raw = np.zeros(34 * 2, np.uint8)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw, 8, 96)  # 3 blocks of Q8_0 need 102 bytes
    with pytest.raises(ValueError, match="multiple"):
        dequantize(raw, 8, 40)


def test_unsupported_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported ggml type 9"):
        block_layout(9)  # Q8_1: not a weight format GGUF files ship


def test_q8_0_hand_computed_block():
    # d = 0.5, q = -128..-97: values are q * 0.5
    block = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8),
                            np.arange(-128, -96, dtype=np.int8).view(np.uint8)])
    np.testing.assert_array_equal(dequantize(block, 8, 32), np.arange(-128, -96) * 0.5)


def test_scalar_f16_rounding_matches_numpy_everywhere():
    from numba import njit

    from ggserve.kernels.quant import f16_round, f32_to_f16_bits

    @njit
    def round_all(x, bits, values):
        for i in range(x.shape[0]):
            bits[i] = f32_to_f16_bits(x[i])
            values[i] = f16_round(x[i])

    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),  # normals, subnormals, overflow
        [0.0, -0.0, 65504.0, 65519.0, 65520.0, -1e9, np.inf, -np.inf, np.nan, 2.0**-24, 2.0**-25, 3 * 2.0**-26],
        np.float32(1.0) + np.arange(8) * 2.0**-11,  # exact ties between neighbouring f16 values
    ]).astype(np.float32)
    bits, values = np.empty(x.size, np.uint16), np.empty(x.size, np.float32)
    round_all(x, bits, values)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(bits, expected.view(np.uint16))
    np.testing.assert_array_equal(values, expected.astype(np.float32))


def test_f16_decodes_every_bit_pattern_exactly():
    # the bit-placement conversion (no table): normals, subnormals, signed zeros, inf and nan payloads
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = dequantize(patterns.view(np.uint8), 1, 65536)
    expected = patterns.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(expected)],
                                  expected.view(np.uint32)[~np.isnan(expected)])
    assert np.isnan(got[np.isnan(expected)]).all()


def test_f16_rows_convert_alike_contiguous_strided_and_in_the_tail():
    # f16_row_to_f32 takes 8 values at a time (F16C) only from contiguous rows; a strided row and
    # the last d % 8 values take the bit arithmetic: every path must give numpy's values
    from numba import njit

    from ggserve.kernels.quant import f16_row_to_f32

    @njit(cache=False)
    def convert(src, dst):
        f16_row_to_f32(src, dst)

    patterns = np.random.default_rng(3).integers(0, 0x7C00, (2, 42)).astype(np.uint16)
    patterns[0, :4] = [0x0001, 0x8000, 0x03FF, 0x7BFF]  # subnormal, -0, largest subnormal, max
    for src in (patterns[0, :21], patterns[1, ::2]):  # contiguous (2 x 8 + 5), strided (21)
        dst = np.empty(21, np.float32)
        convert(src, dst)
        np.testing.assert_array_equal(dst.view(np.uint32), src.view(np.float16).astype(np.float32).view(np.uint32))
