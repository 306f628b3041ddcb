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
/* SAE_ENOMEM (naming what) when bytes exceed the machine's physical memory: such a request
 * would be granted by overcommit and get the host process OOM-killed when touched. Every
 * sae__alloc checks its own size; callers making several large blocks check their sum. */
int sae__check_fits_memory(size_t bytes, const char *what);
void *sae__zalloc(size_t count, size_t size, const char *what);

/* SAE_EINVAL (naming fn) unless n tokens of width floats can be addressed and counted in an int,
 * the one "too many tokens" check of every entry point. */
int sae__check_tokens(size_t n, size_t width, const char *fn);

/* SAE_OK when all count values are finite, else SAE_EINVAL naming `what` and the row/column of
 * the first bad value (row length cols). */
int sae__check_finite(const float *v, size_t count, size_t cols, const char *what);

/* *out = (float)value when that float is finite, 0 or normal, and within [lo, hi]; else
 * SAE_EINVAL naming `name` (model.c: the one check every float parameter goes through). */
int sae__float_in_range(double value, double lo, double hi, const char *name, float *out);

/* ---- files (file.c) ------------------------------------------------------------------------ */

/* A whole file mapped copy-on-write: writes through the mapping stay private to the process. */
typedef struct {
    unsigned char *data;
    size_t size;
    bool heap; /* read into malloc'd memory (SAE_LOAD_COPY) rather than mapped */
} sae__map;

struct stat;
/* Opens a regular file for reading without ever blocking: a FIFO, device, socket or directory
 * is refused (SAE_EIO naming what it is) instead of hanging the caller. *st is its fstat. */
int sae__open_regular(const char *path, int *fd, struct stat *st);
/* The whole file: mapped copy-on-write, or with copy read into the process's own memory, so
 * that nothing another process does to the file can reach it (no SIGBUS after a truncation). */
int sae__map_file(const char *path, sae__map *map, bool copy);
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
/* A __metadata__ value that must be present and a finite number spelled as a JSON number (what
 * printf's %g writes: no hex, "inf", spaces or '+' sign), or "nan" / "-nan" where allow_nan says
 * a value may be unknown; else SAE_EFORMAT naming file and key. Every float read from metadata
 * goes through it. */
int sae__st_meta_number(const sae__safetensors *st, const char *key, bool allow_nan, double *out);
/* The same for a whole number: plain decimal digits ("%zu": no sign, no leading zero, no
 * exponent or fraction) not above max. Every count and size read from metadata goes through it. */
int sae__st_meta_size(const sae__safetensors *st, const char *key, size_t max, size_t *out);
/* The tensor `name`, which must exist with exactly the shape (d0) or (d0, d1) (d1 = 0 for 1-D),
 * else SAE_EFORMAT naming what was expected and found. */
int sae__st_expect(const sae__safetensors *st, const char *name, size_t d0, size_t d1,
                   const sae__st_tensor **out);

/* One tensor to write: name, shape and float data, or (data NULL) bfloat16 data. */
typedef struct {
    const char *name;
    size_t ndim;
    size_t shape[2];
    const float *data;
    const uint16_t *bf16;
} sae__st_out;

/* The __metadata__ of libsae's own file (load.c): sae_model_save's keys and values for m, which
 * a training checkpoint writes too so that it loads as the model. The values live in *txt;
 * keys and values need SAE__MODEL_META_MAX entries. Returns the number of pairs. */
enum { SAE__MODEL_META_MAX = 16 };
typedef struct {
    char d_in[24], d_sae[24], d_out[24], k[24], apply[4], scale[32], theta[32];
} sae__model_meta_text;
size_t sae__model_meta(const sae_model *m, sae__model_meta_text *txt, const char **keys,
                       const char **values);
/* Writes an F32 (and BF16) safetensors file atomically; tensors must be sorted by name. meta_keys/values
 * (n_meta pairs) become __metadata__. */
int sae__st_write(const char *path, const sae__st_out *tensors, size_t n_tensors,
                  const char *const *meta_keys, const char *const *meta_values, size_t n_meta);

/* ---- the model (model.c) ------------------------------------------------------------------- */

/* The last architecture and one past the last tensor, for loops over them. */
#define SAE__ARCH_LAST SAE_ARCH_GROUPMAX
#define SAE__TENSOR_END (SAE_B_MAG + 1)
/* "W_enc", ... indexed by sae_tensor (0: NULL). */
extern const char *const sae__tensor_names[SAE__TENSOR_END];

struct sae_model {
    sae_arch arch;
    size_t d_in, d_sae, d_out; /* d_out = d_in for an SAE */
    bool transcoder;           /* predicts y [d_out] from x; never denormalizes its output */
    bool skip;                 /* W_skip exists */
    float *W_enc, *W_dec, *b_enc, *b_dec, *threshold; /* threshold is NULL unless JumpReLU */
    float *W_skip;             /* [d_in][d_out] or NULL */
    float *r_mag, *b_mag;      /* gated only, else NULL */
    float *mag_scale;          /* gated: exp(r_mag), kept current by sae__model_weights_changed */
    sae_normalize normalize;   /* SAE_PARAM_NORMALIZE */
    uint16_t *W_enc16, *W_dec16; /* SAE_PARAM_BF16_WEIGHTS: the weights as bfloat16, and then
                                  * W_enc and W_dec are NULL; read them through weights.c */
    float *dec_norm;      /* [d_sae] ||W_dec[i]||, kept current by sae__model_weights_changed */
    size_t k;             /* TopK, BatchTopK */
    int apply_b_dec;      /* 0 or 1 */
    float input_scale;    /* > 0 */
    float batch_threshold;/* BatchTopK */
    size_t threads;       /* SAE_PARAM_THREADS: 0 = every core this process may use */
    const char *format;   /* "new", "libsae", ... */
    sae__dtype dtype;     /* storage dtype of the source */
    unsigned owned;       /* bit t set: tensor t (sae_tensor) was malloc'd, else it is in map */
    sae__map map;         /* the mapped file tensors may point into; data NULL if none */
};

/* What a model is made of before its tensors exist. */
typedef struct {
    sae_arch arch;
    size_t d_in, d_sae, d_out;
    bool transcoder, skip;
} sae__shape;

/* A model with the given shape and no tensors yet (all pointers NULL, defaults set). */
int sae__model_alloc(sae_model **out, const sae__shape *shape);
/* Bytes of the weight matrices (W_enc, W_dec, W_skip) a model of this shape holds. */
size_t sae__model_weight_bytes(const sae__shape *shape);
/* "none", "layer_norm", "constant_norm" and back (SAE_EINVAL for another name; no message). */
const char *sae__normalize_name(sae_normalize n);
int sae__normalize_from_name(const char *name, sae_normalize *out);
/* Floats per row of tensor t as the model lays it out (1 for vectors). */
size_t sae__model_tensor_cols(const sae_model *m, sae_tensor t);
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
/* Switches W_enc and W_dec to bfloat16 (rounded to nearest even) or back to float (exact).
 * Errors (the model unchanged): SAE_ENOMEM; SAE_ERANGE if a weight is beyond bfloat16's range. */
int sae__model_set_bf16(sae_model *m, bool on);
/* Recomputes derived data (decoder row norms) after W_dec changed. */
void sae__model_weights_changed(sae_model *m);

/* ---- CBLAS with size_t sizes (blas.c): every BLAS call in lib/ goes through these ----------- */

/* Row-major CBLAS with sizes as size_t: work whose sizes exceed INT_MAX is split into calls
 * whose size arguments fit in CBLAS's int (GEMM/GEMV/GER by blocks of rows and columns, inner
 * dimensions in slices accumulated with beta = 1; level-1 vectors in chunks, dots and norms
 * combined without overflow). Precondition, not checked: leading dimensions and increments are at
 * most INT_MAX (they are model widths, which sae_model_new limits). Vectors of saxpy, sscal,
 * sdot and snrm2 are contiguous. Calls where everything fits go straight to CBLAS. */
void sae__sgemm(bool trans_a, bool trans_b, size_t M, size_t N, size_t K, float alpha,
                const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                size_t ldc);
void sae__sgemv(bool trans, size_t M, size_t N, float alpha, const float *A, size_t lda,
                const float *x, size_t incx, float beta, float *y, size_t incy);
void sae__sger(size_t M, size_t N, float alpha, const float *x, size_t incx, const float *y,
               size_t incy, float *A, size_t lda);
void sae__saxpy(size_t n, float a, const float *x, float *y);
void sae__sscal(size_t n, float a, float *x);
float sae__sdot(size_t n, const float *x, const float *y);
float sae__snrm2(size_t n, const float *x);
/* The same with the largest size argument passed to CBLAS as a parameter (the wrappers above
 * use INT_MAX), so that tests can force the splitting on small arrays. limit >= 1. */
void sae__sgemm_limit(bool trans_a, bool trans_b, size_t M, size_t N, size_t K, float alpha,
                      const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                      size_t ldc, size_t limit);
void sae__sgemv_limit(bool trans, size_t M, size_t N, float alpha, const float *A, size_t lda,
                      const float *x, size_t incx, float beta, float *y, size_t incy, size_t limit);
void sae__sger_limit(size_t M, size_t N, float alpha, const float *x, size_t incx, const float *y,
                     size_t incy, float *A, size_t lda, size_t limit);
void sae__saxpy_limit(size_t n, float a, const float *x, float *y, size_t limit);
void sae__sscal_limit(size_t n, float a, float *x, size_t limit);
float sae__sdot_limit(size_t n, const float *x, const float *y, size_t limit);
float sae__snrm2_limit(size_t n, const float *x, size_t limit);

/* ---- short vector kernels --------------------------------------------------------------- */

/* Vector kernels for short vectors (d_in is often 64 to 4096), run per token and feature, where
 * a CBLAS call's fixed cost (tens of nanoseconds in OpenBLAS) exceeds the arithmetic. The inner
 * loops have a fixed count of 8 so that -O2 turns them into vector instructions (GCC's default
 * cost model vectorizes no loop of unknown length), with eight partial sums for the dot. */
static inline void sae__axpy(size_t n, float a, const float *restrict x, float *restrict y)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t q = 0; q < 8; q++)
            y[i + q] += a * x[i + q];
    for (; i < n; i++)
        y[i] += a * x[i];
}

static inline float sae__dot(size_t n, const float *restrict x, const float *restrict y)
{
    float lane[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t q = 0; q < 8; q++)
            lane[q] += x[i + q] * y[i + q];
    for (; i < n; i++)
        lane[0] += x[i] * y[i];
    return ((lane[0] + lane[4]) + (lane[1] + lane[5])) +
           ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

/* ---- weight reads (weights.c): every read of W_enc and W_dec outside training goes here ----- */

/* dst[i] = bfloat16 of src[i]; SAE_ERANGE (naming what[row][col], cols per row) if one is too
 * large or not finite, checked before dst is written, so it is then untouched. */
int sae__bf16_narrow(const float *src, uint16_t *dst, size_t n, size_t cols, const char *what);
void sae__bf16_widen(const uint16_t *src, float *dst, size_t n);
/* y[0..width) += a * W_dec[feature][c0 .. c0 + width). */
void sae__dec_row_axpy(const sae_model *m, size_t feature, size_t c0, size_t width, float a,
                       float *y);
/* y[0..d_in) += sum over j < count of val[j] * W_dec[idx[j]]. */
void sae__dec_rows_add(const sae_model *m, const uint32_t *idx, const float *val, size_t count,
                       float *y);
/* dst[0..d_in) = W_dec[feature]. */
void sae__dec_row(const sae_model *m, size_t feature, float *dst);
/* ||W_dec[feature]||. */
float sae__dec_row_norm(const sae_model *m, size_t feature);
/* out[i] = W_dec[i] . v for every feature i (v has d_in entries). */
void sae__dec_dots(const sae_model *m, const float *v, float *out);
/* W_enc[row][feature]. */
float sae__enc_at(const sae_model *m, size_t row, size_t feature);
/* C = A @ W + beta * C, W = W_enc ([n][d_in] @ [d_in][d_sae]) or W_dec ([n][d_sae] @
 * [d_sae][d_in]): BLAS for float weights; for bfloat16 a widening kernel (a few tokens) or SGEMM
 * on widened column panels. Errors: SAE_ENOMEM (the panel), C then unspecified. */
int sae__weights_product(const sae_model *m, sae_tensor t, const float *A, size_t n, float *C,
                         float beta);
/* The panel path with a given panel width, for the tests. */
int sae__bf16_gemm_panels(const sae_model *m, const uint16_t *W, size_t K, size_t N,
                          const float *A, size_t n, float *C, size_t panel_cols);

/* ---- encoding (encode.c, topk.c) ----------------------------------------------------------- */

/* A token's normalization (SAE_PARAM_NORMALIZE): x_n = (x - mu) * a, and an SAE's output is
 * denormalized v * b + mu ({0, 1, 1} without normalization). */
typedef struct {
    float mu, a, b;
} sae__token_norm;
/* The normalization of the token x [d_in] (row names it in messages). Errors: SAE_EINVAL (a
 * CONSTANT_NORM token of norm 0). */
int sae__token_norm_of(const sae_model *m, const float *x, size_t row, sae__token_norm *out);
/* xs [n][d_in] = scale * norm(x) - apply * b_dec, with each token's normalization in norms[t]
 * (norms may be NULL). Errors: as sae__token_norm_of. */
int sae__encoder_input(const sae_model *m, const float *x, size_t n, float *xs,
                       sae__token_norm *norms);
/* raw [n][d_sae] = (scale*norm(x) - apply*b_dec) @ W_enc, one BLAS call; xs [n][d_in] is scratch,
 * unused (may be NULL) when sae__encoder_reads_x; norms [n] as in sae__encoder_input (may be
 * NULL). b_enc is left to the pass over each row that follows (sae__activate_row,
 * sae__select_codes), which adds it as the GEMM would have. Errors: SAE_EINVAL (a zero token
 * under CONSTANT_NORM), SAE_ENOMEM. */
int sae__encoder_product(const sae_model *m, const float *x, size_t n, float *xs, float *raw,
                         sae__token_norm *norms);
/* Whether the encoder reads x as it is (INPUT_SCALE 1, b_dec not applied, no normalization): no
 * xs needed. */
bool sae__encoder_reads_x(const sae_model *m);

typedef struct {
    float value;
    uint32_t index;
} sae__scored;

/* The one definition of each architecture's activation, for one feature: raw is its product
 * (x_s - apply * b_dec) . W_enc[:, i] without the bias, bias is b_enc[i] (gated: b_gate). TopK
 * and GroupMax rectify here (as RELU) and select in sae__select_codes. threshold: JumpReLU's for
 * this feature; theta: BatchTopK's; mag_scale = exp(r_mag[i]) and b_mag: gated. Called with a
 * constant arch, the unused arguments cost nothing. */
static inline float sae__code_of(sae_arch arch, float raw, float bias, float threshold,
                                 float theta, float mag_scale, float b_mag)
{
    const float pre = raw + bias;
    switch (arch) {
    case SAE_ARCH_JUMPRELU: return (pre > threshold && pre > 0.0f) ? pre : 0.0f;
    case SAE_ARCH_BATCHTOPK: return (pre > theta && pre > 0.0f) ? pre : 0.0f;
    case SAE_ARCH_GATED: {
        const float mag = raw * mag_scale + b_mag;
        return (pre > 0.0f && mag > 0.0f) ? mag : 0.0f;
    }
    default: return pre > 0.0f ? pre : 0.0f;
    }
}

/* sae__code_of for feature i of m, whatever its architecture. */
static inline float sae__feature_code(const sae_model *m, size_t i, float raw)
{
    return sae__code_of(m->arch, raw, m->b_enc[i],
                        m->arch == SAE_ARCH_JUMPRELU ? m->threshold[i] : 0.0f,
                        m->batch_threshold, m->arch == SAE_ARCH_GATED ? m->mag_scale[i] : 0.0f,
                        m->arch == SAE_ARCH_GATED ? m->b_mag[i] : 0.0f);
}

/* Whether a feature's code depends on its own encoder column alone (so steering can gather just
 * the plan's columns), or on every feature's (TopK, GroupMax: a selection). */
static inline bool sae__codes_independent(const sae_model *m)
{
    return m->arch != SAE_ARCH_TOPK && m->arch != SAE_ARCH_GROUPMAX;
}

/* Selects the k largest entries of v[0..len) (ties: lower index first) into out[0..k'), k' =
 * min(k, len), sorted largest first. One pass over v, which rejects most entries by blocks of
 * vector compares. Returns k'. */
size_t sae__topk_select(const float *v, size_t len, size_t k, sae__scored *out);

/* One token's codes from its raw encoder product (one row of sae__encoder_product), in place:
 * adds b_enc and applies the activation; TopK keeps the K largest (ties: lower index first) and
 * zeroes the rest, using out as scratch of min(K, d_sae) entries (unused otherwise). */
void sae__activate_row(const sae_model *m, float *row, sae__scored *out);
/* One token's k strongest nonzero codes from its raw encoder product, fused into one pass (the
 * codes are never written out): into out[0..k'), largest first, ties lower index first, every
 * value > 0; returns k'. A TopK caller passes k <= K. */
size_t sae__select_codes(const sae_model *m, const float *raw, size_t k, sae__scored *out);
/* sae__activate_row on n rows across the model's threads. Errors: SAE_ENOMEM (scratch). */
int sae__activate_rows(const sae_model *m, float *raw, size_t n);

/* Tokens per block when a call needs [block][d_sae] scratch: keeps scratch near 64 MiB while
 * leaving GEMMs large enough to run at full speed. */
size_t sae__block_tokens(size_t d_sae, size_t n);

/* x_hat = (b_dec + sum_j val[j] * W_dec[idx[j]]) / scale for one token of count pairs, indices
 * already checked. */
void sae__decode_token(const sae_model *m, const uint32_t *idx, const float *val, size_t count,
                       float *x_hat);
/* x_hat rows from dense codes, (f @ W_dec + b_dec) / scale: a GEMM, or for sparse codes only the
 * rows of W_dec in use, across the model's threads. Errors: SAE_ENOMEM. */
int sae__decode_dense(const sae_model *m, const float *f, size_t n, float *x_hat);

/* From decoded codes (f @ W_dec + b_dec, unscaled) to the model's whole output: a transcoder's
 * skip term x @ W_skip, an SAE's denormalization with each token's statistics. alloc makes
 * scratch for `rows` tokens (nothing when the model needs none); prepare reads the block's raw
 * x before the output (which may alias it) is written, the norms having been filled by
 * sae__encoder_product; apply finishes the output rows. */
typedef struct {
    sae__token_norm *norms; /* [rows] or NULL */
    float *skip;            /* [rows][d_out] or NULL */
} sae__finish;
int sae__finish_alloc(const sae_model *m, size_t rows, sae__finish *fin);
void sae__finish_free(sae__finish *fin);
int sae__finish_prepare(const sae_model *m, const float *x, size_t rows, sae__finish *fin);
void sae__finish_apply(const sae_model *m, const sae__finish *fin, size_t rows, float *out);

/* The widest row a call on m handles: max(d_in, d_sae, d_out). */
static inline size_t sae__model_width(const sae_model *m)
{
    size_t w = m->d_in > m->d_sae ? m->d_in : m->d_sae;
    return w > m->d_out ? w : m->d_out;
}

/* What an SAE's decoder output is divided by: INPUT_SCALE; 1 for a transcoder. */
static inline float sae__output_scale(const sae_model *m)
{
    return m->transcoder ? 1.0f : m->input_scale;
}

/* ---- threads across tokens (parallel.c) ---------------------------------------------------- */

/* The threads a call on m may use: SAE_PARAM_THREADS, with 0 resolved to the cores this process
 * may run on; at least 1. */
size_t sae__model_threads(const sae_model *m);
/* fn(ctx, begin, end, worker) over a part [begin, end) of [0, count); worker < the number of
 * chunks, which sae__parallel_chunks gives (so callers can size per-worker scratch). */
typedef void (*sae__range_fn)(void *ctx, size_t begin, size_t end, size_t worker);
/* Items per chunk worth a thread when each item costs about `work` element operations: enough
 * that a chunk outlasts creating its thread many times over. */
size_t sae__grain(size_t work);
/* How many contiguous chunks sae__parallel_for splits count items into: at most threads, each of
 * at least grain items, at least 1. */
size_t sae__parallel_chunks(size_t threads, size_t count, size_t grain);
/* Runs fn over [0, count) in sae__parallel_chunks(threads, count, grain) chunks, the first on the
 * calling thread, and returns when all are done. Never call it while a BLAS call is running: the
 * two would fight over the cores. fn may call level-1 BLAS (OpenBLAS runs those short vectors on
 * the calling thread). */
void sae__parallel_for(size_t threads, size_t count, size_t grain, sae__range_fn fn, void *ctx);

/* ---- .npy headers (npy.c; shared with the npz reader) -------------------------------------- */

/* Header dicts are short; numpy itself refuses ones over 10 000 bytes by default. */
#define SAE__NPY_MAX_HEADER 65536u

typedef struct {
    sae__dtype dtype;
    size_t ndim;       /* 1 or 2 */
    size_t rows, cols; /* cols = 1 for a 1-D array */
    size_t prefix;     /* bytes of magic, version and length: 10 or 12 */
    size_t dict_len;   /* bytes of the header dict that follows */
    size_t data_bytes; /* rows * cols * dtype size, checked not to overflow */
    bool fortran;      /* fortran_order True: column-major data (only matters for 2-D) */
    bool big_endian;   /* descr '>f4', '>f2', '>f8' */
} sae__npy_header;

/* Converts count values of dtype t in the array's byte order to float (big-endian ones are
 * swapped first), as sae__to_float does for little-endian. */
void sae__npy_to_float(const sae__npy_header *h, unsigned char *src, size_t count, float *dst);
/* A Fortran-ordered rows x cols array read into v (as [cols][rows]) becomes row-major in place;
 * tmp holds rows * cols floats. */
void sae__npy_fortran_to_c(float *v, float *tmp, size_t rows, size_t cols);

/* Reads the fixed prefix in buf[0..avail) (magic, version, dict length) into h->prefix and
 * h->dict_len; avail may be 10 for a version 1.0 file. */
int sae__npy_prefix(const unsigned char *buf, size_t avail, const char *path, sae__npy_header *h);
/* Parses the header dict (NUL-terminated): descr (<f4, <f2, <f8 or their big-endian >f4, >f2,
 * >f8), fortran_order (True or False, as numpy reads both), and a 1- or 2-D shape whose byte
 * size fits in size_t. */
int sae__npy_dict(const char *dict, const char *path, sae__npy_header *h);

/* ---- cfg.json values (json.c) ---------------------------------------------------------------- */

/* Typed lookups of key in a JSON object, for reading the config files of other tools. Each
 * returns SAE_OK and sets *found = false when the key is absent or null (leaving *out alone),
 * and SAE_EFORMAT naming file and key when the value has the wrong type or range. */
int sae__json_size(const struct cJSON *obj, const char *key, const char *path, size_t *out,
                   bool *found);
int sae__json_bool(const struct cJSON *obj, const char *key, const char *path, bool *out,
                   bool *found);
int sae__json_string(const struct cJSON *obj, const char *key, const char *path,
                     const char **out, bool *found);
int sae__json_number(const struct cJSON *obj, const char *key, const char *path, double *out,
                     bool *found);
/* Parses text[0..len) as a JSON object (SAE_EFORMAT naming path otherwise). */
int sae__json_parse_object(const char *text, size_t len, const char *path, struct cJSON **out);

/* ---- published formats (load.c, saelens.c, sparsify.c, npz.c) ------------------------------- */

/* Like sae__model_own_tensor, for a tensor about to be filled whole from a file: the memory is
 * not zeroed, and large tensors are advised onto huge pages. */
int sae__model_own_tensor_uninit(sae_model *m, sae_tensor t);

/* Makes a model of the given shape from tensors of st, named names[t] for each sae_tensor t the
 * shape holds (NULL there: SAE_EFORMAT), each with the model's shape or, when bit t of
 * transpose is set, the transposed shape. *map, when not NULL and holding st's data, is taken
 * over by the model so F32 tensors can be used in place; it is zeroed once taken. */
int sae__model_from_st(const sae__safetensors *st, sae__map *map, const sae__shape *shape,
                       const char *const names[SAE__TENSOR_END], unsigned transpose,
                       const char *format, sae_model **out);

typedef enum {
    SAE__NORM_NONE = 0,
    SAE__NORM_EXPECTED_AVERAGE, /* "expected_average_only_in": one dataset-wide scalar */
    SAE__NORM_CONSTANT_NORM,    /* "constant_norm_rescale" */
    SAE__NORM_LAYER_NORM        /* "layer_norm" */
} sae__norm;

/* A SAELens cfg.json, v6 or the pre-6.0 flat layout, reduced to what the math needs. */
typedef struct {
    size_t d_in, d_sae;
    size_t d_out;             /* transcoders: cfg d_out (TranscoderConfig's default 768); else d_in */
    const char *architecture; /* SAELens' name after pre-6.0 defaulting; static storage */
    sae_arch arch;            /* 0 when the architecture is not one libsae runs */
    bool transcoder, skip;    /* transcoder, jumprelu_transcoder; skip_transcoder */
    size_t k;                 /* topk; 0 when absent */
    bool apply_b_dec;
    sae__norm norm;
    bool rescale_by_decoder_norm; /* topk, batchtopk, matryoshka_batchtopk only (their field) */
    bool finetuning_scaling_factor;
    bool v6;                  /* the 6.x layout (else the flat pre-6.0 one) */
} sae__saelens_cfg;

/* Parses a SAELens cfg.json. Unsupported settings are not errors here: sae__saelens_load
 * reports them, so that a config can be inspected whatever it says. */
int sae__saelens_cfg_parse(const char *text, size_t len, const char *path, sae__saelens_cfg *cfg);
/* Parses activation_scaler.json ({"scaling_factor": s or null}); *s = 0 for null. */
int sae__saelens_scaler_parse(const char *text, size_t len, const char *path, double *s);
/* Makes a model from SAELens weights; cfg NULL means no cfg.json (defaults, architecture from
 * the tensors); scaling_factor > 0 when activation_scaler.json holds one. */
int sae__saelens_load(const sae__safetensors *st, sae__map *map, const sae__saelens_cfg *cfg,
                      double scaling_factor, sae_model **out);

/* An EleutherAI sparsify cfg.json (SparseCoderConfig + d_in). */
typedef struct {
    size_t d_in;         /* 0 when absent */
    size_t k;            /* default 32 */
    size_t num_latents;  /* 0: d_in * expansion_factor */
    size_t expansion_factor;
    bool topk;           /* activation "topk" (else "groupmax": k groups) */
    bool transcode, skip_connection;
} sae__sparsify_cfg;

int sae__sparsify_cfg_parse(const char *text, size_t len, const char *path, sae__sparsify_cfg *cfg);
int sae__sparsify_load(const sae__safetensors *st, sae__map *map, const sae__sparsify_cfg *cfg,
                       sae_model **out);

/* A Gemma Scope params.npz held in data[0..size) (a zip of .npy members, stored or deflated,
 * ZIP64 or not). The data is copied; the caller keeps it. */
int sae__npz_load(const unsigned char *data, size_t size, const char *path, sae_model **out);

/* The safetensors file in data[0..size), interpreted by its content: libsae's own, SAELens or
 * sparsify. cfg_text/scaler_text are the cfg.json and activation_scaler.json found beside it
 * (NULL when absent). map as in sae__model_from_st. */
int sae__load_safetensors(const unsigned char *data, size_t size, sae__map *map, const char *path,
                          const char *cfg_text, size_t cfg_len, const char *cfg_path,
                          const char *scaler_text, size_t scaler_len, const char *scaler_path,
                          sae_model **out);

/* ---- 2026 publishers (gemmascope.c, llamascope.c, circuit_tracer.c) -------------------------- */

/* The small files a publisher writes beside its weights, as found there (text NULL when absent):
 * SAELens's cfg.json and activation_scaler.json, Gemma Scope 2's config.json, Llama Scope's
 * hyperparams.json (beside the weights or, for checkpoints/final.safetensors, one folder up). */
typedef struct {
    const char *text;
    size_t len;
    const char *path;
} sae__side_text;

typedef struct {
    sae__side_text cfg, scaler, config, hyperparams;
    const char *file_name; /* the weights file's own name (no folder), for names that refuse */
} sae__sides;

/* sae__load_safetensors with every side file: libsae, Gemma Scope 2 (w_enc), Llama Scope
 * (encoder.weight with hyperparams.json), circuit-tracer (W_enc [d_sae][d_in] or
 * activation_function.threshold, no cfg.json), sparsify, SAELens. */
int sae__load_safetensors_ex(const unsigned char *data, size_t size, sae__map *map,
                             const char *path, const sae__sides *sides, sae_model **out);

/* Gemma Scope 2 params.safetensors (+ config.json, may be NULL). */
int sae__gemmascope2_load(const sae__safetensors *st, sae__map *map, const sae__sides *sides,
                          sae_model **out);
/* Llama Scope (lm_saes 2024): the checkpoint's safetensors + hyperparams.json. */
int sae__llamascope_load(const sae__safetensors *st, sae__map *map, const sae__side_text *hyper,
                         sae_model **out);
/* Whether st looks like circuit-tracer's per-layer transcoder (see circuit_tracer.c). */
bool sae__circuit_tracer_like(const sae__safetensors *st);
int sae__circuit_tracer_load(const sae__safetensors *st, sae__map *map, sae_model **out);
/* Gives tensor t memory the model owns, holding what it held (before a loader rewrites it). */
int sae__model_own_copy(sae_model *m, sae_tensor t);

/* ---- steering and analysis (steer.c, stats.c) ---------------------------------------------- */

/* Features per gathered block of encoder columns and decoder rows when applying a plan; 0 (the
 * default) sizes blocks to about 8 MiB. Lets tests cover plans that span several blocks. */
void sae__steer_set_block(sae_steer *s, size_t features);
/* The largest value feature has shown (0 if it never fired); feature < d_sae. */
float sae__stats_feature_max(const sae_stats *st, uint32_t feature);

/* ---- training (train.c, adam.c) ------------------------------------------------------------ */

/* One Adam step over a flat array, computed as torch.optim.Adam does (no weight decay):
 * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps),
 * with t = step (1 for the first step). p, g, m and v are separate arrays (restrict). */
typedef struct {
    double lr, beta1, beta2, eps;
    uint64_t step;
} sae__adam;
void sae__adam_update(float *p, const float *g, float *m, float *v, size_t n, const sae__adam *a);
/* Whether sae__adam_update with the same arguments would leave every p, m and v finite, reading
 * only: 0 if so; else 1 (first moment), 2 (second moment) or 3 (the parameter) for the first
 * element i that would not be, with *bad = i. The update computes exactly what this checks. */
int sae__adam_check(const float *p, const float *g, const float *m, const float *v, size_t n,
                    const sae__adam *a, size_t *bad);

/* The per-step buffer handed to the allreduce callback: offsets (in floats) of its sections. The
 * gradient sections are sums over the process's tokens of the per-token loss's gradient, in the
 * model's layouts; fires[i] counts tokens where latent i fired; stats are sums indexed by
 * SAE__STAT_*; sum_dx = sum of (x_s - b_dec), sum_err = sum of (x_hat_s - x_s) [d_out]. A
 * transcoder's sections are those of its normalized parameters and target (train.c): W_dec
 * [d_sae][d_out], b_dec [d_out], then W_skip [d_in][d_out] when it has one (an SAE's W_skip
 * section is empty: n_params = W_skip), and sum_dx, sum_err over c (y - b_dec), c (y_hat - y). */
enum {
    SAE__STAT_TOKENS = 0, /* tokens in the batch */
    SAE__STAT_SSE,        /* sum of squared error, scaled units */
    SAE__STAT_LOSS,       /* sum of per-token main loss (MSE term, plus L1 for ReLU) */
    SAE__STAT_AUX,        /* sum of squared AuxK error, before normalization */
    SAE__STAT_L0,         /* nonzero codes */
    SAE__STAT_XX,         /* sum of ||x_s - b_dec||^2 */
    SAE__STAT_MIN,        /* BatchTopK: smallest kept activation */
    SAE__STAT_MIN_COUNT,  /* BatchTopK: processes that kept any */
    SAE__STAT_COUNT
};
typedef struct {
    size_t W_enc, W_dec, b_enc, b_dec, W_skip, n_params, fires, stats, sum_dx, sum_err, count;
} sae__train_layout;
void sae__train_layout_of(const sae_model *m, sae__train_layout *l);

/* ---- PyTorch .pt / .pth state dicts (torch.c) ------------------------------------------- */

/* Element types of torch storages: the float ones convert as sae__to_float does; the integer ones
 * (buffers such as a TopK `k` or BatchNorm's num_batches_tracked) convert exactly up to 2^24. */
typedef enum {
    SAE__TORCH_F32 = 0, SAE__TORCH_F16, SAE__TORCH_BF16, SAE__TORCH_F64, /* = sae__dtype */
    SAE__TORCH_I64, SAE__TORCH_I32, SAE__TORCH_I16, SAE__TORCH_I8, SAE__TORCH_U8,
    SAE__TORCH_BOOL, SAE__TORCH_DTYPE_COUNT
} sae__torch_dtype;

size_t sae__torch_dtype_size(sae__torch_dtype t);
/* "F32", ..., "I64", "BOOL". */
const char *sae__torch_dtype_name(sae__torch_dtype t);

/* One storage: the archive member "<stem>/data/<key>", holding numel little-endian elements. */
typedef struct {
    char *member;
    sae__torch_dtype dtype;
    size_t numel, nbytes;
    uint64_t index; /* the member's index in the archive */
} sae__torch_storage;

/* One tensor of the state dict: shape[i] elements along dimension i, stride[i] elements apart,
 * starting offset elements into storage (which tensors may share: views). Every element it
 * addresses was checked to lie inside the storage. */
typedef struct {
    const char *name;   /* the key; nested dicts are flattened as "outer.inner" */
    sae__torch_dtype dtype;
    size_t ndim;        /* 0 (a scalar tensor) to 4 */
    size_t shape[4];
    size_t stride[4];   /* in elements; >= 0 */
    size_t offset;      /* storage offset, in elements */
    size_t count;       /* product of shape (1 for ndim 0) */
    size_t storage;     /* index into the dict's storages */
    bool contiguous;    /* row-major with no gaps */
} sae__torch_tensor;

/* A non-tensor value of the state dict: a Python int, float, bool or str. */
typedef enum { SAE__TORCH_INT = 0, SAE__TORCH_FLOAT, SAE__TORCH_BOOLEAN, SAE__TORCH_STR } sae__torch_kind;
typedef struct {
    const char *name;
    sae__torch_kind kind;
    int64_t i;          /* INT, BOOLEAN (0 or 1) */
    double f;           /* FLOAT; also INT and BOOLEAN as a double */
    const char *s;      /* STR: NUL-terminated copy (s_len bytes, which may hold NULs) */
    size_t s_len;
} sae__torch_scalar;

typedef struct sae__torch_dict {
    const char *path;             /* for messages */
    char *stem;                   /* the archive's folder, "archive" or the saved file's stem */
    sae__torch_tensor *tensors;   /* in the order of the pickle */
    size_t n_tensors;
    sae__torch_scalar *scalars;
    size_t n_scalars;
    sae__torch_storage *storages;
    size_t n_storages;
    struct zip *za;               /* open on data[0..size), which must outlive the dict */
    size_t file_size;
    const void **sorted;          /* private: entries sorted by name, for the lookups */
    size_t n_sorted;
} sae__torch_dict;

/* Reads the torch.save zip archive in data[0..size) (which must stay valid until
 * sae__torch_close): finds <stem>/data.pkl, runs it through a restricted unpickler that builds
 * only dicts, lists, tuples, numbers, strings and tensors (globals collections.OrderedDict,
 * torch._utils._rebuild_tensor_v2 / _rebuild_parameter and the torch.*Storage classes; anything
 * else is refused naming it, and nothing is ever called), and checks every tensor against its
 * storage member. The pickle's result must be a dict; nested dicts are flattened with dotted
 * names (at most SAE__TORCH_MAX_DEPTH levels); values other than tensors, ints, floats, bools,
 * strings and dicts (None, lists, tuples, bytes) are skipped, as are keys that are neither str
 * nor int. Storage bytes are not read here: sae__torch_tensor_to_float reads them.
 * Errors: SAE_EFORMAT (malformed, truncated, inconsistent), SAE_EUNSUPPORTED (a global or opcode
 * outside the whitelist, a legacy pre-1.6 file, big-endian, more than 4 dimensions, ...),
 * SAE_ENOMEM. On failure *out is NULL and nothing needs releasing. */
#define SAE__TORCH_MAX_DEPTH 16
int sae__torch_open(const unsigned char *data, size_t size, const char *path,
                    sae__torch_dict **out);
void sae__torch_close(sae__torch_dict *d);
/* The tensor or the scalar called name, or NULL. */
const sae__torch_tensor *sae__torch_find(const sae__torch_dict *d, const char *name);
const sae__torch_scalar *sae__torch_find_scalar(const sae__torch_dict *d, const char *name);
/* dst[0..t->count) = the tensor's elements in row-major order, as float (a strided view is
 * gathered). Reads (and for a whole member, CRC-checks) the storage member. Errors:
 * SAE_EFORMAT (the member cannot be read), SAE_ENOMEM. */
int sae__torch_tensor_to_float(const sae__torch_dict *d, const sae__torch_tensor *t, float *dst);
/* The number called name: an int, float or bool value, or a tensor of one element. Errors:
 * SAE_EFORMAT naming it when there is no such entry or it is not a number. */
int sae__torch_number(const sae__torch_dict *d, const char *name, double *out);

/* ---- dictionaries published as PyTorch state dicts (torchsae.c) ---------------------------- */

/* Whether the zip archive in data[0..size) is a torch.save file (a member <stem>/data.pkl)
 * rather than an npz. Reads only the central directory. */
bool sae__torchsae_detect(const unsigned char *data, size_t size);
/* The torch.save file in data[0..size) as a dictionary_learning ae.pt (its config.json, the
 * trainer config, in cfg_text when one is beside it), an OpenAI sparse_autoencoder state dict or
 * a Goodfire release (the R1 SAEs' k from config.json's "k" or from the release folder); the
 * layout is told by the keys, and any entry the layout does not have is refused. docs/formats.md
 * lists the fields. The data is copied; the caller keeps it. Errors: SAE_EFORMAT (not one of
 * these, naming the first entries; shapes; a k that cannot be known), SAE_EUNSUPPORTED (a
 * setting outside libsae's math), SAE_ENOMEM. */
int sae__torchsae_load(const unsigned char *data, size_t size, const char *path,
                       const char *cfg_text, size_t cfg_len, const char *cfg_path,
                       sae_model **out);

#endif /* SAE_INTERNAL_H */
