"""Numba / numpy math kernels. Imports only numpy and numba; knows nothing of requests.

`threads` is imported first so the OpenMP threading layer and libgomp's spin policy are chosen
before any kernel module (ops, attention, matmul) can launch a parallel region.
"""
from kernels import threads  # noqa: F401
