/* tokenwave's CPU kernels for decoding on x86-64 CPUs with AVX-512 (VNNI): int4- and int8-weight
 * x int8-activation matrix products, and one query's attention over a bfloat16 KV cache.
 *
 * Compiled on first use by lm/cpu_kernels.py (gcc or clang, -fopenmp: the OpenMP runtime torch has
 * already loaded, so both share one thread pool); each call gets torch's thread count.
 *
 * -- int4 product --
 * y (M, N) = x (M, K) @ w.T where w (N, K) is stored per group of G inputs as
 * w = (q - 8) * s + z, q in [0, 15]. Each row of x is quantized per group to int8,
 * x ~ sx * xq (sx = max|x| / 127), so that a group's sum of q * x is sx * dot(q, xq), one
 * vpdpbusd per 4 inputs x 16 outputs. The product is split so that int8 rounding meets the
 * centred q - 8 (in [-8, 7]) and the zero meets the group's exact float sum of x:
 *   y += s * sx * (dot(q, xq) - 8 sum(xq)) + z * sum(x).
 *
 * Packed weight, per block of 16 outputs and per group (8 G + 64 bytes, blocks contiguous):
 *   G / 8 vectors of 64 bytes; byte 4 j + r of vector t holds, for output j of the block,
 *   q[g G + 4 t + r] in its low nibble and q[g G + 4 (t + G / 8) + r] in its high nibble;
 *   then the 16 scales s and the 16 zeros z as bfloat16.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16

static inline __m512 load_bf16(const uint8_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One group of G floats -> G int8, q ~ p / scale rounded half to even; returns the scale,
 * max|p| / 127 (NaN for a group holding inf or NaN, so that its products are NaN, as a float
 * product's would be); *qsum = sum(q). */
static inline float quantize_group(const float *p, int G, int8_t *q, int32_t *qsum) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int i = 0; i < G; i += 16) {
        __m512 v = _mm512_loadu_ps(p + i);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float a = nan ? NAN : _mm512_reduce_max_ps(amax);  /* max_ps drops NaN */
    __m512 inverse = _mm512_set1_ps(a > 0.0f && a <= FLT_MAX ? 127.0f / a : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < G; i += 16) {
        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + i), inverse));
        sum = _mm512_add_epi32(sum, r);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(r));
    }
    *qsum = _mm512_reduce_add_epi32(sum);
    return a <= FLT_MAX ? a / 127.0f : NAN;
}

/* Row m of x -> xq (K int8), and per group sx, sum(x) and -8 sx sum(xq). */
static void quantize_row(const float *x, int64_t K, int G, int8_t *xq, float *sx, float *xs, float *c) {
    for (int64_t g = 0; g < K / G; g++) {
        const float *p = x + g * G;
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < G; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(p + i));
        int32_t qsum;
        sx[g] = quantize_group(p, G, xq + g * G, &qsum);
        xs[g] = _mm512_reduce_add_ps(sum);
        c[g] = -8.0f * sx[g] * (float)qsum;
    }
}

/* Row x -> two int8 rows per group: x ~ sx xq + sr xr (xr: the rounding of the residual). */
static void quantize_row2(const float *x, int64_t K, int G, int8_t *xq, int8_t *xr, float *sx, float *sr) {
    float residual[128];
    int32_t unused;
    for (int64_t g = 0; g < K / G; g++) {
        const float *p = x + g * G;
        sx[g] = quantize_group(p, G, xq + g * G, &unused);
        __m512 s = _mm512_set1_ps(sx[g]);
        for (int i = 0; i < G; i += 16) {
            __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(xq + g * G + i))));
            _mm512_storeu_ps(residual + i, _mm512_fnmadd_ps(q, s, _mm512_loadu_ps(p + i)));
        }
        sr[g] = quantize_group(residual, G, xr + g * G, &unused);
    }
}

/* Rows m0 .. m0 + RB - 1 of y for one block of 16 outputs. */
static inline __attribute__((always_inline)) void block_rows(
        const uint8_t *w, int64_t K, int G, const int8_t *xq, const float *sx, const float *xs, const float *c,
        int64_t m0, const int RB, float *y, int64_t N, int64_t n0) {
    const int64_t groups = K / G, vectors = G / 8, group_bytes = 8 * (int64_t)G + 64;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 f[4];
    for (int r = 0; r < RB; r++) f[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = w + g * group_bytes;
        __m512i lo_acc[4], hi_acc[4];
        for (int r = 0; r < RB; r++) lo_acc[r] = hi_acc[r] = _mm512_setzero_si512();
        for (int64_t t = 0; t < vectors; t++) {
            __m512i v = _mm512_loadu_si512((const void *)(p + 64 * t));
            __m512i lo = _mm512_and_si512(v, low);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            for (int r = 0; r < RB; r++) {
                const int8_t *q = xq + (m0 + r) * K + g * G;
                int32_t a, b;
                memcpy(&a, q + 4 * t, 4);
                memcpy(&b, q + 4 * (t + vectors), 4);
                lo_acc[r] = _mm512_dpbusd_epi32(lo_acc[r], lo, _mm512_set1_epi32(a));
                hi_acc[r] = _mm512_dpbusd_epi32(hi_acc[r], hi, _mm512_set1_epi32(b));
            }
        }
        __m512 s = load_bf16(p + 8 * (int64_t)G), z = load_bf16(p + 8 * (int64_t)G + 32);
        for (int r = 0; r < RB; r++) {
            int64_t i = (m0 + r) * groups + g;
            __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_acc[r], hi_acc[r]));
            __m512 t = _mm512_fmadd_ps(dot, _mm512_set1_ps(sx[i]), _mm512_set1_ps(c[i]));
            f[r] = _mm512_fmadd_ps(s, t, f[r]);
            f[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[i]), f[r]);
        }
    }
    for (int r = 0; r < RB; r++) _mm512_storeu_ps(y + (m0 + r) * N + n0, f[r]);
}

int tw_int4_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* y = x @ w.T. Returns 0, -1 for shapes it does not take, -2 when out of memory. */
int tw_int4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int G, float *y,
                   int threads) {
    if (G % 16 || K % G || N % BLOCK || M <= 0) return -1;
    uint8_t *scratch = malloc(M * K + 12 * M * (K / G));
    if (!scratch) return -2;
    int8_t *xq = (int8_t *)scratch;
    const int64_t groups = K / G;
    float *sx = (float *)(scratch + M * K), *xs = sx + M * groups, *c = xs + M * groups;
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, G, xq + m * K, sx + m * groups, xs + m * groups, c + m * groups);
    const int64_t blocks = N / BLOCK, block_bytes = (K / G) * (8 * (int64_t)G + 64);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) block_rows(wb, K, G, xq, sx, xs, c, m0, 4, y, N, b * BLOCK);
        switch (M - m0) {
            case 3: block_rows(wb, K, G, xq, sx, xs, c, m0, 3, y, N, b * BLOCK); break;
            case 2: block_rows(wb, K, G, xq, sx, xs, c, m0, 2, y, N, b * BLOCK); break;
            case 1: block_rows(wb, K, G, xq, sx, xs, c, m0, 1, y, N, b * BLOCK); break;
            default: break;
        }
    }
    free(scratch);
    return 0;
}

/* -- int8 product --
 * y (M, N) = x (M, K) @ w.T with w = q * s (q int8, one float scale s per output). Each row of
 * x is quantized per group of G twice: x ~ sx xq + sr xr, xr the int8 rounding of the residual
 * x - sx xq (so the activations carry ~15 bits: int8 weights are accurate enough for a single
 * int8 rounding of x to dominate their error); the two halves are multiplied as two rows and
 * summed. vpdpbusd multiplies unsigned by signed bytes, so the activations go in as xq + 128
 * and each group subtracts 128 sum(q) (stored with the weights):
 *   y = s * sum_g sx_g * (dot(xq + 128, q) - 128 sum(q)) + (the same for xr).
 * Packed weight, per block of 16 outputs and per group (16 G + 64 bytes): G / 4 vectors of
 * 64 bytes (byte 4 j + r of vector t: q[j][g G + 4 t + r]), then the 16 int32 sums of q.
 */
static inline __attribute__((always_inline)) void block_rows8(
        const uint8_t *w, int64_t K, int G, const int8_t *xq, const float *sx, int64_t m0, const int RB,
        const float *scale, float *y, int64_t N, int64_t n0) {
    const int64_t groups = K / G, vectors = G / 4, group_bytes = 16 * (int64_t)G + 64;
    __m512 f[4];
    for (int r = 0; r < RB; r++) f[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = w + g * group_bytes;
        __m512i even[4], odd[4];
        for (int r = 0; r < RB; r++) even[r] = odd[r] = _mm512_setzero_si512();
        for (int64_t t = 0; t < vectors; t += 2) {
            __m512i v0 = _mm512_loadu_si512((const void *)(p + 64 * t));
            __m512i v1 = _mm512_loadu_si512((const void *)(p + 64 * t + 64));
            for (int r = 0; r < RB; r++) {
                const int8_t *q = xq + (m0 + r) * K + g * G + 4 * t;
                int32_t a, b;
                memcpy(&a, q, 4);
                memcpy(&b, q + 4, 4);
                even[r] = _mm512_dpbusd_epi32(even[r], _mm512_set1_epi32(a ^ (int32_t)0x80808080), v0);
                odd[r] = _mm512_dpbusd_epi32(odd[r], _mm512_set1_epi32(b ^ (int32_t)0x80808080), v1);
            }
        }
        __m512i correction = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(p + 16 * (int64_t)G)), 7);
        for (int r = 0; r < RB; r++) {
            __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(even[r], odd[r]), correction);
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sx[(m0 + r) * groups + g]), f[r]);
        }
    }
    __m512 s = _mm512_loadu_ps(scale + n0);
    for (int r = 0; r < RB; r++) _mm512_storeu_ps(y + (m0 + r) * N + n0, _mm512_mul_ps(f[r], s));
}

/* y = x @ w.T (G a multiple of 16, K of G). Returns 0, -1 for shapes it does not take, -2 when out of memory. */
int tw_int8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scale, int64_t N, int G,
                   float *y, int threads) {
    if (G % 16 || G > 128 || K % G || N % BLOCK || M <= 0) return -1;
    const int64_t groups = K / G, R = 2 * M;  /* rows 2 m and 2 m + 1: the halves of row m */
    uint8_t *scratch = malloc(R * K + 4 * R * groups + 4 * R * N);
    if (!scratch) return -2;
    int8_t *xq = (int8_t *)scratch;
    float *sx = (float *)(scratch + R * K), *halves = sx + R * groups;
    for (int64_t m = 0; m < M; m++)
        quantize_row2(x + m * K, K, G, xq + 2 * m * K, xq + (2 * m + 1) * K, sx + 2 * m * groups,
                      sx + (2 * m + 1) * groups);
    const int64_t blocks = N / BLOCK, block_bytes = groups * (16 * (int64_t)G + 64);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * block_bytes;
        int64_t m0 = 0;
        for (; m0 + 4 <= R; m0 += 4) block_rows8(wb, K, G, xq, sx, m0, 4, scale, halves, N, b * BLOCK);
        if (m0 < R) block_rows8(wb, K, G, xq, sx, m0, 2, scale, halves, N, b * BLOCK);
        for (int64_t m = 0; m < M; m++) {
            float *a = halves + 2 * m * N + b * BLOCK;
            _mm512_storeu_ps(y + m * N + b * BLOCK, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(a + N)));
        }
    }
    free(scratch);
    return 0;
}

/* -- decoding attention over a bfloat16 KV cache --
 * For each of the B H (batch, head) pairs: one float32 query q (D), keys and values k, v
 * (T, D) bfloat16 rows D apart, starting at b sb + h sh; mask (if any) is T bytes per batch row
 * (mask_sb apart; 0 = may not attend); D <= 256. out (D) = softmax(scale q.k) v, all in float32.
 * The query always sees at least one key (the caller's rule).
 */
static inline __m512 exp512(__m512 x) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    __mmask16 dead = _mm512_cmp_ps_mask(x, minus_inf, _CMP_EQ_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps((__mmask16)~dead, _mm512_scalef_ps(p, n));
}

/* Up to 16 bfloat16 values (the lanes set in m) as float32; the others 0. */
static inline __m512 load_bf16_masked(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, (const void *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

int tw_decode_attention(const float *q, int64_t B, int64_t H, int64_t D, const uint16_t *k, const uint16_t *v,
                        int64_t sb, int64_t sh, int64_t T, const uint8_t *mask, int64_t mask_sb, float scale,
                        float *out, int threads) {
    if (D <= 0 || D > 256 || T <= 0) return -1;
    float *scratch = malloc(sizeof(float) * B * H * T);
    if (!scratch) return -2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < B * H; i++) {
        const int64_t b = i / H, h = i % H, chunks = (D + 15) / 16;
        /* lanes of each 16-wide chunk of a row: all, but the last chunk's past D */
        __mmask16 lanes[16];
        for (int64_t c = 0; c < chunks; c++)
            lanes[c] = D - 16 * c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - 16 * c)) - 1);
        const float *qi = q + i * D;
        const uint16_t *kp = k + b * sb + h * sh, *vp = v + b * sb + h * sh;
        const uint8_t *m = mask ? mask + b * mask_sb : 0;
        float *s = scratch + i * T;
        __m512 qv[16];
        for (int64_t c = 0; c < chunks; c++)
            qv[c] = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes[c], qi + 16 * c), _mm512_set1_ps(scale));
        float top = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
            if (m && !m[t]) { s[t] = -INFINITY; continue; }
            __m512 acc = _mm512_mul_ps(qv[0], load_bf16_masked(kp + t * D, lanes[0]));
            for (int64_t c = 1; c < chunks; c++)
                acc = _mm512_fmadd_ps(qv[c], load_bf16_masked(kp + t * D + 16 * c, lanes[c]), acc);
            s[t] = _mm512_reduce_add_ps(acc);
            if (s[t] > top) top = s[t];
        }
        __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(top);
        int64_t t = 0;
        for (; t + 16 <= T; t += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), shift));
            _mm512_storeu_ps(s + t, e);
            total = _mm512_add_ps(total, e);
        }
        if (t < T) {
            __mmask16 tail = (__mmask16)((1u << (T - t)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + t), shift));
            _mm512_mask_storeu_ps(s + t, tail, e);
            total = _mm512_add_ps(total, e);
        }
        __m512 o[16];
        for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_setzero_ps();
        for (int64_t u = 0; u < T; u++) {
            if (s[u] == 0.0f) continue;  /* masked (or negligible) keys: skip their values */
            __m512 w = _mm512_set1_ps(s[u]);
            for (int64_t c = 0; c < chunks; c++)
                o[c] = _mm512_fmadd_ps(w, load_bf16_masked(vp + u * D + 16 * c, lanes[c]), o[c]);
        }
        __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        for (int64_t c = 0; c < chunks; c++)
            _mm512_mask_storeu_ps(out + i * D + 16 * c, lanes[c], _mm512_mul_ps(o[c], inverse));
    }
    free(scratch);
    return 0;
}
