/*
 * bench_rpc.c: `ferry-bench rpc`, gRPC unary calls/s and streamed messages/s, Ferry's rpc
 * layer beside Python grpcio (grpc.aio) on the same machine.
 *
 * Workloads, each with 1 and 64 calls in flight for --seconds:
 *   - unary: ferry.v1.Ferry/Health, a tiny request and response; calls per second;
 *   - stream: ferry.v1.Ferry/Generate streaming 1000 small messages per call; messages/s.
 * Pairs: Ferry client -> Ferry server, grpcio -> grpcio, and both crossings. The Ferry server
 * runs on its own thread and loop in this process; the grpcio side runs
 * tests/transport/rpc/bench_grpcio.py from the project .venv (skipped with --no-python).
 * With --tls-cert/--tls-key/--tls-ca, Ferry to Ferry again over TLS, in the same run.
 * Output: a table, and JSON with --json FILE.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "common.h"
#include "ferry.pb-c.h"
#include "rpc.h"

#define STREAM_MSGS 1000

/* ---- Ferry server on a thread ------------------------------------------------------------ */

static void h_health(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    Ferry__V1__HealthResponse resp = FERRY__V1__HEALTH_RESPONSE__INIT;
    resp.status = FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING;
    rpc_call_send(call, &resp.base);
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static void h_generate(rpc_call_t *call, const ProtobufCMessage *m, void *arg)
{
    const Ferry__V1__GenerateRequest *req = (const Ferry__V1__GenerateRequest *)m;
    uint32_t n = req->sampling && req->sampling->max_tokens ? req->sampling->max_tokens : 1;
    n = FY_MIN(n, 100000u);
    for (uint32_t i = 0; i < n && !rpc_call_is_cancelled(call); i++) {
        Ferry__V1__GenerateResponse resp = FERRY__V1__GENERATE_RESPONSE__INIT;
        resp.text = "token";
        rpc_call_send(call, &resp.base);
    }
    rpc_call_finish(call, RPC_CODE_OK, NULL);
}

static const rpc_handler_cb k_handlers[] = {h_generate, NULL, NULL, NULL, h_health};
static const bool k_streaming[] = {true, false, false, false, false};

typedef struct {
    uv_thread_t thread;
    uv_loop_t loop;
    uv_async_t stop;
    uv_sem_t ready;
    rpc_server_t *srv;
    int port;
    const rpc_tls_t *tls; // a server configuration, or NULL
} bench_server_t;

static void on_stop(uv_async_t *a)
{
    bench_server_t *s = a->data;
    rpc_server_destroy(s->srv);
    uv_close((uv_handle_t *)&s->stop, NULL);
}

static void server_main(void *arg)
{
    bench_server_t *s = arg;
    uv_loop_init(&s->loop);
    uv_async_init(&s->loop, &s->stop, on_stop);
    s->stop.data = s;
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    p.tls = s->tls;
    if (rpc_server_create(&s->loop, &p, &s->srv) == FY_OK &&
        rpc_server_add_service(s->srv, &ferry__v1__ferry__descriptor, k_handlers, k_streaming,
                               NULL) == FY_OK)
        s->port = rpc_server_port(s->srv);
    uv_sem_post(&s->ready);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
}

/* ---- Ferry client ------------------------------------------------------------------------ */

typedef struct {
    uv_loop_t *loop;
    rpc_channel_t *ch;
    bool stream;
    uint64_t end_ns;
    uint64_t done_calls, msgs, errors;
    int in_flight;
} load_t;

static void start_one(load_t *l);

static void on_msg(rpc_ccall_t *call, const ProtobufCMessage *msg, void *arg)
{
    ((load_t *)arg)->msgs++;
}

static void on_done(rpc_ccall_t *call, int code, const char *message, void *arg)
{
    load_t *l = arg;
    l->in_flight--;
    if (code == RPC_CODE_OK)
        l->done_calls++;
    else
        l->errors++;
    if (fy_clock_ns() < l->end_ns && l->errors < 100)
        start_one(l);
}

static void start_one(load_t *l)
{
    fy_status_t st;
    if (l->stream) {
        Ferry__V1__SamplingParams sp = FERRY__V1__SAMPLING_PARAMS__INIT;
        sp.max_tokens = STREAM_MSGS;
        Ferry__V1__GenerateRequest req = FERRY__V1__GENERATE_REQUEST__INIT;
        req.sampling = &sp;
        st = rpc_channel_call(l->ch, "/ferry.v1.Ferry/Generate", &req.base,
                              &ferry__v1__generate_response__descriptor, NULL, on_msg, on_done, l,
                              NULL);
    } else {
        Ferry__V1__HealthRequest req = FERRY__V1__HEALTH_REQUEST__INIT;
        st = rpc_channel_call(l->ch, "/ferry.v1.Ferry/Health", &req.base,
                              &ferry__v1__health_response__descriptor, NULL, on_msg, on_done, l,
                              NULL);
    }
    if (st == FY_OK)
        l->in_flight++;
    else
        l->errors++;
}

/* Runs one workload; returns calls/s (unary) or messages/s (stream), or -1 on errors. */
static double ferry_client_run(int port, bool stream, int conc, double seconds,
                               const rpc_tls_t *tls)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char addr[32];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", port);
    const char *addrs[1] = {addr};
    rpc_channel_params_t p;
    rpc_channel_params_default(&p);
    p.addresses = addrs;
    p.n_addresses = 1;
    p.tls = tls;
    load_t l = {.loop = &loop, .stream = stream};
    double rate = -1;
    if (rpc_channel_create(&loop, &p, &l.ch) == FY_OK) {
        // Warm up the connection with one call.
        l.end_ns = 0;
        start_one(&l);
        while (l.in_flight > 0)
            uv_run(&loop, UV_RUN_ONCE);
        l.done_calls = l.msgs = 0;
        uint64_t t0 = fy_clock_ns();
        l.end_ns = t0 + (uint64_t)(seconds * 1e9);
        for (int i = 0; i < conc; i++)
            start_one(&l);
        while (l.in_flight > 0)
            uv_run(&loop, UV_RUN_ONCE);
        double el = (double)(fy_clock_ns() - t0) / 1e9;
        if (l.errors == 0)
            rate = (stream ? (double)l.msgs : (double)l.done_calls) / el;
        rpc_channel_destroy(l.ch);
    }
    while (uv_run(&loop, UV_RUN_NOWAIT) != 0)
        ;
    uv_loop_close(&loop);
    return rate;
}

/* ---- grpcio side --------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    bool stream;
    int conc;
} workload_t;

static const workload_t k_work[] = {
    {"unary calls/s, 1 in flight", false, 1},
    {"unary calls/s, 64 in flight", false, 64},
    {"stream msgs/s, 1 stream", true, 1},
    {"stream msgs/s, 64 streams", true, 64},
};

static const char *k_pairs[] = {"ferry->ferry", "grpcio->grpcio", "ferry->grpcio", "grpcio->ferry",
                                "ferry TLS"};
enum { N_PAIRS = sizeof(k_pairs) / sizeof(k_pairs[0]) };

/* Starts `python bench_grpcio.py serve`; returns its pid and port, or -1. */
static pid_t py_serve(const char *python, const char *script, int *port_p)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execl(python, python, script, "serve", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    int port = 0;
    if (f == NULL || fscanf(f, "PORT %d", &port) != 1) {
        if (f)
            fclose(f);
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        return -1;
    }
    fclose(f);
    *port_p = port;
    return pid;
}

/* Runs `python bench_grpcio.py client PORT SECONDS` and parses its 4 rates. */
static bool py_client(const char *python, const char *script, int port, double seconds,
                      double rates[4])
{
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "'%s' '%s' client %d %.2f", python, script, port, seconds);
    FILE *f = popen(cmd, "r");
    if (f == NULL)
        return false;
    int n = 0;
    char line[256];
    while (n < 4 && fgets(line, sizeof(line), f))
        if (sscanf(line, "RATE %lf", &rates[n]) == 1)
            n++;
    return pclose(f) == 0 && n == 4;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: ferry-bench rpc [--json FILE] [--seconds S] [--no-python]\n"
                 "                       [--tls-cert PEM --tls-key PEM --tls-ca PEM]\n"
                 "  unary calls/s and streamed messages/s with 1 and 64 calls in flight,\n"
                 "  Ferry's rpc layer beside Python grpcio (from $FERRY_SOURCE_ROOT/.venv);\n"
                 "  with the TLS files, Ferry to Ferry over TLS too (tests/fixtures/tls/\n"
                 "  make_certs.sh DIR makes a set: DIR/chain.crt, DIR/server.key, DIR/ca.crt).\n");
}

int bench_rpc_main(int argc, char **argv)
{
    const char *json_path = NULL, *tls_files[3] = {NULL, NULL, NULL}; // cert, key, CA
    double seconds = 2.0;
    bool python = true;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
            json_path = argv[++i];
        } else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            seconds = atof(argv[++i]);
            if (!(seconds > 0 && seconds <= 60)) {
                fprintf(stderr, "rpc: --seconds must be in (0, 60]\n");
                return 2;
            }
        } else if (strcmp(argv[i], "--no-python") == 0) {
            python = false;
        } else if (strncmp(argv[i], "--tls-", 6) == 0 && i + 1 < argc &&
                   (strcmp(argv[i] + 6, "cert") == 0 || strcmp(argv[i] + 6, "key") == 0 ||
                    strcmp(argv[i] + 6, "ca") == 0)) {
            const char *k = argv[i] + 6;
            tls_files[k[0] == 'c' ? (k[1] == 'e' ? 0 : 2) : 1] = argv[++i];
        } else {
            usage(strcmp(argv[i], "--help") == 0 ? stdout : stderr);
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    const char *root = getenv("FERRY_SOURCE_ROOT") ? getenv("FERRY_SOURCE_ROOT") : ".";
    char py[1024], script[1024];
    snprintf(py, sizeof(py), "%s/.venv/bin/python", root);
    snprintf(script, sizeof(script), "%s/tests/transport/rpc/bench_grpcio.py", root);
    if (python && (access(py, X_OK) != 0 || access(script, R_OK) != 0)) {
        fprintf(stderr, "rpc: %s or %s missing (run scripts/setup.sh, or pass --no-python)\n", py,
                script);
        return 1;
    }

    rpc_tls_t *stls = NULL, *ctls = NULL;
    if (tls_files[0] || tls_files[1] || tls_files[2]) {
        rpc_tls_params_t tp;
        rpc_tls_params_default(&tp);
        tp.cert_file = tls_files[0];
        tp.key_file = tls_files[1];
        char err[200];
        fy_status_t st = rpc_tls_create(&tp, &stls, err, sizeof(err));
        rpc_tls_params_default(&tp);
        tp.ca_file = tls_files[2];
        if (st == FY_OK)
            st = rpc_tls_create(&tp, &ctls, err, sizeof(err));
        if (st != FY_OK) {
            fprintf(stderr, "rpc: TLS: %s (--tls-cert, --tls-key and --tls-ca together)\n", err);
            rpc_tls_destroy(stls);
            return 2;
        }
    }
    double rate[N_PAIRS][FY_ARRAY_SIZE(k_work)];
    for (size_t p = 0; p < N_PAIRS; p++)
        for (size_t w = 0; w < FY_ARRAY_SIZE(k_work); w++)
            rate[p][w] = -1;

    bench_server_t s = {0};
    uv_sem_init(&s.ready, 0);
    uv_thread_create(&s.thread, server_main, &s);
    uv_sem_wait(&s.ready);
    if (s.port == 0) {
        fprintf(stderr, "rpc: cannot start the Ferry server\n");
        return 1;
    }
    for (size_t w = 0; w < FY_ARRAY_SIZE(k_work); w++)
        rate[0][w] = ferry_client_run(s.port, k_work[w].stream, k_work[w].conc, seconds, NULL);
    if (stls != NULL) { // the same server code over TLS, cell by cell after the cleartext run
        bench_server_t ts = {.tls = stls};
        uv_sem_init(&ts.ready, 0);
        uv_thread_create(&ts.thread, server_main, &ts);
        uv_sem_wait(&ts.ready);
        for (size_t w = 0; w < FY_ARRAY_SIZE(k_work) && ts.port != 0; w++)
            rate[4][w] = ferry_client_run(ts.port, k_work[w].stream, k_work[w].conc, seconds, ctls);
        uv_async_send(&ts.stop);
        uv_thread_join(&ts.thread);
    }
    if (python) {
        double r[4];
        if (py_client(py, script, s.port, seconds, r))
            for (size_t w = 0; w < 4; w++)
                rate[3][w] = r[w];
        int py_port = 0;
        pid_t pid = py_serve(py, script, &py_port);
        if (pid > 0) {
            for (size_t w = 0; w < FY_ARRAY_SIZE(k_work); w++)
                rate[2][w] =
                    ferry_client_run(py_port, k_work[w].stream, k_work[w].conc, seconds, NULL);
            if (py_client(py, script, py_port, seconds, r))
                for (size_t w = 0; w < 4; w++)
                    rate[1][w] = r[w];
            kill(pid, SIGTERM);
            waitpid(pid, NULL, 0);
        }
    }
    uv_async_send(&s.stop);
    uv_thread_join(&s.thread);

    printf("%-30s", "workload (client->server)");
    for (size_t p = 0; p < N_PAIRS; p++)
        printf(" %15s", k_pairs[p]);
    printf("\n");
    for (size_t w = 0; w < FY_ARRAY_SIZE(k_work); w++) {
        printf("%-30s", k_work[w].name);
        for (size_t p = 0; p < N_PAIRS; p++) {
            if (rate[p][w] < 0)
                printf(" %15s", "-");
            else
                printf(" %15.0f", rate[p][w]);
        }
        printf("\n");
    }
    if (json_path) {
        cJSON *root_j = cJSON_CreateObject();
        cJSON_AddStringToObject(root_j, "bench", "rpc");
        cJSON_AddNumberToObject(root_j, "seconds_per_cell", seconds);
        cJSON_AddNumberToObject(root_j, "stream_messages_per_call", STREAM_MSGS);
        cJSON *arr = cJSON_AddArrayToObject(root_j, "results");
        for (size_t w = 0; w < FY_ARRAY_SIZE(k_work); w++) {
            for (size_t p = 0; p < N_PAIRS; p++) {
                if (rate[p][w] < 0)
                    continue;
                cJSON *o = cJSON_CreateObject();
                cJSON_AddStringToObject(o, "pair", k_pairs[p]);
                cJSON_AddStringToObject(o, "kind", k_work[w].stream ? "stream" : "unary");
                cJSON_AddNumberToObject(o, "in_flight", k_work[w].conc);
                cJSON_AddStringToObject(o, "unit", k_work[w].stream ? "messages/s" : "calls/s");
                cJSON_AddNumberToObject(o, "rate", rate[p][w]);
                cJSON_AddItemToArray(arr, o);
            }
        }
        char *text = cJSON_Print(root_j);
        FILE *f = fopen(json_path, "w");
        if (f == NULL || text == NULL) {
            fprintf(stderr, "rpc: cannot write %s\n", json_path);
        } else {
            fputs(text, f);
            fputc('\n', f);
        }
        if (f)
            fclose(f);
        free(text);
        cJSON_Delete(root_j);
    }
    rpc_tls_destroy(stls);
    rpc_tls_destroy(ctls);
    return rate[0][0] < 0 ? 1 : 0;
}
