/* The GPU encoder's optimizer (kvc_encoder_choose's build_items, rate control, multiplier search
 * and greedy slack fill): choose_body, greedy_small_body, opt_small_body and what they call,
 * device code that two places compile: kvcodec/encode.cu (choose_kernel, one cooperative grid;
 * greedy_small_kernel, greedy_kernel; opt_small_kernel, a short layer's whole optimizer) and
 * tests/kvcodec/test_choose_emu.cc, which runs it on host threads (a grid of blocks of warps,
 * each barrier and warp intrinsic emulated) against a serial optimizer, so that its logic is
 * tested on every machine, not only on one with a GPU.
 *
 * Not a standalone header. The includer provides, before including it: kvcodec.h (options,
 * policies); kadd, ksub and kmul (float arithmetic rounded once); and outside CUDA
 * __device__, __host__, __forceinline__, threadIdx, blockIdx, blockDim, gridDim, __syncthreads,
 * cg::grid_group with sync(), __shfl_sync, __shfl_xor_sync, __all_sync, __ballot_sync, __popc,
 * atomicAdd (unsigned and unsigned long long), __ldcg, min, max, __float_as_uint, the
 * intrinsics __dadd_rn, __dsub_rn, __dmul_rn, __ddiv_rn, __ull2double_rn and __fdiv_rn, and
 * what greedy_walk_int.h asks for. */
#ifndef FERRY_KVCODEC_CHOOSE_DEV_INT_H
#define FERRY_KVCODEC_CHOOSE_DEV_INT_H

#include "mult_search_int.h"

#ifdef __CUDACC__
#define OPT_UNROLL _Pragma("unroll")
#else
#define OPT_UNROLL
#endif

/* Table slots in the device/host table buffer, each [n_kv][n]. */
enum { TAB_DEV = 0, TAB_EK8, TAB_EV8, TAB_EK4, TAB_EV4, TAB_EK2, TAB_EV2, TAB_COUNT };

#define DIST_BLOCKS 128

/* The device optimizer's result for the host. */
typedef struct {
    double lambda;
    unsigned long long total, target; // greedy fill: frame bytes of the choice and the cap
    int budget_met, need_greedy;
    double dist;              // the distortion of the final choice
    double part[DIST_BLOCKS]; // its per-block partial sums
} opt_out_t;

/* The rate controller's state after the layers encoded so far, kept on the device by the device
 * optimizer (choose_kernel reads it, crc_final_kernel advances it), so that a layer can be
 * queued before the previous one is done. The host's copy in enc follows as layers finish. */
typedef struct {
    unsigned long long spent; // frame bytes so far
    double lambda_prev;       // < 0: none yet
} rc_dev_t;

/* Every decision of the CPU optimizer rests on integer byte counts and on per-item float /
 * double comparisons, so the device reproduces it exactly: each item's distortions and
 * Lagrangian values are computed with the CPU's roundings (no contraction), byte counts are
 * integer sums (any order gives the same), and the scalar steps (bracket, bisection, rate
 * control) run identically in every block of one cooperative grid. Each pass over the items
 * (a grid barrier) measures up to OPT_SLOTS choices: the search's next three steps for every
 * outcome (mult_search_int.h), and in the first pass also the cheapest choice and the rate
 * check's, so that a layer that bisects takes about a third of the passes. The greedy fill is
 * sequential by nature: its candidates are sorted on the device (a stable radix sort on the
 * ratio gives the CPU's ratio-then-index order) and one warp walks them 32 at a time, taking
 * every candidate of a run that fits in one step (greedy_walk). */

#define OPT_THREADS    256
#define OPT_ONE_BLOCK  2048 // items up to which the optimizer's grid is one block
#define OPT_MAX_KV     64 // per-block byte-count histogram; more heads take the host optimizer
#define GREEDY_CHUNK   4096
#define GREEDY_THREADS 256

typedef struct {
    uint32_t n_kv, n, G;
    size_t n_items;
    // policy
    int dist_kind, joint_kv, stat_on, measured, pins_ok, pins_kept;
    uint32_t sinks, recent, options, backbone_opt;
    float hybrid_factor;
    float prior; // importance prior per token (pol->prior / n when measured, else 0)
    float drop_spread; // pol->drop_spread when measured, else 0
    int need8, need4, needv4, need2, needk2;
    double flex;
    float cost[KVC_OPT_COUNT], pen[KVC_OPT_COUNT];
    // byte model: a group of m tokens of option o is gfix[o] + m * gtok[o] bytes
    unsigned long long gfix[KVC_OPT_COUNT], gtok[KVC_OPT_COUNT], gsz[KVC_OPT_COUNT];
    unsigned long long fixed; // header + maps + CRC
    // rate controller: the state the previous layers left (rc) and this layer's place
    int no_budget;
    uint32_t r;
    const rc_dev_t *rc;
    unsigned long long total_budget;
    double share_w, share_left; // kvc_share's weights (kvc_opt_inputs_t)
    // inputs
    const float *imp;
    const uint8_t *is_static, *backbone;
    const float *tab;      // [TAB_COUNT][n_kv][n]
    const float *dev_mean; // [n_kv]
    // work
    float *dist; // [n_items][KVC_OPT_COUNT]
    uint8_t *allowed, *choice, *tmp, *cand_opt;
    unsigned long long *cnt; // [3][OPT_SLOTS][n_kv][8] count passes, rotating
    int tree;                // multipliers a search pass measures, 1 .. OPT_SLOTS (a step each)
    long long *gcnt;         // [n_kv][8] counts of the choice, kept by the greedy fill
    opt_out_t *out;
} opt_args_t;

static __device__ __forceinline__ double o_dadd(double a, double b)
{
    return __dadd_rn(a, b);
}
static __device__ __forceinline__ double o_dmul(double a, double b)
{
    return __dmul_rn(a, b);
}

/* Whether build_item reads the heads' mean deviations (dev_mean): the policies that weigh every
 * token by them (no joint_kv) or add them to the drop term (drop_spread). */
static __host__ __device__ __forceinline__ bool opt_need_dev_mean(const opt_args_t &a)
{
    return a.measured && (!a.joint_kv || a.drop_spread > 0);
}

/* kvc_run_bytes from the byte model. */
static __device__ __forceinline__ unsigned long long run_bytes(const opt_args_t &a, int o,
                                                               unsigned long long count)
{
    if (o == KVC_OPT_DROP || count == 0)
        return 0;
    // A head's count fits 32 bits (n_tokens <= KVC_MAX_TOKENS): 32-bit division.
    uint32_t gs = (uint32_t)a.gsz[o], c = (uint32_t)count, full = c / gs, rest = c - full * gs;
    unsigned long long b = (unsigned long long)full * (a.gfix[o] + gs * a.gtok[o]);
    if (rest)
        b += a.gfix[o] + rest * a.gtok[o];
    return b;
}

/* build_items for one item. */
static __device__ void build_item(const opt_args_t &a, size_t it, int pins)
{
    uint32_t h = (uint32_t)(it / a.n), t = (uint32_t)(it % a.n), n = a.n;
    float *D = a.dist + it * KVC_OPT_COUNT;
    float w = a.dist_kind == KVC_DIST_POSITION ? __fdiv_rn((float)(t + 1), (float)n)
                                               : kadd(a.imp[it], a.prior);
    bool middle = t >= a.sinks && t + a.recent < n;
    if (a.stat_on && a.is_static[h] && middle)
        w = kmul(w, a.hybrid_factor);
    uint8_t mask = (uint8_t)a.options;
    mask = kvc_pin_mask(mask, pins, t, n, a.sinks, a.recent, a.pins_kept, a.backbone[t],
                        a.backbone_opt);
    a.allowed[it] = mask;
    if (!a.measured) {
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            D[o] = kmul(w, a.pen[o]);
        return;
    }
    size_t plane = a.n_items;
    float dv = a.joint_kv ? a.tab[TAB_DEV * plane + it] : a.dev_mean[h];
    float w2 = kmul(w, w);
    D[KVC_OPT_F16] = 0;
    float rest = ksub(1.0f, fminf(w, KVC_DROP_MASS_MAX)); // the others' share
    D[KVC_OPT_DROP] = __fdiv_rn(kmul(w2, dv), kmul(rest, rest));
    float spread = a.drop_spread > 0 ? kmul(a.drop_spread, a.dev_mean[h]) : 0.0f;
    D[KVC_OPT_DROP] = kadd(D[KVC_OPT_DROP], kmul(w2, spread));
    float q8 = 0, q4 = 0, q42 = 0, q2 = 0;
    if (a.need8)
        q8 = kmul(w2, kadd(a.tab[TAB_EV8 * plane + it], kmul(dv, a.tab[TAB_EK8 * plane + it])));
    if (a.needv4)
        q4 = kmul(w2, kadd(a.tab[TAB_EV4 * plane + it], kmul(dv, a.tab[TAB_EK4 * plane + it])));
    if (a.need2 && a.need4)
        q42 = kmul(w2, kadd(a.tab[TAB_EV2 * plane + it], kmul(dv, a.tab[TAB_EK4 * plane + it])));
    if (a.needk2)
        q2 = kmul(w2, kadd(a.tab[TAB_EV2 * plane + it], kmul(dv, a.tab[TAB_EK2 * plane + it])));
    D[KVC_OPT_Q8] = q8;
    D[KVC_OPT_Q4] = q4;
    D[KVC_OPT_Q4V2] = q42;
    D[KVC_OPT_Q2] = q2;
}

/* assign's choice at lambda for an item of distortions D and allowed options mask. */
static __device__ __forceinline__ int assign_d(const opt_args_t &a, const float *D, uint8_t mask,
                                               double lambda)
{
    int best = -1;
    double bv = 0;
OPT_UNROLL
    for (int o = KVC_OPT_COUNT - 1; o >= 0; o--) {
        if (!(mask & (1u << o)))
            continue;
        double v = o_dadd((double)D[o], o_dmul(lambda, (double)a.cost[o]));
        if (best < 0 || v < bv) {
            best = o;
            bv = v;
        }
    }
    return best;
}

static __device__ __forceinline__ int cheapest_one(const opt_args_t &a, size_t it, bool allow_drop)
{
    uint8_t mask = a.allowed[it];
    if (!allow_drop && mask != KVC_OPT_BIT(KVC_OPT_DROP))
        mask &= (uint8_t)~KVC_OPT_BIT(KVC_OPT_DROP);
    int o = KVC_OPT_COUNT - 1;
    while (o > 0 && !(mask & (1u << o)))
        o--;
    return o;
}

enum { PASS_ASSIGN = 0, PASS_CHEAP = 1, PASS_CHEAP_NODROP = 2, PASS_COPY = 3 };

/* The optimizer's grid-wide barrier; a block barrier when the grid is one block (whose launch
 * need not be cooperative: grid may then be NULL). */
static __device__ __forceinline__ void grid_barrier(cg::grid_group *grid)
{
    if (gridDim.x == 1)
        __syncthreads();
    else
        grid->sync();
}

/* Choices one count pass measures at most: slot 0 by its mode, the others by assign at their
 * multipliers (the cheapest choice, the previous multiplier's and the first steps of the
 * search; later, a tree of the search's next steps, mult_search_int.h). */
#define OPT_SLOTS 8

/* The count buffers' stride: a pass's counts per (slot, head, option). */
static __device__ __forceinline__ size_t cnt_stride(const opt_args_t &a)
{
    return (size_t)OPT_SLOTS * a.n_kv * 8;
}

/* One pass over every item. Slot 0: the choice by `mode` (written to dst when not NULL);
 * slots 1 .. n_extra: assign's choice at lam[s - 1] (slot 1's written to dst1 when not NULL).
 * Their byte counts per (slot, head, option) are added into count buffer `buf` (zero before
 * the pass). Then the grid synchronizes and every block has the exact frame bytes of each
 * slot's choice in s_tot[slot] (until the next pass); returns slot 0's. Each item's
 * distortions are read once for all slots. */
static __device__ unsigned long long count_pass(const opt_args_t &a, cg::grid_group *grid, int mode,
                                                double lambda, uint8_t *dst, const uint8_t *src,
                                                int n_extra, const double *lam, uint8_t *dst1,
                                                int buf, unsigned *s_cnt,
                                                unsigned long long *s_tot)
{
    const uint32_t nk8 = a.n_kv * 8;
    const int ns = 1 + n_extra;
    double lr[OPT_SLOTS];
OPT_UNROLL
    for (int k = 1; k < OPT_SLOTS; k++)
        lr[k] = k < ns ? lam[k - 1] : 0.0;
    for (uint32_t i = threadIdx.x; i < (uint32_t)ns * nk8; i += blockDim.x)
        s_cnt[i] = 0;
    __syncthreads();
    if (threadIdx.x < (unsigned)ns) // (every thread has read the previous pass's totals by now)
        s_tot[threadIdx.x] = a.fixed;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t rounds = (a.n_items + stride - 1) / stride;
    uint32_t lane = threadIdx.x % 32;
    for (size_t k = 0; k < rounds; k++) { // uniform trip count: the warp votes below
        size_t it = k * stride + (size_t)blockIdx.x * blockDim.x + threadIdx.x;
        bool live = it < a.n_items;
        int o[OPT_SLOTS];
        uint32_t h = 0;
OPT_UNROLL
        for (int q = 0; q < OPT_SLOTS; q++)
            o[q] = -1;
        if (live) {
            h = (uint32_t)(it / a.n);
            if (mode == PASS_ASSIGN || ns > 1) {
                float D[KVC_OPT_COUNT];
                const float *Dp = a.dist + it * KVC_OPT_COUNT;
OPT_UNROLL
                for (int q = 0; q < KVC_OPT_COUNT; q++)
                    D[q] = Dp[q];
                const uint8_t mask = a.allowed[it];
                if (mode == PASS_ASSIGN)
                    o[0] = assign_d(a, D, mask, lambda);
OPT_UNROLL
                for (int q = 1; q < OPT_SLOTS; q++)
                    if (q < ns)
                        o[q] = assign_d(a, D, mask, lr[q]);
            }
            if (mode != PASS_ASSIGN)
                o[0] = mode == PASS_COPY ? (int)src[it] : cheapest_one(a, it, mode == PASS_CHEAP);
            if (dst)
                dst[it] = (uint8_t)o[0];
            if (dst1)
                dst1[it] = (uint8_t)o[1];
        }
        uint32_t h0 = __shfl_sync(0xffffffffu, h, 0);
        bool same = __all_sync(0xffffffffu, !live || h == h0);
OPT_UNROLL
        for (int q = 0; q < OPT_SLOTS; q++) {
            if (q >= ns)
                break;
            unsigned *c = s_cnt + (size_t)q * nk8;
            if (same) {
                for (int x = 0; x < KVC_OPT_COUNT; x++) {
                    unsigned m = __ballot_sync(0xffffffffu, o[q] == x);
                    if (lane == 0 && m)
                        atomicAdd(&c[h0 * 8 + x], (unsigned)__popc(m));
                }
            } else if (live) {
                atomicAdd(&c[h * 8 + o[q]], 1u);
            }
        }
    }
    __syncthreads();
    // A grid of one block (a short layer) has the whole counts in shared memory already; it
    // stores them for the greedy fill and waits at a block barrier only.
    const bool one = gridDim.x == 1;
    unsigned long long *g = a.cnt + (size_t)buf * cnt_stride(a);
    for (uint32_t i = threadIdx.x; i < (uint32_t)ns * nk8; i += blockDim.x) {
        if (one)
            g[i] = s_cnt[i];
        else if (s_cnt[i])
            atomicAdd(&g[i], (unsigned long long)s_cnt[i]);
    }
    grid_barrier(grid);
    // The frame bytes of each slot: a (head, option) count per thread (one round trip to L2
    // instead of a thread's walk over all of them), summed in the block; integers, so in any
    // order.
    for (int q = 0; q < ns; q++) {
        unsigned long long part = 0;
        for (uint32_t i = threadIdx.x; i < nk8; i += blockDim.x) {
            const size_t j = (size_t)q * nk8 + i;
            if (i % 8 < KVC_OPT_DROP) // other SMs' atomics: not from L1
                part += run_bytes(a, (int)(i % 8), one ? s_cnt[j] : __ldcg(&g[j]));
        }
OPT_UNROLL
        for (uint32_t w = 16; w > 0; w >>= 1)
            part += __shfl_xor_sync(0xffffffffu, part, w);
        if (lane == 0 && part)
            atomicAdd(&s_tot[q], part);
    }
    // The buffer two passes ahead is the one the previous pass filled: every block has read
    // it (before this pass's grid barrier), so it can be cleared for reuse.
    if (blockIdx.x == 0) {
        unsigned long long *z = a.cnt + (size_t)((buf + 2) % 3) * cnt_stride(a);
        for (uint32_t i = threadIdx.x; i < OPT_SLOTS * nk8; i += blockDim.x)
            z[i] = 0;
    }
    __syncthreads();
    return s_tot[0];
}

/* kvc_encoder_choose from the distortion tables, for one layer, as one cooperative grid (the
 * body of choose_kernel; s_cnt: OPT_SLOTS * OPT_MAX_KV * 8 and s_tot: OPT_SLOTS entries of the
 * block's shared memory). Every thread of the grid calls it. */
static __device__ void choose_body(const opt_args_t &a, cg::grid_group *grid, unsigned *s_cnt,
                                   unsigned long long *s_tot)
{
    int buf = 0;
    double lambda = 0;
    int budget_met = 0, need_greedy = 0;
    unsigned long long g_total = 0, g_target = 0;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    // kvc_encoder_opt_inputs' remain and share from the device state, the host's roundings.
    const unsigned long long spent = a.rc->spent;
    const double lambda_prev = a.rc->lambda_prev;
    const double remain =
        a.no_budget ? 0 : __ull2double_rn(a.total_budget - min(spent, a.total_budget));
    const double share = a.share_left > 0 ? __ddiv_rn(__dmul_rn(remain, a.share_w), a.share_left)
                         : a.r > 0        ? __ddiv_rn(remain, (double)a.r)
                                          : 0;
    // The rate check measures the previous multiplier's choice, and solve() starts there.
    const bool check_prev = lambda_prev >= 0 && a.r > 1;
    // How many of the search's next steps a pass measures at once (a tree of up to `width`
    // multipliers): more passes of less work each where passes are cheap (one block).
    const int width = a.tree >= 1 && a.tree <= OPT_SLOTS ? a.tree : OPT_SLOTS;
#define PASS(mode, lam, dst, src)                                                                  \
    count_pass(a, grid, mode, lam, dst, src, 0, NULL, NULL, buf++ % 3, s_cnt, s_tot)
    for (int pins = KVC_PINS_ALL; pins >= KVC_PINS_NONE; pins--) {
        for (size_t it = first; it < a.n_items; it += stride)
            build_item(a, it, pins);
        grid_barrier(grid);
        if (a.no_budget) {
            PASS(PASS_CHEAP_NODROP, 0, a.choice, NULL);
            budget_met = 1;
            break;
        }
        // One pass measures the cheapest choice (the floor), the previous multiplier's (the
        // rate check, into the choice) and the search's first steps from it (used when the
        // check fails); lam[j] is slot j + 1's multiplier.
        kvc_ms_t ms;
        kvc_ms_init(&ms, lambda_prev);
        double lam[OPT_SLOTS];
        int node[KVC_MS_NODES], nl = 0;
        if (check_prev)
            lam[nl++] = lambda_prev;
        kvc_ms_tree(&ms, lam, &nl, min(nl + width, OPT_SLOTS - 1), node);
        double floor_l = (double)count_pass(a, grid, PASS_CHEAP, 0, a.tmp, NULL, nl, lam,
                                            check_prev ? a.choice : NULL, buf++ % 3, s_cnt, s_tot);
        double cap = __dsub_rn(remain, o_dmul((double)(a.r - 1), floor_l));
        if (a.r > 1) {
            double c2 = o_dmul(share, o_dadd(1, a.flex));
            cap = cap < c2 ? cap : c2;
        }
        if (floor_l > cap) {
            if (pins > KVC_PINS_NONE)
                continue; // the pins alone do not fit: retry with fewer
            PASS(PASS_COPY, 0, a.choice, a.tmp);
            budget_met = floor_l <= remain;
            break;
        }
        if (check_prev) {
            double x = (double)s_tot[1];
            // (kvc_encoder_choose: top, the layer's frame with every token at 16/16)
            const double top =
                (double)(a.fixed + a.n_items * (a.gfix[KVC_OPT_F16] + a.gtok[KVC_OPT_F16]));
            if (x <= cap && x >= o_dmul(share, __dsub_rn(1, a.flex)) &&
                x >= __dsub_rn(remain, o_dmul((double)(a.r - 1), top))) {
                lambda = lambda_prev; // its choice is in place
                budget_met = 1;
                break;
            }
        }
        double tgt = a.r > 1 ? (share < cap ? share : cap) : remain;
        unsigned long long target = (unsigned long long)tgt;
        // solve(): the search (mult_search_int.h), a tree of its steps per pass, then the
        // greedy fill (later kernels).
        bool fits[OPT_SLOTS];
        for (int j = 0; j < nl; j++)
            fits[j] = s_tot[j + 1] <= target;
        kvc_ms_walk(&ms, node, fits);
        for (;;) {
            nl = 0;
            kvc_ms_tree(&ms, lam, &nl, width, node);
            if (nl == 0)
                break;
            count_pass(a, grid, PASS_ASSIGN, lam[0], NULL, NULL, nl - 1, lam + 1, NULL, buf++ % 3,
                       s_cnt, s_tot);
            for (int j = 0; j < nl; j++)
                fits[j] = s_tot[j] <= target;
            kvc_ms_walk(&ms, node, fits);
        }
        if (ms.phase == KVC_MS_ZERO) { // lambda 0 fits: its choice, no fill
            PASS(PASS_ASSIGN, 0, a.choice, NULL);
            lambda = 0;
        } else {
            const double hi = kvc_ms_result(&ms);
            unsigned long long x = PASS(PASS_ASSIGN, hi, a.choice, NULL);
            if (x > target)
                x = PASS(PASS_CHEAP, 0, a.choice, NULL);
            need_greedy = 1;
            g_total = x;
            g_target = target;
            lambda = hi;
            // The counts of the final choice (slot 0 of the last pass), for the greedy fill.
            const unsigned long long *g = a.cnt + (size_t)((buf - 1) % 3) * cnt_stride(a);
            if (blockIdx.x == 0)
                for (uint32_t i = threadIdx.x; i < a.n_kv * 8; i += blockDim.x)
                    a.gcnt[i] = (long long)__ldcg(&g[i]);
        }
        budget_met = 1;
        break;
    }
#undef PASS
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        a.out->lambda = lambda;
        a.out->budget_met = budget_met;
        a.out->need_greedy = need_greedy;
        a.out->total = g_total;
        a.out->target = g_target;
    }
}

/* ---- The greedy slack fill (one block per layer up to GREEDY_CHUNK items) ---- */

/* Item i's best upgrade along the hull (ratio of distortion saved per byte) as a sort key (a
 * positive float's bits order as the float; 0 for none), and through to the upgrade. */
static __device__ __forceinline__ uint32_t greedy_cand(const opt_args_t &a, size_t i, uint8_t *to)
{
    int bo = -1;
    float best = 0;
    const float *D = a.dist + i * KVC_OPT_COUNT;
    int cur = a.choice[i];
    uint8_t mask = a.allowed[i];
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        if (!(mask & (1u << o)) || a.cost[o] <= a.cost[cur])
            continue;
        float r = __fdiv_rn(ksub(D[cur], D[o]), ksub(a.cost[o], a.cost[cur]));
        if (r > best) {
            best = r;
            bo = o;
        }
    }
    *to = (uint8_t)(bo >= 0 ? bo : 0);
    return bo >= 0 ? __float_as_uint(best) : 0u;
}

#include "greedy_walk_int.h"

/* Loads the fill's state from the choice optimizer and asks whether anything fits at all. The
 * whole block calls it. */
static __device__ void greedy_begin(const opt_args_t &a, greedy_state_t *st, long long target)
{
    for (uint32_t i = threadIdx.x; i < a.n_kv * 8; i += blockDim.x) {
        st->cnt[i] = a.gcnt[i];
        st->into[i] = st->out_of[i] = 0;
    }
    if (threadIdx.x == 0)
        st->total = (long long)a.out->total;
    __syncthreads();
    if (threadIdx.x < 32) {
        const bool none_fits = !greedy_any_fits(&a, st->cnt, st->total, target);
        if (threadIdx.x == 0)
            st->over = none_fits;
    }
    __syncthreads();
}

/* Stores the fill's counts and frame bytes for the next pass. The whole block calls it. */
static __device__ void greedy_end(const opt_args_t &a, const greedy_state_t *st)
{
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < a.n_kv * 8; i += blockDim.x)
        a.gcnt[i] = st->cnt[i];
    if (threadIdx.x == 0)
        a.out->total = (unsigned long long)st->total;
}

/* The greedy fill's candidates of one pass for the radix sort (cand_kernel; a grid-stride loop
 * over the items): keys[i] = greedy_cand's key (0: no candidate), idx[i] = i, a.cand_opt[i] its
 * upgrade. Nothing where the pass is not needed: more is the second pass's flag (the first
 * pass's seg_end), NULL for the first pass. */
static __device__ void cand_body(const opt_args_t &a, uint32_t *keys, uint32_t *idx,
                                 const int *more)
{
    if (more != NULL && *more == 0)
        return; // nothing fits after the first pass: no sort reads the keys
    const bool on = a.out->need_greedy != 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n_items;
         i += (size_t)gridDim.x * blockDim.x) {
        idx[i] = (uint32_t)i;
        uint8_t to = 0;
        keys[i] = on ? greedy_cand(a, i, &to) : 0u;
        a.cand_opt[i] = to;
    }
}

/* One pass of the greedy fill over the candidates sorted by key (keys, idx: descending, then
 * by item), by a block of GREEDY_THREADS (greedy_kernel): GREEDY_CHUNK of them staged at a time
 * in s_idx, s_cur and s_to (shared) for greedy_walk, until the fill is over. The first pass
 * (seg_end not NULL) ends by saying whether the second has anything to do: *seg_end, the end of
 * the second pass's sort segment, is n_items when some upgrade still fits, else 0 (the CPU
 * skips the second pass then; its candidates, sort and walk would take nothing). Each thread
 * loads its slots' keys and items first, then their options, so that the loads of a stage are
 * in flight together. */
static __device__ void greedy_pass_body(const opt_args_t &a, greedy_state_t *st_p,
                                        const uint32_t *keys, const uint32_t *idx, int *seg_end,
                                        uint32_t *s_idx, uint8_t *s_cur, uint8_t *s_to)
{
    enum { PER = GREEDY_CHUNK / GREEDY_THREADS };
    greedy_state_t &st = *st_p;
    if (!a.out->need_greedy) {
        if (seg_end != NULL && threadIdx.x == 0)
            *seg_end = 0;
        return;
    }
    const uint32_t none = 0xffffffffu;
    const long long target = (long long)a.out->target;
    greedy_begin(a, &st, target);
    for (size_t base = 0; base < a.n_items && !st.over; base += GREEDY_CHUNK) {
        uint32_t it[PER];
        OPT_UNROLL
        for (uint32_t j = 0; j < PER; j++) {
            const size_t pos = base + threadIdx.x + (size_t)j * GREEDY_THREADS;
            it[j] = pos < a.n_items && keys[pos] != 0 ? idx[pos] : none;
        }
        OPT_UNROLL
        for (uint32_t j = 0; j < PER; j++) {
            const uint32_t k = threadIdx.x + j * GREEDY_THREADS;
            if (it[j] != none) {
                s_cur[k] = a.choice[it[j]];
                s_to[k] = a.cand_opt[it[j]];
            }
            s_idx[k] = it[j];
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            const bool over = greedy_walk(&a, &st, target, s_idx, s_cur, s_to);
            if (threadIdx.x == 0)
                st.over = over;
        }
        __syncthreads(); // st.over for every thread; the window free for the next stage
    }
    if (seg_end != NULL && threadIdx.x < 32) {
        const bool more = greedy_any_fits(&a, st.cnt, st.total, target);
        if (threadIdx.x == 0)
            *seg_end = more ? (int)a.n_items : 0;
    }
    greedy_end(a, &st);
}

/* Both passes of the greedy fill for a layer of at most GREEDY_CHUNK items in one block (the
 * candidates, their sort and the walk; in place of cand_kernel, the radix sort and greedy_kernel
 * twice, six launches that a layer accepting the previous multiplier ran for nothing). The
 * candidates are sorted in shared memory by a bitonic network on (key descending, item
 * ascending), the order of the stable radix sort: the same list. s_key (then s_cur and s_to,
 * bytes), s_idx and s_copt: GREEDY_CHUNK entries each of the block's shared memory. The whole
 * block calls it. */
static __device__ void greedy_small_body(const opt_args_t &a, greedy_state_t *st_p, uint32_t *s_key,
                                         uint32_t *s_idx, uint8_t *s_copt)
{
    greedy_state_t &st = *st_p;
    if (!a.out->need_greedy)
        return;
    const uint32_t none = 0xffffffffu, n = (uint32_t)a.n_items;
    uint32_t width = 1;
    while (width < n)
        width <<= 1;
    uint8_t *s_cur = reinterpret_cast<uint8_t *>(s_key), *s_to = s_cur + GREEDY_CHUNK;
    const long long target = (long long)a.out->target;
    greedy_begin(a, &st, target);
    // A pass in which no upgrade fits at the start takes nothing, nor does any after it.
    for (int pass = 0; pass < 2 && !st.over; pass++) {
        for (uint32_t k = threadIdx.x; k < width; k += blockDim.x) {
            uint32_t key = 0, i = none;
            if (k < n) {
                key = greedy_cand(a, k, &s_copt[k]);
                i = k;
            }
            s_key[k] = key;
            s_idx[k] = i;
        }
        __syncthreads();
        for (uint32_t len = 2; len <= width; len <<= 1) {
            for (uint32_t j = len >> 1; j > 0; j >>= 1) {
                for (uint32_t t = threadIdx.x; t < width; t += blockDim.x) {
                    const uint32_t l = t ^ j;
                    if (l <= t)
                        continue;
                    const uint32_t kt = s_key[t], kl = s_key[l], it = s_idx[t], il = s_idx[l];
                    const bool l_first = kl > kt || (kl == kt && il < it);
                    const bool t_first = kt > kl || (kt == kl && it < il);
                    if ((t & len) == 0 ? l_first : t_first) {
                        s_key[t] = kl, s_key[l] = kt;
                        s_idx[t] = il, s_idx[l] = it;
                    }
                }
                __syncthreads();
            }
        }
        // The window: the items with a candidate, in order, then none (as greedy_kernel stages
        // it); s_cur and s_to overwrite the keys once every slot has read its own.
        for (uint32_t k = threadIdx.x; k < GREEDY_CHUNK; k += blockDim.x)
            if (k >= width || s_key[k] == 0)
                s_idx[k] = none;
        __syncthreads();
        for (uint32_t k = threadIdx.x; k < GREEDY_CHUNK; k += blockDim.x) {
            const uint32_t i = s_idx[k];
            if (i != none) {
                s_cur[k] = a.choice[i];
                s_to[k] = s_copt[i];
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            greedy_walk(&a, &st, target, s_idx, s_cur, s_to);
            const bool none_fits = !greedy_any_fits(&a, st.cnt, st.total, target);
            if (threadIdx.x == 0)
                st.over = none_fits;
        }
        __syncthreads(); // the next pass's candidates read the choice and reuse the arrays
    }
    greedy_end(a, &st);
}

/* Mean of the head's value deviations in the CPU's order (KVC_DEV_CHUNK's), by one thread;
 * only where opt_need_dev_mean. */
static __device__ float dev_mean_of(const float *dev, uint32_t n)
{
    return (float)__ddiv_rn(kvc_dev_sum(dev, n), (double)n);
}

#define DEV_MEAN_THREADS 256

/* dev_mean_of by a block of DEV_MEAN_THREADS threads, a chunk a thread; part: their sums. */
static __device__ float dev_mean_block(const float *dev, uint32_t n, double *part)
{
    const uint32_t chunks = (n + KVC_DEV_CHUNK - 1) / KVC_DEV_CHUNK;
    double s = 0; // thread 0's
    for (uint32_t c0 = 0; c0 < chunks; c0 += DEV_MEAN_THREADS) {
        const uint32_t c = c0 + threadIdx.x;
        if (c < chunks)
            part[threadIdx.x] = kvc_dev_chunk_sum(dev, n, c);
        __syncthreads();
        if (threadIdx.x == 0)
            for (uint32_t i = 0; i < min(chunks - c0, (uint32_t)DEV_MEAN_THREADS); i++)
                s = o_dadd(s, part[i]);
        __syncthreads(); // part is rewritten
    }
    return (float)__ddiv_rn(s, (double)n);
}

/* The fixed tree over the parts' sums part[0 .. DIST_BLOCKS) (stored, then a barrier), into
 * part[0] (dist_final_kernel's). Every thread of the block calls it. */
static __device__ void dist_tree(double *part)
{
    for (uint32_t w = DIST_BLOCKS / 2; w > 0; w /= 2) {
        if (threadIdx.x < w)
            part[threadIdx.x] = o_dadd(part[threadIdx.x], part[threadIdx.x + w]);
        __syncthreads();
    }
}

/* The distortion sum's parts: a block of 256 per 256 items, DIST_BLOCKS at most (then each
 * thread adds several items), at least one. */
static __host__ __device__ __forceinline__ uint32_t dist_parts(size_t items)
{
    const size_t p = (items + 255) / 256;
    return (uint32_t)(p < 1 ? 1 : p > DIST_BLOCKS ? DIST_BLOCKS : p);
}

/* Part b of n_parts of the distortion of the choice, by a block of 256 threads (part: 256
 * entries of its shared memory): items b 256 + t, then n_parts 256 further on, added in order
 * per thread, then a fixed tree; the sum in part[0] (a barrier behind it). */
static __device__ void dist_part(const opt_args_t &a, uint32_t b, uint32_t n_parts, double *part)
{
    double s = 0;
    for (size_t i = (size_t)b * 256 + threadIdx.x; i < a.n_items; i += (size_t)n_parts * 256)
        s = o_dadd(s, (double)a.dist[i * KVC_OPT_COUNT + a.choice[i]]);
    part[threadIdx.x] = s;
    __syncthreads();
    for (uint32_t w = 128; w > 0; w /= 2) {
        if (threadIdx.x < w)
            part[threadIdx.x] = o_dadd(part[threadIdx.x], part[threadIdx.x + w]);
        __syncthreads();
    }
}

/* dist_kernel and dist_final_kernel in one block of 256 threads, in their order: each of their
 * parts (dist_part), then the tree over DIST_BLOCKS parts; the same double. part: 256, parts:
 * DIST_BLOCKS entries of the block's shared memory. */
static __device__ void dist_one_block(const opt_args_t &a, double *part, double *parts)
{
    const uint32_t n_parts = dist_parts(a.n_items);
    for (uint32_t b = 0; b < n_parts; b++) {
        dist_part(a, b, n_parts, part);
        if (threadIdx.x == 0)
            parts[b] = part[0];
        __syncthreads();
    }
    if (threadIdx.x < DIST_BLOCKS)
        part[threadIdx.x] = threadIdx.x < n_parts ? parts[threadIdx.x] : 0.0;
    __syncthreads();
    dist_tree(part);
    if (threadIdx.x == 0)
        a.out->dist = part[0];
}

/* The shared memory of opt_small_body: each phase's arrays, one phase at a time. */
typedef union {
    struct {
        unsigned cnt[OPT_SLOTS * OPT_MAX_KV * 8];
        unsigned long long tot[OPT_SLOTS];
    } c;
    struct {
        greedy_state_t st;
        uint32_t key[GREEDY_CHUNK], idx[GREEDY_CHUNK];
        uint8_t copt[GREEDY_CHUNK];
    } g;
    struct {
        double part[256], parts[DIST_BLOCKS];
    } d;
} opt_small_smem_t;

/* The whole optimizer of a layer of at most OPT_ONE_BLOCK items in one block of OPT_THREADS
 * threads (opt_small_kernel): the heads' mean deviations where the policy needs them
 * (dev_mean_kernel; into dev_mean, which a.dev_mean reads), the choice (choose_body, a grid of
 * one block: no grid barrier, no cooperative launch), the greedy fill (greedy_small_body)
 * and the distortion (dist_one_block); in place of up to five launches and a memset: a one-block pass stores its
 * counts instead of adding them, so the count buffers need no clearing. */
static __device__ void opt_small_body(const opt_args_t &a, float *dev_mean, opt_small_smem_t *sm)
{
    if (opt_need_dev_mean(a)) {
        for (uint32_t h = threadIdx.x; h < a.n_kv; h += blockDim.x)
            dev_mean[h] = dev_mean_of(a.tab + (size_t)TAB_DEV * a.n_items + (size_t)h * a.n, a.n);
        __syncthreads();
    }
    choose_body(a, NULL, sm->c.cnt, sm->c.tot);
    __syncthreads(); // the choice's flags (a.out) for every thread; the arrays free
    if (!a.no_budget)
        greedy_small_body(a, &sm->g.st, sm->g.key, sm->g.idx, sm->g.copt);
    __syncthreads();
    dist_one_block(a, sm->d.part, sm->d.parts);
}

#endif
