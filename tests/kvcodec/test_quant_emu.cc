// The GPU encoder's quantizers (kvcodec/quant_rows_dev_int.h: quant_body, the body of encode.cu's
// quant_kernel, and quant_warp_body, of quant_warp_kernel) run on host threads
// (tests/kvcodec/cuda_emu.h) must write kvc_quant_group's bytes for every group of a work list:
// the four quantized options, head_dim 32 to 128 (and 256, unstaged, for quant_body), rotated
// and not, protected channels (quant_body), rows 16-byte aligned (vector loads) and not, groups
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
// The device's conversion for values only computed with (a NaN's payload aside, the same).
static inline float fy_dev_h2f_arith(uint16_t h)
{
    return fy_fp16_to_fp32(h);
}
static inline uint16_t fy_dev_f2h(float f)
{
    return fy_fp32_to_fp16(f);
}

#define OPT_MAX_KV 64 // (the layout's, whose work items the quantizer reads)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" // the other kernels' bodies
#include "../../kvcodec/choose_dev_int.h"
#include "../../kvcodec/layout_dev_int.h"
#include "../../kvcodec/quant_dev_int.h"
#include "../../kvcodec/quant_rows_dev_int.h"
#include "../../kvcodec/stats_dev_int.h" // stage_rule
#pragma GCC diagnostic pop

static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;
static float rnd_sym() // uniform in [-1, 1]
{
    return (float)(emu_xorshift(&g_rng) >> 40) / (float)(1u << 23) - 1.0f;
}

/* One layer of n_kv heads x n tokens, head_dim 32 E, quantized by a grid of `blocks` blocks of
 * quant_warp_body (warp) or quant_body (P protected channels), groups of at most G tokens
 * (quant_body: staged in shared memory and rotated there or copied from the rotated rows as
 * encode.cu's stage_plan decides for a measured policy): frame bytes against
 * kvc_quant_group's, and the bytes between groups untouched. */
template <int E>
static void check(bool warp, bool vec, bool rotate, uint32_t P, uint32_t n_kv, uint32_t n,
                  unsigned blocks, uint32_t G = 32)
{
    const uint32_t d = 32 * E, ts = vec ? d : d + 4, hs = ts * n + (vec ? 8 : 4);
    std::vector<uint16_t> K((size_t)hs * n_kv), V((size_t)hs * n_kv);
    kvt_tied_layer(K.data(), V.data(), n_kv, n, d, hs, ts, &g_rng);
    // Groups of several sizes over every head, options in turn, a byte of gap after each; a
    // group takes every other token where the head has room (evicted tokens leave gaps).
    static const uint32_t sizes[] = {32, 29, 5, 1, 9, 32, 16, 31, 8};
    std::vector<work_t> work;
    std::vector<uint32_t> tok;
    uint64_t off = 3;
    for (uint32_t h = 0, k = 0; h < n_kv; h++) {
        for (uint32_t t = 0; t < n; k++) {
            const uint32_t sz = sizes[k % 9] * G / 32 > 0 ? sizes[k % 9] * G / 32 : 1;
            const uint32_t m = sz < n - t ? sz : n - t;
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
            off += kvc_group_bytes(w.opt, d, m, P) + 1;
            work.push_back(w);
        }
    }
    plan_dev_t plan;
    memset(&plan, 0, sizeof(plan));
    plan.n_work = work.size();
    std::vector<uint8_t> gpu(off, 0xa5), cpu(off, 0xa5);
    std::vector<float> qsq((size_t)n_kv * d); // MixKVQ salience of the unrotated groups
    for (float &x : qsq)
        x = 0.01f + fabsf(rnd_sym());
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
    a.qsq = qsq.data();
    a.n = n;
    a.d = d;
    a.P = P;
    a.rotate = rotate;
    a.rot_scale = 1.0f / sqrtf((float)d); // as encode.cu
    a.out = gpu.data();
    std::vector<float> kr, vr;
    if (warp) {
        std::vector<float> pmn((size_t)blocks * 4 * d), pmx((size_t)blocks * 4 * d);
        emu_launch(
            blocks, QUANT_THREADS,
            [&] {
                const size_t at = (size_t)blockIdx.x * 4 * d;
                quant_warp_body<E>(a, (float(*)[32 * E])(pmn.data() + at),
                                   (float(*)[32 * E])(pmx.data() + at));
            },
            true);
    } else {
        stage_t sg; // encode.cu's stage_plan for a measured policy
        stage_rule(d, G, rotate, true, &sg);
        a.stage = sg.q_stage ? (int)G : 0;
        a.fused = sg.fused;
        if (rotate && !a.fused) { // rotate_kernel's rotated copy of every row
            kr.resize((size_t)n_kv * n * d);
            vr.resize(kr.size());
            for (uint32_t h = 0; h < n_kv; h++)
                for (uint32_t t = 0; t < n; t++) {
                    const size_t row = (size_t)h * hs + (size_t)t * ts, at = ((size_t)h * n + t) * d;
                    fy_fp16_to_fp32_buf(&kr[at], &K[row], d);
                    fy_fp16_to_fp32_buf(&vr[at], &V[row], d);
                    kvc_hadamard(&kr[at], d);
                    kvc_hadamard(&vr[at], d);
                }
            a.src.kr = kr.data();
            a.src.vr = vr.data();
        }
        std::vector<float> stage((size_t)blocks * 2 * G * d);
        std::vector<quant_smem_t> qs(blocks);
        emu_launch(
            blocks, QUANT_THREADS,
            [&] { quant_body(a, stage.data() + (size_t)blockIdx.x * 2 * G * d, qs[blockIdx.x]); },
            true);
    }
    // The CPU encoder's rows: FP16 to fp32, rotated (kvc_hadamard) for the <= 4-bit options.
    std::vector<float> gk((size_t)G * d), gv((size_t)G * d), chan_w(d);
    for (const work_t &w : work) {
        for (uint32_t c = 0; c < d; c++) // encode.c's channel weights: sqrt of the salience
            chan_w[c] = sqrtf(qsq[(size_t)w.head * d + c]);
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
        kvc_quant_group(w.opt, d, m, m, P, rot ? NULL : chan_w.data(), gk.data(), gv.data(),
                        cpu.data() + w.out_off);
    }
    for (size_t i = 0; i < off; i++)
        if (gpu[i] != cpu[i])
            fail_msg("%s d %u vec %d rotate %d P %u: byte %zu is %02x, the CPU's %02x",
                     warp ? "warp" : "block", d, vec, rotate, P, i, gpu[i], cpu[i]);
}

static void test_warp(void **state)
{
    (void)state;
    for (int rot = 0; rot < 2; rot++) {
        check<1>(true, true, rot, 0, 2, 120, 3);
        check<2>(true, true, rot, 0, 2, 150, 2);
        check<4>(true, true, rot, 0, 1, 200, 3);
        // Rows 8-byte aligned only: a load per half.
        check<1>(true, false, rot, 0, 1, 90, 2);
        check<2>(true, false, rot, 0, 2, 70, 1);
        check<4>(true, false, rot, 0, 1, 120, 2);
    }
}

static void test_block(void **state)
{
    (void)state;
    for (int rot = 0; rot < 2; rot++) {
        check<1>(false, true, rot, 0, 2, 120, 3);
        check<2>(false, true, rot, 0, 2, 150, 2);
        check<4>(false, true, rot, 0, 1, 200, 3);
        check<4>(false, false, rot, 0, 1, 120, 2);
        check<8>(false, true, rot, 0, 1, 70, 2); // too big to stage: read where the rows are
        // Other group sizes: staged and copied from the rotated rows (d 256, G 16; d 32, G
        // 128: the stats kernel's staging would not fit), staged and rotated here (d 64, G 64).
        check<8>(false, true, rot, 0, 1, 60, 2, 16);
        check<1>(false, false, rot, 0, 1, 300, 2, 128);
        check<2>(false, true, rot, 0, 2, 150, 2, 64);
    }
    // Protected channels of the 4- and 2-bit keys (8-bit codes of their own): by salience
    // unrotated (MixKVQ), by range alone rotated.
    check<2>(false, true, false, 3, 2, 150, 2);
    check<4>(false, false, false, 5, 1, 90, 2);
    check<2>(false, true, true, 4, 1, 100, 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_warp),
        cmocka_unit_test(test_block),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
