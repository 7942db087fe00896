/*
 * score.c: token importance of one layer from the observation window (SnapKV-style), reduced
 * over each GQA group, max-pooled along tokens, plus the side statistics the distortion model
 * needs: the mean window output per kv head (for eviction and the joint K-V term) and the mean
 * squared query per channel (how much a key error moves the logits, MixKVQ's I_d).
 */
#include <math.h>
#include <stdlib.h>

#include "kvcodec_int.h"

fy_status_t kvc_scores_init(kvc_scores_t *s, uint32_t n_kv_heads, uint32_t n_tokens,
                            uint32_t head_dim)
{
    memset(s, 0, sizeof(*s));
    if (n_kv_heads == 0 || n_tokens == 0 || head_dim == 0)
        return FY_ERR_INVALID_ARG;
    s->n_kv_heads = n_kv_heads;
    s->n_tokens = n_tokens;
    s->head_dim = head_dim;
    s->importance = calloc((size_t)n_kv_heads * n_tokens, sizeof(float));
    s->obar = calloc((size_t)n_kv_heads * head_dim, sizeof(float));
    s->qsq = calloc((size_t)n_kv_heads * head_dim, sizeof(float));
    s->is_static = calloc(n_kv_heads, 1);
    if (!s->importance || !s->obar || !s->qsq || !s->is_static) {
        kvc_scores_cleanup(s);
        return FY_ERR_NO_MEMORY;
    }
    return FY_OK;
}

void kvc_scores_cleanup(kvc_scores_t *s)
{
    if (s == NULL)
        return;
    free(s->importance);
    free(s->obar);
    free(s->qsq);
    free(s->is_static);
    memset(s, 0, sizeof(*s));
}

static void max_pool(const float *in, uint32_t n, uint32_t kernel, float *out)
{
    uint32_t r = kernel / 2;
    for (uint32_t t = 0; t < n; t++) {
        uint32_t lo = t > r ? t - r : 0, hi = FY_MIN(n - 1, t + r);
        float m = in[lo];
        for (uint32_t u = lo + 1; u <= hi; u++)
            m = in[u] > m ? in[u] : m;
        out[t] = m;
    }
}

KVC_HOT fy_status_t kvc_score(const kvc_policy_t *policy, uint32_t n_heads, uint32_t n_kv,
                      uint32_t n, uint32_t d, const kvc_layer_input_t *in, kvc_scores_t *out)
{
    if (!policy || !in || !out || n_kv == 0 || n_heads == 0 || n_heads % n_kv || n == 0 ||
        d == 0 || d > KVC_MAX_HEAD_DIM || !in->k || !in->v)
        return FY_ERR_INVALID_ARG;
    if (out->n_kv_heads != n_kv || out->n_tokens != n || out->head_dim != d)
        return FY_ERR_INVALID_ARG;
    bool have_q = in->q_window != NULL && in->n_window > 0;
    if (have_q && in->n_window > n)
        return FY_ERR_INVALID_ARG;
    uint32_t grp = n_heads / n_kv, W = have_q ? in->n_window : 0;
    // With window_div, a short prompt is scored from its last max(32, n / window_div) queries
    // only: 128 queries are a quarter of a 512-token prompt and reach back into text the
    // continuation no longer reads (bench/results/quality-variants.md).
    uint32_t w_skip = 0; // window queries left out, the oldest ones
    if (have_q && policy->window_div > 0) {
        uint32_t cap = FY_MAX(32u, n / policy->window_div);
        if (W > cap) {
            w_skip = W - cap;
            W = cap;
        }
    }
    float scale = 1.0f / sqrtf((float)d);

    float *vf = malloc((size_t)n * d * sizeof(float));       // [n][d]
    float *kf = have_q ? malloc((size_t)n * d * sizeof(float)) : NULL; // [n][d]
    float *ah = malloc((size_t)n * sizeof(float));           // one head's window mean
    float *acc = malloc((size_t)n * sizeof(float));          // group reduction
    float *pbar = malloc((size_t)n * sizeof(float));         // group mean, unpooled
    float *lg = malloc((size_t)n * sizeof(float));           // one window row's logits
    bool rms = policy->importance == KVC_IMP_RMS && have_q;
    bool pmax = policy->importance == KVC_IMP_MAX && have_q;
    // one head's mean p^2 (rms) or max p (pmax) over the window
    float *ah2 = rms || pmax ? malloc((size_t)n * sizeof(float)) : NULL;
    if (!vf || (have_q && !kf) || !ah || !acc || !pbar || !lg || ((rms || pmax) && !ah2)) {
        free(vf), free(kf), free(ah), free(acc), free(pbar), free(lg), free(ah2);
        return FY_ERR_NO_MEMORY;
    }
    for (uint32_t g = 0; g < n_kv; g++) {
        const uint16_t *kh = in->k + (size_t)g * in->head_stride;
        const uint16_t *vh = in->v + (size_t)g * in->head_stride;
        kvc_load_rows(vh, in->token_stride, n, d, vf);
        float *imp = out->importance + (size_t)g * n;
        float *obar = out->obar + (size_t)g * d;
        float *qsq = out->qsq + (size_t)g * d;
        bool have_attn = have_q || in->window_attn != NULL;
        if (have_q)
            kvc_load_rows(kh, in->token_stride, n, d, kf);
        for (uint32_t t = 0; t < n; t++)
            acc[t] = pbar[t] = 0;
        for (uint32_t c = 0; c < d; c++)
            qsq[c] = 0;
        for (uint32_t hh = 0; hh < grp && have_attn; hh++) {
            uint32_t h = g * grp + hh;
            if (have_q) {
                for (uint32_t t = 0; t < n; t++)
                    ah[t] = 0;
                for (uint32_t t = 0; t < n && (rms || pmax); t++)
                    ah2[t] = 0;
                for (uint32_t w = 0; w < W; w++) {
                    const float *q =
                        in->q_window + ((size_t)h * in->n_window + w_skip + w) * d;
                    uint32_t pos = n - W + w; // causal: sees tokens 0..pos
                    float m = -INFINITY;
                    for (uint32_t t = 0; t <= pos; t++) {
                        float s = kvc_dot(q, kf + (size_t)t * d, d) * scale;
                        lg[t] = s;
                        m = s > m ? s : m;
                    }
                    float sum = 0;
                    for (uint32_t t = 0; t <= pos; t++) {
                        lg[t] = expf(lg[t] - m);
                        sum += lg[t];
                    }
                    float inv = 1.0f / (sum * (float)W);
                    for (uint32_t t = 0; t <= pos; t++)
                        ah[t] += lg[t] * inv;
                    for (uint32_t t = 0; t <= pos && rms; t++) {
                        float p = lg[t] / sum;
                        ah2[t] += p * p / (float)W;
                    }
                    for (uint32_t t = 0; t <= pos && pmax; t++) {
                        float p = lg[t] / sum;
                        ah2[t] = p > ah2[t] ? p : ah2[t];
                    }
                    for (uint32_t c = 0; c < d; c++)
                        qsq[c] += q[c] * q[c];
                }
            } else {
                const float *wa = in->window_attn + (size_t)h * n;
                for (uint32_t t = 0; t < n; t++) {
                    float a = wa[t];
                    ah[t] = a > 0 && a <= 1 ? a : 0; // from another module: keep it sane
                }
            }
            for (uint32_t t = 0; t < n; t++) {
                pbar[t] += ah[t] / (float)grp;
                // RMS over the window: a token a few queries read sharply counts more than
                // its mean (the output error of a query is p^2-weighted).
                if (rms)
                    ah[t] = sqrtf(ah2[t]);
                else if (pmax)
                    ah[t] = ah2[t];
                if (policy->reduce == KVC_REDUCE_MAX)
                    acc[t] = ah[t] > acc[t] ? ah[t] : acc[t];
                else
                    acc[t] += ah[t] / (float)grp;
            }
        }
        // Logit sensitivity per key channel: E[q_c^2] * scale^2 (the logit is scale * q.k).
        float qn = have_q ? 1.0f / ((float)grp * (float)W) : 0;
        for (uint32_t c = 0; c < d; c++)
            qsq[c] = have_q ? qsq[c] * qn * scale * scale : 1.0f / (float)d;
        if (!have_attn) {
            for (uint32_t t = 0; t < n; t++)
                acc[t] = pbar[t] = 1.0f / (float)n;
        }
        // Window output o = sum_t pbar_t v_t (pbar sums to ~1 over visible tokens).
        for (uint32_t c = 0; c < d; c++)
            obar[c] = 0;
        for (uint32_t t = 0; t < n; t++) {
            float p = pbar[t];
            const float *vr = vf + (size_t)t * d;
            for (uint32_t c = 0; c < d; c++)
                obar[c] += p * vr[c];
        }
        // HybridKV head class: window mass on the sinks and the recent window.
        out->is_static[g] = 0;
        if (policy->hybrid_threshold > 0 && have_attn) {
            float mass = 0;
            for (uint32_t t = 0; t < n; t++)
                if (t < policy->sinks || t + policy->recent >= n)
                    mass += pbar[t];
            out->is_static[g] = mass >= policy->hybrid_threshold;
        }
        if (policy->pool_kernel > 1)
            max_pool(acc, n, policy->pool_kernel, imp);
        else
            memcpy(imp, acc, (size_t)n * sizeof(float));
    }
    free(vf), free(kf), free(ah), free(acc), free(pbar), free(lg), free(ah2);
    return FY_OK;
}
