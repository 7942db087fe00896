// CUDA parity of RMSNorm (FP32 and FP16 outputs) against krn_rmsnorm_f32. Odd widths, padded
// strides, in place. Tolerance: FP32 |diff| <= 1e-6 + 2e-6 |ref|; FP16 output: within the
// FP16 rounding of the reference, |diff| <= 1e-7 + 1e-3 |ref|.
#include "test_util_cuda.h"

static int run(uint64_t *rng, int rows, int dim, int pad, float scale)
{
    int ld = dim + pad;
    size_t n = (size_t)rows * ld;
    float *x = tcu_rand_f32(rng, n, -scale, scale), *w = tcu_rand_f32(rng, (size_t)dim, 0.5f, 2);
    float *ref = malloc(n * 4), *got = malloc(n * 4);
    memcpy(ref, x, n * 4);
    krn_rmsnorm_f32(ref, ld, x, ld, w, rows, dim, 1e-5f);
    float *dx = tcu_dev(x, n * 4), *dw = tcu_dev(w, (size_t)dim * 4), *dout = tcu_dev(NULL, n * 4);
    char what[96];
    int bad = 0;
    TCU_OK(krn_rmsnorm_f32_cuda(dout, ld, dx, ld, dw, rows, dim, 1e-5f, 0));
    tcu_get(got, dout, n * 4);
    snprintf(what, sizeof(what), "rmsnorm f32 %dx%d", rows, dim);
    bad += tcu_compare(what, got, ref, rows, dim, ld, 1e-6f, 2e-6f);
    // In place.
    TCU_OK(krn_rmsnorm_f32_cuda(dx, ld, dx, ld, dw, rows, dim, 1e-5f, 0));
    tcu_get(got, dx, n * 4);
    snprintf(what, sizeof(what), "rmsnorm f32 in place %dx%d", rows, dim);
    bad += tcu_compare(what, got, ref, rows, dim, ld, 1e-6f, 2e-6f);
    // FP16 output.
    TCU_CHECK(cudaMemcpy(dx, x, n * 4, cudaMemcpyHostToDevice));
    uint16_t *d16 = tcu_dev(NULL, n * 2), *h16 = malloc(n * 2);
    TCU_OK(krn_rmsnorm_f16_cuda(d16, ld, dx, ld, dw, rows, dim, 1e-5f, 0));
    tcu_get(h16, d16, n * 2);
    for (size_t i = 0; i < n; i++)
        got[i] = fy_fp16_to_fp32(h16[i]);
    snprintf(what, sizeof(what), "rmsnorm f16 %dx%d", rows, dim);
    bad += tcu_compare(what, got, ref, rows, dim, ld, 1e-7f, 1e-3f);
    cudaFree(dx), cudaFree(dw), cudaFree(dout), cudaFree(d16);
    free(x), free(w), free(ref), free(got), free(h16);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    uint64_t rng = tcu_seed();
    int bad = 0;
    bad += run(&rng, 1, 1, 0, 1);
    bad += run(&rng, 7, 33, 3, 10);
    bad += run(&rng, 3, 577, 0, 0.01f);
    bad += run(&rng, 65, 576, 7, 1);
    bad += run(&rng, 2, 4096, 0, 100);
    bad += run(&rng, 1, 16383, 1, 1);
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
