/*
 * nccl_link_sock.c: the NCCL link's protocol (nccl_link.c) over one TCP connection, with
 * frames in host memory. It lets the pair set-up, the per-request choice of link and the
 * failure handling of the daemons run, and be tested, on machines without GPUs; the protocol,
 * credits, deadlines and cancel are the very code the NCCL backend drives.
 *
 * The id (KVLINK_NCCL_ID_BYTES, made by kvlink_nccl_sock_id_create on the receiver's side):
 *   0 u32 magic "FYSK"   4 u16 port   6 u16 0   8 u8[16] token   24 host, NUL-terminated
 * id_create opens a listening socket and keeps it in a process-wide table under the token;
 * the receiver's kvlink_nccl_sock_create takes it from there and accepts, the sender connects
 * and writes the token first. A connection whose first 16 bytes are not the token is closed
 * and the listener waits for the next: the id is the only credential, as an ncclUniqueId is.
 *
 * A round moves bytes in the order NCCL would match them: sender to receiver the announced
 * frames then the sender's control block; receiver to sender its control block. Every call
 * is non-blocking, so one thread can drive both ends of a pair.
 */
#include "nccl_link_int.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#define MOD "kvlink-sock"

#define SOCK_MAGIC      0x4b535946u /* "FYSK" */
#define SOCK_TOKEN      16u
#define SOCK_HOST_OFF   24u
#define SOCK_MAX_LISTEN 64u

/* ---- listeners made by id_create, waiting for their receiver ------------------------------ */

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    uint8_t token[SOCK_TOKEN];
    int fd;
} g_listen[SOCK_MAX_LISTEN];
static size_t g_n_listen;

static int listener_take(const uint8_t *token)
{
    int fd = -1;
    pthread_mutex_lock(&g_mu);
    for (size_t i = 0; i < g_n_listen; i++) {
        if (memcmp(g_listen[i].token, token, SOCK_TOKEN) == 0) {
            fd = g_listen[i].fd;
            g_listen[i] = g_listen[--g_n_listen];
            break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    return fd;
}

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static uint16_t get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    put_u16(p, (uint16_t)v);
    put_u16(p + 2, (uint16_t)(v >> 16));
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)get_u16(p) | (uint32_t)get_u16(p + 2) << 16;
}

static fy_status_t resolve(const char *host, uint16_t port, struct addrinfo **res_p)
{
    char ps[8];
    snprintf(ps, sizeof(ps), "%u", port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    int e = getaddrinfo(host, ps, &hints, res_p);
    if (e != 0) {
        FY_LOG_WARN(MOD, "address %s: %s", host, gai_strerror(e));
        return FY_ERR_INVALID_ARG;
    }
    return FY_OK;
}

fy_status_t kvlink_nccl_sock_id_create(const char *host, uint8_t *id)
{
    if (host == NULL || id == NULL || strlen(host) + 1 > KVLINK_NCCL_ID_BYTES - SOCK_HOST_OFF)
        return FY_ERR_INVALID_ARG;
    uint8_t token[SOCK_TOKEN];
    if (getrandom(token, sizeof(token), 0) != (ssize_t)sizeof(token))
        return FY_ERR_INTERNAL;
    struct addrinfo *ai = NULL;
    fy_status_t st = resolve(host, 0, &ai);
    if (st != FY_OK)
        return st;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 4) != 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        FY_LOG_WARN(MOD, "listening on %s: %s", host, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return FY_ERR_TRANSPORT;
    }
    freeaddrinfo(ai);
    uint16_t port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                             : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    pthread_mutex_lock(&g_mu);
    if (g_n_listen == SOCK_MAX_LISTEN) {
        pthread_mutex_unlock(&g_mu);
        close(fd);
        return FY_ERR_RESOURCE_EXHAUSTED;
    }
    memcpy(g_listen[g_n_listen].token, token, SOCK_TOKEN);
    g_listen[g_n_listen++].fd = fd;
    pthread_mutex_unlock(&g_mu);
    memset(id, 0, KVLINK_NCCL_ID_BYTES);
    put_u32(id, SOCK_MAGIC);
    put_u16(id + 4, port);
    memcpy(id + 8, token, SOCK_TOKEN);
    memcpy(id + SOCK_HOST_OFF, host, strlen(host));
    return FY_OK;
}

/* ---- backend ------------------------------------------------------------------------------ */

typedef struct {
    bool receiver;
    int lfd; /* receiver: the listener until a peer presented the token */
    int fd;  /* the connection (receiver: a candidate until the token is checked) */
    bool connecting, up;
    uint8_t token[SOCK_TOKEN];
    size_t tok_off;
    struct addrinfo *peer; /* sender: where to connect */
    /* The round in flight. */
    bool posted;
    kvlink_nccl_xfer_t xfers[KVLINK_NCCL_MAX_XFERS];
    size_t n_xfers;
    size_t wx, wx_off; /* writing: transfer index (sender), offset in it */
    size_t rx, rx_off; /* reading: transfer index (receiver), offset in it */
    uint8_t out[KVLINK_NCCL_CTL_BYTES], in[KVLINK_NCCL_CTL_BYTES];
    size_t out_off, in_off;
} sock_be_t;

/* Moves bytes without blocking: FY_OK with *n the bytes moved (0: would block), or
 * FY_ERR_UNAVAILABLE when the peer is gone. */
static fy_status_t io(int fd, bool write, void *p, size_t len, size_t *n)
{
    *n = 0;
    for (;;) {
        ssize_t r =
            write ? send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT) : recv(fd, p, len, MSG_DONTWAIT);
        if (r > 0) {
            *n = (size_t)r;
            return FY_OK;
        }
        if (r == 0 && !write)
            return FY_ERR_UNAVAILABLE; // EOF: the peer closed
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return FY_OK;
        return FY_ERR_UNAVAILABLE;
    }
}

static fy_status_t init_sender(sock_be_t *be)
{
    if (be->fd < 0) {
        be->fd = socket(be->peer->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (be->fd < 0)
            return FY_ERR_TRANSPORT;
        int one = 1;
        setsockopt(be->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(be->fd, be->peer->ai_addr, be->peer->ai_addrlen) != 0 && errno != EINPROGRESS) {
            FY_LOG_WARN(MOD, "connect: %s", strerror(errno));
            return FY_ERR_UNAVAILABLE;
        }
        be->connecting = true;
    }
    if (be->connecting) {
        struct pollfd pfd = {.fd = be->fd, .events = POLLOUT};
        if (poll(&pfd, 1, 0) == 0)
            return FY_ERR_AGAIN;
        int err = 0;
        socklen_t el = sizeof(err);
        if (getsockopt(be->fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err != 0) {
            FY_LOG_WARN(MOD, "connect: %s", strerror(err != 0 ? err : errno));
            return FY_ERR_UNAVAILABLE;
        }
        be->connecting = false;
    }
    while (be->tok_off < SOCK_TOKEN) {
        size_t n;
        fy_status_t st = io(be->fd, true, be->token + be->tok_off, SOCK_TOKEN - be->tok_off, &n);
        if (st != FY_OK)
            return st;
        if (n == 0)
            return FY_ERR_AGAIN;
        be->tok_off += n;
    }
    return FY_OK;
}

static fy_status_t init_receiver(sock_be_t *be)
{
    for (;;) {
        if (be->fd < 0) {
            be->fd = accept4(be->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (be->fd < 0)
                return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
                               errno == ECONNABORTED
                           ? FY_ERR_AGAIN
                           : FY_ERR_TRANSPORT;
            be->tok_off = 0;
        }
        uint8_t got[SOCK_TOKEN];
        size_t n = 0;
        fy_status_t st = FY_OK;
        // Peek until the whole token is there, so a slow writer is not mistaken for a bad one.
        ssize_t r = recv(be->fd, got, SOCK_TOKEN, MSG_PEEK | MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return FY_ERR_AGAIN;
        if (r == (ssize_t)SOCK_TOKEN)
            st = io(be->fd, false, got, SOCK_TOKEN, &n);
        if (r == (ssize_t)SOCK_TOKEN && st == FY_OK && n == SOCK_TOKEN &&
            memcmp(got, be->token, SOCK_TOKEN) == 0) {
            int one = 1;
            setsockopt(be->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            close(be->lfd);
            be->lfd = -1;
            return FY_OK;
        }
        if (r > 0 && r < (ssize_t)SOCK_TOKEN)
            return FY_ERR_AGAIN;
        // Closed before the token, or the wrong one: not our peer.
        FY_LOG_WARN(MOD, "a connection without the pair's token was closed");
        close(be->fd);
        be->fd = -1;
    }
}

static fy_status_t sock_init_test(void *arg)
{
    sock_be_t *be = arg;
    if (be->up)
        return FY_OK;
    fy_status_t st = be->receiver ? init_receiver(be) : init_sender(be);
    if (st == FY_OK)
        be->up = true;
    return st;
}

static fy_status_t sock_post_round(void *arg, const kvlink_nccl_xfer_t *xfers, size_t n, bool send,
                                   const uint8_t *ctl_out)
{
    sock_be_t *be = arg;
    if (!be->up || be->posted || n > KVLINK_NCCL_MAX_XFERS || send == be->receiver)
        return FY_ERR_STATE;
    memcpy(be->xfers, xfers, n * sizeof(*xfers));
    be->n_xfers = n;
    be->wx = be->rx = be->wx_off = be->rx_off = 0;
    memcpy(be->out, ctl_out, KVLINK_NCCL_CTL_BYTES);
    be->out_off = be->in_off = 0;
    be->posted = true;
    return FY_OK;
}

/* One direction's next span: the frames (if this end moves them that way), then the block. */
static void *next_span(sock_be_t *be, bool write, size_t *len)
{
    bool frames = write != be->receiver; // the sender writes frames, the receiver reads them
    size_t *xi = write ? &be->wx : &be->rx, *xo = write ? &be->wx_off : &be->rx_off;
    while (frames && *xi < be->n_xfers) {
        if (*xo < be->xfers[*xi].len) {
            *len = be->xfers[*xi].len - *xo;
            return (uint8_t *)be->xfers[*xi].ptr + *xo;
        }
        (*xi)++;
        *xo = 0;
    }
    size_t *off = write ? &be->out_off : &be->in_off;
    *len = KVLINK_NCCL_CTL_BYTES - *off;
    return *len == 0 ? NULL : (write ? be->out : be->in) + *off;
}

static void advance(sock_be_t *be, bool write, size_t n)
{
    bool frames = write != be->receiver;
    size_t *xi = write ? &be->wx : &be->rx, *xo = write ? &be->wx_off : &be->rx_off;
    if (frames && *xi < be->n_xfers)
        *xo += n;
    else if (write)
        be->out_off += n;
    else
        be->in_off += n;
}

static fy_status_t sock_test_round(void *arg, uint8_t *ctl_in)
{
    sock_be_t *be = arg;
    if (!be->posted)
        return FY_ERR_STATE;
    for (;;) {
        bool moved = false;
        for (int w = 1; w >= 0; w--) {
            size_t len;
            void *p = next_span(be, w == 1, &len);
            if (p == NULL)
                continue;
            size_t n;
            fy_status_t st = io(be->fd, w == 1, p, len, &n);
            if (st != FY_OK)
                return st;
            if (n > 0) {
                advance(be, w == 1, n);
                moved = true;
            }
        }
        size_t l1, l2;
        if (next_span(be, true, &l1) == NULL && next_span(be, false, &l2) == NULL) {
            memcpy(ctl_in, be->in, KVLINK_NCCL_CTL_BYTES);
            be->posted = false;
            return FY_OK;
        }
        if (!moved)
            return FY_ERR_AGAIN;
    }
}

static fy_status_t sock_mem_alloc(void *arg, size_t bytes, void **ptr_p)
{
    (void)arg;
    void *p = malloc(bytes > 0 ? bytes : 1);
    if (p == NULL)
        return FY_ERR_RESOURCE_EXHAUSTED;
    *ptr_p = p;
    return FY_OK;
}

static void sock_mem_free(void *arg, void *ptr)
{
    (void)arg;
    free(ptr);
}

static void sock_abort(void *arg)
{
    sock_be_t *be = arg;
    if (be->fd >= 0) {
        shutdown(be->fd, SHUT_RDWR);
        close(be->fd);
        be->fd = -1;
    }
    if (be->lfd >= 0) {
        close(be->lfd);
        be->lfd = -1;
    }
    be->up = false;
    be->posted = false;
}

static void sock_destroy(void *arg)
{
    sock_be_t *be = arg;
    sock_abort(be);
    if (be->peer != NULL)
        freeaddrinfo(be->peer);
    free(be);
}

static const kvlink_nccl_ops_t k_sock_ops = {
    .init_test = sock_init_test,
    .post_round = sock_post_round,
    .test_round = sock_test_round,
    .mem_alloc = sock_mem_alloc,
    .mem_free = sock_mem_free,
    .abort = sock_abort,
    .destroy = sock_destroy,
};

fy_status_t kvlink_nccl_sock_create(const uint8_t *id, size_t id_len,
                                    const kvlink_nccl_params_t *params, kvlink_nccl_t **pair_p)
{
    if (id == NULL || id_len != KVLINK_NCCL_ID_BYTES || params == NULL || pair_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (params->role != KVLINK_NCCL_SENDER && params->role != KVLINK_NCCL_RECEIVER)
        return FY_ERR_INVALID_ARG;
    const char *host = (const char *)id + SOCK_HOST_OFF;
    uint16_t port = get_u16(id + 4);
    if (get_u32(id) != SOCK_MAGIC || port == 0 || get_u16(id + 6) != 0 ||
        memchr(host, 0, KVLINK_NCCL_ID_BYTES - SOCK_HOST_OFF) == NULL || host[0] == 0)
        return FY_ERR_FORMAT;
    sock_be_t *be = calloc(1, sizeof(*be));
    if (be == NULL)
        return FY_ERR_NO_MEMORY;
    be->receiver = params->role == KVLINK_NCCL_RECEIVER;
    be->fd = be->lfd = -1;
    memcpy(be->token, id + 8, SOCK_TOKEN);
    fy_status_t st = FY_OK;
    if (be->receiver) {
        be->lfd = listener_take(be->token);
        if (be->lfd < 0)
            st = FY_ERR_NOT_FOUND; // the id was not made in this process
    } else {
        st = resolve(host, port, &be->peer);
    }
    if (st != FY_OK) {
        sock_destroy(be);
        return st;
    }
    return kvlink_nccl_create_ops(&k_sock_ops, be, params, pair_p);
}
