/* Training checkpoints: the model and everything the trainer needs to continue bit for bit, as
 * one libsae safetensors file whose model part is sae_model_save's (the same metadata code), so
 * the file also loads as a plain model. */
#include "formats.h"
#include "train_internal.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- checkpoints --------------------------------------------------------------------------- */

static int cmp_out(const void *a, const void *b)
{
    return strcmp(((const sae__st_out *)a)->name, ((const sae__st_out *)b)->name);
}

enum { MAX_META = SAE__MODEL_META_MAX + N_PARAMS + N_METRICS + 16, META_LEN = 40 };

/* Matryoshka group sizes as "a,b,c" (malloc'd; "" without groups), or NULL without memory. */
static char *groups_text(const sae_trainer *t)
{
    char *s = sae__alloc(t->n_groups * 21 + 1, 1, "checkpoint");
    if (s == NULL)
        return NULL;
    size_t at = 0;
    s[0] = '\0';
    for (size_t g = 0; g < t->n_groups; g++) {
        size_t size = t->group_end[g] - (g > 0 ? t->group_end[g - 1] : 0);
        at += (size_t)snprintf(s + at, 22, g > 0 ? ",%zu" : "%zu", size);
    }
    return s;
}

int sae_trainer_save(const sae_trainer *t, const char *path)
{
    SAE_CHECK_NULL(t);
    SAE_CHECK_NULL(path);
    if (!t->initialized)
        return sae__fail(SAE_ESTATE, "sae_trainer_save: nothing to save before sae_trainer_init");
    if (sae__train_need_float_weights(t, __func__) != SAE_OK)
        return SAE_ESTATE;
    const sae_model *m = t->m;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out;
    float *hi = sae__alloc(d_sae, sizeof(float), "checkpoint"),
          *lo = sae__alloc(d_sae, sizeof(float), "checkpoint");
    char *groups = t->n_groups > 0 ? groups_text(t) : NULL;
    if (hi == NULL || lo == NULL || (t->n_groups > 0 && groups == NULL)) {
        free(hi);
        free(lo);
        free(groups);
        return SAE_ENOMEM;
    }
    for (size_t j = 0; j < d_sae; j++) {
        hi[j] = (float)(t->since_fired[j] >> 24);
        lo[j] = (float)(t->since_fired[j] & 0xffffff);
    }
    /* The model's own keys, by sae_model_save's code, so the file also loads as a model. */
    const char *keys[MAX_META];
    char values[MAX_META][META_LEN];
    const char *vals[MAX_META];
    char names[N_PARAMS + N_METRICS][48];
    sae__model_meta_text txt;
    size_t nm = sae__model_meta(m, &txt, keys, vals), nn = 0;
#define META(key, ...)                                                                             \
    do {                                                                                           \
        keys[nm] = (key);                                                                          \
        snprintf(values[nm], META_LEN, __VA_ARGS__);                                               \
        vals[nm] = values[nm];                                                                     \
        nm++;                                                                                      \
    } while (0)
    META("train.format_version", TRAIN_FORMAT_VERSION);
    META("train.step", "%llu", (unsigned long long)t->step);
    META("train.tokens", "%llu", (unsigned long long)t->tokens);
    META("train.mse_norm", "%.17g", t->mse_norm);
    META("train.aux_norm", "%.17g", t->aux_norm);
    META("train.theta", "%.17g", t->theta);
    if (t->tc)
        META("train.out_scale", "%.17g", t->out_scale);
    if (groups != NULL) { /* any length: not through META's fixed buffer */
        keys[nm] = "train.groups";
        vals[nm++] = groups;
    }
    for (int p = SAE_TRAIN_LR; p < N_PARAMS; p++) {
        if (!sae__train_param_known(p) || sae__train_params[p].kind == K_RUN ||
            (sae__train_param_derived(p) && !t->param_set[p]))
            continue;
        snprintf(names[nn], sizeof names[nn], "train.param.%s", sae__train_params[p].name);
        META(names[nn++], "%.17g", t->param[p]);
    }
    if (t->have_metrics) {
        for (int k = SAE_METRIC_LOSS; k < N_METRICS; k++) {
            if (sae__train_metric_names[k] == NULL || sae__train_metric_is_diag(k))
                continue;
            snprintf(names[nn], sizeof names[nn], "train.metric.%s", sae__train_metric_names[k]);
            META(names[nn++], "%.17g", t->metric[k]);
        }
    }
#undef META
    /* The Adam moments cover W_skip and the log-thresholds too: the parameters' last sections. */
    sae__st_out tensors[11] = {
        {"W_dec", 2, {d_sae, d_out}, m->W_dec, NULL},
        {"W_enc", 2, {d_in, d_sae}, m->W_enc, NULL},
        {"b_dec", 1, {d_out, 0}, m->b_dec, NULL},
        {"b_enc", 1, {d_sae, 0}, m->b_enc, NULL},
        {"train.adam_m", 1, {t->lay.n_params, 0}, t->adam_m, NULL},
        {"train.adam_v", 1, {t->lay.n_params, 0}, t->adam_v, NULL},
        {"train.dead_hi", 1, {d_sae, 0}, hi, NULL},
        {"train.dead_lo", 1, {d_sae, 0}, lo, NULL},
        {"W_skip", 2, {d_in, d_out}, m->W_skip, NULL},
        {"threshold", 1, {d_sae, 0}, m->threshold, NULL},
        {"train.log_threshold", 1, {d_sae, 0}, t->log_th, NULL},
    };
    size_t n_tensors = m->skip ? 9 : 8;
    if (t->jump) { /* the model's threshold, so the file loads as a model, and the master copy */
        tensors[n_tensors++] = tensors[9];
        tensors[n_tensors++] = tensors[10];
    }
    qsort(tensors, n_tensors, sizeof tensors[0], cmp_out);
    int rc = sae__st_write(path, tensors, n_tensors, keys, vals, nm);
    free(hi);
    free(lo);
    free(groups);
    return rc;
}

/* A count, by the model reader's strict parser: plain decimal digits only (no sign, space,
 * exponent or leading '+', which strtoull would take). */
static int meta_u64(const sae__safetensors *st, const char *key, uint64_t *out)
{
    size_t v;
    const size_t max = SIZE_MAX < UINT64_MAX ? SIZE_MAX : (size_t)UINT64_MAX;
    int rc = sae__st_meta_size(st, key, max, &v);
    if (rc == SAE_OK)
        *out = (uint64_t)v;
    return rc;
}

/* Reads a tensor of exactly the given shape, converted to float, into dst, checking it is finite. */
static int read_tensor(const sae__safetensors *st, const char *name, size_t d0, size_t d1,
                       float *dst)
{
    const sae__st_tensor *src;
    int rc = sae__st_expect(st, name, d0, d1, &src);
    if (rc != SAE_OK)
        return rc;
    sae__to_float(src->dtype, st->data + src->offset, src->count, dst);
    if ((rc = sae__check_finite(dst, src->count, d1 ? d1 : 1, name)) != SAE_OK)
        return sae__wrap(SAE_EFORMAT, "%s: ", st->path);
    return SAE_OK;
}

/* Everything a checkpoint holds, parsed and checked before any of it is applied. */
typedef struct {
    double param[N_PARAMS];
    bool param_set[N_PARAMS];
    double metric[N_METRICS];
    bool have_metrics;
    uint64_t step, tokens;
    double mse_norm, aux_norm, theta, apply, scale, k, batch_threshold, out_scale;
    float *block; /* model tensors, moments and counters, in one allocation */
    float *log_th; /* JumpReLU: [d_sae] */
    size_t *groups, n_groups; /* Matryoshka group sizes */
} checkpoint;

static void checkpoint_free(checkpoint *c)
{
    free(c->block);
    free(c->log_th);
    free(c->groups);
}

/* train.groups: positive decimal sizes separated by commas, checked against the model by
 * sae__matryoshka_set when applied. */
static int parse_groups(const sae__safetensors *st, const sae_trainer *t, checkpoint *c)
{
    const char *text = sae__st_meta(st, "train.groups");
    if (text == NULL)
        return SAE_OK;
    size_t n = 1;
    for (const char *p = text; *p; p++)
        n += *p == ',';
    if (n > t->m->d_sae)
        return sae__fail(SAE_EFORMAT, "%s: train.groups has more groups than latents", st->path);
    c->groups = sae__alloc(n, sizeof(size_t), "checkpoint");
    if (c->groups == NULL)
        return SAE_ENOMEM;
    const char *p = text;
    size_t sum = 0;
    for (size_t g = 0; g < n; g++) {
        size_t v = 0, digits = 0;
        for (; *p >= '0' && *p <= '9' && digits < 19; p++, digits++)
            v = v * 10 + (size_t)(*p - '0');
        if (digits == 0 || v == 0 || v > t->m->d_sae - sum || (*p != ',' && *p != '\0') ||
            (*p == '\0') != (g + 1 == n))
            return sae__fail(SAE_EFORMAT, "%s: train.groups '%.60s' is not a list of positive "
                             "group sizes summing to d_sae = %zu", st->path, text, t->m->d_sae);
        sum += v;
        c->groups[g] = v;
        p += *p == ',';
    }
    if (sum != t->m->d_sae)
        return sae__fail(SAE_EFORMAT, "%s: train.groups sums to %zu, not d_sae = %zu", st->path,
                         sum, t->m->d_sae);
    if (t->m->arch != SAE_ARCH_BATCHTOPK)
        return sae__fail(SAE_EFORMAT, "%s: train.groups in a checkpoint of a %s model",
                         st->path, sae_arch_name(t->m->arch));
    c->n_groups = n;
    return SAE_OK;
}

static int parse_checkpoint(const sae_trainer *t, const sae__safetensors *st, checkpoint *c)
{
    const sae_model *m = t->m;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out, P = t->lay.n_params;
    const char *format = sae__st_meta(st, "format");
    if (format == NULL || strcmp(format, "libsae") != 0 ||
        sae__st_meta(st, "train.format_version") == NULL)
        return sae__fail(SAE_EFORMAT, "%s: not a libsae training checkpoint (no libsae "
                         "train.format_version metadata)", st->path);
    if (strcmp(sae__st_meta(st, "train.format_version"), TRAIN_FORMAT_VERSION) != 0)
        return sae__fail(SAE_EFORMAT, "%s: training checkpoint version '%.20s' is not %s",
                         st->path, sae__st_meta(st, "train.format_version"), TRAIN_FORMAT_VERSION);
    const char *arch = sae__st_meta(st, "architecture");
    /* Sizes and kind by the model reader's strict parsers and spellings. */
    size_t f_in, f_sae, f_out;
    int rc;
    if ((rc = sae__st_meta_size(st, "d_in", SIZE_MAX, &f_in)) != SAE_OK ||
        (rc = sae__st_meta_size(st, "d_sae", SIZE_MAX, &f_sae)) != SAE_OK)
        return rc;
    const char *kind = sae__st_meta(st, "kind"), *want_kind = m->transcoder
                                                               ? (m->skip ? "skip_transcoder"
                                                                          : "transcoder")
                                                               : "sae";
    f_out = f_in;
    if (kind != NULL && strcmp(kind, "sae") != 0 &&
        (rc = sae__st_meta_size(st, "d_out", SIZE_MAX, &f_out)) != SAE_OK)
        return rc;
    if (arch == NULL || strcmp(arch, sae_arch_name(m->arch)) != 0 || f_in != d_in ||
        f_sae != d_sae || f_out != d_out || strcmp(kind ? kind : "sae", want_kind) != 0)
        return sae__fail(SAE_EINVAL, "%s: the checkpoint is a %.20s %.20s of %zu x %zu -> %zu, "
                         "but the trainer's model is a %s %s of %zu x %zu -> %zu", st->path,
                         arch ? arch : "(unknown)", kind ? kind : "sae", f_in, f_sae, f_out,
                         sae_arch_name(m->arch), want_kind, d_in, d_sae, d_out);
    if ((rc = meta_u64(st, "train.step", &c->step)) != SAE_OK ||
        (rc = meta_u64(st, "train.tokens", &c->tokens)) != SAE_OK ||
        (rc = sae__st_meta_number(st, "train.mse_norm", false, &c->mse_norm)) != SAE_OK ||
        (rc = sae__st_meta_number(st, "train.aux_norm", false, &c->aux_norm)) != SAE_OK ||
        (rc = sae__st_meta_number(st, "train.theta", false, &c->theta)) != SAE_OK ||
        (rc = sae__st_meta_number(st, "apply_b_dec_to_input", false, &c->apply)) != SAE_OK ||
        (rc = sae__st_meta_number(st, "input_scale", false, &c->scale)) != SAE_OK)
        return rc;
    c->out_scale = 1.0;
    if (t->tc && (rc = sae__st_meta_number(st, "train.out_scale", false, &c->out_scale)) != SAE_OK)
        return rc;
    if (!(c->out_scale > 0.0) || !isnormal((float)c->out_scale))
        return sae__fail(SAE_EFORMAT, "%s: train.out_scale must be a positive normal float",
                         st->path);
    if (!(c->mse_norm > 0.0) || !(c->aux_norm > 0.0) || isinf(c->mse_norm) || isinf(c->aux_norm))
        return sae__fail(SAE_EFORMAT, "%s: training normalizers (train.mse_norm, train.aux_norm) "
                         "must be finite and positive", st->path);
    if (c->apply != 0.0 && c->apply != 1.0)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__['apply_b_dec_to_input'] must be 0 or 1",
                         st->path);
    /* Values the model and trainer hold as floats are checked as floats: an input_scale of
     * 1e-46 is 0 as a float, a threshold of 1e39 infinite. */
    float f;
    double lo, hi;
    if (sae_model_param_bounds(SAE_PARAM_INPUT_SCALE, &lo, &hi) != SAE_OK ||
        sae__float_in_range(c->scale, lo, hi, "input_scale", &f) != SAE_OK ||
        sae__float_in_range(c->theta, -FLT_MAX, FLT_MAX, "train.theta", &f) != SAE_OK)
        return sae__wrap(SAE_EFORMAT, "%s: __metadata__: ", st->path);
    c->k = (double)m->k;
    c->batch_threshold = m->batch_threshold;
    if (t->sparse &&
        ((rc = sae__st_meta_number(st, "k", false, &c->k)) != SAE_OK || !(c->k >= 1.0) ||
         c->k != floor(c->k) || c->k > 4294967295.0))
        return rc != SAE_OK ? rc : sae__fail(SAE_EFORMAT, "%s: k is not a count", st->path);
    if (m->arch == SAE_ARCH_BATCHTOPK &&
        ((rc = sae__st_meta_number(st, "batch_threshold", false, &c->batch_threshold)) != SAE_OK ||
         (rc = sae__float_in_range(c->batch_threshold, -FLT_MAX, FLT_MAX, "batch_threshold",
                                   &f)) != SAE_OK))
        return rc == SAE_EFORMAT ? rc : sae__wrap(SAE_EFORMAT, "%s: __metadata__: ", st->path);
    for (int p = SAE_TRAIN_LR; p < N_PARAMS; p++) {
        char key[48];
        c->param[p] = t->param[p];
        c->param_set[p] = false;
        if (!sae__train_param_known(p))
            continue;
        if (sae__train_params[p].kind == K_RUN) { /* not in the file: this process's stays */
            c->param_set[p] = t->param_set[p];
            continue;
        }
        snprintf(key, sizeof key, "train.param.%s", sae__train_params[p].name);
        /* A derived default, or a parameter newer than the file, keeps this trainer's value. */
        if ((sae__train_param_derived(p) || p == SAE_TRAIN_HELDOUT_EVERY) &&
            sae__st_meta(st, key) == NULL)
            continue;
        if ((rc = sae__st_meta_number(st, key, false, &c->param[p])) != SAE_OK)
            return rc;
        if ((rc = sae__train_check_param((sae_train_param)p, c->param[p])) != SAE_OK)
            return sae__wrap(SAE_EFORMAT, "%s: ", st->path);
        c->param_set[p] = true;
    }
    c->have_metrics = sae__st_meta(st, "train.metric.loss") != NULL;
    for (int k = SAE_METRIC_LOSS; k < N_METRICS && c->have_metrics; k++) {
        char key[48];
        if (sae__train_metric_names[k] == NULL || sae__train_metric_is_diag(k))
            continue;
        snprintf(key, sizeof key, "train.metric.%s", sae__train_metric_names[k]);
        if ((rc = sae__st_meta_number(st, key, true, &c->metric[k])) != SAE_OK)
            return rc;
    }
    /* The model's tensors in the gradient's layout (W_enc, W_dec, b_enc, b_dec, W_skip): P. */
    const sae__train_layout *L = &t->lay;
    c->block = sae__alloc(P * 3 + 2 * d_sae, sizeof(float), "checkpoint");
    if (c->block == NULL)
        return SAE_ENOMEM;
    float *b = c->block;
    if ((rc = read_tensor(st, "W_enc", d_in, d_sae, b + L->W_enc)) != SAE_OK ||
        (rc = read_tensor(st, "W_dec", d_sae, d_out, b + L->W_dec)) != SAE_OK ||
        (rc = read_tensor(st, "b_enc", d_sae, 0, b + L->b_enc)) != SAE_OK ||
        (rc = read_tensor(st, "b_dec", d_out, 0, b + L->b_dec)) != SAE_OK ||
        (m->skip && (rc = read_tensor(st, "W_skip", d_in, d_out, b + L->W_skip)) != SAE_OK) ||
        (rc = read_tensor(st, "train.adam_m", P, 0, b + P)) != SAE_OK ||
        (rc = read_tensor(st, "train.adam_v", P, 0, b + 2 * P)) != SAE_OK ||
        (rc = read_tensor(st, "train.dead_hi", d_sae, 0, b + 3 * P)) != SAE_OK ||
        (rc = read_tensor(st, "train.dead_lo", d_sae, 0, b + 3 * P + d_sae)) != SAE_OK) {
        free(c->block);
        return rc;
    }
    /* A negative second moment would make Adam's square root NaN at the next step. */
    for (size_t i = 0; i < P; i++)
        if (!(b[2 * P + i] >= 0.0f)) {
            const double bad = b[2 * P + i];
            free(c->block);
            return sae__fail(SAE_EFORMAT, "%s: train.adam_v[%zu] = %g: Adam's second moment "
                             "cannot be negative", st->path, i, bad);
        }
    for (size_t j = 0; j < 2 * d_sae; j++) {
        float v = b[3 * P + j];
        if (!(v >= 0.0f && v <= 16777215.0f) || v != floorf(v)) {
            free(c->block);
            return sae__fail(SAE_EFORMAT, "%s: dead-latent counter %zu is not a count", st->path,
                             j % d_sae);
        }
    }
    if (t->jump) {
        /* The log-thresholds must give finite, positive float thresholds. */
        c->log_th = sae__alloc(d_sae, sizeof(float), "checkpoint");
        if (c->log_th == NULL)
            rc = SAE_ENOMEM;
        else if ((rc = read_tensor(st, "train.log_threshold", d_sae, 0, c->log_th)) == SAE_OK)
            for (size_t j = 0; j < d_sae && rc == SAE_OK; j++)
                if (!(expf(c->log_th[j]) > 0.0f) || isinf(expf(c->log_th[j])))
                    rc = sae__fail(SAE_EFORMAT, "%s: train.log_threshold[%zu] = %g gives no "
                                   "positive finite float threshold", st->path, j,
                                   (double)c->log_th[j]);
    }
    if (rc == SAE_OK)
        rc = parse_groups(st, t, c);
    if (rc != SAE_OK) {
        checkpoint_free(c);
        return rc;
    }
    return SAE_OK;
}

int sae_trainer_load(sae_trainer *t, const char *path)
{
    SAE_CHECK_NULL(t);
    SAE_CHECK_NULL(path);
    int rc = sae__train_need_float_weights(t, __func__);
    if (rc != SAE_OK)
        return rc;
    sae__map map;
    rc = sae__map_file(path, &map, false);
    if (rc != SAE_OK)
        return rc;
    sae__safetensors st;
    if ((rc = sae__st_parse(&st, map.data, map.size, path)) != SAE_OK) {
        sae__unmap(&map);
        return rc;
    }
    checkpoint c = {0};
    rc = parse_checkpoint(t, &st, &c);
    sae__st_close(&st);
    sae__unmap(&map);
    if (rc != SAE_OK)
        return rc;
    /* The only step that can fail from here: the groups' copy. */
    if ((rc = sae__matryoshka_set(t, c.groups, c.n_groups, "sae_trainer_load")) != SAE_OK) {
        checkpoint_free(&c);
        return rc;
    }

    sae_model *m = t->m;
    const sae__train_layout *L = &t->lay;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out, P = L->n_params;
    const float *b = c.block;
    memcpy(m->W_enc, b + L->W_enc, d_in * d_sae * sizeof(float));
    memcpy(m->W_dec, b + L->W_dec, d_sae * d_out * sizeof(float));
    memcpy(m->b_enc, b + L->b_enc, d_sae * sizeof(float));
    memcpy(m->b_dec, b + L->b_dec, d_out * sizeof(float));
    if (m->skip)
        memcpy(m->W_skip, b + L->W_skip, d_in * d_out * sizeof(float));
    memcpy(t->adam_m, b + P, P * sizeof(float));
    memcpy(t->adam_v, b + 2 * P, P * sizeof(float));
    for (size_t j = 0; j < d_sae; j++)
        t->since_fired[j] = ((uint64_t)b[3 * P + j] << 24) | (uint64_t)b[3 * P + d_sae + j];
    if (t->jump) {
        memcpy(t->log_th, c.log_th, d_sae * sizeof(float));
        sae__jumprelu_sync(t);
    }
    checkpoint_free(&c);
    m->apply_b_dec = c.apply == 1.0;
    m->input_scale = (float)c.scale;
    if (t->sparse)
        m->k = (size_t)c.k;
    m->batch_threshold = (float)c.batch_threshold;
    sae__model_weights_changed(m);
    memcpy(t->param, c.param, sizeof t->param);
    memcpy(t->param_set, c.param_set, sizeof t->param_set);
    memcpy(t->metric, c.metric, sizeof t->metric);
    sae__train_diag_reset(t);
    t->have_metrics = c.have_metrics;
    t->step = c.step;
    t->tokens = c.tokens;
    t->mse_norm = c.mse_norm;
    t->aux_norm = c.aux_norm;
    t->theta = c.theta;
    t->out_scale = c.out_scale;
    t->initialized = true;
    return SAE_OK;
}
