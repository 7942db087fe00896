/*
 * rpc_int.h: pieces shared by the server and the client: a byte queue for outgoing messages
 * and an HTTP/2 connection over a libuv TCP handle (reads fed to nghttp2, nghttp2's output
 * written with bounded buffering so a slow peer pushes back through flow control instead of
 * growing memory).
 */
#ifndef FERRY_RPC_INT_H
#define FERRY_RPC_INT_H

#include <string.h>

#include <nghttp2/nghttp2.h>

#include "rpc.h"

#define RPC_MODULE     "rpc"
#define FY_RPC_VERSION "0.1"

/* Queue of malloc'd byte buffers (packed, prefixed messages). */
typedef struct rpc_buf {
    struct rpc_buf *next;
    uint8_t *data; // [len], owned
    size_t len;
    size_t off; // bytes already read out
} rpc_buf_t;

typedef struct {
    rpc_buf_t *head, *tail;
    size_t bytes; // unread bytes in the queue
    size_t count; // buffers in the queue
} rpc_bufq_t;

/* Appends data (taken) to q. */
fy_status_t rpc_bufq_push(rpc_bufq_t *q, uint8_t *data, size_t len);
/* Copies up to max bytes into dst; returns the count. */
size_t rpc_bufq_read(rpc_bufq_t *q, uint8_t *dst, size_t max);
void rpc_bufq_clear(rpc_bufq_t *q);

typedef struct rpc_h2 rpc_h2_t;

/* Runs once after the TCP handle and the keepalive timer have closed; the owner frees. */
typedef void (*rpc_h2_closed_cb)(rpc_h2_t *h);

/* Sees a connection's bytes before nghttp2 does while set (server side: telling HTTP/1.1
 * GET from HTTP/2). Returns true when it consumed them, false to hand these and every later
 * byte to nghttp2 (the hook is then cleared and output released). */
typedef bool (*rpc_h2_sniff_cb)(rpc_h2_t *h, const uint8_t *data, size_t len);

struct rpc_h2 {
    uv_tcp_t tcp;
    uv_timer_t timer; // keepalive (server) or connect timeout (client)
    nghttp2_session *session;
    rpc_h2_closed_cb on_closed;
    void *owner;
    size_t write_inflight; // bytes handed to uv_write and not yet completed
    int handles_open;      // of tcp and timer, counted down by close callbacks
    bool closing;
    bool reading;
    bool fatal; // protocol error or drained: close once output is written
    int busy;   // inside nghttp2 mem_recv/mem_send: flush later, not now
    rpc_h2_sniff_cb sniff; // see rpc_h2_sniff_cb; NULL = HTTP/2 only
    bool hold;  // nghttp2 output held (the protocol is not known yet, or it is not HTTP/2)
    rpc_tls_conn_t *tls; // NULL = cleartext; else every byte in and out goes through it
    bool tls_client;     // a failed handshake is worth a warning (the server's is a debug line)
    char error[160];     // why TLS failed (set by the time on_closed runs), or "
    uint8_t rbuf[65536];
};

/* Initializes tcp and timer on loop; on failure nothing needs closing. */
fy_status_t rpc_h2_init(rpc_h2_t *h, uv_loop_t *loop, void *owner, rpc_h2_closed_cb on_closed);
/* Starts reading; bytes go to nghttp2_session_mem_recv. */
fy_status_t rpc_h2_start_read(rpc_h2_t *h);
/* Writes what nghttp2 has to send; closes the connection when both sides are done or on
 * error. Safe to call often. */
void rpc_h2_flush(rpc_h2_t *h);
/* Closes the handles (once); on_closed runs later. */
void rpc_h2_close(rpc_h2_t *h);
/* Writes bytes (copied) straight to the socket, outside HTTP/2 (HTTP/1.1 answers). With
 * fatal set and hold on, the connection closes once they are written. */
fy_status_t rpc_h2_write_raw(rpc_h2_t *h, const void *data, size_t len);

/* Feeds bytes to a fresh server-side HTTP/2 session of srv as if they came from one
 * connection, runs the handlers and discards what the server would send, then tears the
 * session down (calls whose handler has not finished are detached as on a lost
 * connection). For fuzzing the whole request path without sockets. Thread: loop thread. */
fy_status_t rpc_server_feed_raw(rpc_server_t *srv, const uint8_t *data, size_t len,
                                size_t *out_bytes_p);

/* Finds header values in nghttp2 name/value arrays. */
static inline nghttp2_nv rpc_nv(const char *name, const char *value)
{
    nghttp2_nv nv = {(uint8_t *)name, (uint8_t *)value, strlen(name), strlen(value),
                     NGHTTP2_NV_FLAG_NONE};
    return nv;
}

#endif /* FERRY_RPC_INT_H */
