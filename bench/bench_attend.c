/*
 * bench_attend.c: `ferry-bench attend`, one decode step of attention over compressed KV pages on
 * the GPU (kvc_attend_batch_cuda) at each page option, against FP16 pages and, when given its
 * JSON, torch's scaled_dot_product_attention over contiguous FP16 K/V (bench/attend_sdpa.py).
 *
 * Usage: ferry-bench attend --device cuda [--json [FILE]] [--sdpa-json FILE]
 *                           [--contexts 4096,32768,131072] [--batches 1,32] [--reps N]
 *                           [--page-kib 8..64]
 *
 * Shape: one Llama-3-8B layer (32 query heads, 8 kv heads, head_dim 128), 32 KiB pages (or
 * --page-kib; the decode worker's default is 16), G 32.
 * Pages hold real encoder output: for each option one short layer is encoded with a policy that
 * allows only that option and placed into a CPU pool; its full pages are uploaded and then
 * replicated over the device pool (the time does not depend on the values). Every list of a
 * step has its own pages, and steps rotate over several page sets so that one step's data never
 * fits in L2. When the pages would exceed the pool cap the ids wrap (the cap is far larger than
 * L2, and the wrap distance is not a multiple of a list's length, so wrapped reads never meet
 * in time). Timing: CUDA events around 8 back-to-back steps (page sets rotating), one warm-up
 * interval, median over --reps intervals. Each case runs with every kernel of
 * kvc_attend_batch_cuda: the tensor-core one (the default; the goals are its rows), for quantized
 * pages its exact-code variant "qtab", and the SIMT one (these two reps / 4 intervals), side by
 * side; the opt-in "wide" variant of the tensor-core kernel only when --kernels names it (then
 * right after "mma", with "wide / mma" per row at the end).
 * Bytes read = page headers + used slots of every page (what the kernel loads).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kvcodec.h"

#if FY_HAVE_CUDA
#include <cjson/cJSON.h>
#include <cuda_runtime.h>

#include "kvcodec_cuda.h"

enum { N_HEADS = 32, N_KV = 8, HEAD_DIM = 128, GROUP = 32, SRC_TOKENS = 2048 };
#define MAX_LIST 16
#define MAX_SETS 16
#define STEPS 8 // decode steps per timed interval

typedef struct {
    const char *name;
    kvc_opt_t opt;
    bool rotate;
} variant_t;

static const variant_t k_variants[] = {
    {"f16", KVC_OPT_F16, false},   {"int8", KVC_OPT_Q8, false},   {"int4", KVC_OPT_Q4, false},
    {"int4-rot", KVC_OPT_Q4, true}, {"4/2", KVC_OPT_Q4V2, false}, {"int2", KVC_OPT_Q2, false},
};
#define N_VARIANTS (sizeof(k_variants) / sizeof(k_variants[0]))

typedef struct {
    const char *variant;
    const char *kernel; // "mma", "wide", "qtab" or "simt" (KVC_ATTEND_IMPL_*)
    uint32_t context, batch, tokens_per_list, pages_per_list;
    double bytes, ms, gbps, vs_f16, sdpa_ms;
} row_t;

#define CU(call)                                                                               \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "attend: %s: %s\n", #call, cudaGetErrorString(e_));               \
            goto fail;                                                                         \
        }                                                                                      \
    } while (0)

static int parse_list(const char *s, uint32_t *out, int max)
{
    int n = 0;
    while (*s && n < max) {
        char *end;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s || v == 0 || v > (1u << 24))
            return -1;
        out[n++] = (uint32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return n;
}

/* Encodes one synthetic layer with only `v->opt` allowed and places it; writes the ids of its
 * full pages of that option (at most max) and the tokens such a page holds. */
static fy_status_t make_source(const variant_t *v, kvc_pool_t *pool, kvc_seq_t **seq_p,
                               kvc_page_id_t *ids, uint32_t max, uint32_t *n_p,
                               uint32_t *page_tokens_p)
{
    kvc_policy_t pol;
    fy_status_t st = kvc_policy_builtin("int4", &pol); // uniform, nothing pinned, no budget
    if (st != FY_OK)
        return st;
    pol.options = KVC_OPT_BIT(v->opt);
    pol.rotate = v->rotate;
    uint16_t *k = malloc((size_t)N_KV * SRC_TOKENS * HEAD_DIM * 2);
    uint16_t *vv = malloc((size_t)N_KV * SRC_TOKENS * HEAD_DIM * 2);
    float *q = malloc((size_t)N_HEADS * 32 * HEAD_DIM * sizeof(float));
    uint8_t *frame = NULL;
    kvc_encoder_t *enc = NULL;
    if (!k || !vv || !q) {
        st = FY_ERR_NO_MEMORY;
        goto out;
    }
    kvc_synth_layer(11 + (uint64_t)v->opt, N_HEADS, N_KV, SRC_TOKENS, HEAD_DIM, 32, k, vv, q);
    kvc_encoder_params_t p;
    kvc_encoder_params_default(&p);
    p.policy = &pol;
    p.n_layers = 1;
    p.n_heads = N_HEADS;
    p.n_kv_heads = N_KV;
    p.head_dim = HEAD_DIM;
    p.n_tokens = SRC_TOKENS;
    p.model_fingerprint = 1;
    p.seq_id = 1;
    if ((st = kvc_encoder_create(&p, &enc)) != FY_OK)
        goto out;
    size_t cap = kvc_encoder_max_frame_bytes(enc), len;
    frame = malloc(cap);
    if (frame == NULL) {
        st = FY_ERR_NO_MEMORY;
        goto out;
    }
    kvc_layer_input_t in;
    memset(&in, 0, sizeof(in));
    in.k = k;
    in.v = vv;
    in.head_stride = (size_t)SRC_TOKENS * HEAD_DIM;
    in.token_stride = HEAD_DIM;
    in.q_window = q;
    in.n_window = 32;
    if ((st = kvc_encoder_encode_layer(enc, &in, NULL, frame, cap, &len, NULL)) != FY_OK)
        goto out;
    kvc_frame_t f;
    if ((st = kvc_frame_parse(frame, len, &f)) != FY_OK)
        goto out;
    if ((st = kvc_seq_create(pool, 1, N_KV, 1, 1, seq_p)) != FY_OK)
        goto out;
    if ((st = kvc_place(*seq_p, &f)) != FY_OK)
        goto out;
    uint32_t full = kvc_pool_page_tokens(pool, v->opt), n = 0;
    for (uint32_t h = 0; h < N_KV; h++) {
        uint32_t np;
        const kvc_page_id_t *l = kvc_seq_pages(*seq_p, 0, h, &np);
        for (uint32_t j = 0; j < np && n < max; j++)
            if (kvc_page_opt(pool, l[j]) == v->opt && kvc_page_n_tokens(pool, l[j]) == full)
                ids[n++] = l[j];
    }
    *n_p = n;
    *page_tokens_p = full;
    st = n > 0 ? FY_OK : FY_ERR_INTERNAL;
out:
    kvc_encoder_destroy(enc);
    free(frame), free(k), free(vv), free(q);
    return st;
}

/* Slot bytes of an option in a pool of this shape without protected channels
 * (docs/kvcodec-format.md §3: the group layout at capacity G, rounded up to 16). */
static size_t slot_bytes(kvc_opt_t o)
{
    size_t d = HEAD_DIM, g = GROUP;
    size_t b = o == KVC_OPT_F16 ? 4 * d
                                : 4 * d + 4 * g + g * d * (size_t)(kvc_opt_kbits(o) + kvc_opt_vbits(o)) / 8;
    return (b + 15) / 16 * 16;
}

static double median(double *x, int n)
{
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && x[j - 1] > x[j]; j--) {
            double t = x[j];
            x[j] = x[j - 1];
            x[j - 1] = t;
        }
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* SDPA milliseconds for (context, batch) from attend_sdpa.py's JSON; <= 0 when absent. */
static double sdpa_lookup(const cJSON *root, uint32_t context, uint32_t batch)
{
    const cJSON *res = cJSON_GetObjectItemCaseSensitive(root, "results");
    const cJSON *it;
    cJSON_ArrayForEach(it, res)
    {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "context");
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(it, "batch");
        const cJSON *ms = cJSON_GetObjectItemCaseSensitive(it, "ms");
        if (cJSON_IsNumber(c) && cJSON_IsNumber(b) && cJSON_IsNumber(ms) &&
            (uint32_t)c->valuedouble == context && (uint32_t)b->valuedouble == batch)
            return ms->valuedouble;
    }
    return -1;
}

static cJSON *read_json(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 > cap) {
            cap = cap ? 2 * cap : 65536;
            char *nb = realloc(buf, cap);
            if (nb == NULL) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t r = fread(buf + len, 1, cap - len - 1, f);
        len += r;
        if (r == 0)
            break;
    }
    fclose(f);
    buf[len] = 0;
    cJSON *j = cJSON_Parse(buf);
    free(buf);
    return j;
}

/* Whether name is one of the comma-separated items of list. */
static bool in_list(const char *list, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0)
            return true;
        p += len + (e != NULL);
    }
    return false;
}

/* The name of kernel impl (KVC_ATTEND_IMPL_*) in --kernels and the report. */
static const char *kernel_name(uint32_t impl)
{
    return impl == KVC_ATTEND_IMPL_MMA        ? "mma"
           : impl == KVC_ATTEND_IMPL_MMA_WIDE ? "wide"
           : impl == KVC_ATTEND_IMPL_MMA_QTAB ? "qtab"
                                              : "simt";
}

int bench_attend_main(int argc, char **argv)
{
    const char *device = "cuda", *json = NULL, *sdpa_path = NULL, *pages = NULL,
               *kernels = NULL;
    bool json_stdout = false;
    uint32_t contexts[MAX_LIST] = {4096, 32768, 131072}, batches[MAX_LIST] = {1, 32};
    int n_ctx = 3, n_b = 2, reps = 20;
    // 32 KiB pages by default (the figures in bench/results); the decode worker's default
    // --page-bytes is 16K.
    uint32_t page_bytes = 32768;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--device") == 0 && val) {
            device = val, i++;
        } else if (strcmp(a, "--json") == 0) {
            if (val && strncmp(val, "--", 2) != 0 && strcmp(val, "-") != 0)
                json = val, i++;
            else {
                json_stdout = true;
                if (val && strcmp(val, "-") == 0)
                    i++;
            }
        } else if (strcmp(a, "--sdpa-json") == 0 && val) {
            sdpa_path = val, i++;
        } else if (strcmp(a, "--contexts") == 0 && val) {
            n_ctx = parse_list(val, contexts, MAX_LIST), i++;
        } else if (strcmp(a, "--batches") == 0 && val) {
            n_b = parse_list(val, batches, MAX_LIST), i++;
        } else if (strcmp(a, "--reps") == 0 && val) {
            reps = atoi(val), i++;
        } else if (strcmp(a, "--pages") == 0 && val) {
            pages = val, i++;
        } else if (strcmp(a, "--kernels") == 0 && val) {
            kernels = val, i++;
        } else if (strcmp(a, "--page-kib") == 0 && val) {
            long kib = strtol(val, NULL, 10);
            page_bytes = kib >= 8 && kib <= 64 ? (uint32_t)kib * 1024u : 0;
            i++;
        } else {
            fprintf(stderr,
                    "usage: ferry-bench attend --device cuda [--json [FILE]] "
                    "[--sdpa-json FILE] [--contexts N,..] [--batches N,..] [--reps N] "
                    "[--pages f16,int8,int4,int4-rot,4/2,int2] [--kernels mma,wide,qtab,simt] "
                    "[--page-kib 8..64]\n");
            return 2;
        }
    }
    if (strcmp(device, "cuda") != 0) {
        fprintf(stderr, "attend: only --device cuda is measured here (the CPU reference is "
                        "kvc_attend_layer)\n");
        return 2;
    }
    if (n_ctx <= 0 || n_b <= 0 || reps < 1 || reps > 1000 || page_bytes == 0) {
        fprintf(stderr, "attend: bad --contexts, --batches, --reps or --page-kib\n");
        return 2;
    }
    if (fy_cuda_device_count() == 0) {
        fprintf(stderr, "attend: no CUDA device\n");
        return 77;
    }
    FILE *out = json_stdout ? stderr : stdout; // the table goes to stderr when JSON is on stdout
    cJSON *sdpa = NULL;
    if (sdpa_path) {
        sdpa = read_json(sdpa_path);
        if (sdpa == NULL)
            fprintf(stderr, "attend: cannot read %s (SDPA column left empty)\n", sdpa_path);
    }

    int ret = 1;
    uint32_t max_b = 0;
    for (int i = 0; i < n_b; i++)
        max_b = FY_MAX(max_b, batches[i]);

    struct cudaDeviceProp prop;
    int dev = 0, driver = 0;
    uint8_t *d_pool = NULL;
    uint32_t *d_ids = NULL, *d_starts = NULL, *h_ids = NULL, *h_starts = NULL;
    float *d_q = NULL, *d_out = NULL;
    void *d_ws = NULL;
    size_t ws_cap = 0;
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    row_t *rows = calloc(3 * N_VARIANTS * (size_t)n_ctx * n_b, sizeof(row_t));
    double *times = malloc((size_t)reps * sizeof(double));
    int n_rows = 0;
    kvc_pool_t *src_pool = NULL;
    if (rows == NULL || times == NULL)
        goto fail;
    CU(cudaGetDevice(&dev));
    CU(cudaGetDeviceProperties(&prop, dev));
    CU(cudaDriverGetVersion(&driver));
    CU(cudaEventCreate(&ev0));
    CU(cudaEventCreate(&ev1));
    const size_t l2 = prop.l2CacheSize > 0 ? (size_t)prop.l2CacheSize : (size_t)50 << 20;

    // The device pool: the pages of the largest step at the densest option (F16), capped
    // at 4 GiB (80x an H100's L2) or 40% of free memory.
    size_t free_b = 0, total_b = 0;
    CU(cudaMemGetInfo(&free_b, &total_b));
    size_t cap_bytes = FY_MIN((size_t)4 << 30, free_b / 10 * 4);
    uint32_t pool_pages = (uint32_t)(cap_bytes / page_bytes);
    CU(cudaMalloc((void **)&d_pool, (size_t)pool_pages * page_bytes));
    CU(cudaMalloc((void **)&d_q, (size_t)max_b * N_HEADS * HEAD_DIM * sizeof(float)));
    CU(cudaMalloc((void **)&d_out, (size_t)max_b * N_HEADS * HEAD_DIM * sizeof(float)));
    {
        size_t nq = (size_t)max_b * N_HEADS * HEAD_DIM;
        float *hq = malloc(nq * sizeof(float));
        if (hq == NULL)
            goto fail;
        uint64_t s = 7;
        for (size_t i = 0; i < nq; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            hq[i] = (float)((s >> 40) & 0xffff) / 32768.0f - 1.0f;
        }
        cudaError_t e = cudaMemcpy(d_q, hq, nq * sizeof(float), cudaMemcpyHostToDevice);
        free(hq);
        CU(e);
    }

    fprintf(out,
            "attend on %s (driver %d, %zu MiB L2), Llama-3-8B layer: %d q heads, %d kv "
            "heads, head_dim %d, %u KiB pages\n",
            prop.name, driver, l2 >> 20, N_HEADS, N_KV, HEAD_DIM, page_bytes / 1024);
    fprintf(out, "%-9s %-6s %8s %5s %7s %10s %9s %9s %8s %9s\n", "pages", "kernel", "context",
            "batch", "pages/l", "MB read", "us/step", "GB/s", "vs f16", "vs sdpa");

    for (size_t vi = 0; vi < N_VARIANTS; vi++) {
        if (pages != NULL && !in_list(pages, k_variants[vi].name))
            continue;
        const variant_t *v = &k_variants[vi];
        kvc_pool_params_t pp;
        kvc_pool_params_default(&pp);
        pp.head_dim = HEAD_DIM;
        pp.group = GROUP;
        pp.page_bytes = page_bytes;
        pp.n_pages = 1024;
        kvc_seq_t *seq = NULL;
        kvc_page_id_t src[256];
        uint32_t n_src = 0, page_tokens = 0;
        if (kvc_pool_create(&pp, &src_pool) != FY_OK) {
            fprintf(stderr, "attend: cannot create the source pool\n");
            goto fail;
        }
        fy_status_t st = make_source(v, src_pool, &seq, src, 256, &n_src, &page_tokens);
        if (st != FY_OK) {
            fprintf(stderr, "attend: encoding %s pages: %s\n", v->name, fy_status_str(st));
            kvc_seq_destroy(seq);
            goto fail;
        }
        const uint8_t *pg0 = kvc_page_data(src_pool, src[0]);
        const size_t used = KVC_PAGE_HEADER_BYTES +
                            (size_t)((uint32_t)pg0[4] | ((uint32_t)pg0[5] << 8)) * slot_bytes(v->opt);
        // Upload the source pages, then replicate them over as much of the pool as the largest
        // step of this option needs (doubling copies on the device).
        uint64_t need = 0;
        for (int ci = 0; ci < n_ctx; ci++)
            for (int bi = 0; bi < n_b; bi++) {
                uint64_t ppl = (contexts[ci] + page_tokens - 1) / page_tokens;
                uint64_t step = ppl * batches[bi] * N_KV;
                uint64_t sets = FY_MIN((uint64_t)MAX_SETS, FY_MAX(1, (4 * l2 + step * used - 1) / (step * used)));
                need = FY_MAX(need, sets * step);
            }
        const uint32_t filled = (uint32_t)FY_MIN(need, (uint64_t)pool_pages);
        for (uint32_t i = 0; i < n_src && i < filled; i++)
            CU(cudaMemcpy(d_pool + (size_t)i * page_bytes, kvc_page_data(src_pool, src[i]),
                          page_bytes, cudaMemcpyHostToDevice));
        for (uint32_t have = FY_MIN(n_src, filled); have < filled;) {
            uint32_t c = FY_MIN(have, filled - have);
            CU(cudaMemcpy(d_pool + (size_t)have * page_bytes, d_pool, (size_t)c * page_bytes,
                          cudaMemcpyDeviceToDevice));
            have += c;
        }
        kvc_seq_destroy(seq);
        kvc_pool_destroy(src_pool);
        src_pool = NULL;

        for (int ci = 0; ci < n_ctx; ci++) {
            for (int bi = 0; bi < n_b; bi++) {
                const uint32_t B = batches[bi], items = B * N_KV;
                const uint32_t ppl = (contexts[ci] + page_tokens - 1) / page_tokens;
                const uint64_t step = (uint64_t)ppl * items;
                const double step_bytes = (double)step * (double)used;
                uint32_t sets = (uint32_t)FY_MIN((uint64_t)MAX_SETS,
                                                 FY_MAX(1, (uint64_t)ceil(4.0 * l2 / step_bytes)));
                uint64_t total = step * sets;
                if (total > UINT32_MAX) {
                    fprintf(stderr, "attend: %u x %u too large\n", contexts[ci], B);
                    goto fail;
                }
                // Pool ids in use: all distinct when they fit; otherwise wrap at a count that
                // is odd and not a multiple of the list length.
                uint32_t n_use = (uint32_t)FY_MIN(total, (uint64_t)filled);
                if (n_use < total) {
                    n_use |= 1;
                    if (n_use > filled)
                        n_use -= 2;
                    if (n_use % ppl == 0)
                        n_use -= 2;
                }
                free(h_ids), free(h_starts);
                h_ids = malloc(total * sizeof(uint32_t));
                h_starts = malloc((size_t)sets * (items + 1) * sizeof(uint32_t));
                if (!h_ids || !h_starts)
                    goto fail;
                for (uint64_t g = 0; g < total; g++)
                    h_ids[g] = (uint32_t)(g % n_use);
                for (uint32_t s = 0; s < sets; s++)
                    for (uint32_t i = 0; i <= items; i++)
                        h_starts[(size_t)s * (items + 1) + i] = (uint32_t)(((uint64_t)s * items + i) * ppl);
                cudaFree(d_ids), cudaFree(d_starts);
                d_ids = NULL, d_starts = NULL;
                CU(cudaMalloc((void **)&d_ids, total * sizeof(uint32_t)));
                CU(cudaMalloc((void **)&d_starts, (size_t)sets * (items + 1) * sizeof(uint32_t)));
                CU(cudaMemcpy(d_ids, h_ids, total * sizeof(uint32_t), cudaMemcpyHostToDevice));
                CU(cudaMemcpy(d_starts, h_starts, (size_t)sets * (items + 1) * sizeof(uint32_t),
                              cudaMemcpyHostToDevice));
                kvc_gpu_pages_t gp = {d_pool, page_bytes, filled, HEAD_DIM, GROUP, 0};
                // Every kernel: the tensor-core one (the default, the goals' rows), its wide
                // variant right after it (only when --kernels names "wide": it is timed against
                // mma row by row), for quantized pages its exact-code variant (MMA_QTAB), and the
                // SIMT one, the last two timed with fewer reps.
                static const uint32_t impls[] = {KVC_ATTEND_IMPL_MMA, KVC_ATTEND_IMPL_MMA_WIDE,
                                                 KVC_ATTEND_IMPL_MMA_QTAB, KVC_ATTEND_IMPL_SIMT};
                for (size_t ii = 0; ii < FY_ARRAY_SIZE(impls); ii++) {
                const uint32_t impl = impls[ii];
                if (impl == KVC_ATTEND_IMPL_MMA_QTAB && v->opt == KVC_OPT_F16)
                    continue; // FP16 pages have no key codes: the same kernel as MMA
                if (kernels != NULL ? !in_list(kernels, kernel_name(impl))
                                    : impl == KVC_ATTEND_IMPL_MMA_WIDE)
                    continue;
                const int kreps = impl == KVC_ATTEND_IMPL_MMA || impl == KVC_ATTEND_IMPL_MMA_WIDE
                                      ? reps
                                      : FY_MAX(3, reps / 4);
                kvc_attend_batch_t bt = {B, N_HEADS, N_KV, d_starts, d_ids, ppl, impl};
                uint32_t ran = 0;
                if ((st = kvc_attend_batch_cuda_impl(&gp, &bt, &ran)) != FY_OK) {
                    fprintf(stderr, "attend: impl: %s\n", fy_status_str(st));
                    goto fail;
                }
                size_t ws_need;
                if ((st = kvc_attend_batch_cuda_workspace(&gp, &bt, &ws_need)) != FY_OK) {
                    fprintf(stderr, "attend: workspace: %s\n", fy_status_str(st));
                    goto fail;
                }
                if (ws_need > ws_cap) {
                    cudaFree(d_ws);
                    d_ws = NULL;
                    CU(cudaMalloc(&d_ws, ws_need));
                    ws_cap = ws_need;
                }
                const float scale = 1.0f / sqrtf((float)HEAD_DIM);
                // Each timed rep runs STEPS steps back to back (as a decode loop would, so host
                // launch overhead is hidden whenever the GPU is the slower side).
                for (int r = -1; r < kreps; r++) {
                    CU(cudaEventRecord(ev0, NULL));
                    for (int k = 0; k < STEPS; k++) {
                        uint32_t set = (uint32_t)((r + 1) * STEPS + k) % sets;
                        bt.list_start = d_starts + (size_t)set * (items + 1);
                        st = kvc_attend_batch_cuda(&gp, &bt, d_q, scale, d_out, d_ws, ws_cap,
                                                   NULL);
                        if (st != FY_OK) {
                            fprintf(stderr, "attend: %s\n", fy_status_str(st));
                            goto fail;
                        }
                    }
                    CU(cudaEventRecord(ev1, NULL));
                    CU(cudaEventSynchronize(ev1));
                    float ms;
                    CU(cudaEventElapsedTime(&ms, ev0, ev1));
                    if (r >= 0) // r == -1 is the warm-up
                        times[r] = ms / STEPS;
                }
                uint32_t n_bad = 0;
                if (kvc_attend_batch_cuda_bad_pages(d_ws, NULL, &n_bad) != FY_OK || n_bad) {
                    fprintf(stderr, "attend: %u pages refused\n", n_bad);
                    goto fail;
                }
                row_t *R = &rows[n_rows++];
                R->variant = v->name;
                R->kernel = kernel_name(ran);
                // Against the FP16 pages of the same kernel (qtab has none: mma's).
                const char *f16_kernel = ran == KVC_ATTEND_IMPL_MMA_QTAB ? "mma" : R->kernel;
                R->context = contexts[ci];
                R->batch = B;
                R->pages_per_list = ppl;
                R->tokens_per_list = ppl * page_tokens;
                R->bytes = step_bytes;
                R->ms = median(times, kreps);
                R->gbps = step_bytes / (R->ms * 1e-3) / 1e9;
                R->vs_f16 = 0;
                R->sdpa_ms = sdpa ? sdpa_lookup(sdpa, contexts[ci], B) : -1;
                for (int k = 0; k < n_rows; k++)
                    if (strcmp(rows[k].variant, "f16") == 0 && rows[k].context == R->context &&
                        rows[k].batch == B && strcmp(rows[k].kernel, f16_kernel) == 0)
                        R->vs_f16 = R->ms / rows[k].ms;
                char vs_sdpa[16] = "-";
                if (vi == 0 && R->sdpa_ms > 0)
                    snprintf(vs_sdpa, sizeof(vs_sdpa), "%.2f", R->ms / R->sdpa_ms);
                fprintf(out, "%-9s %-6s %8u %5u %7u %10.1f %9.1f %9.0f %8.2f %9s\n", v->name,
                        R->kernel, R->context, B, ppl, step_bytes / 1e6, R->ms * 1e3, R->gbps,
                        R->vs_f16, vs_sdpa);
                fflush(out);
                } // impl
            }
        }
    }

    // Goals (issue 8): INT4 pages <= 0.4x the FP16 time at 32k; FP16 pages <= 1.3x SDPA.
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "bench", "attend");
    cJSON_AddStringToObject(root, "device", prop.name);
    cJSON_AddNumberToObject(root, "driver", driver);
    cJSON_AddNumberToObject(root, "l2_bytes", (double)l2);
    cJSON *shape = cJSON_AddObjectToObject(root, "shape");
    cJSON_AddNumberToObject(shape, "n_heads", N_HEADS);
    cJSON_AddNumberToObject(shape, "n_kv_heads", N_KV);
    cJSON_AddNumberToObject(shape, "head_dim", HEAD_DIM);
    cJSON_AddNumberToObject(shape, "group", GROUP);
    cJSON_AddNumberToObject(shape, "page_bytes", page_bytes);
    cJSON_AddNumberToObject(root, "reps", reps);
    cJSON *arr = cJSON_AddArrayToObject(root, "results");
    for (int k = 0; k < n_rows; k++) {
        const row_t *R = &rows[k];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "pages", R->variant);
        cJSON_AddStringToObject(o, "kernel", R->kernel);
        cJSON_AddNumberToObject(o, "context", R->context);
        cJSON_AddNumberToObject(o, "batch", R->batch);
        cJSON_AddNumberToObject(o, "tokens_per_list", R->tokens_per_list);
        cJSON_AddNumberToObject(o, "pages_per_list", R->pages_per_list);
        cJSON_AddNumberToObject(o, "bytes_read", R->bytes);
        cJSON_AddNumberToObject(o, "ms", R->ms);
        cJSON_AddNumberToObject(o, "gbps", R->gbps);
        cJSON_AddNumberToObject(o, "vs_f16", R->vs_f16);
        if (strcmp(R->variant, "f16") == 0 && R->sdpa_ms > 0) {
            cJSON_AddNumberToObject(o, "sdpa_ms", R->sdpa_ms);
            cJSON_AddNumberToObject(o, "vs_sdpa", R->ms / R->sdpa_ms);
        }
        cJSON_AddItemToArray(arr, o);
    }
    // The wide kernel against mma, row by row (they ran back to back).
    for (int k = 0; k < n_rows; k++) {
        const row_t *W = &rows[k];
        if (strcmp(W->kernel, "wide") != 0)
            continue;
        for (int m = 0; m < n_rows; m++) {
            const row_t *M = &rows[m];
            if (strcmp(M->kernel, "mma") == 0 && strcmp(M->variant, W->variant) == 0 &&
                M->context == W->context && M->batch == W->batch && M->ms > 0)
                fprintf(out, "wide / mma  %-9s %8u %5u %8.3f\n", W->variant, W->context, W->batch,
                        W->ms / M->ms);
        }
    }
    cJSON *goals = cJSON_AddObjectToObject(root, "goals");
    for (int k = 0; k < n_rows; k++) {
        const row_t *R = &rows[k];
        char key[64];
        // The goals are the default kernel's; the wide kernel's figures follow as "_wide".
        const bool wide = strcmp(R->kernel, "wide") == 0;
        if (strcmp(R->kernel, "mma") != 0 && !wide)
            continue;
        const char *sfx = wide ? "_wide" : "", *tag = wide ? " (wide)" : "";
        if (strcmp(R->variant, "int4") == 0 && R->context == 32768) {
            snprintf(key, sizeof(key), "int4_vs_f16_32k_b%u%s", R->batch, sfx);
            cJSON_AddNumberToObject(goals, key, R->vs_f16);
            fprintf(out, "goal int4 <= 0.40x f16 at 32k, batch %u%s: %.2fx %s\n", R->batch, tag,
                    R->vs_f16, R->vs_f16 <= 0.4 ? "met" : "NOT met");
        }
        if (strcmp(R->variant, "f16") == 0 && R->sdpa_ms > 0) {
            snprintf(key, sizeof(key), "f16_vs_sdpa_%uk_b%u%s", R->context / 1024, R->batch, sfx);
            cJSON_AddNumberToObject(goals, key, R->ms / R->sdpa_ms);
            fprintf(out, "goal f16 pages <= 1.30x sdpa at %u, batch %u%s: %.2fx %s\n", R->context,
                    R->batch, tag, R->ms / R->sdpa_ms,
                    R->ms / R->sdpa_ms <= 1.3 ? "met" : "NOT met");
        }
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (text && (json || json_stdout)) {
        FILE *f = json_stdout ? stdout : fopen(json, "w");
        if (f == NULL) {
            fprintf(stderr, "attend: cannot write %s\n", json);
            free(text);
            goto fail;
        }
        fprintf(f, "%s\n", text);
        if (!json_stdout)
            fclose(f);
    }
    free(text);
    ret = 0;
fail:
    free(rows), free(times);
    kvc_pool_destroy(src_pool);
    if (ev0)
        cudaEventDestroy(ev0);
    if (ev1)
        cudaEventDestroy(ev1);
    cudaFree(d_pool), cudaFree(d_q), cudaFree(d_out), cudaFree(d_ws), cudaFree(d_ids),
        cudaFree(d_starts);
    free(h_ids), free(h_starts);
    cJSON_Delete(sdpa);
    return ret;
}

#else

int bench_attend_main(int argc, char **argv)
{
    (void)argc, (void)argv;
    fprintf(stderr, "attend: this ferry-bench was built without CUDA\n");
    return 2;
}

#endif
