/*
 * rpc_echo_server: serves the interop test service with Ferry's rpc server so that a stock
 * gRPC client (Python grpcio in interop_client.py) can call it.
 *
 *   rpc_echo_server [--port N] [--max-message BYTES] [--token T] [--tls-cert PEM --tls-key PEM]
 * Prints "PORT <n>" once listening; drains and exits on SIGTERM or SIGINT.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "echo_service.h"

static rpc_server_t *g_srv;
static uv_signal_t g_sigterm, g_sigint;
static const char *g_token;

static void on_drained(rpc_server_t *srv, void *arg)
{
    rpc_server_destroy(srv);
    uv_close((uv_handle_t *)&g_sigterm, NULL);
    uv_close((uv_handle_t *)&g_sigint, NULL);
}

static void on_signal(uv_signal_t *s, int signum)
{
    uv_signal_stop(&g_sigterm);
    uv_signal_stop(&g_sigint);
    rpc_server_shutdown(g_srv, 2000, on_drained, NULL);
}

static fy_status_t check_token(void *arg, const char *path, const char *authorization)
{
    // Only the Echo service is guarded, so Health stays open as in a real deployment.
    if (strncmp(path, "/ferry.test.Echo/", 17) != 0)
        return FY_OK;
    if (authorization == NULL || strncmp(authorization, "Bearer ", 7) != 0 ||
        strcmp(authorization + 7, g_token) != 0)
        return FY_ERR_UNAUTHENTICATED;
    return FY_OK;
}

int main(int argc, char **argv)
{
    rpc_server_params_t p;
    rpc_server_params_default(&p);
    rpc_tls_params_t tp;
    rpc_tls_params_default(&tp);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--port") == 0)
            p.port = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--max-message") == 0)
            p.max_message = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--token") == 0)
            g_token = argv[i + 1];
        else if (strcmp(argv[i], "--tls-cert") == 0)
            tp.cert_file = argv[i + 1];
        else if (strcmp(argv[i], "--tls-key") == 0)
            tp.key_file = argv[i + 1];
    }
    rpc_tls_t *tls = NULL;
    char err[200];
    if (tp.cert_file != NULL && rpc_tls_create(&tp, &tls, err, sizeof(err)) != FY_OK) {
        fprintf(stderr, "rpc_echo_server: %s\n", err);
        return 1;
    }
    p.tls = tls;
    if (g_token) {
        p.auth = check_token;
    }
    uv_loop_t *loop = uv_default_loop();
    fy_status_t st = rpc_server_create(loop, &p, &g_srv);
    if (st == FY_OK)
        st = echo_service_register(g_srv, loop);
    if (st != FY_OK) {
        fprintf(stderr, "rpc_echo_server: %s\n", fy_status_str(st));
        return 1;
    }
    uv_signal_init(loop, &g_sigterm);
    uv_signal_init(loop, &g_sigint);
    uv_signal_start(&g_sigterm, on_signal, SIGTERM);
    uv_signal_start(&g_sigint, on_signal, SIGINT);
    printf("PORT %d\n", rpc_server_port(g_srv));
    fflush(stdout);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    rpc_tls_destroy(tls);
    return 0;
}
