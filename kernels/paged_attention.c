/*
 * paged_attention.c: decode attention over a paged FP16 KV cache (CPU reference).
 *
 * Walks the page list of one (layer, kv head), converts one page of K and V at a time into a
 * small stack buffer, and keeps a running max, sum and weighted value sum per query head (online
 * softmax), so neither the score vector nor an FP32 copy of the cache is ever built.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

enum { PA_MAX_HEAD_DIM = 256, PA_MAX_Q = 32, PA_TILE = 32 };

void krn_paged_attention_f16(float *out, const float *q, int n_q, int head_dim, float scale,
                             const krn_page_list_t *list)
{
    FY_ASSERT(head_dim > 0 && head_dim <= PA_MAX_HEAD_DIM && n_q > 0 && n_q <= PA_MAX_Q);
    float m[PA_MAX_Q], l[PA_MAX_Q];
    for (int h = 0; h < n_q; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(out, 0, sizeof(float) * (size_t)n_q * head_dim);

    float kt[PA_TILE * PA_MAX_HEAD_DIM]; // [tile][head_dim]
    float vt[PA_TILE * PA_MAX_HEAD_DIM]; // [tile][head_dim]
    float s[PA_TILE];
    int left = list->n_tokens;
    for (int p = 0; p < list->n_pages && left > 0; p++) {
        const uint16_t *kp = list->pages[p];
        const uint16_t *vp = kp + (size_t)list->page_tokens * head_dim;
        int in_page = FY_MIN(left, list->page_tokens);
        for (int t0 = 0; t0 < in_page; t0 += PA_TILE) {
            int nt = FY_MIN(PA_TILE, in_page - t0);
            fy_fp16_to_fp32_buf(kt, kp + (size_t)t0 * head_dim, (size_t)nt * head_dim);
            fy_fp16_to_fp32_buf(vt, vp + (size_t)t0 * head_dim, (size_t)nt * head_dim);
            for (int h = 0; h < n_q; h++) {
                const float *qh = q + (size_t)h * head_dim;
                float *oh = out + (size_t)h * head_dim;
                float tile_max = -INFINITY;
                for (int t = 0; t < nt; t++) {
                    const float *kr = kt + (size_t)t * head_dim;
                    float dot = 0.0f;
                    for (int d = 0; d < head_dim; d++)
                        dot += qh[d] * kr[d];
                    s[t] = dot * scale;
                    tile_max = fmaxf(tile_max, s[t]);
                }
                float new_m = fmaxf(m[h], tile_max);
                float corr = expf(m[h] - new_m); // 0 on the first tile (m = -inf)
                l[h] *= corr;
                for (int d = 0; d < head_dim; d++)
                    oh[d] *= corr;
                for (int t = 0; t < nt; t++) {
                    float e = expf(s[t] - new_m);
                    l[h] += e;
                    const float *vr = vt + (size_t)t * head_dim;
                    for (int d = 0; d < head_dim; d++)
                        oh[d] += e * vr[d];
                }
                m[h] = new_m;
            }
        }
        left -= in_page;
    }
    for (int h = 0; h < n_q; h++) {
        float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int d = 0; d < head_dim; d++)
            out[(size_t)h * head_dim + d] *= inv;
    }
}
