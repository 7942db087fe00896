// The decode worker end to end in one process, with the real SmolLM2 model: this test plays
// router and prefill worker. It prefills prompts itself, encodes every layer into wire frames,
// reserves pages with Worker.ReserveKV, pushes the frames over kvlink (UCX on loopback) and
// reads the Decode stream:
// - the stream carries the tokens of a local greedy run (mdl_decode over the FP16 cache);
// - two sequences decoded together in one batch give the same tokens as alone;
// - a corrupt frame fails that request only (DATA_LOSS), its pages come back, the worker
//   keeps serving;
// - a full pool answers RESOURCE_EXHAUSTED; a lease with no KV expires and frees its pages;
// - Cancel mid-stream ends the Decode call with CANCELLED and frees the pages;
// - a seeded sampled stream continues the request's random stream;
// - draining refuses new reservations and finishes the stream in flight;
// - with a router address the worker registers and heartbeats.
// Built a second time as test_worker_cuda (DECODE_TEST_CUDA): the same checks with the worker
// on the GPU (its model, context and page pool; frames still come from the CPU prefill here),
// except the seeded sampled stream, whose draws depend on logits to the last bit. Greedy tokens
// must still equal the CPU's local run (the GPU model agrees with it for the first 32 tokens of
// such prompts, bench/results/gpu-h200.md). That variant exits 77 without a GPU and takes the
// model from $FERRY_MODEL when set.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "ferry.pb-c.h"
#include "kvlink.h"
#include "prefill.h"
#include "prefill_frames.h"
#include "../transport/ucx/harness.h"
#include "router.h"
#include "rpc.h"

enum { N_GEN = 12, N_PROMPTS = 2, MAX_TOKENS_SEEN = 512 };

static const char *const k_prompts[N_PROMPTS] = {
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about a ferry crossing a cold grey sea at dawn, with gulls "
    "and the smell of diesel.<|im_end|>\n<|im_start|>assistant\n",
};

typedef struct {
    int32_t *ids;
    int n;
    pf_stream_t stream[2]; // fp16, ferry b = 0.5
    int32_t first;
    int32_t ref[N_GEN]; // greedy continuation after `first` (mdl_decode, FP16 cache)
    int n_ref;          // up to and excluding EOS
} prompt_t;

#ifndef DECODE_TEST_CUDA
#define DECODE_TEST_CUDA 0
#endif

#define RECV_BUFFER (16u << 20) // each worker's kvlink receive pool

static struct {
    mdl_model_t *m;  // CPU: prefill, frames and the local reference runs
    mdl_model_t *gm; // DECODE_TEST_CUDA: the same file on the GPU, which the worker runs
    prompt_t prompts[N_PROMPTS];
    decode_worker_t *w;
    char rpc_addr[64], kv_addr[64];
    uv_loop_t loop;
    uv_timer_t tick;
    rpc_channel_t *ch;
    kvlink_ctx_t *kctx;
    kvlink_t *tx;
    int next_req;
} G;

/* ---- loop helpers ------------------------------------------------------------------------ */

static void on_tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs the test loop until *flag is set or timeout_ms passes; returns *flag. */
static bool run_until(const bool *flag, int timeout_ms)
{
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (!*flag && fy_clock_ns() < end)
        uv_run(&G.loop, UV_RUN_ONCE);
    return *flag;
}

static void run_for(int ms)
{
    bool never = false;
    run_until(&never, ms);
}

/* ---- RPC calls --------------------------------------------------------------------------- */

typedef struct {
    bool done;
    int code;
    char msg[256];
    uint64_t reservation_id, credit;
    bool found;
    Ferry__V1__PrefillResponse prefill; // scalars of the PrefillResponse
    // Decode stream
    uint32_t tokens[MAX_TOKENS_SEEN];
    int n_tokens;
    int finish_reason;
    uint32_t completion_tokens;
    rpc_ccall_t *call;
} call_t;

static void on_msg(rpc_ccall_t *c, const ProtobufCMessage *m, void *arg)
{
    (void)c;
    call_t *r = arg;
    if (m->descriptor == &ferry__v1__reserve_kvresponse__descriptor) {
        const Ferry__V1__ReserveKVResponse *resp = (const Ferry__V1__ReserveKVResponse *)m;
        r->reservation_id = resp->reservation_id;
        r->credit = resp->credit_bytes;
    } else if (m->descriptor == &ferry__v1__prefill_response__descriptor) {
        r->prefill = *(const Ferry__V1__PrefillResponse *)m;
    } else if (m->descriptor == &ferry__v1__cancel_response__descriptor) {
        r->found = ((const Ferry__V1__CancelResponse *)m)->found;
    } else if (m->descriptor == &ferry__v1__generate_response__descriptor) {
        const Ferry__V1__GenerateResponse *g = (const Ferry__V1__GenerateResponse *)m;
        for (size_t i = 0; i < g->n_token_ids && r->n_tokens < MAX_TOKENS_SEEN; i++)
            r->tokens[r->n_tokens++] = g->token_ids[i];
        if (g->finish_reason != 0) {
            r->finish_reason = g->finish_reason;
            if (g->stats != NULL)
                r->completion_tokens = g->stats->completion_tokens;
        }
    }
}

static void on_done(rpc_ccall_t *c, int code, const char *msg, void *arg)
{
    (void)c;
    call_t *r = arg;
    r->done = true;
    r->code = code;
    r->call = NULL;
    snprintf(r->msg, sizeof(r->msg), "%s", msg != NULL ? msg : "");
}

static void start_call_on(rpc_channel_t *ch, call_t *r, const char *method,
                          const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc)
{
    memset(r, 0, sizeof(*r));
    char path[64];
    snprintf(path, sizeof(path), "/ferry.v1.Worker/%s", method);
    rpc_call_opts_t o = {.timeout_ms = 120000, .wait_for_ready = true};
    assert_int_equal(
        rpc_channel_call(ch, path, req, resp_desc, &o, on_msg, on_done, r, &r->call), FY_OK);
}

static void start_call(call_t *r, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *resp_desc)
{
    start_call_on(G.ch, r, method, req, resp_desc);
}

/* ReserveKV with a sealing key (NULL: none). */
static int reserve_sealed(const char *request_id, const prompt_t *p, int policy, uint32_t lease_ms,
                          const uint8_t *key, call_t *r)
{
    Ferry__V1__ReserveKVRequest req = FERRY__V1__RESERVE_KVREQUEST__INIT;
    req.request_id = (char *)request_id;
    req.kv_key.data = (uint8_t *)key;
    req.kv_key.len = key != NULL ? KVLINK_SEAL_KEY_BYTES : 0;
    req.prompt_tokens = (uint32_t)p->n;
    req.max_new_tokens = N_GEN + 1;
    req.expected_wire_bytes = p->stream[policy].wire_bytes;
    req.lease_ms = lease_ms;
    start_call(r, "ReserveKV", &req.base, &ferry__v1__reserve_kvresponse__descriptor);
    assert_true(run_until(&r->done, 30000));
    return r->code;
}

static int reserve(const char *request_id, const prompt_t *p, int policy, uint32_t lease_ms,
                   call_t *r)
{
    return reserve_sealed(request_id, p, policy, lease_ms, NULL, r);
}

static void start_decode_with(call_t *r, const char *request_id, uint64_t reservation,
                              const prompt_t *p, Ferry__V1__SamplingParams *sp, int32_t first)
{
    Ferry__V1__DecodeRequest req = FERRY__V1__DECODE_REQUEST__INIT;
    req.request_id = (char *)request_id;
    req.reservation_id = reservation;
    req.sampling = sp;
    req.return_token_ids = true;
    req.first_token_id = (uint32_t)first;
    req.completion_tokens_sent = 1;
    uint32_t *ids = malloc(sizeof(uint32_t) * (size_t)p->n);
    for (int i = 0; i < p->n; i++)
        ids[i] = (uint32_t)p->ids[i];
    req.n_prompt_token_ids = (size_t)p->n;
    req.prompt_token_ids = ids;
    start_call(r, "Decode", &req.base, &ferry__v1__generate_response__descriptor);
    free(ids);
}

static void start_decode(call_t *r, const char *request_id, uint64_t reservation,
                         const prompt_t *p, uint32_t max_tokens, bool ignore_eos)
{
    Ferry__V1__SamplingParams sp = FERRY__V1__SAMPLING_PARAMS__INIT;
    sp.max_tokens = max_tokens;
    sp.ignore_eos = ignore_eos;
    start_decode_with(r, request_id, reservation, p, &sp, p->first);
}

static bool cancel(const char *request_id)
{
    Ferry__V1__CancelRequest req = FERRY__V1__CANCEL_REQUEST__INIT;
    req.request_id = (char *)request_id;
    call_t r;
    start_call(&r, "Cancel", &req.base, &ferry__v1__cancel_response__descriptor);
    assert_true(run_until(&r.done, 30000));
    assert_int_equal(r.code, RPC_CODE_OK);
    return r.found;
}

/* ---- KV transfer -------------------------------------------------------------------------- */

typedef struct {
    bool ended;
    fy_status_t st;
    int frames_done;
    uint8_t *copy; // corrupted copy of one frame
} xfer_t;

static void on_frame_done(kvlink_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    (void)st;
    ((xfer_t *)arg)->frames_done++;
}

static void on_send_end(kvlink_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    xfer_t *x = arg;
    x->ended = true;
    x->st = st;
}

/* Sends every frame of a stream for reservation id; corrupt_layer >= 0 flips a payload byte of
 * that layer (the transport's own CRC is computed over the damaged bytes, so only the frame's
 * check can tell). Returns the sender's end status. */
static fy_status_t send_frames_mixed(uint64_t id, const pf_stream_t *s, int corrupt_layer,
                                     const pf_stream_t *alt, int alt_layer)
{
    xfer_t x = {0};
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = on_send_end;
    sp.arg = &x;
    kvlink_send_t *req = NULL;
    assert_int_equal(kvlink_send_open(G.tx, G.kv_addr, id, &sp, &req), FY_OK);
    int queued = 0;
    for (int l = 0; l < s->n_layers; l++) {
        const uint8_t *data = s->frames[l];
        size_t len = s->lens[l];
        if (l == alt_layer) { // a valid frame of another prompt in this one's place
            data = alt->frames[l];
            len = alt->lens[l];
        }
        if (l == corrupt_layer) {
            x.copy = malloc(len);
            memcpy(x.copy, data, len);
            x.copy[len / 2] ^= 0x5a;
            data = x.copy;
        }
        fy_status_t st = kvlink_send_frame(req, (uint32_t)l, data, len, on_frame_done, &x);
        if (st != FY_OK)
            break; // the request already failed (the receiver cancelled it)
        queued++;
    }
    if (!x.ended)
        kvlink_send_finish(req);
    assert_true(run_until(&x.ended, 60000));
    // Frames still in UCX's hands report done after the end.
    uint64_t end = fy_clock_ns() + 5000000000ull;
    while (x.frames_done < queued && fy_clock_ns() < end)
        uv_run(&G.loop, UV_RUN_ONCE);
    assert_int_equal(x.frames_done, queued); // the frames' bytes are ours again
    free(x.copy);
    return x.st;
}

static fy_status_t send_frames(uint64_t id, const pf_stream_t *s, int corrupt_layer)
{
    return send_frames_mixed(id, s, corrupt_layer, NULL, -1);
}

/* ---- setup -------------------------------------------------------------------------------- */

static fy_status_t start_worker_at(uint64_t kv_memory, const char *router,
                                   decode_worker_t **w_p)
{
    decode_worker_params_t p;
    decode_worker_params_default(&p);
    p.router = router;
    p.model = G.gm != NULL ? G.gm : G.m;
    p.threads = 2;
    p.max_batch = 8;
    p.kv_memory = kv_memory;
    p.recv_buffer = RECV_BUFFER;
    char err[256] = "";
    fy_status_t st = decode_worker_create(&p, w_p, err, sizeof(err));
    if (st != FY_OK)
        fprintf(stderr, "decode worker: %s\n", err);
    return st;
}

static fy_status_t start_worker(uint64_t kv_memory, decode_worker_t **w_p)
{
    return start_worker_at(kv_memory, NULL, w_p);
}

static void connect_to(decode_worker_t *w)
{
    if (G.ch != NULL)
        rpc_channel_destroy(G.ch);
    snprintf(G.rpc_addr, sizeof(G.rpc_addr), "127.0.0.1:%d", decode_worker_rpc_port(w));
    snprintf(G.kv_addr, sizeof(G.kv_addr), "127.0.0.1:%d", decode_worker_kv_port(w));
    const char *addrs[] = {G.rpc_addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = addrs;
    cp.n_addresses = 1;
    assert_int_equal(rpc_channel_create(&G.loop, &cp, &G.ch), FY_OK);
}

static int setup(void **state)
{
    (void)state;
    const char *root = getenv("FERRY_SOURCE_ROOT"), *env = getenv("FERRY_MODEL");
    char path[4096];
    if (env != NULL && env[0] != '\0')
        snprintf(path, sizeof(path), "%s", env);
    else
        snprintf(path, sizeof(path), "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 root != NULL ? root : ".");
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = path;
    char err[MDL_ERR_LEN] = "";
    if (mdl_model_create(&mp, &G.m, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "cannot load %s: %s; run scripts/setup.sh to fetch it\n", path, err);
        return -1;
    }
    if (DECODE_TEST_CUDA) {
        mp.device = MDL_DEVICE_CUDA;
        if (mdl_model_create(&mp, &G.gm, err, sizeof(err)) != FY_OK) {
            fprintf(stderr, "cannot load %s on the GPU: %s\n", path, err);
            return -1;
        }
    }
    const mdl_config_t *c = mdl_model_config(G.m);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    mdl_ctx_t *ctx;
    if (mdl_ctx_create(G.m, &cp, &ctx) != FY_OK)
        return -1;
    int32_t eos = mdl_tokenizer_eos(mdl_model_tokenizer(G.m));
    float *logits = malloc(sizeof(float) * (size_t)c->n_vocab);
    for (int i = 0; i < N_PROMPTS; i++) {
        prompt_t *p = &G.prompts[i];
        size_t n = 0;
        p->ids = malloc(512 * sizeof(int32_t));
        if (mdl_tokenizer_encode(mdl_model_tokenizer(G.m), k_prompts[i], strlen(k_prompts[i]),
                                 true, p->ids, 512, &n) != FY_OK)
            return -1;
        p->n = (int)n;
        kvc_policy_builtin("fp16", &p->stream[0].policy);
        kvc_policy_builtin("ferry", &p->stream[1].policy);
        p->stream[0].budget = -1;
        p->stream[1].budget = 0.5;
        mdl_kv_params_t kp;
        mdl_kv_params_default(&kp, G.m);
        kp.n_pages = mdl_kv_pages_for(&kp, p->n + N_GEN + 1);
        mdl_kv_t *kv;
        mdl_kv_seq_t *seq;
        if (mdl_kv_create(&kp, &kv) != FY_OK || mdl_kv_seq_create(kv, &seq) != FY_OK)
            return -1;
        if (pf_prefill(ctx, G.m, p->ids, p->n, p->stream, 2, 1000 + (uint64_t)i, seq, logits) !=
            FY_OK)
            return -1;
        p->first = pf_argmax(logits, c->n_vocab);
        int32_t t = p->first;
        for (p->n_ref = 0; p->n_ref < N_GEN; p->n_ref++) {
            if (mdl_decode(ctx, &seq, &t, 1, logits) != FY_OK)
                return -1;
            t = pf_argmax(logits, c->n_vocab);
            if (t == eos)
                break;
            p->ref[p->n_ref] = t;
        }
        mdl_kv_seq_destroy(seq);
        mdl_kv_destroy(kv);
    }
    free(logits);
    mdl_ctx_destroy(ctx);

    if (start_worker(256u << 20, &G.w) != FY_OK)
        return -1;
    uv_loop_init(&G.loop);
    uv_timer_init(&G.loop, &G.tick);
    uv_timer_start(&G.tick, on_tick, 5, 5);
    if (kvlink_ctx_create(NULL, &G.kctx) != FY_OK)
        return -1;
    kvlink_params_t kp;
    kvlink_params_default(&kp);
    kp.compat.codec_version = KVC_FRAME_VERSION;
    kp.compat.model_fingerprint = mdl_model_fingerprint(G.m);
    kp.recv_pool_bytes = 0;
    if (kvlink_create(G.kctx, &G.loop, &kp, &G.tx) != FY_OK)
        return -1;
    connect_to(G.w);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    rpc_channel_destroy(G.ch);
    kvlink_destroy(G.tx);
    kvlink_ctx_destroy(G.kctx);
    uv_timer_stop(&G.tick);
    uv_close((uv_handle_t *)&G.tick, NULL);
    // A test that failed midway left its servers and channels on the loop: close them, or the
    // loop below would run until the test's timeout. (Nothing is left after passing tests.)
    uv_walk(&G.loop, h_close_walk, NULL);
    uv_run(&G.loop, UV_RUN_DEFAULT);
    uv_loop_close(&G.loop);
    decode_worker_destroy(G.w);
    for (int i = 0; i < N_PROMPTS; i++) {
        pf_stream_cleanup(&G.prompts[i].stream[0]);
        pf_stream_cleanup(&G.prompts[i].stream[1]);
        free(G.prompts[i].ids);
    }
    mdl_model_destroy(G.m);
    mdl_model_destroy(G.gm);
    return 0;
}

/* Waits until the worker holds no request and every page is free again. */
static void assert_pool_idle(decode_worker_t *w)
{
    decode_worker_stats_t s;
    uint64_t end = fy_clock_ns() + 10000000000ull;
    do {
        run_for(10);
        decode_worker_stats(w, &s);
    } while ((s.requests != 0 || s.free_pages != s.total_pages ||
              s.available_pages != s.total_pages) &&
             fy_clock_ns() < end);
    assert_int_equal(s.requests, 0);
    assert_int_equal(s.free_pages, s.total_pages);
    assert_int_equal(s.available_pages, s.total_pages);
}

static const char *next_id(void)
{
    static char buf[32];
    snprintf(buf, sizeof(buf), "req-%d", G.next_req++);
    return buf;
}

/* Checks a finished Decode stream against the prompt's local greedy run. */
static void assert_same_as_local(const call_t *d, const prompt_t *p)
{
    assert_int_equal(d->code, RPC_CODE_OK);
    assert_int_equal(d->n_tokens, p->n_ref);
    for (int i = 0; i < p->n_ref; i++) {
        if ((int32_t)d->tokens[i] != p->ref[i])
            fail_msg("token %d: decode worker %u, local %d", i, d->tokens[i], p->ref[i]);
    }
    assert_int_equal(d->finish_reason, p->n_ref == N_GEN
                                           ? FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH
                                           : FERRY__V1__FINISH_REASON__FINISH_REASON_STOP);
    assert_int_equal(d->completion_tokens, 1 + p->n_ref);
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_stream_equals_local_greedy(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[0];
    char id[32];
    snprintf(id, sizeof(id), "%s", next_id());
    call_t r;
    assert_int_equal(reserve(id, p, 0, 10000, &r), RPC_CODE_OK);
    assert_true(r.reservation_id != 0 && r.credit > 0);
    assert_int_equal(send_frames(r.reservation_id, &p->stream[0], -1), FY_OK);
    call_t d;
    start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
    assert_true(run_until(&d.done, 120000));
    assert_same_as_local(&d, p);
    printf("stream equals the local greedy run: %d tokens\n", d.n_tokens);
    assert_pool_idle(G.w);
    // The metrics saw it.
    fy_metrics_t *m = decode_worker_metrics(G.w);
    char *text;
    size_t len;
    assert_int_equal(fy_metrics_render(m, &text, &len), FY_OK);
    assert_non_null(strstr(text, "ferry_decode_placed_wire_bytes_total"));
    assert_non_null(strstr(text, "ferry_decode_step_seconds_count"));
    // On the GPU the receive pool is page-locked for uploads: all of it, as the gauge says.
    const char *locked = strstr(text, "\nferry_decode_recv_pool_locked_bytes ");
    assert_non_null(locked);
    double locked_bytes = strtod(locked + strlen("\nferry_decode_recv_pool_locked_bytes "), NULL);
    if (DECODE_TEST_CUDA)
        assert_true(locked_bytes >= (double)RECV_BUFFER);
    else
        assert_true(locked_bytes == 0);
    free(text);
}

static void test_two_in_one_batch(void **state)
{
    (void)state;
    char ids[2][32];
    call_t r[2], d[2];
    decode_worker_stats_t before, after;
    // Decode calls first: each waits for its KV, so both join the batch within a step or two.
    for (int i = 0; i < 2; i++) {
        snprintf(ids[i], sizeof(ids[i]), "%s", next_id());
        assert_int_equal(reserve(ids[i], &G.prompts[i], 1, 10000, &r[i]), RPC_CODE_OK);
    }
    decode_worker_stats(G.w, &before);
    for (int i = 0; i < 2; i++)
        start_decode(&d[i], ids[i], r[i].reservation_id, &G.prompts[i], N_GEN + 1, true);
    for (int i = 0; i < 2; i++)
        assert_int_equal(send_frames(r[i].reservation_id, &G.prompts[i].stream[0], -1), FY_OK);
    for (int i = 0; i < 2; i++)
        assert_true(run_until(&d[i].done, 120000));
    decode_worker_stats(G.w, &after);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(d[i].code, RPC_CODE_OK);
        // ignore_eos: N_GEN tokens each; they start with the local greedy run's.
        assert_int_equal(d[i].n_tokens, N_GEN);
        for (int k = 0; k < G.prompts[i].n_ref; k++)
            assert_int_equal((int32_t)d[i].tokens[k], G.prompts[i].ref[k]);
    }
    uint64_t tokens = after.tokens_generated - before.tokens_generated;
    uint64_t steps = after.steps - before.steps;
    printf("two sequences: %llu tokens in %llu steps\n", (unsigned long long)tokens,
           (unsigned long long)steps);
    assert_int_equal(tokens, 2 * N_GEN);
    assert_true(steps < tokens); // they shared steps
    fy_metric_t *h = fy_metrics_histogram(decode_worker_metrics(G.w), "ferry_decode_step_seconds",
                                          NULL, "", fy_metrics_latency_bounds, 16);
    assert_non_null(h);
    printf("mean decode step so far: %.2f ms over %llu steps\n",
           1e3 * fy_metric_value(h) / (double)fy_metric_count(h),
           (unsigned long long)fy_metric_count(h));
    assert_pool_idle(G.w);
}

static void test_corrupt_frame_fails_that_request(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[1];
    char id[32];
    snprintf(id, sizeof(id), "%s", next_id());
    call_t r, d;
    assert_int_equal(reserve(id, p, 1, 10000, &r), RPC_CODE_OK);
    start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
    fy_status_t st = send_frames(r.reservation_id, &p->stream[1], 5);
    assert_true(st != FY_OK); // the receiver cancelled the transfer
    assert_true(run_until(&d.done, 30000));
    assert_int_equal(d.code, RPC_CODE_DATA_LOSS);
    printf("corrupt frame: Decode ended %s: %s\n", rpc_code_name(d.code), d.msg);
    assert_int_equal(d.n_tokens, 0);
    assert_pool_idle(G.w);
    decode_worker_stats_t s;
    decode_worker_stats(G.w, &s);
    assert_true(s.failures >= 1);
    // A valid frame that does not belong (another prompt's layer 7): placement refuses it,
    // only this request fails.
    snprintf(id, sizeof(id), "%s", next_id());
    assert_int_equal(reserve(id, p, 1, 10000, &r), RPC_CODE_OK);
    start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
    assert_true(send_frames_mixed(r.reservation_id, &p->stream[1], -1, &G.prompts[0].stream[1],
                                  7) != FY_OK);
    assert_true(run_until(&d.done, 30000));
    assert_int_equal(d.code, RPC_CODE_FAILED_PRECONDITION);
    printf("foreign frame: Decode ended %s: %s\n", rpc_code_name(d.code), d.msg);
    assert_pool_idle(G.w);
    // The worker keeps serving.
    snprintf(id, sizeof(id), "%s", next_id());
    assert_int_equal(reserve(id, p, 1, 10000, &r), RPC_CODE_OK);
    assert_int_equal(send_frames(r.reservation_id, &p->stream[0], -1), FY_OK);
    start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
    assert_true(run_until(&d.done, 120000));
    assert_same_as_local(&d, p);
    assert_pool_idle(G.w);
}

/* s's frames sealed for reservation id under key; the layers listed in swap[2] (when not
 * -1) sealed each as the other, as an attacker moving sealed frames around would send them. */
static pf_stream_t seal_stream(const pf_stream_t *s, uint64_t id, const uint8_t *key,
                               const int swap[2])
{
    pf_stream_t out = *s;
    out.frames = calloc((size_t)s->n_layers, sizeof(uint8_t *));
    out.lens = calloc((size_t)s->n_layers, sizeof(size_t));
    for (int l = 0; l < s->n_layers; l++) {
        const int from = l == swap[0] ? swap[1] : l == swap[1] ? swap[0] : l;
        out.lens[l] = s->lens[from] + KVLINK_SEAL_OVERHEAD;
        out.frames[l] = malloc(out.lens[l]);
        assert_int_equal(
            kvlink_seal(key, id, (uint32_t)from, s->frames[from], s->lens[from], out.frames[l]),
            FY_OK);
    }
    return out;
}

static void free_stream_copy(pf_stream_t *s)
{
    for (int l = 0; l < s->n_layers; l++)
        free(s->frames[l]);
    free(s->frames);
    free(s->lens);
}

/* A reservation with a key takes frames sealed under it (the stream equals the local greedy
 * run); frames in the clear, sealed under another key, or sealed for another layer fail that
 * request with DATA_LOSS; a key of the wrong size is refused. */
static void test_sealed_frames(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[0];
    uint8_t key[KVLINK_SEAL_KEY_BYTES], other[KVLINK_SEAL_KEY_BYTES];
    for (int i = 0; i < KVLINK_SEAL_KEY_BYTES; i++) {
        key[i] = (uint8_t)(i * 7 + 1);
        other[i] = (uint8_t)(i * 7 + 2);
    }
    static const int k_none[2] = {-1, -1}, k_swap[2] = {3, 4};
    static const struct {
        const char *what;
        int sealed; // 0 clear, 1 under key, 2 under the other key, 3 layers swapped
    } k_cases[] = {
        {"sealed", 1}, {"in the clear", 0}, {"under another key", 2}, {"layers swapped", 3}};
    for (size_t c = 0; c < sizeof(k_cases) / sizeof(k_cases[0]); c++) {
        char id[32];
        snprintf(id, sizeof(id), "%s", next_id());
        call_t r, d;
        assert_int_equal(reserve_sealed(id, p, 0, 10000, key, &r), RPC_CODE_OK);
        start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
        pf_stream_t s = p->stream[0];
        if (k_cases[c].sealed > 0)
            s = seal_stream(&p->stream[0], r.reservation_id, k_cases[c].sealed == 2 ? other : key,
                            k_cases[c].sealed == 3 ? k_swap : k_none);
        fy_status_t st = send_frames(r.reservation_id, &s, -1);
        assert_true(run_until(&d.done, 120000));
        printf("frames %s: transfer %s, Decode %s %s\n", k_cases[c].what, fy_status_str(st),
               rpc_code_name(d.code), d.msg);
        if (k_cases[c].sealed == 1) {
            assert_int_equal(st, FY_OK);
            assert_same_as_local(&d, p);
        } else {
            assert_true(st != FY_OK);
            assert_int_equal(d.code, RPC_CODE_DATA_LOSS);
            assert_non_null(strstr(d.msg, "sealed frame did not open"));
            assert_int_equal(d.n_tokens, 0);
        }
        if (k_cases[c].sealed > 0)
            free_stream_copy(&s);
        assert_pool_idle(G.w);
    }
    call_t r;
    Ferry__V1__ReserveKVRequest req = FERRY__V1__RESERVE_KVREQUEST__INIT;
    req.request_id = "short-key";
    req.prompt_tokens = (uint32_t)p->n;
    req.kv_key.data = key;
    req.kv_key.len = 16;
    start_call(&r, "ReserveKV", &req.base, &ferry__v1__reserve_kvresponse__descriptor);
    assert_true(run_until(&r.done, 30000));
    assert_int_equal(r.code, RPC_CODE_INVALID_ARGUMENT);
}

static void test_lease_expires(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[0];
    char id[32];
    snprintf(id, sizeof(id), "%s", next_id());
    call_t r;
    assert_int_equal(reserve(id, p, 0, 200, &r), RPC_CODE_OK);
    decode_worker_stats_t s;
    decode_worker_stats(G.w, &s);
    assert_int_equal(s.requests, 1);
    assert_true(s.available_pages < s.total_pages);
    run_for(600);
    assert_pool_idle(G.w);
    // A Decode call for it learns why.
    call_t d;
    start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
    assert_true(run_until(&d.done, 10000));
    assert_int_equal(d.code, RPC_CODE_DEADLINE_EXCEEDED);
}

static void test_cancel_mid_stream(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[0];
    char id[32];
    snprintf(id, sizeof(id), "%s", next_id());
    call_t r, d;
    assert_int_equal(reserve(id, p, 1, 10000, &r), RPC_CODE_OK);
    assert_int_equal(send_frames(r.reservation_id, &p->stream[1], -1), FY_OK);
    start_decode(&d, id, r.reservation_id, p, 400, true);
    uint64_t end = fy_clock_ns() + 60000000000ull;
    while (d.n_tokens < 3 && !d.done && fy_clock_ns() < end)
        uv_run(&G.loop, UV_RUN_ONCE);
    assert_false(d.done);
    assert_true(cancel(id));
    assert_true(run_until(&d.done, 30000));
    assert_int_equal(d.code, RPC_CODE_CANCELLED);
    assert_true(d.n_tokens >= 3 && d.n_tokens < 399);
    assert_pool_idle(G.w);
    assert_false(cancel(id)); // gone

    // The client going away (RST_STREAM) ends it too.
    snprintf(id, sizeof(id), "%s", next_id());
    assert_int_equal(reserve(id, p, 1, 10000, &r), RPC_CODE_OK);
    assert_int_equal(send_frames(r.reservation_id, &p->stream[1], -1), FY_OK);
    start_decode(&d, id, r.reservation_id, p, 400, true);
    end = fy_clock_ns() + 60000000000ull;
    while (d.n_tokens < 2 && !d.done && fy_clock_ns() < end)
        uv_run(&G.loop, UV_RUN_ONCE);
    assert_false(d.done);
    rpc_ccall_cancel(d.call);
    assert_true(d.done);
    assert_pool_idle(G.w);
}

static void test_pool_full(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[1];
    // A pool that holds one reservation of this prompt but not two.
    decode_worker_t *small = NULL;
    assert_int_equal(start_worker(350ull * 16384, &small), FY_OK);
    connect_to(small);
    char id1[32], id2[32], id3[32];
    snprintf(id1, sizeof(id1), "%s", next_id());
    snprintf(id2, sizeof(id2), "%s", next_id());
    snprintf(id3, sizeof(id3), "%s", next_id());
    call_t r1, r2, r3;
    assert_int_equal(reserve(id1, p, 0, 10000, &r1), RPC_CODE_OK);
    assert_int_equal(reserve(id2, p, 0, 10000, &r2), RPC_CODE_RESOURCE_EXHAUSTED);
    printf("pool full: %s\n", r2.msg);
    // The same request id twice is refused as such.
    assert_int_equal(reserve(id1, p, 0, 10000, &r3), RPC_CODE_ALREADY_EXISTS);
    // Cancelling the first makes room again.
    assert_true(cancel(id1));
    assert_pool_idle(small);
    assert_int_equal(reserve(id3, p, 0, 10000, &r3), RPC_CODE_OK);
    assert_true(cancel(id3));
    assert_pool_idle(small);
    connect_to(G.w);
    decode_worker_destroy(small);
}

// Many requests at once, joining and leaving the batch at different times: FP16 ones give
// the local greedy tokens, every fourth is cancelled after its first token, and afterwards
// every page is back.
static void test_many_concurrent(void **state)
{
    (void)state;
    enum { N = 16 };
    static call_t r[N], d[N];
    char ids[N][32];
    decode_worker_stats_t before, after;
    decode_worker_stats(G.w, &before);
    for (int i = 0; i < N; i++) {
        const prompt_t *p = &G.prompts[i % N_PROMPTS];
        snprintf(ids[i], sizeof(ids[i]), "%s", next_id());
        // A long lease: the test is about batching, and under sanitizers on a busy machine
        // the last requests' KV can come more than 30 s after their reservation.
        assert_int_equal(reserve(ids[i], p, 0, 120000, &r[i]), RPC_CODE_OK);
        // Half the Decode calls come before their KV, half after.
        if (i % 2 == 0)
            start_decode(&d[i], ids[i], r[i].reservation_id, p, N_GEN + 1, false);
    }
    for (int i = 0; i < N; i++) {
        const prompt_t *p = &G.prompts[i % N_PROMPTS];
        assert_int_equal(send_frames(r[i].reservation_id, &p->stream[i % 3 == 0 ? 1 : 0], -1),
                         FY_OK);
        if (i % 2 == 1)
            start_decode(&d[i], ids[i], r[i].reservation_id, p, N_GEN + 1, false);
    }
    bool cancelled[N] = {false};
    uint64_t end = fy_clock_ns() + 300000000000ull;
    for (;;) {
        bool all = true;
        for (int i = 0; i < N; i++) {
            if (i % 4 == 3 && !cancelled[i] && (d[i].n_tokens > 0 || d[i].done)) {
                cancelled[i] = true;
                cancel(ids[i]);
            }
            all = all && d[i].done;
        }
        if (all || fy_clock_ns() > end)
            break;
        uv_run(&G.loop, UV_RUN_ONCE);
    }
    decode_worker_stats(G.w, &after);
    int n_cancelled = 0;
    for (int i = 0; i < N; i++) {
        const prompt_t *p = &G.prompts[i % N_PROMPTS];
        assert_true(d[i].done);
        if (i % 4 == 3 && d[i].code == RPC_CODE_CANCELLED) {
            n_cancelled++;
            continue;
        }
        assert_int_equal(d[i].code, RPC_CODE_OK); // finished before the cancel came, or not
        if (i % 3 != 0 && i % 4 != 3) { // FP16 frames, not cancelled
            if (d[i].n_tokens != p->n_ref) {
                printf("request %d (prompt %d): %d tokens, finish %d:", i, i % N_PROMPTS,
                       d[i].n_tokens, d[i].finish_reason);
                for (int k = 0; k < d[i].n_tokens; k++)
                    printf(" %u", d[i].tokens[k]);
                printf(" | local:");
                for (int k = 0; k < p->n_ref; k++)
                    printf(" %d", p->ref[k]);
                printf("\n");
            }
            assert_same_as_local(&d[i], p);
        }
    }
    printf("%d concurrent requests: %d cancelled mid-stream, %llu tokens in %llu steps\n", N,
           n_cancelled, (unsigned long long)(after.tokens_generated - before.tokens_generated),
           (unsigned long long)(after.steps - before.steps));
    assert_pool_idle(G.w);
}

// A seeded sampled run continues the request's random stream: the worker skips the draw the
// prefill side made for the first token, so the stream equals a local run with that seed.
static void test_seeded_sampling_continues(void **state)
{
    (void)state;
    if (DECODE_TEST_CUDA)
        skip(); // the GPU's logits move the draws' boundaries a little: not the point here
    const prompt_t *p = &G.prompts[1];
    const mdl_config_t *c = mdl_model_config(G.m);
    mdl_sampler_params_t lp;
    mdl_sampler_params_default(&lp);
    lp.temperature = 0.9f;
    lp.top_k = 40;
    lp.top_p = 0.95f;
    lp.seed = 4242;
    lp.max_tokens = 0;
    lp.n_stop = 1;
    lp.stop[0] = mdl_tokenizer_eos(mdl_model_tokenizer(G.m));
    mdl_sampler_t *smp;
    assert_int_equal(mdl_sampler_create(&lp, c->n_vocab, &smp), FY_OK);
    for (int i = 0; i < p->n; i++)
        mdl_sampler_accept(smp, p->ids[i]);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 2;
    mdl_ctx_t *ctx;
    assert_int_equal(mdl_ctx_create(G.m, &cp, &ctx), FY_OK);
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, G.m);
    kp.n_pages = mdl_kv_pages_for(&kp, p->n + N_GEN + 1);
    mdl_kv_t *kv;
    mdl_kv_seq_t *seq;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &seq), FY_OK);
    float *logits = malloc(sizeof(float) * (size_t)c->n_vocab);
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = seq;
    assert_int_equal(mdl_prefill(ctx, p->ids, p->n, &pp, logits), FY_OK);
    int32_t first = mdl_sampler_sample(smp, logits);
    mdl_sampler_accept(smp, first);
    int32_t local[N_GEN];
    int n_local = 0;
    for (int32_t t = first; n_local < N_GEN;) {
        assert_int_equal(mdl_decode(ctx, &seq, &t, 1, logits), FY_OK);
        t = mdl_sampler_sample(smp, logits);
        mdl_sampler_accept(smp, t);
        if (mdl_sampler_done(smp, t))
            break;
        local[n_local++] = t;
    }
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    mdl_ctx_destroy(ctx);
    mdl_sampler_destroy(smp);
    free(logits);

    char id[32];
    snprintf(id, sizeof(id), "%s", next_id());
    call_t r, d;
    assert_int_equal(reserve(id, p, 0, 10000, &r), RPC_CODE_OK);
    assert_int_equal(send_frames(r.reservation_id, &p->stream[0], -1), FY_OK);
    Ferry__V1__SamplingParams sp = FERRY__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = lp.temperature;
    sp.top_k = (uint32_t)lp.top_k;
    sp.top_p = lp.top_p;
    sp.seed = lp.seed;
    sp.max_tokens = N_GEN + 1;
    start_decode_with(&d, id, r.reservation_id, p, &sp, first);
    assert_true(run_until(&d.done, 120000));
    assert_int_equal(d.code, RPC_CODE_OK);
    assert_int_equal(d.n_tokens, n_local);
    for (int i = 0; i < n_local; i++)
        assert_int_equal((int32_t)d.tokens[i], local[i]);
    printf("seeded sampling: %d tokens equal the local run\n", n_local);
    assert_pool_idle(G.w);
}

// Draining refuses new reservations (UNAVAILABLE) and lets the stream in flight finish.
static void test_drain_finishes_in_flight(void **state)
{
    (void)state;
    const prompt_t *p = &G.prompts[0];
    decode_worker_t *w = NULL;
    assert_int_equal(start_worker(64u << 20, &w), FY_OK);
    connect_to(w);
    char id[32];
    snprintf(id, sizeof(id), "%s", next_id());
    call_t r, d, r2;
    assert_int_equal(reserve(id, p, 0, 10000, &r), RPC_CODE_OK);
    assert_int_equal(send_frames(r.reservation_id, &p->stream[0], -1), FY_OK);
    start_decode(&d, id, r.reservation_id, p, N_GEN + 1, true);
    uint64_t end = fy_clock_ns() + 60000000000ull;
    while (d.n_tokens < 1 && !d.done && fy_clock_ns() < end)
        uv_run(&G.loop, UV_RUN_ONCE);
    assert_false(d.done);
    assert_int_equal(decode_worker_drain(w, 0), 1);
    snprintf(id, sizeof(id), "%s", next_id());
    assert_int_equal(reserve(id, p, 0, 10000, &r2), RPC_CODE_UNAVAILABLE);
    assert_true(run_until(&d.done, 120000));
    assert_int_equal(d.code, RPC_CODE_OK);
    assert_int_equal(d.n_tokens, N_GEN);
    assert_pool_idle(w);
    assert_int_equal(decode_worker_drain(w, 1000), 0);
    connect_to(G.w);
    decode_worker_destroy(w);
}

// The real prefill worker (prefill/, in this process) sends to the decode worker: FP16 frames
// give the local greedy run's tokens; the ferry policy at b = 0.25 stays within its budget (on
// these short prompts raised to hold 16 FP16 tokens' bytes) and decodes.
static void test_with_prefill_worker(void **state)
{
    (void)state;
    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    rpc_server_t *srv = NULL;
    assert_int_equal(rpc_server_create(&G.loop, &sp, &srv), FY_OK);
    prefill_params_t pp;
    prefill_params_default(&pp);
    pp.model = G.m;
    pp.fingerprint = mdl_model_fingerprint(G.m);
    pp.n_threads = 2;
    pp.link = G.tx;
    prefill_t *pf = NULL;
    assert_int_equal(prefill_create(&G.loop, &pp, &pf), FY_OK);
    assert_int_equal(prefill_serve(pf, srv), FY_OK);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", rpc_server_port(srv));
    const char *addrs[] = {addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = addrs;
    cp.n_addresses = 1;
    rpc_channel_t *pch = NULL;
    assert_int_equal(rpc_channel_create(&G.loop, &cp, &pch), FY_OK);

    static const struct {
        const char *policy;
        float budget;
        int stream;  // G.prompts[i].stream[] the sizes come from
        bool sealed; // the KV frames cross sealed (kv_key to both workers)
    } runs[] = {{"fp16", 0, 0, false}, {"ferry", 0.25f, 1, false}, {"fp16", 0, 0, true}};
    uint8_t key[KVLINK_SEAL_KEY_BYTES];
    for (int i = 0; i < KVLINK_SEAL_KEY_BYTES; i++)
        key[i] = (uint8_t)(0xa5 ^ i);
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < N_PROMPTS; i++) {
            const prompt_t *p = &G.prompts[i];
            char id[32];
            snprintf(id, sizeof(id), "%s", next_id());
            call_t r, pr, d;
            assert_int_equal(
                reserve_sealed(id, p, runs[k].stream, 10000, runs[k].sealed ? key : NULL, &r),
                RPC_CODE_OK);
            Ferry__V1__CodecParams codec = FERRY__V1__CODEC_PARAMS__INIT;
            codec.policy = (char *)runs[k].policy;
            codec.budget = runs[k].budget;
            Ferry__V1__PrefillRequest req = FERRY__V1__PREFILL_REQUEST__INIT;
            req.request_id = id;
            uint32_t *ids = malloc(sizeof(uint32_t) * (size_t)p->n);
            for (int t = 0; t < p->n; t++)
                ids[t] = (uint32_t)p->ids[t];
            req.n_prompt_token_ids = (size_t)p->n;
            req.prompt_token_ids = ids;
            req.codec = &codec;
            req.decode_kv_address = G.kv_addr;
            req.reservation_id = r.reservation_id;
            req.kv_key.data = key;
            req.kv_key.len = runs[k].sealed ? KVLINK_SEAL_KEY_BYTES : 0;
            start_call_on(pch, &pr, "Prefill", &req.base, &ferry__v1__prefill_response__descriptor);
            free(ids);
            assert_true(run_until(&pr.done, 120000));
            if (pr.code != RPC_CODE_OK)
                fail_msg("Prefill: %s: %s", rpc_code_name(pr.code), pr.msg);
            assert_int_equal((int32_t)pr.prefill.first_token_id, p->first);
            start_decode(&d, id, r.reservation_id, p, N_GEN + 1, false);
            assert_true(run_until(&d.done, 120000));
            double ratio = (double)pr.prefill.kv_wire_bytes / (double)pr.prefill.kv_raw_bytes;
            int agree = 0;
            while (agree < d.n_tokens && agree < p->n_ref && (int32_t)d.tokens[agree] == p->ref[agree])
                agree++;
            printf("prefill worker -> decode worker, %s b=%.2f%s, prompt %d: wire/raw %.3f, "
                   "%d tokens, first %d equal the local greedy run\n",
                   runs[k].policy, runs[k].budget, runs[k].sealed ? " sealed" : "", i, ratio,
                   d.n_tokens, agree);
            assert_int_equal(d.code, RPC_CODE_OK);
            if (runs[k].stream == 0) {
                assert_same_as_local(&d, p);
            } else {
                assert_true(d.n_tokens > 0);
                // Within the budget, which a prompt this short raises (fy_kv_budget_floor).
                const double b = fy_kv_budget_floor(0.25, (size_t)p->n);
                assert_true(b > 0.25);
                assert_true(ratio <= b + 1e-9);
                assert_true(ratio >= 0.8 * b);
            }
            assert_pool_idle(G.w);
        }
    }
    rpc_channel_destroy(pch);
    prefill_destroy(pf);
    rpc_server_destroy(srv);
    run_for(50);
}

/* Without --page-bytes a worker sizes its pages by head_dim: 63 FP16 tokens a page, 16-64 KiB. */
static void test_page_bytes_for(void **state)
{
    (void)state;
    assert_int_equal(decode_page_bytes_for(16), 16384);
    assert_int_equal(decode_page_bytes_for(64), 16384);
    assert_int_equal(decode_page_bytes_for(96), 24576);
    assert_int_equal(decode_page_bytes_for(128), 32768);
    assert_int_equal(decode_page_bytes_for(256), 65536);
    assert_int_equal(decode_page_bytes_for(1024), 65536);
    decode_worker_params_t p;
    decode_worker_params_default(&p);
    assert_int_equal(p.page_bytes, 0);
}

// With --router the worker registers (RPC and KV addresses, the model's fingerprint, its free
// pages), heartbeats its load, and announces draining.
static void test_registers_with_router(void **state)
{
    (void)state;
    router_registry_params_t rp;
    router_registry_params_default(&rp);
    rp.lease_ms = 200;
    router_registry_t *reg = NULL;
    assert_int_equal(router_registry_create(&rp, &reg), FY_OK);
    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    rpc_server_t *srv = NULL;
    assert_int_equal(rpc_server_create(&G.loop, &sp, &srv), FY_OK);
    assert_int_equal(router_registry_serve(srv, reg), FY_OK);
    char router[64];
    snprintf(router, sizeof(router), "127.0.0.1:%d", rpc_server_port(srv));
    decode_worker_t *w = NULL;
    assert_int_equal(start_worker_at(64u << 20, router, &w), FY_OK);
    router_worker_t info;
    uint64_t end = fy_clock_ns() + 20000000000ull;
    bool seen = false;
    while (!seen && fy_clock_ns() < end) {
        run_for(20);
        seen = router_registry_snapshot(reg, &info, 1) == 1 && info.load.total_kv_pages > 0;
    }
    assert_true(seen);
    assert_int_equal(info.role, ROUTER_ROLE_DECODE);
    assert_true(info.model_fingerprint == mdl_model_fingerprint(G.m));
    char want[64];
    snprintf(want, sizeof(want), "127.0.0.1:%d", decode_worker_kv_port(w));
    assert_string_equal(info.kv_address, want);
    snprintf(want, sizeof(want), "127.0.0.1:%d", decode_worker_rpc_port(w));
    assert_string_equal(info.rpc_address, want);
    // SmolLM2's head_dim 64 takes the default page size of 16 KiB.
    assert_int_equal(info.load.page_bytes, 16384);
    assert_int_equal(info.load.total_kv_pages, (64u << 20) / 16384);
    assert_int_equal(info.load.free_kv_pages, info.load.total_kv_pages);
    // Draining reaches the registry with the next heartbeat.
    assert_int_equal(decode_worker_drain(w, 0), 0);
    end = fy_clock_ns() + 10000000000ull;
    while (fy_clock_ns() < end) {
        run_for(20);
        if (router_registry_snapshot(reg, &info, 1) == 1 && info.draining)
            break;
    }
    assert_true(info.draining);
    decode_worker_destroy(w);
    rpc_server_destroy(srv);
    run_for(50);
    router_registry_destroy(reg);
}

int main(void)
{
    if (DECODE_TEST_CUDA) {
        if (fy_cuda_device_count() == 0) {
            printf("SKIP: no CUDA device\n");
            return 77;
        }
        // KV over loopback TCP, as meson's environment says for the CPU build (the offline
        // GPU check runs this without it).
        setenv("UCX_TLS", "tcp", 0);
        setenv("UCX_NET_DEVICES", "lo", 0);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_equals_local_greedy),
        cmocka_unit_test(test_two_in_one_batch),
        cmocka_unit_test(test_corrupt_frame_fails_that_request),
        cmocka_unit_test(test_sealed_frames),
        cmocka_unit_test(test_lease_expires),
        cmocka_unit_test(test_cancel_mid_stream),
        cmocka_unit_test(test_pool_full),
        cmocka_unit_test(test_many_concurrent),
        cmocka_unit_test(test_seeded_sampling_continues),
        cmocka_unit_test(test_drain_finishes_in_flight),
        cmocka_unit_test(test_with_prefill_worker),
        cmocka_unit_test(test_page_bytes_for),
        cmocka_unit_test(test_registers_with_router),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
