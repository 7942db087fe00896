/*
 * kvlink_wire.c: pack and validated unpack of the kvlink message headers (layout in
 * kvlink_int.h), and the first-fit allocator that carves frame buffers out of the registered
 * receive region. Nothing here touches UCX, so both are unit- and fuzz-tested directly.
 */
#include "kvlink_int.h"

#include <stdlib.h>
#include <string.h>

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

size_t kvlink_msg_size(uint32_t id)
{
    switch (id) {
    case KVLINK_AM_HELLO:
    case KVLINK_AM_HELLO_ACK:
        return 48;
    case KVLINK_AM_OPEN:
    case KVLINK_AM_STATUS:
    case KVLINK_AM_ABORT:
        return 16;
    case KVLINK_AM_CREDIT:
    case KVLINK_AM_END:
        return 24;
    case KVLINK_AM_FRAME:
        return 32;
    default:
        return 0;
    }
}

size_t kvlink_msg_pack(const kvlink_msg_t *m, uint8_t *out)
{
    size_t n = kvlink_msg_size(m->id);
    memset(out, 0, KVLINK_HDR_MAX);
    switch (m->id) {
    case KVLINK_AM_HELLO:
    case KVLINK_AM_HELLO_ACK:
        put_u32(out + 0, KVLINK_MAGIC);
        put_u32(out + 4, m->protocol_version);
        put_u32(out + 8, m->codec_version);
        put_u32(out + 12, m->page_size);
        put_u64(out + 16, m->model_fingerprint);
        put_u64(out + 24, m->instance_id);
        put_u64(out + 32, m->max_frame);
        put_u32(out + 40, (uint32_t)m->status);
        break;
    case KVLINK_AM_OPEN:
        put_u64(out + 0, m->request_id);
        put_u32(out + 8, m->flags);
        break;
    case KVLINK_AM_CREDIT:
        put_u64(out + 0, m->request_id);
        put_u64(out + 8, m->bytes);
        put_u32(out + 16, m->flags);
        break;
    case KVLINK_AM_FRAME:
        put_u64(out + 0, m->request_id);
        put_u64(out + 8, m->bytes);
        put_u32(out + 16, m->layer);
        put_u32(out + 20, m->crc);
        put_u32(out + 24, m->flags);
        break;
    case KVLINK_AM_END:
        put_u64(out + 0, m->request_id);
        put_u32(out + 8, m->frames);
        put_u64(out + 16, m->bytes);
        break;
    case KVLINK_AM_STATUS:
    case KVLINK_AM_ABORT:
        put_u64(out + 0, m->request_id);
        put_u32(out + 8, (uint32_t)m->status);
        break;
    default:
        return 0;
    }
    return n;
}

fy_status_t kvlink_status_from_wire(int32_t v)
{
    // Only values that are real statuses survive; a peer cannot make us report garbage.
    if (v > 0 || v < FY_ERR_INTERNAL)
        return FY_ERR_PROTOCOL;
    return (fy_status_t)v;
}

fy_status_t kvlink_msg_unpack(uint32_t id, const void *hdr, size_t len, kvlink_msg_t *msg_p)
{
    size_t want = kvlink_msg_size(id);
    if (want == 0 || hdr == NULL || len != want)
        return FY_ERR_FORMAT;
    const uint8_t *p = hdr;
    kvlink_msg_t m;
    memset(&m, 0, sizeof(m));
    m.id = (kvlink_am_id_t)id;
    switch (id) {
    case KVLINK_AM_HELLO:
    case KVLINK_AM_HELLO_ACK:
        if (get_u32(p) != KVLINK_MAGIC || get_u32(p + 44) != 0)
            return FY_ERR_FORMAT;
        m.protocol_version = get_u32(p + 4);
        m.codec_version = get_u32(p + 8);
        m.page_size = get_u32(p + 12);
        m.model_fingerprint = get_u64(p + 16);
        m.instance_id = get_u64(p + 24);
        m.max_frame = get_u64(p + 32);
        m.status = (int32_t)get_u32(p + 40);
        if (kvlink_status_from_wire(m.status) == FY_ERR_PROTOCOL && m.status != FY_ERR_PROTOCOL)
            return FY_ERR_FORMAT;
        if (id == KVLINK_AM_HELLO && m.status != 0)
            return FY_ERR_FORMAT;
        break;
    case KVLINK_AM_OPEN:
        m.request_id = get_u64(p);
        m.flags = get_u32(p + 8);
        if (m.flags != 0 || get_u32(p + 12) != 0)
            return FY_ERR_FORMAT;
        break;
    case KVLINK_AM_CREDIT:
        m.request_id = get_u64(p);
        m.bytes = get_u64(p + 8);
        m.flags = get_u32(p + 16);
        if ((m.flags & ~KVLINK_CREDIT_INITIAL) != 0 || get_u32(p + 20) != 0 || m.bytes == 0)
            return FY_ERR_FORMAT;
        break;
    case KVLINK_AM_FRAME:
        m.request_id = get_u64(p);
        m.bytes = get_u64(p + 8);
        m.layer = get_u32(p + 16);
        m.crc = get_u32(p + 20);
        m.flags = get_u32(p + 24);
        if ((m.flags & ~KVLINK_FRAME_SELF_CHECKED) != 0 || get_u32(p + 28) != 0 ||
            m.bytes == 0 || ((m.flags & KVLINK_FRAME_SELF_CHECKED) && m.crc != 0))
            return FY_ERR_FORMAT;
        break;
    case KVLINK_AM_END:
        m.request_id = get_u64(p);
        m.frames = get_u32(p + 8);
        m.bytes = get_u64(p + 16);
        if (get_u32(p + 12) != 0)
            return FY_ERR_FORMAT;
        break;
    case KVLINK_AM_STATUS:
    case KVLINK_AM_ABORT:
        m.request_id = get_u64(p);
        m.status = (int32_t)get_u32(p + 8);
        if (get_u32(p + 12) != 0)
            return FY_ERR_FORMAT;
        if (kvlink_status_from_wire(m.status) == FY_ERR_PROTOCOL && m.status != FY_ERR_PROTOCOL)
            return FY_ERR_FORMAT;
        if (id == KVLINK_AM_ABORT && m.status == 0)
            return FY_ERR_FORMAT;
        break;
    default:
        return FY_ERR_FORMAT;
    }
    *msg_p = m;
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Receive pool                                                                                */
/* ------------------------------------------------------------------------------------------ */

fy_status_t kvlink_pool_init(kvlink_pool_t *pool, size_t size)
{
    memset(pool, 0, sizeof(*pool));
    size = size / KVLINK_POOL_ALIGN * KVLINK_POOL_ALIGN;
    pool->size = size;
    if (size == 0)
        return FY_OK;
    pool->cap_free = 16;
    pool->free = malloc(pool->cap_free * sizeof(*pool->free));
    if (pool->free == NULL)
        return FY_ERR_NO_MEMORY;
    pool->free[0] = (kvlink_extent_t){0, size};
    pool->n_free = 1;
    return FY_OK;
}

void kvlink_pool_cleanup(kvlink_pool_t *pool)
{
    free(pool->free);
    memset(pool, 0, sizeof(*pool));
}

fy_status_t kvlink_pool_alloc(kvlink_pool_t *pool, size_t len, size_t *off_p, size_t *alen_p)
{
    if (len == 0 || len > pool->size)
        return FY_ERR_RESOURCE_EXHAUSTED;
    size_t alen = FY_ALIGN_UP(len, (size_t)KVLINK_POOL_ALIGN);
    for (size_t i = 0; i < pool->n_free; i++) {
        kvlink_extent_t *e = &pool->free[i];
        if (e->len < alen)
            continue;
        *off_p = e->off;
        *alen_p = alen;
        e->off += alen;
        e->len -= alen;
        if (e->len == 0) {
            memmove(e, e + 1, (pool->n_free - i - 1) * sizeof(*e));
            pool->n_free--;
        }
        pool->used += alen;
        return FY_OK;
    }
    return FY_ERR_RESOURCE_EXHAUSTED;
}

void kvlink_pool_free(kvlink_pool_t *pool, size_t off, size_t alen)
{
    FY_ASSERT(alen > 0 && off + alen <= pool->size && pool->used >= alen);
    // Insertion point: first extent after off.
    size_t i = 0;
    while (i < pool->n_free && pool->free[i].off < off)
        i++;
    bool merge_prev = i > 0 && pool->free[i - 1].off + pool->free[i - 1].len == off;
    bool merge_next = i < pool->n_free && off + alen == pool->free[i].off;
    if (!merge_prev && !merge_next && pool->n_free == pool->cap_free) {
        // Each live allocation splits at most one extent, so growth is bounded by allocations.
        size_t cap = pool->cap_free * 2;
        kvlink_extent_t *nf = realloc(pool->free, cap * sizeof(*nf));
        if (nf == NULL)
            return; // the extent stays counted as used: capacity shrinks, nothing breaks
        pool->free = nf;
        pool->cap_free = cap;
    }
    pool->used -= alen;
    if (merge_prev && merge_next) {
        pool->free[i - 1].len += alen + pool->free[i].len;
        memmove(&pool->free[i], &pool->free[i + 1],
                (pool->n_free - i - 1) * sizeof(kvlink_extent_t));
        pool->n_free--;
        return;
    }
    if (merge_prev) {
        pool->free[i - 1].len += alen;
        return;
    }
    if (merge_next) {
        pool->free[i].off = off;
        pool->free[i].len += alen;
        return;
    }
    memmove(&pool->free[i + 1], &pool->free[i], (pool->n_free - i) * sizeof(kvlink_extent_t));
    pool->free[i] = (kvlink_extent_t){off, alen};
    pool->n_free++;
}
