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

/* The instruction sets sae__to_float can widen with, chosen once per process (the best this CPU
 * runs; SAE_DTYPE_ISA=none or avx2 caps it, for tests and comparisons). Every path gives the
 * scalar path's bits exactly. Exposed so that tests can run each path the CPU has. */
typedef enum {
    SAE__WIDEN_SCALAR = 0,
    SAE__WIDEN_AVX2,   /* AVX2 + F16C */
    SAE__WIDEN_AVX512, /* AVX512F */
    SAE__WIDEN_COUNT
} sae__widen_path;

const char *sae__widen_path_name(sae__widen_path p);
/* Whether this build has path p and this CPU (and its OS) can run it. */
bool sae__widen_supported(sae__widen_path p);
/* The path sae__to_float takes in this process. */
sae__widen_path sae__widen_chosen(void);
/* sae__to_float on path p, which must be supported. */
void sae__to_float_on(sae__widen_path p, sae__dtype t, const unsigned char *src, size_t count,
                      float *dst);
void sae__to_float_scalar(sae__dtype t, const unsigned char *src, size_t count, float *dst);

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SAE__WIDEN_X86 1
/* dtype_x86.c: the vector loops, each compiled for its instruction set alone (one binary for
 * every x86-64 CPU); the last few values of a call go through sae__to_float_scalar. */
void sae__to_float_avx2(sae__dtype t, const unsigned char *src, size_t count, float *dst);
void sae__to_float_avx512(sae__dtype t, const unsigned char *src, size_t count, float *dst);
#endif

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
    struct sae__bf16_packed *W_enc16p, *W_dec16p; /* the same in oneDNN's layout, or NULL
                                                   * (sae__bf16_repack) */
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
 * [d_sae][d_in]): BLAS for float weights; for bfloat16 a widening kernel (a few tokens), oneDNN
 * on the CPU's bfloat16 matrix instructions (A rounded to bfloat16: sae_model_bf16_path), or SGEMM
 * on widened column panels. Errors: SAE_ENOMEM (the panel), C then unspecified. */
int sae__weights_product(const sae_model *m, sae_tensor t, const float *A, size_t n, float *C,
                         float beta);
/* The bfloat16 matrix instructions this process's products use (SAE_BF16_PATH_AMX,
 * SAE_BF16_PATH_AVX512_BF16), or SAE_BF16_PATH_WIDEN without them or without oneDNN; decided
 * once per process (bf16_dnnl.c). */
sae_bf16_path sae__bf16_isa(void);
/* C [n][N] = A [n][K] (rounded to bfloat16) @ W [K][N] (bfloat16) + beta * C, accumulated in
 * float32, by oneDNN on `threads` threads. Errors: SAE_EUNSUPPORTED (no such instructions, or
 * oneDNN refused; C untouched), SAE_ENOMEM. */
int sae__bf16_dnnl_product(const uint16_t *W, const struct sae__bf16_packed *P, size_t K,
                           size_t N, const float *A, size_t n, float *C, float beta,
                           size_t threads);
/* W [K][N] (bfloat16, row-major) copied into the blocked layout oneDNN's matmul reads its weights
 * in (AMX and AVX512-BF16 want pairs of rows interleaved, in tiles), which spares every product
 * that reordering: NULL on the widening path, or if it fails (no error is set: the products then
 * take W as it is). sae__bf16_dnnl_product uses P in place of W when P is the layout it wants. */
struct sae__bf16_packed *sae__bf16_pack(const uint16_t *W, size_t K, size_t N, size_t threads);
void sae__bf16_packed_free(struct sae__bf16_packed *P);
/* C [M][N] (row stride ldc) = alpha * op(A) @ op(B) + beta * C by oneDNN on `threads` threads,
 * accumulated in float32: A is [M][K] ([K][M] if ta) and B [K][N] ([N][K] if tb), both bfloat16
 * and contiguous (mixed-precision training, train_bf16.c). Errors: SAE_EUNSUPPORTED, SAE_ENOMEM;
 * C is then unspecified. */
int sae__bf16_dnnl_gemm(bool ta, bool tb, size_t M, size_t N, size_t K, float alpha,
                        const uint16_t *A, const uint16_t *B, float beta, float *C, size_t ldc,
                        size_t threads);
/* C [n][N] = A [n][K] @ W [K][N] + beta * C in float32 by oneDNN's matmul, or by its sgemm, on
 * `threads` threads (sgemm_dnnl.c chooses which). Errors: SAE_EUNSUPPORTED (no oneDNN),
 * SAE_ENOMEM; C is then untouched (oneDNN checks its arguments and takes its memory before it
 * writes). */
int sae__f32_dnnl_matmul(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                         float *C, size_t threads);
int sae__f32_dnnl_sgemm(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                        float *C, size_t threads);
/* Remakes (t = SAE_W_ENC or SAE_W_DEC) or frees (the model holds float weights) m's packed copy
 * of W_enc16 or W_dec16: every write of those calls it. */
void sae__bf16_repack(sae_model *m, sae_tensor t);
/* Whether C = A @ W of n tokens ([n][K] @ [K][N], float32) goes to oneDNN rather than BLAS:
 * measured on AVX-512 for a few tokens over large weights (sgemm_dnnl.c); SAE_SGEMM=blas or
 * onednn overrides. Always false without oneDNN. */
bool sae__sgemm_dnnl_wanted(size_t n, size_t K, size_t N);
/* C [n][N] = A [n][K] @ W [K][N] + beta * C in float32 by oneDNN on `threads` threads (its
 * matmul, or its sgemm for a sum at least twice the output width): true, or
 * false if oneDNN refused (without it, or out of memory: it checks its arguments and takes its
 * memory before it writes C, so C is then untouched and BLAS can take the product). */
bool sae__sgemm_dnnl(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                     float *C, size_t threads);
/* y[0..n) += sum of a[r] * rows[r][0..n) over r < 4 (bfloat16 rows), or a * row[0..n), with the
 * row kernels of path p (supported by this CPU), which every bfloat16 product of a few tokens and
 * every sparse decode of bfloat16 weights use on the path sae__widen_chosen names: for the tests,
 * which compare the paths' bits. */
void sae__bf16_add_rows_on(sae__widen_path p, size_t n, const float a[4], const uint16_t *rows[4],
                           float *y);
void sae__bf16_add_row_on(sae__widen_path p, size_t n, float a, const uint16_t *row, float *y);
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

/* ---- steering and analysis (steer.c, stats.c) ---------------------------------------------- */

/* Features per gathered block of encoder columns and decoder rows when applying a plan; 0 (the
 * default) sizes blocks to about 8 MiB. Lets tests cover plans that span several blocks. */
void sae__steer_set_block(sae_steer *s, size_t features);
/* The largest value feature has shown (0 if it never fired); feature < d_sae. */
float sae__stats_feature_max(const sae_stats *st, uint32_t feature);

#endif /* SAE_INTERNAL_H */
