// The serving path end to end with the real model (missing model = failure): ferry-router,
// ferry-prefill and ferry-decode as child processes on free ports, UCX over loopback, clients
// through the SDK.
// - greedy through router -> prefill -> UCX -> decode with the fp16 policy gives exactly the
//   tokens of a local greedy run (raw prompts, a chat prompt, prompt token ids);
// - the ferry policy at b = 0.25 completes with wire bytes ~ b x raw;
// - Complete, Tokenize, ListModels; stop strings; concurrent streams, after which the decode
//   pool has all its pages back; client cancel and deadlines get their status;
// - killing the decode worker mid-request gives the client an error, not a hang, and the
//   router stays up; SIGTERM drains every daemon with a request in flight.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <math.h>
#include <poll.h>

#include <cjson/cJSON.h>

#include "client_util.h"
#include "model.h"

static struct {
    const char *model_path;
    mdl_model_t *model;
    const mdl_config_t *cfg;
    mdl_ctx_t *ctx;
    du_proc_t router, prefill, decode;
    int decode_port, decode_kv_port;
    char router_addr[32];
    ferry_client_t *client;
    int32_t stops[2];
    int n_stops;
} G;

/* ---- local reference -------------------------------------------------------------------- */

static int32_t *tokenize_local(const char *text, bool chat, size_t *n_p)
{
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    char *rendered = NULL;
    if (chat) {
        mdl_chat_msg_t m = {"user", text};
        assert_int_equal(mdl_chat_render(tok, &m, 1, true, &rendered), FY_OK);
        text = rendered;
    }
    size_t n = 0, len = strlen(text);
    mdl_tokenizer_encode(tok, text, len, chat, NULL, 0, &n);
    size_t off = mdl_tokenizer_add_bos(tok) ? 1 : 0;
    int32_t *ids = malloc((n + 1) * sizeof(int32_t));
    assert_int_equal(mdl_tokenizer_encode(tok, text, len, chat, ids + off, n, &n), FY_OK);
    if (off)
        ids[0] = mdl_tokenizer_bos(tok);
    free(rendered);
    *n_p = n + off;
    return ids;
}

static bool is_stop(int32_t id)
{
    for (int i = 0; i < G.n_stops; i++)
        if (G.stops[i] == id)
            return true;
    return false;
}

/* Greedy continuation of ids[n] as `ferry generate --local --temperature 0` produces it: up to
 * max_tokens sampled, the stop token ending it (and not part of the output). */
/* A local run after ids[n], as `ferry generate --local --temperature 0` makes it: greedy, up to
 * max_tokens, a stop token ending it (and not part of the output); or, with forced, those
 * n_forced tokens in turn (teacher forcing). Each output token goes to out and its
 * log-probability to lp (either may be NULL). Returns the tokens output. */
static size_t local_run(const int32_t *ids, size_t n, int max_tokens, const int32_t *forced,
                        size_t n_forced, int32_t *out, float *lp)
{
    if (forced != NULL)
        max_tokens = (int)n_forced;
    mdl_kv_params_t kp;
    mdl_kv_params_default(&kp, G.model);
    kp.n_pages = mdl_kv_pages_for(&kp, (int64_t)n + max_tokens + 1);
    mdl_kv_t *kv = NULL;
    mdl_kv_seq_t *seq = NULL;
    assert_int_equal(mdl_kv_create(&kp, &kv), FY_OK);
    assert_int_equal(mdl_kv_seq_create(kv, &seq), FY_OK);
    float *logits = malloc((size_t)G.cfg->n_vocab * sizeof(float));
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.seq = seq;
    assert_int_equal(mdl_prefill(G.ctx, ids, (int)n, &pp, logits), FY_OK);
    size_t n_out = 0;
    for (int i = 0; i < max_tokens; i++) {
        int32_t next = 0;
        if (forced != NULL) {
            next = forced[i];
        } else {
            for (int v = 1; v < G.cfg->n_vocab; v++)
                next = logits[v] > logits[next] ? v : next;
            if (is_stop(next))
                break;
        }
        if (lp != NULL)
            lp[n_out] = mdl_logprobs(logits, G.cfg->n_vocab, next, 0, NULL, NULL);
        if (out != NULL)
            out[n_out] = next;
        n_out++;
        if (i + 1 == max_tokens)
            break;
        assert_int_equal(mdl_decode(G.ctx, &seq, &next, 1, logits), FY_OK);
    }
    free(logits);
    mdl_kv_seq_destroy(seq);
    mdl_kv_destroy(kv);
    return n_out;
}

/* Greedy continuation of ids[n] (local_run). */
static size_t local_greedy(const int32_t *ids, size_t n, int max_tokens, int32_t *out)
{
    return local_run(ids, n, max_tokens, NULL, 0, out, NULL);
}

/* ---- cluster ------------------------------------------------------------------------------ */

static bool router_serving(uint32_t timeout_ms)
{
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    while (fy_clock_ns() < end) {
        Ferry__V1__HealthResponse *h = NULL;
        ferry_error_t err;
        if (ferry_health(G.client, NULL, &h, &err) == 0) {
            bool ok = h->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
            ferry_message_free(h);
            if (ok)
                return true;
        }
        fy_sleep_ns(100 * 1000000ull);
    }
    return false;
}

static fy_status_t start_decode(void)
{
    char listen[32], kv[32], router[32];
    G.decode_port = du_free_port();
    G.decode_kv_port = du_free_port();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", G.decode_port);
    snprintf(kv, sizeof(kv), "127.0.0.1:%d", G.decode_kv_port);
    snprintf(router, sizeof(router), "%s", G.router_addr);
    const char *args[] = {"--model", G.model_path, "--listen", listen, "--kv-listen", kv,
                          "--router", router, "--threads", "1", "--kv-memory", "256M",
                          "--page-bytes", "8K",
                          "--log-level", "warn", NULL};
    fy_status_t st = du_start_ex(&G.decode, "decode", "decode/ferry-decode", args, false, 0);
    G.decode.port = G.decode_port;
    return st;
}

static int group_setup(void **state)
{
    G.model_path = du_model_path();
    if (G.model_path == NULL)
        return -1;
    mdl_model_params_t mp;
    mdl_model_params_default(&mp);
    mp.path = G.model_path;
    char err[MDL_ERR_LEN];
    if (mdl_model_create(&mp, &G.model, err, sizeof(err)) != FY_OK)
        return -1;
    G.cfg = mdl_model_config(G.model);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = 1;
    cp.max_batch = 1;
    if (mdl_ctx_create(G.model, &cp, &G.ctx) != FY_OK)
        return -1;
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    G.stops[G.n_stops++] = mdl_tokenizer_eos(tok);
    int32_t im_end = mdl_tokenizer_find(tok, "<|im_end|>");
    if (im_end >= 0 && im_end != G.stops[0])
        G.stops[G.n_stops++] = im_end;

    // The router reads a YAML config file; flags override it. Reservations outlive the prefill
    // queue even when 32 streams arrive at once on a slow (sanitizer) build.
    static char cfg_path[256];
    snprintf(cfg_path, sizeof(cfg_path), "%s/ferry-router-%d.yaml",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    FILE *cf = fopen(cfg_path, "w");
    if (cf == NULL)
        return -1;
    fprintf(cf, "# e2e router\nlease: 500ms\nreserve-lease: 10m\nmax_tokens: 64\n"
                "log-level: debug\n");
    fclose(cf);
    const char *rargs[] = {"--config", cfg_path, "--model", G.model_path, "--log-level", "warn",
                           NULL};
    if (du_start(&G.router, "router", "router/ferry-router", rargs, 60000) != FY_OK) {
        du_dump_log(&G.router);
        return -1;
    }
    snprintf(G.router_addr, sizeof(G.router_addr), "127.0.0.1:%d", G.router.port);
    if (start_decode() != FY_OK)
        return -1;
    const char *pargs[] = {"--model", G.model_path, "--router", G.router_addr, "--threads", "1",
                           "--log-level", "warn", NULL};
    if (du_start(&G.prefill, "prefill", "prefill/ferry-prefill", pargs, 120000) != FY_OK) {
        du_dump_log(&G.prefill);
        return -1;
    }
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router_addr;
    p.timeout_ms = 120000;
    if (ferry_client_create(&p, &G.client) != 0)
        return -1;
    if (!router_serving(180000)) {
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
    ferry_client_destroy(G.client);
    du_kill(&G.router);
    du_kill(&G.prefill);
    du_kill(&G.decode);
    mdl_ctx_destroy(G.ctx);
    mdl_model_destroy(G.model);
    return 0;
}

/* ---- generation through the router -------------------------------------------------------- */

typedef struct {
    uint32_t ids[1024];
    size_t n_ids;
    char text[16384];
    size_t text_len;
    unsigned n_msgs;
    Ferry__V1__FinishReason finish;
    Ferry__V1__RequestStats stats;
    bool have_stats;
    unsigned cancel_after; // return non-zero from the callback after this many messages
    void (*on_first)(void);
    uint32_t lp_ids[1024]; // the stream's log-probability entries: token and log-probability
    float lps[1024];
    size_t n_lps;
    float prompt_lps[1024]; // the stream's prompt_logprobs, and in which message they came
    size_t n_prompt_lps;
    unsigned prompt_lps_msg;
} gen_t;

static int on_chunk(void *arg, const Ferry__V1__GenerateResponse *m)
{
    gen_t *g = arg;
    g->n_msgs++;
    for (size_t i = 0; i < m->n_token_ids && g->n_ids < 1024; i++)
        g->ids[g->n_ids++] = m->token_ids[i];
    for (size_t i = 0; i < m->n_logprobs && g->n_lps < 1024; i++) {
        g->lp_ids[g->n_lps] = m->logprobs[i]->token_id;
        g->lps[g->n_lps++] = m->logprobs[i]->logprob;
    }
    if (m->n_prompt_logprobs > 0)
        g->prompt_lps_msg = g->n_msgs;
    for (size_t i = 0; i < m->n_prompt_logprobs && g->n_prompt_lps < 1024; i++)
        g->prompt_lps[g->n_prompt_lps++] = m->prompt_logprobs[i]->logprob;
    size_t l = strlen(m->text);
    if (g->text_len + l < sizeof(g->text)) {
        memcpy(g->text + g->text_len, m->text, l + 1);
        g->text_len += l;
    }
    if (m->finish_reason != FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED)
        g->finish = m->finish_reason;
    if (m->stats != NULL) {
        g->stats = *m->stats;
        g->stats.prefill_worker = g->stats.decode_worker = g->stats.policy = NULL;
        g->have_stats = true;
    }
    if (g->n_msgs == 1 && g->on_first)
        g->on_first();
    return g->cancel_after && g->n_msgs >= g->cancel_after;
}

typedef struct {
    const char *prompt;
    bool chat;
    const uint32_t *ids;
    size_t n_ids;
    const char *policy;
    float budget;
    uint32_t max_tokens;
    const char *stop;
    uint32_t logprobs; // > 0: logprobs with that many alternatives
    bool prompt_logprobs;
} gen_req_t;

static int generate(ferry_client_t *client, const gen_req_t *q, gen_t *g, ferry_error_t *err)
{
    Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
    Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
    Ferry__V1__CodecParams codec = FERRY__V1__CODEC_PARAMS__INIT;
    Ferry__V1__ChatMessages chat = FERRY__V1__CHAT_MESSAGES__INIT;
    Ferry__V1__ChatMessage user = FERRY__V1__CHAT_MESSAGE__INIT;
    Ferry__V1__ChatMessage *msgs[1] = {&user};
    Ferry__V1__TokenIds tids = FERRY__V1__TOKEN_IDS__INIT;
    char *stops[1] = {(char *)q->stop};
    if (q->ids != NULL) {
        tids.ids = (uint32_t *)q->ids;
        tids.n_ids = q->n_ids;
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS;
        req.prompt_token_ids = &tids;
    } else if (q->chat) {
        user.role = "user";
        user.content = (char *)q->prompt;
        chat.messages = msgs;
        chat.n_messages = 1;
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_CHAT;
        req.chat = &chat;
    } else {
        req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
        req.prompt = (char *)q->prompt;
    }
    s.temperature = 0;
    s.max_tokens = q->max_tokens;
    s.logprobs = q->logprobs > 0;
    s.top_logprobs = q->logprobs;
    s.prompt_logprobs = q->prompt_logprobs;
    if (q->stop != NULL) {
        s.stop = stops;
        s.n_stop = 1;
    }
    req.sampling = &s;
    codec.policy = (char *)(q->policy ? q->policy : "");
    codec.budget = q->budget;
    req.codec = &codec;
    req.return_token_ids = true;
    return ferry_generate(client, &req, on_chunk, g, err);
}

/* The prefill worker's times reach the client and fit inside the router's TTFT, which spans
 * the queue wait, the compute pass and the transfer's tail (durations from the processes'
 * own monotonic clocks). */
static void expect_stage_times(const Ferry__V1__RequestStats *s)
{
    fprintf(stderr, "ttft %.1f ms: queued %.1f, prefill %.1f, transfer %.1f ms (%.0f%% hidden)\n",
            s->ttft_ms, s->queue_ms, s->prefill_ms, s->transfer_ms,
            s->hidden_transfer_fraction * 100);
    assert_true(s->prefill_ms > 0);
    assert_true(s->prefill_ms <= s->ttft_ms);
    assert_true(s->transfer_ms > 0);
    assert_true(s->transfer_ms <= s->ttft_ms);
    assert_true(s->queue_ms >= 0);
    assert_true(s->queue_ms + s->prefill_ms <= s->ttft_ms);
    assert_true(s->hidden_transfer_fraction >= 0 && s->hidden_transfer_fraction <= 1);
}

static void expect_local(const gen_req_t *q, const int32_t *prompt, size_t n_prompt)
{
    int32_t want[256];
    size_t n_want = local_greedy(prompt, n_prompt, (int)q->max_tokens, want);
    gen_t *g = calloc(1, sizeof(*g));
    ferry_error_t err;
    int code = generate(G.client, q, g, &err);
    if (code != 0)
        fprintf(stderr, "Generate: %s %s\n", ferry_code_name(code), err.message);
    assert_int_equal(code, 0);
    fprintf(stderr, "fp16 through the router: %zu tokens, local: %zu; \"%s\"\n", g->n_ids, n_want,
            g->text);
    assert_int_equal(g->n_ids, n_want);
    for (size_t i = 0; i < n_want; i++)
        assert_int_equal(g->ids[i], (uint32_t)want[i]);
    // The text is the detokenized ids.
    mdl_detok_t d;
    mdl_detok_init(&d, mdl_model_tokenizer(G.model), true);
    char text[16384] = "";
    size_t tl = 0;
    for (size_t i = 0; i < n_want; i++)
        tl += (size_t)mdl_detok_push(&d, want[i], text + tl, sizeof(text) - tl);
    tl += (size_t)mdl_detok_flush(&d, text + tl, sizeof(text) - tl);
    assert_string_equal(g->text, text);
    assert_true(g->have_stats);
    assert_int_equal(g->stats.prompt_tokens, n_prompt);
    assert_true(g->stats.ttft_ms > 0);
    assert_true(g->stats.kv_wire_bytes > g->stats.kv_raw_bytes); // FP16 plus headers
    expect_stage_times(&g->stats);
    assert_int_equal(g->finish, n_want < q->max_tokens
                                    ? FERRY__V1__FINISH_REASON__FINISH_REASON_STOP
                                    : FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    free(g);
}

static void test_fp16_greedy_matches_local(void **state)
{
    static const char *const prompts[] = {"The capital of France is",
                                          "Here is a short poem about the sea:\n",
                                          "def fibonacci(n):"};
    for (size_t i = 0; i < FY_ARRAY_SIZE(prompts); i++) {
        size_t n;
        int32_t *ids = tokenize_local(prompts[i], false, &n);
        gen_req_t q = {.prompt = prompts[i], .policy = "fp16", .max_tokens = 24};
        expect_local(&q, ids, n);
        free(ids);
    }
    // A chat prompt (template rendered by the router) and pre-tokenized input.
    size_t n;
    int32_t *ids = tokenize_local("What is the capital of France?", true, &n);
    gen_req_t q = {.prompt = "What is the capital of France?", .chat = true, .policy = "fp16",
                   .max_tokens = 40};
    expect_local(&q, ids, n);
    uint32_t *u = malloc(n * sizeof(uint32_t));
    for (size_t i = 0; i < n; i++)
        u[i] = (uint32_t)ids[i];
    gen_req_t q2 = {.ids = u, .n_ids = n, .policy = "fp16", .max_tokens = 16};
    expect_local(&q2, ids, n);
    free(u);
    free(ids);
}

static void test_ferry_budget(void **state)
{
    char prompt[4096] = "Summarize the following notes.\n";
    static const char *const lines[] = {
        "The river rose two meters after the storm and the bridge was closed for a day. ",
        "Farmers moved their animals to higher fields and the school opened late. ",
        "By the evening the water went down and the roads were cleared by volunteers. "};
    for (int i = 0; i < 6; i++)
        strcat(prompt, lines[i % 3]);
    gen_t *g = calloc(1, sizeof(*g));
    ferry_error_t err;
    gen_req_t q = {.prompt = prompt, .policy = "ferry", .budget = 0.25f, .max_tokens = 16};
    int code = generate(G.client, &q, g, &err);
    assert_int_equal(code, 0);
    assert_true(g->have_stats);
    double ratio = (double)g->stats.kv_wire_bytes / (double)g->stats.kv_raw_bytes;
    fprintf(stderr, "ferry b=0.25: %u prompt tokens, KV %llu -> %llu bytes (%.4f), ttft %.1f ms\n",
            g->stats.prompt_tokens, (unsigned long long)g->stats.kv_raw_bytes,
            (unsigned long long)g->stats.kv_wire_bytes, ratio, g->stats.ttft_ms);
    assert_true(g->stats.prompt_tokens > 80);
    assert_true(ratio <= 0.25 * 1.01 && ratio >= 0.25 * 0.8);
    assert_true(g->n_ids >= 1);
    assert_true(g->stats.completion_tokens >= 1);
    assert_true(fabs(g->stats.budget - 0.25) < 1e-6);
    expect_stage_times(&g->stats);
    // A prompt under FY_KV_FLOOR_TOKENS goes whole whatever the budget (fy_kv_budget_floor),
    // every token FP16: the frames of policy "fp16", byte for byte as many; one of 2 x that
    // many at half.
    static const struct {
        const char *prompt;
        double budget;
    } k_short[] = {{"The capital of France is", 1.0},
                   {"one two three four five six seven eight nine ten eleven twelve thirteen "
                    "fourteen fifteen sixteen seventeen eighteen nineteen twenty twenty-one "
                    "twenty-two twenty-three twenty-four twenty-five twenty-six",
                    0}};
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_short); i++) {
        memset(g, 0, sizeof(*g));
        q.prompt = k_short[i].prompt;
        q.max_tokens = 4;
        assert_int_equal(generate(G.client, &q, g, &err), 0);
        const double want = k_short[i].budget > 0
                                ? k_short[i].budget
                                : (double)FY_KV_FLOOR_TOKENS / g->stats.prompt_tokens;
        ratio = (double)g->stats.kv_wire_bytes / (double)g->stats.kv_raw_bytes;
        fprintf(stderr, "ferry b=0.25, %u prompt tokens: budget %.4f, wire/raw %.4f\n",
                g->stats.prompt_tokens, (double)g->stats.budget, ratio);
        assert_true(fabs(g->stats.budget - want) < 1e-6);
        assert_true(want > 0.25 && want <= 1);
        if (want < 1) {
            assert_true(ratio <= want * 1.01 && ratio >= want * 0.8);
            continue;
        }
        const uint64_t wire = g->stats.kv_wire_bytes;
        gen_req_t f16 = q;
        f16.policy = "fp16";
        f16.budget = 0;
        memset(g, 0, sizeof(*g));
        assert_int_equal(generate(G.client, &f16, g, &err), 0);
        assert_int_equal(wire, g->stats.kv_wire_bytes);
    }
    free(g);
}

/* "The capital of France is", 8 tokens, greedy, FP16 KV. */
static void france_request(Ferry__V1__GenerateRequest *req, Ferry__V1__SamplingParams *s,
                           Ferry__V1__CodecParams *codec)
{
    ferry__v1__generate_request__init(req);
    ferry__v1__sampling_params__init(s);
    ferry__v1__codec_params__init(codec);
    req->input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
    req->prompt = "The capital of France is";
    s->max_tokens = 8;
    req->sampling = s;
    codec->policy = "fp16";
    req->codec = codec;
}

/* france_request's, as one user message of a chat (the message and list in *chat). */
typedef struct {
    Ferry__V1__ChatMessages list;
    Ferry__V1__ChatMessage user, *msgs[1];
} one_chat_t;

static void chat_request(Ferry__V1__GenerateRequest *req, Ferry__V1__SamplingParams *s,
                         Ferry__V1__CodecParams *codec, one_chat_t *chat, const char *content)
{
    france_request(req, s, codec);
    ferry__v1__chat_messages__init(&chat->list);
    ferry__v1__chat_message__init(&chat->user);
    chat->user.role = "user";
    chat->user.content = (char *)content;
    chat->msgs[0] = &chat->user;
    chat->list.messages = chat->msgs;
    chat->list.n_messages = 1;
    req->input_case = FERRY__V1__GENERATE_REQUEST__INPUT_CHAT;
    req->chat = &chat->list;
}

static void test_complete_tokenize_models(void **state)
{
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    france_request(&req, &s, &codec);
    req.request_id = "mine-1";
    Ferry__V1__CompleteResponse *c = NULL;
    ferry_error_t err;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    size_t n;
    int32_t *ids = tokenize_local(req.prompt, false, &n);
    int32_t want[16];
    size_t n_want = local_greedy(ids, n, 8, want);
    mdl_detok_t d;
    mdl_detok_init(&d, mdl_model_tokenizer(G.model), true);
    char text[1024];
    size_t tl = 0;
    for (size_t i = 0; i < n_want; i++)
        tl += (size_t)mdl_detok_push(&d, want[i], text + tl, sizeof(text) - tl);
    assert_string_equal(c->text, text);
    assert_string_equal(c->request_id, "mine-1");
    assert_non_null(c->stats);
    assert_int_equal(c->stats->completion_tokens, 8);
    expect_stage_times(c->stats);
    ferry_message_free(c);

    Ferry__V1__TokenizeRequest tr = FERRY__V1__TOKENIZE_REQUEST__INIT;
    tr.text = "The capital of France is";
    tr.add_special = false;
    Ferry__V1__TokenizeResponse *t = NULL;
    assert_int_equal(ferry_tokenize(G.client, &tr, &t, &err), 0);
    size_t off = mdl_tokenizer_add_bos(mdl_model_tokenizer(G.model)) ? 1 : 0;
    assert_int_equal(t->n_ids, n - off);
    for (size_t i = 0; i < t->n_ids; i++)
        assert_int_equal(t->ids[i], (uint32_t)ids[i + off]);
    assert_int_equal(t->n_pieces, t->n_ids);
    ferry_message_free(t);
    free(ids);

    Ferry__V1__ListModelsResponse *lm = NULL;
    assert_int_equal(ferry_list_models(G.client, &lm, &err), 0);
    assert_int_equal(lm->n_models, 1);
    assert_int_equal(lm->models[0]->n_layers, G.cfg->n_layers);
    assert_int_equal(lm->models[0]->n_kv_heads, G.cfg->n_kv_heads);
    assert_true(lm->models[0]->fingerprint == mdl_model_fingerprint(G.model));
    ferry_message_free(lm);

    // max_tokens 0 takes the router's default, 64 from its config file.
    s.max_tokens = 0;
    s.ignore_eos = true;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_int_equal(c->stats->completion_tokens, 64);
    assert_int_equal(c->finish_reason, FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    ferry_message_free(c);
    s.ignore_eos = false;

    // Bad input: an unknown model, an out-of-range budget.
    req.model = "no-such-model";
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_NOT_FOUND);
    req.model = "";
    codec.budget = 3;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    codec.budget = 0;
    // Text that is not UTF-8 (proto3 strings must be): a prompt, a stop string, Tokenize.
    req.prompt = "The capital of \xff";
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    req.prompt = "The capital of France is";
    char *bad_stop = "\xa9";
    s.stop = &bad_stop;
    s.n_stop = 1;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    s.n_stop = 0;
    s.stop = NULL;
    tr.text = "caf\xc3";
    assert_int_equal(ferry_tokenize(G.client, &tr, &t, &err), RPC_CODE_INVALID_ARGUMENT);
}

/* Log-probabilities: greedy tokens come with the model's own log-probability (the local
 * model's within fp16 rounding), the chosen token first among its alternatives, which are in
 * descending order with their bytes; a stream carries the same entries; more than 20
 * alternatives is refused. */
static void test_logprobs(void **state)
{
    (void)state;
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    france_request(&req, &s, &codec);
    s.logprobs = true;
    s.top_logprobs = 3;
    Ferry__V1__CompleteResponse *c = NULL;
    ferry_error_t err;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    size_t n;
    int32_t *ids = tokenize_local(req.prompt, false, &n);
    int32_t want[16];
    float want_lp[16];
    size_t n_want = local_run(ids, n, 8, NULL, 0, want, want_lp);
    free(ids);
    assert_int_equal(c->n_logprobs, n_want);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    for (size_t i = 0; i < c->n_logprobs; i++) {
        const Ferry__V1__TokenLogprob *e = c->logprobs[i];
        assert_int_equal(e->token_id, (uint32_t)want[i]);
        assert_true(e->logprob <= 0.0f);
        assert_float_equal(e->logprob, want_lp[i], 0.05);
        char piece[256];
        int l = mdl_tokenizer_token_bytes(tok, want[i], piece, sizeof(piece));
        assert_int_equal(e->token.len, (size_t)l);
        assert_memory_equal(e->token.data, piece, (size_t)l);
        assert_int_equal(e->n_top, 3);
        assert_int_equal(e->top[0]->token_id, e->token_id); // greedy: the most likely
        assert_float_equal(e->top[0]->logprob, e->logprob, 1e-6);
        for (size_t k = 1; k < e->n_top; k++) {
            assert_true(e->top[k]->logprob <= e->top[k - 1]->logprob);
            assert_int_not_equal(e->top[k]->token_id, e->token_id);
            assert_true(e->top[k]->token.len > 0);
        }
    }
    // A stream: the same entries, over its messages.
    gen_t *g = calloc(1, sizeof(*g));
    gen_req_t q = {.prompt = req.prompt, .policy = "fp16", .max_tokens = 8, .logprobs = 3};
    assert_int_equal(generate(G.client, &q, g, &err), 0);
    assert_int_equal(g->n_lps, c->n_logprobs);
    for (size_t i = 0; i < g->n_lps; i++) {
        assert_int_equal(g->lp_ids[i], c->logprobs[i]->token_id);
        assert_float_equal(g->lps[i], c->logprobs[i]->logprob, 1e-6);
    }
    free(g);
    ferry_message_free(c);
    // Without logprobs, none; more than 20 alternatives: refused.
    s.logprobs = false;
    s.top_logprobs = 0;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_int_equal(c->n_logprobs, 0);
    ferry_message_free(c);
    s.top_logprobs = 21;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
}

/* Prompt log-probabilities: every prompt token, the first without one, each token i the local
 * model's log-probability of it after tokens 0 .. i-1 (every position's logits), with its
 * alternatives in order and the token's bytes; a stream carries them in its first message;
 * they score the prompt as teacher forcing scores the same tokens as a completion. */
static void test_prompt_logprobs(void **state)
{
    (void)state;
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    france_request(&req, &s, &codec);
    req.prompt = "The capital of France is Paris, and the capital of Italy is";
    s.prompt_logprobs = true;
    s.top_logprobs = 2;
    s.max_tokens = 2;
    ferry_error_t err;
    Ferry__V1__CompleteResponse *c = NULL;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    size_t n;
    int32_t *ids = tokenize_local(req.prompt, false, &n);
    assert_int_equal(c->n_prompt_logprobs, n);
    // The reference: every position's logits from the local model.
    float *all = malloc(n * (size_t)G.cfg->n_vocab * sizeof(float));
    mdl_prefill_params_t pp;
    mdl_prefill_params_default(&pp);
    pp.all_logits = true;
    assert_int_equal(mdl_prefill(G.ctx, ids, (int)n, &pp, all), FY_OK);
    const mdl_tokenizer_t *tok = mdl_model_tokenizer(G.model);
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        const Ferry__V1__TokenLogprob *e = c->prompt_logprobs[i];
        assert_int_equal(e->token_id, (uint32_t)ids[i]);
        char piece[256];
        int l = mdl_tokenizer_token_bytes(tok, ids[i], piece, sizeof(piece));
        assert_int_equal(e->token.len, (size_t)l);
        assert_memory_equal(e->token.data, piece, (size_t)l);
        if (i == 0) {
            assert_true(isnan(e->logprob));
            assert_int_equal(e->n_top, 0);
            continue;
        }
        float want = mdl_logprobs(all + (i - 1) * (size_t)G.cfg->n_vocab, G.cfg->n_vocab, ids[i], 0,
                                  NULL, NULL);
        assert_float_equal(e->logprob, want, 1e-3);
        assert_int_equal(e->n_top, 2);
        assert_true(e->top[0]->logprob >= e->top[1]->logprob);
        assert_true(e->top[0]->logprob >= e->logprob - 1e-6f);
        sum += e->logprob;
    }
    fprintf(stderr, "prompt of %zu tokens: log-probability %.3f\n", n, sum);
    assert_true(sum < 0);
    ferry_message_free(c);

    // A stream: the same numbers, all in the first message.
    gen_t *g = calloc(1, sizeof(*g));
    gen_req_t q = {
        .prompt = req.prompt, .policy = "fp16", .max_tokens = 4, .prompt_logprobs = true};
    assert_int_equal(generate(G.client, &q, g, &err), 0);
    assert_int_equal(g->n_prompt_lps, n);
    assert_int_equal(g->prompt_lps_msg, 1);
    for (size_t i = 1; i < n; i++)
        assert_float_equal(g->prompt_lps[i],
                           mdl_logprobs(all + (i - 1) * (size_t)G.cfg->n_vocab, G.cfg->n_vocab,
                                        ids[i], 0, NULL, NULL),
                           1e-3);
    assert_int_equal(g->n_lps, 0); // no completion log-probabilities asked for
    free(g);
    free(all);
    free(ids);

    // Longer than the logits the prefill worker holds at once (512 MiB): refused, saying so.
    const size_t n_long = ((size_t)512 << 20) / ((size_t)G.cfg->n_vocab * sizeof(float)) + 1;
    Ferry__V1__TokenIds tids = FERRY__V1__TOKEN_IDS__INIT;
    tids.ids = calloc(n_long, sizeof(uint32_t));
    tids.n_ids = n_long;
    for (size_t i = 0; i < n_long; i++)
        tids.ids[i] = 100 + (uint32_t)(i % 1000);
    req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS;
    req.prompt_token_ids = &tids;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    fprintf(stderr, "%zu tokens: %s\n", n_long, err.message);
    assert_non_null(strstr(err.message, "prompt_logprobs"));
    free(tids.ids);
}

/* Teacher forcing: the completion is the forced tokens, an EOS among them included, each with
 * the local model's log-probability (within fp16 rounding); the greedy tokens forced give the
 * greedy run's log-probabilities; out-of-vocabulary ids, stop strings and a short max_tokens
 * are refused. */
static void test_forced_tokens(void **state)
{
    (void)state;
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    france_request(&req, &s, &codec);
    s.logprobs = true;
    req.return_token_ids = true;
    ferry_error_t err;
    Ferry__V1__CompleteResponse *greedy = NULL, *c = NULL;
    assert_int_equal(ferry_complete(G.client, &req, &greedy, &err), 0);
    s.forced_token_ids = greedy->token_ids;
    s.n_forced_token_ids = greedy->n_token_ids;
    s.max_tokens = 0;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_int_equal(c->n_token_ids, greedy->n_token_ids);
    assert_memory_equal(c->token_ids, greedy->token_ids, c->n_token_ids * sizeof(uint32_t));
    assert_string_equal(c->text, greedy->text);
    for (size_t i = 0; i < c->n_logprobs; i++)
        assert_float_equal(c->logprobs[i]->logprob, greedy->logprobs[i]->logprob, 1e-4);
    ferry_message_free(c);
    ferry_message_free(greedy);

    // Another continuation, EOS in its middle.
    size_t n, n_cont;
    int32_t *ids = tokenize_local(req.prompt, false, &n);
    int32_t *cont = tokenize_local(" Lyon, a city of lights and", false, &n_cont);
    const size_t bos = mdl_tokenizer_add_bos(mdl_model_tokenizer(G.model)) ? 1 : 0;
    int32_t f[16];
    uint32_t fu[16];
    size_t n_f = 0;
    for (size_t i = bos; i < n_cont && n_f < 12; i++)
        f[n_f++] = cont[i];
    assert_true(n_f >= 4);
    f[n_f++] = G.stops[0];
    f[n_f++] = f[0];
    for (size_t i = 0; i < n_f; i++)
        fu[i] = (uint32_t)f[i];
    free(cont);
    float want[16];
    local_run(ids, n, 0, f, n_f, NULL, want);
    s.forced_token_ids = fu;
    s.n_forced_token_ids = n_f;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_int_equal(c->n_token_ids, n_f);
    assert_memory_equal(c->token_ids, fu, n_f * sizeof(uint32_t));
    assert_int_equal(c->n_logprobs, n_f);
    for (size_t i = 0; i < n_f; i++)
        assert_float_equal(c->logprobs[i]->logprob, want[i], 0.05);
    assert_int_equal(c->finish_reason, FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH);
    ferry_message_free(c);
    free(ids);

    // Refused: an id outside the vocabulary, stop strings with them, max_tokens below them.
    fu[1] = (uint32_t)G.cfg->n_vocab;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    fu[1] = fu[0];
    char *stop = "x";
    s.stop = &stop;
    s.n_stop = 1;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    s.n_stop = 0;
    s.max_tokens = 2;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
}

/* JSON mode through the router: a chat asking for JSON gets one complete JSON object (the
 * prefill worker samples its first token, the decode worker the rest) and stops there; the
 * same request without it answers in prose; with forced tokens it is refused. */
static void test_json_mode(void **state)
{
    (void)state;
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    one_chat_t chat;
    chat_request(&req, &s, &codec, &chat,
                 "Give the name and capital of France as JSON with keys country and capital.");
    s.max_tokens = 80;
    s.json_object = true;
    ferry_error_t err;
    Ferry__V1__CompleteResponse *c = NULL;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    fprintf(stderr, "JSON mode: %s\n", c->text);
    mdl_json_t j;
    mdl_json_init(&j);
    assert_true(mdl_json_feed(&j, (const uint8_t *)c->text, strlen(c->text)));
    assert_true(mdl_json_complete(&j));
    assert_int_equal(c->finish_reason, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP);
    ferry_message_free(c);
    s.json_object = false;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_true(c->text[0] != '{');
    ferry_message_free(c);
    // Not with forced tokens.
    uint32_t f[2] = {100, 101};
    s.json_object = true;
    s.forced_token_ids = f;
    s.n_forced_token_ids = 2;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
}

/* Structured output through the router: with a schema, the answer is a document of it (the
 * country and capital as strings, the population an integer, the continent one of the enum's
 * values, in that order) and stops there, whichever worker samples which token; a schema the
 * guide cannot follow, or one with JSON mode, is refused with the reason. */
static void test_json_schema(void **state)
{
    (void)state;
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    one_chat_t chat;
    chat_request(&req, &s, &codec, &chat,
                 "Describe France as JSON: its name, capital, population and continent.");
    s.max_tokens = 120;
    char schema[] = "{\"type\": \"object\", \"properties\": {"
                    "\"country\": {\"type\": \"string\", \"maxLength\": 40},"
                    "\"capital\": {\"type\": \"string\", \"maxLength\": 40},"
                    "\"population\": {\"type\": \"integer\"},"
                    "\"continent\": {\"enum\": [\"Europe\", \"Asia\", \"Africa\", \"America\"]}},"
                    "\"required\": [\"country\", \"capital\", \"population\", \"continent\"],"
                    "\"additionalProperties\": false}";
    s.json_schema = schema;
    for (int temp = 0; temp < 2; temp++) {
        s.temperature = temp ? 1.0f : 0.0f;
        s.seed = 7;
        ferry_error_t err;
        Ferry__V1__CompleteResponse *c = NULL;
        assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
        fprintf(stderr, "JSON schema (temperature %d): %s\n", temp, c->text);
        assert_int_equal(c->finish_reason, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP);
        cJSON *doc = cJSON_Parse(c->text);
        assert_true(cJSON_IsObject(doc));
        assert_int_equal(cJSON_GetArraySize(doc), 4);
        static const char *const keys[] = {"country", "capital", "population", "continent"};
        const cJSON *f = doc->child;
        for (int i = 0; i < 4; i++, f = f->next)
            assert_string_equal(f->string, keys[i]);
        assert_true(cJSON_IsString(cJSON_GetObjectItem(doc, "country")));
        assert_true(cJSON_IsString(cJSON_GetObjectItem(doc, "capital")));
        const cJSON *pop = cJSON_GetObjectItem(doc, "population");
        assert_true(cJSON_IsNumber(pop) && pop->valuedouble == floor(pop->valuedouble));
        const cJSON *cont = cJSON_GetObjectItem(doc, "continent");
        assert_true(cJSON_IsString(cont));
        assert_non_null(strstr("Europe Asia Africa America", cont->valuestring));
        cJSON_Delete(doc);
        ferry_message_free(c);
    }
    static const struct {
        const char *schema, *says;
    } k_bad[] = {
        {"{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\", "
         "\"pattern\": \"x\"}}}",
         "\"pattern\" is not supported"},
        {"{\"type\": \"string\"}", "top level"},
        {"{\"type\": ", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof(k_bad) / sizeof(k_bad[0]); i++) {
        s.json_schema = (char *)k_bad[i].schema;
        ferry_error_t err;
        Ferry__V1__CompleteResponse *c = NULL;
        assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
        if (strstr(err.message, k_bad[i].says) == NULL)
            fail_msg("%s: \"%s\"", k_bad[i].schema, err.message);
    }
    s.json_schema = schema;
    s.json_object = true;
    ferry_error_t err;
    Ferry__V1__CompleteResponse *c = NULL;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
}

/* Tokens of ids[n] that appeared before them. */
static size_t repeats(const uint32_t *ids, size_t n)
{
    size_t r = 0;
    for (size_t i = 0; i < n; i++) {
        size_t j = 0;
        while (j < i && ids[j] != ids[i])
            j++;
        r += j < i;
    }
    return r;
}

/* Logit biases and OpenAI's penalties reach both workers: banning the greedy first token
 * changes it (the prefill worker samples it), a +100 bias on one token makes every token that
 * token (the decode worker samples the rest), a frequency penalty breaks a repetition the
 * greedy run has; out-of-range values and ids outside the vocabulary are refused. */
static void test_bias_and_penalties(void **state)
{
    (void)state;
    Ferry__V1__GenerateRequest req;
    Ferry__V1__SamplingParams s;
    Ferry__V1__CodecParams codec;
    france_request(&req, &s, &codec);
    req.return_token_ids = true;
    s.max_tokens = 24;
    s.ignore_eos = true;
    ferry_error_t err;
    Ferry__V1__CompleteResponse *greedy = NULL, *c = NULL;
    assert_int_equal(ferry_complete(G.client, &req, &greedy, &err), 0);
    assert_true(greedy->n_token_ids >= 8);

    Ferry__V1__LogitBias b = FERRY__V1__LOGIT_BIAS__INIT, *bp = &b;
    b.token_id = greedy->token_ids[0];
    b.bias = -100;
    s.logit_bias = &bp;
    s.n_logit_bias = 1;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_true(c->n_token_ids >= 1);
    assert_int_not_equal(c->token_ids[0], greedy->token_ids[0]);
    for (size_t i = 0; i < c->n_token_ids; i++)
        assert_int_not_equal(c->token_ids[i], b.token_id); // banned at every step
    ferry_message_free(c);
    b.token_id = 1000;
    b.bias = 100;
    s.max_tokens = 6;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    assert_int_equal(c->n_token_ids, 6);
    for (size_t i = 0; i < c->n_token_ids; i++)
        assert_int_equal(c->token_ids[i], 1000);
    ferry_message_free(c);
    s.n_logit_bias = 0;

    // The greedy run repeats some token; a frequency penalty of 2 makes repeats rarer.
    const size_t rep_greedy = repeats(greedy->token_ids, greedy->n_token_ids);
    s.max_tokens = 24;
    s.frequency_penalty = 2;
    s.presence_penalty = 1;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), 0);
    const size_t rep_pen = repeats(c->token_ids, c->n_token_ids);
    fprintf(stderr, "repeated tokens in 24: greedy %zu, with penalties %zu\n", rep_greedy, rep_pen);
    assert_true(rep_greedy > 0);
    assert_true(rep_pen < rep_greedy);
    ferry_message_free(c);
    ferry_message_free(greedy);

    // Refused by the router.
    s.frequency_penalty = 2.5f;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    s.frequency_penalty = 0;
    s.n_logit_bias = 1;
    b.token_id = (uint32_t)G.cfg->n_vocab;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "vocabulary"));
    b.token_id = 5;
    b.bias = 150;
    assert_int_equal(ferry_complete(G.client, &req, &c, &err), RPC_CODE_INVALID_ARGUMENT);
    s.n_logit_bias = 0;
}

static void test_stop_string(void **state)
{
    size_t n;
    int32_t *ids = tokenize_local("The capital of France is", false, &n);
    int32_t want[32];
    size_t n_want = local_greedy(ids, n, 24, want);
    free(ids);
    mdl_detok_t d;
    mdl_detok_init(&d, mdl_model_tokenizer(G.model), true);
    char text[4096];
    size_t tl = 0;
    for (size_t i = 0; i < n_want; i++)
        tl += (size_t)mdl_detok_push(&d, want[i], text + tl, sizeof(text) - tl);
    // Stop at the second word of the continuation, wherever its tokens fall.
    assert_true(tl > 8);
    const char *stop = "answer";
    char *at = strstr(text, stop);
    if (at == NULL) {
        stop = text + tl / 2;
        at = text + tl / 2;
    }
    char stop_copy[64];
    snprintf(stop_copy, sizeof(stop_copy), "%.5s", stop);
    at = strstr(text, stop_copy);
    gen_t *g = calloc(1, sizeof(*g));
    gen_req_t q = {.prompt = "The capital of France is", .policy = "fp16", .max_tokens = 24,
                   .stop = stop_copy};
    ferry_error_t err;
    assert_int_equal(generate(G.client, &q, g, &err), 0);
    assert_int_equal(g->finish, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP);
    assert_int_equal(g->text_len, (size_t)(at - text));
    assert_memory_equal(g->text, text, g->text_len);
    free(g);
}

/* ---- many streams, cancel, deadline ------------------------------------------------------- */

static double decode_metric(const char *name)
{
    return du_metric(G.decode.port, name);
}

typedef struct {
    int code;
    bool done;
    unsigned n_msgs;
    uint32_t n_ids;
} async_t;

static void async_msg(ferry_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    async_t *a = arg;
    a->n_msgs++;
    a->n_ids += (uint32_t)((const Ferry__V1__GenerateResponse *)msg)->n_token_ids;
}

static void async_done(ferry_call_t *call, int code, const char *message, void *arg)
{
    async_t *a = arg;
    a->code = code;
    a->done = true;
    if (code != 0)
        fprintf(stderr, "stream: %s %s\n", ferry_code_name(code), message);
}

/* An asynchronous SDK client on a fresh loop. */
static ferry_client_t *async_client(uv_loop_t *loop)
{
    uv_loop_init(loop);
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router_addr;
    p.timeout_ms = 300000;
    ferry_client_t *c = NULL;
    assert_int_equal(ferry_client_create_on_loop(loop, &p, &c), 0);
    return c;
}

static void test_concurrent_streams(void **state)
{
    enum { N = 32 };
    // Initially (and after everything ends) every page of the pool is free.
    double free0 = decode_metric("ferry_decode_total_pages");
    assert_true(free0 > 0);
    assert_int_equal(du_concurrent_streams(G.router_addr, N, 6), N);
    // Every page came back.
    double free1 = -1;
    for (int i = 0; i < 100 && free1 != free0; i++) {
        free1 = decode_metric("ferry_decode_free_pages");
        if (free1 != free0)
            fy_sleep_ns(50 * 1000000ull);
    }
    if (free1 != free0)
        fprintf(stderr, "decode free pages: %.0f before, %.0f after 32 streams\n", free0, free1);
    assert_true(free1 == free0);
}

static void test_cancel_and_deadline(void **state)
{
    double free0 = decode_metric("ferry_decode_total_pages");
    gen_t *g = calloc(1, sizeof(*g));
    g->cancel_after = 3;
    gen_req_t q = {.prompt = "Write a long story about a dragon.", .chat = true,
                   .max_tokens = 200};
    ferry_error_t err;
    assert_int_equal(generate(G.client, &q, g, &err), RPC_CODE_CANCELLED);
    assert_int_equal(g->n_msgs, 3);
    free(g);

    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = G.router_addr;
    p.timeout_ms = 300; // far below 200 tokens' worth
    ferry_client_t *c = NULL;
    assert_int_equal(ferry_client_create(&p, &c), 0);
    g = calloc(1, sizeof(*g));
    assert_int_equal(generate(c, &q, g, &err), RPC_CODE_DEADLINE_EXCEEDED);
    free(g);
    ferry_client_destroy(c);
    // The decode side let go of both requests' pages.
    double free1 = -1;
    for (int i = 0; i < 100 && free1 != free0; i++) {
        free1 = decode_metric("ferry_decode_free_pages");
        if (free1 != free0)
            fy_sleep_ns(50 * 1000000ull);
    }
    assert_true(free1 == free0);
    // And the path still works.
    g = calloc(1, sizeof(*g));
    gen_req_t q2 = {.prompt = "Hello", .max_tokens = 4};
    assert_int_equal(generate(G.client, &q2, g, &err), 0);
    free(g);
}

static void test_router_metrics(void **state)
{
    char *m = du_http_get(G.router.port, "/metrics");
    assert_non_null(m);
    assert_non_null(strstr(m, "HTTP/1.1 200 OK"));
    static const char *const series[] = {
        "ferry_router_requests_total{status=\"ok\"} ",
        "ferry_router_requests_total{status=\"cancelled\"} ",
        "ferry_router_ttft_seconds_bucket{le=",
        "ferry_router_tpot_seconds_count ",
        "ferry_router_kv_raw_bytes_total ",
        "ferry_router_kv_wire_bytes_total ",
        "ferry_router_kv_wire_ratio ",
        "ferry_router_kv_transfer_seconds_count ",
        "ferry_router_failures_total{reason=\"deadline\"} 1",
        "ferry_router_failures_total{reason=\"cancelled\"} 1",
        "ferry_router_workers{role=\"decode\"} 1",
    };
    for (size_t i = 0; i < FY_ARRAY_SIZE(series); i++) {
        if (strstr(m, series[i]) == NULL)
            fprintf(stderr, "missing %s in\n%s\n", series[i], m);
        assert_non_null(strstr(m, series[i]));
    }
    free(m);
    char *h = du_http_get(G.router.port, "/healthz");
    assert_non_null(strstr(h, "200 OK"));
    free(h);
}

/* ---- failures and shutdown ----------------------------------------------------------------- */

static bool prefill_workers(int n, uint32_t timeout_ms)
{
    uint64_t end = fy_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    while (fy_clock_ns() < end) {
        if (du_metric(G.router.port, "ferry_router_workers{role=\"prefill\"}") == n &&
            (n == 0 || router_serving(1000)))
            return true;
        fy_sleep_ns(100 * 1000000ull);
    }
    return false;
}

static fy_status_t start_prefill(du_proc_t *p, const char *extra_flag, const char *extra_val)
{
    const char *args[] = {"--model", G.model_path, "--router", G.router_addr, "--threads", "1",
                          "--log-level", "warn", extra_flag, extra_val, NULL};
    return du_start(p, "prefill", "prefill/ferry-prefill", args, 120000);
}

/* A corrupt KV frame is refused by the decode side and the request is retried (OK for the
 * client); a prefill worker killed mid-prefill is replaced by the other one on retry. */
static void test_corrupt_frame_and_prefill_killed(void **state)
{
    // The prefill worker is replaced by one that damages one frame of its first request.
    assert_int_equal(du_stop(&G.prefill, 30000), 0);
    assert_true(prefill_workers(0, 10000));
    assert_int_equal(start_prefill(&G.prefill, "--test-corrupt-frames", "1"), FY_OK);
    assert_true(prefill_workers(1, 180000));
    double retries0 = du_metric(G.router.port, "ferry_router_retries_total");
    double transfer0 = du_metric(G.router.port, "ferry_router_failures_total{reason=\"transfer\"}");
    size_t n;
    int32_t *ids = tokenize_local("The capital of France is", false, &n);
    gen_req_t q = {.prompt = "The capital of France is", .policy = "fp16", .max_tokens = 12};
    expect_local(&q, ids, n); // same tokens, after one retry
    free(ids);
    assert_true(du_metric(G.router.port, "ferry_router_retries_total") == retries0 + 1);
    assert_true(du_metric(G.router.port, "ferry_router_failures_total{reason=\"transfer\"}") ==
                transfer0 + 1);

    // Two prefill workers; the one computing a long prompt is killed.
    du_proc_t other;
    assert_int_equal(start_prefill(&other, "--log-level", "warn"), FY_OK);
    assert_true(prefill_workers(2, 180000));
    char text[8192] = "Read this list and say which word comes most often:";
    for (int i = 0; i < 500; i++)
        strcat(text, i % 3 ? " lamp" : " river");
    uv_loop_t loop;
    ferry_client_t *c = async_client(&loop);
    Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
    Ferry__V1__SamplingParams s = FERRY__V1__SAMPLING_PARAMS__INIT;
    req.input_case = FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT;
    req.prompt = text;
    s.max_tokens = 4;
    s.ignore_eos = true;
    req.sampling = &s;
    req.return_token_ids = true;
    async_t res = {0};
    assert_int_equal(ferry_call_async(c, "/ferry.v1.Ferry/Generate", &req.base,
                                      &ferry__v1__generate_response__descriptor, NULL, async_msg,
                                      async_done, &res, NULL),
                     0);
    du_proc_t *victim = NULL;
    while (!res.done) {
        uv_run(&loop, UV_RUN_NOWAIT);
        if (victim == NULL) {
            if (du_metric(G.prefill.port, "ferry_prefill_in_flight") == 1)
                victim = &G.prefill;
            else if (du_metric(other.port, "ferry_prefill_in_flight") == 1)
                victim = &other;
            if (victim != NULL)
                kill(victim->pid, SIGKILL);
        }
        fy_sleep_ns(2 * 1000000ull);
    }
    ferry_client_destroy(c);
    du_drain_loop(&loop);
    uv_loop_close(&loop);
    assert_non_null(victim);
    assert_int_equal(res.code, 0);
    assert_int_equal(res.n_ids, 4);
    du_wait(victim, 5000);
    if (victim == &G.prefill)
        G.prefill = other; // the survivor serves the rest
    else
        du_kill(&other);
    assert_true(prefill_workers(1, 10000));
}

static void kill_decode(void)
{
    kill(G.decode.pid, SIGKILL);
}

static void test_decode_killed(void **state)
{
    gen_t *g = calloc(1, sizeof(*g));
    g->on_first = kill_decode; // once the first token is out, the decode worker dies
    gen_req_t q = {.prompt = "Write a long story about a dragon.", .chat = true,
                   .max_tokens = 200};
    ferry_error_t err;
    uint64_t t0 = fy_clock_ns();
    int code = generate(G.client, &q, g, &err);
    double secs = (fy_clock_ns() - t0) / 1e9;
    fprintf(stderr, "decode killed mid-stream: %s \"%s\" after %.1f s\n", ferry_code_name(code),
            err.message, secs);
    assert_int_equal(code, RPC_CODE_UNAVAILABLE);
    assert_true(secs < 30);
    free(g);
    du_wait(&G.decode, 5000);
    // Once its lease runs out the router drops it and says so.
    uint64_t until = fy_clock_ns() + 10000000000ull;
    bool not_serving = false;
    while (!not_serving && fy_clock_ns() < until) {
        Ferry__V1__HealthResponse *h = NULL;
        if (ferry_health(G.client, NULL, &h, &err) == 0) {
            not_serving = h->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__NOT_SERVING;
            ferry_message_free(h);
        }
        fy_sleep_ns(50 * 1000000ull);
    }
    assert_true(not_serving);
    // The router is up: it answers, and says it cannot serve without a decode worker.
    Ferry__V1__ListModelsResponse *lm = NULL;
    assert_int_equal(ferry_list_models(G.client, &lm, &err), 0);
    ferry_message_free(lm);
    g = calloc(1, sizeof(*g));
    gen_req_t q2 = {.prompt = "Hello", .max_tokens = 4};
    code = generate(G.client, &q2, g, &err);
    assert_int_not_equal(code, 0);
    assert_int_not_equal(code, RPC_CODE_DEADLINE_EXCEEDED);
    free(g);
    // A new decode worker joins and requests flow again.
    assert_int_equal(start_decode(), FY_OK);
    assert_true(router_serving(180000));
    g = calloc(1, sizeof(*g));
    assert_int_equal(generate(G.client, &q2, g, &err), 0);
    free(g);
}

static du_proc_t *g_term_target;

static void term_target(void)
{
    kill(g_term_target->pid, SIGTERM);
}

static void test_sigterm_drains(void **state)
{
    // The router gets SIGTERM with a stream in flight: the stream completes, then it exits.
    g_term_target = &G.router;
    gen_t *g = calloc(1, sizeof(*g));
    g->on_first = term_target;
    gen_req_t q = {.prompt = "Count to twenty: 1, 2, 3,", .max_tokens = 24, .policy = "fp16"};
    ferry_error_t err;
    assert_int_equal(generate(G.client, &q, g, &err), 0);
    assert_int_equal(g->n_ids, 24);
    free(g);
    int rc = du_wait(&G.router, 20000);
    if (rc != 0)
        du_dump_log(&G.router);
    assert_int_equal(rc, 0);
    // The workers drain and exit too.
    rc = du_stop(&G.prefill, 30000);
    if (rc != 0)
        du_dump_log(&G.prefill);
    assert_int_equal(rc, 0);
    rc = du_stop(&G.decode, 30000);
    if (rc != 0)
        du_dump_log(&G.decode);
    assert_int_equal(rc, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_greedy_matches_local),
        cmocka_unit_test(test_ferry_budget),
        cmocka_unit_test(test_complete_tokenize_models),
        cmocka_unit_test(test_stop_string),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_forced_tokens),
        cmocka_unit_test(test_bias_and_penalties),
        cmocka_unit_test(test_prompt_logprobs),
        cmocka_unit_test(test_json_mode),
        cmocka_unit_test(test_json_schema),
        cmocka_unit_test(test_concurrent_streams),
        cmocka_unit_test(test_cancel_and_deadline),
        cmocka_unit_test(test_router_metrics),
        cmocka_unit_test(test_corrupt_frame_and_prefill_killed),
        cmocka_unit_test(test_decode_killed),
        cmocka_unit_test(test_sigterm_drains),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
