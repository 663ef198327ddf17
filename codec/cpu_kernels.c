/* tokenwave's CPU kernels for the codec's time-major runner (x86-64, AVX-512F): the elementwise
 * passes between its convolutions, fused.
 *
 * Compiled on first use by codec/native.py (gcc or clang, -fopenmp: the OpenMP runtime torch has
 * already loaded); each call gets torch's thread count.
 *
 * Activations are (B, T, C) float32, each item's T x C plane contiguous (items may be apart, as
 * the middle of a padded buffer is). GroupNorm(1, C) normalizes a plane by its mean and variance
 * and then applies a per-channel affine, so a normalized plane is x * a[c] + d[c] with a, d per
 * (item, channel): tw_moments gives the plane's sums, and tw_affine_elu applies the affine, a
 * residual sum and the ELU that follows in one pass (torch takes three to five: layer norm with an
 * expanded affine, add, ELU).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

int tw_codec_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* sum and sum of squares of each item's n floats, in double: out[2 b], out[2 b + 1]. */
#define CHUNK 16384
int tw_moments(const float *x, int64_t batch, int64_t n, int64_t x_stride, double *out, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *partial = malloc(sizeof(double) * 2 * (size_t)(batch * chunks + 1));
    if (!partial) return -2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t k = 0; k < chunks; k++) {
            const float *p = x + b * x_stride + k * CHUNK;
            int64_t m = (k + 1) * CHUNK <= n ? CHUNK : n - k * CHUNK;
            __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
            __m512d q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
            int64_t i = 0;
            for (; i + 16 <= m; i += 16) {
                __m512 v = _mm512_loadu_ps(p + i);
                __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
                s0 = _mm512_add_pd(s0, lo);
                s1 = _mm512_add_pd(s1, hi);
                q0 = _mm512_fmadd_pd(lo, lo, q0);
                q1 = _mm512_fmadd_pd(hi, hi, q1);
            }
            double s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
            double q = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
            for (; i < m; i++) {
                s += p[i];
                q += (double)p[i] * p[i];
            }
            partial[2 * (b * chunks + k)] = s;
            partial[2 * (b * chunks + k) + 1] = q;
        }
    }
    for (int64_t b = 0; b < batch; b++) {
        double s = 0, q = 0;
        for (int64_t k = 0; k < chunks; k++) {
            s += partial[2 * (b * chunks + k)];
            q += partial[2 * (b * chunks + k) + 1];
        }
        out[2 * b] = s;
        out[2 * b + 1] = q;
    }
    free(partial);
    return 0;
}

/* expm1(x) for x <= 0, within ~1 ulp: x = n ln2 + r (|r| <= ln2 / 2, Cody-Waite), expm1(r) by its
 * Taylor series to r^7 (remainder < 2e-8 relative), expm1(x) = 2^n expm1(r) + (2^n - 1), where
 * 2^n - 1 is exact for the n that occur (>= -44 after the clamp, where expm1 is -1 in float). */
static inline __m512 expm1_nonpositive(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-30.0f));
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
    __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r); /* expm1(r) */
    __m512 scale = _mm512_scalef_ps(one, n);                /* 2^n */
    return _mm512_fmadd_ps(scale, e, _mm512_sub_ps(scale, one));
}

/* out = f(x * a + add * e + d) per item b, row t, channel c, where a, d, e are per (b, c) (NULL:
 * 1, 0, 1), add is NULL or laid out as x, and f is ELU(alpha) when elu is set, else identity.
 * Strides are between items, in floats; rows are C floats apart in every tensor. NaN stays NaN. */
int tw_affine_elu(const float *x, int64_t batch, int64_t rows, int64_t channels, int64_t x_stride,
                  const float *a, const float *d, const float *add, const float *e, int64_t add_stride,
                  int elu, float alpha, float *out, int64_t out_stride, int threads) {
    const int64_t ROWS = 64;
    int64_t chunks = (rows + ROWS - 1) / ROWS;
    const __m512 zero = _mm512_setzero_ps(), alpha_v = _mm512_set1_ps(alpha);
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t k = 0; k < chunks; k++) {
            int64_t end = (k + 1) * ROWS < rows ? (k + 1) * ROWS : rows;
            const float *ab = a ? a + b * channels : NULL, *db = d ? d + b * channels : NULL;
            const float *eb = e ? e + b * channels : NULL;
            for (int64_t t = k * ROWS; t < end; t++) {
                const float *xr = x + b * x_stride + t * channels;
                const float *addr = add ? add + b * add_stride + t * channels : NULL;
                float *outr = out + b * out_stride + t * channels;
                for (int64_t c = 0; c < channels; c += 16) {
                    __mmask16 m = channels - c >= 16 ? 0xFFFF : (__mmask16)((1u << (channels - c)) - 1);
                    __m512 v = _mm512_maskz_loadu_ps(m, xr + c);
                    if (ab) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, ab + c));
                    if (db) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, db + c));
                    if (addr) {
                        __m512 w = _mm512_maskz_loadu_ps(m, addr + c);
                        v = eb ? _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, eb + c), v) : _mm512_add_ps(v, w);
                    }
                    if (elu) {
                        __mmask16 negative = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
                        if (negative)
                            v = _mm512_mask_mul_ps(v, negative, alpha_v, expm1_nonpositive(v));
                    }
                    _mm512_mask_storeu_ps(outr + c, m, v);
                }
            }
        }
    }
    return 0;
}

/* -- LSTM recurrence --
 * One layer of torch's LSTM (gates i, f, g, o) over T steps for B sequences, given the input
 * projections gin (T, B, 4H) = x W_ih^T + b_ih + b_hh (one matrix product, done by torch).
 * Each step is a matrix-vector product with W_hh (4H x H): 16 MB at H = 1024, read from the
 * L3 cache once per step for up to 6 sequences. Each thread owns a range of 16-unit blocks (their
 * four gates' rows) and writes their new state; a barrier ends the step. State h, c (B, H) in
 * and out; hnext (B, H) is a work buffer. */
static inline __m512 exp_nonpositive(__m512 x) { /* exp(x) for x <= 0 via expm1 */
    return _mm512_add_ps(expm1_nonpositive(x), _mm512_set1_ps(1.0f));
}

/* sigmoid and tanh from expm1 of -|x| (relative accuracy near 0 and in both tails) */
static inline __m512 sigmoid_ps(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 z = _mm512_abs_ps(x);
    __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), z)); /* exp(-|x|) */
    __m512 d = _mm512_add_ps(one, p);
    __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_div_ps(_mm512_mask_blend_ps(negative, one, p), d);
}

static inline __m512 tanh_ps(__m512 x) {
    __m512 z = _mm512_abs_ps(x);
    __m512 e = expm1_nonpositive(_mm512_mul_ps(z, _mm512_set1_ps(-2.0f))); /* in (-1, 0] */
    __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), e), _mm512_add_ps(e, _mm512_set1_ps(2.0f)));
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

/* Packed W_hh: per block of 16 hidden units, per input k, the 4 gates' 16 weights (256 bytes),
 * so that a step is 16-wide multiply-adds of weight vectors by broadcast h[k], no reductions. */
static inline __attribute__((always_inline)) void lstm_block(
        const float *packed, const float *h, int64_t H, int64_t blk, int64_t b0, int nb, const float *gin_t,
        float *c, float *next, float *out_t) {
    __m512 acc[6][4];
    for (int b = 0; b < nb; b++)
        for (int g = 0; g < 4; g++) acc[b][g] = _mm512_setzero_ps();
    const float *w = packed + blk * H * 64;
    for (int64_t k = 0; k < H; k++, w += 64) {
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
        __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
        for (int b = 0; b < nb; b++) {
            __m512 hk = _mm512_set1_ps(h[(b0 + b) * H + k]);
            acc[b][0] = _mm512_fmadd_ps(w0, hk, acc[b][0]);
            acc[b][1] = _mm512_fmadd_ps(w1, hk, acc[b][1]);
            acc[b][2] = _mm512_fmadd_ps(w2, hk, acc[b][2]);
            acc[b][3] = _mm512_fmadd_ps(w3, hk, acc[b][3]);
        }
    }
    int64_t u = blk * 16;
    for (int b = 0; b < nb; b++) {
        const float *gb = gin_t + (b0 + b) * 4 * H + u;
        __m512 i = sigmoid_ps(_mm512_add_ps(acc[b][0], _mm512_loadu_ps(gb)));
        __m512 f = sigmoid_ps(_mm512_add_ps(acc[b][1], _mm512_loadu_ps(gb + H)));
        __m512 g = tanh_ps(_mm512_add_ps(acc[b][2], _mm512_loadu_ps(gb + 2 * H)));
        __m512 o = sigmoid_ps(_mm512_add_ps(acc[b][3], _mm512_loadu_ps(gb + 3 * H)));
        float *cb = c + (b0 + b) * H + u;
        __m512 cv = _mm512_fmadd_ps(f, _mm512_loadu_ps(cb), _mm512_mul_ps(i, g));
        _mm512_storeu_ps(cb, cv);
        __m512 hv = _mm512_mul_ps(o, tanh_ps(cv));
        _mm512_storeu_ps(next + (b0 + b) * H + u, hv);
        _mm512_storeu_ps(out_t + (b0 + b) * H + u, hv);
    }
}

int tw_lstm_layer(const float *gin, int64_t T, int64_t B, int64_t H, const float *packed, float *h, float *c,
                  float *hnext, float *out, int threads) {
    if (H % 16) return -1;
#pragma omp parallel num_threads(threads)
    {
        int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        int64_t blocks = H / 16;
        int64_t first = blocks * tid / nth, last = blocks * (tid + 1) / nth;
        float *cur = h, *next = hnext;
        for (int64_t t = 0; t < T; t++) {
            const float *gin_t = gin + t * B * 4 * H;
            float *out_t = out + t * B * H;
            for (int64_t blk = first; blk < last; blk++) {
                for (int64_t b0 = 0; b0 < B; b0 += 6) {
                    switch (B - b0 < 6 ? (int)(B - b0) : 6) {
                    case 6: lstm_block(packed, cur, H, blk, b0, 6, gin_t, c, next, out_t); break;
                    case 5: lstm_block(packed, cur, H, blk, b0, 5, gin_t, c, next, out_t); break;
                    case 4: lstm_block(packed, cur, H, blk, b0, 4, gin_t, c, next, out_t); break;
                    case 3: lstm_block(packed, cur, H, blk, b0, 3, gin_t, c, next, out_t); break;
                    case 2: lstm_block(packed, cur, H, blk, b0, 2, gin_t, c, next, out_t); break;
                    default: lstm_block(packed, cur, H, blk, b0, 1, gin_t, c, next, out_t); break;
                    }
                }
            }
            float *swap = cur;
            cur = next;
            next = swap;
#pragma omp barrier
        }
        if (cur != h && tid == 0) memcpy(h, cur, sizeof(float) * (size_t)(B * H));
    }
    return 0;
}
