/* sae_model_load: finds out what a path holds, from its content and its folder, and hands it to
 * the right reader (libsae's own file here; SAELens, sparsify and Gemma Scope in their own
 * files); plus libsae's own file format, read and written. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

/* cfg.json and activation_scaler.json are a few kB; anything near this is not one. */
#define MAX_CFG_BYTES (1u << 20)

/* The newest version this library writes and reads; it reads every older one too. Version 2
 * added transcoders, gated, GroupMax and the normalizations; a model without them is still
 * written as version 1, which libsae 0.1 reads. */
#define OWN_FORMAT_VERSION 2u

int sae__model_own_tensor_uninit(sae_model *m, sae_tensor t)
{
    float **slot = sae__model_tensor_slot(m, t);
    size_t count = sae__model_tensor_count(m, t);
    if (m->owned & (1u << t))
        free(*slot);
    m->owned &= ~(1u << t);
    *slot = sae__alloc(count, sizeof(float), "a converted tensor");
    if (*slot == NULL)
        return SAE_ENOMEM;
    m->owned |= 1u << t;
    /* Transparent huge pages where the kernel offers them (madvise mode is the common default):
     * a 150 MB tensor then takes 75 page faults to fill instead of 37 000, which is most of
     * the time a converted load spends. Advice only: failure changes nothing. */
    enum { HUGE = 2u << 20 };
    uintptr_t begin = (uintptr_t)*slot, end = begin + count * sizeof(float);
    uintptr_t a = (begin + HUGE - 1) & ~(uintptr_t)(HUGE - 1), b = end & ~(uintptr_t)(HUGE - 1);
    if (b > a)
        (void)madvise((void *)a, b - a, MADV_HUGEPAGE);
    return SAE_OK;
}

/* Every weight read from a file must be finite, as sae_model_set_tensor demands of the
 * caller's: a NaN or infinity would reach every code computed from it. v holds count values of
 * src starting at element first (in the file's order); sae__check_finite keeps the common case
 * at memory speed, and only a refusal looks for the first bad value again, to name it in the
 * file's own [row][col]. */
static int check_finite_part(const sae__safetensors *st, const sae__st_tensor *src,
                             const float *v, size_t count, size_t first)
{
    size_t cols = src->ndim == 2 ? src->shape[1] : 1;
    if (sae__check_finite(v, count, cols, src->name) == SAE_OK)
        return SAE_OK;
    size_t i = 0;
    while (i < count && isfinite(v[i]))
        i++;
    size_t at = first + (i < count ? i : 0);
    double bad = i < count ? (double)v[i] : 0.0;
    if (src->ndim == 2)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s'[%zu][%zu] is %g: weights must be finite",
                         st->path, src->name, at / cols, at % cols, bad);
    return sae__fail(SAE_EFORMAT, "%s: tensor '%s'[%zu] is %g: weights must be finite", st->path,
                     src->name, at, bad);
}

int sae__model_load_tensor(sae_model *m, sae_tensor t, const sae__safetensors *st,
                           const sae__st_tensor *src, bool transpose)
{
    float **slot = sae__model_tensor_slot(m, t);
    const unsigned char *bytes = st->data + src->offset;
    /* Used in place when the mapping can serve as the tensor's storage directly. */
    if (!transpose && src->dtype == SAE__F32 && st->data == m->map.data &&
        src->offset % sizeof(float) == 0) {
        const float *in_place = (const float *)(const void *)(m->map.data + src->offset);
        int rc = check_finite_part(st, src, in_place, src->count, 0);
        if (rc != SAE_OK)
            return rc;
        if (m->owned & (1u << t))
            free(*slot);
        m->owned &= ~(1u << t);
        *slot = (float *)(void *)(m->map.data + src->offset);
        return SAE_OK;
    }
    int rc = sae__model_own_tensor_uninit(m, t);
    if (rc != SAE_OK)
        return rc;
    size_t esize = sae__dtype_size(src->dtype);
    if (!transpose) {
        /* Converted and checked a cache-sized part at a time: one pass over the memory. */
        enum { PART = 1 << 14 };
        for (size_t i = 0; i < src->count && rc == SAE_OK; i += PART) {
            size_t n = src->count - i < PART ? src->count - i : PART;
            sae__to_float(src->dtype, bytes + i * esize, n, *slot + i);
            rc = check_finite_part(st, src, *slot + i, n, i);
        }
        return rc;
    }
    /* src is [rows][cols]; the model wants [cols][rows]. A band of rows is converted at a time,
     * then written out in square tiles so both the reads and the writes stay in cache. */
    enum { BAND = 64 };
    size_t rows = src->shape[0], cols = src->shape[1];
    float *band = sae__alloc(BAND * cols, sizeof(float), "transpose scratch");
    if (band == NULL)
        return SAE_ENOMEM;
    float *dst = *slot;
    for (size_t r0 = 0; r0 < rows && rc == SAE_OK; r0 += BAND) {
        size_t nr = rows - r0 < BAND ? rows - r0 : BAND;
        sae__to_float(src->dtype, bytes + r0 * cols * esize, nr * cols, band);
        if ((rc = check_finite_part(st, src, band, nr * cols, r0 * cols)) != SAE_OK)
            break;
        for (size_t c0 = 0; c0 < cols; c0 += BAND) {
            size_t nc = cols - c0 < BAND ? cols - c0 : BAND;
            for (size_t c = c0; c < c0 + nc; c++)
                for (size_t r = 0; r < nr; r++)
                    dst[c * rows + r0 + r] = band[r * cols + c];
        }
    }
    free(band);
    return rc;
}

/* Finds every tensor the model needs with its expected shape (transposed where asked), before
 * anything is allocated: sizes from a config are believed only once the file holds that much. */
static int expect_all(const sae__safetensors *st, const sae__shape *shape,
                      const char *const names[SAE__TENSOR_END], unsigned transpose,
                      const sae__st_tensor *srcs[SAE__TENSOR_END])
{
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END; t++) {
        srcs[t] = NULL;
        size_t d0, d1 = 0;
        switch (t) {
        case SAE_W_ENC: d0 = shape->d_in, d1 = shape->d_sae; break;
        case SAE_W_DEC: d0 = shape->d_sae, d1 = shape->d_out; break;
        case SAE_B_DEC: d0 = shape->d_out; break;
        case SAE_W_SKIP: d0 = shape->d_in, d1 = shape->d_out; break;
        default: d0 = shape->d_sae; break;
        }
        bool wanted = t <= SAE_B_DEC || (t == SAE_THRESHOLD && shape->arch == SAE_ARCH_JUMPRELU) ||
                      (t == SAE_W_SKIP && shape->skip) ||
                      ((t == SAE_R_MAG || t == SAE_B_MAG) && shape->arch == SAE_ARCH_GATED);
        if (!wanted)
            continue;
        if (((transpose >> t) & 1u) && d1 != 0) {
            size_t tmp = d0;
            d0 = d1;
            d1 = tmp;
        }
        if (names[t] == NULL)
            return sae__fail(SAE_EFORMAT, "%s: no tensor for %s", st->path, sae__tensor_names[t]);
        int rc = sae__st_expect(st, names[t], d0, d1, &srcs[t]);
        if (rc != SAE_OK)
            return rc;
    }
    return SAE_OK;
}

int sae__model_from_st(const sae__safetensors *st, sae__map *map, const sae__shape *shape,
                       const char *const names[SAE__TENSOR_END], unsigned transpose,
                       const char *format, sae_model **out)
{
    *out = NULL;
    const sae__st_tensor *srcs[SAE__TENSOR_END];
    int rc = expect_all(st, shape, names, transpose, srcs);
    if (rc != SAE_OK)
        return rc;
    sae_model *m;
    if ((rc = sae__model_alloc(&m, shape)) != SAE_OK)
        return sae__wrap(rc, "%s: ", st->path);
    bool take = map != NULL && map->data != NULL && map->data == st->data;
    if (take)
        m->map = *map;
    m->format = format;
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END && rc == SAE_OK; t++) {
        if (srcs[t] == NULL)
            continue;
        bool flip = ((transpose >> t) & 1u) && srcs[t]->ndim == 2;
        rc = sae__model_load_tensor(m, (sae_tensor)t, st, srcs[t], flip);
        if (srcs[t]->dtype != SAE__F32)
            m->dtype = srcs[t]->dtype;
    }
    /* exp(r_mag) must stay a normal float, as sae_model_set_tensor demands. */
    for (size_t i = 0; rc == SAE_OK && m->r_mag != NULL && i < m->d_sae; i++)
        if (!(m->r_mag[i] > -87.0f && m->r_mag[i] < 88.0f))
            rc = sae__fail(SAE_EFORMAT, "%s: %s[%zu] = %g: exp(r_mag) must be a normal float "
                           "(|r_mag| < 87)", st->path, names[SAE_R_MAG], i, (double)m->r_mag[i]);
    if (rc != SAE_OK) {
        if (take)
            m->map = (sae__map){0}; /* the caller still owns the mapping */
        sae_model_free(m);
        return rc;
    }
    sae__model_weights_changed(m);
    if (take)
        *map = (sae__map){0};
    *out = m;
    return SAE_OK;
}

/* d_in and d_sae: at least 1, and at most what a uint32 index (and the model) can hold. */
static int meta_size(const sae__safetensors *st, const char *key, size_t *out)
{
    int rc = sae__st_meta_size(st, key, UINT32_MAX, out);
    if (rc == SAE_OK && *out == 0)
        rc = sae__fail(SAE_EFORMAT, "%s: __metadata__['%s'] = '0' is not a size (at least 1)",
                       st->path, key);
    return rc;
}

/* format_version says how to read the rest; a file of a later version may mean something else
 * by the same keys, so it is refused rather than guessed at. Absent is read as "1": every libsae
 * has written it, so its absence cannot mean a newer format (other tools building libsae files
 * by hand tend to leave it out). */
static int check_format_version(const sae__safetensors *st, size_t *version)
{
    *version = 1;
    if (sae__st_meta(st, "format_version") == NULL)
        return SAE_OK;
    int rc = sae__st_meta_size(st, "format_version", SIZE_MAX, version);
    if (rc != SAE_OK)
        return rc;
    if (*version < 1 || *version > OWN_FORMAT_VERSION)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: libsae file format_version %zu is not supported: this library "
                         "reads format_version 1 to %u (a newer libsae wrote the file?)",
                         st->path, *version, OWN_FORMAT_VERSION);
    return SAE_OK;
}

/* Reads libsae's own file; takes ownership of *map on success when it holds st's data. */
static int load_own(const sae__safetensors *st, sae__map *map, sae_model **out)
{
    const char *arch_name = sae__st_meta(st, "architecture");
    sae_arch arch;
    size_t version;
    int rc = check_format_version(st, &version);
    if (rc != SAE_OK)
        return rc;
    if (arch_name == NULL)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ has no 'architecture'", st->path);
    if (sae_arch_from_name(arch_name, &arch) != SAE_OK)
        return sae__fail(SAE_EUNSUPPORTED, "%s: architecture '%.40s' is not supported", st->path,
                         arch_name);
    sae__shape shape = {arch, 0, 0, 0, false, false};
    if ((rc = meta_size(st, "d_in", &shape.d_in)) != SAE_OK ||
        (rc = meta_size(st, "d_sae", &shape.d_sae)) != SAE_OK)
        return rc;
    /* Version 2's additions; a version 1 file has none of them. */
    const char *kind = sae__st_meta(st, "kind");
    if (version < 2 && (kind != NULL || sae__st_meta(st, "normalize") != NULL ||
                        arch > SAE_ARCH_JUMPRELU))
        return sae__fail(SAE_EFORMAT, "%s: a format_version 1 file has no %s", st->path,
                         kind != NULL ? "'kind'" : arch > SAE_ARCH_JUMPRELU ? "such architecture"
                                                                            : "'normalize'");
    shape.d_out = shape.d_in;
    if (kind != NULL && strcmp(kind, "sae") != 0) {
        if (strcmp(kind, "transcoder") != 0 && strcmp(kind, "skip_transcoder") != 0)
            return sae__fail(SAE_EUNSUPPORTED, "%s: __metadata__['kind'] = '%.40s' is not a kind "
                             "libsae runs (sae, transcoder, skip_transcoder)", st->path, kind);
        shape.transcoder = true;
        shape.skip = strcmp(kind, "skip_transcoder") == 0;
        if ((rc = meta_size(st, "d_out", &shape.d_out)) != SAE_OK)
            return rc;
    }
    sae_normalize normalize = SAE_NORMALIZE_NONE;
    const char *norm = sae__st_meta(st, "normalize");
    if (norm != NULL && sae__normalize_from_name(norm, &normalize) != SAE_OK)
        return sae__fail(SAE_EUNSUPPORTED, "%s: __metadata__['normalize'] = '%.40s' is not one "
                         "libsae runs (none, layer_norm, constant_norm)", st->path, norm);
    sae_model *m;
    if ((rc = sae__model_from_st(st, map, &shape, sae__tensor_names, 0, "libsae", &m)) != SAE_OK)
        return rc;
    /* Counts and flags are whole numbers, floats are %.9g: each read with its strict spelling,
     * then set through sae_model_set_param, whose ranges (checked as floats) are the model's. */
    static const struct {
        const char *key;
        sae_model_param param;
        bool whole;
    } params[] = {
        {"apply_b_dec_to_input", SAE_PARAM_APPLY_B_DEC_TO_INPUT, true},
        {"input_scale", SAE_PARAM_INPUT_SCALE, false},
        {"k", SAE_PARAM_K, true},
        {"batch_threshold", SAE_PARAM_THRESHOLD, false},
    };
    for (size_t i = 0; i < sizeof params / sizeof params[0] && rc == SAE_OK; i++) {
        bool has_k = arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK ||
                     arch == SAE_ARCH_GROUPMAX;
        if ((params[i].param == SAE_PARAM_K && !has_k) ||
            (params[i].param == SAE_PARAM_THRESHOLD && arch != SAE_ARCH_BATCHTOPK))
            continue;
        double v = 0;
        size_t count = 0;
        if (params[i].whole) {
            rc = sae__st_meta_size(st, params[i].key, UINT32_MAX, &count);
            v = (double)count;
        } else {
            rc = sae__st_meta_number(st, params[i].key, false, &v);
        }
        if (rc == SAE_OK && sae_model_set_param(m, params[i].param, v) != SAE_OK)
            rc = sae__wrap(SAE_EFORMAT, "%s: __metadata__['%s']: ", st->path, params[i].key);
    }
    if (rc == SAE_OK && sae_model_set_param(m, SAE_PARAM_NORMALIZE, normalize) != SAE_OK)
        rc = sae__wrap(SAE_EFORMAT, "%s: __metadata__['normalize']: ", st->path);
    if (rc != SAE_OK) {
        sae_model_free(m); /* it owns the mapping now; the caller's copy was zeroed */
        return rc;
    }
    *out = m;
    return SAE_OK;
}

/* Names the first few tensors of a file that is no SAE we know, so the user sees what it is. */
static int not_an_sae(const sae__safetensors *st)
{
    char names[256] = "";
    size_t used = 0;
    for (size_t i = 0; i < st->n_tensors && i < 6 && used < sizeof names; i++) {
        int w = snprintf(names + used, sizeof names - used, "%s'%.40s'", i ? ", " : "",
                         st->tensors[i].name);
        if (w > 0)
            used += (size_t)w;
    }
    return sae__fail(SAE_EFORMAT,
                     "%s: not an SAE file libsae knows: expected tensor W_enc (libsae, SAELens) "
                     "or encoder.weight (sparsify); found %zu tensor(s)%s%s",
                     st->path, st->n_tensors, st->n_tensors ? ": " : "", names);
}

int sae__load_safetensors(const unsigned char *data, size_t size, sae__map *map, const char *path,
                          const char *cfg_text, size_t cfg_len, const char *cfg_path,
                          const char *scaler_text, size_t scaler_len, const char *scaler_path,
                          sae_model **out)
{
    *out = NULL;
    sae__safetensors st;
    int rc = sae__st_parse(&st, data, size, path);
    if (rc != SAE_OK)
        return rc;
    const char *format = sae__st_meta(&st, "format");
    if (format != NULL && strcmp(format, "libsae") == 0) {
        rc = load_own(&st, map, out);
    } else if (sae__st_find(&st, "encoder.weight") != NULL) {
        sae__sparsify_cfg cfg;
        if (cfg_text == NULL)
            rc = sae__fail(SAE_EFORMAT,
                           "%s: sparsify weights (encoder.weight) need the cfg.json written "
                           "beside them (it holds d_in and k), and there is none",
                           path);
        else if ((rc = sae__sparsify_cfg_parse(cfg_text, cfg_len, cfg_path, &cfg)) == SAE_OK)
            rc = sae__sparsify_load(&st, map, &cfg, out);
    } else if (sae__st_find(&st, "W_enc") != NULL) {
        sae__saelens_cfg cfg;
        double scale = 0;
        if (cfg_text != NULL &&
            (rc = sae__saelens_cfg_parse(cfg_text, cfg_len, cfg_path, &cfg)) == SAE_OK &&
            cfg.norm == SAE__NORM_EXPECTED_AVERAGE && scaler_text != NULL)
            rc = sae__saelens_scaler_parse(scaler_text, scaler_len, scaler_path, &scale);
        if (rc == SAE_OK)
            rc = sae__saelens_load(&st, map, cfg_text ? &cfg : NULL, scale, out);
    } else {
        rc = not_an_sae(&st);
    }
    sae__st_close(&st);
    return rc;
}

/* dir/name, malloc'd. */
static char *join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p == NULL) {
        sae__fail(SAE_ENOMEM, "out of memory");
        return NULL;
    }
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

/* The folder of a file path, malloc'd ("." for a bare name). */
static char *folder_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t len = slash == NULL ? 0 : slash == path ? 1 : (size_t)(slash - path);
    char *dir = malloc(len ? len + 1 : 2);
    if (dir == NULL) {
        sae__fail(SAE_ENOMEM, "out of memory");
        return NULL;
    }
    if (len == 0)
        strcpy(dir, ".");
    else {
        memcpy(dir, path, len);
        dir[len] = '\0';
    }
    return dir;
}

static bool is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* A small file beside the weights: *text NULL (and SAE_OK) when there is none. */
typedef struct {
    char *path, *text;
    size_t len;
} side_file;

static int read_side(const char *dir, const char *name, side_file *f)
{
    f->text = NULL;
    f->len = 0;
    f->path = join(dir, name);
    if (f->path == NULL)
        return SAE_ENOMEM;
    struct stat sb;
    if (stat(f->path, &sb) != 0 && errno == ENOENT)
        return SAE_OK;
    return sae__read_small_file(f->path, MAX_CFG_BYTES, &f->text, &f->len);
}

static void free_side(side_file *f)
{
    free(f->path);
    free(f->text);
}

static int load_dir(const char *dir, unsigned flags, sae_model **out);

/* follow_cfg: a config file stands for its folder (only when the user named it, so that a
 * weights file that looks like JSON cannot send the folder search round in a loop). */
static int load_file(const char *path, bool follow_cfg, unsigned flags, sae_model **out)
{
    sae__map map;
    int rc = sae__map_file(path, &map, (flags & SAE_LOAD_COPY) != 0);
    if (rc != SAE_OK)
        return rc;
    const unsigned char *d = map.data;
    if (map.size >= 4 && d[0] == 'P' && d[1] == 'K' &&
        ((d[2] == 3 && d[3] == 4) || (d[2] == 5 && d[3] == 6))) {
        rc = sae__npz_load(map.data, map.size, path, out);
        sae__unmap(&map);
        return rc;
    }
    size_t lead = 0;
    while (lead < map.size && lead < 64 && (d[lead] == ' ' || d[lead] == '\n' || d[lead] == '\t'))
        lead++;
    if (follow_cfg && lead < map.size && d[lead] == '{') {
        /* A config (cfg.json): the SAE is the folder it describes. */
        sae__unmap(&map);
        char *dir = folder_of(path);
        if (dir == NULL)
            return SAE_ENOMEM;
        rc = load_dir(dir, flags, out);
        free(dir);
        return rc;
    }
    char *dir = folder_of(path);
    side_file cfg = {0}, scaler = {0};
    if (dir == NULL)
        rc = SAE_ENOMEM;
    if (rc == SAE_OK)
        rc = read_side(dir, "cfg.json", &cfg);
    if (rc == SAE_OK)
        rc = read_side(dir, "activation_scaler.json", &scaler);
    if (rc == SAE_OK)
        rc = sae__load_safetensors(map.data, map.size, &map, path, cfg.text, cfg.len, cfg.path,
                                   scaler.text, scaler.len, scaler.path, out);
    free_side(&cfg);
    free_side(&scaler);
    free(dir);
    sae__unmap(&map); /* a no-op when the model took it */
    return rc;
}

/* A folder: the weights file each tool writes, found by its name, then read by its content. */
static int load_dir(const char *dir, unsigned flags, sae_model **out)
{
    static const char *const names[] = {"sae_weights.safetensors", "sae.safetensors",
                                        "params.npz"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *path = join(dir, names[i]);
        if (path == NULL)
            return SAE_ENOMEM;
        if (is_file(path)) {
            int rc = load_file(path, false, flags, out);
            free(path);
            return rc;
        }
        free(path);
    }
    return sae__fail(SAE_EFORMAT,
                     "%s: a folder without SAE weights: expected sae_weights.safetensors "
                     "(SAELens), sae.safetensors (sparsify) or params.npz (Gemma Scope)",
                     dir);
}

int sae_model_load_with(sae_model **out, const char *path, unsigned flags)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    SAE_CHECK_NULL(path);
    if (flags & ~(unsigned)SAE_LOAD_COPY)
        return sae__fail(SAE_EINVAL, "%s: unknown load flags 0x%x", __func__,
                         flags & ~(unsigned)SAE_LOAD_COPY);
    struct stat sb;
    if (stat(path, &sb) != 0)
        return sae__fail(SAE_EIO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode))
        return load_dir(path, flags, out);
    return load_file(path, true, flags, out);
}

int sae_model_load(sae_model **out, const char *path) { return sae_model_load_with(out, path, 0); }

int sae_model_save(const sae_model *m, const char *path)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(path);
    char d_in[24], d_sae[24], d_out[24], k[24], apply[4], scale[32], theta[32];
    snprintf(d_in, sizeof d_in, "%zu", m->d_in);
    snprintf(d_sae, sizeof d_sae, "%zu", m->d_sae);
    snprintf(d_out, sizeof d_out, "%zu", m->d_out);
    snprintf(k, sizeof k, "%zu", m->k);
    snprintf(apply, sizeof apply, "%d", m->apply_b_dec);
    /* %.9g round-trips every float exactly. */
    snprintf(scale, sizeof scale, "%.9g", (double)m->input_scale);
    snprintf(theta, sizeof theta, "%.9g", (double)m->batch_threshold);
    /* A model libsae 0.1 could run is written as version 1, which 0.1 reads; anything it added
     * since (a transcoder, gated, GroupMax, a normalization) as version 2. */
    bool v1 = !m->transcoder && m->normalize == SAE_NORMALIZE_NONE && m->arch <= SAE_ARCH_JUMPRELU;
    const char *keys[16], *values[16];
    size_t n_meta = 0;
#define META(key, value) (keys[n_meta] = (key), values[n_meta++] = (value))
    META("format", "libsae");
    META("format_version", v1 ? "1" : "2");
    META("libsae_version", sae_version_string());
    META("architecture", sae_arch_name(m->arch));
    META("d_in", d_in);
    META("d_sae", d_sae);
    META("apply_b_dec_to_input", apply);
    META("input_scale", scale);
    if (m->arch == SAE_ARCH_TOPK || m->arch == SAE_ARCH_BATCHTOPK || m->arch == SAE_ARCH_GROUPMAX)
        META("k", k);
    if (m->arch == SAE_ARCH_BATCHTOPK)
        META("batch_threshold", theta);
    if (m->transcoder) {
        META("kind", m->skip ? "skip_transcoder" : "transcoder");
        META("d_out", d_out);
    }
    if (m->normalize != SAE_NORMALIZE_NONE)
        META("normalize", sae__normalize_name(m->normalize));
#undef META
    /* Sorted by name, as torch writes them. */
    const sae__st_out all[] = {
        {"W_dec", 2, {m->d_sae, m->d_out}, m->W_dec, m->W_dec16},
        {"W_enc", 2, {m->d_in, m->d_sae}, m->W_enc, m->W_enc16},
        {"W_skip", 2, {m->d_in, m->d_out}, m->W_skip, NULL},
        {"b_dec", 1, {m->d_out, 0}, m->b_dec, NULL},
        {"b_enc", 1, {m->d_sae, 0}, m->b_enc, NULL},
        {"b_mag", 1, {m->d_sae, 0}, m->b_mag, NULL},
        {"r_mag", 1, {m->d_sae, 0}, m->r_mag, NULL},
        {"threshold", 1, {m->d_sae, 0}, m->threshold, NULL},
    };
    sae__st_out tensors[sizeof all / sizeof all[0]];
    size_t n_tensors = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i].data != NULL || all[i].bf16 != NULL)
            tensors[n_tensors++] = all[i];
    return sae__st_write(path, tensors, n_tensors, keys, values, n_meta);
}
