// Decode over kvcodec pages on the GPU (mdl_decode_kvc_cuda) against the CPU reference
// (mdl_decode_kvc), end to end.
//
// Prompts are prefilled on the CPU and every layer encoded into wire frames, once at policy
// fp16 and once at `ferry` b = 0.25 (FP16, INT8/4/2 and evicted tokens, rotated groups). The
// same frames go into a CPU pool (kvc_place) and a GPU pool (kvc_place_cuda). Then both decode
// N steps fed the same tokens (the CPU's greedy picks, so every step compares one context):
// a batch of two sequences (fp16 frames, ferry frames) and a ferry sequence alone. Per step:
// logits within tol = rel * max|cpu logit| + abs, and the GPU's greedy pick equal to the CPU's
// unless the CPU itself sees a near tie (gap <= 2 tol); every failure names the run, row, step
// and token. After the steps the bookkeeping must match (pages per list, tokens per list,
// free pages), every page header must be byte-equal (host copy and device bytes), and the
// FP16 tail slots (placed and appended K/V) must agree within the tolerance. A pool one page
// short fails the step with FY_ERR_RESOURCE_EXHAUSTED and changes nothing; a CPU context, a
// missing layer and a sequence twice are refused.
//
// Models: tiny random GGUFs (head_dim 64, the tensor-core attention, and head_dim 16, the SIMT
// one), always; the real SmolLM2 when $FERRY_MODEL names it or models/ holds it (a missing
// file there is reported and skipped: the offline GPU bundle does not carry the model).
// Exits 77 without a GPU.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "../decode/prefill_frames.h"
#include "test_util.h"

enum { N_STEPS = 16, N_PROMPTS = 2, SEQ_A = 11, SEQ_B = 12, PAGE_BYTES = 8192 };

typedef struct {
    const char *name;
    mdl_model_t *cm, *gm; // CPU and CUDA copies of one file
    mdl_ctx_t *cctx, *gctx;
    const mdl_config_t *c;
    float rel, abs_tol;
    int32_t *prompt[N_PROMPTS];
    int len[N_PROMPTS];
    pf_stream_t streams[N_PROMPTS][2]; // [prompt][fp16, ferry]
    int32_t first[N_PROMPTS];          // the CPU's greedy pick from the prefill logits
} mcase_t;


static float max_abs(const float *a, size_t n)
{
    float m = 0;
    for (size_t i = 0; i < n; i++)
        m = fabsf(a[i]) > m ? fabsf(a[i]) : m;
    return m;
}

/* max |a - b| (NaN counts as infinite); *at_p gets the index. */
static float max_diff(const float *a, const float *b, size_t n, size_t *at_p)
{
    float m = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) {
            m = isnan(d) ? INFINITY : d;
            at = i;
        }
    }
    if (at_p != NULL)
        *at_p = at;
    return m;
}

static kvc_pool_params_t pool_params(const mcase_t *mc, uint32_t n_pages)
{
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.page_bytes = PAGE_BYTES; // small pages: the tails cross page boundaries within N steps
    pp.n_pages = n_pages;
    pp.head_dim = (uint32_t)mc->c->head_dim;
    pp.group = mc->streams[0][1].policy.group;
    pp.protect = mc->streams[0][1].policy.protect_channels;
    return pp;
}

/* Parses every frame of s, uploads it and places it into gs; waits for the device. */
static fy_status_t place_gpu(const pf_stream_t *s, kvc_gpu_seq_t *gs)
{
    fy_status_t st = FY_OK;
    for (int l = 0; l < s->n_layers && st == FY_OK; l++) {
        kvc_frame_t f;
        uint8_t *d = NULL;
        if ((st = kvc_frame_parse(s->frames[l], s->lens[l], &f)) != FY_OK)
            break;
        if (cudaMalloc((void **)&d, s->lens[l]) != cudaSuccess ||
            cudaMemcpy(d, s->frames[l], s->lens[l], cudaMemcpyHostToDevice) != cudaSuccess) {
            cudaFree(d);
            return FY_ERR_CUDA;
        }
        st = kvc_place_cuda(gs, &f, d, NULL);
        // The pages are complete once the legacy stream is: the decode runs on another stream.
        if (cudaStreamSynchronize(NULL) != cudaSuccess && st == FY_OK)
            st = FY_ERR_CUDA;
        cudaFree(d);
    }
    return st;
}

static uint32_t frames_pages(const pf_stream_t *s, const kvc_gpu_pool_t *gp)
{
    uint32_t total = 0;
    for (int l = 0; l < s->n_layers; l++) {
        kvc_frame_t f;
        uint32_t n = 0;
        if (kvc_frame_parse(s->frames[l], s->lens[l], &f) == FY_OK &&
            kvc_gpu_pool_pages_needed(gp, &f, &n) == FY_OK)
            total += n;
    }
    return total;
}

/* Pages, tokens, headers and FP16 slots of the CPU and GPU sequences after the steps. */
static int compare_pages(const mcase_t *mc, const char *run, kvc_pool_t *cp, kvc_seq_t *const *cs,
                         kvc_gpu_pool_t *gp, kvc_gpu_seq_t *const *gs, int n)
{
    int bad = 0, L = mc->c->n_layers, KV = mc->c->n_kv_heads;
    uint32_t d = (uint32_t)mc->c->head_dim;
    TU_CHECK(kvc_pool_free_count(cp) == kvc_gpu_pool_free_count(gp),
          "%s %s: free pages cpu %u gpu %u", mc->name, run, kvc_pool_free_count(cp),
          kvc_gpu_pool_free_count(gp));
    size_t pb = kvc_gpu_pool_page_bytes(gp);
    uint8_t *dev_page = malloc(pb);
    float worst = 0, worst_max = 0;
    int hdr_bad = 0;
    for (int i = 0; i < n; i++) {
        for (int l = 0; l < L; l++) {
            for (int h = 0; h < KV; h++) {
                uint32_t nc = 0, ng = 0;
                const kvc_page_id_t *ic = kvc_seq_pages(cs[i], (uint32_t)l, (uint32_t)h, &nc);
                const kvc_page_id_t *ig = kvc_gpu_seq_pages(gs[i], (uint32_t)l, (uint32_t)h, &ng);
                uint32_t tc = kvc_seq_n_tokens(cs[i], (uint32_t)l, (uint32_t)h);
                uint32_t tg = kvc_gpu_seq_n_tokens(gs[i], (uint32_t)l, (uint32_t)h);
                if (nc != ng || tc != tg) {
                    TU_CHECK(false, "%s %s row %d layer %d head %d: cpu %u pages %u tokens, gpu %u "
                                 "pages %u tokens",
                          mc->name, run, i, l, h, nc, tc, ng, tg);
                    continue;
                }
                for (uint32_t j = 0; j < nc; j++) {
                    const uint8_t *pc = kvc_page_data(cp, ic[j]);
                    uint8_t hh[KVC_PAGE_HEADER_BYTES];
                    kvc_gpu_page_header(gp, ig[j], hh);
                    cudaMemcpy(dev_page, kvc_gpu_pool_base(gp) + (size_t)ig[j] * pb, pb,
                               cudaMemcpyDeviceToHost);
                    if (memcmp(hh, pc, KVC_PAGE_HEADER_BYTES) != 0 ||
                        memcmp(dev_page, pc, KVC_PAGE_HEADER_BYTES) != 0) {
                        if (hdr_bad++ < 5)
                            printf("FAIL %s %s row %d layer %d head %d page %u/%u: header "
                                   "differs (cpu opt %u slots %u tokens %u; gpu host copy "
                                   "slots %u, device slots %u)\n",
                                   mc->name, run, i, l, h, j, nc, pc[0], pc[4] | pc[5] << 8,
                                   pc[12] | pc[13] << 8, hh[4] | hh[5] << 8,
                                   dev_page[4] | dev_page[5] << 8);
                        continue;
                    }
                    if (pc[0] != KVC_OPT_F16)
                        continue;
                    uint32_t slots = (uint32_t)(pc[4] | pc[5] << 8);
                    size_t sb = kvc_gpu_pool_slot_bytes(gp, KVC_OPT_F16);
                    for (uint32_t s = 0; s < slots; s++) {
                        const uint16_t *a =
                            (const uint16_t *)(pc + KVC_PAGE_HEADER_BYTES + s * sb);
                        const uint16_t *b =
                            (const uint16_t *)(dev_page + KVC_PAGE_HEADER_BYTES + s * sb);
                        for (uint32_t e = 0; e < 2 * d; e++) {
                            float x = fy_fp16_to_fp32(a[e]), y = fy_fp16_to_fp32(b[e]);
                            float df = fabsf(x - y);
                            worst = !(df <= worst) ? (isnan(df) ? INFINITY : df) : worst;
                            worst_max = fmaxf(worst_max, fabsf(x));
                        }
                    }
                }
            }
        }
    }
    free(dev_page);
    bad += hdr_bad;
    float tol = mc->rel * worst_max + 0.01f;
    printf("%s %s %s pages: headers equal (%d differ), FP16 slots max |diff| %.4g (max %.3g, "
           "tol %.4g)\n",
           bad || !(worst <= tol) ? "FAIL" : "ok  ", mc->name, run, hdr_bad, worst, worst_max,
           tol);
    bad += !(worst <= tol);
    return bad;
}

/* N steps of the CPU and GPU decode over the same frames: n rows, row i from prompt which[i]
 * with policy pol[i] (0 fp16, 1 ferry). */
static int run_steps(mcase_t *mc, const char *run, int n, const int *which, const int *pol)
{
    const mdl_config_t *c = mc->c;
    int V = c->n_vocab, L = c->n_layers, KV = c->n_kv_heads, bad = 0;
    kvc_pool_params_t pp = pool_params(mc, 4096);
    kvc_pool_t *cp = NULL;
    kvc_gpu_pool_t *gp = NULL;
    kvc_seq_t *cs[N_PROMPTS] = {0};
    kvc_gpu_seq_t *gs[N_PROMPTS] = {0};
    float *lc = malloc((size_t)n * V * sizeof(float)), *lg = malloc((size_t)n * V * sizeof(float));
    uint64_t fp = mdl_model_fingerprint(mc->cm);
    fy_status_t st = kvc_pool_create(&pp, &cp);
    if (st == FY_OK)
        st = kvc_gpu_pool_create(&pp, &gp);
    for (int i = 0; i < n && st == FY_OK; i++) {
        const pf_stream_t *s = &mc->streams[which[i]][pol[i]];
        uint64_t id = which[i] == 0 ? SEQ_A : SEQ_B;
        st = kvc_seq_create(cp, (uint32_t)L, (uint32_t)KV, fp, id, &cs[i]);
        if (st == FY_OK)
            st = kvc_gpu_seq_create(gp, (uint32_t)L, (uint32_t)KV, fp, id, &gs[i]);
        if (st == FY_OK)
            st = pf_place(s, cs[i]);
        if (st == FY_OK)
            st = place_gpu(s, gs[i]);
    }
    if (st != FY_OK) {
        printf("FAIL %s %s: pools and placement: %s\n", mc->name, run, fy_status_str(st));
        bad++;
        goto out;
    }
    int32_t tok[N_PROMPTS], pos[N_PROMPTS];
    int first_div[N_PROMPTS];
    float worst[N_PROMPTS] = {0};
    char errs[N_PROMPTS][N_STEPS * 10 + 1];
    for (int i = 0; i < n; i++) {
        tok[i] = mc->first[which[i]];
        pos[i] = mc->len[which[i]];
        first_div[i] = -1;
        errs[i][0] = '\0';
    }
    uint64_t cpu_ns = 0, gpu_ns = 0;
    for (int s = 0; s < N_STEPS; s++) {
        uint64_t t0 = fy_clock_ns();
        st = mdl_decode_kvc(mc->cctx, cp, cs, pos, tok, n, lc);
        cpu_ns += fy_clock_ns() - t0;
        if (st != FY_OK) {
            printf("FAIL %s %s step %d: mdl_decode_kvc: %s\n", mc->name, run, s,
                   fy_status_str(st));
            bad++;
            goto out;
        }
        t0 = fy_clock_ns();
        st = mdl_decode_kvc_cuda(mc->gctx, gp, gs, pos, tok, n, lg);
        gpu_ns += fy_clock_ns() - t0;
        if (st != FY_OK) {
            printf("FAIL %s %s step %d: mdl_decode_kvc_cuda: %s\n", mc->name, run, s,
                   fy_status_str(st));
            bad++;
            goto out;
        }
        for (int i = 0; i < n; i++) {
            const float *a = lc + (size_t)i * V, *b = lg + (size_t)i * V;
            float tol = mc->rel * max_abs(a, (size_t)V) + mc->abs_tol;
            size_t at = 0;
            float d = max_diff(a, b, (size_t)V, &at);
            size_t el = strlen(errs[i]);
            snprintf(errs[i] + el, sizeof(errs[i]) - el, " %.3g", d);
            worst[i] = !(d <= worst[i]) ? d : worst[i];
            if (!(d <= tol)) {
                printf("FAIL %s %s row %d step %d (pos %d, fed token %d): logits max |diff| "
                       "%.4g at token %zu (cpu %.4f, gpu %.4f), tol %.4g\n",
                       mc->name, run, i, s, pos[i], tok[i], d, at, a[at], b[at], tol);
                bad++;
            }
            int32_t pc = pf_argmax(a, V), pg = pf_argmax(b, V);
            if (pc != pg) {
                float gap = a[pc] - a[pg];
                bool tie = gap <= 2 * tol;
                if (first_div[i] < 0)
                    first_div[i] = s;
                printf("%s %s %s row %d step %d: greedy cpu %d (%.4f) vs gpu %d (cpu logit "
                       "%.4f; gap %.4g, allowed %.4g)\n",
                       tie ? "note" : "FAIL", mc->name, run, i, s, pc, a[pc], pg, a[pg], gap,
                       2 * tol);
                bad += !tie;
            }
            tok[i] = pc; // both continue with the CPU's pick
            pos[i]++;
        }
    }
    for (int i = 0; i < n; i++) {
        printf("%s %s row %d (%s, prompt %d tokens): greedy equal for %d/%d steps; per-step max "
               "|logit diff|:%s\n",
               mc->name, run, i, pol[i] ? "ferry b=0.25" : "fp16", mc->len[which[i]],
               first_div[i] < 0 ? N_STEPS : first_div[i], N_STEPS, errs[i]);
    }
    // For information (the first GPU step includes its buffers' allocation).
    printf("%s %s: %.2f ms per step on the CPU, %.2f on the GPU\n", mc->name, run,
           cpu_ns / 1e6 / N_STEPS, gpu_ns / 1e6 / N_STEPS);
    bad += compare_pages(mc, run, cp, cs, gp, gs, n);
out:
    for (int i = 0; i < n; i++) {
        kvc_seq_destroy(cs[i]);
        kvc_gpu_seq_destroy(gs[i]);
    }
    if (gp != NULL)
        TU_CHECK(kvc_gpu_pool_free_count(gp) == pp.n_pages, "%s %s: pages leaked", mc->name, run);
    kvc_pool_destroy(cp);
    kvc_gpu_pool_destroy(gp);
    free(lc);
    free(lg);
    return bad;
}

/* A pool one page short of the step, a CPU context, a missing layer, a sequence twice. */
static int run_refusals(mcase_t *mc)
{
    const mdl_config_t *c = mc->c;
    int V = c->n_vocab, L = c->n_layers, KV = c->n_kv_heads, bad = 0;
    uint64_t fp = mdl_model_fingerprint(mc->cm);
    const pf_stream_t *s = &mc->streams[0][1];
    // Sized from a scratch pool: the frames' pages plus the step's tail pages, minus one.
    kvc_pool_params_t pp = pool_params(mc, 4096);
    kvc_gpu_pool_t *gp = NULL;
    kvc_gpu_seq_t *gs = NULL, *part = NULL;
    float *lg = malloc((size_t)2 * V * sizeof(float));
    if (kvc_gpu_pool_create(&pp, &gp) != FY_OK) {
        printf("FAIL %s: GPU pool\n", mc->name);
        free(lg);
        return 1;
    }
    uint32_t placed = frames_pages(s, gp);
    kvc_gpu_pool_destroy(gp);
    gp = NULL;
    // The step's tail pages follow from the frames alone (which lists end in a 16/16 page
    // with room), so place once in a big pool to learn them.
    kvc_gpu_pool_t *big = NULL;
    kvc_gpu_seq_t *probe = NULL;
    uint32_t need = 0;
    if (kvc_gpu_pool_create(&pp, &big) == FY_OK &&
        kvc_gpu_seq_create(big, (uint32_t)L, (uint32_t)KV, fp, SEQ_A, &probe) == FY_OK &&
        place_gpu(s, probe) == FY_OK)
        need = mdl_kvc_step_pages_cuda(mc->gm, big, probe);
    kvc_gpu_seq_destroy(probe);
    kvc_gpu_pool_destroy(big);
    TU_CHECK(need <= (uint32_t)(L * KV), "%s: step pages %u", mc->name, need);
    // need is 0 only when every list ends in a 16/16 page with room (no quantized option
    // placed last): then no pool is short for one step, and a one-page pool stands in.
    if (need == 0)
        printf("note %s: the first step needs no new page; the short-pool check uses a pool "
               "with no free page at all, which must still succeed\n",
               mc->name);
    pp.n_pages = need > 0 ? placed + need - 1 : placed;
    int32_t pos = mc->len[0], tok = mc->first[0];
    if (kvc_gpu_pool_create(&pp, &gp) == FY_OK &&
        kvc_gpu_seq_create(gp, (uint32_t)L, (uint32_t)KV, fp, SEQ_A, &gs) == FY_OK &&
        place_gpu(s, gs) == FY_OK) {
        uint32_t free_before = kvc_gpu_pool_free_count(gp), tokens_before[8];
        for (int l = 0; l < L && l < 8; l++)
            tokens_before[l] = kvc_gpu_seq_n_tokens(gs, (uint32_t)l, 0);
        fy_status_t st = mdl_decode_kvc_cuda(mc->gctx, gp, &gs, &pos, &tok, 1, lg);
        if (need > 0) {
            TU_CHECK(st == FY_ERR_RESOURCE_EXHAUSTED, "%s: a pool one page short: %s", mc->name,
                  fy_status_str(st));
            TU_CHECK(kvc_gpu_pool_free_count(gp) == free_before,
                  "%s: pages taken by a failed step", mc->name);
            for (int l = 0; l < L && l < 8; l++)
                TU_CHECK(kvc_gpu_seq_n_tokens(gs, (uint32_t)l, 0) == tokens_before[l],
                      "%s: layer %d changed by a failed step", mc->name, l);
        } else {
            TU_CHECK(st == FY_OK, "%s: a step that needs no page: %s", mc->name, fy_status_str(st));
        }
        // A CPU context cannot run a GPU pool.
        st = mdl_decode_kvc_cuda(mc->cctx, gp, &gs, &pos, &tok, 1, lg);
        TU_CHECK(st == FY_ERR_INVALID_ARG, "%s: CPU context: %s", mc->name, fy_status_str(st));
        // The same sequence twice.
        kvc_gpu_seq_t *twice[2] = {gs, gs};
        int32_t p2[2] = {pos, pos}, t2[2] = {tok, tok};
        st = mdl_decode_kvc_cuda(mc->gctx, gp, twice, p2, t2, 2, lg);
        TU_CHECK(st == FY_ERR_INVALID_ARG, "%s: a sequence twice: %s", mc->name, fy_status_str(st));
    } else {
        printf("FAIL %s: the short pool could not be set up\n", mc->name);
        bad++;
    }
    kvc_gpu_seq_destroy(gs);
    kvc_gpu_pool_destroy(gp);
    // Every layer but the last placed: not ready.
    pp.n_pages = 4096;
    if (kvc_gpu_pool_create(&pp, &gp) == FY_OK &&
        kvc_gpu_seq_create(gp, (uint32_t)L, (uint32_t)KV, fp, SEQ_A, &part) == FY_OK) {
        pf_stream_t cut = *s;
        cut.n_layers = L - 1;
        TU_CHECK(place_gpu(&cut, part) == FY_OK, "%s: partial placement", mc->name);
        fy_status_t st = mdl_decode_kvc_cuda(mc->gctx, gp, &part, &pos, &tok, 1, lg);
        TU_CHECK(st == FY_ERR_STATE, "%s: a missing layer: %s", mc->name, fy_status_str(st));
    }
    kvc_gpu_seq_destroy(part);
    kvc_gpu_pool_destroy(gp);
    free(lg);
    printf("%s %s refusals: short pool, CPU context, missing layer, sequence twice\n",
           bad ? "FAIL" : "ok  ", mc->name);
    return bad;
}

/* Loads path on both devices, prefills and encodes the prompts on the CPU, runs the checks. */
static int run_model(const char *name, const char *path, int32_t *const *prompts, const int *lens,
                     float rel, float abs_tol)
{
    mcase_t mc = {.name = name, .rel = rel, .abs_tol = abs_tol};
    int bad = 0;
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = path;
    fy_status_t st = mdl_model_create(&mp, &mc.cm, err, sizeof(err));
    if (st == FY_OK) {
        mp.device = MDL_DEVICE_CUDA;
        st = mdl_model_create(&mp, &mc.gm, err, sizeof(err));
    }
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.max_batch = N_PROMPTS;
    cp.n_threads = 0;
    if (st == FY_OK)
        st = mdl_ctx_create(mc.cm, &cp, &mc.cctx);
    cp.device = MDL_DEVICE_CUDA;
    if (st == FY_OK)
        st = mdl_ctx_create(mc.gm, &cp, &mc.gctx);
    if (st != FY_OK) {
        printf("FAIL %s: models and contexts: %s (%s)\n", name, fy_status_str(st), err);
        bad++;
        goto out;
    }
    mc.c = mdl_model_config(mc.cm);
    float *logits = malloc((size_t)mc.c->n_vocab * sizeof(float));
    for (int p = 0; p < N_PROMPTS && st == FY_OK; p++) {
        mc.prompt[p] = prompts[p];
        mc.len[p] = lens[p];
        pf_stream_t *s = mc.streams[p];
        st = kvc_policy_builtin("fp16", &s[0].policy);
        if (st == FY_OK)
            st = kvc_policy_builtin("ferry", &s[1].policy);
        s[0].budget = -1;
        s[1].budget = 0.25;
        if (st == FY_OK)
            st = pf_prefill(mc.cctx, mc.cm, prompts[p], lens[p], s, 2, p == 0 ? SEQ_A : SEQ_B,
                            NULL, logits);
        mc.first[p] = pf_argmax(logits, mc.c->n_vocab);
        if (st == FY_OK)
            printf("%s prompt %d: %d tokens; fp16 frames %.1f KiB, ferry frames %.1f KiB "
                   "(%.3f of FP16)\n",
                   name, p, lens[p], s[0].wire_bytes / 1024.0, s[1].wire_bytes / 1024.0,
                   (double)s[1].wire_bytes / (double)s[1].fp16_bytes);
    }
    free(logits);
    if (st != FY_OK) {
        printf("FAIL %s: prefill and encoding on the CPU: %s\n", name, fy_status_str(st));
        bad++;
        goto out;
    }
    static const int which_ab[2] = {0, 1}, pol_mixed[2] = {0, 1};
    static const int which_a[1] = {0}, pol_ferry[1] = {1};
    bad += run_steps(&mc, "batch{fp16,ferry}", 2, which_ab, pol_mixed);
    bad += run_steps(&mc, "alone{ferry}", 1, which_a, pol_ferry);
    bad += run_refusals(&mc);
out:
    for (int p = 0; p < N_PROMPTS; p++) {
        pf_stream_cleanup(&mc.streams[p][0]);
        pf_stream_cleanup(&mc.streams[p][1]);
    }
    mdl_ctx_destroy(mc.cctx);
    mdl_ctx_destroy(mc.gctx);
    mdl_model_destroy(mc.cm);
    mdl_model_destroy(mc.gm);
    return bad;
}

static int tiny_models(void)
{
    static const tu_tiny_case_t cases[] = {
        {"llama", MDL_TENSOR_F32, true, 4, 2, 256}, // head_dim 64: tensor-core attention
        {"qwen2", MDL_TENSOR_Q8_0, false, 6, 3, 96}, // head_dim 16: SIMT attention, GQA 2
    };
    int bad = 0;
    uint64_t seed = 4242;
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        mdlt_tiny_params_t tp;
        char path[64];
        if (tu_tiny_case_temp(&cases[k], k + 7, path, sizeof(path), &tp) != 0) {
            printf("FAIL: cannot write the tiny model\n");
            return bad + 1;
        }
        static int32_t p[N_PROMPTS][200];
        int32_t *pp[N_PROMPTS] = {p[0], p[1]};
        int lens[N_PROMPTS] = {173, 130};
        for (int i = 0; i < N_PROMPTS; i++)
            tu_random_tokens(&seed, p[i], lens[i]);
        char name[64];
        snprintf(name, sizeof(name), "tiny-%s-hd%d", tp.arch, tp.dim / tp.n_heads);
        bad += run_model(name, path, pp, lens, 0.02f, 1e-3f);
        unlink(path);
    }
    return bad;
}

static int real_model(void)
{
    const char *path = tu_model_path();
    if (access(path, R_OK) != 0) {
        printf("note: the real model %s is not here; its checks are skipped (set FERRY_MODEL)\n",
               path);
        return 0;
    }
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = path;
    mdl_model_t *m = NULL;
    if (mdl_model_create(&mp, &m, err, sizeof(err)) != FY_OK) {
        printf("FAIL: cannot load %s: %s\n", path, err);
        return 1;
    }
    static const char *const texts[N_PROMPTS] = {
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Ferries have carried people and goods across rivers, lakes and straits for thousands "
        "of years. Early ferries were rafts or rowing boats pulled by ropes; later came sailing "
        "vessels, paddle steamers and the large roll-on roll-off ships that now carry cars, "
        "trucks and trains across the Baltic, the English Channel and the straits of Japan. In "
        "cities such as Istanbul, Hong Kong, Sydney and New York, commuter ferries move "
        "hundreds of thousands of passengers every day. Summarize the history of ferries in "
        "two sentences.<|im_end|>\n<|im_start|>assistant\n",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively so "
        "that large n do not overflow the stack.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
        "        a, b = b, a + b\n    return a\n\n\ndef is_prime(n):\n    \"\"\"Return True when n "
        "is a prime number.\"\"\"\n    if n < 2:\n        return False\n",
    };
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    static int32_t ids[N_PROMPTS][512];
    int32_t *pp[N_PROMPTS] = {ids[0], ids[1]};
    int lens[N_PROMPTS];
    for (int i = 0; i < N_PROMPTS; i++) {
        size_t n = 0;
        if (mdl_tokenizer_encode(tok, texts[i], strlen(texts[i]), true, ids[i], 512, &n) !=
            FY_OK) {
            mdl_model_destroy(m);
            printf("FAIL: tokenizing prompt %d\n", i);
            return 1;
        }
        lens[i] = (int)n;
    }
    mdl_model_destroy(m);
    // FP16 weights and GEMM inputs against FP32 (as test_model_cuda).
    return run_model("SmolLM2", path, pp, lens, 0.02f, 0.1f);
}

int main(void)
{
    if (fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    int bad = tiny_models();
    bad += real_model();
    printf("%s: %d failed checks\n", bad ? "FAIL" : "PASS", bad);
    return bad ? 1 : 0;
}
