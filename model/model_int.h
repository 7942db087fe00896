/*
 * model_int.h: what the model module's files share and nobody else sees.
 */
#ifndef FERRY_MODEL_INT_H
#define FERRY_MODEL_INT_H

#include "model.h"

/* Writes one token's K and V (FP32, head_dim each) of one (layer, kv head) at position pos
 * (which must have a reserved page). Thread: calls on different (layer, head, pos) may run in
 * parallel. */
void mdl_kv_seq_write(mdl_kv_seq_t *seq, int layer, int head, int64_t pos, const float *k,
                      const float *v);

/* A decode step whose KV cache lives outside mdl_kv_t (decode_kvc.c keeps it in kvcodec
 * pages). Per layer, after Q/K/V and RoPE of every row, store receives row `row`'s new K and V
 * (k, v [n_kv_heads][head_dim] FP32, borrowed for the call); then attend computes the
 * attention output of all n rows: row r's queries at q + r * q_stride ([n_heads][head_dim]),
 * its output at out + r * out_stride ([n_heads][head_dim]); threads is the context's pool. */
typedef struct {
    fy_status_t (*store)(void *arg, int row, int layer, const float *k, const float *v);
    fy_status_t (*attend)(void *arg, int layer, int n, const float *q, size_t q_stride,
                          float *out, size_t out_stride, fy_pool_t *threads);
} mdl_decode_ops_t;

/* The model a context runs. Thread: any. */
const mdl_model_t *mdl_ctx_model(const mdl_ctx_t *ctx);

/* One decode step of n rows: token i at position pos[i], KV through ops; logits [n][n_vocab].
 * A failing callback aborts the step with its status (what was stored stays stored).
 * Thread: one call at a time per ctx. */
fy_status_t mdl_decode_ext(mdl_ctx_t *ctx, const int32_t *tokens, const int32_t *pos, int n,
                           const mdl_decode_ops_t *ops, void *arg, float *logits);

/* Unicode classes the pre-tokenizers need (unicode.c). */
bool mdl_uni_is_letter(uint32_t cp);
bool mdl_uni_is_number(uint32_t cp);
bool mdl_uni_is_space(uint32_t cp);
/* Simple lowercase mapping for the case-insensitive contractions (ASCII is enough there). */

#endif /* FERRY_MODEL_INT_H */
