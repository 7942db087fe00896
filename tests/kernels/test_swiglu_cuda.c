// CUDA parity of SwiGLU (FP32 form and the FP16 row form over a fused gate|up GEMM output)
// against krn_swiglu_f32. Tolerance: FP32 |diff| <= 1e-6 + 1e-5 |ref| (expf differs in the
// last bits); FP16 output |diff| <= 1e-7 + 1e-3 |ref|.
#include "test_util_cuda.h"

static int run(uint64_t *rng, int rows, int cols)
{
    size_t n = (size_t)rows * cols;
    float *g = tcu_rand_f32(rng, n, -12, 12), *u = tcu_rand_f32(rng, n, -3, 3);
    float *ref = malloc(n * 4), *got = malloc(n * 4);
    krn_swiglu_f32(ref, g, u, n);
    float *dg = tcu_dev(g, n * 4), *du = tcu_dev(u, n * 4), *dout = tcu_dev(NULL, n * 4);
    char what[96];
    int bad = 0;
    TCU_OK(krn_swiglu_f32_cuda(dout, dg, du, n, 0));
    tcu_get(got, dout, n * 4);
    snprintf(what, sizeof(what), "swiglu f32 n=%zu", n);
    bad += tcu_compare(what, got, ref, 1, (int)n, (int)n, 1e-6f, 1e-5f);
    TCU_OK(krn_swiglu_f32_cuda(dg, dg, du, n, 0)); // out == gate
    tcu_get(got, dg, n * 4);
    snprintf(what, sizeof(what), "swiglu f32 in place n=%zu", n);
    bad += tcu_compare(what, got, ref, 1, (int)n, (int)n, 1e-6f, 1e-5f);

    // Row form: gu [rows][2 * cols] = gate | up, out [rows][cols + 3] FP16.
    int ldi = 2 * cols, ldo = cols + 3;
    float *gu = malloc((size_t)rows * ldi * 4), *ref2 = malloc((size_t)rows * ldo * 4);
    float *got2 = malloc((size_t)rows * ldo * 4);
    uint16_t *h16 = malloc((size_t)rows * ldo * 2);
    for (int r = 0; r < rows; r++) {
        memcpy(gu + (size_t)r * ldi, g + (size_t)r * cols, (size_t)cols * 4);
        memcpy(gu + (size_t)r * ldi + cols, u + (size_t)r * cols, (size_t)cols * 4);
        memcpy(ref2 + (size_t)r * ldo, ref + (size_t)r * cols, (size_t)cols * 4);
    }
    float *dgu = tcu_dev(gu, (size_t)rows * ldi * 4);
    uint16_t *d16 = tcu_dev(NULL, (size_t)rows * ldo * 2);
    TCU_OK(krn_swiglu_rows_f16_cuda(d16, ldo, dgu, dgu + cols, ldi, rows, cols, 0));
    tcu_get(h16, d16, (size_t)rows * ldo * 2);
    for (size_t i = 0; i < (size_t)rows * ldo; i++)
        got2[i] = fy_fp16_to_fp32(h16[i]);
    snprintf(what, sizeof(what), "swiglu rows f16 %dx%d", rows, cols);
    bad += tcu_compare(what, got2, ref2, rows, cols, ldo, 1e-7f, 1e-3f);
    // The padding of each output row keeps its poison (0xffff).
    for (int r = 0; r < rows; r++) {
        for (int c = cols; c < ldo; c++)
            bad += h16[(size_t)r * ldo + c] != 0xffff;
    }
    cudaFree(dg), cudaFree(du), cudaFree(dout), cudaFree(dgu), cudaFree(d16);
    free(g), free(u), free(ref), free(got), free(gu), free(ref2), free(got2), free(h16);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    uint64_t rng = tcu_seed();
    int bad = run(&rng, 1, 1) + run(&rng, 3, 1537) + run(&rng, 17, 333) + run(&rng, 64, 14336);
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
