/*
 * bench_e2e.c: `ferry-bench e2e --cluster SPEC`, the serving path end to end on a cluster.
 *
 * Brings the spec's cluster up (cluster/cluster.h; netns to limit links, local otherwise), then
 * for each link limit (every host's link set with tc, --links) and each codec setting
 * (--policies: raw FP16 and the ferry policy at b = 0.5, 0.25, 0.125 by default; `default`
 * = what the workers choose, e.g. the bandwidth-adaptive budget) runs --requests requests from
 * --clients concurrent clients, prompts of --prompt-tokens lengths in turn (token ids, so the
 * length is exact; ignore_eos, so every request decodes --max-tokens tokens). Per setting:
 * TTFT and TPOT (router's figures: mean, p50, p90), transfer time, throughput (completion
 * tokens / wall time), KV bytes raw and on the wire. Per link, the TTFT saving of each budget
 * over FP16 next to the saving its byte reduction allows (TTFT can fall to the compute floor,
 * taken as the lowest TTFT seen at that prompt length, no further).
 *
 * Pipelining: each request's TTFT over max(prefill compute, transfer), both from the prefill
 * worker (RequestStats prefill_ms, transfer_ms), the transfer being at least the wire bytes at
 * the link limit's rate. With layer-by-layer streaming the transfer of
 * layer l overlaps the compute of layer l+1, so the ratio should stay near 1 (goal: <= 1.1);
 * without it TTFT would approach prefill + transfer. The ratio is also given with the prefill
 * queue wait taken out of TTFT (queue_ms), since concurrent clients queue behind each other
 * and that wait is not a pipelining cost.
 *
 * Output: a table on stdout, --json FILE, --md FILE and --png FILE (bench/plot_e2e.py draws
 * it with matplotlib). --quick: short prompts, few requests, few tokens.
 */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cluster.h"
#include "common.h"
#include "cluster_health.h"
#include "ferry_client.h"

#define MAX_CFG 16
#define MAX_LENS 8
#define MAX_REQ 512
#define BOUND_GOAL 1.1 /* TTFT <= 1.1 x max(prefill compute, transfer) */

typedef struct {
    char label[32];
    char policy[32]; /* empty: the workers' default */
    double budget;   /* 0: the policy's */
} codec_cfg_t;

typedef struct {
    int prompt_tokens;
    int ok;
    double ttft_ms, tpot_ms, transfer_ms, prefill_ms, queue_ms;
    uint64_t raw, wire;
    uint32_t completion;
} sample_t;

typedef struct {
    const char *router;
    const codec_cfg_t *codec;
    const int *lens;
    int n_lens;
    int max_tokens;
    int first, count;
    sample_t *out;
} worker_arg_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ferry-bench e2e --cluster SPEC [options]\n"
            "  --cluster SPEC        cluster spec (docs/cluster.md); netns to limit links\n"
            "  --quick               prompts 128,256 tokens, 4 requests, 8 tokens, 2 clients\n"
            "  --clients N           concurrent clients (default 4)\n"
            "  --requests N          requests per setting (default 16)\n"
            "  --prompt-tokens L,..  prompt lengths used in turn (default 512,1024,2048,4096)\n"
            "  --max-tokens N        completion tokens per request (default 32)\n"
            "  --links R,..          link limits (default 100mbit,1gbit,10gbit, --quick adds\n"
            "                        10mbit; netns only)\n"
            "  --policies P,..       fp16, NAME:B (budget), NAME, default (default\n"
            "                        fp16,ferry:0.5,ferry:0.25,ferry:0.125, plus `adaptive`\n"
            "                        when the spec sets codec.ttft_target)\n"
            "  --json FILE, --md FILE, --png FILE   results (--json - : stdout)\n"
            "  --keep                leave the cluster up afterwards\n");
}


/* Deterministic prompt ids: ordinary tokens of the vocabulary, different per request. */
static void prompt_ids(uint32_t *ids, int n, uint32_t seed)
{
    uint64_t x = 0x9e3779b97f4a7c15ull ^ seed;
    for (int i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = 200 + (uint32_t)((x >> 33) % 30000);
    }
}

static void *client_main(void *arg)
{
    worker_arg_t *w = arg;
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = w->router;
    p.timeout_ms = 600000;
    p.max_attempts = 1;
    p.max_message = 64u << 20;
    ferry_client_t *c;
    if (ferry_client_create(&p, &c) != 0)
        return NULL;
    uint32_t *ids = malloc(sizeof(uint32_t) * 65536);
    for (int i = 0; i < w->count && ids != NULL; i++) {
        int r = w->first + i;
        sample_t *s = &w->out[r];
        s->prompt_tokens = w->lens[r % w->n_lens];
        prompt_ids(ids, s->prompt_tokens, (uint32_t)r * 7919u + 1);
        Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
        Ferry__V1__SamplingParams sp = FERRY__V1__SAMPLING_PARAMS__INIT;
        Ferry__V1__CodecParams cp = FERRY__V1__CODEC_PARAMS__INIT;
        Ferry__V1__TokenIds tk = FERRY__V1__TOKEN_IDS__INIT;
        tk.ids = ids;
        tk.n_ids = (size_t)s->prompt_tokens;
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS;
        req.prompt_token_ids = &tk;
        sp.max_tokens = (uint32_t)w->max_tokens;
        sp.ignore_eos = true;
        req.sampling = &sp;
        if (w->codec->policy[0]) {
            cp.policy = (char *)w->codec->policy;
            cp.budget = (float)w->codec->budget;
            req.codec = &cp;
        }
        Ferry__V1__CompleteResponse *resp = NULL;
        ferry_error_t err;
        int code = ferry_complete(c, &req, &resp, &err);
        if (code == 0 && resp->stats != NULL) {
            s->ok = 1;
            s->ttft_ms = resp->stats->ttft_ms;
            s->tpot_ms = resp->stats->tpot_ms;
            s->transfer_ms = resp->stats->transfer_ms;
            s->prefill_ms = resp->stats->prefill_ms;
            s->queue_ms = resp->stats->queue_ms;
            s->raw = resp->stats->kv_raw_bytes;
            s->wire = resp->stats->kv_wire_bytes;
            s->completion = resp->stats->completion_tokens;
        } else {
            fprintf(stderr, "e2e: request %d: %s: %s\n", r, ferry_code_name(code), err.message);
        }
        ferry_message_free(resp);
    }
    free(ids);
    ferry_client_destroy(c);
    return NULL;
}

typedef struct {
    char link[24];
    uint64_t link_bps;
    codec_cfg_t codec;
    int requests, ok;
    double ttft_mean, ttft_p50, ttft_p90, tpot_mean, transfer_mean, wall_s, tok_s;
    double prefill_mean, queue_mean, link_mean;
    // TTFT / max(prefill_ms, transfer_ms) per request; _xq: TTFT less the queue wait
    double bound_p50, bound_p90, bound_xq_p50, bound_xq_p90;
    double ttft_by_len[MAX_LENS];
    uint64_t raw, wire;
} result_t;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double q)
{
    if (n == 0)
        return NAN;
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    double pos = q * (n - 1);
    int lo = (int)pos;
    return lo + 1 < n ? v[lo] + (pos - lo) * (v[lo + 1] - v[lo]) : v[lo];
}

static void run_setting(const char *router, const codec_cfg_t *codec, const int *lens, int n_lens,
                        int requests, int clients, int max_tokens, result_t *res)
{
    sample_t *s = calloc((size_t)requests, sizeof(*s));
    worker_arg_t w[64];
    pthread_t t[64];
    uint64_t t0 = fy_clock_ns();
    int per = requests / clients, extra = requests % clients, first = 0;
    for (int i = 0; i < clients; i++) {
        w[i] = (worker_arg_t){router, codec, lens, n_lens, max_tokens, first,
                              per + (i < extra ? 1 : 0), s};
        first += w[i].count;
        pthread_create(&t[i], NULL, client_main, &w[i]);
    }
    for (int i = 0; i < clients; i++)
        pthread_join(t[i], NULL);
    res->wall_s = (fy_clock_ns() - t0) / 1e9;
    res->codec = *codec;
    res->requests = requests;
    double *ttft = calloc((size_t)requests, sizeof(double));
    double *bound = calloc((size_t)requests, sizeof(double));
    double *bound_xq = calloc((size_t)requests, sizeof(double));
    double sum_t = 0, sum_p = 0, sum_x = 0, sum_pf = 0, sum_q = 0, sum_l = 0;
    double by_len[MAX_LENS] = {0};
    int n_bound = 0;
    int n_len[MAX_LENS] = {0};
    uint64_t tokens = 0;
    for (int i = 0; i < requests; i++) {
        if (!s[i].ok)
            continue;
        ttft[res->ok++] = s[i].ttft_ms;
        sum_t += s[i].ttft_ms;
        sum_p += s[i].tpot_ms;
        sum_x += s[i].transfer_ms;
        sum_pf += s[i].prefill_ms;
        sum_q += s[i].queue_ms;
        /* transfer_ms counts the time kvlink held frames; frames that fit in the socket
         * buffers complete early and leave it short of the link's time, so the wire bytes
         * at the link's rate (a lower bound: TCP/IP headers not counted) stand in too */
        double link_ms = res->link_bps ? s[i].wire * 8e3 / (double)res->link_bps : 0;
        sum_l += link_ms;
        double ideal = fmax(s[i].prefill_ms, fmax(s[i].transfer_ms, link_ms));
        if (ideal > 0) { /* workers that do not report prefill_ms leave it out */
            bound[n_bound] = s[i].ttft_ms / ideal;
            bound_xq[n_bound++] = (s[i].ttft_ms - s[i].queue_ms) / ideal;
        }
        res->raw += s[i].raw;
        res->wire += s[i].wire;
        tokens += s[i].completion;
        for (int k = 0; k < n_lens; k++) {
            if (lens[k] == s[i].prompt_tokens) {
                by_len[k] += s[i].ttft_ms;
                n_len[k]++;
            }
        }
    }
    int n = res->ok;
    res->ttft_mean = n ? sum_t / n : NAN;
    res->tpot_mean = n ? sum_p / n : NAN;
    res->transfer_mean = n ? sum_x / n : NAN;
    res->prefill_mean = n ? sum_pf / n : NAN;
    res->queue_mean = n ? sum_q / n : NAN;
    res->link_mean = n && res->link_bps ? sum_l / n : NAN;
    res->bound_p50 = pct(bound, n_bound, 0.5);
    res->bound_p90 = pct(bound, n_bound, 0.9);
    res->bound_xq_p50 = pct(bound_xq, n_bound, 0.5);
    res->bound_xq_p90 = pct(bound_xq, n_bound, 0.9);
    res->ttft_p50 = pct(ttft, n, 0.5);
    res->ttft_p90 = pct(ttft, n, 0.9);
    res->tok_s = tokens / res->wall_s;
    for (int k = 0; k < n_lens; k++)
        res->ttft_by_len[k] = n_len[k] ? by_len[k] / n_len[k] : NAN;
    free(ttft);
    free(bound);
    free(bound_xq);
    free(s);
}

static int parse_list_int(const char *s, int *out, int max)
{
    int n = 0;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", s);
    for (char *save, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        long v = strtol(tok, NULL, 10);
        if (n >= max || v < 1 || v > 60000)
            return -1;
        out[n++] = (int)v;
    }
    return n;
}

static int parse_policies(const char *s, codec_cfg_t *out, int max)
{
    int n = 0;
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", s);
    for (char *save, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (n >= max || strlen(tok) >= sizeof(out[0].policy))
            return -1;
        codec_cfg_t *c = &out[n++];
        memset(c, 0, sizeof(*c));
        snprintf(c->label, sizeof(c->label), "%s", tok);
        if (strcmp(tok, "default") == 0)
            continue;
        char *colon = strchr(tok, ':');
        if (colon != NULL) {
            *colon = '\0';
            c->budget = strtod(colon + 1, NULL);
            if (!(c->budget > 0 && c->budget <= 1))
                return -1;
        }
        snprintf(c->policy, sizeof(c->policy), "%s", tok);
    }
    return n;
}

/* bit/s from "100mbit", "1gbit", "unlimited" (as the spec takes them) via a one-line spec */
static int parse_links(const char *s, char names[][24], uint64_t *bps, int max)
{
    int n = 0;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", s);
    for (char *save, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char text[256], err[256];
        snprintf(text, sizeof(text), "name: x\nmodel: /m\nhosts: [{name: a, link: {bandwidth: %s}}]"
                                     "\nroles: {router: {host: a}, prefill: {host: a}, "
                                     "decode: {host: a}}\n", tok);
        fy_cluster_spec_t *sp = malloc(sizeof(*sp));
        if (n >= max || sp == NULL ||
            fy_cluster_spec_parse(text, strlen(text), "--links", "/", -1, sp, err,
                                  sizeof(err)) != FY_OK) {
            free(sp);
            return -1;
        }
        snprintf(names[n], 24, "%s", tok);
        bps[n++] = sp->hosts[0].bandwidth_bps;
        free(sp);
    }
    return n;
}

static cJSON *result_json(const result_t *r, const int *lens, int n_lens)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "link", r->link);
    cJSON_AddNumberToObject(o, "link_bps", (double)r->link_bps);
    cJSON_AddStringToObject(o, "setting", r->codec.label);
    cJSON_AddStringToObject(o, "policy", r->codec.policy[0] ? r->codec.policy : "(workers')");
    cJSON_AddNumberToObject(o, "budget", r->codec.budget);
    cJSON_AddNumberToObject(o, "requests", r->requests);
    cJSON_AddNumberToObject(o, "ok", r->ok);
    cJSON_AddNumberToObject(o, "ttft_ms_mean", r->ttft_mean);
    cJSON_AddNumberToObject(o, "ttft_ms_p50", r->ttft_p50);
    cJSON_AddNumberToObject(o, "ttft_ms_p90", r->ttft_p90);
    cJSON_AddNumberToObject(o, "tpot_ms_mean", r->tpot_mean);
    cJSON_AddNumberToObject(o, "transfer_ms_mean", r->transfer_mean);
    cJSON_AddNumberToObject(o, "prefill_ms_mean", r->prefill_mean);
    cJSON_AddNumberToObject(o, "queue_ms_mean", r->queue_mean);
    cJSON_AddNumberToObject(o, "link_ms_mean", r->link_mean);
    cJSON_AddNumberToObject(o, "ttft_over_bound_p50", r->bound_p50);
    cJSON_AddNumberToObject(o, "ttft_over_bound_p90", r->bound_p90);
    cJSON_AddNumberToObject(o, "ttft_less_queue_over_bound_p50", r->bound_xq_p50);
    cJSON_AddNumberToObject(o, "ttft_less_queue_over_bound_p90", r->bound_xq_p90);
    cJSON_AddNumberToObject(o, "throughput_tok_s", r->tok_s);
    cJSON_AddNumberToObject(o, "wall_s", r->wall_s);
    cJSON_AddNumberToObject(o, "kv_raw_bytes", (double)r->raw);
    cJSON_AddNumberToObject(o, "kv_wire_bytes", (double)r->wire);
    cJSON_AddNumberToObject(o, "wire_ratio", r->raw ? (double)r->wire / (double)r->raw : NAN);
    cJSON *by = cJSON_AddObjectToObject(o, "ttft_ms_by_prompt_tokens");
    for (int k = 0; k < n_lens; k++) {
        char key[16];
        snprintf(key, sizeof(key), "%d", lens[k]);
        cJSON_AddNumberToObject(by, key, r->ttft_by_len[k]);
    }
    return o;
}

/* The TTFT saving of setting r over FP16 on the same link, and what its bytes allow: per
 * prompt length, FP16's TTFT minus max(compute floor, FP16's TTFT x wire ratio), where the
 * compute floor is the lowest TTFT seen at that length in the whole run. */
static void saving(const result_t *fp16, const result_t *r, const double *floor_by_len,
                   int n_lens, double *got, double *allowed)
{
    /* below 10 % of FP16's TTFT the link is not the bottleneck and the share is noise: the
     * allowed saving reads 0 then */
    double ratio = r->raw && fp16->wire ? ((double)r->wire / (double)r->raw) /
                                              ((double)fp16->wire / (double)fp16->raw)
                                        : NAN;
    double fp_total = 0;
    *got = *allowed = 0;
    for (int k = 0; k < n_lens; k++) {
        double a = fp16->ttft_by_len[k], b = r->ttft_by_len[k];
        if (isnan(a) || isnan(b))
            continue;
        *got += a - b;
        *allowed += a - fmax(floor_by_len[k], a * ratio);
        fp_total += a;
    }
    if (*allowed < 0.1 * fp_total)
        *allowed = 0;
}

int bench_e2e_main(int argc, char **argv)
{
    const char *spec_path = NULL, *json_path = NULL, *md_path = NULL, *png_path = NULL;
    const char *lens_s = "512,1024,2048,4096", *links_s = "100mbit,1gbit,10gbit",
               *pol_s = "fp16,ferry:0.5,ferry:0.25,ferry:0.125";
    int clients = 4, requests = 16, max_tokens = 32;
    bool quick = false, keep = false, clients_set = false, req_set = false, tok_set = false,
         lens_set = false, links_set = false, pol_set = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool more = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--cluster") == 0 && more) {
            spec_path = argv[++i];
        } else if (strcmp(a, "--json") == 0 && more) {
            json_path = argv[++i];
        } else if (strcmp(a, "--md") == 0 && more) {
            md_path = argv[++i];
        } else if (strcmp(a, "--png") == 0 && more) {
            png_path = argv[++i];
        } else if (strcmp(a, "--quick") == 0) {
            quick = true;
        } else if (strcmp(a, "--keep") == 0) {
            keep = true;
        } else if (strcmp(a, "--clients") == 0 && more) {
            clients = atoi(argv[++i]);
            clients_set = true;
        } else if (strcmp(a, "--requests") == 0 && more) {
            requests = atoi(argv[++i]);
            req_set = true;
        } else if (strcmp(a, "--max-tokens") == 0 && more) {
            max_tokens = atoi(argv[++i]);
            tok_set = true;
        } else if (strcmp(a, "--prompt-tokens") == 0 && more) {
            lens_s = argv[++i];
            lens_set = true;
        } else if (strcmp(a, "--links") == 0 && more) {
            links_s = argv[++i];
            links_set = true;
        } else if (strcmp(a, "--policies") == 0 && more) {
            pol_s = argv[++i];
            pol_set = true;
        } else {
            fprintf(stderr, "ferry-bench e2e: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (quick) {
        clients = clients_set ? clients : 2;
        requests = req_set ? requests : 4;
        max_tokens = tok_set ? max_tokens : 8;
        lens_s = lens_set ? lens_s : "128,256";
        /* CPU-bound prefill on a small machine hides a 100 Mbit/s link: add a thinner one */
        links_s = links_set ? links_s : "10mbit,100mbit,1gbit,10gbit";
    }
    int lens[MAX_LENS], n_lens = parse_list_int(lens_s, lens, MAX_LENS);
    codec_cfg_t codecs[MAX_CFG];
    int n_codecs = parse_policies(pol_s, codecs, MAX_CFG);
    char link_names[MAX_CFG][24];
    uint64_t link_bps[MAX_CFG];
    int n_links = parse_links(links_s, link_names, link_bps, MAX_CFG);
    if (spec_path == NULL || n_lens <= 0 || n_codecs <= 0 || n_links <= 0 || clients < 1 ||
        clients > 64 || requests < clients || requests > MAX_REQ || max_tokens < 1 ||
        max_tokens > 4096) {
        fprintf(stderr, "ferry-bench e2e: bad or missing arguments\n");
        usage(stderr);
        return 2;
    }
    fy_cluster_spec_t *spec = malloc(sizeof(*spec));
    char err[4096];
    if (fy_cluster_spec_load(spec_path, -1, spec, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "ferry-bench e2e: %s\n", err);
        free(spec);
        return 2;
    }
    if (!pol_set && spec->ttft_target_ms > 0 && n_codecs < MAX_CFG) {
        /* the workers' own choice: the bandwidth-adaptive budget */
        codec_cfg_t *c = &codecs[n_codecs++];
        memset(c, 0, sizeof(*c));
        snprintf(c->label, sizeof(c->label), "adaptive");
    }
    bool shaped = spec->backend == FY_CLUSTER_NETNS;
    if (!shaped) {
        fprintf(stderr, "ferry-bench e2e: %s backend: links are not limited (netns does)\n",
                fy_cluster_backend_name(spec->backend));
        n_links = 1;
        snprintf(link_names[0], sizeof(link_names[0]), "unlimited");
        link_bps[0] = 0;
    }
    signal(SIGPIPE, SIG_IGN);
    fy_cluster_run_opts_t o;
    fy_cluster_run_opts_default(&o);
    o.health = fy_cluster_sdk_health;
    o.health_arg = spec;
    o.timeout_ms = 600000;
    fprintf(stderr, "e2e: bringing up cluster %s (%s)\n", spec->name,
            fy_cluster_backend_name(spec->backend));
    if (fy_cluster_up(spec, &o, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "ferry-bench e2e: up: %s\n", err);
        free(spec);
        return 1;
    }
    char router[128];
    fy_cluster_router_addr(spec, router, sizeof(router));
    int n_prefill = 0, n_decode = 0;
    for (int i = 0; i < spec->n_daemons; i++) {
        n_prefill += spec->daemons[i].role == FY_CLUSTER_PREFILL;
        n_decode += spec->daemons[i].role == FY_CLUSTER_DECODE;
    }
    /* warm-up: UCX endpoints between every pair, caches, the first-request costs */
    {
        codec_cfg_t wc = {"warmup", "fp16", 0};
        result_t wr = {0};
        int wl = lens[0];
        run_setting(router, &wc, &wl, 1, 2 * n_prefill * n_decode, 1, 2, &wr);
    }
    int n_res = n_links * n_codecs;
    result_t *res = calloc((size_t)n_res, sizeof(*res));
    int rc = 0;
    for (int l = 0; l < n_links; l++) {
        if (shaped) {
            for (int h = 0; h < spec->n_hosts; h++) {
                if (fy_cluster_set_link(spec, h, link_bps[l], spec->hosts[h].delay_ms,
                                        spec->hosts[h].loss_pct) != FY_OK) {
                    fprintf(stderr, "ferry-bench e2e: cannot set host %s's link to %s\n",
                            spec->hosts[h].name, link_names[l]);
                    rc = 1;
                }
            }
        }
        for (int c = 0; c < n_codecs; c++) {
            result_t *r = &res[l * n_codecs + c];
            memcpy(r->link, link_names[l], sizeof(r->link));
            r->link_bps = link_bps[l];
            fprintf(stderr, "e2e: link %s, %s: %d requests from %d clients\n", r->link,
                    codecs[c].label, requests, clients);
            run_setting(router, &codecs[c], lens, n_lens, requests, clients, max_tokens, r);
            if (r->ok != r->requests)
                rc = 1;
        }
    }
    /* the compute floor per prompt length: the lowest TTFT seen for it */
    double floor_by_len[MAX_LENS];
    for (int k = 0; k < n_lens; k++) {
        floor_by_len[k] = INFINITY;
        for (int i = 0; i < n_res; i++)
            if (!isnan(res[i].ttft_by_len[k]))
                floor_by_len[k] = fmin(floor_by_len[k], res[i].ttft_by_len[k]);
    }

    /* table */
    printf("\nferry-bench e2e: cluster %s (%s), %d prefill + %d decode, %d clients, %d requests "
           "per setting, prompts %s tokens, %d tokens each\n",
           spec->name, fy_cluster_backend_name(spec->backend), n_prefill, n_decode, clients,
           requests, lens_s, max_tokens);
    printf("%-9s %-13s %4s %9s %9s %9s %8s %9s %9s %8s %9s %11s %6s %7s %13s %13s\n", "link",
           "setting", "ok", "TTFT ms", "p50", "p90", "TPOT ms", "xfer ms", "pf ms", "queue ms",
           "tok/s", "KV wire MB", "ratio", "saved%", "TTFT/bd p50,90", "-queue p50,90");
    for (int i = 0; i < n_res; i++) {
        const result_t *r = &res[i];
        const result_t *fp = NULL;
        for (int j = 0; j < n_res; j++)
            if (strcmp(res[j].link, r->link) == 0 && strcmp(res[j].codec.policy, "fp16") == 0)
                fp = &res[j];
        char sv[16] = "-";
        if (fp != NULL && fp != r) {
            double got, allowed;
            saving(fp, r, floor_by_len, n_lens, &got, &allowed);
            if (allowed > 0)
                snprintf(sv, sizeof(sv), "%.0f", 100 * got / allowed);
        }
        printf("%-9s %-13s %4d %9.1f %9.1f %9.1f %8.2f %9.1f %9.1f %8.1f %9.1f %11.2f %6.3f %7s "
               "%6.2f %6.2f %6.2f %6.2f\n",
               r->link, r->codec.label, r->ok, r->ttft_mean, r->ttft_p50, r->ttft_p90,
               r->tpot_mean, r->transfer_mean, r->prefill_mean, r->queue_mean, r->tok_s,
               r->wire / 1e6, r->raw ? (double)r->wire / (double)r->raw : NAN, sv, r->bound_p50,
               r->bound_p90, r->bound_xq_p50, r->bound_xq_p90);
    }
    printf("saved%%: TTFT saving over fp16 on the same link, as a share of what the bytes allow "
           "(down to the compute floor: the lowest TTFT per prompt length); '-' where that is "
           "under 10%% of fp16's TTFT (the link is not the bottleneck)\n");
    int met = 0, met_xq = 0, n_bd = 0;
    for (int i = 0; i < n_res; i++) {
        if (isnan(res[i].bound_p50))
            continue;
        n_bd++;
        met += res[i].bound_p50 <= BOUND_GOAL;
        met_xq += res[i].bound_xq_p50 <= BOUND_GOAL;
    }
    printf("TTFT/bd: TTFT / max(prefill compute, transfer) per request, median and p90 (goal: "
           "<= %.1f), the transfer being at least the wire bytes at the link's rate; -queue: TTFT "
           "less the prefill queue wait. Median within the goal: %d of %d settings, %d of %d less "
           "queue\n",
           BOUND_GOAL, met, n_bd, met_xq, n_bd);

    /* JSON */
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "bench", "e2e");
    {
        char host[256] = "?", date[64];
        struct utsname u;
        if (uname(&u) == 0)
            snprintf(host, sizeof(host), "%s %s %s, %ld CPUs", u.nodename, u.sysname, u.release,
                     sysconf(_SC_NPROCESSORS_ONLN));
        time_t now = time(NULL);
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
        cJSON_AddStringToObject(root, "machine", host);
        cJSON_AddStringToObject(root, "date", date);
        char cmd[1024] = "";
        size_t pos = 0;
        for (int i = 0; i < argc && pos < sizeof(cmd) - 1; i++)
            pos += (size_t)snprintf(cmd + pos, sizeof(cmd) - pos, "%s%s", i ? " " : "ferry-bench ",
                                    argv[i]);
        cJSON_AddStringToObject(root, "command", cmd);
    }
    cJSON_AddStringToObject(root, "cluster", spec->name);
    cJSON_AddStringToObject(root, "backend", fy_cluster_backend_name(spec->backend));
    cJSON_AddNumberToObject(root, "prefill_workers", n_prefill);
    cJSON_AddNumberToObject(root, "decode_workers", n_decode);
    cJSON_AddNumberToObject(root, "threads_per_worker", spec->threads);
    cJSON_AddNumberToObject(root, "clients", clients);
    cJSON_AddNumberToObject(root, "requests_per_setting", requests);
    cJSON_AddNumberToObject(root, "max_tokens", max_tokens);
    cJSON_AddBoolToObject(root, "quick", quick);
    cJSON_AddNumberToObject(root, "ttft_over_bound_goal", BOUND_GOAL);
    cJSON *jl = cJSON_AddArrayToObject(root, "prompt_tokens");
    for (int k = 0; k < n_lens; k++)
        cJSON_AddItemToArray(jl, cJSON_CreateNumber(lens[k]));
    cJSON *jf = cJSON_AddObjectToObject(root, "compute_floor_ttft_ms");
    for (int k = 0; k < n_lens; k++) {
        char key[16];
        snprintf(key, sizeof(key), "%d", lens[k]);
        cJSON_AddNumberToObject(jf, key, floor_by_len[k]);
    }
    cJSON *jr = cJSON_AddArrayToObject(root, "results");
    for (int i = 0; i < n_res; i++) {
        cJSON *o2 = result_json(&res[i], lens, n_lens);
        for (int j = 0; j < n_res; j++) {
            if (j != i && strcmp(res[j].link, res[i].link) == 0 &&
                strcmp(res[j].codec.policy, "fp16") == 0) {
                double got, allowed;
                saving(&res[j], &res[i], floor_by_len, n_lens, &got, &allowed);
                cJSON_AddNumberToObject(o2, "ttft_saving_ms", got);
                cJSON_AddNumberToObject(o2, "ttft_saving_allowed_ms", allowed);
            }
        }
        cJSON_AddItemToArray(jr, o2);
    }
    char *text = cJSON_Print(root);
    if (json_path != NULL) {
        FILE *f = strcmp(json_path, "-") == 0 ? stdout : fopen(json_path, "w");
        if (f != NULL) {
            fprintf(f, "%s\n", text);
            if (f != stdout)
                fclose(f);
        } else {
            fprintf(stderr, "ferry-bench e2e: cannot write %s\n", json_path);
            rc = 1;
        }
    }
    if (md_path != NULL) {
        FILE *f = fopen(md_path, "w");
        if (f != NULL) {
            fprintf(f, "| link | setting | ok | TTFT ms (mean) | p50 | p90 | TPOT ms | transfer "
                       "ms | link ms | prefill ms | queue ms | tok/s | KV wire MB | wire/raw | "
                       "saving of allowed | TTFT / max(prefill, transfer) p50 | p90 | less queue "
                       "p50 | p90 |\n"
                       "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                       "| --- | --- | --- | --- | --- | --- | --- |\n");
            for (int i = 0; i < n_res; i++) {
                const result_t *r = &res[i];
                cJSON *o2 = cJSON_GetArrayItem(jr, i);
                cJSON *g = cJSON_GetObjectItem(o2, "ttft_saving_ms"),
                      *al = cJSON_GetObjectItem(o2, "ttft_saving_allowed_ms");
                char sv[32] = "-";
                if (g && al && al->valuedouble > 0)
                    snprintf(sv, sizeof(sv), "%.0f %%", 100 * g->valuedouble / al->valuedouble);
                fprintf(f, "| %s | %s | %d/%d | %.1f | %.1f | %.1f | %.2f | %.1f | %.1f | %.1f | "
                           "%.1f | %.1f | %.2f | %.3f | %s | %.2f | %.2f | %.2f | %.2f |\n",
                        r->link, r->codec.label, r->ok, r->requests, r->ttft_mean, r->ttft_p50,
                        r->ttft_p90, r->tpot_mean, r->transfer_mean, r->link_mean, r->prefill_mean,
                        r->queue_mean, r->tok_s, r->wire / 1e6,
                        r->raw ? (double)r->wire / (double)r->raw : NAN, sv, r->bound_p50,
                        r->bound_p90, r->bound_xq_p50, r->bound_xq_p90);
            }
            fclose(f);
        }
    }
    if (png_path != NULL) {
        /* the plot is drawn by bench/plot_e2e.py from the JSON */
        char tmp[] = "/tmp/ferry-e2e-XXXXXX";
        int fd = mkstemp(tmp);
        if (fd >= 0) {
            if (write(fd, text, strlen(text)) < 0)
                rc = 1;
            close(fd);
            const char *py = getenv("FERRY_PYTHON");
            const char *src = getenv("FERRY_SOURCE_ROOT");
            char cmd[2048];
            snprintf(cmd, sizeof(cmd), "%s %s/bench/plot_e2e.py %s %s",
                     py ? py : (access(".venv/bin/python", X_OK) == 0 ? ".venv/bin/python"
                                                                      : "python3"),
                     src ? src : ".", tmp, png_path);
            if (system(cmd) != 0) {
                fprintf(stderr, "ferry-bench e2e: plotting failed (%s)\n", cmd);
                rc = 1;
            }
            unlink(tmp);
        }
    }
    free(text);
    cJSON_Delete(root);
    free(res);
    if (!keep) {
        if (fy_cluster_down(spec, &o, err, sizeof(err)) != FY_OK) {
            fprintf(stderr, "ferry-bench e2e: down: %s\n", err);
            rc = 1;
        }
    }
    free(spec);
    return rc;
}
