/*
 * registry.c: live workers and placement for the router (see router.h).
 *
 * A flat array under one mutex: a cluster has tens to hundreds of workers and placement is a
 * linear scan, far cheaper than the RPCs around it.
 */
#include "router.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct router_registry {
    router_registry_params_t params;
    pthread_mutex_t mu;
    router_worker_t *workers; // [cap]
    size_t n, cap;
};

void router_registry_params_default(router_registry_params_t *params)
{
    *params = (router_registry_params_t){
        .lease_ms = 1000,
        .expiry_leases = 3,
        .failure_backoff_ms = 2000,
        .max_workers = 1024,
    };
}

fy_status_t router_registry_create(const router_registry_params_t *params,
                                   router_registry_t **reg_p)
{
    router_registry_t *reg = calloc(1, sizeof(*reg));
    if (reg == NULL)
        return FY_ERR_NO_MEMORY;
    if (params != NULL)
        reg->params = *params;
    else
        router_registry_params_default(&reg->params);
    if (reg->params.max_workers == 0 || reg->params.lease_ms == 0 ||
        reg->params.expiry_leases == 0) {
        free(reg);
        return FY_ERR_INVALID_ARG;
    }
    pthread_mutex_init(&reg->mu, NULL);
    *reg_p = reg;
    return FY_OK;
}

void router_registry_destroy(router_registry_t *reg)
{
    if (reg == NULL)
        return;
    pthread_mutex_destroy(&reg->mu);
    free(reg->workers);
    free(reg);
}

static router_worker_t *find_locked(router_registry_t *reg, const char *id)
{
    if (id == NULL)
        return NULL;
    for (size_t i = 0; i < reg->n; i++)
        if (strcmp(reg->workers[i].id, id) == 0)
            return &reg->workers[i];
    return NULL;
}

fy_status_t router_registry_register(router_registry_t *reg, const router_worker_t *info,
                                     uint64_t now_ns)
{
    if (info == NULL || info->id[0] == '\0' || memchr(info->id, '\0', sizeof(info->id)) == NULL)
        return FY_ERR_INVALID_ARG;
    if (info->role != ROUTER_ROLE_PREFILL && info->role != ROUTER_ROLE_DECODE)
        return FY_ERR_INVALID_ARG;
    pthread_mutex_lock(&reg->mu);
    router_worker_t *w = find_locked(reg, info->id);
    if (w == NULL) {
        if (reg->n >= reg->params.max_workers) {
            pthread_mutex_unlock(&reg->mu);
            return FY_ERR_RESOURCE_EXHAUSTED;
        }
        if (reg->n == reg->cap) {
            size_t cap = reg->cap ? reg->cap * 2 : 16;
            router_worker_t *grown = realloc(reg->workers, cap * sizeof(*grown));
            if (grown == NULL) {
                pthread_mutex_unlock(&reg->mu);
                return FY_ERR_NO_MEMORY;
            }
            reg->workers = grown;
            reg->cap = cap;
        }
        w = &reg->workers[reg->n++];
    }
    *w = *info;
    w->id[sizeof(w->id) - 1] = '\0';
    w->rpc_address[sizeof(w->rpc_address) - 1] = '\0';
    w->kv_address[sizeof(w->kv_address) - 1] = '\0';
    w->pair_link[sizeof(w->pair_link) - 1] = '\0';
    w->node_id[sizeof(w->node_id) - 1] = '\0';
    w->pair_device[sizeof(w->pair_device) - 1] = '\0';
    w->last_seen_ns = now_ns;
    w->avoid_until_ns = 0;
    w->consecutive_failures = 0;
    pthread_mutex_unlock(&reg->mu);
    return FY_OK;
}

fy_status_t router_registry_heartbeat(router_registry_t *reg, const char *id,
                                      const router_load_t *load, uint64_t now_ns)
{
    pthread_mutex_lock(&reg->mu);
    router_worker_t *w = find_locked(reg, id);
    if (w == NULL) {
        pthread_mutex_unlock(&reg->mu);
        return FY_ERR_NOT_FOUND;
    }
    if (load != NULL)
        w->load = *load; // the worker's own figures replace what placement booked
    w->last_seen_ns = now_ns;
    pthread_mutex_unlock(&reg->mu);
    return FY_OK;
}

static void remove_at_locked(router_registry_t *reg, size_t i)
{
    reg->workers[i] = reg->workers[reg->n - 1];
    reg->n--;
}

fy_status_t router_registry_remove(router_registry_t *reg, const char *id)
{
    pthread_mutex_lock(&reg->mu);
    router_worker_t *w = find_locked(reg, id);
    if (w != NULL)
        remove_at_locked(reg, (size_t)(w - reg->workers));
    pthread_mutex_unlock(&reg->mu);
    return w != NULL ? FY_OK : FY_ERR_NOT_FOUND;
}

fy_status_t router_registry_set_draining(router_registry_t *reg, const char *id, bool draining)
{
    pthread_mutex_lock(&reg->mu);
    router_worker_t *w = find_locked(reg, id);
    if (w != NULL)
        w->draining = draining;
    pthread_mutex_unlock(&reg->mu);
    return w != NULL ? FY_OK : FY_ERR_NOT_FOUND;
}

size_t router_registry_expire(router_registry_t *reg, uint64_t now_ns, char (*ids_p)[64],
                              size_t max_ids)
{
    uint64_t limit_ns = (uint64_t)reg->params.lease_ms * reg->params.expiry_leases * 1000000ull;
    size_t removed = 0;
    pthread_mutex_lock(&reg->mu);
    for (size_t i = 0; i < reg->n;) {
        router_worker_t *w = &reg->workers[i];
        if (now_ns > w->last_seen_ns && now_ns - w->last_seen_ns > limit_ns) {
            if (ids_p != NULL && removed < max_ids)
                memcpy(ids_p[removed], w->id, sizeof(w->id));
            removed++;
            remove_at_locked(reg, i);
            continue;
        }
        i++;
    }
    pthread_mutex_unlock(&reg->mu);
    return removed;
}

void router_registry_report(router_registry_t *reg, const char *id, bool ok, uint64_t now_ns)
{
    pthread_mutex_lock(&reg->mu);
    router_worker_t *w = find_locked(reg, id);
    if (w != NULL) {
        if (ok) {
            w->consecutive_failures = 0;
            w->avoid_until_ns = 0;
        } else {
            uint32_t shift = FY_MIN(w->consecutive_failures, 6u); // at most 64x the base
            uint64_t backoff_ns = (uint64_t)reg->params.failure_backoff_ms * 1000000ull << shift;
            w->consecutive_failures++;
            w->avoid_until_ns = now_ns + backoff_ns;
        }
    }
    pthread_mutex_unlock(&reg->mu);
}

// A worker that may take new work for this model now.
static bool usable(const router_worker_t *w, router_role_t role, uint64_t fingerprint,
                   const char *exclude)
{
    if (w->role != role || w->draining)
        return false;
    if (fingerprint != 0 && w->model_fingerprint != fingerprint)
        return false;
    return exclude == NULL || strcmp(w->id, exclude) != 0;
}

// Lower is better: healthy before backed-off, then fewest queued prefill tokens.
static bool prefill_better(const router_worker_t *a, const router_worker_t *b, uint64_t now_ns)
{
    bool a_ok = a->avoid_until_ns <= now_ns, b_ok = b->avoid_until_ns <= now_ns;
    if (a_ok != b_ok)
        return a_ok;
    return a->load.queued_prefill_tokens < b->load.queued_prefill_tokens;
}

// Healthy first, then most free pages, then fewest running sequences.
static bool decode_better(const router_worker_t *a, const router_worker_t *b, uint64_t now_ns)
{
    bool a_ok = a->avoid_until_ns <= now_ns, b_ok = b->avoid_until_ns <= now_ns;
    if (a_ok != b_ok)
        return a_ok;
    if (a->load.free_kv_pages != b->load.free_kv_pages)
        return a->load.free_kv_pages > b->load.free_kv_pages;
    return a->load.running_sequences < b->load.running_sequences;
}

bool router_can_pair(const router_worker_t *pw, const router_worker_t *dw)
{
    return pw->pair_link[0] != '\0' && pw->node_id[0] != '\0' &&
           strcmp(pw->pair_link, dw->pair_link) == 0 && strcmp(pw->node_id, dw->node_id) == 0 &&
           (pw->pair_device[0] == '\0' || strcmp(pw->pair_device, dw->pair_device) != 0);
}

/* A decode worker best_p can pair with, in place of best_d: usable, out of backoff, with
 * room, and at least half best_d's free pages; NULL if none. */
static router_worker_t *paired_decode(router_registry_t *reg, const router_place_req_t *req,
                                      const router_worker_t *best_p,
                                      const router_worker_t *best_d, uint64_t now_ns)
{
    router_worker_t *pick = NULL;
    for (size_t i = 0; i < reg->n; i++) {
        router_worker_t *w = &reg->workers[i];
        if (!usable(w, ROUTER_ROLE_DECODE, req->model_fingerprint, req->exclude_decode) ||
            !router_can_pair(best_p, w) || w->avoid_until_ns > now_ns ||
            w->load.free_kv_pages < req->kv_pages ||
            w->load.free_kv_pages < best_d->load.free_kv_pages / 2)
            continue;
        if (pick == NULL || decode_better(w, pick, now_ns))
            pick = w;
    }
    return pick;
}

fy_status_t router_registry_place(router_registry_t *reg, const router_place_req_t *req,
                                  uint64_t now_ns, router_worker_t *prefill_p,
                                  router_worker_t *decode_p)
{
    if (req == NULL)
        return FY_ERR_INVALID_ARG;
    pthread_mutex_lock(&reg->mu);
    router_worker_t *best_p = NULL, *best_d = NULL;
    bool any_decode = false;
    for (size_t i = 0; i < reg->n; i++) {
        router_worker_t *w = &reg->workers[i];
        if (usable(w, ROUTER_ROLE_PREFILL, req->model_fingerprint, req->exclude_prefill)) {
            if (best_p == NULL || prefill_better(w, best_p, now_ns))
                best_p = w;
        }
        if (usable(w, ROUTER_ROLE_DECODE, req->model_fingerprint, req->exclude_decode)) {
            any_decode = true;
            if (w->load.free_kv_pages < req->kv_pages)
                continue;
            if (best_d == NULL || decode_better(w, best_d, now_ns))
                best_d = w;
        }
    }
    fy_status_t st = FY_OK;
    if (best_p == NULL || !any_decode) {
        st = FY_ERR_UNAVAILABLE;
    } else if (best_d == NULL) {
        st = FY_ERR_RESOURCE_EXHAUSTED;
    } else {
        if (!router_can_pair(best_p, best_d)) {
            router_worker_t *near = paired_decode(reg, req, best_p, best_d, now_ns);
            if (near != NULL)
                best_d = near;
        }
        // Book the request so the next placement before a heartbeat sees it.
        best_p->load.queued_prefill_tokens += req->prompt_tokens;
        best_d->load.free_kv_pages -= req->kv_pages;
        best_d->load.running_sequences++;
        if (prefill_p != NULL)
            *prefill_p = *best_p;
        if (decode_p != NULL)
            *decode_p = *best_d;
    }
    pthread_mutex_unlock(&reg->mu);
    return st;
}

void router_registry_release(router_registry_t *reg, const char *prefill_id,
                             uint32_t prompt_tokens, const char *decode_id, uint64_t kv_pages)
{
    pthread_mutex_lock(&reg->mu);
    router_worker_t *p = find_locked(reg, prefill_id);
    if (p != NULL)
        p->load.queued_prefill_tokens -= FY_MIN(p->load.queued_prefill_tokens, prompt_tokens);
    router_worker_t *d = find_locked(reg, decode_id);
    if (d != NULL) {
        d->load.free_kv_pages =
            FY_MIN(d->load.free_kv_pages + kv_pages, FY_MAX(d->load.total_kv_pages,
                                                             d->load.free_kv_pages));
        if (d->load.running_sequences > 0)
            d->load.running_sequences--;
    }
    pthread_mutex_unlock(&reg->mu);
}

size_t router_registry_snapshot(router_registry_t *reg, router_worker_t *out, size_t max)
{
    pthread_mutex_lock(&reg->mu);
    size_t n = reg->n;
    if (out != NULL && n > 0 && max > 0)
        memcpy(out, reg->workers, FY_MIN(n, max) * sizeof(*out));
    pthread_mutex_unlock(&reg->mu);
    return n;
}

uint32_t router_registry_lease_ms(const router_registry_t *reg)
{
    return reg->params.lease_ms;
}

fy_status_t router_registry_get(router_registry_t *reg, const char *id, router_worker_t *out)
{
    pthread_mutex_lock(&reg->mu);
    router_worker_t *w = find_locked(reg, id);
    if (w != NULL && out != NULL)
        *out = *w;
    pthread_mutex_unlock(&reg->mu);
    return w != NULL ? FY_OK : FY_ERR_NOT_FOUND;
}
