/*
 * cluster_health.h: the health check `ferry cluster`, ferry-bench e2e and the cluster tests
 * hand to fy_cluster_up/fy_cluster_status (fy_cluster_health_cb): gRPC Health through the
 * client SDK. Header-only, because the cluster library is built before the SDK; include it
 * from code that links client_dep.
 */
#ifndef FERRY_CLUSTER_HEALTH_H
#define FERRY_CLUSTER_HEALTH_H

#include "ferry_client.h"

#include "cluster.h"

/* 0 when addr (HOST:PORT) answers Health with SERVING within a few seconds; arg: the cluster's
 * spec (TLS as its daemons speak it), or NULL (cleartext). */
static inline int fy_cluster_sdk_health(void *arg, const char *addr)
{
    const fy_cluster_spec_t *spec = (const fy_cluster_spec_t *)arg;
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = addr;
    p.tls_ca = fy_cluster_tls_ca(spec);
    p.tls_any_name = spec != NULL && spec->tls_any_name;
    p.timeout_ms = 3000;
    p.connect_timeout_ms = 1000;
    p.max_attempts = 1;
    ferry_client_t *c;
    if (ferry_client_create(&p, &c) != 0)
        return -1;
    Ferry__V1__HealthResponse *resp = NULL;
    ferry_error_t err;
    int code = ferry_health(c, NULL, &resp, &err);
    int rc = code == 0 && resp != NULL &&
                     resp->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING
                 ? 0
                 : 1;
    ferry_message_free(resp);
    ferry_client_destroy(c);
    return rc;
}

#endif
