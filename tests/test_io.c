/* libsae's own file (save, load, atomicity, memory mapping), .npy activation files, and the dtype
 * conversions every loader shares. */
#include "testutil.h"
#include "formats.h"

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static void assert_same_model(const sae_model *a, const sae_model *b)
{
    ck_assert_int_eq(sae_model_arch(a), sae_model_arch(b));
    ck_assert_uint_eq(sae_model_d_in(a), sae_model_d_in(b));
    ck_assert_uint_eq(sae_model_d_sae(a), sae_model_d_sae(b));
    size_t big = sae_model_d_in(a) * sae_model_d_sae(a);
    float *x = tu_malloc(big * sizeof(float)), *y = tu_malloc(big * sizeof(float));
    for (int t = SAE_W_ENC; t <= SAE_THRESHOLD; t++) {
        if (t == SAE_THRESHOLD && sae_model_arch(a) != SAE_ARCH_JUMPRELU)
            continue;
        ck_assert_ok(sae_model_get_tensor(a, (sae_tensor)t, x));
        ck_assert_ok(sae_model_get_tensor(b, (sae_tensor)t, y));
        size_t n = t <= SAE_W_DEC ? big : t == SAE_B_DEC ? sae_model_d_in(a) : sae_model_d_sae(a);
        ck_assert_mem_eq(x, y, n * sizeof(float));
    }
    for (int p = SAE_PARAM_K; p <= SAE_PARAM_THRESHOLD; p++) {
        double va, vb;
        int ra = sae_model_get_param(a, (sae_model_param)p, &va);
        ck_assert_int_eq(ra, sae_model_get_param(b, (sae_model_param)p, &vb));
        if (ra == SAE_OK)
            ck_assert_double_eq(va, vb);
    }
    free(x);
    free(y);
}

START_TEST(save_load_round_trips_bit_exactly)
{
    sae_arch arch = (sae_arch)_i;
    sae_model *m = tu_random_model(arch, 7, 13, 21);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 0));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 0.1234567));
    if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 5));
    if (arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_THRESHOLD, 0.3333333));
    char *path = tu_tmp_path("round.safetensors");
    ck_assert_ok(sae_model_save(m, path));
    sae_model *back;
    ck_assert_ok(sae_model_load(&back, path));
    ck_assert_str_eq(sae_model_format(back), "libsae");
    ck_assert_str_eq(sae_model_dtype(back), "F32");
    assert_same_model(m, back);
    /* The loaded model works, and writing into its (mapped) tensors never touches the file. */
    size_t size_before;
    unsigned char *before = tu_read_file(path, &size_before);
    float zeros[13 * 7] = {0};
    ck_assert_ok(sae_model_set_tensor(back, SAE_W_ENC, zeros));
    size_t size_after;
    unsigned char *after = tu_read_file(path, &size_after);
    ck_assert_uint_eq(size_before, size_after);
    ck_assert_mem_eq(before, after, size_before);
    free(before);
    free(after);
    unlink(path);
    free(path);
    sae_model_free(back);
    sae_model_free(m);
}
END_TEST

/* The file is standard safetensors: header length, JSON, data at a 64-byte boundary. */
START_TEST(saved_file_is_plain_safetensors)
{
    sae_model *m = tu_random_model(SAE_ARCH_TOPK, 3, 4, 2);
    char *path = tu_tmp_path("plain.safetensors");
    ck_assert_ok(sae_model_save(m, path));
    size_t size;
    unsigned char *buf = tu_read_file(path, &size);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | buf[i];
    ck_assert_uint_eq((8 + header_len) % 64, 0);
    ck_assert_uint_eq(size, 8 + header_len + (12 + 12 + 3 + 4) * 4);
    buf[8 + header_len - 1] = '\0';
    const char *json = (const char *)buf + 8;
    ck_assert_ptr_nonnull(strstr(json, "\"W_enc\":{\"dtype\":\"F32\",\"shape\":[3,4]"));
    ck_assert_ptr_nonnull(strstr(json, "\"W_dec\":{\"dtype\":\"F32\",\"shape\":[4,3]"));
    ck_assert_ptr_nonnull(strstr(json, "\"architecture\":\"topk\""));
    ck_assert_ptr_nonnull(strstr(json, "\"k\":\"32\""));
    free(buf);
    unlink(path);
    free(path);
    sae_model_free(m);
}
END_TEST

/* Temporaries left beside `path` (named path.tmp-XXXX): only this file's, since suites running
 * at the same time save into the same directory. */
static size_t count_temporaries(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir_path = tu_malloc(strlen(path) + 2), prefix[256];
    if (slash == NULL)
        strcpy(dir_path, ".");
    else {
        memcpy(dir_path, path, (size_t)(slash - path));
        dir_path[slash - path] = '\0';
    }
    snprintf(prefix, sizeof prefix, "%s.tmp-", slash ? slash + 1 : path);
    DIR *dir = opendir(dir_path);
    ck_assert_ptr_nonnull(dir);
    free(dir_path);
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL)
        n += strncmp(e->d_name, prefix, strlen(prefix)) == 0;
    closedir(dir);
    return n;
}

/* A save that runs out of room halfway leaves the old file as it was and no temporary behind.
 * RLIMIT_FSIZE makes the write fail for real (the test runs in its own forked process). */
START_TEST(failed_save_keeps_the_old_file)
{
    char *path = tu_tmp_path("atomic.safetensors");
    sae_model *small = tu_random_model(SAE_ARCH_RELU, 4, 4, 1);
    ck_assert_ok(sae_model_save(small, path));
    size_t old_size;
    unsigned char *old = tu_read_file(path, &old_size);

    sae_model *large = tu_random_model(SAE_ARCH_RELU, 64, 512, 2);
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = {.rlim_cur = 65536, .rlim_max = RLIM_INFINITY};
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    ck_assert_sae(sae_model_save(large, path), SAE_EIO);
    ck_assert_msg(strstr(sae_last_error(), path) != NULL, "message: %s", sae_last_error());
    lim.rlim_cur = RLIM_INFINITY;
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);

    size_t now_size;
    unsigned char *now = tu_read_file(path, &now_size);
    ck_assert_uint_eq(now_size, old_size);
    ck_assert_mem_eq(now, old, old_size);
    ck_assert_uint_eq(count_temporaries(path), 0);
    /* Without the limit the same save succeeds and replaces the file. */
    ck_assert_ok(sae_model_save(large, path));
    sae_model *back;
    ck_assert_ok(sae_model_load(&back, path));
    ck_assert_uint_eq(sae_model_d_sae(back), 512);
    sae_model_free(back);
    free(old);
    free(now);
    unlink(path);
    free(path);
    sae_model_free(small);
    sae_model_free(large);
}
END_TEST

START_TEST(save_and_load_report_bad_paths)
{
    sae_model *m = tu_random_model(SAE_ARCH_RELU, 2, 2, 1), *out = (sae_model *)0x1;
    ck_assert_sae(sae_model_save(m, "/nonexistent-dir/x.safetensors"), SAE_EIO);
    ck_assert_msg(strstr(sae_last_error(), "/nonexistent-dir/x.safetensors") != NULL, "%s",
                  sae_last_error());
    ck_assert_sae(sae_model_load(&out, "/nonexistent-dir/x.safetensors"), SAE_EIO);
    ck_assert_ptr_null(out);
    ck_assert_sae(sae_model_save(NULL, "x"), SAE_EINVAL);
    ck_assert_sae(sae_model_save(m, NULL), SAE_EINVAL);
    ck_assert_sae(sae_model_load(NULL, "x"), SAE_EINVAL);
    ck_assert_sae(sae_model_load(&out, NULL), SAE_EINVAL);
    char *empty = tu_tmp_path("empty.safetensors");
    tu_write_file(empty, "", 0);
    ck_assert_sae(sae_model_load(&out, empty), SAE_EFORMAT);
    unlink(empty);
    free(empty);
    sae_model_free(m);
}
END_TEST

/* Metadata that disagrees with the tensors is refused, naming the problem. */
START_TEST(load_refuses_inconsistent_own_files)
{
    char *path = tu_tmp_path("bad.safetensors");
    float data[12] = {0};
    sae__st_out t[4] = {{"W_dec", 2, {3, 2}, data, NULL}, {"W_enc", 2, {2, 3}, data, NULL},
                        {"b_dec", 1, {2, 0}, data, NULL}, {"b_enc", 1, {3, 0}, data, NULL}};
    const char *keys[] = {"format", "architecture", "d_in", "d_sae", "apply_b_dec_to_input",
                          "input_scale"};
    const struct {
        const char *values[6];
        int code;
        const char *message;
    } cases[] = {
        {{"libsae", "relu", "2", "3", "1", "1"}, SAE_OK, NULL},
        {{"libsae", "crosscoder", "2", "3", "1", "1"}, SAE_EUNSUPPORTED, "crosscoder"},
        {{"libsae", "gated", "2", "3", "1", "1"}, SAE_EFORMAT, "format_version 1"},
        {{"libsae", "relu", "3", "2", "1", "1"}, SAE_EFORMAT, "shape [2, 3], expected [3, 2]"},
        {{"libsae", "relu", "2", "x", "1", "1"}, SAE_EFORMAT, "d_sae"},
        {{"libsae", "relu", "2", "3", "2", "1"}, SAE_EFORMAT, "apply_b_dec_to_input"},
        {{"libsae", "relu", "2", "3", "1", "-1"}, SAE_EFORMAT, "input_scale"},
        {{"libsae", "topk", "2", "3", "1", "1"}, SAE_EFORMAT, "'k'"},
        {{"libsae", "jumprelu", "2", "3", "1", "1"}, SAE_EFORMAT, "threshold"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ck_assert_ok(sae__st_write(path, t, 4, keys, cases[i].values, 6));
        sae_model *m = NULL;
        ck_assert_sae(sae_model_load(&m, path), cases[i].code);
        if (cases[i].message)
            ck_assert_msg(strstr(sae_last_error(), cases[i].message) != NULL,
                          "case %zu: message '%s' lacks '%s'", i, sae_last_error(),
                          cases[i].message);
        sae_model_free(m);
    }
    unlink(path);
    free(path);
}
END_TEST

START_TEST(half_and_bfloat_convert_like_numpy)
{
    /* Bit patterns and the float32 numpy gives for them. */
    const struct {
        uint16_t bits;
        float value;
    } halves[] = {{0x0000, 0.0f},         {0x8000, -0.0f},          {0x3c00, 1.0f},
                  {0xc000, -2.0f},        {0x7bff, 65504.0f},       {0x0001, 5.9604644775390625e-08f},
                  {0x03ff, 6.097555160522461e-05f}, {0x0400, 6.103515625e-05f}, {0x7c00, INFINITY},
                  {0x3555, 0.333251953125f}};
    for (size_t i = 0; i < sizeof halves / sizeof halves[0]; i++) {
        unsigned char b[2] = {(unsigned char)(halves[i].bits & 0xff),
                              (unsigned char)(halves[i].bits >> 8)};
        float f;
        sae__to_float(SAE__F16, b, 1, &f);
        ck_assert_msg(memcmp(&f, &halves[i].value, 4) == 0, "half 0x%04x gave %g, want %g",
                      halves[i].bits, (double)f, (double)halves[i].value);
    }
    unsigned char nan_half[2] = {0x01, 0x7e};
    float f;
    sae__to_float(SAE__F16, nan_half, 1, &f);
    ck_assert(isnan(f));
    unsigned char bf[4] = {0x80, 0x3f, 0x49, 0xc0}; /* 1.0, -3.140625 */
    float two[2];
    sae__to_float(SAE__BF16, bf, 2, two);
    ck_assert_float_eq(two[0], 1.0f);
    ck_assert_float_eq(two[1], -3.140625f);
    double d[3] = {0.1, 1e300, 1.0000000596046448}; /* the last is a float64 tie: rounds to even */
    float out[3];
    sae__to_float(SAE__F64, (const unsigned char *)d, 3, out);
    ck_assert_float_eq(out[0], 0.1f);
    ck_assert(isinf(out[1]));
    ck_assert_float_eq(out[2], 1.0f);
}
END_TEST

START_TEST(npy_round_trips_and_streams_rows)
{
    char *path = tu_tmp_path("acts.npy");
    float data[5 * 3];
    for (int i = 0; i < 15; i++)
        data[i] = (float)i * 0.5f - 3.0f;
    ck_assert_ok(sae_npy_write(path, data, 5, 3));
    size_t size;
    unsigned char *raw = tu_read_file(path, &size);
    ck_assert_uint_eq(size, 128 + 60); /* header padded to 64 bytes, as numpy pads it */
    ck_assert_mem_eq(raw, "\x93NUMPY\x01\x00", 8);
    ck_assert_int_eq(raw[127], '\n');
    free(raw);
    sae_npy *a;
    ck_assert_ok(sae_npy_open(&a, path));
    ck_assert_uint_eq(sae_npy_rows(a), 5);
    ck_assert_uint_eq(sae_npy_cols(a), 3);
    float got[9];
    ck_assert_ok(sae_npy_read(a, 1, 3, got));
    ck_assert_mem_eq(got, data + 3, 9 * sizeof(float));
    ck_assert_ok(sae_npy_read(a, 4, 1, got));
    ck_assert_mem_eq(got, data + 12, 3 * sizeof(float));
    ck_assert_sae(sae_npy_read(a, 4, 2, got), SAE_ERANGE);
    ck_assert_sae(sae_npy_read(a, 6, 0, got), SAE_OK);
    ck_assert_sae(sae_npy_read(a, SIZE_MAX, 2, got), SAE_ERANGE);
    sae_npy_close(a);
    sae_npy_close(NULL);
    unlink(path);
    free(path);
}
END_TEST

/* Builds a .npy file from a header dict and raw data bytes. */
static void write_npy(const char *path, int major, const char *dict, const void *data, size_t size)
{
    size_t dlen = strlen(dict), prefix = major == 1 ? 10 : 12;
    unsigned char *buf = tu_malloc(prefix + dlen + size);
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (unsigned char)major;
    buf[7] = 0;
    buf[8] = (unsigned char)(dlen & 0xff);
    buf[9] = (unsigned char)(dlen >> 8);
    if (major != 1)
        buf[10] = buf[11] = 0;
    memcpy(buf + prefix, dict, dlen);
    memcpy(buf + prefix + dlen, data, size);
    tu_write_file(path, buf, prefix + dlen + size);
    free(buf);
}

START_TEST(npy_reads_other_dtypes_and_one_dimension)
{
    char *path = tu_tmp_path("other.npy");
    const double d[4] = {1.5, -2.25, 3.0, 1e-3};
    write_npy(path, 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }\n", d, sizeof d);
    sae_npy *a;
    float got[4];
    ck_assert_ok(sae_npy_open(&a, path));
    ck_assert_ok(sae_npy_read(a, 0, 2, got));
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(got[i], (float)d[i]);
    sae_npy_close(a);
    const uint16_t h[3] = {0x3c00, 0xc000, 0x3555};
    write_npy(path, 2, "{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }\n", h, sizeof h);
    ck_assert_ok(sae_npy_open(&a, path));
    ck_assert_uint_eq(sae_npy_rows(a), 3);
    ck_assert_uint_eq(sae_npy_cols(a), 1);
    ck_assert_ok(sae_npy_read(a, 0, 3, got));
    ck_assert_float_eq(got[0], 1.0f);
    ck_assert_float_eq(got[1], -2.0f);
    ck_assert_float_eq(got[2], 0.333251953125f);
    sae_npy_close(a);
    unlink(path);
    free(path);
}
END_TEST

START_TEST(npy_refuses_bad_files)
{
    char *path = tu_tmp_path("bad.npy");
    const float data[4] = {0};
    const struct {
        int major;
        const char *dict;
        size_t size;
        int code;
        const char *message;
    } cases[] = {
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", 12, SAE_EFORMAT, "needs 16 bytes"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", 0, SAE_EFORMAT, "needs"},
        {1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }", 16, SAE_EUNSUPPORTED, "'<i4'"},
        /* '>f4' and fortran_order True read as numpy reads them (test_publishers.py); a byte
         * order numpy never writes for floats, and complex numbers, do not. */
        {1, "{'descr': '|f4', 'fortran_order': False, 'shape': (2, 2), }", 16, SAE_EUNSUPPORTED, "dtype"},
        {1, "{'descr': '>c8', 'fortran_order': True, 'shape': (2, 1), }", 16, SAE_EUNSUPPORTED, "'>c8'"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 2), }", 16, SAE_EUNSUPPORTED, "3-dimensional"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4, SAE_EUNSUPPORTED, "0-dimensional"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }", 16, SAE_EFORMAT, "overflow"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }", 16, SAE_EFORMAT, "overflow"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 2), }", 16, SAE_EFORMAT, "whole numbers"},
        {1, "{'descr': '<f4', 'fortran_order': False, }", 16, SAE_EFORMAT, "shape"},
        {7, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", 16, SAE_EUNSUPPORTED, "version"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_npy(path, cases[i].major, cases[i].dict, data, cases[i].size);
        sae_npy *a = (sae_npy *)0x1;
        ck_assert_sae(sae_npy_open(&a, path), cases[i].code);
        ck_assert_ptr_null(a);
        ck_assert_msg(strstr(sae_last_error(), cases[i].message) != NULL,
                      "case %zu: message '%s' lacks '%s'", i, sae_last_error(), cases[i].message);
    }
    tu_write_file(path, "\x93NUMP", 5);
    sae_npy *a;
    ck_assert_sae(sae_npy_open(&a, path), SAE_EFORMAT);
    tu_write_file(path, "\x93NUMPY\x01\x00\xff\xff{", 11);
    ck_assert_sae(sae_npy_open(&a, path), SAE_EFORMAT);
    ck_assert_sae(sae_npy_open(&a, "/nonexistent/x.npy"), SAE_EIO);
    ck_assert_sae(sae_npy_open(NULL, path), SAE_EINVAL);
    ck_assert_sae(sae_npy_write(NULL, data, 1, 1), SAE_EINVAL);
    ck_assert_sae(sae_npy_write(path, NULL, 1, 1), SAE_EINVAL);
    ck_assert_sae(sae_npy_write(path, data, SIZE_MAX, 2), SAE_EINVAL);
    unlink(path);
    free(path);
}
END_TEST

static Suite *io_suite(void)
{
    Suite *s = suite_create("io");
    TCase *tc = tcase_create("core");
    tcase_add_loop_test(tc, save_load_round_trips_bit_exactly, SAE_ARCH_RELU, SAE_ARCH_JUMPRELU + 1);
    tcase_add_test(tc, saved_file_is_plain_safetensors);
    tcase_add_test(tc, failed_save_keeps_the_old_file);
    tcase_add_test(tc, save_and_load_report_bad_paths);
    tcase_add_test(tc, load_refuses_inconsistent_own_files);
    tcase_add_test(tc, half_and_bfloat_convert_like_numpy);
    tcase_add_test(tc, npy_round_trips_and_streams_rows);
    tcase_add_test(tc, npy_reads_other_dtypes_and_one_dimension);
    tcase_add_test(tc, npy_refuses_bad_files);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(io_suite)
