/* Dictionaries published as PyTorch state dicts (torch.save zip files, read by torch.c), each
 * interpreted as its publisher's own loading code does:
 *   - saprmarks/dictionary_learning's ae.pt (+ the config.json written beside it): AutoEncoder,
 *     AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder,
 *     MatryoshkaBatchTopKSAE (dictionary.py, trainers/ *.py, utils.load_dictionary);
 *   - openai/sparse_autoencoder's Autoencoder state dicts (model.py);
 *   - Goodfire's releases: the Llama SAEs' SparseAutoEncoder (model-card class) and the
 *     DeepSeek-R1 SAEs' BatchTopKTiedSAE (goodfire-ai/r1-interpretability sae.py).
 * The layout is recognized by its keys; every entry of the file must belong to it (as torch's
 * strict load_state_dict demands), so a file is never loaded with a term dropped. docs/formats.md
 * gives each layout field by field, with where SAELens reads it differently. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zip.h>

/* The k of each Goodfire R1 release, from its folder (sae.py: load_math_sae, load_logic_sae). */
#define GOODFIRE_R1_FILE "DeepSeek-R1-SAE-l37.pt"

typedef struct {
    const char *format;     /* "<publisher>/<class>": sae_model_format */
    sae_arch arch;
    const char *w_enc, *b_enc, *w_dec, *b_dec, *threshold, *r_mag, *b_mag;
    bool enc_t;             /* w_enc is stored [d_sae][d_in] (nn.Linear): transposed */
    bool dec_t;             /* w_dec is stored [d_in][d_sae] (nn.Linear): transposed */
    int apply_b_dec;
    const char *extra[9];   /* the other entries the class saves (settings, statistics) */
} layout;

enum {
    DL_AUTOENCODER = 0, DL_AUTOENCODER_NEW, DL_TOPK, DL_BATCHTOPK, DL_JUMPRELU, DL_MATRYOSHKA,
    DL_GATED, OPENAI, OPENAI_TIED, GOODFIRE_LLAMA, GOODFIRE_R1, N_LAYOUTS
};

static const layout layouts[N_LAYOUTS] = {
    [DL_AUTOENCODER] = {"dictionary_learning/AutoEncoder", SAE_ARCH_RELU, "encoder.weight",
                        "encoder.bias", "decoder.weight", "bias", NULL, NULL, NULL, true, true, 1,
                        {NULL}},
    [DL_AUTOENCODER_NEW] = {"dictionary_learning/AutoEncoderNew", SAE_ARCH_RELU, "encoder.weight",
                            "encoder.bias", "decoder.weight", "decoder.bias", NULL, NULL, NULL,
                            true, true, 0, {NULL}},
    [DL_TOPK] = {"dictionary_learning/AutoEncoderTopK", SAE_ARCH_TOPK, "encoder.weight",
                 "encoder.bias", "decoder.weight", "b_dec", NULL, NULL, NULL, true, true, 1,
                 {"k", "threshold", NULL}},
    [DL_BATCHTOPK] = {"dictionary_learning/BatchTopKSAE", SAE_ARCH_BATCHTOPK, "encoder.weight",
                      "encoder.bias", "decoder.weight", "b_dec", NULL, NULL, NULL, true, true, 1,
                      {"k", "threshold", NULL}},
    [DL_JUMPRELU] = {"dictionary_learning/JumpReluAutoEncoder", SAE_ARCH_JUMPRELU, "W_enc",
                     "b_enc", "W_dec", "b_dec", "threshold", NULL, NULL, false, false, 0, {NULL}},
    [DL_MATRYOSHKA] = {"dictionary_learning/MatryoshkaBatchTopKSAE", SAE_ARCH_BATCHTOPK, "W_enc",
                       "b_enc", "W_dec", "b_dec", NULL, NULL, NULL, false, false, 1,
                       {"k", "threshold", "group_sizes", NULL}},
    [DL_GATED] = {"dictionary_learning/GatedAutoEncoder", SAE_ARCH_GATED, "encoder.weight",
                  "gate_bias", "decoder.weight", "decoder_bias", NULL, "r_mag", "mag_bias", true,
                  true, 1, {NULL}},
    [OPENAI] = {"openai/Autoencoder", SAE_ARCH_RELU, "encoder.weight", "latent_bias",
                "decoder.weight", "pre_bias", NULL, NULL, NULL, true, true, 1,
                {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square",
                 "activation", "activation_state_dict.k", "activation_state_dict.postact_fn",
                 "activation.k", "activation.postact_fn", NULL}},
    /* tied=True: the decoder is TiedTranspose(encoder), saved as decoder.linear.weight, the
     * encoder's [d_sae][d_in] weight, whose rows are the decoder's. */
    [OPENAI_TIED] = {"openai/Autoencoder", SAE_ARCH_RELU, "encoder.weight", "latent_bias",
                     "decoder.linear.weight", "pre_bias", NULL, NULL, NULL, true, false, 1,
                     {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square",
                      "activation", "activation_state_dict.k", "activation_state_dict.postact_fn",
                      "activation.k", "activation.postact_fn", NULL}},
    [GOODFIRE_LLAMA] = {"goodfire/SparseAutoEncoder", SAE_ARCH_RELU, "encoder_linear.weight",
                        "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias",
                        NULL, NULL, NULL, true, true, 0, {NULL}},
    /* One W [d_in][d_sae]: the encoder is x @ W, the decoder f @ W.T. */
    [GOODFIRE_R1] = {"goodfire/BatchTopKTiedSAE", SAE_ARCH_TOPK, "W", "b_enc", "W", "b_dec", NULL,
                     NULL, NULL, false, true, 0, {NULL}},
};

static bool has(const sae__torch_dict *d, const char *name)
{
    return sae__torch_find(d, name) != NULL || sae__torch_find_scalar(d, name) != NULL;
}

/* The first few entries of the file, for messages: "'a', 'b', ..." */
static void first_entries(const sae__torch_dict *d, char *buf, size_t size)
{
    size_t used = 0, shown = 0, total = d->n_tensors + d->n_scalars;
    buf[0] = '\0';
    for (size_t i = 0; i < total && shown < 6 && used < size; i++, shown++) {
        const char *name = i < d->n_tensors ? d->tensors[i].name
                                            : d->scalars[i - d->n_tensors].name;
        int w = snprintf(buf + used, size - used, "%s'%.40s'", shown ? ", " : "", name);
        if (w > 0)
            used += (size_t)w;
    }
    if (total > shown && used < size)
        snprintf(buf + used, size - used, ", ...");
}

/* Which layout the keys are; -1 (with the error set) when none. dict_class is the config.json's
 * trainer.dict_class (NULL when there is none), which alone tells AutoEncoderTopK from
 * BatchTopKSAE: they save the same keys and encode differently. */
static int identify(const sae__torch_dict *d, const char *dict_class, const char *cfg_path)
{
    if (has(d, "encoder_linear.weight"))
        return GOODFIRE_LLAMA;
    if (has(d, "W") && !has(d, "W_enc"))
        return GOODFIRE_R1;
    if (has(d, "pre_bias") || has(d, "latent_bias"))
        return has(d, "decoder.linear.weight") ? OPENAI_TIED : OPENAI;
    if (has(d, "gate_bias") || has(d, "r_mag") || has(d, "mag_bias"))
        return DL_GATED;
    if (has(d, "group_sizes"))
        return DL_MATRYOSHKA;
    if (has(d, "W_enc"))
        return DL_JUMPRELU;
    if (has(d, "encoder.weight") && has(d, "bias"))
        return DL_AUTOENCODER;
    if (has(d, "encoder.weight") && has(d, "b_dec")) {
        if (dict_class != NULL && strcmp(dict_class, "AutoEncoderTopK") == 0)
            return DL_TOPK;
        if (dict_class != NULL && strcmp(dict_class, "BatchTopKSAE") == 0)
            return DL_BATCHTOPK;
        if (dict_class == NULL)
            sae__fail(SAE_EFORMAT,
                      "%s: a dictionary_learning AutoEncoderTopK or BatchTopKSAE (keys "
                      "encoder.weight, b_dec, k, threshold): the two save the same keys and "
                      "encode differently (per-token top k, or the global threshold), and only "
                      "the config.json written beside ae.pt says which (trainer.dict_class); "
                      "there is none",
                      d->path);
        else
            sae__fail(SAE_EFORMAT,
                      "%s: config.json says trainer.dict_class '%.60s', but the file holds the "
                      "keys of an AutoEncoderTopK or BatchTopKSAE",
                      cfg_path, dict_class);
        return -1;
    }
    if (has(d, "encoder.weight") && has(d, "decoder.bias"))
        return DL_AUTOENCODER_NEW;
    char names[320];
    first_entries(d, names, sizeof names);
    bool backup = has(d, "step");
    for (size_t i = 0; backup && i < d->n_tensors; i++)
        backup = strncmp(d->tensors[i].name, "ae.", 3) == 0 ||
                 strncmp(d->tensors[i].name, "optimizer.", 10) == 0;
    if (backup && d->n_tensors > 0) {
        sae__fail(SAE_EFORMAT,
                  "%s: a dictionary_learning training backup (step, ae.*, optimizer.*), not the "
                  "ae.pt a finished training run writes: %s",
                  d->path, names);
        return -1;
    }
    sae__fail(SAE_EFORMAT,
              "%s: a PyTorch file, but not a dictionary libsae knows (dictionary_learning, "
              "OpenAI sparse_autoencoder, Goodfire); found %zu tensor(s) and %zu other "
              "value(s)%s%s",
              d->path, d->n_tensors, d->n_scalars, names[0] ? ": " : "", names);
    return -1;
}

/* Every entry of the file must belong to the layout (torch's strict load_state_dict). */
static int check_entries(const sae__torch_dict *d, const layout *l, const char *cls)
{
    size_t total = d->n_tensors + d->n_scalars;
    for (size_t i = 0; i < total; i++) {
        const char *name = i < d->n_tensors ? d->tensors[i].name
                                            : d->scalars[i - d->n_tensors].name;
        const char *known[] = {l->w_enc, l->b_enc, l->w_dec, l->b_dec, l->threshold, l->r_mag,
                               l->b_mag};
        bool ok = false;
        for (size_t j = 0; j < sizeof known / sizeof known[0] && !ok; j++)
            ok = known[j] != NULL && strcmp(known[j], name) == 0;
        for (size_t j = 0; l->extra[j] != NULL && !ok; j++)
            ok = strcmp(l->extra[j], name) == 0;
        if (!ok)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: entry '%.80s' is not part of a %s (whose load_state_dict "
                             "would refuse it): not loaded with a term dropped",
                             d->path, name, cls);
    }
    return SAE_OK;
}

/* The tensor name, a float tensor of shape (d0) or (d0, d1) (d1 = 0: 1-D). */
static int expect(const sae__torch_dict *d, const char *name, size_t d0, size_t d1,
                  const sae__torch_tensor **out)
{
    const sae__torch_tensor *t = sae__torch_find(d, name);
    if (t == NULL)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' is missing", d->path, name);
    if (t->dtype > SAE__TORCH_F64)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' holds %s, not floats", d->path, name,
                         sae__torch_dtype_name(t->dtype));
    size_t ndim = d1 ? 2 : 1;
    if (t->ndim != ndim || t->shape[0] != d0 || (d1 && t->shape[1] != d1)) {
        char got[96] = "";
        size_t used = 0;
        for (size_t i = 0; i < t->ndim && used < sizeof got; i++) {
            int w = snprintf(got + used, sizeof got - used, "%s%zu", i ? ", " : "", t->shape[i]);
            if (w > 0)
                used += (size_t)w;
        }
        if (d1)
            return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has shape [%s], expected [%zu, %zu]",
                             d->path, name, got, d0, d1);
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has shape [%s], expected [%zu]", d->path,
                         name, got, d0);
    }
    *out = t;
    return SAE_OK;
}

/* Fills model tensor t from src: as stored, or (transpose) a [rows][cols] source into the
 * model's [cols][rows]. Every value must be finite. */
static int fill(sae_model *m, sae_tensor t, const sae__torch_dict *d,
                const sae__torch_tensor *src, bool transpose)
{
    int rc = sae__model_own_tensor_uninit(m, t);
    if (rc != SAE_OK)
        return rc;
    float *dst = *sae__model_tensor_slot(m, t);
    rc = transpose ? sae__torch_tensor_to_float_t(d, src, dst)
                   : sae__torch_tensor_to_float(d, src, dst);
    /* dst is in the model's layout; messages name [row][col] in the file's. */
    const size_t rows = src->ndim == 2 ? src->shape[0] : src->count;
    const size_t cols = src->ndim == 2 ? src->shape[1] : 1;
    for (size_t k = 0; rc == SAE_OK && k < src->count; k++)
        if (!isfinite(dst[k])) {
            const size_t r = transpose ? k % rows : k / cols, c = transpose ? k / rows : k % cols;
            if (src->ndim == 2)
                rc = sae__fail(SAE_EFORMAT,
                               "%s: tensor '%s'[%zu][%zu] is %g: weights must be finite",
                               d->path, src->name, r, c, (double)dst[k]);
            else
                rc = sae__fail(SAE_EFORMAT, "%s: tensor '%s'[%zu] is %g: weights must be finite",
                               d->path, src->name, k, (double)dst[k]);
        }
    if (rc == SAE_OK && src->dtype != SAE__TORCH_F32)
        m->dtype = (sae__dtype)src->dtype;
    return rc;
}

/* A whole number >= 1 called name (an int, or a one-element tensor). */
static int whole(const sae__torch_dict *d, const char *name, size_t *out)
{
    double v;
    int rc = sae__torch_number(d, name, &v);
    if (rc != SAE_OK)
        return rc;
    if (!(v >= 1 && v <= (double)UINT32_MAX && v == floor(v)))
        return sae__fail(SAE_EFORMAT, "%s: '%s' = %g is not a count (a whole number >= 1)",
                         d->path, name, v);
    *out = (size_t)v;
    return SAE_OK;
}

/* dictionary_learning's AutoEncoder.from_pretrained(normalize_decoder=True), its default (and
 * what utils.load_dictionary calls): unless every decoder column already has norm 1 (torch's
 * allclose: |n - 1| <= 1e-8 + 1e-5), W_dec[i] /= n_i, W_enc[:, i] *= n_i, b_enc[i] *= n_i. The
 * reconstruction is unchanged; each code is scaled by its decoder norm. */
static int normalize_decoder(sae_model *m, const char *path)
{
    float *n = sae__alloc(m->d_sae, sizeof(float), "decoder norms");
    if (n == NULL)
        return SAE_ENOMEM;
    bool all_unit = true;
    for (size_t i = 0; i < m->d_sae; i++) {
        double s = 0;
        for (size_t j = 0; j < m->d_out; j++)
            s += (double)m->W_dec[i * m->d_out + j] * m->W_dec[i * m->d_out + j];
        n[i] = (float)sqrt(s);
        if (!(fabs((double)n[i] - 1.0) <= 1e-8 + 1e-5))
            all_unit = false;
        if (!(n[i] > 0) || !isfinite(n[i])) {
            const double bad = n[i];
            free(n);
            return sae__fail(SAE_EFORMAT,
                             "%s: decoder column %zu has norm %g: dictionary_learning's "
                             "from_pretrained cannot normalize it",
                             path, i, bad);
        }
    }
    if (!all_unit) {
        for (size_t i = 0; i < m->d_sae; i++) {
            for (size_t j = 0; j < m->d_out; j++)
                m->W_dec[i * m->d_out + j] /= n[i];
            m->b_enc[i] *= n[i];
        }
        for (size_t r = 0; r < m->d_in; r++)
            for (size_t i = 0; i < m->d_sae; i++)
                m->W_enc[r * m->d_sae + i] *= n[i];
    }
    free(n);
    return SAE_OK;
}

/* The config.json beside the weights, parsed; NULL when there is none. */
typedef struct {
    cJSON *root;
    const cJSON *trainer; /* dictionary_learning's "trainer" object, or NULL */
    const char *dict_class;
    const char *path;
} side_cfg;

static int read_cfg(const char *text, size_t len, const char *path, side_cfg *c)
{
    *c = (side_cfg){NULL, NULL, NULL, path};
    if (text == NULL)
        return SAE_OK;
    int rc = sae__json_parse_object(text, len, path, &c->root);
    if (rc != SAE_OK)
        return rc;
    const cJSON *tr = cJSON_GetObjectItemCaseSensitive(c->root, "trainer");
    if (cJSON_IsObject(tr)) {
        c->trainer = tr;
        bool found;
        rc = sae__json_string(tr, "dict_class", path, &c->dict_class, &found);
    }
    return rc;
}

/* The k of a Goodfire R1 file: config.json's "k" beside it, else the release's own folder
 * (math/ 128, logic/ 64: sae.py's load_math_sae and load_logic_sae); never guessed. */
static int goodfire_r1_k(const sae__torch_dict *d, const side_cfg *c, size_t *k)
{
    bool found = false;
    if (c->root != NULL) {
        int rc = sae__json_size(c->root, "k", c->path, k, &found);
        if (rc != SAE_OK)
            return rc;
        if (found && *k == 0)
            return sae__fail(SAE_EFORMAT, "%s: 'k' = 0 is not a count", c->path);
        if (found)
            return SAE_OK;
    }
    const char *slash = strrchr(d->path, '/');
    const char *base = slash ? slash + 1 : d->path;
    if (slash != NULL && strcmp(base, GOODFIRE_R1_FILE) == 0) {
        const char *p = slash;
        while (p > d->path && p[-1] != '/')
            p--;
        size_t len = (size_t)(slash - p);
        if (len == 4 && strncmp(p, "math", 4) == 0) {
            *k = 128;
            return SAE_OK;
        }
        if (len == 5 && strncmp(p, "logic", 5) == 0) {
            *k = 64;
            return SAE_OK;
        }
    }
    return sae__fail(SAE_EFORMAT,
                     "%s: a Goodfire BatchTopKTiedSAE (W, b_enc, b_dec) does not hold its k; "
                     "write it beside the file as config.json {\"k\": N} (Goodfire's sae.py "
                     "uses 128 for math/" GOODFIRE_R1_FILE " and 64 for logic/" GOODFIRE_R1_FILE
                     ", which load as such from those folders)",
                     d->path);
}

/* OpenAI's activation: from_state_dict pops "activation" (default "ReLU") and builds TopK from
 * activation_state_dict {k, postact_fn}; their state_dict also writes the TopK module's own
 * entries as activation.k and activation.postact_fn, which their strict loader then refuses:
 * either spelling is read here, and both must agree. TopK turns on their LN normalization
 * (normalize = activation == "TopK" in from_state_dict). */
static const char *openai_string(const sae__torch_dict *d, const char *a, const char *b,
                                 const char *fallback, bool *clash)
{
    const sae__torch_scalar *x = sae__torch_find_scalar(d, a), *y = sae__torch_find_scalar(d, b);
    const char *sx = x && x->kind == SAE__TORCH_STR ? x->s : NULL;
    const char *sy = y && y->kind == SAE__TORCH_STR ? y->s : NULL;
    *clash = (x && !sx) || (y && !sy) || (sx && sy && strcmp(sx, sy) != 0);
    return sx ? sx : sy ? sy : fallback;
}

static int openai_activation(const sae__torch_dict *d, sae_arch *arch, size_t *k, bool *ln)
{
    const sae__torch_scalar *act = sae__torch_find_scalar(d, "activation");
    const char *name = "ReLU";
    if (act != NULL) {
        if (act->kind != SAE__TORCH_STR)
            return sae__fail(SAE_EFORMAT, "%s: 'activation' is not a string (a class name)",
                             d->path);
        name = act->s;
    }
    *ln = false;
    if (strcmp(name, "ReLU") == 0) {
        *arch = SAE_ARCH_RELU;
        return SAE_OK;
    }
    if (strcmp(name, "TopK") != 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: activation '%.40s' is not one libsae runs (ReLU, TopK then ReLU)%s",
                         d->path, name,
                         strcmp(name, "Identity") == 0 ? ": Identity keeps negative codes" : "");
    bool clash;
    const char *post = openai_string(d, "activation_state_dict.postact_fn",
                                     "activation.postact_fn", NULL, &clash);
    if (clash)
        return sae__fail(SAE_EFORMAT, "%s: activation_state_dict.postact_fn and "
                                      "activation.postact_fn disagree",
                         d->path);
    if (post == NULL)
        return sae__fail(SAE_EFORMAT, "%s: a TopK activation without postact_fn (their "
                                      "from_state_dict needs activation_state_dict.postact_fn)",
                         d->path);
    if (strcmp(post, "ReLU") != 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: TopK with postact_fn '%.40s': libsae runs TopK then ReLU only",
                         d->path, post);
    size_t ka = 0, kb = 0;
    int rc = SAE_OK;
    bool has_a = has(d, "activation_state_dict.k"), has_b = has(d, "activation.k");
    if (!has_a && !has_b)
        return sae__fail(SAE_EFORMAT, "%s: a TopK activation without k "
                                      "(activation_state_dict.k)",
                         d->path);
    if (has_a)
        rc = whole(d, "activation_state_dict.k", &ka);
    if (rc == SAE_OK && has_b)
        rc = whole(d, "activation.k", &kb);
    if (rc != SAE_OK)
        return rc;
    if (has_a && has_b && ka != kb)
        return sae__fail(SAE_EFORMAT, "%s: activation_state_dict.k = %zu but activation.k = %zu",
                         d->path, ka, kb);
    *arch = SAE_ARCH_TOPK;
    *k = has_a ? ka : kb;
    *ln = true;
    return SAE_OK;
}

static int build(const sae__torch_dict *d, int which, const side_cfg *cfg, sae_model **out)
{
    const layout *l = &layouts[which];
    const char *cls = strchr(l->format, '/') + 1;
    int rc = check_entries(d, l, cls);
    if (rc != SAE_OK)
        return rc;
    /* config.json's dict_class, when there is one, must name the class the keys are. */
    if (cfg->dict_class != NULL && which <= DL_GATED && strcmp(cfg->dict_class, cls) != 0)
        return sae__fail(SAE_EFORMAT, "%s: config.json says trainer.dict_class '%.60s', but "
                                      "the file holds the keys of a %s",
                         cfg->path, cfg->dict_class, cls);
    const sae__torch_tensor *we = sae__torch_find(d, l->w_enc);
    if (we == NULL || we->ndim != 2 || we->shape[0] == 0 || we->shape[1] == 0)
        return sae__fail(SAE_EFORMAT, "%s: '%s' is not a non-empty matrix", d->path, l->w_enc);
    size_t d_in = l->enc_t ? we->shape[1] : we->shape[0];
    size_t d_sae = l->enc_t ? we->shape[0] : we->shape[1];
    if (d_in > UINT32_MAX || d_sae > UINT32_MAX)
        return sae__fail(SAE_EFORMAT, "%s: '%s' is too large for a model", d->path, l->w_enc);
    const sae__torch_tensor *src[SAE__TENSOR_END] = {NULL};
    const char *names[SAE__TENSOR_END] = {NULL};
    names[SAE_W_ENC] = l->w_enc;
    names[SAE_B_ENC] = l->b_enc;
    names[SAE_W_DEC] = l->w_dec;
    names[SAE_B_DEC] = l->b_dec;
    names[SAE_THRESHOLD] = l->threshold;
    names[SAE_R_MAG] = l->r_mag;
    names[SAE_B_MAG] = l->b_mag;
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END && rc == SAE_OK; t++) {
        if (names[t] == NULL)
            continue;
        size_t d0, d1 = 0;
        if (t == SAE_W_ENC) {
            d0 = l->enc_t ? d_sae : d_in;
            d1 = l->enc_t ? d_in : d_sae;
        } else if (t == SAE_W_DEC) {
            d0 = l->dec_t ? d_in : d_sae;
            d1 = l->dec_t ? d_sae : d_in;
        } else {
            d0 = t == SAE_B_DEC ? d_in : d_sae;
        }
        rc = expect(d, names[t], d0, d1, &src[t]);
    }
    /* The settings each class keeps beside its tensors. */
    sae_arch arch = l->arch;
    size_t k = 0;
    double theta = 0;
    bool layer_norm = false;
    if (rc == SAE_OK && (which == DL_TOPK || which == DL_BATCHTOPK || which == DL_MATRYOSHKA)) {
        rc = whole(d, "k", &k);
        if (rc == SAE_OK)
            rc = sae__torch_number(d, "threshold", &theta);
        if (rc == SAE_OK && sae__torch_find(d, "threshold") != NULL &&
            sae__torch_find(d, "threshold")->count != 1)
            rc = sae__fail(SAE_EFORMAT, "%s: 'threshold' of a %s is one number", d->path, cls);
        /* from_pretrained(k=config's trainer.k) refuses a k the file contradicts. */
        size_t ck = 0;
        bool found = false;
        if (rc == SAE_OK && cfg->trainer != NULL)
            rc = sae__json_size(cfg->trainer, "k", cfg->path, &ck, &found);
        if (rc == SAE_OK && found && ck != k)
            rc = sae__fail(SAE_EFORMAT, "%s: trainer.k = %zu, but the file's k is %zu",
                           cfg->path, ck, k);
    }
    if (rc == SAE_OK && which == DL_MATRYOSHKA) {
        /* group_sizes must sum to d_sae (their constructor asserts it); every group is active
         * after loading (active_groups = len(group_sizes)), so none is zeroed. */
        const sae__torch_tensor *g = sae__torch_find(d, "group_sizes");
        float *v = NULL;
        if (g == NULL || g->ndim != 1 || g->count == 0)
            rc = sae__fail(SAE_EFORMAT, "%s: 'group_sizes' is not a list of sizes", d->path);
        else if ((v = sae__alloc(g->count, sizeof(float), "group_sizes")) == NULL)
            rc = SAE_ENOMEM;
        else if ((rc = sae__torch_tensor_to_float(d, g, v)) == SAE_OK) {
            double sum = 0;
            for (size_t i = 0; i < g->count && rc == SAE_OK; i++) {
                if (!(v[i] >= 1) || v[i] != floorf(v[i]))
                    rc = sae__fail(SAE_EFORMAT, "%s: group_sizes[%zu] = %g is not a size",
                                   d->path, i, (double)v[i]);
                sum += v[i];
            }
            if (rc == SAE_OK && sum != (double)d_sae)
                rc = sae__fail(SAE_EFORMAT, "%s: group_sizes sum to %.0f, not d_sae = %zu",
                               d->path, sum, d_sae);
        }
        free(v);
    }
    if (rc == SAE_OK && (which == OPENAI || which == OPENAI_TIED))
        rc = openai_activation(d, &arch, &k, &layer_norm);
    if (rc == SAE_OK && which == GOODFIRE_R1)
        rc = goodfire_r1_k(d, cfg, &k);
    /* torch.topk(x, k) fails for k > d_sae: a per-token TopK that cannot run. */
    if (rc == SAE_OK && arch == SAE_ARCH_TOPK && k > d_sae)
        rc = sae__fail(SAE_EFORMAT, "%s: k = %zu is more than d_sae = %zu", d->path, k, d_sae);
    if (rc != SAE_OK)
        return rc;

    sae_model *m = NULL;
    const sae__shape shape = {arch, d_in, d_sae, d_in, false, false};
    if ((rc = sae__model_alloc(&m, &shape)) != SAE_OK)
        return sae__wrap(rc, "%s: ", d->path);
    m->format = l->format;
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END && rc == SAE_OK; t++)
        if (src[t] != NULL)
            rc = fill(m, (sae_tensor)t, d, src[t],
                      (t == SAE_W_ENC && l->enc_t) || (t == SAE_W_DEC && l->dec_t));
    for (size_t i = 0; rc == SAE_OK && m->r_mag != NULL && i < d_sae; i++)
        if (!(m->r_mag[i] > -87.0f && m->r_mag[i] < 88.0f))
            rc = sae__fail(SAE_EFORMAT, "%s: r_mag[%zu] = %g: exp(r_mag) must be a normal float "
                                        "(|r_mag| < 87)",
                           d->path, i, (double)m->r_mag[i]);
    if (rc == SAE_OK && which == DL_AUTOENCODER)
        rc = normalize_decoder(m, d->path);
    if (rc == SAE_OK)
        rc = sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, l->apply_b_dec);
    if (rc == SAE_OK && k > 0)
        rc = sae_model_set_param(m, SAE_PARAM_K, (double)k);
    if (rc == SAE_OK && arch == SAE_ARCH_BATCHTOPK &&
        sae_model_set_param(m, SAE_PARAM_THRESHOLD, theta) != SAE_OK)
        rc = sae__wrap(SAE_EFORMAT, "%s: 'threshold': ", d->path);
    if (rc == SAE_OK && layer_norm &&
        sae_model_set_param(m, SAE_PARAM_NORMALIZE, SAE_NORMALIZE_LAYER_NORM) != SAE_OK)
        rc = sae__wrap(SAE_EFORMAT, "%s: OpenAI's LN normalization: ", d->path);
    if (rc != SAE_OK) {
        sae_model_free(m);
        return rc;
    }
    sae__model_weights_changed(m);
    *out = m;
    return SAE_OK;
}

int sae__torchsae_load(const unsigned char *data, size_t size, const char *path,
                       const char *cfg_text, size_t cfg_len, const char *cfg_path,
                       sae_model **out)
{
    *out = NULL;
    sae__torch_dict *d;
    int rc = sae__torch_open(data, size, path, &d);
    if (rc != SAE_OK)
        return rc;
    side_cfg cfg;
    rc = read_cfg(cfg_text, cfg_len, cfg_path, &cfg);
    int which = -1;
    if (rc == SAE_OK && (which = identify(d, cfg.dict_class, cfg.path)) < 0)
        rc = SAE_EFORMAT;
    if (rc == SAE_OK)
        rc = build(d, which, &cfg, out);
    cJSON_Delete(cfg.root);
    sae__torch_close(d);
    return rc;
}

bool sae__torchsae_detect(const unsigned char *data, size_t size)
{
    /* Any member "<stem>/data.pkl" with no other slash (torch.save writes it first, but a
     * repacked archive need not): the central directory is read, nothing decompressed. */
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *src = zip_source_buffer_create(data, size, 0, &ze);
    zip_t *za = src ? zip_open_from_source(src, ZIP_RDONLY, &ze) : NULL;
    zip_error_fini(&ze);
    if (za == NULL) {
        if (src != NULL)
            zip_source_free(src);
        return false;
    }
    bool found = false;
    zip_int64_t n = zip_get_num_entries(za, 0);
    static const char suffix[] = "/data.pkl";
    const size_t sl = sizeof suffix - 1;
    for (zip_int64_t i = 0; i < n && !found; i++) {
        const char *name = zip_get_name(za, (zip_uint64_t)i, ZIP_FL_ENC_RAW);
        size_t len = name ? strlen(name) : 0;
        found = len > sl && memcmp(name + len - sl, suffix, sl) == 0 &&
                memchr(name, '/', len - sl) == NULL;
    }
    zip_discard(za);
    return found;
}
