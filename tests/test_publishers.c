/* The 2026 publishers' layouts (Gemma Scope 2, Llama Scope, circuit-tracer per-layer
 * transcoders) and numpy's other orders (Fortran, big-endian), written byte by byte with
 * tests/writers.c, loaded, and checked against float64 loops over the weights as each
 * publisher's own forward code uses them (not as libsae stores them); plus the damaged and
 * refused cases with the setting each message names. tests/python/test_publishers.py checks the
 * same layouts against numpy re-implementations of the publishers' code. */
#include "testutil.h"
#include "jsonutil.h"
#include "writers.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { DI = 6, DS = 10, DO = 4, NT = 5 };

static char *make_dir(const char *name)
{
    char *dir = tu_tmp_path(name);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s/checkpoints'", dir, dir);
    ck_assert_int_eq(system(cmd), 0);
    return dir;
}

static void remove_dir(char *dir)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
    free(dir);
}

static char *in_dir(const char *dir, const char *name) { return tu_path_in(dir, name); }

static void write_st(const char *dir, const char *name, const tw_tensor *t, size_t n)
{
    tw_buf b = {0};
    tw_safetensors(&b, t, n, NULL);
    char *p = in_dir(dir, name);
    tw_write(p, b.data, b.size);
    free(p);
    tw_free(&b);
}

static void write_text(const char *dir, const char *name, const char *text)
{
    char *p = in_dir(dir, name);
    tw_write_text(p, text);
    free(p);
}

static sae_model *load_ok(const char *path)
{
    sae_model *m = NULL;
    ck_assert_msg(sae_model_load(&m, path) == SAE_OK, "%s: %s", path, sae_last_error());
    return m;
}

static void load_fails(const char *path, int code, const char *needle)
{
    sae_model *m = (sae_model *)0x1;
    ck_assert_sae(sae_model_load(&m, path), code);
    ck_assert_ptr_null(m);
    ck_assert_msg(strstr(sae_last_error(), needle) != NULL, "message '%s' lacks '%s'",
                  sae_last_error(), needle);
}

/* Encodes and reconstructs x with m and compares with the reference codes f and output y. */
static void check_model(sae_model *m, const float *x, const double *f, const double *y,
                        size_t d_out)
{
    float got_f[NT * DS], got_y[NT * DI];
    ck_assert_ok(sae_encode(m, x, NT, got_f));
    tu_assert_close(got_f, f, NT * DS, 1e-5, "codes");
    ck_assert_ok(sae_reconstruct(m, x, NT, got_y));
    tu_assert_close(got_y, y, NT * d_out, 1e-5, "output");
}

static void inputs(float *x, unsigned long long seed) { tw_fill(seed, x, NT * DI, 2.0f); }

/* ---- Gemma Scope 2 ----------------------------------------------------------------------- */

/* Google's tutorial JumpReLUSAE: pre = x @ w_enc + b_enc, f = (pre > t) * relu(pre),
 * y = f @ w_dec + b_dec (+ x @ A, or x @ A^T when `transposed`, SAELens's reading). */
static void gs2_ref(const float *we, const float *be, const float *wd, const float *bd,
                    const float *th, const float *A, bool transposed, size_t d_out,
                    const float *x, double *f, double *y)
{
    for (size_t n = 0; n < NT; n++) {
        for (size_t i = 0; i < DS; i++) {
            double pre = be[i];
            for (size_t j = 0; j < DI; j++)
                pre += (double)x[n * DI + j] * we[j * DS + i];
            f[n * DS + i] = pre > th[i] && pre > 0 ? pre : 0;
        }
        for (size_t o = 0; o < d_out; o++) {
            double v = bd[o];
            for (size_t i = 0; i < DS; i++)
                v += f[n * DS + i] * wd[i * d_out + o];
            for (size_t j = 0; A != NULL && j < DI; j++)
                v += (double)x[n * DI + j] * (transposed ? A[o * DI + j] : A[j * d_out + o]);
            y[n * d_out + o] = v;
        }
    }
}

START_TEST(gemma_scope_2_every_dtype)
{
    float we[DI * DS], wd[DS * DI], be[DS], bd[DI], th[DS], A[DI * DI], x[NT * DI];
    tw_fill(1, we, DI * DS, 1.0f);
    tw_fill(2, wd, DS * DI, 1.0f);
    tw_fill(3, be, DS, 0.5f);
    tw_fill(4, bd, DI, 0.5f);
    tw_fill(5, th, DS, 0.5f);
    tw_fill(6, A, DI * DI, 1.0f);
    for (size_t i = 0; i < DS; i++)
        th[i] = fabsf(th[i]);
    inputs(x, 7);
    static const char *const dtypes[] = {"F32", "BF16", "F16", "F64"};
    for (int skip = 0; skip < 2; skip++)
        for (size_t d = 0; d < 4; d++) {
            tw_tensor t[6] = {{"affine_skip_connection", dtypes[d], 2, {DI, DI}, A},
                              {"b_dec", dtypes[d], 1, {DI, 0}, bd},
                              {"b_enc", dtypes[d], 1, {DS, 0}, be},
                              {"threshold", dtypes[d], 1, {DS, 0}, th},
                              {"w_dec", dtypes[d], 2, {DS, DI}, wd},
                              {"w_enc", dtypes[d], 2, {DI, DS}, we}};
            char *dir = make_dir("gs2");
            write_st(dir, "params.safetensors", t + (skip ? 0 : 1), skip ? 6 : 5);
            write_text(dir, "config.json",
                       skip ? "{\"architecture\": \"jump_relu\", \"affine_connection\": true, "
                              "\"hf_hook_point_in\": \"model.layers.5.pre_feedforward_layernorm."
                              "output\", \"hf_hook_point_out\": \"model.layers.5.post_feedforward_"
                              "layernorm.output\", \"width\": 10, \"l0\": \"medium\"}"
                            : "{\"architecture\": \"jump_relu\", \"affine_connection\": false, "
                              "\"hf_hook_point_in\": \"model.layers.5.output\", "
                              "\"hf_hook_point_out\": \"model.layers.5.output\"}");
            sae_model *m = load_ok(dir);
            ck_assert_int_eq(sae_model_is_transcoder(m), skip);
            ck_assert_int_eq(sae_model_has_tensor(m, SAE_W_SKIP), skip);
            double f[NT * DS], y[NT * DI], y_t[NT * DI];
            gs2_ref(we, be, wd, bd, th, skip ? A : NULL, false, DI, x, f, y);
            check_model(m, x, f, y, DI);
            if (skip) {
                /* SAELens's x @ A^T is far from what the authors' code (and libsae) compute. */
                gs2_ref(we, be, wd, bd, th, A, true, DI, x, f, y_t);
                double diff = 0, norm = 0;
                for (size_t k = 0; k < NT * DI; k++) {
                    diff += (y[k] - y_t[k]) * (y[k] - y_t[k]);
                    norm += y[k] * y[k];
                }
                ck_assert_double_gt(sqrt(diff / norm), 0.05);
            }
            sae_model_free(m);
            remove_dir(dir);
        }
}
END_TEST

START_TEST(gemma_scope_2_refusals)
{
    float w[DS * DI * 4] = {0}, th[DS]; /* 960 bytes: also the data of the 824-byte clt file */
    for (size_t i = 0; i < DS; i++)
        th[i] = 0.5f;
    tw_tensor t[5] = {{"b_dec", "F32", 1, {DI, 0}, w},
                      {"b_enc", "F32", 1, {DS, 0}, w},
                      {"threshold", "F32", 1, {DS, 0}, th},
                      {"w_dec", "F32", 2, {DS, DI}, w},
                      {"w_enc", "F32", 2, {DI, DS}, w}};
    char *dir = make_dir("gs2bad");
    char *p = in_dir(dir, "params.safetensors");
    write_st(dir, "params.safetensors", t, 4); /* no w_enc: not Gemma Scope 2 at all */
    load_fails(p, SAE_EFORMAT, "not an SAE file");
    tw_tensor no_th[4] = {t[0], t[1], t[3], t[4]};
    write_st(dir, "params.safetensors", no_th, 4);
    load_fails(p, SAE_EFORMAT, "threshold");
    tw_tensor bad[5] = {t[0], t[1], t[2], {"w_dec", "F32", 2, {DI, DS}, w}, t[4]};
    write_st(dir, "params.safetensors", bad, 5);
    load_fails(p, SAE_EFORMAT, "w_dec");
    write_st(dir, "params.safetensors", t, 5);
    write_text(dir, "config.json", "{\"affine_connection\": true}");
    load_fails(dir, SAE_EFORMAT, "affine_connection");
    write_text(dir, "config.json", "{\"architecture\": \"topk\"}");
    load_fails(dir, SAE_EUNSUPPORTED, "topk");
    write_text(dir, "config.json", "{\"affine_connection\": \"yes\"}");
    load_fails(dir, SAE_EFORMAT, "affine_connection");
    /* clt/: a cross-layer transcoder's per-layer file, w_dec [d_sae][layers][d_model]. */
    tw_buf b = {0};
    tw_safetensors_raw(&b,
                       "{\"b_dec\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]},"
                       "\"b_enc\":{\"dtype\":\"F32\",\"shape\":[10],\"data_offsets\":[24,64]},"
                       "\"threshold\":{\"dtype\":\"F32\",\"shape\":[10],\"data_offsets\":[64,104]},"
                       "\"w_dec\":{\"dtype\":\"F32\",\"shape\":[10,2,6],\"data_offsets\":[104,584]},"
                       "\"w_enc\":{\"dtype\":\"F32\",\"shape\":[6,10],\"data_offsets\":[584,824]}}",
                       w, 824);
    char *clt = in_dir(dir, "params_layer_3.safetensors");
    tw_write(clt, b.data, b.size);
    tw_free(&b);
    load_fails(clt, SAE_EUNSUPPORTED, "multi-layer");
    free(clt);
    free(p);
    remove_dir(dir);
}
END_TEST

/* ---- Llama Scope -------------------------------------------------------------------------- */

typedef struct {
    int act; /* 0 relu, 1 topk, 2 jumprelu */
    double theta, norm_in, norm_out;
    size_t k;
    bool dataset_wise, include_norm, sub_bias;
} ls_cfg;

/* lm_saes's from_config rewrites (dataset-wise, unit decoder norm), then encode / decode, on
 * encoder.weight [DS][DI], decoder.weight [DI][DS] as stored. */
static void ls_ref(const ls_cfg *c, const float *enc, const float *eb, const float *dec,
                   const float *db, const float *x, double *f, double *y)
{
    double We[DS * DI], be[DS], Wd[DI * DS], bd[DI];
    for (size_t k = 0; k < DS * DI; k++)
        We[k] = enc[k], Wd[k] = dec[k];
    for (size_t i = 0; i < DS; i++)
        be[i] = eb[i];
    for (size_t j = 0; j < DI; j++)
        bd[j] = db[j];
    if (c->dataset_wise) {
        double s_in = sqrt((double)DI) / c->norm_in, s_out = sqrt((double)DI) / c->norm_out;
        for (size_t i = 0; i < DS; i++)
            be[i] /= s_in;
        for (size_t j = 0; j < DI; j++)
            bd[j] /= s_out;
        for (size_t k = 0; k < DS * DI; k++)
            Wd[k] *= s_in / s_out;
    }
    for (size_t i = 0; c->include_norm && i < DS; i++) {
        double n = 0;
        for (size_t j = 0; j < DI; j++)
            n += Wd[j * DS + i] * Wd[j * DS + i];
        n = sqrt(n);
        for (size_t j = 0; j < DI; j++)
            Wd[j * DS + i] /= n, We[i * DI + j] *= n;
        be[i] *= n;
    }
    for (size_t t = 0; t < NT; t++) {
        double pre[DS];
        for (size_t i = 0; i < DS; i++) {
            pre[i] = be[i];
            for (size_t j = 0; j < DI; j++)
                pre[i] += ((double)x[t * DI + j] - (c->sub_bias ? bd[j] : 0)) * We[i * DI + j];
        }
        for (size_t i = 0; i < DS; i++) {
            double v = pre[i];
            if (c->act == 0)
                v = v > 0 ? v : 0;
            else if (c->act == 2)
                v = v > c->theta ? v : 0;
            else { /* topk of relu(pre): rank among the others (no ties in these weights) */
                size_t above = 0;
                for (size_t o = 0; o < DS; o++)
                    above += (pre[o] > 0 ? pre[o] : 0) > (v > 0 ? v : 0);
                v = above < c->k && v > 0 ? v : 0;
            }
            f[t * DS + i] = v;
        }
        for (size_t j = 0; j < DI; j++) {
            double v = bd[j];
            for (size_t i = 0; i < DS; i++)
                v += f[t * DS + i] * Wd[j * DS + i];
            y[t * DI + j] = v;
        }
    }
}

START_TEST(llama_scope_forward)
{
    float enc[DS * DI], eb[DS], dec[DI * DS], db[DI], x[NT * DI];
    tw_fill(11, enc, DS * DI, 1.0f);
    tw_fill(12, eb, DS, 0.5f);
    tw_fill(13, dec, DI * DS, 1.0f);
    tw_fill(14, db, DI, 0.5f);
    inputs(x, 15);
    static const struct {
        const char *hyper;
        ls_cfg c;
    } cases[] = {
        /* The release: topk with a positive jump_relu_threshold runs as JumpReLU. */
        {"\"act_fn\": \"topk\", \"jump_relu_threshold\": 0.75, \"top_k\": 50, \"norm_activation\": "
         "\"dataset-wise\", \"dataset_average_activation_norm\": {\"in\": 3.5, \"out\": 3.5}, "
         "\"sparsity_include_decoder_norm\": true, \"apply_decoder_bias_to_pre_encoder\": false",
         {2, 0.75, 3.5, 3.5, 0, true, true, false}},
        {"\"act_fn\": \"relu\", \"norm_activation\": \"dataset-wise\", "
         "\"dataset_average_activation_norm\": {\"in\": 2.0, \"out\": 5.0}, \"hook_point_in\": "
         "\"blocks.3.ln2.hook_normalized\", \"hook_point_out\": \"blocks.3.hook_mlp_out\", "
         "\"apply_decoder_bias_to_pre_encoder\": false",
         {0, 0, 2.0, 5.0, 0, true, true, false}},
        {"\"act_fn\": \"topk\", \"top_k\": 3, \"norm_activation\": \"inference\"",
         {1, 0, 0, 0, 3, false, true, true}},
        {"\"act_fn\": \"jumprelu\", \"jump_relu_threshold\": 0.25, \"norm_activation\": \"none\", "
         "\"sparsity_include_decoder_norm\": false",
         {2, 0.25, 0, 0, 0, false, false, true}},
    };
    static const char *const dtypes[] = {"F32", "BF16"};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t d = 0; d < 2; d++) {
            tw_tensor t[4] = {{"decoder.bias", dtypes[d], 1, {DI, 0}, db},
                              {"decoder.weight", dtypes[d], 2, {DI, DS}, dec},
                              {"encoder.bias", dtypes[d], 1, {DS, 0}, eb},
                              {"encoder.weight", dtypes[d], 2, {DS, DI}, enc}};
            char *dir = make_dir("llamascope");
            write_st(dir, "checkpoints/final.safetensors", t, 4);
            char hyper[1024];
            snprintf(hyper, sizeof hyper, "{\"d_model\": %d, \"d_sae\": %d, %s}", DI, DS,
                     cases[c].hyper);
            write_text(dir, "hyperparams.json", hyper);
            double f[NT * DS], y[NT * DI];
            ls_ref(&cases[c].c, enc, eb, dec, db, x, f, y);
            char *ckpt = in_dir(dir, "checkpoints/final.safetensors");
            const char *paths[] = {dir, ckpt};
            for (int p = 0; p < 2; p++) {
                sae_model *m = load_ok(paths[p]);
                check_model(m, x, f, y, DI);
                sae_model_free(m);
            }
            free(ckpt);
            remove_dir(dir);
        }
}
END_TEST

START_TEST(llama_scope_refusals)
{
    float w[DS * DI] = {0};
    for (size_t k = 0; k < DS * DI; k += DS + 1)
        w[k] = 1.0f;
    tw_tensor t[4] = {{"decoder.bias", "F32", 1, {DI, 0}, w},
                      {"decoder.weight", "F32", 2, {DI, DS}, w},
                      {"encoder.bias", "F32", 1, {DS, 0}, w},
                      {"encoder.weight", "F32", 2, {DS, DI}, w}};
    char *dir = make_dir("llamabad");
    write_st(dir, "checkpoints/final.safetensors", t, 4);
    char *ckpt = in_dir(dir, "checkpoints/final.safetensors");
    /* Without hyperparams.json the folder holds nothing libsae knows; the file alone is taken
     * for sparsify's, and the message says what a Llama Scope checkpoint needs. */
    load_fails(ckpt, SAE_EFORMAT, "hyperparams.json");
    static const struct {
        const char *hyper;
        int code;
        const char *needle;
    } cases[] = {
        {"{\"d_sae\": 10}", SAE_EFORMAT, "d_model"},
        {"{\"d_model\": 5, \"d_sae\": 10, \"norm_activation\": \"none\"}", SAE_EFORMAT,
         "encoder.weight"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"use_glu_encoder\": true}", SAE_EUNSUPPORTED, "glu"},
        {"{\"d_model\": 6, \"d_sae\": 10}", SAE_EUNSUPPORTED, "token-wise"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"dataset-wise\"}", SAE_EFORMAT,
         "dataset_average_activation_norm"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"dataset-wise\", "
         "\"dataset_average_activation_norm\": {\"in\": 0, \"out\": 1}}", SAE_EFORMAT, "'in'"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"none\", \"act_fn\": "
         "\"jumprelu\", \"jump_relu_threshold\": -1}", SAE_EUNSUPPORTED, "negative"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"none\", \"act_fn\": \"gelu\"}",
         SAE_EUNSUPPORTED, "gelu"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"none\", \"act_fn\": \"topk\", "
         "\"top_k\": 11}", SAE_EFORMAT, "top_k"},
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"none\", \"use_decoder_bias\": "
         "false}", SAE_EUNSUPPORTED, "use_decoder_bias"},
        /* decoder column 6.. are zero in w: lm_saes would divide by their norm */
        {"{\"d_model\": 6, \"d_sae\": 10, \"norm_activation\": \"none\"}", SAE_EFORMAT, "norm 0"},
        {"[1]", SAE_EFORMAT, "object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_text(dir, "hyperparams.json", cases[i].hyper);
        load_fails(dir, cases[i].code, cases[i].needle);
    }
    tw_tensor r1[5] = {t[0], t[1], t[2], t[3], {"log_jumprelu_threshold", "F32", 1, {DS, 0}, w}};
    write_st(dir, "checkpoints/final.safetensors", r1, 5);
    /* The R1 layout's tensor sends it to the R1 reader, which reads config.json, not this. */
    load_fails(ckpt, SAE_EFORMAT, "config.json");
    free(ckpt);
    remove_dir(dir);
}
END_TEST

/* ---- Llama Scope R1 / lm_saes 2025 (tests/fixtures/llamascope_r1/make.py) ---------------- */

static char *r1_fixture(const char *rel) { return tu_path_in(SAE_LLAMASCOPE_R1_FIXTURES, rel); }

static cJSON *r1_json(const char *name)
{
    char *path = r1_fixture(name);
    cJSON *j = tu_read_json(path);
    free(path);
    return j;
}

/* A JSON matrix [rows][cols] as doubles. */
static double *r1_matrix(const cJSON *a, size_t rows, size_t cols)
{
    ck_assert_int_eq(cJSON_GetArraySize(a), (int)rows);
    double *v = tu_malloc(rows * cols * sizeof(double));
    for (size_t i = 0; i < rows; i++) {
        const cJSON *row = cJSON_GetArrayItem(a, (int)i);
        ck_assert_int_eq(cJSON_GetArraySize(row), (int)cols);
        for (size_t j = 0; j < cols; j++)
            v[i * cols + j] = cJSON_GetArrayItem(row, (int)j)->valuedouble;
    }
    return v;
}

START_TEST(llama_scope_r1_forward)
{
    cJSON *all = r1_json("expected.json");
    size_t checked = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, all) {
        const char *rel = cJSON_GetObjectItem(e, "path")->valuestring;
        const size_t di = (size_t)cJSON_GetObjectItem(e, "d_in")->valuedouble;
        const size_t ds = (size_t)cJSON_GetObjectItem(e, "d_sae")->valuedouble;
        const cJSON *xs = cJSON_GetObjectItem(e, "x");
        const size_t n = (size_t)cJSON_GetArraySize(xs);
        double *xd = r1_matrix(xs, n, di);
        double *f = r1_matrix(cJSON_GetObjectItem(e, "f"), n, ds);
        double *y = r1_matrix(cJSON_GetObjectItem(e, "y"), n, di);
        float *x = tu_malloc(n * di * sizeof(float)), *got_f = tu_malloc(n * ds * sizeof(float));
        float *got_y = tu_malloc(n * di * sizeof(float));
        for (size_t k = 0; k < n * di; k++)
            x[k] = (float)xd[k]; /* make.py's x are floats already */
        char *dir = r1_fixture(rel), *file = in_dir(dir, "sae_weights.safetensors");
        const char *paths[] = {dir, file};
        for (int p = 0; p < 2; p++) {
            sae_model *m = load_ok(paths[p]);
            ck_assert_str_eq(sae_model_format(m), "llama-scope-r1");
            ck_assert_int_eq(sae_model_arch(m), cJSON_IsTrue(cJSON_GetObjectItem(e, "jumprelu"))
                                                    ? SAE_ARCH_JUMPRELU
                                                    : SAE_ARCH_RELU);
            ck_assert_uint_eq(sae_model_d_in(m), di);
            ck_assert_uint_eq(sae_model_d_sae(m), ds);
            ck_assert_ok(sae_encode(m, x, n, got_f));
            tu_assert_close(got_f, f, n * ds, 1e-5, rel);
            ck_assert_ok(sae_reconstruct(m, x, n, got_y));
            tu_assert_close(got_y, y, n * di, 1e-5, rel);
            /* Where SAELens's reading is recorded, the features lm_saes fires are not its. */
            const cJSON *sl = cJSON_GetObjectItem(e, "f_saelens");
            if (sl != NULL && strcmp(rel, "r1_plain_threshold") != 0) {
                double *fs = r1_matrix(sl, n, ds);
                size_t differ = 0;
                for (size_t k = 0; k < n * ds; k++)
                    differ += (got_f[k] != 0.0f) != (fs[k] != 0.0);
                ck_assert_msg(differ > 0, "%s: fires what SAELens's reading fires", rel);
                free(fs);
            }
            sae_model_free(m);
        }
        free(dir);
        free(file);
        free(xd), free(f), free(y), free(x), free(got_f), free(got_y);
        checked++;
    }
    ck_assert_uint_eq(checked, 8);
    cJSON_Delete(all);
}
END_TEST

START_TEST(llama_scope_r1_refusals)
{
    cJSON *all = r1_json("refused.json");
    size_t checked = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, all) {
        char *dir = r1_fixture(cJSON_GetObjectItem(e, "path")->valuestring);
        char *file = in_dir(dir, "sae_weights.safetensors");
        const int code = (int)cJSON_GetObjectItem(e, "code")->valuedouble;
        const char *needle = cJSON_GetObjectItem(e, "needle")->valuestring;
        load_fails(dir, code, needle);
        load_fails(file, code, needle);
        free(dir);
        free(file);
        checked++;
    }
    ck_assert_uint_eq(checked, 22);
    cJSON_Delete(all);
}
END_TEST

/* ---- circuit-tracer ----------------------------------------------------------------------- */

START_TEST(circuit_tracer_forward)
{
    float We[DS * DI], Wd[DS * DO], Wd_t[DO * DS], be[DS], bd[DO], th[DS], Ws[DO * DI];
    float x[NT * DI];
    tw_fill(21, We, DS * DI, 1.0f);
    tw_fill(22, Wd, DS * DO, 1.0f);
    tw_fill(23, be, DS, 0.5f);
    tw_fill(24, bd, DO, 0.5f);
    tw_fill(25, th, DS, 0.5f);
    tw_fill(26, Ws, DO * DI, 1.0f);
    for (size_t i = 0; i < DS; i++) {
        th[i] = fabsf(th[i]);
        for (size_t o = 0; o < DO; o++)
            Wd_t[o * DS + i] = Wd[i * DO + o];
    }
    inputs(x, 27);
    for (int variant = 0; variant < 4; variant++) {
        bool jump = variant & 1, june = variant & 2, skip = variant != 1;
        for (size_t d = 0; d < 2; d++) {
            const char *dt = d ? "BF16" : "F32";
            tw_tensor t[6];
            size_t n = 0;
            t[n++] = (tw_tensor){"W_dec", dt, 2, {june ? DO : DS, june ? DS : DO}, june ? Wd_t : Wd};
            t[n++] = (tw_tensor){"W_enc", dt, 2, {DS, DI}, We};
            if (skip)
                t[n++] = (tw_tensor){"W_skip", dt, 2, {DO, DI}, Ws};
            if (jump)
                t[n++] = (tw_tensor){"activation_function.threshold", dt, 1, {DS, 0}, th};
            t[n++] = (tw_tensor){"b_dec", dt, 1, {DO, 0}, bd};
            t[n++] = (tw_tensor){"b_enc", dt, 1, {DS, 0}, be};
            char *dir = make_dir("ctracer");
            write_st(dir, "layer_3.safetensors", t, n);
            char *p = in_dir(dir, "layer_3.safetensors");
            sae_model *m = load_ok(p);
            ck_assert_int_eq(sae_model_is_transcoder(m), 1);
            ck_assert_uint_eq(sae_model_d_out(m), DO);
            /* SingleLayerTranscoder: F.linear(x, W_enc, b_enc), JumpReLU pre * (pre > t),
             * acts @ W_dec + b_dec + x @ W_skip.T */
            double f[NT * DS], y[NT * DO];
            for (size_t k = 0; k < NT; k++) {
                for (size_t i = 0; i < DS; i++) {
                    double pre = be[i];
                    for (size_t j = 0; j < DI; j++)
                        pre += (double)x[k * DI + j] * We[i * DI + j];
                    f[k * DS + i] = jump ? (pre > th[i] ? pre : 0) : (pre > 0 ? pre : 0);
                }
                for (size_t o = 0; o < DO; o++) {
                    double v = bd[o];
                    for (size_t i = 0; i < DS; i++)
                        v += f[k * DS + i] * Wd[i * DO + o];
                    for (size_t j = 0; skip && j < DI; j++)
                        v += (double)x[k * DI + j] * Ws[o * DI + j];
                    y[k * DO + o] = v;
                }
            }
            check_model(m, x, f, y, DO);
            sae_model_free(m);
            /* The same layer in a transcoder set: config.yaml as load_transcoder_from_hub
             * reads it (a ReLU set says so; a JumpReLU set leaves it to the weights). */
            write_text(dir, "config.yaml",
                       jump ? "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
                              "feature_output_hook: mlp.hook_out\nmodel_name: google/gemma-2-2b\n"
                            : "model_kind: transcoder_set\nactivation: relu\n"
                              "feature_input_hook: mlp.hook_in\nfeature_output_hook: "
                              "mlp.hook_out\nmodel_name: meta-llama/Llama-3.2-1B\n");
            m = load_ok(p);
            check_model(m, x, f, y, DO);
            sae_model_free(m);
            free(p);
            remove_dir(dir);
        }
    }
}
END_TEST

START_TEST(circuit_tracer_config_yaml)
{
    float w[DS * DI], th[DS]; /* DI > DO: big enough for every tensor below */
    tw_fill(31, w, DS * DI, 1.0f);
    for (size_t i = 0; i < DS; i++)
        th[i] = 0.25f;
    char *dir = make_dir("ctyaml");
    char *p = in_dir(dir, "layer_0.safetensors");
    char *yaml = in_dir(dir, "config.yaml");
    tw_tensor t[5] = {{"W_dec", "F32", 2, {DS, DO}, w},
                      {"W_enc", "F32", 2, {DS, DI}, w},
                      {"b_dec", "F32", 1, {DO, 0}, w},
                      {"b_enc", "F32", 1, {DS, 0}, w},
                      {"activation_function.threshold", "F32", 1, {DS, 0}, th}};
    write_st(dir, "layer_0.safetensors", t, 4); /* a ReLU layer: no threshold, no k */
    write_st(dir, "layer_1.safetensors", t, 4);
    /* A TopK set's layer files hold no k: without its config.yaml the layer would be read as
     * ReLU. circuit-tracer's TopK keeps negative values, so the set is refused by name. */
    write_text(dir, "config.yaml", "model_kind: transcoder_set\nactivation: topk\nk: 128\n");
    load_fails(p, SAE_EUNSUPPORTED, "activation topk (k = 128)");
    write_text(dir, "config.yaml", "model_kind: cross_layer_transcoder\n");
    load_fails(p, SAE_EUNSUPPORTED, "cross-layer");
    write_text(dir, "config.yaml", "model_kind: lorsa\n");
    load_fails(p, SAE_EUNSUPPORTED, "'lorsa'");
    write_text(dir, "config.yaml", "activation: relu\n");
    write_st(dir, "layer_0.safetensors", t, 5);
    load_fails(p, SAE_EFORMAT, "activation relu");
    static const struct {
        const char *text, *needle;
    } bad[] = {
        {"model_kind: [transcoder_set\n", "not YAML"},
        {"- model_kind\n", "mapping"},
        {"", "mapping"},
        {"activation: relu\nactivation: topk\n", "twice"},
        {"activation: [relu]\n", "single value"},
        {"model_kind: &a transcoder_set\nactivation: *a\nk: {a: 1}\n", "single value"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(dir, "config.yaml", bad[i].text);
        load_fails(p, SAE_EFORMAT, bad[i].needle);
    }
    /* The June 2025 local config (transcoders: id, layer, filepath; no model_kind) is a set. */
    write_text(dir, "config.yaml",
               "model_name: \"meta-llama/Llama-3.2-1B\"\nfeature_input_hook: \"hook_resid_mid\"\n"
               "feature_output_hook: 'mlp.hook_out'\ntranscoders:\n  - id: \"relu-0\"\n"
               "    layer: 0\n    filepath: \"layer_0.safetensors\"\n");
    sae_model *m = load_ok(p);
    ck_assert_int_eq(sae_model_arch(m), SAE_ARCH_JUMPRELU);
    sae_model_free(m);
    /* The folder, or its config.yaml, names a set of models: refused saying which to load. */
    load_fails(dir, SAE_EUNSUPPORTED, "layer_<l>.safetensors");
    load_fails(yaml, SAE_EUNSUPPORTED, "transcoder set");
    write_text(dir, "config.yaml", "model_kind: transcoder_set\nactivation: topk\nk: 64\n");
    load_fails(dir, SAE_EUNSUPPORTED, "topk");
    free(yaml);
    free(p);
    remove_dir(dir);
}
END_TEST

START_TEST(circuit_tracer_refusals)
{
    float w[DS * DS] = {0}, th[DS], k = 8;
    for (size_t i = 0; i < DS; i++)
        th[i] = i == 4 ? -0.25f : 0.25f;
    char *dir = make_dir("ctbad");
    char *p = in_dir(dir, "layer_0.safetensors");
    tw_tensor t[5] = {{"W_dec", "F32", 2, {DS, DO}, w},
                      {"W_enc", "F32", 2, {DS, DI}, w},
                      {"activation_function.threshold", "F32", 1, {DS, 0}, th},
                      {"b_dec", "F32", 1, {DO, 0}, w},
                      {"b_enc", "F32", 1, {DS, 0}, w}};
    write_st(dir, "layer_0.safetensors", t, 5);
    load_fails(p, SAE_EUNSUPPORTED, "threshold[4]");
    tw_tensor topk[5] = {t[0], t[1], t[3], t[4], {"k", "F32", 0, {0, 0}, &k}};
    write_st(dir, "layer_0.safetensors", topk, 5);
    load_fails(p, SAE_EUNSUPPORTED, "TopK");
    tw_tensor square[4] = {{"W_dec", "F32", 2, {DS, DS}, w}, t[1],
                           {"b_dec", "F32", 1, {DS, 0}, w}, t[4]};
    write_st(dir, "layer_0.safetensors", square, 4);
    load_fails(p, SAE_EUNSUPPORTED, "square");
    tw_tensor wrong[4] = {{"W_dec", "F32", 2, {DO, DI}, w}, t[1], t[3], t[4]};
    write_st(dir, "layer_0.safetensors", wrong, 4);
    load_fails(p, SAE_EFORMAT, "W_dec");
    free(p);
    remove_dir(dir);
}
END_TEST

/* ---- numpy's other orders ----------------------------------------------------------------- */

/* A version 1.0 .npy of rows x cols doubles stored as descr, in C or Fortran order. */
static void npy_bytes(tw_buf *b, const char *descr, bool fortran, size_t rows, size_t cols,
                      const double *v)
{
    char dict[128];
    int len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': %s, 'shape': (%zu, %zu), }",
                       descr, fortran ? "True" : "False", rows, cols);
    size_t total = (10 + (size_t)len + 1 + 63) / 64 * 64;
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                             (unsigned char)((total - 10) & 0xff), (unsigned char)((total - 10) >> 8)};
    tw_put(b, pre, 10);
    tw_put(b, dict, (size_t)len);
    for (size_t i = 10 + (size_t)len; i + 1 < total; i++)
        tw_put(b, " ", 1);
    tw_put(b, "\n", 1);
    size_t es = (size_t)(descr[2] - '0');
    bool big = descr[0] == '>';
    for (size_t k = 0; k < rows * cols; k++) {
        size_t r = fortran ? k % rows : k / cols, c = fortran ? k / rows : k % cols;
        double d = v[r * cols + c];
        unsigned char bytes[8];
        if (es == 8) {
            memcpy(bytes, &d, 8);
        } else {
            float f = (float)d;
            memcpy(bytes, &f, 4); /* the values are exact in float16: see the callers */
            if (es == 2) {
                uint32_t u;
                memcpy(&u, &f, 4);
                uint16_t h = (uint16_t)(((u >> 16) & 0x8000) |
                                        (f == 0 ? 0 : ((((u >> 23) & 0xff) - 112) << 10) |
                                                          ((u >> 13) & 0x3ff)));
                memcpy(bytes, &h, 2);
            }
        }
        if (big)
            for (size_t a = 0, z = es - 1; a < z; a++, z--) {
                unsigned char s = bytes[a];
                bytes[a] = bytes[z];
                bytes[z] = s;
            }
        tw_put(b, bytes, es);
    }
}

START_TEST(npy_fortran_and_big_endian)
{
    enum { R = 9, CC = 3 };
    double v[R * CC];
    for (size_t k = 0; k < R * CC; k++)
        v[k] = ((double)k - 13.0) / 8.0; /* exact in every float type */
    static const char *const descrs[] = {">f4", ">f2", ">f8", "<f4", "<f2", "<f8"};
    char *path = tu_tmp_path("orders.npy");
    for (size_t d = 0; d < 6; d++)
        for (int fortran = 0; fortran < 2; fortran++) {
            tw_buf b = {0};
            npy_bytes(&b, descrs[d], fortran, R, CC, v);
            tw_write(path, b.data, b.size);
            tw_free(&b);
            sae_npy *a;
            ck_assert_msg(sae_npy_open(&a, path) == SAE_OK, "%s", sae_last_error());
            ck_assert_uint_eq(sae_npy_rows(a), R);
            float got[R * CC];
            ck_assert_ok(sae_npy_read(a, 2, 5, got));
            for (size_t k = 0; k < 5 * CC; k++)
                ck_assert_msg(got[k] == (float)v[2 * CC + k], "%s fortran %d: [%zu] %g != %g",
                              descrs[d], fortran, k, (double)got[k], v[2 * CC + k]);
            sae_npy_close(a);
        }
    free(path);
}
END_TEST

START_TEST(npz_fortran_and_big_endian_members)
{
    double we[DI * DS], wd[DS * DI], be[DS], bd[DI], th[DS];
    float x[NT * DI];
    for (size_t k = 0; k < DI * DS; k++) {
        we[k] = (double)((int)((k * 7) % 13) - 6) / 16.0;
        wd[k] = (double)((int)((k * 5) % 11) - 5) / 16.0;
    }
    for (size_t i = 0; i < DS; i++)
        be[i] = (double)((int)i - 4) / 32.0, th[i] = (double)(i % 3) / 8.0;
    for (size_t j = 0; j < DI; j++)
        bd[j] = (double)((int)j - 2) / 16.0;
    inputs(x, 31);
    tw_buf members[5] = {{0}};
    const char *names[5] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy", "threshold.npy"};
    npy_bytes(&members[0], "<f4", true, DI, DS, we); /* np.savez(W_enc=W_dec.T)-like */
    npy_bytes(&members[1], ">f4", true, DS, DI, wd);
    npy_bytes(&members[2], ">f8", false, DS, 1, be);
    npy_bytes(&members[3], ">f2", false, DI, 1, bd);
    npy_bytes(&members[4], "<f8", false, DS, 1, th);
    tw_buf zip = {0};
    tw_zip(&zip, names, members, 5, true);
    char *path = tu_tmp_path("orders.npz");
    tw_write(path, zip.data, zip.size);
    tw_free(&zip);
    for (int i = 0; i < 5; i++)
        tw_free(&members[i]);
    /* The members are 2-D (n, 1) vectors: rewrite b_enc, b_dec, threshold as 1-D. */
    sae_model *m = NULL;
    int rc = sae_model_load(&m, path);
    ck_assert_msg(rc == SAE_EFORMAT && strstr(sae_last_error(), "b_enc") != NULL, "%s",
                  sae_last_error());
    /* 1-D members: Fortran order is the same bytes, byte order still swapped. */
    float we_f[DI * DS], wd_f[DS * DI], be_f[DS], bd_f[DI], th_f[DS];
    for (size_t k = 0; k < DI * DS; k++)
        we_f[k] = (float)we[k], wd_f[k] = (float)wd[k];
    for (size_t i = 0; i < DS; i++)
        be_f[i] = (float)be[i], th_f[i] = (float)th[i];
    for (size_t j = 0; j < DI; j++)
        bd_f[j] = (float)bd[j];
    tw_buf one[5] = {{0}};
    npy_bytes(&one[0], "<f4", true, DI, DS, we);
    npy_bytes(&one[1], ">f4", true, DS, DI, wd);
    size_t vec[3] = {DS, DI, DS};
    const float *vecs[3] = {be_f, bd_f, th_f};
    for (int i = 0; i < 3; i++)
        tw_npy(&one[2 + i], "<f4", 1, &vec[i], vecs[i]);
    /* make b_enc big-endian by hand: swap its descr and data */
    one[2].data[(size_t)(strstr((char *)one[2].data + 10, "<f4") - (char *)one[2].data)] = '>';
    for (size_t i = 0; i < DS; i++) {
        unsigned char *e = one[2].data + one[2].size - (DS - i) * 4, s;
        s = e[0], e[0] = e[3], e[3] = s, s = e[1], e[1] = e[2], e[2] = s;
    }
    tw_zip(&zip, names, one, 5, false);
    tw_write(path, zip.data, zip.size);
    tw_free(&zip);
    for (int i = 0; i < 5; i++)
        tw_free(&one[i]);
    m = load_ok(path);
    double f[NT * DS], y[NT * DI];
    gs2_ref(we_f, be_f, wd_f, bd_f, th_f, NULL, false, DI, x, f, y);
    check_model(m, x, f, y, DI);
    sae_model_free(m);
    free(path);
}
END_TEST

static Suite *publishers_suite(void)
{
    Suite *s = suite_create("publishers");
    TCase *tc = tcase_create("gemma_scope_2");
    tcase_add_test(tc, gemma_scope_2_every_dtype);
    tcase_add_test(tc, gemma_scope_2_refusals);
    suite_add_tcase(s, tc);
    tc = tcase_create("llama_scope");
    tcase_add_test(tc, llama_scope_forward);
    tcase_add_test(tc, llama_scope_refusals);
    tcase_add_test(tc, llama_scope_r1_forward);
    tcase_add_test(tc, llama_scope_r1_refusals);
    suite_add_tcase(s, tc);
    tc = tcase_create("circuit_tracer");
    tcase_add_test(tc, circuit_tracer_forward);
    tcase_add_test(tc, circuit_tracer_refusals);
    tcase_add_test(tc, circuit_tracer_config_yaml);
    suite_add_tcase(s, tc);
    tc = tcase_create("numpy_orders");
    tcase_add_test(tc, npy_fortran_and_big_endian);
    tcase_add_test(tc, npz_fortran_and_big_endian_members);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(publishers_suite)
