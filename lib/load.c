/* sae_model_load: finds out what a path holds, from its content and its folder, and hands it to
 * the right reader (libsae's own file here; SAELens, sparsify and Gemma Scope in their own
 * files); plus libsae's own file format, read and written. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* cfg.json and activation_scaler.json are a few kB; anything near this is not one. */
#define MAX_CFG_BYTES (1u << 20)

/* The newest version this library writes and reads; it reads every older one too. Version 2
 * added transcoders, gated, GroupMax and the normalizations; a model without them is still
 * written as version 1, which libsae 0.1 reads. */
#define OWN_FORMAT_VERSION 2u

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
                     "%s: not an SAE file libsae knows: expected tensor W_enc (libsae, SAELens, "
                     "circuit-tracer), w_enc (Gemma Scope 2) or encoder.weight (sparsify, Llama "
                     "Scope); found %zu tensor(s)%s%s",
                     st->path, st->n_tensors, st->n_tensors ? ": " : "", names);
}

int sae__load_safetensors_ex(const unsigned char *data, size_t size, sae__map *map,
                             const char *path, const sae__sides *sides, sae_model **out)
{
    *out = NULL;
    static const sae__sides none = {{NULL, 0, NULL}, {NULL, 0, NULL}, {NULL, 0, NULL},
                                    {NULL, 0, NULL}, NULL, {NULL, 0, NULL}};
    if (sides == NULL)
        sides = &none;
    const char *cfg_text = sides->cfg.text;
    sae__safetensors st;
    int rc = sae__st_parse(&st, data, size, path);
    if (rc != SAE_OK)
        return rc;
    const char *format = sae__st_meta(&st, "format");
    if (format != NULL && strcmp(format, "libsae") == 0) {
        rc = load_own(&st, map, out);
    } else if (sae__st_find(&st, "w_enc") != NULL) {
        /* Lowercase w_enc is Gemma Scope 2's spelling (circuit-tracer detects it the same way). */
        rc = sae__gemmascope2_load(&st, map, sides, out);
    } else if (sae__llamascope_r1_like(&st) ||
               (sae__st_find(&st, "encoder.weight") != NULL && sides->config.text != NULL &&
                cfg_text == NULL && sides->hyperparams.text == NULL)) {
        /* lm_saes 2025 (Llama Scope R1): the JumpReLU's log threshold, W_E with W_D, or
         * encoder.weight with lm_saes's config.json (sparsify writes cfg.json). */
        rc = sae__llamascope_r1_load(&st, map, &sides->config, out);
    } else if (sae__st_find(&st, "encoder.weight") != NULL && sides->hyperparams.text != NULL) {
        /* hyperparams.json is lm_saes's, never sparsify's: a Llama Scope checkpoint. */
        rc = sae__llamascope_load(&st, map, &sides->hyperparams, out);
    } else if (sae__st_find(&st, "encoder.weight") != NULL) {
        sae__sparsify_cfg cfg;
        if (cfg_text == NULL)
            rc = sae__fail(SAE_EFORMAT,
                           "%s: sparsify weights (encoder.weight) need the cfg.json written "
                           "beside them (it holds d_in and k), and there is none (a Llama Scope "
                           "checkpoint needs its hyperparams.json)",
                           path);
        else if ((rc = sae__sparsify_cfg_parse(cfg_text, sides->cfg.len, sides->cfg.path,
                                               &cfg)) == SAE_OK)
            rc = sae__sparsify_load(&st, map, &cfg, out);
    } else if (sae__st_find(&st, "W_enc") != NULL && cfg_text == NULL &&
               sae__circuit_tracer_like(&st)) {
        rc = sae__circuit_tracer_load(&st, map, &sides->yaml, out);
    } else if (sae__st_find(&st, "W_enc") != NULL) {
        sae__saelens_cfg cfg;
        double scale = 0;
        if (cfg_text != NULL &&
            (rc = sae__saelens_cfg_parse(cfg_text, sides->cfg.len, sides->cfg.path, &cfg)) ==
                SAE_OK &&
            cfg.norm == SAE__NORM_EXPECTED_AVERAGE && sides->scaler.text != NULL)
            rc = sae__saelens_scaler_parse(sides->scaler.text, sides->scaler.len,
                                           sides->scaler.path, &scale);
        if (rc == SAE_OK)
            rc = sae__saelens_load(&st, map, cfg_text ? &cfg : NULL, scale, out);
    } else {
        rc = not_an_sae(&st);
    }
    sae__st_close(&st);
    return rc;
}

int sae__load_safetensors(const unsigned char *data, size_t size, sae__map *map, const char *path,
                          const char *cfg_text, size_t cfg_len, const char *cfg_path,
                          const char *scaler_text, size_t scaler_len, const char *scaler_path,
                          sae_model **out)
{
    const sae__sides sides = {{cfg_text, cfg_len, cfg_path},
                              {scaler_text, scaler_len, scaler_path},
                              {NULL, 0, NULL},
                              {NULL, 0, NULL},
                              NULL,
                              {NULL, 0, NULL}};
    return sae__load_safetensors_ex(data, size, map, path, &sides, out);
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

/* Gemma Scope 2's config.json beside params.safetensors, and Llama Scope's hyperparams.json,
 * which lm_saes keeps in the run folder while the weights sit in its checkpoints/ subfolder. */
static int read_sides_2026(const char *dir, side_file *config, side_file *hyper)
{
    int rc = read_side(dir, "config.json", config);
    if (rc == SAE_OK)
        rc = read_side(dir, "hyperparams.json", hyper);
    const char *base = strrchr(dir, '/');
    base = base ? base + 1 : dir;
    if (rc == SAE_OK && hyper->text == NULL && strcmp(base, "checkpoints") == 0) {
        free_side(hyper);
        rc = read_side(dir, "../hyperparams.json", hyper);
    }
    return rc;
}

/* A torch.save file (torchsae.c), with the config.json its publisher may write beside it. */
static int load_torch(const char *path, const sae__map *map, sae_model **out)
{
    char *dir = folder_of(path);
    side_file cfg = {0};
    int rc = dir == NULL ? SAE_ENOMEM : read_side(dir, "config.json", &cfg);
    if (rc == SAE_OK)
        rc = sae__torchsae_load(map->data, map->size, path, cfg.text, cfg.len, cfg.path, out);
    free_side(&cfg);
    free(dir);
    return rc;
}

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
        if (sae__torchsae_detect(map.data, map.size))
            rc = load_torch(path, &map, out);
        else
            rc = sae__npz_load(map.data, map.size, path, out);
        sae__unmap(&map);
        return rc;
    }
    size_t lead = 0;
    while (lead < map.size && lead < 64 && (d[lead] == ' ' || d[lead] == '\n' || d[lead] == '\t'))
        lead++;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (follow_cfg && ((lead < map.size && d[lead] == '{') || strcmp(base, "config.yaml") == 0)) {
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
    side_file cfg = {0}, scaler = {0}, config = {0}, hyper = {0}, yaml = {0};
    if (dir == NULL)
        rc = SAE_ENOMEM;
    if (rc == SAE_OK)
        rc = read_side(dir, "cfg.json", &cfg);
    if (rc == SAE_OK)
        rc = read_side(dir, "activation_scaler.json", &scaler);
    if (rc == SAE_OK)
        rc = read_sides_2026(dir, &config, &hyper);
    if (rc == SAE_OK) /* circuit-tracer's transcoder sets */
        rc = read_side(dir, "config.yaml", &yaml);
    if (rc == SAE_OK) {
        const char *slash = strrchr(path, '/');
        const sae__sides sides = {{cfg.text, cfg.len, cfg.path},
                                  {scaler.text, scaler.len, scaler.path},
                                  {config.text, config.len, config.path},
                                  {hyper.text, hyper.len, hyper.path},
                                  slash ? slash + 1 : path,
                                  {yaml.text, yaml.len, yaml.path}};
        rc = sae__load_safetensors_ex(map.data, map.size, &map, path, &sides, out);
    }
    free_side(&cfg);
    free_side(&scaler);
    free_side(&config);
    free_side(&hyper);
    free_side(&yaml);
    free(dir);
    sae__unmap(&map); /* a no-op when the model took it */
    return rc;
}

/* A folder: the weights file each tool writes, found by its name, then read by its content. */
static int load_dir(const char *dir, unsigned flags, sae_model **out)
{
    /* A Llama Scope run folder: lm_saes's from_config takes the first of these that exists. */
    char *hp = join(dir, "hyperparams.json");
    if (hp == NULL)
        return SAE_ENOMEM;
    bool lm_saes = is_file(hp);
    free(hp);
    static const char *const lm_names[] = {"sae_weights.safetensors",
                                           "checkpoints/pruned.safetensors",
                                           "checkpoints/final.safetensors"};
    for (size_t i = 0; lm_saes && i < sizeof lm_names / sizeof lm_names[0]; i++) {
        char *path = join(dir, lm_names[i]);
        if (path == NULL)
            return SAE_ENOMEM;
        if (is_file(path)) {
            int rc = load_file(path, false, flags, out);
            free(path);
            return rc;
        }
        free(path);
    }
    static const char *const names[] = {"sae_weights.safetensors", "sae.safetensors",
                                        "params.safetensors", "params.npz", "ae.pt"};
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
    /* circuit-tracer's config.yaml describes a set of per-layer models, or one it refuses. */
    side_file yaml = {0};
    int rc = read_side(dir, "config.yaml", &yaml);
    if (rc == SAE_OK && yaml.text != NULL) {
        const sae__side_text y = {yaml.text, yaml.len, yaml.path};
        rc = sae__circuit_tracer_set_refusal(dir, &y);
    }
    free_side(&yaml);
    if (rc != SAE_OK)
        return rc;
    return sae__fail(SAE_EFORMAT,
                     "%s: a folder without SAE weights: expected sae_weights.safetensors "
                     "(SAELens), sae.safetensors (sparsify), params.safetensors (Gemma Scope 2), "
                     "params.npz (Gemma Scope), ae.pt (dictionary_learning) or hyperparams.json "
                     "with checkpoints/final.safetensors (Llama Scope)",
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

size_t sae__model_meta(const sae_model *m, sae__model_meta_text *txt, const char **keys,
                       const char **values)
{
    snprintf(txt->d_in, sizeof txt->d_in, "%zu", m->d_in);
    snprintf(txt->d_sae, sizeof txt->d_sae, "%zu", m->d_sae);
    snprintf(txt->d_out, sizeof txt->d_out, "%zu", m->d_out);
    snprintf(txt->k, sizeof txt->k, "%zu", m->k);
    snprintf(txt->apply, sizeof txt->apply, "%d", m->apply_b_dec);
    /* %.9g round-trips every float exactly. */
    snprintf(txt->scale, sizeof txt->scale, "%.9g", (double)m->input_scale);
    snprintf(txt->theta, sizeof txt->theta, "%.9g", (double)m->batch_threshold);
    /* A model libsae 0.1 could run is written as version 1, which 0.1 reads; anything it added
     * since (a transcoder, gated, GroupMax, a normalization) as version 2. */
    bool v1 = !m->transcoder && m->normalize == SAE_NORMALIZE_NONE && m->arch <= SAE_ARCH_JUMPRELU;
    size_t n_meta = 0;
#define META(key, value) (keys[n_meta] = (key), values[n_meta++] = (value))
    META("format", "libsae");
    META("format_version", v1 ? "1" : "2");
    META("libsae_version", sae_version_string());
    META("architecture", sae_arch_name(m->arch));
    META("d_in", txt->d_in);
    META("d_sae", txt->d_sae);
    META("apply_b_dec_to_input", txt->apply);
    META("input_scale", txt->scale);
    if (m->arch == SAE_ARCH_TOPK || m->arch == SAE_ARCH_BATCHTOPK || m->arch == SAE_ARCH_GROUPMAX)
        META("k", txt->k);
    if (m->arch == SAE_ARCH_BATCHTOPK)
        META("batch_threshold", txt->theta);
    if (m->transcoder) {
        META("kind", m->skip ? "skip_transcoder" : "transcoder");
        META("d_out", txt->d_out);
    }
    if (m->normalize != SAE_NORMALIZE_NONE)
        META("normalize", sae__normalize_name(m->normalize));
#undef META
    return n_meta;
}

int sae_model_save(const sae_model *m, const char *path)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(path);
    sae__model_meta_text txt;
    const char *keys[SAE__MODEL_META_MAX], *values[SAE__MODEL_META_MAX];
    size_t n_meta = sae__model_meta(m, &txt, keys, values);
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
