"""8-lane f32 accumulation in the shape of ggml's AVX2 code: `fma`, `lane_dot` and `lane_sum`
(numba), and `fma_ir`, `lane_sum_ir` (LLVM IR, for kernels/intdot.py).

llama.cpp's x86 kernels keep a dot product in 8 f32 lanes, add each term with one fused
multiply-add (a*b + c rounded once) and end with a fixed horizontal sum. Reproducing that
shape, not just the mathematical sum, is what makes ggserve's logits equal llama.cpp's to the
last bit on models whose activations amplify last-bit differences (Gemma 3; see
bench/fidelity.py). These helpers give numba code that shape; kernels/intdot.py builds the
same in LLVM IR for the integer dots.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)


def fma_ir(builder, a, b, c):
    """a * b + c rounded once, for f32 scalars or <8 x float> vectors alike (llvm.fma)."""
    kind = "v8f32" if isinstance(a.type, ir.VectorType) else "f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), f"llvm.fma.{kind}")
    return builder.call(fn, [a, b, c])


@intrinsic
def fma(typingctx, a, b, c):
    """f32 a * b + c rounded once (llvm.fma: one vfmadd on CPUs with FMA, exact in software
    elsewhere). LLVM vectorizes loops of it like any other float op."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return fma_ir(builder, *args)

    return types.float32(a, b, c), codegen


@intrinsic
def lane_dot(typingctx, a, b, n_steps):
    """f32 dot of a[:8 * n_steps] and b[:8 * n_steps] (C-contiguous f32 arrays) as llamafile's
    tinyBLAS sums it on AVX2: lane u takes elements u, u + 8, ... with one fused multiply-add
    each (one 8-wide vfmadd per step), then lane_sum_ir."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array)
            and a.dtype == types.float32 and b.dtype == types.float32):
        return None

    def codegen(context, builder, signature, args):
        v8f32 = ir.VectorType(ir.FloatType(), 8)
        pointers = [builder.bitcast(context.make_array(t)(context, builder, v).data, v8f32.as_pointer())
                    for t, v in zip(signature.args[:2], args[:2])]
        steps = args[2]
        steps = builder.sext(steps, ir.IntType(64)) if steps.type.width < 64 else steps
        accumulator = cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8))
        with cgutils.for_range(builder, steps) as loop:
            x, y = (builder.load(builder.gep(p, [loop.index]), align=4) for p in pointers)
            builder.store(fma_ir(builder, x, y, builder.load(accumulator)), accumulator)
        return lane_sum_ir(builder, builder.load(accumulator))

    return types.float32(a, b, n_steps), codegen


def lane_sum_ir(builder, vector):
    """f32 sum of an <8 x float> in ggml's hsum_float_8 order:
    ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    lane = [builder.extract_element(vector, ir.Constant(ir.IntType(32), i)) for i in range(8)]
    half = [builder.fadd(lane[i], lane[i + 4]) for i in range(4)]
    return builder.fadd(builder.fadd(half[0], half[2]), builder.fadd(half[1], half[3]))


@njit(cache=True, inline="always")
def lane_sum8(l0, l1, l2, l3, l4, l5, l6, l7):
    """f32 sum of 8 lanes in ggml's hsum_float_8 order (see lane_sum_ir)."""
    return ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))


@njit(cache=True, inline="always")
def lane_sum(lanes, o):
    """lane_sum8 of lanes[o:o + 8]."""
    return lane_sum8(lanes[o], lanes[o + 1], lanes[o + 2], lanes[o + 3],
                     lanes[o + 4], lanes[o + 5], lanes[o + 6], lanes[o + 7])
