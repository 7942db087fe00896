// A hostile peer speaking raw UCX to a kvlink receiver: messages before the handshake, wrong
// header sizes, reserved bits, unknown request ids, lengths that disagree with the header,
// frames beyond the credits, bad CRCs, no reply endpoint. Each is rejected with a counter or a
// failed request, never a crash, and the link keeps working for honest frames.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <ucp/api/ucp.h>

#include "kvlink_int.h"
#include "rig.h"

typedef struct {
    rig_t *rig;
    ucp_context_h ucp;
    ucp_worker_h worker;
    ucp_ep_h ep;
    int acks, credits, statuses;
    fy_status_t last_status;
    int32_t ack_status;
    uint64_t last_credit;
    int sends_done;
    ucs_status_t last_send;
} raw_t;

static ucs_status_t raw_am(void *arg, const void *header, size_t header_length, void *data,
                           size_t length, const ucp_am_recv_param_t *param, unsigned id)
{
    raw_t *w = arg;
    kvlink_msg_t m;
    if (kvlink_msg_unpack(id, header, header_length, &m) != FY_OK)
        return UCS_OK;
    if (id == KVLINK_AM_HELLO_ACK) {
        w->acks++;
        w->ack_status = m.status;
    } else if (id == KVLINK_AM_CREDIT) {
        w->credits++;
        w->last_credit = m.bytes;
    } else if (id == KVLINK_AM_STATUS) {
        w->statuses++;
        w->last_status = (fy_status_t)m.status;
    }
    return UCS_OK;
}

static ucs_status_t raw_ack(void *arg, const void *h, size_t hl, void *d, size_t l,
                            const ucp_am_recv_param_t *p)
{
    return raw_am(arg, h, hl, d, l, p, KVLINK_AM_HELLO_ACK);
}
static ucs_status_t raw_credit(void *arg, const void *h, size_t hl, void *d, size_t l,
                               const ucp_am_recv_param_t *p)
{
    return raw_am(arg, h, hl, d, l, p, KVLINK_AM_CREDIT);
}
static ucs_status_t raw_status(void *arg, const void *h, size_t hl, void *d, size_t l,
                               const ucp_am_recv_param_t *p)
{
    return raw_am(arg, h, hl, d, l, p, KVLINK_AM_STATUS);
}

static void raw_sent(void *request, ucs_status_t status, void *user_data)
{
    raw_t *w = user_data;
    w->sends_done++;
    w->last_send = status;
    ucp_request_free(request);
}

static void raw_err(void *arg, ucp_ep_h ep, ucs_status_t status)
{
}

static void raw_init(raw_t *w, rig_t *r)
{
    memset(w, 0, sizeof(*w));
    w->rig = r;
    ucp_params_t up = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_AM};
    assert_int_equal(ucp_init(&up, NULL, &w->ucp), UCS_OK);
    ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
                              .thread_mode = UCS_THREAD_MODE_SINGLE};
    assert_int_equal(ucp_worker_create(w->ucp, &wp, &w->worker), UCS_OK);
    ucp_am_recv_callback_t cbs[] = {NULL, NULL, raw_ack, NULL, raw_credit, NULL, NULL,
                                    raw_status};
    for (unsigned id = 1; id < FY_ARRAY_SIZE(cbs); id++) {
        if (cbs[id] == NULL)
            continue;
        ucp_am_handler_param_t hp = {.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID |
                                                   UCP_AM_HANDLER_PARAM_FIELD_CB |
                                                   UCP_AM_HANDLER_PARAM_FIELD_ARG,
                                     .id = id,
                                     .cb = cbs[id],
                                     .arg = w};
        assert_int_equal(ucp_worker_set_am_recv_handler(w->worker, &hp), UCS_OK);
    }
    struct sockaddr_in sa = {.sin_family = AF_INET};
    const char *colon = strrchr(r->addr, ':');
    sa.sin_port = htons((uint16_t)atoi(colon + 1));
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    ucp_ep_params_t ep = {.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                                        UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                                        UCP_EP_PARAM_FIELD_ERR_HANDLER,
                          .flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
                          .sockaddr = {.addr = (struct sockaddr *)&sa, .addrlen = sizeof(sa)},
                          .err_mode = UCP_ERR_HANDLING_MODE_PEER,
                          .err_handler = {.cb = raw_err, .arg = w}};
    assert_int_equal(ucp_ep_create(w->worker, &ep, &w->ep), UCS_OK);
}

static void raw_fini(raw_t *w)
{
    ucp_request_param_t rp = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                              .flags = UCP_EP_CLOSE_FLAG_FORCE};
    void *req = ucp_ep_close_nbx(w->ep, &rp);
    while (UCS_PTR_IS_PTR(req) && ucp_request_check_status(req) == UCS_INPROGRESS)
        ucp_worker_progress(w->worker);
    if (UCS_PTR_IS_PTR(req))
        ucp_request_free(req);
    ucp_worker_destroy(w->worker);
    ucp_cleanup(w->ucp);
}

/* Sends raw bytes as active message id; waits until UCX is done with them. */
static void raw_send(raw_t *w, unsigned id, const void *hdr, size_t hl, const void *data,
                     size_t len, unsigned flags)
{
    int before = w->sends_done;
    ucp_request_param_t rp = {.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                                              UCP_OP_ATTR_FIELD_USER_DATA |
                                              UCP_OP_ATTR_FIELD_FLAGS |
                                              UCP_OP_ATTR_FLAG_NO_IMM_CMPL,
                              .cb = {.send = raw_sent},
                              .user_data = w,
                              .flags = flags};
    void *req = ucp_am_send_nbx(w->ep, id, hdr, hl, data, len, &rp);
    assert_false(UCS_PTR_IS_ERR(req));
    uint64_t until = fy_clock_ns() + 5000ull * 1000 * 1000;
    while (w->sends_done == before && fy_clock_ns() < until) {
        ucp_worker_progress(w->worker);
        uv_run(&w->rig->loop, UV_RUN_NOWAIT);
    }
    assert_int_equal(w->sends_done, before + 1);
}

static void raw_msg(raw_t *w, const kvlink_msg_t *m, const void *data, size_t len,
                    unsigned flags)
{
    uint8_t hdr[KVLINK_HDR_MAX];
    size_t hl = kvlink_msg_pack(m, hdr);
    raw_send(w, m->id, hdr, hl, data, len, flags | UCP_AM_SEND_FLAG_REPLY);
}

/* Turns both sides for ms so that answers arrive. */
static void raw_settle(raw_t *w, uint64_t ms)
{
    uint64_t until = fy_clock_ns() + ms * 1000 * 1000;
    while (fy_clock_ns() < until) {
        ucp_worker_progress(w->worker);
        uv_run(&w->rig->loop, UV_RUN_NOWAIT);
    }
}

static uint64_t rejected(rig_t *r)
{
    kvlink_stats_t s;
    kvlink_stats(r->rx, &s);
    return s.rejected;
}

static kvlink_msg_t frame_msg(uint64_t id, const void *data, size_t len)
{
    kvlink_msg_t m = {.id = KVLINK_AM_FRAME,
                      .request_id = id,
                      .bytes = len,
                      .layer = 3,
                      .crc = fy_crc32c(0, data, len)};
    return m;
}

static void open_request(raw_t *w, uint64_t id, size_t window)
{
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(w->rig->rx, &rp);
    rp.credit_bytes = window;
    assert_int_equal(kvlink_recv_expect(w->rig->rx, id, &rp), FY_OK);
    int credits = w->credits;
    kvlink_msg_t m = {.id = KVLINK_AM_OPEN, .request_id = id};
    raw_msg(w, &m, NULL, 0, 0);
    raw_settle(w, 50);
    assert_int_equal(w->credits, credits + 1);
    assert_int_equal(w->last_credit, window);
}

static void test_hostile_peer(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    r.release_inline = true;
    raw_t w;
    raw_init(&w, &r);
    static uint8_t small[100], big[2u << 20];
    h_fill(small, sizeof(small), 1, 3);
    h_fill(big, sizeof(big), 2, 3);

    // A frame before any handshake.
    kvlink_msg_t fm = frame_msg(1, small, sizeof(small));
    raw_msg(&w, &fm, small, sizeof(small), 0);
    raw_settle(&w, 50);
    assert_int_equal(rejected(&r), 1);

    // HELLO one byte short, then a HELLO with a bad magic.
    uint8_t hdr[KVLINK_HDR_MAX];
    kvlink_msg_t hello = {.id = KVLINK_AM_HELLO,
                          .protocol_version = KVLINK_PROTOCOL_VERSION,
                          .codec_version = 3,
                          .page_size = 4096,
                          .model_fingerprint = 0x1234abcdull,
                          .max_frame = 8u << 20};
    size_t hl = kvlink_msg_pack(&hello, hdr);
    raw_send(&w, KVLINK_AM_HELLO, hdr, hl - 1, NULL, 0, UCP_AM_SEND_FLAG_REPLY);
    hdr[0] ^= 0xff;
    raw_send(&w, KVLINK_AM_HELLO, hdr, hl, NULL, 0, UCP_AM_SEND_FLAG_REPLY);
    raw_settle(&w, 50);
    assert_int_equal(rejected(&r), 3);
    assert_int_equal(w.acks, 0);

    // The real handshake.
    raw_msg(&w, &hello, NULL, 0, 0);
    raw_settle(&w, 50);
    assert_int_equal(w.acks, 1);
    assert_int_equal(w.ack_status, 0);

    open_request(&w, 1, 1u << 20);
    // Unknown request id; a header one byte long; reserved bits; no reply endpoint.
    fm = frame_msg(99, small, sizeof(small));
    raw_msg(&w, &fm, small, sizeof(small), 0);
    fm = frame_msg(1, small, sizeof(small));
    raw_send(&w, KVLINK_AM_FRAME, hdr, 1, small, sizeof(small), UCP_AM_SEND_FLAG_REPLY);
    fm.flags = 0x80;
    raw_msg(&w, &fm, small, sizeof(small), 0);
    fm.flags = 0;
    uint8_t fh[KVLINK_HDR_MAX];
    size_t fhl = kvlink_msg_pack(&fm, fh);
    raw_send(&w, KVLINK_AM_FRAME, fh, fhl, small, sizeof(small), 0);
    // A STATUS carrying a code that is not a Ferry status.
    uint8_t sh[KVLINK_HDR_MAX];
    kvlink_msg_t sm = {.id = KVLINK_AM_STATUS, .request_id = 1, .status = -1000};
    size_t shl = kvlink_msg_pack(&sm, sh);
    raw_send(&w, KVLINK_AM_STATUS, sh, shl, NULL, 0, UCP_AM_SEND_FLAG_REPLY);
    raw_settle(&w, 50);
    assert_int_equal(rejected(&r), 8);
    assert_int_equal(r.n_rx_end, 0); // none of that touched request 1

    // An honest frame still goes through, eager and by rendezvous.
    raw_msg(&w, &fm, small, sizeof(small), UCP_AM_SEND_FLAG_EAGER);
    raw_msg(&w, &fm, small, sizeof(small), UCP_AM_SEND_FLAG_RNDV);
    raw_settle(&w, 50);
    assert_int_equal(r.frames_ok, 2);
    assert_int_equal(r.frames_bad, 0);

    // A bad CRC fails the request with DATA_LOSS, and the sender hears it.
    fm.crc ^= 1;
    raw_msg(&w, &fm, small, sizeof(small), UCP_AM_SEND_FLAG_RNDV);
    raw_settle(&w, 50);
    assert_int_equal(r.n_rx_end, 1);
    assert_int_equal(r.rx_end_st[0], FY_ERR_CORRUPT);
    assert_int_equal(w.last_status, FY_ERR_CORRUPT);

    // Beyond the credits: a 2 MiB frame into a 1 MiB window.
    open_request(&w, 2, 1u << 20);
    fm = frame_msg(2, big, sizeof(big));
    raw_msg(&w, &fm, big, sizeof(big), UCP_AM_SEND_FLAG_RNDV);
    raw_settle(&w, 50);
    assert_int_equal(r.n_rx_end, 2);
    assert_int_equal(r.rx_end_st[1], FY_ERR_PROTOCOL);
    assert_true(w.last_send != UCS_OK); // the rendezvous was refused, no bytes moved
    kvlink_stats_t s;
    kvlink_stats(r.rx, &s);
    assert_int_equal(s.credit_violations, 1);

    // A header that claims more bytes than the message carries, eager and rendezvous.
    open_request(&w, 3, 1u << 20);
    fm = frame_msg(3, small, sizeof(small));
    fm.bytes = 4096;
    raw_msg(&w, &fm, small, sizeof(small), UCP_AM_SEND_FLAG_EAGER);
    open_request(&w, 4, 1u << 20);
    fm.request_id = 4;
    raw_msg(&w, &fm, small, sizeof(small), UCP_AM_SEND_FLAG_RNDV);
    // END that claims fewer frames than arrived.
    open_request(&w, 5, 1u << 20);
    fm = frame_msg(5, small, sizeof(small));
    raw_msg(&w, &fm, small, sizeof(small), 0);
    raw_msg(&w, &fm, small, sizeof(small), 0);
    kvlink_msg_t em = {.id = KVLINK_AM_END, .request_id = 5, .frames = 1, .bytes = 100};
    raw_msg(&w, &em, NULL, 0, 0);
    raw_settle(&w, 100);
    assert_int_equal(r.n_rx_end, 5);
    assert_int_equal(r.rx_end_st[2], FY_ERR_PROTOCOL);
    assert_int_equal(r.rx_end_st[3], FY_ERR_PROTOCOL);
    assert_int_equal(r.rx_end_st[4], FY_ERR_PROTOCOL);

    // An honest request from start to end after all that.
    open_request(&w, 6, 1u << 20);
    fm = frame_msg(6, big, 1u << 20);
    raw_msg(&w, &fm, big, 1u << 20, UCP_AM_SEND_FLAG_RNDV);
    em = (kvlink_msg_t){.id = KVLINK_AM_END, .request_id = 6, .frames = 1, .bytes = 1u << 20};
    raw_msg(&w, &em, NULL, 0, 0);
    raw_settle(&w, 100);
    assert_int_equal(r.n_rx_end, 6);
    assert_int_equal(r.rx_end_st[5], FY_OK);
    assert_int_equal(w.last_status, FY_OK);

    raw_fini(&w);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));
    rig_fini(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hostile_peer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
