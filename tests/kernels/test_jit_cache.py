"""Restarting the process must not change a single bit: a kernel freshly compiled by numba and
the same kernel loaded from numba's on-disk cache compute the same numbers.

(Measured: when prepare_qkv called rope as a separately compiled function, the cached build
rotated differently from the fresh one in the last bits, enough to move Gemma's logits by 0.4.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.testdata import REPO_ROOT as ROOT

SCRIPT = r"""
import sys
import numpy as np
from ggserve.kernels.attention import attention, store_kv
from ggserve.kernels.matmul import QuantMatrix, get_rows, matmul
from ggserve.kernels.ops import gelu_f16_table, gelu_mul, prepare_qkv, residual_rmsnorm, rope, silu_mul
from tests.kernels.test_quant import random_blocks

rng = np.random.default_rng(0)
n, heads, dim = 6, 4, 64
q, k, v = (rng.standard_normal((n, h, dim)).astype(np.float32) for h in (heads, 2, 2))
bias = rng.standard_normal(heads * dim).astype(np.float32)
norm = rng.standard_normal(dim).astype(np.float32)
pos = np.arange(n, dtype=np.int32)
factors = np.ones(dim // 2, np.float32)
prepare_qkv(q, k, v, bias, bias[:2 * dim], bias[:2 * dim], norm, norm, np.float32(1e-6), pos, dim,
            np.float32(0.9), np.float32(1.0), factors, True)
k2 = k.copy()
rope(k2, pos, dim, np.float32(0.9), np.float32(1.0), factors, False)
x = rng.standard_normal((n, 256)).astype(np.float32)
delta = rng.standard_normal((n, 256)).astype(np.float32)
xn = np.empty_like(x)
w256 = rng.standard_normal(256).astype(np.float32)
residual_rmsnorm(x, delta, w256, w256, np.float32(1e-6), xn)
k_cache = np.zeros((1, 1, 8, 2, dim), np.uint16)  # f16 bits, as the engine's default cache
v_cache = np.zeros((1, 1, 8, 2, dim), np.uint16)
slots = np.zeros(n, np.int32)
store_kv(k, v, k_cache, v_cache, 0, slots, pos)
attn = np.empty((n, heads, dim), np.float32)
attention(q, k_cache, v_cache, 0, slots, pos, np.float32(0.125), 0, attn)
gate, up = rng.standard_normal((2, n, 128)).astype(np.float32)
gate2 = gate.copy()
gelu_mul(gate, up, gelu_f16_table())
silu_mul(gate2, up)
outs = [q, k, v, k2, x, xn, attn, gate, gate2]
for ggml_type in (6, 8, 12, 14, 2):
    w = QuantMatrix(random_blocks(rng, ggml_type, 16 * 256), ggml_type, 16, 256)
    out = np.empty((n, 16), np.float32)
    matmul(xn, w, out)
    rows = np.empty((3, 256), np.float32)
    get_rows(w, np.array([0, 15, 7]), rows)
    outs += [out, rows]
np.save(sys.argv[1], np.concatenate([o.ravel() for o in outs]))
"""


def test_fresh_compile_and_cached_load_give_the_same_bits(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), PYTHONPATH=str(ROOT))
    results = []
    for run in ("fresh", "cached"):
        out = tmp_path / f"{run}.npy"
        subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, env=env, check=True, timeout=600)
        results.append(np.load(out))
    assert any((tmp_path / "numba-cache").rglob("*.nbi")), "the second run did not load from a cache"
    np.testing.assert_array_equal(results[0], results[1])


def test_any_kernel_source_change_moves_the_cache_directory(tmp_path):
    # numba validates a cached kernel against its own file only, while the kernel embeds code from
    # other modules: the cache directory is keyed by all kernels/*.py (kernels/jit_cache.py)
    import shutil

    import numba

    from ggserve.kernels.jit_cache import KERNELS_DIR, source_digest

    assert numba.config.CACHE_DIR.endswith("ggserve-" + source_digest())
    copy = tmp_path / "kernels"
    shutil.copytree(KERNELS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copy) == source_digest()
    intdot = copy / "intdot.py"
    intdot.write_text(intdot.read_text() + "\n# one more line\n")
    assert source_digest(copy) != source_digest()


def test_a_cache_dir_from_the_environment_is_the_base(tmp_path):
    code = "import numba, ggserve.kernels.matmul; print(numba.config.CACHE_DIR)"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    assert Path(out).parent == tmp_path and Path(out).name.startswith("ggserve-")
