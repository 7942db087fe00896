// Decode side: placement is a copy (pages dequantize to exactly what the frame does), all or
// nothing under pool exhaustion, reference counts return every page; attention over
// mixed-option (and rotated) pages equals "dequantize, then attend" to 1e-4; FP16 tail appends
// and conversion to lower options keep attention consistent; threads give the same answer.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>

#include "kvtest.h"

typedef struct {
    kvt_layer_t L;
    uint8_t *frame;
    size_t len;
    kvc_frame_t f;
} enc_t;

static uint32_t g_protect; // MixKVQ protected channels for the next encode_one / make_pool

static void encode_one(enc_t *E, const char *policy, double b, uint32_t n_heads, uint32_t n_kv,
                       uint32_t n, uint32_t d, uint64_t seed)
{
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin(policy, &pol), FY_OK);
    pol.protect_channels = g_protect;
    kvt_layer_make(&E->L, seed, n_heads, n_kv, n, d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &E->L, 2, b);
    kvc_encoder_t *enc;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc);
    E->frame = malloc(cap);
    kvc_layer_input_t in = kvt_input(&E->L, 0);
    assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, E->frame, cap, &E->len, NULL),
                     FY_OK);
    kvc_encoder_destroy(enc);
    assert_int_equal(kvc_frame_parse(E->frame, E->len, &E->f), FY_OK);
}

static void enc_free(enc_t *E)
{
    kvt_layer_free(&E->L);
    free(E->frame);
}

static kvc_pool_t *make_pool(uint32_t d, uint32_t n_pages, size_t page_bytes)
{
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = d;
    pp.n_pages = n_pages;
    pp.page_bytes = page_bytes;
    pp.protect = g_protect;
    kvc_pool_t *pool;
    assert_int_equal(kvc_pool_create(&pp, &pool), FY_OK);
    return pool;
}

/* Reference: dequantize every page of the list, then plain softmax attention in double. */
static void reference_attend(const kvc_pool_t *pool, const kvc_page_id_t *ids, uint32_t n_ids,
                             const float *q, uint32_t n_q, uint32_t d, float scale, double *out)
{
    uint32_t cap = 0;
    for (uint32_t i = 0; i < n_ids; i++)
        cap += kvc_page_n_tokens(pool, ids[i]);
    float *k = malloc(((size_t)cap + 1) * d * 4), *v = malloc(((size_t)cap + 1) * d * 4);
    uint32_t n = 0;
    for (uint32_t i = 0; i < n_ids; i++) {
        uint32_t m;
        assert_int_equal(kvc_page_dequantize(pool, ids[i], k + (size_t)n * d, v + (size_t)n * d,
                                             &m),
                         FY_OK);
        n += m;
    }
    for (uint32_t r = 0; r < n_q; r++) {
        double mx = -1e300, sum = 0;
        double *o = out + (size_t)r * d;
        for (uint32_t c = 0; c < d; c++)
            o[c] = 0;
        for (uint32_t t = 0; t < n; t++) {
            double s = 0;
            for (uint32_t c = 0; c < d; c++)
                s += (double)q[r * d + c] * k[(size_t)t * d + c];
            mx = fmax(mx, s * scale);
        }
        for (uint32_t t = 0; t < n; t++) {
            double s = 0;
            for (uint32_t c = 0; c < d; c++)
                s += (double)q[r * d + c] * k[(size_t)t * d + c];
            double p = exp(s * scale - mx);
            sum += p;
            for (uint32_t c = 0; c < d; c++)
                o[c] += p * v[(size_t)t * d + c];
        }
        for (uint32_t c = 0; c < d; c++)
            o[c] = n ? o[c] / sum : 0;
    }
    free(k), free(v);
}

static void check_attention(const kvc_pool_t *pool, const kvc_page_id_t *ids, uint32_t n_ids,
                            uint32_t d, uint64_t seed)
{
    const uint32_t n_q = 3;
    float *q = malloc((size_t)n_q * d * 4), *out = malloc((size_t)n_q * d * 4);
    double *ref = malloc((size_t)n_q * d * 8);
    for (uint32_t i = 0; i < n_q * d; i++)
        q[i] = sinf((float)(i * 7 + seed)) * 2.0f;
    float scale = 1.0f / sqrtf((float)d);
    assert_int_equal(kvc_attend(pool, ids, n_ids, q, n_q, scale, out), FY_OK);
    reference_attend(pool, ids, n_ids, q, n_q, d, scale, ref);
    double mref = 0, merr = 0;
    for (uint32_t i = 0; i < n_q * d; i++) {
        mref = fmax(mref, fabs(ref[i]));
        merr = fmax(merr, fabs(ref[i] - out[i]));
    }
    assert_true(merr <= 1e-4 * mref + 1e-7);
    free(q), free(out), free(ref);
}

static void test_place_and_attend(void **state)
{
    const uint32_t ds[] = {64, 128};
    for (int i = 0; i < 2; i++) {
        uint32_t d = ds[i];
        enc_t E;
        encode_one(&E, "ferry", 0.2, 8, 2, 700, d, 40 + i);
        int n_opts = __builtin_popcount(E.f.opt_mask);
        assert_true(n_opts >= 4); // a real mix of options
        kvc_pool_t *pool = make_pool(d, 256, 32768);
        kvc_seq_t *seq;
        assert_int_equal(kvc_seq_create(pool, 2, 2, E.f.model_fingerprint, E.f.seq_id, &seq),
                         FY_OK);
        uint32_t need, before = kvc_pool_free_count(pool);
        assert_int_equal(kvc_pool_pages_needed(pool, &E.f, &need), FY_OK);
        assert_int_equal(kvc_place(seq, &E.f), FY_OK);
        assert_int_equal(before - kvc_pool_free_count(pool), need);
        assert_true(kvc_seq_layer_placed(seq, 0));
        assert_false(kvc_seq_layer_placed(seq, 1));
        assert_int_equal(kvc_place(seq, &E.f), FY_ERR_EXISTS);

        // Pages hold exactly what the frame decodes to, option by option in token order.
        size_t ne = (size_t)2 * 700 * d;
        float *fk = malloc(ne * 4), *fv = malloc(ne * 4);
        uint8_t *kept = malloc(2 * 700);
        kvc_frame_dequantize(&E.f, fk, fv, kept);
        float *pk = malloc((size_t)1024 * d * 4), *pv = malloc((size_t)1024 * d * 4);
        for (uint32_t h = 0; h < 2; h++) {
            uint32_t n_ids, kept_h = 0;
            const kvc_page_id_t *ids = kvc_seq_pages(seq, 0, h, &n_ids);
            for (uint32_t t = 0; t < 700; t++)
                kept_h += kept[h * 700 + t];
            assert_int_equal(kvc_seq_n_tokens(seq, 0, h), kept_h);
            uint32_t pi = 0, pm = 0, pn = 0;
            for (int o = 0; o < KVC_OPT_DROP; o++) {
                for (uint32_t t = 0; t < 700; t++) {
                    if (kvc_frame_opt(&E.f, h, t) != (kvc_opt_t)o)
                        continue;
                    if (pm == pn) {
                        assert_true(pi < n_ids);
                        assert_int_equal(kvc_page_opt(pool, ids[pi]), o);
                        kvc_page_dequantize(pool, ids[pi++], pk, pv, &pn);
                        pm = 0;
                    }
                    const float *a = fk + ((size_t)h * 700 + t) * d;
                    const float *b = pv + (size_t)pm * d;
                    assert_memory_equal(a, pk + (size_t)pm * d, d * 4);
                    assert_memory_equal(fv + ((size_t)h * 700 + t) * d, b, d * 4);
                    pm++;
                }
            }
            assert_int_equal(pi, n_ids);
            check_attention(pool, ids, n_ids, d, h);
        }
        free(fk), free(fv), free(kept), free(pk), free(pv);
        kvc_seq_destroy(seq);
        assert_int_equal(kvc_pool_free_count(pool), 256);
        kvc_pool_destroy(pool);
        enc_free(&E);
    }
}

static void test_place_all_or_nothing(void **state)
{
    enc_t E;
    encode_one(&E, "int8", -1, 2, 2, 400, 64, 5);
    kvc_pool_t *pool = make_pool(64, 64, 16384);
    uint32_t need;
    assert_int_equal(kvc_pool_pages_needed(pool, &E.f, &need), FY_OK);
    kvc_seq_t *seq, *other;
    kvc_page_id_t held[64];
    uint32_t n_held = 64 - need + 1;
    for (uint32_t i = 0; i < n_held; i++)
        assert_int_equal(kvc_page_alloc(pool, KVC_OPT_F16, false, &held[i]), FY_OK);
    assert_int_equal(kvc_seq_create(pool, 2, 2, E.f.model_fingerprint, E.f.seq_id, &seq), FY_OK);
    uint32_t before = kvc_pool_free_count(pool);
    assert_int_equal(kvc_place(seq, &E.f), FY_ERR_RESOURCE_EXHAUSTED);
    assert_int_equal(kvc_pool_free_count(pool), before);
    assert_false(kvc_seq_layer_placed(seq, 0));
    assert_int_equal(kvc_seq_n_tokens(seq, 0, 0), 0);
    kvc_page_unref(pool, held[0]);
    assert_int_equal(kvc_place(seq, &E.f), FY_OK);
    assert_int_equal(kvc_pool_free_count(pool), 0);
    // Wrong fingerprint or sequence: refused.
    assert_int_equal(kvc_seq_create(pool, 2, 2, 99, E.f.seq_id, &other), FY_OK);
    assert_int_equal(kvc_place(other, &E.f), FY_ERR_MISMATCH);
    kvc_seq_destroy(other);
    for (uint32_t i = 1; i < n_held; i++)
        kvc_page_unref(pool, held[i]);
    kvc_seq_destroy(seq);
    assert_int_equal(kvc_pool_free_count(pool), 64);
    kvc_pool_destroy(pool);
    enc_free(&E);
}

static void test_refcounts(void **state)
{
    kvc_pool_t *pool = make_pool(64, 4, 16384);
    kvc_page_id_t a;
    assert_int_equal(kvc_page_alloc(pool, KVC_OPT_Q4, true, &a), FY_OK);
    assert_int_equal(kvc_page_refcount(pool, a), 1);
    kvc_page_ref(pool, a);
    assert_int_equal(kvc_pool_free_count(pool), 3);
    kvc_page_unref(pool, a);
    assert_int_equal(kvc_pool_free_count(pool), 3);
    kvc_page_unref(pool, a);
    assert_int_equal(kvc_pool_free_count(pool), 4);
    assert_true(kvc_pool_page_tokens(pool, KVC_OPT_Q2) > kvc_pool_page_tokens(pool, KVC_OPT_Q8));
    assert_true(kvc_pool_page_tokens(pool, KVC_OPT_Q8) > kvc_pool_page_tokens(pool, KVC_OPT_F16));
    kvc_pool_destroy(pool);
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.page_bytes = 1024; // too small for a key group
    assert_int_equal(kvc_pool_create(&pp, &pool), FY_ERR_INVALID_ARG);
}

static void test_append_and_convert(void **state)
{
    uint32_t d = 64;
    enc_t E;
    encode_one(&E, "ferry", 0.3, 4, 1, 300, d, 77);
    kvc_pool_t *pool = make_pool(d, 512, 32768);
    kvc_seq_t *seq;
    assert_int_equal(kvc_seq_create(pool, 2, 1, E.f.model_fingerprint, E.f.seq_id, &seq), FY_OK);
    assert_int_equal(kvc_place(seq, &E.f), FY_OK);
    uint32_t n0 = kvc_seq_n_tokens(seq, 0, 0);
    // Decode tokens go to the FP16 tail.
    uint16_t k[64], v[64];
    for (int t = 0; t < 150; t++) {
        for (uint32_t c = 0; c < d; c++) {
            k[c] = fy_fp32_to_fp16(sinf((float)(t * 64 + c)));
            v[c] = fy_fp32_to_fp16(cosf((float)(t * 31 + c)));
        }
        assert_int_equal(kvc_seq_append(seq, 0, 0, k, v), FY_OK);
    }
    assert_int_equal(kvc_seq_n_tokens(seq, 0, 0), n0 + 150);
    uint32_t n_ids;
    const kvc_page_id_t *ids = kvc_seq_pages(seq, 0, 0, &n_ids);
    check_attention(pool, ids, n_ids, d, 3);

    // Another sequence shares the first F16 page: conversion must not change it.
    kvc_page_id_t shared = ids[0];
    assert_int_equal(kvc_page_opt(pool, shared), KVC_OPT_F16);
    float *sk0 = malloc((size_t)1024 * d * 4), *sv0 = malloc((size_t)1024 * d * 4);
    float *sk1 = malloc((size_t)1024 * d * 4), *sv1 = malloc((size_t)1024 * d * 4);
    uint32_t sn0, sn1;
    kvc_page_dequantize(pool, shared, sk0, sv0, &sn0);
    kvc_page_ref(pool, shared);

    uint32_t conv;
    assert_int_equal(kvc_seq_convert(seq, 0, 0, KVC_OPT_F16, KVC_OPT_Q8, false, 0, &conv), FY_OK);
    assert_true(conv > 150);
    assert_int_equal(kvc_seq_n_tokens(seq, 0, 0), n0 + 150);
    ids = kvc_seq_pages(seq, 0, 0, &n_ids);
    for (uint32_t i = 0; i < n_ids; i++)
        assert_int_not_equal(kvc_page_opt(pool, ids[i]), KVC_OPT_F16);
    check_attention(pool, ids, n_ids, d, 4);
    kvc_page_dequantize(pool, shared, sk1, sv1, &sn1);
    assert_int_equal(sn0, sn1);
    assert_memory_equal(sk0, sk1, (size_t)sn0 * d * 4);
    kvc_page_unref(pool, shared);
    free(sk0), free(sv0), free(sk1), free(sv1);

    // 8/8 -> 4/4 rotated, then 4/4 -> 2/2, some tokens at a time.
    assert_int_equal(kvc_seq_convert(seq, 0, 0, KVC_OPT_Q8, KVC_OPT_Q4, true, 0, &conv), FY_OK);
    assert_true(conv > 0);
    ids = kvc_seq_pages(seq, 0, 0, &n_ids);
    check_attention(pool, ids, n_ids, d, 5);
    assert_int_equal(kvc_seq_convert(seq, 0, 0, KVC_OPT_Q4, KVC_OPT_Q2, true, 200, &conv), FY_OK);
    assert_true(conv <= 200);
    assert_int_equal(kvc_seq_n_tokens(seq, 0, 0), n0 + 150);
    ids = kvc_seq_pages(seq, 0, 0, &n_ids);
    check_attention(pool, ids, n_ids, d, 6);
    // Converting upward is refused; to DROP evicts.
    assert_int_equal(kvc_seq_convert(seq, 0, 0, KVC_OPT_Q2, KVC_OPT_Q4, false, 0, &conv),
                     FY_ERR_INVALID_ARG);
    uint32_t before = kvc_seq_n_tokens(seq, 0, 0);
    assert_int_equal(kvc_seq_convert(seq, 0, 0, KVC_OPT_Q2, KVC_OPT_DROP, false, 0, &conv),
                     FY_OK);
    assert_int_equal(kvc_seq_n_tokens(seq, 0, 0), before - conv);

    kvc_seq_destroy(seq);
    assert_int_equal(kvc_pool_free_count(pool), 512);
    kvc_pool_destroy(pool);
    enc_free(&E);
}

static void test_attend_layer_threads(void **state)
{
    uint32_t d = 128, n_heads = 8, n_kv = 2;
    enc_t E;
    encode_one(&E, "ferry", 0.25, n_heads, n_kv, 500, d, 8);
    kvc_pool_t *pool = make_pool(d, 256, 65536);
    kvc_seq_t *seq;
    assert_int_equal(kvc_seq_create(pool, 2, n_kv, E.f.model_fingerprint, E.f.seq_id, &seq),
                     FY_OK);
    assert_int_equal(kvc_place(seq, &E.f), FY_OK);
    float *q = malloc((size_t)n_heads * d * 4), *o1 = malloc((size_t)n_heads * d * 4);
    float *o2 = malloc((size_t)n_heads * d * 4);
    for (uint32_t i = 0; i < n_heads * d; i++)
        q[i] = cosf((float)i);
    fy_pool_t *threads;
    assert_int_equal(fy_pool_create(2, &threads), FY_OK);
    assert_int_equal(kvc_attend_layer(seq, 0, n_heads, q, 0.088f, o1, threads), FY_OK);
    assert_int_equal(kvc_attend_layer(seq, 0, n_heads, q, 0.088f, o2, NULL), FY_OK);
    assert_memory_equal(o1, o2, (size_t)n_heads * d * 4);
    // Layer 1 was never placed: attention over nothing is zeros.
    assert_int_equal(kvc_attend_layer(seq, 1, n_heads, q, 0.088f, o1, NULL), FY_OK);
    for (uint32_t i = 0; i < n_heads * d; i++)
        assert_true(o1[i] == 0);
    assert_int_equal(kvc_attend_layer(seq, 0, 3, q, 0.088f, o1, NULL), FY_ERR_INVALID_ARG);
    fy_pool_destroy(threads);
    free(q), free(o1), free(o2);
    kvc_seq_destroy(seq);
    kvc_pool_destroy(pool);
    enc_free(&E);
}

/* Three kv heads on two threads: each head's pages are split in two parts and combined, which
 * must give the one-pass attention up to rounding, for every policy (rotated pages included). */
static void test_attend_layer_split(void **state)
{
    uint32_t d = 64, n_heads = 9, n_kv = 3;
    static const char *const k_policies[] = {"fp16", "int4", "ferry", "kivi2"};
    for (size_t pi = 0; pi < FY_ARRAY_SIZE(k_policies); pi++) {
        enc_t E;
        encode_one(&E, k_policies[pi], 0.25, n_heads, n_kv, 1500, d, 11);
        kvc_pool_t *pool = make_pool(d, 2048, 8192); // small pages: many per head
        kvc_seq_t *seq;
        assert_int_equal(kvc_seq_create(pool, 2, n_kv, E.f.model_fingerprint, E.f.seq_id, &seq),
                         FY_OK);
        assert_int_equal(kvc_place(seq, &E.f), FY_OK);
        uint32_t np;
        kvc_seq_pages(seq, 0, 0, &np);
        assert_true(np >= 8); // enough to be split
        float *q = malloc((size_t)n_heads * d * 4), *o1 = malloc((size_t)n_heads * d * 4);
        float *o2 = malloc((size_t)n_heads * d * 4);
        for (uint32_t i = 0; i < n_heads * d; i++)
            q[i] = 2.0f * cosf(0.37f * (float)i);
        fy_pool_t *threads;
        assert_int_equal(fy_pool_create(2, &threads), FY_OK);
        assert_int_equal(kvc_attend_layer(seq, 0, n_heads, q, 0.125f, o1, threads), FY_OK);
        assert_int_equal(kvc_attend_layer(seq, 0, n_heads, q, 0.125f, o2, NULL), FY_OK);
        double num = 0, den = 0;
        for (uint32_t i = 0; i < n_heads * d; i++) {
            num += ((double)o1[i] - o2[i]) * ((double)o1[i] - o2[i]);
            den += (double)o2[i] * o2[i];
        }
        if (!(den > 0 && sqrt(num / den) < 1e-5))
            fail_msg("%s: split attention differs by %g (relative)", k_policies[pi],
                     sqrt(num / (den > 0 ? den : 1)));
        // The same split twice gives the same bytes (the parts do not depend on scheduling).
        assert_int_equal(kvc_attend_layer(seq, 0, n_heads, q, 0.125f, o2, threads), FY_OK);
        assert_memory_equal(o1, o2, (size_t)n_heads * d * 4);
        fy_pool_destroy(threads);
        free(q), free(o1), free(o2);
        kvc_seq_destroy(seq);
        kvc_pool_destroy(pool);
        enc_free(&E);
    }
}

static void test_protected_channels(void **state)
{
    // MixKVQ: 4 key channels of every 4/4, 4/2, 2/2 group at 8 bits, rotated and not.
    for (int rot = 0; rot < 2; rot++) {
        g_protect = 4;
        enc_t E;
        uint32_t d = 64;
        kvc_policy_t pol;
        kvc_policy_builtin("ferry", &pol);
        encode_one(&E, "ferry", 0.15, 4, 2, 500, d, 90 + rot);
        assert_int_equal(E.f.protect, 4);
        assert_true(E.f.opt_mask & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q2) |
                                    KVC_OPT_BIT(KVC_OPT_Q4V2)));
        kvc_pool_t *pool = make_pool(d, 256, 32768);
        kvc_seq_t *seq;
        assert_int_equal(kvc_seq_create(pool, 2, 2, E.f.model_fingerprint, E.f.seq_id, &seq),
                         FY_OK);
        assert_int_equal(kvc_place(seq, &E.f), FY_OK);
        for (uint32_t h = 0; h < 2; h++) {
            uint32_t n_ids;
            const kvc_page_id_t *ids = kvc_seq_pages(seq, 0, h, &n_ids);
            check_attention(pool, ids, n_ids, d, 20 + h);
        }
        uint32_t conv;
        assert_int_equal(kvc_seq_convert(seq, 0, 0, KVC_OPT_Q8, KVC_OPT_Q2, rot, 0, &conv), FY_OK);
        uint32_t n_ids;
        const kvc_page_id_t *ids = kvc_seq_pages(seq, 0, 0, &n_ids);
        check_attention(pool, ids, n_ids, d, 30);
        kvc_seq_destroy(seq);
        kvc_pool_destroy(pool);
        // A pool without protection refuses the frame.
        g_protect = 0;
        pool = make_pool(d, 256, 32768);
        assert_int_equal(kvc_seq_create(pool, 2, 2, E.f.model_fingerprint, E.f.seq_id, &seq),
                         FY_OK);
        assert_int_equal(kvc_place(seq, &E.f), FY_ERR_MISMATCH);
        kvc_seq_destroy(seq);
        kvc_pool_destroy(pool);
        enc_free(&E);
        (void)pol;
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_place_and_attend),
        cmocka_unit_test(test_place_all_or_nothing),
        cmocka_unit_test(test_refcounts),
        cmocka_unit_test(test_append_and_convert),
        cmocka_unit_test(test_attend_layer_threads),
        cmocka_unit_test(test_attend_layer_split),
        cmocka_unit_test(test_protected_channels),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
