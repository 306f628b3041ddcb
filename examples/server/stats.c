/*
 * sae-server-stats: the statistics sae-server's feature cards are made from, for one dictionary
 * over a capture that sae-llama-capture wrote (a GGUF model over a text corpus, through the
 * sae_llama_hook adapter).
 *
 *   sae-server-stats --capture DIR --hook blocks.L.hook_X --sae PATH -o STATS.json
 *       [--top N] [--before B] [--after A] [--bins K] [--with-bos]
 *
 * Two passes over the capture's activations at the hook, each block encoded densely with
 * libsae (every firing feature counts, whatever the architecture):
 *   1. sae_stats: per feature its firing count (value > 0), sum, maximum and top N examples
 *      (example id = the token's index in the capture), and its smallest firing value;
 *   2. per feature a histogram of its firing values over K log-spaced bins from the smallest
 *      to the largest value, and, around each top example, the feature's value on every token
 *      of a context of up to B tokens before and A after it (never crossing the capture's
 *      window, which is the sequence the model saw).
 * The first token of every capture window is BOS, whose activations are far from the others' (on
 * stories260K its residual norm is twice theirs) and which SAEs are usually trained without:
 * those tokens are left out of the statistics unless --with-bos is given (they still show in
 * the contexts, with the feature's value on them).
 * Reading a capture instead of running the model keeps this program to statistics: the capture
 * is computed once and resumable, and the cards can be rebuilt with other settings in seconds.
 *
 * The output, one JSON object written atomically (temporary file, fsync, rename), is the
 * "libsae-feature-stats-1" format docs/server.md describes; examples/server/feature_cards.c reads it.
 * Exit: 0 done, 1 an error (a message says which), 2 bad usage.
 */
#define _POSIX_C_SOURCE 200809L
#include "capture_io.h"
#include "sae.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define STATS_FORMAT "libsae-feature-stats-1"
#define BLOCK_MAX 4096 /* tokens encoded at once */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("sae-server-stats: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xmalloc(size_t n, size_t size)
{
    size_t bytes;
    if (__builtin_mul_overflow(n, size, &bytes))
        die("out of memory (%zu x %zu bytes)", n, size);
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        die("out of memory (%zu bytes)", bytes);
    return p;
}

static void usage(void)
{
    fputs("usage: sae-server-stats --capture DIR --hook blocks.L.hook_X --sae PATH -o STATS.json\n"
          "           [--top N (10)] [--before B (12)] [--after A (4)] [--bins K (32)]\n"
          "           [--with-bos]\n",
          stderr);
    exit(2);
}

static long parse_count(const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "sae-server-stats: %s wants a whole number from %ld to %ld, not '%s'\n",
                opt, lo, hi, s);
        exit(2);
    }
    return v;
}

/* One top example and the feature's values on its context. */
typedef struct {
    uint64_t lo;     /* capture index of the context's first token */
    uint32_t len;    /* tokens in the context */
    uint32_t target; /* the example's place in it */
    float value;     /* the example's value (sae_stats_top) */
    float *values;   /* [len], filled by pass 2 */
} context;

/* "the feature's value at token t goes to values[slot] of context ctx" */
typedef struct {
    uint64_t t;
    uint32_t ctx;
    uint32_t feature;
    uint32_t slot;
} need;

static int need_cmp(const void *a, const void *b)
{
    const need *x = a, *y = b;
    return x->t < y->t ? -1 : x->t > y->t ? 1 : x->ctx < y->ctx ? -1 : x->ctx > y->ctx;
}

typedef struct {
    cio_index ix;
    const char *dir, *hook;
    size_t total, d_in;
    int32_t *tokens, *positions; /* [total] */
} capture;

static void capture_open(capture *c, const char *dir, const char *hook)
{
    char err[1024];
    c->dir = dir;
    c->hook = hook;
    if (cio_index_load(dir, &c->ix, err, sizeof err) != 0)
        die("%s", err);
    if (!c->ix.complete)
        die("%s: the capture is not complete (resume sae-llama-capture first)", dir);
    int found = 0;
    for (int i = 0; i < c->ix.n_hooks; i++)
        found |= strcmp(c->ix.hooks[i], hook) == 0;
    if (!found)
        die("%s: the capture has no hook %s", dir, hook);
    if (c->ix.total <= 0)
        die("%s: the capture holds no tokens", dir);
    c->total = (size_t)c->ix.total;
    c->d_in = c->ix.n_embd;
    c->tokens = xmalloc(c->total, sizeof *c->tokens);
    c->positions = xmalloc(c->total, sizeof *c->positions);
    size_t at = 0;
    for (int s = 0; s < c->ix.n_shards; s++) {
        static const char *what[2] = {"tokens", "positions"};
        int32_t *dst[2] = {c->tokens + at, c->positions + at};
        for (int k = 0; k < 2; k++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s.%s.npy", dir, c->ix.shards[s], what[k]);
            int32_t *v;
            size_t n;
            if (cio_npy_read_i32(path, &v, &n, err, sizeof err) != 0)
                die("%s", err);
            if (n != (size_t)c->ix.tokens[s])
                die("%s: %zu rows, the index says %lld", path, n, c->ix.tokens[s]);
            memcpy(dst[k], v, n * sizeof *v);
            free(v);
        }
        at += (size_t)c->ix.tokens[s];
    }
    for (size_t t = 0; t < c->total; t++)
        if (c->positions[t] < 0 || (size_t)c->positions[t] > t ||
            (c->positions[t] > 0 && t > 0 && c->positions[t] != c->positions[t - 1] + 1))
            die("%s: token %zu has position %d, which does not continue its window", dir, t,
                c->positions[t]);
}

/* Calls fn(user, first, n, f) for consecutive blocks of the capture's tokens at the hook, f the
 * block's dense codes [n][d_sae] (fn may overwrite them). */
typedef void (*block_fn)(void *user, size_t first, size_t n, float *f);

static void for_each_block(const capture *c, const sae_model *m, block_fn fn, void *user)
{
    const size_t d_sae = sae_model_d_sae(m);
    size_t blk = ((size_t)1 << 24) / d_sae; /* 64 MB of codes at most */
    if (blk < 1) blk = 1;
    if (blk > BLOCK_MAX) blk = BLOCK_MAX;
    float *x = xmalloc(blk, c->d_in * sizeof *x);
    float *f = xmalloc(blk, d_sae * sizeof *f);
    size_t first = 0;
    for (int s = 0; s < c->ix.n_shards; s++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.%s.npy", c->dir, c->ix.shards[s], c->hook);
        sae_npy *a;
        if (sae_npy_open(&a, path) != SAE_OK)
            die("%s", sae_last_error());
        const size_t rows = sae_npy_rows(a);
        if (rows != (size_t)c->ix.tokens[s] || sae_npy_cols(a) != c->d_in)
            die("%s: [%zu][%zu], the index says [%lld][%zu]", path, rows, sae_npy_cols(a),
                c->ix.tokens[s], c->d_in);
        for (size_t r = 0; r < rows; r += blk) {
            const size_t n = rows - r < blk ? rows - r : blk;
            if (sae_npy_read(a, r, n, x) != SAE_OK || sae_encode(m, x, n, f) != SAE_OK)
                die("%s: %s", path, sae_last_error());
            fn(user, first + r, n, f);
        }
        sae_npy_close(a);
        first += rows;
    }
    free(x);
    free(f);
}

/* ---- pass 1: sae_stats and each feature's smallest firing value ----------------------------- */

typedef struct {
    sae_stats *st;
    float *minpos; /* [d_sae] */
    size_t d_sae;
    uint64_t *ids;
    const int32_t *positions; /* non-NULL: leave out the tokens at position 0 */
} pass1;

static void pass1_block(void *user, size_t first, size_t n_in, float *f)
{
    pass1 *p = user;
    size_t n = 0; /* rows kept, moved down in place */
    for (size_t t = 0; t < n_in; t++) {
        if (p->positions && p->positions[first + t] == 0)
            continue;
        if (n != t)
            memcpy(f + n * p->d_sae, f + t * p->d_sae, p->d_sae * sizeof *f);
        p->ids[n++] = (uint64_t)(first + t);
    }
    if (sae_stats_update(p->st, f, n, p->ids) != SAE_OK)
        die("%s", sae_last_error());
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < p->d_sae; i++) {
            const float v = f[t * p->d_sae + i];
            if (v > 0 && v < p->minpos[i])
                p->minpos[i] = v;
        }
}

/* ---- pass 2: histograms and the contexts' values --------------------------------------------- */

typedef struct {
    size_t d_sae, bins;
    const float *edges;  /* [d_sae][bins + 1] */
    uint64_t *hist;      /* [d_sae][bins] */
    const need *needs;
    size_t n_needs, at;
    context *ctx;
    const int32_t *positions; /* as in pass1 */
} pass2;

/* The bin of v > 0: how many of the interior edges are <= v (the first bin holds [e0, e1), the
 * last [e_{K-1}, e_K]). */
static size_t bin_of(const float *e, size_t bins, float v)
{
    size_t lo = 1, hi = bins; /* search e[1..bins-1] */
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        if (e[mid] <= v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

static void pass2_block(void *user, size_t first, size_t n, float *f)
{
    pass2 *p = user;
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < p->d_sae && !(p->positions && p->positions[first + t] == 0); i++) {
            const float v = f[t * p->d_sae + i];
            if (v > 0)
                p->hist[i * p->bins + bin_of(p->edges + i * (p->bins + 1), p->bins, v)]++;
        }
    while (p->at < p->n_needs && p->needs[p->at].t < first + n) {
        const need *q = &p->needs[p->at++];
        p->ctx[q->ctx].values[q->slot] = f[(q->t - first) * p->d_sae + q->feature];
    }
}

/* ---- output -------------------------------------------------------------------------------- */

static void put(FILE *out, const char *tmp, const char *s)
{
    if (!s || fputs(s, out) == EOF) {
        unlink(tmp);
        die("writing %s: %s", tmp, s ? strerror(errno) : "out of memory");
    }
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *hook = NULL, *sae_path = NULL, *out_path = NULL;
    size_t top_n = 10, before = 12, after = 4, bins = 32;
    int with_bos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--with-bos")) {
            with_bos = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--capture")) dir = v;
        else if (!strcmp(a, "--hook")) hook = v;
        else if (!strcmp(a, "--sae")) sae_path = v;
        else if (!strcmp(a, "-o")) out_path = v;
        else if (!strcmp(a, "--top")) top_n = (size_t)parse_count(a, v, 1, 1000);
        else if (!strcmp(a, "--before")) before = (size_t)parse_count(a, v, 0, 1000);
        else if (!strcmp(a, "--after")) after = (size_t)parse_count(a, v, 0, 1000);
        else if (!strcmp(a, "--bins")) bins = (size_t)parse_count(a, v, 1, 1000);
        else usage();
    }
    if (!dir || !hook || !sae_path || !out_path)
        usage();

    sae_model *m;
    if (sae_model_load(&m, sae_path) != SAE_OK)
        die("%s", sae_last_error());
    const size_t d_sae = sae_model_d_sae(m);
    capture c;
    capture_open(&c, dir, hook);
    if (sae_model_d_in(m) != c.d_in)
        die("%s reads %zu-wide rows, the capture's %s rows are %zu wide", sae_path,
            sae_model_d_in(m), hook, c.d_in);

    /* pass 1 */
    pass1 p1 = {.d_sae = d_sae, .minpos = xmalloc(d_sae, sizeof(float)),
                .ids = xmalloc(BLOCK_MAX, sizeof(uint64_t)),
                .positions = with_bos ? NULL : c.positions};
    for (size_t i = 0; i < d_sae; i++)
        p1.minpos[i] = INFINITY;
    if (sae_stats_new(&p1.st, d_sae, top_n) != SAE_OK)
        die("%s", sae_last_error());
    for_each_block(&c, m, pass1_block, &p1);
    if (sae_stats_tokens(p1.st) == 0)
        die("%s: no token is left once the windows' first tokens (BOS) are left out "
            "(--with-bos counts them)", dir);
    uint64_t *count = xmalloc(d_sae, sizeof *count);
    double *sum = xmalloc(d_sae, sizeof *sum);
    float *max = xmalloc(d_sae, sizeof *max);
    if (sae_stats_counts(p1.st, count) || sae_stats_sums(p1.st, sum) || sae_stats_max(p1.st, max))
        die("%s", sae_last_error());

    /* the bins, and the contexts pass 2 fills */
    /* Edges are floats, like the values: JSON numbers as cJSON prints them come back to the same
     * float, so a reader bins exactly as this program did. */
    float *edges = xmalloc(d_sae * (bins + 1), sizeof *edges);
    size_t *n_top = xmalloc(d_sae, sizeof *n_top);
    context *ctx = xmalloc(d_sae * top_n, sizeof *ctx);
    float *tval = xmalloc(top_n, sizeof *tval);
    uint64_t *tid = xmalloc(top_n, sizeof *tid);
    size_t n_needs = 0;
    for (size_t i = 0; i < d_sae; i++) {
        float *e = edges + i * (bins + 1);
        const double lo = count[i] ? (double)p1.minpos[i] : 0, hi = (double)max[i];
        e[0] = (float)lo;
        e[bins] = (float)hi;
        for (size_t j = 1; j < bins; j++)
            e[j] = count[i] ? (float)fmin(hi, fmax(lo, exp(log(lo) + (log(hi) - log(lo)) *
                                                                  (double)j / (double)bins)))
                            : 0;
        if (sae_stats_top(p1.st, (uint32_t)i, tval, tid, &n_top[i]) != SAE_OK)
            die("%s", sae_last_error());
        for (size_t r = 0; r < n_top[i]; r++) {
            const size_t g = (size_t)tid[r];
            size_t lo_t = g - (size_t)c.positions[g];
            if (g - lo_t > before)
                lo_t = g - before;
            size_t hi_t = g;
            while (hi_t - g < after && hi_t + 1 < c.total && c.positions[hi_t + 1] != 0)
                hi_t++;
            context *x = &ctx[i * top_n + r];
            x->lo = lo_t;
            x->len = (uint32_t)(hi_t - lo_t + 1);
            x->target = (uint32_t)(g - lo_t);
            x->value = tval[r];
            x->values = xmalloc(x->len, sizeof(float));
            n_needs += x->len;
        }
    }
    need *needs = xmalloc(n_needs, sizeof *needs);
    size_t k = 0;
    for (size_t i = 0; i < d_sae; i++)
        for (size_t r = 0; r < n_top[i]; r++) {
            const context *x = &ctx[i * top_n + r];
            for (uint32_t s = 0; s < x->len; s++)
                needs[k++] = (need){.t = x->lo + s, .ctx = (uint32_t)(i * top_n + r),
                                    .feature = (uint32_t)i, .slot = s};
        }
    qsort(needs, n_needs, sizeof *needs, need_cmp);

    /* pass 2 */
    pass2 p2 = {.d_sae = d_sae, .bins = bins, .edges = edges,
                .hist = calloc(d_sae * bins, sizeof(uint64_t)), .needs = needs,
                .n_needs = n_needs, .ctx = ctx, .positions = with_bos ? NULL : c.positions};
    if (!p2.hist)
        die("out of memory for the histograms");
    for_each_block(&c, m, pass2_block, &p2);
    for (size_t i = 0; i < d_sae; i++)
        for (size_t r = 0; r < n_top[i]; r++) {
            const context *x = &ctx[i * top_n + r];
            if (x->values[x->target] != x->value)
                die("feature %zu: the second pass gives %.9g at token %llu, the first %.9g: "
                    "the capture changed while it was read", i, (double)x->values[x->target],
                    (unsigned long long)(x->lo + x->target), (double)x->value);
        }

    /* The file is written feature by feature (each object printed by cJSON) so that memory
     * stays one feature's tree, whatever d_sae. */
    double norm_sum = 0;
    float *norms = xmalloc(d_sae, sizeof *norms);
    sae_model_decoder_norms(m, norms);
    for (size_t i = 0; i < d_sae; i++)
        norm_sum += (double)norms[i];
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", out_path, (long)getpid()) >= (int)sizeof tmp)
        die("%s: the path is too long", out_path);
    FILE *out = fopen(tmp, "wb");
    if (!out)
        die("%s: %s", tmp, strerror(errno));
    cJSON *head = cJSON_CreateObject();
    cJSON_AddStringToObject(head, "format", STATS_FORMAT);
    cJSON_AddStringToObject(head, "hook", hook);
    cJSON_AddStringToObject(head, "capture", dir);
    cJSON_AddStringToObject(head, "sae", sae_path);
    cJSON_AddNumberToObject(head, "d_in", (double)c.d_in);
    cJSON_AddNumberToObject(head, "d_sae", (double)d_sae);
    cJSON_AddNumberToObject(head, "decoder_norm_sum", norm_sum);
    cJSON_AddNumberToObject(head, "tokens", (double)sae_stats_tokens(p1.st));
    cJSON_AddNumberToObject(head, "capture_tokens", (double)c.total);
    cJSON_AddBoolToObject(head, "with_bos", with_bos);
    cJSON_AddNumberToObject(head, "top_n", (double)top_n);
    cJSON_AddNumberToObject(head, "before", (double)before);
    cJSON_AddNumberToObject(head, "after", (double)after);
    cJSON_AddNumberToObject(head, "bins", (double)bins);
    char *hs = cJSON_PrintUnformatted(head);
    cJSON_Delete(head);
    if (!hs)
        die("out of memory");
    hs[strlen(hs) - 1] = 0; /* the closing brace: the features follow */
    put(out, tmp, hs);
    free(hs);
    put(out, tmp, ",\"features\":[");
    for (size_t i = 0; i < d_sae; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "count", (double)count[i]);
        cJSON_AddNumberToObject(o, "sum", sum[i]);
        cJSON_AddNumberToObject(o, "max", (double)max[i]);
        cJSON *e = cJSON_AddArrayToObject(o, "edges"), *h = cJSON_AddArrayToObject(o, "hist");
        if (count[i])
            for (size_t j = 0; j <= bins; j++) {
                cJSON_AddItemToArray(e, cJSON_CreateNumber((double)edges[i * (bins + 1) + j]));
                if (j < bins)
                    cJSON_AddItemToArray(h, cJSON_CreateNumber((double)p2.hist[i * bins + j]));
            }
        cJSON *top = cJSON_AddArrayToObject(o, "top");
        for (size_t r = 0; r < n_top[i]; r++) {
            const context *x = &ctx[i * top_n + r];
            cJSON *t = cJSON_CreateObject(), *tk = cJSON_CreateArray(), *tv = cJSON_CreateArray();
            cJSON_AddNumberToObject(t, "value", (double)x->value);
            cJSON_AddNumberToObject(t, "index", (double)(x->lo + x->target));
            cJSON_AddNumberToObject(t, "target", (double)x->target);
            for (uint32_t s = 0; s < x->len; s++) {
                cJSON_AddItemToArray(tk, cJSON_CreateNumber((double)c.tokens[x->lo + s]));
                cJSON_AddItemToArray(tv, cJSON_CreateNumber((double)x->values[s]));
            }
            cJSON_AddItemToObject(t, "tokens", tk);
            cJSON_AddItemToObject(t, "values", tv);
            cJSON_AddItemToArray(top, t);
        }
        char *s = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        if (i)
            put(out, tmp, ",");
        put(out, tmp, s);
        free(s);
    }
    put(out, tmp, "]}\n");
    if (fflush(out) != 0 || fsync(fileno(out)) != 0 || fclose(out) != 0 || rename(tmp, out_path)) {
        const int e = errno;
        unlink(tmp);
        die("writing %s: %s", out_path, strerror(e));
    }

    size_t live = 0, n_ctx = 0;
    for (size_t i = 0; i < d_sae; i++) {
        live += count[i] > 0;
        n_ctx += n_top[i];
    }
    printf("%s: %llu tokens counted (of %zu), %zu of %zu features fire, %zu contexts\n", out_path,
           (unsigned long long)sae_stats_tokens(p1.st), c.total, live, d_sae, n_ctx);

    for (size_t i = 0; i < d_sae * top_n; i++)
        if (i % top_n < n_top[i / top_n])
            free(ctx[i].values);
    free(ctx); free(needs); free(p2.hist); free(edges); free(n_top); free(tval); free(tid);
    free(count); free(sum); free(max); free(norms); free(p1.minpos); free(p1.ids);
    free(c.tokens); free(c.positions);
    cio_index_free(&c.ix);
    sae_stats_free(p1.st);
    sae_model_free(m);
    return 0;
}
