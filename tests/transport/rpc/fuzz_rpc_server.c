// Fuzz target for the server's whole request path without sockets: the input is the byte
// stream of one client connection (HTTP/2 preface, SETTINGS, HEADERS with HPACK, DATA with
// gRPC messages, RST_STREAM, ...) fed to a server-side session with the interop service
// registered; every response is generated and discarded. Seeds: make_h2_seeds.c.
#include <stdint.h>
#include <stdlib.h>

#include "interop.pb-c.h"
#include "rpc_int.h"

static uv_loop_t g_loop;
static rpc_server_t *g_srv;

static void h_unary(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__EchoRequest *req = (const Ferry__Test__EchoRequest *)m;
    Ferry__Test__EchoResponse resp = FERRY__TEST__ECHO_RESPONSE__INIT;
    resp.text = req->text;
    resp.payload = req->payload;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_stream(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__StreamRequest *req = (const Ferry__Test__StreamRequest *)m;
    for (uint32_t i = 0; i < req->count && i < 16; i++) {
        Ferry__Test__EchoResponse resp = FERRY__TEST__ECHO_RESPONSE__INIT;
        resp.seq = i;
        rpc_call_send(call, &resp.base);
    }
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_fail(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__FailRequest *req = (const Ferry__Test__FailRequest *)m;
    rpc_call_finish(call, req->code, req->message);
}

static const rpc_handler_cb k_handlers[] = {h_unary, h_stream, NULL, h_fail};
static const bool k_streaming[] = {false, true, false, false};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (g_srv == NULL) {
        uv_loop_init(&g_loop);
        rpc_server_params_t p;
        rpc_server_params_default(&p);
        p.max_message = 4096;
        if (rpc_server_create(&g_loop, &p, &g_srv) != FY_OK ||
            rpc_server_add_service(g_srv, &ferry__test__echo__descriptor, k_handlers, k_streaming,
                                   NULL) != FY_OK)
            abort();
    }
    size_t out = 0;
    (void)rpc_server_feed_raw(g_srv, data, size, &out);
    // Deadline timers of the calls close here.
    uv_run(&g_loop, UV_RUN_NOWAIT);
    if (rpc_server_calls_in_flight(g_srv) != 0)
        abort(); // every handler above finishes at once
    return 0;
}
