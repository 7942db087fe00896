// Sampler: greedy is the argmax; a seed reproduces a sequence and another seed changes it;
// top-k 1 and a tiny top-p are greedy; temperature spreads choices in proportion; the
// repetition penalty moves the choice off a repeated token; stop tokens and max tokens end;
// log-probabilities are the softmax's, with the most likely alternatives in order; logit
// biases move or ban a token; presence and frequency penalties count generated tokens only.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "test_util.h"

enum { NV = 50 };

static void fill(float *l)
{
    for (int i = 0; i < NV; i++)
        l[i] = -0.1f * (float)((i * 7) % NV);
    l[13] = 3.0f;
    l[21] = 2.5f;
    l[34] = 2.0f;
}

static int32_t draw(mdl_sampler_t *s)
{
    float l[NV];
    fill(l);
    return mdl_sampler_sample(s, l);
}

static void test_greedy(void **state)
{
    mdl_sampler_params_t p;
    mdl_sampler_params_default(&p);
    p.temperature = 0.0f;
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    for (int i = 0; i < 5; i++)
        assert_int_equal(draw(s), 13);
    mdl_sampler_destroy(s);
    // top-k 1 and a tiny top-p are greedy even when hot.
    p.temperature = 5.0f;
    p.top_k = 1;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    for (int i = 0; i < 20; i++)
        assert_int_equal(draw(s), 13);
    mdl_sampler_destroy(s);
    p.top_k = 0;
    p.top_p = 1e-4f;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    for (int i = 0; i < 20; i++)
        assert_int_equal(draw(s), 13);
    mdl_sampler_destroy(s);
}

static void test_seed_and_distribution(void **state)
{
    mdl_sampler_params_t p;
    mdl_sampler_params_default(&p);
    p.temperature = 1.0f;
    p.top_k = 3;
    p.top_p = 1.0f;
    p.max_tokens = 0;
    mdl_sampler_t *a, *b, *c;
    assert_int_equal(mdl_sampler_create(&p, NV, &a), FY_OK);
    assert_int_equal(mdl_sampler_create(&p, NV, &b), FY_OK);
    p.seed = 12345;
    assert_int_equal(mdl_sampler_create(&p, NV, &c), FY_OK);
    int counts[NV] = {0};
    bool differs = false;
    enum { DRAWS = 6000 };
    for (int i = 0; i < DRAWS; i++) {
        int32_t x = draw(a), y = draw(b), z = draw(c);
        assert_int_equal(x, y);
        differs |= x != z;
        counts[x]++;
    }
    assert_true(differs);
    // Only the top 3 appear, in proportion to exp(logit).
    double e0 = exp(3.0), e1 = exp(2.5), e2 = exp(2.0), sum = e0 + e1 + e2;
    assert_int_equal(counts[13] + counts[21] + counts[34], DRAWS);
    assert_true(fabs(counts[13] / (double)DRAWS - e0 / sum) < 0.03);
    assert_true(fabs(counts[21] / (double)DRAWS - e1 / sum) < 0.03);
    assert_true(fabs(counts[34] / (double)DRAWS - e2 / sum) < 0.03);
    mdl_sampler_destroy(a);
    mdl_sampler_destroy(b);
    mdl_sampler_destroy(c);
    // top-p 0.6 keeps the first two (0.51 < 0.6 <= 0.82).
    p.top_k = 0;
    p.top_p = 0.6f;
    assert_int_equal(mdl_sampler_create(&p, NV, &a), FY_OK);
    int seen[NV] = {0};
    for (int i = 0; i < 2000; i++)
        seen[draw(a)]++;
    assert_true(seen[13] > 0 && seen[21] > 0);
    assert_int_equal(seen[13] + seen[21], 2000);
    mdl_sampler_destroy(a);
}

static void test_penalty_and_stop(void **state)
{
    mdl_sampler_params_t p;
    mdl_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.repetition_penalty = 1.5f; // 3.0 / 1.5 = 2.0 < 2.5
    p.n_stop = 1;
    p.stop[0] = 7;
    p.max_tokens = 3;
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    mdl_sampler_accept(s, 13);
    assert_int_equal(draw(s), 21);
    assert_false(mdl_sampler_done(s, 21));
    assert_true(mdl_sampler_done(s, 7));
    draw(s);
    assert_false(mdl_sampler_done(s, 21));
    draw(s);
    assert_true(mdl_sampler_done(s, 21)); // max tokens reached
    mdl_sampler_destroy(s);
    // Invalid parameters.
    p.top_p = 0.0f;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_ERR_INVALID_ARG);
    p.top_p = 1.0f;
    p.n_stop = MDL_MAX_STOP + 1;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_ERR_INVALID_ARG);
    p.n_stop = 0;
    assert_int_equal(mdl_sampler_create(&p, 0, &s), FY_ERR_INVALID_ARG);
}

static void test_logprobs(void **state)
{
    (void)state;
    float l[NV];
    for (int rep = 0; rep < 20; rep++) {
        for (int i = 0; i < NV; i++)
            l[i] = (float)((i * 37 + rep * 11) % 23) * 0.37f - 4.0f + (rep % 3 == 0 ? 900 : 0);
        double z = 0;
        for (int i = 0; i < NV; i++)
            z += exp((double)l[i] - l[0]);
        int32_t ids[MDL_MAX_TOP_LOGPROBS];
        float lps[MDL_MAX_TOP_LOGPROBS];
        const int chosen = (rep * 13) % NV, n_top = 1 + rep % 8;
        float lp = mdl_logprobs(l, NV, chosen, n_top, ids, lps);
        assert_float_equal(lp, (double)l[chosen] - l[0] - log(z), 1e-5);
        double total = 0; // the distribution sums to one
        for (int i = 0; i < NV; i++)
            total += exp(mdl_logprobs(l, NV, i, 0, NULL, NULL));
        assert_float_equal(total, 1.0, 1e-5);
        // The n_top largest, descending, ties by id, each with its own log-probability.
        bool taken[NV] = {false};
        for (int j = 0; j < n_top; j++) {
            int best = -1;
            for (int i = 0; i < NV; i++)
                if (!taken[i] && (best < 0 || l[i] > l[best]))
                    best = i;
            taken[best] = true;
            assert_int_equal(ids[j], best);
            assert_float_equal(lps[j], mdl_logprobs(l, NV, best, 0, NULL, NULL), 1e-6);
        }
    }
    // More alternatives than the vocabulary: all of it; bad arguments: NAN.
    float small[3] = {0.0f, 1.0f, 1.0f};
    int32_t ids[5] = {-1, -1, -1, -1, -1};
    float lps[5];
    assert_false(isnan(mdl_logprobs(small, 3, 0, 5, ids, lps)));
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 0);
    assert_int_equal(ids[3], -1);
    assert_true(isnan(mdl_logprobs(small, 3, 3, 0, NULL, NULL)));
    assert_true(isnan(mdl_logprobs(small, 3, -1, 0, NULL, NULL)));
    assert_true(isnan(mdl_logprobs(small, 3, 0, 2, NULL, NULL)));
    small[1] = INFINITY;
    assert_true(isnan(mdl_logprobs(small, 3, 0, 0, NULL, NULL)));
}

/* fill's logits: 13 (3.0), 21 (2.5), 34 (2.0). */
static void test_bias_and_openai_penalties(void **state)
{
    mdl_sampler_params_t p;
    mdl_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.n_logit_bias = 2;
    p.bias_token[0] = 13;
    p.bias[0] = -100.0f; // banned
    p.bias_token[1] = 0;
    p.bias[1] = 2.4f; // 0 + 2.4: below 21's 2.5
    mdl_sampler_t *s;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    assert_int_equal(draw(s), 21);
    mdl_sampler_destroy(s);
    p.bias[1] = 2.7f; // above it
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    assert_int_equal(draw(s), 0);
    mdl_sampler_destroy(s);

    // Presence: 13 generated once loses 0.6 > 0.5 and 21 wins; prompt tokens do not count.
    mdl_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.presence_penalty = 0.6f;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    for (int i = 0; i < 10; i++)
        mdl_sampler_accept(s, 13);
    assert_int_equal(draw(s), 13);
    mdl_sampler_accept_output(s, 13);
    assert_int_equal(draw(s), 21);
    mdl_sampler_accept_output(s, 13); // presence is once, whatever the count
    mdl_sampler_accept_output(s, 21);
    assert_int_equal(draw(s), 13); // 2.4 against 1.9
    mdl_sampler_destroy(s);
    // Frequency: per occurrence; 13 drops below 21 after three (3.0 - 0.6 < 2.5).
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.2f;
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    for (int k = 1; k <= 3; k++) {
        mdl_sampler_accept_output(s, 13);
        assert_int_equal(draw(s), k < 3 ? 13 : 21);
    }
    mdl_sampler_destroy(s);
    // Negative penalties favour what was generated.
    p.frequency_penalty = -1.5f; // 34: 2.0 + 1.5
    assert_int_equal(mdl_sampler_create(&p, NV, &s), FY_OK);
    mdl_sampler_accept_output(s, 34);
    assert_int_equal(draw(s), 34);
    mdl_sampler_destroy(s);

    // Refused: penalties beyond 2, a bias beyond 100, a token outside the vocabulary or twice,
    // too many biases.
    mdl_sampler_params_t bad;
    for (int c = 0; c < 6; c++) {
        mdl_sampler_params_default(&bad);
        bad.n_logit_bias = 2;
        bad.bias_token[0] = 1;
        bad.bias_token[1] = 2;
        switch (c) {
        case 0:
            bad.presence_penalty = 2.5f;
            break;
        case 1:
            bad.frequency_penalty = NAN;
            break;
        case 2:
            bad.bias[1] = 101.0f;
            break;
        case 3:
            bad.bias_token[1] = NV;
            break;
        case 4:
            bad.bias_token[1] = 1;
            break;
        default:
            bad.n_logit_bias = MDL_MAX_LOGIT_BIAS + 1;
            break;
        }
        assert_int_equal(mdl_sampler_params_check(&bad, NV), FY_ERR_INVALID_ARG);
        assert_int_equal(mdl_sampler_create(&bad, NV, &s), FY_ERR_INVALID_ARG);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_seed_and_distribution),
        cmocka_unit_test(test_penalty_and_stop),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_bias_and_openai_penalties),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
