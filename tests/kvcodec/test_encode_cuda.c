// GPU encoder parity: kvc_encoder_encode_layer_cuda writes the same frame bytes as
// kvc_encoder_encode_layer for the same K, V and scores — every built-in policy and the ferry
// variants (modelled distortion, HybridKV, MixKVQ protected channels, rotation on and off),
// budgets from 1 to 1/16, odd token counts, one to 72 kv heads (past 64 the optimizer runs on
// the host), head_dim 32..256 (at 256 the groups do not fit shared memory: the rotated copy and
// unstaged passes), strided K/V, several layers through the rate controller. The output buffer is
// poisoned first. Also the encoder scoring by itself from window_attn on the GPU (bit-exact path)
// against the CPU encoder scoring from the same window_attn. Some cases again with the
// register-resident quantizer and with the frame CRC's smaller form. Exits 77 without a GPU.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>

#include "kvcodec_cuda.h"
#include "kvtest.h"
#include "zero_ties.h"

#if FY_HAVE_CUDA
#include <cuda_runtime.h>

#define CK(call) assert_int_equal((int)(call), (int)cudaSuccess)

typedef struct {
    const char *policy;
    double budget; // < 0: the policy's
    int rotate;    // -1: the policy's
    uint32_t protect;
    int variant; // 0 none, 1 modelled distortion, 2 HybridKV, 3 no backbone, 4 calibrated
                 // per-layer byte shares and distortion weights, 5 signed zeros (zero_ties)
    uint32_t n_heads, n_kv, n, d, n_layers;
    uint32_t pad; // extra elements per token row and per head (strided input)
    int from_attn; // 1: no scores passed; both encoders score from window_attn
} ecase_t;

/* K, V laid out with strides on the host and the device. */
typedef struct {
    size_t hs, ts, elems;
    uint16_t *k, *v;   // host, strided
    uint16_t *dk, *dv; // device
} strided_t;

static void strided_make(strided_t *S, const kvt_layer_t *L, uint32_t pad)
{
    S->ts = L->d + pad;
    S->hs = (size_t)L->n * S->ts + pad;
    S->elems = S->hs * L->n_kv;
    S->k = malloc(S->elems * 2);
    S->v = malloc(S->elems * 2);
    for (size_t i = 0; i < S->elems; i++)
        S->k[i] = S->v[i] = 0x7e00; // NaN in the gaps: never read
    for (uint32_t h = 0; h < L->n_kv; h++)
        for (uint32_t t = 0; t < L->n; t++) {
            size_t src = ((size_t)h * L->n + t) * L->d, dst = h * S->hs + t * S->ts;
            memcpy(S->k + dst, L->k + src, L->d * 2);
            memcpy(S->v + dst, L->v + src, L->d * 2);
        }
    CK(cudaMalloc((void **)&S->dk, S->elems * 2));
    CK(cudaMalloc((void **)&S->dv, S->elems * 2));
    CK(cudaMemcpy(S->dk, S->k, S->elems * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(S->dv, S->v, S->elems * 2, cudaMemcpyHostToDevice));
}

static void strided_free(strided_t *S)
{
    free(S->k), free(S->v);
    CK(cudaFree(S->dk));
    CK(cudaFree(S->dv));
}

/* Deterministic window attention rows with a few values the scorer must sanitize. */
static void make_window_attn(float *wa, uint32_t n_heads, uint32_t n, uint64_t seed)
{
    uint64_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < (size_t)n_heads * n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        float u = (float)(s >> 40) / (float)(1u << 24);
        wa[i] = u * u * 4.0f / (float)n;
        if (i % 97 == 5)
            wa[i] = -0.5f;
        if (i % 101 == 7)
            wa[i] = 3.0f;
    }
}

static void describe_diff(const uint8_t *a, const uint8_t *b, size_t len)
{
    size_t i = 0;
    while (i < len && a[i] == b[i])
        i++;
    kvc_frame_t f;
    size_t payload = 0;
    if (kvc_frame_parse(a, len, &f) == FY_OK)
        payload = (size_t)(f.payload - a);
    fprintf(stderr, "first difference at byte %zu of %zu (payload starts at %zu): cpu", i, len,
            payload);
    for (size_t j = i; j < len && j < i + 16; j++)
        fprintf(stderr, " %02x", a[j]);
    fprintf(stderr, " gpu");
    for (size_t j = i; j < len && j < i + 16; j++)
        fprintf(stderr, " %02x", b[j]);
    fprintf(stderr, "\n");
}

/* A queued layer's GPU frame (fg, lg bytes, poisoned with 0xa5 past it) and info against the
 * CPU's. */
static void expect_layer(const char *what, const uint8_t *fc, size_t lc, const kvc_layer_info_t *ic,
                         const uint8_t *fg, size_t lg, const kvc_layer_info_t *ig)
{
    if (lg != lc || memcmp(fc, fg, lc) != 0) {
        fprintf(stderr, "%s: cpu %zu bytes, gpu %zu\n", what, lc, lg);
        describe_diff(fc, fg, FY_MIN(lc, lg));
        fail();
    }
    assert_int_equal(fg[lg], 0xa5);
    assert_true(ic->lambda == ig->lambda);
    assert_true(ic->budget_met == ig->budget_met);
    assert_int_equal(ic->frame_bytes, ig->frame_bytes);
}

/* Both encoders' request totals agree. */
static void expect_totals(const kvc_encoder_t *cpu, const kvc_encoder_cuda_t *gpu)
{
    uint64_t bc, bg, budc, budg;
    kvc_encoder_totals(cpu, &bc, &budc);
    kvc_encoder_cuda_totals(gpu, &bg, &budg);
    assert_int_equal(bc, bg);
    assert_int_equal(budc, budg);
}

/* kvt_zero_tie over a layer (parity variant 5). */
static void zero_ties(kvt_layer_t *L)
{
    for (size_t h = 0; h < L->n_kv; h++)
        for (uint32_t t = 0; t < L->n; t++)
            for (uint32_t c = 0; c < L->d; c++) {
                size_t i = (h * L->n + t) * L->d + c;
                L->k[i] = kvt_zero_tie(t, c, 0, L->k[i]);
                L->v[i] = kvt_zero_tie(t, c, 1, L->v[i]);
            }
}

static void run_case(const ecase_t *c, uint64_t seed)
{
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin(c->policy, &pol), FY_OK);
    if (c->rotate >= 0)
        pol.rotate = c->rotate != 0;
    pol.protect_channels = c->protect;
    if (c->variant == 1)
        pol.dist = KVC_DIST_MODEL;
    else if (c->variant == 2)
        pol.hybrid_threshold = 0.6f;
    else if (c->variant == 3)
        pol.backbone_frac = 0;
    else if (c->variant == 4) {
        pol.n_layer_weights = c->n_layers;
        for (uint32_t l = 0; l < c->n_layers; l++)
            pol.layer_weight[l] = l == 0 ? 3.0f : 0.5f + 0.25f * (float)l;
        pol.layer_alloc = 0.5f;
        pol.layer_gamma = 0.3f;
    }
    kvt_layer_t L;
    kvt_layer_make(&L, seed, c->n_heads, c->n_kv, c->n, c->d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, c->n_layers, c->budget);
    kvc_encoder_t *cpu;
    kvc_encoder_cuda_t *gpu;
    assert_int_equal(kvc_encoder_create(&p, &cpu), FY_OK);
    assert_int_equal(kvc_encoder_cuda_create(&p, &gpu), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(cpu);
    assert_int_equal(kvc_encoder_cuda_max_frame_bytes(gpu), cap);
    uint8_t *fc = malloc(cap), *fg = malloc(cap), *dout;
    CK(cudaMalloc((void **)&dout, cap));
    kvc_scores_t sc, dsc;
    assert_int_equal(kvc_scores_init(&sc, c->n_kv, c->n, c->d), FY_OK);
    assert_int_equal(kvc_scores_init_cuda(&dsc, c->n_kv, c->n, c->d), FY_OK);
    float *wa = malloc((size_t)c->n_heads * c->n * sizeof(float)), *dwa;
    CK(cudaMalloc((void **)&dwa, (size_t)c->n_heads * c->n * sizeof(float)));
    cudaStream_t stream;
    CK(cudaStreamCreate(&stream));
    for (uint32_t l = 0; l < c->n_layers; l++) {
        if (l > 0)
            kvc_synth_layer(seed + l, c->n_heads, c->n_kv, c->n, c->d, L.W, L.k, L.v, L.q);
        if (c->variant == 5)
            zero_ties(&L);
        strided_t S;
        strided_make(&S, &L, c->pad);
        kvc_layer_input_t in = kvt_input(&L, l);
        in.k = S.k;
        in.v = S.v;
        in.head_stride = S.hs;
        in.token_stride = S.ts;
        kvc_layer_input_t din = in;
        din.k = S.dk;
        din.v = S.dv;
        din.q_window = NULL;
        din.n_window = 0;
        const kvc_scores_t *csc = &sc, *gsc = &dsc;
        if (c->from_attn) {
            make_window_attn(wa, c->n_heads, c->n, seed + 17 * l);
            CK(cudaMemcpy(dwa, wa, (size_t)c->n_heads * c->n * sizeof(float),
                          cudaMemcpyHostToDevice));
            in.q_window = NULL;
            in.n_window = 0;
            in.window_attn = wa;
            din.window_attn = dwa;
            csc = gsc = NULL;
        } else {
            // Both encoders get the CPU's scores.
            assert_int_equal(kvc_score(&pol, c->n_heads, c->n_kv, c->n, c->d, &in, &sc), FY_OK);
            size_t nt = (size_t)c->n_kv * c->n, nd = (size_t)c->n_kv * c->d;
            CK(cudaMemcpy(dsc.importance, sc.importance, nt * 4, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dsc.obar, sc.obar, nd * 4, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dsc.qsq, sc.qsq, nd * 4, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dsc.is_static, sc.is_static, c->n_kv, cudaMemcpyHostToDevice));
        }
        size_t lc = 0, lg = 0;
        kvc_layer_info_t ic, ig;
        assert_int_equal(kvc_encoder_encode_layer(cpu, &in, csc, fc, cap, &lc, &ic), FY_OK);
        CK(cudaMemset(dout, 0xa5, cap));
        assert_int_equal(
            kvc_encoder_encode_layer_cuda(gpu, &din, gsc, dout, cap, &lg, &ig, stream), FY_OK);
        CK(cudaMemcpy(fg, dout, cap, cudaMemcpyDeviceToHost));
        if (lc != lg || memcmp(fc, fg, lc) != 0) {
            fprintf(stderr, "%s b %.4f rot %d P %u var %d shape %u/%u n %u d %u layer %u: "
                            "cpu %zu bytes, gpu %zu bytes\n",
                    c->policy, c->budget, c->rotate, c->protect, c->variant, c->n_heads, c->n_kv,
                    c->n, c->d, l, lc, lg);
            describe_diff(fc, fg, FY_MIN(lc, lg));
            fail();
        }
        // Nothing written past the frame.
        for (size_t i = lg; i < cap && i < lg + 256; i++)
            assert_int_equal(fg[i], 0xa5);
        assert_int_equal(ic.frame_bytes, ig.frame_bytes);
        assert_true(ic.lambda == ig.lambda);
        assert_true(ic.budget_met == ig.budget_met);
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            assert_int_equal(ic.tokens[o], ig.tokens[o]);
        kvc_frame_t f;
        assert_int_equal(kvc_frame_parse(fg, lg, &f), FY_OK);
        strided_free(&S);
    }
    expect_totals(cpu, gpu);
    // Layers come in order on the GPU encoder too.
    kvc_layer_input_t bad = {0};
    bad.layer = 0;
    bad.k = (const uint16_t *)dout;
    bad.v = (const uint16_t *)dout;
    bad.token_stride = c->d;
    size_t lbad;
    assert_int_equal(kvc_encoder_encode_layer_cuda(gpu, &bad, &dsc, dout, cap, &lbad, NULL, stream),
                     FY_ERR_STATE);
    CK(cudaStreamDestroy(stream));
    CK(cudaFree(dwa));
    CK(cudaFree(dout));
    free(wa), free(fc), free(fg);
    kvc_scores_cleanup(&sc);
    kvc_scores_cleanup_cuda(&dsc);
    kvc_encoder_destroy(cpu);
    kvc_encoder_cuda_destroy(gpu);
    kvt_layer_free(&L);
}

static const ecase_t parity_cases[] = {
    // policy, b, rot, P, variant, heads, kv, n, d, layers, pad, from_attn
    {"ferry", 0.25, -1, 0, 0, 8, 2, 301, 64, 3, 0, 0},
    {"ferry", 0.25, 0, 0, 0, 8, 2, 301, 64, 2, 8, 0},
    {"ferry", 0.125, 1, 4, 0, 9, 3, 517, 64, 2, 0, 0},
    {"ferry", 0.0625, 0, 7, 0, 4, 1, 1001, 128, 2, 16, 0},
    {"ferry", 0.5, 1, 0, 1, 4, 2, 255, 128, 3, 0, 0},
    {"ferry", 0.25, 0, 0, 1, 4, 2, 255, 64, 2, 0, 0},
    // Modelled errors with protected channels, padded rows and unstaged groups.
    {"ferry", 0.125, 1, 4, 1, 9, 3, 517, 64, 2, 0, 0},
    {"ferry", 0.25, 0, 0, 1, 8, 2, 301, 64, 2, 8, 0},
    {"ferry", 0.25, 1, 3, 1, 4, 2, 131, 256, 2, 0, 0},
    {"ferry", 0.25, 1, 3, 2, 8, 4, 400, 64, 2, 0, 0},
    {"ferry", 0.125, 1, 0, 3, 2, 1, 37, 32, 2, 0, 0},
    {"ferry", 0.125, 0, 0, 4, 8, 2, 301, 64, 3, 0, 0},
    {"ferry", 0.25, 1, 2, 4, 4, 2, 255, 128, 4, 0, 0},
    {"ferry", 1.0, 1, 0, 0, 2, 2, 129, 64, 1, 0, 0},
    {"ferry", 0.25, 1, 2, 0, 6, 2, 2049, 64, 2, 0, 0},
    {"fp16", -1, 0, 0, 0, 4, 2, 133, 64, 2, 8, 0},
    {"int8", -1, 0, 0, 0, 4, 2, 299, 64, 2, 0, 0},
    {"int4", -1, 1, 0, 0, 6, 3, 77, 128, 2, 0, 0},
    {"int4", -1, 0, 3, 0, 6, 3, 77, 128, 2, 0, 0},
    {"kivi2", -1, 0, 0, 0, 4, 2, 333, 64, 2, 0, 0},
    {"kivi2", -1, 1, 5, 0, 4, 2, 333, 64, 2, 0, 0},
    {"snapkv", 0.25, 0, 0, 0, 4, 2, 257, 64, 2, 0, 0},
    {"h2o", 0.25, 0, 0, 0, 4, 2, 257, 64, 2, 0, 0},
    {"spectrum3", 0.25, 0, 0, 0, 8, 4, 95, 64, 3, 0, 0},
    {"pdtrim", 0.25, 0, 0, 0, 4, 4, 255, 96, 2, 0, 0},
    // Groups too big for shared memory: the rotated copy and unstaged passes.
    {"ferry", 0.25, 1, 3, 0, 4, 2, 131, 256, 2, 0, 0},
    // More kv heads than the device optimizer's histogram: the host optimizer.
    {"ferry", 0.25, 1, 0, 0, 72, 72, 67, 32, 2, 0, 0},
    // Several layout segments per head.
    {"ferry", 0.25, 1, 0, 0, 4, 2, 4500, 64, 2, 0, 0},
    // The greedy fill's one-launch kernel at its largest layer (4096 tokens over all kv
    // heads), and the multi-launch one just past it.
    {"ferry", 0.0625, 1, 0, 0, 4, 2, 2048, 64, 2, 0, 0},
    {"ferry", 0.0625, 1, 0, 0, 4, 1, 4097, 64, 2, 0, 0},
    // A long layer: the fill's walk takes runs of hundreds of candidates, 32 a step.
    {"ferry", 0.25, 1, 0, 0, 8, 4, 16384, 64, 1, 0, 0},
    // The encoder scoring by itself on the GPU from window_attn.
    {"ferry", 0.25, 1, 0, 0, 8, 2, 301, 64, 2, 0, 1},
    {"ferry", 0.125, 0, 2, 2, 6, 3, 211, 64, 2, 8, 1},
    {"h2o", 0.25, 0, 0, 0, 4, 2, 257, 64, 1, 0, 1},
    // Zeros of both signs at the ends of key and value ranges (unrotated: INT8 and the
    // unrotated 4- and 2-bit options).
    {"ferry", 0.25, 0, 0, 5, 4, 2, 203, 64, 2, 0, 0},
    {"int8", -1, 0, 0, 5, 4, 2, 99, 128, 1, 0, 0},
    {"kivi2", -1, 0, 0, 5, 4, 2, 99, 32, 1, 0, 0},
    // Rows 8-byte aligned only (4 halves of padding): loads a half at a time.
    {"ferry", 0.25, 1, 0, 0, 8, 2, 301, 64, 2, 4, 0},
    {"int8", -1, 0, 0, 0, 4, 2, 75, 32, 1, 4, 0},
};

static void test_parity(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(parity_cases) / sizeof(parity_cases[0]); i++)
        run_case(&parity_cases[i], 500 + i);
}

/* The cases that the register-resident quantizer takes (FERRY_QUANT_IMPL=warp: head_dim 32, 64
 * or 128, no protected channels), with it. */
static void test_parity_quant_warp(void **state)
{
    (void)state;
    setenv("FERRY_QUANT_IMPL", "warp", 1);
    for (size_t i = 0; i < sizeof(parity_cases) / sizeof(parity_cases[0]); i++) {
        const ecase_t *c = &parity_cases[i];
        if (c->protect == 0 && (c->d == 32 || c->d == 64 || c->d == 128))
            run_case(c, 700 + i);
    }
    unsetenv("FERRY_QUANT_IMPL");
}

/* A few cases with the frame CRC's smaller form (FERRY_CRC_COPIES=8: 8 copies of its tables in
 * 256-thread blocks, what devices with less shared memory a block take). */
static void test_parity_crc8(void **state)
{
    (void)state;
    setenv("FERRY_CRC_COPIES", "8", 1);
    for (size_t i = 0; i < sizeof(parity_cases) / sizeof(parity_cases[0]); i += 4)
        run_case(&parity_cases[i], 900 + i);
    unsetenv("FERRY_CRC_COPIES");
}

/* Layers queued ahead (kvc_encoder_enqueue_layer_cuda*): the rate controller carries each
 * layer's size to the next on the device, so the frames equal the CPU's with two layers in
 * flight; a full queue, an empty one and the one-layer calls while layers are queued say
 * FY_ERR_STATE. With 72 kv heads (the host optimizer) every enqueue finishes its layer. */
static void run_queue(const char *policy, double budget, uint32_t n_heads, uint32_t n_kv,
                      uint32_t n, uint32_t d, uint64_t seed)
{
    enum { NL = 5 };
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin(policy, &pol), FY_OK);
    kvt_layer_t L;
    kvt_layer_make(&L, seed, n_heads, n_kv, n, d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, NL, budget);
    kvc_encoder_t *cpu;
    kvc_encoder_cuda_t *gpu;
    assert_int_equal(kvc_encoder_create(&p, &cpu), FY_OK);
    assert_int_equal(kvc_encoder_cuda_create(&p, &gpu), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(cpu), elems = (size_t)n_kv * n * d;
    size_t nt = (size_t)n_kv * n, nd = (size_t)n_kv * d;
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    // Every layer's input, scores and (device) frame stay put while it is queued.
    uint8_t *fc[NL], *dout[NL];
    size_t lc[NL];
    kvc_layer_info_t ic[NL];
    uint16_t *dk[NL], *dv[NL];
    kvc_scores_t sc, dsc[NL];
    kvc_layer_input_t din[NL];
    assert_int_equal(kvc_scores_init(&sc, n_kv, n, d), FY_OK);
    for (uint32_t l = 0; l < NL; l++) {
        if (l > 0)
            kvc_synth_layer(seed + l, n_heads, n_kv, n, d, L.W, L.k, L.v, L.q);
        kvc_layer_input_t in = kvt_input(&L, l);
        assert_int_equal(kvc_score(&pol, n_heads, n_kv, n, d, &in, &sc), FY_OK);
        fc[l] = malloc(cap);
        assert_int_equal(kvc_encoder_encode_layer(cpu, &in, &sc, fc[l], cap, &lc[l], &ic[l]),
                         FY_OK);
        CK(cudaMalloc((void **)&dk[l], elems * 2));
        CK(cudaMalloc((void **)&dv[l], elems * 2));
        CK(cudaMalloc((void **)&dout[l], cap));
        CK(cudaMemcpy(dk[l], L.k, elems * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dv[l], L.v, elems * 2, cudaMemcpyHostToDevice));
        CK(cudaMemset(dout[l], 0xa5, cap));
        assert_int_equal(kvc_scores_init_cuda(&dsc[l], n_kv, n, d), FY_OK);
        CK(cudaMemcpy(dsc[l].importance, sc.importance, nt * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dsc[l].obar, sc.obar, nd * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dsc[l].qsq, sc.qsq, nd * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dsc[l].is_static, sc.is_static, n_kv, cudaMemcpyHostToDevice));
        din[l] = in;
        din[l].k = dk[l];
        din[l].v = dv[l];
        din[l].q_window = NULL;
        din[l].n_window = 0;
    }
    uint8_t *fg = malloc(cap);
    size_t lg = 0;
    kvc_layer_info_t ig;
    assert_int_equal(kvc_encoder_finish_layer_cuda(gpu, &lg, &ig), FY_ERR_STATE);
#define ENQ(l) kvc_encoder_enqueue_layer_cuda(gpu, &din[l], &dsc[l], dout[l], cap, stream)
    // Layers 0 and 1 queued; a third does not fit, nor does a one-layer call.
    assert_int_equal(ENQ(0), FY_OK);
    assert_int_equal(ENQ(1), FY_OK);
    assert_int_equal(ENQ(2), FY_ERR_STATE);
    assert_int_equal(
        kvc_encoder_encode_layer_cuda(gpu, &din[2], &dsc[2], dout[2], cap, &lg, &ig, stream),
        FY_ERR_STATE);
    for (uint32_t l = 0; l < NL - 1; l++) {
        assert_int_equal(kvc_encoder_finish_layer_cuda(gpu, &lg, &ig), FY_OK);
        if (l == 0)
            assert_int_equal(ENQ(3), FY_ERR_STATE); // out of order: 2 comes first
        if (l + 2 < NL - 1)
            assert_int_equal(ENQ(l + 2), FY_OK);
        else if (l + 2 == NL - 1) // the last layer through the _host calls
            assert_int_equal(
                kvc_encoder_enqueue_layer_cuda_host(gpu, &din[l + 2], &dsc[l + 2], stream), FY_OK);
        CK(cudaMemcpy(fg, dout[l], cap, cudaMemcpyDeviceToHost));
        char what[96];
        snprintf(what, sizeof(what), "queued %s %u/%u n %u d %u layer %u", policy, n_heads, n_kv, n,
                 d, l);
        expect_layer(what, fc[l], lc[l], &ic[l], fg, lg, &ig);
    }
#undef ENQ
    // The last layer's frame into host memory; too small a buffer leaves it queued.
    memset(fg, 0, cap);
    assert_int_equal(kvc_encoder_finish_layer_cuda_host(gpu, fg, lc[NL - 1] - 1, &lg, &ig),
                     FY_ERR_INVALID_ARG);
    assert_int_equal(kvc_encoder_finish_layer_cuda_host(gpu, fg, cap, &lg, &ig), FY_OK);
    assert_int_equal(lg, lc[NL - 1]);
    assert_memory_equal(fc[NL - 1], fg, lg);
    assert_true(ic[NL - 1].lambda == ig.lambda);
    assert_int_equal(kvc_encoder_finish_layer_cuda(gpu, &lg, &ig), FY_ERR_STATE);
    expect_totals(cpu, gpu);
    for (uint32_t l = 0; l < NL; l++) {
        free(fc[l]);
        CK(cudaFree(dk[l]));
        CK(cudaFree(dv[l]));
        CK(cudaFree(dout[l]));
        kvc_scores_cleanup_cuda(&dsc[l]);
    }
    free(fg);
    kvc_scores_cleanup(&sc);
    CK(cudaStreamDestroy(stream));
    kvc_encoder_destroy(cpu);
    kvc_encoder_cuda_destroy(gpu);
    kvt_layer_free(&L);
}

static void test_queue(void **state)
{
    (void)state;
    run_queue("ferry", 0.25, 8, 2, 301, 64, 900);
    run_queue("ferry", 0.125, 4, 4, 517, 128, 901);
    run_queue("ferry", 0.25, 72, 72, 67, 32, 902); // the host optimizer
}

/* The prefill worker's pattern: the frames into (pageable) host memory through the _host calls,
 * the encoder scoring each layer itself from window_attn, two layers always in flight, and the
 * layers queued on alternating streams (each waits for the one before). Calibrated: layer
 * weights and a first multiplier near layer 0's own, so the device rate controller starts from
 * the table; budget 0: no budget. A layer past the last is refused while one is queued. */
static void run_queue_host(double budget, int calibrated, uint32_t n_heads, uint32_t n_kv,
                           uint32_t n, uint32_t d, uint64_t seed)
{
    enum { NL = 4 };
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
    kvt_layer_t L;
    kvt_layer_make(&L, seed, n_heads, n_kv, n, d, 32);
    size_t elems = (size_t)n_kv * n * d, wn = (size_t)n_heads * n;
    float *wa[NL];
    for (uint32_t l = 0; l < NL; l++) {
        wa[l] = malloc(wn * sizeof(float));
        make_window_attn(wa[l], n_heads, n, seed + 31 * l);
    }
    if (calibrated) {
        // Layer 0's own multiplier from an uncalibrated encoder, the table's entries 1.2x it.
        kvc_encoder_params_t p0 = kvt_params(&pol, &L, NL, budget);
        kvc_encoder_t *e0;
        assert_int_equal(kvc_encoder_create(&p0, &e0), FY_OK);
        size_t cap0 = kvc_encoder_max_frame_bytes(e0), l0 = 0;
        uint8_t *f0 = malloc(cap0);
        kvc_layer_info_t i0;
        kvc_layer_input_t in0 = kvt_input(&L, 0);
        in0.q_window = NULL;
        in0.n_window = 0;
        in0.window_attn = wa[0];
        assert_int_equal(kvc_encoder_encode_layer(e0, &in0, NULL, f0, cap0, &l0, &i0), FY_OK);
        assert_true(i0.lambda > 0);
        free(f0);
        kvc_encoder_destroy(e0);
        pol.n_layer_weights = NL;
        for (uint32_t l = 0; l < NL; l++)
            pol.layer_weight[l] = 0.6f + 0.3f * (float)l;
        pol.layer_alloc = 0.4f;
        pol.layer_gamma = 0.2f;
        pol.n_lambdas = 2;
        pol.lambda_budget[0] = 0.1;
        pol.lambda_budget[1] = 0.5;
        pol.lambda_first[0] = pol.lambda_first[1] = 1.2 * i0.lambda;
    }
    kvc_encoder_params_t p = kvt_params(&pol, &L, NL, budget);
    kvc_encoder_t *cpu;
    kvc_encoder_cuda_t *gpu;
    assert_int_equal(kvc_encoder_create(&p, &cpu), FY_OK);
    assert_int_equal(kvc_encoder_cuda_create(&p, &gpu), FY_OK);
    assert_int_equal(kvc_encoder_cuda_reserve_host(gpu), FY_OK);
    size_t cap = kvc_encoder_max_frame_bytes(cpu);
    uint8_t *fc[NL];
    size_t lc[NL];
    kvc_layer_info_t ic[NL];
    uint16_t *dk[NL], *dv[NL];
    float *dwa[NL];
    kvc_layer_input_t din[NL];
    for (uint32_t l = 0; l < NL; l++) {
        if (l > 0)
            kvc_synth_layer(seed + l, n_heads, n_kv, n, d, L.W, L.k, L.v, L.q);
        kvc_layer_input_t in = kvt_input(&L, l);
        in.q_window = NULL;
        in.n_window = 0;
        in.window_attn = wa[l];
        fc[l] = malloc(cap);
        assert_int_equal(kvc_encoder_encode_layer(cpu, &in, NULL, fc[l], cap, &lc[l], &ic[l]),
                         FY_OK);
        CK(cudaMalloc((void **)&dk[l], elems * 2));
        CK(cudaMalloc((void **)&dv[l], elems * 2));
        CK(cudaMalloc((void **)&dwa[l], wn * sizeof(float)));
        CK(cudaMemcpy(dk[l], L.k, elems * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dv[l], L.v, elems * 2, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dwa[l], wa[l], wn * sizeof(float), cudaMemcpyHostToDevice));
        din[l] = in;
        din[l].k = dk[l];
        din[l].v = dv[l];
        din[l].window_attn = dwa[l];
    }
    cudaStream_t streams[2];
    CK(cudaStreamCreateWithFlags(&streams[0], cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&streams[1], cudaStreamNonBlocking));
    uint8_t *fg = malloc(cap + 64);
    size_t lg = 0;
    kvc_layer_info_t ig;
#define ENQ(l) kvc_encoder_enqueue_layer_cuda_host(gpu, &din[l], NULL, streams[(l) % 2])
    assert_int_equal(ENQ(0), FY_OK);
    for (uint32_t l = 0; l < NL; l++) {
        if (l + 1 < NL)
            assert_int_equal(ENQ(l + 1), FY_OK);
        if (l + 1 == NL - 1) { // the last layer queued: one past it is refused
            kvc_layer_input_t past = din[NL - 1];
            past.layer = NL;
            assert_int_equal(kvc_encoder_enqueue_layer_cuda_host(gpu, &past, NULL, streams[0]),
                             FY_ERR_STATE);
        }
        memset(fg, 0xa5, cap + 64);
        assert_int_equal(kvc_encoder_finish_layer_cuda_host(gpu, fg, cap + 64, &lg, &ig), FY_OK);
        char what[96];
        snprintf(what, sizeof(what), "queued (host) b %.3f cal %d %u/%u n %u d %u layer %u", budget,
                 calibrated, n_heads, n_kv, n, d, l);
        expect_layer(what, fc[l], lc[l], &ic[l], fg, lg, &ig);
    }
#undef ENQ
    assert_int_equal(kvc_encoder_finish_layer_cuda_host(gpu, fg, cap, &lg, &ig), FY_ERR_STATE);
    expect_totals(cpu, gpu);
    for (uint32_t l = 0; l < NL; l++) {
        free(fc[l]), free(wa[l]);
        CK(cudaFree(dk[l]));
        CK(cudaFree(dv[l]));
        CK(cudaFree(dwa[l]));
    }
    free(fg);
    CK(cudaStreamDestroy(streams[0]));
    CK(cudaStreamDestroy(streams[1]));
    kvc_encoder_destroy(cpu);
    kvc_encoder_cuda_destroy(gpu);
    kvt_layer_free(&L);
}

static void test_queue_host(void **state)
{
    (void)state;
    run_queue_host(0.25, 0, 8, 2, 301, 64, 910);
    run_queue_host(0.125, 1, 9, 3, 517, 64, 911);
    run_queue_host(0, 0, 4, 2, 255, 128, 912);
}

/* An encoder destroyed with layers still queued waits for them. */
static void test_destroy_queued(void **state)
{
    (void)state;
    kvc_policy_t pol;
    assert_int_equal(kvc_policy_builtin("ferry", &pol), FY_OK);
    kvt_layer_t L;
    kvt_layer_make(&L, 77, 8, 2, 1024, 64, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, 4, 0.25);
    kvc_encoder_cuda_t *gpu;
    assert_int_equal(kvc_encoder_cuda_create(&p, &gpu), FY_OK);
    size_t elems = (size_t)L.n_kv * L.n * L.d;
    uint16_t *dk, *dv;
    CK(cudaMalloc((void **)&dk, elems * 2));
    CK(cudaMalloc((void **)&dv, elems * 2));
    CK(cudaMemcpy(dk, L.k, elems * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, L.v, elems * 2, cudaMemcpyHostToDevice));
    kvc_scores_t sc, dsc;
    assert_int_equal(kvc_scores_init(&sc, L.n_kv, L.n, L.d), FY_OK);
    assert_int_equal(kvc_scores_init_cuda(&dsc, L.n_kv, L.n, L.d), FY_OK);
    kvc_layer_input_t in = kvt_input(&L, 0);
    assert_int_equal(kvc_score(&pol, L.n_heads, L.n_kv, L.n, L.d, &in, &sc), FY_OK);
    size_t nt = (size_t)L.n_kv * L.n, nd = (size_t)L.n_kv * L.d;
    CK(cudaMemcpy(dsc.importance, sc.importance, nt * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dsc.obar, sc.obar, nd * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dsc.qsq, sc.qsq, nd * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dsc.is_static, sc.is_static, L.n_kv, cudaMemcpyHostToDevice));
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (uint32_t l = 0; l < 2; l++) {
        kvc_layer_input_t din = kvt_input(&L, l);
        din.k = dk;
        din.v = dv;
        din.q_window = NULL;
        din.n_window = 0;
        assert_int_equal(kvc_encoder_enqueue_layer_cuda_host(gpu, &din, &dsc, stream), FY_OK);
    }
    kvc_encoder_cuda_destroy(gpu);
    CK(cudaStreamSynchronize(stream));
    CK(cudaGetLastError());
    CK(cudaStreamDestroy(stream));
    CK(cudaFree(dk));
    CK(cudaFree(dv));
    kvc_scores_cleanup(&sc);
    kvc_scores_cleanup_cuda(&dsc);
    kvt_layer_free(&L);
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
        cmocka_unit_test(test_parity),      cmocka_unit_test(test_parity_quant_warp),
        cmocka_unit_test(test_parity_crc8), cmocka_unit_test(test_queue),
        cmocka_unit_test(test_queue_host),  cmocka_unit_test(test_destroy_queued),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
#endif
}
