/* Encoding: dense and sparse codes of every architecture and parameter setting against float64
 * loops, TopK's selection and ties, boundaries and errors. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Shapes from the smallest (d_in = 1) to one with several GEMM blocks' worth of features. */
static const struct {
    size_t d_in, d_sae, n;
} shapes[] = {{1, 1, 1}, {1, 7, 3}, {5, 3, 2}, {16, 64, 1}, {16, 64, 33}, {40, 300, 70}};
#define N_SHAPES (sizeof shapes / sizeof shapes[0])

/* The parameter settings every architecture is checked under. */
typedef struct {
    int apply_b_dec;
    double scale;
    size_t k;
    double batch_threshold;
} setting;
static const setting settings[] = {
    {1, 1.0, 4, 0.0}, {0, 1.0, 1, 0.1}, {1, 0.37, 3, 0.05}, {0, 2.5, 1000, -0.2},
};
#define N_SETTINGS (sizeof settings / sizeof settings[0])

static sae_model *configured_model(sae_arch arch, size_t d_in, size_t d_sae, const setting *s,
                                   uint64_t seed)
{
    sae_model *m = tu_random_model(arch, d_in, d_sae, seed);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, s->apply_b_dec));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, s->scale));
    if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, (double)s->k));
    if (arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, s->batch_threshold));
    return m;
}

static float *random_x(size_t n, size_t d_in, uint64_t seed)
{
    float *x = tu_malloc(n * d_in * sizeof(float));
    tu_rng r = {seed};
    tu_fill(&r, x, n * d_in, -2.0f, 2.0f);
    return x;
}

/* _i is the architecture (a loop test over all four). */
START_TEST(dense_encode_matches_float64_loops)
{
    sae_arch arch = (sae_arch)_i;
    for (size_t si = 0; si < N_SHAPES; si++) {
        for (size_t pi = 0; pi < N_SETTINGS; pi++) {
            size_t d_in = shapes[si].d_in, d_sae = shapes[si].d_sae, n = shapes[si].n;
            sae_model *m = configured_model(arch, d_in, d_sae, &settings[pi], 100 + si);
            float *x = random_x(n, d_in, 7 + pi);
            float *f = tu_malloc(n * d_sae * sizeof(float));
            double *want = tu_malloc(d_sae * sizeof(double));
            ck_assert_ok(sae_encode(m, x, n, f));
            tu_weights w;
            tu_weights_get(m, &w);
            for (size_t t = 0; t < n; t++) {
                tu_ref_encode(&w, x + t * d_in, want);
                tu_assert_close(f + t * d_sae, want, d_sae, 1e-4, "f");
            }
            tu_weights_free(&w);
            free(x);
            free(f);
            free(want);
            sae_model_free(m);
        }
    }
}
END_TEST

START_TEST(sparse_encode_lists_largest_nonzeros_first)
{
    sae_arch arch = (sae_arch)_i;
    const size_t ks[] = {1, 3, 8, 500};
    for (size_t si = 0; si < N_SHAPES; si++) {
        for (size_t ki = 0; ki < 4; ki++) {
            size_t d_in = shapes[si].d_in, d_sae = shapes[si].d_sae, n = shapes[si].n, k = ks[ki];
            sae_model *m = configured_model(arch, d_in, d_sae, &settings[ki % N_SETTINGS], 3 + si);
            float *x = random_x(n, d_in, 11 + ki);
            float *f = tu_malloc(n * d_sae * sizeof(float));
            uint32_t *idx = tu_malloc(n * k * sizeof(uint32_t)), *count = tu_malloc(n * 4);
            float *val = tu_malloc(n * k * sizeof(float));
            memset(idx, 0xff, n * k * sizeof(uint32_t));
            ck_assert_ok(sae_encode(m, x, n, f));
            ck_assert_ok(sae_encode_sparse(m, x, n, k, idx, val, count));
            for (size_t t = 0; t < n; t++) {
                const float *row = f + t * d_sae;
                size_t nonzero = 0;
                for (size_t i = 0; i < d_sae; i++)
                    nonzero += row[i] != 0.0f;
                ck_assert_uint_eq(count[t], nonzero < k ? nonzero : k);
                for (size_t j = 0; j < count[t]; j++) {
                    uint32_t i = idx[t * k + j];
                    ck_assert_uint_lt(i, d_sae);
                    ck_assert_float_eq(val[t * k + j], row[i]);
                    ck_assert_float_gt(val[t * k + j], 0.0f);
                    if (j > 0) { /* largest first, ties by index */
                        float prev = val[t * k + j - 1];
                        ck_assert(prev > val[t * k + j] ||
                                  (prev == val[t * k + j] && idx[t * k + j - 1] < i));
                    }
                }
                /* Nothing left out is larger than the smallest listed value. */
                if (count[t] == k) {
                    float smallest = val[t * k + k - 1];
                    size_t larger = 0;
                    for (size_t i = 0; i < d_sae; i++)
                        larger += row[i] > smallest;
                    ck_assert_uint_le(larger, k);
                }
                for (size_t j = count[t]; j < k; j++) {
                    ck_assert_uint_eq(idx[t * k + j], 0);
                    ck_assert_float_eq(val[t * k + j], 0.0f);
                }
            }
            free(x);
            free(f);
            free(idx);
            free(val);
            free(count);
            sae_model_free(m);
        }
    }
}
END_TEST

/* With every pre-activation equal, TopK must keep the K lowest indices. */
START_TEST(topk_ties_go_to_the_lower_index)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 2, 10));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
    float b_enc[10];
    for (int i = 0; i < 10; i++)
        b_enc[i] = 1.0f;
    b_enc[7] = 2.0f; /* one clear winner, then a tie among the rest */
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, b_enc));
    float x[2] = {0, 0}, f[10];
    ck_assert_ok(sae_encode(m, x, 1, f));
    const float want[10] = {1, 1, 0, 0, 0, 0, 0, 2, 0, 0};
    ck_assert_mem_eq(f, want, sizeof want);
    uint32_t idx[4], count;
    float val[4];
    ck_assert_ok(sae_encode_sparse(m, x, 1, 4, idx, val, &count));
    ck_assert_uint_eq(count, 3);
    ck_assert_uint_eq(idx[0], 7);
    ck_assert_uint_eq(idx[1], 0);
    ck_assert_uint_eq(idx[2], 1);
    sae_model_free(m);
}
END_TEST

/* TopK keeps the K largest pre-activations, then rectifies: a negative one among them is 0. */
START_TEST(topk_selects_before_rectifying)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 1, 4));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    const float b_enc[4] = {-1.0f, 3.0f, -2.0f, -0.5f};
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, b_enc));
    float x = 0, f[4];
    ck_assert_ok(sae_encode(m, &x, 1, f));
    const float want[4] = {0, 3, 0, 0};
    ck_assert_mem_eq(f, want, sizeof want);
    sae_model_free(m);
}
END_TEST

/* JumpReLU's comparison is strict, and BatchTopK's threshold is one number for all features. */
START_TEST(thresholds_are_strict)
{
    sae_model *j, *b;
    ck_assert_ok(sae_model_new(&j, SAE_ARCH_JUMPRELU, 1, 3));
    ck_assert_ok(sae_model_new(&b, SAE_ARCH_BATCHTOPK, 1, 3));
    const float b_enc[3] = {0.5f, 0.25f, 1.0f}, th[3] = {0.5f, 0.125f, 2.0f};
    ck_assert_ok(sae_model_set_tensor(j, SAE_B_ENC, b_enc));
    ck_assert_ok(sae_model_set_tensor(j, SAE_THRESHOLD, th));
    ck_assert_ok(sae_model_set_tensor(b, SAE_B_ENC, b_enc));
    ck_assert_ok(sae_model_set_param(b, SAE_PARAM_THRESHOLD, 0.5));
    float x = 0, f[3];
    ck_assert_ok(sae_encode(j, &x, 1, f));
    const float want_j[3] = {0, 0.25f, 0};
    ck_assert_mem_eq(f, want_j, sizeof want_j);
    ck_assert_ok(sae_encode(b, &x, 1, f));
    const float want_b[3] = {0, 0, 1.0f};
    ck_assert_mem_eq(f, want_b, sizeof want_b);
    sae_model_free(j);
    sae_model_free(b);
}
END_TEST

/* One token alone (SGEMV) and inside a batch (SGEMM) must give the same codes. */
START_TEST(single_token_equals_batch_row)
{
    sae_arch arch = (sae_arch)_i;
    sae_model *m = tu_random_model(arch, 24, 96, 5);
    float *x = random_x(9, 24, 6);
    float *batch = tu_malloc(9 * 96 * sizeof(float)), one[96];
    ck_assert_ok(sae_encode(m, x, 9, batch));
    tu_weights w;
    tu_weights_get(m, &w);
    double want[96];
    for (size_t t = 0; t < 9; t++) {
        ck_assert_ok(sae_encode(m, x + t * 24, 1, one));
        tu_ref_encode(&w, x + t * 24, want);
        tu_assert_close(one, want, 96, 1e-5, "single-token f");
        for (size_t i = 0; i < 96; i++)
            ck_assert_float_eq_tol(one[i], batch[t * 96 + i], 1e-5f);
    }
    tu_weights_free(&w);
    free(x);
    free(batch);
    sae_model_free(m);
}
END_TEST

/* Enough tokens to cross the scratch block size several times. */
START_TEST(sparse_encode_crosses_blocks)
{
    const size_t d_in = 8, d_sae = 1 << 16, n = 700, k = 4;
    sae_model *m = tu_random_model(SAE_ARCH_RELU, d_in, d_sae, 8);
    float *x = random_x(n, d_in, 9);
    uint32_t *idx = tu_malloc(n * k * 4), *count = tu_malloc(n * 4);
    float *val = tu_malloc(n * k * 4), f1[1 << 16];
    ck_assert_ok(sae_encode_sparse(m, x, n, k, idx, val, count));
    for (size_t t = 0; t < n; t += 97) {
        uint32_t i1[4], c1;
        float v1[4];
        ck_assert_ok(sae_encode_sparse(m, x + t * d_in, 1, k, i1, v1, &c1));
        ck_assert_uint_eq(c1, count[t]);
        ck_assert_mem_eq(i1, idx + t * k, c1 * 4);
        ck_assert_ok(sae_encode(m, x + t * d_in, 1, f1));
        for (size_t j = 0; j < c1; j++)
            ck_assert_float_eq_tol(val[t * k + j], f1[i1[j]], 1e-5f);
    }
    free(x);
    free(idx);
    free(count);
    free(val);
    sae_model_free(m);
}
END_TEST

START_TEST(zero_tokens_write_nothing)
{
    sae_model *m = tu_random_model(SAE_ARCH_TOPK, 3, 4, 1);
    ck_assert_ok(sae_encode(m, NULL, 0, NULL));
    ck_assert_ok(sae_encode_sparse(m, NULL, 0, 2, NULL, NULL, NULL));
    sae_model_free(m);
}
END_TEST

START_TEST(encode_refuses_bad_arguments)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 3, 4, 1);
    float x[6] = {1, 2, 3, 4, 5, 6}, f[8], val[8];
    uint32_t idx[8], count[2];
    ck_assert_sae(sae_encode(NULL, x, 1, f), SAE_EINVAL);
    ck_assert_sae(sae_encode(m, NULL, 1, f), SAE_EINVAL);
    ck_assert_sae(sae_encode(m, x, 1, NULL), SAE_EINVAL);
    ck_assert_sae(sae_encode(m, x, SIZE_MAX / 2, f), SAE_EINVAL);
    ck_assert_sae(sae_encode_sparse(m, x, 2, 0, idx, val, count), SAE_EINVAL);
    ck_assert_sae(sae_encode_sparse(m, x, 2, 4, NULL, val, count), SAE_EINVAL);
    ck_assert_sae(sae_encode_sparse(m, x, 2, 4, idx, NULL, count), SAE_EINVAL);
    ck_assert_sae(sae_encode_sparse(m, x, 2, 4, idx, val, NULL), SAE_EINVAL);
    ck_assert_sae(sae_encode_sparse(m, x, 2, SIZE_MAX / 2, idx, val, count), SAE_EINVAL);
    x[4] = NAN;
    ck_assert_sae(sae_encode(m, x, 2, f), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "x[1][1]") != NULL, "message: %s", sae_last_error());
    x[4] = -INFINITY;
    ck_assert_sae(sae_encode_sparse(m, x, 2, 4, idx, val, count), SAE_EINVAL);
    sae_model_free(m);
}
END_TEST

static Suite *encode_suite(void)
{
    Suite *s = suite_create("encode");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, dense_encode_matches_float64_loops, SAE_ARCH_RELU, SAE_ARCH_JUMPRELU + 1);
    tcase_add_loop_test(tc, sparse_encode_lists_largest_nonzeros_first, SAE_ARCH_RELU,
                        SAE_ARCH_JUMPRELU + 1);
    tcase_add_loop_test(tc, single_token_equals_batch_row, SAE_ARCH_RELU, SAE_ARCH_JUMPRELU + 1);
    tcase_add_test(tc, topk_ties_go_to_the_lower_index);
    tcase_add_test(tc, topk_selects_before_rectifying);
    tcase_add_test(tc, thresholds_are_strict);
    tcase_add_test(tc, sparse_encode_crosses_blocks);
    tcase_add_test(tc, zero_tokens_write_nothing);
    tcase_add_test(tc, encode_refuses_bad_arguments);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(encode_suite)
