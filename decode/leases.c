/*
 * leases.c: page reservations with expiry for admission control (see decode.h).
 *
 * Accounting: each live reservation holds max(pages promised, pages used) of the pool; a
 * committed one holds only what it uses. available = total - sum(held).
 */
#include "decode.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct decode_leases {
    pthread_mutex_t mu;
    uint64_t total_pages;
    uint64_t held_pages;
    uint64_t next_id;
    decode_lease_t *items; // [cap]
    size_t n, cap;
};

static uint64_t held_by(const decode_lease_t *l)
{
    return l->expires_ns == 0 ? l->pages_used : FY_MAX(l->pages, l->pages_used);
}

fy_status_t decode_leases_create(uint64_t total_pages, decode_leases_t **leases_p)
{
    decode_leases_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return FY_ERR_NO_MEMORY;
    pthread_mutex_init(&t->mu, NULL);
    t->total_pages = total_pages;
    t->next_id = 1;
    *leases_p = t;
    return FY_OK;
}

void decode_leases_destroy(decode_leases_t *t)
{
    if (t == NULL)
        return;
    pthread_mutex_destroy(&t->mu);
    free(t->items);
    free(t);
}

static decode_lease_t *find_locked(decode_leases_t *t, uint64_t id)
{
    for (size_t i = 0; i < t->n; i++)
        if (t->items[i].id == id)
            return &t->items[i];
    return NULL;
}

fy_status_t decode_leases_reserve(decode_leases_t *t, const char *request_id, uint64_t pages,
                                  uint32_t lease_ms, uint64_t now_ns, uint64_t *id_p)
{
    if (request_id == NULL || request_id[0] == '\0' || pages == 0 || lease_ms == 0 ||
        strlen(request_id) >= sizeof(((decode_lease_t *)0)->request_id))
        return FY_ERR_INVALID_ARG;
    pthread_mutex_lock(&t->mu);
    fy_status_t st = FY_OK;
    for (size_t i = 0; i < t->n; i++) {
        if (strcmp(t->items[i].request_id, request_id) == 0) {
            st = FY_ERR_EXISTS;
            goto out;
        }
    }
    if (pages > t->total_pages - t->held_pages) {
        st = FY_ERR_RESOURCE_EXHAUSTED;
        goto out;
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        decode_lease_t *grown = realloc(t->items, cap * sizeof(*grown));
        if (grown == NULL) {
            st = FY_ERR_NO_MEMORY;
            goto out;
        }
        t->items = grown;
        t->cap = cap;
    }
    decode_lease_t *l = &t->items[t->n++];
    memset(l, 0, sizeof(*l));
    l->id = t->next_id++;
    strcpy(l->request_id, request_id); // length checked above
    l->pages = pages;
    l->expires_ns = now_ns + (uint64_t)lease_ms * 1000000ull;
    if (l->expires_ns == 0)
        l->expires_ns = 1;
    t->held_pages += pages;
    *id_p = l->id;
out:
    pthread_mutex_unlock(&t->mu);
    return st;
}

// Changes a lease under the lock and keeps held_pages in step.
static fy_status_t modify(decode_leases_t *t, uint64_t id, uint64_t add_used, uint64_t add_pages,
                          bool commit)
{
    pthread_mutex_lock(&t->mu);
    decode_lease_t *l = find_locked(t, id);
    if (l == NULL) {
        pthread_mutex_unlock(&t->mu);
        return FY_ERR_NOT_FOUND;
    }
    decode_lease_t next = *l;
    if (add_used > 0) {
        if (next.pages_used + add_used > next.pages) {
            pthread_mutex_unlock(&t->mu);
            return FY_ERR_RESOURCE_EXHAUSTED;
        }
        next.pages_used += add_used;
    }
    if (add_pages > 0) {
        next.pages += add_pages;
        next.pages_used += add_pages; // growth is allocated at once (tail pages)
    }
    if (commit)
        next.expires_ns = 0;
    uint64_t before = held_by(l), after = held_by(&next);
    if (after > before && after - before > t->total_pages - t->held_pages) {
        pthread_mutex_unlock(&t->mu);
        return FY_ERR_RESOURCE_EXHAUSTED;
    }
    t->held_pages = t->held_pages - before + after;
    *l = next;
    pthread_mutex_unlock(&t->mu);
    return FY_OK;
}

fy_status_t decode_leases_use(decode_leases_t *t, uint64_t id, uint64_t pages)
{
    return modify(t, id, pages, 0, false);
}

fy_status_t decode_leases_renew(decode_leases_t *t, uint64_t id, uint32_t lease_ms,
                                uint64_t now_ns)
{
    pthread_mutex_lock(&t->mu);
    decode_lease_t *l = find_locked(t, id);
    if (l != NULL && l->expires_ns != 0) {
        uint64_t until = now_ns + (uint64_t)lease_ms * 1000000ull;
        if (until > l->expires_ns)
            l->expires_ns = until;
    }
    pthread_mutex_unlock(&t->mu);
    return l != NULL ? FY_OK : FY_ERR_NOT_FOUND;
}

fy_status_t decode_leases_commit(decode_leases_t *t, uint64_t id)
{
    return modify(t, id, 0, 0, true);
}

fy_status_t decode_leases_grow(decode_leases_t *t, uint64_t id, uint64_t pages)
{
    return modify(t, id, 0, pages, false);
}

fy_status_t decode_leases_release(decode_leases_t *t, uint64_t id)
{
    pthread_mutex_lock(&t->mu);
    decode_lease_t *l = find_locked(t, id);
    if (l == NULL) {
        pthread_mutex_unlock(&t->mu);
        return FY_ERR_NOT_FOUND;
    }
    t->held_pages -= held_by(l);
    *l = t->items[--t->n];
    pthread_mutex_unlock(&t->mu);
    return FY_OK;
}

fy_status_t decode_leases_get(decode_leases_t *t, uint64_t id, decode_lease_t *lease_p)
{
    pthread_mutex_lock(&t->mu);
    decode_lease_t *l = find_locked(t, id);
    if (l != NULL && lease_p != NULL)
        *lease_p = *l;
    pthread_mutex_unlock(&t->mu);
    return l != NULL ? FY_OK : FY_ERR_NOT_FOUND;
}

size_t decode_leases_expire(decode_leases_t *t, uint64_t now_ns, decode_lease_t *expired_p,
                            size_t max)
{
    size_t n_expired = 0;
    pthread_mutex_lock(&t->mu);
    for (size_t i = 0; i < t->n;) {
        decode_lease_t *l = &t->items[i];
        if (l->expires_ns != 0 && l->expires_ns <= now_ns) {
            if (expired_p != NULL && n_expired < max)
                expired_p[n_expired] = *l;
            n_expired++;
            t->held_pages -= held_by(l);
            *l = t->items[--t->n];
            continue;
        }
        i++;
    }
    pthread_mutex_unlock(&t->mu);
    return n_expired;
}

uint64_t decode_leases_available(decode_leases_t *t)
{
    pthread_mutex_lock(&t->mu);
    uint64_t a = t->total_pages - t->held_pages;
    pthread_mutex_unlock(&t->mu);
    return a;
}

size_t decode_leases_count(decode_leases_t *t)
{
    pthread_mutex_lock(&t->mu);
    size_t n = t->n;
    pthread_mutex_unlock(&t->mu);
    return n;
}
