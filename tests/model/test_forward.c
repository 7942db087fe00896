// The forward pass on the tiny random-weight model (no download): paged decode equals a full
// recompute (Llama and Qwen2 layouts, quantized weights too), the per-layer handout carries
// the K/V/window queries the cache holds, a cache loaded from outside decodes like one that
// prefill filled, and errors (full pool, bad tokens, state) leave things unchanged.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "test_util.h"

static const int32_t k_toks[] = {1, 50, 60, 261, 7, 100, 101, 102, 262, 200, 3, 4, 5, 6, 258,
                                 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
enum { N_TOKS = (int)FY_ARRAY_SIZE(k_toks) };

static float max_abs_diff(const float *a, const float *b, size_t n)
{
    float m = 0.0f;
    for (size_t i = 0; i < n; i++)
        m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

static void check_decode_matches_recompute(const mdlt_tiny_params_t *tp, int n_threads)
{
    mdl_model_t *m = tu_tiny_model(tp);
    assert_non_null(m);
    int nv = mdl_model_config(m)->n_vocab;
    assert_int_equal(nv, mdlt_tiny_n_vocab());
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = n_threads;
    cp.prefill_chunk = 8; // several GEMM chunks
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, &cp, &ctx), FY_OK);
    float *full = malloc(sizeof(float) * N_TOKS * nv);
    float *step = malloc(sizeof(float) * 3 * nv);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.all_logits = true;
    assert_int_equal(mdl_prefill(ctx, k_toks, N_TOKS, &pp, full), FY_OK);
    // The last row of all_logits equals the last-only logits.
    pp.all_logits = false;
    assert_int_equal(mdl_prefill(ctx, k_toks, N_TOKS, &pp, step), FY_OK);
    assert_true(max_abs_diff(step, full + (size_t)(N_TOKS - 1) * nv, (size_t)nv) < 1e-4f);

    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.page_tokens = 3;
    kp.n_pages = 3 * mdl_kv_pages_for(&kp, N_TOKS);
    mdl_kv_t *kv;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    // Three sequences: prefilled with 4 and 9 tokens, and one decoded from empty.
    mdl_kv_seq_t *s[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(mdl_kv_seq_create(kv, &s[i]), FY_OK);
    pp.seq = s[0];
    assert_int_equal(mdl_prefill(ctx, k_toks, 4, &pp, step), FY_OK);
    pp.seq = s[1];
    assert_int_equal(mdl_prefill(ctx, k_toks, 9, &pp, step), FY_OK);
    float worst = 0.0f;
    for (int t = 0; t + 9 < N_TOKS; t++) {
        int32_t in[3] = {k_toks[4 + t], k_toks[9 + t], k_toks[t]};
        assert_int_equal(mdl_decode(ctx, s, in, 3, step), FY_OK);
        worst = fmaxf(worst, max_abs_diff(step, full + (size_t)(4 + t) * nv, (size_t)nv));
        worst = fmaxf(worst, max_abs_diff(step + nv, full + (size_t)(9 + t) * nv, (size_t)nv));
        worst = fmaxf(worst, max_abs_diff(step + 2 * nv, full + (size_t)t * nv, (size_t)nv));
    }
    // FP16 K/V in the pages against FP32 in prefill.
    assert_true(worst < 2e-2f);
    assert_int_equal(mdl_kv_seq_len(s[0]), 4 + N_TOKS - 9);
    for (int i = 0; i < 3; i++)
        mdl_kv_seq_destroy(s[i]);
    assert_int_equal(mdl_kv_free_pages(kv), kp.n_pages);
    mdl_kv_destroy(kv);
    free(full);
    free(step);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

static void test_llama_decode_matches_recompute(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    check_decode_matches_recompute(&tp, 1);
    check_decode_matches_recompute(&tp, 3);
    tp.tied = false;
    tp.weight_type = MDL_TENSOR_Q4_1;
    check_decode_matches_recompute(&tp, 2);
    tp.weight_type = MDL_TENSOR_Q8_0;
    tp.n_kv_heads = 4; // plain multi-head
    check_decode_matches_recompute(&tp, 2);
}

// A prompt long enough for the GEMM attention path (several query blocks) followed by decode.
static void test_long_prompt_decode(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    int nv = mdl_model_config(m)->n_vocab;
    enum { N = 300, K = 290 };
    int32_t *toks = malloc(sizeof(int32_t) * N);
    for (int i = 0; i < N; i++)
        toks[i] = (int32_t)((i * 37 + 11) % nv);
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, NULL, &ctx), FY_OK);
    float *full = malloc(sizeof(float) * N * nv), *step = malloc(sizeof(float) * nv);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.all_logits = true;
    assert_int_equal(mdl_prefill(ctx, toks, N, &pp, full), FY_OK);
    // The first 40 rows agree with a short prefill (scalar attention path).
    float *short_l = malloc(sizeof(float) * 40 * nv);
    assert_int_equal(mdl_prefill(ctx, toks, 40, &pp, short_l), FY_OK);
    assert_true(max_abs_diff(short_l, full, (size_t)40 * nv) < 1e-3f);
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.n_pages = mdl_kv_pages_for(&kp, N);
    mdl_kv_t *kv;
    mdl_kv_seq_t *s;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &s), FY_OK);
    pp.all_logits = false;
    pp.seq = s;
    assert_int_equal(mdl_prefill(ctx, toks, K, &pp, step), FY_OK);
    assert_true(max_abs_diff(step, full + (size_t)(K - 1) * nv, (size_t)nv) < 1e-3f);
    for (int i = K; i < N; i++) {
        assert_int_equal(mdl_decode(ctx, &s, &toks[i], 1, step), FY_OK);
        assert_true(max_abs_diff(step, full + (size_t)i * nv, (size_t)nv) < 2e-2f);
    }
    mdl_kv_seq_destroy(s);
    mdl_kv_destroy(kv);
    free(short_l);
    free(full);
    free(step);
    free(toks);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

static void test_qwen2_decode_matches_recompute(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    tp.arch = "qwen2";
    tp.weight_type = MDL_TENSOR_F16;
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    assert_true(mdl_model_config(m)->qkv_bias);
    assert_int_equal(mdl_model_config(m)->rope.mode, KRN_ROPE_NEOX);
    mdl_model_destroy(m);
    check_decode_matches_recompute(&tp, 2);
}

typedef struct {
    mdl_kv_seq_t *copy; // a second sequence filled from the handout
    const mdl_kv_seq_t *ref;
    int layers_seen;
    int fail_at;
    int window;
    const float *q_expect_src;
} capture_t;

static fy_status_t on_layer(void *arg, const mdl_layer_kv_t *kv)
{
    capture_t *c = arg;
    if (kv->layer != c->layers_seen)
        return FY_ERR_INTERNAL;
    c->layers_seen++;
    if (kv->layer == c->fail_at)
        return FY_ERR_CANCELLED;
    if (kv->n_window != FY_MIN(c->window, kv->n_tokens) || kv->n_heads != 4 ||
        kv->n_kv_heads != 2 || kv->head_dim != 16)
        return FY_ERR_INTERNAL;
    if (c->copy != NULL)
        return mdl_kv_seq_load_layer(c->copy, kv->layer, kv->n_tokens, kv->k, kv->v);
    return FY_OK;
}

static void test_layer_handout_and_external_kv(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    const mdl_config_t *c = mdl_model_config(m);
    int nv = c->n_vocab;
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, NULL, &ctx), FY_OK);
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.n_pages = 2 * mdl_kv_pages_for(&kp, N_TOKS + 4);
    mdl_kv_t *kv;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    mdl_kv_seq_t *a, *b;
    assert_int_equal(mdl_kv_seq_create(kv, &a), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &b), FY_OK);

    // Prefill into a, copying every handed-out layer into b as an external loader would.
    capture_t cap = {.copy = b, .fail_at = -1, .window = 5};
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = a;
    pp.on_layer = on_layer;
    pp.cb_arg = &cap;
    pp.window = 5;
    float *la = malloc(sizeof(float) * nv), *lb = malloc(sizeof(float) * nv);
    int n = 12;
    assert_int_equal(mdl_prefill(ctx, k_toks, n, &pp, la), FY_OK);
    assert_int_equal(cap.layers_seen, c->n_layers);
    assert_int_equal(mdl_kv_seq_len(a), n);
    assert_int_equal(mdl_kv_seq_len(b), 0); // loaded but not committed
    assert_int_equal(mdl_kv_seq_commit(b, n), FY_OK);
    assert_int_equal(mdl_kv_seq_commit(b, 1000), FY_ERR_STATE);
    // Same cache contents.
    float *ka = malloc(sizeof(float) * n * 16), *va = malloc(sizeof(float) * n * 16);
    float *kb = malloc(sizeof(float) * n * 16), *vb = malloc(sizeof(float) * n * 16);
    for (int l = 0; l < c->n_layers; l++) {
        for (int h = 0; h < c->n_kv_heads; h++) {
            assert_int_equal(mdl_kv_seq_read(a, l, h, ka, va), FY_OK);
            assert_int_equal(mdl_kv_seq_read(b, l, h, kb, vb), FY_OK);
            assert_memory_equal(ka, kb, sizeof(float) * n * 16);
            assert_memory_equal(va, vb, sizeof(float) * n * 16);
        }
    }
    // Decoding the next tokens from either gives the same logits.
    for (int t = 0; t < 4; t++) {
        int32_t tok = k_toks[n + t];
        assert_int_equal(mdl_decode(ctx, &a, &tok, 1, la), FY_OK);
        assert_int_equal(mdl_decode(ctx, &b, &tok, 1, lb), FY_OK);
        assert_memory_equal(la, lb, sizeof(float) * nv);
    }
    // A callback error aborts the prefill and leaves the sequence empty.
    mdl_kv_seq_t *s;
    assert_int_equal(mdl_kv_seq_create(kv, &s), FY_OK);
    capture_t stop = {.fail_at = 1, .window = 5};
    pp.seq = s;
    pp.cb_arg = &stop;
    assert_int_equal(mdl_prefill(ctx, k_toks, n, &pp, la), FY_ERR_CANCELLED);
    assert_int_equal(mdl_kv_seq_len(s), 0);
    // Prefill needs an empty sequence.
    pp.on_layer = NULL;
    assert_int_equal(mdl_prefill(ctx, k_toks, n, &pp, la), FY_OK);
    assert_int_equal(mdl_prefill(ctx, k_toks, n, &pp, la), FY_ERR_STATE);
    mdl_kv_seq_destroy(s);
    free(ka);
    free(va);
    free(kb);
    free(vb);
    free(la);
    free(lb);
    mdl_kv_seq_destroy(a);
    mdl_kv_seq_destroy(b);
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

// The window queries are the last W queries (after RoPE), head-major: a window of 2 is the
// tail of a window that covers the whole prompt (asked for more than the prompt: clamped).
typedef struct {
    float *q;
    int n_window;
} qcap_t;

static fy_status_t keep_q(void *arg, const mdl_layer_kv_t *kv)
{
    qcap_t *c = arg;
    if (kv->layer == 0) {
        size_t sz = sizeof(float) * kv->n_heads * kv->n_window * kv->head_dim;
        c->q = malloc(sz);
        memcpy(c->q, kv->q_window, sz);
        c->n_window = kv->n_window;
    }
    return FY_OK;
}

static void test_window_queries(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, NULL, &ctx), FY_OK);
    float *l = malloc(sizeof(float) * mdlt_tiny_n_vocab());
    qcap_t all = {0}, two = {0};
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.on_layer = keep_q;
    pp.cb_arg = &all;
    pp.window = 100; // more than the prompt: clamped
    assert_int_equal(mdl_prefill(ctx, k_toks, 10, &pp, l), FY_OK);
    pp.cb_arg = &two;
    pp.window = 2;
    assert_int_equal(mdl_prefill(ctx, k_toks, 10, &pp, l), FY_OK);
    assert_int_equal(all.n_window, 10);
    assert_int_equal(two.n_window, 2);
    for (int h = 0; h < 4; h++) {
        for (int i = 0; i < 2; i++)
            assert_memory_equal(two.q + ((size_t)h * 2 + i) * 16,
                                all.q + ((size_t)h * 10 + 8 + i) * 16, 16 * sizeof(float));
    }
    float norm = 0.0f;
    for (int d = 0; d < 16; d++)
        norm += all.q[d] * all.q[d];
    assert_true(norm > 0.0f && isfinite(norm));
    free(all.q);
    free(two.q);
    free(l);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

static void test_errors(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.max_batch = 2;
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, &cp, &ctx), FY_OK);
    float *l = malloc(sizeof(float) * 3 * mdlt_tiny_n_vocab());
    int32_t bad[2] = {5, 100000};
    assert_int_equal(mdl_prefill(ctx, bad, 2, NULL, l), FY_ERR_OUT_OF_RANGE);
    bad[1] = -1;
    assert_int_equal(mdl_prefill(ctx, bad, 2, NULL, l), FY_ERR_OUT_OF_RANGE);
    assert_int_equal(mdl_prefill(ctx, bad, 0, NULL, l), FY_ERR_INVALID_ARG);

    // A pool with room for 4 tokens per (layer, head) and page size 2.
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.page_tokens = 2;
    kp.n_pages = mdl_kv_pages_for(&kp, 4);
    mdl_kv_t *kv;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    mdl_kv_seq_t *s, *s2;
    assert_int_equal(mdl_kv_seq_create(kv, &s), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &s2), FY_OK);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = s;
    assert_int_equal(mdl_prefill(ctx, k_toks, 5, &pp, l), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(mdl_kv_seq_len(s), 0);
    assert_int_equal(mdl_prefill(ctx, k_toks, 3, &pp, l), FY_OK);
    int32_t t = 7;
    assert_int_equal(mdl_decode(ctx, &s, &t, 1, l), FY_OK);
    assert_int_equal(mdl_decode(ctx, &s, &t, 1, l), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(mdl_kv_seq_len(s), 4);
    // Batch errors: the same sequence twice, too large a batch, a bad token.
    mdl_kv_seq_t *dup[3] = {s2, s2, s};
    int32_t toks[3] = {1, 2, 3};
    assert_int_equal(mdl_decode(ctx, dup, toks, 2, l), FY_ERR_INVALID_ARG);
    assert_int_equal(mdl_decode(ctx, dup, toks, 3, l), FY_ERR_OUT_OF_RANGE);
    toks[0] = 1 << 20;
    assert_int_equal(mdl_decode(ctx, &s2, toks, 1, l), FY_ERR_OUT_OF_RANGE);
    assert_int_equal(mdl_kv_seq_len(s2), 0);
    // Loading KV for a layer that does not exist.
    float z[16] = {0};
    assert_int_equal(mdl_kv_seq_load_layer(s2, 7, 1, z, z), FY_ERR_INVALID_ARG);
    mdl_kv_seq_clear(s);
    assert_int_equal(mdl_kv_free_pages(kv), kp.n_pages);
    mdl_kv_seq_destroy(s);
    mdl_kv_seq_destroy(s2);
    mdl_kv_destroy(kv);
    // Bad parameters.
    kp.n_pages = 0;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_ERR_INVALID_ARG);
    cp.prefill_chunk = 0;
    mdl_ctx_t *c2;
    assert_int_equal(mdl_ctx_create(m, &cp, &c2), FY_ERR_INVALID_ARG);
    free(l);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_decode_matches_recompute),
        cmocka_unit_test(test_qwen2_decode_matches_recompute),
        cmocka_unit_test(test_long_prompt_decode),
        cmocka_unit_test(test_layer_handout_and_external_kv),
        cmocka_unit_test(test_window_queries),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
