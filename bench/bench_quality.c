/*
 * bench_quality.c: `ferry-bench quality`: what each codec policy at each budget does to the
 * model's predictions (bench/quality.h has the method). For every context length C, samples of
 * C + continuation tokens are cut from the corpus; each context is prefilled once, coded once per
 * (policy, b), and the continuation is teacher-forced for all of them in one decode batch that
 * attends over the compressed pages. Then needle-in-a-haystack prompts go through the same
 * batch. Prints a table; --json and --md write the results, --png the plots (through
 * scripts/plot-quality.py and matplotlib).
 *
 *   ferry-bench quality [--quick] [--json FILE] [--md FILE] [--png PREFIX] [--model PATH]
 *       [--corpus FILE|DIR]... [--contexts 512,1024,2048] [--continuation 256] [--samples N]
 *       [--policies int8,...,FILE.json] [--budgets 0.5,...] [--niah-lengths 1024,2048,4096]
 *       [--niah-depths N] [--no-niah | --niah-only] [--decode kvc|dequant] [--threads N]
 *
 * The default corpus is build/quality-corpus (scripts/build-corpus.sh writes it).
 */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "quality.h"

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define DEFAULT_CORPUS "build/quality-corpus"
enum { MAX_LIST = 32, MAX_CFG = 63, ANSWER_CAP = 128, NIAH_MAX_NEW = 24 };

typedef struct {
    const char *model, *json, *md, *png;
    const char *corpus[MAX_LIST];
    int n_corpus;
    int contexts[MAX_LIST], n_contexts;
    int continuation, samples;
    char *policies[MAX_LIST];
    int n_policies;
    double budgets[MAX_LIST];
    int n_budgets;
    int niah_lengths[MAX_LIST], n_niah_lengths, niah_depths;
    bool quick, niah, ppl;
    char *policy_list; // strdup'd --policies value the names point into
    qual_decode_t decode;
    int threads;
} opts_t;

/* ------------------------------------------------------------------------------------------ */
/* Progress bar                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    uint64_t total, done_before; // units of finished phases
    uint64_t t0;
    bool tty;
    int last_pct;
    char what[64];
} progress_t;

static void progress_show(progress_t *p, uint64_t done)
{
    double frac = p->total ? (double)done / (double)p->total : 1;
    double el = (double)(fy_clock_ns() - p->t0) / 1e9;
    double eta = frac > 0.01 ? el / frac - el : 0;
    int pct = (int)(frac * 100);
    if (p->tty) {
        char bar[31];
        int fill = (int)(frac * 30);
        for (int i = 0; i < 30; i++)
            bar[i] = i < fill ? '=' : (i == fill ? '>' : ' ');
        bar[30] = '\0';
        fprintf(stderr, "\r[%s] %3d%%  %-28s %4.0fs elapsed, ~%.0fs left ", bar, pct, p->what,
                el, eta);
    } else if (pct / 10 != p->last_pct / 10) {
        fprintf(stderr, "quality: %3d%%  %s, %.0fs elapsed, ~%.0fs left\n", pct, p->what, el,
                eta);
    }
    p->last_pct = pct;
}

static void progress_cb(void *arg, uint64_t done, uint64_t total)
{
    progress_t *p = arg;
    (void)total;
    progress_show(p, p->done_before + done);
}

/* ------------------------------------------------------------------------------------------ */
/* Options                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static int parse_ints(const char *s, int *out, int cap)
{
    int n = 0;
    char *dup = strdup(s), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n < cap; t = strtok_r(NULL, ",", &save)) {
        char *end;
        long v = strtol(t, &end, 10);
        if (*end || v <= 0 || v > (1 << 20)) {
            n = -1;
            break;
        }
        out[n++] = (int)v;
    }
    free(dup);
    return n;
}

static int parse_doubles(const char *s, double *out, int cap)
{
    int n = 0;
    char *dup = strdup(s), *save = NULL;
    for (char *t = strtok_r(dup, ",", &save); t && n < cap; t = strtok_r(NULL, ",", &save)) {
        char *end;
        double v = strtod(t, &end);
        if (*end || !(v > 0 && v <= 1)) {
            n = -1;
            break;
        }
        out[n++] = v;
    }
    free(dup);
    return n;
}

static int parse_names(char *s, char **out, int cap)
{
    int n = 0;
    char *save = NULL;
    for (char *t = strtok_r(s, ",", &save); t && n < cap; t = strtok_r(NULL, ",", &save))
        out[n++] = t;
    return n;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ferry-bench quality [--quick] [--json FILE] [--md FILE] [--png PREFIX]\n"
            "         [--model PATH] [--corpus FILE|DIR]... [--contexts 512,1024,2048]\n"
            "         [--continuation 256] [--samples N] [--policies a,b,...,FILE.json]\n"
            "         [--budgets 0.5,0.3,0.25,0.125,0.0625] [--niah-lengths 1024,2048,4096]\n"
            "         [--niah-depths N] [--no-niah | --niah-only] [--decode kvc|dequant]\n"
            "         [--threads N]\n"
            "Default corpus: " DEFAULT_CORPUS " (scripts/build-corpus.sh).\n"
            "--decode dequant decodes from an FP16 cache of the dequantized frames (dropped\n"
            "tokens become zero vectors): a cross-check, not the reported path.\n");
}

static int parse_opts(int argc, char **argv, opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->model = DEFAULT_MODEL;
    o->niah = true;
    o->ppl = true;
    o->threads = 2;
    char *pol = NULL;
    const char *ctx = NULL, *bud = NULL, *nl = NULL;
    int cont = 0, samples = 0, depths = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool takes = true;
        if (strcmp(a, "--quick") == 0) {
            o->quick = true;
            takes = false;
        } else if (strcmp(a, "--no-niah") == 0) {
            o->niah = false;
            takes = false;
        } else if (strcmp(a, "--niah-only") == 0) {
            o->ppl = false;
            takes = false;
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(0);
        } else if (v == NULL) {
            fprintf(stderr, "quality: %s needs a value\n", a);
            return -1;
        } else if (strcmp(a, "--json") == 0) {
            o->json = v;
        } else if (strcmp(a, "--md") == 0) {
            o->md = v;
        } else if (strcmp(a, "--png") == 0) {
            o->png = v;
        } else if (strcmp(a, "--model") == 0) {
            o->model = v;
        } else if (strcmp(a, "--corpus") == 0) {
            if (o->n_corpus == MAX_LIST)
                return -1;
            o->corpus[o->n_corpus++] = v;
        } else if (strcmp(a, "--contexts") == 0) {
            ctx = v;
        } else if (strcmp(a, "--continuation") == 0) {
            cont = atoi(v);
        } else if (strcmp(a, "--samples") == 0) {
            samples = atoi(v);
        } else if (strcmp(a, "--policies") == 0) {
            free(pol);
            pol = strdup(v);
        } else if (strcmp(a, "--budgets") == 0) {
            bud = v;
        } else if (strcmp(a, "--niah-lengths") == 0) {
            nl = v;
        } else if (strcmp(a, "--niah-depths") == 0) {
            depths = atoi(v);
        } else if (strcmp(a, "--decode") == 0) {
            if (qual_decode_parse(v, &o->decode) != FY_OK) {
                fprintf(stderr, "quality: --decode kvc or dequant\n");
                return -1;
            }
        } else if (strcmp(a, "--threads") == 0) {
            o->threads = atoi(v);
        } else {
            fprintf(stderr, "quality: unknown option %s\n", a);
            usage(stderr);
            return -1;
        }
        i += takes;
    }
    // --quick: one 512-token context, a 128-token continuation, the two budgets of the goals,
    // one haystack length at three depths.
    o->n_contexts = parse_ints(ctx ? ctx : o->quick ? "512" : "512,1024,2048", o->contexts,
                               MAX_LIST);
    o->n_budgets = parse_doubles(bud ? bud : o->quick ? "0.25,0.125" : "0.5,0.3,0.25,0.125,0.0625",
                                 o->budgets, MAX_LIST);
    o->n_niah_lengths = parse_ints(nl ? nl : o->quick ? "1024" : "1024,2048,4096",
                                   o->niah_lengths, MAX_LIST);
    o->continuation = cont > 0 ? cont : o->quick ? 128 : 256;
    o->samples = samples > 0 ? samples : o->quick ? 1 : 3;
    o->niah_depths = depths > 0 ? depths : o->quick ? 3 : 11;
    if (pol == NULL) {
        const char *const *names = kvc_policy_builtin_names();
        for (int i = 0; names[i] != NULL && o->n_policies < MAX_LIST; i++) {
            if (strcmp(names[i], "fp16") != 0) // fp16 is the reference row itself
                o->policies[o->n_policies++] = (char *)names[i];
        }
    } else {
        o->policy_list = pol;
        o->n_policies = parse_names(pol, o->policies, MAX_LIST);
    }
    if (o->n_contexts <= 0 || o->n_budgets <= 0 || o->n_niah_lengths <= 0 ||
        o->n_policies <= 0 || o->continuation < 2 || o->threads <= 0) {
        fprintf(stderr, "quality: bad list or value in the options\n");
        return -1;
    }
    if (o->n_corpus == 0)
        o->corpus[o->n_corpus++] = DEFAULT_CORPUS;
    return 0;
}

/* Every (policy, b) row; policies without a budget appear once. */
static int build_configs(const opts_t *o, qual_config_t *cfgs)
{
    int n = 0;
    for (int p = 0; p < o->n_policies; p++) {
        qual_config_t c;
        const char *name = o->policies[p];
        size_t len = strlen(name);
        kvc_policy_t file;
        char err[256];
        bool is_file = len > 5 && strcmp(name + len - 5, ".json") == 0;
        if (is_file && kvc_policy_load_file(name, &file, err, sizeof(err)) != FY_OK) {
            fprintf(stderr, "quality: policy file %s: %s\n", name, err);
            return -1;
        }
        if (is_file) {
            qual_config_from_policy(&file, -1, &c);
        } else if (qual_config_builtin(name, -1, &c) != FY_OK) {
            fprintf(stderr, "quality: unknown policy '%s'\n", name);
            return -1;
        }
        if (!qual_policy_has_budget(&c.policy) || strcmp(o->policies[p], "sinks") == 0) {
            if (n == MAX_CFG)
                return -1;
            cfgs[n++] = c;
            continue;
        }
        for (int b = 0; b < o->n_budgets; b++) {
            if (n == MAX_CFG)
                return -1;
            if (is_file)
                qual_config_from_policy(&file, o->budgets[b], &cfgs[n++]);
            else
                qual_config_builtin(name, o->budgets[b], &cfgs[n++]);
        }
    }
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Output                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static void machine_line(char *buf, size_t cap)
{
    struct utsname u;
    char cpu[128] = "?";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f != NULL) {
        char line[256];
        while (fgets(line, sizeof(line), f)) {
            if (strncmp(line, "model name", 10) == 0) {
                char *c = strchr(line, ':');
                if (c != NULL) {
                    snprintf(cpu, sizeof(cpu), "%s", c + 2);
                    cpu[strcspn(cpu, "\n")] = '\0';
                }
                break;
            }
        }
        fclose(f);
    }
    uname(&u);
    snprintf(buf, cap, "%s %s, %ld CPUs, %s", u.sysname, u.machine, sysconf(_SC_NPROCESSORS_ONLN),
             cpu);
}

static const char *policy_of(const qual_config_t *c)
{
    return c->policy.name;
}

/* Adds one row's figures to a JSON object. */
static void json_metrics(cJSON *o, const qual_acc_t *acc, int row)
{
    qual_metrics_t m;
    qual_acc_metrics(acc, row, &m);
    cJSON_AddNumberToObject(o, "wire_ratio", m.wire_ratio);
    cJSON_AddNumberToObject(o, "dppl_pct", m.dppl_pct);
    cJSON_AddNumberToObject(o, "top1_pct", m.top1_pct);
    cJSON_AddNumberToObject(o, "kl", m.kl_mean);
    cJSON_AddNumberToObject(o, "ppl", m.ppl);
    cJSON_AddNumberToObject(o, "ppl_ref", m.ppl_ref);
    cJSON_AddNumberToObject(o, "predictions", (double)acc[row].n_pred);
    cJSON_AddBoolToObject(o, "budget_met", acc[row].n_budget_met == acc[row].n_contexts);
    cJSON_AddNumberToObject(o, "lambda_first",
                            acc[row].n_contexts ? acc[row].lambda_first_sum / acc[row].n_contexts
                                                : 0);
    cJSON *opt = cJSON_AddObjectToObject(o, "options");
    uint64_t tot = 0;
    for (int k = 0; k < KVC_OPT_COUNT; k++)
        tot += acc[row].tokens[k];
    for (int k = 0; k < KVC_OPT_COUNT; k++)
        cJSON_AddNumberToObject(opt, kvc_opt_name((kvc_opt_t)k),
                                tot ? (double)acc[row].tokens[k] / (double)tot : 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Main                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Re-executes with OPENBLAS_CORETYPE set when OpenBLAS picked slower kernels than the CPU has
 * (see bench_model.c); returns only when nothing was done. */
static void tune_blas(int argc, char **argv)
{
    const char *core = getenv("OPENBLAS_CORETYPE") == NULL ? krn_gemm_better_coretype() : NULL;
    if (core == NULL || argc > 250)
        return;
    char *args[256];
    args[0] = (char *)"ferry-bench";
    for (int i = 0; i < argc; i++)
        args[i + 1] = argv[i];
    args[argc + 1] = NULL;
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", args);
    unsetenv("OPENBLAS_CORETYPE");
}

int bench_quality_main(int argc, char **argv)
{
    opts_t o;
    if (parse_opts(argc, argv, &o) != 0)
        return 2;
    tune_blas(argc, argv);
    qual_config_t cfgs[MAX_CFG];
    int n_cfg = build_configs(&o, cfgs);
    if (n_cfg <= 0)
        return 2;
    int n_rows = n_cfg + 1;

    char err[512] = "";
    mdl_model_t *model = NULL;
    qual_corpus_t corpus;
    if (qual_load(o.model, o.corpus, o.n_corpus, &model, &corpus, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "quality: %s\n", err);
        return 1;
    }
    const mdl_config_t *mc = mdl_model_config(model);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(model);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = o.threads;
    cp.max_batch = FY_MAX(cp.max_batch, n_rows + 1); // + the batch's hidden row
    mdl_ctx_t *ctx = NULL;
    qual_batch_t *batch = NULL;
    qual_acc_t *acc = NULL;
    int *found = NULL;
    qual_acc_t *niah_acc = NULL; // coding facts of the NIAH prompts, per row
    char *answers = NULL;
    cJSON *trials = NULL, *root = NULL;
    int32_t *filler = NULL;
    int rc = 1;
    if (mdl_ctx_create(model, &cp, &ctx) != FY_OK ||
        qual_batch_create(ctx, model, o.decode, cfgs, n_cfg, &batch) != FY_OK) {
        fprintf(stderr, "quality: cannot create the decode batch\n");
        goto out;
    }

    // Progress in decode steps; a prefill of C tokens and its coding count as C / 16 steps
    // (about what they take on a CPU next to a step of a dozen rows).
    progress_t pr = {.t0 = fy_clock_ns(), .tty = isatty(2), .last_pct = -1};
    for (int ci = 0; ci < (o.ppl ? o.n_contexts : 0); ci++)
        pr.total += (uint64_t)o.samples * (uint64_t)(o.contexts[ci] / 16 + o.continuation - 1);
    int n_niah = o.niah ? o.n_niah_lengths * o.niah_depths : 0;
    for (int li = 0; li < (o.niah ? o.n_niah_lengths : 0); li++)
        pr.total += (uint64_t)o.niah_depths * (uint64_t)(o.niah_lengths[li] / 16 + NIAH_MAX_NEW);

    // ---- teacher forcing ----
    acc = calloc((size_t)o.n_contexts * n_rows, sizeof(qual_acc_t));
    for (int ci = 0; ci < (o.ppl ? o.n_contexts : 0) && acc != NULL; ci++) {
        int C = o.contexts[ci];
        for (int s = 0; s < o.samples; s++) {
            const int32_t *ids;
            int doc;
            fy_status_t st = qual_corpus_sample(&corpus, C + o.continuation, o.samples, s, &ids,
                                                &doc);
            if (st != FY_OK) {
                fprintf(stderr, "\nquality: the corpus has no %d runs of %d tokens (%s)\n",
                        o.samples, C + o.continuation, fy_status_str(st));
                goto out;
            }
            snprintf(pr.what, sizeof(pr.what), "C=%d text %d/%d", C, s + 1, o.samples);
            pr.done_before += (uint64_t)(C / 16);
            st = qual_eval_text(batch, ids, C, o.continuation, acc + (size_t)ci * n_rows,
                                progress_cb, &pr);
            if (st != FY_OK) {
                fprintf(stderr, "\nquality: context %d sample %d: %s\n", C, s, fy_status_str(st));
                goto out;
            }
            pr.done_before += (uint64_t)(o.continuation - 1);
        }
    }

    // ---- needle in a haystack ----
    found = calloc((size_t)n_rows * FY_MAX(o.n_niah_lengths, 1), sizeof(int));
    niah_acc = calloc((size_t)n_rows, sizeof(qual_acc_t));
    answers = malloc((size_t)n_rows * ANSWER_CAP);
    trials = cJSON_CreateArray();
    size_t n_filler = 0;
    if (acc == NULL || found == NULL || niah_acc == NULL || answers == NULL ||
        qual_corpus_concat(&corpus, &filler, &n_filler) != FY_OK) {
        fprintf(stderr, "quality: out of memory\n");
        goto out;
    }
    for (int li = 0; li < (o.niah ? o.n_niah_lengths : 0); li++) {
        int H = o.niah_lengths[li];
        if ((size_t)H > n_filler || H + 128 + NIAH_MAX_NEW > mc->n_ctx_train) {
            fprintf(stderr, "\nquality: skipping NIAH length %d (corpus or model too short)\n", H);
            continue;
        }
        for (int di = 0; di < o.niah_depths; di++) {
            double depth = o.niah_depths > 1 ? (double)di / (o.niah_depths - 1) : 0.5;
            int trial = li * o.niah_depths + di;
            char value[16];
            qual_niah_value(2026, trial, value, sizeof(value));
            // Each trial reads the haystack from a different place in the corpus.
            size_t off = ((size_t)trial * 7919u) % (n_filler - (size_t)H + 1);
            qual_niah_prompt_t p;
            fy_status_t st =
                qual_niah_build(tok, filler + off, n_filler - off, H, depth, value, &p);
            snprintf(pr.what, sizeof(pr.what), "NIAH %d tokens, depth %.0f%%", H, depth * 100);
            progress_show(&pr, pr.done_before);
            if (st == FY_OK)
                st = qual_niah_answer(batch, &p, NIAH_MAX_NEW, answers, ANSWER_CAP);
            if (st == FY_OK)
                qual_acc_add_code(niah_acc, batch);
            if (st != FY_OK) {
                fprintf(stderr, "\nquality: NIAH trial %d: %s\n", trial, fy_status_str(st));
                qual_niah_prompt_free(&p);
                goto out;
            }
            cJSON *t = cJSON_CreateObject();
            cJSON_AddNumberToObject(t, "haystack", H);
            cJSON_AddNumberToObject(t, "depth", depth);
            cJSON_AddNumberToObject(t, "prompt_tokens", p.n);
            cJSON_AddStringToObject(t, "value", value);
            cJSON *ans = cJSON_AddObjectToObject(t, "answers");
            for (int r = 0; r < n_rows; r++) {
                const char *a = answers + (size_t)r * ANSWER_CAP;
                bool ok = qual_niah_match(a, value);
                found[(size_t)li * n_rows + r] += ok;
                cJSON_AddStringToObject(ans, r == 0 ? "fp16 (reference)" : cfgs[r - 1].label, a);
            }
            cJSON_AddItemToArray(trials, t);
            qual_niah_prompt_free(&p);
            pr.done_before += (uint64_t)(H / 16 + NIAH_MAX_NEW);
            progress_show(&pr, pr.done_before);
        }
    }
    if (pr.tty)
        fprintf(stderr, "\n");

    // ---- report ----
    char machine[256], date[64], cmd[2048] = "ferry-bench quality";
    machine_line(machine, sizeof(machine));
    time_t now = time(NULL);
    strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", gmtime(&now));
    for (int i = 1; i < argc; i++) {
        size_t l = strlen(cmd);
        snprintf(cmd + l, sizeof(cmd) - l, " %s", argv[i]);
    }
    double secs = (double)(fy_clock_ns() - pr.t0) / 1e9;
    root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "bench", "quality");
    cJSON_AddStringToObject(root, "command", cmd);
    cJSON_AddStringToObject(root, "date", date);
    cJSON_AddStringToObject(root, "machine", machine);
    cJSON_AddStringToObject(root, "model", o.model);
    cJSON_AddStringToObject(root, "decode", qual_decode_name(o.decode));
    cJSON_AddNumberToObject(root, "continuation", o.continuation);
    cJSON_AddNumberToObject(root, "samples", o.samples);
    cJSON_AddNumberToObject(root, "seconds", secs);
    cJSON *cj = cJSON_AddArrayToObject(root, "corpus");
    for (int d = 0; d < corpus.n_docs; d++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "file", corpus.names[d]);
        cJSON_AddNumberToObject(e, "tokens", (double)corpus.n_ids[d]);
        cJSON_AddItemToArray(cj, e);
    }
    cJSON *res = cJSON_AddArrayToObject(root, "results");
    FILE *md = o.md ? fopen(o.md, "w") : NULL;
    FILE *outs[2] = {stdout, md};
    for (int k = 0; k < 2; k++) {
        FILE *f = outs[k];
        if (f == NULL)
            continue;
        fprintf(f, "%sferry-bench quality: %s, decode over %s", k ? "## " : "", o.model,
                o.decode == QUAL_DECODE_KVC ? "the compressed pages" : "a dequantized FP16 cache");
        if (o.ppl)
            fprintf(f, ", %d text(s) x %d-token continuation per context", o.samples,
                    o.continuation);
        fprintf(f, "\n\n");
    }
    for (int ci = 0; ci < (o.ppl ? o.n_contexts : 0) && acc != NULL; ci++) {
        const qual_acc_t *a = acc + (size_t)ci * n_rows;
        qual_metrics_t m0;
        qual_acc_metrics(a, 1 % n_rows, &m0);
        for (int k = 0; k < 2; k++) {
            FILE *f = outs[k];
            if (f == NULL)
                continue;
            fprintf(f, "%sContext %d tokens: reference (FP16 cache) PPL %.3f over %llu "
                       "predictions\n\n",
                    k ? "### " : "", o.contexts[ci], m0.ppl_ref,
                    (unsigned long long)a[0].n_pred);
            fprintf(f, "| config | b | wire ratio | dPPL %% | top-1 %% | KL (nats) | "
                       "budget met |\n| --- | ---: | ---: | ---: | ---: | ---: | :---: |\n");
            for (int r = 1; r < n_rows; r++) {
                qual_metrics_t m;
                qual_acc_metrics(a, r, &m);
                const qual_config_t *c = &cfgs[r - 1];
                char bs[16] = "-";
                if (c->budget >= 0)
                    snprintf(bs, sizeof(bs), "%g", c->budget);
                fprintf(f, "| %s | %s | %.4f | %+.3f | %.2f | %.5f | %s |\n", c->label, bs,
                        m.wire_ratio, m.dppl_pct, m.top1_pct, m.kl_mean,
                        a[r].n_budget_met == a[r].n_contexts ? "yes" : "no");
            }
            fprintf(f, "\n");
        }
        for (int r = 1; r < n_rows; r++) {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddNumberToObject(e, "context", o.contexts[ci]);
            cJSON_AddStringToObject(e, "label", cfgs[r - 1].label);
            cJSON_AddStringToObject(e, "policy", policy_of(&cfgs[r - 1]));
            if (cfgs[r - 1].budget >= 0)
                cJSON_AddNumberToObject(e, "budget", cfgs[r - 1].budget);
            else
                cJSON_AddNullToObject(e, "budget");
            json_metrics(e, a, r);
            cJSON_AddItemToArray(res, e);
        }
    }
    if (o.niah && n_niah > 0) {
        cJSON *nj = cJSON_AddArrayToObject(root, "niah");
        for (int k = 0; k < 2; k++) {
            FILE *f = outs[k];
            if (f == NULL)
                continue;
            fprintf(f, "%sNeedle in a haystack: exact-match retrieval, %d depths per length "
                       "(0-100 %%)\n\n| config | b |",
                    k ? "### " : "", o.niah_depths);
            for (int li = 0; li < o.n_niah_lengths; li++)
                fprintf(f, " %d tok |", o.niah_lengths[li]);
            fprintf(f, "\n| --- | ---: |");
            for (int li = 0; li < o.n_niah_lengths; li++)
                fprintf(f, " ---: |");
            fprintf(f, "\n");
            for (int r = 0; r < n_rows; r++) {
                char bs[16] = "-";
                if (r > 0 && cfgs[r - 1].budget >= 0)
                    snprintf(bs, sizeof(bs), "%g", cfgs[r - 1].budget);
                fprintf(f, "| %s | %s |", r == 0 ? "fp16 (full cache)" : cfgs[r - 1].label, bs);
                for (int li = 0; li < o.n_niah_lengths; li++)
                    fprintf(f, " %d/%d |", found[(size_t)li * n_rows + r], o.niah_depths);
                fprintf(f, "\n");
            }
            fprintf(f, "\n");
        }
        for (int r = 0; r < n_rows; r++) {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "label", r == 0 ? "fp16 (reference)" : cfgs[r - 1].label);
            cJSON_AddStringToObject(e, "policy", r == 0 ? "fp16" : policy_of(&cfgs[r - 1]));
            if (r > 0 && cfgs[r - 1].budget >= 0)
                cJSON_AddNumberToObject(e, "budget", cfgs[r - 1].budget);
            else
                cJSON_AddNullToObject(e, "budget");
            int tot = 0;
            cJSON *per = cJSON_AddObjectToObject(e, "found");
            for (int li = 0; li < o.n_niah_lengths; li++) {
                char key[16];
                snprintf(key, sizeof(key), "%d", o.niah_lengths[li]);
                cJSON_AddNumberToObject(per, key, found[(size_t)li * n_rows + r]);
                tot += found[(size_t)li * n_rows + r];
            }
            cJSON_AddNumberToObject(e, "trials", n_niah);
            cJSON_AddNumberToObject(e, "rate", n_niah ? (double)tot / n_niah : 0);
            cJSON_AddNumberToObject(e, "wire_ratio",
                                    niah_acc[r].fp16_bytes ? (double)niah_acc[r].wire_bytes /
                                                                 (double)niah_acc[r].fp16_bytes
                                                           : 0);
            cJSON_AddItemToArray(nj, e);
        }
        cJSON_AddItemToObject(root, "niah_trials", trials);
        trials = NULL;
    }
    if (md != NULL)
        fprintf(md, "Command: `%s`\n\nMachine: %s. Date: %s. Wall time: %.0f s.\n", cmd, machine,
                date, secs);
    printf("%s\n%s, %s, %.0f s\n", cmd, machine, date, secs);
    if (md != NULL)
        fclose(md);
    rc = 0;
    if (o.json != NULL) {
        char *text = cJSON_Print(root);
        FILE *f = fopen(o.json, "w");
        if (f == NULL || text == NULL || fputs(text, f) < 0) {
            fprintf(stderr, "quality: cannot write %s\n", o.json);
            rc = 1;
        }
        if (f != NULL)
            fclose(f);
        free(text);
    }
    if (rc == 0 && o.png != NULL) {
        if (o.json == NULL) {
            fprintf(stderr, "quality: --png needs --json\n");
            rc = 2;
        } else {
            const char *py = getenv("FERRY_PYTHON") ? getenv("FERRY_PYTHON") : ".venv/bin/python";
            char pcmd[4096];
            snprintf(pcmd, sizeof(pcmd), "'%s' scripts/plot-quality.py '%s' '%s'", py, o.json,
                     o.png);
            if (system(pcmd) != 0) {
                fprintf(stderr, "quality: plotting failed: %s\n", pcmd);
                rc = 1;
            }
        }
    }
out:
    cJSON_Delete(root);
    cJSON_Delete(trials);
    free(found);
    free(niah_acc);
    free(answers);
    free(filler);
    free(acc);
    qual_batch_destroy(batch);
    mdl_ctx_destroy(ctx);
    qual_corpus_free(&corpus);
    mdl_model_destroy(model);
    free(o.policy_list);
    return rc;
}
