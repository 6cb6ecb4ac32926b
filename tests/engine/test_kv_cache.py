"""engine/kv_cache.py: bookkeeping of cached tokens and the cache edits the engine relies on."""
from __future__ import annotations

import numpy as np
import pytest

from ggserve.engine.kv_cache import KVCache, RopeSpec

rng = np.random.default_rng(3)
N_LAYERS, N_KV, HEAD_DIM = 2, 2, 8


def make_cache(dtype="f32", n_slots=3, n_ctx=16, specs=True):
    rope_specs = [RopeSpec(HEAD_DIM, 10000.0, neox=True), RopeSpec(HEAD_DIM, 1e6, neox=False)] if specs else None
    return KVCache(n_slots, N_LAYERS, n_ctx, N_KV, HEAD_DIM, dtype=dtype, rope_specs=rope_specs)


def fill(cache, slot, tokens, keys=None, values=None):
    """Write tokens at positions 0..n-1 with given (or random) per-layer K/V; returns (keys, values)."""
    n = len(tokens)
    keys = rng.standard_normal((N_LAYERS, n, N_KV, HEAD_DIM)).astype(np.float32) if keys is None else keys
    values = rng.standard_normal((N_LAYERS, n, N_KV, HEAD_DIM)).astype(np.float32) if values is None else values
    slots, positions = np.full(n, slot, np.int32), np.arange(n, dtype=np.int32)
    for layer in range(N_LAYERS):
        cache.write_layer(layer, slots, positions, keys[layer], values[layer])
    cache.commit(slots, positions, np.asarray(tokens, np.int32))
    return keys, values


def test_commit_counts_and_usage():
    cache = make_cache()
    assert cache.num_cached(0) == 0 and cache.usage() == (0, 3 * 16)
    fill(cache, 1, [5, 6, 7])
    assert cache.num_cached(1) == 3 and cache.cached_tokens(1) == [5, 6, 7]
    assert cache.num_cached(0) == 0
    assert cache.usage() == (3, 48)


def test_f16_storage_rounds_like_numpy_half():
    cache = make_cache("f16")
    keys, values = fill(cache, 0, [1, 2])
    np.testing.assert_array_equal(cache.k[0, 1, :2], keys[1].astype(np.float16))
    assert cache.k_kernel.dtype == np.uint16 and cache.k_kernel.base is not None


def test_truncate_clear_and_bad_arguments():
    cache = make_cache()
    fill(cache, 0, [1, 2, 3, 4])
    cache.truncate(0, 2)
    assert cache.cached_tokens(0) == [1, 2]
    cache.truncate(0, 10)  # truncating past the end keeps everything
    assert cache.num_cached(0) == 2
    cache.clear(0)
    assert cache.num_cached(0) == 0 and cache.cached_tokens(0) == []
    with pytest.raises(ValueError, match="slot_id 3 out of range"):
        cache.num_cached(3)
    with pytest.raises(ValueError):
        cache.truncate(0, -1)
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 1, 4, 1, 8, dtype="q8")


def test_copy_prefix_copies_kv_and_tokens():
    cache = make_cache()
    keys, values = fill(cache, 0, [9, 8, 7, 6])
    fill(cache, 2, [1, 1, 1, 1, 1, 1])
    cache.copy_prefix(0, 2, 3)
    assert cache.cached_tokens(2) == [9, 8, 7]
    np.testing.assert_array_equal(cache.k[2, :, :3], keys[:, :3])
    np.testing.assert_array_equal(cache.v[2, :, :3], values[:, :3])
    assert cache.cached_tokens(0) == [9, 8, 7, 6]  # source untouched
    with pytest.raises(ValueError, match="cannot copy 5 tokens"):
        cache.copy_prefix(0, 1, 5)


def test_shift_drops_span_and_rerotates_moved_keys():
    cache = make_cache()
    n, n_keep, n_discard = 10, 2, 3
    raw = rng.standard_normal((N_LAYERS, n, N_KV, HEAD_DIM)).astype(np.float32)
    positions = np.arange(n, dtype=np.int32)
    roped = raw.copy()
    for layer in range(N_LAYERS):  # keys as the model stores them: rotated by their position
        cache.rope_specs[layer].apply(roped[layer], positions)
    _, values = fill(cache, 0, list(range(100, 110)), keys=roped)
    cache.shift(0, n_keep, n_discard)

    assert cache.cached_tokens(0) == [100, 101, 105, 106, 107, 108, 109]
    kept_raw = np.concatenate([raw[:, :n_keep], raw[:, n_keep + n_discard:]], axis=1)
    for layer in range(N_LAYERS):
        expected = kept_raw[layer].copy()
        cache.rope_specs[layer].apply(expected, np.arange(n - n_discard, dtype=np.int32))
        np.testing.assert_allclose(cache.k[0, layer, : n - n_discard], expected, atol=1e-5)
    np.testing.assert_array_equal(cache.v[0, :, n_keep: n - n_discard], values[:, n_keep + n_discard:])


def test_shift_validation():
    cache = make_cache(specs=False)
    fill(cache, 0, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="bad context shift"):
        cache.shift(0, 2, 3)
    with pytest.raises(ValueError, match="no rope specs"):
        cache.shift(0, 1, 1)
    cache.shift(0, 1, 0)  # nothing to drop is a no-op
    assert cache.num_cached(0) == 4


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_save_and_restore_a_slot_round_trips_tokens_and_cells(tmp_path, dtype):
    cache = make_cache(dtype)
    fill(cache, 1, [5, 6, 7, 8])
    path = tmp_path / "slot.bin"
    with open(path, "wb") as f:
        assert cache.save_slot(1, f) == 4
    other = make_cache(dtype)
    fill(other, 2, [1, 2])
    with open(path, "rb") as f:
        assert other.restore_slot(2, f) == 4
    assert other.cached_tokens(2) == [5, 6, 7, 8]
    np.testing.assert_array_equal(other.k[2, :, :4], cache.k[1, :, :4])
    np.testing.assert_array_equal(other.v[2, :, :4], cache.v[1, :, :4])


def test_restore_rejects_a_file_of_another_layout(tmp_path):
    small = KVCache(1, 1, 16, N_KV, HEAD_DIM, dtype="f32")
    path = tmp_path / "slot.bin"
    with open(path, "wb") as f:
        small.save_slot(0, f)
    with open(path, "rb") as f, pytest.raises(ValueError, match="layout"):
        make_cache("f32").restore_slot(0, f)
    path.write_bytes(b"not a slot file")
    with open(path, "rb") as f, pytest.raises(ValueError, match="not a saved slot file"):
        make_cache("f32").restore_slot(0, f)


def test_restore_rejects_a_truncated_file(tmp_path):
    cache = make_cache("f32")
    fill(cache, 1, [5, 6, 7, 8])
    path = tmp_path / "slot.bin"
    with open(path, "wb") as f:
        cache.save_slot(1, f)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with open(path, "rb") as f, pytest.raises(ValueError, match="not a saved slot file"):
        make_cache("f32").restore_slot(0, f)
