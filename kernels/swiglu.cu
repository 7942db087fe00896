/*
 * swiglu.cu: the SwiGLU gate, silu(gate) * up, on the GPU (CUDA twin of swiglu.c); the row
 * form reads gate and up from one fused GEMM output and writes the FP16 input of the down
 * projection.
 */
#include "cuda_int.h"

static __device__ __forceinline__ float silu_mul(float g, float u)
{
    return g / (1.0f + expf(-g)) * u;
}

__global__ void swiglu_kernel(float *out, const float *gate, const float *up, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = silu_mul(gate[i], up[i]);
}

__global__ void swiglu_rows_kernel(uint16_t *out, int ldo, const float *gate, const float *up,
                                   int ldi, int rows, int cols)
{
    size_t total = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / cols, c = i % cols;
        out[r * ldo + c] = krn_f2h(silu_mul(gate[r * ldi + c], up[r * ldi + c]));
    }
}

extern "C" fy_status_t krn_swiglu_f32_cuda(float *out, const float *gate, const float *up,
                                           size_t n, cudaStream_t stream)
{
    if (n == 0)
        return FY_OK;
    swiglu_kernel<<<krn_grid_1d(n, 256), 256, 0, stream>>>(out, gate, up, n);
    return krn_launch_status();
}

extern "C" fy_status_t krn_swiglu_rows_f16_cuda(uint16_t *out, int ldo, const float *gate,
                                                const float *up, int ldi, int rows, int cols,
                                                cudaStream_t stream)
{
    if (rows < 0 || cols < 0 || ldo < cols || ldi < cols)
        return FY_ERR_INVALID_ARG;
    if (rows == 0 || cols == 0)
        return FY_OK;
    size_t total = (size_t)rows * cols;
    swiglu_rows_kernel<<<krn_grid_1d(total, 256), 256, 0, stream>>>(out, ldo, gate, up, ldi,
                                                                     rows, cols);
    return krn_launch_status();
}
