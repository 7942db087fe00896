/*
 * adaptive.h: the bandwidth-adaptive KV budget of a prefill worker (KVServe's idea).
 *
 * The worker records, per decode peer (its UCX address), the goodput of finished KV transfers
 * and its own compute speed (ms per prompt token). A transfer that ended well after the
 * compute (its tail, from the last layer computed to the receiver's confirmation, is over a
 * fifth of its span) was limited by the link: wire bytes over its span (first frame sent to
 * confirmation) is a goodput sample, averaged with weight alpha. A transfer that kept up with
 * the compute only shows the link is at least that fast: it can raise the estimate, never
 * lower it. (Frame completions are local, into socket buffers, so busy time alone would
 * overstate a thin link.) For a new request without a budget of its own
 * (neither in the request nor the worker's --budget) it picks the largest b within the
 * limits whose predicted transfer fits the TTFT target:
 *
 *   left     = target - queue wait (queued tokens x ms per token)
 *   compute  = prompt tokens x ms per token
 *   b        = (max(left, compute) - compute / n_layers) x goodput / raw FP16 bytes
 *
 * Layer l travels while layer l+1 computes, so the transfer may take as long as the time
 * left; only the last layer's transfer is not hidden. When even compute misses the target, b
 * is the one that just hides the transfer behind compute. Without history for a peer the
 * policy's own budget stays. Thread: not thread-safe; the prefill worker calls it on its
 * loop thread only.
 */
#ifndef FERRY_PREFILL_ADAPTIVE_H
#define FERRY_PREFILL_ADAPTIVE_H

#include <stdbool.h>
#include <stdint.h>

#include "common.h"

typedef struct {
    double ttft_target_ms; /* > 0 */
    double budget_min;     /* in (0, 1]; default 0.125 */
    double budget_max;     /* in [budget_min, 1]; default 1 */
    double alpha;          /* weight of a new goodput sample in (0, 1]; default 0.3 */
    int n_layers;          /* of the model (>= 1) */
    double ms_per_token;   /* initial compute estimate (> 0); learned from then on */
} pf_adaptive_params_t;

void pf_adaptive_params_default(pf_adaptive_params_t *p);

typedef struct pf_adaptive pf_adaptive_t;

fy_status_t pf_adaptive_create(const pf_adaptive_params_t *p, pf_adaptive_t **a_p);
void pf_adaptive_destroy(pf_adaptive_t *a);

/* A finished request to `peer`: its wire bytes, the span of its transfer (first frame sent to
 * the receiver's confirmation), the tail of that span after the compute ended, its prompt
 * tokens and compute time. Samples without bytes or span are ignored. */
void pf_adaptive_observe(pf_adaptive_t *a, const char *peer, uint64_t wire_bytes,
                         double span_ms, double tail_ms, int n_tokens, double compute_ms);

/* The goodput estimate to peer in bytes/s; false when there is no history. */
bool pf_adaptive_goodput(const pf_adaptive_t *a, const char *peer, double *bytes_per_s);

/* The budget for a request of n_tokens (raw_bytes of FP16 K+V) to peer behind
 * queued_tokens; < 0 when there is no opinion (no history for the peer). */
double pf_adaptive_choose(const pf_adaptive_t *a, const char *peer, int n_tokens,
                          uint64_t raw_bytes, uint64_t queued_tokens);

#endif
