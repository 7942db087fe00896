/* The decode attention kernels' device code (kvcodec/attend.cu, whose comment describes them):
 * the SIMT split kernel's body (attend_split_body), the combine kernel's (attend_combine_body)
 * and the tensor-core kernel's (attend_mma_body), with everything they call, and the host
 * arithmetic of their shared memory, workspace and arguments (attend_shape, attend_ws_plan,
 * attend_params).
 * Two places compile it: attend.cu, and tests/kvcodec/test_attend_emu.cc, which runs the bodies
 * on host threads (tests/kvcodec/cuda_emu.h) against kvc_attend.
 *
 * Not a standalone header. The includer provides kvcodec_cuda.h (kvc_gpu_pages_t,
 * kvc_attend_batch_t) and, without CUDA, what the device code takes from CUDA: the warp
 * intrinsics, the FP16 conversions, the cp.async pipeline calls, and the functions written in
 * PTX below (mma16816, and_or, sub1024, hfma2_u, lds128, ex2_approx, prefetch_l2). */
#ifndef FERRY_KVCODEC_ATTEND_DEV_INT_H
#define FERRY_KVCODEC_ATTEND_DEV_INT_H

constexpr int kThreads = 128; // threads per block of kernel 1 (4 warps)
constexpr int kChunk = 256;   // tokens per logit/softmax chunk
constexpr int kMaxRows = 8;   // GQA group size handled per block
constexpr int kMaxSplits = 256;
constexpr int kOpts = 5; // F16, 8/8, 4/4, 4/2, 2/2
constexpr size_t kWsAlign = 256;

struct attn_params {
    const uint8_t *base;
    size_t page_bytes;
    uint32_t n_pages, d, G, P;
    uint32_t slot_bytes[kOpts];
    uint32_t n_heads, n_kv, n_items, n_splits;
    uint32_t lpt;       // lanes per token (power of two, <= 32)
    uint32_t buf_bytes; // shared staging buffer (page, then the token-lane reduction)
    const uint32_t *list_start;
    const uint32_t *page_ids;
    const float *q;
    float scale;
    float *out;
    float *ws_m, *ws_l;      // [n_items][n_splits][rows] running max and sum at the end
    float *ws_mp;            // [n_items][n_splits][rows] running max when ws_acc was taken
    float *ws_acc, *ws_accr; // [n_items][n_splits][rows][d] plain / rotated accumulators
    uint32_t *ws_rot;        // [n_items][n_splits]
    uint32_t *ws_err;        // [1] pages skipped
    uint32_t *ws_cnt;        // [n_items] splits done per list (FUSE kernels), zero at launch
    // Tensor-core path (attend_mma_kernel) only: shared memory layout, see mma_layout.
    uint32_t rows;   // query rows per list
    uint32_t m_pbuf; // bytes of one page buffer (two of them)
    uint32_t m_off_q, m_off_tab, m_off_qz, m_off_qsp, m_ts;
    uint32_t kdq; // quantized keys dequantized to FP16 in registers (not KVC_ATTEND_IMPL_MMA_QTAB)
    uint32_t g_shift; // log2 G when G is a power of two (a shift for the slot of a token), else 32
};

__host__ __device__ constexpr int opt_kbits(int o)
{
    return o == 0 ? 16 : o == 1 ? 8 : o == 2 ? 4 : o == 3 ? 4 : 2;
}
__host__ __device__ constexpr int opt_vbits(int o)
{
    return o == 0 ? 16 : o == 1 ? 8 : o == 2 ? 4 : 2;
}
__host__ __device__ constexpr bool opt_protectable(int o)
{
    return o >= 2 && o <= 4;
}

/* Programmatic dependent launch (sm_90, docs/gpu.md): a split kernel lets the combine kernel be
 * launched while its blocks run (pdl_trigger, at their start), and the combine kernel waits for
 * the split kernel's results before it reads any (pdl_wait). Without a programmatic launch
 * both are no-ops, as they are on older GPUs. */
__device__ __forceinline__ void pdl_trigger()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* kvc_group_bytes of kvcodec_int.h: the layout of one group (docs/kvcodec-format.md §2). */
static inline size_t group_bytes(int o, uint32_t d, uint32_t cap, uint32_t P)
{
    if (o == 0)
        return (size_t)4 * d;
    size_t rowk = (size_t)d * opt_kbits(o) / 8, rowv = (size_t)d * opt_vbits(o) / 8;
    size_t b = (size_t)4 * d + (size_t)4 * cap + (size_t)cap * (rowk + rowv);
    if (P && opt_protectable(o))
        b += (size_t)2 * P + (size_t)cap * P;
    return b;
}

__device__ __forceinline__ float h2f(uint32_t bits16)
{
    return __half2float(__ushort_as_half((unsigned short)(bits16 & 0xffffu)));
}

__device__ __forceinline__ uint32_t rd16(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

/* Eight FP16 values at a 16-byte aligned shared address. */
__device__ __forceinline__ void load8_f16(const uint8_t *p, float *x)
{
    uint4 u = *reinterpret_cast<const uint4 *>(p);
    uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        x[2 * i] = h2f(w[i]);
        x[2 * i + 1] = h2f(w[i] >> 16);
    }
}

/* An integer code (< 2^23) as a float without the conversion unit (I2F runs at a quarter of the
 * FMA rate): the code in the mantissa of 2^23, minus 2^23. Exact. */
__device__ __forceinline__ float code_f(uint32_t c)
{
    return __uint_as_float(0x4b000000u | c) - 8388608.0f;
}

/* Byte i of x as a float (a code < 256): the byte placed in the mantissa of 2^23 with one
 * byte permute, minus 2^23. */
__device__ __forceinline__ float byte_f(uint32_t x, int i)
{
    return __uint_as_float(__byte_perm(x, 0x4b000000u, 0x7440u | (uint32_t)i)) - 8388608.0f;
}

/* Eight codes of `bits` bits for channels c .. c+7 of a packed row (c a multiple of 8, so the
 * byte offset c * bits / 8 is aligned to the load size). */
__device__ __forceinline__ void load8_codes(const uint8_t *row, uint32_t c, int bits, float *x)
{
    if (bits == 8) {
        const uint2 u = *reinterpret_cast<const uint2 *>(row + c);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            x[i] = byte_f(u.x, i);
            x[4 + i] = byte_f(u.y, i);
        }
    } else if (bits == 4) {
        // Even channels are the low nibbles, odd channels the high ones.
        const uint32_t u = *reinterpret_cast<const uint32_t *>(row + c / 2);
        const uint32_t lo = u & 0x0f0f0f0fu, hi = (u >> 4) & 0x0f0f0f0fu;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            x[2 * i] = byte_f(lo, i);
            x[2 * i + 1] = byte_f(hi, i);
        }
    } else {
        const uint32_t u = *reinterpret_cast<const uint16_t *>(row + c / 4);
#pragma unroll
        for (int i = 0; i < 8; i++)
            x[i] = code_f((u >> (2 * i)) & 3u);
    }
}

/* Page header fields (docs/kvcodec-format.md §3). */
struct page_hdr {
    uint32_t opt, flags, head_dim, n_slots, last_tokens, slot_tokens, cap_slots, n_tokens;
};

__device__ __forceinline__ page_hdr parse_hdr(uint4 u)
{
    page_hdr h;
    h.opt = u.x & 0xffu;
    h.flags = (u.x >> 8) & 0xffu;
    h.head_dim = u.x >> 16;
    h.n_slots = u.y & 0xffffu;
    h.last_tokens = u.y >> 16;
    h.slot_tokens = u.z & 0xffffu;
    h.cap_slots = u.z >> 16;
    h.n_tokens = u.w;
    return h;
}

/* The 16-byte header of page pid (pid < n_pages). */
__device__ __forceinline__ uint4 load_hdr(const attn_params &A, uint32_t pid)
{
    return __ldg(reinterpret_cast<const uint4 *>(A.base + (size_t)pid * A.page_bytes));
}

#ifdef __CUDACC__
__device__ __forceinline__ void prefetch_l2(const void *p)
{
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
#endif

/* Asks L2 for the used bytes of page pid when this pass will attend it (a hint: nothing is
 * read from a header that does not fit the pool). */
__device__ __forceinline__ void prefetch_page(const attn_params &A, uint32_t pid, const page_hdr &h,
                                              int pass, uint32_t tid)
{
    if (h.opt >= kOpts || h.n_tokens == 0 || h.n_slots > h.cap_slots ||
        (int)((h.flags & KVC_PAGE_FLAG_ROTATED) != 0) != pass)
        return;
    const size_t bytes = KVC_PAGE_HEADER_BYTES + (size_t)h.n_slots * A.slot_bytes[h.opt];
    if (bytes > A.page_bytes)
        return;
    const uint8_t *pg = A.base + (size_t)pid * A.page_bytes;
    for (size_t off = (size_t)tid * 128; off < bytes; off += (size_t)kThreads * 128)
        prefetch_l2(pg + off);
}

/* In-place orthonormal Walsh-Hadamard transform of `rows` rows of d floats in shared memory
 * (d a power of two), the same butterflies as kvc_hadamard. Called by the whole block. */
static __device__ void block_hadamard(float *x, uint32_t rows, uint32_t d)
{
    uint32_t half = d / 2;
    for (uint32_t len = 1; len < d; len <<= 1) {
        for (uint32_t idx = threadIdx.x; idx < rows * half; idx += blockDim.x) {
            uint32_t r = idx / half, k = idx % half;
            uint32_t i = (k / len) * 2 * len + (k % len);
            float *row = x + (size_t)r * d;
            float a = row[i], b = row[i + len];
            row[i] = a + b;
            row[i + len] = a - b;
        }
        __syncthreads();
    }
    float s = 1.0f / sqrtf((float)d);
    for (uint32_t idx = threadIdx.x; idx < rows * d; idx += blockDim.x)
        x[idx] *= s;
    __syncthreads();
}

/* Channels c0 .. c0+CPT-1 (those below d) of an FP16 row. */
template <int CPT>
__device__ __forceinline__ void load_f16_row(const uint8_t *row, uint32_t c0, uint32_t d, float *x)
{
#pragma unroll
    for (int h = 0; h < CPT / 8; h++)
        if (c0 + 8 * h < d)
            load8_f16(row + 2 * (c0 + 8 * h), x + 8 * h);
}

/* Moves (slot s, token j of the slot) forward by n tokens, slots of st tokens. */
__device__ __forceinline__ void advance(uint32_t &s, uint32_t &j, uint32_t n, uint32_t st)
{
    if (st == 1) {
        s += n;
        return;
    }
    j += n;
    while (j >= st) {
        j -= st;
        s++;
    }
}

/* Per-slot key factors of this lane's channels: for a quantized slot qs = q * kscale and
 * qz = sum_c q * kzero over the lane's channels, so that a token's partial logit is
 * sum_i qs[i] * code[i] + qz (attend.c's pre-scaled query); for F16 pages qs = q, qz = 0.
 * qq: [NQ][d] (q or H q, times the softmax scale) in shared memory. */
template <int NQ, int CPT>
__device__ __forceinline__ void slot_keys(const uint8_t *sl, bool f16, const float *qq, uint32_t d,
                                          uint32_t c0, float (&qs)[NQ][CPT], float (&qz)[NQ])
{
#pragma unroll
    for (int r = 0; r < NQ; r++)
        qz[r] = 0.0f;
#pragma unroll
    for (int h = 0; h < CPT / 8; h++) {
        const uint32_t c = c0 + 8 * h;
        float ks[8], kz[8];
        if (c < d && !f16) {
            load8_f16(sl + 2 * c, ks);
            load8_f16(sl + 2 * d + 2 * c, kz);
        }
#pragma unroll
        for (int r = 0; r < NQ; r++) {
            float qv[8];
            if (c < d) {
                const float4 a = *reinterpret_cast<const float4 *>(qq + r * d + c);
                const float4 b = *reinterpret_cast<const float4 *>(qq + r * d + c + 4);
                qv[0] = a.x, qv[1] = a.y, qv[2] = a.z, qv[3] = a.w;
                qv[4] = b.x, qv[5] = b.y, qv[6] = b.z, qv[7] = b.w;
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++)
                    qv[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 8; i++) {
                if (f16 || c >= d) {
                    qs[r][8 * h + i] = qv[i];
                } else {
                    qs[r][8 * h + i] = qv[i] * ks[i];
                    qz[r] += qv[i] * kz[i];
                }
            }
        }
    }
}

/* Key codes (quantized) or key values (F16) of channels c0 .. c0+CPT-1 of token j of the slot
 * at sl (an F16 slot is one token, j = 0). */
template <int CPT>
__device__ __forceinline__ void key_codes(const attn_params &A, const uint8_t *sl, uint32_t opt,
                                          uint32_t j, uint32_t c0, float *code)
{
    const uint32_t d = A.d;
    if (opt == 0) {
        load_f16_row<CPT>(sl, c0, d, code);
        return;
    }
    const uint32_t G = A.G;
    const int kb = opt_kbits(opt);
    const uint32_t rowk = d * kb / 8;
    const uint8_t *kc = sl + 4 * d + 4 * G + (size_t)j * rowk;
#pragma unroll
    for (int h = 0; h < CPT / 8; h++)
        if (c0 + 8 * h < d)
            load8_codes(kc, c0 + 8 * h, kb, code + 8 * h);
    // MixKVQ: a protected channel's code is its 8-bit code from the pcodes block (its main
    // code is 0 and attend.c ignores it; its kscale/kzero are the 8-bit parameters).
    if (A.P && opt_protectable(opt)) {
        const uint32_t P = A.P;
        const uint32_t rowv = d * opt_vbits(opt) / 8;
        const uint8_t *pi = sl + 4 * d + 4 * G + (size_t)G * (rowk + rowv);
        const uint8_t *pc = pi + 2 * P + (size_t)j * P;
        for (uint32_t jj = 0; jj < P; jj++) {
            const uint32_t c = rd16(pi + 2 * jj);
            if (c < c0 || c >= c0 + CPT || c >= d)
                continue;
            const float v = code_f(pc[jj]);
#pragma unroll
            for (int i = 0; i < CPT; i++)
                if (c == c0 + i)
                    code[i] = v;
        }
    }
}

/* Dequantized value channels c0 .. c0+CPT-1 of token j of the slot at sl. */
template <int CPT>
__device__ __forceinline__ void load_value(const attn_params &A, const uint8_t *sl, uint32_t opt,
                                           uint32_t j, uint32_t c0, float *vf)
{
    const uint32_t d = A.d;
    if (opt == 0) {
        load_f16_row<CPT>(sl + 2 * d, c0, d, vf);
        return;
    }
    const uint32_t G = A.G;
    const int kb = opt_kbits(opt), vb = opt_vbits(opt);
    const uint32_t rowk = d * kb / 8, rowv = d * vb / 8;
    const uint16_t *vsz = reinterpret_cast<const uint16_t *>(sl + 4 * d); // vscale[G], vzero[G]
    const float vs = h2f(vsz[j]), vz = h2f(vsz[G + j]);
    const uint8_t *vc = sl + 4 * d + 4 * G + (size_t)G * rowk + (size_t)j * rowv;
#pragma unroll
    for (int h = 0; h < CPT / 8; h++) {
        uint32_t c = c0 + 8 * h;
        if (c >= d)
            continue;
        float code[8];
        load8_codes(vc, c, vb, code);
#pragma unroll
        for (int i = 0; i < 8; i++)
            vf[8 * h + i] = code[i] * vs + vz;
    }
}

/* List `item`'s pages [p0, p1) for this split (page_ids[ls + p0 ..]); a malformed descriptor
 * (end before start) attends nothing and is reported once. */
__device__ __forceinline__ void split_range(const attn_params &A, uint32_t item, uint32_t split,
                                            uint32_t *ls_p, uint32_t *p0_p, uint32_t *p1_p)
{
    uint32_t ls = A.list_start[item], le = A.list_start[item + 1];
    if (le < ls) {
        if (threadIdx.x == 0 && split == 0)
            atomicAdd(A.ws_err, 1u);
        le = ls;
    }
    const uint32_t n = le - ls;
    const uint32_t pps = (n + A.n_splits - 1) / A.n_splits;
    *ls_p = ls;
    *p0_p = min(n, split * pps);
    *p1_p = min(n, *p0_p + pps);
}

/* The next power of two >= n. */
__host__ __device__ constexpr int pow2ceil(int n)
{
    return n <= 1 ? 1 : 2 * pow2ceil((n + 1) / 2);
}

/* Blocks per SM the register budget is sized for (3: at most 168 registers, 2: 255), chosen so
 * that the common shapes (GQA groups up to 5 at head_dim <= 256) do not spill. */
constexpr int min_blocks(int nq, int cpt)
{
    return nq * cpt <= 40 ? 3 : 2;
}

__device__ __forceinline__ void attend_fused_combine(const attn_params &A, uint32_t item,
                                                     uint32_t rows, uint8_t *smem, float *red);

/* The body of attend_split_kernel<NQ, CPT> (kernel 1, SIMT): smem is its dynamic shared memory
 * (16-byte aligned), s_m, s_l, s_alpha its [NQ] arrays, s_red its [kThreads / 32] array. FUSE:
 * no combine kernel follows (attend_fused_combine). */
template <int NQ, int CPT, bool FUSE = false>
__device__ __forceinline__ void attend_split_body(const attn_params &A, uint8_t *smem, float *s_m,
                                                  float *s_l, float *s_alpha, float *s_red)
{
    constexpr int NQP = pow2ceil(NQ);

    pdl_trigger();
    const uint32_t d = A.d, tid = threadIdx.x;
    const uint32_t item = blockIdx.y, split = blockIdx.x;
    uint8_t *buf = smem;                                       // [buf_bytes]
    float *qv = reinterpret_cast<float *>(smem + A.buf_bytes); // [NQ][d] q * scale
    float *qr = qv + NQ * d;                                   // [NQ][d] H q * scale
    float *lg = qr + NQ * d;                                   // [NQ][kChunk] logits, then p

    const uint32_t b = item / A.n_kv, kvh = item % A.n_kv;
    const float *q = A.q + ((size_t)b * A.n_heads + (size_t)kvh * NQ) * d;
    for (uint32_t i = tid; i < NQ * d; i += blockDim.x)
        qv[i] = q[i] * A.scale;
    if (tid < NQ) {
        s_m[tid] = -INFINITY;
        s_l[tid] = 0.0f;
    }

    uint32_t ls, p0, p1;
    split_range(A, item, split, &ls, &p0, &p1);

    const uint32_t lpt = A.lpt, tpb = kThreads / lpt; // token lanes per block
    const uint32_t li = tid % lpt, tl = tid / lpt, c0 = li * CPT;
    const bool lane_active = c0 < d;

    // One accumulator in registers: pass 0 attends the plain pages of this split, pass 1 the
    // rotated ones (page order does not matter to attention), so the plain accumulator is
    // written out between the passes, together with the running max it is scaled to.
    float acc[NQ][CPT];
#pragma unroll
    for (int r = 0; r < NQ; r++)
#pragma unroll
        for (int i = 0; i < CPT; i++)
            acc[r][i] = 0.0f;
    float qs[NQ][CPT], qz[NQ]; // key factors of the current slot (slot_keys)
#pragma unroll
    for (int r = 0; r < NQ; r++) {
        qz[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < CPT; i++)
            qs[r][i] = 0.0f;
    }
    bool any_rot = false;
    const size_t slot = (size_t)item * A.n_splits + split;
    float *red = reinterpret_cast<float *>(buf); // [tpb][NQ][d] between and after the passes
    __syncthreads();
    for (int pass = 0; pass < 2; pass++) {
        // A pipeline over the page list: while page pi is attended, the next page is
        // prefetched into L2 (its header arrived an iteration ago), the header after it is
        // loaded and the id after that; so HBM keeps working while the block computes.
        const uint4 zero4 = make_uint4(0, 0, 0, 0);
        uint32_t pid = p0 < p1 ? A.page_ids[ls + p0] : 0;
        uint4 hraw = p0 < p1 && pid < A.n_pages ? load_hdr(A, pid) : zero4;
        uint32_t pid_next = p0 + 1 < p1 ? A.page_ids[ls + p0 + 1] : 0;
        uint4 hraw_next = p0 + 1 < p1 && pid_next < A.n_pages ? load_hdr(A, pid_next) : zero4;
        uint32_t pid_after = p0 + 2 < p1 ? A.page_ids[ls + p0 + 2] : 0;
        for (uint32_t pi = p0; pi < p1; pi++) {
            const uint4 hraw_after =
                pi + 2 < p1 && pid_after < A.n_pages ? load_hdr(A, pid_after) : zero4;
            const uint32_t pid_later = pi + 3 < p1 ? A.page_ids[ls + pi + 3] : 0;
            if (pi + 1 < p1 && pid_next < A.n_pages)
                prefetch_page(A, pid_next, parse_hdr(hraw_next), pass, tid);
            do { // one page; `break` skips it (every condition below is uniform over the block)
                if (pid >= A.n_pages) {
                    if (tid == 0 && pass == 0) // counted once
                        atomicAdd(A.ws_err, 1u);
                    break;
                }
                const page_hdr h = parse_hdr(hraw);
                if (h.n_tokens == 0 || h.opt >= kOpts) // as attend.c: empty or dropped
                    break;
                const uint32_t opt = h.opt;
                const uint32_t sb = A.slot_bytes[opt];
                const bool bad =
                    h.head_dim != d || h.slot_tokens != (opt == 0 ? 1u : A.G) ||
                    h.n_slots > h.cap_slots ||
                    (size_t)KVC_PAGE_HEADER_BYTES + (size_t)h.n_slots * sb > A.page_bytes ||
                    (opt != 0 && h.n_slots > 0 && (h.last_tokens == 0 || h.last_tokens > A.G));
                const bool rot = (h.flags & KVC_PAGE_FLAG_ROTATED) != 0;
                if (bad || (rot && (d & (d - 1)) != 0)) {
                    if (tid == 0 && pass == 0)
                        atomicAdd(A.ws_err, 1u);
                    break;
                }
                if (h.n_slots == 0 || (int)rot != pass)
                    break;
                if (rot && !any_rot) { // first rotated page of this block: H q once
                    for (uint32_t i = tid; i < NQ * d; i += blockDim.x)
                        qr[i] = qv[i];
                    __syncthreads();
                    block_hadamard(qr, NQ, d);
                    any_rot = true;
                }
                // Stage the used bytes of the page in shared memory: 16-byte asynchronous
                // copies (cp.async), consecutive threads on consecutive words (slot_bytes is a
                // multiple of 16, pages are 64-byte aligned), the whole page in flight at once.
                const uint32_t n16 = (KVC_PAGE_HEADER_BYTES + h.n_slots * sb) / 16;
                const uint4 *src =
                    reinterpret_cast<const uint4 *>(A.base + (size_t)pid * A.page_bytes);
                uint4 *dst = reinterpret_cast<uint4 *>(buf);
                for (uint32_t i = tid; i < n16; i += kThreads)
                    __pipeline_memcpy_async(dst + i, src + i, sizeof(uint4));
                __pipeline_commit();
                __pipeline_wait_prior(0);
                __syncthreads();

                const uint32_t ntok = opt == 0 ? h.n_slots : (h.n_slots - 1) * A.G + h.last_tokens;
                const float *qq = rot ? qr : qv;
                const uint8_t *slots = buf + KVC_PAGE_HEADER_BYTES;
                const uint32_t slot_tok = opt == 0 ? 1u : A.G; // tokens per slot
                uint32_t cur_slot = 0xffffffffu; // slot whose key factors are in qs, qz
                if (opt == 0)
                    slot_keys<NQ, CPT>(slots, true, qq, d, c0, qs, qz);
                for (uint32_t t0 = 0; t0 < ntok; t0 += kChunk) {
                    const uint32_t nc = min((uint32_t)kChunk, ntok - t0);
                    // 1. Logits. The loop count is the same for every lane of a warp (the
                    // shuffles need all 32); idle lanes carry zeros.
                    // This lane's token t0 + tt is token kj of slot ksl (one division per chunk;
                    // then steps of tpb tokens).
                    const uint32_t iters = (nc + tpb - 1) / tpb;
                    uint32_t ksl = (t0 + tl) / slot_tok, kj = (t0 + tl) % slot_tok;
                    for (uint32_t it = 0; it < iters; it++) {
                        const uint32_t tt = it * tpb + tl;
                        const bool valid = tt < nc && lane_active;
                        float code[CPT];
#pragma unroll
                        for (int k = 0; k < CPT; k++)
                            code[k] = 0.0f;
                        if (valid) {
                            const uint8_t *sl = slots + (size_t)ksl * sb;
                            if (opt != 0 && ksl != cur_slot) {
                                cur_slot = ksl;
                                slot_keys<NQ, CPT>(sl, false, qq, d, c0, qs, qz);
                            }
                            key_codes<CPT>(A, sl, opt, kj, c0, code);
                        }
                        advance(ksl, kj, tpb, slot_tok);
                        float part[NQ];
#pragma unroll
                        for (int r = 0; r < NQ; r++) {
                            float s = 0.0f;
                            if (valid) {
                                s = qz[r];
#pragma unroll
                                for (int k = 0; k < CPT; k++)
                                    s += qs[r][k] * code[k];
                            }
                            part[r] = s;
                        }
                        if (lpt >= (uint32_t)NQP) {
                            // Transposing reduction: each step halves the rows a lane carries
                            // (NQP - 1 shuffles in all instead of NQ per step), then plain
                            // steps; lane li ends with the sum of row `row`.
                            float v[NQP];
#pragma unroll
                            for (int r = 0; r < NQP; r++)
                                v[r] = r < NQ ? part[r] : 0.0f;
                            uint32_t row = 0, off = lpt >> 1;
#pragma unroll
                            for (int w = NQP; w > 1; w >>= 1) {
                                const bool upper = (li & off) != 0;
#pragma unroll
                                for (int k = 0; k < w / 2; k++) {
                                    const float send = upper ? v[k] : v[k + w / 2];
                                    const float keep = upper ? v[k + w / 2] : v[k];
                                    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, off);
                                }
                                row += upper ? (uint32_t)(w / 2) : 0u;
                                off >>= 1;
                            }
                            for (; off > 0; off >>= 1)
                                v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
                            if ((li & (lpt / NQP - 1)) == 0 && row < (uint32_t)NQ && tt < nc)
                                lg[row * kChunk + tt] = v[0];
                        } else {
                            for (uint32_t off = lpt / 2; off > 0; off >>= 1)
#pragma unroll
                                for (int r = 0; r < NQ; r++)
                                    part[r] += __shfl_xor_sync(0xffffffffu, part[r], off);
                            if (li == 0 && tt < nc)
#pragma unroll
                                for (int r = 0; r < NQ; r++)
                                    lg[r * kChunk + tt] = part[r];
                        }
                    }
                    __syncthreads();
                    // 2. Online softmax: one warp per row.
                    const uint32_t warp = tid / 32, lane = tid % 32;
                    for (uint32_t r = warp; r < NQ; r += kThreads / 32) {
                        float *row = lg + r * kChunk;
                        float mx = -INFINITY;
                        for (uint32_t j = lane; j < nc; j += 32)
                            mx = fmaxf(mx, row[j]);
                        for (int off = 16; off > 0; off >>= 1)
                            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                        const float mo = s_m[r], mn = fmaxf(mo, mx);
                        float sum = 0.0f;
                        for (uint32_t j = lane; j < nc; j += 32) {
                            const float e = mn == -INFINITY ? 0.0f : expf(row[j] - mn);
                            row[j] = e;
                            sum += e;
                        }
                        for (int off = 16; off > 0; off >>= 1)
                            sum += __shfl_xor_sync(0xffffffffu, sum, off);
                        __syncwarp();
                        if (lane == 0) {
                            const float alpha = mo == -INFINITY ? 0.0f : expf(mo - mn);
                            s_alpha[r] = alpha;
                            s_l[r] = s_l[r] * alpha + sum;
                            s_m[r] = mn;
                        }
                    }
                    __syncthreads();
                    // 3. Values into this lane's channels (dequantized in registers).
#pragma unroll
                    for (int r = 0; r < NQ; r++) {
                        const float a = s_alpha[r];
#pragma unroll
                        for (int k = 0; k < CPT; k++)
                            acc[r][k] *= a;
                    }
                    if (lane_active) {
                        uint32_t vsl = (t0 + tl) / slot_tok, vj = (t0 + tl) % slot_tok;
                        for (uint32_t tt = tl; tt < nc; tt += tpb) {
                            float vf[CPT];
#pragma unroll
                            for (int k = 0; k < CPT; k++)
                                vf[k] = 0.0f;
                            load_value<CPT>(A, slots + (size_t)vsl * sb, opt, vj, c0, vf);
                            advance(vsl, vj, tpb, slot_tok);
#pragma unroll
                            for (int r = 0; r < NQ; r++) {
                                const float p = lg[r * kChunk + tt];
#pragma unroll
                                for (int k = 0; k < CPT; k++)
                                    acc[r][k] += p * vf[k];
                            }
                        }
                    }
                    __syncthreads(); // lg and the staged page are reused next
                }
            } while (0);
            pid = pid_next;
            hraw = hraw_next;
            pid_next = pid_after;
            hraw_next = hraw_after;
            pid_after = pid_later;
        }

        // End of a pass: sum the token lanes' partial accumulators through shared memory into
        // this split's plain (pass 0) or rotated (pass 1) partial result.
        if (pass == 0 || any_rot) {
            if (lane_active) {
#pragma unroll
                for (int r = 0; r < NQ; r++)
#pragma unroll
                    for (int k = 0; k < CPT; k++)
                        if (c0 + k < d)
                            red[((size_t)tl * NQ + r) * d + c0 + k] = acc[r][k];
            }
            __syncthreads();
            float *dst = (pass ? A.ws_accr : A.ws_acc) + slot * NQ * d;
            for (uint32_t idx = tid; idx < NQ * d; idx += blockDim.x) {
                float sum = 0.0f;
                for (uint32_t l = 0; l < tpb; l++)
                    sum += red[(size_t)l * NQ * d + idx];
                dst[idx] = sum;
            }
            if (pass == 0 && tid < NQ)
                A.ws_mp[slot * NQ + tid] = s_m[tid];
            __syncthreads(); // red (= the page buffer) is reused by pass 1
        }
#pragma unroll
        for (int r = 0; r < NQ; r++)
#pragma unroll
            for (int k = 0; k < CPT; k++)
                acc[r][k] = 0.0f;
    } // pass

    if (tid < NQ) {
        A.ws_m[slot * NQ + tid] = s_m[tid];
        A.ws_l[slot * NQ + tid] = s_l[tid];
    }
    if (tid == 0)
        A.ws_rot[slot] = any_rot ? 1u : 0u;
    if constexpr (FUSE)
        attend_fused_combine(A, item, NQ, smem, s_red);
}

constexpr int kCombThreads = 256; // threads per block of kernel 2

/* Sum (op 0) or max (op 1) of v over the block; every thread gets it. red: [warps] scratch. */
static __device__ float block_reduce(float v, int op, float *red)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = op ? fmaxf(v, o) : v + o;
    }
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = v;
    __syncthreads();
    v = red[0];
    for (uint32_t i = 1; i < blockDim.x / 32; i++)
        v = op ? fmaxf(v, red[i]) : v + red[i];
    __syncthreads(); // red is reused
    return v;
}

/* A workspace word: with CG past L1 (the fused combine reads what other blocks of its own
 * launch wrote). */
template <bool CG, typename T> __device__ __forceinline__ T ws_ld(const T *p)
{
    return CG ? __ldcg(p) : *p;
}

/* Shared floats attend_combine_row needs for n_splits splits at head_dim d with `threads`
 * threads (host and device). */
__host__ __device__ inline size_t combine_smem_floats(uint32_t n_splits, uint32_t d,
                                                      uint32_t threads)
{
    const uint32_t cw = d < threads ? d : threads;
    return (size_t)2 * n_splits + (size_t)2 * (threads / cw) * d;
}

/* Output row r of list `item` from the splits' partial results, by the whole block: weights
 * exp(m_s - M) per split and the softmax sum, then each thread sums its channel over a share of
 * the splits (plain and rotated parts), the shares are added, H is applied to the rotated sum
 * once and the row is divided by the sum. smem: combine_smem_floats floats; red: [blockDim.x /
 * 32] scratch. */
template <bool CG>
__device__ __forceinline__ void attend_combine_row(const attn_params &A, uint32_t item, uint32_t r,
                                                   uint32_t rows, uint8_t *smem, float *red)
{
    const uint32_t tid = threadIdx.x, d = A.d, S = A.n_splits;
    const uint32_t cw = min(d, blockDim.x), groups = blockDim.x / cw;
    float *w = reinterpret_cast<float *>(smem); // [S] exp(m_s - M)
    float *wp = w + S;                          // [S] exp(mp_s - M), the plain part's weight
    float *acc = wp + S;                        // [groups][d] plain sums
    float *accr = acc + (size_t)groups * d;     // [groups][d] rotated sums
    const size_t base = (size_t)item * S;

    float mx = -INFINITY, anyr = 0.0f;
    for (uint32_t s = tid; s < S; s += blockDim.x) {
        mx = fmaxf(mx, ws_ld<CG>(A.ws_m + (base + s) * rows + r));
        if (ws_ld<CG>(A.ws_rot + base + s))
            anyr = 1.0f;
    }
    const float M = block_reduce(mx, 1, red);
    const bool any_rot = block_reduce(anyr, 1, red) != 0.0f;
    float lsum = 0.0f;
    for (uint32_t s = tid; s < S; s += blockDim.x) {
        const float m = ws_ld<CG>(A.ws_m + (base + s) * rows + r);
        const float mp = ws_ld<CG>(A.ws_mp + (base + s) * rows + r);
        const float ws = m == -INFINITY ? 0.0f : expf(m - M);
        w[s] = ws;
        wp[s] = mp == -INFINITY ? 0.0f : expf(mp - M);
        lsum += ws_ld<CG>(A.ws_l + (base + s) * rows + r) * ws;
    }
    const float L = block_reduce(lsum, 0, red); // its barriers publish w and wp

    const uint32_t grp = tid / cw;
    if (grp < groups) {
        for (uint32_t c = tid % cw; c < d; c += cw) {
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const float *src = A.ws_acc + (base * rows + r) * d + c;
            const float *srcr = A.ws_accr + (base * rows + r) * d + c;
            const size_t stride = (size_t)rows * d; // one split
            uint32_t s = grp;
            for (; s + 3 * groups < S; s += 4 * groups) { // four loads in flight
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const uint32_t sk = s + k * groups;
                    a[k] += ws_ld<CG>(src + sk * stride) * wp[sk];
                    if (any_rot && ws_ld<CG>(A.ws_rot + base + sk))
                        b[k] += ws_ld<CG>(srcr + sk * stride) * w[sk];
                }
            }
            for (; s < S; s += groups) {
                a[0] += ws_ld<CG>(src + s * stride) * wp[s];
                if (any_rot && ws_ld<CG>(A.ws_rot + base + s))
                    b[0] += ws_ld<CG>(srcr + s * stride) * w[s];
            }
            acc[grp * d + c] = (a[0] + a[1]) + (a[2] + a[3]);
            accr[grp * d + c] = (b[0] + b[1]) + (b[2] + b[3]);
        }
    }
    __syncthreads();
    for (uint32_t c = tid; c < d; c += blockDim.x) {
        float p = 0.0f, q = 0.0f;
        for (uint32_t g = 0; g < groups; g++) {
            p += acc[g * d + c];
            q += accr[g * d + c];
        }
        acc[c] = p;
        accr[c] = q;
    }
    __syncthreads();
    if (any_rot)
        block_hadamard(accr, 1, d); // H is its own inverse
    const uint32_t b = item / A.n_kv, kvh = item % A.n_kv;
    float *out = A.out + ((size_t)b * A.n_heads + (size_t)kvh * rows + r) * d;
    for (uint32_t c = tid; c < d; c += blockDim.x) {
        const float v = acc[c] + (any_rot ? accr[c] : 0.0f);
        out[c] = L > 0.0f ? v / L : 0.0f;
    }
}

/* The body of attend_combine_kernel, one block per (list, query row): smem its dynamic shared
 * memory, red its [kCombThreads / 32] array. */
__device__ __forceinline__ void attend_combine_body(const attn_params &A, uint32_t rows,
                                                    uint8_t *smem, float *red)
{
    pdl_wait(); // the split kernel's workspace is complete and visible from here on
    attend_combine_row<false>(A, blockIdx.x, blockIdx.y, rows, smem, red);
}

/* The end of a block of a FUSE split kernel: the last block of list `item` to finish combines
 * the list's splits (each of its rows) instead of a combine kernel. Each thread fences
 * its workspace writes before the block's arrival is counted, so the last block to arrive sees
 * every split's and reads them past L1. smem: at least
 * combine_smem_floats floats, free; red: [blockDim.x / 32]. */
__device__ __forceinline__ void attend_fused_combine(const attn_params &A, uint32_t item,
                                                     uint32_t rows, uint8_t *smem, float *red)
{
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        red[0] = atomicAdd(A.ws_cnt + item, 1u) == A.n_splits - 1 ? 1.0f : 0.0f;
    __syncthreads();
    const bool last = red[0] != 0.0f;
    __syncthreads(); // red is the combine's scratch
    if (!last)
        return;
    __threadfence();
    for (uint32_t r = 0; r < rows; r++) {
        attend_combine_row<true>(A, item, r, rows, smem, red);
        __syncthreads(); // smem and red are reused by the next row
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Tensor-core path: mma.sync m16n8k16, FP16 operands, FP32 accumulation                       */
/* ------------------------------------------------------------------------------------------ */
/*
 * The same flash-decoding split and the same workspace as attend_split_kernel, for head_dim 64
 * and 128 and GQA groups of up to 4 rows. The 4 warps of a block share each staged page (whole
 * pages, double-buffered with cp.async: page i+1 is in flight while page i is attended) and
 * split its tokens into tiles of 16; each warp keeps its own online softmax and accumulator,
 * combined at the end of a pass.
 *   logits  S = Qa K^T: one m16n8k16 per 8 tokens and 16 channels. Qa's 16 rows are the query
 *           rows split into an FP16 high and low part (rows 0-7: hi of row r & 3, rows 8-15: lo),
 *           so S = hi + lo carries ~22 bits of the FP32 query. For a quantized slot Qa holds
 *           q * kscale (attend.c's pre-scaled query, hi/lo, built once per slot in a shared
 *           table) and K^T holds the integer codes, exact in FP16; + q.kzero per slot, + the
 *           MixKVQ 8-bit block in FP32.
 *   values  O^T = V^T P^T: one m16n8k16 per 16 channels and 16 tokens, V^T the codes (or FP16
 *           values) of two tokens per register, P^T's 8 columns the probabilities times the
 *           token's vscale, hi (columns 0-3) and lo (4-7); + sum p * vzero per row in FP32.
 * The dot product does not depend on the order of channels, nor the sums on the order of
 * tokens, so each lane takes the channels its loads deliver (kphys below) and the same order
 * is used for the query table; codes become FP16 with one LOP3 and one HSUB2 per two codes
 * (0x6400 | c is 1024 + c). FP16 pages are staged with their 16-byte chunks XOR-swizzled per
 * token (mma_swz) so that the fragment loads are free of bank conflicts.
 */
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr uint32_t kMmaRows = 4;

/* Bytes of one query row of the per-slot table: D/16 units of 64 bytes (16 per kq lane), unit s
 * holding lane kq's A fragment of k step s in register order (hi pair 2s, lo pair 2s, hi pair
 * 2s + 1, lo pair 2s + 1), so that one 16-byte load fills the aligned register quad the MMA
 * reads (no moves). Odd rows store unit s at s ^ 1, so that rows r and r + 1 (read in one phase)
 * use different banks. */
__host__ __device__ constexpr uint32_t mma_row_stride(uint32_t d)
{
    return d / 16 * 64;
}

/* Slots of one table (slots whose tokens are attended between two table builds): 128 tokens
 * or more, so that the 4 warps get whole tiles each. */
__host__ __device__ inline uint32_t mma_table_slots(uint32_t G)
{
    return 128 / G < 2 ? 2 : 128 / G;
}

/* Token order inside 8 tokens and the chunk swizzle of an FP16 token row (see the header). */
__device__ __forceinline__ uint32_t mma_tau(uint32_t n)
{
    return n ^ ((n >> 2) & 1u);
}
__device__ __forceinline__ uint32_t mma_swz(uint32_t t)
{
    return ((t >> 1) & 1u) | ((t & 1u) << 2);
}

/* The channel of element e of FP16 pair hp of key lane kq (the table and the K fragments agree
 * on it); a bijection of (kq < 4, hp < D/8, e < 2) onto the D channels for each option. */
template <int D, int OPT>
__device__ __forceinline__ uint32_t kphys(uint32_t kq, uint32_t hp, uint32_t e)
{
    if (OPT == 0)
        return 8 * (kq + 4 * (hp / 4)) + 2 * (hp % 4) + e;
    if (OPT == 1)
        return kq * (D / 4) + 4 * (hp / 2) + (hp % 2) + 2 * e;
    if (OPT == 2 || OPT == 3)
        return kq * (D / 4) + 8 * (hp / 4) + (hp % 4) + 4 * e;
    return kq * (D / 4) + 16 * (hp / 8) + (hp % 8) + 8 * e;
}

#ifdef __CUDACC__
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

/* (x & mask) | bits in one LOP3: ptxas splits the C form into two when both constants are
 * immediates (a LOP3 takes one), so the constants go in as registers. */
#ifdef __CUDACC__
__device__ __forceinline__ uint32_t and_or(uint32_t x, uint32_t mask, uint32_t bits)
{
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(x), "r"(mask), "r"(bits));
    return r;
}
#endif

/* (1024 + a, 1024 + b) as FP16x2 minus 1024: exact. */
#ifdef __CUDACC__
__device__ __forceinline__ uint32_t sub1024(uint32_t u)
{
    uint32_t r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(u), "r"(0x64006400u));
    return r;
}
#endif

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi)
{
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
}

/* x split into FP16 hi + lo (hi when `lo` is false). */
__device__ __forceinline__ float split_part(float x, bool lo)
{
    const float h = __half2float(__float2half_rn(x));
    return lo ? x - h : h;
}

/* Softmax exponentials of the tensor-core kernels: e^x, or 2^x when E2 (the wide kernel, whose
 * logits are in log2 units: the query is scaled by log2 e up front). ex2.approx.ftz gives 0 for
 * -inf, so masked tokens and an empty running max need no test; __expf is the same instruction
 * behind a multiply and, without -ftz, a rescale for results below 2^-126. */
#ifdef __CUDACC__
__device__ __forceinline__ float ex2_approx(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif
template <bool E2> __device__ __forceinline__ float sm_exp(float x)
{
    if (!E2)
        return __expf(x);
    return ex2_approx(x);
}

__device__ __forceinline__ float h2f_at(const uint8_t *p)
{
    return __half2float(*reinterpret_cast<const __half *>(p));
}

/* N 32-bit words from a shared address aligned to min(16, 4 N) bytes. */
template <int N> __device__ __forceinline__ void lds_words(const uint8_t *p, uint32_t *w)
{
    if (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; i++) {
            const uint4 u = reinterpret_cast<const uint4 *>(p)[i];
            w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
        }
    } else if (N == 2) {
        const uint2 u = *reinterpret_cast<const uint2 *>(p);
        w[0] = u.x, w[1] = u.y;
    } else {
        w[0] = *reinterpret_cast<const uint32_t *>(p);
    }
}

/* FP16 pair hp of a key lane's words (codes as FP16, or FP16 keys). */
template <int OPT> __device__ __forceinline__ uint32_t k_pair(const uint32_t *w, int hp)
{
    if (OPT == 0)
        return w[hp];
    if (OPT == 1)
        return sub1024(__byte_perm(w[hp / 2], 0x64646464u, (hp % 2) ? 0x4341 : 0x4240));
    if (OPT == 2 || OPT == 3)
        return sub1024(and_or(w[hp / 4] >> (4 * (hp % 4)), 0x000f000fu, 0x64006400u));
    return sub1024(and_or(w[hp / 8] >> (2 * (hp % 8)), 0x00030003u, 0x64006400u));
}

/* a * b + c on FP16x2 words, rounded once. */
#ifdef __CUDACC__
__device__ __forceinline__ uint32_t hfma2_u(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
#endif

/* Word i (< 4) of u. */
__device__ __forceinline__ uint32_t word_of(const uint4 &u, uint32_t i)
{
    return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

/* 16 bytes of shared memory as one vector load. Not volatile: equal addresses within a tile
 * are loaded once (the staged page does not change while mma_tokens reads it); written as asm
 * because the C form is split into scalar loads when only some words are used. */
#ifdef __CUDACC__
__device__ __forceinline__ uint4 lds128(const void *p)
{
    uint4 u;
    asm("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
        : "r"((uint32_t)__cvta_generic_to_shared(p)));
    return u;
}
#endif

/* The FP16 key scales (zeros: base = slot + 2 D) of the two channels of pair hp of key lane kq,
 * as one FP16x2 in k_pair's order. A lane's channels are kq D/4 .. kq D/4 + D/4 - 1 for every
 * quantized option; the 16-byte word group holding both is loaded (the same group serves
 * neighbouring pairs, lds128 lets the compiler load it once). */
template <int D, int OPT>
__device__ __forceinline__ uint32_t k_pair_coef(const uint8_t *base, uint32_t kq, int hp)
{
    const uint32_t c0 = kphys<D, OPT>(0, (uint32_t)hp, 0), c1 = kphys<D, OPT>(0, (uint32_t)hp, 1);
    const uint8_t *g = base + kq * (D / 2);
    const uint32_t w0 = word_of(lds128(g + 16 * (c0 / 8)), (c0 / 2) % 4);
    const uint32_t w1 = word_of(lds128(g + 16 * (c1 / 8)), (c1 / 2) % 4);
    return __byte_perm(w0, w1, (c0 % 2 ? 0x32u : 0x10u) | ((c1 % 2 ? 0x76u : 0x54u) << 8));
}

/* Key pair hp of a quantized slot dequantized in FP16: code * kscale + kzero, rounded once
 * (sp: the staged slot). */
template <int D, int OPT>
__device__ __forceinline__ uint32_t k_pair_deq(const uint32_t *w, const uint8_t *sp, uint32_t kq,
                                               int hp)
{
    return hfma2_u(k_pair<OPT>(w, hp), k_pair_coef<D, OPT>(sp, kq, hp),
                   k_pair_coef<D, OPT>(sp + 2 * D, kq, hp));
}

/* The B fragment word of key pair hp: the codes (or FP16 keys), or with KDQ the dequantized
 * keys. */
template <int D, int OPT, bool KDQ>
__device__ __forceinline__ uint32_t k_frag(const uint32_t *w, const uint8_t *sp, uint32_t kq,
                                           int hp)
{
    return KDQ ? k_pair_deq<D, OPT>(w, sp, kq, hp) : k_pair<OPT>(w, hp);
}

/* Channel x of a value lane's words for two tokens (w0, w1) as one FP16x2 (token w0 low). (The
 * codes could enter the MMA as 1024 + c, one instruction fewer, with 1024 vscale taken off the
 * zero term; measured on the H200 that cancellation doubled the worst error, so it was not kept.)
 */
template <int OPT>
__device__ __forceinline__ uint32_t v_pair(const uint32_t *w0, const uint32_t *w1, int x)
{
    if (OPT == 0)
        return __byte_perm(w0[x / 2], w1[x / 2], (x % 2) ? 0x7632 : 0x5410);
    if (OPT == 1)
        return sub1024(and_or(__byte_perm(w0[x / 4], w1[x / 4], (x % 4) | ((4 + x % 4) << 8)),
                              0x00ff00ffu, 0x64006400u));
    if (OPT == 2) {
        const uint32_t y = __byte_perm(w0[x / 8], w1[x / 8], (x % 8) < 4 ? 0x5410 : 0x7632);
        return sub1024(and_or(y >> (4 * (x % 4)), 0x000f000fu, 0x64006400u));
    }
    const uint32_t y = __byte_perm(w0[x / 16], w1[x / 16], (x % 16) < 8 ? 0x5410 : 0x7632);
    return sub1024(and_or(y >> (2 * (x % 8)), 0x00030003u, 0x64006400u));
}

/* A lane's query fragments for all k steps from its row of the table (tp: row r, lane kq;
 * odd: r & 1): a0/a2 the hi pairs 2s, 2s + 1 (rows 0-7), a1/a3 the lo ones (rows 8-15). */
template <int D>
__device__ __forceinline__ void mma_load_a(const uint8_t *tp, uint32_t odd,
                                           uint32_t (&afr)[D / 16][4])
{
#pragma unroll
    for (int s = 0; s < D / 16; s++)
        lds_words<4>(tp + (s ^ odd) * 64, afr[s]);
}

/* Per-warp running state of one pass: this lane's part of the softmax of row r = g & 3 and of
 * O^T (rows 2kq, 2kq + 1 of the hi/lo columns; channels g D/8 + u and g D/8 + D/16 + u). */
template <int D> struct mma_state {
    float m, l, pz;
    float acc[D / 16][4];
};

/* One online-softmax step of row g & 3 over NJ n-tiles of logits sv (this lane's two tokens of
 * each; masked tokens -inf, at least one token of the step finite): the running max moves, l, pz
 * and the accumulator are rescaled to it, and p gets the tokens' weights. The 4 kq lanes of g
 * hold all of the step's tokens. */
template <int D, int NJ, bool E2>
__device__ __forceinline__ void mma_softmax(const float (&sv)[NJ][2], uint32_t kq, mma_state<D> &st,
                                            float (&p)[NJ][2])
{
    float mt = sv[0][0];
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 2; e++)
            mt = fmaxf(mt, sv[j][e]);
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
    const float mn = fmaxf(st.m, mt); // finite
    const bool moved = mn != st.m;
    // (2^-inf is 0: E2 needs no test for an empty running max or a masked token.)
    const float alpha = st.m == -INFINITY && !E2 ? 0.0f : moved ? sm_exp<E2>(st.m - mn) : 1.0f;
    st.m = mn;
    float psum = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            p[j][e] = sv[j][e] == -INFINITY && !E2 ? 0.0f : sm_exp<E2>(sv[j][e] - mn);
            psum += p[j][e];
        }
    st.l = st.l * alpha + psum;
    st.pz *= alpha;
    if (__any_sync(0xffffffffu, moved)) { // the running max rarely moves after the start
        const float al0 = __shfl_sync(0xffffffffu, alpha, 4 * ((2 * kq) & 3));
        const float al1 = __shfl_sync(0xffffffffu, alpha, 4 * ((2 * kq + 1) & 3));
#pragma unroll
        for (int u = 0; u < D / 16; u++) {
            st.acc[u][0] *= al0;
            st.acc[u][1] *= al1;
            st.acc[u][2] *= al0;
            st.acc[u][3] *= al1;
        }
    }
}

/* The value codes of token jt of a quantized slot sp that value lane g reads into vw, and its
 * weight p: times the token's vscale into *ps, times its vzero added to st.pz. */
template <int D, int OPT>
__device__ __forceinline__ void mma_value_words(const uint8_t *sp, uint32_t G, uint32_t jt,
                                                uint32_t g, float p, uint32_t *vw, float *ps,
                                                mma_state<D> &st)
{
    constexpr int VB = D * opt_vbits(OPT) / 64; // value bytes per lane
    const uint32_t rowk = D * opt_kbits(OPT) / 8, rowv = D * opt_vbits(OPT) / 8;
    const uint8_t *vp = sp + 4 * D + 4 * G + G * rowk + jt * rowv + g * VB;
    if (VB >= 4)
        lds_words<VB / 4>(vp, vw);
    else
        vw[0] = *reinterpret_cast<const uint16_t *>(vp);
    *ps = p * h2f_at(sp + 4 * D + 2 * jt);
    st.pz += p * h2f_at(sp + 4 * D + 2 * G + 2 * jt);
}

/* One k step of 16 tokens of O^T += V^T P^T: the value words of n-tiles a and b (their tokens
 * 2 kq, 2 kq + 1: a0, a1 and b0, b1) against P^T, the tokens' weights times their vscale (psa,
 * psb), hi columns for g < 4 and lo ones for g >= 4 (lo). */
template <int D, int OPT>
__device__ __forceinline__ void mma_pv(mma_state<D> &st, const uint32_t *a0, const uint32_t *a1,
                                       const uint32_t *b0, const uint32_t *b1,
                                       const float (&psa)[2], const float (&psb)[2], bool lo)
{
    const uint32_t pa = pack_h2(split_part(psa[0], lo), split_part(psa[1], lo));
    const uint32_t pb = pack_h2(split_part(psb[0], lo), split_part(psb[1], lo));
#pragma unroll
    for (int u = 0; u < D / 16; u++)
        mma16816(st.acc[u], v_pair<OPT>(a0, a1, u), v_pair<OPT>(a0, a1, D / 16 + u),
                 v_pair<OPT>(b0, b1, u), v_pair<OPT>(b0, b1, D / 16 + u), pa, pb);
}

/* Attends tokens [tb, te) of a staged page (slots at `slots`), whose keys' query table for slots
 * s0 .. is at tab (qz, qsp beside it). With KDQ (a quantized option without protected channels)
 * the keys are dequantized in registers instead (code * kscale + kzero in FP16, k_pair_deq) and
 * tab holds one entry, q itself in the option's channel order, for every slot. Called by every
 * warp; warp w takes tiles w, w + 4, ... */
template <int D, int OPT, bool KDQ = false, bool E2 = false>
__device__ void mma_tokens(const attn_params &A, const uint8_t *slots, uint32_t sb, uint32_t s0,
                           uint32_t tb, uint32_t te, const uint8_t *tab, const float *qz,
                           const float *qsp, uint32_t P, mma_state<D> &st)
{
    constexpr int KS = D / 16;                                 // k steps (and m tiles)
    constexpr int KB = OPT == 0 ? 0 : D * opt_kbits(OPT) / 32; // key bytes per lane
    constexpr int VB = D * opt_vbits(OPT) / 64;                // value bytes per lane
    constexpr int VW = VB >= 4 ? VB / 4 : 1;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t g = lane >> 2, kq = lane & 3, r = g & 3;
    const uint32_t G = A.G;
    const uint32_t rowk = OPT == 0 ? 0 : D * opt_kbits(OPT) / 8;
    const uint32_t rowv = OPT == 0 ? 0 : D * opt_vbits(OPT) / 8;
    const uint32_t koff = 4 * D + 4 * G, voff = koff + G * rowk;
    const uint32_t poff = voff + G * rowv; // pidx, then pcodes
    const uint32_t RS = mma_row_stride(D), TABS = 4 * RS;
    const uint32_t ntiles = (te - tb + 15) / 16;

    uint32_t afr[KS][4];
    int cur = -1;
    if (KDQ)
        mma_load_a<D>(tab + r * RS + kq * 16, r & 1, afr);
    for (uint32_t tile = warp; tile < ntiles; tile += kMmaWarps) {
        const uint32_t T0 = tb + 16 * tile;
        // Logits of the tile's two n-tiles (8 tokens each). Their mma chains are interleaved
        // (independent accumulators) when both n-tiles are of one slot, as they are whenever
        // G is a multiple of 16; else the second one reloads the table.
        const bool two = T0 + 8 < te; // the second n-tile has tokens
        // Each n-tile lies in one slot (G and tile starts are multiples of 8); an empty second
        // n-tile takes the first one's (its tokens are clamped into it). Slot sp[j], table
        // entry sl[j], and the n-tile's first token nb[j] is token jb[j] of its slot.
        int sl[2];
        const uint8_t *sp[2];
        uint32_t nb[2], jb[2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            nb[j] = j == 1 && two ? T0 + 8 : T0;
            const uint32_t si = OPT == 0 ? 0 : A.g_shift < 32 ? nb[j] >> A.g_shift : nb[j] / G;
            sl[j] = OPT == 0 ? 0 : (int)(si - s0);
            sp[j] = slots + (size_t)si * sb;
            jb[j] = nb[j] - si * G;
        }
        if (!KDQ && sl[0] != cur) {
            cur = sl[0];
            mma_load_a<D>(tab + (uint32_t)cur * TABS + r * RS + kq * 16, r & 1, afr);
        }
        uint32_t kw[2][OPT == 0 ? D / 8 : (KB / 4 > 0 ? KB / 4 : 1)];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const uint32_t tok = min(T0 + 8 * j + mma_tau(g), te - 1);
            if (OPT == 0) {
                const uint8_t *row = slots + (size_t)tok * (4 * D);
                const uint32_t sw = mma_swz(tok);
#pragma unroll
                for (int jj = 0; jj < D / 32; jj++)
                    lds_words<4>(row + 16 * ((kq + 4 * jj) ^ sw), kw[j] + 4 * jj);
            } else {
                lds_words<KB / 4>(sp[j] + koff + (jb[j] + tok - nb[j]) * rowk + kq * KB, kw[j]);
            }
        }
        float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
        if (sl[1] == sl[0]) {
#pragma unroll
            for (int s = 0; s < KS; s++)
#pragma unroll
                for (int j = 0; j < 2; j++)
                    mma16816(c[j], afr[s][0], afr[s][1], afr[s][2], afr[s][3],
                             k_frag<D, OPT, KDQ>(kw[j], sp[0], kq, 2 * s),
                             k_frag<D, OPT, KDQ>(kw[j], sp[0], kq, 2 * s + 1));
        } else {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                if (j == 1 && !KDQ) {
                    cur = sl[1];
                    mma_load_a<D>(tab + (uint32_t)cur * TABS + r * RS + kq * 16, r & 1, afr);
                }
#pragma unroll
                for (int s = 0; s < KS; s++)
                    mma16816(c[j], afr[s][0], afr[s][1], afr[s][2], afr[s][3],
                             k_frag<D, OPT, KDQ>(kw[j], sp[j], kq, 2 * s),
                             k_frag<D, OPT, KDQ>(kw[j], sp[j], kq, 2 * s + 1));
            }
        }
        float sv[2][2];
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const uint32_t t = T0 + 8 * j + mma_tau(2 * kq + e);
                float v = c[j][e] + c[j][2 + e];
                if (t >= te) {
                    v = -INFINITY;
                } else if (OPT != 0 && !KDQ) {
                    v += qz[sl[j] * 4 + r];
                    if (P > 0 && opt_protectable(OPT)) {
                        const uint8_t *pc = sp[j] + poff + 2 * P + (jb[j] + t - nb[j]) * P;
                        const float *qp = qsp + ((size_t)sl[j] * 4 + r) * P;
                        for (uint32_t jj = 0; jj < P; jj++)
                            v += qp[jj] * (float)pc[jj];
                    }
                }
                sv[j][e] = v;
            }
        // Online softmax of row r over the 16 tokens (token T0 < te is valid).
        float p[2][2];
        mma_softmax<D, 2, E2>(sv, kq, st, p);
        // Values: P^T columns (hi for g < 4, lo for g >= 4) times the token's vscale.
        uint32_t vw[2][2][OPT == 0 ? D / 16 : VW];
        float ps[2][2];
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const uint32_t tok = min(T0 + 8 * j + mma_tau(2 * kq + e), te - 1);
                if (OPT == 0) {
                    const uint8_t *row = slots + (size_t)tok * (4 * D);
                    const uint32_t sw = mma_swz(tok);
#pragma unroll
                    for (int jj = 0; jj < D / 64; jj++)
                        lds_words<4>(row + 16 * ((D / 8 + g * (D / 64) + jj) ^ sw),
                                     vw[j][e] + 4 * jj);
                    ps[j][e] = p[j][e];
                } else {
                    mma_value_words<D, OPT>(sp[j], G, jb[j] + tok - nb[j], g, p[j][e], vw[j][e],
                                            &ps[j][e], st);
                }
            }
        mma_pv<D, OPT>(st, vw[0][0], vw[0][1], vw[1][0], vw[1][1], ps[0], ps[1], g >= 4);
    }
}

/* mma_tokens for the wide kernel (KVC_ATTEND_IMPL_MMA_WIDE) on a quantized page of keys of at
 * most 4 bits without protected channels: keys dequantized in registers against the plain query
 * table, 32 tokens (four n-tiles) a warp step instead of 16. Per 32 tokens a warp pays one online
 * softmax step (max, rescale test) instead of two, and when the four n-tiles lie in one slot (G a
 * multiple of 32) one gather of the slot's key scales and zeros for four n-tiles; the four logit
 * chains are independent, so more MMAs are in flight (the kernel is bound by issue and latency,
 * not bytes: gpu-h200.md, Round 4). Logits in log2 units (sm_exp<true>). Tokens [0, te), te a
 * multiple of 32 kMmaWarps (whole rounds of steps, mma_page): every token of a step is valid. */
template <int D, int OPT>
__device__ void mma_tokens_wide(const attn_params &A, const uint8_t *slots, uint32_t sb,
                                uint32_t te, const uint8_t *tab, mma_state<D> &st)
{
    static_assert(OPT >= 2 && OPT <= 4, "keys of at most 4 bits");
    constexpr int KS = D / 16;
    constexpr int KB = D * opt_kbits(OPT) / 32; // key bytes per lane
    constexpr int KW = KB / 4;
    constexpr int VB = D * opt_vbits(OPT) / 64; // value bytes per lane
    constexpr int VW = VB >= 4 ? VB / 4 : 1;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t g = lane >> 2, kq = lane & 3, r = g & 3;
    const uint32_t G = A.G;
    const uint32_t rowk = D * opt_kbits(OPT) / 8, koff = 4 * D + 4 * G;
    const uint32_t nsteps = te / 32;
    const bool g32 = G % 32 == 0; // every step lies in one slot

    uint32_t afr[KS][4];
    mma_load_a<D>(tab + r * mma_row_stride(D) + kq * 16, r & 1, afr);
    for (uint32_t step = warp; step < nsteps; step += kMmaWarps) {
        const uint32_t T0 = 32 * step;
        // N-tile j (tokens T0 + 8 j ..) lies in slot sp[j] from its token jb[j] on.
        uint32_t jb[4];
        const uint8_t *sp[4];
        bool one = g32;
        if (g32) {
            const uint32_t si = A.g_shift < 32 ? T0 >> A.g_shift : T0 / G;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                sp[j] = slots + (size_t)si * sb;
                jb[j] = T0 - si * G + 8 * j;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t nb = T0 + 8 * j;
                const uint32_t si = A.g_shift < 32 ? nb >> A.g_shift : nb / G;
                sp[j] = slots + (size_t)si * sb;
                jb[j] = nb - si * G;
            }
            one = sp[0] == sp[3];
        }
        uint32_t kw[4][KW];
#pragma unroll
        for (int j = 0; j < 4; j++)
            lds_words<KW>(sp[j] + koff + (jb[j] + mma_tau(g)) * rowk + kq * KB, kw[j]);
        float c[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int k = 0; k < 4; k++)
                c[j][k] = 0.0f;
        if (one) { // one slot: its key scales and zeros gathered once for all four
#pragma unroll
            for (int s = 0; s < KS; s++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    mma16816(c[j], afr[s][0], afr[s][1], afr[s][2], afr[s][3],
                             k_pair_deq<D, OPT>(kw[j], sp[0], kq, 2 * s),
                             k_pair_deq<D, OPT>(kw[j], sp[0], kq, 2 * s + 1));
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int s = 0; s < KS; s++)
                    mma16816(c[j], afr[s][0], afr[s][1], afr[s][2], afr[s][3],
                             k_pair_deq<D, OPT>(kw[j], sp[j], kq, 2 * s),
                             k_pair_deq<D, OPT>(kw[j], sp[j], kq, 2 * s + 1));
        }
        float sv[4][2];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 2; e++)
                sv[j][e] = c[j][e] + c[j][2 + e];
        // Online softmax of row r over the 32 tokens.
        float p[4][2];
        mma_softmax<D, 4, true>(sv, kq, st, p);
        // Values: two k steps of 16 tokens (n-tiles 0, 1 and 2, 3), P^T as in mma_tokens.
        uint32_t vw[4][2][VW];
        float ps[4][2];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 2; e++)
                mma_value_words<D, OPT>(sp[j], G, jb[j] + mma_tau(2 * kq + e), g, p[j][e], vw[j][e],
                                        &ps[j][e], st);
#pragma unroll
        for (int h = 0; h < 2; h++)
            mma_pv<D, OPT>(st, vw[2 * h][0], vw[2 * h][1], vw[2 * h + 1][0], vw[2 * h + 1][1],
                           ps[2 * h], ps[2 * h + 1], g >= 4);
    }
}

/* Builds the query table of slots s0 .. s0 + ns - 1 of a staged page (FP16 pages: one entry, q
 * itself): for each row r < 4, key lane kq and pair hp, (q * kscale) at the two channels of
 * kphys, hi then lo; qz = q . kzero; qsp = q * kscale at the P protected channels (whose main
 * entries are 0, as in attend.c; P is 0 for options without them). Called by the whole block;
 * a barrier must follow. SCALED false: one entry, q in OPT's channel order without the key
 * scales (the KDQ path, which dequantizes the keys instead), no qz or qsp. */
template <int D, int OPT, bool SCALED = true>
__device__ void mma_table(const attn_params &A, const uint8_t *slots, uint32_t sb, uint32_t s0,
                          uint32_t ns, const float *qq, uint8_t *tab, float *qz, float *qsp,
                          uint32_t P)
{
    const uint32_t G = A.G, RS = mma_row_stride(D), TABS = 4 * RS;
    const uint32_t rowk = OPT == 0 ? 0 : D * opt_kbits(OPT) / 8;
    const uint32_t rowv = OPT == 0 ? 0 : D * opt_vbits(OPT) / 8;
    const uint32_t poff = 4 * D + 4 * G + G * (rowk + rowv);
    constexpr uint32_t per_slot = 16 * (D / 4);
#pragma unroll 4
    for (uint32_t idx = threadIdx.x; idx < ns * per_slot; idx += blockDim.x) {
        const uint32_t sl = idx / per_slot, rem = idx % per_slot;
        const uint32_t r = rem / (4 * (D / 4)), kq = (rem / (D / 4)) % 4, w = rem % (D / 4);
        const bool hl = w >= D / 8;
        const uint32_t hp = w % (D / 8);
        const uint32_t c0 = kphys<D, OPT>(kq, hp, 0), c1 = kphys<D, OPT>(kq, hp, 1);
        float x0 = qq[r * D + c0], x1 = qq[r * D + c1];
        if (OPT != 0 && SCALED) {
            const uint8_t *sp = slots + (size_t)(s0 + sl) * sb;
            x0 *= h2f_at(sp + 2 * c0);
            x1 *= h2f_at(sp + 2 * c1);
            for (uint32_t jj = 0; jj < P; jj++) {
                const uint32_t c = rd16(sp + poff + 2 * jj);
                if (c == c0)
                    x0 = 0.0f;
                if (c == c1)
                    x1 = 0.0f;
            }
        }
        *reinterpret_cast<uint32_t *>(tab + sl * TABS + r * RS + ((hp / 2) ^ (r & 1)) * 64 +
                                      kq * 16 + ((hp % 2) * 2 + (hl ? 1 : 0)) * 4) =
            pack_h2(split_part(x0, hl), split_part(x1, hl));
    }
    if (OPT == 0 || !SCALED)
        return;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (uint32_t i = warp; i < ns * 4; i += blockDim.x / 32) {
        const uint32_t sl = i / 4, r = i % 4;
        const uint8_t *sp = slots + (size_t)(s0 + sl) * sb;
        float s = 0.0f;
        for (uint32_t c = lane; c < D; c += 32)
            s += qq[r * D + c] * h2f_at(sp + 2 * D + 2 * c);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1)
            s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0)
            qz[i] = s;
    }
    for (uint32_t idx = threadIdx.x; idx < ns * 4 * P; idx += blockDim.x) {
        const uint32_t sl = idx / (4 * P), r = (idx / P) % 4, jj = idx % P;
        const uint8_t *sp = slots + (size_t)(s0 + sl) * sb;
        const uint32_t c = rd16(sp + poff + 2 * jj);
        qsp[idx] = c < D ? qq[r * D + c] * h2f_at(sp + 2 * c) : 0.0f;
    }
}

/* One staged page of option OPT: tables and tokens, a group of table slots at a time; or, for a
 * quantized page without protected channels when A.kdq is set, keys dequantized in registers
 * against one plain query table for the whole page. WIDE: the wide kernel (mma_tokens_wide for
 * keys of at most 4 bits; logits in log2 units everywhere). */
template <int D, int OPT, bool WIDE>
__device__ void mma_page(const attn_params &A, const uint8_t *pg, const page_hdr &h,
                         const float *qq, uint8_t *tab, float *qz, float *qsp, mma_state<D> &st,
                         int &tab_opt)
{
    const uint8_t *slots = pg + KVC_PAGE_HEADER_BYTES;
    const uint32_t sb = A.slot_bytes[OPT], G = A.G;
    const uint32_t ntok = OPT == 0 ? h.n_slots : (h.n_slots - 1) * G + h.last_tokens;
    const uint32_t P = opt_protectable(OPT) ? A.P : 0;
    if (OPT == 0 || (A.kdq && P == 0)) {
        // One plain table serves every page of this option: built when the option changes
        // (tab_opt is block-uniform; the caller's barrier after each page orders the rebuild
        // after every read of the old table).
        if (tab_opt != OPT) {
            mma_table<D, OPT, false>(A, slots, sb, 0, 1, qq, tab, qz, qsp, 0);
            __syncthreads();
            tab_opt = OPT;
        }
        uint32_t tw = 0; // tokens [0, tw) in wide steps, the rest in 16-token tiles
        if constexpr (WIDE && OPT >= 2) {
            // Whole rounds of 4 wide steps, so that every warp gets as many: a 32 KiB INT4 page
            // of 192 tokens is 6 steps, 2 for two warps and 1 for the others, against one step
            // and one tile each this way.
            tw = ntok / (32 * kMmaWarps) * (32 * kMmaWarps);
            if (tw > 0)
                mma_tokens_wide<D, OPT>(A, slots, sb, tw, tab, st);
        }
        if (tw < ntok)
            mma_tokens<D, OPT, OPT != 0, WIDE>(A, slots, sb, 0, tw, ntok, tab, qz, qsp, 0, st);
        return;
    }
    tab_opt = -1; // the scaled tables below overwrite it
    for (uint32_t s0 = 0; s0 < h.n_slots; s0 += A.m_ts) {
        const uint32_t ns = min(A.m_ts, h.n_slots - s0);
        mma_table<D, OPT>(A, slots, sb, s0, ns, qq, tab, qz, qsp, P);
        __syncthreads();
        mma_tokens<D, OPT, false, WIDE>(A, slots, sb, s0, s0 * G, min(ntok, (s0 + ns) * G), tab, qz,
                                        qsp, P, st);
        __syncthreads(); // the table is rebuilt next
    }
}

/* What a page is to pass `pass`: 0 nothing, 1 a bad page (counted in pass 0), 2 attend it
 * (the checks of attend_split_kernel). */
__device__ __forceinline__ int mma_page_kind(const attn_params &A, uint32_t pid, uint4 hraw,
                                             int pass)
{
    if (pid >= A.n_pages)
        return 1;
    const page_hdr h = parse_hdr(hraw);
    if (h.n_tokens == 0 || h.opt >= kOpts)
        return 0;
    const uint32_t opt = h.opt, sb = A.slot_bytes[opt], d = A.d;
    const bool bad = h.head_dim != d || h.slot_tokens != (opt == 0 ? 1u : A.G) ||
                     h.n_slots > h.cap_slots ||
                     (size_t)KVC_PAGE_HEADER_BYTES + (size_t)h.n_slots * sb > A.page_bytes ||
                     (opt != 0 && h.n_slots > 0 && (h.last_tokens == 0 || h.last_tokens > A.G));
    const bool rot = (h.flags & KVC_PAGE_FLAG_ROTATED) != 0;
    if (bad || (rot && (d & (d - 1)) != 0))
        return 1;
    if (h.n_slots == 0 || (int)rot != pass)
        return 0;
    return 2;
}

/* Starts the asynchronous copy of the used bytes of page pid into dst (FP16 pages swizzled)
 * when pass attends it; always commits one group. */
template <int D>
__device__ __forceinline__ void mma_stage(const attn_params &A, uint32_t pid, uint4 hraw, int pass,
                                          uint8_t *dst)
{
    if (mma_page_kind(A, pid, hraw, pass) == 2) {
        const page_hdr h = parse_hdr(hraw);
        const uint32_t n16 = (KVC_PAGE_HEADER_BYTES + h.n_slots * A.slot_bytes[h.opt]) / 16;
        const uint4 *src = reinterpret_cast<const uint4 *>(A.base + (size_t)pid * A.page_bytes);
        uint4 *d16 = reinterpret_cast<uint4 *>(dst);
        if (h.opt == 0) {
            constexpr uint32_t cpt = D / 4; // 16-byte chunks per FP16 token (K and V)
            for (uint32_t i = threadIdx.x; i < n16; i += blockDim.x) {
                uint32_t o = i;
                if (i > 0) {
                    const uint32_t t = (i - 1) / cpt, c = (i - 1) % cpt;
                    o = 1 + t * cpt + (c ^ mma_swz(t));
                }
                __pipeline_memcpy_async(d16 + o, src + i, sizeof(uint4));
            }
        } else {
            for (uint32_t i = threadIdx.x; i < n16; i += blockDim.x)
                __pipeline_memcpy_async(d16 + i, src + i, sizeof(uint4));
        }
    }
    __pipeline_commit();
}

/* mma_finish's reduction rows: D channels plus a pad word after every D / 8. */
__host__ __device__ constexpr uint32_t mma_red_stride(uint32_t d)
{
    return d + 8;
}
template <int D> __device__ __forceinline__ uint32_t mma_red_col(uint32_t c)
{
    return c + c / (D / 8);
}

/* End of a pass: the warps' partial results of this split combined into dst ([rows][D], scaled
 * to the block's running max M), M into *mp_out (or NULL); with `last`, M and the softmax sum
 * into ws_m, ws_l. acc and pz restart at zero; m and l run on into the next pass. E2: the
 * running maxima are in log2 units (the wide kernel); M is written in natural units, as the
 * combine kernel reads it. */
template <int D, bool E2>
__device__ void mma_finish(const attn_params &A, mma_state<D> &st, uint8_t *red_bytes, float *dst,
                           float *mp_out, bool last, size_t slot)
{
    constexpr int KS = D / 16;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, tid = threadIdx.x;
    const uint32_t g = lane >> 2, kq = lane & 3;
    // [warps][4][mma_red_stride(D)]: channel c at mma_red_col<D>(c), one pad word after each
    // lane group's D / 8 channels, so that the 16 lanes of each store below (8 groups x 2 rows)
    // hit 16 different banks (without the pads, 8-way conflicts at D 128).
    float *red = reinterpret_cast<float *>(red_bytes);
    float *wm = red + kMmaWarps * 4 * mma_red_stride(D), *wl = wm + kMmaWarps * 4;
    float l = st.l + __shfl_xor_sync(0xffffffffu, st.l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    float pz = st.pz + __shfl_xor_sync(0xffffffffu, st.pz, 1);
    pz += __shfl_xor_sync(0xffffffffu, pz, 2);
    const float pz0 = __shfl_sync(0xffffffffu, pz, 4 * ((2 * kq) & 3));
    const float pz1 = __shfl_sync(0xffffffffu, pz, 4 * ((2 * kq + 1) & 3));
#pragma unroll
    for (int u = 0; u < KS; u++)
#pragma unroll
        for (int k = 0; k < 4; k++)
            st.acc[u][k] += __shfl_xor_sync(0xffffffffu, st.acc[u][k], 2);
    if (kq < 2) {
        const uint32_t r0 = 2 * kq, ch = mma_red_col<D>(g * (D / 8));
        float *w0 = red + ((size_t)warp * 4 + r0) * mma_red_stride(D);
        float *w1 = w0 + mma_red_stride(D);
#pragma unroll
        for (int u = 0; u < KS; u++) {
            w0[ch + u] = st.acc[u][0] + pz0;
            w1[ch + u] = st.acc[u][1] + pz1;
            w0[ch + D / 16 + u] = st.acc[u][2] + pz0;
            w1[ch + D / 16 + u] = st.acc[u][3] + pz1;
        }
    }
    if (kq == 0 && g < 4) {
        wm[warp * 4 + g] = st.m;
        wl[warp * 4 + g] = l;
    }
    __syncthreads();
    const uint32_t rows = A.rows;
    for (uint32_t idx = tid; idx < rows * D; idx += blockDim.x) {
        const uint32_t r = idx / D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < kMmaWarps; w++)
            M = fmaxf(M, wm[w * 4 + r]);
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < kMmaWarps; w++) {
            const float mw = wm[w * 4 + r];
            if (mw != -INFINITY)
                s += red[((size_t)w * 4 + r) * mma_red_stride(D) + mma_red_col<D>(idx % D)] *
                     sm_exp<E2>(mw - M);
        }
        dst[idx] = s;
    }
    if (tid < rows) {
        float M = -INFINITY, L = 0.0f;
        for (int w = 0; w < kMmaWarps; w++)
            M = fmaxf(M, wm[w * 4 + tid]);
        for (int w = 0; w < kMmaWarps; w++)
            if (wm[w * 4 + tid] != -INFINITY)
                L += wl[w * 4 + tid] * sm_exp<E2>(wm[w * 4 + tid] - M);
        if (E2)
            M *= 0.693147180559945309f; // ln 2
        if (mp_out != NULL)
            mp_out[tid] = M;
        if (last) {
            A.ws_m[slot * rows + tid] = M;
            A.ws_l[slot * rows + tid] = L;
        }
    }
    __syncthreads(); // red (a page buffer) is reused
    st.pz = 0.0f;
#pragma unroll
    for (int u = 0; u < KS; u++)
#pragma unroll
        for (int k = 0; k < 4; k++)
            st.acc[u][k] = 0.0f;
}

/* The body of attend_mma_kernel<D, MINB, WIDE>: smem its dynamic shared memory, s_red its
 * [kMmaThreads / 32] array. FUSE: no combine kernel follows (attend_fused_combine). WIDE: the
 * wide kernel (KVC_ATTEND_IMPL_MMA_WIDE): the query scaled by log2 e, softmax in base 2,
 * mma_tokens_wide for keys of at most 4 bits. */
template <int D, bool WIDE, bool FUSE = false>
__device__ __forceinline__ void attend_mma_body(const attn_params &A, uint8_t *smem, float *s_red)
{
    float *qf = reinterpret_cast<float *>(smem + A.m_off_q); // [4][D] q (pass 1: H q), * scale
    uint8_t *tab = smem + A.m_off_tab;
    float *qz = reinterpret_cast<float *>(smem + A.m_off_qz);
    float *qsp = reinterpret_cast<float *>(smem + A.m_off_qsp);
    pdl_trigger();

    const uint32_t tid = threadIdx.x, item = blockIdx.y, split = blockIdx.x;
    const uint32_t rows = A.rows;
    const uint32_t b = item / A.n_kv, kvh = item % A.n_kv;
    const float *q = A.q + ((size_t)b * A.n_heads + (size_t)kvh * rows) * D;
    const float qscale = WIDE ? A.scale * 1.44269504088896341f : A.scale; // log2 e
    for (uint32_t i = tid; i < 4 * D; i += blockDim.x) {
        const float v = i / D < rows ? q[i] * qscale : 0.0f;
        qf[i] = v;
    }
    uint32_t ls, p0, p1;
    split_range(A, item, split, &ls, &p0, &p1);
    const size_t slot = (size_t)item * A.n_splits + split;

    mma_state<D> st;
    st.m = -INFINITY;
    st.l = 0.0f;
    st.pz = 0.0f;
#pragma unroll
    for (int u = 0; u < D / 16; u++)
#pragma unroll
        for (int k = 0; k < 4; k++)
            st.acc[u][k] = 0.0f;
    bool any_rot = false; // block-uniform: a rotated page was seen in pass 0
    int tab_opt = -1;     // block-uniform: the option whose plain query table tab holds
    __syncthreads();
    const uint4 zero4 = make_uint4(0, 0, 0, 0);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            if (!any_rot)
                break;
            block_hadamard(qf, 4, D); // pass 1 attends only rotated pages
            tab_opt = -1;
        }
        const float *qq = qf;
        uint32_t pid = p0 < p1 ? A.page_ids[ls + p0] : 0;
        uint4 hraw = p0 < p1 && pid < A.n_pages ? load_hdr(A, pid) : zero4;
        if (p0 < p1)
            mma_stage<D>(A, pid, hraw, pass, smem);
        uint32_t pid_next = p0 + 1 < p1 ? A.page_ids[ls + p0 + 1] : 0;
        uint4 hraw_next = p0 + 1 < p1 && pid_next < A.n_pages ? load_hdr(A, pid_next) : zero4;
        for (uint32_t pi = p0; pi < p1; pi++) {
            const uint32_t bsel = (pi - p0) & 1;
            if (pi + 1 < p1)
                mma_stage<D>(A, pid_next, hraw_next, pass, smem + (bsel ^ 1) * A.m_pbuf);
            else
                __pipeline_commit();
            const uint32_t pid_after = pi + 2 < p1 ? A.page_ids[ls + pi + 2] : 0;
            const uint4 hraw_after =
                pi + 2 < p1 && pid_after < A.n_pages ? load_hdr(A, pid_after) : zero4;
            __pipeline_wait_prior(1);
            __syncthreads();
            const int kind = mma_page_kind(A, pid, hraw, pass);
            if (kind == 1 && pass == 0 && tid == 0)
                atomicAdd(A.ws_err, 1u);
            if (pass == 0 && pid < A.n_pages && kind != 1) {
                const page_hdr hh = parse_hdr(hraw);
                if (hh.opt < kOpts && hh.n_tokens > 0 && hh.n_slots > 0 &&
                    (hh.flags & KVC_PAGE_FLAG_ROTATED) != 0)
                    any_rot = true;
            }
            if (kind == 2) {
                const page_hdr h = parse_hdr(hraw);
                const uint8_t *pg = smem + bsel * A.m_pbuf; // pages alternate buffers
                switch (h.opt) {
                case 0:
                    mma_page<D, 0, WIDE>(A, pg, h, qq, tab, qz, qsp, st, tab_opt);
                    break;
                case 1:
                    mma_page<D, 1, WIDE>(A, pg, h, qq, tab, qz, qsp, st, tab_opt);
                    break;
                case 2:
                    mma_page<D, 2, WIDE>(A, pg, h, qq, tab, qz, qsp, st, tab_opt);
                    break;
                case 3:
                    mma_page<D, 3, WIDE>(A, pg, h, qq, tab, qz, qsp, st, tab_opt);
                    break;
                default:
                    mma_page<D, 4, WIDE>(A, pg, h, qq, tab, qz, qsp, st, tab_opt);
                    break;
                }
            }
            __syncthreads(); // this buffer is staged again two pages on
            pid = pid_next;
            hraw = hraw_next;
            pid_next = pid_after;
            hraw_next = hraw_after;
        }
        __pipeline_wait_prior(0);
        __syncthreads();
        if (pass == 0)
            mma_finish<D, WIDE>(A, st, smem, A.ws_acc + slot * rows * D, A.ws_mp + slot * rows,
                                !any_rot, slot);
        else
            mma_finish<D, WIDE>(A, st, smem, A.ws_accr + slot * rows * D, NULL, true, slot);
    }
    if (tid == 0)
        A.ws_rot[slot] = any_rot ? 1u : 0u;
    if constexpr (FUSE)
        attend_fused_combine(A, item, rows, smem, s_red);
}

/* ------------------------------------------------------------------------------------------ */
/* Host arithmetic of the launches                                                              */
/* ------------------------------------------------------------------------------------------ */

static inline size_t align_up(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

/* What a pool and a batch shape ask of the kernels, before any device is asked. */
struct attend_geom {
    uint32_t d, rows, cpt, lpt, n_items;
    uint32_t slot_bytes[kOpts];
    size_t buf_bytes, smem_split; // kernel 1 (SIMT): its page buffer and all its shared memory
    bool mma_shape;               // head_dim 64 or 128 and GQA groups up to 4 rows
    uint32_t m_pbuf, m_off_q, m_off_tab, m_off_qz, m_off_qsp, m_ts; // with mma_shape
    size_t smem_mma; // the tensor-core kernel's shared memory (see attn_params), with mma_shape
};

/* Checks a pool and batch shape (FY_ERR_INVALID_ARG, or FY_ERR_UNSUPPORTED for a GQA group or
 * batch the kernels do not take) and lays out both kernels' shared memory. */
static inline fy_status_t attend_shape(const kvc_gpu_pages_t *pool, const kvc_attend_batch_t *bt,
                                       attend_geom *g)
{
    if (pool == NULL || bt == NULL)
        return FY_ERR_INVALID_ARG;
    const uint32_t d = pool->head_dim, G = pool->group, P = pool->protect;
    if (d == 0 || d % 8 || d > 512 || G < 8 || G > 256 || G % 8 || P > 32 || P >= d ||
        pool->page_bytes % 64 || pool->page_bytes < 64 || pool->n_pages == 0)
        return FY_ERR_INVALID_ARG;
    if (bt->batch == 0 || bt->n_kv_heads == 0 || bt->n_heads % bt->n_kv_heads ||
        bt->impl > KVC_ATTEND_IMPL_MMA_WIDE)
        return FY_ERR_INVALID_ARG;
    const uint32_t rows = bt->n_heads / bt->n_kv_heads;
    if (rows == 0 || rows > kMaxRows)
        return FY_ERR_UNSUPPORTED;
    uint64_t items = (uint64_t)bt->batch * bt->n_kv_heads;
    if (items > 65535) // gridDim.y of kernel 1
        return FY_ERR_UNSUPPORTED;
    for (int o = 0; o < kOpts; o++) {
        size_t sb = align_up(group_bytes(o, d, o == 0 ? 1 : G, P), 16);
        if (sb + KVC_PAGE_HEADER_BYTES > pool->page_bytes)
            return FY_ERR_INVALID_ARG; // the CPU pool refuses this geometry as well
        g->slot_bytes[o] = (uint32_t)sb;
    }
    g->d = d;
    g->rows = rows;
    g->cpt = d <= 256 ? 8 : 16;
    uint32_t lanes = (d + g->cpt - 1) / g->cpt, lpt = 1;
    while (lpt < lanes)
        lpt <<= 1;
    g->lpt = lpt; // <= 32: d <= 256 -> <= 32 lanes of 8, d <= 512 -> <= 32 lanes of 16
    g->n_items = (uint32_t)items;
    const uint32_t tpb = kThreads / lpt;
    g->buf_bytes = align_up(pool->page_bytes, 16);
    size_t red = (size_t)tpb * rows * d * sizeof(float);
    if (red > g->buf_bytes)
        g->buf_bytes = red;
    g->smem_split = g->buf_bytes + (2 * (size_t)rows * d + (size_t)rows * kChunk) * sizeof(float);

    // The tensor-core kernel: two page buffers (also its end-of-pass reduction), the query, the
    // query tables of m_ts slots, their q.kzero and the protected channels' scaled queries.
    g->mma_shape = (d == 64 || d == 128) && rows <= kMmaRows;
    g->m_pbuf = g->m_off_q = g->m_off_tab = g->m_off_qz = g->m_off_qsp = g->m_ts = 0;
    g->smem_mma = 0;
    if (g->mma_shape) {
        g->m_ts = mma_table_slots(G);
        size_t pbuf = align_up(pool->page_bytes, 16);
        const size_t mred =
            ((size_t)kMmaWarps * 4 * mma_red_stride(d) + 2 * kMmaWarps * 4) * sizeof(float);
        if (2 * pbuf < mred)
            pbuf = align_up(mred / 2, 16);
        size_t off = 2 * pbuf;
        g->m_pbuf = (uint32_t)pbuf;
        g->m_off_q = (uint32_t)off;
        off += (size_t)4 * d * sizeof(float);
        g->m_off_tab = (uint32_t)off;
        off += (size_t)g->m_ts * 4 * mma_row_stride(d);
        g->m_off_qz = (uint32_t)off;
        off += align_up((size_t)g->m_ts * 4 * sizeof(float), 16);
        g->m_off_qsp = (uint32_t)off;
        off += align_up((size_t)g->m_ts * 4 * (P > 0 ? P : 1) * sizeof(float), 16);
        g->smem_mma = off;
    }
    return FY_OK;
}

/* The workspace of a launch whose kernel 1 runs up to max_splits splits per list, and the
 * combine kernel's shared memory. */
struct attend_ws {
    size_t off_m, off_l, off_mp, off_acc, off_accr, off_rot, bytes; // 0: counters (zero_bytes)
    size_t zero_bytes; // the bytes a launch zeroes first: the bad pages, the split counters
    size_t smem_combine;
};

static inline void attend_ws_plan(const attend_geom &g, uint32_t max_splits, attend_ws *w)
{
    const uint32_t d = g.d, rows = g.rows;
    w->smem_combine = combine_smem_floats(max_splits, d, kCombThreads) * sizeof(float);
    const size_t parts = (size_t)g.n_items * max_splits;
    // The bad-page counter, then the lists' split counters (FUSE), both zeroed by one memset.
    size_t off = align_up(sizeof(uint32_t) * (1 + (size_t)g.n_items), kWsAlign);
    w->off_m = off;
    off = align_up(off + parts * rows * sizeof(float), kWsAlign);
    w->off_l = off;
    off = align_up(off + parts * rows * sizeof(float), kWsAlign);
    w->off_mp = off;
    off = align_up(off + parts * rows * sizeof(float), kWsAlign);
    w->off_acc = off;
    off = align_up(off + parts * rows * d * sizeof(float), kWsAlign);
    w->off_accr = off;
    off = align_up(off + parts * rows * d * sizeof(float), kWsAlign);
    w->off_rot = off;
    off = align_up(off + parts * sizeof(uint32_t), kWsAlign);
    w->bytes = off;
    w->zero_bytes = sizeof(uint32_t) * (1 + (size_t)g.n_items);
}

/* The kernels' arguments for a launch of n_splits splits per list (kdq: the tensor-core kernel
 * dequantizes keys in registers) with workspace ws (laid out by w, its first w.zero_bytes
 * zeroed). */
static inline attn_params attend_params(const attend_geom &g, const attend_ws &w,
                                        const kvc_gpu_pages_t *pool,
                                        const kvc_attend_batch_t *batch, uint32_t n_splits,
                                        bool kdq, const float *q, float scale, float *out,
                                        uint8_t *ws)
{
    attn_params A;
    memset(&A, 0, sizeof(A));
    A.base = pool->base;
    A.page_bytes = pool->page_bytes;
    A.n_pages = pool->n_pages;
    A.d = pool->head_dim;
    A.G = pool->group;
    A.P = pool->protect;
    for (int o = 0; o < kOpts; o++)
        A.slot_bytes[o] = g.slot_bytes[o];
    A.n_heads = batch->n_heads;
    A.n_kv = batch->n_kv_heads;
    A.n_items = g.n_items;
    A.n_splits = n_splits;
    A.lpt = g.lpt;
    A.buf_bytes = (uint32_t)g.buf_bytes;
    A.list_start = batch->list_start;
    A.page_ids = batch->page_ids;
    A.q = q;
    A.scale = scale;
    A.out = out;
    A.ws_err = reinterpret_cast<uint32_t *>(ws);
    A.ws_cnt = A.ws_err + 1;
    A.ws_m = reinterpret_cast<float *>(ws + w.off_m);
    A.ws_l = reinterpret_cast<float *>(ws + w.off_l);
    A.ws_acc = reinterpret_cast<float *>(ws + w.off_acc);
    A.ws_mp = reinterpret_cast<float *>(ws + w.off_mp);
    A.ws_accr = reinterpret_cast<float *>(ws + w.off_accr);
    A.ws_rot = reinterpret_cast<uint32_t *>(ws + w.off_rot);
    A.rows = g.rows;
    A.m_pbuf = g.m_pbuf;
    A.m_off_q = g.m_off_q;
    A.m_off_tab = g.m_off_tab;
    A.m_off_qz = g.m_off_qz;
    A.m_off_qsp = g.m_off_qsp;
    A.m_ts = g.m_ts;
    A.kdq = kdq ? 1u : 0u;
    A.g_shift = 32;
    for (uint32_t b = 0; b < 32; b++)
        if ((1u << b) == A.G)
            A.g_shift = b;
    return A;
}

#endif
