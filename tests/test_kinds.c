/* Every architecture x kind (SAE, transcoder, transcoder with skip) x normalization x weight
 * storage against float64 loops written from the contract: encode, sparse encode, decode,
 * sparse decode, reconstruct, steering (apply_to, and apply for SAEs), evaluate_to, save/load;
 * then the refusals that belong to the new kinds. */
#include "testutil.h"

#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { D_IN = 13, D_SAE = 48, D_OUT_TC = 11, N = 7, K_SPARSE = 6 };

static const sae_arch archs[] = {SAE_ARCH_RELU,     SAE_ARCH_TOPK,  SAE_ARCH_BATCHTOPK,
                                 SAE_ARCH_JUMPRELU, SAE_ARCH_GATED, SAE_ARCH_GROUPMAX};
enum { N_ARCHS = 6, N_KINDS = 3, N_NORMS = 3, N_STORAGE = 2 };

typedef struct {
    sae_arch arch;
    tu_kind kind;
    sae_normalize norm;
    int bf16;
} combo;

static combo combo_of(int i)
{
    combo c;
    c.bf16 = i % N_STORAGE;
    i /= N_STORAGE;
    c.norm = (sae_normalize)(i % N_NORMS);
    i /= N_NORMS;
    c.kind = (tu_kind)(i % N_KINDS);
    i /= N_KINDS;
    c.arch = archs[i];
    return c;
}

static sae_model *make(combo c, uint64_t seed)
{
    size_t d_out = c.kind == TU_SAE ? D_IN : D_OUT_TC;
    sae_model *m = tu_random_kind(c.arch, c.kind, D_IN, D_SAE, d_out, seed);
    if (c.arch == SAE_ARCH_TOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 5));
    if (c.arch == SAE_ARCH_GROUPMAX)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 8));
    if (c.arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.05));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, c.kind == TU_SAE ? 1.7 : 1.3));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_NORMALIZE, c.norm));
    if (c.bf16)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1));
    return m;
}

static void random_tokens(float *x, size_t count, uint64_t seed)
{
    tu_rng r = {seed};
    tu_fill(&r, x, count, -1.5f, 1.5f);
}

START_TEST(every_operation_matches_the_loops)
{
    const combo c = combo_of(_i);
    sae_model *m = make(c, 100 + (uint64_t)_i);
    tu_weights w;
    tu_weights_get(m, &w);
    const size_t d_out = w.d_out;
    float x[N * D_IN], f[N * D_SAE], out[N * D_IN > N * D_OUT_TC ? N * D_IN : N * D_OUT_TC];
    double want_f[N * D_SAE], want_out[N * D_IN], want_dec[N * D_IN];
    random_tokens(x, N * D_IN, 7 + (uint64_t)_i);
    for (size_t t = 0; t < N; t++) {
        tu_ref_encode(&w, x + t * D_IN, want_f + t * D_SAE);
        tu_ref_output(&w, x + t * D_IN, want_out + t * d_out);
    }
    /* Codes, dense and one token at a time (the GEMV path). */
    ck_assert_ok(sae_encode(m, x, N, f));
    tu_assert_close(f, want_f, N * D_SAE, 1e-4, "f");
    ck_assert_ok(sae_encode(m, x + D_IN, 1, f));
    tu_assert_close(f, want_f + D_SAE, D_SAE, 1e-4, "f (one token)");
    ck_assert_ok(sae_encode(m, x, N, f));

    /* Sparse codes: the strongest nonzero codes, largest first. */
    uint32_t idx[N * K_SPARSE], count[N];
    float val[N * K_SPARSE];
    ck_assert_ok(sae_encode_sparse(m, x, N, K_SPARSE, idx, val, count));
    for (size_t t = 0; t < N; t++) {
        size_t nonzero = 0;
        for (size_t i = 0; i < D_SAE; i++)
            nonzero += f[t * D_SAE + i] != 0.0f;
        ck_assert_uint_eq(count[t], nonzero < K_SPARSE ? nonzero : K_SPARSE);
        for (size_t j = 0; j < count[t]; j++) {
            ck_assert_float_eq(val[t * K_SPARSE + j], f[t * D_SAE + idx[t * K_SPARSE + j]]);
            if (j > 0)
                ck_assert(val[t * K_SPARSE + j] <= val[t * K_SPARSE + j - 1]);
        }
    }

    /* Decoding the codes: f @ W_dec + b_dec, / INPUT_SCALE for an SAE, no skip, normalized space. */
    double ff[D_SAE];
    for (size_t t = 0; t < N; t++) {
        for (size_t i = 0; i < D_SAE; i++)
            ff[i] = f[t * D_SAE + i];
        tu_ref_decode(&w, ff, want_dec + t * d_out);
    }
    ck_assert_ok(sae_decode(m, f, N, out));
    tu_assert_close(out, want_dec, N * d_out, 1e-4, "decode");
    float dec_sparse[N * D_IN];
    uint32_t all_idx[N * D_SAE], all_count[N];
    float all_val[N * D_SAE];
    ck_assert_ok(sae_encode_sparse(m, x, N, D_SAE, all_idx, all_val, all_count));
    ck_assert_ok(sae_decode_sparse(m, all_idx, all_val, all_count, D_SAE, N, dec_sparse));
    tu_assert_close(dec_sparse, want_dec, N * d_out, 1e-4, "decode_sparse");

    /* The whole output: denormalized x_hat, or y_hat with its skip term. */
    ck_assert_ok(sae_reconstruct(m, x, N, out));
    tu_assert_close(out, want_out, N * d_out, 1e-4, "reconstruct");
    if (c.kind == TU_SAE) {
        float in_place[N * D_IN];
        memcpy(in_place, x, sizeof x);
        ck_assert_ok(sae_reconstruct(m, in_place, N, in_place));
        tu_assert_close(in_place, want_out, N * D_IN, 1e-4, "reconstruct in place");
    }

    /* evaluate_to: the output against a target y. */
    float y[N * D_IN];
    random_tokens(y, N * d_out, 99);
    double sse = 0, mean[D_IN] = {0}, dev = 0;
    for (size_t t = 0; t < N; t++)
        for (size_t j = 0; j < d_out; j++) {
            sse += (y[t * d_out + j] - want_out[t * d_out + j]) *
                   (y[t * d_out + j] - want_out[t * d_out + j]);
            mean[j] += y[t * d_out + j] / (double)N;
        }
    for (size_t t = 0; t < N; t++)
        for (size_t j = 0; j < d_out; j++)
            dev += (y[t * d_out + j] - mean[j]) * (y[t * d_out + j] - mean[j]);
    const sae_eval_metric which[2] = {SAE_EVAL_MSE, SAE_EVAL_FVU};
    double got[2];
    ck_assert_ok(sae_evaluate_to(m, x, y, N, which, 2, got));
    ck_assert_msg(fabs(got[0] - sse / N) <= 1e-4 * (1 + sse / N), "mse %g, expected %g", got[0],
                  sse / N);
    ck_assert_msg(fabs(got[1] - sse / dev) <= 1e-4 * (1 + sse / dev), "fvu %g, expected %g",
                  got[1], sse / dev);

    /* Steering: clamp a, scale b, add c, read from x and applied to y. */
    const uint32_t a = 3, b = 17, cf = 30;
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_clamp(s, a, 1.5f));
    ck_assert_ok(sae_steer_scale(s, b, 3.0f));
    ck_assert_ok(sae_steer_add(s, cf, 0.3f));
    double want_y[N * D_IN];
    for (size_t t = 0; t < N; t++) {
        double mu, na, nb;
        tu_ref_norm(&w, x + t * D_IN, &mu, &na, &nb);
        double unit = w.transcoder ? 1.0 : nb / w.scale, add = w.transcoder ? 1.0 : 1.0 / w.scale;
        double da = 1.5 - want_f[t * D_SAE + a], db = 2.0 * want_f[t * D_SAE + b];
        for (size_t j = 0; j < d_out; j++)
            want_y[t * d_out + j] = y[t * d_out + j] +
                                    (da * w.W_dec[a * d_out + j] + db * w.W_dec[b * d_out + j]) *
                                        unit +
                                    0.3 * w.W_dec[cf * d_out + j] * add;
    }
    float steered[N * D_IN];
    memcpy(steered, y, sizeof steered);
    ck_assert_ok(sae_steer_apply_to(s, x, steered, N));
    tu_assert_close(steered, want_y, N * d_out, 1e-4, "apply_to");
    /* The same plan split across gathered blocks of one feature each. */
    sae__steer_set_block(s, 1);
    memcpy(steered, y, sizeof steered);
    ck_assert_ok(sae_steer_apply_to(s, x, steered, N));
    tu_assert_close(steered, want_y, N * d_out, 1e-4, "apply_to in blocks");
    if (c.kind == TU_SAE) {
        /* apply(x) = apply_to(x, x): the error term is kept, so the result is x + the change. */
        double want_x[N * D_IN];
        for (size_t t = 0; t < N * D_IN; t++)
            want_x[t] = want_y[t] - y[t] + x[t];
        memcpy(steered, x, sizeof x);
        ck_assert_ok(sae_steer_apply(s, steered, N));
        tu_assert_close(steered, want_x, N * D_IN, 1e-4, "apply");
    }
    sae_steer_free(s);

    /* Saved and loaded, the model computes the same (bf16 weights load as float holding the
     * same values: equal to rounding). */
    char name[64];
    snprintf(name, sizeof name, "kinds-%d.safetensors", _i);
    char *path = tu_tmp_path(name);
    ck_assert_ok(sae_model_save(m, path));
    sae_model *back;
    ck_assert_ok(sae_model_load(&back, path));
    ck_assert_int_eq(sae_model_arch(back), c.arch);
    ck_assert_int_eq(sae_model_is_transcoder(back), c.kind != TU_SAE);
    ck_assert_uint_eq(sae_model_d_out(back), d_out);
    for (int t = SAE_W_ENC; t <= SAE_B_MAG; t++)
        ck_assert_int_eq(sae_model_has_tensor(back, (sae_tensor)t),
                         sae_model_has_tensor(m, (sae_tensor)t));
    double v;
    ck_assert_ok(sae_model_get_param(back, SAE_PARAM_NORMALIZE, &v));
    ck_assert(v == (double)c.norm);
    ck_assert_ok(sae_model_get_param(back, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    ck_assert(v == w.apply_b_dec);
    ck_assert_ok(sae_reconstruct(back, x, N, out));
    tu_assert_close(out, want_out, N * d_out, 1e-4, "reconstruct after load");
    sae_model_free(back);
    free(path);
    tu_weights_free(&w);
    sae_model_free(m);
}
END_TEST

START_TEST(has_tensor_names_what_each_kind_holds)
{
    sae_model *m;
    ck_assert_ok(sae_model_new_transcoder(&m, SAE_ARCH_GATED, 4, 8, 3, 1));
    for (int t = SAE_W_ENC; t <= SAE_B_DEC; t++)
        ck_assert_int_eq(sae_model_has_tensor(m, (sae_tensor)t), 1);
    ck_assert_int_eq(sae_model_has_tensor(m, SAE_THRESHOLD), 0);
    ck_assert_int_eq(sae_model_has_tensor(m, SAE_W_SKIP), 1);
    ck_assert_int_eq(sae_model_has_tensor(m, SAE_R_MAG), 1);
    ck_assert_int_eq(sae_model_has_tensor(m, SAE_B_MAG), 1);
    ck_assert_int_eq(sae_model_has_tensor(m, (sae_tensor)0), 0);
    ck_assert_int_eq(sae_model_has_tensor(m, (sae_tensor)9), 0);
    ck_assert_int_eq(sae_model_has_tensor(NULL, SAE_W_ENC), 0);
    ck_assert_uint_eq(sae_model_d_out(m), 3);
    ck_assert_int_eq(sae_model_is_transcoder(m), 1);
    sae_model_free(m);
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_JUMPRELU, 4, 8));
    ck_assert_int_eq(sae_model_has_tensor(m, SAE_THRESHOLD), 1);
    ck_assert_int_eq(sae_model_has_tensor(m, SAE_W_SKIP), 0);
    ck_assert_int_eq(sae_model_is_transcoder(m), 0);
    ck_assert_uint_eq(sae_model_d_out(m), 4);
    ck_assert_uint_eq(sae_model_d_out(NULL), 0);
    ck_assert_int_eq(sae_model_is_transcoder(NULL), 0);
    sae_model_free(m);
}
END_TEST

START_TEST(decoder_norms_are_the_rows_norms)
{
    sae_model *m = tu_random_kind(SAE_ARCH_TOPK, TU_TRANSCODER, 5, 9, 7, 11);
    float W[9 * 7], norms[9];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, W));
    ck_assert_ok(sae_model_decoder_norms(m, norms));
    for (size_t i = 0; i < 9; i++) {
        double sq = 0;
        for (size_t j = 0; j < 7; j++)
            sq += (double)W[i * 7 + j] * W[i * 7 + j];
        ck_assert_msg(fabs(norms[i] - sqrt(sq)) <= 1e-6 * sqrt(sq), "norm %zu", i);
    }
    /* They follow set_tensor. */
    for (size_t i = 0; i < 9 * 7; i++)
        W[i] *= 2.0f;
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, W));
    float twice[9];
    ck_assert_ok(sae_model_decoder_norms(m, twice));
    for (size_t i = 0; i < 9; i++)
        ck_assert_float_eq_tol(twice[i], 2.0f * norms[i], 1e-6f * norms[i]);
    ck_assert_sae(sae_model_decoder_norms(NULL, norms), SAE_EINVAL);
    ck_assert_sae(sae_model_decoder_norms(m, NULL), SAE_EINVAL);
    sae_model_free(m);
}
END_TEST

START_TEST(transcoders_refuse_what_they_cannot_do)
{
    sae_model *m = (sae_model *)&m;
    ck_assert_sae(sae_model_new_transcoder(&m, SAE_ARCH_TOPK, 4, 8, 0, 0), SAE_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_sae(sae_model_new_transcoder(&m, SAE_ARCH_TOPK, 4, 8, 3, 2), SAE_EINVAL);
    ck_assert_sae(sae_model_new_transcoder(NULL, SAE_ARCH_TOPK, 4, 8, 3, 0), SAE_EINVAL);
    ck_assert_sae(sae_model_new_transcoder(&m, (sae_arch)9, 4, 8, 3, 0), SAE_EINVAL);
    m = tu_random_kind(SAE_ARCH_RELU, TU_SKIP, 4, 8, 3, 1);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    ck_assert(v == 0.0); /* b_dec is the output's bias */
    ck_assert_sae(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 1), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "d_out"));
    float x[2 * 4] = {1, 2, 3, 4, 5, 6, 7, 8}, y[2 * 3] = {0};
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_clamp(s, 1, 2.0f));
    ck_assert_sae(sae_steer_apply(s, x, 2), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "apply_to"));
    ck_assert_sae(sae_steer_apply_to(s, x, (float *)x, 2), SAE_EINVAL);
    ck_assert_sae(sae_steer_apply_to(s, NULL, y, 2), SAE_EINVAL);
    ck_assert_sae(sae_steer_apply_to(s, x, NULL, 2), SAE_EINVAL);
    y[4] = NAN;
    ck_assert_sae(sae_steer_apply_to(s, x, y, 2), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "y[1][1]"));
    sae_steer_free(s);
    const sae_eval_metric which = SAE_EVAL_FVU;
    double got;
    ck_assert_sae(sae_evaluate(m, x, 2, &which, 1, &got), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "sae_evaluate_to"));
    ck_assert_sae(sae_evaluate_to(m, x, NULL, 2, &which, 1, &got), SAE_EINVAL);
    /* Transcoders train from pairs (tests/test_train_tc.c): the SAE entry points refuse one. */
    sae_trainer *t = NULL;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_sae(sae_trainer_init(t, x, 2), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "sae_trainer_init_to"));
    sae_trainer_free(t);
    sae_model_free(m);

    /* A transcoder with d_out = d_in may subtract b_dec (sparsify's skip-connection SAE), and
     * then steers in place too. */
    m = tu_random_kind(SAE_ARCH_TOPK, TU_SKIP, 4, 8, 4, 2);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 1));
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_clamp(s, 1, 2.0f));
    ck_assert_ok(sae_steer_apply(s, x, 2));
    sae_steer_free(s);
    sae_model_free(m);
}
END_TEST

START_TEST(normalizations_refuse_what_they_cannot_compute)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 4, 8, 3);
    ck_assert_sae(sae_model_set_param(m, SAE_PARAM_NORMALIZE, 3), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(m, SAE_PARAM_NORMALIZE, 0.5), SAE_EINVAL);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_NORMALIZE, SAE_NORMALIZE_CONSTANT_NORM));
    float x[3 * 4] = {1, 2, 3, 4, 0, 0, 0, 0, 1, 1, 1, 1}, f[3 * 8], out[3 * 4];
    ck_assert_sae(sae_encode(m, x, 3, f), SAE_EINVAL);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "x[1]"));
    ck_assert_sae(sae_reconstruct(m, x, 3, out), SAE_EINVAL);
    sae_steer *s;
    ck_assert_ok(sae_steer_new(&s, m));
    ck_assert_ok(sae_steer_clamp(s, 2, 1.0f));
    ck_assert_sae(sae_steer_apply(s, x, 3), SAE_EINVAL);
    ck_assert_float_eq(x[0], 1.0f); /* nothing written before the refusal */
    sae_steer_free(s);
    const sae_eval_metric which = SAE_EVAL_MSE;
    double got;
    ck_assert_sae(sae_evaluate(m, x, 3, &which, 1, &got), SAE_EINVAL);
    /* LAYER_NORM divides by d_in - 1. */
    sae_model *narrow = tu_random_model(SAE_ARCH_RELU, 1, 8, 4);
    ck_assert_sae(sae_model_set_param(narrow, SAE_PARAM_NORMALIZE, SAE_NORMALIZE_LAYER_NORM),
                  SAE_EINVAL);
    sae_model_free(narrow);
    /* A constant token under LAYER_NORM is zero after centring, and comes back as itself. */
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_NORMALIZE, SAE_NORMALIZE_LAYER_NORM));
    ck_assert_ok(sae_reconstruct(m, x + 8, 1, out));
    for (int j = 0; j < 4; j++)
        ck_assert_float_eq(out[j], 1.0f);
    sae_model_free(m);
}
END_TEST

START_TEST(groupmax_and_gated_edges)
{
    /* GroupMax: K must divide d_sae; the default is the most groups up to 32 that do. */
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_GROUPMAX, 4, 48));
    double k;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &k));
    ck_assert(k == 24);
    ck_assert_sae(sae_model_set_param(m, SAE_PARAM_K, 5), SAE_EINVAL);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 4));
    /* Ties inside a group: the lower index wins, as torch.max returns the first maximum. */
    float W[4 * 48] = {0}, b[48] = {0}, x[4] = {1, 0, 0, 0}, f[48];
    for (size_t i = 0; i < 48; i++)
        W[i] = (i % 12 == 3 || i % 12 == 7) ? 2.0f : (float)(i % 12) * 0.1f;
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_ENC, W));
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, b));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 0));
    ck_assert_ok(sae_encode(m, x, 1, f));
    for (size_t i = 0; i < 48; i++)
        ck_assert_float_eq(f[i], i % 12 == 3 ? 2.0f : 0.0f);
    sae_model_free(m);
    /* Gated: exp(r_mag) must be a normal float. */
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_GATED, 2, 3));
    float r[3] = {0, 90, 0};
    ck_assert_sae(sae_model_set_tensor(m, SAE_R_MAG, r), SAE_ERANGE);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "r_mag[1]"));
    ck_assert_sae(sae_model_set_param(m, SAE_PARAM_K, 2), SAE_EUNSUPPORTED);
    sae_model_free(m);
}
END_TEST

static Suite *kinds_suite(void)
{
    Suite *s = suite_create("kinds");
    TCase *tc = tcase_create("kinds");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, every_operation_matches_the_loops, 0,
                        N_ARCHS * N_KINDS * N_NORMS * N_STORAGE);
    tcase_add_test(tc, has_tensor_names_what_each_kind_holds);
    tcase_add_test(tc, decoder_norms_are_the_rows_norms);
    tcase_add_test(tc, transcoders_refuse_what_they_cannot_do);
    tcase_add_test(tc, normalizations_refuse_what_they_cannot_compute);
    tcase_add_test(tc, groupmax_and_gated_edges);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(kinds_suite)
