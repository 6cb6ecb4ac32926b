"""Numba / numpy math kernels. Imports only numpy and numba; knows nothing of requests.

`jit_cache` is imported first so numba caches every kernel in a directory keyed by the kernels'
source (it reads the directory when a kernel is defined), then `threads`, so the OpenMP
threading layer and libgomp's spin policy are chosen before any kernel module (ops, attention,
matmul) can launch a parallel region.
"""
from kernels import jit_cache  # noqa: F401  (before any cache=True kernel is defined)
from kernels import threads  # noqa: F401
