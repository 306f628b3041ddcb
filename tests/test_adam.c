/* The optimizer's kernels (lib/adam.c) and the trainer's threaded passes: Adam reading unscaled
 * gradient sums computes what the scaled buffer gave; the check's shortcut answers as the exact
 * test (the values the update then writes) on every case, planted failures included; the
 * gradient's sum of squares and finiteness; and training whose results do not depend on the
 * thread count at sizes that split every pass. */
#include "testutil.h"
#include "train_internal.h"
#include "trainutil.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 88172645463325252ull;

static float uniform(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)(rng >> 40) / (float)(1 << 24) * 2.0f - 1.0f;
}

static float *random_floats(size_t n, float scale)
{
    float *v = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(v);
    for (size_t i = 0; i < n; i++)
        v[i] = scale * uniform();
    return v;
}

static float *copy_of(const float *v, size_t n)
{
    float *c = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(c);
    memcpy(c, v, n * sizeof(float));
    return c;
}

static const size_t sizes[] = {1, 7, 8, 9, 1023, 1025, 4097};
#define N_SIZES (sizeof sizes / sizeof sizes[0])

/* Adam with scale and clip set equals Adam on the buffer scaled by two passes (the old step). */
START_TEST(update_reads_unscaled_sums_as_two_scaling_passes)
{
    const size_t n = sizes[_i];
    const float clips[] = {1.0f, 0.731f};
    for (size_t c = 0; c < 2; c++) {
        float *p = random_floats(n, 0.5f), *g = random_floats(n, 37.0f);
        float *m = random_floats(n, 0.01f), *v = random_floats(n, 1e-4f);
        for (size_t i = 0; i < n; i++)
            v[i] = fabsf(v[i]);
        float *p2 = copy_of(p, n), *m2 = copy_of(m, n), *v2 = copy_of(v, n), *gs = copy_of(g, n);
        const float inv = (float)(1.0 / 37.0);
        for (size_t i = 0; i < n; i++)
            gs[i] *= inv;
        if (clips[c] != 1.0f)
            for (size_t i = 0; i < n; i++)
                gs[i] *= clips[c];
        sae__adam a = {1e-3, 0.9, 0.999, 1e-8, 3, inv, clips[c], 0.0, 0.0};
        sae__adam plain = {1e-3, 0.9, 0.999, 1e-8, 3, 1.0f, 1.0f, 0.0, 0.0};
        sae__adam_prepare(&a); /* the bias corrections set once, plain's computed per call */
        sae__adam_update(p, g, m, v, n, &a);
        sae__adam_update(p2, gs, m2, v2, n, &plain);
        ck_assert_mem_eq(p, p2, n * sizeof(float));
        ck_assert_mem_eq(m, m2, n * sizeof(float));
        ck_assert_mem_eq(v, v2, n * sizeof(float));
        float *dst = malloc(n * sizeof(float));
        sae__adam_scaled(dst, g, n, &a);
        ck_assert_mem_eq(dst, gs, n * sizeof(float));
        free(dst);
        free(p), free(g), free(m), free(v), free(p2), free(m2), free(v2), free(gs);
    }
}
END_TEST

/* The first element the update would leave not finite, and which value: 1 the first moment, 2
 * the second, 3 the parameter; 0 if none. Computed by running the update on copies. */
static int first_bad_after_update(const float *p, const float *g, const float *m, const float *v,
                                  size_t n, const sae__adam *a, size_t *bad)
{
    float *p1 = copy_of(p, n), *m1 = copy_of(m, n), *v1 = copy_of(v, n);
    sae__adam_update(p1, g, m1, v1, n, a);
    int what = 0;
    for (size_t i = 0; i < n && what == 0; i++) {
        what = !isfinite(m1[i]) ? 1 : !isfinite(v1[i]) ? 2 : !isfinite(p1[i]) ? 3 : 0;
        *bad = i;
    }
    free(p1), free(m1), free(v1);
    return what;
}

/* What to plant at one index: each defeats the check's shortcut, some make the step fail. */
enum {
    PLANT_NONE,
    PLANT_HUGE_G,
    PLANT_NAN_M,
    PLANT_NEG_V,
    PLANT_BIG_P,
    PLANT_ZEROS,
    PLANT_SMALL_DIVISOR,
    N_PLANTS
};

START_TEST(check_answers_as_the_update_writes)
{
    const size_t n = 3001; /* two full blocks of the check and a tail */
    const size_t where[] = {0, 1500, 2047, 2048, 3000};
    const double epss[] = {1e-8, 0.0, 1e30, 1e-30};
    const double lrs[] = {1e-3, 1e36, 1e38}; /* 1e38 / (1 - 0.9): step size past FLT_MAX */
    const int plant = _i;
    int seen[4] = {0}; /* cases by the update's verdict */
    for (size_t e = 0; e < 4; e++)
        for (size_t l = 0; l < 3; l++)
            for (size_t w = 0; w < 5; w++) {
                float *p = random_floats(n, 0.5f), *g = random_floats(n, 3.0f);
                float *m = random_floats(n, 0.01f), *v = random_floats(n, 1e-4f);
                for (size_t i = 0; i < n; i++)
                    v[i] = fabsf(v[i]);
                const size_t at = where[w];
                switch (plant) {
                case PLANT_HUGE_G: g[at] = 1e38f; break;        /* v overflows */
                case PLANT_NAN_M: m[at] = NAN; break;           /* as a corrupt state would */
                case PLANT_NEG_V: v[at] = -1.0f; break;         /* sqrt of a negative */
                case PLANT_BIG_P: p[at] = -0.75f * FLT_MAX; break; /* near the edge */
                case PLANT_ZEROS: g[at] = m[at] = v[at] = 0.0f; break; /* 0 / 0 with eps 0 */
                case PLANT_SMALL_DIVISOR: /* m / eps past FLT_MAX when eps is 1e-30 */
                    g[at] = v[at] = 0.0f;
                    m[at] = 1e10f;
                    break;
                default: break;
                }
                sae__adam a = {lrs[l], 0.9, 0.999, epss[e], 1, 1.0f / 64.0f, 1.0f, 0.0, 0.0};
                size_t bad = 0, want_bad = 0;
                int want = first_bad_after_update(p, g, m, v, n, &a, &want_bad);
                int got = sae__adam_check(p, g, m, v, n, &a, &bad);
                ck_assert_msg(got == want, "plant %d eps %g lr %g at %zu: check %d, update %d",
                              plant, epss[e], lrs[l], at, got, want);
                if (want != 0)
                    ck_assert_uint_eq(bad, want_bad);
                seen[want]++;
                free(p), free(g), free(m), free(v);
            }
    /* Each plant makes the failure it is for (the large parameter and the zeros with eps > 0
     * pass, through the exact test: the shortcut does not clear them). */
    const int expect[N_PLANTS] = {0, 2, 1, 3, 0, 3, 3};
    ck_assert_int_gt(seen[expect[plant]], 0);
    if (plant == PLANT_ZEROS || plant == PLANT_SMALL_DIVISOR)
        ck_assert_int_gt(seen[0], 0);
    if (plant == PLANT_NONE) /* lr 1e38 */
        ck_assert_int_gt(seen[3], 0);
}
END_TEST

START_TEST(sumsq_is_the_double_sum_and_sees_every_non_finite)
{
    const size_t n = sizes[_i] + 65536;
    float *g = random_floats(n, 5.0f);
    const float scale = 1.0f / 3.0f;
    double want = 0.0;
    for (size_t i = 0; i < n; i++) {
        double s = (double)(g[i] * scale);
        want += s * s;
    }
    int finite = 0;
    double got = sae__adam_sumsq(g, n, scale, &finite);
    ck_assert_int_eq(finite, 1);
    ck_assert_double_eq_tol(got, want, 1e-12 * want);
    const float bads[] = {NAN, INFINITY, -INFINITY};
    for (size_t b = 0; b < 3; b++) {
        const size_t at[] = {0, n / 2, n - 1};
        for (size_t k = 0; k < 3; k++) {
            float keep = g[at[k]];
            g[at[k]] = bads[b];
            sae__adam_sumsq(g, n, scale, &finite);
            ck_assert_int_eq(finite, 0);
            g[at[k]] = keep;
        }
    }
    /* The largest floats square within a double. */
    g[0] = FLT_MAX;
    sae__adam_sumsq(g, n, 1.0f, &finite);
    ck_assert_int_eq(finite, 1);
    free(g);
}
END_TEST

/* Sizes at which every threaded pass of a step splits: the gradient's sum of squares (blocks of
 * 2^16), Adam's rows (4096 elements, decoder rows of d_in), the encoder gradient's tiles, ReLU's
 * latent ranges; d_in and d_sae are not multiples of 16. */
enum { T_D_IN = 37, T_D_SAE = 20001, T_N = 70, T_STEPS = 3 };

static void train_with_threads(sae_arch arch, double threads, float *W_enc, float *W_dec,
                               double *metrics)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, arch, T_D_IN, T_D_SAE));
    if (arch == SAE_ARCH_TOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 7));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, threads));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_SEED, 5));
    if (arch == SAE_ARCH_RELU) /* clipping on: the norm decides the factor */
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_GRAD_CLIP, 0.5));
    float *x = tu_train_data(T_N * T_STEPS, T_D_IN, 77);
    ck_assert_ok(sae_trainer_init(t, x, T_N));
    for (size_t s = 0; s < T_STEPS; s++)
        ck_assert_ok(sae_trainer_step(t, x + s * T_N * T_D_IN, T_N));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, W_enc));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, W_dec));
    const sae_train_metric which[] = {SAE_METRIC_LOSS, SAE_METRIC_FVU, SAE_METRIC_L0,
                                      SAE_METRIC_GRAD_NORM};
    for (size_t k = 0; k < 4; k++)
        metrics[k] = tu_metric(t, which[k]);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}

START_TEST(steps_do_not_depend_on_the_thread_count)
{
    const sae_arch arch = _i == 0 ? SAE_ARCH_RELU : SAE_ARCH_TOPK;
    const size_t count = (size_t)T_D_IN * T_D_SAE;
    float *e1 = malloc(count * sizeof(float)), *d1 = malloc(count * sizeof(float));
    float *e3 = malloc(count * sizeof(float)), *d3 = malloc(count * sizeof(float));
    double m1[4], m3[4];
    train_with_threads(arch, 1, e1, d1, m1);
    train_with_threads(arch, 3, e3, d3, m3);
    ck_assert_mem_eq(e1, e3, count * sizeof(float));
    ck_assert_mem_eq(d1, d3, count * sizeof(float));
    ck_assert_mem_eq(m1, m3, sizeof m1);
    ck_assert(m1[3] > 0.0);
    free(e1), free(d1), free(e3), free(d3);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("adam");
    TCase *tc = tcase_create("adam");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, update_reads_unscaled_sums_as_two_scaling_passes, 0, N_SIZES);
    tcase_add_loop_test(tc, check_answers_as_the_update_writes, 0, N_PLANTS);
    tcase_add_loop_test(tc, sumsq_is_the_double_sum_and_sees_every_non_finite, 0, N_SIZES);
    tcase_add_loop_test(tc, steps_do_not_depend_on_the_thread_count, 0, 2);
    suite_add_tcase(s, tc);
    return tu_run_suite(s);
}
