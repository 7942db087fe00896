// CUDA parity for decode attention over compressed pages (kvcodec/attend.cu): pages are built on
// the CPU by the real encoder and kvc_place (plus FP16 tail appends and a conversion), the pool's
// bytes are copied to one device allocation, and kvc_attend_batch_cuda over a batch of
// sequences of different lengths must match kvc_attend on the same pages list by list:
// |gpu - cpu| <= 1e-3 * max|cpu row| + 1e-6 for every element (both are fp32; only the order of
// the sums differs), 4e-3 for the MMA kernel's quantized keys, which it dequantizes to FP16
// (each key rounded by up to 2^-11 relative moves a logit by up to about |q| |k| 2^-11). Every
// option, rotated and unrotated pages, MixKVQ protected channels, GQA 4:1, 3:1, 2:1 and 1:1,
// head_dim 64 and 128 (and 72, 256, 512 for the other lane layouts), odd token counts, empty lists
// (zeros), one split per list and many, and invalid page ids (skipped and counted); each with every
// kernel (SIMT, and MMA, MMA_QTAB and MMA_WIDE where the shape allows them; group sizes 24, 32, 40
// and 64 for MMA_WIDE's steps). Outputs are poisoned with NaN first. Exits 77 (skipped) without a
// CUDA build or a GPU.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvtest.h"

#if FY_HAVE_CUDA
#include <cuda_runtime.h>

#include "kvcodec_cuda.h"

#define CK(call) assert_int_equal((int)(call), (int)cudaSuccess)

enum { MAX_SEQS = 8 };

typedef struct {
    const char *policy;
    double budget;
    int rotate; // -1: the policy's own setting
    uint32_t n_tokens;
    uint32_t append; // FP16 tokens appended to every head after placing
    bool convert;    // convert the FP16 pages of head 0 to rotated 4/4 afterwards
} seq_spec_t;

typedef struct {
    uint32_t d, n_kv, grp, protect;
    size_t page_bytes;
    uint32_t n_pages;
    uint32_t n_seqs; // sequences; a spec with n_tokens 0 is a sequence with empty lists
    seq_spec_t seqs[MAX_SEQS];
    uint32_t group; // G of the pool and the policies
} config_t;

typedef struct {
    kvc_pool_t *pool;
    kvc_seq_t *seqs[MAX_SEQS];
    uint32_t n_seqs, n_kv, n_heads, d, protect, group;
    size_t page_bytes;
    uint32_t opt_pages[KVC_OPT_DROP]; // pages per option over all lists
    uint32_t rot_pages;
} built_t;

static uint64_t g_rng = 12345;

static float frand(void)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((g_rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

static void place_one(built_t *B, const config_t *C, uint32_t i)
{
    const seq_spec_t *S = &C->seqs[i];
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
                k[c] = fy_fp32_to_fp16(frand() * 3.0f);
                v[c] = fy_fp32_to_fp16(frand());
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

static void build(built_t *B, const config_t *C)
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

static void unbuild(built_t *B)
{
    for (uint32_t i = 0; i < B->n_seqs; i++)
        kvc_seq_destroy(B->seqs[i]);
    kvc_pool_destroy(B->pool);
}

/* Runs the GPU kernel over every list of B (plus `extra_bad` invalid page ids at the end of
 * each non-empty list) and compares with kvc_attend. max_list_pages_override 0: the true
 * maximum. */
/* Runs kernel `impl` (KVC_ATTEND_IMPL_SIMT, _MMA, _MMA_QTAB or _MMA_WIDE) over the built pages and
 * compares with the CPU. MMA (or a variant) asked of a shape it does not take runs SIMT;
 * kvc_attend_batch_cuda_impl must say so exactly for the shapes the header names. */
static void run_and_compare(const built_t *B, uint32_t extra_bad, uint32_t max_override,
                            uint32_t impl)
{
    const uint32_t d = B->d, n_items = B->n_seqs * B->n_kv, grp = B->n_heads / B->n_kv;
    const uint32_t n_total = kvc_pool_n_pages(B->pool);
    // Page lists, CSR.
    uint32_t *starts = malloc(((size_t)n_items + 1) * sizeof(uint32_t));
    size_t cap_ids = 16;
    for (uint32_t i = 0; i < B->n_seqs; i++)
        for (uint32_t h = 0; h < B->n_kv; h++) {
            uint32_t n;
            kvc_seq_pages(B->seqs[i], 0, h, &n);
            cap_ids += n + extra_bad;
        }
    uint32_t *ids_all = malloc(cap_ids * sizeof(uint32_t));
    uint32_t n_ids = 0, max_list = 0, expect_bad = 0;
    for (uint32_t i = 0; i < B->n_seqs; i++) {
        for (uint32_t h = 0; h < B->n_kv; h++) {
            uint32_t n;
            const kvc_page_id_t *ids = kvc_seq_pages(B->seqs[i], 0, h, &n);
            starts[i * B->n_kv + h] = n_ids;
            if (n > 0)
                memcpy(ids_all + n_ids, ids, (size_t)n * sizeof(uint32_t));
            n_ids += n;
            for (uint32_t e = 0; e < extra_bad && n > 0; e++, expect_bad++)
                ids_all[n_ids++] = n_total + e * 7; // out of range
            uint32_t len = n_ids - starts[i * B->n_kv + h];
            max_list = len > max_list ? len : max_list;
        }
    }
    starts[n_items] = n_ids;

    // Queries and the CPU reference.
    size_t nq = (size_t)B->n_seqs * B->n_heads * d;
    float *q = malloc(nq * sizeof(float)), *ref = malloc(nq * sizeof(float));
    float *got = malloc(nq * sizeof(float));
    for (size_t i = 0; i < nq; i++)
        q[i] = frand() * 2.0f;
    const float scale = 1.0f / sqrtf((float)d);
    for (uint32_t i = 0; i < B->n_seqs; i++) {
        for (uint32_t h = 0; h < B->n_kv; h++) {
            uint32_t n;
            const kvc_page_id_t *ids = kvc_seq_pages(B->seqs[i], 0, h, &n);
            size_t off = ((size_t)i * B->n_heads + (size_t)h * grp) * d;
            assert_int_equal(kvc_attend(B->pool, ids, n, q + off, grp, scale, ref + off), FY_OK);
        }
    }

    // Device copies: the pool's bytes exactly, one allocation.
    const uint8_t *host_base = kvc_page_data(B->pool, 0);
    size_t pool_bytes = B->page_bytes * n_total;
    uint8_t *d_pool;
    uint32_t *d_starts, *d_ids;
    float *d_q, *d_out;
    CK(cudaMalloc((void **)&d_pool, pool_bytes));
    CK(cudaMalloc((void **)&d_starts, ((size_t)n_items + 1) * sizeof(uint32_t)));
    CK(cudaMalloc((void **)&d_ids, (n_ids ? n_ids : 1) * sizeof(uint32_t)));
    CK(cudaMalloc((void **)&d_q, nq * sizeof(float)));
    CK(cudaMalloc((void **)&d_out, nq * sizeof(float)));
    CK(cudaMemcpy(d_pool, host_base, pool_bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_starts, starts, ((size_t)n_items + 1) * sizeof(uint32_t),
                  cudaMemcpyHostToDevice));
    if (n_ids)
        CK(cudaMemcpy(d_ids, ids_all, (size_t)n_ids * sizeof(uint32_t), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_q, q, nq * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemset(d_out, 0xff, nq * sizeof(float))); // NaN: catches unwritten elements

    kvc_gpu_pages_t gp = {
        .base = d_pool,
        .page_bytes = B->page_bytes,
        .n_pages = n_total,
        .head_dim = d,
        .group = B->group,
        .protect = B->protect,
    };
    kvc_attend_batch_t bt = {
        .batch = B->n_seqs,
        .n_heads = B->n_heads,
        .n_kv_heads = B->n_kv,
        .list_start = d_starts,
        .page_ids = d_ids,
        .max_list_pages = max_override ? max_override : max_list,
        .impl = impl,
    };
    uint32_t ran = 0;
    assert_int_equal(kvc_attend_batch_cuda_impl(&gp, &bt, &ran), FY_OK);
    const bool mma_shape = (d == 64 || d == 128) && grp <= 4;
    assert_int_equal(ran, impl != KVC_ATTEND_IMPL_SIMT && mma_shape ? impl : KVC_ATTEND_IMPL_SIMT);
    size_t ws_bytes = 0;
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws_bytes), FY_OK);
    void *d_ws;
    CK(cudaMalloc(&d_ws, ws_bytes));
    CK(cudaMemset(d_ws, 0xff, ws_bytes));
    assert_int_equal(kvc_attend_batch_cuda(&gp, &bt, d_q, scale, d_out, d_ws, ws_bytes, NULL),
                     FY_OK);
    uint32_t n_bad = 0;
    assert_int_equal(kvc_attend_batch_cuda_bad_pages(d_ws, NULL, &n_bad), FY_OK);
    assert_int_equal(n_bad, expect_bad);
    CK(cudaMemcpy(got, d_out, nq * sizeof(float), cudaMemcpyDeviceToHost));

    double worst = 0;
    for (size_t r = 0; r < nq / d; r++) {
        double mref = 0;
        for (uint32_t c = 0; c < d; c++)
            mref = fmax(mref, fabs(ref[r * d + c]));
        for (uint32_t c = 0; c < d; c++) {
            double err = fabs((double)got[r * d + c] - ref[r * d + c]);
            // MMA and MMA_WIDE round dequantized keys to FP16 (kvc_attend keeps them in FP32).
            const bool f16_keys = ran == KVC_ATTEND_IMPL_MMA || ran == KVC_ATTEND_IMPL_MMA_WIDE;
            double tol = (f16_keys ? 4e-3 : 1e-3) * mref + 1e-6;
            if (!(err <= tol)) {
                fprintf(stderr, "row %zu (seq %zu) ch %u: gpu %g cpu %g (tol %g)\n", r,
                        r / B->n_heads, c, got[r * d + c], ref[r * d + c], tol);
                fail();
            }
            if (mref > 0)
                worst = fmax(worst, err / mref);
        }
    }
    printf("  %s d %u, %u seqs x %u kv heads x %u rows, %u pages, max list %u: worst rel err "
           "%.2e\n",
           ran == KVC_ATTEND_IMPL_MMA        ? "mma "
           : ran == KVC_ATTEND_IMPL_MMA_QTAB ? "qtab"
           : ran == KVC_ATTEND_IMPL_MMA_WIDE ? "wide"
                                             : "simt",
           d, B->n_seqs, B->n_kv, grp, n_ids, max_list, worst);
    CK(cudaFree(d_ws));
    CK(cudaFree(d_pool));
    CK(cudaFree(d_starts));
    CK(cudaFree(d_ids));
    CK(cudaFree(d_q));
    CK(cudaFree(d_out));
    free(starts), free(ids_all), free(q), free(ref), free(got);
}

static const config_t k_configs[] = {
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

/* Every config, with the kernel's own split (several pages per block for long lists, up to one
 * block per page) and with every list in a single block; the tensor-core kernel also in its
 * FERRY_ATTEND_BLOCKS=4 build. */
static void test_parity(void **state)
{
    (void)state;
    uint32_t opts[KVC_OPT_DROP] = {0}, rot = 0;
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_configs); i++) {
        built_t B;
        build(&B, &k_configs[i]);
        for (int o = 0; o < KVC_OPT_DROP; o++)
            opts[o] += B.opt_pages[o];
        rot += B.rot_pages;
        for (uint32_t impl = KVC_ATTEND_IMPL_SIMT; impl <= KVC_ATTEND_IMPL_MMA_WIDE; impl++) {
            run_and_compare(&B, 0, 0, impl);
            run_and_compare(&B, 0, 1, impl);
        }
        // The tensor-core kernel built for 4 blocks per SM (fewer registers): the same results.
        setenv("FERRY_ATTEND_BLOCKS", "4", 1);
        run_and_compare(&B, 0, 0, KVC_ATTEND_IMPL_MMA);
        run_and_compare(&B, 0, 0, KVC_ATTEND_IMPL_MMA_QTAB);
        unsetenv("FERRY_ATTEND_BLOCKS");
        unbuild(&B);
    }
    for (int o = 0; o < KVC_OPT_DROP; o++) {
        printf("  option %s: %u pages\n", kvc_opt_name((kvc_opt_t)o), opts[o]);
        assert_true(opts[o] > 0);
    }
    printf("  rotated pages: %u\n", rot);
    assert_true(rot > 0);
}

/* Page ids past the pool are skipped and counted; the rest of the list is still attended. */
static void test_bad_ids(void **state)
{
    (void)state;
    built_t B;
    build(&B, &k_configs[0]);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_SIMT);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA_QTAB);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA_WIDE);
    unbuild(&B);
}

/* Shapes the kernel does not take are refused before anything is launched. */
static void test_refusals(void **state)
{
    (void)state;
    uint32_t starts[2] = {0, 0};
    kvc_gpu_pages_t gp = {(const uint8_t *)starts, 32768, 4, 128, 32, 0};
    kvc_attend_batch_t bt = {1, 32, 8, starts, starts, 1, KVC_ATTEND_IMPL_AUTO};
    size_t ws;
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws), FY_OK);
    bt.n_heads = 30; // not a multiple of the kv heads
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws), FY_ERR_INVALID_ARG);
    bt.n_heads = 8 * 9; // GQA groups above 8 rows
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws), FY_ERR_UNSUPPORTED);
    bt.n_heads = 32;
    gp.head_dim = 100; // not a multiple of 8
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws), FY_ERR_INVALID_ARG);
    gp.head_dim = 128;
    gp.page_bytes = 1024; // cannot hold one key group
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws), FY_ERR_INVALID_ARG);
    gp.page_bytes = 32768;
    bt.impl = KVC_ATTEND_IMPL_MMA_WIDE + 1; // no such kernel
    assert_int_equal(kvc_attend_batch_cuda_workspace(&gp, &bt, &ws), FY_ERR_INVALID_ARG);
    bt.impl = KVC_ATTEND_IMPL_AUTO;
    assert_int_equal(kvc_attend_batch_cuda(&gp, &bt, NULL, 1.0f, NULL, NULL, 0, NULL),
                     FY_ERR_INVALID_ARG);
}

int main(void)
{
    if (fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity),
        cmocka_unit_test(test_bad_ids),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

#else

int main(void)
{
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
