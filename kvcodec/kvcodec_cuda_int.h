/*
 * kvcodec_cuda_int.h: private to the .cu files of kvcodec/. Error mapping for CUDA calls and
 * the device twins of the scalar arithmetic in quant.c.
 *
 * Bit-exactness with the CPU reference rests on three rules, kept by every kernel that
 * produces frame bytes or distortion tables:
 * 1. every fp32 add, subtract, multiply and divide goes through the _rn intrinsics below, so
 *    nvcc never contracts a multiply and an add into an FMA (the CPU code is compiled without
 *    contraction);
 * 2. sums run in the CPU's order: sequential where the CPU loops, and the CPU's 8-lane partial
 *    sums with the same final tree where it uses kvc_v8;
 * 3. fp16 conversions use the same integer algorithm as common/half.c (common/half_cuda.h).
 * Min/max over equal values keeps the first, as the CPU's `a < b ? a : b` does; this differs
 * from the CPU only when an input is NaN (documented: frames are bit-identical for finite K/V).
 */
#ifndef FERRY_KVCODEC_CUDA_INT_H
#define FERRY_KVCODEC_CUDA_INT_H

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"
#include "half_cuda.h"

/* Maps a CUDA error to fy_status_t (out of memory is the caller's resource problem). */
static inline fy_status_t kvc_cuda_status(cudaError_t e)
{
    if (e == cudaSuccess)
        return FY_OK;
    if (e == cudaErrorMemoryAllocation)
        return FY_ERR_RESOURCE_EXHAUSTED;
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        return FY_ERR_NO_DEVICE;
    return FY_ERR_CUDA;
}

/* Evaluates a CUDA call; on failure stores the status in `st` and jumps to `label`. */
#define KVC_CUDA_GOTO(call, st, label)                                                             \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            (st) = kvc_cuda_status(e_);                                                            \
            FY_LOG_ERROR("kvcodec", "%s: %s", #call, cudaGetErrorString(e_));                      \
            goto label;                                                                            \
        }                                                                                          \
    } while (0)

/* After a launch: the launch's own error (bad configuration, no device). */
#define KVC_LAUNCH_GOTO(st, label) KVC_CUDA_GOTO(cudaGetLastError(), st, label)

/* What the device's default memory pool keeps between uses: a layer's scoring scratch is
 * allocated and freed again for every layer, and a pool that gives its memory back at every
 * synchronization (the default threshold, 0) asks the driver each time. */
#define KVC_POOL_KEEP_BYTES ((uint64_t)256 << 20)

/* Stream-ordered scratch where the device has memory pools (some virtualized GPUs do not):
 * cudaMallocAsync / cudaFreeAsync there, else cudaMalloc and, to free, a wait for the stream
 * then cudaFree. kvc_cuda_pools says which; pass its answer to both calls. With pools, it also
 * raises the default pool's release threshold to KVC_POOL_KEEP_BYTES (a higher one set by
 * the program stays). */
static inline bool kvc_cuda_pools(void)
{
    int dev = 0, pools = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev) != cudaSuccess) {
        (void)cudaGetLastError(); // not sticky; the allocation below reports real trouble
        return false;
    }
    if (pools == 0)
        return false;
    cudaMemPool_t pool;
    uint64_t keep = 0;
    cudaError_t e = cudaDeviceGetDefaultMemPool(&pool, dev);
    if (e == cudaSuccess)
        e = cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    if (e == cudaSuccess && keep < KVC_POOL_KEEP_BYTES) {
        keep = KVC_POOL_KEEP_BYTES;
        e = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    }
    if (e != cudaSuccess)
        (void)cudaGetLastError(); // a pool that cannot keep memory still allocates
    return true;
}

/* A tuning knob from the environment: the decimal value of `name` when it is set to one in
 * [lo, hi], else `dflt`. */
static inline long kvc_cuda_knob(const char *name, long lo, long hi, long dflt)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return dflt;
    char *end = NULL;
    long x = strtol(v, &end, 10);
    return *end == '\0' && x >= lo && x <= hi ? x : dflt;
}

/* Layers of at most this many (kv head, token) items take the one-launch forms of the scoring
 * tail, the optimizer and the layout (score_tail_small_kernel, opt_small_kernel,
 * plan_small_kernel), each within its own limit. Measured on an H200
 * (bench/results/gpu-h200.md, Round 6): at 384 items (SmolLM2, 128 tokens) the one-block forms
 * take about the time of the kernels they replace; at 1024 (Llama-3-8B, 128 tokens) one block
 * does the work of many and the layer's encode took 83 us longer. FERRY_CODEC_ONE_LAUNCH=N
 * sets the bound (0: never), to time the forms side by side; it is read once per process
 * (every layer asks). */
#define KVC_ONE_LAUNCH_ITEMS 512
static inline size_t kvc_cuda_one_launch_items(void)
{
    static const size_t bound =
        (size_t)kvc_cuda_knob("FERRY_CODEC_ONE_LAUNCH", 0, 1L << 30, KVC_ONE_LAUNCH_ITEMS);
    return bound;
}

static inline cudaError_t kvc_cuda_scratch_alloc(void **p, size_t n, cudaStream_t s, bool pools)
{
    return pools ? cudaMallocAsync(p, n, s) : cudaMalloc(p, n);
}

static inline cudaError_t kvc_cuda_scratch_free(void *p, cudaStream_t s, bool pools)
{
    if (pools)
        return cudaFreeAsync(p, s);
    cudaError_t e = cudaStreamSynchronize(s), f = cudaFree(p);
    return e != cudaSuccess ? e : f;
}

/* Grid size for n work items of `per_block` each, at least 1, clamped to the x limit (kernels
 * loop with a grid stride over what a clamped grid leaves). */
static inline unsigned kvc_grid(size_t n, unsigned per_block)
{
    size_t b = (n + per_block - 1) / per_block;
    if (b == 0)
        b = 1;
    return (unsigned)(b > 0x7fffffffu ? 0x7fffffffu : b);
}

#ifdef __CUDACC__

static __device__ __forceinline__ float kadd(float a, float b)
{
    return __fadd_rn(a, b);
}
static __device__ __forceinline__ float ksub(float a, float b)
{
    return __fsub_rn(a, b);
}
static __device__ __forceinline__ float kmul(float a, float b)
{
    return __fmul_rn(a, b);
}
static __device__ __forceinline__ float kdiv(float a, float b)
{
    return __fdiv_rn(a, b);
}

#include "quant_dev_int.h"

#endif /* __CUDACC__ */

#endif /* FERRY_KVCODEC_CUDA_INT_H */
