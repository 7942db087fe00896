// Batched prefill on the tiny random-weight model: several prompts of different lengths run
// together give each prompt the logits, K, V and window queries it gets alone (Llama and
// Qwen2 layouts, quantized weights, GEMM chunks that straddle prompts, prompts past the
// attention kernel's GEMM threshold); the KV stored into sequences equals the one-by-one
// cache; a failing callback aborts the batch and leaves every sequence empty; bad arguments
// are refused before anything changes.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "batch_check.h"

static int32_t *make_tokens(int n, int n_vocab, uint32_t seed)
{
    int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        t[i] = (int32_t)((seed >> 8) % (uint32_t)n_vocab);
    }
    return t;
}

static void check_model(const mdlt_tiny_params_t *tp, int chunk, int n_seqs, const int *n,
                        const int *windows)
{
    mdl_model_t *m = tu_tiny_model(tp);
    assert_non_null(m);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    cp.prefill_chunk = chunk;
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, &cp, &ctx), FY_OK);
    int32_t **toks = malloc(sizeof(int32_t *) * (size_t)n_seqs);
    for (int s = 0; s < n_seqs; s++)
        toks[s] = make_tokens(n[s], mdl_model_config(m)->n_vocab, 7u + (uint32_t)s);
    bc_check(ctx, m, n_seqs, (const int32_t *const *)toks, n, windows, 1e-4f);
    for (int s = 0; s < n_seqs; s++)
        free(toks[s]);
    free(toks);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

static void test_llama_batch_matches_one_by_one(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    const int n[] = {5, 1, 27, 13};
    const int w[] = {4, 2, 0, 32};
    check_model(&tp, 8, 4, n, w); // chunks of 8 rows cross every prompt boundary
    check_model(&tp, 512, 4, n, w);
    const int one[] = {9};
    check_model(&tp, 4, 1, one, w);
    // Prompts long enough for the GEMM attention kernel, next to a short one.
    const int lng[] = {150, 3, 97};
    check_model(&tp, 64, 3, lng, w);
    tp.weight_type = MDL_TENSOR_Q8_0;
    check_model(&tp, 8, 4, n, w);
}

static void test_qwen2_batch_matches_one_by_one(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    tp.arch = "qwen2";
    tp.weight_type = MDL_TENSOR_F16;
    const int n[] = {17, 2, 6};
    const int w[] = {8, 8, 8};
    check_model(&tp, 8, 3, n, w);
}

static void test_batch_kv_cache_and_errors(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    const mdl_config_t *c = mdl_model_config(m);
    size_t nv = (size_t)c->n_vocab, hd = (size_t)c->head_dim;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    cp.prefill_chunk = 8;
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, &cp, &ctx), FY_OK);
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.page_tokens = 4;
    kp.n_pages = 4 * mdl_kv_pages_for(&kp, 40);
    mdl_kv_t *kv;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    enum { NS = 3 };
    const int n[NS] = {11, 3, 20};
    int32_t *toks[NS];
    mdl_kv_seq_t *one[NS], *bat[NS];
    float *lo[NS], *lb[NS];
    mdl_prefill_params_t pp[NS];
    for (int s = 0; s < NS; s++) {
        toks[s] = make_tokens(n[s], c->n_vocab, 100u + (uint32_t)s);
        assert_int_equal(mdl_kv_seq_create(kv, &one[s]), FY_OK);
        assert_int_equal(mdl_kv_seq_create(kv, &bat[s]), FY_OK);
        lo[s] = malloc(nv * sizeof(float));
        lb[s] = malloc(nv * sizeof(float));
        mdl_prefill_params_default(&pp[s]);
        pp[s].seq = one[s];
        assert_int_equal(mdl_prefill(ctx, toks[s], n[s], &pp[s], lo[s]), FY_OK);
        pp[s].seq = bat[s];
    }
    const int32_t *const *ct = (const int32_t *const *)toks;
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, n, pp, lb), FY_OK);
    float *ka = malloc(40 * hd * sizeof(float)), *va = malloc(40 * hd * sizeof(float));
    float *kb = malloc(40 * hd * sizeof(float)), *vb = malloc(40 * hd * sizeof(float));
    for (int s = 0; s < NS; s++) {
        assert_int_equal(mdl_kv_seq_len(bat[s]), n[s]);
        assert_true(bc_diff(lb[s], lo[s], nv) < 1e-4f);
        for (int l = 0; l < c->n_layers; l++) {
            for (int h = 0; h < c->n_kv_heads; h++) {
                assert_int_equal(mdl_kv_seq_read(one[s], l, h, ka, va), FY_OK);
                assert_int_equal(mdl_kv_seq_read(bat[s], l, h, kb, vb), FY_OK);
                // FP16 pages: equal up to one rounding step of values of magnitude ~ 1.
                assert_true(bc_diff(kb, ka, (size_t)n[s] * hd) < 2e-3f);
                assert_true(bc_diff(vb, va, (size_t)n[s] * hd) < 2e-3f);
            }
        }
        // The cached prompt decodes on like the one-by-one one.
        int32_t next = 5;
        assert_int_equal(mdl_decode(ctx, &one[s], &next, 1, lo[s]), FY_OK);
        assert_int_equal(mdl_decode(ctx, &bat[s], &next, 1, lb[s]), FY_OK);
        assert_true(bc_diff(lb[s], lo[s], nv) < 1e-2f);
    }
    for (int s = 0; s < NS; s++) {
        mdl_kv_seq_clear(bat[s]);
        mdl_kv_seq_clear(one[s]);
    }
    int64_t free_pages = mdl_kv_free_pages(kv);

    // A callback failure in the middle prompt aborts the batch; every sequence is left empty.
    bc_capture_t cap[NS];
    for (int s = 0; s < NS; s++) {
        bc_capture_init(&cap[s], c, n[s], 0);
        pp[s].on_layer = bc_on_layer;
        pp[s].cb_arg = &cap[s];
    }
    cap[1].fail_at = 1;
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, n, pp, lb), FY_ERR_CANCELLED);
    assert_int_equal(cap[0].layers_seen, 2); // layer 0, then layer 1 before prompt 1 failed
    assert_int_equal(cap[2].layers_seen, 1);
    for (int s = 0; s < NS; s++) {
        assert_int_equal(mdl_kv_seq_len(bat[s]), 0);
        bc_capture_free(&cap[s]);
        pp[s].on_layer = NULL;
    }
    assert_int_equal(mdl_kv_free_pages(kv), free_pages);

    // Refused before anything changes: a bad token, a sequence twice, a non-empty sequence,
    // bad counts, and a pool too small for the whole batch.
    int32_t saved = toks[2][4];
    toks[2][4] = c->n_vocab;
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, n, pp, lb), FY_ERR_OUT_OF_RANGE);
    toks[2][4] = saved;
    pp[2].seq = bat[0];
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, n, pp, lb), FY_ERR_INVALID_ARG);
    pp[2].seq = bat[2];
    assert_int_equal(mdl_prefill(ctx, toks[0], n[0], &pp[0], lb[0]), FY_OK);
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, n, pp, lb), FY_ERR_STATE);
    mdl_kv_seq_clear(bat[0]);
    const int bad_n[NS] = {11, 0, 20};
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, bad_n, pp, lb), FY_ERR_INVALID_ARG);
    assert_int_equal(mdl_prefill_batch(ctx, 0, ct, n, pp, lb), FY_ERR_INVALID_ARG);
    assert_int_equal(mdl_prefill_batch(NULL, NS, ct, n, pp, lb), FY_ERR_INVALID_ARG);
    for (int s = 0; s < NS; s++)
        assert_int_equal(mdl_kv_seq_len(bat[s]), 0);
    assert_int_equal(mdl_kv_free_pages(kv), free_pages);
    mdl_kv_params_t small = kp;
    small.n_pages = mdl_kv_pages_for(&kp, 20) + 1;
    mdl_kv_t *kv2;
    assert_int_equal(mdl_kv_create(&small, &kv2), FY_OK);
    mdl_kv_seq_t *t[NS];
    for (int s = 0; s < NS; s++) {
        assert_int_equal(mdl_kv_seq_create(kv2, &t[s]), FY_OK);
        pp[s].seq = t[s];
    }
    assert_int_equal(mdl_prefill_batch(ctx, NS, ct, n, pp, lb), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(mdl_kv_free_pages(kv2), small.n_pages);
    for (int s = 0; s < NS; s++)
        mdl_kv_seq_destroy(t[s]);
    mdl_kv_destroy(kv2);

    free(ka);
    free(va);
    free(kb);
    free(vb);
    for (int s = 0; s < NS; s++) {
        free(toks[s]);
        free(lo[s]);
        free(lb[s]);
        mdl_kv_seq_destroy(one[s]);
        mdl_kv_seq_destroy(bat[s]);
    }
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_batch_matches_one_by_one),
        cmocka_unit_test(test_qwen2_batch_matches_one_by_one),
        cmocka_unit_test(test_batch_kv_cache_and_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
