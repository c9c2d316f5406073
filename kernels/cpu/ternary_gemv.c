/* Ternary GEMV / GEMM on the CPU: y = X_int8 W^T with W in {-1, 0, 1}, 2-bit packed, exact int32 results.

   Build:  cc -O3 -shared -fPIC ternary_gemv.c -o libternary.so     (kernels/cpu_ternary.py does this)

   Packing (nanomodels/bitlinear.py pack_ternary): row n of W is ceil(K/4) bytes; byte j holds weights
   4j .. 4j+3, weight k at bits 2(k mod 4) .. 2(k mod 4)+1 as the code c = w + 1 in {0, 1, 2}.

   The identity both versions use:  sum_k w_k x_k = sum_k c_k x_k - sum_k x_k.

   Versions:
     1: ternary_gemm_scalar  one weight at a time: decode (byte >> 2(k mod 4)) & 3, multiply-add. Slower than a
                             float BLAS GEMV: decoding costs more than the bytes it saves.
     2: ternary_gemm_avx2    128 weights per step (32 bytes). One shift and one mask of the 32 bytes give the
                             codes of weights 4j + s (j = 0..31) for shift s; x is permuted once per row of X so
                             that those 32 activations are contiguous (O(K) work against O(NK)). Then
                             _mm256_maddubs_epi16 multiplies unsigned codes by signed int8 activations and adds
                             pairs into int16 (|sum| <= 4 * 2 * 2 * 128 = 2048 after the 4 shifts: no saturation),
                             _mm256_madd_epi16 widens to int32. Two rows of W share each activation load.
     3: bitlinear_f32        the whole BitLinear inference for float32 rows in one call: RMSNorm, the absmax int8
                             codes (round half to even, as torch.round), version 2 (or 1 without AVX2), and the two
                             rescales y = acc / s_x / s_W (the FAQ fuses RMSNorm with the activation quantization).
                             At the widths of a laptop model, one call instead of ~20 small tensor ops per layer.
   Torch-free; the AVX2 path is compiled with a target attribute and chosen at run time, so the file builds on
   any x86-64 (and on other CPUs without the AVX2 version). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline int32_t decode(const uint8_t *row, int64_t k) { return (row[k >> 2] >> (2 * (k & 3))) & 3; }

static int64_t sum_x(const int8_t *x, int64_t K) {
    int64_t s = 0;
    for (int64_t k = 0; k < K; k++) s += x[k];
    return s;
}

void ternary_gemm_scalar(const uint8_t *packed, const int8_t *X, int32_t *Y, int64_t M, int64_t N, int64_t K) {
    const int64_t row_bytes = (K + 3) / 4;
    for (int64_t m = 0; m < M; m++) {
        const int8_t *x = X + m * K;
        const int64_t sx = sum_x(x, K);
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = packed + n * row_bytes;
            int64_t acc = 0;
            for (int64_t k = 0; k < K; k++) acc += decode(row, k) * x[k];
            Y[m * N + n] = (int32_t)(acc - sx);
        }
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define PREFETCH 2048  /* bytes ahead on each row: the next pair of rows is already on its way */

int ternary_has_avx2(void) { return __builtin_cpu_supports("avx2"); }

__attribute__((target("avx2"))) static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* One 128-weight block of one row against the permuted activations xp[0..127]: 8 int32 partial sums. */
__attribute__((target("avx2"))) static inline __m256i block_dot(__m256i bytes, const __m256i xs[4]) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i s16 = _mm256_maddubs_epi16(_mm256_and_si256(bytes, mask), xs[0]);
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, 2), mask), xs[1]));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), xs[2]));
    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, 6), mask), xs[3]));
    return _mm256_madd_epi16(s16, ones);
}

__attribute__((target("avx2"))) void ternary_gemm_avx2(const uint8_t *packed, const int8_t *X, int32_t *Y,
                                                       int64_t M, int64_t N, int64_t K) {
    const int64_t row_bytes = (K + 3) / 4, blocks = K / 128, head = blocks * 128;
    int8_t *xp = (int8_t *)aligned_alloc(32, (size_t)(head > 0 ? head : 32));
    for (int64_t m = 0; m < M; m++) {
        const int8_t *x = X + m * K;
        const int32_t sx = (int32_t)sum_x(x, K);
        for (int64_t b = 0; b < head; b += 128)  /* xp[b + 32 s + j] = x[b + 4 j + s] */
            for (int s = 0; s < 4; s++)
                for (int j = 0; j < 32; j++) xp[b + 32 * s + j] = x[b + 4 * j + s];
        int64_t n = 0;
        for (; n + 1 < N; n += 2) {  /* two rows per pass: each activation vector is loaded once for both */
            const uint8_t *r0 = packed + n * row_bytes, *r1 = r0 + row_bytes;
            __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
            for (int64_t b = 0; b < blocks; b++) {
                _mm_prefetch((const char *)(r0 + 32 * b + PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(r1 + 32 * b + PREFETCH), _MM_HINT_T0);
                const __m256i xs[4] = {_mm256_load_si256((const __m256i *)(xp + 128 * b)),
                                       _mm256_load_si256((const __m256i *)(xp + 128 * b + 32)),
                                       _mm256_load_si256((const __m256i *)(xp + 128 * b + 64)),
                                       _mm256_load_si256((const __m256i *)(xp + 128 * b + 96))};
                acc0 = _mm256_add_epi32(acc0, block_dot(_mm256_loadu_si256((const __m256i *)(r0 + 32 * b)), xs));
                acc1 = _mm256_add_epi32(acc1, block_dot(_mm256_loadu_si256((const __m256i *)(r1 + 32 * b)), xs));
            }
            int32_t t0 = hsum(acc0), t1 = hsum(acc1);
            for (int64_t k = head; k < K; k++) {  /* the tail, K mod 128 weights */
                t0 += decode(r0, k) * x[k];
                t1 += decode(r1, k) * x[k];
            }
            Y[m * N + n] = t0 - sx;
            Y[m * N + n + 1] = t1 - sx;
        }
        for (; n < N; n++) {
            const uint8_t *r0 = packed + n * row_bytes;
            __m256i acc0 = _mm256_setzero_si256();
            for (int64_t b = 0; b < blocks; b++) {
                const __m256i xs[4] = {_mm256_load_si256((const __m256i *)(xp + 128 * b)),
                                       _mm256_load_si256((const __m256i *)(xp + 128 * b + 32)),
                                       _mm256_load_si256((const __m256i *)(xp + 128 * b + 64)),
                                       _mm256_load_si256((const __m256i *)(xp + 128 * b + 96))};
                acc0 = _mm256_add_epi32(acc0, block_dot(_mm256_loadu_si256((const __m256i *)(r0 + 32 * b)), xs));
            }
            int32_t t0 = hsum(acc0);
            for (int64_t k = head; k < K; k++) t0 += decode(r0, k) * x[k];
            Y[m * N + n] = t0 - sx;
        }
    }
    free(xp);
}
#else
int ternary_has_avx2(void) { return 0; }

void ternary_gemm_avx2(const uint8_t *packed, const int8_t *X, int32_t *Y, int64_t M, int64_t N, int64_t K) {
    ternary_gemm_scalar(packed, X, Y, M, N, K);
}
#endif

void bitlinear_f32(const float *X, const float *g, float eps, const uint8_t *packed, float w_scale, float *Y,
                   int64_t M, int64_t N, int64_t K) {
    float *h = (float *)malloc((size_t)K * sizeof(float));
    int8_t *q = (int8_t *)malloc((size_t)K);
    int32_t *acc = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    const int avx2 = ternary_has_avx2();
    for (int64_t m = 0; m < M; m++) {
        const float *x = X + m * K;
        float ss = 0.0f;
        for (int64_t k = 0; k < K; k++) ss += x[k] * x[k];
        const float r = 1.0f / sqrtf(ss / (float)K + eps);
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            h[k] = x[k] * r * g[k];
            amax = fmaxf(amax, fabsf(h[k]));
        }
        const float s = 127.0f / fmaxf(amax, 1e-5f);
        for (int64_t k = 0; k < K; k++) q[k] = (int8_t)fminf(fmaxf(nearbyintf(h[k] * s), -128.0f), 127.0f);
        if (avx2)
            ternary_gemm_avx2(packed, q, acc, 1, N, K);
        else
            ternary_gemm_scalar(packed, q, acc, 1, N, K);
        for (int64_t n = 0; n < N; n++) Y[m * N + n] = (float)acc[n] / s / w_scale;
    }
    free(h);
    free(q);
    free(acc);
}
