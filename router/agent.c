/*
 * agent.c: the worker side of registration (see router.h).
 *
 * One call at a time on the worker's loop: RegisterWorker until it succeeds (retry with
 * doubling delay), then a Heartbeat every period carrying the load and the drain flag. A
 * heartbeat answered known = false (the router restarted or expired this worker) sends the
 * worker back to registering at once; a failed heartbeat keeps the state and tries again next
 * period, so a router that comes back is told about the worker by the first heartbeat it
 * cannot place.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "ferry.pb-c.h"
#include "router.h"
#include "rpc.h"

#define MODULE "agent"

struct router_agent {
    uv_loop_t *loop;
    rpc_channel_t *ch;
    uv_timer_t timer;
    char router_address[128];
    char worker_id[64];
    char rpc_address[128];
    char kv_address[128];
    char pair_link[16], node_id[64], pair_device[64];
    uint64_t instance; // random: tells a restarted worker from the one before
    char model_name[128];
    router_role_t role;
    uint64_t fingerprint;
    uint32_t heartbeat_ms_param;
    uint32_t period_ms; // heartbeat period in use
    uint32_t retry_ms_initial;
    uint32_t retry_ms;   // next registration retry delay
    router_agent_load_cb load;
    void *load_arg;
    rpc_ccall_t *call; // in flight, or NULL
    bool registered;
    bool draining;
    bool poke;         // send a heartbeat as soon as the call in flight ends
    bool destroyed;
    bool warned_unreachable;
    uint32_t registrations;
    uint64_t heartbeats;
};

static void schedule(router_agent_t *a, uint64_t ms);
static void send_next(router_agent_t *a);

static uint32_t period_for(const router_agent_t *a, uint32_t lease_ms)
{
    uint32_t lease = lease_ms ? lease_ms : 1000;
    uint32_t p = a->heartbeat_ms_param ? FY_MIN(a->heartbeat_ms_param, lease) : lease / 2;
    return FY_MAX(p, 10u);
}

static void fill_load(router_agent_t *a, Ferry__V1__WorkerLoad *m)
{
    router_load_t load;
    memset(&load, 0, sizeof(load));
    if (a->load)
        a->load(a->load_arg, &load);
    m->queued_prefill_tokens = load.queued_prefill_tokens;
    m->running_sequences = load.running_sequences;
    m->free_kv_pages = load.free_kv_pages;
    m->total_kv_pages = load.total_kv_pages;
    m->page_bytes = load.page_bytes;
}

static void on_register_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    router_agent_t *a = arg;
    const Ferry__V1__RegisterResponse *r = (const Ferry__V1__RegisterResponse *)msg;
    a->period_ms = period_for(a, r->lease_ms);
}

static void on_register_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    router_agent_t *a = arg;
    a->call = NULL;
    if (a->destroyed)
        return;
    if (code != RPC_CODE_OK) {
        if (!a->warned_unreachable) {
            FY_LOG_WARN(MODULE, "cannot register %s with the router at %s: %s %s; retrying",
                        a->worker_id, a->router_address, rpc_code_name(code), message);
            a->warned_unreachable = true;
        }
        uint32_t delay = a->retry_ms;
        a->retry_ms = FY_MIN(a->retry_ms * 2, FY_MAX(a->period_ms, a->retry_ms_initial));
        schedule(a, delay);
        return;
    }
    a->registered = true;
    a->registrations++;
    a->warned_unreachable = false;
    a->retry_ms = a->retry_ms_initial;
    FY_LOG_INFO(MODULE, "%s registered with the router at %s (heartbeat every %u ms)",
                a->worker_id, a->router_address, a->period_ms);
    // A draining worker that registers again says so with its first heartbeat, at once.
    if (a->draining || a->poke)
        send_next(a);
    else
        schedule(a, a->period_ms);
}

static void on_heartbeat_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    router_agent_t *a = arg;
    const Ferry__V1__HeartbeatResponse *r = (const Ferry__V1__HeartbeatResponse *)msg;
    if (!r->known) {
        if (a->registered)
            FY_LOG_INFO(MODULE, "the router at %s forgot %s; registering again",
                        a->router_address, a->worker_id);
        a->registered = false;
    } else {
        a->heartbeats++;
    }
}

static void on_heartbeat_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    router_agent_t *a = arg;
    a->call = NULL;
    if (a->destroyed)
        return;
    if (code != RPC_CODE_OK) {
        if (!a->warned_unreachable) {
            FY_LOG_WARN(MODULE, "heartbeat of %s to %s failed: %s %s", a->worker_id,
                        a->router_address, rpc_code_name(code), message);
            a->warned_unreachable = true;
        }
        schedule(a, a->period_ms);
        return;
    }
    a->warned_unreachable = false;
    if (!a->registered || a->poke)
        send_next(a);
    else
        schedule(a, a->period_ms);
}

/* Starts Worker.<method>; when it cannot even start, tries again after retry_ms. */
static void start_call(router_agent_t *a, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *resp, rpc_ccall_msg_cb on_msg,
                       rpc_ccall_done_cb on_done, uint32_t retry_ms)
{
    char path[64];
    snprintf(path, sizeof(path), "/ferry.v1.Worker/%s", method);
    rpc_call_opts_t opts = {.timeout_ms = FY_MAX(a->period_ms, 1000u)};
    fy_status_t st = rpc_channel_call(a->ch, path, req, resp, &opts, on_msg, on_done, a, &a->call);
    if (st != FY_OK) {
        a->call = NULL;
        FY_LOG_ERROR(MODULE, "%s not sent: %s", method, fy_status_str(st));
        schedule(a, retry_ms);
    }
}

static void send_register(router_agent_t *a)
{
    Ferry__V1__RegisterRequest req = FERRY__V1__REGISTER_REQUEST__INIT;
    Ferry__V1__ModelInfo model = FERRY__V1__MODEL_INFO__INIT;
    Ferry__V1__WorkerLoad load = FERRY__V1__WORKER_LOAD__INIT;
    req.worker_id = a->worker_id;
    req.role = a->role == ROUTER_ROLE_PREFILL ? FERRY__V1__WORKER_ROLE__WORKER_ROLE_PREFILL
                                              : FERRY__V1__WORKER_ROLE__WORKER_ROLE_DECODE;
    req.rpc_address = a->rpc_address;
    req.kv_address = a->kv_address;
    req.pair_link = a->pair_link;
    req.node_id = a->node_id;
    req.pair_device = a->pair_device;
    req.instance = a->instance;
    model.name = a->model_name;
    model.fingerprint = a->fingerprint;
    req.model = &model;
    fill_load(a, &load);
    req.load = &load;
    start_call(a, "RegisterWorker", &req.base, &ferry__v1__register_response__descriptor,
               on_register_msg, on_register_done, a->retry_ms);
}

static void send_heartbeat(router_agent_t *a)
{
    Ferry__V1__HeartbeatRequest req = FERRY__V1__HEARTBEAT_REQUEST__INIT;
    Ferry__V1__WorkerLoad load = FERRY__V1__WORKER_LOAD__INIT;
    req.worker_id = a->worker_id;
    fill_load(a, &load);
    req.load = &load;
    req.draining = a->draining;
    a->poke = false;
    start_call(a, "Heartbeat", &req.base, &ferry__v1__heartbeat_response__descriptor,
               on_heartbeat_msg, on_heartbeat_done, a->period_ms);
}

static void send_next(router_agent_t *a)
{
    if (a->destroyed || a->call != NULL)
        return;
    uv_timer_stop(&a->timer);
    if (a->registered)
        send_heartbeat(a);
    else
        send_register(a);
}

static void on_timer(uv_timer_t *t)
{
    send_next(t->data);
}

static void schedule(router_agent_t *a, uint64_t ms)
{
    if (!a->destroyed)
        uv_timer_start(&a->timer, on_timer, ms, 0);
}

fy_status_t router_agent_create(struct uv_loop_s *loop, const router_agent_params_t *params,
                                router_agent_t **agent_p)
{
    if (loop == NULL || params == NULL || agent_p == NULL || params->router_address == NULL ||
        params->rpc_address == NULL || params->rpc_address[0] == '\0')
        return FY_ERR_INVALID_ARG;
    if (params->role != ROUTER_ROLE_PREFILL && params->role != ROUTER_ROLE_DECODE)
        return FY_ERR_INVALID_ARG;
    if (params->role == ROUTER_ROLE_DECODE &&
        (params->kv_address == NULL || params->kv_address[0] == '\0'))
        return FY_ERR_INVALID_ARG;
    router_agent_t *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return FY_ERR_NO_MEMORY;
    a->loop = loop;
    a->role = params->role;
    if (getrandom(&a->instance, sizeof(a->instance), 0) != (ssize_t)sizeof(a->instance))
        a->instance = fy_clock_realtime_ns() ^ ((uint64_t)getpid() << 32);
    a->fingerprint = params->model_fingerprint;
    a->heartbeat_ms_param = params->heartbeat_ms;
    a->retry_ms_initial = a->retry_ms = params->retry_ms ? params->retry_ms : 200;
    a->load = params->load;
    a->load_arg = params->load_arg;
    const char *role_name = params->role == ROUTER_ROLE_PREFILL ? "prefill" : "decode";
    int n1 = snprintf(a->router_address, sizeof(a->router_address), "%s",
                      params->router_address);
    int n2 = snprintf(a->rpc_address, sizeof(a->rpc_address), "%s", params->rpc_address);
    int n3 = snprintf(a->kv_address, sizeof(a->kv_address), "%s",
                      params->kv_address ? params->kv_address : "");
    int n4 = params->worker_id
                 ? snprintf(a->worker_id, sizeof(a->worker_id), "%s", params->worker_id)
                 : snprintf(a->worker_id, sizeof(a->worker_id), "%s@%s", role_name,
                            params->rpc_address);
    snprintf(a->model_name, sizeof(a->model_name), "%s",
             params->model_name ? params->model_name : "");
    bool pairs = params->pair_link != NULL && params->pair_link[0] != '\0' &&
                 params->node_id != NULL && params->node_id[0] != '\0';
    int n5 = snprintf(a->pair_link, sizeof(a->pair_link), "%s", pairs ? params->pair_link : "");
    int n6 = snprintf(a->node_id, sizeof(a->node_id), "%s", pairs ? params->node_id : "");
    int n7 = snprintf(a->pair_device, sizeof(a->pair_device), "%s",
                      pairs && params->pair_device != NULL ? params->pair_device : "");
    if (n1 <= 0 || (size_t)n1 >= sizeof(a->router_address) ||
        (size_t)n2 >= sizeof(a->rpc_address) || (size_t)n3 >= sizeof(a->kv_address) ||
        n4 <= 0 || (size_t)n4 >= sizeof(a->worker_id) || (size_t)n5 >= sizeof(a->pair_link) ||
        (size_t)n6 >= sizeof(a->node_id) || (size_t)n7 >= sizeof(a->pair_device)) {
        free(a);
        return FY_ERR_INVALID_ARG;
    }
    a->period_ms = period_for(a, 1000);
    const char *addrs[1] = {a->router_address};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = addrs;
    cp.n_addresses = 1;
    cp.backoff_initial_ms = 50;
    cp.backoff_max_ms = 1000;
    cp.connect_timeout_ms = 2000;
    cp.tls = params->tls;
    char bearer[300];
    if (params->api_key != NULL) {
        snprintf(bearer, sizeof(bearer), "Bearer %.256s", params->api_key);
        cp.authorization = bearer; // copied by the channel
    }
    fy_status_t st = rpc_channel_create(loop, &cp, &a->ch);
    if (st != FY_OK) {
        free(a);
        return st;
    }
    uv_timer_init(loop, &a->timer);
    a->timer.data = a;
    uv_update_time(loop); // the loop may have been idle (model loading): deadlines start now
    *agent_p = a;
    send_next(a);
    return FY_OK;
}

void router_agent_set_draining(router_agent_t *agent, bool draining)
{
    if (agent == NULL || agent->destroyed)
        return;
    if (agent->draining != draining)
        FY_LOG_INFO(MODULE, "%s %s", agent->worker_id,
                    draining ? "draining: telling the router" : "serving again");
    agent->draining = draining;
    router_agent_poke(agent);
}

void router_agent_poke(router_agent_t *agent)
{
    if (agent == NULL || agent->destroyed)
        return;
    agent->poke = true;
    if (agent->call == NULL)
        send_next(agent);
}

bool router_agent_registered(const router_agent_t *agent)
{
    return agent->registered;
}

uint32_t router_agent_registrations(const router_agent_t *agent)
{
    return agent->registrations;
}

uint64_t router_agent_heartbeats(const router_agent_t *agent)
{
    return agent->heartbeats;
}

const char *router_agent_worker_id(const router_agent_t *agent)
{
    return agent->worker_id;
}

static void on_timer_closed(uv_handle_t *h)
{
    free(h->data);
}

void router_agent_destroy(router_agent_t *agent)
{
    if (agent == NULL || agent->destroyed)
        return;
    agent->destroyed = true;
    if (agent->call != NULL)
        rpc_ccall_cancel(agent->call); // done runs now and sees destroyed
    rpc_channel_destroy(agent->ch);
    agent->ch = NULL;
    uv_timer_stop(&agent->timer);
    uv_close((uv_handle_t *)&agent->timer, on_timer_closed);
}
