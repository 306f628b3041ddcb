/* The toy model of superposition as a benchmark: activations are sparse combinations of known
 * random unit directions (more directions than dimensions), and a trained SAE should find them.
 * Prints, for each architecture, the mean max cosine similarity (MMCS) between the true
 * directions and the learned decoder rows, FVU and L0, and exits nonzero if TopK or ReLU stays
 * below MMCS 0.99.
 *
 *   recovery [steps]        default 3000 steps of 256 samples
 *
 * Data (fixed seed): 48 dimensions, 192 true directions; each sample activates each direction
 * with probability 4/192 (about 4 active, at least one), magnitudes uniform in [0.5, 1.5).
 * SAEs of 384 latents; TopK and BatchTopK with K = 4. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sae.h"

enum { D = 48, N_TRUE = 192, D_SAE = 384, BATCH = 256 };

static uint64_t rng_state = 12345;

static uint64_t next(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform(void) { return (double)(next() >> 11) * 0x1.0p-53; }

static double normal(void)
{
    double u1 = uniform() + 0x1.0p-54, u2 = uniform();
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static void sample(float *x, size_t n, const float *truth)
{
    for (size_t t = 0; t < n; t++) {
        float *row = x + t * D;
        memset(row, 0, D * sizeof(float));
        int active = 0;
        while (active == 0) {
            for (int a = 0; a < N_TRUE; a++) {
                if (uniform() >= 4.0 / N_TRUE)
                    continue;
                float mag = (float)(0.5 + uniform());
                for (int j = 0; j < D; j++)
                    row[j] += mag * truth[a * D + j];
                active++;
            }
        }
    }
}

static double mmcs(const float *truth, const float *Wd)
{
    double total = 0.0;
    for (int a = 0; a < N_TRUE; a++) {
        double best = -1.0;
        for (int i = 0; i < D_SAE; i++) {
            double dot = 0.0, nn = 0.0;
            for (int j = 0; j < D; j++) {
                dot += (double)truth[a * D + j] * Wd[i * D + j];
                nn += (double)Wd[i * D + j] * Wd[i * D + j];
            }
            if (nn > 0.0 && dot / sqrt(nn) > best)
                best = dot / sqrt(nn);
        }
        total += best;
    }
    return total / N_TRUE;
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        if ((call) != SAE_OK) {                                                                    \
            fprintf(stderr, "%s: %s\n", #call, sae_last_error());                                  \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv)
{
    int steps = argc > 1 ? atoi(argv[1]) : 3000;
    if (steps <= 0) {
        fprintf(stderr, "usage: recovery [steps]\n");
        return 2;
    }
    float *truth = malloc(N_TRUE * D * sizeof(float));
    float *x = malloc((size_t)4096 * D * sizeof(float));
    float *Wd = malloc((size_t)D_SAE * D * sizeof(float));
    if (truth == NULL || x == NULL || Wd == NULL)
        return 1;
    for (int a = 0; a < N_TRUE; a++) {
        double nn = 0.0;
        for (int j = 0; j < D; j++) {
            truth[a * D + j] = (float)normal();
            nn += (double)truth[a * D + j] * truth[a * D + j];
        }
        for (int j = 0; j < D; j++)
            truth[a * D + j] = (float)(truth[a * D + j] / sqrt(nn));
    }
    const uint64_t data_seed = rng_state;
    const struct {
        sae_arch arch;
        double lr, l1;
    } runs[] = {{SAE_ARCH_TOPK, 4e-3, 0}, {SAE_ARCH_BATCHTOPK, 4e-3, 0}, {SAE_ARCH_RELU, 4e-3, 2}};
    int failed = 0;
    printf("%d dims, %d true directions, ~4 active, d_sae %d, %d steps of %d samples\n", D,
           N_TRUE, D_SAE, steps, BATCH);
    printf("%-10s %8s %8s %8s %8s %10s\n", "arch", "MMCS", "FVU", "L0", "dead", "seconds");
    for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
        rng_state = data_seed; /* every architecture sees the same samples */
        sae_model *m;
        sae_trainer *t;
        CHECK(sae_model_new(&m, runs[r].arch, D, D_SAE));
        if (runs[r].arch != SAE_ARCH_RELU)
            CHECK(sae_model_set_param(m, SAE_PARAM_K, 4));
        CHECK(sae_trainer_new(&t, m));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_LR, runs[r].lr));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, steps));
        if (runs[r].arch == SAE_ARCH_RELU)
            CHECK(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, runs[r].l1));
        /* 10M tokens would never be reached in 768k; a latent silent for 40 batches is dead. */
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 40 * BATCH));
        sample(x, 4096, truth);
        CHECK(sae_trainer_init(t, x, 4096));
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int s = 0; s < steps; s++) {
            sample(x, BATCH, truth);
            CHECK(sae_trainer_step(t, x, BATCH));
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double fvu, l0, dead;
        CHECK(sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu));
        CHECK(sae_trainer_get_metric(t, SAE_METRIC_L0, &l0));
        CHECK(sae_trainer_get_metric(t, SAE_METRIC_DEAD_FRACTION, &dead));
        CHECK(sae_model_get_tensor(m, SAE_W_DEC, Wd));
        double score = mmcs(truth, Wd);
        double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        printf("%-10s %8.4f %8.4f %8.2f %8.3f %10.2f\n", sae_arch_name(runs[r].arch), score, fvu,
               l0, dead, secs);
        if (runs[r].arch != SAE_ARCH_BATCHTOPK && score < 0.99) {
            printf("FAILED: %s MMCS %.4f < 0.99\n", sae_arch_name(runs[r].arch), score);
            failed = 1;
        }
        sae_trainer_free(t);
        sae_model_free(m);
    }
    free(truth);
    free(x);
    free(Wd);
    return failed;
}
