/* common.c - option parsing, files, the run folder and feature statistics for sae-llama. */
#define _XOPEN_SOURCE 700

#include "sae_llama.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---- options ------------------------------------------------------------------------------- */

int parse_options(int argc, char **argv, const option *opts, const char **pos, int n_min,
                  int n_max)
{
    int n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            return -1; /* the caller prints its usage */
        if (strncmp(a, "--", 2) != 0) {
            if (n_pos == n_max) {
                fprintf(stderr, "sae-llama %s: unexpected argument \"%s\"\n", argv[0], a);
                return -1;
            }
            pos[n_pos++] = a;
            continue;
        }
        const option *o = opts;
        while (o->name && strcmp(o->name, a + 2) != 0)
            o++;
        if (!o->name) {
            fprintf(stderr, "sae-llama %s: unknown option %s\n", argv[0], a);
            return -1;
        }
        if (o->whole == OPTION_FLAG) {
            *o->num = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "sae-llama %s: %s needs a value\n", argv[0], a);
            return -1;
        }
        const char *v = argv[++i];
        if (o->str) {
            *o->str = v;
            continue;
        }
        char *end;
        errno = 0;
        double d = strtod(v, &end);
        if (errno || end == v || *end || !(d >= o->lo && d <= o->hi) ||
            (o->whole && d != floor(d))) {
            fprintf(stderr, "sae-llama %s: %s needs a%s number in [%g, %g], got \"%s\"\n",
                    argv[0], a, o->whole ? " whole" : "", o->lo, o->hi, v);
            return -1;
        }
        *o->num = d;
    }
    if (n_pos < n_min) {
        fprintf(stderr, "sae-llama %s: missing arguments\n", argv[0]);
        return -1;
    }
    return n_pos;
}

/* ---- errors -------------------------------------------------------------------------------- */

int fail_sae(const char *cmd, const char *what, int rc)
{
    fprintf(stderr, "sae-llama %s: %s: %s (%s)\n", cmd, what, sae_last_error(),
            sae_strerror(rc));
    return 1;
}

int fail_llama(const char *cmd, const char *what)
{
    fprintf(stderr, "sae-llama %s: %s: %s\n", cmd, what, llama_last_error());
    return 1;
}

int fail_msg(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "sae-llama %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

/* ---- files --------------------------------------------------------------------------------- */

const char *path_in(const char *dir, const char *name)
{
    static char buf[4][4200];
    static int next;
    char *p = buf[next++ % 4];
    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

int make_dir(const char *path)
{
    if (mkdir(path, 0777) == 0 || errno == EEXIST)
        return 0;
    fprintf(stderr, "sae-llama: cannot create %s: %s\n", path, strerror(errno));
    return -1;
}

/* The .npy header: magic, version 1.0, header length, then a dict padded with spaces to a
 * multiple of 64 bytes and ended by a newline. */
int npy_write_i32(const char *path, const int32_t *v, size_t n)
{
    char dict[128];
    int len = snprintf(dict, sizeof dict,
                       "{'descr': '<i4', 'fortran_order': False, 'shape': (%zu,), }", n);
    size_t total = 10 + (size_t)len + 1;
    size_t pad = (64 - total % 64) % 64;
    uint16_t hlen = (uint16_t)((size_t)len + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                             (unsigned char)(hlen >> 8)};
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "sae-llama: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    fwrite(pre, 1, sizeof pre, f);
    fwrite(dict, 1, (size_t)len, f);
    for (size_t i = 0; i < pad; i++)
        fputc(' ', f);
    fputc('\n', f);
    for (size_t i = 0; i < n; i++) { /* little-endian whatever the host */
        uint32_t u = (uint32_t)v[i];
        unsigned char b[4] = {(unsigned char)u, (unsigned char)(u >> 8),
                              (unsigned char)(u >> 16), (unsigned char)(u >> 24)};
        fwrite(b, 1, 4, f);
    }
    if (ferror(f) | fclose(f)) {
        fprintf(stderr, "sae-llama: error writing %s\n", path);
        return -1;
    }
    return 0;
}

int npy_read_i32(const char *path, int32_t **out, size_t *n_out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "sae-llama: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    unsigned char pre[10];
    char dict[512];
    int ok = fread(pre, 1, 10, f) == 10 && memcmp(pre, "\x93NUMPY\x01\x00", 8) == 0;
    size_t hlen = ok ? (size_t)pre[8] | (size_t)pre[9] << 8 : 0;
    ok = ok && hlen < sizeof dict && fread(dict, 1, hlen, f) == hlen;
    unsigned long long n = 0;
    if (ok) {
        dict[hlen] = '\0';
        const char *shape = strstr(dict, "'shape': (");
        ok = strstr(dict, "'descr': '<i4'") && strstr(dict, "'fortran_order': False") && shape &&
             sscanf(shape + 10, "%llu,)", &n) == 1;
    }
    int32_t *v = ok ? malloc((n ? n : 1) * sizeof *v) : NULL;
    for (size_t i = 0; v && i < n; i++) {
        unsigned char b[4];
        if (fread(b, 1, 4, f) != 4) {
            free(v);
            v = NULL;
            break;
        }
        v[i] = (int32_t)((uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                         (uint32_t)b[3] << 24);
    }
    fclose(f);
    if (!v) {
        fprintf(stderr, "sae-llama: %s is not a 1-D int32 .npy file, or it is truncated\n", path);
        return -1;
    }
    *out = v;
    *n_out = (size_t)n;
    return 0;
}

int open_llama(const char *cmd, const char *dir, llama_model **m, llama_tokenizer **t)
{
    *m = NULL;
    *t = NULL;
    if (llama_model_load(path_in(dir, "model.bin"), m))
        return fail_llama(cmd, "loading the model");
    const char *tok = path_in(dir, "tok512.bin");
    struct stat sb;
    if (stat(tok, &sb) != 0)
        tok = path_in(dir, "tokenizer.bin");
    if (llama_tokenizer_load(tok, llama_model_config(*m)->vocab_size, t)) {
        llama_model_free(*m);
        *m = NULL;
        return fail_llama(cmd, "loading the tokenizer");
    }
    return 0;
}

/* ---- the run folder ------------------------------------------------------------------------ */

int corpus_write_info(const char *run, const char *model_dir, int layer)
{
    const char *path = path_in(run, "info.txt");
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "sae-llama: cannot write %s: %s\n", path, strerror(errno));
        return -1;
    }
    fprintf(f, "model %s\nlayer %d\n", model_dir, layer);
    return fclose(f) ? -1 : 0;
}

int corpus_load(const char *cmd, const char *run, int with_acts, corpus *c)
{
    memset(c, 0, sizeof *c);
    c->layer = -1;
    const char *info = path_in(run, "info.txt");
    FILE *f = fopen(info, "r");
    if (!f)
        return fail_msg(cmd, "cannot open %s (run `sae-llama collect` first): %s", info,
                        strerror(errno));
    char line[4200];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "model ", 6) == 0)
            snprintf(c->model_dir, sizeof c->model_dir, "%s", line + 6);
        else if (strncmp(line, "layer ", 6) == 0)
            c->layer = atoi(line + 6);
    }
    fclose(f);
    if (!c->model_dir[0] || c->layer < 0)
        return fail_msg(cmd, "%s lacks a \"model\" or \"layer\" line", info);

    if (npy_read_i32(path_in(run, "tokens.npy"), &c->tokens, &c->n))
        return 1;
    if (c->n == 0 || c->tokens[0] != LLAMA_TOKEN_BOS) {
        corpus_free(c);
        return fail_msg(cmd, "%s/tokens.npy must start with a BOS token (1)", run);
    }
    c->story = malloc(c->n * sizeof *c->story);
    if (!c->story) {
        corpus_free(c);
        return fail_msg(cmd, "out of memory");
    }
    for (size_t r = 0; r < c->n; r++)
        c->story[r] = c->tokens[r] == LLAMA_TOKEN_BOS ? r : c->story[r - 1];
    if (!with_acts)
        return 0;

    sae_npy *a;
    int rc = sae_npy_open(&a, path_in(run, "acts.npy"));
    if (rc) {
        corpus_free(c);
        return fail_sae(cmd, "opening acts.npy", rc);
    }
    c->dim = sae_npy_cols(a);
    if (sae_npy_rows(a) != c->n) {
        fail_msg(cmd, "acts.npy has %zu rows but tokens.npy %zu", sae_npy_rows(a), c->n);
        sae_npy_close(a);
        corpus_free(c);
        return 1;
    }
    c->acts = malloc(c->n * c->dim * sizeof *c->acts);
    if (!c->acts || (rc = sae_npy_read(a, 0, c->n, c->acts)) != SAE_OK) {
        if (c->acts)
            fail_sae(cmd, "reading acts.npy", rc);
        else
            fail_msg(cmd, "out of memory");
        sae_npy_close(a);
        corpus_free(c);
        return 1;
    }
    sae_npy_close(a);
    return 0;
}

void corpus_free(corpus *c)
{
    free(c->acts);
    free(c->tokens);
    free(c->story);
    memset(c, 0, sizeof *c);
}

/* ---- feature statistics -------------------------------------------------------------------- */

int codes_compute(const char *cmd, const sae_model *m, const corpus *c, feature_codes *fc)
{
    memset(fc, 0, sizeof *fc);
    size_t d_sae = sae_model_d_sae(m);
    double k = 64;
    sae_arch arch = sae_model_arch(m);
    if (arch == SAE_ARCH_TOPK)
        sae_model_get_param(m, SAE_PARAM_K, &k);
    fc->k = (size_t)k < d_sae ? (size_t)k : d_sae;
    fc->idx = malloc(c->n * fc->k * sizeof *fc->idx);
    fc->val = malloc(c->n * fc->k * sizeof *fc->val);
    fc->count = malloc(c->n * sizeof *fc->count);
    uint64_t *ids = malloc(c->n * sizeof *ids);
    int rc = SAE_ENOMEM;
    if (fc->idx && fc->val && fc->count && ids &&
        (rc = sae_encode_sparse(m, c->acts, c->n, fc->k, fc->idx, fc->val, fc->count)) ==
            SAE_OK &&
        (rc = sae_stats_new(&fc->stats, d_sae, TOP_CONTEXTS)) == SAE_OK) {
        for (size_t r = 0; r < c->n; r++)
            ids[r] = r;
        /* one call per story, without its BOS row */
        for (size_t r = 0; r < c->n && rc == SAE_OK; r++) {
            if (c->tokens[r] != LLAMA_TOKEN_BOS)
                continue;
            size_t end = r + 1;
            while (end < c->n && c->tokens[end] != LLAMA_TOKEN_BOS)
                end++;
            rc = sae_stats_update_sparse(fc->stats, fc->idx + (r + 1) * fc->k,
                                         fc->val + (r + 1) * fc->k, fc->count + r + 1, fc->k,
                                         end - r - 1, ids + r + 1);
        }
    }
    free(ids);
    if (rc != SAE_OK) {
        codes_free(fc);
        return fail_sae(cmd, "encoding the corpus", rc);
    }
    return 0;
}

void codes_free(feature_codes *fc)
{
    free(fc->idx);
    free(fc->val);
    free(fc->count);
    sae_stats_free(fc->stats);
    memset(fc, 0, sizeof *fc);
}

float codes_value(const feature_codes *fc, size_t row, uint32_t f)
{
    for (size_t j = 0; j < fc->count[row]; j++)
        if (fc->idx[row * fc->k + j] == f)
            return fc->val[row * fc->k + j];
    return 0.0f;
}

const char *row_text(const corpus *c, const llama_tokenizer *t, size_t r, size_t *len)
{
    const char *p = llama_token_piece(t, c->tokens[r - 1], c->tokens[r], len);
    if (!p)
        *len = 0;
    return p ? p : "";
}

/* Does row r continue the word of row r - 1 (a letter right after a letter)? */
static int continues_word(const corpus *c, const llama_tokenizer *t, size_t r)
{
    if (r >= c->n || c->story[r] != c->story[r - 1] || c->story[r] == r - 1)
        return 0;
    size_t la, lb;
    const char *a = row_text(c, t, r - 1, &la), *b = row_text(c, t, r, &lb);
    return la > 0 && lb > 0 && isalpha((unsigned char)a[la - 1]) && isalpha((unsigned char)b[0]);
}

size_t word_first_row(const corpus *c, const llama_tokenizer *t, size_t row)
{
    while (continues_word(c, t, row))
        row--;
    return row;
}

void token_word(const corpus *c, const llama_tokenizer *t, size_t row, char *buf, size_t cap)
{
    size_t first = word_first_row(c, t, row), last = row, n = 0;
    while (continues_word(c, t, last + 1))
        last++;
    for (size_t r = first; r <= last; r++) {
        size_t len;
        const char *p = row_text(c, t, r, &len);
        for (size_t i = 0; i < len && n + 1 < cap; i++)
            if (n > 0 || p[i] != ' ')
                buf[n++] = (char)tolower((unsigned char)p[i]);
    }
    buf[n] = '\0';
}

int is_word(const char *w)
{
    size_t n = 0;
    while (isalpha((unsigned char)w[n]) && (unsigned char)w[n] < 128)
        n++;
    return n >= 3 && w[n] == '\0';
}

size_t feature_top_words(const feature_codes *fc, const corpus *c, const llama_tokenizer *t,
                         uint32_t f, char (*word)[WORD_CAP], size_t *cnt, size_t max,
                         size_t *n_top)
{
    uint64_t ids[TOP_CONTEXTS];
    size_t n = 0, distinct = 0;
    sae_stats_top(fc->stats, f, NULL, ids, &n);
    *n_top = n;
    char seen[TOP_CONTEXTS][WORD_CAP];
    size_t times[TOP_CONTEXTS];
    for (size_t i = 0; i < n; i++) {
        char w[WORD_CAP];
        token_word(c, t, (size_t)ids[i], w, sizeof w);
        size_t j = 0;
        while (j < distinct && strcmp(seen[j], w) != 0)
            j++;
        if (j == distinct) {
            memcpy(seen[distinct], w, sizeof w);
            times[distinct++] = 0;
        }
        times[j]++;
    }
    /* most frequent first (selection sort: at most TOP_CONTEXTS entries) */
    size_t out = 0;
    for (; out < max && out < distinct; out++) {
        size_t best = out;
        for (size_t j = out + 1; j < distinct; j++)
            if (times[j] > times[best])
                best = j;
        memcpy(word[out], seen[best], WORD_CAP);
        cnt[out] = times[best];
        times[best] = times[out];
        memcpy(seen[best], seen[out], WORD_CAP);
    }
    return out;
}

/* ---- small helpers -------------------------------------------------------------------------- */

uint64_t rng_next(uint64_t *s)
{
    if (*s == 0) /* an all-zero xorshift state never changes */
        *s = 0x9E3779B97F4A7C15ULL;
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

double rng_uniform(uint64_t *s) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }

double rng_normal(uint64_t *s)
{
    double u = rng_uniform(s), v = rng_uniform(s);
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

double seconds_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
