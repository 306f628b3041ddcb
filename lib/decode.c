/* Codes back to activations: dense codes by one GEMM, or, when they are sparse (as SAE codes
 * are), by adding only the rows of W_dec in use; sparse codes likewise; and the round trip.
 * Token loops run across the model's threads, one token per thread. */
#include "internal.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

/* Values scanned at once for nonzeros: a fixed count the compiler vectorizes. */
#define SCREEN 16

static void unscale(const sae_model *m, float *x_hat, size_t n)
{
    if (m->input_scale != 1.0f)
        cblas_sscal((int)(n * m->d_in), 1.0f / m->input_scale, x_hat, 1);
}

void sae__decode_token(const sae_model *m, const uint32_t *idx, const float *val, size_t count,
                       float *x_hat)
{
    memcpy(x_hat, m->b_dec, m->d_in * sizeof(float));
    for (size_t j = 0; j < count; j++)
        cblas_saxpy((int)m->d_in, val[j], m->W_dec + (size_t)idx[j] * m->d_in, 1, x_hat, 1);
    unscale(m, x_hat, 1);
}

/* One token of dense codes, adding the rows of its nonzero codes in index order. */
static void decode_row_sparse(const sae_model *m, const float *f, float *x_hat)
{
    const size_t d_sae = m->d_sae, d_in = m->d_in;
    memcpy(x_hat, m->b_dec, d_in * sizeof(float));
    for (size_t i = 0; i < d_sae;) {
        size_t end = i + SCREEN <= d_sae ? i + SCREEN : d_sae;
        if (end - i == SCREEN) {
            int any = 0;
            for (size_t j = 0; j < SCREEN; j++)
                any |= f[i + j] != 0.0f;
            if (!any) {
                i = end;
                continue;
            }
        }
        for (; i < end; i++)
            if (f[i] != 0.0f)
                cblas_saxpy((int)d_in, f[i], m->W_dec + i * d_in, 1, x_hat, 1);
    }
    unscale(m, x_hat, 1);
}

typedef struct {
    const sae_model *m;
    const float *f;
    float *x_hat;
    size_t *nonzeros; /* per worker */
} dense_job;

static void count_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const dense_job *job = arg;
    const float *f = job->f + begin * job->m->d_sae;
    const size_t len = (end - begin) * job->m->d_sae;
    size_t nonzeros = 0, i = 0;
    for (; i + SCREEN <= len; i += SCREEN) {
        unsigned block = 0;
        for (size_t j = 0; j < SCREEN; j++)
            block += f[i + j] != 0.0f;
        nonzeros += block;
    }
    for (; i < len; i++)
        nonzeros += f[i] != 0.0f;
    job->nonzeros[worker] = nonzeros;
}

static void sparse_rows_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const dense_job *job = arg;
    for (size_t t = begin; t < end; t++)
        decode_row_sparse(job->m, job->f + t * job->m->d_sae, job->x_hat + t * job->m->d_in);
}

int sae__decode_dense(const sae_model *m, const float *f, size_t n, float *x_hat)
{
    const size_t d_in = m->d_in, d_sae = m->d_sae;
    const size_t threads = n > 1 ? sae__model_threads(m) : 1;
    size_t nonzeros[64] = {0};
    dense_job job = {m, f, x_hat, nonzeros};
    sae__parallel_for(threads, n, sae__grain(d_sae), count_range, &job);
    size_t total = 0;
    for (size_t w = 0; w < 64; w++)
        total += nonzeros[w];
    /* Adding a row of W_dec per nonzero moves d_in floats from memory for 2 d_in flops, where the
     * GEMM does 2 d_in flops per code at compute speed, some 16 times faster once n is large;
     * for a few tokens the GEMM is bound by reading W_dec whole instead. */
    if (total <= n * d_sae / 16 || total <= d_sae / 2) {
        sae__parallel_for(threads, n, sae__grain(total / n * d_in + d_sae), sparse_rows_range, &job);
        return SAE_OK;
    }
    for (size_t t = 0; t < n; t++)
        memcpy(x_hat + t * d_in, m->b_dec, d_in * sizeof(float));
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, (int)d_sae, (int)d_in, 1.0f, m->W_dec, (int)d_in,
                    f, 1, 1.0f, x_hat, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)d_in, (int)d_sae,
                    1.0f, f, (int)d_sae, m->W_dec, (int)d_in, 1.0f, x_hat, (int)d_in);
    unscale(m, x_hat, n);
    return SAE_OK;
}

static int check_sizes(const sae_model *m, size_t n, size_t width)
{
    size_t bytes;
    if (n > INT32_MAX || !sae__mul(n, width, &bytes) || !sae__mul(bytes, sizeof(float), &bytes) ||
        !sae__mul(n, m->d_in, &bytes) || !sae__mul(bytes, sizeof(float), &bytes))
        return sae__fail(SAE_EINVAL, "n = %zu tokens is too many", n);
    return SAE_OK;
}

int sae_decode(const sae_model *m, const float *f, size_t n, float *x_hat)
{
    SAE_CHECK_NULL(m);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(f);
    SAE_CHECK_NULL(x_hat);
    int rc = check_sizes(m, n, m->d_sae);
    if (rc == SAE_OK)
        rc = sae__check_finite(f, n * m->d_sae, m->d_sae, "f");
    if (rc != SAE_OK)
        return rc;
    return sae__decode_dense(m, f, n, x_hat);
}

typedef struct {
    const sae_model *m;
    const uint32_t *idx, *count;
    const float *val;
    size_t k;
    float *x_hat;
} sparse_job;

static void sparse_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const sparse_job *job = arg;
    const size_t k = job->k, d_in = job->m->d_in;
    for (size_t t = begin; t < end; t++)
        sae__decode_token(job->m, job->idx + t * k, job->val + t * k, job->count[t],
                          job->x_hat + t * d_in);
}

int sae_decode_sparse(const sae_model *m, const uint32_t *idx, const float *val,
                      const uint32_t *count, size_t k, size_t n, float *x_hat)
{
    SAE_CHECK_NULL(m);
    if (k == 0)
        return sae__fail(SAE_EINVAL, "k must be at least 1");
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(idx);
    SAE_CHECK_NULL(val);
    SAE_CHECK_NULL(count);
    SAE_CHECK_NULL(x_hat);
    int rc = check_sizes(m, n, k);
    if (rc != SAE_OK)
        return rc;
    /* Validate everything before writing anything, so a bad token leaves x_hat untouched. */
    size_t pairs = 0;
    for (size_t t = 0; t < n; t++) {
        if (count[t] > k)
            return sae__fail(SAE_EINVAL, "count[%zu] = %u is more than k = %zu", t, count[t], k);
        for (size_t j = 0; j < count[t]; j++) {
            if (idx[t * k + j] >= m->d_sae)
                return sae__fail(SAE_ERANGE, "idx[%zu][%zu] = %u is not a feature (d_sae = %zu)",
                                 t, j, idx[t * k + j], m->d_sae);
        }
        if ((rc = sae__check_finite(val + t * k, count[t], 1, "val")) != SAE_OK)
            return sae__wrap(rc, "token %zu: ", t);
        pairs += count[t];
    }
    sparse_job job = {m, idx, count, val, k, x_hat};
    const size_t threads = n > 1 ? sae__model_threads(m) : 1;
    sae__parallel_for(threads, n, sae__grain((pairs / n + 1) * m->d_in), sparse_range, &job);
    return SAE_OK;
}

typedef struct {
    const sae_model *m;
    const float *raw;
    float *x_hat;
    sae__scored *heaps;
    uint32_t *idx;
    float *val;
    size_t kept_max;
} topk_job;

/* TopK: K rows of W_dec per token instead of a dense GEMM over mostly zeros. */
static void topk_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const topk_job *job = arg;
    const size_t K = job->kept_max;
    sae__scored *heap = job->heaps + worker * K;
    uint32_t *idx = job->idx + worker * K;
    float *val = job->val + worker * K;
    for (size_t r = begin; r < end; r++) {
        size_t kept = sae__select_codes(job->m, job->raw + r * job->m->d_sae, K, heap);
        for (size_t j = 0; j < kept; j++) {
            idx[j] = heap[j].index;
            val[j] = heap[j].value;
        }
        sae__decode_token(job->m, idx, val, kept, job->x_hat + r * job->m->d_in);
    }
}

int sae_reconstruct(const sae_model *m, const float *x, size_t n, float *x_hat)
{
    SAE_CHECK_NULL(m);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(x);
    SAE_CHECK_NULL(x_hat);
    int rc = check_sizes(m, n, m->d_sae);
    if (rc == SAE_OK)
        rc = sae__check_finite(x, n * m->d_in, m->d_in, "x");
    if (rc != SAE_OK)
        return rc;

    const bool topk = m->arch == SAE_ARCH_TOPK;
    const size_t block = sae__block_tokens(m->d_sae, n);
    const size_t kept_max = m->k < m->d_sae ? m->k : m->d_sae;
    const size_t threads = n > 1 ? sae__model_threads(m) : 1, grain = sae__grain(m->d_sae);
    const size_t chunks = sae__parallel_chunks(threads, block, grain);
    float *raw = sae__alloc(block * m->d_sae, sizeof(float), "reconstruct scratch");
    float *xs = sae__encoder_reads_x(m)
                    ? NULL
                    : sae__alloc(block * m->d_in, sizeof(float), "reconstruct scratch");
    topk_job job = {m, raw, NULL, NULL, NULL, NULL, kept_max};
    if (topk) {
        job.heaps = sae__alloc(chunks * kept_max, sizeof *job.heaps, "top-k heaps");
        job.idx = sae__alloc(chunks * kept_max, sizeof *job.idx, "top-k indices");
        job.val = sae__alloc(chunks * kept_max, sizeof *job.val, "top-k values");
    }
    if (raw == NULL || (xs == NULL && !sae__encoder_reads_x(m)) ||
        (topk && (job.heaps == NULL || job.idx == NULL || job.val == NULL))) {
        rc = SAE_ENOMEM;
        goto done;
    }
    /* Each block's x is fully read by the GEMM before its x_hat rows are written, so x_hat may
     * alias x. */
    for (size_t first = 0; first < n && rc == SAE_OK; first += block) {
        size_t rows = n - first < block ? n - first : block;
        sae__encoder_product(m, x + first * m->d_in, rows, xs, raw);
        if (topk) {
            job.x_hat = x_hat + first * m->d_in;
            sae__parallel_for(threads, rows, grain, topk_range, &job);
        } else if ((rc = sae__activate_rows(m, raw, rows)) == SAE_OK) {
            rc = sae__decode_dense(m, raw, rows, x_hat + first * m->d_in);
        }
    }
done:
    free(raw);
    free(xs);
    free(job.heaps);
    free(job.idx);
    free(job.val);
    return rc;
}
