/*
 * scenarios.h: the NCCL link's behaviour tests, shared by test_nccl_proto.c (in-memory
 * backend, any machine) and test_nccl_cuda.c (NCCL between two GPUs). A harness_t says how
 * to make a pair and how to reach frame memory; each scenario drives both ends from this
 * thread and checks what the callbacks saw: frames byte for byte, credits, cancel from either
 * side, deadlines, a refused open, a compatibility mismatch and a dead peer.
 */
#ifndef FERRY_TESTS_NCCL_SCENARIOS_H
#define FERRY_TESTS_NCCL_SCENARIOS_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common.h"
#include "nccl_link.h"

typedef struct {
    /* Makes both ends of a new pair (sender params ps, receiver params pr). */
    fy_status_t (*make_pair)(const kvlink_nccl_params_t *ps, const kvlink_nccl_params_t *pr,
                             kvlink_nccl_t **s_p, kvlink_nccl_t **r_p);
    /* Frame memory the sender can send from, holding a copy of host[len]. */
    void *(*frame_alloc)(const uint8_t *host, size_t len);
    void (*frame_free)(void *p);
    /* Copies len bytes of received frame memory to host. */
    void (*read_back)(void *host, const void *data, size_t len);
    uint32_t peer_timeout_ms;
    /* The backend itself sees a dead peer (a closed socket) before the peer timeout. */
    bool sees_peer_close;
} harness_t;

/* Set by each test's main. */
static harness_t g_h;

/* Frame memory of harnesses whose backend moves host memory. */
static inline void *scn_host_frame_alloc(const uint8_t *host, size_t len)
{
    void *p = malloc(len);
    assert_non_null(p);
    memcpy(p, host, len);
    return p;
}

static inline void scn_host_frame_free(void *p)
{
    free(p);
}

static inline void scn_host_read_back(void *host, const void *data, size_t len)
{
    memcpy(host, data, len);
}

#define N_REQ    8
#define MAX_HELD 4096

typedef struct {
    uint64_t req;
    uint32_t layer;
    kvlink_nccl_buf_t *buf;
} held_t;

typedef struct rec rec_t;

typedef struct {
    rec_t *rec;
    uint64_t id;
} sreq_ctx_t;

struct rec {
    held_t held[MAX_HELD];
    size_t n_held;
    size_t release_per_pump; /* buffers released per pump step (SIZE_MAX: at once) */
    size_t frames_rx, bad_frames, rx_per_req[N_REQ];
    uint32_t next_layer[N_REQ]; /* frames arrive in order */
    bool recv_ended[N_REQ];
    fy_status_t recv_st[N_REQ];
    bool send_ended[N_REQ];
    fy_status_t send_st[N_REQ];
    uint64_t send_end_ns[N_REQ];
    size_t done_ok, done_fail;
    int peer_calls[2];
    fy_status_t peer_st[2];
    sreq_ctx_t sctx[N_REQ];
    kvlink_nccl_t *s, *r;
};

/* Frame (req, layer): length and bytes follow from the two, so the receiver can check. */
static size_t frame_len(uint64_t req, uint32_t layer, size_t max)
{
    uint64_t x = (req * 1000003u + layer * 7919u) % max;
    return (size_t)x + 1;
}

static void frame_fill(uint8_t *p, size_t len, uint64_t req, uint32_t layer)
{
    uint64_t s = req * 0x9e3779b97f4a7c15ull + layer + 1;
    for (size_t i = 0; i < len; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (uint8_t)(s >> 56);
    }
}

static void on_frame(kvlink_nccl_t *pair, uint64_t request_id, uint32_t layer,
                     kvlink_nccl_buf_t *buf, void *data, size_t len, void *arg)
{
    (void)pair;
    rec_t *rec = arg;
    rec->frames_rx++;
    if (request_id >= N_REQ) {
        rec->bad_frames++;
        kvlink_nccl_buf_release(buf);
        return;
    }
    rec->rx_per_req[request_id]++;
    uint8_t *want = malloc(len), *got = malloc(len);
    frame_fill(want, len, request_id, layer);
    g_h.read_back(got, data, len);
    if (layer != rec->next_layer[request_id] || memcmp(want, got, len) != 0 ||
        kvlink_nccl_buf_crc(buf) != fy_crc32c(0, want, len))
        rec->bad_frames++;
    rec->next_layer[request_id] = layer + 1;
    free(want);
    free(got);
    if (rec->release_per_pump == SIZE_MAX || rec->n_held == MAX_HELD) {
        kvlink_nccl_buf_release(buf);
        return;
    }
    rec->held[rec->n_held++] = (held_t){request_id, layer, buf};
}

static void on_recv_end(kvlink_nccl_t *pair, uint64_t request_id, fy_status_t st, void *arg)
{
    (void)pair;
    rec_t *rec = arg;
    if (request_id < N_REQ) {
        assert_false(rec->recv_ended[request_id]); // exactly once
        rec->recv_ended[request_id] = true;
        rec->recv_st[request_id] = st;
    }
}

static void on_peer(kvlink_nccl_t *pair, fy_status_t st, const char *message, void *arg)
{
    (void)message;
    rec_t *rec = arg;
    int side = pair == rec->s ? 0 : 1;
    rec->peer_calls[side]++;
    rec->peer_st[side] = st;
}

static void on_send_end(kvlink_nccl_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    sreq_ctx_t *c = arg;
    assert_false(c->rec->send_ended[c->id]); // exactly once
    c->rec->send_ended[c->id] = true;
    c->rec->send_st[c->id] = st;
    c->rec->send_end_ns[c->id] = fy_clock_ns();
}

typedef struct {
    rec_t *rec;
    void *mem;
} frame_ctx_t;

static void on_frame_done(kvlink_nccl_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    frame_ctx_t *f = arg;
    if (st == FY_OK)
        f->rec->done_ok++;
    else
        f->rec->done_fail++;
    g_h.frame_free(f->mem);
    free(f);
}

static void params_for(rec_t *rec, kvlink_nccl_params_t *ps, kvlink_nccl_params_t *pr)
{
    kvlink_nccl_params_default(ps);
    ps->role = KVLINK_NCCL_SENDER;
    ps->device = 0;
    ps->max_frame_bytes = 64 << 10;
    ps->idle_round_us = 100;
    ps->peer_timeout_ms = g_h.peer_timeout_ms;
    ps->init_timeout_ms = 60000;
    ps->compat.model_fingerprint = 0x5eedull;
    ps->compat.codec_version = 3;
    ps->on_peer = on_peer;
    ps->cb_arg = rec;
    *pr = *ps;
    pr->role = KVLINK_NCCL_RECEIVER;
    pr->device = 1;
    pr->recv_pool_bytes = 4 << 20;
    pr->compat.page_size = 4096;
    pr->on_frame = on_frame;
    pr->on_recv_end = on_recv_end;
}

static rec_t *rec_new(void)
{
    rec_t *rec = calloc(1, sizeof(*rec));
    assert_non_null(rec);
    rec->release_per_pump = SIZE_MAX;
    for (uint64_t i = 0; i < N_REQ; i++)
        rec->sctx[i] = (sreq_ctx_t){rec, i};
    return rec;
}

static void rec_release_held(rec_t *rec, size_t n)
{
    size_t k = FY_MIN(n, rec->n_held);
    for (size_t i = 0; i < k; i++)
        kvlink_nccl_buf_release(rec->held[i].buf);
    memmove(rec->held, rec->held + k, (rec->n_held - k) * sizeof(held_t));
    rec->n_held -= k;
}

/* Drives both ends (either may be NULL) until done(rec) or ms pass; true when done. */
static bool pump(rec_t *rec, bool (*done)(rec_t *), uint32_t ms)
{
    uint64_t until = fy_clock_ns() + (uint64_t)ms * 1000000u;
    while (!done(rec)) {
        if (fy_clock_ns() > until)
            return false;
        if (rec->s != NULL)
            (void)kvlink_nccl_progress(rec->s);
        if (rec->r != NULL)
            (void)kvlink_nccl_progress(rec->r);
        if (rec->release_per_pump != SIZE_MAX)
            rec_release_held(rec, rec->release_per_pump);
    }
    return true;
}

static bool both_ready(rec_t *rec)
{
    return kvlink_nccl_ready(rec->s) && kvlink_nccl_ready(rec->r);
}

static void make_ready(rec_t *rec, kvlink_nccl_params_t *ps, kvlink_nccl_params_t *pr)
{
    assert_int_equal(g_h.make_pair(ps, pr, &rec->s, &rec->r), FY_OK);
    assert_true(pump(rec, both_ready, 60000));
    assert_int_equal(rec->peer_calls[0], 1);
    assert_int_equal(rec->peer_calls[1], 1);
    assert_int_equal(rec->peer_st[0], FY_OK);
}

/* A new record with a pair built from params_for, handshake done. */
static rec_t *rec_ready(void)
{
    rec_t *rec = rec_new();
    kvlink_nccl_params_t ps, pr;
    params_for(rec, &ps, &pr);
    make_ready(rec, &ps, &pr);
    return rec;
}

/* Opens request id on the sender and queues n frames (and finish when asked). */
static kvlink_nccl_send_t *send_req(rec_t *rec, uint64_t id, uint32_t n, size_t max_len,
                                    uint64_t deadline_ns, bool finish)
{
    kvlink_nccl_send_params_t sp;
    kvlink_nccl_send_params_default(&sp);
    sp.on_end = on_send_end;
    sp.arg = &rec->sctx[id];
    sp.deadline_ns = deadline_ns;
    kvlink_nccl_send_t *req = NULL;
    assert_int_equal(kvlink_nccl_send_open(rec->s, id, &sp, &req), FY_OK);
    for (uint32_t l = 0; l < n; l++) {
        size_t len = frame_len(id, l, max_len);
        uint8_t *host = malloc(len);
        frame_fill(host, len, id, l);
        frame_ctx_t *f = malloc(sizeof(*f));
        f->rec = rec;
        f->mem = g_h.frame_alloc(host, len);
        assert_int_equal(kvlink_nccl_send_frame_crc(req, l, f->mem, len, fy_crc32c(0, host, len),
                                                    on_frame_done, f),
                         FY_OK);
        free(host);
    }
    if (finish)
        assert_int_equal(kvlink_nccl_send_finish(req), FY_OK);
    return req;
}

static void expect_req(rec_t *rec, uint64_t id, size_t window, uint64_t deadline_ns)
{
    kvlink_nccl_recv_params_t rp;
    kvlink_nccl_recv_params_default(rec->r, &rp);
    rp.credit_bytes = window;
    rp.deadline_ns = deadline_ns;
    assert_int_equal(kvlink_nccl_recv_expect(rec->r, id, &rp), FY_OK);
}

static void rec_free(rec_t *rec)
{
    kvlink_nccl_destroy(rec->s);
    rec->s = NULL;
    rec_release_held(rec, SIZE_MAX); // before the receiver goes: release needs it
    kvlink_nccl_destroy(rec->r);
    free(rec);
}

/* ------------------------------------------------------------------------------------------ */

static bool reqs_1_to_3_done(rec_t *rec)
{
    for (int i = 1; i <= 3; i++)
        if (!rec->send_ended[i] || !rec->recv_ended[i])
            return false;
    return true;
}

/* Three requests at once, odd frame sizes, windows of a few frames and buffers released
 * slowly, so the sender keeps stalling on credits; one request has more frames than a round
 * carries. Every byte arrives, in order, never beyond the window. */
static void test_transfer_with_credits(void **state)
{
    (void)state;
    rec_t *rec = rec_ready();
    rec->release_per_pump = 1;
    const size_t max_len = 20000;
    const size_t window = 3 * max_len;
    const uint32_t n_frames[4] = {0, 20, 150, 7};
    for (uint64_t id = 1; id <= 3; id++)
        expect_req(rec, id, window, 0);
    for (uint64_t id = 1; id <= 3; id++)
        send_req(rec, id, n_frames[id], id == 2 ? 300 : max_len, 0, true);
    assert_true(pump(rec, reqs_1_to_3_done, 60000));
    for (uint64_t id = 1; id <= 3; id++) {
        assert_int_equal(rec->send_st[id], FY_OK);
        assert_int_equal(rec->recv_st[id], FY_OK);
        assert_int_equal(rec->rx_per_req[id], n_frames[id]);
    }
    assert_int_equal(rec->bad_frames, 0);
    assert_int_equal(rec->done_ok, 177);
    assert_int_equal(rec->done_fail, 0);
    kvlink_nccl_stats_t ss, rs;
    kvlink_nccl_stats(rec->s, &ss);
    kvlink_nccl_stats(rec->r, &rs);
    assert_true(ss.credit_stalls > 0);
    assert_int_equal(rs.credit_violations, 0);
    assert_true(rs.max_outstanding <= window);
    assert_int_equal(rs.frames_delivered, 177);
    assert_int_equal(ss.frames_sent, 177);
    assert_int_equal(ss.send_reqs, 0);
    assert_int_equal(ss.frames_in_flight, 0);
    rec_release_held(rec, SIZE_MAX);
    kvlink_nccl_stats(rec->r, &rs);
    assert_int_equal(rs.bufs_out, 0);
    assert_int_equal(rs.pool_used_bytes, 0);
    assert_int_equal(rs.credit_reserved, 0);
    rec_free(rec);
}

static bool cancel_done(rec_t *rec)
{
    return rec->send_ended[1] && rec->recv_ended[1] && rec->send_ended[2] && rec->recv_ended[2] &&
           rec->send_ended[3] && rec->recv_ended[3];
}

static bool some_frames_of_1_and_2(rec_t *rec)
{
    return rec->rx_per_req[1] >= 2 && rec->rx_per_req[2] >= 2;
}

/* The sender cancels request 1 and the receiver cancels request 2 mid-transfer; request 3,
 * sharing the pair, still completes. */
static void test_cancel_both_sides(void **state)
{
    (void)state;
    rec_t *rec = rec_ready();
    rec->release_per_pump = 0; // hold everything: transfers stall on credits
    for (uint64_t id = 1; id <= 3; id++)
        expect_req(rec, id, 8000, 0);
    kvlink_nccl_send_t *r1 = send_req(rec, 1, 40, 4000, 0, true);
    send_req(rec, 2, 40, 4000, 0, true);
    assert_true(pump(rec, some_frames_of_1_and_2, 30000));
    kvlink_nccl_send_cancel(r1);
    assert_true(rec->send_ended[1]);
    assert_int_equal(rec->send_st[1], FY_ERR_CANCELLED);
    assert_int_equal(kvlink_nccl_recv_cancel(rec->r, 2), FY_OK);
    assert_true(rec->recv_ended[2]);
    assert_int_equal(rec->recv_st[2], FY_ERR_CANCELLED);
    assert_int_equal(kvlink_nccl_recv_cancel(rec->r, 2), FY_ERR_NOT_FOUND);
    send_req(rec, 3, 5, 4000, 0, true);
    rec->release_per_pump = 1;
    assert_true(pump(rec, cancel_done, 30000));
    assert_int_equal(rec->recv_st[1], FY_ERR_CANCELLED);
    assert_int_equal(rec->send_st[2], FY_ERR_CANCELLED);
    assert_int_equal(rec->send_st[3], FY_OK);
    assert_int_equal(rec->recv_st[3], FY_OK);
    assert_int_equal(rec->rx_per_req[3], 5);
    assert_int_equal(rec->bad_frames, 0);
    assert_true(rec->done_fail > 0); // queued frames of the cancelled requests
    assert_int_equal(rec->done_ok + rec->done_fail, 85);
    // Both sides forget cancelled requests: the ids can be used again.
    rec->recv_ended[1] = false;
    expect_req(rec, 1, 8000, 0);
    assert_int_equal(kvlink_nccl_recv_cancel(rec->r, 1), FY_OK);
    rec_free(rec);
}

static bool req1_sent(rec_t *rec)
{
    return rec->send_ended[1];
}
static bool deadlines_done(rec_t *rec)
{
    return rec->recv_ended[1] && rec->send_ended[2] && rec->recv_ended[2];
}

/* An open the receiver does not expect is refused; deadlines end requests on both sides. */
static void test_refused_open_and_deadlines(void **state)
{
    (void)state;
    rec_t *rec = rec_ready();
    send_req(rec, 1, 2, 1000, 0, true);
    assert_true(pump(rec, req1_sent, 30000));
    assert_int_equal(rec->send_st[1], FY_ERR_NOT_FOUND);
    assert_int_equal(rec->done_fail, 2);

    uint64_t now = fy_clock_ns();
    expect_req(rec, 1, 8000, now + 100000000u); // nobody sends it
    expect_req(rec, 2, 8000, 0);
    rec->release_per_pump = 0; // request 2 stalls on credits
    send_req(rec, 2, 50, 4000, now + 150000000u, true);
    assert_true(pump(rec, deadlines_done, 30000));
    assert_int_equal(rec->recv_st[1], FY_ERR_TIMEOUT);
    assert_int_equal(rec->send_st[2], FY_ERR_TIMEOUT);
    assert_int_equal(rec->recv_st[2], FY_ERR_TIMEOUT);
    assert_true(rec->send_end_ns[2] >= now + 150000000u);
    assert_true(rec->send_end_ns[2] < now + 5000000000u);
    rec_free(rec);
}

static bool req1_both_ended(rec_t *rec)
{
    return rec->send_ended[1] && rec->recv_ended[1];
}
static bool req2_granted_frames(rec_t *rec)
{
    return rec->rx_per_req[2] >= 1;
}

/* A frame larger than the receiver's whole window could never be sent: queued before the
 * window is known it ends the request (both sides) with FY_ERR_OUT_OF_RANGE; offered after,
 * it is refused at once. */
static void test_frame_beyond_window(void **state)
{
    (void)state;
    rec_t *rec = rec_ready();
    expect_req(rec, 1, 1000, 0);
    send_req(rec, 1, 3, 4000, 0, true); // frame lengths up to 4000 bytes, some above 1000
    assert_true(pump(rec, req1_both_ended, 30000));
    assert_int_equal(rec->send_st[1], FY_ERR_OUT_OF_RANGE);
    assert_int_equal(rec->recv_st[1], FY_ERR_OUT_OF_RANGE);
    assert_int_equal(rec->done_fail, 3);

    expect_req(rec, 2, 1000, 0);
    kvlink_nccl_send_t *req = send_req(rec, 2, 1, 500, 0, false);
    assert_true(pump(rec, req2_granted_frames, 30000));
    uint8_t host[2000] = {0};
    void *big = g_h.frame_alloc(host, sizeof(host));
    assert_int_equal(kvlink_nccl_send_frame(req, 1, big, sizeof(host), NULL, NULL),
                     FY_ERR_OUT_OF_RANGE);
    g_h.frame_free(big);
    kvlink_nccl_send_cancel(req);
    rec_free(rec);
}

static bool peers_reported(rec_t *rec)
{
    return rec->peer_calls[0] && rec->peer_calls[1];
}

/* Ends built for another model refuse each other. */
static void test_compat_mismatch(void **state)
{
    (void)state;
    rec_t *rec = rec_new();
    kvlink_nccl_params_t ps, pr;
    params_for(rec, &ps, &pr);
    pr.compat.model_fingerprint = 0xbadull;
    assert_int_equal(g_h.make_pair(&ps, &pr, &rec->s, &rec->r), FY_OK);
    assert_true(pump(rec, peers_reported, 60000));
    assert_int_equal(rec->peer_st[0], FY_ERR_MISMATCH);
    assert_int_equal(rec->peer_st[1], FY_ERR_MISMATCH);
    assert_false(kvlink_nccl_ready(rec->s));
    kvlink_nccl_send_t *req = NULL;
    assert_int_equal(kvlink_nccl_send_open(rec->s, 1, NULL, &req), FY_ERR_STATE);
    assert_int_equal(kvlink_nccl_progress(rec->s), FY_ERR_MISMATCH);
    rec_free(rec);
}

static bool some_frames_of_1(rec_t *rec)
{
    return rec->rx_per_req[1] >= 3;
}
static bool sender_failed(rec_t *rec)
{
    return rec->send_ended[1] && rec->peer_calls[0] >= 2;
}

/* The receiver goes away mid-transfer (its communicator aborted, as when the process dies):
 * the sender's request and the pair fail with FY_ERR_UNAVAILABLE within the peer timeout. */
static void test_peer_death(void **state)
{
    (void)state;
    rec_t *rec = rec_ready();
    rec->release_per_pump = 0;
    expect_req(rec, 1, 30000, 0);
    send_req(rec, 1, 60, 10000, 0, true);
    assert_true(pump(rec, some_frames_of_1, 30000));
    rec_release_held(rec, SIZE_MAX);
    uint64_t t0 = fy_clock_ns();
    kvlink_nccl_destroy(rec->r);
    rec->r = NULL;
    assert_true(rec->recv_ended[1]);
    assert_int_equal(rec->recv_st[1], FY_ERR_CLOSED);
    assert_true(pump(rec, sender_failed, g_h.peer_timeout_ms + 10000));
    assert_int_equal(rec->send_st[1], FY_ERR_UNAVAILABLE);
    assert_int_equal(rec->peer_st[0], FY_ERR_UNAVAILABLE);
    uint64_t took_ms = (rec->send_end_ns[1] - t0) / 1000000u;
    assert_true(g_h.sees_peer_close || took_ms >= g_h.peer_timeout_ms / 2);
    assert_true(took_ms < g_h.peer_timeout_ms + 3000);
    assert_int_equal(kvlink_nccl_progress(rec->s), FY_ERR_UNAVAILABLE);
    assert_int_equal(rec->done_ok + rec->done_fail, 60);
    rec_free(rec);
}

/* Destroying both ends with requests open and buffers held ends everything with
 * FY_ERR_CLOSED and frees it all (the sanitizers check the freeing). */
static void test_destroy_with_open_requests(void **state)
{
    (void)state;
    rec_t *rec = rec_ready();
    rec->release_per_pump = 0;
    expect_req(rec, 1, 30000, 0);
    expect_req(rec, 2, 30000, 0);
    send_req(rec, 1, 60, 10000, 0, false);
    assert_true(pump(rec, some_frames_of_1, 30000));
    kvlink_nccl_destroy(rec->s);
    rec->s = NULL;
    assert_int_equal(rec->send_st[1], FY_ERR_CLOSED);
    assert_int_equal(rec->done_ok + rec->done_fail, 60);
    kvlink_nccl_destroy(rec->r); // with buffers still held: freed here
    rec->r = NULL;
    assert_int_equal(rec->recv_st[1], FY_ERR_CLOSED);
    assert_int_equal(rec->recv_st[2], FY_ERR_CLOSED);
    rec->n_held = 0;
    free(rec);
}

/* The dead peer goes last: on GPUs, kernels aborted while their peer's memory goes away are
 * the likeliest to leave an error behind, which should not be blamed on another scenario. */
#define NCCL_SCENARIO_TESTS                                                                        \
    cmocka_unit_test(test_transfer_with_credits), cmocka_unit_test(test_cancel_both_sides),        \
        cmocka_unit_test(test_refused_open_and_deadlines), cmocka_unit_test(test_compat_mismatch), \
        cmocka_unit_test(test_frame_beyond_window),                                                \
        cmocka_unit_test(test_destroy_with_open_requests), cmocka_unit_test(test_peer_death)

#endif /* FERRY_TESTS_NCCL_SCENARIOS_H */
