/*
 * worker.c: the prefill worker (see prefill.h).
 *
 * A request (a job) lives on the loop thread from the Prefill call until its call has finished
 * and every frame buffer came back from kvlink. In between:
 *   loop:    validate, open the kvlink send (the handshake overlaps the queue wait), enqueue
 *   compute: mdl_prefill_batch over the queued jobs that fit max_batch_tokens (a longer
 *            prompt runs alone); per layer and job: FP16 conversion, kvc_encoder, CRC, post
 *            the frame. With a CUDA model the layer stays on the GPU: the model converts it
 *            to FP16 there and kvc_encoder_cuda scores and encodes it on the model's copy
 *            stream while the next layer computes; only the frame comes back to the host.
 *   loop:    kvlink_send_frame_crc for each posted frame (transfer runs while compute goes on)
 *   compute: sample the first token, post "computed"
 *   loop:    kvlink_send_finish; on the send's end: answer the call.
 * Aborts (cancel, deadline, a failed send) set job->abort, which the compute thread checks
 * between layers, and cancel the send. Inside a batch an aborted or failed job only stops
 * encoding and sending (its callbacks skip it, so the other jobs of the batch go on); the
 * batch stops early only once every job in it has stopped.
 *
 * Hidden transfer: the loop thread keeps the intervals during which the job had frames (or the
 * final END/STATUS exchange) in kvlink's hands. Their total is transfer_ms; the part that lies
 * inside [compute start, compute end] was hidden behind compute.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ferry.pb-c.h"
#include "adaptive.h"
#include "kvcodec_cuda.h"
#include "prefill.h"

#define MODULE "prefill"

typedef struct pf_job pf_job_t;

typedef struct {
    pf_job_t *job;
    uint32_t layer;
    uint8_t *data; // host memory, or device memory when dev (kvc_cuda_frame_alloc)
    size_t len;
    uint32_t crc;
    bool dev;
    bool sealed; // data is the sealed frame (the tag checks it: no CRC on the link)
} pf_frame_t;

enum { MAX_PAIRS = 16 }; // decode workers of this node paired at once

/* The logits of every position a prompt_logprobs request holds at once: n_tokens x n_vocab
 * floats, at most this (SmolLM2: 2730 tokens; Llama-3: 1048). */
#define PF_MAX_PROMPT_LOGITS ((size_t)512 << 20)

/* This worker's end of a pair with one decode worker of its node (loop thread). */
typedef struct {
    char addr[160]; // the decode worker's kv address
    kvlink_nccl_t *pair;
    uint64_t generation;
    bool failed;
} pf_pair_t;

typedef enum { OP_FRAME = 1, OP_COMPUTED = 2 } pf_op_kind_t;

typedef struct pf_op {
    struct pf_op *next;
    pf_op_kind_t kind;
    pf_job_t *job;
    pf_frame_t *frame;
} pf_op_t;

struct pf_job {
    pf_job_t *qnext;       // compute queue (under pf->mu)
    pf_job_t *prev, *next; // live list (loop thread)
    prefill_t *pf;
    rpc_call_t *call; // NULL once finished
    char request_id[64];
    uint64_t reservation_id;
    char kv_addr[160];
    int32_t *tokens;
    int n_tokens;
    mdl_sampler_params_t sp;
    mdl_schema_t *schema; // sp.schema, compiled from sampling.json_schema (owned)
    bool sealed;          // PrefillRequest.kv_key given: frames over the UCX link are sealed
    uint8_t kv_key[KVLINK_SEAL_KEY_BYTES];
    kvc_policy_t policy;
    double budget; // < 0: the policy's
    uint64_t deadline_ns;
    atomic_int abort; // 0, or the fy_status_t the job is aborted with
    // Written by the compute thread before OP_COMPUTED.
    fy_status_t compute_st;
    int32_t first_token;
    bool logprobs; // sampling.logprobs: the first token's log-probability goes back too
    int32_t forced; // sampling.forced_token_ids[0], the first token, or -1 to sample
    int n_top;     // sampling.top_logprobs
    float first_lp;
    int32_t top_ids[MDL_MAX_TOP_LOGPROBS];
    float top_lps[MDL_MAX_TOP_LOGPROBS];
    // sampling.prompt_logprobs: tokens 1 .. n-1 given those before each, n_top alternatives
    // each ([n_tokens - 1], [(n_tokens - 1) * n_top]), written by the compute thread.
    bool prompt_lp;
    float *p_lp, *p_top_lps;
    int32_t *p_top_ids;
    uint64_t t_enqueued, t_compute_start, t_compute_end;
    uint64_t raw_bytes, wire_bytes;
    int batch_jobs;    // jobs in the batch it was computed in
    int batch_tokens;  // their prompt tokens
    // Loop thread. The transfer goes over the UCX link (send) or a pair (nsend).
    kvlink_nccl_send_t *nsend;
    bool dev_frames; // frames must be in device memory (an NCCL pair); set before queueing
    kvlink_send_t *send;
    bool send_ended;
    fy_status_t send_st;
    bool computed;
    bool finish_sent;
    uint32_t frames_out; // frames handed to kvlink whose done callback has not come
    uint32_t busy;       // frames (and the END exchange) in kvlink's hands
    uint64_t *iv;        // [2 * n_iv_cap] busy intervals start, end
    uint32_t n_iv, n_iv_cap;
    int pins; // > 0 while a function below still uses the job after kvlink callbacks
};

struct prefill {
    uv_loop_t *loop;
    prefill_params_t params;
    kvc_policy_t policy;
    const mdl_config_t *cfg;
    mdl_ctx_t *ctx;
    mdl_json_vocab_t *json; // the tokens' bytes, for JSON mode (sampling.json_object)
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cond;
    pf_job_t *q_head, *q_tail; // under mu
    bool stop;                 // under mu
    pf_op_t *ops_head, *ops_tail; // under mu
    uv_async_t async;
    pf_job_t *live;
    size_t n_live;
    atomic_uint_fast64_t queued_tokens;
    uint32_t corrupt_left; // test hook (compute thread)
    bool draining;
    pf_adaptive_t *adaptive; // loop thread; created at the first request that may use it
    int max_batch_tokens;
    float *logits; // compute thread: [logits_cap][n_vocab]
    int logits_cap;
    uint16_t *k16, *v16;
    size_t kv16_cap; // elements
    pf_pair_t pairs[MAX_PAIRS]; // loop thread
    uv_timer_t pair_timer;      // moves the pairs along
    uv_idle_t pair_idle;        // ... at every loop turn while one has a transfer open
    int open_handles;           // libuv handles not yet closed at destroy
    struct {
        fy_metric_t *requests_ok, *requests_failed, *requests_cancelled, *tokens, *prefill_s,
            *queue_s, *raw_bytes, *wire_bytes, *transfer_s, *hidden, *queued_tokens, *in_flight,
            *batch_jobs, *batch_tokens;
    } m;
};

static void job_maybe_finish(pf_job_t *job);

/* ---- helpers ------------------------------------------------------------------------------ */

void prefill_params_default(prefill_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->budget = -1;
}

fy_status_t prefill_sampler_params(const Ferry__V1__SamplingParams *s, mdl_sampler_params_t *out)
{
    mdl_sampler_params_default(out);
    out->temperature = 0;
    out->top_k = 0;
    out->top_p = 1;
    out->repetition_penalty = 1;
    out->n_stop = 0;
    if (s == NULL)
        return FY_OK;
    if (!(s->temperature >= 0) || !isfinite(s->temperature) || !(s->top_p >= 0) ||
        s->top_p > 1 || !(s->repetition_penalty >= 0) || !isfinite(s->repetition_penalty) ||
        s->top_k > (1u << 24))
        return FY_ERR_INVALID_ARG;
    out->temperature = s->temperature;
    out->top_k = (int)s->top_k;
    out->top_p = s->top_p > 0 ? s->top_p : 1;
    out->repetition_penalty = s->repetition_penalty > 0 ? s->repetition_penalty : 1;
    out->seed = s->seed;
    out->presence_penalty = s->presence_penalty;
    out->frequency_penalty = s->frequency_penalty;
    if (!(fabsf(s->presence_penalty) <= MDL_MAX_PENALTY) ||
        !(fabsf(s->frequency_penalty) <= MDL_MAX_PENALTY) || s->n_logit_bias > MDL_MAX_LOGIT_BIAS)
        return FY_ERR_INVALID_ARG;
    out->n_logit_bias = (int)s->n_logit_bias;
    for (size_t i = 0; i < s->n_logit_bias; i++) {
        if (s->logit_bias[i] == NULL || s->logit_bias[i]->token_id > INT32_MAX ||
            !(fabsf(s->logit_bias[i]->bias) <= MDL_MAX_BIAS))
            return FY_ERR_INVALID_ARG;
        out->bias_token[i] = (int32_t)s->logit_bias[i]->token_id;
        out->bias[i] = s->logit_bias[i]->bias;
    }
    return FY_OK;
}

static int status_code(fy_status_t st)
{
    switch (st) {
    case FY_ERR_CANCELLED:
        return RPC_CODE_CANCELLED;
    case FY_ERR_TIMEOUT:
        return RPC_CODE_DEADLINE_EXCEEDED;
    case FY_ERR_MISMATCH:
        return RPC_CODE_FAILED_PRECONDITION;
    case FY_ERR_CLOSED:
    case FY_ERR_TRANSPORT:
    case FY_ERR_UNAVAILABLE:
        return RPC_CODE_UNAVAILABLE;
    default:
        return rpc_code_from_status(st);
    }
}

/* ---- loop side: ops from the compute thread --------------------------------------------- */

static void post_op(prefill_t *pf, pf_op_kind_t kind, pf_job_t *job, pf_frame_t *frame)
{
    pf_op_t *op = calloc(1, sizeof(*op));
    FY_ASSERT(op != NULL); // a lost op would strand the job: out of memory here is fatal
    op->kind = kind;
    op->job = job;
    op->frame = frame;
    uv_mutex_lock(&pf->mu);
    if (pf->ops_tail)
        pf->ops_tail->next = op;
    else
        pf->ops_head = op;
    pf->ops_tail = op;
    uv_mutex_unlock(&pf->mu);
    uv_async_send(&pf->async);
}

static void busy_begin(pf_job_t *job)
{
    if (job->busy++ == 0 && job->n_iv < job->n_iv_cap) {
        job->iv[2 * job->n_iv] = fy_clock_ns();
        job->iv[2 * job->n_iv + 1] = 0;
        job->n_iv++;
    }
}

static void busy_end(pf_job_t *job)
{
    if (job->busy == 0)
        return;
    if (--job->busy == 0 && job->n_iv > 0 && job->iv[2 * (job->n_iv - 1) + 1] == 0)
        job->iv[2 * (job->n_iv - 1) + 1] = fy_clock_ns();
}

static void job_free(pf_job_t *job)
{
    prefill_t *pf = job->pf;
    if (job->prev)
        job->prev->next = job->next;
    else
        pf->live = job->next;
    if (job->next)
        job->next->prev = job->prev;
    pf->n_live--;
    fy_metric_set(pf->m.in_flight, (double)pf->n_live);
    free(job->tokens);
    free(job->iv);
    mdl_schema_destroy(job->schema);
    free(job->p_lp);
    free(job->p_top_lps);
    free(job->p_top_ids);
    free(job);
}

/* The response's prompt_logprobs, from the compute thread's arrays (messages malloc'd). */
typedef struct {
    Ferry__V1__TokenLogprob *ent, **ent_p;
    Ferry__V1__TopLogprob *top, **top_p;
    size_t n;
} prompt_lp_t;

static void prompt_lp_free(prompt_lp_t *p)
{
    free(p->ent);
    free(p->ent_p);
    free(p->top);
    free(p->top_p);
}

static fy_status_t prompt_lp_build(const pf_job_t *job, prompt_lp_t *p)
{
    const size_t n = job->n_tokens > 1 ? (size_t)job->n_tokens - 1 : 0, k = (size_t)job->n_top;
    if (n == 0)
        return FY_OK;
    p->ent = calloc(n, sizeof(*p->ent));
    p->ent_p = calloc(n, sizeof(*p->ent_p));
    p->top = calloc(FY_MAX(n * k, (size_t)1), sizeof(*p->top));
    p->top_p = calloc(FY_MAX(n * k, (size_t)1), sizeof(*p->top_p));
    if (p->ent == NULL || p->ent_p == NULL || p->top == NULL || p->top_p == NULL)
        return FY_ERR_NO_MEMORY;
    for (size_t i = 0; i < n; i++) {
        Ferry__V1__TokenLogprob *e = &p->ent[i];
        ferry__v1__token_logprob__init(e);
        e->token_id = (uint32_t)job->tokens[i + 1];
        e->logprob = job->p_lp[i];
        for (size_t j = 0; j < k; j++) {
            Ferry__V1__TopLogprob *t = &p->top[i * k + j];
            ferry__v1__top_logprob__init(t);
            t->token_id = (uint32_t)job->p_top_ids[i * k + j];
            t->logprob = job->p_top_lps[i * k + j];
            p->top_p[i * k + j] = t;
        }
        e->top = k ? &p->top_p[i * k] : NULL;
        e->n_top = k;
        p->ent_p[i] = e;
    }
    p->n = n;
    return FY_OK;
}

/* Whether the job has a transfer (over UCX or a pair). */
static bool has_send(const pf_job_t *job)
{
    return job->send != NULL || job->nsend != NULL;
}

static void job_maybe_free(pf_job_t *job)
{
    if (job->pins == 0 && job->call == NULL && job->computed && job->frames_out == 0 &&
        (!has_send(job) || job->send_ended))
        job_free(job);
}

static void frame_free(pf_frame_t *fr)
{
    if (fr->dev)
        kvc_cuda_frame_free(fr->data); // stream-ordered: never waits for the device
    else
        free(fr->data);
    free(fr);
}

static void frame_done(pf_frame_t *fr)
{
    pf_job_t *job = fr->job;
    frame_free(fr);
    job->frames_out--;
    busy_end(job);
    job_maybe_free(job);
}

static void on_frame_done(kvlink_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    (void)st;
    frame_done(arg);
}

static void on_pair_frame_done(kvlink_nccl_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    (void)st;
    frame_done(arg);
}

static void send_cancel(pf_job_t *job)
{
    if (job->nsend != NULL)
        kvlink_nccl_send_cancel(job->nsend);
    else
        kvlink_send_cancel(job->send);
}

/* Stops the job: the compute thread sees it between layers; the send is cancelled. */
static void job_abort(pf_job_t *job, fy_status_t why)
{
    int expected = 0;
    atomic_compare_exchange_strong(&job->abort, &expected, (int)why);
    job->pins++;
    if (has_send(job) && !job->send_ended)
        send_cancel(job); // on_send_end runs inside
    job->pins--;
    job_maybe_free(job);
}

static void send_ended(pf_job_t *job, fy_status_t st)
{
    job->send_ended = true;
    job->send_st = st;
    if (job->finish_sent)
        busy_end(job);
    if (st != FY_OK && !job->computed) {
        // The decode side is gone or refused: stop computing for nothing.
        int expected = 0;
        atomic_compare_exchange_strong(&job->abort, &expected, (int)st);
    }
    if (st != FY_OK)
        FY_LOG_DEBUG(MODULE, "%s: transfer to %s ended: %s", job->request_id, job->kv_addr,
                     fy_status_str(st));
    job_maybe_finish(job);
    job_maybe_free(job);
}

static void on_send_end(kvlink_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    send_ended(arg, st);
}

static void on_pair_send_end(kvlink_nccl_send_t *req, fy_status_t st, void *arg)
{
    (void)req;
    send_ended(arg, st);
}

static void handle_frame(prefill_t *pf, pf_frame_t *fr)
{
    pf_job_t *job = fr->job;
    if (!has_send(job) || job->send_ended || atomic_load(&job->abort) != 0) {
        frame_free(fr);
        return;
    }
    job->frames_out++;
    busy_begin(job);
    uint32_t layer = fr->layer;
    job->pins++;
    // Over a pair the frame's own CRC32C (checked by the decode side's kvc_frame_parse) is
    // the only one: the link carries none.
    fy_status_t st =
        job->nsend != NULL
            ? kvlink_nccl_send_frame(job->nsend, layer, fr->data, fr->len, on_pair_frame_done, fr)
        : fr->sealed
            ? kvlink_send_frame_self_checked(job->send, layer, fr->data, fr->len, on_frame_done, fr)
            : kvlink_send_frame_crc(job->send, layer, fr->data, fr->len, fr->crc, on_frame_done,
                                    fr);
    if (st != FY_OK) {
        job->frames_out--;
        busy_end(job);
        frame_free(fr);
        FY_LOG_WARN(MODULE, "%s: frame of layer %u not sent: %s", job->request_id, layer,
                    fy_status_str(st));
        job_abort(job, st);
    }
    job->pins--;
    job_maybe_free(job);
}

static void handle_computed(prefill_t *pf, pf_job_t *job)
{
    job->computed = true;
    job->pins++;
    atomic_fetch_sub(&pf->queued_tokens, (uint64_t)job->n_tokens);
    fy_metric_set(pf->m.queued_tokens, (double)atomic_load(&pf->queued_tokens));
    if (job->compute_st == FY_OK && atomic_load(&job->abort) == 0 && has_send(job) &&
        !job->send_ended) {
        fy_status_t st = job->nsend != NULL ? kvlink_nccl_send_finish(job->nsend)
                                            : kvlink_send_finish(job->send);
        if (st == FY_OK) {
            job->finish_sent = true;
            busy_begin(job); // END and the receiver's STATUS
        } else {
            job_abort(job, st);
        }
    } else if (has_send(job) && !job->send_ended) {
        send_cancel(job);
    }
    job_maybe_finish(job);
    job->pins--;
    job_maybe_free(job);
}

static void on_async(uv_async_t *a)
{
    prefill_t *pf = a->data;
    uv_mutex_lock(&pf->mu);
    pf_op_t *op = pf->ops_head;
    pf->ops_head = pf->ops_tail = NULL;
    uv_mutex_unlock(&pf->mu);
    while (op) {
        pf_op_t *next = op->next;
        if (op->kind == OP_FRAME)
            handle_frame(pf, op->frame);
        else
            handle_computed(pf, op->job);
        free(op);
        op = next;
    }
}

/* Transfer time (busy intervals) and the part inside the compute interval. */
static void transfer_times(const pf_job_t *job, double *transfer_ms, double *hidden_frac)
{
    uint64_t total = 0, hidden = 0, end_default = fy_clock_ns();
    for (uint32_t i = 0; i < job->n_iv; i++) {
        uint64_t s = job->iv[2 * i], e = job->iv[2 * i + 1] ? job->iv[2 * i + 1] : end_default;
        if (e <= s)
            continue;
        total += e - s;
        uint64_t lo = FY_MAX(s, job->t_compute_start), hi = FY_MIN(e, job->t_compute_end);
        if (hi > lo)
            hidden += hi - lo;
    }
    *transfer_ms = total / 1e6;
    *hidden_frac = total ? (double)hidden / (double)total : 0;
}

/* Answers the call once computation and transfer have both stopped. */
static void job_maybe_finish(pf_job_t *job)
{
    prefill_t *pf = job->pf;
    if (job->call == NULL || !job->computed || (has_send(job) && !job->send_ended))
        return;
    fy_status_t abort_st = (fy_status_t)atomic_load(&job->abort);
    fy_status_t st = abort_st != FY_OK         ? abort_st
                     : job->compute_st != FY_OK ? job->compute_st
                     : !has_send(job)           ? FY_ERR_INTERNAL
                                                : job->send_st;
    rpc_call_t *call = job->call;
    job->call = NULL;
    double prefill_ms = (job->t_compute_end - job->t_compute_start) / 1e6;
    if (st != FY_OK) {
        char msg[256];
        snprintf(msg, sizeof(msg), "prefill of %s: %s%s%s", job->request_id, fy_status_str(st),
                 job->send_st != FY_OK && st == job->send_st ? " (KV transfer to " : "",
                 job->send_st != FY_OK && st == job->send_st ? job->kv_addr : "");
        if (job->send_st != FY_OK && st == job->send_st)
            strncat(msg, ")", sizeof(msg) - strlen(msg) - 1);
        FY_LOG_INFO(MODULE, "%s failed: %s", job->request_id, fy_status_str(st));
        if (st == FY_ERR_CANCELLED || st == FY_ERR_TIMEOUT)
            fy_metric_inc(pf->m.requests_cancelled);
        else
            fy_metric_inc(pf->m.requests_failed);
        rpc_call_finish(call, status_code(st), msg);
        return;
    }
    double transfer_ms, hidden;
    transfer_times(job, &transfer_ms, &hidden);
    Ferry__V1__PrefillResponse resp = FERRY__V1__PREFILL_RESPONSE__INIT;
    resp.first_token_id = (uint32_t)job->first_token;
    resp.kv_raw_bytes = job->raw_bytes;
    resp.kv_wire_bytes = job->wire_bytes;
    resp.prefill_ms = prefill_ms;
    resp.transfer_ms = transfer_ms;
    resp.hidden_transfer_fraction = hidden;
    resp.queue_ms = (job->t_compute_start - job->t_enqueued) / 1e6;
    Ferry__V1__TokenLogprob lp = FERRY__V1__TOKEN_LOGPROB__INIT;
    Ferry__V1__TopLogprob top[MDL_MAX_TOP_LOGPROBS], *top_p[MDL_MAX_TOP_LOGPROBS];
    if (job->logprobs) {
        lp.token_id = (uint32_t)job->first_token;
        lp.logprob = job->first_lp;
        for (int i = 0; i < job->n_top; i++) {
            ferry__v1__top_logprob__init(&top[i]);
            top[i].token_id = (uint32_t)job->top_ids[i];
            top[i].logprob = job->top_lps[i];
            top_p[i] = &top[i];
        }
        lp.top = top_p;
        lp.n_top = (size_t)job->n_top;
        resp.first_logprob = &lp;
    }
    prompt_lp_t plp = {0};
    if (job->prompt_lp && prompt_lp_build(job, &plp) != FY_OK) {
        prompt_lp_free(&plp);
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    resp.prompt_logprobs = plp.ent_p;
    resp.n_prompt_logprobs = plp.n;
    FY_LOG_INFO(MODULE,
                "%s: %d tokens in %.1f ms (batch of %d, %d tokens; queued %.1f ms), KV %llu -> "
                "%llu bytes (%s), transfer %.1f ms, %.0f%% hidden, first token %d",
                job->request_id, job->n_tokens, prefill_ms, job->batch_jobs, job->batch_tokens,
                resp.queue_ms,
                (unsigned long long)job->raw_bytes, (unsigned long long)job->wire_bytes,
                job->policy.name, transfer_ms, hidden * 100, job->first_token);
    fy_metric_inc(pf->m.requests_ok);
    fy_metric_add(pf->m.tokens, job->n_tokens);
    fy_metric_observe(pf->m.prefill_s, prefill_ms / 1e3);
    fy_metric_observe(pf->m.queue_s, resp.queue_ms / 1e3);
    fy_metric_add(pf->m.raw_bytes, (double)job->raw_bytes);
    fy_metric_add(pf->m.wire_bytes, (double)job->wire_bytes);
    fy_metric_observe(pf->m.transfer_s, transfer_ms / 1e3);
    fy_metric_set(pf->m.hidden, hidden);
    if (pf->adaptive != NULL && job->n_iv > 0) {
        uint64_t first = job->iv[0], end = job->iv[2 * job->n_iv - 1] ? job->iv[2 * job->n_iv - 1]
                                                                       : fy_clock_ns();
        double tail = end > job->t_compute_end ? (end - job->t_compute_end) / 1e6 : 0;
        // The compute time is the whole batch's: the compute rate is over its tokens.
        pf_adaptive_observe(pf->adaptive, job->kv_addr, job->wire_bytes,
                            end > first ? (end - first) / 1e6 : 0, tail, job->batch_tokens,
                            prefill_ms);
    }
    rpc_call_send(call, &resp.base);
    prompt_lp_free(&plp);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

/* ---- compute thread ----------------------------------------------------------------------- */

typedef struct {
    int n_live; // jobs of the batch still computing
} pf_batch_t;

typedef struct {
    prefill_t *pf;
    pf_job_t *job;
    kvc_encoder_t *enc;       // CPU codec
    kvc_encoder_cuda_t *genc; // or the GPU's (gpu_codec)
    int gpu_queued;           // layers queued on genc, not yet handed out
    uint32_t gpu_next;        // the next of them (layer index)
    uint8_t *qdev[2];         // job->dev_frames: their device frames, oldest at qhead
    int qhead;
    pf_batch_t *batch;
    fy_status_t st; // the job's own failure: its later layers are skipped
} pf_run_t;

static fy_status_t job_check(const pf_job_t *job)
{
    int a = atomic_load(&((pf_job_t *)job)->abort);
    if (a != 0)
        return (fy_status_t)a;
    if (job->deadline_ns != 0 && fy_clock_ns() >= job->deadline_ns)
        return FY_ERR_TIMEOUT;
    return FY_OK;
}

/* Grows the FP16 staging buffers to n elements. */
static fy_status_t ensure_kv16(prefill_t *pf, size_t need)
{
    if (need <= pf->kv16_cap)
        return FY_OK;
    uint16_t *k = realloc(pf->k16, need * sizeof(uint16_t));
    if (k == NULL)
        return FY_ERR_NO_MEMORY;
    pf->k16 = k;
    uint16_t *v = realloc(pf->v16, need * sizeof(uint16_t));
    if (v == NULL)
        return FY_ERR_NO_MEMORY;
    pf->v16 = v;
    pf->kv16_cap = need;
    return FY_OK;
}

/* Hands layer's frame in device memory (dev, len bytes; taken) to the sender. */
static fy_status_t post_frame_dev(pf_run_t *r, uint32_t layer, uint8_t *dev, size_t len,
                                  const kvc_layer_info_t *info)
{
    pf_job_t *job = r->job;
    pf_frame_t *fr = calloc(1, sizeof(*fr));
    if (fr == NULL) {
        kvc_cuda_frame_free(dev);
        return FY_ERR_NO_MEMORY;
    }
    *fr = (pf_frame_t){.job = job, .layer = layer, .data = dev, .len = len, .dev = true};
    job->raw_bytes += info->fp16_bytes;
    job->wire_bytes += len;
    post_op(r->pf, OP_FRAME, job, fr);
    return FY_OK;
}

/* Hands layer's frame (buf, len bytes; taken) to the sender. */
static fy_status_t post_frame(pf_run_t *r, uint32_t layer, uint8_t *buf, size_t len,
                              const kvc_layer_info_t *info)
{
    prefill_t *pf = r->pf;
    pf_job_t *job = r->job;
    if (job->dev_frames) {
        // Encoded on the host (no room for the GPU codec) for an NCCL pair: the link sends
        // from device memory.
        uint8_t *dev = NULL;
        fy_status_t st = kvc_cuda_frame_upload(buf, len, &dev);
        free(buf);
        return st == FY_OK ? post_frame_dev(r, layer, dev, len, info) : st;
    }
    pf_frame_t *fr = calloc(1, sizeof(*fr));
    if (fr == NULL) {
        free(buf);
        return FY_ERR_NO_MEMORY;
    }
    if (pf->corrupt_left > 0 && layer == (uint32_t)pf->cfg->n_layers / 2 && len > 64) {
        // Test hook: one payload byte flipped after the frame's own CRC was written, so only
        // the decode side's validation can notice.
        pf->corrupt_left--;
        buf[len - 1] ^= 0x5a;
        FY_LOG_WARN(MODULE, "%s: test hook: frame of layer %u damaged", job->request_id, layer);
    }
    fr->job = job;
    fr->layer = layer;
    fr->sealed = job->sealed && job->nsend == NULL; // a pair stays within one node
    if (fr->sealed) {
        uint8_t *sealed = malloc(len + KVLINK_SEAL_OVERHEAD);
        fy_status_t st =
            sealed != NULL ? kvlink_seal(job->kv_key, job->reservation_id, layer, buf, len, sealed)
                           : FY_ERR_NO_MEMORY;
        free(buf);
        if (st != FY_OK) {
            free(sealed);
            free(fr);
            return st;
        }
        fr->data = sealed;
        fr->len = len + KVLINK_SEAL_OVERHEAD;
    } else {
        uint8_t *shrunk = realloc(buf, len);
        fr->data = shrunk ? shrunk : buf;
        fr->len = len;
        // The UCX link wants the frame's CRC32C; a pair carries none (see handle_frame).
        fr->crc = job->nsend == NULL ? fy_crc32c(0, fr->data, len) : 0;
    }
    job->raw_bytes += info->fp16_bytes;
    job->wire_bytes += fr->len;
    post_op(pf, OP_FRAME, job, fr);
    return FY_OK;
}

/* Waits for the oldest layer queued on the GPU encoder and hands its frame out. */
static fy_status_t finish_gpu_layer(pf_run_t *r)
{
    if (r->job->dev_frames) {
        size_t len = 0;
        kvc_layer_info_t info;
        fy_status_t st = kvc_encoder_finish_layer_cuda(r->genc, &len, &info);
        if (st != FY_OK)
            return st;
        uint8_t *dev = r->qdev[r->qhead];
        r->qdev[r->qhead] = NULL;
        r->qhead ^= 1;
        r->gpu_queued--;
        return post_frame_dev(r, r->gpu_next++, dev, len, &info);
    }
    size_t cap = kvc_encoder_cuda_max_frame_bytes(r->genc), len = 0;
    uint8_t *buf = malloc(cap);
    if (buf == NULL)
        return FY_ERR_NO_MEMORY;
    kvc_layer_info_t info;
    fy_status_t st = kvc_encoder_finish_layer_cuda_host(r->genc, buf, cap, &len, &info);
    if (st != FY_OK) {
        free(buf);
        return st;
    }
    r->gpu_queued--;
    return post_frame(r, r->gpu_next++, buf, len, &info);
}

static fy_status_t encode_layer(pf_run_t *r, const mdl_layer_kv_t *kv)
{
    prefill_t *pf = r->pf;
    pf_job_t *job = r->job;
    fy_status_t st = job_check(job);
    if (st != FY_OK)
        return st;
    size_t n = (size_t)kv->n_kv_heads * (size_t)kv->n_tokens * (size_t)kv->head_dim;
    kvc_layer_input_t in = {.layer = (uint32_t)kv->layer,
                            .head_stride = (size_t)kv->n_tokens * kv->head_dim,
                            .token_stride = (size_t)kv->head_dim,
                            .n_window = (uint32_t)kv->n_window};
    if (r->genc != NULL) {
        if (kv->k16_dev == NULL)
            return FY_ERR_INTERNAL;
        in.k = kv->k16_dev;
        in.v = kv->v16_dev;
        in.q_window = kv->n_window > 0 ? kv->q_window_dev : NULL;
        // The layer is queued behind the previous one, which is handed out while this one
        // runs on the GPU (the model's stream waits for the queued work before it reuses the
        // layer's buffers); the last layer goes out at once.
        if (job->dev_frames) {
            // The frame stays on the GPU for the NCCL pair: one device buffer per layer, freed
            // once the link is done with it.
            size_t cap = kvc_encoder_cuda_max_frame_bytes(r->genc);
            uint8_t *dev = NULL;
            if ((st = kvc_cuda_frame_alloc(cap, &dev)) != FY_OK)
                return st;
            st = kvc_encoder_enqueue_layer_cuda(r->genc, &in, NULL, dev, cap, kv->stream);
            if (st != FY_OK) {
                kvc_cuda_frame_free(dev);
                return st;
            }
            r->qdev[(r->qhead + r->gpu_queued) & 1] = dev;
        } else if ((st = kvc_encoder_enqueue_layer_cuda_host(r->genc, &in, NULL, kv->stream)) !=
                   FY_OK) {
            return st;
        }
        r->gpu_queued++;
        if (r->gpu_queued > 1 && (st = finish_gpu_layer(r)) != FY_OK)
            return st;
        if (kv->layer == pf->cfg->n_layers - 1 && r->gpu_queued > 0)
            st = finish_gpu_layer(r);
        return st;
    }
    if (kv->k == NULL)
        return FY_ERR_INTERNAL;
    if ((st = ensure_kv16(pf, n)) != FY_OK)
        return st;
    fy_fp32_to_fp16_buf(pf->k16, kv->k, n);
    fy_fp32_to_fp16_buf(pf->v16, kv->v, n);
    in.k = pf->k16;
    in.v = pf->v16;
    in.q_window = kv->n_window > 0 ? kv->q_window : NULL;
    size_t cap = kvc_encoder_max_frame_bytes(r->enc);
    size_t len = 0;
    uint8_t *buf = malloc(cap);
    if (buf == NULL)
        return FY_ERR_NO_MEMORY;
    kvc_layer_info_t info;
    st = kvc_encoder_encode_layer(r->enc, &in, NULL, buf, cap, &len, &info);
    if (st != FY_OK) {
        free(buf);
        return st;
    }
    return post_frame(r, in.layer, buf, len, &info);
}

/* The batch's layer callback for one job: a job that failed or was aborted stops here while
 * the rest of the batch goes on; only when no job of the batch is left does the error stop
 * the computation. */
static fy_status_t on_layer(void *arg, const mdl_layer_kv_t *kv)
{
    pf_run_t *r = arg;
    if (r->st != FY_OK)
        return FY_OK;
    fy_status_t st = encode_layer(r, kv);
    if (st == FY_OK)
        return FY_OK;
    r->st = st;
    return --r->batch->n_live == 0 ? st : FY_OK;
}

/* Whether layers are encoded on the GPU (a CUDA model, unless host_codec). */
static bool gpu_codec(const prefill_t *pf)
{
    return mdl_model_device(pf->params.model) == MDL_DEVICE_CUDA && !pf->params.host_codec;
}

/* The job's encoder (its policy and budget), on the GPU when gpu_codec. */
static fy_status_t job_encoder(prefill_t *pf, pf_job_t *job, pf_run_t *r)
{
    const mdl_config_t *c = pf->cfg;
    kvc_encoder_params_t ep;
    kvc_encoder_params_default(&ep);
    ep.policy = &job->policy;
    const double b = job->budget >= 0 ? job->budget : job->policy.budget;
    ep.budget = b > 0 ? fy_kv_budget_floor(b, (size_t)job->n_tokens) : job->budget;
    ep.n_layers = (uint32_t)c->n_layers;
    ep.n_heads = (uint32_t)c->n_heads;
    ep.n_kv_heads = (uint32_t)c->n_kv_heads;
    ep.head_dim = (uint32_t)c->head_dim;
    ep.n_tokens = (uint32_t)job->n_tokens;
    ep.model_fingerprint = pf->params.fingerprint;
    ep.seq_id = job->reservation_id;
    if (gpu_codec(pf)) {
        fy_status_t st = kvc_encoder_cuda_create(&ep, &r->genc);
        // Frames for an NCCL pair get device buffers of their own (kvc_cuda_frame_alloc), not
        // the encoder's, which only the copy to the host uses.
        if (st == FY_OK && !job->dev_frames &&
            (st = kvc_encoder_cuda_reserve_host(r->genc)) != FY_OK) {
            kvc_encoder_cuda_destroy(r->genc); // the frame buffers did not fit
            r->genc = NULL;
        }
        if (st != FY_ERR_RESOURCE_EXHAUSTED)
            return st;
        // The GPU is full (other requests' encoders, the model's scratch): this request
        // encodes on the host instead of failing.
        FY_LOG_WARN(MODULE, "%s: no GPU memory for the codec, encoding on the host",
                    job->request_id);
    }
    return kvc_encoder_create(&ep, &r->enc);
}

/* The first token from the job's logits with its sampling parameters. */
static fy_status_t job_sample(prefill_t *pf, pf_job_t *job, float *logits)
{
    mdl_sampler_t *smp = NULL;
    fy_status_t st = mdl_sampler_create(&job->sp, pf->cfg->n_vocab, &smp);
    if (st != FY_OK)
        return st;
    for (int i = 0; i < job->n_tokens; i++)
        mdl_sampler_accept(smp, job->tokens[i]);
    float *raw = NULL; // the sampler changes the logits in place; log-probabilities are the raw's
    if (job->logprobs && (raw = malloc((size_t)pf->cfg->n_vocab * sizeof(float))) == NULL) {
        mdl_sampler_destroy(smp);
        return FY_ERR_NO_MEMORY;
    }
    if (raw != NULL)
        memcpy(raw, logits, (size_t)pf->cfg->n_vocab * sizeof(float));
    job->first_token = mdl_sampler_sample(smp, logits);
    if (job->forced >= 0)
        job->first_token = job->forced; // drawn all the same: a seeded stream stays in step
    mdl_sampler_destroy(smp);
    if (raw != NULL) {
        job->first_lp = mdl_logprobs(raw, pf->cfg->n_vocab, job->first_token, job->n_top,
                                     job->top_ids, job->top_lps);
        free(raw);
    }
    return job_check(job);
}

/* Each prompt token's log-probability given the ones before it, from all_logits [n][n_vocab]
 * (row i predicts token i + 1), with the job's n_top alternatives. */
static fy_status_t prompt_logprobs(prefill_t *pf, pf_job_t *job, const float *all)
{
    const size_t nv = (size_t)pf->cfg->n_vocab, n = (size_t)job->n_tokens - 1;
    const size_t k = (size_t)job->n_top;
    if (n == 0)
        return FY_OK;
    job->p_lp = malloc(n * sizeof(float));
    job->p_top_lps = malloc(FY_MAX(n * k, (size_t)1) * sizeof(float));
    job->p_top_ids = malloc(FY_MAX(n * k, (size_t)1) * sizeof(int32_t));
    if (job->p_lp == NULL || job->p_top_lps == NULL || job->p_top_ids == NULL)
        return FY_ERR_NO_MEMORY;
    for (size_t i = 0; i < n; i++)
        job->p_lp[i] = mdl_logprobs(all + i * nv, (int)nv, job->tokens[i + 1], (int)k,
                                    job->p_top_ids + i * k, job->p_top_lps + i * k);
    return FY_OK;
}

/* Runs jobs[n] as one batch; each job's compute_st says how it went. */
static void run_batch(prefill_t *pf, pf_job_t **jobs, int n)
{
    const mdl_config_t *c = pf->cfg;
    size_t nv = (size_t)c->n_vocab;
    pf_run_t *runs = calloc((size_t)n, sizeof(*runs));
    const int32_t **toks = calloc((size_t)n, sizeof(*toks));
    int *n_toks = calloc((size_t)n, sizeof(*n_toks));
    mdl_prefill_params_t *pp = calloc((size_t)n, sizeof(*pp));
    float **logits = calloc((size_t)n, sizeof(*logits));
    fy_status_t st = runs && toks && n_toks && pp && logits ? FY_OK : FY_ERR_NO_MEMORY;
    if (st == FY_OK && n > pf->logits_cap) {
        float *l = realloc(pf->logits, (size_t)n * nv * sizeof(float));
        if (l == NULL) {
            st = FY_ERR_NO_MEMORY;
        } else {
            pf->logits = l;
            pf->logits_cap = n;
        }
    }
    int total = 0;
    for (int i = 0; i < n; i++)
        total += jobs[i]->n_tokens;
    // The jobs still worth computing (aborted or expired ones are left out).
    pf_batch_t batch = {.n_live = 0};
    int m = 0;
    for (int i = 0; i < n; i++) {
        pf_job_t *job = jobs[i];
        job->batch_jobs = n;
        job->batch_tokens = total;
        job->compute_st = st != FY_OK ? st : job_check(job);
        if (job->compute_st != FY_OK)
            continue;
        pf_run_t *r = &runs[m];
        *r = (pf_run_t){.pf = pf, .job = job, .batch = &batch};
        if ((job->compute_st = job_encoder(pf, job, r)) != FY_OK) {
            FY_LOG_ERROR(MODULE, "%s: codec: %s", job->request_id,
                         fy_status_str(job->compute_st));
            continue;
        }
        toks[m] = job->tokens;
        n_toks[m] = job->n_tokens;
        mdl_prefill_params_default(&pp[m]);
        pp[m].on_layer = on_layer;
        pp[m].cb_arg = r;
        pp[m].window = (int)job->policy.window;
        pp[m].device_kv = r->genc != NULL;
        logits[m] = pf->logits + (size_t)m * nv;
        if (job->prompt_lp) { // every position's logits, in a buffer of the job's own
            pp[m].all_logits = true;
            if ((logits[m] = malloc((size_t)job->n_tokens * nv * sizeof(float))) == NULL) {
                job->compute_st = FY_ERR_NO_MEMORY;
                kvc_encoder_destroy(r->enc);
                kvc_encoder_cuda_destroy(r->genc);
                continue;
            }
        }
        m++;
    }
    if (m > 0) {
        batch.n_live = m;
        uint64_t t0 = fy_clock_ns();
        st = mdl_prefill_batch(pf->ctx, m, toks, n_toks, pp, logits);
        if (n > 1)
            FY_LOG_DEBUG(MODULE, "batch of %d prompts (%d tokens) in %.1f ms: %s", m, total,
                         (fy_clock_ns() - t0) / 1e6, fy_status_str(st));
        for (int i = 0; i < m; i++) {
            pf_run_t *r = &runs[i];
            kvc_encoder_destroy(r->enc);
            kvc_encoder_cuda_destroy(r->genc); // waits for its queued work
            for (int q = 0; q < 2; q++)        // frames of layers that never went out
                kvc_cuda_frame_free(r->qdev[q]);
            float *last = logits[i];
            if (r->job->prompt_lp) {
                last += (size_t)(r->job->n_tokens - 1) * nv;
                if (r->st == FY_OK && st == FY_OK &&
                    prompt_logprobs(pf, r->job, logits[i]) != FY_OK)
                    r->st = FY_ERR_NO_MEMORY;
            }
            r->job->compute_st = r->st != FY_OK ? r->st
                                 : st != FY_OK  ? st
                                                : job_sample(pf, r->job, last);
            if (r->job->prompt_lp)
                free(logits[i]);
        }
    }
    free(runs);
    free(toks);
    free(n_toks);
    free(pp);
    free(logits);
}

/* Takes the next batch off the queue (under pf->mu): the head, then the jobs behind it in
 * arrival order while their prompts fit max_batch_tokens together. */
static int take_batch(prefill_t *pf, pf_job_t **jobs, int cap)
{
    int n = 0, total = 0;
    while (pf->q_head != NULL && n < cap) {
        pf_job_t *job = pf->q_head;
        if (n > 0 && total + job->n_tokens > pf->max_batch_tokens)
            break;
        total += job->n_tokens;
        jobs[n++] = job;
        pf->q_head = job->qnext;
        job->qnext = NULL;
    }
    if (pf->q_head == NULL)
        pf->q_tail = NULL;
    return n;
}

enum { PF_MAX_BATCH_JOBS = 64 };

static void compute_main(void *arg)
{
    prefill_t *pf = arg;
    pf_job_t *jobs[PF_MAX_BATCH_JOBS];
    for (;;) {
        uv_mutex_lock(&pf->mu);
        while (pf->q_head == NULL && !pf->stop)
            uv_cond_wait(&pf->cond, &pf->mu);
        if (pf->q_head == NULL) {
            uv_mutex_unlock(&pf->mu);
            return;
        }
        int n = take_batch(pf, jobs, PF_MAX_BATCH_JOBS);
        uv_mutex_unlock(&pf->mu);
        uint64_t t0 = fy_clock_ns();
        for (int i = 0; i < n; i++)
            jobs[i]->t_compute_start = t0;
        run_batch(pf, jobs, n);
        fy_metric_observe(pf->m.batch_jobs, n);
        fy_metric_observe(pf->m.batch_tokens, jobs[0]->batch_tokens);
        uint64_t t1 = fy_clock_ns();
        for (int i = 0; i < n; i++) {
            jobs[i]->t_compute_end = t1;
            post_op(pf, OP_COMPUTED, jobs[i], NULL);
        }
    }
}

/* ---- RPC handlers ------------------------------------------------------------------------- */

static void on_call_cancel(rpc_call_t *call, void *arg)
{
    pf_job_t *job = arg;
    uint64_t dl = rpc_call_deadline_ns(call);
    job_abort(job, dl != 0 && fy_clock_ns() >= dl ? FY_ERR_TIMEOUT : FY_ERR_CANCELLED);
}

/* The job's policy and budget: the request's CodecParams, else the worker's defaults. */
static fy_status_t pick_policy(prefill_t *pf, const Ferry__V1__CodecParams *codec, pf_job_t *job,
                               char *err, size_t err_len)
{
    job->policy = pf->policy;
    job->budget = pf->params.budget > 0 ? pf->params.budget : -1;
    if (codec == NULL)
        return FY_OK;
    if (codec->policy != NULL && codec->policy[0] != '\0') {
        // Only built-in names from the wire: policy files are the operator's (--policy).
        if (kvc_policy_builtin(codec->policy, &job->policy) != FY_OK) {
            snprintf(err, err_len, "unknown codec policy \"%.40s\"", codec->policy);
            return FY_ERR_INVALID_ARG;
        }
        job->budget = -1;
    }
    if (codec->budget != 0) {
        if (!(codec->budget > 0 && codec->budget <= 1)) {
            snprintf(err, err_len, "codec budget %g outside (0, 1]", (double)codec->budget);
            return FY_ERR_INVALID_ARG;
        }
        job->budget = codec->budget;
    }
    return FY_OK;
}

/* A budget that reaches 1 (asked for, or raised there by fy_kv_budget_floor for a short prompt)
 * sends the KV whole: every token FP16, as policy "fp16" does. A budgeted policy would count the
 * frame's headers and maps against the FP16 bytes and quantize a few tokens to pay for them;
 * "fp16" also skips the scoring and the option search. */
static void whole_at_full(pf_job_t *job)
{
    const double b = job->budget >= 0 ? job->budget : job->policy.budget;
    if (!(b > 0) || fy_kv_budget_floor(b, (size_t)job->n_tokens) < 1 ||
        !(job->policy.options & KVC_OPT_BIT(KVC_OPT_F16)))
        return;
    if (kvc_policy_builtin("fp16", &job->policy) == FY_OK)
        job->budget = -1; // the policy's: none
}

/* The bandwidth-adaptive budget (adaptive.h) for a job whose request and worker set none. */
static void adaptive_pick(prefill_t *pf, const Ferry__V1__CodecParams *codec, pf_job_t *job)
{
    const mdl_config_t *c = pf->cfg;
    if (!(pf->params.ttft_target_ms > 0))
        return;
    if (pf->adaptive == NULL) { // every transfer feeds it from now on, whatever its budget
        pf_adaptive_params_t ap;
        pf_adaptive_params_default(&ap);
        ap.ttft_target_ms = pf->params.ttft_target_ms;
        ap.budget_min = pf->params.budget_min > 0 ? pf->params.budget_min : ap.budget_min;
        ap.budget_max = pf->params.budget_max > 0 ? pf->params.budget_max : ap.budget_max;
        ap.n_layers = c->n_layers;
        if (pf_adaptive_create(&ap, &pf->adaptive) != FY_OK)
            return;
    }
    if (pf->params.budget > 0 || (codec != NULL && codec->budget != 0) ||
        job->policy.budget <= 0)
        return;
    uint64_t raw = (uint64_t)job->n_tokens * (uint64_t)c->n_layers * (uint64_t)c->n_kv_heads *
                   (uint64_t)c->head_dim * 2 * sizeof(uint16_t);
    double b = pf_adaptive_choose(pf->adaptive, job->kv_addr, job->n_tokens, raw,
                                  atomic_load(&pf->queued_tokens));
    if (b > 0) {
        job->budget = b;
        FY_LOG_DEBUG(MODULE, "%s: adaptive budget %.3f for %s", job->request_id, b,
                     job->kv_addr);
    }
}

/* ---- pairs with decode workers of this node (nccl_link.h) ------------------------------ */

static pf_pair_t *pair_slot_of(prefill_t *pf, const kvlink_nccl_t *pair)
{
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        if (pf->pairs[i].pair != NULL && pf->pairs[i].pair == pair)
            return &pf->pairs[i];
    }
    return NULL;
}

static void on_pair_peer(kvlink_nccl_t *pair, fy_status_t st, const char *message, void *arg)
{
    prefill_t *pf = arg;
    pf_pair_t *pp = pair_slot_of(pf, pair);
    if (pp == NULL)
        return;
    const char *kind = kvlink_pair_kind_name(pf->params.pair_kind);
    if (st == FY_OK) {
        FY_LOG_INFO(MODULE, "%s pair %llu with %s is up", kind,
                    (unsigned long long)pp->generation, pp->addr);
        return;
    }
    // Its transfers fail (FY_ERR_UNAVAILABLE) and the router retries them; the decode worker
    // hands out a new pair with its next reservations.
    pp->failed = true;
    FY_LOG_WARN(MODULE, "%s pair %llu with %s failed: %s%s%s", kind,
                (unsigned long long)pp->generation, pp->addr, fy_status_str(st),
                message != NULL ? ": " : "", message != NULL ? message : "");
}

static void on_pair_idle(uv_idle_t *h);

static void pairs_progress(prefill_t *pf)
{
    bool busy = false;
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        pf_pair_t *pp = &pf->pairs[i];
        if (pp->pair == NULL || pp->failed)
            continue;
        kvlink_nccl_progress(pp->pair);
        busy = busy || kvlink_nccl_moving(pp->pair); // as decode/worker.c
    }
    if (busy && !uv_is_active((uv_handle_t *)&pf->pair_idle))
        uv_idle_start(&pf->pair_idle, on_pair_idle);
    else if (!busy && uv_is_active((uv_handle_t *)&pf->pair_idle))
        uv_idle_stop(&pf->pair_idle);
}

static void on_pair_tick(uv_timer_t *t)
{
    pairs_progress(t->data);
}

static void on_pair_idle(uv_idle_t *h)
{
    pairs_progress(h->data);
}

/* The pair with the decode worker at addr that the reservation names: joins a new one when
 * the decode worker handed out its id (id_len bytes, 0 if none) for a generation this worker
 * does not have, replacing an older or failed one. NULL without a usable pair (logged). */
static pf_pair_t *pair_join(prefill_t *pf, const char *addr, const uint8_t *id, size_t id_len,
                            uint64_t generation)
{
    pf_pair_t *cur = NULL, *free_slot = NULL;
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        pf_pair_t *pp = &pf->pairs[i];
        if (pp->pair != NULL && strcmp(pp->addr, addr) == 0)
            cur = pp;
        else if (pp->pair == NULL && free_slot == NULL)
            free_slot = pp;
    }
    if (cur != NULL && cur->generation == generation)
        return cur->failed ? NULL : cur;
    if (id_len != KVLINK_NCCL_ID_BYTES)
        return NULL; // a pair this worker never joined, and no id to join it with
    if (cur != NULL) {
        kvlink_nccl_destroy(cur->pair); // the decode worker moved on to a newer one
        memset(cur, 0, sizeof(*cur));
        free_slot = cur;
    }
    for (size_t i = 0; i < MAX_PAIRS && free_slot == NULL; i++) {
        // Full: a failed pair's slot (a decode worker that went away) is reused.
        if (pf->pairs[i].failed) {
            kvlink_nccl_destroy(pf->pairs[i].pair);
            memset(&pf->pairs[i], 0, sizeof(pf->pairs[i]));
            free_slot = &pf->pairs[i];
        }
    }
    if (free_slot == NULL) {
        FY_LOG_WARN(MODULE, "no pair with %s: %d pairs already", addr, MAX_PAIRS);
        return NULL;
    }
    kvlink_nccl_params_t np;
    kvlink_nccl_params_default(&np);
    np.compat.protocol_version = KVLINK_NCCL_PROTOCOL_VERSION;
    np.compat.codec_version = KVC_FRAME_VERSION;
    np.compat.model_fingerprint = pf->params.fingerprint;
    np.role = KVLINK_NCCL_SENDER;
    np.idle_round_us = KVLINK_PAIR_IDLE_ROUND_US;
    np.device = pf->params.pair_device;
    np.on_peer = on_pair_peer;
    np.cb_arg = pf;
    fy_status_t st = kvlink_pair_create(pf->params.pair_kind, id, id_len, &np, &free_slot->pair);
    if (st != FY_OK) {
        FY_LOG_WARN(MODULE, "cannot join the %s pair %llu of %s: %s",
                    kvlink_pair_kind_name(pf->params.pair_kind), (unsigned long long)generation,
                    addr, fy_status_str(st));
        memset(free_slot, 0, sizeof(*free_slot));
        return NULL;
    }
    snprintf(free_slot->addr, sizeof(free_slot->addr), "%s", addr);
    free_slot->generation = generation;
    FY_LOG_INFO(MODULE, "%s pair %llu with %s: joining",
                kvlink_pair_kind_name(pf->params.pair_kind), (unsigned long long)generation, addr);
    if (!uv_is_active((uv_handle_t *)&pf->pair_timer))
        uv_timer_start(&pf->pair_timer, on_pair_tick, 1, 1);
    return free_slot;
}

/* Opens the job's transfer: over the pair when the reservation says so, else over UCX. */
static fy_status_t open_send(prefill_t *pf, pf_job_t *job, const Ferry__V1__PrefillRequest *req)
{
    pf_pair_t *pp = NULL;
    if (pf->params.pair_kind != KVLINK_PAIR_OFF && req->pair_generation != 0)
        pp = pair_join(pf, job->kv_addr, req->pair_id.data, req->pair_id.len,
                       req->pair_generation);
    if (req->via_pair) {
        // The decode worker expects this KV on the pair only.
        if (pp == NULL || pp->generation != req->pair_generation) {
            FY_LOG_WARN(MODULE, "%s: the decode worker expects the KV over pair %llu, which this "
                                "worker does not have",
                        job->request_id, (unsigned long long)req->pair_generation);
            return FY_ERR_UNAVAILABLE;
        }
        kvlink_nccl_send_params_t sp;
        kvlink_nccl_send_params_default(&sp);
        sp.deadline_ns = job->deadline_ns;
        sp.on_end = on_pair_send_end;
        sp.arg = job;
        job->dev_frames = pf->params.pair_kind == KVLINK_PAIR_NCCL;
        // Goes out with the pair timer's next round (callbacks run there, not inside this call).
        fy_status_t st = kvlink_nccl_send_open(pp->pair, job->reservation_id, &sp, &job->nsend);
        if (st != FY_OK)
            job->nsend = NULL;
        return st;
    }
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.deadline_ns = job->deadline_ns;
    sp.on_end = on_send_end;
    sp.arg = job;
    fy_status_t st = kvlink_send_open(pf->params.link, job->kv_addr, job->reservation_id, &sp,
                                      &job->send);
    if (st != FY_OK)
        job->send = NULL;
    return st;
}

static void on_prefill(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    prefill_t *pf = arg;
    const Ferry__V1__PrefillRequest *req = (const Ferry__V1__PrefillRequest *)msg;
    char err[160] = "";
    if (pf->draining) {
        rpc_call_finish(call, RPC_CODE_UNAVAILABLE, "prefill worker draining");
        return;
    }
    const mdl_config_t *c = pf->cfg;
    if (req->n_prompt_token_ids == 0 || req->n_prompt_token_ids >= (size_t)c->n_ctx_train) {
        snprintf(err, sizeof(err), "prompt of %zu tokens: need 1 to %d", req->n_prompt_token_ids,
                 c->n_ctx_train - 1);
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, err);
        return;
    }
    for (size_t i = 0; i < req->n_prompt_token_ids; i++) {
        if (req->prompt_token_ids[i] >= (uint32_t)c->n_vocab) {
            snprintf(err, sizeof(err), "token %u at %zu outside the vocabulary (%d)",
                     req->prompt_token_ids[i], i, c->n_vocab);
            rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, err);
            return;
        }
    }
    if (req->reservation_id == 0 || req->decode_kv_address == NULL ||
        req->decode_kv_address[0] == '\0' || strlen(req->decode_kv_address) >= 160 ||
        strlen(req->request_id) >= 64) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT,
                        "need reservation_id, decode_kv_address and a request_id under 64 bytes");
        return;
    }
    if (req->kv_key.len != 0 && req->kv_key.len != KVLINK_SEAL_KEY_BYTES) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "kv_key: 32 bytes, or none");
        return;
    }
    uint64_t limit = pf->params.max_queued_tokens;
    if (limit != 0 && atomic_load(&pf->queued_tokens) + req->n_prompt_token_ids > limit) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "prefill queue full");
        return;
    }
    pf_job_t *job = calloc(1, sizeof(*job));
    if (job == NULL) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    job->pf = pf;
    job->n_tokens = (int)req->n_prompt_token_ids;
    job->tokens = malloc((size_t)job->n_tokens * sizeof(int32_t));
    job->n_iv_cap = (uint32_t)c->n_layers + 2;
    job->iv = calloc(2 * (size_t)job->n_iv_cap, sizeof(uint64_t));
    atomic_init(&job->abort, 0);
    fy_status_t st = job->tokens && job->iv ? FY_OK : FY_ERR_NO_MEMORY;
    if (st == FY_OK && (prefill_sampler_params(req->sampling, &job->sp) != FY_OK ||
                        mdl_sampler_params_check(&job->sp, c->n_vocab) != FY_OK)) {
        snprintf(err, sizeof(err), "sampling parameters out of range");
        st = FY_ERR_INVALID_ARG;
    }
    if (st == FY_OK && req->sampling != NULL && req->sampling->json_object)
        job->sp.json = pf->json; // JSON mode: the first token opens the object
    if (st == FY_OK && req->sampling != NULL && req->sampling->json_schema != NULL &&
        req->sampling->json_schema[0] != '\0') {
        char why[140];
        st = mdl_schema_compile(req->sampling->json_schema, strlen(req->sampling->json_schema),
                                &job->schema, why, sizeof(why));
        if (st != FY_OK)
            snprintf(err, sizeof(err), "json_schema: %s", why);
        job->sp.json = pf->json; // the first token begins a document of the schema
        job->sp.schema = job->schema;
    }
    job->forced = -1;
    if (st == FY_OK && req->sampling != NULL && req->sampling->n_forced_token_ids > 0) {
        if (req->sampling->forced_token_ids[0] >= (uint32_t)c->n_vocab) {
            snprintf(err, sizeof(err), "forced token id outside the vocabulary");
            st = FY_ERR_INVALID_ARG;
        } else {
            job->forced = (int32_t)req->sampling->forced_token_ids[0];
        }
    }
    if (st == FY_OK && req->sampling != NULL &&
        (req->sampling->logprobs || req->sampling->top_logprobs > 0 ||
         req->sampling->prompt_logprobs)) {
        job->logprobs = req->sampling->logprobs || req->sampling->top_logprobs > 0;
        job->prompt_lp = req->sampling->prompt_logprobs;
        job->n_top = (int)req->sampling->top_logprobs;
        const size_t max_prompt = PF_MAX_PROMPT_LOGITS / ((size_t)c->n_vocab * sizeof(float));
        if (req->sampling->top_logprobs > MDL_MAX_TOP_LOGPROBS) {
            snprintf(err, sizeof(err), "top_logprobs: at most %d", MDL_MAX_TOP_LOGPROBS);
            st = FY_ERR_INVALID_ARG;
        } else if (job->prompt_lp && (size_t)job->n_tokens > max_prompt) {
            snprintf(err, sizeof(err),
                     "prompt_logprobs: prompts of at most %zu tokens (the logits of every "
                     "position are held at once)",
                     max_prompt);
            st = FY_ERR_INVALID_ARG;
        }
    }
    if (st == FY_OK)
        st = pick_policy(pf, req->codec, job, err, sizeof(err));
    if (st != FY_OK) {
        rpc_call_finish(call, status_code(st), err[0] ? err : fy_status_str(st));
        free(job->tokens);
        free(job->iv);
        mdl_schema_destroy(job->schema);
        free(job);
        return;
    }
    for (int i = 0; i < job->n_tokens; i++)
        job->tokens[i] = (int32_t)req->prompt_token_ids[i];
    snprintf(job->request_id, sizeof(job->request_id), "%s", req->request_id);
    snprintf(job->kv_addr, sizeof(job->kv_addr), "%s", req->decode_kv_address);
    job->reservation_id = req->reservation_id;
    job->sealed = req->kv_key.len == KVLINK_SEAL_KEY_BYTES;
    if (job->sealed)
        memcpy(job->kv_key, req->kv_key.data, KVLINK_SEAL_KEY_BYTES);
    adaptive_pick(pf, req->codec, job);
    whole_at_full(job);
    uint64_t now = fy_clock_ns();
    job->deadline_ns = rpc_call_deadline_ns(call);
    if (req->deadline_unix_ms != 0) {
        uint64_t wall = fy_clock_realtime_ns();
        uint64_t dl_wall = req->deadline_unix_ms * 1000000ull;
        uint64_t dl = dl_wall > wall ? now + (dl_wall - wall) : now;
        if (job->deadline_ns == 0 || dl < job->deadline_ns)
            job->deadline_ns = dl;
    }
    job->t_enqueued = now;
    job->call = call;
    job->next = pf->live;
    if (pf->live)
        pf->live->prev = job;
    pf->live = job;
    pf->n_live++;
    fy_metric_set(pf->m.in_flight, (double)pf->n_live);
    if (job->deadline_ns != 0 && now >= job->deadline_ns) {
        job->computed = true; // never queued
        atomic_store(&job->abort, (int)FY_ERR_TIMEOUT);
        job_maybe_finish(job);
        job_maybe_free(job);
        return;
    }
    // Open the transfer now: connecting and the handshake overlap the queue and compute.
    st = open_send(pf, job, req);
    if (st != FY_OK) {
        job->computed = true;
        atomic_store(&job->abort, (int)st);
        FY_LOG_WARN(MODULE, "%s: cannot open the KV transfer to %s: %s", job->request_id,
                    job->kv_addr, fy_status_str(st));
        job_maybe_finish(job);
        job_maybe_free(job);
        return;
    }
    rpc_call_set_cancel_cb(call, on_call_cancel, job);
    atomic_fetch_add(&pf->queued_tokens, (uint64_t)job->n_tokens);
    fy_metric_set(pf->m.queued_tokens, (double)atomic_load(&pf->queued_tokens));
    FY_LOG_DEBUG(MODULE, "%s: %d tokens queued for %s (reservation %llu, policy %s)",
                 job->request_id, job->n_tokens, job->kv_addr,
                 (unsigned long long)job->reservation_id, job->policy.name);
    uv_mutex_lock(&pf->mu);
    if (pf->q_tail)
        pf->q_tail->qnext = job;
    else
        pf->q_head = job;
    pf->q_tail = job;
    uv_cond_signal(&pf->cond);
    uv_mutex_unlock(&pf->mu);
}

static void on_cancel(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    prefill_t *pf = arg;
    const Ferry__V1__CancelRequest *req = (const Ferry__V1__CancelRequest *)msg;
    Ferry__V1__CancelResponse resp = FERRY__V1__CANCEL_RESPONSE__INIT;
    for (pf_job_t *j = pf->live, *next; j; j = next) {
        next = j->next; // j may be freed by the abort
        if (j->call != NULL && strcmp(j->request_id, req->request_id) == 0) {
            job_abort(j, FY_ERR_CANCELLED);
            resp.found = true;
        }
    }
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void on_drain(rpc_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    prefill_t *pf = arg;
    prefill_set_draining(pf, true);
    Ferry__V1__DrainResponse resp = FERRY__V1__DRAIN_RESPONSE__INIT;
    resp.in_flight = (uint32_t)pf->n_live;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

fy_status_t prefill_serve(prefill_t *pf, rpc_server_t *srv)
{
    static rpc_handler_cb handlers[16];
    const ProtobufCServiceDescriptor *d = &ferry__v1__worker__descriptor;
    if (d->n_methods > FY_ARRAY_SIZE(handlers))
        return FY_ERR_INTERNAL;
    for (unsigned i = 0; i < d->n_methods; i++) {
        const char *name = d->methods[i].name;
        handlers[i] = strcmp(name, "Prefill") == 0  ? on_prefill
                      : strcmp(name, "Cancel") == 0 ? on_cancel
                      : strcmp(name, "Drain") == 0  ? on_drain
                                                    : NULL;
    }
    return rpc_server_add_service(srv, d, handlers, NULL, pf);
}

/* ---- lifecycle ---------------------------------------------------------------------------- */

static void register_metrics(prefill_t *pf)
{
    fy_metrics_t *m = pf->params.metrics;
    if (m == NULL)
        return;
    pf->m.requests_ok = fy_metrics_counter(m, "ferry_prefill_requests_total", "status=\"ok\"",
                                           "prefill requests by outcome");
    pf->m.requests_failed = fy_metrics_counter(m, "ferry_prefill_requests_total",
                                               "status=\"failed\"", "prefill requests by outcome");
    pf->m.requests_cancelled = fy_metrics_counter(
        m, "ferry_prefill_requests_total", "status=\"cancelled\"", "prefill requests by outcome");
    pf->m.tokens = fy_metrics_counter(m, "ferry_prefill_tokens_total", NULL,
                                      "prompt tokens prefilled");
    pf->m.prefill_s = fy_metrics_histogram(m, "ferry_prefill_seconds", NULL,
                                           "prefill compute time per request",
                                           fy_metrics_latency_bounds, 16);
    pf->m.queue_s = fy_metrics_histogram(m, "ferry_prefill_queue_seconds", NULL,
                                         "time a request waited for the compute thread",
                                         fy_metrics_latency_bounds, 16);
    pf->m.raw_bytes = fy_metrics_counter(m, "ferry_prefill_kv_raw_bytes_total", NULL,
                                         "FP16 bytes of the prompts' K and V");
    pf->m.wire_bytes = fy_metrics_counter(m, "ferry_prefill_kv_wire_bytes_total", NULL,
                                          "encoded KV bytes sent");
    pf->m.transfer_s = fy_metrics_histogram(m, "ferry_prefill_transfer_seconds", NULL,
                                            "time KV frames spent in transfer per request",
                                            fy_metrics_latency_bounds, 16);
    pf->m.hidden = fy_metrics_gauge(m, "ferry_prefill_hidden_transfer_fraction", NULL,
                                    "share of the last request's transfer time hidden "
                                    "behind compute");
    pf->m.queued_tokens = fy_metrics_gauge(m, "ferry_prefill_queued_tokens", NULL,
                                           "prompt tokens queued or computing");
    pf->m.in_flight = fy_metrics_gauge(m, "ferry_prefill_in_flight", NULL,
                                       "requests queued, computing or transferring");
    static const double job_bounds[] = {1, 2, 4, 8, 16, 32, 64};
    static const double token_bounds[] = {64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};
    pf->m.batch_jobs = fy_metrics_histogram(m, "ferry_prefill_batch_requests", NULL,
                                            "requests computed together per prefill batch",
                                            job_bounds, FY_ARRAY_SIZE(job_bounds));
    pf->m.batch_tokens = fy_metrics_histogram(m, "ferry_prefill_batch_tokens", NULL,
                                              "prompt tokens per prefill batch", token_bounds,
                                              FY_ARRAY_SIZE(token_bounds));
}

fy_status_t prefill_create(uv_loop_t *loop, const prefill_params_t *params, prefill_t **pf_p)
{
    if (loop == NULL || params == NULL || pf_p == NULL || params->model == NULL ||
        params->link == NULL)
        return FY_ERR_INVALID_ARG;
    prefill_t *pf = calloc(1, sizeof(*pf));
    if (pf == NULL)
        return FY_ERR_NO_MEMORY;
    pf->loop = loop;
    pf->params = *params;
    if (params->policy != NULL)
        pf->policy = *params->policy;
    else
        kvc_policy_default(&pf->policy);
    char err[128];
    if (kvc_policy_validate(&pf->policy, err, sizeof(err)) != FY_OK) {
        FY_LOG_ERROR(MODULE, "default policy: %s", err);
        free(pf);
        return FY_ERR_INVALID_ARG;
    }
    pf->cfg = mdl_model_config(params->model);
    pf->corrupt_left = params->test_corrupt_frames;
    pf->max_batch_tokens = params->max_batch_tokens > 0 ? params->max_batch_tokens
                                                        : PREFILL_MAX_BATCH_TOKENS;
    atomic_init(&pf->queued_tokens, 0);
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = params->n_threads;
    if (params->prefill_chunk > 0)
        cp.prefill_chunk = params->prefill_chunk;
    cp.max_batch = 1;
    // The model's device: on the GPU the layer callback still gets host K/V (copied while the
    // next layer computes), so the CPU encoder works unchanged.
    cp.device = mdl_model_device(params->model);
    fy_status_t st = mdl_ctx_create(params->model, &cp, &pf->ctx);
    if (st == FY_OK) {
        pf->logits = malloc((size_t)pf->cfg->n_vocab * sizeof(float));
        pf->logits_cap = 1;
        if (pf->logits == NULL)
            st = FY_ERR_NO_MEMORY;
    }
    if (st == FY_OK)
        st = mdl_json_vocab_create(mdl_model_tokenizer(params->model), &pf->json);
    if (st != FY_OK) {
        mdl_ctx_destroy(pf->ctx);
        free(pf->logits);
        free(pf);
        return st;
    }
    uv_mutex_init(&pf->mu);
    uv_cond_init(&pf->cond);
    uv_async_init(loop, &pf->async, on_async);
    pf->async.data = pf;
    uv_timer_init(loop, &pf->pair_timer);
    pf->pair_timer.data = pf;
    uv_idle_init(loop, &pf->pair_idle);
    pf->pair_idle.data = pf;
    pf->open_handles = 3;
    register_metrics(pf);
    if (uv_thread_create(&pf->thread, compute_main, pf) != 0) {
        uv_close((uv_handle_t *)&pf->async, NULL);
        uv_close((uv_handle_t *)&pf->pair_timer, NULL);
        uv_close((uv_handle_t *)&pf->pair_idle, NULL);
        uv_cond_destroy(&pf->cond);
        uv_mutex_destroy(&pf->mu);
        mdl_ctx_destroy(pf->ctx);
        free(pf->logits);
        free(pf);
        return FY_ERR_RESOURCE_EXHAUSTED;
    }
    *pf_p = pf;
    return FY_OK;
}

uint64_t prefill_queued_tokens(const prefill_t *pf)
{
    return atomic_load(&((prefill_t *)pf)->queued_tokens);
}

size_t prefill_in_flight(const prefill_t *pf)
{
    return pf->n_live;
}

void prefill_set_draining(prefill_t *pf, bool draining)
{
    if (pf->draining != draining)
        FY_LOG_INFO(MODULE, "%s (%zu request(s) in hand)",
                    draining ? "draining: no new requests" : "accepting requests again",
                    pf->n_live);
    pf->draining = draining;
}

bool prefill_draining(const prefill_t *pf)
{
    return pf->draining;
}

void prefill_abort_all(prefill_t *pf, const char *reason)
{
    if (pf->n_live > 0)
        FY_LOG_WARN(MODULE, "aborting %zu request(s): %s", pf->n_live, reason);
    for (pf_job_t *j = pf->live, *next; j; j = next) {
        next = j->next; // j may be freed by the abort
        job_abort(j, FY_ERR_CANCELLED);
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    prefill_t *pf = h->data;
    if (--pf->open_handles > 0)
        return;
    uv_cond_destroy(&pf->cond);
    uv_mutex_destroy(&pf->mu);
    free(pf);
}

void prefill_destroy(prefill_t *pf)
{
    if (pf == NULL)
        return;
    uv_mutex_lock(&pf->mu);
    pf->stop = true;
    uv_cond_signal(&pf->cond);
    uv_mutex_unlock(&pf->mu);
    uv_thread_join(&pf->thread);
    on_async(&pf->async); // ops the thread posted last
    // Transfers over pairs end (FY_ERR_CLOSED) and give their frames back.
    uv_timer_stop(&pf->pair_timer);
    uv_idle_stop(&pf->pair_idle);
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        kvlink_nccl_destroy(pf->pairs[i].pair);
        memset(&pf->pairs[i], 0, sizeof(pf->pairs[i]));
    }
    while (pf->live != NULL) {
        // Only reachable when the caller did not wait: drop what is left.
        pf_job_t *j = pf->live;
        if (j->call) {
            rpc_call_finish(j->call, RPC_CODE_UNAVAILABLE, "prefill worker shutting down");
            j->call = NULL;
        }
        job_free(j);
    }
    mdl_ctx_destroy(pf->ctx);
    mdl_json_vocab_destroy(pf->json);
    free(pf->logits);
    free(pf->k16);
    free(pf->v16);
    pf_adaptive_destroy(pf->adaptive);
    uv_close((uv_handle_t *)&pf->async, on_handle_closed);
    uv_close((uv_handle_t *)&pf->pair_timer, on_handle_closed);
    uv_close((uv_handle_t *)&pf->pair_idle, on_handle_closed);
}
