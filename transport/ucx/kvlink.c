/*
 * kvlink.c: the KV data plane over UCX (see kvlink.h for the contract, kvlink_int.h for the
 * wire layout, docs/kvlink.md for the protocol).
 *
 * Everything runs on the loop thread of the link. The worker's event fd sits in a uv_poll;
 * after each batch of work the worker is progressed until idle and re-armed, so an idle link
 * sleeps in epoll. API calls that post work start a uv_idle "kick" that does the same once and
 * stops itself.
 *
 * Lifetimes: a peer (one endpoint) is referenced by the send and receive requests bound to it;
 * a failed peer leaves the lookup list at once (so a new connect to the same address makes a
 * new endpoint) and is freed when its last reference goes. A send request outlives its end
 * callback while UCX still holds some of its frames. A receive buffer outlives its request
 * until released.
 */
#include "kvlink.h"
#include "kvlink_int.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <ucp/api/ucp.h>

#define MOD "kvlink"

/* ------------------------------------------------------------------------------------------ */
/* Intrusive lists                                                                             */
/* ------------------------------------------------------------------------------------------ */

typedef struct kvlink_list {
    struct kvlink_list *prev, *next;
} kvlink_list_t;

static void list_init(kvlink_list_t *h)
{
    h->prev = h->next = h;
}
static bool list_empty(const kvlink_list_t *h)
{
    return h->next == h;
}
static void list_push(kvlink_list_t *h, kvlink_list_t *n)
{
    n->prev = h->prev;
    n->next = h;
    h->prev->next = n;
    h->prev = n;
}
static void list_del(kvlink_list_t *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}
#define CONTAINER(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* ------------------------------------------------------------------------------------------ */
/* Objects                                                                                     */
/* ------------------------------------------------------------------------------------------ */

struct kvlink_ctx {
    ucp_context_h ucp;
};

typedef enum {
    PEER_CONNECTING, /* endpoint made, HELLO sent (client) or awaited (server) */
    PEER_READY,
    PEER_FAILED,
} peer_state_t;

typedef struct kvlink_peer {
    kvlink_list_t node; /* link->peers while usable, link->dead_peers after failure */
    kvlink_t *link;
    ucp_ep_h ep;
    char addr[80];
    bool outgoing;
    peer_state_t state;
    fy_status_t fail_st;
    int refs;         /* bound requests */
    bool closed;      /* ep close posted */
    bool refused;     /* we refused its handshake; waiting for it to hang up */
    uint64_t remote_instance;
    uint64_t remote_max_frame;
    kvlink_list_t sends; /* kvlink_send_t.node */
} kvlink_peer_t;

typedef struct {
    kvlink_list_t node; /* req->queue, then req->inflight */
    kvlink_send_t *req;
    uint8_t hdr[KVLINK_HDR_MAX];
    size_t hdr_len;
    const void *data;
    size_t len;
    bool stalled;
    kvlink_frame_done_cb on_done;
    void *arg;
} send_frame_t;

struct kvlink_send {
    kvlink_list_t node; /* peer->sends */
    kvlink_t *link;
    kvlink_peer_t *peer;
    uint64_t id;
    kvlink_send_params_t params;
    bool open_sent, open_granted, finished, end_sent, ended;
    uint64_t window, credits;
    uint32_t n_frames;
    uint64_t n_bytes;
    kvlink_list_t queue;
    uint32_t n_queued, n_inflight;
};

typedef struct kvlink_rreq {
    kvlink_list_t node; /* link->rreqs */
    uint64_t id, serial;
    kvlink_peer_t *peer; /* NULL until OPEN */
    size_t window;
    uint64_t outstanding; /* payload bytes received or receiving, not yet released */
    uint64_t deadline_ns;
    uint32_t frames_seen, frames_delivered;
    uint64_t bytes_seen;
    bool end_seen;
    uint32_t end_frames;
    uint64_t end_bytes;
    uint32_t recv_pending;
    kvlink_list_t bufs; /* kvlink_buf_t.rnode: buffers not yet released */
} kvlink_rreq_t;

struct kvlink_buf {
    kvlink_list_t node;  /* link->bufs (every live buffer) */
    kvlink_list_t rnode; /* rreq->bufs while the request lives */
    kvlink_t *link;
    kvlink_rreq_t *rreq; /* NULL once the request is gone */
    uint64_t request_id;
    uint32_t layer, crc;
    size_t len;
    uint8_t *data; /* [len] */
    bool in_pool, delivered, self_checked;
    size_t off, alen;
};

/* A control message in flight: its header must live until UCX is done with it. */
typedef struct {
    uint8_t hdr[KVLINK_HDR_MAX];
    char reason[KVLINK_REASON_MAX];
    kvlink_t *link;
} ctl_msg_t;

struct kvlink {
    kvlink_ctx_t *ctx;
    uv_loop_t *loop;
    kvlink_params_t params;
    ucp_worker_h worker;
    int efd;
    uv_poll_t poll;
    uv_idle_t kick;
    uv_timer_t sweep;
    int handles_open;
    ucp_listener_h listener;
    uint64_t instance_id;
    // receive memory
    uint8_t *pool_mem; /* [recv_pool_bytes] */
    ucp_mem_h pool_memh;
    kvlink_pool_t pool;
    size_t credit_reserved;
    kvlink_list_t peers, dead_peers, rreqs, bufs;
    uint64_t next_serial;
    kvlink_stats_t st;
    int in_progress;
    int closing;      /* endpoint closes in progress */
    int ctl_inflight; /* control messages UCX still holds */
    bool destroying, quiet;
};

static void link_kick(kvlink_t *link);
static void peer_fail(kvlink_peer_t *peer, fy_status_t st, const char *why);
static void send_fail(kvlink_send_t *req, fy_status_t st, bool tell_peer);
static void send_pump(kvlink_send_t *req);
static void rreq_finish(kvlink_t *link, kvlink_rreq_t *r, fy_status_t st, bool tell_peer);

static fy_status_t status_from_ucs(ucs_status_t s)
{
    switch (s) {
    case UCS_OK:
        return FY_OK;
    case UCS_ERR_NO_MEMORY:
        return FY_ERR_NO_MEMORY;
    case UCS_ERR_INVALID_PARAM:
        return FY_ERR_INVALID_ARG;
    case UCS_ERR_CANCELED:
        return FY_ERR_CANCELLED;
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_ENDPOINT_TIMEOUT:
        return FY_ERR_TIMEOUT;
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
        return FY_ERR_UNAVAILABLE;
    case UCS_ERR_BUSY:
        return FY_ERR_BUSY;
    case UCS_ERR_UNSUPPORTED:
        return FY_ERR_UNSUPPORTED;
    default:
        return FY_ERR_TRANSPORT;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Context                                                                                     */
/* ------------------------------------------------------------------------------------------ */

void kvlink_ctx_params_default(kvlink_ctx_params_t *params)
{
    memset(params, 0, sizeof(*params));
    params->keepalive_ms = 1000;
}

fy_status_t kvlink_ctx_create(const kvlink_ctx_params_t *params, kvlink_ctx_t **ctx_p)
{
    kvlink_ctx_params_t def;
    if (params == NULL) {
        kvlink_ctx_params_default(&def);
        params = &def;
    }
    // UCX 1.13 leaves cma (single-copy process_vm_readv/writev) out of the rendezvous lanes of
    // endpoints with peer failure handling (ours), because its memory domain does not claim to
    // invalidate a registration after a peer failure: bulk data then crosses loopback TCP at a
    // third of the speed. kvlink never hands memory back while UCX holds it (a receive buffer
    // is freed once UCX completes or fails its transfer; a frame's bytes stay borrowed until
    // frame_done), so the missing invalidation exposes nothing. Set through the environment:
    // ucp_config_modify offers the key to every transport and the others warn on stdout.
    const char *tls_sel = params->tls != NULL ? params->tls : getenv("UCX_TLS");
    if ((tls_sel == NULL || strstr(tls_sel, "all") || strstr(tls_sel, "sm") ||
         strstr(tls_sel, "cma")) &&
        getenv("UCX_CMA_MEMORY_INVALIDATE") == NULL)
        setenv("UCX_CMA_MEMORY_INVALIDATE", "y", 0);
    ucp_config_t *config;
    ucs_status_t s = ucp_config_read(NULL, NULL, &config);
    if (s != UCS_OK) {
        FY_LOG_ERROR(MOD, "ucp_config_read: %s", ucs_status_string(s));
        return FY_ERR_TRANSPORT;
    }
    if (params->keepalive_ms > 0 && getenv("UCX_KEEPALIVE_INTERVAL") == NULL) {
        char v[32];
        snprintf(v, sizeof(v), "%ums", params->keepalive_ms);
        ucp_config_modify(config, "KEEPALIVE_INTERVAL", v); // best effort: older UCX lacks it
    }
    // A listener restarted on its port (a decode worker after a crash) must bind while the
    // old connections still sit in TIME_WAIT: SO_REUSEADDR on the connection managers'
    // listeners (never a second live listener on Linux).
    if (getenv("UCX_CM_REUSEADDR") == NULL && getenv("UCX_TCP_CM_REUSEADDR") == NULL &&
        ucp_config_modify(config, "CM_REUSEADDR", "y") != UCS_OK)
        FY_LOG_DEBUG(MOD, "this UCX has no CM_REUSEADDR setting");
    // UCX 1.13 leaves shared memory out of endpoints that need peer failure detection (ours
    // do) unless its error handling is enabled.
    if (params->tls != NULL && ucp_config_modify(config, "TLS", params->tls) != UCS_OK) {
        FY_LOG_ERROR(MOD, "invalid UCX transport list '%s'", params->tls);
        ucp_config_release(config);
        return FY_ERR_INVALID_ARG;
    }
    if (params->net_devices != NULL &&
        ucp_config_modify(config, "NET_DEVICES", params->net_devices) != UCS_OK) {
        FY_LOG_ERROR(MOD, "invalid UCX device list '%s'", params->net_devices);
        ucp_config_release(config);
        return FY_ERR_INVALID_ARG;
    }
    const char *tls = params->tls != NULL ? params->tls : getenv("UCX_TLS");
    bool may_use_shm = tls == NULL || strstr(tls, "all") || strstr(tls, "sm") ||
                       strstr(tls, "posix") || strstr(tls, "sysv") || strstr(tls, "mm");
    if (may_use_shm && getenv("UCX_MM_ERROR_HANDLING") == NULL &&
        ucp_config_modify(config, "MM_ERROR_HANDLING", "y") != UCS_OK)
        FY_LOG_DEBUG(MOD, "this UCX has no MM_ERROR_HANDLING setting");
    ucp_params_t up;
    memset(&up, 0, sizeof(up));
    up.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    up.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    up.mt_workers_shared = 1;
    kvlink_ctx_t *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        ucp_config_release(config);
        return FY_ERR_NO_MEMORY;
    }
    s = ucp_init(&up, config, &ctx->ucp);
    ucp_config_release(config);
    if (s != UCS_OK) {
        FY_LOG_ERROR(MOD, "ucp_init: %s", ucs_status_string(s));
        free(ctx);
        return FY_ERR_TRANSPORT;
    }
    *ctx_p = ctx;
    return FY_OK;
}

void kvlink_ctx_destroy(kvlink_ctx_t *ctx)
{
    if (ctx == NULL)
        return;
    ucp_cleanup(ctx->ucp);
    free(ctx);
}

/* ------------------------------------------------------------------------------------------ */
/* Progress                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void ep_closed(void *request, ucs_status_t status, void *user_data)
{
    kvlink_t *link = user_data;
    link->closing--;
    ucp_request_free(request);
}

static void link_reap_peers(kvlink_t *link)
{
    // Failed peers: close the endpoint outside UCX callbacks, free once unreferenced.
    kvlink_list_t *n = link->dead_peers.next;
    while (n != &link->dead_peers) {
        kvlink_list_t *next = n->next;
        kvlink_peer_t *p = CONTAINER(n, kvlink_peer_t, node);
        if (!p->closed && p->ep != NULL) {
            ucp_request_param_t rp;
            memset(&rp, 0, sizeof(rp));
            rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
            // Force: a live peer was flushed first (kvlink_destroy); a graceful close would
            // wait for the other side, which may be gone or busy.
            rp.flags = UCP_EP_CLOSE_FLAG_FORCE;
            rp.op_attr_mask |= UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
            rp.cb.send = ep_closed;
            rp.user_data = link;
            void *r = ucp_ep_close_nbx(p->ep, &rp);
            if (UCS_PTR_IS_PTR(r))
                link->closing++;
            p->closed = true;
            p->ep = NULL;
        }
        if (p->refs == 0) {
            list_del(&p->node);
            link->st.peers--;
            free(p);
        }
        n = next;
    }
}

/* Whether UCX holds work of ours that an answer from the peer will move on. */
static bool link_busy(const kvlink_t *link)
{
    return link->st.frames_in_flight > 0 || link->st.recv_pending > 0 || link->ctl_inflight > 0;
}

/* Calls of ucp_worker_progress one turn may make before it yields to the loop. UCX can report
 * progress forever without any of it reaching us: a shared-memory keepalive into a peer whose
 * FIFO is full counts as progress on every retry. A turn that never ended would starve the
 * loop's timers and the peer's own progress when both ends share the loop. */
#define PROGRESS_BUDGET 1024

/* Progresses the worker until idle and arms it; false when the budget ran out first. */
static bool link_drain_and_arm(kvlink_t *link)
{
    int budget = PROGRESS_BUDGET;
    for (;;) {
        while (ucp_worker_progress(link->worker) != 0)
            if (--budget <= 0)
                return false;
        // While transfers are in flight, poll a little longer before sleeping: a rendezvous
        // takes several round trips and each wakeup through epoll costs more than the wait.
        // Bounded by spin_us after the last progress, so an idle link still sleeps.
        if (link->params.spin_us > 0 && link_busy(link)) {
            uint64_t until = fy_clock_ns() + link->params.spin_us * 1000ull;
            while (fy_clock_ns() < until && link_busy(link))
                if (ucp_worker_progress(link->worker) != 0) {
                    if (--budget <= 0)
                        return false;
                    until = fy_clock_ns() + link->params.spin_us * 1000ull;
                }
        }
        if (link->in_progress == 1)
            link_reap_peers(link);
        if (ucp_worker_arm(link->worker) != UCS_ERR_BUSY)
            return true;
        if (--budget <= 0)
            return false;
    }
}

static void link_progress_once(kvlink_t *link)
{
    link->in_progress++;
    bool armed = link_drain_and_arm(link);
    link->in_progress--;
    // Not armed, the event fd may stay silent: come back on the next loop turn instead.
    if (!armed)
        link_kick(link);
}

void kvlink_progress(kvlink_t *link)
{
    link_progress_once(link);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    link_progress_once(h->data);
}

static void on_kick(uv_idle_t *h)
{
    uv_idle_stop(h);
    link_progress_once(h->data);
}

static void link_kick(kvlink_t *link)
{
    if (!link->destroying)
        uv_idle_start(&link->kick, on_kick);
}

static void on_sweep(uv_timer_t *t);

/* The sweep (deadlines, and UCX keepalive, which only runs inside progress) ticks while any
 * request is open; an idle link has no timer and sleeps in epoll. */
static void link_sweep_arm(kvlink_t *link)
{
    if (!link->destroying && !uv_is_active((uv_handle_t *)&link->sweep) &&
        link->st.send_reqs + link->st.recv_reqs > 0)
        uv_timer_start(&link->sweep, on_sweep, link->params.sweep_ms, link->params.sweep_ms);
}

/* ------------------------------------------------------------------------------------------ */
/* Sending control messages                                                                    */
/* ------------------------------------------------------------------------------------------ */

static void ctl_done(void *request, ucs_status_t status, void *user_data)
{
    ctl_msg_t *c = user_data;
    c->link->ctl_inflight--;
    free(c);
    ucp_request_free(request);
}

/* Sends one control message on peer's endpoint. Failures show up as endpoint errors. */
static void send_ctl(kvlink_peer_t *peer, const kvlink_msg_t *m, const char *reason)
{
    if (peer->ep == NULL || peer->closed)
        return;
    ctl_msg_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return; // the request will hit its deadline; logging here would flood under OOM
    c->link = peer->link;
    size_t hl = kvlink_msg_pack(m, c->hdr);
    size_t rl = 0;
    if (reason != NULL) {
        rl = strnlen(reason, KVLINK_REASON_MAX - 1);
        memcpy(c->reason, reason, rl);
    }
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof(rp));
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    rp.cb.send = ctl_done;
    rp.user_data = c;
    rp.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
    // Counted before posting: with NO_IMM_CMPL, UCX may run ctl_done inside the call.
    kvlink_t *link = peer->link;
    link->ctl_inflight++;
    void *r = ucp_am_send_nbx(peer->ep, m->id, c->hdr, hl, rl ? c->reason : NULL, rl, &rp);
    if (UCS_PTR_IS_ERR(r)) {
        FY_LOG_WARN(MOD, "%s: control message %d: %s", peer->addr, (int)m->id,
                    ucs_status_string(UCS_PTR_STATUS(r)));
        link->ctl_inflight--;
        free(c);
        return;
    }
    link_kick(link);
}

static void send_status_msg(kvlink_peer_t *peer, kvlink_am_id_t id, uint64_t request_id,
                            fy_status_t st)
{
    kvlink_msg_t m = {.id = id, .request_id = request_id, .status = st};
    send_ctl(peer, &m, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* Peers                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static kvlink_peer_t *peer_by_ep(kvlink_t *link, ucp_ep_h ep)
{
    if (ep == NULL)
        return NULL;
    for (kvlink_list_t *n = link->peers.next; n != &link->peers; n = n->next) {
        kvlink_peer_t *p = CONTAINER(n, kvlink_peer_t, node);
        if (p->ep == ep)
            return p;
    }
    return NULL;
}

static kvlink_peer_t *peer_by_addr(kvlink_t *link, const char *addr)
{
    for (kvlink_list_t *n = link->peers.next; n != &link->peers; n = n->next) {
        kvlink_peer_t *p = CONTAINER(n, kvlink_peer_t, node);
        if (p->outgoing && strcmp(p->addr, addr) == 0)
            return p;
    }
    return NULL;
}

static void peer_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    kvlink_peer_t *p = arg;
    char why[96];
    snprintf(why, sizeof(why), "endpoint error: %s", ucs_status_string(status));
    peer_fail(p, FY_ERR_UNAVAILABLE, why);
}

/* Logs the lanes UCX picked for this endpoint (which transports carry the KV). */
static void peer_log_transports(kvlink_peer_t *p)
{
    if (p->ep == NULL || fy_log_get_level() > FY_LOG_INFO)
        return;
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    if (f == NULL)
        return;
    ucp_ep_print_info(p->ep, f);
    fclose(f);
    // Keep the lane lines, one log line: "lane[0]: 1:tcp/lo.0 md[1] ... am am_bw#0 | ...".
    char summary[1024];
    size_t used = 0;
    summary[0] = '\0';
    for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        char *lane = strstr(line, "lane[");
        if (lane == NULL)
            continue;
        while (*lane == ' ')
            lane++;
        // Squeeze UCX's column padding.
        char *o = lane;
        for (char *i = lane; *i != '\0'; i++)
            if (*i != ' ' || (o > lane && o[-1] != ' '))
                *o++ = *i;
        *o = '\0';
        int w = snprintf(summary + used, sizeof(summary) - used, "%s%s", used ? " | " : "",
                         lane);
        if (w < 0 || (size_t)w >= sizeof(summary) - used)
            break;
        used += (size_t)w;
    }
    FY_LOG_INFO(MOD, "endpoint %s ready, transports: %s", p->addr,
                used ? summary : "(not reported)");
    free(text);
}

static kvlink_peer_t *peer_new(kvlink_t *link, const char *addr, bool outgoing)
{
    kvlink_peer_t *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->link = link;
    p->outgoing = outgoing;
    p->state = PEER_CONNECTING;
    snprintf(p->addr, sizeof(p->addr), "%s", addr);
    list_init(&p->sends);
    list_push(&link->peers, &p->node);
    link->st.peers++;
    return p;
}

static void notify_peer(kvlink_t *link, const char *addr, fy_status_t st, const char *msg)
{
    if (link->params.on_peer != NULL)
        link->params.on_peer(link, addr, st, msg, link->params.cb_arg);
}

/* Marks a peer failed: every request bound to it fails with st; its endpoint is closed and it
 * leaves the lookup list so that a new connect makes a fresh endpoint. Idempotent. */
static void peer_fail(kvlink_peer_t *p, fy_status_t st, const char *why)
{
    if (p->state == PEER_FAILED)
        return;
    kvlink_t *link = p->link;
    bool was_ready = p->state == PEER_READY;
    p->state = PEER_FAILED;
    p->fail_st = st;
    list_del(&p->node);
    list_push(&link->dead_peers, &p->node);
    if (link->quiet)
        ;
    else if (p->refs == 0 && was_ready)
        FY_LOG_INFO(MOD, "peer %s went away while idle (%s)", p->addr, why);
    else
        FY_LOG_WARN(MOD, "peer %s failed: %s (%s)", p->addr, fy_status_str(st), why);
    p->refs++; // keep p alive through the callbacks below
    while (!list_empty(&p->sends)) {
        kvlink_send_t *req = CONTAINER(p->sends.next, kvlink_send_t, node);
        list_del(&req->node);
        list_init(&req->node);
        send_fail(req, st, false);
    }
    kvlink_list_t *n = link->rreqs.next;
    while (n != &link->rreqs) {
        kvlink_list_t *next = n->next;
        kvlink_rreq_t *r = CONTAINER(n, kvlink_rreq_t, node);
        if (r->peer == p) {
            rreq_finish(link, r, st, false);
            next = link->rreqs.next; // callbacks may have changed the list: restart
        }
        n = next;
    }
    p->refs--;
    if (p->outgoing && !was_ready)
        notify_peer(link, p->addr, st, why);
    link_kick(link);
}

static void peer_ready(kvlink_peer_t *p)
{
    p->state = PEER_READY;
    peer_log_transports(p);
    // Requests opened while the handshake ran go out now.
    kvlink_list_t *n = p->sends.next;
    while (n != &p->sends) {
        kvlink_send_t *req = CONTAINER(n, kvlink_send_t, node);
        n = n->next;
        if (!req->open_sent && !req->ended) {
            kvlink_msg_t m = {.id = KVLINK_AM_OPEN, .request_id = req->id};
            send_ctl(p, &m, NULL);
            req->open_sent = true;
        }
    }
    if (p->outgoing)
        notify_peer(p->link, p->addr, FY_OK, "connected");
}

static fy_status_t parse_addr(const char *addr, struct sockaddr_storage *ss, socklen_t *len_p)
{
    char host[64];
    const char *port;
    if (addr == NULL)
        return FY_ERR_INVALID_ARG;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (end == NULL || end[1] != ':' || (size_t)(end - addr - 1) >= sizeof(host))
            return FY_ERR_INVALID_ARG;
        memcpy(host, addr + 1, (size_t)(end - addr - 1));
        host[end - addr - 1] = '\0';
        port = end + 2;
    } else {
        const char *colon = strrchr(addr, ':');
        if (colon == NULL || (size_t)(colon - addr) >= sizeof(host))
            return FY_ERR_INVALID_ARG;
        memcpy(host, addr, (size_t)(colon - addr));
        host[colon - addr] = '\0';
        port = colon + 1;
    }
    char *endp;
    long pn = strtol(port, &endp, 10);
    if (*port == '\0' || *endp != '\0' || pn <= 0 || pn > 65535)
        return FY_ERR_INVALID_ARG;
    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &res) != 0 || res == NULL)
        return FY_ERR_NOT_FOUND;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len_p = res->ai_addrlen;
    freeaddrinfo(res);
    return FY_OK;
}

static void send_hello(kvlink_peer_t *p, kvlink_am_id_t id, fy_status_t st, const char *reason)
{
    kvlink_t *link = p->link;
    kvlink_msg_t m = {
        .id = id,
        .protocol_version = link->params.compat.protocol_version,
        .codec_version = link->params.compat.codec_version,
        .page_size = link->params.compat.page_size,
        .model_fingerprint = link->params.compat.model_fingerprint,
        .instance_id = link->instance_id,
        .max_frame = link->params.max_frame_bytes,
        .status = st,
    };
    send_ctl(p, &m, reason);
}

static kvlink_peer_t *peer_connect(kvlink_t *link, const char *addr, fy_status_t *st_p)
{
    kvlink_peer_t *p = peer_by_addr(link, addr);
    if (p != NULL)
        return p;
    struct sockaddr_storage ss;
    socklen_t sl;
    fy_status_t st = parse_addr(addr, &ss, &sl);
    if (st != FY_OK) {
        *st_p = st;
        return NULL;
    }
    p = peer_new(link, addr, true);
    if (p == NULL) {
        *st_p = FY_ERR_NO_MEMORY;
        return NULL;
    }
    ucp_ep_params_t ep;
    memset(&ep, 0, sizeof(ep));
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.sockaddr.addr = (struct sockaddr *)&ss;
    ep.sockaddr.addrlen = sl;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = peer_err_cb;
    ep.err_handler.arg = p;
    ucs_status_t s = ucp_ep_create(link->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        FY_LOG_WARN(MOD, "connect %s: %s", addr, ucs_status_string(s));
        p->ep = NULL;
        list_del(&p->node);
        link->st.peers--;
        free(p);
        *st_p = status_from_ucs(s);
        return NULL;
    }
    send_hello(p, KVLINK_AM_HELLO, FY_OK, NULL);
    link_kick(link);
    return p;
}

fy_status_t kvlink_connect(kvlink_t *link, const char *addr)
{
    fy_status_t st = FY_OK;
    return peer_connect(link, addr, &st) != NULL ? FY_OK : st;
}

static void on_conn_request(ucp_conn_request_h creq, void *arg)
{
    kvlink_t *link = arg;
    char addr[80] = "?";
    ucp_conn_request_attr_t attr;
    attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
    if (ucp_conn_request_query(creq, &attr) == UCS_OK) {
        char host[64] = "?";
        int port = 0;
        if (attr.client_address.ss_family == AF_INET) {
            struct sockaddr_in *in = (struct sockaddr_in *)&attr.client_address;
            inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
            port = ntohs(in->sin_port);
            snprintf(addr, sizeof(addr), "%s:%d", host, port);
        } else if (attr.client_address.ss_family == AF_INET6) {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&attr.client_address;
            inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
            port = ntohs(in6->sin6_port);
            snprintf(addr, sizeof(addr), "[%s]:%d", host, port);
        }
    }
    kvlink_peer_t *p = peer_new(link, addr, false);
    if (p == NULL) {
        ucp_listener_reject(link->listener, creq);
        return;
    }
    ucp_ep_params_t ep;
    memset(&ep, 0, sizeof(ep));
    ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.conn_request = creq;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = peer_err_cb;
    ep.err_handler.arg = p;
    ucs_status_t s = ucp_ep_create(link->worker, &ep, &p->ep);
    if (s != UCS_OK) {
        FY_LOG_WARN(MOD, "accept %s: %s", addr, ucs_status_string(s));
        p->ep = NULL;
        list_del(&p->node);
        link->st.peers--;
        free(p);
        return;
    }
    FY_LOG_DEBUG(MOD, "accepted connection from %s", addr);
}

/* Why two compatibility records disagree, or NULL when they agree. */
static const char *compat_mismatch(const kvlink_compat_t *a, const kvlink_msg_t *m, char *buf,
                                   size_t n)
{
    if (a->protocol_version != m->protocol_version)
        snprintf(buf, n, "protocol version %u here, %u there", a->protocol_version,
                 m->protocol_version);
    else if (a->model_fingerprint != m->model_fingerprint)
        snprintf(buf, n, "model fingerprint %016llx here, %016llx there",
                 (unsigned long long)a->model_fingerprint,
                 (unsigned long long)m->model_fingerprint);
    else if (a->codec_version != m->codec_version)
        snprintf(buf, n, "codec version %u here, %u there", a->codec_version, m->codec_version);
    else if (a->page_size != 0 && m->page_size != 0 && a->page_size != m->page_size)
        snprintf(buf, n, "page size %u here, %u there", a->page_size, m->page_size);
    else
        return NULL;
    return buf;
}

/* ------------------------------------------------------------------------------------------ */
/* Receive side                                                                                */
/* ------------------------------------------------------------------------------------------ */

static kvlink_rreq_t *rreq_find(kvlink_t *link, uint64_t id)
{
    for (kvlink_list_t *n = link->rreqs.next; n != &link->rreqs; n = n->next) {
        kvlink_rreq_t *r = CONTAINER(n, kvlink_rreq_t, node);
        if (r->id == id)
            return r;
    }
    return NULL;
}

void kvlink_recv_params_default(const kvlink_t *link, kvlink_recv_params_t *params)
{
    memset(params, 0, sizeof(*params));
    params->credit_bytes = link != NULL ? link->params.max_frame_bytes : 0;
}

fy_status_t kvlink_recv_expect(kvlink_t *link, uint64_t request_id,
                               const kvlink_recv_params_t *params)
{
    kvlink_recv_params_t def;
    if (params == NULL) {
        kvlink_recv_params_default(link, &def);
        params = &def;
    }
    size_t window = FY_ALIGN_UP(params->credit_bytes, (size_t)KVLINK_POOL_ALIGN);
    if (params->credit_bytes == 0 || window > link->pool.size)
        return FY_ERR_INVALID_ARG;
    if (rreq_find(link, request_id) != NULL)
        return FY_ERR_EXISTS;
    if (link->credit_reserved + window > link->pool.size)
        return FY_ERR_RESOURCE_EXHAUSTED;
    kvlink_rreq_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return FY_ERR_NO_MEMORY;
    r->id = request_id;
    r->serial = ++link->next_serial;
    r->window = params->credit_bytes;
    r->deadline_ns = params->deadline_ns;
    list_init(&r->bufs);
    list_push(&link->rreqs, &r->node);
    link->credit_reserved += window;
    link->st.credit_reserved = link->credit_reserved;
    link->st.recv_reqs++;
    link_sweep_arm(link);
    return FY_OK;
}

static void buf_free(kvlink_t *link, kvlink_buf_t *b)
{
    list_del(&b->node);
    if (b->rreq != NULL)
        list_del(&b->rnode);
    if (b->in_pool) {
        kvlink_pool_free(&link->pool, b->off, b->alen);
        link->st.pool_used_bytes = link->pool.used;
    } else {
        free(b->data);
    }
    free(b);
}

/* Ends a receive request: detaches its buffers, returns its credit reservation, tells the
 * sender (STATUS) when asked, calls on_recv_end and frees it. r is gone on return. */
static void rreq_finish(kvlink_t *link, kvlink_rreq_t *r, fy_status_t st, bool tell_peer)
{
    list_del(&r->node);
    while (!list_empty(&r->bufs)) {
        kvlink_buf_t *b = CONTAINER(r->bufs.next, kvlink_buf_t, rnode);
        list_del(&b->rnode);
        b->rreq = NULL;
    }
    link->credit_reserved -= FY_ALIGN_UP(r->window, (size_t)KVLINK_POOL_ALIGN);
    link->st.credit_reserved = link->credit_reserved;
    kvlink_peer_t *p = r->peer;
    if (p != NULL) {
        if (tell_peer && p->state != PEER_FAILED)
            send_status_msg(p, KVLINK_AM_STATUS, r->id, st);
        p->refs--;
    }
    uint64_t id = r->id;
    free(r);
    link->st.recv_reqs--;
    if (link->params.on_recv_end != NULL)
        link->params.on_recv_end(link, id, st, link->params.cb_arg);
    link_kick(link);
}

fy_status_t kvlink_recv_cancel(kvlink_t *link, uint64_t request_id)
{
    kvlink_rreq_t *r = rreq_find(link, request_id);
    if (r == NULL)
        return FY_ERR_NOT_FOUND;
    rreq_finish(link, r, FY_ERR_CANCELLED, true);
    return FY_OK;
}

static void rreq_check_done(kvlink_t *link, kvlink_rreq_t *r)
{
    if (r->end_seen && r->recv_pending == 0 && r->frames_delivered == r->end_frames)
        rreq_finish(link, r, FY_OK, true);
}

void kvlink_buf_release(kvlink_buf_t *b)
{
    if (b == NULL)
        return;
    kvlink_t *link = b->link;
    kvlink_rreq_t *r = b->rreq;
    size_t len = b->len;
    link->st.bufs_out--;
    if (r != NULL) {
        r->outstanding -= len;
        if (r->peer != NULL && r->peer->state == PEER_READY) {
            kvlink_msg_t m = {.id = KVLINK_AM_CREDIT, .request_id = r->id, .bytes = len};
            send_ctl(r->peer, &m, NULL);
        }
    }
    buf_free(link, b);
}

uint32_t kvlink_buf_crc(const kvlink_buf_t *buf)
{
    return buf->crc;
}

bool kvlink_buf_self_checked(const kvlink_buf_t *buf)
{
    return buf->self_checked;
}

/* A frame's bytes are all in b: check the CRC and hand the buffer to the application. */
static void frame_arrived(kvlink_t *link, kvlink_buf_t *b, fy_status_t st)
{
    kvlink_rreq_t *r = b->rreq;
    if (r == NULL) { // the request ended while the data was on its way
        link->st.recv_pending--;
        buf_free(link, b);
        return;
    }
    r->recv_pending--;
    link->st.recv_pending--;
    if (st == FY_OK && link->params.verify_crc && !b->self_checked &&
        fy_crc32c(0, b->data, b->len) != b->crc) {
        link->st.crc_errors++;
        FY_LOG_WARN(MOD, "request %llu layer %u: frame CRC32C mismatch",
                    (unsigned long long)r->id, b->layer);
        st = FY_ERR_CORRUPT;
    }
    if (st != FY_OK) {
        r->outstanding -= b->len;
        buf_free(link, b);
        rreq_finish(link, r, st, true);
        return;
    }
    b->delivered = true;
    r->frames_delivered++;
    link->st.frames_delivered++;
    link->st.bytes_delivered += b->len;
    link->st.bufs_out++;
    uint64_t serial = r->serial, id = r->id;
    if (link->params.on_frame != NULL)
        link->params.on_frame(link, id, b->layer, b, b->data, b->len, link->params.cb_arg);
    else
        kvlink_buf_release(b);
    // The callback may have cancelled the request: look it up again.
    r = rreq_find(link, id);
    if (r != NULL && r->serial == serial)
        rreq_check_done(link, r);
}

static void recv_data_done(void *request, ucs_status_t status, size_t length, void *user_data)
{
    kvlink_buf_t *b = user_data;
    fy_status_t st = status_from_ucs(status);
    if (st == FY_OK && length != b->len)
        st = FY_ERR_TRUNCATED;
    ucp_request_free(request);
    frame_arrived(b->link, b, st);
}

/* Counts and logs a refused message. The return value is what the AM handler gives UCX:
 * an error refuses a rendezvous (the sender's send fails with it, no bytes move); an eager
 * message must be answered UCS_OK, which drops it. */
static ucs_status_t reject_am(kvlink_t *link, const char *what, unsigned am_id, uint64_t rid,
                              bool rndv)
{
    link->st.rejected++;
    FY_LOG_WARN(MOD, "rejected message %u (request %llu): %s", am_id, (unsigned long long)rid,
                what);
    return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
}

static void reject(kvlink_t *link, const char *what, unsigned am_id, uint64_t rid)
{
    reject_am(link, what, am_id, rid, false);
}

static ucs_status_t on_frame_am(kvlink_t *link, kvlink_peer_t *p, const kvlink_msg_t *m,
                                void *data, size_t length, const ucp_am_recv_param_t *param)
{
    bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    kvlink_rreq_t *r = rreq_find(link, m->request_id);
    if (r == NULL || r->peer != p)
        return reject_am(link, "frame for an unknown request", KVLINK_AM_FRAME, m->request_id,
                         rndv);
    if (m->bytes != length || length > link->params.max_frame_bytes) {
        reject(link, "frame length does not match its header or exceeds the maximum",
               KVLINK_AM_FRAME, m->request_id);
        rreq_finish(link, r, FY_ERR_PROTOCOL, true);
        return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    if (r->end_seen && r->frames_seen >= r->end_frames) {
        reject(link, "frame after END", KVLINK_AM_FRAME, m->request_id);
        rreq_finish(link, r, FY_ERR_PROTOCOL, true);
        return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    if (r->outstanding + length > r->window) {
        link->st.credit_violations++;
        reject(link, "frame beyond the granted credits", KVLINK_AM_FRAME, m->request_id);
        rreq_finish(link, r, FY_ERR_PROTOCOL, true);
        return rndv ? UCS_ERR_INVALID_PARAM : UCS_OK;
    }
    kvlink_buf_t *b = calloc(1, sizeof(*b));
    if (b == NULL) {
        rreq_finish(link, r, FY_ERR_NO_MEMORY, true);
        return rndv ? UCS_ERR_NO_MEMORY : UCS_OK;
    }
    b->link = link;
    b->rreq = r;
    b->request_id = r->id;
    b->layer = m->layer;
    b->crc = m->crc;
    b->self_checked = (m->flags & KVLINK_FRAME_SELF_CHECKED) != 0;
    b->len = length;
    if (kvlink_pool_alloc(&link->pool, length, &b->off, &b->alen) == FY_OK) {
        b->in_pool = true;
        b->data = link->pool_mem + b->off;
        link->st.pool_used_bytes = link->pool.used;
    } else {
        // Credits are reserved from the pool, so only fragmentation gets here.
        link->st.pool_fallbacks++;
        b->data = malloc(length);
        if (b->data == NULL) {
            free(b);
            rreq_finish(link, r, FY_ERR_NO_MEMORY, true);
            return rndv ? UCS_ERR_NO_MEMORY : UCS_OK;
        }
    }
    list_push(&link->bufs, &b->node);
    list_push(&r->bufs, &b->rnode);
    r->outstanding += length;
    if (r->outstanding > link->st.max_outstanding)
        link->st.max_outstanding = r->outstanding;
    r->frames_seen++;
    r->bytes_seen += length;
    r->recv_pending++;
    link->st.recv_pending++;
    if (!rndv) {
        memcpy(b->data, data, length);
        frame_arrived(link, b, FY_OK);
        return UCS_OK;
    }
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof(rp));
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                      UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    rp.cb.recv_am = recv_data_done;
    rp.user_data = b;
    if (b->in_pool) {
        rp.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
        rp.memh = link->pool_memh;
    }
    void *req = ucp_am_recv_data_nbx(link->worker, data, b->data, length, &rp);
    if (UCS_PTR_IS_ERR(req)) {
        frame_arrived(link, b, status_from_ucs(UCS_PTR_STATUS(req)));
        return UCS_INPROGRESS; // UCP owns the descriptor after the call, failed or not
    }
    if (req == NULL) // completed in place despite NO_IMM_CMPL (defensive)
        frame_arrived(link, b, FY_OK);
    return UCS_INPROGRESS;
}

static void on_open_am(kvlink_t *link, kvlink_peer_t *p, const kvlink_msg_t *m)
{
    kvlink_rreq_t *r = rreq_find(link, m->request_id);
    if (r == NULL) {
        reject(link, "open of a request that is not expected", KVLINK_AM_OPEN, m->request_id);
        send_status_msg(p, KVLINK_AM_STATUS, m->request_id, FY_ERR_NOT_FOUND);
        return;
    }
    if (r->peer != NULL) {
        reject(link, "request opened twice", KVLINK_AM_OPEN, m->request_id);
        send_status_msg(p, KVLINK_AM_STATUS, m->request_id, FY_ERR_EXISTS);
        return;
    }
    r->peer = p;
    p->refs++;
    kvlink_msg_t c = {.id = KVLINK_AM_CREDIT,
                      .request_id = r->id,
                      .bytes = r->window,
                      .flags = KVLINK_CREDIT_INITIAL};
    send_ctl(p, &c, NULL);
}

static void on_end_am(kvlink_t *link, kvlink_peer_t *p, const kvlink_msg_t *m)
{
    kvlink_rreq_t *r = rreq_find(link, m->request_id);
    if (r == NULL || r->peer != p) {
        reject(link, "end of an unknown request", KVLINK_AM_END, m->request_id);
        return;
    }
    if (r->end_seen || r->frames_seen > m->frames || r->bytes_seen > m->bytes) {
        reject(link, "end does not match the frames received", KVLINK_AM_END, m->request_id);
        rreq_finish(link, r, FY_ERR_PROTOCOL, true);
        return;
    }
    r->end_seen = true;
    r->end_frames = m->frames;
    r->end_bytes = m->bytes;
    rreq_check_done(link, r);
}

/* ------------------------------------------------------------------------------------------ */
/* Send side                                                                                   */
/* ------------------------------------------------------------------------------------------ */

void kvlink_send_params_default(kvlink_send_params_t *params)
{
    memset(params, 0, sizeof(*params));
}

static kvlink_send_t *send_find(kvlink_peer_t *p, uint64_t id)
{
    for (kvlink_list_t *n = p->sends.next; n != &p->sends; n = n->next) {
        kvlink_send_t *req = CONTAINER(n, kvlink_send_t, node);
        if (req->id == id)
            return req;
    }
    return NULL;
}

static void send_maybe_free(kvlink_send_t *req)
{
    if (!req->ended || req->n_inflight > 0 || req->n_queued > 0)
        return;
    kvlink_t *link = req->link;
    list_del(&req->node);
    if (req->peer != NULL)
        req->peer->refs--;
    link->st.send_reqs--;
    free(req);
    link_kick(link);
}

static void send_end(kvlink_send_t *req, fy_status_t st)
{
    if (req->ended)
        return;
    req->ended = true;
    if (req->params.on_end != NULL)
        req->params.on_end(req, st, req->params.arg);
}

/* Fails a send request: queued frames report st now, frames in UCX's hands when UCX lets go,
 * and the receiver hears ABORT when tell_peer. */
static void send_fail(kvlink_send_t *req, fy_status_t st, bool tell_peer)
{
    if (req->ended)
        return;
    kvlink_t *link = req->link;
    if (tell_peer && req->open_sent && req->peer != NULL && req->peer->state == PEER_READY)
        send_status_msg(req->peer, KVLINK_AM_ABORT, req->id, st);
    req->n_queued++; // hold: frame callbacks below must not free req
    while (!list_empty(&req->queue)) {
        send_frame_t *f = CONTAINER(req->queue.next, send_frame_t, node);
        list_del(&f->node);
        req->n_queued--;
        link->st.frames_queued--;
        if (f->on_done != NULL)
            f->on_done(req, st, f->arg);
        free(f);
    }
    send_end(req, st);
    req->n_queued--;
    send_maybe_free(req);
}

static void frame_sent(void *request, ucs_status_t status, void *user_data)
{
    send_frame_t *f = user_data;
    kvlink_send_t *req = f->req;
    kvlink_t *link = req->link;
    ucp_request_free(request);
    req->n_inflight--;
    link->st.frames_in_flight--;
    fy_status_t st = status_from_ucs(status);
    if (st == FY_OK)
        link->st.frames_sent++;
    req->n_queued++; // hold across callbacks
    if (f->on_done != NULL)
        f->on_done(req, st, f->arg);
    free(f);
    if (st != FY_OK && !req->ended) {
        // The receiver refused the frame (its reason follows as STATUS) or the peer died.
        send_fail(req, st == FY_ERR_INVALID_ARG ? FY_ERR_PROTOCOL : st, true);
    }
    req->n_queued--;
    send_maybe_free(req);
}

/* Posts queued frames while credits allow, then END once finished. */
static void send_pump_held(kvlink_send_t *req)
{
    kvlink_t *link = req->link;
    kvlink_peer_t *p = req->peer;
    if (req->ended || !req->open_granted || p->state != PEER_READY)
        return;
    while (!list_empty(&req->queue)) {
        send_frame_t *f = CONTAINER(req->queue.next, send_frame_t, node);
        if (f->len > req->window) {
            send_fail(req, FY_ERR_OUT_OF_RANGE, true);
            return;
        }
        if (f->len > req->credits) {
            if (!f->stalled) {
                f->stalled = true;
                link->st.credit_stalls++;
            }
            return;
        }
        req->credits -= f->len;
        list_del(&f->node);
        req->n_queued--;
        link->st.frames_queued--;
        ucp_request_param_t rp;
        memset(&rp, 0, sizeof(rp));
        rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                          UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        rp.cb.send = frame_sent;
        rp.user_data = f;
        rp.flags = UCP_AM_SEND_FLAG_REPLY;
        if (f->len >= link->params.rndv_threshold)
            rp.flags |= UCP_AM_SEND_FLAG_RNDV;
        // In flight before posting: UCX may complete it (frame_sent) inside the call.
        req->n_inflight++;
        link->st.frames_in_flight++;
        void *r = ucp_am_send_nbx(p->ep, KVLINK_AM_FRAME, f->hdr, f->hdr_len, f->data, f->len,
                                  &rp);
        if (UCS_PTR_IS_ERR(r)) {
            req->n_inflight--;
            link->st.frames_in_flight--;
            fy_status_t st = status_from_ucs(UCS_PTR_STATUS(r));
            FY_LOG_WARN(MOD, "request %llu: frame send: %s", (unsigned long long)req->id,
                        ucs_status_string(UCS_PTR_STATUS(r)));
            req->n_queued++;
            if (f->on_done != NULL)
                f->on_done(req, st, f->arg);
            free(f);
            req->n_queued--;
            send_fail(req, st, true);
            return;
        }
        if (req->ended)
            return; // a frame completed inside the call failed the request
    }
    if (req->finished && !req->end_sent) {
        kvlink_msg_t m = {.id = KVLINK_AM_END,
                          .request_id = req->id,
                          .frames = req->n_frames,
                          .bytes = req->n_bytes};
        send_ctl(p, &m, NULL);
        req->end_sent = true;
    }
    link_kick(link);
}

/* send_pump_held with req held alive: completions inside UCX calls may end it. req may be
 * freed on return. */
static void send_pump(kvlink_send_t *req)
{
    req->n_queued++;
    send_pump_held(req);
    req->n_queued--;
    send_maybe_free(req);
}

fy_status_t kvlink_send_open(kvlink_t *link, const char *addr, uint64_t request_id,
                             const kvlink_send_params_t *params, kvlink_send_t **req_p)
{
    fy_status_t st = FY_OK;
    kvlink_peer_t *p = peer_connect(link, addr, &st);
    if (p == NULL)
        return st;
    if (send_find(p, request_id) != NULL)
        return FY_ERR_EXISTS;
    kvlink_send_t *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return FY_ERR_NO_MEMORY;
    req->link = link;
    req->peer = p;
    req->id = request_id;
    if (params != NULL)
        req->params = *params;
    list_init(&req->queue);
    list_push(&p->sends, &req->node);
    p->refs++;
    link->st.send_reqs++;
    link_sweep_arm(link);
    if (p->state == PEER_READY) {
        kvlink_msg_t m = {.id = KVLINK_AM_OPEN, .request_id = request_id};
        send_ctl(p, &m, NULL);
        req->open_sent = true;
    }
    *req_p = req;
    return FY_OK;
}

fy_status_t kvlink_send_frame(kvlink_send_t *req, uint32_t layer, const void *data, size_t len,
                              kvlink_frame_done_cb on_done, void *arg)
{
    if (req == NULL || data == NULL || len == 0)
        return FY_ERR_INVALID_ARG;
    return kvlink_send_frame_crc(req, layer, data, len, fy_crc32c(0, data, len), on_done, arg);
}

static fy_status_t send_frame(kvlink_send_t *req, uint32_t layer, const void *data, size_t len,
                              uint32_t crc, uint32_t flags, kvlink_frame_done_cb on_done,
                              void *arg)
{
    if (req == NULL || data == NULL || len == 0)
        return FY_ERR_INVALID_ARG;
    kvlink_t *link = req->link;
    if (req->ended || req->finished)
        return FY_ERR_STATE;
    uint64_t max = link->params.max_frame_bytes;
    if (req->peer->state == PEER_READY && req->peer->remote_max_frame < max)
        max = req->peer->remote_max_frame;
    if (len > max || req->n_frames == UINT32_MAX)
        return FY_ERR_OUT_OF_RANGE;
    send_frame_t *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return FY_ERR_NO_MEMORY;
    f->req = req;
    f->data = data;
    f->len = len;
    f->on_done = on_done;
    f->arg = arg;
    kvlink_msg_t m = {.id = KVLINK_AM_FRAME,
                      .request_id = req->id,
                      .bytes = len,
                      .layer = layer,
                      .crc = crc,
                      .flags = flags};
    f->hdr_len = kvlink_msg_pack(&m, f->hdr);
    list_push(&req->queue, &f->node);
    req->n_queued++;
    req->n_frames++;
    req->n_bytes += len;
    link->st.frames_queued++;
    send_pump(req);
    return FY_OK;
}

fy_status_t kvlink_send_frame_crc(kvlink_send_t *req, uint32_t layer, const void *data,
                                  size_t len, uint32_t crc, kvlink_frame_done_cb on_done,
                                  void *arg)
{
    return send_frame(req, layer, data, len, crc, 0, on_done, arg);
}

fy_status_t kvlink_send_frame_self_checked(kvlink_send_t *req, uint32_t layer, const void *data,
                                           size_t len, kvlink_frame_done_cb on_done, void *arg)
{
    return send_frame(req, layer, data, len, 0, KVLINK_FRAME_SELF_CHECKED, on_done, arg);
}

fy_status_t kvlink_send_finish(kvlink_send_t *req)
{
    if (req == NULL)
        return FY_ERR_INVALID_ARG;
    if (req->ended || req->finished)
        return FY_ERR_STATE;
    req->finished = true;
    send_pump(req);
    return FY_OK;
}

void kvlink_send_cancel(kvlink_send_t *req)
{
    if (req == NULL || req->ended)
        return;
    send_fail(req, FY_ERR_CANCELLED, true);
}

static void on_credit_am(kvlink_t *link, kvlink_peer_t *p, const kvlink_msg_t *m)
{
    kvlink_send_t *req = send_find(p, m->request_id);
    if (req == NULL || req->ended)
        return; // late credits for a finished request are normal
    if (m->flags & KVLINK_CREDIT_INITIAL) {
        if (req->open_granted) {
            reject(link, "second initial credit", KVLINK_AM_CREDIT, m->request_id);
            send_fail(req, FY_ERR_PROTOCOL, true);
            return;
        }
        req->open_granted = true;
        req->window = m->bytes;
        req->credits = m->bytes;
    } else {
        if (!req->open_granted || req->credits + m->bytes > req->window) {
            reject(link, "credits beyond the window", KVLINK_AM_CREDIT, m->request_id);
            send_fail(req, FY_ERR_PROTOCOL, true);
            return;
        }
        req->credits += m->bytes;
    }
    send_pump(req);
}

static void on_status_am(kvlink_t *link, kvlink_peer_t *p, const kvlink_msg_t *m)
{
    kvlink_send_t *req = send_find(p, m->request_id);
    if (req == NULL || req->ended)
        return;
    fy_status_t st = kvlink_status_from_wire(m->status);
    if (st == FY_OK && !req->end_sent) {
        reject(link, "completion before END", KVLINK_AM_STATUS, m->request_id);
        st = FY_ERR_PROTOCOL;
    }
    if (st == FY_OK) {
        req->n_queued++;
        send_end(req, FY_OK);
        req->n_queued--;
        send_maybe_free(req);
    } else {
        send_fail(req, st, false);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Active message dispatch                                                                     */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    kvlink_t *link;
    uint32_t id;
} am_slot_t;

static ucs_status_t am_dispatch(void *arg, const void *header, size_t header_length, void *data,
                                size_t length, const ucp_am_recv_param_t *param)
{
    const am_slot_t *slot = arg;
    kvlink_t *link = slot->link;
    uint32_t id = slot->id;
    bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    kvlink_msg_t m;
    if (link->destroying)
        return rndv ? UCS_ERR_CANCELED : UCS_OK;
    if (kvlink_msg_unpack(id, header, header_length, &m) != FY_OK)
        return reject_am(link, "malformed header", id, 0, rndv);
    ucp_ep_h ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : NULL;
    kvlink_peer_t *p = peer_by_ep(link, ep);
    if (p == NULL)
        return reject_am(link, "message from an unknown endpoint", id, m.request_id, rndv);
    if (id == KVLINK_AM_FRAME) {
        if (p->state != PEER_READY)
            return reject_am(link, "frame before the handshake", id, m.request_id, rndv);
        return on_frame_am(link, p, &m, data, length, param);
    }
    if (rndv || length > KVLINK_REASON_MAX)
        return reject_am(link, "control message with a payload", id, m.request_id, rndv);
    char why[256];
    switch (id) {
    case KVLINK_AM_HELLO: {
        if (p->outgoing || p->state != PEER_CONNECTING || p->refused)
            return reject_am(link, "unexpected HELLO", id, 0, rndv);
        p->remote_instance = m.instance_id;
        p->remote_max_frame = m.max_frame;
        const char *bad = compat_mismatch(&link->params.compat, &m, why, sizeof(why));
        if (bad != NULL) {
            // The refused side closes: closing here could drop the answer on shared memory.
            // The peer stays unusable (never READY) until its endpoint goes away.
            FY_LOG_WARN(MOD, "refusing %s: incompatible peer: %s", p->addr, bad);
            send_hello(p, KVLINK_AM_HELLO_ACK, FY_ERR_MISMATCH, bad);
            p->refused = true;
            return UCS_OK;
        }
        send_hello(p, KVLINK_AM_HELLO_ACK, FY_OK, NULL);
        peer_ready(p);
        return UCS_OK;
    }
    case KVLINK_AM_HELLO_ACK: {
        if (!p->outgoing || p->state != PEER_CONNECTING)
            return reject_am(link, "unexpected HELLO_ACK", id, 0, rndv);
        p->remote_instance = m.instance_id;
        p->remote_max_frame = m.max_frame;
        fy_status_t st = kvlink_status_from_wire(m.status);
        if (st != FY_OK) {
            char reason[KVLINK_REASON_MAX + 1];
            size_t n = FY_MIN(length, (size_t)KVLINK_REASON_MAX);
            memcpy(reason, data, n);
            reason[n] = '\0';
            for (size_t i = 0; i < n; i++)
                if (reason[i] < 0x20 || reason[i] > 0x7e)
                    reason[i] = '?';
            snprintf(why, sizeof(why), "refused by peer: %s", n ? reason : fy_status_str(st));
            peer_fail(p, st, why);
            return UCS_OK;
        }
        const char *bad = compat_mismatch(&link->params.compat, &m, why, sizeof(why));
        if (bad != NULL) {
            char msg[200];
            snprintf(msg, sizeof(msg), "incompatible peer: %s", bad);
            peer_fail(p, FY_ERR_MISMATCH, msg);
            return UCS_OK;
        }
        peer_ready(p);
        return UCS_OK;
    }
    default:
        break;
    }
    if (p->state != PEER_READY)
        return reject_am(link, "request message before the handshake", id, m.request_id, rndv);
    switch (id) {
    case KVLINK_AM_OPEN:
        on_open_am(link, p, &m);
        break;
    case KVLINK_AM_CREDIT:
        on_credit_am(link, p, &m);
        break;
    case KVLINK_AM_END:
        on_end_am(link, p, &m);
        break;
    case KVLINK_AM_STATUS:
        on_status_am(link, p, &m);
        break;
    case KVLINK_AM_ABORT: {
        kvlink_rreq_t *r = rreq_find(link, m.request_id);
        if (r != NULL && r->peer == p)
            rreq_finish(link, r, kvlink_status_from_wire(m.status), false);
        break;
    }
    default:
        return reject_am(link, "unknown message", id, m.request_id, rndv);
    }
    return UCS_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Deadlines                                                                                   */
/* ------------------------------------------------------------------------------------------ */

static void on_sweep(uv_timer_t *t)
{
    kvlink_t *link = t->data;
    uint64_t now = fy_clock_ns();
    // Receive side.
    for (kvlink_list_t *n = link->rreqs.next; n != &link->rreqs;) {
        kvlink_rreq_t *r = CONTAINER(n, kvlink_rreq_t, node);
        n = n->next;
        if (r->deadline_ns != 0 && now >= r->deadline_ns) {
            FY_LOG_WARN(MOD, "request %llu: receive deadline exceeded",
                        (unsigned long long)r->id);
            rreq_finish(link, r, FY_ERR_TIMEOUT, true);
            n = link->rreqs.next; // restart: callbacks may change the list
        }
    }
    // Send side, over every peer (dead peers hold no live senders).
    for (kvlink_list_t *pn = link->peers.next; pn != &link->peers;) {
        kvlink_peer_t *p = CONTAINER(pn, kvlink_peer_t, node);
        pn = pn->next;
        bool restart = false;
        for (kvlink_list_t *n = p->sends.next; n != &p->sends; n = n->next) {
            kvlink_send_t *req = CONTAINER(n, kvlink_send_t, node);
            if (!req->ended && req->params.deadline_ns != 0 && now >= req->params.deadline_ns) {
                FY_LOG_WARN(MOD, "request %llu: send deadline exceeded",
                            (unsigned long long)req->id);
                send_fail(req, FY_ERR_TIMEOUT, true);
                restart = true;
                break;
            }
        }
        if (restart)
            pn = link->peers.next;
    }
    link_progress_once(link);
    if (link->st.send_reqs + link->st.recv_reqs == 0)
        uv_timer_stop(&link->sweep);
}

/* ------------------------------------------------------------------------------------------ */
/* Link                                                                                        */
/* ------------------------------------------------------------------------------------------ */

void kvlink_params_default(kvlink_params_t *params)
{
    memset(params, 0, sizeof(*params));
    params->compat.protocol_version = KVLINK_PROTOCOL_VERSION;
    params->recv_pool_bytes = (size_t)256 << 20;
    params->max_frame_bytes = (size_t)64 << 20;
    params->rndv_threshold = (size_t)8 << 10;
    params->sweep_ms = 10;
    params->verify_crc = true;
    params->spin_us = 0;
}

/* The per-id callback arguments live right after the link in one allocation. */
typedef struct {
    struct kvlink link;
    am_slot_t slots[KVLINK_AM_COUNT];
} kvlink_alloc_t;

fy_status_t kvlink_create(kvlink_ctx_t *ctx, uv_loop_t *loop, const kvlink_params_t *params,
                          kvlink_t **link_p)
{
    if (ctx == NULL || loop == NULL || params == NULL || params->max_frame_bytes == 0)
        return FY_ERR_INVALID_ARG;
    kvlink_alloc_t *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return FY_ERR_NO_MEMORY;
    kvlink_t *link = &a->link;
    link->ctx = ctx;
    link->loop = loop;
    link->params = *params;
    if (link->params.sweep_ms == 0)
        link->params.sweep_ms = 10;
    list_init(&link->peers);
    list_init(&link->dead_peers);
    list_init(&link->rreqs);
    list_init(&link->bufs);
    // Distinguishes restarts of a peer at the same address (logged at the handshake).
    link->instance_id = fy_clock_realtime_ns() ^ ((uint64_t)(uintptr_t)link << 16);
    fy_status_t st = FY_ERR_TRANSPORT;

    ucp_worker_params_t wp;
    memset(&wp, 0, sizeof(wp));
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    ucs_status_t s = ucp_worker_create(ctx->ucp, &wp, &link->worker);
    if (s != UCS_OK) {
        FY_LOG_ERROR(MOD, "ucp_worker_create: %s", ucs_status_string(s));
        goto err_free;
    }
    s = ucp_worker_get_efd(link->worker, &link->efd);
    if (s != UCS_OK) {
        FY_LOG_ERROR(MOD, "ucp_worker_get_efd: %s", ucs_status_string(s));
        goto err_worker;
    }
    for (uint32_t id = 1; id < KVLINK_AM_COUNT; id++) {
        a->slots[id] = (am_slot_t){link, id};
        ucp_am_handler_param_t hp;
        memset(&hp, 0, sizeof(hp));
        hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                        UCP_AM_HANDLER_PARAM_FIELD_ARG;
        hp.id = id;
        hp.cb = am_dispatch;
        hp.arg = &a->slots[id];
        s = ucp_worker_set_am_recv_handler(link->worker, &hp);
        if (s != UCS_OK) {
            FY_LOG_ERROR(MOD, "ucp_worker_set_am_recv_handler: %s", ucs_status_string(s));
            goto err_worker;
        }
    }
    // Receive memory: one region, registered once, carved per frame.
    if (params->recv_pool_bytes > 0) {
        st = kvlink_pool_init(&link->pool, params->recv_pool_bytes);
        if (st != FY_OK)
            goto err_worker;
        if (posix_memalign((void **)&link->pool_mem, 4096, link->pool.size) != 0) {
            st = FY_ERR_NO_MEMORY;
            goto err_pool;
        }
        ucp_mem_map_params_t mp;
        memset(&mp, 0, sizeof(mp));
        mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
        mp.address = link->pool_mem;
        mp.length = link->pool.size;
        s = ucp_mem_map(ctx->ucp, &mp, &link->pool_memh);
        if (s != UCS_OK) {
            FY_LOG_ERROR(MOD, "ucp_mem_map(%zu bytes): %s", link->pool.size,
                         ucs_status_string(s));
            st = status_from_ucs(s);
            goto err_mem;
        }
    }
    uv_poll_init(loop, &link->poll, link->efd);
    uv_idle_init(loop, &link->kick);
    uv_timer_init(loop, &link->sweep);
    link->poll.data = link->kick.data = link->sweep.data = link;
    link->handles_open = 3;
    uv_poll_start(&link->poll, UV_READABLE, on_poll);
    link_kick(link);
    *link_p = link;
    return FY_OK;

err_mem: // undo posix_memalign
    free(link->pool_mem);
err_pool: // undo kvlink_pool_init
    kvlink_pool_cleanup(&link->pool);
err_worker: // undo ucp_worker_create
    ucp_worker_destroy(link->worker);
err_free: // undo calloc
    free(a);
    return st;
}

fy_status_t kvlink_listen(kvlink_t *link, const char *host, uint16_t port, uint16_t *port_p)
{
    if (link->listener != NULL)
        return FY_ERR_STATE;
    char addr[96];
    snprintf(addr, sizeof(addr), strchr(host, ':') ? "[%s]:%u" : "%s:%u", host,
             port ? port : 1);
    struct sockaddr_storage ss;
    socklen_t sl;
    fy_status_t st = parse_addr(addr, &ss, &sl);
    if (st != FY_OK)
        return st;
    if (port == 0) {
        if (ss.ss_family == AF_INET)
            ((struct sockaddr_in *)&ss)->sin_port = 0;
        else
            ((struct sockaddr_in6 *)&ss)->sin6_port = 0;
    }
    ucp_listener_params_t lp;
    memset(&lp, 0, sizeof(lp));
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = (struct sockaddr *)&ss;
    lp.sockaddr.addrlen = sl;
    lp.conn_handler.cb = on_conn_request;
    lp.conn_handler.arg = link;
    ucs_status_t s = ucp_listener_create(link->worker, &lp, &link->listener);
    if (s != UCS_OK) {
        FY_LOG_ERROR(MOD, "listen on %s port %u: %s", host, port, ucs_status_string(s));
        link->listener = NULL;
        return s == UCS_ERR_BUSY ? FY_ERR_BUSY : status_from_ucs(s);
    }
    ucp_listener_attr_t la;
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    if (ucp_listener_query(link->listener, &la) != UCS_OK) {
        ucp_listener_destroy(link->listener);
        link->listener = NULL;
        return FY_ERR_TRANSPORT;
    }
    uint16_t bound = ntohs(la.sockaddr.ss_family == AF_INET
                               ? ((struct sockaddr_in *)&la.sockaddr)->sin_port
                               : ((struct sockaddr_in6 *)&la.sockaddr)->sin6_port);
    FY_LOG_INFO(MOD, "listening on %s port %u", host, bound);
    if (port_p != NULL)
        *port_p = bound;
    link_kick(link);
    return FY_OK;
}

static void on_handle_closed(uv_handle_t *h)
{
    kvlink_t *link = h->data;
    link->handles_open--;
}

void kvlink_destroy(kvlink_t *link)
{
    if (link == NULL)
        return;
    // Fail every request while callbacks still make sense, then stop taking messages.
    link->quiet = true;
    while (!list_empty(&link->rreqs))
        rreq_finish(link, CONTAINER(link->rreqs.next, kvlink_rreq_t, node), FY_ERR_CLOSED, true);
    // What we already sent (such as a last STATUS) should leave before the endpoints are
    // dropped: wait for the control sends, bounded in time.
    uint64_t flush_until = fy_clock_ns() + 1000ull * 1000 * 1000;
    while (link->ctl_inflight > 0 && fy_clock_ns() < flush_until)
        ucp_worker_progress(link->worker);
    while (!list_empty(&link->peers))
        peer_fail(CONTAINER(link->peers.next, kvlink_peer_t, node), FY_ERR_CLOSED,
                  "link closed");
    link->destroying = true;
    if (link->listener != NULL)
        ucp_listener_destroy(link->listener);
    // Let UCX hand back frames it still holds (their callbacks run now), bounded in time.
    uint64_t until = fy_clock_ns() + 2000ull * 1000 * 1000;
    link_reap_peers(link);
    while ((link->st.frames_in_flight > 0 || link->st.recv_pending > 0 ||
            !list_empty(&link->dead_peers) || link->closing > 0) &&
           fy_clock_ns() < until) {
        ucp_worker_progress(link->worker);
        link_reap_peers(link);
    }
    while (!list_empty(&link->bufs))
        buf_free(link, CONTAINER(link->bufs.next, kvlink_buf_t, node));
    uv_poll_stop(&link->poll);
    uv_close((uv_handle_t *)&link->poll, on_handle_closed);
    uv_close((uv_handle_t *)&link->kick, on_handle_closed);
    uv_close((uv_handle_t *)&link->sweep, on_handle_closed);
    while (link->handles_open > 0)
        uv_run(link->loop, UV_RUN_ONCE);
    if (link->pool_memh != NULL)
        ucp_mem_unmap(link->ctx->ucp, link->pool_memh);
    free(link->pool_mem);
    kvlink_pool_cleanup(&link->pool);
    ucp_worker_destroy(link->worker);
    free((kvlink_alloc_t *)link);
}

void kvlink_stats(const kvlink_t *link, kvlink_stats_t *stats_p)
{
    *stats_p = link->st;
}

void kvlink_recv_pool(const kvlink_t *link, void **mem_p, size_t *len_p)
{
    *mem_p = link->pool_mem;
    *len_p = link->pool_mem != NULL ? link->pool.size : 0;
}
