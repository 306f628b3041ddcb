/* Dictionaries published as PyTorch state dicts (lib/torchsae.c), against the fixtures
 * tests/fixtures/torchsae/make.py saved with torch.save in each publisher's layout: what loads
 * (format, architecture, settings) and what it computes, against the publisher's own forward in
 * float64 (expected.json); what is refused and why (refused.json); the folder and config.json
 * routes; the save round trip that `convert` makes; damaged files. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "formats.h"
#include "testutil.h"
#include "jsonutil.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zip.h>

static char *fixture(const char *rel) { return tu_path_in(SAE_TORCHSAE_FIXTURES, rel); }

static cJSON *read_json(const char *name)
{
    char *path = fixture(name);
    cJSON *j = tu_read_json(path);
    free(path);
    return j;
}

/* A JSON matrix [n][cols] as floats (and its row count). */
static float *matrix_f(const cJSON *a, size_t *n, size_t *cols)
{
    *n = (size_t)cJSON_GetArraySize(a);
    *cols = (size_t)cJSON_GetArraySize(cJSON_GetArrayItem(a, 0));
    float *v = tu_malloc(*n * *cols * sizeof(float));
    for (size_t i = 0; i < *n; i++)
        for (size_t j = 0; j < *cols; j++)
            v[i * *cols + j] =
                (float)cJSON_GetArrayItem(cJSON_GetArrayItem(a, (int)i), (int)j)->valuedouble;
    return v;
}

static double *matrix_d(const cJSON *a, size_t n, size_t cols)
{
    double *v = tu_malloc(n * cols * sizeof(double));
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < cols; j++)
            v[i * cols + j] = cJSON_GetArrayItem(cJSON_GetArrayItem(a, (int)i), (int)j)->valuedouble;
    return v;
}

static double param(const sae_model *m, sae_model_param p)
{
    double v = -1;
    ck_assert_int_eq(sae_model_get_param(m, p, &v), SAE_OK);
    return v;
}

/* The model loaded from want["path"] is what make.py says, and computes what the publisher's
 * code computes. */
static void check_model(const char *name, const sae_model *m, const cJSON *want)
{
    ck_assert_str_eq(sae_model_format(m), cJSON_GetObjectItem(want, "format")->valuestring);
    ck_assert_str_eq(sae_arch_name(sae_model_arch(m)),
                     cJSON_GetObjectItem(want, "arch")->valuestring);
    size_t n, d_in, n2, d_sae;
    float *x = matrix_f(cJSON_GetObjectItem(want, "x"), &n, &d_in);
    float *f0 = matrix_f(cJSON_GetObjectItem(want, "f"), &n2, &d_sae);
    free(f0);
    ck_assert_uint_eq(sae_model_d_in(m), d_in);
    ck_assert_uint_eq(sae_model_d_sae(m), d_sae);
    ck_assert(!sae_model_is_transcoder(m));
    const cJSON *k = cJSON_GetObjectItem(want, "k"), *th = cJSON_GetObjectItem(want, "threshold");
    if (k != NULL)
        ck_assert_double_eq(param(m, SAE_PARAM_K), k->valuedouble);
    if (th != NULL)
        ck_assert_double_eq_tol(param(m, SAE_PARAM_THRESHOLD), th->valuedouble, 1e-7);
    ck_assert_double_eq(param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT),
                        cJSON_GetObjectItem(want, "apply_b_dec")->valuedouble);
    const cJSON *norm = cJSON_GetObjectItem(want, "normalize");
    ck_assert_double_eq(param(m, SAE_PARAM_NORMALIZE),
                        norm ? SAE_NORMALIZE_LAYER_NORM : SAE_NORMALIZE_NONE);
    ck_assert_double_eq(param(m, SAE_PARAM_INPUT_SCALE), 1.0);
    const cJSON *dtype = cJSON_GetObjectItem(want, "dtype");
    ck_assert_str_eq(sae_model_dtype(m), dtype ? dtype->valuestring : "F32");

    double *f_want = matrix_d(cJSON_GetObjectItem(want, "f"), n, d_sae);
    double *x_want = matrix_d(cJSON_GetObjectItem(want, "x_hat"), n, d_in);
    float *f = tu_malloc(n * d_sae * sizeof(float)), *x_hat = tu_malloc(n * d_in * sizeof(float));
    ck_assert_int_eq(sae_encode(m, x, n, f), SAE_OK);
    ck_assert_int_eq(sae_reconstruct(m, x, n, x_hat), SAE_OK);
    char what[128];
    snprintf(what, sizeof what, "%s codes", name);
    tu_assert_close(f, f_want, n * d_sae, 2e-5, what);
    /* The same features fire as in the publisher's code (no code near a threshold here). */
    for (size_t i = 0; i < n * d_sae; i++)
        ck_assert_msg((f[i] != 0) == (f_want[i] != 0), "%s: code %zu is %g, want %g", name, i,
                      (double)f[i], f_want[i]);
    snprintf(what, sizeof what, "%s reconstruction", name);
    tu_assert_close(x_hat, x_want, n * d_in, 2e-5, what);
    free(x);
    free(f);
    free(x_hat);
    free(f_want);
    free(x_want);
}

START_TEST(test_loads)
{
    cJSON *all = read_json("expected.json");
    const cJSON *want;
    size_t count = 0;
    cJSON_ArrayForEach(want, all)
    {
        char *path = fixture(cJSON_GetObjectItem(want, "path")->valuestring);
        sae_model *m = NULL;
        int rc = sae_model_load(&m, path);
        ck_assert_msg(rc == SAE_OK, "%s: %s", path, sae_last_error());
        check_model(want->string, m, want);
        sae_model_free(m);
        free(path);
        count++;
    }
    ck_assert_uint_eq(count, 15);
    cJSON_Delete(all);
}
END_TEST

/* `convert`: libsae's own file holds the same model, settings and all. */
START_TEST(test_save_round_trip)
{
    cJSON *all = read_json("expected.json");
    const cJSON *want;
    cJSON_ArrayForEach(want, all)
    {
        char *path = fixture(cJSON_GetObjectItem(want, "path")->valuestring);
        sae_model *m = NULL, *back = NULL;
        ck_assert_int_eq(sae_model_load(&m, path), SAE_OK);
        char *out = tu_tmp_path("torchsae_round_trip.safetensors");
        ck_assert_int_eq(sae_model_save(m, out), SAE_OK);
        ck_assert_int_eq(sae_model_load(&back, out), SAE_OK);
        ck_assert_str_eq(sae_model_format(back), "libsae");
        cJSON *copy = cJSON_Duplicate(want, 1);
        cJSON_ReplaceItemInObject(copy, "format", cJSON_CreateString("libsae"));
        cJSON_DeleteItemFromObject(copy, "dtype"); /* saved as F32 */
        check_model(want->string, back, copy);
        cJSON_Delete(copy);
        sae_model_free(m);
        sae_model_free(back);
        free(out);
        free(path);
    }
    cJSON_Delete(all);
}
END_TEST

static int code_of(const char *name)
{
    if (strcmp(name, "EFORMAT") == 0)
        return SAE_EFORMAT;
    if (strcmp(name, "EUNSUPPORTED") == 0)
        return SAE_EUNSUPPORTED;
    ck_abort_msg("unknown code %s", name);
    return 0;
}

START_TEST(test_refused)
{
    cJSON *all = read_json("refused.json");
    const cJSON *r;
    size_t count = 0;
    cJSON_ArrayForEach(r, all)
    {
        char *path = fixture(cJSON_GetObjectItem(r, "path")->valuestring);
        sae_model *m = (sae_model *)1;
        int rc = sae_model_load(&m, path);
        const char *msg = sae_last_error();
        ck_assert_msg(rc == code_of(cJSON_GetObjectItem(r, "code")->valuestring),
                      "%s: got %d: %s", path, rc, msg);
        ck_assert_ptr_null(m);
        ck_assert_msg(strstr(msg, path) != NULL || strstr(msg, "config.json") != NULL,
                      "%s: the message names no file: %s", path, msg);
        const cJSON *w;
        cJSON_ArrayForEach(w, cJSON_GetObjectItem(r, "words"))
            ck_assert_msg(strstr(msg, w->valuestring) != NULL, "%s: '%s' not in: %s", path,
                          w->valuestring, msg);
        free(path);
        count++;
    }
    ck_assert_uint_eq(count, 10);
    cJSON_Delete(all);
}
END_TEST

/* A dictionary_learning folder loads by its folder, or by naming its config.json, as by ae.pt. */
START_TEST(test_folder_routes)
{
    static const char *const routes[] = {"dl_topk", "dl_topk/config.json", "dl_topk/ae.pt"};
    for (size_t i = 0; i < 3; i++) {
        char *path = fixture(routes[i]);
        sae_model *m = NULL;
        ck_assert_msg(sae_model_load(&m, path) == SAE_OK, "%s: %s", path, sae_last_error());
        ck_assert_str_eq(sae_model_format(m), "dictionary_learning/AutoEncoderTopK");
        ck_assert_double_eq(param(m, SAE_PARAM_K), 3);
        sae_model_free(m);
        free(path);
    }
    /* SAE_LOAD_COPY reads the same. */
    char *path = fixture("dl_gated/ae.pt");
    sae_model *m = NULL;
    ck_assert_int_eq(sae_model_load_with(&m, path, SAE_LOAD_COPY), SAE_OK);
    ck_assert_str_eq(sae_model_format(m), "dictionary_learning/GatedAutoEncoder");
    sae_model_free(m);
    free(path);
}
END_TEST

/* A zip archive is a torch file when it holds <stem>/data.pkl; an npz is not. */
static void write_zip(const char *path, const char *const *members, size_t n)
{
    int err = 0;
    remove(path);
    zip_t *za = zip_open(path, ZIP_CREATE | ZIP_TRUNCATE, &err);
    ck_assert_ptr_nonnull(za);
    for (size_t i = 0; i < n; i++) {
        zip_source_t *s = zip_source_buffer(za, "x", 1, 0);
        ck_assert_int_ge(zip_file_add(za, members[i], s, ZIP_FL_ENC_UTF_8), 0);
    }
    ck_assert_int_eq(zip_close(za), 0);
}

static bool detect_file(const char *path)
{
    size_t size;
    unsigned char *data = tu_read_file(path, &size);
    bool is = sae__torchsae_detect(data, size);
    free(data);
    return is;
}

START_TEST(test_detect)
{
    char *path = tu_tmp_path("torchsae_detect.zip");
    static const char *const npz[] = {"W_enc.npy", "W_dec.npy"};
    write_zip(path, npz, 2);
    ck_assert(!detect_file(path));
    static const char *const late[] = {"archive/version", "archive/data/0", "archive/data.pkl"};
    write_zip(path, late, 3); /* data.pkl not first: still a torch file */
    ck_assert(detect_file(path));
    static const char *const deep[] = {"a/b/data.pkl"};
    write_zip(path, deep, 1);
    ck_assert(!detect_file(path));
    static const char *const bare[] = {"data.pkl"};
    write_zip(path, bare, 1);
    ck_assert(!detect_file(path));
    /* The npz reader still gets an npz: its own message, not torch's. */
    write_zip(path, npz, 2);
    sae_model *m = NULL;
    ck_assert_int_ne(sae_model_load(&m, path), SAE_OK);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), ".npy"));
    free(path);
    char *pt = fixture("openai_relu.pt");
    ck_assert(detect_file(pt));
    free(pt);
    const unsigned char junk[] = "PK\3\4 not a zip at all";
    ck_assert(!sae__torchsae_detect(junk, sizeof junk));
}
END_TEST

/* Every cut of a file is refused cleanly (no crash, no model), or still loads whole. */
/* A non-finite weight is refused naming [row][col] as the file holds it, also in a weight that
 * is transposed while it is read (dl_autoencoder: storage 1 is encoder.weight [10][6], storage
 * 3 decoder.weight [6][10]; make.py's key order). The members are replaced with libzip, which
 * writes their new CRCs. */
START_TEST(test_nonfinite)
{
    static const struct {
        const char *member;
        size_t index;
        const char *needle;
    } cases[] = {
        {"ae/data/1", 13, "'encoder.weight'[2][1] is nan"},
        {"ae/data/3", 59, "'decoder.weight'[5][9] is inf"},
        {"ae/data/2", 4, "'encoder.bias'[4] is -inf"},
    };
    const float bad[] = {NAN, INFINITY, -INFINITY};
    char *src = fixture("dl_autoencoder/ae.pt");
    size_t size;
    unsigned char *orig = tu_read_file(src, &size);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char *path = tu_tmp_path("torchsae_nonfinite.pt");
        FILE *f = fopen(path, "wb");
        ck_assert_ptr_nonnull(f);
        ck_assert_uint_eq(fwrite(orig, 1, size, f), size);
        fclose(f);
        int err;
        zip_t *za = zip_open(path, 0, &err);
        ck_assert_ptr_nonnull(za);
        zip_int64_t idx = zip_name_locate(za, cases[c].member, 0);
        ck_assert_int_ge(idx, 0);
        zip_stat_t st;
        ck_assert_int_eq(zip_stat_index(za, (zip_uint64_t)idx, 0, &st), 0);
        unsigned char *bytes = tu_malloc(st.size);
        zip_file_t *zf = zip_fopen_index(za, (zip_uint64_t)idx, 0);
        ck_assert_int_eq(zip_fread(zf, bytes, st.size), (zip_int64_t)st.size);
        zip_fclose(zf);
        memcpy(bytes + 4 * cases[c].index, &bad[c], sizeof(float));
        zip_source_t *zs = zip_source_buffer(za, bytes, st.size, 0);
        ck_assert_int_eq(zip_file_replace(za, (zip_uint64_t)idx, zs, 0), 0);
        zip_set_file_compression(za, (zip_uint64_t)idx, ZIP_CM_STORE, 0);
        ck_assert_int_eq(zip_close(za), 0);
        free(bytes);
        size_t dsize;
        unsigned char *data = tu_read_file(path, &dsize);
        sae_model *m = (sae_model *)0x1;
        ck_assert_sae(sae__torchsae_load(data, dsize, path, NULL, 0, NULL, &m), SAE_EFORMAT);
        ck_assert_ptr_null(m);
        ck_assert_msg(strstr(sae_last_error(), cases[c].needle) != NULL, "'%s' lacks '%s'",
                      sae_last_error(), cases[c].needle);
        free(data);
        free(path);
    }
    free(orig);
    free(src);
}
END_TEST

START_TEST(test_truncated)
{
    static const char *const files[] = {"openai_topk.pt", "dl_gated/ae.pt"};
    for (size_t f = 0; f < 2; f++) {
        char *src = fixture(files[f]);
        size_t size;
        unsigned char *data = tu_read_file(src, &size);
        char *path = tu_tmp_path("torchsae_cut.pt");
        for (size_t cut = 0; cut < size; cut += 7) {
            tu_write_file(path, data, cut);
            sae_model *m = NULL;
            int rc = sae_model_load(&m, path);
            ck_assert_msg(rc != SAE_OK, "%s cut at %zu loads", files[f], cut);
            ck_assert_ptr_null(m);
        }
        free(path);
        free(data);
        free(src);
    }
}
END_TEST

static Suite *torchsae_suite(void)
{
    Suite *s = suite_create("torchsae");
    TCase *tc = tcase_create("torchsae");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, test_loads);
    tcase_add_test(tc, test_save_round_trip);
    tcase_add_test(tc, test_refused);
    tcase_add_test(tc, test_folder_routes);
    tcase_add_test(tc, test_detect);
    tcase_add_test(tc, test_truncated);
    tcase_add_test(tc, test_nonfinite);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(torchsae_suite)
