/*
 * tokenizer.c - llama2.c's tokenizer file format, its BPE-by-score encoder and the decoder.
 *
 * The encoder follows the algorithm llama2.c describes: a " " dummy prefix for non-empty text,
 * one token per UTF-8 character with a byte fallback (byte b -> id 3 + b), then greedy merges
 * of the adjacent pair whose merged piece scores highest. Pieces are compared as byte strings
 * with their lengths, so a piece may contain any byte.
 */
#include "engine.h"
#include "engine_internal.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BYTE_TOKEN0 3 /* id of <0x00>; <0xFF> is 258 */

typedef struct {
    const char *p;
    size_t len;
    int id;
} piece_ref;

struct llama_tokenizer {
    int n;
    size_t max_len;        /* longest piece, in bytes */
    char *arena;           /* all pieces, each NUL-terminated */
    const char **piece;    /* [n] */
    size_t *len;           /* [n] */
    float *score;          /* [n] */
    piece_ref *sorted;     /* [n] by bytes, then id: for lookups */
    unsigned char byte[256];
};

void llama_tokenizer_free(llama_tokenizer *t)
{
    if (!t)
        return;
    free(t->arena);
    free(t->piece);
    free(t->len);
    free(t->score);
    free(t->sorted);
    free(t);
}

static int cmp_bytes(const char *a, size_t la, const char *b, size_t lb)
{
    size_t n = la < lb ? la : lb;
    int c = memcmp(a, b, n);
    if (c)
        return c;
    return la < lb ? -1 : la > lb ? 1 : 0;
}

static int cmp_ref(const void *a, const void *b)
{
    const piece_ref *x = a, *y = b;
    int c = cmp_bytes(x->p, x->len, y->p, y->len);
    return c ? c : (x->id > y->id) - (x->id < y->id);
}

/* Lowest id whose piece is exactly p[0..len-1], or -1. */
static int lookup(const llama_tokenizer *t, const char *p, size_t len)
{
    size_t lo = 0, hi = (size_t)t->n;
    while (lo < hi) { /* first entry >= (p, len) */
        size_t mid = lo + (hi - lo) / 2;
        if (cmp_bytes(t->sorted[mid].p, t->sorted[mid].len, p, len) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < (size_t)t->n && cmp_bytes(t->sorted[lo].p, t->sorted[lo].len, p, len) == 0)
        return t->sorted[lo].id;
    return -1;
}

static int32_t get_i32(const unsigned char *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

int llama_tokenizer_load(const char *path, int vocab_size, llama_tokenizer **out)
{
    if (!out)
        return llama_fail(LLAMA_EINVAL, "llama_tokenizer_load: out is NULL");
    *out = NULL;
    if (!path)
        return llama_fail(LLAMA_EINVAL, "llama_tokenizer_load: path is NULL");
    if (vocab_size < BYTE_TOKEN0 + 256)
        return llama_fail(LLAMA_EINVAL,
                          "llama_tokenizer_load: vocab_size %d < 259 (ids 3..258 must be the "
                          "byte tokens)",
                          vocab_size);
    llama_clear_error();
    unsigned char *data;
    size_t size;
    int rc = llama_read_file(path, &data, &size);
    if (rc)
        return rc;
    if (size < 4) {
        free(data);
        return llama_fail(LLAMA_EFORMAT, "%s: %zu bytes, too short for max_token_length", path,
                          size);
    }
    int32_t max_declared = get_i32(data);
    if (max_declared <= 0) {
        free(data);
        return llama_fail(LLAMA_EFORMAT, "%s: max_token_length is %d, expected > 0", path,
                          (int)max_declared);
    }

    /* first pass: validate the records and size the arena */
    size_t off = 4, total = 0, max_len = 0;
    for (int i = 0; i < vocab_size; i++) {
        if (size - off < 8) {
            free(data);
            return llama_fail(LLAMA_EFORMAT,
                              "%s: truncated at token %d of %d (byte offset %zu, file %zu bytes)",
                              path, i, vocab_size, off, size);
        }
        float score;
        memcpy(&score, data + off, 4);
        int32_t len = get_i32(data + off + 4);
        if (!isfinite(score)) {
            free(data);
            return llama_fail(LLAMA_EFORMAT, "%s: token %d has a non-finite score (offset %zu)",
                              path, i, off);
        }
        if (len < 0 || len > max_declared) {
            free(data);
            return llama_fail(LLAMA_EFORMAT,
                              "%s: token %d has length %d, expected 0..%d (max_token_length) "
                              "(offset %zu)",
                              path, i, (int)len, (int)max_declared, off + 4);
        }
        off += 8;
        if (size - off < (size_t)len) {
            free(data);
            return llama_fail(LLAMA_EFORMAT,
                              "%s: token %d needs %d bytes at offset %zu, only %zu left", path,
                              i, (int)len, off, size - off);
        }
        off += (size_t)len;
        total += (size_t)len + 1;
        if ((size_t)len > max_len)
            max_len = (size_t)len;
    }
    if (off != size) {
        free(data);
        return llama_fail(LLAMA_EFORMAT,
                          "%s: %zu bytes left after the %d tokens (ends at offset %zu): wrong "
                          "vocab_size or not a tokenizer file?",
                          path, size - off, vocab_size, off);
    }

    llama_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        free(data);
        return llama_fail(LLAMA_ENOMEM, "%s: out of memory", path);
    }
    size_t n = (size_t)vocab_size;
    t->n = vocab_size;
    t->max_len = max_len;
    t->arena = malloc(total);
    t->piece = malloc(n * sizeof *t->piece);
    t->len = malloc(n * sizeof *t->len);
    t->score = malloc(n * sizeof *t->score);
    t->sorted = malloc(n * sizeof *t->sorted);
    if (!t->arena || !t->piece || !t->len || !t->score || !t->sorted) {
        free(data);
        llama_tokenizer_free(t);
        return llama_fail(LLAMA_ENOMEM, "%s: out of memory", path);
    }
    off = 4;
    char *a = t->arena;
    for (size_t i = 0; i < n; i++) {
        memcpy(&t->score[i], data + off, 4);
        size_t len = (size_t)get_i32(data + off + 4);
        off += 8;
        memcpy(a, data + off, len);
        a[len] = '\0';
        t->piece[i] = a;
        t->len[i] = len;
        t->sorted[i] = (piece_ref){a, len, (int)i};
        a += len + 1;
        off += len;
    }
    free(data);
    qsort(t->sorted, n, sizeof *t->sorted, cmp_ref);
    for (int b = 0; b < 256; b++)
        t->byte[b] = (unsigned char)b;
    *out = t;
    return LLAMA_OK;
}

int llama_tokenizer_vocab_size(const llama_tokenizer *t) { return t ? t->n : 0; }

const char *llama_tokenizer_raw_piece(const llama_tokenizer *t, int token)
{
    if (!t || token < 0 || token >= t->n) {
        llama_fail(LLAMA_EINVAL, "llama_tokenizer_raw_piece: token %d out of range", token);
        return NULL;
    }
    return t->piece[token];
}

int llama_tokenize(const llama_tokenizer *t, const char *text, int bos, int eos, int *tokens,
                   int cap, int *n_tokens)
{
    if (!t || !text || !n_tokens || (!tokens && cap > 0))
        return llama_fail(LLAMA_EINVAL, "llama_tokenize: a pointer argument is NULL");
    *n_tokens = 0;
    size_t tl = strlen(text);
    if (tl > (size_t)INT32_MAX - 3)
        return llama_fail(LLAMA_EINVAL, "llama_tokenize: text of %zu bytes is too long", tl);
    int *ids = malloc((tl + 3) * sizeof(int));
    char *buf = malloc(2 * t->max_len + 1);
    if (!ids || !buf) {
        free(ids);
        free(buf);
        return llama_fail(LLAMA_ENOMEM, "llama_tokenize: out of memory");
    }
    int n = 0;
    if (bos)
        ids[n++] = LLAMA_TOKEN_BOS;
    if (tl > 0) {
        int space = lookup(t, " ", 1);
        if (space >= 0)
            ids[n++] = space;
    }
    /* one token per UTF-8 character (a lead byte and up to 3 continuation bytes) */
    const char *p = text;
    while (*p) {
        const char *start = p++;
        size_t len = 1;
        while (len < 4 && (*(const unsigned char *)p & 0xC0) == 0x80) {
            p++;
            len++;
        }
        int id = lookup(t, start, len);
        if (id >= 0) {
            ids[n++] = id;
        } else {
            for (size_t i = 0; i < len; i++)
                ids[n++] = BYTE_TOKEN0 + ((const unsigned char *)start)[i];
        }
    }
    /* merge the best-scoring adjacent pair until no pair forms a piece */
    for (;;) {
        int best_id = -1, best_at = -1;
        float best_score = 0.0f;
        for (int i = 0; i + 1 < n; i++) {
            size_t la = t->len[ids[i]], lb = t->len[ids[i + 1]];
            memcpy(buf, t->piece[ids[i]], la);
            memcpy(buf + la, t->piece[ids[i + 1]], lb);
            int id = lookup(t, buf, la + lb);
            if (id >= 0 && (best_id < 0 || t->score[id] > best_score)) {
                best_score = t->score[id];
                best_id = id;
                best_at = i;
            }
        }
        if (best_id < 0)
            break;
        ids[best_at] = best_id;
        memmove(ids + best_at + 1, ids + best_at + 2, (size_t)(n - best_at - 2) * sizeof(int));
        n--;
    }
    if (eos)
        ids[n++] = LLAMA_TOKEN_EOS;
    free(buf);
    *n_tokens = n;
    if (n > cap) {
        free(ids);
        return llama_fail(LLAMA_ERANGE, "llama_tokenize: %d tokens do not fit in %d", n, cap);
    }
    if (n > 0)
        memcpy(tokens, ids, (size_t)n * sizeof(int));
    free(ids);
    return LLAMA_OK;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

const char *llama_token_piece(const llama_tokenizer *t, int prev, int token, size_t *len)
{
    if (!t || !len || token < 0 || token >= t->n) {
        llama_fail(LLAMA_EINVAL, "llama_token_piece: token %d out of range 0..%d", token,
                   t ? t->n - 1 : -1);
        return NULL;
    }
    const char *p = t->piece[token];
    size_t l = t->len[token];
    if (l == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>') {
        int hi = hexval(p[3]), lo = hexval(p[4]);
        if (hi >= 0 && lo >= 0) {
            *len = 1;
            return (const char *)&t->byte[hi * 16 + lo];
        }
    }
    if (prev == LLAMA_TOKEN_BOS && l > 0 && p[0] == ' ') {
        p++;
        l--;
    }
    *len = l;
    return p;
}

int llama_detokenize(const llama_tokenizer *t, const int *tokens, int n, char *buf, size_t cap,
                     size_t *len)
{
    if (!t || (!tokens && n > 0) || (!buf && cap > 0) || n < 0)
        return llama_fail(LLAMA_EINVAL, "llama_detokenize: bad arguments");
    size_t total = 0;
    int prev = -1;
    for (int i = 0; i < n; i++) {
        int tok = tokens[i];
        if (tok < 0 || tok >= t->n)
            return llama_fail(LLAMA_EINVAL, "llama_detokenize: token %d (at %d) out of range",
                              tok, i);
        if (tok != LLAMA_TOKEN_BOS && tok != LLAMA_TOKEN_EOS) {
            size_t l;
            const char *p = llama_token_piece(t, prev, tok, &l);
            if (cap > 0 && total < cap - 1) {
                size_t room = cap - 1 - total;
                memcpy(buf + total, p, l < room ? l : room);
            }
            total += l;
        }
        prev = tok;
    }
    if (cap > 0)
        buf[total < cap - 1 ? total : cap - 1] = '\0';
    if (len)
        *len = total;
    if (cap <= total)
        return llama_fail(LLAMA_ERANGE, "llama_detokenize: text of %zu bytes does not fit in %zu",
                          total, cap);
    return LLAMA_OK;
}
