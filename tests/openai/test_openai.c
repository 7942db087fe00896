// The OpenAI front's socket-free parts: HTTP/1.1 requests out of a byte stream in any
// chunking (pipelined, chunked bodies, Expect: 100-continue, limits), request bodies to
// GenerateRequest (every field, every refusal) and the JSON answers, parsed back.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_path.h"
#include "openai_int.h"

/* ---- reader ---------------------------------------------------------------------------- */

typedef struct {
    int n;
    char method[4][8];
    char target[4][64];
    char body[4][128];
    bool keep_alive[4];
    int error;
} reqs_t;

/* Feeds data step bytes at a time, answering (forgetting) each request as it completes. */
static void read_all(const char *data, size_t len, size_t step, size_t max_body, reqs_t *out)
{
    memset(out, 0, sizeof(*out));
    oai_reader_t r;
    oai_reader_init(&r, max_body);
    size_t off = 0, end = 0;
    while (off < len && !r.error) {
        end = FY_MAX(end, FY_MIN(off + step, len));
        size_t used = oai_reader_feed(&r, data + off, end - off);
        off += used;
        if (r.complete) {
            assert_true(out->n < 4);
            snprintf(out->method[out->n], 8, "%s", r.method);
            snprintf(out->target[out->n], 64, "%.63s", r.target);
            assert_int_equal(strlen(r.body), r.body_len);
            snprintf(out->body[out->n], 128, "%s", r.body);
            out->keep_alive[out->n] = r.keep_alive;
            out->n++;
            oai_reader_next(&r);
        } else if (used == 0 && end == len) {
            break;
        }
    }
    out->error = r.error;
    oai_reader_cleanup(&r);
}

static void test_reader_pipelined_any_chunking(void **state)
{
    static const char k_in[] =
        "POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\n"
        "Content-Length: 13\r\n\r\n{\"prompt\":\"\"}"
        "GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
        "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    for (size_t step = 1; step <= sizeof(k_in); step++) {
        reqs_t q;
        read_all(k_in, sizeof(k_in) - 1, step, 1 << 20, &q);
        assert_int_equal(q.error, 0);
        assert_int_equal(q.n, 3);
        assert_string_equal(q.method[0], "POST");
        assert_string_equal(q.target[0], "/v1/completions?x=1");
        assert_string_equal(q.body[0], "{\"prompt\":\"\"}");
        assert_true(q.keep_alive[0]);
        assert_string_equal(q.method[1], "GET");
        assert_string_equal(q.body[1], "");
        assert_string_equal(q.body[2], "abcde");
        assert_false(q.keep_alive[2]);
    }
}

static void test_reader_path_and_expect(void **state)
{
    static const char k_in[] = "POST /v1/completions?stream=1 HTTP/1.1\r\nX-Expectation: no\r\n"
                               "EXPECT: 100-Continue\r\nAuthorization: Bearer k\r\n"
                               "Content-Length: 4\r\n\r\n";
    oai_reader_t r;
    oai_reader_init(&r, 100);
    assert_int_equal(oai_reader_feed(&r, k_in, sizeof(k_in) - 1), sizeof(k_in) - 1);
    assert_false(r.complete);
    assert_true(r.expect_continue);
    assert_string_equal(r.auth, "Bearer k");
    assert_false(r.auth_long);
    assert_int_equal(oai_reader_feed(&r, "abcdEXTRA", 9), 4);
    assert_true(r.complete);
    size_t n;
    const char *p = oai_reader_path(&r, &n);
    assert_int_equal(n, strlen("/v1/completions"));
    assert_memory_equal(p, "/v1/completions", n);
    // HTTP/1.0 without keep-alive closes; the next request starts clean.
    oai_reader_next(&r);
    static const char k_10[] = "GET /health HTTP/1.0\r\n\r\n";
    assert_int_equal(oai_reader_feed(&r, k_10, sizeof(k_10) - 1), sizeof(k_10) - 1);
    assert_true(r.complete);
    assert_false(r.keep_alive);
    assert_false(r.expect_continue);
    assert_string_equal(r.auth, "");
    // An Authorization value longer than kept is marked, never cut to a prefix.
    oai_reader_next(&r);
    char big[OAI_MAX_AUTH + 128];
    int bn = snprintf(big, sizeof(big), "GET / HTTP/1.1\r\nAuthorization: Bearer %0*d\r\n\r\n",
                      OAI_MAX_AUTH, 0);
    assert_int_equal(oai_reader_feed(&r, big, (size_t)bn), (size_t)bn);
    assert_true(r.complete);
    assert_true(r.auth_long);
    oai_reader_cleanup(&r);
}

static void test_reader_limits(void **state)
{
    reqs_t q;
    // A declared body over the limit is refused before it arrives.
    static const char k_big[] = "POST /v1/completions HTTP/1.1\r\nContent-Length: 101\r\n\r\n";
    read_all(k_big, sizeof(k_big) - 1, 1000, 100, &q);
    assert_int_equal(q.error, 413);
    // ... and a chunked one once it grows past it.
    char chunked[512];
    int n = snprintf(chunked, sizeof(chunked),
                     "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "40\r\n%064d\r\n40\r\n%064d\r\n0\r\n\r\n",
                     0, 0);
    read_all(chunked, (size_t)n, 7, 100, &q);
    assert_int_equal(q.error, 413);
    assert_int_equal(q.n, 0);
    // A long target: 414. Long headers: 431.
    char *big = malloc(OAI_MAX_HEAD + 256);
    n = snprintf(big, OAI_MAX_HEAD + 256, "GET /%0*d HTTP/1.1\r\n\r\n", OAI_MAX_TARGET, 0);
    read_all(big, (size_t)n, 512, 100, &q);
    assert_int_equal(q.error, 414);
    n = snprintf(big, OAI_MAX_HEAD + 256, "GET / HTTP/1.1\r\nX: %0*d\r\n\r\n", OAI_MAX_HEAD, 0);
    read_all(big, (size_t)n, 4096, 100, &q);
    assert_int_equal(q.error, 431);
    free(big);
    // HTTP/2 or later spoken as text: 505.
    static const char k_v9[] = "GET / HTTP/9.9\r\n\r\n";
    read_all(k_v9, sizeof(k_v9) - 1, 5, 100, &q);
    assert_int_equal(q.error, 505);
    // Not HTTP: 400.
    static const char *const k_bad[] = {
        "GARBAGE\r\n\r\n", "POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_bad); i++) {
        read_all(k_bad[i], strlen(k_bad[i]), 3, 100, &q);
        assert_int_equal(q.error, 400);
    }
}

/* ---- request bodies ---------------------------------------------------------------------- */

static int parse(oai_request_t *r, oai_kind_t kind, const char *body, char *err)
{
    return oai_request_parse(r, kind, body, strlen(body), err, 256);
}

static void test_chat_request(void **state)
{
    static const char k_body[] =
        "{\"model\":\"m\",\"messages\":[{\"role\":\"developer\",\"content\":\"be brief\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\","
        "\"text\":\"b\\u00e9\"}]},{\"role\":\"assistant\",\"content\":null}],"
        "\"max_completion_tokens\":7,\"temperature\":0,\"top_p\":0.5,\"top_k\":-1,\"seed\":-1,"
        "\"stop\":[\"x\",\"yz\"],\"repetition_penalty\":1.1,\"presence_penalty\":0.5,\"n\":1,"
        "\"frequency_penalty\":-1.25,\"logit_bias\":{\"42\":-100,\"7\":2.5},"
        "\"logprobs\":false,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"kv_policy\":\"ferry\",\"kv_budget\":0.25,\"user\":\"ignored\",\"tools\":[],"
        "\"stop_token_ids\":[2,49152]}";
    oai_request_t r;
    char err[256] = "";
    assert_int_equal(parse(&r, OAI_CHAT, k_body, err), 0);
    const Ferry__V1__GenerateRequest *g = &r.msg;
    assert_string_equal(g->model, "m");
    assert_int_equal(g->input_case, FERRY__V1__GENERATE_REQUEST__INPUT_CHAT);
    assert_int_equal(g->chat->n_messages, 3);
    assert_string_equal(g->chat->messages[0]->role, "system");
    assert_string_equal(g->chat->messages[0]->content, "be brief");
    assert_string_equal(g->chat->messages[1]->content, "ab\xc3\xa9");
    assert_string_equal(g->chat->messages[2]->role, "assistant");
    assert_string_equal(g->chat->messages[2]->content, "");
    assert_int_equal(g->sampling->max_tokens, 7);
    assert_true(g->sampling->temperature == 0.0f);
    assert_true(g->sampling->top_p == 0.5f);
    assert_int_equal(g->sampling->top_k, 0);
    assert_true(g->sampling->seed == UINT64_MAX);
    assert_int_equal(g->sampling->n_stop, 2);
    assert_string_equal(g->sampling->stop[1], "yz");
    assert_int_equal(g->sampling->n_stop_token_ids, 2);
    assert_int_equal(g->sampling->stop_token_ids[1], 49152);
    assert_true(fabsf(g->sampling->repetition_penalty - 1.1f) < 1e-6f);
    assert_true(g->sampling->presence_penalty == 0.5f);
    assert_true(g->sampling->frequency_penalty == -1.25f);
    assert_int_equal(g->sampling->n_logit_bias, 2);
    assert_int_equal(g->sampling->logit_bias[0]->token_id, 42);
    assert_true(g->sampling->logit_bias[0]->bias == -100.0f);
    assert_int_equal(g->sampling->logit_bias[1]->token_id, 7);
    assert_true(g->sampling->logit_bias[1]->bias == 2.5f);
    assert_string_equal(g->codec->policy, "ferry");
    assert_true(g->codec->budget == 0.25f);
    assert_true(r.stream && r.include_usage);
    // The message packs and unpacks to the same fields.
    size_t n = protobuf_c_message_get_packed_size(&g->base);
    uint8_t *buf = malloc(n);
    protobuf_c_message_pack(&g->base, buf);
    Ferry__V1__GenerateRequest *u = ferry__v1__generate_request__unpack(NULL, n, buf);
    assert_non_null(u);
    assert_string_equal(u->chat->messages[1]->content, "ab\xc3\xa9");
    ferry__v1__generate_request__free_unpacked(u, NULL);
    free(buf);
    oai_request_clear(&r);

    // OpenAI's defaults: temperature 1, no stream, the server's max_tokens.
    assert_int_equal(
        parse(&r, OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", err), 0);
    assert_true(r.msg.sampling->temperature == 1.0f);
    assert_int_equal(r.msg.sampling->max_tokens, 0);
    assert_false(r.stream);
    assert_null(r.model);
    oai_request_clear(&r);
}

static void test_completion_prompts(void **state)
{
    oai_request_t r;
    char err[256];
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":\"hello\",\"max_tokens\":3}", err), 0);
    assert_int_equal(r.msg.input_case, FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT);
    assert_string_equal(r.msg.prompt, "hello");
    oai_request_clear(&r);
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":[\"one\"],\"stop\":\"\\n\"}", err), 0);
    assert_string_equal(r.msg.prompt, "one");
    assert_int_equal(r.msg.sampling->n_stop, 1);
    oai_request_clear(&r);
    static const char *const k_ids[] = {"{\"prompt\":[1,2,4294967295]}",
                                        "{\"prompt\":[[1,2,4294967295]]}"};
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(parse(&r, OAI_COMPLETION, k_ids[i], err), 0);
        assert_int_equal(r.msg.input_case, FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS);
        assert_int_equal(r.msg.prompt_token_ids->n_ids, 3);
        assert_int_equal(r.msg.prompt_token_ids->ids[2], 4294967295u);
        oai_request_clear(&r);
    }
    // A batch: prompts as text or token ids, n choices each, msg pointed at one by select.
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":[\"a\",\"b\",\"c\"],\"n\":2}", err), 0);
    assert_int_equal(r.n_prompts, 3);
    assert_int_equal(r.n_choices, 6);
    assert_string_equal(r.msg.prompt, "a");
    oai_request_select(&r, 2);
    assert_int_equal(r.msg.input_case, FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT);
    assert_string_equal(r.msg.prompt, "c");
    oai_request_clear(&r);
    assert_int_equal(parse(&r, OAI_COMPLETION, "{\"prompt\":[[1,2],[3]]}", err), 0);
    assert_int_equal(r.n_prompts, 2);
    oai_request_select(&r, 1);
    assert_int_equal(r.msg.input_case, FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS);
    assert_int_equal(r.msg.prompt_token_ids->n_ids, 1);
    assert_int_equal(r.msg.prompt_token_ids->ids[0], 3);
    oai_request_clear(&r);
    // At most 64 prompts and 64 choices in all.
    char body[2048];
    size_t len = (size_t)sprintf(body, "{\"prompt\":[");
    for (int i = 0; i < 65; i++)
        len += (size_t)sprintf(body + len, "%s\"p\"", i ? "," : "");
    sprintf(body + len, "]}");
    assert_int_equal(parse(&r, OAI_COMPLETION, body, err), 400);
    assert_non_null(strstr(err, "more than 64 prompts"));
    oai_request_clear(&r);
    assert_int_equal(
        parse(&r, OAI_COMPLETION, "{\"prompt\":[\"a\",\"b\",\"c\",\"d\",\"e\"],\"n\":16}", err),
        400);
    assert_non_null(strstr(err, "more than 64 choices"));
    oai_request_clear(&r);
}

static void test_refusals(void **state)
{
    static const struct {
        oai_kind_t kind;
        const char *body, *says;
    } k_cases[] = {
        {OAI_CHAT, "", "not valid JSON"},
        {OAI_CHAT, "{\"messages\":[]} x", "not valid JSON"},
        {OAI_CHAT, "[1]", "JSON object"},
        {OAI_CHAT, "{}", "'messages' is required"},
        {OAI_CHAT, "{\"messages\":[]}", "non-empty array"},
        {OAI_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "'role'"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"function\",\"content\":\"x\"}]}", "not supported"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
         "only text parts"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":7}]}", "'content'"},
        {OAI_COMPLETION, "{}", "'prompt' is required"},
        {OAI_COMPLETION, "{\"prompt\":[\"a\",[1]]}", "array of strings"},
        {OAI_COMPLETION, "{\"prompt\":[[1],\"a\"]}", "array of strings"},
        {OAI_COMPLETION, "{\"prompt\":[[1],[]]}", "non-empty"},
        {OAI_COMPLETION, "{\"prompt\":[]}", "array of strings"},
        {OAI_COMPLETION, "{\"prompt\":[1,-2]}", "token ids"},
        {OAI_COMPLETION, "{\"prompt\":[1,2.5]}", "token ids"},
        {OAI_COMPLETION, "{\"prompt\":[1,\"a\"]}", "token ids"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":0}", "max_tokens"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":1.5}", "max_tokens"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"temperature\":3}", "temperature"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"temperature\":\"hot\"}", "temperature"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"top_p\":0}", "top_p"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"top_k\":-2}", "top_k"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"n\":17}", "'n'"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"n\":0}", "'n'"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"best_of\":3}", "best_of"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":21}", "logprobs"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":true}", "logprobs"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":1}",
         "boolean"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}",
         "needs"},
        {OAI_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,"
         "\"top_logprobs\":21}",
         "top_logprobs"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"echo\":1}", "true or false"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"echo\":true}",
         "for completions"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"suffix\":\"z\"}", "suffix"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"frequency_penalty\":2.5}", "frequency_penalty"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"presence_penalty\":\"1\"}", "presence_penalty"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logit_bias\":{\"1\":101}}", "[-100, 100]"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logit_bias\":{\"x\":1}}", "token ids"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logit_bias\":{\"-1\":1}}", "token ids"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logit_bias\":{\"4294967296\":1}}", "token ids"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logit_bias\":[1]}", "object"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logit_bias\":{\"1\":\"5\"}}", "numbers"},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{}]}",
         "\"type\": \"function\""},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"functions\":[{}]}",
         "'functions' is not supported"},
        {OAI_COMPLETION, "{\"prompt\":\"x\",\"tools\":[{}]}", "for chat completions"},
        {OAI_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"response_format\":"
         "{\"type\":\"json_schema\"}}",
         "object with the schema"},
        {OAI_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"response_format\":"
         "{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\",\"schema\":[1]}}}",
         "a JSON Schema"},
        {OAI_COMPLETION,
         "{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_object\"},"
         "\"guided_json\":{}}",
         "not with a JSON response_format"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"response_format\":{\"type\":\"xml\"}}",
         "json_schema"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"stop\":[\"\"]}", "empty"},
        {OAI_COMPLETION,
         "{\"prompt\":\"a\",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\","
         "\"10\",\"11\",\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
         "more than"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"stream\":1}", "stream"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"kv_budget\":2}", "kv_budget"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"kv_policy\":5}", "kv_policy"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"model\":5}", "model"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"seed\":0.5}", "seed"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"stop_token_ids\":[1,-1]}", "stop_token_ids"},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"stop_token_ids\":5}", "stop_token_ids"},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cases); i++) {
        oai_request_t r;
        char err[256] = "";
        int st = parse(&r, k_cases[i].kind, k_cases[i].body, err);
        if (st != 400 || strstr(err, k_cases[i].says) == NULL)
            fail_msg("case %zu (%s): status %d, \"%s\"", i, k_cases[i].body, st, err);
        oai_request_clear(&r);
    }
    // echo asks for the prompt's log-probabilities when they are wanted (logprobs) or its text
    // is not at hand (token ids).
    static const struct {
        const char *body;
        bool echo, prompt_lps;
    } k_echo[] = {
        {"{\"prompt\":\"a\",\"echo\":true}", true, false},
        {"{\"prompt\":\"a\",\"echo\":true,\"logprobs\":1}", true, true},
        {"{\"prompt\":[1,2,3],\"echo\":true}", true, true},
        {"{\"prompt\":[1,2,3],\"echo\":false,\"logprobs\":1}", false, false},
        {"{\"prompt\":\"a\",\"echo\":null}", false, false},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_echo); i++) {
        oai_request_t r;
        char err[256] = "";
        assert_int_equal(parse(&r, OAI_COMPLETION, k_echo[i].body, err), 0);
        assert_int_equal(r.echo, k_echo[i].echo);
        assert_int_equal(r.msg.sampling->prompt_logprobs, k_echo[i].prompt_lps);
        oai_request_clear(&r);
    }
    // response_format json_object is JSON mode; text and null are not.
    static const struct {
        const char *body;
        bool json;
    } k_formats[] = {
        {"{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_object\"}}", true},
        {"{\"prompt\":\"a\",\"response_format\":{\"type\":\"text\"}}", false},
        {"{\"prompt\":\"a\",\"response_format\":null}", false},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_formats); i++) {
        oai_request_t r;
        char err[256] = "";
        assert_int_equal(parse(&r, OAI_COMPLETION, k_formats[i].body, err), 0);
        assert_int_equal(r.msg.sampling->json_object, k_formats[i].json);
        oai_request_clear(&r);
    }
    // response_format json_schema and guided_json carry the schema's text (the router
    // compiles it); json_schema without a schema is JSON mode.
    static const struct {
        const char *body, *schema;
        bool json;
    } k_schemas[] = {
        {"{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":"
         "{\"name\":\"p\",\"strict\":true,\"schema\":{\"type\":\"object\",\"properties\":"
         "{\"n\":{\"type\":\"integer\"}}}}}}",
         "{\"type\":\"object\",\"properties\":{\"n\":{\"type\":\"integer\"}}}", false},
        {"{\"prompt\":\"a\",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":"
         "{\"name\":\"p\"}}}",
         "", true},
        {"{\"prompt\":\"a\",\"guided_json\":{\"type\":\"array\"}}", "{\"type\":\"array\"}", false},
        {"{\"prompt\":\"a\",\"guided_json\":\"{\\\"type\\\": \\\"array\\\"}\"}",
         "{\"type\": \"array\"}", false},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_schemas); i++) {
        oai_request_t r;
        char err[256] = "";
        if (parse(&r, OAI_COMPLETION, k_schemas[i].body, err) != 0)
            fail_msg("%s: %s", k_schemas[i].body, err);
        assert_string_equal(r.msg.sampling->json_schema, k_schemas[i].schema);
        assert_int_equal(r.msg.sampling->json_object, k_schemas[i].json);
        oai_request_clear(&r);
    }
    // logit_bias: null and {} are no biases; 300 tokens are taken, 301 refused.
    oai_request_t r;
    char err[256];
    static const char *const k_none[] = {"{\"prompt\":\"a\",\"logit_bias\":null}",
                                         "{\"prompt\":\"a\",\"logit_bias\":{}}"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_none); i++) {
        assert_int_equal(parse(&r, OAI_COMPLETION, k_none[i], err), 0);
        assert_int_equal(r.msg.sampling->n_logit_bias, 0);
        oai_request_clear(&r);
    }
    char *big = malloc(16 * 400);
    for (int n = 300; n <= 301; n++) {
        size_t len = (size_t)sprintf(big, "{\"prompt\":\"a\",\"logit_bias\":{");
        for (int i = 0; i < n; i++)
            len += (size_t)sprintf(big + len, "%s\"%d\":-1", i ? "," : "", i);
        sprintf(big + len, "}}");
        int st = parse(&r, OAI_COMPLETION, big, err);
        assert_int_equal(st, n == 300 ? 0 : 400);
        if (st == 0)
            assert_int_equal(r.msg.sampling->n_logit_bias, 300);
        else
            assert_non_null(strstr(err, "more than 300"));
        oai_request_clear(&r);
    }
    free(big);
    // A NUL inside the body.
    assert_int_equal(oai_request_parse(&r, OAI_COMPLETION, "{\"prompt\":\"a\"}\0", 15, err, 256),
                     400);
    oai_request_clear(&r);
}

/* ---- answers --------------------------------------------------------------------------- */

static cJSON *parse_json(char *text)
{
    assert_non_null(text);
    cJSON *j = cJSON_Parse(text);
    assert_non_null(j);
    free(text);
    return j;
}

static const cJSON *at(const cJSON *j, const char *path)
{
    j = json_path(j, path);
    assert_non_null(j);
    return j;
}

/* Log-probabilities: what requests ask for, and both answers' forms. */
static void test_logprobs(void **state)
{
    (void)state;
    static const struct {
        oai_kind_t kind;
        const char *body;
        bool logprobs;
        uint32_t top;
    } k_asks[] = {
        {OAI_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,"
         "\"top_logprobs\":2}",
         true, 2},
        {OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":false}",
         false, 0},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":0}", true, 0},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":20}", true, 20},
        {OAI_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":null}", false, 0},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_asks); i++) {
        oai_request_t r;
        char err[256];
        const char *b = k_asks[i].body;
        assert_int_equal(oai_request_parse(&r, k_asks[i].kind, b, strlen(b), err, sizeof(err)), 0);
        assert_int_equal(r.logprobs, k_asks[i].logprobs);
        assert_int_equal(r.sampling.logprobs, k_asks[i].logprobs);
        assert_int_equal(r.sampling.top_logprobs, k_asks[i].top);
        oai_request_clear(&r);
    }

    // Two tokens: " Paris" (with two alternatives), then half of a character, whose string
    // shows U+FFFD while its bytes stay; a log-probability the worker did not send is null.
    Ferry__V1__TopLogprob a = FERRY__V1__TOP_LOGPROB__INIT, b = FERRY__V1__TOP_LOGPROB__INIT;
    a.token.data = (uint8_t *)" Paris", a.token.len = 6, a.logprob = -0.25f;
    b.token.data = (uint8_t *)" Lyon", b.token.len = 5, b.logprob = -2.5f;
    Ferry__V1__TopLogprob *tops[2] = {&a, &b};
    Ferry__V1__TokenLogprob e0 = FERRY__V1__TOKEN_LOGPROB__INIT,
                            e1 = FERRY__V1__TOKEN_LOGPROB__INIT;
    e0.token = a.token, e0.logprob = -0.25f, e0.top = tops, e0.n_top = 2;
    e1.token.data = (uint8_t *)"\xc3", e1.token.len = 1, e1.logprob = NAN;
    Ferry__V1__TokenLogprob *es[2] = {&e0, &e1};

    cJSON *lp = oai_logprobs_new(OAI_CHAT);
    size_t off = 0;
    assert_true(oai_logprobs_add(lp, OAI_CHAT, es, 2, &off));
    oai_choice_out_t one = {" Paris\xef\xbf\xbd", 9, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP,
                            lp, NULL};
    cJSON *j = parse_json(oai_render_completion(OAI_CHAT, "c", 1, "m", &one, 1, NULL));
    assert_string_equal(at(j, "choices.0.logprobs.content.0.token")->valuestring, " Paris");
    assert_float_equal(at(j, "choices.0.logprobs.content.0.logprob")->valuedouble, -0.25, 1e-6);
    assert_int_equal(cJSON_GetArraySize(at(j, "choices.0.logprobs.content.0.bytes")), 6);
    assert_int_equal(at(j, "choices.0.logprobs.content.0.bytes.0")->valueint, ' ');
    assert_string_equal(at(j, "choices.0.logprobs.content.0.top_logprobs.1.token")->valuestring,
                        " Lyon");
    assert_float_equal(at(j, "choices.0.logprobs.content.0.top_logprobs.1.logprob")->valuedouble,
                       -2.5, 1e-6);
    assert_string_equal(at(j, "choices.0.logprobs.content.1.token")->valuestring, "\xef\xbf\xbd");
    assert_true(cJSON_IsNull(at(j, "choices.0.logprobs.content.1.logprob")));
    assert_int_equal(at(j, "choices.0.logprobs.content.1.bytes.0")->valueint, 0xc3);
    assert_int_equal(cJSON_GetArraySize(at(j, "choices.0.logprobs.content.1.top_logprobs")), 0);
    assert_true(cJSON_IsNull(at(j, "choices.0.logprobs.refusal")));
    cJSON_Delete(j);
    // A stream chunk carries its tokens'.
    j = parse_json(oai_render_chunk(OAI_CHAT, "c", 1, "m", 0, NULL, " Paris", 6, lp, NULL, false));
    assert_string_equal(at(j, "choices.0.logprobs.content.0.token")->valuestring, " Paris");
    cJSON_Delete(j);
    cJSON_Delete(lp);

    lp = oai_logprobs_new(OAI_COMPLETION);
    off = 3; // after earlier tokens
    assert_true(oai_logprobs_add(lp, OAI_COMPLETION, es, 2, &off));
    assert_int_equal(off, 3 + 6 + 1);
    one.logprobs = lp;
    j = parse_json(oai_render_completion(OAI_COMPLETION, "c", 1, "m", &one, 1, NULL));
    assert_string_equal(at(j, "choices.0.logprobs.tokens.0")->valuestring, " Paris");
    assert_float_equal(at(j, "choices.0.logprobs.token_logprobs.0")->valuedouble, -0.25, 1e-6);
    assert_true(cJSON_IsNull(at(j, "choices.0.logprobs.token_logprobs.1")));
    assert_float_equal(
        cJSON_GetObjectItem(at(j, "choices.0.logprobs.top_logprobs.0"), " Lyon")->valuedouble, -2.5,
        1e-6);
    assert_int_equal(at(j, "choices.0.logprobs.text_offset.0")->valueint, 3);
    assert_int_equal(at(j, "choices.0.logprobs.text_offset.1")->valueint, 9);
    cJSON_Delete(j);
    cJSON_Delete(lp);
    // Without logprobs: null.
    one.logprobs = NULL;
    j = parse_json(oai_render_completion(OAI_COMPLETION, "c", 1, "m", &one, 1, NULL));
    assert_true(cJSON_IsNull(at(j, "choices.0.logprobs")));
    cJSON_Delete(j);
}

static void test_answers(void **state)
{
    Ferry__V1__RequestStats st = FERRY__V1__REQUEST_STATS__INIT;
    st.prompt_tokens = 5;
    st.completion_tokens = 3;
    st.kv_wire_bytes = 1234;
    st.policy = "ferry";
    static const char k_text[] = "say \"hi\"\n\\ \x01 caf\xc3\xa9";
    oai_choice_out_t one = {k_text, sizeof(k_text) - 1,
                            FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH, NULL, NULL};
    cJSON *j = parse_json(oai_render_completion(OAI_CHAT, "chatcmpl-1", 7, "m", &one, 1, &st));
    assert_string_equal(at(j, "object")->valuestring, "chat.completion");
    assert_string_equal(at(j, "choices.0.message.content")->valuestring, k_text);
    assert_string_equal(at(j, "choices.0.message.role")->valuestring, "assistant");
    assert_string_equal(at(j, "choices.0.finish_reason")->valuestring, "length");
    assert_int_equal(at(j, "usage.total_tokens")->valueint, 8);
    assert_int_equal(at(j, "ferry.kv_wire_bytes")->valueint, 1234);
    assert_int_equal(at(j, "created")->valueint, 7);
    cJSON_Delete(j);

    // Two choices, each with its index, text and reason.
    oai_choice_out_t two[2] = {
        {"ab", 1, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP, NULL, NULL},
        {"xyz", 3, FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH, NULL, NULL}};
    j = parse_json(oai_render_completion(OAI_COMPLETION, "cmpl-1", 7, "m", two, 2, NULL));
    assert_string_equal(at(j, "object")->valuestring, "text_completion");
    assert_string_equal(at(j, "choices.0.text")->valuestring, "a");
    assert_string_equal(at(j, "choices.0.finish_reason")->valuestring, "stop");
    assert_int_equal(at(j, "choices.1.index")->valueint, 1);
    assert_string_equal(at(j, "choices.1.text")->valuestring, "xyz");
    assert_string_equal(at(j, "choices.1.finish_reason")->valuestring, "length");
    assert_int_equal(at(j, "usage.prompt_tokens")->valueint, 0);
    assert_null(cJSON_GetObjectItem(j, "ferry"));
    cJSON_Delete(j);

    // Chat chunks: the role first, then content deltas, then an empty delta with the reason.
    j = parse_json(
        oai_render_chunk(OAI_CHAT, "c", 1, "m", 0, "assistant", "", 0, NULL, NULL, true));
    assert_string_equal(at(j, "object")->valuestring, "chat.completion.chunk");
    assert_string_equal(at(j, "choices.0.delta.role")->valuestring, "assistant");
    assert_string_equal(at(j, "choices.0.delta.content")->valuestring, "");
    assert_true(cJSON_IsNull(at(j, "choices.0.finish_reason")));
    assert_true(cJSON_IsNull(at(j, "usage")));
    cJSON_Delete(j);
    j = parse_json(oai_render_chunk(OAI_CHAT, "c", 1, "m", 3, NULL, "xyz", 2, NULL, NULL, false));
    assert_int_equal(at(j, "choices.0.index")->valueint, 3);
    assert_string_equal(at(j, "choices.0.delta.content")->valuestring, "xy");
    assert_null(cJSON_GetObjectItem(j, "usage"));
    cJSON_Delete(j);
    j = parse_json(oai_render_chunk(OAI_CHAT, "c", 1, "m", 0, NULL, "", 0, NULL, "stop", false));
    assert_int_equal(cJSON_GetArraySize(at(j, "choices.0.delta")), 0);
    assert_string_equal(at(j, "choices.0.finish_reason")->valuestring, "stop");
    cJSON_Delete(j);
    j = parse_json(
        oai_render_chunk(OAI_COMPLETION, "c", 1, "m", 0, NULL, "", 0, NULL, "length", false));
    assert_string_equal(at(j, "choices.0.text")->valuestring, "");
    cJSON_Delete(j);
    j = parse_json(oai_render_usage_chunk(OAI_CHAT, "c", 1, "m", &st));
    assert_int_equal(cJSON_GetArraySize(at(j, "choices")), 0);
    assert_int_equal(at(j, "usage.completion_tokens")->valueint, 3);
    cJSON_Delete(j);

    Ferry__V1__ModelInfo mi = FERRY__V1__MODEL_INFO__INIT, *mp = &mi;
    mi.name = "smol";
    mi.context_length = 8192;
    Ferry__V1__ListModelsResponse lm = FERRY__V1__LIST_MODELS_RESPONSE__INIT;
    lm.n_models = 1;
    lm.models = &mp;
    j = parse_json(oai_render_models(&lm));
    assert_string_equal(at(j, "object")->valuestring, "list");
    assert_string_equal(at(j, "data.0.id")->valuestring, "smol");
    assert_int_equal(at(j, "data.0.max_model_len")->valueint, 8192);
    cJSON_Delete(j);

    j = parse_json(oai_render_error(404, "no \"such\" model"));
    assert_string_equal(at(j, "error.message")->valuestring, "no \"such\" model");
    assert_string_equal(at(j, "error.type")->valuestring, "invalid_request_error");
    assert_int_equal(at(j, "error.code")->valueint, 404);
    cJSON_Delete(j);

    char pct[] = "a%20b%2Fc%zz%4";
    assert_int_equal(oai_percent_decode(pct, strlen(pct)), 10);
    assert_string_equal(pct, "a b/c%zz%4");

    assert_int_equal(oai_http_status(0), 200);
    assert_int_equal(oai_http_status(3), 400);
    assert_int_equal(oai_http_status(4), 504);
    assert_int_equal(oai_http_status(5), 404);
    assert_int_equal(oai_http_status(8), 429);
    assert_int_equal(oai_http_status(14), 503);
    assert_int_equal(oai_http_status(13), 500);
    assert_string_equal(oai_status_text(413), "Content Too Large");
}

/* ---- tools --------------------------------------------------------------------------------- */

#define TOOLS                                                                                      \
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":"    \
    "\"The weather\",\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":"      \
    "\"string\"}},\"required\":[\"city\"]}}},{\"type\":\"function\",\"function\":{\"name\":"       \
    "\"add\",\"parameters\":{\"type\":\"object\",\"properties\":{\"a\":{\"$ref\":\"#/$defs/N\"},"  \
    "\"b\":{\"$ref\":\"#/$defs/N\"}},\"$defs\":{\"N\":{\"type\":\"number\"}}}}}]"

/* The tools go into the system message (a new one first, or after the one there); earlier
 * calls and results into the conversation in the tools' tags; "none" leaves them out;
 * "required" and a named function guide the answer by a schema of the call. */
static void test_tool_requests(void **state)
{
    oai_request_t r;
    char err[256] = "";
    assert_int_equal(
        parse(&r, OAI_CHAT,
              "{\"messages\":[{\"role\":\"user\",\"content\":\"weather in Paris?\"},"
              "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\","
              "\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":"
              "\"{\\\"city\\\": \\\"Paris\\\"}\"}}]},{\"role\":\"tool\",\"tool_call_id\":\"c1\","
              "\"content\":\"sunny\"}]," TOOLS "}",
              err),
        0);
    assert_int_equal(r.n_tools, 2);
    assert_int_equal(r.tool_choice, OAI_TOOLS_AUTO);
    assert_true(oai_tools_active(&r));
    assert_int_equal(r.chat.n_messages, 4);
    const char *sys = r.chat.messages[0]->content;
    assert_string_equal(r.chat.messages[0]->role, "system");
    assert_true(strncmp(sys, "# Tools", 7) == 0);
    assert_non_null(strstr(sys, "<tools>\n{\"type\":\"function\",\"function\":{\"name\":"
                                "\"get_weather\""));
    assert_non_null(strstr(sys, "\"name\":\"add\""));
    assert_non_null(strstr(sys, "<tool_call>\n{\"name\": <function-name>"));
    assert_string_equal(r.chat.messages[1]->content, "weather in Paris?");
    assert_string_equal(r.chat.messages[2]->role, "assistant");
    assert_string_equal(r.chat.messages[2]->content,
                        "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":"
                        "\"Paris\"}}\n</tool_call>");
    assert_string_equal(r.chat.messages[3]->role, "user");
    assert_string_equal(r.chat.messages[3]->content, "<tool_response>\nsunny\n</tool_response>");
    assert_string_equal(r.sampling.json_schema, "");
    oai_request_clear(&r);

    // A system message of its own comes first, the tools after it; "none" leaves them out.
    assert_int_equal(parse(&r, OAI_CHAT,
                           "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                           "{\"role\":\"user\",\"content\":\"x\"}]," TOOLS "}",
                           err),
                     0);
    assert_int_equal(r.chat.n_messages, 2);
    assert_true(strncmp(r.chat.messages[0]->content, "Be brief.\n\n# Tools", 18) == 0);
    oai_request_clear(&r);
    assert_int_equal(parse(&r, OAI_CHAT,
                           "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                           "\"tool_choice\":\"none\"," TOOLS "}",
                           err),
                     0);
    assert_false(oai_tools_active(&r));
    assert_int_equal(r.chat.n_messages, 1);
    oai_request_clear(&r);

    // required: a schema of either call, their $defs on top; a named function: its call only.
    assert_int_equal(parse(&r, OAI_CHAT,
                           "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                           "\"tool_choice\":\"required\"," TOOLS "}",
                           err),
                     0);
    cJSON *schema = cJSON_Parse(r.sampling.json_schema);
    assert_int_equal(cJSON_GetArraySize(at(schema, "anyOf")), 2);
    assert_string_equal(at(schema, "anyOf.1.properties.name.const")->valuestring, "add");
    assert_string_equal(at(schema, "anyOf.0.properties.arguments.required.0")->valuestring, "city");
    assert_string_equal(at(schema, "$defs.N.type")->valuestring, "number");
    assert_null(json_path(schema, "anyOf.1.properties.arguments.$defs"));
    cJSON_Delete(schema);
    oai_request_clear(&r);
    assert_int_equal(
        parse(&r, OAI_CHAT,
              "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
              "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}},"
              "\"parallel_tool_calls\":false," TOOLS "}",
              err),
        0);
    assert_int_equal(r.tool_choice, OAI_TOOLS_NAMED);
    schema = cJSON_Parse(r.sampling.json_schema);
    assert_string_equal(at(schema, "properties.name.const")->valuestring, "get_weather");
    assert_null(json_path(schema, "anyOf"));
    cJSON_Delete(schema);
    oai_request_clear(&r);

    static const struct {
        const char *body, *says;
    } k_bad[] = {
        {"\"tool_choice\":\"required\"}", "needs 'tools'"},
        {"\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"nope\"}}," TOOLS "}",
         "no tool \"nope\""},
        {"\"tool_choice\":\"sometimes\"," TOOLS "}", "'tool_choice' must be"},
        {"\"tool_choice\":\"required\",\"response_format\":{\"type\":\"json_object\"}," TOOLS "}",
         "not with response_format"},
        {"\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a b\"}}]}", "\"a b\""},
        {"\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}},{\"type\":"
         "\"function\",\"function\":{\"name\":\"f\"}}]}",
         "given twice"},
        {"\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":3}}]}",
         "object of parameters"},
        {"\"parallel_tool_calls\":1}", "parallel_tool_calls"},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_bad); i++) {
        char body[1024];
        snprintf(body, sizeof(body), "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],%s",
                 k_bad[i].body);
        err[0] = '\0';
        int st = parse(&r, OAI_CHAT, body, err);
        if (st != 400 || strstr(err, k_bad[i].says) == NULL)
            fail_msg("%s: status %d, \"%s\"", body, st, err);
        oai_request_clear(&r);
    }
    // An assistant's tool_calls must name a function.
    assert_int_equal(parse(&r, OAI_CHAT,
                           "{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"x\":1}]}]}",
                           err),
                     400);
    assert_non_null(strstr(err, "tool_calls"));
    oai_request_clear(&r);
}

/* Answers read back: the content before the first <tool_call>, each call's JSON (arguments as
 * an object or a string of one, Llama's "parameters", a last call without its closing tag, a
 * bare JSON call); anything else is content. A stream holds back what may be a call. */
#define WHOLE SIZE_MAX // the whole text is content

static void test_tool_answers(void **state)
{
    oai_request_t r;
    char err[256] = "";
    assert_int_equal(parse(&r, OAI_CHAT,
                           "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]," TOOLS "}", err),
                     0);
    static const struct {
        const char *text;
        int calls;
        size_t content;
        const char *first_name, *first_args;
    } k_cases[] = {
        {"Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
         "\"Paris\"}}\n</tool_call>",
         1, 13, "get_weather", "{\"city\":\"Paris\"}"},
        {"<tool_call>{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}</tool_call>\n<tool_call>"
         "{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\\\"Oslo\\\"}\"}</tool_call>",
         2, 0, "add", "{\"a\":1,\"b\":2}"},
        {"<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}", 1, 0, "add",
         "{\"a\":1,\"b\":2}"},
        {" {\"name\": \"add\", \"parameters\": {\"a\": 3, \"b\": 4}}", 1, 0, "add",
         "{\"a\":3,\"b\":4}"},
        {"<tool_call>{\"name\": \"get_weather\"}</tool_call>", 1, 0, "get_weather", "{}"},
        {"<tool_call>[{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}, {\"name\": "
         "\"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]</tool_call>",
         2, 0, "add", "{\"a\":1,\"b\":2}"},
        {"<tool_call>[]</tool_call>", 0, WHOLE, NULL, NULL},
        {"It is sunny.", 0, WHOLE, NULL, NULL},
        {"<tool_call>{\"name\": \"launch\", \"arguments\": {}}</tool_call>", 0, WHOLE, NULL, NULL},
        {"<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": </tool_call>", 0, WHOLE, NULL,
         NULL},
        {"<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>", 0, WHOLE, NULL, NULL},
        {"{\"answer\": 42}", 0, WHOLE, NULL, NULL},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cases); i++) {
        size_t content = 999;
        const size_t len = strlen(k_cases[i].text);
        cJSON *calls = oai_tools_extract(&r, k_cases[i].text, len, "call_x", &content);
        if (cJSON_GetArraySize(calls) != k_cases[i].calls ||
            content != (k_cases[i].content == WHOLE ? len : k_cases[i].content))
            fail_msg("%s: %d calls, content %zu", k_cases[i].text, cJSON_GetArraySize(calls),
                     content);
        if (k_cases[i].calls > 0) {
            assert_string_equal(at(calls, "0.id")->valuestring, "call_x0");
            assert_string_equal(at(calls, "0.type")->valuestring, "function");
            assert_string_equal(at(calls, "0.function.name")->valuestring, k_cases[i].first_name);
            assert_string_equal(at(calls, "0.function.arguments")->valuestring,
                                k_cases[i].first_args);
        }
        if (k_cases[i].calls > 1)
            assert_string_equal(at(calls, "1.function.arguments")->valuestring,
                                "{\"city\":\"Oslo\"}");
        // A whole answer renders with its calls; the content is null when empty.
        oai_choice_out_t out = {k_cases[i].text, content,
                                FERRY__V1__FINISH_REASON__FINISH_REASON_STOP, NULL, calls};
        cJSON *j = parse_json(oai_render_completion(OAI_CHAT, "c", 1, "m", &out, 1, NULL));
        assert_string_equal(at(j, "choices.0.finish_reason")->valuestring,
                            calls ? "tool_calls" : "stop");
        assert_true(calls && content == 0 ? cJSON_IsNull(at(j, "choices.0.message.content"))
                                          : cJSON_IsString(at(j, "choices.0.message.content")));
        assert_int_equal(cJSON_GetArraySize(json_path(j, "choices.0.message.tool_calls")),
                         k_cases[i].calls);
        cJSON_Delete(j);
        if (calls != NULL) {
            j = parse_json(oai_render_tool_chunk("c", 1, "m", 2, calls, false));
            assert_int_equal(at(j, "choices.0.index")->valueint, 2);
            assert_int_equal(at(j, "choices.0.delta.tool_calls.0.index")->valueint, 0);
            assert_string_equal(at(j, "choices.0.delta.tool_calls.0.function.name")->valuestring,
                                k_cases[i].first_name);
            cJSON_Delete(j);
        }
        cJSON_Delete(calls);
    }
    static const struct {
        const char *text;
        size_t sure;
    } k_stream[] = {
        {"Hello", 5},       {"Hello <tool", 5},
        {"Hello <", 5},     {"Hello <tool_call>{\"na", 5},
        {"  {\"name\"", 0}, {"", 0},
        {"a <b> c", 7},     {"a\n\n", 1},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_stream); i++)
        assert_int_equal(oai_tools_streamable(&r, k_stream[i].text, strlen(k_stream[i].text)),
                         k_stream[i].sure);
    oai_request_clear(&r);
    // A guided call streams nothing before it is whole.
    assert_int_equal(parse(&r, OAI_CHAT,
                           "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                           "\"tool_choice\":\"required\"," TOOLS "}",
                           err),
                     0);
    assert_int_equal(oai_tools_streamable(&r, "Hello", 5), 0);
    oai_request_clear(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reader_pipelined_any_chunking),
        cmocka_unit_test(test_reader_path_and_expect),
        cmocka_unit_test(test_reader_limits),
        cmocka_unit_test(test_chat_request),
        cmocka_unit_test(test_completion_prompts),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_answers),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_tool_requests),
        cmocka_unit_test(test_tool_answers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
