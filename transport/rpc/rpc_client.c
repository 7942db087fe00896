/*
 * rpc_client.c: the gRPC client side: a channel over one or more addresses.
 *
 * Each address is a subchannel with at most one live connection and a state:
 *   IDLE -> CONNECTING -> READY -> (lost) BACKOFF -> IDLE ...
 * Calls go round robin over READY subchannels. With none ready, a call waits while some
 * subchannel is connecting (or always, with wait_for_ready) and fails fast with UNAVAILABLE
 * otherwise. Connection failures back off exponentially (x1.6 up to backoff_max_ms).
 * A call that fails with UNAVAILABLE before any response message is retried when it is
 * idempotent, or when the server refused the stream without processing it (REFUSED_STREAM,
 * GOAWAY), up to max_attempts and within its deadline.
 */
#include <stdlib.h>
#include <string.h>

#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "rpc_int.h"

typedef enum { SUB_IDLE, SUB_CONNECTING, SUB_READY, SUB_BACKOFF } sub_state_t;

typedef struct rpc_cconn rpc_cconn_t;

typedef struct {
    rpc_channel_t *ch;
    struct sockaddr_storage addr;
    char authority[256];
    sub_state_t state;
    rpc_cconn_t *conn; // the live connection (NULL when none)
    uv_timer_t backoff;
    uint32_t backoff_ms; // next delay
} rpc_subch_t;

struct rpc_cconn {
    rpc_h2_t h2; // first
    rpc_channel_t *ch;
    rpc_subch_t *sub; // NULL once detached (GOAWAY received, or closed)
    uv_connect_t connect_req;
    rpc_ccall_t *calls; // active streams
    bool ready;
};

typedef enum { CALL_PENDING, CALL_ACTIVE, CALL_RETRY_WAIT, CALL_DONE } ccall_state_t;

struct rpc_ccall {
    rpc_channel_t *ch;
    rpc_ccall_t *prev, *next;         // in the conn's calls or the channel's pending list
    rpc_ccall_t *all_prev, *all_next; // in the channel's list of every live call
    rpc_cconn_t *conn;
    ccall_state_t state;
    int32_t stream_id;
    char *path;
    uint8_t *req; // [req_len] packed, prefixed request
    size_t req_len;
    size_t req_off;
    const ProtobufCMessageDescriptor *resp_desc;
    rpc_ccall_msg_cb on_msg;
    rpc_ccall_done_cb on_done;
    void *arg;
    char **md; // [2 * n_md] copies
    size_t n_md;
    bool idempotent;
    bool wait_for_ready;
    uint32_t max_attempts;
    uint32_t attempts;
    uint32_t transparent_retries;
    uint64_t deadline_ns; // fy_clock_ns time; 0 = none
    uv_timer_t deadline_timer;
    uv_timer_t aux_timer; // retry delay and deferred completion
    int timers_open;
    uint32_t n_msgs;
    int http_status;
    int grpc_status; // -1 until seen
    char *grpc_message;
    int local_code; // -1 unless the client decided the status
    char local_message[128];
    rpc_reader_t reader;
    bool refused; // stream refused unprocessed: safe to retry
};

struct rpc_channel {
    uv_loop_t *loop;
    rpc_channel_params_t params;
    char *authorization;
    rpc_subch_t *subs; // [n_subs]
    size_t n_subs;
    size_t rr;
    rpc_ccall_t *pending; // waiting for a connection (FIFO by append)
    rpc_ccall_t *all;
    size_t conns_open; // connection objects not yet freed
    int handles_open;  // backoff timers
    size_t calls_open; // call objects not yet freed (timers closing)
    bool destroyed;
    char last_error[160]; // the last connection's TLS failure, "" when it had none
};

static void call_dispatch(rpc_ccall_t *call);
static void call_complete(rpc_ccall_t *call, int code, const char *message);
static void sub_connect(rpc_subch_t *sub);
static void channel_maybe_free(rpc_channel_t *ch);

/* ---- lists ------------------------------------------------------------------------------- */

static void list_remove(rpc_ccall_t **head, rpc_ccall_t *call)
{
    if (call->prev)
        call->prev->next = call->next;
    else if (*head == call)
        *head = call->next;
    if (call->next)
        call->next->prev = call->prev;
    call->prev = call->next = NULL;
}

static void list_push(rpc_ccall_t **head, rpc_ccall_t *call)
{
    call->prev = NULL;
    call->next = *head;
    if (*head)
        (*head)->prev = call;
    *head = call;
}

static void call_unlink(rpc_ccall_t *call)
{
    if (call->state == CALL_PENDING) {
        list_remove(&call->ch->pending, call);
    } else if (call->state == CALL_ACTIVE && call->conn) {
        list_remove(&call->conn->calls, call);
        if (call->conn->h2.session && !call->conn->h2.closing)
            nghttp2_session_set_stream_user_data(call->conn->h2.session, call->stream_id, NULL);
        rpc_cconn_t *conn = call->conn;
        call->conn = NULL;
        // A detached (GOAWAY) connection closes with its last stream.
        if (conn->sub == NULL && conn->calls == NULL && !conn->h2.closing) {
            conn->h2.fatal = true;
            rpc_h2_flush(&conn->h2);
        }
    }
}

/* ---- call completion --------------------------------------------------------------------- */

static void on_call_timer_closed(uv_handle_t *h)
{
    rpc_ccall_t *call = h->data;
    if (--call->timers_open > 0)
        return;
    rpc_channel_t *ch = call->ch;
    for (size_t i = 0; i < call->n_md * 2; i++)
        free(call->md[i]);
    free(call->md);
    free(call->path);
    free(call->req);
    free(call->grpc_message);
    rpc_reader_cleanup(&call->reader);
    free(call);
    ch->calls_open--;
    channel_maybe_free(ch);
}

static void call_complete(rpc_ccall_t *call, int code, const char *message)
{
    if (call->state == CALL_DONE)
        return;
    call_unlink(call);
    call->state = CALL_DONE;
    rpc_channel_t *ch = call->ch;
    if (call->all_prev)
        call->all_prev->all_next = call->all_next;
    else
        ch->all = call->all_next;
    if (call->all_next)
        call->all_next->all_prev = call->all_prev;
    uv_timer_stop(&call->deadline_timer);
    uv_timer_stop(&call->aux_timer);
    call->on_done(call, code, message ? message : "", call->arg);
    uv_close((uv_handle_t *)&call->deadline_timer, on_call_timer_closed);
    uv_close((uv_handle_t *)&call->aux_timer, on_call_timer_closed);
}

static void on_retry_timer(uv_timer_t *t)
{
    rpc_ccall_t *call = t->data;
    if (call->state != CALL_RETRY_WAIT)
        return;
    call_dispatch(call);
}

static void on_complete_soon(uv_timer_t *t)
{
    rpc_ccall_t *call = t->data;
    call_complete(call, call->local_code, call->local_message);
}

/* Completes on the next loop iteration (never inside rpc_channel_call). */
static void call_complete_soon(rpc_ccall_t *call, int code, const char *message)
{
    call_unlink(call);
    call->state = CALL_RETRY_WAIT;
    call->local_code = code;
    snprintf(call->local_message, sizeof(call->local_message), "%s", message);
    uv_timer_start(&call->aux_timer, on_complete_soon, 0, 0);
}

/* An attempt ended with code: retry it or complete the call. */
static void call_attempt_failed(rpc_ccall_t *call, int code, const char *message)
{
    // A stream the server refused unprocessed (over its concurrency limit, or after a
    // GOAWAY) is retried transparently, without counting as an attempt; a bounded number
    // of times so a server that refuses everything still ends the call.
    bool transparent = call->refused && call->transparent_retries < 100;
    if (transparent)
        call->transparent_retries++;
    else
        call->attempts++;
    bool retry = code == RPC_CODE_UNAVAILABLE && call->n_msgs == 0 && !call->ch->destroyed &&
                 (transparent || (call->idempotent && call->attempts < call->max_attempts));
    if (!retry) {
        call_complete(call, code, message);
        return;
    }
    call_unlink(call);
    call->state = CALL_RETRY_WAIT;
    call->req_off = 0;
    call->http_status = 0;
    call->grpc_status = -1;
    call->refused = false;
    free(call->grpc_message);
    call->grpc_message = NULL;
    rpc_reader_cleanup(&call->reader);
    rpc_reader_init(&call->reader, call->ch->params.max_message);
    uint64_t delay = call->ch->params.backoff_initial_ms;
    if (transparent) {
        delay = call->transparent_retries == 1 ? 0 : delay; // the first one at once
    } else {
        for (uint32_t i = 1; i < call->attempts && delay < call->ch->params.backoff_max_ms; i++)
            delay *= 2;
        delay = FY_MIN(delay, (uint64_t)call->ch->params.backoff_max_ms);
    }
    FY_LOG_DEBUG(RPC_MODULE, "%s: retrying after %s (attempt %u)", call->path, message,
                 call->attempts + 1);
    uv_timer_start(&call->aux_timer, on_retry_timer, delay, 0);
}

/* Completes the call with code, then resets its stream (the status is decided here, not by
 * the stream's close). */
static void call_abort(rpc_ccall_t *call, int code, const char *message)
{
    rpc_cconn_t *conn = call->state == CALL_ACTIVE ? call->conn : NULL;
    int32_t stream_id = call->stream_id;
    call_complete(call, code, message);
    if (conn && !conn->h2.closing) {
        nghttp2_submit_rst_stream(conn->h2.session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL);
        rpc_h2_flush(&conn->h2);
    }
}

static void on_deadline(uv_timer_t *t)
{
    call_abort(t->data, RPC_CODE_DEADLINE_EXCEEDED, "deadline exceeded");
}

void rpc_ccall_cancel(rpc_ccall_t *call)
{
    if (call == NULL || call->state == CALL_DONE)
        return;
    call_abort(call, RPC_CODE_CANCELLED, "cancelled by the client");
}

/* ---- nghttp2 callbacks ------------------------------------------------------------------- */

static ssize_t on_req_read(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                           uint32_t *data_flags, nghttp2_data_source *source, void *user_data)
{
    rpc_ccall_t *call = nghttp2_session_get_stream_user_data(session, stream_id);
    if (call == NULL) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        return 0;
    }
    size_t n = FY_MIN(length, call->req_len - call->req_off);
    memcpy(buf, call->req + call->req_off, n);
    call->req_off += n;
    if (call->req_off == call->req_len)
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data)
{
    if (frame->hd.type != NGHTTP2_HEADERS)
        return 0;
    rpc_ccall_t *call = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (call == NULL)
        return 0;
    if (namelen == 7 && memcmp(name, ":status", 7) == 0) {
        int v = 0;
        for (size_t i = 0; i < valuelen && i < 3; i++)
            v = v * 10 + (value[i] >= '0' && value[i] <= '9' ? value[i] - '0' : 0);
        call->http_status = v;
    } else if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0) {
        int v = 0;
        bool ok = valuelen > 0 && valuelen <= 3;
        for (size_t i = 0; ok && i < valuelen; i++) {
            if (value[i] < '0' || value[i] > '9')
                ok = false;
            else
                v = v * 10 + (value[i] - '0');
        }
        call->grpc_status = ok && v <= 16 ? v : RPC_CODE_UNKNOWN;
    } else if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0) {
        free(call->grpc_message);
        call->grpc_message = rpc_message_decode((const char *)value, valuelen);
    }
    return 0;
}

static fy_status_t on_resp_message(void *arg, const uint8_t *data, size_t len)
{
    rpc_ccall_t *call = arg;
    if (call->state == CALL_DONE)
        return FY_ERR_CANCELLED; // cancelled from inside an earlier on_msg
    ProtobufCMessage *msg = protobuf_c_message_unpack(call->resp_desc, NULL, len, data);
    if (msg == NULL)
        return FY_ERR_CORRUPT;
    call->n_msgs++;
    if (call->on_msg)
        call->on_msg(call, msg, call->arg);
    protobuf_c_message_free_unpacked(msg, NULL);
    return FY_OK;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user_data)
{
    rpc_ccall_t *call = nghttp2_session_get_stream_user_data(session, stream_id);
    if (call == NULL || call->local_code >= 0)
        return 0;
    fy_status_t st = rpc_reader_feed(&call->reader, data, len, on_resp_message, call);
    if (call->state == CALL_DONE)
        return 0; // on_msg cancelled the call
    if (st != FY_OK) {
        switch (st) {
        case FY_ERR_RESOURCE_EXHAUSTED:
            call->local_code = RPC_CODE_RESOURCE_EXHAUSTED;
            snprintf(call->local_message, sizeof(call->local_message),
                     "response message larger than the limit (%u bytes)", call->reader.max_message);
            break;
        case FY_ERR_CORRUPT:
            call->local_code = RPC_CODE_INTERNAL;
            snprintf(call->local_message, sizeof(call->local_message),
                     "failed to parse the response message");
            break;
        default:
            call->local_code = RPC_CODE_INTERNAL;
            snprintf(call->local_message, sizeof(call->local_message),
                     "malformed response message");
            break;
        }
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_CANCEL);
    }
    return 0;
}

static int http_to_grpc(int http)
{
    switch (http) {
    case 400:
        return RPC_CODE_INTERNAL;
    case 401:
        return RPC_CODE_UNAUTHENTICATED;
    case 403:
        return RPC_CODE_PERMISSION_DENIED;
    case 404:
        return RPC_CODE_UNIMPLEMENTED;
    case 429:
    case 502:
    case 503:
    case 504:
        return RPC_CODE_UNAVAILABLE;
    default:
        return RPC_CODE_UNKNOWN;
    }
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user_data)
{
    rpc_ccall_t *call = nghttp2_session_get_stream_user_data(session, stream_id);
    if (call == NULL)
        return 0;
    if (call->local_code >= 0) {
        call_complete(call, call->local_code, call->local_message);
    } else if (call->grpc_status >= 0) {
        if (call->grpc_status == RPC_CODE_OK && !rpc_reader_idle(&call->reader))
            call_complete(call, RPC_CODE_INTERNAL, "truncated response message");
        else
            call_complete(call, call->grpc_status, call->grpc_message ? call->grpc_message : "");
    } else if (call->http_status != 0 && call->http_status != 200) {
        char msg[64];
        snprintf(msg, sizeof(msg), "HTTP status %d", call->http_status);
        call_complete(call, http_to_grpc(call->http_status), msg);
    } else if (error_code == NGHTTP2_REFUSED_STREAM) {
        call->refused = true;
        call_attempt_failed(call, RPC_CODE_UNAVAILABLE, "stream refused by the server");
    } else if (error_code == NGHTTP2_CANCEL) {
        call_complete(call, RPC_CODE_CANCELLED, "stream cancelled by the server");
    } else if (call->http_status == 0) {
        call_attempt_failed(call, RPC_CODE_UNAVAILABLE, "stream closed before a response");
    } else {
        call_complete(call, RPC_CODE_INTERNAL, "stream closed without grpc-status");
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    rpc_cconn_t *conn = user_data;
    if (frame->hd.type == NGHTTP2_GOAWAY && conn->sub) {
        // The server drains: new calls go to a new connection; this one ends with its
        // streams (nghttp2 refuses the streams above last_stream_id, which get retried).
        rpc_subch_t *sub = conn->sub;
        sub->conn = NULL;
        sub->state = SUB_IDLE;
        conn->sub = NULL;
        if (conn->calls == NULL)
            conn->h2.fatal = true;
    }
    return 0;
}

/* ---- connections ------------------------------------------------------------------------- */

static bool any_connecting(const rpc_channel_t *ch)
{
    for (size_t i = 0; i < ch->n_subs; i++)
        if (ch->subs[i].state == SUB_CONNECTING)
            return true;
    return false;
}

/* No subchannel can take calls soon: fail the calls that do not wait for ready. */
static void fail_pending_fast(rpc_channel_t *ch, const char *why)
{
    if (any_connecting(ch))
        return;
    rpc_ccall_t *call = ch->pending;
    while (call) {
        rpc_ccall_t *next = call->next;
        if (!call->wait_for_ready)
            call_attempt_failed(call, RPC_CODE_UNAVAILABLE, why);
        call = next;
    }
}

static void on_backoff_done(uv_timer_t *t)
{
    rpc_subch_t *sub = t->data;
    sub->state = SUB_IDLE;
    if (sub->ch->pending)
        sub_connect(sub);
}

static void on_cconn_closed(rpc_h2_t *h)
{
    rpc_cconn_t *conn = (rpc_cconn_t *)h;
    rpc_channel_t *ch = conn->ch;
    rpc_subch_t *sub = conn->sub;
    conn->sub = NULL;
    const char *why = h->error[0] ? h->error : "connection lost";
    snprintf(ch->last_error, sizeof(ch->last_error), "%s", h->error);
    if (h->error[0]) // TLS never came up: a failed attempt, not a lost connection
        conn->ready = false;
    if (sub) {
        sub->conn = NULL;
        if (ch->destroyed) {
            sub->state = SUB_IDLE;
        } else if (conn->ready) {
            // An established connection went away (idle close, server restart): the next
            // call reconnects at once; backoff is for attempts that fail.
            sub->state = SUB_IDLE;
            FY_LOG_DEBUG(RPC_MODULE, "%s: connection closed", sub->authority);
        } else {
            // A connection that never came up, or was lost: back off before the next try.
            sub->state = SUB_BACKOFF;
            uv_timer_start(&sub->backoff, on_backoff_done, sub->backoff_ms, 0);
            FY_LOG_DEBUG(RPC_MODULE, "%s: connection %s; retrying in %u ms", sub->authority,
                         conn->ready ? "lost" : "failed", sub->backoff_ms);
            uint64_t next = (uint64_t)sub->backoff_ms * 8 / 5;
            sub->backoff_ms = (uint32_t)FY_MIN(next, (uint64_t)ch->params.backoff_max_ms);
        }
    }
    while (conn->calls) {
        rpc_ccall_t *call = conn->calls;
        if (call->local_code >= 0)
            call_complete(call, call->local_code, call->local_message);
        else
            call_attempt_failed(call, RPC_CODE_UNAVAILABLE, why);
    }
    nghttp2_session_del(conn->h2.session);
    free(conn);
    ch->conns_open--;
    if (!ch->destroyed && ch->pending && sub && sub->state == SUB_IDLE)
        sub_connect(sub);
    if (!ch->destroyed)
        fail_pending_fast(ch, ch->last_error[0] ? ch->last_error : "no connection to any address");
    channel_maybe_free(ch);
}

static void on_connect_timeout(uv_timer_t *t)
{
    rpc_h2_t *h = t->data;
    FY_LOG_DEBUG(RPC_MODULE, "connect timed out");
    rpc_h2_close(h);
}

static fy_status_t cconn_session(rpc_cconn_t *conn)
{
    nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return FY_ERR_NO_MEMORY;
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    int rv = nghttp2_session_client_new(&conn->h2.session, cbs, conn);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0)
        return FY_ERR_NO_MEMORY;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1u << 20},
    };
    if (nghttp2_submit_settings(conn->h2.session, NGHTTP2_FLAG_NONE, iv, FY_ARRAY_SIZE(iv)))
        return FY_ERR_NO_MEMORY;
    nghttp2_session_set_local_window_size(conn->h2.session, NGHTTP2_FLAG_NONE, 0, 16u << 20);
    return FY_OK;
}

/* TLS on a new connection of a channel with a client configuration, checked against the
 * host of the subchannel's address ("[v6]:port" unbracketed). Its ClientHello goes out with
 * the first flush; the HTTP/2 preface waits inside rpc_tls_conn_send for the handshake. */
static fy_status_t tls_begin(rpc_cconn_t *conn)
{
    const rpc_tls_t *tls = conn->ch->params.tls;
    if (tls == NULL)
        return FY_OK;
    char host[sizeof(conn->sub->authority)] = "";
    if (conn->sub != NULL) {
        const char *a = conn->sub->authority, *end = strrchr(a, ':');
        size_t n = end != NULL ? (size_t)(end - a) : strlen(a);
        if (n >= 2 && a[0] == '[' && a[n - 1] == ']')
            a++, n -= 2;
        snprintf(host, sizeof(host), "%.*s", (int)n, a);
    }
    conn->h2.tls_client = true;
    fy_status_t st = rpc_tls_conn_create(tls, host, &conn->h2.tls);
    return st == FY_OK ? rpc_tls_conn_start(conn->h2.tls) : st;
}

static void on_connect(uv_connect_t *req, int status)
{
    rpc_cconn_t *conn = req->data;
    if (conn->h2.closing)
        return;
    rpc_subch_t *sub = conn->sub;
    uv_timer_stop(&conn->h2.timer);
    if (status != 0 || cconn_session(conn) != FY_OK || tls_begin(conn) != FY_OK ||
        rpc_h2_start_read(&conn->h2) != FY_OK) {
        FY_LOG_DEBUG(RPC_MODULE, "%s: connect failed: %s", sub ? sub->authority : "?",
                     status ? uv_strerror(status) : "setup");
        rpc_h2_close(&conn->h2);
        return;
    }
    uv_tcp_nodelay(&conn->h2.tcp, 1);
    conn->ready = true;
    if (sub) {
        sub->state = SUB_READY;
        sub->backoff_ms = conn->ch->params.backoff_initial_ms;
    }
    rpc_channel_t *ch = conn->ch;
    // Dispatch everything that waited (oldest first: the pending list is newest first).
    rpc_ccall_t *last = ch->pending;
    while (last && last->next)
        last = last->next;
    while (last) {
        rpc_ccall_t *prev = last->prev;
        list_remove(&ch->pending, last);
        last->state = CALL_RETRY_WAIT;
        call_dispatch(last);
        last = prev;
    }
    rpc_h2_flush(&conn->h2);
}

static void sub_connect(rpc_subch_t *sub)
{
    rpc_channel_t *ch = sub->ch;
    if (sub->state != SUB_IDLE || ch->destroyed)
        return;
    rpc_cconn_t *conn = calloc(1, sizeof(*conn));
    if (conn == NULL)
        return;
    conn->ch = ch;
    if (rpc_h2_init(&conn->h2, ch->loop, conn, NULL) != FY_OK) {
        if (!conn->h2.closing)
            free(conn);
        return;
    }
    conn->h2.on_closed = on_cconn_closed;
    ch->conns_open++;
    conn->sub = sub;
    sub->conn = conn;
    sub->state = SUB_CONNECTING;
    conn->connect_req.data = conn;
    int rv = uv_tcp_connect(&conn->connect_req, &conn->h2.tcp, (const struct sockaddr *)&sub->addr,
                            on_connect);
    if (rv != 0) {
        FY_LOG_DEBUG(RPC_MODULE, "%s: connect: %s", sub->authority, uv_strerror(rv));
        rpc_h2_close(&conn->h2);
        return;
    }
    uv_timer_start(&conn->h2.timer, on_connect_timeout, ch->params.connect_timeout_ms, 0);
}

/* ---- dispatch ---------------------------------------------------------------------------- */

static void call_start_on(rpc_ccall_t *call, rpc_cconn_t *conn)
{
    rpc_channel_t *ch = call->ch;
    nghttp2_nv nv[16 + 64];
    size_t n = 0;
    nv[n++] = rpc_nv(":method", "POST");
    nv[n++] = rpc_nv(":scheme", "http");
    nv[n++] = rpc_nv(":path", call->path);
    nv[n++] = rpc_nv(":authority", conn->sub ? conn->sub->authority : "localhost");
    nv[n++] = rpc_nv("te", "trailers");
    nv[n++] = rpc_nv("content-type", "application/grpc");
    nv[n++] = rpc_nv("user-agent", "ferry-rpc/" FY_RPC_VERSION);
    char timeout[24];
    if (call->deadline_ns) {
        uint64_t now = fy_clock_ns();
        uint64_t left = call->deadline_ns > now ? (call->deadline_ns - now + 999999) / 1000000 : 1;
        rpc_timeout_format(left, timeout, sizeof(timeout));
        nv[n++] = rpc_nv("grpc-timeout", timeout);
    }
    if (ch->authorization)
        nv[n++] = rpc_nv("authorization", ch->authorization);
    for (size_t i = 0; i < call->n_md && n < FY_ARRAY_SIZE(nv); i++)
        nv[n++] = rpc_nv(call->md[2 * i], call->md[2 * i + 1]);
    nghttp2_data_provider dp = {.source.ptr = call, .read_callback = on_req_read};
    call->req_off = 0;
    int32_t id = nghttp2_submit_request(conn->h2.session, NULL, nv, n, &dp, call);
    if (id < 0) {
        call_attempt_failed(call, RPC_CODE_UNAVAILABLE, nghttp2_strerror(id));
        return;
    }
    call->stream_id = id;
    call->conn = conn;
    call->state = CALL_ACTIVE;
    list_push(&conn->calls, call);
    rpc_h2_flush(&conn->h2);
}

static void call_dispatch(rpc_ccall_t *call)
{
    rpc_channel_t *ch = call->ch;
    for (size_t k = 0; k < ch->n_subs; k++) {
        rpc_subch_t *sub = &ch->subs[(ch->rr + k) % ch->n_subs];
        if (sub->state == SUB_READY && sub->conn && !sub->conn->h2.closing) {
            ch->rr = (ch->rr + k + 1) % ch->n_subs;
            call_start_on(call, sub->conn);
            return;
        }
    }
    for (size_t k = 0; k < ch->n_subs; k++)
        sub_connect(&ch->subs[k]);
    if (any_connecting(ch) || call->wait_for_ready) {
        call->state = CALL_PENDING;
        list_push(&ch->pending, call);
        return;
    }
    call_attempt_failed(call, RPC_CODE_UNAVAILABLE, "no connection to any address");
}

/* ---- channel ----------------------------------------------------------------------------- */

void rpc_channel_params_default(rpc_channel_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->max_message = RPC_DEFAULT_MAX_MESSAGE;
    p->max_send_message = RPC_DEFAULT_MAX_MESSAGE;
    p->backoff_initial_ms = 100;
    p->backoff_max_ms = 5000;
    p->connect_timeout_ms = 5000;
}

static fy_status_t resolve(const char *address, struct sockaddr_storage *ss, char *authority,
                           size_t auth_len)
{
    char host[256];
    const char *port;
    if (address == NULL || strlen(address) >= sizeof(host))
        return FY_ERR_INVALID_ARG;
    if (strncmp(address, "http://", 7) == 0)
        address += 7;
    if (address[0] == '[') {
        const char *end = strchr(address, ']');
        if (end == NULL || end[1] != ':')
            return FY_ERR_INVALID_ARG;
        memcpy(host, address + 1, (size_t)(end - address - 1));
        host[end - address - 1] = '\0';
        port = end + 2;
    } else {
        const char *colon = strrchr(address, ':');
        if (colon == NULL)
            return FY_ERR_INVALID_ARG;
        memcpy(host, address, (size_t)(colon - address));
        host[colon - address] = '\0';
        port = colon + 1;
    }
    char *endp;
    long p = strtol(port, &endp, 10);
    if (*port == '\0' || *endp != '\0' || p <= 0 || p > 65535 || host[0] == '\0')
        return FY_ERR_INVALID_ARG;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    if (getaddrinfo(host, port, &hints, &res) != 0 || res == NULL)
        return FY_ERR_NOT_FOUND;
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, FY_MIN((size_t)res->ai_addrlen, sizeof(*ss)));
    freeaddrinfo(res);
    snprintf(authority, auth_len, "%s", address);
    return FY_OK;
}

static void on_sub_timer_closed(uv_handle_t *h)
{
    rpc_subch_t *sub = h->data;
    rpc_channel_t *ch = sub->ch;
    ch->handles_open--;
    channel_maybe_free(ch);
}

static void channel_maybe_free(rpc_channel_t *ch)
{
    if (!ch->destroyed || ch->handles_open > 0 || ch->conns_open > 0 || ch->calls_open > 0)
        return;
    free(ch->subs);
    free(ch->authorization);
    free(ch);
}

fy_status_t rpc_channel_create(uv_loop_t *loop, const rpc_channel_params_t *params,
                               rpc_channel_t **ch_p)
{
    if (loop == NULL || params == NULL || ch_p == NULL || params->n_addresses == 0 ||
        params->addresses == NULL)
        return FY_ERR_INVALID_ARG;
    rpc_channel_t *ch = calloc(1, sizeof(*ch));
    if (ch == NULL)
        return FY_ERR_NO_MEMORY;
    ch->subs = calloc(params->n_addresses, sizeof(*ch->subs));
    if (ch->subs == NULL) {
        free(ch);
        return FY_ERR_NO_MEMORY;
    }
    ch->loop = loop;
    ch->params = *params;
    ch->params.addresses = NULL;
    if (ch->params.max_message == 0)
        ch->params.max_message = RPC_DEFAULT_MAX_MESSAGE;
    if (ch->params.max_send_message == 0)
        ch->params.max_send_message = RPC_DEFAULT_MAX_MESSAGE;
    if (ch->params.backoff_initial_ms == 0)
        ch->params.backoff_initial_ms = 100;
    if (ch->params.backoff_max_ms < ch->params.backoff_initial_ms)
        ch->params.backoff_max_ms = ch->params.backoff_initial_ms;
    if (ch->params.connect_timeout_ms == 0)
        ch->params.connect_timeout_ms = 5000;
    if (params->authorization && (ch->authorization = strdup(params->authorization)) == NULL) {
        free(ch->subs);
        free(ch);
        return FY_ERR_NO_MEMORY;
    }
    ch->params.authorization = NULL;
    for (size_t i = 0; i < params->n_addresses; i++) {
        fy_status_t st = resolve(params->addresses[i], &ch->subs[i].addr, ch->subs[i].authority,
                                 sizeof(ch->subs[i].authority));
        if (st != FY_OK) {
            FY_LOG_DEBUG(RPC_MODULE, "cannot resolve '%s'", params->addresses[i]);
            free(ch->authorization);
            free(ch->subs);
            free(ch);
            return FY_ERR_INVALID_ARG;
        }
    }
    ch->n_subs = params->n_addresses;
    for (size_t i = 0; i < ch->n_subs; i++) {
        rpc_subch_t *sub = &ch->subs[i];
        sub->ch = ch;
        sub->state = SUB_IDLE;
        sub->backoff_ms = ch->params.backoff_initial_ms;
        uv_timer_init(loop, &sub->backoff);
        sub->backoff.data = sub;
        ch->handles_open++;
    }
    *ch_p = ch;
    return FY_OK;
}

void rpc_channel_destroy(rpc_channel_t *ch)
{
    if (ch == NULL || ch->destroyed)
        return;
    ch->destroyed = true;
    while (ch->all)
        call_complete(ch->all, RPC_CODE_CANCELLED, "channel closed");
    for (size_t i = 0; i < ch->n_subs; i++) {
        rpc_subch_t *sub = &ch->subs[i];
        uv_timer_stop(&sub->backoff);
        uv_close((uv_handle_t *)&sub->backoff, on_sub_timer_closed);
        if (sub->conn)
            rpc_h2_close(&sub->conn->h2);
    }
    channel_maybe_free(ch);
}

size_t rpc_channel_connected(const rpc_channel_t *ch)
{
    size_t n = 0;
    for (size_t i = 0; i < ch->n_subs; i++)
        n += ch->subs[i].state == SUB_READY;
    return n;
}

fy_status_t rpc_channel_call(rpc_channel_t *ch, const char *path, const ProtobufCMessage *req,
                             const ProtobufCMessageDescriptor *resp_desc,
                             const rpc_call_opts_t *opts, rpc_ccall_msg_cb on_msg,
                             rpc_ccall_done_cb on_done, void *arg, rpc_ccall_t **call_p)
{
    if (ch == NULL || path == NULL || req == NULL || resp_desc == NULL || on_done == NULL ||
        ch->destroyed)
        return FY_ERR_INVALID_ARG;
    rpc_call_opts_t o = {0};
    if (opts)
        o = *opts;
    if (o.n_metadata > 64)
        return FY_ERR_INVALID_ARG;
    rpc_ccall_t *call = calloc(1, sizeof(*call));
    if (call == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = rpc_message_pack(req, ch->params.max_send_message, &call->req, &call->req_len);
    if (st != FY_OK) {
        free(call);
        return st;
    }
    call->path = strdup(path);
    call->md = o.n_metadata ? calloc(o.n_metadata * 2, sizeof(char *)) : NULL;
    if (call->path == NULL || (o.n_metadata && call->md == NULL)) {
        free(call->path);
        free(call->md);
        free(call->req);
        free(call);
        return FY_ERR_NO_MEMORY;
    }
    for (size_t i = 0; i < o.n_metadata * 2; i++) {
        call->md[i] = strdup(o.metadata[i] ? o.metadata[i] : "");
        call->n_md = (i + 1) / 2; // frees what was copied if a later strdup fails
        if (call->md[i] == NULL) {
            for (size_t j = 0; j < i; j++)
                free(call->md[j]);
            free(call->md);
            free(call->path);
            free(call->req);
            free(call);
            return FY_ERR_NO_MEMORY;
        }
    }
    call->n_md = o.n_metadata;
    call->ch = ch;
    call->resp_desc = resp_desc;
    call->on_msg = on_msg;
    call->on_done = on_done;
    call->arg = arg;
    call->idempotent = o.idempotent;
    call->wait_for_ready = o.wait_for_ready;
    call->max_attempts = o.max_attempts ? o.max_attempts : 3;
    call->grpc_status = -1;
    call->local_code = -1;
    rpc_reader_init(&call->reader, ch->params.max_message);
    uv_timer_init(ch->loop, &call->deadline_timer);
    uv_timer_init(ch->loop, &call->aux_timer);
    call->deadline_timer.data = call->aux_timer.data = call;
    call->timers_open = 2;
    ch->calls_open++;
    call->all_next = ch->all;
    if (ch->all)
        ch->all->all_prev = call;
    ch->all = call;
    if (o.timeout_ms) {
        call->deadline_ns = fy_clock_ns() + (uint64_t)o.timeout_ms * 1000000u;
        uv_timer_start(&call->deadline_timer, on_deadline, o.timeout_ms, 0);
    }
    if (call_p)
        *call_p = call;
    // Dispatch now; a failure found here completes on the next loop turn, never inside.
    call->state = CALL_RETRY_WAIT;
    for (size_t k = 0; k < ch->n_subs; k++) {
        rpc_subch_t *sub = &ch->subs[(ch->rr + k) % ch->n_subs];
        if (sub->state == SUB_READY && sub->conn && !sub->conn->h2.closing) {
            ch->rr = (ch->rr + k + 1) % ch->n_subs;
            call_start_on(call, sub->conn);
            return FY_OK;
        }
    }
    for (size_t k = 0; k < ch->n_subs; k++)
        sub_connect(&ch->subs[k]);
    if (any_connecting(ch) || call->wait_for_ready) {
        call->state = CALL_PENDING;
        list_push(&ch->pending, call);
        return FY_OK;
    }
    call_complete_soon(call, RPC_CODE_UNAVAILABLE, "no connection to any address");
    return FY_OK;
}
