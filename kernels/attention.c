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

/* The same attention as two GEMMs per block of queries (OpenBLAS): S = Q·Kᵀ over the keys the
 * block can see, a causal mask and row softmax, then O = P·V. Work is O(n_q · n_keys) in
 * BLAS instead of scalar loops; scratch holds [n_q][q_begin + n_q] scores. */
void krn_attention_causal_blas_f32(float *out, int out_stride, const float *q, int q_stride,
                                   const float *k, const float *v, int q_begin, int n_q,
                                   int head_dim, float scale, float *scratch)
{
    int n_keys = q_begin + n_q;
    // S [n_q][n_keys] = scale · Q [n_q][hd] · K[n_keys][hd]ᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n_q, n_keys, head_dim, scale, q,
                q_stride, k, head_dim, 0.0f, scratch, n_keys);
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
    // O [n_q][hd] = P [n_q][n_keys] · V [n_keys][hd]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_q, head_dim, n_keys, 1.0f, scratch,
                n_keys, v, head_dim, 0.0f, out, out_stride);
}
