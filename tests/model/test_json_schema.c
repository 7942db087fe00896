// JSON schema guide: a schema compiles or is refused with the keyword or place named; the
// recognizer takes every byte of documents the schema allows and completes on their last one,
// refuses the byte at which a document leaves the schema (a missing required property, a
// string too long, a fraction in an integer, an enum value not listed, an extra item, a union
// branch's wrong arguments, a 17th digit, a second space or a blank line between tokens); the
// mask over a vocabulary keeps only tokens that stay inside; a schema-guided sampler on random
// logits writes documents that cJSON parses and a check written here against the schema
// accepts.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>

#include "test_util.h"

static mdl_schema_t *compile_ok(const char *text)
{
    char err[256];
    mdl_schema_t *s = NULL;
    fy_status_t st = mdl_schema_compile(text, strlen(text), &s, err, sizeof(err));
    if (st != FY_OK)
        fail_msg("%s: refused: %s", text, err);
    return s;
}

/* Feeds text byte by byte; the index of the first refused byte, or -1. */
static long first_refused(const mdl_schema_t *s, mdl_schema_state_t *st, const char *text)
{
    for (size_t i = 0; text[i]; i++) {
        mdl_schema_state_t before;
        memcpy(&before, st, sizeof(before));
        if (!mdl_schema_feed(s, st, (const uint8_t *)text + i, 1)) {
            assert_memory_equal(&before, st, offsetof(mdl_schema_state_t, frame));
            return (long)i;
        }
    }
    return -1;
}

/* Each text in ok is taken whole and completes (no proper prefix does); each bad text is
 * refused at the byte its marker '|' stands before (the marker is removed). */
static void check(const char *schema, const char *const *ok, size_t n_ok, const char *const *bad,
                  size_t n_bad)
{
    mdl_schema_t *s = compile_ok(schema);
    for (size_t i = 0; i < n_ok; i++) {
        mdl_schema_state_t st;
        mdl_schema_start(s, &st);
        long at = first_refused(s, &st, ok[i]);
        if (at >= 0)
            fail_msg("%s: refused at byte %ld of %s", schema, at, ok[i]);
        if (!mdl_schema_complete(&st))
            fail_msg("%s: %s is not complete", schema, ok[i]);
        assert_false(mdl_schema_feed(s, &st, (const uint8_t *)" ", 1));
        mdl_schema_start(s, &st);
        assert_true(mdl_schema_feed(s, &st, (const uint8_t *)ok[i], strlen(ok[i]) - 1));
        assert_false(mdl_schema_complete(&st));
    }
    for (size_t i = 0; i < n_bad; i++) {
        char text[512];
        const char *bar = strchr(bad[i], '|');
        assert_non_null(bar);
        size_t want = (size_t)(bar - bad[i]);
        snprintf(text, sizeof(text), "%.*s%s", (int)want, bad[i], bar + 1);
        mdl_schema_state_t st;
        mdl_schema_start(s, &st);
        long at = first_refused(s, &st, text);
        if (at != (long)want)
            fail_msg("%s: %s refused at byte %ld, want %zu", schema, text, at, want);
    }
    mdl_schema_destroy(s);
}

#define CHECK(schema, ok, bad)                                                                     \
    check(schema, ok, sizeof(ok) / sizeof(ok[0]), bad, sizeof(bad) / sizeof(bad[0]))

static const char k_person[] =
    "{\"type\": \"object\", \"title\": \"Person\", \"properties\": {"
    "\"name\": {\"type\": \"string\", \"minLength\": 1, \"maxLength\": 5},"
    "\"age\": {\"type\": \"integer\", \"description\": \"years\", \"minimum\": -1, "
    "\"maximum\": 150},"
    "\"tags\": {\"type\": \"array\", \"items\": {\"enum\": [\"a\", \"b\"]}, \"maxItems\": 2},"
    "\"nick\": {\"type\": [\"string\", \"null\"]},"
    "\"score\": {\"type\": \"number\", \"format\": \"double\"},"
    "\"ok\": {\"type\": \"boolean\"}},"
    "\"required\": [\"name\", \"age\"], \"additionalProperties\": false}";

static void test_object(void **state)
{
    static const char *const ok[] = {
        "{\"name\":\"Bob\",\"age\":42}",
        "{\"name\":\"Bo\\u00e9\",\"age\":-1,\"tags\":[\"a\",\"b\"],\"nick\":null,"
        "\"score\":1.5e3,\"ok\":true}",
        "{\n  \"name\": \"\xc3\xa9t\xc3\xa9\",\n  \"age\": 0,\n  \"nick\": \"x\",\n  \"ok\": "
        "false\n}",
        "{\"name\":\"a\",\"age\":7,\"tags\":[],\"score\":-0.25}",
        "{\n\t\"name\": \"a\",\n\t\"age\": 1\n}",
    };
    static const char *const bad[] = {
        "{\"|age\":1}",
        "{\"name\":\"abcde|f\",\"age\":1}",
        "{\"name\":\"|\",\"age\":1}", // minLength 1
        "{\"name\":\"a\",\"age\":1|.5}",
        "{\"name\":\"a\",\"age\":0|1}",
        "{\"name\":\"a\",\"age\":-|2}",  // minimum -1
        "{\"name\":\"a\",\"age\":15|1}", // maximum 150
        "{\"name\":\"a\",\"age\":1,\"score\":0.1234567890123456|7}",
        "{\"name\":\"a\",\"age\":1,\"score\":1e-123|4}",
        "{\"name\":\"a\",\"age\":1,\"tags\":[\"a\",\"b\"|,\"a\"]}",
        "{\"name\":\"a\",\"age\":1,\"tags\":[\"|c\"]}",
        "{\"name\":\"a\"|}",
        "{\"name\":\"a\",\"age\":1,\"|extra\":1}",
        "{\"name\":\"a\",\"age\":1,\"score\":1,\"|nick\":null}", // the schema's order
        "{\"name\":\"a\",\"age\":1,\"ok\":true|,\"nick\":null}", // ok is the last
        "{\"name\":\"a\",\"age\":1,\"nick\":|3}",
        "{\"name\":\"a\",\"age\":1,\"ok\":|1}",
        "|[]",
        "{\"name\":\"a\", | \"age\":1}",   // one space, not two
        "{\n|\n\"name\":\"a\",\"age\":1}", // no blank line
        "| {\"name\":\"a\",\"age\":1}",    // nothing before the document
    };
    CHECK(k_person, ok, bad);
}

/* anyOf of objects told apart by a first const property (the shape of a tool call), with
 * the arguments behind a $ref. */
static const char k_calls[] =
    "{\"anyOf\": ["
    "{\"type\": \"object\", \"properties\": {\"name\": {\"const\": \"get_weather\"},"
    " \"arguments\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"},"
    " \"unit\": {\"enum\": [\"c\", \"f\"]}}, \"required\": [\"city\"]}},"
    " \"required\": [\"name\", \"arguments\"]},"
    "{\"type\": \"object\", \"properties\": {\"name\": {\"const\": \"add\"},"
    " \"arguments\": {\"$ref\": \"#/$defs/AB\"}}, \"required\": [\"name\", \"arguments\"]}],"
    "\"$defs\": {\"AB\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"number\"},"
    " \"b\": {\"type\": \"number\"}}, \"required\": [\"a\", \"b\"]}}}";

static void test_union(void **state)
{
    static const char *const ok[] = {
        "{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2.5}}",
        "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}",
        "{\"name\":\"get_weather\",\"arguments\":{\"city\":\"\"}}",
    };
    static const char *const bad[] = {
        "{\"name\":\"|sub\"}",
        "{\"name\":\"add\",\"arguments\":{\"|city\":\"x\"}}",
        "{\"name\":\"get_weather\",\"arguments\":{\"|a\":1}}",
        "{\"name\":\"add\"|}",
        "{\"|arguments\":{}}",
    };
    CHECK(k_calls, ok, bad);
}

static void test_maps_free_values_and_enums(void **state)
{
    static const char *const map_ok[] = {"{}", "{\"x\":1,\"y\\\"\":-2}", "{ \"k\" : 3 }"};
    static const char *const map_bad[] = {"{\"x\":|\"s\"}", "{\"x\":1|.0}", "{\"x\":1,|}",
                                          "{\"x\":-1234567890123456|7}"}; // 16 digits at most
    CHECK("{\"type\": \"object\", \"additionalProperties\": {\"type\": \"integer\"}}", map_ok,
          map_bad);

    static const char *const free_ok[] = {"{\"meta\":[1,{\"a\":null}],\"n\":3}",
                                          "{\"meta\":12,\"n\":0}", "{\"meta\":\"s\",\"n\":1}",
                                          "{\"meta\":true , \"n\":2}"};
    static const char *const free_bad[] = {"{\"meta\":[1,|]}", "{\"meta\":1|}", "{\"meta\":nul|x}"};
    CHECK("{\"properties\": {\"meta\": {}, \"n\": {\"type\": \"integer\"}}, \"required\": "
          "[\"meta\", \"n\"]}",
          free_ok, free_bad);

    static const char *const enum_ok[] = {"{\"n\":1}", "{\"n\":12}", "{\"n\":null}",
                                          "{\"n\":{\"a\":[true]}}", "{}"};
    static const char *const enum_bad[] = {"{\"n\":1|3}", "{\"n\":|2}", "{\"n\":{\"a\":[|false]}}",
                                           "{\"n\":12|,\"n\":1}"};
    CHECK("{\"properties\": {\"n\": {\"enum\": [1, 12, null, {\"a\": [true]}]}}}", enum_ok,
          enum_bad);

    // Integer bounds: a digit only while some value in range can still come of it, the end
    // only at a value in range.
    static const char *const int_ok[] = {"{\"a\":1,\"b\":-10}", "{\"a\":100,\"b\":-50}",
                                         "{\"a\":57,\"b\":-11,\"c\":0}",
                                         "{\"a\":9,\"b\":-49,\"c\":-0}"};
    static const char *const int_bad[] = {
        "{\"a\":|0",
        "{\"a\":10|1}",
        "{\"a\":|-5}",
        "{\"a\":1,\"b\":-|9}",
        "{\"a\":1,\"b\":-5|}",
        "{\"a\":1,\"b\":|3}",
        "{\"a\":1,\"b\":-10,\"c\":|1}",
        "{\"a\":1,\"b\":-10,\"c\":-|1}",
    };
    CHECK("{\"type\": \"object\", \"properties\": {"
          "\"a\": {\"type\": \"integer\", \"minimum\": 1, \"maximum\": 100},"
          "\"b\": {\"type\": \"integer\", \"exclusiveMinimum\": -51, \"exclusiveMaximum\": -9},"
          "\"c\": {\"type\": [\"integer\", \"null\"], \"minimum\": 0, \"maximum\": 0.5}},"
          "\"required\": [\"a\", \"b\"]}",
          int_ok, int_bad);

    static const char *const arr_ok[] = {"[\"x\",\"yz\"]", "[ \"a\" ]"};
    static const char *const arr_bad[] = {"[|]", "[\"x\",\"y\",\"z\"|,\"w\"]", "[\"|\"]"};
    CHECK("{\"type\": \"array\", \"items\": {\"type\": \"string\", \"minLength\": 1}, "
          "\"minItems\": 1, \"maxItems\": 3}",
          arr_ok, arr_bad);

    // A type list whose branches start alike is refused; one that does not is a choice.
    static const char *const opt_ok[] = {"{\"v\":[1]}", "{\"v\":null}", "{\"v\":\"s\"}"};
    static const char *const opt_bad[] = {"{\"v\":|1}", "{\"v\":[|\"a\"]}"};
    CHECK("{\"type\": \"object\", \"properties\": {\"v\": {\"anyOf\": [{\"type\": \"array\", "
          "\"items\": {\"type\": \"integer\"}}, {\"type\": [\"null\", \"string\"]}]}}, "
          "\"required\": [\"v\"]}",
          opt_ok, opt_bad);
}

static void test_refused(void **state)
{
    static const struct {
        const char *schema, *says;
    } k_cases[] = {
        {"{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\", \"pattern\": "
         "\"^a\"}}}",
         "\"pattern\" is not supported"},
        {"{\"properties\": {\"n\": {\"type\": \"integer\", \"multipleOf\": 2}}}",
         "\"multipleOf\" is not supported"},
        {"{\"properties\": {\"x\": {\"type\": \"number\", \"minimum\": 0}}}", "for integers only"},
        {"{\"properties\": {\"x\": {\"maximum\": 3}}}", "give \"type\": \"integer\""},
        {"{\"properties\": {\"x\": {\"type\": \"integer\", \"minimum\": 5, \"maximum\": 4}}}",
         "no integer lies within"},
        {"{\"properties\": {\"x\": {\"type\": \"integer\", \"maximum\": 1e16}}}", "within +-1e15"},
        {"{\"type\": \"string\"}", "top level must be an object or an array"},
        {"{\"enum\": [{\"a\": 1}]}", "top level must be an object or an array"},
        {"{\"properties\": {\"a\": {}}, \"required\": [\"b\"]}", "\"b\" is not among"},
        {"{\"properties\": {\"v\": {\"anyOf\": [{\"type\": \"integer\"}, {\"type\": "
         "\"number\"}]}}}",
         "anyOf: branches must start differently"},
        {"{\"$ref\": \"#/$defs/N\", \"$defs\": {\"N\": {\"type\": \"object\", \"properties\": "
         "{\"next\": {\"$ref\": \"#/$defs/N\"}}}}}",
         "nested too deep"},
        {"{\"$ref\": \"#/$defs/A\", \"$defs\": {\"A\": {\"$ref\": \"#/$defs/A\"}}}",
         "nests too deep"},
        {"{\"$ref\": \"http://example.com/s.json\"}", "only #/$defs/NAME"},
        {"{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"strin\"}}}",
         "\"strin\" is not a JSON Schema type"},
        {"{\"type\": \"object\"", "not valid JSON"},
        {"{\"type\": \"array\", \"minItems\": 3, \"maxItems\": 2}", "minItems: above maxItems"},
        {"{\"type\": \"array\", \"maxItems\": -1}", "maxItems: an integer"},
        {"{\"properties\": {\"a\\\"b\": {}}}", "with a quote"},
        {"[1]", "must be an object or a boolean"},
        {"false", "allows nothing"},
        {"{\"allOf\": [{}, {}]}", "allOf: only of one schema"},
    };
    for (size_t i = 0; i < sizeof(k_cases) / sizeof(k_cases[0]); i++) {
        char err[256] = "";
        mdl_schema_t *s = NULL;
        fy_status_t st =
            mdl_schema_compile(k_cases[i].schema, strlen(k_cases[i].schema), &s, err, sizeof(err));
        if (st != FY_ERR_INVALID_ARG || strstr(err, k_cases[i].says) == NULL)
            fail_msg("%s: status %d, \"%s\" (want \"%s\")", k_cases[i].schema, st, err,
                     k_cases[i].says);
        assert_null(s);
    }
    // Too large: a schema whose $refs expand past the node limit.
    char big[4096];
    char err[256] = "";
    mdl_schema_t *s = NULL;
    int n = snprintf(big, sizeof(big), "{\"$ref\": \"#/$defs/D0\", \"$defs\": {");
    for (int d = 0; d < 20; d++)
        n += snprintf(big + n, sizeof(big) - (size_t)n,
                      "\"D%d\": {\"type\": \"object\", \"properties\": {\"a\": {\"$ref\": "
                      "\"#/$defs/D%d\"}, \"b\": {\"$ref\": \"#/$defs/D%d\"}}},",
                      d, d + 1, d + 1);
    snprintf(big + n, sizeof(big) - (size_t)n, "\"D20\": {\"type\": \"integer\"}}}");
    assert_int_equal(mdl_schema_compile(big, strlen(big), &s, err, sizeof(err)),
                     FY_ERR_INVALID_ARG);
    assert_non_null(strstr(err, "too large"));
    assert_null(s);
}

/* The schema k_person, checked here without the recognizer: the person document's fields. */
static bool person_ok(const char *text)
{
    cJSON *doc = cJSON_Parse(text);
    bool ok = cJSON_IsObject(doc);
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(doc, "name");
    const cJSON *age = cJSON_GetObjectItemCaseSensitive(doc, "age");
    ok = ok && cJSON_IsString(name) && cJSON_IsNumber(age) &&
         age->valuedouble == floor(age->valuedouble) && age->valuedouble >= -1 &&
         age->valuedouble <= 150 && strlen(name->valuestring) >= 1;
    const cJSON *f;
    for (f = ok ? doc->child : NULL; f != NULL; f = f->next) {
        static const char *const known[] = {"name", "age", "tags", "nick", "score", "ok"};
        bool k = false;
        for (int i = 0; i < 6; i++)
            k |= strcmp(f->string, known[i]) == 0;
        ok &= k;
        if (strcmp(f->string, "tags") == 0) {
            ok &= cJSON_IsArray(f) && cJSON_GetArraySize(f) <= 2;
            const cJSON *t;
            cJSON_ArrayForEach(t, f) ok &= cJSON_IsString(t) && (strcmp(t->valuestring, "a") == 0 ||
                                                                 strcmp(t->valuestring, "b") == 0);
        }
        if (strcmp(f->string, "nick") == 0)
            ok &= cJSON_IsString(f) || cJSON_IsNull(f);
        if (strcmp(f->string, "score") == 0)
            ok &= cJSON_IsNumber(f);
        if (strcmp(f->string, "ok") == 0)
            ok &= cJSON_IsBool(f);
    }
    cJSON_Delete(doc);
    return ok;
}

/* The mask keeps exactly the tokens whose bytes the recognizer takes, then the stop alone; a
 * sampler guided by the schema on random logits writes person documents. */
static void test_mask_and_sampler(void **state)
{
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    mdl_model_t *m = tu_tiny_model(&tp);
    assert_non_null(m);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    const int nv = mdl_tokenizer_n_vocab(tok);
    mdl_json_vocab_t *v = NULL;
    assert_int_equal(mdl_json_vocab_create(tok, &v), FY_OK);
    mdl_schema_t *s = compile_ok(k_person);
    float *logits = malloc((size_t)nv * sizeof(float));
    const int32_t eos = mdl_tokenizer_eos(tok);

    static const char *const prefixes[] = {"", "{\"na", "{\"name\":\"ab", "{\"name\":\"a\",",
                                           "{\"name\":\"a\",\"age\":1"};
    for (size_t p = 0; p < sizeof(prefixes) / sizeof(prefixes[0]); p++) {
        mdl_schema_state_t st;
        mdl_schema_start(s, &st);
        assert_true(mdl_schema_feed(s, &st, (const uint8_t *)prefixes[p], strlen(prefixes[p])));
        for (int t = 0; t < nv; t++)
            logits[t] = 0;
        int allowed = mdl_schema_mask(s, v, &st, &eos, 1, logits), counted = 0;
        assert_true(allowed > 0);
        for (int t = 0; t < nv; t++) {
            mdl_schema_state_t c;
            memcpy(&c, &st, sizeof(c));
            const bool takes = mdl_schema_accept(s, v, &c, t);
            if (takes != !isinf(logits[t]))
                fail_msg("after \"%s\": token %d masked %d, taken %d", prefixes[p], t,
                         isinf(logits[t]), takes);
            counted += takes;
        }
        assert_int_equal(counted, allowed);
        assert_true(isinf(logits[eos]));
    }
    mdl_schema_state_t st;
    mdl_schema_start(s, &st);
    const char *whole = "{\"name\":\"a\",\"age\":1}";
    assert_true(mdl_schema_feed(s, &st, (const uint8_t *)whole, strlen(whole)));
    for (int t = 0; t < nv; t++)
        logits[t] = 0;
    assert_int_equal(mdl_schema_mask(s, v, &st, &eos, 1, logits), 1);
    assert_false(isinf(logits[eos]));

    int complete = 0;
    for (uint64_t seed = 1; seed <= 20; seed++) {
        mdl_sampler_params_t p;
        mdl_sampler_params_default(&p);
        p.temperature = 1.0f;
        p.top_k = 0;
        p.top_p = 1.0f;
        p.seed = seed;
        p.n_stop = 1;
        p.stop[0] = eos;
        p.json = v;
        p.schema = s;
        mdl_sampler_t *smp = NULL;
        assert_int_equal(mdl_sampler_create(&p, nv, &smp), FY_OK);
        char text[8192];
        size_t len = 0;
        uint64_t x = seed * 0x9e3779b97f4a7c15ull;
        for (int step = 0; step < 600; step++) {
            for (int t = 0; t < nv; t++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                logits[t] = (float)((x >> 40) % 1000) / 250.0f;
            }
            int32_t id = mdl_sampler_sample(smp, logits);
            if (id == eos) {
                text[len] = '\0';
                if (!person_ok(text))
                    fail_msg("seed %llu: %s does not follow the schema", (unsigned long long)seed,
                             text);
                complete++;
                break;
            }
            char b[256];
            int l = mdl_tokenizer_token_bytes(tok, id, b, sizeof(b));
            assert_true(l > 0 && len + (size_t)l < sizeof(text));
            memcpy(text + len, b, (size_t)l);
            len += (size_t)l;
            mdl_sampler_accept_output(smp, id);
        }
        mdl_sampler_destroy(smp);
    }
    fprintf(stderr, "%d of 20 random runs completed their document\n", complete);
    assert_true(complete >= 5);
    // A schema without the vocabulary is refused.
    mdl_sampler_params_t p;
    mdl_sampler_params_default(&p);
    p.schema = s;
    mdl_sampler_t *smp = NULL;
    assert_int_equal(mdl_sampler_create(&p, nv, &smp), FY_ERR_INVALID_ARG);
    mdl_schema_destroy(s);
    free(logits);
    mdl_json_vocab_destroy(v);
    mdl_model_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_object),
        cmocka_unit_test(test_union),
        cmocka_unit_test(test_maps_free_values_and_enums),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_mask_and_sampler),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
