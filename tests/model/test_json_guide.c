// JSON mode: the recognizer takes exactly the prefixes of JSON objects (every byte of valid
// objects with all value kinds, white space and nesting; the usual mistakes refused at the byte
// that makes them), completes on the closing brace and takes nothing after it; the mask over a
// real vocabulary keeps only tokens that continue the object (stop tokens once it is whole);
// a JSON-mode sampler on random logits always yields one JSON object, then a stop token.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "test_util.h"

/* Feeds s byte by byte; returns the index of the first refused byte, or -1. */
static long first_refused(mdl_json_t *j, const char *s)
{
    for (size_t i = 0; s[i]; i++) {
        mdl_json_t before = *j;
        if (!mdl_json_feed(j, (const uint8_t *)s + i, 1)) {
            assert_memory_equal(&before, j, sizeof(*j)); // unchanged on refusal
            return (long)i;
        }
    }
    return -1;
}

static void test_valid(void **state)
{
    static const char *const k_ok[] = {
        "{}",
        " \n{ }",
        "{\"a\":1}",
        "{\"a\" : -0.5e+10 , \"b\":[ ], \"c\":{}}",
        "{\"k\":[1,2.5E-3,-0,0.0,true,false,null,\"x\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9y\"]}",
        "{\"nested\":{\"deeper\":[[[{\"z\":\"\xc3\xa9\xe2\x82\xac\"}]]]},\"n\":12 }",
        "{\n  \"a\": 1,\n  \"b\": \"two\"\n}",
    };
    for (size_t i = 0; i < sizeof(k_ok) / sizeof(k_ok[0]); i++) {
        mdl_json_t j;
        mdl_json_init(&j);
        long at = first_refused(&j, k_ok[i]);
        if (at >= 0)
            fail_msg("%s: refused at byte %ld", k_ok[i], at);
        assert_true(mdl_json_complete(&j));
        // Nothing may follow the object, not even white space.
        assert_false(mdl_json_feed(&j, (const uint8_t *)" ", 1));
        assert_false(mdl_json_feed(&j, (const uint8_t *)"}", 1));
        // Every proper prefix is incomplete.
        mdl_json_t p;
        mdl_json_init(&p);
        size_t n = strlen(k_ok[i]);
        assert_true(mdl_json_feed(&p, (const uint8_t *)k_ok[i], n - 1));
        assert_false(mdl_json_complete(&p));
    }
}

static void test_invalid(void **state)
{
    static const struct {
        const char *text;
        long at; // the byte refused
    } k_bad[] = {
        {"[1]", 0},              // the top level is an object
        {"\"a\"", 0},            //
        {"{a:1}", 1},            // keys are strings
        {"{\"a\" 1}", 5},        // the colon
        {"{\"a\":01}", 6},       // no leading zeros
        {"{\"a\":1,}", 7},       // no trailing comma
        {"{\"a\":[1,]}", 8},     //
        {"{\"a\":tru e}", 8},    // literals whole
        {"{\"a\":nul}", 8},      //
        {"{\"a\":\"\x01\"}", 6}, // control characters escaped
        {"{\"a\":\"\\q\"}", 7},  // known escapes only
        {"{\"a\":\"\\u12g4\"}", 10},
        {"{\"a\":1]", 6},   // the matching close
        {"{\"a\":[1}", 7},  //
        {"{\"a\":-}", 6},   // a digit after the sign
        {"{\"a\":1.}", 7},  // after the point
        {"{\"a\":1e}", 7},  // in the exponent
        {"{\"a\":+1}", 5},  // no plus sign
        {"{\"a\":.5}", 5},  //
        {"{}}", 2},         // nothing after the object
        {"{\"a\":1}\n", 7}, // not even a new line
    };
    for (size_t i = 0; i < sizeof(k_bad) / sizeof(k_bad[0]); i++) {
        mdl_json_t j;
        mdl_json_init(&j);
        long at = first_refused(&j, k_bad[i].text);
        if (at != k_bad[i].at)
            fail_msg("%s: refused at %ld, want %ld", k_bad[i].text, at, k_bad[i].at);
    }
    // Nesting and white-space runs are bounded.
    char deep[2 * MDL_JSON_MAX_DEPTH + 16];
    size_t n = 0;
    deep[n++] = '{';
    deep[n++] = '"';
    deep[n++] = 'a';
    deep[n++] = '"';
    deep[n++] = ':';
    for (int d = 1; d < MDL_JSON_MAX_DEPTH; d++)
        deep[n++] = '[';
    deep[n++] = '[';
    deep[n] = '\0';
    mdl_json_t j;
    mdl_json_init(&j);
    assert_int_equal(first_refused(&j, deep), (long)n - 1);
    char spaces[MDL_JSON_MAX_WS + 3];
    spaces[0] = '{';
    memset(spaces + 1, ' ', MDL_JSON_MAX_WS + 1);
    spaces[MDL_JSON_MAX_WS + 2] = '\0';
    mdl_json_init(&j);
    assert_int_equal(first_refused(&j, spaces), MDL_JSON_MAX_WS + 1);
}

/* The mask over the tiny model's byte-level vocabulary: at the start only tokens that open the
 * object (its '{' token, white space), never a special token; once complete, only the stops. */
static void test_mask(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    const int nv = mdl_tokenizer_n_vocab(tok);
    mdl_json_vocab_t *v = NULL;
    assert_int_equal(mdl_json_vocab_create(tok, &v), FY_OK);
    float *logits = malloc((size_t)nv * sizeof(float));
    mdl_json_t j;
    mdl_json_init(&j);
    for (int t = 0; t < nv; t++)
        logits[t] = 0;
    const int32_t eos = mdl_tokenizer_eos(tok);
    int allowed = mdl_json_mask(v, &j, &eos, 1, logits);
    assert_true(allowed > 0);
    int counted = 0;
    for (int t = 0; t < nv; t++) {
        if (isinf(logits[t]))
            continue;
        counted++;
        char b[64];
        int l = mdl_tokenizer_token_bytes(tok, t, b, sizeof(b));
        assert_false(mdl_tokenizer_is_special(tok, t));
        assert_true(l > 0);
        assert_true(b[0] == '{' || b[0] == ' ' || b[0] == '\n' || b[0] == '\t' || b[0] == '\r');
    }
    assert_int_equal(counted, allowed);
    assert_true(isinf(logits[eos]));
    // Complete: the stop token alone.
    assert_true(mdl_json_feed(&j, (const uint8_t *)"{\"a\":[1]}", 9));
    for (int t = 0; t < nv; t++)
        logits[t] = 0;
    assert_int_equal(mdl_json_mask(v, &j, &eos, 1, logits), 1);
    for (int t = 0; t < nv; t++)
        assert_true(t == eos ? logits[t] == 0 : isinf(logits[t]));
    free(logits);
    mdl_json_vocab_destroy(v);
    mdl_model_destroy(m);
}

/* A sampler in JSON mode on random logits: each sampled token continues the object; the text
 * is one JSON object when EOS comes, which it does once the object is complete. */
static void test_sampler_json(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    const int nv = mdl_tokenizer_n_vocab(tok);
    mdl_json_vocab_t *v = NULL;
    assert_int_equal(mdl_json_vocab_create(tok, &v), FY_OK);
    float *logits = malloc((size_t)nv * sizeof(float));
    int complete = 0;
    for (uint64_t seed = 1; seed <= 20; seed++) {
        mdl_sampler_params_t p;
        mdl_sampler_params_default(&p);
        p.temperature = 1.0f;
        p.top_k = 0;
        p.top_p = 1.0f;
        p.seed = seed;
        p.n_stop = 1;
        p.stop[0] = mdl_tokenizer_eos(tok);
        p.json = v;
        mdl_sampler_t *s = NULL;
        assert_int_equal(mdl_sampler_create(&p, nv, &s), FY_OK);
        mdl_json_t mirror;
        mdl_json_init(&mirror);
        uint64_t x = seed * 0x9e3779b97f4a7c15ull;
        bool ended = false;
        for (int step = 0; step < 400 && !ended; step++) {
            for (int t = 0; t < nv; t++) { // random logits
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                logits[t] = (float)((x >> 40) % 1000) / 250.0f;
            }
            int32_t tok_id = mdl_sampler_sample(s, logits);
            if (tok_id == p.stop[0]) {
                assert_true(mdl_json_complete(&mirror)); // EOS only after the whole object
                ended = true;
                complete++;
                break;
            }
            assert_false(mdl_json_complete(&mirror));
            assert_true(mdl_json_accept(v, &mirror, tok_id));
            mdl_sampler_accept_output(s, tok_id);
        }
        mdl_sampler_destroy(s);
    }
    // Random logits need not close every container within 400 tokens; most runs do.
    fprintf(stderr, "%d of 20 random runs completed their object\n", complete);
    free(logits);
    mdl_json_vocab_destroy(v);
    mdl_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_mask),
        cmocka_unit_test(test_sampler_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
