/*
 * pool.cu: the GPU page pool and placement, twin of pool.c's pool, sequences and kvc_place.
 *
 * The pool is one device allocation of n_pages x page_bytes; page p lives at
 * base + p x page_bytes and holds the same bytes a CPU pool page holds after the same
 * placements (docs/kvcodec-format.md §3). Everything that decides — free list, reference
 * counts, page lists, the header of each page — is on the host. Placing a frame uploads a
 * table of its (head, option) runs and the page ids they take; one kernel then fills a page
 * per block (its header and full groups, all of which follow from the run's token count, as
 * kvc_place's walk leaves them) and runs the few byte-range ops of each run's partial last
 * group (place_dev_int.h). Nothing two blocks write overlaps.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec_cuda.h"
extern "C" {
#include "kvcodec_int.h"
}
#include "kvcodec_cuda_int.h"
#include "place_dev_int.h"

struct kvc_gpu_pool {
    kvc_pool_params_t p;
    size_t slot_bytes[KVC_OPT_COUNT];
    uint32_t cap_slots[KVC_OPT_COUNT];
    uint8_t *dev;       // [n_pages][page_bytes] device
    uint8_t *hdrs;      // [n_pages][KVC_PAGE_HEADER_BYTES] host copy of each page's header
    uint32_t *refcnt;   // [n_pages]
    uint32_t *free_ids; // stack of free pages, lowest id on top (as the CPU pool)
    uint32_t n_free;
    pthread_mutex_t lock;
    // Map counting on the device (placement): one request at a time under cnt_lock.
    uint32_t *d_cnt; // [KVC_MAX_KV_HEADS][8] device
    uint32_t *h_cnt; // its pinned host copy
    // Pinned staging of the placement plan's upload, free again once stage_ev has passed.
    uint8_t *h_stage;
    size_t stage_cap;
    cudaEvent_t stage_ev;
    pthread_mutex_t cnt_lock; // d_cnt, h_cnt, h_stage
};

struct kvc_gpu_seq {
    kvc_gpu_pool_t *pool;
    uint32_t n_layers, n_kv;
    uint64_t fingerprint, seq_id;
    kvc_page_list_t *lists; // [n_layers][n_kv]
    uint8_t *placed;   // [n_layers]
};

/* ---- pool ---- */

extern "C" fy_status_t kvc_gpu_pool_create(const kvc_pool_params_t *p, kvc_gpu_pool_t **pool_p)
{
    if (p == NULL || pool_p == NULL || p->n_pages == 0 || p->head_dim == 0 ||
        p->head_dim % 8 || p->head_dim > KVC_MAX_HEAD_DIM || p->group < 8 || p->group > 256 ||
        p->group % 8 || p->page_bytes % 64 || p->page_bytes > (1u << 30) ||
        p->protect > KVC_MAX_PROTECT || p->protect >= p->head_dim)
        return FY_ERR_INVALID_ARG;
    kvc_gpu_pool_t *pool = (kvc_gpu_pool_t *)calloc(1, sizeof(*pool));
    if (pool == NULL)
        return FY_ERR_NO_MEMORY;
    pool->p = *p;
    for (int o = 0; o < KVC_OPT_DROP; o++) {
        uint32_t gs = kvc_group_tokens(o, p->group);
        pool->slot_bytes[o] = FY_ALIGN_UP(kvc_group_bytes(o, p->head_dim, gs, p->protect), 16);
        size_t slots = (p->page_bytes - FY_MIN(p->page_bytes, (size_t)KVC_PAGE_HEADER_BYTES)) /
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
    fy_status_t st = FY_OK;
    pool->hdrs = (uint8_t *)calloc(p->n_pages, KVC_PAGE_HEADER_BYTES);
    pool->refcnt = (uint32_t *)calloc(p->n_pages, sizeof(uint32_t));
    pool->free_ids = (uint32_t *)malloc((size_t)p->n_pages * sizeof(uint32_t));
    if (!pool->hdrs || !pool->refcnt || !pool->free_ids) {
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    KVC_CUDA_GOTO(cudaMalloc((void **)&pool->d_cnt, (size_t)KVC_MAX_KV_HEADS * 8 * 4), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&pool->h_cnt, (size_t)KVC_MAX_KV_HEADS * 8 * 4), st,
                  fail);
    KVC_CUDA_GOTO(cudaEventCreateWithFlags(&pool->stage_ev, cudaEventDisableTiming), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&pool->dev, total), st, fail);
    for (uint32_t i = 0; i < p->n_pages; i++)
        pool->free_ids[i] = p->n_pages - 1 - i;
    pool->n_free = p->n_pages;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_mutex_init(&pool->cnt_lock, NULL);
    *pool_p = pool;
    return FY_OK;
fail: // undo the allocations (the pool's own memory is the last step)
    cudaFree(pool->d_cnt), cudaFreeHost(pool->h_cnt);
    if (pool->stage_ev)
        cudaEventDestroy(pool->stage_ev);
    free(pool->hdrs), free(pool->refcnt), free(pool->free_ids), free(pool);
    return st;
}

extern "C" void kvc_gpu_pool_destroy(kvc_gpu_pool_t *pool)
{
    if (pool == NULL)
        return;
    pthread_mutex_destroy(&pool->lock);
    pthread_mutex_destroy(&pool->cnt_lock);
    cudaFree(pool->d_cnt), cudaFreeHost(pool->h_cnt), cudaFreeHost(pool->h_stage);
    cudaEventDestroy(pool->stage_ev);
    cudaError_t e = cudaFree(pool->dev);
    if (e != cudaSuccess)
        FY_LOG_WARN("kvcodec", "cudaFree of the page pool: %s", cudaGetErrorString(e));
    free(pool->hdrs), free(pool->refcnt), free(pool->free_ids), free(pool);
}

extern "C" uint8_t *kvc_gpu_pool_base(const kvc_gpu_pool_t *pool)
{
    return pool->dev;
}
extern "C" size_t kvc_gpu_pool_page_bytes(const kvc_gpu_pool_t *pool)
{
    return pool->p.page_bytes;
}
extern "C" uint32_t kvc_gpu_pool_n_pages(const kvc_gpu_pool_t *pool)
{
    return pool->p.n_pages;
}
extern "C" uint32_t kvc_gpu_pool_head_dim(const kvc_gpu_pool_t *pool)
{
    return pool->p.head_dim;
}
extern "C" uint32_t kvc_gpu_pool_group(const kvc_gpu_pool_t *pool)
{
    return pool->p.group;
}
extern "C" uint32_t kvc_gpu_pool_protect(const kvc_gpu_pool_t *pool)
{
    return pool->p.protect;
}
extern "C" size_t kvc_gpu_pool_slot_bytes(const kvc_gpu_pool_t *pool, kvc_opt_t opt)
{
    return (unsigned)opt < KVC_OPT_DROP ? pool->slot_bytes[opt] : 0;
}

extern "C" uint32_t kvc_gpu_pool_free_count(const kvc_gpu_pool_t *pool)
{
    kvc_gpu_pool_t *m = (kvc_gpu_pool_t *)pool;
    pthread_mutex_lock(&m->lock);
    uint32_t n = m->n_free;
    pthread_mutex_unlock(&m->lock);
    return n;
}

extern "C" fy_status_t kvc_gpu_page_header(const kvc_gpu_pool_t *pool, kvc_page_id_t id,
                                           uint8_t hdr[KVC_PAGE_HEADER_BYTES])
{
    if (pool == NULL || hdr == NULL || id >= pool->p.n_pages)
        return FY_ERR_INVALID_ARG;
    memcpy(hdr, pool->hdrs + (size_t)id * KVC_PAGE_HEADER_BYTES, KVC_PAGE_HEADER_BYTES);
    return FY_OK;
}

/* Takes n pages at once or none. */
static fy_status_t alloc_many(kvc_gpu_pool_t *pool, uint32_t n, kvc_page_id_t *ids)
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

extern "C" void kvc_gpu_page_ref(kvc_gpu_pool_t *pool, kvc_page_id_t id)
{
    FY_ASSERT(id < pool->p.n_pages);
    pthread_mutex_lock(&pool->lock);
    FY_ASSERT(pool->refcnt[id] > 0);
    pool->refcnt[id]++;
    pthread_mutex_unlock(&pool->lock);
}

extern "C" void kvc_gpu_page_unref(kvc_gpu_pool_t *pool, kvc_page_id_t id)
{
    FY_ASSERT(id < pool->p.n_pages);
    pthread_mutex_lock(&pool->lock);
    FY_ASSERT(pool->refcnt[id] > 0);
    if (--pool->refcnt[id] == 0)
        pool->free_ids[pool->n_free++] = id;
    pthread_mutex_unlock(&pool->lock);
}

extern "C" uint32_t kvc_gpu_page_refcount(const kvc_gpu_pool_t *pool, kvc_page_id_t id)
{
    if (id >= pool->p.n_pages)
        return 0;
    kvc_gpu_pool_t *m = (kvc_gpu_pool_t *)pool;
    pthread_mutex_lock(&m->lock);
    uint32_t r = m->refcnt[id];
    pthread_mutex_unlock(&m->lock);
    return r;
}

/* ---- sequences ---- */

extern "C" fy_status_t kvc_gpu_seq_create(kvc_gpu_pool_t *pool, uint32_t n_layers,
                                          uint32_t n_kv_heads, uint64_t model_fingerprint,
                                          uint64_t seq_id, kvc_gpu_seq_t **seq_p)
{
    if (pool == NULL || seq_p == NULL || n_layers == 0 || n_layers > KVC_MAX_LAYERS ||
        n_kv_heads == 0 || n_kv_heads > KVC_MAX_KV_HEADS)
        return FY_ERR_INVALID_ARG;
    kvc_gpu_seq_t *s = (kvc_gpu_seq_t *)calloc(1, sizeof(*s));
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    s->pool = pool;
    s->n_layers = n_layers;
    s->n_kv = n_kv_heads;
    s->fingerprint = model_fingerprint;
    s->seq_id = seq_id;
    s->lists = (kvc_page_list_t *)calloc((size_t)n_layers * n_kv_heads, sizeof(kvc_page_list_t));
    s->placed = (uint8_t *)calloc(n_layers, 1);
    if (!s->lists || !s->placed) {
        free(s->lists), free(s->placed), free(s);
        return FY_ERR_NO_MEMORY;
    }
    *seq_p = s;
    return FY_OK;
}

extern "C" void kvc_gpu_seq_destroy(kvc_gpu_seq_t *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; s->lists && i < (size_t)s->n_layers * s->n_kv; i++) {
        for (uint32_t j = 0; j < s->lists[i].n; j++)
            kvc_gpu_page_unref(s->pool, s->lists[i].ids[j]);
        free(s->lists[i].ids);
    }
    free(s->lists), free(s->placed), free(s);
}

extern "C" const kvc_page_id_t *kvc_gpu_seq_pages(const kvc_gpu_seq_t *seq, uint32_t layer,
                                                  uint32_t head, uint32_t *n_pages_p)
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

extern "C" uint32_t kvc_gpu_seq_n_tokens(const kvc_gpu_seq_t *seq, uint32_t layer,
                                         uint32_t head)
{
    if (seq == NULL || layer >= seq->n_layers || head >= seq->n_kv)
        return 0;
    return seq->lists[(size_t)layer * seq->n_kv + head].n_tokens;
}

extern "C" bool kvc_gpu_seq_layer_placed(const kvc_gpu_seq_t *seq, uint32_t layer)
{
    return seq != NULL && layer < seq->n_layers && seq->placed[layer];
}

static uint32_t run_pages(const kvc_gpu_pool_t *pool, int o, uint64_t count)
{
    return kvc_run_pages(pool->cap_slots, pool->p.group, o, count);
}

/* Items per option of every head: cnt[h * 16 + code], the parser's counts (kept: where the
 * frame has them) or kvc_map_counts of the maps. FY_ERR_FORMAT for a code that is not an
 * option (a frame that did not come from kvc_frame_parse). */
static fy_status_t frame_counts_all(const kvc_frame_t *f, bool kept, uint64_t *cnt)
{
    size_t mb = kvc_map_bytes(f->n_tokens);
    for (uint32_t h = 0; h < f->n_kv_heads; h++) {
        uint64_t *c = cnt + (size_t)h * 16;
        memset(c, 0, 16 * sizeof(uint64_t));
        if (kept && kvc_frame_counts_kept(f, h)) {
            kvc_frame_head_counts(f, h, c);
            continue;
        }
        kvc_map_counts(f->maps + h * mb, f->n_tokens, c);
        if (c[KVC_OPT_COUNT])
            return FY_ERR_FORMAT;
    }
    return FY_OK;
}

/* map_count_body (place_dev_int.h): a block per (1024 map bytes, head). */
__global__ void __launch_bounds__(256) map_count_kernel(const uint8_t *maps, size_t map_bytes,
                                                        uint32_t n_tokens, uint32_t *cnt)
{
    map_count_body(maps, map_bytes, n_tokens, cnt);
}

/* frame_counts_all on the device (the maps are the frame's bytes after its header): waits for
 * the stream, as the placement may. */
static fy_status_t frame_counts_dev(kvc_gpu_pool_t *pool, const kvc_frame_t *f,
                                    const uint8_t *frame_dev, cudaStream_t cs, uint64_t *cnt)
{
    fy_status_t st = FY_OK;
    size_t mb = kvc_map_bytes(f->n_tokens);
    const size_t per_block = (size_t)256 * MAP_COUNT_BYTES;
    unsigned bx = (unsigned)FY_MIN((mb + per_block - 1) / per_block, (size_t)65535);
    pthread_mutex_lock(&pool->cnt_lock);
    KVC_CUDA_GOTO(cudaMemsetAsync(pool->d_cnt, 0, (size_t)f->n_kv_heads * 8 * 4, cs), st, out);
    map_count_kernel<<<dim3(FY_MAX(bx, 1u), f->n_kv_heads), 256, 0, cs>>>(
        frame_dev + KVC_FRAME_HEADER_BYTES, mb, f->n_tokens, pool->d_cnt);
    KVC_LAUNCH_GOTO(st, out);
    KVC_CUDA_GOTO(cudaMemcpyAsync(pool->h_cnt, pool->d_cnt, (size_t)f->n_kv_heads * 8 * 4,
                                  cudaMemcpyDeviceToHost, cs),
                  st, out);
    KVC_CUDA_GOTO(cudaStreamSynchronize(cs), st, out);
    for (uint32_t h = 0; h < f->n_kv_heads && st == FY_OK; h++) {
        uint64_t *c = cnt + (size_t)h * 16;
        memset(c, 0, 16 * sizeof(uint64_t));
        for (int o = 0; o < 8; o++)
            c[o] = pool->h_cnt[h * 8 + o];
        for (int o = KVC_OPT_COUNT; o < 8; o++)
            if (c[o])
                st = FY_ERR_FORMAT;
    }
out:
    pthread_mutex_unlock(&pool->cnt_lock);
    return st;
}

extern "C" fy_status_t kvc_gpu_pool_pages_needed(const kvc_gpu_pool_t *pool,
                                                 const kvc_frame_t *f, uint32_t *n_pages_p)
{
    if (pool == NULL || f == NULL || n_pages_p == NULL)
        return FY_ERR_INVALID_ARG;
    return kvc_frame_pages(&pool->p, pool->cap_slots, f, n_pages_p);
}

/* ---- the placement plan and its kernel (place_dev_int.h) ---- */

/* Item i (a page, then the partial groups' ops) per block, grid-stride. */
__global__ void __launch_bounds__(256)
    place_kernel(place_geom_t g, const place_run_t *runs, uint32_t n_runs, const kvc_page_id_t *ids,
                 uint32_t n_pages, const place_op_t *ops, size_t n_ops, const uint8_t *frame,
                 uint8_t *pool)
{
    for (size_t i = blockIdx.x; i < n_pages + n_ops; i += gridDim.x)
        place_item(&g, runs, n_runs, ids, n_pages, ops, frame, pool, i);
}

/* The plan's parts (runs, ids, ops), each 16-byte aligned, to dst through the pool's pinned
 * staging buffer, so the copy is a real asynchronous one; the buffer is reused once the
 * previous upload from it has run (its event). */
static fy_status_t upload_plan(kvc_gpu_pool_t *pool, const void *const *part, const size_t *bytes,
                               int n_parts, uint8_t *dst, cudaStream_t cs)
{
    fy_status_t st = FY_OK;
    size_t up = 0, off = 0;
    for (int i = 0; i < n_parts; i++)
        up += FY_ALIGN_UP(bytes[i], 16);
    pthread_mutex_lock(&pool->cnt_lock);
    KVC_CUDA_GOTO(cudaEventSynchronize(pool->stage_ev), st, out);
    if (up > pool->stage_cap) {
        size_t cap = FY_MAX(up, 2 * pool->stage_cap);
        cudaFreeHost(pool->h_stage);
        pool->h_stage = NULL;
        pool->stage_cap = 0;
        KVC_CUDA_GOTO(cudaMallocHost((void **)&pool->h_stage, cap), st, out);
        pool->stage_cap = cap;
    }
    for (int i = 0; i < n_parts; i++) {
        if (bytes[i])
            memcpy(pool->h_stage + off, part[i], bytes[i]);
        off += FY_ALIGN_UP(bytes[i], 16);
    }
    KVC_CUDA_GOTO(cudaMemcpyAsync(dst, pool->h_stage, up, cudaMemcpyHostToDevice, cs), st, out);
    KVC_CUDA_GOTO(cudaEventRecord(pool->stage_ev, cs), st, out);
out:
    pthread_mutex_unlock(&pool->cnt_lock);
    return st;
}

/* How the pages a frame needs are counted. The parser's counts, where the frame keeps them
 * (up to KVC_FRAME_COUNTED_HEADS kv heads), cost nothing. Else the device's count makes the
 * host wait (a kernel, a copy back and a synchronization, some 20 us at 32k tokens on an
 * H200), while kvc_map_counts reads the maps at about 10 GB/s on one core (13 us for 8 heads
 * of 32k tokens on a 2-core EPYC build host): the device from 65536 tokens.
 * FERRY_PLACE_COUNT=frame|host|device chooses (host: the maps even where the frame has
 * counts), for timing them side by side (read once: every placement asks). */
typedef enum { COUNT_FRAME, COUNT_HOST, COUNT_DEVICE } count_how_t;

static count_how_t count_how(const kvc_frame_t *f)
{
    static int forced = -2; // -1: by the frame, else a count_how_t (a benign race: same value)
    int v = __atomic_load_n(&forced, __ATOMIC_RELAXED);
    if (v == -2) {
        const char *e = getenv("FERRY_PLACE_COUNT");
        v = e == NULL                  ? -1
            : strcmp(e, "frame") == 0  ? COUNT_FRAME
            : strcmp(e, "host") == 0   ? COUNT_HOST
            : strcmp(e, "device") == 0 ? COUNT_DEVICE
                                       : -1;
        __atomic_store_n(&forced, v, __ATOMIC_RELAXED);
    }
    if (v >= 0 && v != COUNT_FRAME)
        return (count_how_t)v;
    if (f->counted) // heads past KVC_FRAME_COUNTED_HEADS are counted from their maps
        return COUNT_FRAME;
    return f->n_tokens >= 65536 ? COUNT_DEVICE : COUNT_HOST;
}

extern "C" fy_status_t kvc_place_cuda(kvc_gpu_seq_t *s, const kvc_frame_t *f,
                                      const uint8_t *frame_dev, void *stream)
{
    if (s == NULL || f == NULL || frame_dev == NULL || f->maps == NULL || f->payload == NULL)
        return FY_ERR_INVALID_ARG;
    kvc_gpu_pool_t *pool = s->pool;
    if (f->model_fingerprint != s->fingerprint || f->seq_id != s->seq_id ||
        f->n_layers != s->n_layers || f->n_kv_heads != s->n_kv ||
        f->head_dim != pool->p.head_dim || f->group != pool->p.group ||
        f->protect != pool->p.protect)
        return FY_ERR_MISMATCH;
    if (f->layer >= s->n_layers)
        return FY_ERR_OUT_OF_RANGE;
    if (s->placed[f->layer])
        return FY_ERR_EXISTS;
    // Where the payload starts inside the frame (the parser set maps = buf + header).
    uint64_t payload_off = (uint64_t)(f->payload - f->maps) + KVC_FRAME_HEADER_BYTES;
    if (f->payload < f->maps || payload_off + f->payload_bytes + 4 != f->frame_bytes)
        return FY_ERR_INVALID_ARG;
    uint64_t *counts = (uint64_t *)malloc((size_t)f->n_kv_heads * 16 * sizeof(uint64_t));
    if (counts == NULL)
        return FY_ERR_NO_MEMORY;
    const count_how_t how = count_how(f);
    fy_status_t st = how == COUNT_DEVICE
                         ? frame_counts_dev(pool, f, frame_dev, (cudaStream_t)stream, counts)
                         : frame_counts_all(f, how == COUNT_FRAME, counts);
    uint64_t need64 = 0;
    for (uint32_t h = 0; h < f->n_kv_heads && st == FY_OK; h++)
        for (int o = 0; o < KVC_OPT_DROP; o++)
            need64 += run_pages(pool, o, counts[(size_t)h * 16 + o]);
    if (st == FY_OK && need64 > UINT32_MAX)
        st = FY_ERR_OUT_OF_RANGE;
    if (st != FY_OK) {
        free(counts);
        return st;
    }
    uint32_t need = (uint32_t)need64;
    for (uint32_t h = 0; h < f->n_kv_heads; h++) {
        kvc_page_list_t *l = &s->lists[(size_t)f->layer * s->n_kv + h];
        if ((st = kvc_page_list_reserve(l, need)) != FY_OK) {
            free(counts);
            return st;
        }
    }
    kvc_page_id_t *ids = (kvc_page_id_t *)malloc((size_t)FY_MAX(need, 1) * sizeof(kvc_page_id_t));
    place_run_t *runs =
        (place_run_t *)malloc((size_t)f->n_kv_heads * KVC_OPT_DROP * sizeof(place_run_t));
    plan_t pl;
    memset(&pl, 0, sizeof(pl));
    place_geom_t g;
    place_geom(&g, pool->p.page_bytes, f->head_dim, f->group, pool->p.protect, pool->slot_bytes,
               pool->cap_slots);
    uint32_t n_runs = 0;
    uint8_t *dbuf = NULL;
    cudaStream_t cs = (cudaStream_t)stream;
    bool have_pages = false;
    bool pools = kvc_cuda_pools();
    if (ids == NULL || runs == NULL) {
        st = FY_ERR_NO_MEMORY;
        goto out;
    }
    if ((st = alloc_many(pool, need, ids)) != FY_OK)
        goto out;
    have_pages = true;
    {
        const uint32_t used =
            place_plan(&g, counts, f->n_kv_heads, (f->flags & KVC_FRAME_FLAG_ROTATED) != 0,
                       payload_off, ids, runs, &n_runs, &pl);
        if (used == UINT32_MAX) {
            st = FY_ERR_NO_MEMORY;
            goto out;
        }
        FY_ASSERT(used == need);
        if (n_runs > 0) {
            const place_run_t *lr = &runs[n_runs - 1];
            FY_ASSERT(lr->src + kvc_run_bytes((int)lr->o, g.d, f->group, g.P, lr->count) ==
                      payload_off + f->payload_bytes);
        }
    }
    if (need > 0) {
        // One upload: the runs, the page ids, the partial groups' ops.
        const void *part[3] = {runs, ids, pl.ops};
        const size_t bytes[3] = {n_runs * sizeof(place_run_t), need * sizeof(kvc_page_id_t),
                                 pl.n * sizeof(place_op_t)};
        const size_t off_ids = FY_ALIGN_UP(bytes[0], 16),
                     off_ops = off_ids + FY_ALIGN_UP(bytes[1], 16);
        KVC_CUDA_GOTO(
            kvc_cuda_scratch_alloc((void **)&dbuf, off_ops + FY_ALIGN_UP(bytes[2], 16), cs, pools),
            st, out);
        if ((st = upload_plan(pool, part, bytes, 3, dbuf, cs)) != FY_OK)
            goto out;
        unsigned grid = (unsigned)FY_MIN((size_t)need + pl.n, (size_t)65535);
        place_kernel<<<grid, 256, 0, cs>>>(
            g, (const place_run_t *)dbuf, n_runs, (const kvc_page_id_t *)(dbuf + off_ids), need,
            (const place_op_t *)(dbuf + off_ops), pl.n, frame_dev, pool->dev);
        KVC_LAUNCH_GOTO(st, out);
    }
    // Committed: the host side of the pages and lists, as kvc_place leaves them (while the
    // kernel runs).
    for (uint32_t i = 0; i < n_runs; i++) {
        const place_run_t *r = &runs[i];
        kvc_page_list_t *l = &s->lists[(size_t)f->layer * s->n_kv + r->head];
        for (uint32_t j = 0; j < r->pages; j++) {
            kvc_page_hdr_t hd;
            uint32_t full;
            place_page_hdr(&g, r, j, &hd, &full);
            const kvc_page_id_t id = ids[r->first + j];
            kvc_page_hdr_write(pool->hdrs + (size_t)id * KVC_PAGE_HEADER_BYTES, &hd);
            l->ids[l->n++] = id;
        }
        l->n_tokens += r->count;
    }
    s->placed[f->layer] = 1;
    have_pages = false; // now owned by the lists
out:
    if (dbuf) {
        cudaError_t e = kvc_cuda_scratch_free(dbuf, cs, pools);
        if (e != cudaSuccess && st == FY_OK)
            st = kvc_cuda_status(e);
        // On a failed free after a good launch the pages are placed; the error still says
        // the stream is in trouble.
    }
    if (have_pages) {
        for (uint32_t i = 0; i < need; i++)
            kvc_gpu_page_unref(pool, ids[i]);
    }
    free(ids), free(runs), free(pl.ops), free(counts);
    return st;
}

/* ---- FP16 tail appends (twin of kvc_seq_append) ---- */

extern "C" kvc_gpu_pool_t *kvc_gpu_seq_pool(const kvc_gpu_seq_t *seq)
{
    return seq->pool;
}
extern "C" uint32_t kvc_gpu_seq_n_layers(const kvc_gpu_seq_t *seq)
{
    return seq->n_layers;
}
extern "C" uint32_t kvc_gpu_seq_n_kv_heads(const kvc_gpu_seq_t *seq)
{
    return seq->n_kv;
}

extern "C" uint32_t kvc_gpu_pool_page_tokens(const kvc_gpu_pool_t *pool, kvc_opt_t opt)
{
    if ((unsigned)opt >= KVC_OPT_DROP)
        return 0;
    return pool->cap_slots[opt] * kvc_group_tokens(opt, pool->p.group);
}

/* Whether the next token of list l goes into its last page: an unshared 16/16 page with a free
 * slot (kvc_seq_append's rule, read from the host copy of the header). */
static bool tail_has_room(const kvc_gpu_pool_t *pool, const kvc_page_list_t *l, kvc_page_hdr_t *hd_p)
{
    if (l->n == 0)
        return false;
    kvc_page_id_t last = l->ids[l->n - 1];
    kvc_page_hdr_read(pool->hdrs + (size_t)last * KVC_PAGE_HEADER_BYTES, hd_p);
    return hd_p->opt == KVC_OPT_F16 && hd_p->n_slots < hd_p->cap_slots &&
           kvc_gpu_page_refcount(pool, last) == 1;
}

extern "C" uint32_t kvc_gpu_seq_append_pages(const kvc_gpu_seq_t *seq, uint32_t n_layers,
                                             uint32_t n_kv_heads)
{
    if (seq == NULL)
        return 0;
    uint32_t need = 0;
    for (uint32_t l = 0; l < n_layers; l++) {
        for (uint32_t h = 0; h < n_kv_heads; h++) {
            kvc_page_hdr_t hd;
            // A list the sequence does not have would get its first page.
            need += l >= seq->n_layers || h >= seq->n_kv ||
                    !tail_has_room(seq->pool, &seq->lists[(size_t)l * seq->n_kv + h], &hd);
        }
    }
    return need;
}

extern "C" fy_status_t kvc_gpu_seq_append_slot(kvc_gpu_seq_t *s, uint32_t layer, uint32_t head,
                                               kvc_gpu_append_t *slot_p)
{
    if (s == NULL || slot_p == NULL || layer >= s->n_layers || head >= s->n_kv)
        return FY_ERR_INVALID_ARG;
    kvc_gpu_pool_t *pool = s->pool;
    kvc_page_list_t *l = &s->lists[(size_t)layer * s->n_kv + head];
    kvc_page_hdr_t hd;
    kvc_page_id_t id;
    if (tail_has_room(pool, l, &hd)) {
        id = l->ids[l->n - 1];
    } else {
        // A new 16/16 page, initialized as kvc_page_alloc does on the CPU (the device gets the
        // whole header with the token, below).
        fy_status_t st = kvc_page_list_reserve(l, 1);
        if (st == FY_OK)
            st = alloc_many(pool, 1, &id);
        if (st != FY_OK)
            return st;
        hd.opt = KVC_OPT_F16;
        hd.flags = 0;
        hd.head_dim = (uint16_t)pool->p.head_dim;
        hd.n_slots = 0;
        hd.last_tokens = 0;
        hd.group = (uint16_t)kvc_group_tokens(KVC_OPT_F16, pool->p.group);
        hd.cap_slots = (uint16_t)pool->cap_slots[KVC_OPT_F16];
        hd.n_tokens = 0;
        l->ids[l->n++] = id;
    }
    uint64_t page_off = (uint64_t)id * pool->p.page_bytes;
    slot_p->page_off = page_off;
    slot_p->slot_off =
        page_off + KVC_PAGE_HEADER_BYTES + (uint64_t)hd.n_slots * pool->slot_bytes[KVC_OPT_F16];
    hd.n_slots++;
    hd.last_tokens = 1;
    hd.n_tokens++;
    kvc_page_hdr_write(slot_p->hdr, &hd);
    memcpy(pool->hdrs + (size_t)id * KVC_PAGE_HEADER_BYTES, slot_p->hdr, KVC_PAGE_HEADER_BYTES);
    l->n_tokens++;
    return FY_OK;
}

/* One block per (row, kv head): the token's K then V (FP16) into its slot, then the page's new
 * header. Slots are 16-byte aligned (page_bytes is a multiple of 64, slot_bytes of 16). */
__global__ void append_kernel(const kvc_gpu_append_t *slots, uint32_t n_kv, uint32_t d,
                              const uint16_t *k, size_t k_row_stride, const uint16_t *v,
                              size_t v_row_stride, uint8_t *pool)
{
    uint32_t i = blockIdx.x, row = i / n_kv, h = i % n_kv;
    const kvc_gpu_append_t *sl = slots + i;
    uint16_t *dst = (uint16_t *)(pool + sl->slot_off);
    const uint16_t *kr = k + (size_t)row * k_row_stride + (size_t)h * d;
    const uint16_t *vr = v + (size_t)row * v_row_stride + (size_t)h * d;
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = kr[c];
        dst[d + c] = vr[c];
    }
    if (threadIdx.x < KVC_PAGE_HEADER_BYTES)
        pool[sl->page_off + threadIdx.x] = sl->hdr[threadIdx.x];
}

extern "C" fy_status_t kvc_gpu_append_cuda(kvc_gpu_pool_t *pool, const kvc_gpu_append_t *slots_dev,
                                           uint32_t n_rows, uint32_t n_kv_heads,
                                           const uint16_t *k, size_t k_row_stride,
                                           const uint16_t *v, size_t v_row_stride, void *stream)
{
    if (pool == NULL || slots_dev == NULL || k == NULL || v == NULL || n_kv_heads == 0)
        return FY_ERR_INVALID_ARG;
    uint64_t n = (uint64_t)n_rows * n_kv_heads;
    if (n == 0)
        return FY_OK;
    if (n > 0x7fffffffu)
        return FY_ERR_OUT_OF_RANGE;
    fy_status_t st = FY_OK;
    uint32_t d = pool->p.head_dim;
    append_kernel<<<(unsigned)n, d < 128 ? 64 : 128, 0, (cudaStream_t)stream>>>(
        slots_dev, n_kv_heads, d, k, k_row_stride, v, v_row_stride, pool->dev);
    KVC_LAUNCH_GOTO(st, out);
out:
    return st;
}

/* ---- staging for frames in host memory ---- */

struct kvc_gpu_stage {
    cudaStream_t s;
    uint8_t *dev; // [cap] device
    size_t cap;
};

extern "C" fy_status_t kvc_gpu_stage_create(kvc_gpu_stage_t **stage_p)
{
    if (stage_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (fy_cuda_device_count() == 0)
        return FY_ERR_NO_DEVICE;
    kvc_gpu_stage_t *g = (kvc_gpu_stage_t *)calloc(1, sizeof(*g));
    if (g == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = FY_OK;
    KVC_CUDA_GOTO(cudaStreamCreateWithFlags(&g->s, cudaStreamNonBlocking), st, fail);
    *stage_p = g;
    return FY_OK;
fail:
    free(g);
    return st;
}

extern "C" void kvc_gpu_stage_destroy(kvc_gpu_stage_t *g)
{
    if (g == NULL)
        return;
    cudaStreamSynchronize(g->s);
    cudaFree(g->dev);
    cudaStreamDestroy(g->s);
    free(g);
}

extern "C" fy_status_t kvc_gpu_stage_place(kvc_gpu_stage_t *g, kvc_gpu_seq_t *seq,
                                           const kvc_frame_t *f, const uint8_t *bytes,
                                           size_t len)
{
    if (g == NULL || seq == NULL || f == NULL || bytes == NULL || len != f->frame_bytes)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = FY_OK;
    if (len > g->cap) {
        // The stream is idle between calls (each ends synchronized), so the old buffer is free.
        cudaFree(g->dev);
        g->dev = NULL;
        g->cap = 0;
        size_t cap = FY_MAX(FY_ALIGN_UP(len, (size_t)1 << 20), (size_t)4 << 20);
        KVC_CUDA_GOTO(cudaMalloc((void **)&g->dev, cap), st, out);
        g->cap = cap;
    }
    KVC_CUDA_GOTO(cudaMemcpyAsync(g->dev, bytes, len, cudaMemcpyHostToDevice, g->s), st, out);
    st = kvc_place_cuda(seq, f, g->dev, g->s);
out:
    {
        // Complete before returning: the caller reuses bytes and other streams read the pages.
        cudaError_t e = cudaStreamSynchronize(g->s);
        if (e != cudaSuccess && st == FY_OK) {
            FY_LOG_ERROR("kvcodec", "placement from host: %s", cudaGetErrorString(e));
            st = kvc_cuda_status(e);
        }
    }
    return st;
}

extern "C" fy_status_t kvc_gpu_stage_fetch(kvc_gpu_stage_t *g, uint8_t *host, const uint8_t *dev,
                                           size_t len)
{
    if (g == NULL || host == NULL || dev == NULL || len == 0)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = FY_OK;
    KVC_CUDA_GOTO(cudaMemcpyAsync(host, dev, len, cudaMemcpyDeviceToHost, g->s), st, out);
out:
    cudaError_t e = cudaStreamSynchronize(g->s);
    if (e != cudaSuccess && st == FY_OK)
        st = kvc_cuda_status(e);
    return st;
}

extern "C" fy_status_t kvc_gpu_stage_place_dev(kvc_gpu_stage_t *g, kvc_gpu_seq_t *seq,
                                               const kvc_frame_t *f, const uint8_t *frame_dev)
{
    if (g == NULL || seq == NULL || f == NULL || frame_dev == NULL)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = kvc_place_cuda(seq, f, frame_dev, g->s);
    cudaError_t e = cudaStreamSynchronize(g->s);
    if (e != cudaSuccess && st == FY_OK) {
        FY_LOG_ERROR("kvcodec", "placement from device: %s", cudaGetErrorString(e));
        st = kvc_cuda_status(e);
    }
    return st;
}

/* ---- host memory uploads come from (kvc_cuda_host_register) ---- */

extern "C" fy_status_t kvc_cuda_host_register(void *host, size_t len)
{
    if (host == NULL || len == 0)
        return FY_ERR_INVALID_ARG;
    if (fy_cuda_device_count() == 0)
        return FY_ERR_NO_DEVICE;
    cudaError_t e = cudaHostRegister(host, len, cudaHostRegisterDefault);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); // not sticky: clear it for the next call on this thread
        FY_LOG_WARN("kvcodec", "page-locking %zu bytes of host memory: %s", len,
                    cudaGetErrorString(e));
        return e == cudaErrorHostMemoryAlreadyRegistered ? FY_ERR_EXISTS : kvc_cuda_status(e);
    }
    return FY_OK;
}

extern "C" void kvc_cuda_host_unregister(void *host)
{
    if (host == NULL)
        return;
    cudaError_t e = cudaHostUnregister(host);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        FY_LOG_WARN("kvcodec", "unlocking host memory: %s", cudaGetErrorString(e));
    }
}

/* ---- frames handed to another user of the device (kvc_cuda_frame_alloc) ---- */

static pthread_once_t g_frame_once = PTHREAD_ONCE_INIT;
static cudaStream_t g_frame_stream;
static bool g_frame_pools; // stream-ordered allocation works; else cudaMalloc / cudaFree

static void frame_stream_init(void)
{
    int dev = 0, pools = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev) == cudaSuccess &&
        pools != 0 &&
        cudaStreamCreateWithFlags(&g_frame_stream, cudaStreamNonBlocking) == cudaSuccess)
        g_frame_pools = true;
}

extern "C" fy_status_t kvc_cuda_frame_alloc(size_t bytes, uint8_t **dev_p)
{
    if (bytes == 0 || dev_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (fy_cuda_device_count() == 0)
        return FY_ERR_NO_DEVICE;
    pthread_once(&g_frame_once, frame_stream_init);
    void *p = NULL;
    cudaError_t e;
    if (g_frame_pools) {
        e = cudaMallocAsync(&p, bytes, g_frame_stream);
        // Other streams may use it as soon as this returns.
        if (e == cudaSuccess && (e = cudaStreamSynchronize(g_frame_stream)) != cudaSuccess)
            cudaFreeAsync(p, g_frame_stream);
    } else {
        e = cudaMalloc(&p, bytes);
    }
    if (e != cudaSuccess)
        return kvc_cuda_status(e);
    *dev_p = (uint8_t *)p;
    return FY_OK;
}

extern "C" fy_status_t kvc_cuda_frame_upload(const uint8_t *host, size_t len, uint8_t **dev_p)
{
    if (host == NULL || len == 0 || dev_p == NULL)
        return FY_ERR_INVALID_ARG;
    uint8_t *d = NULL;
    fy_status_t st = kvc_cuda_frame_alloc(len, &d);
    if (st != FY_OK)
        return st;
    cudaStream_t s = g_frame_pools ? g_frame_stream : 0;
    cudaError_t e = cudaMemcpyAsync(d, host, len, cudaMemcpyHostToDevice, s);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) {
        kvc_cuda_frame_free(d);
        return kvc_cuda_status(e);
    }
    *dev_p = d;
    return FY_OK;
}

extern "C" void kvc_cuda_frame_free(uint8_t *dev)
{
    if (dev == NULL)
        return;
    if (g_frame_pools)
        cudaFreeAsync(dev, g_frame_stream); // never waits for the device
    else
        cudaFree(dev);
}
