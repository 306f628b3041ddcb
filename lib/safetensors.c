/* The safetensors container: an 8-byte little-endian header length, a JSON header naming each
 * tensor's dtype, shape and byte range, then the data. Every number in the header is checked
 * before it is used; the data is never touched here, only located. */
#include "formats.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The reference implementation refuses headers over 100 MB; so do we. */
#define MAX_HEADER_BYTES 100000000u
#define MAX_DIMS 4

static const struct {
    const char *name;
    size_t size;
    int dtype; /* sae__dtype, or -1 for types we locate but never convert */
} dtypes[] = {
    {"F32", 4, SAE__F32}, {"F16", 2, SAE__F16},   {"BF16", 2, SAE__BF16}, {"F64", 8, SAE__F64},
    {"BOOL", 1, -1},      {"U8", 1, -1},          {"I8", 1, -1},          {"F8_E4M3", 1, -1},
    {"F8_E5M2", 1, -1},   {"I16", 2, -1},         {"U16", 2, -1},         {"I32", 4, -1},
    {"U32", 4, -1},       {"I64", 8, -1},         {"U64", 8, -1},
};

/* A JSON number that is a whole number in [0, 2^53], as a size_t. */
static bool json_size(const cJSON *item, size_t *out)
{
    if (!cJSON_IsNumber(item))
        return false;
    double v = item->valuedouble;
    if (!(v >= 0.0 && v <= 9007199254740992.0) || v != floor(v))
        return false;
    *out = (size_t)v;
    return true;
}

/* By (begin, end), as the reference reader sorts data_offsets: an empty tensor sharing its
 * begin with a non-empty one then comes first whatever the header's order, so that whether a
 * file tiles does not depend on the order of its keys. */
static int by_offset(const void *a, const void *b)
{
    const sae__st_tensor *x = a, *y = b;
    if (x->offset != y->offset)
        return (x->offset > y->offset) - (x->offset < y->offset);
    return (x->nbytes > y->nbytes) - (x->nbytes < y->nbytes);
}

static int parse_tensor(const sae__safetensors *st, const cJSON *entry, size_t data_start,
                        sae__st_tensor *t)
{
    const char *path = st->path, *name = entry->string;
    if (!cJSON_IsObject(entry))
        return sae__fail(SAE_EFORMAT, "%s: header entry '%s' is not an object", path, name);
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    const cJSON *offsets = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    if (!cJSON_IsString(dtype))
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has no string 'dtype'", path, name);
    size_t elem = 0;
    t->dtype = SAE__DTYPE_COUNT;
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
        if (strcmp(dtype->valuestring, dtypes[i].name) == 0) {
            elem = dtypes[i].size;
            if (dtypes[i].dtype >= 0)
                t->dtype = (sae__dtype)dtypes[i].dtype;
        }
    }
    if (elem == 0)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has unknown dtype '%.32s'", path, name,
                         dtype->valuestring);
    if (!cJSON_IsArray(shape))
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has no 'shape' array", path, name);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > MAX_DIMS)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has %d dimensions (at most %d)", path,
                         name, ndim, MAX_DIMS);
    t->ndim = (size_t)ndim;
    t->count = 1;
    size_t d = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape) {
        if (!json_size(dim, &t->shape[d]))
            return sae__fail(SAE_EFORMAT, "%s: tensor '%s': shape[%zu] is not a whole number >= 0",
                             path, name, d);
        if (!sae__mul(t->count, t->shape[d], &t->count))
            return sae__fail(SAE_EFORMAT, "%s: tensor '%s': shape overflows", path, name);
        d++;
    }
    if (!sae__mul(t->count, elem, &t->nbytes))
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s': byte size overflows", path, name);
    size_t begin, end;
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        !json_size(cJSON_GetArrayItem(offsets, 0), &begin) ||
        !json_size(cJSON_GetArrayItem(offsets, 1), &end))
        return sae__fail(SAE_EFORMAT,
                         "%s: tensor '%s': 'data_offsets' must be two whole numbers >= 0", path,
                         name);
    if (end < begin)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s': data_offsets [%zu, %zu] are reversed",
                         path, name, begin, end);
    if (end - begin != t->nbytes)
        return sae__fail(SAE_EFORMAT,
                         "%s: tensor '%s': data_offsets [%zu, %zu] hold %zu bytes, but %s of "
                         "%zu elements needs %zu",
                         path, name, begin, end, end - begin, dtype->valuestring, t->count,
                         t->nbytes);
    if (end > st->size - data_start)
        return sae__fail(SAE_EFORMAT,
                         "%s: tensor '%s' ends at data offset %zu, past the end of the file "
                         "(%zu data bytes): truncated?",
                         path, name, end, st->size - data_start);
    t->name = name;
    t->offset = data_start + begin;
    return SAE_OK;
}

static int parse_metadata(const sae__safetensors *st, const cJSON *meta)
{
    if (!cJSON_IsObject(meta))
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ is not an object", st->path);
    const cJSON *item;
    cJSON_ArrayForEach(item, meta) {
        if (!cJSON_IsString(item))
            return sae__fail(SAE_EFORMAT, "%s: __metadata__['%s'] is not a string", st->path,
                             item->string);
    }
    return SAE_OK;
}

int sae__st_parse(sae__safetensors *st, const unsigned char *data, size_t size, const char *path)
{
    memset(st, 0, sizeof *st);
    st->data = data;
    st->size = size;
    st->path = path;
    if (size < 8)
        return sae__fail(SAE_EFORMAT, "%s: %zu bytes is too short for a safetensors file", path,
                         size);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | data[i];
    if (header_len > MAX_HEADER_BYTES || header_len > size - 8)
        return sae__fail(SAE_EFORMAT,
                         "%s: header length %llu does not fit (file has %zu bytes after the "
                         "length, limit %u)",
                         path, (unsigned long long)header_len, size - 8, MAX_HEADER_BYTES);
    if (header_len < 2 || data[8] != '{')
        return sae__fail(SAE_EFORMAT, "%s: the header is not a JSON object", path);
    size_t data_start = 8 + (size_t)header_len;
    int rc = sae__json_parse_object((const char *)data + 8, (size_t)header_len, path,
                                    &st->header);
    if (rc != SAE_OK)
        return rc;

    size_t n = 0;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, st->header) {
        if (strcmp(entry->string, "__metadata__") != 0)
            n++;
    }
    st->tensors = calloc(n ? n : 1, sizeof *st->tensors);
    if (st->tensors == NULL) {
        sae__st_close(st);
        return sae__fail(SAE_ENOMEM, "%s: cannot allocate %zu tensor entries", path, n);
    }
    /* sae__json_parse_object has refused repeated keys (a tensor or __metadata__ twice). */
    cJSON_ArrayForEach(entry, st->header) {
        if (strcmp(entry->string, "__metadata__") == 0) {
            st->metadata = entry;
            if ((rc = parse_metadata(st, entry)) != SAE_OK)
                break;
            continue;
        }
        rc = parse_tensor(st, entry, data_start, &st->tensors[st->n_tensors]);
        if (rc != SAE_OK)
            break;
        st->n_tensors++;
    }
    if (rc != SAE_OK) {
        sae__st_close(st);
        return rc;
    }

    /* The byte ranges must tile the data area exactly, as the reference reader demands. */
    sae__st_tensor *sorted = malloc((n ? n : 1) * sizeof *sorted);
    if (sorted == NULL) {
        sae__st_close(st);
        return sae__fail(SAE_ENOMEM, "%s: out of memory", path);
    }
    memcpy(sorted, st->tensors, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, by_offset);
    size_t expected = data_start;
    for (size_t i = 0; i < n && rc == SAE_OK; i++) {
        if (sorted[i].offset != expected)
            rc = sae__fail(SAE_EFORMAT,
                           "%s: tensor '%s' starts at data offset %zu, expected %zu (tensors "
                           "must be contiguous and not overlap)",
                           path, sorted[i].name, sorted[i].offset - data_start,
                           expected - data_start);
        expected = sorted[i].offset + sorted[i].nbytes;
    }
    free(sorted);
    if (rc == SAE_OK && expected != size)
        rc = sae__fail(SAE_EFORMAT, "%s: %zu bytes after the last tensor are not described",
                       path, size - expected);
    if (rc != SAE_OK)
        sae__st_close(st);
    return rc;
}

void sae__st_close(sae__safetensors *st)
{
    cJSON_Delete(st->header);
    free(st->tensors);
    st->header = NULL;
    st->metadata = NULL;
    st->tensors = NULL;
    st->n_tensors = 0;
}

const sae__st_tensor *sae__st_find(const sae__safetensors *st, const char *name)
{
    for (size_t i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0)
            return &st->tensors[i];
    return NULL;
}

const char *sae__st_meta(const sae__safetensors *st, const char *key)
{
    if (st->metadata == NULL)
        return NULL;
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(st->metadata, key);
    return cJSON_IsString(item) ? item->valuestring : NULL;
}

/* The spellings libsae writes into __metadata__ (safetensors keeps every value a string): sizes
 * as "%zu", floats as "%.9g" or "%.17g". A reader takes exactly those, so that libsae agrees
 * with Python's int() / float() of the same text and strtod's extras (hex "0x4", "inf",
 * leading spaces, a locale's decimal comma) never become a size. A float is the JSON number
 * grammar, which every %g output of a finite value follows. */
static bool plain_unsigned(const char *s)
{
    if (s[0] == '0')
        return s[1] == '\0';
    size_t i = 0;
    while (s[i] >= '0' && s[i] <= '9')
        i++;
    return i > 0 && s[i] == '\0';
}

static bool plain_decimal(const char *s)
{
    size_t i = s[0] == '-';
    if (s[i] == '0')
        i++;
    else if (s[i] >= '1' && s[i] <= '9')
        while (s[i] >= '0' && s[i] <= '9')
            i++;
    else
        return false;
    if (s[i] == '.') {
        size_t start = ++i;
        while (s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    if (s[i] == 'e' || s[i] == 'E') {
        i++;
        if (s[i] == '+' || s[i] == '-')
            i++;
        size_t start = i;
        while (s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    return s[i] == '\0';
}

int sae__st_meta_size(const sae__safetensors *st, const char *key, size_t max, size_t *out)
{
    const char *s = sae__st_meta(st, key);
    if (s == NULL)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ has no '%s'", st->path, key);
    size_t v = 0;
    bool ok = plain_unsigned(s);
    for (const char *p = s; ok && *p; p++)
        ok = sae__mul(v, 10, &v) && sae__add(v, (size_t)(*p - '0'), &v) && v <= max;
    if (!ok)
        return sae__fail(SAE_EFORMAT,
                         "%s: __metadata__['%s'] = '%.40s' is not a whole number from 0 to %zu "
                         "written in plain decimal",
                         st->path, key, s, max);
    *out = v;
    return SAE_OK;
}

int sae__st_meta_number(const sae__safetensors *st, const char *key, bool allow_nan, double *out)
{
    const char *s = sae__st_meta(st, key);
    if (s == NULL)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ has no '%s'", st->path, key);
    /* printf writes an unknown double as "nan" or "-nan". */
    if (allow_nan && (strcmp(s, "nan") == 0 || strcmp(s, "-nan") == 0)) {
        *out = NAN;
        return SAE_OK;
    }
    /* A %.17g is at most 24 characters; the copy swaps '.' for the locale's decimal point,
     * which is what strtod reads (cJSON does the same). */
    char buf[48];
    size_t n = strlen(s);
    bool ok = plain_decimal(s) && n < sizeof buf;
    double v = 0;
    if (ok) {
        memcpy(buf, s, n + 1);
        char *dot = strchr(buf, '.');
        const char *point = localeconv()->decimal_point;
        if (dot != NULL && point != NULL && point[0] != '\0' && point[1] == '\0')
            *dot = point[0];
        errno = 0;
        char *end;
        v = strtod(buf, &end);
        ok = *end == '\0' && errno != ERANGE && isfinite(v);
    }
    if (!ok)
        return sae__fail(SAE_EFORMAT,
                         "%s: __metadata__['%s'] = '%.40s' is not a finite number in plain "
                         "decimal%s",
                         st->path, key, s, allow_nan ? " (or nan)" : "");
    *out = v;
    return SAE_OK;
}

static void format_shape(char *buf, size_t size, const size_t *shape, size_t ndim)
{
    int used = snprintf(buf, size, "[");
    for (size_t i = 0; i < ndim && used > 0 && (size_t)used < size; i++)
        used += snprintf(buf + used, size - (size_t)used, "%s%zu", i ? ", " : "", shape[i]);
    if (used > 0 && (size_t)used < size)
        snprintf(buf + used, size - (size_t)used, "]");
}

int sae__st_expect(const sae__safetensors *st, const char *name, size_t d0, size_t d1,
                   const sae__st_tensor **out)
{
    const sae__st_tensor *t = sae__st_find(st, name);
    if (t == NULL)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' is missing", st->path, name);
    size_t want[2] = {d0, d1};
    size_t want_ndim = d1 ? 2 : 1;
    if (t->ndim != want_ndim || t->shape[0] != d0 || (d1 && t->shape[1] != d1)) {
        char got_s[96], want_s[96];
        format_shape(got_s, sizeof got_s, t->shape, t->ndim);
        format_shape(want_s, sizeof want_s, want, want_ndim);
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s' has shape %s, expected %s", st->path,
                         name, got_s, want_s);
    }
    if (t->dtype == SAE__DTYPE_COUNT)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: tensor '%s' is not a float tensor (F32, F16, BF16 or F64)",
                         st->path, name);
    *out = t;
    return SAE_OK;
}

int sae__st_write(const char *path, const sae__st_out *tensors, size_t n_tensors,
                  const char *const *meta_keys, const char *const *meta_values, size_t n_meta)
{
    cJSON *header = cJSON_CreateObject();
    if (header == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory building the header", path);
    int ok = 1;
    if (n_meta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(header, "__metadata__");
        for (size_t i = 0; i < n_meta && meta; i++)
            ok &= cJSON_AddStringToObject(meta, meta_keys[i], meta_values[i]) != NULL;
        ok &= meta != NULL;
    }
    size_t offset = 0;
    for (size_t i = 0; i < n_tensors && ok; i++) {
        size_t count = 1;
        for (size_t d = 0; d < tensors[i].ndim; d++)
            count *= tensors[i].shape[d];
        const size_t elem = tensors[i].data != NULL ? sizeof(float) : sizeof(uint16_t);
        cJSON *entry = cJSON_AddObjectToObject(header, tensors[i].name);
        double dims[2] = {(double)tensors[i].shape[0], (double)tensors[i].shape[1]};
        double range[2] = {(double)offset, (double)(offset + count * elem)};
        ok &= entry &&
              cJSON_AddStringToObject(entry, "dtype", tensors[i].data != NULL ? "F32" : "BF16") &&
              cJSON_AddItemToObject(entry, "shape",
                                    cJSON_CreateDoubleArray(dims, (int)tensors[i].ndim)) &&
              cJSON_AddItemToObject(entry, "data_offsets", cJSON_CreateDoubleArray(range, 2));
        offset += count * elem;
    }
    char *json = ok ? cJSON_PrintUnformatted(header) : NULL;
    cJSON_Delete(header);
    if (json == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory building the header", path);

    /* Pad with spaces so the data starts on a 64-byte boundary: mapped tensors are then aligned
     * for any SIMD load. */
    size_t json_len = strlen(json);
    size_t header_len = (8 + json_len + 63) / 64 * 64 - 8;
    unsigned char prefix[8];
    for (int i = 0; i < 8; i++)
        prefix[i] = (unsigned char)((uint64_t)header_len >> (8 * i));
    char *padded = malloc(header_len);
    if (padded == NULL) {
        free(json);
        return sae__fail(SAE_ENOMEM, "%s: out of memory building the header", path);
    }
    memcpy(padded, json, json_len);
    memset(padded + json_len, ' ', header_len - json_len);
    free(json);

    sae__atomic_file f;
    int rc = sae__atomic_begin(&f, path);
    if (rc != SAE_OK) {
        free(padded);
        return rc;
    }
    sae__atomic_write(&f, prefix, sizeof prefix);
    sae__atomic_write(&f, padded, header_len);
    free(padded);
    for (size_t i = 0; i < n_tensors; i++) {
        size_t count = 1;
        for (size_t d = 0; d < tensors[i].ndim; d++)
            count *= tensors[i].shape[d];
        if (tensors[i].data != NULL)
            sae__atomic_write(&f, tensors[i].data, count * sizeof(float));
        else
            sae__atomic_write(&f, tensors[i].bf16, count * sizeof(uint16_t));
    }
    return sae__atomic_commit(&f);
}
