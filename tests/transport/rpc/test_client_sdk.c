// libferry-client against a Ferry rpc server with canned ferry.v1.Ferry answers: the blocking
// calls (Health, Complete, Tokenize, ListModels, Generate with early stop), the asynchronous
// API on a caller's loop with cancel, address lists and error reporting.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "echo_service.h"
#include "ferry_client.h"

static echo_thread_t *g_srv;
static char g_addr[64];

static int group_setup(void **state)
{
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    if (echo_thread_start(&p, &g_srv) != FY_OK)
        return -1;
    // A dead address first: round robin must still get every call through.
    snprintf(g_addr, sizeof(g_addr), "127.0.0.1:1,127.0.0.1:%d", echo_thread_port(g_srv));
    return 0;
}

static int group_teardown(void **state)
{
    echo_thread_stop(g_srv, 1000);
    return 0;
}

static ferry_client_t *blocking_client(const char *addrs)
{
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = addrs;
    p.timeout_ms = 5000;
    ferry_client_t *c = NULL;
    assert_int_equal(ferry_client_create(&p, &c), 0);
    return c;
}

static void test_blocking_calls(void **state)
{
    ferry_client_t *c = blocking_client(g_addr);
    ferry_error_t err;
    for (int i = 0; i < 4; i++) {
        Ferry__V1__HealthResponse *h = NULL;
        assert_int_equal(ferry_health(c, NULL, &h, &err), 0);
        assert_int_equal(h->status, FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING);
        assert_string_equal(h->role, "echo");
        ferry_message_free(h);
    }

    Ferry__V1__GenerateRequest g = FERRY__V1__GENERATE_REQUEST__INIT;
    g.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
    g.prompt = "hello world";
    Ferry__V1__CompleteResponse *cr = NULL;
    assert_int_equal(ferry_complete(c, &g, &cr, &err), 0);
    assert_string_equal(cr->text, "hello world");
    ferry_message_free(cr);

    Ferry__V1__GenerateRequest bad = FERRY__V1__GENERATE_REQUEST__INIT;
    cr = NULL;
    assert_int_equal(ferry_complete(c, &bad, &cr, &err), 3);
    assert_int_equal(err.code, 3);
    assert_string_equal(err.message, "prompt required");
    assert_null(cr);

    Ferry__V1__TokenizeRequest t = FERRY__V1__TOKENIZE_REQUEST__INIT;
    t.text = "AB";
    Ferry__V1__TokenizeResponse *tr = NULL;
    assert_int_equal(ferry_tokenize(c, &t, &tr, &err), 0);
    assert_int_equal(tr->n_ids, 2);
    assert_int_equal(tr->ids[0], 'A');
    ferry_message_free(tr);

    Ferry__V1__ListModelsResponse *lm = NULL;
    assert_int_equal(ferry_list_models(c, &lm, &err), 0);
    assert_int_equal(lm->n_models, 1);
    assert_string_equal(lm->models[0]->name, "echo");
    ferry_message_free(lm);
    ferry_client_destroy(c);
}

typedef struct {
    int n;
    int stop_after;
    char last[16];
    int finish;
} gen_t;

static int on_chunk(void *arg, const Ferry__V1__GenerateResponse *chunk)
{
    gen_t *g = arg;
    g->n++;
    snprintf(g->last, sizeof(g->last), "%s", chunk->text);
    g->finish = chunk->finish_reason;
    return g->stop_after && g->n >= g->stop_after;
}

static void test_generate_stream(void **state)
{
    ferry_client_t *c = blocking_client(g_addr);
    Ferry__V1__SamplingParams sp = FERRY__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 1000;
    Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
    req.sampling = &sp;
    gen_t g = {0};
    ferry_error_t err;
    assert_int_equal(ferry_generate(c, &req, on_chunk, &g, &err), 0);
    assert_int_equal(g.n, 1000);
    assert_string_equal(g.last, "t999");
    assert_int_equal(g.finish, FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    // Stopping early cancels the call.
    gen_t g2 = {.stop_after = 3};
    assert_int_equal(ferry_generate(c, &req, on_chunk, &g2, &err), 1);
    assert_int_equal(g2.n, 3);
    ferry_client_destroy(c);
}

static void test_errors(void **state)
{
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    ferry_client_t *c = NULL;
    p.addresses = "no-port-here";
    assert_int_not_equal(ferry_client_create(&p, &c), 0);
    p.addresses = "";
    assert_int_not_equal(ferry_client_create(&p, &c), 0);
    c = blocking_client("127.0.0.1:1");
    ferry_error_t err;
    Ferry__V1__HealthResponse *h = NULL;
    assert_int_equal(ferry_health(c, NULL, &h, &err), 14);
    assert_string_equal(ferry_code_name(err.code), "UNAVAILABLE");
    assert_null(h);
    ferry_client_destroy(c);
}

typedef struct {
    int msgs;
    int code;
    bool done;
    ferry_call_t *call;
} async_t;

static void a_msg(ferry_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    async_t *a = arg;
    if (++a->msgs == 2)
        ferry_call_cancel(call);
}

static void a_done(ferry_call_t *call, int code, const char *message, void *arg)
{
    async_t *a = arg;
    a->code = code;
    a->done = true;
}

static void test_async_on_loop(void **state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = g_addr;
    ferry_client_t *c;
    assert_int_equal(ferry_client_create_on_loop(&loop, &p, &c), 0);
    Ferry__V1__HealthRequest hreq = FERRY__V1__HEALTH_REQUEST__INIT;
    Ferry__V1__GenerateRequest greq = FERRY__V1__GENERATE_REQUEST__INIT;
    async_t h = {0}, g = {0};
    ferry_call_opts_t idem = {.idempotent = true};
    assert_int_equal(ferry_call_async(c, "/ferry.v1.Ferry/Health", &hreq.base,
                                      &ferry__v1__health_response__descriptor, &idem, NULL, a_done,
                                      &h, NULL),
                     0);
    assert_int_equal(ferry_call_async(c, "/ferry.v1.Ferry/Generate", &greq.base,
                                      &ferry__v1__generate_response__descriptor, &idem, a_msg,
                                      a_done, &g, &g.call),
                     0);
    while (!h.done || !g.done)
        uv_run(&loop, UV_RUN_ONCE);
    assert_int_equal(h.code, 0);
    assert_int_equal(g.code, 1);
    assert_int_equal(g.msgs, 2);
    // Blocking calls on an async client are refused rather than deadlocking its loop.
    ferry_error_t err;
    assert_int_equal(ferry_health(c, NULL, NULL, &err), 9);
    ferry_client_destroy(c);
    while (uv_run(&loop, UV_RUN_NOWAIT) != 0)
        ;
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_blocking_calls),
        cmocka_unit_test(test_generate_stream),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_async_on_loop),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
