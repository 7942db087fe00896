/*
 * router.h: the router's building blocks below the daemon.
 *
 * - router_registry: the set of live workers (register, heartbeat, expiry, draining, recent
 *   failures) and placement: a prefill worker with the fewest queued prefill tokens and a
 *   decode worker with the most free KV pages, then the fewest running sequences. Placement
 *   books the chosen request against the cached load so that requests placed between two
 *   heartbeats spread out instead of piling onto the worker that looked idlest.
 *
 * - the registry's RPC face (registry_svc.c): the router side of ferry.v1.Worker's
 *   RegisterWorker and Heartbeat, serving a registry on an rpc_server.
 * - router_agent (agent.c): the worker side, used by ferry-prefill and ferry-decode. It
 *   registers with the router, heartbeats with the worker's load, registers again when the
 *   router forgot it (restart, expiry) and announces draining.
 *
 * The daemon (router/main.c) owns the client service, retries and metrics. This header names
 * the rpc and libuv types only as incomplete structs, so it never includes them.
 */
#ifndef FERRY_ROUTER_H
#define FERRY_ROUTER_H

#include <stdbool.h>
#include <stdint.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    ROUTER_ROLE_PREFILL = 1,
    ROUTER_ROLE_DECODE = 2,
} router_role_t;

/* Load a worker reports with each heartbeat. */
typedef struct {
    uint32_t queued_prefill_tokens;
    uint32_t running_sequences;
    uint64_t free_kv_pages;
    uint64_t total_kv_pages;
    uint32_t page_bytes;
} router_load_t;

/* What the registry knows of one worker. Strings are NUL-terminated copies. */
typedef struct {
    char id[64];
    router_role_t role;
    char rpc_address[128];
    char kv_address[128];
    char pair_link[16]; // KV link it can pair over inside its node ("nccl", "socket"), or ""
    char node_id[64];
    char pair_device[64]; // the GPU its pair end uses; never paired with one on the same GPU
    uint64_t instance;    // random per process (RegisterRequest.instance)
    uint64_t model_fingerprint;
    router_load_t load;     // last reported, minus what placement booked since
    uint64_t last_seen_ns;  // fy_clock_ns() of the last register/heartbeat
    uint64_t avoid_until_ns; // after a failure, placed only if nothing else is available
    uint32_t consecutive_failures;
    bool draining;
} router_worker_t;

typedef struct {
    uint32_t lease_ms;         // workers heartbeat at least this often (default 1000)
    uint32_t expiry_leases;    // a worker silent for this many leases is dropped (default 3)
    uint32_t failure_backoff_ms; // first avoidance after a failure, doubling (default 2000)
    uint32_t max_workers;      // default 1024
} router_registry_params_t;

void router_registry_params_default(router_registry_params_t *params);

typedef struct router_registry router_registry_t;

/* Creates an empty registry; params NULL = defaults. Thread: any. */
fy_status_t router_registry_create(const router_registry_params_t *params,
                                   router_registry_t **reg_p);
/* Frees it; accepts NULL. */
void router_registry_destroy(router_registry_t *reg);

/* Adds a worker or refreshes one with the same id (a restarted worker re-registers).
 * FY_ERR_INVALID_ARG for an empty id or role, FY_ERR_RESOURCE_EXHAUSTED when full.
 * info is copied. Thread: any. */
fy_status_t router_registry_register(router_registry_t *reg, const router_worker_t *info,
                                     uint64_t now_ns);

/* Records a heartbeat and its load. FY_ERR_NOT_FOUND for an unknown (e.g. expired) worker,
 * which should register again. Thread: any. */
fy_status_t router_registry_heartbeat(router_registry_t *reg, const char *id,
                                      const router_load_t *load, uint64_t now_ns);

/* Removes a worker (it said goodbye, or its connection died). Thread: any. */
fy_status_t router_registry_remove(router_registry_t *reg, const char *id);

/* Marks a worker draining: it keeps its running work but gets nothing new. Thread: any. */
fy_status_t router_registry_set_draining(router_registry_t *reg, const char *id, bool draining);

/* Drops workers whose last heartbeat is older than expiry_leases * lease_ms; writes up to
 * max_ids removed ids into ids_p (may be NULL) and returns how many were removed.
 * Thread: any. */
size_t router_registry_expire(router_registry_t *reg, uint64_t now_ns,
                              char (*ids_p)[64], size_t max_ids);

/* Reports the outcome of a request on a worker: a failure puts it in exponential backoff,
 * a success clears it. Thread: any. */
void router_registry_report(router_registry_t *reg, const char *id, bool ok, uint64_t now_ns);

/* What one placement asks for. */
typedef struct {
    uint64_t model_fingerprint; // 0 = any
    uint32_t prompt_tokens;
    uint64_t kv_pages;           // pages the decode side must reserve
    const char *exclude_prefill; // a worker that just failed this request, or NULL
    const char *exclude_decode;
} router_place_req_t;

/* Whether a prefill and a decode worker can carry KV over a pair of their own: the same pair
 * link and node, not the same GPU (docs/gpu.md, "Pairs in the daemons"). Thread: any. */
bool router_can_pair(const router_worker_t *prefill, const router_worker_t *decode);

/* Picks a (prefill, decode) pair and books the request against their cached load
 * (queued tokens, free pages, running sequences) until their next heartbeat. Workers in
 * failure backoff are used only if no other worker qualifies. A decode worker the prefill
 * worker can pair with is preferred while it has at least half the free pages of the best
 * one (the KV then stays inside the node). FY_ERR_UNAVAILABLE when no
 * live, non-draining pair serves the model; FY_ERR_RESOURCE_EXHAUSTED when decode workers
 * exist but none has kv_pages free. Copies of the chosen workers go to *_p.
 * Thread: any. */
fy_status_t router_registry_place(router_registry_t *reg, const router_place_req_t *req,
                                  uint64_t now_ns, router_worker_t *prefill_p,
                                  router_worker_t *decode_p);

/* Returns booked load to the cached figures when a placed request ends before the next
 * heartbeat would have said so (prefill done: tokens; decode done: sequence and pages). */
void router_registry_release(router_registry_t *reg, const char *prefill_id,
                             uint32_t prompt_tokens, const char *decode_id, uint64_t kv_pages);

/* Copies up to max workers into out (for status and metrics); returns the total count.
 * Thread: any. */
size_t router_registry_snapshot(router_registry_t *reg, router_worker_t *out, size_t max);

/* Copies the worker with this id into *out. FY_ERR_NOT_FOUND when unknown. Thread: any. */
fy_status_t router_registry_get(router_registry_t *reg, const char *id, router_worker_t *out);

/* The heartbeat period workers are told to keep (params.lease_ms). Thread: any. */
uint32_t router_registry_lease_ms(const router_registry_t *reg);

/* ------------------------------------------------------------------------------------------ */
/* Registry service: RegisterWorker and Heartbeat of ferry.v1.Worker (registry_svc.c)          */
/* ------------------------------------------------------------------------------------------ */

struct rpc_server;
struct rpc_tls;
struct uv_loop_s;

/* Serves RegisterWorker and Heartbeat of ferry.v1.Worker on srv from reg (borrowed; must
 * outlive the server); the other Worker methods answer UNIMPLEMENTED. A heartbeat from an
 * unknown worker answers known = false; one with draining set marks the worker draining.
 * FY_ERR_EXISTS when srv already serves ferry.v1.Worker. Thread: srv's loop thread. */
fy_status_t router_registry_serve(struct rpc_server *srv, router_registry_t *reg);

/* ------------------------------------------------------------------------------------------ */
/* Worker agent (agent.c)                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Fills the worker's current load; runs on the loop thread before each heartbeat. */
typedef void (*router_agent_load_cb)(void *arg, router_load_t *load_p);

typedef struct {
    const char *router_address; // "host:port" of the router
    const char *worker_id;      // unique in the cluster; NULL = "<role>@<rpc_address>"
    router_role_t role;
    const char *rpc_address;    // "host:port" where this worker serves ferry.v1.Worker
    const char *kv_address;     // "host:port" of the UCX listener (decode), or NULL
    const char *pair_link;      // KV link it can pair over inside its node, or NULL
    const char *node_id;        // its node, for pairing; NULL or "" = no pairing
    const char *pair_device;    // the GPU its pair end uses (nccl), or NULL
    const char *model_name;     // for status output, or NULL
    const char *api_key;        // the router's --api-key (sent as a bearer token), or NULL
    const struct rpc_tls *tls;  // TLS to the router (a client configuration), or NULL;
                                // borrowed for the agent's lifetime
    uint64_t model_fingerprint;
    uint32_t heartbeat_ms;      // 0 = half the lease the router announces; never above it
    uint32_t retry_ms;          // first retry after a failed registration (default 200),
                                // doubling up to the heartbeat period
    router_agent_load_cb load;  // NULL = report zero load
    void *load_arg;             // borrowed
} router_agent_params_t;

typedef struct router_agent router_agent_t;

/* Creates the agent on loop (borrowed; must outlive it) and starts registering at once;
 * every string is copied. FY_ERR_INVALID_ARG for a missing address or role, or an
 * unparsable router address. Thread: loop thread. */
fy_status_t router_agent_create(struct uv_loop_s *loop, const router_agent_params_t *params,
                                router_agent_t **agent_p);

/* Announces draining (or its end) with an immediate heartbeat; the router then places nothing
 * new on this worker. Thread: loop thread. */
void router_agent_set_draining(router_agent_t *agent, bool draining);

/* Sends a heartbeat now instead of at the next period (e.g. after a large load change).
 * Thread: loop thread. */
void router_agent_poke(router_agent_t *agent);

/* Whether the router currently knows this worker (the last register or heartbeat said so). */
bool router_agent_registered(const router_agent_t *agent);
/* Successful registrations so far (1 after the first; more after the router forgot it). */
uint32_t router_agent_registrations(const router_agent_t *agent);
/* Heartbeats the router acknowledged so far. */
uint64_t router_agent_heartbeats(const router_agent_t *agent);
/* The worker id in use. */
const char *router_agent_worker_id(const router_agent_t *agent);

/* Stops heartbeating, cancels a call in flight and frees the agent once its libuv handles
 * have closed (keep running the loop). Accepts NULL. Thread: loop thread. */
void router_agent_destroy(router_agent_t *agent);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_ROUTER_H */
