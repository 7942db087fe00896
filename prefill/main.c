/*
 * main.c: ferry-prefill, the prefill worker daemon.
 *
 * Loads the model, serves ferry.v1.Worker Prefill/Cancel/Drain and Ferry Health on --listen
 * (plus GET /metrics and /healthz on the same port), sends KV over UCX, and registers with the
 * router (--router) with its queued prompt tokens as load. SIGTERM: tell the router, refuse
 * new prompts, finish those in hand (at most --drain-timeout), exit.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "prefill.h"
#include "router.h"

#define MODULE "prefill"

static const fy_opt_t k_opts[] = {
    {"listen", FY_OPT_STRING, "127.0.0.1:50061", "RPC address HOST:PORT (port 0 picks one)", false},
    {"advertise", FY_OPT_STRING, "", "address given to the router (default: the bound --listen)",
     false},
    {"router", FY_OPT_STRING, "", "router HOST:PORT to register with (empty: standalone)", false},
    DAEMON_OPTS_WORKER_API_KEY,
    DAEMON_OPTS_TLS,
    {"model", FY_OPT_STRING, NULL, "GGUF model file", true},
    {"device", FY_OPT_STRING, "cpu",
     "where the model runs: cpu or cuda (with cuda the codec "
     "scores and encodes on the GPU too)",
     false},
    {"host-codec", FY_OPT_BOOL, "false",
     "with --device cuda, score and encode on the CPU "
     "instead (from host copies of each layer)",
     false},
    {"threads", FY_OPT_INT, "0", "compute threads (0 = all CPUs)", false},
    {"prefill-chunk", FY_OPT_INT, "0", "prompt rows per GEMM chunk (0 = model default)", false},
    {"max-batch-tokens", FY_OPT_INT, "2048",
     "queued prompts run together up to this many "
     "tokens (a longer prompt runs alone; 1 = one "
     "prompt at a time)",
     false},
    {"policy", FY_OPT_STRING, "ferry", "default codec policy: a built-in name or a JSON file",
     false},
    {"budget", FY_OPT_DOUBLE, "0", "default budget b in (0, 1]; 0 = the policy's", false},
    {"calibration", FY_OPT_STRING, "",
     "calibration file of the model (`ferry calibrate`'s "
     ".calibration.json) for the default policy: per-layer "
     "weights, starting multipliers",
     false},
    {"ttft-target", FY_OPT_DURATION, "0",
     "bandwidth-adaptive budget: pick b per request so "
     "the KV transfer fits this TTFT (0 = off)",
     false},
    {"min-budget", FY_OPT_DOUBLE, "0.125", "lowest adaptive budget", false},
    {"max-budget", FY_OPT_DOUBLE, "1", "highest adaptive budget", false},
    {"max-queued-tokens", FY_OPT_INT, "0",
     "refuse prompts beyond this many queued tokens "
     "(0 = no limit)",
     false},
    {"worker-id", FY_OPT_STRING, "", "id in the cluster (default prefill@ADVERTISE)", false},
    {"heartbeat", FY_OPT_DURATION, "0", "heartbeat period (0 = half the router's lease)", false},
    {"drain-timeout", FY_OPT_DURATION, "30s", "longest wait for work in hand at SIGTERM", false},
    {"ucx-tls", FY_OPT_STRING, "", "UCX transports (as UCX_TLS), empty = UCX's choice", false},
    {"ucx-devices", FY_OPT_STRING, "", "UCX devices (as UCX_NET_DEVICES)", false},
    {"pair-link", FY_OPT_STRING, "auto",
     "KV link with decode workers of this node: auto (nccl on GPUs), nccl, socket, off", false},
    {"node-id", FY_OPT_STRING, "", "node identity for pairing (default: the kernel's boot id)",
     false},
    {"port-file", FY_OPT_STRING, "", "write the bound RPC port to this file", false},
    {"test-corrupt-frames", FY_OPT_INT, "0",
     "test hook: damage one KV frame of each of the "
     "first N requests",
     false},
    {"log-format", FY_OPT_STRING, "text", "text or json", false},
    {"log-level", FY_OPT_STRING, "", "trace|debug|info|warn|error (default info or $FERRY_LOG)",
     false},
};

typedef struct {
    uv_loop_t loop;
    fy_config_t *cfg;
    mdl_model_t *model;
    fy_metrics_t *metrics;
    kvlink_ctx_t *kctx;
    kvlink_t *link;
    rpc_server_t *srv;
    prefill_t *pf;
    router_agent_t *agent;
    daemon_tls_t tls; // --tls-*: the RPC port, the calls to the router
    daemon_signals_t sig;
    uv_timer_t poll_timer;
    uint64_t drain_deadline_ns;
    bool draining;
    bool aborted;
    bool stopping;
} app_t;

static void fill_load(void *arg, router_load_t *load)
{
    app_t *a = arg;
    uint64_t q = prefill_queued_tokens(a->pf);
    load->queued_prefill_tokens = q > UINT32_MAX ? UINT32_MAX : (uint32_t)q;
    load->running_sequences = (uint32_t)prefill_in_flight(a->pf);
}

static bool healthy(void *arg)
{
    app_t *a = arg;
    return !a->draining;
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
    uv_timer_stop(&a->poll_timer);
    if (!a->aborted) {
        a->aborted = true;
        prefill_abort_all(a->pf, "stopping");
    }
    rpc_server_shutdown(a->srv, 500, on_server_drained, a);
}

/* While draining: once nothing is in hand, close the server; past the deadline, abort. */
static void on_poll(uv_timer_t *t)
{
    app_t *a = t->data;
    if (prefill_in_flight(a->pf) == 0) {
        FY_LOG_INFO(MODULE, "drained: nothing in hand, exiting");
        stop_now(a);
        return;
    }
    if (!a->aborted && fy_clock_ns() >= a->drain_deadline_ns) {
        a->aborted = true;
        prefill_abort_all(a->pf, "drain timeout");
    }
}

static void start_drain(void *arg)
{
    app_t *a = arg;
    if (a->draining)
        return;
    a->draining = true;
    prefill_set_draining(a->pf, true);
    router_agent_set_draining(a->agent, true);
    a->drain_deadline_ns =
        fy_clock_ns() + fy_config_duration_ms(a->cfg, "drain-timeout") * 1000000ull;
    uv_timer_start(&a->poll_timer, on_poll, 0, 20);
}

static fy_status_t load_policy(const char *spec, kvc_policy_t *policy)
{
    if (kvc_policy_builtin(spec, policy) == FY_OK)
        return FY_OK;
    char err[256] = "";
    fy_status_t st = kvc_policy_load_file(spec, policy, err, sizeof(err));
    if (st != FY_OK)
        FY_LOG_ERROR(MODULE, "--policy %s: not a built-in policy, and as a file: %s", spec,
                     err[0] ? err : fy_status_str(st));
    return st;
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
    if (!(budget >= 0 && budget <= 1)) {
        FY_LOG_ERROR(MODULE, "--budget must be in (0, 1] (0 = the policy's)");
        return 2;
    }
    kvc_policy_t policy;
    if (load_policy(fy_config_str(cfg, "policy"), &policy) != FY_OK)
        return 2;
    const char *calib = fy_config_str(cfg, "calibration");
    if (calib != NULL && calib[0] != '\0') {
        char cerr[512] = "";
        fy_status_t cst = kvc_policy_load_calibration(calib, &policy, cerr, sizeof(cerr));
        if (cst != FY_OK) {
            FY_LOG_ERROR(MODULE, "--calibration: %s", cerr[0] ? cerr : fy_status_str(cst));
            return 2;
        }
    }

    char err[MDL_ERR_LEN] = "";
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = fy_config_str(cfg, "model");
    if (mdl_device_parse(fy_config_str(cfg, "device"), &mp.device) != FY_OK) {
        FY_LOG_ERROR(MODULE, "--device takes cpu or cuda");
        return 2;
    }
    uint64_t t0 = fy_clock_ns();
    fy_status_t st = mdl_model_create(&mp, &a->model, err, sizeof(err));
    if (st != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot load %s: %s", mp.path, err[0] ? err : fy_status_str(st));
        return 1;
    }
    uv_update_time(&a->loop); // timers started from here on count from now, not before the load
    uint64_t fingerprint = mdl_model_fingerprint(a->model);
    const mdl_config_t *mc = mdl_model_config(a->model);
    FY_LOG_INFO(MODULE, "model %s loaded on the %s in %.0f ms: %d layers, %d kv heads x %d, "
                        "fingerprint %016llx",
                mp.path, mp.device == MDL_DEVICE_CUDA ? "GPU" : "CPU",
                (fy_clock_ns() - t0) / 1e6, mc->n_layers, mc->n_kv_heads, mc->head_dim,
                (unsigned long long)fingerprint);

    // A calibration is per model: refuse one measured on a model of another depth here,
    // rather than fail every request's encoder.
    if (policy.n_layer_weights != 0 && policy.n_layer_weights != (uint32_t)mc->n_layers) {
        FY_LOG_ERROR(MODULE, "calibration has %u layer weights, the model has %d layers",
                     policy.n_layer_weights, mc->n_layers);
        return 2;
    }
    if (fy_metrics_create(&a->metrics) != FY_OK)
        return 1;
    kvlink_ctx_params_t kcp;
    kvlink_ctx_params_default(&kcp);
    const char *tls = fy_config_str(cfg, "ucx-tls"), *dev = fy_config_str(cfg, "ucx-devices");
    kcp.tls = tls && tls[0] ? tls : NULL;
    kcp.net_devices = dev && dev[0] ? dev : NULL;
    if ((st = kvlink_ctx_create(&kcp, &a->kctx)) != FY_OK) {
        FY_LOG_ERROR(MODULE, "UCX context: %s", fy_status_str(st));
        return 1;
    }
    kvlink_params_t kp;
    kvlink_params_default(&kp);
    kp.compat.codec_version = KVC_FRAME_VERSION;
    kp.compat.model_fingerprint = fingerprint;
    kp.recv_pool_bytes = 0; // sends only
    if ((st = kvlink_create(a->kctx, &a->loop, &kp, &a->link)) != FY_OK) {
        FY_LOG_ERROR(MODULE, "UCX worker: %s", fy_status_str(st));
        return 1;
    }

    const char *api_key;
    if (daemon_api_key(cfg, &api_key) != FY_OK || daemon_tls(cfg, &a->tls) != FY_OK)
        return 2;
    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    if (api_key != NULL) { // the router's calls carry the key; Health stays open
        sp.auth = daemon_auth;
        sp.auth_arg = (void *)api_key;
    }
    sp.host = host;
    sp.port = port;
    sp.max_message = 64u << 20; // long prompts as token ids
    sp.metrics = a->metrics;
    sp.healthy = healthy;
    sp.healthy_arg = a;
    sp.tls = a->tls.server;
    if ((st = rpc_server_create(&a->loop, &sp, &a->srv)) != FY_OK)
        return 1;
    port = rpc_server_port(a->srv);

    prefill_params_t pp;
    prefill_params_default(&pp);
    pp.model = a->model;
    pp.fingerprint = fingerprint;
    pp.n_threads = (int)fy_config_int(cfg, "threads");
    pp.prefill_chunk = (int)fy_config_int(cfg, "prefill-chunk");
    int64_t mbt = fy_config_int(cfg, "max-batch-tokens");
    if (mbt < 1 || mbt > (1 << 24)) {
        FY_LOG_ERROR(MODULE, "--max-batch-tokens must be in [1, 16777216]");
        return 2;
    }
    pp.max_batch_tokens = (int)mbt;
    pp.policy = &policy;
    pp.budget = budget > 0 ? budget : -1;
    pp.link = a->link;
    pp.metrics = a->metrics;
    pp.max_queued_tokens = (uint64_t)fy_config_int(cfg, "max-queued-tokens");
    pp.host_codec = fy_config_bool(cfg, "host-codec");
    pp.ttft_target_ms = (double)fy_config_duration_ms(cfg, "ttft-target");
    pp.budget_min = fy_config_double(cfg, "min-budget");
    pp.budget_max = fy_config_double(cfg, "max-budget");
    if (pp.ttft_target_ms > 0 && !(pp.budget_min > 0 && pp.budget_min <= pp.budget_max &&
                                   pp.budget_max <= 1)) {
        FY_LOG_ERROR(MODULE, "need 0 < --min-budget <= --max-budget <= 1");
        return 1;
    }
    kvlink_pair_identity_t pairing;
    char perr[96] = "";
    pp.pair_device = 0; // the model's GPU: the first visible one
    if ((st = kvlink_pair_identity(fy_config_str(cfg, "pair-link"),
                                   fy_config_str(cfg, "node-id"),
                                   mdl_model_device(a->model) == MDL_DEVICE_CUDA, pp.pair_device,
                                   &pairing, perr, sizeof(perr))) != FY_OK) {
        FY_LOG_ERROR(MODULE, "--pair-link / --node-id: %s", perr);
        return 2;
    }
    pp.pair_kind = pairing.kind;
    int64_t corrupt = fy_config_int(cfg, "test-corrupt-frames");
    pp.test_corrupt_frames = corrupt > 0 && corrupt < (1 << 30) ? (uint32_t)corrupt : 0;
    if ((st = prefill_create(&a->loop, &pp, &a->pf)) != FY_OK ||
        (st = prefill_serve(a->pf, a->srv)) != FY_OK ||
        (st = daemon_health_serve(a->srv, "prefill", &a->draining)) != FY_OK) {
        FY_LOG_ERROR(MODULE, "start-up: %s", fy_status_str(st));
        return 1;
    }
    FY_LOG_INFO(MODULE, "serving on %s:%d (policy %s, budget %s)", host, port, policy.name,
                budget > 0 ? fy_config_str(cfg, "budget") : "policy's");

    char advertise[160];
    const char *adv = fy_config_str(cfg, "advertise");
    if (adv && adv[0])
        snprintf(advertise, sizeof(advertise), "%s", adv);
    else
        snprintf(advertise, sizeof(advertise), "%s:%d",
                 strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0 ? "127.0.0.1" : host,
                 port);
    const char *router = fy_config_str(cfg, "router");
    if (router && router[0]) {
        router_agent_params_t ap;
        memset(&ap, 0, sizeof(ap));
        ap.router_address = router;
        const char *wid = fy_config_str(cfg, "worker-id");
        ap.worker_id = wid && wid[0] ? wid : NULL;
        ap.role = ROUTER_ROLE_PREFILL;
        ap.rpc_address = advertise;
        ap.model_name = mp.path;
        ap.api_key = api_key;
        ap.tls = a->tls.client;
        ap.pair_link = kvlink_pair_kind_name(pairing.kind);
        ap.node_id = pairing.node_id;
        ap.pair_device = pairing.pair_device;
        ap.model_fingerprint = fingerprint;
        ap.heartbeat_ms = (uint32_t)fy_config_duration_ms(cfg, "heartbeat");
        ap.load = fill_load;
        ap.load_arg = a;
        if ((st = router_agent_create(&a->loop, &ap, &a->agent)) != FY_OK) {
            FY_LOG_ERROR(MODULE, "--router %s: %s", router, fy_status_str(st));
            return 2;
        }
    }
    uv_timer_init(&a->loop, &a->poll_timer);
    a->poll_timer.data = a;
    if (daemon_signals_start(&a->sig, &a->loop, start_drain, stop_now, a) != FY_OK)
        return 1;
    if (daemon_port_file(fy_config_str(cfg, "port-file"), port) != FY_OK) {
        FY_LOG_ERROR(MODULE, "cannot write --port-file");
        return 1;
    }
    uv_run(&a->loop, UV_RUN_DEFAULT);
    return 0;
}

int main(int argc, char **argv)
{
    app_t a;
    memset(&a, 0, sizeof(a));
    int rc;
    if (daemon_config(k_opts, FY_ARRAY_SIZE(k_opts), argc, argv, "ferry-prefill [options]",
                      "The prefill worker: runs prompts, encodes each layer's KV with kvcodec "
                      "and sends it over UCX to the decode worker the router names.",
                      &a.cfg, &rc) != FY_OK ||
        rc >= 0)
        return rc;
    uv_loop_init(&a.loop);
    rc = run(&a);
    // Tear down outside uv_run: kvlink_destroy runs the loop itself.
    prefill_destroy(a.pf);
    router_agent_destroy(a.agent);
    rpc_server_destroy(a.srv);
    kvlink_destroy(a.link);
    daemon_signals_close(&a.sig);
    if (a.poll_timer.data != NULL)
        uv_close((uv_handle_t *)&a.poll_timer, NULL);
    daemon_loop_close(&a.loop, MODULE);
    kvlink_ctx_destroy(a.kctx);
    mdl_model_destroy(a.model);
    fy_metrics_destroy(a.metrics);
    daemon_tls_free(&a.tls);
    fy_config_destroy(a.cfg);
    if (rc == 0)
        FY_LOG_INFO(MODULE, "stopped");
    return rc;
}
