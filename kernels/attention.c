/*
 * attention.c: causal attention for prefill (CPU reference). One call handles one query head
 * over its KV group, so the caller spreads heads (and query blocks) over threads. Scores of one
 * query row live in a caller-provided scratch row; softmax is the max-subtracted exact one.
 */
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
