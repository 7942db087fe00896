/*
 * nccl_link_pair.c: what the daemons need to choose and make a pair's link (nccl_link.h,
 * "Pair links in the daemons"): the link's name, its id and its ends by kind, and the node
 * identity two workers compare before they pair. Built with FERRY_HAVE_NCCL when this build
 * has the NCCL backend; without it, or without libnccl on the node, "nccl" is refused and
 * "auto" means no pairing.
 */
#include "nccl_link.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

#define MOD "kvlink-pair"

fy_status_t kvlink_pair_kind_parse(const char *s, bool cuda, kvlink_pair_kind_t *kind_p)
{
    if (s == NULL || kind_p == NULL)
        return FY_ERR_INVALID_ARG;
#ifdef FERRY_HAVE_NCCL
    bool nccl = kvlink_nccl_available(); // libnccl on this node
#else
    bool nccl = false;
#endif
    if (strcmp(s, "off") == 0) {
        *kind_p = KVLINK_PAIR_OFF;
    } else if (strcmp(s, "socket") == 0) {
        *kind_p = KVLINK_PAIR_SOCKET;
    } else if (strcmp(s, "nccl") == 0) {
        if (!nccl || !cuda)
            return FY_ERR_UNSUPPORTED;
        *kind_p = KVLINK_PAIR_NCCL;
    } else if (strcmp(s, "auto") == 0) {
        *kind_p = nccl && cuda ? KVLINK_PAIR_NCCL : KVLINK_PAIR_OFF;
    } else {
        return FY_ERR_INVALID_ARG;
    }
    return FY_OK;
}

const char *kvlink_pair_kind_name(kvlink_pair_kind_t kind)
{
    return kind == KVLINK_PAIR_NCCL ? "nccl" : kind == KVLINK_PAIR_SOCKET ? "socket" : "";
}

fy_status_t kvlink_pair_id_create(kvlink_pair_kind_t kind, const char *host, uint8_t *id)
{
    switch (kind) {
    case KVLINK_PAIR_SOCKET:
        return kvlink_nccl_sock_id_create(host, id);
    case KVLINK_PAIR_NCCL:
#ifdef FERRY_HAVE_NCCL
        return kvlink_nccl_id_create(id);
#else
        return FY_ERR_UNSUPPORTED;
#endif
    default:
        return FY_ERR_INVALID_ARG;
    }
}

fy_status_t kvlink_pair_create(kvlink_pair_kind_t kind, const uint8_t *id, size_t id_len,
                               const kvlink_nccl_params_t *params, kvlink_nccl_t **pair_p)
{
    switch (kind) {
    case KVLINK_PAIR_SOCKET:
        return kvlink_nccl_sock_create(id, id_len, params, pair_p);
    case KVLINK_PAIR_NCCL:
#ifdef FERRY_HAVE_NCCL
        return kvlink_nccl_create(id, id_len, params, pair_p);
#else
        return FY_ERR_UNSUPPORTED;
#endif
    default:
        return FY_ERR_INVALID_ARG;
    }
}

fy_status_t kvlink_pair_node_id(char *buf, size_t cap)
{
    if (buf == NULL || cap < 33)
        return FY_ERR_INVALID_ARG;
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f == NULL)
        return FY_ERR_IO;
    char line[64] = "";
    bool ok = fgets(line, sizeof(line), f) != NULL;
    fclose(f);
    size_t n = 0;
    for (const char *p = line; ok && *p != '\0' && n + 1 < cap; p++) {
        if (isxdigit((unsigned char)*p))
            buf[n++] = *p;
    }
    buf[n] = '\0';
    return ok && n >= 32 ? FY_OK : FY_ERR_IO;
}

fy_status_t kvlink_pair_identity(const char *link, const char *node_id, bool cuda, int device,
                                 kvlink_pair_identity_t *id_p, char *err, size_t err_len)
{
    if (id_p == NULL)
        return FY_ERR_INVALID_ARG;
    memset(id_p, 0, sizeof(*id_p));
    fy_status_t st = kvlink_pair_kind_parse(link != NULL ? link : "auto", cuda, &id_p->kind);
    if (st != FY_OK) {
        snprintf(err, err_len, "pair link \"%s\": %s", link,
                 st == FY_ERR_UNSUPPORTED ? "nccl needs a CUDA model and libnccl"
                                          : "auto, nccl, socket or off");
        return st;
    }
    if (id_p->kind == KVLINK_PAIR_OFF)
        return FY_OK;
    if (node_id != NULL && node_id[0] != '\0') {
        if (strlen(node_id) >= sizeof(id_p->node_id)) {
            id_p->kind = KVLINK_PAIR_OFF;
            snprintf(err, err_len, "node id longer than 63 bytes");
            return FY_ERR_INVALID_ARG;
        }
        snprintf(id_p->node_id, sizeof(id_p->node_id), "%s", node_id);
    } else if (kvlink_pair_node_id(id_p->node_id, sizeof(id_p->node_id)) != FY_OK) {
        FY_LOG_WARN(MOD, "no boot id to pair by: pair links off (set a node id)");
        id_p->kind = KVLINK_PAIR_OFF;
        id_p->node_id[0] = '\0';
        return FY_OK;
    }
    if (id_p->kind == KVLINK_PAIR_NCCL &&
        fy_cuda_device_uuid(device, id_p->pair_device, sizeof(id_p->pair_device)) != FY_OK) {
        FY_LOG_WARN(MOD, "no GPU UUID: NCCL pair links off");
        memset(id_p, 0, sizeof(*id_p));
    }
    return FY_OK;
}
