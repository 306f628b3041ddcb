/* Fork-join across tokens for the work BLAS does not thread: top-k selection, the activation
 * pass, sparse decoding, steering deltas.
 *
 * Threads are created per call and joined before it returns, so the library keeps no pool, no
 * global state and nothing alive between calls. Creating a thread costs tens of microseconds,
 * which is why callers give a grain: work smaller than that stays on the calling thread.
 * Callers never run these sections while a BLAS call is in flight, so OpenBLAS's own threads and
 * ours take turns on the cores instead of oversubscribing them. */
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

/* More threads than this gain nothing for the memory-bound passes they run. */
#define MAX_THREADS 64

size_t sae__model_threads(const sae_model *m)
{
    size_t want = m->threads;
    if (want == 0) {
#ifdef CPU_COUNT
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof set, &set) == 0)
            want = (size_t)CPU_COUNT(&set);
#endif
        if (want == 0) {
            long cores = sysconf(_SC_NPROCESSORS_ONLN);
            want = cores > 0 ? (size_t)cores : 1;
        }
    }
    return want < MAX_THREADS ? want : MAX_THREADS;
}

/* A thread costs some 20-50 us to create and join; 2^18 element operations take well over
 * 100 us even at memory speed. */
size_t sae__grain(size_t work) { return 1 + ((size_t)1 << 18) / (work ? work : 1); }

size_t sae__parallel_chunks(size_t threads, size_t count, size_t grain)
{
    if (grain == 0)
        grain = 1;
    size_t chunks = count / grain;
    if (chunks > threads)
        chunks = threads;
    if (chunks > MAX_THREADS)
        chunks = MAX_THREADS;
    return chunks < 1 ? 1 : chunks;
}

typedef struct {
    sae__range_fn fn;
    void *ctx;
    size_t begin, end, worker;
} chunk;

static void *run_chunk(void *arg)
{
    chunk *c = arg;
    c->fn(c->ctx, c->begin, c->end, c->worker);
    return NULL;
}

void sae__parallel_for(size_t threads, size_t count, size_t grain, sae__range_fn fn, void *ctx)
{
    if (count == 0)
        return;
    const size_t chunks = sae__parallel_chunks(threads, count, grain);
    if (chunks == 1) {
        fn(ctx, 0, count, 0);
        return;
    }
    chunk work[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    bool started[MAX_THREADS] = {false};
    for (size_t w = 0; w < chunks; w++)
        work[w] = (chunk){fn, ctx, count * w / chunks, count * (w + 1) / chunks, w};
    for (size_t w = 1; w < chunks; w++)
        started[w] = pthread_create(&tid[w], NULL, run_chunk, &work[w]) == 0;
    run_chunk(&work[0]);
    /* A thread the system refused runs here instead: slower, never wrong. */
    for (size_t w = 1; w < chunks; w++) {
        if (started[w])
            pthread_join(tid[w], NULL);
        else
            run_chunk(&work[w]);
    }
}
