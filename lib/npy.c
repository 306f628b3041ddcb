/* numpy .npy activation files: the header (magic, version, a Python dict literal with descr,
 * fortran_order and shape) checked against the file size, rows read in ranges so that files
 * larger than memory stream, and float32 files written atomically. */

#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct sae_npy {
    FILE *fp;
    char *path;
    sae__dtype dtype;
    size_t rows, cols;
    size_t data_offset;
};

static const char *skip_space(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

/* Finds 'key': in the dict and returns the text after the colon. */
static const char *find_key(const char *dict, const char *key)
{
    char quoted[32];
    for (int q = 0; q < 2; q++) {
        snprintf(quoted, sizeof quoted, q ? "\"%s\"" : "'%s'", key);
        const char *p = strstr(dict, quoted);
        if (p != NULL) {
            p = skip_space(p + strlen(quoted));
            if (*p == ':')
                return skip_space(p + 1);
        }
    }
    return NULL;
}

int sae__npy_dict(const char *dict, const char *path, sae__npy_header *h)
{
    const char *descr = find_key(dict, "descr");
    const char *order = find_key(dict, "fortran_order");
    const char *shape = find_key(dict, "shape");
    if (descr == NULL || order == NULL || shape == NULL)
        return sae__fail(SAE_EFORMAT, "%s: the .npy header lacks descr, fortran_order or shape",
                         path);
    static const struct {
        const char *descr;
        sae__dtype dtype;
    } types[] = {{"'<f4'", SAE__F32}, {"'<f2'", SAE__F16}, {"'<f8'", SAE__F64}};
    size_t t = 0;
    while (t < 3 && strncmp(descr, types[t].descr, strlen(types[t].descr)) != 0)
        t++;
    if (t == 3) {
        int len = 0;
        while (len < 16 && descr[len] && descr[len] != ',')
            len++;
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: dtype %.*s is not supported (float32 '<f4', float16 '<f2' or "
                         "float64 '<f8')",
                         path, len, descr);
    }
    h->dtype = types[t].dtype;
    if (strncmp(order, "True", 4) == 0)
        return sae__fail(SAE_EUNSUPPORTED, "%s: Fortran-order arrays are not supported", path);
    if (strncmp(order, "False", 5) != 0)
        return sae__fail(SAE_EFORMAT, "%s: fortran_order is neither True nor False", path);
    if (*shape != '(')
        return sae__fail(SAE_EFORMAT, "%s: shape is not a tuple", path);
    size_t dims[3], ndim = 0;
    const char *p = skip_space(shape + 1);
    while (*p != ')') {
        if (ndim == 3)
            return sae__fail(SAE_EUNSUPPORTED, "%s: more than 2 dimensions", path);
        if (*p < '0' || *p > '9')
            return sae__fail(SAE_EFORMAT, "%s: shape is not a tuple of whole numbers", path);
        errno = 0;
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (errno == ERANGE || v > SIZE_MAX)
            return sae__fail(SAE_EFORMAT, "%s: a dimension of the shape overflows", path);
        dims[ndim++] = (size_t)v;
        p = skip_space(end);
        if (*p == ',')
            p = skip_space(p + 1);
        else if (*p != ')')
            return sae__fail(SAE_EFORMAT, "%s: shape is not a tuple of whole numbers", path);
    }
    if (ndim == 0 || ndim > 2)
        return sae__fail(SAE_EUNSUPPORTED, "%s: %zu-dimensional arrays are not supported (1 or 2)",
                         path, ndim);
    h->ndim = ndim;
    h->rows = dims[0];
    h->cols = ndim == 2 ? dims[1] : 1;
    if (!sae__mul(h->rows, h->cols, &h->data_bytes) ||
        !sae__mul(h->data_bytes, sae__dtype_size(h->dtype), &h->data_bytes))
        return sae__fail(SAE_EFORMAT, "%s: shape (%zu, %zu) overflows", path, h->rows, h->cols);
    return SAE_OK;
}

int sae__npy_prefix(const unsigned char *buf, size_t avail, const char *path, sae__npy_header *h)
{
    if (avail < 10 || memcmp(buf, "\x93NUMPY", 6) != 0)
        return sae__fail(SAE_EFORMAT, "%s: not a .npy file (no \\x93NUMPY magic)", path);
    if (buf[6] == 1) {
        h->dict_len = (size_t)buf[8] | (size_t)buf[9] << 8;
        h->prefix = 10;
    } else if (buf[6] == 2 || buf[6] == 3) {
        if (avail < 12)
            return sae__fail(SAE_EFORMAT, "%s: truncated .npy header", path);
        h->dict_len = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 |
                      (size_t)buf[11] << 24;
        h->prefix = 12;
    } else {
        return sae__fail(SAE_EUNSUPPORTED, "%s: .npy version %d.%d is not supported", path,
                         buf[6], buf[7]);
    }
    return SAE_OK;
}

/* The array's bytes must be exactly what is left of the file after the header. */
static int parse_header(sae_npy *a, const char *dict, size_t file_size)
{
    const char *path = a->path;
    sae__npy_header h;
    int rc = sae__npy_dict(dict, path, &h);
    if (rc != SAE_OK)
        return rc;
    a->dtype = h.dtype;
    a->rows = h.rows;
    a->cols = h.cols;
    size_t bytes;
    if (!sae__add(h.data_bytes, a->data_offset, &bytes))
        return sae__fail(SAE_EFORMAT, "%s: shape (%zu, %zu) overflows", path, a->rows, a->cols);
    if (bytes != file_size)
        return sae__fail(SAE_EFORMAT,
                         "%s: shape (%zu, %zu) of %s needs %zu bytes of data, but the file has "
                         "%zu after its header",
                         path, a->rows, a->cols, sae__dtype_name(a->dtype), bytes - a->data_offset,
                         file_size - a->data_offset);
    if (a->cols == 0 && a->rows > 0)
        return sae__fail(SAE_EFORMAT, "%s: rows of zero columns", path);
    return SAE_OK;
}

int sae_npy_open(sae_npy **out, const char *path)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    SAE_CHECK_NULL(path);
    sae_npy *a = calloc(1, sizeof *a);
    if (a == NULL || (a->path = strdup(path)) == NULL) {
        free(a);
        return sae__fail(SAE_ENOMEM, "%s: out of memory", path);
    }
    int rc = SAE_OK;
    char *dict = NULL;
    struct stat sb;
    unsigned char pre[12];
    int fd;
    if ((rc = sae__open_regular(path, &fd, &sb)) != SAE_OK)
        goto done;
    if ((a->fp = fdopen(fd, "rb")) == NULL) {
        rc = sae__fail(SAE_EIO, "%s: cannot open: %s", path, strerror(errno));
        close(fd);
        goto done;
    }
    sae__npy_header h;
    size_t got = fread(pre, 1, 10, a->fp);
    if (got == 10 && (pre[6] == 2 || pre[6] == 3)) /* a 4-byte length */
        got += fread(pre + 10, 1, 2, a->fp);
    rc = sae__npy_prefix(pre, got, path, &h);
    if (rc != SAE_OK)
        goto done;
    size_t header_len = h.dict_len, prefix = h.prefix;
    if (header_len > SAE__NPY_MAX_HEADER || prefix + header_len > (size_t)sb.st_size) {
        rc = sae__fail(SAE_EFORMAT, "%s: header length %zu does not fit the file", path,
                       header_len);
        goto done;
    }
    dict = malloc(header_len + 1);
    if (dict == NULL || fread(dict, 1, header_len, a->fp) != header_len) {
        rc = sae__fail(dict ? SAE_EFORMAT : SAE_ENOMEM, "%s: cannot read the header", path);
        goto done;
    }
    dict[header_len] = '\0';
    if (strlen(dict) != header_len) {
        rc = sae__fail(SAE_EFORMAT, "%s: NUL byte in the header", path);
        goto done;
    }
    a->data_offset = prefix + header_len;
    rc = parse_header(a, dict, (size_t)sb.st_size);
done:
    free(dict);
    if (rc != SAE_OK) {
        sae_npy_close(a);
        return rc;
    }
    *out = a;
    return SAE_OK;
}

void sae_npy_close(sae_npy *a)
{
    if (a == NULL)
        return;
    if (a->fp != NULL)
        fclose(a->fp);
    free(a->path);
    free(a);
}

size_t sae_npy_rows(const sae_npy *a) { return a ? a->rows : 0; }
size_t sae_npy_cols(const sae_npy *a) { return a ? a->cols : 0; }

int sae_npy_read(sae_npy *a, size_t first, size_t count, float *dst)
{
    SAE_CHECK_NULL(a);
    if (count == 0)
        return SAE_OK;
    SAE_CHECK_NULL(dst);
    if (first > a->rows || count > a->rows - first)
        return sae__fail(SAE_ERANGE, "%s: rows [%zu, %zu) are past the last row (%zu rows)",
                         a->path, first, first + count, a->rows);
    size_t esize = sae__dtype_size(a->dtype);
    size_t row_bytes = a->cols * esize;
    if (fseeko(a->fp, (off_t)(a->data_offset + first * row_bytes), SEEK_SET) != 0)
        return sae__fail(SAE_EIO, "%s: seek failed: %s", a->path, strerror(errno));
    if (a->dtype == SAE__F32) {
        if (fread(dst, row_bytes, count, a->fp) != count)
            return sae__fail(SAE_EFORMAT, "%s: short read (did the file shrink?)", a->path);
        return SAE_OK;
    }
    /* Other dtypes go through a bounded buffer, converted a slice of rows at a time. */
    unsigned char buf[1 << 16];
    size_t per = sizeof buf / row_bytes;
    if (per == 0) {
        for (size_t r = 0; r < count; r++) {
            for (size_t c = 0; c < a->cols; c += sizeof buf / esize) {
                size_t n = a->cols - c < sizeof buf / esize ? a->cols - c : sizeof buf / esize;
                if (fread(buf, esize, n, a->fp) != n)
                    return sae__fail(SAE_EFORMAT, "%s: short read", a->path);
                sae__to_float(a->dtype, buf, n, dst + r * a->cols + c);
            }
        }
        return SAE_OK;
    }
    for (size_t r = 0; r < count; r += per) {
        size_t n = count - r < per ? count - r : per;
        if (fread(buf, row_bytes, n, a->fp) != n)
            return sae__fail(SAE_EFORMAT, "%s: short read (did the file shrink?)", a->path);
        sae__to_float(a->dtype, buf, n * a->cols, dst + r * a->cols);
    }
    return SAE_OK;
}

int sae_npy_write(const char *path, const float *data, size_t rows, size_t cols)
{
    SAE_CHECK_NULL(path);
    if (rows > 0 && cols > 0)
        SAE_CHECK_NULL(data);
    size_t bytes;
    if (!sae__mul(rows, cols, &bytes) || !sae__mul(bytes, sizeof(float), &bytes))
        return sae__fail(SAE_EINVAL, "%zu x %zu floats overflow", rows, cols);
    /* Version 1.0 with the dict padded so the data starts on a 64-byte boundary, as numpy does. */
    char header[256];
    int len = snprintf(header + 10, sizeof header - 10,
                       "{'descr': '<f4', 'fortran_order': False, 'shape': (%zu, %zu), }", rows,
                       cols);
    size_t total = (10 + (size_t)len + 1 + 63) / 64 * 64;
    memcpy(header, "\x93NUMPY\x01\x00", 8);
    header[8] = (char)((total - 10) & 0xff);
    header[9] = (char)((total - 10) >> 8);
    memset(header + 10 + len, ' ', total - 10 - (size_t)len - 1);
    header[total - 1] = '\n';
    sae__atomic_file f;
    int rc = sae__atomic_begin(&f, path);
    if (rc != SAE_OK)
        return rc;
    sae__atomic_write(&f, header, total);
    sae__atomic_write(&f, data, bytes);
    return sae__atomic_commit(&f);
}
