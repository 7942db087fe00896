/* The frame layout on the GPU (the twin of kvc_encoder_write_head and plan_payload): each
 * head's map bytes and option counts (maps_body), the run offsets, header and plan (layout_body)
 * and the payload's work items (scatter_body), and the FP16 tokens' payload from them
 * (f16_body), device code that two places compile:
 * kvcodec/encode.cu (maps_kernel, layout_kernel and scatter_kernel; plan_small_kernel, all
 * three in one block for a short layer) and tests/kvcodec/test_layout_emu.cc, which runs the
 * one-block form on host threads against the three-kernel form.
 *
 * Not a standalone header. The includer provides, before including it: kvcodec.h and
 * OPT_MAX_KV; and outside CUDA __device__, __forceinline__, threadIdx, blockDim,
 * __syncthreads, __shfl_sync, __shfl_up_sync, __shfl_xor_sync, __ballot_sync, __popc, atomicAdd
 * (unsigned), min, uint2, uint4, make_uint4 and __funnelshift_r. */
#ifndef FERRY_KVCODEC_LAYOUT_DEV_INT_H
#define FERRY_KVCODEC_LAYOUT_DEV_INT_H

#ifdef __CUDACC__
#define LAYOUT_UNROLL _Pragma("unroll")
#else
#define LAYOUT_UNROLL
#endif

#define LAYOUT_SEG     2048 // tokens of a head per layout block (even: whole map bytes)
#define LAYOUT_THREADS 256

/* One unit of payload work: an FP16 token (m = 1, tok = the token index) or a quantized group
 * (its tokens at tok_idx[tok .. tok + m)). */
typedef struct {
    uint64_t out_off; // byte offset in the frame
    uint32_t tok;
    uint16_t head;
    uint8_t opt;
    uint8_t m_minus_1;
} work_t;

/* What the payload kernels and the host read of a layer's layout (device memory). */
typedef struct {
    unsigned long long n_f16, n_work, total, body;
    unsigned long long tokens[KVC_OPT_COUNT];
} plan_dev_t;

typedef struct {
    uint32_t n_kv, n, d, G;
    unsigned long long gfix[KVC_OPT_COUNT], gtok[KVC_OPT_COUNT], gsz[KVC_OPT_COUNT];
    size_t map_bytes, maps_total;
    uint8_t hdr[KVC_FRAME_HEADER_BYTES]; // the header but opt_mask, payload and total
    const uint8_t *choice;               // [n_kv][n]
    uint32_t n_seg;                      // segments of LAYOUT_SEG tokens per head
    unsigned long long *scnt;            // [n_kv][n_seg][8] tokens per (head, segment, option)
    unsigned long long *sbase;           // [n_kv][n_seg][8] the same before the segment
    unsigned long long *hcnt;            // [n_kv][8] tokens per (head, option)
    unsigned long long *runs;            // [n_kv][8][3] frame offset, first work item, first token
    work_t *work;
    uint32_t *tok;
    plan_dev_t *plan;
    uint8_t *out;
} plan_args_t;

/* kvc_run_bytes from the byte model; a head's count fits 32 bits (n_tokens <= KVC_MAX_TOKENS), so
 * the division is a 32-bit one. */
static __device__ __forceinline__ unsigned long long plan_run_bytes(const plan_args_t &a, int o,
                                                                    uint32_t count)
{
    if (o == KVC_OPT_DROP || count == 0)
        return 0;
    const uint32_t gs = (uint32_t)a.gsz[o], full = count / gs, rest = count - full * gs;
    unsigned long long b = (unsigned long long)full * (a.gfix[o] + gs * a.gtok[o]);
    if (rest)
        b += a.gfix[o] + rest * a.gtok[o];
    return b;
}

/* One (segment of LAYOUT_SEG tokens, head), by the whole block (maps_kernel: a block each): its
 * map bytes (two tokens a byte, low nibble first) and its tokens per option. s_c:
 * KVC_OPT_COUNT entries of the block's shared memory. */
static __device__ void maps_body(const plan_args_t &a, uint32_t seg, uint32_t h, unsigned *s_c)
{
    uint32_t n = a.n;
    uint32_t t_lo = seg * LAYOUT_SEG, t_hi = min(n, t_lo + LAYOUT_SEG);
    if (threadIdx.x < KVC_OPT_COUNT)
        s_c[threadIdx.x] = 0;
    __syncthreads();
    const uint8_t *ch = a.choice + (size_t)h * n;
    uint8_t *mp = a.out + KVC_FRAME_HEADER_BYTES + (size_t)h * a.map_bytes;
    unsigned c[KVC_OPT_COUNT] = {0, 0, 0, 0, 0, 0};
    for (uint32_t b = t_lo / 2 + threadIdx.x; 2 * b < t_hi; b += blockDim.x) {
        uint32_t t = 2 * b;
        uint32_t lo = ch[t], hi = t + 1 < n ? ch[t + 1] : 0;
        mp[b] = (uint8_t)(lo | (hi << 4));
        LAYOUT_UNROLL
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            c[o] += (lo == (uint32_t)o) + (t + 1 < n && hi == (uint32_t)o);
    }
    LAYOUT_UNROLL
    for (int o = 0; o < KVC_OPT_COUNT; o++) {
        unsigned v = c[o];
        for (int off = 16; off > 0; off >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x % 32 == 0 && v)
            atomicAdd(&s_c[o], v);
    }
    __syncthreads();
    if (threadIdx.x < KVC_OPT_COUNT)
        a.scnt[((size_t)h * a.n_seg + seg) * 8 + threadIdx.x] = s_c[threadIdx.x];
}

/* layout_body's shared memory. */
typedef struct {
    unsigned long long hcnt[OPT_MAX_KV * KVC_OPT_COUNT]; // n_kv <= OPT_MAX_KV
    unsigned long long tokens[KVC_OPT_COUNT];
    unsigned long long payload, total;
    unsigned long long scan[LAYOUT_THREADS / 32][4];
    uint32_t mask;
} layout_smem_t;

/* Exclusive prefix sums, in thread order, of the block's four values a thread (v, replaced by
 * its sums; the block's totals into tot): a scan within each warp, then over the warps' totals
 * (s: a row per warp of the block's shared memory). Integers, so exact. Every thread calls it. */
static __device__ void layout_exscan4(unsigned long long v[4], unsigned long long tot[4],
                                      unsigned long long (*s)[4])
{
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    unsigned long long inc[4];
    LAYOUT_UNROLL
    for (int k = 0; k < 4; k++) {
        inc[k] = v[k];
        for (uint32_t off = 1; off < 32; off <<= 1) {
            const unsigned long long x = __shfl_up_sync(0xffffffffu, inc[k], off);
            if (lane >= off)
                inc[k] += x;
        }
        if (lane == 31)
            s[warp][k] = inc[k];
    }
    __syncthreads();
    if (warp == 0) {
        LAYOUT_UNROLL
        for (int k = 0; k < 4; k++) {
            unsigned long long w = lane < nw ? s[lane][k] : 0;
            for (uint32_t off = 1; off < 32; off <<= 1) {
                const unsigned long long x = __shfl_up_sync(0xffffffffu, w, off);
                if (lane >= off)
                    w += x;
            }
            if (lane < nw)
                s[lane][k] = w;
        }
    }
    __syncthreads();
    LAYOUT_UNROLL
    for (int k = 0; k < 4; k++) {
        v[k] = (warp > 0 ? s[warp - 1][k] : 0) + inc[k] - v[k];
        tot[k] = s[nw - 1][k];
    }
    __syncthreads(); // s is free again
}

/* One block: plan_payload's run offsets (per head, the options in order), the header, the
 * zero padding of the maps. A thread per (head, option) sums its segments; the run offsets are
 * a prefix sum over the block. (A single thread walking the counts in global memory waited on
 * each load in turn: 8.5-19 us a layer.) */
static __device__ void layout_body(const plan_args_t &a, layout_smem_t *sm)
{
    unsigned long long *s_hcnt = sm->hcnt, *s_tokens = sm->tokens;
    unsigned long long &s_payload = sm->payload, &s_total = sm->total;
    uint32_t &s_mask = sm->mask;
    const uint32_t n_pairs = a.n_kv * KVC_OPT_COUNT;
    for (uint32_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
        const uint32_t h = p / KVC_OPT_COUNT, o = p % KVC_OPT_COUNT;
        const size_t at = (size_t)h * a.n_seg * 8 + o;
        const unsigned long long *__restrict__ cnt = a.scnt + at;
        unsigned long long *__restrict__ base = a.sbase + at;
        unsigned long long c = 0;
        for (uint32_t sg = 0; sg < a.n_seg; sg++) {
            base[(size_t)sg * 8] = c;
            c += cnt[(size_t)sg * 8];
        }
        s_hcnt[p] = c;
        a.hcnt[h * 8 + o] = c;
    }
    __syncthreads();
    if (threadIdx.x < KVC_OPT_COUNT) {
        unsigned long long t = 0;
        for (uint32_t h = 0; h < a.n_kv; h++)
            t += s_hcnt[h * KVC_OPT_COUNT + threadIdx.x];
        s_tokens[threadIdx.x] = t;
        a.plan->tokens[threadIdx.x] = t;
    }
    __syncthreads();
    // The runs in (head, option) order, a few consecutive ones a thread: their frame bytes, FP16
    // tokens, quantized groups and quantized tokens, prefix-summed over the block. (Thread 0
    // walking every run, with a 64-bit division or two each, took most of the layout's time.)
    const uint32_t n_runs = a.n_kv * KVC_OPT_DROP;
    const uint32_t per = (n_runs + blockDim.x - 1) / blockDim.x;
    const uint32_t p0 = min(threadIdx.x * per, n_runs), p1 = min(p0 + per, n_runs);
    unsigned long long v[4] = {0, 0, 0, 0}, tot[4];
    for (uint32_t p = p0; p < p1; p++) {
        const uint32_t h = p / KVC_OPT_DROP, o = p % KVC_OPT_DROP;
        const uint32_t cnt = (uint32_t)s_hcnt[h * KVC_OPT_COUNT + o]; // <= KVC_MAX_TOKENS
        v[0] += plan_run_bytes(a, (int)o, cnt);
        if (o == KVC_OPT_F16) {
            v[1] += cnt;
        } else {
            v[2] += (cnt + a.G - 1) / a.G;
            v[3] += cnt;
        }
    }
    layout_exscan4(v, tot, sm->scan);
    const unsigned long long n_f16 = s_tokens[KVC_OPT_F16];
    const unsigned long long head = KVC_FRAME_HEADER_BYTES + a.maps_total;
    unsigned long long o_off = head + v[0], o_f16 = v[1], o_q = n_f16 + v[2], o_tok = v[3];
    for (uint32_t p = p0; p < p1; p++) {
        const uint32_t h = p / KVC_OPT_DROP, o = p % KVC_OPT_DROP;
        const uint32_t cnt = (uint32_t)s_hcnt[h * KVC_OPT_COUNT + o];
        unsigned long long *r = a.runs + ((size_t)h * 8 + o) * 3;
        r[0] = o_off;
        o_off += plan_run_bytes(a, (int)o, cnt);
        if (o == KVC_OPT_F16) {
            r[1] = o_f16;
            o_f16 += cnt;
        } else {
            r[1] = o_q;
            o_q += (cnt + a.G - 1) / a.G;
            r[2] = o_tok;
            o_tok += cnt;
        }
    }
    if (threadIdx.x == 0) {
        uint32_t mask = 0;
        for (int o = 0; o < KVC_OPT_COUNT; o++)
            if (s_tokens[o])
                mask |= 1u << o;
        s_mask = mask;
        s_payload = tot[0];
        s_total = head + tot[0] + 4;
        a.plan->n_f16 = n_f16;
        a.plan->n_work = n_f16 + tot[2];
        a.plan->total = head + tot[0] + 4;
        a.plan->body = head + tot[0];
    }
    __syncthreads();
    uint8_t *hd = a.out;
    for (uint32_t i = threadIdx.x; i < KVC_FRAME_HEADER_BYTES; i += blockDim.x) {
        uint8_t b = a.hdr[i];
        if (i == 44)
            b = (uint8_t)s_mask;
        else if (i >= 48 && i < 56)
            b = (uint8_t)(s_payload >> (8 * (i - 48)));
        else if (i >= 56 && i < 64)
            b = (uint8_t)(s_total >> (8 * (i - 56)));
        hd[i] = b;
    }
    for (size_t i = (size_t)a.n_kv * a.map_bytes + threadIdx.x; i < a.maps_total; i += blockDim.x)
        hd[KVC_FRAME_HEADER_BYTES + i] = 0;
}

/* One (segment, head), by the whole block (scatter_kernel: a block each; s_w and s_base in its
 * shared memory): every token's rank among its head's tokens of the same option
 * (the segment's base from layout_kernel, then a scan of 256 tokens at a time: warp ballots,
 * the warps in order), giving the work items in plan_payload's order: an FP16 token each, a
 * quantized group per G tokens of an option. */
static __device__ void scatter_body(const plan_args_t &a, uint32_t seg, uint32_t h,
                                    unsigned (*s_w)[KVC_OPT_COUNT], unsigned long long *s_base)
{
    uint32_t n = a.n, warp = threadIdx.x / 32,
             lane = threadIdx.x % 32;
    uint32_t t_lo = seg * LAYOUT_SEG, t_hi = min(n, t_lo + LAYOUT_SEG);
    const uint8_t *ch = a.choice + (size_t)h * n;
    if (threadIdx.x < KVC_OPT_COUNT)
        s_base[threadIdx.x] = a.sbase[((size_t)h * a.n_seg + seg) * 8 + threadIdx.x];
    unsigned lt = (1u << lane) - 1;
    for (uint32_t t0 = t_lo; t0 < t_hi; t0 += 256) {
        uint32_t t = t0 + threadIdx.x;
        int o = t < t_hi ? ch[t] : -1;
        unsigned my_rank = 0;
        for (int q = 0; q < KVC_OPT_COUNT; q++) {
            unsigned m = __ballot_sync(0xffffffffu, o == q);
            if (o == q)
                my_rank = __popc(m & lt);
            if (lane == 0)
                s_w[warp][q] = __popc(m);
        }
        __syncthreads();
        if (o >= 0 && o != KVC_OPT_DROP) {
            unsigned long long k = s_base[o] + my_rank;
            for (uint32_t w = 0; w < warp; w++)
                k += s_w[w][o];
            const unsigned long long *r = a.runs + ((size_t)h * 8 + o) * 3;
            if (o == KVC_OPT_F16) {
                work_t wk = {r[0] + 4 * (unsigned long long)a.d * k, t, (uint16_t)h, (uint8_t)o, 0};
                a.work[r[1] + k] = wk;
            } else {
                a.tok[r[2] + k] = t;
                if (k % a.G == 0) {
                    unsigned long long g = k / a.G, cnt = a.hcnt[h * 8 + o];
                    unsigned long long m = cnt - k < a.G ? cnt - k : a.G;
                    work_t wk = {r[0] + g * (a.gfix[o] + a.G * a.gtok[o]), (uint32_t)(r[2] + k),
                                 (uint16_t)h, (uint8_t)o, (uint8_t)(m - 1)};
                    a.work[r[1] + g] = wk;
                }
            }
        }
        __syncthreads();
        if (threadIdx.x < KVC_OPT_COUNT) {
            unsigned s = 0;
            for (uint32_t w = 0; w < blockDim.x / 32; w++)
                s += s_w[w][threadIdx.x];
            s_base[threadIdx.x] += s;
        }
        __syncthreads();
    }
}

/* plan_small_body's shared memory. */
typedef struct {
    unsigned c[KVC_OPT_COUNT];
    layout_smem_t l;
    unsigned w[8][KVC_OPT_COUNT];
    unsigned long long base[KVC_OPT_COUNT];
} plan_small_smem_t;

/* maps_kernel, layout_kernel and scatter_kernel in one block of up to 256 threads, for a layer
 * of one segment per head (n <= LAYOUT_SEG): the heads' maps, then the layout, then the heads'
 * work items, with a barrier between the phases (their only hand-over is through memory the
 * block wrote). The same bytes as the three kernels. */
static __device__ void plan_small_body(const plan_args_t &a, plan_small_smem_t *sm)
{
    for (uint32_t h = 0; h < a.n_kv; h++)
        maps_body(a, 0, h, sm->c);
    __syncthreads();
    layout_body(a, &sm->l);
    __syncthreads();
    for (uint32_t h = 0; h < a.n_kv; h++)
        scatter_body(a, 0, h, sm->w, sm->base);
}

/* ------------------------------------------------------------------------------------------ */
/* The FP16 tokens' payload (f16_kernel)                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Copies bytes with the destination at any alignment (the source 2-byte aligned): single
 * bytes up to an aligned destination word, words assembled from the two aligned source words
 * around them (both hold bytes of the range, so they stay inside the allocation), single
 * bytes at the end. Threads `lane` of `width` share the work. */
static __device__ __noinline__ void copy_bytes(uint8_t *dst, const uint8_t *src, uint32_t bytes,
                                               uint32_t lane, uint32_t width)
{
    uint32_t head = (uint32_t)((4 - ((uintptr_t)dst & 3)) & 3);
    if (head > bytes)
        head = bytes;
    for (uint32_t i = lane; i < head; i += width)
        dst[i] = src[i];
    uint32_t words = (bytes - head) / 4;
    uint32_t *dw = (uint32_t *)(dst + head);
    const uint8_t *s = src + head;
    uint32_t sh = (uint32_t)((uintptr_t)s & 3);
    const uint32_t *sw = (const uint32_t *)(s - sh);
    for (uint32_t i = lane; i < words; i += width)
        dw[i] = sh ? __funnelshift_r(sw[i], sw[i + 1], 8 * sh) : sw[i];
    for (uint32_t i = head + 4 * words + lane; i < bytes; i += width)
        dst[i] = src[i];
}

#define F16_BATCH 4 // tokens a warp has in flight

/* Work items [0, n_f16) (the FP16 tokens come first): token w.tok of head w.head, its K row then
 * its V row (d halves each, rows at head stride hs and token stride ts) at out + w.out_off,
 * unchanged. Warp `warp` of `warps` takes F16_BATCH items at a time: their descriptors in one
 * load of F16_BATCH lanes, issued a batch ahead, then, where every row and destination is 8-byte
 * aligned and a row is at most 32 words (head_dim <= 128, the usual case), all of their rows
 * loaded before the first store, so that a warp waits out about one memory latency per batch
 * instead of two per token. */
static __device__ void f16_body(const work_t *work, size_t n_f16, const uint16_t *k,
                                const uint16_t *v, size_t hs, size_t ts, uint32_t d, uint8_t *out,
                                size_t warp, size_t warps)
{
    const uint32_t lane = threadIdx.x % 32, words = d / 4; // 8-byte words a row (d % 8 == 0)
    // Lane b < F16_BATCH holds item i0 + b's work_t: out_off (x, y), tok (z), head (w, low half);
    // the next batch's are loaded while this one's rows are.
    uint4 next = make_uint4(0, 0, 0, 0);
    if (lane < F16_BATCH && warp * F16_BATCH + lane < n_f16)
        next = *(const uint4 *)(work + warp * F16_BATCH + lane);
    for (size_t i0 = warp * F16_BATCH; i0 < n_f16; i0 += warps * F16_BATCH) {
        const uint4 wv = next;
        const size_t i1 = i0 + warps * F16_BATCH;
        if (lane < F16_BATCH && i1 + lane < n_f16)
            next = *(const uint4 *)(work + i1 + lane);
        const uint32_t nb = n_f16 - i0 < F16_BATCH ? (uint32_t)(n_f16 - i0) : F16_BATCH;
        size_t row[F16_BATCH];   // of K and V, in halves
        uint64_t off[F16_BATCH]; // in out
        uintptr_t align = 0;
        LAYOUT_UNROLL
        for (uint32_t b = 0; b < F16_BATCH; b++) {
            off[b] = (uint64_t)__shfl_sync(0xffffffffu, wv.x, (int)b) |
                     (uint64_t)__shfl_sync(0xffffffffu, wv.y, (int)b) << 32;
            const uint32_t tok = __shfl_sync(0xffffffffu, wv.z, (int)b);
            const uint32_t head = __shfl_sync(0xffffffffu, wv.w, (int)b) & 0xffffu;
            row[b] = (size_t)head * hs + (size_t)tok * ts;
            if (b < nb)
                align |=
                    (uintptr_t)(k + row[b]) | (uintptr_t)(v + row[b]) | (uintptr_t)(out + off[b]);
        }
        if ((align & 7) == 0 && words <= 32) {
            uint2 kk[F16_BATCH], vv[F16_BATCH];
            LAYOUT_UNROLL
            for (uint32_t b = 0; b < F16_BATCH; b++)
                if (b < nb && lane < words) {
                    kk[b] = ((const uint2 *)(k + row[b]))[lane];
                    vv[b] = ((const uint2 *)(v + row[b]))[lane];
                }
            LAYOUT_UNROLL
            for (uint32_t b = 0; b < F16_BATCH; b++)
                if (b < nb && lane < words) {
                    uint2 *dw = (uint2 *)(out + off[b]);
                    dw[lane] = kk[b];
                    dw[words + lane] = vv[b];
                }
            continue;
        }
        LAYOUT_UNROLL
        for (uint32_t b = 0; b < F16_BATCH; b++) { // (indices fixed: row and off stay in registers)
            if (b >= nb)
                break;
            const uint16_t *kr = k + row[b], *vr = v + row[b];
            uint8_t *dst = out + off[b];
            if ((((uintptr_t)kr | (uintptr_t)vr | (uintptr_t)dst) & 7) == 0) {
                const uint2 *kw = (const uint2 *)kr, *vw = (const uint2 *)vr;
                uint2 *dw = (uint2 *)dst;
                for (uint32_t j = lane; j < words; j += 32) {
                    dw[j] = kw[j];
                    dw[words + j] = vw[j];
                }
                continue;
            }
            copy_bytes(dst, (const uint8_t *)kr, 2 * d, lane, 32);
            copy_bytes(dst + 2 * d, (const uint8_t *)vr, 2 * d, lane, 32);
        }
    }
}

#endif
