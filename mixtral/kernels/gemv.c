// Matrix-vector products for decoding: y[m, n] = sum_k x[m, k] * W[n, k] for a few rows m (1..16).
//
// Why this exists: at one to a few tokens a step, a linear layer is bound by reading W from memory once, and
// PyTorch's bf16 GEMM reaches only about half of this machine's bandwidth there (it is tuned for large M). Here
// every weight is loaded once and used for all rows m while it sits in a register.
//
// bf16 weights: AVX512-BF16 `vdpbf16ps` multiplies pairs of bf16 values exactly and accumulates in float32.
// Built at first use with the machine's compiler (-march=native); mixtral.kernels falls back to torch's own
// kernels, and says so, where this cannot be built or the CPU lacks AVX512-BF16. The dequantizers at the end are
// plain C (the compiler vectorizes them) and are built on every CPU.
#include <stdint.h>
#include <string.h>

#include "bf16.h"

// Software prefetch, into L2, of the weight rows this many rows ahead: the hardware prefetcher alone left the
// int4 kernel at 9.4 GB/s from a cold cache (its rows are 2 KB, short streams) and the bf16 one at 29; with it,
// 15.6 and 32.5 GB/s (2 threads, Xeon of 2026-12-01; mixtral bench cold-gemv). Distances 2-32 measured alike.
// PREFETCH_ROWS=0 (MIXTRAL_KERNEL_CFLAGS=-DPREFETCH_ROWS=0) builds without it, for that benchmark.
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif
#define PF PREFETCH_ROWS
#define PFB (PREFETCH_ROWS / 2)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#define MAX_ROWS 4   // rows of x held in registers at once: 4 weight rows x 4 accumulators + loads < 32 zmm

// y[m * ldy + n] for n in [n0, n1): x is [M, K] bf16 (row stride K), W is [N, K] bf16 (row stride K).
// Four weight rows at a time, so that each load of x serves four rows of W.
static void bf16_block(const uint16_t *x, int M, const uint16_t *W, int K, float *y, int ldy, int n0, int n1) {
    for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
        int mb = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
        const uint16_t *xm = x + (long)m0 * K;
        for (int n = n0; n < n1; n += 4) {
            int nb = n1 - n < 4 ? n1 - n : 4;
            __m512 acc[4][MAX_ROWS];
            for (int r = 0; r < 4; r++)
                for (int m = 0; m < MAX_ROWS; m++) acc[r][m] = _mm512_setzero_ps();
            const uint16_t *w[4];
            for (int r = 0; r < 4; r++) w[r] = W + (long)(n + (r < nb ? r : 0)) * K;  // short block: repeat row 0
            for (int k = 0; k < K; k += 32) {
                if (PFB)
                    for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w[r] + PFB * K + k), _MM_HINT_T1);
                __m512bh a0 = (__m512bh)_mm512_loadu_si512(w[0] + k);
                __m512bh a1 = (__m512bh)_mm512_loadu_si512(w[1] + k);
                __m512bh a2 = (__m512bh)_mm512_loadu_si512(w[2] + k);
                __m512bh a3 = (__m512bh)_mm512_loadu_si512(w[3] + k);
                for (int m = 0; m < mb; m++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + (long)m * K + k);
                    acc[0][m] = _mm512_dpbf16_ps(acc[0][m], a0, xv);
                    acc[1][m] = _mm512_dpbf16_ps(acc[1][m], a1, xv);
                    acc[2][m] = _mm512_dpbf16_ps(acc[2][m], a2, xv);
                    acc[3][m] = _mm512_dpbf16_ps(acc[3][m], a3, xv);
                }
            }
            for (int r = 0; r < nb; r++)
                for (int m = 0; m < mb; m++) y[(long)(m0 + m) * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]);
        }
    }
}

// K must be a multiple of 32 (the caller checks). Rows of W are split between threads in blocks of 64.
void gemv_bf16(const uint16_t *x, int M, const uint16_t *W, int N, int K, float *y, int threads) {
    const int block = 64;
    int blocks = (N + block - 1) / block;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
        bf16_block(x, M, W, K, y, N, n0, n1);
    }
}

// int4 weights, group-wise: w[n, k] = q[n, k] * s[n, g] + b[n, g] for k in group g (G weights, a multiple of 32);
// s in bfloat16.
// Packing: for each block of 32 weights, 16 bytes; byte i holds q[32j + i] (low nibble) and q[32j + 16 + i]
// (high nibble). A nibble q becomes the bf16 number 128 + q by OR-ing in the exponent bits of 128 (0x4300):
// exact, and one `vdpbf16ps` then multiplies 32 weights at once. This returns, per group, the scaled sums
//     y[m, n] = sum_g s[n, g] * sum_{k in g} (128 + q[n, k]) * x[m, k]
// and the caller adds sum_g (b[n, g] - 128 s[n, g]) * sum_{k in g} x[m, k], a small product done in torch.
// MB (rows of x) is a compile-time constant in each instance, so the accumulators stay in registers.
static inline __attribute__((always_inline)) void int4_rows(const uint16_t *xm, const int MB, const uint8_t *Q,
                                                            const uint16_t *S, int K, int G, float *y, int ldy,
                                                            int n0, int n1) {
    const __m256i low = _mm256_set1_epi16(0x000F);
    const __m512i magic = _mm512_set1_epi16(0x4300);
    const int groups = K / G;
    for (int n = n0; n < n1; n += 2) {
        int nb = n1 - n < 2 ? n1 - n : 2;
        const uint8_t *q0 = Q + (long)n * (K / 2), *q1 = Q + (long)(n + nb - 1) * (K / 2);
        const uint16_t *s0 = S + (long)n * groups, *s1 = S + (long)(n + nb - 1) * groups;
        __m512 total0[MAX_ROWS], total1[MAX_ROWS];
        for (int m = 0; m < MB; m++) { total0[m] = _mm512_setzero_ps(); total1[m] = _mm512_setzero_ps(); }
        for (int g = 0; g < groups; g++) {
            __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
            for (int m = 0; m < MB; m++) { acc0[m] = _mm512_setzero_ps(); acc1[m] = _mm512_setzero_ps(); }
            for (int k = g * G; k < (g + 1) * G; k += 32) {
                if (PF && (k & 127) == 0) {  // once per 64-byte line
                    _mm_prefetch((const char *)(q0 + PF * (K / 2) + k / 2), _MM_HINT_T1);
                    _mm_prefetch((const char *)(q1 + PF * (K / 2) + k / 2), _MM_HINT_T1);
                }
                __m256i b0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q0 + k / 2)));
                __m256i b1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q1 + k / 2)));
                __m512bh a0 = (__m512bh)_mm512_or_si512(_mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_and_si256(b0, low)), _mm256_srli_epi16(b0, 4), 1), magic);
                __m512bh a1 = (__m512bh)_mm512_or_si512(_mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_and_si256(b1, low)), _mm256_srli_epi16(b1, 4), 1), magic);
                for (int m = 0; m < MB; m++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + (long)m * K + k);
                    acc0[m] = _mm512_dpbf16_ps(acc0[m], a0, xv);
                    acc1[m] = _mm512_dpbf16_ps(acc1[m], a1, xv);
                }
            }
            __m512 sc0 = _mm512_set1_ps(bf16_to_float(s0[g])), sc1 = _mm512_set1_ps(bf16_to_float(s1[g]));
            for (int m = 0; m < MB; m++) {
                total0[m] = _mm512_fmadd_ps(sc0, acc0[m], total0[m]);
                total1[m] = _mm512_fmadd_ps(sc1, acc1[m], total1[m]);
            }
        }
        for (int m = 0; m < MB; m++) {
            y[(long)m * ldy + n] = _mm512_reduce_add_ps(total0[m]);
            if (nb == 2) y[(long)m * ldy + n + 1] = _mm512_reduce_add_ps(total1[m]);
        }
    }
}

// The same product, two blocks (64 weights, 32 bytes) per step, for G a multiple of 64. Widening 32 bytes to 32
// 16-bit lanes puts the low nibbles of both blocks in one register ((v & 15) | 0x4300, one ternary-logic op) and
// the high nibbles in another (v >> 4 | 0x4300): 5 instructions unpack 64 weights where `int4_rows` needs 14 (the
// unpacking, not memory, bounds that kernel). x must be given permuted to match, each 64 values as
// [0-15, 32-47, 16-31, 48-63] (`gemv_int4_pairs`' caller does it). Low and high halves accumulate separately so
// that one row of x still has four independent chains.
static inline __attribute__((always_inline)) void int4_rows_pairs(const uint16_t *xm, const int MB, const uint8_t *Q,
                                                                  const uint16_t *S, int K, int G, float *y,
                                                                  int ldy, int n0, int n1) {
    const __m512i low = _mm512_set1_epi16(0x000F);
    const __m512i magic = _mm512_set1_epi16(0x4300);
    const int groups = K / G;
    for (int n = n0; n < n1; n += 2) {
        int nb = n1 - n < 2 ? n1 - n : 2;
        const uint8_t *q0 = Q + (long)n * (K / 2), *q1 = Q + (long)(n + nb - 1) * (K / 2);
        const uint16_t *s0 = S + (long)n * groups, *s1 = S + (long)(n + nb - 1) * groups;
        __m512 total0[MAX_ROWS], total1[MAX_ROWS];
        for (int m = 0; m < MB; m++) { total0[m] = _mm512_setzero_ps(); total1[m] = _mm512_setzero_ps(); }
        for (int g = 0; g < groups; g++) {
            __m512 lo0[MAX_ROWS], hi0[MAX_ROWS], lo1[MAX_ROWS], hi1[MAX_ROWS];
            for (int m = 0; m < MB; m++) {
                lo0[m] = _mm512_setzero_ps(); hi0[m] = _mm512_setzero_ps();
                lo1[m] = _mm512_setzero_ps(); hi1[m] = _mm512_setzero_ps();
            }
            for (int k = g * G; k < (g + 1) * G; k += 64) {
                if (PF) {
                    _mm_prefetch((const char *)(q0 + PF * (K / 2) + k / 2), _MM_HINT_T1);
                    _mm_prefetch((const char *)(q1 + PF * (K / 2) + k / 2), _MM_HINT_T1);
                }
                __m512i v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q0 + k / 2)));
                __m512i v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q1 + k / 2)));
                __m512bh a0 = (__m512bh)_mm512_ternarylogic_epi32(v0, low, magic, 0xEA);  // (v & low) | magic
                __m512bh b0 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v0, 4), magic);
                __m512bh a1 = (__m512bh)_mm512_ternarylogic_epi32(v1, low, magic, 0xEA);
                __m512bh b1 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v1, 4), magic);
                for (int m = 0; m < MB; m++) {
                    __m512bh xa = (__m512bh)_mm512_loadu_si512(xm + (long)m * K + k);
                    __m512bh xb = (__m512bh)_mm512_loadu_si512(xm + (long)m * K + k + 32);
                    lo0[m] = _mm512_dpbf16_ps(lo0[m], a0, xa);
                    hi0[m] = _mm512_dpbf16_ps(hi0[m], b0, xb);
                    lo1[m] = _mm512_dpbf16_ps(lo1[m], a1, xa);
                    hi1[m] = _mm512_dpbf16_ps(hi1[m], b1, xb);
                }
            }
            __m512 sc0 = _mm512_set1_ps(bf16_to_float(s0[g])), sc1 = _mm512_set1_ps(bf16_to_float(s1[g]));
            for (int m = 0; m < MB; m++) {
                total0[m] = _mm512_fmadd_ps(sc0, _mm512_add_ps(lo0[m], hi0[m]), total0[m]);
                total1[m] = _mm512_fmadd_ps(sc1, _mm512_add_ps(lo1[m], hi1[m]), total1[m]);
            }
        }
        for (int m = 0; m < MB; m++) {
            y[(long)m * ldy + n] = _mm512_reduce_add_ps(total0[m]);
            if (nb == 2) y[(long)m * ldy + n + 1] = _mm512_reduce_add_ps(total1[m]);
        }
    }
}

#define INT4_DISPATCH(ROWS)                                                                             \
    for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {                                                          \
        const uint16_t *xm = x + (long)m0 * K;                                                          \
        float *ym = y + (long)m0 * ldy;                                                                 \
        switch (M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS) {                                                \
            case 1: ROWS(xm, 1, Q, S, K, G, ym, ldy, n0, n1); break;                                    \
            case 2: ROWS(xm, 2, Q, S, K, G, ym, ldy, n0, n1); break;                                    \
            case 3: ROWS(xm, 3, Q, S, K, G, ym, ldy, n0, n1); break;                                    \
            default: ROWS(xm, 4, Q, S, K, G, ym, ldy, n0, n1); break;                                   \
        }                                                                                               \
    }

static void int4_block(const uint16_t *x, int M, const uint8_t *Q, const uint16_t *S, int K, int G, float *y, int ldy,
                       int n0, int n1, int pairs) {
    if (pairs) {
        INT4_DISPATCH(int4_rows_pairs)
    } else {
        INT4_DISPATCH(int4_rows)
    }
}

// K and G multiples of 32, G divides K (the caller checks). x is bf16 [M, K]; Q is uint8 [N, K/2]; S bf16 [N, K/G].
// pairs: G is a multiple of 64 and x is permuted as `int4_rows_pairs` needs.
void gemv_int4(const uint16_t *x, int M, const uint8_t *Q, const uint16_t *S, int N, int K, int G, float *y,
               int threads, int pairs) {
    const int block = 64;
    int blocks = (N + block - 1) / block;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
        int4_block(x, M, Q, S, K, G, y, N, n0, n1, pairs);
    }
}
#endif  // AVX512-BF16

// ---- dequantizers: quantized weights -> bf16 [N, K], for products with many rows (prefill), where one GEMM on
// the bf16 weight beats any kernel that unpacks integers in its inner loop. AVX512 where the CPU has it (the plain
// loops do not vectorize: 1.5 ns a weight), plain C elsewhere; both compute (q - 8) * s, then + z, in float32 and
// round to nearest even, so they agree with each other and with mixtral.quant.dequantize_int4 bit for bit.

// int4 in gemv_int4's packing, w = (q - 8) * s[n, g] + z[n, g], s and z bf16 [N, K/G]. Each group's 16 possible
// values are computed once and its nibbles index them (vpermw): 7 instructions for 32 weights against 20
// converting each one, which matters where amx.c expands a block of rows between reading it and multiplying it.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
static inline __m512i int4_table(float s, float z) {  // the 16 bf16 values (q - 8) * s + z, q = 0..15
    const __m512 levels = _mm512_cvtepi32_ps(_mm512_setr_epi32(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7));
    return _mm512_castsi256_si512(
        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_mul_ps(levels, _mm512_set1_ps(s)), _mm512_set1_ps(z))));
}

static inline __m512i int4_unpack32(const uint8_t *q, __m512i table) {  // 16 bytes -> 32 bf16 weights
    __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    __m512i index = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, _mm256_set1_epi16(15))),
                                       _mm256_srli_epi16(bytes, 4), 1);
    return _mm512_permutexvar_epi16(index, table);
}
#endif

static void int4_row(const uint8_t *q, const uint16_t *S, const uint16_t *Z, int K, int G, uint16_t *o) {
    for (int g = 0; g < K / G; g++) {
        const float s = bf16_to_float(S[g]), z = bf16_to_float(Z[g]);
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
        const __m512i table = int4_table(s, z);
        for (int b = g * G; b < (g + 1) * G; b += 32) _mm512_storeu_si512(o + b, int4_unpack32(q + b / 2, table));
#else
        for (int b = g * G; b < (g + 1) * G; b += 32)
            for (int i = 0; i < 16; i++) {
                const uint8_t byte = q[b / 2 + i];
                o[b + i] = float_to_bf16((float)((byte & 15) - 8) * s + z);
                o[b + 16 + i] = float_to_bf16((float)((byte >> 4) - 8) * s + z);
            }
#endif
    }
}

void dequant_int4(const uint8_t *Q, const uint16_t *S, const uint16_t *Z, int N, int K, int G, uint16_t *out,
                  int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++)
        int4_row(Q + (long)n * (K / 2), S + (long)n * (K / G), Z + (long)n * (K / G), K, G, out + (long)n * K);
}

// int8, per output channel: w = q * s[n], s bf16 [N].
static void int8_row(const int8_t *q, float s, int K, uint16_t *o) {
    int k = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    for (; k + 16 <= K; k += 16) {
        __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k)))),
                                 _mm512_set1_ps(s));
        _mm256_storeu_si256((__m256i *)(o + k), (__m256i)_mm512_cvtneps_pbh(w));
    }
#endif
    for (; k < K; k++) o[k] = float_to_bf16((float)q[k] * s);
}

void dequant_int8(const int8_t *Q, const uint16_t *S, int N, int K, uint16_t *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) int8_row(Q + (long)n * K, bf16_to_float(S[n]), K, out + (long)n * K);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// For amx.c: 16 rows of K weights (int4: whole groups; int8: per-row scales), rows ldq bytes of Q and lds
// elements of S and Z apart (a block of columns of the whole weight, read in place),
// expanded into AMX A tiles, one after the other: tile t (weights 32t..32t+31 of the 16 rows) at t * 512, each
// row of it 64 bytes. Written tile by tile, so every store continues the one before: rows of an expanded block
// lie 8 KB apart for a 4096-wide weight, all in one set of L1, and the tile loads from such rows, or stores into
// tiles row by row, evicted each other (a 16-row int4 layer's tile loads took as long as its expansion).
void dequant_int4_tiles(const uint8_t *Q, long ldq, const uint16_t *S, const uint16_t *Z, long lds, int K, int G,
                        uint16_t *out) {
    __m512i table[16];
    for (int g = 0; g < K / G; g++) {
        for (int r = 0; r < 16; r++) table[r] = int4_table(bf16_to_float(S[r * lds + g]), bf16_to_float(Z[r * lds + g]));
        for (int b = g * G; b < (g + 1) * G; b += 32) {
            uint16_t *tile = out + (long)(b / 32) * 512;
            for (int r = 0; r < 16; r++) _mm512_storeu_si512(tile + r * 32, int4_unpack32(Q + r * ldq + b / 2, table[r]));
        }
    }
}

void dequant_int8_tiles(const int8_t *Q, long ldq, const uint16_t *S, int K, uint16_t *out) {
    __m512 scale[16];
    for (int r = 0; r < 16; r++) scale[r] = _mm512_set1_ps(bf16_to_float(S[r]));
    for (int b = 0; b < K; b += 32) {
        uint16_t *tile = out + (long)(b / 32) * 512;
        for (int r = 0; r < 16; r++) {
            const int8_t *q = Q + r * ldq + b;
            __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), scale[r]);
            __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))),
                                      scale[r]);
            _mm512_storeu_si512(tile + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}
#endif
