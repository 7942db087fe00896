/*
 * worker.c: the decode worker's core (decode.h), what ferry-decode runs.
 *
 * Three threads, each with one job:
 * - RPC thread (libuv loop): ferry.v1.Worker's ReserveKV, Decode, Cancel and Drain, Ferry.Health,
 *   /metrics and /healthz on the same port, and the router agent (register, heartbeat).
 * - kvlink thread (its own libuv loop): the UCX listener. Each frame is validated
 *   (kvc_frame_parse), counted against its lease and placed still compressed (kvc_place); a
 *   bad frame or a failed placement cancels that transfer only. It also runs kvlink_recv_expect
 *   for new reservations, cancels transfers on request and sweeps expired leases.
 * - scheduler thread: continuous batching. Between two steps sequences whose KV is complete
 *   and whose Decode call arrived join, finished or cancelled ones leave; one step runs
 *   mdl_decode_kvc over the batch, then each sequence samples its token and streams it.
 *
 * With device CUDA the model, its context and the page pool (kvc_gpu_pool_t) live on the GPU:
 * frames are still parsed and checked on the host, then uploaded and placed on the device
 * (kvc_gpu_stage_place, which returns once the pages are complete, so the scheduler's stream
 * may read them), and steps run mdl_decode_kvc_cuda. Page accounting, leases, cancel and a full
 * pool behave as on the CPU: only the calls that touch pages differ (the kv_* helpers below).
 *
 * A request (req_t) lives from ReserveKV to its end, in one table under w->mu. Who may touch
 * its kvc_seq_t follows its state: the kvlink thread until the KV is complete (kv_done), then
 * nobody until the Decode call arrives, then the scheduler (running). Whoever owns it when it
 * ends frees it: lease released, pages returned, the Decode call finished. Requests that
 * failed leave a tombstone so a Decode call that comes later still learns why.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "decode.h"
#include "ferry.pb-c.h"
#include "kvcodec.h"
#include "kvcodec_cuda.h"
#include "kvlink.h"
#include "nccl_link.h"
#include "model.h"
#include "router.h"
#include "rpc.h"

#define MODULE "decode"

enum {
    SWEEP_MS = 50,
    N_TOMBSTONES = 256,
    MAX_LAYERS = 1024,
    MAX_PAIRS = 16, // prefill workers of this node paired at once
};

/* Why requests fail, for ferry_decode_failures_total{reason}. */
typedef enum {
    FAIL_CORRUPT_FRAME,
    FAIL_PLACEMENT,
    FAIL_TRANSFER,
    FAIL_EXPIRED,
    FAIL_POOL_FULL,
    FAIL_CANCELLED,
    FAIL_INTERNAL,
    FAIL_SHUTDOWN,
    FAIL_COUNT,
} fail_reason_t;

static const char *const k_fail_names[FAIL_COUNT] = {
    "corrupt_frame", "placement", "transfer", "expired",
    "pool_full",     "cancelled", "internal", "shutdown",
};

typedef struct req req_t;
struct req {
    req_t *next; // table list
    uint64_t id; // reservation id = lease id = kvlink request id
    char request_id[64];
    uint32_t prompt_tokens;  // as reserved
    uint32_t max_new_tokens; // as reserved
    uint32_t lease_ms;
    bool sealed; // ReserveKVRequest.kv_key given: UCX frames must open under it
    uint8_t kv_key[KVLINK_SEAL_KEY_BYTES];
    // Transfer (kvlink thread until kv_done). One of the two, by the worker's device.
    kvc_seq_t *seq;
    kvc_gpu_seq_t *gseq;
    uint32_t layers_placed;
    uint32_t n_tokens; // prompt length from the frames
    uint64_t wire_bytes;
    bool recv_open;    // kvlink_recv_expect succeeded and on_recv_end has not run
    kvlink_nccl_t *pair; // the transfer comes over this pair instead of the UCX link
    fy_status_t fail_st; // set before cancelling the transfer: the reason to report
    fail_reason_t fail_reason;
    char fail_msg[160];
    bool kv_done;
    uint64_t ready_deadline_ns; // kv_done without a Decode call: given up after this
    // Decode call (set by the RPC thread).
    rpc_call_t *call;
    bool return_ids;
    bool logprobs; // sampling.logprobs: each token's log-probability goes with it
    int n_top;     // sampling.top_logprobs
    uint32_t *forced; // sampling.forced_token_ids: completion token i is forced[i] (malloc'd)
    uint32_t n_forced;
    uint32_t first_token;
    uint32_t already_sent; // completion tokens the client has
    uint32_t limit;        // completion tokens in all (max_tokens)
    mdl_sampler_t *sampler;
    mdl_schema_t *schema; // the sampler's json_schema (owned), or NULL
    bool cancel; // Cancel RPC: the scheduler ends it between steps
    bool ending; // claimed by a thread that ends it outside the usual owner (under mu)
    // Scheduler state.
    bool running;
    bool finished; // its last message is sent; it leaves after this step
    int32_t next_token;
    int32_t pos;
    uint32_t generated;
    uint64_t start_ns, first_step_ns;
};

typedef struct {
    uint64_t id;
    char request_id[64];
    int code;
    char msg[160];
} tombstone_t;

/* Work for the kvlink thread: start receiving for a reservation, or cancel one. */
typedef struct kv_cmd kv_cmd_t;
struct kv_cmd {
    kv_cmd_t *next;
    enum { CMD_EXPECT, CMD_CANCEL } kind;
    uint64_t id;
    rpc_call_t *call; // CMD_EXPECT: the ReserveKV call to answer
    uint64_t credit;
    char pair_peer[96]; // CMD_EXPECT: the sending prefill worker, when the two may pair
    fy_status_t st;   // CMD_CANCEL: what to report
    fail_reason_t reason;
};

/* A pair with one prefill worker of this node (kvlink thread). */
typedef struct {
    char peer[96]; // the prefill worker: "id#instance"
    kvlink_nccl_t *pair;
    uint64_t generation;
    uint8_t id[KVLINK_NCCL_ID_BYTES]; // handed out through ReserveKV until the pair is up
    bool up, failed;
    uint32_t failures; // set-ups in a row that never came up
    uint64_t retry_ns; // after a failure, no new pair with this peer before this
} pair_slot_t;

struct decode_worker {
    decode_worker_params_t p;
    char listen_host[64], kv_host[64], advertise_host[64], router_addr[128], worker_id[64];
    char api_key[257]; // "" = none
    char ucx_tls[128], ucx_devices[128];
    mdl_model_t *own_model;
    const mdl_model_t *model;
    const mdl_config_t *cfg;
    uint64_t fingerprint;
    mdl_json_vocab_t *json; // the tokens' bytes, for JSON mode (sampling.json_object)
    mdl_ctx_t *ctx;
    kvc_pool_t *pool;        // device CPU
    kvc_gpu_pool_t *gpool;   // device CUDA
    kvc_gpu_stage_t *gstage; // device CUDA: frame uploads (kvlink thread)
    decode_leases_t *leases;
    uint32_t tail_page_tokens; // FP16 tokens per page

    pthread_mutex_t mu;
    pthread_cond_t cond;   // scheduler wake-up, and drain / start-up waits
    req_t *reqs;           // every live request
    uint32_t n_reqs;
    tombstone_t tomb[N_TOMBSTONES];
    uint32_t tomb_next;
    bool draining, stopping;
    int start_state; // 0 starting, 1 ready, -1 failed (RPC and kvlink threads each add)
    int rpc_up, kv_up;
    fy_status_t start_st;
    char start_err[160];

    // RPC thread.
    pthread_t rpc_thread;
    uv_loop_t rpc_loop;
    uv_async_t rpc_async; // stop, drain
    rpc_server_t *srv;
    router_agent_t *agent;
    int rpc_port;
    bool rpc_stop, rpc_drain_pending;
    rpc_handler_cb worker_handlers[16];
    rpc_handler_cb ferry_handlers[16];
    bool worker_streaming[16];

    // kvlink thread.
    pthread_t kv_thread;
    uv_loop_t kv_loop;
    uv_async_t kv_async;
    uv_timer_t kv_sweep;
    kvlink_ctx_t *kv_ctx;
    kvlink_t *link;
    void *pinned; // the link's receive pool, page-locked for uploads (device CUDA)
    int kv_port;
    kv_cmd_t *cmds; // under mu
    bool kv_stop;
    // Pairs with prefill workers of this node (kvlink thread).
    kvlink_pair_identity_t pairing; // what this worker registered for pairing
    pair_slot_t pairs[MAX_PAIRS];
    uint64_t pair_generation;
    uv_timer_t pair_timer; // moves the pairs along
    uv_idle_t pair_idle;   // ... at every loop turn while one has a transfer open
    uint8_t *fetch;        // host copy of a frame received into device memory
    size_t fetch_cap;
    bool fetch_locked; // fetch is page-locked (kvc_cuda_host_register)
    bool kv_closed; // the thread takes no more commands (under mu)

    // Scheduler thread.
    pthread_t sched_thread;
    req_t **batch;       // [max_batch]
    int n_batch;
    kvc_seq_t **seqs;    // [max_batch]
    kvc_gpu_seq_t **gseqs; // [max_batch] (device CUDA)
    int32_t *tokens, *positions; // [max_batch]
    float *logits;       // [max_batch][n_vocab]
    float *raw_row;      // [n_vocab]: a row before the sampler changes it (logprobs)

    // Metrics.
    fy_metrics_t *metrics;
    fy_metric_t *m_locked; // receive pool bytes page-locked (kvlink thread sets it)
    fy_metric_t *m_running, *m_free_pages, *m_avail_pages, *m_total_pages, *m_requests;
    fy_metric_t *m_tokens, *m_step, *m_batch, *m_wire, *m_frames, *m_opened, *m_reserved,
        *m_refused;
    fy_metric_t *m_completed, *m_fail[FAIL_COUNT], *m_pair_frames, *m_pairs;
    fy_metric_t *m_pairs_up;
    atomic_uint_fast64_t tokens_generated, steps, failures;
    atomic_uint running_now;
};

/* ------------------------------------------------------------------------------------------ */
/* Requests                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static req_t *find_locked(decode_worker_t *w, uint64_t id)
{
    for (req_t *r = w->reqs; r != NULL; r = r->next) {
        if (r->id == id)
            return r;
    }
    return NULL;
}

static req_t *find_name_locked(decode_worker_t *w, const char *request_id)
{
    for (req_t *r = w->reqs; r != NULL; r = r->next) {
        if (strcmp(r->request_id, request_id) == 0)
            return r;
    }
    return NULL;
}

static void unlink_locked(decode_worker_t *w, req_t *r)
{
    for (req_t **pp = &w->reqs; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            w->n_reqs--;
            return;
        }
    }
}

/* ---- The page pool, CPU or GPU: the only calls that depend on the device ---- */

static uint32_t kv_free_pages(const decode_worker_t *w)
{
    return w->gpool != NULL ? kvc_gpu_pool_free_count(w->gpool) : kvc_pool_free_count(w->pool);
}

static uint32_t kv_total_pages(const decode_worker_t *w)
{
    return w->gpool != NULL ? kvc_gpu_pool_n_pages(w->gpool) : kvc_pool_n_pages(w->pool);
}

static void kv_seq_destroy(req_t *r)
{
    kvc_seq_destroy(r->seq);
    kvc_gpu_seq_destroy(r->gseq);
    r->seq = NULL;
    r->gseq = NULL;
}

/* Pages frame f takes in the pool. */
static fy_status_t kv_pages_needed(const decode_worker_t *w, const kvc_frame_t *f,
                                   uint32_t *pages_p)
{
    return w->gpool != NULL ? kvc_gpu_pool_pages_needed(w->gpool, f, pages_p)
                            : kvc_pool_pages_needed(w->pool, f, pages_p);
}

/* Creates r's sequence on first use, then places f (whose bytes are data [len] on the host,
 * and dev [len] on the GPU when it came GPU to GPU). */
static fy_status_t kv_place(decode_worker_t *w, req_t *r, const kvc_frame_t *f, const void *data,
                            const void *dev, size_t len)
{
    fy_status_t st = FY_OK;
    if (w->gpool != NULL) {
        if (r->gseq == NULL)
            st = kvc_gpu_seq_create(w->gpool, f->n_layers, f->n_kv_heads, w->fingerprint,
                                    f->seq_id, &r->gseq);
        if (st == FY_OK && dev != NULL)
            return kvc_gpu_stage_place_dev(w->gstage, r->gseq, f, dev);
        return st == FY_OK ? kvc_gpu_stage_place(w->gstage, r->gseq, f, data, len) : st;
    }
    if (dev != NULL)
        return FY_ERR_INTERNAL; // a device frame on a CPU pool: never paired so
    if (r->seq == NULL)
        st = kvc_seq_create(w->pool, f->n_layers, f->n_kv_heads, w->fingerprint, f->seq_id,
                            &r->seq);
    return st == FY_OK ? kvc_place(r->seq, f) : st;
}

/* Pages r's next token takes. */
static uint32_t kv_step_pages(const decode_worker_t *w, const req_t *r)
{
    return w->gpool != NULL ? mdl_kvc_step_pages_cuda(w->model, w->gpool, r->gseq)
                            : mdl_kvc_step_pages(w->model, w->pool, r->seq);
}

/* One decode step over the batch's sequences (tokens and positions filled by the caller). */
static fy_status_t kv_decode(decode_worker_t *w)
{
    int n = w->n_batch;
    if (w->gpool != NULL) {
        for (int i = 0; i < n; i++)
            w->gseqs[i] = w->batch[i]->gseq;
        return mdl_decode_kvc_cuda(w->ctx, w->gpool, w->gseqs, w->positions, w->tokens, n,
                                   w->logits);
    }
    for (int i = 0; i < n; i++)
        w->seqs[i] = w->batch[i]->seq;
    return mdl_decode_kvc(w->ctx, w->pool, w->seqs, w->positions, w->tokens, n, w->logits);
}

static void update_gauges(decode_worker_t *w)
{
    fy_metric_set(w->m_free_pages, kv_free_pages(w));
    fy_metric_set(w->m_avail_pages, (double)decode_leases_available(w->leases));
    fy_metric_set(w->m_running, atomic_load(&w->running_now));
    pthread_mutex_lock(&w->mu);
    fy_metric_set(w->m_requests, w->n_reqs);
    pthread_mutex_unlock(&w->mu);
}

static void send_final(req_t *r, Ferry__V1__FinishReason reason)
{
    Ferry__V1__RequestStats stats = FERRY__V1__REQUEST_STATS__INIT;
    stats.prompt_tokens = r->n_tokens;
    stats.completion_tokens = r->already_sent + r->generated;
    stats.kv_wire_bytes = r->wire_bytes;
    if (r->generated > 1)
        stats.tpot_ms = (double)(fy_clock_ns() - r->first_step_ns) / 1e6 / (r->generated - 1);
    Ferry__V1__GenerateResponse resp = FERRY__V1__GENERATE_RESPONSE__INIT;
    resp.finish_reason = reason;
    resp.stats = &stats;
    resp.request_id = r->request_id;
    rpc_call_send(r->call, &resp.base);
}

/* Ends a request that the caller owns (it is no longer reachable by others once unlinked):
 * releases the lease and pages, finishes the Decode call with code/msg (OK: finish_reason
 * sent by the caller), records a tombstone for failures. Takes mu itself. */
static void req_end(decode_worker_t *w, req_t *r, int code, const char *msg,
                    fail_reason_t reason)
{
    pthread_mutex_lock(&w->mu);
    unlink_locked(w, r);
    if (code != RPC_CODE_OK) {
        tombstone_t *t = &w->tomb[w->tomb_next++ % N_TOMBSTONES];
        t->id = r->id;
        snprintf(t->request_id, sizeof(t->request_id), "%s", r->request_id);
        t->code = code;
        snprintf(t->msg, sizeof(t->msg), "%s", msg != NULL ? msg : "");
    }
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    decode_leases_release(w->leases, r->id); // NOT_FOUND after expiry: already released
    kv_seq_destroy(r);
    if (code == RPC_CODE_OK) {
        fy_metric_inc(w->m_completed);
        FY_LOG_INFO(MODULE, "request %s (reservation %llu) done: %u tokens", r->request_id,
                    (unsigned long long)r->id, r->generated);
    } else {
        if (reason != FAIL_CANCELLED)
            atomic_fetch_add(&w->failures, 1);
        fy_metric_inc(w->m_fail[reason]);
        FY_LOG_INFO(MODULE, "request %s (reservation %llu) ended: %s: %s", r->request_id,
                    (unsigned long long)r->id, rpc_code_name(code), msg != NULL ? msg : "");
    }
    if (r->call != NULL)
        rpc_call_finish(r->call, code, code == RPC_CODE_OK ? NULL : msg);
    mdl_sampler_destroy(r->sampler);
    mdl_schema_destroy(r->schema);
    free(r->forced);
    free(r);
    update_gauges(w);
}

static void end_status(decode_worker_t *w, req_t *r, fy_status_t st, const char *msg,
                       fail_reason_t reason)
{
    char buf[200];
    snprintf(buf, sizeof(buf), "%s%s%s", msg != NULL ? msg : "", msg != NULL ? ": " : "",
             fy_status_str(st));
    req_end(w, r, rpc_code_from_status(st), buf, reason);
}

/* ------------------------------------------------------------------------------------------ */
/* kvlink thread: frames in, placement, lease expiry                                            */
/* ------------------------------------------------------------------------------------------ */

/* Queues a command for the kvlink thread; false once that thread has stopped taking them (the
 * caller then owns c still). The wake-up is sent under the lock, so it never reaches a closed
 * handle. */
static bool kv_post(decode_worker_t *w, kv_cmd_t *c)
{
    pthread_mutex_lock(&w->mu);
    bool ok = !w->kv_closed;
    if (ok) {
        c->next = w->cmds;
        w->cmds = c;
        uv_async_send(&w->kv_async);
    }
    pthread_mutex_unlock(&w->mu);
    return ok;
}

/* Fails the transfer of r (kvlink thread, before kv_done): on_recv_end follows and ends r. */
static void kv_fail(decode_worker_t *w, req_t *r, fy_status_t st, fail_reason_t reason,
                    const char *msg)
{
    if (r->fail_st == FY_OK) {
        r->fail_st = st;
        r->fail_reason = reason;
        snprintf(r->fail_msg, sizeof(r->fail_msg), "%s", msg);
    }
    if (r->recv_open) {
        fy_status_t st2 = r->pair != NULL ? kvlink_nccl_recv_cancel(r->pair, r->id)
                                          : kvlink_recv_cancel(w->link, r->id);
        if (st2 == FY_OK)
            return; // on_recv_end(CANCELLED) ends it
        r->recv_open = false;
    }
    end_status(w, r, r->fail_st, r->fail_msg, r->fail_reason);
}

/* Looks up r for the kvlink thread: present and still receiving. */
static req_t *kv_find(decode_worker_t *w, uint64_t id)
{
    pthread_mutex_lock(&w->mu);
    req_t *r = find_locked(w, id);
    if (r != NULL && r->kv_done)
        r = NULL;
    pthread_mutex_unlock(&w->mu);
    return r;
}

static fy_status_t place_frame(decode_worker_t *w, req_t *r, uint32_t layer, const void *data,
                               const void *dev, size_t len, fail_reason_t *reason_p, char *msg,
                               size_t msg_len)
{
    kvc_frame_t f;
    fy_status_t st = kvc_frame_parse(data, len, &f);
    if (st != FY_OK) {
        *reason_p = FAIL_CORRUPT_FRAME;
        snprintf(msg, msg_len, "layer %u: invalid frame", layer);
        return st == FY_ERR_CORRUPT || st == FY_ERR_TRUNCATED ? st : FY_ERR_CORRUPT;
    }
    *reason_p = FAIL_PLACEMENT;
    if (f.layer != layer || f.n_layers != (uint32_t)w->cfg->n_layers ||
        f.n_kv_heads != (uint32_t)w->cfg->n_kv_heads ||
        f.head_dim != (uint32_t)w->cfg->head_dim) {
        snprintf(msg, msg_len, "frame of layer %u/%u, %u kv heads x %u does not fit the model",
                 f.layer, f.n_layers, f.n_kv_heads, f.head_dim);
        return FY_ERR_MISMATCH;
    }
    if (f.model_fingerprint != w->fingerprint) {
        snprintf(msg, msg_len, "frame from another model (fingerprint %016llx)",
                 (unsigned long long)f.model_fingerprint);
        return FY_ERR_MISMATCH;
    }
    if (f.n_tokens == 0 || f.n_tokens >= (uint32_t)w->cfg->n_ctx_train ||
        (r->n_tokens != 0 && f.n_tokens != r->n_tokens)) {
        snprintf(msg, msg_len, "layer %u: %u tokens (prompt has %u)", layer, f.n_tokens,
                 r->n_tokens);
        return FY_ERR_MISMATCH;
    }
    uint32_t pages = 0;
    if ((st = kv_pages_needed(w, &f, &pages)) != FY_OK) {
        snprintf(msg, msg_len, "layer %u: page count", layer);
        return st;
    }
    // Within the reservation, else beyond it while the pool has room.
    st = decode_leases_use(w->leases, r->id, pages);
    if (st == FY_ERR_RESOURCE_EXHAUSTED)
        st = decode_leases_grow(w->leases, r->id, pages);
    if (st == FY_OK) // KV is arriving: the lease runs from this frame (decode_leases_renew)
        st = decode_leases_renew(w->leases, r->id, r->lease_ms, fy_clock_ns());
    if (st != FY_OK) {
        *reason_p = FAIL_POOL_FULL;
        snprintf(msg, msg_len, "layer %u: %u pages over the reservation", layer, pages);
        return st;
    }
    if ((st = kv_place(w, r, &f, data, dev, len)) != FY_OK) {
        *reason_p = st == FY_ERR_RESOURCE_EXHAUSTED ? FAIL_POOL_FULL : FAIL_PLACEMENT;
        snprintf(msg, msg_len, "layer %u: placement failed", layer);
        return st;
    }
    r->n_tokens = f.n_tokens;
    r->layers_placed++;
    r->wire_bytes += len;
    fy_metric_add(w->m_wire, (double)len);
    fy_metric_inc(w->m_frames);
    return FY_OK;
}

static void on_frame(kvlink_t *link, uint64_t request_id, uint32_t layer, kvlink_buf_t *buf,
                     const void *data, size_t len, void *arg)
{
    (void)link;
    decode_worker_t *w = arg;
    req_t *r = kv_find(w, request_id);
    if (r == NULL || r->fail_st != FY_OK) {
        kvlink_buf_release(buf);
        return;
    }
    char msg[160] = "";
    fail_reason_t reason = FAIL_PLACEMENT;
    fy_status_t st = FY_OK;
    if (r->sealed) { // opened in place: the buffer is ours until released
        uint8_t *frame = NULL;
        size_t frame_len = 0;
        st = kvlink_unseal(r->kv_key, request_id, layer, (uint8_t *)data, len, &frame, &frame_len);
        if (st != FY_OK) {
            reason = FAIL_CORRUPT_FRAME;
            snprintf(msg, sizeof(msg),
                     "layer %u: sealed frame did not open (another key, or altered)", layer);
        }
        data = frame;
        len = frame_len;
        if (st == FY_OK)
            fy_metric_inc(w->m_opened);
    }
    if (st == FY_OK)
        st = place_frame(w, r, layer, data, NULL, len, &reason, msg, sizeof(msg));
    kvlink_buf_release(buf); // placing copied the bytes
    if (st != FY_OK) {
        FY_LOG_WARN(MODULE, "request %s: %s: %s", r->request_id, msg, fy_status_str(st));
        kv_fail(w, r, st, reason, msg);
    }
}

/* A transfer ended, over the UCX link or a pair. */
static void recv_ended(decode_worker_t *w, uint64_t request_id, fy_status_t st)
{
    req_t *r = kv_find(w, request_id);
    if (r == NULL)
        return;
    r->recv_open = false;
    if (r->fail_st != FY_OK) {
        end_status(w, r, r->fail_st, r->fail_msg, r->fail_reason);
        return;
    }
    if (st != FY_OK) {
        fail_reason_t reason = st == FY_ERR_TIMEOUT     ? FAIL_EXPIRED
                               : st == FY_ERR_CORRUPT   ? FAIL_CORRUPT_FRAME
                               : st == FY_ERR_CANCELLED ? FAIL_CANCELLED
                               : st == FY_ERR_CLOSED    ? FAIL_SHUTDOWN
                                                        : FAIL_TRANSFER;
        end_status(w, r, st, "KV transfer failed", reason);
        return;
    }
    if (r->layers_placed != (uint32_t)w->cfg->n_layers) {
        char msg[96];
        snprintf(msg, sizeof(msg), "KV transfer ended with %u of %d layers", r->layers_placed,
                 w->cfg->n_layers);
        end_status(w, r, FY_ERR_TRUNCATED, msg, FAIL_TRANSFER);
        return;
    }
    // Complete: the lease stops expiring and keeps only the pages in use.
    decode_leases_commit(w->leases, r->id);
    pthread_mutex_lock(&w->mu);
    r->kv_done = true;
    r->ready_deadline_ns = fy_clock_ns() + (uint64_t)r->lease_ms * 1000000ull;
    pthread_mutex_unlock(&w->mu);
    FY_LOG_INFO(MODULE, "request %s: KV complete, %u tokens, %llu wire bytes", r->request_id,
                r->n_tokens, (unsigned long long)r->wire_bytes);
    pthread_cond_broadcast(&w->cond);
    update_gauges(w);
}

static void on_recv_end(kvlink_t *link, uint64_t request_id, fy_status_t st, void *arg)
{
    (void)link;
    recv_ended(arg, request_id, st);
}

/* What senders must match, on the UCX link and on pairs (each with its protocol version). */
static kvlink_compat_t link_compat(const decode_worker_t *w, uint32_t protocol_version)
{
    return (kvlink_compat_t){.protocol_version = protocol_version,
                             .codec_version = KVC_FRAME_VERSION,
                             .page_size = w->p.page_bytes,
                             .model_fingerprint = w->fingerprint};
}

/* ---- Pairs with prefill workers of this node (nccl_link.h) ---- */

static const char *pair_kind(const decode_worker_t *w)
{
    return kvlink_pair_kind_name(w->pairing.kind);
}

static void fetch_free(decode_worker_t *w)
{
    if (w->fetch_locked)
        kvc_cuda_host_unregister(w->fetch);
    free(w->fetch);
    w->fetch = NULL;
    w->fetch_cap = 0;
    w->fetch_locked = false;
}

/* The host copy of frames received into device memory, grown to len (whole MiB): page-locked
 * where the device allows, so that the copy back runs by DMA; pageable otherwise. */
static fy_status_t fetch_grow(decode_worker_t *w, size_t len)
{
    size_t cap = FY_ALIGN_UP(len, (size_t)1 << 20);
    uint8_t *p = NULL;
    if (posix_memalign((void **)&p, 4096, cap) != 0)
        return FY_ERR_NO_MEMORY;
    fetch_free(w);
    w->fetch = p;
    w->fetch_cap = cap;
    w->fetch_locked = kvc_cuda_host_register(p, cap) == FY_OK;
    return FY_OK;
}

static void on_pair_frame(kvlink_nccl_t *pair, uint64_t request_id, uint32_t layer,
                          kvlink_nccl_buf_t *buf, void *data, size_t len, void *arg)
{
    decode_worker_t *w = arg;
    req_t *r = kv_find(w, request_id);
    if (r == NULL || r->fail_st != FY_OK || r->pair != pair) {
        kvlink_nccl_buf_release(buf);
        return;
    }
    char msg[160] = "";
    fail_reason_t reason = FAIL_PLACEMENT;
    const void *host = data, *dev = NULL;
    fy_status_t st = FY_OK;
    if (w->pairing.kind == KVLINK_PAIR_NCCL) {
        // The frame is in device memory: its header, maps and CRC are checked on a host copy,
        // the pages are filled from the device copy.
        if (len > w->fetch_cap)
            st = fetch_grow(w, len);
        if (st == FY_OK)
            st = kvc_gpu_stage_fetch(w->gstage, w->fetch, data, len);
        host = w->fetch;
        dev = data;
        if (st != FY_OK)
            snprintf(msg, sizeof(msg), "layer %u: copy from the pair's memory", layer);
    }
    if (st == FY_OK)
        st = place_frame(w, r, layer, host, dev, len, &reason, msg, sizeof(msg));
    kvlink_nccl_buf_release(buf); // placing copied the bytes
    if (st == FY_OK) {
        fy_metric_inc(w->m_pair_frames);
    } else {
        FY_LOG_WARN(MODULE, "request %s: %s: %s", r->request_id, msg, fy_status_str(st));
        kv_fail(w, r, st, reason, msg);
    }
}

static void on_pair_recv_end(kvlink_nccl_t *pair, uint64_t request_id, fy_status_t st, void *arg)
{
    (void)pair;
    recv_ended(arg, request_id, st);
}

static pair_slot_t *pair_slot_of(decode_worker_t *w, const kvlink_nccl_t *pair)
{
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        if (w->pairs[i].pair != NULL && w->pairs[i].pair == pair)
            return &w->pairs[i];
    }
    return NULL;
}

static void pairs_gauge(decode_worker_t *w)
{
    int up = 0;
    for (size_t i = 0; i < MAX_PAIRS; i++)
        up += w->pairs[i].pair != NULL && w->pairs[i].up && !w->pairs[i].failed;
    fy_metric_set(w->m_pairs_up, up);
}

static void on_pair_peer(kvlink_nccl_t *pair, fy_status_t st, const char *message, void *arg)
{
    decode_worker_t *w = arg;
    pair_slot_t *ps = pair_slot_of(w, pair);
    if (ps == NULL)
        return;
    if (st == FY_OK) {
        FY_LOG_INFO(MODULE, "%s pair %llu with %s is up", pair_kind(w),
                    (unsigned long long)ps->generation, ps->peer);
        ps->up = true;
        ps->failures = 0;
        pairs_gauge(w);
        return;
    }
    // Its transfers fail on their own (FY_ERR_UNAVAILABLE); a later reservation for this peer
    // sets up a new pair, and they go over UCX meanwhile. Set-ups that keep failing (a peer
    // that cannot join) are retried less and less often: 1 s, doubling up to a minute.
    ps->failed = true;
    ps->failures = ps->up ? 1 : ps->failures + 1;
    ps->retry_ns = fy_clock_ns() + FY_MIN(1000ull << FY_MIN(ps->failures - 1, 6u), 60000ull) *
                                       1000000ull;
    pairs_gauge(w);
    FY_LOG_WARN(MODULE, "%s pair %llu with %s failed: %s%s%s", pair_kind(w),
                (unsigned long long)ps->generation, ps->peer, fy_status_str(st),
                message != NULL ? ": " : "", message != NULL ? message : "");
}

static void on_pair_idle(uv_idle_t *h);
static bool is_wildcard(const char *host);

/* Moves the pairs; while frames move on one, at every loop turn (a round completes as soon as
 * both ends posted theirs), otherwise every millisecond, which keeps a waiting transfer from
 * taking a core from the model (on a 2-core machine, spinning for every open request doubled
 * TTFT and TPOT of a socket pair). */
static void pairs_progress(decode_worker_t *w)
{
    bool busy = false;
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        if (w->pairs[i].pair != NULL && !w->pairs[i].failed) {
            kvlink_nccl_progress(w->pairs[i].pair);
            busy = busy || kvlink_nccl_moving(w->pairs[i].pair);
        }
    }
    if (busy) {
        if (!uv_is_active((uv_handle_t *)&w->pair_idle))
            uv_idle_start(&w->pair_idle, on_pair_idle);
    } else if (uv_is_active((uv_handle_t *)&w->pair_idle)) {
        uv_idle_stop(&w->pair_idle);
    }
}

static void on_pair_tick(uv_timer_t *t)
{
    pairs_progress(t->data);
}

static void on_pair_idle(uv_idle_t *h)
{
    pairs_progress(h->data);
}

/* The pair with peer: the live one, else a new one (replacing a failed one). NULL when none
 * can be made (logged). */
static pair_slot_t *pair_for(decode_worker_t *w, const char *peer)
{
    pair_slot_t *free_slot = NULL;
    uint32_t failures = 0;
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        pair_slot_t *ps = &w->pairs[i];
        if (ps->pair != NULL && strcmp(ps->peer, peer) == 0) {
            if (!ps->failed)
                return ps;
            if (fy_clock_ns() < ps->retry_ns)
                return NULL;
            failures = ps->failures;
            kvlink_nccl_destroy(ps->pair); // its transfers have all ended
            memset(ps, 0, sizeof(*ps));
        }
        if (ps->pair == NULL && free_slot == NULL)
            free_slot = ps;
    }
    for (size_t i = 0; i < MAX_PAIRS && free_slot == NULL; i++) {
        // Full: a failed pair's slot (a worker that went away) is reused.
        if (w->pairs[i].failed) {
            kvlink_nccl_destroy(w->pairs[i].pair);
            memset(&w->pairs[i], 0, sizeof(w->pairs[i]));
            free_slot = &w->pairs[i];
        }
    }
    if (free_slot == NULL) {
        FY_LOG_WARN(MODULE, "no pair with %s: %d pairs already", peer, MAX_PAIRS);
        return NULL;
    }
    pair_slot_t *ps = free_slot;
    kvlink_nccl_params_t np;
    kvlink_nccl_params_default(&np);
    np.compat = link_compat(w, KVLINK_NCCL_PROTOCOL_VERSION);
    np.role = KVLINK_NCCL_RECEIVER;
    np.idle_round_us = KVLINK_PAIR_IDLE_ROUND_US;
    np.device = 0; // the worker's GPU: the first visible one, as for the model
    np.recv_pool_bytes = (size_t)w->p.recv_buffer;
    np.max_frame_bytes = (size_t)w->p.recv_buffer;
    np.on_frame = on_pair_frame;
    np.on_recv_end = on_pair_recv_end;
    np.on_peer = on_pair_peer;
    np.cb_arg = w;
    // The socket link listens where the UCX listener does, reachable as advertised.
    const char *host = is_wildcard(w->kv_host) ? w->advertise_host : w->kv_host;
    fy_status_t st = kvlink_pair_id_create(w->pairing.kind, host, ps->id);
    if (st == FY_OK)
        st = kvlink_pair_create(w->pairing.kind, ps->id, sizeof(ps->id), &np, &ps->pair);
    if (st != FY_OK) {
        FY_LOG_WARN(MODULE, "no %s pair with %s: %s", pair_kind(w), peer,
                    fy_status_str(st));
        memset(ps, 0, sizeof(*ps));
        return NULL;
    }
    snprintf(ps->peer, sizeof(ps->peer), "%s", peer);
    ps->failures = failures;
    ps->generation = ++w->pair_generation;
    fy_metric_inc(w->m_pairs);
    FY_LOG_INFO(MODULE, "%s pair %llu with %s: set-up started", pair_kind(w),
                (unsigned long long)ps->generation, peer);
    if (!uv_is_active((uv_handle_t *)&w->pair_timer))
        uv_timer_start(&w->pair_timer, on_pair_tick, 1, 1);
    return ps;
}

static void pairs_destroy(decode_worker_t *w)
{
    for (size_t i = 0; i < MAX_PAIRS; i++) {
        kvlink_nccl_destroy(w->pairs[i].pair); // open transfers end with FY_ERR_CLOSED
        memset(&w->pairs[i], 0, sizeof(w->pairs[i]));
    }
}

static void run_cmd(decode_worker_t *w, kv_cmd_t *c)
{
    req_t *r = kv_find(w, c->id);
    if (c->kind == CMD_EXPECT) {
        fy_status_t st = r == NULL ? FY_ERR_NOT_FOUND : FY_OK;
        if (st == FY_OK && w->link == NULL) { // stopping: the listener is gone
            end_status(w, r, FY_ERR_UNAVAILABLE, "decode worker shutting down", FAIL_SHUTDOWN);
            st = FY_ERR_UNAVAILABLE;
        }
        pair_slot_t *ps = NULL;
        if (st == FY_OK && c->pair_peer[0] != '\0' && w->pairing.kind != KVLINK_PAIR_OFF)
            ps = pair_for(w, c->pair_peer);
        bool via_pair = false;
        if (ps != NULL && kvlink_nccl_ready(ps->pair)) {
            // No transfer deadline, as below.
            kvlink_nccl_recv_params_t np = {.credit_bytes = c->credit, .deadline_ns = 0};
            fy_status_t pst = kvlink_nccl_recv_expect(ps->pair, r->id, &np);
            if (pst == FY_OK) {
                via_pair = true; // the pair timer posts the round that catches its OPEN
                r->pair = ps->pair;
                r->recv_open = true;
            } else {
                FY_LOG_DEBUG(MODULE, "request %s: not over the pair: %s", r->request_id,
                             fy_status_str(pst));
            }
        }
        if (st == FY_OK && !via_pair) {
            kvlink_recv_params_t rp;
            kvlink_recv_params_default(w->link, &rp);
            rp.credit_bytes = c->credit;
            // No transfer deadline: the lease sweep fails a transfer lease_ms after its last
            // frame (the lease is renewed per frame), which cancels the receive.
            rp.deadline_ns = 0;
            st = kvlink_recv_expect(w->link, r->id, &rp);
            if (st == FY_OK) {
                r->recv_open = true;
            } else {
                char msg[96];
                snprintf(msg, sizeof(msg), "no receive window of %llu bytes",
                         (unsigned long long)c->credit);
                fy_metric_inc(w->m_refused);
                end_status(w, r, st, msg, FAIL_POOL_FULL);
            }
        }
        if (st == FY_OK) {
            Ferry__V1__ReserveKVResponse resp = FERRY__V1__RESERVE_KVRESPONSE__INIT;
            resp.reservation_id = c->id;
            resp.credit_bytes = c->credit;
            if (ps != NULL) {
                resp.pair_generation = ps->generation;
                resp.via_pair = via_pair;
                if (!kvlink_nccl_ready(ps->pair)) { // the prefill worker joins with it
                    resp.pair_id.data = ps->id;
                    resp.pair_id.len = sizeof(ps->id);
                }
            }
            rpc_call_send(c->call, &resp.base);
            rpc_call_finish(c->call, RPC_CODE_OK, NULL);
        } else {
            rpc_call_finish(c->call, rpc_code_from_status(st), fy_status_str(st));
        }
    } else if (r != NULL) {
        kv_fail(w, r, c->st, c->reason, c->st == FY_ERR_TIMEOUT ? "lease expired" : "cancelled");
    }
    free(c);
}

/* Runs the queued commands; returns whether the thread is asked to stop. */
static bool run_cmds(decode_worker_t *w)
{
    pthread_mutex_lock(&w->mu);
    kv_cmd_t *list = w->cmds;
    w->cmds = NULL;
    bool stop = w->kv_stop;
    pthread_mutex_unlock(&w->mu);
    // Oldest first.
    kv_cmd_t *rev = NULL;
    while (list != NULL) {
        kv_cmd_t *n = list->next;
        list->next = rev;
        rev = list;
        list = n;
    }
    while (rev != NULL) {
        kv_cmd_t *n = rev->next;
        run_cmd(w, rev);
        rev = n;
    }
    return stop;
}

static void on_kv_async(uv_async_t *a)
{
    decode_worker_t *w = a->data;
    if (run_cmds(w))
        uv_stop(&w->kv_loop);
}

static void on_kv_sweep(uv_timer_t *t)
{
    decode_worker_t *w = t->data;
    uint64_t now = fy_clock_ns();
    // Leases whose KV did not arrive in time.
    decode_lease_t expired[64];
    size_t n = decode_leases_expire(w->leases, now, expired, FY_ARRAY_SIZE(expired));
    for (size_t i = 0; i < FY_MIN(n, FY_ARRAY_SIZE(expired)); i++) {
        req_t *r = kv_find(w, expired[i].id);
        if (r != NULL)
            kv_fail(w, r, FY_ERR_TIMEOUT, FAIL_EXPIRED, "lease expired before the KV arrived");
    }
    // Complete KV nobody asked to decode, and Decode calls the client gave up on while the
    // KV was still on its way.
    for (;;) {
        req_t *victim = NULL;
        pthread_mutex_lock(&w->mu);
        for (req_t *r = w->reqs; r != NULL && victim == NULL; r = r->next) {
            if (r->kv_done && r->call == NULL && !r->ending && now > r->ready_deadline_ns) {
                r->ending = true;
                victim = r;
            }
        }
        pthread_mutex_unlock(&w->mu);
        if (victim == NULL)
            break;
        req_end(w, victim, RPC_CODE_DEADLINE_EXCEEDED, "no Decode call for the received KV",
                FAIL_EXPIRED);
    }
    pthread_mutex_lock(&w->mu);
    uint64_t waiting[64];
    size_t n_waiting = 0;
    for (req_t *r = w->reqs; r != NULL; r = r->next) {
        if (!r->kv_done && r->call != NULL && rpc_call_is_cancelled(r->call) &&
            n_waiting < FY_ARRAY_SIZE(waiting))
            waiting[n_waiting++] = r->id;
    }
    pthread_mutex_unlock(&w->mu);
    for (size_t i = 0; i < n_waiting; i++) {
        req_t *r = kv_find(w, waiting[i]);
        if (r != NULL)
            kv_fail(w, r, FY_ERR_CANCELLED, FAIL_CANCELLED, "client cancelled");
    }
    update_gauges(w);
}

/* Page-locks the receive pool, so that frames go to the GPU by DMA straight from where they
 * were received (kvc_gpu_stage_place); pageable memory makes the driver copy them through
 * staging buffers first, on the kvlink thread, while the next frames wait. Optional: without
 * it uploads still work, only slower. */
static void pin_recv_pool(decode_worker_t *w)
{
    void *pool = NULL;
    size_t len = 0;
    kvlink_recv_pool(w->link, &pool, &len);
    if (pool == NULL)
        return;
    fy_status_t st = kvc_cuda_host_register(pool, len);
    if (st == FY_OK) {
        w->pinned = pool;
        fy_metric_set(w->m_locked, (double)len);
        FY_LOG_INFO(MODULE, "receive pool page-locked for uploads (%zu MiB)", len >> 20);
    } else {
        FY_LOG_WARN(MODULE,
                    "receive pool of %zu MiB not page-locked (%s): uploads go through "
                    "the driver's staging copies",
                    len >> 20, fy_status_str(st));
    }
}

static void *kv_main(void *arg)
{
    decode_worker_t *w = arg;
    uv_loop_init(&w->kv_loop);
    kvlink_ctx_params_t kcp;
    kvlink_ctx_params_default(&kcp);
    kcp.tls = w->ucx_tls[0] ? w->ucx_tls : NULL;
    kcp.net_devices = w->ucx_devices[0] ? w->ucx_devices : NULL;
    fy_status_t st = kvlink_ctx_create(&kcp, &w->kv_ctx);
    if (st == FY_OK) {
        kvlink_params_t kp;
        kvlink_params_default(&kp);
        kp.compat = link_compat(w, KVLINK_PROTOCOL_VERSION);
        kp.recv_pool_bytes = (size_t)w->p.recv_buffer;
        kp.max_frame_bytes = (size_t)w->p.recv_buffer;
        kp.verify_crc = false; // kvc_frame_parse checks the frame's own CRC32C
        kp.on_frame = on_frame;
        kp.on_recv_end = on_recv_end;
        kp.cb_arg = w;
        st = kvlink_create(w->kv_ctx, &w->kv_loop, &kp, &w->link);
    }
    if (st == FY_OK && w->gstage != NULL)
        pin_recv_pool(w);
    uint16_t port = 0;
    if (st == FY_OK)
        st = kvlink_listen(w->link, w->kv_host, (uint16_t)w->p.kv_port, &port);
    uv_async_init(&w->kv_loop, &w->kv_async, on_kv_async);
    w->kv_async.data = w;
    uv_timer_init(&w->kv_loop, &w->kv_sweep);
    w->kv_sweep.data = w;
    uv_timer_init(&w->kv_loop, &w->pair_timer);
    w->pair_timer.data = w;
    uv_idle_init(&w->kv_loop, &w->pair_idle);
    w->pair_idle.data = w;
    pthread_mutex_lock(&w->mu);
    w->kv_port = port;
    w->kv_up = st == FY_OK ? 1 : -1;
    if (st != FY_OK) {
        w->start_st = st;
        snprintf(w->start_err, sizeof(w->start_err), "kvlink listener on %s:%d: %s",
                 w->kv_host, w->p.kv_port, fy_status_str(st));
    }
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    if (st == FY_OK) {
        uv_timer_start(&w->kv_sweep, on_kv_sweep, SWEEP_MS, SWEEP_MS);
        uv_run(&w->kv_loop, UV_RUN_DEFAULT);
    }
    // Stopping: open transfers end with FY_ERR_CLOSED (on_recv_end ends their requests).
    uv_timer_stop(&w->kv_sweep);
    uv_timer_stop(&w->pair_timer);
    uv_idle_stop(&w->pair_idle);
    pairs_destroy(w);
    kvc_cuda_host_unregister(w->pinned); // placements ran on this thread: none is left
    w->pinned = NULL;
    fy_metric_set(w->m_locked, 0);
    kvlink_destroy(w->link);
    w->link = NULL;
    run_cmds(w); // commands that came meanwhile (answered as failures)
    pthread_mutex_lock(&w->mu);
    w->kv_closed = true;
    pthread_mutex_unlock(&w->mu);
    run_cmds(w);
    uv_close((uv_handle_t *)&w->kv_sweep, NULL);
    uv_close((uv_handle_t *)&w->pair_timer, NULL);
    uv_close((uv_handle_t *)&w->pair_idle, NULL);
    uv_close((uv_handle_t *)&w->kv_async, NULL);
    uv_run(&w->kv_loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->kv_loop);
    kvlink_ctx_destroy(w->kv_ctx);
    w->kv_ctx = NULL;
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Scheduler thread: continuous batching                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Requests ready to run (KV complete, Decode call present), not yet in the batch. */
static void collect_joiners_locked(decode_worker_t *w)
{
    for (req_t *r = w->reqs; r != NULL && w->n_batch < w->p.max_batch; r = r->next) {
        if (r->kv_done && r->call != NULL && !r->running && !r->ending) {
            r->running = true;
            r->next_token = (int32_t)r->first_token;
            r->pos = (int32_t)r->n_tokens;
            r->start_ns = fy_clock_ns();
            w->batch[w->n_batch++] = r;
        }
    }
}

static void batch_remove(decode_worker_t *w, int i)
{
    w->batch[i] = w->batch[--w->n_batch];
    atomic_store(&w->running_now, (unsigned)w->n_batch);
}

/* Leaves the batch and ends. */
static void leave(decode_worker_t *w, int i, int code, const char *msg, fail_reason_t reason)
{
    req_t *r = w->batch[i];
    batch_remove(w, i);
    req_end(w, r, code, msg, reason);
}

static void *sched_main(void *arg)
{
    decode_worker_t *w = arg;
    int n_vocab = w->cfg->n_vocab;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        for (;;) {
            collect_joiners_locked(w);
            if (w->n_batch > 0 || w->stopping)
                break;
            pthread_cond_wait(&w->cond, &w->mu);
        }
        bool stopping = w->stopping;
        pthread_mutex_unlock(&w->mu);
        atomic_store(&w->running_now, (unsigned)w->n_batch);
        if (stopping) {
            while (w->n_batch > 0)
                leave(w, 0, RPC_CODE_UNAVAILABLE, "decode worker shutting down", FAIL_SHUTDOWN);
            return NULL;
        }
        // Leave between steps: cancelled (Cancel RPC or the client went away), or out of
        // room for this step's tail pages.
        for (int i = 0; i < w->n_batch;) {
            req_t *r = w->batch[i];
            pthread_mutex_lock(&w->mu);
            bool cancel = r->cancel;
            pthread_mutex_unlock(&w->mu);
            if (cancel || rpc_call_is_cancelled(r->call)) {
                leave(w, i, RPC_CODE_CANCELLED, "cancelled", FAIL_CANCELLED);
                continue;
            }
            uint32_t pages = kv_step_pages(w, r);
            if (pages > 0 && decode_leases_grow(w->leases, r->id, pages) != FY_OK) {
                leave(w, i, RPC_CODE_RESOURCE_EXHAUSTED, "KV pool full during decode",
                      FAIL_POOL_FULL);
                continue;
            }
            i++;
        }
        if (w->n_batch == 0)
            continue;
        for (int i = 0; i < w->n_batch; i++) {
            w->tokens[i] = w->batch[i]->next_token;
            w->positions[i] = w->batch[i]->pos;
        }
        uint64_t t0 = fy_clock_ns();
        fy_status_t st = kv_decode(w);
        uint64_t t1 = fy_clock_ns();
        if (st != FY_OK) {
            FY_LOG_ERROR(MODULE, "decode step of %d sequences failed: %s", w->n_batch,
                         fy_status_str(st));
            while (w->n_batch > 0)
                leave(w, 0, rpc_code_from_status(st), "decode step failed",
                      st == FY_ERR_RESOURCE_EXHAUSTED ? FAIL_POOL_FULL : FAIL_INTERNAL);
            continue;
        }
        atomic_fetch_add(&w->steps, 1);
        fy_metric_observe(w->m_step, (double)(t1 - t0) / 1e9);
        fy_metric_observe(w->m_batch, w->n_batch);
        // Row i of the logits belongs to batch[i]: finished sequences are only marked here
        // and leave after the loop, so no sequence moves to another row meanwhile.
        int n_rows = w->n_batch;
        for (int i = 0; i < n_rows; i++) {
            req_t *r = w->batch[i];
            float *row = w->logits + (size_t)i * n_vocab;
            if (r->logprobs) // the model's distribution, before the sampler's settings
                memcpy(w->raw_row, row, (size_t)n_vocab * sizeof(float));
            int32_t tok = mdl_sampler_sample(r->sampler, row);
            // Completion token already_sent + generated: a forced one replaces the draw (made
            // all the same, so that a seeded stream stays in step) and no stop token ends it.
            const uint32_t idx = r->already_sent + r->generated;
            const bool forced = idx < r->n_forced;
            if (forced)
                tok = (int32_t)r->forced[idx];
            mdl_sampler_accept_output(r->sampler, tok);
            if (r->generated == 0)
                r->first_step_ns = t1;
            r->pos++;
            r->next_token = tok;
            // Stop tokens (EOS unless ignored, the request's stop ids) end the completion
            // without being part of it, as `ferry generate` prints them.
            if (!forced && mdl_sampler_done(r->sampler, tok)) {
                send_final(r, FERRY__V1__FINISH_REASON__FINISH_REASON_STOP);
                r->finished = true;
                continue;
            }
            r->generated++;
            atomic_fetch_add(&w->tokens_generated, 1);
            fy_metric_inc(w->m_tokens);
            Ferry__V1__GenerateResponse resp = FERRY__V1__GENERATE_RESPONSE__INIT;
            uint32_t id = (uint32_t)tok;
            resp.request_id = r->request_id;
            if (r->return_ids) {
                resp.n_token_ids = 1;
                resp.token_ids = &id;
            }
            Ferry__V1__TokenLogprob lp = FERRY__V1__TOKEN_LOGPROB__INIT, *lp_p = &lp;
            Ferry__V1__TopLogprob top[MDL_MAX_TOP_LOGPROBS], *top_p[MDL_MAX_TOP_LOGPROBS];
            if (r->logprobs) {
                int32_t top_ids[MDL_MAX_TOP_LOGPROBS];
                float top_lps[MDL_MAX_TOP_LOGPROBS];
                lp.token_id = id;
                lp.logprob = mdl_logprobs(w->raw_row, n_vocab, tok, r->n_top, top_ids, top_lps);
                for (int k = 0; k < r->n_top; k++) {
                    ferry__v1__top_logprob__init(&top[k]);
                    top[k].token_id = (uint32_t)top_ids[k];
                    top[k].logprob = top_lps[k];
                    top_p[k] = &top[k];
                }
                lp.top = top_p;
                lp.n_top = (size_t)r->n_top;
                resp.logprobs = &lp_p;
                resp.n_logprobs = 1;
            }
            rpc_call_send(r->call, &resp.base);
            if (r->already_sent + r->generated >= r->limit || r->pos + 1 >= w->cfg->n_ctx_train) {
                send_final(r, FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH);
                r->finished = true;
            }
        }
        for (int i = 0; i < w->n_batch;) {
            if (w->batch[i]->finished)
                leave(w, i, RPC_CODE_OK, NULL, FAIL_INTERNAL);
            else
                i++;
        }
        update_gauges(w);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* RPC thread: ferry.v1.Worker and Ferry.Health                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Pages a reservation promises: the prompt's pages, sized by the expected wire bytes when
 * given (else as FP16), plus the FP16 tail of max_new tokens. */
static uint64_t pages_for(const decode_worker_t *w, uint32_t prompt, uint32_t max_new,
                          uint64_t wire_bytes)
{
    uint64_t lists = (uint64_t)w->cfg->n_layers * w->cfg->n_kv_heads;
    uint64_t tpp = w->tail_page_tokens;
    // Mixed options: each option of a (layer, head) may end in a partly filled page, and an
    // option never takes more bytes per token than FP16.
    uint64_t fp16 = lists * ((prompt + tpp - 1) / tpp);
    uint64_t prompt_pages = fp16;
    if (wire_bytes > 0) {
        uint64_t payload = w->p.page_bytes - KVC_PAGE_HEADER_BYTES;
        uint64_t est = (wire_bytes + wire_bytes / 8 + payload - 1) / payload + lists;
        prompt_pages = FY_MIN(fp16 + lists * (KVC_OPT_DROP - 1), est);
    }
    // Appends fill the last FP16 page first, so max_new tokens never take more than this.
    return prompt_pages + lists * ((max_new + tpp - 1) / tpp);
}

/* Largest frame of one layer of a prompt (everything FP16) plus slack for headers and maps. */
static uint64_t frame_bound(const decode_worker_t *w, uint32_t prompt)
{
    uint64_t per_head = (uint64_t)prompt * (4ull * w->cfg->head_dim + 1) + 256;
    return KVC_FRAME_HEADER_BYTES + 4096 + (uint64_t)w->cfg->n_kv_heads * per_head;
}

static void h_reserve(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    decode_worker_t *w = arg;
    const Ferry__V1__ReserveKVRequest *req = (const Ferry__V1__ReserveKVRequest *)m;
    if (req->request_id == NULL || req->request_id[0] == '\0' ||
        strlen(req->request_id) >= sizeof(((req_t *)0)->request_id)) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "request_id: 1..63 bytes");
        return;
    }
    if (req->prompt_tokens == 0 || req->prompt_tokens >= (uint32_t)w->cfg->n_ctx_train) {
        rpc_call_finish(call, RPC_CODE_OUT_OF_RANGE, "prompt_tokens outside the context");
        return;
    }
    uint32_t max_new = req->max_new_tokens ? req->max_new_tokens : w->p.default_max_tokens;
    max_new = FY_MIN(max_new, (uint32_t)w->cfg->n_ctx_train - req->prompt_tokens);
    uint32_t lease_ms = req->lease_ms ? req->lease_ms : w->p.default_lease_ms;
    uint64_t credit = frame_bound(w, req->prompt_tokens);
    if (credit > w->p.recv_buffer) {
        fy_metric_inc(w->m_refused);
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED,
                        "a layer of this prompt exceeds the receive buffer");
        return;
    }
    // Two layers in flight when the buffer allows: layer l+1 travels while l is placed.
    credit = FY_MIN(2 * credit, w->p.recv_buffer / 2 > credit ? w->p.recv_buffer / 2 : credit);
    if (req->kv_key.len != 0 && req->kv_key.len != KVLINK_SEAL_KEY_BYTES) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "kv_key: 32 bytes, or none");
        return;
    }
    uint64_t pages = pages_for(w, req->prompt_tokens, max_new, req->expected_wire_bytes);
    req_t *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    pthread_mutex_lock(&w->mu);
    fy_status_t st = w->draining ? FY_ERR_UNAVAILABLE : FY_OK;
    if (st == FY_OK)
        st = decode_leases_reserve(w->leases, req->request_id, pages, lease_ms, fy_clock_ns(),
                                   &r->id);
    if (st == FY_OK) {
        snprintf(r->request_id, sizeof(r->request_id), "%s", req->request_id);
        r->prompt_tokens = req->prompt_tokens;
        r->max_new_tokens = max_new;
        r->lease_ms = lease_ms;
        r->sealed = req->kv_key.len == KVLINK_SEAL_KEY_BYTES;
        if (r->sealed)
            memcpy(r->kv_key, req->kv_key.data, KVLINK_SEAL_KEY_BYTES);
        r->next = w->reqs;
        w->reqs = r;
        w->n_reqs++;
    }
    pthread_mutex_unlock(&w->mu);
    if (st != FY_OK) {
        free(r);
        if (st == FY_ERR_RESOURCE_EXHAUSTED)
            fy_metric_inc(w->m_refused);
        const char *msg = st == FY_ERR_UNAVAILABLE        ? "draining"
                          : st == FY_ERR_RESOURCE_EXHAUSTED ? "KV page pool full"
                          : st == FY_ERR_EXISTS            ? "request id already reserved"
                                                           : fy_status_str(st);
        FY_LOG_INFO(MODULE, "reserve %s (%llu pages): refused: %s", req->request_id,
                    (unsigned long long)pages, msg);
        rpc_call_finish(call, rpc_code_from_status(st), msg);
        return;
    }
    fy_metric_inc(w->m_reserved);
    FY_LOG_INFO(MODULE, "reserve %s: reservation %llu, %llu pages, lease %u ms", r->request_id,
                (unsigned long long)r->id, (unsigned long long)pages, lease_ms);
    kv_cmd_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        pthread_mutex_lock(&w->mu);
        r->ending = true;
        pthread_mutex_unlock(&w->mu);
        req_end(w, r, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory", FAIL_INTERNAL);
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    c->kind = CMD_EXPECT;
    c->id = r->id;
    c->call = call;
    c->credit = credit;
    // A peer id that does not fit is no worker's: no pairing for it.
    if (req->pair_peer != NULL && strlen(req->pair_peer) < sizeof(c->pair_peer))
        snprintf(c->pair_peer, sizeof(c->pair_peer), "%s", req->pair_peer);
    if (!kv_post(w, c)) { // the kvlink thread answers once the transfer is expected
        free(c);
        pthread_mutex_lock(&w->mu);
        r->ending = true;
        pthread_mutex_unlock(&w->mu);
        req_end(w, r, RPC_CODE_UNAVAILABLE, "decode worker shutting down", FAIL_SHUTDOWN);
        rpc_call_finish(call, RPC_CODE_UNAVAILABLE, "decode worker shutting down");
        return;
    }
    update_gauges(w);
}

/* The request's sampler; schema (borrowed, may be NULL) guides it. */
static fy_status_t sampler_for(decode_worker_t *w, const Ferry__V1__DecodeRequest *req,
                               const mdl_schema_t *schema, mdl_sampler_t **s_p)
{
    mdl_sampler_params_t sp;
    mdl_sampler_params_default(&sp);
    const Ferry__V1__SamplingParams *in = req->sampling;
    sp.temperature = in != NULL ? in->temperature : 0.0f;
    sp.top_k = in != NULL ? (int)FY_MIN(in->top_k, (uint32_t)w->cfg->n_vocab) : 0;
    sp.top_p = in != NULL && in->top_p > 0.0f && in->top_p < 1.0f ? in->top_p : 1.0f;
    sp.repetition_penalty =
        in != NULL && in->repetition_penalty > 0.0f ? in->repetition_penalty : 1.0f;
    if (in != NULL && in->seed != 0)
        sp.seed = in->seed;
    if (in != NULL) { // mdl_sampler_create checks the ranges and ids
        sp.json = in->json_object ? w->json : NULL;
        if (schema != NULL) {
            sp.json = w->json;
            sp.schema = schema;
        }
        sp.presence_penalty = in->presence_penalty;
        sp.frequency_penalty = in->frequency_penalty;
        if (in->n_logit_bias > MDL_MAX_LOGIT_BIAS)
            return FY_ERR_OUT_OF_RANGE;
        sp.n_logit_bias = (int)in->n_logit_bias;
        for (size_t i = 0; i < in->n_logit_bias; i++) {
            sp.bias_token[i] = (int32_t)FY_MIN(in->logit_bias[i]->token_id, (uint32_t)INT32_MAX);
            sp.bias[i] = in->logit_bias[i]->bias;
        }
    }
    sp.max_tokens = 0; // the scheduler counts against its own limit
    sp.n_stop = 0;
    int32_t eos = mdl_tokenizer_eos(mdl_model_tokenizer(w->model));
    if (eos >= 0 && (in == NULL || !in->ignore_eos))
        sp.stop[sp.n_stop++] = eos;
    size_t n_ids = in != NULL ? in->n_stop_token_ids : 0;
    if (n_ids > (size_t)(MDL_MAX_STOP - sp.n_stop))
        return FY_ERR_OUT_OF_RANGE;
    for (size_t i = 0; i < n_ids; i++) {
        if (in->stop_token_ids[i] >= (uint32_t)w->cfg->n_vocab)
            return FY_ERR_OUT_OF_RANGE;
        sp.stop[sp.n_stop++] = (int32_t)in->stop_token_ids[i];
    }
    mdl_sampler_t *s;
    fy_status_t st = mdl_sampler_create(&sp, w->cfg->n_vocab, &s);
    if (st != FY_OK)
        return st;
    for (size_t i = 0; i < req->n_prompt_token_ids; i++)
        mdl_sampler_accept(s, (int32_t)req->prompt_token_ids[i]);
    mdl_sampler_accept_output(s, (int32_t)req->first_token_id);
    // The prefill worker drew the tokens the client has from the same seed, one random draw
    // per sampled token: skip as many draws so this stream continues the request's, and a
    // seeded run gives the tokens a local run with that seed gives.
    if (sp.temperature > 0.0f && req->completion_tokens_sent > 0) {
        float *dummy = calloc((size_t)w->cfg->n_vocab, sizeof(float));
        if (dummy == NULL) {
            mdl_sampler_destroy(s);
            return FY_ERR_NO_MEMORY;
        }
        for (uint32_t i = 0; i < FY_MIN(req->completion_tokens_sent, 4096u); i++) {
            memset(dummy, 0, (size_t)w->cfg->n_vocab * sizeof(float));
            mdl_sampler_sample(s, dummy);
        }
        free(dummy);
    }
    *s_p = s;
    return FY_OK;
}

/* The request's sampler, and the schema it borrows (*schema_p, NULL without json_schema; the
 * caller destroys it after the sampler). */
static fy_status_t make_sampler(decode_worker_t *w, const Ferry__V1__DecodeRequest *req,
                                mdl_sampler_t **s_p, mdl_schema_t **schema_p)
{
    const Ferry__V1__SamplingParams *in = req->sampling;
    mdl_schema_t *schema = NULL;
    fy_status_t st = FY_OK;
    if (in != NULL && in->json_schema != NULL && in->json_schema[0] != '\0')
        st = mdl_schema_compile(in->json_schema, strlen(in->json_schema), &schema, NULL, 0);
    if (st == FY_OK)
        st = sampler_for(w, req, schema, s_p);
    if (st != FY_OK) {
        mdl_schema_destroy(schema);
        return st;
    }
    *schema_p = schema;
    return FY_OK;
}

static void h_decode(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    decode_worker_t *w = arg;
    const Ferry__V1__DecodeRequest *req = (const Ferry__V1__DecodeRequest *)m;
    if (req->first_token_id >= (uint32_t)w->cfg->n_vocab) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "first_token_id outside the vocabulary");
        return;
    }
    if (req->sampling != NULL && req->sampling->top_logprobs > MDL_MAX_TOP_LOGPROBS) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "top_logprobs: at most 20");
        return;
    }
    for (size_t i = 0; i < req->n_prompt_token_ids; i++) {
        if (req->prompt_token_ids[i] >= (uint32_t)w->cfg->n_vocab) {
            rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "prompt token outside the vocabulary");
            return;
        }
    }
    uint32_t limit = req->sampling != NULL && req->sampling->max_tokens
                         ? req->sampling->max_tokens
                         : w->p.default_max_tokens;
    uint32_t *forced = NULL, n_forced = 0;
    if (req->sampling != NULL && req->sampling->n_forced_token_ids > 0) {
        n_forced = (uint32_t)FY_MIN(req->sampling->n_forced_token_ids, (size_t)1u << 24);
        for (uint32_t i = 0; i < n_forced; i++) {
            if (req->sampling->forced_token_ids[i] >= (uint32_t)w->cfg->n_vocab) {
                rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT,
                                "forced token id outside the vocabulary");
                return;
            }
        }
        if ((forced = malloc(n_forced * sizeof(uint32_t))) == NULL) {
            rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        memcpy(forced, req->sampling->forced_token_ids, n_forced * sizeof(uint32_t));
        limit = FY_MIN(limit, n_forced); // the forced tokens and no more
    }
    mdl_sampler_t *sampler = NULL;
    mdl_schema_t *schema = NULL;
    fy_status_t st = make_sampler(w, req, &sampler, &schema);
    if (st != FY_OK) {
        free(forced);
        rpc_call_finish(call, rpc_code_from_status(st),
                        "sampling: at most 8 stop tokens (EOS included), each in the vocabulary; "
                        "penalties and logit biases in range, on tokens of the vocabulary; a "
                        "json_schema that compiles");
        return;
    }
    pthread_mutex_lock(&w->mu);
    req_t *r = find_locked(w, req->reservation_id);
    int code = RPC_CODE_OK;
    char msg[200] = "";
    if (r == NULL || r->ending) {
        code = RPC_CODE_NOT_FOUND;
        snprintf(msg, sizeof(msg), "no reservation %llu", (unsigned long long)req->reservation_id);
        for (int i = 0; i < N_TOMBSTONES; i++) {
            const tombstone_t *t = &w->tomb[i];
            if (t->id == req->reservation_id && t->code != RPC_CODE_OK) {
                code = t->code;
                snprintf(msg, sizeof(msg), "%s", t->msg);
            }
        }
    } else if (req->request_id[0] != '\0' && strcmp(req->request_id, r->request_id) != 0) {
        code = RPC_CODE_INVALID_ARGUMENT;
        snprintf(msg, sizeof(msg), "reservation %llu belongs to another request",
                 (unsigned long long)req->reservation_id);
    } else if (r->call != NULL) {
        code = RPC_CODE_ALREADY_EXISTS;
        snprintf(msg, sizeof(msg), "reservation %llu is being decoded already",
                 (unsigned long long)req->reservation_id);
    } else {
        r->call = call;
        r->sampler = sampler;
        r->schema = schema;
        r->return_ids = req->return_token_ids;
        r->logprobs =
            req->sampling != NULL && (req->sampling->logprobs || req->sampling->top_logprobs > 0);
        r->n_top = r->logprobs ? (int)req->sampling->top_logprobs : 0;
        r->forced = forced;
        r->n_forced = n_forced;
        forced = NULL;
        r->first_token = req->first_token_id;
        r->already_sent = req->completion_tokens_sent;
        r->limit = FY_MIN(limit, r->already_sent + r->max_new_tokens);
        sampler = NULL;
        schema = NULL;
        if (r->already_sent >= r->limit)
            r->limit = r->already_sent + 1; // asked for nothing more: one step, then LENGTH
    }
    pthread_cond_broadcast(&w->cond); // the scheduler takes it once the KV is complete
    pthread_mutex_unlock(&w->mu);
    mdl_sampler_destroy(sampler);
    mdl_schema_destroy(schema);
    free(forced);
    if (code != RPC_CODE_OK)
        rpc_call_finish(call, code, msg);
}

static void h_cancel(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    decode_worker_t *w = arg;
    const Ferry__V1__CancelRequest *req = (const Ferry__V1__CancelRequest *)m;
    Ferry__V1__CancelResponse resp = FERRY__V1__CANCEL_RESPONSE__INIT;
    req_t *end_now = NULL;
    kv_cmd_t *cmd = NULL;
    pthread_mutex_lock(&w->mu);
    req_t *r = req->request_id != NULL ? find_name_locked(w, req->request_id) : NULL;
    if (r != NULL && !r->ending) {
        resp.found = true;
        if (r->running || (r->kv_done && r->call != NULL)) {
            r->cancel = true; // the scheduler ends it between steps
        } else if (r->kv_done) {
            r->ending = true; // nobody owns it: end it here
            end_now = r;
        } else {
            cmd = calloc(1, sizeof(*cmd));
            if (cmd != NULL) {
                cmd->kind = CMD_CANCEL;
                cmd->id = r->id;
                cmd->st = FY_ERR_CANCELLED;
                cmd->reason = FAIL_CANCELLED;
            }
        }
    }
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    if (end_now != NULL)
        req_end(w, end_now, RPC_CODE_CANCELLED, "cancelled", FAIL_CANCELLED);
    if (cmd != NULL && !kv_post(w, cmd))
        free(cmd); // stopping: the listener's end fails the transfer anyway
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void set_draining(decode_worker_t *w)
{
    pthread_mutex_lock(&w->mu);
    bool was = w->draining;
    w->draining = true;
    pthread_mutex_unlock(&w->mu);
    if (!was) {
        FY_LOG_INFO(MODULE, "draining: no new reservations");
        if (w->agent != NULL)
            router_agent_set_draining(w->agent, true);
    }
}

static void h_drain(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    (void)m;
    decode_worker_t *w = arg;
    set_draining(w);
    Ferry__V1__DrainResponse resp = FERRY__V1__DRAIN_RESPONSE__INIT;
    pthread_mutex_lock(&w->mu);
    resp.in_flight = w->n_reqs;
    pthread_mutex_unlock(&w->mu);
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_health(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    (void)m;
    decode_worker_t *w = arg;
    Ferry__V1__HealthResponse resp = FERRY__V1__HEALTH_RESPONSE__INIT;
    pthread_mutex_lock(&w->mu);
    resp.status = w->draining ? FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__DRAINING
                              : FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
    pthread_mutex_unlock(&w->mu);
    resp.version = (char *)FY_VERSION_STRING;
    resp.role = (char *)"decode";
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static bool is_healthy(void *arg)
{
    decode_worker_t *w = arg;
    pthread_mutex_lock(&w->mu);
    bool ok = !w->draining;
    pthread_mutex_unlock(&w->mu);
    return ok;
}

static void agent_load(void *arg, router_load_t *load)
{
    decode_worker_t *w = arg;
    load->running_sequences = atomic_load(&w->running_now);
    load->free_kv_pages = decode_leases_available(w->leases);
    load->total_kv_pages = kv_total_pages(w);
    load->page_bytes = w->p.page_bytes;
}

static void on_rpc_drained(rpc_server_t *srv, void *arg)
{
    (void)srv;
    decode_worker_t *w = arg;
    rpc_server_destroy(w->srv);
    w->srv = NULL;
    router_agent_destroy(w->agent);
    w->agent = NULL;
    uv_close((uv_handle_t *)&w->rpc_async, NULL);
}

static void on_rpc_async(uv_async_t *a)
{
    decode_worker_t *w = a->data;
    pthread_mutex_lock(&w->mu);
    bool stop = w->rpc_stop, drain = w->rpc_drain_pending;
    w->rpc_drain_pending = false;
    pthread_mutex_unlock(&w->mu);
    if (drain && w->agent != NULL)
        router_agent_set_draining(w->agent, true);
    if (stop && w->srv != NULL) {
        rpc_server_t *srv = w->srv;
        rpc_server_shutdown(srv, 1000, on_rpc_drained, w);
    } else if (stop && !uv_is_closing((uv_handle_t *)&w->rpc_async)) {
        router_agent_destroy(w->agent);
        w->agent = NULL;
        uv_close((uv_handle_t *)&w->rpc_async, NULL);
    }
}

static void *rpc_main(void *arg)
{
    decode_worker_t *w = arg;
    uv_loop_init(&w->rpc_loop);
    uv_async_init(&w->rpc_loop, &w->rpc_async, on_rpc_async);
    w->rpc_async.data = w;
    rpc_server_params_t sp;
    rpc_server_params_default(&sp);
    sp.host = w->listen_host;
    sp.port = w->p.listen_port;
    sp.metrics = w->metrics;
    sp.healthy = is_healthy;
    sp.healthy_arg = w;
    sp.tls = w->p.rpc_tls;
    if (w->api_key[0] != '\0') { // the router's calls carry the key; Health stays open
        sp.auth = daemon_auth;
        sp.auth_arg = w->api_key;
    }
    fy_status_t st = rpc_server_create(&w->rpc_loop, &sp, &w->srv);
    const ProtobufCServiceDescriptor *wd = &ferry__v1__worker__descriptor;
    const ProtobufCServiceDescriptor *fd = &ferry__v1__ferry__descriptor;
    if (st == FY_OK && (wd->n_methods > 16 || fd->n_methods > 16))
        st = FY_ERR_INTERNAL;
    if (st == FY_OK) {
        for (unsigned i = 0; i < wd->n_methods; i++) {
            const char *n = wd->methods[i].name;
            w->worker_handlers[i] = strcmp(n, "ReserveKV") == 0 ? h_reserve
                                    : strcmp(n, "Decode") == 0  ? h_decode
                                    : strcmp(n, "Cancel") == 0  ? h_cancel
                                    : strcmp(n, "Drain") == 0   ? h_drain
                                                                : NULL;
            w->worker_streaming[i] = strcmp(n, "Decode") == 0;
        }
        for (unsigned i = 0; i < fd->n_methods; i++)
            w->ferry_handlers[i] = strcmp(fd->methods[i].name, "Health") == 0 ? h_health : NULL;
        st = rpc_server_add_service(w->srv, wd, w->worker_handlers, w->worker_streaming, w);
        if (st == FY_OK)
            st = rpc_server_add_service(w->srv, fd, w->ferry_handlers, NULL, w);
    }
    if (st == FY_OK) {
        w->rpc_port = rpc_server_port(w->srv);
        char rpc_addr[128], kv_addr[128];
        snprintf(rpc_addr, sizeof(rpc_addr), "%s:%d", w->advertise_host, w->rpc_port);
        snprintf(kv_addr, sizeof(kv_addr), "%s:%d", w->advertise_host, w->kv_port);
        snprintf(w->worker_id, sizeof(w->worker_id), "%s",
                 w->p.worker_id != NULL ? w->p.worker_id : "");
        if (w->worker_id[0] == '\0') {
            // The advertised host is at most 63 bytes: cut it so the id fits its 64.
            snprintf(w->worker_id, sizeof(w->worker_id), "decode@%.40s:%d", w->advertise_host,
                     w->rpc_port);
        }
        if (w->router_addr[0] != '\0') {
            router_agent_params_t ap = {.router_address = w->router_addr,
                                        .worker_id = w->worker_id,
                                        .role = ROUTER_ROLE_DECODE,
                                        .rpc_address = rpc_addr,
                                        .kv_address = kv_addr,
                                        .pair_link = pair_kind(w),
                                        .node_id = w->pairing.node_id,
                                        .pair_device = w->pairing.pair_device,
                                        .model_fingerprint = w->fingerprint,
                                        .heartbeat_ms = w->p.heartbeat_ms,
                                        .load = agent_load,
                                        .load_arg = w,
                                        .api_key = w->api_key[0] ? w->api_key : NULL,
                                        .tls = w->p.router_tls};
            st = router_agent_create(&w->rpc_loop, &ap, &w->agent);
        }
    }
    pthread_mutex_lock(&w->mu);
    w->rpc_up = st == FY_OK ? 1 : -1;
    if (st != FY_OK && w->start_st == FY_OK) {
        w->start_st = st;
        snprintf(w->start_err, sizeof(w->start_err), "RPC server on %s:%d: %s", w->listen_host,
                 w->p.listen_port, fy_status_str(st));
    }
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    if (st != FY_OK) {
        router_agent_destroy(w->agent);
        rpc_server_destroy(w->srv);
        w->srv = NULL;
        w->agent = NULL;
        uv_close((uv_handle_t *)&w->rpc_async, NULL);
    }
    uv_run(&w->rpc_loop, UV_RUN_DEFAULT);
    uv_loop_close(&w->rpc_loop);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Life cycle                                                                                  */
/* ------------------------------------------------------------------------------------------ */

uint32_t decode_page_bytes_for(uint32_t head_dim)
{
    const uint64_t b = 256ull * head_dim;
    return b < (16u << 10) ? 16u << 10 : b > (64u << 10) ? 64u << 10 : (uint32_t)b;
}

void decode_worker_params_default(decode_worker_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->listen_host = "127.0.0.1";
    p->kv_host = "127.0.0.1";
    p->kv_memory = 512ull << 20;
    p->page_bytes = 0; // from the model's head_dim (decode_page_bytes_for)
    p->recv_buffer = 64ull << 20;
    p->max_batch = 32;
    p->default_max_tokens = 256;
    p->default_lease_ms = 10000;
}

static fy_status_t errf(char *err, size_t len, fy_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static fy_status_t errf(char *err, size_t len, fy_status_t st, const char *fmt, ...)
{
    if (err != NULL && len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return st;
}

static fy_status_t make_metrics(decode_worker_t *w)
{
    fy_metrics_t *m = w->metrics;
    static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128};
    w->m_running = fy_metrics_gauge(m, "ferry_decode_running_sequences", NULL,
                                    "Sequences in the decode batch");
    w->m_free_pages = fy_metrics_gauge(m, "ferry_decode_free_pages", NULL,
                                       "KV pool pages not allocated");
    w->m_avail_pages = fy_metrics_gauge(m, "ferry_decode_available_pages", NULL,
                                        "KV pool pages neither allocated nor reserved");
    w->m_total_pages = fy_metrics_gauge(m, "ferry_decode_total_pages", NULL, "KV pool pages");
    w->m_locked = fy_metrics_gauge(m, "ferry_decode_recv_pool_locked_bytes", NULL,
                                   "Receive pool bytes page-locked for GPU uploads "
                                   "(0: pageable, or the worker runs on the CPU)");
    w->m_requests = fy_metrics_gauge(m, "ferry_decode_requests", NULL,
                                     "Reservations alive (receiving, waiting or decoding)");
    w->m_tokens = fy_metrics_counter(m, "ferry_decode_tokens_generated_total", NULL,
                                     "Tokens generated");
    w->m_step = fy_metrics_histogram(m, "ferry_decode_step_seconds", NULL,
                                     "Time of one decode step of the batch",
                                     fy_metrics_latency_bounds, 16);
    w->m_batch = fy_metrics_histogram(m, "ferry_decode_batch_size", NULL,
                                      "Sequences per decode step", batch_bounds,
                                      FY_ARRAY_SIZE(batch_bounds));
    w->m_wire = fy_metrics_counter(m, "ferry_decode_placed_wire_bytes_total", NULL,
                                   "KV frame bytes received and placed");
    w->m_frames = fy_metrics_counter(m, "ferry_decode_frames_placed_total", NULL,
                                     "KV frames placed");
    w->m_opened = fy_metrics_counter(m, "ferry_decode_frames_opened_total", NULL,
                                     "Sealed KV frames opened (their AES-GCM tag checked)");
    w->m_reserved = fy_metrics_counter(m, "ferry_decode_reservations_total", NULL,
                                       "Reservations granted");
    w->m_refused = fy_metrics_counter(m, "ferry_decode_reservations_refused_total", NULL,
                                      "Reservations refused for lack of pages or buffer");
    w->m_completed = fy_metrics_counter(m, "ferry_decode_requests_completed_total", NULL,
                                        "Requests that finished decoding");
    w->m_pair_frames = fy_metrics_counter(m, "ferry_decode_pair_frames_total", NULL,
                                          "KV frames placed that came over a pair link");
    w->m_pairs = fy_metrics_counter(m, "ferry_decode_pairs_created_total", NULL,
                                    "Pair links set up with prefill workers of this node");
    w->m_pairs_up = fy_metrics_gauge(m, "ferry_decode_pairs_up", NULL,
                                     "Pair links with prefill workers that are up");
    for (int i = 0; i < FAIL_COUNT; i++) {
        char labels[64];
        snprintf(labels, sizeof(labels), "reason=\"%s\"", k_fail_names[i]);
        w->m_fail[i] = fy_metrics_counter(m, "ferry_decode_failures_total", labels,
                                          "Requests that ended in an error, by reason");
        if (w->m_fail[i] == NULL)
            return FY_ERR_NO_MEMORY;
    }
    if (!w->m_running || !w->m_free_pages || !w->m_avail_pages || !w->m_total_pages ||
        !w->m_requests || !w->m_tokens || !w->m_step || !w->m_batch || !w->m_wire || !w->m_frames ||
        !w->m_reserved || !w->m_refused || !w->m_completed || !w->m_pair_frames || !w->m_pairs ||
        !w->m_pairs_up || !w->m_locked)
        return FY_ERR_NO_MEMORY;
    fy_metric_set(w->m_total_pages, kv_total_pages(w));
    return FY_OK;
}

static bool is_wildcard(const char *host)
{
    return strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0 || host[0] == '\0';
}

static void stop_threads(decode_worker_t *w, bool rpc, bool kv, bool sched)
{
    if (sched) {
        pthread_mutex_lock(&w->mu);
        w->stopping = true;
        pthread_cond_broadcast(&w->cond);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->sched_thread, NULL);
    }
    if (kv) {
        pthread_mutex_lock(&w->mu);
        w->kv_stop = true;
        if (!w->kv_closed)
            uv_async_send(&w->kv_async);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->kv_thread, NULL);
    }
    if (rpc) {
        pthread_mutex_lock(&w->mu);
        w->rpc_stop = true;
        pthread_mutex_unlock(&w->mu);
        uv_async_send(&w->rpc_async);
        pthread_join(w->rpc_thread, NULL);
    }
}

/* Ends the requests no thread owns any more (KV complete, not decoding) once the scheduler and
 * kvlink threads are gone; their calls are finished while the RPC thread still runs. */
static void end_leftovers(decode_worker_t *w)
{
    while (w->reqs != NULL)
        req_end(w, w->reqs, RPC_CODE_UNAVAILABLE, "decode worker shutting down", FAIL_SHUTDOWN);
}

static void free_worker(decode_worker_t *w)
{
    end_leftovers(w);
    free(w->batch);
    free(w->seqs);
    free(w->gseqs);
    free(w->tokens);
    free(w->positions);
    free(w->logits);
    free(w->raw_row);
    fetch_free(w);
    mdl_ctx_destroy(w->ctx);
    mdl_json_vocab_destroy(w->json);
    decode_leases_destroy(w->leases);
    kvc_pool_destroy(w->pool);
    kvc_gpu_stage_destroy(w->gstage);
    kvc_gpu_pool_destroy(w->gpool);
    fy_metrics_destroy(w->metrics);
    mdl_model_destroy(w->own_model);
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

fy_status_t decode_worker_create(const decode_worker_params_t *params,
                                 decode_worker_t **worker_p, char *err, size_t err_len)
{
    decode_worker_params_t p;
    if (params != NULL)
        p = *params;
    else
        decode_worker_params_default(&p);
    if (p.max_batch <= 0 || p.max_batch > 1024 || p.threads < 0 || p.recv_buffer == 0 ||
        p.default_lease_ms == 0 || p.listen_port < 0 || p.listen_port > 65535 ||
        p.kv_port < 0 || p.kv_port > 65535 || worker_p == NULL)
        return errf(err, err_len, FY_ERR_INVALID_ARG, "invalid worker parameters");
    decode_worker_t *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return FY_ERR_NO_MEMORY;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cond, NULL);
    snprintf(w->listen_host, sizeof(w->listen_host), "%s",
             p.listen_host != NULL ? p.listen_host : "127.0.0.1");
    snprintf(w->kv_host, sizeof(w->kv_host), "%s", p.kv_host != NULL ? p.kv_host : "127.0.0.1");
    const char *adv = p.advertise_host != NULL ? p.advertise_host
                      : is_wildcard(w->listen_host) ? "127.0.0.1"
                                                    : w->listen_host;
    snprintf(w->advertise_host, sizeof(w->advertise_host), "%s", adv);
    snprintf(w->router_addr, sizeof(w->router_addr), "%s", p.router != NULL ? p.router : "");
    snprintf(w->api_key, sizeof(w->api_key), "%s", p.api_key != NULL ? p.api_key : "");
    p.api_key = NULL;
    snprintf(w->ucx_tls, sizeof(w->ucx_tls), "%s", p.ucx_tls != NULL ? p.ucx_tls : "");
    snprintf(w->ucx_devices, sizeof(w->ucx_devices), "%s",
             p.ucx_devices != NULL ? p.ucx_devices : "");
    p.ucx_tls = p.ucx_devices = NULL;
    const char *model_path = p.model_path; // used below only, while the caller's string lives
    p.model_path = NULL;
    p.listen_host = w->listen_host;
    p.kv_host = w->kv_host;
    p.advertise_host = w->advertise_host;
    p.router = NULL;
    const char *pair_link = p.pair_link != NULL ? p.pair_link : "auto";
    const char *node_id = p.node_id;
    p.pair_link = p.node_id = NULL;
    w->p = p;

    fy_status_t st = FY_OK;
    char merr[MDL_ERR_LEN] = "";
    if (p.model != NULL) {
        w->model = p.model;
    } else {
        mdl_model_params_t mp;
        mdl_model_params_default(&mp);
        mp.path = model_path;
        mp.device = p.device;
        if (mp.path == NULL) {
            st = errf(err, err_len, FY_ERR_INVALID_ARG, "no model given (--model)");
            goto fail;
        }
        if ((st = mdl_model_create(&mp, &w->own_model, merr, sizeof(merr))) != FY_OK) {
            errf(err, err_len, st, "model %s: %s", mp.path, merr);
            goto fail;
        }
        w->model = w->own_model;
    }
    w->cfg = mdl_model_config(w->model);
    w->fingerprint = mdl_model_fingerprint(w->model);
    if ((st = mdl_json_vocab_create(mdl_model_tokenizer(w->model), &w->json)) != FY_OK) {
        errf(err, err_len, st, "JSON mode's token table");
        goto fail;
    }
    if (w->cfg->n_layers > MAX_LAYERS) {
        st = errf(err, err_len, FY_ERR_UNSUPPORTED, "model has too many layers");
        goto fail;
    }
    // A model handed in decides the device; else --device does.
    mdl_device_t dev = p.model != NULL ? mdl_model_device(p.model) : p.device;
    mdl_ctx_params_t cp;
    mdl_ctx_params_default(&cp);
    cp.n_threads = p.threads;
    cp.max_batch = p.max_batch;
    cp.device = dev;
    if ((st = mdl_ctx_create(w->model, &cp, &w->ctx)) != FY_OK) {
        errf(err, err_len, st, "model context");
        goto fail;
    }
    // The page size, given or from the model, and the pool it makes: checked once, here.
    if (p.page_bytes == 0)
        p.page_bytes = w->p.page_bytes = decode_page_bytes_for((uint32_t)w->cfg->head_dim);
    if (p.kv_memory < p.page_bytes || p.kv_memory / p.page_bytes > UINT32_MAX) {
        st = errf(err, err_len, FY_ERR_INVALID_ARG,
                  "kv-memory: %llu bytes do not make pages of %u bytes",
                  (unsigned long long)p.kv_memory, p.page_bytes);
        goto fail;
    }
    kvc_pool_params_t pp;
    kvc_pool_params_default(&pp);
    pp.page_bytes = p.page_bytes;
    pp.n_pages = (uint32_t)(p.kv_memory / p.page_bytes);
    pp.head_dim = (uint32_t)w->cfg->head_dim;
    if (dev == MDL_DEVICE_CUDA) {
        if ((st = kvc_gpu_pool_create(&pp, &w->gpool)) != FY_OK ||
            (st = kvc_gpu_stage_create(&w->gstage)) != FY_OK) {
            errf(err, err_len, st, "GPU page pool of %u pages of %u bytes", pp.n_pages,
                 p.page_bytes);
            goto fail;
        }
        w->tail_page_tokens = kvc_gpu_pool_page_tokens(w->gpool, KVC_OPT_F16);
    } else {
        if ((st = kvc_pool_create(&pp, &w->pool)) != FY_OK) {
            errf(err, err_len, st, "page pool of %u pages of %u bytes", pp.n_pages,
                 p.page_bytes);
            goto fail;
        }
        w->tail_page_tokens = kvc_pool_page_tokens(w->pool, KVC_OPT_F16);
    }
    if ((st = decode_leases_create(pp.n_pages, &w->leases)) != FY_OK)
        goto fail;
    char perr[96] = "";
    if ((st = kvlink_pair_identity(pair_link, node_id, dev == MDL_DEVICE_CUDA, 0, &w->pairing,
                                   perr, sizeof(perr))) != FY_OK) {
        errf(err, err_len, st, "%s", perr);
        goto fail;
    }
    size_t nb = (size_t)p.max_batch;
    w->batch = calloc(nb, sizeof(*w->batch));
    w->seqs = calloc(nb, sizeof(*w->seqs));
    w->gseqs = calloc(nb, sizeof(*w->gseqs));
    w->tokens = calloc(nb, sizeof(*w->tokens));
    w->positions = calloc(nb, sizeof(*w->positions));
    w->logits = malloc(nb * (size_t)w->cfg->n_vocab * sizeof(float));
    w->raw_row = malloc((size_t)w->cfg->n_vocab * sizeof(float));
    if (!w->batch || !w->seqs || !w->gseqs || !w->tokens || !w->positions || !w->logits ||
        !w->raw_row) {
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    if ((st = fy_metrics_create(&w->metrics)) != FY_OK || (st = make_metrics(w)) != FY_OK) {
        errf(err, err_len, st, "metrics");
        goto fail;
    }

    // kvlink first (the RPC thread advertises its port), then RPC, then the scheduler.
    if (pthread_create(&w->kv_thread, NULL, kv_main, w) != 0) {
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    pthread_mutex_lock(&w->mu);
    while (w->kv_up == 0)
        pthread_cond_wait(&w->cond, &w->mu);
    pthread_mutex_unlock(&w->mu);
    if (w->kv_up < 0) {
        st = errf(err, err_len, w->start_st, "%s", w->start_err);
        stop_threads(w, false, true, false);
        goto fail;
    }
    if (pthread_create(&w->rpc_thread, NULL, rpc_main, w) != 0) {
        stop_threads(w, false, true, false);
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    pthread_mutex_lock(&w->mu);
    while (w->rpc_up == 0)
        pthread_cond_wait(&w->cond, &w->mu);
    pthread_mutex_unlock(&w->mu);
    if (w->rpc_up < 0) {
        st = errf(err, err_len, w->start_st, "%s", w->start_err);
        pthread_join(w->rpc_thread, NULL);
        stop_threads(w, false, true, false);
        goto fail;
    }
    if (pthread_create(&w->sched_thread, NULL, sched_main, w) != 0) {
        stop_threads(w, true, true, false);
        st = FY_ERR_NO_MEMORY;
        goto fail;
    }
    FY_LOG_INFO(MODULE,
                "serving %s: rpc %s:%d, kv %s:%d, %u pages of %u bytes on the %s, max batch %d, "
                "fingerprint %016llx",
                w->worker_id, w->listen_host, w->rpc_port, w->kv_host, w->kv_port, pp.n_pages,
                p.page_bytes, dev == MDL_DEVICE_CUDA ? "GPU" : "CPU", p.max_batch,
                (unsigned long long)w->fingerprint);
    update_gauges(w);
    *worker_p = w;
    return FY_OK;
fail:
    free_worker(w);
    return st;
}

int decode_worker_rpc_port(const decode_worker_t *w)
{
    return w->rpc_port;
}

int decode_worker_kv_port(const decode_worker_t *w)
{
    return w->kv_port;
}

fy_metrics_t *decode_worker_metrics(decode_worker_t *w)
{
    return w->metrics;
}

void decode_worker_stats(decode_worker_t *w, decode_worker_stats_t *s)
{
    memset(s, 0, sizeof(*s));
    s->total_pages = kv_total_pages(w);
    s->free_pages = kv_free_pages(w);
    s->available_pages = decode_leases_available(w->leases);
    s->running = atomic_load(&w->running_now);
    pthread_mutex_lock(&w->mu);
    s->requests = w->n_reqs;
    pthread_mutex_unlock(&w->mu);
    s->tokens_generated = atomic_load(&w->tokens_generated);
    s->steps = atomic_load(&w->steps);
    s->failures = atomic_load(&w->failures);
}

size_t decode_worker_drain(decode_worker_t *w, uint32_t timeout_ms)
{
    pthread_mutex_lock(&w->mu);
    bool was = w->draining;
    w->draining = true;
    w->rpc_drain_pending = !was;
    pthread_mutex_unlock(&w->mu);
    if (!was) {
        FY_LOG_INFO(MODULE, "draining: no new reservations, waiting up to %u ms", timeout_ms);
        uv_async_send(&w->rpc_async);
    }
    uint64_t deadline = fy_clock_ns() + (uint64_t)timeout_ms * 1000000ull;
    pthread_mutex_lock(&w->mu);
    while (w->n_reqs > 0 && fy_clock_ns() < deadline) {
        pthread_mutex_unlock(&w->mu);
        fy_sleep_ns(10 * 1000000ull);
        pthread_mutex_lock(&w->mu);
    }
    size_t left = w->n_reqs;
    pthread_mutex_unlock(&w->mu);
    return left;
}

void decode_worker_destroy(decode_worker_t *w)
{
    if (w == NULL)
        return;
    // The scheduler first (running sequences end UNAVAILABLE), then transfers (open ones end
    // FY_ERR_CLOSED), then what is left, then RPC, which delivers the last finishes before it
    // closes.
    stop_threads(w, false, true, true);
    end_leftovers(w);
    stop_threads(w, true, false, false);
    free_worker(w);
}
