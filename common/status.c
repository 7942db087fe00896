/*
 * status.c: strings, names and gRPC codes of fy_status_t, all generated from FY_STATUS_LIST so
 * that adding a code is one line in common.h.
 */
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

const char *fy_status_str(fy_status_t st)
{
    switch (st) {
#define FY_X_STR(name, value, grpc, msg)                                                       \
    case name:                                                                                 \
        return msg;
        FY_STATUS_LIST(FY_X_STR)
#undef FY_X_STR
    }
    return "unknown status";
}

const char *fy_status_name(fy_status_t st)
{
    switch (st) {
#define FY_X_NAME(name, value, grpc, msg)                                                      \
    case name:                                                                                 \
        return #name;
        FY_STATUS_LIST(FY_X_NAME)
#undef FY_X_NAME
    }
    return "FY_ERR_UNKNOWN";
}

int fy_status_grpc_code(fy_status_t st)
{
    switch (st) {
#define FY_X_GRPC(name, value, grpc, msg)                                                      \
    case name:                                                                                 \
        return grpc;
        FY_STATUS_LIST(FY_X_GRPC)
#undef FY_X_GRPC
    }
    return 2; // UNKNOWN
}

fy_status_t fy_status_from_errno(int err)
{
    switch (err) {
    case 0:
        return FY_OK;
    case EINVAL:
        return FY_ERR_INVALID_ARG;
    case ENOMEM:
        return FY_ERR_NO_MEMORY;
    case ENOENT:
        return FY_ERR_NOT_FOUND;
    case EEXIST:
        return FY_ERR_EXISTS;
    case EACCES:
    case EPERM:
        return FY_ERR_PERMISSION;
    case EAGAIN:
    case EINTR:
        return FY_ERR_AGAIN;
    case EBUSY:
    case EADDRINUSE:
        return FY_ERR_BUSY;
    case ETIMEDOUT:
        return FY_ERR_TIMEOUT;
    case ECANCELED:
        return FY_ERR_CANCELLED;
    case ECONNREFUSED:
    case ECONNRESET:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EPIPE:
        return FY_ERR_UNAVAILABLE;
    case ENOSPC:
    case EMFILE:
    case ENFILE:
        return FY_ERR_RESOURCE_EXHAUSTED;
    case ERANGE:
    case EOVERFLOW:
        return FY_ERR_OUT_OF_RANGE;
    case ENOTSUP:
    case ENOSYS:
        return FY_ERR_UNSUPPORTED;
    default:
        return FY_ERR_IO;
    }
}

void fy_assert_fail(const char *expr, const char *file, int line)
{
    fy_log(FY_LOG_ERROR, "assert", "%s:%d: invariant violated: %s", file, line, expr);
    abort();
}
