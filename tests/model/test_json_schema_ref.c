// The JSON schema guide's mask over the real model's vocabulary (SmolLM2, 49 152 byte-level
// BPE tokens, many of several bytes): at each of a set of places in documents of several
// schemas, the tokens the mask keeps are exactly those whose bytes the recognizer takes, its
// count is theirs, and special tokens never pass. The mask's shortcuts (first and second
// bytes, plain tokens inside a string counted in characters against maxLength) and integer
// bounds (digits that can still reach 18..65) are checked here against stepping every token.
// Needs the real model (scripts/setup.sh fetches it).
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "test_util.h"

static const struct {
    const char *schema;
    const char *places[8];
} k_cases[] = {
    {"{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\", \"maxLength\": 6},"
     "\"bio\": {\"type\": \"string\"}, \"age\": {\"type\": \"integer\", \"minimum\": 18, "
     "\"maximum\": 65},"
     "\"scores\": {\"type\": \"array\", \"items\": {\"type\": \"number\"}, \"maxItems\": 3},"
     "\"color\": {\"enum\": [\"red\", \"green\", \"blue\", 12, 123]}},"
     "\"required\": [\"name\", \"age\"]}",
     {"", "{", "{\"name\": \"a\", \"age\": 6", "{\"name\": \"abc", "{\"name\": \"abcde",
      "{\"name\": \"a\\\\", "{\"name\": \"a\", \"age\": 30, \"scores\": [1, 2.5",
      "{\"name\": \"a\", \"age\": 30,\n  \"color\": 12"}},
    {"{\"anyOf\": [{\"type\": \"object\", \"properties\": {\"name\": {\"const\": \"search\"},"
     "\"arguments\": {\"type\": \"object\", \"properties\": {\"query\": {\"type\": \"string\"}},"
     "\"required\": [\"query\"]}}, \"required\": [\"name\", \"arguments\"]},"
     "{\"type\": \"object\", \"properties\": {\"name\": {\"const\": \"open\"},"
     "\"arguments\": {\"type\": \"object\", \"additionalProperties\": {\"type\": \"boolean\"}}},"
     "\"required\": [\"name\", \"arguments\"]}]}",
     {"{\"name\": ", "{\"name\": \"se", "{\"name\": \"search\"",
      "{\"name\": \"open\", \"arguments\": {", "{\"name\": \"open\", \"arguments\": {\"x\": t",
      "{\"name\": \"search\", \"arguments\": {\"query\": \"a b"}},
    {"{\"type\": \"array\", \"items\": {}, \"minItems\": 1}",
     {"[", "[1", "[{\"a\": [tr", "[\"x\", -0.5e", "[null, {}"}},
};

static void test_mask_equals_stepping(void **state)
{
    mdl_model_t *m = tu_real_model();
    assert_non_null(m);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    const int nv = mdl_tokenizer_n_vocab(tok);
    assert_true(nv > 40000);
    mdl_json_vocab_t *v = NULL;
    assert_int_equal(mdl_json_vocab_create(tok, &v), FY_OK);
    float *logits = malloc((size_t)nv * sizeof(float));
    const int32_t stops[2] = {mdl_tokenizer_eos(tok), mdl_chat_end_token(tok)};
    int places = 0;
    for (size_t c = 0; c < sizeof(k_cases) / sizeof(k_cases[0]); c++) {
        char err[200];
        mdl_schema_t *s = NULL;
        if (mdl_schema_compile(k_cases[c].schema, strlen(k_cases[c].schema), &s, err,
                               sizeof(err)) != FY_OK)
            fail_msg("%s: %s", k_cases[c].schema, err);
        for (int p = 0; p < 8 && k_cases[c].places[p] != NULL; p++) {
            const char *at = k_cases[c].places[p];
            mdl_schema_state_t st;
            mdl_schema_start(s, &st);
            if (!mdl_schema_feed(s, &st, (const uint8_t *)at, strlen(at)))
                fail_msg("%s: the place \"%s\" is refused", k_cases[c].schema, at);
            for (int t = 0; t < nv; t++)
                logits[t] = 1.0f;
            const int allowed = mdl_schema_mask(s, v, &st, stops, 2, logits);
            int taken = 0;
            for (int t = 0; t < nv; t++) {
                mdl_schema_state_t copy;
                memcpy(&copy, &st, sizeof(copy));
                const bool takes = mdl_schema_accept(s, v, &copy, t);
                if (takes == isinf(logits[t]))
                    fail_msg("after \"%s\": token %d masked %d, taken %d", at, t, isinf(logits[t]),
                             takes);
                if (takes && mdl_tokenizer_is_special(tok, t))
                    fail_msg("after \"%s\": special token %d allowed", at, t);
                taken += takes;
            }
            assert_int_equal(taken, allowed);
            assert_true(allowed > 0);
            places++;
        }
        mdl_schema_destroy(s);
    }
    fprintf(stderr, "%d places checked over %d tokens\n", places, nv);
    free(logits);
    mdl_json_vocab_destroy(v);
    mdl_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mask_equals_stepping),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
