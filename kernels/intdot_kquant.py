"""The k-quant integer dots (Q4_K, Q5_K, Q6_K against Q8_K activations), as LLVM intrinsics.

Owns `dot_row_q4_k` / `dot_row_q4_k_quad` and `dot_row_q6_k` / `dot_row_q6_k_tiled` (a whole
weight row against one x row, its f32 accumulation in exactly the shape of llama.cpp's AVX2
kernels for that batch shape, so the result is llama.cpp's bit for bit), and
`q4_k_block_isum` / `q5_k_block_isum` (one super-block's integer sum, its sub-block scales
applied in the vector). Built from kernels/intdot.py's vector helpers (`vpmaddubsw` +
`vpmaddwd` by the scales on AVX2, generic vector IR elsewhere: the same integers).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ggserve.kernels import jit_cache, threads  # noqa: F401  (numba cache dir + threading layer before any kernel)
from ggserve.kernels.intdot import (I8, I16, I32, I64, V16I16, V32I8, _as_i64, _bytes, _f16_value, _load, _pointer, _reduce_add,
                            _scaled_u8_quads, _splat)
from ggserve.kernels.lanes import fma_ir, lane_sum_ir


def _k_quant_group_sums(builder, block, x_ptr, scale_for, has_fifth_bits=False):
    # [4 x <8 x i32>]: group g's scaled integer sums (sub-blocks 2g and 2g + 1, values 64g..64g+63)
    # of the Q4_K / Q5_K super-block at `block` against the 256 int8 x values at x_ptr;
    # scale_for(s) is sub-block s's scale as <16 x i16>. Nibbles at +16 (Q4_K) or +48 (Q5_K,
    # whose qh[32] at +16 adds the fifth bit of value 32 s + l as bit s of qh[l]); group g's 32
    # bytes hold values 64g + i in the low nibbles and 64g + 32 + i in the high ones.
    qs_offset = 48 if has_fifth_bits else 16
    high_bits = _load(builder, block, ir.Constant(I64, 16), V32I8, 1) if has_fifth_bits else None
    groups = []
    for g in range(4):
        packed = _load(builder, block, ir.Constant(I64, qs_offset + 32 * g), V32I8, 1)
        total = None
        for half in range(2):
            s = 2 * g + half
            values = builder.and_(builder.lshr(packed, _bytes(builder, 4 * half)), _bytes(builder, 15))
            if has_fifth_bits:
                fifth = builder.and_(builder.lshr(high_bits, _bytes(builder, s)), _bytes(builder, 1))
                values = builder.or_(values, builder.shl(fifth, _bytes(builder, 4)))
            x8 = _load(builder, builder.gep(x_ptr, [ir.Constant(I64, 32 * s)]), None, V32I8, 1)
            part = _scaled_u8_quads(builder, values, x8, scale_for(s))
            total = part if total is None else builder.add(total, part)
        groups.append(total)
    return groups


def _vector_sum(builder, vectors):
    total = vectors[0]
    for v in vectors[1:]:
        total = builder.add(total, v)
    return total


def _q4_q5_k_codegen(has_fifth_bits):
    # codegen for q4_k_block_isum / q5_k_block_isum (see their docstrings)
    def codegen(context, builder, signature, args):
        block = _pointer(context, builder, signature.args[0], args[0], args[1])
        scale_ptr = context.make_array(signature.args[2])(context, builder, args[2]).data
        x_ptr = _pointer(context, builder, signature.args[3], args[3], args[4])
        scale = [builder.trunc(builder.load(builder.gep(scale_ptr, [ir.Constant(I64, s)])), I16) for s in range(8)]
        groups = _k_quant_group_sums(builder, block, x_ptr, lambda s: _splat(builder, scale[s], V16I16), has_fifth_bits)
        return _reduce_add(builder, _vector_sum(builder, groups))

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


def _pair_sums(builder, v16):
    # <8 x i32> lane j = v16[2j] + v16[2j + 1] of a <16 x i32>: per-32-value sums from the
    # 16-value ones (Q8_K's bsums)
    v8i32 = ir.VectorType(I32, 8)
    even = builder.shuffle_vector(v16, v16, ir.Constant(v8i32, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(v16, v16, ir.Constant(v8i32, list(range(1, 16, 2))))
    return builder.add(even, odd)


def _k_row_operands(context, builder, signature, args):
    # (w_row, lut, x_row, d_row, bs_row, n_blocks as i64) from the arguments every k-quant row dot
    # takes: (w, w_offset, n_blocks, lut, xq, xd, x_block, bsums)
    w_arg, w_offset, n_blocks, lut_arg, xq_arg, xd_arg, x_block, bs_arg = args
    w_row = _pointer(context, builder, signature.args[0], w_arg, w_offset)
    lut = context.make_array(signature.args[3])(context, builder, lut_arg).data
    x_row = _pointer(context, builder, signature.args[4], xq_arg, builder.mul(x_block, ir.Constant(x_block.type, 256)))
    d_row = _pointer(context, builder, signature.args[5], xd_arg, x_block)
    bs_row = _pointer(context, builder, signature.args[7], bs_arg, builder.mul(x_block, ir.Constant(x_block.type, 16)))
    return w_row, lut, x_row, d_row, bs_row, _as_i64(builder, n_blocks)


def _q4_k_scales_mins(builder, block):
    # (scales, mins) <8 x i32> of the Q4_K super-block at `block`: its 12 scale bytes b (at +4)
    # hold 8 6-bit (scale, min) pairs: scale s = b[s] & 63 and min s = b[s + 4] & 63 for s < 4;
    # for s >= 4 the low 4 bits come from b[s + 4] (scale: low nibble, min: high nibble) and the
    # top 2 from bits 6-7 of b[s - 4] (scale) and b[s] (min). Vector shuffles and per-lane
    # shifts instead of ~100 scalar instructions per super-block.
    v8i32 = ir.VectorType(I32, 8)
    wide = builder.zext(_load(builder, block, ir.Constant(I64, 4), ir.VectorType(I8, 16), 1), ir.VectorType(I32, 16))

    def pick(lanes):
        return builder.shuffle_vector(wide, wide, ir.Constant(v8i32, lanes))

    def top_bits(lanes):  # bits 6-7 of the picked bytes as bits 4-5, in lanes 4..7 only
        shifted = builder.shl(builder.lshr(pick(lanes), ir.Constant(v8i32, [6] * 8)), ir.Constant(v8i32, [4] * 8))
        return builder.and_(shifted, ir.Constant(v8i32, [0] * 4 + [48] * 4))

    low_mask = ir.Constant(v8i32, [63] * 4 + [15] * 4)
    scales = builder.or_(builder.and_(pick([0, 1, 2, 3, 8, 9, 10, 11]), low_mask), top_bits([0, 1, 2, 3, 0, 1, 2, 3]))
    min_low = builder.lshr(pick([4, 5, 6, 7, 8, 9, 10, 11]), ir.Constant(v8i32, [0] * 4 + [4] * 4))
    mins = builder.or_(builder.and_(min_low, low_mask), top_bits([4, 5, 6, 7, 4, 5, 6, 7]))
    return scales, mins


def _q4_k_row_codegen(quad):
    # codegen for dot_row_q4_k (quad=False) and dot_row_q4_k_quad (see their docstrings)
    def codegen(context, builder, signature, args):
        w_row, lut, x_row, d_row, bs_row, n_blocks = _k_row_operands(context, builder, signature, args)
        f32, v16i32 = ir.FloatType(), ir.VectorType(I32, 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
        acc_min = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            block = builder.gep(w_row, [builder.mul(b, ir.Constant(I64, 144))])
            x_ptr = builder.gep(x_row, [builder.mul(b, ir.Constant(I64, 256))])
            d_x = builder.load(builder.gep(d_row, [b]))
            d = builder.fmul(_f16_value(builder, lut, block, 0), d_x)
            d_min = builder.fmul(_f16_value(builder, lut, block, 2), d_x)
            scales, mins = _q4_k_scales_mins(builder, block)
            scales16 = builder.trunc(scales, ir.VectorType(I16, 8))
            # minimums: mins[s] * (sum of x's 32 values of sub-block s), from the 16-value sums
            sums = _load(builder, builder.gep(bs_row, [builder.mul(b, ir.Constant(I64, 16))]), None, v16i32, 4)
            weighted_mins = builder.mul(_pair_sums(builder, sums), mins)
            groups = _k_quant_group_sums(builder, block, x_ptr, lambda s: builder.shuffle_vector(
                scales16, scales16, ir.Constant(ir.VectorType(I32, 16), [s] * 16)))
            if quad:  # ggml's 4-row gemm adds each 64-value part on its own
                for g in range(4):
                    pair_min = builder.add(builder.extract_element(weighted_mins, ir.Constant(I32, 2 * g)),
                                           builder.extract_element(weighted_mins, ir.Constant(I32, 2 * g + 1)))
                    isum = builder.sitofp(_reduce_add(builder, groups[g]), f32)
                    builder.store(fma_ir(builder, isum, d, builder.load(acc)), acc)
                    builder.store(fma_ir(builder, builder.sitofp(pair_min, f32), d_min, builder.load(acc_min)), acc_min)
            else:
                isum = _reduce_add(builder, _vector_sum(builder, groups))
                builder.store(fma_ir(builder, builder.sitofp(isum, f32), d, builder.load(acc)), acc)
                builder.store(fma_ir(builder, builder.sitofp(_reduce_add(builder, weighted_mins), f32), d_min,
                                     builder.load(acc_min)), acc_min)
        return builder.fsub(builder.load(acc), builder.load(acc_min))

    return codegen


def _k_quant_row_signature(w, w_offset, n_blocks, lut, xq, xd, x_block, bsums):
    if not all(isinstance(a, types.Array) for a in (w, lut, xq, xd, bsums)):
        return None
    return types.float32(w, w_offset, n_blocks, lut, xq, xd, x_block, bsums)


@intrinsic
def dot_row_q4_k(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block, bsums):
    """f32 dot of one Q4_K weight row (n_blocks super-blocks from byte w_offset of w) with one x
    row as Q8_K (as dot_row_q6_k's arguments).

    A super-block is f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes of
    nibbles (32-byte group g: values 64g + i low, 64g + 32 + i high); the weight is
    d * sc_s * q - dmin * mn_s for sub-block s = value // 32.

    The shape of llama.cpp's repacked Q4_K gemv on AVX2 (ggml_gemv_q4_K_8x8_q8_K): per
    super-block acc = fma(f32(isum), d * d_x, acc) and acc_min = fma(f32(imin), dmin * d_x,
    acc_min), isum the exact integer sum_s sc_s * (q . x over s) and imin = sum_s mn_s * (sum of
    x over s); the output is acc - acc_min."""
    sig = _k_quant_row_signature(w, w_offset, n_blocks, lut, xq, xd, x_block, bsums)
    return (sig, _q4_k_row_codegen(False)) if sig is not None else None


@intrinsic
def dot_row_q4_k_quad(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block, bsums):
    """dot_row_q4_k in the shape of llama.cpp's 4-row Q4_K gemm (ggml_gemm_q4_K_8x8_q8_K): each
    super-block added to acc and acc_min in four 64-value parts (sub-blocks 2g, 2g + 1)."""
    sig = _k_quant_row_signature(w, w_offset, n_blocks, lut, xq, xd, x_block, bsums)
    return (sig, _q4_k_row_codegen(True)) if sig is not None else None


def _q6_k_row_codegen(tiled):
    # codegen for dot_row_q6_k (tiled=False) and dot_row_q6_k_tiled (see their docstrings)
    def codegen(context, builder, signature, args):
        w_row, lut, x_row, d_row, bs_row, n_blocks = _k_row_operands(context, builder, signature, args)
        f32, v8f32 = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
        v8i32, v16i32 = ir.VectorType(I32, 8), ir.VectorType(I32, 16)
        zero = ir.Constant(f32, 0.0) if tiled else ir.Constant(v8f32, [0.0] * 8)
        accumulator = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            block = builder.gep(w_row, [builder.mul(b, ir.Constant(I64, 210))])
            x_ptr = builder.gep(x_row, [builder.mul(b, ir.Constant(I64, 256))])
            scale_bytes = _load(builder, block, ir.Constant(I64, 192), ir.VectorType(I8, 16), 1)
            scales, scales16 = builder.sext(scale_bytes, v16i32), builder.sext(scale_bytes, V16I16)
            lanes = None
            for half in range(2):
                qh = _load(builder, block, ir.Constant(I64, 128 + 32 * half), V32I8, 1)
                for g in range(4):
                    ql = _load(builder, block, ir.Constant(I64, 64 * half + 32 * (g & 1)), V32I8, 1)
                    low = builder.and_(builder.lshr(ql, _bytes(builder, 4 * (g >> 1))), _bytes(builder, 15))
                    high = builder.and_(builder.lshr(qh, _bytes(builder, 2 * g)), _bytes(builder, 3))
                    q = builder.or_(low, builder.shl(high, _bytes(builder, 4)))  # [0, 63]
                    chunk = 4 * half + g  # values 32 chunk + i; scales 2 chunk (i < 16), 2 chunk + 1
                    x8 = _load(builder, builder.gep(x_ptr, [ir.Constant(I64, 32 * chunk)]), None, V32I8, 1)
                    scale = builder.shuffle_vector(scales16, scales16, ir.Constant(ir.VectorType(I32, 16), [2 * chunk] * 8 + [2 * chunk + 1] * 8))
                    part = _scaled_u8_quads(builder, q, x8, scale)
                    lanes = part if lanes is None else builder.add(lanes, part)
            # the -32 offset of the values: 32 * sc * (sum of 16 x) per 16-value group, lane j
            # taking groups 2j and 2j + 1
            sums = _load(builder, builder.gep(bs_row, [builder.mul(b, ir.Constant(I64, 16))]), None, v16i32, 4)
            offsets = _pair_sums(builder, builder.mul(sums, scales))
            lanes = builder.sub(lanes, builder.shl(offsets, _splat(builder, ir.Constant(I32, 5), v8i32)))
            d_w = _f16_value(builder, lut, block, 208)
            d_x = builder.load(builder.gep(d_row, [b]))
            if tiled:
                scaled = builder.fmul(d_w, builder.sitofp(_reduce_add(builder, lanes), f32))
                builder.store(fma_ir(builder, scaled, d_x, builder.load(accumulator)), accumulator)
            else:
                builder.store(fma_ir(builder, _splat(builder, builder.fmul(d_x, d_w), v8f32), builder.sitofp(lanes, v8f32),
                                    builder.load(accumulator)), accumulator)
        if tiled:
            return builder.load(accumulator)
        return lane_sum_ir(builder, builder.load(accumulator))

    return codegen


@intrinsic
def dot_row_q6_k(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block, bsums):
    """f32 dot of one Q6_K weight row (n_blocks super-blocks from byte w_offset of w) with one x
    row quantized to Q8_K (values xq[256 * x_block:], scales xd[x_block:], int32 sums of each
    16 values bsums[16 * x_block:]).

    A super-block is ql[128], qh[64], int8 scales[16], f16 d. In a 128-value half, value l + 32g
    (g = 0..3) has its low 4 bits in ql[l + 32 * (g & 1)] (low nibble for g < 2, high for g >= 2)
    and its top 2 bits at bit 2g of qh[l]; the weight is d * sc[i // 16] * (q_i - 32).

    The exact shape of ggml's AVX2 ggml_vec_dot_q6_K_q8_K (llama.cpp's path for batches of
    under 8 rows): per super-block 8 int32 lanes, lane j holding sc * q * x over elements
    4j..4j+3 of each 32-value chunk with q unsigned (0..63), minus 32 * (sc * bsum) of 16-value
    groups 2j and 2j + 1; then one fused multiply-add of the lanes by d_x * d_w into 8 f32
    lanes, and lane_sum_ir at the end. Integer parts are exact, so the output equals
    llama.cpp's bit for bit."""
    sig = _k_quant_row_signature(w, w_offset, n_blocks, lut, xq, xd, x_block, bsums)
    return (sig, _q6_k_row_codegen(False)) if sig is not None else None


@intrinsic
def dot_row_q6_k_tiled(typingctx, w, w_offset, n_blocks, lut, xq, xd, x_block, bsums):
    """dot_row_q6_k in the shape of ggml's tiled k-quant matmul (its path for batches of 8 rows
    or more): one f32 sum, adding f32(d_w * isum) * d_x per super-block with a fused
    multiply-add, isum being the super-block's exact integer dot."""
    sig = _k_quant_row_signature(w, w_offset, n_blocks, lut, xq, xd, x_block, bsums)
    return (sig, _q6_k_row_codegen(True)) if sig is not None else None
