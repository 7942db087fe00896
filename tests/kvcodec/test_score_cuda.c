// GPU scoring parity: kvc_score_cuda against kvc_score. From window_attn (with values the
// scorer must clamp) every output is bit-identical: importance (GQA mean and max, pooling 1
// and 7), window output, query sensitivity and HybridKV classes. From the window queries the
// GPU's expf and softmax sums differ in rounding, so importance and window output are compared
// to 1e-4 relative (plus 1e-6 of the largest value, for sums that cancel) and the query
// sensitivity exactly.
// Each with the mean, RMS and max importance over the window. Odd token counts, GQA groups of
// 1 to 4, head_dim 40, 64, 128 and 256, windows that are not a multiple of 16 rows, keys too
// misaligned for 16-byte loads. From the window queries both window-softmax kernels run: the
// tensor-core one (the default up to head_dim 128; blocks of 64 tokens, and of 128 with
// FERRY_SCORE_TT=128) and FERRY_SCORE_IMPL=simt. A real-size case checks the scores against a
// copy of the CPU's that kvc_score_cuda_host brings back. Exits 77 without a GPU.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvcodec_cuda.h"
#include "kvtest.h"

#if FY_HAVE_CUDA
#include <cuda_runtime.h>

#define CK(call) assert_int_equal((int)(call), (int)cudaSuccess)

typedef struct {
    uint32_t n_heads, n_kv, n, d, W;
    kvc_reduce_t reduce;
    uint32_t pool;
    float hybrid;
    int from_q;
} scase_t;

static void download(const kvc_scores_t *d, kvc_scores_t *h)
{
    size_t nt = (size_t)d->n_kv_heads * d->n_tokens, nd = (size_t)d->n_kv_heads * d->head_dim;
    CK(cudaMemcpy(h->importance, d->importance, nt * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h->obar, d->obar, nd * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h->qsq, d->qsq, nd * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h->is_static, d->is_static, d->n_kv_heads, cudaMemcpyDeviceToHost));
}

static void close_enough(const char *what, const float *a, const float *b, size_t n)
{
    double big = 0; // cancellation in a sum can leave a small value with the sum's error
    for (size_t i = 0; i < n; i++)
        big = fmax(big, fabs((double)a[i]));
    for (size_t i = 0; i < n; i++) {
        double tol = 1e-4 * fabs((double)a[i]) + 1e-6 * big + 1e-9;
        if (!(fabs((double)a[i] - (double)b[i]) <= tol)) {
            fprintf(stderr, "%s[%zu]: cpu %.9g gpu %.9g\n", what, i, a[i], b[i]);
            fail();
        }
    }
}

static void run_case(const scase_t *c, uint64_t seed, kvc_importance_t imp)
{
    kvc_policy_t pol;
    kvc_policy_default(&pol);
    pol.importance = imp; // without window queries every mode is the mean, as on the CPU
    // window_div: the default 8 for even seeds (the 77-token case with 77 window rows scores from
    // the last 32, the last case from 37 of 77), 0 for odd ones
    pol.window_div = seed % 2 ? 0 : pol.window_div;
    pol.reduce = c->reduce;
    pol.pool_kernel = c->pool;
    pol.hybrid_threshold = c->hybrid;
    kvt_layer_t L;
    kvt_layer_make(&L, seed, c->n_heads, c->n_kv, c->n, c->d, c->W);
    size_t ne = (size_t)c->n_kv * c->n * c->d;
    size_t nq = (size_t)c->n_heads * L.W * c->d;
    size_t nw = (size_t)c->n_heads * c->n;
    uint16_t *dk0, *dk, *dv;
    float *dq, *dwa;
    // Every third case puts the keys 2 bytes off 16-byte alignment (no vector loads).
    size_t koff = seed % 3 == 0 ? 1 : 0;
    CK(cudaMalloc((void **)&dk0, (ne + 8) * 2));
    dk = dk0 + koff;
    CK(cudaMalloc((void **)&dv, ne * 2));
    CK(cudaMalloc((void **)&dq, nq * 4));
    CK(cudaMalloc((void **)&dwa, nw * 4));
    CK(cudaMemcpy(dk, L.k, ne * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, L.v, ne * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dq, L.q, nq * 4, cudaMemcpyHostToDevice));
    float *wa = malloc(nw * 4);
    uint64_t s = seed;
    for (size_t i = 0; i < nw; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        float u = (float)(s >> 40) / (float)(1u << 24);
        wa[i] = u * 3.0f / (float)c->n;
        if (i % 53 == 1)
            wa[i] = -1.0f; // clamped to 0 by the scorer
        if (i % 59 == 2)
            wa[i] = 2.0f;
        if (i % 61 == 3)
            wa[i] = NAN;
    }
    CK(cudaMemcpy(dwa, wa, nw * 4, cudaMemcpyHostToDevice));
    kvc_layer_input_t in = kvt_input(&L, 0), din = in;
    din.k = dk;
    din.v = dv;
    if (c->from_q) {
        din.q_window = dq;
    } else {
        in.q_window = din.q_window = NULL;
        in.n_window = din.n_window = 0;
        in.window_attn = wa;
        din.window_attn = dwa;
    }
    kvc_scores_t ref, got, dsc;
    assert_int_equal(kvc_scores_init(&ref, c->n_kv, c->n, c->d), FY_OK);
    assert_int_equal(kvc_scores_init(&got, c->n_kv, c->n, c->d), FY_OK);
    assert_int_equal(kvc_scores_init_cuda(&dsc, c->n_kv, c->n, c->d), FY_OK);
    CK(cudaMemset(dsc.importance, 0xff, (size_t)c->n_kv * c->n * 4)); // poison: NaN
    CK(cudaMemset(dsc.obar, 0xff, (size_t)c->n_kv * c->d * 4));
    CK(cudaMemset(dsc.qsq, 0xff, (size_t)c->n_kv * c->d * 4));
    CK(cudaMemset(dsc.is_static, 0xff, c->n_kv));
    assert_int_equal(kvc_score(&pol, c->n_heads, c->n_kv, c->n, c->d, &in, &ref), FY_OK);
    assert_int_equal(kvc_score_cuda(&pol, c->n_heads, c->n_kv, c->n, c->d, &din, &dsc, NULL),
                     FY_OK);
    CK(cudaDeviceSynchronize());
    download(&dsc, &got);
    size_t nt = (size_t)c->n_kv * c->n, nd = (size_t)c->n_kv * c->d;
    if (c->from_q) {
        close_enough("importance", ref.importance, got.importance, nt);
        close_enough("obar", ref.obar, got.obar, nd);
        assert_memory_equal(ref.qsq, got.qsq, nd * 4);
        for (uint32_t g = 0; g < c->n_kv; g++)
            assert_true(got.is_static[g] <= 1);
    } else {
        assert_memory_equal(ref.importance, got.importance, nt * 4);
        assert_memory_equal(ref.obar, got.obar, nd * 4);
        assert_memory_equal(ref.qsq, got.qsq, nd * 4);
        assert_memory_equal(ref.is_static, got.is_static, c->n_kv);
    }
    kvc_scores_cleanup(&ref);
    kvc_scores_cleanup(&got);
    kvc_scores_cleanup_cuda(&dsc);
    CK(cudaFree(dk0));
    CK(cudaFree(dv));
    CK(cudaFree(dq));
    CK(cudaFree(dwa));
    free(wa);
    kvt_layer_free(&L);
}

static void test_parity(void **state)
{
    (void)state;
    static const scase_t cases[] = {
        {8, 2, 301, 64, 32, KVC_REDUCE_MEAN, 7, 0, 0},
        {8, 2, 301, 64, 32, KVC_REDUCE_MAX, 1, 0.6f, 0},
        {9, 3, 517, 64, 32, KVC_REDUCE_MEAN, 7, 0.3f, 0},
        {4, 4, 33, 128, 16, KVC_REDUCE_MEAN, 5, 0.5f, 0},
        {8, 2, 301, 64, 32, KVC_REDUCE_MEAN, 7, 0, 1},
        {8, 2, 1001, 128, 32, KVC_REDUCE_MAX, 7, 0.6f, 1},
        {3, 1, 77, 64, 77, KVC_REDUCE_MEAN, 1, 0, 1},
        {32, 8, 999, 128, 32, KVC_REDUCE_MEAN, 7, 0, 1},
        {8, 2, 301, 64, 77, KVC_REDUCE_MAX, 9, 0, 1},     // window_div keeps the last 37 rows
        {4, 2, 2111, 128, 128, KVC_REDUCE_MEAN, 9, 0, 1}, // the default window, 33 tiles + 63
        {6, 2, 150, 40, 20, KVC_REDUCE_MAX, 3, 0, 1},     // head_dim padded to 64 in the MMA
        {4, 2, 100, 256, 16, KVC_REDUCE_MEAN, 5, 0, 1},   // too wide for the MMA: simt
    };
    // The tensor-core kernels with blocks of 64 tokens (the default) and of 128
    // (FERRY_SCORE_TT=128), then the SIMT ones.
    static const char *const impls[] = {"mma", "mma", "simt"};
    for (int k = 0; k < 3; k++) {
        assert_int_equal(setenv("FERRY_SCORE_IMPL", impls[k], 1), 0);
        assert_int_equal(setenv("FERRY_SCORE_TT", k == 1 ? "128" : "64", 1), 0);
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
            if (k > 0 && !cases[i].from_q)
                continue; // from window_attn the implementations share every kernel
            for (int imp = KVC_IMP_MEAN; imp <= KVC_IMP_MAX; imp++)
                run_case(&cases[i], 300 + i, (kvc_importance_t)imp);
        }
    }
    assert_int_equal(unsetenv("FERRY_SCORE_IMPL"), 0);
    assert_int_equal(unsetenv("FERRY_SCORE_TT"), 0);
}

/* kvc_score_cuda_host: host in, host out, the same scores as kvc_score_cuda on device copies. */
static void test_host_entry(void **state)
{
    (void)state;
    const uint32_t H = 8, KV = 2, N = 700, D = 64, W = 64;
    kvc_policy_t pol;
    kvc_policy_default(&pol);
    kvt_layer_t L;
    kvt_layer_make(&L, 77, H, KV, N, D, W);
    kvc_layer_input_t in = kvt_input(&L, 0);
    kvc_scores_t ref, got;
    assert_int_equal(kvc_scores_init(&ref, KV, N, D), FY_OK);
    assert_int_equal(kvc_scores_init(&got, KV, N, D), FY_OK);
    assert_int_equal(kvc_score(&pol, H, KV, N, D, &in, &ref), FY_OK);
    assert_int_equal(kvc_score_cuda_host(&pol, H, KV, N, D, &in, &got), FY_OK);
    close_enough("importance", ref.importance, got.importance, (size_t)KV * N);
    close_enough("obar", ref.obar, got.obar, (size_t)KV * D);
    assert_memory_equal(ref.qsq, got.qsq, (size_t)KV * D * 4);
    // Twice: the same bytes (the scorer is deterministic, as references rely on).
    kvc_scores_t again;
    assert_int_equal(kvc_scores_init(&again, KV, N, D), FY_OK);
    assert_int_equal(kvc_score_cuda_host(&pol, H, KV, N, D, &in, &again), FY_OK);
    assert_memory_equal(got.importance, again.importance, (size_t)KV * N * 4);
    assert_memory_equal(got.obar, again.obar, (size_t)KV * D * 4);
    // A shape the scores were not made for.
    assert_int_equal(kvc_score_cuda_host(&pol, H, KV, N + 1, D, &in, &again), FY_ERR_INVALID_ARG);
    kvc_scores_cleanup(&ref);
    kvc_scores_cleanup(&got);
    kvc_scores_cleanup(&again);
    kvt_layer_free(&L);
}

static void test_bad_args(void **state)
{
    (void)state;
    kvc_policy_t pol;
    kvc_policy_default(&pol);
    kvc_scores_t dsc;
    assert_int_equal(kvc_scores_init_cuda(&dsc, 2, 10, 64), FY_OK);
    kvc_layer_input_t in;
    memset(&in, 0, sizeof(in));
    in.k = in.v = (const uint16_t *)dsc.importance; // never read: the checks fail first
    in.token_stride = 64;
    in.head_stride = 640;
    // Shape does not match the scores; heads not a multiple of kv heads; window > tokens.
    assert_int_equal(kvc_score_cuda(&pol, 4, 2, 11, 64, &in, &dsc, NULL), FY_ERR_INVALID_ARG);
    assert_int_equal(kvc_score_cuda(&pol, 3, 2, 10, 64, &in, &dsc, NULL), FY_ERR_INVALID_ARG);
    in.q_window = (const float *)dsc.obar;
    in.n_window = 11;
    assert_int_equal(kvc_score_cuda(&pol, 4, 2, 10, 64, &in, &dsc, NULL), FY_ERR_INVALID_ARG);
    kvc_scores_cleanup_cuda(&dsc);
    kvc_scores_cleanup_cuda(&dsc); // twice is fine
}
#endif

int main(void)
{
#if !FY_HAVE_CUDA
    printf("SKIP: built without CUDA\n");
    return 77;
#else
    if (fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity),
        cmocka_unit_test(test_host_entry),
        cmocka_unit_test(test_bad_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
#endif
}
