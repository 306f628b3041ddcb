/* The model object: its shape, tensors, parameters and their validation, and the builder every
 * format reader hands its tensors to (sae__model_from_st). */
#include "formats.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static const char *const arch_names[] = {NULL,       "relu",  "topk",    "batchtopk",
                                         "jumprelu", "gated", "groupmax"};

const char *sae_arch_name(sae_arch arch)
{
    return arch >= SAE_ARCH_RELU && arch <= SAE__ARCH_LAST ? arch_names[arch] : NULL;
}

int sae_arch_from_name(const char *name, sae_arch *arch)
{
    SAE_CHECK_NULL(name);
    SAE_CHECK_NULL(arch);
    for (int a = SAE_ARCH_RELU; a <= SAE__ARCH_LAST; a++) {
        if (strcmp(name, arch_names[a]) == 0) {
            *arch = (sae_arch)a;
            return SAE_OK;
        }
    }
    if (strcmp(name, "standard") == 0) {
        *arch = SAE_ARCH_RELU;
        return SAE_OK;
    }
    return sae__fail(SAE_EINVAL,
                     "unknown architecture '%.64s' (expected relu, topk, batchtopk, jumprelu, "
                     "gated or groupmax)",
                     name);
}

static const char *const normalize_names[] = {"none", "layer_norm", "constant_norm"};

const char *sae__normalize_name(sae_normalize n)
{
    return (unsigned)n < 3 ? normalize_names[n] : NULL;
}

int sae__normalize_from_name(const char *name, sae_normalize *out)
{
    for (int i = 0; i < 3; i++)
        if (strcmp(name, normalize_names[i]) == 0) {
            *out = (sae_normalize)i;
            return SAE_OK;
        }
    return SAE_EINVAL;
}

const char *const sae__tensor_names[SAE__TENSOR_END] = {
    NULL, "W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip", "r_mag", "b_mag"};

static bool valid_arch(sae_arch arch) { return arch >= SAE_ARCH_RELU && arch <= SAE__ARCH_LAST; }

size_t sae__model_tensor_count(const sae_model *m, sae_tensor t)
{
    switch (t) {
    case SAE_W_ENC: return m->d_in * m->d_sae; /* checked not to overflow at creation */
    case SAE_W_DEC: return m->d_sae * m->d_out;
    case SAE_B_ENC: return m->d_sae;
    case SAE_B_DEC: return m->d_out;
    case SAE_THRESHOLD: return m->arch == SAE_ARCH_JUMPRELU ? m->d_sae : 0;
    case SAE_W_SKIP: return m->skip ? m->d_in * m->d_out : 0;
    case SAE_R_MAG:
    case SAE_B_MAG: return m->arch == SAE_ARCH_GATED ? m->d_sae : 0;
    default: return 0;
    }
}

float **sae__model_tensor_slot(sae_model *m, sae_tensor t)
{
    switch (t) {
    case SAE_W_ENC: return &m->W_enc;
    case SAE_W_DEC: return &m->W_dec;
    case SAE_B_ENC: return &m->b_enc;
    case SAE_B_DEC: return &m->b_dec;
    case SAE_THRESHOLD: return &m->threshold;
    case SAE_W_SKIP: return &m->W_skip;
    case SAE_R_MAG: return &m->r_mag;
    case SAE_B_MAG: return &m->b_mag;
    default: return NULL;
    }
}

size_t sae__model_tensor_cols(const sae_model *m, sae_tensor t)
{
    switch (t) {
    case SAE_W_ENC: return m->d_sae;
    case SAE_W_DEC:
    case SAE_W_SKIP: return m->d_out;
    default: return 1;
    }
}

size_t sae__model_weight_bytes(const sae__shape *shape)
{
    /* Checked not to overflow by sae__model_alloc before anyone asks. */
    size_t floats = shape->d_in * shape->d_sae + shape->d_sae * shape->d_out;
    if (shape->skip)
        floats += shape->d_in * shape->d_out;
    return floats * sizeof(float);
}

int sae__model_alloc(sae_model **out, const sae__shape *shape)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    const size_t d_in = shape->d_in, d_sae = shape->d_sae, d_out = shape->d_out;
    if (!valid_arch(shape->arch))
        return sae__fail(SAE_EINVAL, "unknown architecture %d", (int)shape->arch);
    if (d_in == 0 || d_sae == 0 || d_out == 0)
        return sae__fail(SAE_EINVAL, "d_in (%zu), d_sae (%zu) and d_out (%zu) must be at least 1",
                         d_in, d_sae, d_out);
    if (!shape->transcoder && (d_out != d_in || shape->skip))
        return sae__fail(SAE_EINVAL, "an SAE has d_out = d_in and no skip connection");
    /* Indices travel as uint32_t, every size reaches BLAS as an int (leading dimensions are
     * widths), and every matrix must be addressable in bytes. */
    size_t enc, dec, skip = 0, all;
    if (d_sae > UINT32_MAX || d_in > INT32_MAX || d_sae > INT32_MAX || d_out > INT32_MAX ||
        !sae__mul(d_in, d_sae, &enc) || !sae__mul(d_sae, d_out, &dec) ||
        (shape->skip && !sae__mul(d_in, d_out, &skip)) || !sae__add(enc, dec, &all) ||
        !sae__add(all, skip, &all) || !sae__mul(all, sizeof(float), &all))
        return sae__fail(SAE_ENOMEM, "a model of %zu x %zu x %zu is too large", d_in, d_sae,
                         d_out);
    sae_model *m = calloc(1, sizeof *m);
    if (m == NULL)
        return sae__fail(SAE_ENOMEM, "cannot allocate a model");
    m->arch = shape->arch;
    m->d_in = d_in;
    m->d_sae = d_sae;
    m->d_out = d_out;
    m->transcoder = shape->transcoder;
    m->skip = shape->skip;
    m->k = 32;
    if (shape->arch == SAE_ARCH_GROUPMAX) /* the most groups up to 32 that divide d_sae evenly */
        while (d_sae % m->k != 0)
            m->k--;
    /* A transcoder's b_dec is its output bias: subtracting it from the input is sparsify's
     * skip-connection SAE only, which asks for it. */
    m->apply_b_dec = !shape->transcoder;
    m->input_scale = 1.0f;
    m->format = "new";
    m->dtype = SAE__F32;
    m->dec_norm = sae__zalloc(d_sae, sizeof(float), "decoder norms");
    if (shape->arch == SAE_ARCH_GATED)
        m->mag_scale = sae__alloc(d_sae, sizeof(float), "gated magnitude scales");
    if (m->dec_norm == NULL || (shape->arch == SAE_ARCH_GATED && m->mag_scale == NULL)) {
        free(m->dec_norm);
        free(m);
        return SAE_ENOMEM;
    }
    for (size_t i = 0; m->mag_scale != NULL && i < d_sae; i++)
        m->mag_scale[i] = 1.0f; /* exp(0): r_mag starts at zero */
    *out = m;
    return SAE_OK;
}

/* ---- the weight matrices' memory ---------------------------------------------------------- */

/* W_enc and W_dec start 16 bytes past a 64-byte boundary, as numpy's large arrays do (glibc's
 * mmap'd blocks): OpenBLAS's SGEMM (0.3.21, SKYLAKEX kernels) took 8-20% more CPU time with its B
 * operand on a 64-byte boundary, at 64 tokens x 2304 x 16384 on the AMX Xeon of
 * docs/performance.md, in every one of 8 placements of A and C tried (single-threaded, thread CPU
 * time, best of 5; tests/bench/bf16_align.c). Other tensors keep sae__alloc's alignment. On
 * transparent huge pages (advise_huge below; bf16_align's buffers now are) the offset made no
 * difference beyond the noise, for that product, the decoder's (1024 x 16384 x 2304) and one
 * token's SGEMV (2 cores under load 7-10, best of 3-20); the shift stays for memory the kernel
 * keeps on 4 KB pages (THP off, or no huge page free). */
#define W_SHIFT_FLOATS 4

static bool shifted(sae_tensor t) { return t == SAE_W_ENC || t == SAE_W_DEC; }

/* Transparent huge pages where the kernel offers them (madvise mode is the common default),
 * advised before the first touch so that the pages are faulted in huge. A converted load then
 * takes 75 page faults per 150 MB tensor instead of 37 000, most of its time; and every product
 * streaming the weights, or picking rows of W_dec at random, misses the TLB once per 2 MB
 * instead of once per 4 KB. numpy advises the same for its arrays of 4 MB or more, so its x @ W
 * over a 151 MB W_enc took 12% less CPU time than the same SGEMV over 4 KB pages (one OpenBLAS
 * thread, the Xeon of docs/performance.md, whose 480 MB cache holds W_enc: the page walks, not
 * DRAM, set the pace). Advice only: failure changes nothing. */
static void advise_huge(void *p, size_t bytes)
{
    enum { HUGE = 2u << 20 };
    uintptr_t begin = (uintptr_t)p, end = begin + bytes;
    uintptr_t a = (begin + HUGE - 1) & ~(uintptr_t)(HUGE - 1), b = end & ~(uintptr_t)(HUGE - 1);
    if (b > a)
        (void)madvise((void *)a, b - a, MADV_HUGEPAGE);
}

static float *tensor_alloc(sae_tensor t, size_t count, const char *what)
{
    const size_t extra = shifted(t) ? W_SHIFT_FLOATS : 0;
    if (count > SIZE_MAX / sizeof(float) - extra) {
        sae__fail(SAE_ENOMEM, "%s: %zu floats overflow", what, count);
        return NULL;
    }
    float *p = sae__alloc(count + extra, sizeof(float), what);
    if (p != NULL)
        advise_huge(p, (count + extra) * sizeof(float));
    return p == NULL ? NULL : p + extra;
}

static void tensor_free(sae_tensor t, float *p)
{
    if (p != NULL)
        free(p - (shifted(t) ? W_SHIFT_FLOATS : 0));
}

int sae__model_own_tensor(sae_model *m, sae_tensor t)
{
    float **slot = sae__model_tensor_slot(m, t);
    size_t count = sae__model_tensor_count(m, t);
    if (m->owned & (1u << t))
        tensor_free(t, *slot);
    *slot = tensor_alloc(t, count, sae__tensor_names[t]);
    if (*slot != NULL)
        memset(*slot, 0, count * sizeof(float));
    if (*slot == NULL) {
        m->owned &= ~(1u << t);
        return SAE_ENOMEM;
    }
    m->owned |= 1u << t;
    return SAE_OK;
}

static int new_model(sae_model **out, const sae__shape *shape)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    sae_model *m;
    int rc = sae__model_alloc(&m, shape);
    if (rc != SAE_OK)
        return rc;
    /* Each weight matrix alone may fit while they together do not (zeroing touches them). */
    if (sae__check_fits_memory(sae__model_weight_bytes(shape), "the model's weights") != SAE_OK) {
        sae_model_free(m);
        return SAE_ENOMEM;
    }
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END; t++) {
        if (sae__model_tensor_count(m, (sae_tensor)t) == 0)
            continue;
        if ((rc = sae__model_own_tensor(m, (sae_tensor)t)) != SAE_OK) {
            sae_model_free(m);
            return rc;
        }
    }
    *out = m;
    return SAE_OK;
}

int sae_model_new(sae_model **out, sae_arch arch, size_t d_in, size_t d_sae)
{
    return new_model(out, &(sae__shape){arch, d_in, d_sae, d_in, false, false});
}

int sae_model_new_transcoder(sae_model **out, sae_arch arch, size_t d_in, size_t d_sae,
                             size_t d_out, int skip)
{
    if (skip != 0 && skip != 1) {
        if (out != NULL)
            *out = NULL;
        return sae__fail(SAE_EINVAL, "%s: skip must be 0 or 1, not %d", __func__, skip);
    }
    return new_model(out, &(sae__shape){arch, d_in, d_sae, d_out, true, skip == 1});
}

void sae_model_free(sae_model *m)
{
    if (m == NULL)
        return;
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END; t++)
        if (m->owned & (1u << t))
            tensor_free((sae_tensor)t, *sae__model_tensor_slot(m, (sae_tensor)t));
    free(m->W_enc16);
    free(m->W_dec16);
    sae__bf16_packed_free(m->W_enc16p);
    sae__bf16_packed_free(m->W_dec16p);
    free(m->dec_norm);
    free(m->mag_scale);
    sae__unmap(&m->map);
    free(m);
}

size_t sae_model_d_in(const sae_model *m) { return m ? m->d_in : 0; }
size_t sae_model_d_sae(const sae_model *m) { return m ? m->d_sae : 0; }
size_t sae_model_d_out(const sae_model *m) { return m ? m->d_out : 0; }
int sae_model_is_transcoder(const sae_model *m) { return m != NULL && m->transcoder; }

int sae_model_decoder_norms(const sae_model *m, float *norms)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(norms);
    memcpy(norms, m->dec_norm, m->d_sae * sizeof *norms);
    return SAE_OK;
}

int sae_model_has_tensor(const sae_model *m, sae_tensor t)
{
    return m != NULL && t >= SAE_W_ENC && t < SAE__TENSOR_END &&
           sae__model_tensor_count(m, t) > 0;
}
sae_arch sae_model_arch(const sae_model *m) { return m ? m->arch : (sae_arch)0; }
const char *sae_model_format(const sae_model *m) { return m ? m->format : NULL; }
const char *sae_model_dtype(const sae_model *m) { return m ? sae__dtype_name(m->dtype) : NULL; }

void sae__model_weights_changed(sae_model *m)
{
    for (size_t i = 0; i < m->d_sae; i++)
        m->dec_norm[i] = sae__dec_row_norm(m, i);
    /* Gated: the magnitude path's product is the gate's times exp(r_mag), column by column
     * ((x @ W_enc) * exp(r) = x @ (W_enc * exp(r))), so one GEMM serves both paths. */
    for (size_t i = 0; m->mag_scale != NULL && i < m->d_sae; i++)
        m->mag_scale[i] = expf(m->r_mag[i]);
}

static int check_tensor(const sae_model *m, sae_tensor t)
{
    if (t < SAE_W_ENC || t >= SAE__TENSOR_END)
        return sae__fail(SAE_EINVAL, "unknown tensor %d", (int)t);
    if (sae__model_tensor_count(m, t) == 0) {
        if (t == SAE_THRESHOLD)
            return sae__fail(SAE_EUNSUPPORTED,
                             "only JumpReLU models have a threshold tensor (this one is %s; "
                             "BatchTopK's is the parameter SAE_PARAM_THRESHOLD)",
                             sae_arch_name(m->arch));
        if (t == SAE_W_SKIP)
            return sae__fail(SAE_EUNSUPPORTED, "this model has no skip connection (W_skip)");
        return sae__fail(SAE_EUNSUPPORTED, "only gated models have %s (this one is %s)",
                         sae__tensor_names[t], sae_arch_name(m->arch));
    }
    return SAE_OK;
}

/* Tensor t's bfloat16 storage, or NULL when it is held as float. */
static uint16_t *bf16_slot(const sae_model *m, sae_tensor t)
{
    return t == SAE_W_ENC ? m->W_enc16 : t == SAE_W_DEC ? m->W_dec16 : NULL;
}

int sae_model_set_tensor(sae_model *m, sae_tensor t, const float *src)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(src);
    int rc = check_tensor(m, t);
    if (rc != SAE_OK)
        return rc;
    size_t count = sae__model_tensor_count(m, t);
    size_t cols = sae__model_tensor_cols(m, t);
    if ((rc = sae__check_finite(src, count, cols, sae__tensor_names[t])) != SAE_OK)
        return rc;
    /* exp(r_mag) must stay a finite, nonzero float for the magnitude path. */
    for (size_t i = 0; t == SAE_R_MAG && i < count; i++)
        if (!(src[i] > -87.0f && src[i] < 88.0f))
            return sae__fail(SAE_ERANGE, "r_mag[%zu] = %g: exp(r_mag) must be a normal float "
                             "(|r_mag| < 87)", i, (double)src[i]);
    uint16_t *narrow = bf16_slot(m, t);
    if (narrow != NULL) {
        if ((rc = sae__bf16_narrow(src, narrow, count, cols, sae__tensor_names[t])) != SAE_OK)
            return rc;
        sae__bf16_repack(m, t);
    } else {
        memmove(*sae__model_tensor_slot(m, t), src, count * sizeof(float));
    }
    if (t == SAE_W_DEC || t == SAE_R_MAG)
        sae__model_weights_changed(m);
    return SAE_OK;
}

int sae_model_get_tensor(const sae_model *m, sae_tensor t, float *dst)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(dst);
    int rc = check_tensor(m, t);
    if (rc != SAE_OK)
        return rc;
    const uint16_t *narrow = bf16_slot(m, t);
    float *const *slot = sae__model_tensor_slot((sae_model *)m, t);
    if (narrow != NULL)
        sae__bf16_widen(narrow, dst, sae__model_tensor_count(m, t));
    else
        memmove(dst, *slot, sae__model_tensor_count(m, t) * sizeof(float));
    return SAE_OK;
}

static int param_applies(const sae_model *m, sae_model_param p)
{
    switch (p) {
    case SAE_PARAM_K:
        if (m->arch != SAE_ARCH_TOPK && m->arch != SAE_ARCH_BATCHTOPK &&
            m->arch != SAE_ARCH_GROUPMAX)
            return sae__fail(SAE_EUNSUPPORTED,
                             "K applies to TopK, BatchTopK and GroupMax, not %s",
                             sae_arch_name(m->arch));
        return SAE_OK;
    case SAE_PARAM_THRESHOLD:
        if (m->arch != SAE_ARCH_BATCHTOPK)
            return sae__fail(SAE_EUNSUPPORTED,
                             "THRESHOLD applies to BatchTopK, not %s (JumpReLU's per-feature "
                             "thresholds are the tensor SAE_THRESHOLD)",
                             sae_arch_name(m->arch));
        return SAE_OK;
    case SAE_PARAM_APPLY_B_DEC_TO_INPUT:
    case SAE_PARAM_INPUT_SCALE:
    case SAE_PARAM_THREADS:
    case SAE_PARAM_BF16_WEIGHTS:
    case SAE_PARAM_NORMALIZE: return SAE_OK;
    default: return sae__fail(SAE_EINVAL, "unknown model parameter %d", (int)p);
    }
}

/* Every parameter's range, the one place set_param, param_bounds and the readers (which all go
 * through set_param) take it from. Float parameters are checked after conversion to float:
 * 1e-46 is > 0 as a double but 0 as a float, and 1e39 is finite as a double but not as a float.
 * normal: a float parameter must be 0 or a normal number (a subnormal INPUT_SCALE or THRESHOLD
 * would turn the arithmetic around it into infinities or flushed zeros). */
typedef struct {
    const char *name;
    double lo, hi;
    bool whole; /* a whole number (counts and flags) rather than a float */
} param_range;

static const param_range *range_of(sae_model_param p)
{
    static const param_range ranges[] = {
        [SAE_PARAM_K] = {"K", 1.0, (double)UINT32_MAX, true},
        [SAE_PARAM_APPLY_B_DEC_TO_INPUT] = {"APPLY_B_DEC_TO_INPUT", 0.0, 1.0, true},
        [SAE_PARAM_INPUT_SCALE] = {"INPUT_SCALE", FLT_MIN, FLT_MAX, false},
        [SAE_PARAM_THRESHOLD] = {"THRESHOLD", -FLT_MAX, FLT_MAX, false},
        [SAE_PARAM_THREADS] = {"THREADS", 0.0, 1024.0, true},
        [SAE_PARAM_BF16_WEIGHTS] = {"BF16_WEIGHTS", 0.0, 1.0, true},
        [SAE_PARAM_NORMALIZE] = {"NORMALIZE", 0.0, 2.0, true},
    };
    if ((int)p <= 0 || (size_t)p >= sizeof ranges / sizeof ranges[0])
        return NULL;
    return &ranges[p];
}

int sae_model_param_bounds(sae_model_param p, double *lo, double *hi)
{
    SAE_CHECK_NULL(lo);
    SAE_CHECK_NULL(hi);
    const param_range *r = range_of(p);
    if (r == NULL)
        return sae__fail(SAE_EINVAL, "unknown model parameter %d", (int)p);
    *lo = r->lo;
    *hi = r->hi;
    return SAE_OK;
}

int sae__float_in_range(double value, double lo, double hi, const char *name, float *out)
{
    float f = (float)value;
    if (!isfinite(value) || !isfinite(f) || (f != 0.0f && !isnormal(f)) || !(f >= lo && f <= hi))
        return sae__fail(SAE_EINVAL, "%s must be a float from %g to %g, not %g%s", name, lo, hi,
                         value,
                         isfinite(value) && (!isfinite(f) || (f != 0.0f && !isnormal(f)))
                             ? " (out of float's normal range)"
                             : "");
    *out = f;
    return SAE_OK;
}

int sae_model_set_param(sae_model *m, sae_model_param p, double value)
{
    SAE_CHECK_NULL(m);
    int rc = param_applies(m, p);
    if (rc != SAE_OK)
        return rc;
    const param_range *r = range_of(p);
    float f = 0.0f;
    if (r->whole) {
        if (!(value >= r->lo && value <= r->hi) || value != floor(value))
            return sae__fail(SAE_EINVAL, "%s must be a whole number from %.0f to %.0f, not %g",
                             r->name, r->lo, r->hi, value);
    } else if ((rc = sae__float_in_range(value, r->lo, r->hi, r->name, &f)) != SAE_OK) {
        return rc;
    }
    switch (p) {
    case SAE_PARAM_K:
        if (m->arch == SAE_ARCH_GROUPMAX && m->d_sae % (size_t)value != 0)
            return sae__fail(SAE_EINVAL,
                             "K = %g groups must divide d_sae = %zu (GroupMax groups are equal)",
                             value, m->d_sae);
        m->k = (size_t)value;
        break;
    case SAE_PARAM_APPLY_B_DEC_TO_INPUT:
        if (value == 1.0 && m->d_out != m->d_in)
            return sae__fail(SAE_EINVAL,
                             "APPLY_B_DEC_TO_INPUT = 1 subtracts b_dec [d_out] from the input "
                             "[d_in]: only possible when d_out = d_in (here %zu and %zu)",
                             m->d_out, m->d_in);
        m->apply_b_dec = value == 1.0;
        break;
    case SAE_PARAM_NORMALIZE:
        if (value == SAE_NORMALIZE_LAYER_NORM && m->d_in < 2)
            return sae__fail(SAE_EINVAL, "LAYER_NORM needs d_in >= 2 (its std divides by d_in - 1)");
        m->normalize = (sae_normalize)value;
        break;
    case SAE_PARAM_INPUT_SCALE: m->input_scale = f; break;
    case SAE_PARAM_THRESHOLD: m->batch_threshold = f; break;
    case SAE_PARAM_THREADS: m->threads = (size_t)value; break;
    case SAE_PARAM_BF16_WEIGHTS: return sae__model_set_bf16(m, value == 1.0);
    }
    return SAE_OK;
}

int sae_model_get_param(const sae_model *m, sae_model_param p, double *value)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(value);
    int rc = param_applies(m, p);
    if (rc != SAE_OK)
        return rc;
    switch (p) {
    case SAE_PARAM_K: *value = (double)m->k; break;
    case SAE_PARAM_APPLY_B_DEC_TO_INPUT: *value = m->apply_b_dec; break;
    case SAE_PARAM_INPUT_SCALE: *value = m->input_scale; break;
    case SAE_PARAM_THRESHOLD: *value = m->batch_threshold; break;
    case SAE_PARAM_THREADS: *value = (double)m->threads; break;
    case SAE_PARAM_BF16_WEIGHTS: *value = m->W_enc16 != NULL; break;
    case SAE_PARAM_NORMALIZE: *value = m->normalize; break;
    }
    return SAE_OK;
}

/* ---- switching the storage ----------------------------------------------------------------- */

int sae__model_set_bf16(sae_model *m, bool on)
{
    if (on == (m->W_enc16 != NULL))
        return SAE_OK;
    const size_t n_enc = m->d_in * m->d_sae, n_dec = m->d_sae * m->d_out;
    if (on) {
        uint16_t *enc = sae__alloc(n_enc, sizeof *enc, "bfloat16 W_enc");
        uint16_t *dec = enc ? sae__alloc(n_dec, sizeof *dec, "bfloat16 W_dec") : NULL;
        int rc = dec == NULL ? SAE_ENOMEM : SAE_OK;
        if (rc == SAE_OK) {
            advise_huge(enc, n_enc * sizeof *enc);
            advise_huge(dec, n_dec * sizeof *dec);
            rc = sae__bf16_narrow(m->W_enc, enc, n_enc, m->d_sae, "W_enc");
        }
        if (rc == SAE_OK)
            rc = sae__bf16_narrow(m->W_dec, dec, n_dec, m->d_out, "W_dec");
        if (rc != SAE_OK) {
            free(enc);
            free(dec);
            return rc;
        }
        for (int t = SAE_W_ENC; t <= SAE_W_DEC; t++) {
            float **slot = sae__model_tensor_slot(m, (sae_tensor)t);
            if (m->owned & (1u << t))
                tensor_free((sae_tensor)t, *slot);
            *slot = NULL; /* a mapped file's pages are dropped by the kernel once unused */
            m->owned &= ~(1u << t);
        }
        m->W_enc16 = enc;
        m->W_dec16 = dec;
    } else {
        float *enc = tensor_alloc(SAE_W_ENC, n_enc, "W_enc");
        float *dec = enc ? tensor_alloc(SAE_W_DEC, n_dec, "W_dec") : NULL;
        if (dec == NULL) {
            tensor_free(SAE_W_ENC, enc);
            return SAE_ENOMEM;
        }
        sae__bf16_widen(m->W_enc16, enc, n_enc);
        sae__bf16_widen(m->W_dec16, dec, n_dec);
        free(m->W_enc16);
        free(m->W_dec16);
        m->W_enc16 = m->W_dec16 = NULL;
        m->W_enc = enc;
        m->W_dec = dec;
        m->owned |= (1u << SAE_W_ENC) | (1u << SAE_W_DEC);
    }
    sae__bf16_repack(m, SAE_W_ENC); /* made, or freed */
    sae__bf16_repack(m, SAE_W_DEC);
    sae__model_weights_changed(m);
    return SAE_OK;
}

/* ---- building a model from a file's tensors (every reader's last step) ------------------- */

int sae__model_own_tensor_uninit(sae_model *m, sae_tensor t)
{
    float **slot = sae__model_tensor_slot(m, t);
    size_t count = sae__model_tensor_count(m, t);
    if (m->owned & (1u << t))
        tensor_free(t, *slot);
    m->owned &= ~(1u << t);
    *slot = tensor_alloc(t, count, "a converted tensor");
    if (*slot == NULL)
        return SAE_ENOMEM;
    m->owned |= 1u << t;
    return SAE_OK;
}

/* Every weight read from a file must be finite, as sae_model_set_tensor demands of the
 * caller's: a NaN or infinity would reach every code computed from it. v holds count values of
 * src starting at element first (in the file's order); sae__check_finite keeps the common case
 * at memory speed, and only a refusal looks for the first bad value again, to name it in the
 * file's own [row][col]. */
static int check_finite_part(const sae__safetensors *st, const sae__st_tensor *src,
                             const float *v, size_t count, size_t first)
{
    size_t cols = src->ndim == 2 ? src->shape[1] : 1;
    if (sae__check_finite(v, count, cols, src->name) == SAE_OK)
        return SAE_OK;
    size_t i = 0;
    while (i < count && isfinite(v[i]))
        i++;
    size_t at = first + (i < count ? i : 0);
    double bad = i < count ? (double)v[i] : 0.0;
    if (src->ndim == 2)
        return sae__fail(SAE_EFORMAT, "%s: tensor '%s'[%zu][%zu] is %g: weights must be finite",
                         st->path, src->name, at / cols, at % cols, bad);
    return sae__fail(SAE_EFORMAT, "%s: tensor '%s'[%zu] is %g: weights must be finite", st->path,
                     src->name, at, bad);
}

int sae__model_load_tensor(sae_model *m, sae_tensor t, const sae__safetensors *st,
                           const sae__st_tensor *src, bool transpose)
{
    float **slot = sae__model_tensor_slot(m, t);
    const unsigned char *bytes = st->data + src->offset;
    /* Used in place when the mapping can serve as the tensor's storage directly. */
    if (!transpose && src->dtype == SAE__F32 && st->data == m->map.data &&
        src->offset % sizeof(float) == 0) {
        const float *in_place = (const float *)(const void *)(m->map.data + src->offset);
        int rc = check_finite_part(st, src, in_place, src->count, 0);
        if (rc != SAE_OK)
            return rc;
        if (m->owned & (1u << t))
            tensor_free(t, *slot);
        m->owned &= ~(1u << t);
        *slot = (float *)(void *)(m->map.data + src->offset);
        return SAE_OK;
    }
    int rc = sae__model_own_tensor_uninit(m, t);
    if (rc != SAE_OK)
        return rc;
    size_t esize = sae__dtype_size(src->dtype);
    if (!transpose) {
        /* Converted and checked a cache-sized part at a time: one pass over the memory. */
        enum { PART = 1 << 14 };
        for (size_t i = 0; i < src->count && rc == SAE_OK; i += PART) {
            size_t n = src->count - i < PART ? src->count - i : PART;
            sae__to_float(src->dtype, bytes + i * esize, n, *slot + i);
            rc = check_finite_part(st, src, *slot + i, n, i);
        }
        return rc;
    }
    /* src is [rows][cols]; the model wants [cols][rows]. A band of rows is converted at a time,
     * then written out in square tiles so both the reads and the writes stay in cache. */
    enum { BAND = 64 };
    size_t rows = src->shape[0], cols = src->shape[1];
    float *band = sae__alloc(BAND * cols, sizeof(float), "transpose scratch");
    if (band == NULL)
        return SAE_ENOMEM;
    float *dst = *slot;
    for (size_t r0 = 0; r0 < rows && rc == SAE_OK; r0 += BAND) {
        size_t nr = rows - r0 < BAND ? rows - r0 : BAND;
        sae__to_float(src->dtype, bytes + r0 * cols * esize, nr * cols, band);
        if ((rc = check_finite_part(st, src, band, nr * cols, r0 * cols)) != SAE_OK)
            break;
        for (size_t c0 = 0; c0 < cols; c0 += BAND) {
            size_t nc = cols - c0 < BAND ? cols - c0 : BAND;
            for (size_t c = c0; c < c0 + nc; c++)
                for (size_t r = 0; r < nr; r++)
                    dst[c * rows + r0 + r] = band[r * cols + c];
        }
    }
    free(band);
    return rc;
}

/* Finds every tensor the model needs with its expected shape (transposed where asked), before
 * anything is allocated: sizes from a config are believed only once the file holds that much. */
static int expect_all(const sae__safetensors *st, const sae__shape *shape,
                      const char *const names[SAE__TENSOR_END], unsigned transpose,
                      const sae__st_tensor *srcs[SAE__TENSOR_END])
{
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END; t++) {
        srcs[t] = NULL;
        size_t d0, d1 = 0;
        switch (t) {
        case SAE_W_ENC: d0 = shape->d_in, d1 = shape->d_sae; break;
        case SAE_W_DEC: d0 = shape->d_sae, d1 = shape->d_out; break;
        case SAE_B_DEC: d0 = shape->d_out; break;
        case SAE_W_SKIP: d0 = shape->d_in, d1 = shape->d_out; break;
        default: d0 = shape->d_sae; break;
        }
        bool wanted = t <= SAE_B_DEC || (t == SAE_THRESHOLD && shape->arch == SAE_ARCH_JUMPRELU) ||
                      (t == SAE_W_SKIP && shape->skip) ||
                      ((t == SAE_R_MAG || t == SAE_B_MAG) && shape->arch == SAE_ARCH_GATED);
        if (!wanted)
            continue;
        if (((transpose >> t) & 1u) && d1 != 0) {
            size_t tmp = d0;
            d0 = d1;
            d1 = tmp;
        }
        if (names[t] == NULL)
            return sae__fail(SAE_EFORMAT, "%s: no tensor for %s", st->path, sae__tensor_names[t]);
        int rc = sae__st_expect(st, names[t], d0, d1, &srcs[t]);
        if (rc != SAE_OK)
            return rc;
    }
    return SAE_OK;
}

int sae__model_from_st(const sae__safetensors *st, sae__map *map, const sae__shape *shape,
                       const char *const names[SAE__TENSOR_END], unsigned transpose,
                       const char *format, sae_model **out)
{
    *out = NULL;
    const sae__st_tensor *srcs[SAE__TENSOR_END];
    int rc = expect_all(st, shape, names, transpose, srcs);
    if (rc != SAE_OK)
        return rc;
    sae_model *m;
    if ((rc = sae__model_alloc(&m, shape)) != SAE_OK)
        return sae__wrap(rc, "%s: ", st->path);
    bool take = map != NULL && map->data != NULL && map->data == st->data;
    if (take)
        m->map = *map;
    m->format = format;
    for (int t = SAE_W_ENC; t < SAE__TENSOR_END && rc == SAE_OK; t++) {
        if (srcs[t] == NULL)
            continue;
        bool flip = ((transpose >> t) & 1u) && srcs[t]->ndim == 2;
        rc = sae__model_load_tensor(m, (sae_tensor)t, st, srcs[t], flip);
        if (srcs[t]->dtype != SAE__F32)
            m->dtype = srcs[t]->dtype;
    }
    /* exp(r_mag) must stay a normal float, as sae_model_set_tensor demands. */
    for (size_t i = 0; rc == SAE_OK && m->r_mag != NULL && i < m->d_sae; i++)
        if (!(m->r_mag[i] > -87.0f && m->r_mag[i] < 88.0f))
            rc = sae__fail(SAE_EFORMAT, "%s: %s[%zu] = %g: exp(r_mag) must be a normal float "
                           "(|r_mag| < 87)", st->path, names[SAE_R_MAG], i, (double)m->r_mag[i]);
    if (rc != SAE_OK) {
        if (take)
            m->map = (sae__map){0}; /* the caller still owns the mapping */
        sae_model_free(m);
        return rc;
    }
    sae__model_weights_changed(m);
    if (take)
        *map = (sae__map){0};
    *out = m;
    return SAE_OK;
}
