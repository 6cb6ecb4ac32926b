"""Software prefetch for the matvec kernels: `prefetch(a, i)` hints the CPU to pull the cache
line holding byte i of the uint8 array `a` into L1 (x86 `prefetcht0`; a no-op elsewhere), and
`prefetch_ahead` keeps a fixed distance ahead of a kernel's progress through its rows.

Why: a decode step streams every weight row once. When rows are short (k = 640 or 896 in the
real models) a 4-row kernel walks four short streams at once and the hardware prefetcher never
gets ahead of them; measured, a Q8_0 (32768, 640) matvec reached 5.4 GB/s on one core from DRAM
against 9.5 GB/s for long rows. A prefetch never faults, so addresses past the end are harmless.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)

# How far ahead of a kernel's progress to prefetch: one 4 KB page, measured best of 1-8 KB on a
# Q8_0 matvec (24 GB/s at 4 KB vs 10 GB/s without prefetching, k = 640).
PREFETCH_DISTANCE = 4096


@intrinsic
def prefetch(typingctx, arr, index):
    """prefetch(a: uint8[:], i: integer) -> None: read hint, keep in all cache levels."""
    if not (isinstance(arr, types.Array) and isinstance(index, types.Integer)):
        return None
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = builder.gep(array.data, [args[1]])
        i8_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [i8_ptr, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        # (address, rw = read, locality = 3 keep in all levels, cache type = data)
        builder.call(fn, [builder.bitcast(pointer, i8_ptr), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def prefetch_ahead(u8, progress, n_lines):
    """Prefetch n_lines cache lines from byte progress + PREFETCH_DISTANCE of u8.

    A row group of g rows is contiguous, and by block b a kernel has consumed ~g * b blocks'
    bytes of it: with `progress` = group start + that, the lines PREFETCH_DISTANCE ahead cover
    the next group's bytes just before they are needed."""
    for t in range(n_lines):
        prefetch(u8, np.uint64(progress + PREFETCH_DISTANCE + 64 * t))
