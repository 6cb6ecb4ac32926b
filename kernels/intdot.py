"""Integer dot products of quantized weight blocks with 8-bit activations, as LLVM intrinsics.

Owns the vector helpers every integer dot is built from (this module's `_int8_quads`,
`_scaled_u8_quads`, loads and splats) and the Q8_0-activation intrinsics the matvec kernels
call on raw weight bytes and int8 activations (kernels/activations.py quantizes x):
`dot_row_q8_0`, `dot_rows_q8_0`, `dot_row_q5_0` (a whole row, scaled per block and
accumulated in f32 in exactly the shape of llama.cpp's AVX2 kernels, so the result is
llama.cpp's bit for bit) and `widen_q5_0_blocks`. The k-quant dots are in
kernels/intdot_kquant.py.

Why: a block's weight x activation products are then exact integers, equal in any summation
order, and on AVX2 a dot is `vpmaddubsw` + `vpmaddwd` (32 int8 products in 2 instructions), the
lanes landing exactly where ggml's do. LLVM does not find these by itself in numba code (it
emits widening multiplies), hence the explicit IR. Measured on a
Q8_0 (4864, 896) matvec on 2 cores: 36-42 GMAC/s for 4-8 x rows against 24-25 GMAC/s with the
f32 kernel; one x row stays memory-bound (~26 GB/s with prefetching). Without AVX2 the same IR
uses generic vector ops, which LLVM lowers for whatever the CPU has (same integers, and
llvm.fma rounds once everywhere, so the same bits).
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.lanes import fma_ir, lane_sum_ir

# Chosen once per process from the CPU numba compiles for; numba's cache is keyed by CPU too.
HAS_AVX2 = bool(llvm_binding.get_host_cpu_features().get("avx2", False))
I8, I16, I32, I64 = (ir.IntType(b) for b in (8, 16, 32, 64))
V32I8, V16I16 = ir.VectorType(I8, 32), ir.VectorType(I16, 16)


def _splat(builder, value, vector_type):
    # a vector with `value` (a scalar of the element type) in every lane
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), None))


def _load(builder, pointer, offset, vector_type, align):
    at = builder.gep(pointer, [offset]) if offset is not None else pointer
    return builder.load(builder.bitcast(at, vector_type.as_pointer()), align=align)


def _pointer(context, builder, array_type, array, offset):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [offset])


def _reduce_add(builder, vector):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32, [vector.type]),
                                        f"llvm.vector.reduce.add.v{vector.type.count}i32")
    return builder.call(fn, [vector])


def _as_i64(builder, value):
    # an integer argument (a count or index) widened to i64 for address arithmetic
    return builder.sext(value, I64) if value.type.width < 64 else value


def _f16_value(builder, lut, block, offset):
    # f32 value of the f16 at byte `offset` of `block` (a weight block's scale), through the
    # f16 table `lut` (kernels/quant.py f16_table)
    bits = builder.load(builder.bitcast(builder.gep(block, [ir.Constant(I64, offset)]), I16.as_pointer()), align=1)
    return builder.load(builder.gep(lut, [builder.zext(bits, I64)]))


def _bytes(builder, value):
    # <32 x i8> with the constant `value` in every lane
    return _splat(builder, ir.Constant(I8, value), V32I8)


def _avx2(builder, name, result, operands):
    # declaration of the AVX2 intrinsic `name` returning `result` from `operands` vector types
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, operands), f"llvm.x86.avx2.{name}")


def _portable_quads(builder, w32, x32):
    # <8 x i32> sums of 4 consecutive products of two <32 x i32>: the generic-IR fallback
    products = builder.mul(w32, x32)
    total = None
    for c in range(4):
        part = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, 8), list(range(c, 32, 4))))
        total = part if total is None else builder.add(total, part)
    return total


def _int8_quads(builder, w8, x8):
    # <8 x i32>: lane j = sum of w8[i] * x8[i] over i = 4j..4j+3 of two <32 x i8>, ggml's own
    # way on AVX2: vpsignb moves w's sign onto x, vpmaddubsw multiplies |w| by it in adjacent
    # pairs (|w| <= 128, |x| <= 127: no saturation), vpmaddwd by ones adds adjacent pairs. No
    # lane-crossing shuffles, which the int16 route needed.
    v32i32 = ir.VectorType(I32, 32)
    if not HAS_AVX2:
        return _portable_quads(builder, builder.sext(w8, v32i32), builder.sext(x8, v32i32))
    sign = _avx2(builder, "psign.b", V32I8, [V32I8, V32I8])
    pairs = builder.call(_avx2(builder, "pmadd.ub.sw", V16I16, [V32I8, V32I8]),
                         [builder.call(sign, [w8, w8]), builder.call(sign, [x8, w8])])
    return builder.call(_avx2(builder, "pmadd.wd", ir.VectorType(I32, 8), [V16I16, V16I16]),
                        [pairs, ir.Constant(V16I16, [1] * 16)])


def _scaled_u8_quads(builder, values, x8, scales16):
    # <8 x i32>: lane j = scales16[2j] * (sum of values[i] * x8[i] over i = 4j..4j+3), for
    # unsigned values (<= 63) and int8 activations x8 (<32 x i8> each; scales16 <16 x i16>, equal
    # in each lane pair). ggml's k-quant shape on AVX2: vpmaddubsw (|pair| <= 2*63*127, no
    # saturation), then vpmaddwd by the scales.
    v8i32, v32i32 = ir.VectorType(I32, 8), ir.VectorType(I32, 32)
    if not HAS_AVX2:
        quads = _portable_quads(builder, builder.zext(values, v32i32), builder.sext(x8, v32i32))
        lane_scales = builder.shuffle_vector(scales16, scales16, ir.Constant(v8i32, list(range(0, 16, 2))))
        return builder.mul(quads, builder.sext(lane_scales, v8i32))
    pairs = builder.call(_avx2(builder, "pmadd.ub.sw", V16I16, [V32I8, V32I8]), [values, x8])
    return builder.call(_avx2(builder, "pmadd.wd", v8i32, [V16I16, V16I16]), [pairs, scales16])


def _q5_0_values(builder, block, signed=True):
    # <32 x i8> the values of the Q5_0 block at `block` (f16 d, u32 qh, 16 bytes qs), as stored
    # (0..31; signed=False) or as weights (-16..15): value i has low 4 bits in qs[i % 16] (low
    # nibble for i < 16, high for i >= 16) and its fifth bit at bit i of qh
    qs = _load(builder, block, ir.Constant(I64, 6), ir.VectorType(I8, 16), 1)
    low = builder.and_(qs, ir.Constant(ir.VectorType(I8, 16), [15] * 16))
    high = builder.lshr(qs, ir.Constant(ir.VectorType(I8, 16), [4] * 16))
    nibbles = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    qh = _load(builder, block, ir.Constant(I64, 2), ir.VectorType(I8, 4), 1)
    spread = builder.shuffle_vector(qh, qh, ir.Constant(ir.VectorType(I32, 32), [i // 8 for i in range(32)]))
    bit = builder.and_(spread, ir.Constant(V32I8, [1 << (i % 8) for i in range(32)]))
    fifth = builder.select(builder.icmp_unsigned("!=", bit, ir.Constant(V32I8, [0] * 32)),
                           ir.Constant(V32I8, [16] * 32), ir.Constant(V32I8, [0] * 32))
    values = builder.or_(nibbles, fifth)
    return builder.sub(values, _bytes(builder, 16)) if signed else values


def _q8_0_rows_codegen(n_rows, q5_0=False):
    # codegen for dot_row_q8_0 / dot_row_q5_0 (n_rows=1) and dot_rows_q8_0 (n_rows=2; args[2]
    # is the byte stride of the second row): each row its own accumulator, in one loop over the
    # blocks; q5_0: the rows are Q5_0 blocks (22 bytes), their values unpacked unsigned in
    # registers and the offset taken off the lanes with x's quad sums (the last argument)
    block_bytes = 22 if q5_0 else 34

    def codegen(context, builder, signature, args):
        w_arg, w_offset = args[0], args[1]
        n_blocks, lut_arg, xq_arg, xd_arg, x_block = args[-6:-1] if q5_0 else args[-5:]
        array_types = signature.args[-6:-1] if q5_0 else signature.args[-5:]
        v8f32 = ir.VectorType(ir.FloatType(), 8)
        rows = [_pointer(context, builder, signature.args[0], w_arg, w_offset)]
        if n_rows == 2:
            rows.append(_pointer(context, builder, signature.args[0], w_arg, builder.add(w_offset, args[2])))
        lut = context.make_array(array_types[1])(context, builder, lut_arg).data
        x_row = _pointer(context, builder, array_types[2], xq_arg, builder.mul(x_block, ir.Constant(x_block.type, 32)))
        d_row = _pointer(context, builder, array_types[3], xd_arg, x_block)
        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in rows]
        if q5_0:
            offsets_row = _pointer(context, builder, signature.args[-1], args[-1],
                                   builder.mul(x_block, ir.Constant(x_block.type, 8)))
        with cgutils.for_range(builder, _as_i64(builder, n_blocks)) as loop:
            b = loop.index
            d_x = builder.load(builder.gep(d_row, [b]))
            x_values = _load(builder, builder.gep(x_row, [builder.mul(b, ir.Constant(I64, 32))]), None, V32I8, 1)
            for row, accumulator in zip(rows, accumulators):
                block = builder.gep(row, [builder.mul(b, ir.Constant(I64, block_bytes))])
                scale = builder.fmul(_f16_value(builder, lut, block, 0), d_x)
                if q5_0:  # sum (q - 16) x = sum q x - 16 sum x per quad: 2 instructions fewer than signs
                    offsets = _load(builder, builder.gep(offsets_row, [builder.mul(b, ir.Constant(I64, 8))]), None,
                                    ir.VectorType(I32, 8), 4)
                    quads = builder.sub(_scaled_u8_quads(builder, _q5_0_values(builder, block, signed=False), x_values,
                                                         ir.Constant(V16I16, [1] * 16)), offsets)
                else:
                    quads = _int8_quads(builder, _load(builder, block, ir.Constant(I64, 2), V32I8, 1), x_values)
                builder.store(fma_ir(builder, _splat(builder, scale, v8f32), builder.sitofp(quads, v8f32),
                                    builder.load(accumulator)), accumulator)
        sums = [lane_sum_ir(builder, builder.load(a)) for a in accumulators]
        return sums[0] if n_rows == 1 else context.make_tuple(builder, signature.return_type, sums)

    return codegen


@intrinsic
def dot_row_q8_0(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block):
    """f32 dot of one Q8_0 weight row (n_blocks blocks from byte w_offset of w) with one x row
    quantized to Q8_0 (int8 values xq[32 * x_block:], scales xd[x_block:]; kernels read the f16
    block scales of w through lut).

    The exact shape of ggml's AVX2 Q8_0 / Q5_0 dot (ggml_vec_dot_q8_0_q8_0 and llamafile's
    tinyBLAS_Q0_AVX, which agree): 8 f32 lanes, lane j taking the exact integer sum of elements
    4j..4j+3 of each block times d_w * d_x with one fused multiply-add per block, then
    lane_sum_ir. So each output equals llama.cpp's bit for bit, in every caller."""
    if not all(isinstance(a, types.Array) for a in (w, lut, xq, xd)):
        return None
    return types.float32(w, w_offset, n_blocks, lut, xq, xd, x_block), _q8_0_rows_codegen(1)


@intrinsic
def dot_rows_q8_0(typingctx, w, w_offset, row_stride, n_blocks, lut, xq, xd, x_block):
    """(dot_row_q8_0 of the row at w_offset, of the row at w_offset + row_stride), same bits, in
    one loop whose two fma chains overlap: for rows already in L1 (the Q5_0 kernel's widened
    scratch). Rows streamed from memory take dot_row_q8_0 one at a time: two interleaved
    streams measured ~10% slower there."""
    if not all(isinstance(a, types.Array) for a in (w, lut, xq, xd)):
        return None
    return (types.UniTuple(types.float32, 2)(w, w_offset, row_stride, n_blocks, lut, xq, xd, x_block),
            _q8_0_rows_codegen(2))


@intrinsic
def dot_row_q5_0(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block, x_offsets):
    """dot_row_q8_0 for one Q5_0 row, its 5-bit values unpacked in registers; x_offsets: int32
    (n, k/4), 16 times the sum of each 4 consecutive values of xq (kernels/activations.py
    quad_offsets), the -16 of the values applied per lane. The same integer lanes, so the same
    bits as dot_row_q8_0 on the widened row."""
    if not all(isinstance(a, types.Array) for a in (w, lut, xq, xd, x_offsets)):
        return None
    return (types.float32(w, w_offset, n_blocks, lut, xq, xd, x_block, x_offsets),
            _q8_0_rows_codegen(1, q5_0=True))


@intrinsic
def widen_q5_0_blocks(typingctx, w, w_offset, n_blocks, dst):
    """dst[:34 * n_blocks] (uint8) <- the n_blocks Q5_0 blocks at w[w_offset:] rewritten as Q8_0
    blocks (the same f16 d, the values as int8), unpacked with the vector code of dot_row_q5_0:
    a kernel dotting one weight row with several x rows unpacks it once into L1 this way."""
    if not (isinstance(w, types.Array) and isinstance(dst, types.Array)):
        return None

    def codegen(context, builder, signature, args):
        w_arg, w_offset, n_blocks, dst_arg = args
        src = _pointer(context, builder, signature.args[0], w_arg, w_offset)
        out = context.make_array(signature.args[3])(context, builder, dst_arg).data
        with cgutils.for_range(builder, _as_i64(builder, n_blocks)) as loop:
            block = builder.gep(src, [builder.mul(loop.index, ir.Constant(I64, 22))])
            target = builder.gep(out, [builder.mul(loop.index, ir.Constant(I64, 34))])
            d_bits = builder.load(builder.bitcast(block, I16.as_pointer()), align=1)
            builder.store(d_bits, builder.bitcast(target, I16.as_pointer()), align=1)
            values_ptr = builder.bitcast(builder.gep(target, [ir.Constant(I64, 2)]), V32I8.as_pointer())
            builder.store(_q5_0_values(builder, block), values_ptr, align=1)
        return context.get_dummy_value()

    return types.none(w, w_offset, n_blocks, dst), codegen
