"""Preallocated activation buffers of the forward pass, reused across steps.

Owns: one set of float32 C-contiguous buffers sized for the largest batch seen so far (grown by
doubling), so a decode step allocates nothing but its returned logits. `rows(n)` hands out the
first n rows of each buffer, which are still C-contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass
class Activations:
    x: np.ndarray  # (n, n_embd) residual stream
    xn: np.ndarray  # (n, n_embd) normed input of the attention / FFN block
    q: np.ndarray  # (n, n_heads * head_dim)
    k: np.ndarray  # (n, n_kv_heads * head_dim)
    v: np.ndarray  # (n, n_kv_heads * value_dim)
    attn: np.ndarray  # (n, n_heads * value_dim) attention output before wo
    delta: np.ndarray  # (n, n_embd) block output before the residual add
    gate: np.ndarray  # (n, n_ff) gate projection, then the activated product
    up: np.ndarray  # (n, n_ff)


class Scratch:
    def __init__(self, config: ModelConfig, capacity: int = 8):
        self.config = config
        self.capacity = 0
        self._full: Activations | None = None
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        c = self.config

        def buf(width: int) -> np.ndarray:
            return np.zeros((capacity, width), np.float32)

        self._full = Activations(
            x=buf(c.n_embd), xn=buf(c.n_embd), q=buf(c.q_dim), k=buf(c.kv_dim),
            v=buf(c.n_kv_heads * c.value_dim), attn=buf(c.n_heads * c.value_dim), delta=buf(c.n_embd),
            gate=buf(c.n_ff), up=buf(c.n_ff),
        )
        self.capacity = capacity

    def rows(self, n: int) -> Activations:
        """Views of the first n rows of every buffer (growing them first if needed)."""
        if n > self.capacity:
            self._grow(max(n, 2 * self.capacity))
        f = self._full
        return Activations(f.x[:n], f.xn[:n], f.q[:n], f.k[:n], f.v[:n], f.attn[:n], f.delta[:n],
                           f.gate[:n], f.up[:n])
