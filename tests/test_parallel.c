/* Threads across tokens: the SAE_PARAM_THREADS knob, the fork-join helper, and the promise that
 * results do not depend on the thread count; plus the fused selection's screening in blocks and
 * the sparse path of dense decoding, at sizes large enough to be split across threads. */
#include "internal.h"
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const sae_arch archs[] = {SAE_ARCH_RELU, SAE_ARCH_TOPK, SAE_ARCH_BATCHTOPK,
                                 SAE_ARCH_JUMPRELU};
#define N_ARCHS (sizeof archs / sizeof archs[0])

/* d_sae = 4100 makes a chunk worth a thread every 64 tokens (sae__grain), so n = 300 splits into
 * as many chunks as threads asked for, and 4100 is not a multiple of the 16-value screen. */
enum { D_IN = 24, D_SAE = 4100, N = 300, K_SPARSE = 40 };

START_TEST(threads_param_round_trips_and_refuses_bad_values)
{
    sae_model *m = tu_random_model(archs[_i], 3, 5, 1);
    double v = -1;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THREADS, &v));
    ck_assert(v == 0.0);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 3));
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THREADS, &v));
    ck_assert(v == 3.0);
    const double bad[] = {-1.0, 1.5, 1025.0, NAN, INFINITY};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_sae(sae_model_set_param(m, SAE_PARAM_THREADS, bad[i]), SAE_EINVAL);
        ck_assert_ptr_nonnull(strstr(sae_last_error(), "THREADS"));
    }
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THREADS, &v));
    ck_assert(v == 3.0);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1024));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 0));
    ck_assert_uint_ge(sae__model_threads(m), 1);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1));
    ck_assert_uint_eq(sae__model_threads(m), 1);
    sae_model_free(m);
}
END_TEST

typedef struct {
    unsigned *hits;
    size_t *worker_of;
} cover_ctx;

static void mark(void *arg, size_t begin, size_t end, size_t worker)
{
    cover_ctx *c = arg;
    for (size_t i = begin; i < end; i++) {
        c->hits[i]++;
        c->worker_of[i] = worker;
    }
}

START_TEST(parallel_for_covers_every_item_once_in_order)
{
    const size_t counts[] = {1, 2, 7, 64, 1000};
    const size_t threads[] = {1, 2, 3, 8, 200};
    const size_t grains[] = {0, 1, 5, 300};
    for (size_t a = 0; a < 5; a++)
        for (size_t b = 0; b < 5; b++)
            for (size_t g = 0; g < 4; g++) {
                size_t n = counts[a];
                unsigned *hits = calloc(n, sizeof *hits);
                size_t *worker_of = calloc(n, sizeof *worker_of);
                cover_ctx c = {hits, worker_of};
                sae__parallel_for(threads[b], n, grains[g], mark, &c);
                size_t chunks = sae__parallel_chunks(threads[b], n, grains[g]);
                ck_assert_uint_ge(chunks, 1);
                ck_assert_uint_le(chunks, threads[b]);
                ck_assert_uint_le(chunks, 64);
                if (grains[g] > 0 && chunks > 1)
                    ck_assert_uint_ge(n / chunks, grains[g]);
                for (size_t i = 0; i < n; i++) {
                    ck_assert_uint_eq(hits[i], 1);
                    ck_assert_uint_lt(worker_of[i], chunks);
                    /* Contiguous chunks in worker order. */
                    if (i > 0)
                        ck_assert_uint_ge(worker_of[i], worker_of[i - 1]);
                }
                free(hits);
                free(worker_of);
            }
    sae__parallel_for(4, 0, 1, mark, NULL); /* nothing to do: fn is never called */
}
END_TEST

/* Everything one model computes on the same tokens, so runs can be compared byte for byte. */
typedef struct {
    float *f, *x_hat_dense, *x_hat_sparse, *recon, *steered, *sparse_codes_decoded;
    uint32_t *idx, *count;
    float *val;
} outputs;

static void compute_all(sae_model *m, const float *x, outputs *o)
{
    o->f = tu_malloc(N * D_SAE * sizeof(float));
    o->x_hat_dense = tu_malloc(N * D_IN * sizeof(float));
    o->x_hat_sparse = tu_malloc(N * D_IN * sizeof(float));
    o->recon = tu_malloc(N * D_IN * sizeof(float));
    o->steered = tu_malloc(N * D_IN * sizeof(float));
    o->sparse_codes_decoded = tu_malloc(N * D_IN * sizeof(float));
    o->idx = tu_malloc(N * K_SPARSE * sizeof(uint32_t));
    o->val = tu_malloc(N * K_SPARSE * sizeof(float));
    o->count = tu_malloc(N * sizeof(uint32_t));
    ck_assert_ok(sae_encode(m, x, N, o->f));
    ck_assert_ok(sae_decode(m, o->f, N, o->x_hat_dense));
    ck_assert_ok(sae_encode_sparse(m, x, N, K_SPARSE, o->idx, o->val, o->count));
    ck_assert_ok(sae_decode_sparse(m, o->idx, o->val, o->count, K_SPARSE, N, o->x_hat_sparse));
    ck_assert_ok(sae_reconstruct(m, x, N, o->recon));
    /* Dense codes with the sparse codes' few nonzeros: the sparse path of sae_decode. */
    float *few = calloc(N * D_SAE, sizeof(float));
    for (size_t t = 0; t < N; t++)
        for (size_t j = 0; j < o->count[t]; j++)
            few[t * D_SAE + o->idx[t * K_SPARSE + j]] = o->val[t * K_SPARSE + j];
    ck_assert_ok(sae_decode(m, few, N, o->sparse_codes_decoded));
    free(few);
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_clamp(s, 17, 3.0f));
    ck_assert_ok(sae_steer_scale(s, 2000, 0.5f));
    ck_assert_ok(sae_steer_add(s, 4099, -1.0f));
    memcpy(o->steered, x, N * D_IN * sizeof(float));
    ck_assert_ok(sae_steer_apply(s, o->steered, N));
    sae_steer_free(s);
}

static void free_all(outputs *o)
{
    free(o->f);
    free(o->x_hat_dense);
    free(o->x_hat_sparse);
    free(o->recon);
    free(o->steered);
    free(o->sparse_codes_decoded);
    free(o->idx);
    free(o->val);
    free(o->count);
}

static sae_model *test_model(sae_arch arch)
{
    sae_model *m = tu_random_model(arch, D_IN, D_SAE, 7 + (uint64_t)arch);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 1.25));
    if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 24));
    if (arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.3));
    return m;
}

static float *test_tokens(void)
{
    float *x = tu_malloc(N * D_IN * sizeof(float));
    tu_rng r = {99};
    tu_fill(&r, x, N * D_IN, -2.0f, 2.0f);
    return x;
}

START_TEST(results_do_not_depend_on_the_thread_count)
{
    sae_model *m = test_model(archs[_i]);
    float *x = test_tokens();
    outputs one;
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1));
    compute_all(m, x, &one);
    const double threads[] = {2, 3, 7, 0};
    for (size_t i = 0; i < sizeof threads / sizeof threads[0]; i++) {
        outputs many;
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, threads[i]));
        compute_all(m, x, &many);
        ck_assert_mem_eq(one.f, many.f, N * D_SAE * sizeof(float));
        ck_assert_mem_eq(one.x_hat_dense, many.x_hat_dense, N * D_IN * sizeof(float));
        ck_assert_mem_eq(one.idx, many.idx, N * K_SPARSE * sizeof(uint32_t));
        ck_assert_mem_eq(one.val, many.val, N * K_SPARSE * sizeof(float));
        ck_assert_mem_eq(one.count, many.count, N * sizeof(uint32_t));
        ck_assert_mem_eq(one.x_hat_sparse, many.x_hat_sparse, N * D_IN * sizeof(float));
        ck_assert_mem_eq(one.recon, many.recon, N * D_IN * sizeof(float));
        ck_assert_mem_eq(one.sparse_codes_decoded, many.sparse_codes_decoded,
                         N * D_IN * sizeof(float));
        ck_assert_mem_eq(one.steered, many.steered, N * D_IN * sizeof(float));
        free_all(&many);
    }
    free_all(&one);
    free(x);
    sae_model_free(m);
}
END_TEST

/* The threaded paths against the float64 loops: codes, both decoding paths, the round trip. */
START_TEST(threaded_results_match_float64_loops)
{
    sae_model *m = test_model(archs[_i]);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 3));
    float *x = test_tokens();
    outputs o;
    compute_all(m, x, &o);
    tu_weights w;
    tu_weights_get(m, &w);
    double *f = tu_malloc(D_SAE * sizeof(double)), *x_hat = tu_malloc(D_IN * sizeof(double));
    double *few = tu_malloc(D_SAE * sizeof(double)), *want = tu_malloc(D_IN * sizeof(double));
    for (size_t t = 0; t < N; t++) {
        tu_ref_encode(&w, x + t * D_IN, f);
        tu_assert_close(o.f + t * D_SAE, f, D_SAE, 1e-5, "threaded encode");
        tu_ref_decode(&w, f, x_hat);
        tu_assert_close(o.recon + t * D_IN, x_hat, D_IN, 1e-4, "threaded reconstruct");
        double *from_f = tu_malloc(D_SAE * sizeof(double));
        for (size_t i = 0; i < D_SAE; i++)
            from_f[i] = o.f[t * D_SAE + i];
        tu_ref_decode(&w, from_f, want);
        tu_assert_close(o.x_hat_dense + t * D_IN, want, D_IN, 1e-4, "threaded decode");
        free(from_f);
        /* The sparse codes: the K_SPARSE strongest nonzero codes, strongest first. */
        size_t nonzero = 0;
        for (size_t i = 0; i < D_SAE; i++)
            nonzero += f[i] > 0.0;
        ck_assert_uint_eq(o.count[t], nonzero < K_SPARSE ? nonzero : K_SPARSE);
        memset(few, 0, D_SAE * sizeof(double));
        for (size_t j = 0; j < o.count[t]; j++) {
            uint32_t i = o.idx[t * K_SPARSE + j];
            float v = o.val[t * K_SPARSE + j];
            ck_assert(v > 0.0f);
            ck_assert(v == o.f[t * D_SAE + i]);
            if (j > 0)
                ck_assert(v <= o.val[t * K_SPARSE + j - 1]);
            few[i] = v;
        }
        tu_ref_decode(&w, few, want);
        tu_assert_close(o.x_hat_sparse + t * D_IN, want, D_IN, 1e-4, "threaded sparse decode");
        tu_assert_close(o.sparse_codes_decoded + t * D_IN, want, D_IN, 1e-4,
                        "dense decode of sparse codes");
    }
    free(f);
    free(x_hat);
    free(few);
    free(want);
    tu_weights_free(&w);
    free_all(&o);
    free(x);
    sae_model_free(m);
}
END_TEST

/* Equal codes in several 16-value screening blocks and the ragged tail: the lower indices win,
 * for the dense TopK codes and for every architecture's sparse codes. */
START_TEST(ties_across_screen_blocks_go_to_the_lower_index)
{
    const size_t d_sae = 75; /* 4 full blocks and a tail of 11 */
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, archs[_i], 2, d_sae));
    float b_enc[75];
    for (size_t i = 0; i < d_sae; i++)
        b_enc[i] = i % 3 == 0 ? 1.0f : (i % 3 == 1 ? -1.0f : 0.5f);
    b_enc[70] = 2.0f;
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, b_enc));
    if (archs[_i] == SAE_ARCH_TOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 6));
    float x[2] = {0, 0}, f[75];
    uint32_t idx[8], count;
    float val[8];
    ck_assert_ok(sae_encode_sparse(m, x, 1, 8, idx, val, &count));
    const size_t want_count = archs[_i] == SAE_ARCH_TOPK ? 6 : 8;
    ck_assert_uint_eq(count, want_count);
    /* 70 (2.0), then the 1.0s at 0, 3, 6, ... in index order. */
    ck_assert_uint_eq(idx[0], 70);
    ck_assert(val[0] == 2.0f);
    for (size_t j = 1; j < want_count; j++) {
        ck_assert_uint_eq(idx[j], 3 * (j - 1));
        ck_assert(val[j] == 1.0f);
    }
    ck_assert_ok(sae_encode(m, x, 1, f));
    for (size_t i = 0; i < d_sae; i++) {
        float want = b_enc[i] > 0 ? b_enc[i] : 0.0f;
        if (archs[_i] == SAE_ARCH_TOPK)
            want = (i == 70 || (i % 3 == 0 && i < 15)) ? b_enc[i] : 0.0f;
        ck_assert_msg(f[i] == want, "f[%zu] = %g, want %g", i, (double)f[i], (double)want);
    }
    sae_model_free(m);
}
END_TEST

/* A block's last code decides entry: with the heap full, a value equal to the weakest kept does
 * not enter; one just above does, even as the last element of the last full block. */
START_TEST(screen_admits_the_last_value_of_a_block)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, 1, 32));
    float b_enc[32];
    for (size_t i = 0; i < 32; i++)
        b_enc[i] = 0.25f;
    b_enc[15] = 0.5f;
    b_enc[31] = 0.75f;
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, b_enc));
    float x = 0;
    uint32_t idx[3], count;
    float val[3];
    ck_assert_ok(sae_encode_sparse(m, &x, 1, 3, idx, val, &count));
    ck_assert_uint_eq(count, 3);
    ck_assert_uint_eq(idx[0], 31);
    ck_assert_uint_eq(idx[1], 15);
    ck_assert_uint_eq(idx[2], 0);
    sae_model_free(m);
}
END_TEST

/* Few pairs per feature: token by token across threads (the feature-major pass is for many).
 * d_in = 512 makes a token's work large enough that 200 tokens split into chunks. */
START_TEST(token_major_decoding_splits_across_threads)
{
    enum { DI = 512, DS = 4100, NT = 200, KK = 4 };
    sae_model *m = tu_random_model(SAE_ARCH_RELU, DI, DS, 5);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 0.75));
    uint32_t *idx = tu_malloc(NT * KK * sizeof(uint32_t)), *count = tu_malloc(NT * sizeof(uint32_t));
    float *val = tu_malloc(NT * KK * sizeof(float)), *f = calloc(NT * DS, sizeof(float));
    tu_rng r = {3};
    for (size_t t = 0; t < NT; t++) {
        count[t] = (uint32_t)(t % (KK + 1));
        for (size_t j = 0; j < KK; j++) {
            idx[t * KK + j] = (uint32_t)(tu_next(&r) % DS);
            val[t * KK + j] = tu_uniform(&r, 0.1f, 2.0f);
        }
        for (size_t j = 0; j < count[t]; j++)
            f[t * DS + idx[t * KK + j]] += val[t * KK + j];
    }
    float *one_s = tu_malloc(NT * DI * sizeof(float)), *many_s = tu_malloc(NT * DI * sizeof(float));
    float *one_d = tu_malloc(NT * DI * sizeof(float)), *many_d = tu_malloc(NT * DI * sizeof(float));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1));
    ck_assert_ok(sae_decode_sparse(m, idx, val, count, KK, NT, one_s));
    ck_assert_ok(sae_decode(m, f, NT, one_d));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 3));
    ck_assert_ok(sae_decode_sparse(m, idx, val, count, KK, NT, many_s));
    ck_assert_ok(sae_decode(m, f, NT, many_d));
    ck_assert_mem_eq(one_s, many_s, NT * DI * sizeof(float));
    ck_assert_mem_eq(one_d, many_d, NT * DI * sizeof(float));
    tu_weights w;
    tu_weights_get(m, &w);
    double *fd = tu_malloc(DS * sizeof(double)), *want = tu_malloc(DI * sizeof(double));
    for (size_t t = 0; t < NT; t++) {
        for (size_t i = 0; i < DS; i++)
            fd[i] = f[t * DS + i];
        tu_ref_decode(&w, fd, want);
        tu_assert_close(many_s + t * DI, want, DI, 1e-5, "token-major sparse decode");
        tu_assert_close(many_d + t * DI, want, DI, 1e-5, "token-major dense decode");
    }
    tu_weights_free(&w);
    free(fd);
    free(want);
    free(idx);
    free(count);
    free(val);
    free(f);
    free(one_s);
    free(many_s);
    free(one_d);
    free(many_d);
    sae_model_free(m);
}
END_TEST

static Suite *parallel_suite(void)
{
    Suite *s = suite_create("parallel");
    TCase *tc = tcase_create("parallel");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, threads_param_round_trips_and_refuses_bad_values, 0, (int)N_ARCHS);
    tcase_add_test(tc, parallel_for_covers_every_item_once_in_order);
    tcase_add_loop_test(tc, results_do_not_depend_on_the_thread_count, 0, (int)N_ARCHS);
    tcase_add_loop_test(tc, threaded_results_match_float64_loops, 0, (int)N_ARCHS);
    tcase_add_loop_test(tc, ties_across_screen_blocks_go_to_the_lower_index, 0, (int)N_ARCHS);
    tcase_add_test(tc, screen_admits_the_last_value_of_a_block);
    tcase_add_test(tc, token_major_decoding_splits_across_threads);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(parallel_suite)
