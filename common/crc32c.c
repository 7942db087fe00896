/*
 * crc32c.c: CRC32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78), the checksum of
 * iSCSI (RFC 3720) and of Ferry's KV frames. SSE4.2's crc32 instruction when the CPU has it,
 * slicing-by-8 tables otherwise; both give identical results.
 */
#include "common.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define FY_X86_64 1
#endif

static uint32_t g_table[8][256];
static pthread_once_t g_table_once = PTHREAD_ONCE_INIT;

static void crc_table_build(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        g_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            g_table[t][i] = (g_table[t - 1][i] >> 8) ^ g_table[0][g_table[t - 1][i] & 0xffu];
}

uint32_t fy_crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&g_table_once, crc_table_build);
    const uint8_t *p = buf;
    uint32_t c = ~crc;
    while (len >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c; // little-endian load order
        c = g_table[7][lo & 0xffu] ^ g_table[6][(lo >> 8) & 0xffu] ^
            g_table[5][(lo >> 16) & 0xffu] ^ g_table[4][lo >> 24] ^ g_table[3][hi & 0xffu] ^
            g_table[2][(hi >> 8) & 0xffu] ^ g_table[1][(hi >> 16) & 0xffu] ^ g_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = (c >> 8) ^ g_table[0][(c ^ *p++) & 0xffu];
    return ~c;
}

#ifdef FY_X86_64
/* The crc32 instruction has a latency of three cycles and a throughput of one per cycle, so one
 * dependent chain runs at a third of the possible speed. Long inputs are cut into three blocks
 * checksummed side by side, then joined: crc(A || B) = crc(A) shifted over len(B) zero bytes,
 * xor crc(B) started from 0. The shift is a linear map on the 32-bit register, applied a byte
 * at a time through four tables per block length (built once). */
#define CRC_LONG 8192
#define CRC_SHORT 256

static uint32_t g_shift_long[4][256], g_shift_short[4][256];
static pthread_once_t g_shift_once = PTHREAD_ONCE_INIT;

/* mat (32 columns, one per bit of vec) times vec over GF(2). */
static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    for (; vec != 0; vec >>= 1, mat++)
        if (vec & 1u)
            sum ^= *mat;
    return sum;
}

static void gf2_square(uint32_t *sq, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        sq[n] = gf2_times(mat, mat[n]);
}

/* Tables applying len zero bytes (len a power of two, >= 1) to a raw CRC register. */
static void shift_tables(uint32_t tab[4][256], size_t len)
{
    uint32_t odd[32], even[32], *op = NULL;
    odd[0] = 0x82f63b78u; // one zero bit
    for (int n = 1; n < 32; n++)
        odd[n] = 1u << (n - 1);
    gf2_square(even, odd); // two bits
    gf2_square(odd, even); // four bits
    for (;;) {
        gf2_square(even, odd); // one byte, then 4, 16...
        op = even;
        len >>= 1;
        if (len == 0)
            break;
        gf2_square(odd, even); // two bytes, then 8, 32...
        op = odd;
        len >>= 1;
        if (len == 0)
            break;
    }
    for (uint32_t n = 0; n < 256; n++) {
        tab[0][n] = gf2_times(op, n);
        tab[1][n] = gf2_times(op, n << 8);
        tab[2][n] = gf2_times(op, n << 16);
        tab[3][n] = gf2_times(op, n << 24);
    }
}

static void shift_tables_build(void)
{
    shift_tables(g_shift_long, CRC_LONG);
    shift_tables(g_shift_short, CRC_SHORT);
}

static inline uint32_t crc_shift(const uint32_t tab[4][256], uint32_t c)
{
    return tab[0][c & 0xffu] ^ tab[1][(c >> 8) & 0xffu] ^ tab[2][(c >> 16) & 0xffu] ^
           tab[3][c >> 24];
}

/* Three interleaved chains over [3 * block] bytes at p, joined into c. */
__attribute__((target("sse4.2"))) static inline uint64_t
crc32c_hw3(uint64_t c, const uint8_t *p, size_t block, const uint32_t tab[4][256])
{
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < block; i += 8) {
        uint64_t v0, v1, v2;
        memcpy(&v0, p + i, 8);
        memcpy(&v1, p + block + i, 8);
        memcpy(&v2, p + 2 * block + i, 8);
        c = _mm_crc32_u64(c, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
    }
    c = crc_shift(tab, (uint32_t)c) ^ (uint32_t)c1;
    return crc_shift(tab, (uint32_t)c) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf,
                                                            size_t len)
{
    const uint8_t *p = buf;
    uint64_t c = ~crc;
    if (len >= 3 * CRC_SHORT) {
        pthread_once(&g_shift_once, shift_tables_build);
        while (len >= 3 * CRC_LONG) {
            c = crc32c_hw3(c, p, CRC_LONG, g_shift_long);
            p += 3 * CRC_LONG;
            len -= 3 * CRC_LONG;
        }
        while (len >= 3 * CRC_SHORT) {
            c = crc32c_hw3(c, p, CRC_SHORT, g_shift_short);
            p += 3 * CRC_SHORT;
            len -= 3 * CRC_SHORT;
        }
    }
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = _mm_crc32_u8(c32, *p++);
    return ~c32;
}
#endif

bool fy_crc32c_has_hw(void)
{
#ifdef FY_X86_64
    static int cached = -1;
    if (cached < 0)
        cached = __builtin_cpu_supports("sse4.2");
    return cached != 0;
#else
    return false;
#endif
}

uint32_t fy_crc32c(uint32_t crc, const void *buf, size_t len)
{
#ifdef FY_X86_64
    if (fy_crc32c_has_hw())
        return crc32c_hw(crc, buf, len);
#endif
    return fy_crc32c_sw(crc, buf, len);
}
