/*
 * adaptive.c: per decode peer goodput and the budget that fits the TTFT target (adaptive.h).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adaptive.h"

#define PEERS_MAX 256

typedef struct {
    char addr[160];
    double goodput; /* bytes/s, EWMA */
    uint64_t samples;
    uint64_t last_used; /* for replacing the stalest peer when the table is full */
} peer_t;

struct pf_adaptive {
    pf_adaptive_params_t p;
    double ms_per_token; /* EWMA */
    peer_t peers[PEERS_MAX];
    int n_peers;
    uint64_t tick;
};

void pf_adaptive_params_default(pf_adaptive_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->budget_min = 0.125;
    p->budget_max = 1;
    p->alpha = 0.3;
    p->n_layers = 1;
    p->ms_per_token = 1;
}

fy_status_t pf_adaptive_create(const pf_adaptive_params_t *p, pf_adaptive_t **a_p)
{
    if (p == NULL || a_p == NULL || !(p->ttft_target_ms > 0) || !isfinite(p->ttft_target_ms) ||
        !(p->budget_min > 0) || p->budget_max > 1 || p->budget_min > p->budget_max ||
        !(p->alpha > 0) || p->alpha > 1 || p->n_layers < 1 || !(p->ms_per_token > 0))
        return FY_ERR_INVALID_ARG;
    pf_adaptive_t *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return FY_ERR_NO_MEMORY;
    a->p = *p;
    a->ms_per_token = p->ms_per_token;
    *a_p = a;
    return FY_OK;
}

void pf_adaptive_destroy(pf_adaptive_t *a)
{
    free(a);
}

static peer_t *find(const pf_adaptive_t *a, const char *addr)
{
    for (int i = 0; i < a->n_peers; i++) {
        if (strcmp(a->peers[i].addr, addr) == 0)
            return (peer_t *)&a->peers[i];
    }
    return NULL;
}

void pf_adaptive_observe(pf_adaptive_t *a, const char *peer, uint64_t wire_bytes,
                         double span_ms, double tail_ms, int n_tokens, double compute_ms)
{
    if (a == NULL || peer == NULL || strlen(peer) >= sizeof(a->peers[0].addr))
        return;
    a->tick++;
    if (n_tokens > 0 && compute_ms > 0 && isfinite(compute_ms)) {
        double m = compute_ms / n_tokens;
        a->ms_per_token = a->p.alpha * m + (1 - a->p.alpha) * a->ms_per_token;
    }
    if (wire_bytes == 0 || !(span_ms > 0) || !isfinite(span_ms))
        return;
    double g = (double)wire_bytes / (span_ms / 1e3);
    bool link_bound = tail_ms > 0.2 * span_ms;
    peer_t *pe = find(a, peer);
    if (pe == NULL) {
        if (a->n_peers < PEERS_MAX) {
            pe = &a->peers[a->n_peers++];
        } else {
            pe = &a->peers[0];
            for (int i = 1; i < a->n_peers; i++) {
                if (a->peers[i].last_used < pe->last_used)
                    pe = &a->peers[i];
            }
        }
        memset(pe, 0, sizeof(*pe));
        memcpy(pe->addr, peer, strlen(peer) + 1);
        pe->goodput = g;
    } else if (link_bound) {
        pe->goodput = a->p.alpha * g + (1 - a->p.alpha) * pe->goodput;
    } else if (g > pe->goodput) {
        pe->goodput = g; /* a lower bound above the estimate */
    }
    pe->samples++;
    pe->last_used = a->tick;
}

bool pf_adaptive_goodput(const pf_adaptive_t *a, const char *peer, double *bytes_per_s)
{
    const peer_t *pe = a && peer ? find(a, peer) : NULL;
    if (pe == NULL)
        return false;
    if (bytes_per_s)
        *bytes_per_s = pe->goodput;
    return true;
}

double pf_adaptive_choose(const pf_adaptive_t *a, const char *peer, int n_tokens,
                          uint64_t raw_bytes, uint64_t queued_tokens)
{
    double g;
    if (a == NULL || n_tokens <= 0 || raw_bytes == 0 || !pf_adaptive_goodput(a, peer, &g))
        return -1;
    double left = a->p.ttft_target_ms - (double)queued_tokens * a->ms_per_token;
    double compute = n_tokens * a->ms_per_token;
    double window_ms = fmax(left, compute) - compute / a->p.n_layers;
    double b = window_ms > 0 ? window_ms / 1e3 * g / (double)raw_bytes : 0;
    return fmin(a->p.budget_max, fmax(a->p.budget_min, b));
}
