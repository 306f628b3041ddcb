/* The safetensors container: an 8-byte little-endian header length, a JSON header naming each
 * tensor's dtype, shape and byte range, then the data. Every number in the header is checked
 * before it is used; the data is never touched here, only located. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
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

static int by_offset(const void *a, const void *b)
{
    const sae__st_tensor *x = a, *y = b;
    return (x->offset > y->offset) - (x->offset < y->offset);
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
    cJSON_ArrayForEach(entry, st->header) {
        if (strcmp(entry->string, "__metadata__") == 0) {
            if (st->metadata != NULL) {
                rc = sae__fail(SAE_EFORMAT, "%s: __metadata__ appears twice", path);
                break;
            }
            st->metadata = entry;
            if ((rc = parse_metadata(st, entry)) != SAE_OK)
                break;
            continue;
        }
        if (sae__st_find(st, entry->string) != NULL) {
            rc = sae__fail(SAE_EFORMAT, "%s: tensor '%s' appears twice", path, entry->string);
            break;
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

int sae__st_meta_number(const sae__safetensors *st, const char *key, bool allow_nan, double *out)
{
    const char *s = sae__st_meta(st, key);
    if (s == NULL)
        return sae__fail(SAE_EFORMAT, "%s: __metadata__ has no '%s'", st->path, key);
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || isinf(v) || (isnan(v) && !allow_nan))
        return sae__fail(SAE_EFORMAT, "%s: __metadata__['%s'] = '%.40s' is not a finite number",
                         st->path, key, s);
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
