/*
 * attend.cu: decode attention over compressed KV pages on the GPU, the twin of kvc_attend in
 * attend.c (the reference it is tested against, tests/kvcodec/test_attend_cuda.c).
 *
 * Two kernels do the per-split work (kvc_attend_batch_t.impl, FERRY_ATTEND_IMPL): the tensor-core
 * one (attend_mma_kernel, below the SIMT one; head_dim 64 and 128, GQA groups up to 4; the
 * default wherever it applies) and the SIMT one described here, which takes every shape.
 *
 * Flash-decoding. Kernel 1 runs one thread block per (page list, split): the list's pages are
 * cut into n_splits contiguous ranges. For each page the block reads the 16-byte header on the
 * device (fetched one page ahead), copies the used part of the page into shared memory with
 * 16-byte asynchronous copies, and then
 *   1. logits: LPT lanes share one token, each lane holds CPT channels. For a quantized slot the
 *      lane pre-scales its query channels once (q * kscale, and sum q * kzero), as attend.c
 *      does, so a token costs one FMA per channel and row on its codes; F16 keys are dotted
 *      with q directly; a butterfly of warp shuffles sums the lanes;
 *   2. online softmax per row over a chunk of up to kChunk tokens (running max m, sum l);
 *   3. values: each lane dequantizes the same CPT channels of the value rows in registers and
 *      accumulates p * v; token lanes keep separate partial sums, added at the end.
 * Rotated pages (Hadamard-coded 4/4, 4/2, 2/2) use H q for the logits and a separate
 * accumulator, exactly as attend.c does: the block attends its plain pages in a first pass and
 * its rotated pages in a second (page order does not matter), so only one accumulator lives in
 * registers. MixKVQ protected channels take their 8-bit code from the group's pcodes block.
 * Kernel 2 combines the splits' partial results of each list (each scaled to its own running
 * max), applies H to the rotated sum once, divides by the softmax sum and writes the rows.
 *
 * Geometry and the page layout are those of docs/kvcodec-format.md §3; the slot sizes are
 * computed the way pool.c computes them (kvc_group_bytes rounded up to 16).
 *
 * The kernels' bodies, everything they call and the host arithmetic of their shared memory and
 * workspace are in attend_dev_int.h (also run on host threads by tests/kvcodec/
 * test_attend_emu.cc); here are the kernels themselves, the plan (device queries, splits) and
 * the launches.
 */
#include "kvcodec_cuda.h"
#include "kvcodec_cuda_int.h"

#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "attend_dev_int.h"

namespace
{

/* The kernels: their shared arrays around the bodies of attend_dev_int.h. FUSE: the split
 * kernel combines each list itself (FERRY_ATTEND_FUSE=1; instances for head_dim up to 256 and
 * the tensor-core kernel's default register cap), so that the default instances compile as
 * they did without it. */
template <int NQ, int CPT, bool FUSE = false>
__global__ void __launch_bounds__(kThreads, min_blocks(NQ, CPT)) attend_split_kernel(attn_params A)
{
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float s_m[NQ], s_l[NQ], s_alpha[NQ], s_red[kThreads / 32];
    attend_split_body<NQ, CPT, FUSE>(A, smem, s_m, s_l, s_alpha, s_red);
}

__global__ void __launch_bounds__(kCombThreads) attend_combine_kernel(attn_params A, uint32_t rows)
{
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float red[kCombThreads / 32];
    attend_combine_body(A, rows, smem, red);
}

/* MINB: resident blocks per SM the registers are capped for. 3 (168 registers at D 128, no
 * spills) is the default; 4 (128 registers, a few spills) is FERRY_ATTEND_BLOCKS=4, for pages
 * small enough that shared memory lets 4 blocks in (16 KiB pages: ~44 KB per block). */
template <int D, int MINB, bool WIDE = false, bool FUSE = false>
__global__ void __launch_bounds__(kMmaThreads, MINB) attend_mma_kernel(attn_params A)
{
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float s_red[kMmaThreads / 32];
    attend_mma_body<D, WIDE, FUSE>(A, smem, s_red);
}

/* Everything the host derives from the pool, the batch shape and the device. */
struct plan {
    attend_geom g; // shared memory layouts (attend_shape)
    attend_ws ws;  // the workspace and the combine kernel's shared memory (attend_ws_plan)
    uint32_t n_splits;
    bool pdl;  // the combine kernel by programmatic dependent launch (pdl_wanted)
    bool fuse; // no combine kernel: the split kernel combines (fuse_wanted, its FUSE instance)
    void (*kernel)(attn_params); // kernel 1 for rows and cpt
    bool mma;                    // the tensor-core kernel runs instead (attend_mma_kernel)
    bool kdq;                    // ... with keys dequantized in registers (attn_params.kdq)
    bool wide;                   // ... its wide instance (KVC_ATTEND_IMPL_MMA_WIDE)
    void (*mma_kernel)(attn_params);
};

typedef void (*split_kernel_t)(attn_params);

/* The instance of kernel 1 for a GQA group size (1..8) and channels per lane (8 or 16), fused
 * (8 channels a lane only). */
split_kernel_t split_kernel(uint32_t rows, uint32_t cpt, bool fuse)
{
#define KVC_SPLIT_CASE(n)                                                                          \
    case n:                                                                                        \
        return cpt == 8 ? (fuse ? attend_split_kernel<n, 8, true> : attend_split_kernel<n, 8>)     \
                        : attend_split_kernel<n, 16>;
    switch (rows) {
        KVC_SPLIT_CASE(1)
        KVC_SPLIT_CASE(2)
        KVC_SPLIT_CASE(3)
        KVC_SPLIT_CASE(4)
        KVC_SPLIT_CASE(5)
        KVC_SPLIT_CASE(6)
        KVC_SPLIT_CASE(7)
        KVC_SPLIT_CASE(8)
    default:
        return NULL;
    }
#undef KVC_SPLIT_CASE
}

/* Splits per list: blocks = items x splits should fill whole waves of resident blocks
 * (`resident` over the GPU), else short lists leave most SMs idle in the last wave. The fewest
 * splits whose waves are >= 90% full (one wave 90% full is better than two full ones: each
 * block pays its pipeline's start once, and the combine reads half as many partials), trying
 * up to four waves; never more splits than pages. */
uint32_t choose_splits(uint64_t items, uint64_t resident, uint32_t max_list_pages)
{
    uint64_t cap = max_list_pages > 0 ? max_list_pages : 1;
    cap = cap < kMaxSplits ? cap : kMaxSplits;
    uint64_t best = 1;
    double best_eff = 0;
    for (uint64_t s = 1; s <= cap; s++) {
        const uint64_t blocks = items * s;
        const uint64_t waves = (blocks + resident - 1) / resident;
        const double eff = (double)blocks / (double)(waves * resident);
        if (eff >= 0.9)
            return (uint32_t)s;
        if (eff > best_eff + 1e-9 && waves <= 4) {
            best = s;
            best_eff = eff;
        }
        if (waves > 4)
            break;
    }
    return (uint32_t)best;
}

/* What the plan asks of the runtime, asked once: the device's SM count and opt-in shared memory,
 * and per (device, kernel, dynamic shared memory) the attribute raised to it and the resident
 * blocks per SM. Each query costs microseconds of host time (the occupancy one most) and a
 * decode step plans attention once per layer, so the answers are remembered (a few entries:
 * one per kernel instance and page size in use). */
struct dev_info {
    int dev, sms, optin, major;
};
struct occ_info {
    int dev;
    const void *fn;
    size_t smem;
    int per_sm;
};
struct attr_info {
    int dev;
    const void *fn;
    size_t smem_max; // the attribute as last raised
};
constexpr int kCache = 64;
pthread_mutex_t g_cache_lock = PTHREAD_MUTEX_INITIALIZER;
dev_info g_dev[kCache];
occ_info g_occ[kCache];
attr_info g_attr[kCache];
int g_n_dev, g_n_occ, g_n_attr;

fy_status_t device_info(int *dev_p, int *sms_p, int *optin_p, int *major_p)
{
    int dev = 0;
    fy_status_t st = kvc_cuda_status(cudaGetDevice(&dev));
    if (st != FY_OK)
        return st;
    pthread_mutex_lock(&g_cache_lock);
    for (int i = 0; i < g_n_dev; i++)
        if (g_dev[i].dev == dev) {
            *dev_p = dev, *sms_p = g_dev[i].sms, *optin_p = g_dev[i].optin;
            *major_p = g_dev[i].major;
            pthread_mutex_unlock(&g_cache_lock);
            return FY_OK;
        }
    int sms = 0, optin = 0, major = 0;
    st = kvc_cuda_status(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (st == FY_OK)
        st = kvc_cuda_status(
            cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (st == FY_OK)
        st = kvc_cuda_status(
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (st == FY_OK && g_n_dev < kCache)
        g_dev[g_n_dev++] = dev_info{dev, sms, optin, major};
    pthread_mutex_unlock(&g_cache_lock);
    *dev_p = dev, *sms_p = sms, *optin_p = optin, *major_p = major;
    return st;
}

/* Raises fn's dynamic shared memory limit to at least smem on dev (never lowers it: another
 * plan may launch fn with more). Call with g_cache_lock held. */
fy_status_t raise_smem_locked(int dev, const void *fn, size_t smem)
{
    int i = 0;
    while (i < g_n_attr && !(g_attr[i].dev == dev && g_attr[i].fn == fn))
        i++;
    if (i < g_n_attr && g_attr[i].smem_max >= smem)
        return FY_OK;
    fy_status_t st = kvc_cuda_status(
        cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (st != FY_OK)
        return st;
    if (i < g_n_attr)
        g_attr[i].smem_max = smem;
    else if (g_n_attr < kCache)
        g_attr[g_n_attr++] = attr_info{dev, fn, smem};
    return FY_OK;
}

fy_status_t raise_smem(int dev, const void *fn, size_t smem)
{
    pthread_mutex_lock(&g_cache_lock);
    fy_status_t st = raise_smem_locked(dev, fn, smem);
    pthread_mutex_unlock(&g_cache_lock);
    return st;
}

/* Resident blocks per SM of fn with `threads` threads and smem bytes of dynamic shared memory
 * (its limit raised first). */
fy_status_t kernel_occupancy(int dev, const void *fn, int threads, size_t smem, int *per_sm_p)
{
    pthread_mutex_lock(&g_cache_lock);
    for (int i = 0; i < g_n_occ; i++)
        if (g_occ[i].dev == dev && g_occ[i].fn == fn && g_occ[i].smem == smem) {
            *per_sm_p = g_occ[i].per_sm;
            pthread_mutex_unlock(&g_cache_lock);
            return FY_OK;
        }
    int per_sm = 0;
    fy_status_t st = raise_smem_locked(dev, fn, smem);
    if (st == FY_OK)
        st = kvc_cuda_status(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, smem));
    if (st == FY_OK && g_n_occ < kCache)
        g_occ[g_n_occ++] = occ_info{dev, fn, smem, per_sm};
    pthread_mutex_unlock(&g_cache_lock);
    *per_sm_p = per_sm;
    return st;
}

/* The instance of the tensor-core kernel for head_dim d (64 or 128): the wide one, or the one
 * for the register cap FERRY_ATTEND_BLOCKS asks for (see attend_mma_kernel); fused ones at the
 * default cap. */
split_kernel_t mma_kernel(uint32_t d, bool wide, bool fuse)
{
    if (wide && fuse)
        return d == 64 ? attend_mma_kernel<64, 3, true, true>
                       : attend_mma_kernel<128, 3, true, true>;
    if (wide)
        return d == 64 ? attend_mma_kernel<64, 3, true> : attend_mma_kernel<128, 3, true>;
    if (fuse)
        return d == 64 ? attend_mma_kernel<64, 3, false, true>
                       : attend_mma_kernel<128, 3, false, true>;
    const char *e = getenv("FERRY_ATTEND_BLOCKS");
    const bool four = e != NULL && strcmp(e, "4") == 0;
    if (d == 64)
        return four ? attend_mma_kernel<64, 4> : attend_mma_kernel<64, 3>;
    return four ? attend_mma_kernel<128, 4> : attend_mma_kernel<128, 3>;
}

/* Whether the combine kernel is launched programmatically dependent on the split kernel (its
 * launch overlaps the split kernel's run, pdl_trigger/pdl_wait): on GPUs of compute capability
 * 9.0 and later, unless FERRY_ATTEND_PDL=0, and until such a launch is refused (then plain
 * launches from then on). */
int g_pdl_refused; // set once a programmatic launch failed

bool pdl_wanted(int major)
{
    if (major < 9 || __atomic_load_n(&g_pdl_refused, __ATOMIC_RELAXED))
        return false;
    const char *e = getenv("FERRY_ATTEND_PDL");
    return e == NULL || strcmp(e, "0") != 0;
}

/* Whether the split kernel combines each list's splits itself (its last block to finish, see
 * attend_fused_combine) instead of a combine kernel: FERRY_ATTEND_FUSE=1. */
bool fuse_wanted()
{
    const char *e = getenv("FERRY_ATTEND_FUSE");
    return e != NULL && strcmp(e, "1") == 0;
}

/* The kernel a batch asks for: its impl field, else FERRY_ATTEND_IMPL ("simt", "mma",
 * "mma-qtab" or "mma-wide"), else the tensor-core kernel wherever it applies. */
uint32_t attend_impl(const kvc_attend_batch_t *bt)
{
    if (bt->impl != KVC_ATTEND_IMPL_AUTO)
        return bt->impl; // make_plan refused values out of range
    const char *e = getenv("FERRY_ATTEND_IMPL");
    if (e != NULL && strcmp(e, "simt") == 0)
        return KVC_ATTEND_IMPL_SIMT;
    if (e != NULL && strcmp(e, "mma-qtab") == 0)
        return KVC_ATTEND_IMPL_MMA_QTAB;
    if (e != NULL && strcmp(e, "mma-wide") == 0)
        return KVC_ATTEND_IMPL_MMA_WIDE;
    return KVC_ATTEND_IMPL_MMA;
}

fy_status_t make_plan(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *bt, plan *pl)
{
    fy_status_t st = attend_shape(pool, bt, &pl->g);
    if (st != FY_OK)
        return st;
    const attend_geom &g = pl->g;
    int dev = 0, sms = 0, optin = 0, major = 0;
    st = device_info(&dev, &sms, &optin, &major);
    if (st != FY_OK)
        return st;
    pl->pdl = pdl_wanted(major);
    // Leave room for the kernels' static shared memory (a few hundred bytes).
    if (g.smem_split + 1024 > (size_t)optin)
        return FY_ERR_UNSUPPORTED; // pages too large to stage in shared memory
    // FERRY_ATTEND_FUSE=1: the kernels' fused instances, where there is one and the combine fits
    // in the kernel's own shared memory (free by then) at any number of splits.
    const bool fuse = fuse_wanted();
    const bool fuse_split =
        fuse && g.cpt == 8 &&
        combine_smem_floats(kMaxSplits, g.d, kThreads) * sizeof(float) <= g.smem_split;
    const bool fuse_mma =
        fuse && g.mma_shape &&
        combine_smem_floats(kMaxSplits, g.d, kMmaThreads) * sizeof(float) <= g.smem_mma;
    pl->kernel = split_kernel(g.rows, g.cpt, fuse_split);
    if (pl->kernel == NULL)
        return FY_ERR_UNSUPPORTED;
    int per_sm = 0;
    st = kernel_occupancy(dev, (const void *)pl->kernel, kThreads, g.smem_split, &per_sm);
    if (st != FY_OK)
        return st;
    const uint64_t items = g.n_items;
    const uint64_t resident = (uint64_t)(sms > 0 ? sms : 1) * (uint64_t)(per_sm > 0 ? per_sm : 1);
    pl->n_splits = choose_splits(items, resident, bt->max_list_pages);
    uint32_t max_splits = pl->n_splits; // the workspace fits either kernel's split

    // The tensor-core kernel: head_dim 64 or 128, GQA groups up to 4, its shared memory.
    const uint32_t impl = attend_impl(bt);
    pl->mma = false;
    pl->kdq = false;
    pl->wide = false;
    pl->mma_kernel = mma_kernel(g.d, impl == KVC_ATTEND_IMPL_MMA_WIDE, fuse_mma);
    if (g.mma_shape) {
        int mper = 0;
        if (g.smem_mma + 1024 <= (size_t)optin) {
            st =
                kernel_occupancy(dev, (const void *)pl->mma_kernel, kMmaThreads, g.smem_mma, &mper);
            if (st != FY_OK)
                return st;
        }
        if (mper > 0) {
            const uint64_t mres = (uint64_t)(sms > 0 ? sms : 1) * (uint64_t)mper;
            const uint32_t ms = choose_splits(items, mres, bt->max_list_pages);
            max_splits = ms > max_splits ? ms : max_splits;
            if (impl != KVC_ATTEND_IMPL_SIMT) {
                pl->mma = true;
                pl->kdq = impl != KVC_ATTEND_IMPL_MMA_QTAB;
                pl->wide = impl == KVC_ATTEND_IMPL_MMA_WIDE;
                pl->n_splits = ms;
            }
        }
    }

    attend_ws_plan(g, max_splits, &pl->ws);
    if (pl->ws.smem_combine + 1024 > (size_t)optin)
        return FY_ERR_UNSUPPORTED;
    pl->fuse = pl->mma ? fuse_mma : fuse_split;
    return FY_OK;
}

} // namespace

extern "C" void kvc_gpu_pool_view(const kvc_gpu_pool_t *pool, kvc_gpu_pages_t *view_p)
{
    view_p->base = kvc_gpu_pool_base(pool);
    view_p->page_bytes = kvc_gpu_pool_page_bytes(pool);
    view_p->n_pages = kvc_gpu_pool_n_pages(pool);
    view_p->head_dim = kvc_gpu_pool_head_dim(pool);
    view_p->group = kvc_gpu_pool_group(pool);
    view_p->protect = kvc_gpu_pool_protect(pool);
}

/* What make_plan says of a pool and batch: the workspace bytes or the kernel (either may be NULL).
 */
static fy_status_t plan_query(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *batch,
                              size_t *bytes_p, uint32_t *impl_p)
{
    plan pl;
    fy_status_t st = make_plan(pool, batch, &pl);
    if (st != FY_OK)
        return st;
    if (bytes_p != NULL)
        *bytes_p = pl.ws.bytes;
    if (impl_p != NULL)
        *impl_p = !pl.mma   ? KVC_ATTEND_IMPL_SIMT
                  : pl.wide ? KVC_ATTEND_IMPL_MMA_WIDE
                  : pl.kdq  ? KVC_ATTEND_IMPL_MMA
                            : KVC_ATTEND_IMPL_MMA_QTAB;
    return FY_OK;
}

extern "C" fy_status_t kvc_attend_batch_cuda_workspace(const kvc_gpu_pages_t *pool,
                                                       const kvc_attend_batch_t *batch,
                                                       size_t *bytes_p)
{
    return bytes_p == NULL ? FY_ERR_INVALID_ARG : plan_query(pool, batch, bytes_p, NULL);
}

extern "C" fy_status_t kvc_attend_batch_cuda_impl(const kvc_gpu_pages_t *pool,
                                                  const kvc_attend_batch_t *batch, uint32_t *impl_p)
{
    return impl_p == NULL ? FY_ERR_INVALID_ARG : plan_query(pool, batch, NULL, impl_p);
}

extern "C" fy_status_t kvc_attend_batch_cuda(const kvc_gpu_pages_t *pool,
                                             const kvc_attend_batch_t *batch, const float *q,
                                             float scale, float *out, void *workspace,
                                             size_t workspace_bytes, void *stream)
{
    plan pl;
    fy_status_t st = make_plan(pool, batch, &pl);
    if (st != FY_OK)
        return st;
    if (pool->base == NULL || ((uintptr_t)pool->base & 15) || batch->list_start == NULL ||
        batch->page_ids == NULL || q == NULL || out == NULL || workspace == NULL ||
        ((uintptr_t)workspace & (kWsAlign - 1)) || workspace_bytes < pl.ws.bytes)
        return FY_ERR_INVALID_ARG;
    const attn_params A = attend_params(pl.g, pl.ws, pool, batch, pl.n_splits, pl.kdq, q, scale,
                                        out, static_cast<uint8_t *>(workspace));
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    st = kvc_cuda_status(cudaMemsetAsync(workspace, 0, pl.ws.zero_bytes, s));
    if (st != FY_OK)
        return st;
    dim3 grid(pl.n_splits, pl.g.n_items);
    // Shared memory sizes were set on both kernels by make_plan.
    if (pl.mma)
        pl.mma_kernel<<<grid, kMmaThreads, pl.g.smem_mma, s>>>(A);
    else
        pl.kernel<<<grid, kThreads, pl.g.smem_split, s>>>(A);
    st = kvc_cuda_status(cudaGetLastError());
    if (st != FY_OK || pl.fuse)
        return st;
    if (pl.ws.smem_combine > 48 * 1024) {
        int dev = 0;
        st = kvc_cuda_status(cudaGetDevice(&dev));
        if (st == FY_OK)
            st = raise_smem(dev, (const void *)attend_combine_kernel, pl.ws.smem_combine);
        if (st != FY_OK)
            return st;
    }
    const dim3 cgrid(pl.g.n_items, pl.g.rows);
    if (pl.pdl) {
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = cgrid;
        cfg.blockDim = dim3(kCombThreads);
        cfg.dynamicSmemBytes = pl.ws.smem_combine;
        cfg.stream = s;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        if (cudaLaunchKernelEx(&cfg, attend_combine_kernel, A, pl.g.rows) == cudaSuccess)
            return FY_OK;
        // Refused (not launched): clear the error and launch plainly, now and from now on. A
        // sticky error from earlier work fails the plain launch too and is returned there.
        (void)cudaGetLastError();
        __atomic_store_n(&g_pdl_refused, 1, __ATOMIC_RELAXED);
    }
    attend_combine_kernel<<<cgrid, kCombThreads, pl.ws.smem_combine, s>>>(A, pl.g.rows);
    return kvc_cuda_status(cudaGetLastError());
}

extern "C" fy_status_t kvc_attend_batch_cuda_bad_pages(const void *workspace, void *stream,
                                                       uint32_t *n_bad_p)
{
    if (workspace == NULL || n_bad_p == NULL)
        return FY_ERR_INVALID_ARG;
    uint32_t n = 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    fy_status_t st =
        kvc_cuda_status(cudaMemcpyAsync(&n, workspace, sizeof(n), cudaMemcpyDeviceToHost, s));
    if (st == FY_OK)
        st = kvc_cuda_status(cudaStreamSynchronize(s));
    if (st != FY_OK)
        return st;
    *n_bad_p = n;
    return FY_OK;
}
