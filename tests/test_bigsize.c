/* Sizes beyond CBLAS's int: the size_t wrappers of lib/blas.c split work into calls CBLAS can
 * take and combine them exactly as one call would (checked on small arrays with the limit forced
 * down to 7, every size argument CBLAS receives recorded through the linker's --wrap), and the
 * public paths that multiply n * d_in (decode, reconstruct) stay correct when that product passes
 * 2^31 floats. The latter need 8 to 17 GiB: they run when /proc/meminfo says that much is
 * available, and not under sanitizers (whose shadow memory and slowness make them impractical). */
#include "testutil.h"

#include "internal.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(memory_sanitizer)
#define UNDER_SANITIZER 1
#endif
#endif
#ifndef UNDER_SANITIZER
#define UNDER_SANITIZER 0
#endif

/* ---- every CBLAS call the wrappers make, seen through -Wl,--wrap ---------------------------- */

static int largest; /* the largest size argument CBLAS has been given since reset_calls */
static int calls;

static void reset_calls(void) { largest = calls = 0; }

static void saw(int a, int b, int c)
{
    calls++;
    largest = a > largest ? a : largest;
    largest = b > largest ? b : largest;
    largest = c > largest ? c : largest;
}

void __real_cblas_sgemm(CBLAS_ORDER o, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K,
                        float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                        float *C, int ldc);
void __wrap_cblas_sgemm(CBLAS_ORDER o, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K,
                        float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                        float *C, int ldc);
void __wrap_cblas_sgemm(CBLAS_ORDER o, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K,
                        float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                        float *C, int ldc)
{
    saw(M, N, K);
    __real_cblas_sgemm(o, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void __real_cblas_sgemv(CBLAS_ORDER o, CBLAS_TRANSPOSE t, int M, int N, float alpha,
                        const float *A, int lda, const float *x, int incx, float beta, float *y,
                        int incy);
void __wrap_cblas_sgemv(CBLAS_ORDER o, CBLAS_TRANSPOSE t, int M, int N, float alpha,
                        const float *A, int lda, const float *x, int incx, float beta, float *y,
                        int incy);
void __wrap_cblas_sgemv(CBLAS_ORDER o, CBLAS_TRANSPOSE t, int M, int N, float alpha,
                        const float *A, int lda, const float *x, int incx, float beta, float *y,
                        int incy)
{
    saw(M, N, 0);
    __real_cblas_sgemv(o, t, M, N, alpha, A, lda, x, incx, beta, y, incy);
}

void __real_cblas_sger(CBLAS_ORDER o, int M, int N, float alpha, const float *x, int incx,
                       const float *y, int incy, float *A, int lda);
void __wrap_cblas_sger(CBLAS_ORDER o, int M, int N, float alpha, const float *x, int incx,
                       const float *y, int incy, float *A, int lda);
void __wrap_cblas_sger(CBLAS_ORDER o, int M, int N, float alpha, const float *x, int incx,
                       const float *y, int incy, float *A, int lda)
{
    saw(M, N, 0);
    __real_cblas_sger(o, M, N, alpha, x, incx, y, incy, A, lda);
}

void __real_cblas_saxpy(int n, float a, const float *x, int incx, float *y, int incy);
void __wrap_cblas_saxpy(int n, float a, const float *x, int incx, float *y, int incy);
void __wrap_cblas_saxpy(int n, float a, const float *x, int incx, float *y, int incy)
{
    saw(n, 0, 0);
    __real_cblas_saxpy(n, a, x, incx, y, incy);
}

void __real_cblas_sscal(int n, float a, float *x, int incx);
void __wrap_cblas_sscal(int n, float a, float *x, int incx);
void __wrap_cblas_sscal(int n, float a, float *x, int incx)
{
    saw(n, 0, 0);
    __real_cblas_sscal(n, a, x, incx);
}

float __real_cblas_sdot(int n, const float *x, int incx, const float *y, int incy);
float __wrap_cblas_sdot(int n, const float *x, int incx, const float *y, int incy);
float __wrap_cblas_sdot(int n, const float *x, int incx, const float *y, int incy)
{
    saw(n, 0, 0);
    return __real_cblas_sdot(n, x, incx, y, incy);
}

float __real_cblas_snrm2(int n, const float *x, int incx);
float __wrap_cblas_snrm2(int n, const float *x, int incx);
float __wrap_cblas_snrm2(int n, const float *x, int incx)
{
    saw(n, 0, 0);
    return __real_cblas_snrm2(n, x, incx);
}

/* The forced limit: every size over it must be split. */
#define LIMIT 7

/* Asserts the calls since reset_calls were several and none was given a size over LIMIT. */
static void assert_split(const char *what)
{
    ck_assert_msg(calls > 1, "%s: %d CBLAS call(s), expected the work split into several", what,
                  calls);
    ck_assert_msg(largest <= LIMIT, "%s: CBLAS was given a size of %d, over the limit %d", what,
                  largest, LIMIT);
}

static void assert_near(double got, double want, double scale, const char *what, size_t i)
{
    ck_assert_msg(fabs(got - want) <= 1e-5 * (scale > 1.0 ? scale : 1.0),
                  "%s[%zu] = %.9g, the plain loop gives %.9g", what, i, got, want);
}

/* ---- the wrappers, split at 7, against plain loops ------------------------------------------ */

/* C = alpha op(A) op(B) + beta C for every transposition, with padded leading dimensions, every
 * dimension over the limit (so K is sliced and beta must act once), and K = 0 (C = beta C). */
START_TEST(sgemm_split_by_rows_columns_and_inner_slices_equals_loops)
{
    const float betas[] = {0.0f, 1.0f, 0.5f, -2.0f};
    const size_t dims[][3] = {{17, 9, 23}, {8, 15, 7}, {3, 2, 30}, {16, 16, 0}};
    tu_rng r = {11};
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (size_t d = 0; d < 4; d++)
                for (size_t b = 0; b < 4; b++) {
                    const size_t M = dims[d][0], N = dims[d][1], K = dims[d][2];
                    const size_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 5;
                    const size_t a_rows = ta ? K : M, b_rows = tb ? N : K;
                    float *A = tu_malloc((a_rows * lda + 1) * sizeof(float));
                    float *B = tu_malloc((b_rows * ldb + 1) * sizeof(float));
                    float *C = tu_malloc(M * ldc * sizeof(float));
                    double *want = tu_malloc(M * ldc * sizeof(double));
                    tu_fill(&r, A, a_rows * lda + 1, -1.0f, 1.0f);
                    tu_fill(&r, B, b_rows * ldb + 1, -1.0f, 1.0f);
                    tu_fill(&r, C, M * ldc, -1.0f, 1.0f);
                    const float alpha = 1.5f, beta = betas[b];
                    for (size_t i = 0; i < M; i++)
                        for (size_t j = 0; j < ldc; j++) {
                            double s = 0.0;
                            for (size_t k = 0; k < K && j < N; k++)
                                s += (double)(ta ? A[k * lda + i] : A[i * lda + k]) *
                                     (double)(tb ? B[j * ldb + k] : B[k * ldb + j]);
                            /* Padding columns of C (j >= N) must be left alone. */
                            want[i * ldc + j] = j < N ? alpha * s + (double)beta * C[i * ldc + j]
                                                      : (double)C[i * ldc + j];
                        }
                    reset_calls();
                    sae__sgemm_limit(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, LIMIT);
                    assert_split("sgemm");
                    for (size_t i = 0; i < M * ldc; i++)
                        assert_near(C[i], want[i], (double)K, "C", i);
                    free(A);
                    free(B);
                    free(C);
                    free(want);
                }
}
END_TEST

/* y = alpha op(A) x + beta y, both ways, with strided x and y and both dimensions over the limit. */
START_TEST(sgemv_split_both_ways_with_strides_equals_loops)
{
    const float betas[] = {0.0f, 1.0f, 0.25f, -3.0f};
    const size_t M = 19, N = 12, lda = N + 4, incx = 2, incy = 3;
    tu_rng r = {12};
    float *A = tu_malloc(M * lda * sizeof(float));
    tu_fill(&r, A, M * lda, -1.0f, 1.0f);
    for (int t = 0; t < 2; t++)
        for (size_t b = 0; b < 4; b++) {
            const size_t in = t ? M : N, out = t ? N : M;
            float *x = tu_malloc(in * incx * sizeof(float));
            float *y = tu_malloc(out * incy * sizeof(float));
            double *want = tu_malloc(out * incy * sizeof(double));
            tu_fill(&r, x, in * incx, -1.0f, 1.0f);
            tu_fill(&r, y, out * incy, -1.0f, 1.0f);
            for (size_t i = 0; i < out * incy; i++)
                want[i] = y[i];
            for (size_t o = 0; o < out; o++) {
                double s = 0.0;
                for (size_t k = 0; k < in; k++)
                    s += (double)(t ? A[k * lda + o] : A[o * lda + k]) * x[k * incx];
                want[o * incy] = -0.75 * s + (double)betas[b] * y[o * incy];
            }
            reset_calls();
            sae__sgemv_limit(t, M, N, -0.75f, A, lda, x, incx, betas[b], y, incy, LIMIT);
            assert_split("sgemv");
            for (size_t i = 0; i < out * incy; i++)
                assert_near(y[i], want[i], (double)in, "y", i);
            free(x);
            free(y);
            free(want);
        }
    free(A);
}
END_TEST

START_TEST(sger_split_by_rows_and_columns_equals_loops)
{
    const size_t M = 15, N = 22, lda = N + 1, incx = 3, incy = 2;
    tu_rng r = {13};
    float *A = tu_malloc(M * lda * sizeof(float)), *x = tu_malloc(M * incx * sizeof(float)),
          *y = tu_malloc(N * incy * sizeof(float));
    double *want = tu_malloc(M * lda * sizeof(double));
    tu_fill(&r, A, M * lda, -1.0f, 1.0f);
    tu_fill(&r, x, M * incx, -1.0f, 1.0f);
    tu_fill(&r, y, N * incy, -1.0f, 1.0f);
    for (size_t i = 0; i < M; i++)
        for (size_t j = 0; j < lda; j++)
            want[i * lda + j] = A[i * lda + j] + (j < N ? 0.5 * x[i * incx] * y[j * incy] : 0.0);
    reset_calls();
    sae__sger_limit(M, N, 0.5f, x, incx, y, incy, A, lda, LIMIT);
    assert_split("sger");
    for (size_t i = 0; i < M * lda; i++)
        assert_near(A[i], want[i], 1.0, "A", i);
    free(A);
    free(x);
    free(y);
    free(want);
}
END_TEST

START_TEST(level1_split_in_chunks_equals_loops)
{
    const size_t n = 52; /* 7 full chunks and a partial one */
    tu_rng r = {14};
    float x[52], y[52];
    double want[52];
    tu_fill(&r, x, n, -1.0f, 1.0f);
    tu_fill(&r, y, n, -1.0f, 1.0f);

    for (size_t i = 0; i < n; i++)
        want[i] = y[i] + 0.3f * x[i];
    reset_calls();
    sae__saxpy_limit(n, 0.3f, x, y, LIMIT);
    assert_split("saxpy");
    for (size_t i = 0; i < n; i++)
        assert_near(y[i], want[i], 1.0, "saxpy y", i);

    for (size_t i = 0; i < n; i++)
        want[i] = -2.5 * y[i];
    reset_calls();
    sae__sscal_limit(n, -2.5f, y, LIMIT);
    assert_split("sscal");
    for (size_t i = 0; i < n; i++)
        assert_near(y[i], want[i], 1.0, "sscal y", i);

    double dot = 0.0, sq = 0.0;
    for (size_t i = 0; i < n; i++) {
        dot += (double)x[i] * y[i];
        sq += (double)x[i] * x[i];
    }
    reset_calls();
    float got = sae__sdot_limit(n, x, y, LIMIT);
    assert_split("sdot");
    assert_near(got, dot, (double)n, "sdot", 0);
    reset_calls();
    got = sae__snrm2_limit(n, x, LIMIT);
    assert_split("snrm2");
    assert_near(got, sqrt(sq), 1.0, "snrm2", 0);
}
END_TEST

/* The chunks' norms are combined scaled: values whose squares overflow float (3e37 squared is
 * 9e74) or vanish in it (1e-30 squared is 1e-60) still give the norm, as one snrm2 does. */
START_TEST(snrm2_split_neither_overflows_nor_underflows)
{
    const size_t n = 50;
    float v[50];
    const float mags[] = {3e37f, 1e-30f, 1.0f};
    for (size_t s = 0; s < 3; s++) {
        for (size_t i = 0; i < n; i++)
            v[i] = i % 2 ? mags[s] : -mags[s];
        double want = sqrt((double)n) * mags[s];
        float got = sae__snrm2_limit(n, v, LIMIT);
        ck_assert_msg(fabs(got - want) <= 1e-6 * want, "snrm2 of %zu values of %g = %g, want %g",
                      n, (double)mags[s], (double)got, want);
        ck_assert_msg(fabs(sae__snrm2(n, v) - want) <= 1e-6 * want, "unsplit snrm2");
    }
    v[3] = INFINITY;
    ck_assert(isinf(sae__snrm2_limit(n, v, LIMIT)));
    v[40] = NAN;
    ck_assert(isnan(sae__snrm2_limit(n, v, LIMIT)) || isinf(sae__snrm2_limit(n, v, LIMIT)));
    memset(v, 0, sizeof v);
    ck_assert(sae__snrm2_limit(n, v, LIMIT) == 0.0f);
}
END_TEST

/* Sizes within the limit go to CBLAS in one call: the wrappers cost nothing for ordinary work. */
START_TEST(sizes_within_the_limit_make_one_call)
{
    float A[6 * 6] = {0}, C[6 * 6] = {0}, x[6] = {0}, y[6] = {0};
    reset_calls();
    sae__sgemm_limit(false, true, 6, 6, 6, 1.0f, A, 6, A, 6, 0.0f, C, 6, LIMIT);
    sae__sgemv_limit(true, 6, 6, 1.0f, A, 6, x, 1, 0.0f, y, 1, LIMIT);
    sae__sger_limit(6, 6, 1.0f, x, 1, y, 1, A, 6, LIMIT);
    sae__saxpy_limit(6, 1.0f, x, y, LIMIT);
    sae__sscal_limit(6, 1.0f, y, LIMIT);
    (void)sae__sdot_limit(6, x, y, LIMIT);
    (void)sae__snrm2_limit(6, x, LIMIT);
    ck_assert_int_eq(calls, 7);
}
END_TEST

/* ---- public paths past 2^31 floats ---------------------------------------------------------- */

/* MemAvailable in bytes, or 0 when /proc/meminfo cannot say. */
static size_t available_memory(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (f == NULL)
        return 0;
    char line[256];
    unsigned long long kib = 0;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1)
            break;
    fclose(f);
    return (size_t)kib * 1024;
}

/* Whether a test needing `bytes` can run here; prints why not otherwise. */
static bool can_run_big(const char *test, size_t bytes)
{
    if (UNDER_SANITIZER) {
        fprintf(stderr, "%s: SKIPPED under a sanitizer (it would need %.1f GiB plus shadow memory)\n",
                test, (double)bytes / (1u << 30));
        return false;
    }
    size_t avail = available_memory();
    if (avail < bytes) {
        fprintf(stderr, "%s: SKIPPED: needs %.1f GiB, /proc/meminfo says %.1f GiB available\n",
                test, (double)bytes / (1u << 30), (double)avail / (1u << 30));
        return false;
    }
    return true;
}

/* d_in = 1024, so n * d_in passes 2^31 at token 2^21; INPUT_SCALE 3 makes every output pass
 * through the final scaling. */
enum { BIG_D_IN = 1024 };
static const size_t big_n = ((size_t)1 << 21) + 3;
static const double big_scale = 3.0;

/* The tokens checked: the first, the middle, the last below 2^31 floats, the first past it, and
 * the last. */
static size_t checked_token(size_t i)
{
    const size_t at[] = {0, big_n / 2, ((size_t)1 << 21) - 1, (size_t)1 << 21, big_n - 1};
    return at[i];
}

static void big_weights(sae_model *m, float *W_dec, float *b_dec)
{
    float *W_enc = tu_malloc(BIG_D_IN * sizeof(float));
    for (size_t j = 0; j < BIG_D_IN; j++) {
        W_dec[j] = 0.5f + (float)(j % 13) * 0.125f;
        b_dec[j] = (float)(j % 5) * 0.01f - 0.02f;
        W_enc[j] = 1.0f / BIG_D_IN;
    }
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, W_dec));
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_DEC, b_dec));
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_ENC, W_enc));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, big_scale));
    free(W_enc);
}

/* Dense codes (every token's one code nonzero) take the GEMM path, whose final scaling covers
 * all n * d_in outputs at once. */
START_TEST(decode_past_2_31_floats_scales_every_row)
{
    const size_t d_sae = 1, floats = big_n * BIG_D_IN;
    if (!can_run_big(__func__, floats * sizeof(float) + ((size_t)1 << 30)))
        return;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, BIG_D_IN, d_sae));
    float W_dec[BIG_D_IN], b_dec[BIG_D_IN];
    big_weights(m, W_dec, b_dec);
    float *f = tu_malloc(big_n * sizeof(float));
    for (size_t t = 0; t < big_n; t++)
        f[t] = 1.0f + (float)(t % 7);
    float *x_hat = tu_malloc(floats * sizeof(float));
    ck_assert_ok(sae_decode(m, f, big_n, x_hat));
    for (size_t i = 0; i < 5; i++) {
        const size_t t = checked_token(i);
        for (size_t j = 0; j < BIG_D_IN; j++) {
            double want = ((double)b_dec[j] + (double)f[t] * W_dec[j]) / big_scale;
            double got = x_hat[t * BIG_D_IN + j];
            ck_assert_msg(fabs(got - want) <= 1e-5 * fabs(want) + 1e-6,
                          "x_hat[%zu][%zu] = %.7g, want %.7g (the plain loop)", t, j, got, want);
        }
    }
    free(x_hat);
    free(f);
    sae_model_free(m);
}
END_TEST

/* Reconstruction in place, with one latent that fires on every token: the encoder's scratch and
 * the decoder's GEMM and scaling all span n * d_in floats in one block. */
START_TEST(reconstruct_past_2_31_floats_scales_every_row)
{
    const size_t d_sae = 1, floats = big_n * BIG_D_IN;
    /* x (also x_hat) and the encoder's scaled copy of it. */
    if (!can_run_big(__func__, 2 * floats * sizeof(float) + ((size_t)1 << 30)))
        return;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, BIG_D_IN, d_sae));
    float W_dec[BIG_D_IN], b_dec[BIG_D_IN];
    big_weights(m, W_dec, b_dec);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 1.0));
    float *x = tu_malloc(floats * sizeof(float));
    for (size_t t = 0; t < big_n; t++)
        for (size_t j = 0; j < BIG_D_IN; j++)
            x[t * BIG_D_IN + j] = 0.25f + (float)((t + j) % 9) * 0.0625f;
    ck_assert_ok(sae_reconstruct(m, x, big_n, x));
    for (size_t i = 0; i < 5; i++) {
        const size_t t = checked_token(i);
        double pre = 0.0;
        for (size_t j = 0; j < BIG_D_IN; j++) {
            double xj = 0.25 + (double)((t + j) % 9) * 0.0625;
            pre += (big_scale * xj - b_dec[j]) / BIG_D_IN;
        }
        const double code = pre > 0.0 ? pre : 0.0;
        ck_assert_msg(code > 0.0, "the latent should fire on token %zu", t);
        for (size_t j = 0; j < BIG_D_IN; j++) {
            double want = ((double)b_dec[j] + code * W_dec[j]) / big_scale;
            double got = x[t * BIG_D_IN + j];
            ck_assert_msg(fabs(got - want) <= 1e-5 * fabs(want) + 1e-6,
                          "x_hat[%zu][%zu] = %.7g, want %.7g (the plain loop)", t, j, got, want);
        }
    }
    free(x);
    sae_model_free(m);
}
END_TEST

static Suite *bigsize_suite(void)
{
    Suite *s = suite_create("bigsize");
    TCase *tc = tcase_create("wrappers");
    tcase_add_test(tc, sgemm_split_by_rows_columns_and_inner_slices_equals_loops);
    tcase_add_test(tc, sgemv_split_both_ways_with_strides_equals_loops);
    tcase_add_test(tc, sger_split_by_rows_and_columns_equals_loops);
    tcase_add_test(tc, level1_split_in_chunks_equals_loops);
    tcase_add_test(tc, snrm2_split_neither_overflows_nor_underflows);
    tcase_add_test(tc, sizes_within_the_limit_make_one_call);
    suite_add_tcase(s, tc);
    TCase *big = tcase_create("past 2^31");
    tcase_set_timeout(big, 600);
    tcase_add_test(big, decode_past_2_31_floats_scales_every_row);
    tcase_add_test(big, reconstruct_past_2_31_floats_scales_every_row);
    suite_add_tcase(s, big);
    return s;
}

TU_MAIN(bigsize_suite)
