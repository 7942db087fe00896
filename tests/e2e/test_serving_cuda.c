// The serving path on one GPU: ferry-router, ferry-prefill --device cuda and ferry-decode
// --device cuda as child processes (UCX over loopback TCP), clients through the SDK.
//
// - Greedy output at policy fp16 through router -> prefill (GPU) -> UCX -> decode (GPU, pages
//   in a kvc_gpu_pool_t, mdl_decode_kvc_cuda) equals a local greedy run on the GPU (what
//   `ferry generate --local --device cuda` does: mdl_prefill + mdl_decode over a CUDA mdl_kv
//   pool), three prompts at once so the decode worker batches them. The two paths attend with
//   different kernels, so a divergence is accepted only where the local run itself sees a near
//   tie (logit gap <= tol); the failure message names the prompt, step, both tokens and the
//   local logits.
// - `ferry` at b = 0.25 (mixed options on the GPU pages) completes with wire bytes <= b x raw.
// - Afterwards the decode worker has every page back.
//
// The model: $FERRY_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf when present, else a tiny
// random GGUF written here (the offline GPU bundle does not carry the real model), with token-id
// prompts. Exits 77 without a GPU. FERRY_SERVING_DEVICE=cpu runs the same checks with every
// daemon and the reference on the CPU (a check of the test itself on a machine without one).
#include <math.h>
#include <pthread.h>

#include "daemon_util.h"
#include "ferry_client.h"
#include "gguf_writer.h"
#include "model.h"
#include "test_util.h"

enum { N_PROMPTS = 3, MAX_NEW = 24 };

static struct {
    const char *device; // "cuda" (or "cpu", see above)
    const char *model_path;
    bool tiny;
    mdl_model_t *model; // CUDA
    const mdl_config_t *cfg;
    mdl_ctx_t *ctx;
    du_proc_t router, prefill, decode;
    char router_addr[32];
    int32_t stops[2];
    int n_stops;
} G;

static int bad; // failed TU_CHECKs

/* ---- the local reference on the GPU -------------------------------------------------------- */

typedef struct {
    int32_t prompt[512];
    size_t n_prompt;
    int32_t tok[MAX_NEW];
    size_t n_tok;   // tokens before a stop token or max_tokens
    float *logits;  // [n_tok + 1][n_vocab]: the distribution each pick came from
} ref_t;

static bool is_stop(int32_t id)
{
    for (int i = 0; i < G.n_stops; i++)
        if (G.stops[i] == id)
            return true;
    return false;
}

static int32_t argmax(const float *l, int n)
{
    int32_t best = 0;
    for (int v = 1; v < n; v++)
        best = l[v] > l[best] ? v : best;
    return best;
}

/* Greedy continuation as `ferry generate --local --device cuda --temperature 0` runs it. */
static fy_status_t local_greedy(ref_t *r)
{
    int V = G.cfg->n_vocab;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, G.model); // a CUDA pool for a CUDA model
    kp.n_pages = mdl_kv_pages_for(&kp, (int64_t)r->n_prompt + MAX_NEW + 1);
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seq = NULL;
    r->logits = malloc((size_t)(MAX_NEW + 1) * V * sizeof(float));
    fy_status_t st = mdl_kv_create(&kp, &kv);
    if (st == FY_OK)
        st = mdl_kv_seq_create(kv, &seq);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = seq;
    if (st == FY_OK)
        st = mdl_prefill(G.ctx, r->prompt, (int)r->n_prompt, &pp, r->logits);
    r->n_tok = 0;
    for (int i = 0; i < MAX_NEW && st == FY_OK; i++) {
        int32_t best = argmax(r->logits + (size_t)i * V, V);
        if (is_stop(best))
            break;
        r->tok[r->n_tok++] = best;
        if (i + 1 == MAX_NEW)
            break;
        st = mdl_decode(G.ctx, &seq, &best, 1, r->logits + (size_t)(i + 1) * V);
    }
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    return st;
}

/* ---- generation through the router --------------------------------------------------------- */

typedef struct {
    const ref_t *ref;
    const char *policy;
    float budget;
    int code;
    char message[320];
    uint32_t ids[256];
    size_t n_ids;
    Ferry__V1__RequestStats stats;
    bool have_stats;
} gen_t;

static int on_chunk(void *arg, const Ferry__V1__GenerateResponse *m)
{
    gen_t *g = arg;
    for (size_t i = 0; i < m->n_token_ids && g->n_ids < FY_ARRAY_SIZE(g->ids); i++)
        g->ids[g->n_ids++] = m->token_ids[i];
    if (m->stats != NULL) {
        g->stats = *m->stats;
        g->stats.prefill_worker = g->stats.decode_worker = g->stats.policy = NULL;
        g->have_stats = true;
    }
    return 0;
}

/* One Generate call of the prompt's token ids on a client of its own (runs on any thread). */
static void *generate(void *arg)
{
    gen_t *g = arg;
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router_addr;
    p.timeout_ms = 60000;
    ferry_client_t *c = NULL;
    if (ferry_client_create(&p, &c) != 0) {
        g->code = -1;
        snprintf(g->message, sizeof(g->message), "client");
        return NULL;
    }
    Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
    Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
    Ferry__V1__CodecParams codec = FERRY__V1__CODEC_PARAMS__INIT;
    Ferry__V1__TokenIds tids = FERRY__V1__TOKEN_IDS__INIT;
    uint32_t ids[512];
    for (size_t i = 0; i < g->ref->n_prompt; i++)
        ids[i] = (uint32_t)g->ref->prompt[i];
    tids.ids = ids;
    tids.n_ids = g->ref->n_prompt;
    req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS;
    req.prompt_token_ids = &tids;
    s.temperature = 0;
    s.max_tokens = MAX_NEW;
    req.sampling = &s;
    codec.policy = (char *)g->policy;
    codec.budget = g->budget;
    req.codec = &codec;
    req.return_token_ids = true;
    ferry_error_t err;
    g->code = ferry_generate(c, &req, on_chunk, g, &err);
    if (g->code != 0)
        snprintf(g->message, sizeof(g->message), "%s: %s", ferry_code_name(g->code),
                 err.message);
    ferry_client_destroy(c);
    return NULL;
}

/* The served tokens against the local run: equal, or diverging only at a near tie. */
static void compare(int i, const gen_t *g, const ref_t *r)
{
    int V = G.cfg->n_vocab;
    size_t n = g->n_ids < r->n_tok ? g->n_ids : r->n_tok, at = n;
    for (size_t k = 0; k < n && at == n; k++)
        at = g->ids[k] != (uint32_t)r->tok[k] ? k : at;
    if (at == n && g->n_ids == r->n_tok) {
        printf("ok   prompt %d (%zu tokens): %zu greedy tokens equal to the local run\n", i,
               r->n_prompt, n);
        return;
    }
    // Step `at` is where they part: a token each, or one side stopped (a stop token's pick).
    const float *l = r->logits + at * (size_t)V;
    float mx = 0;
    for (int v = 0; v < V; v++)
        mx = fmaxf(mx, fabsf(l[v]));
    float tol = 0.01f * mx + 0.05f;
    int32_t want = at < r->n_tok ? r->tok[at] : argmax(l, V);
    int32_t got = -1;
    if (at < g->n_ids) {
        got = (int32_t)g->ids[at];
    } else { // the server stopped: its pick was the stop token closest to the top
        for (int s = 0; s < G.n_stops; s++)
            if (G.stops[s] >= 0 && (got < 0 || l[G.stops[s]] > l[got]))
                got = G.stops[s];
    }
    bool in_range = got >= 0 && got < V;
    float gap = in_range ? l[want] - l[got] : INFINITY;
    bool tie = gap <= tol;
    printf("%s prompt %d: tokens equal for %zu steps, then local %d (logit %.4f) vs served %d "
           "(local logit %.4f): gap %.4g, near-tie tol %.4g; served %zu tokens, local %zu\n",
           tie ? "note" : "FAIL", i, at, want, l[want], got, in_range ? l[got] : NAN, gap, tol,
           g->n_ids, r->n_tok);
    if (!tie) {
        printf("  local :");
        for (size_t k = 0; k < r->n_tok; k++)
            printf(" %d", r->tok[k]);
        printf("\n  served:");
        for (size_t k = 0; k < g->n_ids; k++)
            printf(" %u", g->ids[k]);
        printf("\n");
        bad++;
    }
}

/* ---- set-up -------------------------------------------------------------------------------- */

static bool router_serving(uint32_t timeout_ms)
{
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router_addr;
    ferry_client_t *c = NULL;
    if (ferry_client_create(&p, &c) != 0)
        return false;
    bool ok = false;
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    while (!ok && fy_clock_ns() < end) {
        Ferry__V1__HealthResponse *h = NULL;
        ferry_error_t err;
        if (ferry_health(c, NULL, &h, &err) == 0) {
            ok = h->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
            ferry_message_free(h);
        }
        if (!ok)
            fy_sleep_ns(100 * 1000000ull);
    }
    ferry_client_destroy(c);
    return ok;
}

static void dump_logs(void)
{
    du_dump_log(&G.router);
    du_dump_log(&G.prefill);
    du_dump_log(&G.decode);
}

/* Router, then decode and prefill on the GPU; false (logs printed) when they do not come up. */
static bool start_cluster(void)
{
    const char *rargs[] = {"--model", G.model_path, "--log-level", "warn", NULL};
    if (du_start(&G.router, "router-gpu", "router/ferry-router", rargs, 60000) != FY_OK)
        return false;
    snprintf(G.router_addr, sizeof(G.router_addr), "127.0.0.1:%d", G.router.port);
    char listen[32], kv[32];
    int port = du_free_port(), kv_port = du_free_port();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    snprintf(kv, sizeof(kv), "127.0.0.1:%d", kv_port);
    const char *dargs[] = {"--model", G.model_path, "--device", G.device, "--listen", listen,
                           "--kv-listen", kv, "--router", G.router_addr, "--kv-memory", "256M",
                           "--page-bytes", "8K", "--log-level", "info", NULL};
    if (du_start_ex(&G.decode, "decode-gpu", "decode/ferry-decode", dargs, false, 0) != FY_OK)
        return false;
    G.decode.port = port;
    const char *pargs[] = {"--model", G.model_path, "--device", G.device, "--router",
                           G.router_addr, "--log-level", "info", NULL};
    if (du_start(&G.prefill, "prefill-gpu", "prefill/ferry-prefill", pargs, 60000) != FY_OK)
        return false;
    return router_serving(60000);
}

/* The model file: the real one when present, else a tiny random one (written to tiny_path). */
static const char *pick_model(char *tiny_path, size_t len)
{
    const char *env = getenv("FERRY_MODEL");
    static char real[4096];
    if (env != NULL && env[0] != '\0')
        snprintf(real, sizeof(real), "%s", env);
    else
        snprintf(real, sizeof(real), "%s/%s", du_source_root(), DU_MODEL_REL);
    if (access(real, R_OK) == 0)
        return real;
    printf("note: %s is not here; using a tiny random model\n", real);
    mdlt_tiny_params_t tp;
    mdlt_tiny_params_default(&tp);
    tp.dim = 256; // head_dim 64: the tensor-core page attention
    tp.n_heads = 4;
    tp.n_kv_heads = 2;
    tp.n_layers = 4;
    tp.ffn_dim = 512;
    tp.n_ctx = 1024;
    tp.seed = 31;
    G.tiny = true;
    return mdlt_tiny_model_temp(&tp, tiny_path, len) == 0 ? tiny_path : NULL;
}

static void make_prompts(ref_t *refs)
{
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    static const char *const texts[N_PROMPTS] = {
        "The capital of France is",
        "Here is a short poem about the sea:\n",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    };
    uint64_t seed = 77;
    for (int i = 0; i < N_PROMPTS; i++) {
        ref_t *r = &refs[i];
        if (G.tiny) { // random ids of a few lengths, past the codec's recent window
            r->n_prompt = (size_t)(90 + 37 * i);
            for (size_t t = 0; t < r->n_prompt; t++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                r->prompt[t] = 3 + (int32_t)((seed >> 33) % (uint64_t)(G.cfg->n_vocab - 3));
            }
            continue;
        }
        size_t off = 0, n = 0;
        if (mdl_tokenizer_add_bos(tok) && mdl_tokenizer_bos(tok) >= 0)
            r->prompt[off++] = mdl_tokenizer_bos(tok);
        mdl_tokenizer_encode(tok, texts[i], strlen(texts[i]), false, r->prompt + off,
                             FY_ARRAY_SIZE(r->prompt) - off, &n);
        r->n_prompt = off + n;
    }
}

int main(void)
{
    const char *dev = getenv("FERRY_SERVING_DEVICE");
    G.device = dev != NULL && strcmp(dev, "cpu") == 0 ? "cpu" : "cuda";
    mdl_device_t device = MDL_DEVICE_CUDA;
    mdl_device_parse(G.device, &device);
    if (device == MDL_DEVICE_CUDA && fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    // KV over loopback TCP, whatever transports this node's UCX has.
    setenv("UCX_TLS", "tcp", 0);
    setenv("UCX_NET_DEVICES", "lo", 0);
    char tiny_path[64] = "";
    G.model_path = pick_model(tiny_path, sizeof(tiny_path));
    if (G.model_path == NULL) {
        printf("FAIL: cannot write the tiny model\n");
        return 1;
    }
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = G.model_path;
    mp.device = device;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.device = device;
    cp.max_batch = 1;
    fy_status_t st = mdl_model_create(&mp, &G.model, err, sizeof(err));
    if (st == FY_OK)
        st = mdl_ctx_create(G.model, &cp, &G.ctx);
    if (st != FY_OK) {
        printf("FAIL: the model on %s: %s (%s)\n", G.device, fy_status_str(st), err);
        return 1;
    }
    G.cfg = mdl_model_config(G.model);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    G.stops[G.n_stops++] = mdl_tokenizer_eos(tok);
    int32_t im_end = mdl_tokenizer_find(tok, "<|im_end|>");
    if (im_end >= 0 && im_end != G.stops[0])
        G.stops[G.n_stops++] = im_end;

    static ref_t refs[N_PROMPTS];
    make_prompts(refs);
    for (int i = 0; i < N_PROMPTS; i++) {
        if ((st = local_greedy(&refs[i])) != FY_OK) {
            printf("FAIL: local greedy run %d: %s\n", i, fy_status_str(st));
            return 1;
        }
    }
    uint64_t t0 = fy_clock_ns();
    if (!start_cluster()) {
        printf("FAIL: the cluster did not come up\n");
        dump_logs();
        du_kill(&G.router), du_kill(&G.prefill), du_kill(&G.decode);
        return 1;
    }
    printf("cluster up on %s in %.1f s (%s)\n", G.device, (fy_clock_ns() - t0) / 1e9,
           G.tiny ? "tiny model" : G.model_path);
    double total = du_metric(G.decode.port, "ferry_decode_total_pages");

    // fp16, three prompts at once: the decode worker batches them on the GPU.
    static gen_t gens[N_PROMPTS];
    pthread_t th[N_PROMPTS];
    for (int i = 0; i < N_PROMPTS; i++) {
        gens[i] = (gen_t){.ref = &refs[i], .policy = "fp16", .budget = 0};
        pthread_create(&th[i], NULL, generate, &gens[i]);
    }
    for (int i = 0; i < N_PROMPTS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < N_PROMPTS; i++) {
        TU_CHECK(gens[i].code == 0, "fp16 prompt %d: %s", i, gens[i].message);
        if (gens[i].code == 0)
            compare(i, &gens[i], &refs[i]);
    }

    // ferry at b = 0.25: mixed options placed and attended on the GPU.
    // The prompt repeated to 300 tokens: the sinks and the recent window (FP16) are then a
    // small part of the budget.
    ref_t longer = refs[N_PROMPTS - 1];
    size_t base = longer.n_prompt;
    for (size_t t = base; t < 300; t++)
        longer.prompt[t] = longer.prompt[t % base];
    longer.n_prompt = 300;
    gen_t fg = {.ref = &longer, .policy = "ferry", .budget = 0.25f};
    generate(&fg);
    TU_CHECK(fg.code == 0, "ferry b=0.25: %s", fg.message);
    if (fg.code == 0) {
        double ratio = fg.have_stats && fg.stats.kv_raw_bytes > 0
                           ? (double)fg.stats.kv_wire_bytes / (double)fg.stats.kv_raw_bytes
                           : -1;
        printf("%s ferry b=0.25: %zu prompt tokens, %zu tokens out, wire/raw %.4f\n",
               fg.n_ids >= 1 && ratio > 0 && ratio <= 0.25 * 1.01 ? "ok  " : "FAIL",
               longer.n_prompt, fg.n_ids, ratio);
        TU_CHECK(fg.n_ids >= 1, "ferry b=0.25: no tokens");
        TU_CHECK(ratio > 0 && ratio <= 0.25 * 1.01, "ferry b=0.25: wire/raw %.4f", ratio);
    }

    // Every page back.
    double free_pages = -1;
    for (int i = 0; i < 100 && free_pages != total; i++) {
        free_pages = du_metric(G.decode.port, "ferry_decode_free_pages");
        if (free_pages != total)
            fy_sleep_ns(50 * 1000000ull);
    }
    TU_CHECK(total > 0 && free_pages == total, "decode pages: %.0f free of %.0f after the requests",
          free_pages, total);
    if (bad)
        dump_logs();
    du_stop(&G.router, 5000), du_stop(&G.prefill, 10000), du_stop(&G.decode, 10000);
    for (int i = 0; i < N_PROMPTS; i++)
        free(refs[i].logits);
    mdl_ctx_destroy(G.ctx);
    mdl_model_destroy(G.model);
    if (tiny_path[0])
        unlink(tiny_path);
    printf("%s: %d failed checks\n", bad ? "FAIL" : "PASS", bad);
    return bad ? 1 : 0;
}
