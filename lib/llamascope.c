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
#include <math.h>
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
        rc = sae__json_string(root, "norm_activation", p, &norm, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "sparsity_include_decoder_norm", p, &c->include_decoder_norm,
                            &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "apply_decoder_bias_to_pre_encoder", p, &c->apply_b_dec, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "use_decoder_bias", p, &use_bias, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "use_glu_encoder", p, &glu, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "hook_point_in", p, &in, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "hook_point_out", p, &outp, &found);
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
    static const char *const r1[] = {"log_jumprelu_threshold",
                                     "activation_function.log_jumprelu_threshold", "W_E"};
    for (size_t i = 0; i < sizeof r1 / sizeof r1[0]; i++)
        if (sae__st_find(st, r1[i]) != NULL)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: tensor '%s': a Llama Scope R1 / lm_saes 2025 checkpoint, whose "
                             "threshold is compared with pre * ||W_D row||: not read yet",
                             st->path, r1[i]);
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
    for (size_t i = 0; c.include_decoder_norm && i < ds; i++) {
        double sq = 0;
        for (size_t j = 0; j < dout; j++)
            sq += (double)m->W_dec[i * dout + j] * m->W_dec[i * dout + j];
        const float n = (float)sqrt(sq);
        if (!(n > 0.0f) || !isfinite(n)) {
            rc = sae__fail(SAE_EFORMAT,
                           "%s: sparsity_include_decoder_norm is true but feature %zu's decoder "
                           "column has norm %g (lm_saes divides by it)", st->path, i, (double)n);
            goto fail;
        }
        for (size_t j = 0; j < dout; j++)
            m->W_dec[i * dout + j] /= n;
        for (size_t j = 0; j < di; j++)
            m->W_enc[j * ds + i] *= n;
        m->b_enc[i] *= n;
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
