/*
 * rpc.h: the gRPC wire protocol on libuv + nghttp2, server and client.
 *
 * Any stock gRPC client or server speaks to these: HTTP/2 cleartext with prior knowledge
 * (h2c), or HTTP/2 over TLS (ALPN "h2") where the server has a certificate and the channel a
 * CA file (rpc_tls_t), each message framed as
 *   1. compressed flag, 1 byte (Ferry never compresses; a set flag is refused)
 *   2. message length, 4 bytes big-endian
 *   3. the protobuf-encoded message
 * and the status in trailers (`grpc-status`, percent-encoded `grpc-message`). Deadlines travel
 * as `grpc-timeout`, cancellation as RST_STREAM. Unary and server-streaming methods.
 *
 * Objects:
 * - rpc_server_t (a handle): listens on one TCP address; services are registered from their
 *   protobuf-c service descriptors with one handler per method. A handler receives an
 *   rpc_call_t (a request in flight) and answers with rpc_call_send (any number of messages)
 *   and exactly one rpc_call_finish, now or later, from any thread.
 * - rpc_channel_t (a handle): a client to one or more addresses (round robin, reconnect with
 *   exponential backoff); rpc_channel_call starts a call whose messages and final status
 *   arrive as callbacks on the loop thread.
 *
 * Thread rules: servers and channels live on one libuv loop; every function runs on that
 * loop's thread unless its comment says otherwise. rpc_call_send / rpc_call_finish /
 * rpc_call_is_cancelled are the only calls safe from any thread (they go through a queue and
 * uv_async_send).
 *
 * Status codes are gRPC's (rpc_code_t); rpc_code_from_status maps a fy_status_t.
 */
#ifndef FERRY_RPC_H
#define FERRY_RPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>
#include <uv.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* gRPC status codes, numerically identical to the gRPC specification. */
typedef enum {
    RPC_CODE_OK = 0,
    RPC_CODE_CANCELLED = 1,
    RPC_CODE_UNKNOWN = 2,
    RPC_CODE_INVALID_ARGUMENT = 3,
    RPC_CODE_DEADLINE_EXCEEDED = 4,
    RPC_CODE_NOT_FOUND = 5,
    RPC_CODE_ALREADY_EXISTS = 6,
    RPC_CODE_PERMISSION_DENIED = 7,
    RPC_CODE_RESOURCE_EXHAUSTED = 8,
    RPC_CODE_FAILED_PRECONDITION = 9,
    RPC_CODE_ABORTED = 10,
    RPC_CODE_OUT_OF_RANGE = 11,
    RPC_CODE_UNIMPLEMENTED = 12,
    RPC_CODE_INTERNAL = 13,
    RPC_CODE_UNAVAILABLE = 14,
    RPC_CODE_DATA_LOSS = 15,
    RPC_CODE_UNAUTHENTICATED = 16,
} rpc_code_t;

/* "OK", "CANCELLED", ... as gRPC spells them; "UNKNOWN" for values outside 0..16.
 * Thread: any. */
const char *rpc_code_name(int code);
/* The gRPC code for a Ferry status (fy_status_grpc_code). Thread: any. */
rpc_code_t rpc_code_from_status(fy_status_t st);
/* The closest Ferry status for a gRPC code (FY_OK for OK). Thread: any. */
fy_status_t rpc_code_to_status(int code);

/* Default largest message accepted or sent (4 MiB, as gRPC's default receive limit). */
#define RPC_DEFAULT_MAX_MESSAGE (4u * 1024u * 1024u)

/* ------------------------------------------------------------------------------------------ */
/* Message layer (rpc_wire.c): exposed for tests, fuzzing and tools                            */
/* ------------------------------------------------------------------------------------------ */

/* Reassembles length-prefixed messages from DATA chunks of any size. Caller-allocated;
 * rpc_reader_init / rpc_reader_cleanup. */
typedef struct {
    uint8_t hdr[5];   // the prefix being read
    uint32_t hdr_got; // bytes of hdr filled
    uint8_t *msg;     // [msg_cap] the body being read, malloc'd; grows with the bytes
                      // that actually arrive, so a large length prefix alone costs nothing
    uint32_t msg_len;
    uint32_t msg_got;
    uint32_t msg_cap;
    uint32_t max_message; // larger prefixes fail with FY_ERR_RESOURCE_EXHAUSTED
    bool failed;          // a previous feed failed; the stream is unusable
} rpc_reader_t;

/* Called once per complete message; data is borrowed for the call. A non-OK return stops the
 * feed and is returned from rpc_reader_feed. */
typedef fy_status_t (*rpc_reader_msg_cb)(void *arg, const uint8_t *data, size_t len);

void rpc_reader_init(rpc_reader_t *r, uint32_t max_message);
void rpc_reader_cleanup(rpc_reader_t *r);
/* Feeds bytes; calls cb for each message completed. Errors: FY_ERR_RESOURCE_EXHAUSTED (a
 * prefix over max_message), FY_ERR_UNSUPPORTED (compressed flag set), FY_ERR_PROTOCOL (a flag
 * byte other than 0 or 1), FY_ERR_NO_MEMORY, or cb's status. After an error every later feed
 * fails with FY_ERR_PROTOCOL. Thread: not thread-safe. */
fy_status_t rpc_reader_feed(rpc_reader_t *r, const uint8_t *data, size_t len, rpc_reader_msg_cb cb,
                            void *arg);
/* Whether the reader sits between messages (no partial prefix or body): at END_STREAM
 * anything else is a truncated message. */
bool rpc_reader_idle(const rpc_reader_t *r);

/* Packs msg with its 5-byte prefix into a malloc'd buffer (*buf_p, *len_p; caller frees).
 * FY_ERR_RESOURCE_EXHAUSTED when the body exceeds max_message. Thread: any. */
fy_status_t rpc_message_pack(const ProtobufCMessage *msg, uint32_t max_message, uint8_t **buf_p,
                             size_t *len_p);

/* Parses a grpc-timeout value ("1-8 digits" + one of H M S m u n) into nanoseconds
 * (saturating). FY_ERR_FORMAT on anything else. Thread: any. */
fy_status_t rpc_timeout_parse(const char *s, size_t len, uint64_t *ns_p);
/* Formats a timeout in ms as a grpc-timeout value into buf (at least 16 bytes). */
void rpc_timeout_format(uint64_t ms, char *buf, size_t buf_len);

/* Percent-encodes a grpc-message (bytes outside 0x20..0x7e and '%'), into a malloc'd string;
 * NULL when out of memory. Decoding is lenient: a malformed escape stays as it is. */
char *rpc_message_encode(const char *s);
char *rpc_message_decode(const char *s, size_t len);

/* ------------------------------------------------------------------------------------------ */
/* TLS                                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* A TLS configuration (OpenSSL, TLS 1.2 and later): a server's certificate and key, or what a
 * client verifies servers with. Shared by the connections of a server or channel (and the
 * OpenAI front's): it must outlive the server or channel's use of it, though connections
 * still closing after rpc_tls_destroy keep its OpenSSL context. */
typedef struct rpc_tls rpc_tls_t;

typedef struct {
    const char *cert_file; // server: PEM certificate chain (leaf first); NULL = a client config
    const char *key_file;  // server: its PEM private key
    const char *ca_file;   // client: PEM certificates that verify the server; any of them is
                           // trusted as it stands (a CA, or the server's own certificate)
    bool http2;            // server: offer "h2" before "http/1.1" by ALPN; client: ask for
                           // "h2", else "http/1.1" (default true)
    bool check_name;       // client: the certificate must name the host dialled (a DNS name,
                           // or an IP literal's IP address entry) (default true)
} rpc_tls_params_t;

void rpc_tls_params_default(rpc_tls_params_t *p); // Thread: any

/* Reads the files. FY_ERR_INVALID_ARG with the reason in err (file, OpenSSL's words) for a
 * missing or unreadable file, a key that is not the certificate's, or neither certificate nor
 * CA file. Thread: any. */
fy_status_t rpc_tls_create(const rpc_tls_params_t *p, rpc_tls_t **tls_p, char *err, size_t err_len);
void rpc_tls_destroy(rpc_tls_t *tls);         // accepts NULL; Thread: any
bool rpc_tls_is_server(const rpc_tls_t *tls); // Thread: any

/* One connection's TLS over memory buffers: the owner feeds the socket's bytes to
 * rpc_tls_conn_recv, hands plaintext to rpc_tls_conn_send and writes what rpc_tls_conn_take
 * gives it to the socket after either (handshake messages and alerts included). Its functions
 * are not thread-safe: one thread at a time per connection (the connection's loop). */
typedef struct rpc_tls_conn rpc_tls_conn_t;

/* host: a client's server name (SNI and the name check), or NULL. */
fy_status_t rpc_tls_conn_create(const rpc_tls_t *tls, const char *host, rpc_tls_conn_t **c_p);
void rpc_tls_conn_destroy(rpc_tls_conn_t *c); // accepts NULL
/* A client's first handshake message (rpc_tls_conn_take has it afterwards). */
fy_status_t rpc_tls_conn_start(rpc_tls_conn_t *c);
/* Plaintext out of ciphertext; cb may refuse it (its status is returned). FY_ERR_CLOSED after
 * the peer's close_notify; FY_ERR_TRANSPORT when the handshake or a record fails
 * (rpc_tls_conn_error says why; an alert for the peer may be pending). */
typedef fy_status_t (*rpc_tls_plain_cb)(void *arg, const uint8_t *data, size_t len);
fy_status_t rpc_tls_conn_recv(rpc_tls_conn_t *c, const uint8_t *data, size_t len,
                              rpc_tls_plain_cb cb, void *arg);
/* Encrypts plaintext (held until the handshake has ended). */
fy_status_t rpc_tls_conn_send(rpc_tls_conn_t *c, const uint8_t *data, size_t len);
/* Ciphertext waiting for the socket: its size, and up to max bytes of it into dst. */
size_t rpc_tls_conn_pending(const rpc_tls_conn_t *c);
size_t rpc_tls_conn_take(rpc_tls_conn_t *c, uint8_t *dst, size_t max);
bool rpc_tls_conn_ready(const rpc_tls_conn_t *c);        // the handshake has ended
const char *rpc_tls_conn_alpn(const rpc_tls_conn_t *c);  // the protocol agreed, or ""
const char *rpc_tls_conn_error(const rpc_tls_conn_t *c); // the failure, or ""

/* ------------------------------------------------------------------------------------------ */
/* Server                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct rpc_server rpc_server_t;
typedef struct rpc_call rpc_call_t;

/* A method handler. req is the unpacked request (owned by the call, valid until
 * rpc_call_finish). The handler answers with rpc_call_send (unary: exactly one message;
 * server-streaming: any number) and then exactly one rpc_call_finish, now or later and from
 * any thread. Runs on the loop thread. */
typedef void (*rpc_handler_cb)(rpc_call_t *call, const ProtobufCMessage *req, void *arg);

/* Called on the loop thread when a call is cancelled by the client (RST_STREAM, connection
 * lost) or its deadline passed. The handler must still call rpc_call_finish. */
typedef void (*rpc_cancel_cb)(rpc_call_t *call, void *arg);

/* Bearer-token/metadata hook: return FY_OK to accept a call, anything else to refuse it
 * (FY_ERR_UNAUTHENTICATED and FY_ERR_PERMISSION map to their gRPC codes). authorization is
 * the `authorization` header value or NULL; path is "/pkg.Service/Method". Loop thread. */
typedef fy_status_t (*rpc_auth_cb)(void *arg, const char *path, const char *authorization);

/* Whether the process serves (GET /healthz). Loop thread. */
typedef bool (*rpc_healthy_cb)(void *arg);

typedef struct {
    const char *host;                // IPv4/IPv6 literal or "localhost" (default "127.0.0.1");
                                     // "0.0.0.0" or "::" for every interface; borrowed
    int port;                        // 0 = pick a free port (see rpc_server_port)
    uint32_t max_message;            // largest request accepted (default 4 MiB)
    uint32_t max_send_message;       // largest response sent (default 4 MiB)
    uint32_t max_concurrent_streams; // advertised SETTINGS_MAX_CONCURRENT_STREAMS (default 1024)
    uint32_t keepalive_ms;           // PING idle connections this often; 0 = off (default 0)
    uint32_t keepalive_timeout_ms;   // close when a PING is not acked in time (default 20000)
    rpc_auth_cb auth;                // NULL = accept every call
    void *auth_arg;                  // borrowed
    // Plain HTTP/1.1 GET on the same port (a connection whose first bytes are a request line
    // instead of the HTTP/2 preface), for scrapers and load balancers; one response per
    // connection, then it closes:
    //   GET /metrics  200, Prometheus text of `metrics` (404 when NULL)
    //   GET /healthz  200 "ok" when `healthy` is NULL or returns true, else 503 "unavailable";
    //                 503 "draining" once rpc_server_shutdown was called
    // anything else 404 (other methods 405).
    fy_metrics_t *metrics;           // borrowed; rendered on the loop thread
    rpc_healthy_cb healthy;          // loop thread
    void *healthy_arg;               // borrowed
    const rpc_tls_t *tls;            // a server configuration: every connection is TLS (HTTP/2
                                     // and the HTTP/1.1 GETs inside it); NULL = cleartext;
                                     // borrowed. With metrics: ferry_rpc_tls_failures_total
                                     // counts the connections TLS refused or dropped
} rpc_server_params_t;

void rpc_server_params_default(rpc_server_params_t *p);

/* Creates a server listening on params->host:port on loop (borrowed; must outlive the
 * server). FY_ERR_UNAVAILABLE / FY_ERR_INVALID_ARG when the address cannot be bound.
 * Thread: loop thread. */
fy_status_t rpc_server_create(uv_loop_t *loop, const rpc_server_params_t *params,
                              rpc_server_t **srv_p);

/* The port actually bound. Thread: any. */
int rpc_server_port(const rpc_server_t *srv);

/* A listen address as rpc_server_params_t takes it (IPv4/IPv6 literal, "localhost" or NULL =
 * 127.0.0.1) into ss. FY_ERR_INVALID_ARG for anything else. Thread: any. */
fy_status_t rpc_listen_addr(const char *host, int port, struct sockaddr_storage *ss);

/* The port a bound TCP handle listens on. Thread: the handle's loop. */
int rpc_bound_port(const uv_tcp_t *tcp);

/* One handler per method of desc, in desc->methods order (NULL entries answer
 * UNIMPLEMENTED). streaming[i] marks server-streaming methods (NULL = all unary); unary
 * handlers that send a number of messages other than one end with INTERNAL. desc, handlers
 * and streaming are borrowed for the server's lifetime; arg is passed to every handler.
 * FY_ERR_EXISTS when a service of that name is already registered. Thread: loop thread. */
fy_status_t rpc_server_add_service(rpc_server_t *srv, const ProtobufCServiceDescriptor *desc,
                                   const rpc_handler_cb *handlers, const bool *streaming,
                                   void *arg);

/* Stops accepting connections, sends GOAWAY on every connection, lets calls in flight finish
 * and closes each connection when its last stream ends. After drain_ms, remaining calls are
 * cancelled and connections closed. done (may be NULL) runs on the loop thread once every
 * connection is closed. Thread: loop thread. */
typedef void (*rpc_server_drained_cb)(rpc_server_t *srv, void *arg);
void rpc_server_shutdown(rpc_server_t *srv, uint32_t drain_ms, rpc_server_drained_cb done,
                         void *arg);

/* Number of calls whose handler has not finished yet. Thread: loop thread. */
size_t rpc_server_calls_in_flight(const rpc_server_t *srv);

/* Closes everything at once and frees the server once its libuv handles have closed (keep
 * running the loop; uv_run returns when they are). Every handler must have finished (use
 * rpc_server_shutdown first). Accepts NULL. Thread: loop thread. */
void rpc_server_destroy(rpc_server_t *srv);

/* Sends one response message (packed before return: msg is borrowed for the call). FY_OK
 * also when the call was cancelled meanwhile (the message is dropped); FY_ERR_STATE after
 * finish; FY_ERR_RESOURCE_EXHAUSTED when over max_send_message. Thread: any. */
fy_status_t rpc_call_send(rpc_call_t *call, const ProtobufCMessage *msg);

/* Bytes accepted by rpc_call_send and not yet handed to HTTP/2, i.e. waiting for the
 * client's flow-control window. A streaming handler that produces faster than the client
 * reads can pause above a high-water mark instead of queueing without bound. Thread: any. */
size_t rpc_call_pending_bytes(const rpc_call_t *call);

/* Ends the call with a gRPC code and an optional message (copied). The call must not be
 * used afterwards. Thread: any. */
void rpc_call_finish(rpc_call_t *call, int code, const char *message);

/* Whether the client cancelled or the deadline passed. Thread: any. */
bool rpc_call_is_cancelled(const rpc_call_t *call);

/* Registers the cancel callback (replaces an earlier one). If the call is already cancelled
 * cb runs at once. Thread: loop thread. */
void rpc_call_set_cancel_cb(rpc_call_t *call, rpc_cancel_cb cb, void *arg);

/* Request metadata: the first value of header `key` (lower case), or NULL. Valid until
 * rpc_call_finish. Thread: loop thread, or the thread that owns the call until finish. */
const char *rpc_call_metadata(const rpc_call_t *call, const char *key);
/* "/pkg.Service/Method". */
const char *rpc_call_path(const rpc_call_t *call);
/* Deadline as fy_clock_ns() time, 0 = none. */
uint64_t rpc_call_deadline_ns(const rpc_call_t *call);
/* Per-call pointer for the handler's own state. */
void rpc_call_set_user(rpc_call_t *call, void *user);
void *rpc_call_user(const rpc_call_t *call);

/* ------------------------------------------------------------------------------------------ */
/* Client                                                                                      */
/* ------------------------------------------------------------------------------------------ */

typedef struct rpc_channel rpc_channel_t;
typedef struct rpc_ccall rpc_ccall_t;

typedef struct {
    const char *const *addresses; // "host:port" entries (IPv6 as "[::1]:port"); borrowed
    size_t n_addresses;
    uint32_t max_message;        // largest response accepted (default 4 MiB)
    uint32_t max_send_message;   // largest request sent (default 4 MiB)
    uint32_t backoff_initial_ms; // first reconnect delay after a failure (default 100)
    uint32_t backoff_max_ms;     // cap (default 5000); the delay grows 1.6x per failure
    uint32_t connect_timeout_ms; // default 5000
    const char *authorization;   // sent as `authorization` on every call, e.g. "Bearer x"
    const rpc_tls_t *tls;        // a client configuration: connections are TLS, each server
                                 // checked against it; NULL = cleartext; borrowed
} rpc_channel_params_t;

void rpc_channel_params_default(rpc_channel_params_t *p);

/* Creates a channel; connects lazily on the first call. Addresses are resolved here
 * (getaddrinfo). FY_ERR_INVALID_ARG for an unparsable address. Thread: loop thread. */
fy_status_t rpc_channel_create(uv_loop_t *loop, const rpc_channel_params_t *params,
                               rpc_channel_t **ch_p);

/* Fails every call in flight with CANCELLED (their done callbacks run inside this call),
 * closes connections and frees the channel once its handles have closed (keep running the
 * loop). Accepts NULL. Thread: loop thread. */
void rpc_channel_destroy(rpc_channel_t *ch);

/* A response message: msg is unpacked with the call's response descriptor and freed after
 * the callback returns (borrowed). Loop thread. */
typedef void (*rpc_ccall_msg_cb)(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg);
/* The final status; runs exactly once per call, after the last message; message may be ""
 * (borrowed). The call is freed after this returns. Loop thread. */
typedef void (*rpc_ccall_done_cb)(rpc_ccall_t *call, int code, const char *message, void *arg);

typedef struct {
    uint32_t timeout_ms;         // per-call deadline; 0 = none
    bool idempotent;             // may be retried on UNAVAILABLE before any response arrived
    uint32_t max_attempts;       // for idempotent calls (default 3 when 0)
    bool wait_for_ready;         // queue while no connection is up instead of failing fast
    const char *const *metadata; // extra headers as key, value pairs (lower-case keys)
    size_t n_metadata;           // number of pairs
} rpc_call_opts_t;

/* Starts a call to path ("/pkg.Service/Method") with request req (packed before return:
 * borrowed), response messages unpacked with resp_desc (borrowed, static). opts may be NULL.
 * On FY_OK, done will run exactly once (never inside this function); *call_p (may be NULL)
 * is valid until then. Errors before the call exists (FY_ERR_RESOURCE_EXHAUSTED for an
 * oversize request) are returned and no callback runs. Thread: loop thread. */
fy_status_t rpc_channel_call(rpc_channel_t *ch, const char *path, const ProtobufCMessage *req,
                             const ProtobufCMessageDescriptor *resp_desc,
                             const rpc_call_opts_t *opts, rpc_ccall_msg_cb on_msg,
                             rpc_ccall_done_cb on_done, void *arg, rpc_ccall_t **call_p);

/* Cancels a call in flight: RST_STREAM to the server, done runs with CANCELLED before this
 * returns. Thread: loop thread. */
void rpc_ccall_cancel(rpc_ccall_t *call);

/* Number of connections currently up. Thread: loop thread. */
size_t rpc_channel_connected(const rpc_channel_t *ch);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_RPC_H */
