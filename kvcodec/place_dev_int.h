/* Placing a frame into GPU pages (kvc_place_cuda, kvcodec/pool.cu): the plan the host builds
 * from the frame's counts and the page ids it allocated, and the kernel body that carries it
 * out, device code that two places compile: kvcodec/pool.cu and tests/kvcodec/test_place_emu.cc,
 * which runs it on host threads against pool.c's kvc_place, byte for byte, so that it is tested
 * on every machine, not only on one with a GPU.
 *
 * kvc_place walks each (head, option) run of the frame in order, filling pages slot after slot:
 * every group of a run but its last is full, so page j of a run holds groups [j cap, j cap +
 * cap) and its header follows from the run's token count alone (place_page_hdr). The plan is
 * therefore a run table (place_run_t) and the page ids, a block of the kernel per page copying
 * the page's full groups and writing its header, plus the byte-range ops of each run's partial
 * last group (plan_group: its parts at their capacity offsets, the gaps zero-filled), a block
 * per op. Nothing a block writes overlaps another's.
 *
 * The maps' counts per head and option (map_count_body), which the host needs before it can
 * allocate pages, are here too.
 *
 * Not a standalone header: the includer provides kvcodec_int.h (C linkage), and outside CUDA
 * __device__, __host__, __forceinline__, threadIdx, blockIdx, blockDim, gridDim, uint2, uint4,
 * make_uint4, __ldg, __funnelshift_r, __shfl_xor_sync and atomicAdd (unsigned). */
#ifndef FERRY_KVCODEC_PLACE_DEV_INT_H
#define FERRY_KVCODEC_PLACE_DEV_INT_H

#include <stdlib.h>

#ifdef __CUDACC__
#define PLACE_UNROLL _Pragma("unroll")
#else
#define PLACE_UNROLL
#endif

enum { SRC_FRAME = 0, SRC_ZERO = 2 };

/* One byte-range copy: [frame + src_off, +bytes) (SRC_ZERO: zeros) -> [pool + dst_off, +bytes). */
typedef struct {
    uint64_t src_off, dst_off;
    uint32_t bytes, src;
} place_op_t;

/* One (head, option) run of the frame with tokens. */
typedef struct {
    uint64_t src;   // frame offset of its first group
    uint32_t count; // tokens
    uint32_t first; // its first page: ids[first]
    uint32_t pages;
    uint32_t o;     // option
    uint32_t flags; // KVC_PAGE_FLAG_ROTATED where the frame is rotated and o is rotatable
    uint32_t head;
} place_run_t;

/* The pool's geometry for the frame's head_dim, group and protected channels, per option. */
typedef struct {
    uint64_t page_bytes;
    uint32_t d, P;
    uint32_t gs[KVC_OPT_DROP];  // tokens a group
    uint32_t cap[KVC_OPT_DROP]; // slots a page
    uint64_t gb[KVC_OPT_DROP];  // bytes a full group
    uint64_t sb[KVC_OPT_DROP];  // bytes a slot
} place_geom_t;

typedef struct {
    place_op_t *ops;
    size_t n, cap;
    bool oom;
} plan_t;

static void plan_op(plan_t *pl, uint32_t src, uint64_t src_off, uint64_t dst_off, size_t bytes)
{
    if (bytes == 0 || pl->oom)
        return;
    if (pl->n == pl->cap) {
        size_t cap = pl->cap ? pl->cap * 2 : 64;
        place_op_t *ops = (place_op_t *)realloc(pl->ops, cap * sizeof(place_op_t));
        if (ops == NULL) {
            pl->oom = true;
            return;
        }
        pl->ops = ops;
        pl->cap = cap;
    }
    FY_ASSERT(bytes <= UINT32_MAX);
    place_op_t op = {src_off, dst_off, (uint32_t)bytes, src};
    pl->ops[pl->n++] = op;
}

/* pool.c's copy_group of a partial group as ops: m tokens (capacity m) at src_off into a slot of
 * capacity cap at dst_off, the unused capacity zero-filled. */
static void plan_group(plan_t *pl, int o, uint32_t d, uint32_t m, uint32_t cap, uint32_t P,
                       uint64_t src, uint64_t dst)
{
    if (o == KVC_OPT_F16 || m == cap) {
        plan_op(pl, SRC_FRAME, src, dst, kvc_group_bytes(o, d, m, P));
        return;
    }
    size_t rowk = (size_t)d * kvc_opt_kbits((kvc_opt_t)o) / 8;
    size_t rowv = (size_t)d * kvc_opt_vbits((kvc_opt_t)o) / 8;
    size_t gap = cap - m;
    plan_op(pl, SRC_FRAME, src, dst, 4 * (size_t)d); // kscale, kzero
    uint64_t s = src + 4 * (uint64_t)d, t = dst + 4 * (uint64_t)d;
    plan_op(pl, SRC_FRAME, s, t, 2 * (size_t)m); // vscale
    plan_op(pl, SRC_ZERO, 0, t + 2 * m, 2 * gap);
    plan_op(pl, SRC_FRAME, s + 2 * m, t + 2 * (uint64_t)cap, 2 * (size_t)m); // vzero
    plan_op(pl, SRC_ZERO, 0, t + 2 * (uint64_t)cap + 2 * m, 2 * gap);
    s += 4 * (uint64_t)m; // kcodes
    t += 4 * (uint64_t)cap;
    plan_op(pl, SRC_FRAME, s, t, m * rowk);
    plan_op(pl, SRC_ZERO, 0, t + m * rowk, gap * rowk);
    s += m * rowk; // vcodes
    t += cap * rowk;
    plan_op(pl, SRC_FRAME, s, t, m * rowv);
    plan_op(pl, SRC_ZERO, 0, t + m * rowv, gap * rowv);
    if (P && kvc_opt_protectable(o)) { // pidx, then pcodes
        s = src + kvc_group_bytes(o, d, m, 0);
        t = dst + kvc_group_bytes(o, d, cap, 0);
        plan_op(pl, SRC_FRAME, s, t, 2 * (size_t)P);
        plan_op(pl, SRC_FRAME, s + 2 * P, t + 2 * P, (size_t)m * P);
        plan_op(pl, SRC_ZERO, 0, t + 2 * P + (uint64_t)m * P, gap * P);
    }
}

/* The geometry from the pool's slots: slot_bytes and cap_slots per option. */
static void place_geom(place_geom_t *g, uint64_t page_bytes, uint32_t d, uint32_t group, uint32_t P,
                       const size_t *slot_bytes, const uint32_t *cap_slots)
{
    g->page_bytes = page_bytes;
    g->d = d;
    g->P = P;
    for (int o = 0; o < KVC_OPT_DROP; o++) {
        g->gs[o] = kvc_group_tokens(o, group);
        g->cap[o] = cap_slots[o];
        g->gb[o] = kvc_group_bytes(o, d, g->gs[o], P);
        g->sb[o] = slot_bytes[o];
    }
}

/* Page j of run r: its header (as kvc_place leaves it) and its full groups. */
static __host__ __device__ __forceinline__ void place_page_hdr(const place_geom_t *g,
                                                               const place_run_t *r, uint32_t j,
                                                               kvc_page_hdr_t *hd, uint32_t *full_p)
{
    const uint32_t o = r->o, gs = g->gs[o], cap = g->cap[o];
    const uint32_t groups = (r->count + gs - 1) / gs, slot0 = j * cap;
    const uint32_t ns = groups - slot0 < cap ? groups - slot0 : cap;
    const bool last = slot0 + ns == groups;
    const uint32_t m = r->count - (groups - 1) * gs; // tokens of the run's last group
    const bool partial = last && m < gs;
    hd->opt = (uint8_t)o;
    hd->flags = (uint8_t)(r->flags | (partial ? KVC_PAGE_FLAG_SEALED : 0u));
    hd->head_dim = (uint16_t)g->d;
    hd->n_slots = (uint16_t)ns;
    hd->last_tokens = (uint16_t)(last ? m : gs);
    hd->group = (uint16_t)gs;
    hd->cap_slots = (uint16_t)cap;
    hd->n_tokens = ns * gs - (partial ? gs - m : 0u);
    *full_p = partial ? ns - 1 : ns;
}

/* The run table of a frame (cnt[h * 16 + o]: tokens of option o of head h; payload_off: the
 * frame offset of the payload) and the ops of each run's partial last group, whose slot is in
 * page ids[first + pages - 1]. Returns the pages the runs take (the ids' count), or UINT32_MAX
 * when the ops ran out of memory. runs must have room for n_kv x KVC_OPT_DROP entries. */
static uint32_t place_plan(const place_geom_t *g, const uint64_t *cnt, uint32_t n_kv, bool rotated,
                           uint64_t payload_off, const kvc_page_id_t *ids, place_run_t *runs,
                           uint32_t *n_runs_p, plan_t *pl)
{
    uint32_t used = 0, n_runs = 0;
    uint64_t r = payload_off;
    for (uint32_t h = 0; h < n_kv; h++) {
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            const uint64_t count = cnt[(size_t)h * 16 + o];
            if (count == 0)
                continue;
            const uint32_t gs = g->gs[o], cap = g->cap[o];
            const uint32_t groups = (uint32_t)((count + gs - 1) / gs);
            place_run_t *run = &runs[n_runs++];
            run->src = r;
            run->count = (uint32_t)count;
            run->first = used;
            run->pages = (groups + cap - 1) / cap;
            run->o = (uint32_t)o;
            run->flags = rotated && kvc_opt_rotatable(o) ? KVC_PAGE_FLAG_ROTATED : 0u;
            run->head = h;
            const uint32_t m = (uint32_t)(count - (uint64_t)(groups - 1) * gs);
            r += (uint64_t)(groups - 1) * g->gb[o];
            if (m < gs) {
                const uint64_t page = (uint64_t)ids[used + run->pages - 1] * g->page_bytes;
                const uint32_t slot = (groups - 1) % cap;
                plan_group(pl, o, g->d, m, gs, g->P, r,
                           page + KVC_PAGE_HEADER_BYTES + (uint64_t)slot * g->sb[o]);
            }
            r += kvc_group_bytes(o, g->d, m, g->P);
            used += run->pages;
        }
    }
    *n_runs_p = n_runs;
    return pl->oom ? UINT32_MAX : used;
}

/* Copies `bytes` bytes (src NULL: zeros) with the whole block: single bytes up to the first
 * 16-byte-aligned destination, then 16-byte stores whose source is read with the widest loads
 * its alignment allows (16, 8 or 4 bytes; at an odd alignment, 4-byte words assembled from
 * the aligned words around them, which never leave the allocation since each holds a byte of
 * the range), then the last bytes. Frame payloads sit at 8-byte offsets and page slots at
 * 16-byte ones, so the big copies take the 16- or 8-byte path. */
static __device__ void block_copy(uint8_t *dst, const uint8_t *src, uint64_t bytes)
{
    uint64_t head = (uint64_t)((16 - ((uintptr_t)dst & 15)) & 15);
    if (head > bytes)
        head = bytes;
    for (uint64_t i = threadIdx.x; i < head; i += blockDim.x)
        dst[i] = src ? src[i] : 0;
    uint64_t vecs = (bytes - head) / 16;
    uint4 *dv = (uint4 *)(dst + head);
    if (src == NULL) {
        for (uint64_t i = threadIdx.x; i < vecs; i += blockDim.x)
            dv[i] = make_uint4(0, 0, 0, 0);
    } else {
        const uint8_t *s = src + head;
        uintptr_t a = (uintptr_t)s;
        // Four vectors a thread at a time, all loaded before the first store (so that a thread
        // waits out one memory latency per four, not per vector), then the rest one by one.
        const uint64_t bd = blockDim.x;
        uint64_t i = threadIdx.x;
        if ((a & 15) == 0) {
            const uint4 *sv = (const uint4 *)s;
            for (; i + 3 * bd < vecs; i += 4 * bd) {
                const uint4 x0 = __ldg(sv + i), x1 = __ldg(sv + i + bd),
                            x2 = __ldg(sv + i + 2 * bd), x3 = __ldg(sv + i + 3 * bd);
                dv[i] = x0, dv[i + bd] = x1, dv[i + 2 * bd] = x2, dv[i + 3 * bd] = x3;
            }
            for (; i < vecs; i += bd)
                dv[i] = __ldg(sv + i);
        } else if ((a & 7) == 0) {
            const uint2 *s2 = (const uint2 *)s;
            for (; i + 3 * bd < vecs; i += 4 * bd) {
                uint2 x[8];
                PLACE_UNROLL
                for (int k = 0; k < 4; k++) {
                    x[2 * k] = __ldg(s2 + 2 * (i + k * bd));
                    x[2 * k + 1] = __ldg(s2 + 2 * (i + k * bd) + 1);
                }
                PLACE_UNROLL
                for (int k = 0; k < 4; k++)
                    dv[i + k * bd] =
                        make_uint4(x[2 * k].x, x[2 * k].y, x[2 * k + 1].x, x[2 * k + 1].y);
            }
            for (; i < vecs; i += bd) {
                uint2 x = __ldg(s2 + 2 * i), y = __ldg(s2 + 2 * i + 1);
                dv[i] = make_uint4(x.x, x.y, y.x, y.y);
            }
        } else if ((a & 3) == 0) {
            const uint32_t *s4 = (const uint32_t *)s;
            for (uint64_t i = threadIdx.x; i < vecs; i += blockDim.x)
                dv[i] = make_uint4(__ldg(s4 + 4 * i), __ldg(s4 + 4 * i + 1), __ldg(s4 + 4 * i + 2),
                                   __ldg(s4 + 4 * i + 3));
        } else {
            uint32_t sh = 8 * (uint32_t)(a & 3);
            const uint32_t *sw = (const uint32_t *)(s - (a & 3));
            for (uint64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
                const uint32_t *w = sw + 4 * i;
                uint32_t w0 = __ldg(w), w1 = __ldg(w + 1), w2 = __ldg(w + 2), w3 = __ldg(w + 3),
                         w4 = __ldg(w + 4);
                dv[i] = make_uint4(__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh),
                                   __funnelshift_r(w2, w3, sh), __funnelshift_r(w3, w4, sh));
            }
        }
    }
    for (uint64_t i = head + 16 * vecs + threadIdx.x; i < bytes; i += blockDim.x)
        dst[i] = src ? src[i] : 0;
}

/* Item i of a placement, by one block: page i (its header and full groups) for i < n_pages,
 * else op i - n_pages. */
static __device__ void place_item(const place_geom_t *g, const place_run_t *runs, uint32_t n_runs,
                                  const kvc_page_id_t *ids, uint32_t n_pages, const place_op_t *ops,
                                  const uint8_t *frame, uint8_t *pool, size_t i)
{
    if (i >= n_pages) {
        const place_op_t op = ops[i - n_pages];
        block_copy(pool + op.dst_off, op.src == SRC_FRAME ? frame + op.src_off : NULL, op.bytes);
        return;
    }
    const uint32_t p = (uint32_t)i;
    uint32_t lo = 0, hi = n_runs; // the last run starting at or before p
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (runs[mid].first <= p)
            lo = mid;
        else
            hi = mid;
    }
    const place_run_t r = runs[lo];
    const uint32_t j = p - r.first;
    kvc_page_hdr_t hd;
    uint32_t full;
    place_page_hdr(g, &r, j, &hd, &full);
    uint8_t *page = pool + (uint64_t)ids[p] * g->page_bytes;
    if (threadIdx.x == 0) { // kvc_page_hdr_write, little-endian
        uint4 w =
            make_uint4((uint32_t)hd.opt | (uint32_t)hd.flags << 8 | (uint32_t)hd.head_dim << 16,
                       (uint32_t)hd.n_slots | (uint32_t)hd.last_tokens << 16,
                       (uint32_t)hd.group | (uint32_t)hd.cap_slots << 16, hd.n_tokens);
        *(uint4 *)page = w;
    }
    const uint64_t gb = g->gb[r.o], sb = g->sb[r.o];
    const uint8_t *src = frame + r.src + (uint64_t)j * g->cap[r.o] * gb;
    uint8_t *dst = page + KVC_PAGE_HEADER_BYTES;
    if (sb == gb) {
        block_copy(dst, src, full * gb);
    } else {
        for (uint32_t s = 0; s < full; s++)
            block_copy(dst + s * sb, src + s * gb, gb);
    }
}

/* Items per option of each head from the frame's maps in device memory (map_count_kernel): a
 * block of 256 threads per (1024 map bytes, head) of a grid (x, n_kv heads; more bytes a block in
 * turn where a head's maps are longer than the grid's share), 4 bytes a thread loaded at once
 * (so that a thread waits out one memory latency, not one per byte), per-thread counters summed
 * by warps into cnt[h * 8 + code] (zero before; code 6 and 7 collect the codes that are not
 * options). */
#define MAP_COUNT_BYTES 4
static __device__ void map_count_body(const uint8_t *maps, size_t map_bytes, uint32_t n_tokens,
                                      uint32_t *cnt)
{
    uint32_t h = blockIdx.y;
    const uint8_t *mp = maps + (size_t)h * map_bytes;
    uint32_t c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const size_t stride = (size_t)gridDim.x * blockDim.x * MAP_COUNT_BYTES;
    for (size_t b0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * MAP_COUNT_BYTES;
         b0 < map_bytes; b0 += stride) {
        uint32_t x[MAP_COUNT_BYTES];
        PLACE_UNROLL
        for (int j = 0; j < MAP_COUNT_BYTES; j++)
            x[j] = b0 + j < map_bytes ? mp[b0 + j] : 0u;
        PLACE_UNROLL
        for (int j = 0; j < MAP_COUNT_BYTES; j++) {
            const size_t b = b0 + j;
            if (b >= map_bytes)
                break;
            uint32_t lo = x[j] & 15, hi = x[j] >> 4;
            bool two = 2 * b + 1 < n_tokens;
            for (int o = 0; o < 8; o++)
                c[o] += (lo == (uint32_t)o || (o == 7 && lo >= 7)) +
                        (two && (hi == (uint32_t)o || (o == 7 && hi >= 7)));
        }
    }
    for (int o = 0; o < 8; o++) {
        uint32_t v = c[o];
        for (int off = 16; off > 0; off >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x % 32 == 0 && v)
            atomicAdd(&cnt[h * 8 + o], v);
    }
}

#endif
