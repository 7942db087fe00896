// Worker agent against the router's registry service, in process over loopback: registration
// with role, addresses and load; heartbeats that refresh the load; registering again when the
// router forgot the worker or restarted; waiting for a router that is not up yet; draining.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry.pb-c.h"
#include "router.h"
#include "rpc.h"

#define FP 0xfeedull

typedef struct {
    uv_loop_t loop;
    router_registry_t *reg;
    rpc_server_t *srv;
    int port;
    router_agent_t *agent;
    router_load_t load; // what the load callback reports
    unsigned load_calls;
} fixture_t;

static void fill_load(void *arg, router_load_t *load_p)
{
    fixture_t *f = arg;
    f->load_calls++;
    *load_p = f->load;
}

static void drain_loop(uv_loop_t *loop)
{
    while (uv_run(loop, UV_RUN_NOWAIT) != 0)
        uv_run(loop, UV_RUN_ONCE);
}

static void on_wake(uv_timer_t *t)
{
}

/* Runs the loop until cond(f) holds or timeout_ms passes; returns cond(f). */
static bool run_until(fixture_t *f, bool (*cond)(fixture_t *), uint32_t timeout_ms)
{
    uv_timer_t wake;
    uv_timer_init(&f->loop, &wake);
    uv_timer_start(&wake, on_wake, 5, 5);
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    bool ok;
    while (!(ok = cond(f)) && fy_clock_ns() < end)
        uv_run(&f->loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&wake, NULL);
    uv_run(&f->loop, UV_RUN_NOWAIT);
    return ok;
}

static void start_router(fixture_t *f, int port)
{
    router_registry_params_t rp;
    router_registry_params_default(&rp);
    rp.lease_ms = 100;
    assert_int_equal(router_registry_create(&rp, &f->reg), FY_OK);
    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    sp.port = port;
    assert_int_equal(rpc_server_create(&f->loop, &sp, &f->srv), FY_OK);
    assert_int_equal(router_registry_serve(f->srv, f->reg), FY_OK);
    assert_int_equal(router_registry_serve(f->srv, f->reg), FY_ERR_EXISTS);
    f->port = rpc_server_port(f->srv);
}

static void on_drained(rpc_server_t *srv, void *arg)
{
    *(bool *)arg = true;
}

static void stop_router(fixture_t *f)
{
    bool drained = false;
    rpc_server_shutdown(f->srv, 200, on_drained, &drained);
    while (!drained)
        uv_run(&f->loop, UV_RUN_ONCE);
    rpc_server_destroy(f->srv);
    f->srv = NULL;
    router_registry_destroy(f->reg);
    f->reg = NULL;
}

static void start_agent(fixture_t *f, router_role_t role)
{
    char router[32];
    snprintf(router, sizeof(router), "127.0.0.1:%d", f->port);
    router_agent_params_t ap;
    memset(&ap, 0, sizeof(ap));
    ap.router_address = router;
    ap.role = role;
    ap.rpc_address = "127.0.0.1:6001";
    ap.kv_address = role == ROUTER_ROLE_DECODE ? "127.0.0.1:6002" : NULL;
    ap.model_name = "test-model";
    ap.model_fingerprint = FP;
    ap.retry_ms = 20;
    ap.load = fill_load;
    ap.load_arg = f;
    assert_int_equal(router_agent_create(&f->loop, &ap, &f->agent), FY_OK);
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    uv_loop_init(&f->loop);
    start_router(f, 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    router_agent_destroy(f->agent);
    if (f->srv != NULL)
        stop_router(f);
    drain_loop(&f->loop);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    free(f);
    return 0;
}

static bool registered_once(fixture_t *f)
{
    return router_agent_registrations(f->agent) >= 1;
}

static bool load_seen(fixture_t *f)
{
    router_worker_t w;
    return router_registry_get(f->reg, router_agent_worker_id(f->agent), &w) == FY_OK &&
           w.load.free_kv_pages == f->load.free_kv_pages &&
           w.load.running_sequences == f->load.running_sequences;
}

static void test_register_and_heartbeat(void **state)
{
    fixture_t *f = *state;
    f->load = (router_load_t){.free_kv_pages = 500, .total_kv_pages = 512, .page_bytes = 4096};
    start_agent(f, ROUTER_ROLE_DECODE);
    assert_true(run_until(f, registered_once, 3000));
    assert_true(router_agent_registered(f->agent));
    assert_string_equal(router_agent_worker_id(f->agent), "decode@127.0.0.1:6001");
    router_worker_t w;
    assert_int_equal(router_registry_get(f->reg, "decode@127.0.0.1:6001", &w), FY_OK);
    assert_int_equal(w.role, ROUTER_ROLE_DECODE);
    assert_string_equal(w.rpc_address, "127.0.0.1:6001");
    assert_string_equal(w.kv_address, "127.0.0.1:6002");
    assert_int_equal(w.model_fingerprint, FP);
    assert_int_equal(w.load.free_kv_pages, 500);
    assert_int_equal(w.load.page_bytes, 4096);
    assert_false(w.draining);
    // The load changes; the next heartbeats carry it (lease 100 ms: a beat every 50 ms).
    f->load.free_kv_pages = 123;
    f->load.running_sequences = 7;
    assert_true(run_until(f, load_seen, 2000));
    uint64_t beats = router_agent_heartbeats(f->agent);
    assert_true(beats >= 1);
    // Heartbeats keep a worker alive past the expiry (3 leases = 300 ms).
    uint64_t end = fy_clock_ns() + 500000000ull;
    while (fy_clock_ns() < end)
        uv_run(&f->loop, UV_RUN_ONCE);
    assert_int_equal(router_registry_expire(f->reg, fy_clock_ns(), NULL, 0), 0);
    assert_true(router_agent_heartbeats(f->agent) >= beats + 5);
    assert_int_equal(router_agent_registrations(f->agent), 1);
}

static bool registered_twice(fixture_t *f)
{
    return router_agent_registrations(f->agent) >= 2 &&
           router_registry_get(f->reg, router_agent_worker_id(f->agent), NULL) == FY_OK;
}

static void test_reregister_when_forgotten(void **state)
{
    fixture_t *f = *state;
    start_agent(f, ROUTER_ROLE_PREFILL);
    assert_true(run_until(f, registered_once, 3000));
    // The router expires or forgets the worker: the next heartbeat is answered known = false.
    assert_int_equal(router_registry_remove(f->reg, "prefill@127.0.0.1:6001"), FY_OK);
    assert_true(run_until(f, registered_twice, 3000));
    router_worker_t w;
    assert_int_equal(router_registry_get(f->reg, "prefill@127.0.0.1:6001", &w), FY_OK);
    assert_int_equal(w.role, ROUTER_ROLE_PREFILL);
}

static void test_router_restart(void **state)
{
    fixture_t *f = *state;
    start_agent(f, ROUTER_ROLE_DECODE);
    assert_true(run_until(f, registered_once, 3000));
    int port = f->port;
    stop_router(f);
    // Heartbeats fail while the router is down; nothing breaks.
    uint64_t end = fy_clock_ns() + 300000000ull;
    while (fy_clock_ns() < end)
        uv_run(&f->loop, UV_RUN_NOWAIT), fy_sleep_ns(5000000);
    start_router(f, port); // a fresh registry on the same address knows nobody
    assert_true(run_until(f, registered_twice, 5000));
}

static void test_router_not_up_yet(void **state)
{
    fixture_t *f = *state;
    int port = f->port;
    stop_router(f);
    start_agent(f, ROUTER_ROLE_PREFILL);
    uint64_t end = fy_clock_ns() + 200000000ull;
    while (fy_clock_ns() < end)
        uv_run(&f->loop, UV_RUN_NOWAIT), fy_sleep_ns(5000000);
    assert_false(router_agent_registered(f->agent));
    start_router(f, port);
    assert_true(run_until(f, registered_once, 5000));
}

static bool is_draining(fixture_t *f)
{
    router_worker_t w;
    return router_registry_get(f->reg, router_agent_worker_id(f->agent), &w) == FY_OK &&
           w.draining;
}

static bool not_draining(fixture_t *f)
{
    router_worker_t w;
    return router_registry_get(f->reg, router_agent_worker_id(f->agent), &w) == FY_OK &&
           !w.draining;
}

static void test_drain(void **state)
{
    fixture_t *f = *state;
    f->load = (router_load_t){.free_kv_pages = 100, .total_kv_pages = 100};
    start_agent(f, ROUTER_ROLE_DECODE);
    // A prefill worker registered directly, so placement has a pair.
    router_worker_t p;
    memset(&p, 0, sizeof(p));
    snprintf(p.id, sizeof(p.id), "p1");
    p.role = ROUTER_ROLE_PREFILL;
    snprintf(p.rpc_address, sizeof(p.rpc_address), "127.0.0.1:7000");
    p.model_fingerprint = FP;
    assert_int_equal(router_registry_register(f->reg, &p, fy_clock_ns()), FY_OK);
    assert_true(run_until(f, registered_once, 3000));
    router_place_req_t req = {.model_fingerprint = FP, .prompt_tokens = 10, .kv_pages = 1};
    router_worker_t pw, dw;
    assert_int_equal(router_registry_place(f->reg, &req, fy_clock_ns(), &pw, &dw), FY_OK);
    assert_string_equal(dw.id, router_agent_worker_id(f->agent));

    router_agent_set_draining(f->agent, true);
    assert_true(run_until(f, is_draining, 2000));
    assert_int_equal(router_registry_place(f->reg, &req, fy_clock_ns(), &pw, &dw),
                     FY_ERR_UNAVAILABLE);
    // A draining worker the router forgot says so again right after registering.
    router_registry_remove(f->reg, router_agent_worker_id(f->agent));
    assert_true(run_until(f, registered_twice, 3000));
    assert_true(run_until(f, is_draining, 2000));
    router_agent_set_draining(f->agent, false);
    assert_true(run_until(f, not_draining, 2000));
    assert_int_equal(router_registry_place(f->reg, &req, fy_clock_ns(), &pw, &dw), FY_OK);
}

typedef struct {
    int code;
    bool done;
} call_result_t;

static void on_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    call_result_t *r = arg;
    r->code = code;
    r->done = true;
}

static int raw_register(fixture_t *f, rpc_channel_t *ch, const Ferry__V1__RegisterRequest *req)
{
    call_result_t r = {0};
    assert_int_equal(rpc_channel_call(ch, "/ferry.v1.Worker/RegisterWorker", &req->base,
                                      &ferry__v1__register_response__descriptor, NULL, NULL,
                                      on_done, &r, NULL),
                     FY_OK);
    while (!r.done)
        uv_run(&f->loop, UV_RUN_ONCE);
    return r.code;
}

static void test_service_validation(void **state)
{
    fixture_t *f = *state;
    char addr[32];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", f->port);
    const char *list[1] = {addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = list;
    cp.n_addresses = 1;
    rpc_channel_t *ch = NULL;
    assert_int_equal(rpc_channel_create(&f->loop, &cp, &ch), FY_OK);

    Ferry__V1__RegisterRequest req = FERRY__V1__REGISTER_REQUEST__INIT;
    req.worker_id = "";
    req.role = FERRY__V1__WORKER_ROLE__WORKER_ROLE_PREFILL;
    req.rpc_address = "127.0.0.1:1";
    assert_int_equal(raw_register(f, ch, &req), RPC_CODE_INVALID_ARGUMENT);
    char longid[100];
    memset(longid, 'x', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    req.worker_id = longid;
    assert_int_equal(raw_register(f, ch, &req), RPC_CODE_INVALID_ARGUMENT);
    req.worker_id = "w";
    req.role = FERRY__V1__WORKER_ROLE__WORKER_ROLE_UNSPECIFIED;
    assert_int_equal(raw_register(f, ch, &req), RPC_CODE_INVALID_ARGUMENT);
    req.role = FERRY__V1__WORKER_ROLE__WORKER_ROLE_DECODE; // without kv_address
    assert_int_equal(raw_register(f, ch, &req), RPC_CODE_INVALID_ARGUMENT);
    req.rpc_address = "";
    req.role = FERRY__V1__WORKER_ROLE__WORKER_ROLE_PREFILL;
    assert_int_equal(raw_register(f, ch, &req), RPC_CODE_INVALID_ARGUMENT);
    req.rpc_address = "127.0.0.1:1";
    assert_int_equal(raw_register(f, ch, &req), RPC_CODE_OK);
    assert_int_equal(router_registry_get(f->reg, "w", NULL), FY_OK);
    // The rest of the Worker service is not the router's.
    Ferry__V1__CancelRequest cancel = FERRY__V1__CANCEL_REQUEST__INIT;
    call_result_t r = {0};
    assert_int_equal(rpc_channel_call(ch, "/ferry.v1.Worker/Cancel", &cancel.base,
                                      &ferry__v1__cancel_response__descriptor, NULL, NULL, on_done,
                                      &r, NULL),
                     FY_OK);
    while (!r.done)
        uv_run(&f->loop, UV_RUN_ONCE);
    assert_int_equal(r.code, RPC_CODE_UNIMPLEMENTED);
    rpc_channel_destroy(ch);
}

static void test_create_validation(void **state)
{
    fixture_t *f = *state;
    router_agent_params_t ap;
    memset(&ap, 0, sizeof(ap));
    router_agent_t *a = NULL;
    assert_int_equal(router_agent_create(&f->loop, &ap, &a), FY_ERR_INVALID_ARG);
    ap.router_address = "127.0.0.1:1";
    ap.rpc_address = "127.0.0.1:2";
    assert_int_equal(router_agent_create(&f->loop, &ap, &a), FY_ERR_INVALID_ARG); // no role
    ap.role = ROUTER_ROLE_DECODE;
    assert_int_equal(router_agent_create(&f->loop, &ap, &a), FY_ERR_INVALID_ARG); // no kv
    ap.role = ROUTER_ROLE_PREFILL;
    ap.router_address = "not an address";
    assert_int_equal(router_agent_create(&f->loop, &ap, &a), FY_ERR_INVALID_ARG);
    assert_null(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_register_and_heartbeat, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reregister_when_forgotten, setup, teardown),
        cmocka_unit_test_setup_teardown(test_router_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_router_not_up_yet, setup, teardown),
        cmocka_unit_test_setup_teardown(test_drain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_service_validation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_validation, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
