/* The multiplier search of the optimizer (the bracket and bisection of encode.c's solve) as a
 * state machine, compiled by encode.c (one multiplier at a time) and by encode.cu, whose
 * choose_kernel evaluates several steps of it in one pass over the items.
 *
 * The search finds the smallest multiplier lambda whose choice fits the byte target: from
 * lambda0, a bracket widened by factors of 64 (downward while lambda fits, to 0 when even
 * 1e-30 fits; upward while it does not, to 1e30), then bisection in log space until the
 * bracket is 1 % wide. Each step asks for the frame bytes at one multiplier, and which
 * multiplier comes next depends only on whether those bytes fit. So the multipliers of the
 * next k steps, for every outcome, form a binary tree of at most 2^k - 1 nodes, known before
 * any of them is measured: kvc_ms_tree lists them, a pass measures them all, and kvc_ms_step
 * then takes the k steps with the measured outcomes. The steps, and with them every
 * multiplier and the result, are those of the serial search.
 *
 * Arithmetic: products and the square root are rounded once (no contraction); on the device
 * __dmul_rn and __dsqrt_rn, as the rest of the device optimizer rounds. */
#ifndef FERRY_KVCODEC_MULT_SEARCH_INT_H
#define FERRY_KVCODEC_MULT_SEARCH_INT_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __CUDACC__
#define KVC_MS_FN static __host__ __device__ __forceinline__
#else
#include <math.h>
#define KVC_MS_FN static inline
#endif

#if defined(__CUDA_ARCH__)
#define KVC_MS_MUL(a, b) __dmul_rn((a), (b))
#define KVC_MS_SQRT(x)   __dsqrt_rn(x)
#else
#define KVC_MS_MUL(a, b) ((a) * (b))
#define KVC_MS_SQRT(x)   sqrt(x)
#endif

#define KVC_MS_DEPTH 3 // steps a tree spans
#define KVC_MS_NODES 7 // 2^KVC_MS_DEPTH - 1

enum {
    KVC_MS_START,  // lo to be measured
    KVC_MS_DOWN,   // lo fits: try lo / 64 (0 below 1e-30)
    KVC_MS_UP,     // hi does not fit: try hi * 64
    KVC_MS_BISECT, // bytes(lo) > target >= bytes(hi), unless a bracket end was reached
    KVC_MS_ZERO,   // lambda 0 fits: the search is over, at 0
};

typedef struct {
    double lo, hi;
    int phase, it; // it: bisection steps taken
} kvc_ms_t;

KVC_MS_FN void kvc_ms_init(kvc_ms_t *s, double lambda0)
{
    s->lo = lambda0 > 0 ? lambda0 : 1e-6;
    s->hi = s->lo;
    s->phase = KVC_MS_START;
    s->it = 0;
}

/* The multiplier the search measures next into *lam; false when it is over (its result is
 * kvc_ms_result's). */
KVC_MS_FN bool kvc_ms_next(const kvc_ms_t *s, double *lam)
{
    switch (s->phase) {
    case KVC_MS_START:
        *lam = s->lo;
        return true;
    case KVC_MS_DOWN: {
        double l = s->lo / 64;
        *lam = l <= 1e-30 ? 0 : l;
        return true;
    }
    case KVC_MS_UP:
        *lam = s->hi * 64;
        return true;
    case KVC_MS_BISECT:
        if (s->it < 40 && s->hi > KVC_MS_MUL(s->lo, 1.01)) {
            *lam = KVC_MS_SQRT(KVC_MS_MUL(s->lo, s->hi));
            return true;
        }
        return false;
    default:
        return false;
    }
}

/* One step: the bytes at kvc_ms_next's multiplier fit the target or not. Only while
 * kvc_ms_next is true. */
KVC_MS_FN void kvc_ms_step(kvc_ms_t *s, bool fits)
{
    switch (s->phase) {
    case KVC_MS_START:
        s->phase = fits ? KVC_MS_DOWN : KVC_MS_UP;
        break;
    case KVC_MS_DOWN:
        s->hi = s->lo;
        s->lo /= 64;
        if (s->lo <= 1e-30) // lambda 0 was measured
            s->phase = fits ? KVC_MS_ZERO : KVC_MS_BISECT;
        else if (!fits)
            s->phase = KVC_MS_BISECT;
        break;
    case KVC_MS_UP:
        s->hi *= 64;
        if (s->hi >= 1e30 || fits)
            s->phase = KVC_MS_BISECT;
        break;
    case KVC_MS_BISECT: {
        double mid = KVC_MS_SQRT(KVC_MS_MUL(s->lo, s->hi));
        if (fits)
            s->hi = mid;
        else
            s->lo = mid;
        s->it++;
        break;
    }
    default:
        break;
    }
}

/* The search's multiplier once it is over: 0 when lambda 0 fits, else the bracket's upper
 * end (whose bytes fit, unless no multiplier up to 1e30 fits). */
KVC_MS_FN double kvc_ms_result(const kvc_ms_t *s)
{
    return s->phase == KVC_MS_ZERO ? 0 : s->hi;
}

/* The tree of the next KVC_MS_DEPTH steps from s: node k (children 2k + 1 when it fits,
 * 2k + 2 when not) measures lam[node[k]]; node[k] is -1 where the search is over before it or
 * no entry was left for it. The multipliers are appended to lam[*n ..], cap entries in all,
 * each once: a node whose multiplier is already in lam[0 .. *n) shares its entry. Nodes are
 * taken level by level, so a full lam leaves the deepest ones out. */
KVC_MS_FN void kvc_ms_tree(const kvc_ms_t *s, double *lam, int *n, int cap,
                           int node[KVC_MS_NODES])
{
    int m = *n;
    for (int k = 0; k < KVC_MS_NODES; k++) {
        node[k] = -1;
        // The node's state: s after the outcomes on the path to it (each ancestor measured).
        if (k > 0 && node[(k - 1) / 2] < 0)
            continue; // the search is over at its parent
        const int path = k + 1; // 1, then the outcomes from the root: 0 fits
        int depth = 0;
        for (int p = path; p > 1; p >>= 1)
            depth++;
        kvc_ms_t t = *s;
        for (int d = depth - 1; d >= 0; d--)
            kvc_ms_step(&t, ((path >> d) & 1) == 0);
        double l;
        if (!kvc_ms_next(&t, &l))
            continue;
        int j = 0;
        while (j < m && lam[j] != l)
            j++;
        if (j == m) {
            if (m == cap)
                continue; // not measured: the walk stops before it
            lam[m++] = l;
        }
        node[k] = j;
    }
    *n = m;
}

/* Takes the tree's steps: fits[j] says whether the bytes at lam[j] fit. Returns the steps
 * taken (fewer than KVC_MS_DEPTH when the search ended). */
KVC_MS_FN int kvc_ms_walk(kvc_ms_t *s, const int node[KVC_MS_NODES], const bool *fits)
{
    int k = 0, steps = 0;
    while (k < KVC_MS_NODES && node[k] >= 0) {
        const bool f = fits[node[k]];
        kvc_ms_step(s, f);
        steps++;
        k = 2 * k + (f ? 1 : 2);
    }
    return steps;
}

#endif
