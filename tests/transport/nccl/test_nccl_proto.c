// The NCCL link's protocol core over an in-memory backend that behaves like NCCL send/recv:
// a round completes only when both ends have posted theirs, transfers match by order and
// size, and a peer that stops (aborted or never posting) leaves the other end's round hanging.
// Runs the shared scenarios (scenarios.h) plus control-block encoding checks, on any machine.
#include "scenarios.h"

#include "nccl_link_int.h"

typedef struct mem_wire mem_wire_t;

typedef struct {
    mem_wire_t *wire;
    int rank;
    bool aborted;
    bool posted, done;
    bool send;
    kvlink_nccl_xfer_t xfers[KVLINK_NCCL_MAX_XFERS];
    size_t n;
    uint8_t out[KVLINK_NCCL_CTL_BYTES];
    uint8_t in[KVLINK_NCCL_CTL_BYTES];
    int init_polls; /* set-up takes a few polls, as a real communicator does */
} mem_be_t;

struct mem_wire {
    mem_be_t *end[2];
    int refs;
    bool broken;
};

static fy_status_t mem_init_test(void *arg)
{
    mem_be_t *be = arg;
    if (be->aborted)
        return FY_ERR_STATE;
    return ++be->init_polls < 3 ? FY_ERR_AGAIN : FY_OK;
}

/* Matches both ends' posted rounds once both are there, as NCCL's kernels would. */
static void mem_match(mem_wire_t *w)
{
    mem_be_t *a = w->end[0], *b = w->end[1];
    if (a == NULL || b == NULL || !a->posted || !b->posted || a->aborted || b->aborted)
        return;
    if (a->n != b->n || a->send == b->send) {
        w->broken = true; // NCCL would hang or fail: mismatched operations
        return;
    }
    mem_be_t *snd = a->send ? a : b, *rcv = a->send ? b : a;
    for (size_t i = 0; i < a->n; i++) {
        if (snd->xfers[i].len != rcv->xfers[i].len) {
            w->broken = true;
            return;
        }
        memcpy(rcv->xfers[i].ptr, snd->xfers[i].ptr, snd->xfers[i].len);
    }
    memcpy(a->in, b->out, KVLINK_NCCL_CTL_BYTES);
    memcpy(b->in, a->out, KVLINK_NCCL_CTL_BYTES);
    a->posted = b->posted = false;
    a->done = b->done = true;
}

static fy_status_t mem_post_round(void *arg, const kvlink_nccl_xfer_t *xfers, size_t n, bool send,
                                  const uint8_t *ctl_out)
{
    mem_be_t *be = arg;
    assert_false(be->posted);
    assert_false(be->done);
    assert_true(n <= KVLINK_NCCL_MAX_XFERS);
    memcpy(be->xfers, xfers, n * sizeof(*xfers));
    be->n = n;
    be->send = send;
    memcpy(be->out, ctl_out, KVLINK_NCCL_CTL_BYTES);
    be->posted = true;
    return FY_OK;
}

static fy_status_t mem_test_round(void *arg, uint8_t *ctl_in)
{
    mem_be_t *be = arg;
    if (be->aborted)
        return FY_ERR_STATE;
    mem_match(be->wire);
    if (be->wire->broken)
        return FY_ERR_TRANSPORT;
    if (!be->done)
        return FY_ERR_AGAIN;
    be->done = false;
    memcpy(ctl_in, be->in, KVLINK_NCCL_CTL_BYTES);
    return FY_OK;
}

static fy_status_t mem_alloc(void *arg, size_t bytes, void **ptr_p)
{
    (void)arg;
    void *p = malloc(bytes);
    if (p == NULL)
        return FY_ERR_NO_MEMORY;
    memset(p, 0xa5, bytes); // poison: a frame must be written to be right
    *ptr_p = p;
    return FY_OK;
}

static void mem_free(void *arg, void *ptr)
{
    (void)arg;
    free(ptr);
}

static void mem_abort(void *arg)
{
    mem_be_t *be = arg;
    be->aborted = true;
    be->posted = false;
}

static void mem_destroy(void *arg)
{
    mem_be_t *be = arg;
    mem_wire_t *w = be->wire;
    w->end[be->rank] = NULL;
    free(be);
    if (--w->refs == 0)
        free(w);
}

static const kvlink_nccl_ops_t k_mem_ops = {
    .init_test = mem_init_test,
    .post_round = mem_post_round,
    .test_round = mem_test_round,
    .mem_alloc = mem_alloc,
    .mem_free = mem_free,
    .abort = mem_abort,
    .destroy = mem_destroy,
};

static fy_status_t mem_make_pair(const kvlink_nccl_params_t *ps, const kvlink_nccl_params_t *pr,
                                 kvlink_nccl_t **s_p, kvlink_nccl_t **r_p)
{
    mem_wire_t *w = calloc(1, sizeof(*w));
    mem_be_t *a = calloc(1, sizeof(*a)), *b = calloc(1, sizeof(*b));
    assert_non_null(w);
    assert_non_null(a);
    assert_non_null(b);
    a->wire = b->wire = w;
    a->rank = 0;
    b->rank = 1;
    w->end[0] = a;
    w->end[1] = b;
    w->refs = 2;
    fy_status_t st = kvlink_nccl_create_ops(&k_mem_ops, a, ps, s_p);
    if (st != FY_OK) {
        mem_abort(b);
        mem_destroy(b);
        return st;
    }
    st = kvlink_nccl_create_ops(&k_mem_ops, b, pr, r_p);
    if (st != FY_OK) {
        kvlink_nccl_destroy(*s_p);
        return st;
    }
    return FY_OK;
}

static void *host_frame_alloc(const uint8_t *host, size_t len)
{
    void *p = malloc(len);
    assert_non_null(p);
    memcpy(p, host, len);
    return p;
}

static void host_frame_free(void *p)
{
    free(p);
}
static void host_read_back(void *host, const void *data, size_t len)
{
    memcpy(host, data, len);
}

/* ------------------------------------------------------------------------------------------ */

static void test_ctl_roundtrip(void **state)
{
    (void)state;
    static kvlink_nccl_ctl_t a, b;
    memset(&a, 0, sizeof(a));
    a.round = 0x0102030405060708ull;
    a.has_hello = true;
    a.compat = (kvlink_compat_t){1, 2, 4096, 0xfeedfacecafebeefull};
    a.role = 1;
    a.n_entries = KVLINK_NCCL_MAX_ENTRIES;
    for (size_t i = 0; i < a.n_entries; i++)
        a.entries[i] = (kvlink_nccl_entry_t){.type = (uint8_t)(1 + i % 6),
                                             .status = -(int32_t)(i % 27),
                                             .request_id = i * 0x100000001ull,
                                             .layer = (uint32_t)i,
                                             .crc = (uint32_t)(i * 2654435761u),
                                             .bytes = i << 20};
    uint8_t buf[KVLINK_NCCL_CTL_BYTES];
    kvlink_nccl_ctl_pack(&a, buf);
    assert_int_equal(kvlink_nccl_ctl_unpack(buf, &b), FY_OK);
    assert_int_equal(b.round, a.round);
    assert_true(b.has_hello);
    assert_memory_equal(&b.compat, &a.compat, sizeof(a.compat));
    assert_int_equal(b.role, 1);
    assert_int_equal(b.n_entries, a.n_entries);
    for (size_t i = 0; i < a.n_entries; i++) {
        assert_int_equal(b.entries[i].type, a.entries[i].type);
        assert_int_equal(b.entries[i].status, a.entries[i].status);
        assert_int_equal(b.entries[i].request_id, a.entries[i].request_id);
        assert_int_equal(b.entries[i].layer, a.entries[i].layer);
        assert_int_equal(b.entries[i].crc, a.entries[i].crc);
        assert_int_equal(b.entries[i].bytes, a.entries[i].bytes);
    }
}

static void test_ctl_rejects_malformed(void **state)
{
    (void)state;
    static kvlink_nccl_ctl_t a, b;
    memset(&a, 0, sizeof(a));
    a.n_entries = 2;
    a.entries[0].type = KVLINK_NCCL_E_OPEN;
    a.entries[1].type = KVLINK_NCCL_E_FRAME;
    uint8_t good[KVLINK_NCCL_CTL_BYTES], bad[KVLINK_NCCL_CTL_BYTES];
    kvlink_nccl_ctl_pack(&a, good);
    assert_int_equal(kvlink_nccl_ctl_unpack(good, &b), FY_OK);
    const size_t flips[] = {0, 4, 7, 17, 20, 30, 50, 63, 65};
    for (size_t i = 0; i < FY_ARRAY_SIZE(flips); i++) {
        memcpy(bad, good, sizeof(bad));
        bad[flips[i]] ^= 0x40; // magic, version, count high byte, flags, reserved, pad
        assert_int_equal(kvlink_nccl_ctl_unpack(bad, &b), FY_ERR_FORMAT);
    }
    memcpy(bad, good, sizeof(bad));
    bad[6] = (uint8_t)(KVLINK_NCCL_MAX_ENTRIES + 1); // more entries than fit
    bad[7] = 0;
    assert_int_equal(kvlink_nccl_ctl_unpack(bad, &b), FY_ERR_FORMAT);
    // Random blocks: never accepted past the magic, never read out of bounds.
    uint64_t s = 7;
    for (int t = 0; t < 2000; t++) {
        for (size_t i = 0; i < sizeof(bad); i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            bad[i] = (uint8_t)(s >> 56);
        }
        if (t % 2)
            memcpy(bad, good, 8); // valid magic, version, count: deeper checks
        (void)kvlink_nccl_ctl_unpack(bad, &b);
    }
}

static void test_params_checked(void **state)
{
    (void)state;
    kvlink_nccl_params_t p;
    kvlink_nccl_params_default(&p);
    p.role = KVLINK_NCCL_RECEIVER;
    p.recv_pool_bytes = 0;
    mem_wire_t *w = calloc(1, sizeof(*w));
    mem_be_t *a = calloc(1, sizeof(*a));
    a->wire = w;
    w->end[0] = a;
    w->refs = 1;
    kvlink_nccl_t *pair = NULL;
    // The backend is taken even when the parameters are refused.
    assert_int_equal(kvlink_nccl_create_ops(&k_mem_ops, a, &p, &pair), FY_ERR_INVALID_ARG);
    assert_null(pair);
}

int main(void)
{
    g_h = (harness_t){.make_pair = mem_make_pair,
                      .frame_alloc = host_frame_alloc,
                      .frame_free = host_frame_free,
                      .read_back = host_read_back,
                      .peer_timeout_ms = 300};
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ctl_roundtrip),
        cmocka_unit_test(test_ctl_rejects_malformed),
        cmocka_unit_test(test_params_checked),
        NCCL_SCENARIO_TESTS,
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
