// Helpers shared by the kvcodec tests: a synthetic layer and a whole-request encode (C, and
// C++ for the emulated device tests).
#ifndef FERRY_TESTS_KVTEST_H
#define FERRY_TESTS_KVTEST_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec.h"

typedef struct {
    uint32_t n_heads, n_kv, n, d, W;
    uint16_t *k, *v; // [n_kv][n][d]
    float *q;        // [n_heads][W][d]
} kvt_layer_t;

static inline void kvt_layer_make(kvt_layer_t *L, uint64_t seed, uint32_t n_heads,
                                  uint32_t n_kv, uint32_t n, uint32_t d, uint32_t W)
{
    L->n_heads = n_heads;
    L->n_kv = n_kv;
    L->n = n;
    L->d = d;
    L->W = W > n ? n : W;
    L->k = (uint16_t *)malloc((size_t)n_kv * n * d * 2);
    L->v = (uint16_t *)malloc((size_t)n_kv * n * d * 2);
    L->q = (float *)malloc((size_t)n_heads * (L->W ? L->W : 1) * d * sizeof(float));
    kvc_synth_layer(seed, n_heads, n_kv, n, d, L->W, L->k, L->v, L->q);
}

static inline void kvt_layer_free(kvt_layer_t *L)
{
    free(L->k), free(L->v), free(L->q);
}

static inline kvc_layer_input_t kvt_input(const kvt_layer_t *L, uint32_t layer)
{
    kvc_layer_input_t in;
    memset(&in, 0, sizeof(in));
    in.layer = layer;
    in.k = L->k;
    in.v = L->v;
    in.head_stride = (size_t)L->n * L->d;
    in.token_stride = L->d;
    in.q_window = L->q;
    in.n_window = L->W;
    return in;
}

static inline kvc_encoder_params_t kvt_params(const kvc_policy_t *pol, const kvt_layer_t *L,
                                              uint32_t n_layers, double budget)
{
    kvc_encoder_params_t p;
    kvc_encoder_params_default(&p);
    p.policy = pol;
    p.budget = budget;
    p.n_layers = n_layers;
    p.n_heads = L->n_heads;
    p.n_kv_heads = L->n_kv;
    p.head_dim = L->d;
    p.n_tokens = L->n;
    p.model_fingerprint = 0x1234abcd5678ef00ull;
    p.seq_id = 77;
    return p;
}

/* Layer 0 of L encoded under pol as the first of n_layers at budget b: a malloc'd frame of
 * *len_p bytes (and the layer's info where info_p is not NULL), or NULL if anything failed. */
static inline uint8_t *kvt_encode_first(const kvc_policy_t *pol, const kvt_layer_t *L,
                                        uint32_t n_layers, double b, size_t *len_p,
                                        kvc_layer_info_t *info_p)
{
    kvc_encoder_params_t p = kvt_params(pol, L, n_layers, b);
    kvc_encoder_t *enc = NULL;
    if (kvc_encoder_create(&p, &enc) != FY_OK)
        return NULL;
    size_t cap = kvc_encoder_max_frame_bytes(enc);
    uint8_t *buf = (uint8_t *)malloc(cap);
    kvc_layer_input_t in = kvt_input(L, 0);
    if (buf != NULL && kvc_encoder_encode_layer(enc, &in, NULL, buf, cap, len_p, info_p) != FY_OK) {
        free(buf);
        buf = NULL;
    }
    kvc_encoder_destroy(enc);
    return buf;
}

#endif
