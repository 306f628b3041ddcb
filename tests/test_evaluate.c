/* sae_evaluate: every metric of every architecture against float64 loops over the contract's
 * math, across block boundaries, and its errors. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { N_METRICS = 8 };
static const sae_eval_metric all[N_METRICS] = {
    SAE_EVAL_MSE, SAE_EVAL_FVU,    SAE_EVAL_EXPLAINED_VARIANCE, SAE_EVAL_L0,
    SAE_EVAL_L1,  SAE_EVAL_COSINE, SAE_EVAL_L2_RATIO,           SAE_EVAL_DEAD_FRACTION};

/* The metrics computed the plain way, token by token, in float64. */
static void reference(const sae_model *m, const float *x, size_t n, double *want)
{
    tu_weights w;
    tu_weights_get(m, &w);
    size_t d_in = w.d_in, d_sae = w.d_sae;
    double *f = tu_malloc(d_sae * sizeof(double)), *xh = tu_malloc(d_in * sizeof(double));
    double *mean = calloc(d_in, sizeof(double));
    unsigned char *fired = calloc(d_sae, 1);
    double sq = 0, l0 = 0, l1 = 0, cos_sum = 0, ratio = 0, dev = 0;
    for (size_t t = 0; t < n; t++)
        for (size_t j = 0; j < d_in; j++)
            mean[j] += x[t * d_in + j] / (double)n;
    for (size_t t = 0; t < n; t++) {
        const float *xt = x + t * d_in;
        tu_ref_encode(&w, xt, f);
        tu_ref_decode(&w, f, xh);
        for (size_t i = 0; i < d_sae; i++) {
            if (f[i] != 0) {
                l0++;
                l1 += f[i];
                fired[i] = 1;
            }
        }
        double xx = 0, hh = 0, xhd = 0;
        for (size_t j = 0; j < d_in; j++) {
            sq += (xt[j] - xh[j]) * (xt[j] - xh[j]);
            dev += (xt[j] - mean[j]) * (xt[j] - mean[j]);
            xx += (double)xt[j] * xt[j];
            hh += xh[j] * xh[j];
            xhd += xt[j] * xh[j];
        }
        cos_sum += xhd / sqrt(xx * hh);
        ratio += sqrt(hh / xx);
    }
    size_t dead = 0;
    for (size_t i = 0; i < d_sae; i++)
        dead += !fired[i];
    want[0] = sq / (double)n;
    want[1] = sq / dev;
    want[2] = 1 - sq / dev;
    want[3] = l0 / (double)n;
    want[4] = l1 / (double)n;
    want[5] = cos_sum / (double)n;
    want[6] = ratio / (double)n;
    want[7] = (double)dead / (double)d_sae;
    free(f);
    free(xh);
    free(mean);
    free(fired);
    tu_weights_free(&w);
}

START_TEST(metrics_match_float64_loops)
{
    sae_arch arch = (sae_arch)_i;
    const size_t shapes[][3] = {{1, 4, 3}, {12, 40, 7}, {20, 64, 600}}; /* 600: three blocks */
    for (size_t s = 0; s < 3; s++) {
        size_t d_in = shapes[s][0], d_sae = shapes[s][1], n = shapes[s][2];
        sae_model *m = tu_random_model(arch, d_in, d_sae, 31 + s);
        if (arch == SAE_ARCH_TOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
        if (arch == SAE_ARCH_BATCHTOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.05));
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 1.5));
        float *x = tu_malloc(n * d_in * sizeof(float));
        tu_rng r = {s + 5};
        tu_fill(&r, x, n * d_in, -1.0f, 2.0f);
        double got[N_METRICS], want[N_METRICS];
        ck_assert_ok(sae_evaluate(m, x, n, all, N_METRICS, got));
        reference(m, x, n, want);
        for (int i = 0; i < N_METRICS; i++)
            ck_assert_msg(fabs(got[i] - want[i]) <= 1e-4 * fmax(1.0, fabs(want[i])),
                          "shape %zu metric %d: %.9g, expected %.9g", s, (int)all[i], got[i],
                          want[i]);
        ck_assert(want[3] > 0); /* codes were not all zero */
        /* Any order and repeats. */
        const sae_eval_metric some[3] = {SAE_EVAL_L0, SAE_EVAL_MSE, SAE_EVAL_L0};
        double three[3];
        ck_assert_ok(sae_evaluate(m, x, n, some, 3, three));
        ck_assert_double_eq(three[0], got[3]);
        ck_assert_double_eq(three[1], got[0]);
        ck_assert_double_eq(three[2], got[3]);
        free(x);
        sae_model_free(m);
    }
}
END_TEST

/* A perfect SAE (identity dictionary, ReLU on positive inputs) has no error. */
START_TEST(perfect_reconstruction_scores_perfectly)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, 3, 3));
    const float eye[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_ENC, eye));
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, eye));
    const float x[6] = {1, 2, 0, 0.5f, 0, 3};
    double v[N_METRICS];
    ck_assert_ok(sae_evaluate(m, x, 2, all, N_METRICS, v));
    ck_assert_double_eq_tol(v[0], 0, 1e-12);
    ck_assert_double_eq_tol(v[1], 0, 1e-12);
    ck_assert_double_eq_tol(v[2], 1, 1e-12);
    ck_assert_double_eq_tol(v[3], 2, 1e-12);
    ck_assert_double_eq_tol(v[4], 3.25, 1e-12);
    ck_assert_double_eq_tol(v[5], 1, 1e-12);
    ck_assert_double_eq_tol(v[6], 1, 1e-12);
    ck_assert_double_eq_tol(v[7], 0, 1e-12);
    /* One token: no variance, so no FVU. */
    ck_assert_ok(sae_evaluate(m, x, 1, all, N_METRICS, v));
    ck_assert(isnan(v[1]));
    sae_model_free(m);
}
END_TEST

START_TEST(evaluate_refuses_bad_arguments)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 2, 3, 1);
    float x[4] = {1, 2, 3, 4};
    double v[2];
    sae_eval_metric bad[2] = {SAE_EVAL_MSE, (sae_eval_metric)0};
    ck_assert_sae(sae_evaluate(NULL, x, 2, all, 1, v), SAE_EINVAL);
    ck_assert_sae(sae_evaluate(m, NULL, 2, all, 1, v), SAE_EINVAL);
    ck_assert_sae(sae_evaluate(m, x, 2, NULL, 1, v), SAE_EINVAL);
    ck_assert_sae(sae_evaluate(m, x, 2, all, 1, NULL), SAE_EINVAL);
    ck_assert_sae(sae_evaluate(m, x, 0, all, 1, v), SAE_EINVAL);
    ck_assert_sae(sae_evaluate(m, x, 2, bad, 2, v), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "which[1]") != NULL, "%s", sae_last_error());
    bad[1] = (sae_eval_metric)9;
    ck_assert_sae(sae_evaluate(m, x, 2, bad, 2, v), SAE_EINVAL);
    ck_assert_sae(sae_evaluate(m, x, SIZE_MAX / 2, all, 1, v), SAE_EINVAL);
    x[3] = NAN;
    ck_assert_sae(sae_evaluate(m, x, 2, all, 1, v), SAE_EINVAL);
    sae_model_free(m);
}
END_TEST

static Suite *evaluate_suite(void)
{
    Suite *s = suite_create("evaluate");
    TCase *tc = tcase_create("core");
    tcase_add_loop_test(tc, metrics_match_float64_loops, SAE_ARCH_RELU, SAE_ARCH_JUMPRELU + 1);
    tcase_add_test(tc, perfect_reconstruction_scores_perfectly);
    tcase_add_test(tc, evaluate_refuses_bad_arguments);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(evaluate_suite)
