/*
 * quality_eval.c: the decode batch of the quality harness (quality.h): prefill a context once,
 * code its KV once per row, place every row's frames into its own kvc sequence, decode all rows
 * together; and the teacher-forced metrics (dPPL, top-1 agreement, KL, wire ratio).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quality.h"

/* Written into every frame and checked by kvc_place; any constant will do inside one process. */
#define QUAL_FINGERPRINT 0x7175616c69747931ull

/* ------------------------------------------------------------------------------------------ */
/* Configurations                                                                              */
/* ------------------------------------------------------------------------------------------ */

bool qual_policy_has_budget(const kvc_policy_t *p)
{
    return p->budget > 0;
}

void qual_config_from_policy(const kvc_policy_t *policy, double budget, qual_config_t *cfg_p)
{
    qual_config_t c;
    memset(&c, 0, sizeof(c));
    c.only_layer = -1;
    c.policy = *policy;
    if (!qual_policy_has_budget(&c.policy)) {
        c.budget = -1;
        snprintf(c.label, sizeof(c.label), "%s", c.policy.name);
    } else {
        c.budget = budget >= 0 ? budget : c.policy.budget;
        snprintf(c.label, sizeof(c.label), "%s@%g", c.policy.name, c.budget);
    }
    *cfg_p = c;
}

fy_status_t qual_config_builtin(const char *name, double budget, qual_config_t *cfg_p)
{
    if (name == NULL || cfg_p == NULL)
        return FY_ERR_INVALID_ARG;
    kvc_policy_t p;
    if (strcmp(name, "sinks") == 0) {
        // Only the attention sinks survive: a lower bound on quality that any eviction policy
        // must beat. pdtrim's pins (the first 4 tokens) with a budget that buys nothing more.
        kvc_policy_builtin("pdtrim", &p);
        snprintf(p.name, sizeof(p.name), "sinks");
        qual_config_from_policy(&p, -1, cfg_p);
        cfg_p->sinks_only = true;
        cfg_p->budget = -1; // fitted per context
        snprintf(cfg_p->label, sizeof(cfg_p->label), "sinks");
        return FY_OK;
    }
    fy_status_t st = kvc_policy_builtin(name, &p);
    if (st == FY_OK)
        qual_config_from_policy(&p, budget, cfg_p);
    return st;
}

fy_status_t qual_decode_parse(const char *s, qual_decode_t *mode_p)
{
    if (s == NULL || mode_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (strcmp(s, "kvc") == 0)
        *mode_p = QUAL_DECODE_KVC;
    else if (strcmp(s, "dequant") == 0)
        *mode_p = QUAL_DECODE_DEQUANT;
    else
        return FY_ERR_INVALID_ARG;
    return FY_OK;
}

const char *qual_decode_name(qual_decode_t mode)
{
    return mode == QUAL_DECODE_KVC ? "kvc" : "dequant";
}

/* ------------------------------------------------------------------------------------------ */
/* The decode batch                                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    qual_config_t cfg;
    kvc_encoder_t *enc;     // per context: the row's policy
    kvc_encoder_t *enc16;   // one-layer rows: FP16 for the other layers
    uint8_t **frames;       // [n_layers] coded frames of the current context
    size_t *frame_len;      // [n_layers]
    qual_code_info_t info;
    double lambda_sum;
    int n_lambda;
    kvc_seq_t *seq;         // QUAL_DECODE_KVC
    mdl_kv_seq_t *kseq;     // QUAL_DECODE_DEQUANT
} row_t;

struct qual_batch {
    mdl_ctx_t *ctx;
    const mdl_model_t *m;
    const mdl_config_t *c;
    qual_decode_t mode;
    int n_rows;             // rows the caller sees
    int n_all;              // rows decoded: n_rows, plus one hidden FP16 row (see create)
    row_t *rows;            // [n_all]; row 0 is the FP16 reference
    int32_t *step_tokens;   // [n_all]
    float *step_logits;     // [n_all][n_vocab] when n_all > n_rows
    int window;             // largest observation window any row asks for
    int n_tokens;           // context length of the current context
    int64_t pos;            // position of the next decoded token
    fy_status_t cb_status;  // first coding failure inside the prefill callback
    // Scratch of the prefill callback.
    uint16_t *k16, *v16;    // [n_kv][n][hd]
    float *qwin;            // [n_heads][window][hd]
    uint8_t *frame_buf;     // one frame of the largest size
    uint8_t *frame_buf2;    // a second one for one-layer rows
    size_t frame_cap;
    uint32_t group, protect; // G and P of every row's frames (one page pool takes them all)
    kvc_pool_t *pool;       // QUAL_DECODE_KVC: every row's pages
    kvc_seq_t **seqs;       // [n_all]
    int32_t *step_pos;      // [n_all]
    mdl_kv_t *kv;           // QUAL_DECODE_DEQUANT page pool
    mdl_kv_seq_t **kseqs;   // [n_all]
};

int qual_batch_n_rows(const qual_batch_t *b)
{
    return b->n_rows;
}

const mdl_model_t *qual_batch_model(const qual_batch_t *b)
{
    return b->m;
}

const qual_code_info_t *qual_batch_code_info(const qual_batch_t *b, int row)
{
    return row >= 0 && row < b->n_rows ? &b->rows[row].info : NULL;
}

/* Drops everything that belongs to the current context. */
static void batch_reset(qual_batch_t *b)
{
    for (int r = 0; r < b->n_all; r++) {
        row_t *w = &b->rows[r];
        kvc_encoder_destroy(w->enc);
        kvc_encoder_destroy(w->enc16);
        w->enc = w->enc16 = NULL;
        for (int l = 0; l < b->c->n_layers; l++) {
            free(w->frames[l]);
            w->frames[l] = NULL;
            w->frame_len[l] = 0;
        }
        kvc_seq_destroy(w->seq);
        w->seq = NULL;
        b->seqs[r] = NULL;
        mdl_kv_seq_destroy(w->kseq);
        w->kseq = NULL;
        b->kseqs[r] = NULL;
        memset(&w->info, 0, sizeof(w->info));
        w->lambda_sum = 0;
        w->n_lambda = 0;
    }
    kvc_pool_destroy(b->pool);
    b->pool = NULL;
    mdl_kv_destroy(b->kv);
    b->kv = NULL;
    free(b->k16), free(b->v16), free(b->qwin), free(b->frame_buf), free(b->frame_buf2);
    b->k16 = b->v16 = NULL;
    b->qwin = NULL;
    b->frame_buf = b->frame_buf2 = NULL;
    b->frame_cap = 0;
    b->n_tokens = 0;
    b->pos = 0;
}

void qual_batch_destroy(qual_batch_t *b)
{
    if (b == NULL)
        return;
    if (b->rows != NULL) {
        batch_reset(b);
        for (int r = 0; r < b->n_all; r++) {
            free(b->rows[r].frames);
            free(b->rows[r].frame_len);
        }
    }
    free(b->rows);
    free(b->kseqs);
    free(b->seqs);
    free(b->step_pos);
    free(b->step_tokens);
    free(b->step_logits);
    free(b);
}

fy_status_t qual_batch_create(mdl_ctx_t *ctx, const mdl_model_t *model, qual_decode_t mode,
                              const qual_config_t *cfgs, int n_cfg, qual_batch_t **batch_p)
{
    if (ctx == NULL || model == NULL || batch_p == NULL || n_cfg < 0 || n_cfg > 1023 ||
        (n_cfg > 0 && cfgs == NULL) || (mode != QUAL_DECODE_KVC && mode != QUAL_DECODE_DEQUANT))
        return FY_ERR_INVALID_ARG;
    const mdl_config_t *c = mdl_model_config(model);
    for (int i = 0; i < n_cfg; i++) {
        char err[128];
        // One page pool takes every row, so every policy has the same G and P.
        if (kvc_policy_validate(&cfgs[i].policy, err, sizeof(err)) != FY_OK ||
            cfgs[i].only_layer < -1 || cfgs[i].only_layer >= c->n_layers ||
            cfgs[i].policy.group != cfgs[0].policy.group ||
            cfgs[i].policy.protect_channels != cfgs[0].policy.protect_channels)
            return FY_ERR_INVALID_ARG;
    }
    qual_batch_t *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return FY_ERR_NO_MEMORY;
    b->ctx = ctx;
    b->m = model;
    b->c = c;
    b->mode = mode;
    b->n_rows = n_cfg + 1;
    // The decode step's matmuls dot each weight row with activation rows four at a time, and a
    // row left alone in the last group of four is summed in another order. An extra FP16 row
    // (decoded, never reported) keeps every row in a group of two or more, so identical rows
    // give identical logits and a row coded `fp16` reproduces the reference bit for bit.
    b->n_all = b->n_rows + (b->n_rows > 1 && b->n_rows % 4 == 1);
    b->step_tokens = malloc(sizeof(int32_t) * (size_t)b->n_all);
    b->step_logits = b->n_all > b->n_rows
                         ? malloc(sizeof(float) * (size_t)b->n_all * (size_t)c->n_vocab)
                         : NULL;
    b->rows = calloc((size_t)b->n_all, sizeof(row_t));
    b->kseqs = calloc((size_t)b->n_all, sizeof(mdl_kv_seq_t *));
    b->seqs = calloc((size_t)b->n_all, sizeof(kvc_seq_t *));
    b->step_pos = malloc(sizeof(int32_t) * (size_t)b->n_all);
    if (b->rows == NULL || b->kseqs == NULL || b->seqs == NULL || b->step_pos == NULL ||
        b->step_tokens == NULL ||
        (b->n_all > b->n_rows && b->step_logits == NULL)) {
        qual_batch_destroy(b);
        return FY_ERR_NO_MEMORY;
    }
    qual_config_builtin("fp16", -1, &b->rows[0].cfg);
    snprintf(b->rows[0].cfg.label, sizeof(b->rows[0].cfg.label), "reference (fp16)");
    b->group = n_cfg > 0 ? cfgs[0].policy.group : b->rows[0].cfg.policy.group;
    b->protect = n_cfg > 0 ? cfgs[0].policy.protect_channels : 0;
    b->rows[0].cfg.policy.group = b->group; // 16/16 frames carry G and P only in their header
    b->rows[0].cfg.policy.protect_channels = b->protect;
    for (int i = 0; i < n_cfg; i++)
        b->rows[i + 1].cfg = cfgs[i];
    if (b->n_all > b->n_rows)
        b->rows[b->n_rows].cfg = b->rows[0].cfg;
    for (int r = 0; r < b->n_all; r++) {
        b->rows[r].frames = calloc((size_t)c->n_layers, sizeof(uint8_t *));
        b->rows[r].frame_len = calloc((size_t)c->n_layers, sizeof(size_t));
        if (b->rows[r].frames == NULL || b->rows[r].frame_len == NULL) {
            qual_batch_destroy(b);
            return FY_ERR_NO_MEMORY;
        }
        b->window = FY_MAX(b->window, (int)b->rows[r].cfg.policy.window);
    }
    *batch_p = b;
    return FY_OK;
}

/* Prefill callback: one finished layer, coded for every row. */
static fy_status_t on_layer(void *arg, const mdl_layer_kv_t *kv)
{
    qual_batch_t *b = arg;
    int n = kv->n_tokens, hd = kv->head_dim, n_kv = kv->n_kv_heads;
    size_t ne = (size_t)n_kv * n * hd;
    fy_fp32_to_fp16_buf(b->k16, kv->k, ne);
    fy_fp32_to_fp16_buf(b->v16, kv->v, ne);
    for (int r = 0; r < b->n_all; r++) {
        row_t *w = &b->rows[r];
        // Each encoder gets the last `window` queries of its policy, contiguous per head.
        uint32_t win = FY_MIN(w->cfg.policy.window, (uint32_t)kv->n_window);
        for (int h = 0; h < kv->n_heads; h++)
            memcpy(b->qwin + (size_t)h * win * hd,
                   kv->q_window + ((size_t)h * kv->n_window + (kv->n_window - win)) * hd,
                   sizeof(float) * win * hd);
        kvc_layer_input_t in = {.layer = (uint32_t)kv->layer,
                                .k = b->k16,
                                .v = b->v16,
                                .head_stride = (size_t)n * hd,
                                .token_stride = (size_t)hd,
                                .q_window = win > 0 ? b->qwin : NULL,
                                .n_window = win};
        // A one-layer row runs its policy's encoder up to its layer (encoders take layers in
        // order) and keeps that frame; every other layer comes from its FP16 encoder.
        bool own = w->cfg.only_layer < 0 || w->cfg.only_layer == kv->layer;
        size_t len = 0;
        kvc_layer_info_t info;
        fy_status_t st;
        if (w->enc16 == NULL) {
            st = kvc_encoder_encode_layer(w->enc, &in, NULL, b->frame_buf, b->frame_cap, &len,
                                          &info);
        } else {
            st = kvc_encoder_encode_layer(w->enc16, &in, NULL, b->frame_buf, b->frame_cap, &len,
                                          &info);
            if (st == FY_OK && kv->layer <= w->cfg.only_layer) {
                size_t len2 = 0;
                kvc_layer_info_t info2;
                st = kvc_encoder_encode_layer(w->enc, &in, NULL, b->frame_buf2, b->frame_cap,
                                              &len2, &info2);
                if (st == FY_OK && own) {
                    memcpy(b->frame_buf, b->frame_buf2, len2);
                    len = len2;
                    info = info2;
                }
            }
        }
        if (st != FY_OK) {
            fy_log(FY_LOG_ERROR, "quality", "%s: coding layer %d failed: %s", w->cfg.label,
                   kv->layer, fy_status_str(st));
            return st;
        }
        if ((w->frames[kv->layer] = malloc(len)) == NULL)
            return FY_ERR_NO_MEMORY;
        memcpy(w->frames[kv->layer], b->frame_buf, len);
        w->frame_len[kv->layer] = len;
        w->info.wire_bytes += len;
        w->info.fp16_bytes += info.fp16_bytes;
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            w->info.tokens[o] += info.tokens[o];
        w->info.budget_met = w->info.budget_met && info.budget_met;
        if (own) {
            if (w->n_lambda == 0)
                w->info.lambda_first = info.lambda;
            w->lambda_sum += info.lambda;
            w->n_lambda++;
            w->info.lambda_mean = w->lambda_sum / w->n_lambda;
        }
    }
    return FY_OK;
}

/* The budget whose frames hold exactly the pinned sinks of every layer (docs/kvcodec-format.md
 * §2: header, maps padded to 8 bytes, 4d bytes per 16/16 token, CRC), plus half a token of
 * slack for the rounding of b: the rate controller cannot buy one more token anywhere. */
static double sinks_budget(const mdl_config_t *c, const kvc_policy_t *p, int n)
{
    uint64_t d = (uint64_t)c->head_dim, h = (uint64_t)c->n_kv_heads;
    uint64_t maps = (h * (((uint64_t)n + 1) / 2) + 7) / 8 * 8;
    uint64_t frame = KVC_FRAME_HEADER_BYTES + maps + FY_MIN(p->sinks, (uint64_t)n) * h * 4 * d + 4;
    uint64_t fp16 = 4 * h * (uint64_t)n * d;
    return ((double)frame * c->n_layers + 2.0 * d) / ((double)fp16 * c->n_layers);
}

/* One encoder per row for a context of n tokens. */
static fy_status_t make_encoders(qual_batch_t *b, int n, const kvc_policy_t *fp16)
{
    const mdl_config_t *c = b->c;
    // One-layer rows' other layers: FP16 frames with the batch's G and P.
    kvc_policy_t f16 = *fp16;
    f16.group = b->group;
    f16.protect_channels = b->protect;
    for (int r = 0; r < b->n_all; r++) {
        row_t *w = &b->rows[r];
        kvc_encoder_params_t p;
        kvc_encoder_params_default(&p);
        p.policy = &w->cfg.policy;
        p.budget = qual_policy_has_budget(&w->cfg.policy) && w->cfg.budget >= 0 ? w->cfg.budget
                                                                                : -1;
        p.n_layers = (uint32_t)c->n_layers;
        p.n_heads = (uint32_t)c->n_heads;
        p.n_kv_heads = (uint32_t)c->n_kv_heads;
        p.head_dim = (uint32_t)c->head_dim;
        p.n_tokens = (uint32_t)n;
        p.model_fingerprint = QUAL_FINGERPRINT;
        p.seq_id = (uint64_t)r + 1;
        if (w->cfg.sinks_only)
            p.budget = sinks_budget(c, &w->cfg.policy, n);
        fy_status_t st = kvc_encoder_create(&p, &w->enc);
        if (st == FY_OK && w->cfg.only_layer >= 0) {
            p.policy = &f16;
            p.budget = -1;
            st = kvc_encoder_create(&p, &w->enc16);
        }
        if (st != FY_OK)
            return st;
        b->frame_cap = FY_MAX(b->frame_cap, kvc_encoder_max_frame_bytes(w->enc));
        w->info.budget_met = true;
    }
    return FY_OK;
}

/* Parses every row's frames, sizes one pool for them plus max_new appended tokens per
 * (row, layer, head), and places each row into its own sequence. */
static fy_status_t place_rows(qual_batch_t *b, int max_new)
{
    const mdl_config_t *c = b->c;
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = (uint32_t)c->head_dim;
    pp.group = b->group;
    pp.protect = b->protect;
    pp.n_pages = 1;
    kvc_pool_t *probe;
    fy_status_t st = kvc_pool_create(&pp, &probe);
    if (st != FY_OK)
        return st;
    size_t nf = (size_t)b->n_all * c->n_layers;
    kvc_frame_t *f = calloc(nf, sizeof(kvc_frame_t)); // [n_all][n_layers]
    uint64_t need = 0;
    if (f == NULL)
        st = FY_ERR_NO_MEMORY;
    for (size_t i = 0; i < nf && st == FY_OK; i++) {
        row_t *w = &b->rows[i / (size_t)c->n_layers];
        size_t l = i % (size_t)c->n_layers;
        uint32_t np = 0;
        st = kvc_frame_parse(w->frames[l], w->frame_len[l], &f[i]);
        if (st == FY_OK)
            st = kvc_pool_pages_needed(probe, &f[i], &np);
        need += np;
    }
    uint32_t tail_tokens = kvc_pool_page_tokens(probe, KVC_OPT_F16);
    kvc_pool_destroy(probe);
    // The FP16 tail: max_new tokens per (row, layer, head), plus the page each starts on.
    need += (uint64_t)b->n_all * c->n_layers * c->n_kv_heads *
            (((uint64_t)max_new + tail_tokens - 1) / tail_tokens + 1);
    if (st == FY_OK && need > UINT32_MAX)
        st = FY_ERR_OUT_OF_RANGE;
    pp.n_pages = (uint32_t)FY_MAX(need, 1);
    if (st == FY_OK)
        st = kvc_pool_create(&pp, &b->pool);
    for (int r = 0; r < b->n_all && st == FY_OK; r++) {
        row_t *w = &b->rows[r];
        st = kvc_seq_create(b->pool, (uint32_t)c->n_layers, (uint32_t)c->n_kv_heads,
                            QUAL_FINGERPRINT, (uint64_t)r + 1, &w->seq);
        b->seqs[r] = w->seq;
        for (int l = 0; l < c->n_layers && st == FY_OK; l++)
            st = kvc_place(w->seq, &f[(size_t)r * c->n_layers + l]);
    }
    free(f);
    return st;
}

/* Stand-in: dequantizes row r's frames into an FP16 cache sequence. */
static fy_status_t load_row_dequant(qual_batch_t *b, row_t *w, int n)
{
    const mdl_config_t *c = b->c;
    size_t ne = (size_t)c->n_kv_heads * n * c->head_dim;
    float *k = malloc(ne * sizeof(float)), *v = malloc(ne * sizeof(float));
    fy_status_t st = k != NULL && v != NULL ? mdl_kv_seq_create(b->kv, &w->kseq)
                                            : FY_ERR_NO_MEMORY;
    for (int l = 0; l < c->n_layers && st == FY_OK; l++) {
        kvc_frame_t f;
        st = kvc_frame_parse(w->frames[l], w->frame_len[l], &f);
        if (st == FY_OK)
            st = kvc_frame_dequantize(&f, k, v, NULL);
        if (st == FY_OK)
            st = mdl_kv_seq_load_layer(w->kseq, l, n, k, v);
    }
    if (st == FY_OK)
        st = mdl_kv_seq_commit(w->kseq, n);
    free(k);
    free(v);
    return st;
}

fy_status_t qual_batch_start(qual_batch_t *b, const int32_t *tokens, int n, int max_new,
                             float *logits)
{
    if (b == NULL || tokens == NULL || n <= 0 || max_new < 0)
        return FY_ERR_INVALID_ARG;
    const mdl_config_t *c = b->c;
    if ((int64_t)n + max_new > c->n_ctx_train)
        return FY_ERR_OUT_OF_RANGE;
    batch_reset(b);
    kvc_policy_t fp16;
    kvc_policy_builtin("fp16", &fp16);
    size_t ne = (size_t)c->n_kv_heads * n * c->head_dim;
    b->k16 = malloc(ne * sizeof(uint16_t));
    b->v16 = malloc(ne * sizeof(uint16_t));
    b->qwin = malloc(sizeof(float) * (size_t)c->n_heads * FY_MAX(b->window, 1) * c->head_dim);
    float *own = logits != NULL ? NULL : malloc(sizeof(float) * (size_t)c->n_vocab);
    fy_status_t st = b->k16 && b->v16 && b->qwin && (logits || own) ? FY_OK : FY_ERR_NO_MEMORY;
    if (st == FY_OK)
        st = make_encoders(b, n, &fp16);
    if (st == FY_OK && ((b->frame_buf = malloc(b->frame_cap)) == NULL ||
                        (b->frame_buf2 = malloc(b->frame_cap)) == NULL))
        st = FY_ERR_NO_MEMORY;
    if (st == FY_OK) {
        mdl_prefill_params_t pp;
        mdl_prefill_params_default(&pp);
        pp.on_layer = on_layer;
        pp.cb_arg = b;
        pp.window = b->window;
        st = mdl_prefill(b->ctx, tokens, n, &pp, logits != NULL ? logits : own);
    }
    free(own);
    if (st == FY_OK && b->mode == QUAL_DECODE_DEQUANT) {
        mdl_kv_params_t kp;
        mdl_kv_params_default(&kp, b->m);
        kp.n_pages = b->n_all * mdl_kv_pages_for(&kp, (int64_t)n + max_new);
        st = mdl_kv_create(&kp, &b->kv);
    }
    if (st == FY_OK && b->mode == QUAL_DECODE_KVC)
        st = place_rows(b, max_new);
    for (int r = 0; r < b->n_all && st == FY_OK && b->mode == QUAL_DECODE_DEQUANT; r++) {
        st = load_row_dequant(b, &b->rows[r], n);
        b->kseqs[r] = b->rows[r].kseq;
    }
    // The frames are placed (or loaded); only the coding facts are kept.
    for (int r = 0; r < b->n_all; r++) {
        for (int l = 0; l < c->n_layers; l++) {
            free(b->rows[r].frames[l]);
            b->rows[r].frames[l] = NULL;
        }
    }
    free(b->k16), free(b->v16), free(b->qwin), free(b->frame_buf), free(b->frame_buf2);
    b->k16 = b->v16 = NULL;
    b->qwin = NULL;
    b->frame_buf = b->frame_buf2 = NULL;
    if (st != FY_OK) {
        batch_reset(b);
        return st;
    }
    b->n_tokens = n;
    b->pos = n;
    return FY_OK;
}

fy_status_t qual_batch_step(qual_batch_t *b, const int32_t *tokens, float *logits)
{
    if (b == NULL || tokens == NULL || logits == NULL)
        return FY_ERR_INVALID_ARG;
    if (b->n_tokens == 0)
        return FY_ERR_STATE;
    memcpy(b->step_tokens, tokens, sizeof(int32_t) * (size_t)b->n_rows);
    for (int r = b->n_rows; r < b->n_all; r++)
        b->step_tokens[r] = tokens[0]; // the hidden row follows the reference
    float *out = b->n_all > b->n_rows ? b->step_logits : logits;
    fy_status_t st;
    if (b->mode == QUAL_DECODE_DEQUANT) {
        st = mdl_decode(b->ctx, b->kseqs, b->step_tokens, b->n_all, out);
    } else {
        // Every row continues at the same RoPE position, whatever it evicted.
        for (int r = 0; r < b->n_all; r++)
            b->step_pos[r] = (int32_t)b->pos;
        st = mdl_decode_kvc(b->ctx, b->pool, b->seqs, b->step_pos, b->step_tokens, b->n_all,
                            out);
    }
    if (st == FY_OK && out != logits)
        memcpy(logits, out, sizeof(float) * (size_t)b->n_rows * (size_t)b->c->n_vocab);
    if (st == FY_OK)
        b->pos++;
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Metrics                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* log-sum-exp of a row and its argmax. */
static double row_lse(const float *l, int n, int32_t *argmax_p)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        best = l[i] > l[best] ? i : best;
    double mx = l[best], s = 0;
    for (int i = 0; i < n; i++)
        s += exp((double)l[i] - mx);
    *argmax_p = best;
    return mx + log(s);
}

void qual_acc_add_step(qual_acc_t *acc, int n_rows, const float *logits, int n_vocab,
                       int32_t target)
{
    int32_t ref_top;
    const float *ref = logits;
    double ref_lse = row_lse(ref, n_vocab, &ref_top);
    for (int r = 0; r < n_rows; r++) {
        const float *l = logits + (size_t)r * n_vocab;
        int32_t top;
        double lse = r == 0 ? ref_lse : row_lse(l, n_vocab, &top);
        if (r == 0)
            top = ref_top;
        double kl = 0;
        if (r > 0) {
            // KL(ref || row) = sum p_ref (log p_ref - log p_row)
            for (int i = 0; i < n_vocab; i++) {
                double lp = (double)ref[i] - ref_lse;
                kl += exp(lp) * (lp - ((double)l[i] - lse));
            }
        }
        acc[r].nll_sum += lse - (double)l[target];
        acc[r].kl_sum += kl > 0 ? kl : 0; // rounding can make an exact 0 slightly negative
        acc[r].top1_agree += top == ref_top;
        acc[r].n_pred++;
    }
}

void qual_acc_add_code(qual_acc_t *acc, const qual_batch_t *b)
{
    for (int r = 0; r < b->n_rows; r++) {
        const qual_code_info_t *i = &b->rows[r].info;
        acc[r].wire_bytes += i->wire_bytes;
        acc[r].fp16_bytes += i->fp16_bytes;
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            acc[r].tokens[o] += i->tokens[o];
        acc[r].n_contexts++;
        acc[r].n_budget_met += i->budget_met;
        acc[r].lambda_first_sum += i->lambda_first;
        acc[r].lambda_mean_sum += i->lambda_mean;
    }
}

void qual_acc_metrics(const qual_acc_t *acc, int row, qual_metrics_t *m)
{
    memset(m, 0, sizeof(*m));
    const qual_acc_t *a = &acc[row], *r0 = &acc[0];
    if (a->n_pred == 0 || r0->n_pred == 0)
        return;
    m->ppl = exp(a->nll_sum / (double)a->n_pred);
    m->ppl_ref = exp(r0->nll_sum / (double)r0->n_pred);
    // Ratio of perplexities from the NLL difference, so equal sums give exactly 0.
    m->dppl_pct = 100.0 * expm1(a->nll_sum / (double)a->n_pred - r0->nll_sum / (double)r0->n_pred);
    m->top1_pct = 100.0 * (double)a->top1_agree / (double)a->n_pred;
    m->kl_mean = a->kl_sum / (double)a->n_pred;
    m->wire_ratio = a->fp16_bytes > 0 ? (double)a->wire_bytes / (double)a->fp16_bytes : 0;
}

fy_status_t qual_eval_text(qual_batch_t *b, const int32_t *tokens, int n_ctx, int n_cont,
                           qual_acc_t *acc, qual_progress_cb progress, void *arg)
{
    if (b == NULL || tokens == NULL || acc == NULL || n_ctx <= 0 || n_cont < 2)
        return FY_ERR_INVALID_ARG;
    int nr = b->n_rows, nv = b->c->n_vocab;
    fy_status_t st = qual_batch_start(b, tokens, n_ctx, n_cont, NULL);
    if (st != FY_OK)
        return st;
    qual_acc_add_code(acc, b);
    int32_t *in = malloc(sizeof(int32_t) * (size_t)nr);
    float *logits = malloc(sizeof(float) * (size_t)nr * nv);
    if (in == NULL || logits == NULL)
        st = FY_ERR_NO_MEMORY;
    for (int i = 0; i < n_cont - 1 && st == FY_OK; i++) {
        for (int r = 0; r < nr; r++)
            in[r] = tokens[n_ctx + i];
        if ((st = qual_batch_step(b, in, logits)) != FY_OK)
            break;
        qual_acc_add_step(acc, nr, logits, nv, tokens[n_ctx + i + 1]);
        if (progress != NULL)
            progress(arg, (uint64_t)i + 1, (uint64_t)n_cont - 1);
    }
    free(in);
    free(logits);
    return st;
}
