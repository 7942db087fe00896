// Status codes: every code has a distinct name and message and the documented gRPC mapping.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <errno.h>
#include <string.h>

#include "common.h"

static const fy_status_t k_all[] = {
#define X(name, value, grpc, msg) name,
    FY_STATUS_LIST(X)
#undef X
};

static void test_strings_distinct(void **state)
{
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_all); i++) {
        assert_non_null(fy_status_str(k_all[i]));
        assert_true(strncmp(fy_status_name(k_all[i]), "FY_", 3) == 0);
        for (size_t j = i + 1; j < FY_ARRAY_SIZE(k_all); j++) {
            assert_int_not_equal(k_all[i], k_all[j]);
            assert_string_not_equal(fy_status_name(k_all[i]), fy_status_name(k_all[j]));
        }
        if (k_all[i] != FY_OK)
            assert_true(k_all[i] < 0);
    }
    assert_string_equal(fy_status_str(FY_OK), "ok");
    assert_string_equal(fy_status_name(FY_ERR_TIMEOUT), "FY_ERR_TIMEOUT");
    assert_string_equal(fy_status_str((fy_status_t)-9999), "unknown status");
}

static void test_grpc_mapping(void **state)
{
    assert_int_equal(fy_status_grpc_code(FY_OK), 0);
    assert_int_equal(fy_status_grpc_code(FY_ERR_CANCELLED), 1);
    assert_int_equal(fy_status_grpc_code(FY_ERR_INVALID_ARG), 3);
    assert_int_equal(fy_status_grpc_code(FY_ERR_TIMEOUT), 4);
    assert_int_equal(fy_status_grpc_code(FY_ERR_RESOURCE_EXHAUSTED), 8);
    assert_int_equal(fy_status_grpc_code(FY_ERR_UNSUPPORTED), 12);
    assert_int_equal(fy_status_grpc_code(FY_ERR_UNAVAILABLE), 14);
    assert_int_equal(fy_status_grpc_code(FY_ERR_CORRUPT), 15);
    assert_int_equal(fy_status_grpc_code(FY_ERR_UNAUTHENTICATED), 16);
    assert_int_equal(fy_status_grpc_code((fy_status_t)-9999), 2);
}

static void test_errno_mapping(void **state)
{
    assert_int_equal(fy_status_from_errno(0), FY_OK);
    assert_int_equal(fy_status_from_errno(ENOMEM), FY_ERR_NO_MEMORY);
    assert_int_equal(fy_status_from_errno(ENOENT), FY_ERR_NOT_FOUND);
    assert_int_equal(fy_status_from_errno(ETIMEDOUT), FY_ERR_TIMEOUT);
    assert_int_equal(fy_status_from_errno(ECONNREFUSED), FY_ERR_UNAVAILABLE);
    assert_int_equal(fy_status_from_errno(EIO), FY_ERR_IO);
}

static void test_size_checks(void **state)
{
    size_t out = 7;
    assert_true(fy_size_mul(3, 5, &out));
    assert_int_equal(out, 15);
    assert_false(fy_size_mul(SIZE_MAX / 2 + 1, 2, &out));
    assert_int_equal(out, 15); // untouched on overflow
    assert_true(fy_size_add(1, 2, &out));
    assert_int_equal(out, 3);
    assert_false(fy_size_add(SIZE_MAX, 1, &out));
    assert_int_equal(out, 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_strings_distinct),
        cmocka_unit_test(test_grpc_mapping),
        cmocka_unit_test(test_errno_mapping),
        cmocka_unit_test(test_size_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
