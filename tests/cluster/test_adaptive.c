/*
 * The bandwidth-adaptive budget (prefill/adaptive.c) on a fake goodput history: no opinion
 * without history, b from goodput and the TTFT target, the queue and long prompts, limits,
 * the running mean of link-bound transfers, compute-bound ones as lower bounds, peers kept
 * apart, bad parameters refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "adaptive.h"

#define MB 1e6

static pf_adaptive_t *make(double target_ms)
{
    pf_adaptive_params_t p;
    pf_adaptive_params_default(&p);
    p.ttft_target_ms = target_ms;
    p.n_layers = 30;
    p.ms_per_token = 0.5;
    pf_adaptive_t *a = NULL;
    assert_int_equal(pf_adaptive_create(&p, &a), FY_OK);
    return a;
}

static void near(double got, double want)
{
    if (fabs(got - want) > 1e-9 * fmax(1, fabs(want)))
        fail_msg("got %.12g, want %.12g", got, want);
}

static void test_choose(void **state)
{
    (void)state;
    pf_adaptive_t *a = make(200);
    /* no history: no opinion */
    assert_true(pf_adaptive_choose(a, "10.0.0.2:7000", 100, 4 * MB, 0) < 0);
    assert_false(pf_adaptive_goodput(a, "10.0.0.2:7000", NULL));
    /* 1 MB in 100 ms: 10 MB/s; 100 tokens computed in 50 ms: 0.5 ms/token */
    pf_adaptive_observe(a, "10.0.0.2:7000", 1000000, 100, 50, 100, 50);
    double g;
    assert_true(pf_adaptive_goodput(a, "10.0.0.2:7000", &g));
    near(g, 10 * MB);
    /* 100 tokens, 4 MB raw, empty queue: transfer may take 200 - 50/30 ms */
    near(pf_adaptive_choose(a, "10.0.0.2:7000", 100, 4 * MB, 0),
         (200 - 50.0 / 30) / 1e3 * 10 * MB / (4 * MB));
    /* 300 queued tokens (150 ms) leave 50 ms, which the compute needs anyway */
    near(pf_adaptive_choose(a, "10.0.0.2:7000", 100, 2 * MB, 300),
         (50 - 50.0 / 30) / 1e3 * 10 * MB / (2 * MB));
    /* a prompt whose compute alone misses the target: the transfer hides behind compute */
    near(pf_adaptive_choose(a, "10.0.0.2:7000", 1000, 20 * MB, 0),
         (500 - 500.0 / 30) / 1e3 * 10 * MB / (20 * MB));
    /* a thin link: the lower limit; a fast one: the upper */
    pf_adaptive_observe(a, "slow:1", 10000, 100, 90, 0, 0); /* 100 kB/s */
    pf_adaptive_observe(a, "fast:1", 100000000, 100, 0, 0, 0); /* 1 GB/s */
    near(pf_adaptive_choose(a, "slow:1", 100, 4 * MB, 0), 0.125);
    near(pf_adaptive_choose(a, "fast:1", 100, 4 * MB, 0), 1);
    /* the first peer is unchanged by the others */
    assert_true(pf_adaptive_goodput(a, "10.0.0.2:7000", &g));
    near(g, 10 * MB);
    /* a new sample moves the mean by alpha = 0.3: 0.3 x 5 + 0.7 x 10 MB/s */
    pf_adaptive_observe(a, "10.0.0.2:7000", 500000, 100, 30, 100, 50);
    assert_true(pf_adaptive_goodput(a, "10.0.0.2:7000", &g));
    near(g, 8.5 * MB);
    /* a transfer that kept up with the compute (short tail) only bounds the goodput from
     * below: 2 MB/s does not lower the estimate, 20 MB/s raises it */
    pf_adaptive_observe(a, "10.0.0.2:7000", 200000, 100, 5, 100, 50);
    assert_true(pf_adaptive_goodput(a, "10.0.0.2:7000", &g));
    near(g, 8.5 * MB);
    pf_adaptive_observe(a, "fast:2", 1000000, 100, 5, 0, 0);
    pf_adaptive_observe(a, "fast:2", 2000000, 100, 5, 0, 0);
    assert_true(pf_adaptive_goodput(a, "fast:2", &g));
    near(g, 20 * MB);
    /* samples without bytes or time change nothing */
    pf_adaptive_observe(a, "10.0.0.2:7000", 0, 100, 90, 0, 0);
    pf_adaptive_observe(a, "10.0.0.2:7000", 1000, 0, 0, 0, 0);
    pf_adaptive_observe(a, "10.0.0.2:7000", 1000, NAN, 0, 0, 0);
    assert_true(pf_adaptive_goodput(a, "10.0.0.2:7000", &g));
    near(g, 8.5 * MB);
    /* slower compute (2 ms/token measured) shrinks the window through the queue term */
    pf_adaptive_observe(a, "x:1", 0, 0, 0, 100, 200);
    double b = pf_adaptive_choose(a, "10.0.0.2:7000", 100, 4 * MB, 100);
    double mpt = 0.3 * 2 + 0.7 * 0.5;
    near(b, fmax(0.125, (fmax(200 - 100 * mpt, 100 * mpt) - 100 * mpt / 30) / 1e3 * 8.5 * MB /
                            (4 * MB)));
    /* bad inputs */
    assert_true(pf_adaptive_choose(a, "10.0.0.2:7000", 0, 4 * MB, 0) < 0);
    assert_true(pf_adaptive_choose(a, "10.0.0.2:7000", 10, 0, 0) < 0);
    assert_true(pf_adaptive_choose(NULL, "p", 10, 10, 0) < 0);
    pf_adaptive_destroy(a);
}

static void test_many_peers(void **state)
{
    (void)state;
    pf_adaptive_t *a = make(100);
    char peer[32];
    /* more peers than the table holds: the stalest go, the newest stay */
    for (int i = 0; i < 300; i++) {
        snprintf(peer, sizeof(peer), "10.0.%d.%d:1", i / 250, i % 250);
        pf_adaptive_observe(a, peer, 1000 * (uint64_t)(i + 1), 1, 1, 0, 0);
    }
    double g;
    assert_true(pf_adaptive_goodput(a, "10.0.1.49:1", &g));
    near(g, 300 * 1000 * 1000.0);
    assert_false(pf_adaptive_goodput(a, "10.0.0.0:1", &g));
    pf_adaptive_destroy(a);
}

static void test_params(void **state)
{
    (void)state;
    pf_adaptive_params_t p;
    pf_adaptive_t *a = NULL;
    pf_adaptive_params_default(&p);
    assert_int_equal(pf_adaptive_create(&p, &a), FY_ERR_INVALID_ARG); /* no target */
    p.ttft_target_ms = 100;
    assert_int_equal(pf_adaptive_create(&p, &a), FY_OK);
    pf_adaptive_destroy(a);
    p.budget_min = 0.5;
    p.budget_max = 0.25;
    assert_int_equal(pf_adaptive_create(&p, &a), FY_ERR_INVALID_ARG);
    p.budget_min = 0;
    p.budget_max = 1;
    assert_int_equal(pf_adaptive_create(&p, &a), FY_ERR_INVALID_ARG);
    p.budget_min = 0.1;
    p.alpha = 0;
    assert_int_equal(pf_adaptive_create(&p, &a), FY_ERR_INVALID_ARG);
    p.alpha = 0.5;
    p.n_layers = 0;
    assert_int_equal(pf_adaptive_create(&p, &a), FY_ERR_INVALID_ARG);
    assert_int_equal(pf_adaptive_create(NULL, &a), FY_ERR_INVALID_ARG);
    pf_adaptive_destroy(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_choose),
        cmocka_unit_test(test_many_peers),
        cmocka_unit_test(test_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
