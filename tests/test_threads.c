/* Thread safety: one model and one steering plan used from several threads at once give, bit for
 * bit, what one thread gets. tests/run also runs this suite under ThreadSanitizer, which reports
 * any data race between the threads (shared scratch, lazily filled caches, the error message). */
#include "testutil.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

enum { THREADS = 4, ROUNDS = 6, D_IN = 48, D_SAE = 160, N = 9 };

typedef struct {
    const sae_model *m;
    const sae_steer *s;
    const float *x;      /* [N][D_IN] input */
    const float *want_n; /* [N][D_IN]: one thread's result for the batch */
    const float *want_1; /* [D_IN]: one thread's result for the first token alone */
    const uint32_t *want_idx; /* neighbours of feature 7 */
    int ok;
} job;

static void *work(void *arg)
{
    job *j = arg;
    float x[N * D_IN];
    uint32_t idx[8];
    float f[N * D_SAE];
    j->ok = 1;
    for (int round = 0; round < ROUNDS; round++) {
        /* Alternate one token and a batch: the GEMV and GEMM paths. */
        size_t n = round % 2 ? 1 : N;
        memcpy(x, j->x, sizeof x);
        const float *want = n == 1 ? j->want_1 : j->want_n;
        if (sae_steer_apply(j->s, x, n) != SAE_OK || memcmp(x, want, n * D_IN * sizeof *x) != 0)
            j->ok = 0;
        if (sae_feature_neighbors(j->m, 7, 8, idx, NULL) != SAE_OK ||
            memcmp(idx, j->want_idx, sizeof idx) != 0)
            j->ok = 0;
        if (sae_encode(j->m, x, n, f) != SAE_OK)
            j->ok = 0;
        /* Failures on this thread write only this thread's message. */
        if (sae_steer_apply(j->s, NULL, 1) != SAE_EINVAL)
            j->ok = 0;
    }
    return NULL;
}

START_TEST(one_plan_many_threads)
{
    const sae_arch arch = (sae_arch)(SAE_ARCH_RELU + _i);
    sae_model *m = tu_random_model(arch, D_IN, D_SAE, 40 + (uint64_t)_i);
    if (arch == SAE_ARCH_TOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 12));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 1.5));
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    for (uint32_t i = 0; i < D_SAE; i += 5) {
        if (i % 3 == 0)
            ck_assert_ok(sae_steer_clamp(s, i, 2.0f + (float)i / 10));
        else if (i % 3 == 1)
            ck_assert_ok(sae_steer_scale(s, i, -1.5f));
        else
            ck_assert_ok(sae_steer_add(s, i, 0.25f));
    }
    float x[N * D_IN], want_n[N * D_IN], want_1[N * D_IN];
    tu_rng r = {3};
    tu_fill(&r, x, N * D_IN, -1, 1);
    memcpy(want_n, x, sizeof x);
    memcpy(want_1, x, sizeof x);
    ck_assert_ok(sae_steer_apply(s, want_n, N));
    ck_assert_ok(sae_steer_apply(s, want_1, 1));
    ck_assert_msg(memcmp(want_n, x, sizeof x) != 0, "the plan changed nothing");
    uint32_t want_idx[8];
    ck_assert_ok(sae_feature_neighbors(m, 7, 8, want_idx, NULL));

    job jobs[THREADS];
    pthread_t th[THREADS];
    for (int t = 0; t < THREADS; t++) {
        jobs[t] = (job){m, s, x, want_n, want_1, want_idx, 0};
        ck_assert_int_eq(pthread_create(&th[t], NULL, work, &jobs[t]), 0);
    }
    for (int t = 0; t < THREADS; t++) {
        ck_assert_int_eq(pthread_join(th[t], NULL), 0);
        ck_assert_msg(jobs[t].ok, "thread %d got a different result than one thread", t);
    }
    sae_steer_free(s);
    sae_model_free(m);
}
END_TEST

/* Saves, loads (mapped and copied) and encodes racing on one model and one path: every load
 * sees a whole file (the rename is atomic), every encode of every copy agrees bit for bit, and
 * ThreadSanitizer sees no race in the library (the umask once was one: process-wide state). */
typedef struct {
    const sae_model *m;
    const char *path;
    const float *x, *want; /* [N][D_IN] input, [N][D_SAE] codes */
    int role, ok;
} racer;

static void *race(void *arg)
{
    racer *r = arg;
    float f[N * D_SAE];
    r->ok = 1;
    for (int round = 0; round < 12; round++) {
        if (r->role == 0) {
            if (sae_model_save(r->m, r->path) != SAE_OK)
                r->ok = 0;
        } else if (r->role == 1 || r->role == 2) {
            sae_model *copy = NULL;
            if (sae_model_load_with(&copy, r->path, r->role == 2 ? SAE_LOAD_COPY : 0) != SAE_OK ||
                sae_encode(copy, r->x, N, f) != SAE_OK || memcmp(f, r->want, sizeof f) != 0)
                r->ok = 0;
            sae_model_free(copy);
        } else if (sae_encode(r->m, r->x, N, f) != SAE_OK || memcmp(f, r->want, sizeof f) != 0) {
            r->ok = 0;
        }
    }
    return NULL;
}

START_TEST(saves_loads_and_encodes_race)
{
    sae_model *m = tu_random_model(SAE_ARCH_JUMPRELU, D_IN, D_SAE, 77);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1));
    char *path = tu_tmp_path("race.safetensors");
    ck_assert_ok(sae_model_save(m, path));
    float x[N * D_IN], want[N * D_SAE];
    tu_rng r = {5};
    tu_fill(&r, x, N * D_IN, -1, 1);
    ck_assert_ok(sae_encode(m, x, N, want));
    enum { RACERS = 8 };
    racer jobs[RACERS];
    pthread_t th[RACERS];
    for (int t = 0; t < RACERS; t++) {
        jobs[t] = (racer){m, path, x, want, t % 4, 0};
        ck_assert_int_eq(pthread_create(&th[t], NULL, race, &jobs[t]), 0);
    }
    for (int t = 0; t < RACERS; t++) {
        ck_assert_int_eq(pthread_join(th[t], NULL), 0);
        ck_assert_msg(jobs[t].ok, "racer %d (role %d) failed: %s", t, jobs[t].role,
                      sae_last_error());
    }
    free(path);
    sae_model_free(m);
}
END_TEST

static Suite *threads_suite(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("threads");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, one_plan_many_threads, 0, 4);
    tcase_add_test(tc, saves_loads_and_encodes_race);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(threads_suite)
