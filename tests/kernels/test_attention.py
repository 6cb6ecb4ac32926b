"""kernels/attention.py against a direct numpy softmax(QK^T)V with explicit masks."""
from __future__ import annotations

import numpy as np
import pytest

import ggserve.kernels.attention as attention_module
from ggserve.kernels.attention import attention

rng = np.random.default_rng(7)


def f16(x):
    return np.asarray(x).astype(np.float16).astype(np.float64)


def reference(q, k_cache, v_cache, layer, slot_ids, positions, scale, window):
    """softmax(q K^T * scale) V in float64; with an f16 cache, Q and the normalized probabilities
    are rounded to f16 first, as llama.cpp's attention without flash attention does."""
    f16_operands = k_cache.dtype == np.float16
    n, n_heads, _ = q.shape
    group = n_heads // k_cache.shape[3]
    out = np.zeros((n, n_heads, v_cache.shape[4]), np.float64)
    for i in range(n):
        slot, pos = slot_ids[i], positions[i]
        start = max(0, pos - window + 1) if window > 0 else 0
        for h in range(n_heads):
            keys = k_cache[slot, layer, start:pos + 1, h // group].astype(np.float64)
            values = v_cache[slot, layer, start:pos + 1, h // group].astype(np.float64)
            query = f16(q[i, h]) if f16_operands else q[i, h].astype(np.float64)
            s = keys @ query * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = (f16(p) if f16_operands else p) @ values
    return out


def make_cache(n_slots=3, n_layers=2, n_ctx=24, n_kv=2, head_dim=16, value_dim=16, dtype=np.float32):
    k = rng.standard_normal((n_slots, n_layers, n_ctx, n_kv, head_dim)).astype(dtype)
    v = rng.standard_normal((n_slots, n_layers, n_ctx, n_kv, value_dim)).astype(dtype)
    return k, v


def run(q, k, v, layer, slots, positions, scale, window):
    out = np.full((q.shape[0], q.shape[1], v.shape[4]), np.nan, np.float32)
    kk = k.view(np.uint16) if k.dtype == np.float16 else k
    vv = v.view(np.uint16) if v.dtype == np.float16 else v
    attention(q, kk, vv, layer, np.asarray(slots, np.int32), np.asarray(positions, np.int32), scale, window, out)
    return out


@pytest.mark.parametrize("serial_limit", [0, 1 << 40], ids=["parallel", "serial"])
@pytest.mark.parametrize("window", [0, 4])
def test_mixed_slots_causal_gqa(window, serial_limit, monkeypatch):
    monkeypatch.setattr(attention_module, "SERIAL_WORK_LIMIT", serial_limit)
    k, v = make_cache()
    q = rng.standard_normal((5, 4, 16)).astype(np.float32)  # 4 query heads over 2 kv heads
    slots, positions = [0, 0, 2, 1, 2], [3, 4, 10, 0, 11]
    out = run(q, k, v, 1, slots, positions, 0.25, window)
    expected = reference(q, k, v, 1, slots, positions, 0.25, window)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_causal_mask_ignores_future_cells():
    k, v = make_cache()
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    before = run(q, k, v, 0, [1], [5], 0.25, 0)
    k[1, 0, 6:] = 1e4  # garbage past the query's position must not matter
    v[1, 0, 6:] = -1e4
    np.testing.assert_array_equal(run(q, k, v, 0, [1], [5], 0.25, 0), before)


def test_sliding_window_drops_old_cells():
    k, v = make_cache()
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    before = run(q, k, v, 0, [0], [9], 0.5, 3)
    k[0, 0, :7] = 1e4  # cells 0..6 fall outside a window of 3 ending at 9
    np.testing.assert_array_equal(run(q, k, v, 0, [0], [9], 0.5, 3), before)
    assert not np.allclose(run(q, k, v, 0, [0], [9], 0.5, 0), before)


def test_single_cell_returns_its_value():
    k, v = make_cache()
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    out = run(q, k, v, 1, [2], [0], 0.25, 0)
    np.testing.assert_allclose(out[0, 0], v[2, 1, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 3], v[2, 1, 0, 1], rtol=1e-6)


def test_float16_cache_rounds_q_and_probabilities_like_llama_cpp():
    k, v = make_cache(value_dim=8, dtype=np.float16)
    k[0, 0, 2, 0, :4] = [0.0, -0.0, 6e-8, -65504.0 / 64]  # subnormal and large f16 values
    q = rng.standard_normal((3, 2, 16)).astype(np.float32)  # 2 heads over 2 kv heads (no grouping)
    slots, positions = [0, 1, 0], [2, 7, 5]
    out16 = run(q, k, v, 0, slots, positions, 0.1, 0)
    k32, v32 = k.astype(np.float32), v.astype(np.float32)
    out32 = run(q, k32, v32, 0, slots, positions, 0.1, 0)
    np.testing.assert_allclose(out16, reference(q, k, v, 0, slots, positions, 0.1, 0), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(out32, reference(q, k32, v32, 0, slots, positions, 0.1, 0), rtol=2e-6, atol=2e-6)
    # the same cached values without the f16 operand rounding: visibly different results
    assert np.abs(out16 - out32).max() > 1e-4


@pytest.mark.parametrize("n_kv", [1, 2])
def test_parallel_decode_row_splits_query_heads(n_kv, monkeypatch):
    # one decode row over 1-2 kv heads: the parallel path splits the query heads of a kv head
    monkeypatch.setattr(attention_module, "SERIAL_WORK_LIMIT", 0)
    k, v = make_cache(n_slots=1, n_ctx=40, n_kv=n_kv, dtype=np.float16)
    q = rng.standard_normal((1, 8, 16)).astype(np.float32)
    out = run(q, k, v, 1, [0], [37], 0.25, 0)
    np.testing.assert_allclose(out, reference(q, k, v, 1, [0], [37], 0.25, 0), rtol=1e-4, atol=1e-5)


def test_store_kv_rounds_to_float16_like_numpy():
    from ggserve.kernels.attention import store_kv

    values = np.concatenate([
        rng.standard_normal(200) * 10.0 ** rng.integers(-9, 5, 200),  # normals and subnormals
        [0.0, -0.0, 65504.0, 65519.0, 65520.0, -70000.0, np.inf, -np.inf, 2.0**-24, 2.0**-25, 3 * 2.0**-26],
        np.float32(1.0) + np.arange(8) * 2.0**-11,  # exact ties between two f16 values
    ]).astype(np.float32)
    n = values.size // 8
    k = values[: n * 8].reshape(n, 1, 8)
    cache = np.zeros((2, 1, n, 1, 8), np.float16)
    store_kv(k, k, cache.view(np.uint16), cache.view(np.uint16), 0, np.ones(n, np.int32), np.arange(n, dtype=np.int32))
    with np.errstate(over="ignore"):  # numpy's own cast warns on the values that become inf
        expected = k[:, 0].astype(np.float16)
    np.testing.assert_array_equal(cache[1, 0, :, 0].view(np.uint16), expected.view(np.uint16))
    nan = np.full((1, 1, 8), np.nan, np.float32)
    store_kv(nan, nan, cache.view(np.uint16), cache.view(np.uint16), 0, np.zeros(1, np.int32), np.zeros(1, np.int32))
    assert np.isnan(cache[0, 0, 0, 0]).all()
