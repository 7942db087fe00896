/* Test inputs whose ranges end in zeros of both signs. Such zeros compare equal, but the FP16
 * zero point of a range keeps the sign, so an encoder must take the one the CPU's scan order
 * meets first. Shared by test_encode_cuda.c and test_quant_emu.cc (C and C++). */
#ifndef FERRY_TESTS_KVCODEC_ZERO_TIES_H
#define FERRY_TESTS_KVCODEC_ZERO_TIES_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* Element c of token t (val: of V) given its FP16 bits x. Only a range's lower end can change
 * the bytes (its zero point is the FP16 floor of the minimum; the scale comes from max - zero,
 * the same for +0 and -0), so the pattern puts zeros of both signs at the minimum:
 * - channels c % 16 == 5 of K and V are non-negative and zero at t % 3 != 2: -0 at the even
 *   tokens of the first 8 of every 32, +0 elsewhere, so a group's channel range meets -0 first
 *   in some of its warps' token runs and +0 first in others;
 * - value rows t % 7 == 0 are non-negative with zeros at channel 3 (first in channel order) and
 *   at channels 10, 18, 26, ... (kvc_row_minmax's lane 2, which comes before lane 3): channel
 *   10, first within lane 2, has one sign, alternating with t, and channel 3 and the rest of
 *   lane 2 the other. */
static inline uint16_t kvt_zero_tie(uint32_t t, uint32_t c, int val, uint16_t x)
{
    const uint16_t ax = (uint16_t)(x & 0x7fffu), pz = 0, nz = 0x8000u;
    if (c % 16 == 5)
        return t % 3 == 2 ? ax : (t % 32 < 8 && t % 2 == 0) ? nz : pz;
    if (val && t % 7 == 0) {
        const uint16_t first = (t / 7) % 2 ? nz : pz, other = first ^ 0x8000u;
        if (c == 10)
            return first;
        if (c == 3 || (c % 8 == 2 && c > 10))
            return other;
        return ax;
    }
    return x;
}

/* Random FP16 K and V rows of n_kv heads x n tokens x d channels (element c of token t of head h
 * at h hs + t ts + c; the scale grows with c % 7, V at half of K's) with kvt_zero_tie's
 * pattern; *rng is a xorshift64 state (not 0). */
static inline void kvt_tied_layer(uint16_t *K, uint16_t *V, uint32_t n_kv, uint32_t n, uint32_t d,
                                  size_t hs, size_t ts, uint64_t *rng)
{
    for (uint32_t h = 0; h < n_kv; h++)
        for (uint32_t t = 0; t < n; t++)
            for (uint32_t c = 0; c < d; c++) {
                float x[2];
                for (int u = 0; u < 2; u++) {
                    uint64_t r = *rng;
                    r ^= r << 13;
                    r ^= r >> 7;
                    r ^= r << 17;
                    *rng = r;
                    x[u] = (float)(r >> 40) / (float)(1u << 23) - 1.0f; // [-1, 1]
                }
                const float sc = 1.0f + (float)(c % 7);
                const size_t i = (size_t)h * hs + (size_t)t * ts + c;
                K[i] = kvt_zero_tie(t, c, 0, fy_fp32_to_fp16(x[0] * sc));
                V[i] = kvt_zero_tie(t, c, 1, fy_fp32_to_fp16(0.5f * x[1] * sc));
            }
}

#endif
