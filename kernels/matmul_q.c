/*
 * matmul_q.c: y = x · Wᵀ straight from the weights' storage type (F32, F16, Q8_0, Q4_0,
 * Q4_1), for the few activation rows of a decode step.
 *
 * A decode step is bound by reading the weights: FP32 weights cost 4 bytes per parameter,
 * Q4_1 blocks 0.625. Each worker takes a range of output rows, expands one weight row at a time
 * into an L1-resident FP32 buffer (exactly the values load-time dequantization produces), and
 * dots it with every activation row. AVX2/FMA/F16C code is picked at run time; the portable C
 * path is the reference and gives the same products (sums may differ in order).
 */
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

enum { MQ_MAX_K = 16384 };

bool krn_qtype_supported(krn_qtype_t type)
{
    return type == KRN_Q_F32 || type == KRN_Q_F16 || type == KRN_Q_Q8_0 ||
           type == KRN_Q_Q4_0 || type == KRN_Q_Q4_1;
}

size_t krn_qtype_row_bytes(krn_qtype_t type, int k)
{
    switch (type) {
    case KRN_Q_F32: return (size_t)k * 4;
    case KRN_Q_F16: return (size_t)k * 2;
    case KRN_Q_Q8_0: return (size_t)k / 32 * 34;
    case KRN_Q_Q4_0: return (size_t)k / 32 * 18;
    case KRN_Q_Q4_1: return (size_t)k / 32 * 20;
    default: return 0;
    }
}

static float h2f(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return fy_fp16_to_fp32(h);
}

/* Portable row expansion (the reference). */
static void row_to_f32_c(krn_qtype_t type, const uint8_t *p, int k, float *out)
{
    switch (type) {
    case KRN_Q_F32:
        memcpy(out, p, (size_t)k * 4);
        return;
    case KRN_Q_F16:
        for (int i = 0; i < k; i++)
            out[i] = h2f(p + 2 * i);
        return;
    case KRN_Q_Q8_0:
        for (int b = 0; b < k / 32; b++, p += 34) {
            float d = h2f(p);
            for (int j = 0; j < 32; j++)
                out[b * 32 + j] = d * (int8_t)p[2 + j];
        }
        return;
    case KRN_Q_Q4_0:
        for (int b = 0; b < k / 32; b++, p += 18) {
            float d = h2f(p);
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = d * ((int)(p[2 + j] & 0x0f) - 8);
                out[b * 32 + j + 16] = d * ((int)(p[2 + j] >> 4) - 8);
            }
        }
        return;
    case KRN_Q_Q4_1:
        for (int b = 0; b < k / 32; b++, p += 20) {
            float d = h2f(p), m = h2f(p + 2);
            for (int j = 0; j < 16; j++) {
                out[b * 32 + j] = d * (p[4 + j] & 0x0f) + m;
                out[b * 32 + j + 16] = d * (p[4 + j] >> 4) + m;
            }
        }
        return;
    }
}

static float dot_c(const float *a, const float *b, int k)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= k; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < k; i++)
        s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

#if defined(__x86_64__)
#define MQ_AVX2 __attribute__((target("avx2,fma,f16c")))

MQ_AVX2 static float h2f_avx2(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

MQ_AVX2 static void row_to_f32_avx2(krn_qtype_t type, const uint8_t *p, int k, float *out)
{
    if (type == KRN_Q_Q4_1 || type == KRN_Q_Q4_0) {
        size_t bs = type == KRN_Q_Q4_1 ? 20 : 18;
        const __m128i lo_mask = _mm_set1_epi8(0x0f);
        for (int b = 0; b < k / 32; b++, p += bs) {
            float d = h2f_avx2(p), m = type == KRN_Q_Q4_1 ? h2f_avx2(p + 2) : -8.0f * d;
            __m128i q = _mm_loadu_si128((const __m128i *)(const void *)(p + bs - 16));
            __m128i lo = _mm_and_si128(q, lo_mask);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), lo_mask);
            __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
            float *o = out + b * 32;
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm));
            _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm));
            _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm));
        }
        return;
    }
    if (type == KRN_Q_Q8_0) {
        for (int b = 0; b < k / 32; b++, p += 34) {
            __m256 vd = _mm256_set1_ps(h2f_avx2(p));
            float *o = out + b * 32;
            for (int j = 0; j < 4; j++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(const void *)(p + 2 + 8 * j));
                _mm256_storeu_ps(o + 8 * j,
                                 _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vd));
            }
        }
        return;
    }
    if (type == KRN_Q_F16) {
        int i = 0;
        for (; i + 8 <= k; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                          (const __m128i *)(const void *)(p + 2 * i))));
        for (; i < k; i++)
            out[i] = h2f(p + 2 * i);
        return;
    }
    row_to_f32_c(type, p, k, out);
}

MQ_AVX2 static float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One row by one row with four independent accumulators (FMA latency, not throughput, bounds
 * a single chain). */
MQ_AVX2 static float dot1_avx2(const float *w, const float *x, int k)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float r = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; i++)
        r += w[i] * x[i];
    return r;
}

/* Dots one weight row with up to 4 activation rows at once (the row is loaded once). */
MQ_AVX2 static void dot4_avx2(const float *w, const float *x, int ldx, int nx, int k, float *r)
{
    if (nx == 1) {
        r[0] = dot1_avx2(w, x, k);
        return;
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * (size_t)ldx, *x3 = x + 3 * (size_t)ldx;
    int i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 wv = _mm256_loadu_ps(w + i);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + i), a0);
        if (nx > 1)
            a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + i), a1);
        if (nx > 2)
            a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + i), a2);
        if (nx > 3)
            a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + i), a3);
    }
    r[0] = hsum(a0);
    if (nx > 1)
        r[1] = hsum(a1);
    if (nx > 2)
        r[2] = hsum(a2);
    if (nx > 3)
        r[3] = hsum(a3);
    for (; i < k; i++) {
        for (int j = 0; j < nx; j++)
            r[j] += w[i] * x[(size_t)j * ldx + i];
    }
}

static bool have_avx2(void)
{
    static int cached = -1; // a CPU property, the same for every caller
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c");
    }
    return cached == 1;
}
#else
static bool have_avx2(void)
{
    return false;
}
#endif

typedef struct {
    int m, k, ldx, ldy;
    const float *x;
    const krn_qmat_t *w;
    float *y;
    int accumulate;
    bool simd;
} mq_ctx_t;

/* Output rows [begin, end) of one matrix. */
static void mq_rows(const mq_ctx_t *c, size_t begin, size_t end)
{
    float row[MQ_MAX_K];
    for (size_t j = begin; j < end; j++) {
        const uint8_t *src = (const uint8_t *)c->w->data + j * c->w->row_bytes;
#if defined(__x86_64__)
        if (c->simd) {
            row_to_f32_avx2(c->w->type, src, c->k, row);
            for (int i0 = 0; i0 < c->m; i0 += 4) {
                float r[4];
                int nx = FY_MIN(4, c->m - i0);
                dot4_avx2(row, c->x + (size_t)i0 * c->ldx, c->ldx, nx, c->k, r);
                for (int t = 0; t < nx; t++) {
                    float *yp = c->y + (size_t)(i0 + t) * c->ldy + j;
                    *yp = c->accumulate ? *yp + r[t] : r[t];
                }
            }
            continue;
        }
#endif
        row_to_f32_c(c->w->type, src, c->k, row);
        for (int i = 0; i < c->m; i++) {
            float r = dot_c(row, c->x + (size_t)i * c->ldx, c->k);
            float *yp = c->y + (size_t)i * c->ldy + j;
            *yp = c->accumulate ? *yp + r : r;
        }
    }
}

typedef struct {
    mq_ctx_t job[KRN_MATMUL_Q_MAX_MATS];
    size_t first[KRN_MATMUL_Q_MAX_MATS + 1]; /* first global row of each matrix */
    int n;
} mq_multi_t;

/* Global rows [begin, end) over the concatenated matrices. */
static void mq_range(void *arg, size_t begin, size_t end, int thread)
{
    const mq_multi_t *mm = arg;
    for (int i = 0; i < mm->n && begin < end; i++) {
        size_t lo = mm->first[i], hi = mm->first[i + 1];
        if (begin >= hi)
            continue;
        size_t b = begin - lo, e = FY_MIN(end, hi) - lo;
        mq_rows(&mm->job[i], b, e);
        begin = FY_MIN(end, hi);
    }
}

static bool mq_shape_ok(const krn_qmat_t *w)
{
    return w->cols > 0 && w->cols <= MQ_MAX_K && krn_qtype_supported(w->type) &&
           (w->type == KRN_Q_F32 || w->type == KRN_Q_F16 || w->cols % 32 == 0);
}

fy_status_t krn_matmul_q_multi_f32(fy_pool_t *pool, int m, const float *x, int ldx,
                                   const krn_qmat_t *const *w, float *const *y, int ldy,
                                   int n_mats, int accumulate)
{
    if (m <= 0 || n_mats == 0)
        return FY_OK;
    if (n_mats < 0 || n_mats > KRN_MATMUL_Q_MAX_MATS)
        return FY_ERR_INVALID_ARG;
    mq_multi_t mm = {.n = n_mats};
    bool simd = have_avx2();
    for (int i = 0; i < n_mats; i++) {
        if (!mq_shape_ok(w[i]) || w[i]->cols != w[0]->cols)
            return FY_ERR_UNSUPPORTED;
        mm.job[i] = (mq_ctx_t){.m = m, .k = w[i]->cols, .ldx = ldx, .ldy = ldy, .x = x,
                               .w = w[i], .y = y[i], .accumulate = accumulate, .simd = simd};
        mm.first[i + 1] = mm.first[i] + (size_t)w[i]->rows;
    }
    fy_pool_parallel_for(pool, mm.first[n_mats], 64, mq_range, &mm);
    return FY_OK;
}

fy_status_t krn_matmul_q_f32(fy_pool_t *pool, int m, const float *x, int ldx,
                             const krn_qmat_t *w, float *y, int ldy, int accumulate)
{
    return krn_matmul_q_multi_f32(pool, m, x, ldx, &w, &y, ldy, 1, accumulate);
}

void krn_matmul_q_reference_f32(int m, const float *x, int ldx, const krn_qmat_t *w, float *y,
                                int ldy)
{
    mq_ctx_t c = {.m = m, .k = w->cols, .ldx = ldx, .ldy = ldy, .x = x, .w = w, .y = y,
                  .accumulate = 0, .simd = false};
    mq_rows(&c, 0, (size_t)w->rows);
}
