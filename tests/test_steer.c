/* Steering plans: clamp, scale, add, their mixes and replacement, against float64 loops for every
 * architecture; the constant vector of add-only plans; llama.cpp control-vector files read back by
 * an independent GGUF reader; and every error. */
#include "testutil.h"

#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 2e-5

typedef struct {
    uint32_t feature;
    sae_steer_op op;
    double value;
} ref_op;

/* x' = x + sum_i delta_i * W_dec[i] / scale with f from the float64 encoder: the contract, as
 * loops. ops is the final plan (one op per feature). */
static void ref_steer(const tu_weights *w, const ref_op *ops, size_t n_ops, const float *x,
                      double *out)
{
    double *f = tu_malloc(w->d_sae * sizeof *f);
    tu_ref_encode(w, x, f);
    for (size_t j = 0; j < w->d_in; j++)
        out[j] = x[j];
    for (size_t o = 0; o < n_ops; o++) {
        const uint32_t i = ops[o].feature;
        double delta = ops[o].op == SAE_STEER_CLAMP   ? ops[o].value - f[i]
                       : ops[o].op == SAE_STEER_SCALE ? ops[o].value * f[i] - f[i]
                                                      : ops[o].value;
        for (size_t j = 0; j < w->d_in; j++)
            out[j] += delta * w->W_dec[i * w->d_in + j] / w->scale;
    }
    free(f);
}

static int add_op(sae_steer *s, const ref_op *op)
{
    switch (op->op) {
    case SAE_STEER_CLAMP: return sae_steer_clamp(s, op->feature, (float)op->value);
    case SAE_STEER_SCALE: return sae_steer_scale(s, op->feature, (float)op->value);
    default: return sae_steer_add(s, op->feature, (float)op->value);
    }
}

/* Applies ops to n random tokens and compares every element with ref_steer. */
static void check_plan(sae_model *m, const ref_op *ops, size_t n_ops, size_t n, uint64_t seed,
                       size_t block, const char *what)
{
    tu_weights w;
    tu_weights_get(m, &w);
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    if (block)
        sae__steer_set_block(s, block);
    for (size_t o = 0; o < n_ops; o++)
        ck_assert_ok(add_op(s, &ops[o]));
    float *x = tu_malloc(n * w.d_in * sizeof *x);
    double *want = tu_malloc(n * w.d_in * sizeof *want);
    tu_rng r = {seed};
    tu_fill(&r, x, n * w.d_in, -1.5f, 1.5f);
    for (size_t t = 0; t < n; t++)
        ref_steer(&w, ops, n_ops, x + t * w.d_in, want + t * w.d_in);
    ck_assert_ok(sae_steer_apply(s, x, n));
    char label[160];
    snprintf(label, sizeof label, "%s (%s, n = %zu)", what, sae_arch_name(w.arch), n);
    tu_assert_close(x, want, n * w.d_in, TOL, label);
    free(x);
    free(want);
    sae_steer_free(s);
    tu_weights_free(&w);
}

/* Each architecture with parameters away from their defaults, so every term of the math shows. */
static sae_model *model_for(sae_arch arch, size_t d_in, size_t d_sae, int variant)
{
    sae_model *m = tu_random_model(arch, d_in, d_sae, 1000 + (uint64_t)arch * 10 + (uint64_t)variant);
    if (variant == 1) {
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 0));
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 2.5));
    } else if (variant == 2) {
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 0.5));
    }
    if (arch == SAE_ARCH_TOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 6));
    if (arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.05));
    return m;
}

START_TEST(each_op_alone_matches_reference)
{
    const sae_arch arch = (sae_arch)(SAE_ARCH_RELU + _i / 3);
    const int variant = _i % 3;
    sae_model *m = model_for(arch, 24, 40, variant);
    const sae_steer_op kinds[] = {SAE_STEER_CLAMP, SAE_STEER_SCALE, SAE_STEER_ADD};
    const double values[] = {3.25, -2.0, 0.0, 0.5, 7.0};
    for (size_t k = 0; k < 3; k++)
        for (size_t v = 0; v < 5; v++)
            for (uint32_t feature = 0; feature < 40; feature += 7) {
                ref_op op = {feature, kinds[k], values[v]};
                check_plan(m, &op, 1, 5, 77 + feature, 0, "one op");
                check_plan(m, &op, 1, 1, 78 + feature, 0, "one op");
            }
    sae_model_free(m);
}
END_TEST

START_TEST(mixed_plans_match_reference)
{
    const sae_arch arch = (sae_arch)(SAE_ARCH_RELU + _i / 3);
    sae_model *m = model_for(arch, 24, 40, _i % 3);
    /* Every feature, ops cycling through the three kinds: many active TopK features included. */
    ref_op ops[40];
    tu_rng r = {5};
    for (uint32_t i = 0; i < 40; i++)
        ops[i] = (ref_op){i, (sae_steer_op)(SAE_STEER_CLAMP + i % 3), tu_uniform(&r, -3, 3)};
    check_plan(m, ops, 40, 9, 11, 0, "all features, mixed");
    check_plan(m, ops, 40, 1, 12, 0, "all features, mixed");
    check_plan(m, ops, 40, 9, 13, 3, "all features, blocks of 3");
    check_plan(m, ops, 40, 9, 14, 1, "all features, blocks of 1");
    /* A few scattered features. */
    ref_op few[] = {{3, SAE_STEER_CLAMP, 0.0}, {17, SAE_STEER_SCALE, 4.0}, {18, SAE_STEER_ADD, -1.5},
                    {39, SAE_STEER_CLAMP, 9.0}};
    check_plan(m, few, 4, 33, 15, 0, "scattered mix");
    check_plan(m, few, 4, 33, 16, 2, "scattered mix, blocks of 2");
    sae_model_free(m);
}
END_TEST

START_TEST(long_batches_span_several_passes)
{
    /* 2^20 / d_in tokens per pass: 2048 here, so 2100 tokens take two. */
    sae_model *m = model_for(SAE_ARCH_JUMPRELU, 512, 24, 2);
    ref_op ops[] = {{1, SAE_STEER_CLAMP, 2.0}, {5, SAE_STEER_SCALE, -1.0}, {9, SAE_STEER_ADD, 0.75},
                    {23, SAE_STEER_CLAMP, 0.0}};
    check_plan(m, ops, 4, 2100, 3, 0, "long batch");
    check_plan(m, ops, 4, 2100, 4, 2, "long batch, blocks of 2");
    sae_model_free(m);
}
END_TEST

START_TEST(boundaries)
{
    /* d_in = 1, d_sae = 1, K >= d_sae. */
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++) {
        sae_model *m = tu_random_model((sae_arch)a, 1, 1, 9);
        ref_op op = {0, SAE_STEER_CLAMP, 1.5};
        check_plan(m, &op, 1, 4, 1, 0, "d_in = d_sae = 1");
        sae_model_free(m);
        m = tu_random_model((sae_arch)a, 3, 4, 10);
        if (a == SAE_ARCH_TOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 9));
        ref_op ops[] = {{0, SAE_STEER_SCALE, 3.0}, {2, SAE_STEER_CLAMP, -1.0}};
        check_plan(m, ops, 2, 6, 2, 0, "K >= d_sae");
        sae_model_free(m);
    }
    /* n = 0 touches nothing, even with x NULL; an empty plan leaves x bit-identical. */
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 8, 3);
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_apply(s, NULL, 0));
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, copy[8];
    memcpy(copy, x, sizeof x);
    ck_assert_ok(sae_steer_apply(s, x, 2));
    ck_assert_mem_eq(x, copy, sizeof x);
    sae_steer_free(s);
    sae_model_free(m);
}
END_TEST

START_TEST(later_op_replaces_earlier)
{
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++) {
        sae_model *m = model_for((sae_arch)a, 16, 30, 0);
        tu_weights w;
        tu_weights_get(m, &w);
        sae_steer *s;
        ck_assert_ok(sae_steer_new(&s, m));
        ck_assert_ok(sae_steer_clamp(s, 4, 10.0f));
        ck_assert_ok(sae_steer_add(s, 4, 1.0f));
        ck_assert_ok(sae_steer_scale(s, 4, 3.0f)); /* only this one remains on feature 4 */
        ck_assert_ok(sae_steer_add(s, 9, 2.0f));
        ck_assert_ok(sae_steer_clamp(s, 9, 0.0f)); /* ablation of 9 */
        ck_assert_uint_eq(sae_steer_count(s), 2);
        ref_op ops[] = {{4, SAE_STEER_SCALE, 3.0}, {9, SAE_STEER_CLAMP, 0.0}};
        float x[16 * 7];
        double want[16 * 7];
        tu_rng r = {8};
        tu_fill(&r, x, 16 * 7, -2, 2);
        for (size_t t = 0; t < 7; t++)
            ref_steer(&w, ops, 2, x + t * 16, want + t * 16);
        ck_assert_ok(sae_steer_apply(s, x, 7));
        tu_assert_close(x, want, 16 * 7, TOL, "replaced ops");
        sae_steer_free(s);
        tu_weights_free(&w);
        sae_model_free(m);
    }
}
END_TEST

START_TEST(matches_encode_edit_decode)
{
    /* The SAELens way with libsae's own calls: f = encode(x), error = x - decode(f), edit f,
     * x' = decode(f') + error. Ablating each token's strongest feature and clamping another. */
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++) {
        sae_model *m = model_for((sae_arch)a, 32, 64, 1);
        enum { N = 4, D_IN = 32, D_SAE = 64 };
        tu_rng r = {21};
        float x[N * D_IN], f[N * D_SAE], xh[N * D_IN], xh2[N * D_IN];
        tu_fill(&r, x, N * D_IN, -1, 1);
        ck_assert_ok(sae_encode(m, x, N, f));
        uint32_t strongest = 0;
        for (uint32_t i = 0; i < D_SAE; i++)
            if (f[i] > f[strongest])
                strongest = i;
        ck_assert_float_gt(f[strongest], 0.0f);
        const uint32_t other = (strongest + 5) % D_SAE;
        ck_assert_ok(sae_decode(m, f, N, xh));
        for (size_t t = 0; t < N; t++) {
            f[t * D_SAE + strongest] = 0.0f;
            f[t * D_SAE + other] = 2.5f;
        }
        ck_assert_ok(sae_decode(m, f, N, xh2));
        double want[N * D_IN];
        for (size_t j = 0; j < N * D_IN; j++)
            want[j] = (double)xh2[j] + ((double)x[j] - xh[j]);
        sae_steer *s;
        ck_assert_ok(sae_steer_new(&s, m));
        ck_assert_ok(sae_steer_clamp(s, strongest, 0.0f));
        ck_assert_ok(sae_steer_clamp(s, other, 2.5f));
        ck_assert_ok(sae_steer_apply(s, x, N));
        tu_assert_close(x, want, N * D_IN, 1e-4, sae_arch_name((sae_arch)a));
        sae_steer_free(s);
        sae_model_free(m);
    }
}
END_TEST

START_TEST(plan_listing_and_removal)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 50, 1);
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_uint_eq(sae_steer_count(s), 0);
    ck_assert_uint_eq(sae_steer_count(NULL), 0);
    const uint32_t order[] = {30, 2, 49, 0, 17, 2};
    for (size_t i = 0; i < 6; i++)
        ck_assert_ok(sae_steer_add(s, order[i], (float)i));
    ck_assert_ok(sae_steer_scale(s, 17, -4.0f));
    ck_assert_uint_eq(sae_steer_count(s), 5);
    const uint32_t sorted[] = {0, 2, 17, 30, 49};
    const sae_steer_op kinds[] = {SAE_STEER_ADD, SAE_STEER_ADD, SAE_STEER_SCALE, SAE_STEER_ADD,
                                  SAE_STEER_ADD};
    const float values[] = {3, 5, -4, 0, 2};
    for (size_t i = 0; i < 5; i++) {
        uint32_t f;
        sae_steer_op op;
        float v;
        ck_assert_ok(sae_steer_get_op(s, i, &f, &op, &v));
        ck_assert_uint_eq(f, sorted[i]);
        ck_assert_int_eq(op, kinds[i]);
        ck_assert_float_eq(v, values[i]);
    }
    ck_assert_ok(sae_steer_get_op(s, 0, NULL, NULL, NULL));
    ck_assert_sae(sae_steer_get_op(s, 5, NULL, NULL, NULL), SAE_ERANGE);
    ck_assert_sae(sae_steer_get_op(NULL, 0, NULL, NULL, NULL), SAE_EINVAL);
    ck_assert_ok(sae_steer_remove(s, 17));
    ck_assert_ok(sae_steer_remove(s, 18)); /* absent: nothing to do */
    ck_assert_uint_eq(sae_steer_count(s), 4);
    uint32_t f;
    ck_assert_ok(sae_steer_get_op(s, 2, &f, NULL, NULL));
    ck_assert_uint_eq(f, 30);
    ck_assert_sae(sae_steer_remove(s, 50), SAE_ERANGE);
    ck_assert_sae(sae_steer_remove(NULL, 1), SAE_EINVAL);
    ck_assert_ok(sae_steer_clear(s));
    ck_assert_uint_eq(sae_steer_count(s), 0);
    /* Many ops, inserted in descending order, stay sorted. */
    for (uint32_t i = 50; i-- > 0;)
        ck_assert_ok(sae_steer_clamp(s, i, (float)i));
    ck_assert_uint_eq(sae_steer_count(s), 50);
    for (size_t i = 0; i < 50; i++) {
        float v;
        ck_assert_ok(sae_steer_get_op(s, i, &f, NULL, &v));
        ck_assert_uint_eq(f, i);
        ck_assert_float_eq(v, (float)i);
    }
    sae_steer_free(s);
    sae_model_free(m);
}
END_TEST

START_TEST(errors_are_reported)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 10, 1);
    sae_steer *s = (sae_steer *)0x1;
    ck_assert_sae(sae_steer_new(NULL, m), SAE_EINVAL);
    ck_assert_sae(sae_steer_new(&s, NULL), SAE_EINVAL);
    ck_assert_ptr_null(s);
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_sae(sae_steer_clamp(s, 10, 1.0f), SAE_ERANGE);
    ck_assert_msg(strstr(sae_last_error(), "feature 10") != NULL, "message: %s", sae_last_error());
    ck_assert_sae(sae_steer_scale(s, UINT32_MAX, 1.0f), SAE_ERANGE);
    ck_assert_sae(sae_steer_add(s, 10, 1.0f), SAE_ERANGE);
    ck_assert_sae(sae_steer_clamp(s, 1, NAN), SAE_EINVAL);
    ck_assert_sae(sae_steer_scale(s, 1, INFINITY), SAE_EINVAL);
    ck_assert_sae(sae_steer_add(s, 1, -INFINITY), SAE_EINVAL);
    ck_assert_uint_eq(sae_steer_count(s), 0); /* nothing was added by a failed call */
    ck_assert_sae(sae_steer_clamp(NULL, 1, 1.0f), SAE_EINVAL);
    ck_assert_sae(sae_steer_scale(NULL, 1, 1.0f), SAE_EINVAL);
    ck_assert_sae(sae_steer_add(NULL, 1, 1.0f), SAE_EINVAL);
    ck_assert_sae(sae_steer_clear(NULL), SAE_EINVAL);
    float x[8] = {0};
    ck_assert_sae(sae_steer_apply(NULL, x, 2), SAE_EINVAL);
    ck_assert_sae(sae_steer_apply(s, NULL, 2), SAE_EINVAL);
    ck_assert_sae(sae_steer_apply(s, x, (size_t)INT32_MAX + 1), SAE_EINVAL);
    ck_assert_sae(sae_steer_apply(s, x, SIZE_MAX / 2), SAE_EINVAL);
    /* A NaN in x is refused before anything changes. */
    ck_assert_ok(sae_steer_clamp(s, 2, 5.0f));
    ck_assert_ok(sae_steer_add(s, 3, 5.0f));
    x[5] = NAN;
    x[0] = 1.0f;
    ck_assert_sae(sae_steer_apply(s, x, 2), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "x[1][1]") != NULL, "message: %s", sae_last_error());
    ck_assert_float_eq(x[0], 1.0f);
    x[5] = INFINITY;
    ck_assert_sae(sae_steer_apply(s, x, 2), SAE_EINVAL);
    ck_assert_float_eq(x[0], 1.0f);
    sae_steer_free(s);
    sae_steer_free(NULL);
    sae_model_free(m);
}
END_TEST

START_TEST(clamp_relative_uses_the_max)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 8, 12, 4);
    sae_stats *st;
    ck_assert_ok(sae_stats_new(&st, 12, 3));
    float f[2 * 12] = {0};
    f[5] = 2.0f;
    f[12 + 5] = 4.0f;
    f[12 + 7] = 0.5f;
    ck_assert_ok(sae_stats_update(st, f, 2, NULL));
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_clamp_relative(s, 5, 10.0f, st, NULL));
    float max[12] = {0};
    max[7] = 3.0f;
    ck_assert_ok(sae_steer_clamp_relative(s, 7, -2.0f, NULL, max));
    uint32_t feat;
    sae_steer_op op;
    float v;
    ck_assert_ok(sae_steer_get_op(s, 0, &feat, &op, &v));
    ck_assert_uint_eq(feat, 5);
    ck_assert_int_eq(op, SAE_STEER_CLAMP);
    ck_assert_float_eq(v, 40.0f);
    ck_assert_ok(sae_steer_get_op(s, 1, &feat, &op, &v));
    ck_assert_uint_eq(feat, 7);
    ck_assert_float_eq(v, -6.0f);
    /* Applying it is clamping to that value. */
    tu_weights w;
    tu_weights_get(m, &w);
    ref_op ops[] = {{5, SAE_STEER_CLAMP, 40.0}, {7, SAE_STEER_CLAMP, -6.0}};
    float x[8 * 3];
    double want[8 * 3];
    tu_rng r = {2};
    tu_fill(&r, x, 24, -1, 1);
    for (size_t t = 0; t < 3; t++)
        ref_steer(&w, ops, 2, x + 8 * t, want + 8 * t);
    ck_assert_ok(sae_steer_apply(s, x, 3));
    tu_assert_close(x, want, 24, TOL, "relative clamp");
    tu_weights_free(&w);

    ck_assert_sae(sae_steer_clamp_relative(s, 1, 10.0f, st, NULL), SAE_EINVAL); /* never fired */
    ck_assert_msg(strstr(sae_last_error(), "feature 1 ") != NULL, "message: %s", sae_last_error());
    ck_assert_sae(sae_steer_clamp_relative(s, 5, 10.0f, st, max), SAE_EINVAL);
    ck_assert_sae(sae_steer_clamp_relative(s, 5, 10.0f, NULL, NULL), SAE_EINVAL);
    ck_assert_sae(sae_steer_clamp_relative(s, 12, 10.0f, st, NULL), SAE_ERANGE);
    ck_assert_sae(sae_steer_clamp_relative(s, 5, NAN, st, NULL), SAE_EINVAL);
    ck_assert_sae(sae_steer_clamp_relative(s, 5, 1e38f, st, NULL), SAE_EINVAL); /* overflows */
    ck_assert_sae(sae_steer_clamp_relative(NULL, 5, 1.0f, st, NULL), SAE_EINVAL);
    max[7] = NAN;
    ck_assert_sae(sae_steer_clamp_relative(s, 7, 1.0f, NULL, max), SAE_EINVAL);
    max[7] = -1.0f;
    ck_assert_sae(sae_steer_clamp_relative(s, 7, 1.0f, NULL, max), SAE_EINVAL);
    sae_stats *other;
    ck_assert_ok(sae_stats_new(&other, 13, 3));
    ck_assert_sae(sae_steer_clamp_relative(s, 5, 1.0f, other, NULL), SAE_EINVAL);
    ck_assert_uint_eq(sae_steer_count(s), 2);
    sae_stats_free(other);
    sae_stats_free(st);
    sae_steer_free(s);
    sae_model_free(m);
}
END_TEST

START_TEST(add_only_plan_is_a_constant_vector)
{
    for (int variant = 0; variant < 3; variant++) {
        sae_model *m = model_for(SAE_ARCH_TOPK, 10, 20, variant);
        tu_weights w;
        tu_weights_get(m, &w);
        sae_steer *s;
        ck_assert_ok(sae_steer_new(&s, m));
        float v[10];
        double want[10] = {0};
        ck_assert_ok(sae_steer_vector(s, v)); /* empty plan: zeros */
        tu_assert_close(v, want, 10, 0, "empty plan");
        const uint32_t feats[] = {0, 7, 19};
        const float coeffs[] = {2.0f, -0.5f, 3.0f};
        for (size_t o = 0; o < 3; o++) {
            ck_assert_ok(sae_steer_add(s, feats[o], coeffs[o]));
            for (size_t j = 0; j < 10; j++)
                want[j] += coeffs[o] * (double)w.W_dec[feats[o] * 10 + j] / w.scale;
        }
        ck_assert_ok(sae_steer_vector(s, v));
        tu_assert_close(v, want, 10, TOL, "steering vector");
        /* Applying adds exactly that vector to each token, with no encode. */
        float x[30];
        tu_rng r = {4};
        tu_fill(&r, x, 30, -1, 1);
        double xw[30];
        for (size_t j = 0; j < 30; j++)
            xw[j] = x[j] + want[j % 10];
        ck_assert_ok(sae_steer_apply(s, x, 3));
        tu_assert_close(x, xw, 30, TOL, "add-only apply");
        ck_assert_ok(sae_steer_scale(s, 3, 2.0f));
        ck_assert_sae(sae_steer_vector(s, v), SAE_ESTATE);
        ck_assert_msg(strstr(sae_last_error(), "feature 3") != NULL, "message: %s",
                      sae_last_error());
        ck_assert_sae(sae_steer_vector(NULL, v), SAE_EINVAL);
        ck_assert_sae(sae_steer_vector(s, NULL), SAE_EINVAL);
        sae_steer_free(s);
        tu_weights_free(&w);
        sae_model_free(m);
    }
}
END_TEST

/* ---- an independent GGUF reader, written from ggml's docs/gguf.md ---------------------------- */

typedef struct {
    const unsigned char *p;
    size_t size, at;
} reader;

static uint64_t rd(reader *r, size_t bytes)
{
    ck_assert_msg(r->at + bytes <= r->size, "GGUF file ends at %zu, reading %zu bytes at %zu",
                  r->size, bytes, r->at);
    uint64_t v = 0;
    for (size_t i = 0; i < bytes; i++)
        v |= (uint64_t)r->p[r->at + i] << (8 * i);
    r->at += bytes;
    return v;
}

/* Reads a GGUF string and checks it equals want. */
static void rd_str_eq(reader *r, const char *want)
{
    uint64_t len = rd(r, 8);
    ck_assert_uint_eq(len, strlen(want));
    ck_assert_msg(r->at + len <= r->size, "string past the end");
    ck_assert_msg(memcmp(r->p + r->at, want, len) == 0, "string at %zu is '%.*s', want '%s'", r->at,
                  (int)len, (const char *)r->p + r->at, want);
    r->at += len;
}

/* Checks a whole control-vector file: header, the four metadata pairs, one tensor info per layer,
 * alignment, padding, data, and size. */
static void check_cvec_file(const char *path, const float *data, size_t n_embd, size_t n_layer,
                            const char *hint)
{
    size_t size;
    unsigned char *file = tu_read_file(path, &size);
    reader r = {file, size, 0};
    ck_assert_msg(memcmp(file, "GGUF", 4) == 0, "magic");
    r.at = 4;
    ck_assert_uint_eq(rd(&r, 4), 3);            /* version */
    ck_assert_uint_eq(rd(&r, 8), n_layer - 1);  /* tensor count */
    ck_assert_uint_eq(rd(&r, 8), 4);            /* metadata count */
    rd_str_eq(&r, "general.architecture");
    ck_assert_uint_eq(rd(&r, 4), 8); /* string */
    rd_str_eq(&r, "controlvector");
    rd_str_eq(&r, "general.alignment");
    ck_assert_uint_eq(rd(&r, 4), 4); /* uint32 */
    ck_assert_uint_eq(rd(&r, 4), 32);
    rd_str_eq(&r, "controlvector.model_hint");
    ck_assert_uint_eq(rd(&r, 4), 8);
    rd_str_eq(&r, hint);
    rd_str_eq(&r, "controlvector.layer_count");
    ck_assert_uint_eq(rd(&r, 4), 5); /* int32 */
    ck_assert_uint_eq(rd(&r, 4), n_layer - 1);
    const size_t tensor_bytes = (n_embd * 4 + 31) / 32 * 32;
    for (size_t l = 1; l < n_layer; l++) {
        char name[32];
        snprintf(name, sizeof name, "direction.%zu", l);
        rd_str_eq(&r, name);
        ck_assert_uint_eq(rd(&r, 4), 1);      /* n_dims */
        ck_assert_uint_eq(rd(&r, 8), n_embd); /* ne[0] */
        ck_assert_uint_eq(rd(&r, 4), 0);      /* GGML_TYPE_F32 */
        uint64_t offset = rd(&r, 8);
        ck_assert_uint_eq(offset % 32, 0);
        ck_assert_uint_eq(offset, (l - 1) * tensor_bytes); /* packed in order, as ggml requires */
    }
    const size_t data_start = (r.at + 31) / 32 * 32;
    for (size_t i = r.at; i < data_start; i++)
        ck_assert_uint_eq(file[i], 0);
    ck_assert_uint_eq(size, data_start + (n_layer - 1) * tensor_bytes);
    for (size_t l = 0; l + 1 < n_layer; l++) {
        r.at = data_start + l * tensor_bytes;
        for (size_t j = 0; j < n_embd; j++) {
            uint32_t bits = (uint32_t)rd(&r, 4);
            float v;
            memcpy(&v, &bits, 4);
            ck_assert_msg(v == data[l * n_embd + j], "direction.%zu[%zu] = %g, want %g", l + 1, j,
                          (double)v, (double)data[l * n_embd + j]);
        }
        for (size_t i = r.at; i < data_start + (l + 1) * tensor_bytes; i++)
            ck_assert_uint_eq(file[i], 0);
    }
    free(file);
}

START_TEST(cvec_file_reads_back)
{
    /* n_embd 5: 20 bytes per tensor, so each is padded; n_embd 8: exactly one alignment unit. */
    const size_t embds[] = {5, 8, 1};
    const size_t layers[] = {4, 2, 3};
    for (size_t c = 0; c < 3; c++) {
        const size_t n_embd = embds[c], n_layer = layers[c];
        float *data = tu_malloc(n_embd * (n_layer - 1) * sizeof *data);
        tu_rng r = {c};
        tu_fill(&r, data, n_embd * (n_layer - 1), -3, 3);
        char *path = tu_tmp_path("direct.gguf");
        ck_assert_ok(sae_cvec_write(path, data, n_embd, n_layer, "llama"));
        check_cvec_file(path, data, n_embd, n_layer, "llama");
        ck_assert_ok(sae_cvec_write(path, data, n_embd, n_layer, NULL));
        check_cvec_file(path, data, n_embd, n_layer, "");
        free(path);
        free(data);
    }
}
END_TEST

START_TEST(plan_writes_cvec_at_its_layer)
{
    sae_model *m = model_for(SAE_ARCH_RELU, 6, 9, 2);
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_add(s, 2, 4.0f));
    ck_assert_ok(sae_steer_add(s, 8, -1.0f));
    float v[6];
    ck_assert_ok(sae_steer_vector(s, v));
    const size_t n_layer = 5, layer = 3;
    float want[6 * 4] = {0};
    memcpy(want + 6 * (layer - 1), v, sizeof v);
    char *path = tu_tmp_path("plan.gguf");
    ck_assert_ok(sae_steer_write_cvec(s, path, layer, n_layer, "gemma2"));
    check_cvec_file(path, want, 6, n_layer, "gemma2");
    /* The last steerable layer is n_layer - 1. */
    memset(want, 0, sizeof want);
    memcpy(want + 6 * 3, v, sizeof v);
    ck_assert_ok(sae_steer_write_cvec(s, path, 4, n_layer, "gemma2"));
    check_cvec_file(path, want, 6, n_layer, "gemma2");
    ck_assert_sae(sae_steer_write_cvec(s, path, 0, n_layer, "x"), SAE_ERANGE);
    ck_assert_sae(sae_steer_write_cvec(s, path, 5, n_layer, "x"), SAE_ERANGE);
    ck_assert_sae(sae_steer_write_cvec(s, path, 1, 1, "x"), SAE_ERANGE);
    ck_assert_sae(sae_steer_write_cvec(NULL, path, 1, 3, "x"), SAE_EINVAL);
    ck_assert_sae(sae_steer_write_cvec(s, NULL, 1, 3, "x"), SAE_EINVAL);
    ck_assert_ok(sae_steer_clamp(s, 0, 1.0f));
    ck_assert_sae(sae_steer_write_cvec(s, path, 1, 3, "x"), SAE_ESTATE);
    check_cvec_file(path, want, 6, n_layer, "gemma2"); /* a failed write left the file alone */
    free(path);
    sae_steer_free(s);
    sae_model_free(m);
}
END_TEST

START_TEST(cvec_write_errors)
{
    float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    char *path = tu_tmp_path("err.gguf");
    ck_assert_sae(sae_cvec_write(NULL, data, 4, 3, "x"), SAE_EINVAL);
    ck_assert_sae(sae_cvec_write(path, NULL, 4, 3, "x"), SAE_EINVAL);
    ck_assert_sae(sae_cvec_write(path, data, 0, 3, "x"), SAE_EINVAL);
    ck_assert_sae(sae_cvec_write(path, data, 4, 1, "x"), SAE_EINVAL);
    ck_assert_sae(sae_cvec_write(path, data, 4, 0, "x"), SAE_EINVAL);
    ck_assert_sae(sae_cvec_write(path, data, SIZE_MAX / 2, 3, "x"), SAE_EINVAL);
    data[6] = NAN;
    ck_assert_sae(sae_cvec_write(path, data, 4, 3, "x"), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "data[1][2]") != NULL, "message: %s", sae_last_error());
    data[6] = 7;
    FILE *probe = fopen(path, "rb");
    ck_assert_ptr_null(probe); /* nothing was written */
    ck_assert_sae(sae_cvec_write("/nonexistent-folder/x.gguf", data, 4, 3, "x"), SAE_EIO);
    free(path);
}
END_TEST

static Suite *steer_suite(void)
{
    Suite *s = suite_create("steer");
    TCase *tc = tcase_create("steer");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, each_op_alone_matches_reference, 0, 12);
    tcase_add_loop_test(tc, mixed_plans_match_reference, 0, 12);
    tcase_add_test(tc, long_batches_span_several_passes);
    tcase_add_test(tc, boundaries);
    tcase_add_test(tc, later_op_replaces_earlier);
    tcase_add_test(tc, matches_encode_edit_decode);
    tcase_add_test(tc, plan_listing_and_removal);
    tcase_add_test(tc, errors_are_reported);
    tcase_add_test(tc, clamp_relative_uses_the_max);
    tcase_add_test(tc, add_only_plan_is_a_constant_vector);
    tcase_add_test(tc, cvec_file_reads_back);
    tcase_add_test(tc, plan_writes_cvec_at_its_layer);
    tcase_add_test(tc, cvec_write_errors);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(steer_suite)
