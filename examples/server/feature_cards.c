/*
 * feature_cards.c: see feature_cards.h. The statistics file is read once, checked whole and kept as flat
 * arrays; a card is built from them on request, with the decoder row's logits computed then
 * (a pass over the unembedding, which stays in the GGUF file, mapped read-only: the same pages
 * llama.cpp maps, so no second copy of it is made).
 */
#define _POSIX_C_SOURCE 200809L
#include "feature_cards.h"

#include "ggml.h"
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATS_FORMAT "libsae-feature-stats-1"
#define N_LOGITS 10    /* tokens promoted and suppressed on a card */
#define N_NEIGHBORS 10 /* nearest features on a card */
#define SETTING_MAX 1000 /* the most sae-server-stats allows for --top, --before, --after, --bins */

typedef struct {
    uint64_t index;  /* the example's token in the capture */
    float value;
    uint32_t target; /* its place in the context */
    uint32_t len;
    size_t off;      /* into tok[] and val[] */
} context;

/* A tensor of the GGUF file, mapped read-only. */
typedef struct {
    void *map;
    size_t map_len;
    const unsigned char *data;
    enum ggml_type type;
    int64_t cols, rows;
    size_t row_bytes;
} gguf_tensor;

struct feature_cards {
    const sae_model *m;
    size_t d_sae, d;
    char *hook;
    uint64_t tokens;         /* counted in the statistics */
    uint64_t capture_tokens; /* in the capture (the contexts' indices) */
    size_t bins;
    uint64_t *count;   /* [d_sae] */
    double *sum;
    float *max;
    float *edges;      /* [d_sae][bins + 1], unused for a feature that never fired */
    uint64_t *hist;    /* [d_sae][bins] */
    size_t *ctx_first; /* [d_sae + 1]: feature i's contexts are ctx[ctx_first[i] ..] */
    context *ctx;
    int32_t *tok;
    float *val;
    int32_t n_vocab;
    char **piece;      /* [n_vocab] each token's text, valid UTF-8 */
    float *w_dec;      /* [d_sae][d]: the decoder rows, divided by nothing yet */
    double input_scale;
    double *norm_w;    /* [d]: the final norm's weight */
    gguf_tensor unemb; /* [n_vocab][d] */
};

__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t cap, const char *fmt,
                                                          ...)
{
    if (!err || !cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

/* ---- the statistics file -------------------------------------------------------------------- */

static char *slurp(const char *path, size_t *len, char *err, size_t cap)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, cap, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t n = 0, got;
    char chunk[1 << 16];
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        char *b = realloc(buf, n + got + 1);
        if (!b) {
            free(buf);
            fclose(f);
            set_err(err, cap, "%s: out of memory", path);
            return NULL;
        }
        buf = b;
        memcpy(buf + n, chunk, got);
        n += got;
    }
    const int bad = ferror(f);
    fclose(f);
    if (bad || !buf) {
        free(buf);
        set_err(err, cap, "%s: %s", path, bad ? "read error" : "empty file");
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* A whole number in [0, hi] at o[key] (or o itself when key is NULL). */
static bool get_whole(const cJSON *o, const char *key, double hi, uint64_t *out)
{
    const cJSON *v = key ? cJSON_GetObjectItemCaseSensitive(o, key) : o;
    if (!cJSON_IsNumber(v))
        return false;
    const double d = v->valuedouble;
    if (!(d >= 0 && d <= hi) || d != floor(d))
        return false;
    *out = (uint64_t)d;
    return true;
}

static bool get_real(const cJSON *o, const char *key, double *out)
{
    const cJSON *v = key ? cJSON_GetObjectItemCaseSensitive(o, key) : o;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return false;
    *out = v->valuedouble;
    return true;
}

/* A float >= 0, as the statistics pass wrote it: cJSON prints some doubles with 15 digits,
 * which come back within a double's rounding of the float, so the nearest float is it. */
static bool get_float(const cJSON *o, const char *key, float *out)
{
    double d;
    if (!get_real(o, key, &d) || d < 0 || d > 3.4028234663852886e38)
        return false;
    *out = (float)d;
    return true;
}

static const cJSON *get_array(const cJSON *o, const char *key, int n)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsArray(a) && (n < 0 || cJSON_GetArraySize(a) == n) ? a : NULL;
}

/* Reads feature i's entry into fc (its contexts from *n_ctx on, growing the pools). */
static int load_feature(feature_cards *fc, size_t i, const cJSON *o, uint64_t top_n,
                        uint64_t window, size_t *n_ctx, size_t *n_pool, const char *path,
                        char *err, size_t cap)
{
#define BAD(...)                                                                                \
    do {                                                                                        \
        char what_[256];                                                                        \
        snprintf(what_, sizeof what_, __VA_ARGS__);                                             \
        set_err(err, cap, "%s: feature %zu: %s", path, i, what_);                               \
        return -1;                                                                              \
    } while (0)
    if (!cJSON_IsObject(o))
        BAD("not an object");
    if (!get_whole(o, "count", (double)fc->tokens, &fc->count[i]))
        BAD("'count' is not a whole number from 0 to the %llu tokens seen",
            (unsigned long long)fc->tokens);
    if (!get_real(o, "sum", &fc->sum[i]) || fc->sum[i] < 0)
        BAD("'sum' is not a finite number >= 0");
    if (!get_float(o, "max", &fc->max[i]))
        BAD("'max' is not a float >= 0");
    const int nb = fc->count[i] ? (int)fc->bins : 0;
    const cJSON *e = get_array(o, "edges", nb ? nb + 1 : 0), *h = get_array(o, "hist", nb);
    if (!e || !h)
        BAD("'edges' and 'hist' must hold %d and %d numbers", nb ? nb + 1 : 0, nb);
    float *ed = fc->edges + i * (fc->bins + 1);
    uint64_t *hi = fc->hist + i * fc->bins, total = 0;
    int j = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, e) {
        if (!get_float(it, NULL, &ed[j]) || !(ed[j] > 0) || (j && ed[j] < ed[j - 1]))
            BAD("'edges' must be positive and ascending");
        j++;
    }
    if (nb && ed[nb] != fc->max[i])
        BAD("the last edge is not the feature's maximum");
    j = 0;
    cJSON_ArrayForEach(it, h) {
        if (!get_whole(it, NULL, (double)fc->tokens, &hi[j]))
            BAD("'hist' holds something other than token counts");
        total += hi[j++];
    }
    if (total != fc->count[i])
        BAD("the histogram counts %llu tokens, 'count' says %llu", (unsigned long long)total,
            (unsigned long long)fc->count[i]);
    const cJSON *top = get_array(o, "top", -1);
    if (!top || (uint64_t)cJSON_GetArraySize(top) > top_n ||
        (uint64_t)cJSON_GetArraySize(top) > fc->count[i])
        BAD("'top' is not a list of at most top_n (and count) contexts");
    cJSON_ArrayForEach(it, top) {
        context *c = &fc->ctx[*n_ctx];
        uint64_t target;
        const cJSON *tk = get_array(it, "tokens", -1), *tv = get_array(it, "values", -1);
        if (!cJSON_IsObject(it) || !get_float(it, "value", &c->value) || !(c->value > 0) ||
            c->value > fc->max[i] ||
            !get_whole(it, "index", (double)fc->capture_tokens - 1, &c->index) ||
            !get_whole(it, "target", (double)window - 1, &target) || !tk || !tv)
            BAD("context %zu: 'value', 'index', 'target', 'tokens' or 'values' is missing or out "
                "of range", *n_ctx - fc->ctx_first[i]);
        const int len = cJSON_GetArraySize(tk);
        if (len < 1 || (uint64_t)len > window || cJSON_GetArraySize(tv) != len ||
            target >= (uint64_t)len || target > c->index)
            BAD("context %zu: %d tokens, %d values, target %llu", *n_ctx - fc->ctx_first[i], len,
                cJSON_GetArraySize(tv), (unsigned long long)target);
        c->target = (uint32_t)target;
        c->len = (uint32_t)len;
        c->off = *n_pool;
        int32_t *t = fc->tok + c->off;
        float *v = fc->val + c->off;
        const cJSON *a, *b = tv->child;
        int s = 0;
        cJSON_ArrayForEach(a, tk) {
            uint64_t id;
            if (!get_whole(a, NULL, (double)fc->n_vocab - 1, &id) || !get_float(b, NULL, &v[s]))
                BAD("context %zu: token %d is not a token id below %d with a value >= 0",
                    *n_ctx - fc->ctx_first[i], s, fc->n_vocab);
            t[s++] = (int32_t)id;
            b = b->next;
        }
        if (v[c->target] != c->value)
            BAD("context %zu: the value at the target is not the context's value",
                *n_ctx - fc->ctx_first[i]);
        *n_pool += (size_t)len;
        (*n_ctx)++;
    }
    fc->ctx_first[i + 1] = *n_ctx;
    return 0;
#undef BAD
}

static int load_stats(feature_cards *fc, const char *path, char *err, size_t cap)
{
    size_t len;
    char *text = slurp(path, &len, err, cap);
    if (!text)
        return -1;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, false);
    const size_t at = end && end >= text ? (size_t)(end - text) : 0;
    free(text);
    int rc = -1;
    const cJSON *fmt = root ? cJSON_GetObjectItemCaseSensitive(root, "format") : NULL;
    const cJSON *hook = root ? cJSON_GetObjectItemCaseSensitive(root, "hook") : NULL;
    uint64_t d_sae, d_in, tokens, capture_tokens, top_n, before, after, bins;
    double norm_sum;
    if (!root) {
        set_err(err, cap, "%s: not JSON (truncated or damaged near byte %zu of %zu)", path, at,
                len);
        return -1;
    }
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, STATS_FORMAT) != 0) {
        set_err(err, cap, "%s: not a feature statistics file (format '%s', expected '%s')", path,
                cJSON_IsString(fmt) ? fmt->valuestring : "", STATS_FORMAT);
        goto out;
    }
    if (!cJSON_IsString(hook) || !get_whole(root, "d_sae", 4294967295.0, &d_sae) ||
        !get_whole(root, "d_in", 1e9, &d_in) || !get_whole(root, "tokens", 9e15, &tokens) ||
        tokens == 0 || !get_whole(root, "capture_tokens", 9e15, &capture_tokens) ||
        capture_tokens < tokens || !get_whole(root, "top_n", SETTING_MAX, &top_n) ||
        !get_whole(root, "before", SETTING_MAX, &before) ||
        !get_whole(root, "after", SETTING_MAX, &after) ||
        !get_whole(root, "bins", SETTING_MAX, &bins) || bins == 0 ||
        !get_real(root, "decoder_norm_sum", &norm_sum)) {
        set_err(err, cap, "%s: 'hook', 'd_sae', 'd_in', 'tokens', 'capture_tokens', 'top_n', "
                          "'before', 'after', 'bins' or 'decoder_norm_sum' is missing or out of "
                          "range", path);
        goto out;
    }
    if (d_sae != fc->d_sae || d_in != sae_model_d_in(fc->m)) {
        set_err(err, cap, "%s: made for a dictionary of %llu inputs and %llu features, this one "
                          "has %zu and %zu", path, (unsigned long long)d_in,
                (unsigned long long)d_sae, sae_model_d_in(fc->m), fc->d_sae);
        goto out;
    }
    /* Another dictionary of the same shape: its decoder norms differ (bfloat16 weights move
     * them by about 2^-9 relative, far less than this). */
    float *norms = malloc(fc->d_sae * sizeof *norms);
    if (!norms) {
        set_err(err, cap, "out of memory");
        goto out;
    }
    double mine = 0;
    sae_model_decoder_norms(fc->m, norms);
    for (size_t i = 0; i < fc->d_sae; i++)
        mine += (double)norms[i];
    free(norms);
    if (!(fabs(mine - norm_sum) <= 1e-3 * fabs(mine))) {
        set_err(err, cap, "%s: made for another dictionary (its decoder norms sum to %.9g, this "
                          "one's to %.9g)", path, norm_sum, mine);
        goto out;
    }
    const cJSON *feats = get_array(root, "features", (int)d_sae);
    if (!feats) {
        set_err(err, cap, "%s: 'features' is not a list of %llu entries", path,
                (unsigned long long)d_sae);
        goto out;
    }
    fc->tokens = tokens;
    fc->capture_tokens = capture_tokens;
    fc->bins = (size_t)bins;
    const uint64_t window = before + after + 1;
    /* the pools' sizes first, so that they are allocated once */
    size_t n_ctx = 0, n_pool = 0;
    const cJSON *f, *t;
    cJSON_ArrayForEach(f, feats) {
        cJSON_ArrayForEach(t, cJSON_GetObjectItemCaseSensitive(f, "top")) {
            n_ctx++;
            n_pool += (size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(t, "tokens"));
        }
    }
    fc->hook = strdup(hook->valuestring);
    fc->count = calloc(fc->d_sae, sizeof *fc->count);
    fc->sum = calloc(fc->d_sae, sizeof *fc->sum);
    fc->max = calloc(fc->d_sae, sizeof *fc->max);
    fc->edges = calloc(fc->d_sae * (fc->bins + 1), sizeof *fc->edges);
    fc->hist = calloc(fc->d_sae * fc->bins, sizeof *fc->hist);
    fc->ctx_first = calloc(fc->d_sae + 1, sizeof *fc->ctx_first);
    fc->ctx = calloc(n_ctx + 1, sizeof *fc->ctx);
    fc->tok = calloc(n_pool + 1, sizeof *fc->tok);
    fc->val = calloc(n_pool + 1, sizeof *fc->val);
    if (!fc->hook || !fc->count || !fc->sum || !fc->max || !fc->edges || !fc->hist ||
        !fc->ctx_first || !fc->ctx || !fc->tok || !fc->val) {
        set_err(err, cap, "%s: out of memory", path);
        goto out;
    }
    size_t i = 0, at_ctx = 0, at_pool = 0;
    cJSON_ArrayForEach(f, feats) {
        if (load_feature(fc, i++, f, top_n, window, &at_ctx, &at_pool, path, err, cap) != 0)
            goto out;
    }
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

/* ---- token texts ---------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 if it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t len;
    uint32_t cp;
    if (s[0] < 0x80) return 1;
    if ((s[0] & 0xe0) == 0xc0) { len = 2; cp = s[0] & 0x1fu; }
    else if ((s[0] & 0xf0) == 0xe0) { len = 3; cp = s[0] & 0x0fu; }
    else if ((s[0] & 0xf8) == 0xf0) { len = 4; cp = s[0] & 0x07u; }
    else return 0;
    if (len > n) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3fu);
    }
    static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < least[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return len;
}

/* A piece of a multi-byte character (a byte-fallback token) is shown as <0xNN>: JSON text must
 * be UTF-8. */
static char *piece_text(const struct llama_vocab *vocab, llama_token t)
{
    char buf[256];
    int32_t n = llama_token_to_piece(vocab, t, buf, (int32_t)sizeof buf, 0, true);
    if (n < 0 || n > (int32_t)sizeof buf)
        n = 0;
    char *out = malloc((size_t)n * 6 + 1), *o = out;
    if (!out)
        return NULL;
    for (size_t k = 0; k < (size_t)n;) {
        const size_t l = utf8_len((const unsigned char *)buf + k, (size_t)n - k);
        if (l) {
            memcpy(o, buf + k, l);
            o += l;
            k += l;
        } else {
            o += sprintf(o, "<0x%02X>", (unsigned char)buf[k++]);
        }
    }
    *o = 0;
    return out;
}

/* ---- the model's final norm and unembedding ------------------------------------------------- */

static int map_tensor(gguf_tensor *t, int fd, off_t file_size, const struct gguf_context *g,
                      const char *name, const char *path, char *err, size_t cap)
{
    const int64_t id = gguf_find_tensor(g, name);
    if (id < 0) {
        set_err(err, cap, "%s: no tensor %s", path, name);
        return -1;
    }
    const int64_t *ne = gguf_get_tensor_ne(g, id);
    t->type = gguf_get_tensor_type(g, id);
    t->cols = ne[0];
    t->rows = ne[1] * ne[2] * ne[3];
    t->row_bytes = ggml_row_size(t->type, t->cols);
    const size_t size = gguf_get_tensor_size(g, id);
    const size_t off = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id);
    if (t->type != GGML_TYPE_F32 && !ggml_get_type_traits(t->type)->to_float) {
        set_err(err, cap, "%s: %s is of type %s, which ggml cannot convert to float", path, name,
                ggml_type_name(t->type));
        return -1;
    }
    if (size != t->row_bytes * (size_t)t->rows || off + size > (size_t)file_size) {
        set_err(err, cap, "%s: %s lies outside the file (truncated?)", path, name);
        return -1;
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), start = off / page * page;
    t->map_len = off + size - start;
    t->map = mmap(NULL, t->map_len, PROT_READ, MAP_PRIVATE, fd, (off_t)start);
    if (t->map == MAP_FAILED) {
        t->map = NULL;
        set_err(err, cap, "%s: mapping %s: %s", path, name, strerror(errno));
        return -1;
    }
    t->data = (const unsigned char *)t->map + (off - start);
    return 0;
}

static void row_to_float(const gguf_tensor *t, int64_t r, float *dst)
{
    const void *src = t->data + (size_t)r * t->row_bytes;
    if (t->type == GGML_TYPE_F32)
        memcpy(dst, src, (size_t)t->cols * sizeof *dst);
    else
        ggml_get_type_traits(t->type)->to_float(src, dst, t->cols);
}

static void unmap(gguf_tensor *t)
{
    if (t->map)
        munmap(t->map, t->map_len);
    t->map = NULL;
}

static int load_unembedding(feature_cards *fc, const char *path, char *err, size_t cap)
{
    struct gguf_init_params gp = {.no_alloc = true, .ctx = NULL};
    struct gguf_context *g = gguf_init_from_file(path, gp);
    if (!g) {
        set_err(err, cap, "%s: not a GGUF file ggml can read", path);
        return -1;
    }
    int rc = -1, fd = open(path, O_RDONLY);
    struct stat st;
    gguf_tensor norm = {0};
    if (fd < 0 || fstat(fd, &st) != 0) {
        set_err(err, cap, "%s: %s", path, strerror(errno));
        goto out;
    }
    /* a model with tied embeddings unembeds with its token embedding */
    const char *un = gguf_find_tensor(g, "output.weight") >= 0 ? "output.weight"
                                                               : "token_embd.weight";
    if (map_tensor(&norm, fd, st.st_size, g, "output_norm.weight", path, err, cap) != 0 ||
        map_tensor(&fc->unemb, fd, st.st_size, g, un, path, err, cap) != 0)
        goto out;
    if (norm.cols != (int64_t)fc->d || norm.rows != 1 || fc->unemb.cols != (int64_t)fc->d ||
        fc->unemb.rows != fc->n_vocab) {
        set_err(err, cap, "%s: output_norm.weight is [%lld], %s [%lld][%lld]; the dictionary "
                          "writes %zu-wide rows and the vocabulary has %d tokens", path,
                (long long)norm.cols, un, (long long)fc->unemb.rows, (long long)fc->unemb.cols,
                fc->d, fc->n_vocab);
        goto out;
    }
    float *w = malloc(fc->d * sizeof *w);
    fc->norm_w = malloc(fc->d * sizeof *fc->norm_w);
    if (!w || !fc->norm_w) {
        free(w);
        set_err(err, cap, "out of memory");
        goto out;
    }
    row_to_float(&norm, 0, w);
    for (size_t j = 0; j < fc->d; j++)
        fc->norm_w[j] = (double)w[j];
    free(w);
    rc = 0;
out:
    unmap(&norm);
    if (fd >= 0)
        close(fd); /* the mapping stays valid */
    gguf_free(g);
    return rc;
}

/* ---- open and free -------------------------------------------------------------------------- */

int feature_cards_open(feature_cards **out, const char *stats_path, const sae_model *m,
                       const struct llama_model *lm, const char *gguf_path, char *err,
                       size_t errlen)
{
    if (!out || !stats_path || !m || !lm || !gguf_path) {
        set_err(err, errlen, "feature_cards_open: a NULL argument");
        return -1;
    }
    *out = NULL;
    feature_cards *fc = calloc(1, sizeof *fc);
    if (!fc) {
        set_err(err, errlen, "out of memory");
        return -1;
    }
    fc->m = m;
    fc->d_sae = sae_model_d_sae(m);
    fc->d = sae_model_d_out(m);
    const struct llama_vocab *vocab = llama_model_get_vocab(lm);
    fc->n_vocab = llama_vocab_n_tokens(vocab);
    if (load_stats(fc, stats_path, err, errlen) != 0 ||
        load_unembedding(fc, gguf_path, err, errlen) != 0)
        goto fail;
    fc->piece = calloc((size_t)fc->n_vocab, sizeof *fc->piece);
    fc->w_dec = malloc(fc->d_sae * fc->d * sizeof *fc->w_dec);
    if (!fc->piece || !fc->w_dec) {
        set_err(err, errlen, "out of memory");
        goto fail;
    }
    for (int32_t t = 0; t < fc->n_vocab; t++)
        if (!(fc->piece[t] = piece_text(vocab, t))) {
            set_err(err, errlen, "out of memory");
            goto fail;
        }
    double scale = 1;
    if (sae_model_get_tensor(m, SAE_W_DEC, fc->w_dec) != SAE_OK ||
        (!sae_model_is_transcoder(m) &&
         sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &scale) != SAE_OK)) {
        set_err(err, errlen, "%s", sae_last_error());
        goto fail;
    }
    fc->input_scale = scale;
    *out = fc;
    return 0;
fail:
    feature_cards_free(fc);
    return -1;
}

void feature_cards_free(feature_cards *fc)
{
    if (!fc)
        return;
    if (fc->piece)
        for (int32_t t = 0; t < fc->n_vocab; t++)
            free(fc->piece[t]);
    free(fc->piece);
    unmap(&fc->unemb);
    free(fc->hook); free(fc->count); free(fc->sum); free(fc->max); free(fc->edges);
    free(fc->hist); free(fc->ctx_first); free(fc->ctx); free(fc->tok); free(fc->val);
    free(fc->w_dec); free(fc->norm_w);
    free(fc);
}

/* ---- a card --------------------------------------------------------------------------------- */

typedef struct {
    int32_t id;
    double logit;
} scored;

/* Keeps best[0..k) ordered, best first (sign 1: largest; -1: smallest); ids arrive ascending, so
 * a tie keeps the smaller id. */
static void offer(scored *best, size_t *n, size_t k, int32_t id, double logit, double sign)
{
    if (*n == k && !(sign * logit > sign * best[k - 1].logit))
        return;
    size_t at = *n < k ? (*n)++ : k - 1;
    while (at > 0 && sign * logit > sign * best[at - 1].logit) {
        best[at] = best[at - 1];
        at--;
    }
    best[at] = (scored){id, logit};
}

static cJSON *token_list(const feature_cards *fc, const scored *s, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t k = 0; a && k < n; k++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "id", s[k].id);
        cJSON_AddStringToObject(o, "text", fc->piece[s[k].id]);
        cJSON_AddNumberToObject(o, "logit", s[k].logit);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

/* The decoder row through the final norm's weight and the unembedding, in double:
 *   logit_v = sum_j U[v][j] * (W_dec[f][j] * g[j] / INPUT_SCALE). */
static int add_logits(const feature_cards *fc, uint32_t feature, cJSON *card)
{
    double *dir = malloc(fc->d * sizeof *dir);
    float *row = malloc(fc->d * sizeof *row);
    scored up[N_LOGITS], down[N_LOGITS];
    size_t n_up = 0, n_down = 0;
    if (!dir || !row) {
        free(dir);
        free(row);
        return -1;
    }
    const float *w = fc->w_dec + (size_t)feature * fc->d;
    for (size_t j = 0; j < fc->d; j++)
        dir[j] = (double)w[j] * fc->norm_w[j] / fc->input_scale;
    for (int32_t v = 0; v < fc->n_vocab; v++) {
        row_to_float(&fc->unemb, v, row);
        double s = 0;
        for (size_t j = 0; j < fc->d; j++)
            s += (double)row[j] * dir[j];
        offer(up, &n_up, N_LOGITS, v, s, 1);
        offer(down, &n_down, N_LOGITS, v, s, -1);
    }
    free(dir);
    free(row);
    cJSON_AddItemToObject(card, "promoted", token_list(fc, up, n_up));
    cJSON_AddItemToObject(card, "suppressed", token_list(fc, down, n_down));
    return 0;
}

cJSON *feature_cards_card(const feature_cards *fc, uint32_t feature, char *err, size_t errlen)
{
    if (!fc) {
        set_err(err, errlen, "no feature cards");
        return NULL;
    }
    if (feature >= fc->d_sae) {
        set_err(err, errlen, "feature %u is out of range: %s has %zu features (0 to %zu)",
                feature, fc->hook, fc->d_sae, fc->d_sae - 1);
        return NULL;
    }
    cJSON *card = cJSON_CreateObject();
    if (!card)
        goto oom;
    const uint64_t c = fc->count[feature];
    cJSON_AddStringToObject(card, "hook", fc->hook);
    cJSON_AddNumberToObject(card, "feature", feature);
    cJSON_AddNumberToObject(card, "d_sae", (double)fc->d_sae);
    cJSON_AddNumberToObject(card, "tokens_seen", (double)fc->tokens);
    cJSON_AddNumberToObject(card, "count", (double)c);
    cJSON_AddNumberToObject(card, "frequency", (double)c / (double)fc->tokens);
    cJSON_AddNumberToObject(card, "mean", c ? fc->sum[feature] / (double)c : 0.0);
    cJSON_AddNumberToObject(card, "max", (double)fc->max[feature]);

    cJSON *h = cJSON_AddObjectToObject(card, "histogram");
    cJSON_AddStringToObject(h, "scale", "log");
    cJSON *edges = cJSON_AddArrayToObject(h, "edges");
    cJSON *counts = cJSON_AddArrayToObject(h, "counts");
    for (size_t j = 0; c && j <= fc->bins; j++) {
        cJSON_AddItemToArray(edges,
                             cJSON_CreateNumber((double)fc->edges[feature * (fc->bins + 1) + j]));
        if (j < fc->bins)
            cJSON_AddItemToArray(counts,
                                 cJSON_CreateNumber((double)fc->hist[feature * fc->bins + j]));
    }

    cJSON *top = cJSON_AddArrayToObject(card, "top_contexts");
    for (size_t k = fc->ctx_first[feature]; k < fc->ctx_first[feature + 1]; k++) {
        const context *x = &fc->ctx[k];
        cJSON *o = cJSON_CreateObject(), *toks = cJSON_CreateArray();
        cJSON_AddNumberToObject(o, "value", (double)x->value);
        cJSON_AddNumberToObject(o, "index", (double)x->index);
        cJSON_AddNumberToObject(o, "target", x->target);
        for (uint32_t s = 0; s < x->len; s++) {
            cJSON *t = cJSON_CreateObject();
            const int32_t id = fc->tok[x->off + s];
            cJSON_AddNumberToObject(t, "id", id);
            cJSON_AddStringToObject(t, "text", fc->piece[id]);
            cJSON_AddNumberToObject(t, "value", (double)fc->val[x->off + s]);
            cJSON_AddItemToArray(toks, t);
        }
        cJSON_AddItemToObject(o, "tokens", toks);
        cJSON_AddItemToArray(top, o);
    }

    if (add_logits(fc, feature, card) != 0)
        goto oom;

    const size_t k = fc->d_sae - 1 < N_NEIGHBORS ? fc->d_sae - 1 : N_NEIGHBORS;
    uint32_t idx[N_NEIGHBORS];
    float cos[N_NEIGHBORS];
    if (k && sae_feature_neighbors(fc->m, feature, k, idx, cos) != SAE_OK) {
        set_err(err, errlen, "%s", sae_last_error());
        cJSON_Delete(card);
        return NULL;
    }
    cJSON *nb = cJSON_AddArrayToObject(card, "neighbors");
    for (size_t j = 0; j < k; j++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "feature", idx[j]);
        cJSON_AddNumberToObject(o, "cosine", (double)cos[j]);
        cJSON_AddItemToArray(nb, o);
    }
    return card;
oom:
    cJSON_Delete(card);
    set_err(err, errlen, "out of memory building the card of feature %u", feature);
    return NULL;
}
