// Ferry's rpc client against Ferry's rpc server over loopback TCP: unary and streaming calls,
// deadlines, cancellation, size limits, unknown methods, status round trips, auth, retries,
// reconnect, round robin, graceful shutdown, and malformed requests sent by a raw HTTP/2
// client, after which the server must still serve.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "echo_service.h"
#include "ferry.pb-c.h"
#include "rpc_test_util.h"

#define EP(m) "/ferry.test.Echo/" m

typedef struct {
    uv_loop_t loop;
    echo_thread_t *srv;
    int port;
    rpc_channel_t *ch;
} fixture_t;

static rpc_channel_t *channel_to(uv_loop_t *loop, const int *ports, size_t n, const char *auth)
{
    char addrs[4][32];
    const char *list[4];
    for (size_t i = 0; i < n; i++) {
        snprintf(addrs[i], sizeof(addrs[i]), "127.0.0.1:%d", ports[i]);
        list[i] = addrs[i];
    }
    rpc_channel_params_t p;
    rpc_channel_params_default(&p);
    p.addresses = list;
    p.n_addresses = n;
    p.max_message = 64 * 1024;
    p.max_send_message = 128 * 1024;
    p.backoff_initial_ms = 20;
    p.backoff_max_ms = 100;
    p.authorization = auth;
    rpc_channel_t *ch = NULL;
    assert_int_equal(rpc_channel_create(loop, &p, &ch), FY_OK);
    return ch;
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    uv_loop_init(&f->loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.max_message = 64 * 1024;
    if (echo_thread_start(&p, &f->srv) != FY_OK)
        return -1;
    f->port = echo_thread_port(f->srv);
    f->ch = channel_to(&f->loop, &f->port, 1, NULL);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    rpc_channel_destroy(f->ch);
    drain_loop(&f->loop);
    echo_thread_stop(f->srv, 1000);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

static void test_unary(void **state)
{
    fixture_t *f = *state;
    uint8_t payload[1000];
    memset(payload, 7, sizeof(payload));
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    req.text = "hello";
    req.payload.data = payload;
    req.payload.len = sizeof(payload);
    result_t r;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_int_equal(r.n_msgs, 1);
    assert_string_equal(r.text, "hello");
    assert_int_equal(r.bytes, sizeof(payload));
    assert_int_equal(rpc_channel_connected(f->ch), 1);

    // The handler answers from another thread through the server's queue.
    req.from_thread = true;
    req.text = "threaded";
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_string_equal(r.text, "threaded");
}

static void test_stream_10000(void **state)
{
    fixture_t *f = *state;
    Ferry__Test__StreamRequest req = FERRY__TEST__STREAM_REQUEST__INIT;
    req.count = 10000;
    req.size = 16;
    result_t r;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Stream"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_int_equal(r.n_msgs, 10000);
    assert_true(r.in_order);
    assert_int_equal(r.bytes, 10000 * 16);
}

typedef struct {
    result_t r;
    bool paused;
} slow_reader_t;

static void slow_on_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    slow_reader_t *s = arg;
    test_on_msg(call, msg, &s->r);
    // Stall the client once, long enough for the server to fill every window.
    if (!s->paused && s->r.n_msgs == 1) {
        s->paused = true;
        fy_sleep_ns(300 * 1000000ull);
    }
}

static void slow_on_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    test_on_done(call, code, message, &((slow_reader_t *)arg)->r);
}

static void test_flow_control(void **state)
{
    // 400 x 60 KB = 24 MB: far more than the stream and connection windows, so the server
    // has to wait for WINDOW_UPDATEs, including across a stalled reader.
    fixture_t *f = *state;
    Ferry__Test__StreamRequest req = FERRY__TEST__STREAM_REQUEST__INIT;
    req.count = 400;
    req.size = 60000;
    slow_reader_t s = {0};
    result_init(&s.r);
    assert_int_equal(rpc_channel_call(f->ch, EP("Stream"), &req.base,
                                      &ferry__test__echo_response__descriptor, NULL, slow_on_msg,
                                      slow_on_done, &s, NULL),
                     FY_OK);
    run_until_done(&f->loop, &s.r);
    assert_int_equal(s.r.code, RPC_CODE_OK);
    assert_int_equal(s.r.n_msgs, 400);
    assert_true(s.r.in_order);
    assert_int_equal(s.r.bytes, 400u * 60000u);
    // Right after its burst the handler saw everything still queued behind the windows.
    assert_true(echo_service_stream_pending() >= 400u * 60000u);
}

static void test_many_concurrent_streams(void **state)
{
    fixture_t *f = *state;
    enum { N = 64 };
    result_t r[N];
    Ferry__Test__StreamRequest req = FERRY__TEST__STREAM_REQUEST__INIT;
    req.count = 100;
    req.size = 100;
    for (int i = 0; i < N; i++) {
        result_init(&r[i]);
        assert_int_equal(rpc_channel_call(f->ch, EP("Stream"), &req.base,
                                          &ferry__test__echo_response__descriptor, NULL,
                                          test_on_msg, test_on_done, &r[i], NULL),
                         FY_OK);
    }
    for (int i = 0; i < N; i++) {
        run_until_done(&f->loop, &r[i]);
        assert_int_equal(r[i].code, RPC_CODE_OK);
        assert_int_equal(r[i].n_msgs, 100);
        assert_true(r[i].in_order);
    }
}

static void test_streams_over_server_limit(void **state)
{
    // The server allows 4 concurrent streams; 64 calls queue on the client and all finish.
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.max_concurrent_streams = 4;
    echo_thread_t *srv;
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    int port = echo_thread_port(srv);
    rpc_channel_t *ch = channel_to(&loop, &port, 1, NULL);
    enum { N = 64 };
    result_t r[N];
    Ferry__Test__StreamRequest req = FERRY__TEST__STREAM_REQUEST__INIT;
    req.count = 20;
    req.size = 10;
    req.interval_ms = 1;
    for (int i = 0; i < N; i++) {
        result_init(&r[i]);
        assert_int_equal(rpc_channel_call(ch, EP("Stream"), &req.base,
                                          &ferry__test__echo_response__descriptor, NULL,
                                          test_on_msg, test_on_done, &r[i], NULL),
                         FY_OK);
    }
    for (int i = 0; i < N; i++) {
        run_until_done(&loop, &r[i]);
        assert_int_equal(r[i].code, RPC_CODE_OK);
        assert_int_equal(r[i].n_msgs, 20);
    }
    rpc_channel_destroy(ch);
    drain_loop(&loop);
    echo_thread_stop(srv, 100);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void wait_cancels(unsigned want)
{
    for (int i = 0; i < 200 && echo_service_cancels() < want; i++)
        fy_sleep_ns(10 * 1000000ull);
}

static void test_deadline(void **state)
{
    fixture_t *f = *state;
    unsigned before = echo_service_cancels();
    Ferry__Test__SlowRequest req = FERRY__TEST__SLOW_REQUEST__INIT;
    req.delay_ms = 3000;
    rpc_call_opts_t o = {.timeout_ms = 100};
    result_t r;
    result_init(&r);
    uint64_t t0 = fy_clock_ns();
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Slow"), &req.base, &o, &r), FY_OK);
    if (r.code != RPC_CODE_DEADLINE_EXCEEDED)
        print_error("status %d: %s\n", r.code, r.message);
    assert_int_equal(r.code, RPC_CODE_DEADLINE_EXCEEDED);
    assert_true(fy_clock_ns() - t0 < 2500 * 1000000ull);
    // The server saw the deadline too (grpc-timeout) and cancelled its handler.
    wait_cancels(before + 1);
    assert_true(echo_service_cancels() >= before + 1);
}

static void test_cancel_mid_stream(void **state)
{
    fixture_t *f = *state;
    unsigned before = echo_service_cancels();
    Ferry__Test__StreamRequest req = FERRY__TEST__STREAM_REQUEST__INIT;
    req.count = 1000;
    req.size = 8;
    req.interval_ms = 5;
    result_t r;
    result_init(&r);
    r.cancel_after = 3;
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Stream"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_CANCELLED);
    assert_int_equal(r.n_msgs, 3);
    wait_cancels(before + 1);
    assert_true(echo_service_cancels() >= before + 1);
    // The connection is still good for new calls.
    Ferry__Test__EchoRequest e = FERRY__TEST__ECHO_REQUEST__INIT;
    e.text = "after";
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &e.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
}

static void test_size_limits(void **state)
{
    fixture_t *f = *state;
    static uint8_t big[200 * 1024];
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    result_t r;

    // Just under the server's 64 KiB limit (the response is limited to 64 KiB as well).
    req.payload.data = big;
    req.payload.len = 64 * 1024 - 16;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_int_equal(r.bytes, 64 * 1024 - 16);

    // Over the server's limit: RESOURCE_EXHAUSTED from the server.
    req.payload.len = 70 * 1024;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_RESOURCE_EXHAUSTED);

    // Over the client's own send limit: refused before anything is sent.
    req.payload.len = sizeof(big);
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r),
                     FY_ERR_RESOURCE_EXHAUSTED);

    // A response over the client's receive limit.
    req.payload.len = 0;
    req.response_size = 80 * 1024;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_RESOURCE_EXHAUSTED);
}

static void test_status_and_unknown(void **state)
{
    fixture_t *f = *state;
    Ferry__Test__FailRequest fr = FERRY__TEST__FAIL_REQUEST__INIT;
    fr.code = RPC_CODE_NOT_FOUND;
    fr.message = "no such thing: \xc3\xbc 100%";
    result_t r;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Fail"), &fr.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_NOT_FOUND);
    assert_string_equal(r.message, "no such thing: \xc3\xbc 100%");

    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Nope"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_UNIMPLEMENTED);
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, "/no.Such/Service", &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_UNIMPLEMENTED);
    // A method the Worker service declares but this server never registered.
    Ferry__V1__CancelRequest cr = FERRY__V1__CANCEL_REQUEST__INIT;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, "/ferry.v1.Worker/Cancel", &cr.base, NULL, &r),
                     FY_OK);
    assert_int_equal(r.code, RPC_CODE_UNIMPLEMENTED);
}

static void test_malformed_requests(void **state)
{
    fixture_t *f = *state;
    int http = 0;
    // A length prefix promising more than arrives before END_STREAM.
    uint8_t trunc[] = {0, 0, 0, 0, 100, 1, 2, 3};
    assert_int_equal(raw_call(f->port, EP("Unary"), trunc, sizeof(trunc), NULL, NULL, &http),
                     RPC_CODE_INTERNAL);
    // Only part of the prefix.
    uint8_t half[] = {0, 0, 0};
    assert_int_equal(raw_call(f->port, EP("Unary"), half, sizeof(half), NULL, NULL, &http),
                     RPC_CODE_INTERNAL);
    // Compressed flag without grpc-encoding, and a flag byte that means nothing.
    uint8_t comp[] = {1, 0, 0, 0, 0};
    assert_int_equal(raw_call(f->port, EP("Unary"), comp, sizeof(comp), NULL, NULL, &http),
                     RPC_CODE_INTERNAL);
    uint8_t flag[] = {7, 0, 0, 0, 0};
    assert_int_equal(raw_call(f->port, EP("Unary"), flag, sizeof(flag), NULL, NULL, &http),
                     RPC_CODE_INTERNAL);
    // A 4 GiB length prefix.
    uint8_t huge[] = {0, 0xff, 0xff, 0xff, 0xff, 0};
    assert_int_equal(raw_call(f->port, EP("Unary"), huge, sizeof(huge), NULL, NULL, &http),
                     RPC_CODE_RESOURCE_EXHAUSTED);
    // Bytes that are not a protobuf message (field 1 with wire type 7).
    uint8_t junk[] = {0, 0, 0, 0, 3, 0x0f, 0xff, 0xff};
    assert_int_equal(raw_call(f->port, EP("Unary"), junk, sizeof(junk), NULL, NULL, &http),
                     RPC_CODE_INTERNAL);
    // No message at all, and two messages on a unary method.
    assert_int_equal(raw_call(f->port, EP("Unary"), NULL, 0, NULL, NULL, &http), RPC_CODE_INTERNAL);
    uint8_t two[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    assert_int_equal(raw_call(f->port, EP("Unary"), two, sizeof(two), NULL, NULL, &http),
                     RPC_CODE_INTERNAL);
    // Compression asked for, and a content type that is not gRPC.
    uint8_t empty[] = {0, 0, 0, 0, 0};
    assert_int_equal(
        raw_call(f->port, EP("Unary"), empty, sizeof(empty), "grpc-encoding", "gzip", &http),
        RPC_CODE_UNIMPLEMENTED);
    raw_call(f->port, EP("Unary"), empty, sizeof(empty), "content-type", "text/plain", &http);
    assert_int_equal(http, 415);
    assert_int_equal(
        raw_call(f->port, EP("Unary"), empty, sizeof(empty), "grpc-timeout", "12x", &http),
        RPC_CODE_INTERNAL);
    // A well-formed raw request still works.
    assert_int_equal(raw_call(f->port, EP("Unary"), empty, sizeof(empty), NULL, NULL, &http),
                     RPC_CODE_OK);
    assert_int_equal(http, 200);

    // Garbage instead of the HTTP/2 connection preface: the server closes that connection.
    int fd = tcp_connect_local(f->port);
    assert_true(fd >= 0);
    const char *http1 = "GET / HTTP/1.1\r\nHost: x\r\n\r\nPRI * garbage garbage garbage\r\n";
    assert_int_equal(write(fd, http1, strlen(http1)), (ssize_t)strlen(http1));
    assert_true(wait_closed(fd, 3000));
    close(fd);

    // And the server goes on serving other connections.
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    req.text = "still here";
    result_t r;
    result_init(&r);
    assert_int_equal(call_sync(&f->loop, f->ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_string_equal(r.text, "still here");
}

static void test_unavailable_and_reconnect(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    echo_thread_t *srv;
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    int port = echo_thread_port(srv);
    rpc_channel_t *ch = channel_to(&loop, &port, 1, NULL);
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    req.text = "x";
    result_t r;
    result_init(&r);
    assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);

    // Server gone: a non-retried call fails fast with UNAVAILABLE.
    echo_thread_stop(srv, 100);
    for (int i = 0; i < 20; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    result_init(&r);
    assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);

    // Back on the same port: the channel reconnects (wait_for_ready rides out the backoff).
    p.port = port;
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    rpc_call_opts_t o = {.wait_for_ready = true, .timeout_ms = 5000};
    result_init(&r);
    assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, &o, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);
    echo_thread_stop(srv, 100);

    // An idempotent call retries while the server comes back.
    for (int i = 0; i < 20; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    rpc_call_opts_t idem = {.idempotent = true, .max_attempts = 50, .timeout_ms = 5000};
    result_init(&r);
    assert_int_equal(rpc_channel_call(ch, EP("Unary"), &req.base,
                                      &ferry__test__echo_response__descriptor, &idem, test_on_msg,
                                      test_on_done, &r, NULL),
                     FY_OK);
    uint64_t t0 = fy_clock_ns();
    while (fy_clock_ns() - t0 < 150 * 1000000ull && !r.done)
        uv_run(&loop, UV_RUN_NOWAIT);
    assert_false(r.done);
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    run_until_done(&loop, &r);
    assert_int_equal(r.code, RPC_CODE_OK);

    // A restart between two calls: the dropped connection is not a failed attempt, so a
    // plain call (no retry, no wait) reconnects at once and succeeds.
    echo_thread_stop(srv, 100);
    uint64_t t1 = fy_clock_ns();
    while (rpc_channel_connected(ch) > 0 && fy_clock_ns() - t1 < 2000 * 1000000ull)
        uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(rpc_channel_connected(ch), 0);
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    result_init(&r);
    assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);

    rpc_channel_destroy(ch);
    drain_loop(&loop);
    echo_thread_stop(srv, 100);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_round_robin(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    echo_thread_t *a, *b;
    assert_int_equal(echo_thread_start(&p, &a), FY_OK);
    assert_int_equal(echo_thread_start(&p, &b), FY_OK);
    int ports[2] = {echo_thread_port(a), echo_thread_port(b)};
    rpc_channel_t *ch = channel_to(&loop, ports, 2, NULL);
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    for (int i = 0; i < 6; i++) {
        result_t r;
        result_init(&r);
        assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
        assert_int_equal(r.code, RPC_CODE_OK);
    }
    assert_int_equal(rpc_channel_connected(ch), 2);
    // One address down: calls keep succeeding on the other one.
    echo_thread_stop(a, 100);
    for (int i = 0; i < 20; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    rpc_call_opts_t o = {.idempotent = true};
    for (int i = 0; i < 6; i++) {
        result_t r;
        result_init(&r);
        assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, &o, &r), FY_OK);
        assert_int_equal(r.code, RPC_CODE_OK);
    }
    rpc_channel_destroy(ch);
    drain_loop(&loop);
    echo_thread_stop(b, 100);
    assert_int_equal(uv_loop_close(&loop), 0);
}

typedef struct {
    echo_thread_t *srv;
    uint32_t drain_ms;
} stopper_t;

static void stop_server(void *arg)
{
    stopper_t *s = arg;
    echo_thread_stop(s->srv, s->drain_ms);
}

static void test_graceful_shutdown(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    echo_thread_t *srv;
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    int port = echo_thread_port(srv);
    rpc_channel_t *ch = channel_to(&loop, &port, 1, NULL);
    Ferry__Test__SlowRequest req = FERRY__TEST__SLOW_REQUEST__INIT;
    req.delay_ms = 300;
    result_t r;
    result_init(&r);
    assert_int_equal(rpc_channel_call(ch, EP("Slow"), &req.base,
                                      &ferry__test__echo_response__descriptor, NULL, test_on_msg,
                                      test_on_done, &r, NULL),
                     FY_OK);
    uint64_t t0 = fy_clock_ns();
    while (fy_clock_ns() - t0 < 100 * 1000000ull)
        uv_run(&loop, UV_RUN_NOWAIT);
    // Shut down while the call is in flight: GOAWAY, the call still completes.
    stopper_t s = {srv, 5000};
    uv_thread_t th;
    assert_int_equal(uv_thread_create(&th, stop_server, &s), 0);
    run_until_done(&loop, &r);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_string_equal(r.text, "slow");
    uv_thread_join(&th);
    // Nothing listens any more.
    Ferry__Test__EchoRequest e = FERRY__TEST__ECHO_REQUEST__INIT;
    result_init(&r);
    assert_int_equal(call_sync(&loop, ch, EP("Unary"), &e.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);
    rpc_channel_destroy(ch);
    drain_loop(&loop);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_drain_timeout(void **state)
{
    // A call longer than the drain period is cancelled on the server and the client sees
    // the connection go.
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    echo_thread_t *srv;
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    int port = echo_thread_port(srv);
    rpc_channel_t *ch = channel_to(&loop, &port, 1, NULL);
    unsigned before = echo_service_cancels();
    Ferry__Test__SlowRequest req = FERRY__TEST__SLOW_REQUEST__INIT;
    req.delay_ms = 10000;
    result_t r;
    result_init(&r);
    assert_int_equal(rpc_channel_call(ch, EP("Slow"), &req.base,
                                      &ferry__test__echo_response__descriptor, NULL, test_on_msg,
                                      test_on_done, &r, NULL),
                     FY_OK);
    uint64_t t0 = fy_clock_ns();
    while (fy_clock_ns() - t0 < 100 * 1000000ull)
        uv_run(&loop, UV_RUN_NOWAIT);
    stopper_t s = {srv, 200};
    uv_thread_t th;
    assert_int_equal(uv_thread_create(&th, stop_server, &s), 0);
    run_until_done(&loop, &r);
    assert_int_equal(r.code, RPC_CODE_UNAVAILABLE);
    assert_true(fy_clock_ns() - t0 < 5000 * 1000000ull);
    uv_thread_join(&th);
    assert_true(echo_service_cancels() >= before + 1);
    rpc_channel_destroy(ch);
    drain_loop(&loop);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static fy_status_t need_token(void *arg, const char *path, const char *authorization)
{
    return authorization && strcmp(authorization, "Bearer s3cret") == 0 ? FY_OK
                                                                        : FY_ERR_UNAUTHENTICATED;
}

static void test_auth_and_keepalive(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.auth = need_token;
    p.keepalive_ms = 50;
    p.keepalive_timeout_ms = 200;
    echo_thread_t *srv;
    assert_int_equal(echo_thread_start(&p, &srv), FY_OK);
    int port = echo_thread_port(srv);
    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    result_t r;

    rpc_channel_t *anon = channel_to(&loop, &port, 1, NULL);
    result_init(&r);
    assert_int_equal(call_sync(&loop, anon, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_UNAUTHENTICATED);

    rpc_channel_t *ch = channel_to(&loop, &port, 1, "Bearer s3cret");
    result_init(&r);
    assert_int_equal(call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r), FY_OK);
    assert_int_equal(r.code, RPC_CODE_OK);

    // A live client answers the server's PINGs, so its connection stays up...
    uint64_t t0 = fy_clock_ns();
    while (fy_clock_ns() - t0 < 400 * 1000000ull)
        uv_run(&loop, UV_RUN_NOWAIT);
    assert_int_equal(rpc_channel_connected(ch), 1);
    // ...while a peer that never answers is dropped.
    int fd = tcp_connect_local(port);
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    assert_int_equal(write(fd, preface, sizeof(preface) - 1), (ssize_t)sizeof(preface) - 1);
    assert_true(wait_closed(fd, 3000));
    close(fd);

    rpc_channel_destroy(anon);
    rpc_channel_destroy(ch);
    drain_loop(&loop);
    echo_thread_stop(srv, 100);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_unary, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stream_10000, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_concurrent_streams, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flow_control, setup, teardown),
        cmocka_unit_test(test_streams_over_server_limit),
        cmocka_unit_test_setup_teardown(test_deadline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_mid_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_size_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_status_and_unknown, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_requests, setup, teardown),
        cmocka_unit_test(test_unavailable_and_reconnect),
        cmocka_unit_test(test_round_robin),
        cmocka_unit_test(test_graceful_shutdown),
        cmocka_unit_test(test_drain_timeout),
        cmocka_unit_test(test_auth_and_keepalive),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
