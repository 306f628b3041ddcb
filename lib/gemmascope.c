/* Gemma Scope 2 (google/gemma-scope-2-*): folders such as resid_post/layer_22_width_16k_l0_medium/
 * holding params.safetensors and config.json. Tensors, read as Google's own code reads them (the
 * tutorial's JumpReLUSAE; circuit-tracer's load_gemma_scope_2_transcoder agrees):
 *   w_enc [d_in][d_sae], b_enc [d_sae], w_dec [d_sae][d_out], b_dec [d_out], threshold [d_sae],
 *   affine_skip_connection [d_in][d_out] (skip transcoders only)
 *   pre = x @ w_enc + b_enc;  f = relu(pre) * (pre > threshold);  y = f @ w_dec + b_dec + x @ A
 * which is libsae's JumpReLU with APPLY_B_DEC_TO_INPUT 0 and every tensor in libsae's layout,
 * W_skip = A. SAELens's gemma_3 loader reads the skip as x @ A^T instead: on a real skip
 * transcoder the two differ (about 0.33 relative), and the authors' x @ A is the one followed.
 * Multi-layer dictionaries (clt/ cross-layer transcoders, crosscoders: params_layer_<l>.safetensors,
 * 3-D w_dec) are not one model and are refused by name. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* config.json: only the keys that change the math are read; each is optional (the weights say
 * the rest), and one that contradicts the weights is refused rather than guessed past. */
typedef struct {
    bool has_affine, affine;
    bool transcoder; /* hf_hook_point_in differs from hf_hook_point_out */
} gs2_config;

static int parse_config(const sae__side_text *c, gs2_config *g)
{
    memset(g, 0, sizeof *g);
    if (c->text == NULL)
        return SAE_OK;
    cJSON *root;
    int rc = sae__json_parse_object(c->text, c->len, c->path, &root);
    if (rc != SAE_OK)
        return rc;
    const char *arch = NULL, *in = NULL, *outp = NULL;
    bool found;
    rc = sae__json_string(root, "architecture", c->path, &arch, &found);
    /* The release is JumpReLU throughout; anything else named here is another model. */
    if (rc == SAE_OK && found && strcasecmp(arch, "jump_relu") != 0 &&
        strcasecmp(arch, "jumprelu") != 0)
        rc = sae__fail(SAE_EUNSUPPORTED,
                       "%s: architecture '%.40s' is not one libsae reads from Gemma Scope 2 "
                       "(jump_relu)", c->path, arch);
    if (rc == SAE_OK)
        rc = sae__json_bool(root, "affine_connection", c->path, &g->affine, &g->has_affine);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "hf_hook_point_in", c->path, &in, &found);
    if (rc == SAE_OK)
        rc = sae__json_string(root, "hf_hook_point_out", c->path, &outp, &found);
    if (rc == SAE_OK && in != NULL && outp != NULL)
        g->transcoder = strcmp(in, outp) != 0;
    cJSON_Delete(root);
    return rc;
}

int sae__gemmascope2_load(const sae__safetensors *st, sae__map *map, const sae__sides *sides,
                          sae_model **out)
{
    *out = NULL;
    const sae__st_tensor *we = sae__st_find(st, "w_enc"), *wd = sae__st_find(st, "w_dec");
    const sae__st_tensor *skip = sae__st_find(st, "affine_skip_connection");
    const char *name = sides != NULL && sides->file_name != NULL ? sides->file_name : "";
    if (strncmp(name, "params_layer_", 13) == 0 || (wd != NULL && wd->ndim > 2) ||
        (we != NULL && we->ndim > 2))
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: a Gemma Scope 2 multi-layer dictionary (cross-layer transcoder or "
                         "crosscoder: params_layer_<l>.safetensors, %zu-D w_dec) is not one "
                         "model libsae runs",
                         st->path, wd != NULL ? wd->ndim : 0);
    if (we == NULL || wd == NULL || we->ndim != 2 || wd->ndim != 2)
        return sae__fail(SAE_EFORMAT, "%s: Gemma Scope 2 weights need 2-D w_enc and w_dec",
                         st->path);
    gs2_config cfg;
    int rc = parse_config(sides != NULL ? &sides->config : &(sae__side_text){0}, &cfg);
    if (rc != SAE_OK)
        return rc;
    if (cfg.has_affine && cfg.affine != (skip != NULL))
        return sae__fail(SAE_EFORMAT,
                         "%s: config.json says affine_connection is %s but the weights %s "
                         "affine_skip_connection",
                         st->path, cfg.affine ? "true" : "false", skip ? "hold" : "lack");
    sae__shape shape = {SAE_ARCH_JUMPRELU, we->shape[0], we->shape[1], wd->shape[1], false,
                        skip != NULL};
    shape.transcoder = cfg.transcoder || shape.skip || shape.d_out != shape.d_in;
    const char *names[SAE__TENSOR_END] = {NULL};
    names[SAE_W_ENC] = "w_enc";
    names[SAE_W_DEC] = "w_dec";
    names[SAE_B_ENC] = "b_enc";
    names[SAE_B_DEC] = "b_dec";
    names[SAE_THRESHOLD] = "threshold";
    names[SAE_W_SKIP] = "affine_skip_connection"; /* x @ A: libsae's own layout, no transpose */
    sae_model *m;
    if ((rc = sae__model_from_st(st, map, &shape, names, 0, "gemma-scope-2", &m)) != SAE_OK)
        return rc;
    m->apply_b_dec = 0; /* the tutorial encodes the raw input */
    *out = m;
    return SAE_OK;
}
