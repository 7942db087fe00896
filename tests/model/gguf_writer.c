/*
 * gguf_writer.c: see gguf_writer.h. Builds the file in a growable buffer: header, metadata,
 * tensor infos, padding, then each tensor's data at 32-byte aligned offsets.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf_writer.h"
#include "model.h"

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf_t;

typedef struct {
    char *name;
    uint32_t type;
    int n_dims;
    uint64_t ne[4];
    buf_t data;
} wtensor_t;

struct mdlt_gguf {
    buf_t kv;
    uint64_t n_kv;
    wtensor_t *t;
    size_t n_t;
    uint32_t align; /* general.alignment when set, else 32 */
};

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (q == NULL && n > 0)
        abort();
    return q;
}

static void put(buf_t *b, const void *src, size_t n)
{
    if (n == 0)
        return;
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void put_u32(buf_t *b, uint32_t v)
{
    put(b, &v, 4);
}

static void put_u64(buf_t *b, uint64_t v)
{
    put(b, &v, 8);
}

static void put_str(buf_t *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

mdlt_gguf_t *mdlt_gguf_new(void)
{
    mdlt_gguf_t *w = calloc(1, sizeof(*w));
    if (w == NULL)
        abort();
    return w;
}

void mdlt_gguf_free(mdlt_gguf_t *w)
{
    if (w == NULL)
        return;
    for (size_t i = 0; i < w->n_t; i++) {
        free(w->t[i].name);
        free(w->t[i].data.p);
    }
    free(w->t);
    free(w->kv.p);
    free(w);
}

static void key(mdlt_gguf_t *w, const char *k, uint32_t type)
{
    put_str(&w->kv, k);
    put_u32(&w->kv, type);
    w->n_kv++;
}

void mdlt_gguf_u32(mdlt_gguf_t *w, const char *k, uint32_t v)
{
    if (strcmp(k, "general.alignment") == 0)
        w->align = v;
    key(w, k, MDL_GGUF_U32);
    put_u32(&w->kv, v);
}

void mdlt_gguf_i32(mdlt_gguf_t *w, const char *k, int32_t v)
{
    key(w, k, MDL_GGUF_I32);
    put(&w->kv, &v, 4);
}

void mdlt_gguf_f32(mdlt_gguf_t *w, const char *k, float v)
{
    key(w, k, MDL_GGUF_F32);
    put(&w->kv, &v, 4);
}

void mdlt_gguf_bool(mdlt_gguf_t *w, const char *k, bool v)
{
    key(w, k, MDL_GGUF_BOOL);
    uint8_t b = v;
    put(&w->kv, &b, 1);
}

void mdlt_gguf_str(mdlt_gguf_t *w, const char *k, const char *v)
{
    key(w, k, MDL_GGUF_STRING);
    put_str(&w->kv, v);
}

void mdlt_gguf_arr_str(mdlt_gguf_t *w, const char *k, const char *const *v, size_t n)
{
    key(w, k, MDL_GGUF_ARRAY);
    put_u32(&w->kv, MDL_GGUF_STRING);
    put_u64(&w->kv, n);
    for (size_t i = 0; i < n; i++)
        put_str(&w->kv, v[i]);
}

void mdlt_gguf_arr_i32(mdlt_gguf_t *w, const char *k, const int32_t *v, size_t n)
{
    key(w, k, MDL_GGUF_ARRAY);
    put_u32(&w->kv, MDL_GGUF_I32);
    put_u64(&w->kv, n);
    put(&w->kv, v, n * 4);
}

void mdlt_gguf_arr_f32(mdlt_gguf_t *w, const char *k, const float *v, size_t n)
{
    key(w, k, MDL_GGUF_ARRAY);
    put_u32(&w->kv, MDL_GGUF_F32);
    put_u64(&w->kv, n);
    put(&w->kv, v, n * 4);
}

static void put_f16(buf_t *b, float x)
{
    uint16_t h = fy_fp32_to_fp16(x);
    put(b, &h, 2);
}

/* Quantizes blocks of 32 with the ggml reference rounding. */
static void quantize(buf_t *b, uint32_t type, const float *x, uint64_t n)
{
    for (uint64_t i = 0; i < n; i += 32) {
        const float *v = x + i;
        if (type == MDL_TENSOR_Q8_0) {
            float amax = 0.0f;
            for (int j = 0; j < 32; j++)
                amax = fmaxf(amax, fabsf(v[j]));
            float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            put_f16(b, d);
            for (int j = 0; j < 32; j++) {
                int8_t q = (int8_t)roundf(v[j] * id);
                put(b, &q, 1);
            }
        } else if (type == MDL_TENSOR_Q4_0) {
            float amax = 0.0f, max = 0.0f;
            for (int j = 0; j < 32; j++) {
                if (fabsf(v[j]) > amax) {
                    amax = fabsf(v[j]);
                    max = v[j];
                }
            }
            float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            put_f16(b, d);
            for (int j = 0; j < 16; j++) {
                int q0 = (int)(v[j] * id + 8.5f), q1 = (int)(v[j + 16] * id + 8.5f);
                q0 = q0 > 15 ? 15 : q0;
                q1 = q1 > 15 ? 15 : q1;
                uint8_t byte = (uint8_t)(q0 | q1 << 4);
                put(b, &byte, 1);
            }
        } else { // Q4_1
            float mn = v[0], mx = v[0];
            for (int j = 1; j < 32; j++) {
                mn = fminf(mn, v[j]);
                mx = fmaxf(mx, v[j]);
            }
            float d = (mx - mn) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            put_f16(b, d);
            put_f16(b, mn);
            for (int j = 0; j < 16; j++) {
                int q0 = (int)((v[j] - mn) * id + 0.5f), q1 = (int)((v[j + 16] - mn) * id + 0.5f);
                q0 = q0 > 15 ? 15 : q0;
                q1 = q1 > 15 ? 15 : q1;
                uint8_t byte = (uint8_t)(q0 | q1 << 4);
                put(b, &byte, 1);
            }
        }
    }
}

void mdlt_gguf_tensor(mdlt_gguf_t *w, const char *name, uint32_t type, int n_dims,
                      const uint64_t *ne, const float *data)
{
    w->t = xrealloc(w->t, (w->n_t + 1) * sizeof(*w->t));
    wtensor_t *t = &w->t[w->n_t++];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    t->type = type;
    t->n_dims = n_dims;
    uint64_t n = 1;
    for (int d = 0; d < 4; d++) {
        t->ne[d] = d < n_dims ? ne[d] : 1;
        n *= t->ne[d];
    }
    switch (type) {
    case MDL_TENSOR_F32:
        put(&t->data, data, n * 4);
        break;
    case MDL_TENSOR_F16:
        for (uint64_t i = 0; i < n; i++)
            put_f16(&t->data, data[i]);
        break;
    case MDL_TENSOR_BF16:
        for (uint64_t i = 0; i < n; i++) {
            uint16_t h = fy_fp32_to_bf16(data[i]);
            put(&t->data, &h, 2);
        }
        break;
    default:
        quantize(&t->data, type, data, n);
        break;
    }
}

void mdlt_gguf_to_mem(const mdlt_gguf_t *w, uint8_t **buf_p, size_t *len_p)
{
    buf_t b = {0};
    size_t al = w->align ? w->align : 32;
    put_u32(&b, 0x46554747u);
    put_u32(&b, 3);
    put_u64(&b, w->n_t);
    put_u64(&b, w->n_kv);
    put(&b, w->kv.p, w->kv.n);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor_t *t = &w->t[i];
        put_str(&b, t->name);
        put_u32(&b, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++)
            put_u64(&b, t->ne[d]);
        put_u32(&b, t->type);
        put_u64(&b, off);
        off += (t->data.n + al - 1) / al * al;
    }
    uint8_t *zeros = calloc(1, al);
    if (zeros == NULL)
        abort();
    put(&b, zeros, (al - b.n % al) % al);
    for (size_t i = 0; i < w->n_t; i++) {
        put(&b, w->t[i].data.p, w->t[i].data.n);
        put(&b, zeros, (al - w->t[i].data.n % al) % al);
    }
    free(zeros);
    *buf_p = b.p;
    *len_p = b.n;
}

int mdlt_gguf_write(const mdlt_gguf_t *w, const char *path)
{
    uint8_t *buf;
    size_t len;
    mdlt_gguf_to_mem(w, &buf, &len);
    FILE *f = fopen(path, "wb");
    int rc = -1;
    if (f != NULL) {
        rc = fwrite(buf, 1, len, f) == len ? 0 : -1;
        if (fclose(f) != 0)
            rc = -1;
    }
    free(buf);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* The tiny model                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Merges of the tiny vocabulary, in rank order (GPT-2 alphabet: Ġ is the space). */
static const char *const k_merges[] = {"Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n",
                                       "Ġ w", "l l", "Ġ s"};
enum { N_SPECIAL = 3, N_BYTES = 256 };

int mdlt_tiny_n_vocab(void)
{
    return N_SPECIAL + N_BYTES + (int)(sizeof(k_merges) / sizeof(k_merges[0]));
}

void mdlt_tiny_params_default(mdlt_tiny_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->arch = "llama";
    p->n_layers = 2;
    p->dim = 64;
    p->n_heads = 4;
    p->n_kv_heads = 2;
    p->ffn_dim = 128;
    p->n_ctx = 512;
    p->weight_type = MDL_TENSOR_F32;
    p->tied = true;
    p->seed = 1;
}

static float rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return ((float)(*s >> 40) / (float)(1ull << 24)) * 2.0f - 1.0f;
}

static void byte_char(int b, char *out)
{
    // GPT-2 bytes_to_unicode
    int n = 0, cp = -1;
    for (int x = 0; x < 256; x++) {
        bool keep = (x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || x >= 0xae;
        int c = keep ? x : 256 + n++;
        if (x == b)
            cp = c;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        out[2] = 0;
    }
}

static void add_matrix(mdlt_gguf_t *w, const char *name, uint32_t type, uint64_t n_in,
                       uint64_t n_out, float scale, uint64_t *seed)
{
    float *d = malloc(n_in * n_out * sizeof(float));
    if (d == NULL)
        abort();
    for (uint64_t i = 0; i < n_in * n_out; i++)
        d[i] = rnd(seed) * scale;
    uint64_t ne[2] = {n_in, n_out};
    mdlt_gguf_tensor(w, name, type, n_out > 1 ? 2 : 1, ne, d);
    free(d);
}

static void add_norm(mdlt_gguf_t *w, const char *name, uint64_t n, uint64_t *seed)
{
    float *d = malloc(n * sizeof(float));
    if (d == NULL)
        abort();
    for (uint64_t i = 0; i < n; i++)
        d[i] = 1.0f + 0.1f * rnd(seed);
    uint64_t ne[1] = {n};
    mdlt_gguf_tensor(w, name, 0, 1, ne, d);
    free(d);
}

void mdlt_tiny_model_mem(const mdlt_tiny_params_t *p, uint8_t **buf_p, size_t *len_p)
{
    mdlt_gguf_t *w = mdlt_gguf_new();
    const char *arch = p->arch;
    char k[128];
    mdlt_gguf_str(w, "general.architecture", arch);
    mdlt_gguf_str(w, "general.name", "ferry-tiny");
#define HK(s) (snprintf(k, sizeof(k), "%s.%s", arch, s), k)
    mdlt_gguf_u32(w, HK("block_count"), (uint32_t)p->n_layers);
    mdlt_gguf_u32(w, HK("context_length"), (uint32_t)p->n_ctx);
    mdlt_gguf_u32(w, HK("embedding_length"), (uint32_t)p->dim);
    mdlt_gguf_u32(w, HK("feed_forward_length"), (uint32_t)p->ffn_dim);
    mdlt_gguf_u32(w, HK("attention.head_count"), (uint32_t)p->n_heads);
    mdlt_gguf_u32(w, HK("attention.head_count_kv"), (uint32_t)p->n_kv_heads);
    mdlt_gguf_f32(w, HK("rope.freq_base"), 10000.0f);
    mdlt_gguf_f32(w, HK("attention.layer_norm_rms_epsilon"), 1e-5f);
#undef HK
    int nv = mdlt_tiny_n_vocab();
    char **toks = calloc((size_t)nv, sizeof(char *));
    int32_t *types = calloc((size_t)nv, sizeof(int32_t));
    if (toks == NULL || types == NULL)
        abort();
    static const char *const specials[N_SPECIAL] = {"<|endoftext|>", "<|im_start|>",
                                                    "<|im_end|>"};
    for (int i = 0; i < N_SPECIAL; i++) {
        toks[i] = strdup(specials[i]);
        types[i] = 3;
    }
    for (int b = 0; b < N_BYTES; b++) {
        char s[4];
        byte_char(b, s);
        toks[N_SPECIAL + b] = strdup(s);
        types[N_SPECIAL + b] = 1;
    }
    int nm = (int)(sizeof(k_merges) / sizeof(k_merges[0]));
    for (int i = 0; i < nm; i++) {
        char s[32];
        size_t o = 0;
        for (const char *c = k_merges[i]; *c; c++) {
            if (*c != ' ')
                s[o++] = *c;
        }
        s[o] = 0;
        toks[N_SPECIAL + N_BYTES + i] = strdup(s);
        types[N_SPECIAL + N_BYTES + i] = 1;
    }
    mdlt_gguf_str(w, "tokenizer.ggml.model", "gpt2");
    mdlt_gguf_str(w, "tokenizer.ggml.pre", "smollm");
    mdlt_gguf_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)toks, (size_t)nv);
    mdlt_gguf_arr_i32(w, "tokenizer.ggml.token_type", types, (size_t)nv);
    mdlt_gguf_arr_str(w, "tokenizer.ggml.merges", k_merges, (size_t)nm);
    mdlt_gguf_u32(w, "tokenizer.ggml.bos_token_id", 1);
    mdlt_gguf_u32(w, "tokenizer.ggml.eos_token_id", 2);
    mdlt_gguf_bool(w, "tokenizer.ggml.add_bos_token", false);
    mdlt_gguf_str(w, "tokenizer.chat_template",
                  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                  "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
    for (int i = 0; i < nv; i++)
        free(toks[i]);
    free(toks);
    free(types);

    uint64_t seed = p->seed * 0x9e3779b97f4a7c15ull + 7;
    int hd = p->dim / p->n_heads, q_dim = p->n_heads * hd, kv_dim = p->n_kv_heads * hd;
    uint32_t wt = p->weight_type;
    float s_in = 1.0f / sqrtf((float)p->dim);
    add_matrix(w, "token_embd.weight", wt, (uint64_t)p->dim, (uint64_t)nv, 1.0f, &seed);
    add_norm(w, "output_norm.weight", (uint64_t)p->dim, &seed);
    if (!p->tied)
        add_matrix(w, "output.weight", wt, (uint64_t)p->dim, (uint64_t)nv, s_in, &seed);
    bool bias = strcmp(arch, "qwen2") == 0;
    for (int l = 0; l < p->n_layers; l++) {
        char n[96];
#define TN(s) (snprintf(n, sizeof(n), "blk.%d.%s", l, s), n)
        add_norm(w, TN("attn_norm.weight"), (uint64_t)p->dim, &seed);
        add_matrix(w, TN("attn_q.weight"), wt, (uint64_t)p->dim, (uint64_t)q_dim, s_in * 2,
                   &seed);
        add_matrix(w, TN("attn_k.weight"), wt, (uint64_t)p->dim, (uint64_t)kv_dim, s_in * 2,
                   &seed);
        add_matrix(w, TN("attn_v.weight"), wt, (uint64_t)p->dim, (uint64_t)kv_dim, s_in, &seed);
        if (bias) {
            add_matrix(w, TN("attn_q.bias"), 0, (uint64_t)q_dim, 1, 0.1f, &seed);
            add_matrix(w, TN("attn_k.bias"), 0, (uint64_t)kv_dim, 1, 0.1f, &seed);
            add_matrix(w, TN("attn_v.bias"), 0, (uint64_t)kv_dim, 1, 0.1f, &seed);
        }
        add_matrix(w, TN("attn_output.weight"), wt, (uint64_t)q_dim, (uint64_t)p->dim,
                   1.0f / sqrtf((float)q_dim), &seed);
        add_norm(w, TN("ffn_norm.weight"), (uint64_t)p->dim, &seed);
        add_matrix(w, TN("ffn_gate.weight"), wt, (uint64_t)p->dim, (uint64_t)p->ffn_dim, s_in,
                   &seed);
        add_matrix(w, TN("ffn_up.weight"), wt, (uint64_t)p->dim, (uint64_t)p->ffn_dim, s_in,
                   &seed);
        add_matrix(w, TN("ffn_down.weight"), wt, (uint64_t)p->ffn_dim, (uint64_t)p->dim,
                   1.0f / sqrtf((float)p->ffn_dim), &seed);
#undef TN
    }
    mdlt_gguf_to_mem(w, buf_p, len_p);
    mdlt_gguf_free(w);
}

int mdlt_tiny_model_write(const mdlt_tiny_params_t *p, const char *path)
{
    uint8_t *buf;
    size_t len;
    mdlt_tiny_model_mem(p, &buf, &len);
    FILE *f = fopen(path, "wb");
    int rc = -1;
    if (f != NULL) {
        rc = fwrite(buf, 1, len, f) == len ? 0 : -1;
        if (fclose(f) != 0)
            rc = -1;
    }
    free(buf);
    return rc;
}

int mdlt_tiny_model_temp(const mdlt_tiny_params_t *p, char *path, size_t cap)
{
    if (snprintf(path, cap, "/tmp/ferry-tiny-model-XXXXXX") >= (int)cap)
        return -1;
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    close(fd);
    if (mdlt_tiny_model_write(p, path) != 0) {
        unlink(path);
        return -1;
    }
    return 0;
}
