/*
 * cluster.h: launching a Ferry cluster (router, prefill and decode pools) from a YAML spec.
 *
 * The spec (docs/cluster.md) names hosts (address, ssh user, GPUs, the link to the rest of the
 * cluster) and roles placed on them; a backend says how the daemons start:
 *
 *   local  processes on this machine, all on 127.0.0.1;
 *   netns  each host in its own network namespace on this machine, joined by veth pairs to a
 *          bridge, with per-link bandwidth, delay and loss set by tc (needs root);
 *   ssh    the daemons started on the hosts over ssh;
 *   slurm  an sbatch script with one srun step per daemon;
 *   k8s    Kubernetes manifests (a Deployment and a Service per daemon, a ConfigMap).
 *
 * local and netns keep a state file in the log directory (what was started and created), so
 * `down` stops and removes everything even after the launcher itself crashed.
 */
#ifndef FERRY_CLUSTER_H
#define FERRY_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common.h"

#define FY_CLUSTER_MAX_HOSTS 64
#define FY_CLUSTER_MAX_DAEMONS 128
#define FY_CLUSTER_NAME_MAX 24
#define FY_CLUSTER_PATH_MAX 512

typedef enum {
    FY_CLUSTER_LOCAL = 0,
    FY_CLUSTER_NETNS,
    FY_CLUSTER_SSH,
    FY_CLUSTER_SLURM,
    FY_CLUSTER_K8S,
} fy_cluster_backend_t;

typedef enum {
    FY_CLUSTER_ROUTER = 0,
    FY_CLUSTER_PREFILL,
    FY_CLUSTER_DECODE,
} fy_cluster_role_t;

typedef struct {
    char name[FY_CLUSTER_NAME_MAX];
    char address[64];     /* IPv4 address (netns: inside the spec's subnet) */
    char ssh_user[64];    /* empty: the current user */
    int gpus;             /* GPUs on the host; daemons with `gpu: N` take one each */
    uint64_t bandwidth_bps; /* the host's link, both directions; 0 = unlimited */
    double delay_ms;      /* one-way delay added on each direction */
    double loss_pct;      /* packet loss on each direction, percent */
    int line;             /* where the spec defines it */
} fy_cluster_host_t;

typedef struct {
    fy_cluster_role_t role;
    char name[32];        /* router, prefill-0, decode-1, ... */
    int host;             /* index into hosts */
    int port;             /* RPC port (0 = a free one, local backend only) */
    int kv_port;          /* decode: UCX listener port */
    int http_port;        /* router: the OpenAI-compatible API's port, 0 = not served */
    int threads;          /* 0 = the spec's threads */
    int gpu;              /* -1 = CPU */
    char kv_memory[32];   /* decode: empty = the spec's kv_memory */
    int line;
} fy_cluster_daemon_t;

typedef struct {
    char name[FY_CLUSTER_NAME_MAX];
    fy_cluster_backend_t backend;
    char model[FY_CLUSTER_PATH_MAX];   /* absolute */
    char bin_dir[FY_CLUSTER_PATH_MAX]; /* absolute: a build tree or a bundle's bin/ */
    char log_dir[FY_CLUSTER_PATH_MAX]; /* absolute */
    char api_key_file[FY_CLUSTER_PATH_MAX]; /* absolute: the cluster's API key, "" = none */
    char tls_cert[FY_CLUSTER_PATH_MAX]; /* absolute: every daemon's --tls-cert, "" = cleartext */
    char tls_key[FY_CLUSTER_PATH_MAX];  /* absolute: --tls-key */
    char tls_ca[FY_CLUSTER_PATH_MAX];   /* absolute: --tls-ca, "" = the certificate file */
    bool tls_any_name;                  /* --tls-any-name */
    char policy[128];     /* codec policy of the prefill workers (empty: their default) */
    double budget;        /* 0 = the policy's */
    double ttft_target_ms; /* > 0: bandwidth-adaptive budget aiming at this TTFT */
    double budget_min, budget_max; /* limits of the adaptive budget */
    char ucx_tls[64];
    char ucx_devices[64];
    char pair_link[16];   /* workers' --pair-link (auto, nccl, socket, off), empty = theirs */
    char kv_memory[32];   /* decode page pool, e.g. 256M */
    int threads;          /* per daemon, 0 = all CPUs */
    int max_tokens;       /* router default, 0 = its own */
    char lease[16];       /* router worker lease, empty = its own */
    char reserve_lease[16]; /* router --reserve-lease (decode pages awaiting KV), empty = its own */
    char kv_seal[8];        /* router --kv-seal (on, off, auto), empty = its own (auto) */
    char log_level[8];    /* daemons' --log-level (default info: status reads UCX lanes) */
    char subnet[32];      /* netns: A.B.C.0/24 of the bridge (bridge gets .1) */
    char image[256];      /* k8s: container image */
    char partition[64];   /* slurm: partition, empty = the default */
    fy_cluster_host_t hosts[FY_CLUSTER_MAX_HOSTS];
    int n_hosts;
    fy_cluster_daemon_t daemons[FY_CLUSTER_MAX_DAEMONS];
    int n_daemons;
} fy_cluster_spec_t;

const char *fy_cluster_backend_name(fy_cluster_backend_t b);
fy_status_t fy_cluster_backend_parse(const char *s, fy_cluster_backend_t *b_p);
const char *fy_cluster_role_name(fy_cluster_role_t r);

/* Parses a spec from memory; relative paths resolve against base_dir (NULL: the current
 * directory); backend >= 0 (an fy_cluster_backend_t) overrides the spec's. On error `err`
 * says what and where ("spec.yaml:12: ..."), `file` names it. */
fy_status_t fy_cluster_spec_parse(const char *text, size_t len, const char *file,
                                  const char *base_dir, int backend, fy_cluster_spec_t *spec,
                                  char *err, size_t err_len);
fy_status_t fy_cluster_spec_load(const char *path, int backend, fy_cluster_spec_t *spec,
                                 char *err, size_t err_len);

/* The address daemon i binds and advertises: 127.0.0.1 under the local backend, else its
 * host's address. */
const char *fy_cluster_daemon_host_addr(const fy_cluster_spec_t *spec, int i);
/* The router's HOST:PORT. */
void fy_cluster_router_addr(const fy_cluster_spec_t *spec, char *out, size_t out_len);
int fy_cluster_router_index(const fy_cluster_spec_t *spec);

/* A command line: argv plus environment additions (NAME=VALUE). Strings are owned. */
#define FY_CLUSTER_ARGV_MAX 64
typedef struct {
    char *argv[FY_CLUSTER_ARGV_MAX + 1];
    int argc;
    char *env[8 + 1];
    int n_env;
} fy_cluster_cmd_t;
void fy_cluster_cmd_free(fy_cluster_cmd_t *cmd);
/* Appends the words of a command, stopping at NULL. */
fy_status_t fy_cluster_cmd_add(fy_cluster_cmd_t *cmd, const char *word);

/* The command line that starts daemon i with binaries under bin_dir (NULL: the spec's). */
fy_status_t fy_cluster_daemon_cmd(const fy_cluster_spec_t *spec, int i, const char *bin_dir,
                                  fy_cluster_cmd_t *cmd);
/* Shell-quotes a command (env assignments first) into out. */
fy_status_t fy_cluster_cmd_shell(const fy_cluster_cmd_t *cmd, char *out, size_t out_len);

/* ---- running a cluster (local and netns backends) ---- */

/* Asks addr (HOST:PORT) for its gRPC Health; returns 0 when SERVING. fy_cluster_sdk_health
 * (cluster_health.h) takes the spec as arg (its TLS), or NULL. */
typedef int (*fy_cluster_health_cb)(void *arg, const char *addr);

typedef struct {
    fy_cluster_health_cb health;
    void *health_arg;
    uint64_t timeout_ms;      /* how long `up` waits for health (default 120 s) */
    uint64_t drain_timeout_ms; /* how long `down` waits after SIGTERM before SIGKILL (30 s) */
    bool quiet;
} fy_cluster_run_opts_t;
void fy_cluster_run_opts_default(fy_cluster_run_opts_t *o);

fy_status_t fy_cluster_up(fy_cluster_spec_t *spec, const fy_cluster_run_opts_t *opts, char *err,
                          size_t err_len);
fy_status_t fy_cluster_down(const fy_cluster_spec_t *spec, const fy_cluster_run_opts_t *opts,
                            char *err, size_t err_len);
/* Prints each daemon (pid, alive, address, health, load from /metrics, UCX transports from
 * the prefill logs) and the router's registry counts. */
fy_status_t fy_cluster_status(const fy_cluster_spec_t *spec, const fy_cluster_run_opts_t *opts,
                              FILE *out);
/* Prints the last `lines` lines of each daemon's log (role: NULL = all, or a daemon name). */
fy_status_t fy_cluster_logs(const fy_cluster_spec_t *spec, const char *daemon, int lines,
                            FILE *out);

/* The state file of a running cluster: log_dir/cluster.state. */
typedef struct {
    char name[32];
    int pid;
    char addr[80];        /* RPC HOST:PORT */
    char kv_addr[80];     /* decode: UCX HOST:PORT */
} fy_cluster_state_daemon_t;
typedef struct {
    char backend[16];
    char bridge[16];
    char netns[FY_CLUSTER_MAX_HOSTS][32];
    int n_netns;
    char links[FY_CLUSTER_MAX_HOSTS][16]; /* bridge-side veth names */
    int n_links;
    fy_cluster_state_daemon_t daemons[FY_CLUSTER_MAX_DAEMONS];
    int n_daemons;
} fy_cluster_state_t;
fy_status_t fy_cluster_state_read(const char *log_dir, fy_cluster_state_t *st);
fy_status_t fy_cluster_state_write(const char *log_dir, const fy_cluster_state_t *st);

/* Fetches GET path from HOST:PORT (HTTP/1.1 on the RPC port) into buf (NUL-ended): inside TLS,
 * as the daemons of spec speak it, when spec has tls_cert; spec NULL = cleartext. */
fy_status_t fy_cluster_http_get(const fy_cluster_spec_t *spec, const char *addr, const char *path,
                                uint64_t timeout_ms, char *buf, size_t buf_len);
/* The file that verifies the daemons' certificates (tls_ca, else tls_cert); NULL without TLS. */
const char *fy_cluster_tls_ca(const fy_cluster_spec_t *spec);
/* The value of the first sample of `metric` (with `labels` exactly, or none) in a Prometheus
 * text body; NaN when absent. */
double fy_cluster_metric(const char *body, const char *metric, const char *labels);

/* ---- netns ---- */

/* Names the launcher uses for host h: namespace, bridge, veth ends (bridge side, host side). */
void fy_cluster_netns_names(const fy_cluster_spec_t *spec, int h, char *ns, size_t ns_len,
                            char *veth_br, char *veth_host, size_t veth_len);
void fy_cluster_bridge_name(const fy_cluster_spec_t *spec, char *out, size_t out_len);
/* The commands that build the network (ip/tc, in order). cmds has room for max entries. */
fy_status_t fy_cluster_netns_plan(const fy_cluster_spec_t *spec, fy_cluster_cmd_t *cmds, int max,
                                  int *n_p);
/* The tc commands that set host h's link (both directions); used by the plan and to change a
 * link on a running cluster (bandwidth_bps/delay/loss as in the host). */
fy_status_t fy_cluster_link_cmds(const fy_cluster_spec_t *spec, int h, bool replace,
                                 fy_cluster_cmd_t *cmds, int max, int *n_p);
/* Changes host h's link on a running netns cluster (0 bandwidth = unlimited). */
fy_status_t fy_cluster_set_link(fy_cluster_spec_t *spec, int h, uint64_t bandwidth_bps,
                                double delay_ms, double loss_pct);

/* ---- generators (ssh, slurm, k8s) ---- */

/* ssh: one line per daemon that starts it on its host (and the stop lines with `down`). */
fy_status_t fy_cluster_gen_ssh(const fy_cluster_spec_t *spec, bool down, FILE *out);
/* The ssh command that starts daemon i on its host, detached, writing LOG_DIR/NAME.pid and
 * .log (down: SIGTERM it and wait until it is gone); argv[6] is the remote shell line. */
fy_status_t fy_cluster_ssh_cmd(const fy_cluster_spec_t *spec, int i, bool down,
                               fy_cluster_cmd_t *cmd);
/* slurm: an sbatch script with an srun step per daemon. */
fy_status_t fy_cluster_gen_slurm(const fy_cluster_spec_t *spec, FILE *out);
/* k8s: a multi-document YAML (ConfigMap, Deployments, Services). */
fy_status_t fy_cluster_gen_k8s(const fy_cluster_spec_t *spec, FILE *out);

/* Runs a command and waits; returns its exit status (or -1 and errno). Output goes to the
 * log file when log_fd >= 0, else is discarded. */
int fy_cluster_run_cmd(const fy_cluster_cmd_t *cmd, int log_fd);

#endif
