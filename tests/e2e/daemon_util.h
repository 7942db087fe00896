/*
 * daemon_util.h: helpers for tests that run the ferry-* daemons as child processes: paths
 * from FERRY_SOURCE_ROOT / FERRY_BUILD_ROOT, the real model (missing = failure), starting a
 * daemon on a free port (it binds port 0 and writes the port to --port-file), waiting for it,
 * stopping it (SIGTERM, then SIGKILL), and a blocking call on a private loop.
 */
#ifndef FERRY_TESTS_DAEMON_UTIL_H
#define FERRY_TESTS_DAEMON_UTIL_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "rpc.h"

#define DU_MODEL_REL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static inline const char *du_source_root(void)
{
    const char *r = getenv("FERRY_SOURCE_ROOT");
    return r ? r : ".";
}

static inline const char *du_build_root(void)
{
    const char *r = getenv("FERRY_BUILD_ROOT");
    return r ? r : "build";
}

/* The real model's path, or NULL after printing how to get it. */
static inline const char *du_model_path(void)
{
    static char path[4096];
    const char *env = getenv("FERRY_MODEL");
    if (env != NULL && env[0] != '\0')
        snprintf(path, sizeof(path), "%s", env);
    else
        snprintf(path, sizeof(path), "%s/%s", du_source_root(), DU_MODEL_REL);
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "missing model %s: run scripts/setup.sh (or set FERRY_MODEL)\n", path);
        return NULL;
    }
    return path;
}

/* The daemon build/<rel_exe> ("router/ferry-router"), or in the offline GPU bundle, where the
 * tests sit in tests/ beside bin/, bin/<its file name>. */
static inline void du_exe_path(const char *rel_exe, char *out, size_t len)
{
    snprintf(out, len, "%s/%s", du_build_root(), rel_exe);
    if (access(out, X_OK) == 0)
        return;
    char self[2048];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        return;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    const char *base = strrchr(rel_exe, '/');
    if (slash == NULL)
        return;
    *slash = '\0';
    char cand[4096];
    snprintf(cand, sizeof(cand), "%s/../bin/%s", self, base != NULL ? base + 1 : rel_exe);
    if (access(cand, X_OK) == 0)
        snprintf(out, len, "%s", cand);
}

typedef struct {
    pid_t pid;
    int port;
    char port_file[256];
    char log_file[256];
    char name[32];
} du_proc_t;

/* A TCP port free right now on 127.0.0.1 (bound, then closed), for daemons that take a fixed
 * port; 0 on failure. */
static inline int du_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof(a);
    int port = 0;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &alen) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

/* Starts build/<rel_exe> with args (NULL-terminated). With port_file, --listen 127.0.0.1:0
 * --port-file are added and the call waits up to timeout_ms for the port (p->port); without,
 * the caller chose the ports and waits for readiness itself. stdout and stderr go to a log
 * file in TMPDIR (printed by du_dump_log). */
static inline fy_status_t du_start_ex(du_proc_t *p, const char *name, const char *rel_exe,
                                      const char *const *args, bool port_file,
                                      uint32_t timeout_ms)
{
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", name);
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(p->port_file, sizeof(p->port_file), "%s/ferry-%s-%d.port", tmp, name, (int)getpid());
    static int starts;
    snprintf(p->log_file, sizeof(p->log_file), "%s/ferry-%s-%d-%d.log", tmp, name, (int)getpid(),
             ++starts);
    unlink(p->port_file);
    char exe[4096];
    du_exe_path(rel_exe, exe, sizeof(exe));
    const char *argv[64];
    size_t n = 0;
    argv[n++] = exe;
    for (size_t i = 0; args[i] != NULL && n < 58; i++)
        argv[n++] = args[i];
    if (port_file) {
        argv[n++] = "--listen";
        argv[n++] = "127.0.0.1:0";
        argv[n++] = "--port-file";
        argv[n++] = p->port_file;
    }
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0)
        return FY_ERR_INTERNAL;
    if (pid == 0) {
        FILE *log = freopen(p->log_file, "w", stderr);
        if (log != NULL)
            dup2(fileno(stderr), STDOUT_FILENO);
        execv(exe, (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", exe, strerror(errno));
        _exit(127);
    }
    p->pid = pid;
    if (!port_file)
        return FY_OK;
    for (uint32_t waited = 0; waited < timeout_ms; waited += 20) {
        FILE *f = fopen(p->port_file, "r");
        if (f != NULL) {
            int port = 0;
            int ok = fscanf(f, "%d", &port);
            fclose(f);
            if (ok == 1 && port > 0) {
                p->port = port;
                return FY_OK;
            }
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            p->pid = 0;
            fprintf(stderr, "%s exited during start-up\n", name);
            return FY_ERR_UNAVAILABLE;
        }
        fy_sleep_ns(20 * 1000000ull);
    }
    fprintf(stderr, "%s did not start in %u ms\n", name, timeout_ms);
    return FY_ERR_TIMEOUT;
}

static inline fy_status_t du_start(du_proc_t *p, const char *name, const char *rel_exe,
                                   const char *const *args, uint32_t timeout_ms)
{
    return du_start_ex(p, name, rel_exe, args, true, timeout_ms);
}

static inline void du_dump_log(const du_proc_t *p)
{
    FILE *f = fopen(p->log_file, "r");
    if (f == NULL)
        return;
    char line[1024];
    fprintf(stderr, "---- %s log ----\n", p->name);
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fclose(f);
}

/* Waits up to timeout_ms for the process to exit; returns its exit status (128 + signal when
 * killed by one), or -1 when it is still running. */
static inline int du_wait(du_proc_t *p, uint32_t timeout_ms)
{
    if (p->pid <= 0)
        return -1;
    for (uint32_t waited = 0;; waited += 10) {
        int status;
        pid_t r = waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid) {
            p->pid = 0;
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        }
        if (waited >= timeout_ms)
            return -1;
        fy_sleep_ns(10 * 1000000ull);
    }
}

/* SIGTERM, then SIGKILL after timeout_ms; returns the exit status as du_wait. */
static inline int du_stop(du_proc_t *p, uint32_t timeout_ms)
{
    if (p->pid <= 0)
        return -1;
    kill(p->pid, SIGTERM);
    int rc = du_wait(p, timeout_ms);
    if (rc < 0) {
        fprintf(stderr, "%s ignored SIGTERM for %u ms: killing it\n", p->name, timeout_ms);
        kill(p->pid, SIGKILL);
        rc = du_wait(p, 5000);
    }
    unlink(p->port_file);
    return rc;
}

static inline void du_kill(du_proc_t *p)
{
    if (p->pid > 0) {
        kill(p->pid, SIGKILL);
        du_wait(p, 5000);
    }
    unlink(p->port_file);
}

/* GET path over HTTP/1.1 from 127.0.0.1:port; the whole response (malloc'd, caller frees), or
 * NULL when the connection fails. */
static inline char *du_http_get(int port, const char *path)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 20, got = 0;
    char *buf = malloc(cap);
    while (buf != NULL && got < cap - 1) {
        ssize_t m = read(fd, buf + got, cap - 1 - got);
        if (m <= 0)
            break;
        got += (size_t)m;
    }
    close(fd);
    if (buf != NULL)
        buf[got] = '\0';
    return buf;
}

/* The value of a series (its name with labels, as rendered) in the /metrics of the daemon at
 * 127.0.0.1:port, or -1. */
static inline double du_metric(int port, const char *name)
{
    char *buf = du_http_get(port, "/metrics");
    if (buf == NULL)
        return -1;
    double v = -1;
    char key[128];
    snprintf(key, sizeof(key), "\n%s ", name);
    char *p = strstr(buf, key);
    if (p != NULL)
        v = strtod(p + strlen(key), NULL);
    free(buf);
    return v;
}

/* ---- a blocking call over an rpc_channel on a private loop --------------------------------- */

typedef struct {
    bool done;
    int code;
    char message[256];
    ProtobufCMessage *last; // the last response message (unpacked copy), or NULL
    unsigned n_msgs;
    void (*on_msg)(const ProtobufCMessage *msg, void *arg); // optional, for streams
    void *arg;
} du_result_t;

static inline void du_on_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    du_result_t *r = arg;
    r->n_msgs++;
    if (r->on_msg)
        r->on_msg(msg, r->arg);
    // Keep a copy of the last message: re-pack and unpack.
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        return;
    protobuf_c_message_pack(msg, buf);
    if (r->last)
        protobuf_c_message_free_unpacked(r->last, NULL);
    r->last = protobuf_c_message_unpack(msg->descriptor, NULL, len, buf);
    free(buf);
}

static inline void du_on_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    du_result_t *r = arg;
    r->code = code;
    snprintf(r->message, sizeof(r->message), "%s", message ? message : "");
    r->done = true;
}

static inline void du_result_clear(du_result_t *r)
{
    if (r->last)
        protobuf_c_message_free_unpacked(r->last, NULL);
    memset(r, 0, sizeof(*r));
}

/* A channel to 127.0.0.1:port on loop. */
static inline rpc_channel_t *du_channel(uv_loop_t *loop, int port)
{
    char addr[32];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    const char *list[1] = {addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = list;
    cp.n_addresses = 1;
    cp.max_message = 64u << 20;
    cp.max_send_message = 64u << 20;
    rpc_channel_t *ch = NULL;
    return rpc_channel_create(loop, &cp, &ch) == FY_OK ? ch : NULL;
}

static inline void du_drain_loop(uv_loop_t *loop)
{
    while (uv_run(loop, UV_RUN_NOWAIT) != 0)
        uv_run(loop, UV_RUN_ONCE);
}

#endif /* FERRY_TESTS_DAEMON_UTIL_H */
