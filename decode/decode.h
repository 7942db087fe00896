/*
 * decode.h: the decode worker's building blocks below the daemon.
 *
 * - decode_leases: admission control. The router asks a decode worker to reserve KV pages for
 *   a request before its prefill starts; the reservation is a lease that is released when the
 *   request completes, is cancelled or fails, or when no KV frame arrives for the lease's
 *   length (each placed frame renews it, so slow prefills of long prompts keep their pages).
 *   Reserved pages are promised, not yet allocated: a new reservation is refused with
 *   FY_ERR_RESOURCE_EXHAUSTED when pages in use plus pages promised would exceed the pool.
 */
#ifndef FERRY_DECODE_H
#define FERRY_DECODE_H

#include <stdbool.h>
#include <stdint.h>

#include "common.h"
#include "model.h"
#include "rpc.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct decode_leases decode_leases_t;

typedef struct {
    uint64_t id;            // reservation id, never 0
    char request_id[64];
    uint64_t pages;         // pages promised
    uint64_t pages_used;    // pages allocated against it so far (by placed frames)
    uint64_t expires_ns;    // 0 once the KV has fully arrived (the lease no longer expires)
} decode_lease_t;

/* Creates a table over a pool of total_pages. Thread: any (all calls take one lock). */
fy_status_t decode_leases_create(uint64_t total_pages, decode_leases_t **leases_p);
/* Frees the table; accepts NULL. */
void decode_leases_destroy(decode_leases_t *leases);

/* Reserves pages for request_id until now_ns + lease_ms unless it is made permanent first.
 * FY_ERR_RESOURCE_EXHAUSTED when it does not fit, FY_ERR_EXISTS for a request id that holds
 * a reservation already, FY_ERR_INVALID_ARG for 0 pages or an empty id. The id goes to
 * *id_p. */
fy_status_t decode_leases_reserve(decode_leases_t *leases, const char *request_id,
                                  uint64_t pages, uint32_t lease_ms, uint64_t now_ns,
                                  uint64_t *id_p);

/* Counts pages allocated for a reservation (frames placed). Fails with
 * FY_ERR_RESOURCE_EXHAUSTED, changing nothing, if that would exceed the reservation. */
fy_status_t decode_leases_use(decode_leases_t *leases, uint64_t id, uint64_t pages);

/* Pushes an uncommitted lease's expiry out to now_ns + lease_ms (never earlier): the decode
 * worker renews it on every frame placed, so a long prompt whose KV streams in over minutes
 * (a slow prefill) keeps its pages while frames keep coming, and a stalled transfer still ends
 * lease_ms after its last frame. FY_ERR_NOT_FOUND for an unknown id; a committed lease is
 * left as it is. */
fy_status_t decode_leases_renew(decode_leases_t *leases, uint64_t id, uint32_t lease_ms,
                                uint64_t now_ns);

/* Marks the KV complete: the lease stops expiring and unused promised pages return to the
 * pool. */
fy_status_t decode_leases_commit(decode_leases_t *leases, uint64_t id);

/* Grows a committed reservation as decoding appends tail pages; same failure rule as reserve.
 */
fy_status_t decode_leases_grow(decode_leases_t *leases, uint64_t id, uint64_t pages);

/* Ends a reservation (completion, cancel, failure): all its pages return. */
fy_status_t decode_leases_release(decode_leases_t *leases, uint64_t id);

/* Looks a reservation up; the copy goes to *lease_p. */
fy_status_t decode_leases_get(decode_leases_t *leases, uint64_t id, decode_lease_t *lease_p);

/* Releases every reservation whose lease ran out; writes up to max of them to expired_p (so
 * the caller can free the pages they used) and returns how many expired. */
size_t decode_leases_expire(decode_leases_t *leases, uint64_t now_ns, decode_lease_t *expired_p,
                            size_t max);

/* Pages neither used nor promised. */
uint64_t decode_leases_available(decode_leases_t *leases);
/* Live reservations. */
size_t decode_leases_count(decode_leases_t *leases);


/* ------------------------------------------------------------------------------------------ */
/* The decode worker (worker.c)                                                                */
/* ------------------------------------------------------------------------------------------ */


typedef struct decode_worker decode_worker_t;

typedef struct {
    const char *model_path;      // GGUF file, loaded at create, unless model is set
    const mdl_model_t *model;    // an already loaded model (borrowed; outlives the worker);
                                 // its device is the worker's
    mdl_device_t device;         // MDL_DEVICE_CPU (default) or MDL_DEVICE_CUDA: the model, its
                                 // context and the KV page pool on the GPU
    const char *listen_host;     // RPC (gRPC + /metrics), default "127.0.0.1"
    int listen_port;             // 0 = pick a free port
    const char *kv_host;         // kvlink (UCX) listener, default "127.0.0.1"
    int kv_port;                 // 0 = pick a free port
    const char *advertise_host;  // how the router reaches us; NULL = the listen host
                                 // (127.0.0.1 when that is a wildcard)
    uint64_t kv_memory;          // page pool bytes (default 512 MiB)
    uint32_t page_bytes;         // page size; 0 (default): decode_page_bytes_for(head_dim)
    uint64_t recv_buffer;        // kvlink receive memory (default 64 MiB)
    int max_batch;               // sequences per decode step (default 32)
    int threads;                 // compute threads (0 = all cores)
    uint32_t default_max_tokens; // when a request says 0 (default 256)
    uint32_t default_lease_ms;   // when ReserveKV says 0 (default 10000)
    const char *router;          // "host:port" to register with, or NULL
    const char *api_key;         // required of callers but Health, sent to the router; NULL =
                                 // open (at most 256 bytes)
    const rpc_tls_t *rpc_tls;    // TLS on the RPC port (a server configuration), or NULL;
                                 // borrowed for the worker's lifetime
    const rpc_tls_t *router_tls; // TLS to the router (a client configuration), or NULL; borrowed
    const char *worker_id;       // NULL = "decode@<rpc address>"
    uint32_t heartbeat_ms;       // 0 = half the router's lease
    const char *ucx_tls;         // UCX transports (as UCX_TLS), NULL = UCX's choice
    const char *ucx_devices;     // UCX devices (as UCX_NET_DEVICES), NULL = UCX's choice
    const char *pair_link;       // KV link to pair over with prefill workers of this node:
                                 // "auto" (NULL: nccl with a CUDA model and NCCL, else off),
                                 // "nccl", "socket" or "off" (nccl_link.h)
    const char *node_id;         // this node for pairing; NULL = the kernel's boot id
} decode_worker_params_t;

void decode_worker_params_default(decode_worker_params_t *params);

/* The page size a worker takes when none is given: 256 bytes per head_dim channel (63 FP16
 * tokens, 3 INT8 or 6 INT4 groups of 32 a page), at least 16 KiB, at most 64 KiB. Pages much
 * smaller than that slow attention on the GPU (bench/results/gpu-h200.md, Round 5: Llama-3-8B
 * INT4 steps at 32k, batch 32, take 23 % less time with 32 KiB pages than with 16 KiB).
 * Thread: any. */
uint32_t decode_page_bytes_for(uint32_t head_dim);

/* Loads the model (unless given), creates the pool and starts the RPC, kvlink and scheduler
 * threads; returns once both listeners are bound. Strings in params are copied. err
 * (optional) says what failed. Thread: any. */
fy_status_t decode_worker_create(const decode_worker_params_t *params,
                                 decode_worker_t **worker_p, char *err, size_t err_len);

/* Bound ports. Thread: any. */
int decode_worker_rpc_port(const decode_worker_t *worker);
int decode_worker_kv_port(const decode_worker_t *worker);

/* Stops taking reservations (ReserveKV answers UNAVAILABLE, the router is told) and waits up
 * to timeout_ms for requests in flight to end; returns how many are left. Thread: any but
 * the worker's own. */
size_t decode_worker_drain(decode_worker_t *worker, uint32_t timeout_ms);

/* Counters for tests and status. */
typedef struct {
    uint32_t total_pages;
    uint32_t free_pages;       // pool pages not allocated
    uint64_t available_pages;  // neither allocated nor promised to a reservation
    uint32_t running;          // sequences in the batch
    uint32_t requests;         // reservations alive (any state)
    uint64_t tokens_generated;
    uint64_t steps;
    uint64_t failures;         // requests that ended in an error (cancel not counted)
} decode_worker_stats_t;

void decode_worker_stats(decode_worker_t *worker, decode_worker_stats_t *stats_p);

/* The metrics registry (/metrics renders it); valid until destroy. Thread: any. */
fy_metrics_t *decode_worker_metrics(decode_worker_t *worker);

/* Fails what is still in flight (UNAVAILABLE), stops the threads and frees everything;
 * accepts NULL. Thread: any but the worker's own. */
void decode_worker_destroy(decode_worker_t *worker);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_DECODE_H */
