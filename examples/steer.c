/* Clamp one SAE feature in a batch of activations and show what changed.
 *
 *   steer MODEL ACTS.npy FEATURE VALUE [TOKENS]
 *
 * MODEL is anything sae_model_load reads (a libsae file, a SAELens or sparsify folder, a Gemma
 * Scope params.npz); ACTS.npy holds activations [tokens][d_in] from the layer the SAE was trained
 * on. For each of the first TOKENS tokens (default 8) it prints the feature's value before and
 * after the clamp and how far the activation vector moved. */
#include <sae.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what)
{
    fprintf(stderr, "steer: %s: %s\n", what, sae_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 5 || argc > 6) {
        fprintf(stderr, "usage: steer MODEL ACTS.npy FEATURE VALUE [TOKENS]\n");
        return 2;
    }
    char *end;
    unsigned long feature = strtoul(argv[3], &end, 10);
    if (*end != '\0' || feature > UINT32_MAX) {
        fprintf(stderr, "steer: FEATURE must be a feature index, not '%s'\n", argv[3]);
        return 2;
    }
    float value = strtof(argv[4], &end);
    if (*end != '\0') {
        fprintf(stderr, "steer: VALUE must be a number, not '%s'\n", argv[4]);
        return 2;
    }
    size_t want = argc == 6 ? strtoul(argv[5], NULL, 10) : 8;

    sae_model *m = NULL;
    sae_npy *acts = NULL;
    sae_steer *s = NULL;
    float *x = NULL, *before = NULL, *f = NULL;
    int rc = 1;
    if (sae_model_load(&m, argv[1]) != SAE_OK) {
        rc = fail(argv[1]);
        goto done;
    }
    const size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m);
    if (sae_npy_open(&acts, argv[2]) != SAE_OK) {
        rc = fail(argv[2]);
        goto done;
    }
    if (sae_npy_cols(acts) != d_in) {
        fprintf(stderr, "steer: %s has %zu columns, the SAE reads d_in = %zu\n", argv[2],
                sae_npy_cols(acts), d_in);
        goto done;
    }
    const size_t n = want < sae_npy_rows(acts) ? want : sae_npy_rows(acts);
    x = malloc(n * d_in * sizeof *x);
    before = malloc(n * d_in * sizeof *before);
    f = malloc(n * d_sae * sizeof *f);
    if (n > 0 && (x == NULL || before == NULL || f == NULL)) {
        fprintf(stderr, "steer: out of memory\n");
        goto done;
    }
    if (sae_npy_read(acts, 0, n, x) != SAE_OK) {
        rc = fail(argv[2]);
        goto done;
    }
    memcpy(before, x, n * d_in * sizeof *x);

    /* The plan: feature := VALUE, keeping everything the SAE does not reconstruct. */
    if (sae_steer_new(&s, m) != SAE_OK || sae_steer_clamp(s, (uint32_t)feature, value) != SAE_OK) {
        rc = fail("clamp");
        goto done;
    }
    if (sae_encode(m, before, n, f) != SAE_OK) {
        rc = fail("encode");
        goto done;
    }
    float *f_before = malloc(n * sizeof *f_before);
    if (n > 0 && f_before == NULL)
        goto done;
    for (size_t t = 0; t < n; t++)
        f_before[t] = f[t * d_sae + feature];
    if (sae_steer_apply(s, x, n) != SAE_OK || sae_encode(m, x, n, f) != SAE_OK) {
        free(f_before);
        rc = fail("steer");
        goto done;
    }
    printf("%s SAE, d_in %zu, d_sae %zu: clamping feature %lu to %g on %zu token(s)\n",
           sae_arch_name(sae_model_arch(m)), d_in, d_sae, feature, (double)value, n);
    printf("%6s %14s %14s %12s %12s\n", "token", "f before", "f after", "|dx|", "|dx|/|x|");
    for (size_t t = 0; t < n; t++) {
        double dx = 0, norm = 0;
        for (size_t j = 0; j < d_in; j++) {
            double d = (double)x[t * d_in + j] - before[t * d_in + j];
            dx += d * d;
            norm += (double)before[t * d_in + j] * before[t * d_in + j];
        }
        printf("%6zu %14.6g %14.6g %12.6g %12.6g\n", t, (double)f_before[t],
               (double)f[t * d_sae + feature], sqrt(dx), norm > 0 ? sqrt(dx / norm) : 0.0);
    }
    printf("(f after is the SAE re-encoding the steered activations: it lands near VALUE when the\n"
           " feature's encoder and decoder directions agree, not exactly, since the other features\n"
           " and the kept error term move too)\n");
    free(f_before);
    rc = 0;
done:
    free(x);
    free(before);
    free(f);
    sae_steer_free(s);
    sae_npy_close(acts);
    sae_model_free(m);
    return rc;
}
