/* Llama Scope (OpenMOSS, fnlp/Llama-Scope): a folder of hyperparams.json and
 * checkpoints/final.safetensors, read as the authors' lm_saes of the release (late 2024:
 * SAEConfig.from_pretrained, SparseAutoEncoder.from_config / encode / decode) reads it:
 *   encoder.weight [d_sae][d_model], encoder.bias [d_sae],
 *   decoder.weight [d_model][d_sae], decoder.bias [d_model]      (both matrices transposed here)
 * from_config then rewrites the weights before use, in this order:
 *   1. norm_activation "dataset-wise": s_in = sqrt(d_model) / dataset_average_activation_norm.in,
 *      s_out likewise with .out; encoder.bias /= s_in, decoder.bias /= s_out,
 *      decoder.weight *= s_in / s_out; from then on the input is not scaled ("inference").
 *   2. sparsity_include_decoder_norm: n_i = ||decoder.weight[:, i]||; decoder.weight[:, i] /= n_i,
 *      encoder.weight[i] *= n_i, encoder.bias[i] *= n_i.
 *   3. act_fn "topk" with jump_relu_threshold > 0 becomes "jumprelu".
 * and encodes pre = (x - decoder.bias) @ encoder.weight^T + encoder.bias (the subtraction when
 * use_decoder_bias and apply_decoder_bias_to_pre_encoder), f = relu / topk of relu /
 * pre where pre > jump_relu_threshold, y = f @ decoder.weight^T + decoder.bias. Every step is
 * done here the same way, so libsae runs the publisher's model: its JumpReLU (no ReLU) equals
 * libsae's when the threshold is not negative, and a negative one is refused. SAELens's
 * llama_scope loader skips step 2 (different features fire); lm_saes is followed.
 * Refused by name: use_glu_encoder (a gated encoder libsae has no form for), norm_activation
 * token-wise / batch-wise (the output stays in the normalized space, which no libsae
 * normalization does), use_decoder_bias false. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sae__model_own_copy(sae_model *m, sae_tensor t)
{
    if (m->owned & (1u << t))
        return SAE_OK;
    const float *src = *sae__model_tensor_slot(m, t);
    int rc = sae__model_own_tensor_uninit(m, t);
    if (rc == SAE_OK)
        memcpy(*sae__model_tensor_slot(m, t), src, sae__model_tensor_count(m, t) * sizeof(float));
    return rc;
}

typedef struct {
    size_t d_model, d_sae, top_k;
    sae_arch arch;
    double threshold;
    bool dataset_wise;
    double norm_in, norm_out;
    bool include_decoder_norm, apply_b_dec, transcoder;
} ls_config;

static int positive(const cJSON *obj, const char *key, const char *path, double *v)
{
    bool found;
    int rc = sae__json_number(obj, key, path, v, &found);
    if (rc == SAE_OK && (!found || !(*v > 0) || !isfinite(*v)))
        rc = sae__fail(SAE_EFORMAT,
                       "%s: dataset_average_activation_norm['%s'] must be a positive number",
                       path, key);
    return rc;
}

/* The keys SAEConfig (the release's hyperparams.json) and BaseSAEConfig (config.json) share,
 * in the order both read them; a key a file leaves out keeps the caller's default. */
static int read_shared(const cJSON *root, const char *p, const char **norm,
                       bool *include_decoder_norm, bool *apply_b_dec, bool *use_bias, bool *glu,
                       const char **hook_in, const char **hook_out)
{
    bool found;
    int rc = sae__json_string(root, "norm_activation", p, norm, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "sparsity_include_decoder_norm", p, include_decoder_norm,
                            &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "apply_decoder_bias_to_pre_encoder", p, apply_b_dec, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "use_decoder_bias", p, use_bias, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "use_glu_encoder", p, glu, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "hook_point_in", p, hook_in, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "hook_point_out", p, hook_out, &found);
    return rc;
}

static int parse_hyper(const sae__side_text *h, ls_config *c)
{
    memset(c, 0, sizeof *c);
    cJSON *root;
    int rc = sae__json_parse_object(h->text, h->len, h->path, &root);
    if (rc != SAE_OK)
        return rc;
    const char *p = h->path, *act = "relu", *norm = "token-wise", *in = NULL, *outp = NULL;
    size_t expansion = 128;
    /* SAEConfig's defaults of the release, for keys a file leaves out. */
    bool found, glu = false, use_bias = true;
    c->top_k = 50;
    c->include_decoder_norm = true;
    c->apply_b_dec = true;
    rc = sae__json_size(root, "d_model", p, &c->d_model, &found);
    if (rc == SAE_OK && (!found || c->d_model == 0))
        rc = sae__fail(SAE_EFORMAT, "%s: 'd_model' must be a whole number >= 1", p);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "expansion_factor", p, &expansion, &found);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "d_sae", p, &c->d_sae, &found);
    if (rc == SAE_OK && !found && !sae__mul(c->d_model, expansion, &c->d_sae))
        rc = sae__fail(SAE_EFORMAT, "%s: d_model * expansion_factor overflows", p);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "act_fn", p, &act, &found);
    if (rc == SAE_OK)
        rc = sae__json_number(root, "jump_relu_threshold", p, &c->threshold, &found);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "top_k", p, &c->top_k, &found);
    if (rc == SAE_OK)
        rc = read_shared(root, p, &norm, &c->include_decoder_norm, &c->apply_b_dec, &use_bias,
                         &glu, &in, &outp);
    if (rc == SAE_OK) {
        c->transcoder = in != NULL && outp != NULL && strcmp(in, outp) != 0;
        if (glu)
            rc = sae__fail(SAE_EUNSUPPORTED, "%s: use_glu_encoder (a sigmoid-gated encoder) is "
                                             "not something libsae runs", p);
        else if (!use_bias)
            rc = sae__fail(SAE_EUNSUPPORTED, "%s: use_decoder_bias false is not read", p);
        else if (!isfinite(c->threshold) || c->threshold < 0)
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: jump_relu_threshold = %g: lm_saes's JumpReLU keeps values "
                           "above a negative threshold unrectified, which libsae's does not",
                           p, c->threshold);
        else if (strcmp(act, "relu") == 0)
            c->arch = SAE_ARCH_RELU;
        else if (strcmp(act, "jumprelu") == 0 || (strcmp(act, "topk") == 0 && c->threshold > 0))
            c->arch = SAE_ARCH_JUMPRELU;
        else if (strcmp(act, "topk") == 0)
            c->arch = SAE_ARCH_TOPK;
        else
            rc = sae__fail(SAE_EUNSUPPORTED, "%s: act_fn '%.40s' is not relu, topk or jumprelu",
                           p, act);
    }
    if (rc == SAE_OK && c->arch == SAE_ARCH_TOPK && (c->top_k == 0 || c->top_k > c->d_sae))
        rc = sae__fail(SAE_EFORMAT, "%s: top_k = %zu is not in [1, d_sae]", p, c->top_k);
    if (rc == SAE_OK && strcmp(norm, "dataset-wise") == 0) {
        const cJSON *avg = cJSON_GetObjectItemCaseSensitive(root, "dataset_average_activation_norm");
        c->dataset_wise = true;
        if (!cJSON_IsObject(avg))
            rc = sae__fail(SAE_EFORMAT, "%s: norm_activation is dataset-wise but "
                                        "dataset_average_activation_norm is not an object", p);
        else if ((rc = positive(avg, "in", p, &c->norm_in)) == SAE_OK)
            rc = positive(avg, "out", p, &c->norm_out);
    } else if (rc == SAE_OK && strcmp(norm, "inference") != 0 && strcmp(norm, "none") != 0) {
        rc = sae__fail(SAE_EUNSUPPORTED,
                       "%s: norm_activation '%.40s': lm_saes scales each token (or batch) and "
                       "leaves the output in that scale, which libsae does not run",
                       p, norm);
    }
    cJSON_Delete(root);
    return rc;
}

int sae__llamascope_load(const sae__safetensors *st, sae__map *map, const sae__side_text *hyper,
                         sae_model **out)
{
    *out = NULL;
    ls_config c;
    int rc = parse_hyper(hyper, &c);
    if (rc != SAE_OK)
        return rc;
    const sae__shape shape = {c.arch, c.d_model, c.d_sae, c.d_model, c.transcoder, false};
    const char *names[SAE__TENSOR_END] = {NULL};
    names[SAE_W_ENC] = "encoder.weight";
    names[SAE_W_DEC] = "decoder.weight";
    names[SAE_B_ENC] = "encoder.bias";
    names[SAE_B_DEC] = "decoder.bias";
    /* JumpReLU's one threshold is a number in hyperparams.json, not a tensor: loaded as the
     * ReLU model, then given its threshold below. */
    sae__shape base = shape;
    if (base.arch == SAE_ARCH_JUMPRELU)
        base.arch = SAE_ARCH_RELU;
    sae_model *m;
    rc = sae__model_from_st(st, map, &base, names, 1u << SAE_W_ENC | 1u << SAE_W_DEC,
                            "llama-scope", &m);
    if (rc != SAE_OK)
        return rc;
    if ((rc = sae__model_own_copy(m, SAE_W_ENC)) != SAE_OK ||
        (rc = sae__model_own_copy(m, SAE_B_ENC)) != SAE_OK ||
        (rc = sae__model_own_copy(m, SAE_W_DEC)) != SAE_OK ||
        (rc = sae__model_own_copy(m, SAE_B_DEC)) != SAE_OK)
        goto fail;
    const size_t di = m->d_in, ds = m->d_sae, dout = m->d_out;
    if (c.dataset_wise) {
        /* Computed in double and rounded once, as torch computes the Python floats. */
        const double s_in = sqrt((double)c.d_model) / c.norm_in;
        const double s_out = sqrt((double)c.d_model) / c.norm_out;
        const float ratio = (float)(s_in / s_out);
        for (size_t i = 0; i < ds; i++)
            m->b_enc[i] = (float)((double)m->b_enc[i] / s_in);
        for (size_t j = 0; j < dout; j++)
            m->b_dec[j] = (float)((double)m->b_dec[j] / s_out);
        for (size_t k = 0; k < ds * dout; k++)
            m->W_dec[k] *= ratio;
    }
    if (c.include_decoder_norm) {
        float *norms = sae__alloc(ds, sizeof(float), "decoder norms");
        if (norms == NULL) {
            rc = SAE_ENOMEM;
            goto fail;
        }
        for (size_t i = 0; i < ds; i++) {
            double sq = 0;
            for (size_t j = 0; j < dout; j++)
                sq += (double)m->W_dec[i * dout + j] * m->W_dec[i * dout + j];
            const float n = norms[i] = (float)sqrt(sq);
            if (!(n > 0.0f) || !isfinite(n)) {
                rc = sae__fail(SAE_EFORMAT,
                               "%s: sparsity_include_decoder_norm is true but feature %zu's "
                               "decoder column has norm %g (lm_saes divides by it)",
                               st->path, i, (double)n);
                free(norms);
                goto fail;
            }
            for (size_t j = 0; j < dout; j++)
                m->W_dec[i * dout + j] /= n;
            m->b_enc[i] *= n;
        }
        /* W_enc is [d_in][d_sae]: scaled a row at a time (a column at a time was 76% of a
         * 2304 x 16384 load). */
        for (size_t j = 0; j < di; j++)
            for (size_t i = 0; i < ds; i++)
                m->W_enc[j * ds + i] *= norms[i];
        free(norms);
    }
    for (size_t k = 0; k < ds * di && rc == SAE_OK; k++)
        if (!isfinite(m->W_enc[k]))
            rc = sae__fail(SAE_EFORMAT, "%s: the folded encoder overflows float", st->path);
    if (rc != SAE_OK)
        goto fail;
    m->apply_b_dec = c.apply_b_dec ? 1 : 0;
    if (c.arch == SAE_ARCH_TOPK)
        m->k = c.top_k;
    if (c.arch == SAE_ARCH_JUMPRELU) {
        m->arch = SAE_ARCH_JUMPRELU;
        if ((rc = sae__model_own_tensor(m, SAE_THRESHOLD)) != SAE_OK)
            goto fail;
        for (size_t i = 0; i < ds; i++)
            m->threshold[i] = (float)c.threshold;
    }
    sae__model_weights_changed(m);
    *out = m;
    return SAE_OK;
fail:
    sae_model_free(m);
    return rc;
}

/* ---- Llama Scope R1 and lm_saes 2025 checkpoints ------------------------------------------
 * fnlp/Llama-Scope-R1-Distill (and any lm_saes run of 2025): a folder of config.json (the
 * SAEConfig dump: d_model, expansion_factor, act_fn, norm_activation, hook_point_in/out,
 * sparsity_include_decoder_norm, apply_decoder_bias_to_pre_encoder, use_decoder_bias,
 * use_glu_encoder, sae_type) and sae_weights.safetensors, in one of two tensor layouts:
 *   A (lm_saes 2025-02 to 2025-06, the R1 release): encoder.weight [d_sae][d_model],
 *     encoder.bias, decoder.weight [d_model][d_sae], decoder.bias, log_jumprelu_threshold [d_sae]
 *   B (lm_saes from 2025-06): W_E [d_model][d_sae], b_E, W_D [d_sae][d_model], b_D,
 *     activation_function.log_jumprelu_threshold [d_sae]
 * and, for norm_activation "dataset-wise", the 0-d tensors
 * dataset_average_activation_norm.<hook point> (_get_full_state_dict writes them). The model
 * as lm_saes loads it (SparseAutoEncoder.from_pretrained: norm_activation stays dataset-wise)
 * computes, with s_in = sqrt(d_model) / norm[hook_point_in], s_out likewise, n_i = ||W_D's
 * feature-i vector||:
 *   pre = (s_in x - b_D [A, apply_decoder_bias_to_pre_encoder]) W_E + b_E
 *   f_i = pre_i if pre_i * n_i > exp(log_threshold_i)   (sparsity_include_decoder_norm; else
 *         pre_i > exp(log_threshold_i))
 *   y   = (f W_D + b_D) / s_out                         (normalize_activations, encode, decode,
 *                                                         denormalize_activations)
 * which is libsae's JumpReLU with per-feature threshold exp(log_threshold_i) / n_i, INPUT_SCALE
 * s_in and the tensors as they are: f is lm_saes's own feature_acts. A transcoder (hook points
 * differ) never divides its output by INPUT_SCALE in libsae, so W_D and b_D are divided by s_out
 * here, and a pre-encoder subtraction of b_D is folded into b_E (computed in double).
 * SAELens's llama_scope_r1_distill loader compares the bare pre with exp(log_threshold) and
 * does not scale the input: other features fire. lm_saes's Initializer in "inference" state
 * (standardize_parameters_of_dataset_norm, then transform_to_unit_decoder_norm) leaves the
 * threshold unscaled, which equals the model above only when the dataset norm is sqrt(d_model);
 * the trained model is followed. Refused by name: act_fn other than jumprelu / relu,
 * norm_activation token-wise / batch-wise, use_glu_encoder, use_decoder_bias false, sae_type
 * other than sae (crosscoders, CLTs, LoRSA). */

bool sae__llamascope_r1_like(const sae__safetensors *st)
{
    return sae__st_find(st, "log_jumprelu_threshold") != NULL ||
           sae__st_find(st, "activation_function.log_jumprelu_threshold") != NULL ||
           (sae__st_find(st, "W_E") != NULL && sae__st_find(st, "W_D") != NULL);
}

typedef struct {
    size_t d_model, d_sae; /* d_sae 0: not said */
    bool jumprelu, dataset_wise, include_decoder_norm, apply_b_dec;
    const char *hook_in, *hook_out;
} r1_config;

static int parse_r1_config(const cJSON *root, const char *p, r1_config *c)
{
    memset(c, 0, sizeof *c);
    const char *act = "relu", *norm = "dataset-wise", *type = "sae";
    size_t expansion = 0;
    bool found, has_expansion, glu = false, use_bias = true;
    c->include_decoder_norm = true; /* BaseSAEConfig's defaults of 2025 */
    int rc = sae__json_size(root, "d_model", p, &c->d_model, &found);
    if (rc == SAE_OK && (!found || c->d_model == 0))
        rc = sae__fail(SAE_EFORMAT, "%s: 'd_model' must be a whole number >= 1", p);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "expansion_factor", p, &expansion, &has_expansion);
    if (rc == SAE_OK && has_expansion && !sae__mul(c->d_model, expansion, &c->d_sae))
        rc = sae__fail(SAE_EFORMAT, "%s: d_model * expansion_factor overflows", p);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "sae_type", p, &type, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "act_fn", p, &act, &found);
    if (rc == SAE_OK)
        rc = read_shared(root, p, &norm, &c->include_decoder_norm, &c->apply_b_dec, &use_bias,
                         &glu, &c->hook_in, &c->hook_out);
    if (rc != SAE_OK)
        return rc;
    if (c->hook_out == NULL) /* BaseSAEConfig: hook_point_out defaults to hook_point_in */
        c->hook_out = c->hook_in;
    if (strcmp(type, "sae") != 0)
        return sae__fail(SAE_EUNSUPPORTED, "%s: sae_type '%.40s' is a multi-part dictionary "
                                           "libsae does not run (only 'sae' is read)", p, type);
    if (glu)
        return sae__fail(SAE_EUNSUPPORTED, "%s: use_glu_encoder (a sigmoid-gated encoder) is "
                                           "not something libsae runs", p);
    if (!use_bias)
        return sae__fail(SAE_EUNSUPPORTED, "%s: use_decoder_bias false is not read", p);
    if (strcmp(act, "jumprelu") == 0)
        c->jumprelu = true;
    else if (strcmp(act, "relu") != 0)
        return sae__fail(SAE_EUNSUPPORTED, "%s: act_fn '%.40s' is not read from an lm_saes 2025 "
                                           "checkpoint (jumprelu or relu)", p, act);
    if (strcmp(norm, "dataset-wise") == 0)
        c->dataset_wise = true;
    else if (strcmp(norm, "inference") != 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: norm_activation '%.40s': lm_saes scales each token (or batch), "
                         "which libsae does not run", p, norm);
    if (c->dataset_wise && c->hook_in == NULL)
        return sae__fail(SAE_EFORMAT, "%s: norm_activation is dataset-wise but there is no "
                                      "hook_point_in to name its dataset norm", p);
    return SAE_OK;
}

/* The one value of a tensor of one element (0-d, as lm_saes writes its scalars), as double. */
static int scalar_tensor(const sae__safetensors *st, const char *name, double *v)
{
    const sae__st_tensor *t = sae__st_find(st, name);
    if (t == NULL)
        return sae__fail(SAE_EFORMAT, "%s: norm_activation is dataset-wise but there is no "
                                      "tensor '%.200s' (lm_saes asserts it is there)",
                         st->path, name);
    if (t->count != 1 || t->ndim > 1)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%.200s' must hold one value", st->path, name);
    float f;
    sae__to_float(t->dtype, st->data + t->offset, 1, &f);
    if (!(f > 0.0f) || !isfinite(f))
        return sae__fail(SAE_EFORMAT, "%s: tensor '%.200s' = %g: a dataset norm must be a "
                                      "positive number", st->path, name, (double)f);
    *v = f;
    return SAE_OK;
}

static int dataset_norm(const sae__safetensors *st, const char *hook, double d_model, double *s)
{
    static const char prefix[] = "dataset_average_activation_norm.";
    size_t len = sizeof prefix + strlen(hook);
    char *name = malloc(len);
    if (name == NULL)
        return sae__fail(SAE_ENOMEM, "out of memory");
    snprintf(name, len, "%s%s", prefix, hook);
    double norm = 0;
    int rc = scalar_tensor(st, name, &norm);
    free(name);
    if (rc == SAE_OK)
        *s = sqrt(d_model) / norm;
    return rc;
}

int sae__llamascope_r1_load(const sae__safetensors *st, sae__map *map, const sae__side_text *config,
                            sae_model **out)
{
    *out = NULL;
    const bool layout_b = sae__st_find(st, "W_E") != NULL;
    const char *theta_name =
        layout_b ? "activation_function.log_jumprelu_threshold" : "log_jumprelu_threshold";
    if (config->text == NULL)
        return sae__fail(SAE_EFORMAT,
                         "%s: an lm_saes 2025 / Llama Scope R1 checkpoint (tensor '%s') needs the "
                         "config.json written beside it (act_fn, norm_activation, hook points), "
                         "and there is none",
                         st->path, layout_b ? "W_E" : theta_name);
    cJSON *root;
    int rc = sae__json_parse_object(config->text, config->len, config->path, &root);
    if (rc != SAE_OK)
        return rc;
    r1_config c;
    double s_in = 1.0, s_out = 1.0;
    rc = parse_r1_config(root, config->path, &c);
    if (rc == SAE_OK && c.dataset_wise)
        rc = dataset_norm(st, c.hook_in, (double)c.d_model, &s_in);
    if (rc == SAE_OK && c.dataset_wise)
        rc = dataset_norm(st, c.hook_out, (double)c.d_model, &s_out);
    const bool transcoder = rc == SAE_OK && c.hook_in != NULL && strcmp(c.hook_in, c.hook_out) != 0;
    cJSON_Delete(root); /* c's strings are not used past here */
    if (rc != SAE_OK)
        return rc;
    const sae__st_tensor *theta = sae__st_find(st, theta_name);
    const sae__st_tensor *bias = sae__st_find(st, layout_b ? "b_E" : "encoder.bias");
    if (c.jumprelu != (theta != NULL))
        return sae__fail(SAE_EFORMAT, "%s: config.json's act_fn is %s but the file %s tensor '%s'",
                         st->path, c.jumprelu ? "jumprelu" : "relu",
                         theta ? "holds" : "has no", theta_name);
    if (bias == NULL || bias->ndim != 1)
        return sae__fail(SAE_EFORMAT, "%s: no 1-D tensor '%s'", st->path,
                         layout_b ? "b_E" : "encoder.bias");
    const size_t d_sae = bias->shape[0];
    if (c.d_sae != 0 && c.d_sae != d_sae)
        return sae__fail(SAE_EFORMAT, "%s: config.json's d_model * expansion_factor is %zu but "
                                      "the encoder bias has %zu features", st->path, c.d_sae, d_sae);
    const sae__shape shape = {SAE_ARCH_RELU, c.d_model, d_sae, c.d_model, transcoder, false};
    const char *names[SAE__TENSOR_END] = {NULL};
    names[SAE_W_ENC] = layout_b ? "W_E" : "encoder.weight";
    names[SAE_W_DEC] = layout_b ? "W_D" : "decoder.weight";
    names[SAE_B_ENC] = layout_b ? "b_E" : "encoder.bias";
    names[SAE_B_DEC] = layout_b ? "b_D" : "decoder.bias";
    const unsigned flip = layout_b ? 0u : (1u << SAE_W_ENC | 1u << SAE_W_DEC);
    sae_model *m;
    rc = sae__model_from_st(st, map, &shape, names, flip, "llama-scope-r1", &m);
    if (rc != SAE_OK)
        return rc;
    const size_t di = m->d_in, dout = m->d_out;
    /* Layout B's lm_saes has no pre-encoder subtraction (the key is ignored there). */
    const bool subtract = c.apply_b_dec && !layout_b;
    if (c.jumprelu) {
        /* Per-feature threshold on pre: exp(log_threshold) / ||W_D feature row||, in double. */
        if (theta->ndim != 1 || theta->shape[0] != d_sae) {
            rc = sae__fail(SAE_EFORMAT, "%s: tensor '%s' must have shape [%zu]", st->path,
                           theta_name, d_sae);
            goto fail;
        }
        m->arch = SAE_ARCH_JUMPRELU; /* first: the threshold's size follows the architecture */
        if ((rc = sae__model_own_tensor(m, SAE_THRESHOLD)) != SAE_OK)
            goto fail;
        sae__to_float(theta->dtype, st->data + theta->offset, d_sae, m->threshold);
        for (size_t i = 0; i < d_sae; i++) {
            double n = 1.0;
            if (c.include_decoder_norm) {
                double sq = 0;
                for (size_t j = 0; j < dout; j++)
                    sq += (double)m->W_dec[i * dout + j] * m->W_dec[i * dout + j];
                n = sqrt(sq);
            }
            const double t = exp((double)m->threshold[i]) / n;
            if (!(n > 0) || !isfinite(t) || !((float)t <= FLT_MAX)) {
                rc = sae__fail(SAE_EFORMAT,
                               "%s: feature %zu: exp(%s) / ||W_D row|| = %g / %g is not a finite "
                               "threshold", st->path, i, theta_name,
                               exp((double)m->threshold[i]), n);
                goto fail;
            }
            m->threshold[i] = (float)t;
        }
    }
    if (transcoder && ((rc = sae__model_own_copy(m, SAE_B_ENC)) != SAE_OK ||
                       (rc = sae__model_own_copy(m, SAE_W_DEC)) != SAE_OK ||
                       (rc = sae__model_own_copy(m, SAE_B_DEC)) != SAE_OK))
        goto fail;
    if (transcoder && subtract) {
        /* (s_in x - b_D) W_E + b_E: libsae would subtract the rescaled b_D, so fold it. */
        for (size_t i = 0; i < d_sae; i++) {
            double acc = m->b_enc[i];
            for (size_t j = 0; j < di; j++)
                acc -= (double)m->b_dec[j] * m->W_enc[j * d_sae + i];
            m->b_enc[i] = (float)acc;
        }
    }
    if (transcoder) {
        for (size_t k = 0; k < d_sae * dout; k++)
            m->W_dec[k] = (float)((double)m->W_dec[k] / s_out);
        for (size_t j = 0; j < dout; j++)
            m->b_dec[j] = (float)((double)m->b_dec[j] / s_out);
    }
    for (size_t i = 0; i < d_sae && rc == SAE_OK; i++)
        if (!isfinite(m->b_enc[i]))
            rc = sae__fail(SAE_EFORMAT, "%s: the folded encoder bias overflows float", st->path);
    if (rc != SAE_OK)
        goto fail;
    m->apply_b_dec = subtract && !transcoder ? 1 : 0;
    if ((rc = sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, s_in)) != SAE_OK) {
        rc = sae__wrap(SAE_EFORMAT, "%s: the input scale sqrt(d_model) / dataset norm: ", st->path);
        goto fail;
    }
    sae__model_weights_changed(m);
    *out = m;
    return SAE_OK;
fail:
    sae_model_free(m);
    return rc;
}
