/* float32 weight products of a few tokens through oneDNN (lib/sgemm_dnnl.c: its matmul, or its
 * sgemm for long sums into narrow outputs): the product against float64 loops on odd shapes of
 * both kinds, 1 to 40 tokens, with and without accumulation; the same bits on 1, 2 and 3
 * threads; which products take it; and encodes and decodes through the public calls where the
 * choice sends them there. Without oneDNN the product tests say so and stop. */
#include "testutil.h"
#include "internal.h"

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool have_onednn(void)
{
    const float a[2] = {1.0f, 2.0f}, w[1] = {3.0f};
    float c[2] = {0};
    if (sae__sgemm_dnnl(2, 1, 1, a, w, 0.0f, c, 1) && c[0] == 3.0f && c[1] == 6.0f)
        return true;
    fprintf(stderr, "sgemm: oneDNN's product not tested: libsae was built without oneDNN\n");
    return false;
}

/* Shapes [K][N] of no round size, a long sum with a narrow output, and the reverse. */
static const size_t shapes[][2] = {{37, 53}, {129, 1031}, {4099, 67}, {67, 4099}, {1, 9}};
enum { SHAPES = sizeof shapes / sizeof shapes[0], MAX_TOKENS = 40 };

/* |C - (A @ W + beta C0)| within the float32 rounding bound of a sum of K + 1 terms: K * eps
 * * sum |terms|, computed in float64 from the same operands. */
static void check_product(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                          const float *C0, const float *C)
{
    for (size_t t = 0; t < n; t++)
        for (size_t j = 0; j < N; j++) {
            double want = beta * (double)C0[t * N + j], mag = fabs(want);
            for (size_t k = 0; k < K; k++) {
                const double term = (double)A[t * K + k] * (double)W[k * N + j];
                want += term;
                mag += fabs(term);
            }
            const double got = C[t * N + j];
            ck_assert_msg(fabs(got - want) <= (double)(K + 1) * FLT_EPSILON * mag + 1e-30,
                          "n %zu, %zu x %zu, beta %g: C[%zu][%zu] = %.9g, float64 %.9g", n, K, N,
                          (double)beta, t, j, got, want);
        }
}

/* The token counts after n: every one to MAX_TOKENS, or under the sanitizers and the reference
 * BLAS (SAE_TEST_SHORT: the float64 loops then take a minute) 1 to 8 and a spread above. */
static size_t next_count(size_t n)
{
    return getenv("SAE_TEST_SHORT") == NULL || n < 8 ? n + 1 : n + n / 2;
}

/* Random A [MAX_TOKENS][K], W [K][N] and C0 [MAX_TOKENS][N] for shape i, and room for C. */
typedef struct {
    size_t K, N;
    float *A, *W, *C0, *C;
} operands;

static operands make_operands(int i, uint64_t seed)
{
    operands o = {shapes[i][0], shapes[i][1], NULL, NULL, NULL, NULL};
    tu_rng r = {seed};
    o.A = tu_malloc(MAX_TOKENS * o.K * sizeof *o.A);
    o.W = tu_malloc(o.K * o.N * sizeof *o.W);
    o.C0 = tu_malloc(MAX_TOKENS * o.N * sizeof *o.C0);
    o.C = tu_malloc(MAX_TOKENS * o.N * sizeof *o.C);
    tu_fill(&r, o.A, MAX_TOKENS * o.K, -1.0f, 1.0f);
    tu_fill(&r, o.W, o.K * o.N, -1.0f, 1.0f);
    tu_fill(&r, o.C0, MAX_TOKENS * o.N, -4.0f, 4.0f);
    return o;
}

static void free_operands(operands *o)
{
    free(o->A);
    free(o->W);
    free(o->C0);
    free(o->C);
}

START_TEST(product_matches_float64_loops)
{
    if (!have_onednn())
        return;
    operands o = make_operands(_i, (uint64_t)_i + 1);
    const size_t K = o.K, N = o.N;
    const float *A = o.A, *W = o.W, *C0 = o.C0;
    float *C = o.C;
    for (size_t n = 1; n <= MAX_TOKENS; n = next_count(n))
        for (int acc = 0; acc < 2; acc++) {
            const float beta = acc ? 1.0f : 0.0f;
            memcpy(C, C0, n * N * sizeof *C);
            ck_assert(sae__sgemm_dnnl(n, K, N, A, W, beta, C, 2));
            check_product(n, K, N, A, W, beta, C0, C);
        }
    free_operands(&o);
}
END_TEST

START_TEST(thread_counts_give_the_same_bits)
{
    if (!have_onednn())
        return;
    operands o = make_operands(_i, (uint64_t)_i + 11);
    const size_t K = o.K, N = o.N;
    const float *A = o.A, *W = o.W;
    float *C1 = o.C0, *C = o.C;
    for (size_t n = 2; n <= MAX_TOKENS; n = next_count(n)) {
        ck_assert(sae__sgemm_dnnl(n, K, N, A, W, 0.0f, C1, 1));
        for (size_t threads = 2; threads <= 3; threads++) {
            ck_assert(sae__sgemm_dnnl(n, K, N, A, W, 0.0f, C, threads));
            ck_assert_msg(memcmp(C, C1, n * N * sizeof *C) == 0,
                          "n %zu, %zu x %zu: %zu threads differ from 1", n, K, N, threads);
        }
    }
    free_operands(&o);
}
END_TEST

/* What the choice should be in this process: SAE_SGEMM's override, else oneDNN's AVX-512 kernels
 * (AVX-512 F, BW, VL and DQ: oneDNN's avx512_core) for 2 to 256 tokens over 4M weights or
 * more. */
static bool expected_choice(size_t n, size_t K, size_t N)
{
    const char *want = getenv("SAE_SGEMM");
    if (!have_onednn() || n < 2 || (want != NULL && strcmp(want, "blas") == 0))
        return false;
    if (want != NULL && strcmp(want, "onednn") == 0)
        return true;
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 && K * N >= ((size_t)1 << 22) && n <= 256;
}

START_TEST(choice_follows_the_measurements_and_the_override)
{
    static const size_t cases[][3] = {
        {1, 2304, 16384},   {2, 2304, 16384},  {64, 2304, 16384},  {256, 2304, 16384},
        {257, 2304, 16384}, {2, 16384, 2304},  {256, 16384, 2304}, {257, 16384, 2304},
        {8, 1024, 4096},    {8, 1024, 4095},   {8, 64, 512},       {1000, 16384, 2304},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const size_t n = cases[c][0], K = cases[c][1], N = cases[c][2];
        ck_assert_msg(sae__sgemm_dnnl_wanted(n, K, N) == expected_choice(n, K, N),
                      "n %zu, %zu x %zu: chosen %d", n, K, N, sae__sgemm_dnnl_wanted(n, K, N));
    }
}
END_TEST

/* A ReLU SAE of 1024 -> 4096 (4M weights: the smallest the choice sends to oneDNN): encodes of 1
 * to 30 tokens and dense decodes against the float64 loops, and the same bits on 1 to 3 of the
 * model's threads. Which path each took is printed, so that a run without oneDNN says so. */
START_TEST(encode_and_decode_through_the_choice)
{
    const size_t d_in = 1024, d_sae = 4096, most = 30;
    sae_model *m = tu_random_model(SAE_ARCH_RELU, d_in, d_sae, 7);
    tu_weights w;
    tu_weights_get(m, &w);
    tu_rng r = {3};
    float *x = tu_malloc(most * d_in * sizeof *x), *f = tu_malloc(most * d_sae * sizeof *f);
    float *f1 = tu_malloc(most * d_sae * sizeof *f1), *x_hat = tu_malloc(most * d_in * sizeof *x_hat);
    double *want_f = tu_malloc(d_sae * sizeof *want_f), *want_x = tu_malloc(d_in * sizeof *want_x);
    double *codes = tu_malloc(d_sae * sizeof *codes);
    float *dense = tu_malloc(most * d_sae * sizeof *dense);
    tu_fill(&r, x, most * d_in, -2.0f, 2.0f);
    tu_fill(&r, dense, most * d_sae, 0.0f, 1.0f);
    fprintf(stderr, "sgemm: encode of 8 tokens over %zu x %zu through %s, decode through %s\n",
            d_in, d_sae, sae__sgemm_dnnl_wanted(8, d_in, d_sae) ? "oneDNN" : "BLAS",
            sae__sgemm_dnnl_wanted(8, d_sae, d_in) ? "oneDNN" : "BLAS");
    const size_t step = getenv("SAE_TEST_SHORT") ? 11 : 5;
    for (size_t n = 1; n <= most; n += (n < 4 ? 1 : step)) {
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1));
        ck_assert_ok(sae_encode(m, x, n, f1));
        for (int threads = 2; threads <= 3; threads++) {
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, threads));
            ck_assert_ok(sae_encode(m, x, n, f));
            ck_assert_msg(memcmp(f, f1, n * d_sae * sizeof *f) == 0,
                          "encode of %zu tokens: %d threads differ from 1", n, threads);
        }
        for (size_t t = 0; t < n; t++) {
            tu_ref_encode(&w, x + t * d_in, want_f);
            tu_assert_close(f + t * d_sae, want_f, d_sae, 1e-5, "encode");
        }
        ck_assert_ok(sae_decode(m, dense, n, x_hat));
        for (size_t t = 0; t < n; t++) {
            for (size_t j = 0; j < d_sae; j++)
                codes[j] = dense[t * d_sae + j];
            tu_ref_decode(&w, codes, want_x);
            tu_assert_close(x_hat + t * d_in, want_x, d_in, 1e-5, "decode");
        }
    }
    free(x);
    free(f);
    free(f1);
    free(x_hat);
    free(want_f);
    free(want_x);
    free(codes);
    free(dense);
    tu_weights_free(&w);
    sae_model_free(m);
}
END_TEST

/* Calls from several threads at once on one model, each with its own OpenMP team in oneDNN: every
 * thread's codes are the bits one call alone gives. */
typedef struct {
    const sae_model *m;
    const float *x;
    size_t n;
    float *f;
    int rc;
} encode_job;

static void *encode_thread(void *arg)
{
    encode_job *j = arg;
    for (int round = 0; round < 4 && j->rc == SAE_OK; round++)
        j->rc = sae_encode(j->m, j->x, j->n, j->f);
    return NULL;
}

START_TEST(concurrent_calls_give_one_calls_bits)
{
    enum { CALLERS = 3 };
    const size_t d_in = 1024, d_sae = 4096, n = 8;
    sae_model *m = tu_random_model(SAE_ARCH_RELU, d_in, d_sae, 9);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 2));
    tu_rng r = {5};
    float *x = tu_malloc(n * d_in * sizeof *x), *want = tu_malloc(n * d_sae * sizeof *want);
    tu_fill(&r, x, n * d_in, -2.0f, 2.0f);
    ck_assert_ok(sae_encode(m, x, n, want));
    encode_job jobs[CALLERS];
    pthread_t threads[CALLERS];
    for (int t = 0; t < CALLERS; t++) {
        jobs[t] = (encode_job){m, x, n, tu_malloc(n * d_sae * sizeof(float)), SAE_OK};
        ck_assert_int_eq(pthread_create(&threads[t], NULL, encode_thread, &jobs[t]), 0);
    }
    for (int t = 0; t < CALLERS; t++) {
        ck_assert_int_eq(pthread_join(threads[t], NULL), 0);
        ck_assert_int_eq(jobs[t].rc, SAE_OK);
        ck_assert_msg(memcmp(jobs[t].f, want, n * d_sae * sizeof *want) == 0,
                      "caller %d's codes differ from one call's", t);
        free(jobs[t].f);
    }
    free(x);
    free(want);
    sae_model_free(m);
}
END_TEST

static Suite *sgemm_suite(void)
{
    Suite *s = suite_create("sgemm");
    TCase *tc = tcase_create("onednn");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, product_matches_float64_loops, 0, SHAPES);
    tcase_add_loop_test(tc, thread_counts_give_the_same_bits, 0, SHAPES);
    tcase_add_test(tc, choice_follows_the_measurements_and_the_override);
    tcase_add_test(tc, encode_and_decode_through_the_choice);
    tcase_add_test(tc, concurrent_calls_give_one_calls_bits);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(sgemm_suite)
