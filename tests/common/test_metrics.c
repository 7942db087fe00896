// Metrics: exposition text is well formed (HELP/TYPE once per name, cumulative buckets that end
// in +Inf equal to _count), updates from many threads add up exactly.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static void test_render(void **state)
{
    fy_metrics_t *m = NULL;
    assert_int_equal(fy_metrics_create(&m), FY_OK);
    fy_metric_t *req = fy_metrics_counter(m, "ferry_requests_total", NULL, "Requests served.");
    fy_metric_t *fail_dl = fy_metrics_counter(m, "ferry_failures_total", "reason=\"deadline\"",
                                              "Failed requests by reason.");
    fy_metric_t *fail_c = fy_metrics_counter(m, "ferry_failures_total", "reason=\"cancelled\"",
                                             "Failed requests by reason.");
    fy_metric_t *pages = fy_metrics_gauge(m, "ferry_kv_free_pages", NULL, "Free KV pages.");
    double bounds[] = {0.01, 0.1, 1.0};
    fy_metric_t *ttft =
        fy_metrics_histogram(m, "ferry_ttft_seconds", NULL, "Time to first token.", bounds, 3);
    assert_non_null(req);
    assert_non_null(ttft);
    // Same name and labels returns the same series; another type under a name is refused.
    assert_ptr_equal(fy_metrics_counter(m, "ferry_requests_total", NULL, "x"), req);
    assert_null(fy_metrics_gauge(m, "ferry_requests_total", NULL, "x"));
    assert_null(fy_metrics_counter(m, "9bad name", NULL, "x"));

    fy_metric_inc(req);
    fy_metric_add(req, 2);
    fy_metric_add(req, -5); // ignored: counters only go up
    fy_metric_inc(fail_dl);
    fy_metric_add(fail_c, 3);
    fy_metric_set(pages, 1024);
    fy_metric_add(pages, -24);
    fy_metric_observe(ttft, 0.005);
    fy_metric_observe(ttft, 0.05);
    fy_metric_observe(ttft, 0.05);
    fy_metric_observe(ttft, 7.0);
    fy_metric_inc(NULL); // no-op

    char *text = NULL;
    size_t len = 0;
    assert_int_equal(fy_metrics_render(m, &text, &len), FY_OK);
    assert_int_equal(strlen(text), len);
    assert_non_null(strstr(text, "# TYPE ferry_requests_total counter\nferry_requests_total 3\n"));
    assert_non_null(strstr(text, "ferry_failures_total{reason=\"deadline\"} 1\n"
                                 "ferry_failures_total{reason=\"cancelled\"} 3\n"));
    // HELP/TYPE appear once for a name with two series.
    char *first = strstr(text, "# TYPE ferry_failures_total");
    assert_non_null(first);
    assert_null(strstr(first + 1, "# TYPE ferry_failures_total"));
    assert_non_null(strstr(text, "ferry_kv_free_pages 1000\n"));
    assert_non_null(strstr(text, "ferry_ttft_seconds_bucket{le=\"0.01\"} 1\n"
                                 "ferry_ttft_seconds_bucket{le=\"0.10000000000000001\"} 3\n"
                                 "ferry_ttft_seconds_bucket{le=\"1\"} 3\n"
                                 "ferry_ttft_seconds_bucket{le=\"+Inf\"} 4\n"
                                 "ferry_ttft_seconds_sum 7.1050000000000004\n"
                                 "ferry_ttft_seconds_count 4\n"));
    free(text);
    fy_metrics_destroy(m);
    fy_metrics_destroy(NULL);
}

typedef struct {
    fy_metric_t *c, *h;
} thr_arg_t;

static void *hammer(void *p)
{
    thr_arg_t *a = p;
    for (int i = 0; i < 100000; i++) {
        fy_metric_inc(a->c);
        fy_metric_observe(a->h, (double)(i % 4));
    }
    return NULL;
}

static void test_concurrent_updates(void **state)
{
    fy_metrics_t *m = NULL;
    assert_int_equal(fy_metrics_create(&m), FY_OK);
    double bounds[] = {0.5, 1.5, 2.5};
    thr_arg_t a = {fy_metrics_counter(m, "c_total", NULL, "c"),
                   fy_metrics_histogram(m, "h", NULL, "h", bounds, 3)};
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, hammer, &a);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    assert_true(fy_metric_value(a.c) == 400000.0);
    assert_int_equal(fy_metric_count(a.h), 400000);
    assert_true(fy_metric_value(a.h) == 4 * 25000 * (0.0 + 1 + 2 + 3));
    fy_metrics_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_render),
        cmocka_unit_test(test_concurrent_updates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
