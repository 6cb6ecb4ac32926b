"""Integer dot products of quantized weight blocks with 8-bit activations, as LLVM intrinsics.

Owns the numba intrinsics the matvec kernels call on raw weight bytes and int16 activations
(kernels/activations.py quantizes x): `dot_row_q8_0` (a whole Q8_0 row, scaled per block,
accumulated in 8-lane f32 vectors), and `q4_k_block_isum`, `q5_k_block_isum`, `q6_k_block_isum`
(a whole k-quant super-block, its sub-block scales applied in the vector).

Why: a block's weight x activation products are then exact integers, equal in any summation
order, so every kernel variant gives a row the same bits (batch invariance); and on AVX2 a
dot is `vpmaddwd`, 16 multiply-adds per instruction. LLVM does not find `vpmaddwd` by itself
in numba code (it emits `vpmulld`), hence the explicit IR. Measured on a Q8_0 (4864, 896)
matvec on 2 cores: 36-42 GMAC/s for 4-8 x rows against 24-25 GMAC/s with the f32 kernel; one x
row stays memory-bound (~26 GB/s with prefetching). Without AVX2 the same IR uses generic
vector ops, which LLVM lowers for whatever the CPU has.
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Chosen once per process from the CPU numba compiles for; numba's cache is keyed by CPU too.
HAS_AVX2 = bool(llvm_binding.get_host_cpu_features().get("avx2", False))
I8, I16, I32, I64 = (ir.IntType(b) for b in (8, 16, 32, 64))
V32I8, V16I16, V32I16 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I16, 32)


def _splat(builder, value, vector_type):
    # a vector with `value` (a scalar of the element type) in every lane
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), None))


def _half(builder, vector, which):
    # lanes [16 * which, 16 * which + 16) of a 32-lane vector
    mask = ir.Constant(ir.VectorType(ir.IntType(32), 16), [16 * which + i for i in range(16)])
    return builder.shuffle_vector(vector, vector, mask)


def _load(builder, pointer, offset, vector_type, align):
    at = builder.gep(pointer, [offset]) if offset is not None else pointer
    return builder.load(builder.bitcast(at, vector_type.as_pointer()), align=align)


def _pointer(context, builder, array_type, array, offset):
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [offset])


def _x_halves(builder, x_ptr):
    # the 32 int16 activations at x_ptr as two <16 x i16>
    return (_load(builder, x_ptr, None, V16I16, 2),
            _load(builder, x_ptr, ir.Constant(I64, 16), V16I16, 2))


def _madd16(builder, a16, x16):
    # <8 x i32> pairwise products a[2i]*x[2i] + a[2i+1]*x[2i+1] of two <16 x i16>
    if HAS_AVX2:
        v8i32 = ir.VectorType(I32, 8)
        madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [V16I16, V16I16]),
                                              "llvm.x86.avx2.pmadd.wd")
        return builder.call(madd, [a16, x16])
    v16i32 = ir.VectorType(I32, 16)
    products = builder.mul(builder.sext(a16, v16i32), builder.sext(x16, v16i32))
    even = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, 8), list(range(0, 16, 2))))
    odd = builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(I32, 8), list(range(1, 16, 2))))
    return builder.add(even, odd)


def _madd32(builder, values, x_ptr):
    # <8 x i32>: vpmaddwd of 32 int16 values (a <32 x i16>) with the 32 activations at x_ptr,
    # the two halves' pairs added lane-wise
    x_lo, x_hi = _x_halves(builder, x_ptr)
    return builder.add(_madd16(builder, _half(builder, values, 0), x_lo),
                       _madd16(builder, _half(builder, values, 1), x_hi))


def _scaled_madd32(builder, values, x_ptr, scale_first, scale_second):
    # <8 x i32>: vpmaddwd of 32 int16 values (a <32 x i16>) with the 32 activations at x_ptr, the
    # lanes of the first 16 values times scale_first and of the last 16 times scale_second
    x_lo, x_hi = _x_halves(builder, x_ptr)
    v8i32 = ir.VectorType(I32, 8)
    first = builder.mul(_madd16(builder, _half(builder, values, 0), x_lo), _splat(builder, scale_first, v8i32))
    second = builder.mul(_madd16(builder, _half(builder, values, 1), x_hi), _splat(builder, scale_second, v8i32))
    return builder.add(first, second)


def _reduce_add(builder, vector):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32, [vector.type]),
                                        f"llvm.vector.reduce.add.v{vector.type.count}i32")
    return builder.call(fn, [vector])


def _bytes(builder, value):
    # <32 x i8> with the constant `value` in every lane
    return _splat(builder, ir.Constant(I8, value), V32I8)


@intrinsic
def dot_row_q8_0(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block):
    """f32 dot of one Q8_0 weight row (n_blocks blocks from byte w_offset of w) with one x row
    quantized to Q8_0 (values xq[32 * x_block:], scales xd[x_block:]; kernels read the f16
    block scales of w through lut).

    Each block's 32 products are an exact vpmaddwd sum (8 lanes of pairs); they are scaled by
    d_w * d_x and added into one of two 8-lane f32 accumulators (even / odd blocks; a last odd
    block goes to the first), summed lane by lane in a fixed order at the end. Keeping the
    running sums in vectors is what makes this fast: a horizontal sum per block costs more than
    the block's multiply-adds. Fixed order, no fastmath: the same inputs give the same bits in
    every caller."""
    if not all(isinstance(a, types.Array) for a in (w, lut, xq, xd)):
        return None
    sig = types.float32(w, w_offset, n_blocks, lut, xq, xd, x_block)

    def codegen(context, builder, signature, args):
        w_arg, w_offset, n_blocks, lut_arg, xq_arg, xd_arg, x_block = args
        v8f32 = ir.VectorType(ir.FloatType(), 8)
        w_row = _pointer(context, builder, signature.args[0], w_arg, w_offset)
        lut = context.make_array(signature.args[3])(context, builder, lut_arg).data
        x_row = _pointer(context, builder, signature.args[4], xq_arg, builder.mul(x_block, ir.Constant(x_block.type, 32)))
        d_row = _pointer(context, builder, signature.args[5], xd_arg, x_block)
        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(v8f32, [0.0] * 8)) for _ in range(2)]
        n_blocks = builder.sext(n_blocks, I64) if n_blocks.type.width < 64 else n_blocks

        def add_block(b, accumulator):
            # accumulator += d_w * d_x * (8 lanes of pairwise products of block b)
            block = builder.gep(w_row, [builder.mul(b, ir.Constant(I64, 34))])
            d_bits = builder.load(builder.bitcast(block, I16.as_pointer()), align=1)
            d_w = builder.load(builder.gep(lut, [builder.zext(d_bits, I64)]))
            scale = builder.fmul(d_w, builder.load(builder.gep(d_row, [b])))
            weights = builder.sext(_load(builder, block, ir.Constant(I64, 2), V32I8, 1), V32I16)
            pairs = _madd32(builder, weights, builder.gep(x_row, [builder.mul(b, ir.Constant(I64, 32))]))
            term = builder.fmul(builder.sitofp(pairs, v8f32), _splat(builder, scale, v8f32))
            builder.store(builder.fadd(builder.load(accumulator), term), accumulator)

        # even blocks into one accumulator and odd ones into the other: two independent add chains
        with cgutils.for_range(builder, builder.udiv(n_blocks, ir.Constant(I64, 2))) as loop:
            first = builder.mul(loop.index, ir.Constant(I64, 2))
            add_block(first, accumulators[0])
            add_block(builder.add(first, ir.Constant(I64, 1)), accumulators[1])
        is_odd = builder.trunc(n_blocks, ir.IntType(1))
        with builder.if_then(is_odd):
            add_block(builder.sub(n_blocks, ir.Constant(I64, 1)), accumulators[0])
        total = builder.fadd(builder.load(accumulators[0]), builder.load(accumulators[1]))
        result = builder.extract_element(total, ir.Constant(I32, 0))
        for lane in range(1, 8):
            result = builder.fadd(result, builder.extract_element(total, ir.Constant(I32, lane)))
        return result

    return sig, codegen


def _q4_q5_k_codegen(has_fifth_bits):
    # codegen for q4_k_block_isum / q5_k_block_isum (see their docstrings)
    qs_offset = 48 if has_fifth_bits else 16

    def codegen(context, builder, signature, args):
        block = _pointer(context, builder, signature.args[0], args[0], args[1])
        scale_ptr = context.make_array(signature.args[2])(context, builder, args[2]).data
        x_ptr = _pointer(context, builder, signature.args[3], args[3], args[4])
        scale = [builder.trunc(builder.load(builder.gep(scale_ptr, [ir.Constant(I64, s)])), I16) for s in range(8)]
        high_bits = _load(builder, block, ir.Constant(I64, 16), V32I8, 1) if has_fifth_bits else None
        total = None
        for g in range(4):
            packed = _load(builder, block, ir.Constant(I64, qs_offset + 32 * g), V32I8, 1)
            for half, shift in ((0, 0), (1, 4)):
                values = builder.and_(builder.lshr(packed, _bytes(builder, shift)), _bytes(builder, 15))
                s = 2 * g + half
                if has_fifth_bits:  # bit s of qh[l] is the fifth bit of value 32 s + l
                    fifth = builder.and_(builder.lshr(high_bits, _bytes(builder, s)), _bytes(builder, 1))
                    values = builder.or_(values, builder.shl(fifth, _bytes(builder, 4)))
                # scale (6 bits) x value (<= 5 bits) < 2^11 fits the int16 lanes: one 16-lane
                # multiply before vpmaddwd instead of two 8-lane int32 multiplies after it
                scaled = builder.mul(builder.zext(values, V32I16), _splat(builder, scale[s], V32I16))
                part = _madd32(builder, scaled, builder.gep(x_ptr, [ir.Constant(I64, 32 * s)]))
                total = part if total is None else builder.add(total, part)
        return _reduce_add(builder, total)

    return codegen


@intrinsic
def q4_k_block_isum(typingctx, w, block_offset, scales, xq, x_offset):
    """int32 sum_s scales[s] * sum_{i<32} q_{32s+i} * xq[x_offset + 32s + i] over the 256 4-bit
    values of the Q4_K super-block at w[block_offset] (qs at +16: group g's 32 bytes hold values
    64g + i in the low nibbles and 64g + 32 + i in the high ones); scales: int32 (8,), the
    sub-block scales the caller unpacked. The 8 scaled sums stay in one vector until the end."""
    if not all(isinstance(a, types.Array) for a in (w, scales, xq)):
        return None
    return types.int32(w, block_offset, scales, xq, x_offset), _q4_q5_k_codegen(False)


@intrinsic
def q5_k_block_isum(typingctx, w, block_offset, scales, xq, x_offset):
    """q4_k_block_isum for a Q5_K super-block: qh[32] at +16 adds the fifth bit of value 32s + l
    as bit s of qh[l], and the nibbles sit at +48."""
    if not all(isinstance(a, types.Array) for a in (w, scales, xq)):
        return None
    return types.int32(w, block_offset, scales, xq, x_offset), _q4_q5_k_codegen(True)


@intrinsic
def q6_k_block_isum(typingctx, w, block_offset, xq, x_offset):
    """int32 sum_{i<256} sc_{i // 16} * (q_i - 32) * xq[x_offset + i] for the Q6_K super-block at
    w[block_offset] (ql[128], qh[64], int8 scales[16], f16 d). In a 128-value half, value
    l + 32g (g = 0..3) has its low 4 bits in ql[l + 32 * (g & 1)] (low nibble for g < 2, high for
    g >= 2) and its top 2 bits at bit 2g of qh[l]. The 16 scaled sums stay in one vector until the end."""
    if not (isinstance(w, types.Array) and isinstance(xq, types.Array)):
        return None
    sig = types.int32(w, block_offset, xq, x_offset)

    def codegen(context, builder, signature, args):
        block = _pointer(context, builder, signature.args[0], args[0], args[1])
        x_ptr = _pointer(context, builder, signature.args[2], args[2], args[3])

        def scale(index):  # int8 scale byte at 192 + index, as int32
            return builder.sext(builder.load(builder.gep(block, [ir.Constant(I64, 192 + index)])), I32)

        total = None
        for half in range(2):
            qh = _load(builder, block, ir.Constant(I64, 128 + 32 * half), V32I8, 1)
            for g in range(4):
                ql = _load(builder, block, ir.Constant(I64, 64 * half + 32 * (g & 1)), V32I8, 1)
                low = builder.and_(builder.lshr(ql, _bytes(builder, 4 * (g >> 1))), _bytes(builder, 15))
                high = builder.and_(builder.lshr(qh, _bytes(builder, 2 * g)), _bytes(builder, 3))
                q = builder.sub(builder.or_(low, builder.shl(high, _bytes(builder, 4))), _bytes(builder, 32))  # [-32, 31]
                first = 8 * half + 2 * g  # scale index of values l < 16; l >= 16 take the next one
                part = _scaled_madd32(builder, builder.sext(q, V32I16),
                                      builder.gep(x_ptr, [ir.Constant(I64, 128 * half + 32 * g)]),
                                      scale(first), scale(first + 1))
                total = part if total is None else builder.add(total, part)
        return _reduce_add(builder, total)

    return sig, codegen
