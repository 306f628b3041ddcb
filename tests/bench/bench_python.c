/* The C side of tests/bench/python_overhead.py: the time of one n = 1 sae_encode call, to set
 * beside the same call made through the Python bindings.
 *
 *   bench_python d_in d_sae [k]      (a TopK model with K = k, default 32)
 *
 * Prints "c_encode_n1 <best seconds per call> <median seconds per call>": the best and the median
 * of 21 runs, each repeating the call until 50 ms have passed. The weights are random (a fixed
 * seed) so that TopK's selection does the work it does on a real model. */
#define _POSIX_C_SOURCE 200809L
#include <sae.h>

#include "bench_common.h"

#include <stdio.h>
#include <stdlib.h>

#define RUNS 21

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float *random_floats(size_t count, unsigned *state, float scale)
{
    float *p = malloc(count * sizeof *p);
    if (p == NULL)
        return NULL;
    for (size_t i = 0; i < count; i++) {
        *state = *state * 1664525u + 1013904223u;
        p[i] = scale * ((float)(*state >> 8) / 16777216.0f - 0.5f);
    }
    return p;
}

static int fail(const char *what)
{
    fprintf(stderr, "bench_python: %s: %s\n", what, sae_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_python d_in d_sae [k]\n");
        return 2;
    }
    size_t d_in = strtoul(argv[1], NULL, 10), d_sae = strtoul(argv[2], NULL, 10);
    double k = argc > 3 ? strtod(argv[3], NULL) : 32.0;
    sae_model *m;
    if (sae_model_new(&m, SAE_ARCH_TOPK, d_in, d_sae) != SAE_OK)
        return fail("sae_model_new");
    if (sae_model_set_param(m, SAE_PARAM_K, k) != SAE_OK)
        return fail("K");
    unsigned state = 12345u;
    float *w_enc = random_floats(d_in * d_sae, &state, 0.05f);
    float *w_dec = random_floats(d_in * d_sae, &state, 0.05f);
    float *b_enc = random_floats(d_sae, &state, 0.1f);
    float *x = random_floats(d_in, &state, 2.0f);
    float *f = malloc(d_sae * sizeof *f);
    if (!w_enc || !w_dec || !b_enc || !x || !f) {
        fprintf(stderr, "bench_python: out of memory\n");
        return 1;
    }
    if (sae_model_set_tensor(m, SAE_W_ENC, w_enc) != SAE_OK ||
        sae_model_set_tensor(m, SAE_W_DEC, w_dec) != SAE_OK ||
        sae_model_set_tensor(m, SAE_B_ENC, b_enc) != SAE_OK)
        return fail("sae_model_set_tensor");
    free(w_enc);
    free(w_dec);
    free(b_enc);

    double per_call[RUNS];
    for (int warm = 0; warm < 3; warm++)
        if (sae_encode(m, x, 1, f) != SAE_OK)
            return fail("sae_encode");
    for (int run = 0; run < RUNS; run++) {
        long reps = 0;
        double start = bench_now(), elapsed;
        do {
            sae_encode(m, x, 1, f);
            reps++;
        } while ((elapsed = bench_now() - start) < 0.05);
        per_call[run] = elapsed / (double)reps;
    }
    qsort(per_call, RUNS, sizeof per_call[0], cmp_double);
    printf("c_encode_n1 %.9g %.9g\n", per_call[0], per_call[RUNS / 2]);
    free(x);
    free(f);
    sae_model_free(m);
    return 0;
}
