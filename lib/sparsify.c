/* EleutherAI sparsify (formerly "sae"): a folder of cfg.json (SparseCoderConfig + d_in) and
 * sae.safetensors (the module's state dict). Read as sparsify's own SparseCoder.load_from_disk
 * and encode read it (sparsify/sparse_coder.py, sparsify/fused_encoder.py):
 *   pre = ReLU((x - b_dec) @ encoder.weight^T + encoder.bias), the k largest kept,
 *   x_hat = f @ W_dec + b_dec.
 * ReLU before the selection keeps the same values as libsae's TopK (ReLU after), since a
 * negative pre-activation becomes 0 either way. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <string.h>

int sae__sparsify_cfg_parse(const char *text, size_t len, const char *path, sae__sparsify_cfg *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    /* SparseCoderConfig's defaults, for keys an older file lacks. */
    cfg->k = 32;
    cfg->expansion_factor = 32;
    cfg->topk = true;
    cJSON *root;
    int rc = sae__json_parse_object(text, len, path, &root);
    if (rc != SAE_OK)
        return rc;
    bool found, flag = false;
    const char *activation = "topk";
    rc = sae__json_size(root, "d_in", path, &cfg->d_in, &found);
    if (rc == SAE_OK && (!found || cfg->d_in == 0))
        rc = sae__fail(SAE_EFORMAT, "%s: 'd_in' must be a whole number >= 1", path);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "k", path, &cfg->k, &found);
    if (rc == SAE_OK && (cfg->k == 0 || cfg->k > UINT32_MAX))
        rc = sae__fail(SAE_EFORMAT, "%s: 'k' = %zu is not a count >= 1", path, cfg->k);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "num_latents", path, &cfg->num_latents, &found);
    if (rc == SAE_OK)
        rc = sae__json_size(root, "expansion_factor", path, &cfg->expansion_factor, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "activation", path, &activation, &found);
    if (rc == SAE_OK && strcmp(activation, "topk") != 0) {
        if (strcmp(activation, "groupmax") == 0)
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: activation 'groupmax' (the max of each of k groups) is not "
                           "supported; only 'topk'",
                           path);
        else
            rc = sae__fail(SAE_EFORMAT, "%s: activation '%.40s' is neither topk nor groupmax",
                           path, activation);
    }
    /* Settings that change what the coder computes beyond an SAE. */
    static const char *const extras[] = {"transcode", "skip_connection", "embed_skip",
                                         "gram_lookup"};
    for (size_t i = 0; i < sizeof extras / sizeof extras[0] && rc == SAE_OK; i++) {
        flag = false;
        rc = sae__json_bool(root, extras[i], path, &flag, &found);
        if (rc == SAE_OK && flag)
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: '%s' is true: a transcoder or skip connection, not an SAE "
                           "libsae runs",
                           path, extras[i]);
        if (i == 0)
            cfg->transcode = flag;
        if (i == 1)
            cfg->skip_connection = flag;
    }
    cJSON_Delete(root);
    return rc;
}

int sae__sparsify_load(const sae__safetensors *st, sae__map *map, const sae__sparsify_cfg *cfg,
                       sae_model **out)
{
    *out = NULL;
    const char *path = st->path;
    if (sae__st_find(st, "W_skip") != NULL)
        return sae__fail(SAE_EUNSUPPORTED, "%s: a skip connection (tensor 'W_skip') is not "
                                           "supported", path);
    size_t d_in = cfg->d_in, d_sae = cfg->num_latents;
    /* SparseCoder: num_latents = cfg.num_latents or d_in * expansion_factor. */
    if (d_sae == 0 && !sae__mul(d_in, cfg->expansion_factor, &d_sae))
        return sae__fail(SAE_EFORMAT, "%s: d_in x expansion_factor overflows", path);
    if (d_sae == 0)
        return sae__fail(SAE_EFORMAT, "%s: num_latents and expansion_factor are both 0", path);
    /* encoder.weight is nn.Linear's [d_sae][d_in]: the transpose of W_enc. */
    const char *const names[SAE__TENSOR_END] = {NULL, "encoder.weight", "W_dec", "encoder.bias",
                                                "b_dec"};
    sae_model *m;
    const sae__shape shape = {SAE_ARCH_TOPK, d_in, d_sae, d_in, false, false};
    int rc = sae__model_from_st(st, map, &shape, names, 1u << SAE_W_ENC, "sparsify", &m);
    if (rc != SAE_OK)
        return rc;
    if ((rc = sae_model_set_param(m, SAE_PARAM_K, (double)cfg->k)) != SAE_OK) {
        sae_model_free(m);
        return sae__wrap(SAE_EFORMAT, "%s: ", path);
    }
    /* APPLY_B_DEC_TO_INPUT keeps its default 1: sparsify's encode always subtracts b_dec
     * (transcoders, which do not, are refused above). */
    *out = m;
    return SAE_OK;
}
