// Matrix-vector products for decoding: y[m, n] = sum_k x[m, k] * W[n, k] for a few rows m (1..16).
//
// Why this exists: at one to a few tokens a step, a linear layer is bound by reading W from memory once, and
// PyTorch's bf16 GEMM reaches only about half of this machine's bandwidth there (it is tuned for large M). Here
// every weight is loaded once and used for all rows m while it sits in a register.
//
// bf16 weights: AVX512-BF16 `vdpbf16ps` multiplies pairs of bf16 values exactly and accumulates in float32.
// Built at first use with the machine's compiler (-march=native); mixtral.kernels falls back to torch's own
// kernels, and says so, where this cannot be built or the CPU lacks AVX512-BF16.
#include <immintrin.h>
#include <stdint.h>

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
