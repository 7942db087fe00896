/*
 * ferry_client.h: libferry-client, the C SDK for Ferry's gRPC API (proto/ferry.proto).
 *
 * A client is a channel to one or more router (or worker) addresses: calls go round robin,
 * lost connections come back with exponential backoff, idempotent calls (Health, Tokenize,
 * ListModels) are retried on UNAVAILABLE, every call has a deadline. Status codes are
 * gRPC's (0 OK, 1 CANCELLED, 4 DEADLINE_EXCEEDED, 14 UNAVAILABLE, ...).
 *
 * Two ways to use it:
 * - blocking: ferry_client_create() owns a private libuv loop; ferry_health, ferry_complete,
 *   ferry_generate, ... return when the call is over. One thread at a time per client.
 * - asynchronous: ferry_client_create_on_loop() runs on the caller's libuv loop;
 *   ferry_call_async starts any method and reports through callbacks on that loop's thread.
 *
 * Messages are the protobuf-c types generated from ferry.proto (Ferry__V1__*); responses
 * handed to the caller are freed with ferry_message_free.
 *
 *   pkg-config --cflags --libs ferry-client
 */
#ifndef FERRY_CLIENT_H
#define FERRY_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>
#include <uv.h>

#include "ferry.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ferry_client ferry_client_t;
typedef struct ferry_call ferry_call_t;

typedef struct {
    const char *addresses;       // "host:port[,host:port...]"; borrowed for create
    const char *token;           // bearer token sent as "authorization: Bearer <token>", or NULL
    uint32_t timeout_ms;         // deadline of every call, Generate included; 0 = none
                                 // (default 30000; long generations want more or 0)
    uint32_t max_message;        // largest message sent or received (default 4 MiB)
    uint32_t max_attempts;       // attempts for idempotent calls (default 3)
    uint32_t connect_timeout_ms; // default 5000
    const char *tls_ca;          // TLS: PEM certificates that verify the server (its CA, or its
                                 // own certificate); NULL or "" = cleartext; borrowed for create
    bool tls_any_name;           // with tls_ca: skip the check that the certificate names the
                                 // host dialled (a pinned certificate)
} ferry_client_params_t;

/* Fills the defaults above. Thread: any. */
void ferry_client_params_default(ferry_client_params_t *p);

/* Error detail of a finished call: the gRPC code and message. */
typedef struct {
    int code;
    char message[256];
} ferry_error_t;

/* "OK", "DEADLINE_EXCEEDED", ... for a gRPC code. Thread: any. */
const char *ferry_code_name(int code);

/* A blocking client with its own loop. Returns 0, or a negative fy_status_t value
 * (FY_ERR_INVALID_ARG for an unparsable address list). Thread: any. */
int ferry_client_create(const ferry_client_params_t *p, ferry_client_t **client_p);

/* An asynchronous client on loop (borrowed; must outlive the client). Thread: loop thread. */
int ferry_client_create_on_loop(uv_loop_t *loop, const ferry_client_params_t *p,
                                ferry_client_t **client_p);

/* Cancels calls in flight (their callbacks run with CANCELLED) and frees the client; with an
 * external loop the memory goes once the loop has run the close callbacks. Accepts NULL.
 * Thread: the client's thread. */
void ferry_client_destroy(ferry_client_t *client);

/* Frees a response handed out by this API; accepts NULL. Thread: any. */
void ferry_message_free(void *msg);

/* ---- blocking calls: return the gRPC code (0 = OK); err (may be NULL) gets the detail ---- */

/* Health of the server; *resp_p on success (free with ferry_message_free). service may be
 * NULL. Idempotent (retried). */
int ferry_health(ferry_client_t *client, const char *service, Ferry__V1__HealthResponse **resp_p,
                 ferry_error_t *err);

/* The whole completion in one reply. */
int ferry_complete(ferry_client_t *client, const Ferry__V1__GenerateRequest *req,
                   Ferry__V1__CompleteResponse **resp_p, ferry_error_t *err);

/* Text to token ids. Idempotent. */
int ferry_tokenize(ferry_client_t *client, const Ferry__V1__TokenizeRequest *req,
                   Ferry__V1__TokenizeResponse **resp_p, ferry_error_t *err);

/* Models the server offers. Idempotent. */
int ferry_list_models(ferry_client_t *client, Ferry__V1__ListModelsResponse **resp_p,
                      ferry_error_t *err);

/* Streams a generation: cb runs for each message (borrowed for the callback); returning
 * non-zero from cb cancels the call (the result is then CANCELLED). */
typedef int (*ferry_generate_cb)(void *arg, const Ferry__V1__GenerateResponse *chunk);
int ferry_generate(ferry_client_t *client, const Ferry__V1__GenerateRequest *req,
                   ferry_generate_cb cb, void *arg, ferry_error_t *err);

/* ---- asynchronous calls (a client made with ferry_client_create_on_loop) ---------------- */

/* Each response message; msg is borrowed for the callback. Loop thread. */
typedef void (*ferry_msg_cb)(ferry_call_t *call, const ProtobufCMessage *msg, void *arg);
/* The end of a call; runs exactly once. Loop thread. */
typedef void (*ferry_done_cb)(ferry_call_t *call, int code, const char *message, void *arg);

typedef struct {
    uint32_t timeout_ms; // 0 = the client's default
    bool idempotent;     // retried on UNAVAILABLE before any response
    bool wait_for_ready; // wait for a connection instead of failing fast
} ferry_call_opts_t;

/* Calls method ("/ferry.v1.Ferry/Generate", ...) with req (borrowed for the call to this
 * function), responses unpacked with resp_desc (e.g. &ferry__v1__generate_response__descriptor).
 * opts may be NULL. On 0, done runs exactly once and later; *call_p (may be NULL) is valid
 * until then. Thread: loop thread. */
int ferry_call_async(ferry_client_t *client, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, const ferry_call_opts_t *opts,
                     ferry_msg_cb on_msg, ferry_done_cb on_done, void *arg, ferry_call_t **call_p);

/* Cancels a call; its done callback runs with CANCELLED before this returns. Thread: loop
 * thread. */
void ferry_call_cancel(ferry_call_t *call);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_CLIENT_H */
