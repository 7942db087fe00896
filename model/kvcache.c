/*
 * kvcache.c: the FP16 paged KV cache used at decode time.
 *
 * A pool holds n_pages pages of equal size; a page is k [page_tokens][head_dim] followed by
 * v [page_tokens][head_dim] of one (layer, kv head). A sequence keeps one page list per
 * (layer, kv head); with FP16 only, every list holds the same number of tokens, so the lists
 * grow together and one table [n_layers * n_kv_heads][cap] of page ids describes them.
 * This is the stand-in for kvcodec's compressed pages: callers only see "reserve, write or
 * load, commit, list pages".
 */
#include <stdlib.h>
#include <string.h>

#include "model_int.h"

struct mdl_kv {
    mdl_kv_params_t p;
    size_t page_elems; /* 2 * page_tokens * head_dim */
    uint16_t *mem;     /* [n_pages][page_elems] */
    int64_t *free_ids; /* [n_pages] stack of free page ids */
    int64_t n_free;
};

struct mdl_kv_seq {
    mdl_kv_t *kv;
    int64_t len;     /* committed tokens */
    int64_t n_pages; /* pages per list */
    int64_t cap;     /* capacity per list */
    int64_t *table;  /* [n_layers * n_kv_heads][cap] page ids */
};

void mdl_kv_params_default(mdl_kv_params_t *p, const mdl_model_t *model)
{
    memset(p, 0, sizeof(*p));
    p->page_tokens = 16;
    if (model != NULL) {
        const mdl_config_t *c = mdl_model_config(model);
        p->n_layers = c->n_layers;
        p->n_kv_heads = c->n_kv_heads;
        p->head_dim = c->head_dim;
        p->device = mdl_model_device(model);
    }
}

int64_t mdl_kv_pages_for(const mdl_kv_params_t *p, int64_t n_tokens)
{
    int64_t per_list = (n_tokens + p->page_tokens - 1) / p->page_tokens;
    return per_list * p->n_layers * p->n_kv_heads;
}

fy_status_t mdl_kv_create(const mdl_kv_params_t *params, mdl_kv_t **kv_p)
{
    if (params == NULL || params->n_layers <= 0 || params->n_kv_heads <= 0 ||
        params->head_dim <= 0 || params->head_dim > 256 || params->page_tokens <= 0 ||
        params->n_pages <= 0 ||
        (params->device != MDL_DEVICE_CPU && params->device != MDL_DEVICE_CUDA) ||
        (params->device == MDL_DEVICE_CUDA && params->n_pages > INT32_MAX))
        return FY_ERR_INVALID_ARG;
    mdl_kv_t *kv = calloc(1, sizeof(*kv));
    if (kv == NULL)
        return FY_ERR_NO_MEMORY;
    kv->p = *params;
    kv->page_elems = 2 * (size_t)params->page_tokens * (size_t)params->head_dim;
    size_t bytes;
    if (!fy_size_mul(kv->page_elems * sizeof(uint16_t), (size_t)params->n_pages, &bytes)) {
        free(kv);
        return FY_ERR_INVALID_ARG;
    }
    kv->free_ids = malloc((size_t)params->n_pages * sizeof(int64_t));
    if (kv->free_ids == NULL) {
        mdl_kv_destroy(kv);
        return FY_ERR_NO_MEMORY;
    }
    if (params->device == MDL_DEVICE_CUDA) {
        // One device allocation, page p at mem + p * page_elems (the GPU page pool contract).
        void *mem = NULL;
        fy_status_t st = mdl_dev_alloc(bytes, &mem);
        if (st != FY_OK) {
            mdl_kv_destroy(kv);
            return st;
        }
        kv->mem = mem;
    } else if ((kv->mem = malloc(bytes)) == NULL) {
        mdl_kv_destroy(kv);
        return FY_ERR_NO_MEMORY;
    }
    // Hand out low ids first (pop from the end).
    for (int64_t i = 0; i < params->n_pages; i++)
        kv->free_ids[i] = params->n_pages - 1 - i;
    kv->n_free = params->n_pages;
    *kv_p = kv;
    return FY_OK;
}

void mdl_kv_destroy(mdl_kv_t *kv)
{
    if (kv == NULL)
        return;
    if (kv->p.device == MDL_DEVICE_CUDA)
        mdl_dev_free(kv->mem);
    else
        free(kv->mem);
    free(kv->free_ids);
    free(kv);
}

int64_t mdl_kv_free_pages(const mdl_kv_t *kv)
{
    return kv->n_free;
}

fy_status_t mdl_kv_seq_create(mdl_kv_t *kv, mdl_kv_seq_t **seq_p)
{
    mdl_kv_seq_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    s->kv = kv;
    *seq_p = s;
    return FY_OK;
}

static int n_lists(const mdl_kv_t *kv)
{
    return kv->p.n_layers * kv->p.n_kv_heads;
}

void mdl_kv_seq_clear(mdl_kv_seq_t *s)
{
    mdl_kv_t *kv = s->kv;
    for (int l = 0; l < n_lists(kv); l++) {
        for (int64_t i = 0; i < s->n_pages; i++)
            kv->free_ids[kv->n_free++] = s->table[(size_t)l * s->cap + i];
    }
    s->n_pages = 0;
    s->len = 0;
}

void mdl_kv_seq_destroy(mdl_kv_seq_t *s)
{
    if (s == NULL)
        return;
    mdl_kv_seq_clear(s);
    free(s->table);
    free(s);
}

int64_t mdl_kv_seq_len(const mdl_kv_seq_t *s)
{
    return s->len;
}

fy_status_t mdl_kv_seq_reserve(mdl_kv_seq_t *s, int64_t n_more)
{
    mdl_kv_t *kv = s->kv;
    if (n_more < 0 || n_more > INT32_MAX)
        return FY_ERR_INVALID_ARG;
    int64_t need = (s->len + n_more + kv->p.page_tokens - 1) / kv->p.page_tokens;
    if (need <= s->n_pages)
        return FY_OK;
    int64_t extra = need - s->n_pages;
    if (extra * n_lists(kv) > kv->n_free)
        return FY_ERR_RESOURCE_EXHAUSTED;
    if (need > s->cap) {
        int64_t cap = FY_MAX(need, s->cap * 2);
        int64_t *t = malloc((size_t)cap * (size_t)n_lists(kv) * sizeof(int64_t));
        if (t == NULL)
            return FY_ERR_NO_MEMORY;
        for (int l = 0; l < n_lists(kv) && s->n_pages > 0; l++)
            memcpy(t + (size_t)l * cap, s->table + (size_t)l * s->cap,
                   (size_t)s->n_pages * sizeof(int64_t));
        free(s->table);
        s->table = t;
        s->cap = cap;
    }
    for (int l = 0; l < n_lists(kv); l++) {
        for (int64_t i = s->n_pages; i < need; i++)
            s->table[(size_t)l * s->cap + i] = kv->free_ids[--kv->n_free];
    }
    s->n_pages = need;
    return FY_OK;
}

static uint16_t *page_ptr(const mdl_kv_seq_t *s, int layer, int head, int64_t page)
{
    const mdl_kv_t *kv = s->kv;
    int64_t id = s->table[((size_t)layer * kv->p.n_kv_heads + head) * s->cap + page];
    return kv->mem + (size_t)id * kv->page_elems;
}

void mdl_kv_seq_write(mdl_kv_seq_t *s, int layer, int head, int64_t pos, const float *k,
                      const float *v)
{
    const mdl_kv_t *kv = s->kv;
    int hd = kv->p.head_dim, pt = kv->p.page_tokens;
    FY_ASSERT(pos / pt < s->n_pages && kv->p.device == MDL_DEVICE_CPU);
    uint16_t *page = page_ptr(s, layer, head, pos / pt);
    int slot = (int)(pos % pt);
    fy_fp32_to_fp16_buf(page + (size_t)slot * hd, k, (size_t)hd);
    fy_fp32_to_fp16_buf(page + ((size_t)pt + slot) * hd, v, (size_t)hd);
}

/* load_layer for a CUDA pool: the page ids of the layer go with K and V to the GPU, which
 * converts and places every token (mdl_dev_store_layer). */
static fy_status_t load_layer_dev(mdl_kv_seq_t *s, int layer, int64_t n_tokens, const float *k,
                                  const float *v)
{
    const mdl_kv_t *kv = s->kv;
    int n_kv = kv->p.n_kv_heads;
    if (n_tokens == 0)
        return FY_OK;
    if (s->n_pages > INT32_MAX / n_kv || s->len + n_tokens > INT32_MAX)
        return FY_ERR_OUT_OF_RANGE;
    int32_t *ids = malloc((size_t)n_kv * (size_t)s->n_pages * sizeof(int32_t));
    if (ids == NULL)
        return FY_ERR_NO_MEMORY;
    for (int h = 0; h < n_kv; h++) {
        for (int64_t i = 0; i < s->n_pages; i++)
            ids[(size_t)h * s->n_pages + i] =
                (int32_t)s->table[((size_t)layer * n_kv + h) * s->cap + i];
    }
    fy_status_t st = mdl_dev_store_layer(&kv->p, kv->mem, ids, (int)s->n_pages, s->len,
                                         n_tokens, k, v);
    free(ids);
    return st;
}

fy_status_t mdl_kv_seq_load_layer(mdl_kv_seq_t *s, int layer, int64_t n_tokens, const float *k,
                                  const float *v)
{
    const mdl_kv_t *kv = s->kv;
    if (layer < 0 || layer >= kv->p.n_layers || n_tokens < 0 || k == NULL || v == NULL)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = mdl_kv_seq_reserve(s, n_tokens);
    if (st != FY_OK)
        return st;
    int hd = kv->p.head_dim;
    if (kv->p.device == MDL_DEVICE_CUDA)
        return load_layer_dev(s, layer, n_tokens, k, v);
    for (int h = 0; h < kv->p.n_kv_heads; h++) {
        for (int64_t t = 0; t < n_tokens; t++) {
            size_t off = ((size_t)h * (size_t)n_tokens + (size_t)t) * hd;
            mdl_kv_seq_write(s, layer, h, s->len + t, k + off, v + off);
        }
    }
    return FY_OK;
}

fy_status_t mdl_kv_seq_commit(mdl_kv_seq_t *s, int64_t n_tokens)
{
    if (n_tokens < 0 || s->len + n_tokens > s->n_pages * s->kv->p.page_tokens)
        return FY_ERR_STATE;
    s->len += n_tokens;
    return FY_OK;
}

fy_status_t mdl_kv_seq_pages(const mdl_kv_seq_t *s, int layer, int head, int64_t n_extra,
                             const uint16_t **pages, int cap, krn_page_list_t *list_p)
{
    const mdl_kv_t *kv = s->kv;
    if (layer < 0 || layer >= kv->p.n_layers || head < 0 || head >= kv->p.n_kv_heads)
        return FY_ERR_INVALID_ARG;
    int64_t n_tok = s->len + n_extra;
    int64_t np = (n_tok + kv->p.page_tokens - 1) / kv->p.page_tokens;
    if (np > s->n_pages || n_tok > INT32_MAX)
        return FY_ERR_STATE;
    if (np > cap)
        return FY_ERR_RESOURCE_EXHAUSTED;
    for (int64_t i = 0; i < np; i++)
        pages[i] = page_ptr(s, layer, head, i);
    list_p->pages = pages;
    list_p->n_pages = (int)np;
    list_p->page_tokens = kv->p.page_tokens;
    list_p->n_tokens = (int)n_tok;
    return FY_OK;
}

fy_status_t mdl_kv_seq_read(const mdl_kv_seq_t *s, int layer, int head, float *k, float *v)
{
    const mdl_kv_t *kv = s->kv;
    if (layer < 0 || layer >= kv->p.n_layers || head < 0 || head >= kv->p.n_kv_heads)
        return FY_ERR_INVALID_ARG;
    int hd = kv->p.head_dim, pt = kv->p.page_tokens;
    if (kv->p.device == MDL_DEVICE_CUDA) {
        // Page by page through a host copy.
        uint16_t *tmp = malloc(kv->page_elems * sizeof(uint16_t));
        if (tmp == NULL)
            return FY_ERR_NO_MEMORY;
        fy_status_t st = FY_OK;
        for (int64_t t0 = 0; t0 < s->len && st == FY_OK; t0 += pt) {
            st = mdl_dev_copy_d2h(tmp, page_ptr(s, layer, head, t0 / pt),
                                  kv->page_elems * sizeof(uint16_t));
            int64_t nt = FY_MIN((int64_t)pt, s->len - t0);
            if (st == FY_OK) {
                fy_fp16_to_fp32_buf(k + (size_t)t0 * hd, tmp, (size_t)nt * hd);
                fy_fp16_to_fp32_buf(v + (size_t)t0 * hd, tmp + (size_t)pt * hd, (size_t)nt * hd);
            }
        }
        free(tmp);
        return st;
    }
    for (int64_t t = 0; t < s->len; t++) {
        const uint16_t *page = page_ptr(s, layer, head, t / pt);
        int slot = (int)(t % pt);
        fy_fp16_to_fp32_buf(k + (size_t)t * hd, page + (size_t)slot * hd, (size_t)hd);
        fy_fp16_to_fp32_buf(v + (size_t)t * hd, page + ((size_t)pt + slot) * hd, (size_t)hd);
    }
    return FY_OK;
}

const mdl_kv_params_t *mdl_kv_params_of(const mdl_kv_t *kv)
{
    return &kv->p;
}

mdl_kv_t *mdl_kv_seq_pool(const mdl_kv_seq_t *s)
{
    return s->kv;
}

uint16_t *mdl_kv_mem(const mdl_kv_t *kv)
{
    return kv->mem;
}

size_t mdl_kv_page_elems(const mdl_kv_t *kv)
{
    return kv->page_elems;
}

int64_t mdl_kv_seq_n_pages(const mdl_kv_seq_t *s)
{
    return s->n_pages;
}

int64_t mdl_kv_seq_page_id(const mdl_kv_seq_t *s, int layer, int head, int64_t i)
{
    return s->table[((size_t)layer * s->kv->p.n_kv_heads + head) * s->cap + i];
}
