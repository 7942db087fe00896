// Admission leases: reservations never over-commit the pool, expire when no KV arrives (a
// frame renews them), release everything they held, and commit returns unused promised pages.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <string.h>

#include "decode.h"

#define MS 1000000ull

static void test_reserve_until_full(void **state)
{
    decode_leases_t *t = NULL;
    assert_int_equal(decode_leases_create(100, &t), FY_OK);
    uint64_t a = 0, b = 0, c = 0;
    assert_int_equal(decode_leases_reserve(t, "req-a", 60, 1000, 0, &a), FY_OK);
    assert_int_not_equal(a, 0);
    assert_int_equal(decode_leases_reserve(t, "req-b", 41, 1000, 0, &b),
                     FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(b, 0); // untouched on failure
    assert_int_equal(decode_leases_reserve(t, "req-b", 40, 1000, 0, &b), FY_OK);
    assert_int_equal(decode_leases_available(t), 0);
    assert_int_equal(decode_leases_reserve(t, "req-a", 1, 1000, 0, &c), FY_ERR_EXISTS);
    assert_int_equal(decode_leases_reserve(t, "", 1, 1000, 0, &c), FY_ERR_INVALID_ARG);
    assert_int_equal(decode_leases_reserve(t, "req-c", 0, 1000, 0, &c), FY_ERR_INVALID_ARG);
    assert_int_equal(decode_leases_release(t, a), FY_OK);
    assert_int_equal(decode_leases_release(t, a), FY_ERR_NOT_FOUND);
    assert_int_equal(decode_leases_available(t), 60);
    assert_int_equal(decode_leases_count(t), 1);
    decode_leases_destroy(t);
}

static void test_use_commit_grow(void **state)
{
    decode_leases_t *t = NULL;
    assert_int_equal(decode_leases_create(100, &t), FY_OK);
    uint64_t id = 0;
    assert_int_equal(decode_leases_reserve(t, "r", 50, 1000, 0, &id), FY_OK);
    assert_int_equal(decode_leases_use(t, id, 30), FY_OK);
    assert_int_equal(decode_leases_use(t, id, 21), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(decode_leases_available(t), 50); // still holds the 50 promised
    // The KV came in smaller than estimated: commit gives back the 20 unused pages.
    assert_int_equal(decode_leases_commit(t, id), FY_OK);
    assert_int_equal(decode_leases_available(t), 70);
    decode_lease_t l;
    assert_int_equal(decode_leases_get(t, id, &l), FY_OK);
    assert_int_equal(l.pages_used, 30);
    assert_int_equal(l.expires_ns, 0);
    // Decoding appends tail pages until the pool is full.
    assert_int_equal(decode_leases_grow(t, id, 70), FY_OK);
    assert_int_equal(decode_leases_available(t), 0);
    assert_int_equal(decode_leases_grow(t, id, 1), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(decode_leases_get(t, id, &l), FY_OK);
    assert_int_equal(l.pages_used, 100);
    assert_int_equal(decode_leases_release(t, id), FY_OK);
    assert_int_equal(decode_leases_available(t), 100);
    assert_int_equal(decode_leases_use(t, 12345, 1), FY_ERR_NOT_FOUND);
    decode_leases_destroy(t);
}

static void test_expiry(void **state)
{
    decode_leases_t *t = NULL;
    assert_int_equal(decode_leases_create(100, &t), FY_OK);
    uint64_t a, b, c;
    assert_int_equal(decode_leases_reserve(t, "a", 10, 100, 0, &a), FY_OK);
    assert_int_equal(decode_leases_reserve(t, "b", 20, 500, 0, &b), FY_OK);
    assert_int_equal(decode_leases_reserve(t, "c", 30, 100, 0, &c), FY_OK);
    assert_int_equal(decode_leases_use(t, a, 4), FY_OK);
    assert_int_equal(decode_leases_commit(t, c), FY_OK); // committed leases never expire
    decode_lease_t out[4];
    assert_int_equal(decode_leases_expire(t, 99 * MS, out, 4), 0);
    assert_int_equal(decode_leases_expire(t, 100 * MS, out, 4), 1);
    assert_int_equal(out[0].id, a);
    assert_string_equal(out[0].request_id, "a");
    assert_int_equal(out[0].pages_used, 4); // the caller frees the pages it had placed
    assert_int_equal(decode_leases_count(t), 2);
    assert_int_equal(decode_leases_expire(t, 10000 * MS, NULL, 0), 1); // b
    assert_int_equal(decode_leases_count(t), 1);
    assert_int_equal(decode_leases_available(t), 100); // c committed with 0 used
    decode_leases_destroy(t);
    decode_leases_destroy(NULL);
}

/* A lease renewed by arriving frames runs from the last frame; a committed one stays put. */
static void test_renew(void **state)
{
    (void)state;
    decode_leases_t *t = NULL;
    assert_int_equal(decode_leases_create(100, &t), FY_OK);
    uint64_t a, b;
    assert_int_equal(decode_leases_reserve(t, "a", 10, 100, 0, &a), FY_OK);
    assert_int_equal(decode_leases_reserve(t, "b", 10, 100, 0, &b), FY_OK);
    assert_int_equal(decode_leases_renew(t, a, 100, 90 * MS), FY_OK); // a frame at 90 ms
    assert_int_equal(decode_leases_renew(t, a, 100, 10 * MS), FY_OK); // never earlier
    decode_lease_t l;
    assert_int_equal(decode_leases_get(t, a, &l), FY_OK);
    assert_int_equal(l.expires_ns, 190 * MS);
    decode_lease_t out[4];
    assert_int_equal(decode_leases_expire(t, 100 * MS, out, 4), 1); // b had no frame
    assert_int_equal(out[0].id, b);
    assert_int_equal(decode_leases_expire(t, 189 * MS, out, 4), 0);
    assert_int_equal(decode_leases_commit(t, a), FY_OK);
    assert_int_equal(decode_leases_renew(t, a, 100, 500 * MS), FY_OK);
    assert_int_equal(decode_leases_get(t, a, &l), FY_OK);
    assert_int_equal(l.expires_ns, 0); // committed: no expiry to move
    assert_int_equal(decode_leases_expire(t, 10000 * MS, out, 4), 0);
    assert_int_equal(decode_leases_renew(t, 777, 100, 0), FY_ERR_NOT_FOUND);
    decode_leases_destroy(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve_until_full),
        cmocka_unit_test(test_use_commit_grow),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_renew),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
