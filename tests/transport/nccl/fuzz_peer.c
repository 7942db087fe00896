// Fuzz target: one end of an NCCL link pair (the protocol core) against a hostile peer. The
// first input byte picks the end under test, a sender with two requests and frames queued or a
// receiver expecting two requests; its backend plays the peer from the rest of the input. Each
// round the peer's control block is built from the next input bytes: mostly a well-formed
// block (the round number the pair expects, a matching compatibility record in the first
// round) whose entries carry fuzzed types, request ids, statuses, layers and lengths, so that
// they reach the protocol's rules; sometimes a wrong round, a missing or mismatched record, or
// raw bytes. Frames arrive filled with a pattern. The application releases some buffers at
// once, holds others, and destroys the pair at the end. Never a crash, a leak, undefined
// behaviour, or a frame delivered beyond its request's window.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "nccl_link_int.h"

#define MAX_FRAME (64u << 10)
#define HELD_MAX  4

typedef struct {
    const uint8_t *data;
    size_t size, pos;
    bool posted, send;
    kvlink_nccl_xfer_t xfers[KVLINK_NCCL_MAX_XFERS];
    size_t n;
    uint64_t rounds; // rounds posted so far
    uint32_t role;   // of the end under test
    kvlink_compat_t compat;
} peer_t;

static uint8_t take(peer_t *p)
{
    return p->pos < p->size ? p->data[p->pos++] : 0;
}

static uint32_t take32(peer_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v = v << 8 | take(p);
    return v;
}

static fy_status_t peer_init_test(void *arg)
{
    (void)arg;
    return FY_OK;
}

static fy_status_t peer_post_round(void *arg, const kvlink_nccl_xfer_t *xfers, size_t n, bool send,
                                   const uint8_t *ctl_out)
{
    peer_t *p = arg;
    (void)ctl_out;
    if (p->posted || n > KVLINK_NCCL_MAX_XFERS)
        abort(); // the core posts one round at a time, within its limit
    memcpy(p->xfers, xfers, n * sizeof(*xfers));
    p->n = n;
    p->send = send;
    p->posted = true;
    p->rounds++;
    return FY_OK;
}

/* The peer's side of the round: receives filled, its control block from the input. A peer
 * with no input left never completes the round (a hung peer). */
static fy_status_t peer_test_round(void *arg, uint8_t *ctl_in)
{
    peer_t *p = arg;
    if (!p->posted || p->pos >= p->size)
        return FY_ERR_AGAIN;
    if (!p->send)
        for (size_t i = 0; i < p->n; i++)
            memset(p->xfers[i].ptr, 0x5a, p->xfers[i].len);
    const uint8_t mode = take(p);
    if (mode >= 0xf8) { // raw bytes: mostly malformed
        memset(ctl_in, 0, KVLINK_NCCL_CTL_BYTES);
        size_t n =
            p->size - p->pos < KVLINK_NCCL_CTL_BYTES ? p->size - p->pos : KVLINK_NCCL_CTL_BYTES;
        memcpy(ctl_in, p->data + p->pos, n);
        p->pos += n;
    } else {
        static kvlink_nccl_ctl_t ctl;
        memset(&ctl, 0, sizeof(ctl));
        ctl.round = p->rounds - 1 + (mode == 0xf0); // 0xf0: out of step
        ctl.has_hello = (p->rounds == 1) != (mode == 0xf1);
        ctl.compat = p->compat;
        if (mode == 0xf2)
            ctl.compat.model_fingerprint ^= 1;
        ctl.role = mode == 0xf3 ? p->role : 1 - p->role;
        ctl.n_entries = take(p) % 24;
        for (size_t i = 0; i < ctl.n_entries; i++) {
            kvlink_nccl_entry_t *e = &ctl.entries[i];
            const uint8_t kind = take(p), id = take(p);
            e->type = (uint8_t)(kind % 8);
            e->status = (int8_t)take(p);
            e->request_id = id & 0x80 ? (uint64_t)take32(p) << 32 | take32(p) : id % 4;
            e->layer = take(p);
            e->crc = take32(p);
            // Lengths around the frame and window sizes, or anything.
            const uint32_t b = take32(p);
            e->bytes = kind & 0x80 ? (uint64_t)b << (kind & 31) : b % (2 * MAX_FRAME + 1);
        }
        kvlink_nccl_ctl_pack(&ctl, ctl_in);
    }
    p->posted = false;
    return FY_OK;
}

static fy_status_t peer_mem_alloc(void *arg, size_t bytes, void **ptr_p)
{
    (void)arg;
    *ptr_p = malloc(bytes);
    return *ptr_p != NULL ? FY_OK : FY_ERR_NO_MEMORY;
}

static void peer_mem_free(void *arg, void *ptr)
{
    (void)arg;
    free(ptr);
}

static void peer_abort(void *arg)
{
    peer_t *p = arg;
    p->posted = false;
}

static void peer_destroy(void *arg)
{
    free(arg);
}

static const kvlink_nccl_ops_t k_peer_ops = {
    .init_test = peer_init_test,
    .post_round = peer_post_round,
    .test_round = peer_test_round,
    .mem_alloc = peer_mem_alloc,
    .mem_free = peer_mem_free,
    .abort = peer_abort,
    .destroy = peer_destroy,
};

/* The application's side. */
typedef struct {
    kvlink_nccl_send_t *sreq[2];
    kvlink_nccl_buf_t *held[HELD_MAX];
    uint64_t held_req[HELD_MAX];
    size_t held_len[HELD_MAX];
    size_t n_held, windows[3];
    size_t got[3]; // bytes delivered and not released, per expected request
    uint8_t hold_mask;
    unsigned frames;
} app_t;

static void on_frame(kvlink_nccl_t *pair, uint64_t request_id, uint32_t layer,
                     kvlink_nccl_buf_t *buf, void *data, size_t len, void *arg)
{
    app_t *a = arg;
    (void)pair;
    (void)layer;
    if (request_id < 1 || request_id > 2 || len == 0 || len > MAX_FRAME ||
        ((const uint8_t *)data)[0] != 0x5a || ((const uint8_t *)data)[len - 1] != 0x5a)
        abort(); // only expected requests deliver, with the bytes the peer sent
    a->got[request_id] += len;
    if (a->got[request_id] > a->windows[request_id])
        abort(); // beyond the credit window the receiver granted
    // Hold some (released at once or left to destroy), release the others.
    if ((a->hold_mask >> (a->frames++ % 8) & 1) && a->n_held < HELD_MAX) {
        a->held_req[a->n_held] = request_id;
        a->held_len[a->n_held] = len;
        a->held[a->n_held++] = buf;
        return;
    }
    a->got[request_id] -= len;
    kvlink_nccl_buf_release(buf);
}

static void on_recv_end(kvlink_nccl_t *pair, uint64_t request_id, fy_status_t st, void *arg)
{
    (void)pair;
    (void)st;
    (void)arg;
    if (request_id < 1 || request_id > 2)
        abort(); // ends only what was expected
}

static void on_send_end(kvlink_nccl_send_t *req, fy_status_t st, void *arg)
{
    app_t *a = arg;
    (void)st;
    for (int i = 0; i < 2; i++)
        if (a->sreq[i] == req)
            a->sreq[i] = NULL; // not to be used any more
}

/* The pair's warnings about the peer are what this target provokes: formatted, not printed. */
static void discard_line(fy_log_level_t level, const char *line, void *arg)
{
    (void)level;
    (void)line;
    (void)arg;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t frame_a[MAX_FRAME], frame_b[1000];
    static bool quiet;
    if (!quiet) {
        fy_log_set_sink(discard_line, NULL);
        quiet = true;
    }
    if (size < 2)
        return 0;
    peer_t *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return 0;
    p->data = data;
    p->size = size;
    p->pos = 2;
    const bool sender = (data[0] & 1) == 0;
    p->role = sender ? KVLINK_NCCL_SENDER : KVLINK_NCCL_RECEIVER;
    p->compat = (kvlink_compat_t){KVLINK_PROTOCOL_VERSION, 3, 16384, 0x1234};

    static app_t app;
    memset(&app, 0, sizeof(app));
    app.hold_mask = data[1];
    app.windows[1] = 2 * MAX_FRAME;
    app.windows[2] = MAX_FRAME;
    kvlink_nccl_params_t params;
    kvlink_nccl_params_default(&params);
    params.compat = p->compat;
    params.role = p->role;
    params.recv_pool_bytes = 4 * MAX_FRAME;
    params.max_frame_bytes = MAX_FRAME;
    params.idle_round_us = 0;
    params.on_frame = sender ? NULL : on_frame;
    params.on_recv_end = sender ? NULL : on_recv_end;
    params.cb_arg = &app;
    kvlink_nccl_t *pair = NULL;
    if (kvlink_nccl_create_ops(&k_peer_ops, p, &params, &pair) != FY_OK)
        return 0; // the backend was taken and freed

    if (sender) {
        kvlink_nccl_send_params_t sp;
        kvlink_nccl_send_params_default(&sp);
        sp.on_end = on_send_end;
        sp.arg = &app;
        for (uint64_t id = 1; id <= 2; id++)
            if (kvlink_nccl_send_open(pair, id, &sp, &app.sreq[id - 1]) != FY_OK)
                abort();
        for (uint32_t layer = 0; layer < 3; layer++) {
            if (app.sreq[0] != NULL)
                (void)kvlink_nccl_send_frame_crc(app.sreq[0], layer, frame_a,
                                                 layer == 1 ? MAX_FRAME : 4096, layer, NULL, NULL);
            if (app.sreq[1] != NULL)
                (void)kvlink_nccl_send_frame(app.sreq[1], layer, frame_b, sizeof(frame_b), NULL,
                                             NULL);
        }
        if (app.sreq[0] != NULL)
            (void)kvlink_nccl_send_finish(app.sreq[0]);
    } else {
        for (uint64_t id = 1; id <= 2; id++) {
            kvlink_nccl_recv_params_t rp = {.credit_bytes = app.windows[id], .deadline_ns = 0};
            if (kvlink_nccl_recv_expect(pair, id, &rp) != FY_OK)
                abort();
        }
    }
    // Rounds while the peer has input; a sender also cancels request 2 half way.
    for (int i = 0; i < 256 && p->pos < p->size; i++) {
        if (kvlink_nccl_progress(pair) != FY_OK)
            break;
        if (i == 8 && sender && app.sreq[1] != NULL)
            kvlink_nccl_send_cancel(app.sreq[1]);
        if (i == 8 && !sender && app.n_held > 0) {
            app.n_held--;
            app.got[app.held_req[app.n_held]] -= app.held_len[app.n_held];
            kvlink_nccl_buf_release(app.held[app.n_held]);
        }
    }
    kvlink_nccl_destroy(pair); // held buffers go with it
    return 0;
}
