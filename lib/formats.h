/* libsae's private header for file formats: the containers (safetensors, .npy, JSON, PyTorch
 * zip pickles), every published format's reader, and the model builder they all hand their
 * tensors to. Included by the readers (and their tests), never by the math. */
#ifndef SAE_FORMATS_H
#define SAE_FORMATS_H

#include "internal.h"

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
 * SAELens's cfg.json and activation_scaler.json, Gemma Scope 2's (and lm_saes 2025's) config.json,
 * Llama Scope's hyperparams.json (beside the weights or, for checkpoints/final.safetensors, one
 * folder up), circuit-tracer's config.yaml. */
typedef struct {
    const char *text;
    size_t len;
    const char *path;
} sae__side_text;

typedef struct {
    sae__side_text cfg, scaler, config, hyperparams;
    const char *file_name; /* the weights file's own name (no folder), for names that refuse */
    sae__side_text yaml;   /* circuit-tracer's config.yaml */
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
/* Whether st holds an lm_saes 2025 checkpoint's tensors (Llama Scope R1: log_jumprelu_threshold;
 * the later layout: W_E and W_D, activation_function.log_jumprelu_threshold). */
bool sae__llamascope_r1_like(const sae__safetensors *st);
/* Llama Scope R1 / lm_saes 2025: sae_weights.safetensors + config.json (config->text NULL:
 * refused, naming the file it needs). llamascope.c gives the layouts and the forward. */
int sae__llamascope_r1_load(const sae__safetensors *st, sae__map *map, const sae__side_text *config,
                            sae_model **out);
/* Whether st looks like circuit-tracer's per-layer transcoder (see circuit_tracer.c). */
bool sae__circuit_tracer_like(const sae__safetensors *st);
/* yaml: the config.yaml of the transcoder set the file belongs to (text NULL: none). */
int sae__circuit_tracer_load(const sae__safetensors *st, sae__map *map, const sae__side_text *yaml,
                             sae_model **out);
/* A folder holding circuit-tracer's config.yaml (yaml) and no single model: the config's own
 * error, or SAE_EUNSUPPORTED saying which file to load. Never SAE_OK. */
int sae__circuit_tracer_set_refusal(const char *dir, const sae__side_text *yaml);
/* Gives tensor t memory the model owns, holding what it held (before a loader rewrites it). */
int sae__model_own_copy(sae_model *m, sae_tensor t);

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
/* The same for a 2-D tensor [rows][cols], written into dst as [cols][rows] (nn.Linear's weight
 * into libsae's layout): a contiguous tensor is read a band of rows at a time, so no copy of the
 * whole tensor is held. Errors: those above, SAE_EFORMAT for a tensor that is not 2-D. */
int sae__torch_tensor_to_float_t(const sae__torch_dict *d, const sae__torch_tensor *t, float *dst);
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
 * lists the fields. The model keeps nothing of data (the caller keeps it). Errors: SAE_EFORMAT
 * (not one of these, naming the first entries; shapes; a k that cannot be known),
 * SAE_EUNSUPPORTED (a setting outside libsae's math), SAE_ENOMEM. */
int sae__torchsae_load(const unsigned char *data, size_t size, const char *path,
                       const char *cfg_text, size_t cfg_len, const char *cfg_path,
                       sae_model **out);

/* ---- zip members (npz.c; shared with the PyTorch reader) ------------------------------------ */

struct zip;
/* Index's uncompressed size, once its recorded sizes and method (stored or deflate, not
 * encrypted) are consistent with each other and with an archive of file_size bytes: nothing is
 * allocated for a member before this. Errors: SAE_EFORMAT, SAE_EUNSUPPORTED, naming path and
 * member. */
int sae__zip_member_stat(struct zip *za, uint64_t index, const char *member, const char *path,
                         size_t file_size, uint64_t *size);

/* ---- building a model from a file (model.c) ------------------------------------------------- */

/* Fills tensor t from a safetensors tensor (already checked to have the right shape): used in
 * place from the model's mapping when it is F32 and aligned, else converted into owned memory;
 * transpose reads a [rows][cols] source into the model's [cols][rows]. */
int sae__model_load_tensor(sae_model *m, sae_tensor t, const sae__safetensors *st,
                           const sae__st_tensor *src, bool transpose);

#endif /* SAE_FORMATS_H */
