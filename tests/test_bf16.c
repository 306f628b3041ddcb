/* SAE_PARAM_BF16_WEIGHTS: rounding to bfloat16 against an independent rounding (frexp and rint),
 * and every operation on a bfloat16 model against the same operation on a float model holding
 * the same (rounded) weights, for every architecture and for token counts on both sides of the
 * few-token kernel / widened-panel switch. Also the panel path with several panels, the
 * round trips (param back to 0, save and load, get and set), and what is refused. */
#include "internal.h"
#include "testutil.h"
#include "trainutil.h"
#include "train_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const sae_arch archs[] = {SAE_ARCH_RELU, SAE_ARCH_TOPK, SAE_ARCH_BATCHTOPK,
                                 SAE_ARCH_JUMPRELU};
#define N_ARCHS (sizeof archs / sizeof archs[0])

/* Shapes: columns beyond one 512-wide block of the few-token kernel on the encoder side (d_sae)
 * and on the decoder side (d_in). */
static const size_t shapes[][2] = {{7, 37}, {24, 700}, {600, 64}};
#define N_SHAPES (sizeof shapes / sizeof shapes[0])
/* 1 to 8 tokens take the few-token kernel, more the panels. */
static const size_t token_counts[] = {1, 3, 8, 9, 40};

/* The nearest value with 8 significant bits, ties to even (rint in the default rounding mode). */
static float reference_round(float v)
{
    if (v == 0.0f || !isfinite(v))
        return v;
    int e;
    float m = frexpf(v, &e); /* v = m 2^e, 0.5 <= |m| < 1 */
    if (e < -125)            /* subnormal floats: bfloat16 keeps the same 2^-133 spacing */
        return ldexpf(rintf(ldexpf(v, 133)), -133);
    return ldexpf(rintf(ldexpf(m, 8)), e - 8);
}

/* Whether this process's batched products round the activations to bfloat16 (AMX or
 * AVX512-BF16 through oneDNN), which makes a bfloat16 model's results differ from the float
 * model's by more than float rounding. */
static bool rounding_path(void) { return sae__bf16_isa() != SAE_BF16_PATH_WIDEN; }

/* tol: 2e-5 where only the weights are rounded; where a product of more than two tokens also
 * rounds its activations (sae.h, sae_model_bf16_path: each term within 2^-8), 1e-2 of the
 * largest value, for these shapes' sums of a few hundred terms. */
static void assert_close_tol(const float *got, const float *want, size_t n, const char *what,
                             double tol)
{
    double scale = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(want[i]));
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs((double)got[i] - want[i]) <= tol * (1.0 + scale),
                      "%s[%zu]: bfloat16 model %.9g, float model %.9g", what, i, (double)got[i],
                      (double)want[i]);
}

static void assert_close(const float *got, const float *want, size_t n, const char *what)
{
    assert_close_tol(got, want, n, what, 2e-5);
}

START_TEST(narrowing_rounds_to_nearest_even)
{
    const struct {
        float in;
        uint16_t out;
    } cases[] = {
        {1.0f, 0x3f80},                       {-2.0f, 0xc000},
        {1.00390625f, 0x3f80},                /* 1 + 2^-8: a tie, to the even 1 */
        {1.01171875f, 0x3f82},                /* 1 + 3 2^-8: a tie, to the even 1 + 2^-6 */
        {0x1.010002p+0f, 0x3f81},             /* one float above the tie: up */
        {0x1.fefffep+127f, 0x7f7f},           /* the largest that stays finite */
        {0.0f, 0x0000},                       {-0.0f, 0x8000},
        {1e-40f, 0x0001},                     /* subnormal */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t got = 0xffff;
        ck_assert_ok(sae__bf16_narrow(&cases[i].in, &got, 1, 1, "case"));
        ck_assert_msg(got == cases[i].out, "%.9g: got %#06x, want %#06x", (double)cases[i].in,
                      got, cases[i].out);
    }
    tu_rng r = {42};
    enum { N = 20000 };
    float *v = tu_malloc(N * sizeof *v), *back = tu_malloc(N * sizeof *back);
    uint16_t *h = tu_malloc(N * sizeof *h);
    for (size_t i = 0; i < N; i++)
        v[i] = tu_normal(&r) * ldexpf(1.0f, (int)(tu_next(&r) % 200) - 100);
    ck_assert_ok(sae__bf16_narrow(v, h, N, 100, "v"));
    sae__bf16_widen(h, back, N);
    for (size_t i = 0; i < N; i++)
        ck_assert_msg(back[i] == reference_round(v[i]), "%.9g -> %.9g, want %.9g", (double)v[i],
                      (double)back[i], (double)reference_round(v[i]));
    free(v);
    free(back);
    free(h);
}
END_TEST

START_TEST(narrowing_refuses_what_bf16_cannot_hold)
{
    /* 0x1.ffp+127 is the tie between bfloat16's largest finite value and infinity. */
    const float bad[] = {0x1.ffp+127f, -0x1.ffp+127f, -3.4e38f, INFINITY, NAN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        float v[3] = {1.0f, 2.0f, bad[i]};
        uint16_t h[3] = {7, 7, 7};
        ck_assert_sae(sae__bf16_narrow(v, h, 3, 3, "W"), SAE_ERANGE);
        ck_assert_ptr_nonnull(strstr(sae_last_error(), "W[0][2]"));
        ck_assert(h[0] == 7 && h[1] == 7 && h[2] == 7); /* nothing written */
    }
}
END_TEST

/* A bfloat16 model and a float model with the same rounded weights and parameters. */
static void model_pair(sae_arch arch, size_t d_in, size_t d_sae, sae_model **half,
                       sae_model **full)
{
    *half = tu_random_model(arch, d_in, d_sae, d_in * 1000 + d_sae);
    *full = tu_random_model(arch, d_in, d_sae, d_in * 1000 + d_sae);
    for (int i = 0; i < 2; i++) {
        sae_model *m = i ? *full : *half;
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 1.5));
        if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, d_sae < 20 ? 3 : 12));
        if (arch == SAE_ARCH_BATCHTOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.05));
    }
    ck_assert_ok(sae_model_set_param(*half, SAE_PARAM_BF16_WEIGHTS, 1));
    float *w = tu_malloc(d_in * d_sae * sizeof *w);
    for (int t = SAE_W_ENC; t <= SAE_W_DEC; t++) {
        ck_assert_ok(sae_model_get_tensor(*half, (sae_tensor)t, w));
        ck_assert_ok(sae_model_set_tensor(*full, (sae_tensor)t, w));
    }
    free(w);
}

START_TEST(every_operation_matches_the_float_model_with_rounded_weights)
{
    const sae_arch arch = archs[_i / (int)N_SHAPES];
    const size_t d_in = shapes[_i % (int)N_SHAPES][0], d_sae = shapes[_i % (int)N_SHAPES][1];
    sae_model *half, *full;
    model_pair(arch, d_in, d_sae, &half, &full);
    tu_rng r = {7};
    /* Where products round their activations to bfloat16, the encoder's input is made exact in
     * bfloat16 (x on a grid of 1/64 up to 100/64, b_dec of 1/8 up to 7/8, INPUT_SCALE 2: x_s a
     * multiple of 1/64 up to 256/64), so that the encodes agree as closely as with float
     * activations and no code crosses its gate; the decodes of float codes then differ by the
     * codes' rounding (tol). */
    const bool grid = rounding_path();
    if (grid) {
        float *b_dec = tu_malloc(d_in * sizeof *b_dec);
        for (size_t i = 0; i < d_in; i++)
            b_dec[i] = (float)((int)(tu_next(&r) % 15) - 7) / 8.0f;
        for (int i = 0; i < 2; i++) {
            sae_model *mm = i ? full : half;
            ck_assert_ok(sae_model_set_tensor(mm, SAE_B_DEC, b_dec));
            ck_assert_ok(sae_model_set_param(mm, SAE_PARAM_INPUT_SCALE, 2.0));
        }
        free(b_dec);
    }
    const size_t n_max = 40, k = 5;
    float *x = tu_malloc(n_max * d_in * sizeof *x), *f = tu_malloc(n_max * d_sae * sizeof *f);
    float *a = tu_malloc(n_max * (d_in + d_sae) * sizeof *a);
    float *b = tu_malloc(n_max * (d_in + d_sae) * sizeof *b);
    uint32_t *idx = tu_malloc(n_max * k * sizeof *idx), *cnt = tu_malloc(n_max * sizeof *cnt);
    float *val = tu_malloc(n_max * k * sizeof *val);
    for (size_t c = 0; c < sizeof token_counts / sizeof token_counts[0]; c++) {
        const size_t n = token_counts[c];
        const double tol = rounding_path() && n > 2 ? 1e-2 : 2e-5;
        for (size_t i = 0; i < n * d_in; i++)
            x[i] = grid ? (float)((int)(tu_next(&r) % 201) - 100) / 64.0f : 2.0f * tu_normal(&r);
        ck_assert_ok(sae_encode(half, x, n, a));
        ck_assert_ok(sae_encode(full, x, n, b));
        assert_close(a, b, n * d_sae, "encode");

        ck_assert_ok(sae_encode_sparse(half, x, n, k, idx, val, cnt));
        ck_assert_ok(sae_decode_sparse(half, idx, val, cnt, k, n, a));
        ck_assert_ok(sae_decode_sparse(full, idx, val, cnt, k, n, b));
        assert_close(a, b, n * d_in, "decode_sparse");

        /* Codes half nonzero: the dense product, not the row-by-row path (exact in bfloat16:
         * multiples of 1/256). */
        for (size_t i = 0; i < n * d_sae; i++)
            f[i] = tu_next(&r) % 2 ? (float)(tu_next(&r) % 256) / 256.0f : 0.0f;
        ck_assert_ok(sae_decode(half, f, n, a));
        ck_assert_ok(sae_decode(full, f, n, b));
        assert_close(a, b, n * d_in, "decode (dense)");
        /* The model's own codes: sparse, decoded row by row. */
        ck_assert_ok(sae_encode(full, x, n, f));
        ck_assert_ok(sae_decode(half, f, n, a));
        ck_assert_ok(sae_decode(full, f, n, b));
        assert_close_tol(a, b, n * d_in, "decode (codes)", tol);

        ck_assert_ok(sae_reconstruct(half, x, n, a));
        ck_assert_ok(sae_reconstruct(full, x, n, b));
        assert_close_tol(a, b, n * d_in, "reconstruct", tol);

        sae_steer *sh, *sf;
        ck_assert_ok(sae_steer_new(&sh, half));
        ck_assert_ok(sae_steer_new(&sf, full));
        for (int i = 0; i < 2; i++) {
            sae_steer *s = i ? sf : sh;
            ck_assert_ok(sae_steer_clamp(s, 1, 3.0f));
            ck_assert_ok(sae_steer_scale(s, (uint32_t)d_sae - 1, 0.5f));
        }
        memcpy(a, x, n * d_in * sizeof *a);
        memcpy(b, x, n * d_in * sizeof *b);
        ck_assert_ok(sae_steer_apply(sh, a, n));
        ck_assert_ok(sae_steer_apply(sf, b, n));
        assert_close_tol(a, b, n * d_in, "steer", tol);
        sae_steer_free(sh);
        sae_steer_free(sf);
    }
    sae_steer *sh, *sf;
    ck_assert_ok(sae_steer_new(&sh, half));
    ck_assert_ok(sae_steer_new(&sf, full));
    ck_assert_ok(sae_steer_add(sh, 2, 4.0f));
    ck_assert_ok(sae_steer_add(sf, 2, 4.0f));
    ck_assert_ok(sae_steer_vector(sh, a));
    ck_assert_ok(sae_steer_vector(sf, b));
    assert_close(a, b, d_in, "steer_vector");
    sae_steer_free(sh);
    sae_steer_free(sf);

    float cos_a[4], cos_b[4];
    ck_assert_ok(sae_feature_neighbors(half, 0, 4, idx, cos_a));
    ck_assert_ok(sae_feature_neighbors(full, 0, 4, idx + 4, cos_b));
    assert_close(cos_a, cos_b, 4, "neighbour cosines");
    for (size_t j = 0; j < 4; j++)
        ck_assert_uint_eq(idx[j], idx[4 + j]);

    free(x);
    free(f);
    free(a);
    free(b);
    free(idx);
    free(cnt);
    free(val);
    sae_model_free(half);
    sae_model_free(full);
}
END_TEST

START_TEST(panels_of_any_width_give_the_product)
{
    const size_t K = 30, N = 200, n = 12;
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 3, 5, 1);
    tu_rng r = {3};
    float *wf = tu_malloc(K * N * sizeof *wf), *A = tu_malloc(n * K * sizeof *A);
    float *C = tu_malloc(n * N * sizeof *C);
    uint16_t *W = tu_malloc(K * N * sizeof *W);
    tu_fill(&r, wf, K * N, -1.0f, 1.0f);
    tu_fill(&r, A, n * K, -1.0f, 1.0f);
    ck_assert_ok(sae__bf16_narrow(wf, W, K * N, N, "W"));
    sae__bf16_widen(W, wf, K * N);
    const size_t widths[] = {64, 72, 199, 200, 1000};
    for (size_t p = 0; p < sizeof widths / sizeof widths[0]; p++) {
        for (size_t i = 0; i < n * N; i++)
            C[i] = 1.0f; /* the product is added to C */
        ck_assert_ok(sae__bf16_gemm_panels(m, W, K, N, A, n, C, widths[p]));
        for (size_t t = 0; t < n; t++)
            for (size_t j = 0; j < N; j++) {
                double want = 1.0;
                for (size_t q = 0; q < K; q++)
                    want += (double)A[t * K + q] * wf[q * N + j];
                ck_assert_msg(fabs(C[t * N + j] - want) < 1e-4, "width %zu: C[%zu][%zu] %g, want %g",
                              widths[p], t, j, (double)C[t * N + j], want);
            }
    }
    free(wf);
    free(A);
    free(C);
    free(W);
    sae_model_free(m);
}
END_TEST

START_TEST(round_trips_keep_the_rounded_weights)
{
    const size_t d_in = 24, d_sae = 70, count = d_in * d_sae;
    sae_model *half, *full;
    model_pair(archs[_i], d_in, d_sae, &half, &full);
    double v = -1;
    ck_assert_ok(sae_model_get_param(half, SAE_PARAM_BF16_WEIGHTS, &v));
    ck_assert(v == 1.0);
    ck_assert_ok(sae_model_get_param(full, SAE_PARAM_BF16_WEIGHTS, &v));
    ck_assert(v == 0.0);
    ck_assert_ok(sae_model_set_param(half, SAE_PARAM_BF16_WEIGHTS, 1)); /* again: no change */
    float *a = tu_malloc(count * sizeof *a), *b = tu_malloc(count * sizeof *b);

    /* Saved as BF16 tensors, loaded as float weights with the same values. */
    char *path = tu_tmp_path("bf16.safetensors");
    ck_assert_ok(sae_model_save(half, path));
    sae_model *loaded;
    ck_assert_ok(sae_model_load(&loaded, path));
    ck_assert_str_eq(sae_model_dtype(loaded), "BF16");
    for (int t = SAE_W_ENC; t <= SAE_B_DEC; t++) {
        size_t len = t <= SAE_W_DEC ? count : t == SAE_B_ENC ? d_sae : d_in;
        ck_assert_ok(sae_model_get_tensor(loaded, (sae_tensor)t, a));
        ck_assert_ok(sae_model_get_tensor(full, (sae_tensor)t, b));
        ck_assert_mem_eq(a, b, len * sizeof *a);
    }
    sae_model_free(loaded);
    free(path);

    /* Back to float: exactly the rounded values. */
    ck_assert_ok(sae_model_set_param(half, SAE_PARAM_BF16_WEIGHTS, 0));
    for (int t = SAE_W_ENC; t <= SAE_W_DEC; t++) {
        ck_assert_ok(sae_model_get_tensor(half, (sae_tensor)t, a));
        ck_assert_ok(sae_model_get_tensor(full, (sae_tensor)t, b));
        ck_assert_mem_eq(a, b, count * sizeof *a);
    }

    /* set_tensor on a bfloat16 model rounds; a value beyond bfloat16 is refused, nothing changed. */
    ck_assert_ok(sae_model_set_param(half, SAE_PARAM_BF16_WEIGHTS, 1));
    for (size_t i = 0; i < count; i++)
        a[i] = 1.00390625f; /* a tie: rounds to 1 */
    ck_assert_ok(sae_model_set_tensor(half, SAE_W_DEC, a));
    ck_assert_ok(sae_model_get_tensor(half, SAE_W_DEC, b));
    for (size_t i = 0; i < count; i++)
        ck_assert(b[i] == 1.0f);
    a[count - 1] = 3.4e38f;
    ck_assert_sae(sae_model_set_tensor(half, SAE_W_DEC, a), SAE_ERANGE);
    ck_assert_ok(sae_model_get_tensor(half, SAE_W_DEC, b));
    for (size_t i = 0; i < count; i++)
        ck_assert(b[i] == 1.0f);
    /* ... and the decoder norms follow the rounded rows. */
    uint32_t idx[1];
    float cos[1];
    ck_assert_ok(sae_feature_neighbors(half, 0, 1, idx, cos));
    ck_assert_float_eq_tol(cos[0], 1.0f, 1e-6f);
    free(a);
    free(b);
    sae_model_free(half);
    sae_model_free(full);
}
END_TEST

START_TEST(switching_refuses_bad_values_and_out_of_range_weights)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 6, 9);
    const double bad[] = {0.5, 2.0, -1.0, NAN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_sae(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, bad[i]), SAE_EINVAL);
        ck_assert_ptr_nonnull(strstr(sae_last_error(), "BF16_WEIGHTS"));
    }
    float w[24];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, w));
    w[5] = 3.4e38f;
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_ENC, w));
    ck_assert_sae(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1), SAE_ERANGE);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "W_enc[0][5]"));
    double v = -1;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_BF16_WEIGHTS, &v));
    ck_assert(v == 0.0);
    float back[24];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, back));
    ck_assert_mem_eq(back, w, sizeof w);
    sae_model_free(m);
}
END_TEST

START_TEST(training_needs_float_weights)
{
    sae_model *m = tu_random_model(SAE_ARCH_TOPK, 8, 16, 2);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    float x[8 * 32];
    tu_rng r = {5};
    tu_fill(&r, x, 8 * 32, -1.0f, 1.0f);
    ck_assert_ok(sae_trainer_init(t, x, 32));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1));
    ck_assert_sae(sae_trainer_step(t, x, 32), SAE_ESTATE);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "BF16_WEIGHTS"));
    ck_assert_sae(sae_trainer_init(t, x, 32), SAE_ESTATE);
    char *path = tu_tmp_path("bf16-trainer.safetensors");
    ck_assert_sae(sae_trainer_save(t, path), SAE_ESTATE);
    ck_assert_sae(sae_trainer_load(t, path), SAE_ESTATE);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 0));
    ck_assert_ok(sae_trainer_step(t, x, 32));
    free(path);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* Which path this process runs, which it was asked for (ctest runs this suite three times:
 * SAE_BF16_ISA unset, "avx512_bf16" and "none"), and which it cannot run here. */
START_TEST(the_path_is_the_one_asked_for_or_says_why_not)
{
    const char *asked = getenv("SAE_BF16_ISA");
    const sae_bf16_path got = sae__bf16_isa();
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 6, 1);
    ck_assert_int_eq(sae_model_bf16_path(m), SAE_BF16_PATH_FLOAT);
    ck_assert_int_eq(sae_model_bf16_path(NULL), SAE_BF16_PATH_FLOAT);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1));
    ck_assert_int_eq(sae_model_bf16_path(m), got);
    sae_model_free(m);
    ck_assert_str_eq(sae_bf16_path_name(SAE_BF16_PATH_AMX), "amx");
    ck_assert_str_eq(sae_bf16_path_name(SAE_BF16_PATH_AVX512_BF16), "avx512_bf16");
    ck_assert_str_eq(sae_bf16_path_name(SAE_BF16_PATH_WIDEN), "widen");
    ck_assert_str_eq(sae_bf16_path_name(SAE_BF16_PATH_FLOAT), "float");
    ck_assert_ptr_null(sae_bf16_path_name((sae_bf16_path)9));
    fprintf(stderr, "bf16 products: path %s (SAE_BF16_ISA=%s)\n", sae_bf16_path_name(got),
            asked ? asked : "unset");
    if (asked != NULL && strcmp(asked, "none") == 0)
        ck_assert_int_eq(got, SAE_BF16_PATH_WIDEN);
    else if (asked != NULL && strcmp(asked, "avx512_bf16") == 0 && got != SAE_BF16_PATH_AVX512_BF16)
        fprintf(stderr, "bf16 products: avx512_bf16 not tested here: %s\n",
                got == SAE_BF16_PATH_AMX ? "oneDNN had run before the cap (cannot happen here)"
                                         : "no AVX512-BF16 on this CPU, or no oneDNN in this build");
    else if (asked == NULL && got == SAE_BF16_PATH_WIDEN)
        fprintf(stderr, "bf16 products: amx and avx512_bf16 not tested here: no such instructions "
                        "on this CPU, or no oneDNN in this build\n");
    else if (asked == NULL && got == SAE_BF16_PATH_AVX512_BF16)
        fprintf(stderr, "bf16 products: amx not tested here: no AMX on this CPU\n");
}
END_TEST

/* Round to bfloat16 and back (the reference rounding above). */
static double rounded(float v, bool round) { return round ? (double)reference_round(v) : v; }

/* sae__weights_product of a bfloat16 model, W_enc and W_dec, beta 0 and 1, against float64 sums
 * over the rounded weights (and, where the path rounds them, the rounded activations), for shapes
 * off every multiple of 16 and 32 and every n from 1 to 40; and the same bits whatever the thread
 * count. Codes: dense, or a quarter nonzero (the few-token kernel then skips rows). */
static const size_t odd_shapes[][2] = {{17, 45}, {33, 97}, {130, 61}, {5, 515}};

START_TEST(products_match_float64_sums_on_this_path)
{
    const size_t d_in = odd_shapes[_i][0], d_sae = odd_shapes[_i][1];
    sae_model *m = tu_random_model(SAE_ARCH_RELU, d_in, d_sae, 11 + (uint64_t)_i);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1));
    const bool matrix = rounding_path();
    const size_t n_max = 40, threads[] = {2, 3, 8};
    tu_rng r = {99 + (uint64_t)_i};
    float *w = tu_malloc(d_in * d_sae * sizeof *w);
    float *A = tu_malloc(n_max * (d_in + d_sae) * sizeof *A);
    float *C0 = tu_malloc(n_max * (d_in + d_sae) * sizeof *C0);
    float *C = tu_malloc(n_max * (d_in + d_sae) * sizeof *C);
    float *Ct = tu_malloc(n_max * (d_in + d_sae) * sizeof *Ct);
    /* The products read the weights' copy in oneDNN's layout, made when the model switched; the
     * second pass writes new weights, which must remake that copy. */
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            for (int t = SAE_W_ENC; t <= SAE_W_DEC; t++) {
                tu_fill(&r, w, d_in * d_sae, -1.0f, 1.0f);
                ck_assert_ok(sae_model_set_tensor(m, (sae_tensor)t, w));
            }
        ck_assert_msg(matrix == (m->W_enc16p != NULL && m->W_dec16p != NULL),
                      "packed weights %s on the %s path", m->W_enc16p ? "made" : "missing",
                      sae_bf16_path_name(sae__bf16_isa()));
        for (int t = SAE_W_ENC; t <= SAE_W_DEC; t++) {
            const size_t K = t == SAE_W_ENC ? d_in : d_sae, N = t == SAE_W_ENC ? d_sae : d_in;
            ck_assert_ok(sae_model_get_tensor(m, (sae_tensor)t, w)); /* the rounded weights */
            for (size_t n = 1; n <= n_max; n++)
                for (int variant = 0; variant < 4; variant++) {
                    const float beta = (float)(variant & 1);
                    const bool sparse = variant & 2;
                    for (size_t i = 0; i < n * K; i++)
                        A[i] = sparse && tu_next(&r) % 4 ? 0.0f : 2.0f * tu_normal(&r);
                    tu_fill(&r, C0, n * N, -1.0f, 1.0f);
                    memcpy(C, C0, n * N * sizeof *C);
                    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, 1));
                    ck_assert_ok(sae__weights_product(m, (sae_tensor)t, A, n, C, beta));
                    /* The few-token kernel (float activations) takes tokens x rows used <= 2 K. */
                    size_t used = 0;
                    for (size_t k = 0; k < K; k++) {
                        bool any = false;
                        for (size_t q = 0; q < n; q++)
                            any |= A[q * K + k] != 0.0f;
                        used += any;
                    }
                    const bool round = matrix && !(n <= 6 && n * used <= 2 * K);
                    for (size_t q = 0; q < n; q++)
                        for (size_t j = 0; j < N; j++) {
                            double want = beta * (double)C0[q * N + j], mass = fabs(want);
                            for (size_t k = 0; k < K; k++) {
                                double term = rounded(A[q * K + k], round) * w[k * N + j];
                                want += term;
                                mass += fabs(term);
                            }
                            ck_assert_msg(fabs(C[q * N + j] - want) <= 1e-5 * mass + 1e-30,
                                          "%s %zu x %zu, n %zu, beta %g, %s, activations %s: "
                                          "C[%zu][%zu] = %.9g, want %.9g",
                                          t == SAE_W_ENC ? "W_enc" : "W_dec", K, N, n, (double)beta,
                                          sparse ? "sparse" : "dense",
                                          round ? "rounded" : "float", q, j,
                                          (double)C[q * N + j], want);
                        }
                    for (size_t h = 0; h < sizeof threads / sizeof threads[0]; h++) {
                        memcpy(Ct, C0, n * N * sizeof *Ct);
                        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, (double)threads[h]));
                        ck_assert_ok(sae__weights_product(m, (sae_tensor)t, A, n, Ct, beta));
                        ck_assert_msg(memcmp(C, Ct, n * N * sizeof *C) == 0,
                                      "%zu threads differ from 1: %zu x %zu, n %zu",
                                      threads[h], K, N, n);
                    }
                }
        }
    }
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 0));
    ck_assert(m->W_enc16p == NULL && m->W_dec16p == NULL);
    free(w);
    free(A);
    free(C0);
    free(C);
    free(Ct);
    sae_model_free(m);
}
END_TEST


/* ---- mixed-precision training (SAE_TRAIN_BF16, train_bf16.c) -------------------------------- */

static double r64(double v, bool round) { return round ? (double)reference_round((float)v) : v; }

/* A sum's reference: the float64 sum, its mass (sum of |terms|) and largest term. */
typedef struct {
    double sum, mass, big;
} ref_sum;

static void ref_add(ref_sum *s, double term)
{
    s->sum += term;
    s->mass += fabs(term);
    s->big = fmax(s->big, fabs(term));
}

/* The tolerance of one sum: float32 accumulation (1e-5 of the mass), plus one term whose operand
 * lies so close to a bfloat16 rounding boundary that float32 and float64 intermediates round it
 * apart (2^-8 of the largest term; none of these sums is hit twice). */
static bool ref_close(double got, const ref_sum *s, bool round)
{
    return fabs(got - s->sum) <= 1e-5 * s->mass + (round ? 0x1p-8 * s->big : 0.0) + 1e-30;
}

/* The ReLU step's gradient sums (buf sections W_enc, W_dec, b_enc, b_dec), computed in float64
 * from the model before the step, with every product's operands rounded to bfloat16 if round:
 * pre = r(xin) r(W_enc) + b_enc, f = relu(pre), E = b_dec - x_s + r(f) r(W_dec), G = (r(2E)
 * r(W_dec)^T + lambda ||W_dec[i]||) [f > 0]; dW_dec = r(f)^T r(2E) + lambda colsum W_dec[i] /
 * ||W_dec[i]||; dW_enc = r(xin)^T r(G); db_enc = sum G; db_dec = sum 2E - W_enc db_enc.
 * Returns how many of the got sums are off (printing the first few). */
static size_t relu_grad_mismatches(const sae_model *m, const float *x, size_t n, double lambda,
                                   const float *got, const sae__train_layout *L, bool round)
{
    const size_t d = sae_model_d_in(m), s = sae_model_d_sae(m);
    float *We = tu_malloc(d * s * sizeof *We), *Wd = tu_malloc(s * d * sizeof *Wd);
    float *be = tu_malloc(s * sizeof *be), *bd = tu_malloc(d * sizeof *bd);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, We));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, Wd));
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_ENC, be));
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_DEC, bd));
    double scale;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &scale));
    float *xs = tu_malloc(n * d * sizeof *xs), *xin = tu_malloc(n * d * sizeof *xin);
    float *f = tu_malloc(n * s * sizeof *f), *E2 = tu_malloc(n * d * sizeof *E2);
    float *G = tu_malloc(n * s * sizeof *G);
    double *norm = tu_malloc(s * sizeof *norm), *colsum = tu_malloc(s * sizeof *colsum);
    for (size_t i = 0; i < s; i++) {
        double q = 0.0;
        for (size_t j = 0; j < d; j++)
            q += (double)Wd[i * d + j] * Wd[i * d + j];
        norm[i] = sqrt(q);
        colsum[i] = 0.0;
    }
    for (size_t t = 0; t < n * d; t++) { /* float, as the trainer computes them */
        xs[t] = (float)scale * x[t];
        xin[t] = xs[t] - bd[t % d];
    }
    for (size_t t = 0; t < n; t++) {
        for (size_t i = 0; i < s; i++) {
            double acc = be[i];
            for (size_t j = 0; j < d; j++)
                acc += r64(xin[t * d + j], round) * r64(We[j * s + i], round);
            f[t * s + i] = acc > 0.0 ? (float)acc : 0.0f;
            colsum[i] += f[t * s + i];
        }
        for (size_t j = 0; j < d; j++) {
            double acc = (double)(bd[j] - xs[t * d + j]);
            for (size_t i = 0; i < s; i++)
                acc += r64(f[t * s + i], round) * r64(Wd[i * d + j], round);
            E2[t * d + j] = (float)(2.0 * acc);
        }
        for (size_t i = 0; i < s; i++) {
            double acc = 0.0;
            for (size_t j = 0; j < d; j++)
                acc += r64(E2[t * d + j], round) * r64(Wd[i * d + j], round);
            G[t * s + i] = f[t * s + i] > 0.0f ? (float)(acc + lambda * norm[i]) : 0.0f;
        }
    }
    size_t bad = 0;
#define CHECK(section, index, rs)                                                                  \
    do {                                                                                           \
        const double g_ = got[L->section + (index)];                                               \
        if (!ref_close(g_, &(rs), round) && bad++ < 5 && round)                                    \
            fprintf(stderr, "%s %s[%zu]: %.9g, float64 %.9g (mass %.3g)\n",                        \
                    round ? "rounded" : "float", #section, (size_t)(index), g_, (rs).sum,          \
                    (rs).mass);                                                                    \
    } while (0)
    for (size_t i = 0; i < s; i++)
        for (size_t j = 0; j < d; j++) {
            ref_sum w = {0, 0, 0}, e = {0, 0, 0};
            for (size_t t = 0; t < n; t++) {
                ref_add(&w, r64(f[t * s + i], round) * r64(E2[t * d + j], round));
                ref_add(&e, r64(xin[t * d + j], round) * r64(G[t * s + i], round));
            }
            if (lambda != 0.0 && colsum[i] != 0.0)
                ref_add(&w, lambda * colsum[i] * Wd[i * d + j] / norm[i]);
            CHECK(W_dec, i * d + j, w);
            CHECK(W_enc, j * s + i, e);
        }
    double *gbe = tu_malloc(s * sizeof *gbe);
    for (size_t i = 0; i < s; i++) {
        ref_sum b = {0, 0, 0};
        for (size_t t = 0; t < n; t++)
            ref_add(&b, G[t * s + i]);
        gbe[i] = got[L->b_enc + i]; /* the trainer's sum enters db_dec, as in the step */
        CHECK(b_enc, i, b);
    }
    for (size_t j = 0; j < d; j++) {
        ref_sum b = {0, 0, 0};
        for (size_t t = 0; t < n; t++)
            ref_add(&b, E2[t * d + j]);
        for (size_t i = 0; i < s; i++)
            ref_add(&b, -(double)We[j * s + i] * gbe[i]);
        CHECK(b_dec, j, b);
    }
#undef CHECK
    void *blocks[] = {We, Wd, be, bd, xs, xin, f, E2, G, norm, colsum, gbe};
    for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++)
        free(blocks[i]);
    return bad;
}

/* A ReLU model holding m's weights and input scale now. */
static sae_model *relu_snapshot(const sae_model *m)
{
    const size_t d = sae_model_d_in(m), s = sae_model_d_sae(m);
    sae_model *c;
    ck_assert_ok(sae_model_new(&c, SAE_ARCH_RELU, d, s));
    float *buf = tu_malloc(d * s * sizeof *buf);
    const sae_tensor ts[] = {SAE_W_ENC, SAE_W_DEC, SAE_B_ENC, SAE_B_DEC};
    for (size_t i = 0; i < 4; i++) {
        ck_assert_ok(sae_model_get_tensor(m, ts[i], buf));
        ck_assert_ok(sae_model_set_tensor(c, ts[i], buf));
    }
    double scale;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &scale));
    ck_assert_ok(sae_model_set_param(c, SAE_PARAM_INPUT_SCALE, scale));
    free(buf);
    return c;
}

/* Odd shapes, and token counts not multiples of 16 or 32; loop index: shape x (every product on
 * oneDNN, or the default split by size). */
static const size_t train_shapes[][3] = {{19, 70, 37}, {33, 47, 9}, {8, 130, 40}};

START_TEST(bf16_training_step_matches_float64_over_rounded_products)
{
    const size_t *sh = train_shapes[_i / 2];
    const size_t d = sh[0], s = sh[1], n = sh[2];
    const bool all_onednn = _i % 2 == 0;
    float *x = tu_train_data(8 * n, d, 5 + (uint64_t)_i);
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, d, s));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-2));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 0.3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 1));
    double on;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_BF16, &on));
    ck_assert(on == 1.0);
    if (all_onednn)
        sae__train_bf16_set_small(t, 0.0);
    ck_assert_ok(sae_trainer_init(t, x, 4 * n));
    tu_capture cap = {0};
    ck_assert_ok(sae_trainer_set_allreduce(t, tu_capture_allreduce, &cap));
    sae__train_layout L;
    sae__train_layout_of(m, &L);
    /* The first step, and the fourth (the weights then moved by three bfloat16 steps). */
    for (size_t step = 0; step < 4; step++) {
        sae_model *before = NULL;
        if (step == 0 || step == 3)
            before = relu_snapshot(m);
        const float *batch = x + (step % 4) * n * d;
        ck_assert_ok(sae_trainer_step(t, batch, n));
        if (before == NULL)
            continue;
        const double lambda = 0.3;
        ck_assert_msg(relu_grad_mismatches(before, batch, n, lambda, cap.copy, &L, true) == 0,
                      "%zu x %zu, %zu tokens, step %zu (%s): the bfloat16 step's gradient is "
                      "not the rounded products' (above)",
                      d, s, n, step + 1, all_onednn ? "all oneDNN" : "default split");
        /* It is not the float products' either: the rounding happened. */
        ck_assert_msg(relu_grad_mismatches(before, batch, n, lambda, cap.copy, &L, false) > 0,
                      "the bfloat16 step's gradient equals the float one's");
        sae_model_free(before);
    }
    free(cap.copy);
    sae_trainer_free(t);
    sae_model_free(m);
    free(x);
}
END_TEST

/* What a TopK step reads besides the batch: the model's tensors and the trainer's state before
 * the step (dead counters, normalizers), copied so the reference sees the step's inputs. */
typedef struct {
    size_t d, s, k, auxk;
    float *We, *Wd, *be, *bd;
    double scale, coeff, mse_norm, aux_norm;
    bool *dead;
} topk_before;

static topk_before topk_snapshot(const sae_trainer *t)
{
    const sae_model *m = t->m;
    topk_before b = {.d = m->d_in, .s = m->d_sae, .k = m->k};
    const size_t d = b.d, s = b.s;
    b.We = tu_malloc(d * s * sizeof *b.We), b.Wd = tu_malloc(s * d * sizeof *b.Wd);
    b.be = tu_malloc(s * sizeof *b.be), b.bd = tu_malloc(d * sizeof *b.bd);
    memcpy(b.We, m->W_enc, d * s * sizeof *b.We);
    memcpy(b.Wd, m->W_dec, s * d * sizeof *b.Wd);
    memcpy(b.be, m->b_enc, s * sizeof *b.be);
    memcpy(b.bd, m->b_dec, d * sizeof *b.bd);
    b.scale = m->input_scale;
    b.auxk = (size_t)t->param[SAE_TRAIN_AUXK];
    b.coeff = t->param[SAE_TRAIN_AUXK_COEFF];
    b.mse_norm = t->mse_norm;
    b.aux_norm = t->aux_norm;
    b.dead = tu_malloc(s * sizeof *b.dead);
    for (size_t i = 0; i < s; i++)
        b.dead[i] = t->since_fired[i] >= (uint64_t)t->param[SAE_TRAIN_DEAD_TOKENS];
    return b;
}

static void topk_before_free(topk_before *b)
{
    free(b->We), free(b->Wd), free(b->be), free(b->bd), free(b->dead);
}

/* The largest `want` of v [s] among those with take[i] (all if take is NULL), ties to the lower
 * index, kept when positive: their indices into idx, returns how many. */
static size_t ref_top(const float *v, const bool *take, size_t s, size_t want, size_t *idx)
{
    size_t kept = 0;
    bool *used = tu_malloc(s * sizeof *used);
    memset(used, 0, s * sizeof *used);
    for (size_t q = 0; q < want; q++) {
        size_t best = s;
        for (size_t i = 0; i < s; i++)
            if ((take == NULL || take[i]) && !used[i] && (best == s || v[i] > v[best]))
                best = i;
        if (best == s)
            break;
        used[best] = true;
        if (v[best] > 0.0f)
            idx[kept++] = best;
    }
    free(used);
    return kept;
}

/* The TopK step's gradient sums (buf sections W_enc, W_dec, b_enc, b_dec), in float64 from the
 * state before the step, with the operands of every matrix product rounded to bfloat16 if round.
 * The products are the encoder's, pre = r(xin) r(W_enc) + b_enc, and, when AuxK runs dense (16
 * AUXK >= d_sae), AuxK's: D = e + r(F_aux) r(W_dec), D' = g_aux D, dW_dec += r(F_aux)^T r(D'),
 * G_aux = r(D') r(W_dec)^T [F_aux > 0], dW_enc += r(xin)^T r(G_aux). The sparse decoder and the
 * per-latent backward pass (f e' into W_dec rows, e' . W_dec[i] into b_enc and W_enc columns; the
 * AuxK latents' too when AuxK runs sparse) are float32 vector operations: not rounded. Returns
 * how many got sums are off (printing the first few). */
static size_t topk_grad_mismatches(const topk_before *b, const float *x, size_t n,
                                   const float *got, const sae__train_layout *L, bool round)
{
    const size_t d = b->d, s = b->s;
    const size_t auxk = b->auxk, k = b->k < s ? b->k : s;
    size_t n_dead = 0;
    for (size_t i = 0; i < s; i++)
        n_dead += b->dead[i];
    const size_t ka = b->coeff > 0.0 ? (auxk < n_dead ? auxk : n_dead) : 0;
    const bool aux_dense = ka > 0 && 16 * ka >= s;
    const double g_main = (float)(2.0 / b->mse_norm), g_aux = (float)(2.0 * b->coeff / b->aux_norm);
    ref_sum *wenc = tu_malloc(d * s * sizeof *wenc), *wdec = tu_malloc(s * d * sizeof *wdec);
    ref_sum *benc = tu_malloc(s * sizeof *benc), *bdec = tu_malloc(d * sizeof *bdec);
    memset(wenc, 0, d * s * sizeof *wenc), memset(wdec, 0, s * d * sizeof *wdec);
    memset(benc, 0, s * sizeof *benc), memset(bdec, 0, d * sizeof *bdec);
    float *xs = tu_malloc(d * sizeof *xs), *xin = tu_malloc(d * sizeof *xin);
    float *pre = tu_malloc(s * sizeof *pre);
    double *e = tu_malloc(d * sizeof *e), *ep = tu_malloc(d * sizeof *ep);
    double *dv = tu_malloc(d * sizeof *dv);
    size_t *act = tu_malloc(s * sizeof *act), *aux = tu_malloc(s * sizeof *aux);
    for (size_t t = 0; t < n; t++) {
        for (size_t j = 0; j < d; j++) { /* float, as the trainer computes them */
            xs[j] = (float)b->scale * x[t * d + j];
            xin[j] = xs[j] - b->bd[j];
        }
        for (size_t i = 0; i < s; i++) {
            double acc = b->be[i];
            for (size_t j = 0; j < d; j++)
                acc += r64(xin[j], round) * r64(b->We[j * s + i], round);
            pre[i] = (float)acc;
        }
        const size_t na = ref_top(pre, NULL, s, k, act);
        const size_t nx = ka > 0 ? ref_top(pre, b->dead, s, ka, aux) : 0;
        for (size_t j = 0; j < d; j++) {
            double acc = (double)b->bd[j] - xs[j];
            for (size_t a = 0; a < na; a++)
                acc += (double)pre[act[a]] * b->Wd[act[a] * d + j];
            e[j] = acc;
            ep[j] = g_main * acc;
            ref_add(&bdec[j], ep[j]);
        }
        for (size_t a = 0; a < na; a++) { /* the main loss: float vector operations */
            const size_t i = act[a];
            double dpre = 0.0;
            for (size_t j = 0; j < d; j++) {
                ref_add(&wdec[i * d + j], (double)pre[i] * ep[j]);
                dpre += ep[j] * b->Wd[i * d + j];
            }
            ref_add(&benc[i], dpre);
            for (size_t j = 0; j < d; j++)
                ref_add(&wenc[j * s + i], dpre * xin[j]);
        }
        if (ka == 0)
            continue;
        /* AuxK: every token joins the term once a latent is dead. */
        for (size_t j = 0; j < d; j++) {
            double acc = e[j];
            for (size_t a = 0; a < nx; a++)
                acc += r64(pre[aux[a]], aux_dense && round) *
                       r64(b->Wd[aux[a] * d + j], aux_dense && round);
            dv[j] = g_aux * acc;
            ref_add(&bdec[j], dv[j]);
        }
        const bool r = aux_dense && round;
        for (size_t a = 0; a < nx; a++) {
            const size_t i = aux[a];
            double ga = 0.0;
            for (size_t j = 0; j < d; j++) {
                ref_add(&wdec[i * d + j], r64(pre[i], r) * r64(dv[j], r));
                ga += r64(dv[j], r) * r64(b->Wd[i * d + j], r);
            }
            /* The dense path holds G_aux as floats before its product. */
            const double gq = aux_dense ? (double)(float)ga : ga;
            ref_add(&benc[i], gq);
            for (size_t j = 0; j < d; j++)
                ref_add(&wenc[j * s + i], r64(xin[j], r) * r64(gq, r));
        }
    }
    for (size_t j = 0; j < d; j++) /* b_dec also enters through xin = xs - b_dec */
        for (size_t i = 0; i < s; i++)
            ref_add(&bdec[j], -(double)b->We[j * s + i] * got[L->b_enc + i]);
    size_t bad = 0;
#define CHECK(section, index, rs)                                                                  \
    do {                                                                                           \
        const double g_ = got[L->section + (index)];                                               \
        if (!ref_close(g_, &(rs), round) && bad++ < 5 && round)                                    \
            fprintf(stderr, "TopK %s[%zu]: %.9g, float64 %.9g (mass %.3g)\n", #section,          \
                    (size_t)(index), g_, (rs).sum, (rs).mass);                                     \
    } while (0)
    for (size_t q = 0; q < d * s; q++) {
        CHECK(W_enc, q, wenc[q]);
        CHECK(W_dec, q, wdec[q]);
    }
    for (size_t i = 0; i < s; i++)
        CHECK(b_enc, i, benc[i]);
    for (size_t j = 0; j < d; j++)
        CHECK(b_dec, j, bdec[j]);
#undef CHECK
    void *blocks[] = {wenc, wdec, benc, bdec, xs, xin, pre, e, ep, dv, act, aux};
    for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++)
        free(blocks[i]);
    return bad;
}

/* d_in, d_sae, tokens, AUXK: AuxK dense (16 AUXK >= d_sae) in the first and last, sparse in the
 * second; loop index: case x (every product on oneDNN, or the default split by size). */
static const size_t topk_cases[][4] = {{19, 70, 37, 8}, {33, 47, 9, 2}, {8, 130, 40, 16}};

START_TEST(bf16_topk_step_matches_float64_over_rounded_products)
{
    const size_t *c = topk_cases[_i / 2];
    const size_t d = c[0], s = c[1], n = c[2];
    const bool all_onednn = _i % 2 == 0;
    float *x = tu_train_data(8 * n, d, 41 + (uint64_t)_i);
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, d, s));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 4));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-2));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK, (double)c[3]));
    /* Latents that did not fire in the first batch are dead from the second step on. */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, (double)n));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 1));
    if (all_onednn)
        sae__train_bf16_set_small(t, 0.0);
    ck_assert_ok(sae_trainer_init(t, x, 4 * n));
    tu_capture cap = {0};
    ck_assert_ok(sae_trainer_set_allreduce(t, tu_capture_allreduce, &cap));
    sae__train_layout L;
    sae__train_layout_of(m, &L);
    size_t aux_steps = 0;
    /* The first step (no latent dead yet) and the third and fourth (AuxK at work). */
    for (size_t step = 0; step < 4; step++) {
        const bool check = step != 1;
        topk_before b = {0};
        if (check)
            b = topk_snapshot(t);
        const float *batch = x + (step % 4) * n * d;
        ck_assert_ok(sae_trainer_step(t, batch, n));
        if (!check)
            continue;
        if (step > 0)
            aux_steps += tu_metric(t, SAE_METRIC_AUXK_LOSS) > 0.0;
        ck_assert_msg(topk_grad_mismatches(&b, batch, n, cap.copy, &L, true) == 0,
                      "%zu x %zu, %zu tokens, AuxK %zu, step %zu (%s): the bfloat16 TopK step's "
                      "gradient is not the rounded products' (above)",
                      d, s, n, c[3], step + 1, all_onednn ? "all oneDNN" : "default split");
        ck_assert_msg(topk_grad_mismatches(&b, batch, n, cap.copy, &L, false) > 0,
                      "the bfloat16 TopK step's gradient equals the float one's");
        topk_before_free(&b);
    }
    ck_assert_msg(aux_steps == 2, "AuxK did not act in the checked steps (%zu of 2)", aux_steps);
    free(cap.copy);
    sae_trainer_free(t);
    sae_model_free(m);
    free(x);
}
END_TEST

/* The same steps give the same bits on 1, 2 and 3 threads (oneDNN's team follows
 * SAE_PARAM_THREADS), for ReLU, TopK (with AuxK) and JumpReLU, every product on oneDNN. */
START_TEST(bf16_training_is_independent_of_the_thread_count)
{
    const sae_arch arch = _i == 0 ? SAE_ARCH_RELU : _i == 1 ? SAE_ARCH_TOPK : SAE_ARCH_JUMPRELU;
    const size_t d = 29, s = 150, n = 45, threads[] = {1, 2, 3};
    float *x = tu_train_data(4 * n, d, 17);
    float *first = tu_malloc(d * s * 2 * sizeof *first), *w = tu_malloc(d * s * 2 * sizeof *w);
    for (size_t h = 0; h < 3; h++) {
        sae_model *m;
        ck_assert_ok(sae_model_new(&m, arch, d, s));
        if (arch == SAE_ARCH_TOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 5));
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THREADS, (double)threads[h]));
        sae_trainer *t;
        ck_assert_ok(sae_trainer_new(&t, m));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-2));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK, 8));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 30));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 1));
        sae__train_bf16_set_small(t, 0.0);
        ck_assert_ok(sae_trainer_init(t, x, 4 * n));
        for (size_t step = 0; step < 12; step++)
            ck_assert_ok(sae_trainer_step(t, x + (step % 4) * n * d, n));
        ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, w));
        ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, w + d * s));
        if (h == 0)
            memcpy(first, w, d * s * 2 * sizeof *w);
        else
            ck_assert_msg(memcmp(first, w, d * s * 2 * sizeof *w) == 0,
                          "%s: %zu threads give other weights than 1", sae_arch_name(arch),
                          threads[h]);
        sae_trainer_free(t);
        sae_model_free(m);
    }
    free(first);
    free(w);
    free(x);
}
END_TEST

/* A run in bfloat16 reaches the float run's FVU (within 3% of it, on held-out tokens), for ReLU
 * and TopK, on every product path; and SAE_TRAIN_BF16 takes 0 and 1 only. */
START_TEST(bf16_training_reaches_the_float_fvu)
{
    const sae_arch arch = _i == 0 ? SAE_ARCH_RELU : SAE_ARCH_TOPK;
    const size_t d = 24, s = 96, n = 64, steps = 300;
    tu_rng r = {23};
    /* Tokens made of a few of 96 planted directions, so a dictionary can explain them. */
    float *dirs = tu_malloc(s * d * sizeof *dirs);
    for (size_t i = 0; i < s * d; i++)
        dirs[i] = tu_normal(&r);
    const size_t total = (steps + 40) * n;
    float *x = tu_malloc(total * d * sizeof *x);
    for (size_t t = 0; t < total; t++) {
        for (size_t j = 0; j < d; j++)
            x[t * d + j] = 0.05f * tu_normal(&r);
        for (int q = 0; q < 3; q++) {
            const size_t i = tu_next(&r) % s;
            const float a = 1.0f + (float)(tu_next(&r) % 100) / 50.0f;
            for (size_t j = 0; j < d; j++)
                x[t * d + j] += a * dirs[i * d + j];
        }
    }
    double fvu[2];
    for (int bf = 0; bf < 2; bf++) {
        sae_model *m;
        ck_assert_ok(sae_model_new(&m, arch, d, s));
        if (arch == SAE_ARCH_TOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 4));
        sae_trainer *t;
        ck_assert_ok(sae_trainer_new(&t, m));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 3e-3));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 0.05));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, bf));
        sae__train_bf16_set_small(t, 0.0);
        ck_assert_ok(sae_trainer_init(t, x, 4 * n));
        for (size_t step = 0; step < steps; step++)
            ck_assert_ok(sae_trainer_step(t, x + step * n * d, n));
        const sae_eval_metric which = SAE_EVAL_FVU;
        ck_assert_ok(sae_evaluate(m, x + steps * n * d, 40 * n, &which, 1, &fvu[bf]));
        sae_trainer_free(t);
        sae_model_free(m);
    }
    ck_assert_msg(fvu[0] < 0.5, "the float run did not learn (FVU %g)", fvu[0]);
    ck_assert_msg(fabs(fvu[1] - fvu[0]) <= 0.03 * fvu[0], "%s: bfloat16 FVU %g, float FVU %g",
                  sae_arch_name(arch), fvu[1], fvu[0]);
    sae_trainer *t;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, arch, d, s));
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_sae(sae_trainer_set_param(t, SAE_TRAIN_BF16, 2), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_param(t, SAE_TRAIN_BF16, 0.5), SAE_EINVAL);
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 1));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 0));
    double v;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_BF16, &v));
    ck_assert(v == 0.0);
    sae_trainer_free(t);
    sae_model_free(m);
    free(dirs);
    free(x);
}
END_TEST

/* The data of tests/fixtures/train/make.py: row i, column j is sin(0.7 (i + 1) + 1.3 j)
 * (1 + i mod 3), rounded to float; 128 rows of 8. */
static float *fixture_rows(void)
{
    float *x = tu_malloc(128 * 8 * sizeof *x);
    for (size_t i = 0; i < 128; i++)
        for (size_t j = 0; j < 8; j++)
            x[i * 8 + j] = (float)(sin(0.7 * (double)(i + 1) + 1.3 * (double)j) *
                                   (double)(1 + i % 3));
    return x;
}

/* SAE_TRAIN_BF16 is a run setting of the parameter table: a checkpoint neither stores it nor
 * changes it on load. A checkpoint written before it joined the table (tests/fixtures/train,
 * by the build of commit 34bfaff) resumes: its 4th step gives the weights that build saved. */
START_TEST(bf16_is_a_run_setting_checkpoints_neither_store_nor_restore)
{
    char *p3 = tu_path_in(SAE_TRAIN_FIXTURES, "step3.safetensors");
    char *p4 = tu_path_in(SAE_TRAIN_FIXTURES, "step4.safetensors");
    float *x = fixture_rows();
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_BATCHTOPK, 8, 16));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 1));
    ck_assert_ok(sae_trainer_load(t, p3));
    double v;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_BF16, &v));
    ck_assert_msg(v == 1.0, "loading a checkpoint changed SAE_TRAIN_BF16 to %g", v);
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_LR, &v));
    ck_assert(v == 0.01);
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_DEAD_TOKENS, &v));
    ck_assert(v == 20.0);
    ck_assert(tu_metric(t, SAE_METRIC_STEPS) == 3.0);
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 0)); /* the fixture's step was float */
    ck_assert_ok(sae_trainer_step(t, x + 3 * 16 * 8, 16));
    sae_model *want;
    ck_assert_ok(sae_model_load(&want, p4));
    const sae_tensor ts[] = {SAE_W_ENC, SAE_W_DEC, SAE_B_ENC, SAE_B_DEC};
    const size_t counts[] = {8 * 16, 16 * 8, 16, 8};
    for (size_t q = 0; q < 4; q++) {
        double *a = tu_dup_tensor(m, ts[q], counts[q]), *b = tu_dup_tensor(want, ts[q], counts[q]);
        for (size_t i = 0; i < counts[q]; i++) /* another BLAS may change the last bits */
            ck_assert_msg(fabs(a[i] - b[i]) <= 1e-5 * (1.0 + fabs(b[i])),
                          "tensor %d [%zu]: resumed %.9g, the old build %.9g", (int)ts[q], i,
                          a[i], b[i]);
        free(a);
        free(b);
    }
    double th_got, th_want;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &th_got));
    ck_assert_ok(sae_model_get_param(want, SAE_PARAM_THRESHOLD, &th_want));
    ck_assert_msg(fabs(th_got - th_want) <= 1e-5 * fabs(th_want), "threshold %.9g, old %.9g",
                  th_got, th_want);

    /* Saved with the setting on, the file does not mention it, and a trainer that loads it
     * keeps its own. */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BF16, 1));
    char *saved = tu_tmp_path("bf16_run_setting.safetensors");
    ck_assert_ok(sae_trainer_save(t, saved));
    size_t size;
    unsigned char *bytes = tu_read_file(saved, &size);
    const char key[] = "train.param.bf16";
    for (size_t i = 0; i + sizeof key - 1 <= size; i++)
        ck_assert_msg(memcmp(bytes + i, key, sizeof key - 1) != 0, "the checkpoint stores %s",
                      key);
    free(bytes);
    for (int on = 0; on < 2; on++) {
        sae_model *m2;
        ck_assert_ok(sae_model_new(&m2, SAE_ARCH_BATCHTOPK, 8, 16));
        sae_trainer *t2;
        ck_assert_ok(sae_trainer_new(&t2, m2));
        ck_assert_ok(sae_trainer_set_param(t2, SAE_TRAIN_BF16, on));
        ck_assert_ok(sae_trainer_load(t2, saved));
        ck_assert_ok(sae_trainer_get_param(t2, SAE_TRAIN_BF16, &v));
        ck_assert(v == (double)on);
        ck_assert(tu_metric(t2, SAE_METRIC_STEPS) == 4.0);
        ck_assert_ok(sae_trainer_step(t2, x + 4 * 16 * 8, 16)); /* in the precision asked for */
        sae_trainer_free(t2);
        sae_model_free(m2);
    }
    /* Validated by the table, as every parameter. */
    ck_assert_sae(sae_trainer_set_param(t, SAE_TRAIN_BF16, 2), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "bf16"));
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_BF16, &v));
    ck_assert(v == 1.0);
    sae_model_free(want);
    sae_trainer_free(t);
    sae_model_free(m);
    free(saved);
    free(x);
    free(p3);
    free(p4);
}
END_TEST

/* W_enc and W_dec the model allocates start 16 bytes past a 64-byte boundary (lib/model.c,
 * W_SHIFT_FLOATS: OpenBLAS's SGEMM is slower with its B operand on the boundary), whether made
 * new or widened back from bfloat16; freeing them (ASan in tests/run) finds the block's start. */
START_TEST(weight_matrices_sit_16_bytes_past_64)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 13, 40, 3);
    ck_assert_uint_eq((uintptr_t)m->W_enc % 64, 16);
    ck_assert_uint_eq((uintptr_t)m->W_dec % 64, 16);
    ck_assert_uint_eq((uintptr_t)m->b_enc % 64, 0);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 0));
    ck_assert_uint_eq((uintptr_t)m->W_enc % 64, 16);
    ck_assert_uint_eq((uintptr_t)m->W_dec % 64, 16);
    float *x = tu_malloc(5 * 13 * sizeof *x), *f = tu_malloc(5 * 40 * sizeof *f);
    tu_rng r = {4};
    tu_fill(&r, x, 5 * 13, -1.0f, 1.0f);
    ck_assert_ok(sae_encode(m, x, 5, f));
    free(x);
    free(f);
    sae_model_free(m);
}
END_TEST

/* The row kernels of every bfloat16 product of a few tokens and of sparse decodes: each path this
 * CPU runs (AVX2; AVX-512 takes the AVX2 copy) gives the baseline's bits, for lengths 0 to 70
 * (whole vectors and tails) at every start within a vector, coefficients of both signs and
 * zero. */
START_TEST(row_kernels_give_the_baselines_bits_on_every_path)
{
    enum { LONGEST = 70, STARTS = 8, SPAN = LONGEST + STARTS };
    tu_rng r = {91};
    uint16_t *rows = tu_malloc(4 * SPAN * sizeof *rows);
    float *y0 = tu_malloc(SPAN * sizeof *y0), *want = tu_malloc(SPAN * sizeof *want);
    float *got = tu_malloc(SPAN * sizeof *got);
    for (size_t i = 0; i < 4 * SPAN; i++) {
        const float v = tu_normal(&r);
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        rows[i] = (uint16_t)(u >> 16);
    }
    tu_fill(&r, y0, SPAN, -3.0f, 3.0f);
    const float a[4] = {tu_normal(&r), -tu_uniform(&r, 0.5f, 2.0f), 0.0f, tu_normal(&r)};
    for (int p = SAE__WIDEN_AVX2; p < SAE__WIDEN_COUNT; p++) {
        if (!sae__widen_supported((sae__widen_path)p)) {
            fprintf(stderr, "bf16 row kernels: path %s not tested: this CPU or build lacks it\n",
                    sae__widen_path_name((sae__widen_path)p));
            continue;
        }
        for (size_t start = 0; start < STARTS; start++)
            for (size_t n = 0; n <= LONGEST; n++) {
                const uint16_t *four[4] = {rows + start, rows + SPAN + start,
                                           rows + 2 * SPAN + start, rows + 3 * SPAN + start};
                memcpy(want, y0, SPAN * sizeof *want);
                memcpy(got, y0, SPAN * sizeof *got);
                sae__bf16_add_rows_on(SAE__WIDEN_SCALAR, n, a, four, want + start);
                sae__bf16_add_rows_on((sae__widen_path)p, n, a, four, got + start);
                ck_assert_msg(memcmp(got, want, SPAN * sizeof *got) == 0,
                              "four rows, path %s, n %zu, start %zu: bits differ",
                              sae__widen_path_name((sae__widen_path)p), n, start);
                sae__bf16_add_row_on(SAE__WIDEN_SCALAR, n, a[1], four[2], want + start);
                sae__bf16_add_row_on((sae__widen_path)p, n, a[1], four[2], got + start);
                ck_assert_msg(memcmp(got, want, SPAN * sizeof *got) == 0,
                              "one row, path %s, n %zu, start %zu: bits differ",
                              sae__widen_path_name((sae__widen_path)p), n, start);
            }
    }
    /* and the baseline itself against float64 sums of the same terms, rounded once at the end */
    const uint16_t *four[4] = {rows, rows + SPAN, rows + 2 * SPAN, rows + 3 * SPAN};
    memcpy(got, y0, SPAN * sizeof *got);
    sae__bf16_add_rows_on(SAE__WIDEN_SCALAR, LONGEST, a, four, got);
    for (size_t i = 0; i < LONGEST; i++) {
        double want_i = y0[i], mag = fabs(want_i);
        for (int k = 0; k < 4; k++) {
            const uint32_t u = (uint32_t)four[k][i] << 16;
            float w;
            memcpy(&w, &u, sizeof w);
            want_i += (double)a[k] * w;
            mag += fabs((double)a[k] * w);
        }
        ck_assert_msg(fabs(got[i] - want_i) <= 8 * 1.2e-7 * mag, "baseline [%zu]: %.9g vs %.9g", i,
                      (double)got[i], want_i);
    }
    free(rows);
    free(y0);
    free(want);
    free(got);
}
END_TEST

static Suite *bf16_suite(void)
{
    Suite *s = suite_create("bf16");
    TCase *tc = tcase_create("bf16");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, narrowing_rounds_to_nearest_even);
    tcase_add_test(tc, narrowing_refuses_what_bf16_cannot_hold);
    tcase_add_loop_test(tc, every_operation_matches_the_float_model_with_rounded_weights, 0,
                        (int)(N_ARCHS * N_SHAPES));
    tcase_add_test(tc, the_path_is_the_one_asked_for_or_says_why_not);
    tcase_add_loop_test(tc, products_match_float64_sums_on_this_path, 0,
                        (int)(sizeof odd_shapes / sizeof odd_shapes[0]));
    tcase_add_test(tc, panels_of_any_width_give_the_product);
    tcase_add_loop_test(tc, round_trips_keep_the_rounded_weights, 0, (int)N_ARCHS);
    tcase_add_test(tc, switching_refuses_bad_values_and_out_of_range_weights);
    tcase_add_test(tc, training_needs_float_weights);
    tcase_add_loop_test(tc, bf16_training_step_matches_float64_over_rounded_products, 0,
                        (int)(2 * sizeof train_shapes / sizeof train_shapes[0]));
    tcase_add_loop_test(tc, bf16_topk_step_matches_float64_over_rounded_products, 0,
                        (int)(2 * (sizeof topk_cases / sizeof topk_cases[0])));
    tcase_add_loop_test(tc, bf16_training_is_independent_of_the_thread_count, 0, 3);
    tcase_add_loop_test(tc, bf16_training_reaches_the_float_fvu, 0, 2);
    tcase_add_test(tc, bf16_is_a_run_setting_checkpoints_neither_store_nor_restore);
    tcase_add_test(tc, weight_matrices_sit_16_bytes_past_64);
    tcase_add_test(tc, row_kernels_give_the_baselines_bits_on_every_path);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(bf16_suite)
