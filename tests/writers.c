#include "writers.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zip.h>
#include <zlib.h>

static void die(const char *what)
{
    fprintf(stderr, "test writer: %s\n", what);
    abort();
}

void tw_put(tw_buf *b, const void *data, size_t size)
{
    if (b->size + size + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->size + size + 1)
            cap *= 2;
        unsigned char *p = realloc(b->data, cap);
        if (p == NULL)
            die("out of memory");
        b->data = p;
        b->cap = cap;
    }
    if (size)
        memcpy(b->data + b->size, data, size);
    b->size += size;
    b->data[b->size] = 0; /* text stays a C string */
}

void tw_printf(tw_buf *b, const char *fmt, ...)
{
    char small[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        die("bad format");
    if ((size_t)n < sizeof small) {
        tw_put(b, small, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (big == NULL)
        die("out of memory");
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    tw_put(b, big, (size_t)n);
    free(big);
}

void tw_free(tw_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

float tw_quantize(float v)
{
    if (v > 3.9f)
        v = 3.9f;
    if (v < -3.9f)
        v = -3.9f;
    return (float)((double)(long)(v * 64.0f) / 64.0); /* 8 significant bits at most */
}

void tw_fill(unsigned long long seed, float *v, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        double u = (double)(seed >> 11) * 0x1.0p-53 * 2.0 - 1.0;
        v[i] = tw_quantize((float)(u * scale));
    }
}

static size_t dtype_size(const char *dtype)
{
    if (strcmp(dtype, "F32") == 0)
        return 4;
    if (strcmp(dtype, "F16") == 0 || strcmp(dtype, "BF16") == 0)
        return 2;
    if (strcmp(dtype, "F64") == 0)
        return 8;
    die("unknown dtype");
    return 0;
}

/* Exact conversions (the values are representable): a wrong value would mean a test bug. */
static void put_value(tw_buf *b, const char *dtype, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    unsigned char out[8];
    if (strcmp(dtype, "F32") == 0) {
        for (int i = 0; i < 4; i++)
            out[i] = (unsigned char)(bits >> (8 * i));
        tw_put(b, out, 4);
    } else if (strcmp(dtype, "BF16") == 0) {
        if (bits & 0xffffu)
            die("value not representable in BF16");
        out[0] = (unsigned char)(bits >> 16);
        out[1] = (unsigned char)(bits >> 24);
        tw_put(b, out, 2);
    } else if (strcmp(dtype, "F16") == 0) {
        uint16_t h = (uint16_t)((bits >> 16) & 0x8000u);
        if (((bits >> 23) & 0xffu) == 0xffu) { /* infinity, or a quiet NaN */
            h = (uint16_t)(h | 0x7c00u | ((bits & 0x7fffffu) ? 0x200u : 0u));
        } else if ((bits & 0x7fffffffu) != 0) {
            int e = (int)((bits >> 23) & 0xff) - 127 + 15;
            if (e < 1 || e > 30 || (bits & 0x1fffu))
                die("value not representable in F16");
            h = (uint16_t)(h | (unsigned)e << 10 | ((bits >> 13) & 0x3ffu));
        }
        out[0] = (unsigned char)h;
        out[1] = (unsigned char)(h >> 8);
        tw_put(b, out, 2);
    } else {
        double d = v;
        uint64_t q;
        memcpy(&q, &d, 8);
        for (int i = 0; i < 8; i++)
            out[i] = (unsigned char)(q >> (8 * i));
        tw_put(b, out, 8);
    }
}

static size_t count_of(const tw_tensor *t)
{
    size_t c = 1;
    for (size_t d = 0; d < t->ndim; d++)
        c *= t->shape[d];
    return c;
}

void tw_safetensors(tw_buf *out, const tw_tensor *t, size_t n, const char *meta_json)
{
    tw_buf header = {0}, data = {0};
    tw_put(&header, "{", 1);
    if (meta_json != NULL)
        tw_printf(&header, "\"__metadata__\":%s", meta_json);
    for (size_t i = 0; i < n; i++) {
        size_t begin = data.size, count = count_of(&t[i]);
        for (size_t j = 0; j < count; j++)
            put_value(&data, t[i].dtype, t[i].data[j]);
        tw_printf(&header, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i || meta_json ? "," : "",
                  t[i].name, t[i].dtype);
        for (size_t d = 0; d < t[i].ndim; d++)
            tw_printf(&header, "%s%zu", d ? "," : "", t[i].shape[d]);
        tw_printf(&header, "],\"data_offsets\":[%zu,%zu]}", begin, data.size);
        (void)dtype_size(t[i].dtype);
    }
    tw_put(&header, "}", 1);
    while ((8 + header.size) % 8)
        tw_put(&header, " ", 1);
    tw_safetensors_raw(out, (const char *)header.data, data.data, data.size);
    tw_free(&header);
    tw_free(&data);
}

void tw_safetensors_raw(tw_buf *out, const char *header, const void *data, size_t data_size)
{
    uint64_t n = strlen(header);
    unsigned char len[8];
    for (int i = 0; i < 8; i++)
        len[i] = (unsigned char)(n >> (8 * i));
    tw_put(out, len, 8);
    tw_put(out, header, (size_t)n);
    tw_put(out, data, data_size);
}

void tw_npy(tw_buf *out, const char *descr, size_t ndim, const size_t *shape, const float *data)
{
    char dict[256];
    int len;
    if (ndim == 1)
        len = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%zu,), }",
                       descr, shape[0]);
    else
        len = snprintf(dict, sizeof dict,
                       "{'descr': '%s', 'fortran_order': False, 'shape': (%zu, %zu), }", descr,
                       shape[0], shape[1]);
    size_t total = (10 + (size_t)len + 1 + 63) / 64 * 64; /* numpy aligns the data to 64 */
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                             (unsigned char)((total - 10) & 0xff), (unsigned char)((total - 10) >> 8)};
    tw_put(out, pre, 10);
    tw_put(out, dict, (size_t)len);
    for (size_t i = 10 + (size_t)len; i + 1 < total; i++)
        tw_put(out, " ", 1);
    tw_put(out, "\n", 1);
    const char *dtype = strcmp(descr, "<f4") == 0 ? "F32" : strcmp(descr, "<f2") == 0 ? "F16"
                                                                                    : "F64";
    size_t count = ndim == 1 ? shape[0] : shape[0] * shape[1];
    for (size_t i = 0; i < count; i++)
        put_value(out, dtype, data[i]);
}

void tw_zip(tw_buf *out, const char *const *names, const tw_buf *members, size_t n, bool deflate)
{
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *dst = zip_source_buffer_create(NULL, 0, 0, &ze);
    zip_t *za = dst ? zip_open_from_source(dst, ZIP_TRUNCATE, &ze) : NULL;
    if (za == NULL)
        die("cannot create a zip");
    zip_source_keep(dst);
    for (size_t i = 0; i < n; i++) {
        zip_source_t *s = zip_source_buffer(za, members[i].data, members[i].size, 0);
        zip_int64_t idx = s ? zip_file_add(za, names[i], s, ZIP_FL_ENC_UTF_8) : -1;
        if (idx < 0 || zip_set_file_compression(za, (zip_uint64_t)idx,
                                                deflate ? ZIP_CM_DEFLATE : ZIP_CM_STORE, 0) != 0)
            die("cannot add a zip member");
    }
    if (zip_close(za) != 0)
        die("cannot write the zip");
    zip_stat_t st;
    if (zip_source_stat(dst, &st) != 0 || zip_source_open(dst) != 0)
        die("cannot read the zip back");
    unsigned char *bytes = malloc(st.size ? st.size : 1);
    if (bytes == NULL || zip_source_read(dst, bytes, st.size) != (zip_int64_t)st.size)
        die("cannot read the zip back");
    zip_source_close(dst);
    zip_source_free(dst);
    tw_put(out, bytes, st.size);
    free(bytes);
    zip_error_fini(&ze);
}

static void le(tw_buf *b, uint64_t v, int bytes)
{
    unsigned char out[8];
    for (int i = 0; i < bytes; i++)
        out[i] = (unsigned char)(v >> (8 * i));
    tw_put(b, out, (size_t)bytes);
}

void tw_zip64(tw_buf *out, const char *const *names, const tw_buf *members, size_t n)
{
    size_t start = out->size;
    uint64_t *offsets = calloc(n ? n : 1, sizeof *offsets);
    uint32_t *crcs = calloc(n ? n : 1, sizeof *crcs);
    if (offsets == NULL || crcs == NULL)
        die("out of memory");
    for (size_t i = 0; i < n; i++) {
        uint64_t size = members[i].size;
        crcs[i] = (uint32_t)crc32(0L, members[i].data, (uInt)size);
        offsets[i] = out->size - start;
        le(out, 0x04034b50, 4);  /* local file header */
        le(out, 45, 2);          /* version needed: 4.5, ZIP64 */
        le(out, 0, 2);           /* flags */
        le(out, 0, 2);           /* stored */
        le(out, 0, 2);           /* time */
        le(out, 0x21, 2);        /* date: 1980-01-01 */
        le(out, crcs[i], 4);
        le(out, 0xffffffffu, 4); /* sizes in the ZIP64 extra field */
        le(out, 0xffffffffu, 4);
        le(out, strlen(names[i]), 2);
        le(out, 20, 2);
        tw_put(out, names[i], strlen(names[i]));
        le(out, 0x0001, 2);
        le(out, 16, 2);
        le(out, size, 8);
        le(out, size, 8);
        tw_put(out, members[i].data, (size_t)size);
    }
    uint64_t cd_start = out->size - start;
    for (size_t i = 0; i < n; i++) {
        uint64_t size = members[i].size;
        le(out, 0x02014b50, 4); /* central directory header */
        le(out, 45, 2);
        le(out, 45, 2);
        le(out, 0, 2);
        le(out, 0, 2);
        le(out, 0, 2);
        le(out, 0x21, 2);
        le(out, crcs[i], 4);
        le(out, 0xffffffffu, 4);
        le(out, 0xffffffffu, 4);
        le(out, strlen(names[i]), 2);
        le(out, 28, 2); /* extra: sizes and the local header offset */
        le(out, 0, 2);
        le(out, 0, 2);
        le(out, 0, 2);
        le(out, 0, 4);
        le(out, 0xffffffffu, 4);
        tw_put(out, names[i], strlen(names[i]));
        le(out, 0x0001, 2);
        le(out, 24, 2);
        le(out, size, 8);
        le(out, size, 8);
        le(out, offsets[i], 8);
    }
    uint64_t cd_size = out->size - start - cd_start, eocd64 = out->size - start;
    le(out, 0x06064b50, 4); /* ZIP64 end of central directory record */
    le(out, 44, 8);
    le(out, 45, 2);
    le(out, 45, 2);
    le(out, 0, 4);
    le(out, 0, 4);
    le(out, n, 8);
    le(out, n, 8);
    le(out, cd_size, 8);
    le(out, cd_start, 8);
    le(out, 0x07064b50, 4); /* its locator */
    le(out, 0, 4);
    le(out, eocd64, 8);
    le(out, 1, 4);
    le(out, 0x06054b50, 4); /* end of central directory, every field deferred to ZIP64 */
    le(out, 0, 2);
    le(out, 0, 2);
    le(out, 0xffff, 2);
    le(out, 0xffff, 2);
    le(out, 0xffffffffu, 4);
    le(out, 0xffffffffu, 4);
    le(out, 0, 2);
    free(offsets);
    free(crcs);
}

void tw_write(const char *path, const void *data, size_t size)
{
    FILE *fp = fopen(path, "wb");
    if (fp == NULL || (size && fwrite(data, 1, size, fp) != size) || fclose(fp) != 0)
        die(path);
}

void tw_write_text(const char *path, const char *text) { tw_write(path, text, strlen(text)); }
