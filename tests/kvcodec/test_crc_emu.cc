// The GPU encoder's frame CRC (kvcodec/crc_dev_int.h: crc_parts, the body of crc_kernel, and
// crc_join, the body of crc_final_kernel) run on host threads (tests/kvcodec/cuda_emu.h) must
// write fy_crc32c of the body behind it: for bodies from empty to 1.5 MB (a partial last chunk
// or a whole one; from one chunk per thread to 32), grids of 1 to 9 blocks (blocks past the
// data included), and bodies at every alignment mod 16 (production bodies are aligned; the
// others take the any-alignment path for every chunk).
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

// The GPU's CRC of buf[0, len) with a grid of `blocks`: crc_kernel's grid, then
// crc_final_kernel's block, as encode.cu launches them.
static uint32_t gpu_crc(const uint8_t *buf, size_t len, unsigned blocks)
{
    std::vector<uint32_t> parts(blocks + 1, 0xdeadbeefu);
    std::vector<std::vector<uint32_t>> tab(blocks), warp(blocks);
    for (unsigned b = 0; b < blocks; b++) {
        tab[b].assign(4 * 256, 0);
        warp[b].assign(CRC_THREADS / 32, 0);
    }
    emu_launch(
        blocks, CRC_THREADS,
        [&] {
            crc_parts(buf, len, parts.data(), (uint32_t(*)[256])tab[blockIdx.x].data(),
                      warp[blockIdx.x].data());
        },
        true);
    std::vector<uint8_t> out(len + 4, 0x5a);
    std::vector<uint32_t> s(CRC_MAX_PARTS, 0);
    emu_launch(1, CRC_FINAL_THREADS, [&] { crc_join(parts.data(), blocks, len, out.data(), s.data()); });
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

static void check(size_t len, unsigned blocks, size_t misalign)
{
    std::vector<uint8_t> mem(len + 32);
    uint8_t *buf = mem.data() + ((16 - ((uintptr_t)mem.data() & 15)) & 15) + misalign;
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)rnd32();
    const uint32_t want = fy_crc32c(0, buf, len);
    const uint32_t got = gpu_crc(buf, len, blocks);
    if (got != want)
        print_error("len %zu, %u blocks, misaligned by %zu: %08x, fy_crc32c %08x\n", len, blocks,
                    misalign, got, want);
    assert_int_equal(got, want);
}

static void test_lengths(void **state)
{
    (void)state;
    const size_t lens[] = {0,    1,    3,    4,    5,    255,  256,   257,   511,
                           512,  513,  1000, 4096, 4099, 65536, 65537, 131329};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++)
        for (unsigned blocks = 1; blocks <= 3; blocks++)
            check(lens[i], blocks, 0);
}

// More chunks than threads: each thread runs up to 32 chunks (q up to 32, lq up to 5).
static void test_long_bodies(void **state)
{
    (void)state;
    check(256 * 256 * 2 + 17, 1, 0);   // q = 2 on one block
    check(256 * 256 * 4 + 17, 1, 0);   // q = 4
    check(256 * 256 * 24 + 256, 1, 0); // q = 32 (24 used), the last chunk whole
    check(256 * 256 * 9 + 100, 2, 0);  // q = 8 over two blocks
    check(1536000, 9, 0);              // 9 blocks, q = 4
}

static void test_alignments(void **state)
{
    (void)state;
    for (size_t m = 1; m < 16; m++)
        check(256 * 5 + m * 7, 1 + (unsigned)(m % 3), m);
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
        cmocka_unit_test(test_lengths),
        cmocka_unit_test(test_long_bodies),
        cmocka_unit_test(test_alignments),
        cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
