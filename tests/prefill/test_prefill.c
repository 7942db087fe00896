// ferry-prefill as a child process with the real model, against a kvlink receiver and an RPC
// client in this test: the frames of Worker.Prefill arrive under the reservation id, parse,
// carry the model fingerprint and place into a kvcodec sequence; FP16 frames hold the model's
// K and V; the first token is the model's (greedy and seeded sampling); the ferry policy keeps
// the budget; bad requests are refused; Cancel, deadlines and an unreachable decode worker end
// the call with the right status and the worker keeps serving; requests queued together run
// as a batch and complete (or are cancelled) one by one; /metrics; SIGTERM drains. The frames
// of a ferry request are byte for byte what the CPU encoder makes of the local prefill's layers.
//
// Built a second time as test_prefill_cuda (PREFILL_TEST_CUDA): the same checks with the
// worker on the GPU (--device cuda: model, scoring and encoding there) and the local reference
// on the GPU too, so both see the same K, V and logits; the GPU encoder's frames must still
// equal the CPU encoder's given the GPU's scores (the scorers agree to fp32 rounding only, which
// may tip a choice). Exits 77 without a GPU; the model comes from $FERRY_MODEL when set.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include "daemon_util.h"
#include "ferry.pb-c.h"
#include "kvcodec.h"
#include "kvlink.h"
#include "model.h"
#include "prefill.h"
#include "prefill_frames.h"

#define MAX_LAYERS 64

#ifndef PREFILL_TEST_CUDA
#define PREFILL_TEST_CUDA 0
#endif

typedef struct {
    uint64_t req;
    uint8_t *frames[MAX_LAYERS];
    size_t lens[MAX_LAYERS];
    int n_frames;
    int bad_layer; // frames whose layer did not match the arrival order
    bool ended;
    fy_status_t end_st;
} recv_t;

static struct {
    mdl_model_t *model;
    const mdl_config_t *cfg;
    uint64_t fp;
    mdl_ctx_t *ctx;
    du_proc_t proc;
    uv_loop_t loop;
    bool loop_ready;
    kvlink_ctx_t *kctx;
    kvlink_t *link;
    char kv_addr[64];
    rpc_channel_t *ch;
    recv_t recv;
    uint64_t next_res;
    struct {
        uint64_t req;
        int n_frames;
        bool ended;
        fy_status_t end_st;
    } multi[16]; // requests followed at the same time (req 0 = unused)
} G;

static int multi_find(uint64_t req)
{
    for (int i = 0; i < (int)FY_ARRAY_SIZE(G.multi); i++) {
        if (G.multi[i].req == req && req != 0)
            return i;
    }
    return -1;
}

static void on_frame(kvlink_t *link, uint64_t request_id, uint32_t layer, kvlink_buf_t *buf,
                     const void *data, size_t len, void *arg)
{
    recv_t *r = &G.recv;
    int mi = multi_find(request_id);
    if (mi >= 0)
        G.multi[mi].n_frames++;
    if (request_id == r->req && r->n_frames < MAX_LAYERS) {
        if (layer != (uint32_t)r->n_frames)
            r->bad_layer++;
        r->frames[r->n_frames] = malloc(len);
        memcpy(r->frames[r->n_frames], data, len);
        r->lens[r->n_frames] = len;
        r->n_frames++;
    }
    kvlink_buf_release(buf);
}

static void on_recv_end(kvlink_t *link, uint64_t request_id, fy_status_t st, void *arg)
{
    int mi = multi_find(request_id);
    if (mi >= 0) {
        G.multi[mi].ended = true;
        G.multi[mi].end_st = st;
    }
    if (request_id == G.recv.req) {
        G.recv.ended = true;
        G.recv.end_st = st;
    }
}

static void recv_reset(uint64_t req)
{
    for (int i = 0; i < G.recv.n_frames; i++)
        free(G.recv.frames[i]);
    memset(&G.recv, 0, sizeof(G.recv));
    G.recv.req = req;
}

static int32_t *tokenize(const char *text, int *n_p)
{
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    size_t n = 0;
    mdl_tokenizer_encode(tok, text, strlen(text), false, NULL, 0, &n);
    int32_t *ids = malloc((n + 1) * sizeof(int32_t));
    size_t off = mdl_tokenizer_add_bos(tok) ? 1 : 0;
    assert_int_equal(mdl_tokenizer_encode(tok, text, strlen(text), false, ids + off, n, &n),
                     FY_OK);
    if (off)
        ids[0] = mdl_tokenizer_bos(tok);
    *n_p = (int)(n + off);
    return ids;
}

/* A prompt of about n tokens. */
static int32_t *long_prompt(int n_words, int *n_p)
{
    size_t cap = (size_t)n_words * 16 + 1;
    char *text = malloc(cap);
    text[0] = '\0';
    static const char *const words[] = {"river", "stone", "cloud", "lamp", "garden", "window"};
    for (int i = 0; i < n_words; i++) {
        strcat(text, " ");
        strcat(text, words[(i * 7 + i / 3) % 6]);
    }
    int32_t *ids = tokenize(text, n_p);
    free(text);
    return ids;
}

/* Local prefill: logits of the last position and, when k0/v0 are set, layer 0's K and V. */
typedef struct {
    float *k0, *v0;
} capture_t;

static fy_status_t capture_layer(void *arg, const mdl_layer_kv_t *kv)
{
    capture_t *c = arg;
    if (kv->layer == 0 && c->k0 != NULL) {
        size_t n = (size_t)kv->n_kv_heads * kv->n_tokens * kv->head_dim;
        memcpy(c->k0, kv->k, n * sizeof(float));
        memcpy(c->v0, kv->v, n * sizeof(float));
    }
    return FY_OK;
}

static void local_prefill(const int32_t *ids, int n, float *logits, capture_t *cap)
{
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.on_layer = capture_layer;
    pp.cb_arg = cap;
    assert_int_equal(mdl_prefill(G.ctx, ids, n, &pp, logits), FY_OK);
}

static int32_t argmax(const float *x, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

typedef struct {
    const int32_t *ids;
    int n;
    const char *policy;
    float budget;
    Ferry__V1__SamplingParams *sampling;
    const char *kv_addr; // NULL = the test's receiver
    uint32_t timeout_ms;
    bool expect; // register the reservation with the receiver first
    bool cancel_after_first_frame;
} call_t;

/* Worker.Cancel for a request id; waits for the answer. */
static void send_cancel(const char *rid)
{
    Ferry__V1__CancelRequest creq = FERRY__V1__CANCEL_REQUEST__INIT;
    creq.request_id = (char *)rid;
    du_result_t cr = {0};
    assert_int_equal(rpc_channel_call(G.ch, "/ferry.v1.Worker/Cancel", &creq.base,
                                      &ferry__v1__cancel_response__descriptor, NULL, du_on_msg,
                                      du_on_done, &cr, NULL),
                     FY_OK);
    while (!cr.done)
        uv_run(&G.loop, UV_RUN_ONCE);
    assert_int_equal(cr.code, RPC_CODE_OK);
    du_result_clear(&cr);
}

static void do_prefill(const call_t *c, du_result_t *r, uint64_t *res_p)
{
    uint64_t res = ++G.next_res;
    recv_reset(res);
    if (c->expect) {
        kvlink_recv_params_t rp;
        kvlink_recv_params_default(G.link, &rp);
        assert_int_equal(kvlink_recv_expect(G.link, res, &rp), FY_OK);
    }
    Ferry__V1__PrefillRequest req = FERRY__V1__PREFILL_REQUEST__INIT;
    Ferry__V1__CodecParams codec = FERRY__V1__CODEC_PARAMS__INIT;
    char rid[32];
    snprintf(rid, sizeof(rid), "req-%llu", (unsigned long long)res);
    req.request_id = rid;
    uint32_t *ids = malloc((size_t)(c->n ? c->n : 1) * sizeof(uint32_t));
    for (int i = 0; i < c->n; i++)
        ids[i] = (uint32_t)c->ids[i];
    req.prompt_token_ids = ids;
    req.n_prompt_token_ids = (size_t)c->n;
    codec.policy = (char *)(c->policy ? c->policy : "");
    codec.budget = c->budget;
    req.codec = &codec;
    req.sampling = c->sampling;
    req.decode_kv_address = (char *)(c->kv_addr ? c->kv_addr : G.kv_addr);
    req.reservation_id = res;
    // Waits for the connection rather than failing fast: on a loaded machine the worker's
    // first HTTP/2 handshake can outlast the channel's connect timeout.
    rpc_call_opts_t opts = {.timeout_ms = c->timeout_ms ? c->timeout_ms : 120000,
                            .wait_for_ready = true};
    memset(r, 0, sizeof(*r));
    assert_int_equal(rpc_channel_call(G.ch, "/ferry.v1.Worker/Prefill", &req.base,
                                      &ferry__v1__prefill_response__descriptor, &opts, du_on_msg,
                                      du_on_done, r, NULL),
                     FY_OK);
    free(ids);
    bool cancelled = false;
    while (!r->done) {
        uv_run(&G.loop, UV_RUN_ONCE);
        if (c->cancel_after_first_frame && !cancelled && G.recv.n_frames > 0) {
            cancelled = true;
            send_cancel(rid);
        }
    }
    if (res_p)
        *res_p = res;
}

/* Lets the loop run until the receiver saw the request's end (or 5 s). */
static void wait_recv_end(void)
{
    uint64_t end = fy_clock_ns() + 5000000000ull;
    while (!G.recv.ended && fy_clock_ns() < end)
        uv_run(&G.loop, UV_RUN_NOWAIT), fy_sleep_ns(1000000);
}

/* Says which step of the group setup failed: cmocka prints nothing of its own. */
static int setup_failed(const char *what)
{
    fprintf(stderr, "group setup: %s failed\n", what);
    return -1;
}

static int group_setup(void **state)
{
    const char *model = du_model_path();
    if (model == NULL)
        return -1;
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = model;
    if (PREFILL_TEST_CUDA)
        mp.device = MDL_DEVICE_CUDA;
    char err[MDL_ERR_LEN];
    if (mdl_model_create(&mp, &G.model, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "cannot load %s: %s\n", model, err);
        return -1;
    }
    G.cfg = mdl_model_config(G.model);
    G.fp = mdl_model_fingerprint(G.model);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    cp.device = mp.device;
    if (mdl_ctx_create(G.model, &cp, &G.ctx) != FY_OK)
        return setup_failed("the local model context");
    const char *args[] = {"--model",     model,  "--threads", "2",
                          "--log-level", "warn", "--device",  PREFILL_TEST_CUDA ? "cuda" : "cpu",
                          NULL};
    if (du_start(&G.proc, "prefill", "prefill/ferry-prefill", args, 120000) != FY_OK) {
        du_dump_log(&G.proc);
        return setup_failed("starting ferry-prefill");
    }
    uv_loop_init(&G.loop);
    G.loop_ready = true;
    kvlink_params_t kp;
    kvlink_params_default(&kp);
    kp.compat.codec_version = KVC_FRAME_VERSION;
    kp.compat.model_fingerprint = G.fp;
    kp.recv_pool_bytes = 64u << 20;
    kp.max_frame_bytes = 16u << 20;
    kp.on_frame = on_frame;
    kp.on_recv_end = on_recv_end;
    uint16_t port = 0;
    if (kvlink_ctx_create(NULL, &G.kctx) != FY_OK)
        return setup_failed("kvlink_ctx_create (UCX)");
    if (kvlink_create(G.kctx, &G.loop, &kp, &G.link) != FY_OK)
        return setup_failed("kvlink_create");
    if (kvlink_listen(G.link, "127.0.0.1", 0, &port) != FY_OK)
        return setup_failed("kvlink_listen on 127.0.0.1");
    snprintf(G.kv_addr, sizeof(G.kv_addr), "127.0.0.1:%u", port);
    G.ch = du_channel(&G.loop, G.proc.port);
    G.next_res = 1000;
    return G.ch ? 0 : setup_failed("the RPC channel to ferry-prefill");
}

/* Releases what group_setup made, also when it stopped part way (the destroy calls accept
 * NULL; the loop needs its flag). */
static int group_teardown(void **state)
{
    recv_reset(0);
    rpc_channel_destroy(G.ch);
    kvlink_destroy(G.link);
    if (G.loop_ready) {
        du_drain_loop(&G.loop);
        uv_loop_close(&G.loop);
    }
    kvlink_ctx_destroy(G.kctx);
    if (G.proc.pid > 0) {
        int rc = du_stop(&G.proc, 30000);
        if (rc != 0)
            du_dump_log(&G.proc);
    }
    mdl_ctx_destroy(G.ctx);
    mdl_model_destroy(G.model);
    return 0;
}

static void check_frames(uint64_t res, int n_tokens, uint64_t *wire_p)
{
    assert_int_equal(G.recv.n_frames, G.cfg->n_layers);
    assert_int_equal(G.recv.bad_layer, 0);
    uint64_t wire = 0;
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.head_dim = (uint32_t)G.cfg->head_dim;
    pp.n_pages = 4096;
    kvc_frame_t f0;
    assert_int_equal(kvc_frame_parse(G.recv.frames[0], G.recv.lens[0], &f0), FY_OK);
    pp.group = f0.group;
    pp.protect = f0.protect;
    kvc_pool_t *pool = NULL;
    assert_int_equal(kvc_pool_create(&pp, &pool), FY_OK);
    kvc_seq_t *seq = NULL;
    assert_int_equal(kvc_seq_create(pool, (uint32_t)G.cfg->n_layers,
                                    (uint32_t)G.cfg->n_kv_heads, G.fp, res, &seq),
                     FY_OK);
    for (int l = 0; l < G.recv.n_frames; l++) {
        kvc_frame_t f;
        assert_int_equal(kvc_frame_parse(G.recv.frames[l], G.recv.lens[l], &f), FY_OK);
        assert_int_equal(f.layer, l);
        assert_int_equal(f.n_layers, G.cfg->n_layers);
        assert_int_equal(f.seq_id, res);
        assert_int_equal(f.model_fingerprint, G.fp);
        assert_int_equal(f.n_tokens, n_tokens);
        assert_int_equal(kvc_place(seq, &f), FY_OK);
        assert_true(kvc_seq_layer_placed(seq, (uint32_t)l));
        wire += G.recv.lens[l];
    }
    kvc_seq_destroy(seq);
    assert_int_equal(kvc_pool_free_count(pool), pp.n_pages);
    kvc_pool_destroy(pool);
    *wire_p = wire;
}

static void test_fp16_frames_and_first_token(void **state)
{
    int n = 0;
    int32_t *ids = tokenize("The capital of France is", &n);
    float *logits = malloc((size_t)G.cfg->n_vocab * sizeof(float));
    size_t kv_elems = (size_t)G.cfg->n_kv_heads * n * G.cfg->head_dim;
    capture_t cap = {malloc(kv_elems * sizeof(float)), malloc(kv_elems * sizeof(float))};
    local_prefill(ids, n, logits, &cap);

    call_t c = {.ids = ids, .n = n, .policy = "fp16", .expect = true};
    du_result_t r;
    uint64_t res;
    do_prefill(&c, &r, &res);
    if (r.code != RPC_CODE_OK)
        fprintf(stderr, "Prefill: %d %s\n", r.code, r.message);
    assert_int_equal(r.code, RPC_CODE_OK);
    wait_recv_end();
    assert_true(G.recv.ended);
    assert_int_equal(G.recv.end_st, FY_OK);
    const Ferry__V1__PrefillResponse *resp = (const Ferry__V1__PrefillResponse *)r.last;
    assert_non_null(resp);
    assert_int_equal(resp->first_token_id, argmax(logits, G.cfg->n_vocab));
    uint64_t wire;
    check_frames(res, n, &wire);
    assert_int_equal(resp->kv_wire_bytes, wire);
    uint64_t raw = (uint64_t)G.cfg->n_layers * 2 * kv_elems * 2;
    assert_int_equal(resp->kv_raw_bytes, raw);
    assert_true(wire > raw); // FP16 plus headers and maps
    assert_true(resp->prefill_ms > 0);
    assert_true(resp->transfer_ms > 0);
    assert_true(resp->hidden_transfer_fraction >= 0 && resp->hidden_transfer_fraction <= 1);
    assert_true(resp->queue_ms >= 0 && resp->queue_ms < 60000);

    // Layer 0 of the frame is the model's K and V in FP16.
    kvc_frame_t f;
    assert_int_equal(kvc_frame_parse(G.recv.frames[0], G.recv.lens[0], &f), FY_OK);
    assert_int_equal(f.opt_mask, KVC_OPT_BIT(KVC_OPT_F16));
    float *k = malloc(kv_elems * sizeof(float)), *v = malloc(kv_elems * sizeof(float));
    assert_int_equal(kvc_frame_dequantize(&f, k, v, NULL), FY_OK);
    double max_err = 0;
    for (size_t i = 0; i < kv_elems; i++) {
        max_err = fmax(max_err, fabs(k[i] - cap.k0[i]) / (1 + fabs(cap.k0[i])));
        max_err = fmax(max_err, fabs(v[i] - cap.v0[i]) / (1 + fabs(cap.v0[i])));
    }
    assert_true(max_err < 1e-2);
    free(k);
    free(v);
    free(cap.k0);
    free(cap.v0);
    free(logits);
    free(ids);
    du_result_clear(&r);
}

static void test_ferry_budget(void **state)
{
    int n = 0;
    int32_t *ids = long_prompt(200, &n);
    float *logits = malloc((size_t)G.cfg->n_vocab * sizeof(float));
    capture_t cap = {0};
    local_prefill(ids, n, logits, &cap);
    call_t c = {.ids = ids, .n = n, .policy = "ferry", .budget = 0.25f, .expect = true};
    du_result_t r;
    uint64_t res;
    do_prefill(&c, &r, &res);
    assert_int_equal(r.code, RPC_CODE_OK);
    wait_recv_end();
    assert_int_equal(G.recv.end_st, FY_OK);
    const Ferry__V1__PrefillResponse *resp = (const Ferry__V1__PrefillResponse *)r.last;
    uint64_t wire;
    check_frames(res, n, &wire);
    assert_int_equal(resp->kv_wire_bytes, wire);
    double ratio = (double)resp->kv_wire_bytes / (double)resp->kv_raw_bytes;
    fprintf(stderr, "ferry b=0.25, %d tokens: wire/raw = %.4f, prefill %.1f ms, transfer %.1f "
                    "ms, %.0f%% hidden\n",
            n, ratio, resp->prefill_ms, resp->transfer_ms, resp->hidden_transfer_fraction * 100);
    assert_true(ratio <= 0.25 * 1.01);
    assert_true(ratio >= 0.25 * 0.8);
    // Every frame is what the CPU encoder makes of the same layers (the codec's twins agree to
    // the byte for the same scores: on the GPU the reference takes the GPU's).
    pf_stream_t le = {.budget = 0.25, .gpu_scores = PREFILL_TEST_CUDA};
    assert_int_equal(kvc_policy_builtin("ferry", &le.policy), FY_OK);
    assert_int_equal(pf_prefill(G.ctx, G.model, ids, n, &le, 1, res, NULL, logits), FY_OK);
    for (int l = 0; l < G.cfg->n_layers; l++) {
        if (le.lens[l] != G.recv.lens[l] || memcmp(le.frames[l], G.recv.frames[l], le.lens[l]))
            fail_msg("layer %d: frame of %zu bytes differs from the local encode (%zu bytes)", l,
                     G.recv.lens[l], le.lens[l]);
    }
    pf_stream_cleanup(&le);
    // The first token comes from the prefill logits, whatever the KV compression.
    assert_int_equal(resp->first_token_id, argmax(logits, G.cfg->n_vocab));
    free(logits);
    free(ids);
    du_result_clear(&r);
}

static void test_seeded_sampling(void **state)
{
    int n = 0;
    int32_t *ids = tokenize("Once upon a time", &n);
    float *logits = malloc((size_t)G.cfg->n_vocab * sizeof(float));
    capture_t cap = {0};
    local_prefill(ids, n, logits, &cap);
    Ferry__V1__SamplingParams sp = FERRY__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = 1.5f;
    sp.top_k = 50;
    sp.seed = 1234;
    mdl_sampler_params_t msp;
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_OK);
    mdl_sampler_t *smp = NULL;
    assert_int_equal(mdl_sampler_create(&msp, G.cfg->n_vocab, &smp), FY_OK);
    for (int i = 0; i < n; i++)
        mdl_sampler_accept(smp, ids[i]);
    int32_t expect = mdl_sampler_sample(smp, logits);
    mdl_sampler_destroy(smp);
    call_t c = {.ids = ids, .n = n, .policy = "int8", .sampling = &sp, .expect = true};
    du_result_t r;
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_OK);
    assert_int_equal(((Ferry__V1__PrefillResponse *)r.last)->first_token_id, expect);
    wait_recv_end();
    free(logits);
    free(ids);
    du_result_clear(&r);

    // Out-of-range sampling parameters are refused by the mapping.
    sp.temperature = -1;
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_ERR_INVALID_ARG);
    sp.temperature = 0;
    sp.top_p = 1.5f;
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_ERR_INVALID_ARG);
    sp.top_p = 0;
    // OpenAI's penalties and logit biases pass through; out of range, refused.
    Ferry__V1__LogitBias b = FERRY__V1__LOGIT_BIAS__INIT, *bp = &b;
    b.token_id = 7;
    b.bias = -3.5f;
    sp.logit_bias = &bp;
    sp.n_logit_bias = 1;
    sp.presence_penalty = 0.25f;
    sp.frequency_penalty = -2;
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_OK);
    assert_int_equal(msp.n_logit_bias, 1);
    assert_int_equal(msp.bias_token[0], 7);
    assert_true(msp.bias[0] == -3.5f && msp.presence_penalty == 0.25f &&
                msp.frequency_penalty == -2.0f);
    assert_int_equal(mdl_sampler_params_check(&msp, G.cfg->n_vocab), FY_OK);
    b.token_id = (uint32_t)G.cfg->n_vocab; // mapped, but not a token of this model
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_OK);
    assert_int_equal(mdl_sampler_params_check(&msp, G.cfg->n_vocab), FY_ERR_INVALID_ARG);
    b.bias = 100.5f;
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_ERR_INVALID_ARG);
    sp.n_logit_bias = 0;
    sp.presence_penalty = -2.01f;
    assert_int_equal(prefill_sampler_params(&sp, &msp), FY_ERR_INVALID_ARG);
    assert_int_equal(prefill_sampler_params(NULL, &msp), FY_OK);
    assert_true(msp.temperature <= 0);
}

static void test_invalid_requests(void **state)
{
    int32_t good[3] = {1, 2, 3};
    int32_t bad[2] = {1, 1 << 30};
    du_result_t r;
    call_t c = {.ids = good, .n = 0};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_INVALID_ARGUMENT);
    du_result_clear(&r);
    c = (call_t){.ids = bad, .n = 2};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_INVALID_ARGUMENT);
    du_result_clear(&r);
    c = (call_t){.ids = good, .n = 3, .policy = "no-such-policy"};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_INVALID_ARGUMENT);
    assert_non_null(strstr(r.message, "no-such-policy"));
    du_result_clear(&r);
    c = (call_t){.ids = good, .n = 3, .budget = 2};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_INVALID_ARGUMENT);
    du_result_clear(&r);
    c = (call_t){.ids = good, .n = 3, .kv_addr = ""};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_INVALID_ARGUMENT);
    du_result_clear(&r);
}

static void test_decode_unreachable(void **state)
{
    int32_t ids[4] = {1, 2, 3, 4};
    // A port nobody listens on.
    char addr[32];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", du_free_port());
    call_t c = {.ids = ids, .n = 4, .kv_addr = addr, .timeout_ms = 30000};
    du_result_t r;
    uint64_t t0 = fy_clock_ns();
    do_prefill(&c, &r, NULL);
    assert_int_not_equal(r.code, RPC_CODE_OK);
    assert_int_not_equal(r.code, RPC_CODE_DEADLINE_EXCEEDED);
    assert_true(fy_clock_ns() - t0 < 20000000000ull);
    du_result_clear(&r);
    // A reservation the receiver never expected is refused too.
    c = (call_t){.ids = ids, .n = 4, .timeout_ms = 30000};
    do_prefill(&c, &r, NULL);
    assert_int_not_equal(r.code, RPC_CODE_OK);
    du_result_clear(&r);
}

static void test_cancel_and_deadline(void **state)
{
    int n = 0;
    int32_t *ids = long_prompt(700, &n);
    call_t c = {.ids = ids, .n = n, .policy = "fp16", .expect = true,
                .cancel_after_first_frame = true};
    du_result_t r;
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_CANCELLED);
    wait_recv_end();
    assert_true(G.recv.ended);
    assert_int_not_equal(G.recv.end_st, FY_OK);
    assert_true(G.recv.n_frames < G.cfg->n_layers);
    du_result_clear(&r);

    // The deadline is a quarter of what the whole request takes on this worker (seconds on
    // the CPU, tens of milliseconds on a GPU), so that it passes part way through the layers.
    c = (call_t){.ids = ids, .n = n, .expect = true};
    uint64_t t0 = fy_clock_ns();
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_OK);
    wait_recv_end();
    uint32_t full_ms = (uint32_t)((fy_clock_ns() - t0) / 1000000);
    du_result_clear(&r);
    c = (call_t){.ids = ids, .n = n, .expect = true, .timeout_ms = FY_MAX(full_ms / 4, 10u)};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_DEADLINE_EXCEEDED);
    wait_recv_end();
    assert_true(G.recv.ended);
    assert_int_not_equal(G.recv.end_st, FY_OK);
    du_result_clear(&r);
    free(ids);

    // The worker still serves.
    int32_t small[3] = {1, 2, 3};
    c = (call_t){.ids = small, .n = 3, .expect = true};
    do_prefill(&c, &r, NULL);
    assert_int_equal(r.code, RPC_CODE_OK);
    wait_recv_end();
    du_result_clear(&r);
}

/* Starts a Prefill call for ids[n] under a fresh reservation the receiver expects; the call's
 * result lands in r. */
static uint64_t start_prefill(const int32_t *ids, int n, const char *rid, du_result_t *r)
{
    uint64_t res = ++G.next_res;
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(G.link, &rp);
    rp.credit_bytes = 4u << 20; // several requests share the receive pool
    assert_int_equal(kvlink_recv_expect(G.link, res, &rp), FY_OK);
    Ferry__V1__PrefillRequest req = FERRY__V1__PREFILL_REQUEST__INIT;
    uint32_t *u = malloc((size_t)n * sizeof(uint32_t));
    for (int i = 0; i < n; i++)
        u[i] = (uint32_t)ids[i];
    req.request_id = (char *)rid;
    req.prompt_token_ids = u;
    req.n_prompt_token_ids = (size_t)n;
    req.decode_kv_address = G.kv_addr;
    req.reservation_id = res;
    rpc_call_opts_t opts = {.timeout_ms = 120000, .wait_for_ready = true};
    memset(r, 0, sizeof(*r));
    assert_int_equal(rpc_channel_call(G.ch, "/ferry.v1.Worker/Prefill", &req.base,
                                      &ferry__v1__prefill_response__descriptor, &opts, du_on_msg,
                                      du_on_done, r, NULL),
                     FY_OK);
    free(u);
    return res;
}

/* Value of a metric line "name value" in a /metrics page, or -1. */
static double metric_value(const char *page, const char *name)
{
    char key[128];
    snprintf(key, sizeof(key), "\n%s ", name);
    const char *p = strstr(page, key);
    return p ? strtod(p + strlen(key), NULL) : -1;
}

static void test_batched_requests(void **state)
{
    // A long prompt keeps the compute thread busy while the short ones queue up behind it;
    // they then run as one batch. One of them is cancelled once its first frame arrived: it
    // alone ends CANCELLED, the others complete with the model's own first token.
    enum { N_SHORT = 6, CANCEL = 3 };
    static const char *const texts[N_SHORT] = {
        "The capital of France is", "Once upon a time", "1 2 3 4 5 6 7 8 9",
        "The quick brown fox jumps over the lazy dog and then", "Hello", "Water boils at"};
    int n_long = 0;
    int32_t *long_ids = long_prompt(500, &n_long);
    int32_t *ids[N_SHORT];
    int n[N_SHORT];
    int32_t expect_tok[N_SHORT];
    float *logits = malloc((size_t)G.cfg->n_vocab * sizeof(float));
    for (int i = 0; i < N_SHORT; i++) {
        ids[i] = tokenize(texts[i], &n[i]);
        capture_t cap = {0};
        local_prefill(ids[i], n[i], logits, &cap);
        expect_tok[i] = argmax(logits, G.cfg->n_vocab);
    }
    char *before = du_http_get(G.proc.port, "/metrics");
    assert_non_null(before);
    double batches0 = metric_value(before, "ferry_prefill_batch_requests_count");
    double jobs0 = metric_value(before, "ferry_prefill_batch_requests_sum");
    free(before);
    assert_true(batches0 >= 0 && jobs0 >= 0);

    memset(G.multi, 0, sizeof(G.multi));
    du_result_t rl, rs[N_SHORT];
    char rids[N_SHORT + 1][32];
    snprintf(rids[N_SHORT], sizeof(rids[0]), "batch-long");
    G.multi[N_SHORT].req = start_prefill(long_ids, n_long, rids[N_SHORT], &rl);
    while (G.multi[N_SHORT].n_frames == 0 && !rl.done)
        uv_run(&G.loop, UV_RUN_ONCE);
    for (int i = 0; i < N_SHORT; i++) {
        snprintf(rids[i], sizeof(rids[i]), "batch-%d", i);
        G.multi[i].req = start_prefill(ids[i], n[i], rids[i], &rs[i]);
    }
    bool cancelled = false;
    for (;;) {
        bool all = rl.done;
        for (int i = 0; i < N_SHORT; i++)
            all = all && rs[i].done;
        if (all)
            break;
        uv_run(&G.loop, UV_RUN_ONCE);
        if (!cancelled && G.multi[CANCEL].n_frames > 0) {
            cancelled = true;
            send_cancel(rids[CANCEL]);
        }
    }
    assert_true(cancelled);
    assert_int_equal(rl.code, RPC_CODE_OK);
    uint64_t end = fy_clock_ns() + 5000000000ull;
    for (bool all = false; !all && fy_clock_ns() < end;) {
        uv_run(&G.loop, UV_RUN_NOWAIT);
        fy_sleep_ns(1000000);
        all = true;
        for (int i = 0; i <= N_SHORT; i++)
            all = all && G.multi[i].ended;
    }
    for (int i = 0; i < N_SHORT; i++) {
        assert_true(G.multi[i].ended);
        if (i == CANCEL) {
            assert_int_equal(rs[i].code, RPC_CODE_CANCELLED);
            assert_int_not_equal(G.multi[i].end_st, FY_OK);
            assert_true(G.multi[i].n_frames < G.cfg->n_layers);
        } else {
            if (rs[i].code != RPC_CODE_OK)
                fail_msg("request %d: code %d (%s)", i, rs[i].code, rs[i].message);
            assert_int_equal(G.multi[i].end_st, FY_OK);
            assert_int_equal(G.multi[i].n_frames, G.cfg->n_layers);
            assert_non_null(rs[i].last);
            const Ferry__V1__PrefillResponse *resp =
                (const Ferry__V1__PrefillResponse *)rs[i].last;
            assert_int_equal((int32_t)resp->first_token_id, expect_tok[i]);
        }
        du_result_clear(&rs[i]);
        free(ids[i]);
    }
    assert_int_equal(G.multi[N_SHORT].end_st, FY_OK);
    assert_int_equal(G.multi[N_SHORT].n_frames, G.cfg->n_layers);
    du_result_clear(&rl);
    memset(G.multi, 0, sizeof(G.multi));
    // The short requests ran in fewer batches than requests.
    char *after = du_http_get(G.proc.port, "/metrics");
    assert_non_null(after);
    double batches = metric_value(after, "ferry_prefill_batch_requests_count") - batches0;
    double jobs = metric_value(after, "ferry_prefill_batch_requests_sum") - jobs0;
    free(after);
    assert_true(jobs == N_SHORT + 1);
    assert_true(batches >= 2 && batches < jobs);
    free(long_ids);
    free(logits);
}

static void test_metrics(void **state)
{
    char *m = du_http_get(G.proc.port, "/metrics");
    assert_non_null(m);
    assert_non_null(strstr(m, "HTTP/1.1 200 OK"));
    assert_non_null(strstr(m, "ferry_prefill_tokens_total "));
    assert_non_null(strstr(m, "ferry_prefill_seconds_bucket"));
    assert_non_null(strstr(m, "ferry_prefill_kv_raw_bytes_total "));
    assert_non_null(strstr(m, "ferry_prefill_kv_wire_bytes_total "));
    assert_non_null(strstr(m, "ferry_prefill_transfer_seconds_count "));
    assert_non_null(strstr(m, "ferry_prefill_hidden_transfer_fraction "));
    assert_non_null(strstr(m, "ferry_prefill_requests_total{status=\"cancelled\"} 3"));
    assert_non_null(strstr(m, "ferry_prefill_batch_tokens_bucket"));
    free(m);
    char *h = du_http_get(G.proc.port, "/healthz");
    assert_non_null(strstr(h, "200 OK"));
    free(h);
}

static void test_sigterm_drains(void **state)
{
    int n = 0;
    int32_t *ids = long_prompt(250, &n);
    uint64_t res = ++G.next_res;
    recv_reset(res);
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(G.link, &rp);
    assert_int_equal(kvlink_recv_expect(G.link, res, &rp), FY_OK);
    Ferry__V1__PrefillRequest req = FERRY__V1__PREFILL_REQUEST__INIT;
    uint32_t *u = malloc((size_t)n * sizeof(uint32_t));
    for (int i = 0; i < n; i++)
        u[i] = (uint32_t)ids[i];
    req.request_id = "drain";
    req.prompt_token_ids = u;
    req.n_prompt_token_ids = (size_t)n;
    req.decode_kv_address = G.kv_addr;
    req.reservation_id = res;
    du_result_t r = {0};
    assert_int_equal(rpc_channel_call(G.ch, "/ferry.v1.Worker/Prefill", &req.base,
                                      &ferry__v1__prefill_response__descriptor, NULL, du_on_msg,
                                      du_on_done, &r, NULL),
                     FY_OK);
    // Once the request is in hand (its first frame arrived), SIGTERM the worker.
    while (G.recv.n_frames == 0 && !r.done)
        uv_run(&G.loop, UV_RUN_ONCE);
    kill(G.proc.pid, SIGTERM);
    while (!r.done)
        uv_run(&G.loop, UV_RUN_ONCE);
    assert_int_equal(r.code, RPC_CODE_OK);
    wait_recv_end();
    assert_int_equal(G.recv.end_st, FY_OK);
    assert_int_equal(G.recv.n_frames, G.cfg->n_layers);
    // It exits by itself once the work in hand is done.
    uint64_t t0 = fy_clock_ns();
    int rc = -1;
    while (rc < 0 && fy_clock_ns() - t0 < 20000000000ull) {
        uv_run(&G.loop, UV_RUN_NOWAIT);
        rc = du_wait(&G.proc, 10);
    }
    if (rc != 0)
        du_dump_log(&G.proc);
    assert_int_equal(rc, 0);
    free(u);
    free(ids);
    du_result_clear(&r);
}

int main(void)
{
    if (PREFILL_TEST_CUDA && fy_cuda_device_count() == 0) {
        printf("SKIP: no CUDA device\n");
        return 77;
    }
    // KV over loopback TCP, whatever transports this node's UCX has (as the other
    // daemon tests do); the prefill worker inherits it.
    setenv("UCX_TLS", "tcp", 0);
    setenv("UCX_NET_DEVICES", "lo", 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_frames_and_first_token),
        cmocka_unit_test(test_ferry_budget),
        cmocka_unit_test(test_seeded_sampling),
        cmocka_unit_test(test_invalid_requests),
        cmocka_unit_test(test_decode_unreachable),
        cmocka_unit_test(test_cancel_and_deadline),
        cmocka_unit_test(test_batched_requests),
        cmocka_unit_test(test_metrics),
        cmocka_unit_test(test_sigterm_drains),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
