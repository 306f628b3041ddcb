/* SAELens: a folder of cfg.json + sae_weights.safetensors (+ activation_scaler.json), in the
 * 6.x layout or the flat pre-6.0 one. The config is read the way SAELens' own loader reads it
 * (sae_lens/loading/pretrained_sae_loaders.py: handle_config_defaulting, handle_pre_6_0_config,
 * read_sae_components_from_disk); the field-by-field account is docs/formats.md. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The SAELens version that wrote the config: top-level (pre-6.0) or in the meta/metadata
 * object (6.x). NULL when none says. */
static const char *version_of(const cJSON *root)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "sae_lens_version");
    if (cJSON_IsString(v))
        return v->valuestring;
    static const char *const holders[] = {"meta", "metadata"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, holders[i]);
        v = cJSON_IsObject(meta) ? cJSON_GetObjectItemCaseSensitive(meta, "sae_lens_version")
                                 : NULL;
        if (cJSON_IsString(v))
            return v->valuestring;
    }
    return NULL;
}

/* SAELens treats configs older than 6.0.0-rc.0 (or of no stated version) as the flat layout;
 * every 6.x version, release candidates included, has major version 6 or more. */
static bool is_v6(const char *version)
{
    if (version == NULL)
        return false;
    long major = 0;
    const char *p = version;
    if (*p == 'v')
        p++;
    if (*p < '0' || *p > '9')
        return false;
    while (*p >= '0' && *p <= '9' && major < 1000)
        major = major * 10 + (*p++ - '0');
    return major >= 6;
}

static int parse_norm(const cJSON *root, const char *path, sae__norm *norm)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, "normalize_activations");
    *norm = SAE__NORM_NONE;
    if (item == NULL || cJSON_IsNull(item)) /* SAELens' Gemma loader writes None */
        return SAE_OK;
    if (cJSON_IsBool(item)) { /* pre-6.0: true meant the April-update scalar */
        *norm = cJSON_IsTrue(item) ? SAE__NORM_EXPECTED_AVERAGE : SAE__NORM_NONE;
        return SAE_OK;
    }
    if (!cJSON_IsString(item))
        return sae__fail(SAE_EFORMAT,
                         "%s: 'normalize_activations' must be a string, true/false or null",
                         path);
    static const struct {
        const char *name;
        sae__norm norm;
    } modes[] = {{"none", SAE__NORM_NONE},
                 {"expected_average_only_in", SAE__NORM_EXPECTED_AVERAGE},
                 {"constant_norm_rescale", SAE__NORM_CONSTANT_NORM},
                 {"layer_norm", SAE__NORM_LAYER_NORM}};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        if (strcmp(item->valuestring, modes[i].name) == 0) {
            *norm = modes[i].norm;
            return SAE_OK;
        }
    }
    return sae__fail(SAE_EFORMAT,
                     "%s: normalize_activations '%.40s' is none of none, "
                     "expected_average_only_in, constant_norm_rescale, layer_norm",
                     path, item->valuestring);
}

/* k of a TopK config: 6.x keeps it at the top level (default 100, TopKSAEConfig); the flat
 * layout in activation_fn_kwargs. BatchTopK's k is a float (an average), rounded here. */
static int parse_k(const cJSON *root, const char *path, bool v6, size_t *k)
{
    const cJSON *holder = root;
    if (!v6) {
        holder = cJSON_GetObjectItemCaseSensitive(root, "activation_fn_kwargs");
        if (!cJSON_IsObject(holder))
            holder = root; /* some 5.x files also carry a top-level k */
    }
    double v;
    bool found;
    int rc = sae__json_number(holder, "k", path, &v, &found);
    if (rc != SAE_OK)
        return rc;
    if (!found) {
        if (!v6)
            return sae__fail(SAE_EFORMAT, "%s: a TopK config without 'k' in activation_fn_kwargs",
                             path);
        v = 100; /* TopKSAEConfig's default */
    }
    v = floor(v + 0.5);
    if (!(v >= 1.0 && v <= (double)UINT32_MAX))
        return sae__fail(SAE_EFORMAT, "%s: 'k' = %g is not a count >= 1", path, v);
    *k = (size_t)v;
    return SAE_OK;
}

static int parse_arch(const cJSON *root, const char *path, sae__saelens_cfg *cfg)
{
    const char *arch = "standard", *act = "relu";
    bool found;
    int rc = sae__json_string(root, "architecture", path, &arch, &found);
    if (rc == SAE_OK && !cfg->v6) {
        /* handle_pre_6_0_config renames activation_fn_str to activation_fn. */
        rc = sae__json_string(root, "activation_fn", path, &act, &found);
        if (rc == SAE_OK && !found)
            rc = sae__json_string(root, "activation_fn_str", path, &act, &found);
    }
    if (rc != SAE_OK)
        return rc;
    if (!cfg->v6 && strcmp(arch, "standard") == 0 && strcmp(act, "relu") != 0) {
        /* Before 6.0 a "standard" SAE ran the activation the config named. */
        if (strcmp(act, "topk") != 0)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: activation_fn '%.40s' is not supported (relu or topk)", path,
                             act);
        arch = "topk";
    }
    /* The names sae_lens/__init__.py registers (register_sae_class and
     * register_sae_training_class). */
    static const struct {
        const char *name;
        sae_arch arch;
        bool transcoder, skip, rescale;
    } known[] = {{"standard", SAE_ARCH_RELU, false, false, false},
                 {"relu", SAE_ARCH_RELU, false, false, false},
                 {"topk", SAE_ARCH_TOPK, false, false, true},
                 {"jumprelu", SAE_ARCH_JUMPRELU, false, false, false},
                 {"gated", SAE_ARCH_GATED, false, false, false},
                 /* Training checkpoints; SAELens saves the inference model as JumpReLU. */
                 {"batchtopk", SAE_ARCH_BATCHTOPK, false, false, true},
                 {"matryoshka_batchtopk", SAE_ARCH_BATCHTOPK, false, false, true},
                 /* saes/transcoder.py: Transcoder, SkipTranscoder, JumpReLUTranscoder. */
                 {"transcoder", SAE_ARCH_RELU, true, false, false},
                 {"skip_transcoder", SAE_ARCH_RELU, true, true, false},
                 {"jumprelu_transcoder", SAE_ARCH_JUMPRELU, true, false, false}};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (strcmp(arch, known[i].name) != 0)
            continue;
        cfg->architecture = known[i].name;
        cfg->arch = known[i].arch;
        cfg->transcoder = known[i].transcoder;
        cfg->skip = known[i].skip;
        cfg->d_out = cfg->d_in;
        if (cfg->transcoder) {
            cfg->d_out = 768; /* TranscoderConfig's default, for a config without d_out */
            rc = sae__json_size(root, "d_out", path, &cfg->d_out, &found);
            if (rc == SAE_OK && cfg->d_out == 0)
                rc = sae__fail(SAE_EFORMAT, "%s: 'd_out' must be a whole number >= 1", path);
            /* Transcoder.process_sae_in never subtracts b_dec (it is [d_out]), whatever
             * apply_b_dec_to_input says (TranscoderConfig refuses true; nothing to run). */
            cfg->apply_b_dec = false;
        }
        /* rescale_acts_by_decoder_norm is a field of the TopK configs only: other classes
         * drop it (filter_valid_dataclass_fields), so elsewhere only its type is checked.
         * Absent, it is false: files from before it existed (6.14) were trained without it. */
        bool rescale = false;
        if (rc == SAE_OK)
            rc = sae__json_bool(root, "rescale_acts_by_decoder_norm", path, &rescale, &found);
        cfg->rescale_by_decoder_norm = rescale && known[i].rescale;
        if (rc == SAE_OK && (cfg->arch == SAE_ARCH_TOPK || cfg->arch == SAE_ARCH_BATCHTOPK))
            rc = parse_k(root, path, cfg->v6, &cfg->k);
        return rc;
    }
    return sae__fail(SAE_EUNSUPPORTED,
                     "%s: architecture '%.40s' is not supported (standard, topk, jumprelu, gated, "
                     "batchtopk, matryoshka_batchtopk, transcoder, skip_transcoder, "
                     "jumprelu_transcoder)",
                     path, arch);
}

int sae__saelens_cfg_parse(const char *text, size_t len, const char *path, sae__saelens_cfg *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cJSON *root;
    int rc = sae__json_parse_object(text, len, path, &root);
    if (rc != SAE_OK)
        return rc;
    cfg->v6 = is_v6(version_of(root));
    bool found_in, found_sae, found;
    rc = sae__json_size(root, "d_in", path, &cfg->d_in, &found_in);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "d_sae", path, &cfg->d_sae, &found_sae);
    if (rc == SAE_OK && (!found_in || !found_sae || cfg->d_in == 0 || cfg->d_sae == 0))
        rc = sae__fail(SAE_EFORMAT, "%s: 'd_in' and 'd_sae' must be whole numbers >= 1", path);
    cfg->apply_b_dec = true; /* SAEConfig's default, and handle_pre_6_0_config's */
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "apply_b_dec_to_input", path, &cfg->apply_b_dec, &found);
    if (rc == SAE_OK)
        rc = parse_norm(root, path, &cfg->norm);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "finetuning_scaling_factor", path,
                            &cfg->finetuning_scaling_factor, &found);
    const char *s = NULL;
    if (rc == SAE_OK)
        rc = sae__json_string(root, "reshape_activations", path, &s, &found);
    /* hook_z only views [n_heads][d_head] as one row of d_in: the caller's rows already are. */
    if (rc == SAE_OK && found && strcmp(s, "none") != 0 && strcmp(s, "hook_z") != 0)
        rc = sae__fail(SAE_EUNSUPPORTED, "%s: reshape_activations '%.40s' is not supported",
                       path, s);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "dtype", path, &s, &found);
    if (rc == SAE_OK && found) {
        /* DTYPE_MAP in sae_lens/constants.py. The weights are read from the dtype they are
         * stored in and computed in float32 whatever this says. */
        const char *name = strncmp(s, "torch.", 6) == 0 ? s + 6 : s;
        if (strcmp(name, "float32") != 0 && strcmp(name, "float16") != 0 &&
            strcmp(name, "bfloat16") != 0 && strcmp(name, "float64") != 0)
            rc = sae__fail(SAE_EFORMAT, "%s: dtype '%.40s' is not a dtype SAELens knows", path,
                           s);
    }
    if (rc == SAE_OK)
        rc = parse_arch(root, path, cfg);
    cJSON_Delete(root);
    return rc;
}

int sae__saelens_scaler_parse(const char *text, size_t len, const char *path, double *s)
{
    *s = 0;
    cJSON *root;
    int rc = sae__json_parse_object(text, len, path, &root);
    if (rc != SAE_OK)
        return rc;
    bool found;
    double v = 0;
    rc = sae__json_number(root, "scaling_factor", path, &v, &found);
    /* It becomes INPUT_SCALE: the model's own range, checked as a float (1e-46 is > 0 as a
     * double but 0 as a float), is the one check, here naming this file and key. */
    double lo = 0, hi = 0;
    float f;
    if (rc == SAE_OK && found && sae_model_param_bounds(SAE_PARAM_INPUT_SCALE, &lo, &hi) == SAE_OK &&
        sae__float_in_range(v, lo, hi, "scaling_factor", &f) != SAE_OK)
        rc = sae__wrap(SAE_EFORMAT, "%s: ", path);
    if (rc == SAE_OK && found)
        *s = v;
    cJSON_Delete(root);
    return rc;
}

/* A tensor SAELens multiplies the features by when it is not all ones (pre-6.0 fine-tuning):
 * all ones is dropped on load, as read_sae_components_from_disk does. */
static int check_scaling_factor(const sae__safetensors *st, size_t d_sae)
{
    const sae__st_tensor *t = sae__st_find(st, "scaling_factor");
    if (t == NULL)
        return SAE_OK;
    int rc = sae__st_expect(st, "scaling_factor", d_sae, 0, &t);
    if (rc != SAE_OK)
        return rc;
    float v[256];
    for (size_t i = 0; i < d_sae; i += 256) {
        size_t n = d_sae - i < 256 ? d_sae - i : 256;
        sae__to_float(t->dtype, st->data + t->offset + i * sae__dtype_size(t->dtype), n, v);
        for (size_t j = 0; j < n; j++)
            if (v[j] != 1.0f)
                return sae__fail(SAE_EUNSUPPORTED,
                                 "%s: tensor 'scaling_factor' is not all ones (a fine-tuning "
                                 "scale on the features, not supported)",
                                 st->path);
    }
    return SAE_OK;
}

/* BatchTopK training checkpoints keep the global threshold as a float64 scalar. */
static int topk_threshold(const sae__safetensors *st, double *out)
{
    const sae__st_tensor *t = sae__st_find(st, "topk_threshold");
    if (t == NULL)
        return sae__fail(SAE_EFORMAT,
                         "%s: a BatchTopK config, but neither 'threshold' (the inference model) "
                         "nor 'topk_threshold' (a training checkpoint) is in the weights",
                         st->path);
    if (t->count != 1 || t->dtype == SAE__DTYPE_COUNT)
        return sae__fail(SAE_EFORMAT, "%s: tensor 'topk_threshold' is not one float", st->path);
    float v;
    sae__to_float(t->dtype, st->data + t->offset, 1, &v);
    *out = v;
    return SAE_OK;
}

/* Gives tensor t memory the model owns, holding what it held (a mapped F32 tensor is shared
 * with the file's private mapping, which the loader does not write through). */
static int own_copy(sae_model *m, sae_tensor t)
{
    if (m->owned & (1u << t))
        return SAE_OK;
    const float *src = *sae__model_tensor_slot(m, t);
    int rc = sae__model_own_tensor_uninit(m, t);
    if (rc == SAE_OK)
        memcpy(*sae__model_tensor_slot(m, t), src, sae__model_tensor_count(m, t) * sizeof(float));
    return rc;
}

/* rescale_acts_by_decoder_norm: SAELens multiplies each pre-activation by n_i = ||W_dec[i]||
 * before the selection and divides the code by it before decoding (TopKSAE.encode/decode,
 * TopKTrainingSAE). That is the SAE _fold_norm_topk makes: W_enc[:, i] *= n_i,
 * b_enc[i] *= n_i, W_dec[i] /= n_i, folded here with the file's own norms. A BatchTopK
 * threshold compares the rescaled values already and stays as it is. */
static int fold_decoder_norms(sae_model *m, const char *path)
{
    int rc;
    if ((rc = own_copy(m, SAE_W_ENC)) != SAE_OK || (rc = own_copy(m, SAE_B_ENC)) != SAE_OK ||
        (rc = own_copy(m, SAE_W_DEC)) != SAE_OK)
        return rc;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out;
    for (size_t i = 0; i < d_sae; i++) {
        double sq = 0;
        for (size_t j = 0; j < d_out; j++)
            sq += (double)m->W_dec[i * d_out + j] * m->W_dec[i * d_out + j];
        const float n = (float)sqrt(sq);
        if (!(n > 0.0f) || !isfinite(n))
            return sae__fail(SAE_EFORMAT,
                             "%s: rescale_acts_by_decoder_norm is true but row %zu of W_dec has "
                             "norm %g (SAELens divides the feature by it)",
                             path, i, (double)n);
        for (size_t j = 0; j < d_out; j++)
            m->W_dec[i * d_out + j] /= n;
        for (size_t j = 0; j < d_in; j++)
            m->W_enc[j * d_sae + i] *= n;
        m->b_enc[i] *= n;
    }
    sae__model_weights_changed(m);
    return SAE_OK;
}

/* JumpReLUTrainingSAE keeps log_threshold; its process_state_dict_for_saving writes
 * threshold = exp(log_threshold), which a file holding log_threshold did not get. */
static int exp_threshold(sae_model *m, const char *path)
{
    int rc = own_copy(m, SAE_THRESHOLD);
    for (size_t i = 0; rc == SAE_OK && i < m->d_sae; i++) {
        const float v = expf(m->threshold[i]);
        if (!isfinite(v))
            return sae__fail(SAE_EFORMAT, "%s: exp(log_threshold[%zu]) = exp(%g) is not finite",
                             path, i, (double)m->threshold[i]);
        m->threshold[i] = v;
    }
    return rc;
}

/* A tensor that carries a term of the computation, present in the file but not used by the
 * model the config describes: refused rather than dropped (SAELens' load_state_dict is strict
 * and would refuse it too). */
static int check_unused(const sae__safetensors *st, const char *const names[SAE__TENSOR_END],
                        const char *what)
{
    /* SAELens's load_state_dict is strict: a tensor its class has no parameter for is an
     * error there, and here, rather than a term silently dropped. */
    static const char *const terms[] = {"W_skip",         "b_gate",         "r_mag",
                                        "b_mag",          "log_threshold",  "topk_threshold",
                                        "b_enc",          "threshold"};
    for (size_t i = 0; i < sizeof terms / sizeof terms[0]; i++) {
        if (sae__st_find(st, terms[i]) == NULL)
            continue;
        bool used = false;
        for (int t = SAE_W_ENC; t < SAE__TENSOR_END; t++)
            used = used || (names[t] != NULL && strcmp(names[t], terms[i]) == 0);
        if (!used)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: tensor '%s' is not part of %s: it would be dropped", st->path,
                             terms[i], what);
    }
    return SAE_OK;
}

int sae__saelens_load(const sae__safetensors *st, sae__map *map, const sae__saelens_cfg *cfg,
                      double scaling_factor, sae_model **out)
{
    *out = NULL;
    const char *path = st->path;
    const char *names[SAE__TENSOR_END] = {NULL, "W_enc", "W_dec", "b_enc", "b_dec"};
    bool has_threshold = sae__st_find(st, "threshold") != NULL;
    bool has_log_threshold = !has_threshold && sae__st_find(st, "log_threshold") != NULL;
    sae__shape shape = {SAE_ARCH_RELU, 0, 0, 0, false, false};
    double batch_threshold = 0;
    int rc;
    if (cfg != NULL) {
        shape = (sae__shape){cfg->arch, cfg->d_in, cfg->d_sae, cfg->d_out, cfg->transcoder,
                             cfg->skip};
        if (cfg->finetuning_scaling_factor && sae__st_find(st, "scaling_factor") == NULL)
            return sae__fail(SAE_EFORMAT,
                             "%s: finetuning_scaling_factor is true but there is no tensor "
                             "'scaling_factor'",
                             path);
        if (shape.arch == SAE_ARCH_BATCHTOPK) {
            if (has_threshold)
                shape.arch = SAE_ARCH_JUMPRELU; /* saved for inference: one threshold per feature */
            else if ((rc = topk_threshold(st, &batch_threshold)) != SAE_OK)
                return rc;
            else
                names[SAE_THRESHOLD] = "topk_threshold"; /* read above, used */
        }
        if (cfg->norm == SAE__NORM_EXPECTED_AVERAGE && cfg->transcoder)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: normalize_activations 'expected_average_only_in' on a "
                             "transcoder (SAELens divides its output by the scale; a libsae "
                             "transcoder's output is never rescaled)",
                             path);
        if (cfg->norm == SAE__NORM_EXPECTED_AVERAGE && !(scaling_factor > 0))
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: normalize_activations is 'expected_average_only_in' but no "
                             "scaling factor is stored (activation_scaler.json beside the "
                             "weights with {\"scaling_factor\": s}); without it the input "
                             "scale is unknown",
                             path);
    } else {
        /* Without cfg.json the weights do not say what they compute: a TopK SAE would run as
         * ReLU, a skip transcoder without its skip term, a normalized SAE unnormalized. */
        return sae__fail(SAE_EFORMAT,
                         "%s: SAELens weights need the cfg.json SAELens writes beside them "
                         "(the architecture, k, d_out, normalization and apply_b_dec_to_input "
                         "are only there), and there is none",
                         path);
    }
    if ((rc = check_scaling_factor(st, shape.d_sae)) != SAE_OK)
        return rc;
    if (shape.arch == SAE_ARCH_JUMPRELU)
        names[SAE_THRESHOLD] = has_log_threshold ? "log_threshold" : "threshold";
    if (shape.arch == SAE_ARCH_GATED) {
        names[SAE_B_ENC] = "b_gate"; /* GatedSAE has no b_enc: the gate's bias is b_gate */
        names[SAE_R_MAG] = "r_mag";
        names[SAE_B_MAG] = "b_mag";
    }
    /* SkipTranscoder.W_skip is [d_out, d_in], used as x @ W_skip.T: libsae's [d_in][d_out]. */
    if (shape.skip)
        names[SAE_W_SKIP] = "W_skip";
    char what[96];
    snprintf(what, sizeof what, "a SAELens '%s'",
             cfg != NULL ? cfg->architecture : shape.arch == SAE_ARCH_JUMPRELU ? "jumprelu"
                                                                               : "standard");
    if ((rc = check_unused(st, names, what)) != SAE_OK)
        return rc;
    if (shape.arch == SAE_ARCH_BATCHTOPK)
        names[SAE_THRESHOLD] = NULL; /* a parameter, not a tensor of the model */
    sae_model *m;
    if ((rc = sae__model_from_st(st, map, &shape, names, 1u << SAE_W_SKIP, "saelens", &m)) !=
        SAE_OK)
        return rc;
    if (has_log_threshold && shape.arch == SAE_ARCH_JUMPRELU)
        rc = exp_threshold(m, path);
    if (rc == SAE_OK && cfg != NULL && cfg->rescale_by_decoder_norm &&
        (shape.arch == SAE_ARCH_TOPK || shape.arch == SAE_ARCH_BATCHTOPK))
        rc = fold_decoder_norms(m, path);
    if (rc != SAE_OK) {
        sae_model_free(m);
        return rc;
    }
    if (cfg != NULL) {
        static const sae_normalize norms[] = {
            [SAE__NORM_NONE] = SAE_NORMALIZE_NONE,
            [SAE__NORM_EXPECTED_AVERAGE] = SAE_NORMALIZE_NONE, /* INPUT_SCALE, below */
            [SAE__NORM_CONSTANT_NORM] = SAE_NORMALIZE_CONSTANT_NORM,
            [SAE__NORM_LAYER_NORM] = SAE_NORMALIZE_LAYER_NORM};
        rc = sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, cfg->apply_b_dec ? 1 : 0);
        if (rc == SAE_OK && (shape.arch == SAE_ARCH_TOPK || shape.arch == SAE_ARCH_BATCHTOPK))
            rc = sae_model_set_param(m, SAE_PARAM_K, (double)cfg->k);
        if (rc == SAE_OK && shape.arch == SAE_ARCH_BATCHTOPK &&
            (rc = sae_model_set_param(m, SAE_PARAM_THRESHOLD, batch_threshold)) != SAE_OK) {
            sae_model_free(m);
            return sae__wrap(SAE_EFORMAT, "%s: tensor 'topk_threshold': ", path);
        }
        /* The scaler multiplies the input by s before the SAE and divides its output by s
         * after (ActivationScaler.scale/unscale): INPUT_SCALE is that, to the rounding. */
        if (rc == SAE_OK && cfg->norm == SAE__NORM_EXPECTED_AVERAGE)
            rc = sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, scaling_factor);
        /* run_time_activation_norm_fn_in/_out (SAE._setup_activation_normalization). */
        if (rc == SAE_OK && norms[cfg->norm] != SAE_NORMALIZE_NONE)
            rc = sae_model_set_param(m, SAE_PARAM_NORMALIZE, norms[cfg->norm]);
        if (rc != SAE_OK) {
            sae_model_free(m);
            return sae__wrap(rc == SAE_EUNSUPPORTED ? rc : SAE_EFORMAT, "%s: ", path);
        }
    }
    *out = m;
    return SAE_OK;
}
