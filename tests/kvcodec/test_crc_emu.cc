// The GPU encoder's frame CRC (kvcodec/crc_dev_int.h: crc_parts, the body of crc_kernel, and
// crc_join, the body of crc_final_kernel) run on host threads (tests/kvcodec/cuda_emu.h) must
// write fy_crc32c of the body behind it: for bodies from empty to 1.5 MB (a partial last row or
// a whole one; from one row per warp to 64, shares past the data), the forms encode.cu launches
// (32 copies of the tables in 1024-thread blocks, 8 in 256-thread blocks) and others (1, 4 and
// 32 copies in 64-thread blocks, which keep most cases cheap on host threads), grids of 1 to 9
// blocks, and bodies at every alignment mod 16 (production bodies are aligned; the others take
// the byte-by-byte loads).
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

extern "C" {
#include <cmocka.h>

#include "common.h"
}

#include "cuda_emu.h"

#include "../../kvcodec/crc_dev_int.h"

// The GPU's CRC of buf[0, len) with a grid of `blocks` of THREADS threads and R copies of the
// tables: crc_kernel's grid, then crc_final_kernel's block, as encode.cu launches them.
template <int R, int THREADS>
static uint32_t gpu_crc(const uint8_t *buf, size_t len, unsigned blocks)
{
    std::vector<uint32_t> parts(blocks + 1, 0xdeadbeefu);
    std::vector<std::vector<uint32_t>> sm(blocks);
    for (unsigned b = 0; b < blocks; b++)
        sm[b].assign(crc_smem_words(R, THREADS), 0x5a5a5a5au);
    emu_launch(
        blocks, THREADS,
        [&] { crc_parts<R, THREADS>(buf, len, parts.data(), sm[blockIdx.x].data()); }, true);
    std::vector<uint8_t> out(len + 4, 0x5a);
    std::vector<uint32_t> s(CRC_MAX_PARTS + CRC_POW_WORDS, 0);
    uint32_t log_warps = 0;
    while ((32u << log_warps) < (unsigned)THREADS)
        log_warps++;
    emu_launch(1, CRC_FINAL_THREADS,
               [&] { crc_join(parts.data(), blocks, log_warps, len, out.data(), s.data()); });
    // The body is left alone; the CRC goes behind it, little-endian.
    for (size_t i = 0; i < len; i++)
        assert_int_equal(out[i], 0x5a);
    return (uint32_t)out[len] | (uint32_t)out[len + 1] << 8 | (uint32_t)out[len + 2] << 16 |
           (uint32_t)out[len + 3] << 24;
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;
static uint32_t rnd32()
{
    return (uint32_t)(emu_xorshift(&g_rng) >> 16);
}

enum form { F_R4_T64, F_R32_T64, F_R1_T64, F_R8_T256, F_R32_T1024 };

static void check(size_t len, unsigned blocks, size_t misalign, form f = F_R4_T64)
{
    std::vector<uint8_t> mem(len + 32);
    uint8_t *buf = mem.data() + ((16 - ((uintptr_t)mem.data() & 15)) & 15) + misalign;
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)rnd32();
    const uint32_t want = fy_crc32c(0, buf, len);
    uint32_t got = 0;
    switch (f) {
    case F_R4_T64:
        got = gpu_crc<4, 64>(buf, len, blocks);
        break;
    case F_R32_T64:
        got = gpu_crc<32, 64>(buf, len, blocks);
        break;
    case F_R1_T64:
        got = gpu_crc<1, 64>(buf, len, blocks);
        break;
    case F_R8_T256:
        got = gpu_crc<8, 256>(buf, len, blocks);
        break;
    case F_R32_T1024:
        got = gpu_crc<32, 1024>(buf, len, blocks);
        break;
    }
    if (got != want)
        print_error("len %zu, %u blocks, form %d, misaligned by %zu: %08x, fy_crc32c %08x\n", len,
                    blocks, (int)f, misalign, got, want);
    assert_int_equal(got, want);
}

static void test_lengths(void **state)
{
    (void)state;
    const size_t lens[] = {0,   1,   3,   4,   5,    127,  128,  129,   255,   256,
                           257, 511, 512, 513, 1000, 4096, 4099, 65536, 65537, 131329};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++)
        for (unsigned blocks = 1; blocks <= 3; blocks++)
            check(lens[i], blocks, 0);
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++)
        check(lens[i], 1 + (unsigned)(i % 2), 0, i % 2 ? F_R1_T64 : F_R32_T64);
}

// More rows than warps: each warp runs up to 64 rows (lq up to 6), in full batches and a
// partial one.
static void test_long_bodies(void **state)
{
    (void)state;
    check(128 * 2 * 2 + 17, 1, 0);   // q = 2 on one block of two warps
    check(128 * 2 * 17 + 128, 1, 0); // q = 32 (17 used), the last row whole
    check(128 * 2 * 64 + 5, 1, 0);   // q = 64: four full batches
    check(128 * 4 * 40 + 100, 2, 0); // q = 64 over two blocks
    check(1536000, 9, 0);            // 9 blocks, q = 1024
    check(128 * 8 * 33 + 9, 1, 0, F_R8_T256);
    check(300000, 3, 0, F_R8_T256);
}

// The forms encode.cu launches, a block of 32 warps among them.
static void test_production_forms(void **state)
{
    (void)state;
    check(0, 1, 0, F_R32_T1024);
    check(77, 1, 0, F_R32_T1024);
    check(128 * 32 * 3 + 128, 1, 0, F_R32_T1024);
    check(500000, 2, 0, F_R32_T1024);
    check(128 * 8 * 2 * 20 + 33, 2, 0, F_R8_T256);
}

static void test_alignments(void **state)
{
    (void)state;
    for (size_t m = 1; m < 16; m++)
        check(128 * 9 + m * 7, 1 + (unsigned)(m % 3), m, m % 2 ? F_R32_T64 : F_R1_T64);
}

static void test_random(void **state)
{
    (void)state;
    for (int i = 0; i < 24; i++) {
        size_t len = rnd32() % (i % 4 == 0 ? 300000 : 5000);
        check(len, 1 + rnd32() % 5, i % 5 == 0 ? rnd32() % 16 : 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lengths),          cmocka_unit_test(test_long_bodies),
        cmocka_unit_test(test_production_forms), cmocka_unit_test(test_alignments),
        cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
