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

/* mdl_decode_kvc_cuda after its sequence and page checks: checks the context (CUDA), batch
 * size, tokens and positions, then runs mdl_cuda_decode_kvc. Thread: one call at a time per
 * ctx. */
fy_status_t mdl_decode_kvc_cuda_run(mdl_ctx_t *ctx, kvc_gpu_pool_t *pool,
                                    kvc_gpu_seq_t *const *seqs, const int32_t *pos,
                                    const int32_t *tokens, int n, float *logits);

/* ---- Pool internals the CUDA forward pass reads (kvcache.c) ---- */

const mdl_kv_params_t *mdl_kv_params_of(const mdl_kv_t *kv);
mdl_kv_t *mdl_kv_seq_pool(const mdl_kv_seq_t *seq);
/* The pool memory: [n_pages][page_elems] FP16 (device memory for a CUDA pool). */
uint16_t *mdl_kv_mem(const mdl_kv_t *kv);
size_t mdl_kv_page_elems(const mdl_kv_t *kv);
/* Pages per list the sequence holds, and the id of page i of list (layer, head). */
int64_t mdl_kv_seq_n_pages(const mdl_kv_seq_t *seq);
int64_t mdl_kv_seq_page_id(const mdl_kv_seq_t *seq, int layer, int head, int64_t i);

/* ---- Device memory for CUDA pools (llama_cuda.c; FY_ERR_NO_DEVICE without CUDA) ---- */

fy_status_t mdl_dev_alloc(size_t bytes, void **ptr_p);
void mdl_dev_free(void *ptr); /* accepts NULL */
fy_status_t mdl_dev_copy_d2h(void *dst, const void *src, size_t bytes);
/* Writes n_tokens tokens of K and V (host FP32 [n_kv_heads][n_tokens][head_dim]) at positions
 * pos0.. into the pages of a CUDA pool (mem), page ids [n_kv_heads][n_ids] (host); returns when
 * they are in place. */
fy_status_t mdl_dev_store_layer(const mdl_kv_params_t *p, uint16_t *mem, const int32_t *ids,
                                int n_ids, int64_t pos0, int64_t n_tokens, const float *k,
                                const float *v);

/* ---- The CUDA forward pass (llama_cuda.c) ---- */

typedef struct mdl_cuda_model mdl_cuda_model_t;
typedef struct mdl_cuda_ctx mdl_cuda_ctx_t;

/* Uploads the weights of g (shape-checked as the CPU loader does) to the GPU in FP16. cfg is
 * the model's (copied). Thread: any. */
fy_status_t mdl_cuda_model_load(const mdl_gguf_t *g, const mdl_config_t *cfg,
                                mdl_cuda_model_t **w_p, char *err, size_t err_len);
void mdl_cuda_model_destroy(mdl_cuda_model_t *w);

fy_status_t mdl_cuda_ctx_create(const mdl_cuda_model_t *w, const mdl_ctx_params_t *p,
                                mdl_cuda_ctx_t **ctx_p);
void mdl_cuda_ctx_destroy(mdl_cuda_ctx_t *ctx);

/* Prefill of validated tokens[n] with a window of w (<= n) queries; when params->seq is set
 * its pages for n tokens are reserved and on a CUDA pool. Writes logits like mdl_prefill.
 * Does not commit the sequence. */
fy_status_t mdl_cuda_prefill(mdl_cuda_ctx_t *ctx, const int32_t *tokens, int n, int w,
                             const mdl_prefill_params_t *params, float *logits);
/* One decode step over validated, distinct sequences of one CUDA pool, each with a page
 * reserved for its next token. Does not commit. */
fy_status_t mdl_cuda_decode(mdl_cuda_ctx_t *ctx, mdl_kv_seq_t *const *seqs,
                            const int32_t *tokens, int n, float *logits);

/* One decode step over kvcodec pages in a GPU pool: validated tokens and positions, distinct
 * placed sequences of pool whose tail pages for this step are free. Appends each token's K
 * and V (kvc_gpu_seq_append_slot for every layer first, then one device write per layer) and
 * attends over the pages. Writes logits [n][n_vocab]. */
fy_status_t mdl_cuda_decode_kvc(mdl_cuda_ctx_t *ctx, kvc_gpu_pool_t *pool,
                                kvc_gpu_seq_t *const *seqs, const int32_t *pos,
                                const int32_t *tokens, int n, float *logits);

/* Unicode classes the pre-tokenizers need (unicode.c). */
bool mdl_uni_is_letter(uint32_t cp);
bool mdl_uni_is_number(uint32_t cp);
bool mdl_uni_is_space(uint32_t cp);
/* Simple lowercase mapping for the case-insensitive contractions (ASCII is enough there). */

/* ---- JSON mode's pieces that the JSON schema guide reuses (json_guide.c) ---- */

struct mdl_json_vocab {
    int n_vocab;
    uint32_t *off, *len; // token id's bytes: text[off .. off + len]; len 0 for special tokens
    uint8_t *text;
    uint8_t *plain;  // [n_vocab]: no quote, backslash or control byte (inside a string it only
                     // extends the string: the common case needs no stepping)
    uint16_t *chars; // [n_vocab]: a plain token's characters (bytes that start one)
};

/* A recognizer of any one JSON value (not only an object), complete once the value is: the
 * piece of text a schema leaves free. A number is complete only when a byte that is not
 * part of it comes; mdl_json_feed refuses that byte, and mdl_json_number_open then says that
 * the number read so far is whole. Thread: any. */
void mdl_json_init_value(mdl_json_t *j);
bool mdl_json_number_open(const mdl_json_t *j);
/* Sets the logits of every token but stops[n_stops] to -inf (a whole document); returns how
 * many remain. */
int mdl_json_mask_stops(const mdl_json_vocab_t *v, const int32_t *stops, int n_stops,
                        float *logits);

#endif /* FERRY_MODEL_INT_H */
