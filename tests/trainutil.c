#define _POSIX_C_SOURCE 200809L /* pthread barriers */
#include "trainutil.h"

#include <pthread.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

float *tu_train_data(size_t n, size_t d, uint64_t seed)
{
    tu_rng r = {seed};
    float *x = tu_malloc(n * d * sizeof(float));
    for (size_t t = 0; t < n; t++)
        for (size_t j = 0; j < d; j++)
            x[t * d + j] = 0.5f + 0.3f * (float)j / (float)d + tu_normal(&r);
    return x;
}

void tu_run_steps(sae_trainer *t, size_t d, size_t from, size_t to)
{
    for (size_t s = from; s < to; s++) {
        float *x = tu_train_data(32, d, 1000 + s);
        ck_assert_ok(sae_trainer_step(t, x, 32));
        free(x);
    }
}

int tu_capture_allreduce(float *buf, size_t count, void *user)
{
    tu_capture *c = user;
    free(c->copy);
    c->copy = tu_malloc(count * sizeof(float));
    memcpy(c->copy, buf, count * sizeof(float));
    c->count = count;
    c->calls++;
    return 0;
}

struct tu_group {
    pthread_barrier_t barrier;
    float *sum;
    size_t count;
    pthread_mutex_t lock;
};

tu_group *tu_group_new(size_t count, unsigned threads)
{
    tu_group *g = tu_malloc(sizeof *g);
    pthread_barrier_init(&g->barrier, NULL, threads);
    pthread_mutex_init(&g->lock, NULL);
    g->count = count;
    g->sum = calloc(count, sizeof(float));
    ck_assert_ptr_nonnull(g->sum);
    return g;
}

void tu_group_free(tu_group *g)
{
    free(g->sum);
    pthread_barrier_destroy(&g->barrier);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

/* The second barrier's serial thread clears the sum only after every thread has copied it; the
 * third keeps a fast thread from adding its next buffer before the clear. */
int tu_thread_allreduce(float *buf, size_t count, void *user)
{
    tu_group *g = user;
    pthread_mutex_lock(&g->lock);
    for (size_t i = 0; i < count; i++)
        g->sum[i] += buf[i];
    pthread_mutex_unlock(&g->lock);
    pthread_barrier_wait(&g->barrier);
    memcpy(buf, g->sum, count * sizeof(float));
    if (pthread_barrier_wait(&g->barrier) == PTHREAD_BARRIER_SERIAL_THREAD)
        memset(g->sum, 0, count * sizeof(float));
    pthread_barrier_wait(&g->barrier);
    return 0;
}

double tu_metric(const sae_trainer *t, sae_train_metric which)
{
    double v;
    ck_assert_ok(sae_trainer_get_metric(t, which, &v));
    return v;
}

double *tu_dup_tensor(const sae_model *m, sae_tensor t, size_t count)
{
    float *f = tu_malloc(count * sizeof(float));
    ck_assert_ok(sae_model_get_tensor(m, t, f));
    double *d = tu_malloc(count * sizeof(double));
    for (size_t i = 0; i < count; i++)
        d[i] = f[i];
    free(f);
    return d;
}

double tu_mmcs(const float *truth, size_t n_true, const float *Wd, size_t s, size_t d)
{
    double total = 0.0;
    for (size_t a = 0; a < n_true; a++) {
        double best = -1.0;
        for (size_t i = 0; i < s; i++) {
            double dot = 0.0, nn = 0.0;
            for (size_t j = 0; j < d; j++) {
                dot += (double)truth[a * d + j] * Wd[i * d + j];
                nn += (double)Wd[i * d + j] * Wd[i * d + j];
            }
            double c = nn > 0.0 ? dot / sqrt(nn) : 0.0;
            if (c > best)
                best = c;
        }
        total += best;
    }
    return total / (double)n_true;
}

double tu_auxk_sq(double *e, const double *pre, const bool *dead, size_t auxk, const double *Wd,
                  size_t s, size_t d)
{
    bool *taken = calloc(s, 1);
    ck_assert_ptr_nonnull(taken);
    size_t n_dead = 0;
    for (size_t i = 0; i < s; i++)
        n_dead += dead[i];
    size_t ka = auxk < n_dead ? auxk : n_dead;
    for (size_t q = 0; q < ka; q++) {
        size_t best = s;
        for (size_t i = 0; i < s; i++)
            if (dead[i] && !taken[i] && (best == s || pre[i] > pre[best]))
                best = i;
        taken[best] = true;
        double a = pre[best] > 0.0 ? pre[best] : 0.0;
        for (size_t j = 0; j < d; j++)
            e[j] += a * Wd[best * d + j];
    }
    double sq = 0.0;
    for (size_t j = 0; j < d; j++)
        sq += e[j] * e[j];
    free(taken);
    return sq;
}
