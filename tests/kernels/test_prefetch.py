"""The prefetch hint compiles into numba kernels and never faults, even far past an array's end
(the matvec kernels prefetch a fixed distance ahead of the last row group)."""
from __future__ import annotations

import numpy as np
from numba import njit

from ggserve.kernels.prefetch import prefetch


@njit(cache=False)
def _sum_with_prefetch(a, distance):
    total = 0
    for i in range(a.size):
        prefetch(a, np.uint64(i + distance))
        total += a[i]
    return total


def test_prefetch_past_the_end_is_harmless_and_changes_nothing():
    a = np.arange(1000, dtype=np.uint8)
    for distance in (0, 64, 4096, 1 << 30):
        assert _sum_with_prefetch(a, distance) == int(a.astype(np.int64).sum())
