// CUDA parity for decode attention over compressed pages (kvcodec/attend.cu): pages are built on
// the CPU by the real encoder and kvc_place (plus FP16 tail appends and a conversion; the cases
// are attend_cases.c's, which test_attend_emu.cc also runs on host threads), the pool's
// bytes are copied to one device allocation, and kvc_attend_batch_cuda over a batch of
// sequences of different lengths must match kvc_attend on the same pages list by list:
// |gpu - cpu| <= 1e-3 * max|cpu row| + 1e-6 for every element (both are fp32; only the order of
// the sums differs), 4e-3 for the MMA kernel's quantized keys, which it dequantizes to FP16
// (each key rounded by up to 2^-11 relative moves a logit by up to about |q| |k| 2^-11). Every
// option, rotated and unrotated pages, MixKVQ protected channels, GQA 4:1, 3:1, 2:1 and 1:1,
// head_dim 64 and 128 (and 72, 256, 512 for the other lane layouts), odd token counts, empty lists
// (zeros), one split per list and many, and invalid page ids (skipped and counted); each with every
// kernel (SIMT, and MMA, MMA_QTAB and MMA_WIDE where the shape allows them; group sizes 24, 32, 40
// and 64 for MMA_WIDE's steps), and each again with FERRY_ATTEND_FUSE=1 (no combine kernel).
// Outputs are poisoned with NaN first. Exits 77 (skipped) without a CUDA build or a GPU.
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

#if FY_HAVE_CUDA
#include <cuda_runtime.h>

#include "kvcodec_cuda.h"

#define CK(call) assert_int_equal((int)(call), (int)cudaSuccess)

/* Runs kernel `impl` (KVC_ATTEND_IMPL_SIMT, _MMA, _MMA_QTAB or _MMA_WIDE) over every list of B
 * (plus `extra_bad` invalid page ids at the end of each non-empty list) and compares with
 * kvc_attend. MMA (or a variant) asked of a shape it does not take runs SIMT;
 * kvc_attend_batch_cuda_impl must say so exactly for the shapes the header names.
 * max_override 0: the true maximum list length. */
static void run_and_compare(const kva_built_t *B, uint32_t extra_bad, uint32_t max_override,
                            uint32_t impl)
{
    const uint32_t d = B->d, grp = B->n_heads / B->n_kv;
    const uint32_t n_total = kvc_pool_n_pages(B->pool);
    kva_lists_t L;
    kva_lists(B, extra_bad, &L);
    float *q, *ref, scale;
    kva_reference(B, &q, &ref, &scale);
    size_t nq = (size_t)B->n_seqs * B->n_heads * d;
    float *got = malloc(nq * sizeof(float));

    // Device copies: the pool's bytes exactly, one allocation.
    const uint8_t *host_base = kvc_page_data(B->pool, 0);
    size_t pool_bytes = B->page_bytes * n_total;
    uint8_t *d_pool;
    uint32_t *d_starts, *d_ids;
    float *d_q, *d_out;
    CK(cudaMalloc((void **)&d_pool, pool_bytes));
    CK(cudaMalloc((void **)&d_starts, ((size_t)L.n_items + 1) * sizeof(uint32_t)));
    CK(cudaMalloc((void **)&d_ids, (L.n_ids ? L.n_ids : 1) * sizeof(uint32_t)));
    CK(cudaMalloc((void **)&d_q, nq * sizeof(float)));
    CK(cudaMalloc((void **)&d_out, nq * sizeof(float)));
    CK(cudaMemcpy(d_pool, host_base, pool_bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_starts, L.starts, ((size_t)L.n_items + 1) * sizeof(uint32_t),
                  cudaMemcpyHostToDevice));
    if (L.n_ids)
        CK(cudaMemcpy(d_ids, L.ids, (size_t)L.n_ids * sizeof(uint32_t), cudaMemcpyHostToDevice));
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
        .max_list_pages = max_override ? max_override : L.max_list,
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
    assert_int_equal(n_bad, L.expect_bad);
    CK(cudaMemcpy(got, d_out, nq * sizeof(float), cudaMemcpyDeviceToHost));

    // MMA and MMA_WIDE round dequantized keys to FP16 (kvc_attend keeps them in FP32).
    const bool f16_keys = ran == KVC_ATTEND_IMPL_MMA || ran == KVC_ATTEND_IMPL_MMA_WIDE;
    double worst = kva_check(B, got, ref, f16_keys);
    printf("  %s d %u, %u seqs x %u kv heads x %u rows, %u pages, max list %u: worst rel err "
           "%.2e\n",
           ran == KVC_ATTEND_IMPL_MMA        ? "mma "
           : ran == KVC_ATTEND_IMPL_MMA_QTAB ? "qtab"
           : ran == KVC_ATTEND_IMPL_MMA_WIDE ? "wide"
                                             : "simt",
           d, B->n_seqs, B->n_kv, grp, L.n_ids, L.max_list, worst);
    CK(cudaFree(d_ws));
    CK(cudaFree(d_pool));
    CK(cudaFree(d_starts));
    CK(cudaFree(d_ids));
    CK(cudaFree(d_q));
    CK(cudaFree(d_out));
    kva_lists_free(&L);
    free(q), free(ref), free(got);
}

/* Every config, with the kernel's own split (several pages per block for long lists, up to one
 * block per page) and with every list in a single block; the tensor-core kernel also in its
 * FERRY_ATTEND_BLOCKS=4 build. */
static void test_parity(void **state)
{
    (void)state;
    uint32_t opts[KVC_OPT_DROP] = {0}, rot = 0;
    for (size_t i = 0; i < kva_n_configs; i++) {
        kva_built_t B;
        kva_build(&B, &kva_configs[i]);
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
        // Each list combined by its last split instead of the combine kernel: the same results.
        setenv("FERRY_ATTEND_FUSE", "1", 1);
        for (uint32_t impl = KVC_ATTEND_IMPL_SIMT; impl <= KVC_ATTEND_IMPL_MMA_WIDE; impl++)
            run_and_compare(&B, 0, 0, impl);
        run_and_compare(&B, 0, 1, KVC_ATTEND_IMPL_MMA);
        unsetenv("FERRY_ATTEND_FUSE");
        kva_unbuild(&B);
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
    kva_built_t B;
    kva_build(&B, &kva_configs[0]);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_SIMT);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA_QTAB);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA_WIDE);
    setenv("FERRY_ATTEND_FUSE", "1", 1);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_SIMT);
    run_and_compare(&B, 2, 0, KVC_ATTEND_IMPL_MMA);
    unsetenv("FERRY_ATTEND_FUSE");
    kva_unbuild(&B);
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
