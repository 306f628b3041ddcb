/* train - train an SAE on a run folder's residual stream with libsae's trainer. The last tenth
 * of the stories is held out to measure the fraction of variance the SAE leaves unexplained. */
#include "sae_llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: sae-llama train RUN_DIR [options]\n"
    "  --arch A      topk, batchtopk or relu (default topk)\n"
    "  --width N     number of features (default 512)\n"
    "  --k K         features per token, TopK and BatchTopK (default 8)\n"
    "  --steps S     Adam steps (default 1500)\n"
    "  --batch B     tokens per step (default 1024)\n"
    "  --lr LR       learning rate (default: libsae's for the architecture and width)\n"
    "  --seed S      seeds the initial directions and the shuffling (default 0)\n";

/* Shuffles the rows of x [n][dim] in place (Fisher-Yates). */
static void shuffle_rows(float *x, size_t n, size_t dim, uint64_t *rng, float *tmp)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(rng_uniform(rng) * (double)i);
        memcpy(tmp, x + (i - 1) * dim, dim * sizeof *x);
        memcpy(x + (i - 1) * dim, x + j * dim, dim * sizeof *x);
        memcpy(x + j * dim, tmp, dim * sizeof *x);
    }
}

/* Fraction of variance unexplained on x [n][dim]: squared error over squared deviation from the
 * mean, the number the SAE papers report. */
static int held_out_fvu(const sae_model *m, const float *x, size_t n, size_t dim, double *fvu)
{
    float *x_hat = malloc(n * dim * sizeof *x_hat);
    double *mean = calloc(dim, sizeof *mean);
    int rc = x_hat && mean ? sae_reconstruct(m, x, n, x_hat) : SAE_ENOMEM;
    if (rc == SAE_OK) {
        for (size_t i = 0; i < n; i++)
            for (size_t d = 0; d < dim; d++)
                mean[d] += x[i * dim + d];
        for (size_t d = 0; d < dim; d++)
            mean[d] /= (double)n;
        double err = 0, var = 0;
        for (size_t i = 0; i < n * dim; i++) {
            double e = (double)x[i] - x_hat[i], v = (double)x[i] - mean[i % dim];
            err += e * e;
            var += v * v;
        }
        *fvu = err / var;
    }
    free(x_hat);
    free(mean);
    return rc;
}

int cmd_train(int argc, char **argv)
{
    double width = 512, k = 8, steps = 1500, batch = 1024, lr = 0, seed = 0;
    const char *arch_name = "topk", *pos[1];
    const option opts[] = {
        {"arch", NULL, &arch_name, 0, 0, 0},
        {"width", &width, NULL, 1, 1 << 24, 1},
        {"k", &k, NULL, 1, 1 << 16, 1},
        {"steps", &steps, NULL, 1, 1e9, 1},
        {"batch", &batch, NULL, 1, 1 << 20, 1},
        {"lr", &lr, NULL, 0, 1, 0},
        {"seed", &seed, NULL, 0, 1e15, 1},
        {NULL, NULL, NULL, 0, 0, 0},
    };
    if (parse_options(argc, argv, opts, pos, 1, 1) < 0) {
        fputs(usage, stderr);
        return 2;
    }
    const char *run = pos[0];
    sae_arch arch;
    if (sae_arch_from_name(arch_name, &arch) != SAE_OK || arch == SAE_ARCH_JUMPRELU) {
        fprintf(stderr, "sae-llama train: --arch must be topk, batchtopk or relu\n");
        return 2;
    }

    corpus c;
    if (corpus_load("train", run, 1, &c))
        return 1;
    size_t dim = c.dim;
    /* BOS rows are all the same outlier vector (position 0 sees only itself): leave them out,
     * and hold out the last tenth of the stories (whole stories, so no context leaks). */
    size_t n_stories = 0, n_rows = 0;
    for (size_t r = 0; r < c.n; r++)
        n_stories += c.tokens[r] == LLAMA_TOKEN_BOS;
    size_t first_val_story = n_stories - n_stories / 10, story = 0, n_train = 0;
    float *train = malloc(c.n * dim * sizeof *train);
    float *val = malloc(c.n * dim * sizeof *val);
    float *tmp = malloc(dim * sizeof *tmp);
    sae_model *m = NULL;
    sae_trainer *t = NULL;
    int rc = SAE_ENOMEM, status = 1;
    if (!train || !val || !tmp)
        goto fail;
    for (size_t r = 0; r < c.n; r++) {
        if (c.tokens[r] == LLAMA_TOKEN_BOS) {
            story++;
            continue;
        }
        float *dst = story > first_val_story ? val + (n_rows - n_train) * dim
                                             : train + n_train++ * dim;
        memcpy(dst, c.acts + r * dim, dim * sizeof *dst);
        n_rows++;
    }
    size_t n_val = n_rows - n_train;
    if (n_train < (size_t)batch || n_val == 0) {
        fail_msg("train", "%zu training tokens for batches of %zu (and %zu held out): collect "
                          "more stories or lower --batch",
                 n_train, (size_t)batch, n_val);
        goto done;
    }
    uint64_t rng = (uint64_t)seed + 1;
    shuffle_rows(train, n_train, dim, &rng, tmp);

    if ((rc = sae_model_new(&m, arch, dim, (size_t)width)) != SAE_OK ||
        (arch != SAE_ARCH_RELU && (rc = sae_model_set_param(m, SAE_PARAM_K, k)) != SAE_OK) ||
        (rc = sae_trainer_new(&t, m)) != SAE_OK ||
        (rc = sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, steps)) != SAE_OK ||
        (rc = sae_trainer_set_param(t, SAE_TRAIN_SEED, seed)) != SAE_OK ||
        (lr > 0 && (rc = sae_trainer_set_param(t, SAE_TRAIN_LR, lr)) != SAE_OK))
        goto fail;
    /* A latent is dead after a fifth of the run without firing (the default, 10 million
     * tokens, is longer than this whole run), so AuxK can bring it back in time. */
    double dead_tokens = steps * batch / 5 > 1 ? steps * batch / 5 : 1;
    if ((rc = sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, dead_tokens)) != SAE_OK ||
        (rc = sae_trainer_set_param(t, SAE_TRAIN_AUXK, width / 2 < 256 ? width / 2 : 256)) !=
            SAE_OK)
        goto fail;
    size_t n_init = n_train < 32768 ? n_train : 32768;
    if ((rc = sae_trainer_init(t, train, n_init)) != SAE_OK)
        goto fail;

    double used_lr = 0;
    sae_trainer_get_param(t, SAE_TRAIN_LR, &used_lr);
    char k_text[32] = "";
    if (arch != SAE_ARCH_RELU)
        snprintf(k_text, sizeof k_text, ", k = %.0f", k);
    printf("train: %s SAE, %zu -> %zu features%s; %zu training tokens from %zu stories, %zu "
           "held out; %.0f steps of %.0f tokens, lr %.3g\n",
           sae_arch_name(arch), dim, (size_t)width, k_text, n_train, first_val_story, n_val,
           steps, batch, used_lr);

    size_t per_epoch = n_train / (size_t)batch, report = (size_t)steps / 15;
    if (report == 0)
        report = 1;
    double t0 = seconds_now();
    for (size_t s = 0; s < (size_t)steps; s++) {
        size_t b = s % per_epoch;
        if (b == 0 && s > 0)
            shuffle_rows(train, n_train, dim, &rng, tmp);
        if ((rc = sae_trainer_step(t, train + b * (size_t)batch * dim, (size_t)batch)) !=
            SAE_OK)
            goto fail;
        if ((s + 1) % report == 0 || s + 1 == (size_t)steps) {
            double loss, fvu, l0, dead;
            sae_trainer_get_metric(t, SAE_METRIC_LOSS, &loss);
            sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu);
            sae_trainer_get_metric(t, SAE_METRIC_L0, &l0);
            sae_trainer_get_metric(t, SAE_METRIC_DEAD_FRACTION, &dead);
            double secs = seconds_now() - t0;
            printf("train: step %6zu/%.0f  loss %.4f  FVU %.4f  L0 %5.1f  dead %5.1f%%  "
                   "%6.0f tokens/s\n",
                   s + 1, steps, loss, fvu, l0, 100 * dead, (double)(s + 1) * batch / secs);
            fflush(stdout);
        }
    }

    double fvu;
    if ((rc = held_out_fvu(m, val, n_val, dim, &fvu)) != SAE_OK)
        goto fail;
    const char *out = path_in(run, "sae.safetensors");
    if ((rc = sae_model_save(m, out)) != SAE_OK)
        goto fail;
    printf("train: FVU on %zu held-out tokens: %.4f (%.1f%% of the variance explained)\n", n_val,
           fvu, 100 * (1 - fvu));
    printf("train: wrote %s (%.1f s)\n", out, seconds_now() - t0);
    status = 0;
    goto done;
fail:
    fail_sae("train", "training", rc);
done:
    sae_trainer_free(t);
    sae_model_free(m);
    free(train);
    free(val);
    free(tmp);
    corpus_free(&c);
    return status;
}
