/*
 * rig.h: two kvlink links on one loop (a receiver listening on 127.0.0.1 and a sender), with
 * recorders for every callback. Used by the in-process loopback tests.
 */
#ifndef FERRY_TEST_KVLINK_RIG_H
#define FERRY_TEST_KVLINK_RIG_H

#include "harness.h"

#define RIG_MAX_REQ 16
#define RIG_MAX_HELD 4096

typedef struct {
    uv_loop_t loop;
    kvlink_ctx_t *ctx;
    kvlink_t *rx, *tx;
    char addr[64];
    // receiver records
    kvlink_buf_t *held[RIG_MAX_HELD]; /* delivered, not yet released */
    size_t n_held;
    uint64_t frames_ok, frames_bad, bytes_rx;
    uint64_t frames_in_pool; /* delivered inside kvlink_recv_pool's memory */
    uint64_t rx_end_id[RIG_MAX_REQ];
    fy_status_t rx_end_st[RIG_MAX_REQ];
    int n_rx_end;
    bool release_inline; /* release in the callback instead of holding */
    // sender records
    int n_tx_end;
    fy_status_t tx_end_st[RIG_MAX_REQ];
    uint64_t frames_done_ok, frames_done_err;
    fy_status_t last_frame_err;
    // peer records
    int n_peer;
    fy_status_t peer_st;
    char peer_msg[256];
} rig_t;

static inline void rig_on_frame(kvlink_t *link, uint64_t request_id, uint32_t layer, kvlink_buf_t *buf,
                         const void *data, size_t len, void *arg)
{
    rig_t *r = arg;
    if (h_check(data, len, request_id, layer))
        r->frames_ok++;
    else
        r->frames_bad++;
    r->bytes_rx += len;
    void *pool = NULL;
    size_t pool_len = 0;
    kvlink_recv_pool(link, &pool, &pool_len);
    const uint8_t *p = data, *lo = pool;
    if (pool != NULL && p >= lo && len <= pool_len && (size_t)(p - lo) <= pool_len - len)
        r->frames_in_pool++;
    if (r->release_inline || r->n_held == RIG_MAX_HELD)
        kvlink_buf_release(buf);
    else
        r->held[r->n_held++] = buf;
}

static inline void rig_on_recv_end(kvlink_t *link, uint64_t request_id, fy_status_t st, void *arg)
{
    rig_t *r = arg;
    if (r->n_rx_end < RIG_MAX_REQ) {
        r->rx_end_id[r->n_rx_end] = request_id;
        r->rx_end_st[r->n_rx_end] = st;
    }
    r->n_rx_end++;
}

static inline void rig_on_peer(kvlink_t *link, const char *addr, fy_status_t st, const char *msg,
                        void *arg)
{
    rig_t *r = arg;
    r->n_peer++;
    r->peer_st = st;
    snprintf(r->peer_msg, sizeof(r->peer_msg), "%s", msg ? msg : "");
}

static inline void rig_on_send_end(kvlink_send_t *req, fy_status_t st, void *arg)
{
    rig_t *r = arg;
    if (r->n_tx_end < RIG_MAX_REQ)
        r->tx_end_st[r->n_tx_end] = st;
    r->n_tx_end++;
}

static inline void rig_release_all(rig_t *r)
{
    for (size_t i = 0; i < r->n_held; i++)
        kvlink_buf_release(r->held[i]);
    r->n_held = 0;
}

/* Creates both links; rx_tweak/tx_tweak may adjust the parameters first (may be NULL). */
static inline fy_status_t rig_init(rig_t *r, void (*rx_tweak)(kvlink_params_t *),
                                   void (*tx_tweak)(kvlink_params_t *))
{
    memset(r, 0, sizeof(*r));
    uv_loop_init(&r->loop);
    fy_status_t st = kvlink_ctx_create(NULL, &r->ctx);
    if (st != FY_OK)
        return st;
    kvlink_params_t p;
    kvlink_params_default(&p);
    p.compat.model_fingerprint = 0x1234abcdull;
    p.compat.codec_version = 3;
    p.compat.page_size = 4096;
    p.recv_pool_bytes = 64u << 20;
    p.max_frame_bytes = 8u << 20;
    p.on_frame = rig_on_frame;
    p.on_recv_end = rig_on_recv_end;
    p.on_peer = rig_on_peer;
    p.cb_arg = r;
    kvlink_params_t rp = p;
    if (rx_tweak != NULL)
        rx_tweak(&rp);
    st = kvlink_create(r->ctx, &r->loop, &rp, &r->rx);
    if (st != FY_OK)
        return st;
    kvlink_params_t tp = p;
    tp.recv_pool_bytes = 0;
    tp.compat.page_size = 0; // a pure sender has no pages
    if (tx_tweak != NULL)
        tx_tweak(&tp);
    st = kvlink_create(r->ctx, &r->loop, &tp, &r->tx);
    if (st != FY_OK)
        return st;
    uint16_t port = 0;
    st = kvlink_listen(r->rx, "127.0.0.1", 0, &port);
    if (st != FY_OK)
        return st;
    snprintf(r->addr, sizeof(r->addr), "127.0.0.1:%u", port);
    return FY_OK;
}

static inline void rig_fini(rig_t *r)
{
    rig_release_all(r);
    kvlink_destroy(r->tx);
    kvlink_destroy(r->rx);
    kvlink_ctx_destroy(r->ctx);
    h_loop_close(&r->loop);
}

/* Counters that must come back to zero once everything is over. */
static inline bool rig_idle(const kvlink_t *link)
{
    kvlink_stats_t s;
    kvlink_stats(link, &s);
    return s.send_reqs == 0 && s.recv_reqs == 0 && s.frames_in_flight == 0 &&
           s.frames_queued == 0 && s.recv_pending == 0 && s.bufs_out == 0 &&
           s.pool_used_bytes == 0 && s.credit_reserved == 0;
}

#endif /* FERRY_TEST_KVLINK_RIG_H */
