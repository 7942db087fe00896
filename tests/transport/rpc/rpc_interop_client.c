/*
 * rpc_interop_client: Ferry's rpc client calls a stock gRPC server (interop_server.py runs a
 * Python grpcio one) the same ways the Python client calls Ferry: unary, 10,000 streamed
 * messages, deadline, cancel mid-stream, near and over the server's size limit, unknown
 * method, status codes with messages.
 *
 *   rpc_interop_client HOST:PORT LIMIT_BYTES
 * Prints one line per check and "N passed, N failed"; exits non-zero on any failure.
 */
#include <stdlib.h>

#include "rpc_test_util.h"

#define EP(m) "/ferry.test.Echo/" m

static int g_passed, g_failed;

static void check(const char *name, bool ok, const result_t *r)
{
    if (ok) {
        g_passed++;
        printf("ok   %s\n", name);
    } else {
        g_failed++;
        printf("FAIL %s: status %d (%s) after %u messages\n", name, r->code, r->message, r->n_msgs);
    }
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: rpc_interop_client HOST:PORT LIMIT_BYTES\n");
        return 2;
    }
    uint32_t limit = (uint32_t)strtoul(argv[2], NULL, 10);
    uv_loop_t loop;
    uv_loop_init(&loop);
    rpc_channel_params_t p;
    rpc_channel_params_default(&p);
    const char *addr = argv[1];
    p.addresses = &addr;
    p.n_addresses = 1;
    p.max_message = 8u << 20;
    rpc_channel_t *ch;
    if (rpc_channel_create(&loop, &p, &ch) != FY_OK) {
        fprintf(stderr, "bad address %s\n", addr);
        return 2;
    }
    result_t r;
    rpc_call_opts_t wait = {.wait_for_ready = true, .timeout_ms = 10000};

    Ferry__Test__EchoRequest req = FERRY__TEST__ECHO_REQUEST__INIT;
    uint8_t small[1000];
    memset(small, 3, sizeof(small));
    req.text = "hello";
    req.payload.data = small;
    req.payload.len = sizeof(small);
    result_init(&r);
    call_sync(&loop, ch, EP("Unary"), &req.base, &wait, &r);
    check("unary",
          r.code == 0 && r.n_msgs == 1 && strcmp(r.text, "hello") == 0 && r.bytes == sizeof(small),
          &r);

    Ferry__Test__StreamRequest sreq = FERRY__TEST__STREAM_REQUEST__INIT;
    sreq.count = 10000;
    sreq.size = 32;
    result_init(&r);
    call_sync(&loop, ch, EP("Stream"), &sreq.base, &wait, &r);
    check("stream 10000", r.code == 0 && r.n_msgs == 10000 && r.in_order, &r);

    enum { N = 64 };
    static result_t many[N];
    for (int i = 0; i < N; i++) {
        result_init(&many[i]);
        rpc_channel_call(ch, EP("Unary"), &req.base, &ferry__test__echo_response__descriptor, NULL,
                         test_on_msg, test_on_done, &many[i], NULL);
    }
    bool all_ok = true;
    for (int i = 0; i < N; i++) {
        run_until_done(&loop, &many[i]);
        all_ok = all_ok && many[i].code == 0;
    }
    check("64 concurrent unary", all_ok, &many[0]);

    Ferry__Test__SlowRequest slow = FERRY__TEST__SLOW_REQUEST__INIT;
    slow.delay_ms = 5000;
    rpc_call_opts_t dl = {.timeout_ms = 200};
    result_init(&r);
    uint64_t t0 = fy_clock_ns();
    call_sync(&loop, ch, EP("Slow"), &slow.base, &dl, &r);
    check("deadline",
          r.code == RPC_CODE_DEADLINE_EXCEEDED && fy_clock_ns() - t0 < 3000ull * 1000000ull, &r);

    sreq.count = 1000;
    sreq.size = 8;
    sreq.interval_ms = 5;
    result_init(&r);
    r.cancel_after = 3;
    call_sync(&loop, ch, EP("Stream"), &sreq.base, NULL, &r);
    check("cancel mid-stream", r.code == RPC_CODE_CANCELLED && r.n_msgs == 3, &r);

    static uint8_t big[256 * 1024];
    req.text = "";
    req.payload.data = big;
    req.payload.len = limit - 16;
    result_init(&r);
    call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r);
    check("near the limit", r.code == 0 && r.bytes == limit - 16, &r);

    req.payload.len = limit + 100;
    result_init(&r);
    call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r);
    check("over the limit", r.code == RPC_CODE_RESOURCE_EXHAUSTED, &r);

    req.payload.len = 0;
    result_init(&r);
    call_sync(&loop, ch, EP("Nope"), &req.base, NULL, &r);
    check("unknown method", r.code == RPC_CODE_UNIMPLEMENTED, &r);

    bool codes_ok = true;
    for (int code = 1; code <= 16; code++) {
        Ferry__Test__FailRequest fr = FERRY__TEST__FAIL_REQUEST__INIT;
        fr.code = code;
        fr.message = "why: \xc3\xbc 100%";
        result_init(&r);
        call_sync(&loop, ch, EP("Fail"), &fr.base, NULL, &r);
        if (r.code != code || strcmp(r.message, fr.message) != 0) {
            printf("  code %d came back as %d (%s)\n", code, r.code, r.message);
            codes_ok = false;
        }
    }
    check("status codes", codes_ok, &r);

    req.text = "again";
    result_init(&r);
    call_sync(&loop, ch, EP("Unary"), &req.base, NULL, &r);
    check("still serving", r.code == 0 && strcmp(r.text, "again") == 0, &r);

    rpc_channel_destroy(ch);
    drain_loop(&loop);
    uv_loop_close(&loop);
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
