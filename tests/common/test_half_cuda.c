// CUDA parity for the half conversions: all 65,536 fp16 values and a sweep of fp32 bit
// patterns converted on the GPU must equal the CPU reference bit for bit. Exits 77 (skipped)
// without a CUDA build or a GPU.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if FY_HAVE_CUDA
#include <cuda_runtime.h>
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
    const size_t n = 1 << 20;
    uint16_t *h = malloc(n * sizeof(uint16_t));
    uint16_t *h_out = malloc(n * sizeof(uint16_t));
    float *f = malloc(n * sizeof(float));
    float *f_out = malloc(n * sizeof(float));
    uint64_t rng = 42;
    for (size_t i = 0; i < n; i++) {
        h[i] = (uint16_t)i; // wraps: covers every fp16 value 16 times
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t bits = (uint32_t)(rng >> 32);
        memcpy(&f[i], &bits, 4);
    }
    uint16_t *d_h = NULL;
    float *d_f = NULL;
    if (cudaMalloc((void **)&d_h, n * 2) != cudaSuccess ||
        cudaMalloc((void **)&d_f, n * 4) != cudaSuccess) {
        fprintf(stderr, "cudaMalloc failed\n");
        return 1;
    }
    int failures = 0;

    cudaMemcpy(d_h, h, n * 2, cudaMemcpyHostToDevice);
    if (fy_cuda_fp16_to_fp32(d_f, d_h, n, NULL) != FY_OK)
        failures++;
    cudaMemcpy(f_out, d_f, n * 4, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < n && failures < 10; i++) {
        float ref = fy_fp16_to_fp32(h[i]);
        if (memcmp(&ref, &f_out[i], 4) != 0) {
            fprintf(stderr, "fp16->fp32 mismatch at 0x%04x\n", h[i]);
            failures++;
        }
    }

    cudaMemcpy(d_f, f, n * 4, cudaMemcpyHostToDevice);
    if (fy_cuda_fp32_to_fp16(d_h, d_f, n, NULL) != FY_OK)
        failures++;
    cudaMemcpy(h_out, d_h, n * 2, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < n && failures < 10; i++) {
        if (h_out[i] != fy_fp32_to_fp16(f[i])) {
            fprintf(stderr, "fp32->fp16 mismatch at %zu\n", i);
            failures++;
        }
    }

    if (fy_cuda_fp32_to_bf16(d_h, d_f, n, NULL) != FY_OK)
        failures++;
    cudaMemcpy(h_out, d_h, n * 2, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < n && failures < 10; i++) {
        if (h_out[i] != fy_fp32_to_bf16(f[i])) {
            fprintf(stderr, "fp32->bf16 mismatch at %zu\n", i);
            failures++;
        }
    }

    cudaMemcpy(d_h, h, n * 2, cudaMemcpyHostToDevice);
    if (fy_cuda_bf16_to_fp32(d_f, d_h, n, NULL) != FY_OK)
        failures++;
    cudaMemcpy(f_out, d_f, n * 4, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < n && failures < 10; i++) {
        float ref = fy_bf16_to_fp32(h[i]);
        if (memcmp(&ref, &f_out[i], 4) != 0) {
            fprintf(stderr, "bf16->fp32 mismatch at 0x%04x\n", h[i]);
            failures++;
        }
    }
    if (cudaDeviceSynchronize() != cudaSuccess)
        failures++;
    cudaFree(d_h);
    cudaFree(d_f);
    free(h);
    free(h_out);
    free(f);
    free(f_out);
    printf("%s: %d failures\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
#endif
}
