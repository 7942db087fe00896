/*
 * prefill.h: the prefill worker below its daemon (prefill/main.c is ferry-prefill).
 *
 * Serves ferry.v1.Worker Prefill, Cancel and Drain on an rpc_server. A Prefill request joins a
 * queue; one compute thread runs the prompts in arrival order, in batches: the queue's head
 * together with the requests behind it while their prompts fit max_batch_tokens
 * (mdl_prefill_batch: one pass over the weights per layer for all of them; a longer prompt
 * runs alone, chunked by the model). Each request of a batch completes, fails or is
 * cancelled on its own. As each layer finishes, its K, V and window queries go through a
 * kvc_encoder (the request's CodecParams policy and budget, else the worker's defaults) and the
 * frame is handed to kvlink on the loop thread, addressed to the decode worker's UCX address
 * with kvlink request id = reservation_id, so layer l travels while layer l+1 computes. After
 * the last layer the first token is sampled with the request's sampling parameters, the send
 * is finished, and once the decode side confirmed every frame the call answers
 * PrefillResponse {first token, raw and wire KV bytes, prefill and transfer time, the share of
 * transfer time hidden behind compute}.
 *
 * Deadline (the call's grpc-timeout or deadline_unix_ms), client cancel and Worker.Cancel
 * abort both the computation (between layers) and the transfer. Draining refuses new requests
 * with UNAVAILABLE and lets queued ones finish.
 *
 * Threads: everything here runs on the loop thread of the rpc server and the kvlink link,
 * except the compute thread, which owns the model context.
 */
#ifndef FERRY_PREFILL_H
#define FERRY_PREFILL_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "common.h"
#include "kvcodec.h"
#include "kvlink.h"
#include "model.h"
#include "nccl_link.h"
#include "rpc.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const mdl_model_t *model; // borrowed; must outlive the worker; its device (CPU or CUDA)
                              // is where prefill runs
    uint64_t fingerprint;     // mdl_model_fingerprint(model), computed once by the caller
    int n_threads;            // model context threads (0 = all CPUs)
    int prefill_chunk;        // rows per GEMM chunk (0 = the model's default)
    int max_batch_tokens;     // prompt tokens one batch takes at most (0 = 2048); a longer
                              // prompt still runs, alone
    const kvc_policy_t *policy; // default policy (copied); NULL = the built-in "ferry"
    double budget;            // default budget b, > 0 overrides the policy's; <= 0 = policy's
    kvlink_t *link;           // borrowed, on the same loop; sends only
    fy_metrics_t *metrics;    // borrowed or NULL
    uint64_t max_queued_tokens; // refuse (RESOURCE_EXHAUSTED) beyond this; 0 = no limit
    uint32_t test_corrupt_frames; // test hook: damage one frame of each of the first N
                                  // requests (the decode side must refuse it); 0 = off
    double ttft_target_ms;    // > 0: bandwidth-adaptive budget aiming at this TTFT for
                              // requests without a budget of their own (adaptive.h)
    double budget_min, budget_max; // its limits; 0 = 0.125 and 1
    bool host_codec;          // with a CUDA model, still score and encode on the CPU (from
                              // host copies of each layer); default: the codec runs on the GPU
    kvlink_pair_kind_t pair_kind; // pair link with decode workers of this node (what the
                                  // worker registered); OFF: every transfer goes over UCX
    int pair_device;          // CUDA device of an NCCL pair's end (the model's)
} prefill_params_t;

#define PREFILL_MAX_BATCH_TOKENS 2048

void prefill_params_default(prefill_params_t *p);

typedef struct prefill prefill_t;

/* Creates the worker and starts its compute thread. Thread: loop thread. */
fy_status_t prefill_create(uv_loop_t *loop, const prefill_params_t *params, prefill_t **pf_p);

/* Registers ferry.v1.Worker (Prefill, Cancel, Drain) on srv. Thread: loop thread. */
fy_status_t prefill_serve(prefill_t *pf, rpc_server_t *srv);

/* Prompt tokens queued or being computed (the load the router places by). Thread: any. */
uint64_t prefill_queued_tokens(const prefill_t *pf);

/* Requests accepted and not finished (queued, computing or transferring). Loop thread. */
size_t prefill_in_flight(const prefill_t *pf);

/* Refuses new requests (UNAVAILABLE "draining") while set; work in hand continues.
 * Thread: loop thread. */
void prefill_set_draining(prefill_t *pf, bool draining);
bool prefill_draining(const prefill_t *pf);

/* Aborts every request in hand (CANCELLED, or UNAVAILABLE with the reason); their calls
 * finish once computation and transfer have stopped. Thread: loop thread. */
void prefill_abort_all(prefill_t *pf, const char *reason);

/* Stops the compute thread and frees the worker. Requires prefill_in_flight() == 0 (abort and
 * let the loop run first); the kvlink link must still exist. Accepts NULL. Thread: loop
 * thread. */
void prefill_destroy(prefill_t *pf);

/* The proto's SamplingParams mapped onto the model's sampler: temperature 0 = greedy, top_k 0
 * = off, top_p 0 or 1 = off, repetition_penalty 0 or 1 = off, presence and frequency
 * penalties and logit biases as given; max_tokens is not the prefill side's concern. NULL =
 * greedy. FY_ERR_INVALID_ARG for values out of range (negative or NaN temperature, top_p
 * outside [0, 1], a negative repetition penalty, the others outside OpenAI's ranges, more than
 * MDL_MAX_LOGIT_BIAS biases); mdl_sampler_params_check says whether the biased ids exist.
 * Thread: any. */
struct Ferry__V1__SamplingParams;
fy_status_t prefill_sampler_params(const struct Ferry__V1__SamplingParams *s,
                                   mdl_sampler_params_t *out);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_PREFILL_H */
