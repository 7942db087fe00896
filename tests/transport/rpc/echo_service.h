/*
 * echo_service.h: the interop test service (interop.proto, ferry.test.Echo) and a Health
 * handler for ferry.v1.Ferry, served by Ferry's rpc server; used by the in-process tests and
 * by the rpc_echo_server binary that the Python grpcio client calls.
 */
#ifndef FERRY_TESTS_ECHO_SERVICE_H
#define FERRY_TESTS_ECHO_SERVICE_H

#include "rpc.h"

/* Registers ferry.test.Echo and ferry.v1.Ferry (Health only) on srv. Loop thread. */
fy_status_t echo_service_register(rpc_server_t *srv, uv_loop_t *loop);

/* Cancellations the Echo handlers have seen (for tests). Thread: any. */
unsigned echo_service_cancels(void);
/* Response bytes queued behind flow control right after the last burst of Stream sends. */
size_t echo_service_stream_pending(void);

/* An echo server on its own thread and loop, for tests that block on the main thread. */
typedef struct echo_thread echo_thread_t;
fy_status_t echo_thread_start(const rpc_server_params_t *params, echo_thread_t **t_p);
int echo_thread_port(const echo_thread_t *t);
/* Graceful shutdown (drain_ms), then joins and frees. */
void echo_thread_stop(echo_thread_t *t, uint32_t drain_ms);

#endif
