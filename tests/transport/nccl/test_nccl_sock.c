// The NCCL link's protocol over its socket backend (nccl_link_sock.c): both ends in this
// process, joined through a real TCP connection on the loopback, running the shared scenarios
// (scenarios.h), plus the id's checks: a malformed id, an id made elsewhere, and a connection
// that does not present the pair's token.
#include "scenarios.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

static fy_status_t sock_make_pair(const kvlink_nccl_params_t *ps, const kvlink_nccl_params_t *pr,
                                  kvlink_nccl_t **s_p, kvlink_nccl_t **r_p)
{
    uint8_t id[KVLINK_NCCL_ID_BYTES];
    fy_status_t st = kvlink_nccl_sock_id_create("127.0.0.1", id);
    if (st != FY_OK)
        return st;
    st = kvlink_nccl_sock_create(id, sizeof(id), pr, r_p);
    if (st != FY_OK)
        return st;
    st = kvlink_nccl_sock_create(id, sizeof(id), ps, s_p);
    if (st != FY_OK) {
        kvlink_nccl_destroy(*r_p);
        return st;
    }
    return FY_OK;
}


static void params(kvlink_nccl_params_t *p, kvlink_nccl_role_t role)
{
    kvlink_nccl_params_default(p);
    p->role = role;
    p->recv_pool_bytes = 1 << 20;
    p->max_frame_bytes = 1 << 16;
    p->init_timeout_ms = 2000;
}

static void pump_until_ready(kvlink_nccl_t *a, kvlink_nccl_t *b, uint32_t ms)
{
    uint64_t end = fy_clock_ns() + (uint64_t)ms * 1000000u;
    while (fy_clock_ns() < end && !(kvlink_nccl_ready(a) && (b == NULL || kvlink_nccl_ready(b)))) {
        kvlink_nccl_progress(a);
        if (b != NULL)
            kvlink_nccl_progress(b);
        usleep(200);
    }
}

/* Ids that are not well formed, or were made in another process, are refused. */
static void test_id_checked(void **state)
{
    (void)state;
    kvlink_nccl_params_t p;
    params(&p, KVLINK_NCCL_RECEIVER);
    uint8_t id[KVLINK_NCCL_ID_BYTES];
    kvlink_nccl_t *pair = NULL;
    memset(id, 0, sizeof(id));
    assert_int_equal(kvlink_nccl_sock_create(id, sizeof(id), &p, &pair), FY_ERR_FORMAT);
    assert_int_equal(kvlink_nccl_sock_id_create("127.0.0.1", id), FY_OK);
    assert_int_equal(kvlink_nccl_sock_create(id, sizeof(id) - 1, &p, &pair), FY_ERR_INVALID_ARG);
    uint8_t bad[KVLINK_NCCL_ID_BYTES];
    memcpy(bad, id, sizeof(bad));
    memset(bad + 24, 'x', sizeof(bad) - 24); // host without its NUL
    assert_int_equal(kvlink_nccl_sock_create(bad, sizeof(bad), &p, &pair), FY_ERR_FORMAT);
    memcpy(bad, id, sizeof(bad));
    bad[8] ^= 1; // a token this process never made
    assert_int_equal(kvlink_nccl_sock_create(bad, sizeof(bad), &p, &pair), FY_ERR_NOT_FOUND);
    // The real one is still waiting for its receiver, once.
    assert_int_equal(kvlink_nccl_sock_create(id, sizeof(id), &p, &pair), FY_OK);
    assert_int_equal(kvlink_nccl_sock_create(id, sizeof(id), &p, &(kvlink_nccl_t *){NULL}),
                     FY_ERR_NOT_FOUND);
    kvlink_nccl_destroy(pair);
    assert_int_equal(kvlink_nccl_sock_id_create(NULL, id), FY_ERR_INVALID_ARG);
    assert_int_equal(kvlink_nccl_sock_id_create("not an address", id), FY_ERR_INVALID_ARG);
}

/* A stranger that connects to the listener without the token is dropped; the real sender
 * still gets through afterwards. */
static void test_stranger_dropped(void **state)
{
    (void)state;
    uint8_t id[KVLINK_NCCL_ID_BYTES];
    assert_int_equal(kvlink_nccl_sock_id_create("127.0.0.1", id), FY_OK);
    kvlink_nccl_params_t ps, pr;
    params(&ps, KVLINK_NCCL_SENDER);
    params(&pr, KVLINK_NCCL_RECEIVER);
    kvlink_nccl_t *r = NULL, *s = NULL;
    assert_int_equal(kvlink_nccl_sock_create(id, sizeof(id), &pr, &r), FY_OK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)(id[4] | id[5] << 8))};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    char junk[16] = "GET / HTTP/1.1\r";
    assert_int_equal(write(fd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
    pump_until_ready(r, NULL, 300);
    assert_false(kvlink_nccl_ready(r));
    char c;
    assert_true(read(fd, &c, 1) <= 0); // closed by the receiver
    close(fd);
    assert_int_equal(kvlink_nccl_sock_create(id, sizeof(id), &ps, &s), FY_OK);
    pump_until_ready(s, r, 2000);
    assert_true(kvlink_nccl_ready(s));
    assert_true(kvlink_nccl_ready(r));
    kvlink_nccl_destroy(s);
    kvlink_nccl_destroy(r);
}

int main(void)
{
    g_h = (harness_t){.make_pair = sock_make_pair,
                      .frame_alloc = scn_host_frame_alloc,
                      .frame_free = scn_host_frame_free,
                      .read_back = scn_host_read_back,
                      .peer_timeout_ms = 300,
                      .sees_peer_close = true};
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_checked),
        cmocka_unit_test(test_stranger_dropped),
        NCCL_SCENARIO_TESTS,
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
