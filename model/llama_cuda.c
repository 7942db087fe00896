/*
 * llama_cuda.c: the Llama-family forward pass on one GPU (MDL_DEVICE_CUDA), the twin of the
 * CPU path in llama.c, block for block:
 *   xn = RMSNorm(x) (FP16);  qkv = xn·Wqkvᵀ (+b);  RoPE(q, k)
 *   x += Attention(q, k, v)·Woᵀ
 *   xn = RMSNorm(x) (FP16);  x += (silu(xn·Wgateᵀ) * xn·Wupᵀ)·Wdownᵀ
 * GEMMs are cuBLAS with FP16 weights and inputs and FP32 accumulation and outputs; the residual
 * stream, RoPE, attention and softmax stay FP32, so the only rounding the CPU path does not do
 * is FP16 weights and FP16 GEMM inputs.
 *
 * Weights: the file's bytes of each tensor are uploaded as they are (host -> pinned chunks ->
 * device staging, two chunks in flight) and dequantized to FP16 on the GPU, once per model.
 *
 * Prefill runs the whole prompt layer by layer on the compute stream. When a layer is done its
 * K (after RoPE) and V [n_kv_heads][n][head_dim], window queries and window scores are copied
 * to pinned host buffers on a second stream (ordered by events), and the callback for layer l
 * runs on the host while the GPU computes layer l + 1. Two buffer sets alternate; layer l + 2
 * waits for the copy of layer l before reusing its set.
 *
 * Decode runs a batch of sequences over the FP16 pages of a CUDA KV pool: the host builds one
 * page table per step ([batch][layer][kv head][page] int32), the new K/V are stored into their
 * pages on the GPU and decode attention reads the pages directly.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels_cuda.h"
#include "llama_cuda_int.h"
#include "model_int.h"

enum { LOAD_CHUNK = 32 << 20 }; // bytes per pinned upload chunk

static fy_status_t cu_status(cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return FY_OK;
    cudaGetLastError(); // clear a non-sticky error so later calls are not blamed for it
    fy_log(FY_LOG_ERROR, "model", "%s: %s", what, cudaGetErrorString(e));
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        return FY_ERR_NO_DEVICE;
    return krn_cuda_status(e);
}

#define CU(call)                                                                               \
    do {                                                                                       \
        if ((st = cu_status((call), #call)) != FY_OK)                                          \
            goto fail;                                                                         \
    } while (0)
#define TRY(call)                                                                              \
    do {                                                                                       \
        if ((st = (call)) != FY_OK)                                                            \
            goto fail;                                                                         \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Device memory for CUDA KV pools                                                              */
/* ------------------------------------------------------------------------------------------ */

fy_status_t mdl_dev_alloc(size_t bytes, void **ptr_p)
{
    if (fy_cuda_device_count() == 0)
        return FY_ERR_NO_DEVICE;
    void *p = NULL;
    fy_status_t st = cu_status(cudaMalloc(&p, bytes > 0 ? bytes : 1), "cudaMalloc");
    if (st == FY_OK)
        *ptr_p = p;
    return st;
}

void mdl_dev_free(void *ptr)
{
    if (ptr != NULL)
        cudaFree(ptr);
}

fy_status_t mdl_dev_copy_d2h(void *dst, const void *src, size_t bytes)
{
    return cu_status(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
}

fy_status_t mdl_dev_store_layer(const mdl_kv_params_t *p, uint16_t *mem, const int32_t *ids,
                                int n_ids, int64_t pos0, int64_t n_tokens, const float *k,
                                const float *v)
{
    size_t n_el = (size_t)p->n_kv_heads * (size_t)n_tokens * p->head_dim;
    size_t n_id = (size_t)p->n_kv_heads * (size_t)n_ids;
    float *dk = NULL, *dv = NULL;
    int32_t *did = NULL;
    cudaStream_t s = NULL;
    fy_status_t st;
    if (n_tokens <= 0 || n_tokens > INT32_MAX || pos0 < 0 || pos0 + n_tokens > INT32_MAX)
        return FY_ERR_INVALID_ARG;
    int32_t pos = (int32_t)pos0;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CU(cudaMalloc((void **)&dk, n_el * sizeof(float)));
    CU(cudaMalloc((void **)&dv, n_el * sizeof(float)));
    CU(cudaMalloc((void **)&did, (n_id + 1) * sizeof(int32_t)));
    CU(cudaMemcpyAsync(dk, k, n_el * sizeof(float), cudaMemcpyHostToDevice, s));
    CU(cudaMemcpyAsync(dv, v, n_el * sizeof(float), cudaMemcpyHostToDevice, s));
    CU(cudaMemcpyAsync(did, ids, n_id * sizeof(int32_t), cudaMemcpyHostToDevice, s));
    CU(cudaMemcpyAsync(did + n_id, &pos, sizeof(int32_t), cudaMemcpyHostToDevice, s));
    krn_paged_cuda_t cache = {.pool = mem,
                              .page_elems = 2 * (size_t)p->page_tokens * p->head_dim,
                              .n_pages = p->n_pages, .page_tokens = p->page_tokens,
                              .head_dim = p->head_dim, .page_ids = did, .ids_seq_stride = 0,
                              .max_pages = n_ids};
    TRY(krn_paged_store_f16_cuda(&cache, 1, p->n_kv_heads, (int)n_tokens, did + n_id, dk, dv, 0,
                                 (size_t)n_tokens * p->head_dim, (size_t)p->head_dim, s));
    CU(cudaStreamSynchronize(s)); // pageable sources: done only when the stream is
    st = FY_OK;
fail:
    if (s != NULL) {
        cudaStreamSynchronize(s);
        cudaStreamDestroy(s);
    }
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(did);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Weights                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    float *attn_norm; // [dim]
    float *ffn_norm;  // [dim]
    float *bqkv;      // [qkv_dim] or NULL
    uint16_t *wqkv;   // [q_dim + 2 * kv_dim][dim]
    uint16_t *wo;     // [dim][q_dim]
    uint16_t *wgu;    // [2 * ffn_dim][dim]: gate rows, then up rows
    uint16_t *wdown;  // [dim][ffn_dim]
} cu_layer_t;

struct mdl_cuda_model {
    mdl_config_t cfg;   // rope.freq_factors points to rope_freqs (device)
    uint16_t *tok_embd; // [n_vocab][dim]
    uint16_t *output;   // [n_vocab][dim]; == tok_embd when tied
    float *output_norm; // [dim]
    float *rope_freqs;  // [n_rot / 2] or NULL
    cu_layer_t *layers; // [n_layers]
};

void mdl_cuda_model_destroy(mdl_cuda_model_t *w)
{
    if (w == NULL)
        return;
    if (w->layers != NULL) {
        for (int l = 0; l < w->cfg.n_layers; l++) {
            cu_layer_t *y = &w->layers[l];
            cudaFree(y->attn_norm);
            cudaFree(y->ffn_norm);
            cudaFree(y->bqkv);
            cudaFree(y->wqkv);
            cudaFree(y->wo);
            cudaFree(y->wgu);
            cudaFree(y->wdown);
        }
    }
    free(w->layers);
    if (w->output != w->tok_embd)
        cudaFree(w->output);
    cudaFree(w->tok_embd);
    cudaFree(w->output_norm);
    cudaFree(w->rope_freqs);
    free(w);
}

typedef struct {
    const mdl_gguf_t *g;
    cudaStream_t s;
    uint8_t *staging; // device [cap]: one tensor's file bytes
    size_t cap;
    uint8_t *pinned[2]; // host [LOAD_CHUNK] each
    cudaEvent_t ev[2];  // the copy out of pinned[i] is done
    unsigned chunk;
    fy_pool_t *pool;    // host threads for the copies out of the mapping
    char *err;
    size_t err_len;
} loader_t;

static fy_status_t load_err(loader_t *L, fy_status_t st, const char *fmt, const char *name)
{
    if (L->err != NULL && L->err_len > 0)
        snprintf(L->err, L->err_len, fmt, name);
    return st;
}

/* Tensor `name` with shape [ne1][ne0] and a type the GPU can dequantize. */
static fy_status_t find_tensor(loader_t *L, const char *name, uint64_t ne0, uint64_t ne1,
                               const mdl_gguf_tensor_t **t_p)
{
    const mdl_gguf_tensor_t *t = mdl_gguf_find_tensor(L->g, name);
    if (t == NULL)
        return load_err(L, FY_ERR_NOT_FOUND, "model: tensor '%s' missing", name);
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return load_err(L, FY_ERR_FORMAT, "model: tensor '%s' has an unexpected shape", name);
    if (!mdl_tensor_type_supported(t->type))
        return load_err(L, FY_ERR_UNSUPPORTED, "model: tensor '%s' has an unsupported type",
                        name);
    *t_p = t;
    return FY_OK;
}

typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t len;
} copy_job_t;

enum { COPY_SLICE = 1 << 20 };

static void copy_range(void *arg, size_t begin, size_t end, int thread)
{
    copy_job_t *j = arg;
    for (size_t i = begin; i < end; i++) {
        size_t off = i * COPY_SLICE;
        memcpy(j->dst + off, j->src + off, FY_MIN((size_t)COPY_SLICE, j->len - off));
    }
}

/* Uploads tensor `name` [ne1][ne0] into dst (FP16, device, ne0 * ne1 elements). */
static fy_status_t upload_f16(loader_t *L, const char *name, uint64_t ne0, uint64_t ne1,
                              uint16_t *dst)
{
    const mdl_gguf_tensor_t *t;
    fy_status_t st = find_tensor(L, name, ne0, ne1, &t);
    if (st != FY_OK)
        return st;
    if (t->n_bytes > L->cap) {
        CU(cudaStreamSynchronize(L->s)); // the old staging buffer may still be read
        cudaFree(L->staging);
        L->staging = NULL;
        L->cap = 0;
        size_t cap = FY_ALIGN_UP((size_t)t->n_bytes, (size_t)1 << 20);
        CU(cudaMalloc((void **)&L->staging, cap));
        L->cap = cap;
    }
    const uint8_t *src = t->data;
    for (size_t off = 0; off < t->n_bytes; off += LOAD_CHUNK, L->chunk++) {
        unsigned b = L->chunk & 1;
        size_t len = FY_MIN((size_t)LOAD_CHUNK, (size_t)t->n_bytes - off);
        CU(cudaEventSynchronize(L->ev[b])); // pinned[b]'s previous copy has left
        copy_job_t job = {.dst = L->pinned[b], .src = src + off, .len = len};
        fy_pool_parallel_for(L->pool, (len + COPY_SLICE - 1) / COPY_SLICE, 1, copy_range, &job);
        CU(cudaMemcpyAsync(L->staging + off, L->pinned[b], len, cudaMemcpyHostToDevice, L->s));
        CU(cudaEventRecord(L->ev[b], L->s));
    }
    TRY(mdl_cuda_dequant_f16(dst, L->staging, t->type, (size_t)t->n_elems, (size_t)t->n_bytes,
                             L->s));
    return FY_OK;
fail:
    if (st == FY_ERR_FORMAT)
        load_err(L, st, "model: tensor '%s' could not be dequantized", name);
    return st;
}

static fy_status_t dev_alloc(void **p, size_t bytes)
{
    return cu_status(cudaMalloc(p, bytes > 0 ? bytes : 1), "cudaMalloc");
}

/* Reads tensor `name` [ne1][ne0] as FP32 on the host and copies it to a new device array. */
static fy_status_t upload_f32(loader_t *L, const char *name, uint64_t ne0, uint64_t ne1,
                              float **dst_p)
{
    const mdl_gguf_tensor_t *t;
    fy_status_t st = find_tensor(L, name, ne0, ne1, &t);
    if (st != FY_OK)
        return st;
    size_t n = (size_t)ne0 * (size_t)ne1;
    float *h = malloc(n * sizeof(float));
    if (h == NULL)
        return FY_ERR_NO_MEMORY;
    float *d = NULL;
    if ((st = mdl_gguf_tensor_to_f32(t, h)) == FY_OK &&
        (st = dev_alloc((void **)&d, n * sizeof(float))) == FY_OK) {
        st = cu_status(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice), "upload");
        if (st == FY_OK)
            *dst_p = d;
        else
            cudaFree(d);
    }
    free(h);
    return st;
}

static fy_status_t load_layer(loader_t *L, const mdl_config_t *c, int l, cu_layer_t *y)
{
    size_t dim = (size_t)c->dim, ffn = (size_t)c->ffn_dim;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t qkv_dim = q_dim + 2 * kv_dim;
    char name[96];
    fy_status_t st;
#define NAME(s) (snprintf(name, sizeof(name), "blk.%d.%s", l, s), name)
    TRY(upload_f32(L, NAME("attn_norm.weight"), dim, 1, &y->attn_norm));
    TRY(upload_f32(L, NAME("ffn_norm.weight"), dim, 1, &y->ffn_norm));
    TRY(dev_alloc((void **)&y->wqkv, qkv_dim * dim * 2));
    TRY(dev_alloc((void **)&y->wo, dim * q_dim * 2));
    TRY(dev_alloc((void **)&y->wgu, 2 * ffn * dim * 2));
    TRY(dev_alloc((void **)&y->wdown, dim * ffn * 2));
    TRY(upload_f16(L, NAME("attn_q.weight"), dim, q_dim, y->wqkv));
    TRY(upload_f16(L, NAME("attn_k.weight"), dim, kv_dim, y->wqkv + q_dim * dim));
    TRY(upload_f16(L, NAME("attn_v.weight"), dim, kv_dim, y->wqkv + (q_dim + kv_dim) * dim));
    TRY(upload_f16(L, NAME("attn_output.weight"), q_dim, dim, y->wo));
    TRY(upload_f16(L, NAME("ffn_gate.weight"), dim, ffn, y->wgu));
    TRY(upload_f16(L, NAME("ffn_up.weight"), dim, ffn, y->wgu + ffn * dim));
    TRY(upload_f16(L, NAME("ffn_down.weight"), ffn, dim, y->wdown));
    if (c->qkv_bias) {
        float *bq = NULL, *bk = NULL, *bv = NULL;
        st = upload_f32(L, NAME("attn_q.bias"), q_dim, 1, &bq);
        if (st == FY_OK)
            st = upload_f32(L, NAME("attn_k.bias"), kv_dim, 1, &bk);
        if (st == FY_OK)
            st = upload_f32(L, NAME("attn_v.bias"), kv_dim, 1, &bv);
        if (st == FY_OK)
            st = dev_alloc((void **)&y->bqkv, qkv_dim * sizeof(float));
        if (st == FY_OK)
            st = cu_status(cudaMemcpy(y->bqkv, bq, q_dim * 4, cudaMemcpyDeviceToDevice), "bias");
        if (st == FY_OK)
            st = cu_status(cudaMemcpy(y->bqkv + q_dim, bk, kv_dim * 4, cudaMemcpyDeviceToDevice),
                           "bias");
        if (st == FY_OK)
            st = cu_status(cudaMemcpy(y->bqkv + q_dim + kv_dim, bv, kv_dim * 4,
                                      cudaMemcpyDeviceToDevice),
                           "bias");
        cudaError_t e = cudaDeviceSynchronize(); // the copies out of bq, bk, bv are done
        if (st == FY_OK)
            st = cu_status(e, "bias");
        cudaFree(bq);
        cudaFree(bk);
        cudaFree(bv);
        if (st != FY_OK)
            goto fail;
    }
#undef NAME
    return FY_OK;
fail:
    return st;
}

fy_status_t mdl_cuda_model_load(const mdl_gguf_t *g, const mdl_config_t *cfg,
                                mdl_cuda_model_t **w_p, char *err, size_t err_len)
{
    if (fy_cuda_device_count() == 0) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "model: no CUDA device");
        return FY_ERR_NO_DEVICE;
    }
    mdl_cuda_model_t *w = calloc(1, sizeof(*w));
    loader_t L = {.g = g, .err = err, .err_len = err_len};
    fy_status_t st = FY_ERR_NO_MEMORY;
    if (w == NULL)
        return st;
    w->cfg = *cfg;
    w->cfg.rope.freq_factors = NULL;
    const mdl_config_t *c = &w->cfg;
    if ((w->layers = calloc((size_t)c->n_layers, sizeof(*w->layers))) == NULL)
        goto fail;
    TRY(fy_pool_create(0, &L.pool));
    CU(cudaStreamCreateWithFlags(&L.s, cudaStreamNonBlocking));
    for (int i = 0; i < 2; i++) {
        CU(cudaEventCreateWithFlags(&L.ev[i], cudaEventDisableTiming));
        CU(cudaMallocHost((void **)&L.pinned[i], LOAD_CHUNK));
    }
    size_t dim = (size_t)c->dim, vocab = (size_t)c->n_vocab;
    TRY(dev_alloc((void **)&w->tok_embd, vocab * dim * 2));
    TRY(upload_f16(&L, "token_embd.weight", dim, vocab, w->tok_embd));
    if (c->tied_embeddings) {
        w->output = w->tok_embd;
    } else {
        TRY(dev_alloc((void **)&w->output, vocab * dim * 2));
        TRY(upload_f16(&L, "output.weight", dim, vocab, w->output));
    }
    TRY(upload_f32(&L, "output_norm.weight", dim, 1, &w->output_norm));
    if (cfg->rope.freq_factors != NULL) {
        size_t nf = (size_t)c->rope.n_rot / 2;
        TRY(dev_alloc((void **)&w->rope_freqs, nf * sizeof(float)));
        CU(cudaMemcpy(w->rope_freqs, cfg->rope.freq_factors, nf * sizeof(float),
                      cudaMemcpyHostToDevice));
        w->cfg.rope.freq_factors = w->rope_freqs;
    }
    for (int l = 0; l < c->n_layers; l++)
        TRY(load_layer(&L, c, l, &w->layers[l]));
    // Everything (the loader stream and the synchronous copies of the small vectors on the
    // legacy stream) has landed before any context's stream reads it.
    CU(cudaDeviceSynchronize());
    *w_p = w;
    st = FY_OK;
    goto done;
fail:
    if (L.s != NULL)
        cudaStreamSynchronize(L.s);
    if (st == FY_ERR_RESOURCE_EXHAUSTED && err != NULL && err_len > 0)
        snprintf(err, err_len, "model: out of GPU memory loading weights");
    else if (err != NULL && err_len > 0 && err[0] == '\0')
        snprintf(err, err_len, "model: loading weights onto the GPU failed (%s)",
                 fy_status_str(st));
    mdl_cuda_model_destroy(w);
done:
    for (int i = 0; i < 2; i++) {
        if (L.ev[i] != NULL)
            cudaEventDestroy(L.ev[i]);
        cudaFreeHost(L.pinned[i]);
    }
    cudaFree(L.staging);
    if (L.s != NULL)
        cudaStreamDestroy(L.s);
    fy_pool_destroy(L.pool);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Run state                                                                                    */
/* ------------------------------------------------------------------------------------------ */

struct mdl_cuda_ctx {
    const mdl_cuda_model_t *w;
    mdl_ctx_params_t p;
    cudaStream_t s;      // compute
    cudaStream_t s_copy; // device -> host copies of finished layers
    cublasHandle_t blas;
    cudaEvent_t ev_done[2], ev_copied[2];
    // Device scratch, sized for cap_tokens rows (prompt tokens or batch rows).
    int cap_tokens;
    float *x;       // [n][dim] residual stream
    uint16_t *xh;   // [n][max(dim, q_dim, ffn_dim)] FP16 input of the next GEMM
    float *qkv;     // [n][qkv_dim] queries, keys, values after RoPE
    float *att;     // [n][q_dim] attention output
    float *gu;      // [n][2 * ffn_dim] gate | up
    float *k[2];    // [n_kv][n][head_dim] (two sets: layer l + 1 computes while l is copied)
    float *v[2];    // [n_kv][n][head_dim]
    float *win[2];  // [n_heads][n] window scores
    float *h_k[2], *h_v[2], *h_win[2]; // pinned host copies of the above
    uint16_t *k16[2], *v16[2];         // FP16 device copies of k, v (device_kv)
    int cap_window;
    float *qwin[2];      // [n_heads][w][head_dim]
    float *h_qwin[2];    // pinned
    float *att_scratch;  // [n_heads][w][2]
    int cap_logit_rows;
    float *logits;       // [rows][n_vocab]
    size_t cap_i32;
    int32_t *h_i32;      // pinned: tokens, positions, lengths, page table of one call
    int32_t *d_i32;      // device copy
    size_t cap_pa;
    float *pa_scratch;   // decode attention partials
    // Decode over kvcodec pages (mdl_cuda_decode_kvc).
    size_t cap_kvc;
    uint8_t *h_kvc;      // pinned: tokens, positions, tail slots, page lists of one step
    uint8_t *d_kvc;      // device copy
    int cap_kvc_rows;
    float *kvc_q;        // [n][q_dim] the step's queries, packed for the page attention
    uint16_t *kvc_qkv16; // [n][qkv_dim] FP16 copy of qkv: the new K and V for the tail pages
    size_t cap_kvc_ws;
    void *kvc_ws;        // kvc_attend_batch_cuda workspace
};

static void free_bufs(mdl_cuda_ctx_t *ctx)
{
    cudaFree(ctx->x);
    cudaFree(ctx->xh);
    cudaFree(ctx->qkv);
    cudaFree(ctx->att);
    cudaFree(ctx->gu);
    for (int i = 0; i < 2; i++) {
        cudaFree(ctx->k[i]);
        cudaFree(ctx->v[i]);
        cudaFree(ctx->win[i]);
        cudaFreeHost(ctx->h_k[i]);
        cudaFreeHost(ctx->h_v[i]);
        cudaFreeHost(ctx->h_win[i]);
        cudaFree(ctx->k16[i]);
        cudaFree(ctx->v16[i]);
        ctx->k[i] = ctx->v[i] = ctx->win[i] = ctx->h_k[i] = ctx->h_v[i] = ctx->h_win[i] = NULL;
        ctx->k16[i] = ctx->v16[i] = NULL;
    }
    ctx->x = ctx->att = ctx->gu = ctx->qkv = NULL;
    ctx->xh = NULL;
    ctx->cap_tokens = 0;
}

static void free_window(mdl_cuda_ctx_t *ctx)
{
    for (int i = 0; i < 2; i++) {
        cudaFree(ctx->qwin[i]);
        cudaFreeHost(ctx->h_qwin[i]);
        ctx->qwin[i] = ctx->h_qwin[i] = NULL;
    }
    cudaFree(ctx->att_scratch);
    ctx->att_scratch = NULL;
    ctx->cap_window = 0;
}

void mdl_cuda_ctx_destroy(mdl_cuda_ctx_t *ctx)
{
    if (ctx == NULL)
        return;
    if (ctx->s != NULL)
        cudaStreamSynchronize(ctx->s);
    if (ctx->s_copy != NULL)
        cudaStreamSynchronize(ctx->s_copy);
    free_bufs(ctx);
    free_window(ctx);
    cudaFree(ctx->logits);
    cudaFreeHost(ctx->h_i32);
    cudaFree(ctx->d_i32);
    cudaFree(ctx->pa_scratch);
    cudaFreeHost(ctx->h_kvc);
    cudaFree(ctx->d_kvc);
    cudaFree(ctx->kvc_q);
    cudaFree(ctx->kvc_qkv16);
    cudaFree(ctx->kvc_ws);
    for (int i = 0; i < 2; i++) {
        if (ctx->ev_done[i] != NULL)
            cudaEventDestroy(ctx->ev_done[i]);
        if (ctx->ev_copied[i] != NULL)
            cudaEventDestroy(ctx->ev_copied[i]);
    }
    if (ctx->blas != NULL)
        cublasDestroy(ctx->blas);
    if (ctx->s != NULL)
        cudaStreamDestroy(ctx->s);
    if (ctx->s_copy != NULL)
        cudaStreamDestroy(ctx->s_copy);
    free(ctx);
}

fy_status_t mdl_cuda_ctx_create(const mdl_cuda_model_t *w, const mdl_ctx_params_t *p,
                                mdl_cuda_ctx_t **ctx_p)
{
    if (w == NULL || p == NULL)
        return FY_ERR_INVALID_ARG;
    mdl_cuda_ctx_t *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return FY_ERR_NO_MEMORY;
    ctx->w = w;
    ctx->p = *p;
    fy_status_t st;
    CU(cudaStreamCreateWithFlags(&ctx->s, cudaStreamNonBlocking));
    CU(cudaStreamCreateWithFlags(&ctx->s_copy, cudaStreamNonBlocking));
    for (int i = 0; i < 2; i++) {
        CU(cudaEventCreateWithFlags(&ctx->ev_done[i], cudaEventDisableTiming));
        CU(cudaEventCreateWithFlags(&ctx->ev_copied[i], cudaEventDisableTiming));
    }
    if ((st = krn_cublas_status(cublasCreate(&ctx->blas))) != FY_OK) {
        ctx->blas = NULL;
        goto fail;
    }
    *ctx_p = ctx;
    return FY_OK;
fail:
    mdl_cuda_ctx_destroy(ctx);
    return st;
}

static fy_status_t alloc_dev(void **p, size_t bytes)
{
    return cu_status(cudaMalloc(p, bytes > 0 ? bytes : 1), "cudaMalloc");
}

static fy_status_t alloc_host(void **p, size_t bytes)
{
    return cu_status(cudaMallocHost(p, bytes > 0 ? bytes : 1), "cudaMallocHost");
}

/* Grows the per-row scratch to n rows (the streams are idle between calls). */
static fy_status_t ensure_rows(mdl_cuda_ctx_t *ctx, int n)
{
    if (n <= ctx->cap_tokens)
        return FY_OK;
    const mdl_config_t *c = &ctx->w->cfg;
    free_bufs(ctx);
    size_t cap = (size_t)FY_MAX(n, 64);
    size_t dim = (size_t)c->dim, ffn = (size_t)c->ffn_dim;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t widest = FY_MAX(dim, FY_MAX(q_dim, ffn));
    fy_status_t st;
    TRY(alloc_dev((void **)&ctx->x, cap * dim * 4));
    TRY(alloc_dev((void **)&ctx->xh, cap * widest * 2));
    TRY(alloc_dev((void **)&ctx->qkv, cap * (q_dim + 2 * kv_dim) * 4));
    TRY(alloc_dev((void **)&ctx->att, cap * q_dim * 4));
    TRY(alloc_dev((void **)&ctx->gu, cap * 2 * ffn * 4));
    for (int i = 0; i < 2; i++) {
        TRY(alloc_dev((void **)&ctx->k[i], cap * kv_dim * 4));
        TRY(alloc_dev((void **)&ctx->v[i], cap * kv_dim * 4));
        TRY(alloc_dev((void **)&ctx->win[i], cap * (size_t)c->n_heads * 4));
    }
    ctx->cap_tokens = (int)cap;
    return FY_OK;
fail:
    free_bufs(ctx);
    return st;
}

/* Pinned host copies of K, V and window scores for the layer callback. */
static fy_status_t ensure_host_kv(mdl_cuda_ctx_t *ctx)
{
    if (ctx->h_k[0] != NULL)
        return FY_OK;
    const mdl_config_t *c = &ctx->w->cfg;
    size_t cap = (size_t)ctx->cap_tokens;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    fy_status_t st;
    for (int i = 0; i < 2; i++) {
        TRY(alloc_host((void **)&ctx->h_k[i], cap * kv_dim * 4));
        TRY(alloc_host((void **)&ctx->h_v[i], cap * kv_dim * 4));
        TRY(alloc_host((void **)&ctx->h_win[i], cap * (size_t)c->n_heads * 4));
    }
    return FY_OK;
fail:
    for (int i = 0; i < 2; i++) {
        cudaFreeHost(ctx->h_k[i]);
        cudaFreeHost(ctx->h_v[i]);
        cudaFreeHost(ctx->h_win[i]);
        ctx->h_k[i] = ctx->h_v[i] = ctx->h_win[i] = NULL;
    }
    return st;
}

/* FP16 device copies of K and V for a callback that stays on the device. */
static fy_status_t ensure_dev_kv16(mdl_cuda_ctx_t *ctx)
{
    if (ctx->k16[0] != NULL)
        return FY_OK;
    const mdl_config_t *c = &ctx->w->cfg;
    size_t elems = (size_t)ctx->cap_tokens * c->n_kv_heads * c->head_dim;
    fy_status_t st;
    for (int i = 0; i < 2; i++) {
        TRY(alloc_dev((void **)&ctx->k16[i], elems * sizeof(uint16_t)));
        TRY(alloc_dev((void **)&ctx->v16[i], elems * sizeof(uint16_t)));
    }
    return FY_OK;
fail:
    for (int i = 0; i < 2; i++) {
        cudaFree(ctx->k16[i]);
        cudaFree(ctx->v16[i]);
        ctx->k16[i] = ctx->v16[i] = NULL;
    }
    return st;
}

static fy_status_t ensure_window(mdl_cuda_ctx_t *ctx, int w)
{
    if (w <= ctx->cap_window)
        return FY_OK;
    const mdl_config_t *c = &ctx->w->cfg;
    free_window(ctx);
    size_t n = (size_t)w * c->n_heads * c->head_dim;
    fy_status_t st;
    for (int i = 0; i < 2; i++) {
        TRY(alloc_dev((void **)&ctx->qwin[i], n * 4));
        TRY(alloc_host((void **)&ctx->h_qwin[i], n * 4));
    }
    TRY(alloc_dev((void **)&ctx->att_scratch, krn_attention_cuda_scratch(c->n_heads, w) * 4));
    ctx->cap_window = w;
    return FY_OK;
fail:
    free_window(ctx);
    return st;
}

static fy_status_t ensure_logits(mdl_cuda_ctx_t *ctx, int rows)
{
    if (rows <= ctx->cap_logit_rows)
        return FY_OK;
    cudaFree(ctx->logits);
    ctx->logits = NULL;
    ctx->cap_logit_rows = 0;
    fy_status_t st =
        alloc_dev((void **)&ctx->logits, (size_t)rows * ctx->w->cfg.n_vocab * sizeof(float));
    if (st == FY_OK)
        ctx->cap_logit_rows = rows;
    return st;
}

static fy_status_t ensure_i32(mdl_cuda_ctx_t *ctx, size_t n)
{
    if (n <= ctx->cap_i32)
        return FY_OK;
    cudaFreeHost(ctx->h_i32);
    cudaFree(ctx->d_i32);
    ctx->h_i32 = NULL;
    ctx->d_i32 = NULL;
    ctx->cap_i32 = 0;
    size_t cap = FY_MAX(n, (size_t)4096);
    fy_status_t st = alloc_host((void **)&ctx->h_i32, cap * 4);
    if (st == FY_OK)
        st = alloc_dev((void **)&ctx->d_i32, cap * 4);
    if (st == FY_OK)
        ctx->cap_i32 = cap;
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Blocks                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static int qkv_width(const mdl_config_t *c)
{
    return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
}

/* qkv[rows] = RoPE(RMSNorm(x[rows])·Wqkvᵀ (+ b)) at positions pos (device). */
static fy_status_t attn_in(mdl_cuda_ctx_t *ctx, const cu_layer_t *y, int rows,
                           const int32_t *pos)
{
    const mdl_config_t *c = &ctx->w->cfg;
    int dim = c->dim, qkv_dim = qkv_width(c);
    fy_status_t st;
    TRY(krn_rmsnorm_f16_cuda(ctx->xh, dim, ctx->x, dim, y->attn_norm, rows, dim, c->rms_eps,
                             ctx->s));
    TRY(krn_gemm_f16_cuda(ctx->blas, rows, qkv_dim, dim, ctx->xh, dim, y->wqkv, dim, ctx->qkv,
                          qkv_dim, 0, ctx->s));
    if (y->bqkv != NULL)
        TRY(mdl_cuda_add_bias(ctx->qkv, qkv_dim, y->bqkv, rows, qkv_dim, ctx->s));
    TRY(krn_rope_f32_cuda(ctx->qkv, qkv_dim, rows, c->n_heads + c->n_kv_heads, c->head_dim, pos,
                          &c->rope, ctx->s));
    return FY_OK;
fail:
    return st;
}

/* x[rows] += att[rows]·Woᵀ, then x[rows] += FFN(RMSNorm(x[rows])). */
static fy_status_t attn_out_ffn(mdl_cuda_ctx_t *ctx, const cu_layer_t *y, int rows)
{
    const mdl_config_t *c = &ctx->w->cfg;
    int dim = c->dim, ffn = c->ffn_dim, q_dim = c->n_heads * c->head_dim;
    fy_status_t st;
    TRY(fy_cuda_fp32_to_fp16(ctx->xh, ctx->att, (size_t)rows * q_dim, ctx->s));
    TRY(krn_gemm_f16_cuda(ctx->blas, rows, dim, q_dim, ctx->xh, q_dim, y->wo, q_dim, ctx->x, dim,
                          1, ctx->s));
    TRY(krn_rmsnorm_f16_cuda(ctx->xh, dim, ctx->x, dim, y->ffn_norm, rows, dim, c->rms_eps,
                             ctx->s));
    TRY(krn_gemm_f16_cuda(ctx->blas, rows, 2 * ffn, dim, ctx->xh, dim, y->wgu, dim, ctx->gu,
                          2 * ffn, 0, ctx->s));
    TRY(krn_swiglu_rows_f16_cuda(ctx->xh, ffn, ctx->gu, ctx->gu + ffn, 2 * ffn, rows, ffn,
                                 ctx->s));
    TRY(krn_gemm_f16_cuda(ctx->blas, rows, dim, ffn, ctx->xh, ffn, y->wdown, ffn, ctx->x, dim, 1,
                          ctx->s));
    return FY_OK;
fail:
    return st;
}

/* logits[rows] (host) = RMSNorm(x_rows)·outputᵀ; waits for the stream. */
static fy_status_t logits_out(mdl_cuda_ctx_t *ctx, const float *x_rows, int rows, float *logits)
{
    const mdl_cuda_model_t *w = ctx->w;
    const mdl_config_t *c = &w->cfg;
    fy_status_t st;
    TRY(krn_rmsnorm_f16_cuda(ctx->xh, c->dim, x_rows, c->dim, w->output_norm, rows, c->dim,
                             c->rms_eps, ctx->s));
    TRY(krn_gemm_f16_cuda(ctx->blas, rows, c->n_vocab, c->dim, ctx->xh, c->dim, w->output,
                          c->dim, ctx->logits, c->n_vocab, 0, ctx->s));
    CU(cudaMemcpyAsync(logits, ctx->logits, (size_t)rows * c->n_vocab * sizeof(float),
                       cudaMemcpyDeviceToHost, ctx->s));
    CU(cudaStreamSynchronize(ctx->s));
    return FY_OK;
fail:
    return st;
}

/* Waits for both streams after a failure, so no buffer is still in use; the first error wins. */
static fy_status_t drain(mdl_cuda_ctx_t *ctx, fy_status_t st)
{
    cudaError_t a = cudaStreamSynchronize(ctx->s), b = cudaStreamSynchronize(ctx->s_copy);
    if (st == FY_OK && a != cudaSuccess)
        st = cu_status(a, "compute stream");
    if (st == FY_OK && b != cudaSuccess)
        st = cu_status(b, "copy stream");
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Prefill                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Runs the callback for finished layer l once its copy has arrived; with device_kv, at once
 * (the callback's work queues behind the FP16 conversion on the copy stream, and the compute
 * stream waits for that work before it reuses the layer's buffers). */
static fy_status_t hand_out(mdl_cuda_ctx_t *ctx, const mdl_prefill_params_t *params, int l,
                            int n, int w)
{
    const mdl_config_t *c = &ctx->w->cfg;
    int b = l & 1;
    fy_status_t st;
    mdl_layer_kv_t kv = {.layer = l, .n_tokens = n, .n_kv_heads = c->n_kv_heads,
                         .n_heads = c->n_heads, .head_dim = c->head_dim, .n_window = w};
    if (params->device_kv) {
        kv.k16_dev = ctx->k16[b];
        kv.v16_dev = ctx->v16[b];
        kv.q_window_dev = w > 0 ? ctx->qwin[b] : NULL;
        kv.window_attn_dev = w > 0 && params->window_attn ? ctx->win[b] : NULL;
        kv.stream = ctx->s_copy;
        TRY(params->on_layer(params->cb_arg, &kv));
        CU(cudaEventRecord(ctx->ev_copied[b], ctx->s_copy));
        return FY_OK;
    }
    CU(cudaEventSynchronize(ctx->ev_copied[b]));
    kv.k = ctx->h_k[b];
    kv.v = ctx->h_v[b];
    kv.q_window = w > 0 ? ctx->h_qwin[b] : NULL;
    kv.window_attn = w > 0 && params->window_attn ? ctx->h_win[b] : NULL;
    return params->on_layer(params->cb_arg, &kv);
fail:
    return st;
}

/* Queues on the copy stream, after layer l's attention (ev_done), what the hand-out of layer l
 * reads: its K and V in FP16 on the device (on_dev), or host copies of K, V, the window queries
 * and (wa > 0) the window scores; then records ev_copied. */
static fy_status_t copy_out(mdl_cuda_ctx_t *ctx, int l, int n, int w, int wa, bool on_dev)
{
    const mdl_config_t *c = &ctx->w->cfg;
    const int b = l & 1;
    const size_t kv_elems = (size_t)n * c->n_kv_heads * c->head_dim;
    fy_status_t st;
    CU(cudaStreamWaitEvent(ctx->s_copy, ctx->ev_done[b], 0));
    if (on_dev) {
        TRY(fy_cuda_fp32_to_fp16(ctx->k16[b], ctx->k[b], kv_elems, ctx->s_copy));
        TRY(fy_cuda_fp32_to_fp16(ctx->v16[b], ctx->v[b], kv_elems, ctx->s_copy));
    } else {
        CU(cudaMemcpyAsync(ctx->h_k[b], ctx->k[b], kv_elems * sizeof(float), cudaMemcpyDeviceToHost,
                           ctx->s_copy));
        CU(cudaMemcpyAsync(ctx->h_v[b], ctx->v[b], kv_elems * sizeof(float), cudaMemcpyDeviceToHost,
                           ctx->s_copy));
        if (w > 0)
            CU(cudaMemcpyAsync(ctx->h_qwin[b], ctx->qwin[b],
                               (size_t)w * c->n_heads * c->head_dim * sizeof(float),
                               cudaMemcpyDeviceToHost, ctx->s_copy));
        if (wa > 0)
            CU(cudaMemcpyAsync(ctx->h_win[b], ctx->win[b], (size_t)n * c->n_heads * sizeof(float),
                               cudaMemcpyDeviceToHost, ctx->s_copy));
    }
    CU(cudaEventRecord(ctx->ev_copied[b], ctx->s_copy));
    return FY_OK;
fail:
    return st;
}

fy_status_t mdl_cuda_prefill(mdl_cuda_ctx_t *ctx, const int32_t *tokens, int n, int w,
                             const mdl_prefill_params_t *params, float *logits)
{
    const mdl_cuda_model_t *wt = ctx->w;
    const mdl_config_t *c = &wt->cfg;
    const bool cb = params->on_layer != NULL;
    if (!cb)
        w = 0; // window queries and scores are only for the callback
    int dim = c->dim, hd = c->head_dim, n_kv = c->n_kv_heads, L = c->n_layers;
    int q_dim = c->n_heads * hd, qkv_dim = qkv_width(c);
    float scale = 1.0f / sqrtf((float)hd);
    mdl_kv_seq_t *seq = params->seq;
    krn_paged_cuda_t cache = {0};
    int64_t np = 0;
    fy_status_t st;
    TRY(ensure_rows(ctx, n));
    const bool on_dev = cb && params->device_kv;
    if (cb)
        TRY(on_dev ? ensure_dev_kv16(ctx) : ensure_host_kv(ctx));
    if (w > 0)
        TRY(ensure_window(ctx, w));
    // The window scores take one more pass over the keys per layer: only when asked for.
    const int wa = params->window_attn ? w : 0;
    int logit_rows = params->all_logits ? n : 1;
    TRY(ensure_logits(ctx, logit_rows));
    if (seq != NULL) {
        const mdl_kv_t *kv = mdl_kv_seq_pool(seq);
        const mdl_kv_params_t *kp = mdl_kv_params_of(kv);
        if (kp->n_layers != L || kp->n_kv_heads != n_kv || kp->head_dim != hd)
            return FY_ERR_INVALID_ARG;
        np = mdl_kv_seq_n_pages(seq);
        if (np <= 0 || np > INT32_MAX / ((int64_t)L * n_kv))
            return FY_ERR_OUT_OF_RANGE;
        cache = (krn_paged_cuda_t){.pool = mdl_kv_mem(kv), .page_elems = mdl_kv_page_elems(kv),
                                   .n_pages = kp->n_pages, .page_tokens = kp->page_tokens,
                                   .head_dim = hd, .ids_seq_stride = 0, .max_pages = (int)np};
    }
    size_t n_ids = (size_t)L * n_kv * (size_t)np;
    TRY(ensure_i32(ctx, 2 * (size_t)n + n_ids));
    // tokens [n], positions [n], page table [L][n_kv][np]
    int32_t *h = ctx->h_i32;
    memcpy(h, tokens, (size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++)
        h[n + i] = i;
    for (int l = 0; l < L && seq != NULL; l++) {
        for (int kh = 0; kh < n_kv; kh++) {
            int32_t *row = h + 2 * (size_t)n + ((size_t)l * n_kv + kh) * np;
            for (int64_t p = 0; p < np; p++)
                row[p] = (int32_t)mdl_kv_seq_page_id(seq, l, kh, p);
        }
    }
    CU(cudaMemcpyAsync(ctx->d_i32, h, (2 * (size_t)n + n_ids) * sizeof(int32_t),
                       cudaMemcpyHostToDevice, ctx->s));
    const int32_t *d_tok = ctx->d_i32, *d_pos = ctx->d_i32 + n, *d_ids = ctx->d_i32 + 2 * n;
    TRY(krn_embed_f16_cuda(ctx->x, dim, wt->tok_embd, c->n_vocab, dim, d_tok, n, ctx->s));

    for (int l = 0; l < L; l++) {
        const cu_layer_t *y = &wt->layers[l];
        int b = l & 1;
        if (cb && l >= 2) // set b was handed to the copy stream two layers ago
            CU(cudaStreamWaitEvent(ctx->s, ctx->ev_copied[b], 0));
        TRY(attn_in(ctx, y, n, d_pos));
        TRY(mdl_cuda_split_qkv(ctx->k[b], ctx->v[b], w > 0 ? ctx->qwin[b] : NULL, ctx->qkv,
                               qkv_dim, n, c->n_heads, n_kv, hd, w, ctx->s));
        TRY(krn_attention_causal_cuda(ctx->att, q_dim, ctx->qkv, qkv_dim, ctx->k[b], ctx->v[b], n,
                                      0, n, c->n_heads, n_kv, hd, scale, wa,
                                      wa > 0 ? ctx->win[b] : NULL, ctx->att_scratch, ctx->s));
        if (seq != NULL) {
            cache.page_ids = d_ids + (size_t)l * n_kv * np;
            TRY(krn_paged_store_f16_cuda(&cache, 1, n_kv, n, d_pos, ctx->k[b], ctx->v[b], 0,
                                         (size_t)n * hd, (size_t)hd, ctx->s));
        }
        if (cb) {
            CU(cudaEventRecord(ctx->ev_done[b], ctx->s));
            if (!on_dev)
                TRY(copy_out(ctx, l, n, w, wa, false));
        }
        TRY(attn_out_ffn(ctx, y, n));
        // The host hands out the previous layer while the GPU works on this one.
        if (cb && l >= 1)
            TRY(hand_out(ctx, params, l - 1, n, w));
        // On the device the FP16 conversion of this layer goes on the copy stream after the
        // hand-out of the previous one: queued before it, it would hold the codec's work for
        // layer l - 1 behind this layer's attention (the conversion waits for ev_done).
        if (cb && on_dev)
            TRY(copy_out(ctx, l, n, w, wa, true));
    }
    if (cb)
        TRY(hand_out(ctx, params, L - 1, n, w));
    TRY(logits_out(ctx, ctx->x + (size_t)(n - logit_rows) * dim, logit_rows, logits));
    return drain(ctx, FY_OK);
fail:
    return drain(ctx, st);
}

/* ------------------------------------------------------------------------------------------ */
/* Decode                                                                                       */
/* ------------------------------------------------------------------------------------------ */

fy_status_t mdl_cuda_decode(mdl_cuda_ctx_t *ctx, mdl_kv_seq_t *const *seqs,
                            const int32_t *tokens, int n, float *logits)
{
    const mdl_cuda_model_t *wt = ctx->w;
    const mdl_config_t *c = &wt->cfg;
    int dim = c->dim, hd = c->head_dim, n_kv = c->n_kv_heads, L = c->n_layers;
    int q_dim = c->n_heads * hd, kv_dim = n_kv * hd, qkv_dim = qkv_width(c);
    float scale = 1.0f / sqrtf((float)hd);
    const mdl_kv_t *kv = mdl_kv_seq_pool(seqs[0]);
    const mdl_kv_params_t *kp = mdl_kv_params_of(kv);
    if (kp->n_layers != L || kp->n_kv_heads != n_kv || kp->head_dim != hd)
        return FY_ERR_INVALID_ARG;
    int64_t max_tokens = 0;
    for (int i = 0; i < n; i++) {
        if (mdl_kv_seq_pool(seqs[i]) != kv)
            return FY_ERR_INVALID_ARG; // one pool per step: its pages are one allocation
        max_tokens = FY_MAX(max_tokens, mdl_kv_seq_len(seqs[i]) + 1);
    }
    int pt = kp->page_tokens;
    int64_t np = (max_tokens + pt - 1) / pt;
    if (max_tokens > INT32_MAX || np > INT32_MAX / ((int64_t)L * n_kv * n))
        return FY_ERR_OUT_OF_RANGE;
    size_t per_seq = (size_t)L * n_kv * (size_t)np;
    size_t n_ids = per_seq * n;
    fy_status_t st;
    TRY(ensure_rows(ctx, n));
    TRY(ensure_logits(ctx, n));
    TRY(ensure_i32(ctx, 3 * (size_t)n + n_ids));
    size_t pa_need = krn_paged_attention_cuda_scratch(n, c->n_heads, n_kv, hd, (int)max_tokens);
    if (pa_need > ctx->cap_pa) {
        cudaFree(ctx->pa_scratch);
        ctx->pa_scratch = NULL;
        ctx->cap_pa = 0;
        TRY(alloc_dev((void **)&ctx->pa_scratch, pa_need * sizeof(float)));
        ctx->cap_pa = pa_need;
    }
    // tokens [n], positions [n], lengths [n], page table [n][L][n_kv][np]
    int32_t *h = ctx->h_i32;
    memcpy(h, tokens, (size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) {
        const mdl_kv_seq_t *s = seqs[i];
        int64_t len = mdl_kv_seq_len(s), have = mdl_kv_seq_n_pages(s);
        h[n + i] = (int32_t)len;
        h[2 * n + i] = (int32_t)len + 1;
        for (int l = 0; l < L; l++) {
            for (int kh = 0; kh < n_kv; kh++) {
                int32_t *row = h + 3 * (size_t)n + i * per_seq + ((size_t)l * n_kv + kh) * np;
                for (int64_t p = 0; p < np; p++)
                    row[p] = p < have ? (int32_t)mdl_kv_seq_page_id(s, l, kh, p) : -1;
            }
        }
    }
    CU(cudaMemcpyAsync(ctx->d_i32, h, (3 * (size_t)n + n_ids) * sizeof(int32_t),
                       cudaMemcpyHostToDevice, ctx->s));
    const int32_t *d_tok = ctx->d_i32, *d_pos = d_tok + n, *d_len = d_pos + n;
    const int32_t *d_ids = d_len + n;
    krn_paged_cuda_t cache = {.pool = mdl_kv_mem(kv), .page_elems = mdl_kv_page_elems(kv),
                              .n_pages = kp->n_pages, .page_tokens = pt, .head_dim = hd,
                              .ids_seq_stride = per_seq, .max_pages = (int)np};
    TRY(krn_embed_f16_cuda(ctx->x, dim, wt->tok_embd, c->n_vocab, dim, d_tok, n, ctx->s));
    for (int l = 0; l < L; l++) {
        const cu_layer_t *y = &wt->layers[l];
        TRY(attn_in(ctx, y, n, d_pos));
        cache.page_ids = d_ids + (size_t)l * n_kv * np;
        // This step's K and V go into their page slots, then attention reads the pages.
        TRY(krn_paged_store_f16_cuda(&cache, n, n_kv, 1, d_pos, ctx->qkv + q_dim,
                                     ctx->qkv + q_dim + kv_dim, (size_t)qkv_dim, (size_t)hd, 0,
                                     ctx->s));
        TRY(krn_paged_attention_f16_cuda(ctx->att, q_dim, ctx->qkv, qkv_dim, n, c->n_heads, n_kv,
                                         scale, &cache, d_len, (int)max_tokens, ctx->pa_scratch,
                                         ctx->cap_pa, ctx->s));
        TRY(attn_out_ffn(ctx, y, n));
    }
    TRY(logits_out(ctx, ctx->x, n, logits));
    return drain(ctx, FY_OK);
fail:
    return drain(ctx, st);
}

/* ------------------------------------------------------------------------------------------ */
/* Decode over kvcodec pages in a GPU pool                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Grows a device buffer (and its pinned twin when h is set) to at least bytes; the streams are
 * idle between calls, so the old contents need not survive. */
static fy_status_t ensure_bytes(void **d, void **h, size_t *cap, size_t bytes)
{
    if (bytes <= *cap)
        return FY_OK;
    cudaFree(*d);
    *d = NULL;
    if (h != NULL) {
        cudaFreeHost(*h);
        *h = NULL;
    }
    *cap = 0;
    size_t want = FY_MAX(bytes, (size_t)64 << 10);
    fy_status_t st = alloc_dev(d, want);
    if (st == FY_OK && h != NULL)
        st = alloc_host(h, want);
    if (st == FY_OK)
        *cap = want;
    return st;
}

fy_status_t mdl_cuda_decode_kvc(mdl_cuda_ctx_t *ctx, kvc_gpu_pool_t *pool,
                                kvc_gpu_seq_t *const *seqs, const int32_t *pos,
                                const int32_t *tokens, int n, float *logits)
{
    const mdl_cuda_model_t *wt = ctx->w;
    const mdl_config_t *c = &wt->cfg;
    int dim = c->dim, hd = c->head_dim, n_kv = c->n_kv_heads, L = c->n_layers;
    int q_dim = c->n_heads * hd, kv_dim = n_kv * hd, qkv_dim = qkv_width(c);
    float scale = 1.0f / sqrtf((float)hd);
    size_t n_lists = (size_t)n * n_kv;
    // Page ids after this step's appends: at most one new page per list.
    uint64_t id_bound = (uint64_t)L * n_lists;
    uint32_t max_pages = 1;
    for (int i = 0; i < n; i++) {
        for (int l = 0; l < L; l++) {
            for (int h = 0; h < n_kv; h++) {
                uint32_t np = 0;
                kvc_gpu_seq_pages(seqs[i], (uint32_t)l, (uint32_t)h, &np);
                id_bound += np;
                max_pages = FY_MAX(max_pages, np + 1);
            }
        }
    }
    if (id_bound > UINT32_MAX)
        return FY_ERR_OUT_OF_RANGE;
    // One upload per step: tokens [n], positions [n], tail slots [L][n][n_kv], list starts
    // [L][n * n_kv + 1] (into the ids of all layers), page ids.
    size_t off_pos = (size_t)n * 4, off_app = FY_ALIGN_UP(2 * (size_t)n * 4, 16);
    size_t off_start = off_app + (size_t)L * n_lists * sizeof(kvc_gpu_append_t);
    size_t off_ids = FY_ALIGN_UP(off_start + (size_t)L * (n_lists + 1) * 4, 16);
    size_t plan_bytes = off_ids + (size_t)id_bound * sizeof(kvc_page_id_t);
    kvc_gpu_pages_t view;
    kvc_gpu_pool_view(pool, &view);
    // Every layer's lists have the same shape and the same bound on their length, so one
    // workspace size serves the whole step.
    kvc_attend_batch_t bt = {.batch = (uint32_t)n, .n_heads = (uint32_t)c->n_heads,
                             .n_kv_heads = (uint32_t)n_kv, .max_list_pages = max_pages,
                             .impl = KVC_ATTEND_IMPL_AUTO};
    size_t ws_bytes = 0;
    fy_status_t st;
    // Everything that can fail for want of memory or an unsupported shape fails before the
    // sequences change.
    TRY(kvc_attend_batch_cuda_workspace(&view, &bt, &ws_bytes));
    TRY(ensure_rows(ctx, n));
    TRY(ensure_logits(ctx, n));
    TRY(ensure_bytes((void **)&ctx->d_kvc, (void **)&ctx->h_kvc, &ctx->cap_kvc, plan_bytes));
    TRY(ensure_bytes(&ctx->kvc_ws, NULL, &ctx->cap_kvc_ws, ws_bytes));
    if (n > ctx->cap_kvc_rows) {
        cudaFree(ctx->kvc_q);
        cudaFree(ctx->kvc_qkv16);
        ctx->kvc_q = NULL;
        ctx->kvc_qkv16 = NULL;
        ctx->cap_kvc_rows = 0;
        size_t rows = (size_t)FY_MAX(n, 64);
        TRY(alloc_dev((void **)&ctx->kvc_q, rows * q_dim * sizeof(float)));
        TRY(alloc_dev((void **)&ctx->kvc_qkv16, rows * qkv_dim * sizeof(uint16_t)));
        ctx->cap_kvc_rows = (int)rows;
    }

    uint8_t *h = ctx->h_kvc;
    memcpy(h, tokens, (size_t)n * 4);
    memcpy(h + off_pos, pos, (size_t)n * 4);
    kvc_gpu_append_t *app = (kvc_gpu_append_t *)(h + off_app);
    for (int l = 0; l < L; l++) {
        for (int i = 0; i < n; i++) {
            for (int kh = 0; kh < n_kv; kh++)
                TRY(kvc_gpu_seq_append_slot(seqs[i], (uint32_t)l, (uint32_t)kh,
                                            &app[((size_t)l * n + i) * n_kv + kh]));
        }
    }
    uint32_t *starts = (uint32_t *)(h + off_start);
    kvc_page_id_t *ids = (kvc_page_id_t *)(h + off_ids);
    uint32_t n_ids = 0;
    for (int l = 0; l < L; l++) {
        uint32_t *st_l = starts + (size_t)l * (n_lists + 1);
        for (int i = 0; i < n; i++) {
            for (int kh = 0; kh < n_kv; kh++) {
                uint32_t np = 0;
                const kvc_page_id_t *p =
                    kvc_gpu_seq_pages(seqs[i], (uint32_t)l, (uint32_t)kh, &np);
                FY_ASSERT(n_ids + (uint64_t)np <= id_bound);
                st_l[(size_t)i * n_kv + kh] = n_ids;
                memcpy(ids + n_ids, p, (size_t)np * sizeof(kvc_page_id_t));
                n_ids += np;
            }
        }
        st_l[n_lists] = n_ids;
    }
    CU(cudaMemcpyAsync(ctx->d_kvc, h, off_ids + (size_t)n_ids * sizeof(kvc_page_id_t),
                       cudaMemcpyHostToDevice, ctx->s));
    const int32_t *d_tok = (const int32_t *)ctx->d_kvc;
    const int32_t *d_pos = (const int32_t *)(ctx->d_kvc + off_pos);
    const kvc_gpu_append_t *d_app = (const kvc_gpu_append_t *)(ctx->d_kvc + off_app);
    const uint32_t *d_start = (const uint32_t *)(ctx->d_kvc + off_start);
    bt.page_ids = (const kvc_page_id_t *)(ctx->d_kvc + off_ids);

    TRY(krn_embed_f16_cuda(ctx->x, dim, wt->tok_embd, c->n_vocab, dim, d_tok, n, ctx->s));
    for (int l = 0; l < L; l++) {
        const cu_layer_t *y = &wt->layers[l];
        TRY(attn_in(ctx, y, n, d_pos));
        // The token's K and V join the tail pages in FP16 (common/half's rounding, as
        // kvc_seq_append gets them on the CPU) before attention reads them (same stream).
        TRY(fy_cuda_fp32_to_fp16(ctx->kvc_qkv16, ctx->qkv, (size_t)n * qkv_dim, ctx->s));
        TRY(kvc_gpu_append_cuda(pool, d_app + (size_t)l * n_lists, (uint32_t)n, (uint32_t)n_kv,
                                ctx->kvc_qkv16 + q_dim, (size_t)qkv_dim,
                                ctx->kvc_qkv16 + q_dim + kv_dim, (size_t)qkv_dim, ctx->s));
        // The page attention takes queries [n][n_heads][head_dim] packed.
        CU(cudaMemcpy2DAsync(ctx->kvc_q, (size_t)q_dim * sizeof(float), ctx->qkv,
                             (size_t)qkv_dim * sizeof(float), (size_t)q_dim * sizeof(float),
                             (size_t)n, cudaMemcpyDeviceToDevice, ctx->s));
        bt.list_start = d_start + (size_t)l * (n_lists + 1);
        TRY(kvc_attend_batch_cuda(&view, &bt, ctx->kvc_q, scale, ctx->att, ctx->kvc_ws,
                                  ctx->cap_kvc_ws, ctx->s));
        TRY(attn_out_ffn(ctx, y, n));
    }
    TRY(logits_out(ctx, ctx->x, n, logits));
    return drain(ctx, FY_OK);
fail:
    return drain(ctx, st);
}
