/* planted - the demo without a language model: activations built as sparse non-negative
 * combinations of known random directions ("planted features"), an SAE trained on them with
 * libsae, and a count of how many planted directions the SAE's decoder found again. */
#include "sae_llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: sae-llama planted [options]\n"
    "  --dim D        width of the activations (default 64)\n"
    "  --features F   planted directions (default 256)\n"
    "  --active A     planted features per sample on average (default 3)\n"
    "  --width N      SAE features (default 512)\n"
    "  --k K          TopK's k (default 4)\n"
    "  --steps S      Adam steps of 1024 samples (default 1000)\n"
    "  --seed S       seeds the data and the SAE (default 0)\n";

enum { BATCH = 1024 };

/* Fills x [n][dim] with sparse combinations of the rows of dirs [n_dirs][dim]: each direction
 * is on with probability p, with a magnitude uniform in [0.5, 1.5], plus a little noise. */
static void make_samples(float *x, size_t n, const float *dirs, size_t n_dirs, size_t dim,
                         double p, uint64_t *rng)
{
    memset(x, 0, n * dim * sizeof *x);
    for (size_t i = 0; i < n; i++) {
        float *row = x + i * dim;
        for (size_t j = 0; j < n_dirs; j++) {
            if (rng_uniform(rng) >= p)
                continue;
            float a = (float)(0.5 + rng_uniform(rng));
            for (size_t d = 0; d < dim; d++)
                row[d] += a * dirs[j * dim + d];
        }
        for (size_t d = 0; d < dim; d++)
            row[d] += (float)(0.01 * rng_normal(rng));
    }
}

int cmd_planted(int argc, char **argv)
{
    double dim = 64, n_dirs = 256, active = 3, width = 512, k = 4, steps = 1000, seed = 0;
    const option opts[] = {
        {"dim", &dim, NULL, 1, 1 << 16, 1},
        {"features", &n_dirs, NULL, 1, 1 << 20, 1},
        {"active", &active, NULL, 0.01, 1 << 20, 0},
        {"width", &width, NULL, 1, 1 << 24, 1},
        {"k", &k, NULL, 1, 1 << 16, 1},
        {"steps", &steps, NULL, 1, 1e9, 1},
        {"seed", &seed, NULL, 0, 1e15, 1},
        {NULL, NULL, NULL, 0, 0, 0},
    };
    if (parse_options(argc, argv, opts, NULL, 0, 0) < 0) {
        fputs(usage, stderr);
        return 2;
    }
    size_t D = (size_t)dim, F = (size_t)n_dirs, W = (size_t)width;
    double p = active / n_dirs > 1 ? 1 : active / n_dirs;
    uint64_t rng = (uint64_t)seed * 2 + 1;
    float *dirs = malloc(F * D * sizeof *dirs);
    float *x = malloc(BATCH * D * sizeof *x);
    float *w_dec = malloc(W * D * sizeof *w_dec);
    sae_model *m = NULL;
    sae_trainer *t = NULL;
    int rc = SAE_ENOMEM, status = 1;
    if (!dirs || !x || !w_dec)
        goto fail;
    for (size_t j = 0; j < F; j++) { /* random unit directions */
        double norm = 0;
        for (size_t d = 0; d < D; d++) {
            dirs[j * D + d] = (float)rng_normal(&rng);
            norm += (double)dirs[j * D + d] * dirs[j * D + d];
        }
        for (size_t d = 0; d < D; d++)
            dirs[j * D + d] /= (float)sqrt(norm);
    }
    printf("planted: %zu random directions in %zu dimensions; each sample is about %g of them "
           "with magnitudes in [0.5, 1.5], plus noise\n",
           F, D, active);

    if ((rc = sae_model_new(&m, SAE_ARCH_TOPK, D, W)) != SAE_OK ||
        (rc = sae_model_set_param(m, SAE_PARAM_K, k)) != SAE_OK ||
        (rc = sae_trainer_new(&t, m)) != SAE_OK ||
        (rc = sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, steps)) != SAE_OK ||
        (rc = sae_trainer_set_param(t, SAE_TRAIN_SEED, seed)) != SAE_OK ||
        (rc = sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, steps * BATCH / 5)) != SAE_OK)
        goto fail;
    make_samples(x, BATCH, dirs, F, D, p, &rng);
    if ((rc = sae_trainer_init(t, x, BATCH)) != SAE_OK)
        goto fail;
    printf("planted: training a TopK SAE, %zu -> %zu features, k = %.0f, %.0f steps of %d fresh "
           "samples\n",
           D, W, k, steps, BATCH);
    size_t report = (size_t)steps / 10 ? (size_t)steps / 10 : 1;
    double t0 = seconds_now();
    for (size_t s = 0; s < (size_t)steps; s++) {
        make_samples(x, BATCH, dirs, F, D, p, &rng);
        if ((rc = sae_trainer_step(t, x, BATCH)) != SAE_OK)
            goto fail;
        if ((s + 1) % report == 0) {
            double fvu, l0, dead;
            sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu);
            sae_trainer_get_metric(t, SAE_METRIC_L0, &l0);
            sae_trainer_get_metric(t, SAE_METRIC_DEAD_FRACTION, &dead);
            printf("planted: step %6zu  FVU %.4f  L0 %4.1f  dead %5.1f%%  (%.1f s)\n", s + 1, fvu,
                   l0, 100 * dead, seconds_now() - t0);
            fflush(stdout);
        }
    }

    /* Recovery: each planted direction's best cosine with a decoder row. */
    if ((rc = sae_model_get_tensor(m, SAE_W_DEC, w_dec)) != SAE_OK)
        goto fail;
    size_t found = 0;
    double mean_best = 0;
    for (size_t j = 0; j < F; j++) {
        double best = -1;
        for (size_t i = 0; i < W; i++) {
            double dot = 0, norm = 0;
            for (size_t d = 0; d < D; d++) {
                dot += (double)dirs[j * D + d] * w_dec[i * D + d];
                norm += (double)w_dec[i * D + d] * w_dec[i * D + d];
            }
            if (norm > 0 && dot / sqrt(norm) > best)
                best = dot / sqrt(norm);
        }
        found += best > 0.9;
        mean_best += best / (double)F;
    }
    printf("planted: the SAE found %zu of the %zu planted directions (a decoder row within "
           "cosine 0.9); mean best cosine %.3f\n",
           found, F, mean_best);
    status = 0;
    goto done;
fail:
    fail_sae("planted", "training", rc);
done:
    sae_trainer_free(t);
    sae_model_free(m);
    free(dirs);
    free(x);
    free(w_dec);
    return status;
}
