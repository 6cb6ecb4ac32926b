"""Per-slot key/value cache: preallocated K and V arrays plus the token ids each slot holds.

Owns: the K/V storage (n_slots, n_layers, n_ctx, n_kv_heads, head_dim) in float16 (default, as
llama.cpp) or float32, the bookkeeping of which tokens every slot has cached, and the cache
edits the engine needs: truncate, clear, copy a prefix between slots, and context shift (drop a
span and re-rotate the keys that move, because rope is baked into cached keys).

Invariant: cell t of a slot holds the K/V of the token at position t, and positions 0..n-1 are
exactly `cached_tokens(slot)`. The model writes cells (ggserve.kernels.attention.store_kv into
`k_kernel` / `v_kernel`, or `write_layer` from numpy) and then records the tokens with `commit`;
everything else only reads.
"""
from __future__ import annotations

import zipfile

from dataclasses import dataclass

import numpy as np

from ggserve.kernels.ops import rope

KV_DTYPES = {"f16": np.float16, "f32": np.float32}


@dataclass(frozen=True)
class RopeSpec:
    """How one layer's keys were rotated: enough to re-rotate them after a context shift."""

    n_rot: int
    freq_base: float
    freq_scale: float = 1.0
    neox: bool = False
    freq_factors: np.ndarray | None = None  # (n_rot/2,) f32, Llama-3 style per-pair divisors

    def __post_init__(self):
        if self.n_rot <= 0 or self.n_rot % 2:
            raise ValueError(f"rope n_rot must be a positive even number, got {self.n_rot}")
        if self.freq_base <= 0 or self.freq_scale <= 0:
            raise ValueError(f"rope freq_base and freq_scale must be > 0, got {self.freq_base}, {self.freq_scale}")
        if self.freq_factors is not None and self.freq_factors.shape != (self.n_rot // 2,):
            raise ValueError(f"rope freq_factors must have shape ({self.n_rot // 2},), got {self.freq_factors.shape}")

    @property
    def theta_scale(self) -> np.float32:
        # powf(freq_base, -2.0f / n_rot) in float32, as ggml computes it
        return np.power(np.float32(self.freq_base), np.float32(-2.0) / np.float32(self.n_rot))

    def factors(self) -> np.ndarray:
        if self.freq_factors is not None:
            return np.ascontiguousarray(self.freq_factors, dtype=np.float32)
        return np.ones(self.n_rot // 2, np.float32)

    def apply(self, x: np.ndarray, positions: np.ndarray) -> None:
        # x (n, n_heads, head_dim) f32 rotated in place by positions (n,) int32
        rope(x, positions, self.n_rot, self.theta_scale, np.float32(self.freq_scale), self.factors(), self.neox)


class KVCache:
    def __init__(self, n_slots: int, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                 value_dim: int | None = None, dtype: str = "f16", rope_specs: list[RopeSpec] | None = None):
        if min(n_slots, n_layers, n_ctx, n_kv_heads, head_dim) <= 0:
            raise ValueError("KVCache dimensions must all be positive: "
                             f"n_slots={n_slots} n_layers={n_layers} n_ctx={n_ctx} "
                             f"n_kv_heads={n_kv_heads} head_dim={head_dim}")
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {sorted(KV_DTYPES)}, got {dtype!r}")
        if rope_specs is not None and len(rope_specs) != n_layers:
            raise ValueError(f"need one RopeSpec per layer ({n_layers}), got {len(rope_specs)}")
        value_dim = head_dim if value_dim is None else value_dim
        self.n_slots, self.n_layers, self.n_ctx = n_slots, n_layers, n_ctx
        self.n_kv_heads, self.head_dim, self.value_dim, self.dtype = n_kv_heads, head_dim, value_dim, dtype
        self.rope_specs = rope_specs
        # np.zeros maps pages lazily: memory is only touched as cells are written.
        np_dtype = KV_DTYPES[dtype]
        self.k = np.zeros((n_slots, n_layers, n_ctx, n_kv_heads, head_dim), np_dtype)
        self.v = np.zeros((n_slots, n_layers, n_ctx, n_kv_heads, value_dim), np_dtype)
        # What the attention kernel reads: f16 as raw bits (numba has no CPU float16).
        self.k_kernel = self.k.view(np.uint16) if dtype == "f16" else self.k
        self.v_kernel = self.v.view(np.uint16) if dtype == "f16" else self.v
        self._tokens = np.zeros((n_slots, n_ctx), np.int32)  # (n_slots, n_ctx) cached token ids
        self._count = np.zeros(n_slots, np.int64)  # (n_slots,) cells in use per slot

    # --- queries -----------------------------------------------------------------------------
    def _check_slot(self, slot_id: int) -> int:
        if not 0 <= int(slot_id) < self.n_slots:
            raise ValueError(f"slot_id {slot_id} out of range [0, {self.n_slots})")
        return int(slot_id)

    def num_cached(self, slot_id: int) -> int:
        return int(self._count[self._check_slot(slot_id)])

    def cached_tokens(self, slot_id: int) -> list[int]:
        slot = self._check_slot(slot_id)
        return self._tokens[slot, : self._count[slot]].tolist()

    def usage(self) -> tuple[int, int]:
        """(used_cells, total_cells) over all slots."""
        return int(self._count.sum()), self.n_slots * self.n_ctx

    # --- writes by the model -----------------------------------------------------------------
    def write_layer(self, layer: int, slot_ids: np.ndarray, positions: np.ndarray,
                    k: np.ndarray, v: np.ndarray) -> None:
        # k (n, n_kv_heads, head_dim), v (n, n_kv_heads, value_dim) f32 -> cells (slot, layer, pos)
        self.k[slot_ids, layer, positions] = k  # numpy rounds f32 -> f16 to nearest even, as ggml
        self.v[slot_ids, layer, positions] = v

    def commit(self, slot_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray) -> None:
        """Record that the batch's tokens now occupy their cells (after all layers are written)."""
        self._tokens[slot_ids, positions] = token_ids
        for slot in np.unique(slot_ids):
            self._count[slot] = max(self._count[slot], int(positions[slot_ids == slot].max()) + 1)

    # --- edits by the engine -----------------------------------------------------------------
    def truncate(self, slot_id: int, n_tokens: int) -> None:
        """Keep only the first n_tokens cached tokens of the slot."""
        slot = self._check_slot(slot_id)
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        self._count[slot] = min(int(self._count[slot]), int(n_tokens))

    def clear(self, slot_id: int) -> None:
        self.truncate(slot_id, 0)

    def copy_prefix(self, src_slot: int, dst_slot: int, n_tokens: int) -> None:
        """Make dst hold the first n_tokens of src (K, V and token ids); dst's rest is dropped."""
        src, dst = self._check_slot(src_slot), self._check_slot(dst_slot)
        if not 0 <= n_tokens <= self._count[src]:
            raise ValueError(f"cannot copy {n_tokens} tokens: slot {src} has {int(self._count[src])} cached")
        if src != dst:
            self.k[dst, :, :n_tokens] = self.k[src, :, :n_tokens]
            self.v[dst, :, :n_tokens] = self.v[src, :, :n_tokens]
            self._tokens[dst, :n_tokens] = self._tokens[src, :n_tokens]
        self._count[dst] = n_tokens

    def save_slot(self, slot_id: int, file) -> int:
        """Write the slot's cached tokens and their K/V cells to `file` (.npz); returns n_tokens."""
        slot = self._check_slot(slot_id)
        n = int(self._count[slot])
        np.savez(file, tokens=self._tokens[slot, :n], k=self.k[slot, :, :n], v=self.v[slot, :, :n])
        return n

    def restore_slot(self, slot_id: int, file) -> int:
        """Load a file written by `save_slot` into the slot (replacing its cache); returns n_tokens."""
        slot = self._check_slot(slot_id)
        try:
            with np.load(file, allow_pickle=False) as data:
                tokens, k, v = data["tokens"], data["k"], data["v"]
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:  # truncated, not ours
            raise ValueError(f"not a saved slot file: {exc}") from None
        n = tokens.shape[0] if tokens.ndim == 1 else -1
        want_k = (self.n_layers, n, self.n_kv_heads, self.head_dim)
        want_v = (self.n_layers, n, self.n_kv_heads, self.value_dim)
        if n < 0 or k.shape != want_k or v.shape != want_v or k.dtype != self.k.dtype or v.dtype != self.v.dtype:
            raise ValueError("the saved slot does not match this model's KV cache layout")
        if n > self.n_ctx:
            raise ValueError(f"the saved slot holds {n} tokens, more than the slot context {self.n_ctx}")
        self.k[slot, :, :n] = k
        self.v[slot, :, :n] = v
        self._tokens[slot, :n] = tokens
        self._count[slot] = n
        return n

    def shift(self, slot_id: int, n_keep: int, n_discard: int) -> None:
        """Context shift: drop cells [n_keep, n_keep + n_discard) and slide the rest down.

        Keys carry their position's rotation, so moved keys are rotated by -n_discard (rope
        rotations compose additively), as llama.cpp's K-shift does."""
        slot = self._check_slot(slot_id)
        n = int(self._count[slot])
        if n_keep < 0 or n_discard < 0 or n_keep + n_discard > n:
            raise ValueError(f"bad context shift: n_keep={n_keep} n_discard={n_discard} with {n} cached tokens")
        if n_discard == 0:
            return
        if self.rope_specs is None:
            raise ValueError("this cache has no rope specs, so its keys cannot be re-rotated")
        src = slice(n_keep + n_discard, n)
        dst = slice(n_keep, n - n_discard)
        n_moved = n - n_keep - n_discard
        deltas = np.full(n_moved, -n_discard, np.int32)
        for layer, spec in enumerate(self.rope_specs):
            keys = np.ascontiguousarray(self.k[slot, layer, src], dtype=np.float32)  # (n_moved, n_kv, hd)
            spec.apply(keys, deltas)
            self.k[slot, layer, dst] = keys
            self.v[slot, layer, dst] = self.v[slot, layer, src].copy()
        self._tokens[slot, dst] = self._tokens[slot, src].copy()
        self._count[slot] = n - n_discard
