/*
 * rope.cu: rotary position embedding on the GPU (CUDA twin of rope.c), both layouts (NORM:
 * adjacent pairs, NEOX: halves), freq_factors and linear freq_scale. One thread per (token,
 * rotated pair, group of heads) computes the angle in double exactly as the reference does,
 * then rotates that pair in the heads of its group (every head when there are many tokens).
 */
#include "cuda_int.h"

__global__ void rope_kernel(float *x, int ldx, int n_tokens, int n_heads, int head_dim,
                            const int32_t *pos, int neox, int n_rot, float theta, float freq_scale,
                            const float *freq_factors, int head_groups)
{
    int n_half = n_rot / 2;
    size_t total = (size_t)n_tokens * n_half * head_groups;
    for (size_t it = blockIdx.x * (size_t)blockDim.x + threadIdx.x; it < total;
         it += (size_t)gridDim.x * blockDim.x) {
        int hg = (int)(it % head_groups);
        size_t tp = it / head_groups;
        int t = (int)(tp / n_half), i = (int)(tp % n_half);
        double p = (double)pos[t] * freq_scale;
        double freq = pow((double)theta, -2.0 * i / n_rot);
        if (freq_factors != NULL)
            freq /= freq_factors[i];
        double ang = p * freq;
        float c = (float)cos(ang), s = (float)sin(ang);
        int a = neox ? i : 2 * i;
        int b = neox ? i + n_half : 2 * i + 1;
        float *xt = x + (size_t)t * ldx;
#pragma unroll 4
        for (int h = hg; h < n_heads; h += head_groups) {
            float *xh = xt + (size_t)h * head_dim;
            float x0 = xh[a], x1 = xh[b];
            xh[a] = x0 * c - x1 * s;
            xh[b] = x0 * s + x1 * c;
        }
    }
}

extern "C" fy_status_t krn_rope_f32_cuda(float *x, int ldx, int n_tokens, int n_heads,
                                         int head_dim, const int32_t *pos, const krn_rope_t *rope,
                                         cudaStream_t stream)
{
    if (rope == NULL || n_tokens < 0 || n_heads <= 0 || head_dim <= 0 || rope->n_rot <= 0 ||
        rope->n_rot % 2 != 0 || rope->n_rot > head_dim ||
        (size_t)ldx < (size_t)n_heads * head_dim)
        return FY_ERR_INVALID_ARG;
    if (n_tokens == 0)
        return FY_OK;
    // Few tokens (a decode step): the heads are spread over threads too, else each thread
    // would walk every head in turn, a chain of dependent loads.
    size_t pairs = (size_t)n_tokens * (rope->n_rot / 2);
    int head_groups = 1;
    while (head_groups < n_heads && pairs * head_groups < 16384)
        head_groups *= 2;
    head_groups = head_groups > n_heads ? n_heads : head_groups;
    size_t total = pairs * head_groups;
    rope_kernel<<<krn_grid_1d(total, 128), 128, 0, stream>>>(
        x, ldx, n_tokens, n_heads, head_dim, pos, rope->mode == KRN_ROPE_NEOX, rope->n_rot,
        rope->theta, rope->freq_scale, rope->freq_factors, head_groups);
    return krn_launch_status();
}
