/*
 * rpc_test_util.h: helpers for the rpc tests: a blocking call on a private loop, and a raw
 * HTTP/2 client (nghttp2 over a blocking socket) that sends hand-made, possibly malformed,
 * gRPC requests and reports the status the server answered.
 */
#ifndef FERRY_TESTS_RPC_TEST_UTIL_H
#define FERRY_TESTS_RPC_TEST_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "interop.pb-c.h"
#include "rpc.h"

typedef struct {
    int code;
    char message[256];
    unsigned n_msgs;
    size_t bytes;
    uint64_t next_seq;
    bool in_order;
    bool done;
    unsigned cancel_after; // cancel the call after this many messages (0 = never)
    char text[64];         // text of the last message
} result_t;

static inline void result_init(result_t *r)
{
    memset(r, 0, sizeof(*r));
    r->code = -1;
    r->in_order = true;
}

static void test_on_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    result_t *r = arg;
    const Ferry__Test__EchoResponse *m = (const Ferry__Test__EchoResponse *)msg;
    if (m->seq != r->next_seq)
        r->in_order = false;
    r->next_seq = m->seq + 1;
    r->bytes += m->payload.len;
    snprintf(r->text, sizeof(r->text), "%s", m->text ? m->text : "");
    r->n_msgs++;
    if (r->cancel_after && r->n_msgs == r->cancel_after)
        rpc_ccall_cancel(call);
}

static void test_on_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    result_t *r = arg;
    r->code = code;
    snprintf(r->message, sizeof(r->message), "%s", message);
    r->done = true;
}

static inline void run_until_done(uv_loop_t *loop, result_t *r)
{
    while (!r->done)
        uv_run(loop, UV_RUN_ONCE);
}

/* Starts a call and runs loop until it is done. Returns the status of rpc_channel_call. */
static inline fy_status_t call_sync(uv_loop_t *loop, rpc_channel_t *ch, const char *path,
                                    const ProtobufCMessage *req, const rpc_call_opts_t *opts,
                                    result_t *r)
{
    fy_status_t st = rpc_channel_call(ch, path, req, &ferry__test__echo_response__descriptor, opts,
                                      test_on_msg, test_on_done, r, NULL);
    if (st == FY_OK)
        run_until_done(loop, r);
    return st;
}

/* Keeps running the loop until it has no more handles (after destroy calls). */
static inline void drain_loop(uv_loop_t *loop)
{
    while (uv_run(loop, UV_RUN_NOWAIT) != 0)
        uv_run(loop, UV_RUN_ONCE);
}

static inline int tcp_connect_local(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Waits up to timeout_ms for the peer to close (read returns 0 or an error). */
static inline bool wait_closed(int fd, int timeout_ms)
{
    uint8_t buf[4096];
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 50) > 0) {
            ssize_t n = read(fd, buf, sizeof(buf));
            if (n <= 0)
                return true;
        }
    }
    return false;
}

typedef struct {
    const uint8_t *body;
    size_t len;
    size_t off;
    int grpc_status;
    int http_status;
    bool closed;
} raw_stream_t;

static ssize_t raw_read(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                        uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    raw_stream_t *rs = src->ptr;
    size_t n = rs->len - rs->off < length ? rs->len - rs->off : length;
    if (n > 0)
        memcpy(buf, rs->body + rs->off, n);
    rs->off += n;
    if (rs->off == rs->len)
        *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

static int raw_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                      const uint8_t *value, size_t vlen, uint8_t flags, void *ud)
{
    raw_stream_t *rs = ud;
    char v[16] = {0};
    memcpy(v, value, vlen < 15 ? vlen : 15);
    if (nlen == 11 && memcmp(name, "grpc-status", 11) == 0)
        rs->grpc_status = atoi(v);
    if (nlen == 7 && memcmp(name, ":status", 7) == 0)
        rs->http_status = atoi(v);
    return 0;
}

static int raw_close(nghttp2_session *s, int32_t id, uint32_t err, void *ud)
{
    ((raw_stream_t *)ud)->closed = true;
    return 0;
}

/* Sends one request with the given body bytes (already framed, or not) to path, with an
 * optional extra header; returns the grpc-status (or -1 when none came), *http_p the HTTP
 * status. */
static inline int raw_call(int port, const char *path, const uint8_t *body, size_t len,
                           const char *hname, const char *hvalue, int *http_p)
{
    int fd = tcp_connect_local(port);
    if (fd < 0)
        return -2;
    raw_stream_t rs = {.body = body, .len = len, .grpc_status = -1};
    nghttp2_session_callbacks *cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_header_callback(cbs, raw_header);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, raw_close);
    nghttp2_session *s;
    nghttp2_session_client_new(&s, cbs, &rs);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, NULL, 0);
    nghttp2_nv nv[8];
    size_t n = 0;
#define NV(a, b) (nghttp2_nv){(uint8_t *)(a), (uint8_t *)(b), strlen(a), strlen(b), 0}
    nv[n++] = NV(":method", "POST");
    nv[n++] = NV(":scheme", "http");
    nv[n++] = NV(":path", path);
    nv[n++] = NV(":authority", "localhost");
    nv[n++] = NV("te", "trailers");
    nv[n++] = NV("content-type",
                 hname && strcmp(hname, "content-type") == 0 ? hvalue : "application/grpc");
    if (hname && strcmp(hname, "content-type") != 0)
        nv[n++] = NV(hname, hvalue);
#undef NV
    nghttp2_data_provider dp = {.source.ptr = &rs, .read_callback = raw_read};
    nghttp2_submit_request(s, NULL, nv, n, &dp, NULL);
    for (int iter = 0; iter < 200 && !rs.closed; iter++) {
        const uint8_t *out;
        ssize_t m;
        while ((m = nghttp2_session_mem_send(s, &out)) > 0)
            if (write(fd, out, (size_t)m) != m)
                break;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 25) > 0) {
            uint8_t buf[16384];
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r <= 0)
                break;
            if (nghttp2_session_mem_recv(s, buf, (size_t)r) < 0)
                break;
        }
    }
    nghttp2_session_del(s);
    close(fd);
    if (http_p)
        *http_p = rs.http_status;
    return rs.grpc_status;
}

#endif
