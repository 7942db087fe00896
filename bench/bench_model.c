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
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"

/* Each figure is the best of REPEATS runs: the machine is shared, and the best run is the one
 * least disturbed by others (the torch side does the same). */
enum { CONTEXT = 128, REPEATS = 3 };


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

static double bench_prefill(mdl_ctx_t *ctx, int n_vocab, int n)
{
    uint64_t seed = 1;
    int32_t *t = malloc(sizeof(int32_t) * (size_t)n);
    float *logits = malloc(sizeof(float) * (size_t)n_vocab);
    rand_tokens(t, n, n_vocab, &seed);
    mdl_prefill(ctx, t, 16, NULL, logits); // warm-up
    double best = 0.0;
    for (int rep = 0; rep < REPEATS; rep++) {
        double t0 = now_s();
        if (mdl_prefill(ctx, t, n, NULL, logits) != FY_OK)
            return -1;
        double tps = n / (now_s() - t0);
        best = tps > best ? tps : best;
    }
    free(t);
    free(logits);
    return best;
}

static double bench_decode(const mdl_model_t *m, mdl_ctx_t *ctx, int batch, int steps)
{
    const mdl_config_t *c = mdl_model_config(m);
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, m);
    kp.n_pages = batch * mdl_kv_pages_for(&kp, CONTEXT + REPEATS * steps + 1);
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
    double tps = 0.0;
    for (int rep = 0; rep < REPEATS; rep++) {
        double t0 = now_s();
        for (int s = 0; s < steps; s++) {
            for (int b = 0; b < batch; b++) {
                const float *l = logits + (size_t)b * c->n_vocab;
                int32_t best = 0;
                for (int v = 1; v < c->n_vocab; v++)
                    best = l[v] > l[best] ? v : best;
                next[b] = best;
            }
            if (mdl_decode(ctx, seqs, next, batch, logits) != FY_OK)
                return -1;
        }
        double r = (double)batch * steps / (now_s() - t0);
        tps = r > tps ? r : tps;
    }
    for (int b = 0; b < batch; b++)
        mdl_kv_seq_destroy(seqs[b]);
    mdl_kv_destroy(kv);
    free(seqs);
    free(t);
    free(next);
    free(logits);
    return tps;
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
    const char *only = NULL;
    int threads = 0, steps = 16;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model_path = argv[++i];
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
        else {
            fprintf(stderr, "usage: ferry-bench model [--model PATH] [--threads N] [--steps N] "
                            "[--torch PYTHON] [--json FILE] [--only prefill|decode]\n");
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    if (steps < 1)
        steps = 1;
    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = model_path;
    mdl_model_t *m = NULL;
    if (mdl_model_create(&mp, &m, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "ferry-bench model: %s\n", err);
        return 1;
    }
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = threads;
    cp.max_batch = 16;
    mdl_ctx_t *ctx;
    if (mdl_ctx_create(m, &cp, &ctx) != FY_OK) {
        mdl_model_destroy(m);
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
        rows[0].ferry = bench_prefill(ctx, c->n_vocab, 512);
        rows[1].ferry = bench_prefill(ctx, c->n_vocab, 2048);
    }
    if (do_decode) {
        rows[2].ferry = bench_decode(m, ctx, 1, steps);
        rows[3].ferry = bench_decode(m, ctx, 16, steps);
    }
    int used_threads = threads > 0 ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    cJSON *tj = torch != NULL && only == NULL ? run_torch(torch, model_path, used_threads, steps)
                                              : NULL;
    printf("model %s, %d threads, decode over a %d-token context, %d steps\n", model_path,
           used_threads, CONTEXT, steps);
    printf("%-22s %12s %12s %8s\n", "", "ferry", "torch", "ratio");
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "model", model_path);
    cJSON_AddNumberToObject(out, "threads", used_threads);
    cJSON_AddNumberToObject(out, "decode_context", CONTEXT);
    cJSON_AddNumberToObject(out, "decode_steps", steps);
    for (size_t i = 0; i < FY_ARRAY_SIZE(rows); i++) {
        if (rows[i].ferry == 0.0)
            continue; // not measured (--only)
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
    return 0;
}
