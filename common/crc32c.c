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
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf,
                                                            size_t len)
{
    const uint8_t *p = buf;
    uint64_t c = ~crc;
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
