"""Numba / numpy math kernels. Imports only numpy and numba; knows nothing of requests."""
