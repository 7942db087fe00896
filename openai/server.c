/*
 * server.c: the OpenAI front's HTTP/1.1 server on libuv (see openai.h).
 *
 * A connection reads requests one at a time (oai_reader_t); each POST becomes one Generate
 * call upstream through the client SDK, answered as one JSON object or, with "stream": true,
 * as server-sent events in a chunked body. Bytes that arrive while a request is in flight wait
 * in the connection's buffer (pipelining); reading continues meanwhile, so that a client that
 * hangs up cancels its generation at once. A client that does not read its stream (more than
 * OAI_MAX_QUEUED bytes unsent) is cut off the same way.
 *
 * Lifetimes: the server owns its connections; a connection owns its request in flight. A
 * connection's memory goes when both its handles (socket and idle timer) have closed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ferry_client.h"
#include "openai_int.h"
#include "rpc.h"

#define OAI_MAX_QUEUED (16u << 20) // unsent answer bytes a connection may hold
#define OAI_READ_CHUNK 65536

// EX_LOCAL: answered here without an upstream call (errors, refusals, unknown routes).
typedef enum { EX_NONE, EX_LOCAL, EX_GENERATE, EX_MODELS, EX_HEALTH } oai_ex_t;

typedef struct oai_conn oai_conn_t;

struct oai_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    ferry_client_t *client;
    oai_server_params_t params;
    char model_name[128];
    char api_key[257]; // "" = no authentication
    int port;
    rpc_tls_t *tls, *upstream_tls; // HTTPS (tls_cert), TLS to the upstream (upstream_tls_ca)
    oai_conn_t *conns; // open connections (doubly linked)
    size_t n_conns;
    fy_metric_t *connections; // gauge, or NULL
};

/* One choice of a generation: one Generate call upstream. */
typedef struct {
    oai_conn_t *conn;
    uint32_t index;
    ferry_call_t *call; // NULL once its done callback ran
    char *text;         // non-streamed answer so far: [text_cap], text_len used
    size_t text_len, text_cap;
    Ferry__V1__FinishReason finish;
    Ferry__V1__RequestStats *stats; // unpacked copy of the last message's
    bool finish_sent;               // its last stream chunk (with the reason) went out
    cJSON *logprobs;                // non-streamed answer's, with req.logprobs
    size_t lp_offset;               // completions' text_offset so far
    bool echoed;                    // req.echo: the prompt went into text (and logprobs)
    uint32_t prompt;                // completions: the prompt it answers (req.texts / ids)
    // With tools (oai_tools_active): text holds the whole answer, streamed included.
    size_t streamed;   // bytes of text a stream has sent as content
    cJSON *tool_calls; // the calls read from the answer once it ended, or NULL
} oai_choice_t;

struct oai_conn {
    oai_server_t *srv;
    oai_conn_t *prev, *next;
    uv_tcp_t tcp;
    uv_timer_t idle;
    rpc_tls_conn_t *tls; // with the server's tls: every byte in and out goes through it
    int handles_open;
    bool closing, reading, in_process, close_after_write, continue_sent, chunked;
    size_t writes_pending;
    oai_reader_t reader;
    char *pending; // [pending_cap] bytes read, not yet fed: pending_off .. pending_len
    size_t pending_off, pending_len, pending_cap;
    char rbuf[OAI_READ_CHUNK];
    // The exchange in flight (ex != EX_NONE):
    oai_ex_t ex;
    const char *route;  // its metrics label: a known path or "other"
    ferry_call_t *call; // a unary call (models, health)
    oai_request_t req;
    bool keep_alive, headers_sent, upstream_serving;
    char id[OAI_MAX_ID];
    int64_t created;
    oai_choice_t choices[OAI_MAX_CHOICES]; // a generation's, req.n_choices of them
    uint32_t running;                  // choices whose call has not ended
    bool cancelling;                   // inside cancel_choices: done callbacks only count down
    int error_code;                    // the first failed choice's gRPC code, 0 = none
    char error[256];                   // ... and message
    char *answer;                      // a unary answer's body (models), malloc'd
    char model_id[OAI_MAX_TARGET + 1]; // GET /v1/models/{id}: the id, decoded; "" for the list
};

static void conn_process(oai_conn_t *c);
static void conn_close(oai_conn_t *c);

/* ---- writing ------------------------------------------------------------------------------ */

typedef struct {
    uv_write_t req;
    oai_conn_t *conn;
    char data[];
} oai_write_t;

static void on_written(uv_write_t *req, int status)
{
    oai_write_t *w = (oai_write_t *)req;
    oai_conn_t *c = w->conn;
    free(w);
    c->writes_pending--;
    if (c->closing)
        return;
    if (status < 0) {
        FY_LOG_DEBUG(OAI_MODULE, "write: %s", uv_strerror(status));
        conn_close(c);
    } else if (c->close_after_write && c->writes_pending == 0) {
        conn_close(c);
    }
}

/* Writes w's first n bytes to the socket (w is taken). */
static void socket_write(oai_conn_t *c, oai_write_t *w, size_t n)
{
    w->conn = c;
    uv_buf_t buf = uv_buf_init(w->data, (unsigned)n);
    int rv = uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_written);
    if (rv != 0) {
        free(w);
        conn_close(c);
        return;
    }
    c->writes_pending++;
}

/* Writes the ciphertext TLS has for the socket (records, handshake messages, alerts). */
static void tls_flush(oai_conn_t *c)
{
    size_t n;
    while (!c->closing && (n = rpc_tls_conn_pending(c->tls)) > 0) {
        oai_write_t *w = malloc(sizeof(*w) + n);
        if (w == NULL) {
            conn_close(c);
            return;
        }
        socket_write(c, w, rpc_tls_conn_take(c->tls, (uint8_t *)w->data, n));
    }
}

/* Sends the concatenation of up to three pieces (NULL pieces are skipped). */
static void conn_send3(oai_conn_t *c, const char *a, size_t an, const char *b, size_t bn,
                       const char *d, size_t dn)
{
    if (c->closing)
        return;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > OAI_MAX_QUEUED) {
        FY_LOG_WARN(OAI_MODULE, "client is not reading its answer: closing the connection");
        conn_close(c);
        return;
    }
    size_t n = (a ? an : 0) + (b ? bn : 0) + (d ? dn : 0);
    oai_write_t *w = malloc(sizeof(*w) + n + 1);
    if (w == NULL) {
        conn_close(c);
        return;
    }
    size_t off = 0;
    if (a)
        memcpy(w->data, a, an), off += an;
    if (b)
        memcpy(w->data + off, b, bn), off += bn;
    if (d)
        memcpy(w->data + off, d, dn), off += dn;
    if (c->tls == NULL) {
        socket_write(c, w, n);
        return;
    }
    fy_status_t st = rpc_tls_conn_send(c->tls, (const uint8_t *)w->data, n);
    free(w);
    if (st != FY_OK) {
        conn_close(c);
        return;
    }
    tls_flush(c);
}

static void conn_send(oai_conn_t *c, const char *s, size_t n)
{
    conn_send3(c, s, n, NULL, 0, NULL, 0);
}

/* Counts an answer by route and status (the status line's, so 200 for a stream that failed
 * later). */
static void count_answer(oai_conn_t *c, int status)
{
    fy_metrics_t *m = c->srv->params.metrics;
    if (m == NULL)
        return;
    char labels[96];
    snprintf(labels, sizeof(labels), "route=\"%s\",code=\"%d\"", c->route ? c->route : "other",
             status);
    fy_metric_inc(fy_metrics_counter(m, "ferry_http_requests_total", labels,
                                     "OpenAI-compatible API requests answered"));
}

/* Closes the connection once what was sent is written (at once when nothing is pending). */
static void close_when_written(oai_conn_t *c)
{
    c->close_after_write = true;
    if (c->writes_pending == 0)
        conn_close(c);
}

/* A whole answer with a body; the connection stays open when keep_alive. */
static void respond(oai_conn_t *c, int status, const char *type, const char *body, size_t len,
                    bool keep_alive)
{
    count_answer(c, status);
    char head[256];
    int hn =
        snprintf(head, sizeof(head),
                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                 "Connection: %s\r\n\r\n",
                 status, oai_status_text(status), type, len, keep_alive ? "keep-alive" : "close");
    conn_send3(c, head, (size_t)hn, body, len, NULL, 0);
    if (!keep_alive)
        close_when_written(c);
}

static void respond_json(oai_conn_t *c, int status, char *json, bool keep_alive)
{
    if (json == NULL) {
        static const char k_oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                    "\"server_error\",\"param\":null,\"code\":500}}";
        respond(c, 500, "application/json", k_oom, sizeof(k_oom) - 1, false);
        return;
    }
    respond(c, status, "application/json", json, strlen(json), keep_alive);
    free(json);
}

static void respond_error(oai_conn_t *c, int status, const char *message, bool keep_alive)
{
    respond_json(c, status, oai_render_error(status, message), keep_alive);
}

/* One server-sent event: "data: <payload>\n\n", in a chunk when the body is chunked. */
static void send_event(oai_conn_t *c, const char *payload, size_t n)
{
    if (payload == NULL) {
        conn_close(c);
        return;
    }
    char head[32];
    int hn = c->chunked ? snprintf(head, sizeof(head), "%zx\r\ndata: ", n + 8)
                        : snprintf(head, sizeof(head), "data: ");
    conn_send3(c, head, (size_t)hn, payload, n, c->chunked ? "\n\n\r\n" : "\n\n",
               c->chunked ? 4 : 2);
}

static void send_event_json(oai_conn_t *c, char *json)
{
    send_event(c, json, json ? strlen(json) : 0);
    free(json);
}

/* ---- the exchange in flight --------------------------------------------------------------- */

static const char *answer_model(const oai_conn_t *c)
{
    return c->req.model && c->req.model[0] ? c->req.model : c->srv->model_name;
}

/* Ends the exchange; reads the next request unless the connection closes. */
static void exchange_end(oai_conn_t *c)
{
    oai_request_clear(&c->req);
    for (uint32_t i = 0; i < OAI_MAX_CHOICES; i++) {
        oai_choice_t *ch = &c->choices[i];
        free(ch->text);
        cJSON_Delete(ch->logprobs);
        cJSON_Delete(ch->tool_calls);
        if (ch->stats)
            ferry__v1__request_stats__free_unpacked(ch->stats, NULL);
        memset(ch, 0, sizeof(*ch));
    }
    c->running = 0;
    c->error_code = 0;
    c->error[0] = '\0';
    free(c->answer);
    c->answer = NULL;
    c->ex = EX_NONE;
    c->route = NULL;
    c->model_id[0] = '\0';
    c->call = NULL;
    c->headers_sent = c->upstream_serving = false;
    if (c->closing)
        return;
    if (!c->keep_alive) {
        close_when_written(c);
        return;
    }
    oai_reader_next(&c->reader);
    c->continue_sent = false;
    uv_timer_again(&c->idle);
    if (!c->in_process)
        conn_process(c);
}

static void start_stream(oai_conn_t *c)
{
    c->headers_sent = true;
    count_answer(c, 200);
    c->chunked = c->reader.parser.http_major == 1 && c->reader.parser.http_minor >= 1;
    if (!c->chunked)
        c->keep_alive = false; // HTTP/1.0: the body ends with the connection
    char head[256];
    int hn = snprintf(head, sizeof(head),
                      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      "Cache-Control: no-cache\r\n%sConnection: %s\r\n\r\n",
                      c->chunked ? "Transfer-Encoding: chunked\r\n" : "",
                      c->keep_alive ? "keep-alive" : "close");
    conn_send(c, head, (size_t)hn);
    for (uint32_t i = 0; i < c->req.n_choices && c->req.kind == OAI_CHAT; i++) // the role first
        send_event_json(c, oai_render_chunk(OAI_CHAT, c->id, c->created, answer_model(c), i,
                                            "assistant", "", 0, NULL, NULL, c->req.include_usage));
}

static void keep_stats(oai_choice_t *ch, const Ferry__V1__RequestStats *st)
{
    size_t n = protobuf_c_message_get_packed_size(&st->base);
    uint8_t *buf = malloc(n ? n : 1);
    if (buf == NULL)
        return;
    protobuf_c_message_pack(&st->base, buf);
    if (ch->stats)
        ferry__v1__request_stats__free_unpacked(ch->stats, NULL);
    ch->stats = ferry__v1__request_stats__unpack(NULL, n, buf);
    free(buf);
}

/* Appends n bytes of text to a non-streamed choice's answer; false without memory. */
static bool choice_text(oai_choice_t *ch, const char *text, size_t n)
{
    if (ch->text_len + n + 1 > ch->text_cap) {
        size_t cap = FY_MAX(FY_MAX(ch->text_cap * 2, ch->text_len + n + 1), (size_t)256);
        char *t = realloc(ch->text, cap);
        if (t == NULL)
            return false;
        ch->text = t;
        ch->text_cap = cap;
    }
    if (n > 0)
        memcpy(ch->text + ch->text_len, text, n);
    ch->text_len += n;
    return true;
}

/* echo, on a choice's first message: the prompt into the text (as sent, or its tokens' bytes
 * for a prompt of token ids) and its tokens into logprobs, ahead of the completion's. */
static bool echo_prompt(oai_conn_t *c, oai_choice_t *ch, const Ferry__V1__GenerateResponse *r)
{
    ch->echoed = true;
    const char *text = c->req.texts[ch->prompt];
    if (text != NULL) {
        if (!choice_text(ch, text, strlen(text)))
            return false;
    } else {
        // The tokens' bytes together (a character may span tokens), then made valid UTF-8.
        size_t len = 0;
        for (size_t i = 0; i < r->n_prompt_logprobs; i++)
            len += r->prompt_logprobs[i]->token.len;
        uint8_t *raw = malloc(len + 1);
        char *t = malloc(3 * len + 1);
        bool ok = raw != NULL && t != NULL;
        for (size_t i = 0, off = 0; ok && i < r->n_prompt_logprobs; i++) {
            const ProtobufCBinaryData *b = &r->prompt_logprobs[i]->token;
            if (b->len > 0)
                memcpy(raw + off, b->data, b->len);
            off += b->len;
        }
        ok = ok && choice_text(ch, t, oai_utf8_sanitize(raw, len, t));
        free(raw);
        free(t);
        if (!ok)
            return false;
    }
    if (!c->req.logprobs || r->n_prompt_logprobs == 0)
        return true;
    return (ch->logprobs != NULL || (ch->logprobs = oai_logprobs_new(c->req.kind)) != NULL) &&
           oai_logprobs_add(ch->logprobs, c->req.kind, r->prompt_logprobs, r->n_prompt_logprobs,
                            &ch->lp_offset);
}

/* The request's tools may be called: answers are read for calls. */
static bool with_tools(const oai_conn_t *c)
{
    return c->req.kind == OAI_CHAT && oai_tools_active(&c->req);
}

/* A choice's answer has ended (stopped, not cut by max_tokens): its calls into ch->tool_calls,
 * and the length of the content before them. */
static size_t read_calls(oai_conn_t *c, oai_choice_t *ch)
{
    size_t content = ch->text_len;
    cJSON_Delete(ch->tool_calls);
    ch->tool_calls = NULL;
    if (ch->finish != FERRY__V1__FINISH_REASON__FINISH_REASON_STOP)
        return content; // cut short: the text as it stands
    char prefix[48];
    snprintf(prefix, sizeof(prefix), "call_%.16s%02x", c->id + strcspn(c->id, "-") + 1,
             ch->index & 0xff);
    ch->tool_calls =
        oai_tools_extract(&c->req, ch->text ? ch->text : "", ch->text_len, prefix, &content);
    return content;
}

static void on_generate_msg(ferry_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    oai_choice_t *ch = arg;
    oai_conn_t *c = ch->conn;
    const Ferry__V1__GenerateResponse *r = (const Ferry__V1__GenerateResponse *)msg;
    if (c->closing || c->error_code != 0)
        return;
    if (r->finish_reason != FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED)
        ch->finish = r->finish_reason;
    if (r->stats != NULL)
        keep_stats(ch, r->stats);
    size_t n = r->text ? strlen(r->text) : 0;
    const bool lps = c->req.logprobs && r->n_logprobs > 0;
    if (c->req.stream) {
        if (!c->headers_sent)
            start_stream(c);
        if (c->req.echo && !ch->echoed) { // the prompt, in a chunk of its own
            if (!echo_prompt(c, ch, r)) {
                ferry_call_cancel(call);
                return;
            }
            send_event_json(c, oai_render_chunk(c->req.kind, c->id, c->created, answer_model(c),
                                                ch->index, NULL, ch->text ? ch->text : "",
                                                ch->text_len, ch->logprobs, NULL,
                                                c->req.include_usage));
            ch->text_len = 0;
            cJSON_Delete(ch->logprobs);
            ch->logprobs = NULL;
        }
        cJSON *lp = lps ? oai_logprobs_new(c->req.kind) : NULL;
        if (lps && (lp == NULL || !oai_logprobs_add(lp, c->req.kind, r->logprobs, r->n_logprobs,
                                                    &ch->lp_offset))) {
            cJSON_Delete(lp);
            ferry_call_cancel(call);
            return;
        }
        const char *text = r->text ? r->text : "";
        if (with_tools(c)) { // only what surely is no call goes out now
            if (!choice_text(ch, text, n)) {
                cJSON_Delete(lp);
                ferry_call_cancel(call);
                return;
            }
            size_t sure = oai_tools_streamable(&c->req, ch->text, ch->text_len);
            text = ch->text + ch->streamed;
            n = sure > ch->streamed ? sure - ch->streamed : 0;
            ch->streamed += n;
        }
        if (n > 0 || lps)
            send_event_json(c, oai_render_chunk(c->req.kind, c->id, c->created, answer_model(c),
                                                ch->index, NULL, text, n, lp, NULL,
                                                c->req.include_usage));
        cJSON_Delete(lp);
        return;
    }
    if (c->req.echo && !ch->echoed && !echo_prompt(c, ch, r)) {
        ferry_call_cancel(call);
        return;
    }
    if (lps && ((ch->logprobs == NULL && (ch->logprobs = oai_logprobs_new(c->req.kind)) == NULL) ||
                !oai_logprobs_add(ch->logprobs, c->req.kind, r->logprobs, r->n_logprobs,
                                  &ch->lp_offset))) {
        ferry_call_cancel(call);
        return;
    }
    if (!choice_text(ch, r->text, n))
        ferry_call_cancel(call);
}

/* A choice's last stream chunk: no text, its finish reason. With tools, first the content held
 * back and the calls. */
static void send_finish_chunk(oai_conn_t *c, oai_choice_t *ch)
{
    ch->finish_sent = true;
    if (with_tools(c)) {
        size_t content = read_calls(c, ch);
        if (content > ch->streamed)
            send_event_json(c, oai_render_chunk(OAI_CHAT, c->id, c->created, answer_model(c),
                                                ch->index, NULL, ch->text + ch->streamed,
                                                content - ch->streamed, NULL, NULL,
                                                c->req.include_usage));
        ch->streamed = FY_MAX(ch->streamed, content);
        if (ch->tool_calls != NULL)
            send_event_json(c, oai_render_tool_chunk(c->id, c->created, answer_model(c), ch->index,
                                                     ch->tool_calls, c->req.include_usage));
    }
    send_event_json(
        c,
        oai_render_chunk(c->req.kind, c->id, c->created, answer_model(c), ch->index, NULL, "", 0,
                         NULL, ch->tool_calls != NULL ? "tool_calls" : oai_finish_name(ch->finish),
                         c->req.include_usage));
}

/* Cancels the choices still running (their done callbacks only count down meanwhile). */
static void cancel_choices(oai_conn_t *c)
{
    c->cancelling = true;
    for (uint32_t i = 0; i < c->req.n_choices; i++)
        if (c->choices[i].call != NULL)
            ferry_call_cancel(c->choices[i].call);
    c->cancelling = false;
}

/* The usage of all choices into *sum: each prompt once, the completions and KV bytes summed.
 * Returns sum, or NULL when no choice reported any. */
static const Ferry__V1__RequestStats *sum_stats(const oai_conn_t *c, Ferry__V1__RequestStats *sum)
{
    ferry__v1__request_stats__init(sum);
    bool first = true;
    uint32_t prompt_tokens = 0;
    for (uint32_t i = 0; i < c->req.n_choices; i++) {
        const Ferry__V1__RequestStats *st = c->choices[i].stats;
        if (st == NULL)
            continue;
        if (first) {
            *sum = *st; // the first choice's figures (policy, times)
            sum->completion_tokens = sum->kv_raw_bytes = sum->kv_wire_bytes = 0;
            first = false;
        }
        if (i % c->req.n == 0) // a prompt's first choice: its prompt
            prompt_tokens += st->prompt_tokens;
        sum->completion_tokens += st->completion_tokens;
        sum->kv_raw_bytes += st->kv_raw_bytes;
        sum->kv_wire_bytes += st->kv_wire_bytes;
    }
    sum->prompt_tokens = prompt_tokens;
    return first ? NULL : sum;
}

/* Every choice has ended: the answer (or the first error). */
static void finish_generation(oai_conn_t *c)
{
    Ferry__V1__RequestStats sum;
    const Ferry__V1__RequestStats *st = sum_stats(c, &sum);
    if (!c->req.stream) {
        if (c->error_code == 0) {
            oai_choice_out_t out[OAI_MAX_CHOICES];
            for (uint32_t i = 0; i < c->req.n_choices; i++) {
                oai_choice_t *ch = &c->choices[i];
                size_t len = with_tools(c) ? read_calls(c, ch) : ch->text_len;
                out[i] =
                    (oai_choice_out_t){ch->text, len, ch->finish, ch->logprobs, ch->tool_calls};
            }
            respond_json(c, 200,
                         oai_render_completion(c->req.kind, c->id, c->created, answer_model(c), out,
                                               c->req.n_choices, st),
                         c->keep_alive);
        } else {
            respond_error(c, oai_http_status(c->error_code), c->error, c->keep_alive);
        }
        exchange_end(c);
        return;
    }
    if (!c->headers_sent) {
        if (c->error_code != 0) {
            respond_error(c, oai_http_status(c->error_code), c->error, c->keep_alive);
            exchange_end(c);
            return;
        }
        start_stream(c);
    }
    for (uint32_t i = 0; i < c->req.n_choices && c->error_code == 0; i++)
        if (!c->choices[i].finish_sent) // ended before the stream began
            send_finish_chunk(c, &c->choices[i]);
    if (c->error_code == 0 && c->req.include_usage)
        send_event_json(
            c, oai_render_usage_chunk(c->req.kind, c->id, c->created, answer_model(c), st));
    else if (c->error_code != 0) // too late for a status: an event, as vLLM sends it
        send_event_json(c, oai_render_error(oai_http_status(c->error_code), c->error));
    send_event(c, "[DONE]", 6);
    if (c->chunked)
        conn_send(c, "0\r\n\r\n", 5);
    exchange_end(c);
}

static void on_generate_done(ferry_call_t *call, int code, const char *message, void *arg)
{
    oai_choice_t *ch = arg;
    oai_conn_t *c = ch->conn;
    ch->call = NULL; // over: never cancelled again, whatever the answer's writes do
    c->running--;
    if (code != 0 && c->error_code == 0 && !c->closing) {
        FY_LOG_DEBUG(OAI_MODULE, "%s/%u: %s %s", c->id, ch->index, ferry_code_name(code), message);
        c->error_code = code;
        snprintf(c->error, sizeof(c->error), "%s", message ? message : ferry_code_name(code));
        if (!c->cancelling)
            cancel_choices(c); // one failed: the answer is that error
    } else if (code == 0 && c->req.stream && c->headers_sent && !c->closing && c->error_code == 0) {
        send_finish_chunk(c, ch);
    }
    if (c->cancelling || c->running > 0)
        return;
    if (c->closing) {
        exchange_end(c);
        return;
    }
    finish_generation(c);
}

static void on_unary_msg(ferry_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    oai_conn_t *c = arg;
    if (c->closing)
        return;
    if (c->ex == EX_MODELS) {
        const Ferry__V1__ListModelsResponse *lm = (const Ferry__V1__ListModelsResponse *)msg;
        free(c->answer);
        c->answer = NULL;
        if (c->model_id[0] == '\0')
            c->answer = oai_render_models(lm);
        for (size_t i = 0; c->model_id[0] != '\0' && i < lm->n_models; i++)
            if (lm->models[i]->name && strcmp(lm->models[i]->name, c->model_id) == 0)
                c->answer = oai_render_model(lm->models[i]);
    } else {
        const Ferry__V1__HealthResponse *h = (const Ferry__V1__HealthResponse *)msg;
        c->upstream_serving = h->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
    }
}

static void on_unary_done(ferry_call_t *call, int code, const char *message, void *arg)
{
    oai_conn_t *c = arg;
    c->call = NULL;
    if (c->closing) {
        exchange_end(c);
        return;
    }
    if (c->ex == EX_HEALTH) {
        bool ok = code == 0 && c->upstream_serving;
        respond(c, ok ? 200 : 503, "text/plain; charset=utf-8", ok ? "ok\n" : "unavailable\n",
                ok ? 3 : 12, c->keep_alive);
    } else if (code != 0) {
        respond_error(c, oai_http_status(code), message, c->keep_alive);
    } else if (c->answer == NULL && c->model_id[0] != '\0') {
        char m[160];
        snprintf(m, sizeof(m), "model '%.128s' does not exist", c->model_id);
        respond_error(c, 404, m, c->keep_alive);
    } else {
        respond_json(c, 200, c->answer, c->keep_alive);
        c->answer = NULL;
    }
    exchange_end(c);
}

static void make_id(oai_conn_t *c, const char *prefix)
{
    uint8_t rnd[16];
    if (uv_random(NULL, NULL, rnd, sizeof(rnd), 0, NULL) != 0) {
        uint64_t t = (uint64_t)fy_clock_ns() ^ (uint64_t)(uintptr_t)c;
        for (size_t i = 0; i < sizeof(rnd); i++)
            rnd[i] = (uint8_t)(t >> (8 * (i % 8))) ^ (uint8_t)(i * 37);
    }
    int n = snprintf(c->id, sizeof(c->id), "%s", prefix);
    for (size_t i = 0; i < sizeof(rnd) && n + 2 < (int)sizeof(c->id); i++)
        n += snprintf(c->id + n, sizeof(c->id) - (size_t)n, "%02x", rnd[i]);
}

static void start_generate(oai_conn_t *c, oai_kind_t kind)
{
    char err[256] = "";
    oai_reader_t *r = &c->reader;
    int status = oai_request_parse(&c->req, kind, r->body, r->body_len, err, sizeof(err));
    if (status != 0) {
        respond_error(c, status, err, c->keep_alive);
        exchange_end(c);
        return;
    }
    make_id(c, kind == OAI_CHAT ? "chatcmpl-" : "cmpl-");
    c->created = (int64_t)time(NULL);
    // One Generate call a choice: choice i is prompt i / n's (i % n)-th; with several each has
    // its own request id and, when seeded, seed + i % n (the message is packed when the call
    // starts, so it can change between calls).
    ferry_call_opts_t o = {.timeout_ms = c->srv->params.request_timeout_ms};
    uint64_t seed = c->req.sampling.seed;
    char rid[OAI_MAX_ID + 16];
    for (uint32_t i = 0; i < c->req.n_choices; i++) {
        oai_choice_t *ch = &c->choices[i];
        ch->conn = c;
        ch->index = i;
        ch->prompt = i / c->req.n;
        snprintf(rid, sizeof(rid), c->req.n_choices > 1 ? "%s-%u" : "%s", c->id, i);
        c->req.msg.request_id = rid;
        if (kind == OAI_COMPLETION)
            oai_request_select(&c->req, ch->prompt);
        if (c->req.has_seed)
            c->req.sampling.seed = seed + i % c->req.n;
        int rv = ferry_call_async(c->srv->client, "/ferry.v1.Ferry/Generate", &c->req.msg.base,
                                  &ferry__v1__generate_response__descriptor, &o, on_generate_msg,
                                  on_generate_done, ch, &ch->call);
        if (rv != 0) {
            ch->call = NULL;
            cancel_choices(c); // the ones started end now, counting down
            respond_error(c, 503, "cannot reach the router", c->keep_alive);
            exchange_end(c);
            return;
        }
        c->running++;
    }
    c->req.msg.request_id = NULL; // rid goes out of scope
}

static void start_unary(oai_conn_t *c, oai_ex_t ex)
{
    static Ferry__V1__ListModelsRequest lm = FERRY__V1__LIST_MODELS_REQUEST__INIT;
    static Ferry__V1__HealthRequest hr = FERRY__V1__HEALTH_REQUEST__INIT;
    ferry_call_opts_t o = {.timeout_ms = 10000, .idempotent = true};
    int rv = ex == EX_MODELS
                 ? ferry_call_async(c->srv->client, "/ferry.v1.Ferry/ListModels", &lm.base,
                                    &ferry__v1__list_models_response__descriptor, &o, on_unary_msg,
                                    on_unary_done, c, &c->call)
                 : ferry_call_async(c->srv->client, "/ferry.v1.Ferry/Health", &hr.base,
                                    &ferry__v1__health_response__descriptor, &o, on_unary_msg,
                                    on_unary_done, c, &c->call);
    if (rv != 0) {
        respond_error(c, 503, "cannot reach the router", c->keep_alive);
        exchange_end(c);
    }
}

static bool path_is(const char *path, size_t n, const char *want)
{
    return n == strlen(want) && memcmp(path, want, n) == 0;
}

/* Whether the request may be served: no key set, or "Bearer <key>". */
static bool authorized(const oai_server_t *srv, const oai_reader_t *r)
{
    return srv->api_key[0] == '\0' ||
           (!r->auth_long && fy_bearer_ok(r->auth, r->auth_len, srv->api_key));
}

/* A whole request (or a reader error) is here: answer it. */
static void dispatch(oai_conn_t *c)
{
    oai_reader_t *r = &c->reader;
    uv_timer_stop(&c->idle);
    if (r->error) {
        c->keep_alive = false;
        c->ex = EX_LOCAL;
        respond_error(c, r->error, "malformed or oversized HTTP request", false);
        exchange_end(c);
        return;
    }
    c->keep_alive = r->keep_alive;
    size_t n;
    const char *path = oai_reader_path(r, &n);
    FY_LOG_DEBUG(OAI_MODULE, "%s %.*s (%zu body bytes)", r->method, (int)n, path, r->body_len);
    // The routes; a prefix route takes the rest of the path as its argument.
    static const struct {
        const char *path, *label, *method;
        bool prefix;
        oai_ex_t ex;
        oai_kind_t kind;
    } k_routes[] = {
        {"/v1/chat/completions", "/v1/chat/completions", "POST", false, EX_GENERATE, OAI_CHAT},
        {"/v1/completions", "/v1/completions", "POST", false, EX_GENERATE, OAI_COMPLETION},
        {"/v1/models", "/v1/models", "GET", false, EX_MODELS, 0},
        {"/v1/models/", "/v1/models/{id}", "GET", true, EX_MODELS, 0},
        {"/health", "/health", "GET", false, EX_HEALTH, 0},
        {"/healthz", "/healthz", "GET", false, EX_HEALTH, 0},
    };
    oai_ex_t ex = EX_NONE;
    oai_kind_t kind = OAI_COMPLETION;
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_routes) && c->route == NULL; i++) {
        size_t pl = strlen(k_routes[i].path);
        if (k_routes[i].prefix ? n <= pl || memcmp(path, k_routes[i].path, pl) != 0
                               : !path_is(path, n, k_routes[i].path))
            continue;
        c->route = k_routes[i].label;
        if (strcmp(r->method, k_routes[i].method) == 0)
            ex = k_routes[i].ex, kind = k_routes[i].kind;
        if (k_routes[i].prefix) {
            memcpy(c->model_id, path + pl, n - pl);
            oai_percent_decode(c->model_id, n - pl);
        }
    }
    c->ex = ex != EX_NONE ? ex : EX_LOCAL;
    if (ex != EX_HEALTH && !authorized(c->srv, r)) {
        respond_error(c, 401, "a valid API key is needed (Authorization: Bearer <key>)",
                      c->keep_alive);
        exchange_end(c);
    } else if (ex == EX_NONE) {
        char m[128];
        snprintf(m, sizeof(m), c->route ? "method %s is not allowed here" : "no route for %s %.64s",
                 r->method, r->target);
        respond_error(c, c->route ? 405 : 404, m, c->keep_alive);
        exchange_end(c);
    } else if (ex == EX_GENERATE) {
        start_generate(c, kind);
    } else {
        start_unary(c, ex);
    }
}

/* ---- reading ------------------------------------------------------------------------------ */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    oai_conn_t *c = h->data;
    *buf = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static size_t pending_limit(const oai_conn_t *c)
{
    return (size_t)c->srv->params.max_body + OAI_MAX_HEAD + OAI_READ_CHUNK;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Feeds buffered bytes to the reader and answers whole requests, one at a time. */
static void conn_process(oai_conn_t *c)
{
    c->in_process = true;
    while (!c->closing && !c->close_after_write && c->ex == EX_NONE &&
           c->pending_off < c->pending_len) {
        oai_reader_t *r = &c->reader;
        size_t used =
            oai_reader_feed(r, c->pending + c->pending_off, c->pending_len - c->pending_off);
        c->pending_off += used;
        if (r->complete || r->error) {
            dispatch(c);
            continue;
        }
        if (r->expect_continue && !c->continue_sent) {
            c->continue_sent = true;
            static const char k_continue[] = "HTTP/1.1 100 Continue\r\n\r\n";
            conn_send(c, k_continue, sizeof(k_continue) - 1);
        }
        if (used == 0)
            break;
    }
    if (c->pending_off == c->pending_len)
        c->pending_off = c->pending_len = 0;
    c->in_process = false;
    if (!c->closing && !c->reading && c->pending_len - c->pending_off < pending_limit(c) / 2) {
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
        if (!c->reading)
            conn_close(c);
    }
}

/* The connection's plaintext: buffered, and read as requests when none is in flight. */
static fy_status_t conn_input(void *arg, const uint8_t *data, size_t nread)
{
    oai_conn_t *c = arg;
    if (c->closing || c->close_after_write)
        return FY_ERR_CLOSED;
    if (c->ex == EX_NONE)
        uv_timer_again(&c->idle);
    if (c->pending_off > 0 && c->pending_off == c->pending_len)
        c->pending_off = c->pending_len = 0;
    if (c->pending_off > 0 && c->pending_len + (size_t)nread > c->pending_cap) {
        memmove(c->pending, c->pending + c->pending_off, c->pending_len - c->pending_off);
        c->pending_len -= c->pending_off;
        c->pending_off = 0;
    }
    if (c->pending_len + (size_t)nread > c->pending_cap) {
        size_t cap = FY_MAX(c->pending_cap * 2, c->pending_len + (size_t)nread);
        char *p = realloc(c->pending, cap);
        if (p == NULL) {
            conn_close(c);
            return FY_ERR_CLOSED;
        }
        c->pending = p;
        c->pending_cap = cap;
    }
    memcpy(c->pending + c->pending_len, data, (size_t)nread);
    c->pending_len += (size_t)nread;
    if (c->reading && c->pending_len - c->pending_off >= pending_limit(c)) {
        uv_read_stop((uv_stream_t *)&c->tcp); // a client far ahead of its answers: wait
        c->reading = false;
    }
    if (c->ex == EX_NONE)
        conn_process(c);
    return c->closing ? FY_ERR_CLOSED : FY_OK;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    oai_conn_t *c = s->data;
    if (c->closing)
        return;
    if (nread > 0 && c->close_after_write)
        return; // the answer ends the connection: nothing more is read
    if (nread < 0) {
        if (nread != UV_EOF)
            FY_LOG_DEBUG(OAI_MODULE, "read: %s", uv_strerror((int)nread));
        conn_close(c); // cancels a generation in flight
        return;
    }
    if (nread == 0)
        return;
    if (c->tls == NULL) {
        conn_input(c, (const uint8_t *)buf->base, (size_t)nread);
        return;
    }
    fy_status_t st =
        rpc_tls_conn_recv(c->tls, (const uint8_t *)buf->base, (size_t)nread, conn_input, c);
    if (c->closing)
        return;
    if (st == FY_ERR_TRANSPORT)
        FY_LOG_DEBUG(OAI_MODULE, "%s", rpc_tls_conn_error(c->tls));
    tls_flush(c); // handshake messages, or the alert
    if (st == FY_ERR_TRANSPORT || (st == FY_ERR_CLOSED && !c->close_after_write))
        close_when_written(c);
}

static void on_idle(uv_timer_t *t)
{
    oai_conn_t *c = t->data;
    if (c->ex == EX_NONE) {
        FY_LOG_DEBUG(OAI_MODULE, "closing an idle connection");
        conn_close(c);
    }
}

/* ---- connections -------------------------------------------------------------------------- */

static void on_conn_handle_closed(uv_handle_t *h)
{
    oai_conn_t *c = h->data;
    if (--c->handles_open > 0)
        return;
    oai_reader_cleanup(&c->reader);
    rpc_tls_conn_destroy(c->tls);
    free(c->pending);
    free(c);
}

static void conn_close(oai_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    if (c->call != NULL)
        ferry_call_cancel(c->call); // its done callback ends the exchange now
    cancel_choices(c);
    if (c->ex != EX_NONE)
        exchange_end(c); // a synchronous exchange (or one whose call never started)
    oai_server_t *srv = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->n_conns--;
    fy_metric_set(srv->connections, (double)srv->n_conns);
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->idle, on_conn_handle_closed);
}

static void on_connection(uv_stream_t *listener, int status)
{
    oai_server_t *srv = listener->data;
    if (status < 0) {
        FY_LOG_WARN(OAI_MODULE, "accept: %s", uv_strerror(status));
        return;
    }
    oai_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->srv = srv;
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->idle);
    c->tcp.data = c->idle.data = c;
    c->handles_open = 2;
    oai_reader_init(&c->reader, srv->params.max_body);
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->n_conns++;
    fy_metric_set(srv->connections, (double)srv->n_conns);
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    if (srv->n_conns > srv->params.max_connections) {
        FY_LOG_WARN(OAI_MODULE, "more than %u connections: refusing one",
                    srv->params.max_connections);
        conn_close(c);
        return;
    }
    if (srv->tls != NULL && rpc_tls_conn_create(srv->tls, NULL, &c->tls) != FY_OK) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_timer_start(&c->idle, on_idle, srv->params.idle_timeout_ms, srv->params.idle_timeout_ms);
    c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
    if (!c->reading)
        conn_close(c);
}

/* ---- the server --------------------------------------------------------------------------- */

void oai_server_params_default(oai_server_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->host = "127.0.0.1";
    p->max_body = 4u << 20;
    p->max_connections = 1024;
    p->idle_timeout_ms = 60000;
}

static void on_listener_closed(uv_handle_t *h)
{
    free(h->data);
}

fy_status_t oai_server_create(uv_loop_t *loop, const oai_server_params_t *params,
                              oai_server_t **srv_p)
{
    if (loop == NULL || params == NULL || srv_p == NULL || params->upstream == NULL ||
        params->port < 0 || params->port > 65535 || params->max_body == 0 ||
        params->max_body > (1u << 30) || params->max_connections == 0 ||
        params->idle_timeout_ms == 0 || (params->api_key && strlen(params->api_key) > 256))
        return FY_ERR_INVALID_ARG;
    const char *host = params->host ? params->host : "127.0.0.1"; // for messages
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (rpc_listen_addr(params->host, params->port, &ss) != FY_OK)
        return FY_ERR_INVALID_ARG;
    oai_server_t *srv = calloc(1, sizeof(*srv));
    if (srv == NULL)
        return FY_ERR_NO_MEMORY;
    srv->loop = loop;
    srv->params = *params;
    srv->params.host = NULL;
    srv->params.upstream = NULL;
    srv->params.model_name = NULL;
    srv->params.api_key = NULL;
    srv->params.upstream_token = NULL;
    srv->params.tls_cert = srv->params.tls_key = srv->params.upstream_tls_ca = NULL;
    snprintf(srv->api_key, sizeof(srv->api_key), "%s", params->api_key ? params->api_key : "");
    snprintf(srv->model_name, sizeof(srv->model_name), "%s",
             params->model_name ? params->model_name : "");
    if (params->metrics != NULL)
        srv->connections = fy_metrics_gauge(params->metrics, "ferry_http_connections", NULL,
                                            "open OpenAI-compatible API connections");
    if (params->tls_cert != NULL && params->tls_cert[0]) {
        rpc_tls_params_t tp;
        rpc_tls_params_default(&tp);
        tp.cert_file = params->tls_cert;
        tp.key_file = params->tls_key;
        tp.http2 = false; // HTTP/1.1 only
        char err[200];
        if (rpc_tls_create(&tp, &srv->tls, err, sizeof(err)) != FY_OK) {
            FY_LOG_ERROR(OAI_MODULE, "%s", err);
            free(srv);
            return FY_ERR_INVALID_ARG;
        }
    }
    ferry_client_params_t cp;
    ferry_client_params_default(&cp);
    cp.addresses = params->upstream;
    cp.tls_ca = params->upstream_tls_ca;
    cp.tls_any_name = params->upstream_tls_any_name;
    cp.token = params->upstream_token && params->upstream_token[0] ? params->upstream_token : NULL;
    cp.timeout_ms = 0; // generations take as long as they take; unary calls set their own
    cp.max_message = 16u << 20;
    int rv = ferry_client_create_on_loop(loop, &cp, &srv->client);
    if (rv != 0) {
        rpc_tls_destroy(srv->tls);
        free(srv);
        return rv == FY_ERR_INVALID_ARG ? FY_ERR_INVALID_ARG : FY_ERR_NO_MEMORY;
    }
    uv_tcp_init(loop, &srv->listener);
    srv->listener.data = srv;
    rv = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&ss, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&srv->listener, 256, on_connection);
    if (rv != 0) {
        FY_LOG_ERROR(OAI_MODULE, "cannot listen on %s:%d: %s", host, params->port, uv_strerror(rv));
        ferry_client_destroy(srv->client);
        rpc_tls_destroy(srv->tls);
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
        return FY_ERR_UNAVAILABLE;
    }
    srv->port = rpc_bound_port(&srv->listener);
    *srv_p = srv;
    return FY_OK;
}

int oai_server_port(const oai_server_t *srv)
{
    return srv->port;
}

void oai_server_destroy(oai_server_t *srv)
{
    if (srv == NULL)
        return;
    while (srv->conns != NULL)
        conn_close(srv->conns);
    ferry_client_destroy(srv->client);
    rpc_tls_destroy(srv->tls); // connections still closing keep its OpenSSL context alive
    uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
}
