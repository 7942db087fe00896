// The quality harness (bench/quality.h) on the tiny random-weight model: the FP16 policy
// reproduces the reference row exactly, keeping only the sinks hurts a lot, the metrics add up
// as defined, and needle prompts and their exact-match scoring do what they say.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "quality.h"
#include "test_util.h"

enum { N_CTX = 160, N_CONT = 24 };

typedef struct {
    mdl_model_t *m;
    mdl_ctx_t *ctx;
    int32_t *text; // [N_CTX + N_CONT]
} fixture_t;

/* Deterministic byte-level text: the tiny vocabulary has a token per byte (ids 3..258), so
 * English-looking bytes give a long token run. */
static int32_t *tiny_text(const mdl_tokenizer_t *tok, int n)
{
    static const char k_words[] =
        "the codec keeps the tokens that matter and drops the ones that do not, so the decode "
        "worker attends over fewer pages while the answers stay the same. ";
    size_t got = 0;
    char *buf = malloc((size_t)n * 4 + 1);
    size_t len = 0;
    while (len < (size_t)n * 4) {
        size_t w = FY_MIN(sizeof(k_words) - 1, (size_t)n * 4 - len);
        memcpy(buf + len, k_words, w);
        len += w;
    }
    assert_int_equal(mdl_tokenizer_encode(tok, buf, len, false, NULL, 0, &got),
                     FY_ERR_RESOURCE_EXHAUSTED);
    int32_t *ids = malloc(sizeof(int32_t) * got);
    assert_int_equal(mdl_tokenizer_encode(tok, buf, len, false, ids, got, &got), FY_OK);
    assert_true(got >= (size_t)n);
    free(buf);
    return ids;
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    f->m = tu_tiny_model(&tp);
    assert_non_null(f->m);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    assert_int_equal(mdl_ctx_create(f->m, &cp, &f->ctx), FY_OK);
    f->text = tiny_text(mdl_model_tokenizer(f->m), N_CTX + N_CONT);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    mdl_ctx_destroy(f->ctx);
    mdl_model_destroy(f->m);
    free(f->text);
    free(f);
    return 0;
}

/* Teacher forcing with fp16 (twice: a row that is not next to the reference too), the sinks
 * only, and int8 between them. */
static void test_fp16_exact_sinks_large(void **state)
{
    fixture_t *f = *state;
    qual_config_t cfg[4];
    assert_int_equal(qual_config_builtin("fp16", 0.25, &cfg[0]), FY_OK);
    assert_true(cfg[0].budget < 0); // fp16 has no budget
    assert_int_equal(qual_config_builtin("sinks", -1, &cfg[1]), FY_OK);
    assert_int_equal(qual_config_builtin("int8", -1, &cfg[2]), FY_OK);
    cfg[3] = cfg[0];
    qual_batch_t *b;
    assert_int_equal(qual_batch_create(f->ctx, f->m, QUAL_DECODE_KVC, cfg, 4, &b), FY_OK);
    assert_int_equal(qual_batch_n_rows(b), 5);
    qual_acc_t acc[5];
    memset(acc, 0, sizeof(acc));
    assert_int_equal(qual_eval_text(b, f->text, N_CTX, N_CONT, acc, NULL, NULL), FY_OK);

    qual_metrics_t m;
    for (int r = 1; r <= 4; r += 3) {
        qual_acc_metrics(acc, r, &m);
        assert_int_equal(acc[r].n_pred, N_CONT - 1);
        assert_true(m.dppl_pct == 0.0);
        assert_true(m.top1_pct == 100.0);
        assert_true(m.kl_mean == 0.0);
        assert_true(acc[r].nll_sum == acc[0].nll_sum);
        assert_true(m.wire_ratio > 1.0 && m.wire_ratio < 1.1); // FP16 plus frame headers
    }
    // Only the 4 sinks left of 160 tokens: the predictions move a lot.
    qual_acc_metrics(acc, 2, &m);
    const qual_code_info_t *ci = qual_batch_code_info(b, 2);
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    assert_int_equal(ci->tokens[KVC_OPT_F16], (uint64_t)4 * tp.n_layers * tp.n_kv_heads);
    assert_true(m.wire_ratio < 0.1);
    // The random model's next-token distributions are sharply peaked on one token, so the
    // argmax rarely moves and KL stays small in absolute terms; the true tokens' probabilities
    // are tiny and move a lot, which is what perplexity sees.
    // A random model has no reason to predict text better with more context, so only the size
    // of the change is asserted, not its sign (here the 156 evicted tokens move PPL by -63 %).
    assert_true(fabs(m.dppl_pct) > 20.0);
    assert_true(m.kl_mean > 0);
    // int8 sits far closer to the reference than the sinks do.
    qual_metrics_t m8;
    qual_acc_metrics(acc, 3, &m8);
    assert_true(fabs(m8.dppl_pct) < fabs(m.dppl_pct) / 10);
    assert_true(m8.kl_mean < m.kl_mean / 10);
    assert_true(m8.wire_ratio > 0.5 && m8.wire_ratio < 0.7); // d = 16: scales weigh more
    qual_batch_destroy(b);
}

/* One-layer rows: only the chosen layer is coded with the policy. */
static void test_only_layer(void **state)
{
    fixture_t *f = *state;
    qual_config_t cfg[2];
    assert_int_equal(qual_config_builtin("sinks", -1, &cfg[0]), FY_OK);
    cfg[1] = cfg[0];
    cfg[0].only_layer = 0;
    cfg[1].only_layer = 1;
    qual_batch_t *b;
    assert_int_equal(qual_batch_create(f->ctx, f->m, QUAL_DECODE_KVC, cfg, 2, &b), FY_OK);
    qual_acc_t acc[3];
    memset(acc, 0, sizeof(acc));
    assert_int_equal(qual_eval_text(b, f->text, N_CTX, 8, acc, NULL, NULL), FY_OK);
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    for (int r = 1; r <= 2; r++) {
        const qual_code_info_t *ci = qual_batch_code_info(b, r);
        // One layer keeps its 4 sinks; every other layer keeps all tokens.
        uint64_t f16 = (uint64_t)tp.n_kv_heads * (4 + (uint64_t)(tp.n_layers - 1) * N_CTX);
        assert_int_equal(ci->tokens[KVC_OPT_F16], f16);
        qual_metrics_t m;
        qual_acc_metrics(acc, r, &m);
        assert_true(m.kl_mean > 0);
    }
    // A bad layer index is refused.
    cfg[0].only_layer = tp.n_layers;
    qual_batch_t *bad = NULL;
    assert_int_equal(qual_batch_create(f->ctx, f->m, QUAL_DECODE_KVC, cfg, 1, &bad),
                     FY_ERR_INVALID_ARG);
    qual_batch_destroy(b);
}

/* The metrics on hand-made logits. */
static void test_metrics(void **state)
{
    (void)state;
    enum { NV = 4 };
    // Row 0 reference, row 1 identical, row 2 another argmax.
    const float logits[3][NV] = {{2, 1, 0, 0}, {2, 1, 0, 0}, {0, 3, 0, 0}};
    qual_acc_t acc[3];
    memset(acc, 0, sizeof(acc));
    qual_acc_add_step(acc, 3, &logits[0][0], NV, 1);
    double lse0 = log(exp(2.0) + exp(1.0) + 2.0), lse2 = log(exp(3.0) + 3.0);
    assert_true(fabs(acc[0].nll_sum - (lse0 - 1)) < 1e-9);
    assert_true(fabs(acc[2].nll_sum - (lse2 - 3)) < 1e-9);
    double kl = 0;
    for (int i = 0; i < NV; i++) {
        double p = exp(logits[0][i] - lse0), q = exp(logits[2][i] - lse2);
        kl += p * log(p / q);
    }
    assert_true(fabs(acc[2].kl_sum - kl) < 1e-9);
    assert_true(acc[1].kl_sum == 0 && acc[1].top1_agree == 1 && acc[2].top1_agree == 0);
    qual_metrics_t m;
    qual_acc_metrics(acc, 2, &m);
    assert_true(fabs(m.dppl_pct - 100.0 * (exp(lse2 - 3) / exp(lse0 - 1) - 1)) < 1e-9);
    assert_true(m.top1_pct == 0.0);
}

static void test_niah_match(void **state)
{
    (void)state;
    assert_true(qual_niah_match("The special magic number is 4821937.", "4821937"));
    assert_true(qual_niah_match("4821937", "4821937"));
    assert_false(qual_niah_match("The special magic number is 4821936.", "4821937"));
    assert_false(qual_niah_match("The number is 48219370.", "4821937")); // longer
    assert_false(qual_niah_match("The number is 482193.", "4821937"));   // cut short
    assert_false(qual_niah_match("I do not know.", "4821937"));
    assert_false(qual_niah_match("", "4821937"));
    assert_false(qual_niah_match("1234567", ""));
    char v[16], w[16];
    qual_niah_value(1, 0, v, sizeof(v));
    qual_niah_value(1, 1, w, sizeof(w));
    assert_int_equal(strlen(v), 7);
    assert_true(v[0] != '0' && strcmp(v, w) != 0);
}

/* Prompts: the needle sits at its depth, whole, and the answer found in the prompt scores. */
static void test_niah_prompt(void **state)
{
    fixture_t *f = *state;
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(f->m);
    const int H = 120;
    const double depths[] = {0, 0.5, 1};
    int prev = -1;
    for (int i = 0; i < 3; i++) {
        qual_niah_prompt_t p;
        assert_int_equal(qual_niah_build(tok, f->text, N_CTX + N_CONT, H, depths[i], "4821937",
                                         &p),
                         FY_OK);
        assert_true(p.needle_pos > prev);
        prev = p.needle_pos;
        // The needle's text follows from needle_pos.
        char text[256] = "";
        size_t len = 0;
        for (int k = p.needle_pos; k < p.n && len < 200; k++) {
            int w = mdl_tokenizer_token_bytes(tok, p.ids[k], text + len, sizeof(text) - len - 1);
            assert_true(w >= 0);
            len += (size_t)w;
        }
        text[len] = '\0';
        assert_true(strncmp(text, " The special magic number is 4821937.", 37) == 0);
        assert_true(qual_niah_match(text, "4821937"));
        assert_false(qual_niah_match(text, "4821938"));
        qual_niah_prompt_free(&p);
    }
    qual_niah_prompt_t p;
    assert_int_equal(qual_niah_build(tok, f->text, 10, H, 0.5, "4821937", &p),
                     FY_ERR_INVALID_ARG); // filler shorter than the haystack
    assert_int_equal(qual_niah_build(tok, f->text, N_CTX, H, 0.5, "48x1937", &p),
                     FY_ERR_INVALID_ARG);
}

/* A NIAH run on the tiny model: every row answers, the fp16 row as the reference does. */
static void test_niah_answer(void **state)
{
    fixture_t *f = *state;
    qual_config_t cfg[1];
    assert_int_equal(qual_config_builtin("fp16", -1, &cfg[0]), FY_OK);
    qual_batch_t *b;
    assert_int_equal(qual_batch_create(f->ctx, f->m, QUAL_DECODE_KVC, cfg, 1, &b), FY_OK);
    qual_niah_prompt_t p;
    assert_int_equal(qual_niah_build(mdl_model_tokenizer(f->m), f->text, N_CTX, 100, 0.3,
                                     "1234567", &p),
                     FY_OK);
    char answers[2][64];
    assert_int_equal(qual_niah_answer(b, &p, 6, &answers[0][0], 64), FY_OK);
    assert_string_equal(answers[0], answers[1]);
    qual_niah_prompt_free(&p);
    qual_batch_destroy(b);
}

/* Corpus files: tokenized whole, samples inside one document, never overlapping. */
static void test_corpus(void **state)
{
    fixture_t *f = *state;
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(f->m);
    char dir[] = "/tmp/ferry-quality-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char a[64], b[64], bad[64];
    snprintf(a, sizeof(a), "%s/a.txt", dir);
    snprintf(b, sizeof(b), "%s/b.txt", dir);
    snprintf(bad, sizeof(bad), "%s/bin.dat", dir);
    FILE *fa = fopen(a, "w"), *fb = fopen(b, "w"), *fx = fopen(bad, "wb");
    for (int i = 0; i < 300; i++)
        fputc('a' + i % 26, fa); // 300 byte tokens
    fputs("short", fb);
    fwrite("x\0y", 1, 3, fx);
    fclose(fa), fclose(fb), fclose(fx);

    qual_corpus_t c;
    char err[256];
    const char *paths[] = {dir};
    assert_int_equal(qual_corpus_load(tok, paths, 1, &c, err, sizeof(err)), FY_OK);
    assert_int_equal(c.n_docs, 2); // the .txt files only, sorted
    assert_non_null(strstr(c.names[0], "a.txt"));
    assert_int_equal(c.n_ids[0], 300);
    const int32_t *s0, *s1;
    int d0, d1;
    assert_int_equal(qual_corpus_sample(&c, 100, 3, 0, &s0, &d0), FY_OK);
    assert_int_equal(qual_corpus_sample(&c, 100, 3, 1, &s1, &d1), FY_OK);
    assert_int_equal(d0, 0);
    assert_int_equal(d1, 0);
    assert_true(s1 >= s0 + 100); // no overlap
    assert_int_equal(qual_corpus_sample(&c, 100, 4, 0, &s0, NULL), FY_ERR_OUT_OF_RANGE);
    assert_int_equal(qual_corpus_sample(&c, 301, 1, 0, &s0, NULL), FY_ERR_NOT_FOUND);
    int32_t *all;
    size_t n_all;
    assert_int_equal(qual_corpus_concat(&c, &all, &n_all), FY_OK);
    assert_int_equal(n_all, c.n_ids[0] + c.n_ids[1]);
    free(all);
    qual_corpus_free(&c);
    const char *binp[] = {bad};
    assert_int_equal(qual_corpus_load(tok, binp, 1, &c, err, sizeof(err)), FY_ERR_FORMAT);
    remove(a), remove(b), remove(bad), rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics),
        cmocka_unit_test(test_niah_match),
        cmocka_unit_test_setup_teardown(test_fp16_exact_sinks_large, setup, teardown),
        cmocka_unit_test_setup_teardown(test_only_layer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_niah_prompt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_niah_answer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corpus, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
