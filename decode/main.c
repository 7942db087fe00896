/*
 * main.c: ferry-decode, the decode worker daemon.
 *
 * Options come from defaults < a YAML file (--config) < flags (router/daemon.h does the
 * parsing, --help and logging set-up the three daemons share). The worker core (worker.c)
 * runs its own threads; this thread waits for SIGTERM or SIGINT, then drains: no new
 * reservations (the router is told), requests in flight finish, up to --drain-timeout; a
 * second signal stops at once.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon.h"
#include "decode.h"

#define MODULE "ferry-decode"

static const fy_opt_t k_opts[] = {
    {"listen", FY_OPT_STRING, "127.0.0.1:50062",
     "RPC address HOST:PORT (gRPC, /metrics, /healthz; port 0 picks one)", false},
    {"kv-listen", FY_OPT_STRING, "127.0.0.1:50072",
     "KV data plane (UCX) address HOST:PORT (port 0 picks one)", false},
    {"advertise-host", FY_OPT_STRING, "",
     "host the router and prefill workers reach this worker at (default: the listen host)", false},
    {"router", FY_OPT_STRING, "", "router HOST:PORT to register with (empty: standalone)", false},
    DAEMON_OPTS_WORKER_API_KEY,
    DAEMON_OPTS_TLS,
    {"worker-id", FY_OPT_STRING, "", "id in the cluster (default decode@HOST:PORT)", false},
    {"heartbeat", FY_OPT_DURATION, "0", "heartbeat period (0 = half the router's lease)", false},
    {"model", FY_OPT_STRING, NULL, "GGUF model file", true},
    {"device", FY_OPT_STRING, "cpu", "where the model and the KV pages live: cpu or cuda", false},
    {"threads", FY_OPT_INT, "0", "compute threads (0 = all CPUs)", false},
    {"kv-memory", FY_OPT_SIZE, "512M",
     "KV page pool size (CPU: allocated as pages are used; cuda: GPU memory, at start)", false},
    {"page-bytes", FY_OPT_SIZE, "0",
     "KV page size; each layer and KV head has its own pages (0: 256 bytes per head_dim "
     "channel, 16K-64K)",
     false},
    {"kv-recv-buffer", FY_OPT_SIZE, "64M", "receive memory for incoming KV frames", false},
    {"max-batch", FY_OPT_INT, "32", "sequences per decode step", false},
    {"max-tokens", FY_OPT_INT, "256", "completion tokens when a request names none", false},
    {"lease", FY_OPT_DURATION, "10s", "reservation lease when ReserveKV names none", false},
    {"drain-timeout", FY_OPT_DURATION, "30s", "longest wait for requests in flight at SIGTERM",
     false},
    {"ucx-tls", FY_OPT_STRING, "", "UCX transports (as UCX_TLS), empty = UCX's choice", false},
    {"ucx-devices", FY_OPT_STRING, "", "UCX devices (as UCX_NET_DEVICES)", false},
    {"pair-link", FY_OPT_STRING, "auto",
     "KV link with prefill workers of this node: auto (nccl on GPUs), nccl, socket, off", false},
    {"node-id", FY_OPT_STRING, "", "node identity for pairing (default: the kernel's boot id)",
     false},
    {"port-file", FY_OPT_STRING, "", "write the bound RPC port to this file", false},
    {"log-format", FY_OPT_STRING, "text", "text or json", false},
    {"log-level", FY_OPT_STRING, "", "trace|debug|info|warn|error (default info or $FERRY_LOG)",
     false},
};

static const char *opt_str(const fy_config_t *cfg, const char *name)
{
    const char *s = fy_config_str(cfg, name);
    return s != NULL && s[0] != '\0' ? s : NULL;
}

/* Waits for SIGTERM/SIGINT, drains, and returns once the worker may be destroyed. */
static void serve_until_signal(decode_worker_t *w, const sigset_t *sigs, uint64_t drain_ms)
{
    int sig = 0;
    sigwait(sigs, &sig);
    FY_LOG_INFO(MODULE, "%s: draining (up to %llu ms; a second signal stops at once)",
                sig == SIGTERM ? "SIGTERM" : "SIGINT", (unsigned long long)drain_ms);
    decode_worker_drain(w, 0); // stop taking work; requests in flight go on
    uint64_t deadline = fy_clock_ns() + drain_ms * 1000000ull;
    for (;;) {
        decode_worker_stats_t s;
        decode_worker_stats(w, &s);
        if (s.requests == 0) {
            FY_LOG_INFO(MODULE, "drained: nothing in flight");
            return;
        }
        if (fy_clock_ns() >= deadline) {
            FY_LOG_WARN(MODULE, "%u requests still in flight after the drain timeout: failing "
                                "them",
                        s.requests);
            return;
        }
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000000L};
        if (sigtimedwait(sigs, NULL, &ts) > 0) {
            FY_LOG_WARN(MODULE, "second signal: stopping now (%u requests fail)", s.requests);
            return;
        }
    }
}

int main(int argc, char **argv)
{
    fy_config_t *cfg = NULL;
    int exit_code = -1;
    daemon_config(k_opts, FY_ARRAY_SIZE(k_opts), argc, argv, "ferry-decode [options]",
                  "Decode worker: receives prompts' KV caches from prefill workers over UCX, "
                  "keeps them compressed in a page pool and generates tokens with continuous "
                  "batching.",
                  &cfg, &exit_code);
    if (exit_code >= 0)
        return exit_code;

    decode_worker_params_t p;
    decode_worker_params_default(&p);
    char host[128], kv_host[128];
    if (daemon_hostport(fy_config_str(cfg, "listen"), host, sizeof(host), &p.listen_port) !=
            FY_OK ||
        daemon_hostport(fy_config_str(cfg, "kv-listen"), kv_host, sizeof(kv_host), &p.kv_port) !=
            FY_OK) {
        FY_LOG_ERROR(MODULE, "--listen and --kv-listen take HOST:PORT");
        fy_config_destroy(cfg);
        return 2;
    }
    p.listen_host = host;
    p.kv_host = kv_host;
    p.advertise_host = opt_str(cfg, "advertise-host");
    p.router = opt_str(cfg, "router");
    if (daemon_api_key(cfg, &p.api_key) != FY_OK)
        return 2;
    p.worker_id = opt_str(cfg, "worker-id");
    p.ucx_tls = opt_str(cfg, "ucx-tls");
    p.ucx_devices = opt_str(cfg, "ucx-devices");
    p.pair_link = opt_str(cfg, "pair-link");
    p.node_id = opt_str(cfg, "node-id");
    p.model_path = fy_config_str(cfg, "model");
    p.threads = (int)fy_config_int(cfg, "threads");
    if (mdl_device_parse(fy_config_str(cfg, "device"), &p.device) != FY_OK) {
        FY_LOG_ERROR(MODULE, "--device takes cpu or cuda");
        fy_config_destroy(cfg);
        return 2;
    }
    p.kv_memory = fy_config_size(cfg, "kv-memory");
    p.recv_buffer = fy_config_size(cfg, "kv-recv-buffer");
    p.max_batch = (int)fy_config_int(cfg, "max-batch");
    int64_t max_tokens = fy_config_int(cfg, "max-tokens");
    uint64_t page_bytes = fy_config_size(cfg, "page-bytes");
    uint64_t lease_ms = fy_config_duration_ms(cfg, "lease");
    uint64_t drain_ms = fy_config_duration_ms(cfg, "drain-timeout");
    uint64_t heartbeat_ms = fy_config_duration_ms(cfg, "heartbeat");
    if (max_tokens <= 0 || max_tokens > (1 << 20) || lease_ms == 0 || lease_ms > UINT32_MAX ||
        drain_ms > UINT32_MAX || heartbeat_ms > UINT32_MAX ||
        page_bytes > UINT32_MAX || p.threads < 0 || p.max_batch <= 0) {
        FY_LOG_ERROR(MODULE, "--max-tokens, --lease, --drain-timeout, --heartbeat, --page-bytes, "
                             "--threads or --max-batch out of range");
        fy_config_destroy(cfg);
        return 2;
    }
    p.page_bytes = (uint32_t)page_bytes;
    p.default_max_tokens = (uint32_t)max_tokens;
    p.default_lease_ms = (uint32_t)lease_ms;
    p.heartbeat_ms = (uint32_t)heartbeat_ms;

    // Every thread the worker starts inherits this mask; only this thread takes the signals.
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    daemon_tls_t tls;
    if (daemon_tls(cfg, &tls) != FY_OK) {
        fy_config_destroy(cfg);
        return 2;
    }
    p.rpc_tls = tls.server;
    p.router_tls = tls.client;
    decode_worker_t *w = NULL;
    char err[256] = "";
    fy_status_t st = decode_worker_create(&p, &w, err, sizeof(err));
    if (st != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot start: %s", err[0] ? err : fy_status_str(st));
        daemon_tls_free(&tls);
        fy_config_destroy(cfg);
        return 1;
    }
    if (daemon_port_file(fy_config_str(cfg, "port-file"), decode_worker_rpc_port(w)) != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot write --port-file");
        decode_worker_destroy(w);
        daemon_tls_free(&tls);
        fy_config_destroy(cfg);
        return 1;
    }
    // One machine-readable line for scripts and tests that start us with port 0.
    printf("ferry-decode listening rpc=%s:%d kv=%s:%d\n", host, decode_worker_rpc_port(w),
           kv_host, decode_worker_kv_port(w));
    fflush(stdout);
    serve_until_signal(w, &sigs, drain_ms);
    decode_worker_destroy(w);
    daemon_tls_free(&tls);
    FY_LOG_INFO(MODULE, "stopped");
    fy_config_destroy(cfg);
    return 0;
}
