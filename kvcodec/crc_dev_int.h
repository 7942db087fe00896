/* CRC32C of a frame body on the GPU: crc_parts (crc_kernel) and crc_join (crc_final_kernel),
 * device code that two places compile: kvcodec/encode.cu and tests/kvcodec/test_crc_emu.cc,
 * which runs it on host threads (blocks of warps, each barrier and warp intrinsic emulated)
 * against fy_crc32c over lengths, alignments and grids that take every path, so that it is
 * tested on every machine, not only on one with a GPU.
 *
 * Not a standalone header. Outside CUDA the includer provides __device__, __host__,
 * __forceinline__, __noinline__, __constant__, threadIdx, blockIdx, blockDim, gridDim,
 * __syncthreads, __shfl_xor_sync and uint4. */
#ifndef FERRY_KVCODEC_CRC_DEV_INT_H
#define FERRY_KVCODEC_CRC_DEV_INT_H

#ifdef __CUDACC__
#define CRC_UNROLL _Pragma("unroll")
#else
#define CRC_UNROLL
#endif

#define CRC_CHUNK         256u
#define CRC_THREADS       256
#define CRC_FINAL_THREADS 256
#define CRC_MAX_PARTS     1024 // crc_kernel's blocks at most (crc_final_kernel's tree)

/* GF(2) product modulo the reflected CRC32C polynomial (bit 31 is x^0), zlib's crc32_combine
 * arithmetic: crc(A || B) = crc(A) x^(8|B|) + crc(B) for register values without the final
 * inversion. */
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

/* The shifts the CRC kernels multiply by: tail[t] = x^(8 t) for t <= CRC_CHUNK, chunk[b] =
 * x^(8 CRC_CHUNK 2^b), and row[b][k] = chunk[b] x^k, with which crc_shift multiplies by
 * chunk[b] in one pass of independent operations (gf2_mul's loop carries b through 32 dependent
 * steps). Computed by the compiler. */
typedef struct {
    uint32_t tail[CRC_CHUNK + 1];
    uint32_t chunk[32];
    uint32_t row[32][32];
} crc_pow_t;

static constexpr crc_pow_t crc_pow_make(void)
{
    crc_pow_t t = {};
    t.tail[0] = 1u << 31;
    for (uint32_t i = 1; i <= CRC_CHUNK; i++)
        t.tail[i] = gf2_mul(t.tail[i - 1], 1u << 23); // x^8
    t.chunk[0] = t.tail[CRC_CHUNK];
    for (int b = 1; b < 32; b++)
        t.chunk[b] = gf2_mul(t.chunk[b - 1], t.chunk[b - 1]);
    for (int b = 0; b < 32; b++) {
        uint32_t x = t.chunk[b];
        for (int k = 0; k < 32; k++) {
            t.row[b][k] = x;
            x = (x >> 1) ^ (0x82f63b78u & (0u - (x & 1u))); // times x
        }
    }
    return t;
}

static __constant__ crc_pow_t c_crc_pow = crc_pow_make();

/* gf2_mul(a, chunk[b]): the rows of a's set bits (bit 31 - k takes row k). b is the same in
 * every lane of a warp (a constant-cache broadcast). */
static __device__ __forceinline__ uint32_t crc_shift(uint32_t a, uint32_t b)
{
    const uint32_t *t = c_crc_pow.row[b];
    uint32_t p0 = 0, p1 = 0;
CRC_UNROLL
    for (int k = 0; k < 32; k += 2) {
        p0 ^= t[k] & (0u - ((a >> (31 - k)) & 1u));
        p1 ^= t[k + 1] & (0u - ((a >> (30 - k)) & 1u));
    }
    return p0 ^ p1;
}

/* log2 of the full chunks per thread of crc_kernel: the smallest power of two q with q x threads
 * covering them. */
static __device__ __forceinline__ uint32_t crc_lq(size_t full, size_t threads)
{
    uint32_t lq = 0;
    while ((threads << lq) < full)
        lq++;
    return lq;
}

/* The register (reflected 0x82F63B78, slicing by 4 with tab) after the little-endian word w. */
static __device__ __forceinline__ uint32_t crc_word(const uint32_t (*tab)[256], uint32_t c,
                                                    uint32_t w)
{
    const uint32_t x = w ^ c;
    return tab[3][x & 0xffu] ^ tab[2][(x >> 8) & 0xffu] ^ tab[1][(x >> 16) & 0xffu] ^
           tab[0][x >> 24];
}

/* The register run from c over n bytes at p, as
 * they come: whole aligned words by four lookups, bytes around them. For the frame's last chunk
 * (byte by byte, a last chunk of up to CRC_CHUNK bytes was the longest chain of a short frame's
 * CRC). Not inlined: one thread of the grid runs it, and inlined beside crc_run's chunk path it
 * made sm_80 spill. */
static __device__ __noinline__ uint32_t crc_run_any(const uint32_t (*tab)[256], const uint8_t *p,
                                                    uint32_t n, uint32_t c)
{
    uint32_t i = 0;
    for (; i < n && ((uintptr_t)(p + i) & 3) != 0; i++)
        c = (c >> 8) ^ tab[0][(c ^ p[i]) & 0xffu];
    for (; i + 4 <= n; i += 4)
        c = crc_word(tab, c, *(const uint32_t *)(p + i));
    for (; i < n; i++)
        c = (c >> 8) ^ tab[0][(c ^ p[i]) & 0xffu];
    return c;
}

/* The register run from c over n bytes at p; a whole aligned chunk with 16-byte loads, all
 * landed before the first lookup. (Left to itself, ptxas issues each load just ahead of its
 * lookups, and the chunk waits out a memory latency every 16 bytes; zero, a 0 it cannot see
 * through, folds every loaded word into c first.) Anything else goes to crc_run_any. */
static __device__ __forceinline__ uint32_t crc_run(const uint32_t (*tab)[256], const uint8_t *p,
                                                   uint32_t n, uint32_t c, uint32_t zero)
{
    if (n != CRC_CHUNK || ((uintptr_t)p & 15) != 0)
        return crc_run_any(tab, p, n, c);
    const uint4 *q = (const uint4 *)p;
    uint4 w[CRC_CHUNK / 16];
    uint32_t fold = 0;
CRC_UNROLL
    for (int j = 0; j < (int)(CRC_CHUNK / 16); j++) {
        w[j] = q[j];
        fold ^= w[j].x ^ w[j].y ^ w[j].z ^ w[j].w;
    }
    c ^= fold & zero;
CRC_UNROLL
    for (int j = 0; j < (int)(CRC_CHUNK / 16); j++) {
        c = crc_word(tab, c, w[j].x);
        c = crc_word(tab, c, w[j].y);
        c = crc_word(tab, c, w[j].z);
        c = crc_word(tab, c, w[j].w);
    }
    return c;
}

/* CRC32C (fy_crc32c(0, body)) of buf[0, len), in parts that crc_join joins (crc_kernel: a grid
 * of CRC_THREADS-thread blocks; tab: [4][256] and s_warp: CRC_THREADS / 32 entries of the
 * block's shared memory; parts: gridDim.x + 1 entries). The
 * body is cut into CRC_CHUNK-byte chunks; the last (1 .. CRC_CHUNK bytes) is run by the grid's
 * last thread into parts[gridDim.x]. The full chunks before it are numbered from the end (r = 0
 * the latest), and thread t of the grid runs the register over r in [t q, t q + q) in data
 * order: from 0xffffffff when that includes the body's first chunk, else from 0. Since
 * crc(A || B) = crc(A) x^(8|B|) + crc(B) for registers without the final inversion, and in the
 * trees below the later of two blocks is always whole (an earlier one past the data is 0), each
 * level multiplies by one constant, x^(8 CRC_CHUNK q 2^j): the lanes of a warp, then its warps
 * into parts[blockIdx.x], then the blocks (crc_join). A thread's share is a short chain
 * of loads and lookups whatever the frame's size, and no thread walks its own chain of shifts
 * (which took most of the time of a short frame's CRC). */
static __device__ void crc_parts(const uint8_t *buf, size_t len, uint32_t *parts,
                                 uint32_t (*tab)[256], uint32_t *s_warp)
{
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        tab[0][i] = c;
    }
    __syncthreads();
    // tab[t][i] needs only tab[t - 1][i] (this thread's) and tab[0] (complete).
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x)
        for (int t = 1; t < 4; t++)
            tab[t][i] = (tab[t - 1][i] >> 8) ^ tab[0][tab[t - 1][i] & 0xffu];
    __syncthreads();
    const size_t chunks = (len + CRC_CHUNK - 1) / CRC_CHUNK, full = chunks ? chunks - 1 : 0;
    const size_t threads = (size_t)gridDim.x * CRC_THREADS;
    const size_t t = (size_t)blockIdx.x * CRC_THREADS + threadIdx.x;
    const uint32_t lq = crc_lq(full, threads);
    const size_t q = (size_t)1 << lq;
    const uint32_t zero = (uint32_t)(len >> 62); // frames are far shorter: 0
    uint32_t acc = 0;
    if (t * q < full) {
        const size_t hi = full - t * q, lo = hi > q ? hi - q : 0; // chunks [lo, hi)
        acc = lo == 0 ? 0xffffffffu : 0u;
        for (size_t i = lo; i < hi; i++)
            acc = crc_run(tab, buf + i * CRC_CHUNK, CRC_CHUNK, acc, zero);
    }
    if (t == threads - 1 && chunks > 0)
        parts[gridDim.x] = crc_run(tab, buf + full * CRC_CHUNK, (uint32_t)(len - full * CRC_CHUNK),
                                   full == 0 ? 0xffffffffu : 0u, zero);
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
CRC_UNROLL
    for (uint32_t k = 0; k < 5; k++) { // lane L now holds lanes [L, L + 2^(k + 1)) (low bits 0)
        const uint32_t earlier = crc_shift(__shfl_xor_sync(0xffffffffu, acc, 1u << k), lq + k);
        if ((lane & (1u << k)) == 0)
            acc ^= earlier;
    }
    if (lane == 0)
        s_warp[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < CRC_THREADS / 32 ? s_warp[lane] : 0u;
CRC_UNROLL
        for (uint32_t k = 0; (1u << k) < CRC_THREADS / 32; k++) {
            const uint32_t earlier =
                crc_shift(__shfl_xor_sync(0xffffffffu, acc, 1u << k), lq + 5 + k);
            if ((lane & (1u << k)) == 0)
                acc ^= earlier;
        }
        if (lane == 0)
            parts[blockIdx.x] = acc;
    }
}

/* One block (crc_final_kernel; s: CRC_MAX_PARTS entries of its shared memory): the frame's
 * CRC32C from crc_parts' n_parts block parts (the tree over the blocks) and its last chunk,
 * inverted (0 for an empty body), written behind the body, at out + len. */
static __device__ void crc_join(const uint32_t *parts, uint32_t n_parts, size_t len, uint8_t *out,
                                uint32_t *s)
{
    const size_t chunks = (len + CRC_CHUNK - 1) / CRC_CHUNK, full = chunks ? chunks - 1 : 0;
    const uint32_t lq = crc_lq(full, (size_t)n_parts * CRC_THREADS);
    uint32_t width = 1;
    while (width < n_parts)
        width <<= 1;
    for (uint32_t i = threadIdx.x; i < width; i += blockDim.x)
        s[i] = i < n_parts ? parts[i] : 0u;
    __syncthreads();
    // Block b holds chunks later than block b + 1's: s[i] takes s[i + step] (earlier) onto it.
    for (uint32_t k = 0, step = 1; step < width; k++, step <<= 1) {
        for (uint32_t i = 2 * step * threadIdx.x; i < width; i += 2 * step * blockDim.x)
            s[i] ^= crc_shift(s[i + step], lq + 8 + k);
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        uint32_t crc = 0;
        if (chunks > 0) {
            const uint32_t tail = (uint32_t)(len - full * CRC_CHUNK);
            crc = ~(gf2_mul(s[0], c_crc_pow.tail[tail]) ^ parts[n_parts]);
        }
        for (int k = 0; k < 4; k++)
            out[len + k] = (uint8_t)(crc >> (8 * k));
    }
}

#endif
