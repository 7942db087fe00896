/*
 * daemon.h: what the ferry-* daemons share around their service code: command-line and config
 * start-up, "host:port" addresses, the port file tests and scripts read, the Ferry Health
 * method, and SIGTERM/SIGINT handling (first signal drains, a second one stops at once).
 */
#ifndef FERRY_DAEMON_H
#define FERRY_DAEMON_H

#include <stdbool.h>
#include <stddef.h>

#include <uv.h>

#include "common.h"
#include "rpc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Parses argv over opts (which must include "log-format" and "log-level" string options),
 * prints --help (returns 0 through *exit_p) and errors (exit 2), and applies the log
 * settings. *exit_p = -1 when the daemon should run. Thread: main. */
fy_status_t daemon_config(const fy_opt_t *opts, size_t n_opts, int argc, char **argv,
                          const char *usage, const char *summary, fy_config_t **cfg_p,
                          int *exit_p);

/* Splits "host:port" ("[v6]:port" too) into host (cap bytes) and port (0..65535).
 * FY_ERR_INVALID_ARG otherwise. Thread: any. */
fy_status_t daemon_hostport(const char *addr, char *host, size_t cap, int *port_p);

/* The cluster's API key: the "api-key" option, else the first line of the "api-key-file"
 * option's file (both given: an error), else $FERRY_API_KEY, else $FERRY_API_KEY_FILE's file;
 * *key_p = NULL when there is none (a key read from a file stays in a static buffer). Errors,
 * logged: FY_ERR_INVALID_ARG for a key over 256 bytes, an empty file or a key with blanks or
 * control bytes; FY_ERR_NOT_FOUND or FY_ERR_IO for a file it cannot read. A file every user can
 * read is used, with a warning. Thread: main. */
fy_status_t daemon_api_key(const fy_config_t *cfg, const char **key_p);

/* The option table entries daemon_api_key reads: "api-key-file" for every daemon, and both for
 * a worker (the router words its "api-key" itself). */
#define DAEMON_OPT_API_KEY_FILE                                                                    \
    {                                                                                              \
        "api-key-file", FY_OPT_STRING, "",                                                         \
            "read the API key from the first line of this file instead (default: "                 \
            "$FERRY_API_KEY_FILE)",                                                                \
            false                                                                                  \
    }
#define DAEMON_OPTS_WORKER_API_KEY                                                                 \
    {"api-key", FY_OPT_STRING, "",                                                                 \
     "the cluster's API key: required of callers (but Health) and sent to the router "             \
     "(default: $FERRY_API_KEY; unset = open)",                                                    \
     false},                                                                                       \
        DAEMON_OPT_API_KEY_FILE

/* TLS for a daemon's RPC (and the router's HTTP) ports and the connections it dials, from the
 * options DAEMON_OPTS_TLS names. A cluster runs all daemons alike: with TLS every daemon has a
 * certificate, and each verifies the others with the CA file. */
typedef struct {
    rpc_tls_t *server; // "tls-cert" and "tls-key": the ports speak TLS only; NULL = cleartext
    rpc_tls_t *client; // "tls-ca" (default: the "tls-cert" file): what the daemon dials is
                       // TLS, verified with it; NULL = cleartext
} daemon_tls_t;

/* Reads the files; FY_ERR_INVALID_ARG, logged with the reason, for a bad file or a key without
 * a certificate or the other way round. Thread: main. */
fy_status_t daemon_tls(const fy_config_t *cfg, daemon_tls_t *t);
void daemon_tls_free(daemon_tls_t *t);

#define DAEMON_OPTS_TLS                                                                            \
    {"tls-cert", FY_OPT_STRING, "",                                                                \
     "serve TLS only, with this PEM certificate chain (leaf first; needs --tls-key)", false},      \
        {"tls-key", FY_OPT_STRING, "", "the PEM private key of --tls-cert", false},                \
        {"tls-ca", FY_OPT_STRING, "",                                                              \
         "dial the other daemons over TLS, verifying them with the PEM certificates in this "      \
         "file (default: --tls-cert's file)",                                                      \
         false},                                                                                   \
    {                                                                                              \
        "tls-any-name", FY_OPT_BOOL, "false",                                                      \
            "accept a certificate --tls-ca verifies whatever host it names (one certificate "      \
            "shared by the cluster)",                                                              \
            false                                                                                  \
    }

/* An rpc_auth_cb for a daemon with an API key (arg: the key, NUL-terminated, borrowed for the
 * server's lifetime): every call needs "Bearer <key>" except ferry.v1.Ferry/Health, which
 * probes call. */
fy_status_t daemon_auth(void *arg, const char *path, const char *authorization);

/* Writes "port\n" to path (atomically: a temporary file renamed), when path is set. */
fy_status_t daemon_port_file(const char *path, int port);

/* Serves ferry.v1.Ferry Health on srv: SERVING, or DRAINING while *draining; role is
 * "router", "prefill" or "decode". Used only by workers: the router serves the whole Ferry
 * service itself. role and draining are borrowed for the server's lifetime. */
fy_status_t daemon_health_serve(rpc_server_t *srv, const char *role, const bool *draining);

/* Fills a HealthResponse-shaped answer for the router's own Health method. */
void daemon_health_answer(rpc_call_t *call, const char *role, bool draining);

/* SIGTERM / SIGINT: the first calls drain(arg), a second one calls stop(arg). Thread: loop. */
typedef void (*daemon_signal_cb)(void *arg);
typedef struct {
    uv_signal_t term, intr;
    daemon_signal_cb drain, stop;
    void *arg;
    int count;
} daemon_signals_t;

fy_status_t daemon_signals_start(daemon_signals_t *s, uv_loop_t *loop, daemon_signal_cb drain,
                                 daemon_signal_cb stop, void *arg);
/* Closes the handles (run the loop afterwards). */
void daemon_signals_close(daemon_signals_t *s);

/* Runs the loop until the handles closed before this call are gone, then closes it; logs a
 * warning when a handle is still open. Thread: the loop's. */
void daemon_loop_close(uv_loop_t *loop, const char *module);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_DAEMON_H */
