/*
 * ferry_client.c: libferry-client on top of transport/rpc. The blocking API runs a private
 * libuv loop until its call is done; the asynchronous API starts calls on the caller's loop.
 */
#include <stdlib.h>
#include <string.h>

#include "ferry_client.h"
#include "rpc.h"

#define FERRY_MAX_ADDRESSES 64

struct ferry_client {
    uv_loop_t *loop;
    uv_loop_t own_loop; // the loop of a blocking client
    bool owns_loop;
    rpc_channel_t *ch;
    rpc_tls_t *tls; // the channel's, with params.tls_ca
    ferry_client_params_t params;
};

struct ferry_call {
    rpc_ccall_t *rc;
    ferry_msg_cb on_msg;
    ferry_done_cb on_done;
    void *arg;
};

void ferry_client_params_default(ferry_client_params_t *p)
{
    memset(p, 0, sizeof(*p));
    p->timeout_ms = 30000;
    p->max_message = RPC_DEFAULT_MAX_MESSAGE;
    p->max_attempts = 3;
    p->connect_timeout_ms = 5000;
}

const char *ferry_code_name(int code)
{
    return rpc_code_name(code);
}

void ferry_message_free(void *msg)
{
    if (msg != NULL)
        protobuf_c_message_free_unpacked(msg, NULL);
}

static int client_init(ferry_client_t *c, const ferry_client_params_t *p)
{
    if (p->addresses == NULL)
        return FY_ERR_INVALID_ARG;
    // Split the comma-separated list into a scratch copy.
    char *copy = strdup(p->addresses);
    if (copy == NULL)
        return FY_ERR_NO_MEMORY;
    const char *addrs[FERRY_MAX_ADDRESSES];
    size_t n = 0;
    for (char *save = NULL, *tok = strtok_r(copy, ", ", &save); tok;
         tok = strtok_r(NULL, ", ", &save)) {
        if (n == FERRY_MAX_ADDRESSES) {
            free(copy);
            return FY_ERR_INVALID_ARG;
        }
        addrs[n++] = tok;
    }
    rpc_channel_params_t cp;
    rpc_channel_params_default(&cp);
    cp.addresses = addrs;
    cp.n_addresses = n;
    if (p->max_message) {
        cp.max_message = p->max_message;
        cp.max_send_message = p->max_message;
    }
    if (p->connect_timeout_ms)
        cp.connect_timeout_ms = p->connect_timeout_ms;
    char auth[512];
    if (p->token) {
        if (snprintf(auth, sizeof(auth), "Bearer %s", p->token) >= (int)sizeof(auth)) {
            free(copy);
            return FY_ERR_INVALID_ARG;
        }
        cp.authorization = auth;
    }
    int st = n == 0 ? FY_ERR_INVALID_ARG : FY_OK;
    if (st == FY_OK && p->tls_ca != NULL && p->tls_ca[0]) {
        rpc_tls_params_t tp;
        rpc_tls_params_default(&tp);
        tp.ca_file = p->tls_ca;
        tp.check_name = !p->tls_any_name;
        char err[200];
        if ((st = rpc_tls_create(&tp, &c->tls, err, sizeof(err))) != FY_OK)
            FY_LOG_ERROR("client", "%s", err);
        cp.tls = c->tls;
    }
    if (st == FY_OK)
        st = rpc_channel_create(c->loop, &cp, &c->ch);
    free(copy);
    if (st != FY_OK) {
        rpc_tls_destroy(c->tls);
        c->tls = NULL;
    }
    c->params = *p;
    c->params.addresses = NULL;
    c->params.token = NULL;
    c->params.tls_ca = NULL;
    if (c->params.max_attempts == 0)
        c->params.max_attempts = 3;
    return st;
}

int ferry_client_create(const ferry_client_params_t *p, ferry_client_t **client_p)
{
    if (p == NULL || client_p == NULL)
        return FY_ERR_INVALID_ARG;
    ferry_client_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return FY_ERR_NO_MEMORY;
    if (uv_loop_init(&c->own_loop) != 0) {
        free(c);
        return FY_ERR_NO_MEMORY;
    }
    c->loop = &c->own_loop;
    c->owns_loop = true;
    int st = client_init(c, p);
    if (st != FY_OK) {
        uv_loop_close(&c->own_loop);
        free(c);
        return st;
    }
    *client_p = c;
    return FY_OK;
}

int ferry_client_create_on_loop(uv_loop_t *loop, const ferry_client_params_t *p,
                                ferry_client_t **client_p)
{
    if (loop == NULL || p == NULL || client_p == NULL)
        return FY_ERR_INVALID_ARG;
    ferry_client_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return FY_ERR_NO_MEMORY;
    c->loop = loop;
    int st = client_init(c, p);
    if (st != FY_OK) {
        free(c);
        return st;
    }
    *client_p = c;
    return FY_OK;
}

void ferry_client_destroy(ferry_client_t *c)
{
    if (c == NULL)
        return;
    rpc_channel_destroy(c->ch);
    rpc_tls_destroy(c->tls); // connections still closing keep its OpenSSL context alive
    if (c->owns_loop) {
        // Run the close callbacks so every handle is gone before the loop closes.
        while (uv_run(&c->own_loop, UV_RUN_NOWAIT) != 0)
            uv_run(&c->own_loop, UV_RUN_ONCE);
        uv_loop_close(&c->own_loop);
    }
    free(c);
}

/* ---- asynchronous ------------------------------------------------------------------------ */

static void async_msg(rpc_ccall_t *rc, const ProtobufCMessage *msg, void *arg)
{
    ferry_call_t *call = arg;
    if (call->on_msg)
        call->on_msg(call, msg, call->arg);
}

static void async_done(rpc_ccall_t *rc, int code, const char *message, void *arg)
{
    ferry_call_t *call = arg;
    call->on_done(call, code, message, call->arg);
    free(call);
}

int ferry_call_async(ferry_client_t *c, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, const ferry_call_opts_t *opts,
                     ferry_msg_cb on_msg, ferry_done_cb on_done, void *arg, ferry_call_t **call_p)
{
    if (c == NULL || method == NULL || req == NULL || resp_desc == NULL || on_done == NULL)
        return FY_ERR_INVALID_ARG;
    ferry_call_t *call = calloc(1, sizeof(*call));
    if (call == NULL)
        return FY_ERR_NO_MEMORY;
    call->on_msg = on_msg;
    call->on_done = on_done;
    call->arg = arg;
    rpc_call_opts_t o = {.timeout_ms = c->params.timeout_ms,
                         .max_attempts = c->params.max_attempts};
    if (opts) {
        if (opts->timeout_ms)
            o.timeout_ms = opts->timeout_ms;
        o.idempotent = opts->idempotent;
        o.wait_for_ready = opts->wait_for_ready;
    }
    fy_status_t st =
        rpc_channel_call(c->ch, method, req, resp_desc, &o, async_msg, async_done, call, &call->rc);
    if (st != FY_OK) {
        free(call);
        return st;
    }
    if (call_p)
        *call_p = call;
    return FY_OK;
}

void ferry_call_cancel(ferry_call_t *call)
{
    if (call != NULL)
        rpc_ccall_cancel(call->rc);
}

/* ---- blocking ---------------------------------------------------------------------------- */

typedef struct {
    bool done;
    int code;
    char message[256];
    ProtobufCMessage *resp; // unary: the kept response
    ferry_generate_cb gen_cb;
    void *gen_arg;
    bool cancel;
} sync_state_t;

static void sync_msg(ferry_call_t *call, const ProtobufCMessage *msg, void *arg)
{
    sync_state_t *s = arg;
    if (s->gen_cb) {
        if (!s->cancel && s->gen_cb(s->gen_arg, (const Ferry__V1__GenerateResponse *)msg) != 0) {
            s->cancel = true;
            ferry_call_cancel(call);
        }
        return;
    }
    // Unary: keep a copy (the rpc layer frees its message after this callback).
    size_t len = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(len ? len : 1);
    if (buf == NULL)
        return;
    protobuf_c_message_pack(msg, buf);
    if (s->resp)
        protobuf_c_message_free_unpacked(s->resp, NULL);
    s->resp = protobuf_c_message_unpack(msg->descriptor, NULL, len, buf);
    free(buf);
}

static void sync_done(ferry_call_t *call, int code, const char *message, void *arg)
{
    sync_state_t *s = arg;
    s->code = code;
    snprintf(s->message, sizeof(s->message), "%s", message);
    s->done = true;
}

static int sync_call(ferry_client_t *c, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *resp_desc, bool idempotent, sync_state_t *s,
                     ferry_error_t *err)
{
    if (c == NULL || !c->owns_loop) {
        if (err) {
            err->code = RPC_CODE_FAILED_PRECONDITION;
            snprintf(err->message, sizeof(err->message), "blocking call on an async client");
        }
        return RPC_CODE_FAILED_PRECONDITION;
    }
    ferry_call_opts_t o = {.idempotent = idempotent};
    int st = ferry_call_async(c, method, req, resp_desc, &o, sync_msg, sync_done, s, NULL);
    if (st != FY_OK) {
        s->code = rpc_code_from_status(st);
        snprintf(s->message, sizeof(s->message), "%s", fy_status_str(st));
    } else {
        while (!s->done)
            uv_run(c->loop, UV_RUN_ONCE);
    }
    if (s->code == RPC_CODE_OK && s->gen_cb == NULL && s->resp == NULL) {
        s->code = RPC_CODE_INTERNAL;
        snprintf(s->message, sizeof(s->message), "no response message");
    }
    if (s->code != RPC_CODE_OK && s->resp) {
        protobuf_c_message_free_unpacked(s->resp, NULL);
        s->resp = NULL;
    }
    if (err) {
        err->code = s->code;
        snprintf(err->message, sizeof(err->message), "%s", s->message);
    }
    return s->code;
}

int ferry_health(ferry_client_t *c, const char *service, Ferry__V1__HealthResponse **resp_p,
                 ferry_error_t *err)
{
    Ferry__V1__HealthRequest req = FERRY__V1__HEALTH_REQUEST__INIT;
    req.service = (char *)(service ? service : "");
    sync_state_t s = {0};
    int code = sync_call(c, "/ferry.v1.Ferry/Health", &req.base,
                         &ferry__v1__health_response__descriptor, true, &s, err);
    if (code == RPC_CODE_OK && resp_p)
        *resp_p = (Ferry__V1__HealthResponse *)s.resp;
    else
        ferry_message_free(s.resp);
    return code;
}

int ferry_complete(ferry_client_t *c, const Ferry__V1__GenerateRequest *req,
                   Ferry__V1__CompleteResponse **resp_p, ferry_error_t *err)
{
    if (req == NULL)
        return RPC_CODE_INVALID_ARGUMENT;
    sync_state_t s = {0};
    int code = sync_call(c, "/ferry.v1.Ferry/Complete", &req->base,
                         &ferry__v1__complete_response__descriptor, false, &s, err);
    if (code == RPC_CODE_OK && resp_p)
        *resp_p = (Ferry__V1__CompleteResponse *)s.resp;
    else
        ferry_message_free(s.resp);
    return code;
}

int ferry_tokenize(ferry_client_t *c, const Ferry__V1__TokenizeRequest *req,
                   Ferry__V1__TokenizeResponse **resp_p, ferry_error_t *err)
{
    if (req == NULL)
        return RPC_CODE_INVALID_ARGUMENT;
    sync_state_t s = {0};
    int code = sync_call(c, "/ferry.v1.Ferry/Tokenize", &req->base,
                         &ferry__v1__tokenize_response__descriptor, true, &s, err);
    if (code == RPC_CODE_OK && resp_p)
        *resp_p = (Ferry__V1__TokenizeResponse *)s.resp;
    else
        ferry_message_free(s.resp);
    return code;
}

int ferry_list_models(ferry_client_t *c, Ferry__V1__ListModelsResponse **resp_p, ferry_error_t *err)
{
    Ferry__V1__ListModelsRequest req = FERRY__V1__LIST_MODELS_REQUEST__INIT;
    sync_state_t s = {0};
    int code = sync_call(c, "/ferry.v1.Ferry/ListModels", &req.base,
                         &ferry__v1__list_models_response__descriptor, true, &s, err);
    if (code == RPC_CODE_OK && resp_p)
        *resp_p = (Ferry__V1__ListModelsResponse *)s.resp;
    else
        ferry_message_free(s.resp);
    return code;
}

int ferry_generate(ferry_client_t *c, const Ferry__V1__GenerateRequest *req, ferry_generate_cb cb,
                   void *arg, ferry_error_t *err)
{
    if (req == NULL || cb == NULL)
        return RPC_CODE_INVALID_ARGUMENT;
    sync_state_t s = {.gen_cb = cb, .gen_arg = arg};
    return sync_call(c, "/ferry.v1.Ferry/Generate", &req->base,
                     &ferry__v1__generate_response__descriptor, false, &s, err);
}
