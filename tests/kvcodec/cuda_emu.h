// CUDA on host threads, for tests that run device code without a GPU: the names a kernel body
// uses (threadIdx, blockIdx, blockDim, gridDim, __syncthreads, cg::grid_group::sync, warp
// shuffles and votes, atomics, the rounded arithmetic intrinsics, funnel shifts, cp.async copies,
// done at once) and emu_launch, which runs a grid's threads (one- or two-dimensional) as pthreads.
// Each barrier is a pthread barrier: the block's, the grid's, or a warp's, through which a warp's
// shuffles and votes exchange their values, so the threads of a warp must call the same intrinsics
// in the same order (as convergent CUDA code does). Shared memory is the caller's: a kernel body
// takes its block's shared arrays as arguments. Compile the test without floating-point contraction
// (-ffp-contract=off), as the device code's roundings assume.
#ifndef FERRY_TESTS_KVCODEC_CUDA_EMU_H
#define FERRY_TESTS_KVCODEC_CUDA_EMU_H

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <vector>

#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__    __attribute__((noinline))

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w)
{
    return {x, y, z, w};
}
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w)
{
    return {x, y, z, w};
}

struct emu_idx {
    unsigned x, y, z;
};
static thread_local emu_idx threadIdx, blockIdx;
static emu_idx blockDim, gridDim;

struct emu_state {
    pthread_barrier_t grid;
    std::vector<pthread_barrier_t> block, warp;
    std::vector<uint64_t> xs; // [warps][2][32]: each warp's exchange, double-buffered
    std::vector<uint32_t> xw; // [warps][2][32][EMU_XW]: the same for warp_gather
};
#define EMU_XW 8 // words a lane publishes in one warp_gather
static emu_state g_emu;
static thread_local int t_phase;

static inline unsigned emu_block()
{
    return blockIdx.y * gridDim.x + blockIdx.x;
}
static inline unsigned emu_warp()
{
    return emu_block() * (blockDim.x / 32) + threadIdx.x / 32;
}

// Every lane of the warp publishes v; each gets lane src's. One barrier: a lane writes the
// other buffer next time, and reads of this one are done before anyone passes the next barrier.
static inline uint64_t warp_xchg(uint64_t v, unsigned src)
{
    const unsigned w = emu_warp(), lane = threadIdx.x % 32;
    uint64_t *x = g_emu.xs.data() + ((size_t)w * 2 + (size_t)t_phase) * 32;
    x[lane] = v;
    pthread_barrier_wait(&g_emu.warp[w]);
    const uint64_t r = x[src % 32];
    t_phase ^= 1;
    return r;
}

// Every lane of the warp publishes n (<= EMU_XW) words; all[l][i] gets lane l's word i. One
// barrier, as warp_xchg (the phases alternate per lane whichever of the two a call uses).
static inline void warp_gather(const uint32_t *mine, unsigned n, uint32_t (*all)[EMU_XW])
{
    const unsigned w = emu_warp(), lane = threadIdx.x % 32;
    uint32_t *x = g_emu.xw.data() + ((size_t)w * 2 + (size_t)t_phase) * 32 * EMU_XW;
    memcpy(x + (size_t)lane * EMU_XW, mine, n * sizeof(uint32_t));
    pthread_barrier_wait(&g_emu.warp[w]);
    for (unsigned l = 0; l < 32; l++)
        memcpy(all[l], x + (size_t)l * EMU_XW, n * sizeof(uint32_t));
    t_phase ^= 1;
}

template <typename T> static uint64_t to_bits(T v)
{
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    return b;
}
template <typename T> static T from_bits(uint64_t b)
{
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
}

template <typename T> static T __shfl_sync(unsigned, T v, int src, int width = 32)
{
    const unsigned lane = threadIdx.x % 32, base = lane & ~(unsigned)(width - 1);
    return from_bits<T>(warp_xchg(to_bits(v), base + ((unsigned)src & (unsigned)(width - 1))));
}
template <typename T> static T __shfl_xor_sync(unsigned, T v, int m, int width = 32)
{
    (void)width;
    return from_bits<T>(warp_xchg(to_bits(v), (threadIdx.x % 32) ^ (unsigned)m));
}
static inline unsigned __ballot_sync(unsigned, bool p)
{
    // All 32 predicates in one exchange (one warp_xchg per lane read would be 32 barriers).
    const uint32_t mine = p ? 1u : 0u;
    uint32_t all[32][EMU_XW];
    warp_gather(&mine, 1, all);
    unsigned m = 0;
    for (unsigned l = 0; l < 32; l++)
        m |= (all[l][0] & 1u) << l;
    return m;
}
static inline bool __all_sync(unsigned mask, bool p)
{
    return __ballot_sync(mask, p) == 0xffffffffu;
}
static inline bool __any_sync(unsigned mask, bool p)
{
    return __ballot_sync(mask, p) != 0;
}
template <typename T> static T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32)
{
    const unsigned lane = threadIdx.x % 32, seg = lane & (unsigned)(width - 1);
    const T r = from_bits<T>(warp_xchg(to_bits(v), seg >= delta ? lane - delta : lane));
    return r;
}
template <typename T> static T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32)
{
    const unsigned lane = threadIdx.x % 32, seg = lane & (unsigned)(width - 1);
    return from_bits<T>(warp_xchg(to_bits(v), seg + delta < (unsigned)width ? lane + delta : lane));
}
static inline void __syncwarp(unsigned = 0xffffffffu)
{
    pthread_barrier_wait(&g_emu.warp[emu_warp()]);
}
static inline void __syncthreads()
{
    pthread_barrier_wait(&g_emu.block[emu_block()]);
}
namespace cg
{
struct grid_group {
    void sync()
    {
        pthread_barrier_wait(&g_emu.grid);
    }
};
} // namespace cg

static inline unsigned atomicAdd(unsigned *p, unsigned v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
template <typename T> static T __ldcg(const T *p)
{
    T v;
    __atomic_load(p, &v, __ATOMIC_RELAXED);
    return v;
}
static inline void __threadfence()
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline int __popc(unsigned x)
{
    return __builtin_popcount(x);
}
static inline int __ffs(int x)
{
    return __builtin_ffs(x);
}
static inline unsigned atomicOr(unsigned *p, unsigned v)
{
    return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
static inline unsigned __float_as_uint(float x)
{
    unsigned u;
    memcpy(&u, &x, sizeof u);
    return u;
}
static inline float __uint_as_float(unsigned u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
// Byte i of the result is byte (s >> 4 i) & 7 of the 8 bytes y:x (the selector's low 3 bits of
// each of its low 4 nibbles, as CUDA documents it).
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++)
        r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}
// (glibc declares an __expf it does not export.)
#define __expf(x) expf(x)
template <typename T> static T __ldg(const T *p)
{
    return *p;
}
// The low word of (hi:lo) >> (shift & 31).
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift)
{
    return (unsigned)((((unsigned long long)hi << 32) | lo) >> (shift & 31u));
}
// cp.async: the copy is done when issued, so commit and wait have nothing left to do.
static inline void __pipeline_memcpy_async(void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
}
static inline void __pipeline_commit() {}
static inline void __pipeline_wait_prior(size_t) {}
template <typename T> static T max(T a, T b)
{
    return a < b ? b : a;
}
// The tests' random inputs: xorshift64, one step of *state (never 0); reproducible by seed.
static inline uint64_t emu_xorshift(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

template <typename T> static T min(T a, T b)
{
    return b < a ? b : a;
}
// Rounded once each (the test is built without contraction).
static inline float kadd(float a, float b)
{
    return a + b;
}
static inline float ksub(float a, float b)
{
    return a - b;
}
static inline float kmul(float a, float b)
{
    return a * b;
}
static inline float kdiv(float a, float b)
{
    return a / b;
}
static inline float __fdiv_rn(float a, float b)
{
    return a / b;
}
static inline float __fmaf_rn(float a, float b, float c)
{
    return fmaf(a, b, c);
}
static inline float __fsqrt_rn(float a)
{
    return sqrtf(a);
}
static inline double __dadd_rn(double a, double b)
{
    return a + b;
}
static inline double __dsub_rn(double a, double b)
{
    return a - b;
}
static inline double __dmul_rn(double a, double b)
{
    return a * b;
}
static inline double __ddiv_rn(double a, double b)
{
    return a / b;
}
static inline double __ull2double_rn(unsigned long long x)
{
    return (double)x;
}

// Runs fn on a grid of gx x gy blocks of `threads` host threads: all at once (the grid barrier
// needs every thread of the grid resident, as a cooperative launch does), or with `one_by_one`
// one block after another (kernels without a grid barrier; fewer threads at a time).
static inline void emu_launch_2d(unsigned gx, unsigned gy, unsigned threads,
                                 const std::function<void()> &fn, bool one_by_one = false)
{
    const unsigned blocks = gx * gy;
    blockDim = {threads, 1, 1};
    gridDim = {gx, gy, 1};
    const unsigned warps = blocks * threads / 32;
    g_emu.block.resize(blocks);
    g_emu.warp.resize(warps);
    g_emu.xs.assign((size_t)warps * 2 * 32, 0);
    g_emu.xw.assign((size_t)warps * 2 * 32 * EMU_XW, 0);
    pthread_barrier_init(&g_emu.grid, NULL, one_by_one ? threads : blocks * threads);
    for (auto &b : g_emu.block)
        pthread_barrier_init(&b, NULL, threads);
    for (auto &w : g_emu.warp)
        pthread_barrier_init(&w, NULL, 32);
    struct arg_t {
        unsigned b, t;
        const std::function<void()> *fn;
    };
    std::vector<arg_t> args(blocks * threads);
    std::vector<pthread_t> tids(blocks * threads);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    const unsigned wave = one_by_one ? threads : blocks * threads; // threads started together
    for (unsigned i0 = 0; i0 < blocks * threads; i0 += wave) {
        for (unsigned i = i0; i < i0 + wave; i++) {
            args[i] = {i / threads, i % threads, &fn};
            int rc = pthread_create(
                &tids[i], &attr,
                [](void *p) -> void * {
                    const arg_t *a = (const arg_t *)p;
                    blockIdx = {a->b % gridDim.x, a->b / gridDim.x, 0};
                    threadIdx = {a->t, 0, 0};
                    t_phase = 0;
                    (*a->fn)();
                    return NULL;
                },
                &args[i]);
            assert_int_equal(rc, 0);
        }
        for (unsigned i = i0; i < i0 + wave; i++)
            pthread_join(tids[i], NULL);
    }
    pthread_attr_destroy(&attr);
    pthread_barrier_destroy(&g_emu.grid);
    for (auto &b : g_emu.block)
        pthread_barrier_destroy(&b);
    for (auto &w : g_emu.warp)
        pthread_barrier_destroy(&w);
}

static inline void emu_launch(unsigned blocks, unsigned threads, const std::function<void()> &fn,
                              bool one_by_one = false)
{
    emu_launch_2d(blocks, 1, threads, fn, one_by_one);
}

#endif
