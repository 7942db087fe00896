/*
 * sampler.c: next-token selection. In order: the logit biases, the repetition penalty over the
 * recent tokens (CTRL-style: positive logits divided, negative multiplied), the presence and
 * frequency penalties over the generated tokens (OpenAI's: subtracted), then greedy when
 * temperature is 0, else temperature, top-k, top-p (nucleus) and a draw from a seeded
 * generator (xoshiro256**), so a seed reproduces a generation exactly.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

struct mdl_sampler {
    mdl_sampler_params_t p;
    int n_vocab;
    uint64_t rng[4];
    int32_t *recent; /* ring of the last penalty_last_n tokens */
    int n_recent;
    int recent_pos;
    int n_sampled;
    uint32_t *out_count; /* [n_vocab] generated tokens' occurrences, with presence/frequency */
    int32_t *out_seen;   /* the distinct generated tokens, in order: [n_seen] of [cap_seen] */
    int n_seen, cap_seen;
    mdl_json_t json; /* JSON mode: where the generated text stands */
    mdl_schema_state_t schema; /* ... with a schema */
    bool json_off;   /* JSON mode gave up (a forced token broke the object) */
    int32_t *idx;  /* [n_vocab] candidate order */
    float *probs;  /* [n_vocab] */
};

void mdl_sampler_params_default(mdl_sampler_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = 0.7f;
    p->top_k = 40;
    p->top_p = 0.95f;
    p->repetition_penalty = 1.0f;
    p->penalty_last_n = 64;
    p->seed = 0x5eed;
    p->max_tokens = 256;
}

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t next_u64(uint64_t *s)
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

fy_status_t mdl_sampler_params_check(const mdl_sampler_params_t *params, int n_vocab)
{
    if (params == NULL || n_vocab <= 0 || params->top_k < 0 || params->penalty_last_n < 0 ||
        !(params->top_p > 0.0f && params->top_p <= 1.0f) || !(params->repetition_penalty > 0.0f) ||
        params->n_stop < 0 || params->n_stop > MDL_MAX_STOP || isnan(params->temperature) ||
        !(fabsf(params->presence_penalty) <= MDL_MAX_PENALTY) ||
        !(fabsf(params->frequency_penalty) <= MDL_MAX_PENALTY) || params->n_logit_bias < 0 ||
        params->n_logit_bias > MDL_MAX_LOGIT_BIAS ||
        (params->schema != NULL && params->json == NULL))
        return FY_ERR_INVALID_ARG;
    for (int i = 0; i < params->n_logit_bias; i++) {
        if (params->bias_token[i] < 0 || params->bias_token[i] >= n_vocab ||
            !(fabsf(params->bias[i]) <= MDL_MAX_BIAS))
            return FY_ERR_INVALID_ARG;
        for (int j = 0; j < i; j++)
            if (params->bias_token[j] == params->bias_token[i])
                return FY_ERR_INVALID_ARG;
    }
    return FY_OK;
}

fy_status_t mdl_sampler_create(const mdl_sampler_params_t *params, int n_vocab, mdl_sampler_t **s_p)
{
    fy_status_t st = mdl_sampler_params_check(params, n_vocab);
    if (st != FY_OK)
        return st;
    mdl_sampler_t *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return FY_ERR_NO_MEMORY;
    s->p = *params;
    s->n_vocab = n_vocab;
    mdl_json_init(&s->json);
    if (params->schema != NULL)
        mdl_schema_start(params->schema, &s->schema);
    uint64_t x = params->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix(&x);
    s->recent = malloc((size_t)FY_MAX(params->penalty_last_n, 1) * sizeof(int32_t));
    s->idx = malloc((size_t)n_vocab * sizeof(int32_t));
    s->probs = malloc((size_t)n_vocab * sizeof(float));
    if (params->presence_penalty != 0.0f || params->frequency_penalty != 0.0f)
        s->out_count = calloc((size_t)n_vocab, sizeof(uint32_t));
    if (s->recent == NULL || s->idx == NULL || s->probs == NULL ||
        ((params->presence_penalty != 0.0f || params->frequency_penalty != 0.0f) &&
         s->out_count == NULL)) {
        mdl_sampler_destroy(s);
        return FY_ERR_NO_MEMORY;
    }
    *s_p = s;
    return FY_OK;
}

void mdl_sampler_destroy(mdl_sampler_t *s)
{
    if (s == NULL)
        return;
    free(s->recent);
    free(s->out_count);
    free(s->out_seen);
    free(s->idx);
    free(s->probs);
    free(s);
}

void mdl_sampler_accept(mdl_sampler_t *s, int32_t token)
{
    if (s->p.penalty_last_n == 0)
        return;
    s->recent[s->recent_pos] = token;
    s->recent_pos = (s->recent_pos + 1) % s->p.penalty_last_n;
    if (s->n_recent < s->p.penalty_last_n)
        s->n_recent++;
}

void mdl_sampler_accept_output(mdl_sampler_t *s, int32_t token)
{
    mdl_sampler_accept(s, token);
    if (s->p.json != NULL && !s->json_off &&
        (s->p.schema != NULL
             ? !mdl_schema_complete(&s->schema) &&
                   !mdl_schema_accept(s->p.schema, s->p.json, &s->schema, token)
             : !mdl_json_complete(&s->json) && !mdl_json_accept(s->p.json, &s->json, token)))
        s->json_off = true; // not a token the mask allowed (forced): stop guiding
    if (s->out_count == NULL || token < 0 || token >= s->n_vocab)
        return;
    if (s->out_count[token]++ > 0)
        return;
    if (s->n_seen == s->cap_seen) {
        int cap = s->cap_seen ? 2 * s->cap_seen : 64;
        int32_t *p = realloc(s->out_seen, (size_t)cap * sizeof(int32_t));
        if (p == NULL) { // out of memory: the penalties miss this token rather than fail
            s->out_count[token] = 0;
            return;
        }
        s->out_seen = p;
        s->cap_seen = cap;
    }
    s->out_seen[s->n_seen++] = token;
}

/* Sorts candidate indices by logit, descending (ties: lower id first). */
static int cmp_desc(const void *a, const void *b, void *arg)
{
    const float *l = arg;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (l[x] != l[y])
        return l[x] > l[y] ? -1 : 1;
    return x < y ? -1 : 1;
}

int32_t mdl_sampler_sample(mdl_sampler_t *s, float *logits)
{
    int n = s->n_vocab;
    s->n_sampled++;
    for (int i = 0; i < s->p.n_logit_bias; i++)
        logits[s->p.bias_token[i]] += s->p.bias[i];
    if (s->p.repetition_penalty != 1.0f) {
        // Penalize each distinct recent token once.
        for (int i = 0; i < s->n_recent; i++) {
            int32_t t = s->recent[i];
            if (t < 0 || t >= n)
                continue;
            bool seen = false;
            for (int j = 0; j < i; j++)
                seen |= s->recent[j] == t;
            if (seen)
                continue;
            logits[t] = logits[t] > 0 ? logits[t] / s->p.repetition_penalty
                                      : logits[t] * s->p.repetition_penalty;
        }
    }
    for (int i = 0; i < s->n_seen; i++) {
        int32_t t = s->out_seen[i];
        logits[t] -= s->p.presence_penalty + s->p.frequency_penalty * (float)s->out_count[t];
    }
    if (s->p.json != NULL && !s->json_off) {
        // Nothing allowed (a complete object and no stop token, say): unguided rather than a
        // draw from nothing. probs is scratch until the draw below.
        memcpy(s->probs, logits, (size_t)n * sizeof(float));
        int allowed = s->p.schema != NULL
                          ? mdl_schema_mask(s->p.schema, s->p.json, &s->schema, s->p.stop,
                                            s->p.n_stop, logits)
                          : mdl_json_mask(s->p.json, &s->json, s->p.stop, s->p.n_stop, logits);
        if (allowed == 0) {
            memcpy(logits, s->probs, (size_t)n * sizeof(float));
            s->json_off = true;
        }
    }
    if (s->p.temperature <= 0.0f) {
        int32_t best = 0;
        for (int i = 1; i < n; i++) {
            if (logits[i] > logits[best])
                best = i;
        }
        return best;
    }
    // Top-k candidates, sorted (a full sort when top-k is off: only top-p then trims).
    int k = s->p.top_k > 0 && s->p.top_k < n ? s->p.top_k : n;
    for (int i = 0; i < n; i++)
        s->idx[i] = i;
    if (k <= 64) {
        // Small k: selection of the k best is cheaper than sorting the vocabulary.
        for (int i = 0; i < k; i++) {
            int best = i;
            for (int j = i + 1; j < n; j++) {
                if (logits[s->idx[j]] > logits[s->idx[best]])
                    best = j;
            }
            int32_t tmp = s->idx[i];
            s->idx[i] = s->idx[best];
            s->idx[best] = tmp;
        }
    } else {
        qsort_r(s->idx, (size_t)n, sizeof(int32_t), cmp_desc, logits);
    }
    float inv_t = 1.0f / s->p.temperature;
    float mx = logits[s->idx[0]];
    double sum = 0.0;
    for (int i = 0; i < k; i++) {
        s->probs[i] = expf((logits[s->idx[i]] - mx) * inv_t);
        sum += s->probs[i];
    }
    // Top-p: the smallest prefix whose mass reaches top_p.
    int keep = k;
    if (s->p.top_p < 1.0f) {
        double acc = 0.0;
        for (int i = 0; i < k; i++) {
            acc += s->probs[i] / sum;
            if (acc >= s->p.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    double kept = 0.0;
    for (int i = 0; i < keep; i++)
        kept += s->probs[i];
    double r = (double)(next_u64(s->rng) >> 11) * 0x1.0p-53 * kept;
    for (int i = 0; i < keep; i++) {
        r -= s->probs[i];
        if (r < 0.0)
            return s->idx[i];
    }
    return s->idx[keep - 1];
}

bool mdl_sampler_done(const mdl_sampler_t *s, int32_t token)
{
    for (int i = 0; i < s->p.n_stop; i++) {
        if (s->p.stop[i] == token)
            return true;
    }
    return s->p.max_tokens > 0 && s->n_sampled >= s->p.max_tokens;
}

float mdl_logprobs(const float *logits, int n_vocab, int32_t chosen, int n_top, int32_t *top_ids,
                   float *top_lps)
{
    if (logits == NULL || n_vocab <= 0 || chosen < 0 || chosen >= n_vocab || n_top < 0 ||
        (n_top > 0 && (top_ids == NULL || top_lps == NULL)))
        return NAN;
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > max)
            max = logits[i];
    if (!isfinite(max))
        return NAN;
    double sum = 0.0; // float exponentials (half the time of double ones), a double sum
    for (int i = 0; i < n_vocab; i++)
        sum += expf(logits[i] - max);
    const double log_z = (double)max + log(sum);
    // The n_top largest logits, in descending order (ties: the lower id first), by insertion
    // into the sorted prefix: n_top is at most a few dozen.
    if (n_top > n_vocab)
        n_top = n_vocab;
    int have = 0;
    for (int i = 0; i < n_vocab && n_top > 0; i++) {
        const float v = logits[i];
        if (have == n_top && !(v > logits[top_ids[have - 1]]))
            continue;
        int j = have < n_top ? have++ : have - 1;
        while (j > 0 && v > logits[top_ids[j - 1]]) {
            top_ids[j] = top_ids[j - 1];
            j--;
        }
        top_ids[j] = i;
    }
    for (int j = 0; j < n_top; j++)
        top_lps[j] = (float)((double)logits[top_ids[j]] - log_z);
    return (float)((double)logits[chosen] - log_z);
}
