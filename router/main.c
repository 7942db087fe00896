/*
 * main.c: ferry-router, the frontend daemon.
 *
 * Serves ferry.v1.Ferry to clients and ferry.v1.Worker RegisterWorker/Heartbeat to workers on
 * --listen (plus GET /metrics and /healthz on the same port) and, with --http-listen, the
 * OpenAI-compatible API (openai.h) as a client of its own gRPC port; loads only the GGUF's
 * tokenizer and metadata. Workers silent for 3 leases are dropped. SIGTERM: refuse new requests,
 * finish those in flight (at most --drain-timeout), exit.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "frontend.h"
#include "openai.h"
#include "router.h"

#define MODULE "router"

static const fy_opt_t k_opts[] = {
    {"listen", FY_OPT_STRING, "127.0.0.1:50051", "RPC address HOST:PORT (port 0 picks one)", false},
    {"http-listen", FY_OPT_STRING, "",
     "serve the OpenAI-compatible HTTP API (/v1/completions, "
     "/v1/chat/completions, /v1/models) on HOST:PORT",
     false},
    {"http-port-file", FY_OPT_STRING, "", "write the bound HTTP port to this file", false},
    {"api-key", FY_OPT_STRING, "",
     "require \"Authorization: Bearer KEY\" of clients (gRPC and HTTP) and workers, and send it "
     "to the workers (default: $FERRY_API_KEY; unset = open)",
     false},
    DAEMON_OPT_API_KEY_FILE,
    DAEMON_OPTS_TLS,
    {"model", FY_OPT_STRING, NULL, "GGUF model file (only its tokenizer and metadata are read)",
     true},
    {"model-name", FY_OPT_STRING, "", "name clients use (default: the file's general.name)", false},
    {"lease", FY_OPT_DURATION, "1s", "worker heartbeat lease; 3 missed leases drop a worker",
     false},
    {"max-tokens", FY_OPT_INT, "256", "completion tokens when a request sets none", false},
    {"retries", FY_OPT_INT, "1",
     "retries on another worker pair after a failed prefill or "
     "KV transfer",
     false},
    {"reserve-lease", FY_OPT_DURATION, "30s",
     "how long a decode worker holds pages for KV "
     "that has not arrived",
     false},
    {"worker-timeout", FY_OPT_DURATION, "5s", "deadline of ReserveKV and Cancel calls", false},
    {"prefill-timeout", FY_OPT_DURATION, "5m",
     "longest a Prefill call may take (queue "
     "included) when the client set no deadline",
     false},
    {"policy", FY_OPT_STRING, "",
     "codec policy when a request names none (empty: the prefill "
     "worker's default)",
     false},
    {"budget", FY_OPT_DOUBLE, "0", "codec budget when a request sets none (0: the policy's)",
     false},
    {"kv-seal", FY_OPT_STRING, "auto",
     "seal each request's KV frames (AES-256-GCM, a fresh key a request, sent to both "
     "workers): on, off, or auto = on with --tls-cert (the key then travels encrypted)",
     false},
    {"drain-timeout", FY_OPT_DURATION, "30s", "longest wait for requests in flight at SIGTERM",
     false},
    {"port-file", FY_OPT_STRING, "", "write the bound RPC port to this file", false},
    {"log-format", FY_OPT_STRING, "text", "text or json", false},
    {"log-level", FY_OPT_STRING, "", "trace|debug|info|warn|error (default info or $FERRY_LOG)",
     false},
};

typedef struct {
    uv_loop_t loop;
    fy_config_t *cfg;
    mdl_gguf_t *gguf;
    mdl_tokenizer_t *tok;
    router_registry_t *reg;
    fy_metrics_t *metrics;
    fy_metric_t *workers_prefill, *workers_decode, *expired;
    rpc_server_t *srv;
    oai_server_t *oai;
    const char *api_key; // --api-key or $FERRY_API_KEY, NULL when clients need none
    daemon_tls_t tls;    // --tls-*: the gRPC and HTTP ports, the calls to the workers
    rt_t *rt;
    daemon_signals_t sig;
    uv_timer_t tick;
    uint64_t drain_deadline_ns;
    bool draining, aborted, stopping;
} app_t;

static bool healthy(void *arg)
{
    app_t *a = arg;
    return rt_serving(a->rt);
}

static void on_server_drained(rpc_server_t *srv, void *arg)
{
    app_t *a = arg;
    uv_stop(&a->loop);
}

static void stop_now(void *arg)
{
    app_t *a = arg;
    if (a->stopping)
        return;
    a->stopping = true;
    oai_server_destroy(a->oai); // its generations are cancelled with the rest below
    a->oai = NULL;
    if (!a->aborted) {
        a->aborted = true;
        rt_abort_all(a->rt, "router stopping");
    }
    rpc_server_shutdown(a->srv, 500, on_server_drained, a);
}

static void on_tick(uv_timer_t *t)
{
    app_t *a = t->data;
    char ids[16][64];
    size_t n = router_registry_expire(a->reg, fy_clock_ns(), ids, 16);
    for (size_t i = 0; i < FY_MIN(n, (size_t)16); i++)
        FY_LOG_WARN(MODULE, "worker %s expired: no heartbeat for 3 leases", ids[i]);
    fy_metric_add(a->expired, (double)n);
    rt_gc(a->rt);
    router_worker_t ws[256];
    size_t nw = router_registry_snapshot(a->reg, ws, FY_ARRAY_SIZE(ws));
    unsigned np = 0, nd = 0;
    for (size_t i = 0; i < FY_MIN(nw, FY_ARRAY_SIZE(ws)); i++) {
        np += ws[i].role == ROUTER_ROLE_PREFILL;
        nd += ws[i].role == ROUTER_ROLE_DECODE;
    }
    fy_metric_set(a->workers_prefill, np);
    fy_metric_set(a->workers_decode, nd);
    if (a->draining && !a->stopping) {
        if (rt_in_flight(a->rt) == 0) {
            FY_LOG_INFO(MODULE, "drained: no request in flight, exiting");
            stop_now(a);
        } else if (!a->aborted && fy_clock_ns() >= a->drain_deadline_ns) {
            a->aborted = true;
            rt_abort_all(a->rt, "router drain timeout");
        }
    }
}

static void start_drain(void *arg)
{
    app_t *a = arg;
    if (a->draining)
        return;
    a->draining = true;
    rt_set_draining(a->rt, true);
    FY_LOG_INFO(MODULE, "draining: %zu request(s) in flight", rt_in_flight(a->rt));
    a->drain_deadline_ns =
        fy_clock_ns() + fy_config_duration_ms(a->cfg, "drain-timeout") * 1000000ull;
    uv_timer_start(&a->tick, on_tick, 0, 20);
}

/* The OpenAI front on --http-listen, calling this router's own gRPC port. */
static fy_status_t start_http(app_t *a, const char *rpc_host, int rpc_port, const char *name)
{
    const char *listen = fy_config_str(a->cfg, "http-listen");
    if (listen == NULL || listen[0] == '\0')
        return FY_OK;
    char host[128], upstream[192];
    int port;
    if (daemon_hostport(listen, host, sizeof(host), &port) != FY_OK) {
        FY_LOG_ERROR(MODULE, "--http-listen must be HOST:PORT");
        return FY_ERR_INVALID_ARG;
    }
    // A wildcard listener is reached on loopback.
    bool v6 = strchr(rpc_host, ':') != NULL;
    bool any = strcmp(rpc_host, "0.0.0.0") == 0 || strcmp(rpc_host, "::") == 0;
    snprintf(upstream, sizeof(upstream), v6 ? "[%s]:%d" : "%s:%d",
             any ? (v6 ? "::1" : "127.0.0.1") : rpc_host, rpc_port);
    oai_server_params_t op;
    oai_server_params_default(&op);
    op.host = host;
    op.port = port;
    op.upstream = upstream;
    op.model_name = name;
    op.metrics = a->metrics;
    op.api_key = op.upstream_token = a->api_key;
    if (a->tls.server != NULL) {
        // HTTPS with the router's certificate; the front calls the gRPC port over loopback,
        // trusting exactly that certificate whatever names it carries.
        op.tls_cert = op.upstream_tls_ca = fy_config_str(a->cfg, "tls-cert");
        op.tls_key = fy_config_str(a->cfg, "tls-key");
        op.upstream_tls_any_name = true;
    }
    fy_status_t st = oai_server_create(&a->loop, &op, &a->oai);
    if (st != FY_OK) {
        FY_LOG_ERROR(MODULE, "--http-listen %s: %s", listen, fy_status_str(st));
        return st;
    }
    port = oai_server_port(a->oai);
    if (daemon_port_file(fy_config_str(a->cfg, "http-port-file"), port) != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot write --http-port-file");
        return FY_ERR_IO;
    }
    FY_LOG_INFO(MODULE, "OpenAI-compatible API on %s://%s:%d/v1%s", op.tls_cert ? "https" : "http",
                host, port, op.api_key && op.api_key[0] ? " (API key required)" : "");
    return FY_OK;
}

static int run(app_t *a)
{
    fy_config_t *cfg = a->cfg;
    char host[128];
    int port;
    if (daemon_hostport(fy_config_str(cfg, "listen"), host, sizeof(host), &port) != FY_OK) {
        FY_LOG_ERROR(MODULE, "--listen must be HOST:PORT");
        return 2;
    }
    double budget = fy_config_double(cfg, "budget");
    int64_t retries = fy_config_int(cfg, "retries"), max_tokens = fy_config_int(cfg, "max-tokens");
    uint64_t lease = fy_config_duration_ms(cfg, "lease");
    if (!(budget >= 0 && budget <= 1) || retries < 0 || retries > 10 || max_tokens < 1 ||
        max_tokens > (1 << 20) || lease < 10 || lease > 600000) {
        FY_LOG_ERROR(MODULE, "--budget in [0, 1], --retries 0..10, --max-tokens >= 1, --lease "
                             "10 ms..10 min");
        return 2;
    }
    if (daemon_api_key(cfg, &a->api_key) != FY_OK || daemon_tls(cfg, &a->tls) != FY_OK)
        return 2;
    const char *path = fy_config_str(cfg, "model");
    char err[MDL_ERR_LEN] = "";
    fy_status_t st = mdl_gguf_open(path, &a->gguf, err, sizeof(err));
    if (st == FY_OK)
        st = mdl_tokenizer_create(a->gguf, &a->tok, err, sizeof(err));
    if (st != FY_OK) {
        FY_LOG_ERROR(MODULE, "%s: %s", path, err[0] ? err : fy_status_str(st));
        return 1;
    }
    char name[128];
    const char *mn = fy_config_str(cfg, "model-name");
    const char *gn;
    size_t gl;
    if (mn && mn[0])
        snprintf(name, sizeof(name), "%s", mn);
    else if (mdl_gguf_get_str(a->gguf, "general.name", &gn, &gl) == FY_OK && gl > 0)
        snprintf(name, sizeof(name), "%.*s", (int)FY_MIN(gl, sizeof(name) - 1), gn);
    else
        snprintf(name, sizeof(name), "%s", strrchr(path, '/') ? strrchr(path, '/') + 1 : path);

    router_registry_params_t rp;
    router_registry_params_default(&rp);
    rp.lease_ms = (uint32_t)lease;
    if ((st = router_registry_create(&rp, &a->reg)) != FY_OK ||
        (st = fy_metrics_create(&a->metrics)) != FY_OK)
        return 1;
    a->workers_prefill = fy_metrics_gauge(a->metrics, "ferry_router_workers", "role=\"prefill\"",
                                          "registered workers");
    a->workers_decode = fy_metrics_gauge(a->metrics, "ferry_router_workers", "role=\"decode\"",
                                         "registered workers");
    a->expired = fy_metrics_counter(a->metrics, "ferry_router_workers_expired_total", NULL,
                                    "workers dropped for missing heartbeats");

    rt_params_t tp;
    rt_params_default(&tp);
    tp.gguf = a->gguf;
    tp.tok = a->tok;
    tp.model_name = name;
    tp.api_key = a->api_key;
    tp.tls = a->tls.client;
    tp.reg = a->reg;
    tp.metrics = a->metrics;
    tp.default_max_tokens = (uint32_t)max_tokens;
    tp.retries = (uint32_t)retries;
    tp.reserve_lease_ms = (uint32_t)fy_config_duration_ms(cfg, "reserve-lease");
    tp.worker_timeout_ms = (uint32_t)fy_config_duration_ms(cfg, "worker-timeout");
    tp.prefill_timeout_ms = (uint32_t)FY_MIN(fy_config_duration_ms(cfg, "prefill-timeout"),
                                             (uint64_t)UINT32_MAX);
    tp.default_policy = fy_config_str(cfg, "policy");
    tp.default_budget = (float)budget;
    const char *seal = fy_config_str(cfg, "kv-seal");
    if (strcmp(seal, "on") != 0 && strcmp(seal, "off") != 0 && strcmp(seal, "auto") != 0) {
        FY_LOG_ERROR(MODULE, "--kv-seal takes on, off or auto, not \"%s\"", seal);
        return 1;
    }
    tp.kv_seal = strcmp(seal, "on") == 0 || (strcmp(seal, "auto") == 0 && a->tls.client != NULL);
    if (tp.kv_seal)
        FY_LOG_INFO(MODULE, "KV frames sealed: AES-256-GCM, a key a request (--kv-seal %s)", seal);
    if ((st = rt_create(&a->loop, &tp, &a->rt)) != FY_OK)
        return 1;

    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    if (a->api_key) { // clients and workers alike; Health stays open for probes
        sp.auth = daemon_auth;
        sp.auth_arg = (void *)a->api_key;
    }
    sp.host = host;
    sp.port = port;
    sp.max_message = 16u << 20;
    sp.metrics = a->metrics;
    sp.healthy = healthy;
    sp.healthy_arg = a;
    sp.tls = a->tls.server;
    if ((st = rpc_server_create(&a->loop, &sp, &a->srv)) != FY_OK ||
        (st = rt_serve(a->rt, a->srv)) != FY_OK ||
        (st = router_registry_serve(a->srv, a->reg)) != FY_OK) {
        FY_LOG_ERROR(MODULE, "start-up: %s", fy_status_str(st));
        return 1;
    }
    port = rpc_server_port(a->srv);
    if ((st = start_http(a, host, port, name)) != FY_OK)
        return st == FY_ERR_INVALID_ARG ? 2 : 1;
    uv_timer_init(&a->loop, &a->tick);
    a->tick.data = a;
    uv_timer_start(&a->tick, on_tick, lease, lease);
    if (daemon_signals_start(&a->sig, &a->loop, start_drain, stop_now, a) != FY_OK)
        return 1;
    if (daemon_port_file(fy_config_str(cfg, "port-file"), port) != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot write --port-file");
        return 1;
    }
    FY_LOG_INFO(MODULE, "serving %s on %s:%d%s (worker lease %llu ms)", name, host, port,
                a->tls.server ? " over TLS" : "", (unsigned long long)lease);
    uv_run(&a->loop, UV_RUN_DEFAULT);
    return 0;
}

int main(int argc, char **argv)
{
    app_t a;
    memset(&a, 0, sizeof(a));
    int rc;
    if (daemon_config(k_opts, FY_ARRAY_SIZE(k_opts), argc, argv, "ferry-router [options]",
                      "The router: clients call ferry.v1.Ferry here; prefill and decode workers "
                      "register here; each request is placed on a pair of them.",
                      &a.cfg, &rc) != FY_OK ||
        rc >= 0)
        return rc;
    uv_loop_init(&a.loop);
    rc = run(&a);
    oai_server_destroy(a.oai);
    rt_destroy(a.rt);
    rpc_server_destroy(a.srv);
    daemon_signals_close(&a.sig);
    if (a.tick.data != NULL)
        uv_close((uv_handle_t *)&a.tick, NULL);
    daemon_loop_close(&a.loop, MODULE);
    router_registry_destroy(a.reg);
    fy_metrics_destroy(a.metrics);
    mdl_tokenizer_destroy(a.tok);
    mdl_gguf_close(a.gguf);
    daemon_tls_free(&a.tls);
    fy_config_destroy(a.cfg);
    if (rc == 0)
        FY_LOG_INFO(MODULE, "stopped");
    return rc;
}
