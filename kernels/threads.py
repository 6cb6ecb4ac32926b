"""Numba threading setup for the kernels: the OpenMP layer and its spin policy, chosen before
any parallel launch.

Why OpenMP: launching a `parallel=True` region costs ~2-5 us with OpenMP but ~200-340 us with
numba's default workqueue layer, and a decode step launches ~170 of them (PERFORMANCE.md).
Why a short spin: libgomp's default lets idle workers spin ~300k iterations (milliseconds)
before sleeping. When anything else wants the 2 cores (OpenBLAS threads after a prefill sgemm,
the HTTP thread, other processes), a spinning worker eats the time slice the other worker
needs, and every region end waits a scheduler quantum: measured on a loaded machine, a Qwen
decode step's matmuls took 1190 ms with the default spin and 270 ms with GOMP_SPINCOUNT=10000
(or OMP_WAIT_POLICY=passive). 10k spins still covers the microseconds between back-to-back
regions of one step, so an idle machine keeps the cheap launches.

numba fixes the layer at its first parallel launch and libgomp reads its environment when it
is loaded (also at that launch), so this module must be imported before one happens: it is
imported by every kernel module before its first kernel. Explicit settings in the
environment always win; without the OpenMP runtime the layer falls back to 'workqueue'.
"""
from __future__ import annotations

import os

import numba

DEFAULT_GOMP_SPINCOUNT = "10000"


def omp_available() -> bool:
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (import succeeds iff libgomp loads)
    except ImportError:
        return False
    return True


def select_threading_layer() -> str:
    """Set numba's threading layer and libgomp's spin count (idempotent); returns the layer."""
    # first: loading numba's OpenMP pool (omp_available) initialises libgomp, which reads this
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = DEFAULT_GOMP_SPINCOUNT
    requested = os.environ.get("NUMBA_THREADING_LAYER")
    layer = requested or ("omp" if omp_available() else "workqueue")
    if not requested:
        numba.config.THREADING_LAYER = layer
    return layer


select_threading_layer()
