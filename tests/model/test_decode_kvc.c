// Decode over kvcodec pages on the real SmolLM2 model: a prompt prefilled here, every layer
// encoded into wire frames (fp16 policy, and the `ferry` policy at b = 0.5), placed into a
// kvc pool still compressed, then 16 greedy tokens decoded over the pages. With FP16 frames
// the tokens equal mdl_decode over the FP16 mdl_kv cache; with `ferry` at b = 0.5 they mostly
// agree and the next-token distributions stay close (KL). Batching, a full pool and a
// missing layer are checked too, and a short chat prompt at b = 0.25.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "../decode/prefill_frames.h"
#include "test_util.h"

enum { N_GEN = 16, SEQ_ID = 77 };

static const char k_prompt[] =
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Ferries have carried people and goods across rivers, lakes and straits for thousands of "
    "years. Early ferries were rafts or rowing boats pulled by ropes; later came sailing "
    "vessels, paddle steamers and the large roll-on roll-off ships that now carry cars, "
    "trucks and trains across the Baltic, the English Channel and the straits of Japan. In "
    "cities such as Istanbul, Hong Kong, Sydney and New York, commuter ferries move hundreds "
    "of thousands of passengers every day. Cable ferries still cross many small rivers in "
    "Europe and North America. Summarize the history of ferries in two sentences, and name "
    "one city where ferries are part of daily life.<|im_end|>\n<|im_start|>assistant\n";

static struct {
    mdl_model_t *m;
    mdl_ctx_t *ctx;
    int n_vocab, n_prompt;
    int32_t *prompt;
    pf_stream_t streams[2]; // fp16, ferry b = 0.5
    int32_t first;          // greedy token from the prefill logits
    // The reference: mdl_decode over the FP16 mdl_kv cache.
    int32_t ref_tokens[N_GEN];           // ref_tokens[0] = first
    float *ref_logits;                   // [N_GEN][n_vocab]: after feeding ref_tokens[i]
    uint64_t ref_ns;                     // time in mdl_decode
} G;

static kvc_pool_t *make_pool(uint32_t n_pages)
{
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.n_pages = n_pages;
    pp.head_dim = (uint32_t)mdl_model_config(G.m)->head_dim;
    kvc_pool_t *pool = NULL;
    assert_int_equal(kvc_pool_create(&pp, &pool), FY_OK);
    return pool;
}

static kvc_seq_t *placed_stream(kvc_pool_t *pool, const pf_stream_t *stream)
{
    const mdl_config_t *c = mdl_model_config(G.m);
    kvc_seq_t *seq = NULL;
    assert_int_equal(kvc_seq_create(pool, (uint32_t)c->n_layers, (uint32_t)c->n_kv_heads,
                                    mdl_model_fingerprint(G.m), SEQ_ID, &seq),
                     FY_OK);
    assert_int_equal(pf_place(stream, seq), FY_OK);
    return seq;
}

static kvc_seq_t *placed_seq(kvc_pool_t *pool, int stream)
{
    return placed_stream(pool, &G.streams[stream]);
}

static int setup(void **state)
{
    (void)state;
    G.m = tu_real_model();
    if (G.m == NULL)
        return -1;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    cp.max_batch = 4;
    if (mdl_ctx_create(G.m, &cp, &G.ctx) != FY_OK)
        return -1;
    const mdl_config_t *c = mdl_model_config(G.m);
    G.n_vocab = c->n_vocab;
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.m);
    size_t n = 0;
    G.prompt = malloc(1024 * sizeof(int32_t));
    if (mdl_tokenizer_encode(tok, k_prompt, strlen(k_prompt), true, G.prompt, 1024, &n) != FY_OK)
        return -1;
    G.n_prompt = (int)n;

    if (kvc_policy_builtin("fp16", &G.streams[0].policy) != FY_OK ||
        kvc_policy_builtin("ferry", &G.streams[1].policy) != FY_OK)
        return -1;
    G.streams[0].budget = -1;
    G.streams[1].budget = 0.5;

    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, G.m);
    kp.n_pages = mdl_kv_pages_for(&kp, G.n_prompt + N_GEN + 1);
    mdl_kv_t *kv;
    mdl_kv_seq_t *ref;
    if (mdl_kv_create(&kp, &kv) != FY_OK || mdl_kv_seq_create(kv, &ref) != FY_OK)
        return -1;
    float *logits = malloc(sizeof(float) * (size_t)G.n_vocab);
    G.ref_logits = malloc(sizeof(float) * (size_t)N_GEN * G.n_vocab);
    if (pf_prefill(G.ctx, G.m, G.prompt, G.n_prompt, G.streams, 2, SEQ_ID, ref, logits) != FY_OK)
        return -1;
    G.first = pf_argmax(logits, G.n_vocab);
    int32_t t = G.first;
    for (int i = 0; i < N_GEN; i++) {
        G.ref_tokens[i] = t;
        float *row = G.ref_logits + (size_t)i * G.n_vocab;
        uint64_t t0 = fy_clock_ns();
        if (mdl_decode(G.ctx, &ref, &t, 1, row) != FY_OK)
            return -1;
        G.ref_ns += fy_clock_ns() - t0;
        t = pf_argmax(row, G.n_vocab);
    }
    printf("prompt %d tokens; fp16 frames %.1f KiB, ferry b=0.5 frames %.1f KiB (%.3f of FP16)\n",
           G.n_prompt, G.streams[0].wire_bytes / 1024.0, G.streams[1].wire_bytes / 1024.0,
           (double)G.streams[1].wire_bytes / (double)G.streams[1].fp16_bytes);
    mdl_kv_seq_destroy(ref);
    mdl_kv_destroy(kv);
    free(logits);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < 2; i++)
        pf_stream_cleanup(&G.streams[i]);
    free(G.ref_logits);
    free(G.prompt);
    mdl_ctx_destroy(G.ctx);
    mdl_model_destroy(G.m);
    return 0;
}

/* KL(p || q) of the softmaxes of two logit rows. */
static double kl_div(const float *lp, const float *lq, int n)
{
    double mp = lp[0], mq = lq[0];
    for (int i = 1; i < n; i++) {
        mp = fmax(mp, lp[i]);
        mq = fmax(mq, lq[i]);
    }
    double zp = 0, zq = 0;
    for (int i = 0; i < n; i++) {
        zp += exp(lp[i] - mp);
        zq += exp(lq[i] - mq);
    }
    double kl = 0;
    for (int i = 0; i < n; i++) {
        double a = lp[i] - mp - log(zp), b = lq[i] - mq - log(zq);
        kl += exp(a) * (a - b);
    }
    return kl;
}

// FP16 frames: greedy over the kvc pages gives the reference's tokens, logits within FP32
// summation-order noise.
static void test_fp16_frames_equal_mdl_decode(void **state)
{
    (void)state;
    kvc_pool_t *pool = make_pool(1024);
    kvc_seq_t *seq = placed_seq(pool, 0);
    float *logits = malloc(sizeof(float) * (size_t)G.n_vocab);
    int32_t t = G.first;
    float max_diff = 0;
    uint64_t ns = 0;
    for (int i = 0; i < N_GEN; i++) {
        assert_int_equal(t, G.ref_tokens[i]);
        int32_t pos = G.n_prompt + i;
        uint64_t t0 = fy_clock_ns();
        assert_int_equal(mdl_decode_kvc(G.ctx, pool, &seq, &pos, &t, 1, logits), FY_OK);
        ns += fy_clock_ns() - t0;
        const float *ref = G.ref_logits + (size_t)i * G.n_vocab;
        for (int v = 0; v < G.n_vocab; v++)
            max_diff = fmaxf(max_diff, fabsf(logits[v] - ref[v]));
        t = pf_argmax(logits, G.n_vocab);
    }
    printf("fp16 frames: %d/%d greedy tokens equal, max |logit diff| %g, %.2f ms per step "
           "(mdl_decode: %.2f ms)\n",
           N_GEN, N_GEN, max_diff, ns / 1e6 / N_GEN, G.ref_ns / 1e6 / N_GEN);
    assert_true(max_diff < 0.05f);
    // Every (layer, head) holds the prompt plus the decoded tokens.
    const mdl_config_t *c = mdl_model_config(G.m);
    for (int l = 0; l < c->n_layers; l++) {
        for (int h = 0; h < c->n_kv_heads; h++)
            assert_int_equal(kvc_seq_n_tokens(seq, (uint32_t)l, (uint32_t)h), G.n_prompt + N_GEN);
    }
    kvc_seq_destroy(seq);
    assert_int_equal(kvc_pool_free_count(pool), kvc_pool_n_pages(pool));
    free(logits);
    kvc_pool_destroy(pool);
}

// `ferry` at b = 0.5: top-1 agreement and KL against the reference with the reference's tokens
// fed (teacher forcing, so every step compares the same context), and the free-running greedy
// continuation.
static void test_ferry_frames_close(void **state)
{
    (void)state;
    kvc_pool_t *pool = make_pool(1024);
    kvc_seq_t *forced = placed_seq(pool, 1), *free_run = placed_seq(pool, 1);
    float *logits = malloc(sizeof(float) * (size_t)G.n_vocab);
    int agree = 0, same_prefix = 0;
    bool diverged = false;
    double kl_sum = 0, kl_max = 0;
    uint64_t ns = 0;
    int32_t t_free = G.first;
    for (int i = 0; i < N_GEN; i++) {
        int32_t pos = G.n_prompt + i, t = G.ref_tokens[i];
        uint64_t t0 = fy_clock_ns();
        assert_int_equal(mdl_decode_kvc(G.ctx, pool, &forced, &pos, &t, 1, logits), FY_OK);
        ns += fy_clock_ns() - t0;
        const float *ref = G.ref_logits + (size_t)i * G.n_vocab;
        agree += pf_argmax(logits, G.n_vocab) == pf_argmax(ref, G.n_vocab);
        double kl = kl_div(ref, logits, G.n_vocab);
        kl_sum += kl;
        kl_max = fmax(kl_max, kl);

        diverged = diverged || t_free != G.ref_tokens[i];
        same_prefix += !diverged;
        assert_int_equal(mdl_decode_kvc(G.ctx, pool, &free_run, &pos, &t_free, 1, logits), FY_OK);
        t_free = pf_argmax(logits, G.n_vocab);
    }
    printf("ferry b=0.5: top-1 agreement %d/%d (teacher-forced), mean KL %.4f, max KL %.4f, "
           "free-running greedy equal for the first %d/%d tokens; %.2f ms per step\n",
           agree, N_GEN, kl_sum / N_GEN, kl_max, same_prefix, N_GEN, ns / 1e6 / N_GEN);
    assert_true(agree >= 12);
    assert_true(kl_sum / N_GEN < 0.15);
    assert_true(kl_max < 1.0);
    kvc_seq_destroy(forced);
    kvc_seq_destroy(free_run);
    assert_int_equal(kvc_pool_free_count(pool), kvc_pool_n_pages(pool));
    free(logits);
    kvc_pool_destroy(pool);
}

// Two sequences in one batch step give the logits each gives alone.
static void test_batch_equals_alone(void **state)
{
    (void)state;
    kvc_pool_t *pool = make_pool(4096);
    kvc_seq_t *alone[2] = {placed_seq(pool, 0), placed_seq(pool, 1)};
    kvc_seq_t *batch[2] = {placed_seq(pool, 0), placed_seq(pool, 1)};
    float *one = malloc(sizeof(float) * (size_t)G.n_vocab);
    float *two = malloc(sizeof(float) * 2 * (size_t)G.n_vocab);
    float batch_diff = 0;
    for (int i = 0; i < 4; i++) {
        int32_t pos[2] = {G.n_prompt + i, G.n_prompt + i};
        int32_t toks[2] = {G.ref_tokens[i], G.ref_tokens[(i + 1) % N_GEN]};
        assert_int_equal(mdl_decode_kvc(G.ctx, pool, batch, pos, toks, 2, two), FY_OK);
        for (int b = 0; b < 2; b++) {
            assert_int_equal(mdl_decode_kvc(G.ctx, pool, &alone[b], &pos[b], &toks[b], 1, one),
                             FY_OK);
            float max_diff = 0;
            for (int v = 0; v < G.n_vocab; v++)
                max_diff = fmaxf(max_diff, fabsf(one[v] - two[(size_t)b * G.n_vocab + v]));
            // Batched and single-row matmuls may sum in a different order (the same bound
            // as the prefill/decode comparison in test_forward_ref).
            batch_diff = fmaxf(batch_diff, max_diff);
            assert_true(max_diff < 0.01f);
            assert_int_equal(pf_argmax(one, G.n_vocab),
                             pf_argmax(two + (size_t)b * G.n_vocab, G.n_vocab));
        }
    }
    printf("batch of 2 vs alone: max |logit diff| %g\n", batch_diff);
    for (int b = 0; b < 2; b++) {
        kvc_seq_destroy(alone[b]);
        kvc_seq_destroy(batch[b]);
    }
    assert_int_equal(kvc_pool_free_count(pool), kvc_pool_n_pages(pool));
    free(one);
    free(two);
    kvc_pool_destroy(pool);
}

// A pool that cannot take the step's tail pages: RESOURCE_EXHAUSTED and nothing appended; the
// same step succeeds once pages are back. A sequence with a layer missing is refused.
static void test_full_pool_and_missing_layer(void **state)
{
    (void)state;
    const mdl_config_t *c = mdl_model_config(G.m);
    kvc_pool_t *pool = make_pool(1024);
    kvc_seq_t *seq = placed_seq(pool, 1);
    uint32_t need = mdl_kvc_step_pages(G.m, pool, seq);
    assert_true(need > 0 && need <= (uint32_t)(c->n_layers * c->n_kv_heads));
    uint32_t n_hold = kvc_pool_free_count(pool) - (need - 1);
    kvc_page_id_t *held = malloc(sizeof(*held) * n_hold);
    for (uint32_t i = 0; i < n_hold; i++)
        assert_int_equal(kvc_page_alloc(pool, KVC_OPT_F16, false, &held[i]), FY_OK);
    float *logits = malloc(sizeof(float) * (size_t)G.n_vocab);
    int32_t pos = G.n_prompt, t = G.first;
    // Layers keep different token counts (the optimizer evicts per layer).
    uint32_t before[64];
    assert_true(c->n_layers <= 64);
    for (int l = 0; l < c->n_layers; l++)
        before[l] = kvc_seq_n_tokens(seq, (uint32_t)l, 0);
    assert_int_equal(mdl_decode_kvc(G.ctx, pool, &seq, &pos, &t, 1, logits),
                     FY_ERR_RESOURCE_EXHAUSTED);
    for (int l = 0; l < c->n_layers; l++)
        assert_int_equal(kvc_seq_n_tokens(seq, (uint32_t)l, 0), before[l]);
    kvc_page_unref(pool, held[0]);
    assert_int_equal(mdl_decode_kvc(G.ctx, pool, &seq, &pos, &t, 1, logits), FY_OK);
    for (int l = 0; l < c->n_layers; l++)
        assert_int_equal(kvc_seq_n_tokens(seq, (uint32_t)l, 0), before[l] + 1);
    for (uint32_t i = 1; i < n_hold; i++)
        kvc_page_unref(pool, held[i]);

    // Every layer but the last placed: not ready to decode.
    kvc_seq_t *part = NULL;
    assert_int_equal(kvc_seq_create(pool, (uint32_t)c->n_layers, (uint32_t)c->n_kv_heads,
                                    mdl_model_fingerprint(G.m), SEQ_ID, &part),
                     FY_OK);
    for (int l = 0; l + 1 < c->n_layers; l++) {
        kvc_frame_t f;
        assert_int_equal(kvc_frame_parse(G.streams[1].frames[l], G.streams[1].lens[l], &f), FY_OK);
        assert_int_equal(kvc_place(part, &f), FY_OK);
    }
    assert_int_equal(mdl_decode_kvc(G.ctx, pool, &part, &pos, &t, 1, logits), FY_ERR_STATE);
    // The same sequence twice in one batch is refused.
    kvc_seq_t *twice[2] = {seq, seq};
    int32_t pos2[2] = {pos + 1, pos + 1}, t2[2] = {t, t};
    assert_int_equal(mdl_decode_kvc(G.ctx, pool, twice, pos2, t2, 2, logits),
                     FY_ERR_INVALID_ARG);
    kvc_seq_destroy(part);
    kvc_seq_destroy(seq);
    assert_int_equal(kvc_pool_free_count(pool), kvc_pool_n_pages(pool));
    free(held);
    free(logits);
    kvc_pool_destroy(pool);
}

// A short chat prompt (the demo's first, 37 tokens with SmolLM2's default system prompt) at
// b = 0.25: its 4 sinks and 16 recent tokens at 16/16 would be more than the budget, and
// `ferry` once dropped its first and last tokens then (docs/kvcodec-policies.md §4); the
// teacher-forced next tokens must stay close to the FP16 cache's.
static void test_short_prompt_quarter(void **state)
{
    (void)state;
    static const char prompt[] =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n";
    int32_t toks[128];
    size_t n = 0;
    assert_int_equal(
        mdl_tokenizer_encode(mdl_model_tokenizer(G.m), prompt, strlen(prompt), true, toks, 128, &n),
        FY_OK);
    pf_stream_t st;
    memset(&st, 0, sizeof(st));
    assert_int_equal(kvc_policy_builtin("ferry", &st.policy), FY_OK);
    st.budget = 0.25;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, G.m);
    kp.n_pages = mdl_kv_pages_for(&kp, (int)n + N_GEN + 1);
    mdl_kv_t *kv;
    mdl_kv_seq_t *ref;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &ref), FY_OK);
    float *ref_logits = malloc(sizeof(float) * (size_t)G.n_vocab);
    float *logits = malloc(sizeof(float) * (size_t)G.n_vocab);
    assert_int_equal(pf_prefill(G.ctx, G.m, toks, (int)n, &st, 1, SEQ_ID, ref, ref_logits), FY_OK);
    assert_true(st.wire_bytes <= (uint64_t)(0.25 * (double)st.fp16_bytes));
    kvc_pool_t *pool = make_pool(1024);
    kvc_seq_t *seq = placed_stream(pool, &st);
    int agree = 0;
    double kl_sum = 0;
    int32_t t = pf_argmax(ref_logits, G.n_vocab);
    for (int i = 0; i < N_GEN; i++) {
        int32_t pos = (int)n + i, tk = t, tr = t;
        assert_int_equal(mdl_decode_kvc(G.ctx, pool, &seq, &pos, &tk, 1, logits), FY_OK);
        assert_int_equal(mdl_decode(G.ctx, &ref, &tr, 1, ref_logits), FY_OK);
        agree += pf_argmax(logits, G.n_vocab) == pf_argmax(ref_logits, G.n_vocab);
        kl_sum += kl_div(ref_logits, logits, G.n_vocab);
        t = pf_argmax(ref_logits, G.n_vocab); // the reference's token is fed to both
    }
    printf("short prompt (%zu tokens), ferry b=0.25 (%.3f of FP16): top-1 agreement %d/%d "
           "(teacher-forced), mean KL %.4f\n",
           n, (double)st.wire_bytes / (double)st.fp16_bytes, agree, N_GEN, kl_sum / N_GEN);
    assert_true(agree >= 14); // 16 measured (5 before the sinks and recent tokens were kept)
    assert_true(kl_sum / N_GEN < 0.1); // 0.010 measured (2.91 before)
    kvc_seq_destroy(seq);
    kvc_pool_destroy(pool);
    pf_stream_cleanup(&st);
    mdl_kv_seq_destroy(ref);
    mdl_kv_destroy(kv);
    free(logits);
    free(ref_logits);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_frames_equal_mdl_decode),
        cmocka_unit_test(test_ferry_frames_close),
        cmocka_unit_test(test_batch_equals_alone),
        cmocka_unit_test(test_full_pool_and_missing_layer),
        cmocka_unit_test(test_short_prompt_quarter),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
