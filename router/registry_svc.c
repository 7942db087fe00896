/*
 * registry_svc.c: the router side of worker registration (ferry.v1.Worker RegisterWorker and
 * Heartbeat) over a router_registry (see router.h).
 */
#include <stdio.h>
#include <string.h>

#include "ferry.pb-c.h"
#include "router.h"
#include "rpc.h"

#define MODULE "router"

static void load_from_msg(router_load_t *load, const Ferry__V1__WorkerLoad *m)
{
    memset(load, 0, sizeof(*load));
    if (m == NULL)
        return;
    load->queued_prefill_tokens = m->queued_prefill_tokens;
    load->running_sequences = m->running_sequences;
    load->free_kv_pages = m->free_kv_pages;
    load->total_kv_pages = m->total_kv_pages;
    load->page_bytes = m->page_bytes;
}

/* Copies s into dst (cap bytes); false when it does not fit. */
static bool copy_str(char *dst, size_t cap, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n >= cap)
        return false;
    memcpy(dst, s ? s : "", n);
    dst[n] = '\0';
    return true;
}

static void on_register(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    router_registry_t *reg = arg;
    const Ferry__V1__RegisterRequest *req = (const Ferry__V1__RegisterRequest *)msg;
    router_worker_t w;
    memset(&w, 0, sizeof(w));
    if (!copy_str(w.id, sizeof(w.id), req->worker_id) || w.id[0] == '\0') {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "worker_id empty or longer than 63 bytes");
        return;
    }
    if (!copy_str(w.rpc_address, sizeof(w.rpc_address), req->rpc_address) ||
        w.rpc_address[0] == '\0' ||
        !copy_str(w.kv_address, sizeof(w.kv_address), req->kv_address)) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "rpc_address empty or address too long");
        return;
    }
    if (!copy_str(w.pair_link, sizeof(w.pair_link), req->pair_link) ||
        !copy_str(w.node_id, sizeof(w.node_id), req->node_id) ||
        !copy_str(w.pair_device, sizeof(w.pair_device), req->pair_device)) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT,
                        "pair_link, node_id or pair_device too long");
        return;
    }
    if (req->role == FERRY__V1__WORKER_ROLE__WORKER_ROLE_PREFILL) {
        w.role = ROUTER_ROLE_PREFILL;
    } else if (req->role == FERRY__V1__WORKER_ROLE__WORKER_ROLE_DECODE) {
        w.role = ROUTER_ROLE_DECODE;
        if (w.kv_address[0] == '\0') {
            rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "a decode worker needs kv_address");
            return;
        }
    } else {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "role must be prefill or decode");
        return;
    }
    w.model_fingerprint = req->model ? req->model->fingerprint : 0;
    w.instance = req->instance;
    load_from_msg(&w.load, req->load);
    fy_status_t st = router_registry_register(reg, &w, fy_clock_ns());
    if (st != FY_OK) {
        rpc_call_finish(call, rpc_code_from_status(st), fy_status_str(st));
        return;
    }
    FY_LOG_INFO(MODULE, "worker %s registered: %s at %s%s%s, model %016llx%s%s%s%s", w.id,
                w.role == ROUTER_ROLE_PREFILL ? "prefill" : "decode", w.rpc_address,
                w.kv_address[0] ? ", kv " : "", w.kv_address,
                (unsigned long long)w.model_fingerprint, w.pair_link[0] ? ", pairs over " : "",
                w.pair_link, w.pair_link[0] ? " on node " : "", w.pair_link[0] ? w.node_id : "");
    Ferry__V1__RegisterResponse resp = FERRY__V1__REGISTER_RESPONSE__INIT;
    resp.lease_ms = router_registry_lease_ms(reg);
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void on_heartbeat(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    router_registry_t *reg = arg;
    const Ferry__V1__HeartbeatRequest *req = (const Ferry__V1__HeartbeatRequest *)msg;
    Ferry__V1__HeartbeatResponse resp = FERRY__V1__HEARTBEAT_RESPONSE__INIT;
    if (req->worker_id == NULL || req->worker_id[0] == '\0' || strlen(req->worker_id) >= 64) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "worker_id empty or too long");
        return;
    }
    router_load_t load;
    load_from_msg(&load, req->load);
    fy_status_t st = router_registry_heartbeat(reg, req->worker_id, req->load ? &load : NULL,
                                               fy_clock_ns());
    if (st == FY_OK) {
        resp.known = true;
        router_worker_t cur;
        if (router_registry_get(reg, req->worker_id, &cur) == FY_OK &&
            cur.draining != req->draining) {
            router_registry_set_draining(reg, req->worker_id, req->draining);
            FY_LOG_INFO(MODULE, "worker %s %s", req->worker_id,
                        req->draining ? "draining: no new work" : "serving again");
        }
    } else if (st != FY_ERR_NOT_FOUND) {
        rpc_call_finish(call, rpc_code_from_status(st), fy_status_str(st));
        return;
    } else {
        FY_LOG_INFO(MODULE, "heartbeat from unknown worker %s: asked to register again",
                    req->worker_id);
    }
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

fy_status_t router_registry_serve(struct rpc_server *srv, router_registry_t *reg)
{
    if (srv == NULL || reg == NULL)
        return FY_ERR_INVALID_ARG;
    static rpc_handler_cb handlers[16];
    const ProtobufCServiceDescriptor *d = &ferry__v1__worker__descriptor;
    if (d->n_methods > FY_ARRAY_SIZE(handlers))
        return FY_ERR_INTERNAL;
    for (unsigned i = 0; i < d->n_methods; i++) {
        if (strcmp(d->methods[i].name, "RegisterWorker") == 0)
            handlers[i] = on_register;
        else if (strcmp(d->methods[i].name, "Heartbeat") == 0)
            handlers[i] = on_heartbeat;
    }
    return rpc_server_add_service(srv, d, handlers, NULL, reg);
}
