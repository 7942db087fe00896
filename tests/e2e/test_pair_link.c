// Pair links in the daemons end to end, over the socket link (nccl_link_sock.c: the NCCL
// link's protocol with frames in host memory, so it runs without GPUs): ferry-router,
// ferry-prefill and ferry-decode as child processes of one node, the workers with
// --pair-link socket, the real model (missing model = failure).
// - the first request goes over UCX while its ReserveKV starts the pair; from then on every
//   layer's frame comes over the pair, and greedy fp16 output is the same token for token;
// - compressed KV (the ferry policy) and concurrent streams over the pair; afterwards the decode
//   pool has every page back;
// - prefill workers that cannot pair with the decode worker (--pair-link off; another node id)
//   are served over UCX;
// - a prefill worker killed: the decode worker's pair with it fails, a new prefill worker gets
//   a pair of its own and the KV goes over it again.
// Built as test_pair_link_cuda (FERRY_PAIR_TEST_NCCL), or given the argument "nccl", the same
// runs over NCCL between two GPUs of this machine (prefill on GPU 0, decode on GPU 1,
// --device cuda): the production path. It needs two GPUs and exits 77 (skipped) with fewer;
// the offline bundle ships it with the other CUDA tests.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "client_util.h"
#include "model.h"

static struct {
    const char *link; // "socket" or "nccl"
    const char *device;
    const char *model_path;
    int n_layers;
    du_proc_t router, prefill, decode;
    char router_addr[32];
    ferry_client_t *client;
    uint32_t first_ids[64]; // fp16 greedy output of the reference prompt, over UCX
    size_t n_first;
} G;

static const char k_prompt[] = "The capital of France is";

static double decode_metric(const char *name)
{
    return du_metric(G.decode.port, name);
}

static bool workers_ready(int n_prefill, uint32_t timeout_ms)
{
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    while (fy_clock_ns() < end) {
        Ferry__V1__HealthResponse *h = NULL;
        ferry_error_t err;
        bool serving = false;
        if (ferry_health(G.client, NULL, &h, &err) == 0) {
            serving = h->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
            ferry_message_free(h);
        }
        if (du_metric(G.router.port, "ferry_router_workers{role=\"prefill\"}") == n_prefill &&
            (n_prefill == 0 || serving))
            return true;
        fy_sleep_ns(100 * 1000000ull);
    }
    return false;
}

/* A prefill worker with --pair-link pair_link, on node node_id (NULL: this machine's). */
static fy_status_t start_prefill(du_proc_t *p, const char *pair_link, const char *node_id)
{
    const char *args[] = {"--model", G.model_path, "--router", G.router_addr, "--threads", "1",
                          "--device", G.device, "--pair-link", pair_link, "--log-level", "info",
                          node_id != NULL ? "--node-id" : NULL, node_id, NULL};
    setenv("CUDA_VISIBLE_DEVICES", "0", 1); // nccl: one GPU per worker
    fy_status_t st = du_start(p, "prefill", "prefill/ferry-prefill", args, 120000);
    unsetenv("CUDA_VISIBLE_DEVICES");
    return st;
}

static int group_setup(void **state)
{
    (void)state;
    G.model_path = du_model_path();
    if (G.model_path == NULL)
        return -1;
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = G.model_path;
    mdl_model_t *model = NULL;
    char err[MDL_ERR_LEN];
    if (mdl_model_create(&mp, &model, err, sizeof(err)) != FY_OK)
        return -1;
    G.n_layers = mdl_model_config(model)->n_layers;
    mdl_model_destroy(model);

    const char *rargs[] = {"--model", G.model_path, "--lease", "500ms", "--reserve-lease", "10m",
                           "--log-level", "warn", NULL};
    if (du_start(&G.router, "router", "router/ferry-router", rargs, 60000) != FY_OK) {
        du_dump_log(&G.router);
        return -1;
    }
    snprintf(G.router_addr, sizeof(G.router_addr), "127.0.0.1:%d", G.router.port);
    char listen[32], kv[32];
    int port = du_free_port();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    snprintf(kv, sizeof(kv), "127.0.0.1:%d", du_free_port());
    const char *dargs[] = {"--model", G.model_path, "--listen", listen, "--kv-listen", kv,
                           "--router", G.router_addr, "--threads", "1", "--kv-memory", "256M",
                           "--page-bytes", "8K", "--device", G.device, "--pair-link", G.link,
                           "--log-level", "info", NULL};
    setenv("CUDA_VISIBLE_DEVICES", "1", 1);
    fy_status_t st = du_start_ex(&G.decode, "decode", "decode/ferry-decode", dargs, false, 0);
    unsetenv("CUDA_VISIBLE_DEVICES");
    if (st != FY_OK)
        return -1;
    G.decode.port = port;
    if (start_prefill(&G.prefill, G.link, NULL) != FY_OK) {
        du_dump_log(&G.prefill);
        return -1;
    }
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router_addr;
    p.timeout_ms = 120000;
    if (ferry_client_create(&p, &G.client) != 0)
        return -1;
    if (!workers_ready(1, 180000)) {
        fprintf(stderr, "the router never had a prefill and a decode worker\n");
        du_dump_log(&G.router);
        du_dump_log(&G.decode);
        du_dump_log(&G.prefill);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    ferry_client_destroy(G.client);
    du_kill(&G.router);
    du_kill(&G.prefill);
    du_kill(&G.decode);
    return 0;
}

typedef struct {
    uint32_t ids[256];
    size_t n_ids;
    Ferry__V1__RequestStats stats;
    bool have_stats;
} gen_t;

static int on_chunk(void *arg, const Ferry__V1__GenerateResponse *m)
{
    gen_t *g = arg;
    for (size_t i = 0; i < m->n_token_ids && g->n_ids < 256; i++)
        g->ids[g->n_ids++] = m->token_ids[i];
    if (m->stats != NULL) {
        g->stats = *m->stats;
        g->stats.prefill_worker = g->stats.decode_worker = g->stats.policy = NULL;
        g->have_stats = true;
    }
    return 0;
}

/* Greedy generation of prompt with policy (max tokens, EOS ignored); asserts it succeeded. */
static void generate(const char *prompt, const char *policy, float budget, uint32_t max_tokens,
                     gen_t *g)
{
    Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
    Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
    Ferry__V1__CodecParams codec = FERRY__V1__CODEC_PARAMS__INIT;
    req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
    req.prompt = (char *)prompt;
    s.temperature = 0;
    s.max_tokens = max_tokens;
    s.ignore_eos = true;
    req.sampling = &s;
    codec.policy = (char *)policy;
    codec.budget = budget;
    req.codec = &codec;
    req.return_token_ids = true;
    memset(g, 0, sizeof(*g));
    ferry_error_t err;
    int code = ferry_generate(G.client, &req, on_chunk, g, &err);
    if (code != 0) {
        fprintf(stderr, "Generate: %s %s\n", ferry_code_name(code), err.message);
        du_dump_log(&G.decode);
        du_dump_log(&G.prefill);
    }
    assert_int_equal(code, 0);
    assert_int_equal(g->n_ids, max_tokens);
}

/* Waits until the decode worker has n pairs up. */
static bool pairs_up(int n, uint32_t timeout_ms)
{
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    while (decode_metric("ferry_decode_pairs_up") != n && fy_clock_ns() < end)
        fy_sleep_ns(20 * 1000000ull);
    return decode_metric("ferry_decode_pairs_up") == n;
}

/* The reference prompt again: the same tokens as over UCX, and every layer over the pair. */
static void expect_over_pair(void)
{
    double frames0 = decode_metric("ferry_decode_pair_frames_total");
    gen_t g;
    generate(k_prompt, "fp16", 0, 12, &g);
    double frames = decode_metric("ferry_decode_pair_frames_total") - frames0;
    fprintf(stderr, "over the pair: %.0f frames, ttft %.1f ms, transfer %.1f ms\n", frames,
            g.stats.ttft_ms, g.stats.transfer_ms);
    assert_int_equal((int)frames, G.n_layers);
    assert_int_equal(g.n_ids, G.n_first);
    for (size_t i = 0; i < g.n_ids; i++)
        assert_int_equal(g.ids[i], G.first_ids[i]);
}

static void test_pair_after_first_request(void **state)
{
    (void)state;
    assert_true(decode_metric("ferry_decode_pair_frames_total") == 0);
    // The first reservation starts the pair; its own KV goes over UCX.
    gen_t g;
    generate(k_prompt, "fp16", 0, 12, &g);
    assert_true(decode_metric("ferry_decode_pair_frames_total") == 0);
    assert_true(decode_metric("ferry_decode_pairs_created_total") == 1);
    memcpy(G.first_ids, g.ids, g.n_ids * sizeof(uint32_t));
    G.n_first = g.n_ids;
    // The prefill worker joins as its Prefill call arrives: the next request goes over the
    // pair once both ends finished the handshake (a few milliseconds).
    assert_true(pairs_up(1, 30000));
    expect_over_pair();
    expect_over_pair();
    assert_true(decode_metric("ferry_decode_pairs_created_total") == 1);
}

static void test_compressed_and_concurrent(void **state)
{
    (void)state;
    // Compressed KV: the frames are smaller, and go over the pair the same way.
    char prompt[2048] = "Summarize the following notes.\n";
    for (int i = 0; i < 6; i++)
        strcat(prompt, "The river rose two meters after the storm and the bridge was closed. ");
    double frames0 = decode_metric("ferry_decode_pair_frames_total");
    gen_t g;
    generate(prompt, "ferry", 0.25f, 8, &g);
    assert_true(g.have_stats);
    double ratio = (double)g.stats.kv_wire_bytes / (double)g.stats.kv_raw_bytes;
    fprintf(stderr, "ferry b=0.25 over the pair: %.4f of FP16\n", ratio);
    assert_true(ratio <= 0.25 * 1.01 && ratio >= 0.25 * 0.8);
    assert_int_equal((int)(decode_metric("ferry_decode_pair_frames_total") - frames0),
                     G.n_layers);

    // Concurrent streams share the pair: credits, several requests per round.
    enum { N = 12 };
    frames0 = decode_metric("ferry_decode_pair_frames_total");
    assert_int_equal(du_concurrent_streams(G.router_addr, N, 5), N);
    assert_int_equal((int)(decode_metric("ferry_decode_pair_frames_total") - frames0),
                     N * G.n_layers);
    // Every page came back.
    uint64_t end = fy_clock_ns() + 10000000000ull;
    while (decode_metric("ferry_decode_free_pages") != decode_metric("ferry_decode_total_pages") &&
           fy_clock_ns() < end)
        fy_sleep_ns(50 * 1000000ull);
    assert_true(decode_metric("ferry_decode_free_pages") ==
                decode_metric("ferry_decode_total_pages"));
}

static void test_unpaired_and_killed_prefill(void **state)
{
    (void)state;
    // The pairing prefill worker dies (its pair goes down); ones that cannot pair with the
    // decode worker take over in turn (no pair link; another node): UCX only.
    kill(G.prefill.pid, SIGKILL);
    du_wait(&G.prefill, 5000);
    assert_true(pairs_up(0, 30000));
    assert_true(workers_ready(0, 10000));
    double frames0 = decode_metric("ferry_decode_pair_frames_total");
    const char *const links[2] = {"off", G.link};
    static const char *const nodes[2] = {NULL, "another-node"};
    for (int i = 0; i < 2; i++) {
        du_proc_t plain;
        assert_int_equal(start_prefill(&plain, links[i], nodes[i]), FY_OK);
        assert_true(workers_ready(1, 180000));
        gen_t g;
        generate(k_prompt, "fp16", 0, 12, &g);
        assert_true(decode_metric("ferry_decode_pair_frames_total") == frames0);
        assert_true(decode_metric("ferry_decode_pairs_created_total") == 1);
        assert_int_equal(g.n_ids, G.n_first);
        assert_memory_equal(g.ids, G.first_ids, g.n_ids * sizeof(uint32_t));
        assert_int_equal(du_stop(&plain, 30000), 0);
        assert_true(workers_ready(0, 10000));
    }

    // A new pairing prefill worker gets a pair of its own.
    gen_t g;
    assert_int_equal(start_prefill(&G.prefill, G.link, NULL), FY_OK);
    assert_true(workers_ready(1, 180000));
    generate(k_prompt, "fp16", 0, 12, &g); // over UCX; starts the new pair
    assert_true(decode_metric("ferry_decode_pair_frames_total") == frames0);
    assert_true(decode_metric("ferry_decode_pairs_created_total") == 2);
    assert_true(pairs_up(1, 30000)); // the dead worker's pair is down, the new one up
    expect_over_pair();
}

int main(int argc, char **argv)
{
#ifdef FERRY_PAIR_TEST_NCCL
    bool nccl = true;
#else
    bool nccl = argc > 1 && strcmp(argv[1], "nccl") == 0;
#endif
    G.link = nccl ? "nccl" : "socket";
    G.device = "cpu";
    if (strcmp(G.link, "nccl") == 0) {
        if (fy_cuda_device_count() < 2) {
            // The GPU check (scripts/gpu-check.sh) reads "needs two GPUs" as a skip that is due.
            fprintf(stderr, "skipped: the NCCL pair test needs two GPUs, this machine has %d\n",
                    fy_cuda_device_count());
            return 77;
        }
        G.device = "cuda";
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pair_after_first_request),
        cmocka_unit_test(test_compressed_and_concurrent),
        cmocka_unit_test(test_unpaired_and_killed_prefill),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
