"""Where numba keeps the compiled kernels: one directory per version of the kernels' source.

Why: numba's on-disk cache checks only the source file of the function it caches, yet a cached
kernel embeds every njit function and intrinsic it calls from other modules. After a change to
kernels/intdot.py alone, say, the cached parallel region of kernels/matmul.py would go on
running the old dot product (a `git pull` that touches some files is enough). Keying the cache
directory by a digest of every kernels/*.py makes any change to them start a fresh cache.

The base directory is NUMBA_CACHE_DIR when set (the Docker image and .ci/run set it), else the
package's kernels/__pycache__ when writable, else ~/.cache/ggserve/numba (as numba itself falls
back to a user-wide directory). This module must run before any kernel is decorated: numba
reads the directory when a `cache=True` function is defined: every kernel module imports it first.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

KERNELS_DIR = Path(__file__).resolve().parent


def source_digest(directory: Path = KERNELS_DIR) -> str:
    """16 hex digits of a SHA-256 over the names and bytes of directory/*.py, in name order."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def select_cache_dir() -> str:
    """Point numba's cache at <base>/ggserve-<source digest> (idempotent); returns the directory."""
    base = os.environ.get("NUMBA_CACHE_DIR")
    if not base:
        in_tree = KERNELS_DIR / "__pycache__"
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")  # never raises
        base = str(in_tree if _writable(in_tree) else Path(xdg) / "ggserve" / "numba")
    directory = os.path.join(base, "ggserve-" + source_digest())
    numba.config.CACHE_DIR = directory
    return directory


select_cache_dir()
