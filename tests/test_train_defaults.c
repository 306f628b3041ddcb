/* Training that works without flags, and its diagnostics: default runs (the length
 * examples/train and python -m libsae train plan) on the shipped stories260K activations reach a
 * held-out FVU below 0.3 at L0 below 32 for every architecture (Matryoshka and JumpReLU
 * included) without a warning; the warnings fire for runs that fail (Anthropic's long-run ReLU
 * rate on a short run, a K of half the width) and only after warm-up; the held-out metrics equal
 * sae_evaluate on the same tokens. */
#include "sae.h"
#include "testutil.h"
#include "trainutil.h"

#include <stdbool.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BATCH 1024

typedef struct {
    float *x;
    size_t rows, cols;
} acts;

static acts load(const char *rel)
{
    char *path = tu_data_path(rel);
    sae_npy *f;
    ck_assert_ok(sae_npy_open(&f, path));
    acts a = {NULL, sae_npy_rows(f), sae_npy_cols(f)};
    a.x = tu_malloc(a.rows * a.cols * sizeof(float));
    ck_assert_ok(sae_npy_read(f, 0, a.rows, a.x));
    sae_npy_close(f);
    free(path);
    return a;
}

/* The default run of examples/train (docs/training.md, "Defaults for the run"): the last tenth
 * of the rows (at most 8192) held out, passes up to 2048 tokens per latent, at most 20. */
static void plan(size_t rows, size_t d_sae, size_t *heldout, size_t *steps)
{
    *heldout = rows / 10 < 8192 ? rows / 10 : 8192;
    const double train = (double)(rows - *heldout);
    double passes = 2048.0 * (double)d_sae / train;
    passes = passes < 1.0 ? 1.0 : passes > 20.0 ? 20.0 : passes;
    *steps = (size_t)ceil(passes * train / BATCH);
}

/* Batches of the training rows in a new random order each pass. */
typedef struct {
    size_t *perm, n, at;
    tu_rng rng;
} order;

static void next_batch(order *o, const acts *a, float *dst)
{
    for (size_t i = 0; i < BATCH; i++) {
        if (o->at == o->n) { /* Fisher-Yates, a new pass */
            for (size_t j = o->n; j > 1; j--) {
                size_t r = (size_t)(tu_next(&o->rng) % j), tmp = o->perm[j - 1];
                o->perm[j - 1] = o->perm[r];
                o->perm[r] = tmp;
            }
            o->at = 0;
        }
        memcpy(dst + i * a->cols, a->x + o->perm[o->at++] * a->cols, a->cols * sizeof(float));
    }
}

/* The architectures; the last is Matryoshka (a BatchTopK model with groups). */
static const sae_arch ARCHS[] = {SAE_ARCH_RELU, SAE_ARCH_TOPK, SAE_ARCH_BATCHTOPK,
                                 SAE_ARCH_JUMPRELU, SAE_ARCH_BATCHTOPK};

START_TEST(default_runs_reach_low_fvu_on_shipped_activations)
{
    const sae_arch arch = ARCHS[_i];
    const bool matryoshka = _i == 4;
    acts a = load("stories260K/resid_mid.npy");
    const size_t d_sae = 8 * a.cols;
    size_t heldout, steps;
    plan(a.rows, d_sae, &heldout, &steps);
    const size_t train = a.rows - heldout;
    const float *hx = a.x + train * a.cols;
    sae_model *m;
    sae_trainer *t;
    ck_assert_ok(sae_model_new(&m, arch, a.cols, d_sae));
    if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 16)); /* min(32, d_in / 4) */
    ck_assert_ok(sae_trainer_new(&t, m));
    if (matryoshka) { /* the example programs' default groups */
        const size_t groups[5] = {d_sae / 32, d_sae / 16, d_sae / 8, d_sae / 4,
                                  d_sae - d_sae / 32 - d_sae / 16 - d_sae / 8 - d_sae / 4};
        ck_assert_ok(sae_trainer_set_groups(t, groups, 5));
    }
    const char *name = matryoshka ? "matryoshka" : sae_arch_name(arch);
    /* The width rule 2e-4 sqrt(2^14 / 512) 768 / 64 = 0.0136 meets its cap 0.1 / sqrt(64). */
    double lr;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_LR, &lr));
    ck_assert_double_eq_tol(lr, 0.0125, 1e-15);
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, (double)(steps * BATCH / 10)));
    ck_assert_ok(sae_trainer_init(t, a.x, train < 32768 ? train : 32768));
    ck_assert_ok(sae_trainer_set_heldout(t, hx, NULL, heldout));
    ck_assert(isnan(tu_metric(t, SAE_METRIC_HELDOUT_FVU)));
    order o = {tu_malloc(train * sizeof(size_t)), train, train, {7}};
    for (size_t i = 0; i < train; i++)
        o.perm[i] = i;
    float *x = tu_malloc(BATCH * a.cols * sizeof(float));
    for (size_t s = 0; s < steps; s++) {
        next_batch(&o, &a, x);
        ck_assert_ok(sae_trainer_step(t, x, BATCH));
        /* A run that works raises no warning at any step. */
        ck_assert_msg(tu_metric(t, SAE_METRIC_WARNINGS) == 0.0, "%s step %zu: %s", name, s + 1,
                      sae_trainer_warning(t));
        ck_assert_ptr_null(sae_trainer_warning(t));
    }
    const double fvu = tu_metric(t, SAE_METRIC_HELDOUT_FVU),
                 l0 = tu_metric(t, SAE_METRIC_HELDOUT_L0);
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_HELDOUT_STEP), (double)steps);
    printf("%s default run, %zu steps of %d: held-out FVU %.4f, L0 %.1f\n", name, steps, BATCH,
           fvu, l0);
    ck_assert_msg(fvu < 0.3 && l0 < 32.0, "%s: held-out FVU %g, L0 %g", name, fvu, l0);
    /* The held-out metrics are sae_evaluate's on the same tokens. */
    const sae_eval_metric which[3] = {SAE_EVAL_FVU, SAE_EVAL_MSE, SAE_EVAL_L0};
    double want[3];
    ck_assert_ok(sae_evaluate(m, hx, heldout, which, 3, want));
    ck_assert_double_eq_tol(fvu, want[0], 1e-12 * want[0]);
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_MSE), want[1], 1e-12 * want[1]);
    ck_assert_double_eq_tol(l0, want[2], 1e-12 * (1 + want[2]));
    free(x);
    free(o.perm);
    free(a.x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* Steps a run of `steps` batches of 256 stories260K tokens; returns the first step (1-based) at
 * which each warning bit was raised in first[0] (FVU) and first[1] (L0), 0 if never. */
static void run_and_watch(sae_trainer *t, const acts *a, size_t steps, size_t first[2])
{
    first[0] = first[1] = 0;
    for (size_t s = 0; s < steps; s++) {
        const size_t at = (s * 256 * 7919) % (a->rows - 256);
        ck_assert_ok(sae_trainer_step(t, a->x + at * a->cols, 256));
        unsigned bits = (unsigned)tu_metric(t, SAE_METRIC_WARNINGS);
        ck_assert_int_eq(bits != 0, sae_trainer_warning(t) != NULL);
        for (int b = 0; b < 2; b++)
            if ((bits & (1u << b)) && first[b] == 0)
                first[b] = s + 1;
    }
}

START_TEST(warnings_name_the_knob_after_warmup)
{
    acts a = load("stories260K/resid_mid.npy");
    const size_t d_sae = 8 * a.cols, steps = 300;
    sae_model *m;
    sae_trainer *t;

    /* Anthropic's ReLU rate and coefficient for billions of tokens, on 300 steps: FVU and L0
     * stay high (the run). Warm-up is the first 75 steps (a quarter), L1's 15. */
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, a.cols, d_sae));
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 5e-5));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 5));
    ck_assert_ok(sae_trainer_init(t, a.x, 16384));
    size_t first[2];
    run_and_watch(t, &a, steps, first);
    ck_assert_uint_eq(first[0], 76);
    ck_assert_uint_eq(first[1], 76);
    const char *w = sae_trainer_warning(t);
    ck_assert_ptr_nonnull(w);
    ck_assert_ptr_nonnull(strstr(w, "FVU has stayed above 1"));
    ck_assert_ptr_nonnull(strstr(w, "SAE_TRAIN_LR"));
    ck_assert_ptr_nonnull(strstr(w, "SAE_TRAIN_L1_COEFF"));
    /* A rate that works clears them once the condition no longer holds. */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 5e-3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 2));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR_DECAY_STEPS, 0));
    run_and_watch(t, &a, 200, first);
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_WARNINGS), 0.0);
    ck_assert_ptr_null(sae_trainer_warning(t));
    sae_trainer_free(t);
    sae_model_free(m);

    /* TopK with K half the width: L0 is K, so the L0 warning holds from the first step and is
     * raised when warm-up ends (no TOTAL_STEPS: 100 steps), naming K; FVU is fine. */
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, a.cols, d_sae));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, (double)(d_sae / 2)));
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_init(t, a.x, 16384));
    run_and_watch(t, &a, 120, first);
    ck_assert_uint_eq(first[0], 0);
    ck_assert_uint_eq(first[1], 101);
    w = sae_trainer_warning(t);
    ck_assert_ptr_nonnull(w);
    ck_assert_ptr_nonnull(strstr(w, "SAE_PARAM_K"));
    ck_assert_ptr_null(strstr(w, "FVU"));
    /* init starts afresh: no warning until warm-up is over again. */
    ck_assert_ok(sae_trainer_init(t, a.x, 16384));
    ck_assert_ptr_null(sae_trainer_warning(t));
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_WARNINGS), 0.0);
    sae_trainer_free(t);
    sae_model_free(m);
    free(a.x);
}
END_TEST

START_TEST(heldout_metrics_follow_their_schedule)
{
    tu_rng r = {11};
    const size_t d = 8, d_sae = 32, n = 200, nh = 50, d_out = 5;
    float *x = tu_malloc(n * d * sizeof(float)), *y = tu_malloc(n * d_out * sizeof(float));
    tu_fill(&r, x, n * d, -1, 1);
    tu_fill(&r, y, n * d_out, -1, 1);
    sae_model *m;
    sae_trainer *t;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, d, d_sae));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 4));
    ck_assert_ok(sae_trainer_new(&t, m));
    double v;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_HELDOUT_EVERY, &v));
    ck_assert_double_eq(v, 100); /* TOTAL_STEPS unknown */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, 70));
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_HELDOUT_EVERY, &v));
    ck_assert_double_eq(v, 3); /* TOTAL_STEPS / 20 */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_HELDOUT_EVERY, 4));
    ck_assert_ok(sae_trainer_init(t, x, n));
    /* Readable before any step: NaN, 0. */
    ck_assert(isnan(tu_metric(t, SAE_METRIC_HELDOUT_FVU)));
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_HELDOUT_STEP), 0);
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_WARNINGS), 0);
    /* Bad held-out sets change nothing. */
    ck_assert_sae(sae_trainer_set_heldout(NULL, x, NULL, nh), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_heldout(t, NULL, NULL, nh), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_heldout(t, x, y, nh), SAE_EINVAL); /* an SAE takes no y */
    float saved = x[3];
    x[3] = NAN;
    ck_assert_sae(sae_trainer_set_heldout(t, x, NULL, nh), SAE_EINVAL);
    x[3] = saved;
    ck_assert_ok(sae_trainer_set_heldout(t, x + (n - nh) * d, NULL, nh));
    const sae_eval_metric which[3] = {SAE_EVAL_FVU, SAE_EVAL_MSE, SAE_EVAL_L0};
    double want[3];
    size_t last = 0;
    for (size_t s = 1; s <= 72; s++) {
        ck_assert_ok(sae_trainer_step(t, x + (s % 5) * 20 * d, 20));
        if (s % 4 == 0 || s == 70) { /* every 4 steps, and at TOTAL_STEPS */
            last = s;
            ck_assert_ok(sae_evaluate(m, x + (n - nh) * d, nh, which, 3, want));
            ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_FVU), want[0], 1e-12);
            ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_MSE), want[1], 1e-12);
            ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_L0), want[2], 1e-12);
        }
        ck_assert_double_eq(tu_metric(t, SAE_METRIC_HELDOUT_STEP), (double)last);
    }
    /* A checkpoint does not carry the diagnostics: a loaded trainer has none until evaluated. */
    char *path = tu_tmp_path("heldout.ckpt");
    ck_assert_ok(sae_trainer_save(t, path));
    ck_assert_ok(sae_trainer_load(t, path));
    ck_assert(isnan(tu_metric(t, SAE_METRIC_HELDOUT_FVU)));
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_HELDOUT_STEP), 0);
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_HELDOUT_EVERY, &v));
    ck_assert_double_eq(v, 4); /* an explicit value is saved */
    /* Set after steps: evaluated at once. n = 0 removes it. */
    ck_assert_ok(sae_trainer_set_heldout(t, x, NULL, nh));
    ck_assert_ok(sae_evaluate(m, x, nh, which, 3, want));
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_FVU), want[0], 1e-12);
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_HELDOUT_STEP), 72);
    ck_assert_ok(sae_trainer_set_heldout(t, NULL, NULL, 0));
    ck_assert(isnan(tu_metric(t, SAE_METRIC_HELDOUT_FVU)));
    remove(path);
    free(path);
    sae_trainer_free(t);
    sae_model_free(m);

    /* A transcoder's held-out set carries its targets, scored as sae_evaluate_to. */
    ck_assert_ok(sae_model_new_transcoder(&m, SAE_ARCH_RELU, d, d_sae, d_out, 1));
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_init_to(t, x, y, n));
    ck_assert_sae(sae_trainer_set_heldout(t, x, NULL, nh), SAE_EINVAL);
    ck_assert_ok(sae_trainer_step_to(t, x, y, 100));
    ck_assert_ok(sae_trainer_set_heldout(t, x + 100 * d, y + 100 * d_out, nh));
    ck_assert_ok(sae_evaluate_to(m, x + 100 * d, y + 100 * d_out, nh, which, 3, want));
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_FVU), want[0], 1e-12);
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_HELDOUT_L0), want[2], 1e-12);
    sae_trainer_free(t);
    sae_model_free(m);
    free(x);
    free(y);
}
END_TEST

static Suite *train_defaults_suite(void)
{
    Suite *s = suite_create("train_defaults");
    TCase *tc = tcase_create("train_defaults");
    tcase_set_timeout(tc, 120);
    /* Five default-length runs take minutes under the sanitizers and the reference BLAS
     * (SAE_TEST_SHORT): the defaults' code is the same for every architecture, so those builds
     * run the first, and the OpenBLAS build all five. */
    int archs = getenv("SAE_TEST_SHORT") ? 1 : 5;
    tcase_add_loop_test(tc, default_runs_reach_low_fvu_on_shipped_activations, 0, archs);
    tcase_add_test(tc, warnings_name_the_knob_after_warmup);
    tcase_add_test(tc, heldout_metrics_follow_their_schedule);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(train_defaults_suite)
