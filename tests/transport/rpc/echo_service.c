/*
 * echo_service.c: handlers of the interop test service (and of ferry.v1.Ferry with canned
 * answers, for the SDK tests). Stream and Slow run on timers so
 * they can be cancelled mid-flight; Unary with from_thread answers from a new thread through
 * the thread-safe rpc_call_send / rpc_call_finish.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "echo_service.h"
#include "ferry.pb-c.h"
#include "interop.pb-c.h"

static atomic_uint g_cancels;
static atomic_size_t g_stream_pending; // rpc_call_pending_bytes after a burst of sends

size_t echo_service_stream_pending(void)
{
    return atomic_load(&g_stream_pending);
}

unsigned echo_service_cancels(void)
{
    return atomic_load(&g_cancels);
}

typedef struct {
    rpc_call_t *call;
    uv_timer_t timer;
    uint32_t sent, count, size, interval_ms;
    uint8_t *payload; // [size]
    bool finished;
} echo_job_t;

static void on_job_closed(uv_handle_t *h)
{
    echo_job_t *job = h->data;
    free(job->payload);
    free(job);
}

static void job_end(echo_job_t *job, int code, const char *message)
{
    if (job->finished)
        return;
    job->finished = true;
    uv_timer_stop(&job->timer);
    rpc_call_finish(job->call, code, message);
    uv_close((uv_handle_t *)&job->timer, on_job_closed);
}

static void on_job_cancel(rpc_call_t *call, void *arg)
{
    atomic_fetch_add(&g_cancels, 1);
    job_end(arg, RPC_CODE_CANCELLED, "cancelled");
}

static void send_one(echo_job_t *job)
{
    Ferry__Test__EchoResponse resp = FERRY__TEST__ECHO_RESPONSE__INIT;
    resp.seq = job->sent;
    resp.payload.data = job->payload;
    resp.payload.len = job->size;
    rpc_call_send(job->call, &resp.base);
    job->sent++;
}

static void on_stream_tick(uv_timer_t *t)
{
    echo_job_t *job = t->data;
    if (job->sent < job->count)
        send_one(job);
    if (job->sent >= job->count)
        job_end(job, RPC_CODE_OK, NULL);
}

static echo_job_t *job_new(rpc_call_t *call, uv_loop_t *loop, uint32_t size)
{
    echo_job_t *job = calloc(1, sizeof(*job));
    if (job == NULL)
        return NULL;
    job->payload = calloc(1, size ? size : 1);
    if (job->payload == NULL) {
        free(job);
        return NULL;
    }
    memset(job->payload, 'x', size);
    job->size = size;
    job->call = call;
    uv_timer_init(loop, &job->timer);
    job->timer.data = job;
    rpc_call_set_cancel_cb(call, on_job_cancel, job);
    return job;
}

static void h_stream(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__StreamRequest *req = (const Ferry__Test__StreamRequest *)m;
    if (req->size > (64u << 20)) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "size too large");
        return;
    }
    echo_job_t *job = job_new(call, arg, req->size);
    if (job == NULL) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    if (job->finished)
        return;
    job->count = req->count;
    job->interval_ms = req->interval_ms;
    if (req->interval_ms == 0) {
        while (job->sent < job->count)
            send_one(job);
        atomic_store(&g_stream_pending, rpc_call_pending_bytes(call));
        job_end(job, RPC_CODE_OK, NULL);
        return;
    }
    uv_timer_start(&job->timer, on_stream_tick, req->interval_ms, req->interval_ms);
}

static void on_slow_done(uv_timer_t *t)
{
    echo_job_t *job = t->data;
    Ferry__Test__EchoResponse resp = FERRY__TEST__ECHO_RESPONSE__INIT;
    resp.text = "slow";
    rpc_call_send(job->call, &resp.base);
    job_end(job, RPC_CODE_OK, NULL);
}

static void h_slow(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__SlowRequest *req = (const Ferry__Test__SlowRequest *)m;
    echo_job_t *job = job_new(call, arg, 0);
    if (job == NULL) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    if (!job->finished)
        uv_timer_start(&job->timer, on_slow_done, req->delay_ms, 0);
}

typedef struct {
    rpc_call_t *call;
    Ferry__Test__EchoResponse resp;
    uint8_t *buf;
    char *text;
} thread_job_t;

static void thread_answer(void *arg)
{
    thread_job_t *tj = arg;
    rpc_call_send(tj->call, &tj->resp.base);
    rpc_call_finish(tj->call, RPC_CODE_OK, NULL);
}

static void h_unary(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__EchoRequest *req = (const Ferry__Test__EchoRequest *)m;
    Ferry__Test__EchoResponse resp = FERRY__TEST__ECHO_RESPONSE__INIT;
    uint8_t *buf = NULL;
    resp.text = req->text;
    if (req->response_size) {
        if (req->response_size > (64u << 20)) {
            rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "response_size too large");
            return;
        }
        buf = calloc(1, req->response_size);
        if (buf == NULL) {
            rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
            return;
        }
        resp.payload.data = buf;
        resp.payload.len = req->response_size;
    } else {
        resp.payload = req->payload;
    }
    if (req->from_thread) {
        thread_job_t tj = {.call = call, .resp = resp};
        uv_thread_t th;
        if (uv_thread_create(&th, thread_answer, &tj) != 0) {
            rpc_call_finish(call, RPC_CODE_INTERNAL, "thread");
        } else {
            uv_thread_join(&th); // the answer still crosses threads through the op queue
        }
        free(buf);
        return;
    }
    fy_status_t st = rpc_call_send(call, &resp.base);
    free(buf);
    if (st != FY_OK) {
        rpc_call_finish(call, rpc_code_from_status(st), fy_status_str(st));
        return;
    }
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_fail(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__Test__FailRequest *req = (const Ferry__Test__FailRequest *)m;
    rpc_call_finish(call, req->code, req->message);
}

static void h_health(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    Ferry__V1__HealthResponse resp = FERRY__V1__HEALTH_RESPONSE__INIT;
    resp.status = FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
    resp.version = "test";
    resp.role = "echo";
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

// A stand-in for the router's client service, for SDK tests: Generate streams max_tokens
// (default 5) pieces "t0", "t1", ... with the finish reason on the last; Complete answers the
// concatenation; Tokenize returns the bytes of the text as ids; ListModels one model.
static uint32_t gen_count(const Ferry__V1__GenerateRequest *req)
{
    uint32_t n = req->sampling && req->sampling->max_tokens ? req->sampling->max_tokens : 5;
    return n > 100000 ? 100000 : n;
}

static void h_generate(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__V1__GenerateRequest *req = (const Ferry__V1__GenerateRequest *)m;
    uint32_t n = gen_count(req);
    for (uint32_t i = 0; i < n; i++) {
        char text[16];
        snprintf(text, sizeof(text), "t%u", i);
        Ferry__V1__GenerateResponse resp = FERRY__V1__GENERATE_RESPONSE__INIT;
        resp.text = text;
        resp.request_id = req->request_id;
        if (i + 1 == n)
            resp.finish_reason = FERRY__V1__FINISH_REASON__FINISH_REASON_LENGTH;
        rpc_call_send(call, &resp.base);
    }
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_complete(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__V1__GenerateRequest *req = (const Ferry__V1__GenerateRequest *)m;
    if (req->input_case != FERRY__V1__GENERATE_REQUEST__INPUT_PROMPT) {
        rpc_call_finish(call, RPC_CODE_INVALID_ARGUMENT, "prompt required");
        return;
    }
    Ferry__V1__CompleteResponse resp = FERRY__V1__COMPLETE_RESPONSE__INIT;
    resp.text = req->prompt;
    resp.finish_reason = FERRY__V1__FINISH_REASON__FINISH_REASON_STOP;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_tokenize(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__V1__TokenizeRequest *req = (const Ferry__V1__TokenizeRequest *)m;
    size_t n = req->text ? strlen(req->text) : 0;
    uint32_t *ids = calloc(n ? n : 1, sizeof(uint32_t));
    if (ids == NULL) {
        rpc_call_finish(call, RPC_CODE_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    for (size_t i = 0; i < n; i++)
        ids[i] = (unsigned char)req->text[i];
    Ferry__V1__TokenizeResponse resp = FERRY__V1__TOKENIZE_RESPONSE__INIT;
    resp.ids = ids;
    resp.n_ids = n;
    rpc_call_send(call, &resp.base);
    free(ids);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_list_models(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    Ferry__V1__ModelInfo info = FERRY__V1__MODEL_INFO__INIT;
    info.name = "echo";
    info.n_layers = 2;
    Ferry__V1__ModelInfo *models[1] = {&info};
    Ferry__V1__ListModelsResponse resp = FERRY__V1__LIST_MODELS_RESPONSE__INIT;
    resp.models = models;
    resp.n_models = 1;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

// In ferry.test.Echo order: Unary, Stream, Slow, Fail.
static const rpc_handler_cb k_echo_handlers[] = {h_unary, h_stream, h_slow, h_fail};
static const bool k_echo_streaming[] = {false, true, false, false};
// In ferry.v1.Ferry order: Generate, Complete, Tokenize, ListModels, Health.
static const rpc_handler_cb k_ferry_handlers[] = {h_generate, h_complete, h_tokenize, h_list_models,
                                                  h_health};
static const bool k_ferry_streaming[] = {true, false, false, false, false};

fy_status_t echo_service_register(rpc_server_t *srv, uv_loop_t *loop)
{
    fy_status_t st = rpc_server_add_service(srv, &ferry__test__echo__descriptor, k_echo_handlers,
                                            k_echo_streaming, loop);
    if (st != FY_OK)
        return st;
    return rpc_server_add_service(srv, &ferry__v1__ferry__descriptor, k_ferry_handlers,
                                  k_ferry_streaming, NULL);
}

struct echo_thread {
    uv_thread_t thread;
    uv_loop_t loop;
    uv_async_t stop;
    uv_sem_t ready;
    rpc_server_params_t params;
    rpc_server_t *srv;
    fy_status_t st;
    int port;
    uint32_t drain_ms;
};

static void on_drained(rpc_server_t *srv, void *arg)
{
    echo_thread_t *t = arg;
    rpc_server_destroy(srv);
    t->srv = NULL;
    uv_close((uv_handle_t *)&t->stop, NULL);
}

static void on_stop(uv_async_t *a)
{
    echo_thread_t *t = a->data;
    rpc_server_shutdown(t->srv, t->drain_ms, on_drained, t);
}

static void echo_thread_main(void *arg)
{
    echo_thread_t *t = arg;
    uv_loop_init(&t->loop);
    uv_async_init(&t->loop, &t->stop, on_stop);
    t->stop.data = t;
    t->st = rpc_server_create(&t->loop, &t->params, &t->srv);
    if (t->st == FY_OK)
        t->st = echo_service_register(t->srv, &t->loop);
    if (t->st == FY_OK)
        t->port = rpc_server_port(t->srv);
    uv_sem_post(&t->ready);
    if (t->st != FY_OK) {
        rpc_server_destroy(t->srv);
        uv_close((uv_handle_t *)&t->stop, NULL);
    }
    uv_run(&t->loop, UV_RUN_DEFAULT);
    uv_loop_close(&t->loop);
}

fy_status_t echo_thread_start(const rpc_server_params_t *params, echo_thread_t **t_p)
{
    echo_thread_t *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return FY_ERR_NO_MEMORY;
    t->params = *params;
    uv_sem_init(&t->ready, 0);
    if (uv_thread_create(&t->thread, echo_thread_main, t) != 0) {
        free(t);
        return FY_ERR_NO_MEMORY;
    }
    uv_sem_wait(&t->ready);
    uv_sem_destroy(&t->ready);
    if (t->st != FY_OK) {
        fy_status_t st = t->st;
        uv_thread_join(&t->thread);
        free(t);
        return st;
    }
    *t_p = t;
    return FY_OK;
}

int echo_thread_port(const echo_thread_t *t)
{
    return t->port;
}

void echo_thread_stop(echo_thread_t *t, uint32_t drain_ms)
{
    if (t == NULL)
        return;
    t->drain_ms = drain_ms;
    uv_async_send(&t->stop);
    uv_thread_join(&t->thread);
    free(t);
}
