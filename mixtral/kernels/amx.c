// One SwiGLU expert on AMX tiles: y = W2 · (silu(W1 · xᵀ) * (W3 · xᵀ)), for the tokens a MoE layer sends to it.
//
// Why this exists: torch's bf16 GEMM (oneDNN) runs the expert products at 128 tokens about as fast as a dense
// GEMM when the weights sit in the cache, but in a MoE layer every expert's 352 MB (Mixtral-8x7B) comes from
// memory and its AMX loops wait on it: the eight experts of a 512-token layer took 245 ms against 165 ms warm.
// Here the weight rows are the A operand, read in place (16 rows x 64 bytes a tile) while the hardware streams
// them, the next block's rows are prefetched a share at a time between the tile products, and the activations
// never leave the kernel: silu(gate) * up is computed from the accumulator tiles and written straight into the
// tile layout of the down projection's B operand. Xeon of 2026-12-01: the eight experts in 197 ms against
// 245 (docs/performance.md).
//
// Layout of a B operand (the activations, [K, N]) for tdpbf16ps: tiles of 16 "rows" of k pairs x 16 columns x
// 2 bf16, tile (nb, kb) at ((nb * KB) + kb) * 512 elements: B[kb*32 + 2r + j, nb*16 + c] at r*32 + c*2 + j.
// Built only where the compiler targets AMX (-march=native on such a CPU); elsewhere `amx_request` says no.
#include <stdint.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

// Linux hands out the 8 KB of tile state only to threads of a process that asked for it.
int amx_request(void) {
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

typedef struct { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

static void configure_tiles(void) {  // all eight tiles 16 rows x 64 bytes
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

// x [n, K] bf16 (row stride K) into B tiles of xᵀ [K, N]; columns n..N are zeros (N a multiple of 32).
static void pack_rows(const uint16_t *x, int n, int K, int N, uint16_t *bp) {
    int KB = K / 32;
    #pragma omp for schedule(static) collapse(2)
    for (int nb = 0; nb < N / 16; nb++)
        for (int kb = 0; kb < KB; kb++) {
            uint32_t *tile = (uint32_t *)(bp + ((long)nb * KB + kb) * 512);  // [16 r][16 c] of bf16 pairs
            for (int c = 0; c < 16; c++) {
                int row = nb * 16 + c;
                const uint32_t *src = (const uint32_t *)(x + (long)row * K + kb * 32);
                for (int r = 0; r < 16; r++) tile[r * 16 + c] = row < n ? src[r] : 0;
            }
        }
}

// e^x of 16 floats: 2^n (scalef) times 2^f, f in [-0.5, 0.5], by a degree-6 polynomial in f ln 2 (relative
// error ~2e-7, far below the bf16 the result is rounded to).
static inline __m512 exp16(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

static inline __m256i silu_mul(__m512 g, __m512 u) {  // silu(g) * u = g u / (1 + e^-g), rounded to bf16
    __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return (__m256i)_mm512_cvtneps_pbh(_mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(_mm512_set1_ps(1.f), e)));
}

// silu(gate) * up of one 16x16 tile pair (hidden units h0..h0+15, tokens of column tile nb) into the B tiles of
// the down projection (K = H): hidden units 2q and 2q+1 interleave into one 64-byte tile row.
static inline void silu_mul_to_tiles(const float *gate, const float *up, int h0, int nb, int KB2, uint16_t *bp2) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    uint16_t *tile = bp2 + ((long)nb * KB2 + h0 / 32) * 512;
    for (int q = 0; q < 8; q++) {
        __m256i even = silu_mul(_mm512_loadu_ps(gate + 2 * q * 16), _mm512_loadu_ps(up + 2 * q * 16));
        __m256i odd = silu_mul(_mm512_loadu_ps(gate + (2 * q + 1) * 16), _mm512_loadu_ps(up + (2 * q + 1) * 16));
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
        _mm512_storeu_si512(tile + ((h0 % 32) / 2 + q) * 32, _mm512_permutexvar_epi16(interleave, both));
    }
}

// AMX_PREFETCH=0 (MIXTRAL_KERNEL_CFLAGS=-DAMX_PREFETCH=0) builds without the software prefetch, for comparison.
#ifndef AMX_PREFETCH
#define AMX_PREFETCH 1  // blocks ahead
#endif
#ifndef AMX_PREFETCH_HINT
#define AMX_PREFETCH_HINT _MM_HINT_T0
#endif

// The `it`-th of `shares` parts of the cache lines of `rows` rows of `bytes` each (row stride `ld` elements).
static inline void prefetch_share(const uint16_t *base, long ld, int rows, long bytes, long it, long shares) {
    long per_row = bytes / 64, total = rows * per_row, per = (total + shares - 1) / shares;
    for (long l = it * per; l < (it + 1) * per && l < total; l++)
        _mm_prefetch((const char *)(base + (l / per_row) * ld) + (l % per_row) * 64, AMX_PREFETCH_HINT);
}

// C = W · B for `blocks` blocks of 32 weight rows: block i is rows [i*step, i*step + 16) and the 16 rows `pair`
// further on (the next 16 for a plain product; the matching up-projection rows for w13, so that gate and up
// meet in one block). W [*, K] bf16 row-major; B in tiles (bp, N columns). K is walked in chunks of `kc` tiles,
// outermost, so one chunk of B stays in L2 for all of W; partial sums wait in c [rows of W, N] float32. The last
// chunk stores into c (plain) or applies silu * up into bp2 (swiglu). Called inside an OpenMP parallel region.
static void tile_product(const uint16_t *w, int K, long step, long pair, int blocks, const uint16_t *bp, int N,
                         int kc, float *c, int swiglu, uint16_t *bp2, int H) {
    int KB = K / 32, NB = N / 16;
    float acc[4][256];
    for (int k0 = 0; k0 < KB; k0 += kc) {
        int k1 = k0 + kc < KB ? k0 + kc : KB, last = k1 == KB;
        long shares = (long)(NB / 2) * (k1 - k0);
        #pragma omp for schedule(static)
        for (int i = 0; i < blocks; i++) {
            const uint16_t *a0 = w + i * step * K, *a1 = a0 + pair * K;
            // A static schedule gives each thread consecutive blocks: prefetch the one it takes next.
            int ahead = AMX_PREFETCH && i + AMX_PREFETCH < blocks;
            for (int nb = 0; nb < NB; nb += 2) {
                float *c0 = c + i * step * N + nb * 16, *c1 = c0 + pair * N;
                if (k0 == 0) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                } else {
                    _tile_loadd(0, c0, N * 4); _tile_loadd(1, c0 + 16, N * 4);
                    _tile_loadd(2, c1, N * 4); _tile_loadd(3, c1 + 16, N * 4);
                }
                const uint16_t *b0 = bp + (long)nb * KB * 512, *b1 = b0 + (long)KB * 512;
                for (int kb = k0; kb < k1; kb++) {
                    if (ahead) {
                        long it = (long)(nb / 2) * (k1 - k0) + kb - k0;
                        long next = AMX_PREFETCH * step * K + k0 * 32;
                        prefetch_share(a0 + next, K, 16, (long)(k1 - k0) * 64, it, shares);
                        prefetch_share(a1 + next, K, 16, (long)(k1 - k0) * 64, it, shares);
                    }
                    _tile_loadd(4, a0 + kb * 32, K * 2);
                    _tile_loadd(5, a1 + kb * 32, K * 2);
                    _tile_loadd(6, b0 + kb * 512, 64);
                    _tile_loadd(7, b1 + kb * 512, 64);
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                }
                if (last && swiglu) {
                    _tile_stored(0, acc[0], 64); _tile_stored(1, acc[1], 64);
                    _tile_stored(2, acc[2], 64); _tile_stored(3, acc[3], 64);
                    silu_mul_to_tiles(acc[0], acc[2], (int)(i * step), nb, H / 32, bp2);
                    silu_mul_to_tiles(acc[1], acc[3], (int)(i * step), nb + 1, H / 32, bp2);
                } else {
                    _tile_stored(0, c0, N * 4); _tile_stored(1, c0 + 16, N * 4);
                    _tile_stored(2, c1, N * 4); _tile_stored(3, c1 + 16, N * 4);
                }
            }
        }
    }
}

// The expert on the n rows of x [n, dim]: y [dim, N] float32 (columns n..N padding), N = n rounded up to 32.
// w13 [2H, dim] (gate rows, then up rows), w2 [dim, H]. Scratch: bp1 dim*N and bp2 H*N bf16; partial 2H*N
// float32, used only when dim needs more than one chunk of `kc1` tiles. dim % 32 == 0, H % 32 == 0.
void amx_swiglu(const uint16_t *x, int n, int N, const uint16_t *w13, const uint16_t *w2, int dim, int H,
                float *y, uint16_t *bp1, uint16_t *bp2, float *partial, int kc1, int kc2, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        configure_tiles();
        pack_rows(x, n, dim, N, bp1);  // ends in a barrier, as every omp for here
        tile_product(w13, dim, 16, H, H / 16, bp1, N, kc1, partial, 1, bp2, H);
        tile_product(w2, H, 32, 16, dim / 32, bp2, N, kc2, y, 0, NULL, 0);
        _tile_release();
    }
}
#else
int amx_request(void) { return -1; }  // not compiled for AMX: mixtral.kernels uses torch's GEMM
#endif
