// CUDA parity of krn_gemm_f16_cuda against the CPU GEMM (krn_gemm_f32) on the same FP16
// values widened to FP32, so only the summation order differs. Odd shapes, padded row
// strides, with and without accumulation; the padding columns of y must stay untouched.
// Tolerance: |diff| <= 1e-5 + 1e-3 * sum_k |x||w| per element (FP32 accumulation).
// Shapes of up to 4 rows with k and strides multiples of 8 must take the GEMV kernel, the
// others cuBLAS; then, with FERRY_GEMM=mma, aligned shapes of 5 to 16 rows the skinny MMA
// kernel. Each is checked.
#include <string.h>

#include "test_util_cuda.h"

static int run(uint64_t *rng, int m, int n, int k, int pad, int accumulate)
{
    int ldx = k + pad, ldw = k + 2 * pad, ldy = n + pad;
    size_t nx = (size_t)m * ldx, nw = (size_t)n * ldw, ny = (size_t)m * ldy;
    uint16_t *x16 = malloc(nx * 2), *w16 = malloc(nw * 2);
    float *xf = malloc(nx * 4), *wf = malloc(nw * 4), *y0 = tcu_rand_f32(rng, ny, -1, 1);
    float *ref = malloc(ny * 4), *got = malloc(ny * 4), *bound = malloc(ny * 4);
    for (size_t i = 0; i < nx; i++) {
        x16[i] = fy_fp32_to_fp16(tcu_uniform(rng, -2, 2));
        xf[i] = fy_fp16_to_fp32(x16[i]);
    }
    for (size_t i = 0; i < nw; i++) {
        w16[i] = fy_fp32_to_fp16(tcu_uniform(rng, -0.5f, 0.5f));
        wf[i] = fy_fp16_to_fp32(w16[i]);
    }
    memcpy(ref, y0, ny * 4);
    krn_gemm_f32(m, n, k, xf, ldx, wf, ldw, ref, ldy, accumulate);
    for (int r = 0; r < m; r++) {
        for (int c = 0; c < n; c++) {
            double b = 0;
            for (int i = 0; i < k; i++)
                b += fabs((double)xf[(size_t)r * ldx + i] * wf[(size_t)c * ldw + i]);
            bound[(size_t)r * ldy + c] = (float)b;
        }
    }
    uint16_t *dx = tcu_dev(x16, nx * 2), *dw = tcu_dev(w16, nw * 2);
    float *dy = tcu_dev(accumulate ? y0 : NULL, ny * 4);
    if (!accumulate) { // poison the rows but keep the padding columns at y0 to check them
        for (int r = 0; r < m; r++)
            TCU_CHECK(cudaMemcpy(dy + (size_t)r * ldy + n, y0 + (size_t)r * ldy + n,
                                 (size_t)pad * 4, cudaMemcpyHostToDevice));
    }
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cublasCreate failed\n");
        exit(1);
    }
    cudaStream_t s;
    TCU_CHECK(cudaStreamCreate(&s));
    const char *kernel = krn_gemm_cuda_kernel(m, k, dx, ldx, dw, ldw);
    const bool aligned = k % 8 == 0 && ldx % 8 == 0 && ldw % 8 == 0;
    const char *mode = getenv("FERRY_GEMM");
    const bool mma = mode != NULL && strcmp(mode, "mma") == 0;
    const char *want = !aligned ? "cublas" : m <= 4 ? "gemv" : mma && m <= 16 ? "mma" : "cublas";
    int bad = strcmp(kernel, want) != 0;
    TCU_OK(krn_gemm_f16_cuda(h, m, n, k, dx, ldx, dw, ldw, dy, ldy, accumulate, s));
    tcu_get(got, dy, ny * 4);
    for (int r = 0; r < m; r++) {
        for (int c = 0; c < n; c++) {
            size_t i = (size_t)r * ldy + c;
            double diff = fabs((double)got[i] - ref[i]);
            if (!(diff <= 1e-5 + 1e-3 * bound[i])) {
                if (bad < 5)
                    fprintf(stderr, "  y[%d][%d] = %g, ref %g\n", r, c, got[i], ref[i]);
                bad++;
            }
        }
        for (int c = n; c < ldy; c++) {
            if (memcmp(&got[(size_t)r * ldy + c], &y0[(size_t)r * ldy + c], 4) != 0) {
                if (bad < 5)
                    fprintf(stderr, "  padding y[%d][%d] written\n", r, c);
                bad++;
            }
        }
    }
    printf("%s gemm m=%d n=%d k=%d pad=%d acc=%d (%s): %d bad\n", bad ? "FAIL" : "ok  ", m, n, k,
           pad, accumulate, kernel, bad);
    cublasDestroy(h);
    TCU_CHECK(cudaStreamDestroy(s));
    cudaFree(dx);
    cudaFree(dw);
    cudaFree(dy);
    free(x16), free(w16), free(xf), free(wf), free(y0), free(ref), free(got), free(bound);
    return bad;
}

int main(void)
{
    tcu_require_gpu();
    unsetenv("FERRY_GEMM"); // the default kernels first, whatever the caller's environment
    uint64_t rng = tcu_seed();
    static const int shapes[][4] = {{1, 37, 67, 0},     {1, 576, 576, 3},   {5, 129, 200, 1},
                                    {16, 1536, 576, 0}, {33, 257, 96, 5},   {130, 64, 1000, 2},
                                    {513, 191, 64, 0},  {1, 1000, 4096, 0}, {2, 333, 576, 8},
                                    {3, 77, 200, 0},    {4, 129, 1000, 8},  {1, 37, 64, 0},
                                    {4, 3, 8, 0},       {4, 64, 512, 4}};
    int bad = 0;
    for (size_t i = 0; i < FY_ARRAY_SIZE(shapes); i++) {
        for (int acc = 0; acc < 2; acc++)
            bad += run(&rng, shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], acc);
    }
    // The skinny MMA kernel (opt-in): one and two n-tiles, partial column tiles, k not a
    // multiple of its 32-half blocks, padded strides; a misaligned stride stays with cuBLAS.
    static const int mma_shapes[][4] = {{5, 37, 64, 0},     {8, 1000, 4096, 8}, {9, 333, 576, 0},
                                        {16, 129, 1000, 8}, {12, 17, 8, 0},     {16, 2048, 200, 0},
                                        {7, 64, 512, 4}};
    setenv("FERRY_GEMM", "mma", 1);
    for (size_t i = 0; i < FY_ARRAY_SIZE(mma_shapes); i++) {
        for (int acc = 0; acc < 2; acc++)
            bad += run(&rng, mma_shapes[i][0], mma_shapes[i][1], mma_shapes[i][2], mma_shapes[i][3],
                       acc);
    }
    unsetenv("FERRY_GEMM");
    // Bad shapes are refused before anything is launched.
    if (krn_gemm_f16_cuda(NULL, 1, 1, 1, NULL, 1, NULL, 1, NULL, 1, 0, 0) != FY_ERR_INVALID_ARG)
        bad++;
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
