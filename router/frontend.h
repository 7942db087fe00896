/*
 * frontend.h: the router's client service (ferry.v1.Ferry) over the worker registry.
 *
 * Generate / Complete: tokenize (raw prompt, chat template or token ids), apply sampling
 * defaults, place a (prefill, decode) pair, Worker.ReserveKV on the decode worker, Worker.Prefill
 * on the prefill worker naming the decode worker's UCX address and the reservation, stream the
 * first token at once (TTFT), then Worker.Decode and relay its tokens: detokenized with one
 * streaming detokenizer, stop strings applied (the decode side is then cancelled), RequestStats
 * in the last message. A failed reservation, prefill or KV transfer is retried on another pair
 * (params.retries times) as long as nothing was streamed; a full decode pool tries the next
 * decode worker. Client cancel and deadlines cancel the worker calls and the reservation.
 * Tokenize, ListModels and Health answer from the tokenizer, the GGUF metadata and the registry.
 *
 * Everything runs on one libuv loop (the rpc server's).
 */
#ifndef FERRY_ROUTER_FRONTEND_H
#define FERRY_ROUTER_FRONTEND_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "common.h"
#include "model.h"
#include "router.h"
#include "rpc.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const mdl_gguf_t *gguf;         // borrowed: metadata for ListModels and KV sizing
    const mdl_tokenizer_t *tok;     // borrowed
    const char *model_name;         // for ListModels and GenerateRequest.model checks
    router_registry_t *reg;         // borrowed
    fy_metrics_t *metrics;          // borrowed or NULL
    uint32_t default_max_tokens;    // when SamplingParams.max_tokens is 0 (default 256)
    uint32_t retries;               // extra attempts after a failed reserve/prefill/transfer
    uint32_t reserve_lease_ms;      // ReserveKV lease (default 30000)
    uint32_t worker_timeout_ms;     // ReserveKV and Cancel deadline (default 5000)
    uint32_t prefill_timeout_ms;    // Prefill deadline when the client set none (default 5 min)
    const char *default_policy;     // codec policy when the request names none ("" = workers')
    const char *api_key;            // sent to the workers as a bearer token, or NULL; borrowed
    const rpc_tls_t *tls;           // TLS to the workers (a client configuration), or NULL;
                                    // borrowed
    float default_budget;           // 0 = the policy's
    bool kv_seal;                   // a fresh key a request: its KV frames cross sealed
} rt_params_t;

void rt_params_default(rt_params_t *p);

typedef struct rt rt_t;

/* Thread: loop thread. */
fy_status_t rt_create(uv_loop_t *loop, const rt_params_t *params, rt_t **rt_p);
/* Registers ferry.v1.Ferry on srv. */
fy_status_t rt_serve(rt_t *rt, rpc_server_t *srv);
/* Requests in flight. */
size_t rt_in_flight(const rt_t *rt);
/* Refuses new Generate/Complete calls (UNAVAILABLE) while set; Health says DRAINING. */
void rt_set_draining(rt_t *rt, bool draining);
/* Whether a prefill and a decode worker are available and the router is not draining. */
bool rt_serving(const rt_t *rt);
/* Closes channels to workers that left the registry and that no request uses (call it
 * periodically: workers come and go on new addresses). */
void rt_gc(rt_t *rt);
/* Cancels every request in flight (their clients get UNAVAILABLE). */
void rt_abort_all(rt_t *rt, const char *reason);
/* Frees the router frontend once nothing is in flight (abort and run the loop first); worker
 * channels close as the loop runs. Accepts NULL. */
void rt_destroy(rt_t *rt);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_ROUTER_FRONTEND_H */
