/* CRC32C of a frame body on the GPU: crc_parts (crc_kernel) and crc_join (crc_final_kernel),
 * device code that two places compile: kvcodec/encode.cu and tests/kvcodec/test_crc_emu.cc,
 * which runs it on host threads (blocks of warps, each barrier and warp intrinsic emulated)
 * against fy_crc32c over lengths, alignments, table layouts and grids that take every path, so
 * that it is tested on every machine, not only on one with a GPU.
 *
 * The body is read in rows of CRC_ROW bytes, a little-endian word per lane of a warp, so that
 * each load of a warp is one contiguous 128-byte line. Each lane keeps its own register over
 * its column (zlib's braided CRC with 32 braids): a word goes in with the register through
 * tables that carry it past the rest of its row (x^(8 CRC_ROW)), four lookups a word, which hit
 * a copy of the tables of the lane's own bank of shared memory when the block has room for 32
 * copies (R = 32: 128 KiB), so that no lookup waits on another lane's.
 *
 * Not a standalone header. Outside CUDA the includer provides __device__, __host__,
 * __forceinline__, threadIdx, blockIdx, blockDim, gridDim, __syncthreads, __shfl_sync and
 * __shfl_xor_sync. */
#ifndef FERRY_KVCODEC_CRC_DEV_INT_H
#define FERRY_KVCODEC_CRC_DEV_INT_H

#ifdef __CUDACC__
#define CRC_UNROLL _Pragma("unroll")
#else
#define CRC_UNROLL
#endif

#define CRC_ROW           128u // bytes: a warp's row, a word per lane
#define CRC_BATCH         16   // rows a lane has in flight
#define CRC_FINAL_THREADS 256
#define CRC_MAX_PARTS     1024 // crc_kernel's blocks at most (crc_final_kernel's tree)

/* GF(2) product modulo the reflected CRC32C polynomial (bit 31 is x^0), zlib's crc32_combine
 * arithmetic: crc(A || B) = crc(A) x^(8|B|) + crc(B) for register values without the final
 * inversion, and a register r run over n zero bytes is r x^(8n). */
static __host__ __device__ constexpr uint32_t gf2_mul(uint32_t a, uint32_t b)
{
    uint32_t p = 0;
    for (int k = 0; k < 32; k++) {
        p ^= b & (0u - (a >> 31));
        a <<= 1;
        b = (b >> 1) ^ (0x82f63b78u & (0u - (b & 1u)));
    }
    return p;
}

/* The shifts the CRC kernels multiply by: tail[t] = x^(8 t) for t <= CRC_ROW, and row[b][k] =
 * x^(8 CRC_ROW 2^b) x^k, with which crc_shift multiplies by x^(8 CRC_ROW 2^b) in one pass of
 * independent operations (gf2_mul's loop carries b through 32 dependent steps). Computed by the
 * compiler; each block copies them into its shared memory with coalesced loads (read from
 * constant memory, each level of a tree waited on a cold constant-cache line). */
typedef struct {
    uint32_t row[32][32];
    uint32_t tail[CRC_ROW + 1];
} crc_pow_t;

#define CRC_POW_WORDS (sizeof(crc_pow_t) / sizeof(uint32_t))

static constexpr crc_pow_t crc_pow_make(void)
{
    crc_pow_t t = {};
    t.tail[0] = 1u << 31;
    for (uint32_t i = 1; i <= CRC_ROW; i++)
        t.tail[i] = gf2_mul(t.tail[i - 1], 1u << 23); // x^8
    uint32_t chunk = t.tail[CRC_ROW];
    for (int b = 0; b < 32; b++) {
        uint32_t x = chunk;
        for (int k = 0; k < 32; k++) {
            t.row[b][k] = x;
            x = (x >> 1) ^ (0x82f63b78u & (0u - (x & 1u))); // times x
        }
        chunk = gf2_mul(chunk, chunk);
    }
    return t;
}

static __device__ const crc_pow_t g_crc_pow = crc_pow_make();

/* Shared memory of a crc_parts block of `threads` threads with R copies of the tables: the
 * tables, the shifts, a word per warp. */
static __host__ __device__ constexpr size_t crc_smem_words(unsigned R, unsigned threads)
{
    return (size_t)4 * 256 * R + CRC_POW_WORDS + threads / 32;
}

/* a x^(8 CRC_ROW 2^b): the rows of a's set bits (bit 31 - k takes row k); row = pw->row[b], the
 * same in every lane of a warp (a broadcast). */
static __device__ __forceinline__ uint32_t crc_shift(const uint32_t *row, uint32_t a)
{
    uint32_t p0 = 0, p1 = 0;
CRC_UNROLL
    for (int k = 0; k < 32; k += 2) {
        p0 ^= row[k] & (0u - ((a >> (31 - k)) & 1u));
        p1 ^= row[k + 1] & (0u - ((a >> (30 - k)) & 1u));
    }
    return p0 ^ p1;
}

/* log2 of the full rows per warp of crc_kernel: the smallest power of two q with q x warps
 * covering them. */
static __device__ __forceinline__ uint32_t crc_lq(size_t rows, size_t warps)
{
    uint32_t lq = 0;
    while ((warps << lq) < rows)
        lq++;
    return lq;
}

/* v x^(8 CRC_ROW) from the braid tables (entry k 256 + i = (i << 8k) x^(8 CRC_ROW), its R
 * copies consecutive) at tab, through this lane's copy: lane_off = 4 (lane % R), ORed into
 * each entry's byte offset. */
template <int R>
static __device__ __forceinline__ uint32_t crc_braid(const uint8_t *tab, uint32_t lane_off,
                                                     uint32_t v)
{
    constexpr uint32_t E = 4u * R, T = 256u * E; // bytes an entry, a table
    const uint32_t o0 = ((v & 0xffu) * E) | lane_off, o1 = (((v >> 8) & 0xffu) * E) | lane_off;
    const uint32_t o2 = (((v >> 16) & 0xffu) * E) | lane_off, o3 = ((v >> 24) * E) | lane_off;
    return *(const uint32_t *)(tab + o0) ^ *(const uint32_t *)(tab + T + o1) ^
           *(const uint32_t *)(tab + 2 * T + o2) ^ *(const uint32_t *)(tab + 3 * T + o3);
}

/* The little-endian word at p: one load where bodies are aligned, as they are on the GPU. */
template <bool ALIGNED> static __device__ __forceinline__ uint32_t crc_ld(const uint8_t *p)
{
    if (ALIGNED)
        return *(const uint32_t *)p;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* m (FULL: CRC_BATCH) rows of a lane's column from p through the braid tables, from c; all
 * loaded before the first lookup (left to itself, ptxas issues each load just ahead of its
 * lookups, and the lane waits out a memory latency a row; zero, a 0 it cannot see through,
 * folds every loaded word into c first). */
template <int R, bool ALIGNED, bool FULL>
static __device__ __forceinline__ uint32_t crc_batch(const uint8_t *tab, uint32_t lane_off,
                                                     const uint8_t *p, uint32_t m, uint32_t c,
                                                     uint32_t zero)
{
    uint32_t w[CRC_BATCH], fold = 0;
    CRC_UNROLL
    for (int j = 0; j < CRC_BATCH; j++) {
        w[j] = FULL || (uint32_t)j < m ? crc_ld<ALIGNED>(p + (size_t)j * CRC_ROW) : 0u;
        fold ^= w[j];
    }
    c ^= fold & zero;
CRC_UNROLL
for (int j = 0; j < CRC_BATCH; j++)
    if (FULL || (uint32_t)j < m)
        c = crc_braid<R>(tab, lane_off, c ^ w[j]);
return c;
}

/* A lane's register over n >= 1 rows of its column from p (a word every CRC_ROW bytes), from c:
 * each word but the last carried past the rest of its row, the last XORed in (crc_parts shifts
 * it past the lanes after it). */
template <int R, bool ALIGNED>
static __device__ __forceinline__ uint32_t crc_rows(const uint8_t *tab, uint32_t lane_off,
                                                    const uint8_t *p, size_t n, uint32_t c,
                                                    uint32_t zero)
{
    size_t r = 0;
    for (; r + CRC_BATCH < n; r += CRC_BATCH, p += CRC_BATCH * CRC_ROW)
        c = crc_batch<R, ALIGNED, true>(tab, lane_off, p, CRC_BATCH, c, zero);
    if (r + 1 < n) {
        const uint32_t m = (uint32_t)(n - 1 - r);
        c = crc_batch<R, ALIGNED, false>(tab, lane_off, p, m, c, zero);
        p += (size_t)m * CRC_ROW;
    }
    return c ^ crc_ld<ALIGNED>(p);
}

/* The XOR of v over the lanes of a warp, in every lane. */
static __device__ __forceinline__ uint32_t crc_warp_xor(uint32_t v)
{
    CRC_UNROLL
    for (int k = 1; k < 32; k <<= 1)
        v ^= __shfl_xor_sync(0xffffffffu, v, k);
    return v;
}

/* CRC32C (fy_crc32c(0, body)) of buf[0, len), in parts that crc_join joins (crc_kernel: a grid
 * of THREADS-thread blocks; sm: crc_smem_words(R, THREADS) words of the block's shared memory;
 * parts: gridDim.x + 1 entries). R (1, 2, 4, 8, 16 or 32) copies of the tables: lane L reads
 * copy L % R.
 *
 * The body is cut into rows of CRC_ROW bytes; the last (1 .. CRC_ROW bytes) is run by the
 * grid's last warp into parts[gridDim.x]. The full rows before it are numbered from the end
 * (r = 0 the latest), and warp g of the grid runs rows r in [g q, g q + q) in data order, lane
 * L the word at 4 L of each: from 0xffffffff in lane 0 when that includes the body's first row,
 * else from 0. A word of lane L in the warp's last row has 4 (31 - L) bytes of the share after
 * it, so lane L's register is multiplied by x^(32 (32 - L)) (its word and those bytes) and the
 * lanes' products XORed give the share's register. Since crc(A || B) = crc(A) x^(8|B|) + crc(B)
 * for registers without the final inversion, and in the trees below the later of two shares is
 * always whole (an earlier one past the data is 0), each level multiplies by one constant,
 * x^(8 CRC_ROW q 2^j): the warps of a block into parts[blockIdx.x], then the blocks
 * (crc_join). A lane's share is a short chain of loads and lookups whatever the frame's size. */
template <int R, int THREADS>
static __device__ void crc_parts(const uint8_t *buf, size_t len, uint32_t *parts, uint32_t *sm)
{
    static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R divides 32");
    static_assert(THREADS >= 32 && THREADS <= 1024 && (THREADS & (THREADS - 1)) == 0,
                  "a power-of-two block of up to 32 warps");
    constexpr uint32_t WARPS = THREADS / 32;
    uint32_t *tab = sm;
    crc_pow_t *pw = (crc_pow_t *)(sm + 4 * 256 * R);
    uint32_t *s_warp = sm + 4 * 256 * R + CRC_POW_WORDS;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t *pow_src = (const uint32_t *)&g_crc_pow;
    for (uint32_t i = threadIdx.x; i < CRC_POW_WORDS; i += THREADS)
        ((uint32_t *)pw)[i] = pow_src[i];
    // The braid tables, a warp computing 32 entries and writing their copies as consecutive
    // words (a store of the 32 lanes is one line: entry e's copies are words e R .. e R + R - 1).
    const uint32_t x_row = g_crc_pow.tail[CRC_ROW];
    for (uint32_t e0 = warp * 32; e0 < 4 * 256; e0 += THREADS) {
        const uint32_t e = e0 + lane;
        const uint32_t v = gf2_mul((e & 0xffu) << (8 * (e >> 8)), x_row);
        for (uint32_t j = 0; j < (uint32_t)R; j++) {
            const uint32_t f = j * 32 + lane;
            tab[e0 * R + f] = __shfl_sync(0xffffffffu, v, (int)(f / R));
        }
    }
    __syncthreads();
    const size_t rows = len ? (len - 1) / CRC_ROW : 0;
    const size_t warps = (size_t)gridDim.x * WARPS;
    const size_t g = (size_t)blockIdx.x * WARPS + warp;
    const uint32_t lq = crc_lq(rows, warps);
    const size_t q = (size_t)1 << lq;
    const uint32_t zero = (uint32_t)(len >> 62); // frames are far shorter: 0
    const uint8_t *tb = (const uint8_t *)tab;
    const uint32_t lane_off = 4 * (lane % R);
    const uint32_t lane_shift = pw->tail[4 * (32 - lane)];
    uint32_t acc = 0;
    if (g * q < rows) {
        const size_t hi = rows - g * q, lo = hi > q ? hi - q : 0; // rows [lo, hi)
        const uint32_t c = lo == 0 && lane == 0 ? 0xffffffffu : 0u;
        const uint8_t *p = buf + lo * CRC_ROW + 4 * lane;
        acc = ((uintptr_t)buf & 3) == 0 ? crc_rows<R, true>(tb, lane_off, p, hi - lo, c, zero)
                                        : crc_rows<R, false>(tb, lane_off, p, hi - lo, c, zero);
        acc = gf2_mul(acc, lane_shift);
    }
    acc = crc_warp_xor(acc);
    if (g == warps - 1 && len > 0) {
        // The last piece as a row behind CRC_ROW - n zero bytes (which leave a register of 0 as
        // it is); with no rows before it, the initial register run over its n bytes as well.
        const uint32_t n = (uint32_t)(len - rows * CRC_ROW);
        const uint8_t *p = buf + rows * CRC_ROW;
        uint32_t w = 0;
        for (uint32_t i = 0; i < 4; i++) {
            const uint32_t j = 4 * lane + i; // in the padded row
            if (j >= CRC_ROW - n)
                w |= (uint32_t)p[j - (CRC_ROW - n)] << (8 * i);
        }
        const uint32_t last = crc_warp_xor(gf2_mul(w, lane_shift));
        if (lane == 0)
            parts[gridDim.x] = last ^ (rows == 0 ? gf2_mul(0xffffffffu, pw->tail[n]) : 0u);
    }
    if (lane == 0)
        s_warp[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < WARPS ? s_warp[lane] : 0u;
        CRC_UNROLL
        for (uint32_t k = 0; (1u << k) < WARPS; k++) { // lane L holds warps [L, L + 2^(k + 1))
            const uint32_t earlier =
                crc_shift(pw->row[lq + k], __shfl_xor_sync(0xffffffffu, acc, 1u << k));
            if ((lane & (1u << k)) == 0)
                acc ^= earlier;
        }
        if (lane == 0)
            parts[blockIdx.x] = acc;
    }
}

/* One block (crc_final_kernel; s: CRC_MAX_PARTS + CRC_POW_WORDS words of its shared memory):
 * the frame's CRC32C from crc_parts' n_parts block parts of 2^log_warps warps each (the tree
 * over the blocks) and its last piece, inverted (0 for an empty body), written behind the body,
 * at out + len. */
static __device__ void crc_join(const uint32_t *parts, uint32_t n_parts, uint32_t log_warps,
                                size_t len, uint8_t *out, uint32_t *s)
{
    crc_pow_t *pw = (crc_pow_t *)(s + CRC_MAX_PARTS);
    const uint32_t *pow_src = (const uint32_t *)&g_crc_pow;
    for (uint32_t i = threadIdx.x; i < CRC_POW_WORDS; i += blockDim.x)
        ((uint32_t *)pw)[i] = pow_src[i];
    const size_t rows = len ? (len - 1) / CRC_ROW : 0;
    const uint32_t lq = crc_lq(rows, (size_t)n_parts << log_warps);
    uint32_t width = 1;
    while (width < n_parts)
        width <<= 1;
    for (uint32_t i = threadIdx.x; i < width; i += blockDim.x)
        s[i] = i < n_parts ? parts[i] : 0u;
    __syncthreads();
    // Block b holds rows later than block b + 1's: s[i] takes s[i + step] (earlier) onto it.
    for (uint32_t k = 0, step = 1; step < width; k++, step <<= 1) {
        for (uint32_t i = 2 * step * threadIdx.x; i < width; i += 2 * step * blockDim.x)
            s[i] ^= crc_shift(pw->row[lq + log_warps + k], s[i + step]);
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        uint32_t crc = 0;
        if (len > 0) {
            const uint32_t n = (uint32_t)(len - rows * CRC_ROW);
            crc = ~(gf2_mul(s[0], pw->tail[n]) ^ parts[n_parts]);
        }
        for (int k = 0; k < 4; k++)
            out[len + k] = (uint8_t)(crc >> (8 * k));
    }
}

#endif
