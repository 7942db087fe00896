/*
 * The cluster spec: a full spec parses into hosts and daemons with defaults and placement;
 * each kind of mistake is refused with its line number; daemon command lines, the netns plan,
 * state files, metric parsing.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "cluster.h"

static const char k_spec[] =
    "name: t1\n"                                                                    /* 1 */
    "backend: netns\n"                                                              /* 2 */
    "model: /models/m.gguf\n"                                                       /* 3 */
    "bin_dir: /opt/ferry/bin\n"                                                     /* 4 */
    "log_dir: /tmp/ferry-t1\n"                                                      /* 5 */
    "max_tokens: 64\n"                                                              /* 6 */
    "threads: 1\n"                                                                  /* 7 */
    "kv_memory: 64M\n"                                                              /* 8 */
    "codec: {policy: ferry, budget: 0.25, ttft_target: 300ms, min_budget: 0.125}\n" /* 9 */
    "ucx: {tls: tcp}\n"                                                             /* 10 */
    "network: {subnet: 10.88.1.0/24}\n"                                             /* 11 */
    "hosts:\n"                                                                      /* 12 */
    "  - {name: r, ssh_user: ops}\n"                                                /* 13 */
    "  - {name: p0, link: {bandwidth: 1gbit, delay: 2ms, loss: 0.1}}\n"             /* 14 */
    "  - {name: d0, address: 10.88.1.50, gpus: 2, link: {bandwidth: 100mbit}}\n"    /* 15 */
    "roles:\n"                                                                      /* 16 */
    "  decode:\n"                                                                   /* 17 */
    "    - {host: d0, count: 2, gpu: 1, kv_memory: 32M}\n"                          /* 18 */
    "  router: {host: r, http_port: 8000}\n"                                        /* 19 */
    "  prefill:\n"                                                                  /* 20 */
    "    - {host: p0, port: 6000, threads: 2}\n";                                   /* 21 */

static fy_cluster_spec_t *parse_ok(const char *text)
{
    fy_cluster_spec_t *s = malloc(sizeof(*s));
    assert_non_null(s);
    char err[512];
    fy_status_t st = fy_cluster_spec_parse(text, strlen(text), "t.yaml", "/base", -1, s, err,
                                           sizeof(err));
    if (st != FY_OK)
        fail_msg("unexpected error: %s", err);
    return s;
}

static bool has_word(const fy_cluster_cmd_t *c, const char *w);

static void test_full_spec(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = parse_ok(k_spec);
    assert_string_equal(s->name, "t1");
    assert_int_equal(s->backend, FY_CLUSTER_NETNS);
    assert_string_equal(s->model, "/models/m.gguf");
    assert_string_equal(s->policy, "ferry");
    assert_true(fabs(s->budget - 0.25) < 1e-12);
    assert_true(fabs(s->ttft_target_ms - 300) < 1e-9);
    assert_true(fabs(s->budget_min - 0.125) < 1e-12);
    assert_int_equal(s->n_hosts, 3);
    /* netns hosts without an address get subnet ones */
    assert_string_equal(s->hosts[0].address, "10.88.1.10");
    assert_string_equal(s->hosts[1].address, "10.88.1.11");
    assert_string_equal(s->hosts[2].address, "10.88.1.50");
    assert_string_equal(s->hosts[0].ssh_user, "ops");
    assert_int_equal(s->hosts[1].bandwidth_bps, 1000000000ull);
    assert_true(fabs(s->hosts[1].delay_ms - 2) < 1e-9);
    assert_true(fabs(s->hosts[1].loss_pct - 0.1) < 1e-9);
    assert_int_equal(s->hosts[2].bandwidth_bps, 100000000ull);
    /* router first whatever the order in the file, then prefill, then decode */
    assert_int_equal(s->n_daemons, 4);
    assert_string_equal(s->daemons[0].name, "router");
    assert_int_equal(s->daemons[0].port, 50051);
    assert_string_equal(s->daemons[1].name, "prefill-0");
    assert_int_equal(s->daemons[1].port, 6000);
    assert_int_equal(s->daemons[1].threads, 2);
    assert_string_equal(s->daemons[2].name, "decode-0");
    assert_string_equal(s->daemons[3].name, "decode-1");
    /* two decode workers on one host: distinct ports */
    assert_int_equal(s->daemons[2].port, 50062);
    assert_int_equal(s->daemons[2].kv_port, 50072);
    assert_int_not_equal(s->daemons[3].port, s->daemons[2].port);
    assert_int_not_equal(s->daemons[3].kv_port, s->daemons[2].kv_port);
    assert_int_not_equal(s->daemons[3].port, s->daemons[2].kv_port);
    assert_int_equal(s->daemons[3].gpu, 1);
    char router[64];
    fy_cluster_router_addr(s, router, sizeof(router));
    assert_string_equal(router, "10.88.1.10:50051");
    assert_string_equal(s->api_key_file, ""); // no key: an open cluster
    free(s);
    // The API key's file resolves as the other paths do.
    char text[sizeof(k_spec) + 64];
    snprintf(text, sizeof(text), "%sapi_key_file: keys/api.key\n", k_spec);
    s = parse_ok(text);
    assert_string_equal(s->api_key_file, "/base/keys/api.key");
    assert_null(fy_cluster_tls_ca(s)); // no tls: cleartext
    free(s);
    // TLS files too; the CA defaults to the certificate file; every daemon gets the flags.
    char tls_text[sizeof(k_spec) + 128];
    snprintf(tls_text, sizeof(tls_text), "%stls: {cert: tls/chain.pem, key: /k.pem}\n", k_spec);
    s = parse_ok(tls_text);
    assert_string_equal(s->tls_cert, "/base/tls/chain.pem");
    assert_string_equal(s->tls_key, "/k.pem");
    assert_string_equal(s->tls_ca, "");
    assert_false(s->tls_any_name);
    assert_string_equal(fy_cluster_tls_ca(s), "/base/tls/chain.pem");
    for (int i = 0; i < s->n_daemons; i++) {
        fy_cluster_cmd_t c;
        assert_int_equal(fy_cluster_daemon_cmd(s, i, NULL, &c), FY_OK);
        assert_true(has_word(&c, "--tls-cert=/base/tls/chain.pem"));
        assert_true(has_word(&c, "--tls-key=/k.pem"));
        assert_false(has_word(&c, "--tls-any-name"));
        fy_cluster_cmd_free(&c);
    }
    free(s);
    snprintf(tls_text, sizeof(tls_text),
             "%stls: {cert: /c.pem, key: /k.pem, ca: /ca.pem, any_name: true}\n", k_spec);
    s = parse_ok(tls_text);
    assert_string_equal(fy_cluster_tls_ca(s), "/ca.pem");
    fy_cluster_cmd_t c;
    assert_int_equal(fy_cluster_daemon_cmd(s, 0, NULL, &c), FY_OK);
    assert_true(has_word(&c, "--tls-ca=/ca.pem"));
    assert_true(has_word(&c, "--tls-any-name"));
    fy_cluster_cmd_free(&c);
    free(s);
}

static bool has_word(const fy_cluster_cmd_t *c, const char *w)
{
    for (int i = 0; i < c->argc; i++) {
        if (strcmp(c->argv[i], w) == 0)
            return true;
    }
    return false;
}

static void test_daemon_cmds(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = parse_ok(k_spec);
    fy_cluster_cmd_t c;
    assert_int_equal(fy_cluster_daemon_cmd(s, 0, NULL, &c), FY_OK);
    assert_string_equal(c.argv[0], "/opt/ferry/bin/ferry-router");
    assert_true(has_word(&c, "--listen=10.88.1.10:50051"));
    assert_true(has_word(&c, "--max-tokens=64"));
    assert_true(has_word(&c, "--http-listen=10.88.1.10:8000"));
    assert_false(has_word(&c, "--router=10.88.1.10:50051"));
    fy_cluster_cmd_free(&c);
    assert_int_equal(fy_cluster_daemon_cmd(s, 1, NULL, &c), FY_OK);
    assert_string_equal(c.argv[0], "/opt/ferry/bin/ferry-prefill");
    assert_true(has_word(&c, "--router=10.88.1.10:50051"));
    assert_true(has_word(&c, "--listen=10.88.1.11:6000"));
    assert_true(has_word(&c, "--threads=2"));
    assert_true(has_word(&c, "--policy=ferry"));
    assert_true(has_word(&c, "--budget=0.25"));
    assert_true(has_word(&c, "--ucx-tls=tcp"));
    for (int i = 0; i < c.argc; i++)
        assert_null(strstr(c.argv[i], "--http-listen"));
    fy_cluster_cmd_free(&c);
    assert_int_equal(fy_cluster_daemon_cmd(s, 3, NULL, &c), FY_OK);
    assert_string_equal(c.argv[0], "/opt/ferry/bin/ferry-decode");
    assert_true(has_word(&c, "--kv-memory=32M"));
    assert_true(has_word(&c, "--threads=1"));
    char kv[64];
    snprintf(kv, sizeof(kv), "--kv-listen=10.88.1.50:%d", s->daemons[3].kv_port);
    assert_true(has_word(&c, kv));
    assert_int_equal(c.n_env, 2);
    assert_string_equal(c.env[0], "CUDA_VISIBLE_DEVICES=1");
    char line[2048];
    assert_int_equal(fy_cluster_cmd_shell(&c, line, sizeof(line)), FY_OK);
    assert_non_null(strstr(line, "CUDA_VISIBLE_DEVICES=1 UCX_TLS=tcp /opt/ferry/bin/ferry-decode"));
    fy_cluster_cmd_free(&c);
    assert_int_equal(fy_cluster_daemon_cmd(s, 4, NULL, &c), FY_ERR_INVALID_ARG);
    free(s);
}

/* pair_link reaches both kinds of worker as --pair-link, not the router; a word it does not
 * know is refused with its line. */
static void test_pair_link(void **state)
{
    (void)state;
    char text[4096];
    snprintf(text, sizeof(text), "%spair_link: socket\n", k_spec);
    fy_cluster_spec_t *s = parse_ok(text);
    assert_string_equal(s->pair_link, "socket");
    fy_cluster_cmd_t c;
    for (int i = 0; i < 4; i++) {
        assert_int_equal(fy_cluster_daemon_cmd(s, i, NULL, &c), FY_OK);
        assert_true(has_word(&c, "--pair-link=socket") == (i != 0));
        fy_cluster_cmd_free(&c);
    }
    free(s);
    s = parse_ok(k_spec); // absent: the workers' own default
    assert_int_equal(fy_cluster_daemon_cmd(s, 1, NULL, &c), FY_OK);
    for (int i = 0; i < c.argc; i++)
        assert_null(strstr(c.argv[i], "--pair-link"));
    fy_cluster_cmd_free(&c);
    snprintf(text, sizeof(text), "%spair_link: infiniband\n", k_spec);
    char err[512];
    assert_int_not_equal(fy_cluster_spec_parse(text, strlen(text), "t.yaml", "/base", -1, s, err,
                                               sizeof(err)),
                         FY_OK);
    assert_non_null(strstr(err, "t.yaml:22"));
    assert_non_null(strstr(err, "pair_link"));
    free(s);
}

static void test_shell_quoting(void **state)
{
    (void)state;
    fy_cluster_cmd_t c = {0};
    assert_int_equal(fy_cluster_cmd_add(&c, "echo"), FY_OK);
    assert_int_equal(fy_cluster_cmd_add(&c, "it's a $HOME"), FY_OK);
    assert_int_equal(fy_cluster_cmd_add(&c, ""), FY_OK);
    char line[256];
    assert_int_equal(fy_cluster_cmd_shell(&c, line, sizeof(line)), FY_OK);
    assert_string_equal(line, "echo 'it'\\''s a $HOME' ''");
    assert_int_equal(fy_cluster_cmd_shell(&c, line, 10), FY_ERR_OUT_OF_RANGE);
    fy_cluster_cmd_free(&c);
}

/* Replaces line `lineno` (1-based) of the reference spec. */
static char *with_line(int lineno, const char *replacement)
{
    static char buf[4096];
    const char *p = k_spec;
    size_t pos = 0;
    for (int l = 1; *p; l++) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) + 1 : strlen(p);
        if (l == lineno)
            pos += (size_t)snprintf(buf + pos, sizeof(buf) - pos, "%s\n", replacement);
        else
            pos += (size_t)snprintf(buf + pos, sizeof(buf) - pos, "%.*s", (int)len, p);
        p += len;
    }
    return buf;
}

static void expect_error(const char *text, const char *where, const char *what)
{
    fy_cluster_spec_t *s = malloc(sizeof(*s));
    char err[512];
    fy_status_t st = fy_cluster_spec_parse(text, strlen(text), "t.yaml", "/base", -1, s, err,
                                           sizeof(err));
    free(s);
    if (st == FY_OK)
        fail_msg("accepted a spec that should fail with '%s'", what);
    if (strstr(err, where) == NULL || strstr(err, what) == NULL)
        fail_msg("error '%s' does not say '%s' and '%s'", err, where, what);
}

static void test_errors(void **state)
{
    (void)state;
    expect_error(with_line(2, "backend: docker"), "t.yaml:2:", "backend must be");
    expect_error(with_line(6, "max_tokens: lots"), "t.yaml:6:", "integer");
    expect_error(with_line(8, "kv_memory: 12Q"), "t.yaml:8:", "kv_memory");
    expect_error(with_line(9, "codec: {budget: 1.5}"), "t.yaml:9:", "out of range");
    expect_error(with_line(9, "codec: {min_budget: 0.5, max_budget: 0.25}"), "t.yaml:9:",
                 "above max_budget");
    expect_error(with_line(11, "network: {subnet: 10.88.1.0/16}"), "t.yaml:11:", "/24");
    expect_error(with_line(14, "  - {name: p0, link: {bandwidth: fast}}"), "t.yaml:14:",
                 "bad bandwidth");
    expect_error(with_line(14, "  - {name: p0, link: {delay: 1h}}"), "t.yaml:14:", "bad delay");
    expect_error(with_line(14, "  - {name: p0, link: {jitter: 1ms}}"), "t.yaml:14:",
                 "unknown link key");
    expect_error(with_line(14, "  - {name: r}"), "t.yaml:14:", "already defined on line 13");
    expect_error(with_line(14, "  - {name: P_0}"), "t.yaml:14:", "lower-case");
    expect_error(with_line(15, "  - {name: d0, address: 10.99.1.5}"), "t.yaml:15:",
                 "must be in 10.88.1.0/24");
    expect_error(with_line(18, "    - {host: nowhere}"), "t.yaml:18:", "unknown host 'nowhere'");
    expect_error(with_line(18, "    - {host: d0, gpu: 2}"), "t.yaml:18:", "has 2");
    expect_error(with_line(18, "    - {host: d0, colour: red}"), "t.yaml:18:",
                 "unknown decode key 'colour'");
    expect_error(with_line(19, "  balancer: {host: r}"), "t.yaml:19:", "unknown role");
    expect_error(with_line(21, "    - {host: p0, port: 70000}"), "t.yaml:21:", "out of range");
    expect_error(with_line(21, "    - {host: p0, kv_port: 1}"), "t.yaml:21:",
                 "unknown prefill key");
    expect_error(with_line(21, "    - {host: p0, http_port: 8080}"),
                 "t.yaml:21:", "unknown prefill key 'http_port'");
    expect_error(with_line(19, "  router: {host: r, http_port: 0}"), "t.yaml:19:", "out of range");
    expect_error("name: x\nmodel: m\nhosts: [{name: a}]\nroles:\n"
                 "  router: {host: a, port: 7000, http_port: 7001}\n"
                 "  prefill: [{host: a, port: 7001}]\n  decode: [{host: a}]\n",
                 "t.yaml:6:", "prefill-0 uses port 7001, as router (line 5)");
    expect_error("name: x\nmodel: m\nhosts: [{name: a}]\nroles:\n  router: {host: a}\n"
                 "  prefill: [{host: a, port: 7001}]\n"
                 "  decode: [{host: a, port: 7000, kv_port: 7001}]\n",
                 "t.yaml:7:", "decode-0 uses port 7001, as prefill-0 (line 6)");
    expect_error(with_line(1, "nome: t1"), "t.yaml:1:", "unknown key 'nome'");
    expect_error(with_line(10, "tls: {cert: c.pem}"), "t.yaml:10:", "needs both cert and key");
    expect_error(with_line(10, "tls: {cert: c.pem, key: k.pem, any_name: sure}"),
                 "t.yaml:10:", "true or false");
    expect_error(with_line(10, "tls: {cert: c.pem, key: k.pem, crl: x}"),
                 "t.yaml:10:", "unknown tls key 'crl'");
    expect_error(with_line(10, "tls: c.pem"), "t.yaml:10:", "must be a mapping");
    expect_error(with_line(3, "#"), "t.yaml:", "needs a 'model'");
    expect_error("name: x\nmodel: m\nhosts: [{name: a}]\nroles:\n  router: {host: a}\n"
                 "  prefill: []\n  decode: [{host: a}]\n",
                 "t.yaml:5:", "at least one prefill");
    expect_error(with_line(13, "  - {name: r, ssh_user: [a}"), "t.yaml:13:", "YAML error");
    expect_error("", "t.yaml", "empty spec");
    expect_error("- a\n- b\n", "t.yaml:1:", "must be a mapping");
    /* ssh needs addresses */
    expect_error(with_line(2, "backend: ssh"), "t.yaml:13:", "needs an address");
}

/* The router's reserve lease passes through as its own flag (long CPU prefills outlast the
 * default), and a value the router could not read is refused at parse time. */
static void test_reserve_lease(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = parse_ok(with_line(6, "reserve_lease: 5m"));
    fy_cluster_cmd_t c;
    assert_int_equal(fy_cluster_daemon_cmd(s, 0, NULL, &c), FY_OK);
    assert_true(has_word(&c, "--reserve-lease=5m"));
    fy_cluster_cmd_free(&c);
    assert_int_equal(fy_cluster_daemon_cmd(s, 1, NULL, &c), FY_OK);
    for (int i = 0; i < c.argc; i++)
        assert_null(strstr(c.argv[i], "reserve-lease"));
    fy_cluster_cmd_free(&c);
    free(s);
    s = parse_ok(k_spec);
    assert_int_equal(fy_cluster_daemon_cmd(s, 0, NULL, &c), FY_OK);
    for (int i = 0; i < c.argc; i++)
        assert_null(strstr(c.argv[i], "reserve-lease"));
    fy_cluster_cmd_free(&c);
    free(s);
    expect_error(with_line(6, "reserve_lease: soon"), "t.yaml:6:", "bad reserve_lease");
    expect_error(with_line(6, "reserve_lease: 0"), "t.yaml:6:", "bad reserve_lease");
}

/* kv_seal is the router's --kv-seal; only its three values parse. */
static void test_kv_seal(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = parse_ok(with_line(6, "kv_seal: off"));
    fy_cluster_cmd_t c;
    assert_int_equal(fy_cluster_daemon_cmd(s, 0, NULL, &c), FY_OK);
    assert_true(has_word(&c, "--kv-seal=off"));
    fy_cluster_cmd_free(&c);
    assert_int_equal(fy_cluster_daemon_cmd(s, 1, NULL, &c), FY_OK);
    for (int i = 0; i < c.argc; i++)
        assert_null(strstr(c.argv[i], "kv-seal"));
    fy_cluster_cmd_free(&c);
    free(s);
    expect_error(with_line(6, "kv_seal: yes"), "t.yaml:6:", "bad kv_seal");
}

static void test_local_backend(void **state)
{
    (void)state;
    const char *text = "name: l\nmodel: m.gguf\nhosts: [{name: a}]\n"
                       "roles: {router: {host: a}, prefill: {host: a, count: 3},"
                       " decode: [{host: a}, {host: a, port: 7000}]}\n";
    fy_cluster_spec_t *s = parse_ok(text);
    assert_int_equal(s->backend, FY_CLUSTER_LOCAL);
    assert_string_equal(s->model, "/base/m.gguf");
    assert_int_equal(s->n_daemons, 6);
    assert_string_equal(s->daemons[3].name, "prefill-2");
    /* local: unnamed ports stay 0 (free ones at `up`), addresses are loopback */
    assert_int_equal(s->daemons[1].port, 0);
    assert_int_equal(s->daemons[5].port, 7000);
    assert_string_equal(fy_cluster_daemon_host_addr(s, 5), "127.0.0.1");
    assert_non_null(strstr(s->log_dir, "ferry-cluster-l"));
    free(s);
    /* the override turns it into netns with default subnet addresses */
    s = malloc(sizeof(*s));
    char err[256];
    assert_int_equal(fy_cluster_spec_parse(text, strlen(text), "t", "/b", FY_CLUSTER_NETNS, s,
                                           err, sizeof(err)),
                     FY_OK);
    assert_string_equal(s->hosts[0].address, "10.77.0.10");
    assert_int_equal(s->daemons[1].port, 50061);
    assert_int_equal(s->daemons[2].port, 50062); /* replicas on one host move up */
    assert_int_equal(s->daemons[3].port, 50063);
    assert_int_equal(s->daemons[4].port, 50064); /* decode-0: 50062 is taken on host a */
    assert_int_equal(s->daemons[4].kv_port, 50072);
    free(s);
}

static void test_netns_plan(void **state)
{
    (void)state;
    fy_cluster_spec_t *s = parse_ok(k_spec);
    fy_cluster_cmd_t cmds[128];
    int n = 0;
    assert_int_equal(fy_cluster_netns_plan(s, cmds, 128, &n), FY_OK);
    char br[16];
    fy_cluster_bridge_name(s, br, sizeof(br));
    assert_true(strlen(br) <= 15);
    char line[1024];
    fy_cluster_cmd_shell(&cmds[0], line, sizeof(line));
    char want[128];
    snprintf(want, sizeof(want), "ip link add %s type bridge", br);
    assert_string_equal(line, want);
    fy_cluster_cmd_shell(&cmds[1], line, sizeof(line));
    snprintf(want, sizeof(want), "ip addr add 10.88.1.1/24 dev %s", br);
    assert_string_equal(line, want);
    int n_ns = 0, n_netem = 0, n_tbf = 0, n_addr = 0;
    for (int i = 0; i < n; i++) {
        fy_cluster_cmd_shell(&cmds[i], line, sizeof(line));
        char ns[32], vb[16], vh[16];
        if (strncmp(line, "ip netns add ", 13) == 0)
            n_ns++;
        if (strstr(line, " netem delay ") != NULL)
            n_netem++;
        if (strstr(line, " tbf rate ") != NULL)
            n_tbf++;
        if (strstr(line, " addr add 10.88.1.") != NULL)
            n_addr++;
        /* every interface name fits IFNAMSIZ */
        fy_cluster_netns_names(s, i % s->n_hosts, ns, sizeof(ns), vb, vh, sizeof(vb));
        assert_true(strlen(vb) <= 15 && strlen(vh) <= 15);
        fy_cluster_cmd_free(&cmds[i]);
    }
    assert_int_equal(n_ns, 3);
    assert_int_equal(n_addr, 4); /* the bridge and three hosts */
    /* r: no shaping; p0 (delay, loss, rate): netem + tbf child both ways; d0 (rate): tbf */
    assert_int_equal(n_netem, 2);
    assert_int_equal(n_tbf, 4);
    /* the link of p0, on its own */
    fy_cluster_cmd_t lc[8];
    int ln = 0;
    assert_int_equal(fy_cluster_link_cmds(s, 1, false, lc, 8, &ln), FY_OK);
    assert_int_equal(ln, 4);
    fy_cluster_cmd_shell(&lc[1], line, sizeof(line));
    assert_non_null(strstr(line, "parent 1:1 handle 10: tbf rate 1000000000bit burst 1250000"));
    fy_cluster_cmd_shell(&lc[2], line, sizeof(line));
    assert_non_null(strstr(line, "tc -n fy"));
    assert_non_null(strstr(line, "dev eth0 root handle 1: netem delay 2.000ms loss 0.1000%"));
    for (int i = 0; i < ln; i++)
        fy_cluster_cmd_free(&lc[i]);
    /* d0: the rate alone is a root tbf; replacing first deletes what is there */
    ln = 0;
    assert_int_equal(fy_cluster_link_cmds(s, 2, true, lc, 8, &ln), FY_OK);
    assert_int_equal(ln, 4);
    fy_cluster_cmd_shell(&lc[0], line, sizeof(line));
    assert_non_null(strstr(line, "qdisc del dev"));
    fy_cluster_cmd_shell(&lc[1], line, sizeof(line));
    assert_non_null(strstr(line, "root handle 10: tbf rate 100000000bit burst 131072"));
    for (int i = 0; i < ln; i++)
        fy_cluster_cmd_free(&lc[i]);
    /* too little room is an error, not an overflow */
    assert_int_equal(fy_cluster_netns_plan(s, cmds, 5, &n), FY_ERR_OUT_OF_RANGE);
    free(s);
}

static void test_state_and_metrics(void **state)
{
    (void)state;
    char dir[] = "/tmp/ferry-test-cluster-XXXXXX";
    assert_non_null(mkdtemp(dir));
    fy_cluster_state_t *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b));
    snprintf(a->backend, sizeof(a->backend), "netns");
    snprintf(a->bridge, sizeof(a->bridge), "fyb1234");
    a->n_netns = 2;
    snprintf(a->netns[0], sizeof(a->netns[0]), "fy1234-a");
    snprintf(a->netns[1], sizeof(a->netns[1]), "fy1234-b");
    a->n_links = 1;
    snprintf(a->links[0], sizeof(a->links[0]), "fy12340b");
    a->n_daemons = 2;
    snprintf(a->daemons[0].name, sizeof(a->daemons[0].name), "router");
    a->daemons[0].pid = 42;
    snprintf(a->daemons[0].addr, sizeof(a->daemons[0].addr), "10.0.0.1:1");
    snprintf(a->daemons[1].name, sizeof(a->daemons[1].name), "decode-0");
    a->daemons[1].pid = 43;
    snprintf(a->daemons[1].addr, sizeof(a->daemons[1].addr), "10.0.0.2:2");
    snprintf(a->daemons[1].kv_addr, sizeof(a->daemons[1].kv_addr), "10.0.0.2:3");
    assert_int_equal(fy_cluster_state_write(dir, a), FY_OK);
    assert_int_equal(fy_cluster_state_read(dir, b), FY_OK);
    assert_memory_equal(a, b, sizeof(*a));
    char path[128];
    snprintf(path, sizeof(path), "%s/cluster.state", dir);
    unlink(path);
    assert_int_equal(fy_cluster_state_read(dir, b), FY_ERR_NOT_FOUND);
    rmdir(dir);
    free(a);
    free(b);

    const char *body = "# HELP x\nferry_router_workers{role=\"prefill\"} 2\n"
                       "ferry_router_workers{role=\"decode\"} 3\nferry_x 1.5\nferry_x_total 9\n";
    assert_true(fy_cluster_metric(body, "ferry_router_workers", "role=\"decode\"") == 3);
    assert_true(fy_cluster_metric(body, "ferry_router_workers", "role=\"prefill\"") == 2);
    assert_true(fy_cluster_metric(body, "ferry_x", NULL) == 1.5);
    assert_true(isnan(fy_cluster_metric(body, "ferry_router_workers", NULL)));
    assert_true(isnan(fy_cluster_metric(body, "ferry_y", NULL)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_spec),     cmocka_unit_test(test_daemon_cmds),
        cmocka_unit_test(test_pair_link),     cmocka_unit_test(test_shell_quoting),
        cmocka_unit_test(test_errors),        cmocka_unit_test(test_local_backend),
        cmocka_unit_test(test_netns_plan),    cmocka_unit_test(test_state_and_metrics),
        cmocka_unit_test(test_reserve_lease), cmocka_unit_test(test_kv_seal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
