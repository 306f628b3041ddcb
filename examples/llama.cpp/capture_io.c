/* capture_io.c: see capture_io.h. */
#define _POSIX_C_SOURCE 200809L
#include "capture_io.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void msg(char *err, size_t cap, const char *fmt, ...)
{
    if (!err || !cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

uint16_t cio_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const int32_t exp = (int32_t)((x >> 23) & 0xff);
    uint32_t man = x & 0x7fffffu;
    if (exp == 255)
        return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    int32_t e = exp - 127 + 15;
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10)
            return (uint16_t)sign;
        man |= 0x800000u;
        const uint32_t shift = (uint32_t)(14 - e);
        uint32_t h = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13);
    const uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
        h++; /* may carry into the exponent, up to infinity: correct */
    return (uint16_t)(sign | h);
}

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t k = write(fd, c, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

int cio_npy_write(const char *path, const char *dtype, const void *data, size_t rows, size_t cols,
                  char *err, size_t cap)
{
    size_t es;
    if (!strcmp(dtype, "<i4") || !strcmp(dtype, "<f4")) es = 4;
    else if (!strcmp(dtype, "<i8")) es = 8;
    else if (!strcmp(dtype, "<f2")) es = 2;
    else { msg(err, cap, "%s: unknown dtype %s", path, dtype); return -1; }
    char hdr[256];
    int hl;
    if (cols == 0)
        hl = snprintf(hdr + 10, sizeof hdr - 10,
                      "{'descr': '%s', 'fortran_order': False, 'shape': (%zu,), }", dtype, rows);
    else
        hl = snprintf(hdr + 10, sizeof hdr - 10,
                      "{'descr': '%s', 'fortran_order': False, 'shape': (%zu, %zu), }", dtype,
                      rows, cols);
    size_t total = 10 + (size_t)hl + 1;
    const size_t pad = (64 - total % 64) % 64;
    memset(hdr + 10 + hl, ' ', pad);
    hdr[10 + (size_t)hl + pad] = '\n';
    total += pad;
    memcpy(hdr, "\x93NUMPY\x01\x00", 8);
    hdr[8] = (char)((total - 10) & 0xff);
    hdr[9] = (char)((total - 10) >> 8);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd < 0) {
        msg(err, cap, "%s: %s", tmp, strerror(errno));
        return -1;
    }
    const size_t bytes = rows * (cols ? cols : 1) * es;
    if (write_all(fd, hdr, total) || write_all(fd, data, bytes) || fsync(fd)) {
        msg(err, cap, "writing %s: %s", path, strerror(errno));
        close(fd);
        unlink(tmp);
        return -1;
    }
    if (close(fd) || rename(tmp, path)) {
        msg(err, cap, "writing %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

int cio_npy_read_i32(const char *path, int32_t **out, size_t *n, char *err, size_t cap)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        msg(err, cap, "%s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char pre[10];
    char hdr[1024];
    size_t rows = 0;
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0 || pre[6] != 1) {
        msg(err, cap, "%s: not a version-1 .npy file", path);
        fclose(f);
        return -1;
    }
    const size_t hl = (size_t)pre[8] | ((size_t)pre[9] << 8);
    if (hl >= sizeof hdr || fread(hdr, 1, hl, f) != hl) {
        msg(err, cap, "%s: bad header", path);
        fclose(f);
        return -1;
    }
    hdr[hl] = 0;
    const char *sh = strstr(hdr, "'shape': (");
    if (!strstr(hdr, "'descr': '<i4'") || !strstr(hdr, "'fortran_order': False") || !sh ||
        sscanf(sh + 10, "%zu,)", &rows) != 1 || !strstr(sh, ",)")) {
        msg(err, cap, "%s: expected a 1-D <i4 array, header %s", path, hdr);
        fclose(f);
        return -1;
    }
    int32_t *a = malloc((rows ? rows : 1) * sizeof *a);
    if (!a || fread(a, sizeof *a, rows, f) != rows) {
        msg(err, cap, "%s: truncated (%zu rows expected)", path, rows);
        free(a);
        fclose(f);
        return -1;
    }
    fclose(f);
    *out = a;
    *n = rows;
    return 0;
}

struct cio_corpus {
    FILE *f;
    int jsonl;
    char field[64];
    char *line;
    size_t cap;
    char *text;
    int64_t doc;
    long lineno;
};

int cio_corpus_open(cio_corpus **out, const char *path, int jsonl, const char *field, char *err,
                    size_t cap)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        msg(err, cap, "corpus %s: %s", path, strerror(errno));
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        msg(err, cap, "corpus %s: not a regular file", path);
        return -1;
    }
    cio_corpus *c = calloc(1, sizeof *c);
    if (!c || !(c->f = fopen(path, "rb"))) {
        msg(err, cap, "corpus %s: %s", path, strerror(errno));
        free(c);
        return -1;
    }
    c->jsonl = jsonl;
    snprintf(c->field, sizeof c->field, "%s", field ? field : "text");
    *out = c;
    return 0;
}

const char *cio_corpus_next(cio_corpus *c, int64_t *doc, int *bad, char *err, size_t cap)
{
    *bad = 0;
    for (;;) {
        ssize_t k = getline(&c->line, &c->cap, c->f);
        if (k < 0)
            return NULL;
        c->lineno++;
        while (k > 0 && (c->line[k - 1] == '\n' || c->line[k - 1] == '\r'))
            c->line[--k] = 0;
        if (k == 0)
            continue;
        if (!c->jsonl) {
            *doc = c->doc++;
            return c->line;
        }
        cJSON *j = cJSON_Parse(c->line);
        const cJSON *t = j ? cJSON_GetObjectItemCaseSensitive(j, c->field) : NULL;
        if (!cJSON_IsString(t)) {
            msg(err, cap, "line %ld: not a JSON object with a string field \"%s\"", c->lineno,
                c->field);
            cJSON_Delete(j);
            *bad = 1;
            return NULL;
        }
        free(c->text);
        c->text = strdup(t->valuestring);
        cJSON_Delete(j);
        if (!c->text) {
            msg(err, cap, "out of memory");
            *bad = 1;
            return NULL;
        }
        if (!*c->text)
            continue;
        *doc = c->doc++;
        return c->text;
    }
}

long cio_corpus_tell(cio_corpus *c)
{
    return c && c->f ? ftell(c->f) : 0;
}

void cio_corpus_close(cio_corpus *c)
{
    if (!c)
        return;
    if (c->f)
        fclose(c->f);
    free(c->line);
    free(c->text);
    free(c);
}

void cio_index_free(cio_index *ix)
{
    for (int i = 0; i < ix->n_shards; i++)
        free(ix->shards[i]);
    for (int i = 0; i < ix->n_hooks; i++)
        free(ix->hooks[i]);
    free(ix->shards);
    free(ix->hooks);
    free(ix->tokens);
    memset(ix, 0, sizeof *ix);
}

int cio_index_load(const char *dir, cio_index *ix, char *err, size_t cap)
{
    memset(ix, 0, sizeof *ix);
    char path[4096];
    snprintf(path, sizeof path, "%s/index.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f) {
        msg(err, cap, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *buf = NULL;
    size_t n = 0, got;
    char chunk[65536];
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        char *b = realloc(buf, n + got + 1);
        if (!b) { free(buf); fclose(f); msg(err, cap, "out of memory"); return -1; }
        buf = b;
        memcpy(buf + n, chunk, got);
        n += got;
    }
    fclose(f);
    if (!buf) { msg(err, cap, "%s: empty", path); return -1; }
    buf[n] = 0;
    cJSON *j = cJSON_Parse(buf);
    free(buf);
    const cJSON *st = j ? cJSON_GetObjectItemCaseSensitive(j, "settings") : NULL;
    const cJSON *hooks = st ? cJSON_GetObjectItemCaseSensitive(st, "hooks") : NULL;
    const cJSON *shards = j ? cJSON_GetObjectItemCaseSensitive(j, "shards") : NULL;
    if (!cJSON_IsArray(hooks) || !cJSON_IsArray(shards)) {
        msg(err, cap, "%s: not a libsae capture index", path);
        cJSON_Delete(j);
        return -1;
    }
    ix->n_embd = (size_t)cJSON_GetNumberValue(cJSON_GetObjectItem(st, "n_embd"));
    ix->complete = cJSON_IsTrue(cJSON_GetObjectItem(j, "complete"));
    const int nh = cJSON_GetArraySize(hooks), ns = cJSON_GetArraySize(shards);
    ix->hooks = calloc((size_t)nh + 1, sizeof *ix->hooks);
    ix->shards = calloc((size_t)ns + 1, sizeof *ix->shards);
    ix->tokens = calloc((size_t)ns + 1, sizeof *ix->tokens);
    if (!ix->hooks || !ix->shards || !ix->tokens) {
        cJSON_Delete(j);
        cio_index_free(ix);
        msg(err, cap, "out of memory");
        return -1;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, hooks)
        if (cJSON_IsString(it)) ix->hooks[ix->n_hooks++] = strdup(it->valuestring);
    cJSON_ArrayForEach(it, shards) {
        const cJSON *nm = cJSON_GetObjectItem(it, "name");
        if (!cJSON_IsString(nm)) continue;
        ix->shards[ix->n_shards] = strdup(nm->valuestring);
        ix->tokens[ix->n_shards] = (long long)cJSON_GetNumberValue(cJSON_GetObjectItem(it, "tokens"));
        ix->total += ix->tokens[ix->n_shards];
        ix->n_shards++;
    }
    cJSON_Delete(j);
    return 0;
}
