/* The layouts SAELens 6.18 and sparsify 1.3 save that libsae 0.2 runs (gated SAEs, transcoders
 * with and without skip, per-token normalization, TopK and BatchTopK checkpoints whose decoder
 * norms SAELens rescales by, log_threshold, sparsify's transcode / skip_connection / groupmax),
 * written byte by byte with tests/writers.c, loaded, and checked against float64 loops over the
 * weights as each peer's forward code uses them (not as libsae stores them); and every refusal
 * with the setting its message names. tests/python/test_peers.py checks the same layouts against
 * numpy re-implementations of the peers' forward code. */
#include "testutil.h"
#include "writers.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { D_IN = 7, D_SAE = 12, D_OUT = 5, N_TOK = 6 };

typedef struct {
    float W_enc[D_IN * D_SAE], W_dec[D_SAE * D_IN], W_dec_o[D_SAE * D_OUT];
    float b_enc[D_SAE], b_dec[D_IN], b_dec_o[D_OUT], thr[D_SAE], r_mag[D_SAE], b_mag[D_SAE];
    float W_skip_oi[D_OUT * D_IN], W_skip_ii[D_IN * D_IN], W_enc_t[D_SAE * D_IN];
} weights;

static void make_weights(weights *w, unsigned long long seed)
{
    tw_fill(seed, w->W_enc, D_IN * D_SAE, 1.0f);
    tw_fill(seed + 1, w->W_dec, D_SAE * D_IN, 2.0f);
    tw_fill(seed + 2, w->W_dec_o, D_SAE * D_OUT, 1.0f);
    tw_fill(seed + 3, w->b_enc, D_SAE, 0.5f);
    tw_fill(seed + 4, w->b_dec, D_IN, 1.0f);
    tw_fill(seed + 5, w->b_dec_o, D_OUT, 1.0f);
    tw_fill(seed + 6, w->thr, D_SAE, 0.5f);
    tw_fill(seed + 7, w->r_mag, D_SAE, 0.5f);
    tw_fill(seed + 8, w->b_mag, D_SAE, 0.5f);
    tw_fill(seed + 9, w->W_skip_oi, D_OUT * D_IN, 0.5f);
    tw_fill(seed + 10, w->W_skip_ii, D_IN * D_IN, 0.5f);
    for (size_t i = 0; i < D_SAE; i++) {
        w->thr[i] = fabsf(w->thr[i]);
        for (size_t j = 0; j < D_IN; j++)
            w->W_enc_t[i * D_IN + j] = w->W_enc[j * D_SAE + i];
    }
}

/* ---- folders ------------------------------------------------------------------------------ */

static char *make_dir(const char *name)
{
    char *dir = tu_tmp_path(name);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir '%s'", dir, dir);
    ck_assert_int_eq(system(cmd), 0);
    return dir;
}

static void write_in(const char *dir, const char *name, const void *data, size_t size)
{
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    tw_write(p, data, size);
}

static void remove_dir(char *dir)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
    free(dir);
}

/* A folder holding weights (tensors t) and cfg (NULL: none) under the given file name. */
static char *folder(const char *weights_name, const tw_tensor *t, size_t n, const char *meta,
                    const char *cfg)
{
    char *dir = make_dir("peer");
    tw_buf b = {0};
    tw_safetensors(&b, t, n, meta);
    write_in(dir, weights_name, b.data, b.size);
    tw_free(&b);
    if (cfg != NULL)
        write_in(dir, "cfg.json", cfg, strlen(cfg));
    return dir;
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

/* SAEConfig.to_dict() of SAELens 6.18 with the given architecture and extra fields. */
static void saelens_cfg(char *buf, size_t size, const char *arch, const char *extra)
{
    bool norm = extra != NULL && strstr(extra, "normalize_activations") != NULL;
    snprintf(buf, size,
             "{\"d_in\": %d, \"d_sae\": %d, \"dtype\": \"float32\", \"device\": \"cpu\", "
             "%s\"reshape_activations\": \"none\"%s%s, "
             "\"metadata\": {\"sae_lens_version\": \"6.18.0\", \"sae_lens_training_version\": "
             "\"6.18.0\", \"hook_name\": \"blocks.3.hook_mlp_in\"}, \"architecture\": \"%s\"}",
             D_IN, D_SAE, norm ? "" : "\"normalize_activations\": \"none\", ",
             extra ? ", " : "", extra ? extra : "", arch);
}

/* ---- the peers' forward, float64 ---------------------------------------------------------- */

/* What a peer computes for one token, from its own tensors in its own layout. */
typedef struct {
    const float *W_enc;   /* [d_in][d_sae] (SAELens) */
    const float *enc_t;   /* [d_sae][d_in] (sparsify encoder.weight), when W_enc is NULL */
    const float *b_enc, *W_dec, *b_dec, *thr, *r_mag, *b_mag;
    const float *W_skip;  /* [d_out][d_in]: x @ W_skip.T (both peers) */
    size_t d_out, k;
    int sub_b_dec;        /* subtract b_dec from the input */
    int act;              /* 0 relu, 1 topk, 2 jumprelu, 3 gated, 4 groupmax, 5 batchtopk */
    int rescale;          /* SAELens rescale_acts_by_decoder_norm */
    int norm;             /* 0 none, 1 layer_norm, 2 constant_norm_rescale */
    int denorm;           /* an SAE's output is denormalized, a transcoder's is not */
    double theta;
} peer;

static void peer_forward(const peer *p, const float *x, double *f, double *out)
{
    double xn[D_IN], pre[D_SAE], s[D_SAE], mu = 0, sd = 0, c = 1;
    if (p->norm == 1) {
        for (size_t j = 0; j < D_IN; j++)
            mu += x[j];
        mu /= D_IN;
        for (size_t j = 0; j < D_IN; j++)
            sd += (x[j] - mu) * (x[j] - mu);
        sd = sqrt(sd / (D_IN - 1));
    } else if (p->norm == 2) {
        double nn = 0;
        for (size_t j = 0; j < D_IN; j++)
            nn += (double)x[j] * x[j];
        c = sqrt((double)D_IN) / sqrt(nn);
    }
    for (size_t j = 0; j < D_IN; j++) {
        xn[j] = p->norm == 1 ? (x[j] - mu) / (sd + 1e-5) : x[j] * c;
        if (p->sub_b_dec)
            xn[j] -= p->b_dec[j];
    }
    double n[D_SAE];
    for (size_t i = 0; i < D_SAE; i++) {
        double acc = 0, mag = 0, nn = 0;
        for (size_t j = 0; j < D_IN; j++) {
            double wji = p->W_enc ? p->W_enc[j * D_SAE + i] : p->enc_t[i * D_IN + j];
            acc += xn[j] * wji;
            if (p->act == 3)
                mag += xn[j] * wji * exp(p->r_mag[i]);
        }
        for (size_t j = 0; j < p->d_out; j++)
            nn += (double)p->W_dec[i * p->d_out + j] * p->W_dec[i * p->d_out + j];
        n[i] = p->rescale ? sqrt(nn) : 1.0;
        pre[i] = (acc + p->b_enc[i]) * n[i];
        s[i] = p->act == 3 ? (pre[i] > 0 && mag + p->b_mag[i] > 0 ? mag + p->b_mag[i] : 0)
               : p->act == 2 ? (pre[i] > p->thr[i] && pre[i] > 0 ? pre[i] : 0)
               : p->act == 5 ? (pre[i] > p->theta && pre[i] > 0 ? pre[i] : 0)
                             : (pre[i] > 0 ? pre[i] : 0);
    }
    for (size_t i = 0; i < D_SAE; i++)
        f[i] = s[i];
    if (p->act == 1) { /* the k largest pre, ReLU after (no ties in these weights) */
        for (size_t i = 0; i < D_SAE; i++) {
            size_t above = 0;
            for (size_t q = 0; q < D_SAE; q++)
                above += pre[q] > pre[i] || (pre[q] == pre[i] && q < i);
            f[i] = above < p->k ? s[i] : 0;
        }
    } else if (p->act == 4) { /* groupmax: the first maximum of each of k groups */
        size_t size = D_SAE / p->k;
        for (size_t g = 0; g < p->k; g++) {
            size_t best = g * size;
            for (size_t i = g * size; i < (g + 1) * size; i++)
                if (s[i] > s[best])
                    best = i;
            for (size_t i = g * size; i < (g + 1) * size; i++)
                f[i] = i == best ? s[i] : 0;
        }
    }
    for (size_t j = 0; j < p->d_out; j++) {
        double acc = p->b_dec[j];
        for (size_t i = 0; i < D_SAE; i++)
            acc += f[i] / n[i] * p->W_dec[i * p->d_out + j];
        if (p->denorm)
            acc = p->norm == 1 ? acc * sd + mu : acc / c;
        if (p->W_skip != NULL)
            for (size_t q = 0; q < D_IN; q++)
                acc += (double)x[q] * p->W_skip[j * D_IN + q];
        out[j] = acc;
    }
}

static void check_peer(const char *path, const peer *p, sae_arch arch, int transcoder)
{
    sae_model *m = load_ok(path);
    ck_assert_int_eq(sae_model_arch(m), arch);
    ck_assert_int_eq(sae_model_is_transcoder(m), transcoder);
    ck_assert_uint_eq(sae_model_d_out(m), p->d_out);
    float x[N_TOK * D_IN], f[N_TOK * D_SAE], y[N_TOK * D_IN];
    tu_rng r = {42};
    tu_fill(&r, x, N_TOK * D_IN, -2.0f, 2.0f);
    ck_assert_ok(sae_encode(m, x, N_TOK, f));
    ck_assert_ok(sae_reconstruct(m, x, N_TOK, y));
    for (size_t t = 0; t < N_TOK; t++) {
        double wf[D_SAE], wy[D_IN];
        peer_forward(p, x + t * D_IN, wf, wy);
        tu_assert_close(f + t * D_SAE, wf, D_SAE, 1e-5, "f");
        tu_assert_close(y + t * p->d_out, wy, p->d_out, 1e-5, "output");
    }
    sae_model_free(m);
}

/* ---- SAELens ------------------------------------------------------------------------------ */

START_TEST(saelens_gated_every_dtype)
{
    weights w;
    make_weights(&w, 100);
    static const char *const dtypes[] = {"F32", "F16", "BF16", "F64"};
    char cfg[1024];
    saelens_cfg(cfg, sizeof cfg, "gated", "\"apply_b_dec_to_input\": true");
    for (size_t d = 0; d < 4; d++) {
        /* GatedSAE's state dict: W_enc, b_gate, r_mag, b_mag, W_dec, b_dec (no b_enc). */
        tw_tensor t[6] = {{"W_dec", dtypes[d], 2, {D_SAE, D_IN}, w.W_dec},
                          {"W_enc", dtypes[d], 2, {D_IN, D_SAE}, w.W_enc},
                          {"b_dec", dtypes[d], 1, {D_IN, 0}, w.b_dec},
                          {"b_gate", dtypes[d], 1, {D_SAE, 0}, w.b_enc},
                          {"b_mag", dtypes[d], 1, {D_SAE, 0}, w.b_mag},
                          {"r_mag", dtypes[d], 1, {D_SAE, 0}, w.r_mag}};
        char *dir = folder("sae_weights.safetensors", t, 6, NULL, cfg);
        peer p = {.W_enc = w.W_enc, .b_enc = w.b_enc, .W_dec = w.W_dec, .b_dec = w.b_dec,
                  .r_mag = w.r_mag, .b_mag = w.b_mag, .d_out = D_IN, .sub_b_dec = 1, .act = 3};
        check_peer(dir, &p, SAE_ARCH_GATED, 0);
        remove_dir(dir);
    }
}
END_TEST

START_TEST(saelens_transcoders)
{
    weights w;
    make_weights(&w, 110);
    for (int kind = 0; kind < 3; kind++) { /* transcoder, skip_transcoder, jumprelu_transcoder */
        static const char *const archs[] = {"transcoder", "skip_transcoder",
                                            "jumprelu_transcoder"};
        char cfg[1024], extra[128];
        snprintf(extra, sizeof extra, "\"apply_b_dec_to_input\": false, \"d_out\": %d", D_OUT);
        saelens_cfg(cfg, sizeof cfg, archs[kind], extra);
        /* A bfloat16 file: SkipTranscoder's W_skip [d_out, d_in] is made without a dtype and
         * stays float32. */
        tw_tensor t[5] = {{"W_dec", "BF16", 2, {D_SAE, D_OUT}, w.W_dec_o},
                          {"W_enc", "BF16", 2, {D_IN, D_SAE}, w.W_enc},
                          {"b_dec", "BF16", 1, {D_OUT, 0}, w.b_dec_o},
                          {"b_enc", "BF16", 1, {D_SAE, 0}, w.b_enc},
                          kind == 1 ? (tw_tensor){"W_skip", "F32", 2, {D_OUT, D_IN}, w.W_skip_oi}
                                    : (tw_tensor){"threshold", "BF16", 1, {D_SAE, 0}, w.thr}};
        char *dir = folder("sae_weights.safetensors", t, kind ? 5 : 4, NULL, cfg);
        peer p = {.W_enc = w.W_enc, .b_enc = w.b_enc, .W_dec = w.W_dec_o, .b_dec = w.b_dec_o,
                  .thr = w.thr, .W_skip = kind == 1 ? w.W_skip_oi : NULL, .d_out = D_OUT,
                  .act = kind == 2 ? 2 : 0};
        check_peer(dir, &p, kind == 2 ? SAE_ARCH_JUMPRELU : SAE_ARCH_RELU, 1);
        remove_dir(dir);
    }
}
END_TEST

START_TEST(saelens_per_token_normalization)
{
    weights w;
    make_weights(&w, 120);
    for (int norm = 1; norm <= 2; norm++) {
        for (int tc = 0; tc < 2; tc++) {
            char cfg[1024], extra[256];
            const char *name = norm == 1 ? "layer_norm" : "constant_norm_rescale";
            snprintf(extra, sizeof extra,
                     "\"normalize_activations\": \"%s\", \"apply_b_dec_to_input\": %s%s", name,
                     tc ? "false" : "true", tc ? ", \"d_out\": 5" : "");
            saelens_cfg(cfg, sizeof cfg, tc ? "transcoder" : "standard", extra);
            tw_tensor t[4] = {{"W_dec", "F32", 2, {D_SAE, tc ? D_OUT : D_IN}, tc ? w.W_dec_o : w.W_dec},
                              {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                              {"b_dec", "F32", 1, {tc ? D_OUT : D_IN, 0}, tc ? w.b_dec_o : w.b_dec},
                              {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc}};
            char *dir = folder("sae_weights.safetensors", t, 4, NULL, cfg);
            peer p = {.W_enc = w.W_enc, .b_enc = w.b_enc, .W_dec = tc ? w.W_dec_o : w.W_dec,
                      .b_dec = tc ? w.b_dec_o : w.b_dec, .d_out = tc ? D_OUT : D_IN,
                      .sub_b_dec = !tc, .norm = norm, .denorm = !tc};
            check_peer(dir, &p, SAE_ARCH_RELU, tc);
            sae_model *m = load_ok(dir);
            double v;
            ck_assert_ok(sae_model_get_param(m, SAE_PARAM_NORMALIZE, &v));
            ck_assert_double_eq(v, norm == 1 ? SAE_NORMALIZE_LAYER_NORM : SAE_NORMALIZE_CONSTANT_NORM);
            sae_model_free(m);
            remove_dir(dir);
        }
    }
}
END_TEST

/* TopK and BatchTopK checkpoints (TrainingSAEConfig fields, rescale_acts_by_decoder_norm true,
 * W_dec rows of norm far from 1): SAELens rescales pre-activations by the norms and divides the
 * codes by them before decoding; libsae folds them, so its codes are SAELens' codes. */
START_TEST(saelens_rescale_checkpoints)
{
    weights w;
    make_weights(&w, 130);
    float theta = 0.75f;
    for (int btk = 0; btk < 3; btk++) { /* topk, batchtopk, matryoshka_batchtopk */
        char cfg[1024];
        saelens_cfg(cfg, sizeof cfg, btk == 0 ? "topk" : btk == 1 ? "batchtopk"
                                                                  : "matryoshka_batchtopk",
                    "\"apply_b_dec_to_input\": true, \"decoder_init_norm\": 0.1, \"k\": 3, "
                    "\"use_sparse_activations\": false, \"aux_loss_coefficient\": 1.0, "
                    "\"rescale_acts_by_decoder_norm\": true, \"topk_threshold_lr\": 0.01, "
                    "\"matryoshka_widths\": [4, 12]");
        tw_tensor t[5] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                          {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                          {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                          {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc},
                          {"topk_threshold", "F64", 0, {0, 0}, &theta}};
        char *dir = folder("sae_weights.safetensors", t, btk ? 5 : 4, NULL, cfg);
        peer p = {.W_enc = w.W_enc, .b_enc = w.b_enc, .W_dec = w.W_dec, .b_dec = w.b_dec,
                  .d_out = D_IN, .k = 3, .sub_b_dec = 1, .act = btk ? 5 : 1, .rescale = 1,
                  .theta = theta};
        check_peer(dir, &p, btk ? SAE_ARCH_BATCHTOPK : SAE_ARCH_TOPK, 0);
        sae_model *m = load_ok(dir);
        double v;
        if (btk) { /* the threshold compares rescaled values already: unchanged */
            ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &v));
            ck_assert_double_eq(v, 0.75);
        }
        sae_model_free(m);
        /* A dead feature whose W_dec row is 0: SAELens would divide by 0. */
        float dead[D_SAE * D_IN];
        memcpy(dead, w.W_dec, sizeof dead);
        memset(dead + 4 * D_IN, 0, D_IN * sizeof(float));
        t[0].data = dead;
        remove_dir(dir);
        dir = folder("sae_weights.safetensors", t, btk ? 5 : 4, NULL, cfg);
        load_fails(dir, SAE_EFORMAT, "row 4 of W_dec has norm 0");
        remove_dir(dir);
    }
}
END_TEST

START_TEST(saelens_log_threshold)
{
    weights w;
    make_weights(&w, 140);
    float logt[D_SAE], exact[D_SAE];
    for (size_t i = 0; i < D_SAE; i++) {
        logt[i] = tw_quantize(-2.0f + 0.25f * (float)i);
        exact[i] = expf(logt[i]);
    }
    char cfg[1024];
    saelens_cfg(cfg, sizeof cfg, "jumprelu", "\"apply_b_dec_to_input\": true");
    tw_tensor t[5] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                      {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                      {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                      {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc},
                      {"log_threshold", "F32", 1, {D_SAE, 0}, logt}};
    char *with = folder("sae_weights.safetensors", t, 5, NULL, cfg);
    peer p = {.W_enc = w.W_enc, .b_enc = w.b_enc, .W_dec = w.W_dec, .b_dec = w.b_dec,
              .thr = exact, .d_out = D_IN, .sub_b_dec = 1, .act = 2};
    check_peer(with, &p, SAE_ARCH_JUMPRELU, 0);
    remove_dir(with);
    logt[3] = 100.0f; /* exp overflows float */
    char *dir = folder("sae_weights.safetensors", t, 5, NULL, cfg);
    load_fails(dir, SAE_EFORMAT, "log_threshold[3]");
    remove_dir(dir);
}
END_TEST

START_TEST(saelens_refusals)
{
    weights w;
    make_weights(&w, 150);
    float theta = 0.5f, big[D_SAE];
    for (size_t i = 0; i < D_SAE; i++)
        big[i] = i == 2 ? 200.0f : 0.0f;
    tw_tensor base[4] = {{"W_dec", "F32", 2, {D_SAE, D_OUT}, w.W_dec_o},
                         {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                         {"b_dec", "F32", 1, {D_OUT, 0}, w.b_dec_o},
                         {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc}};
    tw_tensor sae[4] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                        {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                        {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                        {"b_enc", "F32", 1, {D_SAE, 0}, w.b_enc}};
    static const struct {
        int transcoder;       /* the [d_out] tensors */
        const char *extra;    /* a tensor beyond the four: "W_skip", "topk_threshold", ... */
        const char *arch, *cfg_extra, *needle;
        int code;
    } cases[] = {
        /* Weights alone: only cfg.json says what they compute (the skip term, k, the gate). */
        {1, "W_skip", NULL, NULL, "need the cfg.json", SAE_EFORMAT},
        {0, "topk_threshold", NULL, NULL, "need the cfg.json", SAE_EFORMAT},
        {0, "r_mag", NULL, NULL, "need the cfg.json", SAE_EFORMAT},
        {0, NULL, NULL, NULL, "need the cfg.json", SAE_EFORMAT},
        /* A tensor carrying a term the config's class does not have. */
        {1, "W_skip", "transcoder", "\"d_out\": 5", "W_skip", SAE_EUNSUPPORTED},
        {0, "log_threshold", "standard", NULL, "log_threshold", SAE_EUNSUPPORTED},
        {0, "topk_threshold", "topk", "\"k\": 2", "topk_threshold", SAE_EUNSUPPORTED},
        {0, "b_mag", "standard", NULL, "b_mag", SAE_EUNSUPPORTED},
        /* Settings outside the math. */
        {1, NULL, "transcoder", "\"d_out\": 5, \"normalize_activations\": "
         "\"expected_average_only_in\"", "expected_average_only_in", SAE_EUNSUPPORTED},
        {1, NULL, "transcoder", "\"d_out\": 0", "'d_out'", SAE_EFORMAT},
        {1, NULL, "skip_transcoder", "\"d_out\": 5", "W_skip", SAE_EFORMAT}, /* none stored */
        {0, NULL, "skip_transcoder", NULL, "W_dec", SAE_EFORMAT}, /* d_out: 768 */
        {0, NULL, "jumprelu_transcoder", "\"d_out\": 7", "threshold", SAE_EFORMAT},
        {0, "r_mag", "gated", NULL, "b_enc", SAE_EUNSUPPORTED},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tw_tensor t[5];
        memcpy(t, cases[c].transcoder ? base : sae, sizeof base);
        size_t n = 4;
        if (cases[c].extra != NULL) {
            if (strcmp(cases[c].extra, "W_skip") == 0)
                t[n++] = (tw_tensor){"W_skip", "F32", 2, {D_OUT, D_IN}, w.W_skip_oi};
            else if (strcmp(cases[c].extra, "topk_threshold") == 0)
                t[n++] = (tw_tensor){"topk_threshold", "F64", 0, {0, 0}, &theta};
            else
                t[n++] = (tw_tensor){cases[c].extra, "F32", 1, {D_SAE, 0}, w.r_mag};
        }
        char cfg[1024];
        if (cases[c].arch != NULL)
            saelens_cfg(cfg, sizeof cfg, cases[c].arch, cases[c].cfg_extra);
        char *dir = folder("sae_weights.safetensors", t, n, NULL, cases[c].arch ? cfg : NULL);
        load_fails(dir, cases[c].code, cases[c].needle);
        remove_dir(dir);
    }
    /* A gated SAE whose exp(r_mag) overflows float. */
    char cfg[1024];
    saelens_cfg(cfg, sizeof cfg, "gated", NULL);
    tw_tensor g[6] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                      {"W_enc", "F32", 2, {D_IN, D_SAE}, w.W_enc},
                      {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                      {"b_gate", "F32", 1, {D_SAE, 0}, w.b_enc},
                      {"b_mag", "F32", 1, {D_SAE, 0}, w.b_mag},
                      {"r_mag", "F32", 1, {D_SAE, 0}, big}};
    char *dir = folder("sae_weights.safetensors", g, 6, NULL, cfg);
    load_fails(dir, SAE_EFORMAT, "r_mag[2]");
    remove_dir(dir);
}
END_TEST

/* ---- sparsify ----------------------------------------------------------------------------- */

/* SparseCoder.save_to_disk: every tensor sized by d_in, W_skip [d_in, d_in] used as
 * x @ W_skip.mT; encode subtracts b_dec unless transcode. */
START_TEST(sparsify_transcode_skip_groupmax)
{
    weights w;
    make_weights(&w, 160);
    for (int variant = 0; variant < 8; variant++) {
        const int transcode = variant & 1, skip = (variant >> 1) & 1, groupmax = variant >> 2;
        char cfg[512];
        snprintf(cfg, sizeof cfg,
                 "{\"activation\": \"%s\", \"expansion_factor\": 32, \"normalize_decoder\": "
                 "true, \"num_latents\": %d, \"k\": %d, \"multi_topk\": true, "
                 "\"skip_connection\": %s, \"transcode\": %s, \"d_in\": %d}",
                 groupmax ? "groupmax" : "topk", D_SAE, groupmax ? 4 : 3,
                 skip ? "true" : "false", transcode ? "true" : "false", D_IN);
        tw_tensor t[5] = {{"W_dec", "BF16", 2, {D_SAE, D_IN}, w.W_dec},
                          {"W_skip", "BF16", 2, {D_IN, D_IN}, w.W_skip_ii},
                          {"b_dec", "BF16", 1, {D_IN, 0}, w.b_dec},
                          {"encoder.bias", "BF16", 1, {D_SAE, 0}, w.b_enc},
                          {"encoder.weight", "BF16", 2, {D_SAE, D_IN}, w.W_enc_t}};
        if (!skip)
            memmove(&t[1], &t[2], 3 * sizeof t[0]);
        char *dir = folder("sae.safetensors", t, skip ? 5 : 4, "{\"format\":\"pt\"}", cfg);
        peer p = {.enc_t = w.W_enc_t, .b_enc = w.b_enc, .W_dec = w.W_dec, .b_dec = w.b_dec,
                  .W_skip = skip ? w.W_skip_ii : NULL, .d_out = D_IN, .k = groupmax ? 4 : 3,
                  .sub_b_dec = !transcode, .act = groupmax ? 4 : 1};
        check_peer(dir, &p, groupmax ? SAE_ARCH_GROUPMAX : SAE_ARCH_TOPK, transcode || skip);
        remove_dir(dir);
    }
    /* Refused by name: settings whose terms libsae does not run. */
    static const char *const named[] = {"signed", "embed_skip", "gram_lookup"};
    for (size_t i = 0; i < 3; i++) {
        char cfg[256];
        snprintf(cfg, sizeof cfg, "{\"k\": 3, \"num_latents\": %d, \"d_in\": %d, \"%s\": true}",
                 D_SAE, D_IN, named[i]);
        tw_tensor t[4] = {{"W_dec", "F32", 2, {D_SAE, D_IN}, w.W_dec},
                          {"b_dec", "F32", 1, {D_IN, 0}, w.b_dec},
                          {"encoder.bias", "F32", 1, {D_SAE, 0}, w.b_enc},
                          {"encoder.weight", "F32", 2, {D_SAE, D_IN}, w.W_enc_t}};
        char *dir = folder("sae.safetensors", t, 4, "{\"format\":\"pt\"}", cfg);
        load_fails(dir, SAE_EUNSUPPORTED, named[i]);
        remove_dir(dir);
    }
}
END_TEST

static Suite *peers_suite(void)
{
    Suite *s = suite_create("peers");
    TCase *tc = tcase_create("saelens");
    tcase_add_test(tc, saelens_gated_every_dtype);
    tcase_add_test(tc, saelens_transcoders);
    tcase_add_test(tc, saelens_per_token_normalization);
    tcase_add_test(tc, saelens_rescale_checkpoints);
    tcase_add_test(tc, saelens_log_threshold);
    tcase_add_test(tc, saelens_refusals);
    suite_add_tcase(s, tc);
    tc = tcase_create("sparsify");
    tcase_add_test(tc, sparsify_transcode_skip_groupmax);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(peers_suite)
