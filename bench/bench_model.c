/*
 * bench_model.c: `ferry-bench model`: prefill tokens/s (512- and 2048-token prompts) and
 * decode tokens/s (batch 1 and 16, over a 128-token context per sequence) of the CPU model
 * runtime, side by side with transformers+torch on the same machine and thread count when a
 * Python with scripts/requirements-ref.txt is given (--torch PYTHON or FERRY_TORCH_PYTHON):
 * it runs scripts/gen-model-fixtures.py --bench and reads its JSON line. Each figure is the
 * best of three runs on both sides.
 *
 *   ferry-bench model [--model PATH] [--threads N] [--steps N] [--torch PYTHON] [--json FILE]
 *                     [--only prefill|decode]   (--only measures Ferry alone)
 *                     [--device cpu|cuda] [--synthetic llama3-8b]
 *
 * --device cuda runs the model on the GPU (each figure the median of GPU_REPEATS runs after a
 * warm-up; the calls are synchronous, so the wall clock times the GPU work) and also measures
 * how much of the layer hand-out to the KV encoder hides behind the next layer's compute: a
 * 512-token prefill with a callback that does nothing, the same with a callback that keeps the
 * host busy for one layer's compute time, and the overlap fraction
 * (t_plain + t_busy - t_with_busy) / min(t_plain, t_busy) (1 = fully hidden, 0 = serial).
 * It then times whole prefill requests as ferry-prefill --device cuda runs them: prompts of
 * 128, 512 and 2048 tokens whose every layer is encoded by the `ferry` policy at b = 0.25, with
 * the encoder made for the request, once with the codec on the host (host copies of each
 * layer, as --host-codec) and once on the GPU (the layer stays in device memory), beside the
 * same prefill without a codec, and the GPU encoder's creation and destruction alone
 * (--no-host-codec leaves out the host codec's runs, most of the benchmark's time).
 * --synthetic llama3-8b writes a random-weight Q4_0 GGUF shaped like Llama-3-8B (dim 4096,
 * 32 layers, 32 heads, 8 kv heads, ffn 14336, vocab 128256) into a temporary file with all
 * CPUs, loads it and deletes it; speed does not depend on the weight values.
 */
#include <cjson/cJSON.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvcodec_cuda.h"
#include "model.h"
#if FY_HAVE_CUDA
#include "kernels_cuda.h"
#endif

/* Each figure is the best of REPEATS runs: the machine is shared, and the best run is the one
 * least disturbed by others (the torch side does the same). */
enum { CONTEXT = 128, REPEATS = 3, GPU_REPEATS = 5, OVERLAP_TOKENS = 512, OVERLAP_WINDOW = 32 };

/* How the timed loops run: the CPU keeps its best-of-3 figures and picks greedy tokens in the
 * loop; the GPU takes the median and feeds tokens without a host argmax over the vocabulary
 * (128k logits per row would otherwise be timed as model work). */
typedef struct {
    bool gpu;
    int repeats;
} bench_mode_t;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of x[n] (sorts x). */
static double median_of(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(double), cmp_double);
    return x[n / 2];
}

/* Best (CPU) or median (GPU) of the rates r[n]. */
static double summarize(const bench_mode_t *mode, double *r, int n)
{
    if (mode->gpu)
        return median_of(r, n);
    qsort(r, (size_t)n, sizeof(double), cmp_double);
    return r[n - 1];
}


/* Re-executes this process with OPENBLAS_CORETYPE set when OpenBLAS chose slower kernels than
 * the CPU supports (see krn_gemm_better_coretype); returns only when nothing was done. */
static void tune_blas(int argc, char **argv, const char *sub)
{
    const char *core = getenv("OPENBLAS_CORETYPE") == NULL ? krn_gemm_better_coretype() : NULL;
    if (core == NULL || argc > 250)
        return;
    char *args[256];
    args[0] = (char *)"ferry-bench";
    args[1] = (char *)sub;
    for (int i = 1; i < argc; i++)
        args[i + 1] = argv[i];
    args[argc + 1] = NULL;
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", args);
    unsetenv("OPENBLAS_CORETYPE"); // exec failed: go on with what we have
}

static double now_s(void)
{
    return (double)fy_clock_ns() / 1e9;
}

static void rand_tokens(int32_t *t, int n, int n_vocab, uint64_t *seed)
{
    for (int i = 0; i < n; i++) {
        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = 100 + (int32_t)((*seed >> 33) % (uint64_t)(n_vocab - 100));
    }
}

static double bench_prefill(const bench_mode_t *mode, mdl_ctx_t *ctx, int n_vocab, int n)
{
    uint64_t seed = 1;
    int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
    float *logits = malloc(sizeof(float) * (size_t)n_vocab);
    rand_tokens(t, n, n_vocab, &seed);
    mdl_prefill(ctx, t, mode->gpu ? n : 16, NULL, logits); // warm-up
    double rates[GPU_REPEATS];
    for (int rep = 0; rep < mode->repeats; rep++) {
        double t0 = now_s();
        if (mdl_prefill(ctx, t, n, NULL, logits) != FY_OK)
            return -1;
        rates[rep] = n / (now_s() - t0);
    }
    double best = summarize(mode, rates, mode->repeats);
    free(t);
    free(logits);
    return best;
}

static double bench_decode(const bench_mode_t *mode, const mdl_model_t *m, mdl_ctx_t *ctx,
                           int batch, int steps)
{
    const mdl_config_t *c = mdl_model_config(m);
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.n_pages = batch * mdl_kv_pages_for(&kp, CONTEXT + mode->repeats * steps + 1);
    mdl_kv_t *kv;
    if (mdl_kv_create(&kp, &kv) != FY_OK)
        return -1;
    mdl_kv_seq_t **seqs = calloc((size_t)batch, sizeof(*seqs));
    int32_t *t = malloc(sizeof(int32_t) * CONTEXT), *next = malloc(sizeof(int32_t) * batch);
    float *logits = malloc(sizeof(float) * (size_t)batch * c->n_vocab);
    uint64_t seed = 7;
    for (int b = 0; b < batch; b++) {
        mdl_kv_seq_create(kv, &seqs[b]);
        rand_tokens(t, CONTEXT, c->n_vocab, &seed);
        mdl_prefill_params_t pp;
        mdl_prefill_params_default(&pp);
        pp.seq = seqs[b];
        mdl_prefill(ctx, t, CONTEXT, &pp, logits);
        next[b] = t[0];
    }
    mdl_decode(ctx, seqs, next, batch, logits); // warm-up
    double rates[GPU_REPEATS];
    for (int rep = 0; rep < mode->repeats; rep++) {
        double t0 = now_s();
        for (int s = 0; s < steps; s++) {
            for (int b = 0; b < batch; b++) {
                if (mode->gpu) {
                    next[b] = (next[b] + 1) % c->n_vocab;
                    continue;
                }
                const float *l = logits + (size_t)b * c->n_vocab;
                int32_t best = 0;
                for (int v = 1; v < c->n_vocab; v++)
                    best = l[v] > l[best] ? v : best;
                next[b] = best;
            }
            if (mdl_decode(ctx, seqs, next, batch, logits) != FY_OK)
                return -1;
        }
        rates[rep] = (double)batch * steps / (now_s() - t0);
    }
    double tps = summarize(mode, rates, mode->repeats);
    for (int b = 0; b < batch; b++)
        mdl_kv_seq_destroy(seqs[b]);
    mdl_kv_destroy(kv);
    free(seqs);
    free(t);
    free(next);
    free(logits);
    return tps;
}

/* ------------------------------------------------------------------------------------------ */
/* Layer hand-out overlap (GPU)                                                                 */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    double busy_s;   // host time each callback spends (a stand-in for encoding the layer)
    double checksum; // reads K so the callback touches what it was given
} overlap_cb_t;

static fy_status_t overlap_layer(void *arg, const mdl_layer_kv_t *kv)
{
    overlap_cb_t *o = arg;
    double end = now_s() + o->busy_s;
    size_t n = (size_t)kv->n_kv_heads * kv->n_tokens * kv->head_dim;
    for (size_t i = 0; i < n; i += 64)
        o->checksum += kv->k[i];
    while (now_s() < end) {
    }
    return FY_OK;
}

/* Median seconds of a prefill of n tokens with the callback (window OVERLAP_WINDOW). */
static double timed_prefill_cb(const bench_mode_t *mode, mdl_ctx_t *ctx, const int32_t *t,
                               int n, float *logits, overlap_cb_t *o)
{
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.on_layer = overlap_layer;
    pp.cb_arg = o;
    pp.window = OVERLAP_WINDOW;
    double secs[GPU_REPEATS];
    for (int rep = 0; rep < mode->repeats; rep++) {
        double t0 = now_s();
        if (mdl_prefill(ctx, t, n, &pp, logits) != FY_OK)
            return -1;
        secs[rep] = now_s() - t0;
    }
    return median_of(secs, mode->repeats);
}

/* Adds {"prefill_tokens", "plain_s", "busy_s", "with_busy_s", "overlap"} to out and prints a
 * line: how much of the per-layer host work hides behind the next layer's compute. */
static void bench_overlap(const bench_mode_t *mode, mdl_ctx_t *ctx, const mdl_config_t *c,
                          cJSON *out)
{
    int n = FY_MIN(OVERLAP_TOKENS, c->n_ctx_train);
    uint64_t seed = 3;
    int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
    float *logits = malloc(sizeof(float) * (size_t)c->n_vocab);
    rand_tokens(t, n, c->n_vocab, &seed);
    overlap_cb_t o = {.busy_s = 0};
    timed_prefill_cb(mode, ctx, t, n, logits, &o); // warm-up (window buffers, pinned copies)
    double plain = timed_prefill_cb(mode, ctx, t, n, logits, &o);
    o.busy_s = plain / c->n_layers; // as long as one layer takes on the GPU
    double busy = o.busy_s * c->n_layers;
    double with = timed_prefill_cb(mode, ctx, t, n, logits, &o);
    double hidden = plain + busy - with;
    double frac = hidden / FY_MIN(plain, busy);
    frac = frac < 0 ? 0 : (frac > 1 ? 1 : frac);
    if (plain > 0 && with > 0) {
        printf("layer hand-out overlap: %d-token prefill %.2f ms, host work %.2f ms (%.3f ms per "
               "layer), both %.2f ms: %.0f%% of the shorter hidden\n",
               n, plain * 1e3, busy * 1e3, o.busy_s * 1e3, with * 1e3, frac * 100);
        cJSON *j = cJSON_AddObjectToObject(out, "layer_overlap");
        cJSON_AddNumberToObject(j, "prefill_tokens", n);
        cJSON_AddNumberToObject(j, "plain_s", plain);
        cJSON_AddNumberToObject(j, "busy_s", busy);
        cJSON_AddNumberToObject(j, "with_busy_s", with);
        cJSON_AddNumberToObject(j, "overlap", frac);
    } else {
        fprintf(stderr, "ferry-bench model: the overlap measurement failed\n");
    }
    free(t);
    free(logits);
}

/* ------------------------------------------------------------------------------------------ */
/* A prefill request with its codec (GPU)                                                       */
/* ------------------------------------------------------------------------------------------ */

// Prompt lengths of the request benchmark: a short chat turn, a paragraph, a document.
static const int k_req_tokens[] = {128, 512, 2048};
#define REQ_BUDGET 0.25

typedef struct {
    const kvc_encoder_params_t *ep;
    enum { REQ_NO_CODEC, REQ_HOST_CODEC, REQ_GPU_CODEC } codec;
    kvc_encoder_t *enc;
    kvc_encoder_cuda_t *genc;
    uint16_t *k16, *v16; // host codec: the layer in FP16
    uint8_t *frame;
    size_t cap;
    uint64_t wire_bytes;
    int queued;   // GPU codec: layers queued, not yet delivered
    int n_layers; // the last one is delivered at once
} req_codec_t;

static fy_status_t req_layer(void *arg, const mdl_layer_kv_t *kv)
{
    req_codec_t *r = arg;
    kvc_layer_input_t in = {.layer = (uint32_t)kv->layer,
                            .head_stride = (size_t)kv->n_tokens * kv->head_dim,
                            .token_stride = (size_t)kv->head_dim,
                            .n_window = (uint32_t)kv->n_window};
    size_t len = 0;
    fy_status_t st;
    if (r->genc != NULL) {
        in.k = kv->k16_dev;
        in.v = kv->v16_dev;
        in.q_window = kv->n_window > 0 ? kv->q_window_dev : NULL;
        // As the prefill worker: this layer queued behind the previous one, which is
        // delivered while it runs; the last one at once.
        st = kvc_encoder_enqueue_layer_cuda_host(r->genc, &in, NULL, kv->stream);
        if (st == FY_OK)
            r->queued++;
        while (st == FY_OK && r->queued > (kv->layer == r->n_layers - 1 ? 0 : 1)) {
            st = kvc_encoder_finish_layer_cuda_host(r->genc, r->frame, r->cap, &len, NULL);
            r->queued--;
            r->wire_bytes += len;
            len = 0;
        }
    } else {
        size_t n = (size_t)kv->n_kv_heads * kv->n_tokens * kv->head_dim;
        fy_fp32_to_fp16_buf(r->k16, kv->k, n);
        fy_fp32_to_fp16_buf(r->v16, kv->v, n);
        in.k = r->k16;
        in.v = r->v16;
        in.q_window = kv->n_window > 0 ? kv->q_window : NULL;
        st = kvc_encoder_encode_layer(r->enc, &in, NULL, r->frame, r->cap, &len, NULL);
    }
    r->wire_bytes += len;
    return st;
}

/* One request: the encoder made for it, the prefill with every layer encoded, the encoder
 * freed (REQ_NO_CODEC: the prefill alone); seconds, or < 0 on failure. */
static double timed_request(mdl_ctx_t *ctx, const int32_t *t, int n, float *logits,
                            req_codec_t *r)
{
    double t0 = now_s();
    fy_status_t st = r->codec == REQ_GPU_CODEC    ? kvc_encoder_cuda_create(r->ep, &r->genc)
                     : r->codec == REQ_HOST_CODEC ? kvc_encoder_create(r->ep, &r->enc)
                                                  : FY_OK;
    if (st == FY_OK && r->codec == REQ_NO_CODEC) {
        st = mdl_prefill(ctx, t, n, NULL, logits);
    } else if (st == FY_OK) {
        r->wire_bytes = 0;
        r->queued = 0;
        mdl_prefill_params_t pp;
        mdl_prefill_params_default(&pp);
        pp.on_layer = req_layer;
        pp.cb_arg = r;
        pp.window = (int)r->ep->policy->window;
        pp.device_kv = r->codec == REQ_GPU_CODEC;
        st = mdl_prefill(ctx, t, n, &pp, logits);
    }
    kvc_encoder_cuda_destroy(r->genc);
    kvc_encoder_destroy(r->enc);
    r->genc = NULL;
    r->enc = NULL;
    if (st != FY_OK) {
        static const char *const codec[] = {"no", "host", "GPU"};
        fprintf(stderr, "ferry-bench model: prefill request (%s codec): %s\n", codec[r->codec],
                fy_status_str(st));
        return -1;
    }
    return now_s() - t0;
}

/* Median seconds of mode->repeats requests after a warm-up. */
static double median_request(const bench_mode_t *mode, mdl_ctx_t *ctx, const int32_t *t, int n,
                             float *logits, req_codec_t *r)
{
    double secs[GPU_REPEATS];
    if (timed_request(ctx, t, n, logits, r) < 0)
        return -1;
    for (int rep = 0; rep < mode->repeats; rep++)
        if ((secs[rep] = timed_request(ctx, t, n, logits, r)) < 0)
            return -1;
    return median_of(secs, mode->repeats);
}

/* Median seconds of a GPU encoder's creation and destruction for ep (what a request pays
 * before and after its layers), or < 0 on failure. */
static double median_setup(const bench_mode_t *mode, const kvc_encoder_params_t *ep)
{
    double secs[GPU_REPEATS];
    for (int rep = -1; rep < mode->repeats; rep++) {
        kvc_encoder_cuda_t *genc = NULL;
        double t0 = now_s();
        if (kvc_encoder_cuda_create(ep, &genc) != FY_OK)
            return -1;
        kvc_encoder_cuda_destroy(genc);
        if (rep >= 0)
            secs[rep] = now_s() - t0;
    }
    return median_of(secs, mode->repeats);
}

/* For each of k_req_tokens: a whole prefill request without a codec, with the host's and with
 * the GPU's (ferry, b = REQ_BUDGET, the encoder made per request as a worker does), and the GPU
 * encoder's setup alone; prints a line each and adds them as "prefill_requests" to out. */
static void bench_request(const bench_mode_t *mode, const mdl_model_t *m, mdl_ctx_t *ctx,
                          const mdl_config_t *c, bool host_codec, cJSON *out)
{
    cJSON *arr = cJSON_AddArrayToObject(out, "prefill_requests");
    int done = 0;
    for (size_t li = 0; li < FY_ARRAY_SIZE(k_req_tokens); li++) {
        int n = FY_MIN(k_req_tokens[li], c->n_ctx_train);
        if (n <= done)
            break;
        done = n;
        uint64_t seed = 5;
        int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
        float *logits = malloc(sizeof(float) * (size_t)c->n_vocab);
        size_t elems = (size_t)c->n_kv_heads * n * c->head_dim;
        kvc_policy_t pol;
        kvc_encoder_params_t ep;
        kvc_encoder_params_default(&ep);
        ep.policy = &pol;
        ep.budget = REQ_BUDGET;
        ep.n_layers = (uint32_t)c->n_layers;
        ep.n_heads = (uint32_t)c->n_heads;
        ep.n_kv_heads = (uint32_t)c->n_kv_heads;
        ep.head_dim = (uint32_t)c->head_dim;
        ep.n_tokens = (uint32_t)n;
        ep.model_fingerprint = mdl_model_fingerprint(m);
        ep.seq_id = 1;
        req_codec_t r = {.ep = &ep,
                         .n_layers = c->n_layers,
                         .k16 = malloc(elems * sizeof(uint16_t)),
                         .v16 = malloc(elems * sizeof(uint16_t))};
        kvc_encoder_t *probe = NULL;
        bool ok = t != NULL && logits != NULL && r.k16 != NULL && r.v16 != NULL &&
                  kvc_policy_builtin("ferry", &pol) == FY_OK &&
                  kvc_encoder_create(&ep, &probe) == FY_OK;
        if (ok) {
            r.cap = kvc_encoder_max_frame_bytes(probe);
            kvc_encoder_destroy(probe);
            ok = (r.frame = malloc(r.cap)) != NULL;
        }
        double plain = -1, host = -1, gpu = -1, setup = -1;
        uint64_t host_wire = 0;
        if (ok) {
            rand_tokens(t, n, c->n_vocab, &seed);
            r.codec = REQ_NO_CODEC;
            plain = median_request(mode, ctx, t, n, logits, &r);
            if (host_codec) {
                r.codec = REQ_HOST_CODEC;
                host = median_request(mode, ctx, t, n, logits, &r);
                host_wire = r.wire_bytes;
            }
            r.codec = REQ_GPU_CODEC;
            gpu = median_request(mode, ctx, t, n, logits, &r);
            setup = median_setup(mode, &ep);
        }
        if (plain < 0 || (host_codec && host < 0) || gpu < 0 || setup < 0) {
            fprintf(stderr, "ferry-bench model: prefill request of %d tokens failed\n", n);
        } else {
            double raw = (double)c->n_layers * 2 * (double)elems * sizeof(uint16_t);
            double ratio = (double)r.wire_bytes / raw, host_ratio = (double)host_wire / raw;
            if (host_codec)
                printf("prefill request, %d tokens, ferry b = %.3g: no codec %.2f ms, host codec "
                       "%.2f ms, GPU codec %.2f ms (%.2fx the host's; encoder setup %.2f ms); "
                       "wire/raw %.4f (host %.4f)\n",
                       n, REQ_BUDGET, plain * 1e3, host * 1e3, gpu * 1e3, gpu / host, setup * 1e3,
                       ratio, host_ratio);
            else
                printf("prefill request, %d tokens, ferry b = %.3g: no codec %.2f ms, GPU codec "
                       "%.2f ms (encoder setup %.2f ms); wire/raw %.4f\n",
                       n, REQ_BUDGET, plain * 1e3, gpu * 1e3, setup * 1e3, ratio);
            cJSON *j = cJSON_CreateObject();
            cJSON_AddNumberToObject(j, "prefill_tokens", n);
            cJSON_AddNumberToObject(j, "budget", REQ_BUDGET);
            cJSON_AddNumberToObject(j, "plain_s", plain);
            if (host_codec)
                cJSON_AddNumberToObject(j, "host_codec_s", host);
            cJSON_AddNumberToObject(j, "gpu_codec_s", gpu);
            cJSON_AddNumberToObject(j, "gpu_encoder_setup_s", setup);
            cJSON_AddNumberToObject(j, "wire_ratio", ratio);
            if (host_codec)
                cJSON_AddNumberToObject(j, "host_wire_ratio", host_ratio);
            cJSON_AddItemToArray(arr, j);
        }
        free(r.frame);
        free(r.k16);
        free(r.v16);
        free(t);
        free(logits);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* A random-weight GGUF shaped like Llama-3-8B                                                  */
/* ------------------------------------------------------------------------------------------ */

/* GGUF v3, written directly: the test writer builds tensors from FP32 arrays in memory, which
 * for 8B weights would take 32 GB; here every Q4_0 block is generated straight into the file
 * by all CPUs (xorshift nibbles, a fixed scale). */
typedef struct {
    char name[48];
    uint32_t type; // MDL_TENSOR_F32 or MDL_TENSOR_Q4_0
    uint64_t ne0, ne1;
    uint64_t offset; // in the data section
    uint64_t bytes;
} syn_tensor_t;

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} syn_buf_t;

static void sb_put(syn_buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = FY_MAX(b->cap * 2, b->len + n + 4096);
        uint8_t *nb = realloc(b->buf, cap);
        if (nb == NULL) {
            fprintf(stderr, "ferry-bench model: out of memory\n");
            exit(1);
        }
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, p, n);
    b->len += n;
}

static void sb_u32(syn_buf_t *b, uint32_t v)
{
    sb_put(b, &v, 4);
}

static void sb_u64(syn_buf_t *b, uint64_t v)
{
    sb_put(b, &v, 8);
}

static void sb_str(syn_buf_t *b, const char *s)
{
    sb_u64(b, strlen(s));
    sb_put(b, s, strlen(s));
}

static void kv_str(syn_buf_t *b, const char *k, const char *v)
{
    sb_str(b, k);
    sb_u32(b, MDL_GGUF_STRING);
    sb_str(b, v);
}

static void kv_u32(syn_buf_t *b, const char *k, uint32_t v)
{
    sb_str(b, k);
    sb_u32(b, MDL_GGUF_U32);
    sb_u32(b, v);
}

static void kv_f32(syn_buf_t *b, const char *k, float v)
{
    sb_str(b, k);
    sb_u32(b, MDL_GGUF_F32);
    sb_put(b, &v, 4);
}

typedef struct {
    int fd;
    uint64_t data_start;
    const syn_tensor_t *t;
    int n_tensors;
    uint64_t job_bytes; // Q4_0 bytes per job (a multiple of 18)
    uint64_t *job_first; // [n_tensors + 1] first job of each tensor
    int failed;
} syn_write_t;

enum { SYN_JOB_BLOCKS = 1 << 20 }; // 18 MB of Q4_0 per job

static void syn_write_range(void *arg, size_t begin, size_t end, int thread)
{
    syn_write_t *w = arg;
    uint8_t *buf = malloc((size_t)w->job_bytes);
    if (buf == NULL) {
        w->failed = 1;
        return;
    }
    for (size_t job = begin; job < end; job++) {
        int ti = 0;
        while (w->job_first[ti + 1] <= job)
            ti++;
        const syn_tensor_t *t = &w->t[ti];
        uint64_t off = (job - w->job_first[ti]) * w->job_bytes;
        size_t len = (size_t)FY_MIN(w->job_bytes, t->bytes - off);
        if (t->type == MDL_TENSOR_F32) {
            float one = 1.0f; // norm weights
            for (size_t i = 0; i + 4 <= len; i += 4)
                memcpy(buf + i, &one, 4);
        } else {
            uint64_t x = 0x9e3779b97f4a7c15ull ^ ((uint64_t)job * 0xbf58476d1ce4e5b9ull);
            uint16_t d = fy_fp32_to_fp16(0.005f); // weights in [-0.04, 0.035]
            for (size_t i = 0; i + 18 <= len; i += 18) {
                memcpy(buf + i, &d, 2);
                for (int h = 0; h < 2; h++) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    memcpy(buf + i + 2 + 8 * h, &x, 8);
                }
            }
        }
        uint64_t pos = w->data_start + t->offset + off;
        for (size_t done = 0; done < len;) {
            ssize_t r = pwrite(w->fd, buf + done, len - done, (off_t)(pos + done));
            if (r <= 0) {
                w->failed = 1;
                break;
            }
            done += (size_t)r;
        }
    }
    free(buf);
}

/* Writes the Llama-3-8B-shaped model to a new temporary file; returns its path (malloc'd) or
 * NULL. */
static char *write_llama3_8b(void)
{
    enum { DIM = 4096, LAYERS = 32, HEADS = 32, KV_HEADS = 8, FFN = 14336, VOCAB = 128256 };
    const uint64_t kv_dim = (uint64_t)DIM / HEADS * KV_HEADS;
    syn_tensor_t *t = calloc(3 + 9 * LAYERS, sizeof(*t));
    int nt = 0;
#define TENSOR(nm, ty, a, b) \
    (snprintf(t[nt].name, sizeof(t[nt].name), "%s", nm), t[nt].type = (ty), t[nt].ne0 = (a), \
     t[nt].ne1 = (b), nt++)
    TENSOR("token_embd.weight", MDL_TENSOR_Q4_0, DIM, VOCAB);
    TENSOR("output_norm.weight", MDL_TENSOR_F32, DIM, 1);
    TENSOR("output.weight", MDL_TENSOR_Q4_0, DIM, VOCAB);
    char nm[48];
    for (int l = 0; l < LAYERS; l++) {
#define LT(s, ty, a, b) (snprintf(nm, sizeof(nm), "blk.%d.%s", l, s), TENSOR(nm, ty, a, b))
        LT("attn_norm.weight", MDL_TENSOR_F32, DIM, 1);
        LT("attn_q.weight", MDL_TENSOR_Q4_0, DIM, DIM);
        LT("attn_k.weight", MDL_TENSOR_Q4_0, DIM, kv_dim);
        LT("attn_v.weight", MDL_TENSOR_Q4_0, DIM, kv_dim);
        LT("attn_output.weight", MDL_TENSOR_Q4_0, DIM, DIM);
        LT("ffn_norm.weight", MDL_TENSOR_F32, DIM, 1);
        LT("ffn_gate.weight", MDL_TENSOR_Q4_0, DIM, FFN);
        LT("ffn_up.weight", MDL_TENSOR_Q4_0, DIM, FFN);
        LT("ffn_down.weight", MDL_TENSOR_Q4_0, FFN, DIM);
#undef LT
    }
#undef TENSOR
    uint64_t data_bytes = 0;
    for (int i = 0; i < nt; i++) {
        uint64_t n = t[i].ne0 * t[i].ne1;
        t[i].bytes = t[i].type == MDL_TENSOR_F32 ? n * 4 : n / 32 * 18;
        t[i].offset = data_bytes;
        data_bytes = FY_ALIGN_UP(data_bytes + t[i].bytes, 32);
    }
    // Header, metadata (a 259-token SentencePiece vocabulary is enough for a tokenizer; ids
    // up to the embedding's 128256 rows are valid for the model), tensor infos.
    syn_buf_t h = {0};
    sb_u32(&h, 0x46554747u);
    sb_u32(&h, 3);
    sb_u64(&h, (uint64_t)nt);
    sb_u64(&h, 15);
    kv_str(&h, "general.architecture", "llama");
    kv_str(&h, "general.name", "ferry-synthetic-llama3-8b");
    kv_u32(&h, "llama.block_count", LAYERS);
    kv_u32(&h, "llama.context_length", 8192);
    kv_u32(&h, "llama.embedding_length", DIM);
    kv_u32(&h, "llama.feed_forward_length", FFN);
    kv_u32(&h, "llama.attention.head_count", HEADS);
    kv_u32(&h, "llama.attention.head_count_kv", KV_HEADS);
    kv_f32(&h, "llama.rope.freq_base", 500000.0f);
    kv_f32(&h, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    kv_str(&h, "tokenizer.ggml.model", "llama");
    sb_str(&h, "tokenizer.ggml.tokens");
    sb_u32(&h, MDL_GGUF_ARRAY);
    sb_u32(&h, MDL_GGUF_STRING);
    sb_u64(&h, 259);
    sb_str(&h, "<unk>");
    sb_str(&h, "<s>");
    sb_str(&h, "</s>");
    for (int b = 0; b < 256; b++) {
        char tok[8];
        snprintf(tok, sizeof(tok), "<0x%02X>", b);
        sb_str(&h, tok);
    }
    kv_u32(&h, "tokenizer.ggml.bos_token_id", 1);
    kv_u32(&h, "tokenizer.ggml.eos_token_id", 2);
    kv_u32(&h, "general.alignment", 32);
    for (int i = 0; i < nt; i++) {
        sb_str(&h, t[i].name);
        sb_u32(&h, 2);
        sb_u64(&h, t[i].ne0);
        sb_u64(&h, t[i].ne1);
        sb_u32(&h, t[i].type);
        sb_u64(&h, t[i].offset);
    }
    uint64_t data_start = FY_ALIGN_UP((uint64_t)h.len, 32);
    const char *dir = getenv("TMPDIR");
    char *path = malloc(4096);
    snprintf(path, 4096, "%s/ferry-llama3-8b-XXXXXX.gguf", dir != NULL && dir[0] ? dir : "/tmp");
    int fd = mkstemps(path, 5);
    bool ok = fd >= 0;
    if (ok) {
        static const uint8_t zero[32];
        ok = pwrite(fd, h.buf, h.len, 0) == (ssize_t)h.len &&
             (data_start == h.len ||
              pwrite(fd, zero, (size_t)(data_start - h.len), (off_t)h.len) ==
                  (ssize_t)(data_start - h.len)) &&
             ftruncate(fd, (off_t)(data_start + data_bytes)) == 0;
    }
    if (ok) {
        uint64_t *first = calloc((size_t)nt + 1, sizeof(uint64_t));
        syn_write_t w = {.fd = fd, .data_start = data_start, .t = t, .n_tensors = nt,
                         .job_bytes = (uint64_t)SYN_JOB_BLOCKS * 18, .job_first = first};
        for (int i = 0; i < nt; i++)
            first[i + 1] = first[i] + (t[i].bytes + w.job_bytes - 1) / w.job_bytes;
        fy_pool_t *pool = NULL;
        ok = first != NULL && fy_pool_create(0, &pool) == FY_OK;
        if (ok) {
            fy_pool_parallel_for(pool, (size_t)first[nt], 1, syn_write_range, &w);
            ok = !w.failed;
        }
        fy_pool_destroy(pool);
        free(first);
    }
    if (fd >= 0)
        close(fd);
    free(h.buf);
    free(t);
    if (!ok) {
        fprintf(stderr, "ferry-bench model: cannot write %s\n", path);
        if (fd >= 0)
            unlink(path);
        free(path);
        return NULL;
    }
    return path;
}

/* Runs the torch side; returns its parsed JSON or NULL. */
static cJSON *run_torch(const char *python, const char *model, int threads, int steps)
{
    const char *root = getenv("FERRY_SOURCE_ROOT");
    char cmd[8192];
    snprintf(cmd, sizeof(cmd),
             "'%s' '%s/scripts/gen-model-fixtures.py' --bench --model '%s' --threads %d "
             "--steps %d --context %d 2>/dev/null",
             python, root != NULL ? root : ".", model, threads, steps, CONTEXT);
    FILE *p = popen(cmd, "r");
    if (p == NULL)
        return NULL;
    char line[4096];
    cJSON *j = NULL;
    while (fgets(line, sizeof(line), p) != NULL) {
        if (line[0] == '{') {
            cJSON_Delete(j);
            j = cJSON_Parse(line);
        }
    }
    pclose(p);
    return j;
}

int bench_model_main(int argc, char **argv)
{
    tune_blas(argc, argv, "model");
    const char *model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    const char *json_path = NULL, *torch = getenv("FERRY_TORCH_PYTHON");
    const char *only = NULL, *synthetic = NULL;
    int threads = 0, steps = 0;
    bool host_codec = true; // the prefill requests also time the codec on the host
    mdl_device_t device = MDL_DEVICE_CPU;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model_path = argv[++i];
        else if (strcmp(argv[i], "--device") == 0 && i + 1 < argc &&
                 (strcmp(argv[i + 1], "cpu") == 0 || strcmp(argv[i + 1], "cuda") == 0))
            device = strcmp(argv[++i], "cuda") == 0 ? MDL_DEVICE_CUDA : MDL_DEVICE_CPU;
        else if (strcmp(argv[i], "--synthetic") == 0 && i + 1 < argc &&
                 strcmp(argv[i + 1], "llama3-8b") == 0)
            synthetic = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--torch") == 0 && i + 1 < argc)
            torch = argv[++i];
        else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc)
            json_path = argv[++i];
        else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc)
            only = argv[++i];
        else if (strcmp(argv[i], "--no-host-codec") == 0)
            host_codec = false;
        else {
            fprintf(stderr, "usage: ferry-bench model [--model PATH] [--threads N] [--steps N] "
                            "[--torch PYTHON] [--json FILE] [--only prefill|decode] "
                            "[--device cpu|cuda] [--synthetic llama3-8b] [--no-host-codec]\n");
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    const bench_mode_t mode = {.gpu = device == MDL_DEVICE_CUDA,
                               .repeats = device == MDL_DEVICE_CUDA ? GPU_REPEATS : REPEATS};
    if (steps < 1)
        steps = mode.gpu ? 64 : 16;
    double write_s = 0, load_s = 0;
    char *syn_path = NULL;
    if (synthetic != NULL) {
        double t0 = now_s();
        if ((syn_path = write_llama3_8b()) == NULL)
            return 1;
        write_s = now_s() - t0;
        model_path = syn_path;
        torch = NULL; // no torch counterpart for a synthetic file
    }
    if (mode.gpu)
        torch = NULL; // the torch side runs on the CPU
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = model_path;
    mp.device = device;
    mdl_model_t *m = NULL;
    double t_load = now_s();
    fy_status_t st = mdl_model_create(&mp, &m, err, sizeof(err));
    load_s = now_s() - t_load;
    if (syn_path != NULL)
        unlink(syn_path); // the weights were copied out of the file
    if (st != FY_OK) {
        fprintf(stderr, "ferry-bench model: %s (%s)\n", err, fy_status_str(st));
        free(syn_path);
        return 1;
    }
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = threads;
    cp.max_batch = 16;
    cp.device = device;
    mdl_ctx_t *ctx;
    if ((st = mdl_ctx_create(m, &cp, &ctx)) != FY_OK) {
        fprintf(stderr, "ferry-bench model: context: %s\n", fy_status_str(st));
        mdl_model_destroy(m);
        free(syn_path);
        return 1;
    }
    const mdl_config_t *c = mdl_model_config(m);
    struct {
        const char *name, *torch_key;
        double ferry, torch;
    } rows[] = {{"prefill 512 (tok/s)", "prefill_512_tok_s", 0, 0},
                {"prefill 2048 (tok/s)", "prefill_2048_tok_s", 0, 0},
                {"decode b1 (tok/s)", "decode_b1_tok_s", 0, 0},
                {"decode b16 (tok/s)", "decode_b16_tok_s", 0, 0}};
    bool do_prefill = only == NULL || strcmp(only, "prefill") == 0;
    bool do_decode = only == NULL || strcmp(only, "decode") == 0;
    if (do_prefill) {
        rows[0].ferry = bench_prefill(&mode, ctx, c->n_vocab, 512);
        rows[1].ferry = bench_prefill(&mode, ctx, c->n_vocab, 2048);
    }
    if (do_decode) {
        rows[2].ferry = bench_decode(&mode, m, ctx, 1, steps);
        rows[3].ferry = bench_decode(&mode, m, ctx, 16, steps);
    }
    int used_threads = threads > 0 ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    cJSON *tj = torch != NULL && only == NULL ? run_torch(torch, model_path, used_threads, steps)
                                              : NULL;
    const char *shown = synthetic != NULL ? "llama3-8b (synthetic, Q4_0 random weights)"
                                          : model_path;
    if (mode.gpu)
        printf("model %s on the GPU (median of %d), decode over a %d-token context, %d steps\n",
               shown, mode.repeats, CONTEXT, steps);
    else
        printf("model %s, %d threads, decode over a %d-token context, %d steps\n", shown,
               used_threads, CONTEXT, steps);
    if (synthetic != NULL)
        printf("wrote the %s GGUF in %.1f s, loaded it in %.1f s\n", synthetic, write_s, load_s);
    else
        printf("loaded in %.2f s\n", load_s);
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "model", shown);
    cJSON_AddStringToObject(out, "device", mode.gpu ? "cuda" : "cpu");
#if FY_HAVE_CUDA
    if (mode.gpu) // which prefill attention kernel ran (the layers here ask for no window scores)
        cJSON_AddStringToObject(out, "prefill_attention",
                                krn_attention_cuda_kernel(c->head_dim, 0));
#endif
    cJSON_AddNumberToObject(out, "load_s", load_s);
    if (synthetic != NULL)
        cJSON_AddNumberToObject(out, "write_s", write_s);
    if (mode.gpu && do_prefill) {
        bench_overlap(&mode, ctx, c, out);
        bench_request(&mode, m, ctx, c, host_codec, out);
    }
    printf("%-22s %12s %12s %8s\n", "", "ferry", "torch", "ratio");
    cJSON_AddNumberToObject(out, "threads", used_threads);
    cJSON_AddNumberToObject(out, "decode_context", CONTEXT);
    cJSON_AddNumberToObject(out, "decode_steps", steps);
    int rc = 0;
    for (size_t i = 0; i < FY_ARRAY_SIZE(rows); i++) {
        if (rows[i].ferry == 0.0)
            continue; // not measured (--only)
        if (rows[i].ferry < 0) {
            fprintf(stderr, "ferry-bench model: %s failed\n", rows[i].name);
            rc = 1;
            continue;
        }
        const cJSON *tv = tj != NULL ? cJSON_GetObjectItem(tj, rows[i].torch_key) : NULL;
        rows[i].torch = cJSON_IsNumber(tv) ? tv->valuedouble : 0.0;
        if (rows[i].torch > 0)
            printf("%-22s %12.1f %12.1f %7.2fx\n", rows[i].name, rows[i].ferry, rows[i].torch,
                   rows[i].ferry / rows[i].torch);
        else
            printf("%-22s %12.1f %12s %8s\n", rows[i].name, rows[i].ferry, "-", "-");
        cJSON *r = cJSON_AddObjectToObject(out, rows[i].torch_key);
        cJSON_AddNumberToObject(r, "ferry", rows[i].ferry);
        if (rows[i].torch > 0) {
            cJSON_AddNumberToObject(r, "torch", rows[i].torch);
            cJSON_AddNumberToObject(r, "ratio", rows[i].ferry / rows[i].torch);
        }
    }
    if (tj == NULL && torch != NULL)
        fprintf(stderr, "ferry-bench model: the torch run gave no result\n");
    if (json_path != NULL) {
        char *s = cJSON_Print(out);
        FILE *f = fopen(json_path, "w");
        if (f != NULL) {
            fprintf(f, "%s\n", s);
            fclose(f);
        }
        free(s);
    }
    cJSON_Delete(out);
    cJSON_Delete(tj);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(m);
    free(syn_path);
    return rc;
}
