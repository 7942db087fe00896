/*
 * policy.c: codec policies as data. The built-in named policies and JSON policy files fill the
 * same kvc_policy_t, and every policy runs through the same scorer, optimizer and quantizers.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <cjson/cJSON.h>

#include "kvcodec_int.h"

void kvc_policy_default(kvc_policy_t *p)
{
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "ferry");
    p->options = KVC_OPT_ALL_MASK;
    p->group = 32;
    p->sinks = 4;
    // 16, not 64: at b = 0.25 and 2048 tokens the 48 extra FP16 tokens cost more than they
    // save (bench/results/quality-variants.md).
    p->recent = 16;
    // Both kept, not pinned to 16/16: the optimizer picks their precision but never drops
    // them (bench/results/quality-short-prompts.md: better from 32 to 2048 tokens).
    p->pins_kept = true;
    // 128 queries, RMS of their attention, pooling 9: at b = 0.125 SmolLM2 went from +5.9 %
    // to +2.7 % dPPL with these and prior 2 (bench/results/quality-variants.md). The scoring
    // work grows with W (W x n x d per head, ~2 % of a 2048-token prefill at W 128).
    p->window = 128;
    // ... but a 512-token prompt scores from its last 64 (n / 8): 128 are a quarter of it, and
    // at b = 0.25 its held-out KL went from 0.065 (32 queries, mean) to 0.112 (128, RMS) and
    // 0.055 (64, RMS). From 1024 tokens on all 128 are used.
    p->window_div = 8;
    p->pool_kernel = 9;
    p->reduce = KVC_REDUCE_MEAN;
    p->importance = KVC_IMP_RMS;
    p->joint_kv = true;
    p->rotate = true;
    // The HEX backbone's evenly spaced 8/8 tokens cost more than they save at every budget
    // measured on SmolLM2 (quality-variants.md); the option stays for other models.
    p->backbone_frac = 0;
    p->backbone_opt = KVC_OPT_Q8;
    p->hybrid_threshold = 0; // off by default until it is shown to beat the plain optimizer
    p->hybrid_factor = 0.25f;
    p->dist = KVC_DIST_TRIAL;
    p->budget = 0.25;
    p->rate_flex = 0.25;
    // A window-only importance drops what later queries read: with the prior, SmolLM2 at 2048
    // tokens and b = 0.25 went from +2.5 % to +0.5 % dPPL and NIAH from 5/11 to 11/11. With
    // the RMS importance 2 beats 4 (which beat 1 and 2 with the mean).
    p->prior = 2.0f;
    // The window's output stands in for every later query's, but theirs spread around it: with
    // a drop term of w^2 (|v - obar|^2 / (1 - w)^2 + 1 x the head's mean deviation) SmolLM2's KL
    // at 2048 tokens fell 60 % at b = 0.25 and 37 % at 0.125, and at most budgets from 64 to 512
    // tokens (0.5 and 2 did less; bench/results/quality-drop-spread.md).
    p->drop_spread = 1.0f;
    // With a calibration only: byte shares ~ weight^0.2 halved SmolLM2's KL at b = 0.25 and
    // cut it ~10 % at 0.125; larger exponents starve the layers the probe found insensitive
    // (0.5: +2.6 %, 1: +7.5 % dPPL at 0.25). Distortion weights did not help at 0.125.
    p->layer_alloc = 0.2f;
    p->layer_gamma = 0;
}

static const char *const k_builtin[] = {"fp16",   "int8",   "int4",      "kivi2", "snapkv",
                                        "h2o",    "pdtrim", "spectrum3", "ferry", NULL};

const char *const *kvc_policy_builtin_names(void)
{
    return k_builtin;
}

fy_status_t kvc_policy_builtin(const char *name, kvc_policy_t *out)
{
    if (name == NULL || out == NULL)
        return FY_ERR_INVALID_ARG;
    kvc_policy_t p;
    kvc_policy_default(&p);
    // Baselines: no backbone, no rotation, no HybridKV, no importance prior unless they are
    // the method itself.
    p.backbone_frac = 0;
    p.rotate = false;
    p.prior = 0;
    p.drop_spread = 0;
    p.pins_kept = false; // sinks and recent tokens pinned to 16/16, as published
    // Their scoring as published: the mean attention of a 32-query window (SnapKV's w).
    p.importance = KVC_IMP_MEAN;
    p.window = 32;
    p.window_div = 0;
    if (strcmp(name, "ferry") == 0) {
        kvc_policy_default(&p);
    } else if (strcmp(name, "fp16") == 0 || strcmp(name, "int8") == 0 ||
               strcmp(name, "int4") == 0) {
        // Uniform precision per token, nothing pinned, no budget.
        p.options = KVC_OPT_BIT(name[0] == 'f'   ? KVC_OPT_F16
                                : name[3] == '8' ? KVC_OPT_Q8
                                                 : KVC_OPT_Q4);
        p.sinks = p.recent = 0;
        p.budget = 0;
        p.dist = KVC_DIST_RANK;
    } else if (strcmp(name, "kivi2") == 0) {
        // KIVI 2-bit: everything 2/2 except an FP16 residual of the last 128 tokens.
        p.options = KVC_OPT_BIT(KVC_OPT_Q2);
        p.sinks = 0;
        p.recent = 128;
        p.budget = 0;
        p.dist = KVC_DIST_RANK;
    } else if (strcmp(name, "snapkv") == 0) {
        // SnapKV: pooled window attention, keep the top tokens in FP16, evict the rest.
        p.options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_DROP);
        p.sinks = 0;
        p.recent = 32;
        p.pool_kernel = 7;
        p.dist = KVC_DIST_RANK;
        p.joint_kv = false;
    } else if (strcmp(name, "h2o") == 0) {
        // H2O-style heavy hitters + recent tokens: accumulated attention, no pooling.
        p.options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_DROP);
        p.sinks = 0;
        p.recent = 64;
        p.pool_kernel = 1;
        p.reduce = KVC_REDUCE_MAX;
        p.dist = KVC_DIST_RANK;
        p.joint_kv = false;
    } else if (strcmp(name, "pdtrim") == 0) {
        // First s tokens plus the last tokens the budget allows.
        p.options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_DROP);
        p.sinks = 4;
        p.recent = 0;
        p.pool_kernel = 1;
        p.dist = KVC_DIST_POSITION;
        p.joint_kv = false;
    } else if (strcmp(name, "spectrum3") == 0) {
        // SpectrumKV greedy 3-tier: FP16 / INT8 / INT4 by score rank, sinks pinned.
        p.options = KVC_OPT_BIT(KVC_OPT_F16) | KVC_OPT_BIT(KVC_OPT_Q8) | KVC_OPT_BIT(KVC_OPT_Q4);
        p.sinks = 4;
        p.recent = 0;
        p.pool_kernel = 1;
        p.dist = KVC_DIST_RANK;
        p.joint_kv = false;
    } else {
        return FY_ERR_NOT_FOUND;
    }
    snprintf(p.name, sizeof(p.name), "%s", name);
    *out = p;
    return FY_OK;
}

fy_status_t kvc_policy_validate(const kvc_policy_t *p, char *err, size_t err_len)
{
#define FAIL(...)                                                                              \
    do {                                                                                       \
        if (err && err_len)                                                                    \
            snprintf(err, err_len, __VA_ARGS__);                                               \
        return FY_ERR_INVALID_ARG;                                                             \
    } while (0)
    if (p == NULL)
        FAIL("no policy");
    if (p->options == 0 || (p->options & ~KVC_OPT_ALL_MASK))
        FAIL("options: empty or unknown option bits 0x%x", p->options);
    if (p->group < 8 || p->group > KVC_MAX_GROUP || p->group % 8)
        FAIL("group %u: must be 8..%d and a multiple of 8", p->group, KVC_MAX_GROUP);
    if (p->window > 4096)
        FAIL("window %u: at most 4096", p->window);
    if (p->window_div > 1024)
        FAIL("window_div %u: at most 1024", p->window_div);
    if (p->pool_kernel == 0 || p->pool_kernel % 2 == 0 || p->pool_kernel > 255)
        FAIL("pooling kernel %u: must be odd, 1..255", p->pool_kernel);
    if (p->reduce != KVC_REDUCE_MEAN && p->reduce != KVC_REDUCE_MAX)
        FAIL("reduce: unknown value");
    if ((unsigned)p->importance > KVC_IMP_MAX)
        FAIL("importance: unknown value");
    if ((unsigned)p->dist > KVC_DIST_MODEL)
        FAIL("distortion: unknown value");
    if (!(p->backbone_frac >= 0 && p->backbone_frac <= 0.5f))
        FAIL("backbone fraction %g: must be in [0, 0.5]", (double)p->backbone_frac);
    if (p->backbone_opt != KVC_OPT_F16 && p->backbone_opt != KVC_OPT_Q8)
        FAIL("backbone option must be 16/16 or 8/8");
    if (!(p->hybrid_threshold >= 0 && p->hybrid_threshold <= 1))
        FAIL("hybrid threshold %g: must be in [0, 1]", (double)p->hybrid_threshold);
    if (!(p->hybrid_factor >= 0 && p->hybrid_factor <= 1))
        FAIL("hybrid factor %g: must be in [0, 1]", (double)p->hybrid_factor);
    if (!(p->budget <= 1.0) || isnan(p->budget))
        FAIL("budget %g: must be <= 1 (<= 0 for none)", p->budget);
    if (p->protect_channels > KVC_MAX_PROTECT)
        FAIL("protect_channels %u: at most %d", p->protect_channels, KVC_MAX_PROTECT);
    if (!(p->rate_flex >= 0 && p->rate_flex <= 4))
        FAIL("rate_flex %g: must be in [0, 4]", p->rate_flex);
    if (!(p->prior >= 0 && p->prior <= 64))
        FAIL("prior %g: must be in [0, 64]", (double)p->prior);
    if (!(p->drop_spread >= 0 && p->drop_spread <= 64))
        FAIL("drop_spread %g: must be in [0, 64]", (double)p->drop_spread);
    if (p->n_layer_weights > KVC_POLICY_MAX_LAYERS)
        FAIL("layer weights: %u layers, at most %d", p->n_layer_weights, KVC_POLICY_MAX_LAYERS);
    for (uint32_t l = 0; l < p->n_layer_weights; l++)
        if (!(p->layer_weight[l] >= 0 && p->layer_weight[l] <= 1e6f))
            FAIL("layer weight %u (%g): must be in [0, 1e6]", l, (double)p->layer_weight[l]);
    if (!(p->layer_alloc >= 0 && p->layer_alloc <= 4))
        FAIL("layer_alloc %g: must be in [0, 4]", (double)p->layer_alloc);
    if (!(p->layer_gamma >= 0 && p->layer_gamma <= 4))
        FAIL("layer_gamma %g: must be in [0, 4]", (double)p->layer_gamma);
    if (p->n_lambdas > KVC_POLICY_MAX_LAMBDAS)
        FAIL("lambda table: %u entries, at most %d", p->n_lambdas, KVC_POLICY_MAX_LAMBDAS);
    for (uint32_t i = 0; i < p->n_lambdas; i++) {
        if (!(p->lambda_budget[i] > 0 && p->lambda_budget[i] <= 1) ||
            (i > 0 && !(p->lambda_budget[i] > p->lambda_budget[i - 1])))
            FAIL("lambda table: budgets must be increasing, in (0, 1]");
        if (!(p->lambda_first[i] >= 0 && p->lambda_first[i] < 1e30))
            FAIL("lambda table: multiplier %g at b %g: must be finite and >= 0",
                 p->lambda_first[i], p->lambda_budget[i]);
    }
    return FY_OK;
#undef FAIL
}

/* ---- JSON ---- */

static fy_status_t jerr(char *err, size_t err_len, const char *key, const char *why)
{
    if (err && err_len)
        snprintf(err, err_len, "policy key \"%s\": %s", key, why);
    return FY_ERR_INVALID_ARG;
}

static fy_status_t j_uint(const cJSON *it, uint32_t max, uint32_t *out, char *err,
                          size_t err_len)
{
    if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > max ||
        it->valuedouble != floor(it->valuedouble))
        return jerr(err, err_len, it->string, "expected a whole number in range");
    *out = (uint32_t)it->valuedouble;
    return FY_OK;
}

static fy_status_t j_num(const cJSON *it, double lo, double hi, double *out, char *err,
                         size_t err_len)
{
    if (!cJSON_IsNumber(it) || !(it->valuedouble >= lo && it->valuedouble <= hi))
        return jerr(err, err_len, it->string, "expected a number in range");
    *out = it->valuedouble;
    return FY_OK;
}

static fy_status_t j_bool(const cJSON *it, bool *out, char *err, size_t err_len)
{
    if (!cJSON_IsBool(it))
        return jerr(err, err_len, it->string, "expected true or false");
    *out = cJSON_IsTrue(it);
    return FY_OK;
}

/* "layer_weights": 1..KVC_POLICY_MAX_LAYERS numbers >= 0 (a layer that measured no loss at
 * all may weigh 0; the encoder floors it). */
static fy_status_t j_layer_weights(const cJSON *it, kvc_policy_t *p)
{
    int n = cJSON_GetArraySize(it);
    if (!cJSON_IsArray(it) || n < 1 || n > KVC_POLICY_MAX_LAYERS)
        return FY_ERR_FORMAT;
    const cJSON *e;
    uint32_t l = 0;
    cJSON_ArrayForEach(e, it)
    {
        if (!cJSON_IsNumber(e) || !(e->valuedouble >= 0 && e->valuedouble <= 1e6))
            return FY_ERR_FORMAT;
        p->layer_weight[l++] = (float)e->valuedouble;
    }
    p->n_layer_weights = l;
    return FY_OK;
}

/* "lambda": [{"budget": b, "lambda_first": x, ...}, ...], distinct budgets in any order (kept
 * sorted by budget). */
static fy_status_t j_lambdas(const cJSON *it, kvc_policy_t *p)
{
    int n = cJSON_GetArraySize(it);
    if (!cJSON_IsArray(it) || n > KVC_POLICY_MAX_LAMBDAS)
        return FY_ERR_FORMAT;
    const cJSON *e;
    uint32_t i = 0;
    cJSON_ArrayForEach(e, it)
    {
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(e, "budget");
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(e, "lambda_first");
        if (!cJSON_IsNumber(b) || !cJSON_IsNumber(x) ||
            !(b->valuedouble > 0 && b->valuedouble <= 1) ||
            !(x->valuedouble >= 0 && x->valuedouble < 1e30))
            return FY_ERR_FORMAT;
        uint32_t j = i++; // insertion sort: at most 16 entries
        for (; j > 0 && p->lambda_budget[j - 1] > b->valuedouble; j--) {
            p->lambda_budget[j] = p->lambda_budget[j - 1];
            p->lambda_first[j] = p->lambda_first[j - 1];
        }
        if (j > 0 && p->lambda_budget[j - 1] == b->valuedouble)
            return FY_ERR_FORMAT;
        p->lambda_budget[j] = b->valuedouble;
        p->lambda_first[j] = x->valuedouble;
    }
    p->n_lambdas = i;
    return FY_OK;
}

static fy_status_t cal_err(char *err, size_t err_len, const char *path, const char *why)
{
    if (err && err_len)
        snprintf(err, err_len, "calibration %s: %s", path, why);
    return FY_ERR_FORMAT;
}

/* Reads up to 1 MiB of a file; NULL with *st_p set (and a message) when it cannot. */
static char *read_small_file(const char *path, size_t max, size_t *len_p, fy_status_t *st_p,
                             const char *what, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        if (err && err_len)
            snprintf(err, err_len, "%s %s: cannot open", what, path);
        *st_p = FY_ERR_IO;
        return NULL;
    }
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (buf == NULL) {
        *st_p = FY_ERR_NO_MEMORY;
        return NULL;
    }
    if (n > max) {
        free(buf);
        if (err && err_len)
            snprintf(err, err_len, "%s %s: larger than %zu KiB", what, path, max >> 10);
        *st_p = FY_ERR_FORMAT;
        return NULL;
    }
    *len_p = n;
    return buf;
}

fy_status_t kvc_policy_load_calibration(const char *path, kvc_policy_t *policy_p, char *err,
                                        size_t err_len)
{
    if (path == NULL || policy_p == NULL)
        return FY_ERR_INVALID_ARG;
    size_t len = 0;
    fy_status_t st = FY_OK;
    char *buf = read_small_file(path, 1u << 20, &len, &st, "calibration", err, err_len);
    if (buf == NULL)
        return st;
    cJSON *root = cJSON_ParseWithLength(buf, len);
    free(buf);
    if (root == NULL)
        return cal_err(err, err_len, path, "not valid JSON");
    kvc_policy_t p = *policy_p;
    const cJSON *lw = cJSON_GetObjectItemCaseSensitive(root, "layer_weights");
    const cJSON *lam = cJSON_GetObjectItemCaseSensitive(root, "lambda");
    if (!cJSON_IsObject(root))
        st = cal_err(err, err_len, path, "expected an object");
    else if (lw == NULL)
        st = cal_err(err, err_len, path, "no \"layer_weights\"");
    else if (j_layer_weights(lw, &p) != FY_OK)
        st = cal_err(err, err_len, path,
                     "\"layer_weights\": expected an array of 1..256 numbers in [0, 1e6]");
    else if (lam != NULL && j_lambdas(lam, &p) != FY_OK)
        st = cal_err(err, err_len, path,
                     "\"lambda\": expected at most 16 objects with distinct \"budget\"s in "
                     "(0, 1] and a finite \"lambda_first\" >= 0");
    else if (kvc_policy_validate(&p, err, err_len) != FY_OK)
        st = FY_ERR_FORMAT;
    cJSON_Delete(root);
    if (st == FY_OK)
        *policy_p = p;
    return st;
}

static fy_status_t apply_key(kvc_policy_t *p, const cJSON *it, const char *dir, char *err,
                             size_t err_len)
{
    const char *k = it->string;
    fy_status_t st = FY_OK;
    double d;
    if (strcmp(k, "base") == 0) {
        return FY_OK; // handled first
    } else if (strcmp(k, "name") == 0) {
        if (!cJSON_IsString(it) || strlen(it->valuestring) == 0 ||
            strlen(it->valuestring) >= sizeof(p->name))
            return jerr(err, err_len, k, "expected a string of 1..31 characters");
        snprintf(p->name, sizeof(p->name), "%s", it->valuestring);
    } else if (strcmp(k, "options") == 0) {
        if (!cJSON_IsArray(it) || cJSON_GetArraySize(it) == 0)
            return jerr(err, err_len, k, "expected a non-empty array of option names");
        uint32_t mask = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, it)
        {
            kvc_opt_t o;
            if (!cJSON_IsString(e) || kvc_opt_parse(e->valuestring, &o) != FY_OK)
                return jerr(err, err_len, k,
                            "unknown option (use 16/16, 8/8, 4/4, 4/2, 2/2, drop)");
            mask |= KVC_OPT_BIT(o);
        }
        p->options = mask;
    } else if (strcmp(k, "group") == 0) {
        st = j_uint(it, 256, &p->group, err, err_len);
    } else if (strcmp(k, "sinks") == 0) {
        st = j_uint(it, KVC_MAX_TOKENS, &p->sinks, err, err_len);
    } else if (strcmp(k, "pins_kept") == 0) {
        st = j_bool(it, &p->pins_kept, err, err_len);
    } else if (strcmp(k, "recent") == 0) {
        st = j_uint(it, KVC_MAX_TOKENS, &p->recent, err, err_len);
    } else if (strcmp(k, "window") == 0) {
        st = j_uint(it, 4096, &p->window, err, err_len);
    } else if (strcmp(k, "window_div") == 0) {
        st = j_uint(it, 1024, &p->window_div, err, err_len);
    } else if (strcmp(k, "pool_kernel") == 0) {
        st = j_uint(it, 255, &p->pool_kernel, err, err_len);
    } else if (strcmp(k, "reduce") == 0) {
        if (cJSON_IsString(it) && strcmp(it->valuestring, "mean") == 0)
            p->reduce = KVC_REDUCE_MEAN;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "max") == 0)
            p->reduce = KVC_REDUCE_MAX;
        else
            return jerr(err, err_len, k, "expected \"mean\" or \"max\"");
    } else if (strcmp(k, "importance") == 0) {
        if (cJSON_IsString(it) && strcmp(it->valuestring, "mean") == 0)
            p->importance = KVC_IMP_MEAN;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "rms") == 0)
            p->importance = KVC_IMP_RMS;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "max") == 0)
            p->importance = KVC_IMP_MAX;
        else
            return jerr(err, err_len, k, "expected \"mean\", \"rms\" or \"max\"");
    } else if (strcmp(k, "joint_kv") == 0) {
        st = j_bool(it, &p->joint_kv, err, err_len);
    } else if (strcmp(k, "rotate") == 0) {
        st = j_bool(it, &p->rotate, err, err_len);
    } else if (strcmp(k, "backbone_fraction") == 0) {
        if ((st = j_num(it, 0, 0.5, &d, err, err_len)) == FY_OK)
            p->backbone_frac = (float)d;
    } else if (strcmp(k, "backbone_option") == 0) {
        kvc_opt_t o;
        if (!cJSON_IsString(it) || kvc_opt_parse(it->valuestring, &o) != FY_OK ||
            (o != KVC_OPT_F16 && o != KVC_OPT_Q8))
            return jerr(err, err_len, k, "expected \"16/16\" or \"8/8\"");
        p->backbone_opt = o;
    } else if (strcmp(k, "hybrid_threshold") == 0) {
        if ((st = j_num(it, 0, 1, &d, err, err_len)) == FY_OK)
            p->hybrid_threshold = (float)d;
    } else if (strcmp(k, "hybrid_factor") == 0) {
        if ((st = j_num(it, 0, 1, &d, err, err_len)) == FY_OK)
            p->hybrid_factor = (float)d;
    } else if (strcmp(k, "distortion") == 0) {
        if (cJSON_IsString(it) && strcmp(it->valuestring, "trial") == 0)
            p->dist = KVC_DIST_TRIAL;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "rank") == 0)
            p->dist = KVC_DIST_RANK;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "position") == 0)
            p->dist = KVC_DIST_POSITION;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "model") == 0)
            p->dist = KVC_DIST_MODEL;
        else
            return jerr(err, err_len, k,
                        "expected \"trial\", \"model\", \"rank\" or \"position\"");
    } else if (strcmp(k, "budget") == 0) {
        st = j_num(it, -1, 1, &p->budget, err, err_len);
    } else if (strcmp(k, "protect_channels") == 0) {
        st = j_uint(it, KVC_MAX_PROTECT, &p->protect_channels, err, err_len);
    } else if (strcmp(k, "rate_flex") == 0) {
        st = j_num(it, 0, 4, &p->rate_flex, err, err_len);
    } else if (strcmp(k, "prior") == 0) {
        if ((st = j_num(it, 0, 64, &d, err, err_len)) == FY_OK)
            p->prior = (float)d;
    } else if (strcmp(k, "drop_spread") == 0) {
        if ((st = j_num(it, 0, 64, &d, err, err_len)) == FY_OK)
            p->drop_spread = (float)d;
    } else if (strcmp(k, "layer_alloc") == 0) {
        if ((st = j_num(it, 0, 4, &d, err, err_len)) == FY_OK)
            p->layer_alloc = (float)d;
    } else if (strcmp(k, "layer_gamma") == 0) {
        if ((st = j_num(it, 0, 4, &d, err, err_len)) == FY_OK)
            p->layer_gamma = (float)d;
    } else if (strcmp(k, "layer_weights") == 0) {
        if (j_layer_weights(it, p) != FY_OK)
            return jerr(err, err_len, k, "expected an array of 1..256 numbers in [0, 1e6]");
    } else if (strcmp(k, "calibration") == 0) {
        if (!cJSON_IsString(it) || it->valuestring[0] == '\0')
            return jerr(err, err_len, k, "expected the path of a calibration file");
        // A relative path names a file beside the policy file.
        char path[4096];
        if (dir != NULL && it->valuestring[0] != '/')
            snprintf(path, sizeof(path), "%s/%s", dir, it->valuestring);
        else
            snprintf(path, sizeof(path), "%s", it->valuestring);
        char why[512] = "";
        if ((st = kvc_policy_load_calibration(path, p, why, sizeof(why))) != FY_OK) {
            if (err && err_len)
                snprintf(err, err_len, "policy key \"calibration\": %s", why);
            return st;
        }
    } else {
        return jerr(err, err_len, k, "unknown key");
    }
    return st;
}

static fy_status_t parse_json(const char *text, size_t len, const char *dir,
                              kvc_policy_t *policy_p, char *err, size_t err_len)
{
    if (text == NULL || policy_p == NULL)
        return FY_ERR_INVALID_ARG;
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (root == NULL) {
        if (err && err_len)
            snprintf(err, err_len, "policy: not valid JSON");
        return FY_ERR_FORMAT;
    }
    fy_status_t st = FY_OK;
    kvc_policy_t p;
    if (!cJSON_IsObject(root)) {
        st = jerr(err, err_len, "(root)", "expected an object");
        goto out;
    }
    const cJSON *base = cJSON_GetObjectItemCaseSensitive(root, "base");
    if (base != NULL) {
        if (!cJSON_IsString(base) || kvc_policy_builtin(base->valuestring, &p) != FY_OK) {
            st = jerr(err, err_len, "base", "expected the name of a built-in policy");
            goto out;
        }
    } else {
        kvc_policy_default(&p);
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, root)
    {
        if ((st = apply_key(&p, it, dir, err, err_len)) != FY_OK)
            goto out;
    }
    if ((st = kvc_policy_validate(&p, err, err_len)) != FY_OK)
        goto out;
    *policy_p = p;
out:
    cJSON_Delete(root);
    return st;
}

fy_status_t kvc_policy_parse_json(const char *text, size_t len, kvc_policy_t *policy_p,
                                  char *err, size_t err_len)
{
    return parse_json(text, len, NULL, policy_p, err, err_len);
}

fy_status_t kvc_policy_load_file(const char *path, kvc_policy_t *policy_p, char *err,
                                 size_t err_len)
{
    if (path == NULL || policy_p == NULL)
        return FY_ERR_INVALID_ARG;
    size_t n = 0;
    fy_status_t st = FY_OK;
    char *buf = read_small_file(path, 1u << 16, &n, &st, "policy", err, err_len);
    if (buf == NULL)
        return st;
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash != NULL)
        *slash = '\0';
    st = parse_json(buf, n, slash != NULL ? dir : ".", policy_p, err, err_len);
    free(buf);
    return st;
}
