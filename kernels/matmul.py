"""TEMPORARY STUB (lead): replaced by the kernels helper. Same public API as the real module."""
from __future__ import annotations

import numpy as np


class QuantMatrix:
    """A weight matrix W (m, k) stored in a GGML type as raw row-major block bytes."""

    def __init__(self, data: np.ndarray, ggml_type: int, m: int, k: int):
        self.data, self.ggml_type, self.m, self.k = data, int(ggml_type), int(m), int(k)

    def _f32(self) -> np.ndarray:
        from gguf.quants import dequantize  # stub only: the oracle, never the hot path
        from gguf.constants import GGMLQuantizationType

        return dequantize(self.data.reshape(self.m, -1), GGMLQuantizationType(self.ggml_type)).reshape(self.m, self.k)


def matmul(x: np.ndarray, w: QuantMatrix, out: np.ndarray) -> None:
    # x (n, k) @ W (m, k)^T -> out (n, m)
    out[:] = x @ w._f32().T


def matmul_multi(x: np.ndarray, ws: list, outs: list) -> None:
    for w, o in zip(ws, outs):
        matmul(x, w, o)


def get_rows(w: QuantMatrix, ids: np.ndarray, out: np.ndarray) -> None:
    # W (m, k)[ids (n,)] -> out (n, k)
    out[:] = w._f32()[ids]
