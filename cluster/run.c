/*
 * run.c: `up`, `down`, `status` and `logs` for the backends that run on this machine (local and
 * netns): daemons started detached (own session, log file, pid file), the state file that lets
 * `down` clean up after a crash, health waits, and the /metrics scrape behind `status`.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "cluster.h"

#define MOD "cluster"

void fy_cluster_run_opts_default(fy_cluster_run_opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->timeout_ms = 120000;
    o->drain_timeout_ms = 30000;
}

/* ---- state file: one `key value...` line per entry ---- */

static void state_path(const char *log_dir, char *out, size_t out_len)
{
    snprintf(out, out_len, "%s/cluster.state", log_dir);
}

fy_status_t fy_cluster_state_write(const char *log_dir, const fy_cluster_state_t *st)
{
    char path[FY_CLUSTER_PATH_MAX + 32], tmp[FY_CLUSTER_PATH_MAX + 40];
    state_path(log_dir, path, sizeof(path));
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return fy_status_from_errno(errno);
    fprintf(f, "backend %s\n", st->backend);
    if (st->bridge[0])
        fprintf(f, "bridge %s\n", st->bridge);
    for (int i = 0; i < st->n_netns; i++)
        fprintf(f, "netns %s\n", st->netns[i]);
    for (int i = 0; i < st->n_links; i++)
        fprintf(f, "link %s\n", st->links[i]);
    for (int i = 0; i < st->n_daemons; i++)
        fprintf(f, "daemon %s %d %s %s\n", st->daemons[i].name, st->daemons[i].pid,
                st->daemons[i].addr[0] ? st->daemons[i].addr : "-",
                st->daemons[i].kv_addr[0] ? st->daemons[i].kv_addr : "-");
    bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0)
        return FY_ERR_IO;
    return FY_OK;
}

fy_status_t fy_cluster_state_read(const char *log_dir, fy_cluster_state_t *st)
{
    char path[FY_CLUSTER_PATH_MAX + 32], line[512];
    state_path(log_dir, path, sizeof(path));
    memset(st, 0, sizeof(*st));
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return errno == ENOENT ? FY_ERR_NOT_FOUND : fy_status_from_errno(errno);
    fy_status_t rc = FY_OK;
    while (fgets(line, sizeof(line), f) != NULL) {
        char d[80];
        if (sscanf(line, "backend %15s", st->backend) == 1)
            continue;
        if (sscanf(line, "bridge %15s", st->bridge) == 1)
            continue;
        if (strncmp(line, "netns ", 6) == 0 && st->n_netns < FY_CLUSTER_MAX_HOSTS &&
            sscanf(line, "netns %31s", st->netns[st->n_netns]) == 1) {
            st->n_netns++;
            continue;
        }
        if (strncmp(line, "link ", 5) == 0 && st->n_links < FY_CLUSTER_MAX_HOSTS &&
            sscanf(line, "link %15s", st->links[st->n_links]) == 1) {
            st->n_links++;
            continue;
        }
        if (strncmp(line, "daemon ", 7) == 0 && st->n_daemons < FY_CLUSTER_MAX_DAEMONS) {
            fy_cluster_state_daemon_t *x = &st->daemons[st->n_daemons];
            if (sscanf(line, "daemon %31s %d %79s %79s", x->name, &x->pid, x->addr, d) == 4) {
                if (strcmp(x->addr, "-") == 0)
                    x->addr[0] = '\0';
                memcpy(x->kv_addr, d, strlen(d) + 1);
                if (strcmp(x->kv_addr, "-") == 0)
                    x->kv_addr[0] = '\0';
                st->n_daemons++;
                continue;
            }
        }
        rc = FY_ERR_FORMAT;
    }
    fclose(f);
    return rc;
}

/* ---- commands ---- */

/* The environment of a child: ours with the command's NAME=VALUE entries (and `extra`, one
 * more or NULL) in place of ours of the same name. Built before fork, so the child only
 * execs (no malloc between fork and exec in a process that may have threads). The strings
 * are borrowed; free the array. */
static char **child_env(const fy_cluster_cmd_t *cmd, const char *extra)
{
    extern char **environ;
    size_t n = 0;
    while (environ[n] != NULL)
        n++;
    char **env = calloc(n + (size_t)cmd->n_env + 2, sizeof(char *));
    if (env == NULL)
        return NULL;
    size_t k = 0;
    const char *adds[16];
    int n_adds = 0;
    for (int i = 0; i < cmd->n_env && n_adds < 15; i++)
        adds[n_adds++] = cmd->env[i];
    if (extra != NULL)
        adds[n_adds++] = extra;
    for (size_t i = 0; i < n; i++) {
        bool replaced = false;
        for (int a = 0; a < n_adds && !replaced; a++) {
            size_t l = strcspn(adds[a], "=");
            replaced = strncmp(environ[i], adds[a], l) == 0 && environ[i][l] == '=';
        }
        if (!replaced)
            env[k++] = environ[i];
    }
    for (int a = 0; a < n_adds; a++)
        env[k++] = (char *)adds[a];
    env[k] = NULL;
    return env;
}

int fy_cluster_run_cmd(const fy_cluster_cmd_t *cmd, int log_fd)
{
    if (cmd == NULL || cmd->argc == 0)
        return -1;
    if (log_fd >= 0) {
        char line[2048];
        if (fy_cluster_cmd_shell(cmd, line, sizeof(line)) == FY_OK)
            dprintf(log_fd, "+ %s\n", line);
    }
    char **env = child_env(cmd, NULL);
    if (env == NULL)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        free(env);
        return -1;
    }
    if (pid == 0) {
        int fd = log_fd >= 0 ? log_fd : open("/dev/null", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execvpe(cmd->argv[0], cmd->argv, env);
        _exit(127);
    }
    free(env);
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR)
            return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- processes ---- */

/* Whether pid is alive and still the daemon we started (its argv[0] ends in ferry-ROLE). */
static bool daemon_alive(int pid, const char *name)
{
    if (pid <= 0)
        return false;
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid)
        return false; /* our own child, now reaped */
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')');
    if (rp == NULL || rp[1] != ' ' || rp[2] == 'Z' || rp[2] == 'X')
        return false;
    snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
    f = fopen(path, "r");
    if (f == NULL)
        return false;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    if (n == 0)
        return true; /* exiting: its memory is gone but it is not a zombie yet */
    char want[48];
    const char *dash = strchr(name, '-');
    snprintf(want, sizeof(want), "ferry-%.*s", dash ? (int)(dash - name) : (int)strlen(name),
             name);
    size_t wl = strlen(want), bl = strlen(buf);
    return bl >= wl && strcmp(buf + bl - wl, want) == 0;
}

static fy_status_t spawn_daemon(const fy_cluster_spec_t *spec, const fy_cluster_cmd_t *cmd,
                                const char *netns, const char *log_path, int *pid_p)
{
    int log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0)
        return fy_status_from_errno(errno);
    int ns_fd = -1;
    if (netns != NULL) {
        char p[128];
        snprintf(p, sizeof(p), "/run/netns/%s", netns);
        ns_fd = open(p, O_RDONLY | O_CLOEXEC);
        if (ns_fd < 0) {
            int e = errno;
            close(log_fd);
            return fy_status_from_errno(e);
        }
    }
    char **env = child_env(cmd, netns != NULL && spec->ucx_devices[0] == '\0'
                                    ? "UCX_NET_DEVICES=eth0" /* not lo: peers are elsewhere */
                                    : NULL);
    /* a close-on-exec pipe: EOF once exec succeeded, an errno if it failed */
    int sync[2];
    if (env == NULL || pipe2(sync, O_CLOEXEC) != 0) {
        free(env);
        int e = errno;
        close(log_fd);
        if (ns_fd >= 0)
            close(ns_fd);
        return fy_status_from_errno(e);
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        free(env);
        close(log_fd);
        close(sync[0]);
        close(sync[1]);
        if (ns_fd >= 0)
            close(ns_fd);
        return fy_status_from_errno(e);
    }
    if (pid == 0) {
        close(sync[0]);
        setsid();
        if (ns_fd >= 0 && setns(ns_fd, CLONE_NEWNET) != 0) {
            dprintf(log_fd, "cluster: setns into %s failed: errno %d\n", netns, errno);
            _exit(126);
        }
        int null_fd = open("/dev/null", O_RDONLY);
        if (null_fd >= 0)
            dup2(null_fd, 0);
        dup2(log_fd, 1);
        dup2(log_fd, 2);
        /* a clean signal state: the launcher may block or ignore some */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        execve(cmd->argv[0], cmd->argv, env);
        int e = errno;
        dprintf(log_fd, "cluster: exec failed: errno %d\n", e);
        if (write(sync[1], &e, sizeof(e)) < 0)
            _exit(127);
        _exit(127);
    }
    free(env);
    close(sync[1]);
    close(log_fd);
    if (ns_fd >= 0)
        close(ns_fd);
    int child_err = 0;
    ssize_t r;
    do {
        r = read(sync[0], &child_err, sizeof(child_err));
    } while (r < 0 && errno == EINTR);
    close(sync[0]);
    if (r > 0) {
        waitpid(pid, NULL, 0);
        return fy_status_from_errno(child_err);
    }
    *pid_p = pid;
    return FY_OK;
}

static fy_status_t free_port(int *port_p)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fy_status_from_errno(errno);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &l) != 0) {
        int e = errno;
        close(fd);
        return fy_status_from_errno(e);
    }
    *port_p = ntohs(a.sin_port);
    close(fd);
    return FY_OK;
}

static fy_status_t split_addr(const char *addr, char *host, size_t host_len, int *port)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || (size_t)(colon - addr) >= host_len)
        return FY_ERR_INVALID_ARG;
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end != '\0' || p <= 0 || p > 65535)
        return FY_ERR_INVALID_ARG;
    *port = (int)p;
    return FY_OK;
}

static int connect_timeout(const char *addr, uint64_t timeout_ms)
{
    char host[64];
    int port;
    if (split_addr(addr, host, sizeof(host), &port) != FY_OK)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
        return -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int err = 0;
    socklen_t el = sizeof(err);
    if (poll(&p, 1, (int)timeout_ms) != 1 ||
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

const char *fy_cluster_tls_ca(const fy_cluster_spec_t *spec)
{
    if (spec == NULL || !spec->tls_cert[0])
        return NULL;
    return spec->tls_ca[0] ? spec->tls_ca : spec->tls_cert;
}

/* A TLS session on fd for a GET, verified as the daemons verify each other (OpenSSL on the
 * socket itself: this is a blocking one-off request). NULL, with the reason logged, on
 * failure. */
static SSL *tls_connect(const fy_cluster_spec_t *spec, int fd, const char *addr,
                        uint64_t timeout_ms, SSL_CTX **ctx_p)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = NULL;
    if (ctx == NULL || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_load_verify_locations(ctx, fy_cluster_tls_ca(spec), NULL) != 1)
        goto fail;
    X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(ctx), X509_V_FLAG_PARTIAL_CHAIN);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    static const unsigned char k_h1[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    if (SSL_CTX_set_alpn_protos(ctx, k_h1, sizeof(k_h1)) != 0 || (ssl = SSL_new(ctx)) == NULL ||
        SSL_set_fd(ssl, fd) != 1)
        goto fail;
    // The certificate must name the address dialled (connect_timeout dials IPv4 literals).
    char host[64];
    int port;
    if (!spec->tls_any_name && (split_addr(addr, host, sizeof(host), &port) != FY_OK ||
                                X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) != 1))
        goto fail;
    /* blocking from here, each read and write bounded by the request's timeout */
    struct timeval tv = {.tv_sec = (time_t)(timeout_ms / 1000),
                         .tv_usec = (suseconds_t)(timeout_ms % 1000 * 1000)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (SSL_connect(ssl) != 1) {
        long v = SSL_get_verify_result(ssl);
        FY_LOG_DEBUG("cluster", "%s: TLS: %s", addr,
                     v != X509_V_OK ? X509_verify_cert_error_string(v) : "handshake failed");
        goto fail;
    }
    *ctx_p = ctx;
    return ssl;
fail:
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}

fy_status_t fy_cluster_http_get(const fy_cluster_spec_t *spec, const char *addr, const char *path,
                                uint64_t timeout_ms, char *buf, size_t buf_len)
{
    if (addr == NULL || path == NULL || buf == NULL || buf_len < 2)
        return FY_ERR_INVALID_ARG;
    buf[0] = '\0';
    int fd = connect_timeout(addr, timeout_ms);
    if (fd < 0)
        return FY_ERR_UNAVAILABLE;
    SSL_CTX *ctx = NULL;
    SSL *ssl = NULL;
    if (fy_cluster_tls_ca(spec) != NULL) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0 ||
            (ssl = tls_connect(spec, fd, addr, timeout_ms, &ctx)) == NULL) {
            close(fd);
            return FY_ERR_UNAVAILABLE;
        }
    }
    char req[256];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, addr);
    fy_status_t st = FY_OK;
    if (n < 0 || (size_t)n >= sizeof(req) ||
        (ssl ? SSL_write(ssl, req, n) : send(fd, req, (size_t)n, MSG_NOSIGNAL)) != n)
        st = FY_ERR_UNAVAILABLE;
    size_t len = 0;
    uint64_t deadline = fy_clock_ns() + timeout_ms * 1000000ull;
    while (st == FY_OK) {
        uint64_t now = fy_clock_ns();
        if (now >= deadline) {
            st = FY_ERR_TIMEOUT;
            break;
        }
        if (len + 1 >= buf_len)
            break;
        if (ssl == NULL || SSL_pending(ssl) == 0) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, (int)((deadline - now) / 1000000 + 1)) <= 0)
                continue;
        }
        ssize_t r = ssl ? SSL_read(ssl, buf + len, (int)(buf_len - 1 - len))
                        : recv(fd, buf + len, buf_len - 1 - len, 0);
        if (r < 0 && ssl == NULL && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    close(fd);
    if (st != FY_OK)
        return st;
    buf[len] = '\0';
    char *body = strstr(buf, "\r\n\r\n");
    if (strncmp(buf, "HTTP/1.", 7) != 0 || body == NULL)
        return FY_ERR_PROTOCOL;
    int code = atoi(buf + 9);
    body += 4;
    memmove(buf, body, strlen(body) + 1);
    return code == 200 ? FY_OK : FY_ERR_UNAVAILABLE;
}

double fy_cluster_metric(const char *body, const char *metric, const char *labels)
{
    size_t ml = strlen(metric);
    for (const char *p = body; p != NULL && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (*p == '#' || strncmp(p, metric, ml) != 0)
            continue;
        const char *q = p + ml;
        if (labels != NULL && labels[0] != '\0') {
            size_t ll = strlen(labels);
            if (*q != '{' || strncmp(q + 1, labels, ll) != 0 || q[1 + ll] != '}')
                continue;
            q += ll + 2;
        } else if (*q == '{') {
            continue;
        }
        if (*q != ' ')
            continue;
        return strtod(q + 1, NULL);
    }
    return NAN;
}

/* ---- up / down ---- */

static void log_path(const fy_cluster_spec_t *spec, const char *name, const char *ext, char *out,
                     size_t out_len)
{
    snprintf(out, out_len, "%s/%s.%s", spec->log_dir, name, ext);
}

static void tail_file(const char *path, int lines, char *out, size_t out_len)
{
    out[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    static char buf[65536];
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    long from = size > (long)sizeof(buf) - 1 ? size - (long)sizeof(buf) + 1 : 0;
    fseek(f, from, SEEK_SET);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = buf + n;
    int seen = 0;
    while (p > buf && seen <= lines) {
        p--;
        if (*p == '\n' && p + 1 < buf + n)
            seen++;
    }
    if (seen > lines)
        p++;
    snprintf(out, out_len, "%s", p);
}

static fy_status_t mkdir_p(const char *dir)
{
    char tmp[FY_CLUSTER_PATH_MAX];
    snprintf(tmp, sizeof(tmp), "%s", dir);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return fy_status_from_errno(errno);
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
        return fy_status_from_errno(errno);
    return FY_OK;
}

static bool any_alive(const fy_cluster_state_t *st)
{
    for (int i = 0; i < st->n_daemons; i++) {
        if (daemon_alive(st->daemons[i].pid, st->daemons[i].name))
            return true;
    }
    return false;
}

/* SIGTERM the daemons whose name starts with `prefix` (NULL: all), wait, then SIGKILL. */
static void stop_group(const fy_cluster_state_t *st, const char *prefix, uint64_t wait_ms,
                       bool quiet)
{
    size_t pl = prefix ? strlen(prefix) : 0;
    for (int i = 0; i < st->n_daemons; i++) {
        const fy_cluster_state_daemon_t *d = &st->daemons[i];
        if ((prefix == NULL || strncmp(d->name, prefix, pl) == 0) &&
            daemon_alive(d->pid, d->name))
            kill(d->pid, SIGTERM);
    }
    uint64_t deadline = fy_clock_ns() + wait_ms * 1000000ull;
    for (;;) {
        bool left = false;
        for (int i = 0; i < st->n_daemons; i++) {
            const fy_cluster_state_daemon_t *d = &st->daemons[i];
            if ((prefix == NULL || strncmp(d->name, prefix, pl) == 0) &&
                daemon_alive(d->pid, d->name))
                left = true;
        }
        if (!left)
            return;
        if (fy_clock_ns() >= deadline)
            break;
        fy_sleep_ns(50 * 1000000ull);
    }
    for (int i = 0; i < st->n_daemons; i++) {
        const fy_cluster_state_daemon_t *d = &st->daemons[i];
        if ((prefix == NULL || strncmp(d->name, prefix, pl) == 0) &&
            daemon_alive(d->pid, d->name)) {
            if (!quiet)
                fprintf(stderr, "cluster: %s (pid %d) did not drain in time; SIGKILL\n",
                        d->name, d->pid);
            kill(d->pid, SIGKILL);
            for (int k = 0; k < 100 && daemon_alive(d->pid, d->name); k++)
                fy_sleep_ns(20 * 1000000ull);
        }
    }
}

fy_status_t fy_cluster_netns_teardown(const fy_cluster_state_t *st, int log_fd);

static fy_status_t teardown_state(const fy_cluster_spec_t *spec, fy_cluster_state_t *st,
                                  const fy_cluster_run_opts_t *opts)
{
    /* the router first (no new requests), then the workers finish what they hold */
    stop_group(st, "router", opts->drain_timeout_ms, opts->quiet);
    stop_group(st, NULL, opts->drain_timeout_ms, opts->quiet);
    fy_status_t rc = FY_OK;
    if (st->n_netns > 0 || st->bridge[0] || st->n_links > 0) {
        char p[FY_CLUSTER_PATH_MAX + 32];
        log_path(spec, "network", "log", p, sizeof(p));
        int fd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        rc = fy_cluster_netns_teardown(st, fd);
        if (fd >= 0)
            close(fd);
    }
    for (int i = 0; i < st->n_daemons; i++) {
        char p[FY_CLUSTER_PATH_MAX + 64];
        log_path(spec, st->daemons[i].name, "pid", p, sizeof(p));
        unlink(p);
    }
    char sp[FY_CLUSTER_PATH_MAX + 32];
    state_path(spec->log_dir, sp, sizeof(sp));
    if (rc == FY_OK)
        unlink(sp);
    return rc;
}

fy_status_t fy_cluster_down(const fy_cluster_spec_t *spec, const fy_cluster_run_opts_t *opts,
                            char *err, size_t err_len)
{
    fy_cluster_run_opts_t def;
    if (opts == NULL) {
        fy_cluster_run_opts_default(&def);
        opts = &def;
    }
    fy_cluster_state_t *st = malloc(sizeof(*st));
    if (st == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t rc = fy_cluster_state_read(spec->log_dir, st);
    if (rc == FY_ERR_NOT_FOUND) {
        snprintf(err, err_len, "no cluster state in %s (not up, or already down)",
                 spec->log_dir);
        free(st);
        return rc;
    }
    if (rc != FY_OK) {
        snprintf(err, err_len, "%s/cluster.state: unreadable (%s)", spec->log_dir,
                 fy_status_str(rc));
        free(st);
        return rc;
    }
    if ((st->n_netns > 0 || st->bridge[0]) && geteuid() != 0) {
        snprintf(err, err_len, "this cluster runs in network namespaces: `down` needs root");
        free(st);
        return FY_ERR_UNSUPPORTED;
    }
    rc = teardown_state(spec, st, opts);
    if (rc != FY_OK)
        snprintf(err, err_len, "some network objects could not be removed (see %s/network.log)",
                 spec->log_dir);
    free(st);
    return rc;
}

static bool worker_count_ok(const fy_cluster_spec_t *spec, const char *router, int want_prefill,
                            int want_decode)
{
    static char body[65536];
    if (fy_cluster_http_get(spec, router, "/metrics", 2000, body, sizeof(body)) != FY_OK)
        return false;
    double p = fy_cluster_metric(body, "ferry_router_workers", "role=\"prefill\"");
    double d = fy_cluster_metric(body, "ferry_router_workers", "role=\"decode\"");
    return p == want_prefill && d == want_decode;
}

fy_status_t fy_cluster_netns_setup(const fy_cluster_spec_t *spec, fy_cluster_state_t *st,
                                   int log_fd, char *err, size_t err_len);

fy_status_t fy_cluster_up(fy_cluster_spec_t *spec, const fy_cluster_run_opts_t *opts, char *err,
                          size_t err_len)
{
    if (spec == NULL || err == NULL || err_len == 0)
        return FY_ERR_INVALID_ARG;
    err[0] = '\0';
    fy_cluster_run_opts_t def;
    if (opts == NULL) {
        fy_cluster_run_opts_default(&def);
        opts = &def;
    }
    if (spec->backend != FY_CLUSTER_LOCAL && spec->backend != FY_CLUSTER_NETNS) {
        snprintf(err, err_len, "`up` runs the local and netns backends here; for %s use "
                 "`ferry cluster gen %s`", fy_cluster_backend_name(spec->backend),
                 fy_cluster_backend_name(spec->backend));
        return FY_ERR_UNSUPPORTED;
    }
    if (spec->backend == FY_CLUSTER_NETNS && geteuid() != 0) {
        snprintf(err, err_len, "the netns backend needs root (it creates network namespaces, "
                 "veth links, a bridge and tc qdiscs); run it as root or use backend local");
        return FY_ERR_UNSUPPORTED;
    }
    if (access(spec->model, R_OK) != 0) {
        snprintf(err, err_len, "model %s: %s", spec->model, strerror(errno));
        return FY_ERR_NOT_FOUND;
    }
    if (spec->api_key_file[0] && access(spec->api_key_file, R_OK) != 0) {
        snprintf(err, err_len, "api_key_file %s: %s", spec->api_key_file, strerror(errno));
        return FY_ERR_NOT_FOUND;
    }
    const char *tls_files[][2] = {
        {"tls.cert", spec->tls_cert}, {"tls.key", spec->tls_key}, {"tls.ca", spec->tls_ca}};
    for (size_t i = 0; i < FY_ARRAY_SIZE(tls_files); i++) {
        if (tls_files[i][1][0] && access(tls_files[i][1], R_OK) != 0) {
            snprintf(err, err_len, "%s %s: %s", tls_files[i][0], tls_files[i][1], strerror(errno));
            return FY_ERR_NOT_FOUND;
        }
    }
    fy_status_t rc = mkdir_p(spec->log_dir);
    if (rc != FY_OK) {
        snprintf(err, err_len, "log_dir %s: %s", spec->log_dir, fy_status_str(rc));
        return rc;
    }
    fy_cluster_state_t *st = calloc(1, sizeof(*st));
    if (st == NULL)
        return FY_ERR_NO_MEMORY;
    /* what a previous run left behind */
    if (fy_cluster_state_read(spec->log_dir, st) == FY_OK) {
        if (any_alive(st)) {
            snprintf(err, err_len, "cluster '%s' is already up (state in %s); `down` it first",
                     spec->name, spec->log_dir);
            free(st);
            return FY_ERR_EXISTS;
        }
        if (!opts->quiet)
            fprintf(stderr, "cluster: cleaning up what a previous run left in %s\n",
                    spec->log_dir);
        teardown_state(spec, st, opts);
    }
    memset(st, 0, sizeof(*st));
    snprintf(st->backend, sizeof(st->backend), "%s", fy_cluster_backend_name(spec->backend));
    char netlog[FY_CLUSTER_PATH_MAX + 32];
    log_path(spec, "network", "log", netlog, sizeof(netlog));

    if (spec->backend == FY_CLUSTER_NETNS) {
        int fd = open(netlog, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        rc = fy_cluster_netns_setup(spec, st, fd, err, err_len);
        if (fd >= 0)
            close(fd);
        if (rc != FY_OK)
            goto fail;
    } else {
        /* free ports for the daemons that left them to us */
        for (int i = 0; i < spec->n_daemons; i++) {
            fy_cluster_daemon_t *d = &spec->daemons[i];
            if (d->port == 0 && (rc = free_port(&d->port)) != FY_OK)
                goto fail;
            if (d->role == FY_CLUSTER_DECODE && d->kv_port == 0) {
                do {
                    if ((rc = free_port(&d->kv_port)) != FY_OK)
                        goto fail;
                } while (d->kv_port == d->port);
            }
        }
    }

    char router[128];
    fy_cluster_router_addr(spec, router, sizeof(router));
    uint64_t deadline = fy_clock_ns() + opts->timeout_ms * 1000000ull;
    int n_prefill = 0, n_decode = 0;
    for (int i = 0; i < spec->n_daemons; i++) {
        fy_cluster_daemon_t *d = &spec->daemons[i];
        fy_cluster_cmd_t cmd;
        rc = fy_cluster_daemon_cmd(spec, i, NULL, &cmd);
        if (rc != FY_OK) {
            snprintf(err, err_len, "%s: command line too long", d->name);
            goto fail;
        }
        if (access(cmd.argv[0], X_OK) != 0) {
            snprintf(err, err_len, "%s: %s: %s (set bin_dir to a build tree or bundle bin/)",
                     d->name, cmd.argv[0], strerror(errno));
            fy_cluster_cmd_free(&cmd);
            rc = FY_ERR_NOT_FOUND;
            goto fail;
        }
        char lp[FY_CLUSTER_PATH_MAX + 64], ns[32] = "", vb[16], vh[16];
        log_path(spec, d->name, "log", lp, sizeof(lp));
        if (spec->backend == FY_CLUSTER_NETNS)
            fy_cluster_netns_names(spec, d->host, ns, sizeof(ns), vb, vh, sizeof(vb));
        int pid = 0;
        rc = spawn_daemon(spec, &cmd, ns[0] ? ns : NULL, lp, &pid);
        fy_cluster_cmd_free(&cmd);
        if (rc != FY_OK) {
            snprintf(err, err_len, "%s: cannot start: %s", d->name, fy_status_str(rc));
            goto fail;
        }
        fy_cluster_state_daemon_t *sd = &st->daemons[st->n_daemons++];
        snprintf(sd->name, sizeof(sd->name), "%s", d->name);
        sd->pid = pid;
        snprintf(sd->addr, sizeof(sd->addr), "%s:%d", fy_cluster_daemon_host_addr(spec, i),
                 d->port);
        if (d->role == FY_CLUSTER_DECODE)
            snprintf(sd->kv_addr, sizeof(sd->kv_addr), "%s:%d",
                     fy_cluster_daemon_host_addr(spec, i), d->kv_port);
        n_prefill += d->role == FY_CLUSTER_PREFILL;
        n_decode += d->role == FY_CLUSTER_DECODE;
        char pp[FY_CLUSTER_PATH_MAX + 64];
        log_path(spec, d->name, "pid", pp, sizeof(pp));
        FILE *pf = fopen(pp, "w");
        if (pf != NULL) {
            fprintf(pf, "%d\n", pid);
            fclose(pf);
        }
        if ((rc = fy_cluster_state_write(spec->log_dir, st)) != FY_OK) {
            snprintf(err, err_len, "cannot write the state file in %s", spec->log_dir);
            goto fail;
        }
        if (!opts->quiet)
            fprintf(stderr, "cluster: started %s (pid %d) on %s\n", d->name, pid, sd->addr);
        if (d->role == FY_CLUSTER_ROUTER) {
            /* workers register at start: wait until the router accepts connections */
            for (;;) {
                int fd = connect_timeout(router, 200);
                if (fd >= 0) {
                    close(fd);
                    break;
                }
                if (!daemon_alive(pid, d->name) || fy_clock_ns() >= deadline) {
                    char t[1024];
                    tail_file(lp, 8, t, sizeof(t));
                    snprintf(err, err_len, "router did not start listening on %s; its log:\n%s",
                             router, t);
                    rc = FY_ERR_UNAVAILABLE;
                    goto fail;
                }
                fy_sleep_ns(50 * 1000000ull);
            }
        }
    }

    /* health: every daemon alive and SERVING, the router knowing every worker */
    for (;;) {
        int not_ready = -1;
        for (int i = 0; i < st->n_daemons && not_ready < 0; i++) {
            if (!daemon_alive(st->daemons[i].pid, st->daemons[i].name)) {
                char lp[FY_CLUSTER_PATH_MAX + 64], t[2048];
                log_path(spec, st->daemons[i].name, "log", lp, sizeof(lp));
                tail_file(lp, 12, t, sizeof(t));
                snprintf(err, err_len, "%s exited during start-up; its log ends:\n%s",
                         st->daemons[i].name, t);
                rc = FY_ERR_UNAVAILABLE;
                goto fail;
            }
            if (opts->health != NULL && opts->health(opts->health_arg, st->daemons[i].addr) != 0)
                not_ready = i;
        }
        if (not_ready < 0 && worker_count_ok(spec, router, n_prefill, n_decode))
            break;
        if (fy_clock_ns() >= deadline) {
            snprintf(err, err_len, "not healthy after %llu ms (%s%s); logs in %s",
                     (unsigned long long)opts->timeout_ms,
                     not_ready >= 0 ? st->daemons[not_ready].name : "router registry",
                     not_ready >= 0 ? " not SERVING" : " incomplete", spec->log_dir);
            rc = FY_ERR_TIMEOUT;
            goto fail;
        }
        fy_sleep_ns(100 * 1000000ull);
    }
    free(st);
    return FY_OK;

fail:
    if (!opts->quiet)
        fprintf(stderr, "cluster: start failed; stopping what was started\n");
    {
        fy_cluster_run_opts_t o = *opts;
        o.drain_timeout_ms = 3000;
        teardown_state(spec, st, &o);
    }
    free(st);
    if (err[0] == '\0')
        snprintf(err, err_len, "%s", fy_status_str(rc));
    return rc;
}

/* ---- status and logs ---- */

/* The last "endpoint ADDR ready, transports: ..." lines of a prefill log, one per peer. */
static void ucx_transports(const char *log, FILE *out)
{
    FILE *f = fopen(log, "r");
    if (f == NULL)
        return;
    char line[1024];
    char peers[16][512];
    int n = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        const char *e = strstr(line, "endpoint ");
        const char *t = e ? strstr(e, " ready, transports: ") : NULL;
        if (t == NULL)
            continue;
        char addr[128];
        if (sscanf(e + 9, "%127s", addr) != 1)
            continue;
        size_t al = strlen(addr);
        int k = 0;
        for (; k < n; k++) {
            if (strncmp(peers[k], addr, al) == 0 && peers[k][al] == ' ')
                break;
        }
        if (k == n && n < 16)
            n++;
        if (k < 16) {
            line[strcspn(line, "\n")] = '\0';
            snprintf(peers[k], sizeof(peers[k]), "%s %s", addr, t + 20);
        }
    }
    fclose(f);
    for (int k = 0; k < n; k++)
        fprintf(out, "    ucx -> %s\n", peers[k]);
}

fy_status_t fy_cluster_status(const fy_cluster_spec_t *spec, const fy_cluster_run_opts_t *opts,
                              FILE *out)
{
    fy_cluster_state_t *st = malloc(sizeof(*st));
    if (st == NULL)
        return FY_ERR_NO_MEMORY;
    fy_status_t rc = fy_cluster_state_read(spec->log_dir, st);
    if (rc != FY_OK) {
        fprintf(out, "cluster %s: not up (no state in %s)\n", spec->name, spec->log_dir);
        free(st);
        return rc;
    }
    static char body[131072];
    fprintf(out, "cluster %s (%s backend), logs in %s\n", spec->name, st->backend, spec->log_dir);
    int down = 0;
    for (int h = 0; h < st->n_netns && h < spec->n_hosts; h++) {
        const fy_cluster_host_t *ho = &spec->hosts[h];
        char p[80];
        snprintf(p, sizeof(p), "/run/netns/%s", st->netns[h]);
        bool there = access(p, F_OK) == 0;
        fprintf(out, "  host %-10s %-15s netns %s%s, spec link ", ho->name, ho->address,
                st->netns[h], there ? "" : " (MISSING)");
        if (ho->bandwidth_bps)
            fprintf(out, "%.0f Mbit/s", ho->bandwidth_bps / 1e6);
        else
            fprintf(out, "unlimited");
        if (ho->delay_ms > 0 || ho->loss_pct > 0)
            fprintf(out, ", delay %.2f ms, loss %.2f%%", ho->delay_ms, ho->loss_pct);
        fputc('\n', out);
        down += !there;
    }
    for (int i = 0; i < st->n_daemons; i++) {
        const fy_cluster_state_daemon_t *d = &st->daemons[i];
        bool alive = daemon_alive(d->pid, d->name);
        const char *health = "-";
        if (alive && opts != NULL && opts->health != NULL)
            health = opts->health(opts->health_arg, d->addr) == 0 ? "SERVING" : "NOT SERVING";
        if (!alive)
            down++;
        fprintf(out, "  %-10s pid %-7d %-5s %-21s %s", d->name, d->pid, alive ? "up" : "DOWN",
                d->addr, health);
        if (d->kv_addr[0])
            fprintf(out, "  kv %s", d->kv_addr);
        if (alive &&
            fy_cluster_http_get(spec, d->addr, "/metrics", 2000, body, sizeof(body)) == FY_OK) {
            if (strncmp(d->name, "router", 6) == 0) {
                fprintf(out, "  workers prefill %.0f decode %.0f, in flight %.0f, requests %.0f",
                        fy_cluster_metric(body, "ferry_router_workers", "role=\"prefill\""),
                        fy_cluster_metric(body, "ferry_router_workers", "role=\"decode\""),
                        fy_cluster_metric(body, "ferry_router_requests_in_flight", NULL),
                        fy_cluster_metric(body, "ferry_router_requests_total",
                                          "status=\"ok\""));
            } else if (strncmp(d->name, "prefill", 7) == 0) {
                fprintf(out, "  queued tokens %.0f, in flight %.0f",
                        fy_cluster_metric(body, "ferry_prefill_queued_tokens", NULL),
                        fy_cluster_metric(body, "ferry_prefill_in_flight", NULL));
            } else {
                fprintf(out, "  running %.0f, free pages %.0f/%.0f",
                        fy_cluster_metric(body, "ferry_decode_running_sequences", NULL),
                        fy_cluster_metric(body, "ferry_decode_free_pages", NULL),
                        fy_cluster_metric(body, "ferry_decode_total_pages", NULL));
            }
        }
        fputc('\n', out);
        if (strncmp(d->name, "prefill", 7) == 0) {
            char lp[FY_CLUSTER_PATH_MAX + 64];
            log_path(spec, d->name, "log", lp, sizeof(lp));
            ucx_transports(lp, out);
        }
    }
    if (down > 0)
        fprintf(out, "%d daemon(s) down\n", down);
    free(st);
    return down > 0 ? FY_ERR_UNAVAILABLE : FY_OK;
}

fy_status_t fy_cluster_logs(const fy_cluster_spec_t *spec, const char *daemon, int lines,
                            FILE *out)
{
    bool found = false;
    static char t[65536];
    for (int i = 0; i < spec->n_daemons; i++) {
        if (daemon != NULL && strcmp(daemon, spec->daemons[i].name) != 0)
            continue;
        found = true;
        char lp[FY_CLUSTER_PATH_MAX + 64];
        log_path(spec, spec->daemons[i].name, "log", lp, sizeof(lp));
        tail_file(lp, lines, t, sizeof(t));
        fprintf(out, "==> %s <==\n%s", lp, t);
        if (t[0] && t[strlen(t) - 1] != '\n')
            fputc('\n', out);
    }
    if (daemon != NULL && strcmp(daemon, "network") == 0) {
        char lp[FY_CLUSTER_PATH_MAX + 64];
        log_path(spec, "network", "log", lp, sizeof(lp));
        tail_file(lp, lines, t, sizeof(t));
        fprintf(out, "==> %s <==\n%s", lp, t);
        found = true;
    }
    return found ? FY_OK : FY_ERR_NOT_FOUND;
}
