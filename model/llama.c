/*
 * llama.c: the Llama-family forward pass (Llama, Mistral, SmolLM, Qwen2) on the CPU.
 *
 * Per layer, as in the paper:
 *   xn = RMSNorm(x);  q, k, v = xn·Wqᵀ (+bq), xn·Wkᵀ (+bk), xn·Wvᵀ (+bv);  RoPE(q, k)
 *   x += Attention(q, k, v)·Woᵀ          (causal, grouped-query: n_heads / n_kv_heads per group)
 *   xn = RMSNorm(x);  x += (silu(xn·Wgateᵀ) * xn·Wupᵀ)·Wdownᵀ
 * then logits = RMSNorm(x)·Woutᵀ (Wout = the token embedding when tied).
 *
 * Weights are dequantized to FP32 at load; Q, K and V share one fused matrix, gate and up
 * another, so each step is one GEMM. Prefill goes layer by layer over the whole prompt (GEMMs
 * in row chunks to bound scratch), which is what lets a finished layer's K, V and window
 * queries be handed out while the next layer computes. Decode takes one token for each of a
 * batch of sequences and attends over their paged FP16 cache.
 *
 * Config, weights and run state are kept apart: mdl_model_t is read-only after load and may be
 * shared; mdl_ctx_t owns the scratch, which grows only when a longer prompt or larger batch
 * arrives, so a steady-state forward pass does not allocate.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_int.h"

/* Prefill attention: query rows per work item of the scalar kernel; prompts from
 * ATT_BLAS_MIN tokens on use the GEMM kernel over blocks of ATT_BLAS_BLOCK queries. */
enum { ATT_QBLOCK = 32, ATT_BLAS_MIN = 64, ATT_BLAS_BLOCK = 256 };

typedef struct {
    float *attn_norm; // [dim]
    float *wqkv;      // [q_dim + 2 * kv_dim][dim]
    float *bqkv;      // [q_dim + 2 * kv_dim] or NULL
    float *wo;        // [dim][q_dim]
    float *ffn_norm;  // [dim]
    float *wgu;       // [2 * ffn_dim][dim]: gate rows, then up rows
    float *wdown;     // [dim][ffn_dim]
    // The same matrices in their file storage type, for decode (see krn_matmul_q_f32).
    krn_qmat_t qq, qk, qv, qo, qgate, qup, qdown;
} layer_w_t;

struct mdl_model {
    mdl_config_t cfg;
    float *tok_embd;    // [n_vocab][dim]
    float *output_norm; // [dim]
    float *output;      // [n_vocab][dim]; == tok_embd when tied
    float *rope_freqs;  // [n_rot / 2] or NULL
    layer_w_t *layers;  // [n_layers]
    krn_qmat_t qout;    // output (or tied embedding) in its storage type
    void **raw;         // copies of the stored tensors the qmats point to
    int n_raw;
    mdl_tokenizer_t *tok;
    mdl_device_t device;
    mdl_cuda_model_t *cuda; // the weights on the GPU (device CUDA; the FP32 arrays stay NULL)
    uint64_t fingerprint;   // device CUDA: mdl_model_fingerprint, computed at load
};

/* Decode steps with at most this many rows read weights in their storage type; larger batches
 * (and prefill) use OpenBLAS on the FP32 copies. */
enum { DECODE_Q_MAX_ROWS = 16 };

/* ------------------------------------------------------------------------------------------ */
/* Loading                                                                                      */
/* ------------------------------------------------------------------------------------------ */

void mdl_model_params_default(mdl_model_params_t *p)
{
    memset(p, 0, sizeof(*p));
}

static fy_status_t errf(char *err, size_t len, fy_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static fy_status_t errf(char *err, size_t len, fy_status_t st, const char *fmt, ...)
{
    if (err != NULL && len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return st;
}

/* Dequantizes tensor `name` of shape [ne1][ne0] into dst. Missing tensors are FY_ERR_NOT_FOUND
 * (the caller decides whether that is fatal). */
static fy_status_t load_into(const mdl_gguf_t *g, const char *name, uint64_t ne0, uint64_t ne1,
                             float *dst, char *err, size_t err_len)
{
    const mdl_gguf_tensor_t *t = mdl_gguf_find_tensor(g, name);
    if (t == NULL)
        return errf(err, err_len, FY_ERR_NOT_FOUND, "model: tensor '%s' missing", name);
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
        return errf(err, err_len, FY_ERR_FORMAT,
                    "model: tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%llu, %llu]",
                    name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                    (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                    (unsigned long long)ne0, (unsigned long long)ne1);
    if (!mdl_tensor_type_supported(t->type))
        return errf(err, err_len, FY_ERR_UNSUPPORTED,
                    "model: tensor '%s' has type %s (%u), not supported", name,
                    mdl_tensor_type_name(t->type), t->type);
    return mdl_gguf_tensor_to_f32(t, dst);
}

static fy_status_t load_alloc(const mdl_gguf_t *g, const char *name, uint64_t ne0, uint64_t ne1,
                              float **dst_p, char *err, size_t err_len)
{
    float *d = malloc((size_t)ne0 * (size_t)ne1 * sizeof(float));
    if (d == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = load_into(g, name, ne0, ne1, d, err, err_len);
    if (st != FY_OK) {
        free(d);
        return st;
    }
    *dst_p = d;
    return FY_OK;
}

/* Describes tensor `name` [rows][cols] for krn_matmul_q_f32: its stored bytes (copied, owned
 * by the model) when the type is one the kernel reads, else the FP32 copy f32. */
static fy_status_t make_qmat(mdl_model_t *m, const mdl_gguf_t *g, const char *name, int rows,
                             int cols, const float *f32, krn_qmat_t *q)
{
    const mdl_gguf_tensor_t *t = mdl_gguf_find_tensor(g, name);
    krn_qtype_t type = t != NULL ? (krn_qtype_t)t->type : KRN_Q_F32;
    *q = (krn_qmat_t){.type = KRN_Q_F32, .rows = rows, .cols = cols,
                      .row_bytes = (size_t)cols * sizeof(float), .data = f32};
    if (t == NULL || type == KRN_Q_F32 || !krn_qtype_supported(type) ||
        krn_qtype_row_bytes(type, cols) * (size_t)rows != t->n_bytes)
        return FY_OK;
    void *copy = malloc(t->n_bytes);
    void **raw = realloc(m->raw, sizeof(void *) * (size_t)(m->n_raw + 1));
    if (copy == NULL || raw == NULL) {
        free(copy);
        if (raw != NULL)
            m->raw = raw;
        return FY_ERR_NO_MEMORY;
    }
    m->raw = raw;
    m->raw[m->n_raw++] = copy;
    memcpy(copy, t->data, t->n_bytes);
    *q = (krn_qmat_t){.type = type, .rows = rows, .cols = cols,
                      .row_bytes = krn_qtype_row_bytes(type, cols), .data = copy};
    return FY_OK;
}

/* Reads an integer hyper-parameter "<arch>.<suffix>" into *v within [lo, hi]. */
static fy_status_t get_hp(const mdl_gguf_t *g, const char *arch, const char *suffix, bool required,
                          int64_t lo, int64_t hi, int *v, char *err, size_t err_len)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int64_t x;
    fy_status_t st = mdl_gguf_get_i64(g, key, &x);
    if (st == FY_ERR_NOT_FOUND && !required)
        return FY_OK;
    if (st != FY_OK)
        return errf(err, err_len, st == FY_ERR_NOT_FOUND ? FY_ERR_FORMAT : st,
                    "model: metadata '%s' %s", key,
                    st == FY_ERR_NOT_FOUND ? "missing" : "is not an integer");
    if (x < lo || x > hi)
        return errf(err, err_len, FY_ERR_OUT_OF_RANGE, "model: metadata '%s' = %lld out of [%lld, %lld]",
                    key, (long long)x, (long long)lo, (long long)hi);
    *v = (int)x;
    return FY_OK;
}

static fy_status_t read_config(const mdl_gguf_t *g, mdl_config_t *c, char *err, size_t err_len)
{
    const char *arch_s;
    size_t arch_len;
    if (mdl_gguf_get_str(g, "general.architecture", &arch_s, &arch_len) != FY_OK)
        return errf(err, err_len, FY_ERR_FORMAT, "model: metadata 'general.architecture' missing");
    char arch[32];
    if (arch_len >= sizeof(arch))
        return errf(err, err_len, FY_ERR_UNSUPPORTED, "model: architecture name too long");
    memcpy(arch, arch_s, arch_len);
    arch[arch_len] = '\0';
    memset(c, 0, sizeof(*c));
    if (strcmp(arch, "llama") == 0 || strcmp(arch, "mistral") == 0) {
        c->arch = MDL_ARCH_LLAMA;
        c->rope.mode = KRN_ROPE_NORM;
    } else if (strcmp(arch, "qwen2") == 0) {
        c->arch = MDL_ARCH_QWEN2;
        c->rope.mode = KRN_ROPE_NEOX;
    } else {
        return errf(err, err_len, FY_ERR_UNSUPPORTED,
                    "model: architecture '%s' not supported (llama, mistral, qwen2)", arch);
    }
    fy_status_t st;
#define HP(suffix, req, lo, hi, field)                                                          \
    if ((st = get_hp(g, arch, suffix, req, lo, hi, &c->field, err, err_len)) != FY_OK)          \
        return st;
    HP("block_count", true, 1, 1024, n_layers);
    HP("embedding_length", true, 1, 1 << 16, dim);
    HP("feed_forward_length", true, 1, 1 << 18, ffn_dim);
    HP("attention.head_count", true, 1, 1024, n_heads);
    c->n_kv_heads = c->n_heads;
    HP("attention.head_count_kv", false, 1, 1024, n_kv_heads);
    c->n_ctx_train = 4096;
    HP("context_length", false, 1, 1 << 24, n_ctx_train);
    if (c->dim % c->n_heads != 0)
        return errf(err, err_len, FY_ERR_FORMAT, "model: embedding_length %d not divisible by head_count %d",
                    c->dim, c->n_heads);
    c->head_dim = c->dim / c->n_heads;
    HP("attention.key_length", false, 1, 256, head_dim);
    if (c->head_dim > 256 || c->n_heads % c->n_kv_heads != 0 ||
        c->n_heads / c->n_kv_heads > 32)
        return errf(err, err_len, FY_ERR_UNSUPPORTED,
                    "model: head_dim %d / heads %d / kv heads %d not supported", c->head_dim,
                    c->n_heads, c->n_kv_heads);
    c->rope.n_rot = c->head_dim;
    HP("rope.dimension_count", false, 2, c->head_dim, rope.n_rot);
    if (c->rope.n_rot % 2 != 0)
        return errf(err, err_len, FY_ERR_FORMAT, "model: rope.dimension_count must be even");
#undef HP
    char key[128];
    c->rms_eps = 1e-5f;
    snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", arch);
    mdl_gguf_get_f32(g, key, &c->rms_eps);
    c->rope.theta = 10000.0f;
    snprintf(key, sizeof(key), "%s.rope.freq_base", arch);
    mdl_gguf_get_f32(g, key, &c->rope.theta);
    c->rope.freq_scale = 1.0f;
    snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
    const char *stype;
    size_t slen;
    if (mdl_gguf_get_str(g, key, &stype, &slen) == FY_OK && slen == 6 &&
        memcmp(stype, "linear", 6) == 0) {
        float factor = 1.0f;
        snprintf(key, sizeof(key), "%s.rope.scaling.factor", arch);
        mdl_gguf_get_f32(g, key, &factor);
        if (factor > 0.0f)
            c->rope.freq_scale = 1.0f / factor;
    }
    if (!(c->rms_eps > 0.0f && c->rms_eps < 1.0f) || !(c->rope.theta > 1.0f))
        return errf(err, err_len, FY_ERR_OUT_OF_RANGE, "model: rms epsilon or rope.freq_base out of range");
    const mdl_gguf_tensor_t *emb = mdl_gguf_find_tensor(g, "token_embd.weight");
    if (emb == NULL)
        return errf(err, err_len, FY_ERR_FORMAT, "model: tensor 'token_embd.weight' missing");
    if (emb->ne[1] < 1 || emb->ne[1] > (1 << 22))
        return errf(err, err_len, FY_ERR_FORMAT, "model: token_embd.weight has %llu rows",
                    (unsigned long long)emb->ne[1]);
    c->n_vocab = (int)emb->ne[1];
    c->tied_embeddings = mdl_gguf_find_tensor(g, "output.weight") == NULL;
    c->qkv_bias = mdl_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    return FY_OK;
}

void mdl_model_destroy(mdl_model_t *m)
{
    if (m == NULL)
        return;
    if (m->layers != NULL) {
        for (int l = 0; l < m->cfg.n_layers; l++) {
            layer_w_t *w = &m->layers[l];
            free(w->attn_norm);
            free(w->wqkv);
            free(w->bqkv);
            free(w->wo);
            free(w->ffn_norm);
            free(w->wgu);
            free(w->wdown);
        }
    }
    free(m->layers);
    if (m->output != m->tok_embd)
        free(m->output);
    free(m->tok_embd);
    free(m->output_norm);
    free(m->rope_freqs);
    for (int i = 0; i < m->n_raw; i++)
        free(m->raw[i]);
    free(m->raw);
    mdl_tokenizer_destroy(m->tok);
    mdl_cuda_model_destroy(m->cuda);
    free(m);
}

static fy_status_t load_layer(mdl_model_t *m, const mdl_gguf_t *g, const mdl_config_t *c, int l,
                              layer_w_t *w, char *err, size_t err_len)
{
    int q_dim = c->n_heads * c->head_dim, kv_dim = c->n_kv_heads * c->head_dim;
    int qkv_dim = q_dim + 2 * kv_dim;
    char name[96];
    fy_status_t st;
#define NAME(s) (snprintf(name, sizeof(name), "blk.%d.%s", l, s), name)
    if ((st = load_alloc(g, NAME("attn_norm.weight"), c->dim, 1, &w->attn_norm, err, err_len)))
        return st;
    if ((st = load_alloc(g, NAME("ffn_norm.weight"), c->dim, 1, &w->ffn_norm, err, err_len)))
        return st;
    w->wqkv = malloc((size_t)qkv_dim * c->dim * sizeof(float));
    w->wgu = malloc((size_t)2 * c->ffn_dim * c->dim * sizeof(float));
    if (w->wqkv == NULL || w->wgu == NULL)
        return FY_ERR_NO_MEMORY;
    if ((st = load_into(g, NAME("attn_q.weight"), c->dim, q_dim, w->wqkv, err, err_len)) ||
        (st = load_into(g, NAME("attn_k.weight"), c->dim, kv_dim,
                        w->wqkv + (size_t)q_dim * c->dim, err, err_len)) ||
        (st = load_into(g, NAME("attn_v.weight"), c->dim, kv_dim,
                        w->wqkv + (size_t)(q_dim + kv_dim) * c->dim, err, err_len)))
        return st;
    if (c->qkv_bias) {
        w->bqkv = malloc((size_t)qkv_dim * sizeof(float));
        if (w->bqkv == NULL)
            return FY_ERR_NO_MEMORY;
        if ((st = load_into(g, NAME("attn_q.bias"), q_dim, 1, w->bqkv, err, err_len)) ||
            (st = load_into(g, NAME("attn_k.bias"), kv_dim, 1, w->bqkv + q_dim, err, err_len)) ||
            (st = load_into(g, NAME("attn_v.bias"), kv_dim, 1, w->bqkv + q_dim + kv_dim, err,
                            err_len)))
            return st;
    }
    if ((st = load_alloc(g, NAME("attn_output.weight"), q_dim, c->dim, &w->wo, err, err_len)))
        return st;
    if ((st = load_into(g, NAME("ffn_gate.weight"), c->dim, c->ffn_dim, w->wgu, err, err_len)) ||
        (st = load_into(g, NAME("ffn_up.weight"), c->dim, c->ffn_dim,
                        w->wgu + (size_t)c->ffn_dim * c->dim, err, err_len)))
        return st;
    if ((st = load_alloc(g, NAME("ffn_down.weight"), c->ffn_dim, c->dim, &w->wdown, err,
                         err_len)))
        return st;
    const float *wk = w->wqkv + (size_t)q_dim * c->dim, *wv = wk + (size_t)kv_dim * c->dim;
    if ((st = make_qmat(m, g, NAME("attn_q.weight"), q_dim, c->dim, w->wqkv, &w->qq)) ||
        (st = make_qmat(m, g, NAME("attn_k.weight"), kv_dim, c->dim, wk, &w->qk)) ||
        (st = make_qmat(m, g, NAME("attn_v.weight"), kv_dim, c->dim, wv, &w->qv)) ||
        (st = make_qmat(m, g, NAME("attn_output.weight"), c->dim, q_dim, w->wo, &w->qo)) ||
        (st = make_qmat(m, g, NAME("ffn_gate.weight"), c->ffn_dim, c->dim, w->wgu, &w->qgate)) ||
        (st = make_qmat(m, g, NAME("ffn_up.weight"), c->ffn_dim, c->dim,
                        w->wgu + (size_t)c->ffn_dim * c->dim, &w->qup)) ||
        (st = make_qmat(m, g, NAME("ffn_down.weight"), c->dim, c->ffn_dim, w->wdown, &w->qdown)))
        return st;
#undef NAME
    return FY_OK;
}

/* crc over tensor `name` [rows][cols] dequantized to FP32, a chunk of rows at a time (the
 * same bytes as a CRC over the whole FP32 array, which is what the CPU model hashes). */
static fy_status_t crc_tensor_f32(const mdl_gguf_t *g, const char *name, uint64_t cols,
                                  uint64_t rows, uint32_t *crc)
{
    const mdl_gguf_tensor_t *t = mdl_gguf_find_tensor(g, name);
    if (t == NULL || t->ne[0] != cols || t->ne[1] != rows || t->n_elems != cols * rows ||
        rows == 0 || t->n_bytes % rows != 0)
        return FY_ERR_FORMAT;
    enum { CHUNK_ROWS = 256 };
    uint64_t row_bytes = t->n_bytes / rows;
    float *buf = malloc((size_t)CHUNK_ROWS * (size_t)cols * sizeof(float));
    if (buf == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = FY_OK;
    for (uint64_t r0 = 0; r0 < rows && st == FY_OK; r0 += CHUNK_ROWS) {
        uint64_t nr = FY_MIN((uint64_t)CHUNK_ROWS, rows - r0);
        mdl_gguf_tensor_t part = *t;
        part.data = (const uint8_t *)t->data + r0 * row_bytes;
        part.ne[1] = nr;
        part.n_elems = nr * cols;
        part.n_bytes = nr * row_bytes;
        if ((st = mdl_gguf_tensor_to_f32(&part, buf)) == FY_OK)
            *crc = fy_crc32c(*crc, buf, (size_t)(nr * cols) * sizeof(float));
    }
    free(buf);
    return st;
}

/* mdl_model_fingerprint's value for a model whose FP32 weights are not on the host. */
static fy_status_t fingerprint_from_file(const mdl_gguf_t *g, const mdl_config_t *c,
                                         uint64_t *fp_p)
{
    int32_t shape[] = {(int32_t)c->arch, c->n_vocab,  c->dim,     c->n_layers, c->n_heads,
                       c->n_kv_heads,    c->head_dim, c->ffn_dim, c->n_ctx_train};
    float rope[] = {c->rope.theta, c->rms_eps};
    uint64_t dim = (uint64_t)c->dim;
    uint32_t lo = fy_crc32c(0, shape, sizeof(shape));
    fy_status_t st = crc_tensor_f32(g, "token_embd.weight", dim, (uint64_t)c->n_vocab, &lo);
    if (st == FY_OK && !c->tied_embeddings)
        st = crc_tensor_f32(g, "output.weight", dim, (uint64_t)c->n_vocab, &lo);
    uint32_t hi = fy_crc32c(0x9e3779b9u, rope, sizeof(rope));
    if (st == FY_OK)
        st = crc_tensor_f32(g, "output_norm.weight", dim, 1, &hi);
    char name[96];
    for (int l = 0; l < c->n_layers && st == FY_OK; l++) {
        snprintf(name, sizeof(name), "blk.%d.attn_norm.weight", l);
        st = crc_tensor_f32(g, name, dim, 1, &hi);
        snprintf(name, sizeof(name), "blk.%d.ffn_norm.weight", l);
        if (st == FY_OK)
            st = crc_tensor_f32(g, name, dim, 1, &hi);
    }
    uint64_t fp = (uint64_t)hi << 32 | lo;
    *fp_p = fp != 0 ? fp : 1;
    return st;
}

static fy_status_t model_create(const mdl_gguf_t *g, mdl_device_t device, mdl_model_t **model_p,
                                char *err, size_t err_len)
{
    if (err != NULL && err_len > 0)
        err[0] = '\0';
    if (device != MDL_DEVICE_CPU && device != MDL_DEVICE_CUDA)
        return FY_ERR_INVALID_ARG;
    mdl_model_t *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return FY_ERR_NO_MEMORY;
    m->device = device;
    fy_status_t st = read_config(g, &m->cfg, err, err_len);
    if (st != FY_OK)
        goto fail;
    mdl_config_t *c = &m->cfg;
    if (device == MDL_DEVICE_CUDA) {
        // Weights go straight from the file to the GPU; only the small vectors the config
        // points to are read on the host.
        if (mdl_gguf_find_tensor(g, "rope_freqs.weight") != NULL) {
            if ((st = load_alloc(g, "rope_freqs.weight", (uint64_t)c->rope.n_rot / 2, 1,
                                 &m->rope_freqs, err, err_len)))
                goto fail;
            c->rope.freq_factors = m->rope_freqs;
        }
        if ((st = mdl_cuda_model_load(g, c, &m->cuda, err, err_len)) != FY_OK ||
            (st = fingerprint_from_file(g, c, &m->fingerprint)) != FY_OK)
            goto fail;
        goto tokenizer;
    }
    m->layers = calloc((size_t)c->n_layers, sizeof(*m->layers));
    if (m->layers == NULL) {
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    if ((st = load_alloc(g, "token_embd.weight", c->dim, c->n_vocab, &m->tok_embd, err, err_len)) ||
        (st = load_alloc(g, "output_norm.weight", c->dim, 1, &m->output_norm, err, err_len)))
        goto fail;
    if (c->tied_embeddings) {
        m->output = m->tok_embd;
    } else if ((st = load_alloc(g, "output.weight", c->dim, c->n_vocab, &m->output, err,
                                err_len))) {
        goto fail;
    }
    if (mdl_gguf_find_tensor(g, "rope_freqs.weight") != NULL) {
        if ((st = load_alloc(g, "rope_freqs.weight", (uint64_t)c->rope.n_rot / 2, 1,
                             &m->rope_freqs, err, err_len)))
            goto fail;
        c->rope.freq_factors = m->rope_freqs;
    }
    for (int l = 0; l < c->n_layers; l++) {
        if ((st = load_layer(m, g, c, l, &m->layers[l], err, err_len)) != FY_OK)
            goto fail;
    }
    if ((st = make_qmat(m, g, c->tied_embeddings ? "token_embd.weight" : "output.weight",
                        c->n_vocab, c->dim, m->output, &m->qout)) != FY_OK)
        goto fail;
tokenizer:
    if ((st = mdl_tokenizer_create(g, &m->tok, err, err_len)) != FY_OK)
        goto fail;
    if (mdl_tokenizer_n_vocab(m->tok) > c->n_vocab) {
        st = errf(err, err_len, FY_ERR_FORMAT,
                  "model: tokenizer has %d tokens but token_embd.weight only %d rows",
                  mdl_tokenizer_n_vocab(m->tok), c->n_vocab);
        goto fail;
    }
    *model_p = m;
    return FY_OK;
fail:
    if (st == FY_ERR_NO_MEMORY && err != NULL && err_len > 0 && err[0] == '\0')
        snprintf(err, err_len, "model: out of memory loading weights");
    mdl_model_destroy(m);
    return st;
}

fy_status_t mdl_model_create_from_gguf(const mdl_gguf_t *g, mdl_model_t **model_p, char *err,
                                       size_t err_len)
{
    return model_create(g, MDL_DEVICE_CPU, model_p, err, err_len);
}

fy_status_t mdl_model_create(const mdl_model_params_t *params, mdl_model_t **model_p, char *err,
                             size_t err_len)
{
    if (params == NULL || params->path == NULL)
        return FY_ERR_INVALID_ARG;
    mdl_gguf_t *g = NULL;
    fy_status_t st = mdl_gguf_open(params->path, &g, err, err_len);
    if (st != FY_OK)
        return st;
    st = model_create(g, params->device, model_p, err, err_len);
    mdl_gguf_close(g); // weights were copied out
    return st;
}

const mdl_config_t *mdl_model_config(const mdl_model_t *m)
{
    return &m->cfg;
}

const mdl_tokenizer_t *mdl_model_tokenizer(const mdl_model_t *m)
{
    return m->tok;
}

fy_status_t mdl_device_parse(const char *name, mdl_device_t *device_p)
{
    if (name == NULL || device_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (strcmp(name, "cpu") == 0)
        *device_p = MDL_DEVICE_CPU;
    else if (strcmp(name, "cuda") == 0)
        *device_p = MDL_DEVICE_CUDA;
    else
        return FY_ERR_INVALID_ARG;
    return FY_OK;
}

mdl_device_t mdl_model_device(const mdl_model_t *m)
{
    return m->device;
}

/* ------------------------------------------------------------------------------------------ */
/* Run state                                                                                    */
/* ------------------------------------------------------------------------------------------ */

struct mdl_ctx {
    const mdl_model_t *m;
    mdl_ctx_params_t p;
    fy_pool_t *pool;
    int n_threads;
    // Prefill scratch, sized for cap_tokens tokens.
    int cap_tokens;
    float *x;       // [n][dim] residual stream
    float *xn;      // [n][dim] normed input of the current block
    float *q;       // [n][q_dim] queries after RoPE
    float *k;       // [n_kv][n][head_dim] keys after RoPE (the handed-out layout)
    float *v;       // [n_kv][n][head_dim]
    float *att;     // [n][q_dim] attention output
    float *qwin;    // [n_heads][window][head_dim]
    int cap_window;
    int32_t *pos;   // [n]
    float *scores;  // [n_threads][n] one score row per worker
    float *att_scores; // [n_threads][ATT_BLAS_BLOCK][n] scores of one block of queries
    // Chunk scratch, sized for prefill_chunk (or max_batch) rows.
    int cap_rows;
    float *qkv;     // [rows][qkv_dim]
    float *gu;      // [rows][2 * ffn_dim]
    // Decode page-pointer scratch.
    int cap_pages;
    const uint16_t **pages; // [n_threads][cap_pages]
    mdl_cuda_ctx_t *cuda;   // device CUDA: everything runs there (the CPU scratch stays empty)
};

void mdl_ctx_params_default(mdl_ctx_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->n_threads = 0;
    p->prefill_chunk = 512;
    p->max_batch = 64;
}

void mdl_ctx_destroy(mdl_ctx_t *ctx)
{
    if (ctx == NULL)
        return;
    mdl_cuda_ctx_destroy(ctx->cuda);
    fy_pool_destroy(ctx->pool);
    free(ctx->x);
    free(ctx->xn);
    free(ctx->q);
    free(ctx->k);
    free(ctx->v);
    free(ctx->att);
    free(ctx->qwin);
    free(ctx->pos);
    free(ctx->scores);
    free(ctx->att_scores);
    free(ctx->qkv);
    free(ctx->gu);
    free(ctx->pages);
    free(ctx);
}

static int qkv_width(const mdl_config_t *c)
{
    return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
}

fy_status_t mdl_ctx_create(const mdl_model_t *m, const mdl_ctx_params_t *params, mdl_ctx_t **ctx_p)
{
    mdl_ctx_params_t p;
    if (params != NULL)
        p = *params;
    else
        mdl_ctx_params_default(&p);
    if (m == NULL || p.n_threads < 0 || p.prefill_chunk <= 0 || p.max_batch <= 0 ||
        p.device != m->device)
        return FY_ERR_INVALID_ARG;
    mdl_ctx_t *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return FY_ERR_NO_MEMORY;
    ctx->m = m;
    ctx->p = p;
    if (p.device == MDL_DEVICE_CUDA) {
        fy_status_t cst = mdl_cuda_ctx_create(m->cuda, &p, &ctx->cuda);
        if (cst != FY_OK) {
            free(ctx);
            return cst;
        }
        *ctx_p = ctx;
        return FY_OK;
    }
    fy_status_t st = fy_pool_create(p.n_threads, &ctx->pool);
    if (st != FY_OK) {
        free(ctx);
        return st;
    }
    ctx->n_threads = fy_pool_size(ctx->pool);
    krn_gemm_set_threads(ctx->n_threads);
    const mdl_config_t *c = &m->cfg;
    ctx->cap_rows = FY_MAX(p.prefill_chunk, p.max_batch);
    ctx->qkv = malloc((size_t)ctx->cap_rows * qkv_width(c) * sizeof(float));
    ctx->gu = malloc((size_t)ctx->cap_rows * 2 * c->ffn_dim * sizeof(float));
    if (ctx->qkv == NULL || ctx->gu == NULL) {
        mdl_ctx_destroy(ctx);
        return FY_ERR_NO_MEMORY;
    }
    *ctx_p = ctx;
    return FY_OK;
}

/* Grows the per-token scratch to hold n tokens (and a window of w queries). */
static fy_status_t ensure_tokens(mdl_ctx_t *ctx, int n, int w)
{
    const mdl_config_t *c = &ctx->m->cfg;
    if (n > ctx->cap_tokens) {
        int cap = FY_MAX(n, 64);
        size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
        float *bufs[8];
        size_t sizes[8] = {(size_t)c->dim, (size_t)c->dim, q_dim, kv_dim, kv_dim, q_dim,
                           (size_t)ctx->n_threads,
                           (size_t)ATT_BLAS_BLOCK * (size_t)ctx->n_threads};
        for (int i = 0; i < 8; i++) {
            bufs[i] = malloc((size_t)cap * sizes[i] * sizeof(float));
            if (bufs[i] == NULL) {
                for (int j = 0; j < i; j++)
                    free(bufs[j]);
                return FY_ERR_NO_MEMORY;
            }
        }
        int32_t *pos = malloc((size_t)cap * sizeof(int32_t));
        if (pos == NULL) {
            for (int j = 0; j < 8; j++)
                free(bufs[j]);
            return FY_ERR_NO_MEMORY;
        }
        float **dst[8] = {&ctx->x, &ctx->xn, &ctx->q, &ctx->k, &ctx->v, &ctx->att, &ctx->scores,
                          &ctx->att_scores};
        for (int i = 0; i < 8; i++) {
            free(*dst[i]);
            *dst[i] = bufs[i];
        }
        free(ctx->pos);
        ctx->pos = pos;
        ctx->cap_tokens = cap;
    }
    if (w > ctx->cap_window) {
        float *qw = malloc((size_t)w * c->n_heads * c->head_dim * sizeof(float));
        if (qw == NULL)
            return FY_ERR_NO_MEMORY;
        free(ctx->qwin);
        ctx->qwin = qw;
        ctx->cap_window = w;
    }
    return FY_OK;
}

static fy_status_t check_tokens(const mdl_config_t *c, const int32_t *tokens, int n)
{
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->n_vocab)
            return FY_ERR_OUT_OF_RANGE;
    }
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Shared blocks                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* y[rows][n] (+)= x[rows][k] · Wᵀ: small row counts read the stored weights (decode is bound
 * by weight bytes), larger ones go through OpenBLAS on the FP32 copy w. */
static void linear(mdl_ctx_t *ctx, int rows, const float *x, int ldx, const float *w,
                   const krn_qmat_t *q, float *y, int ldy, int accumulate)
{
    if (rows <= DECODE_Q_MAX_ROWS &&
        krn_matmul_q_f32(ctx->pool, rows, x, ldx, q, y, ldy, accumulate) == FY_OK)
        return;
    krn_gemm_f32(rows, q->rows, q->cols, x, ldx, w, q->cols, y, ldy, accumulate);
}

/* x[rows] += FFN(RMSNorm(x[rows])) in chunks of cap_rows rows; xn is scratch [rows][dim]. */
static void ffn_block(mdl_ctx_t *ctx, const layer_w_t *w, float *x, float *xn, int rows)
{
    const mdl_config_t *c = &ctx->m->cfg;
    int dim = c->dim, ffn = c->ffn_dim;
    krn_rmsnorm_f32(xn, dim, x, dim, w->ffn_norm, rows, dim, c->rms_eps);
    for (int r0 = 0; r0 < rows; r0 += ctx->cap_rows) {
        int nr = FY_MIN(ctx->cap_rows, rows - r0);
        // gu [nr][2 * ffn]: gate in the first ffn columns, up in the rest.
        const float *xr = xn + (size_t)r0 * dim;
        const krn_qmat_t *qs[2] = {&w->qgate, &w->qup};
        float *ys[2] = {ctx->gu, ctx->gu + ffn};
        if (nr > DECODE_Q_MAX_ROWS ||
            krn_matmul_q_multi_f32(ctx->pool, nr, xr, dim, qs, ys, 2 * ffn, 2, 0) != FY_OK)
            krn_gemm_f32(nr, 2 * ffn, dim, xr, dim, w->wgu, dim, ctx->gu, 2 * ffn, 0);
        for (int r = 0; r < nr; r++) {
            float *g = ctx->gu + (size_t)r * 2 * ffn;
            krn_swiglu_f32(g, g, g + ffn, (size_t)ffn);
        }
        linear(ctx, nr, ctx->gu, 2 * ffn, w->wdown, &w->qdown, x + (size_t)r0 * dim, dim, 1);
    }
}

/* logits[rows][n_vocab] = RMSNorm(x[rows]) · outputᵀ. */
static void logits_block(mdl_ctx_t *ctx, const float *x, int rows, float *xn, float *logits)
{
    const mdl_model_t *m = ctx->m;
    const mdl_config_t *c = &m->cfg;
    krn_rmsnorm_f32(xn, c->dim, x, c->dim, m->output_norm, rows, c->dim, c->rms_eps);
    linear(ctx, rows, xn, c->dim, m->output, &m->qout, logits, c->n_vocab, 0);
}

static void embed(const mdl_model_t *m, const int32_t *tokens, int n, float *x)
{
    size_t dim = (size_t)m->cfg.dim;
    for (int i = 0; i < n; i++)
        memcpy(x + i * dim, m->tok_embd + (size_t)tokens[i] * dim, dim * sizeof(float));
}

/* ------------------------------------------------------------------------------------------ */
/* Prefill                                                                                      */
/* ------------------------------------------------------------------------------------------ */

void mdl_prefill_params_default(mdl_prefill_params_t *p)
{
    memset(p, 0, sizeof(*p));
}


typedef struct {
    mdl_ctx_t *ctx;
    int n;          // tokens of the prompt
    int n_qblocks;
    const float *q; // [n][q_dim] the prompt's queries
    float *att;     // [n][q_dim] its attention output
    const float *k, *v; // [n_kv][n][head_dim] its keys and values
} prefill_att_t;

/* Work item = (query head, block of ATT_QBLOCK queries). */
static void prefill_att_range(void *arg, size_t begin, size_t end, int thread)
{
    prefill_att_t *a = arg;
    mdl_ctx_t *ctx = a->ctx;
    const mdl_config_t *c = &ctx->m->cfg;
    int hd = c->head_dim, q_dim = c->n_heads * hd, group = c->n_heads / c->n_kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
    float *scores = ctx->scores + (size_t)thread * ctx->cap_tokens;
    for (size_t it = begin; it < end; it++) {
        int h = (int)(it / (size_t)a->n_qblocks);
        int q0 = (int)(it % (size_t)a->n_qblocks) * ATT_QBLOCK;
        int nq = FY_MIN(ATT_QBLOCK, a->n - q0);
        int kvh = h / group;
        const float *kh = a->k + (size_t)kvh * a->n * hd;
        const float *vh = a->v + (size_t)kvh * a->n * hd;
        krn_attention_causal_f32(a->att + (size_t)q0 * q_dim + (size_t)h * hd, q_dim,
                                 a->q + (size_t)q0 * q_dim + (size_t)h * hd, q_dim, kh, vh, q0,
                                 nq, hd, scale, scores);
    }
}

/* Work item = (query head, block of ATT_BLAS_BLOCK queries) for the GEMM kernel. */
static void prefill_att_blas_range(void *arg, size_t begin, size_t end, int thread)
{
    prefill_att_t *a = arg;
    mdl_ctx_t *ctx = a->ctx;
    const mdl_config_t *c = &ctx->m->cfg;
    int hd = c->head_dim, q_dim = c->n_heads * hd, group = c->n_heads / c->n_kv_heads;
    float scale = 1.0f / sqrtf((float)hd);
    float *scores = ctx->att_scores + (size_t)thread * ATT_BLAS_BLOCK * ctx->cap_tokens;
    for (size_t it = begin; it < end; it++) {
        int h = (int)(it / (size_t)a->n_qblocks);
        int q0 = (int)(it % (size_t)a->n_qblocks) * ATT_BLAS_BLOCK;
        int nq = FY_MIN(ATT_BLAS_BLOCK, a->n - q0);
        const float *kh = a->k + (size_t)(h / group) * a->n * hd;
        const float *vh = a->v + (size_t)(h / group) * a->n * hd;
        krn_attention_causal_blas_f32(a->att + (size_t)q0 * q_dim + (size_t)h * hd, q_dim,
                                      a->q + (size_t)q0 * q_dim + (size_t)h * hd, q_dim, kh,
                                      vh, q0, nq, hd, scale, scores);
    }
}

/* Causal attention of all heads over one prompt of n tokens whose queries start at row r0 of
 * the batch and whose K/V block starts at ctx->k/v + r0 * kv_dim. Short prompts: the scalar
 * kernel, heads and query blocks spread over the pool. Longer ones: per head and block of
 * ATT_BLAS_BLOCK queries, two GEMMs (see prefill_att_blas_range). */
static void attention_prefill(mdl_ctx_t *ctx, int r0, int n)
{
    const mdl_config_t *c = &ctx->m->cfg;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    prefill_att_t a = {.ctx = ctx, .n = n, .q = ctx->q + (size_t)r0 * q_dim,
                       .att = ctx->att + (size_t)r0 * q_dim, .k = ctx->k + (size_t)r0 * kv_dim,
                       .v = ctx->v + (size_t)r0 * kv_dim};
    if (n < ATT_BLAS_MIN) {
        a.n_qblocks = (n + ATT_QBLOCK - 1) / ATT_QBLOCK;
        fy_pool_parallel_for(ctx->pool, (size_t)c->n_heads * a.n_qblocks, 1, prefill_att_range,
                             &a);
        return;
    }
    // One (head, query block) per work item on the pool, each GEMM single-threaded: the
    // softmax between the two GEMMs runs in parallel too, and OpenBLAS's own workers do not
    // spin against ours.
    a.n_qblocks = (n + ATT_BLAS_BLOCK - 1) / ATT_BLAS_BLOCK;
    krn_gemm_set_threads(1);
    fy_pool_parallel_for(ctx->pool, (size_t)c->n_heads * a.n_qblocks, 1, prefill_att_blas_range,
                         &a);
    krn_gemm_set_threads(ctx->n_threads);
}

/* Checks one prompt of a prefill and reserves its sequence's pages. */
static fy_status_t prefill_check(const mdl_ctx_t *ctx, const int32_t *tokens, int n,
                                 const mdl_prefill_params_t *params, const float *logits)
{
    const mdl_config_t *c = &ctx->m->cfg;
    if (tokens == NULL || n <= 0 || logits == NULL || params->window < 0)
        return FY_ERR_INVALID_ARG;
    if (n > c->n_ctx_train)
        return FY_ERR_OUT_OF_RANGE;
    fy_status_t st = check_tokens(c, tokens, n);
    if (st != FY_OK)
        return st;
    mdl_kv_seq_t *seq = params->seq;
    if (seq != NULL) {
        if (mdl_kv_params_of(mdl_kv_seq_pool(seq))->device != ctx->p.device)
            return FY_ERR_INVALID_ARG;
        if (mdl_kv_seq_len(seq) != 0)
            return FY_ERR_STATE;
    }
    return FY_OK;
}

/* The CPU forward of n_seqs checked prompts laid one after another in the rows of the scratch:
 * prompt s owns rows [start[s], start[s] + n[s]) of x, xn, q and att, and the K/V block at
 * k/v + start[s] * kv_dim laid out [n_kv][n[s]][hd], which is what its callback gets. GEMMs
 * run over all rows in chunks of cap_rows; RoPE positions and attention are per prompt. */
static fy_status_t prefill_cpu(mdl_ctx_t *ctx, int n_seqs, const int32_t *const *tokens,
                               const int *n_tok, const int *start, int total,
                               const mdl_prefill_params_t *params, float *const *logits)
{
    const mdl_model_t *m = ctx->m;
    const mdl_config_t *c = &m->cfg;
    int w_max = 0;
    for (int s = 0; s < n_seqs; s++)
        w_max = FY_MAX(w_max, FY_MIN(params[s].window, n_tok[s]));
    fy_status_t st = ensure_tokens(ctx, total, w_max);
    if (st != FY_OK)
        return st;

    int dim = c->dim, hd = c->head_dim, n_kv = c->n_kv_heads;
    int q_dim = c->n_heads * hd, kv_dim = n_kv * hd, qkv_dim = qkv_width(c);
    for (int s = 0; s < n_seqs; s++) {
        for (int i = 0; i < n_tok[s]; i++)
            ctx->pos[start[s] + i] = i;
        embed(m, tokens[s], n_tok[s], ctx->x + (size_t)start[s] * dim);
    }

    for (int l = 0; l < c->n_layers; l++) {
        const layer_w_t *lw = &m->layers[l];
        // Attention block: QKV in row chunks, scattered into q [total][q_dim] and each
        // prompt's [n_kv][n][hd] K/V block.
        krn_rmsnorm_f32(ctx->xn, dim, ctx->x, dim, lw->attn_norm, total, dim, c->rms_eps);
        int s = 0;
        for (int r0 = 0; r0 < total; r0 += ctx->cap_rows) {
            int nr = FY_MIN(ctx->cap_rows, total - r0);
            krn_gemm_f32(nr, qkv_dim, dim, ctx->xn + (size_t)r0 * dim, dim, lw->wqkv, dim,
                         ctx->qkv, qkv_dim, 0);
            if (lw->bqkv != NULL) {
                for (int r = 0; r < nr; r++) {
                    float *row = ctx->qkv + (size_t)r * qkv_dim;
                    for (int j = 0; j < qkv_dim; j++)
                        row[j] += lw->bqkv[j];
                }
            }
            // RoPE on q and k (k heads follow q heads in each row).
            krn_rope_f32(ctx->qkv, qkv_dim, nr, c->n_heads + n_kv, hd, ctx->pos + r0, &c->rope);
            for (int r = 0; r < nr; r++) {
                int row_i = r0 + r;
                while (row_i >= start[s] + n_tok[s])
                    s++;
                int n = n_tok[s], i = row_i - start[s];
                const float *row = ctx->qkv + (size_t)r * qkv_dim;
                memcpy(ctx->q + (size_t)row_i * q_dim, row, (size_t)q_dim * sizeof(float));
                float *kb = ctx->k + (size_t)start[s] * kv_dim;
                float *vb = ctx->v + (size_t)start[s] * kv_dim;
                for (int h = 0; h < n_kv; h++) {
                    size_t dst = ((size_t)h * n + i) * hd;
                    memcpy(kb + dst, row + q_dim + (size_t)h * hd, (size_t)hd * sizeof(float));
                    memcpy(vb + dst, row + q_dim + kv_dim + (size_t)h * hd,
                           (size_t)hd * sizeof(float));
                }
            }
        }
        for (s = 0; s < n_seqs; s++)
            attention_prefill(ctx, start[s], n_tok[s]);
        for (int r0 = 0; r0 < total; r0 += ctx->cap_rows) {
            int nr = FY_MIN(ctx->cap_rows, total - r0);
            krn_gemm_f32(nr, dim, q_dim, ctx->att + (size_t)r0 * q_dim, q_dim, lw->wo, q_dim,
                         ctx->x + (size_t)r0 * dim, dim, 1);
        }
        ffn_block(ctx, lw, ctx->x, ctx->xn, total);

        // The layer's KV is final: store it and hand it out, prompt by prompt.
        for (s = 0; s < n_seqs; s++) {
            const mdl_prefill_params_t *p = &params[s];
            int n = n_tok[s], w = FY_MIN(p->window, n);
            const float *kb = ctx->k + (size_t)start[s] * kv_dim;
            const float *vb = ctx->v + (size_t)start[s] * kv_dim;
            if (p->seq != NULL && (st = mdl_kv_seq_load_layer(p->seq, l, n, kb, vb)) != FY_OK)
                return st;
            if (p->on_layer == NULL)
                continue;
            const float *qs = ctx->q + (size_t)start[s] * q_dim;
            for (int h = 0; h < c->n_heads; h++) {
                for (int i = 0; i < w; i++)
                    memcpy(ctx->qwin + ((size_t)h * w + i) * hd,
                           qs + (size_t)(n - w + i) * q_dim + (size_t)h * hd,
                           (size_t)hd * sizeof(float));
            }
            mdl_layer_kv_t kv = {.layer = l, .n_tokens = n, .n_kv_heads = n_kv,
                                 .n_heads = c->n_heads, .head_dim = hd, .k = kb, .v = vb,
                                 .n_window = w, .q_window = w > 0 ? ctx->qwin : NULL};
            if ((st = p->on_layer(p->cb_arg, &kv)) != FY_OK)
                return st;
        }
    }
    for (int s = 0; s < n_seqs; s++) {
        const float *xs = ctx->x + (size_t)start[s] * dim;
        if (params[s].all_logits)
            logits_block(ctx, xs, n_tok[s], ctx->xn, logits[s]);
        else
            logits_block(ctx, xs + (size_t)(n_tok[s] - 1) * dim, 1, ctx->xn, logits[s]);
    }
    for (int s = 0; s < n_seqs; s++) {
        if (params[s].seq != NULL && (st = mdl_kv_seq_commit(params[s].seq, n_tok[s])) != FY_OK)
            return st;
    }
    return FY_OK;
}

fy_status_t mdl_prefill(mdl_ctx_t *ctx, const int32_t *tokens, int n,
                        const mdl_prefill_params_t *params, float *logits)
{
    mdl_prefill_params_t dp;
    if (params == NULL) {
        mdl_prefill_params_default(&dp);
        params = &dp;
    }
    if (ctx == NULL)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = prefill_check(ctx, tokens, n, params, logits);
    if (st != FY_OK)
        return st;
    mdl_kv_seq_t *seq = params->seq;
    if (seq != NULL && (st = mdl_kv_seq_reserve(seq, n)) != FY_OK)
        return st;
    if (ctx->cuda != NULL) {
        int w = FY_MIN(params->window, n);
        st = mdl_cuda_prefill(ctx->cuda, tokens, n, w, params, logits);
        if (st == FY_OK && seq != NULL)
            st = mdl_kv_seq_commit(seq, n);
    } else {
        int start = 0;
        st = prefill_cpu(ctx, 1, &tokens, &n, &start, n, params, &logits);
    }
    if (st != FY_OK && seq != NULL)
        mdl_kv_seq_clear(seq);
    return st;
}

fy_status_t mdl_prefill_batch(mdl_ctx_t *ctx, int n_seqs, const int32_t *const *tokens,
                              const int *n_tokens, const mdl_prefill_params_t *params,
                              float *const *logits)
{
    if (ctx == NULL || n_seqs <= 0 || tokens == NULL || n_tokens == NULL || logits == NULL)
        return FY_ERR_INVALID_ARG;
    mdl_prefill_params_t *pp = malloc((size_t)n_seqs * sizeof(*pp));
    int *start = malloc((size_t)n_seqs * sizeof(int));
    fy_status_t st = pp != NULL && start != NULL ? FY_OK : FY_ERR_NO_MEMORY;
    int64_t total = 0;
    int n_reserved = 0;
    for (int s = 0; st == FY_OK && s < n_seqs; s++) {
        if (params != NULL)
            pp[s] = params[s];
        else
            mdl_prefill_params_default(&pp[s]);
        st = prefill_check(ctx, tokens[s], n_tokens[s], &pp[s], logits[s]);
        for (int j = 0; st == FY_OK && j < s; j++) {
            if (pp[s].seq != NULL && pp[j].seq == pp[s].seq)
                st = FY_ERR_INVALID_ARG; // one sequence twice
        }
        if (st != FY_OK)
            break;
        start[s] = (int)total;
        total += n_tokens[s];
        if (total > INT32_MAX / 2)
            st = FY_ERR_OUT_OF_RANGE;
    }
    for (int s = 0; st == FY_OK && s < n_seqs; s++) {
        if (pp[s].seq != NULL && (st = mdl_kv_seq_reserve(pp[s].seq, n_tokens[s])) == FY_OK)
            n_reserved = s + 1;
    }
    if (st == FY_OK && ctx->cuda != NULL) {
        // The GPU path runs the prompts one after another.
        for (int s = 0; st == FY_OK && s < n_seqs; s++) {
            int w = FY_MIN(pp[s].window, n_tokens[s]);
            st = mdl_cuda_prefill(ctx->cuda, tokens[s], n_tokens[s], w, &pp[s], logits[s]);
            if (st == FY_OK && pp[s].seq != NULL)
                st = mdl_kv_seq_commit(pp[s].seq, n_tokens[s]);
        }
    } else if (st == FY_OK) {
        st = prefill_cpu(ctx, n_seqs, tokens, n_tokens, start, (int)total, pp, logits);
    }
    if (st != FY_OK) {
        for (int s = 0; s < n_reserved; s++) { // all were empty
            if (pp[s].seq != NULL)
                mdl_kv_seq_clear(pp[s].seq);
        }
    }
    free(pp);
    free(start);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Decode                                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    mdl_ctx_t *ctx;
    mdl_kv_seq_t *const *seqs;
    int layer;
    fy_status_t status; // first failure (written by any worker; any non-OK value will do)
} decode_att_t;

/* Work item = (sequence, kv head): the group's query heads attend over its pages. */
static void decode_att_range(void *arg, size_t begin, size_t end, int thread)
{
    decode_att_t *a = arg;
    mdl_ctx_t *ctx = a->ctx;
    const mdl_config_t *c = &ctx->m->cfg;
    int hd = c->head_dim, n_kv = c->n_kv_heads, group = c->n_heads / n_kv;
    int q_dim = c->n_heads * hd, qkv_dim = qkv_width(c);
    float scale = 1.0f / sqrtf((float)hd);
    const uint16_t **pages = ctx->pages + (size_t)thread * ctx->cap_pages;
    for (size_t it = begin; it < end; it++) {
        int b = (int)(it / (size_t)n_kv), h = (int)(it % (size_t)n_kv);
        krn_page_list_t list;
        fy_status_t st = mdl_kv_seq_pages(a->seqs[b], a->layer, h, 1, pages, ctx->cap_pages, &list);
        if (st != FY_OK) {
            a->status = st;
            continue;
        }
        const float *q = ctx->qkv + (size_t)b * qkv_dim + (size_t)h * group * hd;
        float *out = ctx->att + (size_t)b * q_dim + (size_t)h * group * hd;
        krn_paged_attention_f16(out, q, group, hd, scale, &list);
    }
}

fy_status_t mdl_decode(mdl_ctx_t *ctx, mdl_kv_seq_t *const *seqs, const int32_t *tokens, int n,
                       float *logits)
{
    const mdl_model_t *m = ctx->m;
    const mdl_config_t *c = &m->cfg;
    if (seqs == NULL || tokens == NULL || logits == NULL || n <= 0)
        return FY_ERR_INVALID_ARG;
    if (n > ctx->p.max_batch)
        return FY_ERR_OUT_OF_RANGE;
    fy_status_t st = check_tokens(c, tokens, n);
    if (st != FY_OK)
        return st;
    int64_t max_len = 0;
    for (int i = 0; i < n; i++) {
        if (seqs[i] == NULL)
            return FY_ERR_INVALID_ARG;
        for (int j = 0; j < i; j++) {
            if (seqs[j] == seqs[i])
                return FY_ERR_INVALID_ARG;
        }
        if (mdl_kv_seq_len(seqs[i]) >= c->n_ctx_train)
            return FY_ERR_OUT_OF_RANGE;
        if (mdl_kv_params_of(mdl_kv_seq_pool(seqs[i]))->device != ctx->p.device)
            return FY_ERR_INVALID_ARG;
        max_len = FY_MAX(max_len, mdl_kv_seq_len(seqs[i]) + 1);
    }
    for (int i = 0; i < n; i++) {
        if ((st = mdl_kv_seq_reserve(seqs[i], 1)) != FY_OK)
            return st;
    }
    if (ctx->cuda != NULL) {
        if ((st = mdl_cuda_decode(ctx->cuda, seqs, tokens, n, logits)) != FY_OK)
            return st;
        for (int i = 0; i < n; i++) {
            if ((st = mdl_kv_seq_commit(seqs[i], 1)) != FY_OK)
                return st;
        }
        return FY_OK;
    }
    if ((st = ensure_tokens(ctx, n, 0)) != FY_OK)
        return st;
    // Page-pointer scratch for the longest sequence (smallest page size is 1 token).
    int64_t need_pages = max_len; // upper bound without knowing the page size
    if (need_pages > ctx->cap_pages) {
        const uint16_t **pp = malloc((size_t)need_pages * ctx->n_threads * sizeof(*pp));
        if (pp == NULL)
            return FY_ERR_NO_MEMORY;
        free(ctx->pages);
        ctx->pages = pp;
        ctx->cap_pages = (int)need_pages;
    }

    int dim = c->dim, hd = c->head_dim, n_kv = c->n_kv_heads;
    int q_dim = c->n_heads * hd, kv_dim = n_kv * hd, qkv_dim = qkv_width(c);
    for (int i = 0; i < n; i++)
        ctx->pos[i] = (int32_t)mdl_kv_seq_len(seqs[i]);
    embed(m, tokens, n, ctx->x);
    for (int l = 0; l < c->n_layers; l++) {
        const layer_w_t *lw = &m->layers[l];
        krn_rmsnorm_f32(ctx->xn, dim, ctx->x, dim, lw->attn_norm, n, dim, c->rms_eps);
        const krn_qmat_t *qs[3] = {&lw->qq, &lw->qk, &lw->qv};
        float *ys[3] = {ctx->qkv, ctx->qkv + q_dim, ctx->qkv + q_dim + kv_dim};
        if (n > DECODE_Q_MAX_ROWS ||
            krn_matmul_q_multi_f32(ctx->pool, n, ctx->xn, dim, qs, ys, qkv_dim, 3, 0) != FY_OK)
            krn_gemm_f32(n, qkv_dim, dim, ctx->xn, dim, lw->wqkv, dim, ctx->qkv, qkv_dim, 0);
        for (int r = 0; r < n; r++) {
            float *row = ctx->qkv + (size_t)r * qkv_dim;
            if (lw->bqkv != NULL) {
                for (int j = 0; j < qkv_dim; j++)
                    row[j] += lw->bqkv[j];
            }
            krn_rope_f32(row, qkv_dim, 1, c->n_heads + n_kv, hd, ctx->pos + r, &c->rope);
            for (int h = 0; h < n_kv; h++)
                mdl_kv_seq_write(seqs[r], l, h, ctx->pos[r], row + q_dim + (size_t)h * hd,
                                 row + q_dim + kv_dim + (size_t)h * hd);
        }
        decode_att_t a = {.ctx = ctx, .seqs = seqs, .layer = l, .status = FY_OK};
        fy_pool_parallel_for(ctx->pool, (size_t)n * n_kv, 1, decode_att_range, &a);
        if (a.status != FY_OK)
            return a.status;
        linear(ctx, n, ctx->att, q_dim, lw->wo, &lw->qo, ctx->x, dim, 1);
        ffn_block(ctx, lw, ctx->x, ctx->xn, n);
    }
    logits_block(ctx, ctx->x, n, ctx->xn, logits);
    for (int i = 0; i < n; i++) {
        if ((st = mdl_kv_seq_commit(seqs[i], 1)) != FY_OK)
            return st;
    }
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Decode over an outside KV store (model_int.h; decode_kvc.c uses it for kvcodec pages)        */
/* ------------------------------------------------------------------------------------------ */

const mdl_model_t *mdl_ctx_model(const mdl_ctx_t *ctx)
{
    return ctx->m;
}

/* A decode step's rows against the context and model: batch size, token ids, positions. */
static fy_status_t check_step(const mdl_ctx_t *ctx, const int32_t *tokens, const int32_t *pos,
                              int n)
{
    const mdl_config_t *c = &ctx->m->cfg;
    if (n > ctx->p.max_batch)
        return FY_ERR_OUT_OF_RANGE;
    fy_status_t st = check_tokens(c, tokens, n);
    if (st != FY_OK)
        return st;
    for (int i = 0; i < n; i++) {
        if (pos[i] < 0 || pos[i] >= c->n_ctx_train)
            return FY_ERR_OUT_OF_RANGE;
    }
    return FY_OK;
}

fy_status_t mdl_decode_ext(mdl_ctx_t *ctx, const int32_t *tokens, const int32_t *pos, int n,
                           const mdl_decode_ops_t *ops, void *arg, float *logits)
{
    if (ctx == NULL || tokens == NULL || pos == NULL || ops == NULL || ops->store == NULL ||
        ops->attend == NULL || logits == NULL || n <= 0)
        return FY_ERR_INVALID_ARG;
    if (ctx->cuda != NULL)
        return FY_ERR_UNSUPPORTED; // host callbacks per layer: a CPU context's job
    const mdl_model_t *m = ctx->m;
    const mdl_config_t *c = &m->cfg;
    fy_status_t st = check_step(ctx, tokens, pos, n);
    if (st != FY_OK)
        return st;
    if ((st = ensure_tokens(ctx, n, 0)) != FY_OK)
        return st;
    int dim = c->dim, hd = c->head_dim, n_kv = c->n_kv_heads;
    int q_dim = c->n_heads * hd, kv_dim = n_kv * hd, qkv_dim = qkv_width(c);
    memcpy(ctx->pos, pos, (size_t)n * sizeof(int32_t));
    embed(m, tokens, n, ctx->x);
    for (int l = 0; l < c->n_layers; l++) {
        const layer_w_t *lw = &m->layers[l];
        krn_rmsnorm_f32(ctx->xn, dim, ctx->x, dim, lw->attn_norm, n, dim, c->rms_eps);
        // qkv [n][qkv_dim]: q heads, then k heads, then v heads of each row.
        const krn_qmat_t *qs[3] = {&lw->qq, &lw->qk, &lw->qv};
        float *ys[3] = {ctx->qkv, ctx->qkv + q_dim, ctx->qkv + q_dim + kv_dim};
        if (n > DECODE_Q_MAX_ROWS ||
            krn_matmul_q_multi_f32(ctx->pool, n, ctx->xn, dim, qs, ys, qkv_dim, 3, 0) != FY_OK)
            krn_gemm_f32(n, qkv_dim, dim, ctx->xn, dim, lw->wqkv, dim, ctx->qkv, qkv_dim, 0);
        for (int r = 0; r < n; r++) {
            float *row = ctx->qkv + (size_t)r * qkv_dim;
            if (lw->bqkv != NULL) {
                for (int j = 0; j < qkv_dim; j++)
                    row[j] += lw->bqkv[j];
            }
            krn_rope_f32(row, qkv_dim, 1, c->n_heads + n_kv, hd, ctx->pos + r, &c->rope);
            if ((st = ops->store(arg, r, l, row + q_dim, row + q_dim + kv_dim)) != FY_OK)
                return st;
        }
        if ((st = ops->attend(arg, l, n, ctx->qkv, (size_t)qkv_dim, ctx->att, (size_t)q_dim,
                              ctx->pool)) != FY_OK)
            return st;
        linear(ctx, n, ctx->att, q_dim, lw->wo, &lw->qo, ctx->x, dim, 1);
        ffn_block(ctx, lw, ctx->x, ctx->xn, n);
    }
    logits_block(ctx, ctx->x, n, ctx->xn, logits);
    return FY_OK;
}

fy_status_t mdl_decode_kvc_cuda_run(mdl_ctx_t *ctx, kvc_gpu_pool_t *pool,
                                    kvc_gpu_seq_t *const *seqs, const int32_t *pos,
                                    const int32_t *tokens, int n, float *logits)
{
    if (ctx->cuda == NULL)
        return FY_ERR_INVALID_ARG; // a CPU context: mdl_decode_kvc over a CPU pool
    fy_status_t st = check_step(ctx, tokens, pos, n);
    if (st != FY_OK)
        return st;
    return mdl_cuda_decode_kvc(ctx->cuda, pool, seqs, pos, tokens, n, logits);
}

uint64_t mdl_model_fingerprint(const mdl_model_t *m)
{
    if (m == NULL)
        return 0;
    if (m->device == MDL_DEVICE_CUDA)
        return m->fingerprint; // computed from the file at load (no FP32 host weights)
    const mdl_config_t *c = &m->cfg;
    // Two CRC32C streams over the shape and the weights that every token touches: the
    // embedding (and output) matrix and every norm vector.
    int32_t shape[] = {(int32_t)c->arch, c->n_vocab,  c->dim,     c->n_layers, c->n_heads,
                       c->n_kv_heads,    c->head_dim, c->ffn_dim, c->n_ctx_train};
    float rope[] = {c->rope.theta, c->rms_eps};
    size_t dim = (size_t)c->dim;
    uint32_t lo = fy_crc32c(0, shape, sizeof(shape));
    lo = fy_crc32c(lo, m->tok_embd, (size_t)c->n_vocab * dim * sizeof(float));
    if (!c->tied_embeddings)
        lo = fy_crc32c(lo, m->output, (size_t)c->n_vocab * dim * sizeof(float));
    uint32_t hi = fy_crc32c(0x9e3779b9u, rope, sizeof(rope));
    hi = fy_crc32c(hi, m->output_norm, dim * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        hi = fy_crc32c(hi, m->layers[l].attn_norm, dim * sizeof(float));
        hi = fy_crc32c(hi, m->layers[l].ffn_norm, dim * sizeof(float));
    }
    uint64_t fp = (uint64_t)hi << 32 | lo;
    return fp != 0 ? fp : 1; // 0 means "any model" to the router
}
