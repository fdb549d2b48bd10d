// One SwiGLU expert on AMX tiles: y = W2 · (silu(W1 · xᵀ) * (W3 · xᵀ)), for the tokens a MoE layer sends to it.
//
// Why this exists: torch's bf16 GEMM (oneDNN) runs the expert products at 128 tokens about as fast as a dense
// GEMM when the weights sit in the cache, but in a MoE layer every expert's 352 MB (Mixtral-8x7B) comes from
// memory and its AMX loops wait on it: the eight experts of a 512-token layer took 248 ms against 174 ms warm.
// Here the weight rows are the A operand, read in place (16 rows x 64 bytes a tile), the next block's rows are
// prefetched into L1 a share at a time between the tile products, and the activations never leave the kernel:
// the expert's tokens are gathered from the layer's input, silu(gate) * up is computed from the accumulator
// tiles straight into the tile layout of the down projection's B operand, and the output is added, weighted by
// the gates, into the tokens' rows of the layer's output. Xeon of 2026-12-01, 128 rows each: the eight experts
// in 178 ms against 254 (mixtral bench amx-experts, docs/performance.md).
// Quantized experts (int8 per row, int4 group-wise) are expanded here too, a block of rows at a time straight
// into A tiles, between their prefetch and their products: the layer reads their bytes, not bf16's. Eight int4
// experts at 16 rows: 55 ms against 164 through their own kernels; at 128 rows about as fast as bf16.
//
// Layout of a B operand (the activations, [K, N]) for tdpbf16ps: tiles of 16 "rows" of k pairs x 16 columns x
// 2 bf16, tile (nb, kb) at ((nb * KB) + kb) * 512 elements: B[kb*32 + 2r + j, nb*16 + c] at r*32 + c*2 + j.
// The kernel is built only where the compiler targets AMX (-march=native on such a CPU); elsewhere `amx_request`
// says no. The structs of its arguments and `amx_call_layout` are built on every CPU.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// A weight for the products: bf16 [rows, K]; int8 [rows, K] with a bf16 scale per row (q, scale); or int4 in
// gemv.c's packing [rows, K/2] with bf16 scales and zeros [rows, K/group] (q, scale, zero, group). Quantized
// weights are expanded a slab of a block's rows at a time, between their prefetch and their products (SLAB_TILES).
typedef struct { const uint16_t *bf16; const void *q; const uint16_t *scale, *zero; int group; } weight;

// The arguments of one `amx_swiglu` call (see there); mirrored by mixtral/kernels/amx.py's ctypes Structures,
// which `amx_call_layout` lets it check.
typedef struct {
    const uint16_t *x; const int64_t *rows; const float *scale;  // the tokens and their gates
    int n, N, dim, H;
    float *out, *partial1, *partial2;
    uint16_t *bp1, *bp2;
    int kc1, kc2, threads;
    weight w13, w2;
} amx_call;

// sizeof(weight), offsetof each of its fields, sizeof(amx_call), offsetof each of its fields, in declaration
// order, into out[0..capacity); returns how many there are. Built on every CPU, so that the layout Python
// assumes is checked everywhere, not only where the kernel can run.
int amx_call_layout(int64_t *out, int capacity) {
    const int64_t layout[] = {
        sizeof(weight), offsetof(weight, bf16), offsetof(weight, q), offsetof(weight, scale),
        offsetof(weight, zero), offsetof(weight, group),
        sizeof(amx_call), offsetof(amx_call, x), offsetof(amx_call, rows), offsetof(amx_call, scale),
        offsetof(amx_call, n), offsetof(amx_call, N), offsetof(amx_call, dim), offsetof(amx_call, H),
        offsetof(amx_call, out), offsetof(amx_call, partial1), offsetof(amx_call, partial2),
        offsetof(amx_call, bp1), offsetof(amx_call, bp2), offsetof(amx_call, kc1), offsetof(amx_call, kc2),
        offsetof(amx_call, threads), offsetof(amx_call, w13), offsetof(amx_call, w2)};
    int count = (int)(sizeof layout / sizeof layout[0]);
    for (int i = 0; i < count && i < capacity; i++) out[i] = layout[i];
    return count;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>
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

// Rows rows[0..n) of x (row stride K; x's first n rows when rows is NULL) into B tiles of their transpose
// [K, N]; columns n..N are zeros (N a multiple of 16).
static void pack_rows(const uint16_t *x, const int64_t *rows, int n, int K, int N, uint16_t *bp) {
    int KB = K / 32;
    #pragma omp for schedule(static) collapse(2)
    for (int nb = 0; nb < N / 16; nb++)
        for (int kb = 0; kb < KB; kb++) {
            uint32_t *tile = (uint32_t *)(bp + ((long)nb * KB + kb) * 512);  // [16 r][16 c] of bf16 pairs
            for (int c = 0; c < 16; c++) {
                int t = nb * 16 + c;
                const uint32_t *src = t < n ? (const uint32_t *)(x + (rows ? rows[t] : t) * (long)K + kb * 32) : NULL;
                for (int r = 0; r < 16; r++) tile[r * 16 + c] = src ? src[r] : 0;
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
// It reaches one block ahead: two blocks ahead measured 195 against 173 ms (eight experts, 128 rows).
#ifndef AMX_PREFETCH
#define AMX_PREFETCH 1
#endif
#ifndef AMX_PREFETCH_HINT
#define AMX_PREFETCH_HINT "prefetcht0"  // into L1: the tile loads read from there (prefetcht1, into L2: 190 ms)
#endif

// The `it`-th of `shares` parts of the cache lines of `rows` rows of `bytes` each (row stride `ld` elements).
// An asm statement, not _mm_prefetch: GCC 12 deleted the whole loop of builtin prefetches once this was inlined
// into the tile loop (no instruction left in the library, and the experts 15% slower).
static inline void prefetch_share(const char *base, long ld, int rows, long bytes, long it, long shares) {
    long per_row = bytes / 64, total = rows * per_row, per = (total + shares - 1) / shares;
    long first = it * per, last = first + per < total ? first + per : total;
    if (first >= last) return;
    long row = first / per_row, line = first % per_row;
    for (long l = first; l < last; l++) {
        const char *p = base + row * ld + line * 64;
        __asm__ volatile(AMX_PREFETCH_HINT " (%0)" : : "r"(p));
        if (++line == per_row) {
            line = 0;
            row++;
        }
    }
}

// gemv.c's dequantizers into A tiles, one thread: 16 rows x K of an int8 weight (per-row bf16 scales) or of an
// int4 one (group-wise bf16 scales and zeros, whole groups).
void dequant_int8_tiles(const int8_t *Q, long ldq, const uint16_t *S, int K, uint16_t *out);
void dequant_int4_tiles(const uint8_t *Q, long ldq, const uint16_t *S, const uint16_t *Z, long lds, int K, int G,
                        uint16_t *out);

// Bytes of 32 consecutive weights of a row as stored.
static inline long tile_bytes(const weight *w) { return w->zero ? 16 : w->q ? 32 : 64; }

// Rows [r0, r0 + 16) of a quantized weight, K tiles [k0, k1), expanded into bf16 A tiles, one after the other
// (tile kb - k0 at (kb - k0) * 512), so that each tile load reads 1 KB in a row (see gemv.c's dequant_int4_tiles).
static void expand_tiles(const weight *w, int K, long r0, int k0, int k1, uint16_t *out) {
    int width = (k1 - k0) * 32;
    if (w->zero) {  // int4: chunks start and end on whole groups (kernels.amx_swiglu_add sizes them)
        long groups = K / w->group, g0 = (long)k0 * 32 / w->group;
        dequant_int4_tiles((const uint8_t *)w->q + r0 * (K / 2) + k0 * 16, K / 2, w->scale + r0 * groups + g0,
                          w->zero + r0 * groups + g0, groups, width, w->group, out);
    } else {
        dequant_int8_tiles((const int8_t *)w->q + r0 * K + k0 * 32, K, w->scale + r0, width, out);
    }
}

// out[rows[c]][d0 + r] += scale[c] * acc[r][c] for the columns c of one 16x16 accumulator tile that are real
// tokens (t0 + c < n): the expert's output for those tokens, weighted by their gates and added where they belong.
static inline void add_tile_to_rows(const float *acc, int d0, int t0, int n, const int64_t *rows,
                                    const float *scale, float *out, int dim) {
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (int c = 0; c < 16 && t0 + c < n; c++) {
        int t = t0 + c;
        __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(c)), acc, 4);
        if (scale) v = _mm512_mul_ps(v, _mm512_set1_ps(scale[t]));
        float *o = out + (rows ? rows[t] : t) * (long)dim + d0;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), v));
    }
}

// What the products do with a finished accumulator block (K fully summed).
typedef struct {
    int swiglu;  // 1: silu(gate) * up into the next product's B tiles; 0: add to the output rows
    uint16_t *bp2; int H;  // swiglu
    int n; const int64_t *rows; const float *scale; float *out; int dim;  // output
} finish;

// One block of 32 weight rows against column tiles nb and, when `two`, nb + 1: accumulators 0 and 2 (the block's
// two halves against tile nb), 1 and 3 (against nb + 1; with one column tile, the odd K tiles, see `accumulate`).
// They start at zero at the start of K (k0 == 0), else from the partial sums in c0 and c1. Inlined with `two`
// constant, so the inner loop has no branch on it.
static inline __attribute__((always_inline)) void begin_pass(int k0, float *c0, float *c1, int N, const int two) {
    if (k0 == 0) {
        _tile_zero(0); _tile_zero(2);
    } else {
        _tile_loadd(0, c0, N * 4); _tile_loadd(2, c1, N * 4);
    }
    if (two && k0 > 0) {
        _tile_loadd(1, c0 + 16, N * 4); _tile_loadd(3, c1 + 16, N * 4);
    } else {
        _tile_zero(1); _tile_zero(3);
    }
}

// The tile products of K tiles [k0, k1) into the accumulators. a0 and a1 hold K tiles [koff, ...), tile kb at
// (kb - koff) * a_step elements, row stride lda elements. Share it0 + kb - k0 of the next block's prefetch goes
// with K tile kb.
static inline __attribute__((always_inline)) void accumulate(
        const uint16_t *a0, const uint16_t *a1, long lda, long a_step, int koff, int KB, const uint16_t *bp, int nb,
        int k0, int k1, const char *next0, const char *next1, long next_ld, long next_bytes, long it0, long shares,
        const int two) {
    const uint16_t *b0 = bp + (long)nb * KB * 512, *b1 = b0 + (long)KB * 512;
    for (int kb = k0; kb < k1; kb++) {
        if (next0) {
            prefetch_share(next0, next_ld, 16, next_bytes, it0 + kb - k0, shares);
            prefetch_share(next1, next_ld, 16, next_bytes, it0 + kb - k0, shares);
        }
        _tile_loadd(4, a0 + (kb - koff) * a_step, lda * 2);
        _tile_loadd(5, a1 + (kb - koff) * a_step, lda * 2);
        _tile_loadd(6, b0 + kb * 512, 64);
        if (two) {
            _tile_loadd(7, b1 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        } else if (kb & 1) {
            // One column tile: the odd K tiles go to accumulators 1 and 3, so that four chains of tile products
            // are in flight instead of two, each waiting on the one before.
            _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(3, 5, 6);
        } else {
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
        }
    }
}

// dst[16 x 16] (row stride ld floats) = tile a + tile b, after a one-column-tile pass (its two sums of K tiles).
#define STORE_SUM(a, b, dst, ld)                                                                      \
    do {                                                                                              \
        float part_[2][256];                                                                          \
        _tile_stored(a, part_[0], 64);                                                                \
        _tile_stored(b, part_[1], 64);                                                                \
        for (int r_ = 0; r_ < 16; r_++)                                                               \
            _mm512_storeu_ps((dst) + r_ * (long)(ld), _mm512_add_ps(_mm512_loadu_ps(part_[0] + r_ * 16), \
                                                                    _mm512_loadu_ps(part_[1] + r_ * 16))); \
    } while (0)

// The accumulators of a pass into d0 and d1 (rows of 16 x N floats, column tile nb first), or, with d0 NULL
// (K fully summed), handed on: silu(gate) * up into the next product's B tiles, or added to the output rows.
static inline __attribute__((always_inline)) void end_pass(float *d0, float *d1, int N, int nb, int r0, long pair,
                                                           const finish *f, const int two) {
    if (d0) {
        if (two) {
            _tile_stored(0, d0, N * 4); _tile_stored(2, d1, N * 4);
            _tile_stored(1, d0 + 16, N * 4); _tile_stored(3, d1 + 16, N * 4);
        } else {
            STORE_SUM(0, 1, d0, N); STORE_SUM(2, 3, d1, N);
        }
        return;
    }
    float acc[4][256];
    if (two) {
        _tile_stored(0, acc[0], 64); _tile_stored(2, acc[2], 64);
        _tile_stored(1, acc[1], 64); _tile_stored(3, acc[3], 64);
    } else {
        STORE_SUM(0, 1, acc[0], 16); STORE_SUM(2, 3, acc[2], 16);
    }
    if (f->swiglu) {
        silu_mul_to_tiles(acc[0], acc[2], r0, nb, f->H / 32, f->bp2);
        if (two) silu_mul_to_tiles(acc[1], acc[3], r0, nb + 1, f->H / 32, f->bp2);
    } else {  // rows r0.. and r0 + pair.. of the output's dim, tokens of tiles nb (and nb + 1)
        for (int t = 0; t < 4; t++)
            if (two || !(t & 1))
                add_tile_to_rows(acc[t], r0 + (t >= 2 ? (int)pair : 0), (nb + (t & 1)) * 16, f->n, f->rows,
                                 f->scale, f->out, f->dim);
    }
}

// One pass of a block over K tiles [s0, s1): with `begin`, the accumulators from p0/p1 (or zero, when `load` is
// 0); the products; with `end`, `end_pass` into d0/d1 (or handed on, d0 NULL). Without them the sums stay in the
// tiles for the next call. Inlined with `two` constant.
static inline __attribute__((always_inline)) void block_pass(
        const uint16_t *a0, const uint16_t *a1, long lda, long a_step, int koff, int KB, const uint16_t *bp, int nb,
        int N, int s0, int s1, int begin, int load, float *p0, float *p1, int end, float *d0, float *d1, int r0,
        long pair, const finish *f, const char *next0, const char *next1, long next_ld, long next_bytes, long it0,
        long shares, const int two) {
    if (begin) begin_pass(load, p0, p1, N, two);
    accumulate(a0, a1, lda, a_step, koff, KB, bp, nb, s0, s1, next0, next1, next_ld, next_bytes, it0, shares, two);
    if (end) end_pass(d0, d1, N, nb, r0, pair, f, two);
}

// Quantized weights are expanded a slab of K tiles at a time (whole int4 groups) into `slab`, A tiles that
// stay in L1, and the block's passes over all its columns multiply each slab before the next is expanded; with
// several passes the block's partial sums wait in `held` ([32, N] floats) between slabs. Expanding a whole chunk
// into L2 first and multiplying it after, the tile loads waited on L2 behind the prefetches of the next block.
// Eight int4 experts, Xeon of 2026-12-01 (mixtral bench amx-experts): 16 rows 53-56 ms against 75, 64 rows
// 93-98 against 118, 128 rows 158-168 against 167-191; slabs of 16 tiles lose most of it (67, 126, 190). bf16
// weights copied into slabs the same way were slower than read in place (128 rows: 249 ms against 178): the
// copy waits on memory where the tile loads had waited on the prefetched lines.
#ifndef SLAB_TILES
#define SLAB_TILES 4        // one pass over the columns (up to 32 tokens)
#endif
#ifndef SLAB_TILES_WIDE
#define SLAB_TILES_WIDE 8   // several passes, each slab's partial sums stored and reloaded between them
#endif

static inline int slab_tiles(const weight *w, int passes) {
    int tiles = passes == 1 ? SLAB_TILES : SLAB_TILES_WIDE;
    return w->zero && w->group / 32 > tiles ? w->group / 32 : tiles;
}

// C = W · B for `blocks` blocks of 32 weight rows: block i is rows [i*step, i*step + 16) and the 16 rows `pair`
// further on (the next 16 for a plain product; the matching up-projection rows for w13, so that gate and up
// meet in one block). W [*, K] row-major (see `weight`); B in tiles (bp, N columns, N % 16 == 0). Each thread
// takes a contiguous range of blocks and walks K in chunks of `kc` tiles, outermost, so one chunk of B stays in
// L2 for all its weight rows; partial sums wait in c [rows of W, N] float32 (unused with one chunk; each
// block's stay with its thread, so chunks need no barrier). While it computes a block, a thread prefetches the
// next one it will read: the next block, or its first block's next chunk. The last chunk hands each block to
// `f`. Called inside an OpenMP parallel region; ends in a barrier.
static void tile_product(const weight *w, int K, long step, long pair, int blocks, const uint16_t *bp, int N,
                         int kc, float *c, const finish *f) {
    int KB = K / 32, NB = N / 16, passes = (NB + 1) / 2;
    int threads = omp_get_num_threads(), me = omp_get_thread_num();
    int share = blocks / threads, extra = blocks % threads;
    int b0 = me * share + (me < extra ? me : extra), b1 = b0 + share + (me < extra);
    long tb = tile_bytes(w), row_bytes = KB * tb;
    const char *base = w->q ? (const char *)w->q : (const char *)w->bf16;
    int st = slab_tiles(w, passes);
    uint16_t *slab = w->q ? aligned_alloc(64, (size_t)32 * st * 32 * 2) : NULL;  // 32 rows of one slab
    float *held = w->q && passes > 1 ? aligned_alloc(64, (size_t)32 * N * 4) : NULL;
    for (int k0 = 0; k0 < KB; k0 += kc) {
        int k1 = k0 + kc < KB ? k0 + kc : KB, last = k1 == KB;
        long shares = (long)passes * (k1 - k0);
        for (int i = b0; i < b1; i++) {
            const char *next0 = NULL, *next1 = NULL;
            long next_bytes = 0;
            if (AMX_PREFETCH && i + 1 < b1) {
                next0 = base + (i + 1) * step * row_bytes + k0 * tb;
                next_bytes = (long)(k1 - k0) * tb;
            } else if (AMX_PREFETCH && !last) {
                int k2 = k1 + kc < KB ? k1 + kc : KB;
                next0 = base + b0 * step * row_bytes + k1 * tb;
                next_bytes = (long)(k2 - k1) * tb;
            }
            if (next0) next1 = next0 + pair * row_bytes;
            int r0 = (int)(i * step);
            float *chunk0 = c + r0 * (long)N, *chunk1 = chunk0 + pair * N;  // the block's partial sums
            if (!w->q) {  // bf16: the weight rows are the A tiles, in place
                const uint16_t *a0 = w->bf16 + r0 * (long)K, *a1 = a0 + pair * K;
                for (int nb = 0; nb < NB; nb += 2) {
                    float *p0 = chunk0 + nb * 16, *p1 = chunk1 + nb * 16;
                    float *d0 = last ? NULL : p0, *d1 = last ? NULL : p1;
                    long it0 = (long)(nb / 2) * (k1 - k0);
                    if (nb + 1 < NB)
                        block_pass(a0, a1, K, 32, 0, KB, bp, nb, N, k0, k1, 1, k0, p0, p1, 1, d0, d1, r0, pair, f,
                                   next0, next1, row_bytes, next_bytes, it0, shares, 1);
                    else
                        block_pass(a0, a1, K, 32, 0, KB, bp, nb, N, k0, k1, 1, k0, p0, p1, 1, d0, d1, r0, pair, f,
                                   next0, next1, row_bytes, next_bytes, it0, shares, 0);
                }
                continue;
            }
            for (int s0 = k0; s0 < k1; s0 += st) {  // quantized: slab by slab, see SLAB_TILES
                int s1 = s0 + st < k1 ? s0 + st : k1, first = s0 == k0, final = s1 == k1;
                const uint16_t *a0 = slab, *a1 = slab + 16L * (s1 - s0) * 32;
                expand_tiles(w, K, r0, s0, s1, slab);
                expand_tiles(w, K, r0 + pair, s0, s1, slab + 16L * (s1 - s0) * 32);
                for (int nb = 0; nb < NB; nb += 2) {
                    // Partial sums come from the chunk's (or zero) at the first slab, from `held` after; they go
                    // to `held` until the last slab, then to the chunk's (or on, at the last chunk). With one
                    // pass they stay in the tiles from the first slab to the last.
                    float *h0 = held ? held + nb * 16 : NULL, *h1 = held ? h0 + 16L * N : NULL;
                    float *p0 = first ? chunk0 + nb * 16 : h0, *p1 = first ? chunk1 + nb * 16 : h1;
                    float *d0 = !final ? h0 : last ? NULL : chunk0 + nb * 16;
                    float *d1 = !final ? h1 : last ? NULL : chunk1 + nb * 16;
                    int begin = first || passes > 1, end = final || passes > 1, load = first ? k0 : 1;
                    long it0 = (s0 - k0) * (long)passes + (long)(nb / 2) * (s1 - s0);
                    if (nb + 1 < NB)
                        block_pass(a0, a1, 32, 512, s0, KB, bp, nb, N, s0, s1, begin, load, p0, p1, end, d0, d1, r0,
                                   pair, f, next0, next1, row_bytes, next_bytes, it0, shares, 1);
                    else
                        block_pass(a0, a1, 32, 512, s0, KB, bp, nb, N, s0, s1, begin, load, p0, p1, end, d0, d1, r0,
                                   pair, f, next0, next1, row_bytes, next_bytes, it0, shares, 0);
                }
            }
        }
    }
    free(slab);
    free(held);
    #pragma omp barrier
}

// out[rows[c]] += scale[c] * w2 · (silu(w1 · x[rows[c]]) * (w3 · x[rows[c]])) for c < n: one expert on the
// tokens the router sent it, added with their gate weights into the layer's float32 output [*, dim] (rows and
// scale may be NULL: x's first n rows, weight 1). w13 [2H, dim] (gate rows, then up rows), w2 [dim, H]; N = n
// rounded up to 16. Scratch: bp1 dim*N and bp2 H*N bf16; partial1 2H*N and partial2 dim*N float32, needed only
// when dim (kc1) or H (kc2) takes more than one chunk. dim % 32 == 0, H % 32 == 0. Each row of `rows` must
// differ (a token reaches an expert once): threads split the output by dim, not by token.
// Each weight is a `weight`: bf16 alone, or int8, or int4; an int4 weight's chunks (kc1, kc2 tiles) are whole
// groups.
void amx_swiglu(const amx_call *c) {
    finish to_hidden = {1, c->bp2, c->H, 0, NULL, NULL, NULL, 0};
    finish to_output = {0, NULL, 0, c->n, c->rows, c->scale, c->out, c->dim};
    #pragma omp parallel num_threads(c->threads)
    {
        configure_tiles();
        pack_rows(c->x, c->rows, c->n, c->dim, c->N, c->bp1);  // ends in a barrier, as every omp for here
        tile_product(&c->w13, c->dim, 16, c->H, c->H / 16, c->bp1, c->N, c->kc1, c->partial1, &to_hidden);
        tile_product(&c->w2, c->H, 32, 16, c->dim / 32, c->bp2, c->N, c->kc2, c->partial2, &to_output);
        _tile_release();
    }
}
#else
int amx_request(void) { return -1; }  // not compiled for AMX: mixtral.kernels uses torch's GEMM
#endif
