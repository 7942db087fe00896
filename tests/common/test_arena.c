// Arena: alignment, no overlap between allocations, large requests, reset keeps one block,
// overflowing sizes fail cleanly.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <string.h>

#include "common.h"

static void test_alignment_and_disjoint(void **state)
{
    fy_arena_t a;
    fy_arena_init(&a, 1024);
    uint8_t *prev_end = NULL;
    (void)prev_end;
    uint8_t *ptrs[200];
    size_t sizes[200];
    for (int i = 0; i < 200; i++) {
        size_t align = (size_t)1 << (i % 8);
        sizes[i] = 1 + (size_t)(i * 37 % 300);
        ptrs[i] = fy_arena_alloc(&a, sizes[i], align);
        assert_non_null(ptrs[i]);
        assert_int_equal((uintptr_t)ptrs[i] % align, 0);
        memset(ptrs[i], i & 0xff, sizes[i]);
    }
    // Every allocation still holds its own fill: none overlapped another.
    for (int i = 0; i < 200; i++)
        for (size_t k = 0; k < sizes[i]; k++)
            assert_int_equal(ptrs[i][k], i & 0xff);
    assert_true(a.used_total >= 200);
    fy_arena_cleanup(&a);
    assert_null(a.head);
}

static void test_large_and_reset(void **state)
{
    fy_arena_t a;
    fy_arena_init(&a, 4096);
    void *big = fy_arena_alloc(&a, 1 << 20, 64);
    assert_non_null(big);
    memset(big, 1, 1 << 20);
    void *small = fy_arena_alloc(&a, 16, 16);
    assert_non_null(small);
    fy_arena_reset(&a);
    assert_int_equal(a.used_total, 0);
    assert_true(a.capacity_total >= (1 << 20));
    // After reset the kept block serves a large request without growing.
    size_t cap = a.capacity_total;
    assert_non_null(fy_arena_alloc(&a, 512 * 1024, 8));
    assert_int_equal(a.capacity_total, cap);
    uint32_t *z = fy_arena_calloc(&a, 100, sizeof(uint32_t), 4);
    for (int i = 0; i < 100; i++)
        assert_int_equal(z[i], 0);
    fy_arena_cleanup(&a);
}

static void test_bad_requests(void **state)
{
    fy_arena_t a;
    fy_arena_init(&a, 0);
    assert_null(fy_arena_alloc(&a, SIZE_MAX - 8, 8));
    assert_null(fy_arena_calloc(&a, SIZE_MAX / 2, 4, 8));
    assert_null(fy_arena_alloc(&a, 8, 3));    // not a power of two
    assert_null(fy_arena_alloc(&a, 8, 8192)); // alignment too large
    assert_non_null(fy_arena_alloc(&a, 0, 8));
    fy_arena_cleanup(&a);
    fy_arena_cleanup(&a); // twice is fine
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alignment_and_disjoint),
        cmocka_unit_test(test_large_and_reset),
        cmocka_unit_test(test_bad_requests),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
