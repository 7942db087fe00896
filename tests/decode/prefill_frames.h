/*
 * prefill_frames.h: what a prefill worker does, for tests on the decode side: run a prompt
 * through the real model and encode every layer's K/V into kvcodec wire frames, with one or
 * more policies at once (one kvc_encoder_t each). A stream with gpu_scores set encodes with the
 * scores the GPU computes for each layer (kvc_score_cuda_host), so its frames are what a GPU
 * encoder makes of the same layers.
 */
#ifndef FERRY_TESTS_DECODE_PREFILL_FRAMES_H
#define FERRY_TESTS_DECODE_PREFILL_FRAMES_H

#include <stdlib.h>
#include <string.h>

#include "kvcodec.h"
#include "kvcodec_cuda.h"
#include "model.h"

/* The frames of one prompt under one policy. */
typedef struct {
    kvc_policy_t policy;
    double budget;      // < 0: the policy's
    bool gpu_scores;    // score each layer on the GPU (else the encoder scores on the CPU)
    int n_layers;
    uint8_t **frames;   // [n_layers] malloc'd frame bytes
    size_t *lens;       // [n_layers]
    uint64_t wire_bytes; // sum of lens
    uint64_t fp16_bytes; // FP16 bytes of all layers' K and V
    kvc_encoder_t *enc;
} pf_stream_t;

typedef struct {
    pf_stream_t *streams;
    int n_streams;
    uint16_t *k16, *v16; // [n_kv][n][head_dim] scratch
} pf_ctx_t;

static inline fy_status_t pf_on_layer(void *arg, const mdl_layer_kv_t *kv)
{
    pf_ctx_t *c = arg;
    size_t n = (size_t)kv->n_kv_heads * kv->n_tokens * kv->head_dim;
    fy_fp32_to_fp16_buf(c->k16, kv->k, n);
    fy_fp32_to_fp16_buf(c->v16, kv->v, n);
    kvc_layer_input_t in = {.layer = (uint32_t)kv->layer,
                            .k = c->k16,
                            .v = c->v16,
                            .head_stride = (size_t)kv->n_tokens * kv->head_dim,
                            .token_stride = (size_t)kv->head_dim,
                            .q_window = kv->q_window,
                            .n_window = (uint32_t)kv->n_window};
    for (int i = 0; i < c->n_streams; i++) {
        pf_stream_t *s = &c->streams[i];
        size_t cap = kvc_encoder_max_frame_bytes(s->enc), len = 0;
        uint8_t *buf = malloc(cap);
        if (buf == NULL)
            return FY_ERR_NO_MEMORY;
        kvc_layer_info_t info;
        kvc_scores_t sc = {0};
        fy_status_t st = FY_OK;
        if (s->gpu_scores) {
            st = kvc_scores_init(&sc, (uint32_t)kv->n_kv_heads, (uint32_t)kv->n_tokens,
                                 (uint32_t)kv->head_dim);
            if (st == FY_OK)
                st =
                    kvc_score_cuda_host(&s->policy, (uint32_t)kv->n_heads, (uint32_t)kv->n_kv_heads,
                                        (uint32_t)kv->n_tokens, (uint32_t)kv->head_dim, &in, &sc);
        }
        if (st == FY_OK)
            st = kvc_encoder_encode_layer(s->enc, &in, s->gpu_scores ? &sc : NULL, buf, cap, &len,
                                          &info);
        kvc_scores_cleanup(&sc);
        if (st != FY_OK) {
            free(buf);
            return st;
        }
        s->frames[kv->layer] = buf;
        s->lens[kv->layer] = len;
        s->wire_bytes += len;
        s->fp16_bytes += info.fp16_bytes;
    }
    return FY_OK;
}

/* Frees what pf_prefill filled in a stream (accepts a zeroed one). */
static inline void pf_stream_cleanup(pf_stream_t *s)
{
    for (int l = 0; s->frames != NULL && l < s->n_layers; l++)
        free(s->frames[l]);
    free(s->frames);
    free(s->lens);
    kvc_encoder_destroy(s->enc);
    s->frames = NULL;
    s->lens = NULL;
    s->enc = NULL;
}

/* Prefills toks[n] and encodes every layer for each stream (policy and budget set by the
 * caller); seq_id goes into the frames. ref (optional) receives the FP16 cache, logits the
 * last position's [n_vocab]. */
static inline fy_status_t pf_prefill(mdl_ctx_t *ctx, const mdl_model_t *m, const int32_t *toks,
                                     int n, pf_stream_t *streams, int n_streams,
                                     uint64_t seq_id, mdl_kv_seq_t *ref, float *logits)
{
    const mdl_config_t *c = mdl_model_config(m);
    uint64_t fp = mdl_model_fingerprint(m);
    int window = 0;
    fy_status_t st = FY_OK;
    for (int i = 0; i < n_streams && st == FY_OK; i++) {
        pf_stream_t *s = &streams[i];
        s->n_layers = c->n_layers;
        s->frames = calloc((size_t)c->n_layers, sizeof(*s->frames));
        s->lens = calloc((size_t)c->n_layers, sizeof(*s->lens));
        s->wire_bytes = s->fp16_bytes = 0;
        if (s->frames == NULL || s->lens == NULL)
            return FY_ERR_NO_MEMORY;
        kvc_encoder_params_t ep;
        kvc_encoder_params_default(&ep);
        ep.policy = &s->policy;
        ep.budget = s->budget;
        ep.n_layers = (uint32_t)c->n_layers;
        ep.n_heads = (uint32_t)c->n_heads;
        ep.n_kv_heads = (uint32_t)c->n_kv_heads;
        ep.head_dim = (uint32_t)c->head_dim;
        ep.n_tokens = (uint32_t)n;
        ep.model_fingerprint = fp;
        ep.seq_id = seq_id;
        st = kvc_encoder_create(&ep, &s->enc);
        if ((int)s->policy.window > window)
            window = (int)s->policy.window;
    }
    if (st != FY_OK)
        return st;
    size_t kv_elems = (size_t)c->n_kv_heads * n * c->head_dim;
    pf_ctx_t pc = {.streams = streams, .n_streams = n_streams,
                   .k16 = malloc(kv_elems * sizeof(uint16_t)),
                   .v16 = malloc(kv_elems * sizeof(uint16_t))};
    if (pc.k16 == NULL || pc.v16 == NULL) {
        free(pc.k16);
        free(pc.v16);
        return FY_ERR_NO_MEMORY;
    }
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = ref;
    pp.on_layer = pf_on_layer;
    pp.cb_arg = &pc;
    pp.window = window;
    st = mdl_prefill(ctx, toks, n, &pp, logits);
    free(pc.k16);
    free(pc.v16);
    return st;
}

/* Parses and places every frame of a stream into seq. */
static inline fy_status_t pf_place(const pf_stream_t *s, kvc_seq_t *seq)
{
    for (int l = 0; l < s->n_layers; l++) {
        kvc_frame_t f;
        fy_status_t st = kvc_frame_parse(s->frames[l], s->lens[l], &f);
        if (st == FY_OK)
            st = kvc_place(seq, &f);
        if (st != FY_OK)
            return st;
    }
    return FY_OK;
}

static inline int32_t pf_argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

#endif /* FERRY_TESTS_DECODE_PREFILL_FRAMES_H */
