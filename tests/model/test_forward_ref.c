// The forward pass against transformers+torch on the real SmolLM2 GGUF: top-5 logits at
// several positions within tolerance, 32-token greedy continuations equal, and decoding over
// the paged cache giving the logits of a full recompute.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "test_util.h"

static mdl_model_t *g_model;
static mdl_ctx_t *g_ctx;

// Our FP32 forward and torch's differ only in summation order: logits of magnitude ~20 agree
// to ~4e-5 here; 0.01 leaves room for other BLAS kernels and thread counts.
#define LOGIT_TOL 0.01f

static int setup(void **state)
{
    g_model = tu_real_model();
    if (g_model == NULL)
        return -1;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    cp.max_batch = 4;
    return mdl_ctx_create(g_model, &cp, &g_ctx) == FY_OK ? 0 : -1;
}

static int teardown(void **state)
{
    mdl_ctx_destroy(g_ctx);
    mdl_model_destroy(g_model);
    return 0;
}

static void test_config(void **state)
{
    const mdl_config_t *c = mdl_model_config(g_model);
    assert_int_equal(c->arch, MDL_ARCH_LLAMA);
    assert_int_equal(c->n_layers, 30);
    assert_int_equal(c->dim, 576);
    assert_int_equal(c->n_heads, 9);
    assert_int_equal(c->n_kv_heads, 3);
    assert_int_equal(c->head_dim, 64);
    assert_int_equal(c->ffn_dim, 1536);
    assert_int_equal(c->n_vocab, 49152);
    assert_true(c->tied_embeddings);
    assert_false(c->qkv_bias);
    assert_float_equal(c->rope.theta, 100000.0f, 1e-3);
}

static void test_top5_logits(void **state)
{
    cJSON *fx = tu_fixture("logits");
    assert_non_null(fx);
    int n_vocab = mdl_model_config(g_model)->n_vocab;
    float max_err = 0.0f;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(fx, "items"))
    {
        int n;
        int32_t *ids = tu_ids(cJSON_GetObjectItem(it, "ids"), &n);
        float *logits = malloc(sizeof(float) * (size_t)n * n_vocab);
        mdl_prefill_params_t pp;
        mdl_prefill_params_default(&pp);
        pp.all_logits = true;
        assert_int_equal(mdl_prefill(g_ctx, ids, n, &pp, logits), FY_OK);
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItem(it, "top5"))
        {
            int pos = cJSON_GetObjectItem(e, "pos")->valueint;
            const float *row = logits + (size_t)pos * n_vocab;
            const cJSON *rid = cJSON_GetObjectItem(e, "ids");
            const cJSON *rlog = cJSON_GetObjectItem(e, "logits");
            for (int k = 0; k < 5; k++) {
                int id = cJSON_GetArrayItem(rid, k)->valueint;
                float want = (float)cJSON_GetArrayItem(rlog, k)->valuedouble;
                float err = fabsf(row[id] - want);
                max_err = fmaxf(max_err, err);
                if (err > LOGIT_TOL)
                    fail_msg("pos %d token %d: logit %f, reference %f", pos, id, row[id], want);
            }
            // The reference's top token is ours too.
            int best = 0;
            for (int v = 1; v < n_vocab; v++)
                best = row[v] > row[best] ? v : best;
            assert_int_equal(best, cJSON_GetArrayItem(rid, 0)->valueint);
        }
        free(logits);
        free(ids);
    }
    printf("max |logit - reference| = %g\n", max_err);
    cJSON_Delete(fx);
}

static void test_greedy_continuations(void **state)
{
    cJSON *fx = tu_fixture("greedy");
    assert_non_null(fx);
    int n_vocab = mdl_model_config(g_model)->n_vocab;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, g_model);
    kp.n_pages = mdl_kv_pages_for(&kp, 256);
    mdl_kv_t *kv;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    float *logits = malloc(sizeof(float) * n_vocab);
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(fx, "items"))
    {
        int n, n_want;
        int32_t *ids = tu_ids(cJSON_GetObjectItem(it, "ids"), &n);
        int32_t *want = tu_ids(cJSON_GetObjectItem(it, "continuation"), &n_want);
        mdl_kv_seq_t *seq;
        assert_int_equal(mdl_kv_seq_create(kv, &seq), FY_OK);
        mdl_prefill_params_t pp;
        mdl_prefill_params_default(&pp);
        pp.seq = seq;
        assert_int_equal(mdl_prefill(g_ctx, ids, n, &pp, logits), FY_OK);
        for (int i = 0; i < n_want; i++) {
            int32_t best = 0;
            for (int v = 1; v < n_vocab; v++)
                best = logits[v] > logits[best] ? v : best;
            if (best != want[i])
                fail_msg("prompt '%s': step %d: got %d, reference %d",
                         cJSON_GetObjectItem(it, "prompt")->valuestring, i, best, want[i]);
            assert_int_equal(mdl_decode(g_ctx, &seq, &best, 1, logits), FY_OK);
        }
        assert_int_equal(mdl_kv_seq_len(seq), n + n_want);
        mdl_kv_seq_destroy(seq);
        free(ids);
        free(want);
    }
    free(logits);
    mdl_kv_destroy(kv);
    cJSON_Delete(fx);
}

// Prefill of k tokens + decode of the rest over the paged (FP16) cache gives the same logits
// as one prefill over all of them; also batched with a second sequence.
static void test_paged_decode_matches_recompute(void **state)
{
    static const int32_t toks[] = {504, 3575, 282, 4649, 314, 7042, 30, 198, 504, 2988, 314,
                                   42, 216, 34, 32, 33};
    int n = (int)FY_ARRAY_SIZE(toks), k = 5;
    int n_vocab = mdl_model_config(g_model)->n_vocab;
    float *full = malloc(sizeof(float) * (size_t)n * n_vocab);
    float *step = malloc(sizeof(float) * 2 * n_vocab);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.all_logits = true;
    assert_int_equal(mdl_prefill(g_ctx, toks, n, &pp, full), FY_OK);

    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, g_model);
    kp.page_tokens = 4; // several pages, a partly filled last one
    kp.n_pages = 2 * mdl_kv_pages_for(&kp, n);
    mdl_kv_t *kv;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    mdl_kv_seq_t *a, *b;
    assert_int_equal(mdl_kv_seq_create(kv, &a), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &b), FY_OK);
    pp.all_logits = false;
    pp.seq = a;
    assert_int_equal(mdl_prefill(g_ctx, toks, k, &pp, step), FY_OK);
    pp.seq = b;
    assert_int_equal(mdl_prefill(g_ctx, toks, k + 2, &pp, step), FY_OK);
    float max_err = 0.0f;
    for (int i = k; i < n - 2; i++) {
        mdl_kv_seq_t *seqs[2] = {a, b};
        int32_t in[2] = {toks[i], toks[i + 2]};
        assert_int_equal(mdl_decode(g_ctx, seqs, in, 2, step), FY_OK);
        for (int v = 0; v < n_vocab; v++) {
            max_err = fmaxf(max_err, fabsf(step[v] - full[(size_t)i * n_vocab + v]));
            max_err = fmaxf(max_err, fabsf(step[n_vocab + v] - full[(size_t)(i + 2) * n_vocab + v]));
        }
    }
    printf("paged decode vs recompute: max |dlogit| = %g\n", max_err);
    // The cache holds K and V in FP16: a few hundredths at most.
    assert_true(max_err < 0.08f);
    mdl_kv_seq_destroy(a);
    mdl_kv_seq_destroy(b);
    mdl_kv_destroy(kv);
    free(full);
    free(step);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_top5_logits),
        cmocka_unit_test(test_greedy_continuations),
        cmocka_unit_test(test_paged_decode_matches_recompute),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
