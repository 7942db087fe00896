/*
 * pool.c: the decode side's page pool, sequences, placement, FP16 tail appends and option
 * conversion.
 *
 * One pool serves every option: pages have one fixed size, and a page holds slots of one
 * option for one (layer, kv head). Placing copies frame groups into page slots unchanged (the
 * slot layout is the frame's group layout with capacity G), so no dequantization happens.
 * Pages are reference-counted so sequences may share them; the pool's lock guards the free
 * list and the counts.
 */
#include <pthread.h>
#include <stdlib.h>

#include "kvcodec_int.h"

struct kvc_pool {
    kvc_pool_params_t p;
    size_t slot_bytes[KVC_OPT_COUNT];
    uint32_t cap_slots[KVC_OPT_COUNT];
    uint8_t *mem;      // [n_pages][page_bytes]
    uint32_t *refcnt;  // [n_pages]
    uint32_t *free_ids; // stack of free pages
    uint32_t n_free;
    pthread_mutex_t lock;
};

struct kvc_seq {
    kvc_pool_t *pool;
    uint32_t n_layers, n_kv;
    uint64_t fingerprint, seq_id;
    kvc_page_list_t *lists; // [n_layers][n_kv]
    uint8_t *placed;    // [n_layers]
};

void kvc_pool_params_default(kvc_pool_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->page_bytes = 32768;
    p->n_pages = 1024;
    p->head_dim = 64;
    p->group = 32;
}

fy_status_t kvc_pool_create(const kvc_pool_params_t *p, kvc_pool_t **pool_p)
{
    if (p == NULL || pool_p == NULL || p->n_pages == 0 || p->head_dim == 0 ||
        p->head_dim % 8 || p->head_dim > KVC_MAX_HEAD_DIM || p->group < 8 || p->group > 256 ||
        p->group % 8 || p->page_bytes % 64 || p->page_bytes > (1u << 30) ||
        p->protect > KVC_MAX_PROTECT || p->protect >= p->head_dim)
        return FY_ERR_INVALID_ARG;
    kvc_pool_t *pool = calloc(1, sizeof(*pool));
    if (pool == NULL)
        return FY_ERR_NO_MEMORY;
    pool->p = *p;
    for (int o = 0; o < KVC_OPT_DROP; o++) {
        uint32_t gs = kvc_group_tokens(o, p->group);
        pool->slot_bytes[o] = FY_ALIGN_UP(kvc_group_bytes(o, p->head_dim, gs, p->protect), 16);
        size_t slots = (p->page_bytes - FY_MIN(p->page_bytes, KVC_PAGE_HEADER_BYTES)) /
                       pool->slot_bytes[o];
        if (slots == 0 || slots > UINT16_MAX) {
            free(pool);
            return FY_ERR_INVALID_ARG;
        }
        pool->cap_slots[o] = (uint32_t)slots;
    }
    size_t total;
    if (!fy_size_mul(p->page_bytes, p->n_pages, &total)) {
        free(pool);
        return FY_ERR_INVALID_ARG;
    }
    pool->mem = aligned_alloc(64, total);
    pool->refcnt = calloc(p->n_pages, sizeof(uint32_t));
    pool->free_ids = malloc((size_t)p->n_pages * sizeof(uint32_t));
    if (!pool->mem || !pool->refcnt || !pool->free_ids) {
        free(pool->mem), free(pool->refcnt), free(pool->free_ids), free(pool);
        return FY_ERR_NO_MEMORY;
    }
    // Lowest ids first out of the stack.
    for (uint32_t i = 0; i < p->n_pages; i++)
        pool->free_ids[i] = p->n_pages - 1 - i;
    pool->n_free = p->n_pages;
    pthread_mutex_init(&pool->lock, NULL);
    *pool_p = pool;
    return FY_OK;
}

void kvc_pool_destroy(kvc_pool_t *pool)
{
    if (pool == NULL)
        return;
    pthread_mutex_destroy(&pool->lock);
    free(pool->mem), free(pool->refcnt), free(pool->free_ids), free(pool);
}

uint32_t kvc_pool_free_count(const kvc_pool_t *pool)
{
    kvc_pool_t *m = (kvc_pool_t *)pool;
    pthread_mutex_lock(&m->lock);
    uint32_t n = m->n_free;
    pthread_mutex_unlock(&m->lock);
    return n;
}

uint32_t kvc_pool_n_pages(const kvc_pool_t *pool)
{
    return pool->p.n_pages;
}

uint32_t kvc_pool_page_tokens(const kvc_pool_t *pool, kvc_opt_t opt)
{
    if ((unsigned)opt >= KVC_OPT_DROP)
        return 0;
    return pool->cap_slots[opt] * kvc_group_tokens(opt, pool->p.group);
}

size_t kvc_pool_slot_bytes(const kvc_pool_t *pool, int o)
{
    return pool->slot_bytes[o];
}

uint32_t kvc_pool_head_dim(const kvc_pool_t *pool)
{
    return pool->p.head_dim;
}

uint32_t kvc_pool_protect(const kvc_pool_t *pool)
{
    return pool->p.protect;
}

uint8_t *kvc_page_data(const kvc_pool_t *pool, kvc_page_id_t id)
{
    return pool->mem + (size_t)id * pool->p.page_bytes;
}

static void page_init(kvc_pool_t *pool, kvc_page_id_t id, int o, bool rotated)
{
    kvc_page_hdr_t h = {
        .opt = (uint8_t)o,
        .flags = (uint8_t)(rotated ? KVC_PAGE_FLAG_ROTATED : 0),
        .head_dim = (uint16_t)pool->p.head_dim,
        .n_slots = 0,
        .last_tokens = 0,
        .group = (uint16_t)kvc_group_tokens(o, pool->p.group),
        .cap_slots = (uint16_t)pool->cap_slots[o],
        .n_tokens = 0,
    };
    kvc_page_hdr_write(kvc_page_data(pool, id), &h);
}

/* Takes n pages at once or none. */
static fy_status_t alloc_many(kvc_pool_t *pool, uint32_t n, kvc_page_id_t *ids)
{
    pthread_mutex_lock(&pool->lock);
    if (pool->n_free < n) {
        pthread_mutex_unlock(&pool->lock);
        return FY_ERR_RESOURCE_EXHAUSTED;
    }
    for (uint32_t i = 0; i < n; i++) {
        ids[i] = pool->free_ids[--pool->n_free];
        pool->refcnt[ids[i]] = 1;
    }
    pthread_mutex_unlock(&pool->lock);
    return FY_OK;
}

fy_status_t kvc_page_alloc(kvc_pool_t *pool, kvc_opt_t opt, bool rotated, kvc_page_id_t *id_p)
{
    if (pool == NULL || id_p == NULL || (unsigned)opt >= KVC_OPT_DROP)
        return FY_ERR_INVALID_ARG;
    if (rotated && (pool->p.head_dim & (pool->p.head_dim - 1)))
        return FY_ERR_INVALID_ARG;
    kvc_page_id_t id;
    fy_status_t st = alloc_many(pool, 1, &id);
    if (st != FY_OK)
        return st;
    page_init(pool, id, opt, rotated && kvc_opt_rotatable(opt));
    *id_p = id;
    return FY_OK;
}

void kvc_page_ref(kvc_pool_t *pool, kvc_page_id_t id)
{
    FY_ASSERT(id < pool->p.n_pages);
    pthread_mutex_lock(&pool->lock);
    FY_ASSERT(pool->refcnt[id] > 0);
    pool->refcnt[id]++;
    pthread_mutex_unlock(&pool->lock);
}

void kvc_page_unref(kvc_pool_t *pool, kvc_page_id_t id)
{
    FY_ASSERT(id < pool->p.n_pages);
    pthread_mutex_lock(&pool->lock);
    FY_ASSERT(pool->refcnt[id] > 0);
    if (--pool->refcnt[id] == 0)
        pool->free_ids[pool->n_free++] = id;
    pthread_mutex_unlock(&pool->lock);
}

uint32_t kvc_page_refcount(const kvc_pool_t *pool, kvc_page_id_t id)
{
    if (id >= pool->p.n_pages)
        return 0;
    kvc_pool_t *m = (kvc_pool_t *)pool;
    pthread_mutex_lock(&m->lock);
    uint32_t r = m->refcnt[id];
    pthread_mutex_unlock(&m->lock);
    return r;
}

kvc_opt_t kvc_page_opt(const kvc_pool_t *pool, kvc_page_id_t id)
{
    return (kvc_opt_t)kvc_page_data(pool, id)[0];
}

uint32_t kvc_page_n_tokens(const kvc_pool_t *pool, kvc_page_id_t id)
{
    return kvc_rd32(kvc_page_data(pool, id) + 12);
}

fy_status_t kvc_page_dequantize(const kvc_pool_t *pool, kvc_page_id_t id, float *k, float *v,
                                uint32_t *n_p)
{
    if (pool == NULL || k == NULL || v == NULL || id >= pool->p.n_pages)
        return FY_ERR_INVALID_ARG;
    const uint8_t *pg = kvc_page_data(pool, id);
    kvc_page_hdr_t h;
    kvc_page_hdr_read(pg, &h);
    uint32_t d = pool->p.head_dim, n = 0;
    size_t sb = pool->slot_bytes[h.opt];
    for (uint32_t s = 0; s < h.n_slots; s++) {
        uint32_t m = s + 1 == h.n_slots ? h.last_tokens : h.group;
        float *kr = k + (size_t)n * d, *vr = v + (size_t)n * d;
        kvc_dequant_group(h.opt, d, m, h.group, pool->p.protect,
                          pg + KVC_PAGE_HEADER_BYTES + s * sb, kr, vr);
        if (h.flags & KVC_PAGE_FLAG_ROTATED) {
            for (uint32_t j = 0; j < m; j++) {
                kvc_hadamard(kr + (size_t)j * d, d);
                kvc_hadamard(vr + (size_t)j * d, d);
            }
        }
        n += m;
    }
    if (n_p)
        *n_p = n;
    return FY_OK;
}

/* Copies a frame group of m tokens (capacity m) into a page slot (capacity cap). */
static void copy_group(int o, uint32_t d, uint32_t m, uint32_t cap, uint32_t P,
                       const uint8_t *src, uint8_t *dst)
{
    if (o == KVC_OPT_F16 || m == cap) {
        memcpy(dst, src, kvc_group_bytes(o, d, m, P));
        return;
    }
    size_t rowk = (size_t)d * kvc_opt_kbits(o) / 8, rowv = (size_t)d * kvc_opt_vbits(o) / 8;
    memset(dst, 0, kvc_group_bytes(o, d, cap, P));
    memcpy(dst, src, 4 * (size_t)d);                             // kscale, kzero
    memcpy(dst + 4 * d, src + 4 * d, 2 * (size_t)m);             // vscale
    memcpy(dst + 4 * d + 2 * cap, src + 4 * d + 2 * m, 2 * (size_t)m); // vzero
    const uint8_t *skc = src + 4 * d + 4 * (size_t)m;
    uint8_t *dkc = dst + 4 * d + 4 * (size_t)cap;
    memcpy(dkc, skc, m * rowk);
    memcpy(dkc + cap * rowk, skc + m * rowk, m * rowv);
    if (P && kvc_opt_protectable(o)) { // pidx, then pcodes
        const uint8_t *sp = src + kvc_group_bytes(o, d, m, 0);
        uint8_t *dp = dst + kvc_group_bytes(o, d, cap, 0);
        memcpy(dp, sp, 2 * (size_t)P);
        memcpy(dp + 2 * P, sp + 2 * P, (size_t)m * P);
    }
}

/* ---- sequences ---- */

fy_status_t kvc_seq_create(kvc_pool_t *pool, uint32_t n_layers, uint32_t n_kv_heads,
                           uint64_t model_fingerprint, uint64_t seq_id, kvc_seq_t **seq_p)
{
    if (pool == NULL || seq_p == NULL || n_layers == 0 || n_layers > KVC_MAX_LAYERS ||
        n_kv_heads == 0 || n_kv_heads > KVC_MAX_KV_HEADS)
        return FY_ERR_INVALID_ARG;
    kvc_seq_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    s->pool = pool;
    s->n_layers = n_layers;
    s->n_kv = n_kv_heads;
    s->fingerprint = model_fingerprint;
    s->seq_id = seq_id;
    s->lists = calloc((size_t)n_layers * n_kv_heads, sizeof(kvc_page_list_t));
    s->placed = calloc(n_layers, 1);
    if (!s->lists || !s->placed) {
        free(s->lists), free(s->placed), free(s);
        return FY_ERR_NO_MEMORY;
    }
    *seq_p = s;
    return FY_OK;
}

void kvc_seq_destroy(kvc_seq_t *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; s->lists && i < (size_t)s->n_layers * s->n_kv; i++) {
        for (uint32_t j = 0; j < s->lists[i].n; j++)
            kvc_page_unref(s->pool, s->lists[i].ids[j]);
        free(s->lists[i].ids);
    }
    free(s->lists), free(s->placed), free(s);
}

const kvc_pool_t *kvc_seq_pool(const kvc_seq_t *seq)
{
    return seq->pool;
}
uint32_t kvc_seq_n_kv_heads(const kvc_seq_t *seq)
{
    return seq->n_kv;
}
uint32_t kvc_seq_n_layers(const kvc_seq_t *seq)
{
    return seq->n_layers;
}

const kvc_page_id_t *kvc_seq_pages(const kvc_seq_t *seq, uint32_t layer, uint32_t head,
                                   uint32_t *n_pages_p)
{
    if (seq == NULL || layer >= seq->n_layers || head >= seq->n_kv) {
        if (n_pages_p)
            *n_pages_p = 0;
        return NULL;
    }
    const kvc_page_list_t *l = &seq->lists[(size_t)layer * seq->n_kv + head];
    if (n_pages_p)
        *n_pages_p = l->n;
    return l->ids;
}

uint32_t kvc_seq_n_tokens(const kvc_seq_t *seq, uint32_t layer, uint32_t head)
{
    if (seq == NULL || layer >= seq->n_layers || head >= seq->n_kv)
        return 0;
    return seq->lists[(size_t)layer * seq->n_kv + head].n_tokens;
}

bool kvc_seq_layer_placed(const kvc_seq_t *seq, uint32_t layer)
{
    return seq != NULL && layer < seq->n_layers && seq->placed[layer];
}

fy_status_t kvc_page_list_reserve(kvc_page_list_t *l, uint32_t extra)
{
    if (l->n + (uint64_t)extra <= l->cap)
        return FY_OK;
    uint64_t cap = FY_MAX((uint64_t)l->cap * 2, (uint64_t)l->n + extra);
    if (cap > UINT32_MAX)
        return FY_ERR_NO_MEMORY;
    kvc_page_id_t *ids = realloc(l->ids, cap * sizeof(kvc_page_id_t));
    if (ids == NULL)
        return FY_ERR_NO_MEMORY;
    l->ids = ids;
    l->cap = (uint32_t)cap;
    return FY_OK;
}

uint32_t kvc_run_pages(const uint32_t *cap_slots, uint32_t group, int o, uint64_t count)
{
    if (o == KVC_OPT_DROP || count == 0)
        return 0;
    uint64_t gs = kvc_group_tokens(o, group);
    uint64_t groups = (count + gs - 1) / gs;
    return (uint32_t)((groups + cap_slots[o] - 1) / cap_slots[o]);
}

bool kvc_frame_counts_kept(const kvc_frame_t *f, uint32_t h)
{
    if (!f->counted || h >= KVC_FRAME_COUNTED_HEADS)
        return false;
    uint64_t sum = 0; // the parser's add up to the tokens (else: not the parser's, count again)
    for (int o = 0; o < KVC_OPT_COUNT; o++)
        sum += f->counts[h][o];
    return sum == f->n_tokens;
}

void kvc_frame_head_counts(const kvc_frame_t *f, uint32_t h, uint64_t *cnt)
{
    if (kvc_frame_counts_kept(f, h)) {
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            cnt[o] = f->counts[h][o];
        return;
    }
    uint64_t all[KVC_OPT_COUNT + 1]; // a parsed frame has no code outside the options
    kvc_map_counts(f->maps + (size_t)h * kvc_map_bytes(f->n_tokens), f->n_tokens, all);
    memcpy(cnt, all, KVC_OPT_COUNT * sizeof(uint64_t));
}

/* Pages of each (head, option) run of a frame. */
static uint32_t run_pages(const kvc_pool_t *pool, int o, uint64_t count)
{
    return kvc_run_pages(pool->cap_slots, pool->p.group, o, count);
}

fy_status_t kvc_pool_pages_needed(const kvc_pool_t *pool, const kvc_frame_t *f,
                                  uint32_t *n_pages_p)
{
    if (pool == NULL || f == NULL || n_pages_p == NULL)
        return FY_ERR_INVALID_ARG;
    return kvc_frame_pages(&pool->p, pool->cap_slots, f, n_pages_p);
}

fy_status_t kvc_frame_pages(const kvc_pool_params_t *p, const uint32_t *cap_slots,
                            const kvc_frame_t *f, uint32_t *n_pages_p)
{
    if (f->head_dim != p->head_dim || f->group != p->group || f->protect != p->protect)
        return FY_ERR_MISMATCH;
    uint64_t total = 0;
    for (uint32_t h = 0; h < f->n_kv_heads; h++) {
        uint64_t cnt[KVC_OPT_COUNT];
        kvc_frame_head_counts(f, h, cnt);
        for (int o = 0; o < KVC_OPT_DROP; o++)
            total += kvc_run_pages(cap_slots, p->group, o, cnt[o]);
    }
    if (total > UINT32_MAX)
        return FY_ERR_OUT_OF_RANGE;
    *n_pages_p = (uint32_t)total;
    return FY_OK;
}

fy_status_t kvc_place(kvc_seq_t *s, const kvc_frame_t *f)
{
    if (s == NULL || f == NULL)
        return FY_ERR_INVALID_ARG;
    kvc_pool_t *pool = s->pool;
    if (f->model_fingerprint != s->fingerprint || f->seq_id != s->seq_id ||
        f->n_layers != s->n_layers || f->n_kv_heads != s->n_kv ||
        f->head_dim != pool->p.head_dim || f->group != pool->p.group ||
        f->protect != pool->p.protect)
        return FY_ERR_MISMATCH;
    if (f->layer >= s->n_layers)
        return FY_ERR_OUT_OF_RANGE;
    if (s->placed[f->layer])
        return FY_ERR_EXISTS;
    uint32_t need;
    fy_status_t st = kvc_pool_pages_needed(pool, f, &need);
    if (st != FY_OK)
        return st;
    // Reserve list space first, then the pages, so a failure changes nothing.
    for (uint32_t h = 0; h < f->n_kv_heads; h++) {
        kvc_page_list_t *l = &s->lists[(size_t)f->layer * s->n_kv + h];
        if ((st = kvc_page_list_reserve(l, need)) != FY_OK)
            return st;
    }
    kvc_page_id_t *ids = malloc((size_t)FY_MAX(need, 1) * sizeof(kvc_page_id_t));
    if (ids == NULL)
        return FY_ERR_NO_MEMORY;
    if ((st = alloc_many(pool, need, ids)) != FY_OK) {
        free(ids);
        return st;
    }
    uint32_t d = f->head_dim, G = f->group, used = 0;
    bool rotated = (f->flags & KVC_FRAME_FLAG_ROTATED) != 0;
    const uint8_t *r = f->payload;
    for (uint32_t h = 0; h < f->n_kv_heads; h++) {
        kvc_page_list_t *l = &s->lists[(size_t)f->layer * s->n_kv + h];
        uint64_t cnt[KVC_OPT_COUNT];
        kvc_frame_head_counts(f, h, cnt);
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            uint32_t gs = kvc_group_tokens(o, G);
            uint64_t left = cnt[o];
            uint8_t *pg = NULL;
            kvc_page_hdr_t hd;
            uint32_t P = pool->p.protect;
            size_t gb = kvc_group_bytes(o, d, gs, P);
            bool dense = pool->slot_bytes[o] == gb; // slots back to back, as in the frame
            while (left > 0) {
                if (pg == NULL || hd.n_slots == hd.cap_slots) {
                    if (pg)
                        kvc_page_hdr_write(pg, &hd);
                    kvc_page_id_t id = ids[used++];
                    page_init(pool, id, o, rotated && kvc_opt_rotatable(o));
                    pg = kvc_page_data(pool, id);
                    kvc_page_hdr_read(pg, &hd);
                    l->ids[l->n++] = id;
                }
                uint8_t *slot = pg + KVC_PAGE_HEADER_BYTES + hd.n_slots * pool->slot_bytes[o];
                uint64_t full = left / gs;
                uint32_t room = hd.cap_slots - hd.n_slots;
                if (dense && full > 1) {
                    // A run of full groups fits with one copy.
                    uint32_t k = (uint32_t)FY_MIN(full, (uint64_t)room);
                    memcpy(slot, r, (size_t)k * gb);
                    r += (size_t)k * gb;
                    hd.n_slots = (uint16_t)(hd.n_slots + k);
                    hd.last_tokens = (uint16_t)gs;
                    hd.n_tokens += k * gs;
                    l->n_tokens += k * gs;
                    left -= (uint64_t)k * gs;
                    continue;
                }
                uint32_t m = (uint32_t)FY_MIN((uint64_t)gs, left);
                copy_group(o, d, m, gs, P, r, slot);
                r += kvc_group_bytes(o, d, m, P);
                hd.n_slots++;
                hd.last_tokens = (uint16_t)m;
                hd.n_tokens += m;
                if (m < gs)
                    hd.flags |= KVC_PAGE_FLAG_SEALED;
                l->n_tokens += m;
                left -= m;
            }
            if (pg)
                kvc_page_hdr_write(pg, &hd);
        }
    }
    FY_ASSERT(used == need);
    free(ids);
    s->placed[f->layer] = 1;
    return FY_OK;
}

fy_status_t kvc_seq_append(kvc_seq_t *s, uint32_t layer, uint32_t head, const uint16_t *k,
                           const uint16_t *v)
{
    if (s == NULL || k == NULL || v == NULL || layer >= s->n_layers || head >= s->n_kv)
        return FY_ERR_INVALID_ARG;
    kvc_pool_t *pool = s->pool;
    kvc_page_list_t *l = &s->lists[(size_t)layer * s->n_kv + head];
    uint32_t d = pool->p.head_dim;
    // The FP16 tail is the last F16 page of the list with a free slot.
    uint8_t *pg = NULL;
    kvc_page_hdr_t hd;
    if (l->n > 0) {
        uint8_t *last = kvc_page_data(pool, l->ids[l->n - 1]);
        kvc_page_hdr_read(last, &hd);
        if (hd.opt == KVC_OPT_F16 && hd.n_slots < hd.cap_slots &&
            kvc_page_refcount(pool, l->ids[l->n - 1]) == 1)
            pg = last;
    }
    if (pg == NULL) {
        fy_status_t st = kvc_page_list_reserve(l, 1);
        if (st != FY_OK)
            return st;
        kvc_page_id_t id;
        if ((st = kvc_page_alloc(pool, KVC_OPT_F16, false, &id)) != FY_OK)
            return st;
        l->ids[l->n++] = id;
        pg = kvc_page_data(pool, id);
        kvc_page_hdr_read(pg, &hd);
    }
    uint8_t *slot = pg + KVC_PAGE_HEADER_BYTES + hd.n_slots * pool->slot_bytes[KVC_OPT_F16];
    memcpy(slot, k, 2 * (size_t)d);
    memcpy(slot + 2 * d, v, 2 * (size_t)d);
    hd.n_slots++;
    hd.last_tokens = 1;
    hd.n_tokens++;
    kvc_page_hdr_write(pg, &hd);
    l->n_tokens++;
    return FY_OK;
}

fy_status_t kvc_seq_convert(kvc_seq_t *s, uint32_t layer, uint32_t head, kvc_opt_t from,
                            kvc_opt_t to, bool rotate, uint32_t max_tokens,
                            uint32_t *n_converted_p)
{
    if (s == NULL || layer >= s->n_layers || head >= s->n_kv || (unsigned)from >= KVC_OPT_DROP ||
        (unsigned)to > KVC_OPT_DROP || to <= from)
        return FY_ERR_INVALID_ARG;
    kvc_pool_t *pool = s->pool;
    uint32_t d = pool->p.head_dim, G = pool->p.group;
    if (rotate && (d & (d - 1)))
        return FY_ERR_INVALID_ARG;
    kvc_page_list_t *l = &s->lists[(size_t)layer * s->n_kv + head];
    // Oldest pages of `from` first, whole pages, up to max_tokens.
    uint32_t n_src = 0;
    uint64_t T = 0;
    uint32_t *src_idx = malloc((size_t)FY_MAX(l->n, 1) * sizeof(uint32_t));
    if (src_idx == NULL)
        return FY_ERR_NO_MEMORY;
    for (uint32_t i = 0; i < l->n; i++) {
        kvc_page_id_t id = l->ids[i];
        if (kvc_page_opt(pool, id) != from)
            continue;
        uint32_t nt = kvc_page_n_tokens(pool, id);
        if (max_tokens && T + nt > max_tokens)
            break;
        src_idx[n_src++] = i;
        T += nt;
    }
    if (T == 0) {
        free(src_idx);
        if (n_converted_p)
            *n_converted_p = 0;
        return FY_OK;
    }
    fy_status_t st = FY_OK;
    uint32_t need = run_pages(pool, to, T);
    float *k = malloc((size_t)T * d * sizeof(float)); // [T][d]
    float *v = malloc((size_t)T * d * sizeof(float));
    kvc_page_id_t *ids = malloc((size_t)FY_MAX(need, 1) * sizeof(kvc_page_id_t));
    if (!k || !v || !ids) {
        st = FY_ERR_NO_MEMORY;
        goto out;
    }
    if ((st = kvc_page_list_reserve(l, need)) != FY_OK)
        goto out;
    if ((st = alloc_many(pool, need, ids)) != FY_OK)
        goto out;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < n_src; i++) {
        uint32_t m;
        kvc_page_dequantize(pool, l->ids[src_idx[i]], k + pos * d, v + pos * d, &m);
        pos += m;
    }
    bool rot = rotate && kvc_opt_rotatable(to);
    if (rot) {
        for (uint64_t t = 0; t < T; t++) {
            kvc_hadamard(k + t * d, d);
            kvc_hadamard(v + t * d, d);
        }
    }
    // Re-code in groups of G (same quantizers as the encoder).
    uint32_t used = 0;
    uint8_t *pg = NULL;
    kvc_page_hdr_t hd;
    if (to != KVC_OPT_DROP) {
        uint32_t gs = kvc_group_tokens(to, G);
        for (uint64_t t0 = 0; t0 < T; t0 += gs) {
            uint32_t m = (uint32_t)FY_MIN((uint64_t)gs, T - t0);
            if (pg == NULL || hd.n_slots == hd.cap_slots) {
                if (pg)
                    kvc_page_hdr_write(pg, &hd);
                page_init(pool, ids[used], to, rot);
                pg = kvc_page_data(pool, ids[used++]);
                kvc_page_hdr_read(pg, &hd);
            }
            uint8_t *slot = pg + KVC_PAGE_HEADER_BYTES + hd.n_slots * pool->slot_bytes[to];
            kvc_quant_group(to, d, m, gs, pool->p.protect, NULL, k + t0 * d, v + t0 * d, slot);
            hd.n_slots++;
            hd.last_tokens = (uint16_t)m;
            hd.n_tokens += m;
            if (m < gs)
                hd.flags |= KVC_PAGE_FLAG_SEALED;
        }
        if (pg)
            kvc_page_hdr_write(pg, &hd);
    }
    // Replace the sources in the list (keeping order of the rest), then drop our references.
    uint32_t w = 0, si = 0;
    for (uint32_t i = 0; i < l->n; i++) {
        if (si < n_src && src_idx[si] == i) {
            kvc_page_unref(pool, l->ids[i]);
            si++;
            continue;
        }
        l->ids[w++] = l->ids[i];
    }
    l->n = w;
    for (uint32_t i = 0; i < used; i++)
        l->ids[l->n++] = ids[i];
    if (to == KVC_OPT_DROP)
        l->n_tokens -= (uint32_t)T;
    if (n_converted_p)
        *n_converted_p = (uint32_t)T;
out:
    free(src_idx), free(k), free(v), free(ids);
    return st;
}
