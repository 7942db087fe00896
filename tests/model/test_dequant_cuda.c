// CUDA parity of the GGUF dequantization the GPU loader uses (mdl_cuda_dequant_f16) against the
// CPU reader (mdl_gguf_tensor_to_f32, then the CPU's FP16 rounding): every supported type over
// random blocks (random scales, every nibble and int8 value). Tolerance: bit-exact, except Q4_1
// where d * q + m may be fused on the GPU: at most 1 FP16 ulp there. Exits 77 without a GPU.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama_cuda_int.h"
#include "model.h"

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int run(uint64_t *rng, uint32_t type, size_t n)
{
    size_t blk = 1, bytes = 4;
    switch (type) {
    case MDL_TENSOR_F16:
    case MDL_TENSOR_BF16: bytes = 2; break;
    case MDL_TENSOR_Q8_0: blk = 32, bytes = 34; break;
    case MDL_TENSOR_Q4_0: blk = 32, bytes = 18; break;
    case MDL_TENSOR_Q4_1: blk = 32, bytes = 20; break;
    default: break;
    }
    size_t src_bytes = n / blk * bytes;
    uint8_t *src = malloc(src_bytes);
    for (size_t i = 0; i < src_bytes; i++)
        src[i] = (uint8_t)next(rng);
    // Keep scales (and F16/BF16/F32 values) finite and in FP16 range.
    for (size_t b = 0; b < n / blk; b++) {
        uint8_t *p = src + b * bytes;
        if (blk == 32) {
            uint16_t d = fy_fp32_to_fp16((float)((int64_t)(next(rng) % 2000) - 1000) / 1e4f);
            memcpy(p, &d, 2);
            if (type == MDL_TENSOR_Q4_1) {
                uint16_t m = fy_fp32_to_fp16((float)((int64_t)(next(rng) % 2000) - 1000) / 1e3f);
                memcpy(p + 2, &m, 2);
            }
        } else if (type == MDL_TENSOR_F32) {
            float f = (float)((int64_t)(next(rng) % 200001) - 100000) / 7.0f;
            memcpy(p, &f, 4);
        } else if (type == MDL_TENSOR_F16) {
            uint16_t h = fy_fp32_to_fp16((float)((int64_t)(next(rng) % 200001) - 100000) / 9.0f);
            memcpy(p, &h, 2);
        } else {
            uint16_t h = fy_fp32_to_bf16((float)((int64_t)(next(rng) % 200001) - 100000) / 9.0f);
            memcpy(p, &h, 2);
        }
    }
    mdl_gguf_tensor_t t = {.name = "t", .type = type, .n_dims = 1, .ne = {n, 1, 1, 1},
                           .n_elems = n, .n_bytes = src_bytes, .data = src};
    float *ref = malloc(n * sizeof(float));
    if (mdl_gguf_tensor_to_f32(&t, ref) != FY_OK) {
        fprintf(stderr, "CPU dequantization failed for type %u\n", type);
        return 1;
    }
    void *dsrc = NULL;
    uint16_t *ddst = NULL, *got = malloc(n * 2);
    if (cudaMalloc(&dsrc, src_bytes) != cudaSuccess || cudaMalloc((void **)&ddst, n * 2) ||
        cudaMemcpy(dsrc, src, src_bytes, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemset(ddst, 0xff, n * 2) != cudaSuccess) {
        fprintf(stderr, "CUDA setup failed\n");
        return 1;
    }
    fy_status_t st = mdl_cuda_dequant_f16(ddst, dsrc, type, n, src_bytes, 0);
    if (st != FY_OK || cudaDeviceSynchronize() != cudaSuccess ||
        cudaMemcpy(got, ddst, n * 2, cudaMemcpyDeviceToHost) != cudaSuccess) {
        fprintf(stderr, "dequant type %u: %s\n", type, fy_status_str(st));
        return 1;
    }
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t want = fy_fp32_to_fp16(ref[i]);
        int diff = abs((int)got[i] - (int)want);
        bool ok = type == MDL_TENSOR_Q4_1 ? diff <= 1 : diff == 0;
        if (!ok && bad++ < 5)
            fprintf(stderr, "  type %u [%zu]: got 0x%04x, want 0x%04x\n", type, i, got[i], want);
    }
    printf("%s %s n=%zu: %zu bad\n", bad ? "FAIL" : "ok  ", mdl_tensor_type_name(type), n, bad);
    // A byte count that does not match the type is refused.
    if (blk == 32 && mdl_cuda_dequant_f16(ddst, dsrc, type, n, src_bytes - 1, 0) != FY_ERR_FORMAT)
        bad++;
    cudaFree(dsrc);
    cudaFree(ddst);
    free(src), free(ref), free(got);
    return bad != 0;
}

int main(void)
{
    if (fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    uint64_t rng = fy_clock_ns() | 1;
    printf("seed %llu\n", (unsigned long long)rng);
    static const uint32_t types[] = {MDL_TENSOR_F32,  MDL_TENSOR_F16,  MDL_TENSOR_BF16,
                                     MDL_TENSOR_Q8_0, MDL_TENSOR_Q4_0, MDL_TENSOR_Q4_1};
    int bad = 0;
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        bad += run(&rng, types[i], 32);
        bad += run(&rng, types[i], 32 * 100003);
    }
    // Unsupported types are refused.
    if (mdl_cuda_dequant_f16(NULL, NULL, 12, 32, 32, 0) != FY_ERR_UNSUPPORTED)
        bad++;
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
