// int3 and int2 weights, group-wise: w[n, k] = (q[n, k] - H) * s[n, g] + z[n, g], H = 2^(bits-1), g = k / G,
// s and z bfloat16 [N, K/G], G in 16..128, K a multiple of 32 and of G.
//
// Layout (mixtral.kernels.packing, which is also the checkpoint's): each row of q is a little-endian bit stream,
// weight k in bits [bits * k, bits * k + bits) of the row's bytes; a row is K * bits / 8 bytes and each block of
// 32 weights 4 * bits whole bytes (int2: 4 weights a byte, LSB first; int3: 8 weights in 3 bytes).
//
// gemv_lowbit: few rows of x (decoding). Two ways, both splitting each weight into its varying part (q - H) s and
// its group constant z, whose product is sum_g z_g X_g with X_g = sum_{k in g} x_k, x's exact sums per group:
//
// - exact (AVX512-BF16): a block of 32 weights is unpacked to 32 bf16 lanes in 4 instructions: one 16-byte
//   broadcast of the block into the four 128-bit lanes, a byte shuffle giving each 16-bit lane the two bytes that
//   hold its weight, a per-lane shift (vpsrlvw), and (v & mask) | 0x4300, which makes the bf16 number 128 + q
//   exactly (as gemv_int4). Then, per group, one `vdpbf16ps` per row of x accumulates sum (128 + q) x exactly in
//   float32, scaled by s once per group: y = sum_g s_g sum_k (128 + q_k) x_k + sum_g (z_g - (128 + H) s_g) X_g.
//   For G = 16 a block spans two groups: its dot product's float lanes 0-7 hold the first 16 weights and lanes
//   8-15 the next 16, so one vector of the two scales serves both.
// - int8 activations (AVX512-VNNI and VBMI, G >= 32): x is rounded to int8 per group, x_k ~ d_g xq_k with
//   d_g = max |x| / 127 over the group, and 64 weights become 64 bytes q in 3 instructions (int3: a byte
//   permutation putting the bytes of 8 weights in a 64-bit lane, `vpmultishiftqb` cutting that lane's eight
//   fields into bytes, a mask), multiplied by xq 64 at a time with `vpdpbusd` into int32:
//   y = sum_g s_g (d_g sum_k q_k xq_k - H R_g) + sum_g z_g X_g, R_g = d_g sum_k xq_k: exactly the product of the
//   varying parts with the rounded x plus that of the constants with the exact x. Half the instructions of
//   the exact way per weight: 1.2-1.4x its speed at one row (Mixtral-8x7B's expert matrices, 2 threads, EPYC of
//   2026-12-03; int3 g128 24-28 GB/s against 19-21), which makes int3 faster than int4 in time. The cost is
//   x's rounding, at most d_g / 2 per value, in the varying part only (the constant part keeps exact sums); the
//   int3 weights themselves are off by up to s_g / 2. Groups go in pairs (lowbit_rows_int8), so G = 16 stays
//   exact, and so does a row with an odd number of groups.
//
// dequant_lowbit: the bf16 weight [N, K] for products with many rows, bit for bit what the torch reference
// (packing.dequantize_lowbit) rounds to: each group's 2^bits values computed in float32 and rounded to nearest
// even once, and the weights looked up by their q (vpermw). Plain C where the CPU lacks AVX512-BF16.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

// Weight k of a packed row (portable path): a 3-bit field may straddle two bytes, never the row's end.
static inline int lb_get(const uint8_t *row, int bits, long k) {
    long bit = (long)bits * k;
    unsigned v = row[bit >> 3];
    if ((bit & 7) + bits > 8) v |= (unsigned)row[(bit >> 3) + 1] << 8;
    return (int)((v >> (bit & 7)) & ((1u << bits) - 1));
}

// Software prefetch of the weight rows this many rows ahead into L2, as in gemv.c (whose comment has the
// measurement; MIXTRAL_KERNEL_CFLAGS=-DPREFETCH_ROWS=0 builds both without it).
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#define LB_MAX_ROWS 4

// The byte shuffle and shifts that put weight i of a block in 16-bit lane i (low bits), for `bits`.
static inline void lb_unpack_consts(int bits, __m512i *shuffle, __m512i *shift) {
    uint8_t idx[64];
    uint16_t sh[32];
    for (int i = 0; i < 32; i++) {
        int bit = bits * i;
        idx[2 * i] = (uint8_t)(bit >> 3);
        idx[2 * i + 1] = (uint8_t)((bit >> 3) + 1);  // past the block's bytes only where the field ends before
        sh[i] = (uint16_t)(bit & 7);
    }
    *shuffle = _mm512_loadu_si512(idx);
    *shift = _mm512_loadu_si512(sh);
}

// The 16 (of 32) bytes of a block at p, in each 128-bit lane. `last`: the block ends its buffer, read only its
// own bytes (a full 16-byte load could cross into an unmapped page).
static inline __m512i lb_load(const uint8_t *p, int bits, int last) {
    __m128i v = last ? _mm_maskz_loadu_epi8((__mmask16)((1u << (4 * bits)) - 1), p)
                     : _mm_loadu_si128((const __m128i *)p);
    return _mm512_broadcast_i32x4(v);
}

// 32 weights (their q, in 16-bit lanes, with `or` OR-ed in): the block's bytes shuffled, shifted, masked.
static inline __m512i lb_unpack(__m512i bytes, __m512i shuffle, __m512i shift, __m512i mask, __m512i or) {
    __m512i v = _mm512_srlv_epi16(_mm512_shuffle_epi8(bytes, shuffle), shift);
    return _mm512_ternarylogic_epi32(v, mask, or, 0xEA);  // (v & mask) | or
}

// The scales of a period (a group of G >= 32, or a block holding two groups of 16) as float lanes of its dot
// products: one value, or lanes 0-7 the first group's and 8-15 the second's.
static inline __m512 lb_scales(const uint16_t *s, int two) {
    if (!two) return _mm512_set1_ps(bf16_to_float(s[0]));
    uint32_t pair;
    memcpy(&pair, s, 4);
    __m512i v = _mm512_set1_epi32((int)pair);  // bf16 -> float: the high half already is, the low one shifts up
    return _mm512_castsi512_ps(_mm512_mask_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)),
                                                      0x00FF, v, 16));
}

// The `k` of 16 bf16 numbers at p as float lanes (the others 0; bf16 -> float is a 16-bit shift).
static inline __m512 lb_bf16x16(__mmask16 k, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

// sum_g z_g X[g] - c s_g R[g] for one weight row, 16 groups a step: the constant part of every weight times x's
// group sums X, and the offset c of the integers times R (X itself, or the rounded x's sums of the int8 way).
static inline float lb_offsets(const uint16_t *s, const uint16_t *z, const float *X, const float *R, int groups,
                               float c) {
    __m512 acc = _mm512_setzero_ps();
    const __m512 cv = _mm512_set1_ps(c);
    for (int g = 0; g < groups; g += 16) {
        __mmask16 k = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        acc = _mm512_fmadd_ps(lb_bf16x16(k, z + g), _mm512_maskz_loadu_ps(k, X + g), acc);
        acc = _mm512_fnmadd_ps(_mm512_mul_ps(cv, lb_bf16x16(k, s + g)), _mm512_maskz_loadu_ps(k, R + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// y[m, n] for n in [n0, n1), two weight rows at a time (each load of x serves both), MB rows of x (a constant in
// each instance, so the accumulators stay in registers). BITS a constant too.
static inline __attribute__((always_inline)) void lowbit_rows(const uint16_t *xm, const int MB, const float *Xm,
                                                              const uint8_t *Q, const uint16_t *S, const uint16_t *Z,
                                                              int N, int K, int G, const int BITS, float *y, int ldy,
                                                              int n0, int n1) {
    __m512i shuffle, shift;
    lb_unpack_consts(BITS, &shuffle, &shift);
    const __m512i mask = _mm512_set1_epi16((1 << BITS) - 1), magic = _mm512_set1_epi16(0x4300);
    const long row_bytes = (long)K * BITS / 8;
    const int groups = K / G, two = G == 16, period = two ? 32 : G;
    const float c = 128.0f + (float)(1 << (BITS - 1));
    for (int n = n0; n < n1; n += 2) {
        const int nb = n1 - n < 2 ? n1 - n : 2;
        const uint8_t *q0 = Q + n * row_bytes, *q1 = Q + (n + nb - 1) * row_bytes;
        const uint16_t *s0 = S + (long)n * groups, *s1 = S + (long)(n + nb - 1) * groups;
        const int last_row = n + nb == N;  // the final block of the buffer is read with a masked load
        __m512 total0[LB_MAX_ROWS], total1[LB_MAX_ROWS];
        for (int m = 0; m < MB; m++) { total0[m] = _mm512_setzero_ps(); total1[m] = _mm512_setzero_ps(); }
        for (int k0 = 0; k0 < K; k0 += period) {
            __m512 acc0[LB_MAX_ROWS], acc1[LB_MAX_ROWS];
            for (int m = 0; m < MB; m++) { acc0[m] = _mm512_setzero_ps(); acc1[m] = _mm512_setzero_ps(); }
            for (int k = k0; k < k0 + period; k += 32) {
                const long at = (long)k * BITS / 8;
                if (PREFETCH_ROWS && (k & 127) == 0) {
                    _mm_prefetch((const char *)(q0 + PREFETCH_ROWS * row_bytes + at), _MM_HINT_T1);
                    _mm_prefetch((const char *)(q1 + PREFETCH_ROWS * row_bytes + at), _MM_HINT_T1);
                }
                const int last = last_row && k + 32 == K;
                __m512bh a0 = (__m512bh)lb_unpack(lb_load(q0 + at, BITS, last && nb == 1), shuffle, shift, mask, magic);
                __m512bh a1 = (__m512bh)lb_unpack(lb_load(q1 + at, BITS, last), shuffle, shift, mask, magic);
                for (int m = 0; m < MB; m++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + (long)m * K + k);
                    acc0[m] = _mm512_dpbf16_ps(acc0[m], a0, xv);
                    acc1[m] = _mm512_dpbf16_ps(acc1[m], a1, xv);
                }
            }
            const int g = k0 / G;
            __m512 sc0 = lb_scales(s0 + g, two), sc1 = lb_scales(s1 + g, two);
            for (int m = 0; m < MB; m++) {
                total0[m] = _mm512_fmadd_ps(sc0, acc0[m], total0[m]);
                total1[m] = _mm512_fmadd_ps(sc1, acc1[m], total1[m]);
            }
        }
        for (int m = 0; m < MB; m++) {
            const float *X = Xm + (long)m * groups;
            y[(long)m * ldy + n] = _mm512_reduce_add_ps(total0[m])
                                   + lb_offsets(s0, Z + (long)n * groups, X, X, groups, c);
            if (nb == 2)
                y[(long)m * ldy + n + 1] = _mm512_reduce_add_ps(total1[m])
                                           + lb_offsets(s1, Z + (long)(n + 1) * groups, X, X, groups, c);
        }
    }
}

#define LB_ROWS(BITS)                                                                                       \
    for (int m0 = 0; m0 < M; m0 += LB_MAX_ROWS) {                                                           \
        const uint16_t *xm = x + (long)m0 * K;                                                              \
        const float *Xm = X + (long)m0 * (K / G);                                                           \
        float *ym = y + (long)m0 * N;                                                                       \
        switch (M - m0 < LB_MAX_ROWS ? M - m0 : LB_MAX_ROWS) {                                              \
            case 1: lowbit_rows(xm, 1, Xm, Q, S, Z, N, K, G, BITS, ym, N, n0, n1); break;                   \
            case 2: lowbit_rows(xm, 2, Xm, Q, S, Z, N, K, G, BITS, ym, N, n0, n1); break;                   \
            case 3: lowbit_rows(xm, 3, Xm, Q, S, Z, N, K, G, BITS, ym, N, n0, n1); break;                   \
            default: lowbit_rows(xm, 4, Xm, Q, S, Z, N, K, G, BITS, ym, N, n0, n1); break;                  \
        }                                                                                                   \
    }

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define LB_INT8 1

// The byte permutation and bit offsets that cut 64 weights into bytes: 32 weights of group a (bytes 0-31) and the
// same 32 of the group after it, b (bytes 32-63), read from one load starting at a's (b's bytes `gap` = G * bits / 8
// further on). 64-bit lane L gets the bytes of weights 8L..8L+7 of the 64 (int3: 3 bytes; int2: the 8 bytes of the
// 32 weights of its group) and byte j of the lane takes the field of weight 8L + j from there.
static inline void lb_byte_consts(int bits, int gap, __m512i *perm, __m512i *ctrl, __mmask64 *load) {
    uint8_t idx[64], offset[64];
    for (int L = 0; L < 8; L++)
        for (int j = 0; j < 8; j++) {
            const int base = L < 4 ? 0 : gap, l = L % 4;
            idx[8 * L + j] = (uint8_t)(bits == 3 ? base + 3 * l + (j < 3 ? j : 2) : base + j);
            offset[8 * L + j] = (uint8_t)(bits == 3 ? 3 * j : 16 * l + 2 * j);
        }
    *perm = _mm512_loadu_si512(idx);
    *ctrl = _mm512_loadu_si512(offset);
    const __mmask64 block = (1ull << (4 * bits)) - 1;  // the 4 * bits bytes of 32 weights
    *load = block | (block << gap);
}

// 64 weights' q as bytes (32 of a group, then the same 32 of the next), from the bytes of `load` at p: nothing
// else is read.
static inline __m512i lb_bytes(const uint8_t *p, __mmask64 load, __m512i perm, __m512i ctrl, __m512i mask) {
    __m512i v = _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(load, p));
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, v), mask);
}

// d per lane of a pair of groups' int32 sums: lanes 0-7 group g, 8-15 group g + 1.
static inline __m512 lb_pair_scales(const float *d) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d[0]), _mm512_set1_ps(d[1]));
}

// As lowbit_rows, with x rounded to int8 (xq [MB, K] in pair order, see lb_prepare_x; its scales D and the
// rounded x's sums R [MB, K/G]). Groups go in pairs: each step's 64 weights are 32 of group g (int32 lanes 0-7 of
// the dot products) and the same 32 of group g + 1 (lanes 8-15), so the scaling after the pair, per row, is one
// conversion, multiplication and fused add for two groups.
static inline __attribute__((always_inline)) void lowbit_rows_int8(const int8_t *xq, const int MB, const float *D,
                                                                   const float *Rm, const float *Xm, const uint8_t *Q,
                                                                   const uint16_t *S, const uint16_t *Z, int K, int G,
                                                                   const int BITS, float *y, int ldy, int n0, int n1) {
    const int gap = G * BITS / 8;  // bytes of a group
    __m512i perm, ctrl;
    __mmask64 load;
    lb_byte_consts(BITS, gap, &perm, &ctrl, &load);
    const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
    const long row_bytes = (long)K * BITS / 8;
    const int groups = K / G;
    const float c = (float)(1 << (BITS - 1));
    for (int n = n0; n < n1; n += 2) {
        const int nb = n1 - n < 2 ? n1 - n : 2;
        const uint8_t *q0 = Q + n * row_bytes, *q1 = Q + (n + nb - 1) * row_bytes;
        const uint16_t *s0 = S + (long)n * groups, *s1 = S + (long)(n + nb - 1) * groups;
        __m512 total0[LB_MAX_ROWS], total1[LB_MAX_ROWS];
        for (int m = 0; m < MB; m++) { total0[m] = _mm512_setzero_ps(); total1[m] = _mm512_setzero_ps(); }
        for (int g = 0; g < groups; g += 2) {
            const long pair = (long)g * gap;  // the pair's first byte in a row
            if (PREFETCH_ROWS)  // the pair's 2 * gap <= 96 bytes: two lines, or three where they straddle one more
                for (long at = pair; at < pair + 2 * gap + 63; at += 64) {
                    const long in = at < pair + 2 * gap ? at : pair + 2 * gap - 1;
                    _mm_prefetch((const char *)(q0 + PREFETCH_ROWS * row_bytes + in), _MM_HINT_T1);
                    _mm_prefetch((const char *)(q1 + PREFETCH_ROWS * row_bytes + in), _MM_HINT_T1);
                }
            __m512i acc0[LB_MAX_ROWS], acc1[LB_MAX_ROWS];
            for (int m = 0; m < MB; m++) { acc0[m] = _mm512_setzero_si512(); acc1[m] = _mm512_setzero_si512(); }
            for (int t = 0; t < G / 32; t++) {
                const long at = pair + 4 * BITS * t;
                const __m512i a0 = lb_bytes(q0 + at, load, perm, ctrl, mask);
                const __m512i a1 = lb_bytes(q1 + at, load, perm, ctrl, mask);
                for (int m = 0; m < MB; m++) {
                    const __m512i xv = _mm512_loadu_si512(xq + (long)m * K + (long)g * G + 64 * t);
                    acc0[m] = _mm512_dpbusd_epi32(acc0[m], a0, xv);
                    acc1[m] = _mm512_dpbusd_epi32(acc1[m], a1, xv);
                }
            }
            const __m512 sc0 = lb_scales(s0 + g, 1), sc1 = lb_scales(s1 + g, 1);
            for (int m = 0; m < MB; m++) {
                const __m512 d = lb_pair_scales(D + (long)m * groups + g);
                total0[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc0[m]), d), sc0, total0[m]);
                total1[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc1[m]), d), sc1, total1[m]);
            }
        }
        for (int m = 0; m < MB; m++) {
            const float *X = Xm + (long)m * groups, *R = Rm + (long)m * groups;
            y[(long)m * ldy + n] = _mm512_reduce_add_ps(total0[m])
                                   + lb_offsets(s0, Z + (long)n * groups, X, R, groups, c);
            if (nb == 2)
                y[(long)m * ldy + n + 1] = _mm512_reduce_add_ps(total1[m])
                                           + lb_offsets(s1, Z + (long)(n + 1) * groups, X, R, groups, c);
        }
    }
}

#define LB_ROWS_INT8(BITS)                                                                                  \
    for (int m0 = 0; m0 < M; m0 += LB_MAX_ROWS) {                                                           \
        const int8_t *xm = xq + (long)m0 * K;                                                               \
        const float *Dm = D + (long)m0 * (K / G), *Rm = R + (long)m0 * (K / G), *Xm = X + (long)m0 * (K / G);\
        float *ym = y + (long)m0 * N;                                                                       \
        switch (M - m0 < LB_MAX_ROWS ? M - m0 : LB_MAX_ROWS) {                                              \
            case 1: lowbit_rows_int8(xm, 1, Dm, Rm, Xm, Q, S, Z, K, G, BITS, ym, N, n0, n1); break;             \
            case 2: lowbit_rows_int8(xm, 2, Dm, Rm, Xm, Q, S, Z, K, G, BITS, ym, N, n0, n1); break;             \
            case 3: lowbit_rows_int8(xm, 3, Dm, Rm, Xm, Q, S, Z, K, G, BITS, ym, N, n0, n1); break;             \
            default: lowbit_rows_int8(xm, 4, Dm, Rm, Xm, Q, S, Z, K, G, BITS, ym, N, n0, n1); break;            \
        }                                                                                                   \
    }
#endif  // VNNI and VBMI

// x's sums per group X [M, K/G] (float32, 16 lanes then their sum) and, with xq, x rounded to int8 per group:
// xq = round-to-nearest-even(x * (127 / a)), D = a / 127, a = max |x| over the group (xq = 0, D = 0 where a = 0),
// and the rounded x's sums R = D * sum xq. xq is stored in the order lowbit_rows_int8 reads it: for each pair of
// groups, 32 values of the first, the same 32 of the second, the next 32 of the first, ...
static void lb_prepare_x(const uint16_t *x, int M, int K, int G, float *X, int8_t *xq, float *D, float *R) {
    const int groups = K / G;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            const uint16_t *xg = x + (long)m * K + (long)g * G;
            __m512 sum = _mm512_setzero_ps(), amax = _mm512_setzero_ps();
            for (int k = 0; k < G; k += 16) {
                __m512 v = lb_bf16x16(0xFFFF, xg + k);
                sum = _mm512_add_ps(sum, v);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            }
            X[(long)m * groups + g] = _mm512_reduce_add_ps(sum);
            if (!xq) continue;
            const float a = _mm512_reduce_max_ps(amax), inv = a > 0 ? 127.0f / a : 0.0f;
            __m512i count = _mm512_setzero_si512();
            for (int k = 0; k < G; k += 16) {
                __m512 v = lb_bf16x16(0xFFFF, xg + k);
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));  // |q| <= 127: a * inv
                count = _mm512_add_epi32(count, q);
                const long at = (long)(g & ~1) * G + 64 * (k / 32) + 32 * (g & 1) + k % 32;
                _mm_storeu_si128((__m128i *)(xq + (long)m * K + at), _mm512_cvtsepi32_epi8(q));
            }
            D[(long)m * groups + g] = a / 127.0f;
            R[(long)m * groups + g] = a / 127.0f * (float)_mm512_reduce_add_epi32(count);
        }
}

// Whether gemv_lowbit has its int8-activation way (built for a CPU with AVX512-VNNI and VBMI).
int lowbit_int8_built(void) {
#ifdef LB_INT8
    return 1;
#else
    return 0;
#endif
}

// x bf16 [M, K]; Q uint8 [N, K*bits/8]; S, Z bf16 [N, K/G]; y float32 [M, N]. K a multiple of 32 and of G; G 16,
// 32, 64 or 128; bits 2 or 3 (the caller checks). int8: round x to int8 (where built, G >= 32 and the groups of
// a row even in number). Rows of W are split between threads in blocks of 64. Returns 1 where x was rounded to
// int8, 0 where exact, -1 where memory for x's sums could not be had (y untouched).
int gemv_lowbit(const uint16_t *x, int M, const uint8_t *Q, const uint16_t *S, const uint16_t *Z, int N, int K,
                int G, int bits, float *y, int threads, int int8) {
    const int groups = K / G;
#ifdef LB_INT8
    int8 = int8 && G >= 32 && groups % 2 == 0;  // whole pairs of groups
#else
    int8 = 0;
#endif
    float *X = malloc(sizeof(float) * (size_t)M * groups * 3);
    int8_t *xq = int8 ? malloc((size_t)M * K) : NULL;
    if (!X || (int8 && !xq)) {
        free(X);
        free(xq);
        return -1;
    }
    float *D = X + (long)M * groups, *R = D + (long)M * groups;
    lb_prepare_x(x, M, K, G, X, xq, D, R);
    const int block = 64;
    int blocks = (N + block - 1) / block;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
#ifdef LB_INT8
        if (int8) {
            if (bits == 3) {
                LB_ROWS_INT8(3)
            } else {
                LB_ROWS_INT8(2)
            }
            continue;
        }
#endif
        if (bits == 3) {
            LB_ROWS(3)
        } else {
            LB_ROWS(2)
        }
    }
    free(X);
    free(xq);
    return int8;
}
#endif  // AVX512-BF16

static void lowbit_row(const uint8_t *q, const uint16_t *S, const uint16_t *Z, int K, int G, int bits, int last,
                       uint16_t *o) {
    const int half = 1 << (bits - 1);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    __m512i shuffle, shift;
    lb_unpack_consts(bits, &shuffle, &shift);
    const int two = G == 16, period = two ? 32 : G, levels = 1 << bits;
    const __m512i mask = _mm512_set1_epi16((short)(levels - 1));
    // lanes 16-31 of a block look up the second group's values (entries levels..2·levels-1) where G = 16
    const __m512i second = two ? _mm512_mask_set1_epi16(_mm512_setzero_si512(), 0xFFFF0000u, (short)levels)
                               : _mm512_setzero_si512();
    float lv[16];
    for (int j = 0; j < 16; j++) lv[j] = (float)((j & (levels - 1)) - half);
    const __m512 level = _mm512_loadu_ps(lv);
    const __mmask16 upper = (__mmask16)(0xFFFFu << levels);  // table entries of the second group
    for (int k0 = 0; k0 < K; k0 += period) {
        const int g = k0 / G, g2 = two ? g + 1 : g;
        const __m512 sv = _mm512_mask_blend_ps(upper, _mm512_set1_ps(bf16_to_float(S[g])),
                                               _mm512_set1_ps(bf16_to_float(S[g2])));
        const __m512 zv = _mm512_mask_blend_ps(upper, _mm512_set1_ps(bf16_to_float(Z[g])),
                                               _mm512_set1_ps(bf16_to_float(Z[g2])));
        // (q - H) * s is exact in float32 (a 3-bit integer times a bf16), so the fused add rounds only once, as
        // torch's multiply then add does.
        const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(level, sv, zv)));
        for (int k = k0; k < k0 + period; k += 32) {
            __m512i index = lb_unpack(lb_load(q + (long)k * bits / 8, bits, last && k + 32 == K), shuffle, shift,
                                      mask, second);
            _mm512_storeu_si512(o + k, _mm512_permutexvar_epi16(index, table));
        }
    }
#else
    (void)last;
    for (int k = 0; k < K; k++) {
        const float s = bf16_to_float(S[k / G]), z = bf16_to_float(Z[k / G]);
        o[k] = float_to_bf16((float)(lb_get(q, bits, k) - half) * s + z);
    }
#endif
}

// Q uint8 [N, K*bits/8], S, Z bf16 [N, K/G] -> out bf16 [N, K] (same conditions as gemv_lowbit; any CPU).
void dequant_lowbit(const uint8_t *Q, const uint16_t *S, const uint16_t *Z, int N, int K, int G, int bits,
                    uint16_t *out, int threads) {
    const long row_bytes = (long)K * bits / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++)
        lowbit_row(Q + n * row_bytes, S + (long)n * (K / G), Z + (long)n * (K / G), K, G, bits, n == N - 1,
                   out + (long)n * K);
}
