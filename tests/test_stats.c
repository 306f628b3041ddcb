/* Feature statistics (counts, sums, maxima, top examples, merging) against brute force over every
 * token, and decoder-direction neighbours against float64 cosines. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double value;
    uint64_t id;
} example;

static int stronger_first(const void *pa, const void *pb)
{
    const example *a = pa, *b = pb;
    if (a->value != b->value)
        return a->value > b->value ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

/* Checks st against brute force over dense codes f [n][d_sae] with ids. */
static void check_against_brute_force(const sae_stats *st, const float *f, size_t n, size_t d_sae,
                                      const uint64_t *ids, size_t top_n)
{
    ck_assert_uint_eq(sae_stats_tokens(st), n);
    uint64_t *count = tu_malloc(d_sae * sizeof *count);
    double *sum = tu_malloc(d_sae * sizeof *sum);
    float *max = tu_malloc(d_sae * sizeof *max);
    example *all = tu_malloc((n + 1) * sizeof *all);
    float *tv = tu_malloc((top_n + 1) * sizeof *tv);
    uint64_t *ti = tu_malloc((top_n + 1) * sizeof *ti);
    ck_assert_ok(sae_stats_counts(st, count));
    ck_assert_ok(sae_stats_sums(st, sum));
    ck_assert_ok(sae_stats_max(st, max));
    for (size_t i = 0; i < d_sae; i++) {
        size_t fired = 0;
        double s = 0, mx = 0;
        for (size_t t = 0; t < n; t++) {
            float v = f[t * d_sae + i];
            if (v > 0) {
                all[fired++] = (example){v, ids[t]};
                s += v;
                mx = v > mx ? v : mx;
            }
        }
        ck_assert_uint_eq(count[i], fired);
        ck_assert_double_eq_tol(sum[i], s, 1e-9 * (1 + fabs(s)));
        ck_assert_float_eq(max[i], (float)mx);
        qsort(all, fired, sizeof *all, stronger_first);
        size_t got;
        ck_assert_ok(sae_stats_top(st, (uint32_t)i, tv, ti, &got));
        ck_assert_uint_eq(got, fired < top_n ? fired : top_n);
        for (size_t j = 0; j < got; j++) {
            ck_assert_msg(tv[j] == (float)all[j].value && ti[j] == all[j].id,
                          "feature %zu top %zu: (%g, %llu), want (%g, %llu)", i, j, (double)tv[j],
                          (unsigned long long)ti[j], all[j].value, (unsigned long long)all[j].id);
        }
    }
    free(count);
    free(sum);
    free(max);
    free(all);
    free(tv);
    free(ti);
}

/* Sparse-ish random codes: about a third nonzero, some negative, and repeated values for ties. */
static void random_codes(float *f, size_t count, uint64_t seed)
{
    tu_rng r = {seed};
    for (size_t j = 0; j < count; j++) {
        float u = tu_uniform(&r, 0, 1);
        f[j] = u < 0.6f ? 0.0f : u < 0.7f ? -u : u < 0.8f ? 0.5f : tu_uniform(&r, 0, 4);
    }
}

START_TEST(dense_update_matches_brute_force)
{
    enum { N = 300, D = 17, TOP = 5 };
    float *f = tu_malloc(N * D * sizeof *f);
    uint64_t ids[N];
    random_codes(f, N * D, 1);
    for (size_t t = 0; t < N; t++)
        ids[t] = (t * 7919) % 1000; /* not in order, some equal */
    sae_stats *st;
    ck_assert_ok(sae_stats_new(&st, D, TOP));
    ck_assert_uint_eq(sae_stats_d_sae(st), D);
    ck_assert_uint_eq(sae_stats_top_n(st), TOP);
    /* In uneven batches, including an empty one. */
    ck_assert_ok(sae_stats_update(st, f, 0, ids));
    ck_assert_ok(sae_stats_update(st, f, 1, ids));
    ck_assert_ok(sae_stats_update(st, f + D, 150, ids + 1));
    ck_assert_ok(sae_stats_update(st, f + 151 * D, N - 151, ids + 151));
    check_against_brute_force(st, f, N, D, ids, TOP);
    sae_stats_free(st);
    free(f);
}
END_TEST

START_TEST(null_ids_number_tokens_by_position)
{
    enum { N = 40, D = 6, TOP = 3 };
    float f[N * D];
    uint64_t ids[N];
    random_codes(f, N * D, 2);
    for (size_t t = 0; t < N; t++)
        ids[t] = t;
    sae_stats *st;
    ck_assert_ok(sae_stats_new(&st, D, TOP));
    ck_assert_ok(sae_stats_update(st, f, 25, NULL));
    ck_assert_ok(sae_stats_update(st, f + 25 * D, N - 25, NULL));
    check_against_brute_force(st, f, N, D, ids, TOP);
    sae_stats_free(st);
}
END_TEST

START_TEST(sparse_update_equals_dense)
{
    /* Codes from a real encode, in both layouts. */
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++) {
        enum { N = 50, D_IN = 12, D_SAE = 30, K = 30, TOP = 4 };
        sae_model *m = tu_random_model((sae_arch)a, D_IN, D_SAE, 3);
        if (a == SAE_ARCH_TOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 5));
        float x[N * D_IN], f[N * D_SAE], val[N * K];
        uint32_t idx[N * K], count[N];
        uint64_t ids[N];
        tu_rng r = {4};
        tu_fill(&r, x, N * D_IN, -1, 1);
        for (size_t t = 0; t < N; t++)
            ids[t] = 1000 - t;
        ck_assert_ok(sae_encode(m, x, N, f));
        ck_assert_ok(sae_encode_sparse(m, x, N, K, idx, val, count));
        sae_stats *st;
        ck_assert_ok(sae_stats_new(&st, D_SAE, TOP));
        ck_assert_ok(sae_stats_update_sparse(st, idx, val, count, K, N, ids));
        check_against_brute_force(st, f, N, D_SAE, ids, TOP);
        sae_stats_free(st);
        sae_model_free(m);
    }
}
END_TEST

START_TEST(merge_equals_one_pass)
{
    enum { N = 200, D = 9, TOP = 6 };
    float *f = tu_malloc(N * D * sizeof *f);
    uint64_t ids[N];
    random_codes(f, N * D, 5);
    for (size_t t = 0; t < N; t++)
        ids[t] = (t * 31) % 97;
    sae_stats *a, *b, *c;
    ck_assert_ok(sae_stats_new(&a, D, TOP));
    ck_assert_ok(sae_stats_new(&b, D, TOP));
    ck_assert_ok(sae_stats_new(&c, D, TOP));
    ck_assert_ok(sae_stats_update(a, f, 70, ids));
    ck_assert_ok(sae_stats_update(b, f + 70 * D, 100, ids + 70));
    ck_assert_ok(sae_stats_update(c, f + 170 * D, N - 170, ids + 170));
    ck_assert_ok(sae_stats_merge(b, c));
    ck_assert_ok(sae_stats_merge(a, b));
    check_against_brute_force(a, f, N, D, ids, TOP);
    sae_stats_free(a);
    sae_stats_free(b);
    sae_stats_free(c);
    free(f);
}
END_TEST

START_TEST(top_n_zero_and_larger_than_the_data)
{
    enum { N = 10, D = 4 };
    float f[N * D];
    uint64_t ids[N];
    random_codes(f, N * D, 6);
    for (size_t t = 0; t < N; t++)
        ids[t] = t * 3;
    sae_stats *none, *big;
    ck_assert_ok(sae_stats_new(&none, D, 0));
    ck_assert_ok(sae_stats_new(&big, D, 1000));
    ck_assert_ok(sae_stats_update(none, f, N, NULL));
    ck_assert_ok(sae_stats_update(big, f, N, ids));
    check_against_brute_force(none, f, N, D, ids, 0);
    check_against_brute_force(big, f, N, D, ids, 1000);
    size_t got = 99;
    ck_assert_ok(sae_stats_top(none, 0, NULL, NULL, &got));
    ck_assert_uint_eq(got, 0);
    sae_stats_free(none);
    sae_stats_free(big);
}
END_TEST

START_TEST(ties_keep_the_smaller_id)
{
    sae_stats *st;
    ck_assert_ok(sae_stats_new(&st, 1, 2));
    const float f[5] = {1.0f, 1.0f, 1.0f, 2.0f, 1.0f};
    const uint64_t ids[5] = {50, 10, 30, 99, 20};
    ck_assert_ok(sae_stats_update(st, f, 5, ids));
    float v[2];
    uint64_t id[2];
    size_t got;
    ck_assert_ok(sae_stats_top(st, 0, v, id, &got));
    ck_assert_uint_eq(got, 2);
    ck_assert_float_eq(v[0], 2.0f);
    ck_assert_uint_eq(id[0], 99);
    ck_assert_float_eq(v[1], 1.0f);
    ck_assert_uint_eq(id[1], 10);
    ck_assert_ok(sae_stats_top(st, 0, NULL, id, &got)); /* values not wanted */
    ck_assert_uint_eq(id[1], 10);
    sae_stats_free(st);
}
END_TEST

START_TEST(stats_errors_leave_state_unchanged)
{
    sae_stats *st = (sae_stats *)0x1;
    ck_assert_sae(sae_stats_new(NULL, 4, 2), SAE_EINVAL);
    ck_assert_sae(sae_stats_new(&st, 0, 2), SAE_EINVAL);
    ck_assert_ptr_null(st);
    ck_assert_sae(sae_stats_new(&st, (size_t)UINT32_MAX + 1, 2), SAE_EINVAL);
    ck_assert_sae(sae_stats_new(&st, SIZE_MAX / 8, SIZE_MAX / 8), SAE_EINVAL);
    ck_assert_sae(sae_stats_new(&st, (size_t)1 << 31, (size_t)1 << 31), SAE_ENOMEM); /* 2^62 * 12 bytes */
    ck_assert_ok(sae_stats_new(&st, 4, 2));
    float f[8] = {1, 0, 2, 0, 0, 3, NAN, 1};
    ck_assert_sae(sae_stats_update(st, f, 2, NULL), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "f[1][2]") != NULL, "message: %s", sae_last_error());
    ck_assert_sae(sae_stats_update(st, NULL, 2, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_update(NULL, f, 2, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_update(st, f, SIZE_MAX / 2, NULL), SAE_EINVAL);

    uint32_t idx[4] = {0, 3, 1, 1};
    float val[4] = {1, 2, 3, 4};
    uint32_t count[2] = {2, 2};
    ck_assert_sae(sae_stats_update_sparse(st, idx, val, count, 2, 2, NULL), SAE_EINVAL); /* 1 twice */
    ck_assert_msg(strstr(sae_last_error(), "twice") != NULL, "message: %s", sae_last_error());
    idx[3] = 4;
    ck_assert_sae(sae_stats_update_sparse(st, idx, val, count, 2, 2, NULL), SAE_ERANGE);
    idx[3] = 2;
    count[1] = 3;
    ck_assert_sae(sae_stats_update_sparse(st, idx, val, count, 2, 2, NULL), SAE_EINVAL);
    count[1] = 2;
    val[2] = INFINITY;
    ck_assert_sae(sae_stats_update_sparse(st, idx, val, count, 2, 2, NULL), SAE_EINVAL);
    val[2] = 3;
    ck_assert_sae(sae_stats_update_sparse(st, idx, val, count, 0, 2, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_update_sparse(st, NULL, val, count, 2, 2, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_update_sparse(st, idx, NULL, count, 2, 2, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_update_sparse(st, idx, val, NULL, 2, 2, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_update_sparse(NULL, idx, val, count, 2, 2, NULL), SAE_EINVAL);
    /* None of it counted. */
    ck_assert_uint_eq(sae_stats_tokens(st), 0);
    uint64_t c[4];
    ck_assert_ok(sae_stats_counts(st, c));
    for (size_t i = 0; i < 4; i++)
        ck_assert_uint_eq(c[i], 0);
    /* The same feature in two different tokens is fine. */
    ck_assert_ok(sae_stats_update_sparse(st, idx, val, count, 2, 2, NULL));
    ck_assert_uint_eq(sae_stats_tokens(st), 2);

    sae_stats *other;
    ck_assert_ok(sae_stats_new(&other, 4, 3));
    ck_assert_sae(sae_stats_merge(st, other), SAE_EINVAL);
    ck_assert_sae(sae_stats_merge(st, st), SAE_EINVAL);
    ck_assert_sae(sae_stats_merge(NULL, st), SAE_EINVAL);
    ck_assert_sae(sae_stats_merge(st, NULL), SAE_EINVAL);
    sae_stats_free(other);
    ck_assert_ok(sae_stats_new(&other, 5, 2));
    ck_assert_sae(sae_stats_merge(st, other), SAE_EINVAL);
    sae_stats_free(other);

    size_t got;
    ck_assert_sae(sae_stats_top(st, 4, NULL, NULL, &got), SAE_ERANGE);
    ck_assert_sae(sae_stats_top(st, 0, NULL, NULL, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_top(NULL, 0, NULL, NULL, &got), SAE_EINVAL);
    ck_assert_sae(sae_stats_counts(st, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_sums(NULL, NULL), SAE_EINVAL);
    ck_assert_sae(sae_stats_max(st, NULL), SAE_EINVAL);
    ck_assert_uint_eq(sae_stats_d_sae(NULL), 0);
    ck_assert_uint_eq(sae_stats_top_n(NULL), 0);
    ck_assert_uint_eq(sae_stats_tokens(NULL), 0);
    sae_stats_free(st);
    sae_stats_free(NULL);
}
END_TEST

/* ---- neighbours ---------------------------------------------------------------------------- */

static void check_neighbors(sae_model *m, uint32_t feature, size_t k)
{
    tu_weights w;
    tu_weights_get(m, &w);
    const size_t d_in = w.d_in, d_sae = w.d_sae;
    example *all = tu_malloc(d_sae * sizeof *all);
    double nf = 0;
    for (size_t j = 0; j < d_in; j++)
        nf += (double)w.W_dec[feature * d_in + j] * w.W_dec[feature * d_in + j];
    size_t n = 0;
    for (size_t i = 0; i < d_sae; i++) {
        if (i == feature)
            continue;
        double dot = 0, ni = 0;
        for (size_t j = 0; j < d_in; j++) {
            dot += (double)w.W_dec[i * d_in + j] * w.W_dec[feature * d_in + j];
            ni += (double)w.W_dec[i * d_in + j] * w.W_dec[i * d_in + j];
        }
        all[n++] = (example){ni == 0 || nf == 0 ? 0 : dot / sqrt(ni * nf), i};
    }
    qsort(all, n, sizeof *all, stronger_first);
    uint32_t *idx = tu_malloc((k + 1) * sizeof *idx);
    float *cos = tu_malloc((k + 1) * sizeof *cos);
    ck_assert_ok(sae_feature_neighbors(m, feature, k, idx, cos));
    for (size_t j = 0; j < k; j++) {
        ck_assert_msg(idx[j] != feature, "the feature itself was returned");
        ck_assert_double_eq_tol(cos[j], all[j].value, 1e-5);
        /* The order may differ from float64 only between cosines closer than rounding. */
        if (idx[j] != all[j].id)
            ck_assert_msg((j + 1 < n && fabs(all[j].value - all[j + 1].value) < 1e-6) ||
                              (j > 0 && fabs(all[j].value - all[j - 1].value) < 1e-6),
                          "neighbour %zu is %u, want %llu", j, idx[j],
                          (unsigned long long)all[j].id);
    }
    free(idx);
    free(cos);
    free(all);
    tu_weights_free(&w);
}

START_TEST(neighbors_match_float64_cosines)
{
    sae_model *m = tu_random_model(SAE_ARCH_TOPK, 16, 200, 8);
    check_neighbors(m, 0, 10);
    check_neighbors(m, 123, 1);
    check_neighbors(m, 199, 199); /* every other feature */
    check_neighbors(m, 57, 50);
    sae_model_free(m);
}
END_TEST

START_TEST(neighbors_ties_and_zero_rows)
{
    /* Rows: 0 = e0, 1 = 2*e0 (cos 1), 2 = zero, 3 = -e0 (cos -1), 4 = e0 again (cos 1), 5 = e1. */
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, 2, 6));
    const float W_dec[12] = {1, 0, 2, 0, 0, 0, -1, 0, 1, 0, 0, 1};
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, W_dec));
    uint32_t idx[5];
    float cos[5];
    ck_assert_ok(sae_feature_neighbors(m, 0, 5, idx, cos));
    const uint32_t want[5] = {1, 4, 2, 5, 3}; /* ties (1, 4) and (2, 5) by lower index */
    const float want_cos[5] = {1, 1, 0, 0, -1};
    for (size_t j = 0; j < 5; j++) {
        ck_assert_uint_eq(idx[j], want[j]);
        ck_assert_float_eq_tol(cos[j], want_cos[j], 1e-6f);
    }
    /* The zero row: cosine 0 with everything, so neighbours by index. */
    ck_assert_ok(sae_feature_neighbors(m, 2, 3, idx, NULL));
    ck_assert_uint_eq(idx[0], 0);
    ck_assert_uint_eq(idx[1], 1);
    ck_assert_uint_eq(idx[2], 3);
    /* Huge weights overflow a float dot product; the cosine is still right. */
    const float big[12] = {3e20f, 0, 3e20f, 3e20f, 0, 1, -3e20f, 0, 1, 0, 0, 1};
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, big));
    ck_assert_ok(sae_feature_neighbors(m, 0, 1, idx, cos));
    ck_assert_uint_eq(idx[0], 4);
    ck_assert_float_eq_tol(cos[0], 1.0f, 1e-6f);
    sae_model_free(m);
}
END_TEST

START_TEST(neighbors_errors)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 3, 5, 1);
    uint32_t idx[5];
    ck_assert_sae(sae_feature_neighbors(m, 5, 1, idx, NULL), SAE_ERANGE);
    ck_assert_sae(sae_feature_neighbors(m, 0, 5, idx, NULL), SAE_ERANGE);
    ck_assert_msg(strstr(sae_last_error(), "only 4 other") != NULL, "message: %s",
                  sae_last_error());
    ck_assert_sae(sae_feature_neighbors(NULL, 0, 1, idx, NULL), SAE_EINVAL);
    ck_assert_sae(sae_feature_neighbors(m, 0, 1, NULL, NULL), SAE_EINVAL);
    ck_assert_ok(sae_feature_neighbors(m, 0, 0, NULL, NULL));
    sae_model_free(m);
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, 3, 1));
    ck_assert_ok(sae_feature_neighbors(m, 0, 0, idx, NULL));
    ck_assert_sae(sae_feature_neighbors(m, 0, 1, idx, NULL), SAE_ERANGE);
    sae_model_free(m);
}
END_TEST

static Suite *stats_suite(void)
{
    Suite *s = suite_create("stats");
    TCase *tc = tcase_create("stats");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, dense_update_matches_brute_force);
    tcase_add_test(tc, null_ids_number_tokens_by_position);
    tcase_add_test(tc, sparse_update_equals_dense);
    tcase_add_test(tc, merge_equals_one_pass);
    tcase_add_test(tc, top_n_zero_and_larger_than_the_data);
    tcase_add_test(tc, ties_keep_the_smaller_id);
    tcase_add_test(tc, stats_errors_leave_state_unchanged);
    tcase_add_test(tc, neighbors_match_float64_cosines);
    tcase_add_test(tc, neighbors_ties_and_zero_rows);
    tcase_add_test(tc, neighbors_errors);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(stats_suite)
