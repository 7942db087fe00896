// The shared decode attention test cases (attend_cases.h).
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attend_cases.h"
#include "kvtest.h"

static uint64_t g_rng = 12345;

float kva_frand(void)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

static void place_one(kva_built_t *B, const kva_config_t *C, uint32_t i)
{
    const kva_seq_t *S = &C->seqs[i];
    assert_int_equal(kvc_seq_create(B->pool, 1, C->n_kv, 0x1234abcd5678ef00ull, 77, &B->seqs[i]),
                     FY_OK);
    if (S->n_tokens == 0)
        return;
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin(S->policy, &pol), FY_OK);
    if (S->rotate >= 0)
        pol.rotate = S->rotate != 0;
    pol.protect_channels = C->protect;
    pol.group = C->group;
    kvt_layer_t L;
    kvt_layer_make(&L, 1000 + i * 17 + C->d, C->n_kv * C->grp, C->n_kv, S->n_tokens, C->d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, 1, S->budget);
    kvc_encoder_t *enc;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc), len;
    uint8_t *frame = malloc(cap);
    kvc_layer_input_t in = kvt_input(&L, 0);
    assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, frame, cap, &len, NULL), FY_OK);
    kvc_encoder_destroy(enc);
    kvc_frame_t f;
    assert_int_equal(kvc_frame_parse(frame, len, &f), FY_OK);
    assert_int_equal(kvc_place(B->seqs[i], &f), FY_OK);
    free(frame);
    uint16_t k[512], v[512]; // [d]
    for (uint32_t t = 0; t < S->append; t++) {
        for (uint32_t h = 0; h < C->n_kv; h++) {
            for (uint32_t c = 0; c < C->d; c++) {
                k[c] = fy_fp32_to_fp16(kva_frand() * 3.0f);
                v[c] = fy_fp32_to_fp16(kva_frand());
            }
            assert_int_equal(kvc_seq_append(B->seqs[i], 0, h, k, v), FY_OK);
        }
    }
    if (S->convert) {
        uint32_t n_conv = 0;
        assert_int_equal(
            kvc_seq_convert(B->seqs[i], 0, 0, KVC_OPT_F16, KVC_OPT_Q4, true, 0, &n_conv), FY_OK);
        assert_true(n_conv > 0);
    }
    kvt_layer_free(&L);
}

void kva_build(kva_built_t *B, const kva_config_t *C)
{
    memset(B, 0, sizeof(*B));
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = C->d;
    pp.n_pages = C->n_pages;
    pp.page_bytes = C->page_bytes;
    pp.group = C->group;
    pp.protect = C->protect;
    assert_int_equal(kvc_pool_create(&pp, &B->pool), FY_OK);
    B->n_seqs = C->n_seqs;
    B->n_kv = C->n_kv;
    B->n_heads = C->n_kv * C->grp;
    B->d = C->d;
    B->protect = C->protect;
    B->group = pp.group;
    B->page_bytes = C->page_bytes;
    for (uint32_t i = 0; i < C->n_seqs; i++)
        place_one(B, C, i);
    for (uint32_t i = 0; i < C->n_seqs; i++) {
        for (uint32_t h = 0; h < C->n_kv; h++) {
            uint32_t n;
            const kvc_page_id_t *ids = kvc_seq_pages(B->seqs[i], 0, h, &n);
            for (uint32_t j = 0; j < n; j++) {
                const uint8_t *pg = kvc_page_data(B->pool, ids[j]);
                B->opt_pages[kvc_page_opt(B->pool, ids[j])]++;
                B->rot_pages += (pg[1] & KVC_PAGE_FLAG_ROTATED) != 0;
            }
        }
    }
}

void kva_unbuild(kva_built_t *B)
{
    for (uint32_t i = 0; i < B->n_seqs; i++)
        kvc_seq_destroy(B->seqs[i]);
    kvc_pool_destroy(B->pool);
}

const kva_config_t kva_configs[] = {
    // d 64, GQA 3:1, no protection, 32 KiB pages.
    {64,
     2,
     3,
     0,
     32768,
     512,
     7,
     {{"ferry", 0.2, -1, 701, 0, false},
      {"ferry", 0.25, 0, 333, 19, false},
      {"int8", -1, -1, 129, 0, false},
      {"int4", -1, 1, 257, 0, false},
      {"kivi2", -1, -1, 77, 5, false},
      {"fp16", -1, -1, 301, 0, true},
      {"", 0, 0, 0, 0, false}},
     32},
    // d 128, GQA 1:1, MixKVQ P = 4, 32 KiB pages.
    {128,
     2,
     1,
     4,
     32768,
     512,
     6,
     {{"ferry", 0.2, -1, 517, 0, false},
      {"", 0, 0, 0, 0, false},
      {"ferry", 0.3, 0, 255, 3, false},
      {"int4", -1, 0, 97, 0, false},
      {"kivi2", -1, 1, 1023, 0, false},
      {"fp16", -1, -1, 33, 0, false}},
     32},
    // d 128, GQA 3:1, P = 2, 16 KiB pages (more pages per list).
    {128,
     1,
     3,
     2,
     16384,
     1024,
     5,
     {{"ferry", 0.15, -1, 1201, 0, false},
      {"int8", -1, -1, 211, 0, false},
      {"ferry", 0.25, 0, 605, 41, true},
      {"kivi2", -1, -1, 9, 0, false},
      {"int4", -1, 1, 333, 0, false}},
     32},
    // d 64, GQA 1:1, P = 0, 8 KiB pages, three kv heads.
    {64,
     3,
     1,
     0,
     8192,
     2048,
     4,
     {{"ferry", 0.2, -1, 999, 0, false},
      {"fp16", -1, -1, 131, 7, false},
      {"ferry", 0.35, 0, 451, 0, false},
      {"kivi2", -1, 1, 263, 0, false}},
     32},
    // The Llama-3 shape for the tensor-core kernel: d 128, GQA 4:1, no protection, every option.
    {128,
     2,
     4,
     0,
     32768,
     512,
     6,
     {{"ferry", 0.2, -1, 1029, 0, false},
      {"int4", -1, 1, 333, 0, false},
      {"int8", -1, -1, 211, 3, false},
      {"kivi2", -1, 0, 517, 0, false},
      {"fp16", -1, -1, 190, 1, true},
      {"ferry", 0.3, 0, 77, 0, false}},
     32},
    // GQA 4:1 with MixKVQ P = 3 at d 64, and GQA 2:1 with P = 5 at d 128 (16 KiB pages).
    {64,
     2,
     4,
     3,
     16384,
     1024,
     4,
     {{"ferry", 0.2, -1, 801, 0, false},
      {"ferry", 0.25, 0, 263, 9, true},
      {"kivi2", -1, 1, 95, 0, false},
      {"int4", -1, 0, 31, 0, false}},
     32},
    {128,
     2,
     2,
     5,
     16384,
     1024,
     4,
     {{"ferry", 0.15, -1, 611, 0, false},
      {"ferry", 0.3, 1, 300, 2, false},
      {"int8", -1, -1, 45, 0, false},
      {"fp16", -1, -1, 5, 0, false}},
     32},
    // Groups that are not a multiple of 16 tokens (a 16-token tile of the tensor-core kernel
    // then spans two slots) and small groups (more slots per table): G 24 at d 128 GQA 4:1,
    // G 8 at d 64 GQA 2:1 with P = 2.
    {128,
     2,
     4,
     0,
     32768,
     512,
     3,
     {{"ferry", 0.2, -1, 611, 0, false},
      {"int4", -1, 1, 203, 0, false},
      {"kivi2", -1, 0, 97, 4, true}},
     24},
    {64,
     1,
     2,
     2,
     16384,
     1024,
     3,
     {{"ferry", 0.25, -1, 403, 0, false},
      {"int8", -1, -1, 77, 0, false},
      {"kivi2", -1, 1, 151, 0, false}},
     8},
    // The wide kernel's other slot layouts at d 128, GQA 4:1, no protection: G 40 (a 32-token
    // step spans two slots; a 32 KiB INT4 page of 200 tokens is 128 in steps and 72 in tiles)
    // and G 64 (a step within a slot, three groups a page).
    {128,
     2,
     4,
     0,
     32768,
     512,
     3,
     {{"ferry", 0.2, -1, 733, 0, false},
      {"int4", -1, 0, 409, 0, false},
      {"kivi2", -1, 1, 301, 2, false}},
     40},
    {128,
     1,
     4,
     0,
     32768,
     512,
     3,
     {{"ferry", 0.25, -1, 901, 0, false},
      {"int4", -1, 1, 577, 0, false},
      {"kivi2", -1, 0, 389, 0, false}},
     64},
    // Beyond the brief's shapes, the kernel's other lane layouts: d 72 (not a power of two, so
    // nothing rotated; 9 of 16 lanes per token hold channels), d 256 with GQA 8 (32 lanes per
    // token, 8 rows), d 512 with GQA 2 (16 channels per lane, 64 KiB pages).
    {72,
     2,
     2,
     3,
     32768,
     512,
     3,
     {{"ferry", 0.25, 0, 389, 0, false},
      {"int8", -1, -1, 45, 0, false},
      {"kivi2", -1, 0, 301, 0, false}},
     32},
    {256,
     1,
     8,
     0,
     32768,
     1024,
     3,
     {{"ferry", 0.2, -1, 457, 0, false},
      {"int4", -1, 1, 67, 0, false},
      {"fp16", -1, -1, 97, 0, false}},
     32},
    {512,
     1,
     2,
     4,
     65536,
     512,
     2,
     {{"ferry", 0.25, -1, 303, 0, false}, {"int4", -1, 0, 129, 3, false}},
     32},
};

const size_t kva_n_configs = FY_ARRAY_SIZE(kva_configs);

void kva_lists(const kva_built_t *B, uint32_t extra_bad, kva_lists_t *L)
{
    const uint32_t n_items = B->n_seqs * B->n_kv, n_total = kvc_pool_n_pages(B->pool);
    memset(L, 0, sizeof(*L));
    L->n_items = n_items;
    L->starts = malloc(((size_t)n_items + 1) * sizeof(uint32_t));
    size_t cap_ids = 16;
    for (uint32_t i = 0; i < B->n_seqs; i++)
        for (uint32_t h = 0; h < B->n_kv; h++) {
            uint32_t n;
            kvc_seq_pages(B->seqs[i], 0, h, &n);
            cap_ids += n + extra_bad;
        }
    L->ids = malloc(cap_ids * sizeof(uint32_t));
    assert_non_null(L->starts);
    assert_non_null(L->ids);
    for (uint32_t i = 0; i < B->n_seqs; i++) {
        for (uint32_t h = 0; h < B->n_kv; h++) {
            uint32_t n;
            const kvc_page_id_t *ids = kvc_seq_pages(B->seqs[i], 0, h, &n);
            L->starts[i * B->n_kv + h] = L->n_ids;
            if (n > 0)
                memcpy(L->ids + L->n_ids, ids, (size_t)n * sizeof(uint32_t));
            L->n_ids += n;
            for (uint32_t e = 0; e < extra_bad && n > 0; e++, L->expect_bad++)
                L->ids[L->n_ids++] = n_total + e * 7; // out of range
            uint32_t len = L->n_ids - L->starts[i * B->n_kv + h];
            L->max_list = len > L->max_list ? len : L->max_list;
        }
    }
    L->starts[n_items] = L->n_ids;
}

void kva_lists_free(kva_lists_t *L)
{
    free(L->starts);
    free(L->ids);
}

void kva_reference(const kva_built_t *B, float **q_p, float **ref_p, float *scale_p)
{
    const uint32_t d = B->d, grp = B->n_heads / B->n_kv;
    size_t nq = (size_t)B->n_seqs * B->n_heads * d;
    float *q = malloc(nq * sizeof(float)), *ref = malloc(nq * sizeof(float));
    assert_non_null(q);
    assert_non_null(ref);
    for (size_t i = 0; i < nq; i++)
        q[i] = kva_frand() * 2.0f;
    const float scale = 1.0f / sqrtf((float)d);
    for (uint32_t i = 0; i < B->n_seqs; i++) {
        for (uint32_t h = 0; h < B->n_kv; h++) {
            uint32_t n;
            const kvc_page_id_t *ids = kvc_seq_pages(B->seqs[i], 0, h, &n);
            size_t off = ((size_t)i * B->n_heads + (size_t)h * grp) * d;
            assert_int_equal(kvc_attend(B->pool, ids, n, q + off, grp, scale, ref + off), FY_OK);
        }
    }
    *q_p = q;
    *ref_p = ref;
    *scale_p = scale;
}

double kva_check(const kva_built_t *B, const float *got, const float *ref, bool f16_keys)
{
    const uint32_t d = B->d;
    const size_t nq = (size_t)B->n_seqs * B->n_heads * d;
    double worst = 0;
    for (size_t r = 0; r < nq / d; r++) {
        double mref = 0;
        for (uint32_t c = 0; c < d; c++)
            mref = fmax(mref, fabs(ref[r * d + c]));
        for (uint32_t c = 0; c < d; c++) {
            double err = fabs((double)got[r * d + c] - ref[r * d + c]);
            double tol = (f16_keys ? 4e-3 : 1e-3) * mref + 1e-6;
            if (!(err <= tol)) {
                fprintf(stderr, "row %zu (seq %zu) ch %u: got %g cpu %g (tol %g)\n", r,
                        r / B->n_heads, c, got[r * d + c], ref[r * d + c], tol);
                fail();
            }
            if (mref > 0)
                worst = fmax(worst, err / mref);
        }
    }
    return worst;
}
