/*
 * nccl_link.c: the protocol core of the NCCL link (nccl_link.h): rounds, control blocks,
 * requests, credits, deadlines, cancel and peer failure. It never calls CUDA or NCCL itself;
 * the backend (kvlink_nccl_ops_t, nccl_link_int.h) posts each round and reports completion.
 *
 * Rounds are lockstep: both ends post round k with the frames announced in round k-1 (the
 * sender's sends matching the receiver's receives one for one, in announcement order), then
 * exchange control blocks. Because NCCL matches by order and size only, the receiver posts a
 * receive for every announced frame, even one it will drop (into a scratch buffer), and
 * anything that would break the matching (a bad block, too many frames, an oversized frame)
 * fails the whole pair.
 */
#include "nccl_link_int.h"

#include <endian.h>
#include <stdlib.h>
#include <string.h>

#include "kvlink_int.h" /* kvlink_pool_t (first-fit extents), kvlink_status_from_wire */

#define MOD "kvlink-nccl"

typedef enum {
    PAIR_INIT,  /* communicator being set up */
    PAIR_HELLO, /* first round (compatibility records) in flight */
    PAIR_READY,
    PAIR_FAILED,
} pair_state_t;

typedef struct sframe {
    struct sframe *next;
    uint32_t layer;
    uint32_t crc;
    const void *data;
    size_t len;
    bool stalled; /* counted once in credit_stalls */
    kvlink_nccl_frame_done_cb on_done;
    void *arg;
} sframe_t;

struct kvlink_nccl_send {
    kvlink_nccl_t *pair;
    kvlink_nccl_send_t *prev, *next; /* pair->sreqs while not ended */
    uint64_t id;
    kvlink_nccl_send_params_t params;
    sframe_t *head, *tail; /* queued, not yet announced */
    uint64_t credit;       /* bytes that may still be announced */
    uint64_t window;       /* the receiver's whole window (its first grant) */
    bool granted;
    bool finished; /* kvlink_nccl_send_finish called */
    bool end_sent;
    uint32_t n_frames; /* frames accepted so far */
    uint64_t n_bytes;
    size_t inflight; /* frames announced or posted, not done */
    bool ended;
    fy_status_t end_st;
};

typedef struct rreq {
    struct rreq *prev, *next; /* pair->rreqs while not ended */
    uint64_t id;
    uint64_t window;
    uint64_t deadline_ns;
    uint64_t outstanding; /* announced, not released */
    bool opened;
    bool end_seen;
    uint64_t end_frames, end_bytes;
    uint64_t n_announced, n_delivered, bytes_delivered;
    size_t refs; /* buffers (in flight or delivered) pointing here */
    bool ended;
} rreq_t;

struct kvlink_nccl_buf {
    kvlink_nccl_t *pair;
    kvlink_nccl_buf_t *prev, *next; /* pair->bufs */
    rreq_t *req;
    void *ptr;
    size_t len;
    size_t off, alen; /* pool extent; alen 0: ptr came from mem_alloc (fallback) */
    uint32_t crc;
    uint32_t layer;
    bool delivered;
};

/* One frame of a round: sender (req, frame) or receiver (buf, NULL = dropped into scratch). */
typedef struct {
    kvlink_nccl_send_t *sreq;
    sframe_t *frame;
    kvlink_nccl_buf_t *buf;
    size_t len;
} slot_t;

struct kvlink_nccl {
    const kvlink_nccl_ops_t *ops;
    void *be;
    kvlink_nccl_params_t params;
    pair_state_t state;
    fy_status_t fail_st;
    uint64_t created_ns;
    uint64_t round; /* rounds started */
    bool in_flight;
    uint64_t round_start_ns;
    uint64_t next_round_ns;            /* earliest start of the next round when idle */
    bool busy;                         /* the last round carried anything */
    slot_t cur[KVLINK_NCCL_MAX_XFERS]; /* posted in the round in flight */
    size_t n_cur;
    slot_t next[KVLINK_NCCL_MAX_XFERS]; /* announced, posted in the next round */
    size_t n_next;
    kvlink_nccl_entry_t *q; /* outgoing entries other than FRAME/END, FIFO */
    size_t q_head, q_len, q_cap;
    kvlink_nccl_send_t *sreqs;
    rreq_t *rreqs;
    kvlink_nccl_buf_t *bufs;
    void *pool_base; /* [recv_pool_bytes] device memory, receiver only */
    kvlink_pool_t pool;
    bool pool_ok;
    void *scratch; /* [max_frame_bytes] device memory for dropped frames */
    uint64_t credit_reserved;
    kvlink_nccl_stats_t stats;
    kvlink_nccl_ctl_t ctl; /* scratch for building and parsing blocks */
    uint8_t ctl_out[KVLINK_NCCL_CTL_BYTES];
    uint8_t ctl_in[KVLINK_NCCL_CTL_BYTES];
};

/* ------------------------------------------------------------------------------------------ */
/* Control blocks                                                                              */
/* ------------------------------------------------------------------------------------------ */

// Little-endian fields of a control block, through <endian.h> (no alignment assumed).
static void put16(uint8_t *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof(v));
}
static void put32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof(v));
}
static void put64(uint8_t *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, sizeof(v));
}
static uint16_t get16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return le16toh(v);
}
static uint32_t get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}
static uint64_t get64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

void kvlink_nccl_ctl_pack(const kvlink_nccl_ctl_t *ctl, uint8_t *out)
{
    FY_ASSERT(ctl->n_entries <= KVLINK_NCCL_MAX_ENTRIES);
    memset(out, 0, KVLINK_NCCL_CTL_BYTES);
    put32(out, KVLINK_NCCL_MAGIC);
    put16(out + 4, KVLINK_NCCL_PROTOCOL_VERSION);
    put16(out + 6, (uint16_t)ctl->n_entries);
    put64(out + 8, ctl->round);
    put32(out + 16, ctl->has_hello ? KVLINK_NCCL_FLAG_HELLO : 0);
    if (ctl->has_hello) {
        put32(out + 24, ctl->compat.protocol_version);
        put32(out + 28, ctl->compat.codec_version);
        put32(out + 32, ctl->compat.page_size);
        put32(out + 36, ctl->role);
        put64(out + 40, ctl->compat.model_fingerprint);
    }
    for (size_t i = 0; i < ctl->n_entries; i++) {
        const kvlink_nccl_entry_t *e = &ctl->entries[i];
        uint8_t *p = out + KVLINK_NCCL_CTL_HDR + i * KVLINK_NCCL_ENTRY_BYTES;
        p[0] = e->type;
        put32(p + 4, (uint32_t)e->status);
        put64(p + 8, e->request_id);
        put32(p + 16, e->layer);
        put32(p + 20, e->crc);
        put64(p + 24, e->bytes);
    }
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != 0)
            return false;
    return true;
}

fy_status_t kvlink_nccl_ctl_unpack(const uint8_t *in, kvlink_nccl_ctl_t *ctl_p)
{
    if (get32(in) != KVLINK_NCCL_MAGIC || get16(in + 4) != KVLINK_NCCL_PROTOCOL_VERSION)
        return FY_ERR_FORMAT;
    size_t n = get16(in + 6);
    uint32_t flags = get32(in + 16);
    if (n > KVLINK_NCCL_MAX_ENTRIES || (flags & ~KVLINK_NCCL_FLAG_HELLO) != 0 ||
        get32(in + 20) != 0 || !all_zero(in + 48, 16))
        return FY_ERR_FORMAT;
    if (!(flags & KVLINK_NCCL_FLAG_HELLO) && !all_zero(in + 24, 24))
        return FY_ERR_FORMAT;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = in + KVLINK_NCCL_CTL_HDR + i * KVLINK_NCCL_ENTRY_BYTES;
        if (p[1] != 0 || p[2] != 0 || p[3] != 0)
            return FY_ERR_FORMAT;
    }
    ctl_p->round = get64(in + 8);
    ctl_p->has_hello = (flags & KVLINK_NCCL_FLAG_HELLO) != 0;
    memset(&ctl_p->compat, 0, sizeof(ctl_p->compat));
    ctl_p->role = 0;
    if (ctl_p->has_hello) {
        ctl_p->compat.protocol_version = get32(in + 24);
        ctl_p->compat.codec_version = get32(in + 28);
        ctl_p->compat.page_size = get32(in + 32);
        ctl_p->role = get32(in + 36);
        ctl_p->compat.model_fingerprint = get64(in + 40);
    }
    ctl_p->n_entries = n;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = in + KVLINK_NCCL_CTL_HDR + i * KVLINK_NCCL_ENTRY_BYTES;
        kvlink_nccl_entry_t *e = &ctl_p->entries[i];
        e->type = p[0];
        e->status = (int32_t)get32(p + 4);
        e->request_id = get64(p + 8);
        e->layer = get32(p + 16);
        e->crc = get32(p + 20);
        e->bytes = get64(p + 24);
    }
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Defaults                                                                                    */
/* ------------------------------------------------------------------------------------------ */

void kvlink_nccl_params_default(kvlink_nccl_params_t *params)
{
    memset(params, 0, sizeof(*params));
    params->compat.protocol_version = KVLINK_PROTOCOL_VERSION;
    params->role = KVLINK_NCCL_SENDER;
    params->device = 0;
    params->recv_pool_bytes = (size_t)256 << 20;
    params->max_frame_bytes = (size_t)64 << 20;
    params->idle_round_us = 500;
    params->peer_timeout_ms = 5000;
    params->init_timeout_ms = 30000;
}

void kvlink_nccl_recv_params_default(const kvlink_nccl_t *pair, kvlink_nccl_recv_params_t *params)
{
    params->credit_bytes = pair != NULL ? pair->params.max_frame_bytes : 0;
    params->deadline_ns = 0;
}

void kvlink_nccl_send_params_default(kvlink_nccl_send_params_t *params)
{
    memset(params, 0, sizeof(*params));
}

/* ------------------------------------------------------------------------------------------ */
/* Outgoing entries                                                                            */
/* ------------------------------------------------------------------------------------------ */

static fy_status_t q_push(kvlink_nccl_t *pair, uint8_t type, uint64_t id, fy_status_t st,
                          uint64_t bytes)
{
    if (pair->q_len == pair->q_cap) {
        size_t cap = pair->q_cap ? pair->q_cap * 2 : 64;
        kvlink_nccl_entry_t *q = malloc(cap * sizeof(*q));
        if (q == NULL)
            return FY_ERR_NO_MEMORY;
        for (size_t i = 0; i < pair->q_len; i++)
            q[i] = pair->q[(pair->q_head + i) % pair->q_cap];
        free(pair->q);
        pair->q = q;
        pair->q_cap = cap;
        pair->q_head = 0;
    }
    kvlink_nccl_entry_t *e = &pair->q[(pair->q_head + pair->q_len) % pair->q_cap];
    memset(e, 0, sizeof(*e));
    e->type = type;
    e->request_id = id;
    e->status = (int32_t)st;
    e->bytes = bytes;
    pair->q_len++;
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Receive side                                                                                */
/* ------------------------------------------------------------------------------------------ */

static rreq_t *rreq_find(kvlink_nccl_t *pair, uint64_t id)
{
    for (rreq_t *r = pair->rreqs; r != NULL; r = r->next)
        if (r->id == id)
            return r;
    return NULL;
}

static void rreq_maybe_free(kvlink_nccl_t *pair, rreq_t *r)
{
    if (r->ended && r->refs == 0) {
        pair->stats.recv_reqs--;
        free(r);
    }
}

/* Ends a receive request once: unlinks it, returns its window, tells the application. */
static void rreq_end(kvlink_nccl_t *pair, rreq_t *r, fy_status_t st)
{
    if (r->ended)
        return;
    r->ended = true;
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        pair->rreqs = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    pair->credit_reserved -= r->window;
    if (pair->params.on_recv_end != NULL)
        pair->params.on_recv_end(pair, r->id, st, pair->params.cb_arg);
    rreq_maybe_free(pair, r);
}

/* Fails a receive request and tells the sender (which may not have opened it yet). */
static void rreq_fail(kvlink_nccl_t *pair, rreq_t *r, fy_status_t st)
{
    if (r->ended)
        return;
    if (r->opened && pair->state != PAIR_FAILED)
        (void)q_push(pair, KVLINK_NCCL_E_STATUS, r->id, st, 0);
    rreq_end(pair, r, st);
}

static void rreq_check_done(kvlink_nccl_t *pair, rreq_t *r)
{
    if (r->ended || !r->end_seen || r->n_delivered < r->end_frames)
        return;
    fy_status_t st = FY_OK;
    if (r->n_delivered != r->end_frames || r->bytes_delivered != r->end_bytes ||
        r->n_announced != r->end_frames) {
        FY_LOG_WARN(MOD, "request %llu: END says %llu frames / %llu bytes, got %llu / %llu",
                    (unsigned long long)r->id, (unsigned long long)r->end_frames,
                    (unsigned long long)r->end_bytes, (unsigned long long)r->n_delivered,
                    (unsigned long long)r->bytes_delivered);
        st = FY_ERR_PROTOCOL;
    }
    if (st == FY_OK)
        (void)q_push(pair, KVLINK_NCCL_E_STATUS, r->id, FY_OK, 0);
    else
        rreq_fail(pair, r, st);
    if (st == FY_OK)
        rreq_end(pair, r, FY_OK);
}

static void buf_free(kvlink_nccl_t *pair, kvlink_nccl_buf_t *b)
{
    if (b->prev != NULL)
        b->prev->next = b->next;
    else
        pair->bufs = b->next;
    if (b->next != NULL)
        b->next->prev = b->prev;
    if (b->alen != 0) {
        kvlink_pool_free(&pair->pool, b->off, b->alen);
        pair->stats.pool_used_bytes -= b->alen;
    } else if (b->ptr != NULL) {
        pair->ops->mem_free(pair->be, b->ptr);
    }
    if (b->delivered)
        pair->stats.bufs_out--;
    rreq_t *r = b->req;
    free(b);
    if (r != NULL) {
        r->refs--;
        rreq_maybe_free(pair, r);
    }
}

void kvlink_nccl_buf_release(kvlink_nccl_buf_t *buf)
{
    if (buf == NULL)
        return;
    kvlink_nccl_t *pair = buf->pair;
    rreq_t *r = buf->req;
    if (r != NULL && !r->ended) {
        r->outstanding -= buf->len;
        if (pair->state != PAIR_FAILED &&
            q_push(pair, KVLINK_NCCL_E_CREDIT, r->id, FY_OK, buf->len) != FY_OK)
            rreq_fail(pair, r, FY_ERR_NO_MEMORY);
    }
    buf_free(pair, buf);
}

uint32_t kvlink_nccl_buf_crc(const kvlink_nccl_buf_t *buf)
{
    return buf->crc;
}

fy_status_t kvlink_nccl_recv_expect(kvlink_nccl_t *pair, uint64_t request_id,
                                    const kvlink_nccl_recv_params_t *params)
{
    if (pair == NULL || params == NULL)
        return FY_ERR_INVALID_ARG;
    if (pair->params.role != KVLINK_NCCL_RECEIVER || pair->state == PAIR_FAILED)
        return FY_ERR_STATE;
    if (params->credit_bytes == 0 || params->credit_bytes > pair->params.recv_pool_bytes)
        return FY_ERR_INVALID_ARG;
    if (rreq_find(pair, request_id) != NULL)
        return FY_ERR_EXISTS;
    if (pair->credit_reserved + params->credit_bytes > pair->params.recv_pool_bytes)
        return FY_ERR_RESOURCE_EXHAUSTED;
    rreq_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return FY_ERR_NO_MEMORY;
    r->id = request_id;
    r->window = params->credit_bytes;
    r->deadline_ns = params->deadline_ns;
    r->next = pair->rreqs;
    if (pair->rreqs != NULL)
        pair->rreqs->prev = r;
    pair->rreqs = r;
    pair->credit_reserved += r->window;
    pair->stats.recv_reqs++;
    return FY_OK;
}

fy_status_t kvlink_nccl_recv_cancel(kvlink_nccl_t *pair, uint64_t request_id)
{
    if (pair == NULL)
        return FY_ERR_INVALID_ARG;
    rreq_t *r = rreq_find(pair, request_id);
    if (r == NULL)
        return FY_ERR_NOT_FOUND;
    rreq_fail(pair, r, FY_ERR_CANCELLED);
    return FY_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Send side                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static kvlink_nccl_send_t *sreq_find(kvlink_nccl_t *pair, uint64_t id)
{
    for (kvlink_nccl_send_t *s = pair->sreqs; s != NULL; s = s->next)
        if (s->id == id)
            return s;
    return NULL;
}

static void sreq_maybe_free(kvlink_nccl_t *pair, kvlink_nccl_send_t *s)
{
    if (s->ended && s->inflight == 0) {
        pair->stats.send_reqs--;
        free(s);
    }
}

/* Ends a send request once: fails its queued frames, then on_end. */
static void sreq_end(kvlink_nccl_t *pair, kvlink_nccl_send_t *s, fy_status_t st)
{
    if (s->ended)
        return;
    s->ended = true;
    s->end_st = st;
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        pair->sreqs = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->inflight++; // keeps s alive through the callbacks below
    while (s->head != NULL) {
        sframe_t *f = s->head;
        s->head = f->next;
        pair->stats.frames_queued--;
        if (f->on_done != NULL)
            f->on_done(s, st == FY_OK ? FY_ERR_INTERNAL : st, f->arg);
        free(f);
    }
    s->tail = NULL;
    if (s->params.on_end != NULL)
        s->params.on_end(s, st, s->params.arg);
    s->inflight--;
    sreq_maybe_free(pair, s);
}

fy_status_t kvlink_nccl_send_open(kvlink_nccl_t *pair, uint64_t request_id,
                                  const kvlink_nccl_send_params_t *params,
                                  kvlink_nccl_send_t **req_p)
{
    if (pair == NULL || req_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (pair->params.role != KVLINK_NCCL_SENDER || pair->state == PAIR_FAILED)
        return FY_ERR_STATE;
    if (sreq_find(pair, request_id) != NULL)
        return FY_ERR_EXISTS;
    kvlink_nccl_send_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    s->pair = pair;
    s->id = request_id;
    if (params != NULL)
        s->params = *params;
    fy_status_t st = q_push(pair, KVLINK_NCCL_E_OPEN, request_id, FY_OK, 0);
    if (st != FY_OK) {
        free(s);
        return st;
    }
    s->next = pair->sreqs;
    if (pair->sreqs != NULL)
        pair->sreqs->prev = s;
    pair->sreqs = s;
    pair->stats.send_reqs++;
    *req_p = s;
    return FY_OK;
}

fy_status_t kvlink_nccl_send_frame_crc(kvlink_nccl_send_t *req, uint32_t layer, const void *data,
                                       size_t len, uint32_t crc, kvlink_nccl_frame_done_cb on_done,
                                       void *arg)
{
    if (req == NULL || data == NULL || len == 0 || len > req->pair->params.max_frame_bytes)
        return FY_ERR_INVALID_ARG;
    if (req->ended || req->finished)
        return FY_ERR_STATE;
    if (req->granted && len > req->window)
        return FY_ERR_OUT_OF_RANGE; // larger than the receiver's whole window: could never go
    if (req->n_frames == UINT32_MAX)
        return FY_ERR_OUT_OF_RANGE;
    sframe_t *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return FY_ERR_NO_MEMORY;
    f->layer = layer;
    f->crc = crc;
    f->data = data;
    f->len = len;
    f->on_done = on_done;
    f->arg = arg;
    if (req->tail != NULL)
        req->tail->next = f;
    else
        req->head = f;
    req->tail = f;
    req->n_frames++;
    req->n_bytes += len;
    req->pair->stats.frames_queued++;
    return FY_OK;
}

fy_status_t kvlink_nccl_send_frame(kvlink_nccl_send_t *req, uint32_t layer, const void *data,
                                   size_t len, kvlink_nccl_frame_done_cb on_done, void *arg)
{
    return kvlink_nccl_send_frame_crc(req, layer, data, len, 0, on_done, arg);
}

fy_status_t kvlink_nccl_send_finish(kvlink_nccl_send_t *req)
{
    if (req == NULL)
        return FY_ERR_INVALID_ARG;
    if (req->ended || req->finished)
        return FY_ERR_STATE;
    req->finished = true;
    return FY_OK;
}

void kvlink_nccl_send_cancel(kvlink_nccl_send_t *req)
{
    if (req == NULL || req->ended)
        return;
    kvlink_nccl_t *pair = req->pair;
    if (pair->state != PAIR_FAILED)
        (void)q_push(pair, KVLINK_NCCL_E_CANCEL, req->id, FY_ERR_CANCELLED, 0);
    sreq_end(pair, req, FY_ERR_CANCELLED);
}

/* ------------------------------------------------------------------------------------------ */
/* Pair failure                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Completes (sender) or frees (receiver) the frames of a slot array after a failure or a
 * completed round. */
static void slots_drop(kvlink_nccl_t *pair, slot_t *slots, size_t n, fy_status_t st)
{
    for (size_t i = 0; i < n; i++) {
        slot_t *sl = &slots[i];
        if (sl->sreq != NULL) {
            kvlink_nccl_send_t *s = sl->sreq;
            if (sl->frame->on_done != NULL)
                sl->frame->on_done(s, st, sl->frame->arg);
            free(sl->frame);
            s->inflight--;
            pair->stats.frames_in_flight--;
            sreq_maybe_free(pair, s);
        } else {
            pair->stats.frames_in_flight--;
            if (sl->buf != NULL)
                buf_free(pair, sl->buf);
        }
    }
}

/* The pair is dead: stop NCCL, fail every request with st, report once. */
static void pair_fail(kvlink_nccl_t *pair, fy_status_t st, const char *why)
{
    if (pair->state == PAIR_FAILED)
        return;
    fy_log(st == FY_ERR_CLOSED ? FY_LOG_DEBUG : FY_LOG_WARN, MOD,
           "pair (device %d, %s) failed: %s: %s", pair->params.device,
           pair->params.role == KVLINK_NCCL_SENDER ? "sender" : "receiver", fy_status_str(st), why);
    pair->state = PAIR_FAILED;
    pair->fail_st = st;
    pair->ops->abort(pair->be);
    pair->in_flight = false;
    pair->q_len = 0;
    size_t n_cur = pair->n_cur, n_next = pair->n_next;
    pair->n_cur = pair->n_next = 0;
    slots_drop(pair, pair->cur, n_cur, st);
    slots_drop(pair, pair->next, n_next, st);
    while (pair->sreqs != NULL)
        sreq_end(pair, pair->sreqs, st);
    while (pair->rreqs != NULL)
        rreq_end(pair, pair->rreqs, st);
    if (pair->params.on_peer != NULL)
        pair->params.on_peer(pair, st, why, pair->params.cb_arg);
}

/* ------------------------------------------------------------------------------------------ */
/* Rounds                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Sender: announces frames within credits, then END for finished requests. */
static void announce_frames(kvlink_nccl_t *pair, kvlink_nccl_ctl_t *ctl)
{
    // Oldest requests first: the list is newest-first, so walk to the tail.
    kvlink_nccl_send_t *s = pair->sreqs;
    while (s != NULL && s->next != NULL)
        s = s->next;
    for (; s != NULL; s = s->prev) {
        if (!s->granted)
            continue;
        while (s->head != NULL && pair->n_next < KVLINK_NCCL_MAX_XFERS &&
               ctl->n_entries < KVLINK_NCCL_MAX_ENTRIES) {
            sframe_t *f = s->head;
            if (f->len > s->credit) {
                if (!f->stalled) {
                    f->stalled = true;
                    pair->stats.credit_stalls++;
                }
                break;
            }
            s->head = f->next;
            if (s->head == NULL)
                s->tail = NULL;
            f->next = NULL;
            s->credit -= f->len;
            s->inflight++;
            pair->stats.frames_queued--;
            pair->stats.frames_in_flight++;
            pair->next[pair->n_next++] = (slot_t){.sreq = s, .frame = f, .len = f->len};
            ctl->entries[ctl->n_entries++] = (kvlink_nccl_entry_t){.type = KVLINK_NCCL_E_FRAME,
                                                                   .request_id = s->id,
                                                                   .layer = f->layer,
                                                                   .crc = f->crc,
                                                                   .bytes = f->len};
        }
        if (s->finished && s->head == NULL && !s->end_sent &&
            ctl->n_entries < KVLINK_NCCL_MAX_ENTRIES) {
            s->end_sent = true;
            ctl->entries[ctl->n_entries++] = (kvlink_nccl_entry_t){.type = KVLINK_NCCL_E_END,
                                                                   .request_id = s->id,
                                                                   .layer = s->n_frames,
                                                                   .bytes = s->n_bytes};
        }
    }
}

static bool sender_has_work(const kvlink_nccl_t *pair)
{
    for (const kvlink_nccl_send_t *s = pair->sreqs; s != NULL; s = s->next) {
        if (s->granted && s->head != NULL && s->head->len <= s->credit)
            return true;
        if (s->finished && s->head == NULL && !s->end_sent)
            return true;
    }
    return false;
}

static void start_round(kvlink_nccl_t *pair, uint64_t now)
{
    kvlink_nccl_ctl_t *ctl = &pair->ctl;
    ctl->round = pair->round;
    ctl->has_hello = pair->state == PAIR_HELLO;
    ctl->compat = pair->params.compat;
    ctl->role = (uint32_t)pair->params.role;
    ctl->n_entries = 0;
    // Frames announced last round go now; this round's announcements go next round.
    memcpy(pair->cur, pair->next, pair->n_next * sizeof(slot_t));
    pair->n_cur = pair->n_next;
    pair->n_next = 0;
    while (pair->q_len > 0 && ctl->n_entries < KVLINK_NCCL_MAX_ENTRIES) {
        ctl->entries[ctl->n_entries++] = pair->q[pair->q_head];
        pair->q_head = (pair->q_head + 1) % pair->q_cap;
        pair->q_len--;
    }
    if (pair->params.role == KVLINK_NCCL_SENDER && pair->state == PAIR_READY)
        announce_frames(pair, ctl);
    kvlink_nccl_ctl_pack(ctl, pair->ctl_out);

    kvlink_nccl_xfer_t xfers[KVLINK_NCCL_MAX_XFERS];
    for (size_t i = 0; i < pair->n_cur; i++) {
        slot_t *sl = &pair->cur[i];
        if (sl->sreq != NULL)
            xfers[i] = (kvlink_nccl_xfer_t){(void *)sl->frame->data, sl->len};
        else
            xfers[i] =
                (kvlink_nccl_xfer_t){sl->buf != NULL ? sl->buf->ptr : pair->scratch, sl->len};
    }
    pair->busy = ctl->n_entries > 0 || pair->n_cur > 0;
    fy_status_t st = pair->ops->post_round(pair->be, xfers, pair->n_cur,
                                           pair->params.role == KVLINK_NCCL_SENDER, pair->ctl_out);
    if (st != FY_OK) {
        pair_fail(pair, st == FY_ERR_NO_MEMORY ? st : FY_ERR_UNAVAILABLE, "posting a round failed");
        return;
    }
    pair->in_flight = true;
    pair->round_start_ns = now;
    pair->round++;
}

/* Receiver: one FRAME entry; always takes a slot so the receives match the sends. */
static fy_status_t on_frame_entry(kvlink_nccl_t *pair, const kvlink_nccl_entry_t *e)
{
    if (pair->n_next >= KVLINK_NCCL_MAX_XFERS)
        return FY_ERR_PROTOCOL;
    if (e->bytes == 0 || e->bytes > pair->params.max_frame_bytes)
        return FY_ERR_PROTOCOL;
    size_t len = (size_t)e->bytes;
    slot_t *sl = &pair->next[pair->n_next++];
    *sl = (slot_t){.len = len};
    pair->stats.frames_in_flight++;
    rreq_t *r = rreq_find(pair, e->request_id);
    if (r == NULL || !r->opened) {
        // Cancelled or timed out here while the frame was on its way: dropped.
        return FY_OK;
    }
    if (r->outstanding + len > r->window) {
        pair->stats.credit_violations++;
        FY_LOG_WARN(MOD, "request %llu: frame of %zu bytes beyond the window",
                    (unsigned long long)r->id, len);
        rreq_fail(pair, r, FY_ERR_PROTOCOL);
        return FY_OK;
    }
    kvlink_nccl_buf_t *b = calloc(1, sizeof(*b));
    if (b == NULL) {
        rreq_fail(pair, r, FY_ERR_NO_MEMORY);
        return FY_OK;
    }
    b->pair = pair;
    b->len = len;
    b->crc = e->crc;
    b->layer = e->layer;
    size_t off, alen;
    if (pair->pool_ok && kvlink_pool_alloc(&pair->pool, len, &off, &alen) == FY_OK) {
        b->off = off;
        b->alen = alen;
        b->ptr = (uint8_t *)pair->pool_base + off;
        pair->stats.pool_used_bytes += alen;
    } else if (pair->ops->mem_alloc(pair->be, len, &b->ptr) != FY_OK) {
        // Credits are reserved from the pool, so only fragmentation gets here.
        free(b);
        rreq_fail(pair, r, FY_ERR_RESOURCE_EXHAUSTED);
        return FY_OK;
    }
    b->req = r;
    r->refs++;
    r->outstanding += len;
    r->n_announced++;
    if (r->outstanding > pair->stats.max_outstanding)
        pair->stats.max_outstanding = r->outstanding;
    b->next = pair->bufs;
    if (pair->bufs != NULL)
        pair->bufs->prev = b;
    pair->bufs = b;
    sl->buf = b;
    return FY_OK;
}

/* Applies the peer's entries. A return other than FY_OK fails the pair. */
static fy_status_t apply_entries(kvlink_nccl_t *pair, const kvlink_nccl_ctl_t *ctl)
{
    bool sender = pair->params.role == KVLINK_NCCL_SENDER;
    for (size_t i = 0; i < ctl->n_entries && pair->state != PAIR_FAILED; i++) {
        const kvlink_nccl_entry_t *e = &ctl->entries[i];
        if (sender) {
            kvlink_nccl_send_t *s = sreq_find(pair, e->request_id);
            if (e->type == KVLINK_NCCL_E_CREDIT) {
                if (s == NULL)
                    continue; // ended here meanwhile
                if (e->bytes == 0 || e->bytes > (uint64_t)1 << 48) {
                    pair->stats.rejected++;
                    continue;
                }
                s->credit += e->bytes;
                if (!s->granted) {
                    s->granted = true;
                    s->window = e->bytes;
                    // A queued frame larger than the whole window could never go.
                    for (const sframe_t *f = s->head; f != NULL; f = f->next) {
                        if (f->len > s->window) {
                            (void)q_push(pair, KVLINK_NCCL_E_CANCEL, s->id, FY_ERR_OUT_OF_RANGE, 0);
                            sreq_end(pair, s, FY_ERR_OUT_OF_RANGE);
                            break;
                        }
                    }
                }
            } else if (e->type == KVLINK_NCCL_E_STATUS) {
                fy_status_t st = kvlink_status_from_wire(e->status);
                if (s == NULL)
                    continue;
                if (st == FY_OK && !s->end_sent) {
                    pair->stats.rejected++;
                    st = FY_ERR_PROTOCOL;
                }
                sreq_end(pair, s, st);
            } else {
                pair->stats.rejected++;
            }
            continue;
        }
        rreq_t *r = rreq_find(pair, e->request_id);
        switch (e->type) {
        case KVLINK_NCCL_E_OPEN:
            if (r == NULL) {
                pair->stats.rejected++;
                (void)q_push(pair, KVLINK_NCCL_E_STATUS, e->request_id, FY_ERR_NOT_FOUND, 0);
            } else if (r->opened) {
                pair->stats.rejected++;
                (void)q_push(pair, KVLINK_NCCL_E_STATUS, e->request_id, FY_ERR_EXISTS, 0);
            } else {
                r->opened = true;
                if (q_push(pair, KVLINK_NCCL_E_CREDIT, r->id, FY_OK, r->window) != FY_OK)
                    rreq_end(pair, r, FY_ERR_NO_MEMORY);
            }
            break;
        case KVLINK_NCCL_E_FRAME: {
            fy_status_t st = on_frame_entry(pair, e);
            if (st != FY_OK)
                return st;
            break;
        }
        case KVLINK_NCCL_E_END:
            if (r == NULL || !r->opened) {
                continue; // cancelled here meanwhile
            }
            if (r->end_seen) {
                pair->stats.rejected++;
                rreq_fail(pair, r, FY_ERR_PROTOCOL);
                break;
            }
            r->end_seen = true;
            r->end_frames = e->layer;
            r->end_bytes = e->bytes;
            rreq_check_done(pair, r);
            break;
        case KVLINK_NCCL_E_CANCEL: {
            if (r == NULL || !r->opened)
                continue;
            fy_status_t st = kvlink_status_from_wire(e->status);
            rreq_end(pair, r, st == FY_OK || st == FY_ERR_PROTOCOL ? FY_ERR_CANCELLED : st);
            break;
        }
        default:
            pair->stats.rejected++;
            break;
        }
    }
    return FY_OK;
}

/* The round in flight completed: finish its frames, then apply the peer's block. */
static void complete_round(kvlink_nccl_t *pair, uint64_t now)
{
    pair->in_flight = false;
    pair->stats.rounds++;
    size_t n = pair->n_cur;
    pair->n_cur = 0;
    for (size_t i = 0; i < n; i++) {
        slot_t *sl = &pair->cur[i];
        if (sl->sreq != NULL) {
            kvlink_nccl_send_t *s = sl->sreq;
            pair->stats.frames_sent++;
            pair->stats.frames_in_flight--;
            if (sl->frame->on_done != NULL)
                sl->frame->on_done(s, s->ended && s->end_st != FY_OK ? s->end_st : FY_OK,
                                   sl->frame->arg);
            free(sl->frame);
            s->inflight--;
            sreq_maybe_free(pair, s);
            continue;
        }
        pair->stats.frames_in_flight--;
        kvlink_nccl_buf_t *b = sl->buf;
        if (b == NULL) {
            pair->stats.frames_discarded++;
            continue;
        }
        rreq_t *r = b->req;
        if (r->ended) {
            pair->stats.frames_discarded++;
            buf_free(pair, b);
            continue;
        }
        b->delivered = true;
        r->n_delivered++;
        r->bytes_delivered += b->len;
        pair->stats.bufs_out++;
        pair->stats.frames_delivered++;
        pair->stats.bytes_delivered += b->len;
        r->refs++; // r survives the callback even if the application cancels it there
        if (pair->params.on_frame != NULL)
            pair->params.on_frame(pair, r->id, b->layer, b, b->ptr, b->len, pair->params.cb_arg);
        else
            kvlink_nccl_buf_release(b);
        rreq_check_done(pair, r);
        r->refs--;
        rreq_maybe_free(pair, r);
    }
    if (pair->state == PAIR_FAILED)
        return;

    kvlink_nccl_ctl_t *ctl = &pair->ctl;
    if (kvlink_nccl_ctl_unpack(pair->ctl_in, ctl) != FY_OK) {
        pair_fail(pair, FY_ERR_PROTOCOL, "malformed control block");
        return;
    }
    if (ctl->round != pair->round - 1) {
        pair_fail(pair, FY_ERR_PROTOCOL, "rounds out of step");
        return;
    }
    if (pair->state == PAIR_HELLO) {
        const kvlink_compat_t *a = &pair->params.compat, *b = &ctl->compat;
        const char *why = NULL;
        if (!ctl->has_hello)
            why = "no compatibility record";
        else if (ctl->role == (uint32_t)pair->params.role || ctl->role > 1)
            why = "both ends have the same role";
        else if (b->protocol_version != a->protocol_version)
            why = "protocol versions differ";
        else if (b->codec_version != a->codec_version)
            why = "codec versions differ";
        else if (a->page_size != 0 && b->page_size != 0 && a->page_size != b->page_size)
            why = "page sizes differ";
        else if (b->model_fingerprint != a->model_fingerprint)
            why = "models differ";
        if (why != NULL) {
            pair_fail(pair, FY_ERR_MISMATCH, why);
            return;
        }
        pair->state = PAIR_READY;
        if (pair->params.on_peer != NULL)
            pair->params.on_peer(pair, FY_OK, "connected", pair->params.cb_arg);
        if (pair->state != PAIR_READY)
            return;
    } else if (ctl->has_hello) {
        pair_fail(pair, FY_ERR_PROTOCOL, "compatibility record after the handshake");
        return;
    }
    if (ctl->n_entries > 0)
        pair->busy = true;
    fy_status_t st = apply_entries(pair, ctl);
    if (st != FY_OK) {
        pair_fail(pair, st, "peer announced frames that cannot be matched");
        return;
    }
    pair->next_round_ns = now + (uint64_t)pair->params.idle_round_us * 1000u;
}

static void sweep_deadlines(kvlink_nccl_t *pair, uint64_t now)
{
    for (kvlink_nccl_send_t *s = pair->sreqs, *nx; s != NULL; s = nx) {
        nx = s->next;
        if (s->params.deadline_ns != 0 && now >= s->params.deadline_ns) {
            (void)q_push(pair, KVLINK_NCCL_E_CANCEL, s->id, FY_ERR_TIMEOUT, 0);
            sreq_end(pair, s, FY_ERR_TIMEOUT);
            nx = pair->sreqs; // the callback may have ended others: start over
        }
    }
    for (rreq_t *r = pair->rreqs, *nx; r != NULL; r = nx) {
        nx = r->next;
        if (r->deadline_ns != 0 && now >= r->deadline_ns) {
            rreq_fail(pair, r, FY_ERR_TIMEOUT);
            nx = pair->rreqs;
        }
    }
}

fy_status_t kvlink_nccl_progress(kvlink_nccl_t *pair)
{
    if (pair == NULL)
        return FY_ERR_INVALID_ARG;
    if (pair->state == PAIR_FAILED)
        return pair->fail_st;
    uint64_t now = fy_clock_ns();
    if (pair->state == PAIR_INIT) {
        fy_status_t st = pair->ops->init_test(pair->be);
        if (st == FY_ERR_AGAIN) {
            if (now - pair->created_ns > (uint64_t)pair->params.init_timeout_ms * 1000000u)
                pair_fail(pair, FY_ERR_TIMEOUT, "the peer did not join the communicator");
            sweep_deadlines(pair, now);
            return pair->state == PAIR_FAILED ? pair->fail_st : FY_OK;
        }
        if (st != FY_OK) {
            pair_fail(pair, FY_ERR_UNAVAILABLE, "communicator set-up failed");
            return pair->fail_st;
        }
        pair->state = PAIR_HELLO;
    }
    if (pair->in_flight) {
        fy_status_t st = pair->ops->test_round(pair->be, pair->ctl_in);
        if (st == FY_OK) {
            complete_round(pair, now);
        } else if (st == FY_ERR_AGAIN) {
            uint64_t limit = pair->state == PAIR_HELLO
                                 ? (uint64_t)pair->params.init_timeout_ms * 1000000u
                                 : (uint64_t)pair->params.peer_timeout_ms * 1000000u;
            uint64_t since = pair->state == PAIR_HELLO ? pair->created_ns : pair->round_start_ns;
            if (now - since > limit)
                pair_fail(pair, pair->state == PAIR_HELLO ? FY_ERR_TIMEOUT : FY_ERR_UNAVAILABLE,
                          "the peer did not complete a round in time");
        } else {
            pair_fail(pair, FY_ERR_UNAVAILABLE, "communicator error");
        }
    }
    if (pair->state == PAIR_FAILED)
        return pair->fail_st;
    sweep_deadlines(pair, now);
    if (!pair->in_flight) {
        // A receiver that expects requests keeps a round posted, so the sender's OPEN (and
        // everything after it) completes as soon as the sender posts it, not an idle round
        // later; the round waits for the sender's side meanwhile.
        bool work = pair->state == PAIR_HELLO || pair->busy || pair->q_len > 0 ||
                    pair->n_next > 0 ||
                    (pair->params.role == KVLINK_NCCL_SENDER && sender_has_work(pair)) ||
                    (pair->params.role == KVLINK_NCCL_RECEIVER && pair->rreqs != NULL);
        if (work || now >= pair->next_round_ns)
            start_round(pair, now);
    }
    return pair->state == PAIR_FAILED ? pair->fail_st : FY_OK;
}

bool kvlink_nccl_moving(const kvlink_nccl_t *pair)
{
    return pair != NULL && pair->state != PAIR_FAILED &&
           (pair->stats.frames_in_flight > 0 || pair->stats.frames_queued > 0);
}

bool kvlink_nccl_ready(const kvlink_nccl_t *pair)
{
    return pair != NULL && pair->state == PAIR_READY;
}

/* ------------------------------------------------------------------------------------------ */
/* Create / destroy                                                                            */
/* ------------------------------------------------------------------------------------------ */

fy_status_t kvlink_nccl_create_ops(const kvlink_nccl_ops_t *ops, void *be,
                                   const kvlink_nccl_params_t *params, kvlink_nccl_t **pair_p)
{
    fy_status_t st = FY_ERR_INVALID_ARG;
    if (ops == NULL || be == NULL || params == NULL || pair_p == NULL)
        goto err_be;
    if ((params->role != KVLINK_NCCL_SENDER && params->role != KVLINK_NCCL_RECEIVER) ||
        params->max_frame_bytes == 0 || params->peer_timeout_ms == 0 ||
        params->init_timeout_ms == 0 ||
        (params->role == KVLINK_NCCL_RECEIVER && params->recv_pool_bytes == 0))
        goto err_be;
    st = FY_ERR_NO_MEMORY;
    kvlink_nccl_t *pair = calloc(1, sizeof(*pair));
    if (pair == NULL)
        goto err_be;
    pair->ops = ops;
    pair->be = be;
    pair->params = *params;
    pair->state = PAIR_INIT;
    pair->created_ns = fy_clock_ns();
    if (params->role == KVLINK_NCCL_RECEIVER) {
        st = ops->mem_alloc(be, params->recv_pool_bytes, &pair->pool_base);
        if (st != FY_OK)
            goto err_pair;
        st = kvlink_pool_init(&pair->pool, params->recv_pool_bytes);
        if (st != FY_OK)
            goto err_pool_mem;
        pair->pool_ok = true;
        st = ops->mem_alloc(be, params->max_frame_bytes, &pair->scratch);
        if (st != FY_OK)
            goto err_pool;
    }
    *pair_p = pair;
    return FY_OK;

err_pool: // undo kvlink_pool_init
    kvlink_pool_cleanup(&pair->pool);
err_pool_mem: // undo the pool's device memory
    ops->mem_free(be, pair->pool_base);
err_pair: // undo the pair itself
    free(pair);
err_be: // the backend was taken
    if (ops != NULL && be != NULL) {
        ops->abort(be);
        ops->destroy(be);
    }
    return st;
}

void kvlink_nccl_destroy(kvlink_nccl_t *pair)
{
    if (pair == NULL)
        return;
    if (pair->state != PAIR_FAILED) {
        pair->params.on_peer = NULL; // the owner asked for it: no failure report
        pair_fail(pair, FY_ERR_CLOSED, "destroyed");
    }
    while (pair->bufs != NULL)
        buf_free(pair, pair->bufs);
    if (pair->scratch != NULL)
        pair->ops->mem_free(pair->be, pair->scratch);
    if (pair->pool_ok)
        kvlink_pool_cleanup(&pair->pool);
    if (pair->pool_base != NULL)
        pair->ops->mem_free(pair->be, pair->pool_base);
    pair->ops->destroy(pair->be);
    free(pair->q);
    free(pair);
}

void kvlink_nccl_stats(const kvlink_nccl_t *pair, kvlink_nccl_stats_t *stats_p)
{
    *stats_p = pair->stats;
    stats_p->credit_reserved = pair->credit_reserved;
}
