/*
 * pool.c: a small thread pool with two uses.
 *
 * - parallel-for: the caller splits [0, n) into chunks and joins the work as worker 0; the
 *   kernels use it for every op, so it keeps no per-call allocation.
 * - a task queue: fire-and-forget tasks (e.g. encoding a layer while the next one computes)
 *   with a wait-for-all barrier.
 *
 * Workers sleep on a condition variable when there is nothing to do; nothing spins.
 */
#include "common.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct fy_pool_task {
    fy_pool_task_cb fn;
    void *arg;
    struct fy_pool_task *next;
} fy_pool_task_t;

struct fy_pool {
    int n_threads; // workers including the parallel-for caller
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;  // workers wait here for work
    pthread_cond_t done;  // callers wait here for completion
    bool stopping;

    // parallel-for job, valid while pf_generation is odd-numbered "active"
    fy_pool_range_cb pf_fn;
    void *pf_ctx;
    size_t pf_n, pf_chunk, pf_next_chunk, pf_n_chunks;
    int pf_running;        // workers still inside the current job
    uint64_t pf_generation;

    // task queue
    fy_pool_task_t *head, *tail;
    size_t tasks_pending; // queued + running
};

// Takes chunks of the current parallel-for until none are left. Called with mu held;
// returns with mu held.
static void pool_pf_drain(fy_pool_t *pool, int thread)
{
    while (pool->pf_next_chunk < pool->pf_n_chunks) {
        size_t c = pool->pf_next_chunk++;
        size_t begin = c * pool->pf_chunk;
        size_t end = FY_MIN(begin + pool->pf_chunk, pool->pf_n);
        pthread_mutex_unlock(&pool->mu);
        pool->pf_fn(pool->pf_ctx, begin, end, thread);
        pthread_mutex_lock(&pool->mu);
    }
}

typedef struct {
    fy_pool_t *pool;
    int index;
} pool_worker_arg_t;

static void *pool_worker_main(void *p)
{
    pool_worker_arg_t *wa = p;
    fy_pool_t *pool = wa->pool;
    int index = wa->index;
    free(wa);
    uint64_t seen_generation = 0;

    pthread_mutex_lock(&pool->mu);
    for (;;) {
        if (pool->pf_generation != seen_generation &&
            pool->pf_next_chunk < pool->pf_n_chunks) {
            seen_generation = pool->pf_generation;
            pool->pf_running++;
            pool_pf_drain(pool, index);
            if (--pool->pf_running == 0)
                pthread_cond_broadcast(&pool->done);
            continue;
        }
        if (pool->head != NULL) {
            fy_pool_task_t *t = pool->head;
            pool->head = t->next;
            if (pool->head == NULL)
                pool->tail = NULL;
            pthread_mutex_unlock(&pool->mu);
            t->fn(t->arg);
            free(t);
            pthread_mutex_lock(&pool->mu);
            if (--pool->tasks_pending == 0)
                pthread_cond_broadcast(&pool->done);
            continue;
        }
        if (pool->stopping)
            break;
        pthread_cond_wait(&pool->wake, &pool->mu);
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

fy_status_t fy_pool_create(int n_threads, fy_pool_t **pool_p)
{
    if (n_threads < 0 || pool_p == NULL)
        return FY_ERR_INVALID_ARG;
    if (n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)FY_MIN(n, 256) : 1;
    }
    fy_pool_t *pool = calloc(1, sizeof(*pool));
    if (pool == NULL)
        return FY_ERR_NO_MEMORY;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    // Worker 0 is the caller of parallel-for, but queued tasks need at least one thread.
    int n_spawn = n_threads > 1 ? n_threads - 1 : 1;
    pool->threads = calloc((size_t)n_spawn, sizeof(pthread_t));
    if (pool->threads == NULL)
        goto err_free_pool;
    int started = 0;
    for (; started < n_spawn; started++) {
        pool_worker_arg_t *wa = malloc(sizeof(*wa));
        if (wa == NULL)
            goto err_stop_threads;
        wa->pool = pool;
        wa->index = started + 1;
        if (pthread_create(&pool->threads[started], NULL, pool_worker_main, wa) != 0) {
            free(wa);
            goto err_stop_threads;
        }
    }
    *pool_p = pool;
    return FY_OK;

err_stop_threads: // undo: threads started so far
    pthread_mutex_lock(&pool->mu);
    pool->stopping = true;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 0; i < started; i++)
        pthread_join(pool->threads[i], NULL);
    free(pool->threads);
err_free_pool: // undo: the pool struct and its sync objects
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mu);
    free(pool);
    return FY_ERR_NO_MEMORY;
}

void fy_pool_destroy(fy_pool_t *pool)
{
    if (pool == NULL)
        return;
    fy_pool_wait(pool);
    pthread_mutex_lock(&pool->mu);
    pool->stopping = true;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    int n_spawn = pool->n_threads > 1 ? pool->n_threads - 1 : 1;
    for (int i = 0; i < n_spawn; i++)
        pthread_join(pool->threads[i], NULL);
    free(pool->threads);
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mu);
    free(pool);
}

int fy_pool_size(const fy_pool_t *pool)
{
    return pool != NULL ? pool->n_threads : 1;
}

void fy_pool_parallel_for(fy_pool_t *pool, size_t n, size_t min_chunk, fy_pool_range_cb fn,
                          void *ctx)
{
    if (n == 0)
        return;
    if (min_chunk == 0)
        min_chunk = 1;
    if (pool == NULL || pool->n_threads == 1 || n <= min_chunk) {
        fn(ctx, 0, n, 0);
        return;
    }
    // About four chunks per worker balances uneven items without much locking.
    size_t chunk = (n + (size_t)pool->n_threads * 4 - 1) / ((size_t)pool->n_threads * 4);
    chunk = FY_MAX(chunk, min_chunk);

    pthread_mutex_lock(&pool->mu);
    pool->pf_fn = fn;
    pool->pf_ctx = ctx;
    pool->pf_n = n;
    pool->pf_chunk = chunk;
    pool->pf_n_chunks = (n + chunk - 1) / chunk;
    pool->pf_next_chunk = 0;
    pool->pf_generation++;
    pthread_cond_broadcast(&pool->wake);
    pool->pf_running++;
    pool_pf_drain(pool, 0);
    pool->pf_running--;
    while (pool->pf_running > 0)
        pthread_cond_wait(&pool->done, &pool->mu);
    pool->pf_fn = NULL;
    pthread_mutex_unlock(&pool->mu);
}

fy_status_t fy_pool_submit(fy_pool_t *pool, fy_pool_task_cb fn, void *arg)
{
    if (pool == NULL || fn == NULL)
        return FY_ERR_INVALID_ARG;
    fy_pool_task_t *t = malloc(sizeof(*t));
    if (t == NULL)
        return FY_ERR_NO_MEMORY;
    t->fn = fn;
    t->arg = arg;
    t->next = NULL;
    pthread_mutex_lock(&pool->mu);
    if (pool->stopping) {
        pthread_mutex_unlock(&pool->mu);
        free(t);
        return FY_ERR_CLOSED;
    }
    if (pool->tail != NULL)
        pool->tail->next = t;
    else
        pool->head = t;
    pool->tail = t;
    pool->tasks_pending++;
    pthread_cond_signal(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    return FY_OK;
}

void fy_pool_wait(fy_pool_t *pool)
{
    if (pool == NULL)
        return;
    pthread_mutex_lock(&pool->mu);
    while (pool->tasks_pending > 0)
        pthread_cond_wait(&pool->done, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
}
