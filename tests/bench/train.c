/* Training speed and quality against numpy: SAEs on the real residual-stream activations of
 * aidreams260K (layer 2, 64 dims), trained by libsae and by the same recipe written in numpy
 * (train_numpy.py beside this file), from the same initial weights, on the same batches, for the
 * same steps. Prints FVU and L0 on the whole file, and training tokens per second of wall time
 * and of CPU time (all the process's threads), side by side, for each recipe.
 *
 *   bench_train [steps [batch [topk|jumprelu|matryoshka ...]]]   600 steps of 1024, all three
 *
 * $SAE_BENCH_THREADS sets libsae's SAE_PARAM_THREADS (default 0: every core); $SAE_PYTHON the
 * interpreter that runs the numpy side.
 *
 * Recipes (both sides): d_sae 512, unit-norm decoder rows (parallel gradient removed, rows
 * renormalized). Batch s is rows (s * batch + j) * 7919 mod N of the file: a fixed permutation
 * both sides compute.
 * - topk: K 16, Adam lr 2e-3 (0.9, 0.999, eps 6.25e-10), loss ||x_hat - x||^2 / v (v: variance
 *   of the init sample), AuxK (256 latents, 1/32) on latents silent for 100k tokens.
 * - jumprelu: loss ||x_hat - x||^2 + 0.2 * L0, thresholds from 0.5, bandwidth 0.1, Adam lr 4e-3
 *   (beta1 0, eps 1e-8), no warm-up.
 * - matryoshka: topk's settings on BatchTopK codes, groups 16, 32, 64, 128, 272; evaluated in the
 *   threshold form. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, mkdtemp, popen */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sae.h"

#ifndef SAE_BENCH_DIR
#define SAE_BENCH_DIR "tests/bench"
#endif
#ifndef SAE_DATA_DIR
#define SAE_DATA_DIR "../shared/data"
#endif

enum { D_SAE = 512, K = 16, STRIDE = 7919 };

#define CHECK(call)                                                                                \
    do {                                                                                           \
        if ((call) != SAE_OK) {                                                                    \
            fprintf(stderr, "%s: %s\n", #call, sae_last_error());                                  \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

static double clock_s(clockid_t which)
{
    struct timespec ts;
    clock_gettime(which, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double now(void) { return clock_s(CLOCK_MONOTONIC); }

/* The process's CPU time, every thread's (BLAS's included): on a loaded machine wall time
 * measures the other jobs too, CPU time only this one's work (spinning threads count). */
static double cpu_now(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

static void gather(const float *all, size_t n_rows, size_t d, size_t first, size_t n, float *dst)
{
    for (size_t j = 0; j < n; j++)
        memcpy(dst + j * d, all + ((first + j) * STRIDE % n_rows) * d, d * sizeof(float));
}

/* FVU and L0 of the model over the whole file, as train_numpy.py computes them. */
static int evaluate(const sae_model *m, const float *x, size_t n, double *fvu, double *l0)
{
    const sae_eval_metric which[2] = {SAE_EVAL_FVU, SAE_EVAL_L0};
    double values[2];
    CHECK(sae_evaluate(m, x, n, which, 2, values));
    *fvu = values[0];
    *l0 = values[1];
    return 0;
}

static int run(const char *recipe, const char *data, const float *all, size_t n, size_t d,
               size_t steps, size_t batch)
{
    const bool jump = strcmp(recipe, "jumprelu") == 0, mat = strcmp(recipe, "matryoshka") == 0;
    if (!jump && !mat && strcmp(recipe, "topk") != 0) {
        fprintf(stderr, "unknown recipe %s (topk, jumprelu, matryoshka)\n", recipe);
        return 2;
    }
    float *x = malloc(8192 * d * sizeof(float));
    if (x == NULL)
        return 1;
    sae_model *m;
    sae_trainer *t;
    CHECK(sae_model_new(&m, jump ? SAE_ARCH_JUMPRELU : mat ? SAE_ARCH_BATCHTOPK : SAE_ARCH_TOPK,
                        d, D_SAE));
    if (!jump)
        CHECK(sae_model_set_param(m, SAE_PARAM_K, K));
    if (getenv("SAE_BENCH_THREADS") != NULL)
        CHECK(sae_model_set_param(m, SAE_PARAM_THREADS, atof(getenv("SAE_BENCH_THREADS"))));
    CHECK(sae_trainer_new(&t, m));
    if (jump) {
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_LR, 4e-3));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_L0_COEFF, 0.2));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_BANDWIDTH, 0.1));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 0.5));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_L1_WARMUP_STEPS, 0));
    } else {
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_LR, 2e-3));
    }
    if (mat) {
        const size_t groups[5] = {16, 32, 64, 128, 272};
        CHECK(sae_trainer_set_groups(t, groups, 5));
        /* TopK's Adam, as train_numpy.py's (BatchTopK's default beta2 is 0.99). */
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_BETA2, 0.999));
    }
    CHECK(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 100000));
    /* init sample: the first 8192 rows of the permuted order */
    gather(all, n, d, 0, 8192, x);
    CHECK(sae_trainer_init(t, x, 8192));

    /* Hand numpy the same starting point. */
    char dir[] = "/tmp/libsae-bench-train-XXXXXX", path[256];
    if (mkdtemp(dir) == NULL)
        return 1;
    float *w = malloc((size_t)D_SAE * d * sizeof(float));
    const struct {
        sae_tensor t;
        const char *name;
        size_t rows, cols;
    } ts[] = {{SAE_W_ENC, "W_enc", 0, 0}, {SAE_W_DEC, "W_dec", 0, 0}, {SAE_B_ENC, "b_enc", 1, D_SAE},
              {SAE_B_DEC, "b_dec", 1, 0}};
    for (size_t i = 0; i < 4; i++) {
        size_t rows = ts[i].t == SAE_W_ENC ? d : ts[i].t == SAE_W_DEC ? D_SAE : 1;
        size_t cols = ts[i].t == SAE_W_ENC ? D_SAE : ts[i].t == SAE_B_ENC ? D_SAE : d;
        CHECK(sae_model_get_tensor(m, ts[i].t, w));
        snprintf(path, sizeof path, "%s/%s.npy", dir, ts[i].name);
        CHECK(sae_npy_write(path, w, rows, cols));
    }
    double scale;
    CHECK(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &scale));

    double start = now(), cpu_start = cpu_now();
    for (size_t s = 0; s < steps; s++) {
        gather(all, n, d, s * batch, batch, x);
        CHECK(sae_trainer_step(t, x, batch));
    }
    double secs = now() - start, cpu = cpu_now() - cpu_start;
    double fvu, l0;
    if (evaluate(m, all, n, &fvu, &l0) != 0)
        return 1;

    char cmd[1024];
    /* Debian's interpreter, which python3-numpy installs into (a pyenv python3 may lack it);
     * $SAE_PYTHON overrides. */
    const char *python = getenv("SAE_PYTHON") ? getenv("SAE_PYTHON") : "/usr/bin/python3";
    snprintf(cmd, sizeof cmd, "%s %s/train_numpy.py %s %s %zu %zu %.9g %s", python,
             SAE_BENCH_DIR, data, dir, steps, batch, scale, recipe);
    FILE *p = popen(cmd, "r");
    double np_fvu = NAN, np_l0 = NAN, np_tps = NAN, np_cps = NAN;
    char line[512];
    while (p != NULL && fgets(line, sizeof line, p) != NULL)
        if (sscanf(line, "numpy fvu %lf l0 %lf tok/s %lf tok/cpu-s %lf", &np_fvu, &np_l0, &np_tps,
                   &np_cps) == 4)
            break;
    int prc = p ? pclose(p) : -1;
    for (size_t i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s.npy", dir, ts[i].name);
        remove(path);
    }
    remove(dir);

    double tps = (double)(steps * batch) / secs, cps = (double)(steps * batch) / cpu;
    if (jump)
        printf("JumpReLU SAE %zu -> %d, L0 coefficient 0.2, %zu steps of %zu tokens on %s (%zu "
               "rows)\n", d, D_SAE, steps, batch, data, n);
    else
        printf("%s SAE %zu -> %d, K %d, %zu steps of %zu tokens on %s (%zu rows)\n",
               mat ? "Matryoshka BatchTopK" : "TopK", d, D_SAE, K, steps, batch, data, n);
    printf("%-8s %10s %8s %12s %14s\n", "", "FVU", "L0", "tokens/s", "tokens/CPU-s");
    printf("%-8s %10.4f %8.2f %12.0f %14.0f\n", "libsae", fvu, l0, tps, cps);
    printf("%-8s %10.4f %8.2f %12.0f %14.0f\n", "numpy", np_fvu, np_l0, np_tps, np_cps);
    if (prc != 0 || isnan(np_tps)) {
        printf("numpy run failed (is python3-numpy installed?)\n");
        return 1;
    }
    printf("libsae / numpy: %.2fx tokens/s, %.2fx tokens per CPU second, FVU %+.4f (%+.1f%%)\n\n",
           tps / np_tps, cps / np_cps, fvu - np_fvu, 100.0 * (fvu - np_fvu) / np_fvu);
    free(x);
    free(w);
    sae_trainer_free(t);
    sae_model_free(m);
    return 0;
}

int main(int argc, char **argv)
{
    size_t steps = argc > 1 ? (size_t)atol(argv[1]) : 600, batch = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    if (steps == 0 || batch == 0) {
        fprintf(stderr, "usage: bench_train [steps [batch [topk|jumprelu|matryoshka ...]]]\n");
        return 2;
    }
    const char *data = SAE_DATA_DIR "/aidreams260K/resid_layer2.npy";
    sae_npy *a;
    CHECK(sae_npy_open(&a, data));
    const size_t n = sae_npy_rows(a), d = sae_npy_cols(a);
    float *all = malloc(n * d * sizeof(float));
    if (all == NULL)
        return 1;
    CHECK(sae_npy_read(a, 0, n, all));
    sae_npy_close(a);
    static const char *const every[] = {"topk", "jumprelu", "matryoshka"};
    const char *const *recipes = argc > 3 ? (const char *const *)argv + 3 : every;
    const int count = argc > 3 ? argc - 3 : 3;
    int rc = 0;
    for (int r = 0; r < count && rc == 0; r++)
        rc = run(recipes[r], data, all, n, d, steps, batch);
    free(all);
    return rc;
}
