// The GPU encoder's register-resident quantizer (kvcodec/quant_rows_dev_int.h: quant_warp_body,
// the body of encode.cu's quant_warp_kernel) run on host threads (tests/kvcodec/cuda_emu.h)
// must write kvc_quant_group's bytes for every group of a work list: the four quantized options,
// head_dim 32, 64 and 128, rotated and not, rows 16-byte aligned (vector loads) and not, groups
// of 1 to 32 tokens with gaps between them, at odd frame offsets, and zeros of both signs at the
// ends of key and value ranges (whose FP16 zero point keeps the sign of the first one the CPU's
// scan meets), over grids of blocks that each take several groups.
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <vector>

extern "C" {
#include <cmocka.h>

#include "../../kvcodec/kvcodec_int.h"
}

#include "cuda_emu.h"
#include "zero_ties.h"

// common/half_cuda.h's conversions equal common/half.c's bit for bit.
static inline float fy_dev_h2f(uint16_t h)
{
    return fy_fp16_to_fp32(h);
}
static inline uint16_t fy_dev_f2h(float f)
{
    return fy_fp32_to_fp16(f);
}

#define OPT_MAX_KV 64 // (the layout's, whose work items the quantizer reads)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" // the layout's own bodies
#include "../../kvcodec/layout_dev_int.h"
#pragma GCC diagnostic pop
#include "../../kvcodec/quant_dev_int.h"
#include "../../kvcodec/quant_rows_dev_int.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;
static float rnd_sym() // uniform in [-1, 1]
{
    return (float)(emu_xorshift(&g_rng) >> 40) / (float)(1u << 23) - 1.0f;
}

/* One layer of n_kv heads x n tokens, head_dim 32 E, quantized by a grid of `blocks` blocks:
 * frame bytes against kvc_quant_group's, and the bytes between groups untouched. */
template <int E> static void check(bool vec, bool rotate, uint32_t n_kv, uint32_t n, unsigned blocks)
{
    const uint32_t d = 32 * E, ts = vec ? d : d + 4, hs = ts * n + (vec ? 8 : 4);
    std::vector<uint16_t> K((size_t)hs * n_kv), V((size_t)hs * n_kv);
    for (uint32_t h = 0; h < n_kv; h++)
        for (uint32_t t = 0; t < n; t++)
            for (uint32_t c = 0; c < d; c++) {
                const size_t i = (size_t)h * hs + (size_t)t * ts + c;
                const float sc = 1.0f + (float)(c % 7);
                K[i] = kvt_zero_tie(t, c, 0, fy_fp32_to_fp16(rnd_sym() * sc));
                V[i] = kvt_zero_tie(t, c, 1, fy_fp32_to_fp16(0.5f * rnd_sym() * sc));
            }
    // Groups of several sizes over every head, options in turn, a byte of gap after each; a
    // group takes every other token where the head has room (evicted tokens leave gaps).
    static const uint32_t sizes[] = {32, 29, 5, 1, 9, 32, 16, 31, 8};
    std::vector<work_t> work;
    std::vector<uint32_t> tok;
    uint64_t off = 3;
    for (uint32_t h = 0, k = 0; h < n_kv; h++) {
        for (uint32_t t = 0; t < n; k++) {
            const uint32_t m = sizes[k % 9] < n - t ? sizes[k % 9] : n - t;
            const uint32_t step = t + 2 * (m - 1) < n ? 2 : 1;
            work_t w;
            w.out_off = off;
            w.tok = (uint32_t)tok.size();
            w.head = (uint16_t)h;
            w.opt = (uint8_t)(KVC_OPT_Q8 + k % 4); // Q8, Q4, Q4V2, Q2
            w.m_minus_1 = (uint8_t)(m - 1);
            for (uint32_t j = 0; j < m; j++)
                tok.push_back(t + step * j);
            t += step * (m - 1) + 1;
            off += kvc_group_bytes(w.opt, d, m, 0) + 1;
            work.push_back(w);
        }
    }
    plan_dev_t plan;
    memset(&plan, 0, sizeof(plan));
    plan.n_work = work.size();
    std::vector<uint8_t> gpu(off, 0xa5), cpu(off, 0xa5);
    quant_args_t a;
    memset(&a, 0, sizeof(a));
    a.work = work.data();
    a.plan = &plan;
    a.tok = tok.data();
    a.src.k = K.data();
    a.src.v = V.data();
    a.src.hs = hs;
    a.src.ts = ts;
    a.src.n = n;
    a.src.d = d;
    a.src.vec = vec;
    a.n = n;
    a.d = d;
    a.rotate = rotate;
    a.rot_scale = 1.0f / sqrtf((float)d); // as encode.cu
    a.out = gpu.data();
    std::vector<float> pmn((size_t)blocks * 4 * d), pmx((size_t)blocks * 4 * d);
    emu_launch(
        blocks, QUANT_THREADS,
        [&] {
            quant_warp_body<E>(a, (float(*)[32 * E])(pmn.data() + (size_t)blockIdx.x * 4 * d),
                               (float(*)[32 * E])(pmx.data() + (size_t)blockIdx.x * 4 * d));
        },
        true);
    // The CPU encoder's rows: FP16 to fp32, rotated (kvc_hadamard) for the <= 4-bit options.
    std::vector<float> gk(32 * d), gv(32 * d), chan_w(d, 1.0f);
    for (const work_t &w : work) {
        const uint32_t m = w.m_minus_1 + 1u;
        const bool rot = rotate && w.opt >= KVC_OPT_Q4;
        for (uint32_t j = 0; j < m; j++) {
            const size_t row = (size_t)w.head * hs + (size_t)tok[w.tok + j] * ts;
            fy_fp16_to_fp32_buf(&gk[j * d], &K[row], d);
            fy_fp16_to_fp32_buf(&gv[j * d], &V[row], d);
            if (rot) {
                kvc_hadamard(&gk[j * d], d);
                kvc_hadamard(&gv[j * d], d);
            }
        }
        kvc_quant_group(w.opt, d, m, m, 0, chan_w.data(), gk.data(), gv.data(),
                        cpu.data() + w.out_off);
    }
    for (size_t i = 0; i < off; i++)
        if (gpu[i] != cpu[i])
            fail_msg("d %u vec %d rotate %d: byte %zu is %02x, the CPU's %02x", d, vec, rotate,
                     i, gpu[i], cpu[i]);
}

static void test_head_dims(void **state)
{
    (void)state;
    for (int rot = 0; rot < 2; rot++) {
        check<1>(true, rot, 2, 120, 3);
        check<2>(true, rot, 2, 150, 2);
        check<4>(true, rot, 1, 200, 3);
    }
}

static void test_unaligned_rows(void **state)
{
    (void)state;
    for (int rot = 0; rot < 2; rot++) {
        check<1>(false, rot, 1, 90, 2);
        check<2>(false, rot, 2, 70, 1);
        check<4>(false, rot, 1, 120, 2);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_head_dims),
        cmocka_unit_test(test_unaligned_rows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
