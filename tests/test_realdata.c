/* Real residual-stream activations (aidreams260K, layer 2): the .npy file reads as numpy wrote
 * it, and every architecture encodes and reconstructs it as the float64 loops do. Real
 * activations have outlier dimensions and a large shared offset that random inputs lack. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { TOKENS = 512 };

static float *load_acts(size_t *rows, size_t *cols)
{
    char *path = tu_data_path("aidreams260K/resid_layer2.npy");
    sae_npy *a;
    ck_assert_ok(sae_npy_open(&a, path));
    *rows = sae_npy_rows(a);
    *cols = sae_npy_cols(a);
    ck_assert_uint_eq(*cols, 64);
    ck_assert_uint_gt(*rows, TOKENS);
    float *x = tu_malloc(TOKENS * *cols * sizeof(float));
    ck_assert_ok(sae_npy_read(a, 0, TOKENS, x));
    sae_npy_close(a);
    free(path);
    return x;
}

START_TEST(npy_header_and_values_are_plausible)
{
    size_t rows, cols;
    float *x = load_acts(&rows, &cols);
    /* 11,495,552 bytes = 128 header + rows * 64 * 4. */
    ck_assert_uint_eq(rows, (11495552 - 128) / 256);
    double norm = 0;
    for (size_t i = 0; i < cols; i++)
        norm += (double)x[i] * x[i];
    ck_assert(norm > 0.01 && norm < 1e6);
    free(x);
}
END_TEST

START_TEST(every_arch_encodes_real_activations_like_float64)
{
    sae_arch arch = (sae_arch)_i;
    size_t rows, d_in;
    float *x = load_acts(&rows, &d_in);
    const size_t d_sae = 512;
    sae_model *m = tu_random_model(arch, d_in, d_sae, 77);
    /* b_dec at the data mean, as training would put it: pre-activations then straddle zero. */
    float mean[64] = {0};
    for (size_t t = 0; t < TOKENS; t++)
        for (size_t j = 0; j < d_in; j++)
            mean[j] += x[t * d_in + j] / TOKENS;
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_DEC, mean));
    if (arch == SAE_ARCH_TOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 16));
    if (arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.2));
    float *f = tu_malloc(TOKENS * d_sae * sizeof(float));
    float *x_hat = tu_malloc(TOKENS * d_in * sizeof(float));
    ck_assert_ok(sae_encode(m, x, TOKENS, f));
    ck_assert_ok(sae_reconstruct(m, x, TOKENS, x_hat));
    tu_weights w;
    tu_weights_get(m, &w);
    double *want_f = tu_malloc(d_sae * sizeof(double)), want_x[64];
    size_t active = 0;
    for (size_t t = 0; t < TOKENS; t += 7) {
        tu_ref_encode(&w, x + t * d_in, want_f);
        tu_assert_close(f + t * d_sae, want_f, d_sae, 1e-4, "f");
        tu_ref_decode(&w, want_f, want_x);
        tu_assert_close(x_hat + t * d_in, want_x, d_in, 1e-4, "x_hat");
        for (size_t i = 0; i < d_sae; i++)
            active += f[t * d_sae + i] != 0.0f;
    }
    ck_assert_uint_gt(active, 0); /* the comparison was not of all-zero codes */
    tu_weights_free(&w);
    free(want_f);
    free(f);
    free(x_hat);
    free(x);
    sae_model_free(m);
}
END_TEST

static Suite *realdata_suite(void)
{
    Suite *s = suite_create("realdata");
    TCase *tc = tcase_create("aidreams260K");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, npy_header_and_values_are_plausible);
    tcase_add_loop_test(tc, every_arch_encodes_real_activations_like_float64, SAE_ARCH_RELU,
                        SAE_ARCH_JUMPRELU + 1);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(realdata_suite)
