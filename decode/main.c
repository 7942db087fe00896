/*
 * main.c: ferry-decode, the decode worker daemon.
 *
 * Options come from defaults < a YAML file (--config) < flags. The worker core (worker.c)
 * runs its own threads; this thread waits for SIGTERM or SIGINT, then drains: no new
 * reservations (the router is told), requests in flight finish (up to --drain-timeout), and
 * the process exits.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

#define MODULE "ferry-decode"

static const fy_opt_t k_opts[] = {
    {"listen", FY_OPT_STRING, "127.0.0.1:7300", "RPC address HOST:PORT (gRPC, /metrics, /healthz)",
     false},
    {"kv-listen", FY_OPT_STRING, "127.0.0.1:7400", "KV data plane (UCX) address HOST:PORT", false},
    {"advertise-host", FY_OPT_STRING, NULL,
     "host the router and prefill workers use to reach this worker (default: the listen host)",
     false},
    {"router", FY_OPT_STRING, NULL, "router HOST:PORT to register with (none: standalone)",
     false},
    {"worker-id", FY_OPT_STRING, NULL, "id in the router's registry (default decode@HOST:PORT)",
     false},
    {"model", FY_OPT_STRING, NULL, "GGUF model file", true},
    {"threads", FY_OPT_INT, "0", "compute threads (0 = all cores)", false},
    {"kv-memory", FY_OPT_SIZE, "256M", "KV page pool size", false},
    {"page-bytes", FY_OPT_SIZE, "32K", "KV page size", false},
    {"kv-recv-buffer", FY_OPT_SIZE, "64M", "receive memory for incoming KV frames", false},
    {"max-batch", FY_OPT_INT, "32", "sequences per decode step", false},
    {"max-tokens", FY_OPT_INT, "256", "completion tokens when a request names none", false},
    {"lease", FY_OPT_DURATION, "10s", "reservation lease when ReserveKV names none", false},
    {"drain-timeout", FY_OPT_DURATION, "30s", "how long SIGTERM waits for requests in flight",
     false},
    {"log-level", FY_OPT_STRING, "info", "trace, debug, info, warn, error", false},
    {"log-format", FY_OPT_STRING, "text", "text or json", false},
};

/* Splits "host:port" ("[v6]:port" too) into host and port. */
static int split_addr(const char *addr, char *host, size_t host_len, int *port_p)
{
    const char *colon = strrchr(addr, ':');
    if (colon == NULL || colon == addr)
        return -1;
    const char *h = addr;
    size_t hl = (size_t)(colon - addr);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl == 0 || hl >= host_len)
        return -1;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || end == colon + 1 || port < 0 || port > 65535)
        return -1;
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port_p = (int)port;
    return 0;
}

int main(int argc, char **argv)
{
    fy_config_t *cfg = NULL;
    char err[256] = "";
    if (fy_config_create(k_opts, FY_ARRAY_SIZE(k_opts), &cfg) != FY_OK)
        return 1;
    fy_status_t st = fy_config_parse_args(cfg, argc, argv, err, sizeof(err));
    if (st == FY_OK && fy_config_help_requested(cfg)) {
        fy_config_print_help(cfg, stdout, "ferry-decode [options]",
                             "Decode worker: receives prompts' KV caches from prefill workers "
                             "over UCX, keeps them compressed in a page pool and generates "
                             "tokens with continuous batching.");
        fy_config_destroy(cfg);
        return 0;
    }
    if (st == FY_OK)
        st = fy_config_validate(cfg, err, sizeof(err));
    if (st != FY_OK) {
        fprintf(stderr, "ferry-decode: %s (see --help)\n", err);
        fy_config_destroy(cfg);
        return 2;
    }
    const char *fmt = fy_config_str(cfg, "log-format");
    if (strcmp(fmt, "json") == 0) {
        fy_log_set_json(true);
    } else if (strcmp(fmt, "text") != 0) {
        fprintf(stderr, "ferry-decode: --log-format: text or json\n");
        fy_config_destroy(cfg);
        return 2;
    }
    fy_log_level_t level;
    if (fy_log_level_parse(fy_config_str(cfg, "log-level"), &level) != FY_OK) {
        fprintf(stderr, "ferry-decode: --log-level: trace, debug, info, warn or error\n");
        fy_config_destroy(cfg);
        return 2;
    }
    if (getenv("FERRY_LOG") == NULL || fy_config_is_set(cfg, "log-level"))
        fy_log_set_level(level);

    decode_worker_params_t p;
    decode_worker_params_default(&p);
    char host[128], kv_host[128];
    if (split_addr(fy_config_str(cfg, "listen"), host, sizeof(host), &p.listen_port) != 0 ||
        split_addr(fy_config_str(cfg, "kv-listen"), kv_host, sizeof(kv_host), &p.kv_port) != 0) {
        fprintf(stderr, "ferry-decode: --listen and --kv-listen take HOST:PORT\n");
        fy_config_destroy(cfg);
        return 2;
    }
    p.listen_host = host;
    p.kv_host = kv_host;
    p.advertise_host = fy_config_str(cfg, "advertise-host");
    p.router = fy_config_str(cfg, "router");
    p.worker_id = fy_config_str(cfg, "worker-id");
    p.model_path = fy_config_str(cfg, "model");
    p.threads = (int)fy_config_int(cfg, "threads");
    p.kv_memory = fy_config_size(cfg, "kv-memory");
    p.page_bytes = (uint32_t)fy_config_size(cfg, "page-bytes");
    p.recv_buffer = fy_config_size(cfg, "kv-recv-buffer");
    p.max_batch = (int)fy_config_int(cfg, "max-batch");
    int64_t max_tokens = fy_config_int(cfg, "max-tokens");
    uint64_t lease_ms = fy_config_duration_ms(cfg, "lease");
    uint64_t drain_ms = fy_config_duration_ms(cfg, "drain-timeout");
    if (max_tokens <= 0 || max_tokens > 1 << 20 || lease_ms == 0 || lease_ms > UINT32_MAX ||
        drain_ms > UINT32_MAX || fy_config_size(cfg, "page-bytes") > UINT32_MAX) {
        fprintf(stderr, "ferry-decode: --max-tokens, --lease, --drain-timeout or --page-bytes "
                        "out of range\n");
        fy_config_destroy(cfg);
        return 2;
    }
    p.default_max_tokens = (uint32_t)max_tokens;
    p.default_lease_ms = (uint32_t)lease_ms;

    // Every thread the worker starts inherits this mask; only sigwait below sees the signals.
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    decode_worker_t *w = NULL;
    st = decode_worker_create(&p, &w, err, sizeof(err));
    if (st != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot start: %s", err[0] ? err : fy_status_str(st));
        fy_config_destroy(cfg);
        return 1;
    }
    // One machine-readable line for scripts and tests that start us with port 0.
    printf("ferry-decode listening rpc=%s:%d kv=%s:%d\n", host, decode_worker_rpc_port(w), kv_host,
           decode_worker_kv_port(w));
    fflush(stdout);
    int sig = 0;
    sigwait(&sigs, &sig);
    FY_LOG_INFO(MODULE, "%s: draining (up to %llu ms)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                (unsigned long long)drain_ms);
    size_t left = decode_worker_drain(w, (uint32_t)drain_ms);
    if (left > 0)
        FY_LOG_WARN(MODULE, "%zu requests still in flight after the drain timeout: failing them",
                    left);
    decode_worker_destroy(w);
    FY_LOG_INFO(MODULE, "stopped");
    fy_config_destroy(cfg);
    return 0;
}
