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
    p->window = 32;
    p->pool_kernel = 7;
    p->reduce = KVC_REDUCE_MEAN;
    p->joint_kv = true;
    p->rotate = true;
    p->backbone_frac = 1.0f / 64;
    p->backbone_opt = KVC_OPT_Q8;
    p->hybrid_threshold = 0; // off by default until it is shown to beat the plain optimizer
    p->hybrid_factor = 0.25f;
    p->dist = KVC_DIST_TRIAL;
    p->budget = 0.25;
    p->rate_flex = 0.25;
    // A window-only importance drops what later queries read: with the prior, SmolLM2 at 2048
    // tokens and b = 0.25 went from +2.5 % to +0.5 % dPPL and NIAH from 5/11 to 11/11.
    p->prior = 4.0f;
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
    if (p->group < 8 || p->group > 256 || p->group % 8)
        FAIL("group %u: must be 8..256 and a multiple of 8", p->group);
    if (p->window > 4096)
        FAIL("window %u: at most 4096", p->window);
    if (p->pool_kernel == 0 || p->pool_kernel % 2 == 0 || p->pool_kernel > 255)
        FAIL("pooling kernel %u: must be odd, 1..255", p->pool_kernel);
    if (p->reduce != KVC_REDUCE_MEAN && p->reduce != KVC_REDUCE_MAX)
        FAIL("reduce: unknown value");
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

static fy_status_t apply_key(kvc_policy_t *p, const cJSON *it, char *err, size_t err_len)
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
    } else if (strcmp(k, "recent") == 0) {
        st = j_uint(it, KVC_MAX_TOKENS, &p->recent, err, err_len);
    } else if (strcmp(k, "window") == 0) {
        st = j_uint(it, 4096, &p->window, err, err_len);
    } else if (strcmp(k, "pool_kernel") == 0) {
        st = j_uint(it, 255, &p->pool_kernel, err, err_len);
    } else if (strcmp(k, "reduce") == 0) {
        if (cJSON_IsString(it) && strcmp(it->valuestring, "mean") == 0)
            p->reduce = KVC_REDUCE_MEAN;
        else if (cJSON_IsString(it) && strcmp(it->valuestring, "max") == 0)
            p->reduce = KVC_REDUCE_MAX;
        else
            return jerr(err, err_len, k, "expected \"mean\" or \"max\"");
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
    } else {
        return jerr(err, err_len, k, "unknown key");
    }
    return st;
}

fy_status_t kvc_policy_parse_json(const char *text, size_t len, kvc_policy_t *policy_p,
                                  char *err, size_t err_len)
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
        if ((st = apply_key(&p, it, err, err_len)) != FY_OK)
            goto out;
    }
    if ((st = kvc_policy_validate(&p, err, err_len)) != FY_OK)
        goto out;
    *policy_p = p;
out:
    cJSON_Delete(root);
    return st;
}

fy_status_t kvc_policy_load_file(const char *path, kvc_policy_t *policy_p, char *err,
                                 size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        if (err && err_len)
            snprintf(err, err_len, "%s: cannot open", path);
        return FY_ERR_IO;
    }
    char *buf = malloc(65537);
    size_t n = buf ? fread(buf, 1, 65537, f) : 0;
    fclose(f);
    if (buf == NULL)
        return FY_ERR_NO_MEMORY;
    if (n > 65536) {
        free(buf);
        if (err && err_len)
            snprintf(err, err_len, "%s: larger than 64 KiB", path);
        return FY_ERR_FORMAT;
    }
    fy_status_t st = kvc_policy_parse_json(buf, n, policy_p, err, err_len);
    free(buf);
    return st;
}
