// The forward pass on the GPU (MDL_DEVICE_CUDA) against the CPU path, end to end.
//
// 1. Tiny random models (llama and qwen2 layouts; F32, Q8_0, Q4_0, Q4_1 weights; tied and
//    untied output; GQA), always available.
// 2. The real model (models/SmolLM2-135M-Instruct.Q4_1.gguf, or $FERRY_MODEL): it must be
//    there (a missing model fails the test).
// For each model: three prompts are prefilled (with a layer callback and a window) and then
// decoded greedily as one batch, on both devices. Greedy tokens must be equal; where FP16
// rounding makes them diverge, the test says where, and checks that it is a near tie on the
// CPU (the CPU's logit of the GPU's pick within 2 * tol of its top logit). Logits are compared
// at every step up to the divergence: |gpu - cpu| <= tol = rel * max|cpu logit| + abs.
// The layer callback must deliver layers in order, with K, V and window queries within the
// same relative tolerance of the CPU's, and window scores equal (1e-4) to their definition
// recomputed in double from the delivered K and window queries. A CUDA KV pool filled with
// mdl_kv_seq_load_layer from the CPU's K/V must decode the CPU's next logits, and the model
// fingerprint must not depend on the device.
// Exits 77 without a GPU.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"

enum { MAX_PROMPTS = 3, WINDOW = 8 };

typedef struct {
    int n_layers_seen;
    bool order_ok;
    float **k, **v, **qw, **wa; // [layer] copies (prompt 0 only)
    int n, n_window;
} capture_t;

typedef struct {
    int steps;
    int32_t *tok;  // [n_prompts][steps]
    float *logits; // [n_prompts][steps][n_vocab]
    capture_t cap;
    float *kv_k, *kv_v; // last layer, kv head 0, read back from the cache after prefill
} run_t;

static float *dup_f(const float *src, size_t n)
{
    float *d = malloc(n * sizeof(float) + 1);
    if (d != NULL && src != NULL)
        memcpy(d, src, n * sizeof(float));
    return d;
}

static fy_status_t on_layer(void *arg, const mdl_layer_kv_t *kv)
{
    capture_t *c = arg;
    if (kv->layer != c->n_layers_seen)
        c->order_ok = false;
    c->n_layers_seen++;
    size_t nkv = (size_t)kv->n_kv_heads * kv->n_tokens * kv->head_dim;
    c->n = kv->n_tokens;
    c->n_window = kv->n_window;
    c->k[kv->layer] = dup_f(kv->k, nkv);
    c->v[kv->layer] = dup_f(kv->v, nkv);
    c->qw[kv->layer] = dup_f(kv->q_window, (size_t)kv->n_heads * kv->n_window * kv->head_dim);
    c->wa[kv->layer] = kv->window_attn != NULL
                           ? dup_f(kv->window_attn, (size_t)kv->n_heads * kv->n_tokens)
                           : NULL;
    return FY_OK;
}

static int32_t argmax(const float *l, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        best = l[i] > l[best] ? i : best;
    return best;
}

static void run_free(run_t *r, int n_layers)
{
    for (int l = 0; l < n_layers && r->cap.k != NULL; l++) {
        free(r->cap.k[l]);
        free(r->cap.v[l]);
        free(r->cap.qw[l]);
        free(r->cap.wa[l]);
    }
    free(r->cap.k), free(r->cap.v), free(r->cap.qw), free(r->cap.wa);
    free(r->tok), free(r->logits), free(r->kv_k), free(r->kv_v);
}

/* Greedy generation of `steps` tokens for each prompt on one device. 0 on success. */
static int generate(const mdl_model_t *m, mdl_device_t dev, const int32_t *const *prompts,
                    const int *lens, int n_prompts, int steps, run_t *r)
{
    const mdl_config_t *c = mdl_model_config(m);
    int V = c->n_vocab, L = c->n_layers;
    memset(r, 0, sizeof(*r));
    r->steps = steps;
    r->tok = calloc((size_t)n_prompts * steps, sizeof(int32_t));
    r->logits = malloc((size_t)n_prompts * steps * V * sizeof(float));
    r->cap.k = calloc((size_t)L, sizeof(float *));
    r->cap.v = calloc((size_t)L, sizeof(float *));
    r->cap.qw = calloc((size_t)L, sizeof(float *));
    r->cap.wa = calloc((size_t)L, sizeof(float *));
    r->cap.order_ok = true;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.device = dev;
    cp.n_threads = 2;
    cp.max_batch = MAX_PROMPTS;
    mdl_ctx_t *ctx = NULL;
    fy_status_t st = mdl_ctx_create(m, &cp, &ctx);
    if (st != FY_OK) {
        fprintf(stderr, "ctx create (%s): %s\n", dev ? "cuda" : "cpu", fy_status_str(st));
        return 1;
    }
    int max_len = 0;
    for (int i = 0; i < n_prompts; i++)
        max_len = lens[i] > max_len ? lens[i] : max_len;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.page_tokens = 16;
    kp.n_pages = n_prompts * mdl_kv_pages_for(&kp, max_len + steps + 1);
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seqs[MAX_PROMPTS] = {0};
    int rc = 1;
    if ((st = mdl_kv_create(&kp, &kv)) != FY_OK)
        goto out;
    for (int i = 0; i < n_prompts; i++) {
        if ((st = mdl_kv_seq_create(kv, &seqs[i])) != FY_OK)
            goto out;
        mdl_prefill_params_t pp;
        mdl_prefill_params_default(&pp);
        pp.seq = seqs[i];
        pp.window = WINDOW;
        pp.window_attn = true;
        if (i == 0) {
            pp.on_layer = on_layer;
            pp.cb_arg = &r->cap;
        }
        if ((st = mdl_prefill(ctx, prompts[i], lens[i], &pp, r->logits + (size_t)i * steps * V)) !=
            FY_OK)
            goto out;
        r->tok[(size_t)i * steps] = argmax(r->logits + (size_t)i * steps * V, V);
        if (i == 0) {
            size_t n = (size_t)lens[0] * c->head_dim;
            r->kv_k = malloc(n * sizeof(float));
            r->kv_v = malloc(n * sizeof(float));
            if ((st = mdl_kv_seq_read(seqs[0], L - 1, 0, r->kv_k, r->kv_v)) != FY_OK)
                goto out;
        }
    }
    float *lg = malloc((size_t)n_prompts * V * sizeof(float));
    int32_t next[MAX_PROMPTS];
    for (int s = 1; s < steps; s++) {
        for (int i = 0; i < n_prompts; i++)
            next[i] = r->tok[(size_t)i * steps + s - 1];
        if ((st = mdl_decode(ctx, seqs, next, n_prompts, lg)) != FY_OK) {
            free(lg);
            goto out;
        }
        for (int i = 0; i < n_prompts; i++) {
            memcpy(r->logits + ((size_t)i * steps + s) * V, lg + (size_t)i * V,
                   (size_t)V * sizeof(float));
            r->tok[(size_t)i * steps + s] = argmax(lg + (size_t)i * V, V);
        }
    }
    free(lg);
    rc = 0;
out:
    if (rc != 0)
        fprintf(stderr, "generate on %s failed: %s\n", dev ? "cuda" : "cpu", fy_status_str(st));
    for (int i = 0; i < n_prompts; i++)
        mdl_kv_seq_destroy(seqs[i]);
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    return rc;
}

static float max_abs(const float *a, size_t n)
{
    float m = 0;
    for (size_t i = 0; i < n; i++)
        m = fabsf(a[i]) > m ? fabsf(a[i]) : m;
    return m;
}

/* max |a - b| (NaN counts as infinite). */
static float max_diff(const float *a, const float *b, size_t n)
{
    float m = 0;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m))
            m = isnan(d) ? INFINITY : d;
    }
    return m;
}

/* Compares the GPU run with the CPU run; returns the number of failed checks. */
static int compare(const char *name, const mdl_model_t *m, const run_t *cpu, const run_t *gpu,
                   int n_prompts, float rel, float abs_tol)
{
    const mdl_config_t *c = mdl_model_config(m);
    int V = c->n_vocab, steps = cpu->steps, bad = 0;
    for (int i = 0; i < n_prompts; i++) {
        const int32_t *tc = cpu->tok + (size_t)i * steps, *tg = gpu->tok + (size_t)i * steps;
        int div = steps;
        for (int s = 0; s < steps && div == steps; s++)
            div = tc[s] != tg[s] ? s : div;
        int last = div < steps ? div : steps - 1;
        float mx = 0, worst = 0;
        int worst_s = 0;
        for (int s = 0; s <= last; s++)
            mx = fmaxf(mx, max_abs(cpu->logits + ((size_t)i * steps + s) * V, (size_t)V));
        float tol = rel * mx + abs_tol;
        for (int s = 0; s <= last; s++) {
            float d = max_diff(cpu->logits + ((size_t)i * steps + s) * V,
                               gpu->logits + ((size_t)i * steps + s) * V, (size_t)V);
            if (!(d <= worst)) {
                worst = isnan(d) ? INFINITY : d;
                worst_s = s;
            }
        }
        bool ok = worst <= tol;
        if (div == steps) {
            printf("%s %s prompt %d: %d greedy tokens equal; logits max |diff| %.4g at step %d "
                   "(tol %.4g)\n",
                   ok ? "ok  " : "FAIL", name, i, steps, worst, worst_s, tol);
        } else {
            const float *lc = cpu->logits + ((size_t)i * steps + div) * V;
            float gap = lc[tc[div]] - lc[tg[div]];
            bool tie = gap <= 2 * tol;
            ok = ok && tie;
            printf("%s %s prompt %d: tokens equal for %d steps, then cpu %d vs gpu %d; cpu "
                   "logits %.4f vs %.4f (gap %.4g, allowed %.4g); logits max |diff| %.4g up to "
                   "there (tol %.4g)\n",
                   ok ? "ok  " : "FAIL", name, i, div, tc[div], tg[div], lc[tc[div]],
                   lc[tg[div]], gap, 2 * tol, worst, tol);
        }
        bad += !ok;
    }
    // Layer callback of prompt 0.
    const capture_t *cc = &cpu->cap, *gc = &gpu->cap;
    if (!gc->order_ok || gc->n_layers_seen != c->n_layers || gc->n != cc->n ||
        gc->n_window != cc->n_window) {
        printf("FAIL %s: callback saw %d layers (order %s), n %d/%d, window %d/%d\n", name,
               gc->n_layers_seen, gc->order_ok ? "ok" : "wrong", gc->n, cc->n, gc->n_window,
               cc->n_window);
        return bad + 1;
    }
    int n = cc->n, w = cc->n_window, hd = c->head_dim, H = c->n_heads, KV = c->n_kv_heads;
    size_t nkv = (size_t)KV * n * hd, nq = (size_t)H * w * hd;
    float worst_rel = 0, worst_win = 0;
    int cb_bad = 0;
    for (int l = 0; l < c->n_layers; l++) {
        const float *pairs[3][2] = {{cc->k[l], gc->k[l]}, {cc->v[l], gc->v[l]},
                                    {cc->qw[l], gc->qw[l]}};
        size_t sizes[3] = {nkv, nkv, nq};
        for (int j = 0; j < 3; j++) {
            float mx = max_abs(pairs[j][0], sizes[j]);
            float d = max_diff(pairs[j][0], pairs[j][1], sizes[j]);
            float r = d / (mx > 0 ? mx : 1);
            worst_rel = !(r <= worst_rel) ? (isnan(r) ? INFINITY : r) : worst_rel;
            cb_bad += !(d <= rel * mx + abs_tol * 0.01f);
        }
        // Window scores: the definition in double over the delivered K and window queries.
        if (gc->wa[l] == NULL || cc->wa[l] != NULL) {
            cb_bad++;
            continue;
        }
        int grp = H / KV;
        double *row = malloc((size_t)n * sizeof(double));
        for (int h = 0; h < H; h++) {
            const float *kh = gc->k[l] + (size_t)(h / grp) * n * hd;
            double sum_all = 0;
            for (int j = 0; j < n; j++) {
                double ref = 0;
                for (int wi = 0; wi < w; wi++) {
                    const float *q = gc->qw[l] + ((size_t)h * w + wi) * hd;
                    int pos = n - w + wi;
                    if (j > pos)
                        continue;
                    double mxs = -INFINITY, z = 0;
                    for (int t = 0; t <= pos; t++) {
                        double d = 0;
                        for (int e = 0; e < hd; e++)
                            d += (double)q[e] * kh[(size_t)t * hd + e];
                        row[t] = d / sqrt((double)hd);
                        mxs = row[t] > mxs ? row[t] : mxs;
                    }
                    for (int t = 0; t <= pos; t++)
                        z += exp(row[t] - mxs);
                    ref += exp(row[j] - mxs) / z / w;
                }
                double got = gc->wa[l][(size_t)h * n + j];
                sum_all += got;
                double dd = fabs(got - ref);
                worst_win = !(dd <= worst_win) ? (isnan(dd) ? INFINITY : (float)dd) : worst_win;
                cb_bad += !(dd <= 1e-4);
            }
            cb_bad += !(fabs(sum_all - 1.0) <= 1e-3); // each head's mean row sums to 1
        }
        free(row);
    }
    printf("%s %s callback: %d layers in order, K/V/q_window worst relative diff %.3g (tol %.3g), "
           "window scores worst |diff| %.3g (tol 1e-4)\n",
           cb_bad ? "FAIL" : "ok  ", name, gc->n_layers_seen, worst_rel, rel, worst_win);
    bad += cb_bad != 0;
    // The cache after prefill (last layer, kv head 0), read back through the host.
    size_t ncache = (size_t)n * hd;
    float mk = max_abs(cpu->kv_k, ncache), dk = max_diff(cpu->kv_k, gpu->kv_k, ncache);
    float dv = max_diff(cpu->kv_v, gpu->kv_v, ncache), mv = max_abs(cpu->kv_v, ncache);
    bool cache_ok = dk <= rel * mk + 1e-3f && dv <= rel * mv + 1e-3f;
    printf("%s %s cache: last layer K max |diff| %.3g (max %.3g), V %.3g (max %.3g)\n",
           cache_ok ? "ok  " : "FAIL", name, dk, mk, dv, mv);
    bad += !cache_ok;
    return bad;
}

/* A CUDA pool loaded with the CPU's K/V of prompt 0 decodes the CPU's step-1 logits. */
static int check_load(const char *name, const mdl_model_t *gm, const run_t *cpu,
                      const int32_t *prompt, int len, float rel, float abs_tol)
{
    const mdl_config_t *c = mdl_model_config(gm);
    if (cpu->steps < 2)
        return 0;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.device = MDL_DEVICE_CUDA;
    cp.max_batch = 1;
    mdl_ctx_t *ctx = NULL;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, gm);
    kp.page_tokens = 5; // a page size the prefill runs did not use
    kp.n_pages = mdl_kv_pages_for(&kp, len + 2);
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seq = NULL;
    float *lg = malloc((size_t)c->n_vocab * sizeof(float));
    fy_status_t st = mdl_ctx_create(gm, &cp, &ctx);
    if (st == FY_OK)
        st = mdl_kv_create(&kp, &kv);
    if (st == FY_OK)
        st = mdl_kv_seq_create(kv, &seq);
    for (int l = 0; l < c->n_layers && st == FY_OK; l++)
        st = mdl_kv_seq_load_layer(seq, l, len, cpu->cap.k[l], cpu->cap.v[l]);
    if (st == FY_OK)
        st = mdl_kv_seq_commit(seq, len);
    int32_t tok = cpu->tok[0];
    if (st == FY_OK)
        st = mdl_decode(ctx, &seq, &tok, 1, lg);
    int bad = st != FY_OK;
    if (st == FY_OK) {
        const float *ref = cpu->logits + (size_t)c->n_vocab; // prompt 0, step 1
        float tol = rel * max_abs(ref, (size_t)c->n_vocab) + abs_tol;
        float d = max_diff(ref, lg, (size_t)c->n_vocab);
        bad = !(d <= tol);
        printf("%s %s decode over a loaded CUDA pool: logits max |diff| %.4g (tol %.4g)\n",
               bad ? "FAIL" : "ok  ", name, d, tol);
        // prompt + 1 token is now in the cache
        bad += mdl_kv_seq_len(seq) != len + 1;
    } else {
        printf("FAIL %s decode over a loaded CUDA pool: %s\n", name, fy_status_str(st));
    }
    free(lg);
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    return bad;
}

static int compare_model(const char *name, const char *path, const int32_t *const *prompts,
                         const int *lens, int n_prompts, int steps, float rel, float abs_tol)
{
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = path;
    mdl_model_t *cm = NULL, *gm = NULL;
    fy_status_t st = mdl_model_create(&mp, &cm, err, sizeof(err));
    if (st != FY_OK) {
        fprintf(stderr, "FAIL %s: cannot load %s on the CPU: %s (%s)\n", name, path, err,
                fy_status_str(st));
        return 1;
    }
    mp.device = MDL_DEVICE_CUDA;
    if ((st = mdl_model_create(&mp, &gm, err, sizeof(err))) != FY_OK) {
        fprintf(stderr, "FAIL %s: cannot load %s on the GPU: %s (%s)\n", name, path, err,
                fy_status_str(st));
        mdl_model_destroy(cm);
        return 1;
    }
    int bad = 0;
    // A context must run on its model's device.
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    mdl_ctx_t *wrong = NULL;
    if (mdl_ctx_create(gm, &cp, &wrong) != FY_ERR_INVALID_ARG) {
        printf("FAIL %s: a CPU context on a CUDA model was accepted\n", name);
        mdl_ctx_destroy(wrong);
        bad++;
    }
    // The fingerprint (for KV exchange) is the same whichever device holds the weights.
    if (mdl_model_fingerprint(cm) != mdl_model_fingerprint(gm)) {
        printf("FAIL %s: fingerprint %016llx on the CPU, %016llx on the GPU\n", name,
               (unsigned long long)mdl_model_fingerprint(cm),
               (unsigned long long)mdl_model_fingerprint(gm));
        bad++;
    }
    run_t rc = {0}, rg = {0};
    int L = mdl_model_config(cm)->n_layers;
    if (generate(cm, MDL_DEVICE_CPU, prompts, lens, n_prompts, steps, &rc) != 0 ||
        generate(gm, MDL_DEVICE_CUDA, prompts, lens, n_prompts, steps, &rg) != 0)
        bad++;
    else
        bad += compare(name, cm, &rc, &rg, n_prompts, rel, abs_tol) +
               check_load(name, gm, &rc, prompts[0], lens[0], rel, abs_tol);
    run_free(&rc, L);
    run_free(&rg, L);
    mdl_model_destroy(cm);
    mdl_model_destroy(gm);
    return bad;
}

static int tiny_models(void)
{
    static const tu_tiny_case_t cases[] = {
        {"llama", MDL_TENSOR_F32, true, 4, 2, 64},   {"llama", MDL_TENSOR_Q4_0, false, 8, 2, 128},
        {"qwen2", MDL_TENSOR_Q8_0, false, 6, 3, 96}, {"llama", MDL_TENSOR_Q4_1, true, 4, 4, 256},
    };
    int bad = 0;
    uint64_t seed = 99;
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        mdlt_tiny_params_t tp;
        char path[64];
        if (tu_tiny_case_temp(&cases[k], k + 1, path, sizeof(path), &tp) != 0) {
            fprintf(stderr, "FAIL: cannot write the tiny model\n");
            return bad + 1;
        }
        int32_t p[MAX_PROMPTS][40];
        const int32_t *pp[MAX_PROMPTS];
        int lens[MAX_PROMPTS] = {37, 9, 21};
        for (int i = 0; i < MAX_PROMPTS; i++) {
            tu_random_tokens(&seed, p[i], lens[i]);
            pp[i] = p[i];
        }
        char name[64];
        snprintf(name, sizeof(name), "tiny %s type %u%s", tp.arch, tp.weight_type,
                 tp.tied ? " tied" : "");
        bad += compare_model(name, path, pp, lens, MAX_PROMPTS, 16, 0.02f, 1e-3f);
        unlink(path);
    }
    return bad;
}

static int real_model(void)
{
    const char *path = tu_model_path();
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "FAIL: the model %s is missing (scripts/setup.sh fetches it, or set "
                        "FERRY_MODEL)\n",
                path);
        return 1;
    }
    // Tokenize with the CPU model's tokenizer.
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = path;
    mdl_model_t *m = NULL;
    if (mdl_model_create(&mp, &m, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "FAIL: cannot load %s: %s\n", path, err);
        return 1;
    }
    static const char *const texts[MAX_PROMPTS] = {
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Once upon a time, in a small village at the edge of a great forest, there lived",
    };
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    int32_t ids[MAX_PROMPTS][256];
    const int32_t *pp[MAX_PROMPTS];
    int lens[MAX_PROMPTS];
    for (int i = 0; i < MAX_PROMPTS; i++) {
        int off = 0;
        if (mdl_tokenizer_add_bos(tok) && mdl_tokenizer_bos(tok) >= 0)
            ids[i][off++] = mdl_tokenizer_bos(tok);
        size_t n = 0;
        if (mdl_tokenizer_encode(tok, texts[i], strlen(texts[i]), false, ids[i] + off,
                                 256 - (size_t)off, &n) != FY_OK) {
            mdl_model_destroy(m);
            return 1;
        }
        lens[i] = off + (int)n;
        pp[i] = ids[i];
    }
    mdl_model_destroy(m);
    // FP16 weights and GEMM inputs against FP32: logits of magnitude ~20 move by a few 0.01.
    return compare_model("SmolLM2", path, pp, lens, MAX_PROMPTS, 32, 0.02f, 0.1f);
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
