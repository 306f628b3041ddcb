/* Decoding and reconstruction: dense and sparse against float64 loops, for every architecture and
 * input scale, in place, and the errors. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double *to_double(const float *v, size_t n)
{
    double *d = tu_malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++)
        d[i] = v[i];
    return d;
}

START_TEST(dense_decode_matches_float64_loops)
{
    const size_t shapes[][3] = {{1, 1, 1}, {3, 5, 1}, {7, 40, 9}, {33, 70, 65}};
    const double scales[] = {1.0, 0.5, 3.0};
    for (size_t s = 0; s < 4; s++) {
        for (size_t c = 0; c < 3; c++) {
            size_t d_in = shapes[s][0], d_sae = shapes[s][1], n = shapes[s][2];
            sae_model *m = tu_random_model(SAE_ARCH_RELU, d_in, d_sae, 40 + s);
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, scales[c]));
            float *f = tu_malloc(n * d_sae * sizeof(float));
            float *x_hat = tu_malloc(n * d_in * sizeof(float));
            tu_rng r = {s * 3 + c};
            tu_fill(&r, f, n * d_sae, 0.0f, 2.0f);
            ck_assert_ok(sae_decode(m, f, n, x_hat));
            tu_weights w;
            tu_weights_get(m, &w);
            double *want = tu_malloc(d_in * sizeof(double));
            for (size_t t = 0; t < n; t++) {
                double *fd = to_double(f + t * d_sae, d_sae);
                tu_ref_decode(&w, fd, want);
                tu_assert_close(x_hat + t * d_in, want, d_in, 1e-5, "x_hat");
                free(fd);
            }
            free(want);
            tu_weights_free(&w);
            free(f);
            free(x_hat);
            sae_model_free(m);
        }
    }
}
END_TEST

/* Sparse decode of sparse codes equals dense decode of the same codes. */
START_TEST(sparse_decode_equals_dense_decode)
{
    const size_t d_in = 12, d_sae = 50, n = 6, k = 5;
    sae_model *m = tu_random_model(SAE_ARCH_TOPK, d_in, d_sae, 2);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 0.75));
    uint32_t idx[6 * 5], count[6];
    float val[6 * 5], f[6 * 50], sparse[6 * 12];
    tu_rng r = {5};
    memset(f, 0, sizeof f);
    for (size_t t = 0; t < n; t++) {
        count[t] = (uint32_t)(t % (k + 1)); /* 0 .. k features */
        for (size_t j = 0; j < k; j++) {
            idx[t * k + j] = (uint32_t)(tu_next(&r) % d_sae);
            val[t * k + j] = tu_uniform(&r, -1.0f, 3.0f);
            if (j < count[t])
                f[t * d_sae + idx[t * k + j]] += val[t * k + j];
        }
    }
    ck_assert_ok(sae_decode_sparse(m, idx, val, count, k, n, sparse));
    tu_weights w;
    tu_weights_get(m, &w);
    double want[12];
    for (size_t t = 0; t < n; t++) {
        double *fd = to_double(f + t * d_sae, d_sae);
        tu_ref_decode(&w, fd, want);
        tu_assert_close(sparse + t * d_in, want, d_in, 1e-5, "sparse x_hat");
        free(fd);
    }
    tu_weights_free(&w);
    sae_model_free(m);
}
END_TEST

/* reconstruct = decode(encode(x)) for every architecture and setting, also in place. */
START_TEST(reconstruct_equals_decode_of_encode)
{
    sae_arch arch = (sae_arch)_i;
    const size_t shapes[][3] = {{1, 3, 2}, {16, 80, 1}, {16, 80, 37}};
    for (size_t s = 0; s < 3; s++) {
        for (int apply = 0; apply <= 1; apply++) {
            size_t d_in = shapes[s][0], d_sae = shapes[s][1], n = shapes[s][2];
            sae_model *m = tu_random_model(arch, d_in, d_sae, 60 + s);
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, apply));
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, apply ? 1.0 : 1.7));
            if (arch == SAE_ARCH_TOPK)
                ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 5));
            if (arch == SAE_ARCH_BATCHTOPK)
                ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.1));
            float *x = tu_malloc(n * d_in * sizeof(float));
            float *x_hat = tu_malloc(n * d_in * sizeof(float));
            tu_rng r = {s};
            tu_fill(&r, x, n * d_in, -1.0f, 1.0f);
            ck_assert_ok(sae_reconstruct(m, x, n, x_hat));
            tu_weights w;
            tu_weights_get(m, &w);
            double *f = tu_malloc(d_sae * sizeof(double)), *want = tu_malloc(d_in * sizeof(double));
            for (size_t t = 0; t < n; t++) {
                tu_ref_encode(&w, x + t * d_in, f);
                tu_ref_decode(&w, f, want);
                tu_assert_close(x_hat + t * d_in, want, d_in, 1e-4, "x_hat");
            }
            /* In place gives the same numbers. */
            ck_assert_ok(sae_reconstruct(m, x, n, x));
            for (size_t i = 0; i < n * d_in; i++)
                ck_assert_float_eq_tol(x[i], x_hat[i], 1e-6f);
            free(f);
            free(want);
            tu_weights_free(&w);
            free(x);
            free(x_hat);
            sae_model_free(m);
        }
    }
}
END_TEST

START_TEST(decode_refuses_bad_arguments)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 2, 3, 1);
    float f[6] = {0}, x_hat[4] = {9, 9, 9, 9}, val[4] = {1, 1, 1, 1};
    uint32_t idx[4] = {0, 1, 2, 0}, count[2] = {2, 2};
    ck_assert_sae(sae_decode(NULL, f, 1, x_hat), SAE_EINVAL);
    ck_assert_sae(sae_decode(m, NULL, 1, x_hat), SAE_EINVAL);
    ck_assert_sae(sae_decode(m, f, 1, NULL), SAE_EINVAL);
    f[5] = NAN;
    ck_assert_sae(sae_decode(m, f, 2, x_hat), SAE_EINVAL);
    ck_assert_ok(sae_decode(m, NULL, 0, NULL));

    ck_assert_sae(sae_decode_sparse(m, idx, val, count, 0, 2, x_hat), SAE_EINVAL);
    ck_assert_sae(sae_decode_sparse(m, NULL, val, count, 2, 2, x_hat), SAE_EINVAL);
    ck_assert_sae(sae_decode_sparse(m, idx, val, count, 2, 2, NULL), SAE_EINVAL);
    idx[3] = 3; /* d_sae is 3 */
    ck_assert_sae(sae_decode_sparse(m, idx, val, count, 2, 2, x_hat), SAE_ERANGE);
    ck_assert_msg(strstr(sae_last_error(), "idx[1][1] = 3") != NULL, "message: %s",
                  sae_last_error());
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(x_hat[i], 9.0f); /* refused before anything was written */
    idx[3] = UINT32_MAX;
    ck_assert_sae(sae_decode_sparse(m, idx, val, count, 2, 2, x_hat), SAE_ERANGE);
    idx[3] = 0;
    count[1] = 3;
    ck_assert_sae(sae_decode_sparse(m, idx, val, count, 2, 2, x_hat), SAE_EINVAL);
    count[1] = 1;
    val[2] = INFINITY;
    ck_assert_sae(sae_decode_sparse(m, idx, val, count, 2, 2, x_hat), SAE_EINVAL);
    val[2] = 1;
    ck_assert_ok(sae_decode_sparse(m, idx, val, count, 2, 2, x_hat));
    /* An index past count is never read, whatever it holds. */
    idx[3] = UINT32_MAX;
    ck_assert_ok(sae_decode_sparse(m, idx, val, count, 2, 2, x_hat));

    float x[4] = {1, 2, 3, NAN};
    ck_assert_sae(sae_reconstruct(m, x, 2, x_hat), SAE_EINVAL);
    ck_assert_sae(sae_reconstruct(NULL, x, 2, x_hat), SAE_EINVAL);
    ck_assert_sae(sae_reconstruct(m, x, 2, NULL), SAE_EINVAL);
    ck_assert_ok(sae_reconstruct(m, NULL, 0, NULL));
    sae_model_free(m);
}
END_TEST

/* The finiteness check rides on the count of nonzeros, split across threads: a NaN or infinity
 * anywhere, in codes dense enough for the GEMM or sparse enough for the row path, is refused
 * with the first bad value named, whatever the thread count, and finite codes still decode. */
START_TEST(decode_refuses_nonfinite_codes_across_threads)
{
    /* Enough tokens of enough codes for the count to be split across up to 3 threads. */
    const size_t d_in = 9, d_sae = 2001, n = 400;
    const float bad_values[] = {NAN, INFINITY, -INFINITY};
    sae_model *m = tu_random_model(SAE_ARCH_RELU, d_in, d_sae, 77);
    float *f = tu_malloc(n * d_sae * sizeof(float));
    float *x_hat = tu_malloc(n * d_in * sizeof(float));
    for (int dense = 0; dense <= 1; dense++) {
        for (size_t threads = 1; threads <= 3; threads++) {
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, (double)threads));
            for (size_t b = 0; b < 3; b++) {
                tu_rng r = {threads * 10 + b};
                tu_fill(&r, f, n * d_sae, 0.0f, 1.0f);
                if (!dense) /* one code in 35: the row path */
                    for (size_t i = 0; i < n * d_sae; i++)
                        if (i % 35 != 3)
                            f[i] = 0.0f;
                ck_assert_ok(sae_decode(m, f, n, x_hat));
                /* The last token (the last thread's share) and its last code (past the
                 * counting's blocks of 16), then a second one earlier, which is named. */
                f[(n - 1) * d_sae + d_sae - 1] = bad_values[b];
                ck_assert_sae(sae_decode(m, f, n, x_hat), SAE_EINVAL);
                ck_assert_msg(strstr(sae_last_error(), "f[399][2000]") != NULL, "message: %s",
                              sae_last_error());
                f[250 * d_sae + 5] = bad_values[(b + 1) % 3];
                ck_assert_sae(sae_decode(m, f, n, x_hat), SAE_EINVAL);
                ck_assert_msg(strstr(sae_last_error(), "f[250][5]") != NULL, "message: %s",
                              sae_last_error());
                ck_assert_sae(sae_decode(m, f + 250 * d_sae, 1, x_hat), SAE_EINVAL);
            }
        }
    }
    free(f);
    free(x_hat);
    sae_model_free(m);
}
END_TEST

static Suite *decode_suite(void)
{
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, dense_decode_matches_float64_loops);
    tcase_add_test(tc, sparse_decode_equals_dense_decode);
    tcase_add_loop_test(tc, reconstruct_equals_decode_of_encode, SAE_ARCH_RELU,
                        SAE_ARCH_JUMPRELU + 1);
    tcase_add_test(tc, decode_refuses_bad_arguments);
    tcase_add_test(tc, decode_refuses_nonfinite_codes_across_threads);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(decode_suite)
