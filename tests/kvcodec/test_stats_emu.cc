// The GPU encoder's distortion tables (kvcodec/stats_dev_int.h: stats_body, the body of
// encode.cu's stats_kernel) run on host threads (tests/kvcodec/cuda_emu.h) must equal, bit for
// bit, what encode.c's build_items measures: |v - obar|^2 per token (kvc_dot) and the key and
// value errors at 8, 4 and 2 bits (kvc_key_errors, kvc_value_errors, kvc_model_errors), for
// head_dim 32 to 256 (staged in shared memory and rotated there up to 128 with groups of 32,
// read where the rows are past it, from rotated copies where rotating), groups of 8 to 64 tokens
// with a partial last one, rotation on and off, trial and modelled distortion, every subset of
// the options that changes which tables are measured, rows 16-byte aligned and not; each
// through both per-token paths (stats_tok_staged where it serves, stats_tok_generic).
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

#define OPT_MAX_KV 64 // (the layout's and the optimizer's; the tables' slots are theirs)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" // their own bodies
#include "../../kvcodec/choose_dev_int.h"
#include "../../kvcodec/layout_dev_int.h"
#include "../../kvcodec/quant_dev_int.h"
#include "../../kvcodec/quant_rows_dev_int.h"
#pragma GCC diagnostic pop
#include "../../kvcodec/stats_dev_int.h"

static uint64_t g_rng = 0x2545f4914f6cdd1dULL;
static float rnd_sym() // uniform in [-1, 1]
{
    return (float)(emu_xorshift(&g_rng) >> 40) / (float)(1u << 23) - 1.0f;
}

struct scase {
    uint32_t d, G, n, n_kv;
    bool rotate, model, vec;
    uint32_t opts; // KVC_OPT_BIT mask of the quantized options
};

/* One layer through stats_body on emulated blocks, launched as encode.cu launches
 * stats_kernel, against the CPU's measurements of every table the optimizer reads. */
static void check(const scase &c, bool generic)
{
    const uint32_t d = c.d, G = c.G, n = c.n, n_kv = c.n_kv;
    const uint32_t ts = c.vec ? d : d + 4, hs = ts * n + (c.vec ? 8 : 4);
    std::vector<uint16_t> K((size_t)hs * n_kv), V((size_t)hs * n_kv);
    kvt_tied_layer(K.data(), V.data(), n_kv, n, d, hs, ts, &g_rng);
    std::vector<float> obar((size_t)n_kv * d), qsq((size_t)n_kv * d);
    for (size_t i = 0; i < obar.size(); i++) {
        obar[i] = 0.3f * rnd_sym();
        qsq[i] = 0.01f + fabsf(rnd_sym());
    }
    // Unrotated and rotated fp32 rows, [n_kv][n][d] (the rotated ones also as rotate_kernel's
    // copy for the unstaged path).
    const size_t plane = (size_t)n_kv * n;
    std::vector<float> kf(plane * d), vf(plane * d), kr(plane * d), vr(plane * d);
    for (uint32_t h = 0; h < n_kv; h++)
        for (uint32_t t = 0; t < n; t++) {
            const size_t row = (size_t)h * hs + (size_t)t * ts, at = ((size_t)h * n + t) * d;
            fy_fp16_to_fp32_buf(&kf[at], &K[row], d);
            fy_fp16_to_fp32_buf(&vf[at], &V[row], d);
            memcpy(&kr[at], &kf[at], d * sizeof(float));
            memcpy(&vr[at], &vf[at], d * sizeof(float));
            kvc_hadamard(&kr[at], d);
            kvc_hadamard(&vr[at], d);
        }

    // encode.cu's launch: stage_plan's rule (a measured policy), the stats_args_t it fills.
    stage_t sg;
    stage_rule(d, G, c.rotate, true, &sg);
    const bool fused = sg.fused;
    stats_args_t a;
    memset(&a, 0, sizeof(a));
    a.src.k = K.data();
    a.src.v = V.data();
    a.src.hs = hs;
    a.src.ts = ts;
    a.src.kr = c.rotate && !fused ? kr.data() : NULL;
    a.src.vr = c.rotate && !fused ? vr.data() : NULL;
    a.src.n = n;
    a.src.d = d;
    a.src.vec = c.vec;
    a.obar = obar.data();
    a.qsq = qsq.data();
    a.n_kv = n_kv;
    a.n = n;
    a.d = d;
    a.G = G;
    a.model = c.model;
    a.rotate = c.rotate;
    a.need8 = (c.opts & KVC_OPT_BIT(KVC_OPT_Q8)) != 0;
    a.need4 = (c.opts & (KVC_OPT_BIT(KVC_OPT_Q4) | KVC_OPT_BIT(KVC_OPT_Q4V2))) != 0;
    a.needv4 = (c.opts & KVC_OPT_BIT(KVC_OPT_Q4)) != 0;
    a.need2 = (c.opts & (KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2))) != 0;
    a.needk2 = (c.opts & KVC_OPT_BIT(KVC_OPT_Q2)) != 0;
    std::vector<float> tab(TAB_COUNT * plane, NAN);
    a.tab = tab.data();
    a.stage = sg.st_stage;
    a.fused = fused;
    a.rot_scale = 1.0f / sqrtf((float)d);
    a.generic = generic;
    const uint32_t chunks = (n + G - 1) / G, blocks = n_kv * chunks;
    const size_t sm_floats = (a.stage ? sg.st_sm_stage : sg.st_sm) / sizeof(float);
    std::vector<float> sm((size_t)blocks * sm_floats), ke((size_t)blocks * 3), kwrot(blocks);
    emu_launch(
        blocks, a.stage ? 2 * STATS_THREADS : STATS_THREADS,
        [&] {
            const size_t b = blockIdx.x;
            stats_body(a, sm.data() + b * sm_floats, ke.data() + 3 * b, kwrot.data() + b);
        },
        true);

    // build_items' measurements, head by head and group by group.
    std::vector<float> ref(TAB_COUNT * plane, NAN), kw_rot(d);
    std::vector<float> errk(G), errv(G);
    for (uint32_t h = 0; h < n_kv; h++) {
        const float *qh = &qsq[(size_t)h * d];
        float qsq_mean = 0;
        for (uint32_t ch = 0; ch < d; ch++)
            qsq_mean += qh[ch];
        qsq_mean /= (float)d;
        for (uint32_t ch = 0; ch < d; ch++)
            kw_rot[ch] = qsq_mean;
        for (uint32_t t = 0; t < n; t++) {
            float diff[KVC_MAX_HEAD_DIM];
            for (uint32_t ch = 0; ch < d; ch++)
                diff[ch] = vf[((size_t)h * n + t) * d + ch] - obar[(size_t)h * d + ch];
            ref[TAB_DEV * plane + (size_t)h * n + t] = kvc_dot(diff, diff, d);
        }
        for (uint32_t t0 = 0; t0 < n; t0 += G) {
            const uint32_t m = G < n - t0 ? G : n - t0;
            const size_t at = (size_t)h * n + t0;
            for (int b = 2; b <= 8; b *= 2) {
                const bool need = b == 8 ? a.need8 : b == 4 ? a.need4 : a.need2;
                if (!need)
                    continue;
                const int tk = b == 8 ? TAB_EK8 : b == 4 ? TAB_EK4 : TAB_EK2;
                const bool rot = c.rotate && b <= 4;
                const float *ks = (rot ? kr : kf).data() + at * d;
                const float *vs = (rot ? vr : vf).data() + at * d;
                const float *kw = rot ? kw_rot.data() : qh;
                if (c.model || b == 8) {
                    kvc_model_errors(b, d, m, ks, vs, kw, errk.data(), errv.data());
                } else {
                    if (b != 2 || a.needk2)
                        kvc_key_errors(b, d, m, ks, kw, errk.data());
                    if (b != 4 || a.needv4)
                        kvc_value_errors(b, d, m, vs, errv.data());
                }
                memcpy(&ref[tk * plane + at], errk.data(), m * sizeof(float));
                memcpy(&ref[(tk + 1) * plane + at], errv.data(), m * sizeof(float));
            }
        }
    }
    for (int ti = 0; ti < TAB_COUNT; ti++) {
        if (!stats_wants(a, ti))
            continue;
        for (size_t i = 0; i < plane; i++) {
            const float g = tab[ti * plane + i], r = ref[ti * plane + i];
            if (memcmp(&g, &r, sizeof g) != 0)
                fail_msg("d %u G %u n %u rotate %d model %d vec %d opts %#x generic %d: table %d "
                         "item %zu is %.9g, the CPU's %.9g",
                         d, G, n, c.rotate, c.model, c.vec, c.opts, generic, ti, i, (double)g,
                         (double)r);
        }
    }
}

/* check() through both per-token paths: stats_tok_staged where it serves, and
 * stats_tok_generic everywhere. */
static void check(const scase &c)
{
    check(c, false);
    check(c, true);
}

static const uint32_t ALL = KVC_OPT_BIT(KVC_OPT_Q8) | KVC_OPT_BIT(KVC_OPT_Q4) |
                            KVC_OPT_BIT(KVC_OPT_Q4V2) | KVC_OPT_BIT(KVC_OPT_Q2);

static void test_head_dims(void **state)
{
    (void)state;
    for (int rot = 0; rot < 2; rot++) {
        check({32, 32, 70, 2, rot != 0, false, true, ALL});
        check({64, 32, 75, 2, rot != 0, false, true, ALL});
        check({128, 32, 50, 1, rot != 0, false, true, ALL});
        check({256, 32, 40, 1, rot != 0, false, true, ALL}); // unstaged
    }
}

static void test_groups_and_rows(void **state)
{
    (void)state;
    check({64, 8, 37, 2, true, false, true, ALL});
    check({64, 16, 40, 1, false, false, false, ALL}); // rows 8-byte aligned only
    check({128, 40, 90, 1, true, false, true, ALL});  // too big to stage at d 128
    check({32, 64, 150, 1, true, false, false, ALL});
}

static void test_policies(void **state)
{
    (void)state;
    const uint32_t q8 = KVC_OPT_BIT(KVC_OPT_Q8), q4 = KVC_OPT_BIT(KVC_OPT_Q4);
    const uint32_t q42 = KVC_OPT_BIT(KVC_OPT_Q4V2), q2 = KVC_OPT_BIT(KVC_OPT_Q2);
    for (int rot = 0; rot < 2; rot++) {
        check({64, 32, 70, 2, rot != 0, true, true, ALL}); // modelled
        check({64, 32, 45, 1, rot != 0, false, true, q8 | q4});
        check({64, 32, 45, 1, rot != 0, false, true, q42});
        check({64, 32, 45, 1, rot != 0, false, true, q2});
        check({128, 32, 33, 1, rot != 0, true, true, q4 | q2});
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_head_dims),
        cmocka_unit_test(test_groups_and_rows),
        cmocka_unit_test(test_policies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
