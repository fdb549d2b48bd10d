// int3 and int2 weights, group-wise: w[n, k] = (q[n, k] - H) * s[n, g] + z[n, g], H = 2^(bits-1), g = k / G,
// s and z bfloat16 [N, K/G], G in 16..128, K a multiple of 32 and of G.
//
// Layout (mixtral.kernels.packing, which is also the checkpoint's): each row of q is a little-endian bit stream,
// weight k in bits [bits * k, bits * k + bits) of the row's bytes; a row is K * bits / 8 bytes and each block of
// 32 weights 4 * bits whole bytes (int2: 4 weights a byte, LSB first; int3: 8 weights in 3 bytes).
//
// gemv_lowbit: few rows of x (decoding), AVX512-BF16. A block of 32 weights is unpacked to 32 bf16 lanes in 4
// instructions: one 16-byte broadcast of the block into the four 128-bit lanes, a byte shuffle giving each 16-bit
// lane the two bytes that hold its weight, a per-lane shift (vpsrlvw), and (v & mask) | 0x4300, which makes the
// bf16 number 128 + q exactly (as gemv_int4). Then, per group, one `vdpbf16ps` per row of x accumulates
// sum (128 + q) x exactly in float32, scaled by s once per group; the constant part comes back through the
// group sums of x: y = sum_g s_g sum_k (128 + q_k) x_k + sum_g (z_g - (128 + H) s_g) X_g, X_g = sum_{k in g} x_k
// (the caller computes X). For G = 16 a block spans two groups: its dot product's float lanes 0-7 hold the
// first 16 weights and lanes 8-15 the next 16, so one vector of the two scales serves both.
//
// dequant_lowbit: the bf16 weight [N, K] for products with many rows, bit for bit what the torch reference
// (packing.dequantize_lowbit) rounds to: each group's 2^bits values computed in float32 and rounded to nearest
// even once, and the weights looked up by their q (vpermw). Plain C where the CPU lacks AVX512-BF16.
#include <stdint.h>
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

// sum_g (z_g - c s_g) X[m, g] for one weight row, c = 128 + H: the constant part of every weight, 16 groups a step.
static inline float lb_offsets(const uint16_t *s, const uint16_t *z, const float *X, int groups, float c) {
    __m512 acc = _mm512_setzero_ps();
    const __m512 cv = _mm512_set1_ps(c);
    for (int g = 0; g < groups; g += 16) {
        __mmask16 k = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        __m512 sv = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, s + g)), 16));
        __m512 zv = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, z + g)), 16));
        acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(cv, sv, zv), _mm512_maskz_loadu_ps(k, X + g), acc);
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
            y[(long)m * ldy + n] = _mm512_reduce_add_ps(total0[m]) + lb_offsets(s0, Z + (long)n * groups, X, groups, c);
            if (nb == 2)
                y[(long)m * ldy + n + 1] = _mm512_reduce_add_ps(total1[m])
                                           + lb_offsets(s1, Z + (long)(n + 1) * groups, X, groups, c);
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

// x bf16 [M, K]; X float32 [M, K/G] (x's sums per group); Q uint8 [N, K*bits/8]; S, Z bf16 [N, K/G]; y float32
// [M, N]. K a multiple of 32 and of G; G 16, 32, 64 or 128; bits 2 or 3 (the caller checks). Rows of W are split
// between threads in blocks of 64.
void gemv_lowbit(const uint16_t *x, const float *X, int M, const uint8_t *Q, const uint16_t *S, const uint16_t *Z,
                 int N, int K, int G, int bits, float *y, int threads) {
    const int block = 64;
    int blocks = (N + block - 1) / block;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
        if (bits == 3) {
            LB_ROWS(3)
        } else {
            LB_ROWS(2)
        }
    }
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
