/*
 * capture_io: what the capture programs share, with no llama.cpp or engine types: .npy files of
 * int32 / int64 / float16 / float32 written atomically (temporary file, fsync, rename), int32
 * arrays read back, the corpus split into windows, and the capture's index (cJSON).
 */
#ifndef CAPTURE_IO_H
#define CAPTURE_IO_H

#include <stddef.h>
#include <stdint.h>

/* dtype: "<i4", "<i8", "<f2", "<f4". data holds int32_t, int64_t, uint16_t (IEEE half) or float.
 * Atomic: path is either untouched or complete. Returns 0, or -1 with a message in err. */
int cio_npy_write(const char *path, const char *dtype, const void *data, size_t rows, size_t cols,
                  char *err, size_t cap);
/* Reads a 1-D "<i4" array (malloc'd into *out, length *n). Returns 0 or -1 with a message. */
int cio_npy_read_i32(const char *path, int32_t **out, size_t *n, char *err, size_t cap);
/* float -> IEEE half, round to nearest even (overflow to infinity). */
uint16_t cio_f16(float f);

/* A corpus of documents: plain text (one document a line; empty lines are skipped) or JSON lines
 * (one object a line, its string field `field`). Documents are read one at a time. */
typedef struct cio_corpus cio_corpus;
int cio_corpus_open(cio_corpus **out, const char *path, int jsonl, const char *field, char *err,
                    size_t cap);
/* The next document's text (owned by the corpus, valid until the next call), NULL at the end;
 * *doc gets its number (0, 1, ...: its line among the non-empty lines). On a malformed JSON line
 * returns NULL and sets *bad = 1 with a message in err. */
const char *cio_corpus_next(cio_corpus *c, int64_t *doc, int *bad, char *err, size_t cap);
/* Bytes of the file consumed so far. */
long cio_corpus_tell(cio_corpus *c);
void cio_corpus_close(cio_corpus *c);

/* A capture's index.json: its shards (name and token count, in order) and hooks. */
typedef struct {
    int n_shards, n_hooks;
    char **shards;
    long long *tokens;
    char **hooks;
    long long total;
    int complete;
    size_t n_embd;
} cio_index;
int cio_index_load(const char *dir, cio_index *ix, char *err, size_t cap);
void cio_index_free(cio_index *ix);

#endif
