/*
 * frontend.c: the router's client service (see frontend.h).
 *
 * One rt_req_t per Generate/Complete call, driven by the callbacks of the worker calls it
 * makes one after the other (ReserveKV -> Prefill -> Decode) on the loop thread. A request is
 * freed once its client call has finished and no worker call of it is in flight.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ferry.pb-c.h"
#include "frontend.h"
#include "daemon.h"

#define MODULE "router"
#define RT_MAX_STOP_IDS 16
#define RT_MAX_STOPS 8
#define RT_MAX_CHANNELS 256
#define RT_PAIR_ID_BYTES 128 // an ncclUniqueId, or the socket link's id (nccl_link.h)

typedef struct {
    char addr[128];
    rpc_channel_t *ch;
} rt_chan_t;

struct rt {
    uv_loop_t *loop;
    rt_params_t params;
    char model_name[128];
    char policy[32];
    int n_layers, n_kv_heads, head_dim, n_ctx, n_heads;
    char arch[32];
    rt_chan_t chans[RT_MAX_CHANNELS];
    size_t n_chans;
    struct rt_req *live;
    size_t n_live;
    uint64_t seq;
    uint32_t instance;
    bool draining;
    int32_t stop_eos, stop_turn;
    struct {
        fy_metric_t *ok, *err, *cancelled, *ttft, *tpot, *raw, *wire, *ratio, *transfer,
            *tokens, *retries, *in_flight, *hidden;
        fy_metric_t *fail[9];
    } m;
};

typedef enum {
    FAIL_NO_WORKERS,
    FAIL_POOL_FULL,
    FAIL_RESERVE,
    FAIL_PREFILL,
    FAIL_TRANSFER,
    FAIL_DECODE,
    FAIL_DEADLINE,
    FAIL_INVALID,
    FAIL_CANCELLED,
} rt_fail_t;

static const char *const k_fail_names[] = {"no_workers", "pool_full", "reserve", "prefill",
                                           "transfer",   "decode",    "deadline", "invalid",
                                           "cancelled"};

typedef enum { ST_NEW, ST_RESERVE, ST_PREFILL, ST_DECODE, ST_DONE } rt_state_t;

typedef struct {
    uint32_t id;
    float lp;
} rt_top_t;

/* A token's log-probability as a worker sent it, checked (rt_lp_from). */
typedef struct {
    float lp;
    rt_top_t top[MDL_MAX_TOP_LOGPROBS];
    uint32_t n_top;
} rt_lp_t;

typedef struct rt_req {
    struct rt_req *prev, *next;
    rt_t *rt;
    rpc_call_t *call; // client call; NULL once finished
    bool streaming;
    char id[64];         // unique id of the request (logs)
    char wid[80];        // id of the current attempt, what workers see (a retry must not
                         // collide with a reservation the first attempt still holds)
    char client_id[128]; // echoed back
    uint32_t *prompt;
    size_t n_prompt;
    Ferry__V1__SamplingParams sampling; // what workers get (max_tokens and stop ids set)
    uint32_t stop_ids[RT_MAX_STOP_IDS];
    char *stops[RT_MAX_STOPS];
    size_t n_stops, max_stop_len;
    uint32_t max_tokens;
    Ferry__V1__CodecParams codec;
    char policy[32];
    bool return_ids;
    uint64_t t_start, t_first, t_end, deadline_ns;
    // placement
    rt_state_t state;
    router_worker_t pw, dw;
    bool booked_p, booked_d;
    char excl_p[64], excl_d[64];
    uint32_t attempts, full_tries;
    bool pool_full; // a decode worker refused for lack of pages
    uint64_t kv_pages, expected_wire;
    uint64_t reservation_id;
    // The decode worker's pair with the prefill worker, from ReserveKV to Prefill.
    uint8_t pair_id[RT_PAIR_ID_BYTES];
    size_t pair_id_len;
    uint64_t pair_generation;
    bool via_pair;
    rpc_ccall_t *wcall; // worker call in flight
    // results
    bool got_prefill;
    uint32_t first_token;
    bool first_sent;
    uint64_t raw, wire;
    double transfer_ms, prefill_ms, queue_ms, hidden;
    double decode_tpot_ms;
    uint32_t decode_completion_tokens;
    mdl_detok_t detok;
    char *text;
    size_t text_len, text_cap, sent;
    uint32_t *out_ids;
    size_t n_out, cap_out, ids_sent;
    // sampling.logprobs: out_lp[i] is out_ids[i]'s log-probability (NAN when its worker sent
    // none), out_top[i * sampling.top_logprobs ..] its alternatives (out_n_top[i] of them);
    // lp_sent as ids_sent.
    float *out_lp;
    rt_top_t *out_top;
    uint8_t *out_n_top;
    size_t lp_sent;
    rt_lp_t first_lp; // the prefill worker's, until the first token is pushed
    bool has_first_lp;
    // sampling.prompt_logprobs: prompt[i]'s log-probability (NAN for the first, and where the
    // prefill worker sent none) and alternatives, laid out as out_lp, out_top and out_n_top.
    float *p_lp;
    rt_top_t *p_top;
    uint8_t *p_n_top;
    uint32_t *forced; // sampling.forced_token_ids (malloc'd): no stop ends the completion
    char *json_schema;             // sampling.json_schema (malloc'd), checked
    uint8_t kv_key[32];            // params.kv_seal: this attempt's key (ReserveKV, Prefill)
    Ferry__V1__LogitBias *bias;    // sampling.logit_bias: the entries (malloc'd) ...
    Ferry__V1__LogitBias **bias_p; // ... and the pointers the message holds
    uint32_t completion_tokens;
    Ferry__V1__FinishReason finish;
    bool stopped; // the stream ended here (stop token or string, length)
} rt_req_t;

static void req_place(rt_req_t *r);
static void req_fail(rt_req_t *r, int code, const char *msg, rt_fail_t why);

/* ---- setup -------------------------------------------------------------------------------- */

void rt_params_default(rt_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->default_max_tokens = 256;
    p->retries = 1;
    p->reserve_lease_ms = 30000;
    p->worker_timeout_ms = 5000;
    p->prefill_timeout_ms = 300000;
    p->default_policy = "";
}

static int meta_int(const mdl_gguf_t *g, const char *arch, const char *key, int def)
{
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", arch, key);
    int64_t v;
    return mdl_gguf_get_i64(g, full, &v) == FY_OK && v > 0 && v < (1 << 24) ? (int)v : def;
}

static void register_metrics(rt_t *rt)
{
    fy_metrics_t *m = rt->params.metrics;
    if (m == NULL)
        return;
    static const double tpot_bounds[] = {0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075,
                                         0.1,   0.15,  0.2,   0.3,  0.5,  1.0,   2.0};
    const char *req_help = "client requests (Generate and Complete) by outcome";
    rt->m.ok = fy_metrics_counter(m, "ferry_router_requests_total", "status=\"ok\"", req_help);
    rt->m.err = fy_metrics_counter(m, "ferry_router_requests_total", "status=\"error\"",
                                   req_help);
    rt->m.cancelled =
        fy_metrics_counter(m, "ferry_router_requests_total", "status=\"cancelled\"", req_help);
    rt->m.ttft = fy_metrics_histogram(m, "ferry_router_ttft_seconds", NULL,
                                      "time to the first token streamed to the client",
                                      fy_metrics_latency_bounds, 16);
    rt->m.tpot = fy_metrics_histogram(m, "ferry_router_tpot_seconds", NULL,
                                      "mean time per output token after the first",
                                      tpot_bounds, FY_ARRAY_SIZE(tpot_bounds));
    rt->m.raw = fy_metrics_counter(m, "ferry_router_kv_raw_bytes_total", NULL,
                                   "FP16 bytes of the prompts' K and V");
    rt->m.wire = fy_metrics_counter(m, "ferry_router_kv_wire_bytes_total", NULL,
                                    "KV bytes sent from prefill to decode workers");
    rt->m.ratio = fy_metrics_gauge(m, "ferry_router_kv_wire_ratio", NULL,
                                   "wire bytes / raw bytes over all requests so far");
    rt->m.transfer = fy_metrics_histogram(m, "ferry_router_kv_transfer_seconds", NULL,
                                          "KV transfer time per request",
                                          fy_metrics_latency_bounds, 16);
    rt->m.hidden = fy_metrics_gauge(m, "ferry_router_kv_hidden_fraction", NULL,
                                    "share of the last request's KV transfer hidden behind "
                                    "prefill compute");
    rt->m.tokens = fy_metrics_counter(m, "ferry_router_completion_tokens_total", NULL,
                                      "tokens generated for clients");
    rt->m.retries = fy_metrics_counter(m, "ferry_router_retries_total", NULL,
                                       "requests retried on another worker pair");
    rt->m.in_flight = fy_metrics_gauge(m, "ferry_router_requests_in_flight", NULL,
                                       "client requests being served");
    for (size_t i = 0; i < FY_ARRAY_SIZE(k_fail_names); i++) {
        char labels[48];
        snprintf(labels, sizeof(labels), "reason=\"%s\"", k_fail_names[i]);
        rt->m.fail[i] = fy_metrics_counter(m, "ferry_router_failures_total", labels,
                                           "failures by reason (retried ones included)");
    }
}

fy_status_t rt_create(uv_loop_t *loop, const rt_params_t *params, rt_t **rt_p)
{
    if (loop == NULL || params == NULL || params->tok == NULL || params->gguf == NULL ||
        params->reg == NULL || rt_p == NULL)
        return FY_ERR_INVALID_ARG;
    rt_t *rt = calloc(1, sizeof(*rt));
    if (rt == NULL)
        return FY_ERR_NO_MEMORY;
    rt->loop = loop;
    rt->params = *params;
    snprintf(rt->model_name, sizeof(rt->model_name), "%s",
             params->model_name ? params->model_name : "");
    snprintf(rt->policy, sizeof(rt->policy), "%s",
             params->default_policy ? params->default_policy : "");
    rt->params.model_name = rt->model_name;
    rt->params.default_policy = rt->policy;
    if (rt->params.default_max_tokens == 0)
        rt->params.default_max_tokens = 256;
    if (rt->params.worker_timeout_ms == 0)
        rt->params.worker_timeout_ms = 5000;
    if (rt->params.reserve_lease_ms == 0)
        rt->params.reserve_lease_ms = 30000;
    const char *arch = "llama";
    size_t arch_len = 5;
    if (mdl_gguf_get_str(params->gguf, "general.architecture", &arch, &arch_len) != FY_OK)
        arch = "llama", arch_len = 5;
    snprintf(rt->arch, sizeof(rt->arch), "%.*s", (int)FY_MIN(arch_len, 31), arch);
    rt->n_layers = meta_int(params->gguf, rt->arch, "block_count", 1);
    rt->n_heads = meta_int(params->gguf, rt->arch, "attention.head_count", 1);
    rt->n_kv_heads = meta_int(params->gguf, rt->arch, "attention.head_count_kv", rt->n_heads);
    int dim = meta_int(params->gguf, rt->arch, "embedding_length", 64);
    rt->head_dim = meta_int(params->gguf, rt->arch, "attention.key_length",
                            dim / FY_MAX(rt->n_heads, 1));
    rt->n_ctx = meta_int(params->gguf, rt->arch, "context_length", 2048);
    rt->stop_eos = mdl_tokenizer_eos(params->tok);
    rt->stop_turn = mdl_chat_end_token(params->tok); // <|im_end|>, <|eot_id|>, ...
    FY_LOG_INFO(MODULE, "chat format: %s", mdl_chat_kind_name(mdl_chat_kind(params->tok)));
    rt->instance = (uint32_t)(fy_clock_realtime_ns() / 1000u) ^ (uint32_t)getpid();
    register_metrics(rt);
    *rt_p = rt;
    return FY_OK;
}

size_t rt_in_flight(const rt_t *rt)
{
    return rt->n_live;
}

void rt_set_draining(rt_t *rt, bool draining)
{
    rt->draining = draining;
}

bool rt_serving(const rt_t *rt)
{
    if (rt->draining)
        return false;
    router_worker_t ws[64];
    size_t n = router_registry_snapshot(rt->params.reg, ws, FY_ARRAY_SIZE(ws));
    bool p = false, d = false;
    for (size_t i = 0; i < FY_MIN(n, FY_ARRAY_SIZE(ws)); i++) {
        p |= ws[i].role == ROUTER_ROLE_PREFILL && !ws[i].draining;
        d |= ws[i].role == ROUTER_ROLE_DECODE && !ws[i].draining;
    }
    return p && d;
}

static rpc_channel_t *chan_get(rt_t *rt, const char *addr)
{
    for (size_t i = 0; i < rt->n_chans; i++)
        if (strcmp(rt->chans[i].addr, addr) == 0)
            return rt->chans[i].ch;
    if (rt->n_chans == RT_MAX_CHANNELS || strlen(addr) >= sizeof(rt->chans[0].addr))
        return NULL;
    const char *list[1] = {addr};
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = list;
    cp.n_addresses = 1;
    cp.max_message = 64u << 20;
    cp.max_send_message = 64u << 20;
    cp.connect_timeout_ms = 2000;
    cp.backoff_initial_ms = 50;
    cp.backoff_max_ms = 1000;
    cp.tls = rt->params.tls;
    char bearer[300];
    if (rt->params.api_key != NULL) {
        snprintf(bearer, sizeof(bearer), "Bearer %.256s", rt->params.api_key);
        cp.authorization = bearer; // copied by the channel
    }
    rt_chan_t *c = &rt->chans[rt->n_chans];
    if (rpc_channel_create(rt->loop, &cp, &c->ch) != FY_OK)
        return NULL;
    snprintf(c->addr, sizeof(c->addr), "%s", addr);
    rt->n_chans++;
    return c->ch;
}

/* ---- request bookkeeping ------------------------------------------------------------------ */

static void req_free(rt_req_t *r)
{
    rt_t *rt = r->rt;
    if (r->prev)
        r->prev->next = r->next;
    else
        rt->live = r->next;
    if (r->next)
        r->next->prev = r->prev;
    rt->n_live--;
    fy_metric_set(rt->m.in_flight, (double)rt->n_live);
    for (size_t i = 0; i < r->n_stops; i++)
        free(r->stops[i]);
    free(r->prompt);
    free(r->text);
    free(r->out_ids);
    free(r->out_lp);
    free(r->p_lp);
    free(r->p_top);
    free(r->p_n_top);
    free(r->out_top);
    free(r->forced);
    free(r->json_schema);
    free(r->bias);
    free(r->bias_p);
    free(r->out_n_top);
    free(r);
}

static void req_maybe_free(rt_req_t *r)
{
    if (r->call == NULL && r->wcall == NULL)
        req_free(r);
}

static void release_bookings(rt_req_t *r)
{
    if (r->booked_p) {
        router_registry_release(r->rt->params.reg, r->pw.id, (uint32_t)r->n_prompt, NULL, 0);
        r->booked_p = false;
    }
    if (r->booked_d) {
        router_registry_release(r->rt->params.reg, NULL, 0, r->dw.id, r->kv_pages);
        r->booked_d = false;
    }
}

static void on_fire_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    if (code != RPC_CODE_OK)
        FY_LOG_DEBUG(MODULE, "Cancel on %s: %s %s", (const char *)arg, rpc_code_name(code),
                     message);
}

/* Worker.Cancel{request id} without waiting for the answer. */
static void worker_cancel(rt_t *rt, const char *addr, const char *request_id)
{
    rpc_channel_t *ch = chan_get(rt, addr);
    if (ch == NULL)
        return;
    Ferry__V1__CancelRequest req = FERRY__V1__CANCEL_REQUEST__INIT;
    req.request_id = (char *)request_id;
    rpc_call_opts_t opts = {.timeout_ms = rt->params.worker_timeout_ms};
    rpc_channel_call(ch, "/ferry.v1.Worker/Cancel", &req.base,
                     &ferry__v1__cancel_response__descriptor, &opts, NULL, on_fire_done,
                     (void *)"worker", NULL);
}

static uint64_t remaining_ms(const rt_req_t *r, uint64_t cap_ms)
{
    if (r->deadline_ns == 0)
        return cap_ms;
    uint64_t now = fy_clock_ns();
    uint64_t left = r->deadline_ns > now ? (r->deadline_ns - now) / 1000000u + 1 : 1;
    return cap_ms == 0 ? left : FY_MIN(left, cap_ms);
}

/* ---- output: detokenize, stop strings, stream ---------------------------------------------- */

static bool text_append(rt_req_t *r, const char *s, size_t n)
{
    if (r->text_len + n + 1 > r->text_cap) {
        size_t cap = FY_MAX(r->text_cap * 2, r->text_len + n + 256);
        char *t = realloc(r->text, cap);
        if (t == NULL)
            return false;
        r->text = t;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = '\0';
    return true;
}

/* Applies stop strings to the text so far; returns how many bytes may be sent (the rest
 * could still become a stop string). Sets r->stopped and truncates the text on a match. */
static size_t stop_scan(rt_req_t *r)
{
    if (r->n_stops == 0)
        return r->text_len;
    size_t from = r->sent > r->max_stop_len ? r->sent - r->max_stop_len : 0;
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < r->n_stops; i++) {
        const char *hit = r->text_len > from ? strstr(r->text + from, r->stops[i]) : NULL;
        if (hit != NULL && (size_t)(hit - r->text) < best)
            best = (size_t)(hit - r->text);
    }
    if (best != SIZE_MAX) {
        r->text_len = FY_MAX(best, r->sent);
        r->text[r->text_len] = '\0';
        r->stopped = true;
        r->finish = FERRY__V1__FINISH_REASON__FINISH_REASON_STOP;
        return r->text_len;
    }
    size_t hold = 0;
    for (size_t i = 0; i < r->n_stops; i++) {
        size_t sl = strlen(r->stops[i]);
        for (size_t k = FY_MIN(sl - 1, r->text_len); k > hold; k--) {
            if (memcmp(r->text + r->text_len - k, r->stops[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    return r->text_len - hold;
}

static bool is_stop_id(const rt_req_t *r, uint32_t id)
{
    for (size_t i = 0; i < r->sampling.n_stop_token_ids; i++)
        if (r->sampling.stop_token_ids[i] == id)
            return true;
    return false;
}

/* Grows the completion's arrays to hold one more token; false when out of memory. */
static bool out_grow(rt_req_t *r)
{
    if (r->n_out < r->cap_out)
        return true;
    size_t cap = r->cap_out ? r->cap_out * 2 : 64;
    uint32_t *o = realloc(r->out_ids, cap * sizeof(uint32_t));
    if (o == NULL)
        return false;
    r->out_ids = o;
    if (r->sampling.logprobs) {
        float *lp = realloc(r->out_lp, cap * sizeof(float));
        if (lp == NULL)
            return false;
        r->out_lp = lp;
        uint8_t *nt = realloc(r->out_n_top, cap);
        if (nt == NULL)
            return false;
        r->out_n_top = nt;
        if (r->sampling.top_logprobs > 0) {
            rt_top_t *t = realloc(r->out_top, cap * r->sampling.top_logprobs * sizeof(rt_top_t));
            if (t == NULL)
                return false;
            r->out_top = t;
        }
    }
    r->cap_out = cap;
    return true;
}

/* A worker's log-probability entry for token id into out: false when it is for another token
 * or missing. Alternatives past the request's n_top or outside the vocabulary are dropped. */
static bool rt_lp_from(const rt_req_t *r, const Ferry__V1__TokenLogprob *in, uint32_t id,
                       rt_lp_t *out)
{
    if (in == NULL || in->token_id != id)
        return false;
    const uint32_t n_vocab = (uint32_t)mdl_tokenizer_n_vocab(r->rt->params.tok);
    out->lp = in->logprob;
    out->n_top = 0;
    for (size_t j = 0; j < in->n_top && out->n_top < r->sampling.top_logprobs; j++) {
        if (in->top[j] == NULL || in->top[j]->token_id >= n_vocab)
            continue;
        out->top[out->n_top].id = in->top[j]->token_id;
        out->top[out->n_top].lp = in->top[j]->logprob;
        out->n_top++;
    }
    return true;
}

/* One generated token: detokenize, record (with its log-probability lp, NULL when its worker
 * sent none), check stops. Returns false once the stream ended. */
static bool push_token(rt_req_t *r, uint32_t id, const rt_lp_t *lp)
{
    if (r->stopped)
        return false;
    r->completion_tokens++;
    if (r->forced == NULL && is_stop_id(r, id)) {
        r->stopped = true;
        r->finish = FERRY__V1__FINISH_REASON__FINISH_REASON_STOP;
        return false;
    }
    if (out_grow(r)) {
        size_t i = r->n_out++;
        r->out_ids[i] = id;
        if (r->sampling.logprobs) {
            r->out_lp[i] = lp != NULL ? lp->lp : NAN;
            r->out_n_top[i] = lp != NULL ? (uint8_t)lp->n_top : 0;
            if (lp != NULL && lp->n_top > 0)
                memcpy(r->out_top + i * r->sampling.top_logprobs, lp->top,
                       lp->n_top * sizeof(rt_top_t));
        }
    }
    char piece[512];
    int n = mdl_detok_push(&r->detok, (int32_t)id, piece, sizeof(piece));
    if (n > 0)
        text_append(r, piece, (size_t)n);
    stop_scan(r);
    if (!r->stopped && r->completion_tokens >= r->max_tokens) {
        r->stopped = true;
        r->finish = FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    }
    return !r->stopped;
}

static void fill_stats(rt_req_t *r, Ferry__V1__RequestStats *s)
{
    s->prompt_tokens = (uint32_t)r->n_prompt;
    s->completion_tokens = r->completion_tokens;
    s->kv_raw_bytes = r->raw;
    s->kv_wire_bytes = r->wire;
    s->ttft_ms = r->t_first ? (r->t_first - r->t_start) / 1e6 : 0;
    double tpot = r->decode_tpot_ms;
    if (tpot <= 0 && r->completion_tokens > 1 && r->t_end > r->t_first)
        tpot = (r->t_end - r->t_first) / 1e6 / (r->completion_tokens - 1);
    s->tpot_ms = tpot;
    s->transfer_ms = r->transfer_ms;
    s->prefill_ms = r->prefill_ms;
    s->queue_ms = r->queue_ms;
    s->hidden_transfer_fraction = r->hidden;
    s->prefill_worker = r->pw.id;
    s->decode_worker = r->dw.id;
    s->policy = r->policy;
    s->budget = r->codec.budget;
}

#define RT_TOKEN_BYTES 1024 // the most of a token's bytes a log-probability entry carries

/* The bytes token id's entry carries (token_put writes them). */
static size_t token_len(const mdl_tokenizer_t *tok, uint32_t id)
{
    char buf[RT_TOKEN_BYTES];
    int l = mdl_tokenizer_token_bytes(tok, (int32_t)id, buf, sizeof(buf));
    return l > 0 ? FY_MIN((size_t)l, sizeof(buf)) : 0;
}

/* Writes token id's bytes at *text (token_len of them), points b at them, advances *text. */
static void token_put(const mdl_tokenizer_t *tok, uint32_t id, ProtobufCBinaryData *b,
                      uint8_t **text)
{
    b->len = token_len(tok, id);
    b->data = *text;
    if (b->len > 0)
        mdl_tokenizer_token_bytes(tok, (int32_t)id, (char *)*text, b->len);
    *text += b->len;
}

/* Tokens and their log-probabilities: ids[i], lp[i], n_top[i] alternatives at top[i * the
 * request's top_logprobs ..]. */
typedef struct {
    const uint32_t *ids;
    const float *lp;
    const rt_top_t *top;
    const uint8_t *n_top;
} rt_lp_table_t;

static rt_lp_table_t completion_lps(const rt_req_t *r)
{
    return (rt_lp_table_t){r->out_ids, r->out_lp, r->out_top, r->out_n_top};
}

static rt_lp_table_t prompt_lps(const rt_req_t *r)
{
    return (rt_lp_table_t){r->prompt, r->p_lp, r->p_top, r->p_n_top};
}

/* Entries [from, to) of t as messages, with each token's bytes: *n_p entries in one allocation
 * (*arena_p, the caller frees it); NULL when out of memory. */
static Ferry__V1__TokenLogprob **lp_msgs(const rt_req_t *r, rt_lp_table_t t, size_t from, size_t to,
                                         size_t *n_p, void **arena_p)
{
    const mdl_tokenizer_t *tok = r->rt->params.tok;
    const uint32_t n_top = r->sampling.top_logprobs;
    size_t n = to - from, tops = 0, bytes = 0;
    for (size_t i = from; i < to; i++) {
        bytes += token_len(tok, t.ids[i]);
        for (uint8_t k = 0; k < t.n_top[i]; k++)
            bytes += token_len(tok, t.top[i * n_top + k].id);
        tops += t.n_top[i];
    }
    size_t size = n * (sizeof(Ferry__V1__TokenLogprob) + sizeof(void *)) +
                  tops * (sizeof(Ferry__V1__TopLogprob) + sizeof(void *)) + bytes + 1;
    char *arena = malloc(size);
    if (arena == NULL)
        return NULL;
    Ferry__V1__TokenLogprob **out = (Ferry__V1__TokenLogprob **)arena;
    Ferry__V1__TokenLogprob *ent = (Ferry__V1__TokenLogprob *)(out + n);
    Ferry__V1__TopLogprob **top_p = (Ferry__V1__TopLogprob **)(ent + n);
    Ferry__V1__TopLogprob *top = (Ferry__V1__TopLogprob *)(top_p + tops);
    uint8_t *text = (uint8_t *)(top + tops);
    for (size_t i = from; i < to; i++) {
        Ferry__V1__TokenLogprob *e = &ent[i - from];
        ferry__v1__token_logprob__init(e);
        e->token_id = t.ids[i];
        e->logprob = t.lp[i];
        token_put(tok, e->token_id, &e->token, &text);
        e->top = top_p;
        e->n_top = t.n_top[i];
        for (uint8_t k = 0; k < t.n_top[i]; k++) {
            ferry__v1__top_logprob__init(top);
            top->token_id = t.top[i * n_top + k].id;
            top->logprob = t.top[i * n_top + k].lp;
            token_put(tok, top->token_id, &top->token, &text);
            *top_p++ = top++;
        }
        out[i - from] = e;
    }
    *n_p = n;
    *arena_p = arena;
    return out;
}

/* Streams what may be sent (Generate); final adds finish_reason and stats. */
static void stream_out(rt_req_t *r, bool final)
{
    if (r->call == NULL)
        return;
    size_t can = final ? r->text_len : stop_scan(r);
    if (final) {
        char tail[64];
        int n = r->stopped && r->finish == FERRY__V1__FINISH_REASON__FINISH_REASON_STOP
                    ? 0
                    : mdl_detok_flush(&r->detok, tail, sizeof(tail));
        if (n > 0)
            text_append(r, tail, (size_t)n);
        can = r->text_len;
    }
    if (!r->streaming) {
        if (!final)
            return;
        Ferry__V1__CompleteResponse resp = FERRY__V1__COMPLETE_RESPONSE__INIT;
        Ferry__V1__RequestStats stats = FERRY__V1__REQUEST_STATS__INIT;
        fill_stats(r, &stats);
        resp.text = r->text ? r->text : "";
        if (r->return_ids) {
            resp.token_ids = r->out_ids;
            resp.n_token_ids = r->n_out;
        }
        void *arena = NULL, *p_arena = NULL;
        if (r->sampling.logprobs && r->n_out > 0)
            resp.logprobs = lp_msgs(r, completion_lps(r), 0, r->n_out, &resp.n_logprobs, &arena);
        if (r->p_lp != NULL)
            resp.prompt_logprobs =
                lp_msgs(r, prompt_lps(r), 0, r->n_prompt, &resp.n_prompt_logprobs, &p_arena);
        resp.finish_reason = r->finish;
        resp.stats = &stats;
        resp.request_id = r->client_id;
        rpc_call_send(r->call, &resp.base);
        free(arena);
        free(p_arena);
        return;
    }
    bool new_ids = r->return_ids && r->ids_sent < r->n_out;
    bool new_lps = r->sampling.logprobs && r->lp_sent < r->n_out;
    if (!final && can <= r->sent && !new_ids && !new_lps && r->first_sent)
        return;
    const bool first = !r->first_sent;
    r->first_sent = true; // the first message goes out even without text: that is TTFT
    Ferry__V1__GenerateResponse resp = FERRY__V1__GENERATE_RESPONSE__INIT;
    Ferry__V1__RequestStats stats = FERRY__V1__REQUEST_STATS__INIT;
    char saved = '\0';
    if (can > r->sent) {
        saved = r->text[can];
        r->text[can] = '\0';
        resp.text = r->text + r->sent;
    } else {
        resp.text = "";
    }
    if (new_ids) {
        resp.token_ids = r->out_ids + r->ids_sent;
        resp.n_token_ids = r->n_out - r->ids_sent;
    }
    void *arena = NULL, *p_arena = NULL;
    if (new_lps)
        resp.logprobs =
            lp_msgs(r, completion_lps(r), r->lp_sent, r->n_out, &resp.n_logprobs, &arena);
    if (first && r->p_lp != NULL)
        resp.prompt_logprobs =
            lp_msgs(r, prompt_lps(r), 0, r->n_prompt, &resp.n_prompt_logprobs, &p_arena);
    resp.request_id = r->client_id;
    if (final) {
        fill_stats(r, &stats);
        resp.finish_reason = r->finish;
        resp.stats = &stats;
    }
    rpc_call_send(r->call, &resp.base);
    free(arena);
    free(p_arena);
    if (can > r->sent) {
        r->text[can] = saved;
        r->sent = can;
    }
    r->ids_sent = r->n_out;
    if (resp.logprobs != NULL)
        r->lp_sent = r->n_out;
}

/* ---- finishing -------------------------------------------------------------------------- */

static void req_finish_ok(rt_req_t *r)
{
    rt_t *rt = r->rt;
    r->state = ST_DONE;
    r->t_end = fy_clock_ns();
    if (r->finish == FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED)
        r->finish = FERRY__V1__FINISH_REASON__FINISH_REASON_STOP;
    stream_out(r, true);
    release_bookings(r);
    Ferry__V1__RequestStats s = FERRY__V1__REQUEST_STATS__INIT;
    fill_stats(r, &s);
    fy_metric_inc(rt->m.ok);
    fy_metric_observe(rt->m.tpot, s.tpot_ms / 1e3);
    fy_metric_add(rt->m.tokens, r->completion_tokens);
    FY_LOG_INFO(MODULE,
                "%s done: %zu prompt + %u completion tokens, ttft %.1f ms, tpot %.2f ms, KV %" PRIu64
                " -> %" PRIu64 " bytes, transfer %.1f ms (%.0f%% hidden), %s + %s",
                r->id, r->n_prompt, r->completion_tokens, s.ttft_ms, s.tpot_ms, r->raw, r->wire,
                r->transfer_ms, r->hidden * 100, r->pw.id, r->dw.id);
    rpc_call_t *call = r->call;
    r->call = NULL;
    rpc_call_finish(call, RPC_CODE_OK, NULL);
    req_maybe_free(r);
}

static void req_fail(rt_req_t *r, int code, const char *msg, rt_fail_t why)
{
    rt_t *rt = r->rt;
    r->state = ST_DONE;
    release_bookings(r);
    fy_metric_inc(rt->m.fail[why]);
    if (code == RPC_CODE_CANCELLED)
        fy_metric_inc(rt->m.cancelled);
    else
        fy_metric_inc(rt->m.err);
    FY_LOG_INFO(MODULE, "%s failed: %s %s", r->id, rpc_code_name(code), msg);
    if (r->call != NULL) {
        rpc_call_t *call = r->call;
        r->call = NULL;
        rpc_call_finish(call, code, msg);
    }
    req_maybe_free(r);
}

/* The client is gone or its deadline passed: stop the worker side. */
static void on_client_cancel(rpc_call_t *call, void *arg)
{
    rt_req_t *r = arg;
    if (r->state == ST_DONE)
        return;
    // A client that gives up at its deadline resets the stream a moment before the server's
    // own deadline timer would fire: both are the deadline.
    uint64_t dl = rpc_call_deadline_ns(call);
    bool deadline = dl != 0 && fy_clock_ns() + 50000000u >= dl;
    rt_state_t st = r->state;
    r->state = ST_DONE;
    if (r->wcall != NULL)
        rpc_ccall_cancel(r->wcall); // its done callback sees ST_DONE and leaves r alone
    if (st == ST_PREFILL)
        worker_cancel(r->rt, r->pw.rpc_address, r->wid);
    if (st >= ST_RESERVE && r->dw.rpc_address[0])
        worker_cancel(r->rt, r->dw.rpc_address, r->wid);
    req_fail(r, deadline ? RPC_CODE_DEADLINE_EXCEEDED : RPC_CODE_CANCELLED,
             deadline ? "deadline exceeded" : "cancelled by the client",
             deadline ? FAIL_DEADLINE : FAIL_CANCELLED);
}

/* ---- decode ------------------------------------------------------------------------------- */

static void on_decode_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    rt_req_t *r = arg;
    if (r->state != ST_DECODE)
        return;
    const Ferry__V1__GenerateResponse *m = (const Ferry__V1__GenerateResponse *)msg;
    bool more = true;
    for (size_t i = 0; i < m->n_token_ids && more; i++) {
        rt_lp_t lp;
        bool has = r->sampling.logprobs && i < m->n_logprobs &&
                   rt_lp_from(r, m->logprobs[i], m->token_ids[i], &lp);
        more = push_token(r, m->token_ids[i], has ? &lp : NULL);
    }
    if (m->stats != NULL) {
        r->decode_tpot_ms = m->stats->tpot_ms;
        r->decode_completion_tokens = m->stats->completion_tokens;
    }
    if (m->finish_reason != FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED && !r->stopped) {
        r->stopped = true;
        r->finish = m->finish_reason;
    }
    stream_out(r, false);
    if (!more && r->wcall != NULL && m->finish_reason ==
                                         FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED) {
        // Stopped here (stop string, stop token, length): the decode side need not go on.
        worker_cancel(r->rt, r->dw.rpc_address, r->wid);
        req_finish_ok(r);           // r stays: its worker call is still in flight
        rpc_ccall_cancel(r->wcall); // the done callback frees r
    }
}

static void on_decode_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    rt_req_t *r = arg;
    r->wcall = NULL;
    if (r->state != ST_DECODE) {
        req_maybe_free(r);
        return;
    }
    if (code == RPC_CODE_OK || r->stopped) {
        if (r->finish == FERRY__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED)
            r->finish = r->completion_tokens >= r->max_tokens
                            ? FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH
                            : FERRY__V1__FINISH_REASON__FINISH_REASON_STOP;
        router_registry_report(r->rt->params.reg, r->dw.id, true, fy_clock_ns());
        req_finish_ok(r);
        return;
    }
    char msg[256];
    snprintf(msg, sizeof(msg), "decode worker %s: %s", r->dw.id, message);
    if (code == RPC_CODE_UNAVAILABLE || code == RPC_CODE_INTERNAL || code == RPC_CODE_UNKNOWN)
        router_registry_report(r->rt->params.reg, r->dw.id, false, fy_clock_ns());
    // The worker call carries the client's deadline: running out of it is the client's.
    bool deadline = code == RPC_CODE_DEADLINE_EXCEEDED && r->deadline_ns != 0 &&
                    fy_clock_ns() + 5000000u >= r->deadline_ns;
    req_fail(r, code == RPC_CODE_CANCELLED ? RPC_CODE_UNAVAILABLE : code, msg,
             deadline ? FAIL_DEADLINE : FAIL_DECODE);
}

static void start_decode(rt_req_t *r, uint32_t first)
{
    rt_t *rt = r->rt;
    rpc_channel_t *ch = chan_get(rt, r->dw.rpc_address);
    if (ch == NULL) {
        req_fail(r, RPC_CODE_INTERNAL, "no channel to the decode worker", FAIL_DECODE);
        return;
    }
    Ferry__V1__DecodeRequest req = FERRY__V1__DECODE_REQUEST__INIT;
    req.request_id = r->wid;
    req.reservation_id = r->reservation_id;
    req.sampling = &r->sampling;
    req.return_token_ids = true;
    req.first_token_id = first;
    req.prompt_token_ids = r->prompt;
    req.n_prompt_token_ids = r->n_prompt;
    req.completion_tokens_sent = 1;
    rpc_call_opts_t opts = {.timeout_ms = (uint32_t)remaining_ms(r, 0)};
    r->state = ST_DECODE;
    fy_status_t st = rpc_channel_call(ch, "/ferry.v1.Worker/Decode", &req.base,
                                      &ferry__v1__generate_response__descriptor, &opts,
                                      on_decode_msg, on_decode_done, r, &r->wcall);
    if (st != FY_OK) {
        r->wcall = NULL;
        worker_cancel(rt, r->dw.rpc_address, r->wid);
        req_fail(r, RPC_CODE_INTERNAL, fy_status_str(st), FAIL_DECODE);
    }
}

/* ---- prefill ------------------------------------------------------------------------------ */

/* The prompt's log-probabilities from the prefill worker's answer: entry i for prompt token
 * i + 1, checked against the prompt (a mismatched or missing entry leaves NAN). Without memory
 * for them the answer goes without. */
static void take_prompt_lps(rt_req_t *r, const Ferry__V1__PrefillResponse *m)
{
    const size_t n = r->n_prompt, k = r->sampling.top_logprobs;
    if (r->p_lp == NULL) {
        r->p_lp = malloc(n * sizeof(float));
        r->p_top = malloc(FY_MAX(n * k, (size_t)1) * sizeof(rt_top_t));
        r->p_n_top = calloc(n, 1);
        if (r->p_lp == NULL || r->p_top == NULL || r->p_n_top == NULL) {
            free(r->p_lp), free(r->p_top), free(r->p_n_top);
            r->p_lp = NULL, r->p_top = NULL, r->p_n_top = NULL;
            return;
        }
    }
    for (size_t i = 0; i < n; i++) {
        rt_lp_t lp;
        const Ferry__V1__TokenLogprob *in =
            i > 0 && i - 1 < m->n_prompt_logprobs ? m->prompt_logprobs[i - 1] : NULL;
        if (!rt_lp_from(r, in, r->prompt[i], &lp)) {
            r->p_lp[i] = NAN;
            r->p_n_top[i] = 0;
            continue;
        }
        r->p_lp[i] = lp.lp;
        r->p_n_top[i] = lp.n_top;
        memcpy(r->p_top + i * k, lp.top, lp.n_top * sizeof(rt_top_t));
    }
}

static void on_prefill_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    rt_req_t *r = arg;
    const Ferry__V1__PrefillResponse *m = (const Ferry__V1__PrefillResponse *)msg;
    r->raw = m->kv_raw_bytes;
    r->wire = m->kv_wire_bytes;
    r->transfer_ms = m->transfer_ms;
    r->prefill_ms = m->prefill_ms;
    r->queue_ms = m->queue_ms;
    r->hidden = m->hidden_transfer_fraction;
    r->first_token = m->first_token_id;
    r->has_first_lp =
        r->sampling.logprobs && rt_lp_from(r, m->first_logprob, m->first_token_id, &r->first_lp);
    if (r->sampling.prompt_logprobs)
        take_prompt_lps(r, m);
    r->got_prefill = true;
}

/* Retries on another pair when attempts remain, else fails the client. */
static void retry_or_fail(rt_req_t *r, int code, const char *msg, rt_fail_t why)
{
    rt_t *rt = r->rt;
    fy_metric_inc(rt->m.fail[why]);
    release_bookings(r);
    if (r->attempts <= rt->params.retries && r->call != NULL &&
        (r->deadline_ns == 0 || fy_clock_ns() < r->deadline_ns)) {
        FY_LOG_WARN(MODULE, "%s: %s (%s); retrying on another pair", r->id, msg,
                    k_fail_names[why]);
        fy_metric_inc(rt->m.retries);
        req_place(r);
        return;
    }
    r->state = ST_DONE;
    if (code == RPC_CODE_CANCELLED)
        code = RPC_CODE_UNAVAILABLE;
    if (r->call != NULL) {
        fy_metric_inc(rt->m.err);
        FY_LOG_INFO(MODULE, "%s failed: %s %s", r->id, rpc_code_name(code), msg);
        rpc_call_t *call = r->call;
        r->call = NULL;
        rpc_call_finish(call, code, msg);
    }
    req_maybe_free(r);
}

static void on_prefill_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    rt_req_t *r = arg;
    r->wcall = NULL;
    if (r->state != ST_PREFILL) {
        req_maybe_free(r);
        return;
    }
    rt_t *rt = r->rt;
    if (code != RPC_CODE_OK || !r->got_prefill) {
        // The reservation is useless now; the decode side frees it at once.
        worker_cancel(rt, r->dw.rpc_address, r->wid);
        bool transfer = strstr(message, "KV transfer") != NULL;
        const char *blame = transfer ? r->dw.id : r->pw.id;
        if (code != RPC_CODE_INVALID_ARGUMENT && code != RPC_CODE_DEADLINE_EXCEEDED)
            router_registry_report(rt->params.reg, blame, false, fy_clock_ns());
        if (code == RPC_CODE_INVALID_ARGUMENT || code == RPC_CODE_DEADLINE_EXCEEDED) {
            // Not the workers' fault: bad input, or the client's deadline ran out.
            req_fail(r, code, message, code == RPC_CODE_INVALID_ARGUMENT ? FAIL_INVALID
                                                                        : FAIL_DEADLINE);
            return;
        }
        char msg[256];
        snprintf(msg, sizeof(msg), "prefill on %s: %s", r->pw.id, message);
        if (transfer)
            snprintf(r->excl_d, sizeof(r->excl_d), "%s", r->dw.id);
        else
            snprintf(r->excl_p, sizeof(r->excl_p), "%s", r->pw.id);
        retry_or_fail(r, code, msg, transfer ? FAIL_TRANSFER : FAIL_PREFILL);
        return;
    }
    uint32_t first = r->first_token;
    router_registry_report(rt->params.reg, r->pw.id, true, fy_clock_ns());
    if (r->booked_p) {
        router_registry_release(rt->params.reg, r->pw.id, (uint32_t)r->n_prompt, NULL, 0);
        r->booked_p = false;
    }
    r->t_first = fy_clock_ns();
    fy_metric_observe(rt->m.ttft, (r->t_first - r->t_start) / 1e9);
    fy_metric_add(rt->m.raw, (double)r->raw);
    fy_metric_add(rt->m.wire, (double)r->wire);
    double raw = fy_metric_value(rt->m.raw);
    fy_metric_set(rt->m.ratio, raw > 0 ? fy_metric_value(rt->m.wire) / raw : 0);
    fy_metric_observe(rt->m.transfer, r->transfer_ms / 1e3);
    fy_metric_set(rt->m.hidden, r->hidden);
    bool more = push_token(r, first, r->has_first_lp ? &r->first_lp : NULL);
    stream_out(r, false);
    if (!more) {
        worker_cancel(rt, r->dw.rpc_address, r->wid); // nothing to decode
        req_finish_ok(r);
        return;
    }
    start_decode(r, first);
}

static void start_prefill(rt_req_t *r)
{
    rt_t *rt = r->rt;
    rpc_channel_t *ch = chan_get(rt, r->pw.rpc_address);
    if (ch == NULL) {
        req_fail(r, RPC_CODE_INTERNAL, "no channel to the prefill worker", FAIL_PREFILL);
        return;
    }
    Ferry__V1__PrefillRequest req = FERRY__V1__PREFILL_REQUEST__INIT;
    req.request_id = r->wid;
    req.prompt_token_ids = r->prompt;
    req.n_prompt_token_ids = r->n_prompt;
    req.sampling = &r->sampling;
    req.codec = &r->codec;
    req.decode_kv_address = r->dw.kv_address;
    req.reservation_id = r->reservation_id;
    req.pair_id.data = r->pair_id;
    req.pair_id.len = r->pair_id_len;
    req.pair_generation = r->pair_generation;
    req.via_pair = r->via_pair;
    if (rt->params.kv_seal) {
        req.kv_key.data = r->kv_key;
        req.kv_key.len = sizeof(r->kv_key);
    }
    if (r->deadline_ns != 0)
        req.deadline_unix_ms =
            (fy_clock_realtime_ns() + (r->deadline_ns - FY_MIN(r->deadline_ns, fy_clock_ns()))) /
            1000000u;
    rpc_call_opts_t opts = {.timeout_ms = (uint32_t)remaining_ms(r, rt->params.prefill_timeout_ms)};
    r->state = ST_PREFILL;
    r->got_prefill = false;
    fy_status_t st = rpc_channel_call(ch, "/ferry.v1.Worker/Prefill", &req.base,
                                      &ferry__v1__prefill_response__descriptor, &opts,
                                      on_prefill_msg, on_prefill_done, r, &r->wcall);
    if (st != FY_OK) {
        r->wcall = NULL;
        worker_cancel(rt, r->dw.rpc_address, r->wid);
        req_fail(r, RPC_CODE_INTERNAL, fy_status_str(st), FAIL_PREFILL);
    }
}

/* ---- reserve ------------------------------------------------------------------------------ */

static void on_reserve_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    rt_req_t *r = arg;
    const Ferry__V1__ReserveKVResponse *resp = (const Ferry__V1__ReserveKVResponse *)msg;
    r->reservation_id = resp->reservation_id;
    // Passed on to the prefill worker as they came; an id of another size is not one.
    r->pair_id_len = resp->pair_id.len == sizeof(r->pair_id) ? resp->pair_id.len : 0;
    if (r->pair_id_len > 0)
        memcpy(r->pair_id, resp->pair_id.data, r->pair_id_len);
    r->pair_generation = resp->pair_generation;
    r->via_pair = resp->via_pair;
}


static void on_reserve_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    rt_req_t *r = arg;
    r->wcall = NULL;
    if (r->state != ST_RESERVE) {
        if (code == RPC_CODE_OK)
            worker_cancel(r->rt, r->dw.rpc_address, r->wid);
        req_maybe_free(r);
        return;
    }
    rt_t *rt = r->rt;
    if (code == RPC_CODE_OK && r->reservation_id != 0) {
        start_prefill(r);
        return;
    }
    char msg[256];
    snprintf(msg, sizeof(msg), "ReserveKV on %s: %s %s", r->dw.id, rpc_code_name(code), message);
    snprintf(r->excl_d, sizeof(r->excl_d), "%s", r->dw.id);
    if (code == RPC_CODE_RESOURCE_EXHAUSTED) {
        // Another decode worker may have room; this is no failure of the worker.
        fy_metric_inc(rt->m.fail[FAIL_POOL_FULL]);
        release_bookings(r);
        r->pool_full = true;
        if (++r->full_tries < 4) {
            r->attempts--; // not a retry
            req_place(r);
        } else {
            req_fail(r, RPC_CODE_RESOURCE_EXHAUSTED, msg, FAIL_POOL_FULL);
        }
        return;
    }
    if (code == RPC_CODE_DEADLINE_EXCEEDED && r->deadline_ns != 0 &&
        fy_clock_ns() >= r->deadline_ns) {
        req_fail(r, code, msg, FAIL_DEADLINE);
        return;
    }
    router_registry_report(rt->params.reg, r->dw.id, false, fy_clock_ns());
    retry_or_fail(r, code, msg, FAIL_RESERVE);
}

static void req_place(rt_req_t *r)
{
    rt_t *rt = r->rt;
    r->attempts++;
    r->reservation_id = 0;
    r->pair_id_len = 0;
    r->pair_generation = 0;
    r->via_pair = false;
    if (r->attempts == 1)
        snprintf(r->wid, sizeof(r->wid), "%s", r->id);
    else
        snprintf(r->wid, sizeof(r->wid), "%s.%u", r->id, r->attempts);
    router_place_req_t pr = {.model_fingerprint = 0,
                             .prompt_tokens = (uint32_t)r->n_prompt,
                             .kv_pages = r->kv_pages,
                             .exclude_prefill = r->excl_p[0] ? r->excl_p : NULL,
                             .exclude_decode = r->excl_d[0] ? r->excl_d : NULL};
    fy_status_t st = router_registry_place(rt->params.reg, &pr, fy_clock_ns(), &r->pw, &r->dw);
    if (st == FY_ERR_UNAVAILABLE && r->attempts > 1 && !r->pool_full &&
        (pr.exclude_prefill != NULL || pr.exclude_decode != NULL)) {
        // No other pair: a retry on the same one beats failing (a dead worker fails fast,
        // and the backoff after a failure still prefers any other worker).
        pr.exclude_prefill = pr.exclude_decode = NULL;
        st = router_registry_place(rt->params.reg, &pr, fy_clock_ns(), &r->pw, &r->dw);
    }
    if (st == FY_ERR_RESOURCE_EXHAUSTED) {
        req_fail(r, RPC_CODE_RESOURCE_EXHAUSTED, "no decode worker has room for this prompt",
                 FAIL_POOL_FULL);
        return;
    }
    if (st != FY_OK && r->pool_full) {
        // Every decode worker that could take it said its pool is full.
        req_fail(r, RPC_CODE_RESOURCE_EXHAUSTED, "KV page pools of the decode workers are full",
                 FAIL_POOL_FULL);
        return;
    }
    if (st != FY_OK) {
        req_fail(r, RPC_CODE_UNAVAILABLE,
                 r->attempts > 1 ? "no other prefill/decode worker pair to retry on"
                                 : "no prefill and decode worker available",
                 FAIL_NO_WORKERS);
        return;
    }
    r->booked_p = r->booked_d = true;
    rpc_channel_t *ch = chan_get(rt, r->dw.rpc_address);
    if (ch == NULL) {
        req_fail(r, RPC_CODE_INTERNAL, "no channel to the decode worker", FAIL_RESERVE);
        return;
    }
    Ferry__V1__ReserveKVRequest req = FERRY__V1__RESERVE_KVREQUEST__INIT;
    req.request_id = r->wid;
    req.prompt_tokens = (uint32_t)r->n_prompt;
    req.max_new_tokens = r->max_tokens;
    req.expected_wire_bytes = r->expected_wire;
    req.lease_ms = rt->params.reserve_lease_ms;
    if (rt->params.kv_seal) { // a fresh key each attempt, so no two transfers share one
        if (uv_random(NULL, NULL, r->kv_key, sizeof(r->kv_key), 0, NULL) != 0) {
            req_fail(r, RPC_CODE_INTERNAL, "no random bytes for the KV key", FAIL_RESERVE);
            return;
        }
        req.kv_key.data = r->kv_key;
        req.kv_key.len = sizeof(r->kv_key);
    }
    char peer[96] = "";
    if (router_can_pair(&r->pw, &r->dw))
        snprintf(peer, sizeof(peer), "%s#%016llx", r->pw.id, (unsigned long long)r->pw.instance);
    req.pair_peer = peer;
    rpc_call_opts_t opts = {.timeout_ms = (uint32_t)remaining_ms(r, rt->params.worker_timeout_ms)};
    r->state = ST_RESERVE;
    st = rpc_channel_call(ch, "/ferry.v1.Worker/ReserveKV", &req.base,
                          &ferry__v1__reserve_kvresponse__descriptor, &opts, on_reserve_msg,
                          on_reserve_done, r, &r->wcall);
    if (st != FY_OK) {
        r->wcall = NULL;
        req_fail(r, RPC_CODE_INTERNAL, fy_status_str(st), FAIL_RESERVE);
    }
}

/* ---- request intake ----------------------------------------------------------------------- */

/* A proto3 string field must hold valid UTF-8 (stock gRPC servers refuse others); a request
 * whose text is not gets INVALID_ARGUMENT rather than tokens or stop strings that would cut
 * characters apart. */
static bool utf8_field(const char *s)
{
    return mdl_utf8_valid(s, strlen(s));
}

/* Tokenizes the request's input into r->prompt. */
static fy_status_t build_prompt(rt_t *rt, const Ferry__V1__GenerateRequest *g, rt_req_t *r,
                                char *err, size_t err_len)
{
    const mdl_tokenizer_t *tok = rt->params.tok;
    char *text = NULL;
    bool special = false;
    switch (g->input_case) {
    case FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT_TOKEN_IDS: {
        const Ferry__V1__TokenIds *t = g->prompt_token_ids;
        if (t == NULL || t->n_ids == 0) {
            snprintf(err, err_len, "empty prompt_token_ids");
            return FY_ERR_INVALID_ARG;
        }
        r->prompt = malloc(t->n_ids * sizeof(uint32_t));
        if (r->prompt == NULL)
            return FY_ERR_NO_MEMORY;
        for (size_t i = 0; i < t->n_ids; i++) {
            if (t->ids[i] >= (uint32_t)mdl_tokenizer_n_vocab(tok)) {
                snprintf(err, err_len, "token id %u outside the vocabulary", t->ids[i]);
                return FY_ERR_INVALID_ARG;
            }
            r->prompt[i] = t->ids[i];
        }
        r->n_prompt = t->n_ids;
        return FY_OK;
    }
    case FERRY__V1__GENERATE_REQUEST__INPUT_CHAT: {
        const Ferry__V1__ChatMessages *c = g->chat;
        if (c == NULL || c->n_messages == 0 || c->n_messages > 1024) {
            snprintf(err, err_len, "chat needs 1 to 1024 messages");
            return FY_ERR_INVALID_ARG;
        }
        mdl_chat_msg_t *msgs = calloc(c->n_messages, sizeof(*msgs));
        if (msgs == NULL)
            return FY_ERR_NO_MEMORY;
        for (size_t i = 0; i < c->n_messages; i++) {
            msgs[i].role = c->messages[i]->role;
            msgs[i].content = c->messages[i]->content;
            if (!utf8_field(msgs[i].role) || !utf8_field(msgs[i].content)) {
                free(msgs);
                snprintf(err, err_len, "chat message %zu is not valid UTF-8", i);
                return FY_ERR_INVALID_ARG;
            }
        }
        fy_status_t st = mdl_chat_render(tok, msgs, c->n_messages, true, &text);
        free(msgs);
        if (st != FY_OK) {
            snprintf(err, err_len,
                     "this model has no chat template of a known family "
                     "(ChatML, Llama-3, Mistral, Llama-2, Gemma, Phi-3)");
            return FY_ERR_INVALID_ARG;
        }
        special = true;
        break;
    }
    case FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT:
        if (!utf8_field(g->prompt)) {
            snprintf(err, err_len, "prompt is not valid UTF-8");
            return FY_ERR_INVALID_ARG;
        }
        text = strdup(g->prompt);
        if (text == NULL)
            return FY_ERR_NO_MEMORY;
        break;
    default:
        snprintf(err, err_len, "request has no prompt, chat or prompt_token_ids");
        return FY_ERR_INVALID_ARG;
    }
    size_t len = strlen(text), n = 0;
    mdl_tokenizer_encode(tok, text, len, special, NULL, 0, &n);
    size_t off = mdl_tokenizer_add_bos(tok) && mdl_tokenizer_bos(tok) >= 0 ? 1 : 0;
    int32_t *ids = malloc((n + off + 1) * sizeof(int32_t));
    r->prompt = malloc((n + off + 1) * sizeof(uint32_t));
    fy_status_t st = ids && r->prompt ? FY_OK : FY_ERR_NO_MEMORY;
    if (st == FY_OK)
        st = mdl_tokenizer_encode(tok, text, len, special, ids + off, n + 1, &n);
    free(text);
    if (st == FY_OK) {
        if (off)
            ids[0] = mdl_tokenizer_bos(tok);
        n += off;
        for (size_t i = 0; i < n; i++)
            r->prompt[i] = (uint32_t)ids[i];
        r->n_prompt = n;
        if (n == 0) {
            snprintf(err, err_len, "empty prompt");
            st = FY_ERR_INVALID_ARG;
        }
    }
    free(ids);
    return st;
}

/* OpenAI's presence and frequency penalties and the logit biases into the request's own
 * sampling message, checked: penalties within +-MDL_MAX_PENALTY, at most MDL_MAX_LOGIT_BIAS
 * biases within +-MDL_MAX_BIAS on distinct tokens of the vocabulary. */
static fy_status_t copy_penalties(rt_t *rt, const Ferry__V1__SamplingParams *in, rt_req_t *r,
                                  char *err, size_t err_len)
{
    Ferry__V1__SamplingParams *s = &r->sampling;
    if (!(fabsf(in->presence_penalty) <= MDL_MAX_PENALTY) ||
        !(fabsf(in->frequency_penalty) <= MDL_MAX_PENALTY)) {
        snprintf(err, err_len, "presence_penalty and frequency_penalty must be in [-%g, %g]",
                 (double)MDL_MAX_PENALTY, (double)MDL_MAX_PENALTY);
        return FY_ERR_INVALID_ARG;
    }
    s->presence_penalty = in->presence_penalty;
    s->frequency_penalty = in->frequency_penalty;
    const size_t n = in->n_logit_bias;
    if (n == 0)
        return FY_OK;
    if (n > MDL_MAX_LOGIT_BIAS) {
        snprintf(err, err_len, "logit_bias: at most %d tokens", MDL_MAX_LOGIT_BIAS);
        return FY_ERR_INVALID_ARG;
    }
    if ((r->bias = calloc(n, sizeof(*r->bias))) == NULL ||
        (r->bias_p = calloc(n, sizeof(*r->bias_p))) == NULL)
        return FY_ERR_NO_MEMORY;
    const uint32_t n_vocab = (uint32_t)mdl_tokenizer_n_vocab(rt->params.tok);
    for (size_t i = 0; i < n; i++) {
        const Ferry__V1__LogitBias *b = in->logit_bias[i];
        bool dup = false;
        for (size_t j = 0; j < i; j++)
            dup |= r->bias[j].token_id == b->token_id;
        if (b->token_id >= n_vocab || dup || !(fabsf(b->bias) <= MDL_MAX_BIAS)) {
            snprintf(err, err_len, "logit_bias: token %u %s", b->token_id,
                     b->token_id >= n_vocab ? "outside the vocabulary"
                     : dup                  ? "given twice"
                                            : "with a bias outside [-100, 100]");
            return FY_ERR_INVALID_ARG;
        }
        ferry__v1__logit_bias__init(&r->bias[i]);
        r->bias[i].token_id = b->token_id;
        r->bias[i].bias = b->bias;
        r->bias_p[i] = &r->bias[i];
    }
    s->logit_bias = r->bias_p;
    s->n_logit_bias = n;
    return FY_OK;
}

static fy_status_t build_sampling(rt_t *rt, const Ferry__V1__GenerateRequest *g, rt_req_t *r,
                                  char *err, size_t err_len)
{
    const Ferry__V1__SamplingParams *in = g->sampling;
    Ferry__V1__SamplingParams *s = &r->sampling;
    ferry__v1__sampling_params__init(s);
    if (in != NULL) {
        s->temperature = in->temperature;
        s->top_k = in->top_k;
        s->top_p = in->top_p;
        s->repetition_penalty = in->repetition_penalty;
        s->seed = in->seed;
        s->max_tokens = in->max_tokens;
        s->ignore_eos = in->ignore_eos;
        s->logprobs = in->logprobs || in->top_logprobs > 0;
        s->top_logprobs = in->top_logprobs;
        s->prompt_logprobs = in->prompt_logprobs; // the prefill worker checks the length
        s->json_object = in->json_object;
        if (in->json_object && in->n_forced_token_ids > 0) {
            snprintf(err, err_len, "json_object: not with forced_token_ids");
            return FY_ERR_INVALID_ARG;
        }
        if (in->json_schema != NULL && in->json_schema[0] != '\0') {
            // Compiled here only to refuse a bad schema before any worker sees it.
            if (in->json_object || in->n_forced_token_ids > 0) {
                snprintf(err, err_len, "json_schema: not with json_object or forced_token_ids");
                return FY_ERR_INVALID_ARG;
            }
            mdl_schema_t *schema = NULL;
            char why[140];
            fy_status_t st = mdl_schema_compile(in->json_schema, strlen(in->json_schema), &schema,
                                                why, sizeof(why));
            mdl_schema_destroy(schema);
            if (st != FY_OK) {
                snprintf(err, err_len, "json_schema: %s", why);
                return st == FY_ERR_NO_MEMORY ? st : FY_ERR_INVALID_ARG;
            }
            if ((r->json_schema = strdup(in->json_schema)) == NULL)
                return FY_ERR_NO_MEMORY;
            s->json_schema = r->json_schema;
        }
        if (in->top_logprobs > MDL_MAX_TOP_LOGPROBS) {
            snprintf(err, err_len, "top_logprobs: at most %d", MDL_MAX_TOP_LOGPROBS);
            return FY_ERR_INVALID_ARG;
        }
        if (in->n_forced_token_ids > 0) {
            const size_t n = in->n_forced_token_ids;
            const uint32_t n_vocab = (uint32_t)mdl_tokenizer_n_vocab(rt->params.tok);
            if (in->n_stop > 0 || in->n_stop_token_ids > 0 ||
                (in->max_tokens != 0 && in->max_tokens < n)) {
                snprintf(err, err_len,
                         "forced_token_ids: no stop strings or stop ids with "
                         "them, and max_tokens 0 or at least their count");
                return FY_ERR_INVALID_ARG;
            }
            if ((r->forced = malloc(n * sizeof(uint32_t))) == NULL)
                return FY_ERR_NO_MEMORY;
            for (size_t i = 0; i < n; i++) {
                if (in->forced_token_ids[i] >= n_vocab) {
                    snprintf(err, err_len, "forced token id %u outside the vocabulary",
                             in->forced_token_ids[i]);
                    return FY_ERR_INVALID_ARG;
                }
                r->forced[i] = in->forced_token_ids[i];
            }
            s->forced_token_ids = r->forced;
            s->n_forced_token_ids = n;
            s->max_tokens = (uint32_t)n;
            s->ignore_eos = true; // the workers take the forced tokens, EOS among them
        }
        if (!(in->temperature >= 0) || !(in->top_p >= 0) || in->top_p > 1 ||
            !(in->repetition_penalty >= 0)) {
            snprintf(err, err_len, "sampling parameters out of range");
            return FY_ERR_INVALID_ARG;
        }
        fy_status_t st = copy_penalties(rt, in, r, err, err_len);
        if (st != FY_OK)
            return st;
        if (in->n_stop > RT_MAX_STOPS || in->n_stop_token_ids > RT_MAX_STOP_IDS - 2) {
            snprintf(err, err_len, "at most %d stop strings and %d stop token ids", RT_MAX_STOPS,
                     RT_MAX_STOP_IDS - 2);
            return FY_ERR_INVALID_ARG;
        }
        for (size_t i = 0; i < in->n_stop; i++) {
            size_t l = strlen(in->stop[i]);
            if (l == 0 || l > 256 || !mdl_utf8_valid(in->stop[i], l)) {
                snprintf(err, err_len, "stop strings must be 1 to 256 bytes of valid UTF-8");
                return FY_ERR_INVALID_ARG;
            }
            if ((r->stops[r->n_stops] = strdup(in->stop[i])) == NULL)
                return FY_ERR_NO_MEMORY;
            r->n_stops++;
            r->max_stop_len = FY_MAX(r->max_stop_len, l);
        }
        for (size_t i = 0; i < in->n_stop_token_ids; i++)
            r->stop_ids[s->n_stop_token_ids++] = in->stop_token_ids[i];
    }
    if (!s->ignore_eos) {
        if (rt->stop_eos >= 0)
            r->stop_ids[s->n_stop_token_ids++] = (uint32_t)rt->stop_eos;
        if (rt->stop_turn >= 0 && rt->stop_turn != rt->stop_eos)
            r->stop_ids[s->n_stop_token_ids++] = (uint32_t)rt->stop_turn;
    }
    s->stop_token_ids = r->stop_ids;
    uint32_t max = s->max_tokens ? s->max_tokens : rt->params.default_max_tokens;
    uint64_t room = r->n_prompt < (size_t)rt->n_ctx ? (uint64_t)rt->n_ctx - r->n_prompt : 0;
    if (room == 0) {
        snprintf(err, err_len, "prompt of %zu tokens fills the context (%d)", r->n_prompt,
                 rt->n_ctx);
        return FY_ERR_INVALID_ARG;
    }
    if (r->forced != NULL && s->n_forced_token_ids > room) {
        snprintf(err, err_len,
                 "prompt of %zu tokens and %zu forced tokens overflow the context "
                 "(%d)",
                 r->n_prompt, s->n_forced_token_ids, rt->n_ctx);
        return FY_ERR_INVALID_ARG;
    }
    r->max_tokens = (uint32_t)FY_MIN((uint64_t)max, room);
    s->max_tokens = r->max_tokens;
    return FY_OK;
}

static void start_request(rpc_call_t *call, const ProtobufCMessage *msg, rt_t *rt, bool streaming)
{
    const Ferry__V1__GenerateRequest *g = (const Ferry__V1__GenerateRequest *)msg;
    if (rt->draining) {
        rpc_call_finish(call, RPC_CODE_UNAVAILABLE, "router draining");
        return;
    }
    if (g->model != NULL && g->model[0] != '\0' && strcmp(g->model, rt->model_name) != 0) {
        char m[192];
        snprintf(m, sizeof(m), "unknown model \"%.64s\" (serving \"%.64s\")", g->model,
                 rt->model_name);
        rpc_call_finish(call, RPC_CODE_NOT_FOUND, m);
        return;
    }
    rt_req_t *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    r->rt = rt;
    r->streaming = streaming;
    r->t_start = fy_clock_ns();
    r->deadline_ns = rpc_call_deadline_ns(call);
    snprintf(r->id, sizeof(r->id), "%08x-%" PRIu64, rt->instance, ++rt->seq);
    snprintf(r->client_id, sizeof(r->client_id), "%s",
             g->request_id && g->request_id[0] ? g->request_id : r->id);
    r->return_ids = g->return_token_ids;
    r->next = rt->live;
    if (rt->live)
        rt->live->prev = r;
    rt->live = r;
    rt->n_live++;
    fy_metric_set(rt->m.in_flight, (double)rt->n_live);
    r->call = call;
    char err[160] = "";
    fy_status_t st = build_prompt(rt, g, r, err, sizeof(err));
    if (st == FY_OK)
        st = build_sampling(rt, g, r, err, sizeof(err));
    ferry__v1__codec_params__init(&r->codec);
    const char *pol = g->codec && g->codec->policy && g->codec->policy[0] ? g->codec->policy
                                                                          : rt->policy;
    snprintf(r->policy, sizeof(r->policy), "%s", pol);
    r->codec.policy = r->policy;
    r->codec.budget = g->codec && g->codec->budget != 0 ? g->codec->budget
                                                        : rt->params.default_budget;
    if (st == FY_OK && !(r->codec.budget >= 0 && r->codec.budget <= 1)) {
        snprintf(err, sizeof(err), "codec budget %g outside (0, 1]", (double)r->codec.budget);
        st = FY_ERR_INVALID_ARG;
    }
    if (st != FY_OK) {
        req_fail(r, rpc_code_from_status(st), err[0] ? err : fy_status_str(st), FAIL_INVALID);
        return;
    }
    if (r->codec.budget > 0) // a prompt under FY_KV_FLOOR_TOKENS goes whole, and so on
        r->codec.budget = (float)fy_kv_budget_floor(r->codec.budget, r->n_prompt);
    mdl_detok_init(&r->detok, rt->params.tok, true);
    // KV the decode side must hold: b x FP16 of the prompt (b = 1 unless the request says),
    // frame headers and option maps, plus 10%; pages as the decode workers report them.
    uint64_t raw = 2ull * (uint64_t)rt->n_layers * (uint64_t)rt->n_kv_heads * r->n_prompt *
                   (uint64_t)rt->head_dim * 2u;
    double b = r->codec.budget > 0 ? r->codec.budget : 1.0;
    uint64_t maps = (uint64_t)rt->n_layers * (uint64_t)rt->n_kv_heads * (r->n_prompt + 1) / 2;
    r->expected_wire = (uint64_t)(raw * b * 1.1) + maps + (uint64_t)rt->n_layers * 256u;
    uint32_t page_bytes = 32768;
    router_worker_t ws[32];
    size_t nw = router_registry_snapshot(rt->params.reg, ws, FY_ARRAY_SIZE(ws));
    for (size_t i = 0; i < FY_MIN(nw, FY_ARRAY_SIZE(ws)); i++)
        if (ws[i].role == ROUTER_ROLE_DECODE && ws[i].load.page_bytes > 0)
            page_bytes = ws[i].load.page_bytes;
    r->kv_pages = (r->expected_wire + page_bytes - 1) / page_bytes;
    rpc_call_set_cancel_cb(call, on_client_cancel, r);
    FY_LOG_DEBUG(MODULE, "%s: %zu prompt tokens, max %u new, policy %s", r->id, r->n_prompt,
                 r->max_tokens, r->policy[0] ? r->policy : "(workers')");
    req_place(r);
}

static void on_generate(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    start_request(call, msg, arg, true);
}

static void on_complete(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    start_request(call, msg, arg, false);
}

static void on_tokenize(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    rt_t *rt = arg;
    const Ferry__V1__TokenizeRequest *req = (const Ferry__V1__TokenizeRequest *)msg;
    const mdl_tokenizer_t *tok = rt->params.tok;
    size_t len = strlen(req->text), n = 0;
    if (len > (16u << 20)) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "text over 16 MiB");
        return;
    }
    if (!mdl_utf8_valid(req->text, len)) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "text is not valid UTF-8");
        return;
    }
    mdl_tokenizer_encode(tok, req->text, len, req->add_special, NULL, 0, &n);
    size_t off = req->add_special && mdl_tokenizer_add_bos(tok) && mdl_tokenizer_bos(tok) >= 0;
    int32_t *ids = malloc((n + 2) * sizeof(int32_t));
    uint32_t *uids = malloc((n + 2) * sizeof(uint32_t));
    char **pieces = calloc(n + 2, sizeof(char *));
    if (ids == NULL || uids == NULL || pieces == NULL ||
        mdl_tokenizer_encode(tok, req->text, len, req->add_special, ids + off, n + 1, &n) !=
            FY_OK) {
        free(ids);
        free(uids);
        free(pieces);
        rpc_call_finish(call, RPC_CODE_INTERNAL, "tokenizer failed");
        return;
    }
    if (off)
        ids[0] = mdl_tokenizer_bos(tok);
    n += off;
    // A piece is a proto3 string: a token that holds part of a character (byte-level BPE
    // splits rare characters into byte tokens) shows U+FFFD for those bytes; ids are exact.
    for (size_t i = 0; i < n; i++) {
        uids[i] = (uint32_t)ids[i];
        int pl = mdl_tokenizer_token_bytes(tok, ids[i], NULL, 0);
        size_t raw_len = pl > 0 ? (size_t)pl : 0;
        char *raw = malloc(raw_len + 1);
        pieces[i] = malloc(3 * raw_len + 1);
        if (raw != NULL && pieces[i] != NULL) {
            if (pl > 0)
                mdl_tokenizer_token_bytes(tok, ids[i], raw, raw_len + 1);
            mdl_utf8_sanitize(raw, raw_len, pieces[i]);
        } else {
            free(pieces[i]); // out of memory: the call fails below
            pieces[i] = NULL;
        }
        free(raw);
    }
    Ferry__V1__TokenizeResponse resp = FERRY__V1__TOKENIZE_RESPONSE__INIT;
    resp.ids = uids;
    resp.n_ids = n;
    resp.pieces = pieces;
    resp.n_pieces = n;
    bool ok = true;
    for (size_t i = 0; i < n; i++)
        ok &= pieces[i] != NULL;
    if (ok)
        rpc_call_send(call, &resp.base);
    rpc_call_finish(call, ok ? RPC_CODE_OK : RPC_CODE_RESOURCE_EXHAUSTED,
                    ok ? NULL : "out of memory");
    for (size_t i = 0; i < n; i++)
        free(pieces[i]);
    free(pieces);
    free(ids);
    free(uids);
}

static void on_list_models(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    rt_t *rt = arg;
    Ferry__V1__ModelInfo info = FERRY__V1__MODEL_INFO__INIT;
    info.name = rt->model_name;
    info.architecture = rt->arch;
    info.n_layers = (uint32_t)rt->n_layers;
    info.n_heads = (uint32_t)rt->n_heads;
    info.n_kv_heads = (uint32_t)rt->n_kv_heads;
    info.head_dim = (uint32_t)rt->head_dim;
    info.context_length = (uint32_t)rt->n_ctx;
    router_worker_t ws[16];
    size_t n = router_registry_snapshot(rt->params.reg, ws, FY_ARRAY_SIZE(ws));
    for (size_t i = 0; i < FY_MIN(n, FY_ARRAY_SIZE(ws)) && info.fingerprint == 0; i++)
        info.fingerprint = ws[i].model_fingerprint;
    Ferry__V1__ModelInfo *list[1] = {&info};
    Ferry__V1__ListModelsResponse resp = FERRY__V1__LIST_MODELS_RESPONSE__INIT;
    resp.models = list;
    resp.n_models = 1;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void on_health(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    rt_t *rt = arg;
    if (!rt->draining && !rt_serving(rt)) {
        Ferry__V1__HealthResponse resp = FERRY__V1__HEALTH_RESPONSE__INIT;
        resp.status = FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__NOT_SERVING;
        resp.version = (char *)FY_VERSION_STRING;
        resp.role = "router";
        rpc_call_send(call, &resp.base);
        rpc_call_finish(call, RPC_CODE_OK, NULL);
        return;
    }
    daemon_health_answer(call, "router", rt->draining);
}

fy_status_t rt_serve(rt_t *rt, rpc_server_t *srv)
{
    static rpc_handler_cb handlers[8];
    static bool streaming[8];
    const ProtobufCServiceDescriptor *d = &ferry__v1__ferry__descriptor;
    if (d->n_methods > FY_ARRAY_SIZE(handlers))
        return FY_ERR_INTERNAL;
    for (unsigned i = 0; i < d->n_methods; i++) {
        const char *name = d->methods[i].name;
        streaming[i] = strcmp(name, "Generate") == 0;
        handlers[i] = strcmp(name, "Generate") == 0     ? on_generate
                      : strcmp(name, "Complete") == 0   ? on_complete
                      : strcmp(name, "Tokenize") == 0   ? on_tokenize
                      : strcmp(name, "ListModels") == 0 ? on_list_models
                      : strcmp(name, "Health") == 0     ? on_health
                                                        : NULL;
    }
    return rpc_server_add_service(srv, d, handlers, streaming, rt);
}

void rt_gc(rt_t *rt)
{
    router_worker_t ws[256];
    size_t nw = FY_MIN(router_registry_snapshot(rt->params.reg, ws, FY_ARRAY_SIZE(ws)),
                       FY_ARRAY_SIZE(ws));
    for (size_t i = 0; i < rt->n_chans;) {
        const char *addr = rt->chans[i].addr;
        bool used = false;
        for (size_t j = 0; j < nw && !used; j++)
            used = strcmp(ws[j].rpc_address, addr) == 0;
        for (rt_req_t *r = rt->live; r != NULL && !used; r = r->next)
            used = strcmp(r->pw.rpc_address, addr) == 0 || strcmp(r->dw.rpc_address, addr) == 0;
        if (used) {
            i++;
            continue;
        }
        // No registered worker and no request uses it: only fire-and-forget Cancel calls
        // can still be in flight, and they may go.
        FY_LOG_DEBUG(MODULE, "closing the channel to %s (worker gone)", addr);
        rpc_channel_destroy(rt->chans[i].ch);
        rt->chans[i] = rt->chans[--rt->n_chans];
    }
}

void rt_abort_all(rt_t *rt, const char *reason)
{
    for (rt_req_t *r = rt->live, *next; r; r = next) {
        next = r->next;
        if (r->state == ST_DONE)
            continue;
        rt_state_t st = r->state;
        r->state = ST_DONE;
        if (r->wcall != NULL)
            rpc_ccall_cancel(r->wcall);
        if (st >= ST_RESERVE && r->dw.rpc_address[0])
            worker_cancel(rt, r->dw.rpc_address, r->wid);
        req_fail(r, RPC_CODE_UNAVAILABLE, reason, FAIL_DECODE);
    }
}

void rt_destroy(rt_t *rt)
{
    if (rt == NULL)
        return;
    rt_abort_all(rt, "router stopping");
    for (size_t i = 0; i < rt->n_chans; i++)
        rpc_channel_destroy(rt->chans[i].ch);
    while (rt->live != NULL)
        req_free(rt->live);
    free(rt);
}
