// The decode attention kernels (kvcodec/attend_dev_int.h: the SIMT split kernel, the tensor-core
// kernel in its three forms, and the combine kernel) run on host threads (tests/kvcodec/
// cuda_emu.h) over pages the CPU built (attend_cases.h) must match kvc_attend as the GPU parity
// test asks (test_attend_cuda.c, whose cases these are): every option, rotated and unrotated
// pages, MixKVQ protected channels, GQA groups of 1 to 8, head_dim 64 and 128 (and 72, 256 and
// 512 for the SIMT kernel's other lane layouts), groups of 8 to 64 tokens, empty lists, one split
// per list and several, and page ids past the pool (skipped and counted). The tensor-core
// instructions are emulated from their PTX definitions: mma.sync m16n8k16 by its fragment
// layout (each lane's A, B and C registers at the rows and columns the ISA gives them), the
// FP16x2 arithmetic rounded once to FP16. What runs on a GPU and not here: the hardware's own
// accumulation order inside an MMA, and the timing of the asynchronous copies (done at once
// here), which test_attend_cuda covers on a GPU.
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

extern "C" {
#include <cmocka.h>

#include "../../kvcodec/kvcodec_cuda.h"
}

#include "attend_cases.h"
#include "cuda_emu.h"

// FP16 as cuda_fp16.h has it: common/half.c's conversions (round to nearest even).
struct __half {
    uint16_t x;
};
struct __half2 {
    __half x, y; // x in the low 16 bits
};
static inline float __half2float(__half h)
{
    return fy_fp16_to_fp32(h.x);
}
static inline __half __ushort_as_half(unsigned short u)
{
    return {u};
}
static inline __half __float2half_rn(float f)
{
    return {fy_fp32_to_fp16(f)};
}
static inline __half2 __floats2half2_rn(float lo, float hi)
{
    return {{fy_fp32_to_fp16(lo)}, {fy_fp32_to_fp16(hi)}};
}

static inline float half_at(uint32_t w, int i) // FP16 i (0 low, 1 high) of a word
{
    return fy_fp16_to_fp32((uint16_t)(w >> (16 * i)));
}

// The functions attend_dev_int.h writes in PTX.

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, D = A B + C for the warp. Lane l (group
// g = l / 4, t = l % 4) holds A[g][2t, 2t+1] in a0, A[g+8][..] in a1, A[g][2t+8, 2t+9] in a2,
// A[g+8][..] in a3; B[2t, 2t+1][g] in b0, B[2t+8, 2t+9][g] in b1; and C, D[g][2t], [g][2t+1],
// [g+8][2t], [g+8][2t+1] in c[0..3]. The products are exact; their sum is taken in double.
static void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                     uint32_t b1)
{
    const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
    uint32_t all[32][EMU_XW];
    warp_gather(mine, 6, all);
    auto A = [&](uint32_t m, uint32_t k) {
        const uint32_t l = (m & 7) * 4 + (k & 7) / 2, reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return half_at(all[l][reg], (int)(k & 1));
    };
    auto B = [&](uint32_t k, uint32_t n) {
        const uint32_t l = n * 4 + (k & 7) / 2, reg = 4 + (k >= 8 ? 1 : 0);
        return half_at(all[l][reg], (int)(k & 1));
    };
    const uint32_t lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) {
        const uint32_t m = g + (i >= 2 ? 8 : 0), n = 2 * t + (uint32_t)(i & 1);
        double s = 0;
        for (uint32_t k = 0; k < 16; k++)
            s += (double)A(m, k) * (double)B(k, n);
        c[i] = (float)((double)c[i] + s);
    }
}

static inline uint32_t and_or(uint32_t x, uint32_t mask, uint32_t bits)
{
    return (x & mask) | bits;
}

static inline uint32_t h2_word(float lo, float hi)
{
    return (uint32_t)fy_fp32_to_fp16(lo) | ((uint32_t)fy_fp32_to_fp16(hi) << 16);
}

// sub.f16x2 with 1024 (exact for the codes it is given).
static inline uint32_t sub1024(uint32_t u)
{
    return h2_word(half_at(u, 0) - 1024.0f, half_at(u, 1) - 1024.0f);
}

// fma.rn.f16x2: each half a * b + c (exact in double for these operands), rounded to FP16.
static inline uint32_t hfma2_u(uint32_t a, uint32_t b, uint32_t c)
{
    float r[2];
    for (int i = 0; i < 2; i++)
        r[i] = (float)((double)half_at(a, i) * half_at(b, i) + half_at(c, i));
    return h2_word(r[0], r[1]);
}

static inline uint4 lds128(const void *p)
{
    uint4 u;
    memcpy(&u, p, sizeof u);
    return u;
}

static inline float ex2_approx(float x)
{
    return exp2f(x);
}

static inline void prefetch_l2(const void *) {}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../kvcodec/attend_dev_int.h"
#pragma GCC diagnostic pop

/* The SIMT split body for a GQA group of NQ rows and cpt channels a lane; s4: the block's static
 * shared arrays, s_m, s_l, s_alpha ([NQ] each) and s_red. */
template <int NQ>
static void split_body(const attn_params &A, uint32_t cpt, bool fuse, uint8_t *smem, float *s4)
{
    if (cpt == 8 && fuse)
        attend_split_body<NQ, 8, true>(A, smem, s4, s4 + NQ, s4 + 2 * NQ, s4 + 3 * NQ);
    else if (cpt == 8)
        attend_split_body<NQ, 8>(A, smem, s4, s4 + NQ, s4 + 2 * NQ, s4 + 3 * NQ);
    else
        attend_split_body<NQ, 16>(A, smem, s4, s4 + NQ, s4 + 2 * NQ, s4 + 3 * NQ);
}

static void split_any(const attn_params &A, uint32_t rows, uint32_t cpt, bool fuse, uint8_t *smem,
                      float *s4)
{
    switch (rows) {
    case 1:
        return split_body<1>(A, cpt, fuse, smem, s4);
    case 2:
        return split_body<2>(A, cpt, fuse, smem, s4);
    case 3:
        return split_body<3>(A, cpt, fuse, smem, s4);
    case 4:
        return split_body<4>(A, cpt, fuse, smem, s4);
    case 5:
        return split_body<5>(A, cpt, fuse, smem, s4);
    case 6:
        return split_body<6>(A, cpt, fuse, smem, s4);
    case 7:
        return split_body<7>(A, cpt, fuse, smem, s4);
    default:
        return split_body<8>(A, cpt, fuse, smem, s4);
    }
}

template <bool FUSE>
static void mma_body(const attn_params &A, uint32_t d, bool wide, uint8_t *smem, float *s_red)
{
    if (d == 64)
        wide ? attend_mma_body<64, true, FUSE>(A, smem, s_red)
             : attend_mma_body<64, false, FUSE>(A, smem, s_red);
    else
        wide ? attend_mma_body<128, true, FUSE>(A, smem, s_red)
             : attend_mma_body<128, false, FUSE>(A, smem, s_red);
}

/* Per-block shared memory of a grid, 16-byte aligned, poisoned with NaN bytes (a read before a
 * write shows). */
struct block_smem {
    std::vector<uint8_t> raw;
    size_t per;
    block_smem(size_t blocks, size_t bytes) : raw(blocks * (bytes + 16) + 16, 0xff), per(bytes + 16)
    {
    }
    uint8_t *at(size_t b)
    {
        uintptr_t p = (uintptr_t)raw.data() + b * per;
        return (uint8_t *)((p + 15) & ~(uintptr_t)15);
    }
};

/* Kernel `impl` over every list of B with n_splits splits a list (the SIMT kernel where the
 * tensor-core one does not take the shape, as kvc_attend_batch_cuda_impl says), then the combine
 * kernel, or with `fuse` none (each list's last split combines it): out ([n_seqs][n_heads][d])
 * and the count of pages skipped. Returns the kernel run. */
static uint32_t emu_attend(const kva_built_t *B, const kva_lists_t *L, const float *q, float scale,
                           uint32_t impl, uint32_t n_splits, bool fuse, float *out, uint32_t *n_bad)
{
    kvc_gpu_pages_t gp;
    gp.base = kvc_page_data(B->pool, 0);
    gp.page_bytes = B->page_bytes;
    gp.n_pages = kvc_pool_n_pages(B->pool);
    gp.head_dim = B->d;
    gp.group = B->group;
    gp.protect = B->protect;
    kvc_attend_batch_t bt;
    memset(&bt, 0, sizeof bt);
    bt.batch = B->n_seqs;
    bt.n_heads = B->n_heads;
    bt.n_kv_heads = B->n_kv;
    bt.list_start = L->starts;
    bt.page_ids = L->ids;
    bt.max_list_pages = L->max_list;
    bt.impl = impl;
    attend_geom g;
    assert_int_equal(attend_shape(&gp, &bt, &g), FY_OK);
    const bool mma = impl != KVC_ATTEND_IMPL_SIMT && g.mma_shape;
    attend_ws w;
    attend_ws_plan(g, n_splits, &w);
    std::vector<uint8_t> ws_raw(w.bytes + kWsAlign, 0xff); // NaN: unwritten partials show
    uint8_t *ws =
        (uint8_t *)(((uintptr_t)ws_raw.data() + kWsAlign - 1) & ~(uintptr_t)(kWsAlign - 1));
    memset(ws, 0, w.zero_bytes); // the bad-page and split counters
    const attn_params A = attend_params(g, w, &gp, &bt, n_splits, impl != KVC_ATTEND_IMPL_MMA_QTAB,
                                        q, scale, out, ws);
    fuse = fuse && (mma || g.cpt == 8); // (the kernels' fused instances)
    const size_t blocks = (size_t)n_splits * g.n_items;
    if (mma) {
        block_smem sm(blocks, g.smem_mma);
        std::vector<float> s_red(blocks * (kMmaThreads / 32));
        const bool wide = impl == KVC_ATTEND_IMPL_MMA_WIDE;
        emu_launch_2d(
            n_splits, g.n_items, kMmaThreads,
            [&] {
                const size_t b = emu_block();
                float *red = s_red.data() + b * (kMmaThreads / 32);
                fuse ? mma_body<true>(A, g.d, wide, sm.at(b), red)
                     : mma_body<false>(A, g.d, wide, sm.at(b), red);
            },
            true);
    } else {
        block_smem sm(blocks, g.smem_split);
        const size_t per = 3 * kMaxRows + kThreads / 32;
        std::vector<float> s4(blocks * per);
        emu_launch_2d(
            n_splits, g.n_items, kThreads,
            [&] {
                const size_t b = emu_block();
                split_any(A, g.rows, g.cpt, fuse, sm.at(b), s4.data() + b * per);
            },
            true);
    }
    memcpy(n_bad, ws, sizeof(uint32_t));
    if (fuse) {
        // Every split of every list arrived (and the last one combined the list).
        for (uint32_t i = 0; i < g.n_items; i++)
            assert_int_equal(A.ws_cnt[i], n_splits);
        return !mma ? (uint32_t)KVC_ATTEND_IMPL_SIMT : impl;
    }
    block_smem cs((size_t)g.n_items * g.rows, w.smem_combine);
    std::vector<float> red((size_t)g.n_items * g.rows * (kCombThreads / 32));
    emu_launch_2d(
        g.n_items, g.rows, kCombThreads,
        [&] {
            const size_t b = emu_block();
            attend_combine_body(A, g.rows, cs.at(b), red.data() + b * (kCombThreads / 32));
        },
        true);
    return !mma ? (uint32_t)KVC_ATTEND_IMPL_SIMT : impl;
}

static const char *impl_name(uint32_t impl)
{
    return impl == KVC_ATTEND_IMPL_MMA        ? "mma "
           : impl == KVC_ATTEND_IMPL_MMA_QTAB ? "qtab"
           : impl == KVC_ATTEND_IMPL_MMA_WIDE ? "wide"
                                              : "simt";
}

/* One kernel over the built pages against kvc_attend. */
static void run_and_compare(const kva_built_t *B, uint32_t extra_bad, uint32_t n_splits,
                            uint32_t impl, bool fuse = false)
{
    kva_lists_t L;
    kva_lists(B, extra_bad, &L);
    float *q, *ref, scale;
    kva_reference(B, &q, &ref, &scale);
    const size_t nq = (size_t)B->n_seqs * B->n_heads * B->d;
    std::vector<float> got(nq);
    memset(got.data(), 0xff, nq * sizeof(float)); // NaN: unwritten rows show
    uint32_t n_bad = 0;
    const uint32_t ran = emu_attend(B, &L, q, scale, impl, n_splits, fuse, got.data(), &n_bad);
    assert_int_equal(n_bad, L.expect_bad);
    const bool f16_keys = ran == KVC_ATTEND_IMPL_MMA || ran == KVC_ATTEND_IMPL_MMA_WIDE;
    const double worst = kva_check(B, got.data(), ref, f16_keys);
    printf("  %s d %u, %u seqs x %u kv heads x %u rows, %u splits%s, %u pages: worst rel err "
           "%.2e\n",
           impl_name(ran), B->d, B->n_seqs, B->n_kv, B->n_heads / B->n_kv, n_splits,
           fuse ? " (fused)" : "", L.n_ids, worst);
    kva_lists_free(&L);
    free(q);
    free(ref);
}

enum : uint32_t {
    SIMT = 1u << KVC_ATTEND_IMPL_SIMT,
    MMA = 1u << KVC_ATTEND_IMPL_MMA,
    QTAB = 1u << KVC_ATTEND_IMPL_MMA_QTAB,
    WIDE = 1u << KVC_ATTEND_IMPL_MMA_WIDE,
};

/* Which kernels run on which of attend_cases.h's configs, at how many splits a list (all of
 * them, each with every kernel, take minutes on host threads: each case is here for the paths
 * it reaches). */
struct emu_case_t {
    uint32_t config, impls, splits, extra_bad;
    bool fuse; // each list combined by its last split (FERRY_ATTEND_FUSE=1)
};
static const emu_case_t k_cases[] = {
    {4, MMA | WIDE, 3, 0, false},  // Llama-3's shape: every option, FP16 tails, a converted head
    {9, WIDE, 2, 0, false},        // G 40: wide steps across two slots, the rest in tiles
    {10, WIDE | MMA, 1, 0, false}, // G 64: wide steps within a slot; each list in one block
    {7, MMA | QTAB, 2, 0, false},  // G 24: 16-token tiles across two slots
    {8, SIMT | MMA | QTAB | WIDE, 4, 2, false}, // G 8, d 64, MixKVQ P 2; page ids past the pool
    {1, SIMT | QTAB, 2, 0, false},              // d 128, P 4, GQA 1:1, a sequence of empty lists
    {5, MMA | QTAB, 2, 0, false},               // d 64, GQA 4:1, P 3
    {11, SIMT, 2, 0, false}, // d 72: 9 of 16 lanes a token hold channels, nothing rotated
    {12, SIMT, 2, 0, false}, // d 256, GQA 8:1: 32 lanes a token
    {13, SIMT, 1, 1, false}, // d 512: 16 channels a lane
    // The fused combine: rotated and plain parts, empty lists, one split and several.
    {0, SIMT | WIDE, 3, 1, true}, // d 64, GQA 3:1, rotated pages, page ids past the pool
    {1, MMA, 1, 0, true},         // empty lists, each list in one block
    {12, SIMT, 3, 0, true},       // d 256, GQA 8:1: eight rows combined by one block
};

static void test_parity(void **state)
{
    (void)state;
    // FERRY_EMU_ATTEND_ALL=1: every config with every kernel at 1 and 3 splits, and fused at 2.
    const char *all = getenv("FERRY_EMU_ATTEND_ALL");
    if (all != NULL && strcmp(all, "1") == 0) {
        for (uint32_t c = 0; c < kva_n_configs; c++) {
            kva_built_t B;
            kva_build(&B, &kva_configs[c]);
            for (uint32_t impl = KVC_ATTEND_IMPL_SIMT; impl <= KVC_ATTEND_IMPL_MMA_WIDE; impl++) {
                run_and_compare(&B, 0, 1, impl);
                run_and_compare(&B, 1, 3, impl);
                run_and_compare(&B, 0, 2, impl, true);
            }
            kva_unbuild(&B);
        }
        return;
    }
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_cases); i++) {
        const emu_case_t &c = k_cases[i];
        kva_built_t B;
        kva_build(&B, &kva_configs[c.config]);
        for (uint32_t impl = KVC_ATTEND_IMPL_SIMT; impl <= KVC_ATTEND_IMPL_MMA_WIDE; impl++)
            if (c.impls & (1u << impl))
                run_and_compare(&B, c.extra_bad, c.splits, impl, c.fuse);
        kva_unbuild(&B);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
