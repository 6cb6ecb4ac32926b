"""Memory read bandwidth of this machine, the ceiling of single-stream decode.

Owns `read_bandwidth_gbs()`: the median GB/s of summing a 1 GB array (30x the L3 cache) with
every numba thread, a STREAM-style read test (~35 GB/s on the 2-core development machine). Decode reads every streamed weight
once per step, so weight bytes per step / this bandwidth is the fastest a step can be.
`python -m ggserve.bench.bandwidth` prints it.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from numba import njit, prange

from ggserve.kernels import threads  # noqa: F401  (selects the OpenMP threading layer before the first parallel compile)


@njit(cache=True, parallel=True)
def _read_all(words):
    # words (n,) int64 -> their sum; the point is reading every byte once
    total = 0
    for i in prange(words.size):
        total += words[i]
    return total


def read_bandwidth_gbs(n_bytes: int = 1 << 30, runs: int = 5) -> float:
    words = np.ones(n_bytes // 8, np.int64)  # written once so every page is resident
    _read_all(words[:1024])  # compile / load outside the timing
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        _read_all(words)
        times.append(time.perf_counter() - t)
    return words.nbytes / statistics.median(times) / 1e9


if __name__ == "__main__":
    print(f"memory read bandwidth: {read_bandwidth_gbs():.1f} GB/s")
