// The OpenAI front over sockets, against a scripted ferry.v1.Ferry service in the same
// process: answers and streams (chunked and HTTP/1.0), the request fields that reach the
// upstream, upstream errors before and during a stream, a client that hangs up (its call is
// cancelled), keep-alive and pipelining, unknown routes, an unreachable upstream, idle
// connections.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "ferry.pb-c.h"
#include "json_path.h"
#include "openai.h"
#include "openai_int.h"
#include "rpc.h"

/* ---- the scripted upstream ---------------------------------------------------------------- */

static atomic_int g_cancelled; // Generate calls the client cancelled
static atomic_int g_generates; // Generate calls received

static const char *last_content(const Ferry__V1__GenerateRequest *g)
{
    if (g->input_case == FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT)
        return g->prompt;
    if (g->input_case == FERRY__V1__GENERATE_REQUEST__INPUT_CHAT && g->chat->n_messages > 0)
        return g->chat->messages[g->chat->n_messages - 1]->content;
    return "";
}

static void on_cancel(rpc_call_t *call, void *arg)
{
    atomic_fetch_add(&g_cancelled, 1);
    rpc_call_finish(call, 1, "cancelled");
}

static void send_text(rpc_call_t *call, const char *text, Ferry__V1__FinishReason finish)
{
    Ferry__V1__GenerateResponse r = FERRY__V1__GENERATE_RESPONSE__INIT;
    Ferry__V1__RequestStats st = FERRY__V1__REQUEST_STATS__INIT;
    r.text = (char *)text;
    r.finish_reason = finish;
    if (finish != FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED) {
        st.prompt_tokens = 2;
        st.completion_tokens = 3;
        st.kv_raw_bytes = 4000;
        st.kv_wire_bytes = 1000;
        r.stats = &st;
    }
    rpc_call_send(call, &r.base);
}

static void on_generate(rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    const Ferry__V1__GenerateRequest *g = (const Ferry__V1__GenerateRequest *)req;
    atomic_fetch_add(&g_generates, 1);
    const char *what = last_content(g);
    if (strcmp(what, "fail-early") == 0) {
        rpc_call_finish(call, 3, "bad prompt");
        return;
    }
    if (strcmp(what, "fail-late") == 0) {
        send_text(call, "partial", FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED);
        rpc_call_finish(call, 14, "worker lost");
        return;
    }
    if (strcmp(what, "fail-odd") == 0) { // n > 1: odd seeds fail, even ones wait
        if (g->sampling->seed % 2) {
            rpc_call_finish(call, 3, "odd seed");
            return;
        }
        what = "hang";
    }
    if (strcmp(what, "call-tools") == 0) { // a model's answer with a call, the tag split
        send_text(call, "Let me check. <tool", FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED);
        send_text(call,
                  "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
                  "</tool_call>",
                  FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED);
        send_text(call, "", FERRY__V1__FINISH_REASON__FINISH_REASON_STOP);
        rpc_call_finish(call, 0, NULL);
        return;
    }
    if (strcmp(what, "hang") == 0) {
        rpc_call_set_cancel_cb(call, on_cancel, NULL);
        return;
    }
    // Echo what arrived, in two pieces, then an empty last message.
    char desc[512];
    snprintf(desc, sizeof(desc),
             "[model=%s max=%u temp=%.2f top_p=%.2f top_k=%u rep=%.2f seed=%llu stops=%zu "
             "eos=%d policy=%s budget=%.2f id=%.9s input=%d n=%zu last=%s]",
             g->model, g->sampling->max_tokens, g->sampling->temperature, g->sampling->top_p,
             g->sampling->top_k, g->sampling->repetition_penalty,
             (unsigned long long)g->sampling->seed, g->sampling->n_stop, g->sampling->ignore_eos,
             g->codec->policy, g->codec->budget, g->request_id, (int)g->input_case,
             g->input_case == FERRY__V1__GENERATE_REQUEST__INPUT_CHAT ? g->chat->n_messages
             : g->input_case == FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS
                 ? g->prompt_token_ids->n_ids
                 : 1,
             what);
    send_text(call, desc, FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED);
    send_text(call, "tail \"q\" \xc3\xa9", FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED);
    send_text(call, "", FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    rpc_call_finish(call, 0, NULL);
}

static void on_list_models(rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    Ferry__V1__ModelInfo mi = FERRY__V1__MODEL_INFO__INIT, *mp = &mi;
    mi.name = "fake";
    mi.context_length = 4096;
    Ferry__V1__ListModelsResponse r = FERRY__V1__LIST_MODELS_RESPONSE__INIT;
    r.n_models = 1;
    r.models = &mp;
    rpc_call_send(call, &r.base);
    rpc_call_finish(call, 0, NULL);
}

static void on_health(rpc_call_t *call, const ProtobufCMessage *req, void *arg)
{
    Ferry__V1__HealthResponse r = FERRY__V1__HEALTH_RESPONSE__INIT;
    r.status = FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
    rpc_call_send(call, &r.base);
    rpc_call_finish(call, 0, NULL);
}

/* ---- the fixture: upstream and fronts on one loop in a thread ------------------------------- */

typedef struct {
    uv_loop_t loop;
    uv_thread_t thread;
    uv_async_t stop;
    rpc_server_t *upstream;
    fy_metrics_t *metrics;
    oai_server_t *front, *orphan, *brief, *keyed; // brief: 300 ms idle timeout; orphan: no
                                                  // upstream; keyed: an API key
    int port, orphan_port, brief_port, keyed_port;
} fixture_t;

static void on_stop(uv_async_t *a)
{
    fixture_t *f = a->data;
    oai_server_destroy(f->front);
    oai_server_destroy(f->orphan);
    oai_server_destroy(f->brief);
    oai_server_destroy(f->keyed);
    rpc_server_destroy(f->upstream);
    uv_close((uv_handle_t *)&f->stop, NULL);
}

static void run_loop(void *arg)
{
    fixture_t *f = arg;
    uv_run(&f->loop, UV_RUN_DEFAULT);
}

static int setup(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    uv_loop_init(&f->loop);
    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    sp.port = 0;
    assert_int_equal(rpc_server_create(&f->loop, &sp, &f->upstream), FY_OK);
    static const rpc_handler_cb k_handlers[] = {on_generate, NULL, NULL, on_list_models, on_health};
    static const bool k_streaming[] = {true, false, false, false, false};
    assert_int_equal(rpc_server_add_service(f->upstream, &ferry__v1__ferry__descriptor, k_handlers,
                                            k_streaming, NULL),
                     FY_OK);
    char up[64];
    snprintf(up, sizeof(up), "127.0.0.1:%d", rpc_server_port(f->upstream));
    oai_server_params_t op;
    oai_server_params_default(&op);
    op.upstream = up;
    op.model_name = "fake";
    op.max_body = 4096;
    assert_int_equal(fy_metrics_create(&f->metrics), FY_OK);
    op.metrics = f->metrics;
    assert_int_equal(oai_server_create(&f->loop, &op, &f->front), FY_OK);
    op.metrics = NULL;
    op.api_key = "s3cret key";
    assert_int_equal(oai_server_create(&f->loop, &op, &f->keyed), FY_OK);
    op.api_key = NULL;
    op.idle_timeout_ms = 300;
    assert_int_equal(oai_server_create(&f->loop, &op, &f->brief), FY_OK);
    op.idle_timeout_ms = 60000;
    op.upstream = "127.0.0.1:1";
    assert_int_equal(oai_server_create(&f->loop, &op, &f->orphan), FY_OK);
    f->port = oai_server_port(f->front);
    f->brief_port = oai_server_port(f->brief);
    f->orphan_port = oai_server_port(f->orphan);
    f->keyed_port = oai_server_port(f->keyed);
    uv_async_init(&f->loop, &f->stop, on_stop);
    f->stop.data = f;
    uv_thread_create(&f->thread, run_loop, f);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    uv_async_send(&f->stop);
    uv_thread_join(&f->thread);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    fy_metrics_destroy(f->metrics);
    free(f);
    return 0;
}

/* ---- a blocking HTTP client ------------------------------------------------------------------ */

static int connect_to(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return s;
}

static void send_all(int s, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(s, data, len, MSG_NOSIGNAL);
        assert_true(n > 0);
        data += n, len -= (size_t)n;
    }
}

/* Everything the server sends until it closes (malloc'd, NUL-terminated). */
static char *read_to_eof(int s, size_t *len_p)
{
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap)
            buf = realloc(buf, cap *= 2);
        ssize_t n = recv(s, buf + len, cap - len - 1, 0);
        assert_true(n >= 0); // a timeout would be -1
        if (n == 0)
            break;
        len += (size_t)n;
    }
    buf[len] = '\0';
    if (len_p)
        *len_p = len;
    return buf;
}

/* One request on a fresh connection (Connection: close) with extra header lines (each ending
 * in CRLF): the whole response. */
static char *exchange_with(int port, const char *extra, const char *method, const char *path,
                           const char *body, const char *version)
{
    char head[1024];
    int n = snprintf(head, sizeof(head),
                     "%s %s HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\n%s"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                     method, path, version, extra, body ? strlen(body) : 0);
    int s = connect_to(port);
    send_all(s, head, (size_t)n);
    if (body)
        send_all(s, body, strlen(body));
    char *resp = read_to_eof(s, NULL);
    close(s);
    return resp;
}

static char *exchange(int port, const char *method, const char *path, const char *body,
                      const char *version)
{
    return exchange_with(port, "", method, path, body, version);
}

static int status_of(const char *resp)
{
    int st = 0;
    assert_int_equal(sscanf(resp, "HTTP/1.1 %d", &st), 1);
    return st;
}

static const char *body_of(const char *resp)
{
    const char *b = strstr(resp, "\r\n\r\n");
    assert_non_null(b);
    return b + 4;
}

/* A chunked body decoded in place; returns it. */
static char *dechunk(char *body)
{
    char *in = body, *out = body;
    for (;;) {
        char *end;
        unsigned long n = strtoul(in, &end, 16);
        assert_true(end != in && end[0] == '\r' && end[1] == '\n');
        in = end + 2;
        if (n == 0)
            break;
        memmove(out, in, n);
        out += n;
        in += n;
        assert_true(in[0] == '\r' && in[1] == '\n');
        in += 2;
    }
    *out = '\0';
    return body;
}

/* The data lines of an event stream, parsed ("[DONE]" as a JSON string). */
static int events(char *body, cJSON **ev, int max)
{
    int n = 0;
    for (char *line = strtok(body, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        assert_memory_equal(line, "data: ", 6);
        assert_true(n < max);
        ev[n] =
            strcmp(line + 6, "[DONE]") == 0 ? cJSON_CreateString("[DONE]") : cJSON_Parse(line + 6);
        assert_non_null(ev[n]);
        n++;
    }
    return n;
}

static const char *str_at(const cJSON *j, const char *path)
{
    const cJSON *v = json_path(j, path);
    if (!cJSON_IsString(v))
        fail_msg("no string at %s", path);
    return v->valuestring;
}

/* ---- tests ------------------------------------------------------------------------------------
 */

static void test_chat_answer(void **state)
{
    fixture_t *f = *state;
    char *resp =
        exchange(f->port, "POST", "/v1/chat/completions",
                 "{\"model\":\"fake\",\"messages\":[{\"role\":\"system\",\"content\":\"s\"},"
                 "{\"role\":\"user\",\"content\":\"hello\"}],\"max_tokens\":5,"
                 "\"temperature\":0,\"top_k\":40,\"seed\":9,\"stop\":[\"a\",\"b\"],"
                 "\"kv_policy\":\"ferry\",\"kv_budget\":0.25}",
                 "1.1");
    assert_int_equal(status_of(resp), 200);
    assert_non_null(strstr(resp, "Content-Type: application/json"));
    cJSON *j = cJSON_Parse(body_of(resp));
    assert_non_null(j);
    const char *content = str_at(j, "choices.0.message.content");
    assert_non_null(strstr(content, "model=fake max=5 temp=0.00 top_p=0.00 top_k=40 rep=0.00 "
                                    "seed=9 stops=2 eos=0 policy=ferry budget=0.25 "
                                    "id=chatcmpl- input=3 n=2 last=hello]"));
    assert_non_null(strstr(content, "]tail \"q\" \xc3\xa9"));
    assert_string_equal(str_at(j, "object"), "chat.completion");
    assert_string_equal(str_at(j, "model"), "fake");
    assert_memory_equal(str_at(j, "id"), "chatcmpl-", 9);
    assert_int_equal(strlen(str_at(j, "id")), 9 + 32);
    assert_string_equal(str_at(j, "choices.0.finish_reason"), "length");
    assert_int_equal(json_path(j, "usage.total_tokens")->valueint, 5);
    assert_int_equal(json_path(j, "ferry.kv_wire_bytes")->valueint, 1000);
    cJSON_Delete(j);
    free(resp);
}

static void test_completion_stream(void **state)
{
    fixture_t *f = *state;
    static const char k_body[] = "{\"prompt\":[[5,6,7]],\"stream\":true,\"stream_options\":"
                                 "{\"include_usage\":true},\"ignore_eos\":true}";
    for (int v10 = 0; v10 < 2; v10++) {
        char *resp = exchange(f->port, "POST", "/v1/completions", k_body, v10 ? "1.0" : "1.1");
        assert_int_equal(status_of(resp), 200);
        assert_non_null(strstr(resp, "Content-Type: text/event-stream"));
        bool chunked = strstr(resp, "Transfer-Encoding: chunked") != NULL;
        assert_true(chunked == !v10);
        char *body = (char *)body_of(resp);
        if (chunked)
            body = dechunk(body);
        cJSON *ev[16];
        int n = events(body, ev, 16);
        // Two text chunks, the finish chunk, the usage chunk, [DONE].
        assert_int_equal(n, 5);
        assert_non_null(strstr(str_at(ev[0], "choices.0.text"), "input=4 n=3 last=]"));
        assert_true(cJSON_IsNull(json_path(ev[0], "choices.0.finish_reason")));
        assert_true(cJSON_IsNull(json_path(ev[0], "usage")));
        assert_string_equal(str_at(ev[1], "choices.0.text"), "tail \"q\" \xc3\xa9");
        assert_string_equal(str_at(ev[2], "choices.0.finish_reason"), "length");
        assert_int_equal(cJSON_GetArraySize(json_path(ev[3], "choices")), 0);
        assert_int_equal(json_path(ev[3], "usage.completion_tokens")->valueint, 3);
        assert_string_equal(ev[4]->valuestring, "[DONE]");
        for (int i = 0; i < 4; i++) {
            assert_string_equal(str_at(ev[i], "object"), "text_completion");
            assert_string_equal(str_at(ev[i], "id"), str_at(ev[0], "id"));
        }
        for (int i = 0; i < n; i++)
            cJSON_Delete(ev[i]);
        free(resp);
    }
}

static void test_chat_stream_roles(void **state)
{
    fixture_t *f = *state;
    char *resp =
        exchange(f->port, "POST", "/v1/chat/completions",
                 "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":true}", "1.1");
    assert_int_equal(status_of(resp), 200);
    cJSON *ev[16];
    int n = events(dechunk((char *)body_of(resp)), ev, 16);
    assert_int_equal(n, 5); // role, two deltas, finish, [DONE]
    assert_string_equal(str_at(ev[0], "choices.0.delta.role"), "assistant");
    assert_non_null(strstr(str_at(ev[1], "choices.0.delta.content"), "model= "));
    assert_null(json_path(ev[1], "usage"));
    assert_string_equal(str_at(ev[3], "choices.0.finish_reason"), "length");
    assert_int_equal(cJSON_GetArraySize(json_path(ev[3], "choices.0.delta")), 0);
    assert_string_equal(str_at(ev[0], "object"), "chat.completion.chunk");
    for (int i = 0; i < n; i++)
        cJSON_Delete(ev[i]);
    free(resp);
}

/* With tools, an answer that calls one: whole, the content before the call and the call; as
 * a stream, the content as it comes (never a byte of the call), then the call in one delta,
 * then "tool_calls". The system message the upstream got carries the tools. */
static void test_tool_calls(void **state)
{
    fixture_t *f = *state;
    static const char k_body[] =
        "{\"messages\":[{\"role\":\"user\",\"content\":\"call-tools\"}],%s"
        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\","
        "\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}}}}}]}";
    char body[1024];
    snprintf(body, sizeof(body), k_body, "");
    char *resp = exchange(f->port, "POST", "/v1/chat/completions", body, "1.1");
    assert_int_equal(status_of(resp), 200);
    cJSON *j = cJSON_Parse(body_of(resp));
    assert_string_equal(str_at(j, "choices.0.message.content"), "Let me check.");
    assert_string_equal(str_at(j, "choices.0.message.tool_calls.0.function.name"), "get_weather");
    assert_string_equal(str_at(j, "choices.0.message.tool_calls.0.function.arguments"),
                        "{\"city\":\"Paris\"}");
    assert_memory_equal(str_at(j, "choices.0.message.tool_calls.0.id"), "call_", 5);
    assert_string_equal(str_at(j, "choices.0.message.tool_calls.0.type"), "function");
    assert_string_equal(str_at(j, "choices.0.finish_reason"), "tool_calls");
    cJSON_Delete(j);
    free(resp);

    snprintf(body, sizeof(body), k_body, "\"stream\":true,");
    resp = exchange(f->port, "POST", "/v1/chat/completions", body, "1.1");
    assert_int_equal(status_of(resp), 200);
    cJSON *ev[16];
    int n = events(dechunk((char *)body_of(resp)), ev, 16);
    assert_int_equal(n, 5); // role, content, the call, finish, [DONE]
    assert_string_equal(str_at(ev[1], "choices.0.delta.content"), "Let me check.");
    assert_int_equal(json_path(ev[2], "choices.0.delta.tool_calls.0.index")->valueint, 0);
    assert_string_equal(str_at(ev[2], "choices.0.delta.tool_calls.0.function.arguments"),
                        "{\"city\":\"Paris\"}");
    assert_null(json_path(ev[2], "choices.0.delta.content"));
    assert_string_equal(str_at(ev[3], "choices.0.finish_reason"), "tool_calls");
    for (int i = 0; i < n; i++)
        cJSON_Delete(ev[i]);
    free(resp);
}

static void test_upstream_errors(void **state)
{
    fixture_t *f = *state;
    // Before anything streamed: the gRPC status as an HTTP status, stream or not.
    for (int stream = 0; stream < 2; stream++) {
        char body[128];
        snprintf(body, sizeof(body), "{\"prompt\":\"fail-early\",\"stream\":%s}",
                 stream ? "true" : "false");
        char *resp = exchange(f->port, "POST", "/v1/completions", body, "1.1");
        assert_int_equal(status_of(resp), 400);
        cJSON *j = cJSON_Parse(body_of(resp));
        assert_string_equal(str_at(j, "error.message"), "bad prompt");
        cJSON_Delete(j);
        free(resp);
    }
    // During a stream: an error event, then [DONE]. Not streamed: 503.
    char *resp = exchange(f->port, "POST", "/v1/completions",
                          "{\"prompt\":\"fail-late\",\"stream\":true}", "1.1");
    assert_int_equal(status_of(resp), 200);
    cJSON *ev[8];
    int n = events(dechunk((char *)body_of(resp)), ev, 8);
    assert_int_equal(n, 3);
    assert_string_equal(str_at(ev[0], "choices.0.text"), "partial");
    assert_string_equal(str_at(ev[1], "error.message"), "worker lost");
    assert_int_equal(json_path(ev[1], "error.code")->valueint, 503);
    assert_string_equal(ev[2]->valuestring, "[DONE]");
    for (int i = 0; i < n; i++)
        cJSON_Delete(ev[i]);
    free(resp);
    resp = exchange(f->port, "POST", "/v1/completions", "{\"prompt\":\"fail-late\"}", "1.1");
    assert_int_equal(status_of(resp), 503);
    free(resp);
    // A bad body never reaches the upstream.
    int before = atomic_load(&g_generates);
    resp = exchange(f->port, "POST", "/v1/completions", "{\"prompt\":\"a\",\"n\":17}", "1.1");
    assert_int_equal(status_of(resp), 400);
    assert_non_null(strstr(body_of(resp), "'n' must be an integer in [1, 16]"));
    free(resp);
    assert_int_equal(atomic_load(&g_generates), before);
}

/* n > 1: one Generate call a choice (seed + i), choices by index, usage summed; one failing
 * choice fails the request and cancels the others. */
static void test_several_choices(void **state)
{
    fixture_t *f = *state;
    int before = atomic_load(&g_generates);
    char *resp = exchange(f->port, "POST", "/v1/chat/completions",
                          "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":3,"
                          "\"seed\":9}",
                          "1.1");
    assert_int_equal(status_of(resp), 200);
    assert_int_equal(atomic_load(&g_generates), before + 3);
    cJSON *j = cJSON_Parse(body_of(resp));
    assert_int_equal(cJSON_GetArraySize(json_path(j, "choices")), 3);
    static const char *const k_seeds[] = {"seed=9 ", "seed=10 ", "seed=11 "};
    for (int i = 0; i < 3; i++) {
        char path[64];
        snprintf(path, sizeof(path), "choices.%d.index", i);
        assert_int_equal(json_path(j, path)->valueint, i);
        snprintf(path, sizeof(path), "choices.%d.message.content", i);
        assert_non_null(strstr(str_at(j, path), k_seeds[i]));
        snprintf(path, sizeof(path), "choices.%d.finish_reason", i);
        assert_string_equal(str_at(j, path), "length");
    }
    assert_int_equal(json_path(j, "usage.completion_tokens")->valueint, 9); // 3 a choice
    assert_int_equal(json_path(j, "usage.prompt_tokens")->valueint, 2);
    cJSON_Delete(j);
    free(resp);

    // Streamed: every chunk names its choice; each choice ends once; one usage chunk.
    resp = exchange(f->port, "POST", "/v1/completions",
                    "{\"prompt\":\"p\",\"n\":2,\"stream\":true,\"stream_options\":"
                    "{\"include_usage\":true}}",
                    "1.1");
    assert_int_equal(status_of(resp), 200);
    cJSON *ev[32];
    int n = events(dechunk((char *)body_of(resp)), ev, 32);
    int texts[2] = {0, 0}, finishes[2] = {0, 0}, usage = 0;
    for (int i = 0; i + 1 < n; i++) {
        const cJSON *ch = json_path(ev[i], "choices.0");
        if (ch == NULL) {
            usage++;
            assert_int_equal(json_path(ev[i], "usage.completion_tokens")->valueint, 6);
            continue;
        }
        int k = json_path(ch, "index")->valueint;
        assert_true(k == 0 || k == 1);
        if (cJSON_IsString(json_path(ch, "finish_reason")))
            finishes[k]++;
        else
            texts[k]++;
    }
    assert_int_equal(texts[0], 2);
    assert_int_equal(texts[1], 2);
    assert_int_equal(finishes[0], 1);
    assert_int_equal(finishes[1], 1);
    assert_int_equal(usage, 1);
    assert_string_equal(ev[n - 1]->valuestring, "[DONE]");
    for (int i = 0; i < n; i++)
        cJSON_Delete(ev[i]);
    free(resp);

    // Choices 1 and 3 fail, 0 and 2 wait: the answer is the failure; the waiting are cancelled.
    int cancelled = atomic_load(&g_cancelled);
    resp = exchange(f->port, "POST", "/v1/completions",
                    "{\"prompt\":\"fail-odd\",\"n\":4,\"seed\":0}", "1.1");
    assert_int_equal(status_of(resp), 400);
    assert_non_null(strstr(body_of(resp), "odd seed"));
    free(resp);
    for (int i = 0; i < 500 && atomic_load(&g_cancelled) < cancelled + 2; i++)
        usleep(10 * 1000);
    assert_int_equal(atomic_load(&g_cancelled), cancelled + 2);
}

static void test_hang_up_cancels(void **state)
{
    fixture_t *f = *state;
    int before = atomic_load(&g_cancelled);
    for (int stream = 0; stream < 2; stream++) {
        char body[128], head[256];
        snprintf(body, sizeof(body), "{\"prompt\":\"hang\",\"stream\":%s}",
                 stream ? "true" : "false");
        int hn = snprintf(head, sizeof(head),
                          "POST /v1/completions HTTP/1.1\r\nContent-Length: %zu\r\n\r\n%s",
                          strlen(body), body);
        int s = connect_to(f->port);
        send_all(s, head, (size_t)hn);
        usleep(200 * 1000);
        close(s);
        for (int i = 0; i < 500 && atomic_load(&g_cancelled) < before + stream + 1; i++)
            usleep(10 * 1000);
        assert_int_equal(atomic_load(&g_cancelled), before + stream + 1);
    }
}

static void test_keep_alive_and_routes(void **state)
{
    fixture_t *f = *state;
    // Four requests on one connection, pipelined: models, health, an unknown route, a wrong
    // method; the last closes.
    static const char k_reqs[] = "GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"
                                 "GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
                                 "GET /v2/nothing HTTP/1.1\r\nHost: t\r\n\r\n"
                                 "DELETE /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n";
    int s = connect_to(f->port);
    send_all(s, k_reqs, sizeof(k_reqs) - 1);
    char *resp = read_to_eof(s, NULL);
    close(s);
    const char *p = resp;
    static const int k_want[] = {200, 200, 404, 405};
    for (int i = 0; i < 4; i++) {
        p = strstr(p, "HTTP/1.1 ");
        assert_non_null(p);
        assert_int_equal(status_of(p), k_want[i]);
        p += 9;
    }
    assert_null(strstr(p, "HTTP/1.1 "));
    assert_non_null(strstr(resp, "\"id\":\"fake\""));
    // Counted by route and status.
    char *text;
    size_t len;
    assert_int_equal(fy_metrics_render(f->metrics, &text, &len), FY_OK);
    assert_non_null(strstr(text, "ferry_http_requests_total{route=\"/v1/models\",code=\"200\"} 1"));
    assert_non_null(strstr(text, "ferry_http_requests_total{route=\"/health\",code=\"200\"} 1"));
    assert_non_null(strstr(text, "ferry_http_requests_total{route=\"other\",code=\"404\"} 1"));
    assert_non_null(strstr(text, "ferry_http_requests_total{route=\"/v1/models\",code=\"405\"} 1"));
    assert_non_null(strstr(text, "ferry_http_connections "));
    free(text);
    assert_non_null(strstr(resp, "\"max_model_len\":4096"));
    free(resp);
    // One model by id (percent-encoded or not); an unknown one is 404.
    static const struct {
        const char *path;
        int want;
    } k_models[] = {{"/v1/models/fake", 200}, {"/v1/models/f%61ke", 200}, {"/v1/models/nope", 404}};
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_models); i++) {
        resp = exchange(f->port, "GET", k_models[i].path, NULL, "1.1");
        assert_int_equal(status_of(resp), k_models[i].want);
        cJSON *j = cJSON_Parse(body_of(resp));
        if (k_models[i].want == 200) {
            assert_string_equal(str_at(j, "id"), "fake");
            assert_string_equal(str_at(j, "object"), "model");
        } else {
            assert_non_null(strstr(str_at(j, "error.message"), "'nope' does not exist"));
        }
        cJSON_Delete(j);
        free(resp);
    }
    // Expect: 100-continue gets its interim answer before the body is sent.
    static const char k_body[] = "{\"prompt\":\"p\"}";
    char head[256];
    int hn = snprintf(head, sizeof(head),
                      "POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                      sizeof(k_body) - 1);
    s = connect_to(f->port);
    send_all(s, head, (size_t)hn);
    char interim[64] = "";
    ssize_t n = recv(s, interim, sizeof(interim) - 1, 0);
    assert_true(n > 0);
    assert_string_equal(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    send_all(s, k_body, sizeof(k_body) - 1);
    resp = read_to_eof(s, NULL);
    close(s);
    assert_int_equal(status_of(resp), 200);
    free(resp);
    // Over max_body (4096): 413 and the connection closes.
    char *big = malloc(8192);
    memset(big, ' ', 8191);
    big[8191] = '\0';
    resp = exchange(f->port, "POST", "/v1/completions", big, "1.1");
    assert_int_equal(status_of(resp), 413);
    free(resp);
    free(big);
}

static void test_unreachable_upstream(void **state)
{
    fixture_t *f = *state;
    char *resp = exchange(f->orphan_port, "POST", "/v1/chat/completions",
                          "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", "1.1");
    assert_int_equal(status_of(resp), 503);
    cJSON *j = cJSON_Parse(body_of(resp));
    assert_string_equal(str_at(j, "error.type"), "service_unavailable");
    cJSON_Delete(j);
    free(resp);
    resp = exchange(f->orphan_port, "GET", "/health", NULL, "1.1");
    assert_int_equal(status_of(resp), 503);
    free(resp);
}

static void test_api_key(void **state)
{
    fixture_t *f = *state;
    static const struct {
        const char *headers;
        int want;
    } k_cases[] = {
        {"", 401},
        {"Authorization: Bearer s3cret\r\n", 401},
        {"Authorization: Bearer s3cret key!\r\n", 401},
        {"Authorization: Basic s3cret key\r\n", 401},
        {"Authorization: Bearer s3cret key\r\nAuthorization: Bearer s3cret key\r\n", 401},
        {"Authorization: Bearer s3cret key\r\n", 200},
        {"authorization: bearer s3cret key\r\n", 200},
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cases); i++) {
        char *resp = exchange_with(f->keyed_port, k_cases[i].headers, "POST", "/v1/completions",
                                   "{\"prompt\":\"p\"}", "1.1");
        if (status_of(resp) != k_cases[i].want)
            fail_msg("case %zu: %d, want %d", i, status_of(resp), k_cases[i].want);
        if (k_cases[i].want == 401)
            assert_non_null(strstr(resp, "\"type\":\"authentication_error\""));
        free(resp);
    }
    // The model list needs the key too; the health check does not.
    char *resp = exchange(f->keyed_port, "GET", "/v1/models", NULL, "1.1");
    assert_int_equal(status_of(resp), 401);
    free(resp);
    resp = exchange(f->keyed_port, "GET", "/health", NULL, "1.1");
    assert_int_equal(status_of(resp), 200);
    free(resp);
}

static void test_idle_connection_closes(void **state)
{
    fixture_t *f = *state;
    int s = connect_to(f->brief_port);
    char c;
    assert_int_equal(recv(s, &c, 1, 0), 0); // closed by the server after 300 ms
    close(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_answer),
        cmocka_unit_test(test_completion_stream),
        cmocka_unit_test(test_chat_stream_roles),
        cmocka_unit_test(test_tool_calls),
        cmocka_unit_test(test_upstream_errors),
        cmocka_unit_test(test_several_choices),
        cmocka_unit_test(test_hang_up_cancels),
        cmocka_unit_test(test_keep_alive_and_routes),
        cmocka_unit_test(test_unreachable_upstream),
        cmocka_unit_test(test_api_key),
        cmocka_unit_test(test_idle_connection_closes),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
