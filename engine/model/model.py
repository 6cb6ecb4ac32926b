"""The forward pass of the llama family (llama, qwen2, qwen3, gemma3) over a flat mixed batch.

Owns: `Model.forward`, which takes one batch mixing prompt chunks and decode tokens of several
slots, validates it, writes every token's K/V into its slot's cache, and returns logits (or
final-norm hidden states) only for the requested rows; and `load_model`.

One code path serves every architecture: the differences (biases, QK-norm, Gemma's post-norms,
embedding scale, GELU, sliding-window layers and their rope base) are fields of ModelConfig
or optional weights. Per layer the step is ~12 kernel calls over preallocated buffers.
"""
from __future__ import annotations

import numpy as np

from ggserve.engine.kv_cache import KVCache
from ggserve.kernels.attention import attention, store_kv
from ggserve.kernels.matmul import blas_rows_by_group, get_rows, matmul, matmul_multi, row_shapes_by_group, row_shapes_by_span
from ggserve.kernels.ops import gelu_f16_table, gelu_mul, prepare_qkv, residual_rmsnorm, rmsnorm, silu_mul, softcap

from .config import ModelConfig
from .scratch import Scratch
from .weights import EMPTY, ModelWeights, load_weights

OUTPUTS = ("logits", "embeddings")


class Model:
    def __init__(self, config: ModelConfig, weights: ModelWeights, kv_cache: KVCache):
        if kv_cache.n_layers != config.n_layers or kv_cache.n_kv_heads != config.n_kv_heads:
            raise ValueError("kv cache shape does not match the model config")
        self.config = config
        self.weights = weights
        self.kv_cache = kv_cache
        self.n_vocab = config.n_vocab
        self.n_embd = config.n_embd
        self._scratch = Scratch(config)
        # per layer: the rope kernel's trailing arguments, computed once
        self._rope_args = []
        for layer in range(config.n_layers):
            spec = config.rope_spec(layer)
            self._rope_args.append((spec.n_rot, spec.theta_scale, np.float32(spec.freq_scale), spec.factors(), spec.neox))
        self._eps = np.float32(config.rms_eps)
        scale = np.float32(config.attention_scale)
        # where the scale applies changes the bits once Q is rounded to f16 next to an f16 cache
        self._q_scale, self._kq_scale = (scale, np.float32(1.0)) if config.scale_query else (np.float32(1.0), scale)
        self._gelu_table = gelu_f16_table()

    # --- validation ----------------------------------------------------------------------------
    def _validate(self, token_ids, positions, slot_ids, logits_rows, output):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        arrays = [np.ascontiguousarray(a, dtype=np.int32).reshape(-1) for a in (token_ids, positions, slot_ids, logits_rows)]
        token_ids, positions, slot_ids, logits_rows = arrays
        n = token_ids.shape[0]
        if n == 0:
            raise ValueError("empty batch: token_ids has no tokens")
        if positions.shape[0] != n or slot_ids.shape[0] != n:
            raise ValueError(f"token_ids, positions and slot_ids must have the same length; got "
                             f"{n}, {positions.shape[0]}, {slot_ids.shape[0]}")
        if token_ids.min() < 0 or token_ids.max() >= self.n_vocab:
            bad = token_ids[(token_ids < 0) | (token_ids >= self.n_vocab)][0]
            raise ValueError(f"token id {bad} out of range [0, {self.n_vocab})")
        kv = self.kv_cache
        if slot_ids.min() < 0 or slot_ids.max() >= kv.n_slots:
            bad = slot_ids[(slot_ids < 0) | (slot_ids >= kv.n_slots)][0]
            raise ValueError(f"slot id {bad} out of range [0, {kv.n_slots})")
        if logits_rows.size and (logits_rows.min() < 0 or logits_rows.max() >= n):
            raise ValueError(f"logits_rows must index the batch [0, {n}), got {logits_rows.tolist()}")
        for slot in np.unique(slot_ids):
            slot_positions = positions[slot_ids == slot]
            start = kv.num_cached(int(slot))
            expected = np.arange(start, start + slot_positions.shape[0], dtype=np.int32)
            if not np.array_equal(slot_positions, expected):
                raise ValueError(f"slot {slot}: positions must be contiguous from its {start} cached tokens "
                                 f"({start}..{start + len(expected) - 1}), got {slot_positions.tolist()}")
            if expected[-1] >= kv.n_ctx:
                raise ValueError(f"slot {slot}: context exceeded: position {int(expected[-1])} >= n_ctx {kv.n_ctx}")
        return token_ids, positions, slot_ids, logits_rows

    # --- forward -------------------------------------------------------------------------------
    def forward(self, token_ids, positions, slot_ids, logits_rows, output: str = "logits",
                batch_spans=None) -> np.ndarray:
        """Run one flat batch; returns (r, n_vocab) logits or (r, n_embd) hidden states.

        batch_spans (n, 2) int: for each row, the positions [first, last] of the batch llama.cpp
        would have computed it in; the row is summed in that batch's shapes (kernels/matmul.py
        row_shapes_by_span), so its bits do not depend on how the sequence was chunked (the
        engine passes a prompt's whole span: a prompt-cache hit then reproduces them). Default:
        each slot's rows as the batch of its sequence so far, positions 0..its last row, which is
        llama.cpp's own batch for a prompt fed at once."""
        token_ids, positions, slot_ids, logits_rows = self._validate(token_ids, positions, slot_ids, logits_rows, output)
        shapes = _row_shapes(slot_ids, positions, batch_spans)  # (n,) int8, kernels/matmul_krows.py
        c, w = self.config, self.weights
        n, r = token_ids.shape[0], logits_rows.shape[0]
        act = self._scratch.rows(n)
        get_rows(w.token_embd, token_ids, act.x)  # (n,) ids -> x (n, n_embd)
        if c.embed_scale != 1.0:
            act.x *= np.float32(c.embed_scale)
        rmsnorm(act.x, w.layers[0].attn_norm, self._eps, act.xn)
        paths = (blas_rows_by_group(slot_ids), shapes)
        for layer in range(c.n_layers):
            last = layer == c.n_layers - 1
            # the last layer only needs the requested rows after attention (as llama.cpp does)
            act = self._layer(layer, act, positions, slot_ids, paths, logits_rows if last else None)
        self.kv_cache.commit(slot_ids, positions, token_ids)
        hidden = act.x.copy()  # (r, n_embd)
        rmsnorm(hidden, w.output_norm, self._eps, hidden)
        if output == "embeddings":
            return hidden
        logits = np.empty((r, self.n_vocab), np.float32)
        if r:  # (r, n_embd) @ (n_vocab, n_embd)^T
            matmul(hidden, w.output, logits, blas_rows_by_group(slot_ids[logits_rows]), shapes[logits_rows])
        if c.final_logit_softcap > 0:
            softcap(logits, np.float32(c.final_logit_softcap))
        return logits

    def _layer(self, layer, act, positions, slot_ids, paths, out_rows):
        # act.xn holds rmsnorm(x) * attn_norm on entry; returns the activations for the next layer
        # with act.xn = the next layer's normed input.
        c, lw, kv = self.config, self.weights.layers[layer], self.kv_cache
        n = act.x.shape[0]
        matmul_multi(act.xn, [lw.wq, lw.wk, lw.wv], [act.q, act.k, act.v], *paths)
        q = act.q.reshape(n, c.n_heads, c.head_dim)
        k = act.k.reshape(n, c.n_kv_heads, c.head_dim)
        v = act.v.reshape(n, c.n_kv_heads, c.value_dim)
        prepare_qkv(q, k, v, lw.bq, lw.bk, lw.bv, lw.q_norm, lw.k_norm, self._eps, positions, *self._rope_args[layer])
        if self._q_scale != 1.0:
            q *= self._q_scale
        store_kv(k, v, kv.k_kernel, kv.v_kernel, layer, slot_ids, positions)  # f32 -> cache cells
        if out_rows is not None:
            # Only the rows that produce output matter past this point (as llama.cpp does on its
            # last layer); fancy indexing copies before the buffers' first rows are overwritten.
            n = out_rows.shape[0]
            q_rows, x_rows = q[out_rows], act.x[out_rows]
            positions, slot_ids = positions[out_rows], slot_ids[out_rows]
            paths = (blas_rows_by_group(slot_ids), paths[1][out_rows])
            act = self._scratch.rows(n)
            if n == 0:
                return act
            act.x[:] = x_rows
            q = act.q.reshape(n, c.n_heads, c.head_dim)
            q[:] = q_rows
        attn = act.attn.reshape(n, c.n_heads, c.value_dim)
        attention(q, kv.k_kernel, kv.v_kernel, layer, slot_ids, positions, self._kq_scale, c.window(layer), attn)
        matmul(act.attn, lw.wo, act.delta, *paths)
        residual_rmsnorm(act.x, act.delta, lw.post_attn_norm, lw.ffn_norm, self._eps, act.xn)
        matmul_multi(act.xn, [lw.w_gate, lw.w_up], [act.gate, act.up], *paths)
        if c.activation == "gelu":
            gelu_mul(act.gate, act.up, self._gelu_table)
        else:
            silu_mul(act.gate, act.up)
        matmul(act.gate, lw.w_down, act.delta, *paths)
        next_norm = self.weights.layers[layer + 1].attn_norm if layer + 1 < c.n_layers else EMPTY
        residual_rmsnorm(act.x, act.delta, lw.post_ffn_norm, next_norm, self._eps, act.xn)
        return act


def _row_shapes(slot_ids: np.ndarray, positions: np.ndarray, batch_spans) -> np.ndarray:
    # the summation shape of each row (Model.forward's batch_spans), validated
    if batch_spans is None:
        return row_shapes_by_group(slot_ids, positions)
    spans = np.asarray(batch_spans, np.int64)
    if spans.shape != (positions.size, 2) or np.any(spans[:, 0] > positions) or np.any(positions > spans[:, 1]):
        raise ValueError(f"batch_spans must be ({positions.size}, 2) [first, last] around each row's position")
    return row_shapes_by_span(positions, spans)


def load_model(g, n_slots: int, n_ctx: int, kv_dtype: str = "f16", repack: bool = True) -> Model:
    """Build a Model from GGUFFile `g` with a KV cache of n_slots slots of n_ctx tokens each.
    repack=False keeps every weight in the memory-mapped file (llama.cpp's --no-repack)."""
    if n_slots <= 0 or n_ctx <= 0:
        raise ValueError(f"n_slots and n_ctx must be > 0, got n_slots={n_slots} n_ctx={n_ctx}")
    config = ModelConfig.from_gguf(g)
    weights = load_weights(g, config, repack)
    kv_cache = KVCache(n_slots, config.n_layers, n_ctx, config.n_kv_heads, config.head_dim,
                       value_dim=config.value_dim, dtype=kv_dtype,
                       rope_specs=[config.rope_spec(layer) for layer in range(config.n_layers)])
    return Model(config, weights, kv_cache)
