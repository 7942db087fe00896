// Clocks: monotonic, nanosecond units, sleep sleeps at least as long as asked.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "common.h"

static void test_monotonic_and_sleep(void **state)
{
    uint64_t a = fy_clock_ns();
    uint64_t prev = a;
    for (int i = 0; i < 1000; i++) {
        uint64_t t = fy_clock_ns();
        assert_true(t >= prev);
        prev = t;
    }
    fy_sleep_ns(20 * 1000 * 1000);
    uint64_t b = fy_clock_ns();
    assert_true(b - a >= 20 * 1000 * 1000ull);
}

static void test_realtime_is_epoch(void **state)
{
    // After 2020-01-01 and before 2100-01-01, in nanoseconds.
    uint64_t t = fy_clock_realtime_ns();
    assert_true(t > 1577836800ull * 1000000000ull);
    assert_true(t < 4102444800ull * 1000000000ull);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_monotonic_and_sleep),
        cmocka_unit_test(test_realtime_is_epoch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
