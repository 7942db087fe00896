// The GPU placement (kvcodec/place_dev_int.h: the plan kvc_place_cuda builds on the host and
// place_item, the body of place_kernel) run on host threads (tests/kvcodec/cuda_emu.h) must
// leave the pages as pool.c's kvc_place does: each page's header (the one the kernel writes and
// the one the host keeps) and every used slot at full capacity, byte for byte, for every option,
// rotated and not, with and without protected channels, odd token counts, pages that fill up,
// dense and padded slots, partial groups; and nothing else (the pool is poisoned first: slot
// padding, unused slots and other pages must keep the poison), whichever order the blocks run.
// And the device's count of a frame's maps (map_count_body) is the host's.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

extern "C" {
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
}

#include "cuda_emu.h"
#include "kvtest.h"
#include "pool_cases.h"

#include "../../kvcodec/place_dev_int.h"

enum { POISON = 0xa5, THREADS = 32 };

static uint64_t g_partial_ops; // ops of partial groups over all cases

// The bytes of a page that carry meaning: [start, len) pairs, the header and each used slot
// at full capacity.
static std::vector<size_t> meaningful(const uint8_t *pg, const place_geom_t *g)
{
    kvc_page_hdr_t hd;
    kvc_page_hdr_read(pg, &hd);
    std::vector<size_t> r = {0, KVC_PAGE_HEADER_BYTES};
    for (uint32_t s = 0; s < hd.n_slots; s++) {
        r.push_back(KVC_PAGE_HEADER_BYTES + s * g->sb[hd.opt]);
        r.push_back(g->gb[hd.opt]);
    }
    return r;
}

static void run_case(const pcase_t *c, uint64_t seed)
{
    kvc_policy_t pol;
    kvc_pool_params_t pp;
    assert_int_equal(kvt_pool_case(c, &pol, &pp), FY_OK);
    pp.n_pages = (uint32_t)(((size_t)16 << 20) / c->page_bytes); // 16 MiB of pages
    kvc_pool_t *cpu;
    assert_int_equal(kvc_pool_create(&pp, &cpu), FY_OK);
    kvc_seq_t *cs;
    assert_int_equal(kvc_seq_create(cpu, c->n_layers, c->n_kv, 0x1234abcd5678ef00ull, 77, &cs),
                     FY_OK);
    // The geometry of kvc_gpu_pool_create.
    size_t slot_bytes[KVC_OPT_COUNT] = {0};
    uint32_t cap_slots[KVC_OPT_COUNT] = {0};
    for (int o = 0; o < KVC_OPT_DROP; o++) {
        slot_bytes[o] = kvc_pool_slot_bytes(cpu, o);
        cap_slots[o] = (uint32_t)((pp.page_bytes - KVC_PAGE_HEADER_BYTES) / slot_bytes[o]);
    }
    place_geom_t g;
    place_geom(&g, pp.page_bytes, c->d, pol.group, c->protect, slot_bytes, cap_slots);
    std::vector<uint4> mem_v(pp.page_bytes * pp.n_pages / 16 + 1);
    uint8_t *mem = (uint8_t *)mem_v.data();
    const size_t pool_bytes = pp.page_bytes * pp.n_pages;
    memset(mem, POISON, pool_bytes);
    std::vector<uint8_t> hdrs((size_t)pp.n_pages * KVC_PAGE_HEADER_BYTES, 0);

    kvt_layer_t L;
    kvt_layer_make(&L, seed, c->n_heads, c->n_kv, c->n, c->d, 32);
    kvc_encoder_params_t p = kvt_params(&pol, &L, c->n_layers, c->budget);
    kvc_encoder_t *enc;
    assert_int_equal(kvc_encoder_create(&p, &enc), FY_OK);
    const size_t cap = kvc_encoder_max_frame_bytes(enc);
    std::vector<uint64_t> frame_v(cap / 8 + 1);
    uint8_t *frame = (uint8_t *)frame_v.data();
    uint64_t pages_checked = 0;
    for (uint32_t l = 0; l < c->n_layers; l++) {
        kvc_frame_t f;
        assert_int_equal(kvt_pool_case_frame(c, enc, seed, l, frame, cap, &f), FY_OK);
        assert_int_equal(kvc_place(cs, &f), FY_OK);

        // The plan from the frame's counts and the pages kvc_place took, in its order.
        std::vector<uint64_t> cnt((size_t)c->n_kv * 16, 0);
        std::vector<kvc_page_id_t> ids;
        for (uint32_t h = 0; h < c->n_kv; h++) {
            kvc_frame_head_counts(&f, h, &cnt[(size_t)h * 16]);
            uint32_t np;
            const kvc_page_id_t *ip = kvc_seq_pages(cs, l, h, &np);
            ids.insert(ids.end(), ip, ip + np);
        }
        // The device's count of the maps (map_count_kernel's grid, 256 bytes a block here so
        // that a short frame has several) equals the host's.
        {
            const size_t mb = kvc_map_bytes(f.n_tokens);
            std::vector<uint32_t> dcnt((size_t)c->n_kv * 8, 0);
            emu_launch_2d((unsigned)((mb + 255) / 256 < 3 ? (mb + 255) / 256 : 3), c->n_kv, 64,
                          [&] { map_count_body(f.maps, mb, f.n_tokens, dcnt.data()); });
            for (uint32_t h = 0; h < c->n_kv; h++)
                for (int o = 0; o < 8; o++)
                    assert_int_equal(dcnt[(size_t)h * 8 + o],
                                     o < KVC_OPT_COUNT ? cnt[(size_t)h * 16 + o] : 0);
        }
        std::vector<place_run_t> runs((size_t)c->n_kv * KVC_OPT_DROP);
        uint32_t n_runs = 0;
        plan_t pl;
        memset(&pl, 0, sizeof(pl));
        const uint64_t payload_off = (uint64_t)(f.payload - frame);
        const uint32_t used =
            place_plan(&g, cnt.data(), c->n_kv, (f.flags & KVC_FRAME_FLAG_ROTATED) != 0,
                       payload_off, ids.data(), runs.data(), &n_runs, &pl);
        assert_int_equal(used, ids.size());
        g_partial_ops += pl.n;
        const uint32_t n_pages = (uint32_t)ids.size();
        const size_t items = n_pages + pl.n;
        // Blocks write disjoint bytes, so their order does not matter: odd layers run them
        // last to first (ops before pages).
        if (items > 0)
            emu_launch((unsigned)items, THREADS,
                       [&] {
                           const size_t i = l % 2 ? items - 1 - blockIdx.x : blockIdx.x;
                           place_item(&g, runs.data(), n_runs, ids.data(), n_pages, pl.ops, frame,
                                      mem, i);
                       },
                       true);
        // The host's copy of each header, as kvc_place_cuda commits it.
        for (uint32_t i = 0; i < n_runs; i++)
            for (uint32_t j = 0; j < runs[i].pages; j++) {
                kvc_page_hdr_t hd;
                uint32_t full;
                place_page_hdr(&g, &runs[i], j, &hd, &full);
                kvc_page_hdr_write(&hdrs[(size_t)ids[runs[i].first + j] * KVC_PAGE_HEADER_BYTES],
                                   &hd);
            }
        free(pl.ops);
    }
    // Every placed page: the meaningful bytes equal the CPU's, the rest keeps the poison.
    std::vector<uint8_t> placed(pp.n_pages, 0);
    for (uint32_t l = 0; l < c->n_layers; l++) {
        for (uint32_t h = 0; h < c->n_kv; h++) {
            uint32_t np;
            const kvc_page_id_t *ip = kvc_seq_pages(cs, l, h, &np);
            for (uint32_t i = 0; i < np; i++) {
                const uint8_t *pc = kvc_page_data(cpu, ip[i]);
                const uint8_t *pg = mem + (size_t)ip[i] * pp.page_bytes;
                placed[ip[i]] = 1;
                assert_memory_equal(&hdrs[(size_t)ip[i] * KVC_PAGE_HEADER_BYTES], pc,
                                    KVC_PAGE_HEADER_BYTES);
                std::vector<size_t> r = meaningful(pc, &g);
                std::vector<uint8_t> seen(pp.page_bytes, 0);
                for (size_t j = 0; j < r.size(); j += 2) {
                    if (memcmp(pc + r[j], pg + r[j], r[j + 1]) != 0) {
                        print_error("%s rot %d P %u n %u d %u: layer %u head %u page %u (opt %u) "
                                    "range %zu+%zu differs\n",
                                    c->policy, c->rotate, c->protect, c->n, c->d, l, h, ip[i],
                                    pc[0], r[j], r[j + 1]);
                        fail();
                    }
                    memset(&seen[r[j]], 1, r[j + 1]);
                }
                for (size_t b = 0; b < pp.page_bytes; b++)
                    if (!seen[b] && pg[b] != POISON) {
                        print_error("%s: page %u byte %zu written outside its slots\n", c->policy,
                                    ip[i], b);
                        fail();
                    }
                pages_checked++;
            }
        }
    }
    for (uint32_t id = 0; id < pp.n_pages; id++)
        if (!placed[id])
            for (size_t b = 0; b < pp.page_bytes; b++)
                assert_int_equal(mem[(size_t)id * pp.page_bytes + b], POISON);
    assert_true(pages_checked > 0);
    kvc_seq_destroy(cs);
    kvc_encoder_destroy(enc);
    kvt_layer_free(&L);
    kvc_pool_destroy(cpu);
}

static void test_parity(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(kvt_pool_cases) / sizeof(kvt_pool_cases[0]); i++)
        run_case(&kvt_pool_cases[i], 1000 + i);
    assert_true(g_partial_ops > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
