/* Steering plans: per-feature clamp, scale and add ops, applied to activations in place while
 * keeping the SAE's error term.
 *
 * For a token x and a plan, every op becomes a coefficient delta_i on feature i's decoder row:
 *   clamp  delta_i = value - f_i(x)        scale  delta_i = (factor - 1) * f_i(x)
 *   add    delta_i = coeff (the same for every token)
 * and x' = x + sum_i delta_i * W_dec[i] / INPUT_SCALE. This equals SAELens' "encode, edit the
 * codes, decode, add back the error" exactly, but touches only the plan's features.
 *
 * f_i(x) of a ReLU, JumpReLU or BatchTopK SAE depends on encoder column i alone, so those
 * features' pre-activations come from one small GEMM against their gathered columns: O(m * d_in)
 * per token for m features instead of O(d_sae * d_in). A TopK feature survives only if fewer than
 * K others beat it, which depends on every pre-activation, so TopK runs the full encoder. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Up to this many features, GEMV/GER per feature beat a GEMM, whose packing of the tokens
 * dominates when one of its dimensions is tiny. */
#define FEW 4

typedef struct {
    uint32_t feature;
    sae_steer_op op;
    float value;
} steer_entry;

struct sae_steer {
    const sae_model *m;
    steer_entry *ops; /* sorted by feature, at most one per feature */
    size_t n_ops, cap;
    size_t block;     /* features per gathered block; 0 = automatic */
};

int sae_steer_new(sae_steer **out, const sae_model *m)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    SAE_CHECK_NULL(m);
    sae_steer *s = sae__zalloc(1, sizeof *s, "steering plan");
    if (s == NULL)
        return SAE_ENOMEM;
    s->m = m;
    *out = s;
    return SAE_OK;
}

void sae_steer_free(sae_steer *s)
{
    if (s == NULL)
        return;
    free(s->ops);
    free(s);
}

void sae__steer_set_block(sae_steer *s, size_t features) { s->block = features; }

size_t sae_steer_count(const sae_steer *s) { return s ? s->n_ops : 0; }

/* Position of feature in the sorted op list, or where it would go. */
static size_t find(const sae_steer *s, uint32_t feature)
{
    size_t lo = 0, hi = s->n_ops;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->ops[mid].feature < feature)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int check_feature(const sae_steer *s, uint32_t feature, const char *fn)
{
    if (feature >= s->m->d_sae)
        return sae__fail(SAE_ERANGE, "%s: feature %u is out of range (the model has d_sae = %zu)",
                         fn, feature, s->m->d_sae);
    return SAE_OK;
}

static int set_op(sae_steer *s, uint32_t feature, sae_steer_op op, float value, const char *fn,
                  const char *what)
{
    SAE_CHECK_NULL(s);
    int rc = check_feature(s, feature, fn);
    if (rc != SAE_OK)
        return rc;
    if (!isfinite(value))
        return sae__fail(SAE_EINVAL, "%s: %s for feature %u is %g, not a finite number", fn, what,
                         feature, (double)value);
    size_t at = find(s, feature);
    if (at < s->n_ops && s->ops[at].feature == feature) {
        s->ops[at] = (steer_entry){feature, op, value}; /* a later op on a feature replaces it */
        return SAE_OK;
    }
    if (s->n_ops == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 8, bytes;
        if (!sae__mul(cap, sizeof *s->ops, &bytes))
            return sae__fail(SAE_ENOMEM, "%s: too many ops", fn);
        steer_entry *grown = realloc(s->ops, bytes);
        if (grown == NULL)
            return sae__fail(SAE_ENOMEM, "%s: out of memory growing the plan to %zu ops", fn, cap);
        s->ops = grown;
        s->cap = cap;
    }
    memmove(s->ops + at + 1, s->ops + at, (s->n_ops - at) * sizeof *s->ops);
    s->ops[at] = (steer_entry){feature, op, value};
    s->n_ops++;
    return SAE_OK;
}

int sae_steer_clamp(sae_steer *s, uint32_t feature, float value)
{
    return set_op(s, feature, SAE_STEER_CLAMP, value, __func__, "the clamp value");
}

int sae_steer_scale(sae_steer *s, uint32_t feature, float factor)
{
    return set_op(s, feature, SAE_STEER_SCALE, factor, __func__, "the scale factor");
}

int sae_steer_add(sae_steer *s, uint32_t feature, float coeff)
{
    return set_op(s, feature, SAE_STEER_ADD, coeff, __func__, "the coefficient");
}

int sae_steer_clamp_relative(sae_steer *s, uint32_t feature, float multiple,
                             const sae_stats *stats, const float *max)
{
    SAE_CHECK_NULL(s);
    if ((stats == NULL) == (max == NULL))
        return sae__fail(SAE_EINVAL, "%s: give exactly one of stats and max (got %s)", __func__,
                         stats ? "both" : "neither");
    int rc = check_feature(s, feature, __func__);
    if (rc != SAE_OK)
        return rc;
    if (stats != NULL && sae_stats_d_sae(stats) != s->m->d_sae)
        return sae__fail(SAE_EINVAL, "%s: the statistics cover %zu features, the model has %zu",
                         __func__, sae_stats_d_sae(stats), s->m->d_sae);
    if (!isfinite(multiple))
        return sae__fail(SAE_EINVAL, "%s: multiple = %g is not a finite number", __func__,
                         (double)multiple);
    float fmax = stats ? sae__stats_feature_max(stats, feature) : max[feature];
    if (!isfinite(fmax) || fmax <= 0.0f)
        return sae__fail(SAE_EINVAL,
                         "%s: feature %u has max activation %g; clamping relative to it needs a "
                         "finite max > 0 (a feature that never fired has no scale)",
                         __func__, feature, (double)fmax);
    float value = multiple * fmax;
    if (!isfinite(value))
        return sae__fail(SAE_EINVAL, "%s: %g times the max %g overflows", __func__,
                         (double)multiple, (double)fmax);
    return set_op(s, feature, SAE_STEER_CLAMP, value, __func__, "the clamp value");
}

int sae_steer_remove(sae_steer *s, uint32_t feature)
{
    SAE_CHECK_NULL(s);
    int rc = check_feature(s, feature, __func__);
    if (rc != SAE_OK)
        return rc;
    size_t at = find(s, feature);
    if (at < s->n_ops && s->ops[at].feature == feature) {
        memmove(s->ops + at, s->ops + at + 1, (s->n_ops - at - 1) * sizeof *s->ops);
        s->n_ops--;
    }
    return SAE_OK;
}

int sae_steer_clear(sae_steer *s)
{
    SAE_CHECK_NULL(s);
    s->n_ops = 0;
    return SAE_OK;
}

int sae_steer_get_op(const sae_steer *s, size_t i, uint32_t *feature, sae_steer_op *op,
                     float *value)
{
    SAE_CHECK_NULL(s);
    if (i >= s->n_ops)
        return sae__fail(SAE_ERANGE, "%s: op %zu does not exist (the plan has %zu)", __func__, i,
                         s->n_ops);
    if (feature)
        *feature = s->ops[i].feature;
    if (op)
        *op = s->ops[i].op;
    if (value)
        *value = s->ops[i].value;
    return SAE_OK;
}

/* v = sum over add ops of coeff * W_dec[i], unscaled like a decode. */
static void add_vector(const sae_steer *s, float *v)
{
    const sae_model *m = s->m;
    memset(v, 0, m->d_out * sizeof *v);
    for (size_t j = 0; j < s->n_ops; j++)
        if (s->ops[j].op == SAE_STEER_ADD)
            sae__dec_row_axpy(m, s->ops[j].feature, 0, m->d_out, s->ops[j].value, v);
    if (sae__output_scale(m) != 1.0f)
        sae__sscal(m->d_out, 1.0f / sae__output_scale(m), v);
}

int sae_steer_vector(const sae_steer *s, float *v)
{
    SAE_CHECK_NULL(s);
    SAE_CHECK_NULL(v);
    for (size_t j = 0; j < s->n_ops; j++)
        if (s->ops[j].op != SAE_STEER_ADD)
            return sae__fail(SAE_ESTATE,
                             "%s: the plan %s feature %u, which depends on the activations; only a "
                             "plan of add ops is a constant vector",
                             __func__, s->ops[j].op == SAE_STEER_CLAMP ? "clamps" : "scales",
                             s->ops[j].feature);
    add_vector(s, v);
    return SAE_OK;
}

int sae_steer_write_cvec(const sae_steer *s, const char *path, size_t layer, size_t n_layer,
                         const char *model_hint)
{
    SAE_CHECK_NULL(s);
    SAE_CHECK_NULL(path);
    if (n_layer < 2 || layer < 1 || layer >= n_layer)
        return sae__fail(SAE_ERANGE,
                         "%s: layer %zu is not a block llama.cpp can steer with n_layer = %zu "
                         "(it takes 1 <= layer <= n_layer - 1)",
                         __func__, layer, n_layer);
    const size_t d_out = s->m->d_out;
    float *buf = sae__zalloc(n_layer - 1, d_out * sizeof(float), "control-vector buffer");
    if (buf == NULL)
        return SAE_ENOMEM;
    int rc = sae_steer_vector(s, buf + d_out * (layer - 1));
    if (rc == SAE_OK)
        rc = sae_cvec_write(path, buf, d_out, n_layer, model_hint);
    free(buf);
    return rc;
}

/* ---- applying ------------------------------------------------------------------------------ */

/* The encoder-dependent ops (clamp, scale) of a plan, and per-call scratch. */
typedef struct {
    size_t me;           /* number of clamp/scale ops */
    const steer_entry **ops;
    size_t block;        /* features per gathered block */
    size_t n_blocks;
    float *G;            /* [d_in][block] encoder columns of one block of features */
    float *D;            /* [block][d_out] decoder rows of one block of features */
} enc_plan;

static inline float delta_of(const steer_entry *e, float f)
{
    return e->op == SAE_STEER_CLAMP ? e->value - f : e->value * f - f;
}

/* Copies encoder columns of features [first, first + count) into G [d_in][count]: one pass down
 * W_enc, reading each row at increasing (sorted) offsets. */
static void gather_enc(const sae_model *m, const enc_plan *p, size_t first, size_t count)
{
    for (size_t j = 0; j < m->d_in; j++) {
        float *g = p->G + j * count;
        for (size_t c = 0; c < count; c++)
            g[c] = sae__enc_at(m, j, p->ops[first + c]->feature);
    }
}

static void gather_dec(const sae_model *m, const enc_plan *p, size_t first, size_t count)
{
    for (size_t c = 0; c < count; c++)
        sae__dec_row(m, p->ops[first + c]->feature, p->D + c * m->d_out);
}

/* An SAE with a normalization adds each token's deltas at that token's scale (denorm_delta:
 * * sigma for LAYER_NORM, / c for CONSTANT_NORM); a transcoder's output has no such scale. */
static void denorm_deltas(const sae_model *m, const sae__token_norm *norms, float *delta,
                          size_t rows, size_t me)
{
    if (norms == NULL || m->transcoder)
        return;
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < me; c++)
            delta[r * me + c] *= norms[r].b;
}

/* y [rows][d_out] += delta [rows][me] @ W_dec[plan features] / output scale. */
static void add_deltas(const sae_model *m, const enc_plan *p, const float *delta, size_t rows,
                       float *y)
{
    const size_t d_out = m->d_out;
    const float alpha = 1.0f / sae__output_scale(m);
    for (size_t b = 0; b < p->n_blocks; b++) {
        size_t first = b * p->block, count = p->me - first < p->block ? p->me - first : p->block;
        if (p->n_blocks > 1)
            gather_dec(m, p, first, count);
        if (count <= FEW)
            for (size_t c = 0; c < count; c++)
                sae__sger(rows, d_out, alpha, delta + first + c, p->me, p->D + c * d_out, 1, y,
                          d_out);
        else
            sae__sgemm(false, false, rows, d_out, count, alpha, delta + first, p->me, p->D, d_out,
                       1.0f, y, d_out);
    }
}

/* The b_dec part of the plan's features' products, -APPLY_B_DEC * (b_dec . W_enc[:, i]), so the
 * tokens go into the GEMM as they are, with no shifted copy. G must hold those columns. */
static void gathered_shift(const sae_model *m, const enc_plan *p, size_t first, size_t count,
                           float *shift)
{
    memset(shift + first, 0, count * sizeof *shift);
    if (m->apply_b_dec)
        sae__sgemv(true, m->d_in, count, -1.0f, p->G, count, m->b_dec, 1, 0.0f, shift + first,
                   1);
}

/* Features whose code depends on their own encoder column only (ReLU, JumpReLU, BatchTopK,
 * gated): products with the plan's columns alone. Without a normalization the raw tokens go
 * into the GEMM with INPUT_SCALE as its alpha and b_dec's part folded into a per-feature shift;
 * with one, each block of tokens is normalized into scratch first (O(d_in) per token). */
static int apply_gathered(const sae_model *m, const enc_plan *p, const float *x, float *y,
                          size_t n)
{
    const size_t d_in = m->d_in, d_out = m->d_out, me = p->me;
    const bool normalized = m->normalize != SAE_NORMALIZE_NONE;
    /* Tokens per pass: bounds the [tokens][me] deltas and the normalized tokens. */
    size_t tokens = ((size_t)1 << 20) / me;
    if (normalized && tokens > ((size_t)1 << 22) / d_in)
        tokens = ((size_t)1 << 22) / d_in;
    tokens = tokens < 1 ? 1 : tokens < n ? tokens : n;
    float *delta = sae__alloc(tokens * me, sizeof(float), "steering scratch");
    float *shift = sae__zalloc(me, sizeof(float), "steering scratch");
    float *xs = normalized ? sae__alloc(tokens * d_in, sizeof(float), "steering scratch") : NULL;
    sae__token_norm *norms = normalized ? sae__alloc(tokens, sizeof *norms, "steering scratch")
                                        : NULL;
    int rc = SAE_OK;
    if (delta == NULL || shift == NULL || (normalized && (xs == NULL || norms == NULL))) {
        rc = SAE_ENOMEM;
        goto done;
    }
    if (p->n_blocks == 1) {
        gather_enc(m, p, 0, me);
        if (!normalized)
            gathered_shift(m, p, 0, me, shift);
        gather_dec(m, p, 0, me);
    }
    for (size_t t0 = 0; t0 < n; t0 += tokens) {
        const size_t rows = n - t0 < tokens ? n - t0 : tokens;
        const float *in = x + t0 * d_in;
        float alpha = m->input_scale;
        if (normalized) {
            if ((rc = sae__encoder_input(m, in, rows, xs, norms)) != SAE_OK) {
                sae__wrap(rc, "token block at %zu: ", t0);
                goto done;
            }
            in = xs;
            alpha = 1.0f;
        }
        for (size_t b = 0; b < p->n_blocks; b++) {
            size_t first = b * p->block, count = me - first < p->block ? me - first : p->block;
            if (p->n_blocks > 1) {
                gather_enc(m, p, first, count);
                if (!normalized)
                    gathered_shift(m, p, first, count, shift);
            }
            if (rows == 1)
                sae__sgemv(true, d_in, count, alpha, p->G, count, in, 1, 0.0f, delta + first, 1);
            else if (count <= FEW)
                for (size_t c = 0; c < count; c++)
                    sae__sgemv(false, rows, d_in, alpha, in, d_in, p->G + c, count, 0.0f,
                               delta + first + c, me);
            else
                sae__sgemm(false, false, rows, count, d_in, alpha, in, d_in, p->G, count, 0.0f,
                           delta + first, me);
        }
        for (size_t r = 0; r < rows; r++) {
            float *d = delta + r * me;
            for (size_t c = 0; c < me; c++)
                d[c] = delta_of(p->ops[c],
                                sae__feature_code(m, p->ops[c]->feature, d[c] + shift[c]));
        }
        denorm_deltas(m, norms, delta, rows, me);
        add_deltas(m, p, delta, rows, y + t0 * d_out);
    }
done:
    free(delta);
    free(shift);
    free(xs);
    free(norms);
    return rc;
}

typedef struct {
    const sae_model *m;
    const enc_plan *p;
    const float *raw;
    float *delta;
    sae__scored *heaps;
    size_t kept_max;
} select_delta_job;

/* Each token's selected codes (TopK's K strongest, GroupMax's group winners), then each plan
 * feature's code: its value if selected, else 0. The kept entries are looked up in the plan
 * (sorted by feature). */
static void select_delta_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const select_delta_job *job = arg;
    const enc_plan *p = job->p;
    sae__scored *heap = job->heaps + worker * job->kept_max;
    for (size_t r = begin; r < end; r++) {
        size_t kept = sae__select_codes(job->m, job->raw + r * job->m->d_sae, job->kept_max, heap);
        float *d = job->delta + r * p->me;
        for (size_t c = 0; c < p->me; c++)
            d[c] = 0.0f;
        for (size_t j = 0; j < kept; j++) {
            size_t lo = 0, hi = p->me;
            while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (p->ops[mid]->feature < heap[j].index)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo < p->me && p->ops[lo]->feature == heap[j].index)
                d[lo] = heap[j].value;
        }
        for (size_t c = 0; c < p->me; c++)
            d[c] = delta_of(p->ops[c], d[c]);
    }
}

/* TopK, GroupMax: the full encoder product, then each token's selection across threads. */
static int apply_full(const sae_model *m, const enc_plan *p, const float *x, float *y, size_t n)
{
    const size_t d_in = m->d_in, d_sae = m->d_sae, me = p->me;
    const size_t tokens = sae__block_tokens(d_sae, n);
    const size_t threads = n > 1 ? sae__model_threads(m) : 1, grain = sae__grain(d_sae);
    const size_t chunks = sae__parallel_chunks(threads, tokens, grain);
    const bool normalized = m->normalize != SAE_NORMALIZE_NONE;
    select_delta_job job = {m, p, NULL, NULL, NULL, m->k < d_sae ? m->k : d_sae};
    float *raw = sae__alloc(tokens * d_sae, sizeof(float), "steering scratch");
    float *xs = sae__encoder_reads_x(m) ? NULL
                                        : sae__alloc(tokens * d_in, sizeof(float), "steering scratch");
    float *delta = sae__alloc(tokens * me, sizeof(float), "steering scratch");
    sae__scored *heaps = sae__alloc(chunks * job.kept_max, sizeof *heaps, "top-k heaps");
    sae__token_norm *norms = normalized ? sae__alloc(tokens, sizeof *norms, "steering scratch")
                                        : NULL;
    int rc = SAE_OK;
    if (raw == NULL || (xs == NULL && !sae__encoder_reads_x(m)) || delta == NULL ||
        heaps == NULL || (normalized && norms == NULL)) {
        rc = SAE_ENOMEM;
        goto done;
    }
    job.raw = raw;
    job.delta = delta;
    job.heaps = heaps;
    if (p->n_blocks == 1)
        gather_dec(m, p, 0, me);
    for (size_t t0 = 0; t0 < n; t0 += tokens) {
        const size_t rows = n - t0 < tokens ? n - t0 : tokens;
        if ((rc = sae__encoder_product(m, x + t0 * d_in, rows, xs, raw, norms)) != SAE_OK)
            break;
        sae__parallel_for(threads, rows, grain, select_delta_range, &job);
        denorm_deltas(m, norms, delta, rows, me);
        add_deltas(m, p, delta, rows, y + t0 * m->d_out);
    }
done:
    free(raw);
    free(xs);
    free(delta);
    free(heaps);
    free(norms);
    return rc;
}

int sae_steer_apply_to(const sae_steer *s, const float *x, float *y, size_t n)
{
    SAE_CHECK_NULL(s);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(x);
    SAE_CHECK_NULL(y);
    const sae_model *m = s->m;
    if ((const void *)x == (void *)y && m->d_in != m->d_out)
        return sae__fail(SAE_EINVAL, "%s: x and y are one buffer, but d_in = %zu and d_out = %zu "
                         "differ", __func__, m->d_in, m->d_out);
    int rc = sae__check_tokens(n, m->d_in > m->d_out ? m->d_in : m->d_out, __func__);
    if (rc != SAE_OK)
        return rc;
    if ((rc = sae__check_finite(x, n * m->d_in, m->d_in, "x")) != SAE_OK ||
        (rc = sae__check_finite(y, n * m->d_out, m->d_out, "y")) != SAE_OK || s->n_ops == 0)
        return rc;

    enc_plan p = {0};
    size_t n_add = 0;
    for (size_t j = 0; j < s->n_ops; j++)
        n_add += s->ops[j].op == SAE_STEER_ADD;
    p.me = s->n_ops - n_add;
    const bool gathered = sae__codes_independent(m);
    float *cvec = NULL;
    if (n_add > 0 && (cvec = sae__alloc(m->d_out, sizeof(float), "steering vector")) == NULL)
        return SAE_ENOMEM;
    if (p.me > 0) {
        const size_t width = m->d_in > m->d_out ? m->d_in : m->d_out;
        p.block = s->block ? s->block : (((size_t)2 << 20) / width);
        if (p.block < 1)
            p.block = 1;
        if (p.block > p.me)
            p.block = p.me;
        p.n_blocks = (p.me + p.block - 1) / p.block;
        p.ops = sae__alloc(p.me, sizeof *p.ops, "steering scratch");
        p.G = gathered ? sae__alloc(p.block * m->d_in, sizeof(float), "encoder columns") : NULL;
        p.D = sae__alloc(p.block * m->d_out, sizeof(float), "decoder rows");
        if (p.ops == NULL || p.D == NULL || (p.G == NULL && gathered)) {
            rc = SAE_ENOMEM;
            goto done;
        }
        for (size_t j = 0, c = 0; j < s->n_ops; j++)
            if (s->ops[j].op != SAE_STEER_ADD)
                p.ops[c++] = &s->ops[j];
        /* Every delta of a block of tokens is computed from x before y (which may be x) changes. */
        rc = gathered ? apply_gathered(m, &p, x, y, n) : apply_full(m, &p, x, y, n);
        if (rc != SAE_OK)
            goto done;
    }
    if (cvec != NULL) {
        add_vector(s, cvec);
        for (size_t t = 0; t < n; t++)
            sae__axpy(m->d_out, 1.0f, cvec, y + t * m->d_out);
    }
done:
    free(cvec);
    free(p.ops);
    free(p.G);
    free(p.D);
    return rc;
}

int sae_steer_apply(const sae_steer *s, float *x, size_t n)
{
    SAE_CHECK_NULL(s);
    if (s->m->d_out != s->m->d_in)
        return sae__fail(SAE_EINVAL, "%s: this transcoder reads %zu values and writes %zu: use "
                         "sae_steer_apply_to(s, x, y, n)", __func__, s->m->d_in, s->m->d_out);
    return sae_steer_apply_to(s, x, x, n);
}
