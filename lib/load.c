/* sae_model_load: finds out what a path holds and hands it to the right reader; plus libsae's own
 * file format, read and written. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define OWN_FORMAT_VERSION "1"

int sae__model_load_tensor(sae_model *m, sae_tensor t, const sae__safetensors *st,
                           const sae__st_tensor *src, bool transpose)
{
    float **slot = sae__model_tensor_slot(m, t);
    const unsigned char *bytes = st->data + src->offset;
    /* Used in place when the mapping can serve as the tensor's storage directly. */
    if (!transpose && src->dtype == SAE__F32 && st->data == m->map.data &&
        src->offset % sizeof(float) == 0) {
        if (m->owned & (1u << t))
            free(*slot);
        m->owned &= ~(1u << t);
        *slot = (float *)(void *)(m->map.data + src->offset);
        return SAE_OK;
    }
    int rc = sae__model_own_tensor(m, t);
    if (rc != SAE_OK)
        return rc;
    if (!transpose) {
        sae__to_float(src->dtype, bytes, src->count, *slot);
        return SAE_OK;
    }
    /* src is [rows][cols]; the model wants [cols][rows]. Converted a row at a time. */
    size_t rows = src->shape[0], cols = src->shape[1], esize = sae__dtype_size(src->dtype);
    float *row = sae__alloc(cols, sizeof(float), "transpose scratch");
    if (row == NULL)
        return SAE_ENOMEM;
    for (size_t r = 0; r < rows; r++) {
        sae__to_float(src->dtype, bytes + r * cols * esize, cols, row);
        for (size_t c = 0; c < cols; c++)
            (*slot)[c * rows + r] = row[c];
    }
    free(row);
    return SAE_OK;
}

/* Parses a decimal metadata value that must be present. */
static int meta_number(const sae__safetensors *st, const char *key, double *out)
{
    const char *s = sae__st_meta(st, key);
    if (s == NULL)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ has no '%s'", st->path, key);
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(v))
        return sae__fail(SAE_EFORMAT, "%s: __metadata__['%s'] = '%.40s' is not a number",
                         st->path, key, s);
    *out = v;
    return SAE_OK;
}

static int meta_size(const sae__safetensors *st, const char *key, size_t *out)
{
    double v;
    int rc = meta_number(st, key, &v);
    if (rc != SAE_OK)
        return rc;
    if (!(v >= 1.0 && v <= 4294967295.0) || v != floor(v))
        return sae__fail(SAE_EFORMAT, "%s: __metadata__['%s'] = %g is not a size", st->path, key,
                         v);
    *out = (size_t)v;
    return SAE_OK;
}

/* Reads libsae's own file; takes ownership of *map on success. */
static int load_own(const sae__safetensors *st, sae__map *map, sae_model **out)
{
    const char *arch_name = sae__st_meta(st, "architecture");
    sae_arch arch;
    if (arch_name == NULL)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ has no 'architecture'", st->path);
    if (sae_arch_from_name(arch_name, &arch) != SAE_OK)
        return sae__fail(SAE_EUNSUPPORTED, "%s: architecture '%.40s' is not supported", st->path,
                         arch_name);
    size_t d_in, d_sae;
    int rc;
    if ((rc = meta_size(st, "d_in", &d_in)) != SAE_OK ||
        (rc = meta_size(st, "d_sae", &d_sae)) != SAE_OK)
        return rc;
    sae_model *m;
    if ((rc = sae__model_alloc(&m, arch, d_in, d_sae)) != SAE_OK)
        return rc;
    m->map = *map;
    m->format = "libsae";

    static const struct {
        const char *key;
        sae_model_param param;
        bool required_for_topk, batchtopk_only;
    } params[] = {
        {"apply_b_dec_to_input", SAE_PARAM_APPLY_B_DEC_TO_INPUT, false, false},
        {"input_scale", SAE_PARAM_INPUT_SCALE, false, false},
        {"k", SAE_PARAM_K, true, false},
        {"batch_threshold", SAE_PARAM_THRESHOLD, false, true},
    };
    for (size_t i = 0; i < sizeof params / sizeof params[0] && rc == SAE_OK; i++) {
        if (params[i].param == SAE_PARAM_K && arch != SAE_ARCH_TOPK && arch != SAE_ARCH_BATCHTOPK)
            continue;
        if (params[i].batchtopk_only && arch != SAE_ARCH_BATCHTOPK)
            continue;
        double v;
        if ((rc = meta_number(st, params[i].key, &v)) == SAE_OK &&
            (rc = sae_model_set_param(m, params[i].param, v)) != SAE_OK)
            rc = sae__wrap(SAE_EFORMAT, "%s: __metadata__['%s']: ", st->path, params[i].key);
    }
    static const struct {
        sae_tensor t;
        const char *name;
    } tensors[] = {{SAE_W_ENC, "W_enc"}, {SAE_W_DEC, "W_dec"}, {SAE_B_ENC, "b_enc"},
                   {SAE_B_DEC, "b_dec"}, {SAE_THRESHOLD, "threshold"}};
    for (size_t i = 0; i < sizeof tensors / sizeof tensors[0] && rc == SAE_OK; i++) {
        sae_tensor t = tensors[i].t;
        if (sae__model_tensor_count(m, t) == 0)
            continue;
        size_t d0 = t == SAE_W_ENC ? d_in : t == SAE_B_DEC ? d_in : d_sae;
        size_t d1 = t == SAE_W_ENC ? d_sae : t == SAE_W_DEC ? d_in : 0;
        const sae__st_tensor *src;
        if ((rc = sae__st_expect(st, tensors[i].name, d0, d1, &src)) == SAE_OK) {
            rc = sae__model_load_tensor(m, t, st, src, false);
            if (src->dtype != SAE__F32)
                m->dtype = src->dtype;
        }
    }
    if (rc != SAE_OK) {
        m->map = (sae__map){0}; /* the caller still owns the mapping */
        sae_model_free(m);
        return rc;
    }
    sae__model_weights_changed(m);
    *map = (sae__map){0};
    *out = m;
    return SAE_OK;
}

/* A safetensors file without libsae metadata: a SAELens or sparsify weights file on its own. */
static int load_foreign_safetensors(const char *path, const sae__safetensors *st, sae__map *map,
                                    sae_model **out)
{
    (void)map;
    (void)out;
    (void)st;
    return sae__fail(SAE_EUNSUPPORTED,
                     "%s: a safetensors file without libsae metadata (SAELens and sparsify files "
                     "are not read yet)",
                     path);
}

static int load_file(const char *path, sae_model **out)
{
    sae__map map;
    int rc = sae__map_file(path, &map);
    if (rc != SAE_OK)
        return rc;
    if (map.size >= 4 && memcmp(map.data, "PK\3\4", 4) == 0) {
        sae__unmap(&map);
        return sae__fail(SAE_EUNSUPPORTED, "%s: npz files are not read yet", path);
    }
    sae__safetensors st;
    if ((rc = sae__st_parse(&st, map.data, map.size, path)) == SAE_OK) {
        const char *format = sae__st_meta(&st, "format");
        if (format != NULL && strcmp(format, "libsae") == 0)
            rc = load_own(&st, &map, out);
        else
            rc = load_foreign_safetensors(path, &st, &map, out);
        sae__st_close(&st);
    }
    sae__unmap(&map); /* a no-op when the model took it */
    return rc;
}

int sae_model_load(sae_model **out, const char *path)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    SAE_CHECK_NULL(path);
    struct stat sb;
    if (stat(path, &sb) != 0)
        return sae__fail(SAE_EIO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode))
        return sae__fail(SAE_EUNSUPPORTED, "%s: loading folders is not supported yet", path);
    return load_file(path, out);
}

int sae_model_save(const sae_model *m, const char *path)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(path);
    char d_in[24], d_sae[24], k[24], apply[4], scale[32], theta[32];
    snprintf(d_in, sizeof d_in, "%zu", m->d_in);
    snprintf(d_sae, sizeof d_sae, "%zu", m->d_sae);
    snprintf(k, sizeof k, "%zu", m->k);
    snprintf(apply, sizeof apply, "%d", m->apply_b_dec);
    /* %.9g round-trips every float exactly. */
    snprintf(scale, sizeof scale, "%.9g", (double)m->input_scale);
    snprintf(theta, sizeof theta, "%.9g", (double)m->batch_threshold);
    const char *keys[8] = {"format", "format_version", "libsae_version", "architecture",
                           "d_in", "d_sae", "apply_b_dec_to_input", "input_scale"};
    const char *values[8] = {"libsae", OWN_FORMAT_VERSION, sae_version_string(),
                             sae_arch_name(m->arch), d_in, d_sae, apply, scale};
    const char *all_keys[10], *all_values[10];
    size_t n_meta = 0;
    for (; n_meta < 8; n_meta++) {
        all_keys[n_meta] = keys[n_meta];
        all_values[n_meta] = values[n_meta];
    }
    if (m->arch == SAE_ARCH_TOPK || m->arch == SAE_ARCH_BATCHTOPK) {
        all_keys[n_meta] = "k";
        all_values[n_meta++] = k;
    }
    if (m->arch == SAE_ARCH_BATCHTOPK) {
        all_keys[n_meta] = "batch_threshold";
        all_values[n_meta++] = theta;
    }
    /* Sorted by name, as torch writes them. */
    sae__st_out tensors[5] = {
        {"W_dec", 2, {m->d_sae, m->d_in}, m->W_dec},
        {"W_enc", 2, {m->d_in, m->d_sae}, m->W_enc},
        {"b_dec", 1, {m->d_in, 0}, m->b_dec},
        {"b_enc", 1, {m->d_sae, 0}, m->b_enc},
        {"threshold", 1, {m->d_sae, 0}, m->threshold},
    };
    size_t n_tensors = m->arch == SAE_ARCH_JUMPRELU ? 5 : 4;
    return sae__st_write(path, tensors, n_tensors, all_keys, all_values, n_meta);
}
