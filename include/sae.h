/*
 * libsae: sparse autoencoders for language-model activations, in C.
 *
 * A sparse autoencoder (SAE) maps an activation vector x (one token's residual stream, d_in
 * floats) to a much wider, mostly-zero code f (d_sae floats) whose nonzero entries are
 * interpretable "features", and maps f back to an approximation of x. libsae loads the SAEs
 * that SAELens, sparsify and Gemma Scope publish, encodes and decodes batches of activations,
 * steers a model by clamping features (keeping the SAE's error term), gathers feature
 * statistics, and trains new SAEs.
 *
 * A complete program:
 *
 *     sae_model *m;
 *     if (sae_model_load(&m, "gemma-scope/params.npz") != SAE_OK) {
 *         fprintf(stderr, "%s\n", sae_last_error());
 *         return 1;
 *     }
 *     uint32_t idx[8 * n], count[n];
 *     float val[8 * n];
 *     sae_encode_sparse(m, x, n, 8, idx, val, count);   // each token's 8 strongest features
 *     sae_steer *s;
 *     sae_steer_new(&s, m);
 *     sae_steer_clamp(s, 1234, 40.0f);                   // force feature 1234 to 40
 *     sae_steer_apply(s, x, n);                          // x is now the steered activations
 *     sae_steer_free(s);
 *     sae_model_free(m);
 *
 * Conventions used everywhere below:
 * - Activations are float, row-major, contiguous: x is [n][d_in], codes f are [n][d_sae].
 * - Functions that can fail return SAE_OK (0) or a negative SAE_E* code, and leave a message for
 *   sae_last_error(). Output buffers are unspecified after a failure.
 * - Functions taking a const handle may be called from many threads at once on the same handle.
 *   A non-const handle must not be used by two threads at once. The library has no global
 *   mutable state besides the per-thread error message (cJSON's one process-wide error slot is
 *   behind a lock, so loads on many threads at once are safe).
 * - Every *_new / *_load has a *_free, and every *_free accepts NULL.
 */
#ifndef SAE_H
#define SAE_H

#include <stddef.h>
#include <stdint.h>

/* libsae is a POSIX library (it maps files, uses pthreads): GCC and clang on Linux and the BSDs. */
#if defined(SAE_STATIC_DEFINE)
#define SAE_API
#elif defined(__GNUC__)
#define SAE_API __attribute__((visibility("default")))
#else
#define SAE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------
 * Version
 * ------------------------------------------------------------------------------------------- */

#define SAE_VERSION_MAJOR 0
#define SAE_VERSION_MINOR 1
#define SAE_VERSION_PATCH 0
#define SAE_VERSION_NUMBER (SAE_VERSION_MAJOR * 10000 + SAE_VERSION_MINOR * 100 + SAE_VERSION_PATCH)

/* The version of the library actually linked, as SAE_VERSION_NUMBER and as "0.1.0". Compare with
 * the macros to catch a header/library mismatch. Thread safe; never fails. */
SAE_API unsigned sae_version_number(void);
SAE_API const char *sae_version_string(void);

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */

typedef enum {
    SAE_OK = 0,
    SAE_EINVAL = -1,       /* an argument is wrong: NULL, zero or mismatched size, NaN, ... */
    SAE_ENOMEM = -2,       /* an allocation failed, or a size would overflow */
    SAE_EIO = -3,          /* the operating system refused a read, write, rename or map */
    SAE_EFORMAT = -4,      /* a file is malformed, truncated, inconsistent or oversized */
    SAE_EUNSUPPORTED = -5, /* valid, but not something libsae does (an architecture, a dtype) */
    SAE_ERANGE = -6,       /* an index or value is outside its allowed range */
    SAE_ESTATE = -7,       /* the call does not fit the object's state (e.g. step before init) */
    SAE_ECALLBACK = -8     /* a caller-supplied callback reported failure */
} sae_error;

/* A short constant name for a code ("invalid argument"). Unknown codes give "unknown error".
 * Thread safe; never returns NULL. */
SAE_API const char *sae_strerror(int code);

/* The message left by the most recent failing call on the calling thread: what went wrong and
 * where (file, tensor, shape, offset, argument). Successful calls leave it unchanged. The string
 * belongs to the library and stays valid until the next libsae call on this thread. Never NULL
 * (empty before any failure). */
SAE_API const char *sae_last_error(void);

/* ---------------------------------------------------------------------------------------------
 * The model
 *
 * A model is an SAE, which reconstructs its input (d_out = d_in), or a transcoder, which reads
 * activations x [d_in] at one place of a network (an MLP's input) and predicts y [d_out] at
 * another (that MLP's output), optionally with an affine skip connection.
 *
 * Tensors, all float, row-major:
 *   W_enc [d_in][d_sae]     b_enc [d_sae]     (gated: b_enc is the gate bias)
 *   W_dec [d_sae][d_out]    b_dec [d_out]     (row i of W_dec is feature i's direction)
 *   threshold [d_sae]       (JumpReLU only)
 *   r_mag, b_mag [d_sae]    (gated only)
 *   W_skip [d_in][d_out]    (a transcoder with a skip connection only)
 *
 * The math, for each token x (to float rounding):
 *   x_n = norm(x)                                        SAE_PARAM_NORMALIZE (default: x_n = x)
 *   x_s = INPUT_SCALE * x_n
 *   pre = (x_s - APPLY_B_DEC_TO_INPUT * b_dec) @ W_enc + b_enc
 *   ReLU:      f = max(pre, 0)
 *   JumpReLU:  f = max(pre, 0) * (pre > threshold)      per feature
 *   BatchTopK: f = pre * (pre > THRESHOLD), pre > 0      one global threshold (inference form)
 *   TopK:      f = max(pre, 0) on the K largest entries of pre (ties: lower index first), else 0
 *   Gated:     f = (pre > 0) * max((x_s - APPLY_B_DEC_TO_INPUT * b_dec) @ (W_enc * exp(r_mag))
 *                                  + b_mag, 0)           (exp(r_mag) scales column i of W_enc)
 *   GroupMax:  f = max(pre, 0), then of each of K groups of d_sae / K consecutive features only
 *              the largest stays (ties: lower index), the rest are 0 (sparsify's "groupmax")
 *   SAE:        x_hat = denorm((f @ W_dec + b_dec) / INPUT_SCALE),   error = x - x_hat
 *   transcoder: y_hat = f @ W_dec + b_dec + x @ W_skip             (raw x; no denormalization)
 * ------------------------------------------------------------------------------------------- */

typedef struct sae_model sae_model;

typedef enum {
    SAE_ARCH_RELU = 1,
    SAE_ARCH_TOPK = 2,
    SAE_ARCH_BATCHTOPK = 3,
    SAE_ARCH_JUMPRELU = 4,
    SAE_ARCH_GATED = 5,   /* gate and magnitude paths sharing W_enc (b_enc is the gate bias) */
    SAE_ARCH_GROUPMAX = 6 /* the largest of each of K groups of consecutive features */
} sae_arch;

typedef enum {
    SAE_W_ENC = 1,
    SAE_W_DEC = 2,
    SAE_B_ENC = 3,
    SAE_B_DEC = 4,
    SAE_THRESHOLD = 5, /* JumpReLU only */
    SAE_W_SKIP = 6,    /* [d_in][d_out]: a transcoder's affine skip connection, when it has one */
    SAE_R_MAG = 7,     /* [d_sae]: gated only, log-scale of each magnitude column */
    SAE_B_MAG = 8      /* [d_sae]: gated only, magnitude bias */
} sae_tensor;

typedef enum {
    SAE_PARAM_K = 1,                    /* TopK and BatchTopK: features kept per token; default 32 */
    SAE_PARAM_APPLY_B_DEC_TO_INPUT = 2, /* 0 or 1; default 1 */
    SAE_PARAM_INPUT_SCALE = 3,          /* finite, > 0; default 1 */
    SAE_PARAM_THRESHOLD = 4,            /* BatchTopK's single global threshold; default 0 */
    SAE_PARAM_THREADS = 5,              /* threads per call, 0 = all cores; default 0 (below) */
    SAE_PARAM_BF16_WEIGHTS = 6,         /* 0 or 1: W_enc, W_dec held as bfloat16; default 0 */
    SAE_PARAM_NORMALIZE = 7             /* an sae_normalize: per-token input normalization */
} sae_model_param;

/* SAE_PARAM_NORMALIZE: how each token is normalized before encoding (SAELens's
 * normalize_activations), computed per token from the token itself:
 *   NONE:          x_n = x
 *   LAYER_NORM:    mu = mean(x), sigma = sqrt(sum((x - mu)^2) / (d_in - 1)) (unbiased, as torch),
 *                  x_n = (x - mu) / (sigma + 1e-5); an SAE's output is denormalized v*sigma + mu
 *   CONSTANT_NORM: c = sqrt(d_in) / ||x||, x_n = c * x; an SAE's output is v / c (a token with
 *                  ||x|| = 0 is refused with SAE_EINVAL naming its row)
 * sae_encode and friends encode x_n. sae_decode and sae_decode_sparse of such an SAE return the
 * normalized-space (f @ W_dec + b_dec) / INPUT_SCALE (the token's statistics are not known from
 * codes alone, as SAELens's hook_sae_recons); sae_reconstruct and steering denormalize with each
 * token's own statistics. A transcoder's output is never denormalized. LAYER_NORM needs d_in >= 2. */
typedef enum {
    SAE_NORMALIZE_NONE = 0,
    SAE_NORMALIZE_LAYER_NORM = 1,
    SAE_NORMALIZE_CONSTANT_NORM = 2
} sae_normalize;

/* SAE_PARAM_THREADS: how many threads one call on the model may use for the work BLAS does not
 * thread itself (top-k selection, the activation pass, sparse decoding, steering). 0 (the default)
 * means every core the process may run on; 1 keeps each call on the calling thread, which is what
 * a program already calling libsae from many threads at once wants. The matrix products run in
 * the BLAS library, threaded as it is configured (e.g. OPENBLAS_NUM_THREADS); libsae's threads
 * never run during them. The exception: a bfloat16 model's products on AMX / AVX512-BF16
 * (sae_model_bf16_path) run in oneDNN on this many OpenMP threads (the calling thread's OpenMP
 * thread count is set for the call and restored). Results do not depend on this setting: each
 * token is computed whole by one thread, in the same order, whatever the thread count (oneDNN's
 * products too: tests/test_bf16.c compares them bit for bit). It is a property of the process, not
 * of the SAE, so sae_model_save does not store it. */

/* SAE_PARAM_BF16_WEIGHTS: 1 rounds W_enc and W_dec to bfloat16 (to nearest, ties to even) and
 * keeps only those: half the memory, and half the bytes a single token's encode or decode reads,
 * where those bytes are the time. Batches run on the CPU's bfloat16 matrix instructions where it
 * has them (AMX, AVX512-BF16: sae_model_bf16_path below); there the model also keeps a second
 * bfloat16 copy of W_enc and W_dec in the blocked layout those instructions read (made when the
 * switch or sae_model_set_tensor writes them), which spares every batched product a reordering
 * of all the weights (2.3x at 64 tokens), so the weights then take as much memory as float ones.
 * Without those instructions the weights are widened for SGEMM
 * on every call, which makes batches slower than float weights (docs/performance.md has the
 * figures). Without those instructions arithmetic stays float32 and only the weights lose
 * precision (8 significant bits: a relative error up to 2^-8 per weight); with them the
 * activations entering a batched product are rounded to bfloat16 as well (sae_model_bf16_path).
 * W_skip, the biases and the other vectors stay float. 0 widens them back to float
 * exactly (the rounding is not undone). Every operation works on either storage;
 * sae_model_get_tensor widens, sae_model_set_tensor rounds, sae_model_save writes W_enc and
 * W_dec as BF16 tensors (the file loads as float weights holding the same values).
 * Training needs float weights: sae_trainer_init and sae_trainer_step return SAE_ESTATE on such a
 * model. Switching allocates the new copy before freeing the old (SAE_ENOMEM leaves the model as
 * it was), and SAE_ERANGE if a weight is beyond bfloat16's range (|w| > 3.39e38). Like every
 * setter, not to be called while another thread uses the model. */

/* The path a bfloat16 model's batched products take (encode, decode, reconstruct, steering: every
 * product with a whole W_enc or W_dec of more than a few tokens), chosen at run time from the CPU:
 *   FLOAT        the model's weights are float (SAE_PARAM_BF16_WEIGHTS = 0): SGEMM.
 *   WIDEN        the weights are widened to float, a panel at a time, for SGEMM: on CPUs without
 *                bfloat16 instructions, or libsae built without oneDNN. Activations stay float.
 *   AVX512_BF16  oneDNN's matmul on AVX512-BF16 dot products.
 *   AMX          oneDNN's matmul on AMX tiles (Intel Sapphire Rapids and later).
 * On the AVX512_BF16 and AMX paths the activations entering the product (the encoder's input
 * x_s = scale * norm(x) - apply * b_dec; the codes, for the decoder) are rounded to bfloat16 too,
 * to nearest even, as torch's x.bfloat16() @ W does; the products accumulate in float32. Each term
 * x_i * w_i is then off by at most 2^-8 of itself (2^-9 per rounding), so a pre-activation is
 * within 2^-8 * sum_i |x_i w_i| (plus float32 accumulation) of the float32 product with the
 * bfloat16 weights, where WIDEN's is within 2^-9 * sum_i |x_i w_i| of the float weights' product:
 * about 1.4 times WIDEN's typical error (docs/performance.md has the measured differences).
 * Results therefore depend on the path (and so on the CPU); on a given path they do not depend
 * on SAE_PARAM_THREADS. A product of one or two tokens (more precisely: tokens x rows of the
 * weights some token uses <= 2 x rows, so also a few tokens of sparse codes) is bound by reading
 * the weights, and on every path widens them in registers, the activations staying float. The environment variable SAE_BF16_ISA, read once per process,
 * caps the choice: "none" (WIDEN), "avx512_bf16" (no AMX: this caps oneDNN for the whole process,
 * and only if it has not run yet) or "amx" (the default: the best the CPU has). */
typedef enum {
    SAE_BF16_PATH_FLOAT = 0,
    SAE_BF16_PATH_WIDEN = 1,
    SAE_BF16_PATH_AVX512_BF16 = 2,
    SAE_BF16_PATH_AMX = 3
} sae_bf16_path;

/* The path m's batched weight products take (above); SAE_BF16_PATH_FLOAT for a NULL model. */
SAE_API sae_bf16_path sae_model_bf16_path(const sae_model *m);
/* "float", "widen", "avx512_bf16" or "amx"; NULL for a value not in sae_bf16_path. */
SAE_API const char *sae_bf16_path_name(sae_bf16_path path);

/* Creates a model with every tensor zero and default parameters. d_in and d_sae must be at least
 * 1 and the weights must fit in memory (SAE_ENOMEM otherwise). On success *out owns the model;
 * release it with sae_model_free. Errors: SAE_EINVAL (NULL out, zero size, unknown arch),
 * SAE_ENOMEM. */
SAE_API int sae_model_new(sae_model **out, sae_arch arch, size_t d_in, size_t d_sae);

/* Loads a model from path, detecting the format from content and folder layout:
 *   - libsae's own file (what sae_model_save writes: safetensors with __metadata__);
 *   - a SAELens folder (cfg.json + sae_weights.safetensors), or that weights file with its
 *     cfg.json beside it: every architecture SAELens saves (standard, topk, batchtopk,
 *     matryoshka_batchtopk, jumprelu, gated, transcoder, skip_transcoder, jumprelu_transcoder),
 *     its normalizations, and rescale_acts_by_decoder_norm folded as SAELens folds it;
 *   - a sparsify folder (cfg.json + sae.safetensors): topk and groupmax, transcode,
 *     skip_connection;
 *   - a Gemma Scope params.npz (JumpReLU), or a folder holding one;
 *   - Gemma Scope 2 (params.safetensors + config.json: SAEs, transcoders, skip transcoders),
 *     Llama Scope (hyperparams.json + checkpoints/final.safetensors), circuit-tracer's per-layer
 *     transcoder files;
 *   - PyTorch state dicts (.pt / .pth zip files, read by a restricted unpickler that executes
 *     nothing): dictionary_learning's ae.pt (+ config.json), OpenAI's sparse_autoencoder,
 *     Goodfire's releases.
 * Tensors stored as F32, F16, BF16 or F64 are converted to float as numpy's astype(float32).
 * F32 tensors of safetensors files are memory-mapped (copy-on-write) rather than read (see
 * sae_model_load_with). cfg.json and activation_scaler.json are read from beside a weights
 * file. docs/formats.md lists every field read. On success *out owns the model.
 * Errors: SAE_EINVAL (NULL argument), SAE_EIO (cannot open or map), SAE_EFORMAT (malformed,
 * truncated, inconsistent or oversized, a SAELens file without its cfg.json; the message names
 * file, tensor or key and what was expected), SAE_EUNSUPPORTED (valid but outside libsae's math,
 * e.g. sparsify's signed coders, a tensor the configured class has no use for: never loaded
 * with a term dropped; the message names the setting), SAE_ENOMEM. Only regular files are
 * opened: a FIFO, device or socket is refused with SAE_EIO at once, never waited on. Every
 * loaded weight must be finite. Thread safe: many threads may load at once. Same as
 * sae_model_load_with(out, path, 0). */
SAE_API int sae_model_load(sae_model **out, const char *path);

/* Flags for sae_model_load_with, OR'ed together. */
typedef enum {
    SAE_LOAD_COPY = 1 /* read every tensor into the model's own memory; never map the file */
} sae_load_flag;

/* sae_model_load with flags. Without SAE_LOAD_COPY, F32 tensors may stay memory-mapped: loading
 * is a header parse and pages come in on first use, but a file truncated or rewritten by another
 * process while the model lives can change its weights or kill the process with SIGBUS on the
 * next encode, as with any mapping (llama.cpp's --no-mmap exists for the same reason). With
 * SAE_LOAD_COPY the file is read whole with read() into memory the model owns (the same memory
 * a mapping would touch once every page is used; loading takes one pass over the file), after
 * which the file may change or vanish without effect; a file that shrinks during the read is
 * SAE_EFORMAT. Errors: as sae_model_load, and SAE_EINVAL for an unknown flag. Thread safe. */
SAE_API int sae_model_load_with(sae_model **out, const char *path, unsigned flags);

/* Writes the model as libsae's own safetensors file: every tensor the model holds (W_enc, W_dec,
 * b_enc, b_dec; threshold, r_mag, b_mag, W_skip where it has them) as F32 (W_enc and W_dec as
 * BF16 while SAE_PARAM_BF16_WEIGHTS is 1), and __metadata__ with the architecture, sizes and
 * every parameter (docs/formats.md lists the keys). Atomic: the data goes to a temporary file in the same folder, which is flushed to
 * disk and renamed over path; on any failure path is untouched and the temporary is removed.
 * path must be absent or a regular file: a directory, FIFO, device, socket or symbolic link is
 * refused (SAE_EINVAL) and left alone. A file that is replaced keeps its permissions; a new one
 * gets 0666 less the umask. No process-wide state is touched (the umask is never changed), so
 * saves may run on many threads at once. Errors: SAE_EINVAL, SAE_EIO (the message names the
 * file and the system error), SAE_ENOMEM. */
SAE_API int sae_model_save(const sae_model *m, const char *path);

/* Releases the model and everything it owns. NULL is a no-op. Objects made from the model
 * (steering plans, trainers) must be freed first. */
SAE_API void sae_model_free(sae_model *m);

/* Creates a transcoder with every tensor zero: d_in inputs, d_sae features, d_out outputs, and
 * with skip = 1 a skip connection W_skip [d_in][d_out] (zeroed). APPLY_B_DEC_TO_INPUT starts at
 * 0 (b_dec is the output bias; it may be set to 1 only when d_out = d_in). Errors: as
 * sae_model_new, and SAE_EINVAL for d_out = 0 or skip other than 0 or 1. */
SAE_API int sae_model_new_transcoder(sae_model **out, sae_arch arch, size_t d_in, size_t d_sae,
                                     size_t d_out, int skip);

/* Copies ||W_dec[i]|| for every feature into norms [d_sae]: the norms the model keeps current
 * for steering and neighbours (what SAELens calls the decoder norms). Errors: SAE_EINVAL (NULL).
 * Thread safe. */
SAE_API int sae_model_decoder_norms(const sae_model *m, float *norms);

/* Sizes and architecture. Return 0 for a NULL model. d_out is d_in for an SAE. */
SAE_API size_t sae_model_d_in(const sae_model *m);
SAE_API size_t sae_model_d_sae(const sae_model *m);
SAE_API size_t sae_model_d_out(const sae_model *m);
SAE_API sae_arch sae_model_arch(const sae_model *m);
/* 1 for a transcoder (made by sae_model_new_transcoder or loaded as one), 0 for an SAE or NULL. */
SAE_API int sae_model_is_transcoder(const sae_model *m);
/* 1 if the model holds tensor t (threshold: JumpReLU; r_mag, b_mag: gated; W_skip: a transcoder
 * with a skip connection; the other four: always), 0 if not or for NULL / an unknown t. */
SAE_API int sae_model_has_tensor(const sae_model *m, sae_tensor t);

/* Copies a whole tensor into the model (set) or out of it (get); sizes as in the table above.
 * set refuses NaN and infinity (SAE_EINVAL, naming the first bad element). Errors: SAE_EINVAL
 * (NULL, unknown tensor), SAE_EUNSUPPORTED (a tensor the model does not hold: see
 * sae_model_has_tensor). */
SAE_API int sae_model_set_tensor(sae_model *m, sae_tensor t, const float *src);
SAE_API int sae_model_get_tensor(const sae_model *m, sae_tensor t, float *dst);

/* Sets or reads a parameter. K must be a whole number >= 1; APPLY_B_DEC_TO_INPUT 0 or 1;
 * INPUT_SCALE and THRESHOLD are stored as float and checked after that conversion: INPUT_SCALE
 * a normal float > 0 (1e-46 is > 0 as a double but 0 as a float, and is refused), THRESHOLD 0 or
 * a normal float of either sign; THREADS a whole number from 0 to 1024. Every reader of a file
 * sets parameters through this function, so a file cannot hold what it refuses.
 * Errors: SAE_EINVAL (NULL, unknown parameter, bad value), SAE_EUNSUPPORTED (K on ReLU/JumpReLU,
 * THRESHOLD on anything but BatchTopK). */
SAE_API int sae_model_set_param(sae_model *m, sae_model_param p, double value);
SAE_API int sae_model_get_param(const sae_model *m, sae_model_param p, double *value);

/* The range sae_model_set_param accepts for p, as ZSTD_cParam_getBounds gives it: *lo and *hi
 * inclusive (K: 1 to 4294967295; INPUT_SCALE: FLT_MIN to FLT_MAX; THRESHOLD: -FLT_MAX to FLT_MAX;
 * flags 0 to 1; THREADS 0 to 1024). Whole-number parameters also need a whole value.
 * Errors: SAE_EINVAL (NULL, unknown parameter). Thread safe. */
SAE_API int sae_model_param_bounds(sae_model_param p, double *lo, double *hi);

/* Names: "relu", "topk", "batchtopk", "jumprelu", "gated", "groupmax"; NULL for an unknown value. */
SAE_API const char *sae_arch_name(sae_arch arch);
/* Parses those names (and SAELens' "standard" for ReLU). Errors: SAE_EINVAL. */
SAE_API int sae_arch_from_name(const char *name, sae_arch *arch);

/* Where a loaded model came from: "libsae", "saelens", "sparsify", "gemma-scope",
 * "gemma-scope-2", "llama-scope", "llama-scope-r1" (lm_saes 2025), "circuit-tracer",
 * "<publisher>/<class>" for a PyTorch state dict (e.g. "dictionary_learning/BatchTopKSAE",
 * "openai/...", "goodfire/..."), or "new" for sae_model_new and sae_model_new_transcoder; and
 * the dtype its weights were stored in ("F32", "F16", "BF16", "F64"). Constant strings; NULL for
 * a NULL model. */
SAE_API const char *sae_model_format(const sae_model *m);
SAE_API const char *sae_model_dtype(const sae_model *m);

/* ---------------------------------------------------------------------------------------------
 * Encoding and decoding
 *
 * n may be 0 (nothing is written). Inputs must be finite: a NaN or infinity in x or f is
 * SAE_EINVAL naming the token and element. A batch is one SGEMM; a single token one SGEMV.
 * Scratch memory is allocated per call, never per token.
 * ------------------------------------------------------------------------------------------- */

/* Dense codes: f [n][d_sae] from x [n][d_in]. Errors: SAE_EINVAL, SAE_ENOMEM. */
SAE_API int sae_encode(const sae_model *m, const float *x, size_t n, float *f);

/* Sparse codes. Token t owns slots [t*k, t*k+k) of idx and val: its nonzero features, largest
 * value first (ties: lower index first), at most k of them; count[t] says how many. Unused slots
 * are set to index 0 and value 0. k >= 1. Errors: SAE_EINVAL, SAE_ENOMEM. */
SAE_API int sae_encode_sparse(const sae_model *m, const float *x, size_t n, size_t k,
                              uint32_t *idx, float *val, uint32_t *count);

/* x_hat [n][d_out] from dense codes f [n][d_sae]: (f @ W_dec + b_dec) / INPUT_SCALE for an SAE
 * (in normalized space when SAE_PARAM_NORMALIZE is set), f @ W_dec + b_dec for a transcoder (the
 * skip term needs x: see sae_reconstruct). Errors: SAE_EINVAL, SAE_ENOMEM. */
SAE_API int sae_decode(const sae_model *m, const float *f, size_t n, float *x_hat);

/* x_hat from sparse codes laid out as sae_encode_sparse writes them. Reads only the rows of W_dec
 * it needs. Errors: SAE_EINVAL (count[t] > k, non-finite value), SAE_ERANGE (an index >= d_sae). */
SAE_API int sae_decode_sparse(const sae_model *m, const uint32_t *idx, const float *val,
                              const uint32_t *count, size_t k, size_t n, float *x_hat);

/* The model's whole output for x [n][d_in] into x_hat [n][d_out]: an SAE's x_hat (denormalized
 * with each token's statistics), a transcoder's y_hat including the skip term. x_hat may equal x
 * (in place) when d_out = d_in. Errors: SAE_EINVAL (NULL, non-finite x, a CONSTANT_NORM token of
 * norm 0), SAE_ENOMEM. */
SAE_API int sae_reconstruct(const sae_model *m, const float *x, size_t n, float *x_hat);

/* ---------------------------------------------------------------------------------------------
 * Activation files (.npy)
 *
 * Activations usually travel as numpy .npy files. These read 1-D or 2-D arrays of float32,
 * float16 or float64 (little-endian, C order) as float, in row ranges, so a file larger than
 * memory can be streamed; and write float32 [rows][cols] files atomically.
 * ------------------------------------------------------------------------------------------- */

typedef struct sae_npy sae_npy;

/* Opens path and checks its header (magic, version, dtype, order, shape against the file size).
 * A 1-D array of length n reads as n rows of 1 column. Errors: SAE_EINVAL, SAE_EIO,
 * SAE_EFORMAT (the message says what the header holds), SAE_EUNSUPPORTED (other dtypes,
 * Fortran order, more than 2 dimensions), SAE_ENOMEM. */
SAE_API int sae_npy_open(sae_npy **out, const char *path);
SAE_API void sae_npy_close(sae_npy *a);
/* Shape; 0 for NULL. */
SAE_API size_t sae_npy_rows(const sae_npy *a);
SAE_API size_t sae_npy_cols(const sae_npy *a);
/* Copies rows [first, first + count) into dst [count][cols] as float. Not thread safe on one
 * handle (it moves the file position). Errors: SAE_EINVAL, SAE_ERANGE (past the last row),
 * SAE_EIO, SAE_EFORMAT (the file shrank). */
SAE_API int sae_npy_read(sae_npy *a, size_t first, size_t count, float *dst);
/* Writes data [rows][cols] as a float32 .npy file, atomically (as sae_model_save).
 * Errors: SAE_EINVAL, SAE_EIO. */
SAE_API int sae_npy_write(const char *path, const float *data, size_t rows, size_t cols);

/* ---------------------------------------------------------------------------------------------
 * Steering (feature clamping)
 *
 * A plan of per-feature operations applied to activations in place:
 *   clamp  f_i := value          scale  f_i := factor * f_i          (both keep the error term)
 *   add    x += coeff * W_dec[i] / INPUT_SCALE                        (independent of x)
 * clamp and scale compute, for each token, x' = x + sum_i (f_i' - f_i(x)) * W_dec[i] / INPUT_SCALE
 * with f(x) from the model's own encoder, so everything the SAE does not reconstruct (its error
 * term) is kept, as in "Scaling Monosemanticity". Clamping to 0 is ablation. A later op on a
 * feature replaces the earlier one.
 * For ReLU, JumpReLU and BatchTopK a feature's value depends only on its own encoder column, so a
 * plan of m features costs O(m * d_in) per token. TopK needs the full encode, because whether a
 * feature survives depends on every other feature's value. A plan of only add ops is a constant
 * vector added without encoding.
 * ------------------------------------------------------------------------------------------- */

typedef struct sae_steer sae_steer;

/* A new empty plan for model m, which must outlive it (the plan reads its weights when applied).
 * Errors: SAE_EINVAL, SAE_ENOMEM. */
SAE_API int sae_steer_new(sae_steer **out, const sae_model *m);
SAE_API void sae_steer_free(sae_steer *s);

/* Adds or replaces the op on one feature. Errors: SAE_EINVAL (NULL, non-finite value),
 * SAE_ERANGE (feature >= d_sae), SAE_ENOMEM. */
SAE_API int sae_steer_clamp(sae_steer *s, uint32_t feature, float value);
SAE_API int sae_steer_scale(sae_steer *s, uint32_t feature, float factor);
SAE_API int sae_steer_add(sae_steer *s, uint32_t feature, float coeff);
/* Removes every op. Errors: SAE_EINVAL. */
SAE_API int sae_steer_clear(sae_steer *s);
/* Applies the plan to x [n][d_in] in place: sae_steer_apply_to(s, x, x, n). Needs d_out = d_in.
 * Errors: SAE_EINVAL (NULL, non-finite x, d_out != d_in), SAE_ENOMEM. */
SAE_API int sae_steer_apply(const sae_steer *s, float *x, size_t n);
/* Reads the features from x [n][d_in] and applies the plan to y [n][d_out] in place:
 * y' = y + sum_i (f_i' - f_i(x)) * D_i, with D_i = W_dec[i] for a transcoder and, for an SAE,
 * W_dec[i] / INPUT_SCALE carried through the token's denormalization (* sigma for LAYER_NORM,
 * / c for CONSTANT_NORM). add ops add coeff * W_dec[i] (transcoder) or coeff * W_dec[i] /
 * INPUT_SCALE (SAE) to every token. This is how a transcoder steers: x is the MLP's input, y the
 * MLP's output about to be written back. x and y may be the same buffer (then d_out = d_in).
 * Errors: SAE_EINVAL (NULL, non-finite x or y, a CONSTANT_NORM token of norm 0), SAE_ENOMEM. */
SAE_API int sae_steer_apply_to(const sae_steer *s, const float *x, float *y, size_t n);

/* The kinds of op a plan holds, as sae_steer_get_op reports them. */
typedef enum { SAE_STEER_CLAMP = 1, SAE_STEER_SCALE = 2, SAE_STEER_ADD = 3 } sae_steer_op;

/* Number of features the plan acts on (one op each). 0 for NULL. */
SAE_API size_t sae_steer_count(const sae_steer *s);
/* The i-th op, in increasing feature order: its feature, kind and value (the clamp value, scale
 * factor or add coefficient). Any output pointer may be NULL. Errors: SAE_EINVAL (NULL s),
 * SAE_ERANGE (i >= sae_steer_count). */
SAE_API int sae_steer_get_op(const sae_steer *s, size_t i, uint32_t *feature, sae_steer_op *op,
                             float *value);
/* Removes the op on one feature, if there is one. Errors: SAE_EINVAL, SAE_ERANGE (feature >= d_sae). */
SAE_API int sae_steer_remove(sae_steer *s, uint32_t feature);

typedef struct sae_stats sae_stats; /* feature statistics: see Analysis below */

/* Clamps a feature to `multiple` times its largest observed activation, as "Scaling
 * Monosemanticity" does (10x the max to amplify, negative multiples to suppress). The max comes
 * from stats (an accumulator over the same model's codes, see sae_stats) or, when stats is NULL,
 * from max, an array of d_sae maxima; exactly one of the two must be given. The plan stores the
 * resulting clamp value. Errors: SAE_EINVAL (NULL s, both or neither source, stats of another
 * d_sae, non-finite multiple or max, max <= 0: a feature that never fired has no scale),
 * SAE_ERANGE (feature >= d_sae), SAE_ENOMEM. */
SAE_API int sae_steer_clamp_relative(sae_steer *s, uint32_t feature, float multiple,
                                     const sae_stats *stats, const float *max);

/* A plan of add ops only is one constant vector: v [d_in] = sum_i coeff_i * W_dec[i] /
 * INPUT_SCALE, what sae_steer_apply adds to every token. This is what engines that take additive
 * steering vectors want. For llama.cpp's llama_set_adapter_cvec, whose buffer holds
 * n_embd * (n_layer - 1) floats with layer 1 at offset 0, write the vector for the SAE's layer L
 * at buf + d_in * (L - 1) and leave the rest zero. An empty plan gives zeros.
 * Errors: SAE_EINVAL (NULL), SAE_ESTATE (the plan has clamp or scale ops, which depend on the
 * activations and are no constant vector), SAE_ENOMEM. */
SAE_API int sae_steer_vector(const sae_steer *s, float *v);

/* Writes a llama.cpp control-vector file (GGUF v3, as llama-cvector-generator writes them, for
 * llama-cli --control-vector / --control-vector-scaled): metadata general.architecture =
 * "controlvector", general.alignment = 32, controlvector.model_hint = model_hint (the engine
 * model's architecture, e.g. "llama"; NULL writes "") and controlvector.layer_count =
 * n_layer - 1; tensors direction.1 .. direction.<n_layer - 1>, 1-D F32 of n_embd values each.
 * data is in llama_set_adapter_cvec's layout: [n_layer - 1][n_embd], layer 1 first; n_layer is
 * the engine model's block count, so layer n_layer - 1 is the last block. Atomic, as
 * sae_model_save. Errors: SAE_EINVAL (NULL path or data, n_embd 0, n_layer < 2 or too large,
 * non-finite data), SAE_EIO, SAE_ENOMEM. */
SAE_API int sae_cvec_write(const char *path, const float *data, size_t n_embd, size_t n_layer,
                           const char *model_hint);
/* The plan's constant vector (sae_steer_vector) at `layer` (1 <= layer < n_layer) and zeros at
 * every other layer, written with sae_cvec_write; n_embd is the model's d_in. Errors: as
 * sae_steer_vector and sae_cvec_write, SAE_ERANGE (layer out of range). */
SAE_API int sae_steer_write_cvec(const sae_steer *s, const char *path, size_t layer,
                                 size_t n_layer, const char *model_hint);

/* ---------------------------------------------------------------------------------------------
 * Analysis: feature statistics and neighbours
 * ------------------------------------------------------------------------------------------- */

/* Feature statistics: an accumulator over batches of codes. Per feature it counts the tokens on
 * which the feature fired (value > 0), sums and maximises its values there, and keeps its top_n
 * examples: the (value, example id) pairs of largest value, ties to the smaller id, in a bounded
 * heap (memory d_sae * top_n * 12 bytes, whatever the number of tokens). Example ids are the
 * caller's 64-bit numbers (a token's position in a corpus, a document number); they need not be
 * unique. Values <= 0 are not counted. Two accumulators of the same shape merge, so threads or
 * processes can split the data and combine the results: counts, maxima and top examples then equal
 * those of one pass over all the data; sums (kept in double) agree to rounding. Updating one
 * accumulator from two threads at once is not safe: give each thread its own, then merge.
 *
 * sae_stats_new makes an empty accumulator for d_sae features keeping top_n examples of each
 * (0: none); *out owns it. Errors: SAE_EINVAL (NULL out, d_sae 0 or above UINT32_MAX, top_n above
 * UINT32_MAX), SAE_ENOMEM. */
SAE_API int sae_stats_new(sae_stats **out, size_t d_sae, size_t top_n);
SAE_API void sae_stats_free(sae_stats *st);

/* Adds n tokens of dense codes f [n][d_sae]. ids [n] gives each token's example id; NULL numbers
 * them by position, starting at sae_stats_tokens(st) (so ids of two accumulators built that way
 * collide when merged). All-or-nothing: on failure st is unchanged. n may be 0.
 * Errors: SAE_EINVAL (NULL, non-finite value), SAE_ENOMEM. */
SAE_API int sae_stats_update(sae_stats *st, const float *f, size_t n, const uint64_t *ids);
/* The same from sparse codes laid out as sae_encode_sparse writes them (token t owns slots
 * [t*k, t*k+k), count[t] of them used). A feature may appear at most once per token.
 * Errors: SAE_EINVAL (NULL, k = 0, count[t] > k, non-finite value, a repeated feature),
 * SAE_ERANGE (an index >= d_sae), SAE_ENOMEM. */
SAE_API int sae_stats_update_sparse(sae_stats *st, const uint32_t *idx, const float *val,
                                    const uint32_t *count, size_t k, size_t n,
                                    const uint64_t *ids);
/* Adds everything src has seen to dst. Errors: SAE_EINVAL (NULL, dst == src, different d_sae or
 * top_n). */
SAE_API int sae_stats_merge(sae_stats *dst, const sae_stats *src);

/* Shape and the number of tokens seen. 0 for NULL. */
SAE_API size_t sae_stats_d_sae(const sae_stats *st);
SAE_API size_t sae_stats_top_n(const sae_stats *st);
SAE_API uint64_t sae_stats_tokens(const sae_stats *st);
/* Copy per-feature arrays of d_sae entries out: how many tokens each feature fired on (its firing
 * frequency is count / sae_stats_tokens), the sum of its values (mean when firing = sum / count)
 * and its largest value (0 if it never fired). Errors: SAE_EINVAL (NULL). */
SAE_API int sae_stats_counts(const sae_stats *st, uint64_t *count);
SAE_API int sae_stats_sums(const sae_stats *st, double *sum);
SAE_API int sae_stats_max(const sae_stats *st, float *max);
/* One feature's top examples, largest value first (ties: smaller id first): *count (at most
 * top_n) entries of val and id are written; val and id must hold top_n entries. Either may be
 * NULL when not wanted. Errors: SAE_EINVAL (NULL st or count), SAE_ERANGE (feature >= d_sae),
 * SAE_ENOMEM. */
SAE_API int sae_stats_top(const sae_stats *st, uint32_t feature, float *val, uint64_t *id,
                          size_t *count);

/* The k features whose decoder directions (rows of W_dec) are closest to feature's by cosine
 * similarity, most similar first (ties: lower index first), the feature itself excluded: their
 * indices in idx [k] and cosines in cos [k] (cos may be NULL). One GEMV against W_dec, using the
 * decoder row norms the model keeps; a zero row has cosine 0 with everything. Thread safe.
 * Errors: SAE_EINVAL (NULL), SAE_ERANGE (feature >= d_sae, k > d_sae - 1), SAE_ENOMEM. */
SAE_API int sae_feature_neighbors(const sae_model *m, uint32_t feature, size_t k, uint32_t *idx,
                                  float *cos);

/* How well a model reconstructs activations, as SAELens' evals and sparsify measure it. */
typedef enum {
    SAE_EVAL_MSE = 1,                /* mean over tokens of sum_d (x - x_hat)^2 (SAELens "mse") */
    SAE_EVAL_FVU = 2,                /* sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (sparsify) */
    SAE_EVAL_EXPLAINED_VARIANCE = 3, /* 1 - FVU (SAELens "explained_variance") */
    SAE_EVAL_L0 = 4,                 /* mean number of active features per token */
    SAE_EVAL_L1 = 5,                 /* mean sum of feature values per token */
    SAE_EVAL_COSINE = 6,             /* mean cos(x, x_hat); 0 for a zero x or x_hat */
    SAE_EVAL_L2_RATIO = 7,           /* mean ||x_hat|| / ||x|| over tokens with x != 0 */
    SAE_EVAL_DEAD_FRACTION = 8       /* fraction of features active on none of the n tokens */
} sae_eval_metric;

/* Evaluates the model on x [n][d_in] (n >= 1) and writes values[i] for each which[i] (count
 * metrics, any order, repeats allowed). Sums are kept in double; x is processed in blocks, so
 * memory does not grow with n. FVU is NaN when every token is the same vector. Thread safe.
 * Errors: SAE_EINVAL (NULL, n = 0, non-finite x, unknown metric), SAE_ENOMEM. */
SAE_API int sae_evaluate(const sae_model *m, const float *x, size_t n,
                         const sae_eval_metric *which, size_t count, double *values);
/* sae_evaluate for a model scored against a target: y [n][d_out] is what the model should
 * predict from x [n][d_in] (a transcoder's MLP output); the metrics compare y with the model's
 * whole prediction (sae_reconstruct, skip included), FVU against y's own mean. sae_evaluate(m, x,
 * ...) is sae_evaluate_to(m, x, x, ...) and needs d_out = d_in. Errors: as sae_evaluate, and
 * non-finite y. Thread safe. */
SAE_API int sae_evaluate_to(const sae_model *m, const float *x, const float *y, size_t n,
                            const sae_eval_metric *which, size_t count, double *values);

/* ---------------------------------------------------------------------------------------------
 * Dictionary learning (training)
 *
 * A trainer learns a ReLU, TopK, BatchTopK, Matryoshka BatchTopK or JumpReLU model in place, one
 * Adam step per batch (an SAE as below; a transcoder from pairs with sae_trainer_init_to and
 * sae_trainer_step_to):
 *
 *     sae_model *m;
 *     sae_trainer *t;
 *     sae_model_new(&m, SAE_ARCH_TOPK, d_in, d_sae);
 *     sae_model_set_param(m, SAE_PARAM_K, 32);
 *     sae_trainer_new(&t, m);
 *     sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, steps);
 *     sae_trainer_init(t, sample, n_sample);          // b_dec, input scale, decoder directions
 *     for (size_t s = 0; s < steps; s++)
 *         sae_trainer_step(t, batch(s), batch_tokens);
 *     sae_trainer_free(t);
 *     sae_model_save(m, "sae.safetensors");
 *
 * Recipes (docs/training.md gives every knob, its default and where that default comes from):
 * - ReLU, Anthropic April 2024: loss = sum_d (x_s - x_hat_s)^2 + L1_COEFF * sum_i f_i ||W_dec[i]||,
 *   averaged over tokens, with an unconstrained decoder (rows start in random directions of norm
 *   DECODER_INIT_NORM, 1 by default; Anthropic and SAELens start at 0.1), L1 coefficient warm-up over the first 5% of TOTAL_STEPS, learning
 *   rate decay to zero over the last 20%, gradient clipping to norm 1.
 * - TopK, OpenAI 2024: loss = sum_d (x_s - x_hat_s)^2 / v, with v the variance of the init sample
 *   (so the loss is about the FVU), plus AUXK_COEFF * the AuxK loss: the AUXK largest
 *   pre-activations among dead latents reconstruct the residual, normalized by its variance.
 *   Decoder rows stay unit norm: the gradient's component along each row is removed before the
 *   Adam step and the rows are renormalized after it. Only the active latents' rows of W_dec and
 *   columns of W_enc receive gradients (a sparse backward pass).
 * - BatchTopK: TopK's losses, but the k * n largest activations of the whole batch are kept; a
 *   running threshold (EMA of the smallest kept activation, rate THRESHOLD_LR) is stored in the
 *   model as SAE_PARAM_THRESHOLD after every step, so the model encodes in the inference form.
 * - Matryoshka BatchTopK, Bussmann et al. 2025 (dictionary_learning, SAELens): a BatchTopK model
 *   with groups (sae_trainer_set_groups): consecutive latents split into G groups, and the main
 *   loss is the mean over g of ||x_s - x_hat_s(first g+1 groups)||^2 / v, so every prefix of
 *   groups reconstructs on its own. The model stays BatchTopK (threshold inference form).
 * - JumpReLU, Rajamanoharan et al. 2024 / Gemma Scope (SAELens's "step" mode): loss =
 *   sum_d (x_s - x_hat_s)^2 + L0_COEFF * sum_i H(pre_i - threshold_i), thresholds trained as
 *   log-thresholds through straight-through estimators with a rectangle kernel of width
 *   JUMPRELU_BANDWIDTH (d f_i/d threshold_i = -(threshold_i / bandwidth) rect(u), d H/d
 *   threshold_i = -rect(u) / bandwidth, u = (pre_i - threshold_i) / bandwidth; nothing reaches
 *   pre through H), thresholds starting at JUMPRELU_INIT_THRESHOLD, unit-norm decoder rows as
 *   TopK; the L0 coefficient warms up over L1_WARMUP_STEPS (TOTAL_STEPS / 20 until set). Its
 *   defaults: LR by the width rule (7e-5 at Gemma 2's width, as published), BETA1 0, ADAM_EPS
 *   1e-8, GRAD_CLIP 0, no LR decay. The model's threshold tensor is exp(log-threshold) after
 *   every step.
 * x_s = INPUT_SCALE * x is the model's scaled input: with NORMALIZE_INPUT (the default),
 * sae_trainer_init sets INPUT_SCALE so that the sample's mean norm is sqrt(d_in), and losses are
 * measured in those units.
 *
 * A latent is dead once it has not fired (f > 0) in DEAD_TOKENS consecutive tokens.
 *
 * Determinism: the same seed, parameters and batches give bit-identical weights for a given CBLAS
 * build and thread count. libsae's own loops are sequential; OpenBLAS's SGEMM splits work by the
 * thread count, so changing OPENBLAS_NUM_THREADS (or the library) may change the last bits.
 *
 * Data-parallel training: with sae_trainer_set_allreduce, each process steps on its own batch;
 * the trainer packs its gradient sums, token count, latent firing counts and metric sums into one
 * float buffer and hands it to the callback, which must replace it with the element-wise sum over
 * all processes. Every process then takes the same Adam step and keeps the same dead-latent
 * counters, so the weights stay identical (to float rounding, equal to one process stepping on
 * the combined batch). Every process must call sae_trainer_init with the same sample (and set
 * the same groups and parameters). BatchTopK selects its k * n activations within each
 * process's batch.
 * ------------------------------------------------------------------------------------------- */

typedef struct sae_trainer sae_trainer;

/* Training parameters. Defaults depend on the architecture; see docs/training.md. Parameters
 * that do not apply to the model's architecture are accepted and ignored. */
typedef enum {
    SAE_TRAIN_LR = 1,           /* > 0; 2e-4 sqrt(2^14 / d_sae) 768 / d_in, <= 0.1 / sqrt(d_in) */
    SAE_TRAIN_L1_COEFF = 2,     /* >= 0, ReLU; min(5, sqrt(d_in) / 4) */
    SAE_TRAIN_AUXK = 3,         /* whole >= 0, dead latents in the AuxK loss (0: off); 256 */
    SAE_TRAIN_AUXK_COEFF = 4,   /* >= 0; 1/32 */
    SAE_TRAIN_DEAD_TOKENS = 5,  /* whole >= 1; 10,000,000 */
    SAE_TRAIN_WARMUP_STEPS = 6, /* whole >= 0, linear learning-rate warm-up; 0 */
    SAE_TRAIN_BETA1 = 7,        /* in [0, 1); 0.9 */
    SAE_TRAIN_BETA2 = 8,        /* in [0, 1); 0.999 (BatchTopK 0.99) */
    SAE_TRAIN_SEED = 9,         /* whole, 0 to 2^53; 0; seeds the decoder directions */
    SAE_TRAIN_TOTAL_STEPS = 10, /* whole >= 0, the planned run length for the schedules; 0 = unknown */
    SAE_TRAIN_L1_WARMUP_STEPS = 11, /* whole >= 0; TOTAL_STEPS / 20 until set */
    SAE_TRAIN_LR_DECAY_STEPS = 12,  /* whole >= 0; ReLU TOTAL_STEPS / 5, else 0, until set */
    SAE_TRAIN_GRAD_CLIP = 13,       /* >= 0, max global gradient norm (0: off); ReLU 1, else 0 */
    SAE_TRAIN_DECODER_INIT_NORM = 14, /* > 0, decoder row norm at init; default 1 */
    SAE_TRAIN_THRESHOLD_LR = 15,    /* in [0, 1], BatchTopK threshold EMA rate; 0.01 */
    SAE_TRAIN_ADAM_EPS = 16,        /* >= 0; ReLU 1e-8, TopK/BatchTopK 6.25e-10 */
    SAE_TRAIN_NORMALIZE_INPUT = 17, /* 0 or 1: init sets INPUT_SCALE (mean norm sqrt(d_in)); 1 */
    SAE_TRAIN_B_DEC_INIT = 18,      /* 0 zero, 1 mean, 2 geometric median of the sample; 2 */
    SAE_TRAIN_JUMPRELU_BANDWIDTH = 19,      /* > 0, JumpReLU's pseudo-derivative width; 0.05 */
    SAE_TRAIN_JUMPRELU_INIT_THRESHOLD = 20, /* > 0, JumpReLU's threshold at init; 0.01 */
    SAE_TRAIN_L0_COEFF = 21,                /* >= 0, JumpReLU's L0 penalty coefficient; 1 */
    SAE_TRAIN_HELDOUT_EVERY = 25,  /* whole >= 0, steps between held-out evaluations (0: only at
                                    * TOTAL_STEPS); TOTAL_STEPS / 20 (100 if unknown), at least 1 */
    SAE_TRAIN_BF16 = 31                     /* 0 or 1: mixed precision (below); 0 */
} sae_train_param;

/* SAE_TRAIN_BF16 = 1: mixed-precision training, as torch's bf16 autocast. Every matrix product of
 * a step (the encoder's and decoder's forward products and their gradients, AuxK's, W_skip's)
 * takes its two operands rounded to bfloat16 (to nearest, ties to even) and accumulates in
 * float32; the weights stay float32 (the master copy: sae_model_get_tensor reads them), as do
 * their gradients, Adam's moments and every elementwise step, and the recipes are unchanged.
 * TopK's sparse decoder and its backward pass (rows of W_dec, not products) stay float32. On a
 * CPU with bfloat16 matrix instructions (sae_model_bf16_path's AMX, AVX512_BF16; SAE_BF16_ISA
 * caps it) the products of more than 2^25 multiply-adds run in oneDNN, faster than SGEMM; the
 * others, and all of them elsewhere, in SGEMM on rounded copies: the same arithmetic, no faster.
 * docs/training.md compares speed and FVU with float training. The step then also holds two
 * float copies of its largest operand. Like SAE_PARAM_THREADS, a property of how this process computes: checkpoints do not
 * store it. Results do not depend on SAE_PARAM_THREADS (tests/test_bf16.c). */

/* Values describing the last step's batch (the combined batch when data-parallel), and counts. */
typedef enum {
    SAE_METRIC_LOSS = 1,          /* the loss that was minimized, mean over tokens */
    SAE_METRIC_MSE = 2,           /* mean over tokens of sum_d (x - x_hat)^2, caller's units */
    SAE_METRIC_FVU = 3,           /* sum of squared error / sum of squared deviation from the mean */
    SAE_METRIC_L0 = 4,            /* mean number of nonzero codes per token */
    SAE_METRIC_DEAD_FRACTION = 5, /* fraction of latents dead after the step */
    SAE_METRIC_STEPS = 6,         /* steps taken since init */
    SAE_METRIC_TOKENS = 7,        /* tokens trained on since init */
    SAE_METRIC_AUXK_LOSS = 8,     /* the normalized AuxK loss (before AUXK_COEFF); 0 if none */
    SAE_METRIC_LR = 9,            /* learning rate used by the last step, after the schedule */
    SAE_METRIC_GRAD_NORM = 10,    /* global gradient norm of the last step, before clipping */
    SAE_METRIC_SPARSITY_LOSS = 11, /* JumpReLU: L0_COEFF (after warm-up) * mean L0; else 0 */
    SAE_METRIC_THRESHOLD_MEAN = 12, /* JumpReLU: mean threshold after the step; else 0 */
    SAE_METRIC_PREFIX_FVU = 13,    /* Matryoshka: FVU of the first group alone; else the FVU */
    /* The held-out metrics describe the tokens given to sae_trainer_set_heldout, as
     * sae_evaluate does, at the last evaluation (every HELDOUT_EVERY steps and at TOTAL_STEPS);
     * NaN until the first one. */
    SAE_METRIC_HELDOUT_FVU = 14,  /* FVU on the held-out tokens (sae_evaluate's SAE_EVAL_FVU) */
    SAE_METRIC_HELDOUT_MSE = 15,  /* MSE on the held-out tokens, caller's units */
    SAE_METRIC_HELDOUT_L0 = 16,   /* mean active latents per held-out token */
    SAE_METRIC_HELDOUT_STEP = 17, /* STEPS when the held-out metrics were evaluated; 0 if never */
    SAE_METRIC_WARNINGS = 18      /* bit set of SAE_TRAIN_WARN_* in force after the last step */
} sae_train_metric;

/* Diagnostics a run raises once it is past its warm-up (the learning-rate and L1 warm-ups, and
 * at least a quarter of TOTAL_STEPS, or 100 steps if unknown): the condition has held on every
 * batch for the last tenth of the steps taken (at least 10 steps). sae_trainer_warning says
 * which knob to change. */
typedef enum {
    SAE_TRAIN_WARN_FVU = 1, /* FVU stays above 1: worse than predicting the mean */
    SAE_TRAIN_WARN_L0 = 2   /* L0 stays above a quarter of d_sae: not sparse */
} sae_train_warning;

/* A trainer for model m, which it trains in place (m must outlive it and must not be used by
 * another thread during a step). ReLU, TopK, BatchTopK and JumpReLU models train, SAEs and transcoders
 * (with or without W_skip: sae_trainer_init_to); K comes from the model. A model with
 * SAE_PARAM_NORMALIZE is refused (SAE_EUNSUPPORTED).
 * Parameters start at the defaults for m's architecture and size. On success *out owns the
 * trainer. Errors: SAE_EINVAL (NULL), SAE_EUNSUPPORTED (gated, GroupMax), SAE_ENOMEM. */
SAE_API int sae_trainer_new(sae_trainer **out, sae_model *m);
/* Releases the trainer (not the model). NULL is a no-op. */
SAE_API void sae_trainer_free(sae_trainer *t);

/* Sets or reads a parameter (ranges in the enum above). May be called at any time; a change
 * takes effect at the next step (init for SEED, DECODER_INIT_NORM, NORMALIZE_INPUT, B_DEC_INIT).
 * get returns the value in force, including derived defaults (L1_WARMUP_STEPS, LR_DECAY_STEPS).
 * Real-valued parameters are checked as the floats the step uses: a value that is infinite,
 * zero, subnormal or out of range once converted (LR 1e300, BETA2 0.99999999) is refused.
 * Errors: SAE_EINVAL (NULL, unknown parameter, value out of range, naming both). */
SAE_API int sae_trainer_set_param(sae_trainer *t, sae_train_param p, double v);
SAE_API int sae_trainer_get_param(const sae_trainer *t, sae_train_param p, double *v);

/* Matryoshka training of a BatchTopK model: sizes[0..n) are the group sizes, consecutive latents
 * from 0, each >= 1, summing to d_sae (e.g. d_sae/32, d_sae/16, d_sae/8, d_sae/4 and the rest);
 * n = 0 (sizes may be NULL) removes the groups, back to plain BatchTopK. The trainer copies the
 * sizes. Takes effect at the next step; checkpoints keep the groups. get copies the sizes into
 * sizes[0..cap) and their number into *n (0 without groups); with sizes NULL, only the number.
 * Errors: SAE_EINVAL (NULL t or n, sizes that are 0 or do not sum to d_sae, cap too small),
 * SAE_EUNSUPPORTED (set on a model that is not BatchTopK), SAE_ENOMEM. Not thread safe
 * against a step of the same trainer. */
SAE_API int sae_trainer_set_groups(sae_trainer *t, const size_t *sizes, size_t n);
SAE_API int sae_trainer_get_groups(const sae_trainer *t, size_t *sizes, size_t cap, size_t *n);

/* Data-aware initialization from a sample x [n][d_in] (n >= 1; OpenAI used 32768 tokens):
 * INPUT_SCALE (if NORMALIZE_INPUT), b_dec (geometric median of the scaled sample by default,
 * Weiszfeld's iteration, as OpenAI's init_from_data_), decoder rows in random directions (from
 * SEED) of norm DECODER_INIT_NORM, W_enc = W_dec transposed, b_enc = 0, the TopK loss
 * normalization (the sample's variance), and fresh optimizer state, counters and metrics.
 * Overwrites every weight. Errors: SAE_EINVAL (NULL, n = 0, non-finite x), SAE_ENOMEM. */
SAE_API int sae_trainer_init(sae_trainer *t, const float *x, size_t n);

/* One Adam step on the batch x [n][d_in], n <= 2^24. With an allreduce callback n may be 0 on
 * some processes, but not on all. On failure the model and trainer are unchanged. Errors: SAE_EINVAL
 * (NULL, non-finite x, no tokens), SAE_ESTATE (before init or load), SAE_ECALLBACK (the
 * allreduce callback returned nonzero), SAE_ERANGE (the gradient, or a weight, an Adam moment or
 * the BatchTopK threshold after the step, would not be finite: the learning rate is too high or
 * the data too large; the message names the tensor and element, and nothing changed), SAE_ENOMEM. Scratch grows to the largest batch seen,
 * about (2 * d_sae + 4 * d_in) * n floats. */
SAE_API int sae_trainer_step(sae_trainer *t, const float *x, size_t n);

/* Transcoders: sae_trainer_init and sae_trainer_step with the target, y [n][d_out], what the model
 * should predict from x [n][d_in] (an MLP's output for its input). The loss is the SAE's with y
 * for x_s (docs/training.md): ||c (y_hat - y)||^2 / v plus AuxK for TopK and BatchTopK (FVU of
 * y, as sparsify's transcoders), ||c (y_hat - y)||^2 + L1_COEFF * sum_i f_i ||c W_dec[i]|| for
 * ReLU, with c = sqrt(d_out) / (mean ||y|| of the init sample) under NORMALIZE_INPUT (else 1) and
 * v the init sample's variance of c y; the metrics describe y (FVU of y). init sets INPUT_SCALE
 * from x as for an SAE, b_dec to y's mean (B_DEC_INIT 1, the transcoder default; 2 its geometric
 * median), W_enc columns to random directions of norm DECODER_INIT_NORM, b_enc = -mean(x_s) @
 * W_enc, and W_dec and W_skip to zero, as sparsify; the decoder rows are not held at unit norm.
 * W_skip trains with the other tensors by the same Adam. For an SAE, y must hold the same values
 * as x (then these are sae_trainer_init and sae_trainer_step); a transcoder refuses the plain
 * init and step. Errors: as sae_trainer_init and sae_trainer_step, and SAE_EINVAL for a NULL or
 * non-finite y, or an SAE's y that differs from x; SAE_EUNSUPPORTED for a transcoder with
 * APPLY_B_DEC_TO_INPUT = 1 (sparsify's skip-connection SAE, which neither peer trains). */
SAE_API int sae_trainer_init_to(sae_trainer *t, const float *x, const float *y, size_t n);
SAE_API int sae_trainer_step_to(sae_trainer *t, const float *x, const float *y, size_t n);

/* Reads a metric. Errors: SAE_EINVAL (NULL, unknown metric), SAE_ESTATE (a batch metric before
 * the first step; STEPS and TOKENS are 0 then). */
SAE_API int sae_trainer_get_metric(const sae_trainer *t, sae_train_metric which, double *v);

/* Held-out tokens for the held-out metrics: x [n][d_in] (and, for a transcoder, its targets y
 * [n][d_out]; NULL for an SAE), copied. Tokens should not be among those stepped on. The metrics
 * are evaluated on the current model at once if a step has been taken, then every
 * HELDOUT_EVERY steps and at step TOTAL_STEPS. n = 0 removes the held-out set (x and y may then
 * be NULL). Not saved in checkpoints. Errors: SAE_EINVAL (NULL t, NULL x with n > 0, non-finite
 * values, y given for an SAE or missing for a transcoder), SAE_ENOMEM; on failure nothing
 * changes. */
SAE_API int sae_trainer_set_heldout(sae_trainer *t, const float *x, const float *y, size_t n);

/* The warnings in force (SAE_METRIC_WARNINGS) as one sentence that names the parameter to change
 * (and the example programs' option for it), or NULL when there are none. The string belongs to
 * the trainer and stays valid until its next step, set_param, load, init or free. Errors: none
 * (NULL for a NULL t). Not thread safe with a step on the same trainer. */
SAE_API const char *sae_trainer_warning(const sae_trainer *t);

/* Data-parallel training: called once per step with this process's gradient sums and its token
 * count in one buffer; it must replace the buffer with the element-wise sum over all processes
 * (for example MPI_Allreduce with MPI_SUM) and return 0. Every process then takes the same step.
 * count is the same on every process (it depends only on the model's shape); buf is 64-byte
 * aligned. fn = NULL goes back to a single process. Errors: SAE_EINVAL (NULL t). */
typedef int (*sae_allreduce_fn)(float *buf, size_t count, void *user);
SAE_API int sae_trainer_set_allreduce(sae_trainer *t, sae_allreduce_fn fn, void *user);

/* Checkpoints. save writes the model and everything training needs to continue bit for bit
 * (Adam moments, step and token counts, dead-latent counters, normalizers, BatchTopK threshold,
 * JumpReLU log-thresholds, Matryoshka groups, parameters, last metrics) as one libsae safetensors file, atomically (as sae_model_save); the
 * file also loads with sae_model_load as a plain model. load reads such a file into a trainer
 * whose model has the same architecture and shape, overwriting the model's weights and
 * parameters and the trainer's state and parameters; on failure nothing changes.
 * Errors: SAE_EINVAL (NULL, shape or architecture mismatch), SAE_ESTATE (save before init),
 * SAE_EIO, SAE_EFORMAT (not a libsae training checkpoint, or damaged, or holding a value that is
 * not usable as the float it becomes: non-finite weights or moments, negative Adam second
 * moments, an input_scale of 1e-46; the message names the file and key), SAE_ENOMEM. */
SAE_API int sae_trainer_save(const sae_trainer *t, const char *path);
SAE_API int sae_trainer_load(sae_trainer *t, const char *path);

#ifdef __cplusplus
}
#endif
#endif /* SAE_H */
