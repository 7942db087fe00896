/*
 * rpc_server.c: the gRPC server side.
 *
 * A call (one HTTP/2 stream) goes through:
 *   1. request HEADERS: path, content-type, grpc-timeout, metadata checked; method looked up
 *      in the registered service descriptors; auth hook asked; deadline timer started;
 *   2. DATA: the one request message reassembled (size limit enforced) and unpacked;
 *   3. the client half-closes: the handler runs with the request;
 *   4. the handler sends messages and finishes, on the loop thread or from another thread
 *      through the server's op queue + uv_async_send;
 *   5. response HEADERS (first message), DATA (messages, paced by HTTP/2 flow control) and
 *      trailers with grpc-status; errors found before the handler ran go out trailers-only.
 * The call object lives until both the stream is closed and the handler has finished, so a
 * handler on another thread never sees its call freed under it.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include "rpc_int.h"

#define RPC_MAX_METADATA 64

typedef struct rpc_service {
    struct rpc_service *next;
    const ProtobufCServiceDescriptor *desc;
    const rpc_handler_cb *handlers;
    const bool *streaming;
    void *arg;
} rpc_service_t;

typedef struct rpc_op {
    struct rpc_op *next;
    rpc_call_t *call;
    uint8_t *data; // packed message (send) or NULL (finish)
    size_t len;
    int code;
    char *message;
} rpc_op_t;

typedef struct rpc_sconn rpc_sconn_t;

struct rpc_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_async_t async;
    uv_timer_t drain_timer;
    rpc_server_params_t params;
    char host[64];
    int port;
    rpc_service_t *services;
    rpc_sconn_t *conns;
    uv_mutex_t mu; // guards ops
    rpc_op_t *ops_head, *ops_tail;
    uv_thread_t loop_thread;
    size_t calls_in_flight;
    int handles_open;
    bool listening;
    bool shutting_down;
    bool destroyed;
    rpc_server_drained_cb drained_cb;
    void *drained_arg;
    fy_metric_t *tls_failures; // ferry_rpc_tls_failures_total (with tls and metrics), or NULL
};

struct rpc_sconn {
    rpc_h2_t h2; // first: rpc_h2_t callbacks cast back
    rpc_server_t *srv;
    rpc_sconn_t *prev, *next;
    rpc_call_t *calls;
    uint64_t ping_sent_ns;
    bool ping_outstanding;
    char *http1;      // HTTP/1.1 request head read so far (malloc'd), NULL for HTTP/2
    size_t http1_len;
};

struct rpc_call {
    rpc_server_t *srv;
    rpc_sconn_t *conn; // NULL once the connection is gone
    rpc_call_t *prev, *next;
    int32_t stream_id;
    char *path;
    char *md[RPC_MAX_METADATA * 2]; // key, value pairs (copies)
    size_t n_md;
    uint64_t deadline_ns;
    int http_error; // non-zero: header validation failed with this HTTP status
    int early_code; // non-zero: refuse with this gRPC code after the headers
    const char *early_message;
    const rpc_service_t *svc;
    const ProtobufCMethodDescriptor *method;
    rpc_handler_cb handler;
    bool streaming;
    rpc_reader_t reader;
    ProtobufCMessage *req;
    rpc_bufq_t out;
    uint32_t n_sent;
    uv_timer_t *deadline_timer;
    rpc_cancel_cb cancel_cb;
    void *cancel_arg;
    void *user;
    int wire_code;
    char *wire_message;
    atomic_bool cancelled;
    atomic_size_t pending; // bytes accepted by rpc_call_send, not yet given to nghttp2
    bool remote_closed;    // client half-closed
    bool headers_sent;
    bool wire_final; // the status is decided; nothing more is sent but it
    bool deferred;   // data provider is waiting for data
    bool stream_closed;
    bool handler_started;
    bool handler_done;
    int pins; // > 0 while a function below still uses the call after a flush
};

static void call_maybe_free(rpc_call_t *call);
static void call_emit_final(rpc_call_t *call);

/* ---- helpers --------------------------------------------------------------------------- */

static bool on_loop_thread(const rpc_server_t *srv)
{
    uv_thread_t self = uv_thread_self();
    return uv_thread_equal(&self, &srv->loop_thread);
}

static void conn_flush(rpc_sconn_t *conn)
{
    if (conn != NULL)
        rpc_h2_flush(&conn->h2);
}

static void on_deadline_timer_closed(uv_handle_t *handle)
{
    free(handle);
}

static void call_free(rpc_call_t *call)
{
    if (call->deadline_timer) {
        uv_timer_stop(call->deadline_timer);
        uv_close((uv_handle_t *)call->deadline_timer, on_deadline_timer_closed);
    }
    for (size_t i = 0; i < call->n_md * 2; i++)
        free(call->md[i]);
    free(call->path);
    rpc_reader_cleanup(&call->reader);
    if (call->req)
        protobuf_c_message_free_unpacked(call->req, NULL);
    rpc_bufq_clear(&call->out);
    free(call->wire_message);
    free(call);
}

static void call_detach(rpc_call_t *call)
{
    rpc_sconn_t *conn = call->conn;
    if (conn == NULL)
        return;
    if (call->prev)
        call->prev->next = call->next;
    else
        conn->calls = call->next;
    if (call->next)
        call->next->prev = call->prev;
    call->prev = call->next = NULL;
    if (conn->h2.session && !conn->h2.closing)
        nghttp2_session_set_stream_user_data(conn->h2.session, call->stream_id, NULL);
    call->conn = NULL;
    // A draining connection closes with its last call.
    if (conn->srv->shutting_down && conn->calls == NULL && !conn->h2.closing) {
        conn->h2.fatal = true;
        conn_flush(conn);
    }
}

static void call_maybe_free(rpc_call_t *call)
{
    if (!call->stream_closed || call->pins > 0)
        return;
    if (call->handler_started && !call->handler_done)
        return;
    call_detach(call);
    call_free(call);
}

/* The stream ended or the deadline passed while the handler runs. */
static void call_cancel(rpc_call_t *call)
{
    if (atomic_exchange(&call->cancelled, true))
        return;
    if (call->handler_started && !call->handler_done && call->cancel_cb)
        call->cancel_cb(call, call->cancel_arg);
}

static void set_final(rpc_call_t *call, int code, const char *message)
{
    if (call->wire_final)
        return;
    call->wire_final = true;
    call->wire_code = code;
    free(call->wire_message);
    call->wire_message = rpc_message_encode(message ? message : "");
}

/* Refuses a call before its handler ran (or overrides it on deadline). */
static void call_fail(rpc_call_t *call, int code, const char *message)
{
    if (call->wire_final)
        return;
    FY_LOG_DEBUG(RPC_MODULE, "%s: %s %s", call->path ? call->path : "?", rpc_code_name(code),
                 message ? message : "");
    set_final(call, code, message);
    atomic_fetch_sub(&call->pending, call->out.bytes);
    rpc_bufq_clear(&call->out);
    call_emit_final(call);
}

/* ---- response path --------------------------------------------------------------------- */

static ssize_t on_data_read(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                            size_t length, uint32_t *data_flags, nghttp2_data_source *source,
                            void *user_data)
{
    rpc_call_t *call = source->ptr;
    size_t n = rpc_bufq_read(&call->out, buf, length);
    atomic_fetch_sub(&call->pending, n);
    if (call->out.bytes == 0 && call->wire_final) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        char code[16];
        snprintf(code, sizeof(code), "%d", call->wire_code);
        nghttp2_nv trl[2] = {rpc_nv("grpc-status", code),
                             rpc_nv("grpc-message", call->wire_message ? call->wire_message : "")};
        int rv = nghttp2_submit_trailer(session, stream_id, trl,
                                        call->wire_message && call->wire_message[0] ? 2 : 1);
        if (rv != 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return (ssize_t)n;
    }
    if (n == 0) {
        call->deferred = true;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

static void call_submit_headers(rpc_call_t *call, bool trailers_only)
{
    nghttp2_session *s = call->conn->h2.session;
    char status[8], code[16];
    snprintf(status, sizeof(status), "%d", call->http_error ? call->http_error : 200);
    nghttp2_nv nv[4];
    size_t n = 0;
    nv[n++] = rpc_nv(":status", status);
    nv[n++] = rpc_nv("content-type", "application/grpc");
    if (trailers_only) {
        snprintf(code, sizeof(code), "%d", call->wire_code);
        nv[n++] = rpc_nv("grpc-status", code);
        if (call->wire_message && call->wire_message[0])
            nv[n++] = rpc_nv("grpc-message", call->wire_message);
        nghttp2_submit_response(s, call->stream_id, nv, n, NULL);
    } else {
        nghttp2_data_provider dp = {.source.ptr = call, .read_callback = on_data_read};
        nghttp2_submit_response(s, call->stream_id, nv, n, &dp);
    }
    call->headers_sent = true;
}

static void call_emit_final(rpc_call_t *call)
{
    if (call->conn == NULL || call->stream_closed || call->conn->h2.closing)
        return;
    if (!call->headers_sent) {
        call_submit_headers(call, true);
    } else if (call->deferred) {
        call->deferred = false;
        nghttp2_session_resume_data(call->conn->h2.session, call->stream_id);
    }
    conn_flush(call->conn);
}

static void call_send_local_pinned(rpc_call_t *call, uint8_t *data, size_t len);

/* Flushing may close the stream (and would free the call): pin it meanwhile. */
static void call_send_local(rpc_call_t *call, uint8_t *data, size_t len)
{
    call->pins++;
    call_send_local_pinned(call, data, len);
    call->pins--;
    call_maybe_free(call);
}

static void call_send_local_pinned(rpc_call_t *call, uint8_t *data, size_t len)
{
    if (call->wire_final || call->conn == NULL || call->stream_closed ||
        atomic_load(&call->cancelled) || call->conn->h2.closing) {
        atomic_fetch_sub(&call->pending, len);
        free(data);
        return;
    }
    call->n_sent++;
    if (!call->streaming && call->n_sent > 1) {
        atomic_fetch_sub(&call->pending, len);
        free(data);
        return; // reported at finish
    }
    if (rpc_bufq_push(&call->out, data, len) != FY_OK) {
        atomic_fetch_sub(&call->pending, len);
        call_fail(call, RPC_CODE_RESOURCE_EXHAUSTED, "server out of memory");
        return;
    }
    if (!call->headers_sent) {
        call_submit_headers(call, false);
    } else if (call->deferred) {
        call->deferred = false;
        nghttp2_session_resume_data(call->conn->h2.session, call->stream_id);
    }
    conn_flush(call->conn);
}

static void call_finish_local(rpc_call_t *call, int code, const char *message)
{
    if (call->handler_done)
        return;
    call->handler_done = true;
    if (call->srv)
        call->srv->calls_in_flight--;
    if (code == RPC_CODE_OK && !call->streaming && call->n_sent != 1) {
        code = RPC_CODE_INTERNAL;
        message = call->n_sent == 0 ? "unary handler sent no response"
                                    : "unary handler sent more than one response";
    }
    if (code < 0 || code > 16)
        code = RPC_CODE_UNKNOWN;
    set_final(call, code, message);
    call->pins++;
    call_emit_final(call);
    call->pins--;
    call_maybe_free(call);
}

static void on_async(uv_async_t *async)
{
    rpc_server_t *srv = async->data;
    uv_mutex_lock(&srv->mu);
    rpc_op_t *op = srv->ops_head;
    srv->ops_head = srv->ops_tail = NULL;
    uv_mutex_unlock(&srv->mu);
    while (op) {
        rpc_op_t *next = op->next;
        if (op->data)
            call_send_local(op->call, op->data, op->len);
        else
            call_finish_local(op->call, op->code, op->message);
        free(op->message);
        free(op);
        op = next;
    }
}

static fy_status_t post_op(rpc_call_t *call, uint8_t *data, size_t len, int code,
                           const char *message)
{
    rpc_op_t *op = calloc(1, sizeof(*op));
    if (op == NULL) {
        free(data);
        return FY_ERR_NO_MEMORY;
    }
    op->call = call;
    op->data = data;
    op->len = len;
    op->code = code;
    if (message && (op->message = strdup(message)) == NULL) {
        free(op);
        return FY_ERR_NO_MEMORY;
    }
    rpc_server_t *srv = call->srv;
    uv_mutex_lock(&srv->mu);
    if (srv->ops_tail)
        srv->ops_tail->next = op;
    else
        srv->ops_head = op;
    srv->ops_tail = op;
    uv_mutex_unlock(&srv->mu);
    uv_async_send(&srv->async);
    return FY_OK;
}

fy_status_t rpc_call_send(rpc_call_t *call, const ProtobufCMessage *msg)
{
    if (call == NULL || msg == NULL)
        return FY_ERR_INVALID_ARG;
    if (call->handler_done)
        return FY_ERR_STATE;
    uint32_t max = call->srv ? call->srv->params.max_send_message : RPC_DEFAULT_MAX_MESSAGE;
    uint8_t *buf;
    size_t len;
    fy_status_t st = rpc_message_pack(msg, max, &buf, &len);
    if (st != FY_OK)
        return st;
    atomic_fetch_add(&call->pending, len);
    if (call->srv == NULL || on_loop_thread(call->srv)) {
        call_send_local(call, buf, len);
        return FY_OK;
    }
    st = post_op(call, buf, len, 0, NULL);
    if (st != FY_OK)
        atomic_fetch_sub(&call->pending, len);
    return st;
}

size_t rpc_call_pending_bytes(const rpc_call_t *call)
{
    return atomic_load(&((rpc_call_t *)call)->pending);
}

void rpc_call_finish(rpc_call_t *call, int code, const char *message)
{
    if (call == NULL)
        return;
    if (call->srv == NULL || on_loop_thread(call->srv)) {
        call_finish_local(call, code, message);
        return;
    }
    // Out of memory here would leave the call dangling; retry the allocation-free path by
    // spinning is worse, so the op carries no message in that case.
    if (post_op(call, NULL, 0, code, message) != FY_OK)
        post_op(call, NULL, 0, code, NULL);
}

bool rpc_call_is_cancelled(const rpc_call_t *call)
{
    return atomic_load(&call->cancelled);
}

void rpc_call_set_cancel_cb(rpc_call_t *call, rpc_cancel_cb cb, void *arg)
{
    call->cancel_cb = cb;
    call->cancel_arg = arg;
    if (atomic_load(&call->cancelled) && cb)
        cb(call, arg);
}

const char *rpc_call_metadata(const rpc_call_t *call, const char *key)
{
    for (size_t i = 0; i < call->n_md; i++)
        if (strcmp(call->md[2 * i], key) == 0)
            return call->md[2 * i + 1];
    return NULL;
}

const char *rpc_call_path(const rpc_call_t *call)
{
    return call->path ? call->path : "";
}

uint64_t rpc_call_deadline_ns(const rpc_call_t *call)
{
    return call->deadline_ns;
}

void rpc_call_set_user(rpc_call_t *call, void *user)
{
    call->user = user;
}

void *rpc_call_user(const rpc_call_t *call)
{
    return call->user;
}

/* ---- request path ---------------------------------------------------------------------- */

static void on_deadline(uv_timer_t *t)
{
    rpc_call_t *call = t->data;
    call->pins++;
    call_fail(call, RPC_CODE_DEADLINE_EXCEEDED, "deadline exceeded");
    call_cancel(call);
    call->pins--;
    call_maybe_free(call);
}

static fy_status_t on_request_message(void *arg, const uint8_t *data, size_t len)
{
    rpc_call_t *call = arg;
    if (call->req != NULL)
        return FY_ERR_FORMAT; // a second request on a unary / server-streaming method
    call->req = protobuf_c_message_unpack(call->method->input, NULL, len, data);
    return call->req ? FY_OK : FY_ERR_CORRUPT;
}

static const rpc_service_t *find_method(rpc_server_t *srv, const char *path,
                                        const ProtobufCMethodDescriptor **method_p,
                                        unsigned *index_p)
{
    // path = "/" service "/" method
    if (path == NULL || path[0] != '/')
        return NULL;
    const char *slash = strchr(path + 1, '/');
    if (slash == NULL)
        return NULL;
    size_t svc_len = (size_t)(slash - path - 1);
    for (rpc_service_t *s = srv->services; s; s = s->next) {
        if (strlen(s->desc->name) != svc_len || memcmp(s->desc->name, path + 1, svc_len) != 0)
            continue;
        for (unsigned i = 0; i < s->desc->n_methods; i++) {
            if (strcmp(s->desc->methods[i].name, slash + 1) == 0) {
                *method_p = &s->desc->methods[i];
                *index_p = i;
                return s;
            }
        }
        return NULL;
    }
    return NULL;
}

/* Request headers are complete: validate, dispatch, check auth, start the deadline. */
static void call_headers_done(rpc_call_t *call)
{
    rpc_server_t *srv = call->srv;
    if (call->http_error) {
        call_fail(call, call->early_code ? call->early_code : RPC_CODE_INTERNAL,
                  call->early_message ? call->early_message : "bad request headers");
        return;
    }
    if (call->path == NULL) {
        call_fail(call, RPC_CODE_INTERNAL, "missing :path");
        return;
    }
    if (call->early_code) {
        call_fail(call, call->early_code, call->early_message);
        return;
    }
    unsigned index = 0;
    const rpc_service_t *svc = find_method(srv, call->path, &call->method, &index);
    if (svc == NULL || svc->handlers[index] == NULL) {
        call_fail(call, RPC_CODE_UNIMPLEMENTED, "unknown method");
        return;
    }
    call->svc = svc;
    call->handler = svc->handlers[index];
    call->streaming = svc->streaming ? svc->streaming[index] : false;
    if (srv->params.auth) {
        fy_status_t st = srv->params.auth(srv->params.auth_arg, call->path,
                                          rpc_call_metadata(call, "authorization"));
        if (st != FY_OK) {
            int code =
                st == FY_ERR_PERMISSION ? RPC_CODE_PERMISSION_DENIED : RPC_CODE_UNAUTHENTICATED;
            call_fail(call, code, fy_status_str(st));
            return;
        }
    }
    const char *timeout = rpc_call_metadata(call, "grpc-timeout");
    if (timeout) {
        uint64_t ns;
        if (rpc_timeout_parse(timeout, strlen(timeout), &ns) != FY_OK) {
            call_fail(call, RPC_CODE_INTERNAL, "malformed grpc-timeout");
            return;
        }
        uint64_t now = fy_clock_ns();
        call->deadline_ns = ns > UINT64_MAX - now ? UINT64_MAX : now + ns;
        call->deadline_timer = malloc(sizeof(uv_timer_t));
        if (call->deadline_timer == NULL || uv_timer_init(srv->loop, call->deadline_timer)) {
            free(call->deadline_timer);
            call->deadline_timer = NULL;
            call_fail(call, RPC_CODE_RESOURCE_EXHAUSTED, "server out of memory");
            return;
        }
        call->deadline_timer->data = call;
        uint64_t ms = ns / 1000000 + (ns % 1000000 ? 1 : 0);
        uv_timer_start(call->deadline_timer, on_deadline, ms, 0);
    }
    rpc_reader_init(&call->reader, srv->params.max_message);
}

/* The client half-closed: run the handler with the one request. */
static void call_request_done(rpc_call_t *call)
{
    if (call->wire_final || call->method == NULL)
        return;
    if (!rpc_reader_idle(&call->reader)) {
        call_fail(call, RPC_CODE_INTERNAL, "truncated request message");
        return;
    }
    if (call->req == NULL) {
        call_fail(call, RPC_CODE_INTERNAL, "no request message");
        return;
    }
    call->handler_started = true;
    call->srv->calls_in_flight++;
    call->handler(call, call->req, call->svc->arg);
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    rpc_sconn_t *conn = user_data;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    rpc_call_t *call = calloc(1, sizeof(*call));
    if (call == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    call->srv = conn->srv;
    call->conn = conn;
    call->stream_id = frame->hd.stream_id;
    atomic_init(&call->cancelled, false);
    atomic_init(&call->pending, 0);
    call->next = conn->calls;
    if (conn->calls)
        conn->calls->prev = call;
    conn->calls = call;
    nghttp2_session_set_stream_user_data(session, frame->hd.stream_id, call);
    return 0;
}

static bool has_prefix(const uint8_t *v, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && memcmp(v, prefix, n) == 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user_data)
{
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    rpc_call_t *call = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (call == NULL)
        return 0;
    if (namelen > 0 && name[0] == ':') {
        if (namelen == 5 && memcmp(name, ":path", 5) == 0) {
            free(call->path);
            call->path = strndup((const char *)value, valuelen);
            if (call->path == NULL)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        } else if (namelen == 7 && memcmp(name, ":method", 7) == 0) {
            if (valuelen != 4 || memcmp(value, "POST", 4) != 0) {
                call->http_error = 405;
                call->early_code = RPC_CODE_INTERNAL;
                call->early_message = "method must be POST";
            }
        }
        return 0;
    }
    if (namelen == 12 && memcmp(name, "content-type", 12) == 0) {
        if (!has_prefix(value, valuelen, "application/grpc")) {
            call->http_error = 415;
            call->early_code = RPC_CODE_INTERNAL;
            call->early_message = "content-type must be application/grpc";
        }
        return 0;
    }
    if (namelen == 13 && memcmp(name, "grpc-encoding", 13) == 0) {
        if (!(valuelen == 8 && memcmp(value, "identity", 8) == 0)) {
            call->early_code = RPC_CODE_UNIMPLEMENTED;
            call->early_message = "message compression is not supported";
        }
        return 0;
    }
    if (call->n_md >= RPC_MAX_METADATA)
        return 0; // extra metadata is ignored, never trusted to fit
    char *k = strndup((const char *)name, namelen);
    char *v = strndup((const char *)value, valuelen);
    if (k == NULL || v == NULL) {
        free(k);
        free(v);
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    call->md[2 * call->n_md] = k;
    call->md[2 * call->n_md + 1] = v;
    call->n_md++;
    return 0;
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user_data)
{
    rpc_call_t *call = nghttp2_session_get_stream_user_data(session, stream_id);
    if (call == NULL || call->wire_final || call->method == NULL)
        return 0;
    fy_status_t st = rpc_reader_feed(&call->reader, data, len, on_request_message, call);
    switch (st) {
    case FY_OK:
        break;
    case FY_ERR_RESOURCE_EXHAUSTED: {
        char msg[96];
        snprintf(msg, sizeof(msg), "request message larger than the limit (%u bytes)",
                 call->reader.max_message);
        call_fail(call, RPC_CODE_RESOURCE_EXHAUSTED, msg);
        break;
    }
    case FY_ERR_UNSUPPORTED:
        call_fail(call, RPC_CODE_INTERNAL, "compressed message without grpc-encoding");
        break;
    case FY_ERR_CORRUPT:
        call_fail(call, RPC_CODE_INTERNAL, "failed to parse the request message");
        break;
    case FY_ERR_FORMAT:
        call_fail(call, RPC_CODE_INTERNAL, "more than one request message");
        break;
    case FY_ERR_NO_MEMORY:
        call_fail(call, RPC_CODE_RESOURCE_EXHAUSTED, "server out of memory");
        break;
    default:
        call_fail(call, RPC_CODE_INTERNAL, "malformed message prefix");
        break;
    }
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    rpc_sconn_t *conn = user_data;
    if (frame->hd.type == NGHTTP2_PING && (frame->hd.flags & NGHTTP2_FLAG_ACK)) {
        conn->ping_outstanding = false;
        return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA)
        return 0;
    rpc_call_t *call = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (call == NULL)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
        call_headers_done(call);
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
        call->remote_closed = true;
        call_request_done(call);
    }
    return 0;
}

/* Once the status went out with END_STREAM while the client has not finished sending (an
 * early refusal), RST_STREAM(NO_ERROR) tells it to stop. Sending the reset only now keeps it
 * behind the HEADERS that carry the status. */
static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data)
{
    if (frame->hd.type != NGHTTP2_HEADERS || !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    rpc_call_t *call = nghttp2_session_get_stream_user_data(session, frame->hd.stream_id);
    if (call != NULL && !call->remote_closed)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id,
                                  NGHTTP2_NO_ERROR);
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user_data)
{
    rpc_call_t *call = nghttp2_session_get_stream_user_data(session, stream_id);
    if (call == NULL)
        return 0;
    call->stream_closed = true;
    call_detach(call);
    call->pins++;
    if (!call->wire_final || error_code != NGHTTP2_NO_ERROR)
        call_cancel(call);
    call->pins--;
    call_maybe_free(call);
    return 0;
}

/* ---- connections ----------------------------------------------------------------------- */

static void server_maybe_done(rpc_server_t *srv);

static void on_conn_closed(rpc_h2_t *h)
{
    rpc_sconn_t *conn = (rpc_sconn_t *)h;
    rpc_server_t *srv = conn->srv;
    while (conn->calls) {
        rpc_call_t *call = conn->calls;
        call->stream_closed = true;
        call_detach(call);
        call->pins++;
        call_cancel(call);
        call->pins--;
        call_maybe_free(call);
    }
    if (conn->h2.error[0]) // TLS refused it: a client without TLS, an unknown certificate...
        fy_metric_inc(srv->tls_failures);
    nghttp2_session_del(conn->h2.session);
    free(conn->http1);
    if (conn->prev)
        conn->prev->next = conn->next;
    else
        srv->conns = conn->next;
    if (conn->next)
        conn->next->prev = conn->prev;
    free(conn);
    server_maybe_done(srv);
}

static void on_keepalive(uv_timer_t *t)
{
    rpc_sconn_t *conn = t->data == NULL ? NULL : ((rpc_h2_t *)t->data)->owner;
    if (conn == NULL || conn->h2.closing)
        return;
    uint64_t now = fy_clock_ns();
    if (conn->ping_outstanding) {
        if (now - conn->ping_sent_ns >=
            (uint64_t)conn->srv->params.keepalive_timeout_ms * 1000000u) {
            FY_LOG_INFO(RPC_MODULE, "closing a connection: keepalive ping not acknowledged");
            rpc_h2_close(&conn->h2);
        }
        return;
    }
    if (nghttp2_submit_ping(conn->h2.session, NGHTTP2_FLAG_NONE, NULL) == 0) {
        conn->ping_outstanding = true;
        conn->ping_sent_ns = now;
        conn_flush(conn);
    }
}

static fy_status_t session_create(rpc_sconn_t *conn)
{
    nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        return FY_ERR_NO_MEMORY;
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
    int rv = nghttp2_session_server_new(&conn->h2.session, cbs, conn);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0)
        return FY_ERR_NO_MEMORY;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, conn->srv->params.max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1u << 20},
    };
    if (nghttp2_submit_settings(conn->h2.session, NGHTTP2_FLAG_NONE, iv, FY_ARRAY_SIZE(iv)))
        return FY_ERR_NO_MEMORY;
    // A larger connection window so many streams can make progress together.
    nghttp2_session_set_local_window_size(conn->h2.session, NGHTTP2_FLAG_NONE, 0, 16u << 20);
    return FY_OK;
}

/* ---- HTTP/1.1 GET (/metrics, /healthz) on the gRPC port ---------------------------------- */

#define RPC_HTTP1_MAX_HEAD 8192

static void http1_respond(rpc_sconn_t *conn, int status, const char *reason,
                          const char *content_type, const char *body, size_t body_len)
{
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     status, reason, content_type, body_len);
    rpc_h2_t *h = &conn->h2;
    if (h->reading) {
        uv_read_stop((uv_stream_t *)&h->tcp);
        h->reading = false;
    }
    h->fatal = true; // with hold on: close once written
    if (rpc_h2_write_raw(h, head, (size_t)n) == FY_OK && body_len > 0)
        rpc_h2_write_raw(h, body, body_len);
    rpc_h2_flush(h);
}

static void http1_serve(rpc_sconn_t *conn, const char *method, const char *target)
{
    rpc_server_t *srv = conn->srv;
    static const char text[] = "text/plain; charset=utf-8";
    FY_LOG_DEBUG(RPC_MODULE, "HTTP/1.1 %s %s", method, target);
    if (strcmp(method, "GET") != 0) {
        http1_respond(conn, 405, "Method Not Allowed", text, "method not allowed\n", 19);
        return;
    }
    char path[128];
    size_t plen = strcspn(target, "?");
    if (plen >= sizeof(path))
        plen = sizeof(path) - 1;
    memcpy(path, target, plen);
    path[plen] = '\0';
    if (strcmp(path, "/healthz") == 0) {
        if (srv->shutting_down)
            http1_respond(conn, 503, "Service Unavailable", text, "draining\n", 9);
        else if (srv->params.healthy == NULL || srv->params.healthy(srv->params.healthy_arg))
            http1_respond(conn, 200, "OK", text, "ok\n", 3);
        else
            http1_respond(conn, 503, "Service Unavailable", text, "unavailable\n", 12);
        return;
    }
    if (strcmp(path, "/metrics") == 0 && srv->params.metrics != NULL) {
        char *body = NULL;
        size_t len = 0;
        if (fy_metrics_render(srv->params.metrics, &body, &len) != FY_OK) {
            http1_respond(conn, 500, "Internal Server Error", text, "metrics unavailable\n", 20);
            return;
        }
        http1_respond(conn, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", body, len);
        free(body);
        return;
    }
    http1_respond(conn, 404, "Not Found", text, "not found\n", 10);
}

/* Parses the request head once complete: "METHOD SP target SP HTTP/1.x CRLF headers CRLF". */
static void http1_head_done(rpc_sconn_t *conn)
{
    char *line_end = strstr(conn->http1, "\r\n");
    char *sp1 = memchr(conn->http1, ' ', (size_t)(line_end - conn->http1));
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (sp1 == NULL || sp2 == NULL || sp2 == sp1 + 1 || strncmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        static const char bad[] = "bad request\n";
        http1_respond(conn, 400, "Bad Request", "text/plain; charset=utf-8", bad,
                      sizeof(bad) - 1);
        return;
    }
    *sp1 = '\0';
    *sp2 = '\0';
    http1_serve(conn, conn->http1, sp1 + 1);
}

/* The first bytes decide: the HTTP/2 client preface starts with 'P' ("PRI * HTTP/2.0");
 * an HTTP/1.1 request line with a method such as "GET" or "HEAD". Anything that is not an
 * upper-case letter other than 'P' goes to nghttp2, which refuses what is not HTTP/2. */
static bool server_sniff(rpc_h2_t *h, const uint8_t *data, size_t len)
{
    rpc_sconn_t *conn = h->owner;
    if (conn->http1 == NULL) {
        if (data[0] == 'P' || data[0] < 'A' || data[0] > 'Z')
            return false;
        conn->http1 = malloc(RPC_HTTP1_MAX_HEAD + 1);
        if (conn->http1 == NULL) {
            rpc_h2_close(h);
            return true;
        }
        conn->http1_len = 0;
    }
    if (h->fatal)
        return true; // answered already; ignore what follows
    size_t room = RPC_HTTP1_MAX_HEAD - conn->http1_len;
    size_t n = FY_MIN(room, len);
    memcpy(conn->http1 + conn->http1_len, data, n);
    conn->http1_len += n;
    conn->http1[conn->http1_len] = '\0';
    if (memchr(conn->http1, '\0', conn->http1_len) != NULL) {
        http1_respond(conn, 400, "Bad Request", "text/plain; charset=utf-8", "bad request\n", 12);
        return true;
    }
    if (strstr(conn->http1, "\r\n\r\n") != NULL)
        http1_head_done(conn);
    else if (conn->http1_len == RPC_HTTP1_MAX_HEAD)
        http1_respond(conn, 431, "Request Header Fields Too Large", "text/plain; charset=utf-8",
                      "request head too large\n", 23);
    return true;
}

static void on_connection(uv_stream_t *listener, int status)
{
    rpc_server_t *srv = listener->data;
    if (status != 0 || srv->shutting_down || srv->destroyed)
        return;
    rpc_sconn_t *conn = calloc(1, sizeof(*conn));
    if (conn == NULL)
        return;
    conn->srv = srv;
    if (rpc_h2_init(&conn->h2, srv->loop, conn, NULL) != FY_OK) {
        if (!conn->h2.closing) // else its TCP handle is closing and owns the memory
            free(conn);
        return;
    }
    conn->h2.on_closed = on_conn_closed;
    conn->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = conn;
    srv->conns = conn;
    if (uv_accept(listener, (uv_stream_t *)&conn->h2.tcp) != 0 || session_create(conn) != FY_OK ||
        (srv->params.tls != NULL &&
         rpc_tls_conn_create(srv->params.tls, NULL, &conn->h2.tls) != FY_OK) ||
        rpc_h2_start_read(&conn->h2) != FY_OK) {
        rpc_h2_close(&conn->h2);
        return;
    }
    uv_tcp_nodelay(&conn->h2.tcp, 1);
    // Nothing is sent (not even SETTINGS) until the first bytes say HTTP/2 or HTTP/1.1.
    conn->h2.sniff = server_sniff;
    conn->h2.hold = true;
    if (srv->params.keepalive_ms)
        uv_timer_start(&conn->h2.timer, on_keepalive, srv->params.keepalive_ms,
                       srv->params.keepalive_ms);
    conn_flush(conn);
}

/* ---- server ------------------------------------------------------------------------------ */

void rpc_server_params_default(rpc_server_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->host = "127.0.0.1";
    p->max_message = RPC_DEFAULT_MAX_MESSAGE;
    p->max_send_message = RPC_DEFAULT_MAX_MESSAGE;
    p->max_concurrent_streams = 1024;
    p->keepalive_timeout_ms = 20000;
}

static void on_server_handle_closed(uv_handle_t *handle)
{
    rpc_server_t *srv = handle->data;
    srv->handles_open--;
    server_maybe_done(srv);
}

static void server_maybe_done(rpc_server_t *srv)
{
    if (srv->conns != NULL)
        return;
    if (srv->shutting_down && srv->drained_cb) {
        rpc_server_drained_cb cb = srv->drained_cb;
        srv->drained_cb = NULL;
        uv_timer_stop(&srv->drain_timer);
        cb(srv, srv->drained_arg);
        return; // cb may destroy the server
    }
    if (srv->destroyed && srv->handles_open == 0) {
        while (srv->services) {
            rpc_service_t *s = srv->services;
            srv->services = s->next;
            free(s);
        }
        rpc_op_t *op = srv->ops_head;
        while (op) {
            rpc_op_t *next = op->next;
            free(op->data);
            free(op->message);
            free(op);
            op = next;
        }
        uv_mutex_destroy(&srv->mu);
        free(srv);
    }
}

fy_status_t rpc_listen_addr(const char *host, int port, struct sockaddr_storage *ss)
{
    if (host == NULL || strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    if (strchr(host, ':')) {
        if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) != 0)
            return FY_ERR_INVALID_ARG;
    } else if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) != 0) {
        return FY_ERR_INVALID_ARG;
    }
    return FY_OK;
}

fy_status_t rpc_server_create(uv_loop_t *loop, const rpc_server_params_t *params,
                              rpc_server_t **srv_p)
{
    if (loop == NULL || params == NULL || srv_p == NULL || params->port < 0 || params->port > 65535)
        return FY_ERR_INVALID_ARG;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (rpc_listen_addr(params->host, params->port, &ss) != FY_OK)
        return FY_ERR_INVALID_ARG;
    rpc_server_t *srv = calloc(1, sizeof(*srv));
    if (srv == NULL)
        return FY_ERR_NO_MEMORY;
    srv->loop = loop;
    srv->params = *params;
    if (srv->params.max_message == 0)
        srv->params.max_message = RPC_DEFAULT_MAX_MESSAGE;
    if (srv->params.max_send_message == 0)
        srv->params.max_send_message = RPC_DEFAULT_MAX_MESSAGE;
    if (srv->params.max_concurrent_streams == 0)
        srv->params.max_concurrent_streams = 1024;
    if (srv->params.keepalive_timeout_ms == 0)
        srv->params.keepalive_timeout_ms = 20000;
    snprintf(srv->host, sizeof(srv->host), "%s", params->host ? params->host : "127.0.0.1");
    srv->params.host = srv->host;
    if (params->tls != NULL && params->metrics != NULL)
        srv->tls_failures =
            fy_metrics_counter(params->metrics, "ferry_rpc_tls_failures_total", NULL,
                               "connections whose TLS handshake or records failed");
    srv->loop_thread = uv_thread_self();
    if (uv_mutex_init(&srv->mu) != 0) {
        free(srv);
        return FY_ERR_NO_MEMORY;
    }
    uv_tcp_init(loop, &srv->listener);
    uv_async_init(loop, &srv->async, on_async);
    uv_timer_init(loop, &srv->drain_timer);
    srv->listener.data = srv->async.data = srv->drain_timer.data = srv;
    srv->handles_open = 3;
    int rv = uv_tcp_bind(&srv->listener, (const struct sockaddr *)&ss, 0);
    if (rv == 0)
        rv = uv_listen((uv_stream_t *)&srv->listener, 256, on_connection);
    if (rv != 0) {
        FY_LOG_ERROR(RPC_MODULE, "cannot listen on %s:%d: %s", srv->host, params->port,
                     uv_strerror(rv));
        srv->destroyed = true;
        uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
        uv_close((uv_handle_t *)&srv->async, on_server_handle_closed);
        uv_close((uv_handle_t *)&srv->drain_timer, on_server_handle_closed);
        return FY_ERR_UNAVAILABLE;
    }
    srv->listening = true;
    srv->port = rpc_bound_port(&srv->listener);
    *srv_p = srv;
    return FY_OK;
}

int rpc_bound_port(const uv_tcp_t *tcp)
{
    struct sockaddr_storage bound;
    int blen = sizeof(bound);
    if (uv_tcp_getsockname(tcp, (struct sockaddr *)&bound, &blen) != 0)
        return -1;
    return bound.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&bound)->sin_port);
}

int rpc_server_port(const rpc_server_t *srv)
{
    return srv->port;
}

fy_status_t rpc_server_add_service(rpc_server_t *srv, const ProtobufCServiceDescriptor *desc,
                                   const rpc_handler_cb *handlers, const bool *streaming, void *arg)
{
    if (srv == NULL || desc == NULL || handlers == NULL)
        return FY_ERR_INVALID_ARG;
    for (rpc_service_t *s = srv->services; s; s = s->next)
        if (strcmp(s->desc->name, desc->name) == 0)
            return FY_ERR_EXISTS;
    rpc_service_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    s->desc = desc;
    s->handlers = handlers;
    s->streaming = streaming;
    s->arg = arg;
    s->next = srv->services;
    srv->services = s;
    return FY_OK;
}

size_t rpc_server_calls_in_flight(const rpc_server_t *srv)
{
    return srv->calls_in_flight;
}

static void on_drain_timeout(uv_timer_t *t)
{
    rpc_server_t *srv = t->data;
    FY_LOG_WARN(RPC_MODULE, "drain timed out with %zu call(s) in flight; closing",
                srv->calls_in_flight);
    for (rpc_sconn_t *c = srv->conns; c; c = c->next)
        rpc_h2_close(&c->h2);
}

void rpc_server_shutdown(rpc_server_t *srv, uint32_t drain_ms, rpc_server_drained_cb done,
                         void *arg)
{
    if (srv == NULL || srv->shutting_down)
        return;
    srv->shutting_down = true;
    srv->drained_cb = done;
    srv->drained_arg = arg;
    if (srv->listening) {
        srv->listening = false;
        uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
    }
    for (rpc_sconn_t *c = srv->conns; c; c = c->next) {
        if (c->h2.closing)
            continue;
        nghttp2_submit_goaway(c->h2.session, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(c->h2.session),
                              NGHTTP2_NO_ERROR, NULL, 0);
        if (c->calls == NULL)
            c->h2.fatal = true;
        conn_flush(c);
    }
    if (srv->conns != NULL)
        uv_timer_start(&srv->drain_timer, on_drain_timeout, drain_ms, 0);
    else
        server_maybe_done(srv);
}

void rpc_server_destroy(rpc_server_t *srv)
{
    if (srv == NULL || srv->destroyed)
        return;
    srv->destroyed = true;
    srv->shutting_down = true;
    srv->drained_cb = NULL;
    if (srv->listening) {
        srv->listening = false;
        uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
    } else if (!uv_is_closing((uv_handle_t *)&srv->listener)) {
        uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
    }
    uv_close((uv_handle_t *)&srv->async, on_server_handle_closed);
    uv_timer_stop(&srv->drain_timer);
    uv_close((uv_handle_t *)&srv->drain_timer, on_server_handle_closed);
    for (rpc_sconn_t *c = srv->conns; c; c = c->next)
        rpc_h2_close(&c->h2);
}

fy_status_t rpc_server_feed_raw(rpc_server_t *srv, const uint8_t *data, size_t len,
                                size_t *out_bytes_p)
{
    rpc_sconn_t *conn = calloc(1, sizeof(*conn));
    if (conn == NULL)
        return FY_ERR_NO_MEMORY;
    conn->srv = srv;
    conn->h2.owner = conn;
    conn->h2.busy = 1; // no socket: output is pulled below, never written
    fy_status_t st = session_create(conn);
    size_t out = 0;
    if (st == FY_OK) {
        ssize_t n = nghttp2_session_mem_recv(conn->h2.session, data, len);
        st = n < 0 ? FY_ERR_PROTOCOL : FY_OK;
        // Ops posted from other threads are not expected here; the fuzz handlers finish
        // on the loop thread. Pull everything the session wants to send.
        for (;;) {
            const uint8_t *p;
            ssize_t m = nghttp2_session_mem_send(conn->h2.session, &p);
            if (m <= 0)
                break;
            out += (size_t)m;
        }
    }
    while (conn->calls) {
        rpc_call_t *call = conn->calls;
        call->stream_closed = true;
        call_detach(call);
        call->pins++;
        call_cancel(call);
        call->pins--;
        call_maybe_free(call);
    }
    nghttp2_session_del(conn->h2.session);
    free(conn);
    if (out_bytes_p)
        *out_bytes_p = out;
    return st;
}
