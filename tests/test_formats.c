/* Loading what SAELens, sparsify and Gemma Scope write: files made with each tool's layout and
 * every dtype, on non-square shapes (a W_enc/W_dec mix-up cannot pass), encoded and checked
 * against float64 loops of each tool's own math; the real SAELens 3.4 file; and the settings
 * that must be refused with SAE_EUNSUPPORTED naming them. */
#include "testutil.h"
#include "writers.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { D_IN = 7, D_SAE = 12, N_TOK = 5 };

static const char *const dtypes[] = {"F32", "F16", "BF16", "F64"};

typedef struct {
    float W_enc[D_IN * D_SAE], W_enc_t[D_SAE * D_IN], W_dec[D_SAE * D_IN];
    float b_enc[D_SAE], b_dec[D_IN], threshold[D_SAE];
} weights;

static void make_weights(weights *w, unsigned long long seed)
{
    tw_fill(seed, w->W_enc, D_IN * D_SAE, 1.0f);
    tw_fill(seed + 1, w->W_dec, D_SAE * D_IN, 1.0f);
    tw_fill(seed + 2, w->b_enc, D_SAE, 0.5f);
    tw_fill(seed + 3, w->b_dec, D_IN, 1.0f);
    tw_fill(seed + 4, w->threshold, D_SAE, 0.5f);
    for (size_t i = 0; i < D_SAE; i++) {
        w->threshold[i] = fabsf(w->threshold[i]);
        for (size_t j = 0; j < D_IN; j++)
            w->W_enc_t[i * D_IN + j] = w->W_enc[j * D_SAE + i];
    }
}

/* Encodes random tokens and compares with the contract's float64 loops over w, with the given
 * parameters: what each tool computes once its layout is mapped onto libsae's. */
static void check_encode(sae_model *m, const weights *w, sae_arch arch, size_t k, int apply_b_dec,
                         double scale)
{
    ck_assert_int_eq(sae_model_arch(m), arch);
    ck_assert_uint_eq(sae_model_d_in(m), D_IN);
    ck_assert_uint_eq(sae_model_d_sae(m), D_SAE);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    ck_assert_double_eq(v, apply_b_dec);
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &v));
    ck_assert_double_eq(v, (float)scale);
    if (arch == SAE_ARCH_TOPK) {
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
        ck_assert_double_eq(v, (double)k);
    }
    tu_weights ref = {.arch = arch, .d_in = D_IN, .d_sae = D_SAE, .k = k,
                      .apply_b_dec = apply_b_dec, .scale = (float)scale,
                      .W_enc = (float *)w->W_enc, .W_dec = (float *)w->W_dec,
                      .b_enc = (float *)w->b_enc, .b_dec = (float *)w->b_dec,
                      .threshold = (float *)w->threshold};
    float x[N_TOK * D_IN], f[N_TOK * D_SAE];
    tu_rng r = {99};
    tu_fill(&r, x, N_TOK * D_IN, -2.0f, 2.0f);
    ck_assert_ok(sae_encode(m, x, N_TOK, f));
    double want[D_SAE];
    for (size_t t = 0; t < N_TOK; t++) {
        tu_ref_encode(&ref, x + t * D_IN, want);
        tu_assert_close(f + t * D_SAE, want, D_SAE, 1e-5, "f");
    }
    float got[D_SAE * D_IN];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, got));
    ck_assert_mem_eq(got, w->W_dec, sizeof got);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, got));
    ck_assert_mem_eq(got, w->W_enc, sizeof got);
}

/* A fresh folder under the test's temporary directory. */
static char *make_dir(const char *name)
{
    char *dir = tu_tmp_path(name);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    return dir;
}

static char *in_dir(const char *dir, const char *name)
{
    size_t len = strlen(dir) + strlen(name) + 2;
    char *p = tu_malloc(len);
    snprintf(p, len, "%s/%s", dir, name);
    return p;
}

static void write_in(const char *dir, const char *name, const void *data, size_t size)
{
    char *p = in_dir(dir, name);
    tw_write(p, data, size);
    free(p);
}

static void write_text_in(const char *dir, const char *name, const char *text)
{
    write_in(dir, name, text, strlen(text));
}

static void remove_dir(char *dir)
{
    static const char *const names[] = {"cfg.json", "sae_weights.safetensors", "sae.safetensors",
                                        "params.npz", "activation_scaler.json", "model.safetensors"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *p = in_dir(dir, names[i]);
        unlink(p);
        free(p);
    }
    ck_assert_int_eq(rmdir(dir), 0);
    free(dir);
}

static sae_model *load_ok(const char *path)
{
    sae_model *m = NULL;
    ck_assert_ok(sae_model_load(&m, path));
    ck_assert_ptr_nonnull(m);
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

/* ---- SAELens ------------------------------------------------------------------------------ */

static void saelens_weights(tw_buf *out, const weights *w, const char *dtype, bool threshold)
{
    /* save_file sorts by name, as torch writes them. */
    tw_tensor t[5] = {{"W_dec", dtype, 2, {D_SAE, D_IN}, w->W_dec},
                      {"W_enc", dtype, 2, {D_IN, D_SAE}, w->W_enc},
                      {"b_dec", dtype, 1, {D_IN, 0}, w->b_dec},
                      {"b_enc", dtype, 1, {D_SAE, 0}, w->b_enc},
                      {"threshold", dtype, 1, {D_SAE, 0}, w->threshold}};
    tw_safetensors(out, t, threshold ? 5 : 4, NULL);
}

/* A SAELens folder: cfg.json text (NULL: none) and weights in dtype. */
static char *saelens_dir(const char *name, const char *cfg, const weights *w, const char *dtype,
                         bool threshold)
{
    char *dir = make_dir(name);
    tw_buf b = {0};
    saelens_weights(&b, w, dtype, threshold);
    write_in(dir, "sae_weights.safetensors", b.data, b.size);
    tw_free(&b);
    if (cfg != NULL)
        write_in(dir, "cfg.json", cfg, strlen(cfg));
    return dir;
}

static void v6_cfg(char *buf, size_t size, const char *arch, const char *extra)
{
    snprintf(buf, size,
             "{\"d_in\": %d, \"d_sae\": %d, \"dtype\": \"float32\", \"device\": \"cpu\", "
             "\"apply_b_dec_to_input\": true, \"normalize_activations\": \"none\", "
             "\"reshape_activations\": \"none\", \"architecture\": \"%s\"%s%s, "
             "\"metadata\": {\"sae_lens_version\": \"6.18.0\", \"sae_lens_training_version\": "
             "\"6.18.0\", \"hook_name\": \"blocks.3.hook_resid_post\", \"context_size\": 1024}}",
             D_IN, D_SAE, arch, extra ? ", " : "", extra ? extra : "");
}

START_TEST(saelens_v6_every_architecture_and_dtype)
{
    weights w;
    make_weights(&w, 10);
    static const struct {
        const char *name, *extra;
        sae_arch arch;
    } archs[] = {{"standard", NULL, SAE_ARCH_RELU},
                 {"topk", "\"k\": 3, \"rescale_acts_by_decoder_norm\": false", SAE_ARCH_TOPK},
                 {"jumprelu", NULL, SAE_ARCH_JUMPRELU}};
    for (size_t a = 0; a < 3; a++) {
        for (size_t d = 0; d < 4; d++) {
            char cfg[1024];
            v6_cfg(cfg, sizeof cfg, archs[a].name, archs[a].extra);
            char *dir = saelens_dir("saelens", cfg, &w, dtypes[d],
                                    archs[a].arch == SAE_ARCH_JUMPRELU);
            sae_model *m = load_ok(dir);
            ck_assert_str_eq(sae_model_format(m), "saelens");
            ck_assert_str_eq(sae_model_dtype(m), dtypes[d]);
            check_encode(m, &w, archs[a].arch, 3, 1, 1.0);
            sae_model_free(m);
            /* The weights file alone finds its cfg.json; naming cfg.json loads the folder. */
            char *file = in_dir(dir, "sae_weights.safetensors"), *cfg_path = in_dir(dir, "cfg.json");
            m = load_ok(file);
            check_encode(m, &w, archs[a].arch, 3, 1, 1.0);
            sae_model_free(m);
            m = load_ok(cfg_path);
            check_encode(m, &w, archs[a].arch, 3, 1, 1.0);
            sae_model_free(m);
            free(file);
            free(cfg_path);
            remove_dir(dir);
        }
    }
}
END_TEST

START_TEST(saelens_pre_6_flat_layout)
{
    weights w;
    make_weights(&w, 20);
    char cfg[1024];
    /* 3.x: activation_fn_str, no architecture, apply_b_dec_to_input false. */
    snprintf(cfg, sizeof cfg,
             "{\"d_in\": %d, \"d_sae\": %d, \"dtype\": \"float32\", \"device\": \"cpu\", "
             "\"model_name\": \"m\", \"hook_name\": \"blocks.0.hook_mlp_out\", \"hook_layer\": 0, "
             "\"hook_head_index\": null, \"activation_fn_str\": \"relu\", "
             "\"apply_b_dec_to_input\": false, \"finetuning_scaling_factor\": false, "
             "\"sae_lens_training_version\": \"3.4.0\", \"normalize_activations\": \"none\"}",
             D_IN, D_SAE);
    char *dir = saelens_dir("flat", cfg, &w, "F32", false);
    sae_model *m = load_ok(dir);
    check_encode(m, &w, SAE_ARCH_RELU, 0, 0, 1.0);
    sae_model_free(m);
    remove_dir(dir);
    /* 4.x/5.x TopK: activation_fn "topk" with its k in activation_fn_kwargs; the bool
     * normalize_activations false means none; apply_b_dec_to_input absent means true. */
    snprintf(cfg, sizeof cfg,
             "{\"d_in\": %d, \"d_sae\": %d, \"dtype\": \"torch.float32\", \"architecture\": "
             "\"standard\", \"activation_fn\": \"topk\", \"activation_fn_kwargs\": {\"k\": 4}, "
             "\"normalize_activations\": false, \"sae_lens_version\": \"5.3.0\"}",
             D_IN, D_SAE);
    dir = saelens_dir("flat-topk", cfg, &w, "BF16", false);
    m = load_ok(dir);
    check_encode(m, &w, SAE_ARCH_TOPK, 4, 1, 1.0);
    sae_model_free(m);
    remove_dir(dir);
}
END_TEST

/* The contract: a SAELens weights file loads only with its cfg.json beside it. Without it, a TopK
 * SAE's weights would run as ReLU, a normalized SAE unnormalized: nothing in the tensors says. */
START_TEST(saelens_without_cfg_is_refused)
{
    weights w;
    make_weights(&w, 30);
    char *dir = saelens_dir("nocfg", NULL, &w, "F16", false);
    char *file = in_dir(dir, "sae_weights.safetensors");
    load_fails(file, SAE_EFORMAT, "need the cfg.json");
    load_fails(dir, SAE_EFORMAT, "need the cfg.json");
    free(file);
    remove_dir(dir);
    dir = saelens_dir("nocfg-jump", NULL, &w, "F32", true);
    load_fails(dir, SAE_EFORMAT, "need the cfg.json");
    remove_dir(dir);
}
END_TEST

START_TEST(saelens_expected_average_only_in)
{
    weights w;
    make_weights(&w, 40);
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "{\"d_in\": %d, \"d_sae\": %d, \"architecture\": \"standard\", "
             "\"apply_b_dec_to_input\": true, \"normalize_activations\": "
             "\"expected_average_only_in\", \"meta\": {\"sae_lens_version\": \"6.0.0-rc.1\"}}",
             D_IN, D_SAE);
    char *dir = saelens_dir("norm", cfg, &w, "F32", false);
    /* No scaling factor stored: refused, naming the setting. */
    load_fails(dir, SAE_EUNSUPPORTED, "expected_average_only_in");
    /* The final inference save writes null (the factor is folded and the cfg says none). */
    write_text_in(dir, "activation_scaler.json", "{\"scaling_factor\": null}");
    load_fails(dir, SAE_EUNSUPPORTED, "scaling factor");
    const char *scaler = "{\"scaling_factor\": 0.4375}";
    write_in(dir, "activation_scaler.json", scaler, strlen(scaler));
    sae_model *m = load_ok(dir);
    check_encode(m, &w, SAE_ARCH_RELU, 0, 1, 0.4375);
    /* Decoding returns to the caller's units: (f @ W_dec + b_dec) / s. */
    float f[D_SAE], xh[D_IN];
    for (size_t i = 0; i < D_SAE; i++)
        f[i] = (float)i * 0.25f;
    ck_assert_ok(sae_decode(m, f, 1, xh));
    double want[D_IN];
    for (size_t j = 0; j < D_IN; j++) {
        double acc = w.b_dec[j];
        for (size_t i = 0; i < D_SAE; i++)
            acc += (double)f[i] * w.W_dec[i * D_IN + j];
        want[j] = acc / 0.4375;
    }
    tu_assert_close(xh, want, D_IN, 1e-5, "x_hat");
    sae_model_free(m);
    /* A bad scaler file is an error, not a silent scale of 1. */
    write_text_in(dir, "activation_scaler.json", "{\"scaling_factor\": \"big\"}");
    load_fails(dir, SAE_EFORMAT, "scaling_factor");
    write_text_in(dir, "activation_scaler.json", "{\"scaling_factor\": -2}");
    load_fails(dir, SAE_EFORMAT, "scaling_factor");
    remove_dir(dir);
    /* With normalize_activations none the scaler file is not consulted. */
    v6_cfg(cfg, sizeof cfg, "standard", NULL);
    dir = saelens_dir("norm-none", cfg, &w, "F32", false);
    write_text_in(dir, "activation_scaler.json", "{\"scaling_factor\": 3.5}");
    m = load_ok(dir);
    check_encode(m, &w, SAE_ARCH_RELU, 0, 1, 1.0);
    sae_model_free(m);
    remove_dir(dir);
}
END_TEST

START_TEST(saelens_batchtopk)
{
    weights w;
    make_weights(&w, 50);
    char cfg[1024];
    /* The inference save: a per-feature threshold, i.e. JumpReLU. */
    v6_cfg(cfg, sizeof cfg, "batchtopk", "\"k\": 2.5");
    char *dir = saelens_dir("btk", cfg, &w, "F32", true);
    sae_model *m = load_ok(dir);
    check_encode(m, &w, SAE_ARCH_JUMPRELU, 0, 1, 1.0);
    sae_model_free(m);
    remove_dir(dir);
    /* A training checkpoint: the global topk_threshold, a float64 scalar. */
    dir = make_dir("btk-ckpt");
    float theta = 0.1875f;
    tw_tensor t[5] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                      {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                      {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                      {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc},
                      {"topk_threshold", "F64", 0, {0, 0}, &theta}};
    tw_buf b = {0};
    tw_safetensors(&b, t, 5, NULL);
    write_in(dir, "sae_weights.safetensors", b.data, b.size);
    write_in(dir, "cfg.json", cfg, strlen(cfg));
    tw_free(&b);
    m = load_ok(dir);
    ck_assert_int_eq(sae_model_arch(m), SAE_ARCH_BATCHTOPK);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &v));
    ck_assert_double_eq(v, 0.1875);
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
    ck_assert_double_eq(v, 3.0); /* k 2.5 rounds half up */
    sae_model_free(m);
    remove_dir(dir);
}
END_TEST

START_TEST(saelens_unsupported_settings_are_named)
{
    weights w;
    make_weights(&w, 60);
    static const struct {
        const char *arch, *extra, *needle;
        int code;
    } cases[] = {
        /* Kinds tests/test_peers.c loads, here over weights that are not theirs. */
        {"gated", NULL, "b_enc", SAE_EUNSUPPORTED}, /* GatedSAE has b_gate, no b_enc */
        {"transcoder", NULL, "W_dec", SAE_EFORMAT}, /* d_out defaults to 768 */
        {"crosscoder", NULL, "crosscoder", SAE_EUNSUPPORTED},
        {"standard", "\"reshape_activations\": \"sideways\"", "sideways", SAE_EUNSUPPORTED},
        {"standard", "\"normalize_activations\": \"sometimes\"", "sometimes", SAE_EFORMAT},
        {"standard", "\"dtype\": \"float8\"", "float8", SAE_EFORMAT},
        {"standard", "\"finetuning_scaling_factor\": true", "scaling_factor", SAE_EFORMAT},
        {"jumprelu", NULL, "threshold", SAE_EFORMAT}, /* no threshold tensor written */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char cfg[1024];
        snprintf(cfg, sizeof cfg,
                 "{\"d_in\": %d, \"d_sae\": %d, \"architecture\": \"%s\"%s%s, "
                 "\"meta\": {\"sae_lens_version\": \"6.1.0\"}}",
                 D_IN, D_SAE, cases[i].arch, cases[i].extra ? ", " : "",
                 cases[i].extra ? cases[i].extra : "");
        char *dir = saelens_dir("unsup", cfg, &w, "F32", false);
        load_fails(dir, cases[i].code, cases[i].needle);
        remove_dir(dir);
    }
    /* Pre-6.0 activations other than relu and topk. */
    char cfg[512];
    snprintf(cfg, sizeof cfg, "{\"d_in\": %d, \"d_sae\": %d, \"activation_fn_str\": \"tanh-relu\"}",
             D_IN, D_SAE);
    char *dir = saelens_dir("unsup-act", cfg, &w, "F32", false);
    load_fails(dir, SAE_EUNSUPPORTED, "tanh-relu");
    remove_dir(dir);
    /* Gated weights without a cfg.json. */
    dir = make_dir("gated");
    tw_tensor t[3] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                      {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                      {"b_gate", "F32", 1, {D_SAE, 0}, w.b_enc}};
    tw_buf b = {0};
    tw_safetensors(&b, t, 3, NULL);
    write_in(dir, "sae_weights.safetensors", b.data, b.size);
    tw_free(&b);
    load_fails(dir, SAE_EFORMAT, "need the cfg.json");
    remove_dir(dir);
}
END_TEST

START_TEST(saelens_scaling_factor_of_ones_is_dropped)
{
    weights w;
    make_weights(&w, 70);
    float ones[D_SAE], notones[D_SAE];
    for (size_t i = 0; i < D_SAE; i++) {
        ones[i] = 1.0f;
        notones[i] = i == 5 ? 2.0f : 1.0f;
    }
    for (int variant = 0; variant < 2; variant++) {
        char *dir = make_dir("scaling");
        tw_tensor t[5] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                          {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                          {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                          {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc},
                          {"scaling_factor", "BF16", 1, {D_SAE, 0}, variant ? notones : ones}};
        tw_buf b = {0};
        tw_safetensors(&b, t, 5, NULL);
        write_in(dir, "sae_weights.safetensors", b.data, b.size);
        tw_free(&b);
        char cfg[256];
        snprintf(cfg, sizeof cfg, "{\"d_in\": %d, \"d_sae\": %d, \"architecture\": \"standard\"}",
                 D_IN, D_SAE);
        write_text_in(dir, "cfg.json", cfg);
        if (variant == 0) {
            sae_model *m = load_ok(dir);
            check_encode(m, &w, SAE_ARCH_RELU, 0, 1, 1.0);
            sae_model_free(m);
        } else {
            load_fails(dir, SAE_EUNSUPPORTED, "scaling_factor");
        }
        remove_dir(dir);
    }
}
END_TEST

/* The real SAELens 3.4 file, against a float64 loop over the file's own tensors. */
START_TEST(saelens_real_othello_file)
{
    char *dir = tu_data_path("othello_sae_128");
    char *file = in_dir(dir, "sae_weights.safetensors");
    size_t size;
    unsigned char *raw = tu_read_file(file, &size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | raw[i];
    cJSON *h = cJSON_ParseWithLength((const char *)raw + 8, (size_t)n);
    ck_assert_ptr_nonnull(h);
    const char *names[4] = {"W_enc", "W_dec", "b_enc", "b_dec"};
    const float *t[4];
    for (int i = 0; i < 4; i++) {
        cJSON *e = cJSON_GetObjectItem(h, names[i]);
        ck_assert_str_eq(cJSON_GetObjectItem(e, "dtype")->valuestring, "F32");
        size_t begin = (size_t)cJSON_GetArrayItem(cJSON_GetObjectItem(e, "data_offsets"), 0)->valuedouble;
        float *copy = tu_malloc(128 * 128 * sizeof(float));
        size_t bytes = i < 2 ? 128 * 128 * 4 : 128 * 4;
        memcpy(copy, raw + 8 + n + begin, bytes);
        t[i] = copy;
    }
    cJSON_Delete(h);
    for (int which = 0; which < 2; which++) {
        sae_model *m = load_ok(which ? file : dir);
        ck_assert_str_eq(sae_model_format(m), "saelens");
        ck_assert_str_eq(sae_model_dtype(m), "F32");
        ck_assert_int_eq(sae_model_arch(m), SAE_ARCH_RELU);
        double v;
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
        ck_assert_double_eq(v, 0.0); /* cfg.json: apply_b_dec_to_input false */
        float x[3 * 128], f[3 * 128];
        tu_rng r = {5};
        tu_fill(&r, x, 3 * 128, -1.0f, 1.0f);
        ck_assert_ok(sae_encode(m, x, 3, f));
        for (size_t tok = 0; tok < 3; tok++) {
            double want[128];
            for (size_t i = 0; i < 128; i++) {
                double acc = t[2][i];
                for (size_t j = 0; j < 128; j++)
                    acc += (double)x[tok * 128 + j] * t[0][j * 128 + i];
                want[i] = acc > 0 ? acc : 0;
            }
            tu_assert_close(f + tok * 128, want, 128, 1e-5, "f");
        }
        sae_model_free(m);
    }
    for (int i = 0; i < 4; i++)
        free((void *)t[i]);
    free(raw);
    free(file);
    free(dir);
}
END_TEST

/* ---- sparsify ----------------------------------------------------------------------------- */

static char *sparsify_dir(const char *cfg, const weights *w, const char *dtype, bool skip)
{
    char *dir = make_dir("sparsify");
    tw_tensor t[5] = {{"W_dec", dtype, 2, {D_SAE, D_IN}, w->W_dec},
                      {"b_dec", dtype, 1, {D_IN, 0}, w->b_dec},
                      {"encoder.bias", dtype, 1, {D_SAE, 0}, w->b_enc},
                      {"encoder.weight", dtype, 2, {D_SAE, D_IN}, w->W_enc_t},
                      {"W_skip", dtype, 2, {D_IN, D_IN}, w->W_dec}};
    tw_buf b = {0};
    tw_safetensors(&b, t, skip ? 5 : 4, "{\"format\":\"pt\"}");
    write_in(dir, "sae.safetensors", b.data, b.size);
    tw_free(&b);
    if (cfg != NULL)
        write_in(dir, "cfg.json", cfg, strlen(cfg));
    return dir;
}

START_TEST(sparsify_topk_every_dtype)
{
    weights w;
    make_weights(&w, 80);
    char cfg[512];
    snprintf(cfg, sizeof cfg,
             "{\"activation\": \"topk\", \"expansion_factor\": 32, \"normalize_decoder\": true, "
             "\"num_latents\": %d, \"k\": 4, \"multi_topk\": false, \"skip_connection\": false, "
             "\"transcode\": false, \"d_in\": %d}",
             D_SAE, D_IN);
    for (size_t d = 0; d < 4; d++) {
        char *dir = sparsify_dir(cfg, &w, dtypes[d], false);
        sae_model *m = load_ok(dir);
        ck_assert_str_eq(sae_model_format(m), "sparsify");
        ck_assert_str_eq(sae_model_dtype(m), dtypes[d]);
        /* ReLU((x - b_dec) @ encoder.weight^T + encoder.bias), k largest. */
        check_encode(m, &w, SAE_ARCH_TOPK, 4, 1, 1.0);
        sae_model_free(m);
        char *file = in_dir(dir, "sae.safetensors");
        m = load_ok(file);
        check_encode(m, &w, SAE_ARCH_TOPK, 4, 1, 1.0);
        sae_model_free(m);
        free(file);
        remove_dir(dir);
    }
    /* num_latents 0 means d_in * expansion_factor latents, as SparseCoder computes it: here
     * 14, which the 12-latent weights contradict. */
    snprintf(cfg, sizeof cfg, "{\"num_latents\": 0, \"expansion_factor\": 2, \"k\": 2, \"d_in\": %d}",
             D_IN);
    char *dir = sparsify_dir(cfg, &w, "F32", false);
    load_fails(dir, SAE_EFORMAT, "expected [14, 7]");
    remove_dir(dir);
}
END_TEST

START_TEST(sparsify_refusals)
{
    weights w;
    make_weights(&w, 90);
    static const struct {
        const char *cfg, *needle;
        int code;
    } cases[] = {
        /* groupmax, transcode and skip_connection load: tests/test_peers.c. */
        {"{\"activation\": \"groupmax\", \"k\": 5, \"num_latents\": 12, \"d_in\": 7}",
         "must divide", SAE_EFORMAT},
        {"{\"activation\": \"sigmoid\", \"k\": 4, \"num_latents\": 12, \"d_in\": 7}",
         "sigmoid", SAE_EFORMAT},
        {"{\"signed\": true, \"k\": 4, \"num_latents\": 12, \"d_in\": 7}", "signed",
         SAE_EUNSUPPORTED},
        {"{\"skip_connection\": true, \"k\": 4, \"num_latents\": 12, \"d_in\": 7}",
         "W_skip", SAE_EFORMAT}, /* the weights have none */
        {"{\"k\": 4, \"num_latents\": 12, \"d_in\": 8}", "encoder.weight", SAE_EFORMAT},
        {"{\"k\": 4, \"num_latents\": 13, \"d_in\": 7}", "expected [13, 7]", SAE_EFORMAT},
        {"{\"k\": 0, \"num_latents\": 12, \"d_in\": 7}", "'k'", SAE_EFORMAT},
        {"{\"k\": 4, \"num_latents\": 12}", "d_in", SAE_EFORMAT},
        {"{\"k\": \"4\", \"num_latents\": 12, \"d_in\": 7}", "'k' must be a whole number",
         SAE_EFORMAT},
        {"[1, 2]", "object", SAE_EFORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *dir = sparsify_dir(cases[i].cfg, &w, "F32", false);
        load_fails(dir, cases[i].code, cases[i].needle);
        remove_dir(dir);
    }
    char *dir = sparsify_dir(NULL, &w, "F32", false);
    load_fails(dir, SAE_EFORMAT, "cfg.json");
    remove_dir(dir);
    dir = sparsify_dir("{\"k\": 4, \"num_latents\": 12, \"d_in\": 7}", &w, "F32", true);
    load_fails(dir, SAE_EUNSUPPORTED, "W_skip");
    remove_dir(dir);
}
END_TEST

/* ---- Gemma Scope -------------------------------------------------------------------------- */

static void gemma_npz(tw_buf *out, const weights *w, const char *descr, int layout, bool lower)
{
    const char *names[5] = {lower ? "w_enc.npy" : "W_enc.npy", lower ? "w_dec.npy" : "W_dec.npy",
                            "b_enc.npy", "b_dec.npy", "threshold.npy"};
    tw_buf members[5] = {{0}};
    size_t s_enc[2] = {D_IN, D_SAE}, s_dec[2] = {D_SAE, D_IN}, s_sae[1] = {D_SAE},
           s_in[1] = {D_IN};
    tw_npy(&members[0], descr, 2, s_enc, w->W_enc);
    tw_npy(&members[1], descr, 2, s_dec, w->W_dec);
    tw_npy(&members[2], descr, 1, s_sae, w->b_enc);
    tw_npy(&members[3], descr, 1, s_in, w->b_dec);
    tw_npy(&members[4], descr, 1, s_sae, w->threshold);
    if (layout == 2)
        tw_zip64(out, names, members, 5);
    else
        tw_zip(out, names, members, 5, layout == 1);
    for (int i = 0; i < 5; i++)
        tw_free(&members[i]);
}

START_TEST(gemma_scope_stored_deflated_zip64)
{
    weights w;
    make_weights(&w, 100);
    static const char *const descrs[] = {"<f4", "<f2", "<f8"};
    static const char *const names[] = {"F32", "F16", "F64"};
    for (int layout = 0; layout < 3; layout++) {
        for (int d = 0; d < 3; d++) {
            tw_buf b = {0};
            gemma_npz(&b, &w, descrs[d], layout, layout == 1 && d == 1);
            char *dir = make_dir("gemma");
            write_in(dir, "params.npz", b.data, b.size);
            tw_free(&b);
            char *file = in_dir(dir, "params.npz");
            for (int which = 0; which < 2; which++) {
                sae_model *m = load_ok(which ? file : dir);
                ck_assert_str_eq(sae_model_format(m), "gemma-scope");
                ck_assert_str_eq(sae_model_dtype(m), names[d]);
                /* (x @ W_enc + b_enc), no b_dec subtraction; JumpReLU. */
                check_encode(m, &w, SAE_ARCH_JUMPRELU, 0, 0, 1.0);
                sae_model_free(m);
            }
            free(file);
            remove_dir(dir);
        }
    }
}
END_TEST

START_TEST(gemma_scope_refusals)
{
    weights w;
    make_weights(&w, 110);
    size_t s_enc[2] = {D_IN, D_SAE}, s_dec[2] = {D_SAE, D_IN}, s_sae[1] = {D_SAE},
           s_in[1] = {D_IN}, s_skip[2] = {D_IN, D_IN}, s_bad[2] = {D_SAE, D_IN + 1};
    tw_buf m[6] = {{0}};
    tw_npy(&m[0], "<f4", 2, s_enc, w.W_enc);
    tw_npy(&m[1], "<f4", 2, s_dec, w.W_dec);
    tw_npy(&m[2], "<f4", 1, s_sae, w.b_enc);
    tw_npy(&m[3], "<f4", 1, s_in, w.b_dec);
    tw_npy(&m[4], "<f4", 1, s_sae, w.threshold);
    tw_npy(&m[5], "<f4", 2, s_skip, w.W_dec);
    const char *all[6] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy", "threshold.npy",
                          "affine_skip_connection.npy"};
    char *path = tu_tmp_path("refuse.npz");
    tw_buf b = {0};
    tw_zip(&b, all, m, 4, false); /* no threshold */
    tw_write(path, b.data, b.size);
    load_fails(path, SAE_EFORMAT, "threshold.npy");
    tw_free(&b);
    tw_zip(&b, all, m, 6, false);
    tw_write(path, b.data, b.size);
    load_fails(path, SAE_EUNSUPPORTED, "affine_skip_connection");
    tw_free(&b);
    tw_free(&m[1]);
    tw_npy(&m[1], "<f4", 2, s_bad, w.W_dec);
    tw_zip(&b, all, m, 5, true);
    tw_write(path, b.data, b.size);
    load_fails(path, SAE_EFORMAT, "W_dec.npy");
    tw_free(&b);
    const char *other[1] = {"weights.npy"};
    tw_zip(&b, other, m, 1, false);
    tw_write(path, b.data, b.size);
    load_fails(path, SAE_EFORMAT, "W_enc.npy");
    tw_free(&b);
    for (int i = 0; i < 6; i++)
        tw_free(&m[i]);
    unlink(path);
    free(path);
}
END_TEST

/* ---- layout and dispatch ------------------------------------------------------------------ */

START_TEST(own_format_still_loads_and_maps)
{
    sae_model *m = tu_random_model(SAE_ARCH_TOPK, D_IN, D_SAE, 3);
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 5));
    char *dir = make_dir("own");
    /* A libsae file under a SAELens name is read by its content, and a stray cfg.json beside it
     * is not consulted. */
    char *file = in_dir(dir, "sae_weights.safetensors");
    ck_assert_ok(sae_model_save(m, file));
    write_text_in(dir, "cfg.json", "{\"d_in\": 1}");
    sae_model *back = load_ok(dir);
    ck_assert_str_eq(sae_model_format(back), "libsae");
    double v;
    ck_assert_ok(sae_model_get_param(back, SAE_PARAM_K, &v));
    ck_assert_double_eq(v, 5.0);
    sae_model_free(back);
    sae_model_free(m);
    free(file);
    remove_dir(dir);
}
END_TEST

START_TEST(folders_and_files_that_hold_no_sae)
{
    char *dir = make_dir("empty");
    load_fails(dir, SAE_EFORMAT, "sae_weights.safetensors");
    write_text_in(dir, "cfg.json", "{}");
    char *cfg = in_dir(dir, "cfg.json");
    load_fails(cfg, SAE_EFORMAT, "a folder without SAE weights");
    free(cfg);
    /* A safetensors file of something else names what it holds. */
    float z[4] = {0};
    tw_tensor t[1] = {{"lm_head.weight", "F32", 2, {2, 2}, z}};
    tw_buf b = {0};
    tw_safetensors(&b, t, 1, NULL);
    write_in(dir, "model.safetensors", b.data, b.size);
    tw_free(&b);
    char *file = in_dir(dir, "model.safetensors");
    load_fails(file, SAE_EFORMAT, "lm_head.weight");
    free(file);
    remove_dir(dir);
    load_fails("/nonexistent/sae", SAE_EIO, "/nonexistent/sae");
}
END_TEST

static Suite *formats_suite(void)
{
    Suite *s = suite_create("formats");
    TCase *tc = tcase_create("saelens");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, saelens_v6_every_architecture_and_dtype);
    tcase_add_test(tc, saelens_pre_6_flat_layout);
    tcase_add_test(tc, saelens_without_cfg_is_refused);
    tcase_add_test(tc, saelens_expected_average_only_in);
    tcase_add_test(tc, saelens_batchtopk);
    tcase_add_test(tc, saelens_unsupported_settings_are_named);
    tcase_add_test(tc, saelens_scaling_factor_of_ones_is_dropped);
    tcase_add_test(tc, saelens_real_othello_file);
    suite_add_tcase(s, tc);
    tc = tcase_create("sparsify");
    tcase_add_test(tc, sparsify_topk_every_dtype);
    tcase_add_test(tc, sparsify_refusals);
    suite_add_tcase(s, tc);
    tc = tcase_create("gemma");
    tcase_add_test(tc, gemma_scope_stored_deflated_zip64);
    tcase_add_test(tc, gemma_scope_refusals);
    suite_add_tcase(s, tc);
    tc = tcase_create("dispatch");
    tcase_add_test(tc, own_format_still_loads_and_maps);
    tcase_add_test(tc, folders_and_files_that_hold_no_sae);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(formats_suite)
