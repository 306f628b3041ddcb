/* Steering cost: a one-feature clamp applied with libsae to n = 1 and n = 64 tokens, next to what
 * any approach that runs the whole SAE costs in libsae itself (sae_reconstruct, one full encode and
 * decode). tests/bench/steer runs this and numpy's SAELens-style clamp side by side.
 *
 *   bench_steer MODEL X.npy FEATURE VALUE OUT.npy
 *
 * X.npy holds at least 64 tokens; OUT.npy receives those 64 tokens after one clamp, for the
 * script to compare with numpy. Prints "name n seconds" lines (best of 5 timed loops). */
#define _POSIX_C_SOURCE 200809L
#include <sae.h>

#include "bench_common.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int fail(const char *what)
{
    fprintf(stderr, "bench_steer: %s: %s\n", what, sae_last_error());
    return 1;
}

typedef int (*step_fn)(void *ctx);

/* Best seconds per call over 5 loops of at least 0.2 s each. */
static double best_time(step_fn fn, void *ctx)
{
    double best = 1e300;
    for (int round = 0; round < 5; round++) {
        long reps = 0;
        double start = bench_now(), elapsed;
        do {
            if (fn(ctx) != SAE_OK) {
                fail("timed call");
                exit(1);
            }
            reps++;
            elapsed = bench_now() - start;
        } while (elapsed < 0.2);
        if (elapsed / (double)reps < best)
            best = elapsed / (double)reps;
    }
    return best;
}

typedef struct {
    const sae_steer *s;
    const sae_model *m;
    float *x, *out;
    size_t n;
} ctx_t;

static int run_steer(void *p)
{
    ctx_t *c = p;
    return sae_steer_apply(c->s, c->x, c->n);
}

static int run_reconstruct(void *p)
{
    ctx_t *c = p;
    return sae_reconstruct(c->m, c->x, c->n, c->out);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: bench_steer MODEL X.npy FEATURE VALUE OUT.npy\n");
        return 2;
    }
    sae_model *m;
    if (sae_model_load(&m, argv[1]) != SAE_OK)
        return fail(argv[1]);
    const size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m), n_max = 64;
    sae_npy *npy;
    if (sae_npy_open(&npy, argv[2]) != SAE_OK)
        return fail(argv[2]);
    if (sae_npy_cols(npy) != d_in || sae_npy_rows(npy) < n_max) {
        fprintf(stderr, "bench_steer: %s must be [>= %zu][%zu]\n", argv[2], n_max, d_in);
        return 1;
    }
    float *x0 = malloc(n_max * d_in * sizeof *x0), *x = malloc(n_max * d_in * sizeof *x);
    float *out = malloc(n_max * d_in * sizeof *out);
    if (x0 == NULL || x == NULL || out == NULL)
        return 1;
    if (sae_npy_read(npy, 0, n_max, x0) != SAE_OK)
        return fail("reading activations");
    sae_npy_close(npy);
    const uint32_t feature = (uint32_t)strtoul(argv[3], NULL, 10);
    const float value = strtof(argv[4], NULL);
    sae_steer *s;
    if (sae_steer_new(&s, m) != SAE_OK || sae_steer_clamp(s, feature, value) != SAE_OK)
        return fail("steering plan");

    /* One application, for the script to check against numpy. */
    memcpy(x, x0, n_max * d_in * sizeof *x);
    if (sae_steer_apply(s, x, n_max) != SAE_OK)
        return fail("steer");
    if (sae_npy_write(argv[5], x, n_max, d_in) != SAE_OK)
        return fail(argv[5]);

    printf("model %s %zu %zu\n", sae_arch_name(sae_model_arch(m)), d_in, d_sae);
    const size_t ns[2] = {1, n_max};
    for (size_t k = 0; k < 2; k++) {
        /* Repeated clamps of the same tokens stay bounded: each sets the feature again. */
        memcpy(x, x0, n_max * d_in * sizeof *x);
        ctx_t c = {s, m, x, out, ns[k]};
        printf("steer_clamp %zu %.9g\n", ns[k], best_time(run_steer, &c));
        printf("reconstruct %zu %.9g\n", ns[k], best_time(run_reconstruct, &c));
        fflush(stdout);
    }
    sae_steer_free(s);
    sae_model_free(m);
    free(x0);
    free(x);
    free(out);
    return 0;
}
