/* SAELens: a folder of cfg.json + sae_weights.safetensors (+ activation_scaler.json), in the
 * 6.x layout or the flat pre-6.0 one. The config is read the way SAELens' own loader reads it
 * (sae_lens/loading/pretrained_sae_loaders.py: handle_config_defaulting, handle_pre_6_0_config,
 * read_sae_components_from_disk); the field-by-field account is docs/formats.md. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <math.h>
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
            if (*norm == SAE__NORM_CONSTANT_NORM || *norm == SAE__NORM_LAYER_NORM)
                return sae__fail(SAE_EUNSUPPORTED,
                                 "%s: normalize_activations '%s' (a per-token rescaling of the "
                                 "input) is not supported",
                                 path, modes[i].name);
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
    static const struct {
        const char *name;
        sae_arch arch;
    } known[] = {{"standard", SAE_ARCH_RELU},
                 {"relu", SAE_ARCH_RELU},
                 {"topk", SAE_ARCH_TOPK},
                 {"jumprelu", SAE_ARCH_JUMPRELU},
                 /* Training checkpoints; SAELens saves the inference model as JumpReLU. */
                 {"batchtopk", SAE_ARCH_BATCHTOPK},
                 {"matryoshka_batchtopk", SAE_ARCH_BATCHTOPK}};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (strcmp(arch, known[i].name) == 0) {
            cfg->arch = known[i].arch;
            if (cfg->arch == SAE_ARCH_TOPK || cfg->arch == SAE_ARCH_BATCHTOPK)
                return parse_k(root, path, cfg->v6, &cfg->k);
            return SAE_OK;
        }
    }
    return sae__fail(SAE_EUNSUPPORTED,
                     "%s: architecture '%.40s' is not supported (standard, topk, jumprelu, "
                     "batchtopk)",
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
        rc = sae__json_bool(root, "rescale_acts_by_decoder_norm", path,
                            &cfg->rescale_by_decoder_norm, &found);
    if (rc == SAE_OK && cfg->rescale_by_decoder_norm)
        rc = sae__fail(SAE_EUNSUPPORTED,
                       "%s: rescale_acts_by_decoder_norm is true (a training checkpoint; SAELens "
                       "folds the decoder norms when it saves the inference model)",
                       path);
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

int sae__saelens_load(const sae__safetensors *st, sae__map *map, const sae__saelens_cfg *cfg,
                      double scaling_factor, sae_model **out)
{
    *out = NULL;
    const char *path = st->path;
    static const char *const gated[] = {"b_gate", "b_mag", "r_mag"};
    for (size_t i = 0; i < 3; i++)
        if (sae__st_find(st, gated[i]) != NULL)
            return sae__fail(SAE_EUNSUPPORTED, "%s: a gated SAE (tensor '%s') is not supported",
                             path, gated[i]);
    bool has_threshold = sae__st_find(st, "threshold") != NULL;
    size_t d_in, d_sae;
    sae_arch arch;
    double batch_threshold = 0;
    int rc;
    if (cfg != NULL) {
        d_in = cfg->d_in;
        d_sae = cfg->d_sae;
        arch = cfg->arch;
        if (cfg->finetuning_scaling_factor && sae__st_find(st, "scaling_factor") == NULL)
            return sae__fail(SAE_EFORMAT,
                             "%s: finetuning_scaling_factor is true but there is no tensor "
                             "'scaling_factor'",
                             path);
        if (arch == SAE_ARCH_BATCHTOPK) {
            if (has_threshold)
                arch = SAE_ARCH_JUMPRELU; /* saved for inference: one threshold per feature */
            else if ((rc = topk_threshold(st, &batch_threshold)) != SAE_OK)
                return rc;
        }
        if (cfg->norm == SAE__NORM_EXPECTED_AVERAGE && !(scaling_factor > 0))
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: normalize_activations is 'expected_average_only_in' but no "
                             "scaling factor is stored (activation_scaler.json beside the "
                             "weights with {\"scaling_factor\": s}); without it the input "
                             "scale is unknown",
                             path);
    } else {
        /* No cfg.json: the shapes say the sizes, a threshold says JumpReLU, and the rest are
         * SAELens' defaults (apply_b_dec_to_input true, no normalization). */
        const sae__st_tensor *w = sae__st_find(st, "W_enc");
        if (w->ndim != 2 || w->shape[0] == 0 || w->shape[1] == 0)
            return sae__fail(SAE_EFORMAT, "%s: tensor 'W_enc' is not a non-empty matrix", path);
        d_in = w->shape[0];
        d_sae = w->shape[1];
        arch = has_threshold ? SAE_ARCH_JUMPRELU : SAE_ARCH_RELU;
    }
    if ((rc = check_scaling_factor(st, d_sae)) != SAE_OK)
        return rc;
    const char *const names[SAE__TENSOR_END] = {NULL, "W_enc", "W_dec", "b_enc", "b_dec",
                                                "threshold"};
    sae_model *m;
    const sae__shape shape = {arch, d_in, d_sae, d_in, false, false};
    if ((rc = sae__model_from_st(st, map, &shape, names, 0, "saelens", &m)) != SAE_OK)
        return rc;
    if (cfg != NULL) {
        rc = sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, cfg->apply_b_dec ? 1 : 0);
        if (rc == SAE_OK && (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK))
            rc = sae_model_set_param(m, SAE_PARAM_K, (double)cfg->k);
        if (rc == SAE_OK && arch == SAE_ARCH_BATCHTOPK &&
            (rc = sae_model_set_param(m, SAE_PARAM_THRESHOLD, batch_threshold)) != SAE_OK) {
            sae_model_free(m);
            return sae__wrap(SAE_EFORMAT, "%s: tensor 'topk_threshold': ", path);
        }
        /* The scaler multiplies the input by s before the SAE and divides its output by s
         * after (ActivationScaler.scale/unscale): INPUT_SCALE is that, to the rounding. */
        if (rc == SAE_OK && cfg->norm == SAE__NORM_EXPECTED_AVERAGE)
            rc = sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, scaling_factor);
        if (rc != SAE_OK) {
            sae_model_free(m);
            return sae__wrap(SAE_EFORMAT, "%s: ", path);
        }
    }
    *out = m;
    return SAE_OK;
}
