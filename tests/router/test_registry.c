// Router registry: placement picks the least-loaded prefill and the decode worker with the most
// free pages (or one on its node it can pair with), spreads requests placed between
// heartbeats, honours draining, exclusion and failure backoff, and forgets silent workers.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "router.h"

#define MS 1000000ull

static router_worker_t worker(const char *id, router_role_t role, uint32_t queued,
                              uint64_t free_pages, uint32_t running)
{
    router_worker_t w;
    memset(&w, 0, sizeof(w));
    snprintf(w.id, sizeof(w.id), "%s", id);
    w.role = role;
    snprintf(w.rpc_address, sizeof(w.rpc_address), "127.0.0.1:%d", 7000 + (int)strlen(id));
    w.model_fingerprint = 0xabc;
    w.load.queued_prefill_tokens = queued;
    w.load.free_kv_pages = free_pages;
    w.load.total_kv_pages = 1000;
    w.load.running_sequences = running;
    return w;
}

static router_registry_t *make(void)
{
    router_registry_t *reg = NULL;
    assert_int_equal(router_registry_create(NULL, &reg), FY_OK);
    router_worker_t ws[] = {
        worker("p1", ROUTER_ROLE_PREFILL, 500, 0, 0),
        worker("p2", ROUTER_ROLE_PREFILL, 100, 0, 0),
        worker("d1", ROUTER_ROLE_DECODE, 0, 300, 2),
        worker("d2", ROUTER_ROLE_DECODE, 0, 800, 9),
        worker("d3", ROUTER_ROLE_DECODE, 0, 800, 1),
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(ws); i++)
        assert_int_equal(router_registry_register(reg, &ws[i], 0), FY_OK);
    return reg;
}

static void test_placement_order_and_booking(void **state)
{
    router_registry_t *reg = make();
    router_place_req_t req = {.model_fingerprint = 0xabc, .prompt_tokens = 300, .kv_pages = 400};
    router_worker_t p, d;
    // p2 has fewer queued tokens; d2 and d3 tie on free pages, d3 runs fewer sequences.
    assert_int_equal(router_registry_place(reg, &req, 1, &p, &d), FY_OK);
    assert_string_equal(p.id, "p2");
    assert_string_equal(d.id, "d3");
    // Booked: p2 now has 400 queued (still < 500), d3 has 400 free pages, so d2 is next.
    assert_int_equal(router_registry_place(reg, &req, 2, &p, &d), FY_OK);
    assert_string_equal(p.id, "p2");
    assert_string_equal(d.id, "d2");
    // p2: 700 > p1: 500 now.
    assert_int_equal(router_registry_place(reg, &req, 3, &p, &d), FY_OK);
    assert_string_equal(p.id, "p1");
    // d2 and d3 both have 400 free now; d3 runs 2 sequences to d2's 10.
    assert_string_equal(d.id, "d3");
    assert_int_equal(d.load.free_kv_pages, 0);
    assert_int_equal(d.load.running_sequences, 3);
    assert_int_equal(router_registry_place(reg, &req, 4, &p, &d), FY_OK);
    assert_string_equal(d.id, "d2");
    assert_int_equal(router_registry_place(reg, &req, 5, &p, &d), FY_ERR_RESOURCE_EXHAUSTED);
    router_registry_destroy(reg);
}

/* A decode worker on the prefill worker's node (same pair link, another GPU) is preferred
 * while it has at least half the free pages of the best one; one on the same GPU is not. */
static void test_pair_preference(void **state)
{
    (void)state;
    router_registry_t *reg = NULL;
    assert_int_equal(router_registry_create(NULL, &reg), FY_OK);
    router_worker_t ws[] = {
        worker("p", ROUTER_ROLE_PREFILL, 0, 0, 0),
        worker("far", ROUTER_ROLE_DECODE, 0, 800, 0),
        worker("near", ROUTER_ROLE_DECODE, 0, 500, 0),
        worker("samegpu", ROUTER_ROLE_DECODE, 0, 700, 0),
    };
    const char *gpu[] = {"g0", "", "g1", "g0"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(ws); i++) {
        if (i != 1) { // "far" is on another node
            snprintf(ws[i].pair_link, sizeof(ws[i].pair_link), "nccl");
            snprintf(ws[i].node_id, sizeof(ws[i].node_id), "node-a");
        }
        snprintf(ws[i].pair_device, sizeof(ws[i].pair_device), "%s", gpu[i]);
        assert_int_equal(router_registry_register(reg, &ws[i], 0), FY_OK);
    }
    assert_true(router_can_pair(&ws[0], &ws[2]));
    assert_false(router_can_pair(&ws[0], &ws[1]));
    assert_false(router_can_pair(&ws[0], &ws[3]));
    router_place_req_t req = {.model_fingerprint = 0xabc, .prompt_tokens = 10, .kv_pages = 100};
    router_worker_t p, d;
    // near: 500, 400 free (>= half of far's 800): near; then 300 < 400: far (the most free).
    assert_int_equal(router_registry_place(reg, &req, 1, &p, &d), FY_OK);
    assert_string_equal(d.id, "near");
    assert_int_equal(router_registry_place(reg, &req, 2, &p, &d), FY_OK);
    assert_string_equal(d.id, "near");
    assert_int_equal(router_registry_place(reg, &req, 3, &p, &d), FY_OK);
    assert_string_equal(d.id, "far");
    router_registry_destroy(reg);
}

static void test_capacity_and_availability(void **state)
{
    router_registry_t *reg = make();
    router_place_req_t req = {.model_fingerprint = 0xabc, .prompt_tokens = 10, .kv_pages = 900};
    assert_int_equal(router_registry_place(reg, &req, 1, NULL, NULL), FY_ERR_RESOURCE_EXHAUSTED);
    req.kv_pages = 10;
    req.model_fingerprint = 0xdef; // nobody serves this model
    assert_int_equal(router_registry_place(reg, &req, 1, NULL, NULL), FY_ERR_UNAVAILABLE);
    // Draining every decode worker leaves no pair.
    req.model_fingerprint = 0;
    assert_int_equal(router_registry_set_draining(reg, "d1", true), FY_OK);
    assert_int_equal(router_registry_set_draining(reg, "d2", true), FY_OK);
    assert_int_equal(router_registry_set_draining(reg, "d3", true), FY_OK);
    assert_int_equal(router_registry_place(reg, &req, 1, NULL, NULL), FY_ERR_UNAVAILABLE);
    assert_int_equal(router_registry_set_draining(reg, "d1", false), FY_OK);
    router_worker_t d;
    assert_int_equal(router_registry_place(reg, &req, 1, NULL, &d), FY_OK);
    assert_string_equal(d.id, "d1");
    assert_int_equal(router_registry_set_draining(reg, "nope", true), FY_ERR_NOT_FOUND);
    router_registry_destroy(reg);
}

static void test_exclusion_and_backoff(void **state)
{
    router_registry_t *reg = make();
    router_place_req_t req = {.prompt_tokens = 1, .kv_pages = 1, .exclude_decode = "d3"};
    router_worker_t p, d;
    assert_int_equal(router_registry_place(reg, &req, 1, &p, &d), FY_OK);
    assert_string_equal(d.id, "d2");
    req.exclude_decode = NULL;
    // A failure on p2 makes p1 preferred until the backoff (2 s) runs out.
    router_registry_report(reg, "p2", false, 10 * MS);
    assert_int_equal(router_registry_place(reg, &req, 20 * MS, &p, &d), FY_OK);
    assert_string_equal(p.id, "p1");
    assert_int_equal(router_registry_place(reg, &req, 2100 * MS, &p, &d), FY_OK);
    assert_string_equal(p.id, "p2");
    // A second failure doubles the backoff.
    router_registry_report(reg, "p2", false, 3000 * MS);
    router_registry_report(reg, "p2", false, 3000 * MS);
    assert_int_equal(router_registry_place(reg, &req, 3000 * MS + 7000 * MS, &p, &d), FY_OK);
    assert_string_equal(p.id, "p1");
    // Backed-off workers still serve when nothing else can.
    router_registry_set_draining(reg, "p1", true);
    assert_int_equal(router_registry_place(reg, &req, 3001 * MS, &p, &d), FY_OK);
    assert_string_equal(p.id, "p2");
    router_registry_report(reg, "p2", true, 3002 * MS);
    router_worker_t snap[8];
    size_t n = router_registry_snapshot(reg, snap, 8);
    assert_int_equal(n, 5);
    for (size_t i = 0; i < n; i++)
        if (strcmp(snap[i].id, "p2") == 0)
            assert_int_equal(snap[i].consecutive_failures, 0);
    router_registry_destroy(reg);
}

static void test_heartbeat_expiry_release(void **state)
{
    router_registry_t *reg = make(); // lease 1000 ms, expiry after 3 leases
    router_load_t load = {.free_kv_pages = 50, .total_kv_pages = 1000};
    assert_int_equal(router_registry_heartbeat(reg, "d1", &load, 2500 * MS), FY_OK);
    assert_int_equal(router_registry_heartbeat(reg, "p2", NULL, 2500 * MS), FY_OK);
    assert_int_equal(router_registry_heartbeat(reg, "ghost", NULL, 2500 * MS), FY_ERR_NOT_FOUND);
    char ids[8][64];
    assert_int_equal(router_registry_expire(reg, 2900 * MS, ids, 8), 0);
    size_t removed = router_registry_expire(reg, 3100 * MS, ids, 8);
    assert_int_equal(removed, 3); // p1, d2, d3 were last seen at 0
    assert_int_equal(router_registry_snapshot(reg, NULL, 0), 2);
    // Only d1 (50 free pages) and p2 remain.
    router_place_req_t req = {.prompt_tokens = 64, .kv_pages = 40};
    router_worker_t p, d;
    assert_int_equal(router_registry_place(reg, &req, 3200 * MS, &p, &d), FY_OK);
    assert_int_equal(d.load.free_kv_pages, 10);
    assert_int_equal(router_registry_place(reg, &req, 3200 * MS, &p, &d),
                     FY_ERR_RESOURCE_EXHAUSTED);
    router_registry_release(reg, "p2", 64, "d1", 40);
    assert_int_equal(router_registry_place(reg, &req, 3200 * MS, &p, &d), FY_OK);
    assert_int_equal(router_registry_remove(reg, "d1"), FY_OK);
    assert_int_equal(router_registry_remove(reg, "d1"), FY_ERR_NOT_FOUND);
    assert_int_equal(router_registry_place(reg, &req, 3200 * MS, &p, &d), FY_ERR_UNAVAILABLE);
    router_registry_destroy(reg);
}

static void test_bad_registration(void **state)
{
    router_registry_params_t params;
    router_registry_params_default(&params);
    params.max_workers = 2;
    router_registry_t *reg = NULL;
    assert_int_equal(router_registry_create(&params, &reg), FY_OK);
    router_worker_t w = worker("", ROUTER_ROLE_PREFILL, 0, 0, 0);
    assert_int_equal(router_registry_register(reg, &w, 0), FY_ERR_INVALID_ARG);
    w = worker("x", (router_role_t)7, 0, 0, 0);
    assert_int_equal(router_registry_register(reg, &w, 0), FY_ERR_INVALID_ARG);
    w = worker("a", ROUTER_ROLE_PREFILL, 0, 0, 0);
    assert_int_equal(router_registry_register(reg, &w, 0), FY_OK);
    assert_int_equal(router_registry_register(reg, &w, 0), FY_OK); // same id: refresh
    w = worker("b", ROUTER_ROLE_DECODE, 0, 0, 0);
    assert_int_equal(router_registry_register(reg, &w, 0), FY_OK);
    w = worker("c", ROUTER_ROLE_DECODE, 0, 0, 0);
    assert_int_equal(router_registry_register(reg, &w, 0), FY_ERR_RESOURCE_EXHAUSTED);
    router_registry_destroy(reg);
    router_registry_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_placement_order_and_booking),
        cmocka_unit_test(test_pair_preference),
        cmocka_unit_test(test_capacity_and_availability),
        cmocka_unit_test(test_exclusion_and_backoff),
        cmocka_unit_test(test_heartbeat_expiry_release),
        cmocka_unit_test(test_bad_registration),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
