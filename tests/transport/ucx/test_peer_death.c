// Two processes over loopback, one killed mid-transfer with SIGKILL. The survivor's request
// fails with a transport status (FY_ERR_UNAVAILABLE, not the deadline) well within its
// deadline, nothing stays allocated, and a new connection to the same address then works.
// Both directions: the sender dies (the receiver survives) and the receiver dies; a receiver
// restarted on the dead one's port binds it although its connections sit in TIME_WAIT (as a
// decode worker restarted after a crash does).
//
// The same executable plays the other process: test_kvlink_peer_death --sender ADDR ID N FINISH
// or --receiver ID [PORT] (prints its port on stdout, then serves until killed or done).
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "rig.h"

static const char *g_self;

/* ------------------------------------------------------------------------------------------ */
/* The other process                                                                           */
/* ------------------------------------------------------------------------------------------ */

static uint8_t g_frame[1u << 20];

typedef struct {
    int ended;
    fy_status_t st;
} child_state_t;

static void child_send_end(kvlink_send_t *req, fy_status_t st, void *arg)
{
    child_state_t *c = arg;
    c->ended = 1;
    c->st = st;
}

static bool child_ended(void *arg)
{
    return ((child_state_t *)arg)->ended != 0;
}

static kvlink_t *child_link(uv_loop_t *loop, kvlink_ctx_t **ctx, rig_t *rec, size_t pool)
{
    assert_int_equal(kvlink_ctx_create(NULL, ctx), FY_OK);
    kvlink_params_t p;
    kvlink_params_default(&p);
    p.compat.model_fingerprint = 0x1234abcdull;
    p.compat.codec_version = 3;
    p.recv_pool_bytes = pool;
    p.max_frame_bytes = 8u << 20;
    p.on_frame = rig_on_frame;
    p.on_recv_end = rig_on_recv_end;
    p.cb_arg = rec;
    kvlink_t *link;
    if (kvlink_create(*ctx, loop, &p, &link) != FY_OK)
        exit(3);
    return link;
}

/* Sends n frames of 1 MiB on request id; finishes and waits for the end when finish. */
static int child_sender(const char *addr, uint64_t id, int n, bool finish)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    kvlink_ctx_t *ctx;
    rig_t rec;
    memset(&rec, 0, sizeof(rec));
    kvlink_t *link = child_link(&loop, &ctx, &rec, 0);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    child_state_t c = {0};
    sp.on_end = child_send_end;
    sp.arg = &c;
    kvlink_send_t *req;
    if (kvlink_send_open(link, addr, id, &sp, &req) != FY_OK)
        return 4;
    h_fill(g_frame, sizeof(g_frame), id, 0);
    for (int i = 0; i < n; i++)
        if (kvlink_send_frame(req, 0, g_frame, sizeof(g_frame), NULL, NULL) != FY_OK)
            return 5;
    if (finish)
        kvlink_send_finish(req);
    h_run_until(&loop, child_ended, &c, 30000);
    int rc = c.ended && c.st == FY_OK ? 0 : 6;
    kvlink_destroy(link);
    kvlink_ctx_destroy(ctx);
    h_loop_close(&loop);
    return rc;
}

static bool child_rx_ended(void *arg)
{
    return ((rig_t *)arg)->n_rx_end > 0;
}

/* Listens (on port, 0 = any), expects request id with a 2 MiB window, holds every buffer;
 * prints the port. */
static int child_receiver(uint64_t id, uint16_t want_port)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    kvlink_ctx_t *ctx;
    rig_t rec;
    memset(&rec, 0, sizeof(rec));
    kvlink_t *link = child_link(&loop, &ctx, &rec, 16u << 20);
    uint16_t port;
    if (kvlink_listen(link, "127.0.0.1", want_port, &port) != FY_OK)
        return 3;
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(link, &rp);
    rp.credit_bytes = 2u << 20;
    if (kvlink_recv_expect(link, id, &rp) != FY_OK)
        return 4;
    printf("%u\n", port);
    fflush(stdout);
    h_run_until(&loop, child_rx_ended, &rec, 30000);
    // Linger before exiting: the request's last STATUS is on its way to the sender, and a
    // process that exits at once resets the connection, which the sender may see first (on a
    // busy machine it did, 5 runs in 30).
    h_run_for(&loop, 500);
    int rc = rec.n_rx_end == 1 && rec.rx_end_st[0] == FY_OK ? 0 : 6;
    rig_release_all(&rec);
    kvlink_destroy(link);
    kvlink_ctx_destroy(ctx);
    h_loop_close(&loop);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* The survivor                                                                                */
/* ------------------------------------------------------------------------------------------ */

static pid_t spawn(char *const argv[], int *stdout_fd)
{
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(g_self, argv);
        _exit(127);
    }
    close(fds[1]);
    if (stdout_fd != NULL)
        *stdout_fd = fds[0];
    else
        close(fds[0]);
    return pid;
}

static uint16_t read_port(int fd)
{
    char buf[16] = {0};
    size_t n = 0;
    while (n < sizeof(buf) - 1) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0 || buf[n] == '\n')
            break;
        n++;
    }
    close(fd);
    return (uint16_t)atoi(buf);
}

static int wait_exit(pid_t pid)
{
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static bool frames_ge2(void *arg)
{
    return ((rig_t *)arg)->frames_ok >= 2;
}

static bool rx_ended(void *arg)
{
    return ((rig_t *)arg)->n_rx_end >= 1;
}

static void test_sender_dies(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    kvlink_recv_params_t rp;
    kvlink_recv_params_default(r.rx, &rp);
    rp.credit_bytes = 4u << 20;
    rp.deadline_ns = fy_clock_ns() + 15ull * 1000 * 1000 * 1000;
    assert_int_equal(kvlink_recv_expect(r.rx, 1, &rp), FY_OK);
    char *argv1[] = {(char *)g_self, "--sender", r.addr, "1", "100", "0", NULL};
    pid_t pid = spawn(argv1, NULL);
    assert_true(h_run_until(&r.loop, frames_ge2, &r, 10000));
    kill(pid, SIGKILL);
    uint64_t t0 = fy_clock_ns();
    assert_true(h_run_until(&r.loop, rx_ended, &r, 12000));
    uint64_t took_ms = (fy_clock_ns() - t0) / 1000000;
    print_message("receiver saw the dead sender after %llu ms\n", (unsigned long long)took_ms);
    assert_int_equal(r.rx_end_st[0], FY_ERR_UNAVAILABLE);
    assert_int_equal(wait_exit(pid), 128 + SIGKILL);
    rig_release_all(&r);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.rx, 5000));

    // A new sender process to the same listener completes a request.
    r.n_rx_end = 0;
    r.frames_ok = 0;
    r.release_inline = true;
    rp.deadline_ns = fy_clock_ns() + 15ull * 1000 * 1000 * 1000;
    assert_int_equal(kvlink_recv_expect(r.rx, 2, &rp), FY_OK);
    char *argv2[] = {(char *)g_self, "--sender", r.addr, "2", "10", "1", NULL};
    pid = spawn(argv2, NULL);
    assert_true(h_run_until(&r.loop, rx_ended, &r, 15000));
    assert_int_equal(r.rx_end_st[0], FY_OK);
    assert_int_equal(r.frames_ok, 10);
    // The sender exits once it has the receiver's confirmation; keep serving until then.
    int status = 0;
    uint64_t until = fy_clock_ns() + 10000ull * 1000 * 1000;
    while (waitpid(pid, &status, WNOHANG) == 0 && fy_clock_ns() < until)
        h_run_for(&r.loop, 10);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    rig_fini(&r);
}

static bool tx_sent_some(void *arg)
{
    rig_t *r = arg;
    kvlink_stats_t s;
    kvlink_stats(r->tx, &s);
    return s.frames_sent >= 1;
}

static bool tx_ended(void *arg)
{
    return ((rig_t *)arg)->n_tx_end >= 1;
}

static void count_done(kvlink_send_t *req, fy_status_t st, void *arg)
{
    rig_t *r = arg;
    if (st == FY_OK)
        r->frames_done_ok++;
    else
        r->frames_done_err++;
}

static void test_receiver_dies(void **state)
{
    rig_t r;
    assert_int_equal(rig_init(&r, NULL, NULL), FY_OK);
    int fd;
    char *argv1[] = {(char *)g_self, "--receiver", "1", NULL};
    pid_t pid = spawn(argv1, &fd);
    uint16_t port = read_port(fd);
    assert_true(port != 0);
    char addr[64];
    snprintf(addr, sizeof(addr), "127.0.0.1:%u", port);
    kvlink_send_params_t sp;
    kvlink_send_params_default(&sp);
    sp.on_end = rig_on_send_end;
    sp.arg = &r;
    sp.deadline_ns = fy_clock_ns() + 15ull * 1000 * 1000 * 1000;
    kvlink_send_t *req;
    assert_int_equal(kvlink_send_open(r.tx, addr, 1, &sp, &req), FY_OK);
    h_fill(g_frame, sizeof(g_frame), 1, 0);
    for (int i = 0; i < 20; i++)
        assert_int_equal(kvlink_send_frame(req, 0, g_frame, sizeof(g_frame), count_done, &r),
                         FY_OK);
    assert_true(h_run_until(&r.loop, tx_sent_some, &r, 10000));
    kill(pid, SIGKILL);
    uint64_t t0 = fy_clock_ns();
    assert_true(h_run_until(&r.loop, tx_ended, &r, 12000));
    uint64_t took_ms = (fy_clock_ns() - t0) / 1000000;
    print_message("sender saw the dead receiver after %llu ms\n", (unsigned long long)took_ms);
    assert_int_equal(r.tx_end_st[0], FY_ERR_UNAVAILABLE);
    assert_int_equal(wait_exit(pid), 128 + SIGKILL);
    assert_true(h_run_until(&r.loop, (h_cond_fn)rig_idle, r.tx, 5000));
    assert_int_equal(r.frames_done_ok + r.frames_done_err, 20);

    // Reconnect: a new receiver process on the same port; the dead endpoint is not reused.
    r.n_tx_end = 0;
    char port_s[16];
    snprintf(port_s, sizeof(port_s), "%u", port);
    char *argv2[] = {(char *)g_self, "--receiver", "2", port_s, NULL};
    pid = spawn(argv2, &fd);
    uint16_t port2 = read_port(fd);
    if (port2 == 0)
        fail_msg("the restarted receiver could not listen on port %u (exit %d)", port,
                 wait_exit(pid));
    assert_int_equal(port2, port);
    snprintf(addr, sizeof(addr), "127.0.0.1:%u", port);
    sp.deadline_ns = fy_clock_ns() + 15ull * 1000 * 1000 * 1000;
    assert_int_equal(kvlink_send_open(r.tx, addr, 2, &sp, &req), FY_OK);
    h_fill(g_frame, sizeof(g_frame), 2, 0);
    // Within the child's 2 MiB window, so it can finish while holding the buffers.
    assert_int_equal(kvlink_send_frame(req, 0, g_frame, sizeof(g_frame), NULL, NULL), FY_OK);
    assert_int_equal(kvlink_send_frame(req, 0, g_frame, sizeof(g_frame), NULL, NULL), FY_OK);
    assert_int_equal(kvlink_send_finish(req), FY_OK);
    assert_true(h_run_until(&r.loop, tx_ended, &r, 15000));
    assert_int_equal(r.tx_end_st[0], FY_OK);
    // The receiver flushes its goodbye before exiting; keep serving until it is gone.
    int status = 0;
    uint64_t until = fy_clock_ns() + 10000ull * 1000 * 1000;
    while (waitpid(pid, &status, WNOHANG) == 0 && fy_clock_ns() < until)
        h_run_for(&r.loop, 10);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    rig_fini(&r);
}

int main(int argc, char **argv)
{
    g_self = argv[0];
    if (argc == 6 && strcmp(argv[1], "--sender") == 0)
        return child_sender(argv[2], strtoull(argv[3], NULL, 10), atoi(argv[4]),
                            atoi(argv[5]) != 0);
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "--receiver") == 0)
        return child_receiver(strtoull(argv[2], NULL, 10), argc == 4 ? (uint16_t)atoi(argv[3]) : 0);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sender_dies),
        cmocka_unit_test(test_receiver_dies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
