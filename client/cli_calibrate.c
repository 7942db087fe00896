/*
 * cli_calibrate.c: `ferry calibrate --model M` runs once per model and writes the codec policy
 * file its prefill workers load (docs/quality.md). It is SpectrumKV's probe, extended:
 *
 *   1. Options the model tolerates. Each low-bit option (4/4, 4/2, 2/2, drop) is probed on its
 *      own: `ferry` with only {16/16, 8/8, o} allowed and no budget (every free token takes o),
 *      or for drop at the probe budget. A probe passes when its needle-in-a-haystack trials lose
 *      at most one trial in three against the full cache and its mean KL(full || probe) of the
 *      next-token distributions on corpus text stays under --kl-max.
 *   2. The rate controller's starting lambda per budget: `ferry` with the tolerated options at
 *      each budget; lambda of layer 0 and the mean over layers.
 *   3. Per-layer sensitivity: the tolerated policy at the probe budget on one layer at a time
 *      (the other layers FP16); weight_l = KL_l / mean KL.
 *
 * The policy file (--out, default <model>.policy.json) holds the keys kvc_policy_parse_json
 * reads; the lambdas, layer weights and every measured figure go to <out minus .json>
 * .calibration.json beside it. All rows of a step share one prefill and one decode batch.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quality.h"

enum { MAX_ROWS = 63, ANSWER_CAP = 128, NIAH_MAX_NEW = 24, N_BUDGETS = 5 };
static const double k_budgets[N_BUDGETS] = {0.5, 0.3, 0.25, 0.125, 0.0625};
static const kvc_opt_t k_probe_opts[] = {KVC_OPT_Q4, KVC_OPT_Q4V2, KVC_OPT_Q2, KVC_OPT_DROP};
enum { N_PROBES = 4 };

typedef struct {
    const char *model, *out, *corpus[16];
    int n_corpus;
    int trials, haystack, context, continuation, samples, threads;
    double kl_max, probe_budget;
    qual_decode_t decode;
} opts_t;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ferry calibrate --model M [--out FILE] [--corpus FILE|DIR]... [--trials 3]\n"
            "         [--haystack 2048] [--context 1024] [--continuation 64] [--samples 3]\n"
            "         [--kl-max 0.05] [--probe-budget 0.25] [--threads 2] [--decode kvc|dequant]\n"
            "Writes FILE (default M with .policy.json) and FILE's .calibration.json beside it.\n"
            "Default corpus: build/quality-corpus (scripts/build-corpus.sh).\n");
}

static int parse_opts(int argc, char **argv, opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->trials = 3;
    o->haystack = 2048;
    o->context = 1024;
    o->samples = 3;
    o->continuation = 64;
    o->threads = 2;
    o->kl_max = 0.05;
    o->probe_budget = 0.25;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (v == NULL) {
            fprintf(stderr, "ferry calibrate: %s needs a value\n", a);
            return -1;
        }
        i++;
        if (strcmp(a, "--model") == 0)
            o->model = v;
        else if (strcmp(a, "--out") == 0)
            o->out = v;
        else if (strcmp(a, "--corpus") == 0 && o->n_corpus < 16)
            o->corpus[o->n_corpus++] = v;
        else if (strcmp(a, "--trials") == 0)
            o->trials = atoi(v);
        else if (strcmp(a, "--haystack") == 0)
            o->haystack = atoi(v);
        else if (strcmp(a, "--context") == 0)
            o->context = atoi(v);
        else if (strcmp(a, "--continuation") == 0)
            o->continuation = atoi(v);
        else if (strcmp(a, "--samples") == 0)
            o->samples = atoi(v);
        else if (strcmp(a, "--threads") == 0)
            o->threads = atoi(v);
        else if (strcmp(a, "--kl-max") == 0)
            o->kl_max = atof(v);
        else if (strcmp(a, "--probe-budget") == 0)
            o->probe_budget = atof(v);
        else if (strcmp(a, "--decode") == 0 && qual_decode_parse(v, &o->decode) == FY_OK)
            continue;
        else {
            fprintf(stderr, "ferry calibrate: unknown option or value: %s %s\n", a, v);
            return -1;
        }
    }
    if (o->model == NULL || o->trials < 1 || o->trials > 32 || o->haystack < 64 ||
        o->context < 64 || o->continuation < 2 || o->samples < 1 || o->samples > 64 ||
        o->threads < 1 || !(o->kl_max > 0) || !(o->probe_budget > 0 && o->probe_budget <= 1)) {
        usage(stderr);
        return -1;
    }
    if (o->n_corpus == 0)
        o->corpus[o->n_corpus++] = "build/quality-corpus";
    return 0;
}

/* `ferry` restricted to 16/16, 8/8 and the options in mask. */
static void ferry_with(uint32_t mask, double budget, qual_config_t *c, const char *label)
{
    qual_config_builtin("ferry", budget, c);
    c->policy.options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_Q8) | mask;
    snprintf(c->label, sizeof(c->label), "%s", label);
}

/* Teacher forcing of o->samples corpus texts (spread over the documents; main checked that the
 * corpus has them) over a batch; sums into acc [rows]. One text's KL per layer is too noisy to
 * rank the layers by (bench/results/quality-calibration-samples.md). */
static fy_status_t eval_kl(mdl_ctx_t *ctx, const mdl_model_t *m, const opts_t *o,
                           const qual_corpus_t *corpus, const qual_config_t *cfg, int n,
                           qual_acc_t *acc)
{
    qual_batch_t *b;
    fy_status_t st = qual_batch_create(ctx, m, o->decode, cfg, n, &b);
    if (st != FY_OK)
        return st;
    memset(acc, 0, sizeof(qual_acc_t) * (size_t)(n + 1));
    for (int s = 0; s < o->samples && st == FY_OK; s++) {
        const int32_t *ids;
        st = qual_corpus_sample(corpus, o->context + o->continuation, o->samples, s, &ids, NULL);
        if (st == FY_OK)
            st = qual_eval_text(b, ids, o->context, o->continuation, acc, NULL, NULL);
    }
    qual_batch_destroy(b);
    return st;
}

static const char *opt_list_json(uint32_t mask, char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int k = 0; k < KVC_OPT_COUNT; k++) {
        if (mask & KVC_OPT_BIT(k))
            len += (size_t)snprintf(buf + len, cap - len, "%s\"%s\"", len ? ", " : "",
                                    kvc_opt_name((kvc_opt_t)k));
    }
    return buf;
}

int cli_calibrate_main(int argc, char **argv)
{
    opts_t o;
    if (parse_opts(argc, argv, &o) != 0)
        return 2;
    char err[512] = "";
    mdl_model_t *m = NULL;
    qual_corpus_t corpus;
    if (qual_load(o.model, o.corpus, o.n_corpus, &m, &corpus, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "ferry calibrate: %s\n", err);
        return 1;
    }
    const mdl_config_t *mc = mdl_model_config(m);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(m);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = o.threads;
    cp.max_batch = MAX_ROWS + 2;
    mdl_ctx_t *ctx = NULL;
    int rc = 1;
    qual_batch_t *b = NULL;
    cJSON *cal = cJSON_CreateObject();
    qual_config_t cfg[MAX_ROWS];
    qual_acc_t acc[MAX_ROWS + 1];
    char *answers = malloc((size_t)(N_PROBES + 1) * ANSWER_CAP);
    int found[N_PROBES + 1] = {0};
    int32_t *filler = NULL;
    size_t n_filler = 0;
    if (answers == NULL || mdl_ctx_create(m, &cp, &ctx) != FY_OK ||
        qual_corpus_concat(&corpus, &filler, &n_filler) != FY_OK)
        goto out;
    if ((size_t)o.haystack > n_filler || o.haystack + 256 > mc->n_ctx_train) {
        fprintf(stderr, "ferry calibrate: haystack %d: corpus or model context too short\n",
                o.haystack);
        goto out;
    }
    const int32_t *ids; // the KL texts exist
    if (qual_corpus_sample(&corpus, o.context + o.continuation, o.samples, o.samples - 1, &ids,
                           NULL) != FY_OK) {
        fprintf(stderr, "ferry calibrate: the corpus has no %d separate runs of %d tokens%s\n",
                o.samples, o.context + o.continuation, o.samples > 1 ? " (--samples)" : "");
        goto out;
    }

    // ---- 1. options ----
    fprintf(stderr,
            "calibrate: probing options (%d NIAH trials of %d tokens, KL on %d texts of %d+%d)\n",
            o.trials, o.haystack, o.samples, o.context, o.continuation);
    for (int i = 0; i < N_PROBES; i++) {
        kvc_opt_t opt = k_probe_opts[i];
        char label[48];
        snprintf(label, sizeof(label), "probe %s", kvc_opt_name(opt));
        ferry_with(KVC_OPT_BIT(opt), opt == KVC_OPT_DROP ? o.probe_budget : -1, &cfg[i], label);
        if (opt != KVC_OPT_DROP)
            cfg[i].policy.budget = 0; // no budget: every free token takes the probed option
        cfg[i].budget = opt == KVC_OPT_DROP ? o.probe_budget : -1;
    }
    if (qual_batch_create(ctx, m, o.decode, cfg, N_PROBES, &b) != FY_OK)
        goto out;
    for (int t = 0; t < o.trials; t++) {
        char value[16];
        qual_niah_value(77, t, value, sizeof(value));
        double depth = (t + 0.5) / o.trials;
        size_t off = ((size_t)t * 104729u) % (n_filler - (size_t)o.haystack + 1);
        qual_niah_prompt_t p;
        fy_status_t st = qual_niah_build(tok, filler + off, n_filler - off, o.haystack, depth,
                                         value, &p);
        if (st == FY_OK)
            st = qual_niah_answer(b, &p, NIAH_MAX_NEW, answers, ANSWER_CAP);
        qual_niah_prompt_free(&p);
        if (st != FY_OK) {
            fprintf(stderr, "ferry calibrate: NIAH trial %d: %s\n", t, fy_status_str(st));
            goto out;
        }
        for (int r = 0; r <= N_PROBES; r++)
            found[r] += qual_niah_match(answers + (size_t)r * ANSWER_CAP, value);
        fprintf(stderr, "calibrate: NIAH trial %d/%d done\n", t + 1, o.trials);
    }
    qual_batch_destroy(b);
    b = NULL;
    if (eval_kl(ctx, m, &o, &corpus, cfg, N_PROBES, acc) != FY_OK)
        goto out;
    uint32_t tolerated = 0;
    cJSON *probes = cJSON_AddArrayToObject(cal, "probes");
    int allowed_loss = o.trials / 3;
    for (int i = 0; i < N_PROBES; i++) {
        qual_metrics_t q;
        qual_acc_metrics(acc, i + 1, &q);
        bool niah_ok = found[i + 1] >= found[0] - allowed_loss;
        bool kl_ok = q.kl_mean <= o.kl_max;
        if (niah_ok && kl_ok)
            tolerated |= KVC_OPT_BIT(k_probe_opts[i]);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "option", kvc_opt_name(k_probe_opts[i]));
        cJSON_AddNumberToObject(e, "niah_found", found[i + 1]);
        cJSON_AddNumberToObject(e, "niah_found_full_cache", found[0]);
        cJSON_AddNumberToObject(e, "niah_trials", o.trials);
        cJSON_AddNumberToObject(e, "kl", q.kl_mean);
        cJSON_AddNumberToObject(e, "dppl_pct", q.dppl_pct);
        cJSON_AddNumberToObject(e, "top1_pct", q.top1_pct);
        cJSON_AddNumberToObject(e, "wire_ratio", q.wire_ratio);
        cJSON_AddBoolToObject(e, "tolerated", niah_ok && kl_ok);
        cJSON_AddItemToArray(probes, e);
        fprintf(stderr,
                "calibrate: %-5s NIAH %d/%d (full cache %d/%d), KL %.4f, dPPL %+.2f %% -> %s\n",
                kvc_opt_name(k_probe_opts[i]), found[i + 1], o.trials, found[0], o.trials,
                q.kl_mean, q.dppl_pct, niah_ok && kl_ok ? "tolerated" : "disabled");
    }
    uint32_t options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_Q8) | tolerated;

    // ---- 2. lambda per budget and 3. layer sensitivity, one batch ----
    int n = 0;
    for (int i = 0; i < N_BUDGETS; i++) {
        char label[48];
        snprintf(label, sizeof(label), "ferry@%g", k_budgets[i]);
        ferry_with(tolerated, k_budgets[i], &cfg[n++], label);
    }
    int first_layer_row = n;
    int n_layers = FY_MIN(mc->n_layers, MAX_ROWS - n);
    for (int l = 0; l < n_layers; l++) {
        char label[48];
        snprintf(label, sizeof(label), "layer %d", l);
        ferry_with(tolerated, o.probe_budget, &cfg[n], label);
        cfg[n++].only_layer = l;
    }
    fprintf(stderr, "calibrate: %d budgets and %d one-layer rows in one batch\n", N_BUDGETS,
            n_layers);
    if (eval_kl(ctx, m, &o, &corpus, cfg, n, acc) != FY_OK)
        goto out;
    cJSON *lam = cJSON_AddArrayToObject(cal, "lambda");
    for (int i = 0; i < N_BUDGETS; i++) {
        qual_metrics_t q;
        qual_acc_metrics(acc, i + 1, &q);
        // The multipliers' means over the texts.
        double texts = acc[i + 1].n_contexts ? (double)acc[i + 1].n_contexts : 1.0;
        double lam_first = acc[i + 1].lambda_first_sum / texts;
        double lam_mean = acc[i + 1].lambda_mean_sum / texts;
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "budget", k_budgets[i]);
        cJSON_AddNumberToObject(e, "lambda_first", lam_first);
        cJSON_AddNumberToObject(e, "lambda_mean", lam_mean);
        cJSON_AddNumberToObject(e, "kl", q.kl_mean);
        cJSON_AddNumberToObject(e, "dppl_pct", q.dppl_pct);
        cJSON_AddNumberToObject(e, "wire_ratio", q.wire_ratio);
        cJSON_AddItemToArray(lam, e);
        fprintf(stderr, "calibrate: b %-6g lambda %.4g (mean %.4g), KL %.4f, dPPL %+.2f %%\n",
                k_budgets[i], lam_first, lam_mean, q.kl_mean, q.dppl_pct);
    }
    double kl_sum = 0;
    for (int l = 0; l < n_layers; l++) {
        qual_metrics_t q;
        qual_acc_metrics(acc, first_layer_row + l + 1, &q);
        kl_sum += q.kl_mean;
    }
    cJSON *lw = cJSON_AddArrayToObject(cal, "layer_weights");
    cJSON *lk = cJSON_AddArrayToObject(cal, "layer_kl");
    for (int l = 0; l < n_layers; l++) {
        qual_metrics_t q;
        qual_acc_metrics(acc, first_layer_row + l + 1, &q);
        double w = kl_sum > 0 ? q.kl_mean * n_layers / kl_sum : 1.0;
        cJSON_AddItemToArray(lw, cJSON_CreateNumber(w));
        cJSON_AddItemToArray(lk, cJSON_CreateNumber(q.kl_mean));
    }

    // ---- write ----
    char out_path[4096], cal_path[4096], opts_buf[128];
    if (o.out != NULL)
        snprintf(out_path, sizeof(out_path), "%s", o.out);
    else
        snprintf(out_path, sizeof(out_path), "%s.policy.json", o.model);
    snprintf(cal_path, sizeof(cal_path), "%s", out_path);
    size_t cl = strlen(cal_path);
    if (cl > 5 && strcmp(cal_path + cl - 5, ".json") == 0)
        cal_path[cl - 5] = '\0';
    strncat(cal_path, ".calibration.json", sizeof(cal_path) - strlen(cal_path) - 1);
    // The policy names its calibration by a path relative to itself (the two stay together).
    const char *cal_name = strrchr(cal_path, '/') ? strrchr(cal_path, '/') + 1 : cal_path;
    char policy_text[4608];
    snprintf(policy_text, sizeof(policy_text),
             "{\n  \"base\": \"ferry\",\n  \"name\": \"ferry-calibrated\",\n"
             "  \"options\": [%s],\n  \"budget\": %g,\n  \"calibration\": \"%s\"\n}\n",
             opt_list_json(options, opts_buf, sizeof(opts_buf)), o.probe_budget, cal_name);
    time_t now = time(NULL);
    char date[64];
    strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", gmtime(&now));
    cJSON_AddStringToObject(cal, "model", o.model);
    cJSON_AddStringToObject(cal, "date", date);
    cJSON_AddStringToObject(cal, "policy_file", out_path);
    cJSON_AddStringToObject(cal, "decode", qual_decode_name(o.decode));
    cJSON_AddNumberToObject(cal, "kl_max", o.kl_max);
    cJSON_AddNumberToObject(cal, "probe_budget", o.probe_budget);
    cJSON_AddNumberToObject(cal, "samples", o.samples);
    cJSON_AddNumberToObject(cal, "context", o.context);
    cJSON_AddNumberToObject(cal, "continuation", o.continuation);
    FILE *f = fopen(out_path, "w");
    char *ct = cJSON_Print(cal);
    FILE *g = fopen(cal_path, "w");
    if (f == NULL || g == NULL || ct == NULL || fputs(policy_text, f) < 0 || fputs(ct, g) < 0) {
        fprintf(stderr, "ferry calibrate: cannot write %s / %s\n", out_path, cal_path);
    } else {
        printf("policy: %s\ncalibration: %s\noptions: %s\n", out_path, cal_path, opts_buf);
        rc = 0;
    }
    if (f != NULL && fclose(f) != 0)
        rc = 1;
    if (g != NULL && fclose(g) != 0)
        rc = 1;
    free(ct);
    kvc_policy_t check;
    char perr[640] = "";
    if (rc == 0 && kvc_policy_load_file(out_path, &check, perr, sizeof(perr)) != FY_OK) {
        fprintf(stderr, "ferry calibrate: internal: %s does not load: %s\n", out_path, perr);
        rc = 1;
    }
out:
    qual_batch_destroy(b);
    cJSON_Delete(cal);
    free(answers);
    free(filler);
    mdl_ctx_destroy(ctx);
    qual_corpus_free(&corpus);
    mdl_model_destroy(m);
    return rc;
}
