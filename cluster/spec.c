/*
 * spec.c: the cluster spec (YAML, libyaml's document API): parsing with line numbers in every
 * error, validation, and the command line of each daemon.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <yaml.h>

#include "cluster.h"

typedef struct {
    yaml_document_t *doc;
    const char *file;
    char *err;
    size_t err_len;
    const char *base_dir;
    int backend_override; /* < 0: the spec's backend */
} pctx_t;

static fy_status_t perr(pctx_t *c, const yaml_node_t *n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static fy_status_t perr(pctx_t *c, const yaml_node_t *n, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n != NULL)
        snprintf(c->err, c->err_len, "%s:%lu: %s", c->file, (unsigned long)n->start_mark.line + 1,
                 msg);
    else
        snprintf(c->err, c->err_len, "%s: %s", c->file, msg);
    return FY_ERR_INVALID_ARG;
}

const char *fy_cluster_backend_name(fy_cluster_backend_t b)
{
    static const char *names[] = {"local", "netns", "ssh", "slurm", "k8s"};
    return (unsigned)b < FY_ARRAY_SIZE(names) ? names[b] : "?";
}

fy_status_t fy_cluster_backend_parse(const char *s, fy_cluster_backend_t *b_p)
{
    for (int b = FY_CLUSTER_LOCAL; b <= FY_CLUSTER_K8S; b++) {
        if (strcmp(s, fy_cluster_backend_name((fy_cluster_backend_t)b)) == 0) {
            *b_p = (fy_cluster_backend_t)b;
            return FY_OK;
        }
    }
    if (strcmp(s, "kubernetes") == 0) {
        *b_p = FY_CLUSTER_K8S;
        return FY_OK;
    }
    return FY_ERR_INVALID_ARG;
}

const char *fy_cluster_role_name(fy_cluster_role_t r)
{
    static const char *names[] = {"router", "prefill", "decode"};
    return (unsigned)r < FY_ARRAY_SIZE(names) ? names[r] : "?";
}

/* ---- scalar helpers ---- */

static const char *scalar(const yaml_node_t *n)
{
    return n != NULL && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static fy_status_t get_str(pctx_t *c, const yaml_node_t *n, const char *key, char *out,
                           size_t out_len)
{
    const char *s = scalar(n);
    if (s == NULL)
        return perr(c, n, "'%s' must be a string", key);
    if (strlen(s) >= out_len)
        return perr(c, n, "'%s' is too long (at most %zu characters)", key, out_len - 1);
    memcpy(out, s, strlen(s) + 1);
    return FY_OK;
}

static fy_status_t get_int(pctx_t *c, const yaml_node_t *n, const char *key, long lo, long hi,
                           int *out)
{
    const char *s = scalar(n);
    char *end;
    if (s == NULL || *s == '\0')
        return perr(c, n, "'%s' must be an integer", key);
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return perr(c, n, "'%s' must be an integer, not '%s'", key, s);
    if (v < lo || v > hi)
        return perr(c, n, "'%s' = %ld is out of range [%ld, %ld]", key, v, lo, hi);
    *out = (int)v;
    return FY_OK;
}

static fy_status_t get_double(pctx_t *c, const yaml_node_t *n, const char *key, double lo,
                              double hi, double *out)
{
    const char *s = scalar(n);
    char *end;
    if (s == NULL || *s == '\0')
        return perr(c, n, "'%s' must be a number", key);
    double v = strtod(s, &end);
    if (*end == '%' && end[1] == '\0')
        end++;
    if (*end != '\0' || !isfinite(v))
        return perr(c, n, "'%s' must be a number, not '%s'", key, s);
    if (v < lo || v > hi)
        return perr(c, n, "'%s' = %g is out of range [%g, %g]", key, v, lo, hi);
    *out = v;
    return FY_OK;
}

/* "100mbit", "1gbit", "10Gbit", "500kbit", "1000000" (bit/s), "0"/"unlimited". */
static fy_status_t parse_rate(const char *s, uint64_t *bps)
{
    char *end;
    if (strcmp(s, "unlimited") == 0 || strcmp(s, "none") == 0) {
        *bps = 0;
        return FY_OK;
    }
    double v = strtod(s, &end);
    if (end == s || !isfinite(v) || v < 0)
        return FY_ERR_INVALID_ARG;
    double mul = 1;
    if (strcasecmp(end, "") == 0 || strcasecmp(end, "bit") == 0 || strcasecmp(end, "bps") == 0)
        mul = 1;
    else if (strcasecmp(end, "kbit") == 0 || strcasecmp(end, "kbps") == 0)
        mul = 1e3;
    else if (strcasecmp(end, "mbit") == 0 || strcasecmp(end, "mbps") == 0)
        mul = 1e6;
    else if (strcasecmp(end, "gbit") == 0 || strcasecmp(end, "gbps") == 0)
        mul = 1e9;
    else
        return FY_ERR_INVALID_ARG;
    double r = v * mul;
    if (r > 4e12)
        return FY_ERR_OUT_OF_RANGE;
    if (r > 0 && r < 8000)
        return FY_ERR_OUT_OF_RANGE; /* tc cannot shape below ~8 kbit/s sensibly */
    *bps = (uint64_t)r;
    return FY_OK;
}

/* "10ms", "1.5ms", "0", "2s", "500us". */
static fy_status_t parse_delay_ms(const char *s, double *ms)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || !isfinite(v) || v < 0)
        return FY_ERR_INVALID_ARG;
    if (*end == '\0' || strcmp(end, "ms") == 0)
        *ms = v;
    else if (strcmp(end, "s") == 0)
        *ms = v * 1000;
    else if (strcmp(end, "us") == 0)
        *ms = v / 1000;
    else
        return FY_ERR_INVALID_ARG;
    if (*ms > 10000)
        return FY_ERR_OUT_OF_RANGE;
    return FY_OK;
}

static bool valid_name(const char *s)
{
    if (*s == '\0')
        return false;
    for (const char *p = s; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-'))
            return false;
    }
    return s[0] != '-';
}

static bool valid_ipv4(const char *s, unsigned char o[4])
{
    unsigned a, b, c2, d;
    char tail;
    if (sscanf(s, "%u.%u.%u.%u%c", &a, &b, &c2, &d, &tail) != 4)
        return false;
    if (a > 255 || b > 255 || c2 > 255 || d > 255)
        return false;
    if (o != NULL) {
        o[0] = (unsigned char)a;
        o[1] = (unsigned char)b;
        o[2] = (unsigned char)c2;
        o[3] = (unsigned char)d;
    }
    return true;
}

static fy_status_t abs_path(pctx_t *c, const yaml_node_t *n, const char *key, char *out,
                            size_t out_len)
{
    char tmp[FY_CLUSTER_PATH_MAX];
    fy_status_t st = get_str(c, n, key, tmp, sizeof(tmp));
    if (st != FY_OK)
        return st;
    if (tmp[0] == '\0')
        return perr(c, n, "'%s' must not be empty", key);
    if (tmp[0] == '/') {
        snprintf(out, out_len, "%s", tmp);
        return FY_OK;
    }
    char cwd[PATH_MAX];
    const char *base = c->base_dir;
    if (base == NULL) {
        if (getcwd(cwd, sizeof(cwd)) == NULL)
            return perr(c, n, "cannot resolve '%s': %s", tmp, strerror(errno));
        base = cwd;
    }
    if ((size_t)snprintf(out, out_len, "%s/%s", base, tmp) >= out_len)
        return perr(c, n, "'%s' is too long once made absolute", key);
    return FY_OK;
}

#define FOR_PAIRS(node, pair)                                                                  \
    for (yaml_node_pair_t *pair = (node)->data.mapping.pairs.start;                           \
         pair < (node)->data.mapping.pairs.top; pair++)

static yaml_node_t *node_at(pctx_t *c, int id)
{
    return yaml_document_get_node(c->doc, id);
}

/* ---- sections ---- */

static fy_status_t parse_link(pctx_t *c, yaml_node_t *n, fy_cluster_host_t *h)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "'link' must be a mapping (bandwidth, delay, loss)");
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k), *val = scalar(v);
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (val == NULL)
            return perr(c, v, "'%s' must be a scalar", key);
        fy_status_t st;
        if (strcmp(key, "bandwidth") == 0) {
            st = parse_rate(val, &h->bandwidth_bps);
            if (st != FY_OK)
                return perr(c, v, "bad bandwidth '%s' (e.g. 100mbit, 1gbit, unlimited; at least "
                                  "8kbit)", val);
        } else if (strcmp(key, "delay") == 0) {
            if (parse_delay_ms(val, &h->delay_ms) != FY_OK)
                return perr(c, v, "bad delay '%s' (e.g. 2ms, 0.5ms; at most 10s)", val);
        } else if (strcmp(key, "loss") == 0) {
            st = get_double(c, v, "loss", 0, 100, &h->loss_pct);
            if (st != FY_OK)
                return st;
        } else {
            return perr(c, k, "unknown link key '%s' (bandwidth, delay, loss)", key);
        }
    }
    return FY_OK;
}

static fy_status_t parse_host(pctx_t *c, yaml_node_t *n, fy_cluster_host_t *h)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "each host must be a mapping (name, address, ...)");
    h->line = (int)n->start_mark.line + 1;
    fy_status_t st = FY_OK;
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "name") == 0)
            st = get_str(c, v, key, h->name, sizeof(h->name));
        else if (strcmp(key, "address") == 0)
            st = get_str(c, v, key, h->address, sizeof(h->address));
        else if (strcmp(key, "ssh_user") == 0 || strcmp(key, "user") == 0)
            st = get_str(c, v, key, h->ssh_user, sizeof(h->ssh_user));
        else if (strcmp(key, "gpus") == 0)
            st = get_int(c, v, key, 0, 64, &h->gpus);
        else if (strcmp(key, "link") == 0)
            st = parse_link(c, v, h);
        else
            return perr(c, k, "unknown host key '%s' (name, address, ssh_user, gpus, link)", key);
        if (st != FY_OK)
            return st;
    }
    if (h->name[0] == '\0')
        return perr(c, n, "a host needs a name");
    if (!valid_name(h->name))
        return perr(c, n, "host name '%s': use lower-case letters, digits and '-'", h->name);
    return FY_OK;
}

static int host_index(const fy_cluster_spec_t *s, const char *name)
{
    for (int i = 0; i < s->n_hosts; i++) {
        if (strcmp(s->hosts[i].name, name) == 0)
            return i;
    }
    return -1;
}

/* One daemon entry: {host: H, port: P, kv_port: K, threads: T, gpu: G, kv_memory: M,
 * count: N}; the router's {host: H, port: P, http_port: A}. The hosts are parsed before the roles
 * (validation happens after both). */
static fy_status_t parse_daemon(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s,
                                fy_cluster_role_t role, int *count_p, yaml_node_t **host_node_p)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "a %s entry must be a mapping (host, port, ...)",
                    fy_cluster_role_name(role));
    if (s->n_daemons >= FY_CLUSTER_MAX_DAEMONS)
        return perr(c, n, "too many daemons (at most %d)", FY_CLUSTER_MAX_DAEMONS);
    fy_cluster_daemon_t *d = &s->daemons[s->n_daemons];
    memset(d, 0, sizeof(*d));
    d->role = role;
    d->host = -1;
    d->gpu = -1;
    d->line = (int)n->start_mark.line + 1;
    *count_p = 1;
    *host_node_p = n;
    char host[FY_CLUSTER_NAME_MAX] = "";
    fy_status_t st = FY_OK;
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "host") == 0) {
            st = get_str(c, v, key, host, sizeof(host));
            *host_node_p = v;
        } else if (strcmp(key, "port") == 0) {
            st = get_int(c, v, key, 0, 65535, &d->port);
        } else if (strcmp(key, "kv_port") == 0 && role == FY_CLUSTER_DECODE) {
            st = get_int(c, v, key, 0, 65535, &d->kv_port);
        } else if (strcmp(key, "http_port") == 0 && role == FY_CLUSTER_ROUTER) {
            st = get_int(c, v, key, 1, 65535, &d->http_port);
        } else if (strcmp(key, "threads") == 0 && role != FY_CLUSTER_ROUTER) {
            st = get_int(c, v, key, 0, 1024, &d->threads);
        } else if (strcmp(key, "gpu") == 0 && role != FY_CLUSTER_ROUTER) {
            st = get_int(c, v, key, -1, 63, &d->gpu);
        } else if (strcmp(key, "kv_memory") == 0 && role == FY_CLUSTER_DECODE) {
            st = get_str(c, v, key, d->kv_memory, sizeof(d->kv_memory));
            uint64_t b;
            if (st == FY_OK && fy_parse_size(d->kv_memory, &b) != FY_OK)
                return perr(c, v, "bad kv_memory '%s' (e.g. 256M, 2G)", d->kv_memory);
        } else if (strcmp(key, "count") == 0 && role != FY_CLUSTER_ROUTER) {
            st = get_int(c, v, key, 1, FY_CLUSTER_MAX_DAEMONS, count_p);
        } else {
            return perr(c, k, "unknown %s key '%s' (host, port%s)", fy_cluster_role_name(role), key,
                        role == FY_CLUSTER_DECODE    ? ", kv_port, threads, gpu, kv_memory, count"
                        : role == FY_CLUSTER_PREFILL ? ", threads, gpu, count"
                                                     : ", http_port");
        }
        if (st != FY_OK)
            return st;
    }
    if (host[0] == '\0')
        return perr(c, n, "a %s entry needs 'host'", fy_cluster_role_name(role));
    d->host = host_index(s, host);
    if (d->host < 0)
        return perr(c, *host_node_p, "unknown host '%s' (not in 'hosts')", host);
    return FY_OK;
}

static fy_status_t add_daemons(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s,
                               fy_cluster_role_t role, int *index_p)
{
    int count;
    yaml_node_t *hn;
    fy_status_t st = parse_daemon(c, n, s, role, &count, &hn);
    if (st != FY_OK)
        return st;
    fy_cluster_daemon_t proto = s->daemons[s->n_daemons];
    for (int j = 0; j < count; j++) {
        if (s->n_daemons >= FY_CLUSTER_MAX_DAEMONS)
            return perr(c, n, "too many daemons (at most %d)", FY_CLUSTER_MAX_DAEMONS);
        fy_cluster_daemon_t *d = &s->daemons[s->n_daemons++];
        *d = proto;
        /* replicas on one host take consecutive ports */
        if (j > 0 && proto.port != 0)
            d->port = proto.port + j;
        if (j > 0 && proto.kv_port != 0)
            d->kv_port = proto.kv_port + j;
        if (role == FY_CLUSTER_ROUTER)
            snprintf(d->name, sizeof(d->name), "router");
        else
            snprintf(d->name, sizeof(d->name), "%s-%d", fy_cluster_role_name(role),
                     (*index_p)++);
    }
    return FY_OK;
}

static fy_status_t parse_role_list(pctx_t *c, yaml_node_t *v, fy_cluster_spec_t *s,
                                   fy_cluster_role_t role, int *index_p)
{
    if (v->type == YAML_MAPPING_NODE)
        return add_daemons(c, v, s, role, index_p);
    if (v->type != YAML_SEQUENCE_NODE)
        return perr(c, v, "'%s' must be a list of {host: ...} entries",
                    fy_cluster_role_name(role));
    for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top;
         it++) {
        fy_status_t st = add_daemons(c, node_at(c, *it), s, role, index_p);
        if (st != FY_OK)
            return st;
    }
    return FY_OK;
}

static fy_status_t parse_roles(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "'roles' must be a mapping (router, prefill, decode)");
    int n_router = 0, ip = 0, id = 0;
    /* router first, then prefill, then decode, whatever the order in the file */
    for (int pass = 0; pass < 3; pass++) {
        FOR_PAIRS(n, p)
        {
            yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
            const char *key = scalar(k);
            if (key == NULL)
                return perr(c, k, "keys must be strings");
            fy_status_t st = FY_OK;
            if (strcmp(key, "router") == 0) {
                if (pass != 0)
                    continue;
                if (v->type != YAML_MAPPING_NODE)
                    return perr(c, v, "'router' must be one {host: ..., port: ...} mapping");
                st = add_daemons(c, v, s, FY_CLUSTER_ROUTER, &n_router);
                n_router = 1;
            } else if (strcmp(key, "prefill") == 0) {
                if (pass != 1)
                    continue;
                st = parse_role_list(c, v, s, FY_CLUSTER_PREFILL, &ip);
            } else if (strcmp(key, "decode") == 0) {
                if (pass != 2)
                    continue;
                st = parse_role_list(c, v, s, FY_CLUSTER_DECODE, &id);
            } else if (pass == 0) {
                return perr(c, k, "unknown role '%s' (router, prefill, decode)", key);
            }
            if (st != FY_OK)
                return st;
        }
    }
    if (n_router == 0)
        return perr(c, n, "'roles' needs a router");
    if (ip == 0)
        return perr(c, n, "'roles' needs at least one prefill worker");
    if (id == 0)
        return perr(c, n, "'roles' needs at least one decode worker");
    return FY_OK;
}

static fy_status_t parse_codec(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "'codec' must be a mapping (policy, budget, ttft_target, ...)");
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        fy_status_t st;
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "policy") == 0) {
            st = get_str(c, v, key, s->policy, sizeof(s->policy));
        } else if (strcmp(key, "budget") == 0) {
            st = get_double(c, v, key, 0, 1, &s->budget);
        } else if (strcmp(key, "ttft_target") == 0) {
            const char *val = scalar(v);
            if (val == NULL || parse_delay_ms(val, &s->ttft_target_ms) != FY_OK)
                return perr(c, v, "bad ttft_target (e.g. 200ms, 1.5s)");
            st = FY_OK;
        } else if (strcmp(key, "min_budget") == 0) {
            st = get_double(c, v, key, 0.01, 1, &s->budget_min);
        } else if (strcmp(key, "max_budget") == 0) {
            st = get_double(c, v, key, 0.01, 1, &s->budget_max);
        } else {
            return perr(c, k, "unknown codec key '%s' (policy, budget, ttft_target, min_budget, "
                              "max_budget)", key);
        }
        if (st != FY_OK)
            return st;
    }
    if (s->budget_min > s->budget_max)
        return perr(c, n, "min_budget %g is above max_budget %g", s->budget_min, s->budget_max);
    return FY_OK;
}

static fy_status_t parse_ucx(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "'ucx' must be a mapping (tls, devices)");
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        fy_status_t st;
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "tls") == 0)
            st = get_str(c, v, key, s->ucx_tls, sizeof(s->ucx_tls));
        else if (strcmp(key, "devices") == 0)
            st = get_str(c, v, key, s->ucx_devices, sizeof(s->ucx_devices));
        else
            return perr(c, k, "unknown ucx key '%s' (tls, devices)", key);
        if (st != FY_OK)
            return st;
    }
    return FY_OK;
}

static fy_status_t parse_tls(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "'tls' must be a mapping (cert, key, ca, any_name)");
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        fy_status_t st;
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "cert") == 0) {
            st = abs_path(c, v, key, s->tls_cert, sizeof(s->tls_cert));
        } else if (strcmp(key, "key") == 0) {
            st = abs_path(c, v, key, s->tls_key, sizeof(s->tls_key));
        } else if (strcmp(key, "ca") == 0) {
            st = abs_path(c, v, key, s->tls_ca, sizeof(s->tls_ca));
        } else if (strcmp(key, "any_name") == 0) {
            const char *b = scalar(v);
            if (b == NULL || (strcmp(b, "true") != 0 && strcmp(b, "false") != 0))
                return perr(c, v, "'any_name' must be true or false");
            s->tls_any_name = strcmp(b, "true") == 0;
            st = FY_OK;
        } else {
            return perr(c, k, "unknown tls key '%s' (cert, key, ca, any_name)", key);
        }
        if (st != FY_OK)
            return st;
    }
    if (!s->tls_cert[0] || !s->tls_key[0])
        return perr(c, n, "'tls' needs both cert and key (every daemon serves TLS with them)");
    return FY_OK;
}

static fy_status_t parse_network(pctx_t *c, yaml_node_t *n, fy_cluster_spec_t *s)
{
    if (n->type != YAML_MAPPING_NODE)
        return perr(c, n, "'network' must be a mapping (subnet)");
    FOR_PAIRS(n, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "subnet") == 0) {
            fy_status_t st = get_str(c, v, key, s->subnet, sizeof(s->subnet));
            if (st != FY_OK)
                return st;
            char ip[32];
            unsigned char o[4];
            const char *slash = strchr(s->subnet, '/');
            if (slash == NULL || strcmp(slash, "/24") != 0 ||
                (size_t)(slash - s->subnet) >= sizeof(ip))
                return perr(c, v, "subnet '%s' must be A.B.C.0/24", s->subnet);
            memcpy(ip, s->subnet, (size_t)(slash - s->subnet));
            ip[slash - s->subnet] = '\0';
            if (!valid_ipv4(ip, o) || o[3] != 0)
                return perr(c, v, "subnet '%s' must be A.B.C.0/24", s->subnet);
        } else {
            return perr(c, k, "unknown network key '%s' (subnet)", key);
        }
    }
    return FY_OK;
}

static fy_status_t validate(pctx_t *c, fy_cluster_spec_t *s)
{
    for (int i = 0; i < s->n_hosts; i++) {
        fy_cluster_host_t *h = &s->hosts[i];
        for (int j = 0; j < i; j++) {
            if (strcmp(s->hosts[j].name, h->name) == 0) {
                snprintf(c->err, c->err_len, "%s:%d: host '%s' is already defined on line %d",
                         c->file, h->line, h->name, s->hosts[j].line);
                return FY_ERR_INVALID_ARG;
            }
        }
        /* local runs on loopback, slurm takes the nodes of the allocation, k8s pod IPs */
        if (h->address[0] == '\0' &&
            (s->backend == FY_CLUSTER_NETNS || s->backend == FY_CLUSTER_SSH)) {
            if (s->backend == FY_CLUSTER_NETNS) {
                /* netns: hosts get subnet addresses .10, .11, ... */
                unsigned char o[4];
                char ip[32];
                snprintf(ip, sizeof(ip), "%.*s", (int)(strchr(s->subnet, '/') - s->subnet),
                         s->subnet);
                valid_ipv4(ip, o);
                if (10 + i > 254) {
                    snprintf(c->err, c->err_len, "%s:%d: too many hosts for a /24", c->file,
                             h->line);
                    return FY_ERR_INVALID_ARG;
                }
                snprintf(h->address, sizeof(h->address), "%u.%u.%u.%d", o[0], o[1], o[2],
                         10 + i);
            } else {
                snprintf(c->err, c->err_len, "%s:%d: host '%s' needs an address for the %s "
                         "backend", c->file, h->line, h->name, fy_cluster_backend_name(s->backend));
                return FY_ERR_INVALID_ARG;
            }
        }
        if (s->backend == FY_CLUSTER_NETNS) {
            unsigned char o[4], so[4];
            char ip[32];
            snprintf(ip, sizeof(ip), "%.*s", (int)(strchr(s->subnet, '/') - s->subnet),
                     s->subnet);
            valid_ipv4(ip, so);
            if (!valid_ipv4(h->address, o) || o[0] != so[0] || o[1] != so[1] || o[2] != so[2] ||
                o[3] < 2 || o[3] > 254) {
                snprintf(c->err, c->err_len, "%s:%d: host '%s': address '%s' must be in %s "
                         "(.2 to .254; .1 is the bridge)", c->file, h->line, h->name, h->address,
                         s->subnet);
                return FY_ERR_INVALID_ARG;
            }
            for (int j = 0; j < i; j++) {
                if (strcmp(s->hosts[j].address, h->address) == 0) {
                    snprintf(c->err, c->err_len, "%s:%d: host '%s' has the address of '%s'",
                             c->file, h->line, h->name, s->hosts[j].name);
                    return FY_ERR_INVALID_ARG;
                }
            }
        }
    }
    /* default ports (off the local backend, where 0 means a free port at `up`): the role's
     * base port, moved up past any port another daemon on the same host uses */
    for (int i = 0; i < s->n_daemons; i++) {
        fy_cluster_daemon_t *d = &s->daemons[i];
        if (d->gpu >= 0 && d->gpu >= s->hosts[d->host].gpus) {
            snprintf(c->err, c->err_len, "%s:%d: %s asks for gpu %d but host '%s' has %d",
                     c->file, d->line, d->name, d->gpu, s->hosts[d->host].name,
                     s->hosts[d->host].gpus);
            return FY_ERR_INVALID_ARG;
        }
        if (s->backend == FY_CLUSTER_LOCAL)
            continue;
        for (int which = 0; which < 2; which++) {
            int *port = which == 0 ? &d->port : &d->kv_port;
            if (*port != 0 || (which == 1 && d->role != FY_CLUSTER_DECODE))
                continue;
            int base = which == 1 ? 50072
                       : d->role == FY_CLUSTER_ROUTER  ? 50051
                       : d->role == FY_CLUSTER_PREFILL ? 50061
                                                       : 50062;
            for (bool clash = true; clash; base++) {
                clash = false;
                for (int j = 0; j < s->n_daemons; j++) {
                    const fy_cluster_daemon_t *e = &s->daemons[j];
                    if (j != i && e->host == d->host &&
                        (e->port == base || e->kv_port == base || e->http_port == base))
                        clash = true;
                }
                if ((which == 1 && d->port == base) || d->http_port == base)
                    clash = true;
                if (!clash)
                    *port = base;
            }
        }
    }
    /* two daemons with the same port on one host: shift defaults, refuse explicit clashes */
    for (int i = 0; i < s->n_daemons; i++) {
        fy_cluster_daemon_t *d = &s->daemons[i];
        for (int j = 0; j < i; j++) {
            fy_cluster_daemon_t *e = &s->daemons[j];
            bool same = s->backend == FY_CLUSTER_LOCAL || e->host == d->host;
            if (!same)
                continue;
            int dp[3] = {d->port, d->kv_port, d->http_port};
            int ep[3] = {e->port, e->kv_port, e->http_port};
            for (int a = 0; a < 3; a++) {
                for (int b = 0; b < 3; b++) {
                    if (dp[a] != 0 && dp[a] == ep[b]) {
                        snprintf(c->err, c->err_len, "%s:%d: %s uses port %d, as %s (line %d) "
                                 "on the same host does", c->file, d->line, d->name, dp[a],
                                 e->name, e->line);
                        return FY_ERR_INVALID_ARG;
                    }
                }
            }
        }
    }
    return FY_OK;
}

static fy_status_t parse_root(pctx_t *c, yaml_node_t *root, fy_cluster_spec_t *s)
{
    if (root == NULL)
        return perr(c, NULL, "empty spec");
    if (root->type != YAML_MAPPING_NODE)
        return perr(c, root, "the spec must be a mapping (name, hosts, roles, ...)");
    yaml_node_t *roles = NULL, *hosts = NULL, *model = NULL;
    fy_status_t st = FY_OK;
    FOR_PAIRS(root, p)
    {
        yaml_node_t *k = node_at(c, p->key), *v = node_at(c, p->value);
        const char *key = scalar(k);
        if (key == NULL)
            return perr(c, k, "keys must be strings");
        if (strcmp(key, "name") == 0) {
            st = get_str(c, v, key, s->name, sizeof(s->name));
            if (st == FY_OK && (!valid_name(s->name) || strlen(s->name) > 16))
                return perr(c, v, "cluster name '%s': 1-16 lower-case letters, digits or '-'",
                            s->name);
        } else if (strcmp(key, "backend") == 0) {
            const char *val = scalar(v);
            if (val == NULL || fy_cluster_backend_parse(val, &s->backend) != FY_OK)
                return perr(c, v, "backend must be local, netns, ssh, slurm or k8s");
        } else if (strcmp(key, "model") == 0) {
            model = v;
            st = abs_path(c, v, key, s->model, sizeof(s->model));
        } else if (strcmp(key, "bin_dir") == 0) {
            st = abs_path(c, v, key, s->bin_dir, sizeof(s->bin_dir));
        } else if (strcmp(key, "log_dir") == 0) {
            st = abs_path(c, v, key, s->log_dir, sizeof(s->log_dir));
        } else if (strcmp(key, "api_key_file") == 0) {
            st = abs_path(c, v, key, s->api_key_file, sizeof(s->api_key_file));
        } else if (strcmp(key, "tls") == 0) {
            st = parse_tls(c, v, s);
        } else if (strcmp(key, "codec") == 0) {
            st = parse_codec(c, v, s);
        } else if (strcmp(key, "ucx") == 0) {
            st = parse_ucx(c, v, s);
        } else if (strcmp(key, "network") == 0) {
            st = parse_network(c, v, s);
        } else if (strcmp(key, "pair_link") == 0) {
            st = get_str(c, v, key, s->pair_link, sizeof(s->pair_link));
            if (st == FY_OK && strcmp(s->pair_link, "auto") != 0 &&
                strcmp(s->pair_link, "nccl") != 0 && strcmp(s->pair_link, "socket") != 0 &&
                strcmp(s->pair_link, "off") != 0)
                return perr(c, v, "bad pair_link '%s' (auto, nccl, socket, off)", s->pair_link);
        } else if (strcmp(key, "kv_memory") == 0) {
            st = get_str(c, v, key, s->kv_memory, sizeof(s->kv_memory));
            uint64_t b;
            if (st == FY_OK && fy_parse_size(s->kv_memory, &b) != FY_OK)
                return perr(c, v, "bad kv_memory '%s' (e.g. 256M, 2G)", s->kv_memory);
        } else if (strcmp(key, "threads") == 0) {
            st = get_int(c, v, key, 0, 1024, &s->threads);
        } else if (strcmp(key, "max_tokens") == 0) {
            st = get_int(c, v, key, 0, 1 << 20, &s->max_tokens);
        } else if (strcmp(key, "lease") == 0) {
            double ms;
            st = get_str(c, v, key, s->lease, sizeof(s->lease));
            if (st == FY_OK && parse_delay_ms(s->lease, &ms) != FY_OK)
                return perr(c, v, "bad lease '%s' (e.g. 1s, 500ms)", s->lease);
        } else if (strcmp(key, "reserve_lease") == 0) {
            uint64_t ms; /* the router's own duration syntax: it gets the text as is */
            st = get_str(c, v, key, s->reserve_lease, sizeof(s->reserve_lease));
            if (st == FY_OK && (fy_parse_duration_ms(s->reserve_lease, &ms) != FY_OK || ms == 0))
                return perr(c, v, "bad reserve_lease '%s' (e.g. 30s, 5m)", s->reserve_lease);
        } else if (strcmp(key, "kv_seal") == 0) {
            st = get_str(c, v, key, s->kv_seal, sizeof(s->kv_seal));
            if (st == FY_OK && strcmp(s->kv_seal, "on") != 0 && strcmp(s->kv_seal, "off") != 0 &&
                strcmp(s->kv_seal, "auto") != 0)
                return perr(c, v, "bad kv_seal '%s' (on, off, auto)", s->kv_seal);
        } else if (strcmp(key, "log_level") == 0) {
            st = get_str(c, v, key, s->log_level, sizeof(s->log_level));
            fy_log_level_t lv;
            if (st == FY_OK && fy_log_level_parse(s->log_level, &lv) != FY_OK)
                return perr(c, v, "bad log_level '%s' (trace, debug, info, warn, error)",
                            s->log_level);
        } else if (strcmp(key, "image") == 0) {
            st = get_str(c, v, key, s->image, sizeof(s->image));
        } else if (strcmp(key, "partition") == 0) {
            st = get_str(c, v, key, s->partition, sizeof(s->partition));
        } else if (strcmp(key, "hosts") == 0) {
            hosts = v;
        } else if (strcmp(key, "roles") == 0) {
            roles = v;
        } else {
            return perr(c, k,
                        "unknown key '%s' (name, backend, model, bin_dir, log_dir, "
                        "api_key_file, tls, codec, ucx, network, kv_memory, threads, max_tokens, "
                        "lease, reserve_lease, kv_seal, log_level, image, partition, hosts, "
                        "roles)",
                        key);
        }
        if (st != FY_OK)
            return st;
    }
    if (s->name[0] == '\0')
        return perr(c, root, "the spec needs a 'name'");
    if (model == NULL)
        return perr(c, root, "the spec needs a 'model' (GGUF path)");
    if (hosts == NULL)
        return perr(c, root, "the spec needs 'hosts'");
    if (roles == NULL)
        return perr(c, root, "the spec needs 'roles'");
    if (hosts->type != YAML_SEQUENCE_NODE || hosts->data.sequence.items.start ==
                                                 hosts->data.sequence.items.top)
        return perr(c, hosts, "'hosts' must be a non-empty list");
    for (yaml_node_item_t *it = hosts->data.sequence.items.start;
         it < hosts->data.sequence.items.top; it++) {
        if (s->n_hosts >= FY_CLUSTER_MAX_HOSTS)
            return perr(c, node_at(c, *it), "too many hosts (at most %d)", FY_CLUSTER_MAX_HOSTS);
        fy_cluster_host_t *h = &s->hosts[s->n_hosts];
        st = parse_host(c, node_at(c, *it), h);
        if (st != FY_OK)
            return st;
        for (int j = 0; j < s->n_hosts; j++) {
            if (strcmp(s->hosts[j].name, h->name) == 0)
                return perr(c, node_at(c, *it), "host '%s' is already defined on line %d",
                            h->name, s->hosts[j].line);
        }
        s->n_hosts++;
    }
    st = parse_roles(c, roles, s);
    if (st != FY_OK)
        return st;
    if (c->backend_override >= 0)
        s->backend = (fy_cluster_backend_t)c->backend_override;
    return validate(c, s);
}

static void spec_defaults(fy_cluster_spec_t *s)
{
    memset(s, 0, sizeof(*s));
    s->backend = FY_CLUSTER_LOCAL;
    snprintf(s->subnet, sizeof(s->subnet), "10.77.0.0/24");
    s->budget_min = 0.125;
    s->budget_max = 1.0;
    snprintf(s->image, sizeof(s->image), "ferry:latest");
    snprintf(s->log_level, sizeof(s->log_level), "info");
}

fy_status_t fy_cluster_spec_parse(const char *text, size_t len, const char *file,
                                  const char *base_dir, int backend, fy_cluster_spec_t *spec,
                                  char *err, size_t err_len)
{
    if (text == NULL || spec == NULL || err == NULL || err_len == 0)
        return FY_ERR_INVALID_ARG;
    err[0] = '\0';
    spec_defaults(spec);
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser))
        return FY_ERR_NO_MEMORY;
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        snprintf(err, err_len, "%s:%lu: YAML error: %s%s%s", file ? file : "spec",
                 (unsigned long)parser.problem_mark.line + 1,
                 parser.problem ? parser.problem : "unknown", parser.context ? " " : "",
                 parser.context ? parser.context : "");
        yaml_parser_delete(&parser);
        return FY_ERR_FORMAT;
    }
    pctx_t c = {&doc, file ? file : "spec", err, err_len, base_dir, backend};
    fy_status_t st = parse_root(&c, yaml_document_get_root_node(&doc), spec);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (st != FY_OK)
        return st;
    if (spec->log_dir[0] == '\0') {
        const char *tmp = getenv("TMPDIR");
        snprintf(spec->log_dir, sizeof(spec->log_dir), "%s/ferry-cluster-%s",
                 tmp && tmp[0] == '/' ? tmp : "/tmp", spec->name);
    }
    return FY_OK;
}

fy_status_t fy_cluster_spec_load(const char *path, int backend, fy_cluster_spec_t *spec,
                                 char *err, size_t err_len)
{
    if (path == NULL || spec == NULL || err == NULL || err_len == 0)
        return FY_ERR_INVALID_ARG;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, err_len, "%s: %s", path, strerror(errno));
        return fy_status_from_errno(errno);
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 > cap) {
            cap = cap ? cap * 2 : 8192;
            if (cap > (1u << 24)) {
                free(buf);
                fclose(f);
                snprintf(err, err_len, "%s: larger than 16 MiB", path);
                return FY_ERR_OUT_OF_RANGE;
            }
            char *nb = realloc(buf, cap);
            if (nb == NULL) {
                free(buf);
                fclose(f);
                return FY_ERR_NO_MEMORY;
            }
            buf = nb;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
    }
    fclose(f);
    fy_status_t st = fy_cluster_spec_parse(buf, len, path, NULL, backend, spec, err, err_len);
    free(buf);
    return st;
}

/* ---- addresses and command lines ---- */

const char *fy_cluster_daemon_host_addr(const fy_cluster_spec_t *spec, int i)
{
    if (spec->backend == FY_CLUSTER_LOCAL)
        return "127.0.0.1";
    return spec->hosts[spec->daemons[i].host].address;
}

int fy_cluster_router_index(const fy_cluster_spec_t *spec)
{
    for (int i = 0; i < spec->n_daemons; i++) {
        if (spec->daemons[i].role == FY_CLUSTER_ROUTER)
            return i;
    }
    return -1;
}

void fy_cluster_router_addr(const fy_cluster_spec_t *spec, char *out, size_t out_len)
{
    int r = fy_cluster_router_index(spec);
    if (r < 0) {
        snprintf(out, out_len, "?");
        return;
    }
    if (spec->backend == FY_CLUSTER_K8S)
        snprintf(out, out_len, "%s-router:%d", spec->name, spec->daemons[r].port);
    else
        snprintf(out, out_len, "%s:%d", fy_cluster_daemon_host_addr(spec, r),
                 spec->daemons[r].port);
}

void fy_cluster_cmd_free(fy_cluster_cmd_t *cmd)
{
    for (int i = 0; i < cmd->argc; i++)
        free(cmd->argv[i]);
    for (int i = 0; i < cmd->n_env; i++)
        free(cmd->env[i]);
    memset(cmd, 0, sizeof(*cmd));
}

fy_status_t fy_cluster_cmd_add(fy_cluster_cmd_t *cmd, const char *word)
{
    if (cmd->argc >= FY_CLUSTER_ARGV_MAX)
        return FY_ERR_OUT_OF_RANGE;
    char *w = strdup(word);
    if (w == NULL)
        return FY_ERR_NO_MEMORY;
    cmd->argv[cmd->argc++] = w;
    cmd->argv[cmd->argc] = NULL;
    return FY_OK;
}

static fy_status_t cmd_addf(fy_cluster_cmd_t *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static fy_status_t cmd_addf(fy_cluster_cmd_t *cmd, const char *fmt, ...)
{
    char buf[FY_CLUSTER_PATH_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return FY_ERR_OUT_OF_RANGE;
    return fy_cluster_cmd_add(cmd, buf);
}

static fy_status_t cmd_env(fy_cluster_cmd_t *cmd, const char *name, const char *value)
{
    if (cmd->n_env >= 8)
        return FY_ERR_OUT_OF_RANGE;
    char *e;
    if (asprintf(&e, "%s=%s", name, value) < 0)
        return FY_ERR_NO_MEMORY;
    cmd->env[cmd->n_env++] = e;
    cmd->env[cmd->n_env] = NULL;
    return FY_OK;
}

/* bin_dir may be a build tree (router/ferry-router) or a bundle's bin/ (ferry-router). */
static void binary_path(const char *bin_dir, const char *role, char *out, size_t out_len)
{
    snprintf(out, out_len, "%s/%s/ferry-%s", bin_dir, role, role);
    if (access(out, X_OK) == 0)
        return;
    snprintf(out, out_len, "%s/ferry-%s", bin_dir, role);
}

fy_status_t fy_cluster_daemon_cmd(const fy_cluster_spec_t *spec, int i, const char *bin_dir,
                                  fy_cluster_cmd_t *cmd)
{
    if (spec == NULL || cmd == NULL || i < 0 || i >= spec->n_daemons)
        return FY_ERR_INVALID_ARG;
    memset(cmd, 0, sizeof(*cmd));
    const fy_cluster_daemon_t *d = &spec->daemons[i];
    const char *role = fy_cluster_role_name(d->role);
    const char *host = fy_cluster_daemon_host_addr(spec, i);
    const char *bind = spec->backend == FY_CLUSTER_K8S ? "0.0.0.0" : host;
    char bin[FY_CLUSTER_PATH_MAX + 64], router[128];
    if (bin_dir == NULL)
        bin_dir = spec->bin_dir[0] ? spec->bin_dir : ".";
    binary_path(bin_dir, role, bin, sizeof(bin));
    fy_cluster_router_addr(spec, router, sizeof(router));
    fy_status_t st = fy_cluster_cmd_add(cmd, bin);
    st = st ? st : fy_cluster_cmd_add(cmd, "--model");
    st = st ? st : fy_cluster_cmd_add(cmd, spec->model);
    st = st ? st : cmd_addf(cmd, "--listen=%s:%d", bind, d->port);
    st = st ? st : cmd_addf(cmd, "--log-level=%s", spec->log_level);
    if (spec->api_key_file[0]) // every daemon: the router requires it, the workers send it
        st = st ? st : cmd_addf(cmd, "--api-key-file=%s", spec->api_key_file);
    if (spec->tls_cert[0]) { // every daemon serves TLS and dials the others with it
        st = st ? st : cmd_addf(cmd, "--tls-cert=%s", spec->tls_cert);
        st = st ? st : cmd_addf(cmd, "--tls-key=%s", spec->tls_key);
        if (spec->tls_ca[0])
            st = st ? st : cmd_addf(cmd, "--tls-ca=%s", spec->tls_ca);
        if (spec->tls_any_name)
            st = st ? st : fy_cluster_cmd_add(cmd, "--tls-any-name");
    }
    int threads = d->threads ? d->threads : spec->threads;
    if (d->role == FY_CLUSTER_ROUTER) {
        if (spec->max_tokens > 0)
            st = st ? st : cmd_addf(cmd, "--max-tokens=%d", spec->max_tokens);
        if (spec->lease[0])
            st = st ? st : cmd_addf(cmd, "--lease=%s", spec->lease);
        if (spec->reserve_lease[0])
            st = st ? st : cmd_addf(cmd, "--reserve-lease=%s", spec->reserve_lease);
        if (spec->kv_seal[0])
            st = st ? st : cmd_addf(cmd, "--kv-seal=%s", spec->kv_seal);
        if (d->http_port > 0)
            st = st ? st : cmd_addf(cmd, "--http-listen=%s:%d", bind, d->http_port);
    } else {
        st = st ? st : cmd_addf(cmd, "--router=%s", router);
        if (threads > 0)
            st = st ? st : cmd_addf(cmd, "--threads=%d", threads);
        if (spec->ucx_tls[0])
            st = st ? st : cmd_addf(cmd, "--ucx-tls=%s", spec->ucx_tls);
        if (spec->ucx_devices[0])
            st = st ? st : cmd_addf(cmd, "--ucx-devices=%s", spec->ucx_devices);
        if (spec->pair_link[0])
            st = st ? st : cmd_addf(cmd, "--pair-link=%s", spec->pair_link);
        st = st ? st : cmd_addf(cmd, "--worker-id=%s", d->name);
    }
    /* Kubernetes expands $(POD_IP) in container args (the pod's address, from the downward
     * API): what workers tell the router */
    if (spec->backend == FY_CLUSTER_K8S && d->role == FY_CLUSTER_PREFILL)
        st = st ? st : cmd_addf(cmd, "--advertise=$(POD_IP):%d", d->port);
    if (d->role == FY_CLUSTER_PREFILL) {
        if (spec->policy[0])
            st = st ? st : cmd_addf(cmd, "--policy=%s", spec->policy);
        if (spec->budget > 0)
            st = st ? st : cmd_addf(cmd, "--budget=%g", spec->budget);
        if (spec->ttft_target_ms > 0) {
            st = st ? st : cmd_addf(cmd, "--ttft-target=%.0fms", spec->ttft_target_ms);
            st = st ? st : cmd_addf(cmd, "--min-budget=%g", spec->budget_min);
            st = st ? st : cmd_addf(cmd, "--max-budget=%g", spec->budget_max);
        }
    } else if (d->role == FY_CLUSTER_DECODE) {
        if (spec->backend == FY_CLUSTER_K8S) {
            st = st ? st : cmd_addf(cmd, "--kv-listen=0.0.0.0:%d", d->kv_port);
            st = st ? st : cmd_addf(cmd, "--advertise-host=$(POD_IP)");
        } else {
            st = st ? st : cmd_addf(cmd, "--kv-listen=%s:%d", host, d->kv_port);
        }
        const char *kvm = d->kv_memory[0] ? d->kv_memory : spec->kv_memory;
        if (kvm[0])
            st = st ? st : cmd_addf(cmd, "--kv-memory=%s", kvm);
    }
    if (d->gpu >= 0) {
        // The daemon sees that one GPU (as device 0) and runs its model there.
        char g[16];
        snprintf(g, sizeof(g), "%d", d->gpu);
        st = st ? st : cmd_addf(cmd, "--device=cuda");
        st = st ? st : cmd_env(cmd, "CUDA_VISIBLE_DEVICES", g);
    }
    if (spec->ucx_tls[0])
        st = st ? st : cmd_env(cmd, "UCX_TLS", spec->ucx_tls);
    if (st != FY_OK)
        fy_cluster_cmd_free(cmd);
    return st;
}

/* single-quote a word for sh unless it is plainly safe */
static bool shell_safe(const char *w)
{
    if (*w == '\0')
        return false;
    for (const char *p = w; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              strchr("-_./:=,@+%", *p) != NULL))
            return false;
    }
    return true;
}

static fy_status_t append(char *out, size_t out_len, size_t *pos, const char *s)
{
    size_t n = strlen(s);
    if (*pos + n + 1 > out_len)
        return FY_ERR_OUT_OF_RANGE;
    memcpy(out + *pos, s, n + 1);
    *pos += n;
    return FY_OK;
}

static fy_status_t append_quoted(char *out, size_t out_len, size_t *pos, const char *w)
{
    if (shell_safe(w))
        return append(out, out_len, pos, w);
    fy_status_t st = append(out, out_len, pos, "'");
    for (const char *p = w; st == FY_OK && *p; p++) {
        char ch[2] = {*p, 0};
        st = append(out, out_len, pos, *p == '\'' ? "'\\''" : ch);
    }
    return st ? st : append(out, out_len, pos, "'");
}

fy_status_t fy_cluster_cmd_shell(const fy_cluster_cmd_t *cmd, char *out, size_t out_len)
{
    if (cmd == NULL || out == NULL || out_len == 0)
        return FY_ERR_INVALID_ARG;
    size_t pos = 0;
    out[0] = '\0';
    fy_status_t st = FY_OK;
    for (int i = 0; st == FY_OK && i < cmd->n_env; i++) {
        st = append_quoted(out, out_len, &pos, cmd->env[i]);
        st = st ? st : append(out, out_len, &pos, " ");
    }
    for (int i = 0; st == FY_OK && i < cmd->argc; i++) {
        if (i > 0)
            st = append(out, out_len, &pos, " ");
        st = st ? st : append_quoted(out, out_len, &pos, cmd->argv[i]);
    }
    return st;
}
