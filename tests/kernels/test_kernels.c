// Each CPU kernel against a plain double-precision reference written here: GEMM (both paths),
// RMSNorm, RoPE (both layouts, scaling, freq factors), SwiGLU, causal attention, and paged
// attention over FP16 pages (any page size, partly filled last page) against dense attention.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static uint64_t g_rng = 42;

static float rnd(void)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static float *rnd_buf(size_t n)
{
    float *b = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        b[i] = rnd();
    return b;
}

static void test_gemm(void **state)
{
    static const int shapes[][3] = {{1, 7, 5}, {3, 17, 9}, {33, 64, 48}, {1, 1, 1}};
    for (size_t s = 0; s < FY_ARRAY_SIZE(shapes); s++) {
        int m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
        float *x = rnd_buf((size_t)m * k), *w = rnd_buf((size_t)n * k);
        float *y = rnd_buf((size_t)m * n), *y0 = malloc(sizeof(float) * m * n);
        memcpy(y0, y, sizeof(float) * m * n);
        for (int acc = 0; acc < 2; acc++) {
            memcpy(y, y0, sizeof(float) * m * n);
            krn_gemm_f32(m, n, k, x, k, w, k, y, n, acc);
            for (int i = 0; i < m; i++) {
                for (int j = 0; j < n; j++) {
                    double r = acc ? y0[i * n + j] : 0.0;
                    for (int t = 0; t < k; t++)
                        r += (double)x[i * k + t] * w[j * k + t];
                    assert_true(fabs(y[i * n + j] - r) < 1e-4 * (1 + fabs(r)));
                }
            }
        }
        free(x);
        free(w);
        free(y);
        free(y0);
    }
    krn_gemm_set_threads(2);
    krn_gemm_f32(0, 3, 3, NULL, 3, NULL, 3, NULL, 3, 0); // empty: nothing to do
}

static void test_rmsnorm_swiglu(void **state)
{
    enum { R = 3, D = 37 };
    float *x = rnd_buf(R * D), *w = rnd_buf(D), out[R * D];
    krn_rmsnorm_f32(out, D, x, D, w, R, D, 1e-5f);
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < D; i++)
            ss += (double)x[r * D + i] * x[r * D + i];
        double inv = 1.0 / sqrt(ss / D + 1e-5);
        for (int i = 0; i < D; i++)
            assert_true(fabs(out[r * D + i] - x[r * D + i] * inv * w[i]) < 1e-5);
    }
    // In place.
    krn_rmsnorm_f32(x, D, x, D, w, R, D, 1e-5f);
    assert_memory_equal(x, out, sizeof(out));
    float g[5] = {-3, -0.5f, 0, 0.5f, 4}, u[5] = {1, 2, 3, -1, 0.5f}, o[5];
    krn_swiglu_f32(o, g, u, 5);
    for (int i = 0; i < 5; i++)
        assert_true(fabs(o[i] - g[i] / (1 + exp(-g[i])) * u[i]) < 1e-6);
    free(x);
    free(w);
}

static void test_rope(void **state)
{
    enum { T = 4, H = 3, HD = 8 };
    int32_t pos[T] = {0, 1, 7, 100};
    float ff[HD / 2] = {1, 2, 4, 8};
    for (int mode = 0; mode < 2; mode++) {
        for (int variant = 0; variant < 2; variant++) {
            krn_rope_t rope = {.mode = mode ? KRN_ROPE_NEOX : KRN_ROPE_NORM, .n_rot = HD,
                               .theta = 10000.0f, .freq_scale = variant ? 0.5f : 1.0f,
                               .freq_factors = variant ? ff : NULL};
            float *x = rnd_buf(T * H * HD), y[T * H * HD];
            memcpy(y, x, sizeof(y));
            krn_rope_f32(y, H * HD, T, H, HD, pos, &rope);
            for (int t = 0; t < T; t++) {
                for (int h = 0; h < H; h++) {
                    const float *a = x + (t * H + h) * HD;
                    const float *b = y + (t * H + h) * HD;
                    for (int i = 0; i < HD / 2; i++) {
                        int i0 = mode ? i : 2 * i, i1 = mode ? i + HD / 2 : 2 * i + 1;
                        double f = pow(10000.0, -2.0 * i / HD) / (variant ? ff[i] : 1.0);
                        double ang = pos[t] * (variant ? 0.5 : 1.0) * f;
                        double r0 = a[i0] * cos(ang) - a[i1] * sin(ang);
                        double r1 = a[i0] * sin(ang) + a[i1] * cos(ang);
                        assert_true(fabs(b[i0] - r0) < 1e-5 && fabs(b[i1] - r1) < 1e-5);
                    }
                }
            }
            free(x);
        }
    }
}

/* Dense causal attention in double for one head. */
static void ref_attention(double *out, const float *q, const float *k, const float *v, int n_keys,
                          int hd, float scale)
{
    double *s = malloc(sizeof(double) * n_keys), mx = -INFINITY, sum = 0;
    for (int j = 0; j < n_keys; j++) {
        double d = 0;
        for (int t = 0; t < hd; t++)
            d += (double)q[t] * k[j * hd + t];
        s[j] = d * scale;
        mx = fmax(mx, s[j]);
    }
    for (int j = 0; j < n_keys; j++)
        sum += s[j] = exp(s[j] - mx);
    for (int t = 0; t < hd; t++) {
        out[t] = 0;
        for (int j = 0; j < n_keys; j++)
            out[t] += s[j] / sum * v[j * hd + t];
    }
    free(s);
}

static void test_causal_attention(void **state)
{
    enum { N = 19, HD = 16 };
    float *q = rnd_buf(N * HD), *k = rnd_buf(N * HD), *v = rnd_buf(N * HD);
    float out[N * HD], scratch[N];
    float scale = 1.0f / sqrtf(HD);
    // In two blocks, as prefill splits query rows.
    krn_attention_causal_f32(out, HD, q, HD, k, v, 0, 7, HD, scale, scratch);
    krn_attention_causal_f32(out + 7 * HD, HD, q + 7 * HD, HD, k, v, 7, N - 7, HD, scale, scratch);
    for (int i = 0; i < N; i++) {
        double r[HD];
        ref_attention(r, q + i * HD, k, v, i + 1, HD, scale);
        for (int t = 0; t < HD; t++)
            assert_true(fabs(out[i * HD + t] - r[t]) < 1e-5);
    }
    free(q);
    free(k);
    free(v);
}

// The GEMM version equals the reference, for a first block and a later one.
static void test_causal_attention_blas(void **state)
{
    enum { N = 45, HD = 32, LD = 3 * HD };
    float *q = rnd_buf(N * LD), *k = rnd_buf(N * HD), *v = rnd_buf(N * HD);
    float *out = calloc(N * LD, sizeof(float)), *scratch = malloc(sizeof(float) * N * N);
    float scale = 1.0f / sqrtf(HD);
    krn_attention_causal_blas_f32(out, LD, q, LD, k, v, 0, 20, HD, scale, scratch);
    krn_attention_causal_blas_f32(out + 20 * LD, LD, q + 20 * LD, LD, k, v, 20, N - 20, HD, scale,
                                  scratch);
    for (int i = 0; i < N; i++) {
        double r[HD];
        ref_attention(r, q + i * LD, k, v, i + 1, HD, scale);
        for (int t = 0; t < HD; t++)
            assert_true(fabs(out[i * LD + t] - r[t]) < 1e-5);
        assert_true(out[i * LD + HD] == 0.0f); // nothing written past head_dim
    }
    free(q);
    free(k);
    free(v);
    free(out);
    free(scratch);
}

// A long block (rows of every length mod 8, as the vectorized softmax sees them) with scores
// of standard deviation about 21, so a row's s - max reaches about -120: exponentials from 1
// down to underflow.
static void test_causal_attention_blas_long(void **state)
{
    enum { N = 203, HD = 64, Q0 = 77 };
    float *q = rnd_buf(N * HD), *k = rnd_buf(N * HD), *v = rnd_buf(N * HD);
    float *out = calloc(N * HD, sizeof(float)), *scratch = malloc(sizeof(float) * N * N);
    float scale = 8.0f; // q . k has a standard deviation of about 2.7 here
    krn_attention_causal_blas_f32(out, HD, q, HD, k, v, 0, Q0, HD, scale, scratch);
    krn_attention_causal_blas_f32(out + Q0 * HD, HD, q + Q0 * HD, HD, k, v, Q0, N - Q0, HD, scale,
                                  scratch);
    double worst = 0;
    for (int i = 0; i < N; i++) {
        double r[HD];
        ref_attention(r, q + i * HD, k, v, i + 1, HD, scale);
        for (int t = 0; t < HD; t++)
            worst = fmax(worst, fabs(out[i * HD + t] - r[t]));
    }
    print_message("worst |out - ref| %.3g\n", worst);
    assert_true(worst < 1e-5);
    free(q);
    free(k);
    free(v);
    free(out);
    free(scratch);
}

static void test_paged_attention(void **state)
{
    enum { HD = 64, G = 3, MAXN = 70 };
    float scale = 1.0f / sqrtf(HD);
    static const int page_sizes[] = {1, 4, 16, 33, 128};
    static const int lens[] = {1, 5, 16, 17, 70};
    for (size_t ps = 0; ps < FY_ARRAY_SIZE(page_sizes); ps++) {
        for (size_t li = 0; li < FY_ARRAY_SIZE(lens); li++) {
            int pt = page_sizes[ps], n = lens[li];
            // Keys/values as they are after FP16 storage, so the reference sees the same data.
            float *k = rnd_buf(MAXN * HD), *v = rnd_buf(MAXN * HD), *q = rnd_buf(G * HD);
            for (int i = 0; i < MAXN * HD; i++) {
                k[i] = fy_fp16_to_fp32(fy_fp32_to_fp16(k[i] * 3));
                v[i] = fy_fp16_to_fp32(fy_fp32_to_fp16(v[i]));
            }
            int np = (n + pt - 1) / pt;
            uint16_t **pages = malloc(sizeof(*pages) * np);
            for (int p = 0; p < np; p++) {
                pages[p] = calloc((size_t)2 * pt * HD, sizeof(uint16_t));
                for (int s = 0; s < pt && p * pt + s < n; s++) {
                    fy_fp32_to_fp16_buf(pages[p] + s * HD, k + (p * pt + s) * HD, HD);
                    fy_fp32_to_fp16_buf(pages[p] + (pt + s) * HD, v + (p * pt + s) * HD, HD);
                }
            }
            krn_page_list_t list = {.pages = (const uint16_t *const *)pages, .n_pages = np,
                                    .page_tokens = pt, .n_tokens = n};
            float out[G * HD];
            krn_paged_attention_f16(out, q, G, HD, scale, &list);
            for (int h = 0; h < G; h++) {
                double r[HD];
                ref_attention(r, q + h * HD, k, v, n, HD, scale);
                for (int t = 0; t < HD; t++) {
                    if (fabs(out[h * HD + t] - r[t]) > 1e-5)
                        fail_msg("page %d len %d head %d dim %d: %f vs %f", pt, n, h, t,
                                 out[h * HD + t], r[t]);
                }
            }
            for (int p = 0; p < np; p++)
                free(pages[p]);
            free(pages);
            free(k);
            free(v);
            free(q);
        }
    }
}

/* Quantizes FP32 rows into a storage type, the ggml way (a test-only encoder). */
static void encode_rows(krn_qtype_t type, const float *w, int rows, int cols, uint8_t *out)
{
    size_t rb = krn_qtype_row_bytes(type, cols);
    for (int r = 0; r < rows; r++) {
        uint8_t *p = out + (size_t)r * rb;
        const float *x = w + (size_t)r * cols;
        if (type == KRN_Q_F32) {
            memcpy(p, x, rb);
            continue;
        }
        if (type == KRN_Q_F16) {
            fy_fp32_to_fp16_buf((uint16_t *)(void *)p, x, (size_t)cols);
            continue;
        }
        for (int b = 0; b < cols / 32; b++) {
            const float *v = x + b * 32;
            float mn = v[0], mx = v[0], amax = 0;
            for (int j = 0; j < 32; j++) {
                mn = fminf(mn, v[j]);
                mx = fmaxf(mx, v[j]);
                amax = fmaxf(amax, fabsf(v[j]));
            }
            uint16_t h;
            if (type == KRN_Q_Q8_0) {
                float d = amax / 127;
                h = fy_fp32_to_fp16(d);
                memcpy(p, &h, 2);
                for (int j = 0; j < 32; j++)
                    p[2 + j] = (uint8_t)(int8_t)roundf(d ? v[j] / d : 0);
                p += 34;
            } else if (type == KRN_Q_Q4_0) {
                float d = amax / 8;
                h = fy_fp32_to_fp16(d);
                memcpy(p, &h, 2);
                for (int j = 0; j < 16; j++) {
                    int a = (int)fminf(15, roundf(d ? v[j] / d : 0) + 8);
                    int c = (int)fminf(15, roundf(d ? v[j + 16] / d : 0) + 8);
                    p[2 + j] = (uint8_t)(FY_MAX(a, 0) | FY_MAX(c, 0) << 4);
                }
                p += 18;
            } else {
                float d = (mx - mn) / 15;
                h = fy_fp32_to_fp16(d);
                memcpy(p, &h, 2);
                h = fy_fp32_to_fp16(mn);
                memcpy(p + 2, &h, 2);
                for (int j = 0; j < 16; j++) {
                    int a = (int)roundf(d ? (v[j] - mn) / d : 0);
                    int c = (int)roundf(d ? (v[j + 16] - mn) / d : 0);
                    p[4 + j] = (uint8_t)(FY_MIN(a, 15) | FY_MIN(c, 15) << 4);
                }
                p += 20;
            }
        }
    }
}

// The stored-type matmul (SIMD when available, threaded) equals the portable reference, and
// the reference equals a double-precision product with the decoded weights.
static void test_matmul_q(void **state)
{
    static const krn_qtype_t types[] = {KRN_Q_F32, KRN_Q_F16, KRN_Q_Q8_0, KRN_Q_Q4_0,
                                        KRN_Q_Q4_1};
    enum { M = 6, N = 70, K = 96 };
    fy_pool_t *pool;
    assert_int_equal(fy_pool_create(3, &pool), FY_OK);
    float *w = rnd_buf(N * K), *x = rnd_buf(M * K);
    for (size_t t = 0; t < FY_ARRAY_SIZE(types); t++) {
        size_t rb = krn_qtype_row_bytes(types[t], K);
        assert_true(krn_qtype_supported(types[t]) && rb > 0);
        uint8_t *raw = malloc(rb * N);
        encode_rows(types[t], w, N, K, raw);
        krn_qmat_t q = {.type = types[t], .rows = N, .cols = K, .row_bytes = rb, .data = raw};
        float ref[M * N], got[M * N], one[N];
        krn_matmul_q_reference_f32(M, x, K, &q, ref, N);
        // Block types at few rows take the integer path; its own portable reference is exact
        // up to summation order (test_matmul_q8 bounds it against this FP32 reference).
        bool block = types[t] != KRN_Q_F32 && types[t] != KRN_Q_F16;
        krn_matmul_q_set_int8(true);
        float ref_q8[M * N];
        if (block)
            assert_int_equal(krn_matmul_q8_reference_f32(M, x, K, &q, ref_q8, N), FY_OK);
        else
            assert_int_equal(krn_matmul_q8_reference_f32(M, x, K, &q, got, N),
                             FY_ERR_UNSUPPORTED);
        for (int m = 1; m <= M; m++) {
            const float *e = block && m <= KRN_MATMUL_Q8_MAX_ROWS ? ref_q8 : ref;
            for (int i = 0; i < m * N; i++)
                got[i] = 1.0f;
            assert_int_equal(krn_matmul_q_f32(pool, m, x, K, &q, got, N, 1), FY_OK);
            for (int i = 0; i < m * N; i++)
                assert_true(fabsf(got[i] - 1.0f - e[i]) < 1e-4f * (1 + fabsf(e[i])));
        }
        // Off (the default), every row count takes the FP32 path.
        krn_matmul_q_set_int8(false);
        for (int i = 0; i < N; i++)
            got[i] = 0.0f;
        assert_int_equal(krn_matmul_q_f32(pool, 1, x, K, &q, got, N, 1), FY_OK);
        for (int i = 0; i < N; i++)
            assert_true(fabsf(got[i] - ref[i]) < 1e-4f * (1 + fabsf(ref[i])));
        krn_matmul_q_set_int8(true);
        // Two matrices in one pass (the second a row-shifted view of the same data) land in
        // their own outputs.
        krn_qmat_t tail = q;
        tail.rows = N - 10;
        tail.data = raw + 10 * rb;
        const krn_qmat_t *ws[2] = {&q, &tail};
        float y2[M * (2 * N)];
        float *ys[2] = {y2, y2 + N};
        assert_int_equal(krn_matmul_q_multi_f32(pool, M, x, K, ws, ys, 2 * N, 2, 0), FY_OK);
        for (int i = 0; i < M; i++) {
            for (int j = 0; j < N; j++)
                assert_true(fabsf(y2[i * 2 * N + j] - ref[i * N + j]) < 1e-4f * (1 + fabsf(ref[i * N + j])));
            for (int j = 0; j < N - 10; j++)
                assert_true(fabsf(y2[i * 2 * N + N + j] - ref[i * N + 10 + j]) <
                            1e-4f * (1 + fabsf(ref[i * N + 10 + j])));
        }
        // Reference vs the decoded weights (one row decoded through a 1-row identity input).
        for (int j = 0; j < N; j++) {
            double r = 0;
            for (int c = 0; c < K; c++) {
                float e[K];
                memset(e, 0, sizeof(e));
                e[c] = 1.0f;
                krn_qmat_t row = q;
                row.rows = 1;
                row.data = raw + (size_t)j * rb;
                krn_matmul_q_reference_f32(1, e, K, &row, one, 1);
                r += (double)one[0] * x[c];
            }
            assert_true(fabs(ref[j] - r) < 1e-4 * (1 + fabs(r)));
        }
        free(raw);
    }
    krn_qmat_t bad = {.type = (krn_qtype_t)12, .rows = 1, .cols = 32, .row_bytes = 32,
                      .data = w};
    float y[1];
    assert_int_equal(krn_matmul_q_f32(pool, 1, x, K, &bad, y, 1, 0), FY_ERR_UNSUPPORTED);
    fy_pool_destroy(pool);
    free(w);
    free(x);
}

// The integer path for block weights, odd shapes (every tile shape, row tails, block counts
// not a multiple of 8, a zero block, outliers), threaded and with accumulate:
// - SIMD/threaded result vs its portable reference (same integers) up to
//   KRN_MATMUL_Q8_MAX_ROWS rows, vs the FP32 reference above: |d| <= 1e-5 · Σ|w||x|;
// - portable integer reference vs the FP32 reference: |d| <= Σ_blocks dx/2 · Σ|w| +
//   1e-5 · Σ|w||x|, dx = max|x| / 127 / 254 of the x block (the activation rounding bound).
static void test_matmul_q8(void **state)
{
    static const krn_qtype_t types[] = {KRN_Q_Q8_0, KRN_Q_Q4_0, KRN_Q_Q4_1};
    static const int ks[] = {32, 96, 544};
    static const int ns[] = {1, 7, 70};
    enum { MMAX = 17 };
    krn_matmul_q_set_int8(true);
    fy_pool_t *pool;
    assert_int_equal(fy_pool_create(3, &pool), FY_OK);
    for (size_t ki = 0; ki < FY_ARRAY_SIZE(ks); ki++) {
        int K = ks[ki];
        float *x = rnd_buf((size_t)MMAX * K);
        for (int c = 0; c < 32; c++)
            x[(size_t)2 * K + c] = 0; // a zero block (scale 0)
        x[(size_t)3 * K + 5] = 40.0f; // an outlier
        float *eye = calloc((size_t)K * K, sizeof(float));
        for (int c = 0; c < K; c++)
            eye[(size_t)c * K + c] = 1.0f;
        for (size_t ni = 0; ni < FY_ARRAY_SIZE(ns); ni++) {
            int N = ns[ni];
            float *w = rnd_buf((size_t)N * K);
            for (size_t t = 0; t < FY_ARRAY_SIZE(types); t++) {
                size_t rb = krn_qtype_row_bytes(types[t], K);
                uint8_t *raw = malloc(rb * N);
                encode_rows(types[t], w, N, K, raw);
                krn_qmat_t q = {.type = types[t], .rows = N, .cols = K, .row_bytes = rb,
                                .data = raw};
                float *wd_t = malloc(sizeof(float) * K * N); // [c][j] = decoded W[j][c]
                krn_matmul_q_reference_f32(K, eye, K, &q, wd_t, N);
                float *ref = malloc(sizeof(float) * MMAX * N);
                float *q8 = malloc(sizeof(float) * MMAX * N);
                float *got = malloc(sizeof(float) * MMAX * N);
                krn_matmul_q_reference_f32(MMAX, x, K, &q, ref, N);
                assert_int_equal(krn_matmul_q8_reference_f32(MMAX, x, K, &q, q8, N), FY_OK);
                for (int i = 0; i < MMAX; i++) {
                    for (int j = 0; j < N; j++) {
                        double bound = 0, mag = 0;
                        for (int b = 0; b < K / 32; b++) {
                            double amax = 0, wabs = 0;
                            for (int c = b * 32; c < b * 32 + 32; c++) {
                                double xa = fabs(x[(size_t)i * K + c]);
                                double wa = fabs(wd_t[(size_t)c * N + j]);
                                amax = xa > amax ? xa : amax;
                                wabs += wa;
                                mag += wa * xa;
                            }
                            bound += amax / 127 / 254 / 2 * wabs;
                        }
                        float r = ref[(size_t)i * N + j], g = q8[(size_t)i * N + j];
                        assert_true(fabs((double)g - r) <= bound + 1e-5 * mag + 1e-6);
                    }
                }
                for (int m = 1; m <= MMAX; m++) {
                    for (int acc = 0; acc < 2; acc++) {
                        for (int i = 0; i < m * N; i++)
                            got[i] = acc ? 0.5f : NAN;
                        assert_int_equal(krn_matmul_q_f32(pool, m, x, K, &q, got, N, acc),
                                         FY_OK);
                        for (int i = 0; i < m; i++) {
                            for (int j = 0; j < N; j++) {
                                double mag = 0;
                                for (int c = 0; c < K; c++)
                                    mag += fabs(wd_t[(size_t)c * N + j] * x[(size_t)i * K + c]);
                                const float *ex = m <= KRN_MATMUL_Q8_MAX_ROWS ? q8 : ref;
                                float e = ex[(size_t)i * N + j] + (acc ? 0.5f : 0.0f);
                                assert_true(fabs((double)got[(size_t)i * N + j] - e) <=
                                            1e-5 * mag + 1e-6);
                            }
                        }
                    }
                }
                free(ref);
                free(q8);
                free(got);
                free(wd_t);
                free(raw);
            }
            free(w);
        }
        free(eye);
        free(x);
    }
    krn_matmul_q_set_int8(false);
    fy_pool_destroy(pool);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm),
        cmocka_unit_test(test_rmsnorm_swiglu),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_causal_attention),
        cmocka_unit_test(test_causal_attention_blas),
        cmocka_unit_test(test_causal_attention_blas_long),
        cmocka_unit_test(test_paged_attention),
        cmocka_unit_test(test_matmul_q),
        cmocka_unit_test(test_matmul_q8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
