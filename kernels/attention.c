/*
 * attention.c: causal attention for prefill. The scalar version is the reference: one call
 * handles one query head over its KV group, scores of one query row in a scratch row, the
 * max-subtracted exact softmax. The BLAS version computes the same thing block by block with
 * two GEMMs, which is what long prompts need.
 */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "vexp.h"

void krn_attention_causal_f32(float *out, int out_stride, const float *q, int q_stride,
                              const float *k, const float *v, int q_begin, int n_q,
                              int head_dim, float scale, float *scratch)
{
    for (int i = 0; i < n_q; i++) {
        const float *qi = q + (size_t)i * q_stride;
        float *oi = out + (size_t)i * out_stride;
        int n_keys = q_begin + i + 1; // causal: keys 0 .. position
        float mx = -INFINITY;
        for (int j = 0; j < n_keys; j++) {
            const float *kj = k + (size_t)j * head_dim;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++)
                dot += qi[d] * kj[d];
            dot *= scale;
            scratch[j] = dot;
            if (dot > mx)
                mx = dot;
        }
        float sum = 0.0f;
        for (int j = 0; j < n_keys; j++) {
            scratch[j] = expf(scratch[j] - mx);
            sum += scratch[j];
        }
        float inv = 1.0f / sum;
        memset(oi, 0, sizeof(float) * (size_t)head_dim);
        for (int j = 0; j < n_keys; j++) {
            const float *vj = v + (size_t)j * head_dim;
            float p = scratch[j] * inv;
            for (int d = 0; d < head_dim; d++)
                oi[d] += p * vj[d];
        }
    }
}

/* Row softmax of the block's scores: row i sees keys 0 .. q_begin + i, the rest become 0. */
static void softmax_rows_ref(float *scratch, int n_q, int n_keys, int q_begin)
{
    for (int i = 0; i < n_q; i++) {
        float *s = scratch + (size_t)i * n_keys;
        int visible = q_begin + i + 1;
        float mx = -INFINITY;
        for (int j = 0; j < visible; j++)
            mx = s[j] > mx ? s[j] : mx;
        float sum = 0.0f;
        for (int j = 0; j < visible; j++) {
            s[j] = expf(s[j] - mx);
            sum += s[j];
        }
        float inv = 1.0f / sum;
        for (int j = 0; j < visible; j++)
            s[j] *= inv;
        for (int j = visible; j < n_keys; j++)
            s[j] = 0.0f;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ATT_AVX2 __attribute__((target("avx2,fma")))

/* e^x on 8 lanes for x <= 0 (vexp.h). */
static ATT_AVX2 __m256 exp8_nonpos(__m256 x)
{
    fy_v8f v = (fy_v8f)x;
    fy_exp8_nonpos(&v);
    return (__m256)v;
}

/* softmax_rows_ref on 8 lanes: max, e^(s - max) and its sum (the last partial 8 through
 * masked loads and stores, so the row's neighbour is never touched), 1 / sum. */
static ATT_AVX2 void softmax_rows_avx2(float *scratch, int n_q, int n_keys, int q_begin)
{
    static const int32_t ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n_q; i++) {
        float *s = scratch + (size_t)i * n_keys;
        int visible = q_begin + i + 1, full = visible & ~7, rest = visible - full;
        __m256i tail = _mm256_loadu_si256((const __m256i *)(ones + 8 - rest));
        __m256 vmx = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j < full; j += 8)
            vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(s + j));
        if (rest)
            vmx = _mm256_max_ps(vmx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY),
                                                      _mm256_maskload_ps(s + full, tail),
                                                      _mm256_castsi256_ps(tail)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        __m256 mx = _mm256_broadcastss_ps(m4);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int j = 0;
        for (; j + 16 <= full; j += 16) {
            __m256 e0 = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx));
            __m256 e1 = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), mx));
            _mm256_storeu_ps(s + j, e0);
            _mm256_storeu_ps(s + j + 8, e1);
            acc0 = _mm256_add_ps(acc0, e0);
            acc1 = _mm256_add_ps(acc1, e1);
        }
        for (; j < full; j += 8) {
            __m256 e0 = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx));
            _mm256_storeu_ps(s + j, e0);
            acc0 = _mm256_add_ps(acc0, e0);
        }
        if (rest) {
            __m256 e0 = exp8_nonpos(_mm256_sub_ps(_mm256_maskload_ps(s + full, tail), mx));
            e0 = _mm256_and_ps(e0, _mm256_castsi256_ps(tail));
            _mm256_maskstore_ps(s + full, tail, e0);
            acc0 = _mm256_add_ps(acc0, e0);
        }
        acc0 = _mm256_add_ps(acc0, acc1);
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        __m256 inv = _mm256_set1_ps(1.0f / _mm_cvtss_f32(s4));
        for (j = 0; j < full; j += 8)
            _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
        if (rest)
            _mm256_maskstore_ps(s + full, tail,
                                _mm256_mul_ps(_mm256_maskload_ps(s + full, tail), inv));
        memset(s + visible, 0, sizeof(float) * (size_t)(n_keys - visible));
    }
}

#endif

/* The same attention as two GEMMs per block of queries (OpenBLAS): S = Q·Kᵀ over the keys the
 * block can see, a causal mask and row softmax, then O = P·V. Work is O(n_q · n_keys) in
 * BLAS instead of scalar loops; scratch holds [n_q][q_begin + n_q] scores. */
void krn_attention_causal_blas_f32(float *out, int out_stride, const float *q, int q_stride,
                                   const float *k, const float *v, int q_begin, int n_q,
                                   int head_dim, float scale, float *scratch)
{
    int n_keys = q_begin + n_q;
    // S [n_q][n_keys] = scale · Q [n_q][hd] · K[n_keys][hd]ᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n_q, n_keys, head_dim, scale, q, q_stride,
                k, head_dim, 0.0f, scratch, n_keys);
#if defined(__x86_64__) && defined(__GNUC__)
    if (krn_cpu_avx2())
        softmax_rows_avx2(scratch, n_q, n_keys, q_begin);
    else
#endif
        softmax_rows_ref(scratch, n_q, n_keys, q_begin);
    // O [n_q][hd] = P [n_q][n_keys] · V [n_keys][hd]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_q, head_dim, n_keys, 1.0f, scratch,
                n_keys, v, head_dim, 0.0f, out, out_stride);
}
