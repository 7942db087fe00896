// Batched prefill on the real SmolLM2 GGUF: three prompts of different lengths (one past the
// attention kernel's GEMM threshold, chunks that straddle prompts) run together give each
// prompt the logits, K, V and window queries it gets alone.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "batch_check.h"

static void test_real_batch_matches_one_by_one(void **state)
{
    mdl_model_t *m = tu_real_model();
    assert_non_null(m);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    cp.prefill_chunk = 48;
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(m, &cp, &ctx), FY_OK);
    const char *texts[3] = {
        "The capital of France is",
        "Write a short poem about the sea. The waves come in and the waves go out, and the "
        "gulls cry over the harbour while the boats rock gently at their moorings. Old "
        "sailors sit on the wall and tell stories of storms, of ships lost and ships found, "
        "of islands no map remembers and of the long way home across grey water.",
        "1 2 3 4 5 6 7 8 9 10 11 12",
    };
    int32_t *toks[3];
    int n[3];
    const int w[3] = {8, 16, 4};
    for (int s = 0; s < 3; s++) {
        size_t cnt = 0;
        toks[s] = malloc(512 * sizeof(int32_t));
        assert_int_equal(mdl_tokenizer_encode(tok, texts[s], strlen(texts[s]), false, toks[s],
                                              512, &cnt),
                         FY_OK);
        n[s] = (int)cnt;
    }
    // Logits of magnitude ~20: summation order moves them by ~1e-5 relative.
    float worst = bc_check(ctx, m, 3, (const int32_t *const *)toks, n, w, 1e-3f);
    print_message("prompts of %d, %d, %d tokens: largest relative difference %g\n", n[0], n[1],
                  n[2], (double)worst);
    for (int s = 0; s < 3; s++)
        free(toks[s]);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_real_batch_matches_one_by_one),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
