/* Codes back to activations: dense (one GEMM), sparse (only the rows of W_dec in use), and the
 * round trip. */
#include "internal.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

static void finish_rows(const sae_model *m, float *x_hat, size_t n)
{
    if (m->input_scale != 1.0f)
        cblas_sscal((int)(n * m->d_in), 1.0f / m->input_scale, x_hat, 1);
}

void sae__decode_dense(const sae_model *m, const float *f, size_t n, float *x_hat)
{
    const size_t d_in = m->d_in, d_sae = m->d_sae;
    for (size_t t = 0; t < n; t++)
        memcpy(x_hat + t * d_in, m->b_dec, d_in * sizeof(float));
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, (int)d_sae, (int)d_in, 1.0f, m->W_dec, (int)d_in,
                    f, 1, 1.0f, x_hat, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)d_in, (int)d_sae,
                    1.0f, f, (int)d_sae, m->W_dec, (int)d_in, 1.0f, x_hat, (int)d_in);
    finish_rows(m, x_hat, n);
}

/* x_hat = b_dec + sum_j val[j] * W_dec[idx[j]], then unscaled. */
static void decode_one_sparse(const sae_model *m, const uint32_t *idx, const float *val,
                              size_t count, float *x_hat)
{
    memcpy(x_hat, m->b_dec, m->d_in * sizeof(float));
    for (size_t j = 0; j < count; j++)
        cblas_saxpy((int)m->d_in, val[j], m->W_dec + (size_t)idx[j] * m->d_in, 1, x_hat, 1);
    finish_rows(m, x_hat, 1);
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
    sae__decode_dense(m, f, n, x_hat);
    return SAE_OK;
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
    }
    for (size_t t = 0; t < n; t++)
        decode_one_sparse(m, idx + t * k, val + t * k, count[t], x_hat + t * m->d_in);
    return SAE_OK;
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
    float *pre = sae__alloc(block * m->d_sae, sizeof(float), "reconstruct scratch");
    float *xs = sae__alloc(block * m->d_in, sizeof(float), "reconstruct scratch");
    sae__scored *heap = topk ? sae__alloc(kept_max, sizeof *heap, "top-k heap") : NULL;
    float *vals = topk ? sae__alloc(kept_max, sizeof *vals, "top-k values") : NULL;
    uint32_t *idx = topk ? sae__alloc(kept_max, sizeof *idx, "top-k indices") : NULL;
    if (pre == NULL || xs == NULL || (topk && (heap == NULL || vals == NULL || idx == NULL))) {
        rc = SAE_ENOMEM;
        goto done;
    }
    /* Each block's x is fully read into pre before its x_hat rows are written, so x_hat may
     * alias x. */
    for (size_t first = 0; first < n; first += block) {
        size_t rows = n - first < block ? n - first : block;
        sae__preact(m, x + first * m->d_in, rows, xs, pre);
        if (!topk) {
            sae__activate_inplace(m, pre, rows);
            sae__decode_dense(m, pre, rows, x_hat + first * m->d_in);
            continue;
        }
        /* TopK: K rows of W_dec per token instead of a dense GEMM over mostly zeros. */
        for (size_t r = 0; r < rows; r++) {
            size_t kept = sae__topk_select(pre + r * m->d_sae, m->d_sae, kept_max, heap);
            size_t used = 0;
            for (size_t j = 0; j < kept && heap[j].value > 0.0f; j++, used++) {
                idx[used] = heap[j].index;
                vals[used] = heap[j].value;
            }
            decode_one_sparse(m, idx, vals, used, x_hat + (first + r) * m->d_in);
        }
    }
done:
    free(pre);
    free(xs);
    free(heap);
    free(vals);
    free(idx);
    return rc;
}
