// Quantizers: per-option round-trip error within half a step, F16 exact, bit-exact
// determinism, directed FP16 rounding of scale and zero, and the Hadamard rotation.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
#include "kvtest.h"

static void fill(float *x, size_t n, uint64_t seed, float outlier)
{
    uint16_t *k = malloc(n * 2), *v = malloc(n * 2);
    kvc_synth_layer(seed, 1, 1, (uint32_t)(n / 64), 64, 0, k, v, NULL);
    for (size_t i = 0; i < n; i++)
        x[i] = fy_fp16_to_fp32(k[i]) * (i % 13 == 0 ? outlier : 1.0f);
    free(k), free(v);
}

static void check_option(int o, uint32_t d, uint32_t m, uint32_t P, uint64_t seed)
{
    float *k = malloc((size_t)m * d * 4), *v = malloc((size_t)m * d * 4);
    float *k2 = malloc((size_t)m * d * 4), *v2 = malloc((size_t)m * d * 4);
    float *buf = malloc((size_t)64 * 512 * 4);
    fill(buf, 64 * 512, seed, 10.0f);
    memcpy(k, buf, (size_t)m * d * 4);
    memcpy(v, buf + (size_t)m * d, (size_t)m * d * 4);
    uint32_t cap = m + 3; // a page slot has spare capacity
    size_t gb = kvc_group_bytes(o, d, cap, P);
    bool prot = P > 0 && o >= KVC_OPT_Q4 && o <= KVC_OPT_Q2;
    uint8_t *g1 = malloc(gb), *g2 = malloc(gb);
    memset(g1, 0xaa, gb);
    memset(g2, 0x55, gb);
    kvc_quant_group(o, d, m, cap, P, NULL, k, v, g1);
    kvc_quant_group(o, d, m, cap, P, NULL, k, v, g2);
    assert_memory_equal(g1, g2, o == KVC_OPT_F16 ? 4 * d : gb); // deterministic, no stale bytes
    kvc_dequant_group(o, d, m, cap, P, g1, k2, v2);
    if (o == KVC_OPT_F16) {
        for (uint32_t c = 0; c < d; c++) {
            assert_true(k2[c] == fy_fp16_to_fp32(fy_fp32_to_fp16(k[c])));
            assert_true(v2[c] == fy_fp16_to_fp32(fy_fp32_to_fp16(v[c])));
        }
    } else {
        int kb = kvc_opt_kbits(o), vb = kvc_opt_vbits(o);
        uint8_t is_p[512] = {0};
        if (prot) {
            const uint8_t *pi = g1 + kvc_group_bytes(o, d, cap, 0);
            for (uint32_t j = 0; j < P; j++) {
                uint32_t c = kvc_rd16(pi + 2 * j);
                assert_true(c < d);
                if (j > 0)
                    assert_true(c > kvc_rd16(pi + 2 * (j - 1)));
                is_p[c] = 1;
            }
        }
        for (uint32_t c = 0; c < d; c++) {
            int bits = is_p[c] ? 8 : kb;
            float s = fy_fp16_to_fp32(kvc_rd16(g1 + 2 * c));
            float mn = k[c], mx = k[c];
            for (uint32_t t = 0; t < m; t++) {
                float x = k[(size_t)t * d + c];
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
                float err = fabsf(k2[(size_t)t * d + c] - x);
                assert_true(err <= s * 0.5f * (1 + 1e-5f) + 1e-6f * (1 + fabsf(x)));
            }
            // The step is the analytic one, rounded up by at most an FP16 ulp.
            float step = (mx - mn) / (float)((1 << bits) - 1);
            assert_true(s <= step * (1 + 1.0f / 512) + fabsf(mn) / 512 / ((1 << bits) - 1) +
                                 1e-7f);
        }
        const uint8_t *vs = g1 + 4 * d;
        for (uint32_t t = 0; t < m; t++) {
            float s = fy_fp16_to_fp32(kvc_rd16(vs + 2 * t));
            for (uint32_t c = 0; c < d; c++) {
                float x = v[(size_t)t * d + c];
                float err = fabsf(v2[(size_t)t * d + c] - x);
                assert_true(err <= s * 0.5f * (1 + 1e-5f) + 1e-6f * (1 + fabsf(x)));
            }
            (void)vb;
        }
    }
    free(k), free(v), free(k2), free(v2), free(buf), free(g1), free(g2);
}

static void test_roundtrip_bounds(void **state)
{
    const uint32_t ds[] = {64, 128};
    const uint32_t ms[] = {1, 7, 32};
    for (int o = 0; o < KVC_OPT_DROP; o++)
        for (size_t i = 0; i < 2; i++)
            for (size_t j = 0; j < 3; j++)
                for (uint32_t P = 0; P <= 4; P += 4)
                    check_option(o, ds[i], o == KVC_OPT_F16 ? 1 : ms[j], P, 11 + o * 7 + i + j);
}

static void test_constant_group(void **state)
{
    float k[8 * 32], v[8 * 32], k2[8 * 32], v2[8 * 32];
    for (int i = 0; i < 8 * 32; i++)
        k[i] = v[i] = 0.3f;
    uint8_t g[4096];
    kvc_quant_group(KVC_OPT_Q2, 32, 8, 8, 0, NULL, k, v, g);
    kvc_dequant_group(KVC_OPT_Q2, 32, 8, 8, 0, g, k2, v2);
    for (int i = 0; i < 8 * 32; i++) {
        assert_true(fabsf(k2[i] - 0.3f) <= 0.3f / 1024);
        assert_true(fabsf(v2[i] - 0.3f) <= 0.3f / 1024);
    }
}

static void test_hostile_values(void **state)
{
    // NaN and infinities must not crash or trip UBSan; finite neighbours stay finite.
    float k[8 * 8], v[8 * 8], k2[8 * 8], v2[8 * 8];
    for (int i = 0; i < 64; i++)
        k[i] = v[i] = (float)i;
    k[3] = NAN;
    v[5] = INFINITY;
    k[9] = -INFINITY;
    uint8_t g[4096];
    for (int o = KVC_OPT_Q8; o <= KVC_OPT_Q2; o++) {
        kvc_quant_group(o, 8, 8, 8, 2, NULL, k, v, g);
        kvc_dequant_group(o, 8, 8, 8, 2, g, k2, v2);
    }
}

static void test_hadamard(void **state)
{
    float x[128], y[128];
    for (int i = 0; i < 128; i++)
        x[i] = y[i] = sinf((float)i * 0.7f) * (i % 9 == 0 ? 20 : 1);
    double n0 = 0, n1 = 0;
    kvc_hadamard(y, 128);
    for (int i = 0; i < 128; i++) {
        n0 += (double)x[i] * x[i];
        n1 += (double)y[i] * y[i];
    }
    assert_true(fabs(n0 - n1) <= 1e-5 * n0);
    kvc_hadamard(y, 128); // its own inverse
    for (int i = 0; i < 128; i++)
        assert_true(fabsf(y[i] - x[i]) <= 1e-5f * (1 + fabsf(x[i])));
}

/* The butterflies in their plain order, one element at a time: the GPU's rotation (and so the
 * frames) follow this exact sequence of fp32 operations. */
static void hadamard_ref(float *x, uint32_t d)
{
    for (uint32_t len = 1; len < d; len <<= 1)
        for (uint32_t i = 0; i < d; i += 2 * len)
            for (uint32_t j = i; j < i + len; j++) {
                float a = x[j], b = x[j + len];
                x[j] = a + b;
                x[j + len] = a - b;
            }
    float s = 1.0f / sqrtf((float)d);
    for (uint32_t c = 0; c < d; c++)
        x[c] *= s;
}

static void test_hadamard_exact(void **state)
{
    float x[512], ref[512], y[512];
    fill(x, 512, 9, 50.0f);
    x[3] = -0.0f, x[70] = 0.0f, x[71] = -0.0f; // signed zeros take the same path
    for (uint32_t d = 1; d <= 512; d *= 2) {
        memcpy(ref, x, sizeof x);
        hadamard_ref(ref, d);
        memcpy(y, x, sizeof x);
        kvc_hadamard(y, d);
        assert_memory_equal(y, ref, d * sizeof(float));
        memset(y, 0, sizeof y);
        kvc_hadamard_to(x, y, d); // out of place
        assert_memory_equal(y, ref, d * sizeof(float));
    }
}

/* Two bit widths measured in one pass give each width's one-pass errors, bit for bit. */
static void test_errors_pair(void **state)
{
    enum { M = 29 };
    static float k[M * 256], v[M * 256];
    float kw[256], e1[M], e2[M], r1[M], r2[M];
    fill(k, M * 256, 21, 8.0f);
    fill(v, M * 256, 22, 3.0f);
    for (int c = 0; c < 256; c++)
        kw[c] = 0.25f + (float)(c % 7) * 0.5f;
    const uint32_t dims[] = {8, 32, 64, 128, 256};
    for (int di = 0; di < 5; di++) {
        uint32_t d = dims[di];
        for (uint32_t m = 1; m <= M; m += 7) {
            kvc_key_errors2(4, e1, 2, e2, d, m, k, kw);
            kvc_key_errors(4, d, m, k, kw, r1);
            kvc_key_errors(2, d, m, k, kw, r2);
            assert_memory_equal(e1, r1, m * sizeof(float));
            assert_memory_equal(e2, r2, m * sizeof(float));
            kvc_value_errors2(4, e1, 2, e2, d, m, v);
            kvc_value_errors(4, d, m, v, r1);
            kvc_value_errors(2, d, m, v, r2);
            assert_memory_equal(e1, r1, m * sizeof(float));
            assert_memory_equal(e2, r2, m * sizeof(float));
            kvc_value_errors2(8, e1, 2, NULL, d, m, v); // one width
            kvc_value_errors(8, d, m, v, r1);
            assert_memory_equal(e1, r1, m * sizeof(float));
        }
    }
}

/* Every byte value unpacks to its codes, low bits first, at 2, 4 and 8 bits. */
static void test_unpack_row(void **state)
{
    uint8_t src[256];
    for (int i = 0; i < 256; i++)
        src[i] = (uint8_t)(i * 37 + 11);
    float dst[1024];
    const int bits[3] = {2, 4, 8};
    for (int bi = 0; bi < 3; bi++) {
        int b = bits[bi];
        uint32_t d = 256 * 8 / (uint32_t)b;
        kvc_unpack_row(src, d, b, dst);
        for (uint32_t c = 0; c < d; c++) {
            uint32_t bit = c * (uint32_t)b;
            int code = (src[bit / 8] >> (bit % 8)) & ((1 << b) - 1);
            assert_true(dst[c] == (float)code);
        }
    }
}

static void test_option_names(void **state)
{
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        kvc_opt_t p;
        assert_int_equal(kvc_opt_parse(kvc_opt_name(o), &p), FY_OK);
        assert_int_equal(p, o);
    }
    kvc_opt_t p;
    assert_int_equal(kvc_opt_parse("3/3", &p), FY_ERR_INVALID_ARG);
    assert_string_equal(kvc_opt_name((kvc_opt_t)9), "?");
}

/* Spearman's rank correlation of x and y (no ties expected). */
static double rank_corr(const float *x, const float *y, uint32_t n)
{
    double sum = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t rx = 0, ry = 0;
        for (uint32_t j = 0; j < n; j++) {
            rx += x[j] < x[i];
            ry += y[j] < y[i];
        }
        double dr = (double)rx - (double)ry;
        sum += dr * dr;
    }
    return 1 - 6 * sum / ((double)n * ((double)n * n - 1));
}

/* The modelled errors (step^2 / 12 an element, ferry's distortion) against the trial
 * quantization's on rotated rows of the synthetic K/V (outlier channels, value rows at 9
 * scales), at 8, 4 and 2 bits: the same size on average (keys per group, values per row) and
 * the same order of a group's value rows. */
static void test_model_errors(void **state)
{
    enum { D = 64, M = 32, GROUPS = 8 };
    uint16_t *kh = malloc((size_t)GROUPS * M * D * 2), *vh = malloc((size_t)GROUPS * M * D * 2);
    kvc_synth_layer(77, 1, 1, GROUPS * M, D, 0, kh, vh, NULL);
    float kw[D];
    for (int c = 0; c < D; c++)
        kw[c] = 0.5f + (float)(c % 5) * 0.25f;
    const int bits[3] = {8, 4, 2};
    for (int bi = 0; bi < 3; bi++) {
        int b = bits[bi];
        double vsum_m = 0, vsum_t = 0, ksum_m = 0, ksum_t = 0, corr_min = 1;
        for (int g = 0; g < GROUPS; g++) {
            float k[M * D], v[M * D];
            for (int t = 0; t < M; t++) {
                float scale = 0.25f + 0.5f * (float)((t * 7 + g) % 9);
                for (int c = 0; c < D; c++) {
                    size_t i = ((size_t)g * M + t) * D + c;
                    k[t * D + c] = fy_fp16_to_fp32(kh[i]);
                    v[t * D + c] = fy_fp16_to_fp32(vh[i]) * scale;
                }
                kvc_hadamard(k + t * D, D);
                kvc_hadamard(v + t * D, D);
            }
            float ek_m[M], ev_m[M], ek_t[M], ev_t[M];
            kvc_model_errors(b, D, M, k, v, kw, ek_m, ev_m);
            kvc_key_errors(b, D, M, k, kw, ek_t);
            kvc_value_errors(b, D, M, v, ev_t);
            for (int t = 0; t < M; t++) {
                assert_true(ek_m[t] == ek_m[0]); // a key group shares its steps
                assert_true(ev_m[t] > 0 && ev_t[t] > 0);
                vsum_m += ev_m[t], vsum_t += ev_t[t];
                ksum_m += ek_m[t], ksum_t += ek_t[t];
                double r = (double)ev_m[t] / ev_t[t]; // each row within a factor of 2
                assert_true(r > 0.5 && r < 2.0);
            }
            double rc = rank_corr(ev_m, ev_t, M);
            corr_min = rc < corr_min ? rc : corr_min;
        }
        double vr = vsum_m / vsum_t, kr = ksum_m / ksum_t;
        if (getenv("KVC_TEST_VERBOSE"))
            printf("%d bits: values model/trial %.3f, keys %.3f, rank correlation >= %.3f\n", b, vr,
                   kr, corr_min);
        assert_true(vr > 0.8 && vr < 1.25);
        assert_true(kr > 0.8 && kr < 1.25);
        assert_true(corr_min > 0.9);
    }
    free(kh), free(vh);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_bounds), cmocka_unit_test(test_constant_group),
        cmocka_unit_test(test_hostile_values),   cmocka_unit_test(test_hadamard),
        cmocka_unit_test(test_hadamard_exact),   cmocka_unit_test(test_errors_pair),
        cmocka_unit_test(test_unpack_row),       cmocka_unit_test(test_option_names),
        cmocka_unit_test(test_model_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
