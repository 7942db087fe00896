/*
 * encode.cu: the encoder on the GPU, twin of encode.c. For one layer of K, V in device memory:
 *
 * 1. rotation: where a group's rows fit shared memory (G 32, d 128 do) the stats and quantizer
 *    rotate their staged rows themselves; otherwise rotate_kernel writes the Hadamard-rotated
 *    fp32 copy of every K and V row ([n_kv][n][d] each) for them to read (same values);
 * 2. stats_kernel (policies that measure distortion): per (kv head, group of G consecutive
 *    tokens) the tables encode.c's build_items computes on the CPU — |v - obar|^2 and the key
 *    and value errors at 8, 4 and 2 bits, trial-quantized or modelled — in the CPU's exact
 *    arithmetic order: a warp stages each K and V row (rotating it in registers), then each
 *    token's 8 threads run the CPU's 8 accumulator lanes and combine them in its order;
 * 3. the optimizer on the device (choose_kernel, one cooperative grid: distortions from the
 *    tables, the rate controller, the multiplier search, two of its steps per pass over the
 *    items (one where the grid is one block); cand_kernel, a radix sort and greedy_kernel: the
 *    greedy slack fill), the twin of kvc_encoder_choose (kvcodec/choose_dev_int.h). A layer of
 *    up to kvc_cuda_one_launch_items items takes all of it in one block of one launch instead
 *    (opt_small_kernel);
 * 4. the layout on the device (maps_kernel, layout_kernel, scatter_kernel): maps, header, run
 *    offsets and the payload's work items, the twin of kvc_encoder_write_head and plan_payload;
 * 5. f16_kernel (a warp per 4 FP16 tokens) and quant_kernel (a block per quantized group) write
 *    the payload; crc_kernel computes CRC32C of a warp's share of 128-byte rows (a word of
 *    each a lane, braided), shifts each to its place in the body and XORs them per block;
 *    crc_final_kernel XORs the blocks' parts.
 *
 * The frame equals kvc_encoder_encode_layer's byte for byte for finite inputs (the rules are in
 * kvcodec_cuda_int.h and above choose_kernel). The layer is one chain of kernels on the stream;
 * the call synchronizes once at the end for the frame size and the rate controller. With more
 * than OPT_MAX_KV kv heads or without cooperative launches the optimizer and the layout run on
 * the host between two synchronizations instead (the earlier design, same bytes).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcodec_cuda.h"
extern "C" {
#include "kvcodec_int.h"
}
#include "kvcodec_cuda_int.h"

#include <cooperative_groups.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
namespace cg = cooperative_groups;

#include "choose_dev_int.h"
#include "crc_dev_int.h"
#include "layout_dev_int.h"
#include "quant_rows_dev_int.h"
#include "stats_dev_int.h"

#define ROT_THREADS   256

/* Layers queued and not yet finished (kvc_encoder_enqueue_layer_cuda*). */
#define ENC_QUEUE 2

/* A queued layer: where its frame goes and what the host reads when it finishes. */
typedef struct {
    uint32_t layer;
    uint8_t *out;      // the frame (device)
    uint8_t *d_frame;  // [max_frame] the frame of the _host calls, made on first use
    plan_dev_t *h_lay; // pinned copy of the layout (the frame size and counts), in h_slots
    opt_out_t *h_out;  // pinned copy of the device optimizer's result, in h_slots
    cudaEvent_t ev[4]; // the GPU phases: [0, 1] scoring .. optimizer, [2, 3] layout .. CRC
    uint64_t t1;       // host clock once scored
    uint64_t score_ns; // scoring's share of the call (the encoder's own scores)
    bool done;         // the host optimizer finished it in the enqueue call: len and info
    size_t len;        //   are final
    kvc_layer_info_t info;
} enc_slot_t;

struct kvc_encoder_cuda {
    kvc_encoder_t *enc; // host optimizer and rate controller
    kvc_policy_t policy;
    uint32_t n_heads, n_kv, n, d, G, P;
    size_t max_frame;
    size_t n_items;
    unsigned crc_grid; // crc_kernel's blocks: enough for a full frame, as many as are resident
    unsigned crc_r;    // its copies of the tables: 32 (1024-thread blocks) or 8 (256)
    size_t crc_smem;   // its dynamic shared memory
    // device
    float *d_kr, *d_vr;    // [n_kv][n][d] rotated K, V (rotating policies)
    float *d_tab;          // [TAB_COUNT][n_kv][n]
    uint32_t *d_tok;       // [n_items] token indices of the quantized groups
    work_t *d_work;        // [n_items]
    uint32_t *d_crc;       // [crc_grid + 1] crc_kernel's parts (the blocks', the last piece's)
    kvc_scores_t d_scores; // own scores when the caller passes none
    // host, pinned; only for the host optimizer (host_opt_create)
    float *h_tab;                  // [TAB_COUNT][n_kv][n]
    uint32_t *h_tok;               // [n_items]
    work_t *h_work;                // [n_items]
    uint8_t *h_head;               // header + maps
    float *h_imp, *h_qsq, *h_obar; // host copies of the scores
    uint8_t *h_static;
    uint64_t *h_plan; // [4][n_kv][KVC_OPT_COUNT] payload planning scratch
    // Device optimizer (opt_on: the device and shape allow it, else the host optimizer runs)
    bool opt_on;
    unsigned opt_grid;         // blocks of the cooperative choose_kernel
    int opt_tree;              // multipliers a search pass measures (opt_args_t.tree)
    uint32_t quant_e; // FERRY_QUANT_IMPL=warp and the shape allows: quant_warp_kernel<quant_e>
    int stats_generic; // FERRY_STATS_IMPL=generic: stats_kernel's per-token passes all generic
    float *d_dist;             // [n_items][KVC_OPT_COUNT]
    uint8_t *d_opt8;           // [4][n_items]: allowed, choice, tmp, cand_opt
    unsigned long long *d_cnt; // [3][OPT_SLOTS][n_kv][8]
    long long *d_gcnt;         // [n_kv][8]
    float *d_dev_mean;         // [n_kv]
    uint8_t *d_backbone;       // [n]
    uint32_t *d_keys, *d_idx;  // [2][n_items] greedy candidates and their sorted order
    int *d_seg; // [2] the second pass's sort: one segment [0, d_seg[1]), empty when not needed
    void *d_sort_tmp;
    size_t sort_tmp_bytes;
    opt_out_t *d_out; // device result (each queued layer copies it to its slot)
    rc_dev_t *d_rc;   // rate controller state
    // Frame layout (both optimizers)
    plan_dev_t *d_plan, *h_lay; // device layout; the host optimizer's plan (pinned)
    unsigned long long *d_hcnt; // [n_kv][8]
    unsigned long long *d_runs; // [n_kv][8][3]
    unsigned long long *d_scnt; // [2][n_kv][n_seg][8] segment counts and bases
    uint32_t n_seg;
    unsigned sms;
    // Queued layers: slot[(q_head + i) % ENC_QUEUE] for i < q_len, in layer order.
    enc_slot_t slot[ENC_QUEUE];
    unsigned q_head, q_len;
    bool broken;          // an enqueue failed after its first launch: d_rc may count it
    uint8_t *h_slots;     // pinned: the slots' h_lay and h_out
    cudaStream_t s_copy;  // non-blocking: finished frames to the host while later layers run
    uint64_t last_gpu_ns; // stream time of the last finished layer's two GPU phases
};

/* ------------------------------------------------------------------------------------------ */
/* Kernels                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* One warp per row of K or V: fp16 -> fp32, Hadamard butterflies in quant.c's order (stage
 * len pairs i and i + len for every i with bit len clear), then the 1/sqrt(d) scale. */
__global__ void rotate_kernel(const uint16_t *k, const uint16_t *v, size_t hs, size_t ts,
                              uint32_t n_kv, uint32_t n, uint32_t d, float scale, float *kr,
                              float *vr)
{
    extern __shared__ float rot_sm[]; // [warps][d]
    uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *x = rot_sm + (size_t)warp * d;
    size_t rows = (size_t)2 * n_kv * n;
    size_t wpb = blockDim.x / 32;
    for (size_t row = (size_t)blockIdx.x * wpb + warp; row < rows; row += (size_t)gridDim.x * wpb) {
        bool is_v = row >= (size_t)n_kv * n;
        size_t r = is_v ? row - (size_t)n_kv * n : row;
        uint32_t h = (uint32_t)(r / n), t = (uint32_t)(r % n);
        const uint16_t *src = (is_v ? v : k) + (size_t)h * hs + (size_t)t * ts;
        for (uint32_t c = lane; c < d; c += 32)
            x[c] = fy_dev_h2f_arith(src[c]); // (every value goes through arithmetic)
        __syncwarp();
        for (uint32_t len = 1, lg = 0; len < d; len <<= 1, lg++) { // d: a power of two
            for (uint32_t j = lane; j < d / 2; j += 32) {
                uint32_t i = ((j >> lg) << (lg + 1)) | (j & (len - 1));
                float a = x[i], b = x[i + len];
                x[i] = kadd(a, b);
                x[i + len] = ksub(a, b);
            }
            __syncwarp();
        }
        float *dst = (is_v ? vr : kr) + r * d;
        for (uint32_t c = lane; c < d; c += 32)
            dst[c] = kmul(x[c], scale);
        __syncwarp();
    }
}


/* stats_body (stats_dev_int.h). 5 blocks an SM: what the staged rows (40 KiB at head_dim 128)
 * allow anyway; more registers for the rows in flight would cost occupancy. */
__global__ void __launch_bounds__(2 * STATS_THREADS, 5) stats_kernel(stats_args_t a)
{
    extern __shared__ float st_sm[];
    __shared__ float s_ke[3], s_kwrot;
    stats_body(a, st_sm, s_ke, &s_kwrot);
}

/* f16_body (layout_dev_int.h): 8 warps a block, 4 blocks an SM (64 registers). */
__global__ void __launch_bounds__(256, 3)
    f16_kernel(const work_t *work, const plan_dev_t *plan, const uint16_t *k, const uint16_t *v,
               size_t hs, size_t ts, uint32_t d, uint8_t *out)
{
    const size_t wpb = blockDim.x / 32;
    f16_body(work, plan->n_f16, k, v, hs, ts, d, out, (size_t)blockIdx.x * wpb + threadIdx.x / 32,
             (size_t)gridDim.x * wpb);
}

/* quant_body (quant_rows_dev_int.h): 5 blocks an SM, as stats_kernel (the staged group is 32 KiB
 * at head_dim 128). */
__global__ void __launch_bounds__(QUANT_THREADS, 5) quant_kernel(quant_args_t a)
{
    extern __shared__ float q_sm[];
    __shared__ quant_smem_t qs;
    quant_body(a, q_sm, qs);
}

/* quant_warp_body (quant_rows_dev_int.h) for head_dim 32 E: 4 blocks an SM (120 registers). */
template <int E>
__global__ void __launch_bounds__(QUANT_THREADS, 4) quant_warp_kernel(quant_args_t a)
{
    __shared__ float s_pmn[QUANT_THREADS / 32][32 * E], s_pmx[QUANT_THREADS / 32][32 * E];
    quant_warp_body<E>(a, s_pmn, s_pmx);
}

/* crc_parts with R copies of the tables in THREADS-thread blocks (crc_smem_words(R, THREADS)
 * words of dynamic shared memory): R = 32 where a block may have 133 KiB (sm_80, sm_90), one
 * block an SM; else R = 8 (37 KiB). */
template <int R, int THREADS>
__global__ void __launch_bounds__(THREADS)
    crc_kernel(const uint8_t *buf, const plan_dev_t *plan, uint32_t *parts)
{
    extern __shared__ uint32_t crc_sm[];
    crc_parts<R, THREADS>(buf, plan->body, parts, crc_sm);
}

/* crc_join for the layer's frame; with rc (the device optimizer), the frame's bytes and the
 * optimizer's multiplier (res) passed on to the next layer's rate control. */
__global__ void __launch_bounds__(CRC_FINAL_THREADS)
    crc_final_kernel(const uint32_t *parts, uint32_t n_parts, uint32_t log_warps,
                     const plan_dev_t *plan, uint8_t *out, rc_dev_t *rc, const opt_out_t *res)
{
    __shared__ uint32_t s[CRC_MAX_PARTS + CRC_POW_WORDS];
    crc_join(parts, n_parts, log_warps, plan->body, out, s);
    if (threadIdx.x == 0 && rc != NULL) { // kvc_encoder_set_lambda and kvc_encoder_commit_dist
        rc->spent += plan->total;
        rc->lambda_prev = res->lambda;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The option-choice optimizer on the device (kvc_encoder_choose's build_items, rate control,  */
/* multiplier bisection and greedy slack fill), the choice never leaving the GPU              */
/* ------------------------------------------------------------------------------------------ */

/* dev_mean_of for every head, a block each. */
__global__ void __launch_bounds__(DEV_MEAN_THREADS)
    dev_mean_kernel(const float *dev, uint32_t n, float *mean)
{
    __shared__ double part[DEV_MEAN_THREADS];
    const float m = dev_mean_block(dev + (size_t)blockIdx.x * n, n, part);
    if (threadIdx.x == 0)
        mean[blockIdx.x] = m;
}

/* opt_small_body as a kernel: one block of OPT_THREADS threads. */
__global__ void __launch_bounds__(OPT_THREADS) opt_small_kernel(opt_args_t a, float *dev_mean)
{
    __shared__ opt_small_smem_t sm;
    opt_small_body(a, dev_mean, &sm);
}

__global__ void __launch_bounds__(OPT_THREADS) choose_kernel(opt_args_t a)
{
    __shared__ unsigned s_cnt[OPT_SLOTS * OPT_MAX_KV * 8];
    __shared__ unsigned long long s_tot[OPT_SLOTS];
    cg::grid_group grid = cg::this_grid();
    choose_body(a, &grid, s_cnt, s_tot);
}

/* The greedy fill's candidates of one pass (cand_body), for the radix sort. */
__global__ void cand_kernel(opt_args_t a, uint32_t *keys, uint32_t *idx, const int *more)
{
    cand_body(a, keys, idx, more);
}

/* One pass of the greedy fill over the sorted candidates (greedy_pass_body). */
__global__ void __launch_bounds__(GREEDY_THREADS)
    greedy_kernel(opt_args_t a, const uint32_t *keys, const uint32_t *idx, int *seg_end)
{
    __shared__ greedy_state_t st;
    __shared__ uint32_t s_idx[GREEDY_CHUNK];
    __shared__ uint8_t s_cur[GREEDY_CHUNK], s_to[GREEDY_CHUNK];
    greedy_pass_body(a, &st, keys, idx, seg_end, s_idx, s_cur, s_to);
}

/* greedy_small_body as a kernel of its own (layers of OPT_ONE_BLOCK to GREEDY_CHUNK items). */
__global__ void __launch_bounds__(GREEDY_THREADS) greedy_small_kernel(opt_args_t a)
{
    __shared__ greedy_state_t st;
    __shared__ uint32_t s_key[GREEDY_CHUNK], s_idx[GREEDY_CHUNK];
    __shared__ uint8_t s_copt[GREEDY_CHUNK];
    greedy_small_body(a, &st, s_key, s_idx, s_copt);
}

/* The distortion of the final choice (info only): fixed-order partial sums, so it is the same
 * on every run, though not rounded as the CPU's serial sum. */
__global__ void __launch_bounds__(256) dist_kernel(opt_args_t a)
{
    __shared__ double part[256];
    dist_part(a, blockIdx.x, gridDim.x, part);
    if (threadIdx.x == 0)
        a.out->part[blockIdx.x] = part[0];
}

/* The blocks' partial sums in a fixed tree. */
__global__ void dist_final_kernel(opt_out_t *out, uint32_t n_parts)
{
    __shared__ double part[DIST_BLOCKS];
    part[threadIdx.x] = threadIdx.x < n_parts ? out->part[threadIdx.x] : 0.0;
    __syncthreads();
    dist_tree(part);
    if (threadIdx.x == 0)
        out->dist = part[0];
}

/* ------------------------------------------------------------------------------------------ */
/* Frame layout on the device: maps, header, payload work items and the CRC from the choice    */
/* ------------------------------------------------------------------------------------------ */

/* A block per (segment of LAYOUT_SEG tokens, head): maps_body. */
__global__ void __launch_bounds__(256) maps_kernel(plan_args_t a)
{
    __shared__ unsigned s_c[KVC_OPT_COUNT];
    maps_body(a, blockIdx.x, blockIdx.y, s_c);
}

/* One block: layout_body. */
__global__ void __launch_bounds__(LAYOUT_THREADS) layout_kernel(plan_args_t a)
{
    __shared__ layout_smem_t sm;
    layout_body(a, &sm);
}

/* A block per (segment, head): scatter_body. */
__global__ void __launch_bounds__(256) scatter_kernel(plan_args_t a)
{
    __shared__ unsigned s_w[8][KVC_OPT_COUNT]; // per warp, tokens of each option
    __shared__ unsigned long long s_base[KVC_OPT_COUNT];
    scatter_body(a, blockIdx.x, blockIdx.y, s_w, s_base);
}

/* plan_small_body as a kernel: one block of LAYOUT_THREADS threads. */
__global__ void __launch_bounds__(LAYOUT_THREADS) plan_small_kernel(plan_args_t a)
{
    __shared__ plan_small_smem_t sm;
    plan_small_body(a, &sm);
}

/* ------------------------------------------------------------------------------------------ */
/* Host                                                                                        */
/* ------------------------------------------------------------------------------------------ */

extern "C" void kvc_encoder_cuda_destroy(kvc_encoder_cuda_t *e)
{
    if (e == NULL)
        return;
    for (unsigned i = 0; i < e->q_len; i++) // queued layers still write the encoder's buffers
        cudaEventSynchronize(e->slot[(e->q_head + i) % ENC_QUEUE].ev[3]);
    kvc_encoder_destroy(e->enc);
    cudaFree(e->d_kr), cudaFree(e->d_vr), cudaFree(e->d_tab), cudaFree(e->d_tok);
    cudaFree(e->d_work), cudaFree(e->d_crc);
    cudaFree(e->d_dist), cudaFree(e->d_opt8), cudaFree(e->d_cnt), cudaFree(e->d_gcnt);
    cudaFree(e->d_dev_mean), cudaFree(e->d_backbone), cudaFree(e->d_keys), cudaFree(e->d_idx);
    cudaFree(e->d_sort_tmp), cudaFree(e->d_out), cudaFree(e->d_rc), cudaFree(e->d_seg);
    cudaFree(e->d_plan), cudaFreeHost(e->h_lay), cudaFree(e->d_hcnt), cudaFree(e->d_runs);
    cudaFree(e->d_scnt);
    for (int q = 0; q < ENC_QUEUE; q++) {
        enc_slot_t *sl = &e->slot[q];
        cudaFree(sl->d_frame);
        for (int i = 0; i < 4; i++)
            if (sl->ev[i])
                cudaEventDestroy(sl->ev[i]);
    }
    cudaFreeHost(e->h_slots);
    if (e->s_copy)
        cudaStreamDestroy(e->s_copy);
    kvc_scores_cleanup_cuda(&e->d_scores);
    cudaFreeHost(e->h_tab), cudaFreeHost(e->h_tok), cudaFreeHost(e->h_work);
    cudaFreeHost(e->h_head);
    free(e->h_imp), free(e->h_qsq), free(e->h_obar), free(e->h_static), free(e->h_plan);
    free(e);
}

static void stage_plan(const kvc_encoder_cuda_t *e, stage_t *sg)
{
    bool measured = e->policy.dist == KVC_DIST_TRIAL || e->policy.dist == KVC_DIST_MODEL;
    stage_rule(e->d, e->G, e->policy.rotate, measured, sg);
}

/* crc_kernel's form and grid for frames of up to max_frame bytes: 32 copies of the tables in
 * 1024-thread blocks where the device lets a block have their shared memory, else (or with
 * FERRY_CRC_COPIES=8) 8 in 256-thread blocks; a row per warp at least, at most the blocks that are
 * resident at once. The trees multiply by row[lq + log2(warps a block) + log2(blocks)] at most
 * (crc_pow_t has 32): the rows per warp are bounded so. */
static fy_status_t crc_setup(kvc_encoder_cuda_t *e, int dev)
{
    fy_status_t st = FY_OK;
    int optin = 0, per_sm = 0;
    KVC_CUDA_GOTO(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), st,
                  out);
    e->crc_r = (size_t)optin >= crc_smem_words(32, 1024) * sizeof(uint32_t) ? 32 : 8;
    if (kvc_cuda_knob("FERRY_CRC_COPIES", 8, 8, 0) == 8) // the smaller form, for testing it
        e->crc_r = 8;
    {
        const unsigned threads = e->crc_r == 32 ? 1024 : 256;
        e->crc_smem = crc_smem_words(e->crc_r, threads) * sizeof(uint32_t);
        const void *fn =
            e->crc_r == 32 ? (const void *)crc_kernel<32, 1024> : (const void *)crc_kernel<8, 256>;
        KVC_CUDA_GOTO(
            cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)e->crc_smem),
            st, out);
        KVC_CUDA_GOTO(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, (int)threads, e->crc_smem),
            st, out);
        const size_t rows = (e->max_frame + CRC_ROW - 1) / CRC_ROW, warps = threads / 32;
        e->crc_grid = (unsigned)FY_MIN(
            FY_MIN((size_t)kvc_grid(rows, (unsigned)warps), (size_t)FY_MAX(per_sm, 1) * e->sms),
            (size_t)CRC_MAX_PARTS);
        if (rows > ((size_t)e->crc_grid * warps << 16)) // lq <= 16: 16 + 5 + 10 < 32
            st = FY_ERR_INVALID_ARG;
    }
out:
    return st;
}

/* The device optimizer's buffers, when the device runs cooperative grids and the heads fit
 * its count histogram; otherwise opt_on stays false and the host optimizer runs. */
static fy_status_t opt_create(kvc_encoder_cuda_t *e)
{
    fy_status_t st = FY_OK;
    int dev = 0, coop = 0, sms = 0, per_sm = 0;
    if (e->n_kv > OPT_MAX_KV)
        return FY_OK;
    KVC_CUDA_GOTO(cudaGetDevice(&dev), st, fail);
    KVC_CUDA_GOTO(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev), st, fail);
    KVC_CUDA_GOTO(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), st, fail);
    KVC_CUDA_GOTO(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, choose_kernel, OPT_THREADS, 0), st,
        fail);
    if (!coop || per_sm < 1 || sms < 1)
        return FY_OK;
    {
        size_t items = e->n_items;
        // A short layer's passes are one block's: a few rounds of its threads cost less than
        // the grid barrier and the L2 round trips of the counts at every pass.
        size_t need = items <= OPT_ONE_BLOCK ? 1 : (items + OPT_THREADS - 1) / OPT_THREADS;
        e->opt_grid = (unsigned)FY_MIN((size_t)per_sm * (size_t)sms, need);
        // A grid's pass ends at a grid barrier and reads its counts back from L2: measuring
        // the next two steps at once (three multipliers) pays those once. One block's pass is
        // cheap, and each extra multiplier costs more than the barrier it saves: a step a
        // pass. Both measured on an H200 (Round 6 of bench/results/gpu-h200.md);
        // FERRY_OPT_TREE=1..8 sets the width, to time them side by side.
        e->opt_tree = (int)kvc_cuda_knob("FERRY_OPT_TREE", 1, OPT_SLOTS, e->opt_grid == 1 ? 1 : 3);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_dist, items * KVC_OPT_COUNT * sizeof(float)), st,
                      fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_opt8, 4 * items), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_cnt, 3 * (size_t)OPT_SLOTS * e->n_kv * 8 * 8), st,
                      fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_gcnt, (size_t)e->n_kv * 8 * 8), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_dev_mean, (size_t)e->n_kv * sizeof(float)), st,
                      fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_backbone, e->n), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_keys, 2 * items * sizeof(uint32_t)), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_idx, 2 * items * sizeof(uint32_t)), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_out, sizeof(opt_out_t)), st, fail);
        e->n_seg = (e->n + LAYOUT_SEG - 1) / LAYOUT_SEG;
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_scnt, (size_t)2 * e->n_kv * e->n_seg * 8 * 8), st,
                      fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_rc, sizeof(rc_dev_t)), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_seg, 2 * sizeof(int)), st, fail);
        KVC_CUDA_GOTO(cudaMemset(e->d_seg, 0, 2 * sizeof(int)), st, fail);
        KVC_CUDA_GOTO(cub::DeviceRadixSort::SortPairsDescending(NULL, e->sort_tmp_bytes, e->d_keys,
                                                                e->d_keys + items, e->d_idx,
                                                                e->d_idx + items, (int)items),
                      st, fail);
        size_t seg_tmp = 0;
        KVC_CUDA_GOTO(cub::DeviceSegmentedRadixSort::SortPairsDescending(
                          NULL, seg_tmp, e->d_keys, e->d_keys + items, e->d_idx, e->d_idx + items,
                          (int)items, 1, e->d_seg, e->d_seg + 1),
                      st, fail);
        e->sort_tmp_bytes = FY_MAX(e->sort_tmp_bytes, seg_tmp);
        KVC_CUDA_GOTO(cudaMalloc(&e->d_sort_tmp, FY_MAX(e->sort_tmp_bytes, (size_t)16)), st, fail);
        kvc_opt_inputs_t oi;
        kvc_encoder_opt_inputs(e->enc, 0, &oi);
        KVC_CUDA_GOTO(cudaMemcpy(e->d_backbone, oi.backbone, e->n, cudaMemcpyHostToDevice), st,
                      fail);
        // The rate controller starts where the host encoder does (nothing spent, the
        // calibrated first multiplier or none).
        rc_dev_t rc = {(unsigned long long)oi.spent, oi.lambda_prev};
        KVC_CUDA_GOTO(cudaMemcpy(e->d_rc, &rc, sizeof(rc), cudaMemcpyHostToDevice), st, fail);
    }
    e->opt_on = true;
    return FY_OK;
fail:
    return st;
}

/* The host optimizer's buffers (opt_on false: the tables, scores and frame plan come to the
 * host between the GPU phases); the device optimizer needs none of them, which spares a request
 * 48 bytes of pinned memory per (head, token): 12 MB for a Llama-3-8B layer of 32k tokens. */
static fy_status_t host_opt_create(kvc_encoder_cuda_t *e, size_t tab, size_t head_max)
{
    fy_status_t st = FY_OK;
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_tab, tab), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_tok, e->n_items * sizeof(uint32_t)), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_work, e->n_items * sizeof(work_t)), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_head, head_max), st, fail);
    KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_lay, sizeof(plan_dev_t)), st, fail);
    e->h_imp = (float *)malloc(e->n_items * sizeof(float));
    e->h_qsq = (float *)malloc((size_t)e->n_kv * e->d * sizeof(float));
    e->h_obar = (float *)malloc((size_t)e->n_kv * e->d * sizeof(float));
    e->h_static = (uint8_t *)malloc(e->n_kv);
    e->h_plan = (uint64_t *)malloc((size_t)4 * e->n_kv * KVC_OPT_COUNT * sizeof(uint64_t));
    if (!e->h_imp || !e->h_qsq || !e->h_obar || !e->h_static || !e->h_plan)
        st = FY_ERR_NO_MEMORY;
fail: // the caller destroys the encoder, which frees what was made
    return st;
}

/* The quantizer: quant_warp_kernel<E> (returns E) where FERRY_QUANT_IMPL=warp asks for it and
 * the shape allows it (head_dim 32 E for E = 1, 2, 4, groups of at most 4 QW_ROWS tokens, no
 * protected channels); 0 for quant_kernel. Opt-in until timed against quant_kernel on a GPU. */
static uint32_t quant_warp_e(const kvc_encoder_cuda_t *e)
{
    const char *v = getenv("FERRY_QUANT_IMPL");
    if (v == NULL || strcmp(v, "warp") != 0 || e->G > 4 * QW_ROWS || e->P > 0)
        return 0;
    return e->d == 32 || e->d == 64 || e->d == 128 ? e->d / 32 : 0;
}

extern "C" fy_status_t kvc_encoder_cuda_create(const kvc_encoder_params_t *params,
                                               kvc_encoder_cuda_t **enc_p)
{
    if (params == NULL || enc_p == NULL)
        return FY_ERR_INVALID_ARG;
    kvc_encoder_cuda_t *e = (kvc_encoder_cuda_t *)calloc(1, sizeof(*e));
    if (e == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t st = kvc_encoder_create(params, &e->enc);
    if (st != FY_OK) {
        free(e);
        return st;
    }
    e->policy = *params->policy;
    e->n_heads = params->n_heads;
    e->n_kv = params->n_kv_heads;
    e->n = params->n_tokens;
    e->d = params->head_dim;
    e->G = e->policy.group;
    e->P = e->policy.protect_channels;
    e->quant_e = quant_warp_e(e);
    const char *si = getenv("FERRY_STATS_IMPL"); // for timing the two side by side
    e->stats_generic = si != NULL && strcmp(si, "generic") == 0;
    e->n_items = (size_t)e->n_kv * e->n;
    if (e->n_items > UINT32_MAX) { // work items index tokens with 32 bits
        kvc_encoder_destroy(e->enc);
        free(e);
        return FY_ERR_INVALID_ARG;
    }
    e->max_frame = kvc_encoder_max_frame_bytes(e->enc);
    size_t head_max =
        KVC_FRAME_HEADER_BYTES + FY_ALIGN_UP((size_t)e->n_kv * kvc_map_bytes(e->n), 8);
    size_t rows = e->n_items * e->d * sizeof(float);
    size_t tab = (size_t)TAB_COUNT * e->n_items * sizeof(float);
    stage_t sg;
    stage_plan(e, &sg);
    if (e->policy.rotate && !sg.fused) { // fused: the rotated rows live in shared memory only
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_kr, rows), st, fail);
        KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_vr, rows), st, fail);
    }
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_tab, tab), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_tok, e->n_items * sizeof(uint32_t)), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_work, e->n_items * sizeof(work_t)), st, fail);
    for (int q = 0; q < ENC_QUEUE; q++) {
        enc_slot_t *sl = &e->slot[q];
        for (int i = 0; i < 4; i++)
            KVC_CUDA_GOTO(cudaEventCreate(&sl->ev[i]), st, fail);
    }
    {
        // Both slots' results in one pinned block: one allocation per request.
        size_t per = FY_ALIGN_UP(sizeof(plan_dev_t), 16) + FY_ALIGN_UP(sizeof(opt_out_t), 16);
        KVC_CUDA_GOTO(cudaMallocHost((void **)&e->h_slots, ENC_QUEUE * per), st, fail);
        for (int q = 0; q < ENC_QUEUE; q++) {
            e->slot[q].h_lay = (plan_dev_t *)(e->h_slots + q * per);
            e->slot[q].h_out =
                (opt_out_t *)(e->h_slots + q * per + FY_ALIGN_UP(sizeof(plan_dev_t), 16));
        }
    }
    KVC_CUDA_GOTO(cudaStreamCreateWithFlags(&e->s_copy, cudaStreamNonBlocking), st, fail);
    if ((st = kvc_scores_init_cuda(&e->d_scores, e->n_kv, e->n, e->d)) != FY_OK)
        goto fail;
    {
        int dev = 0, sms = 0;
        KVC_CUDA_GOTO(cudaGetDevice(&dev), st, fail);
        KVC_CUDA_GOTO(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), st, fail);
        e->sms = (unsigned)FY_MAX(sms, 1);
        if ((st = crc_setup(e, dev)) != FY_OK)
            goto fail;
    }
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_crc, (e->crc_grid + 1) * sizeof(uint32_t)), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_plan, sizeof(plan_dev_t)), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_hcnt, (size_t)e->n_kv * 8 * 8), st, fail);
    KVC_CUDA_GOTO(cudaMalloc((void **)&e->d_runs, (size_t)e->n_kv * 8 * 3 * 8), st, fail);
    if ((st = opt_create(e)) != FY_OK)
        goto fail;
    if (!e->opt_on && (st = host_opt_create(e, tab, head_max)) != FY_OK)
        goto fail;
    *enc_p = e;
    return FY_OK;
fail: // destroy takes half-built encoders
    kvc_encoder_cuda_destroy(e);
    return st;
}

extern "C" uint64_t kvc_encoder_cuda_last_gpu_ns(const kvc_encoder_cuda_t *e)
{
    return e->last_gpu_ns;
}

extern "C" size_t kvc_encoder_cuda_max_frame_bytes(const kvc_encoder_cuda_t *e)
{
    return e->max_frame;
}

extern "C" void kvc_encoder_cuda_totals(const kvc_encoder_cuda_t *e, uint64_t *bytes_p,
                                        uint64_t *budget_p)
{
    kvc_encoder_totals(e->enc, bytes_p, budget_p);
}

/* Cuts the payload of the current choice into work items: FP16 tokens first (work[0, n_f16)),
 * then the quantized groups, each with its frame offset, in write_frame's order (per head: the
 * options in order, each option's tokens in order, G at a time). Two passes over the choice:
 * counts per (head, option), then every token goes to its place. */
static void plan_payload(kvc_encoder_cuda_t *e, size_t payload_off, size_t *n_f16_p,
                         size_t *n_work_p)
{
    const uint8_t *choice = kvc_encoder_choice(e->enc);
    uint32_t n = e->n, d = e->d, G = e->G, P = e->P;
    uint64_t *cnt = e->h_plan;                             // [n_kv][KVC_OPT_COUNT]
    uint64_t *off = cnt + (size_t)e->n_kv * KVC_OPT_COUNT; // frame offset of each run
    uint64_t *wrk = off + (size_t)e->n_kv * KVC_OPT_COUNT; // first work item of each run
    uint64_t *tok = wrk + (size_t)e->n_kv * KVC_OPT_COUNT; // first token slot of each run
    memset(cnt, 0, (size_t)e->n_kv * KVC_OPT_COUNT * sizeof(uint64_t));
    for (uint32_t h = 0; h < e->n_kv; h++) {
        const uint8_t *ch = choice + (size_t)h * n;
        uint64_t *c = cnt + (size_t)h * KVC_OPT_COUNT;
        for (uint32_t t = 0; t < n; t++)
            c[ch[t]]++;
    }
    size_t n_f16 = 0;
    for (uint32_t h = 0; h < e->n_kv; h++)
        n_f16 += cnt[(size_t)h * KVC_OPT_COUNT + KVC_OPT_F16];
    uint64_t o_off = payload_off, o_f16 = 0, o_q = n_f16, o_tok = 0;
    for (uint32_t h = 0; h < e->n_kv; h++) {
        for (int o = 0; o < KVC_OPT_DROP; o++) {
            size_t r = (size_t)h * KVC_OPT_COUNT + o;
            off[r] = o_off;
            o_off += kvc_run_bytes(o, d, G, P, cnt[r]);
            if (o == KVC_OPT_F16) {
                wrk[r] = o_f16;
                o_f16 += cnt[r];
            } else {
                wrk[r] = o_q;
                o_q += (cnt[r] + G - 1) / G;
                tok[r] = o_tok;
                o_tok += cnt[r];
            }
        }
    }
    for (uint32_t h = 0; h < e->n_kv; h++) {
        const uint8_t *ch = choice + (size_t)h * n;
        uint64_t seen[KVC_OPT_COUNT] = {0};
        for (uint32_t t = 0; t < n; t++) {
            int o = ch[t];
            if (o == KVC_OPT_DROP)
                continue;
            size_t r = (size_t)h * KVC_OPT_COUNT + o;
            uint64_t k = seen[o]++;
            if (o == KVC_OPT_F16) {
                work_t w = {off[r] + 4 * (uint64_t)d * k, t, (uint16_t)h, (uint8_t)o, 0};
                e->h_work[wrk[r] + k] = w;
                continue;
            }
            e->h_tok[tok[r] + k] = t;
            if (k % G == 0) {
                uint64_t g = k / G, m = FY_MIN((uint64_t)G, cnt[r] - k);
                work_t w = {off[r] + g * kvc_group_bytes(o, d, G, P), (uint32_t)(tok[r] + k),
                            (uint16_t)h, (uint8_t)o, (uint8_t)(m - 1)};
                e->h_work[wrk[r] + g] = w;
            }
        }
    }
    FY_ASSERT(o_f16 == n_f16);
    *n_f16_p = n_f16;
    *n_work_p = o_q;
}

/* Queues the device optimizer for the layer on stream: distortions, the choice (rate control
 * from e->d_rc, bisection, greedy fill), its distortion; then the result into h_out (pinned),
 * valid once the stream reaches this point. */
static fy_status_t opt_enqueue(kvc_encoder_cuda_t *e, uint32_t layer, const kvc_scores_t *sc,
                               bool measured, opt_out_t *h_out, cudaStream_t cs)
{
    fy_status_t st = FY_OK;
    const kvc_policy_t *pol = &e->policy;
    uint32_t opts = pol->options, d = e->d, G = e->G, P = e->P;
    size_t items = e->n_items;
    kvc_opt_inputs_t oi;
    kvc_encoder_opt_inputs(e->enc, layer, &oi);
    opt_args_t a;
    memset(&a, 0, sizeof(a));
    a.n_kv = e->n_kv;
    a.n = e->n;
    a.G = G;
    a.n_items = items;
    a.tree = e->opt_tree;
    a.dist_kind = pol->dist;
    a.joint_kv = pol->joint_kv;
    a.stat_on = pol->hybrid_threshold > 0;
    a.measured = measured;
    a.sinks = pol->sinks;
    a.pins_kept = pol->pins_kept && !oi.no_budget; // build_items: no budget, pins at 16/16
    a.recent = pol->recent;
    a.options = opts;
    a.backbone_opt = pol->backbone_opt;
    a.hybrid_factor = pol->hybrid_factor;
    // encode.c's build_items: the same float division on the host, added to every importance.
    a.prior = measured ? pol->prior / (float)e->n : 0.0f;
    a.drop_spread = measured ? pol->drop_spread : 0.0f;
    a.need8 = (opts & KVC_OPT_BIT(KVC_OPT_Q8)) != 0;
    a.need4 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q4V2))) != 0;
    a.needv4 = (opts & KVC_OPT_BIT(KVC_OPT_Q4)) != 0;
    a.need2 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2))) != 0;
    a.needk2 = (opts & KVC_OPT_BIT(KVC_OPT_Q2)) != 0;
    a.flex = pol->rate_flex;
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        a.cost[o] = oi.cost[o];
        a.pen[o] = oi.rank_pen[o];
        uint32_t gs = kvc_group_tokens(o, G);
        a.gsz[o] = gs;
        if (o == KVC_OPT_DROP) {
            a.gfix[o] = a.gtok[o] = 0;
        } else {
            // kvc_group_bytes is affine in the token count.
            a.gfix[o] = kvc_group_bytes(o, d, 0, P);
            a.gtok[o] = kvc_group_bytes(o, d, 1, P) - a.gfix[o];
            if (o == KVC_OPT_F16) { // a group is one token of 4d bytes
                a.gfix[o] = 4 * (unsigned long long)d;
                a.gtok[o] = 0;
            }
        }
    }
    a.fixed = KVC_FRAME_HEADER_BYTES + FY_ALIGN_UP((size_t)e->n_kv * kvc_map_bytes(e->n), 8) + 4;
    a.no_budget = oi.no_budget;
    a.r = oi.r;
    a.rc = e->d_rc;
    a.total_budget = oi.total_budget;
    a.share_w = oi.share_w;
    a.share_left = oi.share_left;
    a.imp = sc->importance;
    a.is_static = sc->is_static;
    a.backbone = e->d_backbone;
    a.tab = e->d_tab;
    a.dev_mean = e->d_dev_mean;
    a.dist = e->d_dist;
    a.allowed = e->d_opt8;
    a.choice = e->d_opt8 + items;
    a.tmp = e->d_opt8 + 2 * items;
    a.cand_opt = e->d_opt8 + 3 * items;
    a.cnt = e->d_cnt;
    a.gcnt = e->d_gcnt;
    a.out = e->d_out;
    if (e->opt_grid == 1 && items <= kvc_cuda_one_launch_items()) { // all of it in one launch
        opt_small_kernel<<<1, OPT_THREADS, 0, cs>>>(a, e->d_dev_mean);
        KVC_LAUNCH_GOTO(st, out);
        goto fetch;
    }
    if (opt_need_dev_mean(a)) {
        dev_mean_kernel<<<e->n_kv, DEV_MEAN_THREADS, 0, cs>>>(e->d_tab + TAB_DEV * items, e->n,
                                                              e->d_dev_mean);
        KVC_LAUNCH_GOTO(st, out);
    }
    KVC_CUDA_GOTO(cudaMemsetAsync(e->d_cnt, 0, 3 * (size_t)OPT_SLOTS * e->n_kv * 8 * 8, cs), st,
                  out);
    {
        void *args[] = {&a};
        KVC_CUDA_GOTO(cudaLaunchCooperativeKernel((const void *)choose_kernel, e->opt_grid,
                                                  OPT_THREADS, args, 0, cs),
                      st, out);
    }
    if (!oi.no_budget && items <= GREEDY_CHUNK) { // no budget: nothing to fill
        greedy_small_kernel<<<1, GREEDY_THREADS, 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
    }
    // The second pass (hardly ever needed: the first ends once no upgrade fits, usually within
    // its first thousand candidates) sorts one segment whose end the first pass wrote on the
    // device: empty, so that the sort costs its launches alone, or every item (one block, slow,
    // but the same order as the full sort, which the host cannot choose without waiting).
    for (int pass = 0; pass < 2 && !oi.no_budget && items > GREEDY_CHUNK; pass++) {
        cand_kernel<<<kvc_grid(items, 256), 256, 0, cs>>>(a, e->d_keys, e->d_idx,
                                                          pass == 0 ? NULL : e->d_seg + 1);
        KVC_LAUNCH_GOTO(st, out);
        size_t tmp_bytes = e->sort_tmp_bytes;
        if (pass == 0)
            KVC_CUDA_GOTO(cub::DeviceRadixSort::SortPairsDescending(
                              e->d_sort_tmp, tmp_bytes, e->d_keys, e->d_keys + items, e->d_idx,
                              e->d_idx + items, (int)items, 0, 32, cs),
                          st, out);
        else
            KVC_CUDA_GOTO(cub::DeviceSegmentedRadixSort::SortPairsDescending(
                              e->d_sort_tmp, tmp_bytes, e->d_keys, e->d_keys + items, e->d_idx,
                              e->d_idx + items, (int)items, 1, e->d_seg, e->d_seg + 1, 0, 32, cs),
                          st, out);
        greedy_kernel<<<1, GREEDY_THREADS, 0, cs>>>(a, e->d_keys + items, e->d_idx + items,
                                                    pass == 0 ? e->d_seg + 1 : NULL);
        KVC_LAUNCH_GOTO(st, out);
    }
    {
        const unsigned parts = dist_parts(items);
        dist_kernel<<<parts, 256, 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
        dist_final_kernel<<<1, DIST_BLOCKS, 0, cs>>>(e->d_out, parts);
    }
    KVC_LAUNCH_GOTO(st, out);
fetch:
    KVC_CUDA_GOTO(cudaMemcpyAsync(h_out, e->d_out, sizeof(opt_out_t), cudaMemcpyDeviceToHost, cs),
                  st, out);
out:
    return st;
}

/* Queues the frame layout of the device optimizer's choice: maps and counts, run offsets and
 * header, work items (the twin of plan_payload). */
static fy_status_t layout_enqueue(kvc_encoder_cuda_t *e, uint32_t layer, uint8_t *out,
                                  cudaStream_t cs)
{
    FY_ASSERT(e->n_kv <= OPT_MAX_KV); // layout_kernel's per-head counts (device optimizer only)
    fy_status_t st = FY_OK;
    plan_args_t a;
    memset(&a, 0, sizeof(a));
    a.n_kv = e->n_kv;
    a.n = e->n;
    a.d = e->d;
    a.G = e->G;
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        uint32_t gs = kvc_group_tokens(o, e->G);
        a.gsz[o] = gs;
        a.gfix[o] = o == KVC_OPT_DROP ? 0 : kvc_group_bytes(o, e->d, 0, e->P);
        a.gtok[o] = o == KVC_OPT_DROP ? 0 : kvc_group_bytes(o, e->d, 1, e->P) - a.gfix[o];
        if (o == KVC_OPT_F16) { // a group is one token of 4d bytes
            a.gfix[o] = 4 * (unsigned long long)e->d;
            a.gtok[o] = 0;
        }
    }
    a.map_bytes = kvc_map_bytes(e->n);
    a.maps_total = FY_ALIGN_UP((size_t)e->n_kv * a.map_bytes, 8);
    kvc_encoder_header_fill(e->enc, layer, 0, 0, 0, a.hdr);
    a.choice = e->d_opt8 + e->n_items;
    a.n_seg = e->n_seg;
    a.scnt = e->d_scnt;
    a.sbase = e->d_scnt + (size_t)e->n_kv * e->n_seg * 8;
    a.hcnt = e->d_hcnt;
    a.runs = e->d_runs;
    a.work = e->d_work;
    a.tok = e->d_tok;
    a.plan = e->d_plan;
    a.out = out;
    dim3 grid(a.n_seg, e->n_kv);
    if (e->n_items <= OPT_ONE_BLOCK && e->n_items <= kvc_cuda_one_launch_items()) { // one launch
        plan_small_kernel<<<1, LAYOUT_THREADS, 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
    } else {
        maps_kernel<<<grid, 256, 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
        layout_kernel<<<1, LAYOUT_THREADS, 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
        scatter_kernel<<<grid, 256, 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
    }
out:
    return st;
}

/* Takes the finished results of slot sl into the host encoder (its rate controller follows the
 * device's) and into len and info; the device optimizer's layers wait for their last event. */
static fy_status_t slot_finish(kvc_encoder_cuda_t *e, enc_slot_t *sl)
{
    if (sl->done)
        return FY_OK;
    fy_status_t st = FY_OK;
    kvc_layer_info_t info;
    memset(&info, 0, sizeof(info));
    float ms01 = 0, ms23 = 0;
    KVC_CUDA_GOTO(cudaEventSynchronize(sl->ev[3]), st, out);
    KVC_CUDA_GOTO(cudaEventElapsedTime(&ms01, sl->ev[0], sl->ev[1]), st, out);
    KVC_CUDA_GOTO(cudaEventElapsedTime(&ms23, sl->ev[2], sl->ev[3]), st, out);
    e->last_gpu_ns = (uint64_t)((double)(ms01 + ms23) * 1e6);
    {
        size_t total = (size_t)sl->h_lay->total;
        FY_ASSERT(total <= e->max_frame);
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            info.tokens[o] = sl->h_lay->tokens[o];
        if (e->opt_on) {
            info.lambda = sl->h_out->lambda;
            info.budget_met = sl->h_out->budget_met != 0;
            kvc_encoder_set_lambda(e->enc, sl->h_out->lambda);
            kvc_encoder_commit_dist(e->enc, total, sl->h_out->dist, &info);
        } else {
            info.lambda = sl->info.lambda; // the host optimizer's, from the enqueue call
            info.budget_met = sl->info.budget_met;
            kvc_encoder_commit(e->enc, total, &info);
        }
        info.score_ns = sl->score_ns;
        info.encode_ns = fy_clock_ns() - sl->t1;
        sl->len = total;
        sl->info = info;
        sl->done = true;
    }
out:
    return st;
}

/* Queues the encode of layer in->layer into out (device, out_cap bytes) on stream as the last
 * of the encoder's queued layers. With the device optimizer nothing waits for the GPU; the
 * host optimizer waits for the tables, and then for the whole layer (its rate controller runs
 * on the host, so the next layer could not be chosen before). */
static fy_status_t enqueue_layer(kvc_encoder_cuda_t *e, const kvc_layer_input_t *in,
                                 const kvc_scores_t *scores, uint8_t *out, size_t out_cap,
                                 enc_slot_t *sl, cudaStream_t cs)
{
    {
        // The host encoder has committed the finished layers; the queued ones it has not yet
        // come between them and this one.
        if (in == NULL)
            return FY_ERR_INVALID_ARG;
        if (e->broken)
            return FY_ERR_STATE;
        uint32_t queued = 0;
        for (unsigned i = 0; i < e->q_len; i++)
            queued += e->slot[(e->q_head + i) % ENC_QUEUE].done ? 0 : 1;
        if (in->layer < queued || in->layer >= kvc_encoder_params(e->enc)->n_layers)
            return FY_ERR_STATE;
        kvc_layer_input_t chk = *in;
        chk.layer = in->layer - queued;
        fy_status_t cst = kvc_encoder_check_layer(e->enc, &chk, out_cap);
        if (cst != FY_OK)
            return cst;
    }
    fy_status_t st = FY_OK;
    sl->layer = in->layer;
    sl->out = out;
    sl->done = false;
    memset(&sl->info, 0, sizeof(sl->info));
    uint32_t n = e->n, d = e->d, n_kv = e->n_kv;
    size_t plane = e->n_items;
    stage_t sg;
    stage_plan(e, &sg);
    size_t st_sm = sg.st_sm, st_sm_stage = sg.st_sm_stage, q_stage_bytes = sg.q_stage_bytes;
    bool st_stage = sg.st_stage, q_stage = sg.q_stage, fused = sg.fused;
    float rot_scale = 1.0f / sqrtf((float)d);
    uint64_t t0 = fy_clock_ns();
    cudaError_t ce = cudaSuccess;
    if (e->q_len > 0) {
        // The queued layers share the encoder's buffers and d_rc: on another stream this one
        // starts after them (on the same stream the wait is already implied).
        ce = cudaStreamWaitEvent(cs, e->slot[(e->q_head + e->q_len - 1) % ENC_QUEUE].ev[3], 0);
    }
    if (ce == cudaSuccess)
        ce = cudaEventRecord(sl->ev[0], cs);
    if (ce != cudaSuccess)
        return kvc_cuda_status(ce);
    const kvc_scores_t *sc = scores;
    if (sc == NULL) {
        if ((st = kvc_score_cuda(&e->policy, e->n_heads, n_kv, n, d, in, &e->d_scores, cs)) !=
            FY_OK)
            return st;
        sc = &e->d_scores;
    } else if (sc->n_kv_heads != n_kv || sc->n_tokens != n || sc->head_dim != d ||
               !sc->importance || !sc->qsq || !sc->obar || !sc->is_static) {
        return FY_ERR_INVALID_ARG;
    }
    uint64_t t1 = fy_clock_ns();
    sl->t1 = t1;
    sl->score_ns = scores ? 0 : t1 - t0;
    const kvc_policy_t *pol = &e->policy;
    bool measured = pol->dist == KVC_DIST_TRIAL || pol->dist == KVC_DIST_MODEL;
    uint32_t opts = pol->options;
    if (!e->opt_on) { // the host optimizer reads the scores on the host
        KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_imp, sc->importance, plane * sizeof(float),
                                      cudaMemcpyDeviceToHost, cs),
                      st, out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_qsq, sc->qsq, (size_t)n_kv * d * sizeof(float),
                                      cudaMemcpyDeviceToHost, cs),
                      st, out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_obar, sc->obar, (size_t)n_kv * d * sizeof(float),
                                      cudaMemcpyDeviceToHost, cs),
                      st, out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_static, sc->is_static, n_kv, cudaMemcpyDeviceToHost, cs),
                      st, out);
    }
    kv_src_t src;
    src.k = in->k;
    src.v = in->v;
    src.hs = in->head_stride;
    src.ts = in->token_stride;
    src.kr = e->d_kr;
    src.vr = e->d_vr;
    src.n = n;
    src.d = d;
    src.vec = (((uintptr_t)in->k | (uintptr_t)in->v | in->head_stride * 2 | in->token_stride * 2) &
               15) == 0;
    if (pol->rotate && !fused) {
        int wpb = ROT_THREADS / 32;
        size_t rows = (size_t)2 * plane;
        rotate_kernel<<<kvc_grid(rows, wpb), ROT_THREADS, (size_t)wpb * d * sizeof(float), cs>>>(
            in->k, in->v, in->head_stride, in->token_stride, n_kv, n, d, rot_scale, e->d_kr,
            e->d_vr);
        KVC_LAUNCH_GOTO(st, out);
    }
    if (measured) {
        stats_args_t a;
        memset(&a, 0, sizeof(a)); // a.zero among the rest
        a.src = src;
        a.obar = sc->obar;
        a.qsq = sc->qsq;
        a.n_kv = n_kv;
        a.n = n;
        a.d = d;
        a.G = e->G;
        a.model = pol->dist == KVC_DIST_MODEL;
        a.rotate = pol->rotate;
        a.need8 = (opts & KVC_OPT_BIT(KVC_OPT_Q8)) != 0;
        a.need4 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q4V2))) != 0;
        a.needv4 = (opts & KVC_OPT_BIT(KVC_OPT_Q4)) != 0;
        a.need2 = (opts & (KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2))) != 0;
        a.needk2 = (opts & KVC_OPT_BIT(KVC_OPT_Q2)) != 0;
        a.tab = e->d_tab;
        size_t blocks = (size_t)n_kv * ((n + e->G - 1) / e->G);
        a.stage = st_stage;
        a.fused = fused;
        a.rot_scale = rot_scale;
        a.generic = e->stats_generic;
        stats_kernel<<<kvc_grid(blocks, 1), a.stage ? 2 * STATS_THREADS : STATS_THREADS,
                       a.stage ? st_sm_stage : st_sm, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
        // Only the tables the optimizer will read come back.
        for (int ti = 0; ti < TAB_COUNT && !e->opt_on; ti++) {
            if (!stats_wants(a, ti))
                continue;
            size_t at = (size_t)ti * plane;
            KVC_CUDA_GOTO(cudaMemcpyAsync(e->h_tab + at, e->d_tab + at, plane * sizeof(float),
                                          cudaMemcpyDeviceToHost, cs),
                          st, out);
        }
    }
    if (e->opt_on) {
        // Device optimizer and layout: no host step until the frame is complete.
        if ((st = opt_enqueue(e, in->layer, sc, measured, sl->h_out, cs)) != FY_OK)
            goto out;
        KVC_CUDA_GOTO(cudaEventRecord(sl->ev[1], cs), st, out);
        KVC_CUDA_GOTO(cudaEventRecord(sl->ev[2], cs), st, out);
        if ((st = layout_enqueue(e, in->layer, out, cs)) != FY_OK)
            goto out;
    } else {
        KVC_CUDA_GOTO(cudaEventRecord(sl->ev[1], cs), st, out);
        KVC_CUDA_GOTO(cudaStreamSynchronize(cs), st, out);
        // The optimizer, on the host, from the GPU's tables.
        kvc_scores_t hs;
        hs.n_kv_heads = n_kv;
        hs.n_tokens = n;
        hs.head_dim = d;
        hs.importance = e->h_imp;
        hs.obar = e->h_obar;
        hs.qsq = e->h_qsq;
        hs.is_static = e->h_static;
        kvc_err_tables_t tab;
        memset(&tab, 0, sizeof(tab));
        tab.dev = e->h_tab + TAB_DEV * plane;
        tab.ek[8] = e->h_tab + TAB_EK8 * plane;
        tab.ev[8] = e->h_tab + TAB_EV8 * plane;
        tab.ek[4] = e->h_tab + TAB_EK4 * plane;
        tab.ev[4] = e->h_tab + TAB_EV4 * plane;
        tab.ek[2] = e->h_tab + TAB_EK2 * plane;
        tab.ev[2] = e->h_tab + TAB_EV2 * plane;
        // (The host optimizer finishes each layer in its enqueue call: the host encoder's next
        // layer is this one.)
        if ((st = kvc_encoder_choose(e->enc, in, &hs, measured ? &tab : NULL, &sl->info)) != FY_OK)
            goto out;
        uint64_t tokens[KVC_OPT_COUNT] = {0};
        size_t total;
        size_t head = kvc_encoder_write_head(e->enc, in->layer, e->h_head, tokens, &total);
        FY_ASSERT(total <= out_cap && total - 4 <= e->max_frame);
        size_t n_f16, n_work;
        plan_payload(e, head, &n_f16, &n_work);
        size_t n_tok = 0;
        for (size_t i = n_f16; i < n_work; i++)
            n_tok += (size_t)e->h_work[i].m_minus_1 + 1;
        plan_dev_t *hp = e->h_lay;
        hp->n_f16 = n_f16;
        hp->n_work = n_work;
        hp->total = total;
        hp->body = total - 4;
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            hp->tokens[o] = tokens[o];
        KVC_CUDA_GOTO(cudaEventRecord(sl->ev[2], cs), st, out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(e->d_plan, hp, sizeof(*hp), cudaMemcpyHostToDevice, cs), st,
                      out);
        KVC_CUDA_GOTO(cudaMemcpyAsync(out, e->h_head, head, cudaMemcpyHostToDevice, cs), st, out);
        if (n_work > 0)
            KVC_CUDA_GOTO(cudaMemcpyAsync(e->d_work, e->h_work, n_work * sizeof(work_t),
                                          cudaMemcpyHostToDevice, cs),
                          st, out);
        if (n_tok > 0)
            KVC_CUDA_GOTO(cudaMemcpyAsync(e->d_tok, e->h_tok, n_tok * sizeof(uint32_t),
                                          cudaMemcpyHostToDevice, cs),
                          st, out);
    }
    {
        // The payload and the CRC, sized on the device (grid-stride loops over the counts in
        // d_plan).
        unsigned wide = FY_MAX(e->sms, 1u) * 16;
        f16_kernel<<<(unsigned)FY_MIN((size_t)wide, (size_t)kvc_grid(plane, 8 * F16_BATCH)), 256, 0,
                     cs>>>(e->d_work, e->d_plan, in->k, in->v, in->head_stride, in->token_stride, d,
                           out);
        KVC_LAUNCH_GOTO(st, out);
        quant_args_t a;
        memset(&a, 0, sizeof(a));
        a.work = e->d_work;
        a.plan = e->d_plan;
        a.tok = e->d_tok;
        a.src = src;
        a.qsq = sc->qsq;
        a.n = n;
        a.d = d;
        a.P = e->P;
        a.rotate = pol->rotate;
        a.out = out;
        a.stage = q_stage ? (int)e->G : 0;
        a.fused = fused;
        a.rot_scale = rot_scale;
        // A block per quantized group: at most a head's tokens in full groups plus a partial
        // one per quantized option. (A grid of the full width costs a short layer waves of
        // blocks that find no work: 13 us for a 128-token SmolLM2 layer on the H200.)
        size_t groups = (size_t)e->n_kv * ((n + e->G - 1) / e->G + KVC_OPT_DROP - 1);
        unsigned q_grid = (unsigned)FY_MIN((size_t)wide, FY_MAX(groups, (size_t)1));
        if (e->quant_e == 1)
            quant_warp_kernel<1><<<q_grid, QUANT_THREADS, 0, cs>>>(a);
        else if (e->quant_e == 2)
            quant_warp_kernel<2><<<q_grid, QUANT_THREADS, 0, cs>>>(a);
        else if (e->quant_e == 4)
            quant_warp_kernel<4><<<q_grid, QUANT_THREADS, 0, cs>>>(a);
        else
            quant_kernel<<<q_grid, QUANT_THREADS, a.stage ? q_stage_bytes : 0, cs>>>(a);
        KVC_LAUNCH_GOTO(st, out);
        if (e->crc_r == 32)
            crc_kernel<32, 1024><<<e->crc_grid, 1024, e->crc_smem, cs>>>(out, e->d_plan, e->d_crc);
        else
            crc_kernel<8, 256><<<e->crc_grid, 256, e->crc_smem, cs>>>(out, e->d_plan, e->d_crc);
        KVC_LAUNCH_GOTO(st, out);
        crc_final_kernel<<<1, CRC_FINAL_THREADS, 0, cs>>>(e->d_crc, e->crc_grid,
                                                          e->crc_r == 32 ? 5u : 3u, e->d_plan, out,
                                                          e->opt_on ? e->d_rc : NULL, e->d_out);
        KVC_LAUNCH_GOTO(st, out);
        KVC_CUDA_GOTO(
            cudaMemcpyAsync(sl->h_lay, e->d_plan, sizeof(plan_dev_t), cudaMemcpyDeviceToHost, cs),
            st, out);
        KVC_CUDA_GOTO(cudaEventRecord(sl->ev[3], cs), st, out);
    }
    if (!e->opt_on) // the next layer's choice needs this one's size on the host
        st = slot_finish(e, sl);
out:
    if (st != FY_OK) {
        // Kernels of this layer may be in flight and may have advanced d_rc: wait for them and
        // take no more layers (the queued ones before it stay valid).
        cudaStreamSynchronize(cs);
        e->broken = true;
    }
    return st;
}

/* The slot the next enqueue fills, or NULL with the queue full. */
static enc_slot_t *slot_next(kvc_encoder_cuda_t *e)
{
    return e->q_len < ENC_QUEUE ? &e->slot[(e->q_head + e->q_len) % ENC_QUEUE] : NULL;
}

extern "C" fy_status_t kvc_encoder_enqueue_layer_cuda(kvc_encoder_cuda_t *e,
                                                      const kvc_layer_input_t *in,
                                                      const kvc_scores_t *scores, uint8_t *out,
                                                      size_t out_cap, void *stream)
{
    if (e == NULL || out == NULL)
        return FY_ERR_INVALID_ARG;
    enc_slot_t *sl = slot_next(e);
    if (sl == NULL)
        return FY_ERR_STATE;
    fy_status_t st = enqueue_layer(e, in, scores, out, out_cap, sl, (cudaStream_t)stream);
    if (st == FY_OK)
        e->q_len++;
    return st;
}

/* The oldest queued layer, finished (slot_finish) but still queued. */
static fy_status_t head_finish(kvc_encoder_cuda_t *e, enc_slot_t **sl_p)
{
    if (e->q_len == 0)
        return FY_ERR_STATE;
    *sl_p = &e->slot[e->q_head];
    return slot_finish(e, *sl_p);
}

extern "C" fy_status_t kvc_encoder_finish_layer_cuda(kvc_encoder_cuda_t *e, size_t *len_p,
                                                     kvc_layer_info_t *info_p)
{
    if (e == NULL || len_p == NULL)
        return FY_ERR_INVALID_ARG;
    enc_slot_t *sl = NULL;
    fy_status_t st = head_finish(e, &sl);
    if (st != FY_OK)
        return st;
    e->q_head = (e->q_head + 1) % ENC_QUEUE;
    if (--e->q_len == 0)
        e->q_head = 0; // one layer at a time keeps to slot 0 (one frame buffer)
    *len_p = sl->len;
    if (info_p)
        *info_p = sl->info;
    return FY_OK;
}

extern "C" fy_status_t kvc_encoder_encode_layer_cuda(kvc_encoder_cuda_t *e,
                                                     const kvc_layer_input_t *in,
                                                     const kvc_scores_t *scores, uint8_t *out,
                                                     size_t out_cap, size_t *len_p,
                                                     kvc_layer_info_t *info_p, void *stream)
{
    if (e == NULL || out == NULL || len_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (e->q_len != 0) // layers queued by the enqueue calls come first
        return FY_ERR_STATE;
    fy_status_t st = kvc_encoder_enqueue_layer_cuda(e, in, scores, out, out_cap, stream);
    if (st != FY_OK)
        return st;
    return kvc_encoder_finish_layer_cuda(e, len_p, info_p);
}

/* The frame buffer of slot q, allocated if it is not yet. */
static fy_status_t slot_frame(kvc_encoder_cuda_t *e, int q)
{
    enc_slot_t *sl = &e->slot[q];
    if (sl->d_frame != NULL)
        return FY_OK;
    cudaError_t ce = cudaMalloc((void **)&sl->d_frame, e->max_frame);
    if (ce != cudaSuccess) {
        sl->d_frame = NULL;
        cudaGetLastError(); // an allocation failure is not sticky; clear it
    }
    return kvc_cuda_status(ce);
}

extern "C" fy_status_t kvc_encoder_cuda_reserve_host(kvc_encoder_cuda_t *e)
{
    if (e == NULL)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = FY_OK;
    for (int q = 0; q < ENC_QUEUE && st == FY_OK; q++)
        st = slot_frame(e, q);
    return st;
}

extern "C" fy_status_t kvc_encoder_enqueue_layer_cuda_host(kvc_encoder_cuda_t *e,
                                                           const kvc_layer_input_t *in,
                                                           const kvc_scores_t *scores, void *stream)
{
    if (e == NULL)
        return FY_ERR_INVALID_ARG;
    enc_slot_t *sl = slot_next(e);
    if (sl == NULL)
        return FY_ERR_STATE;
    fy_status_t fst = slot_frame(e, (int)(sl - e->slot));
    if (fst != FY_OK)
        return fst;
    return kvc_encoder_enqueue_layer_cuda(e, in, scores, sl->d_frame, e->max_frame, stream);
}

extern "C" fy_status_t kvc_encoder_finish_layer_cuda_host(kvc_encoder_cuda_t *e, uint8_t *out,
                                                          size_t out_cap, size_t *len_p,
                                                          kvc_layer_info_t *info_p)
{
    if (e == NULL || out == NULL || len_p == NULL)
        return FY_ERR_INVALID_ARG;
    enc_slot_t *sl = NULL;
    fy_status_t st = head_finish(e, &sl);
    if (st != FY_OK)
        return st;
    if (sl->len > out_cap || sl->out != sl->d_frame)
        return FY_ERR_INVALID_ARG; // the layer stays queued
    // The layer's work is complete: its bytes go on the encoder's own stream, beside the
    // later layers' work on the caller's.
    cudaError_t ce = cudaMemcpyAsync(out, sl->d_frame, sl->len, cudaMemcpyDeviceToHost, e->s_copy);
    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(e->s_copy);
    if (ce != cudaSuccess)
        return kvc_cuda_status(ce);
    return kvc_encoder_finish_layer_cuda(e, len_p, info_p);
}

extern "C" fy_status_t kvc_encoder_encode_layer_cuda_host(kvc_encoder_cuda_t *e,
                                                          const kvc_layer_input_t *in,
                                                          const kvc_scores_t *scores, uint8_t *out,
                                                          size_t out_cap, size_t *len_p,
                                                          kvc_layer_info_t *info_p, void *stream)
{
    if (e == NULL || out == NULL || len_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (e->q_len != 0)
        return FY_ERR_STATE;
    if (out_cap < e->max_frame)
        return FY_ERR_INVALID_ARG;
    fy_status_t st = kvc_encoder_enqueue_layer_cuda_host(e, in, scores, stream);
    if (st != FY_OK)
        return st;
    return kvc_encoder_finish_layer_cuda_host(e, out, out_cap, len_p, info_p);
}
