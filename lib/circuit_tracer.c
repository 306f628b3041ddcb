/* circuit-tracer's per-layer transcoders (safety-research/circuit-tracer,
 * transcoder/single_layer_transcoder.py: load_relu_transcoder and SingleLayerTranscoder.
 * to_safetensors; transcoder/activation_functions.py): layer_<l>.safetensors, one per layer,
 * with no cfg.json beside it. Its tensors and math:
 *   W_enc [d_sae][d_in]     pre = x @ W_enc^T + b_enc        (F.linear; no b_dec subtraction)
 *   W_dec [d_sae][d_out]    today; [d_out][d_sae] in the June 2025 release, whose loader
 *                           transposed it: both are read, told apart by b_enc and b_dec's sizes
 *   W_skip [d_out][d_in]    y += x @ W_skip^T
 *   activation_function.threshold [d_sae]: JumpReLU f = pre * (pre > threshold), else ReLU
 * Its JumpReLU keeps pre where pre > threshold with no ReLU: libsae's max(pre, 0) * (pre >
 * threshold) is the same function exactly when no threshold is negative (pre > t >= 0 implies
 * pre > 0), so a negative threshold is refused. Its TopK (x * gate of the k largest, no ReLU)
 * keeps negative values when fewer than k are positive, which libsae's TopK never does: such a
 * file (a `k` or `log_thresholds` entry, which its own loader rejects too) is refused by name.
 *
 * A transcoder set (utils/hf_utils.py load_transcoder_from_hub, load_transcoders) is a folder of
 * config.yaml and layer_<l>.safetensors; the YAML's keys that change the math are read with
 * libyaml (the only YAML in any format libsae reads, and no YAML parser is written here):
 *   model_kind   transcoder_set (or absent: the June 2025 local configs); cross_layer_transcoder
 *                and anything else are refused by name
 *   activation   topk (with k): circuit-tracer's TopK, refused as above (the layer files of such
 *                a set hold no k, so without the YAML they would load as ReLU); relu: F.relu,
 *                and a file holding a threshold is refused (its strict load_state_dict refuses
 *                the key); absent or anything else: the weights decide (threshold: JumpReLU)
 * A folder holding the YAML is N models, not one: it is refused, saying which file to load. */
#include "formats.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

typedef struct {
    char model_kind[64], activation[32], k[32]; /* "" when absent */
} ct_yaml;

/* The scalar value of the top-level key, copied into out (size n); SAE_OK leaving out alone
 * when the key is absent. A repeated key is refused (PyYAML would take the last silently). */
static int yaml_key(yaml_document_t *doc, yaml_node_t *root, const char *key, const char *path,
                    char *out, size_t n)
{
    bool seen = false;
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top;
         pr++) {
        yaml_node_t *k = yaml_document_get_node(doc, pr->key);
        yaml_node_t *v = yaml_document_get_node(doc, pr->value);
        if (k == NULL || k->type != YAML_SCALAR_NODE || k->data.scalar.length != strlen(key) ||
            memcmp(k->data.scalar.value, key, k->data.scalar.length) != 0)
            continue;
        if (seen)
            return sae__fail(SAE_EFORMAT, "%s: key '%s' appears twice", path, key);
        seen = true;
        if (v == NULL || v->type != YAML_SCALAR_NODE)
            return sae__fail(SAE_EFORMAT, "%s: '%s' is not a single value", path, key);
        if (v->data.scalar.length >= n || memchr(v->data.scalar.value, '\0',
                                                  v->data.scalar.length) != NULL)
            return sae__fail(SAE_EFORMAT, "%s: '%s' is not a short name", path, key);
        memcpy(out, v->data.scalar.value, v->data.scalar.length);
        out[v->data.scalar.length] = '\0';
    }
    return SAE_OK;
}

static int parse_yaml(const sae__side_text *y, ct_yaml *c)
{
    memset(c, 0, sizeof *c);
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser))
        return sae__fail(SAE_ENOMEM, "out of memory");
    yaml_parser_set_input_string(&parser, (const unsigned char *)y->text, y->len);
    int rc = SAE_OK;
    if (!yaml_parser_load(&parser, &doc)) {
        rc = sae__fail(parser.error == YAML_MEMORY_ERROR ? SAE_ENOMEM : SAE_EFORMAT,
                       "%s: not YAML: %s at line %zu", y->path,
                       parser.problem ? parser.problem : "error",
                       (size_t)parser.problem_mark.line + 1);
        yaml_parser_delete(&parser);
        return rc;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root == NULL || root->type != YAML_MAPPING_NODE)
        rc = sae__fail(SAE_EFORMAT, "%s: not a YAML mapping of settings", y->path);
    if (rc == SAE_OK)
        rc = yaml_key(&doc, root, "model_kind", y->path, c->model_kind, sizeof c->model_kind);
    if (rc == SAE_OK)
        rc = yaml_key(&doc, root, "activation", y->path, c->activation, sizeof c->activation);
    if (rc == SAE_OK)
        rc = yaml_key(&doc, root, "k", y->path, c->k, sizeof c->k);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (rc != SAE_OK)
        return rc;
    if (c->model_kind[0] != '\0' && strcmp(c->model_kind, "transcoder_set") != 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: model_kind '%s' (circuit-tracer%s) is not a set of single-layer "
                         "transcoders, which is what libsae reads",
                         y->path, c->model_kind,
                         strcmp(c->model_kind, "cross_layer_transcoder") == 0
                             ? "'s cross-layer transcoder: each feature writes to every later "
                               "layer"
                             : "");
    if (strcmp(c->activation, "topk") == 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: activation topk (k = %s): circuit-tracer's TopK keeps the k largest "
                         "values with no ReLU (negative ones too); libsae's TopK rectifies, so it "
                         "is not run",
                         y->path, c->k[0] ? c->k : "not given");
    return SAE_OK;
}

int sae__circuit_tracer_set_refusal(const char *dir, const sae__side_text *yaml)
{
    ct_yaml c;
    int rc = parse_yaml(yaml, &c);
    if (rc != SAE_OK)
        return rc;
    return sae__fail(SAE_EUNSUPPORTED,
                     "%s: a circuit-tracer transcoder set (%s): one transcoder per layer, each "
                     "its own model; load one layer's file (%s/layer_<l>.safetensors, or the "
                     "file its 'transcoders' list names for that layer)",
                     dir, yaml->path, dir);
}

bool sae__circuit_tracer_like(const sae__safetensors *st)
{
    if (sae__st_find(st, "activation_function.threshold") != NULL)
        return true;
    const sae__st_tensor *we = sae__st_find(st, "W_enc"), *be = sae__st_find(st, "b_enc");
    /* SAELens stores W_enc [d_in][d_sae]; circuit-tracer the transpose. A square W_enc cannot
     * tell them apart and stays SAELens's. */
    return we != NULL && be != NULL && we->ndim == 2 && be->ndim == 1 &&
           we->shape[0] == be->shape[0] && we->shape[1] != be->shape[0];
}

int sae__circuit_tracer_load(const sae__safetensors *st, sae__map *map, const sae__side_text *yaml,
                             sae_model **out)
{
    *out = NULL;
    ct_yaml c = {{0}, {0}, {0}};
    if (yaml != NULL && yaml->text != NULL) {
        int rc = parse_yaml(yaml, &c);
        if (rc != SAE_OK)
            return rc;
        if (strcmp(c.activation, "relu") == 0 &&
            sae__st_find(st, "activation_function.threshold") != NULL)
            return sae__fail(SAE_EFORMAT,
                             "%s: %s says activation relu, but the file holds "
                             "activation_function.threshold (circuit-tracer's load_state_dict "
                             "refuses the key)",
                             st->path, yaml->path);
    }
    static const char *const topk[] = {"k", "activation_function.k", "top_k", "log_thresholds"};
    for (size_t i = 0; i < sizeof topk / sizeof topk[0]; i++)
        if (sae__st_find(st, topk[i]) != NULL)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: circuit-tracer transcoder with '%s': its TopK keeps negative "
                             "values (no ReLU) and its loader rejects the entry; libsae's TopK "
                             "rectifies, so it is not run",
                             st->path, topk[i]);
    const sae__st_tensor *we = sae__st_find(st, "W_enc"), *wd = sae__st_find(st, "W_dec");
    const sae__st_tensor *be = sae__st_find(st, "b_enc"), *bd = sae__st_find(st, "b_dec");
    if (we == NULL || wd == NULL || be == NULL || bd == NULL || we->ndim != 2 || wd->ndim != 2 ||
        be->ndim != 1 || bd->ndim != 1)
        return sae__fail(SAE_EFORMAT,
                         "%s: a circuit-tracer transcoder needs 2-D W_enc and W_dec and 1-D "
                         "b_enc and b_dec",
                         st->path);
    const size_t d_sae = be->shape[0], d_out = bd->shape[0], d_in = we->shape[1];
    unsigned transpose = 1u << SAE_W_ENC | 1u << SAE_W_SKIP;
    if (wd->shape[0] == d_out && wd->shape[1] == d_sae && d_out != d_sae)
        transpose |= 1u << SAE_W_DEC; /* the June 2025 release's [d_out][d_sae] */
    else if (d_out == d_sae)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: circuit-tracer W_dec is square (%zu x %zu): the release it comes "
                         "from ([d_sae][d_out] or [d_out][d_sae]) cannot be told",
                         st->path, d_sae, d_out);
    const bool jump = sae__st_find(st, "activation_function.threshold") != NULL;
    const sae__shape shape = {jump ? SAE_ARCH_JUMPRELU : SAE_ARCH_RELU, d_in, d_sae, d_out, true,
                              sae__st_find(st, "W_skip") != NULL};
    const char *names[SAE__TENSOR_END] = {NULL};
    names[SAE_W_ENC] = "W_enc";
    names[SAE_W_DEC] = "W_dec";
    names[SAE_B_ENC] = "b_enc";
    names[SAE_B_DEC] = "b_dec";
    names[SAE_THRESHOLD] = "activation_function.threshold";
    names[SAE_W_SKIP] = "W_skip";
    sae_model *m;
    int rc = sae__model_from_st(st, map, &shape, names, transpose, "circuit-tracer", &m);
    if (rc != SAE_OK)
        return rc;
    m->apply_b_dec = 0;
    for (size_t i = 0; jump && i < d_sae; i++)
        if (m->threshold[i] < 0.0f) {
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: activation_function.threshold[%zu] = %g is negative: "
                           "circuit-tracer's JumpReLU then keeps negative values, which "
                           "libsae's (rectifying) JumpReLU does not",
                           st->path, i, (double)m->threshold[i]);
            sae_model_free(m);
            return rc;
        }
    *out = m;
    return SAE_OK;
}
