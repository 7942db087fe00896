/*
 * decode_kvc.c: decode over kvcodec pages, what a decode worker runs after a prompt's KV
 * arrived from a prefill worker.
 *
 * The sequence's cache is a kvc_seq_t: the prompt placed from wire frames, still compressed
 * (FP16 / INT8 / INT4 / INT2 groups, evicted tokens absent), plus an FP16 tail that grows by
 * one token per step. The forward pass is mdl_decode's (mdl_decode_ext in llama.c); only the
 * two places that touch the cache differ: the new token's K and V are appended to the tail
 * (kvc_seq_append, FP16 as the mdl_kv pages hold them), and attention walks the page list
 * dequantizing in registers (kvc_attend_layer). K stays in the GGUF head order that prefill
 * hands out (mdl_layer_kv_t), and the step's queries come from the same rows, so scores are
 * the same as over the FP16 mdl_kv cache. Positions come from the caller: with evicted
 * tokens a sequence holds fewer tokens than its RoPE position.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model_int.h"

/* Largest head_dim the FP16 conversion scratch below takes (kvcodec's own limit is 512). */
enum { KVC_STEP_MAX_HEAD_DIM = 512 };

typedef struct {
    kvc_seq_t *const *seqs; // [n] borrowed for the step
    int n_heads, n_kv, head_dim;
    float scale;
} kvc_step_t;

/* Pages the next token of seq needs over its n_layers x n_kv lists. */
static uint32_t step_pages(const kvc_pool_t *pool, const kvc_seq_t *seq, int n_layers, int n_kv)
{
    uint32_t need = 0;
    uint32_t tail_cap = kvc_pool_page_tokens(pool, KVC_OPT_F16);
    for (int l = 0; l < n_layers; l++) {
        for (int h = 0; h < n_kv; h++) {
            uint32_t n;
            const kvc_page_id_t *ids = kvc_seq_pages(seq, (uint32_t)l, (uint32_t)h, &n);
            if (ids == NULL || n == 0) {
                need++;
                continue;
            }
            // kvc_seq_append writes into the last page only when it is an unshared FP16 page
            // with a free slot.
            kvc_page_id_t last = ids[n - 1];
            if (kvc_page_opt(pool, last) != KVC_OPT_F16 ||
                kvc_page_n_tokens(pool, last) >= tail_cap || kvc_page_refcount(pool, last) != 1)
                need++;
        }
    }
    return need;
}

uint32_t mdl_kvc_step_pages(const mdl_model_t *model, const kvc_pool_t *pool,
                            const kvc_seq_t *seq)
{
    if (model == NULL || pool == NULL || seq == NULL)
        return 0;
    const mdl_config_t *c = mdl_model_config(model);
    return step_pages(pool, seq, c->n_layers, c->n_kv_heads);
}

static fy_status_t kvc_store(void *arg, int row, int layer, const float *k, const float *v)
{
    kvc_step_t *s = arg;
    uint16_t k16[KVC_STEP_MAX_HEAD_DIM], v16[KVC_STEP_MAX_HEAD_DIM];
    size_t hd = (size_t)s->head_dim;
    for (int h = 0; h < s->n_kv; h++) {
        fy_fp32_to_fp16_buf(k16, k + (size_t)h * hd, hd);
        fy_fp32_to_fp16_buf(v16, v + (size_t)h * hd, hd);
        fy_status_t st = kvc_seq_append(s->seqs[row], (uint32_t)layer, (uint32_t)h, k16, v16);
        if (st != FY_OK)
            return st;
    }
    return FY_OK;
}

typedef struct {
    const kvc_step_t *s;
    int layer;
    const float *q;
    size_t q_stride;
    float *out;
    size_t out_stride;
    fy_status_t status; // first failure (any non-OK value will do)
} kvc_att_batch_t;

/* Work item = one sequence; each runs its kv heads on this thread. */
static void kvc_att_range(void *arg, size_t begin, size_t end, int thread)
{
    (void)thread;
    kvc_att_batch_t *a = arg;
    for (size_t r = begin; r < end; r++) {
        fy_status_t st = kvc_attend_layer(a->s->seqs[r], (uint32_t)a->layer,
                                          (uint32_t)a->s->n_heads, a->q + r * a->q_stride,
                                          a->s->scale, a->out + r * a->out_stride, NULL);
        if (st != FY_OK)
            a->status = st;
    }
}

static fy_status_t kvc_attend_rows(void *arg, int layer, int n, const float *q, size_t q_stride,
                                   float *out, size_t out_stride, fy_pool_t *threads)
{
    kvc_step_t *s = arg;
    // One sequence: its kv heads spread over the pool. Several: one sequence per work item,
    // which keeps every worker busy once the batch is as wide as the pool.
    if (n == 1)
        return kvc_attend_layer(s->seqs[0], (uint32_t)layer, (uint32_t)s->n_heads, q, s->scale,
                                out, threads);
    kvc_att_batch_t a = {.s = s, .layer = layer, .q = q, .q_stride = q_stride, .out = out,
                         .out_stride = out_stride, .status = FY_OK};
    fy_pool_parallel_for(threads, (size_t)n, 1, kvc_att_range, &a);
    return a.status;
}

fy_status_t mdl_decode_kvc(mdl_ctx_t *ctx, kvc_pool_t *pool, kvc_seq_t *const *seqs,
                           const int32_t *pos, const int32_t *tokens, int n, float *logits)
{
    if (ctx == NULL || pool == NULL || seqs == NULL || pos == NULL || tokens == NULL ||
        logits == NULL || n <= 0)
        return FY_ERR_INVALID_ARG;
    const mdl_config_t *c = mdl_model_config(mdl_ctx_model(ctx));
    if (c->head_dim > KVC_STEP_MAX_HEAD_DIM)
        return FY_ERR_UNSUPPORTED;
    uint64_t need = 0;
    for (int i = 0; i < n; i++) {
        if (seqs[i] == NULL)
            return FY_ERR_INVALID_ARG;
        for (int j = 0; j < i; j++) {
            if (seqs[j] == seqs[i])
                return FY_ERR_INVALID_ARG;
        }
        // Every layer of the prompt must be in, and no more layers than the model has.
        for (int l = 0; l < c->n_layers; l++) {
            if (!kvc_seq_layer_placed(seqs[i], (uint32_t)l))
                return FY_ERR_STATE;
        }
        if (kvc_seq_pages(seqs[i], (uint32_t)c->n_layers, 0, NULL) != NULL)
            return FY_ERR_MISMATCH;
        need += step_pages(pool, seqs[i], c->n_layers, c->n_kv_heads);
    }
    // All tail pages this step can take are there before anything is appended, so a full
    // pool fails the step cleanly (the caller owns the pool; nobody else allocates from it
    // while the step runs, or their pages are accounted for elsewhere, as leases do).
    if (need > kvc_pool_free_count(pool))
        return FY_ERR_RESOURCE_EXHAUSTED;
    kvc_step_t s = {.seqs = seqs, .n_heads = c->n_heads, .n_kv = c->n_kv_heads,
                    .head_dim = c->head_dim, .scale = 1.0f / sqrtf((float)c->head_dim)};
    mdl_decode_ops_t ops = {.store = kvc_store, .attend = kvc_attend_rows};
    return mdl_decode_ext(ctx, tokens, pos, n, &ops, &s, logits);
}

/* ------------------------------------------------------------------------------------------ */
/* The same over a GPU page pool (the forward pass is mdl_cuda_decode_kvc in llama_cuda.c)      */
/* ------------------------------------------------------------------------------------------ */

uint32_t mdl_kvc_step_pages_cuda(const mdl_model_t *model, const kvc_gpu_pool_t *pool,
                                 const kvc_gpu_seq_t *seq)
{
    if (model == NULL || pool == NULL || seq == NULL)
        return 0;
    const mdl_config_t *c = mdl_model_config(model);
    return kvc_gpu_seq_append_pages(seq, (uint32_t)c->n_layers, (uint32_t)c->n_kv_heads);
}

fy_status_t mdl_decode_kvc_cuda(mdl_ctx_t *ctx, kvc_gpu_pool_t *pool, kvc_gpu_seq_t *const *seqs,
                                const int32_t *pos, const int32_t *tokens, int n, float *logits)
{
    if (ctx == NULL || pool == NULL || seqs == NULL || pos == NULL || tokens == NULL ||
        logits == NULL || n <= 0)
        return FY_ERR_INVALID_ARG;
#if !FY_HAVE_CUDA
    return FY_ERR_NO_DEVICE;
#else
    const mdl_model_t *m = mdl_ctx_model(ctx);
    const mdl_config_t *c = mdl_model_config(m);
    if (mdl_model_device(m) != MDL_DEVICE_CUDA)
        return FY_ERR_INVALID_ARG;
    if (kvc_gpu_pool_head_dim(pool) != (uint32_t)c->head_dim)
        return FY_ERR_MISMATCH;
    uint64_t need = 0;
    for (int i = 0; i < n; i++) {
        if (seqs[i] == NULL || kvc_gpu_seq_pool(seqs[i]) != pool)
            return FY_ERR_INVALID_ARG;
        for (int j = 0; j < i; j++) {
            if (seqs[j] == seqs[i])
                return FY_ERR_INVALID_ARG;
        }
        for (int l = 0; l < c->n_layers; l++) {
            if (!kvc_gpu_seq_layer_placed(seqs[i], (uint32_t)l))
                return FY_ERR_STATE;
        }
        if (kvc_gpu_seq_n_layers(seqs[i]) != (uint32_t)c->n_layers ||
            kvc_gpu_seq_n_kv_heads(seqs[i]) != (uint32_t)c->n_kv_heads)
            return FY_ERR_MISMATCH;
        need += kvc_gpu_seq_append_pages(seqs[i], (uint32_t)c->n_layers,
                                         (uint32_t)c->n_kv_heads);
    }
    // As on the CPU: every tail page of the step is there before anything is appended.
    if (need > kvc_gpu_pool_free_count(pool))
        return FY_ERR_RESOURCE_EXHAUSTED;
    return mdl_decode_kvc_cuda_run(ctx, pool, seqs, pos, tokens, n, logits);
#endif
}
