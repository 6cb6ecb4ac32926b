"""Per-layer weight objects built from a GGUF file's tensors, checked against the config.

Owns: naming (llama.cpp's tensor names), shape validation (a clear ValueError naming the tensor,
expected and found shapes), and turning tensors into what the kernels take: 2-D weights stay
quantized as `QuantMatrix` views of the memory-mapped file (no copy), except that with repacking
on (the default) Q4_0 matrices streamed every step are widened to Q8_0 once, in memory (see
kernels/repack.py); 1-D norms and biases are
small and become float32 arrays. A missing `output.weight` means the output is tied to
`token_embd.weight`, as llama.cpp does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ggserve.engine.model.gguf import GGMLType
from ggserve.kernels.matmul import QuantMatrix
from ggserve.kernels.repack import WIDENED_TYPES, widen_to_q8_0

from .config import ModelConfig

EMPTY = np.zeros(0, np.float32)  # "no such norm" for kernels that take an optional weight


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (n_embd,)
    wq: QuantMatrix  # (n_heads * head_dim, n_embd)
    wk: QuantMatrix  # (n_kv_heads * head_dim, n_embd)
    wv: QuantMatrix  # (n_kv_heads * value_dim, n_embd)
    wo: QuantMatrix  # (n_embd, n_heads * value_dim)
    ffn_norm: np.ndarray  # (n_embd,)
    w_gate: QuantMatrix  # (n_ff, n_embd)
    w_up: QuantMatrix  # (n_ff, n_embd)
    w_down: QuantMatrix  # (n_embd, n_ff)
    # optional vectors are (0,) when the model has none, so kernels take them unconditionally
    bq: np.ndarray = field(default_factory=lambda: EMPTY)  # (n_heads * head_dim,)
    bk: np.ndarray = field(default_factory=lambda: EMPTY)  # (n_kv_heads * head_dim,)
    bv: np.ndarray = field(default_factory=lambda: EMPTY)  # (n_kv_heads * value_dim,)
    q_norm: np.ndarray = field(default_factory=lambda: EMPTY)  # (head_dim,)
    k_norm: np.ndarray = field(default_factory=lambda: EMPTY)  # (head_dim,)
    post_attn_norm: np.ndarray = field(default_factory=lambda: EMPTY)  # (n_embd,) or (0,): none
    post_ffn_norm: np.ndarray = field(default_factory=lambda: EMPTY)  # (n_embd,) or (0,): none


@dataclass
class ModelWeights:
    token_embd: QuantMatrix  # (n_vocab, n_embd)
    output_norm: np.ndarray  # (n_embd,)
    output: QuantMatrix  # (n_vocab, n_embd); token_embd itself when tied
    layers: list[LayerWeights]

    @property
    def tied_output(self) -> bool:
        return self.output is self.token_embd

    def nbytes(self) -> int:
        """Bytes of quantized matrices read by one decode step (the embedding is only gathered)."""
        total = self.output.data.nbytes
        for lw in self.layers:
            total += sum(w.data.nbytes for w in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down))
        return total


class _TensorReader:
    def __init__(self, g, repack: bool):
        self.g = g
        self.repack = repack

    def info(self, name: str, shape: tuple[int, ...]):
        # shape in numpy order (rows, cols) / (n,)
        info = self.g.tensors.get(name)
        if info is None:
            raise ValueError(f"GGUF file is missing tensor '{name}'")
        if tuple(info.shape) != tuple(shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(info.shape)}, expected {tuple(shape)}")
        return info

    def matrix(self, name: str, m: int, k: int, streamed: bool = True) -> QuantMatrix:
        """W (m, k) as a view of the file; a Q4_0 matrix that every decode step streams is
        widened to Q8_0 in memory when repacking is on (kernels/repack.py says why) and its file
        pages are released so the weights are resident once."""
        info = self.info(name, (m, k))
        if self.repack and streamed and int(info.ggml_type) in WIDENED_TYPES:
            matrix = QuantMatrix(widen_to_q8_0(info.data, int(info.ggml_type)), GGMLType.Q8_0, m, k)
            self.g.release_pages(info)
            return matrix
        return QuantMatrix(info.data, int(info.ggml_type), m, k)

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self.info(name, (n,))
        kind = GGMLType(int(info.ggml_type))
        raw = np.asarray(info.data)
        if kind == GGMLType.F32:
            return np.frombuffer(raw.tobytes(), np.float32).copy()
        if kind == GGMLType.F16:
            return np.frombuffer(raw.tobytes(), np.float16).astype(np.float32)
        if kind == GGMLType.BF16:
            bits = np.frombuffer(raw.tobytes(), np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).copy()
        raise ValueError(f"tensor '{name}' has type {kind.name}; 1-D tensors must be F32, F16 or BF16")

    def optional_vector(self, name: str, n: int) -> np.ndarray:
        return self.vector(name, n) if name in self.g.tensors else EMPTY


def load_weights(g, config: ModelConfig, repack: bool = True) -> ModelWeights:
    """Build the weights of every layer of `config` from GGUFFile `g` (repack: see matrix())."""
    t = _TensorReader(g, repack)
    c = config
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        lw = LayerWeights(
            attn_norm=t.vector(p + "attn_norm.weight", c.n_embd),
            wq=t.matrix(p + "attn_q.weight", c.q_dim, c.n_embd),
            wk=t.matrix(p + "attn_k.weight", c.kv_dim, c.n_embd),
            wv=t.matrix(p + "attn_v.weight", c.n_kv_heads * c.value_dim, c.n_embd),
            wo=t.matrix(p + "attn_output.weight", c.n_embd, c.n_heads * c.value_dim),
            ffn_norm=t.vector(p + "ffn_norm.weight", c.n_embd),
            w_gate=t.matrix(p + "ffn_gate.weight", c.n_ff, c.n_embd),
            w_up=t.matrix(p + "ffn_up.weight", c.n_ff, c.n_embd),
            w_down=t.matrix(p + "ffn_down.weight", c.n_embd, c.n_ff),
        )
        # Biases are required for qwen2 and optional elsewhere (llama.cpp loads them if present).
        bias = t.vector if c.qkv_bias else t.optional_vector
        lw.bq = bias(p + "attn_q.bias", c.q_dim)
        lw.bk = bias(p + "attn_k.bias", c.kv_dim)
        lw.bv = bias(p + "attn_v.bias", c.n_kv_heads * c.value_dim)
        if c.qk_norm:
            lw.q_norm = t.vector(p + "attn_q_norm.weight", c.head_dim)
            lw.k_norm = t.vector(p + "attn_k_norm.weight", c.head_dim)
        if c.post_norms:
            lw.post_attn_norm = t.vector(p + "post_attention_norm.weight", c.n_embd)
            lw.post_ffn_norm = t.vector(p + "post_ffw_norm.weight", c.n_embd)
        layers.append(lw)

    tied = "output.weight" not in g.tensors
    # an untied embedding table is only gathered (a few rows per step): it stays in the file
    token_embd = t.matrix("token_embd.weight", c.n_vocab, c.n_embd, streamed=tied)
    output = token_embd if tied else t.matrix("output.weight", c.n_vocab, c.n_embd)
    return ModelWeights(token_embd=token_embd, output_norm=t.vector("output_norm.weight", c.n_embd),
                        output=output, layers=layers)
