"""Load-time repacking: Q4_0 / Q5_0 blocks widened to Q8_0 hold exactly the same weights."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from ggserve.kernels.matmul import QuantMatrix, matmul
from ggserve.kernels.repack import widen_to_q8_0
from tests.kernels.test_matmul import assert_close_to_reference, effective_x


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q5_0], ids=["Q4_0", "Q5_0"])
@pytest.mark.parametrize("m,k", [(1, 32), (7, 96), (33, 640)])
def test_widened_blocks_dequantize_to_the_same_weights(ggml_type, m, k):
    rng = np.random.default_rng(m * k)
    w = (rng.standard_normal((m, k)) * rng.uniform(0.01, 3.0, (m, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    packed = quantize(w, ggml_type)
    q8 = widen_to_q8_0(packed, int(ggml_type))
    assert q8.size == m * k // 32 * 34
    expected = dequantize(packed, ggml_type).reshape(m, k)
    assert np.array_equal(dequantize(q8, Q.Q8_0).reshape(m, k), expected)
    # and the widened matrix multiplies as a Q8_0 matrix of those weights (x rounded to Q8_0)
    x = rng.standard_normal((3, k)).astype(np.float32)
    out = np.empty((3, m), np.float32)
    matmul(x, QuantMatrix(q8, Q.Q8_0, m, k), out)
    assert_close_to_reference(out, effective_x(x, Q.Q8_0), expected)


def test_partial_blocks_and_other_types_are_refused():
    with pytest.raises(ValueError, match="22-byte blocks"):
        widen_to_q8_0(np.zeros(30, np.uint8), int(Q.Q5_0))
    with pytest.raises(ValueError, match="only Q4_0 and Q5_0"):
        widen_to_q8_0(np.zeros(34, np.uint8), int(Q.Q8_0))


@pytest.mark.parametrize("m,k", [(1, 32), (7, 96), (33, 640)])
def test_q5_0_kernel_gives_the_widened_matrix_bits_for_any_batch(m, k):
    # Q5_0 is streamed packed (its kernel unpacks in registers, or into an L1 Q8_0 copy for
    # batches): the same values and scales as the widened matrix, so the same bits at every n
    rng = np.random.default_rng(m + k)
    packed = quantize(rng.standard_normal((m, k)).astype(np.float32), Q.Q5_0)
    native, widened = QuantMatrix(packed, Q.Q5_0, m, k), QuantMatrix(widen_to_q8_0(packed, int(Q.Q5_0)), Q.Q8_0, m, k)
    for n in (1, 2, 5):
        x = rng.standard_normal((n, k)).astype(np.float32)
        a, b = np.empty((n, m), np.float32), np.empty((n, m), np.float32)
        matmul(x, native, a)
        matmul(x, widened, b)
        np.testing.assert_array_equal(a, b, err_msg=f"n={n}")
