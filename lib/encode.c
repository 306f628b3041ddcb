/* Activations to codes: the encoder GEMM, then one pass per token (bias, activation and, for
 * sparse output or TopK, the selection, fused) spread across threads. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Scratch for [block][d_sae] products: about 64 MiB, but never fewer than 32 tokens, below
 * which the GEMM would reread W_enc too often. */
size_t sae__block_tokens(size_t d_sae, size_t n)
{
    size_t block = ((size_t)16 << 20) / d_sae;
    if (block < 32)
        block = 32;
    return block < n ? block : n;
}

bool sae__encoder_reads_x(const sae_model *m)
{
    return m->input_scale == 1.0f && !m->apply_b_dec && m->normalize == SAE_NORMALIZE_NONE;
}

int sae__token_norm_of(const sae_model *m, const float *x, size_t row, sae__token_norm *out)
{
    const size_t d_in = m->d_in;
    /* In double: the statistics of a few thousand floats, rounded once. */
    switch (m->normalize) {
    case SAE_NORMALIZE_LAYER_NORM: {
        double sum = 0, sq = 0;
        for (size_t j = 0; j < d_in; j++)
            sum += x[j];
        double mu = sum / (double)d_in;
        for (size_t j = 0; j < d_in; j++)
            sq += ((double)x[j] - mu) * ((double)x[j] - mu);
        double sigma = sqrt(sq / (double)(d_in - 1)); /* torch's std: unbiased */
        *out = (sae__token_norm){(float)mu, (float)(1.0 / (sigma + 1e-5)), (float)sigma};
        return SAE_OK;
    }
    case SAE_NORMALIZE_CONSTANT_NORM: {
        double sq = 0;
        for (size_t j = 0; j < d_in; j++)
            sq += (double)x[j] * x[j];
        if (!(sq > 0))
            return sae__fail(SAE_EINVAL, "x[%zu] has norm 0: CONSTANT_NORM divides by it", row);
        double c = sqrt((double)d_in) / sqrt(sq);
        *out = (sae__token_norm){0.0f, (float)c, (float)(1.0 / c)};
        return SAE_OK;
    }
    default: *out = (sae__token_norm){0.0f, 1.0f, 1.0f}; return SAE_OK;
    }
}

int sae__encoder_input(const sae_model *m, const float *x, size_t n, float *xs,
                       sae__token_norm *norms)
{
    const size_t d_in = m->d_in;
    const float scale = m->input_scale;
    for (size_t t = 0; t < n; t++) {
        const float *row = x + t * d_in;
        float *out = xs + t * d_in;
        sae__token_norm tn = {0.0f, 1.0f, 1.0f};
        int rc = sae__token_norm_of(m, row, t, &tn);
        if (rc != SAE_OK)
            return rc;
        if (norms != NULL)
            norms[t] = tn;
        const float a = scale * tn.a;
        if (m->normalize == SAE_NORMALIZE_NONE) /* the common case: one multiply-subtract */
            for (size_t j = 0; j < d_in; j++)
                out[j] = scale * row[j] - (m->apply_b_dec ? m->b_dec[j] : 0.0f);
        else
            for (size_t j = 0; j < d_in; j++)
                out[j] = (row[j] - tn.mu) * a - (m->apply_b_dec ? m->b_dec[j] : 0.0f);
    }
    return SAE_OK;
}

int sae__encoder_product(const sae_model *m, const float *x, size_t n, float *xs, float *raw,
                         sae__token_norm *norms)
{
    const float *in = x;
    if (!sae__encoder_reads_x(m)) {
        int rc = sae__encoder_input(m, x, n, xs, norms);
        if (rc != SAE_OK)
            return rc;
        in = xs;
    } else if (norms != NULL) {
        for (size_t t = 0; t < n; t++)
            norms[t] = (sae__token_norm){0.0f, 1.0f, 1.0f};
    }
    return sae__weights_product(m, SAE_W_ENC, in, n, raw, 0.0f);
}

/* Per-worker heaps of `entries` each, for `chunks` workers. */
static sae__scored *worker_heaps(size_t chunks, size_t entries)
{
    size_t total;
    if (!sae__mul(chunks, entries ? entries : 1, &total)) {
        sae__fail(SAE_ENOMEM, "%zu top-k heaps of %zu entries overflow", chunks, entries);
        return NULL;
    }
    return sae__alloc(total, sizeof(sae__scored), "top-k heaps");
}

typedef struct {
    const sae_model *m;
    float *raw;
    sae__scored *heaps;
    size_t heap_entries;
} activate_job;

static void activate_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const activate_job *job = arg;
    sae__scored *heap = job->heaps ? job->heaps + worker * job->heap_entries : NULL;
    for (size_t t = begin; t < end; t++)
        sae__activate_row(job->m, job->raw + t * job->m->d_sae, heap);
}

int sae__activate_rows(const sae_model *m, float *raw, size_t n)
{
    const size_t threads = n > 1 ? sae__model_threads(m) : 1;
    const size_t grain = sae__grain(m->d_sae);
    const size_t chunks = sae__parallel_chunks(threads, n, grain);
    activate_job job = {m, raw, NULL, m->k < m->d_sae ? m->k : m->d_sae};
    if (!sae__codes_independent(m) && (job.heaps = worker_heaps(chunks, job.heap_entries)) == NULL)
        return SAE_ENOMEM;
    sae__parallel_for(threads, n, grain, activate_range, &job);
    free(job.heaps);
    return SAE_OK;
}

static int check_encode_args(const char *fn, const sae_model *m, const float *x, size_t n,
                             const void *out)
{
    SAE_CHECK_NULL_IN(fn, m);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL_IN(fn, x);
    SAE_CHECK_NULL_IN(fn, out);
    int rc = sae__check_tokens(n, sae__model_width(m), fn);
    if (rc != SAE_OK)
        return rc;
    return sae__check_finite(x, n * m->d_in, m->d_in, "x");
}

int sae_encode(const sae_model *m, const float *x, size_t n, float *f)
{
    int rc = check_encode_args(__func__, m, x, n, f);
    if (rc != SAE_OK || n == 0)
        return rc;
    float *xs = NULL;
    if (!sae__encoder_reads_x(m) &&
        (xs = sae__alloc(n * m->d_in, sizeof(float), "encode scratch")) == NULL)
        return SAE_ENOMEM;
    rc = sae__encoder_product(m, x, n, xs, f, NULL);
    free(xs);
    return rc != SAE_OK ? rc : sae__activate_rows(m, f, n);
}

typedef struct {
    const sae_model *m;
    const float *raw; /* the block's products */
    size_t first;     /* the block's first token */
    size_t k, select;
    uint32_t *idx, *count;
    float *val;
    sae__scored *heaps;
} sparse_job;

static void select_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const sparse_job *job = arg;
    sae__scored *heap = job->heaps + worker * job->select;
    const size_t k = job->k;
    for (size_t r = begin; r < end; r++) {
        const size_t t = job->first + r;
        size_t kept = sae__select_codes(job->m, job->raw + r * job->m->d_sae, job->select, heap);
        for (size_t j = 0; j < kept; j++) {
            job->idx[t * k + j] = heap[j].index;
            job->val[t * k + j] = heap[j].value;
        }
        for (size_t j = kept; j < k; j++) {
            job->idx[t * k + j] = 0;
            job->val[t * k + j] = 0.0f;
        }
        job->count[t] = (uint32_t)kept;
    }
}

int sae_encode_sparse(const sae_model *m, const float *x, size_t n, size_t k, uint32_t *idx,
                      float *val, uint32_t *count)
{
    int rc = check_encode_args(__func__, m, x, n, idx);
    if (rc != SAE_OK)
        return rc;
    if (k == 0)
        return sae__fail(SAE_EINVAL, "k must be at least 1");
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(val);
    SAE_CHECK_NULL(count);
    size_t slots;
    if (!sae__mul(n, k, &slots) || !sae__mul(slots, sizeof(float), &slots))
        return sae__fail(SAE_EINVAL, "n * k = %zu * %zu overflows", n, k);

    /* A TopK or GroupMax token has at most K nonzeros: selecting more is wasted work. */
    size_t select = k;
    if (!sae__codes_independent(m) && m->k < select)
        select = m->k;
    if (select > m->d_sae)
        select = m->d_sae;
    const size_t block = sae__block_tokens(m->d_sae, n);
    const size_t threads = n > 1 ? sae__model_threads(m) : 1, grain = sae__grain(m->d_sae);
    const size_t chunks = sae__parallel_chunks(threads, block, grain);
    float *raw = sae__alloc(block * m->d_sae, sizeof(float), "encode scratch");
    float *xs = sae__encoder_reads_x(m) ? NULL
                                        : sae__alloc(block * m->d_in, sizeof(float), "encode scratch");
    sae__scored *heaps = worker_heaps(chunks, select);
    if (raw == NULL || heaps == NULL || (xs == NULL && !sae__encoder_reads_x(m))) {
        free(raw);
        free(xs);
        free(heaps);
        return SAE_ENOMEM;
    }
    sparse_job job = {m, raw, 0, k, select, idx, count, val, heaps};
    rc = SAE_OK;
    for (size_t first = 0; first < n && rc == SAE_OK; first += block) {
        size_t rows = n - first < block ? n - first : block;
        if ((rc = sae__encoder_product(m, x + first * m->d_in, rows, xs, raw, NULL)) != SAE_OK)
            break;
        job.first = first;
        sae__parallel_for(threads, rows, grain, select_range, &job);
    }
    free(raw);
    free(xs);
    free(heaps);
    return rc;
}
