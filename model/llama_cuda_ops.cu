/*
 * llama_cuda_ops.cu: the small kernels the GPU forward pass needs besides the ops in kernels/:
 * GGUF block dequantization to FP16 (so a model's quantized bytes are uploaded as they are and
 * expanded on the GPU, which is what makes loading an 8B model take seconds), the QKV bias,
 * and the scatter of a fused QKV output into the [n_kv_heads][n_tokens][head_dim] K/V layout
 * and the window queries that the layer callback hands out.
 */
#include <cuda_fp16.h>

#include "llama_cuda_int.h"
#include "model.h"

static __device__ __forceinline__ float ld_f16(const uint8_t *p)
{
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

__global__ void dequant_kernel(uint16_t *dst, const uint8_t *src, uint32_t type, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t blk = i / 32;
        int j = (int)(i % 32);
        float v;
        switch (type) {
        case MDL_TENSOR_F32:
            v = reinterpret_cast<const float *>(src)[i];
            break;
        case MDL_TENSOR_F16:
            dst[i] = reinterpret_cast<const uint16_t *>(src)[i];
            continue;
        case MDL_TENSOR_BF16:
            v = __uint_as_float((uint32_t)reinterpret_cast<const uint16_t *>(src)[i] << 16);
            break;
        case MDL_TENSOR_Q8_0: {
            const uint8_t *p = src + blk * 34;
            v = ld_f16(p) * (float)(int8_t)p[2 + j];
            break;
        }
        case MDL_TENSOR_Q4_0: {
            const uint8_t *p = src + blk * 18;
            uint8_t b = p[2 + (j & 15)];
            int q = j < 16 ? (b & 0x0f) : (b >> 4);
            v = ld_f16(p) * (float)(q - 8);
            break;
        }
        default: { // MDL_TENSOR_Q4_1 (the host checked the type)
            const uint8_t *p = src + blk * 20;
            uint8_t b = p[4 + (j & 15)];
            int q = j < 16 ? (b & 0x0f) : (b >> 4);
            v = ld_f16(p) * (float)q + ld_f16(p + 2);
            break;
        }
        }
        dst[i] = __half_as_ushort(__float2half_rn(v));
    }
}

static unsigned grid_for(size_t n, unsigned block)
{
    size_t b = (n + block - 1) / block;
    return (unsigned)(b == 0 ? 1 : (b > 65535 ? 65535 : b));
}

static fy_status_t launched(void)
{
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? FY_OK
                            : (e == cudaErrorMemoryAllocation ? FY_ERR_RESOURCE_EXHAUSTED
                                                               : FY_ERR_CUDA);
}

extern "C" fy_status_t mdl_cuda_dequant_f16(uint16_t *dst, const void *src, uint32_t type,
                                            size_t n, size_t src_bytes, cudaStream_t stream)
{
    size_t blk, bytes;
    switch (type) {
    case MDL_TENSOR_F32: blk = 1, bytes = 4; break;
    case MDL_TENSOR_F16:
    case MDL_TENSOR_BF16: blk = 1, bytes = 2; break;
    case MDL_TENSOR_Q8_0: blk = 32, bytes = 34; break;
    case MDL_TENSOR_Q4_0: blk = 32, bytes = 18; break;
    case MDL_TENSOR_Q4_1: blk = 32, bytes = 20; break;
    default: return FY_ERR_UNSUPPORTED;
    }
    if (n % blk != 0 || n / blk * bytes != src_bytes || ((uintptr_t)src & 3) != 0)
        return FY_ERR_FORMAT;
    if (n == 0)
        return FY_OK;
    dequant_kernel<<<grid_for(n, 256), 256, 0, stream>>>(dst, (const uint8_t *)src, type, n);
    return launched();
}

__global__ void add_bias_kernel(float *x, int ldx, const float *bias, int rows, int cols)
{
    size_t total = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / cols, c = i % cols;
        x[r * ldx + c] += bias[c];
    }
}

extern "C" fy_status_t mdl_cuda_add_bias(float *x, int ldx, const float *bias, int rows,
                                         int cols, cudaStream_t stream)
{
    if (rows < 0 || cols < 0 || ldx < cols)
        return FY_ERR_INVALID_ARG;
    size_t total = (size_t)rows * cols;
    if (total == 0)
        return FY_OK;
    add_bias_kernel<<<grid_for(total, 256), 256, 0, stream>>>(x, ldx, bias, rows, cols);
    return launched();
}

__global__ void split_qkv_kernel(float *k, float *v, float *q_window, const float *qkv, int ld,
                                 int n, int n_heads, int n_kv, int hd, int w)
{
    // Elements: K and V of every (token, kv head) plus the window queries.
    size_t n_kv_el = (size_t)n * n_kv * hd, n_q_el = (size_t)w * n_heads * hd;
    size_t total = n_kv_el + n_q_el;
    int q_dim = n_heads * hd, kv_dim = n_kv * hd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        if (i < n_kv_el) {
            int d = (int)(i % hd);
            size_t rest = i / hd;
            int t = (int)(rest % n), h = (int)(rest / n);
            const float *row = qkv + (size_t)t * ld;
            k[i] = row[q_dim + h * hd + d];
            v[i] = row[q_dim + kv_dim + h * hd + d];
        } else {
            size_t j = i - n_kv_el; // [n_heads][w][hd]
            int d = (int)(j % hd);
            size_t rest = j / hd;
            int wi = (int)(rest % w), h = (int)(rest / w);
            q_window[j] = qkv[(size_t)(n - w + wi) * ld + h * hd + d];
        }
    }
}

extern "C" fy_status_t mdl_cuda_split_qkv(float *k, float *v, float *q_window, const float *qkv,
                                          int ld, int n, int n_heads, int n_kv_heads,
                                          int head_dim, int w, cudaStream_t stream)
{
    if (n < 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || w < 0 || w > n ||
        (size_t)ld < (size_t)(n_heads + 2 * n_kv_heads) * head_dim ||
        (w > 0 && q_window == NULL))
        return FY_ERR_INVALID_ARG;
    size_t total = (size_t)n * n_kv_heads * head_dim + (size_t)w * n_heads * head_dim;
    if (total == 0)
        return FY_OK;
    split_qkv_kernel<<<grid_for(total, 256), 256, 0, stream>>>(k, v, q_window, qkv, ld, n,
                                                               n_heads, n_kv_heads, head_dim, w);
    return launched();
}
