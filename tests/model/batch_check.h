/*
 * batch_check.h: runs prompts one by one with mdl_prefill and together with mdl_prefill_batch
 * and compares what each prompt gets: logits (every position), and per layer the handed-out
 * K, V and window queries. Shared by the tiny-model and the real-model batch tests.
 */
#ifndef FERRY_TEST_BATCH_CHECK_H
#define FERRY_TEST_BATCH_CHECK_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"

typedef struct {
    const mdl_config_t *c;
    int n_tokens, window;
    int layers_seen;
    int fail_at;   // layer whose callback fails (-1: none)
    float *k, *v;  // [n_layers][n_kv][n][hd]
    float *qw;     // [n_layers][n_heads][w][hd]
} bc_capture_t;

static fy_status_t bc_on_layer(void *arg, const mdl_layer_kv_t *kv)
{
    bc_capture_t *cap = arg;
    const mdl_config_t *c = cap->c;
    if (kv->layer != cap->layers_seen || kv->n_tokens != cap->n_tokens ||
        kv->n_window != FY_MIN(cap->window, cap->n_tokens) || kv->n_heads != c->n_heads ||
        kv->n_kv_heads != c->n_kv_heads || kv->head_dim != c->head_dim)
        return FY_ERR_INTERNAL;
    cap->layers_seen++;
    if (kv->layer == cap->fail_at)
        return FY_ERR_CANCELLED;
    size_t nkv = (size_t)c->n_kv_heads * kv->n_tokens * c->head_dim;
    size_t nq = (size_t)c->n_heads * kv->n_window * c->head_dim;
    memcpy(cap->k + kv->layer * nkv, kv->k, nkv * sizeof(float));
    memcpy(cap->v + kv->layer * nkv, kv->v, nkv * sizeof(float));
    if (nq > 0)
        memcpy(cap->qw + kv->layer * nq, kv->q_window, nq * sizeof(float));
    return FY_OK;
}

static void bc_capture_init(bc_capture_t *cap, const mdl_config_t *c, int n, int window)
{
    memset(cap, 0, sizeof(*cap));
    cap->c = c;
    cap->n_tokens = n;
    cap->window = window;
    cap->fail_at = -1;
    size_t nkv = (size_t)c->n_layers * c->n_kv_heads * n * c->head_dim;
    size_t nq = (size_t)c->n_layers * c->n_heads * FY_MAX(FY_MIN(window, n), 1) * c->head_dim;
    cap->k = malloc(nkv * sizeof(float));
    cap->v = malloc(nkv * sizeof(float));
    cap->qw = malloc(nq * sizeof(float));
}

static void bc_capture_free(bc_capture_t *cap)
{
    free(cap->k);
    free(cap->v);
    free(cap->qw);
}

/* Largest |a - b| relative to max(1, |b|). */
static float bc_diff(const float *a, const float *b, size_t n)
{
    float m = 0.0f;
    for (size_t i = 0; i < n; i++)
        m = fmaxf(m, fabsf(a[i] - b[i]) / fmaxf(1.0f, fabsf(b[i])));
    return m;
}

/* Prompts s = 0..n_seqs-1 are toks[s][n[s]] with observation window windows[s]; every
 * quantity the batch hands out must agree with the one-by-one run within tol. Returns the
 * largest difference seen. */
static float bc_check(mdl_ctx_t *ctx, const mdl_model_t *m, int n_seqs,
                      const int32_t *const *toks, const int *n, const int *windows, float tol)
{
    const mdl_config_t *c = mdl_model_config(m);
    size_t nv = (size_t)c->n_vocab;
    bc_capture_t *one = calloc((size_t)n_seqs, sizeof(*one));
    bc_capture_t *bat = calloc((size_t)n_seqs, sizeof(*bat));
    float **l_one = calloc((size_t)n_seqs, sizeof(float *));
    float **l_bat = calloc((size_t)n_seqs, sizeof(float *));
    mdl_prefill_params_t *pp = calloc((size_t)n_seqs, sizeof(*pp));
    float worst = 0.0f;
    for (int s = 0; s < n_seqs; s++) {
        bc_capture_init(&one[s], c, n[s], windows[s]);
        bc_capture_init(&bat[s], c, n[s], windows[s]);
        l_one[s] = malloc((size_t)n[s] * nv * sizeof(float));
        l_bat[s] = malloc((size_t)n[s] * nv * sizeof(float));
        for (size_t i = 0; i < (size_t)n[s] * nv; i++)
            l_bat[s][i] = NAN; // poison: every row must be written
        mdl_prefill_params_default(&pp[s]);
        pp[s].on_layer = bc_on_layer;
        pp[s].cb_arg = &one[s];
        pp[s].window = windows[s];
        pp[s].all_logits = true;
        assert_int_equal(mdl_prefill(ctx, toks[s], n[s], &pp[s], l_one[s]), FY_OK);
        assert_int_equal(one[s].layers_seen, c->n_layers);
        pp[s].cb_arg = &bat[s];
    }
    assert_int_equal(mdl_prefill_batch(ctx, n_seqs, toks, n, pp, l_bat), FY_OK);
    for (int s = 0; s < n_seqs; s++) {
        assert_int_equal(bat[s].layers_seen, c->n_layers);
        size_t nkv = (size_t)c->n_layers * c->n_kv_heads * n[s] * c->head_dim;
        size_t nq = (size_t)c->n_layers * c->n_heads * FY_MIN(windows[s], n[s]) * c->head_dim;
        float d[4] = {bc_diff(l_bat[s], l_one[s], (size_t)n[s] * nv),
                      bc_diff(bat[s].k, one[s].k, nkv), bc_diff(bat[s].v, one[s].v, nkv),
                      bc_diff(bat[s].qw, one[s].qw, nq)};
        for (int i = 0; i < 4; i++) {
            if (!(d[i] <= tol))
                fail_msg("prompt %d (%d tokens): quantity %d differs by %g", s, n[s], i,
                         (double)d[i]);
            worst = fmaxf(worst, d[i]);
        }
        bc_capture_free(&one[s]);
        bc_capture_free(&bat[s]);
        free(l_one[s]);
        free(l_bat[s]);
    }
    free(one);
    free(bat);
    free(l_one);
    free(l_bat);
    free(pp);
    return worst;
}

#endif /* FERRY_TEST_BATCH_CHECK_H */
