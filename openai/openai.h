/*
 * openai.h: an OpenAI-compatible HTTP front for Ferry's gRPC API.
 *
 * Serves, over HTTP/1.1 on its own port, what clients of vLLM and SGLang call:
 *   POST /v1/chat/completions   messages rendered with the model's chat template
 *   POST /v1/completions        a raw prompt (text or token ids)
 *   GET  /v1/models[/{id}]      the served model
 *   GET  /health                200 when the upstream serves, 503 otherwise
 * with "stream": true answered as server-sent events ("data: {...}\n\n", then "data: [DONE]").
 * Each choice of a request ("n", default 1) becomes one ferry.v1.Ferry/Generate call to the
 * upstream (the router) through the client SDK on the caller's libuv loop. Ferry's codec is
 * chosen per request with the extra body fields "kv_policy" and "kv_budget"; "top_k",
 * "repetition_penalty" and "stop_token_ids" are taken as vLLM takes them. What Ferry cannot do
 * (tools, echo in chat, suffix, a JSON schema) is refused with 400 rather than ignored.
 * A client that disconnects cancels its generations. With an API key, requests without it get
 * 401. With a certificate the port speaks HTTPS only (TLS, ALPN http/1.1).
 *
 * Everything runs on one libuv loop.
 */
#ifndef FERRY_OPENAI_H
#define FERRY_OPENAI_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *host;            // listen address (default "127.0.0.1"); borrowed for create
    int port;                    // 0 picks a free one (see oai_server_port)
    const char *upstream;        // "host:port" of the gRPC API (the router); borrowed for create
    const char *model_name;      // the name /v1/models reports; borrowed for create
    uint32_t max_body;           // largest request body (default 4 MiB); larger get 413
    uint32_t max_connections;    // open connections beyond this are closed at once (default 1024)
    uint32_t idle_timeout_ms;    // a connection with no request in flight closes after this
                                 // long without bytes (default 60000)
    uint32_t request_timeout_ms; // deadline of each generation upstream; 0 = none (default)
    fy_metrics_t *metrics;       // borrowed, or NULL: ferry_http_requests_total{route,code}
                                 // and the ferry_http_connections gauge
    const char *api_key;         // NULL or "": no authentication; else every route but the
                                 // health check needs "Authorization: Bearer <api_key>" (401
                                 // without); at most 256 bytes; borrowed for create
    const char *upstream_token;  // bearer token for the upstream's calls, or NULL; borrowed
                                 // for create
    const char *tls_cert;        // HTTPS: PEM certificate chain, or NULL for plain HTTP;
                                 // borrowed for create
    const char *tls_key;         // its PEM private key
    const char *upstream_tls_ca; // TLS to the upstream, verified with this PEM file; NULL =
                                 // cleartext
    bool upstream_tls_any_name;  // ... whatever names its certificate carries (pinned)
} oai_server_params_t;

/* Fills the defaults above. Thread: any. */
void oai_server_params_default(oai_server_params_t *p);

typedef struct oai_server oai_server_t;

/* Listens and connects to the upstream (lazily, as the client SDK does). FY_ERR_INVALID_ARG for
 * a bad address, FY_ERR_UNAVAILABLE when the port cannot be bound. Thread: loop thread. */
fy_status_t oai_server_create(uv_loop_t *loop, const oai_server_params_t *params,
                              oai_server_t **srv_p);

/* The bound port. Thread: loop thread. */
int oai_server_port(const oai_server_t *srv);

/* Stops listening, cancels the generations in flight, closes every connection and frees the
 * server once the loop has run the close callbacks. Accepts NULL. Thread: loop thread. */
void oai_server_destroy(oai_server_t *srv);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_OPENAI_H */
