/* numpy .npy activation files: the header (magic, version, a Python dict literal with descr,
 * fortran_order and shape) checked against the file size, rows read in ranges so that files
 * larger than memory stream, and float32 files written atomically. */

#include "formats.h"

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
    sae__npy_header h; /* byte order and layout of the data */
};

static const char *skip_space(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

/* A quoted Python string without escapes (numpy writes keys and descr so): on success *body and
 * *len give its content and the text after it is returned; NULL if p holds no such string. */
static const char *quoted(const char *p, const char **body, size_t *len)
{
    char q = *p;
    if (q != '\'' && q != '"')
        return NULL;
    const char *end = p + 1;
    while (*end != '\0' && *end != q && *end != '\\')
        end++;
    if (*end != q)
        return NULL;
    *body = p + 1;
    *len = (size_t)(end - p - 1);
    return end + 1;
}

/* The shape tuple at p ('(' already checked): whole numbers as Python spells them (no sign, no
 * leading zero, no '_'), a trailing comma required after a single element, as in "(6,)". */
static int parse_shape(const char *p, const char *path, size_t dims[3], size_t *ndim,
                       const char **after)
{
    *ndim = 0;
    bool comma = false;
    p = skip_space(p + 1);
    while (*p != ')') {
        if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9'))
            return sae__fail(SAE_EFORMAT, "%s: shape is not a tuple of whole numbers", path);
        size_t v = 0;
        bool fits = true;
        for (; *p >= '0' && *p <= '9'; p++)
            fits = fits && sae__mul(v, 10, &v) && sae__add(v, (size_t)(*p - '0'), &v);
        if (!fits)
            return sae__fail(SAE_EFORMAT, "%s: a dimension of the shape overflows", path);
        if (*ndim == 3)
            return sae__fail(SAE_EUNSUPPORTED, "%s: more than 2 dimensions", path);
        dims[(*ndim)++] = v;
        p = skip_space(p);
        comma = *p == ',';
        if (comma)
            p = skip_space(p + 1);
        else if (*p != ')')
            return sae__fail(SAE_EFORMAT, "%s: shape is not a tuple of whole numbers", path);
    }
    /* "(6)" is the number 6 in Python, not a tuple: numpy refuses it. */
    if (*ndim == 1 && !comma)
        return sae__fail(SAE_EFORMAT, "%s: shape (%zu) is not a tuple (a 1-D shape is (%zu,))",
                         path, dims[0], dims[0]);
    *after = p + 1;
    return SAE_OK;
}

/* The header dict as numpy writes and reads it (format.py's _read_array_header, through
 * ast.literal_eval): exactly the keys descr, fortran_order and shape, each once. A repeated key
 * is refused: literal_eval keeps the last, a first-match reader would see the first. */
int sae__npy_dict(const char *dict, const char *path, sae__npy_header *h)
{
    enum { DESCR, ORDER, SHAPE, NKEYS };
    static const char *const key_names[NKEYS] = {"descr", "fortran_order", "shape"};
    bool seen[NKEYS] = {false, false, false};
    const char *descr = NULL;
    size_t descr_len = 0, dims[3] = {0, 0, 0}, ndim = 0;
    bool fortran = false;
    const char *p = skip_space(dict);
    if (*p != '{')
        return sae__fail(SAE_EFORMAT, "%s: the .npy header is not a dict", path);
    p = skip_space(p + 1);
    while (*p != '}') {
        const char *key;
        size_t key_len;
        p = quoted(p, &key, &key_len);
        if (p == NULL)
            return sae__fail(SAE_EFORMAT, "%s: the .npy header dict has a key that is not a "
                                          "plain string", path);
        int k = 0;
        while (k < NKEYS && !(strlen(key_names[k]) == key_len &&
                              memcmp(key_names[k], key, key_len) == 0))
            k++;
        if (k == NKEYS)
            return sae__fail(SAE_EFORMAT,
                             "%s: the .npy header has key '%.*s' (numpy allows only descr, "
                             "fortran_order and shape)",
                             path, (int)(key_len < 40 ? key_len : 40), key);
        if (seen[k])
            return sae__fail(SAE_EFORMAT,
                             "%s: key '%s' appears twice in the .npy header (numpy would keep "
                             "the last: refused)",
                             path, key_names[k]);
        seen[k] = true;
        p = skip_space(p);
        if (*p != ':')
            return sae__fail(SAE_EFORMAT, "%s: the .npy header dict has no ':' after '%s'", path,
                             key_names[k]);
        p = skip_space(p + 1);
        int rc = SAE_OK;
        if (k == DESCR) {
            const char *after = quoted(p, &descr, &descr_len);
            if (after == NULL) { /* a list: a structured dtype */
                int len = 0;
                while (len < 24 && p[len] && p[len] != '}')
                    len++;
                return sae__fail(SAE_EUNSUPPORTED,
                                 "%s: dtype %.*s is not supported (float32 '<f4', float16 "
                                 "'<f2' or float64 '<f8')",
                                 path, len, p);
            }
            p = after;
        } else if (k == ORDER) {
            if (strncmp(p, "True", 4) == 0 || strncmp(p, "False", 5) == 0) {
                fortran = *p == 'T';
                p += fortran ? 4 : 5;
            } else {
                return sae__fail(SAE_EFORMAT, "%s: fortran_order is neither True nor False",
                                 path);
            }
        } else if (*p != '(') {
            return sae__fail(SAE_EFORMAT, "%s: shape is not a tuple", path);
        } else if ((rc = parse_shape(p, path, dims, &ndim, &p)) != SAE_OK) {
            return rc;
        }
        p = skip_space(p);
        if (*p == ',')
            p = skip_space(p + 1);
        else if (*p != '}')
            return sae__fail(SAE_EFORMAT, "%s: the .npy header dict has no ',' after '%s'", path,
                             key_names[k]);
    }
    if (*skip_space(p + 1) != '\0')
        return sae__fail(SAE_EFORMAT, "%s: text after the .npy header dict", path);
    for (int k = 0; k < NKEYS; k++)
        if (!seen[k])
            return sae__fail(SAE_EFORMAT,
                             "%s: the .npy header lacks '%s' (it needs descr, fortran_order and "
                             "shape)",
                             path, key_names[k]);
    static const struct {
        const char *descr;
        sae__dtype dtype;
    } types[] = {{"f4", SAE__F32}, {"f2", SAE__F16}, {"f8", SAE__F64}};
    /* numpy spells the byte order of a multi-byte type '<' or '>' (np.save writes '<f4' on
     * little-endian machines, '>f4' for an array made with dtype='>f4'); both read the same. */
    size_t t = 0;
    bool order_ok = descr_len == 3 && (descr[0] == '<' || descr[0] == '>');
    while (order_ok && t < 3 && memcmp(descr + 1, types[t].descr, 2) != 0)
        t++;
    if (!order_ok || t == 3)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: dtype '%.*s' is not supported (float32 '<f4', float16 '<f2' or "
                         "float64 '<f8', or their big-endian '>f4', '>f2', '>f8')",
                         path, (int)(descr_len < 16 ? descr_len : 16), descr);
    h->dtype = types[t].dtype;
    h->big_endian = descr[0] == '>';
    /* Fortran order only changes where a 2-D array's elements lie (column after column); a 1-D
     * array is the same bytes either way. */
    h->fortran = fortran && ndim == 2;
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

void sae__npy_to_float(const sae__npy_header *h, unsigned char *src, size_t count, float *dst)
{
    size_t es = sae__dtype_size(h->dtype);
    if (h->big_endian)
        for (size_t i = 0; i < count; i++)
            for (size_t a = 0, b = es - 1; a < b; a++, b--) {
                unsigned char c = src[i * es + a];
                src[i * es + a] = src[i * es + b];
                src[i * es + b] = c;
            }
    sae__to_float(h->dtype, src, count, dst);
}

void sae__npy_fortran_to_c(float *v, float *tmp, size_t rows, size_t cols)
{
    memcpy(tmp, v, rows * cols * sizeof(float));
    for (size_t c = 0; c < cols; c++)
        for (size_t r = 0; r < rows; r++)
            v[r * cols + c] = tmp[c * rows + r];
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
    a->h = h;
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

/* A Fortran-ordered file holds column after column: rows [first, first + count) are a run of
 * count values in each column, read a bounded slice at a time and scattered into the rows. */
static int read_fortran(sae_npy *a, size_t first, size_t count, float *dst)
{
    size_t esize = sae__dtype_size(a->dtype);
    unsigned char buf[1 << 14];
    float conv[(1 << 14) / 2];
    size_t per = sizeof buf / esize;
    for (size_t c = 0; c < a->cols; c++) {
        off_t at = (off_t)(a->data_offset + (c * a->rows + first) * esize);
        if (fseeko(a->fp, at, SEEK_SET) != 0)
            return sae__fail(SAE_EIO, "%s: seek failed: %s", a->path, strerror(errno));
        for (size_t r = 0; r < count; r += per) {
            size_t n = count - r < per ? count - r : per;
            if (fread(buf, esize, n, a->fp) != n)
                return sae__fail(SAE_EFORMAT, "%s: short read (did the file shrink?)", a->path);
            sae__npy_to_float(&a->h, buf, n, conv);
            for (size_t i = 0; i < n; i++)
                dst[(r + i) * a->cols + c] = conv[i];
        }
    }
    return SAE_OK;
}

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
    if (a->h.fortran)
        return read_fortran(a, first, count, dst);
    if (fseeko(a->fp, (off_t)(a->data_offset + first * row_bytes), SEEK_SET) != 0)
        return sae__fail(SAE_EIO, "%s: seek failed: %s", a->path, strerror(errno));
    if (a->dtype == SAE__F32 && !a->h.big_endian) {
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
                sae__npy_to_float(&a->h, buf, n, dst + r * a->cols + c);
            }
        }
        return SAE_OK;
    }
    for (size_t r = 0; r < count; r += per) {
        size_t n = count - r < per ? count - r : per;
        if (fread(buf, row_bytes, n, a->fp) != n)
            return sae__fail(SAE_EFORMAT, "%s: short read (did the file shrink?)", a->path);
        sae__npy_to_float(&a->h, buf, n * a->cols, dst + r * a->cols);
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
