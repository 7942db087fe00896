/*
 * cli_generate.c: `ferry generate --local --model PATH [options] "prompt"` runs the model in
 * this process and streams the continuation to stdout as it is sampled. (Generation through a
 * router arrives with the serving path; until then --local is required.)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"


/* Re-executes this process with OPENBLAS_CORETYPE set when OpenBLAS chose slower kernels than
 * the CPU supports (see krn_gemm_better_coretype); returns only when nothing was done. */
static void tune_blas(int argc, char **argv, const char *sub)
{
    const char *core = getenv("OPENBLAS_CORETYPE") == NULL ? krn_gemm_better_coretype() : NULL;
    if (core == NULL || argc > 250)
        return;
    char *args[256];
    args[0] = (char *)"ferry";
    args[1] = (char *)sub;
    for (int i = 1; i < argc; i++)
        args[i + 1] = argv[i];
    args[argc + 1] = NULL;
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", args);
    unsetenv("OPENBLAS_CORETYPE"); // exec failed: go on with what we have
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ferry generate --local --model PATH [options] \"prompt\"\n"
            "  --local               run the model in this process\n"
            "  --model PATH          GGUF model file\n"
            "  --chat                wrap the prompt in the model's chat template\n"
            "  --system TEXT         system message (with --chat)\n"
            "  --max-tokens N        tokens to generate (default 256)\n"
            "  --temperature T       0 = greedy (default 0.7)\n"
            "  --top-k K             0 = off (default 40)\n"
            "  --top-p P             1 = off (default 0.95)\n"
            "  --repeat-penalty R    1 = off (default 1.0)\n"
            "  --seed S              sampling seed (default 0x5eed)\n"
            "  --threads N           worker threads (default: all CPUs)\n"
            "  --device cpu|cuda     where the model runs (default cpu)\n"
            "  --stats               print prompt/generation speed to stderr\n");
}

static bool parse_num(const char *s, double lo, double hi, double *v)
{
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno != 0 || end == s || *end != '\0' || x < lo || x > hi)
        return false;
    *v = x;
    return true;
}

int cli_generate_main(int argc, char **argv)
{
    tune_blas(argc, argv, "generate");
    const char *model_path = NULL, *prompt = NULL, *system = NULL;
    bool local = false, chat = false, stats = false;
    int threads = 0;
    mdl_device_t device = MDL_DEVICE_CPU;
    mdl_sampler_params_t sp;
    mdl_sampler_params_default(&sp);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        double x;
#define NUM(flag, lo, hi)                                                                       \
    (strcmp(a, flag) == 0 && (val == NULL || !parse_num(val, lo, hi, &x)                       \
                                  ? (fprintf(stderr, "ferry generate: %s needs a number in "   \
                                                     "[%g, %g]\n", flag, (double)(lo),        \
                                             (double)(hi)),                                    \
                                     exit(2), 0)                                               \
                                  : (i++, 1)))
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--local") == 0) {
            local = true;
        } else if (strcmp(a, "--chat") == 0) {
            chat = true;
        } else if (strcmp(a, "--stats") == 0) {
            stats = true;
        } else if (strcmp(a, "--model") == 0 && val != NULL) {
            model_path = val;
            i++;
        } else if (strcmp(a, "--device") == 0 && val != NULL) {
            if (strcmp(val, "cpu") == 0) {
                device = MDL_DEVICE_CPU;
            } else if (strcmp(val, "cuda") == 0) {
                device = MDL_DEVICE_CUDA;
            } else {
                fprintf(stderr, "ferry generate: --device takes cpu or cuda\n");
                return 2;
            }
            i++;
        } else if (strcmp(a, "--system") == 0 && val != NULL) {
            system = val;
            i++;
        } else if (NUM("--max-tokens", 1, 1 << 20)) {
            sp.max_tokens = (int)x;
        } else if (NUM("--temperature", 0, 100)) {
            sp.temperature = (float)x;
        } else if (NUM("--top-k", 0, 1 << 24)) {
            sp.top_k = (int)x;
        } else if (NUM("--top-p", 1e-6, 1)) {
            sp.top_p = (float)x;
        } else if (NUM("--repeat-penalty", 1e-3, 100)) {
            sp.repetition_penalty = (float)x;
        } else if (NUM("--seed", 0, 1.8e19)) {
            sp.seed = (uint64_t)x;
        } else if (NUM("--threads", 0, 1024)) {
            threads = (int)x;
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "ferry generate: unknown option %s\n", a);
            usage(stderr);
            return 2;
        } else if (prompt == NULL) {
            prompt = a;
        } else {
            fprintf(stderr, "ferry generate: one prompt only (quote it)\n");
            return 2;
        }
#undef NUM
    }
    if (!local) {
        fprintf(stderr, "ferry generate: only --local is available in this build "
                        "(the router path is not built yet)\n");
        return 2;
    }
    if (model_path == NULL || prompt == NULL) {
        usage(stderr);
        return 2;
    }

    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = model_path;
    mp.device = device;
    mdl_model_t *model = NULL;
    mdl_ctx_t *ctx = NULL;
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seq = NULL;
    mdl_sampler_t *smp = NULL;
    int32_t *ids = NULL;
    float *logits = NULL;
    char *text = NULL;
    int rc = 1;
    fy_status_t st = mdl_model_create(&mp, &model, err, sizeof(err));
    if (st != FY_OK) {
        fprintf(stderr, "ferry generate: %s (%s)\n", err[0] ? err : "cannot load model",
                fy_status_str(st));
        return 1;
    }
    const mdl_config_t *cfg = mdl_model_config(model);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(model);

    if (chat) {
        mdl_chat_msg_t msgs[2];
        size_t n_msgs = 0;
        if (system != NULL)
            msgs[n_msgs++] = (mdl_chat_msg_t){"system", system};
        msgs[n_msgs++] = (mdl_chat_msg_t){"user", prompt};
        st = mdl_chat_render(tok, msgs, n_msgs, true, &text);
        if (st != FY_OK) {
            fprintf(stderr, "ferry generate: this model has no ChatML chat template\n");
            goto out;
        }
    } else {
        text = strdup(prompt);
    }
    size_t n_ids = 0, len = strlen(text);
    mdl_tokenizer_encode(tok, text, len, chat, NULL, 0, &n_ids);
    size_t cap = n_ids + 1;
    ids = malloc(cap * sizeof(int32_t));
    size_t off = mdl_tokenizer_add_bos(tok) ? 1 : 0;
    if (ids == NULL ||
        mdl_tokenizer_encode(tok, text, len, chat, ids + off, cap - off, &n_ids) != FY_OK)
        goto out;
    if (off)
        ids[0] = mdl_tokenizer_bos(tok);
    n_ids += off;
    if (n_ids == 0) {
        fprintf(stderr, "ferry generate: empty prompt\n");
        goto out;
    }
    if ((int64_t)n_ids + sp.max_tokens > cfg->n_ctx_train)
        sp.max_tokens = (int)FY_MAX(1, cfg->n_ctx_train - (int64_t)n_ids);
    if ((int64_t)n_ids >= cfg->n_ctx_train) {
        fprintf(stderr, "ferry generate: prompt of %zu tokens exceeds the context (%d)\n", n_ids,
                cfg->n_ctx_train);
        goto out;
    }
    if (mdl_tokenizer_eos(tok) >= 0 && sp.n_stop < MDL_MAX_STOP)
        sp.stop[sp.n_stop++] = mdl_tokenizer_eos(tok);
    int32_t im_end = mdl_tokenizer_find(tok, "<|im_end|>");
    if (im_end >= 0 && im_end != mdl_tokenizer_eos(tok) && sp.n_stop < MDL_MAX_STOP)
        sp.stop[sp.n_stop++] = im_end;

    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = threads;
    cp.device = device;
    cp.max_batch = 1;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, model);
    kp.n_pages = mdl_kv_pages_for(&kp, (int64_t)n_ids + sp.max_tokens + 1);
    if ((st = mdl_ctx_create(model, &cp, &ctx)) != FY_OK ||
        (st = mdl_kv_create(&kp, &kv)) != FY_OK || (st = mdl_kv_seq_create(kv, &seq)) != FY_OK ||
        (st = mdl_sampler_create(&sp, cfg->n_vocab, &smp)) != FY_OK) {
        fprintf(stderr, "ferry generate: setup failed: %s\n", fy_status_str(st));
        goto out;
    }
    logits = malloc((size_t)cfg->n_vocab * sizeof(float));
    if (logits == NULL)
        goto out;
    for (size_t i = 0; i < n_ids; i++)
        mdl_sampler_accept(smp, ids[i]);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = seq;
    uint64_t t0 = fy_clock_ns();
    if ((st = mdl_prefill(ctx, ids, (int)n_ids, &pp, logits)) != FY_OK) {
        fprintf(stderr, "ferry generate: prefill failed: %s\n", fy_status_str(st));
        goto out;
    }
    uint64_t t1 = fy_clock_ns();
    mdl_detok_t dt;
    mdl_detok_init(&dt, tok, true);
    char buf[1024];
    int n_gen = 0;
    for (;;) {
        int32_t next = mdl_sampler_sample(smp, logits);
        mdl_sampler_accept(smp, next);
        n_gen++;
        bool stop = mdl_sampler_done(smp, next);
        bool is_stop = false;
        for (int i = 0; i < sp.n_stop; i++)
            is_stop |= sp.stop[i] == next;
        if (!is_stop && mdl_detok_push(&dt, next, buf, sizeof(buf)) > 0) {
            fputs(buf, stdout);
            fflush(stdout);
        }
        if (stop)
            break;
        if ((st = mdl_decode(ctx, &seq, &next, 1, logits)) != FY_OK) {
            fprintf(stderr, "\nferry generate: decode failed: %s\n", fy_status_str(st));
            goto out;
        }
    }
    if (mdl_detok_flush(&dt, buf, sizeof(buf)) > 0)
        fputs(buf, stdout);
    fputc('\n', stdout);
    uint64_t t2 = fy_clock_ns();
    if (stats)
        fprintf(stderr, "prompt: %zu tokens, %.1f tok/s; generated: %d tokens, %.1f tok/s\n",
                n_ids, n_ids / ((t1 - t0) / 1e9), n_gen, n_gen / ((t2 - t1) / 1e9));
    rc = 0;
out:
    free(logits);
    free(ids);
    free(text);
    mdl_sampler_destroy(smp);
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    mdl_model_destroy(model);
    return rc;
}
