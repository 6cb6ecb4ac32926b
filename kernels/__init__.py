"""Numba / numpy math kernels. Imports only numpy and numba; knows nothing of requests.

Importing this package loads nothing: `ggml_types` (the ggml type table) is plain Python, so
the GGUF reader can use it without numba. Every module that defines a kernel imports
`jit_cache` (numba caches kernels in a directory keyed by the kernels' source; it reads the
directory when a kernel is defined) and `threads` (the OpenMP threading layer and libgomp's
spin policy, chosen before any parallel region can launch) before its first kernel.
"""
