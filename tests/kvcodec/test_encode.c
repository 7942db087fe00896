// Encoder: budget adherence over awkward shapes (n not a multiple of G, n below the recent
// window, one head, head_dim 64 and 128) for b in {1, 1/2, 1/4, 1/8, 1/16}; the rate
// controller is never over budget after any layer; identical inputs give identical bytes;
// every built-in policy produces frames that parse and decode within their options' bounds.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>

#include "../../kvcodec/kvcodec_int.h"
#include "kvtest.h"

typedef struct {
    uint32_t n_heads, n_kv, n, d;
} shape_t;

static const shape_t k_shapes[] = {
    {1, 1, 37, 64},  {4, 2, 50, 128}, {9, 3, 100, 64},
    {2, 1, 300, 128}, {2, 2, 257, 64}, {32, 8, 600, 128},
};
static const double k_budgets[] = {1.0, 0.5, 0.25, 0.125, 0.0625};

/* Encodes n_layers layers (each its own synthetic data); returns total bytes. */
static uint64_t encode_request(const kvc_policy_t *pol, const shape_t *s, uint32_t n_layers,
                               double b, uint64_t seed, uint64_t *budget_p, bool *met_p,
                               uint8_t **frames, size_t *lens)
{
    kvt_layer_t L;
    kvt_layer_make(&L, seed, s->n_heads, s->n_kv, s->n, s->d, 32);
    kvc_encoder_params_t p = kvt_params(pol, &L, n_layers, b);
    kvc_encoder_t *enc = NULL;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(enc);
    uint8_t *buf = malloc(cap);
    uint64_t total = 0, budget = 0;
    bool met = true;
    for (uint32_t l = 0; l < n_layers; l++) {
        if (l > 0)
            kvc_synth_layer(seed + l, s->n_heads, s->n_kv, s->n, s->d, L.W, L.k, L.v, L.q);
        kvc_layer_input_t in = kvt_input(&L, l);
        size_t len = 0;
        kvc_layer_info_t info;
        assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, buf, cap, &len, &info), FY_OK);
        assert_int_equal(info.frame_bytes, len);
        met = met && info.budget_met;
        total += len;
        uint64_t spent;
        kvc_encoder_totals(enc, &spent, &budget);
        assert_int_equal(spent, total);
        if (b > 0 && info.budget_met)
            assert_true(spent <= budget); // never over, after every layer
        kvc_frame_t f;
        assert_int_equal(kvc_frame_parse(buf, len, &f), FY_OK);
        assert_int_equal(f.layer, l);
        if (frames) {
            frames[l] = malloc(len);
            memcpy(frames[l], buf, len);
            lens[l] = len;
        }
    }
    // A layer out of order is refused.
    kvc_layer_input_t in = kvt_input(&L, 0);
    size_t len;
    assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, buf, cap, &len, NULL),
                     FY_ERR_STATE);
    free(buf);
    kvc_encoder_destroy(enc);
    kvt_layer_free(&L);
    if (budget_p)
        *budget_p = budget;
    if (met_p)
        *met_p = met;
    return total;
}

static void test_budget_adherence(void **state)
{
    for (int dist = 0; dist < 2; dist++) {
        kvc_policy_t pol;
        assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
        pol.dist = dist == 0 ? KVC_DIST_TRIAL : KVC_DIST_MODEL; // measured (ferry's) or modelled
        for (size_t i = 0; i < FY_ARRAY_SIZE(k_shapes); i++) {
            for (size_t j = 0; j < FY_ARRAY_SIZE(k_budgets); j++) {
                uint64_t budget;
                bool met;
                uint64_t total = encode_request(&pol, &k_shapes[i], 4, k_budgets[j], 100 + i,
                                                &budget, &met, NULL, NULL);
                const shape_t *s = &k_shapes[i];
                uint64_t fp16 = 4ull * 4 * s->n_kv * s->n * s->d;
                assert_int_equal(budget, (uint64_t)floor(k_budgets[j] * (double)fp16));
                assert_true(met); // every shape here is above the frame floor
                assert_true(total <= budget);
                // Ends within 3 % under the budget.
                assert_true((double)total >= 0.97 * (double)budget);
                if (getenv("KVC_TEST_VERBOSE"))
                    printf("dist %d shape %zu b %.4f: %llu / %llu (%.3f)\n", dist, i, k_budgets[j],
                           (unsigned long long)total, (unsigned long long)budget,
                           (double)total / (double)budget);
            }
        }
    }
}

static void test_below_floor(void **state)
{
    // A budget below the frame floor cannot be met: the encoder says so instead of failing.
    kvc_policy_t pol;
    kvc_policy_builtin("int4", &pol); // no DROP allowed
    pol.budget = 0.01;
    shape_t s = {1, 1, 5, 64};
    bool met = true;
    uint64_t budget;
    encode_request(&pol, &s, 2, 0.01, 5, &budget, &met, NULL, NULL);
    assert_false(met);
}

static void test_determinism(void **state)
{
    kvc_policy_t pol;
    kvc_policy_builtin("ferry", &pol);
    shape_t s = {9, 3, 200, 64};
    uint8_t *a[3], *b[3];
    size_t la[3], lb[3];
    encode_request(&pol, &s, 3, 0.2, 9, NULL, NULL, a, la);
    encode_request(&pol, &s, 3, 0.2, 9, NULL, NULL, b, lb);
    for (int l = 0; l < 3; l++) {
        assert_int_equal(la[l], lb[l]);
        assert_memory_equal(a[l], b[l], la[l]);
        free(a[l]), free(b[l]);
    }
}

static void test_builtin_policies(void **state)
{
    const char *const *names = kvc_policy_builtin_names();
    shape_t s = {4, 2, 333, 64};
    for (size_t i = 0; names[i]; i++) {
        kvc_policy_t pol;
        assert_int_equal(kvc_policy_builtin(names[i], &pol), FY_OK);
        assert_int_equal(kvc_policy_validate(&pol, NULL, 0), FY_OK);
        uint8_t *fr[2];
        size_t len[2];
        uint64_t budget;
        uint64_t total = encode_request(&pol, &s, 2, -1, 3, &budget, NULL, fr, len);
        kvc_frame_t f;
        assert_int_equal(kvc_frame_parse(fr[1], len[1], &f), FY_OK);
        size_t ne = (size_t)s.n_kv * s.n * s.d;
        float *k = malloc(ne * 4), *v = malloc(ne * 4);
        uint8_t *kept = malloc((size_t)s.n_kv * s.n);
        assert_int_equal(kvc_frame_dequantize(&f, k, v, kept), FY_OK);
        kvt_layer_t L;
        kvt_layer_make(&L, 3 + 1, s.n_heads, s.n_kv, s.n, s.d, 32);
        double err = 0, ref = 0;
        size_t n_kept = 0;
        for (size_t t = 0; t < (size_t)s.n_kv * s.n; t++) {
            n_kept += kept[t];
            for (uint32_t c = 0; c < s.d && kept[t]; c++) {
                double x = fy_fp16_to_fp32(L.v[t * s.d + c]);
                err += (v[t * s.d + c] - x) * (v[t * s.d + c] - x);
                ref += x * x;
            }
        }
        if (strcmp(names[i], "fp16") == 0) {
            assert_true(err == 0);
            assert_int_equal(n_kept, (size_t)s.n_kv * s.n);
            assert_true(total > budget * 0 + (uint64_t)4 * 2 * s.n_kv * s.n * s.d);
        } else if (strcmp(names[i], "int8") == 0) {
            assert_true(err < 1e-4 * ref);
        } else if (strcmp(names[i], "int4") == 0) {
            assert_true(err < 2e-2 * ref);
        }
        if (strcmp(names[i], "kivi2") == 0) {
            // The last 128 tokens of every head stay F16.
            for (uint32_t h = 0; h < s.n_kv; h++)
                for (uint32_t t = s.n - 128; t < s.n; t++)
                    assert_int_equal(kvc_frame_opt(&f, h, t), KVC_OPT_F16);
            assert_int_equal(kvc_frame_opt(&f, 0, 0), KVC_OPT_Q2);
        }
        if (strcmp(names[i], "snapkv") == 0 || strcmp(names[i], "h2o") == 0 ||
            strcmp(names[i], "pdtrim") == 0) {
            for (uint32_t h = 0; h < s.n_kv; h++)
                for (uint32_t t = 0; t < s.n; t++) {
                    kvc_opt_t o = kvc_frame_opt(&f, h, t);
                    assert_true(o == KVC_OPT_F16 || o == KVC_OPT_DROP);
                }
        }
        if (strcmp(names[i], "pdtrim") == 0) {
            // First 4 tokens kept; kept tokens otherwise form a suffix.
            for (uint32_t h = 0; h < s.n_kv; h++) {
                for (uint32_t t = 0; t < 4; t++)
                    assert_int_equal(kvc_frame_opt(&f, h, t), KVC_OPT_F16);
                bool seen_kept = false;
                for (uint32_t t = 4; t < s.n; t++) {
                    bool k2 = kvc_frame_opt(&f, h, t) == KVC_OPT_F16;
                    assert_true(!seen_kept || k2);
                    seen_kept = seen_kept || k2;
                }
            }
        }
        kvt_layer_free(&L);
        free(k), free(v), free(kept), free(fr[0]), free(fr[1]);
    }
}

/* The importance prior: at the same budget, a token the window ignores is quantized rather
 * than dropped, so fewer items are dropped; prior 0 is the plain window importance. */
static void test_prior(void **state)
{
    shape_t s = {4, 2, 600, 64};
    uint64_t dropped[2];
    for (int i = 0; i < 2; i++) {
        kvc_policy_t pol;
        assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
        pol.prior = i == 0 ? 0.0f : 4.0f;
        kvt_layer_t L;
        kvt_layer_make(&L, 11, s.n_heads, s.n_kv, s.n, s.d, 32);
        kvc_encoder_params_t p = kvt_params(&pol, &L, 1, 0.25);
        kvc_encoder_t *enc = NULL;
        assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
        size_t cap = kvc_encoder_max_frame_bytes(enc), len = 0;
        uint8_t *buf = malloc(cap);
        kvc_layer_input_t in = kvt_input(&L, 0);
        kvc_layer_info_t info;
        assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, buf, cap, &len, &info), FY_OK);
        assert_true(info.budget_met);
        assert_true(len <= (size_t)(0.25 * 4.0 * s.n_kv * s.n * s.d));
        dropped[i] = info.tokens[KVC_OPT_DROP];
        free(buf);
        kvc_encoder_destroy(enc);
        kvt_layer_free(&L);
    }
    assert_true(dropped[0] > 0);
    assert_true(dropped[1] < dropped[0]);
}

/* Encodes one layer of L under pol at budget b into a malloc'd frame (parsed into *f). */
static uint8_t *encode_one(const kvc_policy_t *pol, const kvt_layer_t *L, double b, kvc_frame_t *f,
                           kvc_layer_info_t *info)
{
    size_t len = 0;
    uint8_t *buf = kvt_encode_first(pol, L, 1, b, &len, info);
    assert_non_null(buf);
    assert_int_equal(kvc_frame_parse(buf, len, f), FY_OK);
    return buf;
}

/* A synthetic layer (4 query heads, 2 kv heads, 300 tokens, d 64, W 32) where every window query
 * gets 8 along channel 0 and token t's key `key` there, in every kv head: key logit units more
 * than its own. */
static void make_heavy_token(kvt_layer_t *L, uint64_t seed, uint32_t t, float key)
{
    kvt_layer_make(L, seed, 4, 2, 300, 64, 32);
    for (size_t i = 0; i < (size_t)L->n_heads * L->W; i++)
        L->q[i * L->d] += 8.0f;
    for (uint32_t h = 0; h < L->n_kv; h++)
        for (uint32_t c = 0; c < L->d; c++)
            L->k[((size_t)h * L->n + t) * L->d + c] = fy_fp32_to_fp16(c == 0 ? key : 0.0f);
}

/* L's layer under pol at b = 1/16 meets its budget by dropping most tokens, but not token t in
 * any kv head. */
static void assert_kept_among_drops(const kvc_policy_t *pol, const kvt_layer_t *L, uint32_t t)
{
    kvc_frame_t f;
    kvc_layer_info_t info;
    uint8_t *buf = encode_one(pol, L, 0.0625, &f, &info);
    assert_true(info.budget_met);
    assert_true(info.tokens[KVC_OPT_DROP] > (uint64_t)L->n_kv * L->n / 2); // most tokens go
    for (uint32_t h = 0; h < L->n_kv; h++)
        assert_int_not_equal(kvc_frame_opt(&f, h, t), KVC_OPT_DROP);
    free(buf);
}

/* A token that holds most of the window's attention (the synthetic layer's token 0) is not
 * dropped even unpinned and under a budget that drops most tokens: its value is close to the
 * window output it dominates, so w^2 |v - obar|^2 alone made it look free to drop; losing it
 * moves every output by p (o - v) / (1 - p). */
static void test_sink_mass(void **state)
{
    kvt_layer_t L;
    // Token 0 gets 24 logit units more: about 2/3 and 0.99 of the window's attention in the two
    // kv heads.
    make_heavy_token(&L, 5, 0, 24.0f);
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
    pol.sinks = pol.recent = 0; // nothing pinned
    kvc_layer_input_t in = kvt_input(&L, 0);
    kvc_scores_t sc;
    assert_int_equal(kvc_scores_init(&sc, L.n_kv, L.n, L.d), FY_OK);
    assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in, &sc), FY_OK);
    for (uint32_t h = 0; h < L.n_kv; h++)
        assert_true(sc.importance[(size_t)h * L.n] > 0.5f); // token 0 is the sink here
    assert_kept_among_drops(&pol, &L, 0);
    kvc_scores_cleanup(&sc);
    kvt_layer_free(&L);
}

/* A middle token that takes all of the window's attention (every other weight is below FP32's
 * resolution) has v = obar to rounding, so its deviation from the window output is ~0 even
 * divided by (1 - 0.99)^2; the spread of later queries' outputs (drop_spread) still prices its
 * drop, and it is kept under a budget that drops most tokens. */
static void test_whole_mass(void **state)
{
    kvt_layer_t L;
    const uint32_t t_all = 150;
    make_heavy_token(&L, 6, t_all, 64.0f); // 64 logit units more than any other token
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
    assert_true(pol.drop_spread > 0);
    kvc_layer_input_t in = kvt_input(&L, 0);
    kvc_scores_t sc;
    assert_int_equal(kvc_scores_init(&sc, L.n_kv, L.n, L.d), FY_OK);
    assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in, &sc), FY_OK);
    for (uint32_t h = 0; h < L.n_kv; h++) {
        assert_true(sc.importance[(size_t)h * L.n + t_all] > 0.99f);
        double dev = 0; // |v - obar|^2: the window output is the token's value (to ~1e-7)
        for (uint32_t c = 0; c < L.d; c++) {
            double e = sc.obar[(size_t)h * L.d + c] -
                       fy_fp16_to_fp32(L.v[((size_t)h * L.n + t_all) * L.d + c]);
            dev += e * e;
        }
        assert_true(dev < 1e-9);
    }
    assert_kept_among_drops(&pol, &L, t_all);
    kvc_scores_cleanup(&sc);
    kvt_layer_free(&L);
}

/* With no budget every free token takes the cheapest allowed option; kept pins have nothing to
 * trade their precision for and stay at 16/16, as pinned ones do (what `ferry calibrate`'s
 * option probes rely on: the option on the middle tokens, the ends at full precision). */
static void test_no_budget_pins(void **state)
{
    kvt_layer_t L;
    kvt_layer_make(&L, 10, 4, 2, 100, 64, 32);
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
    assert_true(pol.pins_kept);
    pol.options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_Q8) | KVC_OPT_BIT(KVC_OPT_Q4);
    kvc_frame_t f;
    kvc_layer_info_t info;
    uint8_t *buf = encode_one(&pol, &L, 0.0, &f, &info);
    for (uint32_t h = 0; h < L.n_kv; h++)
        for (uint32_t t = 0; t < L.n; t++) {
            bool pinned = t < pol.sinks || t + pol.recent >= L.n;
            assert_int_equal(kvc_frame_opt(&f, h, t), pinned ? KVC_OPT_F16 : KVC_OPT_Q4);
        }
    free(buf);
    kvt_layer_free(&L);
}

/* A prompt too short for its pins at the budget (37 tokens at b = 1/8: 4 sinks and 16 recent
 * tokens at 16/16 are more than the frame may hold) gives up their 16/16 but keeps them, at some
 * precision, while most of the middle goes; only where even that does not fit is everything
 * free. The same with pins that are only kept to begin with. */
static void test_short_prompt_pins(void **state)
{
    kvt_layer_t L;
    kvt_layer_make(&L, 9, 2, 1, 37, 64, 32);
    for (int kept = 0; kept < 2; kept++) {
        kvc_policy_t pol;
        assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
        pol.pins_kept = kept;
        kvc_frame_t f;
        kvc_layer_info_t info;
        uint8_t *buf = encode_one(&pol, &L, 0.125, &f, &info);
        assert_true(info.budget_met);
        assert_true(f.frame_bytes <= (size_t)(0.125 * 4.0 * L.n * L.d));
        uint32_t f16 = 0, middle_dropped = 0;
        for (uint32_t t = 0; t < L.n; t++) {
            kvc_opt_t o = kvc_frame_opt(&f, 0, t);
            if (t < pol.sinks || t + pol.recent >= L.n) {
                assert_int_not_equal(o, KVC_OPT_DROP);
                f16 += o == KVC_OPT_F16;
            } else {
                middle_dropped += o == KVC_OPT_DROP;
            }
        }
        assert_true(f16 < pol.sinks + pol.recent);
        assert_true(middle_dropped > 0);
        free(buf);
    }
    // At a budget that holds every pin, pins that are not kept are 16/16.
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("spectrum3", &pol), FY_OK);
    kvc_frame_t f;
    kvc_layer_info_t info;
    uint8_t *buf = encode_one(&pol, &L, 0.5, &f, &info);
    for (uint32_t t = 0; t < pol.sinks; t++)
        assert_int_equal(kvc_frame_opt(&f, 0, t), KVC_OPT_F16);
    free(buf);
    kvt_layer_free(&L);
}

/* Importance over the window: mean <= RMS <= max for every token (GQA mean, no pooling), all
 * three equal with a window of one query; the window output and query sensitivity do not
 * depend on it. */
static void test_importance_kinds(void **state)
{
    for (uint32_t W = 1; W <= 32; W += 31) {
        kvt_layer_t L;
        kvt_layer_make(&L, 21, 4, 2, 300, 64, W);
        kvc_layer_input_t in = kvt_input(&L, 0);
        kvc_scores_t sc[3];
        const kvc_importance_t kinds[3] = {KVC_IMP_MEAN, KVC_IMP_RMS, KVC_IMP_MAX};
        for (int i = 0; i < 3; i++) {
            kvc_policy_t pol;
            kvc_policy_builtin("ferry", &pol);
            pol.pool_kernel = 1;
            pol.importance = kinds[i];
            assert_int_equal(kvc_scores_init(&sc[i], L.n_kv, L.n, L.d), FY_OK);
            assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in, &sc[i]), FY_OK);
        }
        size_t nt = (size_t)L.n_kv * L.n, nd = (size_t)L.n_kv * L.d;
        bool differs = false;
        for (size_t i = 0; i < nt; i++) {
            float m = sc[0].importance[i], r = sc[1].importance[i], x = sc[2].importance[i];
            assert_true(m <= r * (1 + 1e-5f) + 1e-12f && r <= x * (1 + 1e-5f) + 1e-12f);
            if (W == 1)
                assert_true(fabsf(m - r) <= 1e-5f * m + 1e-12f &&
                            fabsf(m - x) <= 1e-5f * m + 1e-12f);
            differs = differs || r > m * 1.01f;
        }
        assert_true(differs == (W > 1));
        for (int i = 1; i < 3; i++) {
            assert_memory_equal(sc[i].obar, sc[0].obar, nd * sizeof(float));
            assert_memory_equal(sc[i].qsq, sc[0].qsq, nd * sizeof(float));
        }
        for (int i = 0; i < 3; i++)
            kvc_scores_cleanup(&sc[i]);
        kvt_layer_free(&L);
    }
}

/* window_div: a 400-token prompt with window_div 8 is scored from its last max(32, 50) = 50
 * window queries, exactly as if only those had been passed; 0 uses all of them. */
static void test_window_div(void **state)
{
    kvt_layer_t L;
    kvt_layer_make(&L, 33, 4, 2, 400, 64, 128);
    kvc_layer_input_t in = kvt_input(&L, 0);
    // The same queries, only the last 50 of each head.
    uint32_t keep = 50;
    float *q50 = malloc((size_t)L.n_heads * keep * L.d * sizeof(float));
    for (uint32_t h = 0; h < L.n_heads; h++)
        memcpy(q50 + (size_t)h * keep * L.d, L.q + ((size_t)h * L.W + (L.W - keep)) * L.d,
               (size_t)keep * L.d * sizeof(float));
    kvc_layer_input_t in50 = in;
    in50.q_window = q50;
    in50.n_window = keep;
    kvc_policy_t pol;
    kvc_policy_builtin("ferry", &pol);
    assert_int_equal(pol.window_div, 8);
    kvc_scores_t a, b, c;
    assert_int_equal(kvc_scores_init(&a, L.n_kv, L.n, L.d), FY_OK);
    assert_int_equal(kvc_scores_init(&b, L.n_kv, L.n, L.d), FY_OK);
    assert_int_equal(kvc_scores_init(&c, L.n_kv, L.n, L.d), FY_OK);
    assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in, &a), FY_OK);
    pol.window_div = 0;
    assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in50, &b), FY_OK);
    assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in, &c), FY_OK);
    size_t nt = (size_t)L.n_kv * L.n, nd = (size_t)L.n_kv * L.d;
    assert_memory_equal(a.importance, b.importance, nt * sizeof(float));
    assert_memory_equal(a.obar, b.obar, nd * sizeof(float));
    assert_memory_equal(a.qsq, b.qsq, nd * sizeof(float));
    assert_memory_not_equal(a.importance, c.importance, nt * sizeof(float));
    kvc_scores_cleanup(&a), kvc_scores_cleanup(&b), kvc_scores_cleanup(&c);
    free(q50);
    kvt_layer_free(&L);
}

static void test_bad_params(void **state)
{
    kvc_policy_t pol;
    kvc_policy_builtin("ferry", &pol);
    kvt_layer_t L;
    kvt_layer_make(&L, 1, 4, 2, 40, 64, 8);
    kvc_encoder_params_t p = kvt_params(&pol, &L, 2, 0.25);
    kvc_encoder_t *enc = NULL;
    p.head_dim = 60; // not a multiple of 8
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_ERR_INVALID_ARG);
    p.head_dim = 72; // not a power of two, and the policy rotates
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_ERR_INVALID_ARG);
    p = kvt_params(&pol, &L, 2, 0.25);
    p.n_heads = 3;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_ERR_INVALID_ARG);
    p = kvt_params(&pol, &L, 2, 0.25);
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    uint8_t small[64];
    size_t len;
    kvc_layer_input_t in = kvt_input(&L, 0);
    assert_int_equal(kvc_encoder_encode_layer(enc, &in, NULL, small, sizeof(small), &len, NULL),
                     FY_ERR_INVALID_ARG);
    kvc_encoder_destroy(enc);
    kvc_encoder_destroy(NULL);
    kvt_layer_free(&L);
}

/* The greedy fill puts its candidates in order a window at a time and stops once no upgrade
 * fits: every window gives the frames of one sort of the whole list (SIZE_MAX), for every
 * builtin policy with a budget, several budgets and layers (the rate controller's state
 * carried along). The small windows must take the selection path more than once, and the
 * stop must leave candidates unsorted somewhere. */
static void test_greedy_window(void **state)
{
    (void)state;
    const char *const *names = kvc_policy_builtin_names();
    static const shape_t shapes[] = {{4, 2, 333, 64}, {8, 2, 700, 128}};
    static const double budgets[] = {0.5, 0.2, 0.1};
    static const size_t windows[] = {SIZE_MAX, 1, 2, 7, 100, KVC_GREEDY_WINDOW};
    enum { N_WIN = sizeof(windows) / sizeof(windows[0]), LAYERS = 3 };
    size_t many_windows = 0, stopped_early = 0, fills = 0;
    for (size_t pi = 0; names[pi]; pi++) {
        kvc_policy_t pol;
        assert_int_equal(kvc_policy_builtin(names[pi], &pol), FY_OK);
        if (pol.budget <= 0)
            continue; // no budget, no fill
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            const shape_t *sh = &shapes[si];
            for (size_t bi = 0; bi < sizeof(budgets) / sizeof(budgets[0]); bi++) {
                kvt_layer_t L;
                kvt_layer_make(&L, 40 + si * 7 + bi, sh->n_heads, sh->n_kv, sh->n, sh->d, 32);
                kvc_encoder_params_t p = kvt_params(&pol, &L, LAYERS, budgets[bi]);
                kvc_encoder_t *enc[N_WIN];
                uint8_t *buf[N_WIN];
                size_t cap = 0;
                for (size_t w = 0; w < N_WIN; w++) {
                    assert_int_equal(kvc_encoder_create(&p, &enc[w]), FY_OK);
                    kvc_encoder_set_greedy_window(enc[w], windows[w]);
                    cap = kvc_encoder_max_frame_bytes(enc[w]);
                    buf[w] = malloc(cap);
                    assert_non_null(buf[w]);
                }
                for (uint32_t l = 0; l < LAYERS; l++) {
                    if (l > 0)
                        kvc_synth_layer(900 + l, sh->n_heads, sh->n_kv, sh->n, sh->d, L.W, L.k, L.v,
                                        L.q);
                    kvc_layer_input_t in = kvt_input(&L, l);
                    size_t len[N_WIN], sorted[N_WIN];
                    for (size_t w = 0; w < N_WIN; w++) {
                        assert_int_equal(
                            kvc_encoder_encode_layer(enc[w], &in, NULL, buf[w], cap, &len[w], NULL),
                            FY_OK);
                        sorted[w] = kvc_encoder_greedy_sorted(enc[w]);
                    }
                    for (size_t w = 1; w < N_WIN; w++) {
                        assert_int_equal(len[w], len[0]);
                        assert_memory_equal(buf[w], buf[0], len[0]);
                        assert_true(sorted[w] <= sorted[0]);
                    }
                    fills += sorted[0] > 0;
                    many_windows += sorted[3] > 7; // windows of 7: more than one
                    stopped_early += sorted[3] < sorted[0];
                }
                for (size_t w = 0; w < N_WIN; w++) {
                    kvc_encoder_destroy(enc[w]);
                    free(buf[w]);
                }
                kvt_layer_free(&L);
            }
        }
    }
    printf("greedy windows: %zu fills, %zu over several windows of 7, %zu stopped early\n", fills,
           many_windows, stopped_early);
    assert_true(fills > 10);
    assert_true(many_windows > 0);
    assert_true(stopped_early > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_budget_adherence),  cmocka_unit_test(test_below_floor),
        cmocka_unit_test(test_determinism),       cmocka_unit_test(test_builtin_policies),
        cmocka_unit_test(test_bad_params),        cmocka_unit_test(test_prior),
        cmocka_unit_test(test_importance_kinds),  cmocka_unit_test(test_window_div),
        cmocka_unit_test(test_greedy_window),     cmocka_unit_test(test_sink_mass),
        cmocka_unit_test(test_short_prompt_pins), cmocka_unit_test(test_whole_mass),
        cmocka_unit_test(test_no_budget_pins),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
