/*
 * ferry health ADDR: asks a router or worker for its Health over gRPC, through the
 * libferry-client SDK. Exit status 0 when the server is SERVING, 1 when it answers anything
 * else or cannot be reached, 2 on bad usage.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ferry_client.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: ferry health ADDR[,ADDR...] [--timeout MS] [--token TOKEN]"
                 " [--service NAME] [--tls-ca FILE [--tls-any-name]]\n"
                 "  ADDR is host:port of a Ferry router or worker (gRPC).\n"
                 "  --timeout MS   deadline of the call (default 5000)\n"
                 "  --token TOKEN  bearer token (default: $FERRY_TOKEN, else $FERRY_API_KEY)\n"
                 "  --service NAME service to ask about (default: the server itself)\n"
                 "  --tls-ca FILE  TLS, the server verified with the PEM certificates in FILE\n"
                 "                 (default: $FERRY_TLS_CA; unset = cleartext h2c)\n"
                 "  --tls-any-name accept a certificate FILE verifies whatever host it names\n");
}

static const char *status_name(Ferry__V1__HealthResponse__ServingStatus s)
{
    switch (s) {
    case FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING:
        return "SERVING";
    case FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__NOT_SERVING:
        return "NOT_SERVING";
    case FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__DRAINING:
        return "DRAINING";
    default:
        return "UNKNOWN";
    }
}

int cli_health_main(int argc, char **argv)
{
    const char *addr = NULL, *service = NULL, *token = getenv("FERRY_TOKEN");
    const char *tls_ca = getenv("FERRY_TLS_CA");
    bool tls_any_name = false;
    if (token == NULL || token[0] == '\0')
        token = getenv("FERRY_API_KEY");
    uint64_t timeout_ms = 5000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--timeout") == 0 && i + 1 < argc) {
            if (fy_parse_duration_ms(argv[++i], &timeout_ms) != FY_OK || timeout_ms == 0 ||
                timeout_ms > 24ull * 3600 * 1000) {
                fprintf(stderr, "ferry health: bad --timeout '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(a, "--token") == 0 && i + 1 < argc) {
            token = argv[++i];
        } else if (strcmp(a, "--service") == 0 && i + 1 < argc) {
            service = argv[++i];
        } else if (strcmp(a, "--tls-ca") == 0 && i + 1 < argc) {
            tls_ca = argv[++i];
        } else if (strcmp(a, "--tls-any-name") == 0) {
            tls_any_name = true;
        } else if (a[0] == '-' || addr != NULL) {
            fprintf(stderr, "ferry health: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        } else {
            addr = a;
        }
    }
    if (addr == NULL) {
        usage(stderr);
        return 2;
    }
    ferry_client_params_t p;
    ferry_client_params_default(&p);
    p.addresses = addr;
    p.token = token;
    p.timeout_ms = (uint32_t)timeout_ms;
    p.connect_timeout_ms = (uint32_t)timeout_ms;
    p.tls_ca = tls_ca;
    p.tls_any_name = tls_any_name;
    ferry_client_t *c;
    int st = ferry_client_create(&p, &c);
    if (st != 0) {
        fprintf(stderr, "ferry health: bad address '%s'%s: %s\n", addr,
                tls_ca && tls_ca[0] ? " or --tls-ca file" : "", fy_status_str((fy_status_t)st));
        return 2;
    }
    Ferry__V1__HealthResponse *resp = NULL;
    ferry_error_t err;
    int code = ferry_health(c, service, &resp, &err);
    int rc;
    if (code != 0) {
        fprintf(stderr, "ferry health: %s: %s: %s\n", addr, ferry_code_name(code), err.message);
        rc = 1;
    } else {
        printf("%s: %s", addr, status_name(resp->status));
        if (resp->role && resp->role[0])
            printf(" role=%s", resp->role);
        if (resp->version && resp->version[0])
            printf(" version=%s", resp->version);
        printf("\n");
        rc = resp->status == FERRY__V1__HEALTH_RESPONSE__SERVING_STATUS__SERVING ? 0 : 1;
    }
    ferry_message_free(resp);
    ferry_client_destroy(c);
    return rc;
}
