/* libsae's private header: shared by the files in lib/, never installed. Internal functions start with
 * "sae__" so that even the static library exports nothing outside the sae_ prefix. */
#ifndef SAE_INTERNAL_H
#define SAE_INTERNAL_H

#include "sae.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- errors (error.c) ---------------------------------------------------------------------- */

/* Records a printf-style message for sae_last_error() and returns code, so that a failure is
 * one line: `return sae__fail(SAE_EINVAL, "x is NULL");`. */
int sae__fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with context ("loading foo.safetensors: ") and returns code. */
int sae__wrap(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define SAE_CHECK_NULL(ptr) SAE_CHECK_NULL_IN(__func__, ptr)
/* For helpers that check arguments on behalf of a public function named fn. */
#define SAE_CHECK_NULL_IN(fn, ptr)                                                                 \
    do {                                                                                           \
        if ((ptr) == NULL)                                                                         \
            return sae__fail(SAE_EINVAL, "%s: argument '%s' is NULL", (fn), #ptr);                \
    } while (0)

/* ---- sizes and memory (util.c) ------------------------------------------------------------- */

/* a * b and a + b, or false when the result would not fit in size_t. */
static inline bool sae__mul(size_t a, size_t b, size_t *out) { return !__builtin_mul_overflow(a, b, out); }
static inline bool sae__add(size_t a, size_t b, size_t *out) { return !__builtin_add_overflow(a, b, out); }

/* malloc/calloc of count * size bytes with overflow checking; on failure they set the error
 * message (naming what) and return NULL. Blocks are 64-byte aligned; release with free(). */
void *sae__alloc(size_t count, size_t size, const char *what);
void *sae__zalloc(size_t count, size_t size, const char *what);

/* SAE_OK when all count values are finite, else SAE_EINVAL naming `what` and the row/column of
 * the first bad value (row length cols). */
int sae__check_finite(const float *v, size_t count, size_t cols, const char *what);

/* ---- files (file.c) ------------------------------------------------------------------------ */

/* A whole file mapped copy-on-write: writes through the mapping stay private to the process. */
typedef struct {
    unsigned char *data;
    size_t size;
} sae__map;

int sae__map_file(const char *path, sae__map *map);
void sae__unmap(sae__map *map);
/* Reads a whole (small) file into a NUL-terminated malloc'd buffer; refuses files over max. */
int sae__read_small_file(const char *path, size_t max, char **out, size_t *size);

/* Atomic replacement of a file: begin opens a temporary in the destination's folder, write
 * appends, commit flushes, syncs and renames over the destination, abort removes the temporary.
 * After a failed write, commit fails and cleans up; abort is always safe to call. */
typedef struct {
    int fd;
    int failed;
    char *tmp_path;
    const char *path;
} sae__atomic_file;

int sae__atomic_begin(sae__atomic_file *f, const char *path);
int sae__atomic_write(sae__atomic_file *f, const void *data, size_t size);
int sae__atomic_commit(sae__atomic_file *f);
void sae__atomic_abort(sae__atomic_file *f);

/* ---- dtypes (dtype.c) ---------------------------------------------------------------------- */

typedef enum { SAE__F32 = 0, SAE__F16, SAE__BF16, SAE__F64, SAE__DTYPE_COUNT } sae__dtype;

size_t sae__dtype_size(sae__dtype t);
const char *sae__dtype_name(sae__dtype t);
/* Converts count little-endian values of type t at src (any alignment) to float, rounding as
 * numpy's astype(float32) does. */
void sae__to_float(sae__dtype t, const unsigned char *src, size_t count, float *dst);

/* ---- safetensors (safetensors.c) ----------------------------------------------------------- */

typedef struct {
    const char *name;   /* points into the parsed header; valid while the file is open */
    sae__dtype dtype;
    size_t ndim;
    size_t shape[4];
    size_t count;       /* product of shape */
    size_t offset;      /* from the start of the file */
    size_t nbytes;
} sae__st_tensor;

typedef struct {
    const unsigned char *data; /* the whole file */
    size_t size;
    const char *path;          /* for messages */
    struct cJSON *header;
    const struct cJSON *metadata; /* __metadata__ or NULL */
    sae__st_tensor *tensors;
    size_t n_tensors;
} sae__safetensors;

/* Parses and validates the header of the safetensors file in data[0..size): lengths, dtypes,
 * shapes and offsets (contiguous, inside the file, consistent with shapes). On failure nothing
 * needs to be released. */
int sae__st_parse(sae__safetensors *st, const unsigned char *data, size_t size, const char *path);
void sae__st_close(sae__safetensors *st);
/* The tensor called name, or NULL. */
const sae__st_tensor *sae__st_find(const sae__safetensors *st, const char *name);
/* A __metadata__ string value, or NULL. */
const char *sae__st_meta(const sae__safetensors *st, const char *key);
/* The tensor `name`, which must exist with exactly the shape (d0) or (d0, d1) (d1 = 0 for 1-D),
 * else SAE_EFORMAT naming what was expected and found. */
int sae__st_expect(const sae__safetensors *st, const char *name, size_t d0, size_t d1,
                   const sae__st_tensor **out);

/* One tensor to write: name, shape and float data. */
typedef struct {
    const char *name;
    size_t ndim;
    size_t shape[2];
    const float *data;
} sae__st_out;

/* Writes an F32 safetensors file atomically; tensors must be sorted by name. meta_keys/values
 * (n_meta pairs) become __metadata__. */
int sae__st_write(const char *path, const sae__st_out *tensors, size_t n_tensors,
                  const char *const *meta_keys, const char *const *meta_values, size_t n_meta);

/* ---- the model (model.c) ------------------------------------------------------------------- */

struct sae_model {
    sae_arch arch;
    size_t d_in, d_sae;
    float *W_enc, *W_dec, *b_enc, *b_dec, *threshold; /* threshold is NULL unless JumpReLU */
    float *dec_norm;      /* [d_sae] ||W_dec[i]||, kept current by sae__model_weights_changed */
    size_t k;             /* TopK, BatchTopK */
    int apply_b_dec;      /* 0 or 1 */
    float input_scale;    /* > 0 */
    float batch_threshold;/* BatchTopK */
    const char *format;   /* "new", "libsae", ... */
    sae__dtype dtype;     /* storage dtype of the source */
    unsigned owned;       /* bit t set: tensor t (sae_tensor) was malloc'd, else it is in map */
    sae__map map;         /* the mapped file tensors may point into; data NULL if none */
};

/* A model with the given shape and no tensors yet (all pointers NULL, defaults set). */
int sae__model_alloc(sae_model **out, sae_arch arch, size_t d_in, size_t d_sae);
/* Gives tensor t malloc'd, zeroed storage of the right size. */
int sae__model_own_tensor(sae_model *m, sae_tensor t);
/* Number of floats in tensor t for this model (0 for threshold when absent). */
size_t sae__model_tensor_count(const sae_model *m, sae_tensor t);
float **sae__model_tensor_slot(sae_model *m, sae_tensor t);
/* Fills tensor t from a safetensors tensor (already checked to have the right shape): used in
 * place from the model's mapping when it is F32 and aligned, else converted into owned memory;
 * transpose reads a [rows][cols] source into the model's [cols][rows]. */
int sae__model_load_tensor(sae_model *m, sae_tensor t, const sae__safetensors *st,
                           const sae__st_tensor *src, bool transpose);
/* Recomputes derived data (decoder row norms) after W_dec changed. */
void sae__model_weights_changed(sae_model *m);

/* ---- encoding (encode.c, topk.c) ----------------------------------------------------------- */

/* pre [n][d_sae] = (scale*x - apply*b_dec) @ W_enc + b_enc, with xs [n][d_in] as scratch. */
void sae__preact(const sae_model *m, const float *x, size_t n, float *xs, float *pre);
/* Turns pre-activations into codes in place (all architectures except TopK's selection, which
 * needs heap scratch of K entries: sae__topk_inplace). */
void sae__activate_inplace(const sae_model *m, float *pre, size_t n);

typedef struct {
    float value;
    uint32_t index;
} sae__scored;

/* Selects the k largest entries of v[0..len) (ties: lower index first) into heap[0..k'), k' =
 * min(k, len), sorted largest first. Linear in len (a k-element min-heap rejects most entries
 * with one comparison). Returns k'. */
size_t sae__topk_select(const float *v, size_t len, size_t k, sae__scored *heap);
/* Keeps the selected positions of the nonzero ... helper for dense TopK: zeroes all but the K
 * largest of v and applies ReLU; heap is scratch of K entries. */
void sae__topk_dense(float *v, size_t len, size_t k, sae__scored *heap);

/* Tokens per block when a call needs [block][d_sae] scratch: keeps scratch near 16 MiB while
 * leaving GEMMs large enough to run at full speed. */
size_t sae__block_tokens(size_t d_sae, size_t n);

/* x_hat rows from codes: x_hat = (f @ W_dec + b_dec) / scale. */
void sae__decode_dense(const sae_model *m, const float *f, size_t n, float *x_hat);

#endif /* SAE_INTERNAL_H */
