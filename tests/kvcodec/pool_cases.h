// The placement cases test_pool_cuda (kvc_place_cuda on a GPU) and test_place_emu (its device
// code on host threads) share: every option, rotated and not, with and without protected
// channels, odd token counts, several layers and heads, pages that fill up, dense and padded
// slots, partial groups, and long layers (test_pool_cuda places the odd layers of each case
// without the parser's counts: the host counts their maps, and from 65536 tokens the device).
#ifndef FERRY_TESTS_KVCODEC_POOL_CASES_H
#define FERRY_TESTS_KVCODEC_POOL_CASES_H

#include <stddef.h>
#include <stdint.h>

#include "kvcodec.h"
#include "kvtest.h"

typedef struct {
    const char *policy;
    double budget;
    int rotate; // -1: as the policy says
    uint32_t protect, n_heads, n_kv, n, d, n_layers;
    size_t page_bytes;
} pcase_t;

static const pcase_t kvt_pool_cases[] = {
    {"ferry", 0.25, -1, 0, 8, 2, 301, 64, 2, 8192},
    {"ferry", 0.25, 0, 0, 8, 2, 301, 64, 2, 8192},
    {"ferry", 0.125, 1, 4, 9, 3, 517, 64, 3, 16384},
    {"ferry", 0.0625, 0, 7, 4, 1, 1001, 128, 2, 32768},
    {"fp16", -1, 0, 0, 4, 2, 133, 64, 2, 8192},
    {"int8", -1, 0, 0, 4, 2, 299, 64, 2, 8192},
    {"int4", -1, 1, 0, 6, 3, 77, 128, 2, 32768},
    {"int4", -1, 0, 3, 6, 3, 77, 128, 2, 32768},
    {"int4", -1, 0, 0, 4, 1, 1500, 128, 2, 16384},
    {"kivi2", -1, 0, 0, 4, 2, 333, 64, 2, 16384},
    {"kivi2", -1, 1, 5, 4, 2, 333, 64, 2, 16384},
    {"snapkv", 0.25, 0, 0, 4, 2, 257, 64, 2, 8192},
    {"spectrum3", 0.25, 0, 0, 8, 4, 95, 64, 4, 8192},
    {"pdtrim", 0.25, 0, 0, 4, 4, 255, 96, 2, 16384},
    {"ferry", 0.5, 1, 0, 2, 1, 37, 32, 2, 4096},
    {"ferry", 0.25, 0, 2, 8, 8, 2049, 64, 1, 65536},
    // Long layers; at 65536 tokens and more, maps without counts are counted on the device.
    {"ferry", 0.25, -1, 0, 4, 2, 9001, 64, 2, 32768},
    {"int4", -1, 0, 0, 4, 1, 8192, 128, 1, 65536},
    {"int4", -1, 0, 0, 2, 1, 65537, 32, 2, 16384},
};

/* The case's policy and pool parameters (n_pages left at the default). */
static inline fy_status_t kvt_pool_case(const pcase_t *c, kvc_policy_t *pol, kvc_pool_params_t *pp)
{
    fy_status_t st = kvc_policy_builtin(c->policy, pol);
    if (st != FY_OK)
        return st;
    if (c->rotate >= 0)
        pol->rotate = c->rotate != 0;
    pol->protect_channels = c->protect;
    kvc_pool_params_default(pp);
    pp->head_dim = c->d;
    pp->group = pol->group;
    pp->protect = c->protect;
    pp->page_bytes = c->page_bytes;
    return FY_OK;
}

/* Layer l of a case's request (seeded by the case's seed) encoded into frame and parsed. */
static inline fy_status_t kvt_pool_case_frame(const pcase_t *c, kvc_encoder_t *enc, uint64_t seed,
                                              uint32_t l, uint8_t *frame, size_t cap,
                                              kvc_frame_t *f)
{
    kvt_layer_t L;
    kvt_layer_make(&L, seed * 31 + l, c->n_heads, c->n_kv, c->n, c->d, 32);
    kvc_layer_input_t in = kvt_input(&L, l);
    size_t len;
    fy_status_t st = kvc_encoder_encode_layer(enc, &in, NULL, frame, cap, &len, NULL);
    kvt_layer_free(&L);
    return st == FY_OK ? kvc_frame_parse(frame, len, f) : st;
}

#endif
