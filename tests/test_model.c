/* The model object: creation, tensors, parameters, names, version and errors. */
#include "testutil.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

START_TEST(version_matches_header)
{
    ck_assert_uint_eq(sae_version_number(), SAE_VERSION_NUMBER);
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", SAE_VERSION_MAJOR, SAE_VERSION_MINOR,
             SAE_VERSION_PATCH);
    ck_assert_str_eq(sae_version_string(), want);
}
END_TEST

START_TEST(strerror_names_every_code)
{
    const int codes[] = {SAE_OK,         SAE_EINVAL, SAE_ENOMEM, SAE_EIO,      SAE_EFORMAT,
                         SAE_EUNSUPPORTED, SAE_ERANGE, SAE_ESTATE, SAE_ECALLBACK};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        ck_assert_ptr_nonnull(sae_strerror(codes[i]));
        ck_assert_str_ne(sae_strerror(codes[i]), "unknown error");
        for (size_t j = 0; j < i; j++)
            ck_assert_str_ne(sae_strerror(codes[i]), sae_strerror(codes[j]));
    }
    ck_assert_str_eq(sae_strerror(-1000), "unknown error");
    ck_assert_str_eq(sae_strerror(5), "unknown error");
}
END_TEST

START_TEST(new_model_is_zeroed_with_defaults)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 3, 5));
    ck_assert_uint_eq(sae_model_d_in(m), 3);
    ck_assert_uint_eq(sae_model_d_sae(m), 5);
    ck_assert_int_eq(sae_model_arch(m), SAE_ARCH_TOPK);
    ck_assert_str_eq(sae_model_format(m), "new");
    ck_assert_str_eq(sae_model_dtype(m), "F32");
    float w[15];
    memset(w, 0xff, sizeof w);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, w));
    for (int i = 0; i < 15; i++)
        ck_assert_float_eq(w[i], 0.0f);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
    ck_assert_double_eq(v, 32.0);
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    ck_assert_double_eq(v, 1.0);
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &v));
    ck_assert_double_eq(v, 1.0);
    sae_model_free(m);
}
END_TEST

START_TEST(new_refuses_bad_arguments)
{
    sae_model *m = (sae_model *)0x1;
    ck_assert_sae(sae_model_new(NULL, SAE_ARCH_RELU, 2, 2), SAE_EINVAL);
    ck_assert_sae(sae_model_new(&m, SAE_ARCH_RELU, 0, 2), SAE_EINVAL);
    ck_assert_ptr_null(m);
    ck_assert_msg(strstr(sae_last_error(), "d_in") != NULL, "message: %s", sae_last_error());
    ck_assert_sae(sae_model_new(&m, SAE_ARCH_RELU, 2, 0), SAE_EINVAL);
    ck_assert_sae(sae_model_new(&m, (sae_arch)0, 2, 2), SAE_EINVAL);
    ck_assert_sae(sae_model_new(&m, (sae_arch)7, 2, 2), SAE_EINVAL);
    ck_assert_sae(sae_model_new(&m, SAE_ARCH_RELU, SIZE_MAX / 2, 4), SAE_ENOMEM);
    ck_assert_sae(sae_model_new(&m, SAE_ARCH_RELU, 2, (size_t)UINT32_MAX + 1), SAE_ENOMEM);
}
END_TEST

START_TEST(free_accepts_null)
{
    sae_model_free(NULL);
    ck_assert_uint_eq(sae_model_d_in(NULL), 0);
    ck_assert_uint_eq(sae_model_d_sae(NULL), 0);
    ck_assert_ptr_null(sae_model_format(NULL));
}
END_TEST

START_TEST(tensors_round_trip_for_every_arch)
{
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_GROUPMAX; a++) {
        sae_model *m = tu_random_model((sae_arch)a, 4, 6, 7);
        tu_rng r = {99};
        float src[24], dst[24];
        const sae_tensor ts[] = {SAE_W_ENC, SAE_W_DEC, SAE_B_ENC, SAE_B_DEC, SAE_THRESHOLD};
        const size_t counts[] = {24, 24, 6, 4, 6};
        for (size_t i = 0; i < 5; i++) {
            if (ts[i] == SAE_THRESHOLD && a != SAE_ARCH_JUMPRELU) {
                ck_assert_sae(sae_model_set_tensor(m, ts[i], src), SAE_EUNSUPPORTED);
                ck_assert_sae(sae_model_get_tensor(m, ts[i], dst), SAE_EUNSUPPORTED);
                continue;
            }
            tu_fill(&r, src, counts[i], -1, 1);
            ck_assert_ok(sae_model_set_tensor(m, ts[i], src));
            memset(dst, 0, sizeof dst);
            ck_assert_ok(sae_model_get_tensor(m, ts[i], dst));
            ck_assert_mem_eq(src, dst, counts[i] * sizeof(float));
        }
        sae_model_free(m);
    }
}
END_TEST

START_TEST(set_tensor_refuses_nan_and_bad_ids)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, 2, 3));
    float w[6] = {1, 2, 3, 4, NAN, 6};
    ck_assert_sae(sae_model_set_tensor(m, SAE_W_ENC, w), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "W_enc[1][1]") != NULL, "message: %s",
                  sae_last_error());
    w[4] = INFINITY;
    ck_assert_sae(sae_model_set_tensor(m, SAE_W_DEC, w), SAE_EINVAL);
    float got[6];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, got));
    ck_assert_float_eq(got[0], 0.0f); /* nothing was copied */
    ck_assert_sae(sae_model_set_tensor(m, (sae_tensor)0, w), SAE_EINVAL);
    ck_assert_sae(sae_model_set_tensor(m, (sae_tensor)9, w), SAE_EINVAL);
    ck_assert_sae(sae_model_set_tensor(m, SAE_W_SKIP, w), SAE_EUNSUPPORTED); /* an SAE has none */
    ck_assert_sae(sae_model_set_tensor(m, SAE_R_MAG, w), SAE_EUNSUPPORTED);  /* not gated */
    ck_assert_sae(sae_model_set_tensor(NULL, SAE_W_ENC, w), SAE_EINVAL);
    ck_assert_sae(sae_model_set_tensor(m, SAE_W_ENC, NULL), SAE_EINVAL);
    ck_assert_sae(sae_model_get_tensor(m, SAE_W_ENC, NULL), SAE_EINVAL);
    ck_assert_sae(sae_model_get_tensor(NULL, SAE_W_ENC, got), SAE_EINVAL);
    sae_model_free(m);
}
END_TEST

START_TEST(params_validate_values_and_architecture)
{
    sae_model *relu, *topk, *btk;
    ck_assert_ok(sae_model_new(&relu, SAE_ARCH_RELU, 2, 3));
    ck_assert_ok(sae_model_new(&topk, SAE_ARCH_TOPK, 2, 3));
    ck_assert_ok(sae_model_new(&btk, SAE_ARCH_BATCHTOPK, 2, 3));
    double v;
    ck_assert_sae(sae_model_set_param(relu, SAE_PARAM_K, 4), SAE_EUNSUPPORTED);
    ck_assert_sae(sae_model_get_param(relu, SAE_PARAM_K, &v), SAE_EUNSUPPORTED);
    ck_assert_sae(sae_model_set_param(topk, SAE_PARAM_THRESHOLD, 1), SAE_EUNSUPPORTED);
    ck_assert_sae(sae_model_set_param(topk, SAE_PARAM_K, 0), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(topk, SAE_PARAM_K, 2.5), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(topk, SAE_PARAM_K, NAN), SAE_EINVAL);
    ck_assert_ok(sae_model_set_param(topk, SAE_PARAM_K, 7));
    ck_assert_ok(sae_model_get_param(topk, SAE_PARAM_K, &v));
    ck_assert_double_eq(v, 7);
    ck_assert_sae(sae_model_set_param(relu, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 0.5), SAE_EINVAL);
    ck_assert_ok(sae_model_set_param(relu, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 0));
    ck_assert_ok(sae_model_get_param(relu, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    ck_assert_double_eq(v, 0);
    ck_assert_sae(sae_model_set_param(relu, SAE_PARAM_INPUT_SCALE, 0), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(relu, SAE_PARAM_INPUT_SCALE, -1), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(relu, SAE_PARAM_INPUT_SCALE, INFINITY), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(relu, SAE_PARAM_INPUT_SCALE, 1e300), SAE_EINVAL);
    ck_assert_ok(sae_model_set_param(relu, SAE_PARAM_INPUT_SCALE, 0.25));
    ck_assert_ok(sae_model_get_param(relu, SAE_PARAM_INPUT_SCALE, &v));
    ck_assert_double_eq(v, 0.25);
    ck_assert_sae(sae_model_set_param(btk, SAE_PARAM_THRESHOLD, NAN), SAE_EINVAL);
    ck_assert_ok(sae_model_set_param(btk, SAE_PARAM_THRESHOLD, -0.5));
    ck_assert_ok(sae_model_get_param(btk, SAE_PARAM_THRESHOLD, &v));
    ck_assert_double_eq(v, -0.5);
    ck_assert_sae(sae_model_set_param(relu, (sae_model_param)99, 1), SAE_EINVAL);
    ck_assert_sae(sae_model_get_param(relu, (sae_model_param)0, &v), SAE_EINVAL);
    ck_assert_sae(sae_model_get_param(relu, SAE_PARAM_INPUT_SCALE, NULL), SAE_EINVAL);
    ck_assert_sae(sae_model_set_param(NULL, SAE_PARAM_INPUT_SCALE, 1), SAE_EINVAL);
    sae_model_free(relu);
    sae_model_free(topk);
    sae_model_free(btk);
}
END_TEST

START_TEST(arch_names_round_trip)
{
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_GROUPMAX; a++) {
        sae_arch back;
        ck_assert_ok(sae_arch_from_name(sae_arch_name((sae_arch)a), &back));
        ck_assert_int_eq(back, a);
    }
    sae_arch a;
    ck_assert_ok(sae_arch_from_name("standard", &a));
    ck_assert_int_eq(a, SAE_ARCH_RELU);
    ck_assert_sae(sae_arch_from_name("gated_sae", &a), SAE_EINVAL);
    ck_assert_sae(sae_arch_from_name(NULL, &a), SAE_EINVAL);
    ck_assert_ptr_null(sae_arch_name((sae_arch)0));
    ck_assert_ptr_null(sae_arch_name((sae_arch)9));
}
END_TEST

static void *fail_on_other_thread(void *arg)
{
    (void)arg;
    sae_model_new(NULL, SAE_ARCH_RELU, 1, 1);
    return NULL;
}

START_TEST(last_error_is_per_thread)
{
    sae_model *m;
    ck_assert_sae(sae_model_new(&m, SAE_ARCH_RELU, 0, 1), SAE_EINVAL);
    char before[256];
    snprintf(before, sizeof before, "%s", sae_last_error());
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, fail_on_other_thread, NULL), 0);
    pthread_join(t, NULL);
    ck_assert_str_eq(sae_last_error(), before);
}
END_TEST

static Suite *model_suite(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, version_matches_header);
    tcase_add_test(tc, strerror_names_every_code);
    tcase_add_test(tc, new_model_is_zeroed_with_defaults);
    tcase_add_test(tc, new_refuses_bad_arguments);
    tcase_add_test(tc, free_accepts_null);
    tcase_add_test(tc, tensors_round_trip_for_every_arch);
    tcase_add_test(tc, set_tensor_refuses_nan_and_bad_ids);
    tcase_add_test(tc, params_validate_values_and_architecture);
    tcase_add_test(tc, arch_names_round_trip);
    tcase_add_test(tc, last_error_is_per_thread);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(model_suite)
