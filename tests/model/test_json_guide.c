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

/* ---- a second, independent reading of JSON: recursive descent over a whole text ---- */

typedef struct {
    const char *s;
    size_t i, n;
} rd_t;

static void rd_ws(rd_t *r)
{
    while (r->i < r->n && strchr(" \t\n\r", r->s[r->i]) && r->s[r->i])
        r->i++;
}

static bool rd_value(rd_t *r, int depth);

static bool rd_string(rd_t *r)
{
    if (r->i >= r->n || r->s[r->i] != '"')
        return false;
    for (r->i++; r->i < r->n; r->i++) {
        unsigned char c = (unsigned char)r->s[r->i];
        if (c == '"') {
            r->i++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            if (++r->i >= r->n)
                return false;
            c = (unsigned char)r->s[r->i];
            if (c == 'u') {
                for (int k = 0; k < 4; k++)
                    if (++r->i >= r->n || !strchr("0123456789abcdefABCDEF", r->s[r->i]) ||
                        !r->s[r->i])
                        return false;
            } else if (!strchr("\"\\/bfnrt", c) || !c) {
                return false;
            }
        }
    }
    return false;
}

static bool rd_digits(rd_t *r)
{
    size_t start = r->i;
    while (r->i < r->n && r->s[r->i] >= '0' && r->s[r->i] <= '9')
        r->i++;
    return r->i > start;
}

static bool rd_number(rd_t *r)
{
    if (r->i < r->n && r->s[r->i] == '-')
        r->i++;
    if (r->i < r->n && r->s[r->i] == '0')
        r->i++;
    else if (!rd_digits(r))
        return false;
    if (r->i < r->n && r->s[r->i] == '.') {
        r->i++;
        if (!rd_digits(r))
            return false;
    }
    if (r->i < r->n && (r->s[r->i] == 'e' || r->s[r->i] == 'E')) {
        r->i++;
        if (r->i < r->n && (r->s[r->i] == '+' || r->s[r->i] == '-'))
            r->i++;
        if (!rd_digits(r))
            return false;
    }
    return true;
}

static bool rd_container(rd_t *r, int depth, bool object)
{
    r->i++; // '{' or '['
    rd_ws(r);
    if (r->i < r->n && r->s[r->i] == (object ? '}' : ']')) {
        r->i++;
        return true;
    }
    for (;;) {
        if (object) {
            if (!rd_string(r))
                return false;
            rd_ws(r);
            if (r->i >= r->n || r->s[r->i] != ':')
                return false;
            r->i++;
            rd_ws(r);
        }
        if (!rd_value(r, depth + 1))
            return false;
        rd_ws(r);
        if (r->i < r->n && r->s[r->i] == ',') {
            r->i++;
            rd_ws(r);
            continue;
        }
        if (r->i < r->n && r->s[r->i] == (object ? '}' : ']')) {
            r->i++;
            return true;
        }
        return false;
    }
}

static bool rd_value(rd_t *r, int depth)
{
    if (r->i >= r->n || depth > MDL_JSON_MAX_DEPTH)
        return false;
    char c = r->s[r->i];
    if (c == '{' || c == '[')
        return rd_container(r, depth, c == '{');
    if (c == '"')
        return rd_string(r);
    static const char *const words[] = {"true", "false", "null"};
    for (int w = 0; w < 3; w++) {
        size_t l = strlen(words[w]);
        if (r->n - r->i >= l && memcmp(r->s + r->i, words[w], l) == 0) {
            r->i += l;
            return true;
        }
    }
    return rd_number(r);
}

/* One JSON object, white space before it, nothing after it. */
static bool rd_object(const char *s, size_t n)
{
    rd_t r = {s, 0, n};
    rd_ws(&r);
    return r.i < n && s[r.i] == '{' && rd_value(&r, 1) && r.i == n;
}

/* A random, mostly valid JSON object (depth and white space small). */
static void gen_value(char *out, size_t *w, size_t cap, uint64_t *x, int depth);

static uint32_t rnd(uint64_t *x, uint32_t n)
{
    *x = *x * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)((*x >> 33) % n);
}

static void put(char *out, size_t *w, size_t cap, const char *s)
{
    size_t l = strlen(s);
    if (*w + l < cap) {
        memcpy(out + *w, s, l);
        *w += l;
    }
}

static void gen_ws(char *out, size_t *w, size_t cap, uint64_t *x)
{
    static const char *const k_ws[] = {"", "", "", " ", "\n", "  ", "\t", "\r\n"};
    put(out, w, cap, k_ws[rnd(x, 8)]);
}

static void gen_object(char *out, size_t *w, size_t cap, uint64_t *x, int depth, bool object)
{
    static const char *const k_keys[] = {"\"a\"", "\"key\"", "\"\\u00e9\"", "\"\"", "\"x y\""};
    put(out, w, cap, object ? "{" : "[");
    int n = depth > 3 ? 0 : (int)rnd(x, 4);
    for (int i = 0; i < n; i++) {
        gen_ws(out, w, cap, x);
        if (object) {
            put(out, w, cap, k_keys[rnd(x, 5)]);
            gen_ws(out, w, cap, x);
            put(out, w, cap, ":");
            gen_ws(out, w, cap, x);
        }
        gen_value(out, w, cap, x, depth + 1);
        gen_ws(out, w, cap, x);
        if (i + 1 < n)
            put(out, w, cap, ",");
    }
    put(out, w, cap, object ? "}" : "]");
}

static void gen_value(char *out, size_t *w, size_t cap, uint64_t *x, int depth)
{
    static const char *const k_atoms[] = {"0",        "-1",          "12.5",         "1e9",
                                          "-0.25E-3", "true",        "null",         "false",
                                          "\"s\"",    "\"\\n\\\"\"", "\"\xc3\xa9\"", "3"};
    uint32_t k = rnd(x, 16);
    if (k < 12)
        put(out, w, cap, k_atoms[k]);
    else
        gen_object(out, w, cap, x, depth, k < 14);
}

/* Both readings agree on random texts: valid objects (every prefix of them accepted, the
 * whole complete) and the same texts with a byte changed, dropped or added. */
static void test_against_recursive_descent(void **state)
{
    static const char k_bytes[] = "{}[]:,\" \\/0123456789.-+eEtrufalsn \n\x01a\xc3";
    uint64_t x = 12345;
    int agree_valid = 0, agree_invalid = 0;
    for (int it = 0; it < 20000; it++) {
        char s[1024];
        size_t n = 0;
        gen_ws(s, &n, sizeof(s), &x);
        gen_object(s, &n, sizeof(s), &x, 1, true);
        s[n] = '\0';
        if (it % 2 == 1) { // damage it
            uint32_t at = rnd(&x, (uint32_t)n), how = rnd(&x, 3);
            char b = k_bytes[rnd(&x, sizeof(k_bytes) - 1)];
            if (how == 0) {
                s[at] = b;
            } else if (how == 1) {
                memmove(s + at, s + at + 1, n - at);
                n--;
            } else if (n + 1 < sizeof(s)) {
                memmove(s + at + 1, s + at, n - at + 1);
                s[at] = b;
                n++;
            }
            s[n] = '\0';
        }
        const bool want = rd_object(s, n);
        mdl_json_t j;
        mdl_json_init(&j);
        bool prefix = true;
        for (size_t i = 0; i < n && prefix; i++)
            prefix = mdl_json_feed(&j, (const uint8_t *)s + i, 1);
        const bool got = prefix && mdl_json_complete(&j);
        if (got != want)
            fail_msg("disagree on %zu bytes \"%s\": recognizer %d, recursive descent %d", n, s, got,
                     want);
        *(want ? &agree_valid : &agree_invalid) += 1;
    }
    fprintf(stderr, "agreed on %d valid and %d invalid texts\n", agree_valid, agree_invalid);
    assert_true(agree_valid > 5000 && agree_invalid > 2000);
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
        cmocka_unit_test(test_against_recursive_descent),
        cmocka_unit_test(test_mask),
        cmocka_unit_test(test_sampler_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
