/*
 * Clusters that really start, through the launcher library (what `ferry cluster` runs), with
 * the real model (missing model = failure):
 *
 *   test_cluster_run local   router + 1 prefill + 1 decode as local processes: up waits for
 *                            health, requests are served, status sees every daemon, down
 *                            leaves no process;
 *   test_cluster_run netns   (root only, else skipped) one router host, 2 prefill and 2
 *                            decode hosts, each in its own network namespace with a shaped
 *                            link, KV over UCX/TCP between namespaces: 20 concurrent requests
 *                            served, greedy fp16 output equal to a local run for some; then
 *                            one decode host's link is cut: the router drops it, requests go
 *                            to the survivor, whose pool gets every page back; down leaves no
 *                            process, namespace or link behind.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cluster.h"
#include "cluster_health.h"
#include "ferry_client.h"
#include "model.h"

static struct {
    bool netns;
    char model_path[1024];
    char dir[64];
    fy_cluster_spec_t *spec;
    fy_cluster_run_opts_t opts;
    char router[64];
    char token[64]; // the clients' API key, "" = none
    const fy_cluster_spec_t *tls; // the spec whose TLS clients and GETs speak, NULL = none
    mdl_model_t *model;
    const mdl_config_t *cfg;
    mdl_ctx_t *ctx;
    int32_t stops[2];
    int n_stops;
} G;

static const char *k_prompts[] = {
    "The capital of France is",
    "Ferries cross the river",
    "One, two, three,",
    "The quick brown fox",
    "Water boils at",
};
#define MAX_TOKENS 6


/* ---- the local greedy reference ---- */

static size_t local_greedy(const char *prompt, int32_t *out)
{
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    size_t n = 0, len = strlen(prompt);
    mdl_tokenizer_encode(tok, prompt, len, false, NULL, 0, &n);
    size_t off = mdl_tokenizer_add_bos(tok) ? 1 : 0;
    int32_t *ids = malloc((n + 1) * sizeof(int32_t));
    assert_int_equal(mdl_tokenizer_encode(tok, prompt, len, false, ids + off, n, &n), FY_OK);
    if (off)
        ids[0] = mdl_tokenizer_bos(tok);
    n += off;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, G.model);
    kp.n_pages = mdl_kv_pages_for(&kp, (int64_t)n + MAX_TOKENS + 1);
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seq = NULL;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &seq), FY_OK);
    float *logits = malloc((size_t)G.cfg->n_vocab * sizeof(float));
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = seq;
    assert_int_equal(mdl_prefill(G.ctx, ids, (int)n, &pp, logits), FY_OK);
    size_t n_out = 0;
    for (int i = 0; i < MAX_TOKENS; i++) {
        int32_t best = 0;
        for (int v = 1; v < G.cfg->n_vocab; v++)
            best = logits[v] > logits[best] ? v : best;
        bool stop = false;
        for (int s = 0; s < G.n_stops; s++)
            stop = stop || best == G.stops[s];
        if (stop)
            break;
        out[n_out++] = best;
        if (i + 1 == MAX_TOKENS)
            break;
        assert_int_equal(mdl_decode(G.ctx, &seq, &best, 1, logits), FY_OK);
    }
    free(logits);
    free(ids);
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    return n_out;
}

/* ---- requests ---- */

typedef struct {
    int first, count;       /* prompts first .. first+count-1 (mod the list) */
    int ok, unavailable, other;
    uint32_t ids[20][MAX_TOKENS];
    size_t n_ids[20];
    char workers[20][64];
} batch_t;

static void *run_batch(void *arg)
{
    batch_t *b = arg;
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router;
    p.timeout_ms = 300000;
    p.max_attempts = 1;
    p.token = G.token[0] ? G.token : NULL;
    p.tls_ca = fy_cluster_tls_ca(G.tls);
    p.tls_any_name = G.tls != NULL && G.tls->tls_any_name;
    ferry_client_t *c;
    if (ferry_client_create(&p, &c) != 0) {
        b->other = b->count;
        return NULL;
    }
    for (int i = 0; i < b->count; i++) {
        Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
        Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
        req.prompt = (char *)k_prompts[(b->first + i) % FY_ARRAY_SIZE(k_prompts)];
        s.max_tokens = MAX_TOKENS;
        req.sampling = &s;
        req.return_token_ids = true;
        Ferry__V1__CompleteResponse *r = NULL;
        ferry_error_t err;
        int code = ferry_complete(c, &req, &r, &err);
        if (code == 0) {
            b->ok++;
            b->n_ids[i] = r->n_token_ids < MAX_TOKENS ? r->n_token_ids : MAX_TOKENS;
            memcpy(b->ids[i], r->token_ids, b->n_ids[i] * sizeof(uint32_t));
            if (r->stats != NULL && r->stats->decode_worker != NULL)
                snprintf(b->workers[i], sizeof(b->workers[i]), "%s", r->stats->decode_worker);
        } else if (code == 14 /* UNAVAILABLE */) {
            b->unavailable++;
        } else {
            fprintf(stderr, "request %d: %s: %s\n", b->first + i, ferry_code_name(code),
                    err.message);
            b->other++;
        }
        ferry_message_free(r);
    }
    ferry_client_destroy(c);
    return NULL;
}

/* n requests over `threads` concurrent clients; returns the batches (caller frees). */
static batch_t *serve(int n, int threads)
{
    batch_t *b = calloc((size_t)threads, sizeof(*b));
    pthread_t t[8];
    assert_true(threads <= 8 && n / threads <= 20);
    for (int i = 0; i < threads; i++) {
        b[i].first = i * (n / threads);
        b[i].count = n / threads;
        assert_int_equal(pthread_create(&t[i], NULL, run_batch, &b[i]), 0);
    }
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    return b;
}

/* ---- setup ---- */

static void write_spec(const char *path)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    const char *build = getenv("FERRY_BUILD_ROOT");
    unsigned id = (unsigned)getpid();
    fprintf(f, "name: t%u\nbackend: %s\nmodel: %s\nbin_dir: %s\nlog_dir: %s/logs\n", id % 100000,
            G.netns ? "netns" : "local", G.model_path, build ? build : "build", G.dir);
    fprintf(f, "threads: 1\nkv_memory: 64M\nmax_tokens: %d\nlease: 500ms\n", MAX_TOKENS);
    /* fp16: the output must equal a local greedy run token for token */
    fprintf(f, "codec: {policy: fp16}\nucx: {tls: tcp}\n");
    if (G.netns) {
        /* a subnet of its own, so concurrent runs (a sanitizer build) do not collide */
        fprintf(f, "network: {subnet: 10.%u.%u.0/24}\n", 100 + id % 100, (id / 100) % 250);
        fprintf(f, "hosts:\n  - {name: head}\n");
        for (int i = 0; i < 2; i++)
            fprintf(f, "  - {name: p%d, link: {bandwidth: 1gbit}}\n", i);
        for (int i = 0; i < 2; i++)
            fprintf(f, "  - {name: d%d, link: {bandwidth: 1gbit}}\n", i);
        fprintf(f, "roles:\n  router: {host: head}\n  prefill: [{host: p0}, {host: p1}]\n"
                   "  decode: [{host: d0}, {host: d1}]\n");
    } else {
        fprintf(f, "hosts: [{name: here}]\nroles:\n  router: {host: here}\n"
                   "  prefill: {host: here}\n  decode: {host: here}\n");
    }
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    const char *env = getenv("FERRY_MODEL");
    const char *src = getenv("FERRY_SOURCE_ROOT");
    if (env != NULL && env[0])
        snprintf(G.model_path, sizeof(G.model_path), "%s", env);
    else
        snprintf(G.model_path, sizeof(G.model_path), "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 src ? src : ".");
    if (access(G.model_path, R_OK) != 0) {
        fprintf(stderr, "missing model %s: run scripts/setup.sh\n", G.model_path);
        return -1;
    }
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = G.model_path;
    char err[MDL_ERR_LEN];
    if (mdl_model_create(&mp, &G.model, err, sizeof(err)) != FY_OK)
        return -1;
    G.cfg = mdl_model_config(G.model);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 1;
    cp.max_batch = 1;
    if (mdl_ctx_create(G.model, &cp, &G.ctx) != FY_OK)
        return -1;
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    G.stops[G.n_stops++] = mdl_tokenizer_eos(tok);
    int32_t im_end = mdl_tokenizer_find(tok, "<|im_end|>");
    if (im_end >= 0 && im_end != G.stops[0])
        G.stops[G.n_stops++] = im_end;

    snprintf(G.dir, sizeof(G.dir), "/tmp/ferry-test-cluster-XXXXXX");
    if (mkdtemp(G.dir) == NULL)
        return -1;
    char path[128];
    snprintf(path, sizeof(path), "%s/spec.yaml", G.dir);
    write_spec(path);
    G.spec = malloc(sizeof(*G.spec));
    if (fy_cluster_spec_load(path, -1, G.spec, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "spec: %s\n", err);
        return -1;
    }
    fy_cluster_run_opts_default(&G.opts);
    G.opts.health = fy_cluster_sdk_health;
    G.opts.timeout_ms = 600000; /* sanitizer builds load the model slowly on a busy machine */
    G.opts.drain_timeout_ms = 20000;
    G.opts.quiet = true;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (G.spec != NULL) {
        char err[256];
        fy_cluster_down(G.spec, &G.opts, err, sizeof(err)); /* no-op when the test did it */
        char cmd[256];
        snprintf(cmd, sizeof(cmd), "rm -rf %s", G.dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", G.dir);
        free(G.spec);
    }
    if (G.ctx)
        mdl_ctx_destroy(G.ctx);
    if (G.model)
        mdl_model_destroy(G.model);
    return 0;
}

/* ---- checks ---- */

static double daemon_metric(const char *addr, const char *name)
{
    static char body[131072];
    if (fy_cluster_http_get(G.tls, addr, "/metrics", 3000, body, sizeof(body)) != FY_OK)
        return NAN;
    return fy_cluster_metric(body, name, NULL);
}

static double router_workers(const char *role)
{
    static char body[131072];
    char labels[32];
    snprintf(labels, sizeof(labels), "role=\"%s\"", role);
    if (fy_cluster_http_get(G.tls, G.router, "/metrics", 3000, body, sizeof(body)) != FY_OK)
        return NAN;
    return fy_cluster_metric(body, "ferry_router_workers", labels);
}

static void expect_pool_full(int decode_index)
{
    char addr[80];
    int i = 0, k = 0;
    for (; i < G.spec->n_daemons; i++) {
        if (G.spec->daemons[i].role == FY_CLUSTER_DECODE && k++ == decode_index)
            break;
    }
    assert_true(i < G.spec->n_daemons);
    snprintf(addr, sizeof(addr), "%s:%d", fy_cluster_daemon_host_addr(G.spec, i),
             G.spec->daemons[i].port);
    /* the pool gets its pages back once the last sequence ends (a moment after the reply) */
    double free_p = NAN, total = NAN;
    for (int t = 0; t < 100; t++) {
        free_p = daemon_metric(addr, "ferry_decode_free_pages");
        total = daemon_metric(addr, "ferry_decode_total_pages");
        if (free_p == total)
            break;
        usleep(100000);
    }
    if (free_p != total)
        fail_msg("decode worker %s: %.0f of %.0f pages free after the requests", addr, free_p,
                 total);
}

static void expect_greedy_matches(const batch_t *b, int threads)
{
    /* prompts 0..2 of the first batch against the local model */
    for (int i = 0; i < 3 && i < b[0].count; i++) {
        int32_t want[MAX_TOKENS];
        size_t n_want = local_greedy(k_prompts[(b[0].first + i) % FY_ARRAY_SIZE(k_prompts)],
                                     want);
        assert_int_equal(b[0].n_ids[i], n_want);
        for (size_t k = 0; k < n_want; k++)
            assert_int_equal(b[0].ids[i][k], (uint32_t)want[k]);
    }
    (void)threads;
}

static void expect_status(bool want_ok, const char *want_text)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    fy_status_t st = fy_cluster_status(G.spec, &G.opts, f);
    fclose(f);
    if ((st == FY_OK) != want_ok || (want_text && strstr(buf, want_text) == NULL))
        fail_msg("status (%s) unexpected:\n%s", fy_status_str(st), buf);
    free(buf);
}

static void test_cluster(void **state)
{
    (void)state;
    char err[4096];
    if (fy_cluster_up(G.spec, &G.opts, err, sizeof(err)) != FY_OK)
        fail_msg("up: %s", err);
    fy_cluster_router_addr(G.spec, G.router, sizeof(G.router));
    /* up again while up: refused */
    assert_int_equal(fy_cluster_up(G.spec, &G.opts, err, sizeof(err)), FY_ERR_EXISTS);
    expect_status(true, "SERVING");
    int n = G.netns ? 20 : 8, threads = 4;
    batch_t *b = serve(n, threads);
    int ok = 0;
    for (int i = 0; i < threads; i++)
        ok += b[i].ok;
    assert_int_equal(ok, n);
    expect_greedy_matches(b, threads);
    free(b);
    int n_decode = G.netns ? 2 : 1;
    for (int d = 0; d < n_decode; d++)
        expect_pool_full(d);
    if (G.netns) {
        /* UCX between namespaces: over TCP on eth0 */
        expect_status(true, "tcp/eth0");
        /* cut decode host d1's link (its interface goes down): the router drops the worker */
        int h = G.spec->daemons[G.spec->n_daemons - 1].host;
        char ns[32], cmd[128];
        fy_cluster_netns_names(G.spec, h, ns, sizeof(ns), NULL, NULL, 0);
        snprintf(cmd, sizeof(cmd), "ip -n %s link set eth0 down", ns);
        assert_int_equal(system(cmd), 0);
        /* requests during the loss: served by the survivor, or UNAVAILABLE, never hanging */
        b = serve(4, 2);
        for (int i = 0; i < 2; i++)
            assert_int_equal(b[i].other, 0);
        free(b);
        double w = NAN;
        for (int t = 0; t < 100 && (w = router_workers("decode")) != 1; t++)
            usleep(100000);
        assert_true(w == 1);
        b = serve(4, 2);
        for (int i = 0; i < 2; i++) {
            assert_int_equal(b[i].ok, 2);
            for (int k = 0; k < 2; k++)
                assert_string_equal(b[i].workers[k], "decode-0");
        }
        free(b);
        expect_pool_full(0);
        /* status reports the lost worker: the router counts 1 decode worker */
        expect_status(true, "decode 1");
    }
    fy_cluster_state_t *st = malloc(sizeof(*st));
    assert_int_equal(fy_cluster_state_read(G.spec->log_dir, st), FY_OK);
    assert_int_equal(st->n_daemons, G.spec->n_daemons);
    if (fy_cluster_down(G.spec, &G.opts, err, sizeof(err)) != FY_OK)
        fail_msg("down: %s", err);
    /* nothing left: no daemon process (they were our children: reaped), no state, no process
     * answering, no namespace, no bridge */
    for (int i = 0; i < st->n_daemons; i++) {
        if (kill(st->daemons[i].pid, 0) == 0)
            fail_msg("%s (pid %d) is still there after down", st->daemons[i].name,
                     st->daemons[i].pid);
    }
    assert_int_equal(fy_cluster_state_read(G.spec->log_dir, st), FY_ERR_NOT_FOUND);
    free(st);
    assert_int_not_equal(fy_cluster_sdk_health(NULL, G.router), 0);
    if (G.netns) {
        for (int h = 0; h < G.spec->n_hosts; h++) {
            char ns[32], p[64];
            fy_cluster_netns_names(G.spec, h, ns, sizeof(ns), NULL, NULL, 0);
            snprintf(p, sizeof(p), "/run/netns/%s", ns);
            assert_int_not_equal(access(p, F_OK), 0);
        }
        char br[16], p[64];
        fy_cluster_bridge_name(G.spec, br, sizeof(br));
        snprintf(p, sizeof(p), "/sys/class/net/%s", br);
        assert_int_not_equal(access(p, F_OK), 0);
    }
}

/* The ssh backend's generated remote lines, run here with sh instead of over ssh (the host
 * is 127.0.0.1): they start the daemons detached with pid files, the cluster serves, and the
 * stop lines drain them away. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    int port = 0;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &l) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static void test_ssh_lines_run(void **state)
{
    (void)state;
    if (G.netns)
        skip();
    char text[2048], err[512], key[128], cmd[512];
    const char *build = getenv("FERRY_BUILD_ROOT"), *src = getenv("FERRY_SOURCE_ROOT");
    // TLS on every daemon, from a spec's tls (certificates of the test CA for 127.0.0.1).
    snprintf(cmd, sizeof(cmd), "sh %s/tests/fixtures/tls/make_certs.sh %s/tls", src ? src : ".",
             G.dir);
    assert_int_equal(system(cmd), 0);
    // The cluster's API key from a file every daemon reads (api_key_file).
    snprintf(key, sizeof(key), "%s/ssh-api-key", G.dir);
    FILE *kf = fopen(key, "w");
    assert_non_null(kf);
    fputs("ssh-cluster-key\n", kf);
    assert_int_equal(fclose(kf), 0);
    assert_int_equal(chmod(key, 0600), 0);
    snprintf(text, sizeof(text),
             "name: ssh%u\nbackend: ssh\nmodel: %s\nbin_dir: %s\nlog_dir: %s/ssh\n"
             "api_key_file: %s\n"
             "tls: {cert: %s/tls/chain.crt, key: %s/tls/server.key, ca: %s/tls/ca.crt}\n"
             "threads: 1\nkv_memory: 64M\nlease: 500ms\nucx: {tls: tcp}\n"
             "hosts: [{name: h, address: 127.0.0.1}]\nroles:\n"
             "  router: {host: h, port: %d, http_port: %d}\n  prefill: {host: h, port: %d}\n"
             "  decode: {host: h, port: %d, kv_port: %d}\n",
             (unsigned)getpid() % 1000, G.model_path, build ? build : "build", G.dir, key, G.dir,
             G.dir, G.dir, free_port(), free_port(), free_port(), free_port(), free_port());
    fy_cluster_spec_t *s = malloc(sizeof(*s));
    if (fy_cluster_spec_parse(text, strlen(text), "ssh.yaml", NULL, -1, s, err, sizeof(err)) !=
        FY_OK)
        fail_msg("%s", err);
    for (int i = 0; i < s->n_daemons; i++) {
        fy_cluster_cmd_t c, sh = {0};
        assert_int_equal(fy_cluster_ssh_cmd(s, i, false, &c), FY_OK);
        fy_cluster_cmd_add(&sh, "sh");
        fy_cluster_cmd_add(&sh, "-c");
        fy_cluster_cmd_add(&sh, c.argv[6]);
        assert_int_equal(fy_cluster_run_cmd(&sh, 2), 0);
        fy_cluster_cmd_free(&c);
        fy_cluster_cmd_free(&sh);
    }
    char router[64];
    fy_cluster_router_addr(s, router, sizeof(router));
    snprintf(G.router, sizeof(G.router), "%s", router);
    // Cleartext gets nothing from a TLS cluster.
    static char body[4096];
    assert_int_not_equal(fy_cluster_http_get(NULL, router, "/metrics", 3000, body, sizeof(body)),
                         FY_OK);
    G.tls = s;
    double w = NAN;
    for (int t = 0; t < 6000 && (w = router_workers("decode")) != 1; t++)
        usleep(100000);
    assert_true(w == 1);
    for (int t = 0; t < 6000 && router_workers("prefill") != 1; t++)
        usleep(100000);
    assert_int_equal(fy_cluster_sdk_health(s, router), 0);
    assert_int_not_equal(fy_cluster_sdk_health(NULL, router), 0); // a cleartext client
    // The workers registered with the key; clients need it too.
    batch_t *b = serve(1, 1);
    assert_int_equal(b[0].ok, 0);
    assert_int_equal(b[0].other, 1);
    free(b);
    snprintf(G.token, sizeof(G.token), "ssh-cluster-key");
    b = serve(2, 1);
    G.token[0] = '\0';
    assert_int_equal(b[0].ok, 2);
    free(b);
    // The router's http_port serves the OpenAI-compatible API (HTTPS), behind the key but
    // /health.
    char http[64];
    snprintf(http, sizeof(http), "127.0.0.1:%d", s->daemons[0].http_port);
    assert_int_equal(fy_cluster_http_get(s, http, "/health", 3000, body, sizeof(body)), FY_OK);
    assert_int_equal(fy_cluster_http_get(s, http, "/v1/models", 3000, body, sizeof(body)),
                     FY_ERR_UNAVAILABLE);
    assert_non_null(strstr(body, "API key"));
    for (int i = 0; i < s->n_daemons; i++) {
        fy_cluster_cmd_t c, sh = {0};
        assert_int_equal(fy_cluster_ssh_cmd(s, i, true, &c), FY_OK);
        fy_cluster_cmd_add(&sh, "sh");
        fy_cluster_cmd_add(&sh, "-c");
        fy_cluster_cmd_add(&sh, c.argv[6]);
        assert_int_equal(fy_cluster_run_cmd(&sh, 2), 0);
        fy_cluster_cmd_free(&c);
        fy_cluster_cmd_free(&sh);
        char pid[FY_CLUSTER_PATH_MAX + 64];
        snprintf(pid, sizeof(pid), "%s/%s.pid", s->log_dir, s->daemons[i].name);
        assert_int_not_equal(access(pid, F_OK), 0);
    }
    assert_int_not_equal(fy_cluster_sdk_health(s, router), 0);
    G.tls = NULL;
    free(s);
}

/* The Slurm backend's batch script, run with bash and stand-ins for scontrol (a one-node
 * allocation: this host) and srun (drops its options, runs the step): the srun steps start
 * the cluster, it serves, and stopping the script stops every step. */
static void test_slurm_script_run(void **state)
{
    (void)state;
    if (G.netns)
        skip();
    char text[2048], err[512], dir[256];
    snprintf(dir, sizeof(dir), "%s/slurm", G.dir);
    const char *build = getenv("FERRY_BUILD_ROOT");
    snprintf(text, sizeof(text),
             "name: sl%u\nbackend: slurm\nmodel: %s\nbin_dir: %s\nlog_dir: %s\n"
             "threads: 1\nkv_memory: 64M\nlease: 500ms\nucx: {tls: tcp}\n"
             "hosts: [{name: n0}]\nroles:\n"
             "  router: {host: n0, port: %d}\n  prefill: {host: n0, port: %d}\n"
             "  decode: {host: n0, port: %d, kv_port: %d}\n",
             (unsigned)getpid() % 1000, G.model_path, build ? build : "build", dir, free_port(),
             free_port(), free_port(), free_port());
    fy_cluster_spec_t *s = malloc(sizeof(*s));
    if (fy_cluster_spec_parse(text, strlen(text), "slurm.yaml", NULL, -1, s, err, sizeof(err)) !=
        FY_OK)
        fail_msg("%s", err);
    char path[1024], stubs[300];
    snprintf(stubs, sizeof(stubs), "%s/stubs", G.dir);
    snprintf(path, sizeof(path), "mkdir -p %s %s", stubs, dir);
    assert_int_equal(system(path), 0);
    snprintf(path, sizeof(path), "%s/scontrol", stubs);
    FILE *f = fopen(path, "w");
    fprintf(f, "#!/bin/sh\necho localhost\n");
    fclose(f);
    chmod(path, 0755);
    snprintf(path, sizeof(path), "%s/srun", stubs);
    f = fopen(path, "w");
    /* srun --opt ... --output=FILE CMD...: run CMD with its output to FILE */
    fprintf(f, "#!/bin/bash\nout=/dev/null\nwhile [ \"${1#--}\" != \"$1\" ]; do\n"
               "  case $1 in --output=*) out=${1#--output=};; esac; shift\ndone\n"
               "exec \"$@\" >\"$out\" 2>&1\n");
    fclose(f);
    chmod(path, 0755);
    snprintf(path, sizeof(path), "%s/job.sbatch", dir);
    f = fopen(path, "w");
    assert_int_equal(fy_cluster_gen_slurm(s, f), FY_OK);
    fclose(f);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char p2[1024];
        snprintf(p2, sizeof(p2), "%s:%s", stubs, getenv("PATH") ? getenv("PATH") : "/usr/bin");
        setenv("PATH", p2, 1);
        setenv("SLURM_JOB_NODELIST", "localhost", 1);
        setpgid(0, 0);
        execlp("bash", "bash", path, (char *)NULL);
        _exit(127);
    }
    char router[64];
    snprintf(router, sizeof(router), "127.0.0.1:%d", s->daemons[0].port);
    snprintf(G.router, sizeof(G.router), "%s", router);
    double w = NAN;
    for (int t = 0; t < 6000 && (w = router_workers("decode")) != 1; t++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            fail_msg("the batch script ended early (see %s)", dir);
        usleep(100000);
    }
    assert_true(w == 1);
    for (int t = 0; t < 6000 && router_workers("prefill") != 1; t++)
        usleep(100000);
    batch_t *b = serve(2, 1);
    assert_int_equal(b[0].ok, 2);
    free(b);
    /* scancel: SIGTERM to the batch script, whose trap stops its steps */
    kill(pid, SIGTERM);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    for (int t = 0; t < 300 && fy_cluster_sdk_health(NULL, router) == 0; t++)
        usleep(100000);
    assert_int_not_equal(fy_cluster_sdk_health(NULL, router), 0);
    kill(-pid, SIGKILL); /* anything left of the job's process group */
    free(s);
}

/* A launcher that died after creating the network: `down` still removes everything. */
static void test_down_after_crash(void **state)
{
    (void)state;
    if (!G.netns)
        skip();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* the child brings the cluster up and is killed half-way (by the parent) */
        char err[1024];
        G.opts.timeout_ms = 600000;
        fy_cluster_up(G.spec, &G.opts, err, sizeof(err));
        _exit(0);
    }
    /* wait until the network exists and the router started, then kill the launcher */
    char br[16], p[64];
    fy_cluster_bridge_name(G.spec, br, sizeof(br));
    snprintf(p, sizeof(p), "/sys/class/net/%s", br);
    fy_cluster_state_t *st = malloc(sizeof(*st));
    for (int t = 0; t < 600; t++) {
        if (fy_cluster_state_read(G.spec->log_dir, st) == FY_OK && st->n_daemons >= 1)
            break;
        usleep(50000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    assert_int_equal(access(p, F_OK), 0);
    char err[1024];
    if (fy_cluster_down(G.spec, &G.opts, err, sizeof(err)) != FY_OK)
        fail_msg("down after a crash: %s", err);
    assert_int_not_equal(access(p, F_OK), 0);
    for (int h = 0; h < G.spec->n_hosts; h++) {
        char ns[32], q[64];
        fy_cluster_netns_names(G.spec, h, ns, sizeof(ns), NULL, NULL, 0);
        snprintf(q, sizeof(q), "/run/netns/%s", ns);
        assert_int_not_equal(access(q, F_OK), 0);
    }
    assert_int_equal(fy_cluster_state_read(G.spec->log_dir, st), FY_ERR_NOT_FOUND);
    free(st);
}

int main(int argc, char **argv)
{
    if (argc != 2 || (strcmp(argv[1], "local") != 0 && strcmp(argv[1], "netns") != 0)) {
        fprintf(stderr, "usage: test_cluster_run local|netns\n");
        return 2;
    }
    G.netns = strcmp(argv[1], "netns") == 0;
    if (G.netns && geteuid() != 0) {
        fprintf(stderr, "the netns cluster test needs root: skipped\n");
        return 77;
    }
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cluster),
        cmocka_unit_test(test_down_after_crash),
        cmocka_unit_test(test_ssh_lines_run),
        cmocka_unit_test(test_slurm_script_run),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
