/*
 * rpc_h2.c: an HTTP/2 connection over libuv TCP, shared by the server and the client.
 *
 * nghttp2 does the framing, HPACK and flow control; this file moves bytes. Output is pulled
 * with nghttp2_session_mem_send and written in batches; while more than a high-water mark of
 * bytes is in flight to the socket, no more is pulled, so data frames wait inside nghttp2
 * (and in the callers' queues) rather than piling up in write requests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rpc_int.h"

#define RPC_WRITE_HIGH_WATER (1u << 20)
#define RPC_WRITE_BATCH      (64u * 1024u)

fy_status_t rpc_bufq_push(rpc_bufq_t *q, uint8_t *data, size_t len)
{
    rpc_buf_t *b = calloc(1, sizeof(*b));
    if (b == NULL) {
        free(data);
        return FY_ERR_NO_MEMORY;
    }
    b->data = data;
    b->len = len;
    if (q->tail)
        q->tail->next = b;
    else
        q->head = b;
    q->tail = b;
    q->bytes += len;
    q->count++;
    return FY_OK;
}

size_t rpc_bufq_read(rpc_bufq_t *q, uint8_t *dst, size_t max)
{
    size_t done = 0;
    while (done < max && q->head) {
        rpc_buf_t *b = q->head;
        size_t n = FY_MIN(max - done, b->len - b->off);
        memcpy(dst + done, b->data + b->off, n);
        b->off += n;
        done += n;
        if (b->off == b->len) {
            q->head = b->next;
            if (q->head == NULL)
                q->tail = NULL;
            free(b->data);
            free(b);
            q->count--;
        }
    }
    q->bytes -= done;
    return done;
}

void rpc_bufq_clear(rpc_bufq_t *q)
{
    while (q->head) {
        rpc_buf_t *b = q->head;
        q->head = b->next;
        free(b->data);
        free(b);
    }
    q->tail = NULL;
    q->bytes = 0;
    q->count = 0;
}

typedef struct {
    uv_write_t req;
    rpc_h2_t *h;
    size_t len;
    uint8_t data[];
} rpc_write_t;

static void on_handle_closed(uv_handle_t *handle)
{
    rpc_h2_t *h = handle->data;
    if (--h->handles_open > 0)
        return;
    if (h->tls != NULL && !rpc_tls_conn_ready(h->tls) && !h->error[0])
        snprintf(h->error, sizeof(h->error),
                 "TLS handshake: the connection closed before it ended");
    rpc_tls_conn_destroy(h->tls);
    h->tls = NULL;
    if (h->on_closed)
        h->on_closed(h);
}

fy_status_t rpc_h2_init(rpc_h2_t *h, uv_loop_t *loop, void *owner, rpc_h2_closed_cb on_closed)
{
    h->owner = owner;
    h->on_closed = on_closed;
    if (uv_tcp_init(loop, &h->tcp) != 0)
        return FY_ERR_NO_MEMORY;
    if (uv_timer_init(loop, &h->timer) != 0) {
        // tcp is open: close it and let the caller see the failure only after that.
        h->handles_open = 1;
        h->tcp.data = h;
        h->closing = true;
        uv_close((uv_handle_t *)&h->tcp, on_handle_closed);
        return FY_ERR_NO_MEMORY;
    }
    h->tcp.data = h;
    h->timer.data = h;
    h->handles_open = 2;
    return FY_OK;
}

void rpc_h2_close(rpc_h2_t *h)
{
    if (h->closing)
        return;
    h->closing = true;
    uv_timer_stop(&h->timer);
    uv_close((uv_handle_t *)&h->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&h->timer, on_handle_closed);
}

static void on_write(uv_write_t *req, int status)
{
    rpc_write_t *w = (rpc_write_t *)req;
    rpc_h2_t *h = w->h;
    h->write_inflight -= w->len;
    free(w);
    if (h->closing)
        return;
    if (status != 0) {
        rpc_h2_close(h);
        return;
    }
    rpc_h2_flush(h);
}

static bool write_socket(rpc_h2_t *h, rpc_write_t *w);

/* Writes the ciphertext TLS has for the socket (handshake, records, alerts). */
static bool tls_out(rpc_h2_t *h)
{
    size_t n;
    while ((n = rpc_tls_conn_pending(h->tls)) > 0) {
        rpc_write_t *w = malloc(sizeof(*w) + n);
        if (w == NULL) {
            rpc_h2_close(h);
            return false;
        }
        w->len = rpc_tls_conn_take(h->tls, w->data, n);
        if (!write_socket(h, w))
            return false;
    }
    return true;
}

/* A TLS failure: the alert goes out, the connection closes once it is written. */
static void tls_failed(rpc_h2_t *h)
{
    snprintf(h->error, sizeof(h->error), "%s", rpc_tls_conn_error(h->tls));
    if (h->tls_client)
        FY_LOG_WARN(RPC_MODULE, "%s", h->error);
    else
        FY_LOG_DEBUG(RPC_MODULE, "%s", h->error);
    h->fatal = true;
    h->hold = true; // nothing more from nghttp2
    if (h->reading) {
        uv_read_stop((uv_stream_t *)&h->tcp);
        h->reading = false;
    }
    if (tls_out(h) && h->write_inflight == 0)
        rpc_h2_close(h);
}

static bool write_batch(rpc_h2_t *h, rpc_write_t *w)
{
    if (h->tls == NULL)
        return write_socket(h, w);
    fy_status_t st = rpc_tls_conn_send(h->tls, w->data, w->len);
    free(w);
    if (st != FY_OK) {
        tls_failed(h);
        return false;
    }
    return tls_out(h);
}

static bool write_socket(rpc_h2_t *h, rpc_write_t *w)
{
    uv_buf_t buf = uv_buf_init((char *)w->data, (unsigned)w->len);
    w->h = h;
    if (uv_write(&w->req, (uv_stream_t *)&h->tcp, &buf, 1, on_write) != 0) {
        free(w);
        rpc_h2_close(h);
        return false;
    }
    h->write_inflight += w->len;
    return true;
}

fy_status_t rpc_h2_write_raw(rpc_h2_t *h, const void *data, size_t len)
{
    if (h->closing)
        return FY_ERR_CLOSED;
    rpc_write_t *w = malloc(sizeof(*w) + len);
    if (w == NULL)
        return FY_ERR_NO_MEMORY;
    memcpy(w->data, data, len);
    w->len = len;
    return write_batch(h, w) ? FY_OK : FY_ERR_TRANSPORT;
}

void rpc_h2_flush(rpc_h2_t *h)
{
    if (h->closing)
        return;
    if (h->hold) {
        // Nothing from nghttp2 goes out; a finished (fatal) connection closes once written.
        if (h->fatal && h->write_inflight == 0)
            rpc_h2_close(h);
        return;
    }
    if (h->session == NULL || h->busy)
        return;
    h->busy++;
    rpc_write_t *w = NULL;
    while (h->write_inflight < RPC_WRITE_HIGH_WATER) {
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(h->session, &data);
        if (n < 0) {
            h->busy--;
            free(w);
            FY_LOG_DEBUG(RPC_MODULE, "http2 send failed: %s", nghttp2_strerror((int)n));
            rpc_h2_close(h);
            return;
        }
        if (n == 0)
            break;
        if (w != NULL && w->len + (size_t)n > RPC_WRITE_BATCH) {
            if (!write_batch(h, w)) {
                h->busy--;
                return;
            }
            w = NULL;
        }
        if (w == NULL) {
            size_t cap = FY_MAX((size_t)n, (size_t)RPC_WRITE_BATCH);
            w = malloc(sizeof(*w) + cap);
            if (w == NULL) {
                h->busy--;
                rpc_h2_close(h);
                return;
            }
            w->len = 0;
        }
        memcpy(w->data + w->len, data, (size_t)n);
        w->len += (size_t)n;
    }
    h->busy--;
    if (w != NULL && !write_batch(h, w))
        return;
    if (h->write_inflight == 0 && (h->fatal || (!nghttp2_session_want_read(h->session) &&
                                                !nghttp2_session_want_write(h->session))))
        rpc_h2_close(h);
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    rpc_h2_t *h = handle->data;
    *buf = uv_buf_init((char *)h->rbuf, sizeof(h->rbuf));
}

/* The connection's plaintext (what came off the socket, or out of TLS). FY_ERR_CLOSED once
 * the connection is closing or stopped reading (a protocol error: the rest of a read's TLS
 * records are dropped); a draining connection (fatal, still reading) goes on feeding
 * nghttp2, which refuses new streams. */
static fy_status_t on_plain(void *arg, const uint8_t *data, size_t len)
{
    rpc_h2_t *h = arg;
    if (h->closing || (h->fatal && !h->reading && h->sniff == NULL))
        return FY_ERR_CLOSED;
    if (h->sniff != NULL) {
        if (h->sniff(h, data, len))
            return h->closing ? FY_ERR_CLOSED : FY_OK;
        h->sniff = NULL;
        h->hold = false;
    }
    h->busy++;
    ssize_t n = nghttp2_session_mem_recv(h->session, data, len);
    h->busy--;
    if (h->closing)
        return FY_ERR_CLOSED;
    if (n < 0) {
        FY_LOG_DEBUG(RPC_MODULE, "http2 receive failed: %s", nghttp2_strerror((int)n));
        // nghttp2 queued a GOAWAY for protocol errors; send it, then close.
        if (n != NGHTTP2_ERR_BAD_CLIENT_MAGIC && h->session)
            nghttp2_session_terminate_session(h->session, NGHTTP2_PROTOCOL_ERROR);
        h->fatal = true;
        if (h->reading) {
            uv_read_stop((uv_stream_t *)&h->tcp);
            h->reading = false;
        }
        rpc_h2_flush(h); // closes once the GOAWAY is written
        return FY_ERR_CLOSED;
    }
    rpc_h2_flush(h);
    return FY_OK;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    rpc_h2_t *h = stream->data;
    if (h->closing)
        return;
    if (nread < 0) {
        // EOF or reset: nghttp2 learns nothing more; the owner sees streams close.
        rpc_h2_close(h);
        return;
    }
    if (nread == 0)
        return;
    if (h->tls == NULL) {
        on_plain(h, (const uint8_t *)buf->base, (size_t)nread);
        return;
    }
    // One flush after every record of this read, as one cleartext read gets: a burst of
    // requests is answered in one write, not a write (and a record) each.
    h->busy++;
    fy_status_t st =
        rpc_tls_conn_recv(h->tls, (const uint8_t *)buf->base, (size_t)nread, on_plain, h);
    h->busy--;
    if (h->closing)
        return;
    if (st == FY_ERR_TRANSPORT) {
        tls_failed(h);
        return;
    }
    if (st == FY_ERR_CLOSED && h->reading && !h->fatal) {
        rpc_h2_close(h); // the peer's close_notify
        return;
    }
    if (tls_out(h)) // handshake messages
        rpc_h2_flush(h);
}

fy_status_t rpc_h2_start_read(rpc_h2_t *h)
{
    if (uv_read_start((uv_stream_t *)&h->tcp, on_alloc, on_read) != 0)
        return FY_ERR_TRANSPORT;
    h->reading = true;
    return FY_OK;
}
