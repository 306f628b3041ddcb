/* Writes the fuzzers' seed corpora: valid files of every layout the readers accept, built by
 * the same writers the Check suites use. Usage: seeds OUTDIR (creates OUTDIR/safetensors,
 * OUTDIR/cfg, OUTDIR/npz and OUTDIR/publishers). */
#include "sae.h"
#include "writers.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *out_dir;

static void seed(const char *corpus, const char *name, const void *data, size_t size)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", out_dir, corpus);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/%s", out_dir, corpus, name);
    tw_write(path, data, size);
}

/* The safetensors target's framing: flags, cfg length, cfg, weights. */
static void st_seed(const char *name, unsigned flags, const char *cfg, const tw_buf *weights)
{
    tw_buf b = {0};
    size_t len = cfg ? strlen(cfg) : 0;
    unsigned char head[3] = {(unsigned char)flags, (unsigned char)len, (unsigned char)(len >> 8)};
    tw_put(&b, head, 3);
    if (cfg)
        tw_put(&b, cfg, len);
    tw_put(&b, weights->data, weights->size);
    seed("safetensors", name, b.data, b.size);
    tw_free(&b);
    if (cfg)
        seed("cfg", name, cfg, len);
}

/* The publishers target's framing: flags, config.json, hyperparams.json, weights. */
static void pub_seed(const char *name, unsigned flags, const char *config, const char *hyper,
                     const tw_buf *weights)
{
    tw_buf b = {0};
    unsigned char f = (unsigned char)flags;
    tw_put(&b, &f, 1);
    const char *parts[2] = {config, hyper};
    for (int i = 0; i < 2; i++) {
        size_t len = parts[i] ? strlen(parts[i]) : 0;
        unsigned char head[2] = {(unsigned char)len, (unsigned char)(len >> 8)};
        tw_put(&b, head, 2);
        if (len)
            tw_put(&b, parts[i], len);
    }
    tw_put(&b, weights->data, weights->size);
    seed("publishers", name, b.data, b.size);
    tw_free(&b);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
        return 2;
    }
    out_dir = argv[1];
    mkdir(out_dir, 0755);
    enum { DI = 3, DS = 5 };
    float w_enc[DI * DS], w_enc_t[DS * DI], w_dec[DS * DI], b_enc[DS], b_dec[DI], th[DS];
    tw_fill(1, w_enc, DI * DS, 1.0f);
    tw_fill(2, w_dec, DS * DI, 1.0f);
    tw_fill(3, b_enc, DS, 0.5f);
    tw_fill(4, b_dec, DI, 0.5f);
    tw_fill(5, th, DS, 0.25f);
    for (int i = 0; i < DS; i++)
        for (int j = 0; j < DI; j++)
            w_enc_t[i * DI + j] = w_enc[j * DS + i];
    static const char *const dtypes[] = {"F32", "BF16", "F16", "F64"};
    for (int d = 0; d < 4; d++) {
        tw_tensor t[5] = {{"W_dec", dtypes[d], 2, {DS, DI}, w_dec},
                          {"W_enc", dtypes[d], 2, {DI, DS}, w_enc},
                          {"b_dec", dtypes[d], 1, {DI, 0}, b_dec},
                          {"b_enc", dtypes[d], 1, {DS, 0}, b_enc},
                          {"threshold", dtypes[d], 1, {DS, 0}, th}};
        tw_buf b = {0};
        tw_safetensors(&b, t, 5, NULL);
        char name[64];
        snprintf(name, sizeof name, "saelens-jumprelu-%s", dtypes[d]);
        st_seed(name, 1,
                "{\"d_in\": 3, \"d_sae\": 5, \"dtype\": \"float32\", \"architecture\": "
                "\"jumprelu\", \"apply_b_dec_to_input\": false, \"normalize_activations\": "
                "\"none\", \"metadata\": {\"sae_lens_version\": \"6.18.0\"}}",
                &b);
        snprintf(name, sizeof name, "saelens-nocfg-%s", dtypes[d]);
        st_seed(name, 0, NULL, &b);
        tw_free(&b);
        tw_safetensors(&b, t, 4, NULL);
        snprintf(name, sizeof name, "saelens-topk-%s", dtypes[d]);
        st_seed(name, 1,
                "{\"d_in\": 3, \"d_sae\": 5, \"architecture\": \"topk\", \"k\": 2, "
                "\"rescale_acts_by_decoder_norm\": false, \"meta\": {\"sae_lens_version\": "
                "\"6.0.0\"}}",
                &b);
        snprintf(name, sizeof name, "saelens-flat-%s", dtypes[d]);
        st_seed(name, 1,
                "{\"d_in\": 3, \"d_sae\": 5, \"dtype\": \"float32\", \"hook_point\": "
                "\"blocks.0.hook_mlp_out\", \"activation_fn_str\": \"topk\", "
                "\"activation_fn_kwargs\": {\"k\": 3}, \"apply_b_dec_to_input\": true, "
                "\"normalize_activations\": true, \"sae_lens_training_version\": \"3.4.0\"}",
                &b);
        snprintf(name, sizeof name, "saelens-scaled-%s", dtypes[d]);
        st_seed(name, 3,
                "{\"d_in\": 3, \"d_sae\": 5, \"architecture\": \"standard\", "
                "\"normalize_activations\": \"expected_average_only_in\"}",
                &b);
        tw_free(&b);
        tw_tensor s[4] = {{"W_dec", dtypes[d], 2, {DS, DI}, w_dec},
                          {"b_dec", dtypes[d], 1, {DI, 0}, b_dec},
                          {"encoder.bias", dtypes[d], 1, {DS, 0}, b_enc},
                          {"encoder.weight", dtypes[d], 2, {DS, DI}, w_enc_t}};
        tw_safetensors(&b, s, 4, "{\"format\":\"pt\"}");
        snprintf(name, sizeof name, "sparsify-%s", dtypes[d]);
        st_seed(name, 1,
                "{\"activation\": \"topk\", \"expansion_factor\": 32, \"normalize_decoder\": "
                "true, \"num_latents\": 5, \"k\": 2, \"multi_topk\": false, \"skip_connection\": "
                "false, \"transcode\": false, \"d_in\": 3}",
                &b);
        tw_free(&b);
    }
    float theta = 0.125f;
    tw_tensor bt[5] = {{"W_dec", "F32", 2, {DS, DI}, w_dec},
                       {"W_enc", "F32", 2, {DI, DS}, w_enc},
                       {"b_dec", "F32", 1, {DI, 0}, b_dec},
                       {"b_enc", "F32", 1, {DS, 0}, b_enc},
                       {"topk_threshold", "F64", 0, {0, 0}, &theta}};
    tw_buf b = {0};
    tw_safetensors(&b, bt, 5, NULL);
    st_seed("saelens-batchtopk-checkpoint", 1,
            "{\"d_in\": 3, \"d_sae\": 5, \"architecture\": \"batchtopk\", \"k\": 1.5, "
            "\"metadata\": {\"sae_lens_version\": \"6.5.0\"}}",
            &b);
    tw_free(&b);
    /* SAELens 6.18's newer classes and sparsify 1.3's transcoders and groupmax (tests/test_peers.c
     * has their math): gated, transcoders (d_out 2; W_skip [d_out, d_in] float32), per-token
     * normalization, a TopK checkpoint with rescale_acts_by_decoder_norm. */
    float w_dec2[DS * 2], b_dec2[2], skip[2 * DI], skip_sq[DI * DI];
    tw_fill(6, w_dec2, DS * 2, 1.0f);
    tw_fill(7, b_dec2, 2, 0.5f);
    tw_fill(8, skip, 2 * DI, 0.5f);
    tw_fill(9, skip_sq, DI * DI, 0.5f);
    tw_tensor gt[6] = {{"W_dec", "F32", 2, {DS, DI}, w_dec},
                       {"W_enc", "F32", 2, {DI, DS}, w_enc},
                       {"b_dec", "F32", 1, {DI, 0}, b_dec},
                       {"b_gate", "F32", 1, {DS, 0}, b_enc},
                       {"b_mag", "F32", 1, {DS, 0}, b_enc},
                       {"r_mag", "F32", 1, {DS, 0}, th}};
    tw_safetensors(&b, gt, 6, NULL);
    st_seed("saelens-gated", 1,
            "{\"d_in\": 3, \"d_sae\": 5, \"architecture\": \"gated\", \"normalize_activations\": "
            "\"layer_norm\", \"metadata\": {\"sae_lens_version\": \"6.18.0\"}}",
            &b);
    tw_free(&b);
    tw_tensor tt[5] = {{"W_dec", "BF16", 2, {DS, 2}, w_dec2},
                       {"W_enc", "BF16", 2, {DI, DS}, w_enc},
                       {"W_skip", "F32", 2, {2, DI}, skip},
                       {"b_dec", "BF16", 1, {2, 0}, b_dec2},
                       {"b_enc", "BF16", 1, {DS, 0}, b_enc}};
    tw_safetensors(&b, tt, 5, NULL);
    st_seed("saelens-skip-transcoder", 1,
            "{\"d_in\": 3, \"d_sae\": 5, \"d_out\": 2, \"dtype\": \"bfloat16\", "
            "\"apply_b_dec_to_input\": false, \"normalize_activations\": \"constant_norm_rescale\", "
            "\"architecture\": \"skip_transcoder\", \"metadata\": {\"sae_lens_version\": "
            "\"6.18.0\"}}",
            &b);
    tw_free(&b);
    tw_safetensors(&b, bt, 4, NULL);
    st_seed("saelens-topk-checkpoint", 1,
            "{\"d_in\": 3, \"d_sae\": 5, \"architecture\": \"topk\", \"k\": 2, "
            "\"decoder_init_norm\": 0.1, \"use_sparse_activations\": false, "
            "\"aux_loss_coefficient\": 1.0, \"rescale_acts_by_decoder_norm\": true, "
            "\"metadata\": {\"sae_lens_version\": \"6.18.0\"}}",
            &b);
    tw_free(&b);
    tw_tensor sk[5] = {{"W_dec", "BF16", 2, {DS, DI}, w_dec},
                       {"W_skip", "BF16", 2, {DI, DI}, skip_sq},
                       {"b_dec", "BF16", 1, {DI, 0}, b_dec},
                       {"encoder.bias", "BF16", 1, {DS, 0}, b_enc},
                       {"encoder.weight", "BF16", 2, {DS, DI}, w_enc_t}};
    tw_safetensors(&b, sk, 5, "{\"format\":\"pt\"}");
    st_seed("sparsify-transcoder-skip-groupmax", 1,
            "{\"activation\": \"groupmax\", \"expansion_factor\": 32, \"normalize_decoder\": "
            "true, \"num_latents\": 5, \"k\": 5, \"multi_topk\": false, \"skip_connection\": "
            "true, \"transcode\": true, \"d_in\": 3}",
            &b);
    tw_free(&b);
    /* libsae's own files, from the library's writer. */
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++) {
        sae_model *m;
        char path[4096], name[64];
        snprintf(path, sizeof path, "%s/own.tmp", out_dir);
        if (sae_model_new(&m, (sae_arch)a, DI, DS) != SAE_OK || sae_model_save(m, path) != SAE_OK)
            return 1;
        sae_model_free(m);
        FILE *fp = fopen(path, "rb");
        if (fp == NULL)
            return 1;
        unsigned char buf[8192];
        size_t n = fread(buf, 1, sizeof buf, fp);
        fclose(fp);
        remove(path);
        tw_buf own = {0};
        tw_put(&own, buf, n);
        snprintf(name, sizeof name, "libsae-%s", sae_arch_name((sae_arch)a));
        st_seed(name, 0, NULL, &own);
        tw_free(&own);
    }
    /* Issue 13's cases, refused now: kept as seeds so that mutations explore around them. */
    static const char *const cfg_cases[] = {
        "{\"d_in\": 3, \"d_sae\": 5, \"d_in\": 4}",
        "{\"d_in\": 3, \"d_sae\": 5, \"meta\": {\"sae_lens_version\": \"6.0.0\", "
        "\"sae_lens_version\": \"5.0\"}}",
        "{\"d_in\": 3, \"d_sae\": 5, \"architecture\": \"jumprelu\\u0000x\"}",
        "{\"d_in\": 03, \"d_sae\": 5}",
        "{\"d_in\": 1e999, \"d_sae\": 5}",
        "{\"scaling_factor\": 1e-46}",
        "{\"scaling_factor\": 1e39}",
        "{\"scaling_factor\": 0.5, \"scaling_factor\": 2}",
    };
    for (size_t i = 0; i < sizeof cfg_cases / sizeof cfg_cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "issue13-%zu", i);
        seed("cfg", name, cfg_cases[i], strlen(cfg_cases[i]));
    }
    static const char *const st_cases[] = {
        "{\"__metadata__\":{\"format\":\"libsae\",\"format_version\":\"999\","
        "\"architecture\":\"relu\",\"d_in\":\"0x3\",\"d_sae\":\"5\",\"apply_b_dec_to_input\":\"1\","
        "\"input_scale\":\"1e-46\"},",
        "{\"__metadata__\":{\"format\":\"pt\",\"format\":\"libsae\"},",
        "{\"W_enc\\u0000x\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},",
    };
    for (size_t i = 0; i < sizeof st_cases / sizeof st_cases[0]; i++) {
        /* The SAELens JumpReLU F32 file with the case's entries spliced in first. */
        tw_tensor t[5] = {{"W_dec", "F32", 2, {DS, DI}, w_dec},
                          {"W_enc", "F32", 2, {DI, DS}, w_enc},
                          {"b_dec", "F32", 1, {DI, 0}, b_dec},
                          {"b_enc", "F32", 1, {DS, 0}, b_enc},
                          {"threshold", "F32", 1, {DS, 0}, th}};
        tw_buf valid = {0}, b = {0};
        tw_safetensors(&valid, t, 5, NULL);
        size_t hlen = 0;
        for (int j = 7; j >= 0; j--)
            hlen = hlen << 8 | valid.data[j];
        tw_buf header = {0};
        tw_put(&header, st_cases[i], strlen(st_cases[i]));
        tw_put(&header, valid.data + 9, hlen - 1); /* the rest after the '{' */
        tw_put(&header, "", 1);
        tw_safetensors_raw(&b, (const char *)header.data, valid.data + 8 + hlen,
                           valid.size - 8 - hlen);
        char name[32];
        snprintf(name, sizeof name, "issue13-%zu", i);
        st_seed(name, 0, NULL, &b);
        tw_free(&valid);
        tw_free(&header);
        tw_free(&b);
    }
    {
        /* NaN planted in W_enc. */
        float bad[DI * DS];
        memcpy(bad, w_enc, sizeof bad);
        bad[4] = NAN;
        tw_tensor t[4] = {{"W_dec", "F32", 2, {DS, DI}, w_dec},
                          {"W_enc", "F32", 2, {DI, DS}, bad},
                          {"b_dec", "F32", 1, {DI, 0}, b_dec},
                          {"b_enc", "F32", 1, {DS, 0}, b_enc}};
        tw_buf nb = {0};
        tw_safetensors(&nb, t, 4, NULL);
        st_seed("issue13-nan", 0, NULL, &nb);
        tw_free(&nb);
    }
    seed("cfg", "scaler", "{\"scaling_factor\": 0.2138}", 26);
    seed("cfg", "scaler-null", "{\"scaling_factor\": null}", 24);
    /* Gemma Scope archives: stored, deflated, ZIP64; F32, F16, F64; W_ and w_ names. */
    static const char *const descrs[] = {"<f4", "<f2", "<f8"};
    for (int layout = 0; layout < 3; layout++) {
        for (int d = 0; d < 3; d++) {
            const char *names[5] = {d == 1 ? "w_enc.npy" : "W_enc.npy",
                                    d == 1 ? "w_dec.npy" : "W_dec.npy", "b_enc.npy", "b_dec.npy",
                                    "threshold.npy"};
            tw_buf m[5] = {{0}};
            size_t s_enc[2] = {DI, DS}, s_dec[2] = {DS, DI}, s_sae[1] = {DS}, s_in[1] = {DI};
            tw_npy(&m[0], descrs[d], 2, s_enc, w_enc);
            tw_npy(&m[1], descrs[d], 2, s_dec, w_dec);
            tw_npy(&m[2], descrs[d], 1, s_sae, b_enc);
            tw_npy(&m[3], descrs[d], 1, s_in, b_dec);
            tw_npy(&m[4], descrs[d], 1, s_sae, th);
            tw_buf z = {0};
            if (layout == 2)
                tw_zip64(&z, names, m, 5);
            else
                tw_zip(&z, names, m, 5, layout == 1);
            char name[64];
            snprintf(name, sizeof name, "gemma-%d-%d", layout, d);
            seed("npz", name, z.data, z.size);
            tw_free(&z);
            if (layout == 2 && d == 0) {
                /* Issue 13: W_enc.npy twice (Python would read the last). */
                const char *twice[6] = {names[0], names[1], names[2], names[3], names[4],
                                        names[0]};
                tw_buf m6[6] = {m[0], m[1], m[2], m[3], m[4], m[0]};
                tw_zip64(&z, twice, m6, 6);
                seed("npz", "issue13-twice", z.data, z.size);
                tw_free(&z);
            }
            for (int i = 0; i < 5; i++)
                tw_free(&m[i]);
        }
    }
    {
        /* Issue 13's npz bomb in small: a 1 MiB W_enc.npy of zeros (about 1 KB deflated) with a
         * W_dec.npy of the wrong shape, refused before W_enc is inflated. */
        static const char dict[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (512, 512), }";
        size_t bytes = 128 + 512 * 512 * sizeof(float);
        tw_buf m[5] = {{0}};
        unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 118, 0};
        tw_put(&m[0], pre, 10);
        tw_put(&m[0], dict, sizeof dict - 1);
        while (m[0].size < 127)
            tw_put(&m[0], " ", 1);
        tw_put(&m[0], "\n", 1);
        unsigned char *zeros = calloc(1, bytes - 128);
        if (zeros == NULL)
            return 1;
        tw_put(&m[0], zeros, bytes - 128);
        free(zeros);
        size_t s_dec[2] = {DS, DI}, s1[1] = {1};
        tw_npy(&m[1], "<f4", 2, s_dec, w_dec);
        for (int i = 2; i < 5; i++)
            tw_npy(&m[i], "<f4", 1, s1, b_enc);
        const char *names[5] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy",
                                "threshold.npy"};
        tw_buf z = {0};
        tw_zip(&z, names, m, 5, true);
        seed("npz", "issue13-bomb", z.data, z.size);
        tw_free(&z);
        for (int i = 0; i < 5; i++)
            tw_free(&m[i]);
    }
    /* The 2026 publishers (tests/test_publishers.c has their math): Gemma Scope 2 with and
     * without its skip and config.json, a cross-layer file, Llama Scope with hyperparams.json,
     * circuit-tracer's today and June 2025 W_dec, Llama Scope R1. */
    {
        float A[DI * DI];
        tw_fill(10, A, DI * DI, 0.5f);
        tw_tensor g[6] = {{"affine_skip_connection", "F32", 2, {DI, DI}, A},
                          {"b_dec", "F32", 1, {DI, 0}, b_dec},
                          {"b_enc", "F32", 1, {DS, 0}, b_enc},
                          {"threshold", "F32", 1, {DS, 0}, th},
                          {"w_dec", "BF16", 2, {DS, DI}, w_dec},
                          {"w_enc", "BF16", 2, {DI, DS}, w_enc}};
        static const char gs2_cfg[] = "{\"architecture\": \"jump_relu\", \"affine_connection\": "
                                      "true, \"hf_hook_point_in\": \"a\", \"hf_hook_point_out\": "
                                      "\"b\", \"width\": 5, \"l0\": \"medium\"}";
        tw_buf w = {0};
        tw_safetensors(&w, g, 6, NULL);
        pub_seed("gemma-scope-2-skip", 1, gs2_cfg, NULL, &w);
        pub_seed("gemma-scope-2-clt-name", 5, gs2_cfg, NULL, &w);
        tw_free(&w);
        tw_safetensors(&w, g + 1, 5, NULL);
        pub_seed("gemma-scope-2-sae", 0, NULL, NULL, &w);
        tw_free(&w);
        tw_tensor l[4] = {{"decoder.bias", "F32", 1, {DI, 0}, b_dec},
                          {"decoder.weight", "F32", 2, {DI, DS}, w_enc},
                          {"encoder.bias", "F32", 1, {DS, 0}, b_enc},
                          {"encoder.weight", "BF16", 2, {DS, DI}, w_enc_t}};
        tw_safetensors(&w, l, 4, NULL);
        pub_seed("llama-scope", 2, NULL,
                 "{\"d_model\": 3, \"d_sae\": 5, \"act_fn\": \"topk\", \"jump_relu_threshold\": "
                 "0.5, \"top_k\": 2, \"norm_activation\": \"dataset-wise\", "
                 "\"dataset_average_activation_norm\": {\"in\": 2.5, \"out\": 3.5}, "
                 "\"sparsity_include_decoder_norm\": true, \"apply_decoder_bias_to_pre_encoder\": "
                 "true, \"hook_point_in\": \"a\", \"hook_point_out\": \"a\"}",
                 &w);
        tw_free(&w);
        tw_tensor c[6] = {{"W_dec", "F32", 2, {DS, 2}, w_dec2},
                          {"W_enc", "F32", 2, {DS, DI}, w_enc_t},
                          {"W_skip", "F32", 2, {2, DI}, skip},
                          {"activation_function.threshold", "F32", 1, {DS, 0}, th},
                          {"b_dec", "F32", 1, {2, 0}, b_dec2},
                          {"b_enc", "F32", 1, {DS, 0}, b_enc}};
        tw_safetensors(&w, c, 6, NULL);
        pub_seed("circuit-tracer-jumprelu-skip", 0, NULL, NULL, &w);
        tw_free(&w);
        float w_dec2_t[2 * DS];
        for (int i = 0; i < DS; i++)
            for (int o = 0; o < 2; o++)
                w_dec2_t[o * DS + i] = w_dec2[i * 2 + o];
        c[0] = (tw_tensor){"W_dec", "F16", 2, {2, DS}, w_dec2_t};
        tw_tensor c2[4] = {c[0], c[1], c[4], c[5]};
        tw_safetensors(&w, c2, 4, NULL);
        pub_seed("circuit-tracer-june-2025", 0, NULL, NULL, &w);
        /* The same layer beside its set's config.yaml (flag 8: the hyperparams part is it). */
        pub_seed("circuit-tracer-config-yaml", 8, NULL,
                 "model_kind: transcoder_set\nactivation: relu\nk: &k 8\n"
                 "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
                 "transcoders:\n  - hf://a/b/layer_0.safetensors\n",
                 &w);
        tw_free(&w);
        /* Llama Scope R1 (lm_saes 2025-03 layout) and the later W_E layout as a transcoder,
         * each with config.json and the 0-d dataset norms. */
        const float norm_a = 2.5f, norm_b = 4.0f;
        tw_tensor r[6] = {{"dataset_average_activation_norm.a", "F32", 0, {0, 0}, &norm_a},
                          {"decoder.bias", "F32", 1, {DI, 0}, b_dec},
                          {"decoder.weight", "F32", 2, {DI, DS}, w_enc},
                          {"encoder.bias", "F32", 1, {DS, 0}, b_enc},
                          {"encoder.weight", "BF16", 2, {DS, DI}, w_enc_t},
                          {"log_jumprelu_threshold", "F32", 1, {DS, 0}, th}};
        tw_safetensors(&w, r, 6, NULL);
        pub_seed("llama-scope-r1", 1,
                 "{\"sae_type\": \"sae\", \"d_model\": 3, \"expansion_factor\": 5, "
                 "\"act_fn\": \"jumprelu\", \"norm_activation\": \"dataset-wise\", "
                 "\"sparsity_include_decoder_norm\": true, "
                 "\"apply_decoder_bias_to_pre_encoder\": true, \"hook_point_in\": \"a\"}",
                 NULL, &w);
        tw_free(&w);
        tw_tensor b[7] = {{"W_D", "F16", 2, {DS, DI}, w_dec},
                          {"W_E", "F32", 2, {DI, DS}, w_enc},
                          {"activation_function.log_jumprelu_threshold", "F32", 1, {DS, 0}, th},
                          {"b_D", "F32", 1, {DI, 0}, b_dec},
                          {"b_E", "F32", 1, {DS, 0}, b_enc},
                          {"dataset_average_activation_norm.a", "F32", 0, {0, 0}, &norm_a},
                          {"dataset_average_activation_norm.b", "F32", 0, {0, 0}, &norm_b}};
        tw_safetensors(&w, b, 7, NULL);
        pub_seed("lm-saes-w-e-transcoder", 1,
                 "{\"d_model\": 3, \"act_fn\": \"jumprelu\", \"hook_point_in\": \"a\", "
                 "\"hook_point_out\": \"b\"}",
                 NULL, &w);
        tw_free(&w);
    }
    return 0;
}
