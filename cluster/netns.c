/*
 * netns.c: the netns backend's network. Each host of the spec gets a network namespace with
 * one interface, eth0, the end of a veth pair whose other end sits on a bridge in the root
 * namespace (the bridge holds the subnet's .1, so the launcher reaches every host). A host's
 * link is shaped on both veth ends: netem for delay and loss, with a tbf child for bandwidth.
 * Everything is done with ip(8) and tc(8), and recorded in the state file before it is made.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cluster.h"

static uint32_t name_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

void fy_cluster_bridge_name(const fy_cluster_spec_t *spec, char *out, size_t out_len)
{
    snprintf(out, out_len, "fyb%04x", name_hash(spec->name) & 0xffff);
}

void fy_cluster_netns_names(const fy_cluster_spec_t *spec, int h, char *ns, size_t ns_len,
                            char *veth_br, char *veth_host, size_t veth_len)
{
    unsigned hash = name_hash(spec->name) & 0xffff;
    if (ns != NULL)
        snprintf(ns, ns_len, "fy%04x-%.20s", hash, spec->hosts[h].name);
    if (veth_br != NULL)
        snprintf(veth_br, veth_len, "fy%04x%db", hash, h);
    if (veth_host != NULL)
        snprintf(veth_host, veth_len, "fy%04x%dh", hash, h);
}

static fy_status_t cmdv(fy_cluster_cmd_t *cmds, int max, int *n, ...)
{
    if (*n >= max)
        return FY_ERR_OUT_OF_RANGE;
    fy_cluster_cmd_t *c = &cmds[*n];
    memset(c, 0, sizeof(*c));
    va_list ap;
    va_start(ap, n);
    fy_status_t st = FY_OK;
    for (const char *w; st == FY_OK && (w = va_arg(ap, const char *)) != NULL;)
        st = fy_cluster_cmd_add(c, w);
    va_end(ap);
    if (st != FY_OK) {
        fy_cluster_cmd_free(c);
        return st;
    }
    (*n)++;
    return FY_OK;
}

/* One command from a prefix and the rest of its words. */
static fy_status_t cmd_words(fy_cluster_cmd_t *cmds, int max, int *n, const char *const *pre,
                             int np, const char *const *w, int nw)
{
    if (*n >= max)
        return FY_ERR_OUT_OF_RANGE;
    fy_cluster_cmd_t *c = &cmds[*n];
    memset(c, 0, sizeof(*c));
    fy_status_t st = FY_OK;
    for (int i = 0; st == FY_OK && i < np + nw; i++)
        st = fy_cluster_cmd_add(c, i < np ? pre[i] : w[i - np]);
    if (st != FY_OK) {
        fy_cluster_cmd_free(c);
        return st;
    }
    (*n)++;
    return FY_OK;
}

static void bridge_ip(const fy_cluster_spec_t *spec, char *out, size_t out_len)
{
    const char *slash = strchr(spec->subnet, '/');
    int plen = slash ? (int)(slash - spec->subnet) : (int)strlen(spec->subnet);
    /* A.B.C.0 -> A.B.C.1 */
    snprintf(out, out_len, "%.*s1/24", plen - 1, spec->subnet);
}

/* shaping of one device (dev inside namespace ns, or in the root namespace when ns is NULL) */
static fy_status_t shape_cmds(const fy_cluster_host_t *h, const char *ns, const char *dev,
                              bool replace, fy_cluster_cmd_t *cmds, int max, int *n)
{
    char delay[32], loss[32], rate[32], burst[32];
    fy_status_t st = FY_OK;
    if (replace) {
        /* `tc qdisc del` fails when there is nothing to delete: run it through sh || true */
        char line[256];
        snprintf(line, sizeof(line), "tc %s %s qdisc del dev %s root 2>/dev/null || true",
                 ns ? "-n" : "", ns ? ns : "", dev);
        st = cmdv(cmds, max, n, "sh", "-c", line, NULL);
        if (st != FY_OK)
            return st;
    }
    if (h->bandwidth_bps == 0 && h->delay_ms <= 0 && h->loss_pct <= 0)
        return FY_OK;
    /* tc [-n NS] qdisc add dev DEV <where> ...: one prefix for both qdiscs */
    const char *pre[8];
    int np = 0;
    pre[np++] = "tc";
    if (ns != NULL) {
        pre[np++] = "-n";
        pre[np++] = ns;
    }
    pre[np++] = "qdisc";
    pre[np++] = "add";
    pre[np++] = "dev";
    pre[np++] = dev;
    bool netem = h->delay_ms > 0 || h->loss_pct > 0;
    if (netem) {
        /* delay and loss: netem at the root (needs sch_netem), the rate limit as its child */
        snprintf(delay, sizeof(delay), "%.3fms", h->delay_ms);
        snprintf(loss, sizeof(loss), "%.4f%%", h->loss_pct);
        const char *w[] = {"root", "handle", "1:", "netem", "delay", delay, "loss", loss,
                           "limit", "100000"};
        st = cmd_words(cmds, max, n, pre, np, w, (int)FY_ARRAY_SIZE(w));
        if (st != FY_OK || h->bandwidth_bps == 0)
            return st;
    }
    uint64_t bytes_per_s = h->bandwidth_bps / 8;
    uint64_t b = bytes_per_s / 100; /* 10 ms of traffic, at least two 64 KiB GSO packets */
    if (b < 131072)
        b = 131072;
    snprintf(rate, sizeof(rate), "%llubit", (unsigned long long)h->bandwidth_bps);
    snprintf(burst, sizeof(burst), "%llu", (unsigned long long)b);
    const char *w_child[] = {"parent", "1:1", "handle", "10:", "tbf", "rate", rate,
                             "burst", burst, "latency", "100ms"};
    const char *w_root[] = {"root", "handle", "10:", "tbf", "rate", rate,
                            "burst", burst, "latency", "100ms"};
    if (netem)
        return cmd_words(cmds, max, n, pre, np, w_child, (int)FY_ARRAY_SIZE(w_child));
    return cmd_words(cmds, max, n, pre, np, w_root, (int)FY_ARRAY_SIZE(w_root));
}

fy_status_t fy_cluster_link_cmds(const fy_cluster_spec_t *spec, int h, bool replace,
                                 fy_cluster_cmd_t *cmds, int max, int *n_p)
{
    if (spec == NULL || cmds == NULL || n_p == NULL || h < 0 || h >= spec->n_hosts)
        return FY_ERR_INVALID_ARG;
    char ns[32], vb[16];
    fy_cluster_netns_names(spec, h, ns, sizeof(ns), vb, NULL, sizeof(vb));
    /* bridge -> host on the bridge-side end, host -> bridge on the host's eth0 */
    fy_status_t st = shape_cmds(&spec->hosts[h], NULL, vb, replace, cmds, max, n_p);
    return st ? st : shape_cmds(&spec->hosts[h], ns, "eth0", replace, cmds, max, n_p);
}

fy_status_t fy_cluster_netns_plan(const fy_cluster_spec_t *spec, fy_cluster_cmd_t *cmds, int max,
                                  int *n_p)
{
    if (spec == NULL || cmds == NULL || n_p == NULL)
        return FY_ERR_INVALID_ARG;
    int n = 0;
    char br[16], bip[40];
    fy_cluster_bridge_name(spec, br, sizeof(br));
    bridge_ip(spec, bip, sizeof(bip));
    fy_status_t st = cmdv(cmds, max, &n, "ip", "link", "add", br, "type", "bridge", NULL);
    st = st ? st : cmdv(cmds, max, &n, "ip", "addr", "add", bip, "dev", br, NULL);
    st = st ? st : cmdv(cmds, max, &n, "ip", "link", "set", br, "up", NULL);
    for (int h = 0; st == FY_OK && h < spec->n_hosts; h++) {
        char ns[32], vb[16], vh[16], addr[80];
        fy_cluster_netns_names(spec, h, ns, sizeof(ns), vb, vh, sizeof(vb));
        snprintf(addr, sizeof(addr), "%s/24", spec->hosts[h].address);
        st = st ? st : cmdv(cmds, max, &n, "ip", "netns", "add", ns, NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "link", "add", vb, "type", "veth", "peer",
                            "name", vh, NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "link", "set", vb, "master", br, NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "link", "set", vb, "up", NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "link", "set", vh, "netns", ns, NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "-n", ns, "link", "set", vh, "name", "eth0",
                            NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "-n", ns, "addr", "add", addr, "dev", "eth0",
                            NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "-n", ns, "link", "set", "eth0", "up", NULL);
        st = st ? st : cmdv(cmds, max, &n, "ip", "-n", ns, "link", "set", "lo", "up", NULL);
        if (st == FY_OK)
            st = fy_cluster_link_cmds(spec, h, false, cmds, max, &n);
    }
    if (st != FY_OK) {
        for (int i = 0; i < n; i++)
            fy_cluster_cmd_free(&cmds[i]);
        return st;
    }
    *n_p = n;
    return FY_OK;
}

static bool exists_netns(const char *ns)
{
    char p[80];
    snprintf(p, sizeof(p), "/run/netns/%s", ns);
    return access(p, F_OK) == 0;
}

static bool exists_link(const char *dev)
{
    char p[80];
    snprintf(p, sizeof(p), "/sys/class/net/%s", dev);
    return access(p, F_OK) == 0;
}

fy_status_t fy_cluster_netns_setup(const fy_cluster_spec_t *spec, fy_cluster_state_t *st,
                                   int log_fd, char *err, size_t err_len);
fy_status_t fy_cluster_netns_setup(const fy_cluster_spec_t *spec, fy_cluster_state_t *st,
                                   int log_fd, char *err, size_t err_len)
{
    /* record everything first: a crash half-way leaves a state `down` can clean */
    fy_cluster_bridge_name(spec, st->bridge, sizeof(st->bridge));
    if (exists_link(st->bridge)) {
        snprintf(err, err_len, "bridge %s exists already (another cluster named '%s' is up, or "
                 "was not taken down: `ferry cluster down` with its spec, or `ip link del %s`)",
                 st->bridge, spec->name, st->bridge);
        st->bridge[0] = '\0';
        return FY_ERR_EXISTS;
    }
    for (int h = 0; h < spec->n_hosts; h++) {
        fy_cluster_netns_names(spec, h, st->netns[h], sizeof(st->netns[h]), st->links[h], NULL,
                               sizeof(st->links[h]));
        if (exists_netns(st->netns[h])) {
            snprintf(err, err_len, "network namespace %s exists already", st->netns[h]);
            st->n_netns = h; /* not ours: leave it */
            st->n_links = h;
            return FY_ERR_EXISTS;
        }
    }
    st->n_netns = st->n_links = spec->n_hosts;
    fy_status_t rc = fy_cluster_state_write(spec->log_dir, st);
    if (rc != FY_OK) {
        snprintf(err, err_len, "cannot write the state file in %s", spec->log_dir);
        return rc;
    }
    int max = 16 + spec->n_hosts * 16, n = 0;
    fy_cluster_cmd_t *cmds = calloc((size_t)max, sizeof(*cmds));
    if (cmds == NULL)
        return FY_ERR_NO_MEMORY;
    rc = fy_cluster_netns_plan(spec, cmds, max, &n);
    for (int i = 0; rc == FY_OK && i < n; i++) {
        int x = fy_cluster_run_cmd(&cmds[i], log_fd);
        if (x != 0) {
            char line[1024];
            fy_cluster_cmd_shell(&cmds[i], line, sizeof(line));
            snprintf(err, err_len, "`%s` failed (exit %d)%s; see %s/network.log", line, x,
                     x == 127                         ? ": is iproute2 installed?"
                     : strstr(line, " netem ") != NULL ? ": this kernel may lack sch_netem "
                                                         "(link delay and loss need it; "
                                                         "bandwidth alone uses tbf)"
                                                       : "",
                     spec->log_dir);
            rc = FY_ERR_INTERNAL;
        }
    }
    for (int i = 0; i < n; i++)
        fy_cluster_cmd_free(&cmds[i]);
    free(cmds);
    return rc;
}

fy_status_t fy_cluster_netns_teardown(const fy_cluster_state_t *st, int log_fd);
fy_status_t fy_cluster_netns_teardown(const fy_cluster_state_t *st, int log_fd)
{
    fy_status_t rc = FY_OK;
    for (int i = 0; i < st->n_netns; i++) {
        if (!exists_netns(st->netns[i]))
            continue;
        fy_cluster_cmd_t c = {0};
        fy_cluster_cmd_add(&c, "ip");
        fy_cluster_cmd_add(&c, "netns");
        fy_cluster_cmd_add(&c, "del");
        fy_cluster_cmd_add(&c, st->netns[i]);
        fy_cluster_run_cmd(&c, log_fd);
        fy_cluster_cmd_free(&c);
        if (exists_netns(st->netns[i]))
            rc = FY_ERR_BUSY;
    }
    /* veth pairs die with their namespace end; a pair not moved yet is deleted here */
    for (int i = 0; i < st->n_links + 1; i++) {
        const char *dev = i < st->n_links ? st->links[i] : st->bridge;
        if (dev[0] == '\0' || !exists_link(dev))
            continue;
        fy_cluster_cmd_t c = {0};
        fy_cluster_cmd_add(&c, "ip");
        fy_cluster_cmd_add(&c, "link");
        fy_cluster_cmd_add(&c, "del");
        fy_cluster_cmd_add(&c, dev);
        fy_cluster_run_cmd(&c, log_fd);
        fy_cluster_cmd_free(&c);
        if (exists_link(dev))
            rc = FY_ERR_BUSY;
    }
    return rc;
}

fy_status_t fy_cluster_set_link(fy_cluster_spec_t *spec, int h, uint64_t bandwidth_bps,
                                double delay_ms, double loss_pct)
{
    if (spec == NULL || h < 0 || h >= spec->n_hosts || loss_pct < 0 || loss_pct > 100 ||
        delay_ms < 0)
        return FY_ERR_INVALID_ARG;
    if (geteuid() != 0)
        return FY_ERR_UNSUPPORTED;
    spec->hosts[h].bandwidth_bps = bandwidth_bps;
    spec->hosts[h].delay_ms = delay_ms;
    spec->hosts[h].loss_pct = loss_pct;
    fy_cluster_cmd_t cmds[8];
    int n = 0;
    fy_status_t rc = fy_cluster_link_cmds(spec, h, true, cmds, 8, &n);
    for (int i = 0; i < n; i++) {
        if (rc == FY_OK && fy_cluster_run_cmd(&cmds[i], -1) != 0)
            rc = FY_ERR_INTERNAL;
        fy_cluster_cmd_free(&cmds[i]);
    }
    return rc;
}
