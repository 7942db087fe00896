// The optimizer's multiplier search (kvcodec/mult_search_int.h). The CPU encoder takes it one
// step at a time; the GPU encoder measures a tree of its next steps in one pass over the items
// and then walks the tree. Both must measure the multipliers, in order, that the search as
// first written (bracket by 64, then log bisection to 1 %: the literal loops below) measures,
// and end at its result, for any outcomes: monotone thresholds anywhere from 1e-35 to 1e35,
// none, all, and outcomes that follow no order at all.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "../../kvcodec/mult_search_int.h"

// Whether the bytes at a multiplier fit: a pure function of the multiplier.
typedef struct {
    int kind; // 0: lambda >= theta; 1: a hash of the multiplier's bits
    double theta;
    uint64_t seed;
    int calls;
} outcome_t;

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

static bool fits(outcome_t *o, double lam)
{
    o->calls++;
    if (o->kind == 0)
        return lam >= o->theta;
    uint64_t bits;
    memcpy(&bits, &lam, sizeof bits);
    return (mix64(bits ^ o->seed) & 1) != 0;
}

#define MAX_SEQ 256

typedef struct {
    double lam[MAX_SEQ];
    int n;
} seq_t;

static bool measure(outcome_t *o, seq_t *q, double lam)
{
    assert_true(q->n < MAX_SEQ);
    q->lam[q->n++] = lam;
    return fits(o, lam);
}

// The search as encode.c's solve() was written before the state machine: the oracle.
static double oracle(outcome_t *o, double lambda0, seq_t *q, bool *zero)
{
    double lo = lambda0 > 0 ? lambda0 : 1e-6, hi = lo;
    *zero = false;
    if (measure(o, q, lo)) {
        for (;;) {
            hi = lo;
            lo /= 64;
            if (lo <= 1e-30) {
                if (measure(o, q, 0)) {
                    *zero = true;
                    return 0;
                }
                break;
            }
            if (!measure(o, q, lo))
                break;
        }
    } else {
        for (;;) {
            hi *= 64;
            bool f = measure(o, q, hi);
            if (hi >= 1e30 || f)
                break;
        }
    }
    for (int it = 0; it < 40 && hi > lo * 1.01; it++) {
        double mid = sqrt(lo * hi);
        if (measure(o, q, mid))
            hi = mid;
        else
            lo = mid;
    }
    return hi;
}

// The CPU encoder's way: one step at a time.
static double serial(outcome_t *o, double lambda0, seq_t *q, bool *zero)
{
    kvc_ms_t ms;
    kvc_ms_init(&ms, lambda0);
    double lam;
    while (kvc_ms_next(&ms, &lam))
        kvc_ms_step(&ms, measure(o, q, lam));
    *zero = ms.phase == KVC_MS_ZERO;
    return kvc_ms_result(&ms);
}

// Walks one measured tree from *ms and appends the steps' multipliers to q, checking that each
// step's multiplier was measured and that kvc_ms_walk ends in the same state.
static void walk_checked(kvc_ms_t *ms, const double *lam, int nl, const int *node,
                         const bool *fit, seq_t *q)
{
    kvc_ms_t w = *ms;
    int steps = kvc_ms_walk(&w, node, fit);
    for (int s = 0; s < steps; s++) {
        double l = -1;
        assert_true(kvc_ms_next(ms, &l));
        int j = 0;
        while (j < nl && lam[j] != l)
            j++;
        assert_true(j < nl); // the tree measured the step's multiplier
        assert_true(q->n < MAX_SEQ);
        q->lam[q->n++] = l;
        kvc_ms_step(ms, fit[j]);
    }
    assert_memory_equal(ms, &w, sizeof w);
}

// The GPU encoder's way (choose_kernel): the first pass measures the rate check's multiplier
// (when check_prev) beside the first tree, in at most 7 slots; later passes a tree of up to 8.
static double speculative(outcome_t *o, double lambda0, bool check_prev, seq_t *q, bool *zero,
                          int *passes)
{
    kvc_ms_t ms;
    kvc_ms_init(&ms, lambda0);
    double lam[8];
    int node[KVC_MS_NODES], nl = 0;
    bool fit[8];
    if (check_prev)
        lam[nl++] = lambda0;
    kvc_ms_tree(&ms, lam, &nl, 7, node);
    assert_true(nl <= 7);
    for (int j = 0; j < nl; j++)
        fit[j] = fits(o, lam[j]);
    *passes = 1;
    walk_checked(&ms, lam, nl, node, fit, q);
    for (;;) {
        nl = 0;
        kvc_ms_tree(&ms, lam, &nl, 8, node);
        double l;
        assert_int_equal(nl == 0, !kvc_ms_next(&ms, &l));
        if (nl == 0)
            break;
        for (int j = 0; j < nl; j++) {
            for (int i = 0; i < j; i++)
                assert_true(lam[i] != lam[j]); // each multiplier once a pass
            fit[j] = fits(o, lam[j]);
        }
        int before = q->n;
        walk_checked(&ms, lam, nl, node, fit, q);
        // A whole tree fits 8 slots: every pass but the last takes all of its steps.
        double after;
        if (kvc_ms_next(&ms, &after))
            assert_int_equal(q->n - before, KVC_MS_DEPTH);
        (*passes)++;
        assert_true(*passes < 64);
    }
    *zero = ms.phase == KVC_MS_ZERO;
    return kvc_ms_result(&ms);
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;

static double rnd01(void)
{
    g_rng = mix64(g_rng + 0x9e3779b97f4a7c15ULL);
    return (double)(g_rng >> 11) / 9007199254740992.0;
}

static double log_uniform(double lo_exp, double hi_exp)
{
    return pow(10.0, lo_exp + (hi_exp - lo_exp) * rnd01());
}

typedef struct {
    int cases, zero, top, bracket_down, bracket_up;
    long serial_steps, passes;
} tally_t;

static void check_case(outcome_t o, double lambda0, tally_t *t)
{
    seq_t qa = {.n = 0}, qb = {.n = 0}, qc = {.n = 0}, qd = {.n = 0};
    bool za, zb, zc, zd;
    int pc, pd;
    double ra = oracle(&o, lambda0, &qa, &za);
    double rb = serial(&o, lambda0, &qb, &zb);
    double rc = speculative(&o, lambda0, lambda0 >= 0, &qc, &zc, &pc);
    double rd = speculative(&o, lambda0, false, &qd, &zd, &pd);
    const seq_t *qs[3] = {&qb, &qc, &qd};
    for (int k = 0; k < 3; k++) {
        assert_int_equal(qs[k]->n, qa.n);
        assert_memory_equal(qs[k]->lam, qa.lam, (size_t)qa.n * sizeof(double));
    }
    assert_memory_equal(&rb, &ra, sizeof ra);
    assert_memory_equal(&rc, &ra, sizeof ra);
    assert_memory_equal(&rd, &ra, sizeof ra);
    assert_int_equal(zb, za);
    assert_int_equal(zc, za);
    assert_int_equal(zd, za);
    t->cases++;
    t->zero += za;
    t->top += !za && ra >= 1e30;
    t->bracket_down += qa.n > 1 && qa.lam[1] < qa.lam[0];
    t->bracket_up += qa.n > 1 && qa.lam[1] > qa.lam[0];
    t->serial_steps += qa.n;
    t->passes += pc;
}

static void test_thresholds(void **state)
{
    (void)state;
    tally_t t = {0};
    // Among the starts, some that reach the bracket's ends exactly (times or over 64^k).
    const double starts[] = {-1.0,        0.0,         1e-6,         1.0,         3.7e-3,
                             1e-29,       2e-30,       1e29,         5e31,        1e30 / 64,
                             1e30 / 4096, 1e-30 * 64, 1e-30 * 4096};
    const int n_starts = (int)(sizeof starts / sizeof starts[0]);
    for (int i = 0; i < 6000; i++) {
        outcome_t o = {.kind = 0};
        int r = i % 10;
        o.theta = r == 0 ? 0.0 : r == 1 ? INFINITY : r == 2 ? 1e-31 : log_uniform(-36, 36);
        double l0 = i % 3 == 0 ? starts[(i / 3) % n_starts] : log_uniform(-34, 34);
        check_case(o, l0, &t);
        if (o.kind == 0 && o.theta > 0 && isfinite(o.theta) && l0 > 0) {
            // Close to the start: the search the rate controller mostly sees.
            o.theta = l0 * log_uniform(-2.5, 2.5);
            check_case(o, l0, &t);
        }
    }
    // Every path was taken: lambda 0, the top of the bracket, both directions.
    assert_true(t.zero > 0);
    assert_true(t.top > 0);
    assert_true(t.bracket_down > 0);
    assert_true(t.bracket_up > 0);
    // The point of the trees: about a third of the passes (3 steps each).
    assert_true(t.passes * 2 < t.serial_steps);
}

static void test_any_outcomes(void **state)
{
    (void)state;
    tally_t t = {0};
    for (int i = 0; i < 4000; i++) {
        outcome_t o = {.kind = 1, .seed = mix64((uint64_t)i + 1)};
        double l0 = i % 5 == 0 ? (i % 10 == 0 ? 0.0 : -1.0) : log_uniform(-34, 34);
        check_case(o, l0, &t);
    }
    assert_true(t.zero > 0);
    assert_true(t.top > 0);
}

// A known case, step by step: from 1 with the threshold at 100, up once to 64, then up to
// 4096 (64 does not fit), then bisection of [1, 4096] to 1 %, ending at the first fitting
// multiplier at or above 100.
static void test_known_case(void **state)
{
    (void)state;
    outcome_t o = {.kind = 0, .theta = 100.0};
    seq_t q = {.n = 0};
    bool z;
    double r = serial(&o, 1.0, &q, &z);
    assert_false(z);
    assert_true(q.n >= 4);
    assert_true(q.lam[0] == 1.0);
    assert_true(q.lam[1] == 64.0);
    assert_true(q.lam[2] == 4096.0);
    assert_true(q.lam[3] == 64.0); // sqrt(1 * 4096)
    assert_true(r >= 100.0 && r <= 101.0);
    int passes;
    seq_t qc = {.n = 0};
    double rc = speculative(&o, 1.0, true, &qc, &z, &passes);
    assert_true(rc == r);
    assert_int_equal(qc.n, q.n);
    assert_true(passes <= (q.n + 2) / 3 + 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_case),
        cmocka_unit_test(test_thresholds),
        cmocka_unit_test(test_any_outcomes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
