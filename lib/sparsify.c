/* EleutherAI sparsify (formerly "sae"): a folder of cfg.json (SparseCoderConfig + d_in) and
 * sae.safetensors (the module's state dict, safetensors.torch.save_model). Read as sparsify's
 * own SparseCoder.load_from_disk, encode and forward read it (sparsify/sparse_coder.py,
 * sparsify/fused_encoder.py, sparsify/config.py; 1.3):
 *   pre = ReLU((x - (transcode ? 0 : b_dec)) @ encoder.weight^T + encoder.bias)
 *   topk: the k largest of pre;  groupmax: the largest of each of k groups of num_latents / k
 *   y = f @ W_dec + b_dec (+ x @ W_skip^T with skip_connection)
 * ReLU before the selection keeps the same values as libsae's TopK (ReLU after), since a
 * negative pre-activation becomes 0 either way. Every tensor is [.., d_in]: SparseCoder sizes
 * W_dec, b_dec and W_skip by d_in even for a transcoder, so d_out = d_in. */
#include "formats.h"

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
    if (rc == SAE_OK && strcmp(activation, "topk") != 0 && strcmp(activation, "groupmax") != 0)
        rc = sae__fail(SAE_EFORMAT, "%s: activation '%.40s' is neither topk nor groupmax", path,
                       activation);
    cfg->topk = strcmp(activation, "topk") == 0;
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "transcode", path, &cfg->transcode, &found);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "skip_connection", path, &cfg->skip_connection, &found);
    /* Settings that change what the coder computes and that libsae does not run. "signed"
     * (the sae package, June 2024) selected the k largest |pre| without ReLU and kept their
     * signs; embed_skip and gram_lookup are refused for the same reason, should a config
     * ask for them. multi_topk and normalize_decoder only shape training (the Multi-TopK
     * loss, unit-norm decoder rows): inference is plain topk. */
    static const char *const extras[] = {"signed", "embed_skip", "gram_lookup"};
    for (size_t i = 0; i < sizeof extras / sizeof extras[0] && rc == SAE_OK; i++) {
        flag = false;
        rc = sae__json_bool(root, extras[i], path, &flag, &found);
        if (rc == SAE_OK && flag)
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: '%s' is true: %s, which libsae does not run", path, extras[i],
                           i == 0 ? "signed codes (the k largest |pre|, negative values kept)"
                                  : "a term beyond the sparse coder");
    }
    cJSON_Delete(root);
    return rc;
}

int sae__sparsify_load(const sae__safetensors *st, sae__map *map, const sae__sparsify_cfg *cfg,
                       sae_model **out)
{
    *out = NULL;
    const char *path = st->path;
    if (!cfg->skip_connection && sae__st_find(st, "W_skip") != NULL)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: tensor 'W_skip' but skip_connection is not true in cfg.json: the "
                         "skip term would be dropped",
                         path);
    size_t d_in = cfg->d_in, d_sae = cfg->num_latents;
    /* SparseCoder: num_latents = cfg.num_latents or d_in * expansion_factor. */
    if (d_sae == 0 && !sae__mul(d_in, cfg->expansion_factor, &d_sae))
        return sae__fail(SAE_EFORMAT, "%s: d_in x expansion_factor overflows", path);
    if (d_sae == 0)
        return sae__fail(SAE_EFORMAT, "%s: num_latents and expansion_factor are both 0", path);
    /* groupmax: preacts.unflatten(-1, (k, -1)) needs k groups of equal size. */
    if (!cfg->topk && (cfg->k > d_sae || d_sae % cfg->k != 0))
        return sae__fail(SAE_EFORMAT,
                         "%s: activation 'groupmax' with k = %zu groups of %zu latents: k must "
                         "divide num_latents",
                         path, cfg->k, d_sae);
    /* encoder.weight is nn.Linear's [d_sae][d_in]: the transpose of W_enc; W_skip is used as
     * x @ W_skip.mT, so it is stored [d_out][d_in]: the transpose of libsae's. */
    const char *const names[SAE__TENSOR_END] = {
        NULL, "encoder.weight", "W_dec", "encoder.bias", "b_dec", NULL, "W_skip"};
    const bool kind = cfg->transcode || cfg->skip_connection;
    const sae__shape shape = {cfg->topk ? SAE_ARCH_TOPK : SAE_ARCH_GROUPMAX, d_in, d_sae, d_in,
                              kind, cfg->skip_connection};
    sae_model *m;
    int rc = sae__model_from_st(st, map, &shape, names, 1u << SAE_W_ENC | 1u << SAE_W_SKIP,
                                "sparsify", &m);
    if (rc != SAE_OK)
        return rc;
    /* SparseCoder.encode subtracts b_dec unless cfg.transcode: a skip-connection SAE (not a
     * transcoder) still does, which libsae allows since its d_out = d_in. */
    rc = sae_model_set_param(m, SAE_PARAM_K, (double)cfg->k);
    if (rc == SAE_OK)
        rc = sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, cfg->transcode ? 0 : 1);
    if (rc != SAE_OK) {
        sae_model_free(m);
        return sae__wrap(SAE_EFORMAT, "%s: ", path);
    }
    *out = m;
    return SAE_OK;
}
