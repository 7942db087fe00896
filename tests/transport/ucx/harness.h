/*
 * harness.h: helpers shared by the kvlink tests: a loop runner with a time limit, frame
 * contents that can be checked without keeping a copy, and a recorder for the link callbacks.
 */
#ifndef FERRY_TEST_KVLINK_HARNESS_H
#define FERRY_TEST_KVLINK_HARNESS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvlink.h"

/* Deterministic bytes for (request, layer): xorshift64 keyed by both. */
static inline void h_fill(uint8_t *p, size_t len, uint64_t request_id, uint32_t layer)
{
    uint64_t x = (request_id * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)layer << 32) ^ len ^ 1;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    x ^= x << 13;
    for (; i < len; i++)
        p[i] = (uint8_t)(x >> (8 * (i & 7)));
}

static inline bool h_check(const uint8_t *p, size_t len, uint64_t request_id, uint32_t layer)
{
    uint8_t tmp[4096];
    uint64_t x = (request_id * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)layer << 32) ^ len ^ 1;
    size_t i = 0;
    // Regenerate in chunks; same sequence as h_fill.
    while (i + 8 <= len) {
        size_t n = 0;
        for (; n + 8 <= sizeof(tmp) && i + n + 8 <= len; n += 8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            memcpy(tmp + n, &x, 8);
        }
        if (memcmp(tmp, p + i, n) != 0)
            return false;
        i += n;
    }
    x ^= x << 13;
    for (; i < len; i++)
        if (p[i] != (uint8_t)(x >> (8 * (i & 7))))
            return false;
    return true;
}

typedef bool (*h_cond_fn)(void *arg);

static inline void h_tick(uv_timer_t *t)
{
}

/* Runs the loop until cond(arg) holds or ms pass; returns whether cond held. */
static inline bool h_run_until(uv_loop_t *loop, h_cond_fn cond, void *arg, uint64_t ms)
{
    uv_timer_t guard; // wakes the loop so the condition and the clock are re-checked
    uv_timer_init(loop, &guard);
    uv_timer_start(&guard, h_tick, 2, 2);
    uint64_t until = fy_clock_ns() + ms * 1000000ull;
    bool ok = false;
    for (;;) {
        if (cond(arg)) {
            ok = true;
            break;
        }
        if (fy_clock_ns() > until)
            break;
        uv_run(loop, UV_RUN_ONCE);
    }
    uv_close((uv_handle_t *)&guard, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

/* Runs the loop for ms whatever happens. */
static inline bool h_false(void *arg)
{
    return false;
}
static inline void h_run_for(uv_loop_t *loop, uint64_t ms)
{
    h_run_until(loop, h_false, NULL, ms);
}

/* Closes every handle left on a test loop and closes the loop. */
static inline void h_close_walk(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}
static inline void h_loop_close(uv_loop_t *loop)
{
    uv_walk(loop, h_close_walk, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
}

#endif /* FERRY_TEST_KVLINK_HARNESS_H */
