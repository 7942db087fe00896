// kvlink over loopback in one process (transport picked by UCX_TLS from the test's
// environment): 1,000 frames of random sizes with contents verified and credits counted,
// cancel from either side mid-transfer, deadlines, unexpected requests, compatibility refusal.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "rig.h"

/* ---- 1,000 frames ---- */

typedef struct {
    rig_t *rig;
    kvlink_send_t *req;
    uint64_t rng;
    int next, total, queued, max_queued;
    size_t max_len;
    int iter;
    bool finished;
} pump_t;

static uint64_t xs(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void pump_frame_done(kvlink_send_t *req, fy_status_t st, void *arg)
{
    uint8_t *buf = arg;
    pump_t *pm = *(pump_t **)buf;
    free(buf);
    pm->queued--;
    if (st == FY_OK)
        pm->rig->frames_done_ok++;
    else
        pm->rig->frames_done_err++;
}

/* Keeps max_queued frames queued; sizes log-uniform in [1, max_len]. */
static void pump_top_up(pump_t *pm)
{
    while (pm->next < pm->total && pm->queued < pm->max_queued) {
        int bits = (int)(xs(&pm->rng) % 24); // 2^0 .. 2^23 = 8 MiB
        size_t len = ((size_t)1 << bits) + xs(&pm->rng) % ((size_t)1 << bits);
        if (len > pm->max_len)
            len = pm->max_len;
        size_t hdr = sizeof(pump_t *);
        uint8_t *buf = malloc(hdr + len);
        assert_non_null(buf);
        memcpy(buf, &pm, hdr);
        h_fill(buf + hdr, len, 1, (uint32_t)pm->next);
        // The frame payload starts after the back pointer; done gets the whole block.
        assert_int_equal(kvlink_send_frame(pm->req, (uint32_t)pm->next, buf + hdr, len,
                                           pump_frame_done, buf),
                         FY_OK);
        pm->queued++;
        pm->next++;
    }
    if (pm->next == pm->total && !pm->finished) {
        assert_int_equal(kvlink_send_finish(pm->req), FY_OK);
        pm->finished = true;
    }
}

static bool pump_cond(void *arg)
{
    pump_t *pm = arg;
    rig_t *r = pm->rig;
    pump_top_up(pm);
    // The application lags: buffers go back only every third turn, so credits bind.
    if (++pm->iter % 3 == 0)
        rig_release_all(r);
    return r->n_rx_end == 1 && r->n_tx_end == 1 && pm->queued == 0;
}

static void test_thousand_frames(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    rp.credit_bytes = 16u << 20;
    assert_int_equal(kvlink_recv_expect(r.rx, 1, &rp), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    pump_t pm = {.rig = &r, .rng = 0x5eed, .total = 1000, .max_queued = 6, .max_len = 8u << 20};
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 1, &sp, &pm.req), FY_OK);
    assert_true(h_run_until(&r.loop, pump_cond, &pm, 120000));
    assert_int_equal(r.frames_ok, 1000);
    assert_int_equal(r.frames_bad, 0);
    assert_int_equal(r.frames_done_ok, 1000);
    assert_int_equal(r.rx_end_st[0], FY_OK);
    assert_int_equal(r.tx_end_st[0], FY_OK);
    assert_int_equal(r.n_peer, 1);
    assert_int_equal(r.peer_st, FY_OK);
    rig_release_all(&r);
    kvlink_stats_t rs, ts;
    kvlink_stats(r.rx, &rs);
    kvlink_stats(r.tx, &ts);
    // Credits: never beyond the window, and they did hold the sender back.
    assert_int_equal(rs.credit_violations, 0);
    assert_true(rs.max_outstanding <= rp.credit_bytes);
    assert_true(rs.max_outstanding > 0);
    assert_true(ts.credit_stalls > 0);
    assert_int_equal(rs.frames_delivered, 1000);
    // Frames land in the receive pool the application may page-lock, but for fallbacks.
    assert_int_equal(r.frames_in_pool + rs.pool_fallbacks, 1000);
    assert_true(r.frames_in_pool > 0);
    assert_int_equal(rs.rejected, 0);
    assert_int_equal(rs.crc_errors, 0);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.tx, 5000));
    rig_fini(&r);
}

/* ---- cancel mid-transfer ---- */

static uint8_t g_frame[1u << 20];

static void count_done(kvlink_send_t *req, fy_status_t st, void *arg)
{
    rig_t *r = arg;
    if (st == FY_OK) {
        r->frames_done_ok++;
    } else {
        r->frames_done_err++;
        r->last_frame_err = st;
    }
}

static bool two_delivered(void *arg)
{
    rig_t *r = arg;
    return r->frames_ok >= 2;
}

static bool both_ended(void *arg)
{
    rig_t *r = arg;
    return r->n_rx_end >= 1 && r->n_tx_end >= 1 && r->frames_done_ok + r->frames_done_err == 20;
}

static void start_twenty(rig_t *r, uint64_t id, kvlink_send_t **req_p)
{
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r->rx, &rp);
    rp.credit_bytes = 4u << 20; // four frames, then the sender must wait for releases
    assert_int_equal(kvlink_recv_expect(r->rx, id, &rp), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = r;
    assert_int_equal(kvlink_send_open(r->tx, r->addr, id, &sp, req_p), FY_OK);
    h_fill(g_frame, sizeof(g_frame), id, 7);
    for (int i = 0; i < 20; i++)
        assert_int_equal(kvlink_send_frame(*req_p, 7, g_frame, sizeof(g_frame), count_done, r),
                         FY_OK);
    assert_int_equal(kvlink_send_finish(*req_p), FY_OK);
    assert_true(h_run_until(&r->loop, two_delivered, r, 10000));
}

static void assert_all_freed(rig_t *r)
{
    rig_release_all(r);
    assert_true(h_run_until(&r->loop, (h_cond_fn)rig_idle, r->rx, 5000));
    assert_true(h_run_until(&r->loop, (h_cond_fn)rig_idle, r->tx, 5000));
}

static void test_cancel_by_receiver(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    kvlink_send_t *req;
    start_twenty(&r, 42, &req);
    assert_int_equal(kvlink_recv_cancel(r.rx, 42), FY_OK);
    assert_int_equal(kvlink_recv_cancel(r.rx, 42), FY_ERR_NOT_FOUND);
    assert_true(h_run_until(&r.loop, both_ended, &r, 10000));
    assert_int_equal(r.rx_end_st[0], FY_ERR_CANCELLED);
    assert_int_equal(r.tx_end_st[0], FY_ERR_CANCELLED);
    assert_true(r.frames_done_err > 0);
    assert_true(r.frames_ok < 20);
    assert_all_freed(&r);
    rig_fini(&r);
}

static void test_cancel_by_sender(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    kvlink_send_t *req;
    start_twenty(&r, 43, &req);
    kvlink_send_cancel(req);
    assert_true(h_run_until(&r.loop, both_ended, &r, 10000));
    assert_int_equal(r.tx_end_st[0], FY_ERR_CANCELLED);
    assert_int_equal(r.rx_end_st[0], FY_ERR_CANCELLED);
    assert_int_equal(r.last_frame_err, FY_ERR_CANCELLED);
    assert_all_freed(&r);
    // The endpoint survives a cancelled request: the next one goes through.
    r.release_inline = true;
    r.n_rx_end = r.n_tx_end = 0;
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    assert_int_equal(kvlink_recv_expect(r.rx, 44, &rp), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 44, &sp, &req), FY_OK);
    h_fill(g_frame, 1000, 44, 0);
    r.frames_done_ok = r.frames_done_err = 0;
    assert_int_equal(kvlink_send_frame(req, 0, g_frame, 1000, count_done, &r), FY_OK);
    assert_int_equal(kvlink_send_finish(req), FY_OK);
    r.frames_done_ok += 19; // both_ended counts 20 frames
    assert_true(h_run_until(&r.loop, both_ended, &r, 10000));
    assert_int_equal(r.rx_end_st[0], FY_OK);
    assert_int_equal(r.tx_end_st[0], FY_OK);
    kvlink_stats_t ts;
    kvlink_stats(r.tx, &ts);
    assert_int_equal(ts.peers, 1); // one endpoint, reused
    assert_all_freed(&r);
    rig_fini(&r);
}

/* ---- deadlines and unexpected requests ---- */

static bool rx_and_tx_ended(void *arg)
{
    rig_t *r = arg;
    return r->n_rx_end >= 1 && r->n_tx_end >= 1;
}

static bool tx_ended(void *arg)
{
    rig_t *r = arg;
    return r->n_tx_end >= 1;
}

static void test_deadline(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    rp.deadline_ns = fy_clock_ns() + 200ull * 1000 * 1000;
    assert_int_equal(kvlink_recv_expect(r.rx, 5, &rp), FY_OK);
    assert_int_equal(kvlink_recv_expect(r.rx, 5, &rp), FY_ERR_EXISTS);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    kvlink_send_t *req;
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 5, &sp, &req), FY_OK);
    // The sender opens and then stalls: the receiver's deadline ends both sides.
    uint64_t t0 = fy_clock_ns();
    assert_true(h_run_until(&r.loop, rx_and_tx_ended, &r, 5000));
    assert_int_equal(r.rx_end_st[0], FY_ERR_TIMEOUT);
    assert_int_equal(r.tx_end_st[0], FY_ERR_TIMEOUT);
    assert_true(fy_clock_ns() - t0 < 3000ull * 1000 * 1000);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.tx, 5000));

    // A sender-side deadline, against a receiver that never grants (nothing expected yet
    // would answer NOT_FOUND, so expect with a window and hold every buffer).
    r.n_rx_end = r.n_tx_end = 0;
    kvlink_recv_params_default(r.rx, &rp);
    rp.credit_bytes = 1u << 20;
    assert_int_equal(kvlink_recv_expect(r.rx, 6, &rp), FY_OK);
    sp.deadline_ns = fy_clock_ns() + 200ull * 1000 * 1000;
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 6, &sp, &req), FY_OK);
    h_fill(g_frame, sizeof(g_frame), 6, 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(kvlink_send_frame(req, 1, g_frame, sizeof(g_frame), count_done, &r),
                         FY_OK);
    assert_true(h_run_until(&r.loop, rx_and_tx_ended, &r, 5000));
    assert_int_equal(r.tx_end_st[0], FY_ERR_TIMEOUT);
    assert_int_equal(r.rx_end_st[0], FY_ERR_TIMEOUT);
    assert_all_freed(&r);
    rig_fini(&r);
}

static void test_unexpected_request(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    kvlink_send_t *req;
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 77, &sp, &req), FY_OK);
    assert_true(h_run_until(&r.loop, tx_ended, &r, 5000));
    assert_int_equal(r.tx_end_st[0], FY_ERR_NOT_FOUND);
    assert_int_equal(r.n_rx_end, 0);
    // Bad arguments are refused up front.
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    rp.credit_bytes = 0;
    assert_int_equal(kvlink_recv_expect(r.rx, 1, &rp), FY_ERR_INVALID_ARG);
    rp.credit_bytes = 1ull << 40;
    assert_int_equal(kvlink_recv_expect(r.rx, 1, &rp), FY_ERR_INVALID_ARG);
    rp.credit_bytes = 40u << 20; // fits the 64 MiB pool once, not twice
    assert_int_equal(kvlink_recv_expect(r.rx, 1, &rp), FY_OK);
    assert_int_equal(kvlink_recv_expect(r.rx, 2, &rp), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(kvlink_recv_cancel(r.rx, 1), FY_OK);
    assert_int_equal(kvlink_send_open(r.tx, "no-port", 1, &sp, &req), FY_ERR_INVALID_ARG);
    assert_int_equal(kvlink_send_open(r.tx, "127.0.0.1:99999", 1, &sp, &req),
                     FY_ERR_INVALID_ARG);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.tx, 5000));
    rig_fini(&r);
}

/* ---- compatibility ---- */

static void other_model(kvlink_params_t *p)
{
    p->compat.model_fingerprint = 0x9999;
}

static void other_codec(kvlink_params_t *p)
{
    p->compat.codec_version = 4;
}

static void check_refused(void (*tweak)(kvlink_params_t *), const char *word)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, tweak), FY_OK);
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    assert_int_equal(kvlink_recv_expect(r.rx, 9, &rp), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    kvlink_send_t *req;
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 9, &sp, &req), FY_OK);
    assert_true(h_run_until(&r.loop, tx_ended, &r, 5000));
    assert_int_equal(r.tx_end_st[0], FY_ERR_MISMATCH);
    assert_int_equal(r.n_peer, 1);
    assert_int_equal(r.peer_st, FY_ERR_MISMATCH);
    assert_non_null(strstr(r.peer_msg, word));
    // The receiver's request is untouched by a refused peer and can still be cancelled.
    assert_int_equal(r.n_rx_end, 0);
    assert_int_equal(kvlink_recv_cancel(r.rx, 9), FY_OK);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.tx, 5000));
    rig_fini(&r);
}

static void test_compat_mismatch(void **state)
{
    check_refused(other_model, "fingerprint");
    check_refused(other_codec, "codec version");
}

/* ---- caller-supplied CRC, verification on and off ---- */

static uint32_t g_seen_crc;
static bool g_seen_self_checked;

static void crc_on_frame(kvlink_t *link, uint64_t request_id, uint32_t layer, kvlink_buf_t *buf,
                         const void *data, size_t len, void *arg)
{
    g_seen_crc = kvlink_buf_crc(buf);
    g_seen_self_checked = kvlink_buf_self_checked(buf);
    rig_on_frame(link, request_id, layer, buf, data, len, arg);
}

static void trusting(kvlink_params_t *p)
{
    p->verify_crc = false;
    p->on_frame = crc_on_frame;
}

/* One frame with the given CRC; returns the receiver's end status. */
static void one_frame_with_crc(rig_t *r, uint64_t id, uint32_t crc)
{
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r->rx, &rp);
    assert_int_equal(kvlink_recv_expect(r->rx, id, &rp), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = r;
    kvlink_send_t *req;
    assert_int_equal(kvlink_send_open(r->tx, r->addr, id, &sp, &req), FY_OK);
    h_fill(g_frame, 5000, id, 2);
    r->n_rx_end = r->n_tx_end = 0;
    assert_int_equal(kvlink_send_frame_crc(req, 2, g_frame, 5000, crc, NULL, NULL), FY_OK);
    assert_int_equal(kvlink_send_finish(req), FY_OK);
    assert_true(h_run_until(&r->loop, rx_and_tx_ended, r, 5000));
}

static void test_frame_crc(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    r.release_inline = true;
    h_fill(g_frame, 5000, 20, 2);
    uint32_t good = fy_crc32c(0, g_frame, 5000);
    one_frame_with_crc(&r, 20, good);
    assert_int_equal(r.rx_end_st[0], FY_OK);
    assert_int_equal(r.tx_end_st[0], FY_OK);
    // A wrong CRC is caught by the receiver: DATA_LOSS on both sides, no frame delivered.
    uint64_t delivered = r.frames_ok;
    one_frame_with_crc(&r, 21, good ^ 1);
    assert_int_equal(r.rx_end_st[0], FY_ERR_CORRUPT);
    assert_int_equal(r.tx_end_st[0], FY_ERR_CORRUPT);
    assert_int_equal(r.frames_ok, delivered);
    kvlink_stats_t s;
    kvlink_stats(r.rx, &s);
    assert_int_equal(s.crc_errors, 1);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    rig_fini(&r);

    // With verification left to the consumer the frame is delivered with the announced CRC.
    assert_int_equal(rig_init(&r, trusting, NULL), FY_OK);
    r.release_inline = true;
    h_fill(g_frame, 5000, 22, 2);
    good = fy_crc32c(0, g_frame, 5000);
    one_frame_with_crc(&r, 22, good ^ 1);
    assert_int_equal(r.rx_end_st[0], FY_OK);
    assert_int_equal(g_seen_crc, good ^ 1);
    assert_int_equal(r.frames_ok, 1);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    rig_fini(&r);
}

static bool one_frame_ok(void *arg)
{
    return ((rig_t *)arg)->frames_ok >= 1;
}

static void verifying(kvlink_params_t *p)
{
    p->on_frame = crc_on_frame;
}

/* A self-checked frame reaches a verifying receiver unchecked by the link, payload intact,
 * marked as such; frames with a CRC on the same request are still checked. */
static void test_self_checked_frame(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, verifying, NULL), FY_OK);
    r.release_inline = true;
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    assert_int_equal(kvlink_recv_expect(r.rx, 30, &rp), FY_OK);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    kvlink_send_t *req;
    assert_int_equal(kvlink_send_open(r.tx, r.addr, 30, &sp, &req), FY_OK);
    h_fill(g_frame, 5000, 30, 0);
    r.n_rx_end = r.n_tx_end = 0;
    g_seen_self_checked = false;
    assert_int_equal(kvlink_send_frame_self_checked(req, 0, g_frame, 5000, NULL, NULL), FY_OK);
    assert_true(h_run_until(&r.loop, one_frame_ok, &r, 5000));
    assert_true(g_seen_self_checked);
    assert_int_equal(g_seen_crc, 0);
    // The next frame has a wrong CRC and is caught although the first one was not checked.
    h_fill(g_frame, 5000, 30, 1);
    assert_int_equal(kvlink_send_frame_crc(req, 1, g_frame, 5000, 1, NULL, NULL), FY_OK);
    assert_int_equal(kvlink_send_finish(req), FY_OK);
    assert_true(h_run_until(&r.loop, rx_and_tx_ended, &r, 5000));
    assert_int_equal(r.rx_end_st[0], FY_ERR_CORRUPT);
    assert_int_equal(r.frames_ok, 1);
    kvlink_stats_t s;
    kvlink_stats(r.rx, &s);
    assert_int_equal(s.crc_errors, 1);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    rig_fini(&r);
}

static void test_ctx_params(void **state)
{
    kvlink_ctx_params_t cp;
    kvlink_ctx_params_default(&cp);
    assert_int_equal(cp.keepalive_ms, 1000);
    assert_null(cp.tls);
    cp.tls = "tcp";
    cp.net_devices = "lo";
    kvlink_ctx_t *ctx;
    assert_int_equal(kvlink_ctx_create(&cp, &ctx), FY_OK);
    uv_loop_t loop;
    uv_loop_init(&loop);
    kvlink_params_t p;
    kvlink_params_default(&p);
    p.recv_pool_bytes = 1u << 20;
    kvlink_t *link;
    assert_int_equal(kvlink_create(ctx, &loop, &p, &link), FY_OK);
    void *pool = NULL;
    size_t pool_len = 0;
    kvlink_recv_pool(link, &pool, &pool_len);
    assert_non_null(pool);
    assert_true(pool_len >= p.recv_pool_bytes);
    memset(pool, 0xa5, pool_len); // all of it is the link's, and writable
    uint16_t port = 0;
    assert_int_equal(kvlink_listen(link, "127.0.0.1", 0, &port), FY_OK);
    assert_true(port != 0);
    assert_int_equal(kvlink_listen(link, "127.0.0.1", 0, &port), FY_ERR_STATE);
    kvlink_t *sender; // no receive pool
    p.recv_pool_bytes = 0;
    assert_int_equal(kvlink_create(ctx, &loop, &p, &sender), FY_OK);
    kvlink_recv_pool(sender, &pool, &pool_len);
    assert_null(pool);
    assert_int_equal(pool_len, 0);
    kvlink_destroy(sender);
    p.max_frame_bytes = 0;
    kvlink_t *bad;
    assert_int_equal(kvlink_create(ctx, &loop, &p, &bad), FY_ERR_INVALID_ARG);
    kvlink_destroy(link);
    kvlink_destroy(NULL);
    kvlink_ctx_destroy(ctx);
    kvlink_ctx_destroy(NULL);
    h_loop_close(&loop);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_thousand_frames),  cmocka_unit_test(test_cancel_by_receiver),
        cmocka_unit_test(test_cancel_by_sender), cmocka_unit_test(test_deadline),
        cmocka_unit_test(test_unexpected_request), cmocka_unit_test(test_compat_mismatch),
        cmocka_unit_test(test_frame_crc),          cmocka_unit_test(test_self_checked_frame),
        cmocka_unit_test(test_ctx_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
