// Thread pool: parallel-for covers every index exactly once with valid worker ids, nests with
// queued tasks, and shuts down cleanly with work pending.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <stdlib.h>

#include "common.h"

typedef struct {
    _Atomic int *hits;
    int n_threads;
    _Atomic int bad_thread;
} pf_ctx_t;

static void pf_mark(void *p, size_t begin, size_t end, int thread)
{
    pf_ctx_t *ctx = p;
    if (thread < 0 || thread >= ctx->n_threads)
        atomic_fetch_add(&ctx->bad_thread, 1);
    for (size_t i = begin; i < end; i++)
        atomic_fetch_add(&ctx->hits[i], 1);
}

static void test_parallel_for_covers_once(void **state)
{
    for (int nt = 1; nt <= 4; nt++) {
        fy_pool_t *pool = NULL;
        assert_int_equal(fy_pool_create(nt, &pool), FY_OK);
        assert_int_equal(fy_pool_size(pool), nt);
        static const size_t sizes[] = {1, 2, 7, 64, 1000, 100003};
        for (size_t s = 0; s < FY_ARRAY_SIZE(sizes); s++) {
            for (int rep = 0; rep < 20; rep++) {
                size_t n = sizes[s];
                pf_ctx_t ctx = {.hits = calloc(n, sizeof(_Atomic int)), .n_threads = nt};
                fy_pool_parallel_for(pool, n, 1 + (size_t)rep % 5, pf_mark, &ctx);
                for (size_t i = 0; i < n; i++)
                    assert_int_equal(atomic_load(&ctx.hits[i]), 1);
                assert_int_equal(atomic_load(&ctx.bad_thread), 0);
                free(ctx.hits);
            }
        }
        fy_pool_destroy(pool);
    }
    // A NULL pool runs inline.
    pf_ctx_t ctx = {.hits = calloc(10, sizeof(_Atomic int)), .n_threads = 1};
    fy_pool_parallel_for(NULL, 10, 1, pf_mark, &ctx);
    for (int i = 0; i < 10; i++)
        assert_int_equal(atomic_load(&ctx.hits[i]), 1);
    free(ctx.hits);
}

static _Atomic long g_task_sum;

static void task_add(void *arg)
{
    atomic_fetch_add(&g_task_sum, (long)(intptr_t)arg);
}

static void test_tasks_and_wait(void **state)
{
    fy_pool_t *pool = NULL;
    assert_int_equal(fy_pool_create(3, &pool), FY_OK);
    atomic_store(&g_task_sum, 0);
    long expect = 0;
    for (int i = 1; i <= 5000; i++) {
        assert_int_equal(fy_pool_submit(pool, task_add, (void *)(intptr_t)i), FY_OK);
        expect += i;
    }
    // A parallel-for while tasks are queued still completes.
    pf_ctx_t ctx = {.hits = calloc(4096, sizeof(_Atomic int)), .n_threads = 3};
    fy_pool_parallel_for(pool, 4096, 16, pf_mark, &ctx);
    for (int i = 0; i < 4096; i++)
        assert_int_equal(atomic_load(&ctx.hits[i]), 1);
    free(ctx.hits);
    fy_pool_wait(pool);
    assert_int_equal(atomic_load(&g_task_sum), expect);
    // Destroy with tasks still queued runs them first.
    for (int i = 0; i < 100; i++)
        fy_pool_submit(pool, task_add, (void *)(intptr_t)1);
    fy_pool_destroy(pool);
    assert_int_equal(atomic_load(&g_task_sum), expect + 100);
    fy_pool_destroy(NULL);
}

static void test_single_thread_pool_runs_tasks(void **state)
{
    fy_pool_t *pool = NULL;
    assert_int_equal(fy_pool_create(1, &pool), FY_OK);
    atomic_store(&g_task_sum, 0);
    fy_pool_submit(pool, task_add, (void *)(intptr_t)41);
    fy_pool_wait(pool);
    assert_int_equal(atomic_load(&g_task_sum), 41);
    fy_pool_destroy(pool);
    assert_int_equal(fy_pool_create(-1, &pool), FY_ERR_INVALID_ARG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parallel_for_covers_once),
        cmocka_unit_test(test_tasks_and_wait),
        cmocka_unit_test(test_single_thread_pool_runs_tasks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
